//! `updraft-daemon`: the cloud side of Updraft.
//!
//! The public front is what the `updraftd` binary, the demo and the benchmarks need:
//! - [`cli`] and [`config`]: the command line and `daemon.toml`.
//! - [`pki`]: `ca init`, `cert issue`, and the CA files enrollment signs with.
//! - [`bind`], [`bind_with`], [`server_config`] and [`run`]: a daemon on an endpoint,
//!   until a shutdown future resolves (then it drains).
//! - [`Tokens`] and [`TokenStore`] (`token create`; in cluster mode the shared store)
//!   and [`Issued`] (`cert issue` records what it signed).
//!
//! Inside: `server` (accept, connections, load reports, drain), `stream` (a stream's
//! first frame decides its handler), `task` (one task stream: header, recent ids,
//! admission, run, settle), `state` (what handlers share), `recent` (recent task ids,
//! pure), `enroll` and `issued` (tokens, certificates issued), `probe` (link probes),
//! `reload` (SIGHUP), `quic` (the QUIC server configuration). `docs/ARCHITECTURE.md` maps them.
#![forbid(unsafe_code)]

mod admin;
pub mod admin_client;
pub mod cli;
mod cluster;
pub mod config;
mod enroll;
mod fleet;
mod issued;
pub mod pki;
mod probe;
mod quic;
mod quic_lb;
mod recent;
mod reload;
mod server;
mod state;
mod stream;
mod task;

pub use admin::AdminError;
pub use enroll::{Created, TokenError, TokenInfo, TokenSpec, TokenStore, Tokens, MAX_TOKEN_USES};
pub use issued::{Issued, IssuedCert, IssuedError};
pub use quic::QuicConfigError;
pub use server::{bind, bind_with, run, server_config, ServerError};
