//! Fault tests of the "never lose a task" guarantee, with real `updraftd` and
//! `updraft-agent` processes: daemons killed or drained mid-task, the agent killed with
//! a queue of detached tasks, a blackholed and a lossy link through the link emulator,
//! and the agent's socket rebound mid-task.
//!
//! Every task here is a command that notes `UPDRAFT_TASK_ID` and its side in a runs
//! file before it sleeps and echoes its input, so each test checks both that the
//! submitter got exactly one result with the right output and how many times the task
//! ran to produce it. Every wait is a condition polled with a bound; the few sleeps
//! only hold a fault for a set time.

mod common;

use common::*;
use nix::sys::signal::Signal;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use updraft_linkem::{LinkParams, Relay};

/// Longest any single wait may take before it counts as a hang.
const WAIT: Duration = Duration::from_secs(30);

/// Daemon settings shared by every test: a dead agent is noticed in 2 s.
const DAEMON_BASE: &str = "idle_timeout = \"2s\"\nmax_concurrent_tasks = 8\n";

/// The agent's `[link]` table: a dead connection is noticed in about 2 s, reconnects
/// come within 500 ms, a daemon that does not accept within `accept` is given up, and a
/// task lost mid-run with no daemon left waits `failover` for one to come back.
fn agent_link(accept: &str, connect: &str, failover: &str) -> String {
    format!(
        "[link]\nidle_timeout = \"2s\"\nkeep_alive = \"300ms\"\nreconnect_min = \"100ms\"\nreconnect_max = \"500ms\"\naccept_timeout = \"{accept}\"\nconnect_timeout = \"{connect}\"\nfailover_wait = \"{failover}\"\n"
    )
}

/// A catalog entry that notes each run as `ID SIDE` in `runs`, sleeps, then echoes
/// its input. `offload` is the agent-side `offload` key (empty on the daemon).
fn counted_task(name: &str, runs: &Path, side: &str, sleep: &str, offload: &str) -> String {
    let offload = if offload.is_empty() {
        String::new()
    } else {
        format!("offload = \"{offload}\"\n")
    };
    format!(
        r#"[tasks.{name}]
command = ["sh", "-c", "echo \"$UPDRAFT_TASK_ID $SIDE\" >> {runs}; sleep {sleep}; cat"]
env = {{ SIDE = "{side}", PATH = "/usr/bin:/bin" }}
timeout = "30s"
{offload}"#,
        runs = runs.display()
    )
}

/// A policy that sends `task` to the cloud by rule, so that, unlike `offload =
/// "always"`, it may still run on the board when the cloud fails.
fn cloud_rule_policy(dir: &Path, task: &str) {
    std::fs::write(
        dir.join("policy.toml"),
        format!(
            "default = \"auto\"\n\n[[rule]]\nname = \"to the cloud\"\nmatch = {{ names = [\"{task}\"] }}\nplace = \"cloud\"\n"
        ),
    )
    .unwrap();
}

/// The runs file the counted tasks append to.
struct Runs(PathBuf);

impl Runs {
    fn new(dir: &Path) -> Self {
        Self(dir.join("runs"))
    }

    fn path(&self) -> &Path {
        &self.0
    }

    /// Every run so far, in order: (task id, side).
    fn all(&self) -> Vec<(String, String)> {
        std::fs::read_to_string(&self.0)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (id, side) = l.split_once(' ')?;
                Some((id.to_string(), side.to_string()))
            })
            .collect()
    }

    /// The sides `id` ran on, in order.
    fn of(&self, id: &str) -> Vec<String> {
        self.all()
            .into_iter()
            .filter(|(i, _)| i == id)
            .map(|(_, s)| s)
            .collect()
    }

    /// Runs per task id.
    fn per_id(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for (id, _) in self.all() {
            *m.entry(id).or_default() += 1;
        }
        m
    }

    /// Task ids that ran more than once.
    fn duplicated(&self) -> Vec<String> {
        self.per_id()
            .into_iter()
            .filter(|(_, n)| *n > 1)
            .map(|(id, _)| id)
            .collect()
    }

    fn wait_started(&self, what: &str, f: impl Fn(&[(String, String)]) -> bool) {
        wait_for(what, WAIT, || f(&self.all()).then_some(()));
    }
}

