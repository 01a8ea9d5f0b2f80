//! Retries with the same task id against the real `updraftd` process, from a
//! hand-built QUIC client with real agent certificates: the daemon answers a retry
//! with the first result (kept, or joined while running, or finished after the first
//! connection died) instead of running the task twice, keeps agents apart, and runs
//! again when the first output was too big to keep.

mod common;

use common::wire::*;
use common::*;
use std::path::PathBuf;
use std::time::Duration;
use updraft_proto::{ErrorCode, ReplyHeader, Trailer};
use updraft_shared::wire::FrameReader;

/// Longest any single wait in these tests may take before it counts as a hang.
const WAIT: Duration = Duration::from_secs(30);

/// A daemon with two counting tasks whose commands note each run in `runs`:
/// `counted` echoes its input; `gated` reads all its input, notes the run, and writes
/// the input back only once the test creates `gate`.
struct Daemon {
    dir: tempfile::TempDir,
    daemon: Proc,
    addr: String,
    runs: PathBuf,
    gate: PathBuf,
}

impl Daemon {
    fn start(dedup: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        make_pki(dir.path());
        let runs = dir.path().join("runs");
        let gate = dir.path().join("gate");
        let input = dir.path().join("input");
        let (r, g, i) = (runs.display(), gate.display(), input.display());
        let extra = format!(
            r#"[dedup]
{dedup}
[tasks.counted]
command = ["sh", "-c", "echo run >> {r}; cat"]
[tasks.gated]
command = ["sh", "-c", "cat > {i}; echo run >> {r}; while [ ! -e {g} ]; do sleep 0.01; done; cat {i}"]
timeout = "60s"
"#
        );
        let (daemon, addr) = start_daemon(dir.path(), &extra);
        Self {
            dir,
            daemon,
            addr,
            runs,
            gate,
        }
    }

    fn runs(&self) -> usize {
        std::fs::read_to_string(&self.runs)
            .map(|t| t.lines().filter(|l| *l == "run").count())
            .unwrap_or(0)
    }

    fn wait_runs(&self, n: usize) {
        wait_for(&format!("{n} run(s) of the task"), WAIT, || {
            (self.runs() >= n).then_some(())
        });
    }

    fn wait_log(&self, what: &str) {
        wait_for(&format!("the daemon to log `{what}`"), WAIT, || {
            self.daemon.log().contains(what).then_some(())
        });
    }

    fn open_gate(&self) {
        std::fs::write(&self.gate, b"").unwrap();
    }

    /// A client identity for agent `cn`, from the daemon's CA.
    fn agent(&self, cn: &str) -> quinn::ClientConfig {
        client_config(self.dir.path(), cn)
    }

    async fn connect(
        &self,
        endpoint: &quinn::Endpoint,
        cfg: &quinn::ClientConfig,
    ) -> quinn::Connection {
        tokio::time::timeout(
            WAIT,
            endpoint
                .connect_with(cfg.clone(), self.addr.parse().unwrap(), "localhost")
                .unwrap(),
        )
        .await
        .expect("connecting within the wait limit")
        .expect("connecting to the daemon")
    }
}

fn endpoint() -> quinn::Endpoint {
    quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap()
}

/// Opens a task stream and sends the request and the whole input. The daemon may stop
/// the input (a retry answered from memory), so failed writes are expected.
async fn send_task(
    conn: &quinn::Connection,
    id: &str,
    task: &str,
    input: &[u8],
) -> FrameReader<quinn::RecvStream> {
    let (mut send, recv) = conn.open_bi().await.expect("opening a task stream");
    let bytes = request_bytes(id, task, Some(input.len() as u64), input);
    let _ = send.write_all(&bytes).await;
    let _ = send.finish();
    FrameReader::new(recv)
}

