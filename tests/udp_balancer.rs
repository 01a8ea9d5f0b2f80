//! tests/common/udp_balancer.rs, the loopback stand-in for a plain UDP load balancer:
//! datagrams from two client sockets reach two echo backends and come back; each
//! client address gets the backend its hash names and keeps it; each has its own
//! upstream socket; `pin` sends new addresses (a client whose port changed) to a chosen
//! backend while old flows stay; and dropping the balancer closes its port. Then a
//! QUIC client through it: its connection stays on one backend, and when its port
//! changes (`Endpoint::rebind`) with the other backend pinned, the connection dies and
//! a new one reaches the other backend.
mod common;

use common::udp_balancer::{pick, UdpBalancer};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::UdpSocket;

const WAIT: Duration = Duration::from_secs(5);

/// An echo server that answers `PAYLOAD` with `b{index} {peer} PAYLOAD`: which backend
/// answered and which address it saw the datagram come from.
async fn echo_backend(index: usize) -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = s.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        loop {
            let Ok((n, peer)) = s.recv_from(&mut buf).await else {
                continue;
            };
            let mut reply = format!("b{index} {peer} ").into_bytes();
            reply.extend_from_slice(&buf[..n]);
            let _ = s.send_to(&reply, peer).await;
        }
    });
    addr
}

/// A client socket on loopback.
async fn client() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.unwrap()
}

/// Sends `payload` from `c` through `lb`; the backend that answered and the upstream
/// address it saw. The answer must come from the balancer's address.
async fn ask(c: &UdpSocket, lb: &UdpBalancer, payload: &str) -> (usize, SocketAddr) {
    c.send_to(payload.as_bytes(), lb.addr()).await.unwrap();
    let mut buf = [0u8; 2048];
    let (n, from) = tokio::time::timeout(WAIT, c.recv_from(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("no answer to {payload:?} through the balancer"))
        .unwrap();
    assert_eq!(from, lb.addr(), "the answer comes from the balancer");
    let text = std::str::from_utf8(&buf[..n]).unwrap();
    let mut parts = text.splitn(3, ' ');
    let backend = parts.next().unwrap()[1..].parse().unwrap();
    let peer = parts.next().unwrap().parse().unwrap();
    assert_eq!(parts.next(), Some(payload), "the payload comes back whole");
    (backend, peer)
}

#[tokio::test]
async fn flows_follow_the_address_hash_stick_and_pin_moves_new_addresses() {
    let backends = [echo_backend(0).await, echo_backend(1).await];
    let lb = UdpBalancer::start(&backends).await.unwrap();

    // Two clients whose addresses hash to different backends; they differ only in the
    // port, so a port change can move a client. (Each try is a coin toss: 64 misses
    // in a row would mean the hash ignores the port.)
    let c1 = client().await;
    let a1 = c1.local_addr().unwrap();
    let mut c2 = client().await;
    for _ in 0..64 {
        if pick(c2.local_addr().unwrap(), 2) != pick(a1, 2) {
            break;
        }
        c2 = client().await;
    }
    let a2 = c2.local_addr().unwrap();
    assert_ne!(
        pick(a1, 2),
        pick(a2, 2),
        "the hash never depended on the port"
    );

    let (b1, up1) = ask(&c1, &lb, "one").await;
    let (b2, up2) = ask(&c2, &lb, "two").await;
    assert_eq!(
        b1,
        pick(a1, 2),
        "client 1 reached the backend its hash names"
    );
    assert_eq!(
        b2,
        pick(a2, 2),
        "client 2 reached the backend its hash names"
    );
    assert_eq!(lb.backend_of(a1), Some(b1));
    assert_eq!(lb.backend_of(a2), Some(b2));
    assert_ne!(up1, up2, "each client address has its own upstream socket");

    // The same address keeps its backend and its upstream socket.
    for i in 0..5 {
        assert_eq!(ask(&c1, &lb, &format!("again {i}")).await, (b1, up1));
    }

    // Pin the other backend: client 1 "changes port" (a new socket, a new address) and
    // lands there; its old address and client 2 keep theirs.
    let other = 1 - b1;
    lb.pin(other);
    let c1_moved = client().await;
    let (moved, up_moved) = ask(&c1_moved, &lb, "after the port change").await;
    assert_eq!(moved, other, "a new address goes to the pinned backend");
    assert_ne!(up_moved, up1, "a new address is a new flow");
    assert_eq!(ask(&c1, &lb, "old address").await.0, b1, "old flows stay");
    assert_eq!(ask(&c2, &lb, "client 2").await.0, b2, "old flows stay");

    // Unpinned, new addresses are hashed again.
    lb.unpin();
    let c3 = client().await;
    let a3 = c3.local_addr().unwrap();
    assert_eq!(ask(&c3, &lb, "three").await.0, pick(a3, 2));
    assert_eq!(lb.flows().len(), 4, "{:?}", lb.flows());

    // Dropped, the balancer lets go of its port (the relay stops on the runtime's next
    // turn, so give it a moment).
    let addr = lb.addr();
    drop(lb);
    let deadline = tokio::time::Instant::now() + WAIT;
    while std::net::UdpSocket::bind(addr).is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{addr} still bound after the balancer was dropped"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
#[should_panic(expected = "backend 2 does not exist (there are 2)")]
fn pinning_a_backend_that_does_not_exist_is_refused() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let backends = [echo_backend(0).await, echo_backend(1).await];
        UdpBalancer::start(&backends).await.unwrap().pin(2);
    });
}

