//! Nothing a task starts outlives it: a background child in the task's process group
//! and a `setsid` child that left it are both gone once the task ends, whether it
//! exits, times out, or loses its synchronous submitter; on the agent (local run) and
//! on the daemon (cloud run). Stale task working directories are removed at start.

mod common;

use common::{http, wait_for, Cluster};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// Starts a background `sleep` in the task's group and a `setsid` one outside it, each
/// writing its pid to `$PIDS/$T.bg` / `$PIDS/$T.sid`, waits until both are written and
/// the test has seen them (`$PIDS/$T.go`), then runs `tail`.
fn script(tail: &str) -> String {
    let start = r#"exec </dev/null
sleep 1001 >/dev/null 2>&1 &
echo $! > "$PIDS/$T.bg.tmp" && mv "$PIDS/$T.bg.tmp" "$PIDS/$T.bg"
setsid sh -c 'echo $$ > "$PIDS/$T.sid.tmp" && mv "$PIDS/$T.sid.tmp" "$PIDS/$T.sid"; exec sleep 1002' >/dev/null 2>&1 &
while [ ! -e "$PIDS/$T.sid" ] || [ ! -e "$PIDS/$T.go" ]; do sleep 0.01; done
"#;
    format!("{start}{tail}")
}

/// Three tasks writing pids to `pids`: one that exits, one that outlives a 3 s
/// timeout, one that waits (up to `wait_timeout`) for its submitter to go away.
fn catalog(pids: &Path, wait_timeout: &str) -> String {
    let task = |name: &str, tail: &str, timeout: &str| {
        format!(
            "[tasks.{name}]\ncommand = [\"sh\", \"-c\", {}]\ntimeout = \"{timeout}\"\n[tasks.{name}.env]\nPATH = \"/usr/local/bin:/usr/bin:/bin\"\nPIDS = \"{}\"\nT = \"{name}\"\n",
            toml::Value::String(script(tail)),
            pids.display()
        )
    };
    [
        task("c_exit", "echo finished", "20s"),
        task("c_hang", "exec sleep 1003", "3s"),
        task("c_wait", "echo started; exec sleep 1003", wait_timeout),
    ]
    .concat()
}

/// Serialises starting services: the subreaper test starts its services with
/// `UPDRAFT_TASK_CGROUPS=off` in this process's environment, which they inherit.
static START: Mutex<()> = Mutex::new(());

/// A cluster whose daemon and agent each know the three tasks, writing pids to
/// `pids-daemon/` and `pids-agent/`; `cgroups = false` starts both with per-task
/// cgroups off, so the subreaper has to find what escaped.
fn cluster(cgroups: bool) -> (Cluster, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (dpids, apids) = (
        dir.path().join("pids-daemon"),
        dir.path().join("pids-agent"),
    );
    std::fs::create_dir(&dpids).unwrap();
    std::fs::create_dir(&apids).unwrap();
    // The daemon's waiting task ends by its timeout at the latest, whatever the agent
    // tells it; the agent's must end because its submitter left, long before that.
    let daemon_extra = catalog(&dpids, "5s");
    let agent_extra = format!(
        "[link]\naccept_timeout = \"1s\"\n{}",
        catalog(&apids, "10m")
    );
    let start = START.lock().unwrap_or_else(|p| p.into_inner());
    if !cgroups {
        std::env::set_var("UPDRAFT_TASK_CGROUPS", "off");
    }
    let c = std::panic::catch_unwind(|| Cluster::start_in(dir, &daemon_extra, &agent_extra));
    std::env::remove_var("UPDRAFT_TASK_CGROUPS");
    drop(start);
    let c = c.unwrap_or_else(|p| std::panic::resume_unwind(p));
    (c, dpids, apids)
}

/// A process, known by pid and start time so a reused pid is not mistaken for it.
struct Tracked {
    what: String,
    pid: i32,
    start: String,
}

fn start_time(pid: i32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19).map(str::to_string)
}

