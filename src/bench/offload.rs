//! `updraft bench offload`: what offloading costs over a warm connection.
//!
//! An empty `echo` task goes through the agent's real offload path
//! ([`updraft_agent::offload`]: request header, reply, trailer, replay buffer)
//! to a real daemon in this process, beside two baselines measured in the same run with
//! the same certificates and runtime: a bare quinn stream echo (a new bidirectional
//! stream per request), the floor, and an HTTP/2 POST echo over rustls on TCP
//! ([`super::h2`]), what a user would pick instead. Latency is taken one request at a
//! time, throughput with [`CONCURRENCY`] requests in flight on the one connection. The
//! sides alternate over [`ROUNDS`] rounds so that machine noise falls on all alike; only
//! the ratios travel between machines.
//!
//! Then: the local API (HTTP over the agent's Unix socket, placement forced to the
//! cloud) with one kept-alive connection and with a new connection per request, and a
//! [`BULK_BYTES`] `echo` offload against a raw quinn stream moving the same bytes both
//! ways at once. `--busy N` runs it all with N threads spinning on the CPU.

use anyhow::Context;
use bytes::Bytes;
use hdrhistogram::Histogram;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use updraft_agent::config::{CloudTarget, LinkConfig};
use updraft_agent::{offload, OnDrop, Replay, Uplink};
use updraft_proto::RequestHeader;

use crate::harness::{self, Pki};

/// Requests each side makes before anything is measured: connection windows, stream
/// credit, allocator and branch predictors all settle in the first few hundred.
const WARMUP: usize = 500;
/// Sequential requests per side for the latency figures, taken in alternating blocks
/// of [`LATENCY_BLOCK`] so that a noisy moment falls on both sides alike.
const LATENCY_SAMPLES: usize = 6_000;
/// Sequential requests one side makes before the other side's turn: long enough for
/// caches to settle on one path, short enough (~10 ms) to pair both with the same noise.
const LATENCY_BLOCK: usize = 100;
/// Requests in flight for the throughput figures: the daemon's slot count below.
const CONCURRENCY: usize = 64;
/// Requests per side per round for the throughput figures (~0.5 s at the goal rate).
const THROUGHPUT_REQUESTS: usize = 10_000;
/// Alternating throughput rounds per side; figures and ratio are medians over rounds.
const ROUNDS: usize = 5;
/// Requests through the local HTTP API (one Unix-socket connection each).
const API_SAMPLES: usize = 1_000;
/// Any one measured phase that takes longer than this is stuck: the run fails instead
/// of hanging.
const PHASE_LIMIT: Duration = Duration::from_secs(30);
/// Largest echo reply the raw baseline reads; requests are empty.
const RAW_READ_LIMIT: usize = 64 * 1024;
/// Bytes each way of the bulk figure: sent while the echo streams back.
const BULK_BYTES: usize = 256 << 20;
/// Chunk size of the bulk input.
const BULK_CHUNK: usize = 64 << 10;
/// Alternating bulk rounds per side; the figure is the median.
const BULK_ROUNDS: usize = 3;
/// Largest value a histogram records: one minute, in microseconds.
const HIST_MAX_US: u64 = 60_000_000;

/// The project's goals, as ratios against raw quinn in the same run (printed only):
/// offload latency p50 and p99, ...
const GOAL_P50_RATIO: f64 = 1.2;
const GOAL_P99_RATIO: f64 = 1.5;
/// ... requests a second at [`CONCURRENCY`], ...
const GOAL_C64_RATIO: f64 = 0.7;
/// ... the local API's p50 over a kept-alive connection, and bulk bytes a second.
const GOAL_API_RATIO: f64 = 1.5;
const GOAL_BULK_RATIO: f64 = 0.9;

/// The daemon for the run: enough slots and queue for [`CONCURRENCY`] to never be busy.
const DAEMON_CONFIG: &str = "max_concurrent_tasks = 64\nmax_queued_tasks = 4096\n\
[tasks.echo]\nbuiltin = \"echo\"\n\
[tasks.bulk]\nbuiltin = \"echo\"\nmax_input = \"1GiB\"\nmax_output = \"1GiB\"\ntimeout = \"10m\"\n";
/// The agent for the local-API figure.
const AGENT_CONFIG: &str = "[tasks.echo]\nbuiltin = \"echo\"\n";

