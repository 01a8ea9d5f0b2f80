//! The client side of the admin socket, for `updraftd agents` and `updraftd agent
//! revoke`: one request, its JSON answer, and the table `agents` prints.

use http_body_util::{BodyExt, Full};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Longest admin answer read: the registry of 100 000 agents is well under it.
const MAX_ANSWER: usize = 256 << 20;
/// How long the daemon has to answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an admin request failed. Each message says what to check.
#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    /// Nothing answers on the socket.
    #[error("cannot reach updraftd on its admin socket {}: {error} (is `updraftd serve` running with this config? is admin_socket the same? run as the daemon's user or root)", socket.display())]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// The exchange failed midway.
    #[error("admin request to {}: {error}", socket.display())]
    Http {
        /// The socket.
        socket: PathBuf,
        /// What failed.
        error: String,
    },
    /// The daemon refused the request; its message.
    #[error("{0}")]
    Refused(String),
}

/// Sends `method path` to the admin socket at `socket` and returns the JSON answer of a
/// successful request; a refusal is [`AdminClientError::Refused`] with the daemon's
/// message.
pub async fn request(
    socket: &Path,
    method: hyper::Method,
    path: &str,
) -> Result<serde_json::Value, AdminClientError> {
    request_with(socket, method, path, Vec::new()).await
}

/// Like [`request`], with `body` (JSON) sent along.
pub async fn request_with(
    socket: &Path,
    method: hyper::Method,
    path: &str,
    body: Vec<u8>,
) -> Result<serde_json::Value, AdminClientError> {
    let http = |error: String| AdminClientError::Http {
        socket: socket.to_path_buf(),
        error,
    };
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|error| AdminClientError::Connect {
            socket: socket.to_path_buf(),
            error,
        })?;
    let exchange = async {
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| http(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "updraftd")
            .header("content-type", "application/json")
            .body(Full::new(bytes::Bytes::from(body)))
            .map_err(|e| http(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| http(e.to_string()))?;
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| http(e.to_string()))?
            .to_bytes();
        Ok::<_, AdminClientError>((status, body))
    };
    let (status, body) = tokio::time::timeout(ANSWER_TIMEOUT, exchange)
        .await
        .map_err(|_| http(format!("no answer within {ANSWER_TIMEOUT:?}")))??;
    let value: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| http(format!("the answer is not JSON: {e}")))?;
    if status.is_success() {
        Ok(value)
    } else {
        let message = value["error"].as_str().unwrap_or("refused").to_string();
        Err(AdminClientError::Refused(message))
    }
}

