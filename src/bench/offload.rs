//! `updraft bench offload`: what offloading costs over a warm connection.
//!
//! An empty `echo` task goes through the agent's real offload path
//! ([`updraft_agent::offload`]: request header, reply, trailer, replay buffer)
//! to a real daemon in this process, beside a bare quinn stream echo (a new
//! bidirectional stream per request, the same certificates, the same runtime) measured
//! in the same run. Latency is taken one request at a time, throughput with
//! [`CONCURRENCY`] requests in flight on the one connection. The two sides alternate
//! over [`ROUNDS`] rounds so that machine noise falls on both alike; only the ratios
//! travel between machines.

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
/// Largest value a histogram records: one minute, in microseconds.
const HIST_MAX_US: u64 = 60_000_000;

/// The project's goal for the offload latency p50 over the raw quinn p50 (printed only).
const GOAL_P50_RATIO: f64 = 1.3;
/// The project's goal for offloaded tasks per second at [`CONCURRENCY`] (printed only).
const GOAL_TASKS_PER_SEC: u32 = 20_000;

/// The daemon for the run: enough slots and queue for [`CONCURRENCY`] to never be busy.
const DAEMON_CONFIG: &str = "max_concurrent_tasks = 64\nmax_queued_tasks = 4096\n\
[tasks.echo]\nbuiltin = \"echo\"\n";
/// The agent for the local-API figure.
const AGENT_CONFIG: &str = "[tasks.echo]\nbuiltin = \"echo\"\n";

/// Runs the offload benchmark and prints a table, or one JSON line with `json`.
pub async fn run(json: bool) -> anyhow::Result<()> {
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
    figures.print(json);
    Ok(())
}

/// Everything the benchmark reports.
struct Figures {
    offload: Histogram<u64>,
    raw: Histogram<u64>,
    offload_c64: Vec<f64>,
    raw_c64: Vec<f64>,
    api: Option<Histogram<u64>>,
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
    let updraft = Side::Offload(path);

    // The baseline: a bare quinn echo server with the same certificates.
    let raw_server = raw_echo_server(pki)?;
    let raw_client = raw_client_endpoint(pki)?;
    let raw_conn = raw_client
        .connect(raw_server.local_addr()?, "localhost")?
        .await
        .context("raw quinn handshake")?;
    let raw = Side::Raw(raw_conn.clone());

    let mut figures = Figures {
        offload: new_histogram()?,
        raw: new_histogram()?,
        offload_c64: Vec::new(),
        raw_c64: Vec::new(),
        api: None,
    };
    let result = async {
        for side in [&raw, &updraft] {
            bounded("warm-up", sequential(side, WARMUP, None)).await?;
        }
        // Alternate which side goes first so neither always follows the other.
        let order = |i: usize| {
            if i.is_multiple_of(2) {
                [&raw, &updraft]
            } else {
                [&updraft, &raw]
            }
        };
        bounded("latency", async {
            for block in 0..LATENCY_SAMPLES / LATENCY_BLOCK {
                for side in order(block) {
                    let hist = match side {
                        Side::Raw(_) => &mut figures.raw,
                        Side::Offload(_) => &mut figures.offload,
                    };
                    sequential(side, LATENCY_BLOCK, Some(hist)).await?;
                }
            }
            Ok(())
        })
        .await?;
        for round in 0..ROUNDS {
            for side in order(round) {
                let rate = bounded("throughput", concurrent(side)).await?;
                match side {
                    Side::Raw(_) => figures.raw_c64.push(rate),
                    Side::Offload(_) => figures.offload_c64.push(rate),
                }
            }
        }
        figures.api = Some(bounded("local API", api_latency(pki, dir, daemon_addr)).await?);
        anyhow::Ok(())
    }
    .await;

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
}

impl Side {
    fn clone_handle(&self) -> Self {
        match self {
            Self::Offload(p) => Self::Offload(p.clone()),
            Self::Raw(c) => Self::Raw(c.clone()),
        }
    }

    /// One empty request, answered in full.
    async fn once(&self) -> anyhow::Result<()> {
        match self {
            Self::Offload(p) => offload_once(p).await,
            Self::Raw(c) => raw_once(c).await,
        }
    }
}

