//! Connections to daemons: one maintainer per `[[cloud]]` entry keeps a QUIC
//! connection up (keep-alive, reconnect with capped, jittered backoff), follows the
//! daemon's load reports, and [`Uplink::pick`] chooses where to offload. [`offload`]
//! runs one task over a connection.

use crate::config::{CloudTarget, LinkConfig};
use bytes::{Buf, Bytes};
use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use updraft_proto::{
    ErrorCode, Frame, FrameKind, LoadReport, ReplyHeader, RequestHeader, Trailer, CLOSE_DRAINING,
    CLOSE_REVOKED, RESET_ABANDONED, RESET_CANCELLED, STOP_CANCELLED,
};
use updraft_shared::exec::{Input, Output};
use updraft_shared::tls::{Identity, TlsError};
use updraft_shared::wire::{FrameReader, WireError};

/// Streams a daemon may open to this agent at once: its load reports and link-probe
/// answers travel on them, one or two at a time; a few spare keep a slow reader from
/// stalling the next report, and more would only let a misbehaving daemon make the
/// board hold buffers.
const MAX_INCOMING_STREAMS: u32 = 4;

/// A connection the daemon closes within this long of the handshake counts as a
/// failed attempt (it refused our certificate after the handshake, say), so backoff
/// keeps growing; one that held this long was taken, and backoff starts over. A
/// second is far beyond the round trip in which a daemon refuses, and far below how
/// long a real connection lasts.
const HELD_AFTER: Duration = Duration::from_secs(1);

/// Each reconnect wait is the backoff times a factor drawn from
/// `[JITTER_LOW, JITTER_LOW + JITTER_SPAN)`: ±20 % spreads a fleet of boards that lost
/// the same daemon at once over a window as wide as the backoff itself, so they do not
/// reconnect in lockstep, while keeping each wait near what the operator configured.
const JITTER_LOW: f64 = 0.8;
/// See [`JITTER_LOW`].
const JITTER_SPAN: f64 = 0.4;

/// Why the uplink could not be set up, or take a renewed certificate.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    /// The identity cannot make a QUIC client configuration.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// `[link] idle_timeout` is longer than QUIC can express.
    #[error(transparent)]
    IdleTimeout(#[from] quinn::VarIntBoundsExceeded),
    /// No UDP socket could be bound for the client endpoint.
    #[error(transparent)]
    Socket(#[from] std::io::Error),
}

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
    /// The fleet stream each connection carries, once the service set it.
    fleet: Arc<std::sync::OnceLock<crate::fleet::Hook>>,
}

fn client_config(
    identity: &Identity,
    cfg: &LinkConfig,
) -> Result<quinn::ClientConfig, UplinkError> {
    let mut client = quinn::ClientConfig::new(identity.quic_client()?);
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(cfg.keep_alive))
        .max_idle_timeout(Some(quinn::IdleTimeout::try_from(cfg.idle_timeout)?))
        .max_concurrent_uni_streams(MAX_INCOMING_STREAMS.into())
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
    ) -> Result<Self, UplinkError> {
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
            fleet: Arc::default(),
        })
    }

    /// Opens a fleet stream on every connection from now on (set once, before
    /// [`Uplink::start`]).
    pub(crate) fn set_fleet(&self, hook: crate::fleet::Hook) {
        let _ = self.fleet.set(hook);
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
                self.fleet.clone(),
                shutdown.clone(),
            ));
        }
    }

    /// Uses `identity` (a renewed certificate) for every connection made from now on.
    /// Live connections, and the tasks on them, carry on with the old one.
    pub fn set_identity(&self, identity: &Identity) -> Result<(), UplinkError> {
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
        wait_until(&[&link.changed], deadline, || {
            if let Some((conn, load)) = link.usable() {
                return Check::Ready(Chosen {
                    link: link.clone(),
                    conn,
                    load,
                });
            }
            if link.live().is_some() {
                // Connected but draining: it will not take the retry.
                return Check::GiveUp;
            }
            Check::Wait
        })
        .await
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
        let changed: Vec<&Notify> = self.links.iter().map(|l| &l.changed).collect();
        let usable = wait_until(&changed, deadline, || match self.pick() {
            Some(_) => Check::Ready(()),
            None => Check::Wait,
        });
        // At the deadline, one last look: a link may have come up in the same instant.
        usable.await.is_some() || self.pick().is_some()
    }
}

