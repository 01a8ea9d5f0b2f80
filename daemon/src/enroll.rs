//! Enrollment: one-time tokens, and agent certificates for whoever presents one — or
//! renews a certificate that is still valid, over its live connection.
//!
//! Tokens live in `state_dir/tokens/`, one file per token named by the SHA-256 of the
//! token (the token itself is never stored). Redeeming renames the file into `used/`:
//! a rename succeeds once, so a token enrolls one agent even when two try at the same
//! moment, or two daemons share the directory. `updraftd token create` writes the files
//! while the daemon runs; nothing is cached. In cluster mode tokens and the record of
//! issued certificates live in the shared store instead ([`crate::cluster::enroll`]),
//! with the same rules ([`TokenRecord::spend`], [`crate::issued::IdRecord`]).

use crate::cluster::enroll::{Joining, SharedEnroll};
use crate::issued::{Issued, IssuedCert, Revocation};
use crate::pki;
use rcgen::{Issuer, KeyPair};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tracing::{info, warn};
use updraft_proto::msg::bounded_message;
use updraft_proto::{CertReply, CertRequest, ErrorCode, Frame, FrameKind};
use updraft_shared::tls::AuthenticatedPeer;
use updraft_shared::wire::{write_frame, FrameReader};

/// How long used and expired token records are kept, for the "already used" message.
const KEEP_SPENT: Duration = Duration::from_secs(7 * 24 * 3600);
/// Held by an enrollment from checking whether its agent id is held to recording the
/// certificate it got.
static ENROLLING: std::sync::Mutex<()> = std::sync::Mutex::new(());
/// How long an enrollment connection may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What the token file holds.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct TokenRecord {
    created_ms: u64,
    expires_ms: u64,
    /// The only agent id this token may enroll, when the operator bound it to one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    agent_id: Option<String>,
    /// What every agent id this token enrolls must start with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    agent_id_prefix: Option<String>,
    /// How many boards (distinct agent ids) the token may enroll; 1 when absent.
    #[serde(default = "one_use")]
    uses: u32,
    /// The agent ids it enrolled so far, and when (Unix ms).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    enrolled: Vec<(String, u64)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    used_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    used_ms: Option<u64>,
    /// When `updraftd token revoke` withdrew it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    revoked_ms: Option<u64>,
}

fn one_use() -> u32 {
    1
}

/// Most boards one token may enroll (`--uses`), and most tokens one `token create` makes
/// (`--count`): a bound on what one command writes to the token directory.
pub const MAX_TOKEN_USES: u32 = 10_000;

/// What a new token allows.
#[derive(Debug, Clone)]
pub struct TokenSpec {
    /// How long it works.
    pub ttl: Duration,
    /// The only agent id it may enroll.
    pub agent_id: Option<String>,
    /// What every agent id it enrolls must start with.
    pub agent_id_prefix: Option<String>,
    /// How many boards with distinct ids it may enroll, 1..=[`MAX_TOKEN_USES`].
    pub uses: u32,
}

/// One token as `updraftd token list` shows it (the token itself is never stored: its
/// id is the start of its SHA-256).
#[derive(Debug, Clone, serde::Serialize)]
pub struct TokenInfo {
    /// The first 12 hex digits of the token's SHA-256: what `token revoke` takes.
    pub id: String,
    /// `live`, `used`, `expired` or `revoked`.
    pub state: &'static str,
    /// When it was made, RFC 3339.
    pub created: String,
    /// When it stops (or stopped) working, RFC 3339.
    pub expires: String,
    /// The agent id it is bound to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    /// The prefix every id it enrolls must have.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_id_prefix: Option<String>,
    /// Boards it may enroll.
    pub uses: u32,
    /// Agent ids it enrolled.
    pub enrolled: Vec<String>,
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
    /// The id asked for lacks the token's prefix.
    #[error("the token enrolls only agent ids starting with `{prefix}`, not `{asked}`; set agent_id in agent.toml or use another token")]
    WrongPrefix {
        /// The token's prefix.
        prefix: String,
        /// The id the request asked for.
        asked: String,
    },
    /// A multi-use token already enrolled this id.
    #[error("the token already enrolled agent `{0}`; each board it enrolls needs its own agent id (set agent_id in agent.toml)")]
    SameId(String),
    /// Withdrawn by `updraftd token revoke`.
    #[error("the token was revoked at {at}; ask for a new one (`updraftd token create`)")]
    Revoked {
        /// RFC 3339.
        at: String,
    },
    /// No token, or more than one, has the id given to `token revoke`.
    #[error("{0}")]
    NoSuchToken(String),
    /// Bound to another agent id.
    #[error("the token is for agent `{bound}`, not `{asked}`; set agent_id in agent.toml or create a token for `{asked}`")]
    WrongAgent {
        /// The id the token was created for.
        bound: String,
        /// The id the request asked for.
        asked: String,
    },
    /// The id holds a live certificate and the token is not bound to it.
    #[error("agent id `{agent}` already has a certificate from this CA, valid until {until}; a token not bound to an agent id cannot take it over. To enroll that board again, create a token for it: `updraftd token create --agent-id {agent}` (or enroll under another agent_id)")]
    IdHeld {
        /// The agent id asked for.
        agent: String,
        /// RFC 3339 expiry of its newest certificate.
        until: String,
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

use crate::config::duration_text as lifetime_text;

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

/// The store key of `token` (its SHA-256, hex), or `Unknown` when it cannot be a token.
pub(crate) fn token_key(token: &str) -> Result<String, TokenError> {
    let token = token.trim();
    if token.is_empty() || token.len() > 128 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(TokenError::Unknown);
    }
    Ok(token_hash(token))
}

/// The one live token among `names` (SHA-256 hex strings) that `id` starts, as `updraftd
/// token revoke` takes it: at least 8 hex digits.
pub(crate) fn pick_token(
    id: &str,
    names: impl IntoIterator<Item = String>,
) -> Result<String, TokenError> {
    let id = id.trim().to_ascii_lowercase();
    if id.len() < 8 || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(TokenError::NoSuchToken(format!(
            "`{id}` is not a token id: give the 12 hex digits `updraftd token list` shows"
        )));
    }
    let matches: Vec<String> = names
        .into_iter()
        .filter(|n| n.len() == 64 && n.starts_with(&id))
        .collect();
    match <[String; 1]>::try_from(matches) {
        Ok([one]) => Ok(one),
        Err(m) if m.is_empty() => Err(TokenError::NoSuchToken(format!(
            "no live token has id `{id}` (see `updraftd token list`; used and expired tokens need no revoking)"
        ))),
        Err(_) => Err(TokenError::NoSuchToken(format!(
            "more than one token starts with `{id}`; give more of its id"
        ))),
    }
}

