//! `updraft-agent`: the edge side of Updraft.
//!
//! A request enters at [`api`] (HTTP on a Unix socket), is placed by [`placement`],
//! runs on the board through the shared executor or crosses QUIC through [`uplink`]
//! to a daemon, and its result flows back the same way. [`service`] holds the parts
//! and performs what [`attempt`] decides after a failed offload; [`task`] is what a
//! submitter sees. [`detached`] runs tasks through the journal, [`status`] renders
//! `status` and `/metrics`, [`serve`] runs the background loops and owns shutdown;
//! [`client`] and [`cli`] are the command-line side of the socket.
//! [`probe`] measures the link with small timed transfers.
//! [`enroll`] joins a daemon with a one-time token and keeps the certificate renewed.
#![forbid(unsafe_code)]

pub mod api;
pub mod attempt;
pub mod cli;
pub mod client;
pub mod config;
pub mod detached;
pub mod enroll;
pub mod http;
pub mod journal;
pub mod knowledge;
pub mod placement;
pub mod policy;
pub mod probe;
pub mod serve;
pub mod service;
pub mod signals;
pub mod spool;
pub mod status;
pub mod task;
pub mod uplink;
