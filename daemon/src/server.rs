//! The daemon's QUIC server: accept loop, per-connection handler (identity, load
//! reports), per-task handler (admit, run, stream back), and drain on shutdown.
//!
//! A task id the agent retries is answered from [`crate::recent`] when it can: a kept
//! result is sent again, a run in progress is joined, and a first run whose agent went
//! away after sending all its input keeps running so the retry can collect it.

use crate::config::DaemonConfig;
use crate::recent::{Claim, Lookup, Recent, Record, Settled, TaskKey};
use bytes::Bytes;
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use updraft_shared::catalog::AdmittedTask;
use updraft_shared::catalog::{Caller, Catalog};
use updraft_shared::exec::{ExecError, Executor, Input, Outcome, Output, Reservation};
use updraft_shared::metrics::{self, TaskStats};
use updraft_shared::protocol::msg::{bounded_message, bounded_tail};
use updraft_shared::protocol::{
    CertRequest, ErrorCode, FrameKind, LoadReport, ReplyHeader, RequestHeader, Timings, Trailer,
    CLOSE_DRAINING, CLOSE_PROTOCOL, ENROLL_ALPN, STOP_CANCELLED, STOP_INPUT,
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
    server_config_from(&config.load_identity()?, config)
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
    /// The task catalog; SIGHUP swaps in a new one.
    catalog: RwLock<Arc<Catalog>>,
    executor: Executor,
    config: DaemonConfig,
    /// Flips to true once when draining starts.
    draining: watch::Receiver<bool>,
    /// Task streams in flight; drain waits for them.
    tasks: TaskTracker,
    /// Recent task ids and their results, for retries.
    recent: Arc<Recent>,
    /// Finished tasks by task and outcome, with latency histograms.
    stats: TaskStats,
    /// Agent connections open now.
    connections: AtomicU64,
    /// Issues certificates at enrollment and renewal; SIGHUP swaps in a new one.
    enroller: RwLock<Arc<crate::enroll::Enroller>>,
    /// The configuration and TLS files SIGHUP last applied (`config` is the
    /// configuration the daemon started with).
    live: std::sync::Mutex<(DaemonConfig, Option<Identity>)>,
    /// Held inputs each agent is sending now.
    uploads: Uploads,
}

impl Shared {
    fn catalog(&self) -> Arc<Catalog> {
        self.catalog
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn enroller(&self) -> Arc<crate::enroll::Enroller> {
        self.enroller
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// SIGHUP: loads the config file again; when it loads whole, new connections get
    /// the new TLS and transport settings and new tasks the new catalog.
    fn reload(&self, endpoint: &quinn::Endpoint) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let Some(new) = crate::reload::load(&live.0, live.1.as_ref(), &self.config) else {
            return;
        };
        endpoint.set_server_config(Some(new.server));
        *self.catalog.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(new.config.catalog.clone());
        *self.enroller.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(crate::enroll::Enroller::load(&new.config));
        *live = (new.config, Some(new.identity));
    }

    /// The Prometheus text for `/metrics`.
    fn metrics_text(&self) -> String {
        let mut out = String::new();
        self.stats.render("updraftd", &mut out);
        let load = self.executor.load();
        let usage = self.recent.usage();
        let counters = self.recent.counters();
        metrics::gauge(
            &mut out,
            "updraftd_running",
            "Tasks running now.",
            load.running,
        );
        metrics::gauge(
            &mut out,
            "updraftd_queued",
            "Tasks waiting for a slot.",
            load.queued,
        );
        metrics::gauge(
            &mut out,
            "updraftd_uploading",
            "Tasks accepted whose held input is still arriving (they hold no slot yet).",
            load.uploading,
        );
        metrics::gauge(
            &mut out,
            "updraftd_capacity",
            "Task slots (max_concurrent_tasks).",
            load.capacity,
        );
        metrics::gauge(
            &mut out,
            "updraftd_connections",
            "Agent connections open now.",
            self.connections.load(Ordering::Relaxed),
        );
        metrics::gauge(
            &mut out,
            "updraftd_draining",
            "1 while draining after SIGTERM.",
            u8::from(*self.draining.borrow()),
        );
        metrics::counter(
            &mut out,
            "updraftd_runs_total",
            "Tasks started (a slot taken).",
            counters.runs.load(Ordering::Relaxed),
        );
        metrics::counter(
            &mut out,
            "updraftd_dedup_hits_total",
            "Retries answered from memory instead of a second run.",
            counters.dedup_hits.load(Ordering::Relaxed),
        );
        metrics::gauge(
            &mut out,
            "updraftd_dedup_entries",
            "Task ids remembered, running and finished.",
            usage.entries,
        );
        metrics::gauge(
            &mut out,
            "updraftd_dedup_kept_bytes",
            "Bytes of results kept for retries.",
            usage.kept_bytes,
        );
        out
    }
}

/// Task streams each agent (by id, over all its connections) has receiving a held
/// input now, bounded by `max_uploads_per_agent`.
#[derive(Default)]
struct Uploads(std::sync::Mutex<std::collections::HashMap<String, u32>>);

/// One upload counted in [`Uploads`] until dropped.
struct Uploading<'a> {
    uploads: &'a Uploads,
    agent: &'a str,
}

