//! Connections to daemons: one maintainer per `[[cloud]]` entry keeps a QUIC
//! connection up (keep-alive, reconnect with capped, jittered backoff), follows the
//! daemon's load reports, and [`Uplink::pick`] chooses where to offload. [`offload`]
//! runs one task over a connection.

use crate::config::{CloudTarget, LinkConfig};
use bytes::{Buf, Bytes};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use updraft_shared::exec::{Input, Output};
use updraft_shared::protocol::{
    ErrorCode, FrameKind, LoadReport, ReplyHeader, RequestHeader, Trailer, CLOSE_DRAINING,
    RESET_ABANDONED, RESET_CANCELLED, STOP_CANCELLED,
};
use updraft_shared::tls::Identity;
use updraft_shared::wire::{write_frame, FrameReader};

/// What is known about one daemon right now.
#[derive(Debug, Clone, Default)]
struct LinkState {
    conn: Option<quinn::Connection>,
    load: Option<LoadReport>,
    /// When the last load report arrived: the daemon itself, not just the connection,
    /// was alive then.
    heard: Option<std::time::Instant>,
    last_error: Option<String>,
}

/// One daemon and the connection to it.
#[derive(Debug)]
pub struct Link {
    target: CloudTarget,
    state: Mutex<LinkState>,
    changed: tokio::sync::Notify,
    /// Tasks this agent has in flight on the daemon: load reports lag by up to an
    /// interval, and a burst must not all go to the daemon that looked idle last second.
    inflight: std::sync::atomic::AtomicU32,
}

/// Counts a task in flight on a daemon until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Link>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .inflight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A daemon as `status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LinkStatus {
    /// `host:port`.
    pub address: String,
    /// A live connection exists.
    pub connected: bool,
    /// The daemon said it is draining.
    pub draining: bool,
    /// Smoothed RTT, when connected.
    pub rtt_ms: Option<f64>,
    /// Last load report.
    pub load: Option<LoadReport>,
    /// Why the last connection attempt or connection failed.
    pub last_error: Option<String>,
}

impl Link {
    /// The daemon's address as configured.
    pub fn address(&self) -> &str {
        &self.target.address
    }

