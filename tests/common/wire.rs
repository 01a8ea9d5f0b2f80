//! A hand-built `updraft/1` client for the wire-level tests: agent certificates signed
//! by the test CA, and frame readers with a bounded wait.

use bytes::{BufMut, BytesMut};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use updraft_proto::{Frame, FrameKind, ReplyHeader, RequestHeader, Trailer};
use updraft_shared::wire::FrameReader;

/// A client config for `updraft/1` with a fresh certificate naming agent `cn`, signed
/// by the CA in `dir/pki`.
pub fn client_config(dir: &Path, cn: &str) -> quinn::ClientConfig {
    let ca_cert = std::fs::read_to_string(dir.join("pki/ca.pem")).unwrap();
    let ca_key =
        KeyPair::from_pem(&std::fs::read_to_string(dir.join("pki/ca.key")).unwrap()).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&ca_cert, ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = p.signed_by(&key, &issuer).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in updraft_shared::tls::load_certs(&dir.join("pki/ca.pem")).unwrap() {
        roots.add(c).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(updraft_shared::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    tls.alpn_protocols = vec![updraft_proto::ALPN.to_vec()];
    quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ))
}

/// The next frame, within `wait`.
pub async fn next_frame(reader: &mut FrameReader<quinn::RecvStream>, wait: Duration) -> Frame {
    tokio::time::timeout(wait, reader.next())
        .await
        .expect("a frame within the wait limit")
        .expect("reading a frame")
        .expect("a frame, not the end of the stream")
}

/// The Reply frame, within `wait`.
pub async fn read_reply(
    reader: &mut FrameReader<quinn::RecvStream>,
    wait: Duration,
) -> ReplyHeader {
    let frame = next_frame(reader, wait).await;
    assert_eq!(frame.kind, FrameKind::Reply);
    ReplyHeader::from_frame(&frame).unwrap()
}

/// Data frames until the trailer, each within `wait`.
pub async fn read_result(
    reader: &mut FrameReader<quinn::RecvStream>,
    wait: Duration,
) -> (Vec<u8>, Trailer) {
    let mut output = Vec::new();
    loop {
        let frame = next_frame(reader, wait).await;
        match frame.kind {
            FrameKind::Data => output.extend_from_slice(&frame.payload),
            FrameKind::Trailer => return (output, Trailer::from_frame(&frame).unwrap()),
            other => panic!("unexpected {other:?} frame"),
        }
    }
}

/// A task stream's opening bytes: the Request frame (`input_len` as given, no args)
/// followed by `input`.
pub fn request_bytes(id: &str, task: &str, input_len: Option<u64>, input: &[u8]) -> BytesMut {
    let mut buf = BytesMut::new();
    RequestHeader {
        id: id.into(),
        task: task.into(),
        args: vec![],
        input_len,
    }
    .to_frame()
    .encode(&mut buf);
    buf.put_slice(input);
    buf
}

/// Opens a task stream and sends the Request (`input_len` as given) and `input`,
/// leaving the input open: the caller finishes, resets or abandons it.
pub async fn open_task(
    conn: &quinn::Connection,
    id: &str,
    task: &str,
    input_len: Option<u64>,
    input: &[u8],
) -> (quinn::SendStream, FrameReader<quinn::RecvStream>) {
    let (mut send, recv) = conn.open_bi().await.expect("opening a task stream");
    send.write_all(&request_bytes(id, task, input_len, input))
        .await
        .expect("sending the request and input");
    (send, FrameReader::new(recv))
}
