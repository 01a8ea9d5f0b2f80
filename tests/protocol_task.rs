//! The task exchange at the wire, against the real `updraftd` process from a
//! hand-built QUIC client with real agent certificates: a held input is received
//! before the task takes a slot and shows in load reports as `uploading`, bounded per
//! agent; `timings` tell upload from queueing; `max_input` holds for every byte; a
//! reset upload gets its `internal` trailer; and a synchronous offload cancelled by its
//! submitter frees its daemon slot and kills its run.

mod common;

use common::wire::*;
use common::*;
use std::io::Write;
use std::time::{Duration, Instant};
use updraft_proto::{
    ErrorCode, LoadReport, ReplyHeader, RESET_ABANDONED, STOP_CANCELLED, STOP_INPUT,
};
use updraft_shared::wire::FrameReader;

/// Longest any single wait in these tests may take before it counts as a hang.
const WAIT: Duration = Duration::from_secs(30);

/// Reads load reports until one satisfies `want`.
async fn wait_load(
    loads: &mut FrameReader<quinn::RecvStream>,
    what: &str,
    want: impl Fn(&LoadReport) -> bool,
) -> LoadReport {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = tokio::time::timeout(left, loads.next())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for a load report with {what}"))
            .expect("reading the load stream")
            .expect("the load stream stays open");
        let load = LoadReport::from_frame(&frame).unwrap();
        if want(&load) {
            return load;
        }
    }
}

/// A task whose input is still arriving holds no slot: with one slot, another task
/// runs meanwhile, the load report counts the upload, and the uploaded task's
/// `queue_us` is its wait for the slot alone while `input_us` covers the upload.
#[tokio::test]
async fn held_upload_holds_no_slot_and_is_timed_apart() {
    let d = Daemon::start("max_concurrent_tasks = 1\nmax_queued_tasks = 0\n");
    let conn = d.connect("board-1").await;
    let mut loads = FrameReader::new(conn.accept_uni().await.unwrap());

    let (mut send, mut slow) = open_task(&conn, "slow-upload", "echo", None, b"first half, ").await;
    assert_eq!(read_reply(&mut slow, WAIT).await, ReplyHeader::Accepted);
    let upload_began = Instant::now();
    let load = wait_load(&mut loads, "one upload", |l| l.uploading == 1).await;
    assert_eq!((load.running, load.queued, load.capacity), (0, 0, 1));

    // The one slot is free for a task whose input is here.
    let (mut quick_send, mut quick) = open_task(&conn, "quick", "echo", None, b"hi").await;
    quick_send.finish().unwrap();
    assert_eq!(read_reply(&mut quick, WAIT).await, ReplyHeader::Accepted);
    let (out, trailer) = read_result(&mut quick, WAIT).await;
    assert_eq!((out.as_slice(), trailer.exit_code), (&b"hi"[..], Some(0)));
    let uploading_for = upload_began.elapsed();

    send.write_all(b"second half").await.unwrap();
    send.finish().unwrap();
    let (out, trailer) = read_result(&mut slow, WAIT).await;
    assert_eq!(out, b"first half, second half");
    assert_eq!(trailer.exit_code, Some(0));
    // The upload lasted at least as long as the other task's whole run...
    assert!(
        trailer.timings.input_us >= uploading_for.as_micros() as u64,
        "input_us {} < {uploading_for:?} of upload",
        trailer.timings.input_us
    );
    // ...and is not counted as waiting for a slot (the slot was free by then).
    assert!(
        trailer.timings.queue_us < uploading_for.as_micros() as u64,
        "queue_us {} counts the upload of {uploading_for:?}",
        trailer.timings.queue_us
    );
    wait_load(&mut loads, "nothing uploading", |l| l.uploading == 0).await;
}

/// One agent may have only `max_uploads_per_agent` held inputs arriving at once;
/// another agent is not held back by it.
#[tokio::test]
async fn uploads_per_agent_are_bounded() {
    let d = Daemon::start("max_uploads_per_agent = 2\n");
    let conn = d.connect("board-1").await;
    let mut open = Vec::new();
    for id in ["u1", "u2"] {
        let (send, mut reader) = open_task(&conn, id, "echo", None, b"part").await;
        assert_eq!(read_reply(&mut reader, WAIT).await, ReplyHeader::Accepted);
        open.push((send, reader));
    }
    let (_third_send, mut third) = open_task(&conn, "u3", "echo", None, b"part").await;
    match read_reply(&mut third, WAIT).await {
        ReplyHeader::Rejected { code, message } => {
            assert_eq!(code, ErrorCode::Busy);
            assert!(message.contains("max_uploads_per_agent"), "{message}");
            assert!(message.contains("board-1"), "{message}");
        }
        other => panic!("expected busy, got {other:?}"),
    }
    // Another agent, even on its own connection, has its own bound.
    let other = d.connect("board-2").await;
    let (mut s, mut r) = open_task(&other, "v1", "echo", None, b"x").await;
    s.finish().unwrap();
    assert_eq!(read_reply(&mut r, WAIT).await, ReplyHeader::Accepted);
    assert_eq!(read_result(&mut r, WAIT).await.0, b"x");
    // A finished upload makes room again.
    let (mut send, mut reader) = open.remove(0);
    send.finish().unwrap();
    assert_eq!(read_result(&mut reader, WAIT).await.0, b"part");
    let (mut s, mut r) = open_task(&conn, "u4", "echo", None, b"y").await;
    s.finish().unwrap();
    assert_eq!(read_reply(&mut r, WAIT).await, ReplyHeader::Accepted);
    assert_eq!(read_result(&mut r, WAIT).await.0, b"y");
}

