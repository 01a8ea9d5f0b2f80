//! `updraft`: the demo and the benchmark suite.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand, ValueEnum};
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
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Bench {
    /// Offload latency and throughput against a raw quinn stream baseline.
    Offload,
    /// Placement quality (not built yet).
    Placement,
    /// Delivery under faults (not built yet).
    Faults,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
            } => updraft::bench::offload::run(json).await,
            Command::Bench { which, .. } => {
                anyhow::bail!("`updraft bench {which:?}` is not built yet; only `offload` exists")
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