fn text(body: &[u8]) -> String {
    String::from_utf8_lossy(body).into_owned()
}

/// Submits a detached task and returns its id.
fn submit_detached(socket: &Path, task: &str, input: &[u8]) -> String {
    let r = http(
        socket,
        "POST",
        &format!("/v1/tasks/{task}?detach=true"),
        input,
    )
    .expect("submitting a detached task");
    assert_eq!(r.status, 202, "detached submit: {}", text(&r.body));
    let v: Value = serde_json::from_slice(&r.body).expect("202 body is JSON");
    let id = v["id"].as_str().expect("202 body has an id").to_string();
    assert_eq!(r.header("updraft-task-id"), Some(id.as_str()));
    id
}

/// A detached task's state, or `None` while the agent does not answer (restarting).
fn task_state(socket: &Path, id: &str) -> Option<Value> {
    let r = http(socket, "GET", &format!("/v1/tasks/{id}"), b"").ok()?;
    assert_eq!(r.status, 200, "state of {id}: {}", text(&r.body));
    Some(serde_json::from_slice(&r.body).expect("task state is JSON"))
}

fn state_name(v: &Value) -> &str {
    v["state"].as_str().unwrap_or("?")
}

/// Waits until a detached task is done or failed and returns its state.
fn wait_finished(socket: &Path, id: &str, timeout: Duration) -> Value {
    wait_for(&format!("detached task {id} to finish"), timeout, || {
        let v = task_state(socket, id)?;
        matches!(state_name(&v), "done" | "failed").then_some(v)
    })
}

/// Checks that a finished detached task is done, exit 0, and that its output is
/// `want`; returns its state.
fn assert_detached_delivered(socket: &Path, id: &str, want: &[u8], timeout: Duration) -> Value {
    let v = wait_finished(socket, id, timeout);
    assert_eq!(state_name(&v), "done", "task {id}: {v}");
    assert_eq!(v["exit_code"], 0, "task {id}: {v}");
    assert_eq!(v["output_bytes"], want.len() as u64, "task {id}: {v}");
    let r = http(socket, "GET", &format!("/v1/tasks/{id}/output"), b"").unwrap();
    assert_eq!(r.status, 200, "output of {id}: {}", text(&r.body));
    assert_eq!(r.header("updraft-exit-code"), Some("0"), "task {id}");
    assert_eq!(r.header("updraft-task-id"), Some(id));
    assert!(
        r.body == want,
        "task {id}: wrong output {:?}",
        text(&r.body)
    );
    v
}

/// Submits a sync task on a thread of its own.
fn submit_sync(socket: &Path, path: String, input: Vec<u8>) -> JoinHandle<HttpReply> {
    let socket = socket.to_path_buf();
    std::thread::spawn(move || http(&socket, "POST", &path, &input).expect("sync submit"))
}

/// Checks a sync reply: 200, exit 0, output `want`; returns (task id, placement, reason).
fn assert_sync_delivered(r: &HttpReply, want: &[u8]) -> (String, String, String) {
    assert_eq!(
        r.status,
        200,
        "sync task: {} (reason {:?})",
        text(&r.body),
        r.header("updraft-reason")
    );
    assert_eq!(r.header("updraft-exit-code"), Some("0"));
    assert!(r.body == want, "wrong output {:?}", text(&r.body));
    (
        r.header("updraft-task-id").expect("task id header").into(),
        r.header("updraft-placement").unwrap_or_default().into(),
        r.header("updraft-reason").unwrap_or_default().into(),
    )
}

