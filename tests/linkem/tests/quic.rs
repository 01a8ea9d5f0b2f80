//! Real QUIC (quinn + rustls) through the emulator: a stream survives delay and loss, and
//! a client that rebinds its socket migrates through a fresh mapping, as behind a NAT.

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use updraft_linkem::{LinkParams, Relay};

/// Whole-test bound: generous, since QUIC's loss recovery on a loaded machine is slow,
/// and only a hang should fail.
const LIMIT: Duration = Duration::from_secs(120);

const ALPN: &[u8] = b"linkem-test";

fn configs() -> (quinn::ServerConfig, quinn::ClientConfig) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert: CertificateDer<'static> = certified.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));

    let mut server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    server_tls.alpn_protocols = vec![ALPN.to_vec()];
    let server = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(server_tls).unwrap(),
    ));

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let mut client_tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client_tls.alpn_protocols = vec![ALPN.to_vec()];
    let client = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(client_tls).unwrap(),
    ));
    (server, client)
}

/// A server that echoes every bidirectional stream back.
fn echo_server(config: quinn::ServerConfig) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        let data = recv.read_to_end(16 << 20).await?;
                        send.write_all(&data).await?;
                        send.finish()?;
                        send.stopped().await?;
                        anyhow::Ok(())
                    });
                }
            });
        }
    });
    (addr, task)
}

async fn exchange(conn: &quinn::Connection, payload: &[u8]) -> Vec<u8> {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(payload).await.unwrap();
    send.finish().unwrap();
    recv.read_to_end(16 << 20).await.unwrap()
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_stream_survives_delay_and_loss() {
    let (server_config, client_config) = configs();
    let (server_addr, server) = echo_server(server_config);
    let params = LinkParams {
        delay: Duration::from_millis(20),
        loss: 0.05,
        ..LinkParams::default()
    };
    let relay = Relay::start("127.0.0.1:0".parse().unwrap(), server_addr, params, 1).unwrap();

    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(client_config);
    let data = payload(256 * 1024);
    let echoed = tokio::time::timeout(LIMIT, async {
        let conn = client
            .connect(relay.local_addr(), "localhost")
            .unwrap()
            .await
            .unwrap();
        let echoed = exchange(&conn, &data).await;
        conn.close(0u32.into(), b"done");
        echoed
    })
    .await
    .expect("QUIC exchange through the relay timed out");
    assert_eq!(echoed, data);

    let stats = relay.stats();
    assert!(
        stats.up.dropped_loss > 0 && stats.down.dropped_loss > 0,
        "{stats:?}"
    );
    client.wait_idle().await;
    server.abort();
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_migrates_when_the_client_rebinds() {
    let (server_config, client_config) = configs();
    let (server_addr, server) = echo_server(server_config);
    let params = LinkParams {
        delay: Duration::from_millis(5),
        ..LinkParams::default()
    };
    let relay = Relay::start("127.0.0.1:0".parse().unwrap(), server_addr, params, 1).unwrap();

    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(client_config);
    tokio::time::timeout(LIMIT, async {
        let conn = client
            .connect(relay.local_addr(), "localhost")
            .unwrap()
            .await
            .unwrap();
        assert_eq!(exchange(&conn, b"before").await, b"before");
        client
            .rebind(std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
            .unwrap();
        assert_eq!(exchange(&conn, b"after").await, b"after");
        conn.close(0u32.into(), b"done");
    })
    .await
    .expect("QUIC migration through the relay timed out");

    let stats = relay.stats();
    assert_eq!(
        stats.mappings_created, 2,
        "the rebind showed up as a new peer"
    );
    server.abort();
    relay.shutdown().await;
}
