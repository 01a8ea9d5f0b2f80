//! The link probe against the real `updraftd` process: the agent's `probe()` gets the
//! byte counts it asked for, timed, without taking a task slot; an over-cap probe is refused before any payload is
//! read; each connection's probes stay within the daemon's `probe_budget`; and what a
//! daemon that does not know probes answers, which the agent reads as "unsupported".

mod common;

use bytes::{BufMut, BytesMut};
use common::wire::*;
use common::*;
use std::time::Duration;
use updraft_agent::{probe, ProbeError};
use updraft_proto::{
    ErrorCode, Frame, FrameKind, LoadReport, ProbeReply, ProbeRequest, ReplyHeader,
    MAX_PROBE_BYTES, STOP_INPUT,
};
use updraft_shared::wire::FrameReader;

/// Longest any single wait in these tests may take before it counts as a hang.
const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_probe_moves_the_bytes_asked_for_each_way_and_times_them() {
    let d = Daemon::start("");
    let conn = d.connect("board-1").await;
    let sample = probe(&conn, 256 << 10, 512 << 10).await.unwrap();
    assert_eq!(sample.up.bytes, 256 << 10);
    assert_eq!(sample.down.bytes, 512 << 10);
    for (dir, t) in [("up", sample.up), ("down", sample.down)] {
        // 256 KiB cannot arrive in one read of at most 64 KiB: there is time to measure.
        assert!(t.secs > 0.0, "{dir}: {t:?}");
        assert!(t.tail_bytes > 0 && t.tail_bytes < t.bytes, "{dir}: {t:?}");
        assert!(t.tail_secs > 0.0 && t.tail_secs <= t.secs, "{dir}: {t:?}");
        assert!(t.bytes_per_sec().is_some_and(|r| r > 0.0), "{dir}: {t:?}");
    }
    assert!(sample.elapsed.as_secs_f64() >= sample.down.secs);
    // One direction may be empty.
    let sample = probe(&conn, 0, 64 << 10).await.unwrap();
    assert_eq!((sample.up.bytes, sample.down.bytes), (0, 64 << 10));
    assert_eq!(sample.up.bytes_per_sec(), None);
    // The connection still carries tasks.
    let (mut send, mut reader) = open_task(&conn, "after-probe", "echo", None, b"hi").await;
    send.finish().unwrap();
    assert_eq!(read_reply(&mut reader, WAIT).await, ReplyHeader::Accepted);
    let (out, trailer) = read_result(&mut reader, WAIT).await;
    assert_eq!((out.as_slice(), trailer.exit_code), (&b"hi"[..], Some(0)));
}

/// A probe takes no task slot: with the daemon's one slot held by a running task (and
/// no queue), a probe is still measured while another task is refused `busy`.
#[tokio::test]
async fn a_probe_takes_no_task_slot() {
    let d =
        Daemon::start("max_concurrent_tasks = 1\nmax_queued_tasks = 0\n[dedup]\nhold_input = 0\n");
    let conn = d.connect("board-1").await;
    let mut loads = FrameReader::new(conn.accept_uni().await.unwrap());
    // Its input streams into the running task and stays open: the slot stays taken.
    let (mut send, mut running) = open_task(&conn, "holds-the-slot", "sha", None, b"x").await;
    assert_eq!(read_reply(&mut running, WAIT).await, ReplyHeader::Accepted);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let frame = tokio::time::timeout_at(deadline, loads.next())
            .await
            .expect("a load report with the slot taken")
            .unwrap()
            .unwrap();
        if LoadReport::from_frame(&frame).unwrap().running == 1 {
            break;
        }
    }
    let (mut other, mut refused) = open_task(&conn, "no-slot", "echo", None, b"").await;
    other.finish().unwrap();
    assert!(matches!(
        read_reply(&mut refused, WAIT).await,
        ReplyHeader::Rejected {
            code: ErrorCode::Busy,
            ..
        }
    ));
    let sample = probe(&conn, 64 << 10, 64 << 10).await.unwrap();
    assert_eq!((sample.up.bytes, sample.down.bytes), (64 << 10, 64 << 10));
    send.finish().unwrap();
    let (_, trailer) = read_result(&mut running, WAIT).await;
    assert_eq!(trailer.exit_code, Some(0));
}

