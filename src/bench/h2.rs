//! The HTTP/2 peer of `bench offload`: what a user would pick instead of Updraft's
//! offload, a POST echo over hyper's HTTP/2 and rustls with mutual TLS on TCP, with
//! the same certificates (the daemon's and the agent's) and the same layout as the
//! Updraft path: server and client in this process, on the same runtime.

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

use crate::harness::Pki;

/// ALPN of HTTP/2 over TLS.
const H2: &[u8] = b"h2";

/// An HTTP/2 echo server on loopback until `stop`: every POST body comes back whole.
pub(crate) async fn server(pki: &Pki, stop: CancellationToken) -> anyhow::Result<SocketAddr> {
    let mut tls = pki.daemon_identity()?.rustls_server()?;
    tls.alpn_protocols = vec![H2.to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("HTTP/2 echo server: bind 127.0.0.1")?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let tcp = tokio::select! {
                r = listener.accept() => match r {
                    Ok((tcp, _)) => tcp,
                    Err(_) => continue,
                },
                () = stop.cancelled() => return,
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, stop) = (acceptor.clone(), stop.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let echo = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let body = req.into_body().collect().await?.to_bytes();
                        Ok::<_, hyper::Error>(hyper::Response::new(Full::new(body)))
                    },
                );
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), echo);
                tokio::select! {
                    _ = conn => {}
                    () = stop.cancelled() => {}
                }
            });
        }
    });
    Ok(addr)
}

/// A client connection to [`server`] at `addr` with the agent's certificate; the
/// connection lives until the returned sender and its clones are dropped.
pub(crate) async fn connect(
    pki: &Pki,
    addr: SocketAddr,
) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let mut tls = pki.agent_identity()?.rustls_client()?;
    tls.alpn_protocols = vec![H2.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("HTTP/2 echo: connect to {addr}"))?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    let tls = connector
        .connect(name, tcp)
        .await
        .context("HTTP/2 echo: TLS handshake")?;
    let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(tls))
        .await
        .context("HTTP/2 echo: HTTP/2 handshake")?;
    tokio::spawn(conn);
    Ok(send)
}

/// One POST of `body`, its echo read whole and checked.
pub(crate) async fn once(send: &SendRequest<Full<Bytes>>, body: Bytes) -> anyhow::Result<()> {
    let mut send = send.clone();
    let len = body.len();
    let req = hyper::Request::post("https://localhost/echo").body(Full::new(body))?;
    let resp = send.send_request(req).await?;
    anyhow::ensure!(
        resp.status().is_success(),
        "HTTP/2 echo answered {}",
        resp.status()
    );
    let got = resp.into_body().collect().await?.to_bytes();
    anyhow::ensure!(
        got.len() == len,
        "HTTP/2 echo returned {} bytes of {len}",
        got.len()
    );
    Ok(())
}