/// Tokens as `token list` shows them: by creation, then id.
pub(crate) fn sorted(mut list: Vec<(u64, TokenInfo)>) -> Vec<TokenInfo> {
    list.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.id.cmp(&b.1.id)));
    list.into_iter().map(|(_, t)| t).collect()
}

impl TokenRecord {
    /// A new token as `spec` says, made at `now`: the token to hand out, and its record.
    pub(crate) fn new(spec: &TokenSpec, now: SystemTime) -> Result<(Created, Self), String> {
        let token = hex::encode(rand::random::<[u8; 20]>());
        let ttl = spec.ttl;
        let expires = now
            .checked_add(ttl)
            .ok_or_else(|| format!("a token lifetime of {ttl:?} is too long"))?;
        let record = TokenRecord {
            created_ms: unix_ms(now),
            expires_ms: unix_ms(expires),
            agent_id: spec.agent_id.clone(),
            agent_id_prefix: spec.agent_id_prefix.clone(),
            uses: spec.uses.clamp(1, MAX_TOKEN_USES),
            enrolled: Vec::new(),
            used_by: None,
            used_ms: None,
            revoked_ms: None,
        };
        Ok((Created { token, expires }, record))
    }

    /// Whether it enrolls nothing more: used up or revoked.
    pub(crate) fn is_spent(&self) -> bool {
        self.used_by.is_some() || self.revoked_ms.is_some()
    }

    /// Whether it is gone for good at `now`: expired, or spent a week ago.
    pub(crate) fn is_stale(&self, now: SystemTime) -> bool {
        let now = unix_ms(now);
        if self.is_spent() {
            let when = self.revoked_ms.or(self.used_ms).unwrap_or(self.expires_ms);
            when.saturating_add(KEEP_SPENT.as_millis() as u64) < now
        } else {
            self.expires_ms <= now
        }
    }

    /// Withdraws it (`updraftd token revoke`).
    pub(crate) fn withdraw(&mut self, now: SystemTime) {
        self.revoked_ms = Some(unix_ms(now));
    }

    /// The last board it enrolled, and when (Unix ms).
    pub(crate) fn last_enrolled(&self) -> Option<(&str, u64)> {
        self.enrolled.last().map(|(id, at)| (id.as_str(), *at))
    }

    /// Why a spent token enrolls nothing more.
    pub(crate) fn spent_error(&self) -> TokenError {
        match self {
            TokenRecord {
                revoked_ms: Some(at),
                ..
            } => TokenError::Revoked { at: rfc3339(*at) },
            TokenRecord {
                used_by: Some(by),
                used_ms: Some(at),
                ..
            } => TokenError::Used {
                by: format!(" by agent `{by}` at {}", rfc3339(*at)),
            },
            _ => TokenError::Used { by: String::new() },
        }
    }

    /// Spends one use for `agent_id` at `now`, checking the token's rules; `held` is
    /// the id's live certificate, if any. `Ok(true)` when that was its last use.
    pub(crate) fn spend(
        &mut self,
        agent_id: &str,
        held: Option<&IssuedCert>,
        now: SystemTime,
    ) -> Result<bool, TokenError> {
        if self.is_spent() {
            return Err(self.spent_error());
        }
        if unix_ms(now) >= self.expires_ms {
            return Err(TokenError::Expired {
                at: rfc3339(self.expires_ms),
            });
        }
        match (&self.agent_id, held) {
            (Some(bound), _) if bound != agent_id => {
                return Err(TokenError::WrongAgent {
                    bound: bound.clone(),
                    asked: agent_id.into(),
                });
            }
            (None, Some(live)) => {
                return Err(TokenError::IdHeld {
                    agent: agent_id.into(),
                    until: rfc3339(live.not_after_ms),
                });
            }
            _ => {}
        }
        if let Some(prefix) = &self.agent_id_prefix {
            if !agent_id.starts_with(prefix.as_str()) {
                return Err(TokenError::WrongPrefix {
                    prefix: prefix.clone(),
                    asked: agent_id.into(),
                });
            }
        }
        if self.enrolled.iter().any(|(id, _)| id == agent_id) {
            return Err(TokenError::SameId(agent_id.into()));
        }
        self.enrolled.push((agent_id.into(), unix_ms(now)));
        if (self.enrolled.len() as u32) < self.uses {
            return Ok(false);
        }
        self.used_by = Some(agent_id.into());
        self.used_ms = Some(unix_ms(now));
        Ok(true)
    }

