//! The local API: HTTP/1.1 on a Unix socket, so any program on the board (or `curl
//! --unix-socket`) can submit tasks.
//!
//! - `POST /v1/tasks/{name}` body = input; query `where=`, `detach=true`, repeated `arg=`.
//! - `GET /v1/tasks/{id}` (`?wait=true` blocks until done), `GET /v1/tasks/{id}/output`.
//! - `DELETE /v1/tasks/{id}`: a finished detached task and its output.
//! - `GET /v1/status`, `GET /metrics`.
//!
//! Every endpoint refuses unknown and repeated query parameters and values outside the
//! documented ones (400). Connections are capped and timed out (`[api]` in agent.toml,
//! see [`serve`]).

use crate::detached::detached_not_found;
use crate::http::{
    header_text, parse_query, ApiIo, ChannelBody, RequestBody, H_ERROR_CODE, H_EXIT_CODE,
    H_PLACEMENT, H_REASON, H_STDERR_TAIL, H_TASK_ID, MAX_HEADERS, MAX_HEAD_BYTES,
};
use crate::placement::Where;
use crate::service::Agent;
use crate::status::task_json;
use crate::task::{Finished, Submission, TaskCode, TaskError};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};
use updraft_proto::ErrorCode;
use updraft_shared::accept::accept_loop;

/// Most unread request body discarded before an early reply; beyond it the
/// connection is simply closed. Reading costs no memory, only local socket time.
const DRAIN_LIMIT: u64 = 256 << 20;
/// Longest time spent discarding an unread request body: a local client sends 256 MiB
/// well within it, and a stalled one must not hold the reply longer.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long shutdown waits for requests in flight before giving up on them: half the
/// unit's `TimeoutStopSec=60`, leaving room for the detached runs and the uplink after it.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

type Reply = Response<ChannelBody>;

/// Longest request URI (path and query); a longer one gets `414` with the JSON error.
/// A task name and a few dozen `arg=` fit many times over.
pub(crate) const MAX_URI_BYTES: usize = 8 << 10;
/// Serves the API on `listener` until `shutdown`, then waits for requests in flight.
///
/// At most `[api] max_connections` connections are served at once; one more is
/// answered `503 busy` at once and closed, so no file descriptor is held for it. A
/// client has `header_timeout` to send each request's headers (and an idle
/// connection is closed after it); a request body or a reply that makes no progress
/// for `body_stall_timeout` ends the request.
pub(crate) async fn serve(
    agent: Arc<Agent>,
    listener: tokio::net::UnixListener,
    shutdown: impl Future<Output = ()>,
) {
    let limits = agent.config().api.clone();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_headers(MAX_HEADERS)
        .max_header_size(MAX_HEAD_BYTES)
        .writev(false);
    let http = Arc::new(http);
    let conns = TaskTracker::new();
    let mut refused = RateLimitedWarn::default();
    let lingering = Arc::new(tokio::sync::Semaphore::new(LINGERING_REFUSALS));
    let serve = |stream, slot| {
        let agent = agent.clone();
        let http = http.clone();
        let stall = limits.body_stall_timeout;
        conns.spawn(async move {
            let _slot = slot;
            let svc = hyper::service::service_fn(move |req| {
                let agent = agent.clone();
                async move { Ok::<_, std::convert::Infallible>(route(req, agent).await) }
            });
            let io = hyper_util::rt::TokioIo::new(ApiIo::new(stream, stall));
            if let Err(e) = http.serve_connection(io, svc).await {
                debug!(error = %e, "API connection ended with an error");
            }
        });
    };
    let refuse = |stream| {
        refuse_busy(stream, limits.max_connections, &lingering);
        refused.warn(|n| warn!(limit = limits.max_connections, refused = n, "API connection limit reached ([api] max_connections); new connections get 503 busy"));
    };
    accept_loop(
        &listener,
        "the API socket",
        limits.max_connections,
        shutdown,
        serve,
        refuse,
    )
    .await;
    conns.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, conns.wait())
        .await
        .is_err()
    {
        warn!("requests still in flight after {SHUTDOWN_GRACE:?}; stopping anyway");
    }
}

