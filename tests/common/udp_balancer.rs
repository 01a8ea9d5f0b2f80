//! A plain UDP load balancer on loopback, for end-to-end tests of agents reaching
//! several daemon replicas through one address, as a cloud's layer-4 balancer does.
//!
//! It knows nothing of QUIC: it keys flows by the client's address (ip:port, the
//! 4-tuple with its own address fixed) and gives each new one a backend by hashing that
//! address, so the same address always reaches the same replica and a client whose
//! port changes (a NAT rebinding) is a new flow that may land on another. Each flow has
//! its own upstream socket, so backends see one peer per client address, and replies
//! go back to the client from the balancer's address.
//!
//! To move a client to another replica in a test: `balancer.pin(other)` so new flows go
//! there, then change the client's address, e.g. `endpoint.rebind(std::net::UdpSocket
//! ::bind("127.0.0.1:0")?)` on a quinn endpoint. Flows already seen keep their backend.
//!
//! The relay runs on the tokio runtime it was started on and stops, closing its
//! sockets, when the [`UdpBalancer`] is dropped.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::task::{AbortHandle, JoinSet};

/// The backend, of `backends`, that a client at `client` is sent to when nothing is
/// pinned: FNV-1a over its IP address and port, so it is the same in every run and
/// depends on the port as much as on the address.
pub fn pick(client: SocketAddr, backends: usize) -> usize {
    assert!(backends > 0, "pick: no backends");
    let mut bytes = match client.ip() {
        std::net::IpAddr::V4(ip) => ip.octets().to_vec(),
        std::net::IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    bytes.extend_from_slice(&client.port().to_be_bytes());
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % backends as u64) as usize
}

/// What the relay and the test share.
struct Shared {
    backends: Vec<SocketAddr>,
    /// Where new flows go instead of their hash, when set.
    pinned: Mutex<Option<usize>>,
    /// Every flow so far: the client's address and its backend's index.
    flows: Mutex<HashMap<SocketAddr, usize>>,
}

/// A running balancer; dropping it stops it.
pub struct UdpBalancer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    relay: AbortHandle,
}

impl UdpBalancer {
    /// Listens on 127.0.0.1 (a free port) and relays to `backends`, which must be on
    /// loopback too. Call it inside a tokio runtime.
    pub async fn start(backends: &[SocketAddr]) -> io::Result<Self> {
        assert!(!backends.is_empty(), "UdpBalancer::start: no backends");
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = front.local_addr()?;
        let shared = Arc::new(Shared {
            backends: backends.to_vec(),
            pinned: Mutex::new(None),
            flows: Mutex::new(HashMap::new()),
        });
        let relay = tokio::spawn(forward(front, shared.clone())).abort_handle();
        Ok(Self {
            addr,
            shared,
            relay,
        })
    }

    /// The address clients send to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends every client address not seen before to `backend` (an index into the
    /// backends given to [`UdpBalancer::start`]), until [`UdpBalancer::unpin`].
    pub fn pin(&self, backend: usize) {
        let n = self.shared.backends.len();
        assert!(
            backend < n,
            "UdpBalancer::pin: backend {backend} does not exist (there are {n})"
        );
        *self.shared.pinned.lock().unwrap() = Some(backend);
    }

    /// New client addresses are hashed again ([`pick`]).
    pub fn unpin(&self) {
        *self.shared.pinned.lock().unwrap() = None;
    }

    /// The backend the flow of `client` goes to, once it has sent a datagram.
    pub fn backend_of(&self, client: SocketAddr) -> Option<usize> {
        self.shared.flows.lock().unwrap().get(&client).copied()
    }

    /// Every client address seen so far, with its backend.
    pub fn flows(&self) -> Vec<(SocketAddr, usize)> {
        let mut v: Vec<_> = self
            .shared
            .flows
            .lock()
            .unwrap()
            .iter()
            .map(|(c, b)| (*c, *b))
            .collect();
        v.sort();
        v
    }
}

impl Drop for UdpBalancer {
    fn drop(&mut self) {
        // Dropping the relay's future drops its sockets and its JoinSet, which aborts
        // the per-flow tasks and so closes the upstream sockets.
        self.relay.abort();
    }
}

/// Largest UDP payload; QUIC datagrams are far smaller.
const MAX_DATAGRAM: usize = 65_535;
/// How long a relay loop waits after a failed receive before the next.
const ERROR_PAUSE: Duration = Duration::from_millis(1);

/// Client to backend: one upstream socket per client address, made on its first
/// datagram, with a task relaying the backend's answers back.
async fn forward(front: Arc<UdpSocket>, shared: Arc<Shared>) {
    let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut replies = JoinSet::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        // An error here is about one datagram, not the socket: drop it, as a balancer
        // would (the pause keeps an unforeseen lasting error from spinning a core).
        let Ok((n, client)) = front.recv_from(&mut buf).await else {
            tokio::time::sleep(ERROR_PAUSE).await;
            continue;
        };
        let upstream = match upstreams.get(&client) {
            Some(u) => u.clone(),
            None => {
                let backend = shared
                    .pinned
                    .lock()
                    .unwrap()
                    .unwrap_or_else(|| pick(client, shared.backends.len()));
                let Ok(u) = upstream_to(shared.backends[backend]).await else {
                    continue;
                };
                let u = Arc::new(u);
                shared.flows.lock().unwrap().insert(client, backend);
                upstreams.insert(client, u.clone());
                replies.spawn(reply(u.clone(), front.clone(), client));
                u
            }
        };
        // A backend that is down answers with ICMP, which the reply task reads as an
        // error and ignores: the datagram is lost, as it would be.
        let _ = upstream.send(&buf[..n]).await;
    }
}

/// A socket of its own for one flow, connected to its backend so it hears only it.
async fn upstream_to(backend: SocketAddr) -> io::Result<UdpSocket> {
    let u = UdpSocket::bind("127.0.0.1:0").await?;
    u.connect(backend).await?;
    Ok(u)
}

/// Backend to client, for one flow.
async fn reply(upstream: Arc<UdpSocket>, front: Arc<UdpSocket>, client: SocketAddr) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        // ECONNREFUSED after sending to a backend that is not listening (yet): keep
        // the flow, the backend may come back.
        let Ok(n) = upstream.recv(&mut buf).await else {
            tokio::time::sleep(ERROR_PAUSE).await;
            continue;
        };
        let _ = front.send_to(&buf[..n], client).await;
    }
}