/// The agent's view of its daemons, or `None` while it does not answer.
fn clouds(socket: &Path) -> Option<Vec<Value>> {
    let r = http(socket, "GET", "/v1/status", b"").ok()?;
    let v: Value = serde_json::from_slice(&r.body).ok()?;
    v["clouds"].as_array().cloned()
}

fn wait_clouds(socket: &Path, what: &str, f: impl Fn(&[Value]) -> bool) {
    wait_for(what, WAIT, || f(&clouds(socket)?).then_some(()));
}

fn wait_all_connected(socket: &Path) {
    wait_clouds(socket, "the agent to connect to every daemon", |c| {
        !c.is_empty() && c.iter().all(|d| d["connected"] == true)
    });
}

/// Runs an `updraft-agent` client command; it is killed, and the test fails, if it
/// outlives `timeout`.
fn cli(socket: &Path, args: &[&str], stdin: &[u8], timeout: Duration) -> std::process::Output {
    use std::io::{Read, Write};
    let mut child = Command::new(bin("updraft-agent"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running updraft-agent");
    let mut s = child.stdin.take().unwrap();
    let input = stdin.to_vec();
    std::thread::spawn(move || {
        let _ = s.write_all(&input);
    });
    let reader = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let stdout = reader(Box::new(child.stdout.take().unwrap()));
    let stderr = reader(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("updraft-agent {args:?} still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    std::process::Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// The link emulator in-process, on its own runtime; dropping it stops the relay.
struct Emulator {
    relay: Option<Relay>,
    runtime: tokio::runtime::Runtime,
}

impl Emulator {
    fn start(upstream: &str, params: LinkParams, seed: u64) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let relay = {
            let _in_runtime = runtime.enter();
            Relay::start(
                "127.0.0.1:0".parse().unwrap(),
                upstream.parse().unwrap(),
                params,
                seed,
            )
            .expect("starting the link emulator")
        };
        Self {
            relay: Some(relay),
            runtime,
        }
    }

    fn relay(&self) -> &Relay {
        self.relay.as_ref().unwrap()
    }

    fn addr(&self) -> String {
        self.relay().local_addr().to_string()
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        if let Some(relay) = self.relay.take() {
            self.runtime.block_on(relay.shutdown());
        }
    }
}

/// Words a reason uses when it tells of a connection lost mid-task.
fn tells_of_a_loss(reason: &str) -> bool {
    let r = reason.to_ascii_lowercase();
    ["lost", "died", "closed", "timed out", "reset"]
        .iter()
        .any(|w| r.contains(w))
}

#[test]
fn daemon_killed_mid_task_sync_finishes_on_the_board_and_detached_waits_for_its_return() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_pki(d);
    let runs = Runs::new(d);
    cloud_rule_policy(d, "work");
    let daemon_extra = format!(
        "{DAEMON_BASE}{}{}",
        counted_task("work", runs.path(), "cloud", "1.5", ""),
        counted_task("work_always", runs.path(), "cloud", "1.5", ""),
    );
    let (mut daemon, addr) = start_daemon_named(d, "d", "127.0.0.1:0", &daemon_extra);
    let agent_extra = format!(
        "{}{}{}",
        agent_link("1s", "1s", "2s"),
        counted_task("work", runs.path(), "board", "1.5", ""),
        counted_task("work_always", runs.path(), "board", "1.5", "always"),
    );
    let (_agent, socket) = start_agent(d, &addr, &agent_extra);
    wait_all_connected(&socket);

    // Sync, placed in the cloud by a rule: after the loss it runs on the board.
    let sync = submit_sync(&socket, "/v1/tasks/work".into(), b"sync input".to_vec());
    runs.wait_started("the sync task to start in the cloud", |r| {
        r.iter().any(|(_, s)| s == "cloud")
    });
    daemon.signal(Signal::SIGKILL);
    daemon.wait_exit(WAIT);
    let (id, placement, reason) = assert_sync_delivered(&sync.join().unwrap(), b"sync input");
    assert_eq!(placement, "local", "reason: {reason}");
    assert!(
        tells_of_a_loss(&reason) && reason.contains(&addr),
        "the reason tells of the lost daemon: {reason}"
    );
    let sync_runs = runs.of(&id);
    assert_eq!(
        sync_runs,
        ["cloud", "board"],
        "one cloud run lost with the daemon, one board run delivered"
    );

    // The daemon comes back on the same address; the agent reconnects.
    let (d2, addr2) = start_daemon_named(d, "d", &addr, &daemon_extra);
    daemon = d2;
    assert_eq!(addr2, addr);
    wait_all_connected(&socket);

    // Detached and `always`: after the loss it waits for the cloud, not the board.
    let o = cli(
        &socket,
        &["run", "work_always", "--detach", "--input", "-"],
        b"detached input",
        WAIT,
    );
    assert!(o.status.success(), "run --detach: {}", text(&o.stderr));
    let did = text(&o.stdout).trim().to_string();
    assert_eq!(did.len(), 32, "run --detach prints only the id: {did:?}");
    runs.wait_started("the detached task to start in the cloud", |r| {
        r.iter().any(|(i, s)| *i == did && s == "cloud")
    });
    daemon.signal(Signal::SIGKILL);
    daemon.wait_exit(WAIT);
    wait_clouds(&socket, "the agent to see the daemon gone", |c| {
        c[0]["connected"] == false
    });
    // Hold the outage past the agent's reconnect backoff and accept timeout.
    std::thread::sleep(Duration::from_secs(2));
    let held = task_state(&socket, &did).unwrap();
    assert!(
        matches!(state_name(&held), "queued" | "running"),
        "an `always` task waits while no daemon is usable: {held}"
    );
    assert_eq!(runs.of(&did), ["cloud"], "it did not run on the board");

    let (d3, addr3) = start_daemon_named(d, "d", &addr, &daemon_extra);
    let _daemon = d3;
    assert_eq!(addr3, addr);
    let o = cli(&socket, &["result", &did, "--wait"], b"", WAIT);
    assert_eq!(
        o.status.code(),
        Some(0),
        "result --wait: {}",
        text(&o.stderr)
    );
    assert_eq!(o.stdout, b"detached input");
    let v = assert_detached_delivered(&socket, &did, b"detached input", WAIT);
    assert_eq!(v["placement"], "cloud", "{v}");
    let detached_runs = runs.of(&did);
    assert!(
        (1..=2).contains(&detached_runs.len()) && detached_runs.iter().all(|s| s == "cloud"),
        "the killed daemon's run, and at most one more on the restarted one: {detached_runs:?}"
    );
    eprintln!(
        "faults: daemon killed: sync runs {sync_runs:?}; detached runs {detached_runs:?}, attempts {}",
        v["attempts"]
    );
}

#[test]
fn agent_killed_with_a_hundred_detached_tasks_queued_finishes_them_after_restart() {
    const TASKS: usize = 100;
    const MAX_RUNNING: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_pki(d);
    let runs = Runs::new(d);
    // No daemon: these tasks never leave the board.
    let nowhere = "127.0.0.1:9";
    let agent_extra = format!(
        "max_local_concurrency = 1\n[journal]\nmax_running = {MAX_RUNNING}\n{}{}",
        agent_link("1s", "1s", "10s"),
        counted_task("quick", runs.path(), "board", "0.05", "never"),
    );
    let (mut agent, socket) = start_agent(d, nowhere, &agent_extra);
    wait_for("the agent's socket", WAIT, || {
        http(&socket, "GET", "/v1/status", b"").ok()
    });
    let input = |i: usize| format!("task {i:03}\n").into_bytes();
    let ids: Vec<String> = (0..TASKS)
        .map(|i| submit_detached(&socket, "quick", &input(i)))
        .collect();
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), TASKS);
    runs.wait_started("a few tasks to run", |r| r.len() >= 5);
    agent.signal(Signal::SIGKILL);
    agent.wait_exit(WAIT);
    let before: BTreeSet<String> = runs.all().into_iter().map(|(id, _)| id).collect();
    assert!(
        before.len() < TASKS,
        "tasks were still queued when the agent died ({} had started)",
        before.len()
    );

    let (agent2, _) = start_agent(d, nowhere, &agent_extra);
    agent = agent2;
    for (i, id) in ids.iter().enumerate() {
        let v = assert_detached_delivered(&socket, id, &input(i), Duration::from_secs(60));
        assert_eq!(v["placement"], "local", "{v}");
    }
    let per_id = runs.per_id();
    assert_eq!(per_id.len(), TASKS, "every task ran: {per_id:?}");
    let dups = runs.duplicated();
    assert!(
        dups.len() <= MAX_RUNNING,
        "at most the tasks in progress at the kill ran twice: {dups:?}"
    );
    for id in &dups {
        assert!(
            before.contains(id),
            "{id} ran twice without being cut short"
        );
        assert_eq!(per_id[id], 2, "{id} ran {} times", per_id[id]);
    }
    eprintln!(
        "faults: agent killed: {} started before the kill, {} runs in all, {} duplicated",
        before.len(),
        runs.all().len(),
        dups.len()
    );
    drop(agent);
}

#[test]
fn blackhole_longer_than_the_idle_timeout_loses_no_task_and_runs_none_twice() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_pki(d);
    let runs = Runs::new(d);
    let (_daemon, daemon_addr) = start_daemon_named(
        d,
        "d",
        "127.0.0.1:0",
        &format!(
            "{DAEMON_BASE}{}{}",
            counted_task("work_always", runs.path(), "cloud", "1.5", ""),
            counted_task("work", runs.path(), "cloud", "1.5", ""),
        ),
    );
    cloud_rule_policy(d, "work");
    let link = Emulator::start(&daemon_addr, LinkParams::default(), 3);
    let agent_extra = format!(
        "{}{}{}",
        agent_link("1s", "1s", "10s"),
        counted_task("work_always", runs.path(), "board", "1.5", "always"),
        counted_task("work", runs.path(), "board", "1.5", ""),
    );
    let (_agent, socket) = start_agent(d, &link.addr(), &agent_extra);
    wait_all_connected(&socket);

    let input = |i: usize| format!("through the blackhole {i}\n").into_bytes();
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(submit_detached(&socket, "work_always", &input(i)));
    }
    // Sync, in the cloud by a rule, so it could run on the board: with no daemon left
    // it waits `failover_wait` for the daemon, which still runs it, instead.
    let sync = submit_sync(
        &socket,
        "/v1/tasks/work".into(),
        b"sync through the cut".to_vec(),
    );
    runs.wait_started("the first tasks to run in the cloud", |r| r.len() >= 4);

    let cut = Instant::now();
    link.relay().handle().set_blackhole(true);
    for i in 3..6 {
        ids.push(submit_detached(&socket, "work_always", &input(i)));
    }
    wait_clouds(&socket, "the agent to see the link dead", |c| {
        c[0]["connected"] == false
    });
    for i in 6..8 {
        ids.push(submit_detached(&socket, "work_always", &input(i)));
    }
    // Hold the cut a while past the idle timeout, then check nothing gave up.
    std::thread::sleep(
        Duration::from_secs(3).saturating_sub(cut.elapsed()) + Duration::from_secs(1),
    );
    for id in &ids {
        let v = task_state(&socket, id).unwrap();
        assert!(
            matches!(state_name(&v), "queued" | "running"),
            "{id} waits for the cloud during the blackhole: {v}"
        );
    }
    let held = cut.elapsed();
    link.relay().handle().set_blackhole(false);

    for (i, id) in ids.iter().enumerate() {
        let v = assert_detached_delivered(&socket, id, &input(i), WAIT);
        assert_eq!(v["placement"], "cloud", "{v}");
    }
    let (sync_id, placement, reason) =
        assert_sync_delivered(&sync.join().unwrap(), b"sync through the cut");
    assert_eq!(placement, "cloud", "reason: {reason}");
    assert!(
        tells_of_a_loss(&reason),
        "the reason tells of the loss: {reason}"
    );
    ids.push(sync_id);
    for id in &ids {
        assert_eq!(runs.of(id), ["cloud"], "{id} ran once, in the cloud");
    }
    let stats = link.relay().stats();
    eprintln!(
        "faults: blackhole {held:?}: {} tasks, {} runs, {} duplicated, {} datagrams blackholed",
        ids.len(),
        runs.all().len(),
        runs.duplicated().len(),
        stats.up.blackholed + stats.down.blackholed
    );
}

