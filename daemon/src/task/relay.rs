//! The front side of a task in cluster mode: this replica received the task stream.
//! It claims the id in the shared store; a new id's input is received whole and
//! queued for whichever replica has a free slot; a known id is joined or replayed.
//! Either way the agent gets the output relayed from the results stream as it
//! arrives, so the replica that runs the task and the one that relays it need not
//! be the same, and a front that dies costs only a retry, which is relayed again.

use super::{outcome_label, Asked, HeldInput, TaskStream};
use crate::cluster::claim::{self, args_digest, Claim, End, State, Work, WorkHeader};
use crate::cluster::{Claimed, Cluster};
use crate::state::{Shared, Tally};
use futures_util::StreamExt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use tracing::{debug, info, warn};
use updraft_proto::msg::bounded_message;
use updraft_proto::{ErrorCode, Trailer, STOP_INPUT};
use updraft_shared::catalog::{Caller, Refusal};

/// How often one relay reads the results again after its reader broke.
const MAX_REREADS: u32 = 20;

/// Numbers this replica's claims, so two of its streams never mistake each other's.
static CLAIMS: AtomicU64 = AtomicU64::new(0);

/// Whether task `task` with an input of `input_len` goes through the shared store:
/// every task but those marked `idempotent`, unless its input is known to be too
/// big for a work message (then it runs here, as on a single daemon).
pub(super) fn is_shared(shared: &Shared, task: &str, input_len: Option<u64>) -> bool {
    let Some(cluster) = &shared.cluster else {
        return false;
    };
    let catalog = shared.catalog();
    let Some(spec) = catalog.get(task) else {
        return false;
    };
    !spec.idempotent && input_len.is_none_or(|n| n <= cluster.queue_input)
}