/// Waits for the task's two pid files, records both processes, and lets the task go on.
fn tracked(pids: &Path, task: &str) -> Vec<Tracked> {
    let procs = ["bg", "sid"]
        .iter()
        .map(|kind| {
            let file = pids.join(format!("{task}.{kind}"));
            let pid: i32 = wait_for(
                &format!("{} to be written", file.display()),
                Duration::from_secs(20),
                || std::fs::read_to_string(&file).ok()?.trim().parse().ok(),
            );
            let start = start_time(pid)
                .unwrap_or_else(|| panic!("{task}'s {kind} child {pid} ended before the task did"));
            Tracked {
                what: format!("{task}'s {kind} child {pid}"),
                pid,
                start,
            }
        })
        .collect();
    std::fs::write(pids.join(format!("{task}.go")), b"").unwrap();
    procs
}

/// Waits until none of `procs` exists any more (killed and reaped).
fn assert_all_gone(procs: &[Tracked], within: Duration) {
    for p in procs {
        wait_for(&format!("{} to be gone", p.what), within, || {
            (start_time(p.pid).as_deref() != Some(p.start.as_str())).then_some(())
        });
    }
}

fn reply_text(r: &common::HttpReply) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

/// Runs `task` synchronously in the background, returns its children and its reply.
fn run_tracked(
    c: &Cluster,
    task: &str,
    where_: &str,
    pids: &Path,
) -> (Vec<Tracked>, common::HttpReply) {
    let socket = c.socket.clone();
    let path = format!("/v1/tasks/{task}?where={where_}");
    let reply = std::thread::spawn(move || http(&socket, "POST", &path, b"").unwrap());
    let procs = tracked(pids, task);
    (procs, reply.join().unwrap())
}

fn exits_and_times_out(c: &Cluster, where_: &str, pids: &Path) {
    let (procs, r) = run_tracked(c, "c_exit", where_, pids);
    assert_eq!(r.status, 200, "{}", reply_text(&r));
    assert!(reply_text(&r).contains("finished"), "{}", reply_text(&r));
    assert_all_gone(&procs, Duration::from_secs(20));

    let (procs, r) = run_tracked(c, "c_hang", where_, pids);
    assert_ne!(r.status, 200, "c_hang should time out: {}", reply_text(&r));
    assert!(reply_text(&r).contains("timed_out"), "{}", reply_text(&r));
    assert_all_gone(&procs, Duration::from_secs(20));
}

/// Submits `c_wait` synchronously, waits until its children run, then goes away.
fn submit_and_disconnect(c: &Cluster, where_: &str, pids: &Path) -> Vec<Tracked> {
    let mut s = UnixStream::connect(&c.socket).unwrap();
    write!(
        s,
        "POST /v1/tasks/c_wait?where={where_} HTTP/1.1\r\nHost: agent\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let procs = tracked(pids, "c_wait");
    drop(s);
    procs
}

/// Local runs: the agent kills what its tasks started.
fn local_runs_leave_nothing(c: &Cluster, pids: &Path) {
    exits_and_times_out(c, "local", pids);
    // The submitter going away ends the run long before its 10 min timeout.
    let procs = submit_and_disconnect(c, "local", pids);
    assert_all_gone(&procs, Duration::from_secs(20));
}

/// Cloud runs: the daemon kills what its tasks started.
fn cloud_runs_leave_nothing(c: &Cluster, pids: &Path) {
    exits_and_times_out(c, "cloud", pids);
    // The daemon ends the run when told the submitter left, or at its 5 s timeout.
    let procs = submit_and_disconnect(c, "cloud", pids);
    assert_all_gone(&procs, Duration::from_secs(30));
}

fn assert_logged(log: &str, want: &str) {
    assert!(log.contains(want), "no `{want}` in the log:\n{log}");
}

#[test]
fn local_task_children_die_on_exit_timeout_and_submitter_gone() {
    let (c, _dpids, apids) = cluster(true);
    local_runs_leave_nothing(&c, &apids);
    assert_logged(&c.agent.log(), "task containment:");
}

#[test]
fn cloud_task_children_die_on_exit_timeout_and_submitter_gone() {
    let (c, dpids, _apids) = cluster(true);
    cloud_runs_leave_nothing(&c, &dpids);
    assert_logged(&c.daemon.log(), "task containment:");
}

#[test]
fn without_task_cgroups_the_subreaper_kills_what_escaped() {
    let (c, dpids, apids) = cluster(false);
    local_runs_leave_nothing(&c, &apids);
    cloud_runs_leave_nothing(&c, &dpids);
    let want = "task containment: child subreaper and process groups (UPDRAFT_TASK_CGROUPS=off)";
    assert_logged(&c.agent.log(), want);
    assert_logged(&c.daemon.log(), want);
    assert_logged(&c.agent.log(), "left running by finished tasks");
    assert_logged(&c.daemon.log(), "left running by finished tasks");
}

#[test]
fn stale_task_work_dirs_are_removed_at_start_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let mut planted = Vec::new();
    for state in ["astate", "dstate"] {
        let work = dir.path().join(state).join("work");
        let stale = work.join("updraft-task-abc123");
        std::fs::create_dir_all(stale.join("deep")).unwrap();
        std::fs::write(stale.join("deep/output.bin"), b"left by a crash").unwrap();
        let keep = work.join("notes.txt");
        std::fs::write(&keep, b"not a task dir").unwrap();
        let keep_dir = work.join("other-dir");
        std::fs::create_dir(&keep_dir).unwrap();
        planted.push((stale, keep, keep_dir));
    }
    let c = Cluster::start_in(dir, "", "[link]\naccept_timeout = \"1s\"\n");
    for (stale, keep, keep_dir) in &planted {
        assert!(!stale.exists(), "{} was not removed", stale.display());
        assert_eq!(std::fs::read(keep).unwrap(), b"not a task dir");
        assert!(keep_dir.is_dir(), "{} was removed", keep_dir.display());
    }
    for (log, who) in [(c.agent.log(), "agent"), (c.daemon.log(), "daemon")] {
        assert!(
            log.contains("removed 1 task working directories left by an earlier run"),
            "{who} log: {log}"
        );
    }
}

