//! `updraft-shared`: the IO both services need. The pure core they agree on (wire
//! format, task specs, placement policy and cost model, probe budget, units) is the crate
//! below this one, `updraft-proto`.
//!
//! - [`wire`]: the thin async adapter that reads those frames off a QUIC stream.
//! - [`catalog`]: task specs from config, validated; the only place an
//!   [`catalog::AdmittedTask`] can be built.
//! - [`exec`]: the executor both sides use to run an admitted task; [`contain`]: how
//!   everything a task starts is found and killed when it ends.
//! - [`config`]: layered loading (TOML file + environment) and [`config::ConfigError`].
//! - [`tls`]: rustls/quinn configs for mutual TLS and [`tls::AuthenticatedPeer`];
//!   [`x509`]: the certificate fields they read.
//! - [`notify`]: systemd READY / STOPPING / WATCHDOG.
//! - [`metrics`]: Prometheus text: per-task counters and latency histograms;
//!   [`metrics_http`]: serving it on a TCP `metrics_listen`.
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
pub mod metrics_http;
pub mod notify;
pub mod shutdown;
pub mod tls;
pub mod wire;
pub mod x509;
