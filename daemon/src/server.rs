//! The daemon's QUIC server: binding, the accept loop, each agent connection (its
//! identity, its load reports, its streams handed to [`crate::stream`]), and the drain
//! on shutdown.

use crate::config::DaemonConfig;
use crate::issued::Revocation;
use crate::state::Shared;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use updraft_proto::{LoadReport, CLOSE_DRAINING, CLOSE_PROTOCOL, CLOSE_REVOKED, ENROLL_ALPN};
use updraft_shared::config::ConfigError;
use updraft_shared::tls::AuthenticatedPeer;
use updraft_shared::wire::write_frame;

/// How long the closed endpoint may take to tell agents so (CONNECTION_CLOSE) before
/// the daemon exits: a few round trips, lost packets included.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the daemon could not be set up to serve, or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The TLS files named in the config did not load.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The TLS identity and transport limits did not make a QUIC server configuration.
    #[error(transparent)]
    Quic(#[from] crate::quic::QuicConfigError),
    /// The UDP address could not be bound.
    #[error("cannot listen on UDP {addr}")]
    Listen {
        /// The address in the config.
        addr: SocketAddr,
        /// Why the bind failed.
        #[source]
        source: io::Error,
    },
    /// The directory tasks work in could not be prepared.
    #[error("cannot prepare {}: {error} (check state_dir in daemon.toml)", dir.display())]
    WorkDir {
        /// `state_dir/work`.
        dir: PathBuf,
        /// The failure.
        error: io::Error,
    },
    /// `/metrics` could not be served.
    #[error(transparent)]
    Metrics(#[from] updraft_shared::metrics_http::MetricsError),
    /// The admin socket could not be served.
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
    /// The endpoint has no local address.
    #[error(transparent)]
    LocalAddr(io::Error),
    /// Cluster mode could not reach or set up its NATS JetStream store.
    #[error("[cluster]: {0}")]
    Cluster(String),
    /// SIGHUP could not be caught.
    #[error("cannot install the SIGHUP handler: {0}")]
    Hangup(io::Error),
}

/// Builds the quinn server config: mutual TLS from the config's files, transport limits.
pub fn server_config(config: &DaemonConfig) -> Result<quinn::ServerConfig, ServerError> {
    Ok(crate::quic::server_config_from(
        &config.load_identity()?,
        config,
    )?)
}

/// Binds the UDP endpoint the daemon serves on.
pub fn bind(config: &DaemonConfig) -> Result<quinn::Endpoint, ServerError> {
    bind_with(server_config(config)?, config)
}

/// Binds an endpoint with a ready server config on `config.listen`. In cluster mode
/// its connection ids carry `[cluster] server_id` (QUIC-LB) and its stateless resets
/// use the key in `STATE_DIR/reset.key`, kept across restarts.
pub fn bind_with(
    server: quinn::ServerConfig,
    config: &DaemonConfig,
) -> Result<quinn::Endpoint, ServerError> {
    let addr = config.listen;
    let Some(cluster) = &config.cluster else {
        return quinn::Endpoint::server(server, addr)
            .map_err(|source| ServerError::Listen { addr, source });
    };
    std::fs::create_dir_all(&config.state_dir).map_err(|error| ServerError::WorkDir {
        dir: config.state_dir.clone(),
        error,
    })?;
    let key = crate::quic_lb::reset_key(&config.state_dir.join(RESET_KEY_NAME))
        .map_err(|e| ServerError::Cluster(e.to_string()))?;
    let endpoint_config = crate::quic_lb::endpoint_config(cluster.server_id, key);
    let socket =
        std::net::UdpSocket::bind(addr).map_err(|source| ServerError::Listen { addr, source })?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| ServerError::Cluster("no async runtime to serve QUIC on".into()))?;
    quinn::Endpoint::new(endpoint_config, Some(server), socket, runtime)
        .map_err(|source| ServerError::Listen { addr, source })
}

/// The stateless-reset key's file name in the state directory (cluster mode).
pub(crate) const RESET_KEY_NAME: &str = "reset.key";

