//! Rough relay overhead on this machine: datagrams per second through a perfect link
//! and the added round-trip time, each beside the same loop without the relay.
//! `cargo run --release -p updraft-linkem --example throughput`. Reports, asserts nothing.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use updraft_linkem::{LinkParams, Relay};

/// Datagrams per one-way run.
const DATAGRAMS: u64 = 200_000;
/// Most datagrams in flight at once, so no socket buffer overflows.
const WINDOW: u64 = 256;
/// Ping-pongs per latency run.
const PINGS: usize = 2_000;

/// A blocking sink on its own thread: counts datagrams and echoes those starting with `p`.
fn sink() -> (SocketAddr, Arc<AtomicU64>) {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65_535];
        while let Ok((n, peer)) = socket.recv_from(&mut buf) {
            seen.fetch_add(1, Ordering::Relaxed);
            if buf[0] == b'p' {
                let _ = socket.send_to(&buf[..n], peer);
            }
        }
    });
    (addr, count)
}

/// Datagrams per second from one blocking client thread to `target`, counted at the sink,
/// with at most [`WINDOW`] in flight, and the share lost (socket buffers overflowing).
fn one_way(target: SocketAddr, received: Arc<AtomicU64>, size: usize) -> (f64, f64) {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.connect(target).unwrap();
    let payload = vec![b'd'; size];
    let base = received.load(Ordering::Relaxed);
    let got = || received.load(Ordering::Relaxed) - base;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(60);
    let (mut sent, mut lost) = (0, 0);
    let (mut last_got, mut last_progress) = (0, start);
    while got() + lost < DATAGRAMS && Instant::now() < deadline {
        let now_got = got();
        if now_got != last_got {
            (last_got, last_progress) = (now_got, Instant::now());
        }
        if sent < DATAGRAMS && sent - now_got - lost < WINDOW {
            socket.send(&payload).unwrap();
            sent += 1;
        } else if last_progress.elapsed() > Duration::from_millis(50) {
            // Nothing arrived for a while: what is outstanding was dropped.
            lost = sent - now_got;
            last_progress = Instant::now();
        } else {
            std::thread::yield_now();
        }
    }
    let got = got();
    let elapsed = last_progress.duration_since(start).as_secs_f64();
    (got as f64 / elapsed, 1.0 - got as f64 / DATAGRAMS as f64)
}

/// Median round trip of one datagram at a time.
async fn ping(target: SocketAddr) -> Duration {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(target).await.unwrap();
    let mut buf = [0u8; 64];
    let mut rtts = Vec::with_capacity(PINGS);
    for _ in 0..PINGS {
        let start = Instant::now();
        socket.send(b"ping").await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buf))
            .await
            .expect("ping lost")
            .unwrap();
        rtts.push(start.elapsed());
    }
    rtts.sort();
    rtts[rtts.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (server, received) = sink();
    let relay = Relay::start(
        "127.0.0.1:0".parse().unwrap(),
        server,
        LinkParams::default(),
        1,
    )
    .unwrap();
    for size in [100, 1200] {
        let r = received.clone();
        let direct = tokio::task::spawn_blocking(move || one_way(server, r, size));
        let direct = direct.await.unwrap();
        let (r, to) = (received.clone(), relay.local_addr());
        let relayed = tokio::task::spawn_blocking(move || one_way(to, r, size));
        let relayed = relayed.await.unwrap();
        println!(
            "{size:>5} B datagrams: direct {:>7.0}/s (lost {:.2} %)  via relay {:>7.0}/s (lost {:.2} %)",
            direct.0,
            direct.1 * 100.0,
            relayed.0,
            relayed.1 * 100.0
        );
    }
    let direct = ping(server).await;
    let relayed = ping(relay.local_addr()).await;
    println!("median round trip: direct {direct:?}  via relay {relayed:?}");
    println!(
        "relay stats: {}",
        serde_json::to_string(&relay.stats()).unwrap()
    );
    relay.shutdown().await;
}
