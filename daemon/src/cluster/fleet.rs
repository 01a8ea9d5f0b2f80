//! Fleet state shared by the replicas (cluster mode): every replica shows the same
//! fleet and refuses the same revoked certificates. The KV bucket `N-fleet` holds
//!
//! - `agent.ID` → the agent's record as the registry keeps it ([`AgentRecord`]), put
//!   by the replica that last changed it (a connection, a report, an enrollment);
//! - `revoked.SERIAL` → a certificate on the deny list, put by the replica where the
//!   operator ran `updraftd agent revoke`, or where a re-enrollment replaced it;
//! - `push` → the policy rollout ([`crate::fleet::push::Rollout`]), put by the replica
//!   where the operator ran `updraftd policy push` and by any replica that moved it to
//!   its next stage.
//!
//! Each replica watches the bucket from its start (the last value of every key first)
//! and applies what other replicas wrote: records merge into its registry, denied
//! serials go on its own deny list, the revoked agent's connections to it close
//! with `CLOSE_REVOKED`, and a newer rollout (or a later stage of the same one) is
//! taken up: the policy goes to the boards connected here that are due it. The registry and deny list on disk stay what every check
//! reads; the bucket is how they travel.

use super::{Cluster, StoreError};
use crate::fleet::AgentRecord;
use crate::issued::{Issued, Revocation};
use crate::state::Shared;
use async_nats::jetstream::kv;
use bytes::Bytes;
use futures_util::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// Changes waiting to be put; past it a change is dropped with a warning (the next
/// change of the same agent carries its record again).
const QUEUE: usize = 4096;

/// A change this replica made, to be put in the bucket.
#[derive(Debug)]
pub(crate) enum Change {
    /// An agent's record changed.
    Agent(Box<AgentRecord>),
    /// An operator revoked this certificate here.
    Revoked(Denied),
    /// The policy rollout started or moved on here.
    Push(Box<crate::fleet::push::Rollout>),
}

/// A denied certificate as the bucket holds it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Denied {
    /// Its serial, lowercase hex.
    pub(crate) serial: String,
    /// The agent it was issued to.
    pub(crate) agent_id: String,
    /// When it expires (then it needs no deny entry), Unix milliseconds.
    pub(crate) not_after_ms: u64,
    /// Why: an operator's revocation (closes the agent's connections everywhere), or a
    /// re-enrollment that replaced it (refused at its next handshake).
    #[serde(default = "by_operator")]
    pub(crate) why: Revocation,
}

fn by_operator() -> Revocation {
    Revocation::Operator
}

/// The registry's way into the bucket: set once in cluster mode.
#[derive(Debug)]
pub(crate) struct Mirror {
    tx: mpsc::Sender<Change>,
    /// This replica's server id, noted in the records of agents connected to it.
    pub(crate) server_id: u8,
}

impl Mirror {
    /// Queues a change; never waits.
    pub(crate) fn send(&self, change: Change) {
        if let Err(e) = self.tx.try_send(change) {
            warn!(error = %e, "cluster store: the fleet change queue is full; a change is dropped (the next one of that agent carries its record)");
        }
    }
}

/// Starts putting this replica's fleet changes and applying the other replicas'.
pub(crate) fn start(shared: &Arc<Shared>, cluster: &Arc<Cluster>) {
    let (tx, rx) = mpsc::channel(QUEUE);
    shared.fleet.mirror_to(Mirror {
        tx,
        server_id: cluster.config.server_id,
    });
    tokio::spawn(put_changes(cluster.fleet.clone(), rx));
    tokio::spawn(apply_changes(shared.clone(), cluster.fleet.clone()));
}

