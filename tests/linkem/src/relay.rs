//! The UDP relay: sockets, per-client mappings, and one scheduler task per direction
//! that holds datagrams until the [`Link`] model says they arrive.
//!
//! Tasks, all on the runtime that called [`Relay::start`]:
//! - the *listener* reads the client-facing socket, finds or creates the client's
//!   mapping (its own upstream socket, like a NAT entry) and hands the datagram to the
//!   up scheduler;
//! - one *mapping* task per client reads that client's upstream socket, hands replies to
//!   the down scheduler, and retires the mapping once it has been idle for
//!   [`RelayOptions::idle_timeout`];
//! - the *up* and *down* schedulers run the link model and send each datagram when it is
//!   due, from a binary heap ordered by arrival time.
//!
//! Both directions are one shared link each, as on a real access link: all clients
//! share the bandwidth cap and the random streams.

use crate::link::{Link, Verdict, IPV4_UDP_OVERHEAD, IPV6_UDP_OVERHEAD};
use crate::params::{is_loopback, LinkParams, ParamsError};
use serde::Serialize;
use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a client mapping lives without traffic in either direction.
///
/// 60 s is longer than QUIC's default idle timeout and keep-alive intervals, so a live
/// connection never loses its mapping, yet short enough that a test that migrates its
/// client many times does not pile up sockets. (Real NATs keep UDP mappings 30 s to a few
/// minutes.)
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Most clients the relay maps at once; datagrams from further clients are dropped.
///
/// Each mapping holds a socket and a 64 KiB receive buffer; 256 clients is far more than
/// any test starts, and the bound keeps a runaway test from exhausting file descriptors.
pub const DEFAULT_MAPPING_LIMIT: usize = 256;

/// Largest UDP payload; receive buffers are this big so nothing is truncated.
const MAX_DATAGRAM: usize = 65_535;

/// Datagrams that may wait between a socket reader and its scheduler. When the scheduler
/// falls behind, readers stop reading and the kernel's socket buffer drops the excess,
/// as a real overloaded router would.
const SCHEDULER_BACKLOG: usize = 4096;

/// Datagrams a scheduler takes from its inbox per wake-up, to amortise the wake-up cost.
const SCHEDULER_BATCH: usize = 256;

/// One direction of the link.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Client to upstream (agent to daemon).
    Up,
    /// Upstream to client (daemon to agent).
    Down,
}

/// Which directions a settings change applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    /// Client to upstream only.
    Up,
    /// Upstream to client only.
    Down,
    /// Both directions.
    Both,
}

/// Everything [`Relay::start_with`] needs.
#[derive(Clone, Debug)]
pub struct RelayOptions {
    /// Client-facing address to bind, e.g. `127.0.0.1:0`.
    pub listen: SocketAddr,
    /// The server the clients are relayed to.
    pub upstream: SocketAddr,
    /// Client → upstream settings.
    pub up: LinkParams,
    /// Upstream → client settings.
    pub down: LinkParams,
    /// Seed for loss and jitter decisions; each direction derives its own streams.
    pub seed: u64,
    /// See [`DEFAULT_IDLE_TIMEOUT`].
    pub idle_timeout: Duration,
    /// See [`DEFAULT_MAPPING_LIMIT`].
    pub mapping_limit: usize,
    /// Accept non-loopback `listen`/`upstream` addresses. Only for addresses inside
    /// network namespaces the project created itself; nothing else may be a target.
    pub allow_non_loopback: bool,
}

impl RelayOptions {
    /// Options for a perfect link between `listen` and `upstream`, seed 0.
    pub fn new(listen: SocketAddr, upstream: SocketAddr) -> Self {
        Self {
            listen,
            upstream,
            up: LinkParams::default(),
            down: LinkParams::default(),
            seed: 0,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            mapping_limit: DEFAULT_MAPPING_LIMIT,
            allow_non_loopback: false,
        }
    }
}

