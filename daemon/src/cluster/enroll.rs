//! Enrollment state shared by the replicas (cluster mode), so a token made on one
//! replica enrolls through any, once. The KV bucket `N-enroll` holds
//!
//! - `token.HASH` → a token's record, as a single daemon keeps it in
//!   `state_dir/tokens/` (HASH is the SHA-256 of the token; the token is never stored).
//!   Redeeming is a compare-and-set on the key's revision: of two replicas spending the
//!   last use at once, one wins and the other is told the token was used.
//! - `id.AGENT` → the certificates issued to AGENT (serials and expiry times). Whether
//!   an id is held, and which certificates a re-enrollment replaces, is read here; the
//!   write of a new certificate is a compare-and-set too, so two unbound tokens cannot
//!   both take one free id through two replicas.
//!
//! Certificates a re-enrollment replaces go on every replica's deny list through the
//! fleet bucket ([`super::fleet`]).

use super::{retry, Retried, StoreError};
use crate::config::DaemonConfig;
use crate::enroll::{token_key, Created, TokenError, TokenInfo, TokenRecord, TokenSpec};
use crate::issued::{IdRecord, IssuedCert, Revocation};
use async_nats::jetstream::kv;
use bytes::Bytes;
use futures_util::TryStreamExt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Compare-and-set rounds before a token or id that keeps changing is given up on.
const CAS_TRIES: usize = 16;
/// Largest value: a token for [`crate::enroll::MAX_TOKEN_USES`] boards lists them all.
const MAX_VALUE: i32 = 1 << 20;
/// How long `updraftd token` waits for NATS.
const CLI_CONNECT: Duration = Duration::from_secs(15);

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How a new certificate joins its id's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Joining {
    /// A renewal: added beside the others.
    Renewal,
    /// An unbound token took an id nobody held: refused if someone took it meanwhile.
    FreeId,
    /// A token bound to the id: the id's certificates are replaced (and denied).
    Replacing,
}

/// The shared enrollment bucket.
#[derive(Debug, Clone)]
pub(crate) struct SharedEnroll {
    bucket: kv::Store,
    name: String,
    /// Where replaced certificates are announced to every replica.
    fleet: kv::Store,
}

impl SharedEnroll {
    pub(super) fn new(bucket: kv::Store, fleet: kv::Store, name: &str) -> Self {
        Self {
            bucket,
            fleet,
            name: format!("{name}-enroll"),
        }
    }

    /// For `updraftd token` in cluster mode: connects to the NATS the config names and
    /// opens the buckets (making them if no replica has yet).
    pub(crate) async fn open(config: &DaemonConfig) -> Result<Self, StoreError> {
        let Some(c) = &config.cluster else {
            return Err(StoreError::new("connect", "no [cluster] table"));
        };
        let servers = c.nats.join(", ");
        let open = async {
            let client = super::connect_client(c, "token").await?;
            let js = async_nats::jetstream::new(client);
            let bucket = bucket(&js, &c.name, c.replicas).await?;
            let fleet = super::fleet::bucket(&js, &c.name, c.replicas).await?;
            Ok::<_, StoreError>(Self::new(bucket, fleet, &c.name))
        };
        tokio::time::timeout(CLI_CONNECT, open).await.map_err(|_| {
            StoreError::new(
                "connect",
                format!("NATS at {servers} did not answer within {CLI_CONNECT:?}; check [cluster] nats in the config and that the servers run"),
            )
        })?
    }

    fn store_err(&self, e: impl std::fmt::Display) -> TokenError {
        TokenError::Store {
            dir: PathBuf::from(format!("NATS bucket {}", self.name)),
            reason: e.to_string(),
        }
    }