    /// As `token list` shows it, with its creation time to sort by; `hash` is its key
    /// and `live` says whether it is kept among the live ones.
    pub(crate) fn info(&self, hash: &str, live: bool, now: SystemTime) -> (u64, TokenInfo) {
        let state = if self.revoked_ms.is_some() {
            "revoked"
        } else if !live || self.used_by.is_some() {
            "used"
        } else if unix_ms(now) >= self.expires_ms {
            "expired"
        } else {
            "live"
        };
        (
            self.created_ms,
            TokenInfo {
                id: hash[..12.min(hash.len())].to_string(),
                state,
                created: rfc3339(self.created_ms),
                expires: rfc3339(self.expires_ms),
                agent_id: self.agent_id.clone(),
                agent_id_prefix: self.agent_id_prefix.clone(),
                uses: self.uses,
                enrolled: if self.enrolled.is_empty() {
                    self.used_by.iter().cloned().collect()
                } else {
                    self.enrolled.iter().map(|(id, _)| id.clone()).collect()
                },
            },
        )
    }
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
        self.create_with(&TokenSpec {
            ttl,
            agent_id: agent_id.map(str::to_string),
            agent_id_prefix: None,
            uses: 1,
        })
    }

    /// Makes a token as `spec` says.
    pub fn create_with(&self, spec: &TokenSpec) -> Result<Created, TokenError> {
        self.ensure_dirs()?;
        self.prune(SystemTime::now());
        let (created, record) =
            TokenRecord::new(spec, SystemTime::now()).map_err(|e| self.store_err(e))?;
        let path = self.dir.join(token_hash(&created.token));
        let json = serde_json::to_vec(&record).map_err(|e| self.store_err(e))?;
        updraft_shared::files::write_atomic(&path, &json, 0o600)
            .map_err(|e| self.store_err(format!("cannot write {}: {e}", path.display())))?;
        Ok(created)
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
            Some(record) => record.spent_error(),
            None => TokenError::Unknown,
        })
    }

    /// Spends `token` for `agent_id`. Succeeds once per token, before its expiry. When
    /// `held` (the id's live certificate) is given, only a token bound to the id may.
    pub fn redeem(
        &self,
        token: &str,
        agent_id: &str,
        held: Option<&IssuedCert>,
        now: SystemTime,
    ) -> Result<(), TokenError> {
        let hash = token_key(token)?;
        let live = self.dir.join(&hash);
        let Some(mut record) = self.read(&live)? else {
            return Err(self.used_error(&hash)?);
        };
        let spent = match record.spend(agent_id, held, now) {
            Ok(spent) => spent,
            Err(e @ TokenError::Expired { .. }) => {
                let _ = std::fs::remove_file(&live);
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        self.ensure_dirs()?;
        if !spent {
            // Uses left: the record stays live with this board noted. Enrollments on
            // one daemon are one at a time (ENROLLING), so this read-modify-write is
            // not raced there.
            let json = serde_json::to_vec(&record).map_err(|e| self.store_err(e))?;
            updraft_shared::files::write_atomic(&live, &json, 0o600)
                .map_err(|e| self.store_err(format!("cannot record the enrollment: {e}")))?;
            return Ok(());
        }
        let used = self.dir.join("used").join(&hash);
        match std::fs::rename(&live, &used) {
            Ok(()) => {}
            // Someone redeemed it between our read and our rename.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(self.used_error(&hash)?)
            }
            Err(e) => return Err(self.store_err(format!("cannot spend the token: {e}"))),
        }
        if let Ok(json) = serde_json::to_vec(&record) {
            let _ = updraft_shared::files::write_atomic(&used, &json, 0o600);
        }
        Ok(())
    }

    /// Every token in the directory: live ones, and used, expired or revoked ones kept
    /// for a week. Sorted by creation.
    pub fn list(&self, now: SystemTime) -> Result<Vec<TokenInfo>, TokenError> {
        let mut out = Vec::new();
        for (dir, live) in [(self.dir.clone(), true), (self.dir.join("used"), false)] {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.store_err(format!("cannot read {}: {e}", dir.display()))),
            };
            for e in entries.flatten() {
                let p = e.path();
                let name = e.file_name().to_string_lossy().into_owned();
                if !p.is_file() || name.len() != 64 {
                    continue;
                }
                let Some(r) = self.read(&p)? else { continue };
                out.push(r.info(&name, live, now));
            }
        }
        Ok(sorted(out))
    }

    /// Withdraws the live token whose id (as `list` shows it, or a longer start of its
    /// SHA-256, at least 8 hex digits) is `id`: it enrolls nothing from now on, and an
    /// agent that tries it is told it was revoked.
    pub fn revoke(&self, id: &str, now: SystemTime) -> Result<String, TokenError> {
        let names: Vec<String> = std::fs::read_dir(&self.dir)
            .map_err(|e| self.store_err(format!("cannot read {}: {e}", self.dir.display())))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let hash = pick_token(id, names)?;
        let live = self.dir.join(&hash);
        let Some(mut record) = self.read(&live)? else {
            return Err(TokenError::NoSuchToken(format!(
                "token `{}` was used or revoked meanwhile",
                &hash[..12]
            )));
        };
        self.ensure_dirs()?;
        record.revoked_ms = Some(unix_ms(now));
        let spent = self.dir.join("used").join(&hash);
        let json = serde_json::to_vec(&record).map_err(|e| self.store_err(e))?;
        updraft_shared::files::write_atomic(&spent, &json, 0o600)
            .map_err(|e| self.store_err(format!("cannot write {}: {e}", spent.display())))?;
        std::fs::remove_file(&live)
            .map_err(|e| self.store_err(format!("cannot remove {}: {e}", live.display())))?;
        Ok(hash[..12].to_string())
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

/// The tokens `updraftd token` works on: the state directory's, or in cluster mode the
/// shared store's (so a token made on one replica enrolls through any).
pub struct TokenStore {
    inner: Store,
}

enum Store {
    Local(Tokens),
    Shared(Box<SharedEnroll>, tokio::runtime::Runtime),
}

impl TokenStore {
    /// The store `config` names: with `[cluster]`, this connects to its NATS.
    pub fn open(config: &crate::config::DaemonConfig) -> Result<Self, TokenError> {
        let store_err = |reason: String| TokenError::Store {
            dir: PathBuf::from("the cluster store"),
            reason,
        };
        let inner = match &config.cluster {
            None => Store::Local(Tokens::new(&config.state_dir)),
            Some(_) => {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| store_err(e.to_string()))?;
                let shared = runtime
                    .block_on(SharedEnroll::open(config))
                    .map_err(|e| store_err(e.to_string()))?;
                Store::Shared(Box::new(shared), runtime)
            }
        };
        Ok(Self { inner })
    }

    /// Makes a token as `spec` says.
    pub fn create_with(&self, spec: &TokenSpec) -> Result<Created, TokenError> {
        match &self.inner {
            Store::Local(t) => t.create_with(spec),
            Store::Shared(s, rt) => rt.block_on(s.create(spec)),
        }
    }

    /// Every token, as [`Tokens::list`].
    pub fn list(&self, now: SystemTime) -> Result<Vec<TokenInfo>, TokenError> {
        match &self.inner {
            Store::Local(t) => t.list(now),
            Store::Shared(s, rt) => rt.block_on(s.list(now)),
        }
    }

    /// Withdraws a live token, as [`Tokens::revoke`].
    pub fn revoke(&self, id: &str, now: SystemTime) -> Result<String, TokenError> {
        match &self.inner {
            Store::Local(t) => t.revoke(id, now),
            Store::Shared(s, rt) => rt.block_on(s.revoke(id, now)),
        }
    }
}