    /// Marks a task in flight on this daemon until the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.inflight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Running + queued (tasks still uploading their input included: they wait for
    /// slots too) as far as this agent can tell: the last report, or the tasks it has
    /// in flight there if that is more.
    pub fn busy(&self, load: &LoadReport) -> u32 {
        let reported = load
            .running
            .saturating_add(load.queued)
            .saturating_add(load.uploading);
        reported.max(self.inflight.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn usable(&self) -> Option<(quinn::Connection, LoadReport)> {
        let s = self.state.lock().expect("link state lock");
        let conn = live(&s)?;
        let load = s.load.unwrap_or_default();
        (!load.draining).then_some((conn, load))
    }

    /// The connection, unless there is none or it has closed.
    fn live(&self) -> Option<quinn::Connection> {
        live(&self.state.lock().expect("link state lock"))
    }

    /// True when a load report arrived after `since`: the daemon was answering then.
    pub fn heard_since(&self, since: std::time::Instant) -> bool {
        let s = self.state.lock().expect("link state lock");
        s.heard.is_some_and(|h| h >= since)
    }

    fn set(&self, f: impl FnOnce(&mut LinkState)) {
        f(&mut self.state.lock().expect("link state lock"));
        self.changed.notify_waiters();
    }

    /// A snapshot for `status`.
    pub fn status(&self) -> LinkStatus {
        let s = self.state.lock().expect("link state lock").clone();
        let conn = live(&s);
        LinkStatus {
            address: self.target.address.clone(),
            connected: conn.is_some(),
            draining: s.load.is_some_and(|l| l.draining),
            rtt_ms: conn.map(|c| c.rtt().as_secs_f64() * 1000.0),
            load: s.load,
            last_error: s.last_error,
        }
    }
}

/// A daemon chosen for one task.
#[derive(Debug, Clone)]
pub struct Chosen {
    /// The link.
    pub link: Arc<Link>,
    /// Its live connection.
    pub conn: quinn::Connection,
    /// Its last load report.
    pub load: LoadReport,
}

/// All daemons this agent may offload to.
#[derive(Debug)]
pub struct Uplink {
    links: Vec<Arc<Link>>,
    endpoint: quinn::Endpoint,
    /// TLS and transport for new connections; replaced when the certificate is renewed.
    client: Arc<Mutex<quinn::ClientConfig>>,
    /// Said with every failed connection attempt: why daemons will refuse us (an
    /// expired certificate) and what to do.
    note: Arc<Mutex<Option<String>>>,
    cfg: LinkConfig,
}

fn client_config(identity: &Identity, cfg: &LinkConfig) -> anyhow::Result<quinn::ClientConfig> {
    let mut client = quinn::ClientConfig::new(identity.quic_client()?);
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(cfg.keep_alive))
        .max_idle_timeout(Some(quinn::IdleTimeout::try_from(cfg.idle_timeout)?))
        .max_concurrent_uni_streams(4u32.into())
        .max_concurrent_bidi_streams(0u32.into());
    client.transport_config(Arc::new(transport));
    Ok(client)
}

impl Uplink {
    /// Builds the client endpoint and TLS config; nothing connects until [`Uplink::start`].
    pub fn new(
        identity: &Identity,
        targets: Vec<CloudTarget>,
        cfg: LinkConfig,
    ) -> anyhow::Result<Self> {
        let client = Arc::new(Mutex::new(client_config(identity, &cfg)?));
        let endpoint = quinn::Endpoint::client("[::]:0".parse().expect("literal address"))
            .or_else(|_| quinn::Endpoint::client("0.0.0.0:0".parse().expect("literal address")))?;
        let links = targets
            .into_iter()
            .map(|target| {
                Arc::new(Link {
                    target,
                    state: Mutex::default(),
                    changed: tokio::sync::Notify::new(),
                    inflight: std::sync::atomic::AtomicU32::new(0),
                })
            })
            .collect();
        Ok(Self {
            links,
            endpoint,
            client,
            note: Arc::default(),
            cfg,
        })
    }

    /// Starts one maintainer per daemon; they stop when `shutdown` is cancelled.
    pub fn start(&self, shutdown: CancellationToken) {
        for link in &self.links {
            tokio::spawn(maintain(
                link.clone(),
                self.endpoint.clone(),
                self.client.clone(),
                self.note.clone(),
                self.cfg.clone(),
                shutdown.clone(),
            ));
        }
    }

    /// Uses `identity` (a renewed certificate) for every connection made from now on.
    /// Live connections, and the tasks on them, carry on with the old one.
    pub fn set_identity(&self, identity: &Identity) -> anyhow::Result<()> {
        let client = client_config(identity, &self.cfg)?;
        *self.client.lock().expect("client config lock") = client;
        Ok(())
    }

    /// Sets (or clears) what every failed connection attempt adds to its error.
    pub fn set_note(&self, note: Option<String>) {
        *self.note.lock().expect("note lock") = note;
    }

    /// The link configuration.
    pub fn config(&self) -> &LinkConfig {
        &self.cfg
    }

    /// The QUIC endpoint (tests rebind it to simulate an address change).
    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    /// Moves the endpoint to a fresh UDP socket (a new local port) after a network
    /// change: live connections migrate to it (QUIC connection migration) instead of
    /// waiting out their idle timeout and reconnecting. Returns the new local address.
    pub fn rebind(&self) -> std::io::Result<SocketAddr> {
        let old = self.endpoint.local_addr()?;
        let any: SocketAddr = if old.is_ipv6() {
            "[::]:0".parse().expect("literal address")
        } else {
            "0.0.0.0:0".parse().expect("literal address")
        };
        self.endpoint.rebind(std::net::UdpSocket::bind(any)?)?;
        self.endpoint.local_addr()
    }

