//! The admin socket: a Unix socket (`admin_socket`, default `STATE_DIR/admin.sock`,
//! mode 0600) on which `updraftd agents` and `updraftd agent revoke` reach the running
//! daemon. HTTP/1.1 with JSON bodies, so `curl --unix-socket` works too:
//!
//! - `GET /v1/agents`: every agent the registry holds.
//! - `GET /v1/agents/ID`: one agent.
//! - `POST /v1/agents/ID/revoke`: revokes it.
//! - `POST /v1/policy/push`: pushes a policy file (`{"name", "text", "agents",
//!   "canary", "window_ms"}`); `GET /v1/policy/push`: how far it went.
//!
//! Errors are `{"error": "...", "code": "..."}` with a fitting status.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Response, StatusCode};
use updraft_proto::fleet::MAX_POLICY_LEN;
use updraft_proto::policy::rules;

use crate::enroll::MAX_TOKEN_USES;
use tracing::{debug, info, warn};
use updraft_shared::metrics_http::serve_http1;

use crate::state::Shared;

/// Admin connections served at once; one more is closed unanswered.
const MAX_CONNECTIONS: usize = 16;

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
    let refuse = |_stream| debug!("admin_socket: {MAX_CONNECTIONS} connections open; closed one");
    let handle = move |req: hyper::Request<Incoming>| {
        let shared = shared.clone();
        async move { handle(req, &shared).await }
    };
    Ok(serve_http1(
        listener,
        "admin_socket",
        MAX_CONNECTIONS,
        handle,
        refuse,
    ))
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

/// Largest request body: a push of the largest policy, JSON-escaped, and its targets.
const MAX_BODY: usize = 4 << 20;
/// Longest canary watch a push may ask for.
const MAX_WINDOW: Duration = Duration::from_secs(86_400);
/// Default canary watch.
pub(crate) const DEFAULT_WINDOW: Duration = Duration::from_secs(300);

/// `POST /v1/policy/push` as sent.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PushRequest {
    /// The file name the operator gave (for messages and the rollout's record).
    name: String,
    /// The policy file.
    text: String,
    /// The boards in scope; absent: every board.
    #[serde(default)]
    agents: Option<Vec<String>>,
    /// Canaries first; 0 or absent: every board at once.
    #[serde(default)]
    canary: u32,
    /// How long the canaries are watched, ms.
    #[serde(default)]
    window_ms: Option<u64>,
}

async fn handle(req: hyper::Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    if req.method() == Method::POST && req.uri().path() == "/v1/policy/push" {
        let body = match http_body_util::Limited::new(req.into_body(), MAX_BODY)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    &format!("cannot read the push (at most {MAX_BODY} bytes): {e}"),
                )
            }
        };
        return push(&body, shared);
    }
    answer(&req, shared)
}

/// Starts a policy push: the file is checked with the parser agents use first.
fn push(body: &[u8], shared: &Shared) -> Response<Full<Bytes>> {
    let bad = |m: String| error(StatusCode::BAD_REQUEST, "bad_request", &m);
    let req: PushRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return bad(format!("a push is a JSON object: {e}")),
    };
    if req.text.len() > MAX_POLICY_LEN {
        return bad(format!(
            "{}: a pushed policy may be at most {MAX_POLICY_LEN} bytes",
            req.name
        ));
    }
    if let Err(e) = rules::parse(&req.text, Path::new(&req.name)) {
        return error(StatusCode::BAD_REQUEST, "bad_policy", &e.to_string());
    }
    if let Some(agents) = &req.agents {
        if agents.is_empty() || agents.len() > crate::fleet::MAX_AGENTS {
            return bad(format!(
                "--agents names 1 to {} agents",
                crate::fleet::MAX_AGENTS
            ));
        }
        if let Some(bad_id) = agents
            .iter()
            .find(|a| updraft_shared::tls::check_agent_id(a).is_err())
        {
            return bad(format!("--agents: `{bad_id}` is not an agent id"));
        }
    }
    if req.canary > MAX_TOKEN_USES {
        return bad(format!("--canary must be 0 to {MAX_TOKEN_USES}"));
    }
    let window = req.window_ms.map_or(DEFAULT_WINDOW, Duration::from_millis);
    if window > MAX_WINDOW {
        return bad(format!("--window must be at most {MAX_WINDOW:?}"));
    }
    let hash = updraft_shared::files::sha256_hex(req.text.as_bytes());
    let spec = crate::fleet::push::PushSpec {
        hash,
        text: req.text,
        name: req.name,
        targets: req.agents,
        canary: req.canary as usize,
        window_ms: window.as_millis() as u64,
    };
    match shared.fleet.push(spec) {
        Ok(status) => json(StatusCode::OK, &status),
        Err(e) => error(StatusCode::CONFLICT, "no_canary", &e.to_string()),
    }
}

/// The answer to one request without a body.
fn answer<B>(req: &hyper::Request<B>, shared: &Shared) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method(), parts.as_slice()) {
        (&Method::GET, ["v1", "agents"]) => json(StatusCode::OK, &shared.fleet.list()),
        (&Method::GET, ["v1", "agents", id]) => match shared.fleet.get(id) {
            Some(agent) => json(StatusCode::OK, &agent),
            None => error(StatusCode::NOT_FOUND, "unknown_agent", &unknown(id)),
        },
        (&Method::GET, ["v1", "policy", "push"]) => json(StatusCode::OK, &shared.fleet.push_status()),
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
                "no such admin request: {} {path} (GET /v1/agents, GET /v1/agents/ID, POST /v1/agents/ID/revoke, POST or GET /v1/policy/push)",
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