/// Task ids must be unique: the daemon may remember recent ones to answer retries.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// One empty task through the agent's offload path, checked.
pub(crate) async fn offload_once(p: &OffloadPath) -> anyhow::Result<()> {
    let header = RequestHeader {
        id: format!("bench-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed)),
        task: p.task.into(),
        args: vec![],
        input_len: Some(0),
    };
    let mut output = Vec::new();
    let trailer = offload(
        &p.conn,
        &header,
        Replay::fresh(None::<Bytes>),
        &mut output,
        &p.cfg,
        OnDrop::Cancel,
    )
    .await
    .map_err(|e| match e {
        updraft_agent::OffloadError::NotStarted { code, reason, .. } => {
            anyhow::anyhow!("offload not started ({code:?}): {reason}")
        }
        updraft_agent::OffloadError::Failed { reason, .. } => {
            anyhow::anyhow!("offload failed: {reason}")
        }
    })?;
    anyhow::ensure!(
        trailer.exit_code == Some(0) && output.is_empty(),
        "echo answered exit {:?}, {} bytes: {}",
        trailer.exit_code,
        output.len(),
        trailer.message
    );
    Ok(())
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
/// cloud, the agent's uplink, the daemon, and back.
async fn api_latency(
    pki: &Pki,
    dir: &std::path::Path,
    daemon_addr: SocketAddr,
) -> anyhow::Result<Histogram<u64>> {
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
        let mut hist = new_histogram()?;
        for i in 0..WARMUP / 2 + API_SAMPLES {
            let start = Instant::now();
            let resp = client.run(&run, ChannelBody::full(Vec::new())).await?;
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
            if i >= WARMUP / 2 {
                hist.saturating_record(start.elapsed().as_micros() as u64);
            }
        }
        Ok(hist)
    }
    .await;
    let stopped = agent.shutdown().await;
    let hist = result?;
    stopped.context("agent shutdown")?;
    Ok(hist)
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

/// A quinn echo server on loopback with the daemon's certificates and stream limit.
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
                    tokio::spawn(async move {
                        if let Ok(data) = recv.read_to_end(RAW_READ_LIMIT).await {
                            if send.write_all(&data).await.is_ok() {
                                let _ = send.finish();
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
    fn print(&self, json: bool) {
        let (op50, op99) = (
            self.offload.value_at_quantile(0.5),
            self.offload.value_at_quantile(0.99),
        );
        let (rp50, rp99) = (
            self.raw.value_at_quantile(0.5),
            self.raw.value_at_quantile(0.99),
        );
        let (otp, rtp) = (median(&self.offload_c64), median(&self.raw_c64));
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        // Each round's two sides ran back to back, so their ratio shares that moment's
        // noise; the median of those ratios is steadier than a ratio of medians.
        let paired: Vec<f64> = self
            .offload_c64
            .iter()
            .zip(&self.raw_c64)
            .map(|(&o, &r)| ratio(o, r))
            .collect();
        let tp_ratio = median(&paired);
        let api_p50 = self.api.as_ref().map(|h| h.value_at_quantile(0.5));
        let api_p99 = self.api.as_ref().map(|h| h.value_at_quantile(0.99));
        if json {
            let line = serde_json::json!({
                "offload_p50_us": op50,
                "offload_p99_us": op99,
                "raw_quinn_p50_us": rp50,
                "raw_quinn_p99_us": rp99,
                "tasks_per_sec_c64": otp.round(),
                "raw_quinn_streams_per_sec_c64": rtp.round(),
                "offload_p50_ratio": round3(ratio(op50 as f64, rp50 as f64)),
                "offload_p99_ratio": round3(ratio(op99 as f64, rp99 as f64)),
                "c64_throughput_ratio": round3(tp_ratio),
                "api_p50_us": api_p50,
                "api_p99_us": api_p99,
                "latency_samples": self.offload.len(),
                "c64_requests_per_round": THROUGHPUT_REQUESTS,
                "rounds": ROUNDS,
            });
            println!("{line}");
            return;
        }
        println!(
            "updraft bench offload: empty `echo` task over a warm QUIC connection \
             (loopback, mutual TLS)"
        );
        println!();
        println!(
            "{:<34} {:>12} {:>12} {:>8}",
            "figure", "updraft", "raw quinn", "ratio"
        );
        let row = |name: &str, a: String, b: String, r: f64| {
            println!("{name:<34} {a:>12} {b:>12} {:>7.2}x", r);
        };
        row(
            "latency p50, concurrency 1",
            format!("{op50} us"),
            format!("{rp50} us"),
            ratio(op50 as f64, rp50 as f64),
        );
        row(
            "latency p99, concurrency 1",
            format!("{op99} us"),
            format!("{rp99} us"),
            ratio(op99 as f64, rp99 as f64),
        );
        row(
            &format!("requests/s, concurrency {CONCURRENCY}"),
            format!("{otp:.0}"),
            format!("{rtp:.0}"),
            tp_ratio,
        );
        if let (Some(p50), Some(p99)) = (api_p50, api_p99) {
            println!(
                "{:<34} {:>12} {:>12}",
                "local API (HTTP/UDS) p50 / p99",
                format!("{p50} us"),
                format!("{p99} us")
            );
        }
        println!();
        println!(
            "updraft = the agent's offload path (header, reply, trailer) to a real daemon; \
             raw quinn = a new stream per request echoed by a bare server, same certificates."
        );
        println!(
            "latency: {} samples per side in alternating blocks of {LATENCY_BLOCK}; \
             requests/s: median of {ROUNDS} alternating rounds of {THROUGHPUT_REQUESTS} \
             (ratio: median of the rounds' ratios).",
            self.offload.len()
        );
        println!(
            "goals: latency p50 ratio <= {GOAL_P50_RATIO:.2}, >= {GOAL_TASKS_PER_SEC} tasks/s at \
             concurrency {CONCURRENCY}."
        );
    }
}

pub(crate) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
