//! What docs/PROTOCOL.md promises a second implementation, checked on the wire against
//! the real `updraftd` process from a hand-built QUIC client: JSON messages are objects
//! without `null`s, one load report at connect and the next only an interval later,
//! and a draining daemon closes new connections with `CLOSE_DRAINING` at once.

mod common;

use bytes::{BufMut, BytesMut};
use common::*;
use std::path::Path;
use std::time::Duration;
use updraft_proto::{
    ErrorCode, Frame, FrameKind, LoadReport, ReplyHeader, RequestHeader, Trailer, CLOSE_DRAINING,
};
use updraft_shared::wire::FrameReader;

/// Longest any single wait may take before it counts as a hang.
const WAIT: Duration = Duration::from_secs(10);
/// The load report interval of these daemons: far longer than any test step.
const INTERVAL: &str = "20s";

/// Starts `updraftd` in `dir` (certificates made there first) with an `echo` task and a
/// `gated` task that runs until the file `gate` exists.
fn start(dir: &Path) -> (Proc, String) {
    make_pki(dir);
    let gate = dir.join("gate");
    let cfg = dir.join("daemon.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"listen = "127.0.0.1:0"
state_dir = "dstate"
load_report_interval = "{INTERVAL}"
drain_timeout = "30s"
[tls]
ca = "pki/ca.pem"
cert = "pki/server.pem"
key = "pki/server.key"
[tasks.echo]
builtin = "echo"
[tasks.gated]
command = ["sh", "-c", "while [ ! -e {} ]; do sleep 0.05; done"]
timeout = "120s"
"#,
            gate.display()
        ),
    )
    .unwrap();
    serve_daemon(&cfg, "the daemon")
}

/// Client config with the agent certificate `make_pki` issued (`board-1`).
fn agent_config(dir: &Path) -> quinn::ClientConfig {
    let identity = updraft_shared::tls::Identity::load(
        &dir.join("pki/ca.pem"),
        &dir.join("agent/agent.pem"),
        &dir.join("agent/agent.key"),
    )
    .unwrap();
    quinn::ClientConfig::new(identity.quic_client().unwrap())
}

/// Client config for an enrollment connection, pinned to the test CA.
fn enroll_config(dir: &Path) -> quinn::ClientConfig {
    let ca = updraft_shared::tls::load_certs(&dir.join("pki/ca.pem")).unwrap();
    let pin = updraft_shared::tls::PinnedCa::new(&updraft_shared::tls::fingerprint(&ca[0]));
    quinn::ClientConfig::new(pin.unwrap().quic_client().unwrap())
}

fn endpoint() -> quinn::Endpoint {
    quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap()
}

async fn connect(ep: &quinn::Endpoint, addr: &str, cfg: quinn::ClientConfig) -> quinn::Connection {
    let connecting = ep
        .connect_with(cfg, addr.parse().unwrap(), "localhost")
        .unwrap();
    tokio::time::timeout(WAIT, connecting)
        .await
        .expect("handshake within the wait")
        .expect("handshake")
}

/// The daemon's load report stream on `conn`.
async fn load_stream(conn: &quinn::Connection) -> FrameReader<quinn::RecvStream> {
    let recv = tokio::time::timeout(WAIT, conn.accept_uni())
        .await
        .expect("the load stream within the wait")
        .unwrap();
    FrameReader::new(recv)
}

/// The next frame on `reader`, within the wait.
async fn next_frame(reader: &mut FrameReader<quinn::RecvStream>) -> Option<Frame> {
    tokio::time::timeout(WAIT, reader.next())
        .await
        .expect("a frame or the end of the stream within the wait")
        .expect("well-formed frames")
}

/// Opens a task stream, writes a frame of `kind` with `payload` and `input`, finishes
/// it, and returns the stream's reader.
async fn send_task(
    conn: &quinn::Connection,
    kind: FrameKind,
    payload: &[u8],
    input: &[u8],
) -> FrameReader<quinn::RecvStream> {
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let mut buf = BytesMut::new();
    Frame::new(kind, payload.to_vec()).encode(&mut buf);
    buf.put_slice(input);
    send.write_all(&buf).await.unwrap();
    send.finish().unwrap();
    FrameReader::new(recv)
}

/// The daemon's reply to a request whose header is `json`.
async fn reply_to(conn: &quinn::Connection, json: &str) -> ReplyHeader {
    let mut reader = send_task(conn, FrameKind::Request, json.as_bytes(), b"").await;
    let frame = next_frame(&mut reader).await.expect("a reply frame");
    ReplyHeader::from_frame(&frame).unwrap()
}

fn assert_bad_request(reply: ReplyHeader, says: &str) {
    match reply {
        ReplyHeader::Rejected { code, message } => {
            assert_eq!(code, ErrorCode::BadRequest, "{message}");
            assert!(message.contains(says), "{message}");
        }
        ReplyHeader::Accepted => panic!("accepted; expected bad_request saying {says}"),
    }
}

