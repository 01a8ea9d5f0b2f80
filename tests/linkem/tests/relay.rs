//! The relay end to end over loopback UDP: an echo server behind it, clients in front.
//!
//! Timing is asserted only as lower bounds (the emulator must never be faster than the
//! link it emulates); how much slower a loaded machine makes it is not this test's
//! business. Every wait is on a condition, bounded by `common::WAIT`.

mod common;

use common::*;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;
use updraft_linkem::{LinkParams, Relay, RelayOptions, Stats, Which};

fn local() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn perfect_link_echoes_everything() {
    let server = EchoServer::start(true).await;
    let relay = Relay::start(local(), server.addr, LinkParams::default(), 1).unwrap();
    let client = Client::connect(relay.local_addr()).await;

    const TOTAL: u32 = 1000;
    const BATCH: u32 = 50;
    for start in (0..TOTAL).step_by(BATCH as usize) {
        for seq in start..start + BATCH {
            client.send(&numbered(seq, 200)).await;
        }
        let want = (start + BATCH) as usize;
        wait_until("the batch's echoes", || client.count() >= want).await;
    }
    let got: Vec<u32> = client.received().iter().map(|d| seq_of(d)).collect();
    assert_eq!(
        got,
        (0..TOTAL).collect::<Vec<_>>(),
        "every datagram, in order"
    );
    assert!(client.received().iter().all(|d| d.len() == 200));

    let stats = relay.stats();
    assert_eq!(stats.up.forwarded_packets, u64::from(TOTAL));
    assert_eq!(stats.down.forwarded_packets, u64::from(TOTAL));
    assert_eq!(stats.up.forwarded_bytes, u64::from(TOTAL) * 200);
    assert_eq!(
        stats.up.dropped_loss + stats.up.dropped_queue + stats.up.blackholed,
        0
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_applies_each_way() {
    let server = EchoServer::start(true).await;
    let params = LinkParams {
        delay: Duration::from_millis(100),
        ..LinkParams::default()
    };
    let relay = Relay::start(local(), server.addr, params, 1).unwrap();
    let client = Client::connect(relay.local_addr()).await;
    for i in 0..3 {
        let rtt = client.round_trip(&numbered(i, 64)).await;
        assert!(
            rtt >= Duration::from_millis(200),
            "round trip {rtt:?} beat 2 x 100 ms"
        );
    }
    relay.shutdown().await;
}

/// Sends 2000 numbered datagrams through a 20 % lossy link each way and returns the
/// sequence numbers the server saw, those the client got back, and the counters.
async fn lossy_run(seed: u64) -> (Vec<u32>, Vec<u32>, Stats) {
    const TOTAL: u32 = 2000;
    const BATCH: u32 = 100;
    let server = EchoServer::start(true).await;
    let params = LinkParams {
        loss: 0.2,
        ..LinkParams::default()
    };
    let relay = Relay::start(local(), server.addr, params, seed).unwrap();
    let client = Client::connect(relay.local_addr()).await;

    for start in (0..TOTAL).step_by(BATCH as usize) {
        for seq in start..start + BATCH {
            client.send(&numbered(seq, 100)).await;
        }
        // Pace on the relay having read the batch, so no socket buffer overflows and
        // every loss is the emulator's.
        let want = u64::from(start + BATCH);
        wait_until("the relay to read the batch", || {
            relay.stats().up.received_packets >= want
        })
        .await;
    }
    // Settle: everything through the up link, echoed, and through the down link.
    wait_until("both directions to settle", || {
        let s = relay.stats();
        s.up.in_flight() == 0
            && server.count() as u64 == s.up.forwarded_packets
            && s.down.received_packets == s.up.forwarded_packets
            && s.down.in_flight() == 0
            && client.count() as u64 == s.down.forwarded_packets
    })
    .await;

    let at_server = server.seen().iter().map(|(_, d)| seq_of(d)).collect();
    let at_client = client.received().iter().map(|d| seq_of(d)).collect();
    let stats = relay.stats();
    relay.shutdown().await;
    (at_server, at_client, stats)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loss_is_about_right_and_seeded() {
    let (server_a, client_a, stats) = lossy_run(7).await;

    assert_eq!(stats.up.received_packets, 2000);
    let up_rate = stats.up.dropped_loss as f64 / 2000.0;
    assert!((0.10..=0.30).contains(&up_rate), "up loss {up_rate}");
    let down_rate = stats.down.dropped_loss as f64 / stats.down.received_packets as f64;
    assert!((0.10..=0.30).contains(&down_rate), "down loss {down_rate}");
    assert_eq!(stats.up.dropped_queue + stats.down.dropped_queue, 0);
    assert_eq!(stats.up.send_errors + stats.down.send_errors, 0);
    assert_eq!(server_a.len() as u64, stats.up.forwarded_packets);

    let (server_b, client_b, _) = lossy_run(7).await;
    assert_eq!(
        server_a, server_b,
        "same seed, same datagrams reach the server"
    );
    assert_eq!(
        client_a, client_b,
        "same seed, same echoes reach the client"
    );

    let (server_c, _, _) = lossy_run(8).await;
    assert_ne!(server_a, server_c, "another seed loses other datagrams");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackhole_drops_until_lifted() {
    let server = EchoServer::start(true).await;
    let relay = Relay::start(local(), server.addr, LinkParams::default(), 1).unwrap();
    let client = Client::connect(relay.local_addr()).await;
    client.round_trip(b"before").await;

    let handle = relay.handle();
    handle.set_blackhole(true);
    for i in 0..20 {
        client.send(&numbered(i, 50)).await;
    }
    wait_until("20 datagrams blackholed", || {
        relay.stats().up.blackholed == 20
    })
    .await;
    assert_eq!(server.count(), 1, "nothing got through the blackhole");
    assert_eq!(client.count(), 1);

    handle.set_blackhole(false);
    client.round_trip(b"after").await;
    assert_eq!(client.received().last().unwrap(), b"after");

    // One direction only: the server hears, the client does not.
    handle.modify(Which::Down, |p| p.blackhole = true).unwrap();
    let heard = server.count();
    for i in 0..10 {
        client.send(&numbered(i, 50)).await;
    }
    wait_until("the echoes blackholed", || {
        relay.stats().down.blackholed == 10
    })
    .await;
    assert_eq!(server.count(), heard + 10);
    assert_eq!(client.count(), 2);
    handle.modify(Which::Down, |p| p.blackhole = false).unwrap();
    client.round_trip(b"again").await;
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_cap_paces_the_stream() {
    let server = EchoServer::start(false).await;
    let mut options = RelayOptions::new(local(), server.addr);
    // 1 Mbit/s; a queue big enough that this test measures pacing, not drops.
    options.up = LinkParams {
        bandwidth_bps: Some(1_000_000),
        queue_limit_bytes: 1 << 20,
        ..LinkParams::default()
    };
    let relay = Relay::start_with(options).unwrap();
    let client = Client::connect(relay.local_addr()).await;

    const DATAGRAMS: u32 = 250;
    const SIZE: usize = 1000;
    let start = tokio::time::Instant::now();
    for seq in 0..DATAGRAMS {
        client.send(&numbered(seq, SIZE)).await;
        if seq % 25 == 24 {
            let want = u64::from(seq + 1);
            wait_until("the relay to read", || {
                relay.stats().up.received_packets >= want
            })
            .await;
        }
    }
    let total = DATAGRAMS as usize * SIZE;
    wait_until("250 KB at the server", || server.bytes() >= total).await;
    let took = start.elapsed();
    // 250 KB is 2 s of serialisation at 1 Mbit/s (more with headers).
    assert!(
        took >= Duration::from_millis(1500),
        "250 KB took only {took:?} at 1 Mbit/s"
    );
    assert_eq!(relay.stats().up.dropped_queue, 0);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_apply_while_running() {
    let server = EchoServer::start(true).await;
    let relay = Relay::start(local(), server.addr, LinkParams::default(), 1).unwrap();
    let client = Client::connect(relay.local_addr()).await;
    client.round_trip(b"fast").await;

    // From another thread, as a benchmark driver would.
    let handle = relay.handle();
    tokio::task::spawn_blocking(move || {
        handle.modify(Which::Both, |p| p.delay = Duration::from_millis(150))
    })
    .await
    .unwrap()
    .unwrap();
    let rtt = client.round_trip(b"slow").await;
    assert!(
        rtt >= Duration::from_millis(300),
        "round trip {rtt:?} ignored the new delay"
    );

    let handle = relay.handle();
    handle.modify(Which::Up, |p| p.loss = 1.0).unwrap();
    client.send(b"lost").await;
    wait_until("the datagram to be lost", || {
        relay.stats().up.dropped_loss == 1
    })
    .await;
    assert_eq!(server.count(), 2);

    handle.set_both(LinkParams::default()).unwrap();
    client.round_trip(b"back").await;
    assert_eq!(server.count(), 3);

    // Invalid settings are refused whole.
    assert!(handle.modify(Which::Both, |p| p.loss = 3.0).is_err());
    assert_eq!(
        handle.params(),
        (LinkParams::default(), LinkParams::default())
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_client_gets_its_own_mapping() {
    let server = EchoServer::start(true).await;
    let relay = Relay::start(local(), server.addr, LinkParams::default(), 1).unwrap();
    let a = Client::connect(relay.local_addr()).await;
    let b = Client::connect(relay.local_addr()).await;

    for _ in 0..3 {
        a.round_trip(b"from a").await;
        b.round_trip(b"from b").await;
    }
    assert!(
        a.received().iter().all(|d| d == b"from a"),
        "a got only its own replies"
    );
    assert!(
        b.received().iter().all(|d| d == b"from b"),
        "b got only its own replies"
    );

    let seen = server.seen();
    let peer_of = |what: &[u8]| -> HashSet<SocketAddr> {
        seen.iter()
            .filter(|(_, d)| d == what)
            .map(|(p, _)| *p)
            .collect()
    };
    let (pa, pb) = (peer_of(b"from a"), peer_of(b"from b"));
    assert_eq!(pa.len(), 1, "a keeps one upstream address");
    assert_eq!(pb.len(), 1, "b keeps one upstream address");
    assert_ne!(pa, pb, "a and b look like two peers");

    let stats = relay.stats();
    assert_eq!((stats.mappings_active, stats.mappings_created), (2, 2));
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_mappings_expire() {
    let server = EchoServer::start(true).await;
    let mut options = RelayOptions::new(local(), server.addr);
    options.idle_timeout = Duration::from_millis(200);
    let relay = Relay::start_with(options).unwrap();
    let client = Client::connect(relay.local_addr()).await;
    client.round_trip(b"one").await;
    wait_until("the mapping to expire", || {
        relay.stats().mappings_active == 0
    })
    .await;
    client.round_trip(b"two").await;
    let stats = relay.stats();
    assert_eq!((stats.mappings_active, stats.mappings_created), (1, 2));
    relay.shutdown().await;
}

#[tokio::test]
async fn refuses_non_loopback() {
    let upstream: SocketAddr = "127.0.0.1:9".parse().unwrap();
    for (listen, up) in [
        ("0.0.0.0:0", "127.0.0.1:9"),
        ("127.0.0.1:0", "10.0.0.1:9"),
        ("127.0.0.1:0", "[::]:9"),
    ] {
        let err = Relay::start(
            listen.parse().unwrap(),
            up.parse().unwrap(),
            LinkParams::default(),
            0,
        )
        .unwrap_err();
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::InvalidInput,
            "{listen} -> {up}"
        );
        assert!(err.to_string().contains("loopback"), "{err}");
    }
    let bad = LinkParams {
        loss: 2.0,
        ..LinkParams::default()
    };
    assert!(Relay::start(local(), upstream, bad, 0).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_relaying() {
    let server = EchoServer::start(true).await;
    let relay = Relay::start(local(), server.addr, LinkParams::default(), 1).unwrap();
    let addr = relay.local_addr();
    let client = Client::connect(addr).await;
    client.round_trip(b"hi").await;
    bounded(WAIT, relay.shutdown()).await;
    // The port is free again once every task has let go of the socket.
    std::net::UdpSocket::bind(addr).expect("listen socket released");
}