/// Runs the offload benchmark and prints a table, or one JSON line with `json`; with
/// `busy` threads spinning on the CPU throughout when `busy` > 0.
pub async fn run(json: bool, busy: usize) -> anyhow::Result<()> {
    let _spinners = Spinners::start(busy);
    let dir = tempfile::tempdir().context("temporary directory for the benchmark")?;
    let pki = Pki::create(dir.path()).context("throwaway certificates")?;
    let daemon_dir = dir.path().join("daemon");
    std::fs::create_dir_all(&daemon_dir)?;
    let daemon = harness::start_daemon(&pki, &daemon_dir, DAEMON_CONFIG).await?;

    let shutdown = CancellationToken::new();
    let result = measure(&pki, dir.path(), daemon.addr, &shutdown).await;
    shutdown.cancel();
    let stopped = daemon.shutdown().await;
    let figures = result?;
    stopped.context("daemon shutdown")?;
    figures.print(json, busy);
    Ok(())
}

/// Threads that keep the CPU busy until dropped: the "busy machine" runs.
struct Spinners {
    stop: Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Spinners {
    fn start(n: usize) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                })
            })
            .collect();
        Self { stop, threads }
    }
}

impl Drop for Spinners {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Everything the benchmark reports.
struct Figures {
    offload: Histogram<u64>,
    raw: Histogram<u64>,
    h2: Histogram<u64>,
    offload_c64: Vec<f64>,
    raw_c64: Vec<f64>,
    h2_c64: Vec<f64>,
    /// Local API, one kept-alive connection.
    api_kept: Option<Histogram<u64>>,
    /// Local API, a new connection per request.
    api_new: Option<Histogram<u64>>,
    /// Bulk bytes/s each way, per round.
    bulk_offload: Vec<f64>,
    bulk_raw: Vec<f64>,
    /// UDP datagrams the client side sent and received over the measured requests, at
    /// concurrency 1 and [`CONCURRENCY`]: (offload, raw quinn).
    datagrams_c1: (u64, u64),
    datagrams_c64: (u64, u64),
}

async fn measure(
    pki: &Pki,
    dir: &std::path::Path,
    daemon_addr: SocketAddr,
    shutdown: &CancellationToken,
) -> anyhow::Result<Figures> {
    // The agent's own uplink to the daemon.
    let (_uplink, path) =
        OffloadPath::connect(pki, daemon_addr, "echo", Duration::from_secs(10), shutdown).await?;
    let updraft = Side::Offload(path.clone());

    // The baseline: a bare quinn echo server with the same certificates.
    let raw_server = raw_echo_server(pki)?;
    let raw_client = raw_client_endpoint(pki)?;
    let raw_conn = raw_client
        .connect(raw_server.local_addr()?, "localhost")?
        .await
        .context("raw quinn handshake")?;
    let raw = Side::Raw(raw_conn.clone());

    // The HTTP/2 peer.
    let h2_stop = shutdown.child_token();
    let h2_addr = super::h2::server(pki, h2_stop.clone()).await?;
    let h2 = Side::H2(super::h2::connect(pki, h2_addr).await?);

    let mut figures = Figures {
        offload: new_histogram()?,
        raw: new_histogram()?,
        h2: new_histogram()?,
        offload_c64: Vec::new(),
        raw_c64: Vec::new(),
        h2_c64: Vec::new(),
        api_kept: None,
        api_new: None,
        bulk_offload: Vec::new(),
        bulk_raw: Vec::new(),
        datagrams_c1: (0, 0),
        datagrams_c64: (0, 0),
    };
    // Datagrams both ways on a side's connection (not kept for HTTP/2 over TCP).
    let count = |side: &Side, into: &mut (u64, u64), from: u64| {
        let now = side.datagrams();
        match side {
            Side::Offload(_) => into.0 += now - from,
            Side::Raw(_) => into.1 += now - from,
            Side::H2(_) => {}
        }
    };
    let result = async {
        for side in [&raw, &updraft, &h2] {
            bounded("warm-up", sequential(side, WARMUP, None)).await?;
        }
        // Rotate which side goes first so none always follows another.
        let order = |i: usize| match i % 3 {
            0 => [&raw, &updraft, &h2],
            1 => [&updraft, &h2, &raw],
            _ => [&h2, &raw, &updraft],
        };
        bounded("latency", async {
            for block in 0..LATENCY_SAMPLES / LATENCY_BLOCK {
                for side in order(block) {
                    let hist = match side {
                        Side::Raw(_) => &mut figures.raw,
                        Side::Offload(_) => &mut figures.offload,
                        Side::H2(_) => &mut figures.h2,
                    };
                    let from = side.datagrams();
                    sequential(side, LATENCY_BLOCK, Some(hist)).await?;
                    count(side, &mut figures.datagrams_c1, from);
                }
            }
            Ok(())
        })
        .await?;
        for round in 0..ROUNDS {
            for side in order(round) {
                let from = side.datagrams();
                let rate = bounded("throughput", concurrent(side)).await?;
                count(side, &mut figures.datagrams_c64, from);
                match side {
                    Side::Raw(_) => figures.raw_c64.push(rate),
                    Side::Offload(_) => figures.offload_c64.push(rate),
                    Side::H2(_) => figures.h2_c64.push(rate),
                }
            }
        }
        let (kept, new) = bounded("local API", api_latency(pki, dir, daemon_addr)).await?;
        figures.api_kept = Some(kept);
        figures.api_new = Some(new);
        for round in 0..BULK_ROUNDS {
            for raw_turn in [round % 2 == 0, round % 2 != 0] {
                if raw_turn {
                    let rate = bounded("bulk (raw quinn)", bulk_raw(&raw_conn)).await?;
                    figures.bulk_raw.push(rate);
                } else {
                    let rate = bounded("bulk (offload)", bulk_offload(&path)).await?;
                    figures.bulk_offload.push(rate);
                }
            }
        }
        anyhow::Ok(())
    }
    .await;
    h2_stop.cancel();

    raw_conn.close(0u32.into(), b"done");
    raw_client.close(0u32.into(), b"done");
    raw_server.close(0u32.into(), b"done");
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        raw_client.wait_idle().await;
        raw_server.wait_idle().await;
    })
    .await;
    result.map(|()| figures)
}