/// A QUIC server on loopback that answers every bidirectional stream with its index,
/// and the certificate a client must trust to reach it.
fn quic_backend(
    index: u8,
    cert: &rcgen::CertifiedKey<rcgen::KeyPair>,
) -> (quinn::Endpoint, SocketAddr) {
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let tls = rustls::ServerConfig::builder_with_provider(
        rustls::crypto::ring::default_provider().into(),
    )
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert.der().clone()], key)
    .unwrap();
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let config = quinn::ServerConfig::with_crypto(std::sync::Arc::new(crypto));
    let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let server = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = server.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((mut send, _recv)) = conn.accept_bi().await {
                    let _ = send.write_all(&[index]).await;
                    let _ = send.finish();
                }
            });
        }
    });
    (endpoint, addr)
}

/// Which backend answers a new stream on `conn`, or the error that ended it.
async fn which_backend(conn: &quinn::Connection) -> Result<u8, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(b"?").await.map_err(|e| e.to_string())?;
    let reply = recv.read_to_end(1).await.map_err(|e| e.to_string())?;
    Ok(reply[0])
}

#[tokio::test]
async fn a_quic_client_whose_port_changes_lands_on_the_pinned_backend() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (_s0, b0) = quic_backend(0, &cert);
    let (_s1, b1) = quic_backend(1, &cert);
    let lb = UdpBalancer::start(&[b0, b1]).await.unwrap();

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(
        rustls::crypto::ring::default_provider().into(),
    )
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut config = quinn::ClientConfig::new(std::sync::Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ));
    // A connection whose packets stop arriving ends within a second.
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(Duration::from_secs(1).try_into().unwrap()));
    config.transport_config(std::sync::Arc::new(transport));
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(config);

    let connect = || async {
        tokio::time::timeout(WAIT, client.connect(lb.addr(), "localhost").unwrap())
            .await
            .expect("connecting through the balancer within the wait")
            .expect("connecting through the balancer")
    };
    let conn = connect().await;
    let first = pick(client.local_addr().unwrap(), 2);
    assert_eq!(which_backend(&conn).await, Ok(first as u8));
    assert_eq!(
        which_backend(&conn).await,
        Ok(first as u8),
        "the flow sticks"
    );

    // The client's port changes and the balancer sends the new address elsewhere: the
    // other backend does not know the connection, which dies.
    let other = 1 - first;
    lb.pin(other);
    client
        .rebind(std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
        .unwrap();
    let after = tokio::time::timeout(WAIT, which_backend(&conn))
        .await
        .expect("the moved connection ends within the wait");
    assert!(
        after.is_err(),
        "the moved connection still works: {after:?}"
    );

    // A new connection from the new address reaches the other backend.
    let conn = connect().await;
    assert_eq!(which_backend(&conn).await, Ok(other as u8));
    assert_eq!(lb.backend_of(client.local_addr().unwrap()), Some(other));
}