/// What the daemon needs to issue agent certificates.
pub(crate) struct Enroller {
    issuer: Result<Issuer<'static, KeyPair>, pki::PkiError>,
    ca_pem: String,
    tokens: Tokens,
    issued: Issued,
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
    pub(crate) fn load(config: &crate::config::DaemonConfig) -> Self {
        let issuer = pki::load_issuer_files(&config.tls_ca, &config.tls_ca_key);
        match &issuer {
            Ok(_) => {
                info!(ca_key = %config.tls_ca_key.display(), lifetime = %lifetime_text(config.cert_lifetime), "enrollment on: agents may join with `updraftd token create` tokens and renew their certificates")
            }
            Err(e) => warn!("enrollment off: {}", cannot_issue(e)),
        }
        Self {
            issuer,
            ca_pem: std::fs::read_to_string(&config.tls_ca).unwrap_or_default(),
            tokens: Tokens::new(&config.state_dir),
            issued: Issued::new(&config.state_dir),
            lifetime: config.cert_lifetime,
        }
    }

    /// Why the certificate with this serial is on the deny list, if it is.
    pub(crate) fn revocation(&self, serial: &str) -> Option<crate::issued::Revocation> {
        self.issued.revocation(serial)
    }

    /// Answers an enrollment request from `remote`: token and CSR in, certificate out.
    pub(crate) fn enroll(
        &self,
        request: &CertRequest,
        remote: SocketAddr,
        now: SystemTime,
    ) -> CertReply {
        self.answer(request, Asker::Enrolling(remote), now)
    }

    /// Answers a renewal from an agent whose certificate the handshake verified: the
    /// new certificate names the same agent, whatever the request says.
    pub(crate) fn renew(
        &self,
        request: &CertRequest,
        peer: &AuthenticatedPeer,
        now: SystemTime,
    ) -> CertReply {
        if let Some(why) = self.revocation(peer.serial()) {
            return CertReply::Rejected {
                code: ErrorCode::BadToken,
                message: revoked_message(why, peer.agent_id()),
            };
        }
        self.answer(request, Asker::Renewing(peer.agent_id()), now)
    }

    /// The checks every certificate request passes first: its form, this daemon's CA
    /// key, the CSR, and the agent id it asks for (a renewal keeps its own).
    fn prepare(
        &self,
        request: &CertRequest,
        asker: Asker<'_>,
    ) -> Result<
        (
            &Issuer<'static, KeyPair>,
            rcgen::CertificateSigningRequestParams,
            String,
        ),
        CertReply,
    > {
        if let Err(e) = request.validate() {
            return Err(reject(ErrorCode::BadRequest, e.to_string()));
        }
        let issuer = match &self.issuer {
            Ok(i) => i,
            Err(e) => return Err(reject(ErrorCode::CannotIssue, cannot_issue(e))),
        };
        let csr = match pki::parse_request(&request.csr) {
            Ok(c) => c,
            Err(e) => return Err(reject(ErrorCode::BadRequest, e.to_string())),
        };
        let agent_id = match asker {
            Asker::Renewing(id) => id.to_string(),
            Asker::Enrolling(_) => match pki::requested_agent_id(&csr) {
                Ok(id) => match updraft_shared::tls::check_agent_id(&id) {
                    Ok(()) => id,
                    Err(e) => return Err(reject(ErrorCode::BadRequest, e.to_string())),
                },
                Err(e) => return Err(reject(ErrorCode::BadRequest, e.to_string())),
            },
        };
        Ok((issuer, csr, agent_id))
    }

