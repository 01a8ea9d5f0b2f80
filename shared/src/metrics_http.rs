//! A Prometheus `/metrics` endpoint on a TCP address (`metrics_listen` in daemon.toml or
//! agent.toml): plain HTTP/1.1, so put it on a private address. [`serve_http1`] is the
//! serving loop under it, which the daemon's admin socket uses too.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::accept::{accept_loop, Listener};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use std::future::Future;
use tracing::{debug, info};

/// Scrapers served at once; one more is answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 64;
/// Time a scraper has to send its request headers; an idle connection is closed
/// after it.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The whole answer to a scraper over [`MAX_CONNECTIONS`], written without parsing its
/// request.
const BUSY: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// Why `/metrics` could not be served.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// `metrics_listen` could not be bound.
    #[error("cannot listen for metrics on TCP {addr} (metrics_listen in {file})")]
    Bind {
        /// The address in the config.
        addr: SocketAddr,
        /// The config file's name, for the message.
        file: &'static str,
        /// Why the bind failed.
        #[source]
        source: std::io::Error,
    },
    /// The bound socket has no local address.
    #[error(transparent)]
    LocalAddr(std::io::Error),
}

/// Binds `addr` (named by `metrics_listen` in `file`) and serves `GET /metrics` from
/// `render` until the process ends.
pub async fn serve(
    addr: SocketAddr,
    file: &'static str,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) -> Result<tokio::task::JoinHandle<()>, MetricsError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, file, source })?;
    let local = listener.local_addr().map_err(MetricsError::LocalAddr)?;
    info!(metrics_listen = %local, "serving /metrics");
    let refuse = |stream: tokio::net::TcpStream| {
        let _ = stream.try_write(BUSY);
        debug!("metrics_listen: {MAX_CONNECTIONS} connections open; refused one");
    };
    let handle = move |req: Request<Incoming>| {
        let reply = answer(&req, &*render);
        async move { reply }
    };
    Ok(serve_http1(
        listener,
        "metrics_listen",
        MAX_CONNECTIONS,
        handle,
        refuse,
    ))
}

/// Serves HTTP/1.1 on `listener` until the process ends: each request goes to `handle`,
/// at most `max_connections` connections at once (one more goes to `refuse`), and a
/// client has [`HEADER_TIMEOUT`] to send its request headers. `what` names the listener
/// in logs as an operator knows it (`metrics_listen`, `admin_socket`).
pub fn serve_http1<L, H, F>(
    listener: L,
    what: &'static str,
    max_connections: usize,
    handle: H,
    refuse: impl FnMut(L::Stream) + Send + 'static,
) -> tokio::task::JoinHandle<()>
where
    L: Listener + Send + Sync + 'static,
    L::Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    tokio::spawn(async move {
        let serve = |stream, slot| {
            let (handle, http) = (handle.clone(), http.clone());
            tokio::spawn(async move {
                let _slot = slot;
                let svc = hyper::service::service_fn(move |req| {
                    let reply = handle(req);
                    async move { Ok::<_, Infallible>(reply.await) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(e) = http.serve_connection(io, svc).await {
                    debug!(error = %e, "{what}: a connection ended with an error");
                }
            });
        };
        accept_loop(
            &listener,
            what,
            max_connections,
            std::future::pending(),
            serve,
            refuse,
        )
        .await;
    })
}

/// The reply to one request: the metrics for `GET /metrics`, else 404.
fn answer<B>(req: &hyper::Request<B>, render: &dyn Fn() -> String) -> Response<Full<Bytes>> {
    let reply = if req.method() == Method::GET && req.uri().path() == "/metrics" {
        Response::builder()
            .header("content-type", "text/plain; version=0.0.4")
            .body(Full::new(Bytes::from(render())))
    } else {
        Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Full::new(Bytes::from_static(b"only GET /metrics\n")))
    };
    reply.expect("static response parts")
}
