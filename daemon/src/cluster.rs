//! Cluster mode (`[cluster]` in `daemon.toml`): replicas of `updraftd` that keep no
//! task state of their own. Task claims, the work queue and results live in NATS
//! JetStream, so any replica can take a retry, run queued work, or replay a result.
//!
//! The names in JetStream, with `N` the configured `name` (default `updraft`):
//! - KV bucket `N-tasks`: key `AGENT.ID` → a [`claim::Claim`]: who asked for what, and
//!   whether it is queued, running (which attempt) or finished (its trailer). The key's
//!   revision, not the work queue's ack deadline, decides who owns a task.
//! - Stream `N-work` (work-queue retention), subject `N.work`: one message per run,
//!   `Nats-Msg-Id` = the key, carrying the request and its input ([`claim::Work`]).
//! - Stream `N-out`, subjects `N.out.AGENT.ID.ATTEMPT`: the output of each attempt in
//!   order, then an `end` message once that attempt's result is recorded.
//! - KV bucket `N-fleet`: agent records, revoked certificates and the policy rollout
//!   ([`fleet`]).
//! - KV bucket `N-enroll`: enrollment tokens and the certificates issued per agent id
//!   ([`enroll`]).
//!
//! [`front`](crate::task) code creates claims and relays results; [`worker`] pulls
//! work. Without `[cluster]` none of this exists and no NATS is needed.

pub(crate) mod claim;
pub(crate) mod enroll;
pub(crate) mod fleet;
pub(crate) mod worker;

use crate::config::{ClusterConfig, DaemonConfig};
use crate::state::Uploads;
use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use claim::Claim;
use std::future::Future;
use std::time::Duration;
use tracing::{debug, info, warn};

/// How often a compare-and-set refused while the claim is still at the expected
/// revision is tried again (see [`Cluster::update`]).
const SPURIOUS_REFUSALS: usize = 20;
/// How long one store call is retried (with backoff) before the task fails: long
/// enough for a NATS node to be replaced by its peers (an election takes seconds).
const RETRY_FOR: Duration = Duration::from_secs(30);
/// Room left in a NATS message for the work's header (task, arguments, key).
const WORK_HEADROOM: u64 = 64 << 10;
/// Largest output chunk in one results message.
pub(crate) const MAX_CHUNK: usize = 256 << 10;
/// How long startup waits for NATS and its streams before giving up.
const START_WITHIN: Duration = Duration::from_secs(60);

/// A store call that failed for good (after retries): NATS unreachable or refusing.
#[derive(Debug, thiserror::Error)]
#[error("cluster store: {what}: {detail}")]
pub(crate) struct StoreError {
    what: &'static str,
    detail: String,
}

impl StoreError {
    pub(crate) fn new(what: &'static str, e: impl std::fmt::Display) -> Self {
        Self {
            what,
            detail: e.to_string(),
        }
    }
}

/// A replica's handle on the shared store.
pub(crate) struct Cluster {
    pub(crate) config: ClusterConfig,
    client: async_nats::Client,
    js: jetstream::Context,
    claims: kv::Store,
    /// Agent records and revoked certificates, shared ([`fleet`]).
    pub(crate) fleet: kv::Store,
    /// Tokens and issued certificates, shared ([`enroll`]).
    pub(crate) enroll: enroll::SharedEnroll,
    results: stream::Stream,
    work_stream: stream::Stream,
    /// Largest input that rides in a work message; a bigger one runs on the front
    /// replica, as a single daemon runs it.
    pub(crate) queue_input: u64,
    /// Shared-store tasks each agent has in flight through this replica.
    pub(crate) in_flight: Uploads,
    /// Random, per process: tells this replica's writes from another's after a retried
    /// call whose first try may have landed.
    pub(crate) nonce: String,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("name", &self.config.name)
            .field("server_id", &self.config.server_id)
            .finish_non_exhaustive()
    }
}

/// The outcome of trying to claim a task id.
#[derive(Debug)]
pub(crate) enum Claimed {
    /// The id was free: this replica created the claim.
    New,
    /// The id is known: its claim and revision.
    Known(Claim, u64),
}

