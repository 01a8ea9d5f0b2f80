//! The local API: HTTP/1.1 on a Unix socket, so any program on the board (or `curl
//! --unix-socket`) can submit tasks.
//!
//! - `POST /v1/tasks/{name}` body = input; query `where=`, `detach=true`, repeated `arg=`.
//! - `GET /v1/tasks/{id}` (`?wait=true` blocks until done), `GET /v1/tasks/{id}/output`.
//! - `DELETE /v1/tasks/{id}`: a finished detached task and its output.
//! - `GET /v1/status`, `GET /metrics`.

use crate::http::{header_text, parse_query, BodyInput, ChannelBody};
use crate::placement::Where;
use crate::service::{detached_not_found, task_json, Agent, Finished, Submission, TaskError};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// Header: the task id.
pub const H_TASK_ID: &str = "updraft-task-id";
/// Header: `local` or `cloud`.
pub const H_PLACEMENT: &str = "updraft-placement";
/// Header: why it ran there.
pub const H_REASON: &str = "updraft-reason";
/// Header: the task's exit code.
pub const H_EXIT_CODE: &str = "updraft-exit-code";
/// Header: the task's stderr tail, as a JSON string literal (ASCII-escaped).
pub const H_STDERR_TAIL: &str = "updraft-stderr-tail";
/// Header on error replies: the error code.
pub const H_ERROR_CODE: &str = "updraft-error-code";

/// Most unread request body discarded before an early reply; beyond it the
/// connection is simply closed. Reading costs no memory, only local socket time.
const DRAIN_LIMIT: u64 = 256 << 20;
/// Longest time spent discarding an unread request body.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long shutdown waits for requests in flight before giving up on them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

type Reply = Response<ChannelBody>;