impl Uploads {
    /// Counts an upload of `agent`, or gives the count when it is at `limit` already.
    fn begin<'a>(&'a self, agent: &'a str, limit: u32) -> Result<Uploading<'a>, u32> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match map.get_mut(agent) {
            Some(n) if *n >= limit => return Err(*n),
            Some(n) => *n += 1,
            None => {
                map.insert(agent.to_string(), 1);
            }
        }
        Ok(Uploading {
            uploads: self,
            agent,
        })
    }
}

impl Drop for Uploading<'_> {
    fn drop(&mut self) {
        let mut map = self.uploads.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(self.agent) {
            *n -= 1;
            if *n == 0 {
                map.remove(self.agent);
            }
        }
    }
}

/// Counts one task stream when it ends, however it ends: the outcome is set on the
/// way; one left unset means the agent went away.
struct Tally<'a> {
    shared: &'a Shared,
    task: &'a str,
    outcome: &'static str,
    started: Instant,
    /// Counted already (see [`Tally::record`]).
    recorded: bool,
}

impl Tally<'_> {
    /// Counts the task now, with the outcome it has, rather than when the handler
    /// ends: a trailer is counted before the agent can hold it, so a scrape made after
    /// an agent saw a result counts that result.
    fn record(&mut self) {
        if !std::mem::replace(&mut self.recorded, true) {
            self.shared
                .stats
                .record("", self.task, self.outcome, self.started.elapsed());
        }
    }
}

impl Drop for Tally<'_> {
    fn drop(&mut self) {
        self.record();
    }
}