    /// The live certificate of `agent_id` in this daemon's records, if any; a record
    /// that cannot be read refuses the enrollment (logged).
    fn held_here(&self, agent_id: &str, now: SystemTime) -> Result<Option<IssuedCert>, CertReply> {
        self.issued.live(agent_id, now).map_err(|e| {
            warn!(agent = agent_id, error = %e, "enrollment refused");
            reject(ErrorCode::Internal, e.to_string())
        })
    }

    fn answer(&self, request: &CertRequest, asker: Asker<'_>, now: SystemTime) -> CertReply {
        let renewing = match asker {
            Asker::Renewing(id) => Some(id),
            Asker::Enrolling(_) => None,
        };
        let (issuer, csr, agent_id) = match self.prepare(request, asker) {
            Ok(p) => p,
            Err(reply) => return reply,
        };
        let mut held = None;
        // Enrollments one at a time from the id check to the record, so two unbound
        // tokens cannot both take the same free id. Nothing in here waits on the
        // network; it holds the lock for a file read, a rename and a signature.
        let _one_enrollment = renewing
            .is_none()
            .then(|| ENROLLING.lock().unwrap_or_else(|e| e.into_inner()));
        if renewing.is_none() {
            let Some(token) = &request.token else {
                return no_token();
            };
            held = match self.held_here(&agent_id, now) {
                Ok(h) => h,
                Err(reply) => return reply,
            };
            if let Err(e) = self.tokens.redeem(token, &agent_id, held.as_ref(), now) {
                return token_refused(&agent_id, e);
            }
        }
        let cert = match pki::sign_request(issuer, csr, &agent_id, self.lifetime) {
            Ok(cert) => cert,
            Err(e) => return reject(ErrorCode::BadRequest, e.to_string()),
        };
        self.note_issued(&agent_id, &cert, asker, held.as_ref(), now);
        CertReply::Issued {
            cert,
            ca: self.ca_pem.clone(),
        }
    }

    /// [`enroll`](Self::enroll), or in cluster mode the same against the shared store
    /// (`shared`): a token made on any replica enrolls through any, once.
    pub(crate) async fn enroll_in(
        &self,
        request: &CertRequest,
        remote: SocketAddr,
        now: SystemTime,
        shared: Option<&SharedEnroll>,
    ) -> CertReply {
        match shared {
            None => self.enroll(request, remote, now),
            Some(s) => {
                self.answer_shared(request, Asker::Enrolling(remote), now, s)
                    .await
            }
        }
    }

    /// [`renew`](Self::renew), recording the certificate in the shared store in
    /// cluster mode.
    pub(crate) async fn renew_in(
        &self,
        request: &CertRequest,
        peer: &AuthenticatedPeer,
        now: SystemTime,
        shared: Option<&SharedEnroll>,
    ) -> CertReply {
        match shared {
            Some(s) if self.revocation(peer.serial()).is_none() => {
                self.answer_shared(request, Asker::Renewing(peer.agent_id()), now, s)
                    .await
            }
            _ => self.renew(request, peer, now),
        }
    }

    /// [`answer`](Self::answer) in cluster mode: whether the id is held, the token and
    /// the record of issued certificates are read and written in the shared store,
    /// each write a compare-and-set. The local records are kept too (the handshake
    /// reads the deny list there).
    async fn answer_shared(
        &self,
        request: &CertRequest,
        asker: Asker<'_>,
        now: SystemTime,
        shared: &SharedEnroll,
    ) -> CertReply {
        let (issuer, csr, agent_id) = match self.prepare(request, asker) {
            Ok(p) => p,
            Err(reply) => return reply,
        };
        let mut held = None;
        let mut joining = Joining::Renewal;
        if let Asker::Enrolling(_) = asker {
            let Some(token) = &request.token else {
                return no_token();
            };
            let here = match self.held_here(&agent_id, now) {
                Ok(h) => h,
                Err(reply) => return reply,
            };
            held = match shared.held(&agent_id, now).await {
                Ok(h) => h.into_iter().chain(here).max_by_key(|c| c.not_after_ms),
                Err(e) => return token_refused(&agent_id, e),
            };
            if let Err(e) = shared.redeem(token, &agent_id, held.as_ref(), now).await {
                return token_refused(&agent_id, e);
            }
            joining = match held {
                Some(_) => Joining::Replacing,
                None => Joining::FreeId,
            };
        }
        let cert = match pki::sign_request(issuer, csr, &agent_id, self.lifetime) {
            Ok(cert) => cert,
            Err(e) => return reject(ErrorCode::BadRequest, e.to_string()),
        };
        let new = match IssuedCert::of_pem(&cert, now) {
            Ok(c) => c,
            Err(e) => return reject(ErrorCode::Internal, e.to_string()),
        };
        match shared.issued(&agent_id, &new, joining, now).await {
            Ok(Ok(replaced)) => {
                for old in &replaced {
                    if let Err(e) = self.issued.deny(
                        &agent_id,
                        &old.serial,
                        old.not_after_ms,
                        Revocation::Replaced,
                    ) {
                        warn!(agent = agent_id, serial = old.serial, error = %e, "cannot write a deny-list entry");
                    }
                }
            }
            Ok(Err(live)) => {
                return token_refused(
                    &agent_id,
                    TokenError::IdHeld {
                        agent: agent_id.clone(),
                        until: rfc3339(live.not_after_ms),
                    },
                )
            }
            Err(e) => return token_refused(&agent_id, e),
        }
        self.note_issued(&agent_id, &cert, asker, held.as_ref(), now);
        CertReply::Issued {
            cert,
            ca: self.ca_pem.clone(),
        }
    }