#[test]
fn lossy_slow_link_delivers_every_task_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_pki(d);
    let runs = Runs::new(d);
    let (_daemon, daemon_addr) = start_daemon_named(
        d,
        "d",
        "127.0.0.1:0",
        &format!(
            "idle_timeout = \"2s\"\nmax_concurrent_tasks = 24\n{}{}",
            counted_task("work", runs.path(), "cloud", "0.2", ""),
            counted_task("work_always", runs.path(), "cloud", "0.2", ""),
        ),
    );
    let lossy = |loss: f64| LinkParams {
        delay: Duration::from_millis(100),
        loss,
        ..LinkParams::default()
    };
    let link = Emulator::start(&daemon_addr, lossy(0.05), 11);
    // A 200 ms RTT with loss makes handshakes and accepts slower than on loopback.
    let agent_extra = format!(
        "{}{}{}",
        agent_link("5s", "5s", "10s"),
        counted_task("work", runs.path(), "board", "0.2", ""),
        counted_task("work_always", runs.path(), "board", "0.2", "always"),
    );
    let (_agent, socket) = start_agent(d, &link.addr(), &agent_extra);
    wait_all_connected(&socket);

    let mut summary = Vec::new();
    for (round, loss) in [(0u64, 0.05), (1, 0.20)] {
        link.relay().handle().set_both(lossy(loss)).unwrap();
        wait_all_connected(&socket);
        let input = |i: u64| noise(1500 + 700 * i as usize, round * 100 + i);
        let sync: Vec<_> = (0..10)
            .map(|i| submit_sync(&socket, "/v1/tasks/work?where=cloud".into(), input(i)))
            .collect();
        let detached: Vec<(u64, String)> = (10..20)
            .map(|i| (i, submit_detached(&socket, "work_always", &input(i))))
            .collect();
        let mut ids = Vec::new();
        for (i, h) in sync.into_iter().enumerate() {
            let (id, placement, reason) =
                assert_sync_delivered(&h.join().unwrap(), &input(i as u64));
            assert_eq!(placement, "cloud", "{reason}");
            ids.push(id);
        }
        for (i, id) in detached {
            let v = assert_detached_delivered(&socket, &id, &input(i), WAIT);
            assert_eq!(v["placement"], "cloud", "{v}");
            ids.push(id);
        }
        for id in &ids {
            assert_eq!(runs.of(id), ["cloud"], "{id} ran once at loss {loss}");
        }
        let ran: usize = ids.iter().map(|id| runs.of(id).len()).sum();
        summary.push(format!("loss {loss}: {} tasks, {ran} runs", ids.len()));
    }
    let stats = link.relay().stats();
    eprintln!(
        "faults: lossy link: {}; {} duplicated; {} datagrams lost",
        summary.join(", "),
        runs.duplicated().len(),
        stats.up.dropped_loss + stats.down.dropped_loss
    );
    assert!(runs.duplicated().is_empty());
}

