//! The daemon's QUIC server configuration (mutual TLS and transport limits), built at
//! start and again on SIGHUP.

use crate::config::DaemonConfig;
use std::sync::Arc;
use std::time::Duration;
use updraft_shared::tls::{Identity, TlsError};

/// QUIC keep-alive from the daemon side: well inside the default `idle_timeout` (30s)
/// and common NAT UDP timeouts (30s and up), so a quiet agent's connection stays up;
/// agents usually ping more often.
const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// Why a QUIC server configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum QuicConfigError {
    /// The TLS identity did not make a rustls server configuration.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// `idle_timeout` is longer than QUIC can carry.
    #[error(transparent)]
    IdleTimeout(#[from] quinn::VarIntBoundsExceeded),
}

/// The QUIC server config from identity material already loaded: mutual TLS, and the
/// transport limits of `config`.
pub(crate) fn server_config_from(
    identity: &Identity,
    config: &DaemonConfig,
) -> Result<quinn::ServerConfig, QuicConfigError> {
    let mut server = quinn::ServerConfig::with_crypto(identity.quic_server()?);
    let mut transport = quinn::TransportConfig::default();
    transport
        // One more than the limit: the agent's fleet stream lasts as long as the
        // connection and must not take a task's place.
        .max_concurrent_bidi_streams((config.max_streams_per_connection + 1).into())
        .max_concurrent_uni_streams(0u32.into())
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_idle_timeout(Some(quinn::IdleTimeout::try_from(config.idle_timeout)?));
    server.transport_config(Arc::new(transport));
    // Behind a plain 4-tuple balancer, an agent's new address may reach another
    // replica, so address changes are refused (the agent reconnects and retries,
    // deduplicated); a balancer that routes by connection id lets them through.
    if let Some(cluster) = &config.cluster {
        server.migration(cluster.route_by_cid);
    }
    Ok(server)
}