/// A Probe frame asking for more than 1 MiB is answered `bad_request` at once: the
/// daemon neither waits for the payload nor reads it (it stops the agent's direction).
#[tokio::test]
async fn an_over_cap_probe_is_refused_before_its_payload() {
    let d = Daemon::start("");
    let conn = d.connect("board-1").await;
    for (up, down) in [(MAX_PROBE_BYTES + 1, 0), (1024, MAX_PROBE_BYTES + 1)] {
        let (mut send, recv) = conn.open_bi().await.unwrap();
        let mut buf = BytesMut::new();
        ProbeRequest { up, down }.to_frame().encode(&mut buf);
        send.write_all(&buf).await.unwrap();
        // No payload, no FIN: the answer comes anyway.
        let mut reader = FrameReader::new(recv);
        let frame = next_frame(&mut reader, WAIT).await;
        match ProbeReply::from_frame(&frame).unwrap() {
            ProbeReply::Rejected { code, message } => {
                assert_eq!(code, ErrorCode::BadRequest, "{message}");
                assert!(message.contains("over the limit of 1048576"), "{message}");
            }
            other => panic!("an over-cap probe was measured: {other:?}"),
        }
        // More than the stream's flow-control window cannot be sent: the daemon
        // stopped reading rather than draining it.
        let payload = vec![0u8; 4 << 20];
        let written = tokio::time::timeout(WAIT, send.write_all(&payload))
            .await
            .expect("the daemon stops the payload instead of leaving it blocked");
        assert_eq!(
            written.unwrap_err(),
            quinn::WriteError::Stopped(STOP_INPUT.into())
        );
        let end = tokio::time::timeout(WAIT, reader.next()).await.unwrap();
        assert!(matches!(end, Ok(None)), "FIN after the reply: {end:?}");
    }
    // The agent's function refuses to send such a probe at all.
    let err = probe(&conn, MAX_PROBE_BYTES + 1, 0).await.unwrap_err();
    assert!(
        matches!(err, ProbeError::Failed(ref m) if m.contains("over the limit")),
        "{err}"
    );
}

/// Each connection may move `probe_budget` probe bytes an hour; a probe past it gets
/// `busy` and moves nothing, and another connection has its own budget.
#[tokio::test]
async fn probes_past_the_connection_budget_are_busy() {
    let d = Daemon::start("probe_budget = \"768KiB\"\n");
    let conn = d.connect("board-1").await;
    probe(&conn, 256 << 10, 256 << 10).await.unwrap();
    match probe(&conn, 256 << 10, 256 << 10).await {
        Err(ProbeError::Refused { code, message }) => {
            assert_eq!(code, ErrorCode::Busy, "{message}");
            assert!(message.contains("probe_budget"), "{message}");
        }
        other => panic!("a probe past the budget was not refused busy: {other:?}"),
    }
    // What is left still serves a smaller probe.
    probe(&conn, 64 << 10, 64 << 10).await.unwrap();
    let other = d.connect("board-1").await;
    probe(&other, 256 << 10, 256 << 10).await.unwrap();
}

/// A daemon that does not know probes treats the Probe frame like any unknown first
/// frame: a task Reply `bad_request`. The daemon answers an unknown kind that way; the
/// agent reads such a Reply to a probe as `Unsupported`.
#[tokio::test]
async fn an_unknown_first_frame_gets_a_task_reply() {
    let d = Daemon::start("");
    let conn = d.connect("board-1").await;
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let mut buf = BytesMut::new();
    buf.put_u8(42);
    buf.put_u32(2);
    buf.put_slice(b"{}");
    send.write_all(&buf).await.unwrap();
    send.finish().unwrap();
    let mut reader = FrameReader::new(recv);
    let frame: Frame = next_frame(&mut reader, WAIT).await;
    assert_eq!(frame.kind, FrameKind::Reply);
    assert!(matches!(
        ReplyHeader::from_frame(&frame).unwrap(),
        ReplyHeader::Rejected {
            code: ErrorCode::BadRequest,
            ..
        }
    ));
}

/// The agent measures a link nobody has measured with a probe of its own, as soon as it
/// is connected and before any task has moved data; `status` shows the rate each way.
#[test]
fn the_agent_probes_a_new_link_on_its_own() {
    let c = Cluster::start_with("", "[link]\nprobe_bytes = \"128KiB\"\n");
    let link = wait_for("the agent to probe its new link", WAIT, || {
        let status = c.status().ok()?;
        let (_, link) = status["estimates"]["links"].as_object()?.iter().next()?;
        let measured = |d: &str| link[d]["samples"].as_u64().is_some_and(|n| n >= 1);
        (measured("up") && measured("down")).then(|| link.clone())
    });
    for d in ["up", "down"] {
        assert!(link[d]["mbps"].as_f64().unwrap() > 0.0, "{link:#}");
    }
    let status = c.status().unwrap();
    assert!(
        status["signals"]["bandwidth_mbps"].as_f64().unwrap() > 0.0,
        "{status:#}"
    );
}
