//! The worker side of cluster mode: while this replica has free slots, it pulls as
//! many work messages from the shared queue as it can start. A puller takes the task's
//! claim with compare-and-set on its revision before it starts the command, keeps the
//! message alive with in-progress acks, streams the output to the results stream,
//! records the result with a second compare-and-set, and only then acknowledges. A
//! worker whose compare-and-set fails was superseded (it went silent past the ack
//! deadline and another replica took over): its late result is dropped.

use super::claim::{self, Claim, End, State, Take, Work};
use super::Cluster;
use crate::state::Shared;
use async_nats::jetstream::consumer::{pull, AckPolicy, PullConsumer};
use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use futures_util::StreamExt;
use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};
use updraft_proto::msg::bounded_message;
use updraft_proto::{ErrorCode, Trailer};
use updraft_shared::catalog::Caller;
use updraft_shared::exec::Output;

/// How long one pull request waits at the server before it is renewed.
const PULL_FOR: Duration = Duration::from_secs(5);
/// Handlings of work messages by this process, numbering each one's claim writes.
static HANDLINGS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Output messages in flight (published, not yet stored) per run.
const MAX_UNACKED: usize = 64;

/// Starts the pullers; they stop when the drain starts, each after its current task.
pub(crate) async fn start(shared: Arc<Shared>) -> Result<(), super::StoreError> {
    let Some(cluster) = shared.cluster.clone() else {
        return Ok(());
    };
    let consumer: PullConsumer = cluster
        .work_stream()
        .get_or_create_consumer(
            "workers",
            pull::Config {
                durable_name: Some("workers".into()),
                description: Some("updraftd replicas pulling tasks".into()),
                ack_policy: AckPolicy::Explicit,
                ack_wait: cluster.config.ack_wait,
                max_ack_pending: 100_000,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| super::StoreError::new("create the workers' consumer", e))?;
    tokio::spawn(pull_loop(shared, cluster, consumer));
    Ok(())
}

/// Takes work while this replica has free task slots, until the drain starts: each
/// pull asks the workers' consumer for as many messages as slots are free (at least
/// one, waiting for a slot first), so a replica never holds work it cannot start and a
/// busy queue is drained several messages per round trip. Each message runs in a task
/// of its own.
async fn pull_loop(shared: Arc<Shared>, cluster: Arc<Cluster>, consumer: PullConsumer) {
    let slots = Arc::new(Semaphore::new(shared.config.max_concurrent_tasks));
    let mut draining = shared.draining.clone();
    let acquire = |slots: &Arc<Semaphore>| slots.clone().acquire_owned();
    while !shared.is_draining() {
        let first = tokio::select! {
            p = acquire(&slots) => p.expect("the puller semaphore is never closed"),
            _ = draining.wait_for(|d| *d) => return,
        };
        let free = slots.available_permits() + 1;
        let pulled = consumer
            .batch()
            .max_messages(free)
            .expires(PULL_FOR)
            .messages()
            .await;
        let mut messages = match pulled {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "cluster store: cannot pull work; retrying in a second");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut permit = Some(first);
        loop {
            let slot = match permit.take() {
                Some(p) => p,
                None => tokio::select! {
                    p = acquire(&slots) => p.expect("the puller semaphore is never closed"),
                    _ = draining.wait_for(|d| *d) => return,
                },
            };
            let next = tokio::select! {
                m = messages.next() => m,
                _ = draining.wait_for(|d| *d) => return,
            };
            let msg = match next {
                Some(Ok(msg)) => msg,
                Some(Err(e)) => {
                    warn!(error = %e, "cluster store: pulling work failed; pulling again");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    break;
                }
                // The pull got what it asked for, or expired: ask again.
                None => break,
            };
            // The drain waits for a task this replica took.
            let guard = shared.tasks.token();
            let (shared, cluster) = (shared.clone(), cluster.clone());
            tokio::spawn(async move {
                handle(&shared, &cluster, msg).await;
                drop((guard, slot));
            });
        }
    }
}

/// Runs one delivered work message to its recorded result (or leaves it for
/// redelivery when the store cannot be reached).
async fn handle(shared: &Shared, cluster: &Cluster, msg: jetstream::Message) {
    let work = match Work::decode(msg.payload.clone()) {
        Ok(w) => w,
        Err(e) => {
            warn!(subject = %msg.subject, error = %e, "cluster store: a work message does not decode; dropping it");
            let _ = msg.ack_with(AckKind::Term).await;
            return;
        }
    };
    let key = work.header.key.clone();
    let current = match cluster.read(&key).await {
        Ok(c) => c,
        Err(e) => {
            warn!(key, error = %e, "cannot read a task's claim; leaving it for redelivery");
            return;
        }
    };
    // Unique to this handling: a compare-and-set whose answer was lost is recognised by
    // reading back this very value, which no other handling (of a second delivery on
    // this replica) may write too.
    let by = format!(
        "{}-w{}",
        cluster.nonce,
        HANDLINGS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let delivery = msg.info().map_or(1, |i| i.delivered.max(1) as u64);
    let taken = claim::take(
        current.as_ref().map(|c| &c.0),
        cluster.config.server_id,
        &by,
        delivery,
    );
    let (running, revision) = match taken {
        Take::Stale => {
            debug!(
                key,
                delivery, "an older delivery of a task another worker holds; left alone"
            );
            return;
        }
        Take::Drop => {
            debug!(
                key,
                "work for a finished or forgotten task id; acknowledged"
            );
            let _ = msg.double_ack().await;
            return;
        }
        Take::Run(claim) => {
            if let Some((
                Claim {
                    state:
                        State::Running {
                            attempt, replica, ..
                        },
                    ..
                },
                _,
            )) = &current
            {
                info!(
                    key,
                    attempt,
                    replica,
                    "taking over a task whose worker went silent past [cluster] ack_wait"
                );
            }
            (claim, current.map_or(0, |c| c.1))
        }
    };
    let revision = match cluster.update(&key, &running, revision).await {
        Ok(Some(r)) => r,
        Ok(None) => {
            debug!(key, "another replica took this task first");
            return;
        }
        Err(e) => {
            warn!(key, error = %e, "cannot take a task's claim; leaving it for redelivery");
            return;
        }
    };
    let State::Running { attempt, .. } = running.state else {
        return;
    };
    let msg = Arc::new(msg);
    let beat = tokio::spawn(heartbeat(msg.clone(), cluster.config.ack_wait / 3));
    let (trailer, kept, stored) = run(shared, cluster, &work, attempt).await;
    // The heartbeat goes on until the result is recorded and acknowledged: a slow
    // store must not look like a silent worker.
    let _beat = AbortOnDrop(beat);
    if !stored {
        warn!(
            key,
            attempt, "the task's output could not be stored; leaving it for redelivery"
        );
        return;
    }
    let finished = Claim {
        state: State::Finished {
            attempt,
            kept,
            trailer: trailer.clone(),
        },
        ..running
    };
    match cluster.update(&key, &finished, revision).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            info!(key, attempt, "a late result was dropped: this worker went silent past [cluster] ack_wait and another replica took the task over");
            return;
        }
        Err(e) => {
            warn!(key, error = %e, "cannot record a task's result; leaving it for redelivery");
            return;
        }
    }
    let end = serde_json::to_vec(&End { kept, trailer }).expect("an end always serializes");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(claim::KIND, "end");
    let id = format!("{key}.{attempt}.end");
    if let Err(e) = cluster
        .append_stored(&key, attempt, headers, Bytes::from(end), &id)
        .await
    {
        warn!(key, error = %e, "the end of a task's output was not stored; readers find the result in its claim");
    }
    if let Err(e) = msg.double_ack().await {
        // The result is recorded: a redelivery finds it finished and drops it.
        debug!(key, error = %e, "work acknowledgement failed");
    }
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Tells JetStream every `every` that the task is still being worked on.
async fn heartbeat(msg: Arc<jetstream::Message>, every: Duration) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
    tick.tick().await;
    loop {
        tick.tick().await;
        if let Err(e) = msg.ack_with(AckKind::Progress).await {
            debug!(error = %e, "in-progress ack failed");
        }
    }
}