    /// Records the certificate just issued and logs it; a re-enrollment of a held id
    /// revokes the id's previous certificates and says who replaced whom.
    fn note_issued(
        &self,
        agent_id: &str,
        cert: &str,
        asker: Asker<'_>,
        held: Option<&IssuedCert>,
        now: SystemTime,
    ) {
        let valid_for = lifetime_text(self.lifetime);
        let new = match IssuedCert::of_pem(cert, now) {
            Ok(c) => c,
            Err(e) => {
                warn!(agent = agent_id, error = %e, "cannot record the certificate just issued");
                return;
            }
        };
        let serial = new.serial.clone();
        let stored = match (asker, held) {
            (Asker::Enrolling(remote), Some(old)) => {
                self.issued.replace(agent_id, new, now).map(|revoked| {
                    let serials: Vec<&str> = revoked.iter().map(|c| c.serial.as_str()).collect();
                    warn!(
                        agent = agent_id,
                        %remote,
                        serial,
                        revoked = serials.join(","),
                        "agent `{agent_id}` enrolled again with a token bound to it, from {remote}: the new certificate (serial {serial}, valid {valid_for}) replaces the one valid until {}; the replaced certificates are revoked and refused at the handshake",
                        rfc3339(old.not_after_ms)
                    );
                })
            }
            (Asker::Enrolling(remote), None) => self.issued.record(agent_id, new, now).map(|()| {
                info!(agent = agent_id, %remote, serial, valid_for, "enrolled an agent");
            }),
            (Asker::Renewing(_), _) => self.issued.record(agent_id, new, now).map(|()| {
                info!(agent = agent_id, serial, valid_for, "renewed an agent certificate");
            }),
        };
        if let Err(e) = stored {
            warn!(agent = agent_id, error = %e, "issued a certificate but could not record it: an unbound token could take this agent id over while the certificate is valid");
        }
    }
}

/// A refusal, its message bounded for the wire.
fn reject(code: ErrorCode, message: String) -> CertReply {
    CertReply::Rejected {
        code,
        message: bounded_message(message),
    }
}

/// An enrollment request that came without a token.
fn no_token() -> CertReply {
    reject(
        ErrorCode::BadToken,
        "enrollment needs a token: create one with `updraftd token create`".into(),
    )
}

/// An enrollment its token refused (`bad_token`), or that the token store failed
/// (`internal`); logged.
fn token_refused(agent_id: &str, e: TokenError) -> CertReply {
    let code = match e {
        TokenError::Store { .. } => ErrorCode::Internal,
        _ => ErrorCode::BadToken,
    };
    warn!(agent = agent_id, error = %e, "enrollment refused");
    reject(code, e.to_string())
}

/// What an agent whose certificate is on the deny list is told, at the handshake and
/// at renewal.
pub(crate) fn revoked_message(why: crate::issued::Revocation, agent_id: &str) -> String {
    let how = match why {
        crate::issued::Revocation::Replaced => "was revoked when the agent id was enrolled again",
        crate::issued::Revocation::Operator => {
            "was revoked by the operator (`updraftd agent revoke`)"
        }
    };
    format!("this certificate for `{agent_id}` {how}; enroll with a token for it (`updraftd token create --agent-id {agent_id}`)")
}

/// Records in the fleet registry a certificate `reply` carries.
fn note_in_fleet(fleet: &crate::fleet::Registry, reply: &CertReply, from: Option<SocketAddr>) {
    let CertReply::Issued { cert, .. } = reply else {
        return;
    };
    let Ok(issued) = IssuedCert::of_pem(cert, SystemTime::now()) else {
        return;
    };
    use rustls::pki_types::pem::PemObject;
    let Ok(der) = rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes()) else {
        return;
    };
    if let Ok(agent) = updraft_shared::tls::agent_id_of(&der) {
        fleet.issued(
            &agent,
            &issued.serial,
            issued.not_after_ms,
            from.map(|a| a.to_string()),
        );
    }
}

/// Why this daemon refuses every certificate request: its CA key did not load.
fn cannot_issue(e: &pki::PkiError) -> String {
    format!("this daemon cannot issue agent certificates ({e}); give it the CA key with [tls] ca_key in daemon.toml")
}

/// Who asks for a certificate.
#[derive(Debug, Clone, Copy)]
enum Asker<'a> {
    /// A new agent (or one enrolling again) over an enrollment connection.
    Enrolling(SocketAddr),
    /// A connected agent, renewing the certificate the handshake verified.
    Renewing(&'a str),
}

