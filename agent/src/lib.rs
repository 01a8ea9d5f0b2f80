//! `updraft-agent`: the edge side of Updraft.
//!
//! A request enters at the local API (HTTP on a Unix socket), is placed by the placement
//! seam, runs on the board through the shared executor or crosses QUIC to a daemon, and
//! its result flows back the same way. `docs/ARCHITECTURE.md` maps the modules.
//!
//! The public front is what the `updraft-agent` binary, the demo and the benchmarks
//! need, and nothing else:
//! - [`cli`] and [`config`]: the command line and `agent.toml`, for the binary.
//! - [`client`] with [`ChannelBody`] and the `H_*` header names: a client of the local
//!   API, for programs on the board.
//! - [`Agent`], [`bind_socket`] and [`run`]: an agent in-process (demo, benches).
//! - [`Uplink`] and [`offload`]: one offload without the API around it (the bench's
//!   baseline); [`probe`]: one link probe.
//! - [`fake_power`]: a power_supply tree in the kernel's layout, for boards without one.
#![forbid(unsafe_code)]

mod api;
mod attempt;
pub mod cli;
pub mod client;
pub mod config;
mod detached;
mod doctor;
mod enroll;
mod fleet;
mod http;
mod journal;
mod knowledge;
mod placement;
mod policy_file;
mod probe;
mod serve;
mod service;
mod signals;
mod spool;
mod status;
mod task;
mod uplink;

pub use doctor::run as doctor;
pub use http::{
    header_text_decode, ChannelBody, H_ERROR_CODE, H_EXIT_CODE, H_PLACEMENT, H_REASON,
    H_STDERR_TAIL, H_TASK_ID,
};
pub use placement::Where;
pub use probe::{probe, ProbeError, ProbeSample};
pub use serve::{bind_socket, run};
pub use service::{Agent, StartError};
pub use signals::power::fake as fake_power;
pub use uplink::{offload, LinkStatus, OffloadError, OnDrop, Replay, Uplink};