/// Counters for one direction. `received = forwarded + dropped_loss + dropped_queue +
/// blackholed + send_errors + (datagrams still in flight)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DirectionStats {
    /// Datagrams that entered this direction.
    pub received_packets: u64,
    /// Their payload bytes.
    pub received_bytes: u64,
    /// Datagrams sent on to the far end.
    pub forwarded_packets: u64,
    /// Their payload bytes.
    pub forwarded_bytes: u64,
    /// Datagrams lost at random.
    pub dropped_loss: u64,
    /// Datagrams dropped because the bandwidth queue was full.
    pub dropped_queue: u64,
    /// Datagrams dropped by the blackhole, on entry or while in flight.
    pub blackholed: u64,
    /// Datagrams the operating system refused to send.
    pub send_errors: u64,
}

impl DirectionStats {
    /// Datagrams that entered but are neither forwarded nor dropped yet.
    pub fn in_flight(&self) -> u64 {
        self.received_packets.saturating_sub(
            self.forwarded_packets
                + self.dropped_loss
                + self.dropped_queue
                + self.blackholed
                + self.send_errors,
        )
    }
}

/// A snapshot of the relay's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Client → upstream.
    pub up: DirectionStats,
    /// Upstream → client.
    pub down: DirectionStats,
    /// Client mappings alive now.
    pub mappings_active: u64,
    /// Client mappings created since start.
    pub mappings_created: u64,
    /// Datagrams dropped because the mapping limit was reached.
    pub mappings_refused: u64,
}

#[derive(Default)]
struct DirectionCounters {
    received_packets: AtomicU64,
    received_bytes: AtomicU64,
    forwarded_packets: AtomicU64,
    forwarded_bytes: AtomicU64,
    dropped_loss: AtomicU64,
    dropped_queue: AtomicU64,
    blackholed: AtomicU64,
    send_errors: AtomicU64,
}

impl DirectionCounters {
    fn snapshot(&self) -> DirectionStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DirectionStats {
            received_packets: get(&self.received_packets),
            received_bytes: get(&self.received_bytes),
            forwarded_packets: get(&self.forwarded_packets),
            forwarded_bytes: get(&self.forwarded_bytes),
            dropped_loss: get(&self.dropped_loss),
            dropped_queue: get(&self.dropped_queue),
            blackholed: get(&self.blackholed),
            send_errors: get(&self.send_errors),
        }
    }
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// A client's NAT entry.
struct Mapping {
    socket: Arc<UdpSocket>,
    /// Milliseconds since the relay's epoch of the last datagram either way.
    last_active: AtomicU64,
}

/// State shared by the relay's tasks and handles.
struct Shared {
    local_addr: SocketAddr,
    upstream: SocketAddr,
    epoch: Instant,
    idle_timeout: Duration,
    mapping_limit: usize,
    mappings: Mutex<HashMap<SocketAddr, Arc<Mapping>>>,
    up_params: watch::Sender<LinkParams>,
    down_params: watch::Sender<LinkParams>,
    up: DirectionCounters,
    down: DirectionCounters,
    mappings_created: AtomicU64,
    mappings_refused: AtomicU64,
}

impl Shared {
    fn millis_since_epoch(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    fn counters(&self, dir: Direction) -> &DirectionCounters {
        match dir {
            Direction::Up => &self.up,
            Direction::Down => &self.down,
        }
    }

    fn params(&self, dir: Direction) -> &watch::Sender<LinkParams> {
        match dir {
            Direction::Up => &self.up_params,
            Direction::Down => &self.down_params,
        }
    }
}

/// A running relay. Dropping it stops its tasks; [`Relay::shutdown`] also waits for them.
pub struct Relay {
    handle: RelayHandle,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

/// A cheap, cloneable, thread-safe handle to change a running relay's settings and read
/// its counters. It does not keep the relay running.
#[derive(Clone)]
pub struct RelayHandle {
    shared: Arc<Shared>,
}

impl Relay {
    /// Starts a relay from `listen` to `upstream` with the same settings both ways, on the
    /// current tokio runtime. Both addresses must be loopback; see
    /// [`Relay::start_with`] for everything else.
    pub fn start(
        listen: SocketAddr,
        upstream: SocketAddr,
        params: LinkParams,
        seed: u64,
    ) -> io::Result<Relay> {
        let mut options = RelayOptions::new(listen, upstream);
        options.up = params;
        options.down = params;
        options.seed = seed;
        Self::start_with(options)
    }

