//! Enrollment: one-time tokens, and agent certificates for whoever presents one — or
//! renews a certificate that is still valid, over its live connection.
//!
//! Tokens live in `state_dir/tokens/`, one file per token named by the SHA-256 of the
//! token (the token itself is never stored). Redeeming renames the file into `used/`:
//! a rename succeeds once, so a token enrolls one agent even when two try at the same
//! moment, or two daemons share the directory. `updraftd token create` writes the files
//! while the daemon runs; nothing is cached.

use crate::pki;
use rcgen::{Issuer, KeyPair};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tracing::{info, warn};
use updraft_shared::protocol::msg::bounded_message;
use updraft_shared::protocol::{CertReply, CertRequest, ErrorCode, FrameKind};
use updraft_shared::wire::{write_frame, FrameReader};

/// How long used and expired token records are kept, for the "already used" message.
const KEEP_SPENT: Duration = Duration::from_secs(7 * 24 * 3600);
/// Shortest token lifetime `token create` accepts.
pub const MIN_TTL: Duration = Duration::from_secs(1);
/// How long an enrollment connection may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What the token file holds.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct TokenRecord {
    created_ms: u64,
    expires_ms: u64,
    /// The only agent id this token may enroll, when the operator bound it to one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    agent_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    used_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    used_ms: Option<u64>,
}

/// Why a token was refused. Each message says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Not a token this daemon (or its token directory) ever issued.
    #[error("the token is not one this daemon issued (check it was copied whole, or create one with `updraftd token create`)")]
    Unknown,
    /// Redeemed before.
    #[error("the token was already used{by}; a token enrolls one agent: create a new one with `updraftd token create`")]
    Used {
        /// " by agent X at T", when known.
        by: String,
    },
    /// Past its expiry.
    #[error("the token expired at {at}; create a new one with `updraftd token create` (use --ttl for longer than 1h)")]
    Expired {
        /// RFC 3339 expiry.
        at: String,
    },
    /// Bound to another agent id.
    #[error("the token is for agent `{bound}`, not `{asked}`; set agent_id in agent.toml or create a token for `{asked}`")]
    WrongAgent {
        /// The id the token was created for.
        bound: String,
        /// The id the request asked for.
        asked: String,
    },
    /// The token directory could not be read or written.
    #[error("token store {dir}: {reason}")]
    Store {
        /// The directory.
        dir: PathBuf,
        /// What failed.
        reason: String,
    },
}

/// A token just made.
#[derive(Debug)]
pub struct Created {
    /// The token to hand to `updraft-agent enroll --token`.
    pub token: String,
    /// When it stops working.
    pub expires: SystemTime,
}

/// The token directory of one state directory.
#[derive(Debug, Clone)]
pub struct Tokens {
    dir: PathBuf,
}

/// A lifetime as operators write it: `90d` rather than humantime's months.
fn lifetime_text(d: Duration) -> String {
    match d.as_secs() {
        s if s >= 86400 && s % 86400 == 0 => format!("{}d", s / 86400),
        _ => humantime::format_duration(d).to_string(),
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_seconds(from_ms(ms)).to_string()
}

/// File name of a token: SHA-256 of its text, hex.
fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.trim().as_bytes()))
}