/// Puts each change in the bucket, retrying a failed put (the store may be moving a
/// leader).
async fn put_changes(bucket: kv::Store, mut rx: mpsc::Receiver<Change>) {
    while let Some(change) = rx.recv().await {
        let (key, value) = match &change {
            Change::Agent(r) => (format!("agent.{}", r.agent_id), serde_json::to_vec(r)),
            Change::Revoked(d) => (format!("revoked.{}", d.serial), serde_json::to_vec(d)),
            Change::Push(r) => ("push".to_string(), serde_json::to_vec(r)),
        };
        let value = Bytes::from(value.expect("fleet changes always serialize"));
        if let Err(e) = super::retry("share fleet state", || bucket.put(&key, value.clone())).await
        {
            warn!(key, error = ?e, "cluster store: a fleet change was not shared; other replicas see it at the agent's next change");
        }
    }
}

/// Applies every value in the bucket, then every change, until the daemon drains; a
/// broken watch is started again after a second.
async fn apply_changes(shared: Arc<Shared>, bucket: kv::Store) {
    let mut draining = shared.draining.clone();
    tokio::select! {
        () = watch_changes(&shared, &bucket) => {}
        _ = draining.wait_for(|d| *d) => {}
    }
}

/// [`apply_changes`] until the daemon drains.
async fn watch_changes(shared: &Shared, bucket: &kv::Store) {
    let issued = Issued::new(&shared.config.state_dir);
    loop {
        match bucket.watch_with_history(">").await {
            Ok(mut watch) => {
                while let Some(entry) = watch.next().await {
                    match entry {
                        Ok(e) if matches!(e.operation, kv::Operation::Put) => {
                            apply(shared, &issued, &e.key, &e.value);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            warn!(error = %e, "cluster store: watching fleet state failed; watching again");
                            break;
                        }
                    }
                }
            }
            Err(e) => warn!(error = %e, "cluster store: cannot watch fleet state; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Applies one value of the bucket.
fn apply(shared: &Shared, issued: &Issued, key: &str, value: &[u8]) {
    if key.starts_with("agent.") {
        match serde_json::from_slice::<AgentRecord>(value) {
            Ok(record) if updraft_shared::tls::check_agent_id(&record.agent_id).is_ok() => {
                shared.fleet.merge(record);
            }
            _ => warn!(
                key,
                "cluster store: an agent record does not decode; skipped"
            ),
        }
    } else if key == "push" {
        match serde_json::from_slice::<crate::fleet::push::Rollout>(value) {
            Ok(r) => shared.fleet.adopt_rollout(r),
            Err(e) => {
                warn!(error = %e, "cluster store: the shared policy rollout does not decode; skipped")
            }
        }
    } else if key.starts_with("revoked.") {
        let Ok(d) = serde_json::from_slice::<Denied>(value) else {
            warn!(
                key,
                "cluster store: a deny-list entry does not decode; skipped"
            );
            return;
        };
        if issued.revocation(&d.serial).is_some() {
            return;
        }
        match issued.deny(&d.agent_id, &d.serial, d.not_after_ms, d.why) {
            Ok(true) if d.why == Revocation::Replaced => info!(
                agent = d.agent_id,
                serial = d.serial,
                "a certificate replaced through another replica is denied here too"
            ),
            Ok(true) => {
                let closed = shared.fleet.revoked_elsewhere(&d.agent_id);
                info!(
                    agent = d.agent_id,
                    serial = d.serial,
                    closed,
                    "certificate revoked on another replica; denied here too"
                );
            }
            Ok(false) => debug!(
                serial = d.serial,
                "an expired certificate's deny entry; nothing to do"
            ),
            Err(e) => {
                warn!(serial = d.serial, error = %e, "cannot write a deny-list entry another replica made")
            }
        }
    }
}

/// Makes the fleet bucket.
pub(super) async fn bucket(
    js: &async_nats::jetstream::Context,
    name: &str,
    replicas: usize,
) -> Result<kv::Store, StoreError> {
    super::kv_bucket(
        js,
        format!("{name}-fleet"),
        "Updraft fleet: agent records, revoked certificates, the policy rollout",
        replicas,
        // A rollout carries its policy (up to 64 KiB) and the boards it is for.
        1 << 20,
    )
    .await
}
