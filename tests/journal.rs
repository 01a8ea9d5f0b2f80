//! The journal of detached tasks at its edges, with the real `updraft-agent`: a journal
//! cut short is refused at start with nothing deleted, a full disk under `state_dir`
//! ends a task as `storage_full` instead of wedging it, `DELETE /v1/tasks/{id}` frees a
//! result, and the files on disk stay near `[journal] max_bytes`.
//!
//! No daemon runs: the agent's one `[[cloud]]` address answers nothing, so a task
//! submitted with `where=cloud` stays queued for as long as a test needs it to.

mod common;

use common::*;
use nix::sys::signal::Signal;
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Longest any single wait may take before it counts as a hang.
const WAIT: Duration = Duration::from_secs(30);

/// A `[[cloud]]` address where nothing answers.
const NO_DAEMON: &str = "127.0.0.1:9";

/// Starts an agent in `dir` (certificates made already) and waits until it serves.
fn serving_agent(dir: &Path, extra: &str) -> (Proc, PathBuf) {
    let (agent, socket) = start_agent(dir, NO_DAEMON, extra);
    wait_for("the agent to serve", WAIT, || {
        http(&socket, "GET", "/v1/status", b"")
            .ok()
            .filter(|r| r.status == 200)
    });
    (agent, socket)
}

/// Submits a detached task and returns its id.
fn detach(socket: &Path, task_and_query: &str, input: &[u8]) -> String {
    let r = http(
        socket,
        "POST",
        &format!("/v1/tasks/{task_and_query}&detach=true"),
        input,
    )
    .unwrap();
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    r.json()["id"].as_str().unwrap().to_string()
}

fn task_state(socket: &Path, id: &str) -> Value {
    let r = http(socket, "GET", &format!("/v1/tasks/{id}"), b"").unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

#[test]
fn a_journal_cut_to_nothing_is_refused_at_start_and_nothing_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    let (agent, socket) = serving_agent(dir.path(), "");
    let ids: Vec<String> = (0..5)
        .map(|i| detach(&socket, "echo?where=cloud", format!("task {i}").as_bytes()))
        .collect();
    let mut agent = agent;
    agent.signal(Signal::SIGKILL);
    agent.wait_exit(WAIT);

    let journal = dir.path().join("astate/journal.db");
    let wal = dir.path().join("astate/journal.db-wal");
    let saved = std::fs::read(&journal).unwrap();
    let log_before = std::fs::read(&wal).ok();
    std::fs::write(&journal, b"").unwrap();

    let (mut refused, _) = start_agent(dir.path(), NO_DAEMON, "");
    let status = refused.wait_exit(WAIT);
    assert!(!status.success(), "started on an emptied journal: {status}");
    let log = refused.log();
    let line = log
        .lines()
        .find(|l| l.contains(&journal.display().to_string()))
        .unwrap_or_else(|| panic!("no line names {}:\n{log}", journal.display()));
    assert!(
        line.contains("move") && line.contains("aside"),
        "says what to do: {line}"
    );
    if log_before.as_ref().is_some_and(|l| !l.is_empty()) {
        assert!(line.contains(&wal.display().to_string()), "{line}");
    }
    assert_eq!(std::fs::read(&journal).unwrap(), b"", "journal changed");
    assert_eq!(
        std::fs::read(&wal).ok(),
        log_before,
        "WAL changed or deleted"
    );

    // Put back, the journal still holds every accepted task.
    std::fs::write(&journal, &saved).unwrap();
    let (_agent, socket) = serving_agent(dir.path(), "");
    for id in &ids {
        assert_eq!(task_state(&socket, id)["state"], "queued", "task {id}");
    }
}

