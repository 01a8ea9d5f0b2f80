//! The daemon's front door: mutual TLS refusals and over-cap headers, driven by a
//! hand-built QUIC client against the real `updraftd` process, while a real agent
//! keeps being served.

mod common;

use bytes::{BufMut, BytesMut};
use common::*;
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use updraft_proto::{ReplyHeader, RequestHeader};

/// A client certificate: chain + key.
type ClientCert = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn issue(
    issuer: &Issuer<'_, KeyPair>,
    cn: &str,
    not_before: SystemTime,
    not_after: SystemTime,
) -> ClientCert {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.not_before = not_before.into();
    p.not_after = not_after.into();
    let cert = p.signed_by(&key, issuer).unwrap();
    (
        vec![cert.der().clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

fn real_ca(dir: &Path) -> Issuer<'static, KeyPair> {
    let cert = std::fs::read_to_string(dir.join("pki/ca.pem")).unwrap();
    let key = KeyPair::from_pem(&std::fs::read_to_string(dir.join("pki/ca.key")).unwrap()).unwrap();
    Issuer::from_ca_cert_pem(&cert, key).unwrap()
}

fn foreign_ca() -> Issuer<'static, KeyPair> {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name
        .push(DnType::CommonName, "Someone Else's CA");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    Issuer::new(p, key)
}

fn client_config(dir: &Path, cert: Option<ClientCert>) -> quinn::ClientConfig {
    let provider = updraft_shared::tls::provider();
    let mut roots = rustls::RootCertStore::empty();
    for c in updraft_shared::tls::load_certs(&dir.join("pki/ca.pem")).unwrap() {
        roots.add(c).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut tls = match cert {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![updraft_proto::ALPN.to_vec()];
    quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ))
}

/// Sends `request` bytes as a task stream and returns the daemon's first frame, or the
/// error that ended the attempt (handshake refusal shows up here).
async fn exchange(
    conn: &quinn::Connection,
    request: &[u8],
) -> Result<updraft_proto::Frame, String> {
    let (mut send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(request).await.map_err(|e| e.to_string())?;
    let _ = send.finish();
    let mut reader = updraft_shared::wire::FrameReader::new(recv);
    match tokio::time::timeout(Duration::from_secs(10), reader.next()).await {
        Ok(Ok(Some(f))) => Ok(f),
        Ok(Ok(None)) => Err("stream ended".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 10s".into()),
    }
}

fn echo_request(id: &str, input: &[u8]) -> Vec<u8> {
    let mut buf = BytesMut::new();
    let h = RequestHeader {
        id: id.into(),
        task: "echo".into(),
        args: vec![],
        input_len: Some(input.len() as u64),
    };
    h.to_frame().encode(&mut buf);
    buf.put_slice(input);
    buf.to_vec()
}

async fn connect(
    endpoint: &quinn::Endpoint,
    addr: &str,
    cfg: quinn::ClientConfig,
) -> Result<quinn::Connection, String> {
    let conn = endpoint
        .connect_with(cfg, addr.parse().unwrap(), "localhost")
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    Ok(conn)
}

/// Tries to run `echo` with a given client identity; Ok(reply) or the error.
async fn try_echo(
    endpoint: &quinn::Endpoint,
    addr: &str,
    cfg: quinn::ClientConfig,
) -> Result<ReplyHeader, String> {
    let conn = connect(endpoint, addr, cfg).await?;
    match exchange(&conn, &echo_request("t1", b"ping")).await {
        Ok(frame) => ReplyHeader::from_frame(&frame).map_err(|e| e.to_string()),
        // In TLS 1.3 the server judges the client's certificate after the client
        // considers the handshake done; the refusal arrives as the connection's close.
        Err(e) => match tokio::time::timeout(Duration::from_secs(10), conn.closed()).await {
            Ok(reason) => Err(reason.to_string()),
            Err(_) => Err(e),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_identities_and_oversized_headers_leave_everyone_else_served() {
    let c = Cluster::start();
    let dir = c.dir.path();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let ca = real_ca(dir);

    // Control: a fresh certificate from the real CA works with this hand-built client.
    let good = issue(&ca, "board-2", now - day, now + day);
    let reply = try_echo(
        &endpoint,
        &c.daemon_addr,
        client_config(dir, Some((good.0.clone(), good.1.clone_key()))),
    )
    .await;
    assert_eq!(reply, Ok(ReplyHeader::Accepted));

    // Another CA, an expired certificate: refused at the handshake; none: closed at once.
    let cases = [
        (
            "foreign CA",
            Some(issue(&foreign_ca(), "board-1", now - day, now + day)),
        ),
        ("no certificate", None),
        (
            "expired",
            Some(issue(&ca, "board-1", now - 3 * day, now - day)),
        ),
    ];
    for (what, cert) in cases {
        let no_cert = cert.is_none();
        let r = try_echo(&endpoint, &c.daemon_addr, client_config(dir, cert)).await;
        let err = r.expect_err(what);
        if no_cert {
            // Client certificates are optional in TLS so that boards can enroll (on
            // their own ALPN); a task connection without one is closed at once.
            assert!(
                err.contains("enroll first") && err.contains("code 2"),
                "{what}: {err}"
            );
        } else {
            assert!(err.contains("handshake failed"), "{what}: {err}");
        }
    }
    wait_for(
        "the daemon to log each refusal",
        Duration::from_secs(10),
        || {
            let log = c.daemon.log();
            (log.matches("handshake refused").count() >= 2
                && log.contains("refused a task connection without a valid agent certificate"))
            .then_some(())
        },
    );

    // A header announcing more than the cap: refused before anything is allocated,
    // and the same connection keeps working.
    let conn = connect(&endpoint, &c.daemon_addr, client_config(dir, Some(good)))
        .await
        .unwrap();
    let mut huge = vec![1u8];
    huge.extend_from_slice(&(10u32 << 20).to_be_bytes());
    huge.extend_from_slice(&[b'{'; 1000]);
    let frame = exchange(&conn, &huge).await.unwrap();
    match ReplyHeader::from_frame(&frame).unwrap() {
        ReplyHeader::Rejected { code, message } => {
            assert_eq!(code, updraft_proto::ErrorCode::BadRequest);
            assert!(message.contains("limit"), "{message}");
        }
        other => panic!("oversized header accepted: {other:?}"),
    }
    // A header within the cap but for an absurd task name is refused too.
    let mut bad = BytesMut::new();
    let h = RequestHeader {
        id: "t2".into(),
        task: "x".repeat(60_000),
        args: vec![],
        input_len: None,
    };
    h.to_frame().encode(&mut bad);
    let frame = exchange(&conn, &bad).await.unwrap();
    assert!(matches!(
        ReplyHeader::from_frame(&frame).unwrap(),
        ReplyHeader::Rejected { .. }
    ));
    let frame = exchange(&conn, &echo_request("t3", b"ok")).await.unwrap();
    assert_eq!(
        ReplyHeader::from_frame(&frame).unwrap(),
        ReplyHeader::Accepted
    );

    // The real agent is still served.
    let r = http(
        &c.socket,
        "POST",
        "/v1/tasks/echo?where=cloud",
        b"still served",
    )
    .unwrap();
    assert_eq!((r.status, r.body.as_slice()), (200, &b"still served"[..]));
    endpoint.close(0u32.into(), b"");
}