/// Serves the API on `listener` until `shutdown`, then waits for requests in flight.
pub async fn serve(
    agent: Arc<Agent>,
    listener: tokio::net::UnixListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let conns = TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    let agent = agent.clone();
                    conns.spawn(async move {
                        let svc = hyper::service::service_fn(move |req| {
                            let agent = agent.clone();
                            async move { Ok::<_, std::convert::Infallible>(route(req, agent).await) }
                        });
                        let io = hyper_util::rt::TokioIo::new(stream);
                        if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await {
                            debug!(error = %e, "API connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    warn!(error = %e, "accepting on the API socket failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            () = &mut shutdown => break,
        }
    }
    conns.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, conns.wait())
        .await
        .is_err()
    {
        warn!("requests still in flight after {SHUTDOWN_GRACE:?}; stopping anyway");
    }
    Ok(())
}

async fn route(req: Request<Incoming>, agent: Arc<Agent>) -> Reply {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let result = match (req.method(), parts.as_slice()) {
        (&Method::POST, ["v1", "tasks", name]) => {
            let name = name.to_string();
            submit(req, &name, &query, &agent).await
        }
        (&Method::GET, ["v1", "tasks", id]) => task_state(&agent, id, &query).await,
        (&Method::GET, ["v1", "tasks", id, "output"]) => task_output(&agent, id).await,
        (&Method::DELETE, ["v1", "tasks", id]) => agent.delete_task(id).await.map(|()| {
            json(
                StatusCode::OK,
                &serde_json::json!({ "id": id, "deleted": true }),
            )
        }),
        (&Method::GET, ["v1", "status"]) => Ok(json(StatusCode::OK, &agent.status_json())),
        (&Method::GET, ["v1", "explain", task]) => explain(&agent, task, &query),
        (&Method::GET, ["metrics"]) => Ok(Response::builder()
            .header("content-type", "text/plain; version=0.0.4")
            .body(ChannelBody::full(agent.metrics_text()))
            .expect("static response parts")),
        (_, ["v1", "tasks", ..] | ["v1", "status"] | ["v1", "explain", ..] | ["metrics"]) => {
            Err(TaskError {
                code: "method_not_allowed".into(),
                message: format!("{} is not allowed on {path}", req.method()),
            })
        }
        _ => Err(TaskError {
            code: "not_found".into(),
            message: format!("no such endpoint: {path}"),
        }),
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
    let status = if e.code == "method_not_allowed" {
        StatusCode::METHOD_NOT_ALLOWED
    } else {
        StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    };
    let mut r = json(
        status,
        &serde_json::json!({ "error": e.message, "code": e.code }),
    );
    r.headers_mut().insert(H_ERROR_CODE, header_value(&e.code));
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
    TaskError {
        code: "bad_request".into(),
        message,
    }
}

async fn submit(
    req: Request<Incoming>,
    name: &str,
    query: &str,
    agent: &Arc<Agent>,
) -> Result<Reply, TaskError> {
    let mut sub = Submission {
        task: name.to_string(),
        ..Default::default()
    };
    let mut detach = false;
    for (k, v) in parse_query(query).map_err(|e| bad_request(format!("bad query string: {e}")))? {
        match k.as_str() {
            "where" => sub.where_ = v.parse::<Where>().map_err(bad_request)?,
            "detach" => detach = matches!(v.as_str(), "true" | "1" | ""),
            "arg" => sub.args.push(v),
            other => {
                return Err(bad_request(format!(
                    "unknown query parameter `{other}` (expected where, detach, arg)"
                )))
            }
        }
    }
    sub.input_len = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let mut input = BodyInput(req.into_body());
    if detach {
        let id = agent.submit_detached(sub, &mut input).await;
        drain(&mut input).await;
        let id = id?;
        let mut r = json(StatusCode::ACCEPTED, &serde_json::json!({ "id": id }));
        r.headers_mut().insert(H_TASK_ID, header_value(&id));
        return Ok(r);
    }
    let finished = agent.submit(sub, &mut input).await;
    drain(&mut input).await;
    Ok(finished_reply(finished?).await)
}

/// Reads and discards what is left of a request body (up to [`DRAIN_LIMIT`] bytes or
/// [`DRAIN_TIMEOUT`]). A task refused part-way through its input (over `max_input`, or
/// refused by a daemon) leaves the client still sending; replying without reading the
/// rest makes many HTTP clients fail with a broken pipe instead of showing the reply.
async fn drain(input: &mut BodyInput) {
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
            let body = match output.reader().await {
                Ok(reader) => ChannelBody::from_input(
                    KeepAlive {
                        reader,
                        _spool: output,
                    },
                    Some(len),
                ),
                Err(e) => {
                    return error_reply(&TaskError {
                        code: "internal".into(),
                        message: format!("reading spooled output: {e}"),
                    })
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
    let mut where_ = Where::Auto;
    let mut input_bytes = None;
    for (k, v) in parse_query(query).map_err(|e| bad_request(format!("bad query string: {e}")))? {
        match k.as_str() {
            "where" => where_ = v.parse::<Where>().map_err(bad_request)?,
            "input_bytes" => {
                input_bytes =
                    Some(v.parse::<u64>().map_err(|_| {
                        bad_request(format!("input_bytes must be a number, not `{v}`"))
                    })?)
            }
            other => {
                return Err(bad_request(format!(
                    "unknown query parameter `{other}` (expected where, input_bytes)"
                )))
            }
        }
    }
    Ok(json(
        StatusCode::OK,
        &agent.explain(task, where_, input_bytes)?,
    ))
}

async fn task_state(agent: &Agent, id: &str, query: &str) -> Result<Reply, TaskError> {
    let wait = parse_query(query)
        .map_err(|e| bad_request(format!("bad query string: {e}")))?
        .iter()
        .any(|(k, v)| k == "wait" && matches!(v.as_str(), "true" | "1" | ""));
    let row = agent
        .task_state(id, wait)
        .await?
        .ok_or_else(|| detached_not_found(id))?;
    Ok(json(StatusCode::OK, &task_json(&row)))
}

async fn task_output(agent: &Agent, id: &str) -> Result<Reply, TaskError> {
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