/// Serves on `endpoint` until `shutdown` resolves, then drains: no new tasks, agents
/// told to go elsewhere, running tasks finished and delivered (up to `drain_timeout`).
pub async fn run(
    config: DaemonConfig,
    endpoint: quinn::Endpoint,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let work = config.state_dir.join("work");
    let swept = updraft_shared::exec::sweep_work_root(&work).map_err(|e| {
        anyhow::anyhow!(
            "cannot prepare {}: {e} (check state_dir in daemon.toml)",
            work.display()
        )
    })?;
    if swept > 0 {
        info!(dir = %work.display(), "removed {swept} task working directories left by an earlier run");
    }
    let (drain_tx, draining) = watch::channel(false);
    let shared = Arc::new(Shared {
        catalog: RwLock::new(Arc::new(config.catalog.clone())),
        executor: Executor::new(config.max_concurrent_tasks, config.max_queued_tasks, work),
        draining,
        tasks: TaskTracker::new(),
        recent: Recent::new(config.dedup),
        stats: TaskStats::default(),
        connections: AtomicU64::new(0),
        enroller: RwLock::new(Arc::new(crate::enroll::Enroller::load(&config))),
        live: std::sync::Mutex::new((config.clone(), config.load_identity().ok())),
        uploads: Uploads::default(),
        config,
    });
    let _metrics = match shared.config.metrics_listen {
        Some(addr) => {
            let s = shared.clone();
            Some(crate::metrics::serve(addr, Arc::new(move || s.metrics_text())).await?)
        }
        None => None,
    };
    let listen = endpoint.local_addr()?;
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
        .map_err(|e| anyhow::anyhow!("cannot install the SIGHUP handler: {e}"))?;
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
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
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
    if *shared.draining.borrow() {
        // Told at once, with the code that means "go elsewhere", rather than left to
        // time out; the handshake is the price of a clear answer.
        debug!(%remote, "closed a new connection: draining");
        conn.close(CLOSE_DRAINING.into(), b"draining");
        return;
    }
    if updraft_shared::tls::alpn_of(&conn).as_deref() == Some(ENROLL_ALPN) {
        crate::enroll::serve_connection(conn, shared.enroller()).await;
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
    if shared.enroller().is_revoked(peer.serial()) {
        warn!(%remote, agent = peer.agent_id(), serial = peer.serial(), "refused a revoked certificate: its agent id was enrolled again since");
        conn.close(
            CLOSE_PROTOCOL.into(),
            b"certificate revoked: the agent id was enrolled again; enroll with a token for it",
        );
        return;
    }
    let peer = Arc::new(peer);
    info!(%remote, agent = peer.agent_id(), "agent connected");
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
                shared
                    .tasks
                    .spawn(async move { handle_task(send, recv, &peer, &shared2, &probes).await });
            }
            Err(e) => {
                debug!(%remote, agent = peer.agent_id(), error = %e, "connection ended");
                break;
            }
        }
    }
    reporter.abort();
    shared.connections.fetch_sub(1, Ordering::Relaxed);
    info!(%remote, agent = peer.agent_id(), "agent disconnected");
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
    probes: &crate::probe::ProbeGate,
) {
    let agent = peer.agent_id();
    let mut reader = FrameReader::new(recv);
    let header = match tokio::time::timeout(HEADER_TIMEOUT, reader.next()).await {
        Ok(Ok(Some(frame))) if frame.kind == FrameKind::Probe => {
            let draining = *shared.draining.borrow();
            crate::probe::serve(send, reader, &frame, probes, draining, agent).await;
            return;
        }
        Ok(Ok(Some(frame))) if frame.kind == FrameKind::CertRequest => {
            // A renewal: the stream carries a certificate request instead of a task.
            let (recv, _) = reader.into_parts();
            let reply = match CertRequest::from_frame(&frame) {
                Ok(r) => shared
                    .enroller()
                    .renew(&r, peer, std::time::SystemTime::now()),
                Err(e) => updraft_shared::protocol::CertReply::Rejected {
                    code: ErrorCode::BadRequest,
                    message: bounded_message(e.to_string()),
                },
            };
            crate::enroll::send_reply(&mut send, recv, &reply).await;
            return;
        }
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
    // Resolves when the agent stops reading (it cancelled the task, or gave up on it).
    let mut stopped = std::pin::pin!(stop_code(send.stopped()));
    // Only catalog names become metric labels, so the series stay bounded.
    let label = match shared.catalog().get(&header.task) {
        Some(_) => header.task.as_str(),
        None => "other",
    };
    let mut tally = Tally {
        shared,
        task: label,
        outcome: "agent_gone",
        started: Instant::now(),
        recorded: false,
    };
    let id = header.id.as_str();
    let key = TaskKey::new(peer, id);
    // True once this stream has been answered `accepted` (a retry waiting for a run in
    // progress): from then on a refusal can only travel in a trailer.
    let mut accepted = false;
    // Each pass answers from memory, claims the id to run it, or waits for the run that
    // holds it. A run that leaves no result sends its waiters round again, so passes are
    // bounded by the retries of one id that arrive together.
    let claim = loop {
        let now = Instant::now();
        match shared
            .recent
            .lookup(key.clone(), &header.task, &header.args, now)
        {
            Lookup::Finished(record) => {
                info!(
                    agent,
                    task = header.task,
                    id,
                    "task id {id} retried; returning its first result"
                );
                shared.recent.counters().hit();
                tally.outcome = "deduplicated";
                deliver_record(&mut send, &mut input, accepted, &record).await;
                return;
            }
            Lookup::Running(waiter) => {
                info!(agent, task = header.task, id, "task id {id} retried while its first run is in progress; waiting for that run's result");
                if !accepted {
                    if write_frame(&mut send, &ReplyHeader::Accepted.to_frame())
                        .await
                        .is_err()
                    {
                        return;
                    }
                    accepted = true;
                }
                // This stream's input is left unread: if the first run leaves no
                // result, the next pass runs the task on it. If this retry is cancelled
                // the first run carries on (its result is kept for the next retry).
                let settled = tokio::select! {
                    settled = waiter.settled() => settled,
                    code = &mut stopped => {
                        let ts = TaskStream { send, input, accepted, agent, task: &header.task, id };
                        ts.stopped(&mut tally, code, "while it waited for the first run of its id");
                        return;
                    }
                };
                match settled {
                    Settled::Kept(record) => {
                        info!(
                            agent,
                            task = header.task,
                            id,
                            "task id {id} retried; returning its first result"
                        );
                        shared.recent.counters().hit();
                        tally.outcome = "deduplicated";
                        deliver_record(&mut send, &mut input, accepted, &record).await;
                        return;
                    }
                    Settled::NotKept | Settled::Forgotten => continue,
                }
            }
            Lookup::Conflict { task } => {
                warn!(
                    agent,
                    task = header.task,
                    id,
                    first_task = task,
                    "peer misbehaved: task id reused for a different request; task refused"
                );
                tally.outcome = ErrorCode::BadRequest.as_str();
                refuse(
                    &mut send,
                    &mut input,
                    accepted,
                    ErrorCode::BadRequest,
                    format!("task id {id} was already used for task `{task}` with other arguments; give every new task a new id"),
                )
                .await;
                return;
            }
            Lookup::Run { claim, rerun } => {
                if let Some(bytes) = rerun {
                    info!(agent, task = header.task, id, "task id {id} retried; its first output ({bytes} bytes) was over [dedup] max_result and was not kept, so the task runs again");
                }
                break Some(claim);
            }
            Lookup::Untracked => {
                debug!(agent, task = header.task, id, "task id not remembered: the memory of recent ids is off or full of running tasks ([dedup] max_entries)");
                break None;
            }
        }
    };
    if *shared.draining.borrow() {
        tally.outcome = ErrorCode::Draining.as_str();
        refuse(
            &mut send,
            &mut input,
            accepted,
            ErrorCode::Draining,
            "daemon is draining; run the task elsewhere".into(),
        )
        .await;
        return;
    }
    let task = match shared.catalog().admit(
        &header.task,
        header.args,
        header.input_len,
        Caller::Agent(peer),
    ) {
        Ok(t) => t.with_task_id(id),
        Err(refusal) => {
            info!(agent, task = header.task, id, code = %refusal.code, "task refused: {}", refusal.message);
            tally.outcome = refusal.code.as_str();
            refuse(
                &mut send,
                &mut input,
                accepted,
                refusal.code,
                refusal.message,
            )
            .await;
            return;
        }
    };
    let hold = claim.as_ref().map_or(0, Claim::hold_input);
    let mut ts = TaskStream {
        send,
        input,
        accepted,
        agent,
        task: &header.task,
        id,
    };
    let place = take_place(&mut ts, shared, &task, hold, &mut stopped, &mut tally).await;
    let (result, teed, input_whole, input_time) = match place {
        Place::Answered => return,
        Place::Refused(e, input_time) => {
            let teed = Teed {
                record: claim.as_ref().map(|_| Vec::new()),
                produced: 0,
                lost: false,
            };
            (Err(e), teed, false, input_time)
        }
        Place::Ready(reservation, held, input_time) => {
            let slot = tokio::select! {
                slot = reservation.slot() => slot,
                code = &mut stopped => {
                    ts.stopped(&mut tally, code, "while it waited for a slot; it did not run");
                    return;
                }
            };
            shared.recent.counters().run();
            debug!(
                agent,
                task = header.task,
                id,
                held_bytes = held.len,
                "task started"
            );
            let input_whole = AtomicBool::new(false);
            let mut output = TeeOutput::new(&mut ts.send, claim.as_ref(), &input_whole);
            let run = shared.executor.run_in_slot(
                &slot,
                &task,
                WatchedInput {
                    held,
                    inner: &mut ts.input,
                    whole: &input_whole,
                },
                &mut output,
            );
            let watched = watch_run(run, &mut stopped, claim.as_ref(), &input_whole).await;
            drop(slot);
            let teed = output.finish();
            match watched {
                Ok(result) => (result, teed, input_whole.into_inner(), input_time),
                Err(code) => {
                    ts.stopped(&mut tally, code, "the run was killed");
                    return;
                }
            }
        }
    };
    finish(ts, &mut tally, claim, result, teed, input_whole, input_time).await;
}

/// A task stream after its header was read, and what its log lines name.
struct TaskStream<'a> {
    send: quinn::SendStream,
    input: StreamInput,
    /// `accepted` was sent already.
    accepted: bool,
    agent: &'a str,
    task: &'a str,
    id: &'a str,
}