/// Whether this host gives tasks cgroups: a cgroup2 mount with `cgroup.kill` and the
/// right to create cgroups in it (root here, a delegated subtree under systemd).
fn task_cgroups_here(log: &str) -> bool {
    log.contains("task containment: per-task cgroups under")
}

/// A task's leader is in its task cgroup before its program's first instruction, so
/// nothing it forks can start outside: a leader that double-forks a `setsid` child and
/// exits at once leaves that child in the task's cgroup, not the service's. Each task
/// reports the cgroup its leader and its orphaned grandchild were in; many runs, since
/// a move made after the program starts loses this race only now and then.
#[test]
fn a_tasks_processes_are_in_its_cgroup_from_their_first_instruction() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let task = format!(
        "[tasks.cg]\ncommand = [\"sh\", \"-c\", {}]\n[tasks.cg.env]\nPATH = \"/usr/local/bin:/usr/bin:/bin\"\nOUT = \"{}\"\n",
        toml::Value::String(
            r#"(setsid sh -c 'grep "^0::" /proc/self/cgroup > "$OUT/$1.tmp" && mv "$OUT/$1.tmp" "$OUT/$1"' - $$ </dev/null >/dev/null 2>&1 &)
while read -r l; do case $l in 0::*) echo "leader $l";; esac; done < /proc/self/cgroup
while [ ! -e "$OUT/$$" ]; do sleep 0.01; done
echo "grandchild $(cat "$OUT/$$")""#
                .into()
        ),
        out.display()
    );
    let _start = START.lock().unwrap_or_else(|p| p.into_inner());
    let c = Cluster::start_in(dir, "", &task);
    let log = c.agent.log();
    if !task_cgroups_here(&log) {
        use std::os::unix::fs::MetadataExt;
        assert_ne!(
            std::fs::metadata("/proc/self").unwrap().uid(),
            0,
            "as root on this host the agent should give tasks cgroups:\n{log}"
        );
        return;
    }
    for n in 0..200 {
        let r = common::http(&c.socket, "POST", "/v1/tasks/cg?where=local", b"").unwrap();
        let text = reply_text(&r);
        assert_eq!(r.status, 200, "{text}");
        for who in ["leader", "grandchild"] {
            let line = text
                .lines()
                .find(|l| l.starts_with(who))
                .unwrap_or_default();
            assert!(
                line.contains("/updraft-task-"),
                "run {n}: the task's {who} ran outside its task cgroup: {text}"
            );
        }
    }
}