/// What a wait makes of the links' state, each time it changes.
#[derive(Debug, PartialEq, Eq)]
enum Check<T> {
    /// Done: this.
    Ready(T),
    /// Done: what is awaited will not come (a daemon back but draining).
    GiveUp,
    /// Not yet: look again at the next change.
    Wait,
}

/// Asks `check` now and after each notification of one of `changed`, until it says
/// done or `deadline` passes (`None`). Each round's notifications are armed before
/// `check` looks, so a change between the look and the wait is not missed.
async fn wait_until<T>(
    changed: &[&Notify],
    deadline: tokio::time::Instant,
    mut check: impl FnMut() -> Check<T>,
) -> Option<T> {
    loop {
        let waits: Vec<_> = changed.iter().map(|n| n.notified()).collect();
        match check() {
            Check::Ready(v) => return Some(v),
            Check::GiveUp => return None,
            Check::Wait => {}
        }
        if tokio::time::timeout_at(deadline, futures_any(waits))
            .await
            .is_err()
        {
            return None;
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

/// When one daemon's maintainer tries again: the backoff doubles from `[link]
/// reconnect_min` after each failed attempt up to `reconnect_max`, and starts over once
/// a connection holds.
#[derive(Debug, Clone, PartialEq)]
struct Reconnect {
    /// The next wait, before jitter.
    backoff: Duration,
    /// Failed attempts in a row (connections dropped at once included).
    failures: u32,
    /// `[link] reconnect_min`: the first wait, and the wait after a connection held.
    min: Duration,
    /// `[link] reconnect_max`: the longest wait.
    max: Duration,
}

impl Reconnect {
    fn new(cfg: &LinkConfig) -> Self {
        Self {
            backoff: cfg.reconnect_min,
            failures: 0,
            min: cfg.reconnect_min,
            max: cfg.reconnect_max,
        }
    }

    /// An attempt failed; returns how many have in a row.
    fn failed(&mut self) -> u32 {
        self.failures += 1;
        self.failures
    }

    /// A connection closed after `lasted`: true when it had held (see [`HELD_AFTER`]),
    /// which starts backoff over; false when it counts as a failed attempt.
    fn closed_after(&mut self, lasted: Duration) -> bool {
        if lasted < HELD_AFTER {
            self.failed();
            return false;
        }
        self.failures = 0;
        self.backoff = self.min;
        true
    }

    /// The wait before the next attempt, for `jitter` drawn uniformly from `[0, 1)`;
    /// the backoff doubles for the one after, up to the cap.
    fn next_wait(&mut self, jitter: f64) -> Duration {
        let wait = self.backoff.mul_f64(jitter * JITTER_SPAN + JITTER_LOW);
        self.backoff = (self.backoff * 2).min(self.max);
        wait
    }
}

/// Keeps one daemon connected until shutdown.
async fn maintain(
    link: Arc<Link>,
    endpoint: quinn::Endpoint,
    client: Arc<Mutex<quinn::ClientConfig>>,
    note: Arc<Mutex<Option<String>>>,
    cfg: LinkConfig,
    fleet: Arc<std::sync::OnceLock<crate::fleet::Hook>>,
    shutdown: CancellationToken,
) {
    let mut reconnect = Reconnect::new(&cfg);
    // What every failed attempt adds to its error (why daemons refuse us, and what to do).
    let noted = |e: String| match note.lock().expect("note lock").as_deref() {
        Some(n) => format!("{e}; {n}"),
        None => e,
    };
    loop {
        let current = client.lock().expect("client config lock").clone();
        let attempt = tokio::select! {
            r = connect(&endpoint, &current, &link.target, cfg.connect_timeout) => r,
            () = shutdown.cancelled() => return,
        };
        match attempt {
            Ok(conn) => {
                let connected_at = std::time::Instant::now();
                let Some(reason) = hold(&link, &conn, fleet.get(), &shutdown).await else {
                    return;
                };
                let why = match &reason {
                    quinn::ConnectionError::ApplicationClosed(c)
                        if c.error_code == CLOSE_DRAINING.into() =>
                    {
                        "daemon drained and closed the connection".to_string()
                    }
                    quinn::ConnectionError::ApplicationClosed(c)
                        if c.error_code == CLOSE_REVOKED.into() =>
                    {
                        format!(
                            "the daemon refuses this agent: {}",
                            String::from_utf8_lossy(&c.reason)
                        )
                    }
                    other => other.to_string(),
                };
                // A connection the daemon drops at once (it refused our certificate
                // after the handshake, say) is a failed attempt: keep backing off.
                let held = reconnect.closed_after(connected_at.elapsed());
                let why = if held { why } else { noted(why) };
                if reconnect.failures <= 1 {
                    warn!(daemon = link.address(), reason = %why, "connection to daemon lost; reconnecting");
                } else {
                    debug!(daemon = link.address(), reason = %why, failures = reconnect.failures, "connection to daemon lost again at once");
                }
                link.set(|s| {
                    s.conn = None;
                    // A report from a connection that is gone says nothing about the daemon now.
                    s.load = None;
                    s.last_error = Some(why);
                });
            }
            Err(e) => {
                let failures = reconnect.failed();
                let e = noted(e.to_string());
                if failures == 1 {
                    warn!(daemon = link.address(), error = %e, "cannot connect to daemon; retrying with backoff");
                } else {
                    debug!(daemon = link.address(), error = %e, failures, "still cannot connect");
                }
                link.set(|s| s.last_error = Some(e));
            }
        }
        let wait = reconnect.next_wait(rand::random::<f64>());
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// Publishes `conn` as the link's connection and follows its load reports until it
/// closes: returns why, or `None` at shutdown (the connection closed by us).
async fn hold(
    link: &Arc<Link>,
    conn: &quinn::Connection,
    fleet: Option<&crate::fleet::Hook>,
    shutdown: &CancellationToken,
) -> Option<quinn::ConnectionError> {
    info!(
        daemon = link.address(),
        rtt_ms = conn.rtt().as_millis() as u64,
        "connected to daemon"
    );
    link.set(|s| {
        s.conn = Some(conn.clone());
        s.load = None;
        s.last_error = None;
    });
    let loads = tokio::spawn(follow_load(link.clone(), conn.clone()));
    let reports = fleet.map(|hook| {
        tokio::spawn(crate::fleet::run_stream(
            conn.clone(),
            link.address().to_string(),
            hook.clone(),
        ))
    });
    let reason = tokio::select! {
        biased;
        () = shutdown.cancelled() => {
            conn.close(0u32.into(), b"agent shutting down");
            None
        }
        e = conn.closed() => Some(e),
    };
    loads.abort();
    if let Some(r) = reports {
        r.abort();
    }
    reason
}

/// Why a connection attempt to a daemon failed; the texts go to the log and `status`.
#[derive(Debug, thiserror::Error)]
enum DialError {
    /// The daemon's address could not be resolved.
    #[error("cannot resolve {address}: {error}")]
    Resolve {
        /// The configured address.
        address: String,
        /// The resolver's error.
        error: std::io::Error,
    },
    /// The address resolved to nothing.
    #[error("{0} resolves to no address")]
    NoAddress(String),
    /// quinn refused to start the attempt (a bad server name, say).
    #[error("{0}")]
    Start(quinn::ConnectError),
    /// The handshake failed: TLS refused on either side, or the connection was lost.
    #[error("handshake with {address}: {error}")]
    Handshake {
        /// The configured address.
        address: String,
        /// quinn's error.
        error: quinn::ConnectionError,
    },
    /// The daemon did not answer within `connect_timeout`.
    #[error("no answer from {address} within {timeout:?}")]
    Timeout {
        /// The configured address.
        address: String,
        /// `connect_timeout`.
        timeout: Duration,
    },
}

async fn connect(
    endpoint: &quinn::Endpoint,
    client: &quinn::ClientConfig,
    target: &CloudTarget,
    timeout: Duration,
) -> Result<quinn::Connection, DialError> {
    let address = || target.address.clone();
    let addr: SocketAddr = tokio::net::lookup_host(&target.address)
        .await
        .map_err(|error| DialError::Resolve {
            address: address(),
            error,
        })?
        .next()
        .ok_or_else(|| DialError::NoAddress(address()))?;
    let connecting = endpoint
        .connect_with(client.clone(), addr, &target.server_name)
        .map_err(DialError::Start)?;
    match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(error)) => Err(DialError::Handshake {
            address: address(),
            error,
        }),
        Err(_) => Err(DialError::Timeout {
            address: address(),
            timeout,
        }),
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

/// The input on its way to the daemon: what is still to send, and the copy kept for
/// a retry.
struct Upload {
    /// Chunks read so far, while they fit in `replay_buffer` (all of them until the
    /// daemon accepts: sending pauses rather than read past it).
    replay: VecDeque<Bytes>,
    /// Bytes in `replay`.
    replay_len: usize,
    /// Chunks an earlier try read, sent again on this stream before anything new.
    to_send: VecDeque<Bytes>,
    /// The chunk being written.
    pending: Option<Bytes>,
    /// The input has ended.
    input_done: bool,
    /// The daemon has not stopped our sending.
    send_ok: bool,
    /// `replay` holds every byte read so far.
    replayable: bool,
}

impl Upload {
    /// An upload that first sends again what an earlier try read.
    fn new(replay: VecDeque<Bytes>) -> Self {
        let replay_len = replay.iter().map(Bytes::len).sum();
        let mut to_send = replay.clone();
        let pending = to_send.pop_front();
        Self {
            replay,
            replay_len,
            to_send,
            pending,
            input_done: false,
            send_ok: true,
            replayable: true,
        }
    }

    /// The input whole again: what was read, then `rest`.
    fn give_back<I>(self, rest: I) -> Replay<I> {
        Replay {
            buffered: self.replay,
            rest,
        }
    }
}

/// Why no answer came while the input was being sent.
enum NoReply {
    /// None within `accept_timeout`.
    Late,
    /// The task's input could not be read.
    Input(std::io::Error),
}

/// What the daemon's first answer, or its absence, says when it is not "accepted".
enum Refusal {
    /// The daemon did not start the task; `reset` when our sending must be reset (it
    /// misbehaved, and would otherwise wait for the rest of the input).
    NotStarted {
        /// The daemon's refusal code, if it refused.
        code: Option<ErrorCode>,
        /// Operator-readable cause.
        reason: String,
        /// Reset our sending before giving the input back.
        reset: bool,
    },
    /// The daemon may have the task: the connection failed before it answered.
    Unsure(String),
}

/// Why a task stopped mid-run.
struct MidTask {
    /// The link or the daemon failed, not the input or output here: the task may be
    /// retried elsewhere.
    link: bool,
    /// Operator-readable cause.
    reason: String,
}

/// The body of [`offload`] on an open stream: the request, the input until the daemon
/// answers, its answer, then input and output both ways until the trailer.
async fn exchange<I: Input, O: Output>(
    stream: &mut TaskStream,
    header: &RequestHeader,
    input: Replay<I>,
    output: &mut O,
    cfg: &LinkConfig,
) -> Result<Trailer, OffloadError<I>> {
    let TaskStream {
        send,
        reader,
        input_finished,
        ..
    } = stream;
    let Replay { buffered, mut rest } = input;
    let mut up = Upload::new(buffered);
    // The request goes out together with the input that is ready now and, when that is
    // all of it, the input's end: a small task is one packet, not three.
    let (first, read_error) = ready_input(&mut rest, &mut up, cfg);
    let mut chunks = Vec::with_capacity(1 + first.len());
    chunks.push(header.encoded());
    chunks.extend(first);
    if let Err(e) = send.write_all_chunks(&mut chunks).await {
        return not_started(
            None,
            format!("cannot send the request: {e}"),
            up.give_back(rest),
        );
    }
    if up.input_done {
        *input_finished = true;
        let _ = send.finish();
    }
    let reply = match read_error {
        Some(e) => Err(NoReply::Input(e)),
        None => await_reply(send, reader, &mut rest, &mut up, input_finished, cfg).await,
    };
    let reply = match reply {
        Ok(reply) => reply,
        Err(NoReply::Input(e)) => {
            let _ = send.reset(RESET_ABANDONED.into());
            return Err(OffloadError::Failed {
                reason: format!("reading the task's input: {e}"),
                input: None,
            });
        }
        Err(NoReply::Late) => {
            let _ = send.reset(RESET_ABANDONED.into());
            return Err(OffloadError::Failed {
                reason: format!(
                    "daemon did not accept the task within {:?}; it may still run it",
                    cfg.accept_timeout
                ),
                input: Some(up.give_back(rest)),
            });
        }
    };
    if let Err(refusal) = read_answer(reply) {
        let input = up.give_back(rest);
        return Err(match refusal {
            Refusal::NotStarted {
                code,
                reason,
                reset,
            } => {
                if reset {
                    let _ = send.reset(RESET_ABANDONED.into());
                }
                OffloadError::NotStarted {
                    code,
                    reason,
                    input,
                }
            }
            Refusal::Unsure(reason) => OffloadError::Failed {
                reason,
                input: Some(input),
            },
        });
    }
    // Accepted. Send the rest of the input while reading the output. What is read from
    // the input stays in `replay` while it fits in `replay_buffer`, so a task whose
    // connection dies mid-run can be retried with its whole input.
    let pump = pump_input(send, &mut rest, &mut up, input_finished, cfg);
    let outcome = relay(pump, read_output(reader, output)).await;
    outcome.map_err(|MidTask { link, reason }| {
        debug!("offload failed mid-task: {reason}");
        OffloadError::Failed {
            reason,
            input: (link && up.replayable).then(|| up.give_back(rest)),
        }
    })
}

/// Most input sent with the request, ahead of the daemon's answer.
const READY_INPUT_MAX: usize = 16 * 1024;

/// The input that can go out with the request at once, up to [`READY_INPUT_MAX`]
/// bytes: chunks an earlier try read, then chunks the input has ready now (read as
/// [`await_reply`] reads them, kept for a retry). `up.input_done` is set when that was
/// the whole input. A read error found on the way is given back, to be handled after
/// the request is sent.
fn ready_input<I: Input>(
    rest: &mut I,
    up: &mut Upload,
    cfg: &LinkConfig,
) -> (Vec<Bytes>, Option<std::io::Error>) {
    let mut first = Vec::new();
    let mut budget = READY_INPUT_MAX;
    loop {
        if let Some(chunk) = up.pending.take() {
            if chunk.len() > budget {
                up.pending = Some(chunk);
                return (first, None);
            }
            budget -= chunk.len();
            first.push(chunk);
            up.pending = up.to_send.pop_front();
            continue;
        }
        if up.input_done || up.replay_len >= cfg.replay_buffer {
            return (first, None);
        }
        match poll_once(rest.next_chunk()) {
            Some(Ok(Some(chunk))) => {
                up.replay_len += chunk.len();
                up.replay.push_back(chunk.clone());
                up.pending = Some(chunk);
            }
            Some(Ok(None)) => up.input_done = true,
            Some(Err(e)) => return (first, Some(e)),
            None => return (first, None),
        }
    }
}

/// Polls `fut` once: its output if it is ready now. Dropped otherwise, so only for
/// futures that may be dropped unfinished (an [`Input`]'s `next_chunk`, which
/// [`await_reply`] also drops whenever another branch wins).
fn poll_once<F: Future>(fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => None,
    }
}

/// Sends input (replayed chunks first) until the daemon answers or `accept_timeout`
/// passes; returns what the reader gave. Reads no more input than fits in
/// `replay_buffer`: until the daemon accepts, every byte must stay replayable.
async fn await_reply<I: Input>(
    send: &mut quinn::SendStream,
    reader: &mut FrameReader<quinn::RecvStream>,
    rest: &mut I,
    up: &mut Upload,
    input_finished: &mut bool,
    cfg: &LinkConfig,
) -> Result<Result<Option<Frame>, WireError>, NoReply> {
    let deadline = tokio::time::Instant::now() + cfg.accept_timeout;
    loop {
        tokio::select! {
            biased;
            r = reader.next() => return Ok(r),
            () = tokio::time::sleep_until(deadline) => return Err(NoReply::Late),
            r = send.write(up.pending.as_deref().unwrap_or(&[])), if up.pending.is_some() && up.send_ok => match r {
                Ok(n) => {
                    let p = up.pending.as_mut().expect("pending is set");
                    p.advance(n);
                    if p.is_empty() {
                        up.pending = up.to_send.pop_front();
                    }
                }
                // Stopped: the daemon refused the input; its reply says why.
                Err(_) => up.send_ok = false,
            },
            r = rest.next_chunk(), if up.pending.is_none() && !up.input_done && up.replay_len < cfg.replay_buffer => match r {
                Ok(Some(c)) => {
                    up.replay_len += c.len();
                    up.replay.push_back(c.clone());
                    up.pending = Some(c);
                }
                Ok(None) => {
                    up.input_done = true;
                    *input_finished = true;
                    let _ = send.finish();
                }
                Err(e) => return Err(NoReply::Input(e)),
            },
        }
    }
}

/// `Ok` when the daemon's first answer accepts the task; otherwise what it means.
fn read_answer(reply: Result<Option<Frame>, WireError>) -> Result<(), Refusal> {
    let not_started = |code, reason, reset| {
        Err(Refusal::NotStarted {
            code,
            reason,
            reset,
        })
    };
    let frame = match reply {
        Ok(Some(frame)) => frame,
        Ok(None) => {
            return not_started(
                None,
                "daemon closed the stream without answering".into(),
                false,
            )
        }
        // The request may have reached the daemon, and a small input is run only once it
        // is whole, so the daemon may be running the task: a retry must carry the same
        // id (and prefer this daemon) rather than treat it as never started.
        Err(e) => {
            return Err(Refusal::Unsure(format!(
                "connection failed before the daemon answered: {e}"
            )))
        }
    };
    match ReplyHeader::from_frame(&frame) {
        Ok(ReplyHeader::Accepted) => Ok(()),
        Ok(ReplyHeader::Rejected { code, message }) => not_started(Some(code), message, false),
        Err(e) => not_started(None, format!("daemon misbehaved: {e}"), true),
    }
}

/// The task's own input failed while it was being sent to the daemon: not the link's
/// fault, so the task is not retried elsewhere.
#[derive(Debug, thiserror::Error)]
#[error("reading the task's input: {0}")]
struct InputError(std::io::Error);

/// Runs `pump` (the input) alongside `read` (the output) until `read` ends with the
/// trailer or a failure; a failed `pump` ends the task too.
async fn relay(
    pump: impl Future<Output = Result<(), InputError>>,
    read: impl Future<Output = Result<Trailer, MidTask>>,
) -> Result<Trailer, MidTask> {
    tokio::pin!(pump, read);
    let mut pump_done = false;
    loop {
        tokio::select! {
            r = &mut read => return r,
            r = &mut pump, if !pump_done => {
                pump_done = true;
                if let Err(e) = r {
                    return Err(MidTask { link: false, reason: e.to_string() });
                }
            }
        }
    }
}

/// Sends the rest of the input after the daemon accepted, keeping a copy in `replay`
/// while it fits. Ends early, `Ok`, if the daemon stops reading (input over its limit,
/// or it answers from its memory of this id): the trailer says why.
async fn pump_input<I: Input>(
    send: &mut quinn::SendStream,
    rest: &mut I,
    up: &mut Upload,
    input_finished: &mut bool,
    cfg: &LinkConfig,
) -> Result<(), InputError> {
    if !up.send_ok {
        return Ok(());
    }
    loop {
        if let Some(p) = up.pending.take() {
            if send.write_chunk(p).await.is_err() {
                return Ok(());
            }
            up.pending = up.to_send.pop_front();
            continue;
        }
        if up.input_done {
            *input_finished = true;
            let _ = send.finish();
            return Ok(());
        }
        match rest.next_chunk().await {
            Ok(Some(c)) => {
                if up.replayable && up.replay_len + c.len() <= cfg.replay_buffer {
                    up.replay_len += c.len();
                    up.replay.push_back(c.clone());
                } else if up.replayable {
                    up.replayable = false;
                    up.replay.clear();
                }
                up.pending = Some(c);
            }
            Ok(None) => up.input_done = true,
            Err(e) => {
                let _ = send.reset(RESET_ABANDONED.into());
                return Err(InputError(e));
            }
        }
    }
}

/// Copies the daemon's output frames into `output` until its trailer.
async fn read_output<O: Output>(
    reader: &mut FrameReader<quinn::RecvStream>,
    output: &mut O,
) -> Result<Trailer, MidTask> {
    let link = |reason: String| MidTask { link: true, reason };
    loop {
        let frame = match reader.next().await {
            Ok(Some(f)) => f,
            Ok(None) => return Err(link("daemon ended the stream without a trailer".into())),
            Err(e) => return Err(link(format!("connection lost mid-task: {e}"))),
        };
        match frame.kind {
            FrameKind::Data => output.write(frame.payload).await.map_err(|e| MidTask {
                link: false,
                reason: format!("delivering output: {e}"),
            })?,
            FrameKind::Trailer => {
                return Trailer::from_frame(&frame)
                    .map_err(|e| link(format!("daemon misbehaved: {e}")))
            }
            other => {
                return Err(link(format!(
                    "daemon misbehaved: unexpected {other:?} frame"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use tokio::time::Instant;

    /// Input whose chunks are ready, or not yet, in a fixed order.
    struct Scripted(VecDeque<Option<Option<Bytes>>>);

    impl Input for Scripted {
        async fn next_chunk(&mut self) -> std::io::Result<Option<Bytes>> {
            match self.0.pop_front() {
                Some(Some(chunk)) => Ok(chunk),
                // Not ready: waits for ever (the test polls once).
                Some(None) | None => std::future::pending().await,
            }
        }
    }

    /// A small input that is ready goes out with the request, its end too; one that
    /// is not ready, or too big, is left to the exchange; what was read stays
    /// replayable, replayed chunks first.
    #[test]
    fn ready_input_goes_with_the_request_and_stays_replayable() {
        let cfg = LinkConfig::default();
        let b = |s: &'static str| Bytes::from_static(s.as_bytes());
        let ready = |c: Option<Bytes>| Some(c);

        let mut up = Upload::new(VecDeque::from([b("old")]));
        let mut input = Scripted(VecDeque::from([ready(Some(b("ab"))), ready(None)]));
        let (first, err) = ready_input(&mut input, &mut up, &cfg);
        assert!(err.is_none());
        assert_eq!(first, [b("old"), b("ab")]);
        assert!(up.input_done && up.pending.is_none());
        assert_eq!(up.replay, [b("old"), b("ab")]);
        assert_eq!(up.replay_len, 5);

        let mut up = Upload::new(VecDeque::new());
        let mut input = Scripted(VecDeque::from([ready(Some(b("ab"))), None]));
        let (first, _) = ready_input(&mut input, &mut up, &cfg);
        assert_eq!(first, [b("ab")]);
        assert!(!up.input_done, "the end has not come yet");

        let big = Bytes::from(vec![7u8; READY_INPUT_MAX + 1]);
        let mut up = Upload::new(VecDeque::new());
        let mut input = Scripted(VecDeque::from([ready(Some(big.clone())), ready(None)]));
        let (first, _) = ready_input(&mut input, &mut up, &cfg);
        assert!(first.is_empty());
        assert_eq!(
            up.pending.as_ref(),
            Some(&big),
            "sent by the exchange instead"
        );
        assert!(!up.input_done);
        assert_eq!(up.replay, [big]);
    }

    #[test]
    fn an_input_error_says_it_was_the_input() {
        let e = || std::io::Error::other("disk on fire");
        assert_eq!(
            InputError(e()).to_string(),
            "reading the task's input: disk on fire"
        );
    }

    #[test]
    fn dial_errors_name_the_daemon() {
        let address = || "cloud.example:4433".to_string();
        let refused = || std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let text = |e: DialError| e.to_string();
        assert_eq!(
            text(DialError::Resolve {
                address: address(),
                error: refused()
            }),
            format!("cannot resolve cloud.example:4433: {}", refused())
        );
        assert_eq!(
            text(DialError::NoAddress(address())),
            "cloud.example:4433 resolves to no address"
        );
        let stopping = quinn::ConnectError::EndpointStopping;
        assert_eq!(
            text(DialError::Start(stopping.clone())),
            stopping.to_string()
        );
        assert_eq!(
            text(DialError::Handshake {
                address: address(),
                error: quinn::ConnectionError::TimedOut
            }),
            format!(
                "handshake with cloud.example:4433: {}",
                quinn::ConnectionError::TimedOut
            )
        );
        assert_eq!(
            text(DialError::Timeout {
                address: address(),
                timeout: Duration::from_secs(5)
            }),
            "no answer from cloud.example:4433 within 5s"
        );
    }

    fn reconnect(min_ms: u64, max_ms: u64) -> Reconnect {
        Reconnect::new(&LinkConfig {
            reconnect_min: Duration::from_millis(min_ms),
            reconnect_max: Duration::from_millis(max_ms),
            ..LinkConfig::default()
        })
    }

    /// The middle of the jitter range: the wait is the backoff itself.
    const NO_JITTER: f64 = 0.5;

    #[test]
    fn backoff_doubles_from_min_and_stops_at_max() {
        let mut r = reconnect(100, 1000);
        let waits: Vec<u64> = (0..7)
            .map(|_| r.next_wait(NO_JITTER).as_millis() as u64)
            .collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000, 1000]);
    }

    #[test]
    fn jitter_spreads_a_wait_by_a_fifth_either_way() {
        let wait = |jitter| reconnect(1000, 1000).next_wait(jitter);
        assert_eq!(wait(0.0), Duration::from_millis(800));
        assert_eq!(wait(NO_JITTER), Duration::from_millis(1000));
        assert!(wait(0.999_999) < Duration::from_millis(1200));
        assert!(wait(0.999_999) > Duration::from_millis(1199));
    }

    #[test]
    fn a_connection_that_held_starts_backoff_over() {
        let mut r = reconnect(100, 10_000);
        assert_eq!(r.failed(), 1);
        assert_eq!(r.failed(), 2);
        r.next_wait(NO_JITTER);
        r.next_wait(NO_JITTER);
        assert!(r.closed_after(HELD_AFTER));
        assert_eq!(r.failures, 0);
        assert_eq!(r.next_wait(NO_JITTER), Duration::from_millis(100));
    }

    #[test]
    fn a_connection_dropped_at_once_is_a_failed_attempt() {
        let mut r = reconnect(100, 10_000);
        r.next_wait(NO_JITTER);
        assert!(!r.closed_after(HELD_AFTER - Duration::from_millis(1)));
        assert!(!r.closed_after(Duration::ZERO));
        assert_eq!(r.failures, 2);
        // Backoff goes on growing: the daemon that refuses us is not hammered.
        assert_eq!(r.next_wait(NO_JITTER), Duration::from_millis(200));
    }

    #[test]
    fn the_first_answer_decides_whether_the_task_may_run_elsewhere() {
        let answer = |reply| match read_answer(reply) {
            Ok(()) => "accepted".to_string(),
            Err(Refusal::NotStarted {
                code,
                reason,
                reset,
            }) => format!("not started {code:?} reset={reset}: {reason}"),
            Err(Refusal::Unsure(reason)) => format!("unsure: {reason}"),
        };
        assert_eq!(
            answer(Ok(Some(ReplyHeader::Accepted.to_frame()))),
            "accepted"
        );
        let busy = ReplyHeader::Rejected {
            code: ErrorCode::Busy,
            message: "all slots taken".into(),
        };
        assert_eq!(
            answer(Ok(Some(busy.to_frame()))),
            "not started Some(Busy) reset=false: all slots taken"
        );
        assert_eq!(
            answer(Ok(None)),
            "not started None reset=false: daemon closed the stream without answering"
        );
        // A daemon that misbehaves is not left waiting for the rest of the input.
        let garbage = Frame::new(FrameKind::Reply, &b"{"[..]);
        assert!(answer(Ok(Some(garbage)))
            .starts_with("not started None reset=true: daemon misbehaved: "));
        // The request may have reached the daemon: the task is not known not to run.
        let lost = WireError::Io(std::io::ErrorKind::ConnectionReset.into());
        assert_eq!(
            answer(Err(lost)),
            "unsure: connection failed before the daemon answered: transport: connection reset"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_gives_up_at_its_deadline() {
        let changed = Notify::new();
        let start = Instant::now();
        let looks = Cell::new(0);
        let got: Option<()> = wait_until(&[&changed], start + Duration::from_secs(5), || {
            looks.set(looks.get() + 1);
            Check::Wait
        })
        .await;
        assert_eq!(got, None);
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        assert_eq!(
            looks.get(),
            1,
            "nothing changed, so nothing to look at again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_returns_as_soon_as_a_change_makes_it_ready() {
        let changed = Arc::new([Notify::new(), Notify::new()]);
        let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let start = Instant::now();
        let (c, u) = (changed.clone(), up.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            // A change that does not make it ready: looked at, waited on.
            c[0].notify_waiters();
            tokio::time::sleep(Duration::from_secs(1)).await;
            u.store(true, std::sync::atomic::Ordering::SeqCst);
            c[1].notify_waiters();
        });
        let looks = Cell::new(0);
        let got = wait_until(
            &[&changed[0], &changed[1]],
            start + Duration::from_secs(60),
            || {
                looks.set(looks.get() + 1);
                if up.load(std::sync::atomic::Ordering::SeqCst) {
                    Check::Ready(7)
                } else {
                    Check::Wait
                }
            },
        )
        .await;
        assert_eq!(got, Some(7));
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        assert_eq!(looks.get(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_while_looking_is_not_missed() {
        let changed = Notify::new();
        let start = Instant::now();
        let looks = Cell::new(0);
        let got = wait_until(&[&changed], start + Duration::from_secs(60), || {
            looks.set(looks.get() + 1);
            if looks.get() == 1 {
                // The link changes after this look saw nothing and before the wait.
                changed.notify_waiters();
                Check::Wait
            } else {
                Check::Ready(())
            }
        })
        .await;
        assert_eq!(got, Some(()));
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_told_to_give_up_does_not_wait() {
        let changed = Notify::new();
        let start = Instant::now();
        let got: Option<()> = wait_until(&[&changed], start + Duration::from_secs(60), || {
            Check::GiveUp
        })
        .await;
        assert_eq!(got, None);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