impl TaskStream<'_> {
    /// Sends `accepted` unless it went already; false when the agent is gone.
    async fn accept(&mut self) -> bool {
        if !self.accepted {
            if write_frame(&mut self.send, &ReplyHeader::Accepted.to_frame())
                .await
                .is_err()
            {
                return false;
            }
            self.accepted = true;
        }
        true
    }

    /// Notes that the agent stopped reading this stream with `code` (STOP_SENDING)
    /// and what became of the task.
    fn stopped(&self, tally: &mut Tally<'_>, code: u64, then: &str) {
        let (agent, task, id) = (self.agent, self.task, self.id);
        if code == u64::from(STOP_CANCELLED) {
            tally.outcome = "cancelled";
            info!(agent, task, id, "the task's submitter cancelled it {then}");
        } else {
            tally.outcome = "agent_gone";
            info!(
                agent,
                task, id, code, "the agent stopped reading the task's stream {then}"
            );
        }
    }
}

/// Where a task stands once it has its place.
enum Place {
    /// It holds a slot or a queue place; its held input arrived (in that time).
    Ready(Reservation, HeldInput, Duration),
    /// It was accepted but cannot run: its held input went over `max_input`, or the
    /// agent reset it before it was whole (after that long).
    Refused(ExecError, Duration),
    /// The stream was answered (refused) or is gone; nothing more to send.
    Answered,
}