    /// The least loaded connected daemon that is not draining; RTT breaks ties.
    pub fn pick(&self) -> Option<Chosen> {
        self.pick_avoiding(None)
    }

    /// Like [`pick`](Self::pick), leaving out the daemon at `avoid` (one that went
    /// silent on the last attempt).
    pub fn pick_avoiding(&self, avoid: Option<&str>) -> Option<Chosen> {
        self.links
            .iter()
            .filter(|l| Some(l.address()) != avoid)
            .filter_map(|l| {
                l.usable().map(|(conn, load)| Chosen {
                    link: l.clone(),
                    conn,
                    load,
                })
            })
            .min_by(|a, b| {
                let score =
                    |c: &Chosen| c.link.busy(&c.load) as f64 / c.load.capacity.max(1) as f64;
                score(a)
                    .total_cmp(&score(b))
                    .then(a.conn.rtt().cmp(&b.conn.rtt()))
            })
    }

    /// Waits up to `timeout` for the daemon at `address` to be usable again (after its
    /// connection died mid-task). `None` when it is not back by then, or is back but
    /// draining: the caller goes elsewhere.
    pub async fn wait_for(&self, address: &str, timeout: Duration) -> Option<Chosen> {
        let link = self.links.iter().find(|l| l.address() == address)?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = link.changed.notified();
            if let Some((conn, load)) = link.usable() {
                return Some(Chosen {
                    link: link.clone(),
                    conn,
                    load,
                });
            }
            if link.live().is_some() {
                // Connected but draining: it will not take the retry.
                return None;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return None;
            }
        }
    }

    /// Every live connection, by daemon address.
    pub fn connections(&self) -> Vec<(String, quinn::Connection)> {
        self.links
            .iter()
            .filter_map(|l| l.live().map(|c| (l.address().to_string(), c)))
            .collect()
    }

    /// Every daemon's state.
    pub fn status(&self) -> Vec<LinkStatus> {
        self.links.iter().map(|l| l.status()).collect()
    }

    /// Waits until some daemon is usable, up to `timeout`. True if one is.
    pub async fn wait_usable(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let waits: Vec<_> = self.links.iter().map(|l| l.changed.notified()).collect();
            if self.pick().is_some() {
                return true;
            }
            let any = futures_any(waits);
            if tokio::time::timeout_at(deadline, any).await.is_err() {
                return self.pick().is_some();
            }
        }
    }
}

/// The state's connection, unless there is none or it has closed.
fn live(s: &LinkState) -> Option<quinn::Connection> {
    s.conn.clone().filter(|c| c.close_reason().is_none())
}

async fn futures_any(waits: Vec<tokio::sync::futures::Notified<'_>>) {
    let mut waits: Vec<_> = waits.into_iter().map(Box::pin).collect();
    std::future::poll_fn(|cx| {
        for w in waits.iter_mut() {
            if w.as_mut().poll(cx).is_ready() {
                return std::task::Poll::Ready(());
            }
        }
        std::task::Poll::Pending
    })
    .await
}

use std::future::Future;

