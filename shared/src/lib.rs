//! `updraft-shared`: everything the agent and the daemon agree on.
//!
//! - [`protocol`], [`policy`], [`probe`], [`units`]: re-exports of the pure core in
//!   `updraft-proto` (wire format, placement policy and cost model, probe budget, units).
//! - [`wire`]: the thin async adapter that reads those frames off a QUIC stream.
//! - [`catalog`]: task specs from config, validated; the only place an
//!   [`catalog::AdmittedTask`] can be built.
//! - [`exec`]: the executor both sides use to run an admitted task; [`contain`]: how
//!   everything a task starts is found and killed when it ends.
//! - [`config`]: layered loading (TOML file + environment) and [`config::ConfigError`].
//! - [`tls`]: rustls/quinn configs for mutual TLS and [`tls::AuthenticatedPeer`].
//! - [`notify`]: systemd READY / STOPPING / WATCHDOG.
//! - [`metrics`]: Prometheus text: per-task counters and latency histograms.
//! - [`files`]: crash-safe writes of certificates, keys and tokens.
//! - [`accept`]: the accept loop both services' stream listeners share.
//! - [`logging`], [`shutdown`] (SIGTERM/SIGINT): service plumbing.
#![forbid(unsafe_code)]

pub mod accept;
pub mod catalog;
pub mod config;
pub mod contain;
pub mod exec;
pub mod files;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod shutdown;
pub mod tls;
pub mod wire;

// The pure core lives in `updraft-proto`; these paths keep callers that name it through
// this crate compiling.
pub use updraft_proto as protocol;
pub use updraft_proto::{policy, probe, units};