/// Takes the task's place and answers `accepted`. A remembered run with a held input
/// (`hold` > 0) is admitted when a slot or queue place is free, then receives that
/// input holding neither: it counts as uploading (in load reports, and against the
/// agent's `max_uploads_per_agent`), so a slow upload delays no other task; then it
/// takes a slot or waits in the queue. Any other task takes its slot or queue place
/// at once, as its input streams into the run.
async fn take_place<S: Future<Output = u64> + Unpin>(
    ts: &mut TaskStream<'_>,
    shared: &Shared,
    task: &AdmittedTask,
    hold: u64,
    stopped: &mut S,
    tally: &mut Tally<'_>,
) -> Place {
    if hold == 0 {
        let reservation = match shared.executor.reserve() {
            Ok(r) => r,
            Err(e) => {
                tally.outcome = e.code().as_str();
                refuse(
                    &mut ts.send,
                    &mut ts.input,
                    ts.accepted,
                    e.code(),
                    e.to_string(),
                )
                .await;
                return Place::Answered;
            }
        };
        if !ts.accept().await {
            return Place::Answered;
        }
        return Place::Ready(reservation, HeldInput::default(), Duration::ZERO);
    }
    let limit = shared.config.max_uploads_per_agent;
    let refusal = match shared.uploads.begin(ts.agent, limit) {
        Ok(counted) => match shared.executor.reserve_upload() {
            Ok(upload) => Ok((counted, upload)),
            Err(e) => Err(e.to_string()),
        },
        Err(n) => Err(format!("busy: agent `{}` already has {n} tasks sending their input, the limit (max_uploads_per_agent in daemon.toml); send fewer at once or finish those uploads", ts.agent)),
    };
    let (counted, upload) = match refusal {
        Ok(place) => place,
        Err(message) => {
            tally.outcome = ErrorCode::Busy.as_str();
            refuse(
                &mut ts.send,
                &mut ts.input,
                ts.accepted,
                ErrorCode::Busy,
                message,
            )
            .await;
            return Place::Answered;
        }
    };
    if !ts.accept().await {
        return Place::Answered;
    }
    let started = Instant::now();
    let received = tokio::select! {
        r = HeldInput::receive(&mut ts.input, hold, task.spec().max_input) => r,
        code = &mut *stopped => {
            ts.stopped(tally, code, "while it was sending its input; nothing ran");
            return Place::Answered;
        }
    };
    let input_time = started.elapsed();
    drop(counted);
    match received {
        Ok(held) => Place::Ready(upload.into_reservation(), held, input_time),
        Err(ExecError::Input(e)) => match reset_code(&e) {
            Some(code) => {
                info!(
                    agent = ts.agent,
                    task = ts.task,
                    id = ts.id,
                    code,
                    "the agent reset the task's input before all of it arrived; nothing ran"
                );
                Place::Refused(ExecError::Input(io::Error::other(format!("the agent reset its input (code {code}) before all of it arrived, so the task did not run"))), input_time)
            }
            None => {
                info!(agent = ts.agent, task = ts.task, id = ts.id, error = %e, "agent went away while sending the task's input; nothing ran");
                Place::Answered
            }
        },
        Err(e) => Place::Refused(e, input_time),
    }
}