/// Keeps one daemon connected until shutdown.
async fn maintain(
    link: Arc<Link>,
    endpoint: quinn::Endpoint,
    client: Arc<Mutex<quinn::ClientConfig>>,
    note: Arc<Mutex<Option<String>>>,
    cfg: LinkConfig,
    shutdown: CancellationToken,
) {
    let mut backoff = cfg.reconnect_min;
    let mut failures = 0u32;
    loop {
        let current = client.lock().expect("client config lock").clone();
        let attempt = tokio::select! {
            r = connect(&endpoint, &current, &link.target, cfg.connect_timeout) => r,
            () = shutdown.cancelled() => return,
        };
        match attempt {
            Ok(conn) => {
                info!(
                    daemon = link.address(),
                    rtt_ms = conn.rtt().as_millis() as u64,
                    "connected to daemon"
                );
                let connected_at = std::time::Instant::now();
                link.set(|s| {
                    s.conn = Some(conn.clone());
                    s.load = None;
                    s.last_error = None;
                });
                let loads = tokio::spawn(follow_load(link.clone(), conn.clone()));
                let reason = tokio::select! {
                    biased;
                    () = shutdown.cancelled() => {
                        conn.close(0u32.into(), b"agent shutting down");
                        loads.abort();
                        return;
                    }
                    e = conn.closed() => e,
                };
                loads.abort();
                let why = match &reason {
                    quinn::ConnectionError::ApplicationClosed(c)
                        if c.error_code == CLOSE_DRAINING.into() =>
                    {
                        "daemon drained and closed the connection".to_string()
                    }
                    other => other.to_string(),
                };
                // A connection the daemon drops at once (it refused our certificate
                // after the handshake, say) is a failed attempt: keep backing off.
                let why = if connected_at.elapsed() < Duration::from_secs(1) {
                    failures += 1;
                    match note.lock().expect("note lock").as_deref() {
                        Some(n) => format!("{why}; {n}"),
                        None => why,
                    }
                } else {
                    failures = 0;
                    backoff = cfg.reconnect_min;
                    why
                };
                if failures <= 1 {
                    warn!(daemon = link.address(), reason = %why, "connection to daemon lost; reconnecting");
                } else {
                    debug!(daemon = link.address(), reason = %why, failures, "connection to daemon lost again at once");
                }
                link.set(|s| {
                    s.conn = None;
                    // A report from a connection that is gone says nothing about the daemon now.
                    s.load = None;
                    s.last_error = Some(why);
                });
            }
            Err(e) => {
                failures += 1;
                let e = match note.lock().expect("note lock").as_deref() {
                    Some(n) => format!("{e}; {n}"),
                    None => e,
                };
                if failures == 1 {
                    warn!(daemon = link.address(), error = %e, "cannot connect to daemon; retrying with backoff");
                } else {
                    debug!(daemon = link.address(), error = %e, failures, "still cannot connect");
                }
                link.set(|s| s.last_error = Some(e));
            }
        }
        // Jitter keeps a fleet of boards from reconnecting in lockstep after an outage.
        let jitter = rand::random::<f64>() * 0.4 + 0.8;
        let wait = backoff.mul_f64(jitter);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => return,
        }
        backoff = (backoff * 2).min(cfg.reconnect_max);
    }
}

async fn connect(
    endpoint: &quinn::Endpoint,
    client: &quinn::ClientConfig,
    target: &CloudTarget,
    timeout: Duration,
) -> Result<quinn::Connection, String> {
    let addr: SocketAddr = tokio::net::lookup_host(&target.address)
        .await
        .map_err(|e| format!("cannot resolve {}: {e}", target.address))?
        .next()
        .ok_or_else(|| format!("{} resolves to no address", target.address))?;
    let connecting = endpoint
        .connect_with(client.clone(), addr, &target.server_name)
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(format!("handshake with {}: {e}", target.address)),
        Err(_) => Err(format!(
            "no answer from {} within {timeout:?}",
            target.address
        )),
    }
}

async fn follow_load(link: Arc<Link>, conn: quinn::Connection) {
    let Ok(recv) = conn.accept_uni().await else {
        return;
    };
    let mut reader = FrameReader::new(recv);
    let mut was_draining = false;
    while let Ok(Some(frame)) = reader.next().await {
        match LoadReport::from_frame(&frame) {
            Ok(load) => {
                if load.draining && !was_draining {
                    info!(
                        daemon = link.address(),
                        "daemon is draining; new tasks go elsewhere"
                    );
                }
                was_draining = load.draining;
                link.set(|s| {
                    s.load = Some(load);
                    s.heard = Some(std::time::Instant::now());
                });
            }
            Err(e) => {
                warn!(daemon = link.address(), error = %e, "daemon misbehaved on its load stream");
                return;
            }
        }
    }
}

