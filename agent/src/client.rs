//! A client for the local API over the Unix socket, used by the CLI, the demo, the
//! benchmarks and the tests.

use crate::http::{percent_encode, ChannelBody};
use crate::placement::Where;
use anyhow::Context;
use hyper::body::Incoming;
use hyper::{Request, Response};
use std::path::{Path, PathBuf};

/// Talks to one agent's socket; one HTTP connection per request.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

/// What a run submits.
#[derive(Debug, Clone, Default)]
pub struct RunRequest {
    /// Task name.
    pub task: String,
    /// Extra arguments.
    pub args: Vec<String>,
    /// Requested side.
    pub where_: Option<Where>,
    /// Detach.
    pub detach: bool,
}

impl RunRequest {
    /// The request path and query.
    pub fn path(&self) -> String {
        let mut q = Vec::new();
        match self.where_ {
            Some(Where::Local) => q.push("where=local".to_string()),
            Some(Where::Cloud) => q.push("where=cloud".to_string()),
            Some(Where::Auto) | None => {}
        }
        if self.detach {
            q.push("detach=true".into());
        }
        for a in &self.args {
            q.push(format!("arg={}", percent_encode(a)));
        }
        let mut p = format!("/v1/tasks/{}", percent_encode(&self.task));
        if !q.is_empty() {
            p.push('?');
            p.push_str(&q.join("&"));
        }
        p
    }
}

impl Client {
    /// A client for the agent at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one request.
    pub async fn send(&self, req: Request<ChannelBody>) -> anyhow::Result<Response<Incoming>> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .with_context(|| {
                format!(
                    "cannot reach the agent at {} (is `updraft-agent serve` running? see --socket)",
                    self.socket.display()
                )
            })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .context("HTTP handshake with the agent")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        sender
            .send_request(req)
            .await
            .context("request to the agent failed")
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> anyhow::Result<Response<Incoming>> {
        let req = Request::get(path)
            .header("host", "updraft-agent")
            .body(ChannelBody::full(Vec::new()))?;
        self.send(req).await
    }

    /// `POST` a task with `body` as input.
    pub async fn run(
        &self,
        run: &RunRequest,
        body: ChannelBody,
    ) -> anyhow::Result<Response<Incoming>> {
        let mut req = Request::post(run.path()).header("host", "updraft-agent");
        if let Some(n) = hyper::body::Body::size_hint(&body).exact() {
            req = req.header("content-length", n);
        }
        self.send(req.body(body)?).await
    }
}

/// Reads a whole (small) response body.
pub async fn body_bytes(resp: Response<Incoming>) -> anyhow::Result<bytes::Bytes> {
    use http_body_util::BodyExt;
    Ok(resp
        .into_body()
        .collect()
        .await
        .context("reading the agent's reply")?
        .to_bytes())
}