/// Serves a task stream through the shared store.
pub(super) async fn serve<S: Future<Output = u64> + Unpin>(
    mut ts: TaskStream<'_>,
    shared: &Shared,
    cluster: &Cluster,
    asked: Asked<'_>,
    stopped: &mut S,
    tally: &mut Tally<'_>,
) {
    let (agent, task, id) = (ts.agent, ts.task, ts.id);
    let args = args_digest(&asked.args);
    let caller = Caller::Agent(asked.peer);
    let admitted = shared
        .catalog()
        .admit(task, asked.args.clone(), asked.input_len, caller);
    let max_input = match admitted {
        Ok(t) => t.spec().max_input,
        Err(refusal) => {
            info!(agent, task, id, code = %refusal.code, "task refused: {}", refusal.message);
            return refuse(&mut ts, tally, refusal).await;
        }
    };
    if shared.is_draining() {
        return refuse(&mut ts, tally, super::draining_refusal()).await;
    }
    let limit = cluster.config.max_tasks_per_agent;
    let _counted = match cluster.in_flight.begin(agent, limit) {
        Ok(c) => c,
        Err(n) => {
            let refusal = Refusal {
                code: ErrorCode::Busy,
                message: format!("busy: agent `{agent}` already has {n} tasks in the cluster's queue through this replica, the limit ([cluster] max_tasks_per_agent); send fewer at once"),
            };
            return refuse(&mut ts, tally, refusal).await;
        }
    };
    let key = Cluster::key(agent, id);
    let fresh = Claim {
        task: task.to_string(),
        args: args.clone(),
        by: format!(
            "{}-{}",
            cluster.nonce,
            CLAIMS.fetch_add(1, Ordering::Relaxed)
        ),
        state: State::Queued { runs: 0 },
    };
    let (from, rerun) = match cluster.claim(&key, &fresh).await {
        Err(e) => return unavailable(&mut ts, tally, &e).await,
        Ok(Claimed::New) => (1, None),
        Ok(Claimed::Known(found, revision)) => {
            if !found.same_request(task, &args) {
                warn!(
                    agent,
                    task,
                    id,
                    first_task = found.task,
                    "peer misbehaved: task id reused for a different request; task refused"
                );
                let refusal = Refusal {
                    code: ErrorCode::BadRequest,
                    message: format!("task id {id} was already used for task `{}` with other arguments; give every new task a new id", found.task),
                };
                return refuse(&mut ts, tally, refusal).await;
            }
            match found.state {
                State::Finished {
                    kept: false,
                    attempt,
                    ..
                } => {
                    info!(agent, task, id, "task id {id} retried; its first output was not kept (over [dedup] max_result), so the task runs again");
                    (attempt + 1, Some((found, revision, attempt)))
                }
                _ => {
                    info!(
                        agent,
                        task,
                        id,
                        "task id {id} retried; answering from the cluster's record of its run"
                    );
                    ts.input.stop(STOP_INPUT);
                    if !ts.reply.accept().await {
                        return;
                    }
                    shared.recent.counters().hit();
                    let deduplicated = matches!(found.state, State::Finished { .. });
                    return relay(
                        ts,
                        cluster,
                        &key,
                        found.first_attempt(),
                        None,
                        stopped,
                        tally,
                        deduplicated,
                    )
                    .await;
                }
            }
        }
    };
    if !ts.reply.accept().await {
        if rerun.is_none() {
            cluster.forget(&key).await;
        }
        return;
    }
    let received = tokio::select! {
        r = HeldInput::receive(&mut ts.input, cluster.queue_input.max(1), max_input) => r,
        code = &mut *stopped => {
            ts.stopped(tally, code, "while it was sending its input; nothing ran");
            if rerun.is_none() {
                cluster.forget(&key).await;
            }
            return;
        }
    };
    let held = match received {
        Ok(held) if held.is_whole() => held,
        Ok(held) => {
            // Only an input of unannounced length gets here (see `is_shared`).
            if rerun.is_none() {
                cluster.forget(&key).await;
            }
            let message = format!("task `{task}`: in cluster mode an input whose length is not announced may be at most {} bytes (this one sent {} already); announce its length so it runs on the receiving replica, or mark the task idempotent", cluster.queue_input, held.len);
            return fail(ts, tally, ErrorCode::TooLarge, message).await;
        }
        Err(e) => {
            if rerun.is_none() {
                cluster.forget(&key).await;
            }
            debug!(agent, task, id, error = %e, "the task's input did not arrive whole; nothing ran");
            return fail(ts, tally, e.code(), format!("task `{task}`: {e}")).await;
        }
    };
    let runs = match rerun {
        None => 0,
        Some((found, revision, attempt)) => {
            let queued = Claim {
                by: fresh.by.clone(),
                state: State::Queued { runs: attempt },
                ..found
            };
            match cluster.update(&key, &queued, revision).await {
                Ok(Some(_)) => attempt,
                // Another retry queued it first: follow that run.
                Ok(None) => {
                    return relay(ts, cluster, &key, from, None, stopped, tally, false).await;
                }
                Err(e) => return unavailable_accepted(ts, tally, &e).await,
            }
        }
    };
    let header = WorkHeader {
        key: key.clone(),
        agent: agent.to_string(),
        id: id.to_string(),
        task: task.to_string(),
        args: asked.args,
    };
    let work = Work::encode(&header, &held.chunks());
    // Subscribed before the work is queued, so no output can come before it: the
    // live path costs no consumer on the store. A missed message falls back to the
    // stored output.
    let live = cluster.live(&key).await.ok();
    if let Err(e) = cluster.queue(&key, runs, work).await {
        if runs == 0 {
            cluster.forget(&key).await;
        }
        return unavailable_accepted(ts, tally, &e).await;
    }
    relay(ts, cluster, &key, from, live, stopped, tally, false).await;
}

/// Where a relay reads a task's output from.
enum Source {
    /// A plain subscription, opened before the work was queued: every message as it
    /// is published, with nothing to create on the store.
    Live(async_nats::Subscriber),
    /// The results stream from its first message: for joins, replays, and a live
    /// subscription that missed a message.
    Stored(Box<async_nats::jetstream::consumer::pull::Ordered>),
}

impl Source {
    fn is_live(&self) -> bool {
        matches!(self, Source::Live(_))
    }