/// Serves on `endpoint` until `shutdown` resolves, then drains: no new tasks, agents
/// told to go elsewhere, running tasks finished and delivered (up to `drain_timeout`).
pub async fn run(
    config: DaemonConfig,
    endpoint: quinn::Endpoint,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let work = config.state_dir.join("work");
    let swept =
        updraft_shared::exec::sweep_work_root(&work).map_err(|error| ServerError::WorkDir {
            dir: work.clone(),
            error,
        })?;
    if swept > 0 {
        info!(dir = %work.display(), "removed {swept} task working directories left by an earlier run");
    }
    let (drain_tx, draining) = watch::channel(false);
    let cluster = match &config.cluster {
        Some(_) => Some(Arc::new(
            crate::cluster::Cluster::connect(&config)
                .await
                .map_err(|e| ServerError::Cluster(e.to_string()))?,
        )),
        None => None,
    };
    let mut shared = Shared::new(config, work, draining);
    shared.cluster = cluster;
    let shared = Arc::new(shared);
    if let Some(cluster) = &shared.cluster {
        crate::cluster::fleet::start(&shared, cluster);
    }
    crate::cluster::worker::start(shared.clone())
        .await
        .map_err(|e| ServerError::Cluster(e.to_string()))?;
    let _metrics = match shared.config.metrics_listen {
        Some(addr) => {
            let s = shared.clone();
            Some(
                updraft_shared::metrics_http::serve(
                    addr,
                    "daemon.toml",
                    Arc::new(move || s.metrics_text()),
                )
                .await?,
            )
        }
        None => None,
    };
    let _admin = crate::admin::serve(&shared.config.admin_socket, shared.clone()).await?;
    let _rollouts = tokio::spawn(advance_rollouts(shared.clone()));
    let listen = endpoint.local_addr().map_err(ServerError::LocalAddr)?;
    let tasks = shared.catalog().names().collect::<Vec<_>>().join(",");
    let slots = shared.config.max_concurrent_tasks;
    info!(%listen, tasks, slots, "updraftd serving");
    updraft_shared::notify::ready(&format!(
        "serving on {listen}: tasks {tasks}; {slots} run at once"
    ));
    updraft_shared::notify::spawn_watchdog();

    // Connections are accepted until the end of the drain, so that one arriving while
    // draining is told so (see `handle_connection`) instead of getting no answer.
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(ServerError::Hangup)?;
    let mut accepting = tokio::spawn(accept_connections(endpoint.clone(), shared.clone(), hangup));
    tokio::select! {
        _ = &mut accepting => {}
        () = shutdown => {}
    }

    // Drain.
    let running = shared.executor.load();
    updraft_shared::notify::stopping(&format!(
        "draining: finishing {} running and {} queued tasks",
        running.running, running.queued
    ));
    info!(
        running = running.running,
        queued = running.queued,
        "draining: refusing new tasks, finishing running ones"
    );
    let _ = drain_tx.send(true);
    shared.tasks.close();
    if tokio::time::timeout(shared.config.drain_timeout, shared.tasks.wait())
        .await
        .is_err()
    {
        warn!(
            timeout = ?shared.config.drain_timeout,
            "drain timeout passed with tasks still running; closing anyway (raise drain_timeout to wait longer)"
        );
    }
    accepting.abort();
    endpoint.close(CLOSE_DRAINING.into(), b"draining");
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, endpoint.wait_idle()).await;
    info!("updraftd stopped");
    Ok(())
}

/// Hands each new connection to [`handle_connection`] until the endpoint closes.
/// Accepts connections, and reloads the configuration on SIGHUP, until the endpoint
/// closes.
async fn accept_connections(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    mut hangup: tokio::signal::unix::Signal,
) {
    let connections = TaskTracker::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => { connections.spawn(handle_connection(incoming, shared.clone())); }
                None => break,
            },
            _ = hangup.recv() => shared.reload(&endpoint),
        }
    }
}