/// Runs a task to its end: accepted, its output and trailer.
async fn run_task(
    conn: &quinn::Connection,
    id: &str,
    task: &str,
    input: &[u8],
) -> (Vec<u8>, Trailer) {
    let mut reader = send_task(conn, id, task, input).await;
    assert_eq!(read_reply(&mut reader, WAIT).await, ReplyHeader::Accepted);
    read_result(&mut reader, WAIT).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_id_twice_runs_once_and_both_get_the_result() {
    let d = Daemon::start("");
    let ep = endpoint();
    let conn = d.connect(&ep, &d.agent("board-1")).await;
    let first = run_task(&conn, "a1", "counted", b"hello").await;
    let second = run_task(&conn, "a1", "counted", b"hello").await;
    assert_eq!(first.0, b"hello");
    assert_eq!(first.1.exit_code, Some(0));
    assert_eq!(second, first, "the retry gets the first output and trailer");
    assert_eq!(d.runs(), 1, "the task ran once");
    d.wait_log("task id a1 retried; returning its first result");

    // The same id for another task is refused, not answered with the first result.
    let mut reader = send_task(&conn, "a1", "echo", b"hello").await;
    match read_reply(&mut reader, WAIT).await {
        ReplyHeader::Rejected { code, message } => {
            assert_eq!(code, ErrorCode::BadRequest);
            assert!(message.contains("a1"), "{message}");
        }
        other => panic!("reused id accepted: {other:?}"),
    }
    // A new id runs.
    assert_eq!(run_task(&conn, "a2", "counted", b"x").await.0, b"x");
    assert_eq!(d.runs(), 2);
    ep.close(0u32.into(), b"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_while_running_joins_the_first_run() {
    let d = Daemon::start("");
    let ep = endpoint();
    let conn = d.connect(&ep, &d.agent("board-1")).await;
    let mut first = send_task(&conn, "b1", "gated", b"joined").await;
    assert_eq!(read_reply(&mut first, WAIT).await, ReplyHeader::Accepted);
    d.wait_runs(1);
    // The gate is shut, so the first run is still in progress when this is accepted.
    let mut second = send_task(&conn, "b1", "gated", b"joined").await;
    assert_eq!(read_reply(&mut second, WAIT).await, ReplyHeader::Accepted);
    d.wait_log("task id b1 retried while its first run is in progress");
    d.open_gate();
    let (a, b) = (
        read_result(&mut first, WAIT).await,
        read_result(&mut second, WAIT).await,
    );
    assert_eq!(a.0, b"joined");
    assert_eq!(a.1.exit_code, Some(0));
    assert_eq!(b, a);
    assert_eq!(d.runs(), 1, "the task ran once");
    ep.close(0u32.into(), b"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_on_a_new_connection_collects_the_result_of_a_run_whose_agent_went_away() {
    let d = Daemon::start("");
    let agent = d.agent("board-1");
    let input = noise(200_000, 3);
    let ep = endpoint();
    let conn = d.connect(&ep, &agent).await;
    let mut first = send_task(&conn, "c1", "gated", &input).await;
    assert_eq!(read_reply(&mut first, WAIT).await, ReplyHeader::Accepted);
    // The task notes its run only after reading its whole input.
    d.wait_runs(1);
    conn.close(0u32.into(), b"link lost");
    d.wait_log("agent disconnected");

    // Like a restarted agent: a new endpoint, a new connection, the same certificate.
    let ep2 = endpoint();
    let conn2 = d.connect(&ep2, &agent).await;
    let mut retry = send_task(&conn2, "c1", "gated", &input).await;
    assert_eq!(read_reply(&mut retry, WAIT).await, ReplyHeader::Accepted);
    d.open_gate();
    let (output, trailer) = read_result(&mut retry, WAIT).await;
    assert!(output == input, "the retry gets the whole output");
    assert_eq!(trailer.exit_code, Some(0));
    assert_eq!(trailer.output_bytes, input.len() as u64);
    d.wait_log("the task finished and its result is kept for a retry");
    assert_eq!(d.runs(), 1, "the task ran once");
    ep.close(0u32.into(), b"");
    ep2.close(0u32.into(), b"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_agent_with_the_same_id_runs_its_own_task() {
    let d = Daemon::start("");
    let ep = endpoint();
    let a = d.connect(&ep, &d.agent("board-a")).await;
    let b = d.connect(&ep, &d.agent("board-b")).await;
    assert_eq!(run_task(&a, "d1", "counted", b"from a").await.0, b"from a");
    assert_eq!(run_task(&b, "d1", "counted", b"from b").await.0, b"from b");
    assert_eq!(d.runs(), 2, "each agent's task ran");
    // Each agent's retry gets its own result.
    assert_eq!(run_task(&a, "d1", "counted", b"from a").await.0, b"from a");
    assert_eq!(run_task(&b, "d1", "counted", b"from b").await.0, b"from b");
    assert_eq!(d.runs(), 2);
    ep.close(0u32.into(), b"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_over_max_result_is_not_kept_so_a_retry_runs_again() {
    let d = Daemon::start("max_result = 1000");
    let ep = endpoint();
    let conn = d.connect(&ep, &d.agent("board-1")).await;
    let input = noise(5000, 9);
    let first = run_task(&conn, "e1", "counted", &input).await;
    assert!(first.0 == input);
    let second = run_task(&conn, "e1", "counted", &input).await;
    assert!(second.0 == input);
    assert_eq!(second.1.exit_code, Some(0));
    assert_eq!(d.runs(), 2, "the retry ran the task again");
    d.wait_log("was over [dedup] max_result and was not kept, so the task runs again");
    ep.close(0u32.into(), b"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_cut_short_runs_nothing_so_the_retry_runs_once() {
    // `counted` notes its run before it reads any input, so a start shows at once.
    let d = Daemon::start("hold_input = \"4KiB\"");
    let agent = d.agent("board-1");
    let small = noise(3000, 5);
    let ep = endpoint();
    let conn = d.connect(&ep, &agent).await;
    let (_send, mut first) = open_task(
        &conn,
        "e1",
        "counted",
        Some(small.len() as u64),
        &small[..1000],
    )
    .await;
    assert_eq!(read_reply(&mut first, WAIT).await, ReplyHeader::Accepted);
    conn.close(0u32.into(), b"link lost");
    d.wait_log("agent went away while sending the task's input; nothing ran");
    assert_eq!(d.runs(), 0, "a task with a partial input did not start");

    let ep2 = endpoint();
    let conn2 = d.connect(&ep2, &agent).await;
    let (output, trailer) = run_task(&conn2, "e1", "counted", &small).await;
    assert!(output == small, "the retry ran on the whole input");
    assert_eq!(trailer.exit_code, Some(0));
    assert_eq!(d.runs(), 1, "the task ran once");

    // An input over hold_input streams into the task as it arrives: it has started
    // before the upload ends.
    let big = noise(64 * 1024, 6);
    let (mut send, mut reader) = open_task(
        &conn2,
        "e2",
        "counted",
        Some(big.len() as u64),
        &big[..16 * 1024],
    )
    .await;
    assert_eq!(read_reply(&mut reader, WAIT).await, ReplyHeader::Accepted);
    d.wait_runs(2);
    send.write_all(&big[16 * 1024..]).await.unwrap();
    send.finish().unwrap();
    let (output, trailer) = read_result(&mut reader, WAIT).await;
    assert!(output == big);
    assert_eq!(trailer.exit_code, Some(0));
    ep.close(0u32.into(), b"");
    ep2.close(0u32.into(), b"");
}