/// Input that was read before a daemon accepted the task, followed by the rest.
/// If the daemon never accepts, the task can still run on the board from this.
#[derive(Debug)]
pub struct Replay<I> {
    buffered: VecDeque<Bytes>,
    rest: I,
}

impl<I: Input> Input for Replay<I> {
    async fn next_chunk(&mut self) -> std::io::Result<Option<Bytes>> {
        match self.buffered.pop_front() {
            Some(b) => Ok(Some(b)),
            None => self.rest.next_chunk().await,
        }
    }
}

impl<I> Replay<I> {
    /// Input that replays nothing and reads `rest`.
    pub fn fresh(rest: I) -> Self {
        Self {
            buffered: VecDeque::new(),
            rest,
        }
    }
}

/// Why an offload did not produce a trailer.
#[derive(Debug)]
pub enum OffloadError<I> {
    /// The daemon did not start the task; `input` is whole again, so it can run elsewhere.
    NotStarted {
        /// The daemon's refusal code, if it refused (else the connection failed or timed out).
        code: Option<ErrorCode>,
        /// Operator-readable cause.
        reason: String,
        /// The input, including what was already sent.
        input: Replay<I>,
    },
    /// The task started but did not finish (connection lost, submitter gone, daemon misbehaved).
    Failed {
        /// Operator-readable cause.
        reason: String,
        /// The whole input again, when every byte read so far is still held (it fit in
        /// `replay_buffer`) and the failure was the link's, not the input's: the task
        /// can be retried (same id) elsewhere.
        input: Option<Replay<I>>,
    },
}

/// The task did not start on the daemon: `input` comes back whole, with the daemon's
/// refusal `code` if it gave one.
fn not_started<I, T>(
    code: Option<ErrorCode>,
    reason: String,
    input: Replay<I>,
) -> Result<T, OffloadError<I>> {
    Err(OffloadError::NotStarted {
        code,
        reason,
        input,
    })
}

/// Offloads one task over `conn`: sends the header and the input, copies the output
/// into `output`, and returns the daemon's trailer.
///
/// Input is sent at once (no round trip waiting for acceptance) while a copy of up to
/// `cfg.replay_buffer` bytes is kept until the daemon accepts; past that, sending
/// pauses until it does. So if the daemon refuses ([`OffloadError::NotStarted`]) the
/// task can run elsewhere with its whole input; if it does not answer within
/// `cfg.accept_timeout` or the connection dies first, the daemon may have the task, and
/// the whole input comes back in [`OffloadError::Failed`] for a retry with the same id.
///
/// If the returned future is dropped before it ends (the task's submitter went away),
/// `on_drop` says what the daemon is told: see [`OnDrop`].
pub async fn offload<I: Input, O: Output>(
    conn: &quinn::Connection,
    header: &RequestHeader,
    input: Replay<I>,
    output: &mut O,
    cfg: &LinkConfig,
    on_drop: OnDrop,
) -> Result<Trailer, OffloadError<I>> {
    let (send, recv) = match tokio::time::timeout(cfg.accept_timeout, conn.open_bi()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return not_started(None, format!("cannot open a stream: {e}"), input),
        Err(_) => {
            return not_started(
                None,
                format!("no stream credit within {:?}", cfg.accept_timeout),
                input,
            )
        }
    };
    let mut stream = TaskStream {
        send,
        reader: FrameReader::new(recv),
        on_drop,
        input_finished: false,
        ended: false,
    };
    let result = exchange(&mut stream, header, input, output, cfg).await;
    stream.ended = true;
    result
}

/// What an offload dropped before its end (its submitter went away) tells the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDrop {
    /// A synchronous task: no one is left to take its result, so the agent resets its
    /// input with `RESET_CANCELLED` and stops the daemon's direction with
    /// `STOP_CANCELLED`; the daemon kills the run (unless a retry waits for it).
    Cancel,
    /// A detached task: the journal runs it again with the same id, so the daemon's run
    /// is not cancelled (an unfinished input is still reset, `RESET_ABANDONED`).
    Leave,
}