#[test]
fn socket_rebound_mid_task_migrates_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_pki(d);
    let runs = Runs::new(d);
    let (daemon, daemon_addr) = start_daemon_named(
        d,
        "d",
        "127.0.0.1:0",
        &format!(
            "{DAEMON_BASE}{}",
            counted_task("work", runs.path(), "cloud", "2", "")
        ),
    );
    // Through the emulator, which maps each client port to its own upstream socket like
    // a NAT: its mapping count shows the rebind on the wire.
    let link = Emulator::start(&daemon_addr, LinkParams::default(), 5);
    let agent_extra = format!(
        "{}{}",
        agent_link("1s", "1s", "10s"),
        counted_task("work", runs.path(), "board", "2", ""),
    );
    let (mut agent, socket) = start_agent(d, &link.addr(), &agent_extra);
    wait_all_connected(&socket);
    assert_eq!(link.relay().stats().mappings_created, 1);

    let task = submit_sync(
        &socket,
        "/v1/tasks/work?where=cloud".into(),
        b"migrating".to_vec(),
    );
    runs.wait_started("the task to start in the cloud", |r| r.len() == 1);
    agent.signal(Signal::SIGUSR1);
    wait_for("the agent's packets from a new port", WAIT, || {
        (link.relay().stats().mappings_created >= 2).then_some(())
    });
    let (id, placement, reason) = assert_sync_delivered(&task.join().unwrap(), b"migrating");
    assert_eq!(placement, "cloud", "{reason}");
    assert_eq!(runs.of(&id), ["cloud"], "the task ran once");
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "SIGUSR1 does not stop the agent"
    );
    // The migrated connection carries the next task too.
    let r = http(&socket, "POST", "/v1/tasks/echo?where=cloud", b"after").unwrap();
    assert_eq!((r.status, r.body.as_slice()), (200, &b"after"[..]));
    let log = daemon.log();
    let connects = log.matches("agent connected").count();
    assert_eq!(connects, 1, "one connection from the agent:\n{log}");
    assert!(!log.contains("agent disconnected"), "{log}");
    eprintln!(
        "faults: rebind: runs {:?}, {connects} connection(s), {} relay mappings",
        runs.of(&id),
        link.relay().stats().mappings_created
    );
}

