//! The daemon's QUIC server: accept loop, per-connection handler (identity, load
//! reports), per-task handler (admit, run, stream back), and drain on shutdown.

use crate::config::DaemonConfig;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use updraft_shared::catalog::{Caller, Catalog};
use updraft_shared::exec::{ExecError, Executor, Outcome};
use updraft_shared::protocol::msg::bounded_message;
use updraft_shared::protocol::{
    ErrorCode, LoadReport, ReplyHeader, RequestHeader, Timings, Trailer, CLOSE_DRAINING,
    CLOSE_PROTOCOL, STOP_INPUT,
};
use updraft_shared::tls::{AuthenticatedPeer, Identity};
use updraft_shared::wire::{write_frame, DataFrameOutput, FrameReader, StreamInput, WireError};

/// How long a new stream may take to deliver its request header. A peer that opens
/// streams and sends nothing must not pin handlers forever.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// QUIC keep-alive from the daemon side; agents usually ping more often.
const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// Builds the quinn server config: mutual TLS from the config's files, transport limits.
pub fn server_config(config: &DaemonConfig) -> anyhow::Result<quinn::ServerConfig> {
    use anyhow::Context;
    let identity = Identity::load(&config.tls_ca, &config.tls_cert, &config.tls_key).context(
        "loading the daemon's TLS files (see [tls] in daemon.toml; `updraftd ca init` makes them)",
    )?;
    server_config_from(&identity, config)
}

/// Like [`server_config`] from identity material already in memory (demo, tests).
pub fn server_config_from(
    identity: &Identity,
    config: &DaemonConfig,
) -> anyhow::Result<quinn::ServerConfig> {
    let mut server = quinn::ServerConfig::with_crypto(identity.quic_server()?);
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(config.max_streams_per_connection.into())
        .max_concurrent_uni_streams(0u32.into())
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_idle_timeout(Some(quinn::IdleTimeout::try_from(config.idle_timeout)?));
    server.transport_config(Arc::new(transport));
    Ok(server)
}

/// Binds the UDP endpoint the daemon serves on.
pub fn bind(config: &DaemonConfig) -> anyhow::Result<quinn::Endpoint> {
    bind_with(server_config(config)?, config.listen)
}

/// Binds an endpoint with a ready server config.
pub fn bind_with(server: quinn::ServerConfig, addr: SocketAddr) -> anyhow::Result<quinn::Endpoint> {
    use anyhow::Context;
    quinn::Endpoint::server(server, addr).with_context(|| format!("cannot listen on UDP {addr}"))
}

/// What every handler shares.
struct Shared {
    catalog: Catalog,
    executor: Executor,
    config: DaemonConfig,
    /// Flips to true once when draining starts.
    draining: watch::Receiver<bool>,
    /// Task streams in flight; drain waits for them.
    tasks: TaskTracker,
}

/// Serves on `endpoint` until `shutdown` resolves, then drains: no new tasks, agents
/// told to go elsewhere, running tasks finished and delivered (up to `drain_timeout`).
pub async fn run(
    config: DaemonConfig,
    endpoint: quinn::Endpoint,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(config.state_dir.join("work")).map_err(|e| {
        anyhow::anyhow!(
            "cannot create {}: {e} (check state_dir in daemon.toml)",
            config.state_dir.join("work").display()
        )
    })?;
    let (drain_tx, draining) = watch::channel(false);
    let shared = Arc::new(Shared {
        catalog: config.catalog.clone(),
        executor: Executor::new(
            config.max_concurrent_tasks,
            config.max_queued_tasks,
            config.state_dir.join("work"),
        ),
        draining,
        tasks: TaskTracker::new(),
        config,
    });
    let connections = TaskTracker::new();
    info!(
        listen = %endpoint.local_addr()?,
        tasks = shared.catalog.names().collect::<Vec<_>>().join(","),
        slots = shared.config.max_concurrent_tasks,
        "updraftd serving"
    );
    updraft_shared::notify::ready();
    updraft_shared::notify::spawn_watchdog();

    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => { connections.spawn(handle_connection(incoming, shared.clone())); }
                None => break,
            },
            () = &mut shutdown => break,
        }
    }

    // Drain.
    updraft_shared::notify::stopping();
    let running = shared.executor.load();
    info!(
        running = running.running,
        queued = running.queued,
        "draining: refusing new tasks, finishing running ones"
    );
    endpoint.set_server_config(None);
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
    endpoint.close(CLOSE_DRAINING.into(), b"draining");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    info!("updraftd stopped");
    Ok(())
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
    let peer = match AuthenticatedPeer::from_connection(&conn) {
        Ok(p) => p,
        Err(e) => {
            warn!(%remote, error = %e, "peer misbehaved: verified certificate names no agent; closing");
            conn.close(CLOSE_PROTOCOL.into(), b"certificate names no agent");
            return;
        }
    };
    let peer = Arc::new(peer);
    info!(%remote, agent = peer.agent_id(), "agent connected");
    let reporter = tokio::spawn(report_load(conn.clone(), shared.clone()));
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                let (shared2, peer) = (shared.clone(), peer.clone());
                shared
                    .tasks
                    .spawn(async move { handle_task(send, recv, &peer, &shared2).await });
            }
            Err(e) => {
                debug!(%remote, agent = peer.agent_id(), error = %e, "connection ended");
                break;
            }
        }
    }
    reporter.abort();
    info!(%remote, agent = peer.agent_id(), "agent disconnected");
}

