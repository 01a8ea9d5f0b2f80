//! `updraft`: the demo and the benchmark suite.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

/// Updraft demo and benchmarks.
#[derive(Debug, Parser)]
#[command(name = "updraft", version, about)]
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
    /// Offload latency and throughput against a raw quinn stream baseline.
    Offload,
    /// Auto placement against always-local, always-cloud and a hindsight oracle, under
    /// changing board CPU and link conditions; plus the cost of one decision.
    Placement,
    /// Delivery under faults (not built yet).
    Faults,
}

fn main() -> ExitCode {
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
                ..
            } => updraft::bench::offload::run(json).await,
            Command::Bench {
                which: Bench::Placement,
                json,
                scenarios,
                trace,
            } => {
                updraft::bench::placement::run(updraft::bench::placement::Options {
                    json,
                    scenarios,
                    trace,
                })
                .await
            }
            Command::BenchPlacementCloud { config } => {
                updraft::bench::placement::serve_cloud(&config).await
            }
            Command::BenchPlacementBurn => unreachable!("handled before the runtime starts"),
            Command::Bench { which, .. } => {
                anyhow::bail!("`updraft bench {which:?}` is not built yet")
            }
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