/// Runs the work in a slot of this replica: its trailer, whether a retry may be
/// answered with its output, and whether all of that output was stored.
async fn run(
    shared: &Shared,
    cluster: &Cluster,
    work: &Work,
    attempt: u32,
) -> (Trailer, bool, bool) {
    let h = &work.header;
    let admitted = shared
        .catalog()
        .admit(
            &h.task,
            h.args.clone(),
            Some(work.input.len() as u64),
            Caller::Local,
        )
        .map(|t| t.with_task_id(&h.id));
    let task = match admitted {
        Ok(t) => t,
        Err(refusal) => {
            warn!(agent = h.agent, task = h.task, id = h.id, "a queued task was refused by this replica's catalog: {}; give every replica the same [tasks]", refusal.message);
            let trailer = Trailer {
                error: Some(refusal.code),
                message: bounded_message(refusal.message),
                ..Default::default()
            };
            return (trailer, true, true);
        }
    };
    let reservation = loop {
        match shared.executor.reserve() {
            Ok(r) => break r,
            // Only this replica's own (idempotent) tasks fill slots and queue.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let slot = reservation.slot().await;
    shared.recent.counters().run();
    debug!(
        agent = h.agent,
        task = h.task,
        id = h.id,
        attempt,
        "cluster task started"
    );
    let mut out = Stored::new(cluster, &h.key, attempt);
    let result = shared
        .executor
        .run_in_slot(&slot, &task, Some(work.input.clone()), &mut out)
        .await;
    let waited = slot.waited;
    drop(slot);
    let stored = out.finish().await;
    let max_result = shared.config.dedup.max_result;
    match result {
        Ok(mut outcome) => {
            outcome.queue_time = waited;
            let trailer = crate::task::trailer_of(&outcome, Duration::ZERO);
            let kept = out.produced <= max_result;
            (trailer, kept, stored)
        }
        Err(e) => {
            info!(agent = h.agent, task = h.task, id = h.id, error = %e, "task failed");
            let internal = e.code() == ErrorCode::Internal;
            let trailer = Trailer {
                error: Some(e.code()),
                message: bounded_message(format!("task `{}`: {e}", h.task)),
                output_bytes: out.produced,
                ..Default::default()
            };
            (trailer, !internal && out.produced <= max_result, stored)
        }
    }
}

/// Task output appended to the results stream as it comes, with a bounded number of
/// messages in flight. A message whose store acknowledgement fails (a NATS node went
/// away) is sent again until stored; its message id makes a copy that did land a
/// duplicate the stream drops, and readers skip offsets they have.
struct Stored<'a> {
    cluster: &'a Cluster,
    key: &'a str,
    attempt: u32,
    pending: VecDeque<Pending>,
    produced: u64,
    failed: bool,
}

/// An output message published and not yet acknowledged.
struct Pending {
    ack: jetstream::context::PublishAckFuture,
    offset: u64,
    part: Bytes,
}

impl<'a> Stored<'a> {
    fn new(cluster: &'a Cluster, key: &'a str, attempt: u32) -> Self {
        Self {
            cluster,
            key,
            attempt,
            pending: VecDeque::new(),
            produced: 0,
            failed: false,
        }
    }

    fn headers(offset: u64) -> async_nats::HeaderMap {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(claim::KIND, "out");
        headers.insert(claim::OFFSET, offset.to_string().as_str());
        headers
    }

    fn msg_id(&self, offset: u64) -> String {
        format!("{}.{}.{offset}", self.key, self.attempt)
    }

    /// Waits for the oldest message's acknowledgement, sending it again if it failed.
    async fn settle_one(&mut self) -> io::Result<()> {
        let Some(p) = self.pending.pop_front() else {
            return Ok(());
        };
        if p.ack.await.is_ok() {
            return Ok(());
        }
        let id = self.msg_id(p.offset);
        let stored = self
            .cluster
            .append_stored(self.key, self.attempt, Self::headers(p.offset), p.part, &id)
            .await;
        stored.map_err(|e| {
            self.failed = true;
            io::Error::other(e)
        })
    }

    /// Waits until every message is stored; false when one was not.
    async fn finish(&mut self) -> bool {
        while !self.pending.is_empty() {
            if self.settle_one().await.is_err() {
                return false;
            }
        }
        !self.failed
    }
}

impl Output for Stored<'_> {
    async fn write(&mut self, mut chunk: Bytes) -> io::Result<()> {
        while !chunk.is_empty() {
            let part = chunk.split_to(chunk.len().min(super::MAX_CHUNK));
            let offset = self.produced;
            self.produced += part.len() as u64;
            let mut headers = Self::headers(offset);
            headers.insert(
                async_nats::header::NATS_MESSAGE_ID,
                self.msg_id(offset).as_str(),
            );
            match self
                .cluster
                .append(self.key, self.attempt, headers, part.clone())
                .await
            {
                Ok(ack) => self.pending.push_back(Pending { ack, offset, part }),
                Err(e) => {
                    self.failed = true;
                    return Err(io::Error::other(e));
                }
            }
            while self.pending.len() > MAX_UNACKED {
                self.settle_one().await?;
            }
        }
        Ok(())
    }
}