async fn handle_connection(incoming: quinn::Incoming, shared: Arc<Shared>) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            // Wrong CA, no certificate, expired certificate, wrong ALPN: all end here.
            info!(%remote, error = %e, "handshake refused");
            return;
        }
    };
    if shared.is_draining() {
        // Told at once, with the code that means "go elsewhere", rather than left to
        // time out; the handshake is the price of a clear answer.
        debug!(%remote, "closed a new connection: draining");
        conn.close(CLOSE_DRAINING.into(), b"draining");
        return;
    }
    if updraft_shared::tls::alpn_of(&conn).as_deref() == Some(ENROLL_ALPN) {
        crate::enroll::serve_connection(conn, shared.enroller(), &shared).await;
        return;
    }
    let peer = match AuthenticatedPeer::from_connection(&conn) {
        Ok(p) => p,
        Err(e) => {
            // Only enrollment connections may come without a certificate.
            info!(%remote, error = %e, "refused a task connection without a valid agent certificate (enroll the agent first)");
            conn.close(
                CLOSE_PROTOCOL.into(),
                b"a client certificate naming the agent is required; enroll first",
            );
            return;
        }
    };
    if let Some(why) = shared.enroller().revocation(peer.serial()) {
        let message = crate::enroll::revoked_message(why, peer.agent_id());
        warn!(%remote, agent = peer.agent_id(), serial = peer.serial(), "refused a revoked certificate: {message}");
        let code = match why {
            Revocation::Replaced => CLOSE_PROTOCOL,
            Revocation::Operator => CLOSE_REVOKED,
        };
        conn.close(code.into(), message.as_bytes());
        return;
    }
    let peer = Arc::new(peer);
    info!(%remote, agent = peer.agent_id(), "agent connected");
    shared.fleet.connected(&peer, &conn);
    shared.connections.fetch_add(1, Ordering::Relaxed);
    let reporter = tokio::spawn(report_load(conn.clone(), shared.clone()));
    let probes = Arc::new(crate::probe::ProbeGate::new(
        shared.config.probe_budget,
        Instant::now(),
    ));
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                let (shared2, peer, probes) = (shared.clone(), peer.clone(), probes.clone());
                let conn_id = conn.stable_id();
                shared.tasks.spawn(async move {
                    crate::stream::serve(send, recv, &peer, conn_id, &shared2, &probes).await
                });
            }
            Err(e) => {
                debug!(%remote, agent = peer.agent_id(), error = %e, "connection ended");
                break;
            }
        }
    }
    reporter.abort();
    shared.fleet.disconnected(peer.agent_id(), conn.stable_id());
    shared.connections.fetch_sub(1, Ordering::Relaxed);
    info!(%remote, agent = peer.agent_id(), "agent disconnected");
}

/// How often a policy rollout's canary window is looked at besides the agents' reports.
const ROLLOUT_TICK: Duration = Duration::from_secs(1);

/// Moves policy rollouts on when no report comes (a canary window that ended quietly).
async fn advance_rollouts(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(ROLLOUT_TICK);
    loop {
        tick.tick().await;
        shared.fleet.advance_canary();
    }
}

/// Sends load reports on a unidirectional stream: at once, every interval, and
/// immediately when draining starts.
async fn report_load(conn: quinn::Connection, shared: Arc<Shared>) {
    let Ok(mut send) = conn.open_uni().await else {
        return;
    };
    let mut draining = shared.draining.clone();
    // The report at connect is the loop's first; the next is one interval later
    // (`interval` alone would tick at once and send two back to back).
    let period = shared.config.load_report_interval;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let load = shared.executor.load();
        let report = LoadReport {
            running: load.running as u32,
            queued: load.queued as u32,
            capacity: load.capacity as u32,
            draining: *draining.borrow(),
            uploading: load.uploading as u32,
        };
        if write_frame(&mut send, &report.to_frame()).await.is_err() {
            return;
        }
        tokio::select! {
            _ = tick.tick() => {}
            r = draining.changed() => if r.is_err() { return },
        }
    }
}