    /// Starts a relay on the current tokio runtime.
    ///
    /// Fails with [`io::ErrorKind::InvalidInput`] when an address is not loopback and
    /// `allow_non_loopback` is off, or when settings are invalid, and with the binding
    /// error when the listen socket cannot be bound. Must be called within a tokio runtime.
    pub fn start_with(options: RelayOptions) -> io::Result<Relay> {
        let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
        if !options.allow_non_loopback {
            for (what, addr) in [("listen", options.listen), ("upstream", options.upstream)] {
                if !is_loopback(&addr) {
                    return Err(invalid(format!(
                        "refusing {what} address {addr}: not loopback (127.0.0.0/8, ::1); \
                         other addresses only inside the project's own network namespaces, \
                         with allow_non_loopback"
                    )));
                }
            }
        }
        for p in [&options.up, &options.down] {
            p.validate().map_err(|e| invalid(e.to_string()))?;
        }
        tokio::runtime::Handle::try_current()
            .map_err(|e| io::Error::other(format!("Relay::start needs a tokio runtime: {e}")))?;

        let listener = bind(options.listen)?;
        let local_addr = listener.local_addr()?;
        let listener = Arc::new(listener);

        let (up_params, up_params_rx) = watch::channel(options.up);
        let (down_params, down_params_rx) = watch::channel(options.down);
        let shared = Arc::new(Shared {
            local_addr,
            upstream: options.upstream,
            epoch: Instant::now(),
            idle_timeout: options.idle_timeout,
            mapping_limit: options.mapping_limit,
            mappings: Mutex::new(HashMap::new()),
            up_params,
            down_params,
            up: DirectionCounters::default(),
            down: DirectionCounters::default(),
            mappings_created: AtomicU64::new(0),
            mappings_refused: AtomicU64::new(0),
        });
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();

        let (up_tx, up_rx) = mpsc::channel(SCHEDULER_BACKLOG);
        let (down_tx, down_rx) = mpsc::channel(SCHEDULER_BACKLOG);
        // Derived so the two directions do not lose the same datagram numbers.
        let up_link = Link::new(options.up, options.seed);
        let down_link = Link::new(options.down, options.seed ^ 0x9e37_79b9_7f4a_7c15);

        tracker.spawn(schedule(
            Direction::Up,
            up_rx,
            up_params_rx,
            up_link,
            shared.clone(),
            cancel.clone(),
        ));
        tracker.spawn(schedule(
            Direction::Down,
            down_rx,
            down_params_rx,
            down_link,
            shared.clone(),
            cancel.clone(),
        ));
        tracker.spawn(listen(
            listener,
            up_tx,
            down_tx,
            shared.clone(),
            cancel.clone(),
            tracker.clone(),
        ));
        tracing::debug!(%local_addr, upstream = %options.upstream, "link emulator started");
        Ok(Relay {
            handle: RelayHandle { shared },
            cancel,
            tracker,
        })
    }

    /// The client-facing address (with the port the OS chose for `:0`).
    pub fn local_addr(&self) -> SocketAddr {
        self.handle.local_addr()
    }

    /// A handle for changing settings and reading counters from anywhere.
    pub fn handle(&self) -> RelayHandle {
        self.handle.clone()
    }