/// The RESET_STREAM code when a read failed because the agent reset its input.
fn reset_code(e: &io::Error) -> Option<u64> {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<quinn::ReadError>())
    {
        Some(quinn::ReadError::Reset(code)) => Some(code.into_inner()),
        _ => None,
    }
}

/// The code the agent stops this stream's daemon direction with (STOP_SENDING).
/// Never resolves otherwise: a lost connection or a finished stream is seen elsewhere.
async fn stop_code(
    stopped: impl Future<Output = Result<Option<quinn::VarInt>, quinn::StoppedError>>,
) -> u64 {
    match stopped.await {
        Ok(Some(code)) => code.into_inner(),
        _ => std::future::pending().await,
    }
}

/// Whether a run whose agent stopped reading with `stop` (or whose connection was
/// lost: `None`) carries on with its output going to the memory for a retry: only a
/// remembered run whose whole input arrived, and after a cancellation
/// ([`STOP_CANCELLED`]) only while a retry of the same id waits for it.
fn runs_on(claim: Option<&Claim>, input_whole: bool, stop: Option<u64>) -> bool {
    let Some(claim) = claim else {
        return false;
    };
    input_whole && (stop != Some(u64::from(STOP_CANCELLED)) || claim.has_waiters())
}

/// Runs `run` to its end, unless the agent stops reading first and the run may not
/// go on without it ([`runs_on`]): then the run is dropped, which kills the task, and
/// the stop code is returned.
async fn watch_run<T, S: Future<Output = u64> + Unpin>(
    run: impl Future<Output = T>,
    stopped: &mut S,
    claim: Option<&Claim>,
    input_whole: &AtomicBool,
) -> Result<T, u64> {
    tokio::pin!(run);
    tokio::select! {
        r = &mut run => return Ok(r),
        code = stopped => {
            if !runs_on(claim, input_whole.load(Ordering::Acquire), Some(code)) {
                return Err(code);
            }
        }
    }
    Ok(run.await)
}

/// Ends a task that was accepted: its trailer, settled in the memory first so a retry
/// or a waiter has the result as soon as this stream could.
async fn finish(
    mut ts: TaskStream<'_>,
    tally: &mut Tally<'_>,
    claim: Option<Claim>,
    result: Result<Outcome, ExecError>,
    teed: Teed,
    input_whole: bool,
    input_time: Duration,
) {
    let (agent, task, id) = (ts.agent, ts.task, ts.id);
    let trailer = match result {
        Ok(outcome) => trailer_of(&outcome, input_time),
        Err(e) => {
            if matches!(e, ExecError::TooLarge { .. }) {
                ts.input.stop(STOP_INPUT);
            }
            if matches!(e, ExecError::Output(_)) {
                // The claim is dropped unsettled: a retry runs the task afresh.
                info!(agent, task, id, error = %e, "agent went away mid-task");
                return;
            }
            info!(agent, task, id, error = %e, "task failed");
            Trailer {
                error: Some(e.code()),
                message: bounded_message(format!("task `{task}`: {e}")),
                ..Default::default()
            }
        }
    };
    tally.outcome = match (trailer.exit_code, trailer.error) {
        (_, Some(code)) => code.as_str(),
        (Some(0), None) => "ok",
        (Some(_), None) => "exit_nonzero",
        (None, None) => "internal",
    };
    let mut kept = false;
    if let Some(claim) = claim {
        // A run is only as good as its input: a cut-off input (the agent vanished
        // mid-upload) or a failure inside the daemon is forgotten. Input refused for
        // its size is a result like any other.
        let trusted = (input_whole || trailer.error == Some(ErrorCode::TooLarge))
            && trailer.error != Some(ErrorCode::Internal);
        match (trusted, teed.record) {
            (true, Some(mut output)) => {
                output.shrink_to_fit();
                let record = Record {
                    output: Bytes::from(output),
                    trailer: trailer.clone(),
                };
                claim.keep(record, Instant::now());
                kept = true;
            }
            (true, None) => claim.too_large(teed.produced, Instant::now()),
            (false, _) => drop(claim),
        }
    }
    if teed.lost {
        tally.outcome = "agent_gone";
        if kept {
            info!(agent, task, id, exit_code = ?trailer.exit_code, "agent went away mid-task; the task finished and its result is kept for a retry");
        } else {
            info!(
                agent,
                task,
                id,
                "agent went away mid-task; the task ended without a result a retry could use"
            );
        }
        return;
    }
    debug!(agent, task, id, exit_code = ?trailer.exit_code, "task finished");
    tally.record();
    deliver_trailer(&mut ts.send, &trailer).await;
}