/// The agent's offload path over one warm connection, for task `task`.
pub(crate) struct OffloadPath {
    pub(crate) conn: quinn::Connection,
    pub(crate) cfg: LinkConfig,
    pub(crate) task: &'static str,
}

impl OffloadPath {
    /// Starts the agent's uplink to the daemon at `addr`, waits up to `within` for it
    /// to connect, and gives the path for `task` over its connection, with the uplink
    /// (keep it while the path is used; `shutdown` stops it).
    pub(crate) async fn connect(
        pki: &Pki,
        addr: SocketAddr,
        task: &'static str,
        within: Duration,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<(Uplink, Arc<Self>)> {
        let uplink = Uplink::new(
            &pki.agent_identity()?,
            vec![CloudTarget {
                address: addr.to_string(),
                server_name: "localhost".into(),
            }],
            LinkConfig::default(),
        )?;
        uplink.start(shutdown.clone());
        anyhow::ensure!(
            uplink.wait_usable(within).await,
            "the agent's uplink did not connect to the daemon at {addr} within {within:?}"
        );
        let path = Arc::new(OffloadPath {
            conn: uplink.pick().context("no usable daemon connection")?.conn,
            cfg: uplink.config().clone(),
            task,
        });
        Ok((uplink, path))
    }
}

/// What is being measured.
enum Side {
    /// [`offload`] against the daemon.
    Offload(Arc<OffloadPath>),
    /// A bare stream echo.
    Raw(quinn::Connection),
    /// An HTTP/2 POST echo.
    H2(hyper::client::conn::http2::SendRequest<http_body_util::Full<Bytes>>),
}

impl Side {
    fn clone_handle(&self) -> Self {
        match self {
            Self::Offload(p) => Self::Offload(p.clone()),
            Self::Raw(c) => Self::Raw(c.clone()),
            Self::H2(s) => Self::H2(s.clone()),
        }
    }