    /// Sets both directions' settings; see [`RelayHandle::set_params`].
    pub fn set_params(&self, up: LinkParams, down: LinkParams) -> Result<(), ParamsError> {
        self.handle.set_params(up, down)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.handle.stats()
    }

    /// Stops relaying and waits for every task to finish. Datagrams still in flight are
    /// dropped, as they would be if the link went away.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("local_addr", &self.handle.shared.local_addr)
            .field("upstream", &self.handle.shared.upstream)
            .finish()
    }
}

impl std::fmt::Debug for RelayHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayHandle")
            .field("local_addr", &self.shared.local_addr)
            .finish()
    }
}

impl RelayHandle {
    /// The relay's client-facing address.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// The server the relay forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
    }

    /// Replaces both directions' settings. Datagrams already scheduled keep their arrival
    /// time (but are dropped if the blackhole is turned on). Nothing changes if either is
    /// invalid.
    pub fn set_params(&self, up: LinkParams, down: LinkParams) -> Result<(), ParamsError> {
        up.validate()?;
        down.validate()?;
        self.shared.up_params.send_replace(up);
        self.shared.down_params.send_replace(down);
        Ok(())
    }

    /// Sets both directions to the same settings.
    pub fn set_both(&self, params: LinkParams) -> Result<(), ParamsError> {
        self.set_params(params, params)
    }

    /// Sets the client → upstream settings.
    pub fn set_up(&self, params: LinkParams) -> Result<(), ParamsError> {
        self.modify(Which::Up, |p| *p = params)
    }

    /// Sets the upstream → client settings.
    pub fn set_down(&self, params: LinkParams) -> Result<(), ParamsError> {
        self.modify(Which::Down, |p| *p = params)
    }

    /// Edits the settings of the chosen directions in place, e.g.
    /// `handle.modify(Which::Both, |p| p.loss = 0.2)`. Nothing changes if the result is
    /// invalid.
    pub fn modify(
        &self,
        which: Which,
        mut edit: impl FnMut(&mut LinkParams),
    ) -> Result<(), ParamsError> {
        let dirs: &[Direction] = match which {
            Which::Up => &[Direction::Up],
            Which::Down => &[Direction::Down],
            Which::Both => &[Direction::Up, Direction::Down],
        };
        let mut edited = Vec::with_capacity(dirs.len());
        for &dir in dirs {
            let mut p = *self.shared.params(dir).borrow();
            edit(&mut p);
            p.validate()?;
            edited.push((dir, p));
        }
        for (dir, p) in edited {
            self.shared.params(dir).send_replace(p);
        }
        Ok(())
    }

    /// Turns the blackhole on or off in both directions: on drops everything, including
    /// datagrams already in flight.
    pub fn set_blackhole(&self, on: bool) {
        for dir in [Direction::Up, Direction::Down] {
            self.shared.params(dir).send_modify(|p| p.blackhole = on);
        }
    }

    /// The settings in force, `(up, down)`.
    pub fn params(&self) -> (LinkParams, LinkParams) {
        (
            *self.shared.up_params.borrow(),
            *self.shared.down_params.borrow(),
        )
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        let s = &self.shared;
        Stats {
            up: s.up.snapshot(),
            down: s.down.snapshot(),
            mappings_active: s.mappings.lock().map_or(0, |m| m.len() as u64),
            mappings_created: s.mappings_created.load(Ordering::Relaxed),
            mappings_refused: s.mappings_refused.load(Ordering::Relaxed),
        }
    }
}

/// A datagram on its way into a scheduler.
struct Inbound {
    data: Vec<u8>,
    /// When the relay read it: the moment it entered the emulated link.
    entered: Instant,
    /// Where it leaves the relay.
    via: Arc<UdpSocket>,
    /// `None` for a connected upstream socket.
    to: Option<SocketAddr>,
}