/// `accepted` may travel with a task's first output or its trailer (a task that ends at
/// once is answered in one packet), but never waits for them: a task that writes
/// nothing, and a task queued behind it, are both accepted while the first still runs.
#[tokio::test]
async fn silent_and_queued_tasks_are_accepted_before_they_end() {
    let dir = tempfile::tempdir().unwrap();
    let gate = dir.path().join("gate");
    let d = Daemon::start(&format!(
        "max_concurrent_tasks = 1\nmax_queued_tasks = 1\n[tasks.silent]\ncommand = [\"sh\", \"-c\", \"while [ ! -e {} ]; do sleep 0.01; done\"]\n",
        gate.display()
    ));
    let conn = d.connect("board-1").await;
    let mut readers = Vec::new();
    for id in ["silent-1", "silent-2"] {
        let (mut send, mut reader) = open_task(&conn, id, "silent", Some(0), b"").await;
        send.finish().unwrap();
        assert_eq!(
            read_reply(&mut reader, WAIT).await,
            ReplyHeader::Accepted,
            "{id}"
        );
        readers.push(reader);
    }
    // Only now can either task end.
    std::fs::write(&gate, b"").unwrap();
    for mut reader in readers {
        let (out, trailer) = read_result(&mut reader, WAIT).await;
        assert!(out.is_empty());
        assert_eq!(trailer.exit_code, Some(0), "{trailer:?}");
    }
}

/// `max_input` holds for the held part too: a 1 KiB task sent 100 KiB without
/// `input_len` (and no end of input) is refused `too_large` as soon as 1 KiB is over,
/// not after `hold_input` or the end of the upload.
#[tokio::test]
async fn max_input_counts_every_held_byte() {
    let d = Daemon::start("");
    let conn = d.connect("board-1").await;
    let (send, mut reader) = open_task(&conn, "big", "small", None, &noise(100 * 1024, 7)).await;
    assert_eq!(read_reply(&mut reader, WAIT).await, ReplyHeader::Accepted);
    // The input is never finished: only the limit can end this.
    let (out, trailer) = read_result(&mut reader, Duration::from_secs(10)).await;
    assert!(out.is_empty());
    assert_eq!(trailer.error, Some(ErrorCode::TooLarge), "{trailer:?}");
    assert!(trailer.message.contains("1024"), "{trailer:?}");
    let stopped = tokio::time::timeout(WAIT, send.stopped())
        .await
        .expect("the daemon stops the input");
    assert_eq!(stopped.unwrap(), Some(STOP_INPUT.into()));
}

/// An input reset before it was whole: the task does not run and the stream, already
/// accepted, ends with an `internal` trailer.
#[tokio::test]
async fn reset_during_held_upload_gets_internal_trailer() {
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let d = Daemon::start(&format!(
        "[tasks.counted]\ncommand = [\"sh\", \"-c\", \"echo run >> {}; cat\"]\n",
        runs.display()
    ));
    let conn = d.connect("board-1").await;
    let (mut send, mut reader) =
        open_task(&conn, "cut", "counted", None, b"a small input, cut").await;
    assert_eq!(read_reply(&mut reader, WAIT).await, ReplyHeader::Accepted);
    send.reset(RESET_ABANDONED.into()).unwrap();
    let (out, trailer) = read_result(&mut reader, WAIT).await;
    assert!(out.is_empty());
    assert_eq!(trailer.error, Some(ErrorCode::Internal), "{trailer:?}");
    assert!(trailer.message.contains("reset"), "{trailer:?}");
    assert!(!runs.exists(), "the task ran on a cut-off input");
    // Not remembered: the retry runs on its whole input.
    let (mut send, mut reader) = open_task(&conn, "cut", "counted", None, b"whole").await;
    send.finish().unwrap();
    assert_eq!(read_reply(&mut reader, WAIT).await, ReplyHeader::Accepted);
    let (out, trailer) = read_result(&mut reader, WAIT).await;
    assert_eq!(
        (out.as_slice(), trailer.exit_code),
        (&b"whole"[..], Some(0))
    );
}