    async fn next(&mut self) -> Option<Result<async_nats::Message, String>> {
        match self {
            Source::Live(sub) => sub.next().await.map(Ok),
            Source::Stored(o) => o
                .next()
                .await
                .map(|r| r.map(|m| m.message).map_err(|e| e.to_string())),
        }
    }
}

/// Refuses the task before anything was accepted.
async fn refuse(ts: &mut TaskStream<'_>, tally: &mut Tally<'_>, refusal: Refusal) {
    tally.outcome = refusal.code.as_str();
    ts.refuse(refusal).await;
}

/// Refuses a task the store could not take: `busy`, so the agent tries another
/// daemon, which may reach the store.
async fn unavailable(
    ts: &mut TaskStream<'_>,
    tally: &mut Tally<'_>,
    e: &crate::cluster::StoreError,
) {
    warn!(agent = ts.agent, task = ts.task, id = ts.id, error = %e, "task refused: the cluster store is unreachable");
    let refusal = Refusal {
        code: ErrorCode::Busy,
        message: format!("busy: {e}; try another daemon"),
    };
    refuse(ts, tally, refusal).await;
}

/// Ends an accepted task the store failed for.
async fn unavailable_accepted(
    ts: TaskStream<'_>,
    tally: &mut Tally<'_>,
    e: &crate::cluster::StoreError,
) {
    warn!(agent = ts.agent, task = ts.task, id = ts.id, error = %e, "task failed: the cluster store is unreachable");
    fail(
        ts,
        tally,
        ErrorCode::Internal,
        format!("{e}; retry the task id"),
    )
    .await;
}

/// Ends an accepted task with an error trailer.
async fn fail(mut ts: TaskStream<'_>, tally: &mut Tally<'_>, code: ErrorCode, message: String) {
    ts.input.stop(STOP_INPUT);
    let trailer = Trailer {
        error: Some(code),
        message: bounded_message(message),
        ..Default::default()
    };
    tally.outcome = code.as_str();
    ts.reply.end(&trailer).await;
}