/// Sends load reports on a unidirectional stream: at once, every interval, and
/// immediately when draining starts.
async fn report_load(conn: quinn::Connection, shared: Arc<Shared>) {
    let Ok(mut send) = conn.open_uni().await else {
        return;
    };
    let mut draining = shared.draining.clone();
    let mut tick = tokio::time::interval(shared.config.load_report_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let load = shared.executor.load();
        let report = LoadReport {
            running: load.running as u32,
            queued: load.queued as u32,
            capacity: load.capacity as u32,
            draining: *draining.borrow(),
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

async fn reject(send: &mut quinn::SendStream, code: ErrorCode, message: String) {
    let message = bounded_message(message);
    let _ = write_frame(send, &ReplyHeader::Rejected { code, message }.to_frame()).await;
    let _ = send.finish();
}

async fn handle_task(
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    peer: &AuthenticatedPeer,
    shared: &Shared,
) {
    let agent = peer.agent_id();
    let mut reader = FrameReader::new(recv);
    let header = match tokio::time::timeout(HEADER_TIMEOUT, reader.next()).await {
        Ok(Ok(Some(frame))) => RequestHeader::from_frame(&frame).map_err(WireError::from),
        Ok(Ok(None)) => return,
        Ok(Err(e)) => Err(e),
        Err(_) => {
            let (mut recv, _) = reader.into_parts();
            let _ = recv.stop(STOP_INPUT.into());
            reject(
                &mut send,
                ErrorCode::BadRequest,
                format!("no request header within {HEADER_TIMEOUT:?}"),
            )
            .await;
            return;
        }
    };
    let header = match header.and_then(|h| {
        h.validate()
            .map(|()| h)
            .map_err(|reason| WireError::Io(std::io::Error::other(reason)))
    }) {
        Ok(h) => h,
        Err(e) => {
            warn!(agent, error = %e, "peer misbehaved: bad request header; task refused");
            let (mut recv, _) = reader.into_parts();
            let _ = recv.stop(STOP_INPUT.into());
            reject(
                &mut send,
                ErrorCode::BadRequest,
                format!("bad request header: {e}"),
            )
            .await;
            return;
        }
    };
    let (recv, leftover) = reader.into_parts();
    let mut input = StreamInput::new(leftover, recv);
    let id = header.id.as_str();
    if *shared.draining.borrow() {
        input.stop(STOP_INPUT);
        reject(
            &mut send,
            ErrorCode::Draining,
            "daemon is draining; run the task elsewhere".into(),
        )
        .await;
        return;
    }
    let task = match shared.catalog.admit(
        &header.task,
        header.args,
        header.input_len,
        Caller::Agent(peer),
    ) {
        Ok(t) => t,
        Err(refusal) => {
            info!(agent, task = header.task, id, code = %refusal.code, "task refused: {}", refusal.message);
            input.stop(STOP_INPUT);
            reject(&mut send, refusal.code, refusal.message).await;
            return;
        }
    };
    let reservation = match shared.executor.reserve() {
        Ok(r) => r,
        Err(e) => {
            input.stop(STOP_INPUT);
            reject(&mut send, e.code(), e.to_string()).await;
            return;
        }
    };
    if write_frame(&mut send, &ReplyHeader::Accepted.to_frame())
        .await
        .is_err()
    {
        return;
    }
    let slot = reservation.slot().await;
    debug!(agent, task = header.task, id, "task started");
    let result = shared
        .executor
        .run_in_slot(&slot, &task, &mut input, DataFrameOutput::new(&mut send))
        .await;
    drop(slot);
    let trailer = match result {
        Ok(outcome) => trailer_of(&outcome),
        Err(e) => {
            if matches!(e, ExecError::TooLarge { .. }) {
                input.stop(STOP_INPUT);
            }
            if matches!(e, ExecError::Output(_)) {
                info!(agent, task = header.task, id, error = %e, "agent went away mid-task");
                return;
            }
            info!(agent, task = header.task, id, error = %e, "task failed");
            Trailer {
                error: Some(e.code()),
                message: bounded_message(format!("task `{}`: {e}", header.task)),
                ..Default::default()
            }
        }
    };
    debug!(agent, task = header.task, id, exit_code = ?trailer.exit_code, "task finished");
    if write_frame(&mut send, &trailer.to_frame()).await.is_ok() {
        let _ = send.finish();
        // Keep the stream until the agent has everything: dropping it early could
        // cut the trailer off when the connection closes during drain.
        let _ = send.stopped().await;
    }
}

fn trailer_of(o: &Outcome) -> Trailer {
    Trailer {
        exit_code: Some(o.exit_code),
        error: None,
        message: String::new(),
        stderr_tail: bounded_message(String::from_utf8_lossy(&o.stderr_tail).into_owned()),
        input_bytes: o.input_bytes,
        output_bytes: o.output_bytes,
        timings: Timings {
            queue_us: o.queue_time.as_micros() as u64,
            run_us: o.run_time.as_micros() as u64,
        },
    }
}
