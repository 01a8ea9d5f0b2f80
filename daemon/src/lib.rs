//! `updraft-daemon`: the cloud side of Updraft.
//!
//! - [`config`]: `daemon.toml`, validated into [`config::DaemonConfig`].
//! - [`server`]: binding, the QUIC accept loop, agent connections, load reports, drain.
//! - `state`: what every handler of one daemon shares.
//! - `stream`: each stream an agent opens, dispatched on its first frame.
//! - `task`: one task stream: header, recent ids, admission, run, settle.
//! - [`recent`]: the memory of recent task ids that answers retries with the first result.
//! - [`metrics`]: the Prometheus `/metrics` endpoint on `metrics_listen`.
//! - [`probe`]: link probes: an agent's small timed transfers, bounded per connection.
//! - [`pki`]: `ca init`, `cert issue`, and signing agents' certificate requests.
//! - [`enroll`]: one-time tokens, enrollment and renewal of agent certificates.
//! - [`issued`]: the certificates issued per agent id, and the revoked ones.
//! - [`reload`]: SIGHUP reloads the catalog and the TLS files.
//! - [`cli`]: the `updraftd` command line.
#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod enroll;
pub mod issued;
pub mod metrics;
pub mod pki;
pub mod probe;
pub mod recent;
pub mod reload;
pub mod server;
pub(crate) mod state;
pub(crate) mod stream;
pub(crate) mod task;
