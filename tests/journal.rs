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
use std::path::{Path, PathBuf};
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

fn json(r: &HttpReply) -> Value {
    serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&r.body)))
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
    json(&r)["id"].as_str().unwrap().to_string()
}

fn task_state(socket: &Path, id: &str) -> Value {
    let r = http(socket, "GET", &format!("/v1/tasks/{id}"), b"").unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    json(&r)
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