/// A task's stream. Dropped before the exchange ended, it tells the daemon what
/// [`OnDrop`] says; an input not finished is always reset, never left to quinn's drop,
/// which would finish it and pass a cut-off input for a whole one.
struct TaskStream {
    send: quinn::SendStream,
    reader: FrameReader<quinn::RecvStream>,
    on_drop: OnDrop,
    /// The input was finished (FIN): it must not be reset after that.
    input_finished: bool,
    /// The exchange ended (a trailer, a refusal or a failure, each handled).
    ended: bool,
}

impl Drop for TaskStream {
    fn drop(&mut self) {
        let cancel = !self.ended && self.on_drop == OnDrop::Cancel;
        if !self.input_finished {
            let code = if cancel {
                RESET_CANCELLED
            } else {
                RESET_ABANDONED
            };
            let _ = self.send.reset(code.into());
        }
        if cancel {
            let _ = self.reader.get_mut().stop(STOP_CANCELLED.into());
        }
    }
}

/// The body of [`offload`] on an open stream.
async fn exchange<I: Input, O: Output>(
    stream: &mut TaskStream,
    header: &RequestHeader,
    mut input: Replay<I>,
    output: &mut O,
    cfg: &LinkConfig,
) -> Result<Trailer, OffloadError<I>> {
    let TaskStream {
        send,
        reader,
        input_finished,
        ..
    } = stream;
    if let Err(e) = write_frame(send, &header.to_frame()).await {
        return not_started(None, format!("cannot send the request: {e}"), input);
    }
    let mut replay: VecDeque<Bytes> = std::mem::take(&mut input.buffered);
    let mut replay_len: usize = replay.iter().map(Bytes::len).sum();
    // Chunks already replayed must be sent again on this stream first.
    let mut to_send: VecDeque<Bytes> = replay.clone();
    let mut pending: Option<Bytes> = to_send.pop_front();
    let mut input_done = false;
    let mut send_ok = true;
    let deadline = tokio::time::Instant::now() + cfg.accept_timeout;

    // Phase 1: until the daemon answers.
    let reply = loop {
        tokio::select! {
            biased;
            r = reader.next() => break Ok(r),
            () = tokio::time::sleep_until(deadline) => break Err(format!("daemon did not accept the task within {:?}", cfg.accept_timeout)),
            r = send.write(pending.as_deref().unwrap_or(&[])), if pending.is_some() && send_ok => match r {
                Ok(n) => {
                    let p = pending.as_mut().expect("pending is set");
                    p.advance(n);
                    if p.is_empty() {
                        pending = to_send.pop_front();
                    }
                }
                // Stopped: the daemon refused the input; its reply says why.
                Err(_) => send_ok = false,
            },
            r = input.rest.next_chunk(), if pending.is_none() && !input_done && replay_len < cfg.replay_buffer => match r {
                Ok(Some(c)) => {
                    replay_len += c.len();
                    replay.push_back(c.clone());
                    pending = Some(c);
                }
                Ok(None) => {
                    input_done = true;
                    *input_finished = true;
                    let _ = send.finish();
                }
                Err(e) => {
                    let _ = send.reset(RESET_ABANDONED.into());
                    return Err(OffloadError::Failed { reason: format!("reading the task's input: {e}"), input: None });
                }
            },
        }
    };
    let give_back = |replay: VecDeque<Bytes>, input: Replay<I>| Replay {
        buffered: replay,
        rest: input.rest,
    };
    let frame = match reply {
        Ok(Ok(Some(frame))) => frame,
        Ok(Ok(None)) => {
            return not_started(
                None,
                "daemon closed the stream without answering".into(),
                give_back(replay, input),
            )
        }
        // The request may have reached the daemon, and a small input is run only once it
        // is whole, so the daemon may be running the task: a retry must carry the same
        // id (and prefer this daemon) rather than treat it as never started.
        Ok(Err(e)) => {
            return Err(OffloadError::Failed {
                reason: format!("connection failed before the daemon answered: {e}"),
                input: Some(give_back(replay, input)),
            })
        }
        Err(reason) => {
            let _ = send.reset(RESET_ABANDONED.into());
            return Err(OffloadError::Failed {
                reason: format!("{reason}; it may still run it"),
                input: Some(give_back(replay, input)),
            });
        }
    };
    match ReplyHeader::from_frame(&frame) {
        Ok(ReplyHeader::Accepted) => {}
        Ok(ReplyHeader::Rejected { code, message }) => {
            return not_started(Some(code), message, give_back(replay, input));
        }
        Err(e) => {
            let _ = send.reset(RESET_ABANDONED.into());
            return not_started(
                None,
                format!("daemon misbehaved: {e}"),
                give_back(replay, input),
            );
        }
    }
    // Phase 2: accepted. Send the rest of the input while reading the output. What is
    // read from the input stays in `replay` while it fits in `replay_buffer`, so a task
    // whose connection dies mid-run can be retried with its whole input.
    let mut replayable = true;
    let outcome = {
        let rest = &mut input.rest;
        let (replay, replayable) = (&mut replay, &mut replayable);
        let pump = async {
            if !send_ok {
                return Ok(());
            }
            let mut pending = pending;
            loop {
                if let Some(p) = pending.take() {
                    if send.write_chunk(p).await.is_err() {
                        // The daemon stopped reading (input over its limit, or it is
                        // answering from its memory of this id); the trailer says why.
                        return Ok(());
                    }
                    pending = to_send.pop_front();
                    continue;
                }
                if input_done {
                    *input_finished = true;
                    let _ = send.finish();
                    return Ok(());
                }
                match rest.next_chunk().await {
                    Ok(Some(c)) => {
                        if *replayable && replay_len + c.len() <= cfg.replay_buffer {
                            replay_len += c.len();
                            replay.push_back(c.clone());
                        } else if *replayable {
                            *replayable = false;
                            replay.clear();
                        }
                        pending = Some(c);
                    }
                    Ok(None) => input_done = true,
                    Err(e) => {
                        let _ = send.reset(RESET_ABANDONED.into());
                        return Err(format!("reading the task's input: {e}"));
                    }
                }
            }
        };
        let read = async {
            loop {
                let frame = match reader.next().await {
                    Ok(Some(f)) => f,
                    Ok(None) => {
                        return Err((
                            true,
                            "daemon ended the stream without a trailer".to_string(),
                        ))
                    }
                    Err(e) => return Err((true, format!("connection lost mid-task: {e}"))),
                };
                match frame.kind {
                    FrameKind::Data => output
                        .write(frame.payload)
                        .await
                        .map_err(|e| (false, format!("delivering output: {e}")))?,
                    FrameKind::Trailer => {
                        return Trailer::from_frame(&frame)
                            .map_err(|e| (true, format!("daemon misbehaved: {e}")))
                    }
                    other => {
                        return Err((
                            true,
                            format!("daemon misbehaved: unexpected {other:?} frame"),
                        ))
                    }
                }
            }
        };
        tokio::pin!(pump, read);
        let mut pump_done = false;
        loop {
            tokio::select! {
                r = &mut read => break r,
                r = &mut pump, if !pump_done => {
                    pump_done = true;
                    if let Err(reason) = r {
                        break Err((false, reason));
                    }
                }
            }
        }
    };
    outcome.map_err(|(link, reason)| {
        debug!("offload failed mid-task: {reason}");
        OffloadError::Failed {
            reason,
            input: (link && replayable).then(|| Replay {
                buffered: replay,
                rest: input.rest,
            }),
        }
    })
}