impl Cluster {
    /// Connects to NATS and makes sure the bucket and streams exist with this
    /// configuration. Retries for a minute while NATS comes up, then fails naming the
    /// servers.
    pub(crate) async fn connect(config: &DaemonConfig) -> Result<Self, StoreError> {
        let Some(c) = config.cluster.clone() else {
            return Err(StoreError::new("connect", "no [cluster] table"));
        };
        let client = connect_client(&c, &format!("{}", c.server_id)).await?;
        let js = jetstream::new(client.clone());
        let longest = config
            .catalog
            .names()
            .filter_map(|n| config.catalog.get(n))
            .map(|s| s.timeout)
            .max()
            .unwrap_or_default();
        let keep = config.dedup.remember.max(Duration::from_secs(1)) + longest + 2 * c.ack_wait;
        let servers = c.nats.join(", ");
        let ensure = async {
            loop {
                match ensure(&js, &c, keep).await {
                    Ok(made) => return made,
                    Err(e) => {
                        warn!(error = %e, servers, "cluster store not ready; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        };
        let (claims, work_stream, results, fleet, enroll) = tokio::time::timeout(START_WITHIN, ensure)
            .await
            .map_err(|_| {
                StoreError::new(
                    "connect",
                    format!("NATS JetStream at {servers} did not answer within {START_WITHIN:?}; check that the servers run with JetStream on and that [cluster] nats lists them"),
                )
            })?;
        let max_payload = client.server_info().max_payload as u64;
        let queue_input = config
            .dedup
            .hold_input
            .min(max_payload.saturating_sub(WORK_HEADROOM));
        info!(
            servers,
            name = c.name,
            server_id = c.server_id,
            replicas = c.replicas,
            queue_input,
            "cluster store ready"
        );
        Ok(Self {
            enroll: enroll::SharedEnroll::new(enroll, fleet.clone(), &c.name),
            config: c,
            client,
            js,
            claims,
            fleet,
            results,
            work_stream,
            queue_input,
            in_flight: Uploads::default(),
            nonce: format!("{:016x}", rand::random::<u64>()),
        })
    }

    /// The key of task `id` of `agent` in the claims bucket.
    pub(crate) fn key(agent: &str, id: &str) -> String {
        format!("{agent}.{id}")
    }

    fn out_subject(&self, key: &str, attempt: u32) -> String {
        format!("{}.out.{key}.{attempt}", self.config.name)
    }

    /// Creates the claim of `key`, or reads the one there.
    pub(crate) async fn claim(&self, key: &str, fresh: &Claim) -> Result<Claimed, StoreError> {
        let value = fresh.encode();
        loop {
            let created = retry("create a task claim", || {
                self.claims.create(key, value.clone())
            })
            .await;
            match created {
                Ok(_) => return Ok(Claimed::New),
                Err(Retried::Answer(_)) => {}
                Err(Retried::Failed(e)) => return Err(e),
            }
            // The key exists: read it. It may be this very claim, when an earlier try
            // landed and its answer was lost; or it may have expired since.
            if let Some((found, revision)) = self.read(key).await? {
                if found.by == fresh.by && found.state == fresh.state {
                    return Ok(Claimed::New);
                }
                return Ok(Claimed::Known(found, revision));
            }
        }
    }

    /// The claim of `key` and its revision, if any (read as [`latest`] reads).
    pub(crate) async fn read(&self, key: &str) -> Result<Option<(Claim, u64)>, StoreError> {
        let Some((value, revision)) = latest(&self.claims, key, "read a task claim").await? else {
            return Ok(None);
        };
        match Claim::decode(&value) {
            Ok(claim) => Ok(Some((claim, revision))),
            Err(e) => {
                warn!(key, error = %e, "a task claim in the store does not decode; treating the id as unknown");
                Ok(None)
            }
        }
    }

    /// Replaces the claim of `key` if it is still at `revision`: `Ok(Some(new
    /// revision))`, or `Ok(None)` when another replica changed it first.
    ///
    /// A refusal is checked against the claim as the stream leader has it: our own
    /// write that landed and lost its answer reads back as this very value; a claim
    /// still at `revision` means the refusal was not a lost race (NATS 2.12 refuses a
    /// write to a subject with another write to it still in flight, error 10164, even
    /// when the expected revision is right), and the write is tried again.
    pub(crate) async fn update(
        &self,
        key: &str,
        claim: &Claim,
        revision: u64,
    ) -> Result<Option<u64>, StoreError> {
        let value = claim.encode();
        let mut pause = Duration::from_millis(1);
        for _ in 0..SPURIOUS_REFUSALS {
            let answer = match retry("update a task claim", || {
                self.claims.update(key, value.clone(), revision)
            })
            .await
            {
                Ok(r) => return Ok(Some(r)),
                Err(Retried::Answer(answer)) => answer,
                Err(Retried::Failed(e)) => return Err(e),
            };
            match self.read(key).await? {
                Some((now, r)) if now == *claim => return Ok(Some(r)),
                Some((_, r)) if r == revision => {
                    debug!(key, revision, answer, "a task claim's compare-and-set was refused at the right revision; trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
                _ => return Ok(None),
            }
        }
        Err(StoreError::new(
            "update a task claim",
            format!("refused {SPURIOUS_REFUSALS} times at the revision it holds"),
        ))
    }

    /// Removes the claim of `key` (a run that was never queued).
    pub(crate) async fn forget(&self, key: &str) {
        if let Err(e) = retry("delete a task claim", || self.claims.delete(key)).await {
            warn!(key, error = %e.into_error(), "could not remove a task claim; it expires with [dedup] remember");
        }
    }

    /// Queues run `attempt` of `key`. Deduplicated by NATS on key and attempt, so a
    /// retried publish queues it once.
    pub(crate) async fn queue(
        &self,
        key: &str,
        attempt: u32,
        work: Bytes,
    ) -> Result<(), StoreError> {
        let subject = format!("{}.work", self.config.name);
        let msg_id = format!("{key}.{attempt}");
        self.publish_stored(
            "queue a task",
            subject,
            async_nats::HeaderMap::new(),
            work,
            &msg_id,
        )
        .await
    }

    /// An ordered reader of every attempt's output of `key`, from the first message.
    pub(crate) async fn results(
        &self,
        key: &str,
    ) -> Result<jetstream::consumer::pull::Ordered, StoreError> {
        let filter = format!("{}.out.{key}.>", self.config.name);
        let consumer = retry("read task results", || {
            self.results
                .create_consumer(jetstream::consumer::pull::OrderedConfig {
                    filter_subject: filter.clone(),
                    deliver_policy: jetstream::consumer::DeliverPolicy::All,
                    ..Default::default()
                })
        })
        .await
        .map_err(Retried::into_error)?;
        consumer
            .messages()
            .await
            .map_err(|e| StoreError::new("read task results", e))
    }

    /// A plain subscription to every attempt's output of `key` from now on.
    pub(crate) async fn live(&self, key: &str) -> Result<async_nats::Subscriber, StoreError> {
        self.client
            .subscribe(format!("{}.out.{key}.>", self.config.name))
            .await
            .map_err(|e| StoreError::new("follow task output", e))
    }

    /// Appends a message (output or end) to attempt `attempt` of `key`; the
    /// returned future resolves when it is stored.
    pub(crate) async fn append(
        &self,
        key: &str,
        attempt: u32,
        headers: async_nats::HeaderMap,
        body: Bytes,
    ) -> Result<jetstream::context::PublishAckFuture, StoreError> {
        let subject = self.out_subject(key, attempt);
        self.js
            .publish_with_headers(subject, headers, body)
            .await
            .map_err(|e| StoreError::new("store task output", e))
    }

    /// [`append`](Self::append) until stored, retried while the store recovers;
    /// `msg_id` makes a retry of a message that did land a duplicate the stream drops.
    pub(crate) async fn append_stored(
        &self,
        key: &str,
        attempt: u32,
        headers: async_nats::HeaderMap,
        body: Bytes,
        msg_id: &str,
    ) -> Result<(), StoreError> {
        let subject = self.out_subject(key, attempt);
        self.publish_stored("store task output", subject, headers, body, msg_id)
            .await
    }

    /// Publishes to `subject` until the stream has stored it, retried while the store
    /// recovers; `msg_id` makes a retry of a message that did land a duplicate the
    /// stream drops. `what` names the call in errors.
    async fn publish_stored(
        &self,
        what: &'static str,
        subject: String,
        headers: async_nats::HeaderMap,
        body: Bytes,
        msg_id: &str,
    ) -> Result<(), StoreError> {
        retry(what, || {
            let mut headers = headers.clone();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, msg_id);
            let publish = self
                .js
                .publish_with_headers(subject.clone(), headers, body.clone());
            async move { publish.await?.await }
        })
        .await
        .map(|_| ())
        .map_err(Retried::into_error)
    }

    /// The work stream, for the worker's consumer.
    pub(crate) fn work_stream(&self) -> &stream::Stream {
        &self.work_stream
    }
}

/// The value of `key` in `bucket` and its revision, if the key is there, read from the
/// bucket's stream leader. The key-value client's own reads are direct gets any node
/// may answer, and a node that has not yet applied a write answers with the value
/// before it, or "no such key" for one just created (a worker then took a task just
/// queued for a forgotten one and dropped it). `what` names the call in errors.
pub(crate) async fn latest(
    bucket: &kv::Store,
    key: &str,
    what: &'static str,
) -> Result<Option<(Bytes, u64)>, StoreError> {
    let subject = format!("{}{key}", bucket.prefix);
    let got = retry(what, || {
        bucket.stream.get_last_raw_message_by_subject(&subject)
    })
    .await;
    let message = match got {
        Ok(m) => m,
        Err(Retried::Answer(_)) => return Ok(None),
        Err(e) => return Err(e.into_error()),
    };
    let operation = message.headers.get("KV-Operation").map(|v| v.as_str());
    if matches!(operation, Some("DEL" | "PURGE")) {
        return Ok(None);
    }
    Ok(Some((message.payload, message.sequence)))
}

/// A NATS client for `c`, named for this replica (`who`): it keeps reconnecting while
/// the servers come up.
pub(crate) async fn connect_client(
    c: &ClusterConfig,
    who: &str,
) -> Result<async_nats::Client, StoreError> {
    let mut options = async_nats::ConnectOptions::new()
        .name(format!("updraftd-{}-{who}", c.name))
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => debug!("cluster store: connected to NATS"),
                async_nats::Event::Disconnected => {
                    warn!("cluster store: the connection to NATS was lost; reconnecting (store calls are retried meanwhile)")
                }
                other => warn!("cluster store: NATS says {other}"),
            }
        })
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_secs(5)));
    if let Some(creds) = &c.credentials {
        options = options.credentials_file(creds).await.map_err(|e| {
            StoreError::new(
                "cluster.credentials",
                format!("cannot read {}: {e}", creds.display()),
            )
        })?;
    }
    let addrs = c
        .nats
        .iter()
        .filter_map(|u| u.parse::<async_nats::ServerAddr>().ok())
        .collect::<Vec<_>>();
    let client = options
        .connect(addrs)
        .await
        .map_err(|e| StoreError::new("connect", e))?;
    Ok(client)
}

/// Makes (or updates) a KV bucket kept on file with `replicas` copies, one value per
/// key, values up to `max_value` bytes.
pub(crate) async fn kv_bucket(
    js: &jetstream::Context,
    bucket: String,
    description: &str,
    replicas: usize,
    max_value: i32,
) -> Result<kv::Store, StoreError> {
    let name = bucket.clone();
    js.create_or_update_key_value(kv::Config {
        bucket,
        description: description.into(),
        history: 1,
        num_replicas: replicas,
        storage: stream::StorageType::File,
        max_value_size: max_value,
        ..Default::default()
    })
    .await
    .map_err(|e| StoreError::new("create a bucket", format!("{name}: {e}")))
}

/// Makes the bucket and streams (or updates their limits).
async fn ensure(
    js: &jetstream::Context,
    c: &ClusterConfig,
    keep: Duration,
) -> Result<
    (
        kv::Store,
        stream::Stream,
        stream::Stream,
        kv::Store,
        kv::Store,
    ),
    StoreError,
> {
    let claims = js
        .create_or_update_key_value(kv::Config {
            bucket: format!("{}-tasks", c.name),
            description: "Updraft task claims: AGENT.ID -> queued/running/finished".into(),
            history: 1,
            max_age: keep,
            num_replicas: c.replicas,
            storage: stream::StorageType::File,
            max_value_size: 64 << 10,
            ..Default::default()
        })
        .await
        .map_err(|e| StoreError::new("create the claims bucket", e))?;
    let work = js
        .create_or_update_stream(stream::Config {
            name: format!("{}-work", c.name),
            description: Some("Updraft work queue: one message per run".into()),
            subjects: vec![format!("{}.work", c.name)],
            retention: stream::RetentionPolicy::WorkQueue,
            max_age: keep,
            duplicate_window: keep.min(Duration::from_secs(600)),
            num_replicas: c.replicas,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| StoreError::new("create the work stream", e))?;
    let _ = work;
    let work = js
        .get_stream(format!("{}-work", c.name))
        .await
        .map_err(|e| StoreError::new("open the work stream", e))?;
    js.create_or_update_stream(stream::Config {
        name: format!("{}-out", c.name),
        description: Some("Updraft task output, per task and attempt".into()),
        subjects: vec![format!("{}.out.>", c.name)],
        max_age: keep,
        max_bytes: c.max_result_store as i64,
        discard: stream::DiscardPolicy::Old,
        num_replicas: c.replicas,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| StoreError::new("create the results stream", e))?;
    let results = js
        .get_stream(format!("{}-out", c.name))
        .await
        .map_err(|e| StoreError::new("open the results stream", e))?;
    let fleet = fleet::bucket(js, &c.name, c.replicas).await?;
    let enroll = enroll::bucket(js, &c.name, c.replicas).await?;
    Ok((claims, work, results, fleet, enroll))
}

/// A store call's failure after [`retry`]: an answer (the call reached JetStream and
/// was refused: the key exists, the revision moved) or a failure that lasted.
#[derive(Debug)]
pub(crate) enum Retried {
    /// JetStream answered no.
    Answer(String),
    /// The store could not be reached or kept failing.
    Failed(StoreError),
}

impl Retried {
    fn into_error(self) -> StoreError {
        match self {
            Retried::Answer(e) => StoreError {
                what: "refused",
                detail: e,
            },
            Retried::Failed(e) => e,
        }
    }
}

/// A store call's error, and whether it is an answer (JetStream refused: the key
/// exists, the revision moved) rather than a failure to reach the store.
pub(crate) trait CallError: std::fmt::Display {
    /// True when JetStream answered no; retrying would get the same answer.
    fn is_answer(&self) -> bool {
        false
    }
}

impl CallError for kv::CreateError {
    fn is_answer(&self) -> bool {
        self.kind() == kv::CreateErrorKind::AlreadyExists || wrong_sequence(self)
    }
}

impl CallError for kv::UpdateError {
    fn is_answer(&self) -> bool {
        self.kind() == kv::UpdateErrorKind::WrongLastRevision || wrong_sequence(self)
    }
}

/// Whether JetStream refused a write for its expected sequence. The client maps only
/// one of the server's codes for it (10071) to its own kind; NATS 2.12 also answers
/// 10164, which the client passes on as a generic failure carrying the server's error.
fn wrong_sequence(e: &(dyn std::error::Error + 'static)) -> bool {
    use async_nats::jetstream::{Error as ServerError, ErrorCode};
    let mut source = Some(e);
    while let Some(err) = source {
        if let Some(server) = err.downcast_ref::<ServerError>() {
            let code = server.error_code();
            return code == ErrorCode::STREAM_WRONG_LAST_SEQUENCE
                || code == ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT;
        }
        source = err.source();
    }
    false
}

impl CallError for kv::EntryError {}

impl CallError for stream::LastRawMessageError {
    fn is_answer(&self) -> bool {
        self.kind() == stream::LastRawMessageErrorKind::NoMessageFound
    }
}
impl CallError for kv::PutError {}
impl CallError for jetstream::context::PublishError {}
impl CallError for stream::ConsumerError {}

/// Runs `call` until it succeeds, JetStream answers no, or [`RETRY_FOR`] passes;
/// transient failures (timeouts, no responders while a node is replaced, a lost
/// connection) are retried with backoff up to a second.
pub(crate) async fn retry<T, E, F, Fut>(what: &'static str, mut call: F) -> Result<T, Retried>
where
    E: CallError,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let start = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(20);
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                let text = e.to_string();
                if e.is_answer() {
                    return Err(Retried::Answer(text));
                }
                if start.elapsed() >= RETRY_FOR {
                    return Err(Retried::Failed(StoreError::new(what, text)));
                }
                warn!(error = %text, "cluster store: {what} failed; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::jetstream::context::{PublishError, PublishErrorKind};

    fn server_error(code: u64) -> async_nats::jetstream::Error {
        serde_json::from_value(serde_json::json!({
            "code": 400,
            "err_code": code,
            "description": "wrong last sequence: 7",
        }))
        .unwrap()
    }

    #[test]
    fn a_refused_compare_and_set_is_an_answer_by_the_server_s_code() {
        use kv::{UpdateError, UpdateErrorKind};
        assert!(UpdateError::new(UpdateErrorKind::WrongLastRevision).is_answer());
        // NATS 2.12's code arrives as a generic failure, the server's error inside.
        for code in [10071, 10164] {
            let nested = PublishError::with_source(PublishErrorKind::Other, server_error(code));
            assert!(UpdateError::with_source(UpdateErrorKind::Other, nested).is_answer());
        }
        // Another server error, or a timeout, is a failure to retry.
        let other = PublishError::with_source(PublishErrorKind::Other, server_error(10058));
        assert!(!UpdateError::with_source(UpdateErrorKind::Other, other).is_answer());
        assert!(!UpdateError::new(UpdateErrorKind::TimedOut).is_answer());
        let create = kv::CreateError::with_source(kv::CreateErrorKind::Other, server_error(10164));
        assert!(create.is_answer());
    }
}
