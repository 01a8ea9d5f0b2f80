//! The daemon's Prometheus `/metrics` endpoint on `metrics_listen` (plain HTTP/1.1 over
//! TCP; put it on a private address).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Response, StatusCode};
use tracing::{debug, info, warn};

/// Scrapers served at once; one more is answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 64;
/// Time a scraper has to send its request headers; an idle connection is closed
/// after it.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// First pause after a failed accept (out of file descriptors and the like): short, as
/// the cause often clears with the next closed connection.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause between failed accepts: the endpoint answers again within a second
/// of the cause clearing, without spinning while it lasts.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// The whole answer to a scraper over [`MAX_CONNECTIONS`], written without parsing its
/// request.
const BUSY: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// Why `/metrics` could not be served.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// `metrics_listen` could not be bound.
    #[error("cannot listen for metrics on TCP {addr} (metrics_listen in daemon.toml)")]
    Bind {
        /// The address in the config.
        addr: SocketAddr,
        /// Why the bind failed.
        #[source]
        source: std::io::Error,
    },
    /// The bound socket has no local address.
    #[error(transparent)]
    LocalAddr(std::io::Error),
}

/// Binds `addr` and serves `GET /metrics` from `render` until the process ends.
pub async fn serve(
    addr: SocketAddr,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) -> Result<tokio::task::JoinHandle<()>, MetricsError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let local = listener.local_addr().map_err(MetricsError::LocalAddr)?;
    info!(metrics_listen = %local, "serving /metrics");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    Ok(tokio::spawn(async move {
        let mut pause = Duration::ZERO;
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => {
                    pause = Duration::ZERO;
                    s
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off, do not spin.
                    pause = (pause * 2).clamp(ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MAX);
                    warn!(error = %e, ?pause, "accepting on metrics_listen failed");
                    tokio::time::sleep(pause).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                let _ = stream.try_write(BUSY);
                debug!("metrics_listen: {MAX_CONNECTIONS} connections open; refused one");
                continue;
            };
            let render = render.clone();
            let http = http.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let svc = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    let render = render.clone();
                    async move {
                        let reply = if req.method() == Method::GET && req.uri().path() == "/metrics"
                        {
                            Response::builder()
                                .header("content-type", "text/plain; version=0.0.4")
                                .body(Full::new(Bytes::from(render())))
                        } else {
                            Response::builder()
                                .status(StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::from_static(b"only GET /metrics\n")))
                        };
                        Ok::<_, Infallible>(reply.expect("static response parts"))
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(e) = http.serve_connection(io, svc).await {
                    debug!(error = %e, "metrics connection ended with an error");
                }
            });
        }
    }))
}