/// `updraftd agents` as a table: one line per agent, newest first seen last.
pub fn render_agents(agents: &[serde_json::Value], now_ms: u64) -> String {
    let mut rows = vec![[
        "AGENT",
        "STATE",
        "SEEN",
        "ADDRESS",
        "VERSION",
        "CERT EXPIRES",
        "POLICY",
        "LOCAL/CLOUD/FALLBACK",
    ]
    .map(String::from)];
    for a in agents {
        let text = |k: &str| a[k].as_str().unwrap_or("-").to_string();
        let ms = |k: &str| a[k].as_u64();
        let state = if ms("revoked_unix_ms").is_some() {
            "revoked"
        } else if a["connections"].as_u64().unwrap_or(0) > 0 {
            "connected"
        } else {
            "offline"
        };
        let seen = ms("last_seen_unix_ms").map_or("-".into(), |t| ago(now_ms, t));
        let expires = ms("cert_not_after_unix_ms").map_or("-".into(), |t| until(now_ms, t));
        let policy = &a["policy"];
        let policy = match (policy["source"].as_str(), policy["hash"].as_str()) {
            (Some("default"), _) => "default".to_string(),
            (Some(source), Some(hash)) => {
                let short: String = hash.chars().take(12).collect();
                let refused = if policy["refused"].is_string() {
                    " (last reload refused)"
                } else {
                    ""
                };
                format!("{source} {short}{refused}")
            }
            _ => "-".into(),
        };
        let m = &a["mix"];
        let n = |k: &str| m[k].as_u64().unwrap_or(0);
        let mix = format!("{}/{}/{}", n("local"), n("cloud"), n("fallback"));
        rows.push([
            text("agent_id"),
            state.into(),
            seen,
            text("address"),
            text("version"),
            expires,
            policy,
            mix,
        ]);
    }
    let widths: Vec<usize> = (0..8)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// "now", "42s ago", "5m ago", "3h ago", "2d ago".
fn ago(now_ms: u64, then_ms: u64) -> String {
    let s = now_ms.saturating_sub(then_ms) / 1000;
    if s < 2 {
        "now".into()
    } else {
        format!("{} ago", span(s))
    }
}

/// "in 89d", or "EXPIRED 2d ago".
fn until(now_ms: u64, at_ms: u64) -> String {
    if at_ms > now_ms {
        format!("in {}", span((at_ms - now_ms) / 1000))
    } else {
        format!("EXPIRED {} ago", span((now_ms - at_ms) / 1000))
    }
}

fn span(s: u64) -> String {
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// `updraftd policy status` as text: the rollout, then one line per board in scope.
pub fn render_push(status: &serde_json::Value) -> String {
    let p = &status["push"];
    if p.is_null() {
        return "no policy was pushed from this daemon\n".into();
    }
    let hash: String = p["hash"].as_str().unwrap_or("").chars().take(12).collect();
    let mut out = format!(
        "push of {} ({hash}): {}",
        p["file"].as_str().unwrap_or("-"),
        p["phase"].as_str().unwrap_or("-")
    );
    if let Some(why) = p["stopped"].as_str() {
        out.push_str(&format!(": {why}"));
    }
    out.push('\n');
    let boards = status["boards"].as_array().cloned().unwrap_or_default();
    let done = boards.iter().filter(|b| b["in_force"] == true).count();
    out.push_str(&format!(
        "{done} of {} boards in scope run it\n",
        boards.len()
    ));
    for b in &boards {
        let state = match (b["result"].as_str(), b["in_force"] == true) {
            (_, true) => "applied".to_string(),
            (Some(r), _) => r.to_string(),
            (None, _) if b["connected"] == true => "pending".into(),
            (None, _) => "offline (gets it when it connects)".into(),
        };
        let canary = if b["canary"] == true { " (canary)" } else { "" };
        let message = b["message"]
            .as_str()
            .map(|m| format!(": {m}"))
            .unwrap_or_default();
        out.push_str(&format!(
            "  {}{canary}  {state}{message}\n",
            b["agent_id"].as_str().unwrap_or("-")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_shows_state_expiry_policy_and_mix() {
        let now = 10_000_000_000;
        let agents = serde_json::json!([
            {"agent_id": "board-1", "connections": 1, "last_seen_unix_ms": now - 500,
             "address": "10.0.0.7:50000", "version": "0.1.0 (commit abc)",
             "cert_not_after_unix_ms": now + 90 * 86_400_000,
             "policy": {"source": "file", "hash": "ab".repeat(32), "refused": "p.toml:1:1: x"},
             "mix": {"local": 3, "cloud": 40, "fallback": 1}},
            {"agent_id": "board-2", "connections": 0, "last_seen_unix_ms": now - 7_200_000,
             "cert_not_after_unix_ms": now - 86_400_000 * 2, "revoked_unix_ms": now,
             "mix": {}},
        ]);
        let t = render_agents(agents.as_array().unwrap(), now);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("AGENT"), "{t}");
        assert!(
            lines[1].contains("board-1") && lines[1].contains("connected"),
            "{t}"
        );
        assert!(
            lines[1].contains("now") && lines[1].contains("in 90d"),
            "{t}"
        );
        assert!(
            lines[1].contains("file abababababab (last reload refused)"),
            "{t}"
        );
        assert!(lines[1].contains("3/40/1"), "{t}");
        assert!(
            lines[2].contains("revoked") && lines[2].contains("2h ago"),
            "{t}"
        );
        assert!(
            lines[2].contains("EXPIRED 2d ago") && lines[2].contains("0/0/0"),
            "{t}"
        );
    }
}
