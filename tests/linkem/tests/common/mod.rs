//! Helpers for the relay tests: a UDP echo (or sink) server that records what it saw, and
//! bounded waits on conditions.

// Each test binary includes this as `mod common` and uses a different part of it: what
// one leaves unused is not dead, and `pub` is how the binaries see it.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::UdpSocket;

/// Upper bound for any single wait in these tests: generous, because a loaded 2-core CI
/// machine can stall for seconds, and only a hang should fail a test.
pub const WAIT: Duration = Duration::from_secs(30);

/// Datagrams a server received, with their senders, in order.
type Seen = Arc<Mutex<Vec<(SocketAddr, Vec<u8>)>>>;

/// A loopback UDP server that records every datagram and, if `echo`, sends it back.
pub struct EchoServer {
    pub addr: SocketAddr,
    seen: Seen,
    task: tokio::task::JoinHandle<()>,
}

impl EchoServer {
    pub async fn start(echo: bool) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let seen: Seen = Arc::default();
        let log = seen.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_535];
            loop {
                let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                log.lock().unwrap().push((peer, buf[..n].to_vec()));
                if echo {
                    let _ = socket.send_to(&buf[..n], peer).await;
                }
            }
        });
        Self { addr, seen, task }
    }

    /// Everything received so far, in order.
    pub fn seen(&self) -> Vec<(SocketAddr, Vec<u8>)> {
        self.seen.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn bytes(&self) -> usize {
        self.seen.lock().unwrap().iter().map(|(_, d)| d.len()).sum()
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A client socket whose replies are collected by a background reader, so the kernel's
/// receive buffer never overflows while a test is busy sending.
pub struct Client {
    pub socket: Arc<UdpSocket>,
    got: Arc<Mutex<Vec<Vec<u8>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Client {
    pub async fn connect(relay: SocketAddr) -> Self {
        let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        socket.connect(relay).await.unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let (reader, log) = (socket.clone(), got.clone());
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_535];
            loop {
                match reader.recv(&mut buf).await {
                    Ok(n) => log.lock().unwrap().push(buf[..n].to_vec()),
                    Err(_) => continue,
                }
            }
        });
        Self { socket, got, task }
    }

    pub async fn send(&self, data: &[u8]) {
        self.socket.send(data).await.unwrap();
    }

    pub fn received(&self) -> Vec<Vec<u8>> {
        self.got.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    /// Sends `data` and returns how long until a reply arrives (bounded by [`WAIT`]).
    pub async fn round_trip(&self, data: &[u8]) -> Duration {
        let before = self.count();
        let start = tokio::time::Instant::now();
        self.send(data).await;
        wait_until("a reply", || self.count() > before).await;
        start.elapsed()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Polls `cond` until it holds; panics naming `what` after [`WAIT`].
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Runs `fut`, failing the test if it takes longer than `limit`.
pub async fn bounded<T>(limit: Duration, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, fut)
        .await
        .expect("test step timed out")
}

/// A payload carrying a sequence number, padded to `len` bytes.
pub fn numbered(seq: u32, len: usize) -> Vec<u8> {
    let mut v = seq.to_be_bytes().to_vec();
    v.resize(len.max(4), 0xab);
    v
}

pub fn seq_of(data: &[u8]) -> u32 {
    u32::from_be_bytes(data[..4].try_into().unwrap())
}