/// A warning said at most once a minute, with how many times it happened.
#[derive(Debug, Default)]
struct RateLimitedWarn {
    last: Option<std::time::Instant>,
    count: u64,
}

impl RateLimitedWarn {
    /// At most one warning a minute: a flood of refused connections stays one line a
    /// minute in the journal, with its count.
    const EVERY: Duration = Duration::from_secs(60);

    fn warn(&mut self, say: impl FnOnce(u64)) {
        self.count += 1;
        let due = match self.last {
            None => true,
            Some(t) => t.elapsed() >= Self::EVERY,
        };
        if due {
            say(self.count);
            self.last = Some(std::time::Instant::now());
            self.count = 0;
        }
    }
}

/// Refused connections whose request is still being read (and discarded) so that
/// the client can read the refusal: closing a Unix socket with unread data resets it,
/// and the client would see "connection reset" instead of `503 busy`.
const LINGERING_REFUSALS: usize = 32;
/// How long a refused connection is read before it is closed: a local client has
/// sent its request and read the refusal well within a second.
const LINGER_TIME: Duration = Duration::from_secs(1);
/// How much of a refused connection is read before it is closed: a request head and
/// the start of a body; a client still sending past it is not listening.
const LINGER_BYTES: usize = 64 << 10;

/// Answers a connection over the limit with `503 busy` and closes it: after reading
/// what the client sends for up to [`LINGER_TIME`] when fewer than
/// [`LINGERING_REFUSALS`] are lingering already, else at once.
fn refuse_busy(
    stream: tokio::net::UnixStream,
    limit: usize,
    lingering: &Arc<tokio::sync::Semaphore>,
) {
    let body = serde_json::json!({
        "error": format!("the agent's API already has {limit} connections open ([api] max_connections); try again shortly"),
        "code": TaskCode::Wire(ErrorCode::Busy).as_str(),
    })
    .to_string();
    let reply = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n{H_ERROR_CODE}: {}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        TaskCode::Wire(ErrorCode::Busy).as_str(),
        body.len()
    );
    // The reply is small enough for the empty socket buffer of a new connection.
    let _ = stream.try_write(reply.as_bytes());
    let mut buf = vec![0u8; 4096];
    let Ok(permit) = lingering.clone().try_acquire_owned() else {
        while matches!(stream.try_read(&mut buf), Ok(n) if n > 0) {}
        return;
    };
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let _permit = permit;
        let mut stream = stream;
        let mut read = 0;
        let drain = async {
            while let Ok(n) = stream.read(&mut buf).await {
                read += n;
                if n == 0 || read > LINGER_BYTES {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(LINGER_TIME, drain).await;
    });
}

