//! A userspace link emulator for Updraft's tests and benchmarks.
//!
//! This machine's kernel has no `tc netem`, so the agent ↔ daemon link is emulated in
//! userspace: a UDP [`Relay`] sits between a client (the agent) and an upstream server
//! (the daemon) and applies, independently per direction, a one-way delay, jitter,
//! random loss, a bandwidth cap with a drop-tail queue, and a blackhole switch. Every
//! setting can be changed while traffic flows (through a cloneable [`RelayHandle`]), and
//! the random decisions are seeded so a run can be repeated.
//!
//! Each client source address gets its own upstream socket, like a NAT, so the server
//! sees one peer per client, and a client that rebinds shows up as a new peer — which is
//! what QUIC connection migration looks like behind a real NAT.
//!
//! Only loopback addresses are accepted unless the caller explicitly allows others
//! ([`RelayOptions::allow_non_loopback`]), and that is meant only for addresses inside
//! network namespaces the project made itself: this tool must never aim traffic at
//! anything else.
//!
//! Layout: [`params`] holds the settings and their text forms, [`link`] is the sans-IO
//! timing/loss model, [`relay`] does the socket work, and [`command`] parses the control
//! lines the `linkem` binary reads on stdin.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use std::time::Duration;
//! use updraft_linkem::{LinkParams, Relay};
//!
//! let upstream = "127.0.0.1:4433".parse().unwrap();
//! let params = LinkParams { delay: Duration::from_millis(50), loss: 0.01, ..LinkParams::default() };
//! let relay = Relay::start("127.0.0.1:0".parse().unwrap(), upstream, params, 1)?;
//! // point the agent at relay.local_addr() ...
//! relay.handle().set_blackhole(true);
//! println!("{}", serde_json::to_string(&relay.stats()).unwrap());
//! relay.shutdown().await;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod command;
pub mod link;
pub mod params;
pub mod relay;

pub use command::{Change, Command, CommandError, Reply, COMMAND_HELP};
pub use link::{Link, Verdict};
pub use params::{is_loopback, LinkParams, ParamsError};
pub use relay::{
    Direction, DirectionStats, Relay, RelayHandle, RelayOptions, Stats, Which,
    DEFAULT_IDLE_TIMEOUT, DEFAULT_MAPPING_LIMIT,
};
