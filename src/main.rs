//! `updraft`: the demo and the benchmark suite.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

/// What `--version` prints after the name, as `updraft-agent` and `updraftd` do: the
/// package version and the git commit (see build.rs).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("UPDRAFT_COMMIT"),
    ")"
);

/// Updraft demo and benchmarks.
#[derive(Debug, Parser)]
#[command(name = "updraft", version = VERSION, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// A daemon and an agent on loopback over real QUIC, running a scripted mix of tasks.
    Demo,
    /// Run a benchmark.
    Bench {
        /// Which benchmark.
        which: Bench,
        /// Print one JSON line of named figures instead of a table.
        #[arg(long)]
        json: bool,
        /// placement: run only this scenario (repeatable); default all.
        #[arg(long = "scenario", value_name = "NAME")]
        scenarios: Vec<String>,
        /// placement: print every auto task's placement and reason on stderr.
        #[arg(long)]
        trace: bool,
        /// placement: instead of the named scenarios, run N (1-200) scenarios generated
        /// from --seed: random task mixes (burn, xz, gzip, sha256sum, sha256), inputs of
        /// 4 KiB-4 MiB, links of 5-100 Mbit/s and 5-300 ms, board CPU 10-100 %, and 1-2
        /// mid-run changes of CPU, link or battery; reports auto/oracle p50/p95/max.
        #[arg(long, value_name = "N")]
        random: Option<usize>,
        /// placement: seed of the --random scenarios (default 1); the same seed draws the
        /// same scenarios.
        #[arg(long, value_name = "S")]
        seed: Option<u64>,
        /// faults: agents, each its own process.
        #[arg(long, default_value_t = 3)]
        agents: usize,
        /// faults: tasks per agent.
        #[arg(long, default_value_t = 60)]
        tasks: usize,
        /// faults: keep the run's directory (configs, logs, journals, runs file).
        #[arg(long)]
        keep: bool,
        /// offload: threads spinning on the CPU throughout the run (the busy-machine
        /// figures; 0 = a quiet run).
        #[arg(long, value_name = "N", default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=256))]
        busy: u16,
        /// footprint: the agent binary to measure (default: the board build beside
        /// this one, else this build's).
        #[arg(long, value_name = "PATH")]
        agent: Option<PathBuf>,
        /// footprint: seconds the idle figures are taken over.
        #[arg(long, default_value_t = 30)]
        idle_secs: u64,
        /// footprint: seconds of steady task load.
        #[arg(long, default_value_t = 20)]
        load_secs: u64,
    },
    /// A daemon process of `bench faults`. Started by the benchmark itself.
    #[command(name = "bench-faults-daemon", hide = true)]
    BenchFaultsDaemon {
        /// Daemon config written by the benchmark.
        #[arg(long)]
        config: PathBuf,
    },
    /// An agent process of `bench faults`. Started by the benchmark itself.
    #[command(name = "bench-faults-agent", hide = true)]
    BenchFaultsAgent {
        /// Agent config written by the benchmark.
        #[arg(long)]
        config: PathBuf,
    },
    /// The cloud side of `bench placement`: a daemon behind a link emulator, driven
    /// through stdin. Started by the benchmark itself.
    #[command(name = "bench-placement-cloud", hide = true)]
    BenchPlacementCloud {
        /// Daemon config written by the benchmark.
        #[arg(long)]
        config: PathBuf,
    },
    /// The CPU-heavy task of `bench placement`: burns the unit count read on stdin.
    #[command(name = "bench-placement-burn", hide = true)]
    BenchPlacementBurn,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Bench {
    /// Offload latency and throughput against a raw quinn stream and an HTTP/2 echo;
    /// the local API; bulk transfer.
    Offload,
    /// A command task through the executor against a bare process spawn.
    Exec,
    /// Auto placement against always-local, always-cloud and a hindsight oracle, under
    /// changing board CPU and link conditions; plus the cost of one decision.
    Placement,
    /// Delivery under a schedule of faults: submitted, delivered, duplicate runs, lost.
    Faults,
    /// The agent's binary size, RSS idle and under load, and idle CPU, beside `sleep`.
    Footprint,
    /// Offload through cluster mode (1 and 3 replicas on NATS JetStream R1 and R3)
    /// against a single daemon, and the store's own round trips.
    Cluster,
}

fn main() -> ExitCode {
    // bench exec contains its tasks as the services do, this binary entering a task's
    // cgroup first where tasks get one.
    updraft_shared::contain::task_entry();
    let cli = Cli::parse();
    // A task the benchmark runs many times: no runtime, no logging, just the work.
    if let Command::BenchPlacementBurn = cli.command {
        return match updraft::bench::placement::burn_stdin() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("updraft: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    // The demo and the benchmarks print tables on stdout; the services' own logs would
    // interleave with them on a terminal, so only errors show unless UPDRAFT_LOG says.
    if std::env::var_os("UPDRAFT_LOG").is_none() {
        std::env::set_var("UPDRAFT_LOG", "error");
    }
    updraft_shared::logging::init("UPDRAFT_LOG");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(async {
        match cli.command {
            Command::Demo => updraft::demo::run().await,
            Command::Bench {
                which: Bench::Offload,
                json,
                busy,
                ..
            } => updraft::bench::offload::run(json, busy.into()).await,
            Command::Bench {
                which: Bench::Exec,
                json,
                ..
            } => updraft::bench::exec::run(json).await,
            Command::Bench {
                which: Bench::Placement,
                json,
                scenarios,
                trace,
                random,
                seed,
                ..
            } => {
                updraft::bench::placement::run(updraft::bench::placement::Options {
                    json,
                    scenarios,
                    trace,
                    random,
                    seed,
                })
                .await
            }
            Command::Bench {
                which: Bench::Faults,
                json,
                agents,
                tasks,
                keep,
                ..
            } => {
                updraft::bench::faults::run(updraft::bench::faults::Options {
                    json,
                    agents,
                    tasks,
                    keep,
                })
                .await
            }
            Command::Bench {
                which: Bench::Footprint,
                json,
                agent,
                idle_secs,
                load_secs,
                ..
            } => {
                updraft::bench::footprint::run(updraft::bench::footprint::Options {
                    json,
                    agent,
                    idle: std::time::Duration::from_secs(idle_secs),
                    load: std::time::Duration::from_secs(load_secs),
                })
                .await
            }
            Command::Bench {
                which: Bench::Cluster,
                json,
                ..
            } => updraft::bench::cluster::run(json).await,
            Command::BenchFaultsDaemon { config } => {
                updraft::bench::faults::serve_daemon(&config).await
            }
            Command::BenchFaultsAgent { config } => {
                updraft::bench::faults::serve_agent(&config).await
            }
            Command::BenchPlacementCloud { config } => {
                updraft::bench::placement::serve_cloud(&config).await
            }
            Command::BenchPlacementBurn => unreachable!("handled before the runtime starts"),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("updraft: {e:#}");
            ExitCode::FAILURE
        }
    }
}