impl Tokens {
    /// The tokens of `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("tokens"),
        }
    }

    fn store_err(&self, e: impl std::fmt::Display) -> TokenError {
        TokenError::Store {
            dir: self.dir.clone(),
            reason: e.to_string(),
        }
    }

    fn ensure_dirs(&self) -> Result<(), TokenError> {
        use std::os::unix::fs::DirBuilderExt;
        for d in [self.dir.clone(), self.dir.join("used")] {
            if !d.is_dir() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&d)
                    .map_err(|e| self.store_err(e))?;
                updraft_shared::files::own_like_directory(&d);
            }
        }
        Ok(())
    }

    /// Makes a one-time token valid for `ttl`, optionally only for `agent_id`.
    pub fn create(&self, ttl: Duration, agent_id: Option<&str>) -> Result<Created, TokenError> {
        self.ensure_dirs()?;
        self.prune(SystemTime::now());
        let token = hex::encode(rand::random::<[u8; 20]>());
        let now = SystemTime::now();
        let expires = now + ttl;
        let record = TokenRecord {
            created_ms: unix_ms(now),
            expires_ms: unix_ms(expires),
            agent_id: agent_id.map(str::to_string),
            used_by: None,
            used_ms: None,
        };
        let path = self.dir.join(token_hash(&token));
        let json = serde_json::to_vec(&record).map_err(|e| self.store_err(e))?;
        updraft_shared::files::write_atomic(&path, &json, 0o600)
            .map_err(|e| self.store_err(format!("cannot write {}: {e}", path.display())))?;
        Ok(Created { token, expires })
    }

    fn read(&self, path: &Path) -> Result<Option<TokenRecord>, TokenError> {
        match std::fs::read(path) {
            Ok(data) => serde_json::from_slice(&data)
                .map(Some)
                .map_err(|e| self.store_err(format!("{} is damaged: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.store_err(format!("cannot read {}: {e}", path.display()))),
        }
    }

    fn used_error(&self, hash: &str) -> Result<TokenError, TokenError> {
        Ok(match self.read(&self.dir.join("used").join(hash))? {
            Some(TokenRecord {
                used_by: Some(by),
                used_ms: Some(at),
                ..
            }) => TokenError::Used {
                by: format!(" by agent `{by}` at {}", rfc3339(at)),
            },
            Some(_) => TokenError::Used { by: String::new() },
            None => TokenError::Unknown,
        })
    }

    /// Spends `token` for `agent_id`. Succeeds once per token, before its expiry.
    pub fn redeem(&self, token: &str, agent_id: &str, now: SystemTime) -> Result<(), TokenError> {
        let token = token.trim();
        if token.is_empty() || token.len() > 128 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TokenError::Unknown);
        }
        let hash = token_hash(token);
        let live = self.dir.join(&hash);
        let Some(mut record) = self.read(&live)? else {
            return Err(self.used_error(&hash)?);
        };
        if unix_ms(now) >= record.expires_ms {
            let _ = std::fs::remove_file(&live);
            return Err(TokenError::Expired {
                at: rfc3339(record.expires_ms),
            });
        }
        if let Some(bound) = &record.agent_id {
            if bound != agent_id {
                return Err(TokenError::WrongAgent {
                    bound: bound.clone(),
                    asked: agent_id.into(),
                });
            }
        }
        self.ensure_dirs()?;
        let spent = self.dir.join("used").join(&hash);
        match std::fs::rename(&live, &spent) {
            Ok(()) => {}
            // Someone redeemed it between our read and our rename.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(self.used_error(&hash)?)
            }
            Err(e) => return Err(self.store_err(format!("cannot spend the token: {e}"))),
        }
        record.used_by = Some(agent_id.into());
        record.used_ms = Some(unix_ms(now));
        if let Ok(json) = serde_json::to_vec(&record) {
            let _ = updraft_shared::files::write_atomic(&spent, &json, 0o600);
        }
        Ok(())
    }

    /// Removes expired tokens and spent records older than a week.
    fn prune(&self, now: SystemTime) {
        let cutoff = unix_ms(now).saturating_sub(KEEP_SPENT.as_millis() as u64);
        for (dir, live) in [(self.dir.clone(), true), (self.dir.join("used"), false)] {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                if !p.is_file() {
                    continue;
                }
                let Ok(Some(r)) = self.read(&p) else { continue };
                let when = if live {
                    r.expires_ms
                } else {
                    r.used_ms.unwrap_or(r.expires_ms)
                };
                if (live && when <= unix_ms(now)) || when < cutoff {
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
    }
}

/// What the daemon needs to issue agent certificates.
pub struct Enroller {
    issuer: Result<Issuer<'static, KeyPair>, String>,
    ca_pem: String,
    tokens: Tokens,
    lifetime: Duration,
}

impl std::fmt::Debug for Enroller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enroller")
            .field("enabled", &self.issuer.is_ok())
            .field("tokens", &self.tokens)
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

impl Enroller {
    /// Loads the CA key named by the config. A missing or unreadable key does not stop
    /// the daemon: agents with certificates are served, enrollment and renewal are
    /// refused with the reason.
    pub fn load(config: &crate::config::DaemonConfig) -> Self {
        let issuer = pki::load_issuer_files(&config.tls_ca, &config.tls_ca_key).map_err(|e| {
            format!(
                "this daemon cannot issue agent certificates ({e:#}); give it the CA key with [tls] ca_key in daemon.toml"
            )
        });
        match &issuer {
            Ok(_) => {
                info!(ca_key = %config.tls_ca_key.display(), lifetime = %lifetime_text(config.cert_lifetime), "enrollment on: agents may join with `updraftd token create` tokens and renew their certificates")
            }
            Err(e) => warn!("enrollment off: {e}"),
        }
        Self {
            issuer,
            ca_pem: std::fs::read_to_string(&config.tls_ca).unwrap_or_default(),
            tokens: Tokens::new(&config.state_dir),
            lifetime: config.cert_lifetime,
        }
    }

    /// Answers an enrollment request: token and CSR in, certificate out.
    pub fn enroll(&self, request: &CertRequest, now: SystemTime) -> CertReply {
        self.answer(request, None, now)
    }

    /// Answers a renewal from an agent whose certificate the handshake verified: the
    /// new certificate names the same agent, whatever the request says.
    pub fn renew(&self, request: &CertRequest, agent_id: &str, now: SystemTime) -> CertReply {
        self.answer(request, Some(agent_id), now)
    }

    fn answer(&self, request: &CertRequest, renewing: Option<&str>, now: SystemTime) -> CertReply {
        let reject = |code, message: String| CertReply::Rejected {
            code,
            message: bounded_message(message),
        };
        if let Err(e) = request.validate() {
            return reject(ErrorCode::BadRequest, e);
        }
        let issuer = match &self.issuer {
            Ok(i) => i,
            Err(e) => return reject(ErrorCode::CannotIssue, e.clone()),
        };
        let csr = match pki::parse_request(&request.csr) {
            Ok(c) => c,
            Err(e) => return reject(ErrorCode::BadRequest, format!("{e:#}")),
        };
        let agent_id = match renewing {
            Some(id) => id.to_string(),
            None => match pki::requested_agent_id(&csr) {
                Ok(id) => match updraft_shared::tls::check_agent_id(&id) {
                    Ok(()) => id,
                    Err(e) => return reject(ErrorCode::BadRequest, e),
                },
                Err(e) => return reject(ErrorCode::BadRequest, format!("{e:#}")),
            },
        };
        if renewing.is_none() {
            let Some(token) = &request.token else {
                return reject(
                    ErrorCode::BadToken,
                    "enrollment needs a token: create one with `updraftd token create`".into(),
                );
            };
            if let Err(e) = self.tokens.redeem(token, &agent_id, now) {
                let code = match e {
                    TokenError::Store { .. } => ErrorCode::Internal,
                    _ => ErrorCode::BadToken,
                };
                warn!(agent = agent_id, error = %e, "enrollment refused");
                return reject(code, e.to_string());
            }
        }
        match pki::sign_request(issuer, csr, &agent_id, self.lifetime) {
            Ok(cert) => {
                info!(
                    agent = agent_id,
                    valid_for = %lifetime_text(self.lifetime),
                    "{}",
                    if renewing.is_some() { "renewed an agent certificate" } else { "enrolled an agent" }
                );
                CertReply::Issued {
                    cert,
                    ca: self.ca_pem.clone(),
                }
            }
            Err(e) => reject(ErrorCode::BadRequest, format!("{e:#}")),
        }
    }
}

/// Reads one certificate request off `recv` and answers it on `send`.
pub async fn serve_request(
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    answer: impl FnOnce(&CertRequest) -> CertReply,
) {
    let mut reader = FrameReader::new(recv);
    let reply = match tokio::time::timeout(REQUEST_TIMEOUT, reader.next()).await {
        Ok(Ok(Some(frame))) if frame.kind == FrameKind::CertRequest => {
            match CertRequest::from_frame(&frame) {
                Ok(request) => answer(&request),
                Err(e) => CertReply::Rejected {
                    code: ErrorCode::BadRequest,
                    message: bounded_message(e.to_string()),
                },
            }
        }
        Ok(Ok(Some(frame))) => CertReply::Rejected {
            code: ErrorCode::BadRequest,
            message: format!(
                "expected a certificate request, got a {:?} frame",
                frame.kind
            ),
        },
        Ok(Ok(None)) => return,
        Ok(Err(e)) => CertReply::Rejected {
            code: ErrorCode::BadRequest,
            message: bounded_message(e.to_string()),
        },
        Err(_) => CertReply::Rejected {
            code: ErrorCode::BadRequest,
            message: format!("no certificate request within {REQUEST_TIMEOUT:?}"),
        },
    };
    let (recv, _) = reader.into_parts();
    send_reply(&mut send, recv, &reply).await;
}

/// Sends `reply` and ends the stream: nothing more is read from `recv`.
pub async fn send_reply(
    send: &mut quinn::SendStream,
    mut recv: quinn::RecvStream,
    reply: &CertReply,
) {
    let _ = recv.stop(updraft_shared::protocol::STOP_INPUT.into());
    let _ = write_frame(send, &reply.to_frame()).await;
    let _ = send.finish();
}

/// Serves an enrollment connection: one request, answered; then the agent closes.
pub async fn serve_connection(conn: quinn::Connection, enroller: std::sync::Arc<Enroller>) {
    let remote = conn.remote_address();
    info!(%remote, "enrollment connection");
    match tokio::time::timeout(REQUEST_TIMEOUT, conn.accept_bi()).await {
        Ok(Ok((send, recv))) => {
            serve_request(send, recv, |r| enroller.enroll(r, SystemTime::now())).await;
        }
        _ => {
            conn.close(
                updraft_shared::protocol::CLOSE_PROTOCOL.into(),
                b"no enrollment request",
            );
            return;
        }
    }
    // The agent closes once it has the reply; closing first could cut it off. One
    // that lingers is closed with CLOSE_OK: its request was answered.
    if tokio::time::timeout(REQUEST_TIMEOUT, conn.closed())
        .await
        .is_err()
    {
        conn.close(
            updraft_shared::protocol::CLOSE_OK.into(),
            b"enrollment answered",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_enrolls_once_before_it_expires() {
        let d = tempfile::tempdir().unwrap();
        let tokens = Tokens::new(d.path());
        let now = SystemTime::now();
        let t = tokens.create(Duration::from_secs(3600), None).unwrap();
        assert_eq!(t.token.len(), 40);
        // Only the hash is on disk.
        let names: Vec<_> = std::fs::read_dir(d.path().join("tokens"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().into_string().unwrap())
            .collect();
        assert!(!names.iter().any(|n| n.contains(&t.token)), "{names:?}");
        tokens.redeem(&t.token, "board-1", now).unwrap();
        let again = tokens.redeem(&t.token, "board-2", now).unwrap_err();
        assert!(matches!(again, TokenError::Used { .. }), "{again}");
        assert!(again.to_string().contains("board-1"), "{again}");

        let short = tokens.create(Duration::from_secs(1), None).unwrap();
        let late = now + Duration::from_secs(5);
        let e = tokens.redeem(&short.token, "board-3", late).unwrap_err();
        assert!(matches!(e, TokenError::Expired { .. }), "{e}");

        assert!(matches!(
            tokens.redeem("00ff", "board-4", now).unwrap_err(),
            TokenError::Unknown
        ));
        assert!(matches!(
            tokens.redeem("not hex!", "board-4", now).unwrap_err(),
            TokenError::Unknown
        ));

        let bound = tokens
            .create(Duration::from_secs(60), Some("board-9"))
            .unwrap();
        let e = tokens.redeem(&bound.token, "board-8", now).unwrap_err();
        assert!(matches!(e, TokenError::WrongAgent { .. }), "{e}");
        // A refusal for the wrong agent does not spend the token.
        tokens.redeem(&bound.token, "board-9", now).unwrap();
    }
}