/// Binds the API socket: creates its directory, removes a stale socket left by a
/// previous run (a socket nothing answers on), refuses to steal one another agent is
/// serving on, refuses to remove anything that is not a socket (a misconfigured
/// `socket` must not delete a journal or a config), and restricts access to the owner
/// and group (mode 0660).
pub fn bind_socket(path: &std::path::Path) -> Result<tokio::net::UnixListener, BindError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let io = |what: &'static str, at: &std::path::Path| {
        let path = at.to_path_buf();
        move |source| BindError::Io { what, path, source }
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(BindError::InUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(io("remove stale socket", path))?;
        }
        Ok(m) => {
            return Err(BindError::NotASocket {
                path: path.to_path_buf(),
                kind: file_kind(&m),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("inspect", path)(e)),
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(io("listen on", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(io("set permissions on", path))?;
    Ok(listener)
}

/// Why the API socket could not be bound ([`bind_socket`]).
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// Another agent answers on the socket.
    #[error("{} is in use by a running agent; stop it or choose another socket", .0.display())]
    InUse(std::path::PathBuf),
    /// Something that is not a socket is at the path; it is left alone.
    #[error("{} exists and is not a socket (it is {kind}); refusing to replace it: set `socket` in agent.toml to a free path, or move the file away", path.display())]
    NotASocket {
        /// The configured `socket`.
        path: std::path::PathBuf,
        /// What is there.
        kind: &'static str,
    },
    /// A filesystem call failed (`cannot {what} {path}`).
    #[error("cannot {what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: std::path::PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
}

fn file_kind(m: &std::fs::Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else {
        "a special file"
    }
}

async fn route(req: Request<Incoming>, agent: Arc<Agent>) -> Reply {
    let uri_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if uri_len > MAX_URI_BYTES {
        let mut r = error_reply(&bad_request(format!(
            "the request URI is {uri_len} bytes, over the limit of {MAX_URI_BYTES}"
        )));
        *r.status_mut() = StatusCode::URI_TOO_LONG;
        return r;
    }
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let result = match (req.method(), parts.as_slice()) {
        (&Method::POST, ["v1", "tasks", name]) => {
            let name = name.to_string();
            submit(req, &name, &query, &agent).await
        }
        (&Method::GET, ["v1", "tasks", id]) => task_state(&agent, id, &query).await,
        (&Method::GET, ["v1", "tasks", id, "output"]) => task_output(&agent, id, &query).await,
        (&Method::DELETE, ["v1", "tasks", id]) => match Query::parse(&query, &[], &[]) {
            Ok(_) => agent.delete_task(id).await.map(|()| {
                json(
                    StatusCode::OK,
                    &serde_json::json!({ "id": id, "deleted": true }),
                )
            }),
            Err(e) => Err(e),
        },
        (&Method::GET, ["v1", "status"]) => {
            Query::parse(&query, &[], &[]).map(|_| json(StatusCode::OK, &agent.status_json()))
        }
        (&Method::GET, ["v1", "explain", task]) => explain(&agent, task, &query),
        (&Method::GET, ["metrics"]) => Ok(Response::builder()
            .header("content-type", "text/plain; version=0.0.4")
            .body(ChannelBody::full(agent.metrics_text()))
            .expect("static response parts")),
        (_, ["v1", "tasks", ..] | ["v1", "status"] | ["v1", "explain", ..] | ["metrics"]) => {
            Err(TaskError::new(
                TaskCode::MethodNotAllowed,
                format!("{} is not allowed on {path}", req.method()),
            ))
        }
        _ => Err(TaskError::new(
            TaskCode::NotFound,
            format!("no such endpoint: {path}"),
        )),
    };
    result.unwrap_or_else(|e| error_reply(&e))
}

fn json(status: StatusCode, value: &serde_json::Value) -> Reply {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(ChannelBody::full(
            serde_json::to_vec(value).expect("JSON values serialize"),
        ))
        .expect("static response parts")
}

fn error_reply(e: &TaskError) -> Reply {
    let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = json(
        status,
        &serde_json::json!({ "error": e.message, "code": e.code.as_str() }),
    );
    r.headers_mut()
        .insert(H_ERROR_CODE, header_value(e.code.as_str()));
    r
}

/// Header values must be visible ASCII; our reasons are, but task names and daemon
/// messages pass through here too.
fn header_value(s: &str) -> hyper::header::HeaderValue {
    let clean: String = s
        .chars()
        .map(|c| {
            if c.is_ascii() && !c.is_ascii_control() {
                c
            } else {
                '?'
            }
        })
        .collect();
    hyper::header::HeaderValue::from_str(&clean).expect("sanitized to visible ASCII")
}

fn bad_request(message: String) -> TaskError {
    TaskError::new(TaskCode::Wire(ErrorCode::BadRequest), message)
}

/// A request's query, checked: only the names an endpoint knows, each single-valued
/// one at most once.
struct Query(Vec<(String, String)>);

impl Query {
    /// Parses `query` for an endpoint taking `single` (at most once each) and `multi`
    /// (repeatable) parameters.
    fn parse(query: &str, single: &[&str], multi: &[&str]) -> Result<Self, TaskError> {
        let pairs =
            parse_query(query).map_err(|e| bad_request(format!("bad query string: {e}")))?;
        for (i, (k, _)) in pairs.iter().enumerate() {
            if multi.contains(&k.as_str()) {
                continue;
            }
            if !single.contains(&k.as_str()) {
                let known: Vec<&str> = single.iter().chain(multi).copied().collect();
                return Err(bad_request(format!(
                    "unknown query parameter `{k}` (expected {})",
                    known.join(", ")
                )));
            }
            if pairs[..i].iter().any(|(p, _)| p == k) {
                return Err(bad_request(format!(
                    "query parameter `{k}` is given more than once; give it once"
                )));
            }
        }
        Ok(Self(pairs))
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> {
        self.0
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// A yes/no parameter: `true`, `1` or nothing (`?detach`) for yes; `false`, `0`
    /// for no; absent for no.
    fn flag(&self, name: &str) -> Result<bool, TaskError> {
        match self.get(name) {
            None | Some("false" | "0") => Ok(false),
            Some("true" | "1" | "") => Ok(true),
            Some(other) => Err(bad_request(format!(
                "{name} must be true or false, not `{other}`"
            ))),
        }
    }

    fn where_(&self) -> Result<Where, TaskError> {
        self.get("where")
            .map_or(Ok(Where::Auto), |v| v.parse::<Where>().map_err(bad_request))
    }
}

/// Refuses a `where=` the task's `offload` forbids (`not_allowed`, 403).
fn check_where(agent: &Agent, task: &str, requested: Where) -> Result<(), TaskError> {
    match agent.config().catalog.get(task) {
        Some(spec) => match crate::placement::conflict(spec, requested) {
            Some(why) => Err(TaskError::new(TaskCode::Wire(ErrorCode::NotAllowed), why)),
            None => Ok(()),
        },
        None => Ok(()),
    }
}

async fn submit(
    req: Request<Incoming>,
    name: &str,
    query: &str,
    agent: &Arc<Agent>,
) -> Result<Reply, TaskError> {
    let q = Query::parse(query, &["where", "detach"], &["arg"])?;
    let mut sub = Submission {
        task: name.to_string(),
        where_: q.where_()?,
        ..Default::default()
    };
    let detach = q.flag("detach")?;
    for (i, a) in q.all("arg").enumerate() {
        if a.contains('\0') {
            return Err(bad_request(format!(
                "arg {} contains a NUL byte, which no program argument can hold",
                i + 1
            )));
        }
        sub.args.push(a.to_string());
    }
    check_where(agent, name, sub.where_)?;
    sub.input_len = input_len(req.headers());
    let mut input = RequestBody::new(req.into_body(), agent.config().api.body_stall_timeout);
    let body_failed = input.failed.clone();
    let body_error = move || {
        body_failed
            .lock()
            .expect("body error lock")
            .clone()
            .map(bad_request)
    };
    if detach {
        let id = agent.submit_detached(sub, &mut input).await;
        let cut = body_error();
        drain(&mut input).await;
        if let Some(e) = cut {
            return Err(e);
        }
        let id = id?;
        let mut r = json(StatusCode::ACCEPTED, &serde_json::json!({ "id": id }));
        r.headers_mut().insert(H_TASK_ID, header_value(&id));
        return Ok(r);
    }
    let finished = agent.submit(sub, &mut input).await;
    // A body cut or malformed by the submitter while the task read it is its fault,
    // whatever the run or the daemon made of the partial input. (What goes wrong in
    // the discarded rest after a refusal does not change the refusal.)
    let cut = body_error();
    drain(&mut input).await;
    if let Some(e) = cut {
        return Err(e);
    }
    Ok(finished_reply(finished?).await)
}

/// The request's `Content-Length`, when the client sent one: the task's input length,
/// a u64 on every target (5 GiB stays 5368709120 on a 32-bit board).
fn input_len(headers: &hyper::HeaderMap) -> Option<u64> {
    headers
        .get(hyper::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Reads and discards what is left of a request body (up to [`DRAIN_LIMIT`] bytes or
/// [`DRAIN_TIMEOUT`]). A task refused part-way through its input (over `max_input`, or
/// refused by a daemon) leaves the client still sending; replying without reading the
/// rest makes many HTTP clients fail with a broken pipe instead of showing the reply.
async fn drain(input: &mut RequestBody) {
    use updraft_shared::exec::Input;
    let discard = async {
        let mut n: u64 = 0;
        while let Ok(Some(chunk)) = input.next_chunk().await {
            n += chunk.len() as u64;
            if n > DRAIN_LIMIT {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, discard).await;
}

async fn finished_reply(f: Finished) -> Reply {
    let Finished {
        id,
        side,
        reason,
        result,
        output,
    } = f;
    let mut reply = match &result {
        Ok(exit) => {
            let len = output.len();
            let body = match output.in_memory() {
                // Small outputs: straight from memory, no task between them and the socket.
                Some(chunks) => Ok(ChannelBody::from_chunks(chunks.iter().cloned())),
                None => output.reader().await.map(|reader| {
                    ChannelBody::from_input(
                        KeepAlive {
                            reader,
                            _spool: output,
                        },
                        Some(len),
                    )
                }),
            };
            let body = match body {
                Ok(body) => body,
                Err(e) => {
                    return error_reply(&TaskError::new(
                        TaskCode::Wire(ErrorCode::Internal),
                        format!("reading spooled output: {e}"),
                    ))
                }
            };
            let mut r = Response::builder()
                .header("content-type", "application/octet-stream")
                .body(body)
                .expect("static response parts");
            r.headers_mut()
                .insert(H_EXIT_CODE, header_value(&exit.code.to_string()));
            if !exit.stderr_tail.is_empty() {
                r.headers_mut()
                    .insert(H_STDERR_TAIL, header_value(&header_text(&exit.stderr_tail)));
            }
            r
        }
        Err(e) => error_reply(e),
    };
    let h = reply.headers_mut();
    h.insert(H_TASK_ID, header_value(&id));
    h.insert(H_PLACEMENT, header_value(side.as_str()));
    h.insert(H_REASON, header_value(&reason));
    reply
}

/// Keeps a spool (and its file) alive while its reader streams.
struct KeepAlive<S> {
    reader: crate::spool::SpoolReader,
    _spool: S,
}

impl<S: Send> updraft_shared::exec::Input for KeepAlive<S> {
    async fn next_chunk(&mut self) -> std::io::Result<Option<bytes::Bytes>> {
        self.reader.next_chunk().await
    }
}

fn explain(agent: &Agent, task: &str, query: &str) -> Result<Reply, TaskError> {
    let q = Query::parse(query, &["where", "input_bytes"], &[])?;
    let where_ = q.where_()?;
    let input_bytes = match q.get("input_bytes") {
        None => None,
        Some(v) => Some(
            v.parse::<u64>()
                .map_err(|_| bad_request(format!("input_bytes must be a number, not `{v}`")))?,
        ),
    };
    check_where(agent, task, where_)?;
    Ok(json(
        StatusCode::OK,
        &agent.explain(task, where_, input_bytes)?,
    ))
}

async fn task_state(agent: &Agent, id: &str, query: &str) -> Result<Reply, TaskError> {
    let wait = Query::parse(query, &["wait"], &[])?.flag("wait")?;
    let row = agent
        .task_state(id, wait)
        .await?
        .ok_or_else(|| detached_not_found(id))?;
    Ok(json(StatusCode::OK, &task_json(&row)))
}

async fn task_output(agent: &Agent, id: &str, query: &str) -> Result<Reply, TaskError> {
    Query::parse(query, &[], &[])?;
    let (row, reader) = agent.task_output(id).await?;
    let mut r = Response::builder()
        .header("content-type", "application/octet-stream")
        .body(ChannelBody::from_input(reader, row.output_len))
        .expect("static response parts");
    let h = r.headers_mut();
    h.insert(H_TASK_ID, header_value(id));
    if let Some(p) = row.placement {
        h.insert(H_PLACEMENT, header_value(p.as_str()));
    }
    if let Some(reason) = &row.reason {
        h.insert(H_REASON, header_value(reason));
    }
    if let Some(code) = row.exit_code {
        h.insert(H_EXIT_CODE, header_value(&code.to_string()));
    }
    if let Some(tail) = row.stderr_tail.as_deref().filter(|t| !t.is_empty()) {
        h.insert(H_STDERR_TAIL, header_value(&header_text(tail)));
    }
    if let Some((code, _)) = &row.error {
        h.insert(H_ERROR_CODE, header_value(code));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::input_len;
    use hyper::header::{HeaderValue, CONTENT_LENGTH};

    #[test]
    fn a_content_length_past_4_gib_is_the_input_len() {
        let mut headers = hyper::HeaderMap::new();
        assert_eq!(input_len(&headers), None);
        headers.insert(CONTENT_LENGTH, HeaderValue::from_static("5368709120"));
        assert_eq!(input_len(&headers), Some(5_368_709_120));
    }
}