/// A tmpfs mounted over a directory for one test; unmounted (lazily, so a process
/// still holding a file cannot keep it) when dropped. Declare it before the agent, so
/// the agent is stopped first.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`mount -o size=`) at `dir`, or says why it cannot and
    /// returns `None` (mounting needs root or CAP_SYS_ADMIN).
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs(dir.to_path_buf())),
            Ok(o) => {
                eprintln!(
                    "skipped: cannot mount a tmpfs at {}: {}",
                    dir.display(),
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("skipped: cannot run mount: {e}");
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes a file at `path` until the filesystem under it is full.
fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0x5a; 64 * 1024];
    loop {
        match f.write_all(&chunk).and_then(|()| f.sync_data()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(28) => return,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
}

/// `updraft-agent result ID`: its exit code and stderr.
fn result_cmd(socket: &Path, id: &str) -> (i32, String) {
    let out = Command::new(bin("updraft-agent"))
        .arg("--socket")
        .arg(socket)
        .args(["result", id])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Stops the agent as systemd would and starts it again on the same files.
fn restart(agent: Proc, dir: &Path, extra: &str) -> (Proc, PathBuf) {
    let mut agent = agent;
    agent.signal(Signal::SIGTERM);
    agent.wait_exit(WAIT);
    serving_agent(dir, extra)
}

/// Asserts that task `id` failed with `storage_full` and was started once.
fn assert_storage_full(socket: &Path, id: &str) {
    let r = http(socket, "GET", &format!("/v1/tasks/{id}?wait=true"), b"").unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let state = r.json();
    assert_eq!(state["state"], "failed", "{state}");
    assert_eq!(state["error"]["code"], "storage_full", "{state}");
    let message = state["error"]["message"].as_str().unwrap();
    assert!(message.contains("full"), "{message}");
    assert_eq!(state["attempts"], 1, "{state}");
    let (code, stderr) = result_cmd(socket, id);
    assert_ne!(code, 0, "{stderr}");
    assert!(stderr.contains("[storage_full]"), "{stderr}");
}

/// Output kept in memory (`spool_memory`), so the journal is where the disk runs out.
const BIG_OUTPUT: &str = r#"spool_memory = "64MiB"
[journal]
max_bytes = "1GiB"
[tasks.big]
command = ["head", "-c", "8000000", "/dev/zero"]
max_output = "64MiB"
"#;

#[test]
fn a_result_the_disk_cannot_hold_ends_as_storage_full() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    let Some(_tmpfs) = Tmpfs::mount(&dir.path().join("astate"), "2m") else {
        return;
    };
    let (agent, socket) = serving_agent(dir.path(), BIG_OUTPUT);
    let id = detach(&socket, "big?where=local", b"");
    assert_storage_full(&socket, &id);
    assert!(agent.log().contains("storage_full"), "{}", agent.log());

    // Stored as failed: a restart neither runs it again nor forgets why.
    let (_agent, socket) = restart(agent, dir.path(), BIG_OUTPUT);
    assert_storage_full(&socket, &id);
}

#[test]
fn a_failure_the_disk_cannot_hold_is_shown_from_memory_and_written_later() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    let gate = dir.path().join("gate");
    let extra = format!(
        "{BIG_OUTPUT}[tasks.gated]\ncommand = [\"sh\", \"-c\", \"while [ ! -e {} ]; do sleep 0.05; done; head -c 100000 /dev/zero\"]\n",
        gate.display()
    );
    let state_dir = dir.path().join("astate");
    let Some(_tmpfs) = Tmpfs::mount(&state_dir, "1m") else {
        return;
    };
    let (agent, socket) = serving_agent(dir.path(), &extra);
    let id = detach(&socket, "gated?where=local", b"");
    wait_for("the task to start", WAIT, || {
        (task_state(&socket, &id)["state"] == "running").then_some(())
    });
    let filler = state_dir.join("filler");
    fill(&filler);
    std::fs::write(&gate, b"").unwrap();

    // Nothing could be written, not even the failure: it is shown from memory, and
    // waiters are answered.
    assert_storage_full(&socket, &id);
    assert!(agent.log().contains("kept in memory"), "{}", agent.log());

    // With room again, the failure is written, and survives a restart.
    std::fs::remove_file(&filler).unwrap();
    wait_for("the failure to be written", WAIT, || {
        agent
            .log()
            .contains("now written to the journal")
            .then_some(())
    });
    let (_agent, socket) = restart(agent, dir.path(), &extra);
    assert_storage_full(&socket, &id);
}

#[test]
fn delete_frees_a_finished_task_and_result_delete_prints_it_first() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    let (_agent, socket) = serving_agent(dir.path(), "");
    let id = detach(&socket, "echo?where=local", b"first result");
    let r = http(&socket, "GET", &format!("/v1/tasks/{id}?wait=true"), b"").unwrap();
    assert_eq!(r.json()["state"], "done");

    let r = http(&socket, "DELETE", &format!("/v1/tasks/{id}"), b"").unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["deleted"], true);
    for (method, path) in [
        ("GET", format!("/v1/tasks/{id}")),
        ("GET", format!("/v1/tasks/{id}/output")),
        ("DELETE", format!("/v1/tasks/{id}")),
    ] {
        let r = http(&socket, method, &path, b"").unwrap();
        assert_eq!(r.status, 404, "{method} {path} after the delete");
        assert_eq!(r.header("updraft-error-code"), Some("not_found"));
    }

    // An unfinished task is not deleted (nor cancelled): 409, and it stays.
    let queued = detach(&socket, "echo?where=cloud", b"waits for a daemon");
    let r = http(&socket, "DELETE", &format!("/v1/tasks/{queued}"), b"").unwrap();
    assert_eq!(r.status, 409, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("updraft-error-code"), Some("not_ready"));
    let message = r.json()["error"].as_str().unwrap().to_string();
    assert!(message.contains("still queued"), "{message}");
    assert_eq!(task_state(&socket, &queued)["state"], "queued");

    // `result --delete` prints the output, then deletes.
    let id = detach(&socket, "echo?where=local", b"second result");
    let out = Command::new(bin("updraft-agent"))
        .arg("--socket")
        .arg(&socket)
        .args(["result", "--wait", "--delete", &id])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"second result");
    let r = http(&socket, "GET", &format!("/v1/tasks/{id}"), b"").unwrap();
    assert_eq!(r.status, 404);
    let r = http(&socket, "GET", "/v1/status", b"").unwrap();
    assert_eq!(
        r.json()["journal"]["tasks"],
        1,
        "only the queued task is left"
    );

    // Still running: nothing printed, nothing deleted.
    let out = Command::new(bin("updraft-agent"))
        .arg("--socket")
        .arg(&socket)
        .args(["result", "--delete", &queued])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(task_state(&socket, &queued)["state"], "queued");
}