    /// UDP datagrams sent and received on the side's QUIC connection so far.
    fn datagrams(&self) -> u64 {
        let stats = match self {
            Self::Offload(p) => p.conn.stats(),
            Self::Raw(c) => c.stats(),
            Self::H2(_) => return 0,
        };
        stats.udp_tx.datagrams + stats.udp_rx.datagrams
    }

    /// One empty request, answered in full.
    async fn once(&self) -> anyhow::Result<()> {
        match self {
            Self::Offload(p) => offload_once(p).await,
            Self::Raw(c) => raw_once(c).await,
            Self::H2(s) => super::h2::once(s, Bytes::new()).await,
        }
    }
}

/// Task ids must be unique: the daemon may remember recent ones to answer retries.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// One empty task through the agent's offload path, checked.
pub(crate) async fn offload_once(p: &OffloadPath) -> anyhow::Result<()> {
    let mut output = Vec::new();
    let trailer = offload_with(p, p.task, 0, None::<Bytes>, &mut output).await?;
    anyhow::ensure!(
        trailer.exit_code == Some(0) && output.is_empty(),
        "echo answered exit {:?}, {} bytes: {}",
        trailer.exit_code,
        output.len(),
        trailer.message
    );
    Ok(())
}

/// Task `task` with `input` of `input_len` bytes through the agent's offload path, a
/// new id each time; its trailer, or why there is none.
async fn offload_with<I: updraft_shared::exec::Input, O: updraft_shared::exec::Output>(
    p: &OffloadPath,
    task: &str,
    input_len: u64,
    input: I,
    output: &mut O,
) -> anyhow::Result<updraft_proto::Trailer> {
    let header = RequestHeader {
        id: format!("bench-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed)),
        task: task.into(),
        args: vec![],
        input_len: Some(input_len),
    };
    let cfg = &p.cfg;
    offload(
        &p.conn,
        &header,
        Replay::fresh(input),
        output,
        cfg,
        OnDrop::Cancel,
    )
    .await
    .map_err(|e| match e {
        updraft_agent::OffloadError::NotStarted { code, reason, .. } => {
            anyhow::anyhow!("task `{task}`: offload not started ({code:?}): {reason}")
        }
        updraft_agent::OffloadError::Failed { reason, .. } => {
            anyhow::anyhow!("task `{task}`: offload failed: {reason}")
        }
    })
}

async fn raw_once(conn: &quinn::Connection) -> anyhow::Result<()> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.finish()?;
    let reply = recv.read_to_end(RAW_READ_LIMIT).await?;
    anyhow::ensure!(reply.is_empty(), "raw echo returned {} bytes", reply.len());
    Ok(())
}

/// `n` requests one after another, each timed into `hist` when given.
async fn sequential(
    side: &Side,
    n: usize,
    mut hist: Option<&mut Histogram<u64>>,
) -> anyhow::Result<()> {
    for _ in 0..n {
        let start = Instant::now();
        side.once().await?;
        if let Some(h) = hist.as_deref_mut() {
            h.saturating_record(start.elapsed().as_micros() as u64);
        }
    }
    Ok(())
}

/// [`THROUGHPUT_REQUESTS`] requests by [`CONCURRENCY`] workers; requests per second.
async fn concurrent(side: &Side) -> anyhow::Result<f64> {
    let side = Arc::new(side.clone_handle());
    concurrent_runs(THROUGHPUT_REQUESTS, CONCURRENCY, move || {
        let side = side.clone();
        async move { side.once().await }
    })
    .await
}

/// `requests` calls of `once` by `concurrency` workers; calls per second. The first
/// failure stops the other workers and is returned.
pub(crate) async fn concurrent_runs<F, Fut>(
    requests: usize,
    concurrency: usize,
    once: F,
) -> anyhow::Result<f64>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let left = Arc::new(AtomicUsize::new(requests));
    let start = Instant::now();
    // A JoinSet aborts the workers if this future is dropped (phase timeout).
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (once, left) = (once.clone(), left.clone());
        workers.spawn(async move {
            while left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
            {
                if let Err(e) = once().await {
                    // Stop the others quickly instead of letting them finish the count.
                    left.store(0, Ordering::Relaxed);
                    return Err(e);
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = workers.join_next().await {
        done??;
    }
    Ok(requests as f64 / start.elapsed().as_secs_f64())
}

/// The whole local path: HTTP over the agent's Unix socket, placement forced to the
/// cloud, the agent's uplink, the daemon, and back; one kept-alive connection (as curl
/// and HTTP client libraries do it) and a new connection per request, in alternating
/// blocks. Gives (kept-alive, new connection).
async fn api_latency(
    pki: &Pki,
    dir: &std::path::Path,
    daemon_addr: SocketAddr,
) -> anyhow::Result<(Histogram<u64>, Histogram<u64>)> {
    use updraft_agent::client::{body_bytes, RunRequest};
    use updraft_agent::ChannelBody;
    use updraft_agent::Where;

    let agent_dir = dir.join("agent-state");
    std::fs::create_dir_all(&agent_dir)?;
    let agent = harness::start_agent(pki, &agent_dir, &[daemon_addr], AGENT_CONFIG).await?;
    let result = async {
        anyhow::ensure!(
            agent
                .agent
                .uplink()
                .wait_usable(Duration::from_secs(10))
                .await,
            "the agent did not connect to the daemon"
        );
        let client = agent.client();
        let run = RunRequest {
            task: "echo".into(),
            where_: Some(Where::Cloud),
            ..Default::default()
        };
        let request = || {
            hyper::Request::post(run.path())
                .header("host", "updraft-agent")
                .header("content-length", 0)
                .body(ChannelBody::full(Vec::new()))
        };
        let stream = tokio::net::UnixStream::connect(client.socket()).await?;
        let (mut kept, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let check = |resp: hyper::Response<hyper::body::Incoming>| async move {
            let status = resp.status();
            let placement = resp
                .headers()
                .get("updraft-placement")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let body = body_bytes(resp).await?;
            anyhow::ensure!(
                status.is_success() && placement == "cloud" && body.is_empty(),
                "local API answered {status} placement `{placement}`: {}",
                String::from_utf8_lossy(&body)
            );
            anyhow::Ok(())
        };
        let (mut on_kept, mut on_new) = (new_histogram()?, new_histogram()?);
        let warm = WARMUP / 2 / LATENCY_BLOCK;
        for block in 0..warm + API_SAMPLES / LATENCY_BLOCK {
            let record = block >= warm;
            for keep in [block % 2 == 0, block % 2 != 0] {
                for _ in 0..LATENCY_BLOCK {
                    let start = Instant::now();
                    let resp = if keep {
                        kept.ready()
                            .await
                            .context("kept-alive connection to the agent")?;
                        kept.send_request(request()?).await?
                    } else {
                        client.send(request()?).await?
                    };
                    check(resp).await?;
                    if record {
                        let hist = if keep { &mut on_kept } else { &mut on_new };
                        hist.saturating_record(start.elapsed().as_micros() as u64);
                    }
                }
            }
        }
        Ok((on_kept, on_new))
    }
    .await;
    let stopped = agent.shutdown().await;
    let hists = result?;
    stopped.context("agent shutdown")?;
    Ok(hists)
}

/// [`BULK_BYTES`] of input, in [`BULK_CHUNK`] pieces of one shared buffer.
struct BulkInput {
    chunk: Bytes,
    left: usize,
}

impl BulkInput {
    fn new() -> Self {
        Self {
            chunk: Bytes::from(vec![0x5a; BULK_CHUNK]),
            left: BULK_BYTES,
        }
    }
}

impl updraft_shared::exec::Input for BulkInput {
    async fn next_chunk(&mut self) -> std::io::Result<Option<Bytes>> {
        if self.left == 0 {
            return Ok(None);
        }
        let n = self.left.min(self.chunk.len());
        self.left -= n;
        Ok(Some(self.chunk.slice(..n)))
    }
}

/// Output that only counts its bytes.
struct Counted(u64);

impl updraft_shared::exec::Output for Counted {
    async fn write(&mut self, chunk: Bytes) -> std::io::Result<()> {
        self.0 += chunk.len() as u64;
        Ok(())
    }
}

/// One [`BULK_BYTES`] `echo` offload (task `bulk`); bytes per second each way.
async fn bulk_offload(p: &OffloadPath) -> anyhow::Result<f64> {
    let mut output = Counted(0);
    let start = Instant::now();
    let trailer = offload_with(p, "bulk", BULK_BYTES as u64, BulkInput::new(), &mut output).await?;
    let secs = start.elapsed().as_secs_f64();
    anyhow::ensure!(
        trailer.exit_code == Some(0) && output.0 == BULK_BYTES as u64,
        "bulk echo answered exit {:?}, {} of {BULK_BYTES} bytes: {}",
        trailer.exit_code,
        output.0,
        trailer.message
    );
    Ok(BULK_BYTES as f64 / secs)
}

/// [`BULK_BYTES`] through one raw quinn stream, sent while the echo is read; bytes per
/// second each way.
async fn bulk_raw(conn: &quinn::Connection) -> anyhow::Result<f64> {
    let start = Instant::now();
    let (mut send, mut recv) = conn.open_bi().await?;
    let writer = tokio::spawn(async move {
        let mut input = BulkInput::new();
        while let Some(chunk) = updraft_shared::exec::Input::next_chunk(&mut input).await? {
            send.write_chunk(chunk).await?;
        }
        send.finish()?;
        anyhow::Ok(())
    });
    let mut got = 0usize;
    while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
        got += chunk.bytes.len();
    }
    writer.await??;
    let secs = start.elapsed().as_secs_f64();
    anyhow::ensure!(
        got == BULK_BYTES,
        "raw echo returned {got} of {BULK_BYTES} bytes"
    );
    Ok(BULK_BYTES as f64 / secs)
}

pub(crate) fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, HIST_MAX_US, 3)?)
}

pub(crate) async fn bounded<T>(
    what: &str,
    fut: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    bounded_for(PHASE_LIMIT, what, fut).await
}

/// [`bounded`] with a limit of its own.
pub(crate) async fn bounded_for<T>(
    limit: Duration,
    what: &str,
    fut: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| anyhow::anyhow!("{what} phase did not finish within {limit:?}"))?
        .with_context(|| format!("{what} phase"))
}