/// `STOP_CANCELLED` kills a run no one else waits for, but spares one a retry of the
/// same id has joined: that retry gets the run's result, and the task ran once.
// Multi-threaded: the blocking waits below must not stall the QUIC driver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_spares_a_run_a_retry_waits_for() {
    let dir = tempfile::tempdir().unwrap();
    let (runs, gate) = (dir.path().join("runs"), dir.path().join("gate"));
    let d = Daemon::start(&format!(
        "[tasks.gated]\ncommand = [\"sh\", \"-c\", \"cat > input; echo run >> {}; while [ ! -e {} ]; do sleep 0.01; done; cat input\"]\ntimeout = \"60s\"\n",
        runs.display(),
        gate.display()
    ));
    let count = || {
        std::fs::read_to_string(&runs)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    let conn = d.connect("board-1").await;

    // Alone: cancelled, killed.
    let (mut send, mut alone) = open_task(&conn, "alone", "gated", None, b"x").await;
    send.finish().unwrap();
    assert_eq!(read_reply(&mut alone, WAIT).await, ReplyHeader::Accepted);
    wait_for("the first run", WAIT, || (count() == 1).then_some(()));
    alone.get_mut().stop(STOP_CANCELLED.into()).unwrap();
    wait_for("the daemon to kill the cancelled run", WAIT, || {
        let log = d.daemon.log();
        (log.contains("submitter cancelled it") && log.contains("the run was killed")).then_some(())
    });

    // Joined: the retry keeps it going.
    let (mut send, mut first) = open_task(&conn, "joined", "gated", None, b"kept").await;
    send.finish().unwrap();
    assert_eq!(read_reply(&mut first, WAIT).await, ReplyHeader::Accepted);
    wait_for("the second run", WAIT, || (count() == 2).then_some(()));
    let (mut send, mut retry) = open_task(&conn, "joined", "gated", None, b"kept").await;
    let _ = send.finish();
    assert_eq!(read_reply(&mut retry, WAIT).await, ReplyHeader::Accepted);
    wait_for("the retry to join the run", WAIT, || {
        d.daemon
            .log()
            .contains("retried while its first run is in progress")
            .then_some(())
    });
    first.get_mut().stop(STOP_CANCELLED.into()).unwrap();
    std::fs::write(&gate, b"").unwrap();
    let (out, trailer) = read_result(&mut retry, WAIT).await;
    assert_eq!((out.as_slice(), trailer.exit_code), (&b"kept"[..], Some(0)));
    assert_eq!(count(), 2, "the joined run was run again");
}

/// True once `pid` has exited (gone, or a zombie not yet reaped).
fn exited(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z"),
    }
}

/// A synchronous cloud task whose HTTP client goes away is cancelled on the daemon:
/// its one slot frees long before the task's timeout, its process is killed, and the
/// next task runs instead of being refused `busy`.
#[test]
fn cancelled_offload_frees_the_daemon_slot() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("long.pid");
    let long = format!(
        "[tasks.long]\ncommand = [\"sh\", \"-c\", \"echo $$ > {}; exec sleep 300\"]\ntimeout = \"300s\"\n",
        pidfile.display()
    );
    let c = Cluster::start_in(
        dir,
        &format!("max_concurrent_tasks = 1\nmax_queued_tasks = 0\n{long}"),
        &format!("[link]\naccept_timeout = \"1s\"\n{long}"),
    );
    let mut client = std::os::unix::net::UnixStream::connect(&c.socket).unwrap();
    write!(
        client,
        "POST /v1/tasks/long?where=cloud HTTP/1.1\r\nHost: agent\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let pid: i32 = wait_for("the task to start on the daemon", WAIT, || {
        std::fs::read_to_string(&pidfile).ok()?.trim().parse().ok()
    });
    assert!(!exited(pid));
    wait_for("the daemon to report the task running", WAIT, || {
        let s = c.status().ok()?;
        (s["clouds"][0]["load"]["running"] == 1).then_some(())
    });
    drop(client);
    // The task would run for 300 s; the wait is a tenth of that.
    wait_for("the daemon's slot to free", WAIT, || {
        let s = c.status().ok()?;
        (s["clouds"][0]["load"]["running"] == 0).then_some(())
    });
    wait_for("the task's process to be killed", WAIT, || {
        exited(pid).then_some(())
    });
    let r = http(&c.socket, "POST", "/v1/tasks/echo?where=cloud", b"next").unwrap();
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, &b"next"[..]),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert!(
        c.daemon.log().contains("submitter cancelled it"),
        "{}",
        c.daemon.log()
    );
}