/// A datagram waiting in a scheduler's heap.
struct Scheduled {
    at: Instant,
    seq: u64,
    packet: Inbound,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    /// Reversed, so the max-heap pops the earliest arrival (FIFO among equals).
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

/// Where a mapping's upstream socket binds: loopback for a loopback upstream so traffic
/// never leaves the host's loopback interface, otherwise the wildcard of the same family.
fn upstream_bind_addr(upstream: SocketAddr) -> SocketAddr {
    let ip = match (upstream.ip(), is_loopback(&upstream)) {
        (IpAddr::V4(_), true) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        (IpAddr::V6(_), true) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        (IpAddr::V4(_), false) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        (IpAddr::V6(_), false) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    SocketAddr::new(ip, 0)
}

fn wire_len(payload: usize, peer: SocketAddr) -> usize {
    payload
        + match peer {
            SocketAddr::V4(_) => IPV4_UDP_OVERHEAD,
            SocketAddr::V6(_) => IPV6_UDP_OVERHEAD,
        }
}

/// Reads the client-facing socket and feeds the up scheduler.
async fn listen(
    listener: Arc<UdpSocket>,
    up_tx: mpsc::Sender<Inbound>,
    down_tx: mpsc::Sender<Inbound>,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (len, client) = tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "client-side receive failed");
                    continue;
                }
            },
        };
        let entered = Instant::now();
        let Some(mapping) = mapping_for(client, &listener, &down_tx, &shared, &cancel, &tracker)
        else {
            continue;
        };
        mapping
            .last_active
            .store(shared.millis_since_epoch(entered), Ordering::Relaxed);
        bump(&shared.up.received_packets, 1);
        bump(&shared.up.received_bytes, len as u64);
        let packet = Inbound {
            data: buf[..len].to_vec(),
            entered,
            via: mapping.socket.clone(),
            to: None,
        };
        if up_tx.send(packet).await.is_err() {
            break;
        }
    }
}

/// Finds the client's mapping or creates one (socket + reader task). `None` when the
/// mapping limit is reached or the socket cannot be made.
fn mapping_for(
    client: SocketAddr,
    listener: &Arc<UdpSocket>,
    down_tx: &mpsc::Sender<Inbound>,
    shared: &Arc<Shared>,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) -> Option<Arc<Mapping>> {
    let mut mappings = shared.mappings.lock().ok()?;
    if let Some(m) = mappings.get(&client) {
        return Some(m.clone());
    }
    if mappings.len() >= shared.mapping_limit {
        bump(&shared.mappings_refused, 1);
        tracing::warn!(%client, limit = shared.mapping_limit, "mapping limit reached; dropping");
        return None;
    }
    let socket = match bind(upstream_bind_addr(shared.upstream)).and_then(|s| {
        // Connected, so the kernel hands this socket only the upstream's replies.
        let std = s.into_std()?;
        std.connect(shared.upstream)?;
        UdpSocket::from_std(std)
    }) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            bump(&shared.mappings_refused, 1);
            tracing::warn!(%client, error = %e, "cannot open upstream socket; dropping");
            return None;
        }
    };
    let mapping = Arc::new(Mapping {
        socket,
        last_active: AtomicU64::new(0),
    });
    mappings.insert(client, mapping.clone());
    bump(&shared.mappings_created, 1);
    tracing::debug!(%client, via = ?mapping.socket.local_addr().ok(), "new mapping");
    tracker.spawn(run_mapping(
        client,
        mapping.clone(),
        listener.clone(),
        down_tx.clone(),
        shared.clone(),
        cancel.clone(),
    ));
    Some(mapping)
}