/// Runs `echo` on `input` to its trailer; returns the output.
async fn echo(conn: &quinn::Connection, id: &str, input: &[u8]) -> Vec<u8> {
    let header = RequestHeader {
        id: id.into(),
        task: "echo".into(),
        args: vec![],
        input_len: Some(input.len() as u64),
    };
    let payload = header.to_frame().payload;
    let mut reader = send_task(conn, FrameKind::Request, &payload, input).await;
    let reply = next_frame(&mut reader).await.expect("a reply");
    assert_eq!(
        ReplyHeader::from_frame(&reply).unwrap(),
        ReplyHeader::Accepted
    );
    let mut output = Vec::new();
    loop {
        let frame = next_frame(&mut reader).await.expect("data or a trailer");
        match frame.kind {
            FrameKind::Data => output.extend_from_slice(&frame.payload),
            _ => {
                let trailer = Trailer::from_frame(&frame).unwrap();
                assert_eq!(trailer.exit_code, Some(0), "{trailer:?}");
                return output;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_messages_are_objects_without_nulls() {
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, addr) = start(dir.path());
    let ep = endpoint();
    let conn = connect(&ep, &addr, agent_config(dir.path())).await;

    // serde would read this array field by field as {"id":"abc","task":"echo"}.
    let reply = reply_to(&conn, r#"["abc","echo"]"#).await;
    assert_bad_request(reply, "must be a JSON object");
    // `null` is refused for an optional field as for any other.
    let reply = reply_to(&conn, r#"{"id":"n1","task":"echo","input_len":null}"#).await;
    assert_bad_request(reply, "field `input_len` is null");
    let reply = reply_to(&conn, r#"{"id":"n2","task":"echo","args":null}"#).await;
    assert_bad_request(reply, "field `args` is null");
    // The task-name rule: not a catalog lookup, a malformed request.
    let reply = reply_to(&conn, r#"{"id":"n3","task":"Echo"}"#).await;
    assert_bad_request(reply, "task name must be 1..=64 characters");

    // A stream finished without a byte gets no frame back, only the end of the stream.
    let (mut send, recv) = conn.open_bi().await.unwrap();
    send.finish().unwrap();
    let mut bare = FrameReader::new(recv);
    assert!(next_frame(&mut bare).await.is_none());

    // The well-formed request still runs.
    assert_eq!(echo(&conn, "ok-1", b"hello").await, b"hello");
    ep.close(0u32.into(), b"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_stream_answers_a_report_with_hello_and_drops_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, addr) = start(dir.path());
    let ep = endpoint();
    let conn = connect(&ep, &addr, agent_config(dir.path())).await;

    // A report written by hand, as PROTOCOL.md gives it, with a field from the future.
    let report = r#"{"version":"9.9.9 (commit spec)","policy":{"hash":"","source":"default"},"mix":{"local":1},"later":true}"#;
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let mut buf = BytesMut::new();
    Frame::new(FrameKind::AgentReport, report.as_bytes().to_vec()).encode(&mut buf);
    send.write_all(&buf).await.unwrap();
    let mut reader = FrameReader::new(recv);
    let hello = next_frame(&mut reader).await.expect("a hello");
    assert_eq!(hello.kind, FrameKind::FleetNotice);
    let hello: serde_json::Value = serde_json::from_slice(&hello.payload).unwrap();
    assert_eq!(hello["type"], "hello", "{hello}");
    assert_eq!(
        hello["tasks"],
        serde_json::json!(["echo", "gated"]),
        "{hello}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let skew = hello["time_unix_ms"].as_i64().unwrap() - now;
    assert!(skew.abs() < 10_000, "the daemon's clock: {hello}");
    // A later report on the same stream is read without an answer.
    let mut buf = BytesMut::new();
    Frame::new(FrameKind::AgentReport, report.as_bytes().to_vec()).encode(&mut buf);
    send.write_all(&buf).await.unwrap();

    // A report that breaks a rule ends its stream; the connection carries on.
    let bad = r#"{"version":"","policy":{"hash":"","source":"default"}}"#;
    let (mut send2, recv2) = conn.open_bi().await.unwrap();
    let mut buf = BytesMut::new();
    Frame::new(FrameKind::AgentReport, bad.as_bytes().to_vec()).encode(&mut buf);
    send2.write_all(&buf).await.unwrap();
    let mut reader2 = FrameReader::new(recv2);
    let end = tokio::time::timeout(WAIT, reader2.next()).await.unwrap();
    assert!(
        end.is_err(),
        "the daemon resets the stream of a bad report: {end:?}"
    );
    assert_eq!(
        echo(&conn, "after-report", b"still here").await,
        b"still here"
    );
    ep.close(0u32.into(), b"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_load_report_at_connect_and_the_next_only_an_interval_later() {
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, addr) = start(dir.path());
    let ep = endpoint();
    let conn = connect(&ep, &addr, agent_config(dir.path())).await;
    let mut loads = load_stream(&conn).await;
    let first = next_frame(&mut loads).await.expect("a load report");
    let first = LoadReport::from_frame(&first).unwrap();
    assert_eq!((first.running, first.draining), (0, false), "{first:?}");

    // A whole task's round trip after the first report: a second report sent with the
    // first would be here by now.
    assert_eq!(echo(&conn, "t1", b"ping").await, b"ping");
    let second = tokio::time::timeout(Duration::from_secs(1), loads.next()).await;
    assert!(
        second.is_err(),
        "a second load report arrived long before the {INTERVAL} interval: {second:?}"
    );
    ep.close(0u32.into(), b"");
}

/// How a connection attempt ended: the application close code the daemon sent.
async fn close_code(ep: &quinn::Endpoint, addr: &str, cfg: quinn::ClientConfig) -> u64 {
    let attempt = async {
        let connecting = ep
            .connect_with(cfg, addr.parse().unwrap(), "localhost")
            .unwrap();
        match connecting.await {
            Ok(conn) => conn.closed().await,
            Err(e) => e,
        }
    };
    match tokio::time::timeout(WAIT, attempt).await {
        Ok(quinn::ConnectionError::ApplicationClosed(close)) => close.error_code.into_inner(),
        Ok(other) => panic!("connection ended without an application close: {other}"),
        Err(_) => panic!("no answer to a new connection within {WAIT:?} while draining"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_daemon_closes_new_connections_with_close_draining() {
    let dir = tempfile::tempdir().unwrap();
    let (mut daemon, addr) = start(dir.path());
    let ep = endpoint();
    let conn = connect(&ep, &addr, agent_config(dir.path())).await;
    let mut loads = load_stream(&conn).await;

    // A task in flight keeps the drain open until the test opens the gate.
    let gated = RequestHeader {
        id: "g1".into(),
        task: "gated".into(),
        args: vec![],
        input_len: Some(0),
    };
    let mut task = send_task(&conn, FrameKind::Request, &gated.to_frame().payload, b"").await;
    let reply = next_frame(&mut task).await.expect("a reply");
    assert_eq!(
        ReplyHeader::from_frame(&reply).unwrap(),
        ReplyHeader::Accepted
    );

    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    // The connected agent hears at once, not at the next interval.
    loop {
        let frame = next_frame(&mut loads).await.expect("load reports go on");
        if LoadReport::from_frame(&frame).unwrap().draining {
            break;
        }
    }
    // New connections, for tasks and for enrollment alike, are told to go elsewhere.
    let code = close_code(&ep, &addr, agent_config(dir.path())).await;
    assert_eq!(code, u64::from(CLOSE_DRAINING));
    let code = close_code(&ep, &addr, enroll_config(dir.path())).await;
    assert_eq!(code, u64::from(CLOSE_DRAINING));

    // The task in flight still finishes and delivers; then the daemon exits.
    std::fs::write(dir.path().join("gate"), b"").unwrap();
    let trailer = next_frame(&mut task).await.expect("the trailer");
    assert_eq!(Trailer::from_frame(&trailer).unwrap().exit_code, Some(0));
    let status = daemon.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status}");
}

/// How an open connection ends: the application close code and reason, within `within`.
async fn closed_with(conn: &quinn::Connection, within: Duration) -> (u64, String) {
    match tokio::time::timeout(within, conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(close)) => (
            close.error_code.into_inner(),
            String::from_utf8_lossy(&close.reason).into_owned(),
        ),
        Ok(other) => panic!("connection ended without an application close: {other}"),
        Err(_) => panic!("the daemon did not close the connection within {within:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrollment_connection_is_answered_then_closed_on_the_documented_clock() {
    use updraft_proto::{CertReply, CLOSE_OK, CLOSE_PROTOCOL};
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, addr) = start(dir.path());
    let ep = endpoint();
    // Each step is 10 s; allow for a slow machine, but not for a connection left open.
    let step = Duration::from_secs(25);

    let idle = connect(&ep, &addr, enroll_config(dir.path())).await;
    let asked = connect(&ep, &addr, enroll_config(dir.path())).await;
    // A CertRequest's fields as an array: refused like any non-object.
    let mut reader = send_task(&asked, FrameKind::CertRequest, br#"["00","x"]"#, b"").await;
    let reply = next_frame(&mut reader).await.expect("a certificate reply");
    match CertReply::from_frame(&reply).unwrap() {
        CertReply::Rejected { code, message } => {
            assert_eq!(code, ErrorCode::BadRequest, "{message}");
            assert!(message.contains("must be a JSON object"), "{message}");
        }
        issued => panic!("an array was taken as a certificate request: {issued:?}"),
    }
    // Neither client closes: the daemon does, each with its code.
    let (idle_close, answered_close) =
        tokio::join!(closed_with(&idle, step), closed_with(&asked, step));
    assert_eq!(
        idle_close,
        (u64::from(CLOSE_PROTOCOL), "no enrollment request".into())
    );
    assert_eq!(
        answered_close,
        (u64::from(CLOSE_OK), "enrollment answered".into())
    );
    ep.close(0u32.into(), b"");
}