/// A quinn echo server on loopback with the daemon's certificates and stream limit
/// (quinn's default windows, as the daemon and agent have).
fn raw_echo_server(pki: &Pki) -> anyhow::Result<quinn::Endpoint> {
    let mut server = quinn::ServerConfig::with_crypto(pki.daemon_identity()?.quic_server()?);
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(256u32.into())
        .max_concurrent_uni_streams(0u32.into());
    server.transport_config(Arc::new(transport));
    let endpoint = quinn::Endpoint::server(server, "127.0.0.1:0".parse()?)?;
    let accept = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accept.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    // Streamed back as it comes, as the daemon's `echo` does.
                    tokio::spawn(async move {
                        loop {
                            match recv.read_chunk(usize::MAX, true).await {
                                Ok(Some(chunk)) => {
                                    if send.write_chunk(chunk.bytes).await.is_err() {
                                        return;
                                    }
                                }
                                Ok(None) => {
                                    let _ = send.finish();
                                    return;
                                }
                                Err(_) => return,
                            }
                        }
                    });
                }
            });
        }
    });
    Ok(endpoint)
}

/// A quinn client with the agent's certificates and the uplink's stream limits.
fn raw_client_endpoint(pki: &Pki) -> anyhow::Result<quinn::Endpoint> {
    let mut client = quinn::ClientConfig::new(pki.agent_identity()?.quic_client()?);
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_uni_streams(0u32.into())
        .max_concurrent_bidi_streams(0u32.into());
    client.transport_config(Arc::new(transport));
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

pub(crate) fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

impl Figures {
    fn print(&self, json: bool, busy: usize) {
        let q = |h: &Histogram<u64>, p: f64| h.value_at_quantile(p);
        let (op50, op99) = (q(&self.offload, 0.5), q(&self.offload, 0.99));
        let (rp50, rp99) = (q(&self.raw, 0.5), q(&self.raw, 0.99));
        let (hp50, hp99) = (q(&self.h2, 0.5), q(&self.h2, 0.99));
        let (otp, rtp, htp) = (
            median(&self.offload_c64),
            median(&self.raw_c64),
            median(&self.h2_c64),
        );
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        // Each round's sides ran back to back, so their ratio shares that moment's
        // noise; the median of those ratios is steadier than a ratio of medians.
        let paired = |a: &[f64], b: &[f64]| {
            let r: Vec<f64> = a.iter().zip(b).map(|(&x, &y)| ratio(x, y)).collect();
            median(&r)
        };
        let tp_ratio = paired(&self.offload_c64, &self.raw_c64);
        let tp_vs_h2 = paired(&self.offload_c64, &self.h2_c64);
        let h2_tp_ratio = paired(&self.h2_c64, &self.raw_c64);
        let api = |h: &Option<Histogram<u64>>, p: f64| h.as_ref().map(|h| q(h, p));
        let (kept50, kept99) = (api(&self.api_kept, 0.5), api(&self.api_kept, 0.99));
        let (new50, new99) = (api(&self.api_new, 0.5), api(&self.api_new, 0.99));
        let (bo, br) = (median(&self.bulk_offload), median(&self.bulk_raw));
        let bulk_ratio = paired(&self.bulk_offload, &self.bulk_raw);
        let mib = |x: f64| (x / f64::from(1u32 << 20)).round();
        let per = |n: u64, of: u64| if of > 0 { n as f64 / of as f64 } else { 0.0 };
        let c1_requests = self.offload.len();
        let c64_requests = (ROUNDS * THROUGHPUT_REQUESTS) as u64;
        if json {
            let line = serde_json::json!({
                "busy_threads": busy,
                "offload_p50_us": op50,
                "offload_p99_us": op99,
                "raw_quinn_p50_us": rp50,
                "raw_quinn_p99_us": rp99,
                "h2_p50_us": hp50,
                "h2_p99_us": hp99,
                "tasks_per_sec_c64": otp.round(),
                "raw_quinn_streams_per_sec_c64": rtp.round(),
                "h2_requests_per_sec_c64": htp.round(),
                "offload_p50_ratio": round3(ratio(op50 as f64, rp50 as f64)),
                "offload_p99_ratio": round3(ratio(op99 as f64, rp99 as f64)),
                "c64_throughput_ratio": round3(tp_ratio),
                "offload_p50_vs_h2": round3(ratio(op50 as f64, hp50 as f64)),
                "c64_throughput_vs_h2": round3(tp_vs_h2),
                "h2_p50_ratio": round3(ratio(hp50 as f64, rp50 as f64)),
                "h2_c64_throughput_ratio": round3(h2_tp_ratio),
                "api_keepalive_p50_us": kept50,
                "api_keepalive_p99_us": kept99,
                "api_keepalive_p50_ratio": kept50.map(|v| round3(ratio(v as f64, rp50 as f64))),
                "api_p50_us": new50,
                "api_p99_us": new99,
                "api_p50_ratio": new50.map(|v| round3(ratio(v as f64, rp50 as f64))),
                "bulk_offload_mib_per_sec": mib(bo),
                "bulk_raw_quinn_mib_per_sec": mib(br),
                "bulk_ratio": round3(bulk_ratio),
                "offload_datagrams_per_task_c1": round3(per(self.datagrams_c1.0, c1_requests)),
                "raw_quinn_datagrams_per_request_c1": round3(per(self.datagrams_c1.1, c1_requests)),
                "offload_datagrams_per_task_c64": round3(per(self.datagrams_c64.0, c64_requests)),
                "raw_quinn_datagrams_per_request_c64": round3(per(self.datagrams_c64.1, c64_requests)),
                "latency_samples": self.offload.len(),
                "c64_requests_per_round": THROUGHPUT_REQUESTS,
                "rounds": ROUNDS,
                "bulk_bytes": BULK_BYTES,
            });
            println!("{line}");
            return;
        }
        println!(
            "updraft bench offload: empty `echo` task over a warm connection (loopback, \
             mutual TLS){}",
            if busy > 0 {
                format!(", {busy} threads spinning on the CPU")
            } else {
                String::new()
            }
        );
        println!();
        println!(
            "{:<34} {:>11} {:>11} {:>11} {:>9} {:>9}",
            "figure", "updraft", "raw quinn", "http/2", "vs quinn", "vs h2"
        );
        let row = |name: &str, a: String, b: String, c: String, r: f64, rh: f64| {
            println!("{name:<34} {a:>11} {b:>11} {c:>11} {r:>8.2}x {rh:>8.2}x");
        };
        row(
            "latency p50, concurrency 1",
            format!("{op50} us"),
            format!("{rp50} us"),
            format!("{hp50} us"),
            ratio(op50 as f64, rp50 as f64),
            ratio(op50 as f64, hp50 as f64),
        );
        row(
            "latency p99, concurrency 1",
            format!("{op99} us"),
            format!("{rp99} us"),
            format!("{hp99} us"),
            ratio(op99 as f64, rp99 as f64),
            ratio(op99 as f64, hp99 as f64),
        );
        row(
            &format!("requests/s, concurrency {CONCURRENCY}"),
            format!("{otp:.0}"),
            format!("{rtp:.0}"),
            format!("{htp:.0}"),
            tp_ratio,
            tp_vs_h2,
        );
        let api_row = |name: &str, p50: Option<u64>, p99: Option<u64>| {
            if let (Some(p50), Some(p99)) = (p50, p99) {
                println!(
                    "{name:<34} {:>11} {:>11} {:>11} {:>8.2}x",
                    format!("{p50} us"),
                    format!("{rp50} us"),
                    format!("p99 {p99}"),
                    ratio(p50 as f64, rp50 as f64)
                );
            }
        };
        println!(
            "{:<34} {:>11.2} {:>11.2} {:>11}",
            "datagrams per request, c1",
            per(self.datagrams_c1.0, c1_requests),
            per(self.datagrams_c1.1, c1_requests),
            ""
        );
        println!(
            "{:<34} {:>11.2} {:>11.2} {:>11}",
            format!("datagrams per request, c{CONCURRENCY}"),
            per(self.datagrams_c64.0, c64_requests),
            per(self.datagrams_c64.1, c64_requests),
            ""
        );
        api_row("local API p50, kept-alive", kept50, kept99);
        api_row("local API p50, new connection", new50, new99);
        println!(
            "{:<34} {:>11} {:>11} {:>11} {:>8.2}x",
            format!("bulk {} MiB echo, MiB/s each way", BULK_BYTES >> 20),
            mib(bo),
            mib(br),
            "",
            bulk_ratio
        );
        println!();
        println!(
            "updraft = the agent's offload path (header, reply, trailer) to a real daemon; \
             raw quinn = a new stream per request echoed by a bare server; http/2 = a POST \
             echo over hyper and rustls on TCP; all with the same certificates, in this process."
        );
        println!(
            "latency: {} samples per side in rotating blocks of {LATENCY_BLOCK}; \
             requests/s: median of {ROUNDS} rotating rounds of {THROUGHPUT_REQUESTS} \
             (ratios: median of the rounds' ratios). local API: HTTP over the agent's Unix \
             socket, placement forced to the cloud, {API_SAMPLES} requests each way. bulk: \
             median of {BULK_ROUNDS} alternating rounds.",
            self.offload.len()
        );
        println!(
            "goals: latency p50 <= {GOAL_P50_RATIO:.2}x and p99 <= {GOAL_P99_RATIO:.2}x raw quinn, \
             requests/s >= {GOAL_C64_RATIO:.2}x raw quinn and ahead of http/2, local API \
             kept-alive p50 <= {GOAL_API_RATIO:.2}x, bulk >= {GOAL_BULK_RATIO:.2}x."
        );
    }
}

pub(crate) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
