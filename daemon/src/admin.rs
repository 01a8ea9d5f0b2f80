//! The admin socket: a Unix socket (`admin_socket`, default `STATE_DIR/admin.sock`,
//! mode 0600) on which `updraftd agents` and `updraftd agent revoke` reach the running
//! daemon. HTTP/1.1 with JSON bodies, so `curl --unix-socket` works too:
//!
//! - `GET /v1/agents`: every agent the registry holds.
//! - `GET /v1/agents/ID`: one agent.
//! - `POST /v1/agents/ID/revoke`: revokes it.
//!
//! Errors are `{"error": "...", "code": "..."}` with a fitting status.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Response, StatusCode};
use tracing::{debug, info, warn};
use updraft_shared::accept::accept_loop;

use crate::state::Shared;

/// Admin connections served at once; one more is closed unanswered.
const MAX_CONNECTIONS: usize = 16;
/// Time a client has to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the admin socket could not be served.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Another daemon answers on the socket.
    #[error("{}: another updraftd is serving this admin socket (set admin_socket in daemon.toml to run two daemons on one machine)", .0.display())]
    InUse(PathBuf),
    /// The socket could not be created.
    #[error("cannot serve the admin socket {}: {error} (check admin_socket and state_dir in daemon.toml)", path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
}

/// Binds `path` (mode 0600; a stale socket left by a killed daemon is replaced) and
/// serves the admin API on it until the process ends.
pub(crate) async fn serve(
    path: &Path,
    shared: Arc<Shared>,
) -> Result<tokio::task::JoinHandle<()>, AdminError> {
    let listener = bind(path)?;
    info!(admin_socket = %path.display(), "serving the admin socket");
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    Ok(tokio::spawn(async move {
        let serve = |stream, slot| {
            let shared = shared.clone();
            let http = http.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let svc = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    let shared = shared.clone();
                    async move { Ok::<_, Infallible>(answer(&req, &shared)) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(e) = http.serve_connection(io, svc).await {
                    debug!(error = %e, "admin connection ended with an error");
                }
            });
        };
        let refuse =
            |_stream| debug!("admin_socket: {MAX_CONNECTIONS} connections open; closed one");
        accept_loop(
            &listener,
            "admin_socket",
            MAX_CONNECTIONS,
            std::future::pending(),
            serve,
            refuse,
        )
        .await;
    }))
}

fn bind(path: &Path) -> Result<tokio::net::UnixListener, AdminError> {
    use std::os::unix::fs::PermissionsExt;
    let failed = |error| AdminError::Bind {
        path: path.to_path_buf(),
        error,
    };
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(AdminError::InUse(path.to_path_buf()));
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(failed(e)),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(failed)?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(failed)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(failed)?;
    Ok(listener)
}

/// The answer to one request.
fn answer<B>(req: &hyper::Request<B>, shared: &Shared) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method(), parts.as_slice()) {
        (&Method::GET, ["v1", "agents"]) => json(StatusCode::OK, &shared.fleet.list()),
        (&Method::GET, ["v1", "agents", id]) => match shared.fleet.get(id) {
            Some(agent) => json(StatusCode::OK, &agent),
            None => error(StatusCode::NOT_FOUND, "unknown_agent", &unknown(id)),
        },
        (&Method::POST, ["v1", "agents", id, "revoke"]) => {
            let issued = crate::issued::Issued::new(&shared.config.state_dir);
            match shared.fleet.revoke(id, &issued) {
                Ok(done) => {
                    warn!(
                        agent = *id,
                        serials = done.serials.join(","),
                        closed = done.closed,
                        "agent `{id}` revoked by the operator: its certificates are refused at the handshake and at renewal"
                    );
                    json(StatusCode::OK, &done)
                }
                Err(crate::fleet::FleetError::Unknown(_)) => {
                    error(StatusCode::NOT_FOUND, "unknown_agent", &unknown(id))
                }
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", &e.to_string()),
            }
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!(
                "no such admin request: {} {path} (GET /v1/agents, GET /v1/agents/ID, POST /v1/agents/ID/revoke)",
                req.method()
            ),
        ),
    }
}

fn unknown(id: &str) -> String {
    format!("no agent `{id}` is known to this daemon (see `updraftd agents`)")
}

fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).expect("admin answers always serialize");
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts")
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    json(
        status,
        &serde_json::json!({ "error": message, "code": code }),
    )
}