/// Refuses a task after its header was read: a rejection, or a failure trailer when
/// the stream was already accepted (a retry that waited for a run that left no result).
async fn refuse(
    send: &mut quinn::SendStream,
    input: &mut StreamInput,
    accepted: bool,
    code: ErrorCode,
    message: String,
) {
    input.stop(STOP_INPUT);
    if accepted {
        let trailer = Trailer {
            error: Some(code),
            message: bounded_message(message),
            ..Default::default()
        };
        deliver_trailer(send, &trailer).await;
    } else {
        reject(send, code, message).await;
    }
}

/// Answers a retry from memory: its input is not needed, the output and trailer are
/// the first run's.
async fn deliver_record(
    send: &mut quinn::SendStream,
    input: &mut StreamInput,
    accepted: bool,
    record: &Record,
) {
    input.stop(STOP_INPUT);
    if !accepted
        && write_frame(send, &ReplyHeader::Accepted.to_frame())
            .await
            .is_err()
    {
        return;
    }
    if DataFrameOutput::new(send)
        .write(record.output.clone())
        .await
        .is_err()
    {
        return;
    }
    deliver_trailer(send, &record.trailer).await;
}

/// Sends the trailer and finishes the stream.
async fn deliver_trailer(send: &mut quinn::SendStream, trailer: &Trailer) {
    if write_frame(send, &trailer.to_frame()).await.is_ok() {
        let _ = send.finish();
        // Keep the stream until the agent has everything: dropping it early could
        // cut the trailer off when the connection closes during drain.
        let _ = send.stopped().await;
    }
}

/// The start of a task's input, received before the task runs.
#[derive(Default)]
struct HeldInput {
    chunks: VecDeque<Bytes>,
    len: u64,
    /// The stream ended within the held part: nothing more to read.
    whole: bool,
}

impl HeldInput {
    /// Reads from `input` until it ends or more than `limit` bytes are held; with a
    /// `limit` of 0, reads nothing. Fails with `TooLarge` as soon as more than
    /// `max_input` bytes arrived, and with `Input` when the stream does (the agent
    /// reset it or went away).
    async fn receive(
        input: &mut StreamInput,
        limit: u64,
        max_input: u64,
    ) -> Result<Self, ExecError> {
        let mut held = Self::default();
        while limit > 0 && held.len <= limit {
            match input.next_chunk().await.map_err(ExecError::Input)? {
                Some(chunk) => {
                    held.len += chunk.len() as u64;
                    if held.len > max_input {
                        return Err(ExecError::TooLarge { limit: max_input });
                    }
                    held.chunks.push_back(chunk);
                }
                None => {
                    held.whole = true;
                    break;
                }
            }
        }
        Ok(held)
    }
}

/// Task input that notes when it was received whole (the agent finished sending):
/// the held part first, then the rest of the stream.
struct WatchedInput<'a> {
    held: HeldInput,
    inner: &'a mut StreamInput,
    whole: &'a AtomicBool,
}

impl Input for WatchedInput<'_> {
    async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        if let Some(chunk) = self.held.chunks.pop_front() {
            return Ok(Some(chunk));
        }
        let chunk = if self.held.whole {
            None
        } else {
            self.inner.next_chunk().await?
        };
        if chunk.is_none() {
            self.whole.store(true, Ordering::Release);
        }
        Ok(chunk)
    }
}

/// What the first run keeps of its output for retries.
enum Keep {
    /// Not remembered: the stream is the only consumer, as before retries existed.
    Off,
    /// Everything so far, within `max_result`.
    On(Vec<u8>),
    /// The output went over `max_result`; nothing is kept.
    Over,
}