/// Relays task `key`'s output and trailer from the results stream, starting at
/// attempt `from`. When a later attempt appears (the worker went silent and another
/// took over) before any output was sent, the relay follows it; after output was
/// sent it ends with an error, since the agent has part of an output that may not be
/// repeated: a retry of the id gets the whole new one.
#[allow(clippy::too_many_arguments)]
async fn relay<S: Future<Output = u64> + Unpin>(
    mut ts: TaskStream<'_>,
    cluster: &Cluster,
    key: &str,
    from: u32,
    live: Option<async_nats::Subscriber>,
    stopped: &mut S,
    tally: &mut Tally<'_>,
    deduplicated: bool,
) {
    let (agent, task, id) = (ts.agent, ts.task, ts.id);
    // The output's source: the live subscription, else (`None`) the stored messages,
    // read from the start when the loop comes round.
    let mut messages = live.map(Source::Live);
    let mut attempt = from;
    let mut sent = 0u64;
    let mut confirmed = false;
    let mut rereads = 0;
    let quiet = cluster.config.ack_wait;
    let trailer = loop {
        let source = match &mut messages {
            Some(m) => m,
            None => match cluster.results(key).await {
                Ok(m) => messages.insert(Source::Stored(Box::new(m))),
                Err(e) => return unavailable_accepted(ts, tally, &e).await,
            },
        };
        let live = source.is_live();
        let next = tokio::select! {
            n = tokio::time::timeout(quiet, source.next()) => n,
            code = &mut *stopped => {
                ts.stopped(tally, code, "while its output was relayed from the cluster; it runs on, and a retry of the id gets its result");
                return;
            }
        };
        let msg = match next {
            // Nothing for a while: the claim says whether a result is recorded whose
            // end message was lost (its worker died between the two).
            Err(_) => match cluster.read(key).await {
                Ok(Some((
                    Claim {
                        state:
                            State::Finished {
                                attempt: a,
                                trailer,
                                ..
                            },
                        ..
                    },
                    _,
                ))) if a == attempt && trailer.output_bytes == sent => break trailer,
                Ok(Some((
                    Claim {
                        state: State::Finished { attempt: a, .. },
                        ..
                    },
                    _,
                ))) if a == attempt && rereads < MAX_REREADS => {
                    // Recorded, but output is missing here: the reader lost messages
                    // while a NATS node went away. Read again from the start.
                    rereads += 1;
                    messages = None;
                    continue;
                }
                Ok(Some(_)) => continue,
                Ok(None) => {
                    let message = format!("task `{task}`: its claim expired from the cluster store before a result was recorded; retry the task id");
                    return fail(ts, tally, ErrorCode::Internal, message).await;
                }
                Err(e) => return unavailable_accepted(ts, tally, &e).await,
            },
            Ok(None) => {
                let e = crate::cluster::StoreError::new("read task results", "the reader ended");
                return unavailable_accepted(ts, tally, &e).await;
            }
            Ok(Some(Err(e))) => {
                // The reader broke (a NATS node went away mid-read): read again from
                // the start; chunks already sent are skipped by their offsets.
                rereads += 1;
                let e = crate::cluster::StoreError::new("read task results", e);
                if rereads > MAX_REREADS {
                    return unavailable_accepted(ts, tally, &e).await;
                }
                warn!(agent, task, id, error = %e, "reading the task's output again");
                messages = None;
                continue;
            }
            Ok(Some(Ok(msg))) => msg,
        };
        let Some(a) = claim::attempt_of(&msg.subject) else {
            continue;
        };
        if sent == 0 && !confirmed {
            // Before the first byte goes out, ask the claim which attempt holds the
            // task now: a worker that went silent and came back must not be relayed.
            confirmed = true;
            match cluster.read(key).await {
                Ok(Some((now, _))) => attempt = attempt.max(now.first_attempt()),
                Ok(None) => {}
                Err(e) => return unavailable_accepted(ts, tally, &e).await,
            }
        }
        if a < attempt {
            continue;
        }
        if a > attempt {
            if sent > 0 {
                info!(agent, task, id, attempt, "the task's worker went silent mid-output and another replica took it over; the output sent so far cannot be continued");
                let message = format!("task `{task}`: its run was taken over by another replica after part of its output was sent; retry the task id for the whole result");
                return fail(ts, tally, ErrorCode::Internal, message).await;
            }
            attempt = a;
        }
        let header = |name: &str| {
            msg.headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_string())
        };
        match header(claim::KIND).as_deref() {
            Some("out") => {
                let offset = header(claim::OFFSET).and_then(|o| o.parse::<u64>().ok());
                match offset {
                    Some(o) if o == sent => {}
                    Some(o) if o < sent => continue,
                    // The live subscription missed a message: read the stored ones.
                    Some(_) if live => {
                        messages = None;
                        continue;
                    }
                    _ => {
                        let message = format!("task `{task}`: its output is no longer whole in the cluster's results store ([cluster] max_result_store); submit it again under a new id");
                        return fail(ts, tally, ErrorCode::Internal, message).await;
                    }
                }
                sent += msg.payload.len() as u64;
                if ts.reply.write_data(msg.payload.clone()).await.is_err() {
                    info!(agent, task, id, "agent went away while the task's output was relayed; a retry of the id gets its result");
                    tally.outcome = "agent_gone";
                    return;
                }
            }
            Some("end") => match serde_json::from_slice::<End>(&msg.payload) {
                Ok(end) if end.trailer.output_bytes == sent || end.trailer.error.is_some() => {
                    break end.trailer
                }
                Ok(_) if live => {
                    messages = None;
                    continue;
                }
                Ok(_) | Err(_) => {
                    let message = format!("task `{task}`: its output is no longer whole in the cluster's results store; submit it again under a new id");
                    return fail(ts, tally, ErrorCode::Internal, message).await;
                }
            },
            _ => continue,
        }
    };
    tally.outcome = if deduplicated {
        "deduplicated"
    } else {
        outcome_label(&trailer)
    };
    tally.record();
    ts.reply.end(&trailer).await;
}
