//! `updraft-shared`: everything the agent and the daemon agree on.
//!
//! - [`protocol`]: the sans-IO wire format (frames, headers, trailers, load reports).
//! - [`wire`]: the thin async adapter that reads those frames off a QUIC stream.
//! - [`catalog`]: task specs from config, validated; the only place an
//!   [`catalog::AdmittedTask`] can be built.
//! - [`exec`]: the executor both sides use to run an admitted task; [`contain`]: how
//!   everything a task starts is found and killed when it ends.
//! - [`config`]: layered loading (TOML file + environment) and [`config::ConfigError`].
//! - [`tls`]: rustls/quinn configs for mutual TLS and [`tls::AuthenticatedPeer`].
//! - [`notify`]: systemd READY / STOPPING / WATCHDOG.
//! - [`metrics`]: Prometheus text: per-task counters and latency histograms.
//! - [`probe`]: the link probe's byte budget and payload timing (pure).
//! - [`policy`]: the policy file, its evaluator and the cost model (pure).
//! - [`files`]: crash-safe writes of certificates, keys and tokens.
//! - [`logging`], [`signals`]: service plumbing.
//! - [`units`]: human-readable durations and sizes in config files.
#![forbid(unsafe_code)]

pub mod catalog;
pub mod config;
pub mod contain;
pub mod exec;
pub mod files;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod policy;
pub mod probe;
pub mod protocol;
pub mod signals;
pub mod tls;
pub mod units;
pub mod wire;