/// Task output streamed to the agent with its back-pressure and, for a remembered
/// run, copied into the record (up to `max_result`). If the agent's connection is
/// lost after its whole input arrived, the run goes on into the record alone, so a
/// retry can collect it; it stops (as a failed delivery) once that record cannot
/// be kept.
struct TeeOutput<'a> {
    stream: DataFrameOutput<'a>,
    /// The run's claim on its id, when it is remembered.
    claim: Option<&'a Claim>,
    /// The connection is gone; output goes to the record only.
    lost: bool,
    keep: Keep,
    max_result: u64,
    /// Output bytes the task wrote.
    produced: u64,
    input_whole: &'a AtomicBool,
}

/// What a [`TeeOutput`] ends with.
struct Teed {
    /// The whole output, when it was kept.
    record: Option<Vec<u8>>,
    produced: u64,
    lost: bool,
}

impl<'a> TeeOutput<'a> {
    /// Output to `send`, recording up to `max_result` bytes when the run is remembered.
    fn new(
        send: &'a mut quinn::SendStream,
        claim: Option<&'a Claim>,
        input_whole: &'a AtomicBool,
    ) -> Self {
        let max_result = claim.map(Claim::max_result);
        Self {
            stream: DataFrameOutput::new(send),
            claim,
            lost: false,
            keep: if max_result.is_some() {
                Keep::On(Vec::new())
            } else {
                Keep::Off
            },
            max_result: max_result.unwrap_or(0),
            produced: 0,
            input_whole,
        }
    }

    fn finish(self) -> Teed {
        Teed {
            record: match self.keep {
                Keep::On(v) => Some(v),
                Keep::Off | Keep::Over => None,
            },
            produced: self.produced,
            lost: self.lost,
        }
    }
}

/// Why a stream write failed, when the agent is gone: `Some(None)` the connection was
/// lost, `Some(Some(code))` the agent stopped reading (STOP_SENDING with `code`).
fn agent_gone(e: &io::Error) -> Option<Option<u64>> {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<quinn::WriteError>())
    {
        Some(quinn::WriteError::ConnectionLost(_)) => Some(None),
        Some(quinn::WriteError::Stopped(code)) => Some(Some(code.into_inner())),
        _ => None,
    }
}

impl Output for TeeOutput<'_> {
    async fn write(&mut self, chunk: Bytes) -> io::Result<()> {
        self.produced += chunk.len() as u64;
        if let Keep::On(buf) = &mut self.keep {
            if (buf.len() + chunk.len()) as u64 > self.max_result {
                self.keep = Keep::Over;
            } else {
                buf.extend_from_slice(&chunk);
            }
        }
        if !self.lost {
            let Err(e) = self.stream.write(chunk).await else {
                return Ok(());
            };
            let recording = matches!(self.keep, Keep::On(_));
            let whole = self.input_whole.load(Ordering::Acquire);
            match agent_gone(&e) {
                Some(stop) if recording && runs_on(self.claim, whole, stop) => {}
                _ => return Err(e),
            }
            self.lost = true;
            return Ok(());
        }
        match self.keep {
            Keep::On(_) => Ok(()),
            Keep::Off | Keep::Over => Err(io::Error::other(format!(
                "the agent went away and the output is over [dedup] max_result of {} bytes, so no retry could collect it; the task was stopped",
                self.max_result
            ))),
        }
    }
}

fn trailer_of(o: &Outcome, input_time: Duration) -> Trailer {
    Trailer {
        exit_code: Some(o.exit_code),
        error: None,
        message: String::new(),
        stderr_tail: bounded_tail(String::from_utf8_lossy(&o.stderr_tail).into_owned()),
        input_bytes: o.input_bytes,
        output_bytes: o.output_bytes,
        timings: Timings {
            queue_us: o.queue_time.as_micros() as u64,
            run_us: o.run_time.as_micros() as u64,
            input_us: input_time.as_micros() as u64,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stderr_tail_that_grows_as_utf8_keeps_its_last_line() {
        let mut stderr_tail = vec![0xff; 4000];
        stderr_tail.extend_from_slice(b"\nerror: disk full\n");
        let trailer = trailer_of(
            &Outcome {
                exit_code: 1,
                stderr_tail,
                ..Default::default()
            },
            Duration::ZERO,
        );
        assert!(trailer.stderr_tail.len() <= 4096);
        assert!(
            trailer.stderr_tail.ends_with("error: disk full\n"),
            "tail ends with {:?}",
            trailer
                .stderr_tail
                .chars()
                .rev()
                .take(20)
                .collect::<String>()
        );
    }
}