    /// The value of `key` and its revision (read from the stream leader, as
    /// [`super::latest`] reads).
    async fn read<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<(T, u64)>, TokenError> {
        let Some((value, revision)) = super::latest(&self.bucket, key, "read enrollment state")
            .await
            .map_err(|e| self.store_err(e))?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&value)
            .map(|v| Some((v, revision)))
            .map_err(|e| self.store_err(format!("{key} does not decode: {e}")))
    }

    /// Writes `value` at `key` if the key is still at `revision` (`None`: absent).
    /// `Ok(false)` when another writer came first.
    async fn write<T: serde::Serialize>(
        &self,
        key: &str,
        value: &T,
        revision: Option<u64>,
    ) -> Result<bool, TokenError> {
        let bytes = Bytes::from(serde_json::to_vec(value).map_err(|e| self.store_err(e))?);
        let done = match revision {
            None => retry("create enrollment state", || {
                self.bucket.create(key, bytes.clone())
            })
            .await
            .map(|_| ()),
            Some(r) => retry("update enrollment state", || {
                self.bucket.update(key, bytes.clone(), r)
            })
            .await
            .map(|_| ()),
        };
        match done {
            Ok(()) => Ok(true),
            Err(Retried::Answer(_)) => Ok(false),
            Err(Retried::Failed(e)) => Err(self.store_err(e)),
        }
    }

    /// Makes a token as `spec` says.
    pub(crate) async fn create(&self, spec: &TokenSpec) -> Result<Created, TokenError> {
        let (created, record) =
            TokenRecord::new(spec, SystemTime::now()).map_err(|e| self.store_err(e))?;
        let key = format!("token.{}", token_key(&created.token)?);
        if !self.write(&key, &record, None).await? {
            return Err(self.store_err("a new token's key exists already; try again"));
        }
        Ok(created)
    }

    /// The keys of every token, after dropping those gone for good.
    async fn token_keys(&self, now: SystemTime) -> Result<Vec<(String, TokenRecord)>, TokenError> {
        let keys: Vec<String> = self
            .bucket
            .keys()
            .await
            .map_err(|e| self.store_err(e))?
            .try_filter(|k| std::future::ready(k.starts_with("token.")))
            .try_collect()
            .await
            .map_err(|e| self.store_err(e))?;
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            let Some((record, revision)) = self.read::<TokenRecord>(&key).await? else {
                continue;
            };
            if record.is_stale(now) {
                // Another replica may be updating it: only this revision goes.
                let _ = self
                    .bucket
                    .purge_expect_revision(&key, Some(revision))
                    .await;
                continue;
            }
            out.push((key, record));
        }
        Ok(out)
    }

    /// Every token: live ones, and used or revoked ones for a week.
    pub(crate) async fn list(&self, now: SystemTime) -> Result<Vec<TokenInfo>, TokenError> {
        let list = self
            .token_keys(now)
            .await?
            .into_iter()
            .map(|(key, r)| r.info(&key["token.".len()..], true, now))
            .collect();
        Ok(crate::enroll::sorted(list))
    }

    /// Withdraws the live token `id` starts (as `list` shows it).
    pub(crate) async fn revoke(&self, id: &str, now: SystemTime) -> Result<String, TokenError> {
        let live = self
            .token_keys(now)
            .await?
            .into_iter()
            .filter(|(_, r)| !r.is_spent())
            .map(|(k, _)| k["token.".len()..].to_string());
        let hash = crate::enroll::pick_token(id, live)?;
        let key = format!("token.{hash}");
        for _ in 0..CAS_TRIES {
            let Some((mut record, revision)) = self.read::<TokenRecord>(&key).await? else {
                break;
            };
            if record.is_spent() {
                break;
            }
            record.withdraw(now);
            if self.write(&key, &record, Some(revision)).await? {
                return Ok(hash[..12].to_string());
            }
        }
        Err(TokenError::NoSuchToken(format!(
            "token `{}` was used or revoked meanwhile",
            &hash[..12]
        )))
    }

    /// Spends `token` for `agent_id` (see [`TokenRecord::spend`]).
    pub(crate) async fn redeem(
        &self,
        token: &str,
        agent_id: &str,
        held: Option<&IssuedCert>,
        now: SystemTime,
    ) -> Result<(), TokenError> {
        let key = format!("token.{}", token_key(token)?);
        for _ in 0..CAS_TRIES {
            let Some((mut record, revision)) = self.read::<TokenRecord>(&key).await? else {
                return Err(TokenError::Unknown);
            };
            if let Err(e) = record.spend(agent_id, held, now) {
                // A write of ours that landed and lost its answer reads back as this
                // very enrollment.
                if record.last_enrolled() == Some((agent_id, unix_ms(now))) {
                    return Ok(());
                }
                return Err(e);
            }
            if self.write(&key, &record, Some(revision)).await? {
                return Ok(());
            }
        }
        Err(self.store_err("the token kept changing while this enrollment spent it; enroll again"))
    }

    /// The newest certificate of `agent_id` still valid at `now`, if any.
    pub(crate) async fn held(
        &self,
        agent_id: &str,
        now: SystemTime,
    ) -> Result<Option<IssuedCert>, TokenError> {
        Ok(self
            .read::<IdRecord>(&format!("id.{agent_id}"))
            .await?
            .and_then(|(r, _)| r.live(unix_ms(now))))
    }

    /// Records `cert`, issued to `agent_id`, as `how` says. `Ok(Ok(replaced))` with the
    /// certificates it replaced (now on every replica's deny list), or `Ok(Err(live))`
    /// when an id thought free was taken meanwhile by `live`.
    pub(crate) async fn issued(
        &self,
        agent_id: &str,
        cert: &IssuedCert,
        how: Joining,
        now: SystemTime,
    ) -> Result<Result<Vec<IssuedCert>, IssuedCert>, TokenError> {
        let key = format!("id.{agent_id}");
        let now_ms = unix_ms(now);
        for _ in 0..CAS_TRIES {
            let (mut record, revision) = match self.read::<IdRecord>(&key).await? {
                Some((r, rev)) => (r, Some(rev)),
                None => (IdRecord::default(), None),
            };
            if record.has(&cert.serial) {
                // A write of ours that landed and lost its answer.
                return Ok(Ok(Vec::new()));
            }
            let replaced = match how {
                Joining::FreeId => {
                    if let Some(live) = record.live(now_ms) {
                        return Ok(Err(live));
                    }
                    record.add(cert.clone(), now_ms);
                    Vec::new()
                }
                Joining::Renewal => {
                    record.add(cert.clone(), now_ms);
                    Vec::new()
                }
                Joining::Replacing => record.replace(cert.clone(), now_ms),
            };
            if self.write(&key, &record, revision).await? {
                for old in &replaced {
                    self.deny_everywhere(agent_id, old).await;
                }
                return Ok(Ok(replaced));
            }
        }
        Err(self.store_err(format!(
            "the certificates of `{agent_id}` kept changing while this one was recorded; enroll again"
        )))
    }

    /// Puts a replaced certificate on every replica's deny list.
    async fn deny_everywhere(&self, agent_id: &str, old: &IssuedCert) {
        let denied = super::fleet::Denied {
            serial: old.serial.clone(),
            agent_id: agent_id.to_string(),
            not_after_ms: old.not_after_ms,
            why: Revocation::Replaced,
        };
        let key = format!("revoked.{}", old.serial);
        let value = Bytes::from(serde_json::to_vec(&denied).expect("deny entries serialize"));
        if let Err(e) = retry("share a replaced certificate", || {
            self.fleet.put(&key, value.clone())
        })
        .await
        {
            tracing::warn!(agent = agent_id, serial = old.serial, error = ?e, "cluster store: a replaced certificate was not shared; other replicas refuse it only once it expires or the agent is revoked");
        }
    }
}

/// Makes the enrollment bucket.
pub(super) async fn bucket(
    js: &async_nats::jetstream::Context,
    name: &str,
    replicas: usize,
) -> Result<kv::Store, StoreError> {
    super::kv_bucket(
        js,
        format!("{name}-enroll"),
        "Updraft enrollment: tokens and the certificates issued per agent id",
        replicas,
        MAX_VALUE,
    )
    .await
}