#[test]
fn one_of_two_daemons_killed_its_tasks_finish_on_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_pki(d);
    let runs = Runs::new(d);
    let daemon_extra = |side: &str| {
        format!(
            "{DAEMON_BASE}{}",
            counted_task("work_always", runs.path(), side, "2.5", "")
        )
    };
    let (mut a, a_addr) = start_daemon_named(d, "a", "127.0.0.1:0", &daemon_extra("cloud-a"));
    let (_b, b_addr) = start_daemon_named(d, "b", "127.0.0.1:0", &daemon_extra("cloud-b"));
    let agent_extra = format!(
        "{}{}",
        agent_link("1s", "1s", "10s"),
        counted_task("work_always", runs.path(), "board", "2.5", "always"),
    );
    let (_agent, socket) = start_agent_clouds(d, &[&a_addr, &b_addr], &agent_extra);
    wait_all_connected(&socket);

    let input = |i: usize| format!("spread {i}\n").into_bytes();
    let sync: Vec<_> = (0..4)
        .map(|i| submit_sync(&socket, "/v1/tasks/work_always".into(), input(i)))
        .collect();
    let detached: Vec<(usize, String)> = (4..10)
        .map(|i| (i, submit_detached(&socket, "work_always", &input(i))))
        .collect();
    runs.wait_started("all ten tasks to start", |r| r.len() >= 10);
    let first: BTreeMap<String, String> = runs.all().into_iter().collect();
    let on_a = first.values().filter(|s| *s == "cloud-a").count();
    let on_b = first.values().filter(|s| *s == "cloud-b").count();
    assert!(
        on_a >= 1 && on_b >= 1,
        "tasks spread over both daemons: {first:?}"
    );
    a.signal(Signal::SIGKILL);
    a.wait_exit(WAIT);

    let mut ids = Vec::new();
    for (i, h) in sync.into_iter().enumerate() {
        let (id, placement, reason) = assert_sync_delivered(&h.join().unwrap(), &input(i));
        assert_eq!(placement, "cloud", "{reason}");
        ids.push(id);
    }
    for (i, id) in detached {
        let v = assert_detached_delivered(&socket, &id, &input(i), WAIT);
        assert_eq!(v["placement"], "cloud", "{v}");
        ids.push(id);
    }
    for id in &ids {
        let sides = runs.of(id);
        match first.get(id).map(String::as_str) {
            Some("cloud-a") => assert_eq!(sides, ["cloud-a", "cloud-b"], "{id}"),
            Some("cloud-b") => assert_eq!(sides, ["cloud-b"], "{id}"),
            other => panic!("{id} first ran on {other:?}"),
        }
    }
    eprintln!(
        "faults: two daemons: {on_a} on a (killed), {on_b} on b; {} runs; {} ran twice (a's)",
        runs.all().len(),
        runs.duplicated().len()
    );
}

