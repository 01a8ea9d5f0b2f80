//! `updraft-daemon`: the cloud side of Updraft.
//!
//! - [`config`]: `daemon.toml`, validated into [`config::DaemonConfig`].
//! - [`server`]: the QUIC accept loop, per-connection and per-task handlers, drain.
//! - [`pki`]: `ca init` and `cert issue`.
//! - [`cli`]: the `updraftd` command line.
#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod pki;
pub mod server;