/// Reads one client's upstream socket into the down scheduler until the mapping idles out.
async fn run_mapping(
    client: SocketAddr,
    mapping: Arc<Mapping>,
    listener: Arc<UdpSocket>,
    down_tx: mpsc::Sender<Inbound>,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let idle_check = sleep_until(Instant::now() + shared.idle_timeout);
    tokio::pin!(idle_check);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = &mut idle_check => {
                let last = shared.epoch
                    + Duration::from_millis(mapping.last_active.load(Ordering::Relaxed));
                let expires = last + shared.idle_timeout;
                if Instant::now() >= expires {
                    let mut mappings = match shared.mappings.lock() {
                        Ok(m) => m,
                        Err(_) => break,
                    };
                    if mappings.get(&client).is_some_and(|m| Arc::ptr_eq(m, &mapping)) {
                        mappings.remove(&client);
                    }
                    tracing::debug!(%client, "mapping expired");
                    break;
                }
                idle_check.as_mut().reset(expires);
            }
            r = mapping.socket.recv(&mut buf) => match r {
                Ok(len) => {
                    let entered = Instant::now();
                    mapping.last_active.store(shared.millis_since_epoch(entered), Ordering::Relaxed);
                    bump(&shared.down.received_packets, 1);
                    bump(&shared.down.received_bytes, len as u64);
                    let packet = Inbound {
                        data: buf[..len].to_vec(),
                        entered,
                        via: listener.clone(),
                        to: Some(client),
                    };
                    if down_tx.send(packet).await.is_err() {
                        break;
                    }
                }
                // E.g. ECONNREFUSED after an ICMP port-unreachable while the server is
                // not up yet: the mapping stays usable.
                Err(e) => tracing::trace!(%client, error = %e, "upstream receive failed"),
            },
        }
    }
}

/// Runs the link model for one direction and sends datagrams when they are due.
async fn schedule(
    dir: Direction,
    mut inbox: mpsc::Receiver<Inbound>,
    mut params: watch::Receiver<LinkParams>,
    mut link: Link,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let counters = shared.counters(dir);
    let mut heap: BinaryHeap<Scheduled> = BinaryHeap::new();
    let mut batch = Vec::with_capacity(SCHEDULER_BATCH);
    let mut seq = 0u64;
    let timer = sleep_until(Instant::now());
    tokio::pin!(timer);
    let mut armed = false;
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            n = inbox.recv_many(&mut batch, SCHEDULER_BATCH) => {
                if n == 0 {
                    break;
                }
                if params.has_changed().unwrap_or(false) {
                    link.set_params(*params.borrow_and_update());
                }
                for packet in batch.drain(..) {
                    let peer = packet.to.unwrap_or(shared.upstream);
                    match link.admit(packet.entered, wire_len(packet.data.len(), peer)) {
                        Verdict::Deliver { at } => {
                            seq += 1;
                            heap.push(Scheduled { at, seq, packet });
                        }
                        Verdict::Lost => bump(&counters.dropped_loss, 1),
                        Verdict::QueueFull => bump(&counters.dropped_queue, 1),
                        Verdict::Blackholed => bump(&counters.blackholed, 1),
                    }
                }
            }
            _ = &mut timer, if armed => {}
        }

        let now = Instant::now();
        // Read live, so turning the blackhole on also cuts what is in flight.
        let blackhole = params.borrow().blackhole;
        while heap.peek().is_some_and(|s| s.at <= now) {
            let Some(Scheduled { packet, .. }) = heap.pop() else {
                break;
            };
            if blackhole {
                bump(&counters.blackholed, 1);
                continue;
            }
            let sent = match packet.to {
                Some(to) => packet.via.send_to(&packet.data, to).await,
                None => packet.via.send(&packet.data).await,
            };
            match sent {
                Ok(_) => {
                    bump(&counters.forwarded_packets, 1);
                    bump(&counters.forwarded_bytes, packet.data.len() as u64);
                }
                Err(e) => {
                    bump(&counters.send_errors, 1);
                    tracing::trace!(?dir, error = %e, "send failed");
                }
            }
        }
        armed = match heap.peek() {
            Some(next) => {
                timer.as_mut().reset(next.at);
                true
            }
            None => false,
        };
    }
}