/// Reads one certificate request off `recv` and answers it on `send`.
pub(crate) async fn serve_request(
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    answer: impl AsyncFnOnce(&CertRequest) -> CertReply,
) {
    let mut reader = FrameReader::new(recv);
    let reply = match tokio::time::timeout(REQUEST_TIMEOUT, reader.next()).await {
        Ok(Ok(Some(frame))) if frame.kind == FrameKind::CertRequest => {
            match CertRequest::from_frame(&frame) {
                Ok(request) => answer(&request).await,
                Err(e) => reject(ErrorCode::BadRequest, e.to_string()),
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
        Ok(Err(e)) => reject(ErrorCode::BadRequest, e.to_string()),
        Err(_) => CertReply::Rejected {
            code: ErrorCode::BadRequest,
            message: format!("no certificate request within {REQUEST_TIMEOUT:?}"),
        },
    };
    let (recv, _) = reader.into_parts();
    send_reply(&mut send, recv, &reply).await;
}

/// Answers a renewal: a stream of a connected agent whose first frame, `frame`, is a
/// certificate request.
pub(crate) async fn serve_renewal(
    mut send: quinn::SendStream,
    reader: FrameReader<quinn::RecvStream>,
    frame: &Frame,
    peer: &AuthenticatedPeer,
    enroller: &Enroller,
    shared: &crate::state::Shared,
) {
    let (recv, _) = reader.into_parts();
    let fleet = &shared.fleet;
    let store = shared.cluster.as_ref().map(|c| &c.enroll);
    let reply = match CertRequest::from_frame(frame) {
        Ok(r) => enroller.renew_in(&r, peer, SystemTime::now(), store).await,
        Err(e) => reject(ErrorCode::BadRequest, e.to_string()),
    };
    note_in_fleet(fleet, &reply, None);
    send_reply(&mut send, recv, &reply).await;
}

/// Sends `reply` and ends the stream: nothing more is read from `recv`.
pub(crate) async fn send_reply(
    send: &mut quinn::SendStream,
    mut recv: quinn::RecvStream,
    reply: &CertReply,
) {
    let _ = recv.stop(updraft_proto::STOP_INPUT.into());
    let _ = write_frame(send, &reply.to_frame()).await;
    let _ = send.finish();
}

/// Serves an enrollment connection: one request, answered; then the agent closes.
pub(crate) async fn serve_connection(
    conn: quinn::Connection,
    enroller: std::sync::Arc<Enroller>,
    shared: &crate::state::Shared,
) {
    let fleet = &shared.fleet;
    let store = shared.cluster.as_ref().map(|c| &c.enroll);
    let remote = conn.remote_address();
    info!(%remote, "enrollment connection");
    match tokio::time::timeout(REQUEST_TIMEOUT, conn.accept_bi()).await {
        Ok(Ok((send, recv))) => {
            serve_request(send, recv, async |r| {
                let reply = enroller
                    .enroll_in(r, remote, SystemTime::now(), store)
                    .await;
                note_in_fleet(fleet, &reply, Some(remote));
                reply
            })
            .await;
        }
        _ => {
            conn.close(
                updraft_proto::CLOSE_PROTOCOL.into(),
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
        conn.close(updraft_proto::CLOSE_OK.into(), b"enrollment answered");
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
        tokens.redeem(&t.token, "board-1", None, now).unwrap();
        let again = tokens.redeem(&t.token, "board-2", None, now).unwrap_err();
        assert!(matches!(again, TokenError::Used { .. }), "{again}");
        assert!(again.to_string().contains("board-1"), "{again}");

        let short = tokens.create(Duration::from_secs(1), None).unwrap();
        let late = now + Duration::from_secs(5);
        let e = tokens
            .redeem(&short.token, "board-3", None, late)
            .unwrap_err();
        assert!(matches!(e, TokenError::Expired { .. }), "{e}");

        assert!(matches!(
            tokens.redeem("00ff", "board-4", None, now).unwrap_err(),
            TokenError::Unknown
        ));
        assert!(matches!(
            tokens.redeem("not hex!", "board-4", None, now).unwrap_err(),
            TokenError::Unknown
        ));

        let bound = tokens
            .create(Duration::from_secs(60), Some("board-9"))
            .unwrap();
        let e = tokens
            .redeem(&bound.token, "board-8", None, now)
            .unwrap_err();
        assert!(matches!(e, TokenError::WrongAgent { .. }), "{e}");
        // A refusal for the wrong agent does not spend the token.
        let live = IssuedCert {
            serial: "01".into(),
            not_after_ms: unix_ms(now) + 60_000,
            issued_ms: 0,
        };
        // An unbound token may not take a held id, and is not spent by trying.
        let free = tokens.create(Duration::from_secs(60), None).unwrap();
        let e = tokens
            .redeem(&free.token, "board-9", Some(&live), now)
            .unwrap_err();
        assert!(matches!(e, TokenError::IdHeld { .. }), "{e}");
        assert!(e.to_string().contains("--agent-id board-9"), "{e}");
        tokens.redeem(&free.token, "board-10", None, now).unwrap();
        // A token bound to the held id may.
        tokens
            .redeem(&bound.token, "board-9", Some(&live), now)
            .unwrap();
    }

    #[test]
    fn a_bulk_token_enrolls_distinct_boards_within_its_prefix_and_uses() {
        let d = tempfile::tempdir().unwrap();
        let tokens = Tokens::new(d.path());
        let now = SystemTime::now();
        let spec = TokenSpec {
            ttl: Duration::from_secs(3600),
            agent_id: None,
            agent_id_prefix: Some("farm-".into()),
            uses: 2,
        };
        let t = tokens.create_with(&spec).unwrap().token;
        let e = tokens.redeem(&t, "barn-1", None, now).unwrap_err();
        assert!(matches!(e, TokenError::WrongPrefix { .. }), "{e}");
        assert!(e.to_string().contains("starting with `farm-`"), "{e}");
        tokens.redeem(&t, "farm-1", None, now).unwrap();
        let e = tokens.redeem(&t, "farm-1", None, now).unwrap_err();
        assert!(matches!(e, TokenError::SameId(_)), "{e}");
        let listed = tokens.list(now).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].state, listed[0].uses), ("live", 2));
        assert_eq!(listed[0].enrolled, ["farm-1"]);
        tokens.redeem(&t, "farm-2", None, now).unwrap();
        // Both uses spent: the token is used up, and says by whom.
        let e = tokens.redeem(&t, "farm-3", None, now).unwrap_err();
        assert!(matches!(e, TokenError::Used { .. }), "{e}");
        let listed = tokens.list(now).unwrap();
        assert_eq!(listed[0].state, "used");
        assert_eq!(listed[0].enrolled, ["farm-1", "farm-2"]);
    }

    #[test]
    fn a_revoked_token_enrolls_nothing_and_says_so() {
        let d = tempfile::tempdir().unwrap();
        let tokens = Tokens::new(d.path());
        let now = SystemTime::now();
        let t = tokens
            .create(Duration::from_secs(3600), None)
            .unwrap()
            .token;
        let id = tokens.list(now).unwrap()[0].id.clone();
        assert_eq!(id.len(), 12);
        let e = tokens.revoke("12", now).unwrap_err();
        assert!(e.to_string().contains("not a token id"), "{e}");
        let e = tokens.revoke("0123456789ab", now).unwrap_err();
        assert!(e.to_string().contains("no live token"), "{e}");
        assert_eq!(tokens.revoke(&id, now).unwrap(), id);
        let e = tokens.redeem(&t, "board-1", None, now).unwrap_err();
        assert!(matches!(e, TokenError::Revoked { .. }), "{e}");
        assert_eq!(tokens.list(now).unwrap()[0].state, "revoked");
    }

    fn csr(agent_id: &str) -> String {
        let key = KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, agent_id);
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    /// The config of a daemon in `dir` with a fresh CA whose key signs enrollments.
    fn enrolling_daemon(dir: &Path) -> crate::config::DaemonConfig {
        pki::ca_init(&dir.join("pki"), &["localhost".into()]).unwrap();
        let path = dir.join("daemon.toml");
        let file = updraft_shared::config::from_str(
            "state_dir = \"state\"\n[tls]\nca = \"pki/ca.pem\"\n",
            &path,
            "UPDRAFTD_TEST_NONE",
        )
        .unwrap();
        crate::config::DaemonConfig::from_file(file, &path).unwrap()
    }

    #[test]
    fn an_operator_revoked_certificate_is_not_renewed() {
        let d = tempfile::tempdir().unwrap();
        let config = enrolling_daemon(d.path());
        let enroller = Enroller::load(&config);
        let now = SystemTime::now();
        let token = Tokens::new(&config.state_dir)
            .create(Duration::from_secs(60), None)
            .unwrap()
            .token;
        let request = |token| CertRequest {
            token,
            csr: csr("board-1"),
        };
        let remote: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let CertReply::Issued { cert, .. } = enroller.enroll(&request(Some(token)), remote, now)
        else {
            panic!("not enrolled");
        };
        use rustls::pki_types::pem::PemObject;
        let der = rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
        let peer = AuthenticatedPeer::of_verified_cert(&der).unwrap();
        // Renewed while in good standing...
        assert!(matches!(
            enroller.renew(&request(None), &peer, now),
            CertReply::Issued { .. }
        ));
        // ...and refused, saying why, once the operator revoked the agent.
        Issued::new(&config.state_dir)
            .revoke("board-1", &[], now)
            .unwrap();
        match enroller.renew(&request(None), &peer, now) {
            CertReply::Rejected { code, message } => {
                assert_eq!(code, ErrorCode::BadToken);
                assert!(message.contains("revoked by the operator"), "{message}");
                assert!(message.contains("--agent-id board-1"), "{message}");
            }
            r => panic!("renewed a revoked certificate: {r:?}"),
        }
    }

    #[test]
    fn racing_unbound_tokens_give_a_free_id_to_one_agent() {
        let d = tempfile::tempdir().unwrap();
        let config = enrolling_daemon(d.path());
        let enroller = std::sync::Arc::new(Enroller::load(&config));
        let tokens = Tokens::new(&config.state_dir);
        let remote: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let token = tokens.create(Duration::from_secs(60), None).unwrap().token;
                let enroller = enroller.clone();
                std::thread::spawn(move || {
                    let request = CertRequest {
                        token: Some(token),
                        csr: csr("board-1"),
                    };
                    enroller.enroll(&request, remote, SystemTime::now())
                })
            })
            .collect();
        let replies: Vec<CertReply> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let issued = replies
            .iter()
            .filter(|r| matches!(r, CertReply::Issued { .. }))
            .count();
        assert_eq!(issued, 1, "{replies:?}");
        for r in &replies {
            if let CertReply::Rejected { code, message } = r {
                assert_eq!(*code, ErrorCode::BadToken);
                assert!(message.contains("already has a certificate"), "{message}");
            }
        }
    }
}