#[test]
fn daemon_drains_under_load_and_every_task_is_delivered_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_pki(d);
    let runs = Runs::new(d);
    cloud_rule_policy(d, "work");
    let daemon_extra = |side: &str| {
        format!(
            "idle_timeout = \"2s\"\nmax_concurrent_tasks = 4\n{}",
            counted_task("work", runs.path(), side, "1", "")
        )
    };
    let (mut a, a_addr) = start_daemon_named(d, "a", "127.0.0.1:0", &daemon_extra("cloud-a"));
    let (_b, b_addr) = start_daemon_named(d, "b", "127.0.0.1:0", &daemon_extra("cloud-b"));
    let agent_extra = format!(
        "{}{}",
        agent_link("1s", "1s", "10s"),
        counted_task("work", runs.path(), "board", "1", ""),
    );
    let (_agent, socket) = start_agent_clouds(d, &[&a_addr, &b_addr], &agent_extra);
    wait_all_connected(&socket);

    let input = |i: usize| format!("drain {i}\n").into_bytes();
    let mut tasks: Vec<_> = (0..10)
        .map(|i| submit_sync(&socket, "/v1/tasks/work".into(), input(i)))
        .collect();
    runs.wait_started("tasks to run on daemon a", |r| {
        r.iter().any(|(_, s)| s == "cloud-a")
    });
    a.signal(Signal::SIGTERM);
    wait_clouds(&socket, "the agent to see daemon a drain", |c| {
        c[0]["draining"] == true || c[0]["connected"] == false
    });
    let before_drain: BTreeSet<String> = runs
        .all()
        .into_iter()
        .filter(|(_, s)| s == "cloud-a")
        .map(|(id, _)| id)
        .collect();
    tasks.extend((10..20).map(|i| submit_sync(&socket, "/v1/tasks/work".into(), input(i))));

    let mut sides: BTreeMap<String, usize> = BTreeMap::new();
    for (i, h) in tasks.into_iter().enumerate() {
        let (id, _, reason) = assert_sync_delivered(&h.join().unwrap(), &input(i));
        let ran = runs.of(&id);
        assert_eq!(ran.len(), 1, "task {i} ({id}) ran once: {ran:?} ({reason})");
        if i >= 10 {
            assert_ne!(
                ran[0], "cloud-a",
                "task {i} went to the draining daemon ({reason})"
            );
        }
        *sides.entry(ran[0].clone()).or_default() += 1;
    }
    let status = a.wait_exit(WAIT);
    assert!(status.success(), "daemon a exit: {status:?}\n{}", a.log());
    assert!(!before_drain.is_empty());
    eprintln!(
        "faults: drain: 20 tasks, {} runs, {} duplicated, by side {sides:?}",
        runs.all().len(),
        runs.duplicated().len()
    );
}
