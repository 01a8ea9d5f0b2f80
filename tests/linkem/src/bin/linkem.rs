//! `linkem`: run the link emulator between a client and a server, and change it while it
//! runs through commands on stdin. Only wiring lives here; see the `updraft_linkem`
//! library for the relay and the command language.

use anyhow::Context;
use clap::Parser;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use updraft_linkem::params::{parse_bandwidth, parse_duration, parse_loss, parse_size};
use updraft_linkem::{is_loopback, Command, LinkParams, Relay, RelayOptions, Reply, COMMAND_HELP};

/// sysexits' EX_USAGE, for addresses this tool refuses.
const EXIT_USAGE: u8 = 64;

/// A bandwidth flag's value: bits per second, or `None` for no cap.
#[derive(Clone, Copy, Debug)]
struct Rate(Option<u64>);

fn parse_rate(s: &str) -> Result<Rate, updraft_linkem::ParamsError> {
    parse_bandwidth(s).map(Rate)
}

/// Userspace UDP link emulator: relays datagrams between clients and one upstream server,
/// adding delay, jitter, loss, a bandwidth cap and blackholing, seeded and changeable
/// while running.
///
/// Only loopback addresses (127.0.0.0/8, ::1) are accepted for --listen and --upstream:
/// this is a test tool, and the traffic it generates must never reach a machine or
/// network that is not ours. --allow-non-loopback lifts that for addresses inside network
/// namespaces the project created itself, and for nothing else.
///
/// On start it prints `listening ADDR upstream ADDR`; then each stdin command gets one
/// reply line on stdout (`ok`, JSON, or `error: ...`). End of stdin does not stop it;
/// `quit`, Ctrl-C or SIGTERM do.
#[derive(Parser, Debug)]
#[command(name = "linkem", version, after_help = COMMAND_HELP)]
struct Args {
    /// Client-facing address to listen on (port 0 picks one; it is printed).
    #[arg(long)]
    listen: SocketAddr,
    /// Server to relay to.
    #[arg(long)]
    upstream: SocketAddr,
    /// One-way delay, each direction (e.g. 100ms).
    #[arg(long, value_parser = parse_duration, default_value = "0")]
    delay: Duration,
    /// Uniform +/- jitter on the delay.
    #[arg(long, value_parser = parse_duration, default_value = "0")]
    jitter: Duration,
    /// Random loss per datagram, each direction (0.05 or 5%).
    #[arg(long, value_parser = parse_loss, default_value = "0")]
    loss: f64,
    /// Bandwidth cap per direction (e.g. 10mbit, 500kbit; `off` for none).
    #[arg(long, value_parser = parse_rate, default_value = "off")]
    bandwidth: Rate,
    /// Cap for client -> upstream only, overriding --bandwidth.
    #[arg(long, value_parser = parse_rate)]
    up_bandwidth: Option<Rate>,
    /// Cap for upstream -> client only, overriding --bandwidth.
    #[arg(long, value_parser = parse_rate)]
    down_bandwidth: Option<Rate>,
    /// Drop-tail queue in front of the bandwidth cap.
    #[arg(long, value_parser = parse_size, default_value = "256KiB")]
    queue: usize,
    /// Let jitter reorder datagrams (off: arrivals keep sending order).
    #[arg(long)]
    reorder: bool,
    /// Start blackholed (drop everything until `blackhole off`).
    #[arg(long)]
    blackhole: bool,
    /// Seed for loss and jitter decisions.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Forget a client mapping after this long without traffic.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    idle_timeout: Duration,
    /// Accept non-loopback addresses. Only for addresses inside the project's own
    /// network namespaces: never aim this tool at any other host.
    #[arg(long)]
    allow_non_loopback: bool,
}

impl Args {
    fn options(&self) -> RelayOptions {
        let both = LinkParams {
            delay: self.delay,
            jitter: self.jitter,
            loss: self.loss,
            bandwidth_bps: self.bandwidth.0,
            blackhole: self.blackhole,
            queue_limit_bytes: self.queue,
            reorder: self.reorder,
        };
        let mut options = RelayOptions::new(self.listen, self.upstream);
        let up = self.up_bandwidth.unwrap_or(self.bandwidth);
        let down = self.down_bandwidth.unwrap_or(self.bandwidth);
        options.up = LinkParams {
            bandwidth_bps: up.0,
            ..both
        };
        options.down = LinkParams {
            bandwidth_bps: down.0,
            ..both
        };
        options.seed = self.seed;
        options.idle_timeout = self.idle_timeout;
        options.allow_non_loopback = self.allow_non_loopback;
        options
    }
}

fn main() -> ExitCode {
    {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        // RUST_LOG as `level` or `level,target=level,...`; warnings by default.
        let filter = std::env::var("RUST_LOG")
            .ok()
            .and_then(|v| v.parse::<tracing_subscriber::filter::Targets>().ok())
            .unwrap_or_else(|| {
                tracing_subscriber::filter::Targets::new().with_default(tracing::Level::WARN)
            });
        tracing_subscriber::registry()
            .with(filter)
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .init();
    }
    let args = Args::parse();
    if !args.allow_non_loopback {
        for (flag, addr) in [("--listen", args.listen), ("--upstream", args.upstream)] {
            if !is_loopback(&addr) {
                eprintln!(
                    "linkem: refusing {flag} {addr}: not a loopback address (127.0.0.0/8, ::1); \
                     use --allow-non-loopback only for the project's own network namespaces"
                );
                return ExitCode::from(EXIT_USAGE);
            }
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("linkem: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args.options())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("linkem: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(options: RelayOptions) -> anyhow::Result<()> {
    let upstream = options.upstream;
    let relay = Relay::start_with(options).context("cannot start the relay")?;
    println!("listening {} upstream {}", relay.local_addr(), upstream);
    let handle = relay.handle();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot watch SIGTERM")?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
            line = lines.next_line(), if stdin_open => match line {
                Ok(Some(line)) => {
                    let reply = Command::parse(&line)
                        .map_err(|e| e.to_string())
                        .and_then(|c| match c {
                            Some(c) => c.execute(&handle).map(Some).map_err(|e| e.to_string()),
                            None => Ok(None),
                        });
                    match reply {
                        Ok(Some(Reply::Print(text))) => println!("{text}"),
                        Ok(Some(Reply::Quit)) => break,
                        Ok(None) => {}
                        Err(e) => println!("error: {e}"),
                    }
                }
                // End of input (e.g. started in the background): keep relaying.
                Ok(None) => stdin_open = false,
                Err(e) => {
                    tracing::warn!(error = %e, "stdin unreadable; commands disabled");
                    stdin_open = false;
                }
            },
        }
    }
    relay.shutdown().await;
    Ok(())
}
