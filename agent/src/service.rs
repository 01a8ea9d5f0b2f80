//! `updraft-agent serve`: wires the catalog, the local executor, the uplink to the
//! daemons, placement and the local API, and owns shutdown.
//!
//! [`Agent::submit`] is the one path every task takes: admit against the catalog,
//! decide placement, run on the board or offload (falling back to the board when the
//! cloud fails before the task starts), record the decision.

use crate::config::AgentConfig;
use crate::journal::{self, Finish, Journal, JournalInput, NewTask, TaskRow};
use crate::knowledge::Knowledge;
use crate::placement::{Placement, ReasonKind, Side, Where};
use crate::spool::Spool;
use crate::uplink::{offload, OffloadError, OnDrop, Replay, Uplink};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use updraft_shared::catalog::{Caller, Catalog};
use updraft_shared::exec::{Executor, Input};
use updraft_shared::metrics;
use updraft_shared::protocol::{ErrorCode, RequestHeader};
use updraft_shared::tls::Identity;

/// Retries of one task after its connection died mid-run, before it fails: enough to
/// ride out a daemon dying and the next one failing over too, few enough that a task
/// that brings daemons down is not passed around forever.
pub const MAX_MID_TASK_RETRIES: usize = 3;
/// Decisions kept for `status`.
pub const RECENT_DECISIONS: usize = 50;
/// Runs of one detached task lost mid-run before it is failed with `cloud_failed`: a
/// task that keeps losing its daemon must not be passed around forever.
pub const MAX_DETACHED_RETRIES: u32 = 10;
/// The journal of detached tasks, in `state_dir`.
pub const JOURNAL_FILE: &str = "journal.db";
/// How often a detached task that may only run in the cloud re-checks for a daemon
/// while none is usable (it is also woken as soon as one connects).
pub const DETACHED_CLOUD_POLL: Duration = Duration::from_secs(5);
/// How often finished detached tasks past their time-to-live are dropped.
pub const EXPIRE_EVERY: Duration = Duration::from_secs(60);
/// How often a failure that could not be written to the journal (a full disk) is
/// tried again.
pub const UNSTORED_RETRY_EVERY: Duration = Duration::from_secs(5);

/// A request to run a task.
#[derive(Debug, Clone, Default)]
pub struct Submission {
    /// Catalog name.
    pub task: String,
    /// Extra arguments.
    pub args: Vec<String>,
    /// Requested side.
    pub where_: Where,
    /// Input length when known.
    pub input_len: Option<u64>,
}

/// A refusal or failure the submitter sees as one clear error.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, thiserror::Error)]
#[error("{message}")]
pub struct TaskError {
    /// Stable code (`unknown_task`, `cloud_unavailable`, `timed_out`, ...).
    pub code: String,
    /// What happened and what to do.
    pub message: String,
}

impl TaskError {
    fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
        }
    }

    /// The HTTP status that fits the code.
    pub fn http_status(&self) -> u16 {
        match self.code.as_str() {
            "unknown_task" | "not_found" => 404,
            "not_allowed" => 403,
            "bad_request" => 400,
            "too_large" => 413,
            "busy" | "cloud_unavailable" | "draining" => 503,
            "journal_full" | "storage_full" => 507,
            "timed_out" => 504,
            "not_ready" => 409,
            "cloud_failed" | "output_too_large" => 502,
            _ => 500,
        }
    }
}

/// How a placed task ended.
#[derive(Debug)]
pub struct Finished {
    /// Task id.
    pub id: String,
    /// Where it ran.
    pub side: Side,
    /// Why there.
    pub reason: String,
    /// The exit code, or why there is none.
    pub result: Result<Exit, TaskError>,
    /// The output (possibly partial when `result` is an error).
    pub output: Spool,
}

/// A run that ended in an exit code.
#[derive(Debug, Clone)]
pub struct Exit {
    /// Exit code.
    pub code: i32,
    /// Last bytes of stderr.
    pub stderr_tail: String,
}

/// One decision, for `status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Decision {
    /// Task id.
    pub id: String,
    /// Task name.
    pub task: String,
    /// Side.
    pub placement: Side,
    /// Reason kind.
    pub kind: ReasonKind,
    /// Reason text.
    pub reason: String,
    /// `exit N` or an error code.
    pub outcome: String,
    /// Wall time, milliseconds.
    pub elapsed_ms: u64,
    /// When it finished, Unix milliseconds.
    pub at_unix_ms: u64,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
struct Counters {
    /// (placement, reason kind) → count
    decisions: BTreeMap<(&'static str, &'static str), u64>,
}

/// The running agent: everything the API needs.
#[derive(Debug)]
pub struct Agent {
    agent_id: String,
    config: AgentConfig,
    catalog: Catalog,
    executor: Executor,
    uplink: Uplink,
    knowledge: Knowledge,
    /// Link probes (`None` with `[link] probe = false`).
    prober: Option<crate::probe::Prober>,
    started: Instant,
    recent: Mutex<VecDeque<Decision>>,
    counters: Mutex<Counters>,
    /// Finished tasks by placement, task and outcome, with latency histograms.
    task_stats: updraft_shared::metrics::TaskStats,
    /// Detached tasks: accepted, running and finished.
    journal: Arc<Journal>,
    /// Ids of detached tasks to run, to the dispatcher ([`run`]).
    detached_tx: tokio::sync::mpsc::UnboundedSender<String>,
    detached_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<String>>>,
    /// Woken whenever a detached task finishes.
    detached_done: tokio::sync::Notify,
    /// Detached tasks that ended while even their failure could not be written to the
    /// journal (a full disk): shown from here, and written when the journal can take
    /// them ([`Agent::store_unstored`]).
    unstored: Mutex<HashMap<String, TaskRow>>,
    /// Where the certificate lives, and when the one in use is valid.
    cert_files: crate::enroll::CertFiles,
    cert_validity: Mutex<(SystemTime, SystemTime)>,
    /// When the certificate in use was loaded or renewed.
    cert_since: Mutex<SystemTime>,
}

impl Agent {
    /// Builds the agent from its config and TLS identity. Nothing connects yet.
    pub fn new(config: AgentConfig, identity: &Identity) -> anyhow::Result<Arc<Self>> {
        let cert_id = updraft_shared::tls::agent_id_of(&identity.chain[0])?;
        let cert_validity = updraft_shared::tls::validity_of(&identity.chain[0])?;
        let agent_id = match &config.agent_id {
            Some(id) if *id != cert_id => {
                anyhow::bail!(
                    "agent_id `{id}` in the config does not match the certificate's `{cert_id}`; fix agent_id or issue a certificate for `{id}`"
                )
            }
            _ => cert_id,
        };
        let work = config.state_dir.join("work");
        let swept = updraft_shared::exec::sweep_work_root(&work).map_err(|e| {
            anyhow::anyhow!(
                "cannot prepare {}: {e} (check state_dir in agent.toml)",
                work.display()
            )
        })?;
        if swept > 0 {
            tracing::info!(dir = %work.display(), "removed {swept} task working directories left by an earlier run");
        }
        let uplink = Uplink::new(identity, config.clouds.clone(), config.link.clone())?;
        let knowledge = Knowledge::load(&config)?;
        let journal = Arc::new(Journal::open(
            config.state_dir.join(JOURNAL_FILE),
            config.journal.limits,
        )?);
        let (detached_tx, detached_rx) = tokio::sync::mpsc::unbounded_channel();
        let cert_files = crate::enroll::CertFiles::of(&config);
        Ok(Arc::new(Self {
            knowledge,
            prober: crate::probe::Prober::new(&config.link),
            agent_id,
            catalog: config.catalog.clone(),
            executor: Executor::new(config.max_local_concurrency, config.max_local_queue, work),
            uplink,
            config,
            started: Instant::now(),
            recent: Mutex::new(VecDeque::new()),
            counters: Mutex::default(),
            task_stats: Default::default(),
            journal,
            detached_tx,
            detached_rx: Mutex::new(Some(detached_rx)),
            detached_done: tokio::sync::Notify::new(),
            unstored: Mutex::default(),
            cert_files,
            cert_validity: Mutex::new(cert_validity),
            cert_since: Mutex::new(SystemTime::now()),
        }))
    }

    /// The agent id (from the certificate).
    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }

    /// Signals, policy and estimates.
    pub fn knowledge(&self) -> &Knowledge {
        &self.knowledge
    }

    /// Where a task would run now, and why, without running it (`policy explain`).
    pub fn explain(
        &self,
        task: &str,
        where_: Where,
        input_bytes: Option<u64>,
    ) -> Result<serde_json::Value, TaskError> {
        let spec = self.catalog.get(task).ok_or_else(|| {
            TaskError::new(
                "unknown_task",
                format!("unknown task `{task}`: there is no [tasks.{task}] in the config"),
            )
        })?;
        let chosen = self.uplink.pick();
        let d = self.knowledge.place(
            spec,
            where_,
            chosen.as_ref(),
            self.executor.load(),
            input_bytes,
        );
        let prediction = d.placement.prediction.as_ref().map(|p| {
            serde_json::json!({
                "choice": p.choice.as_str(),
                "explore": p.explore,
                "local_ms": p.local.finish.as_secs_f64() * 1000.0,
                "cloud_ms": p.cloud.map(|c| c.finish.as_secs_f64() * 1000.0),
            })
        });
        Ok(serde_json::json!({
            "task": task,
            "placement": d.placement.side,
            "kind": d.placement.kind,
            "reason": d.placement.reason,
            "forced": d.placement.forced,
            "prediction": prediction,
            "signals": signals_json(&d.signals),
        }))
    }

    /// The uplink to the daemons.
    pub fn uplink(&self) -> &Uplink {
        &self.uplink
    }

    /// The configuration in force.
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    fn new_spool(&self) -> Spool {
        Spool::new(
            self.config.state_dir.join("spool"),
            self.config.spool_memory,
        )
    }

    /// Runs one task to the end: admit, place, run or offload, record.
    pub async fn submit<I: Input>(&self, sub: Submission, input: I) -> Result<Finished, TaskError> {
        let id = new_task_id();
        // Dropped when its submitter goes away: an offloaded run is cancelled then.
        self.submit_with_id(id, sub, input, OnDrop::Cancel).await
    }

    /// Runs task `id`; `on_drop` says what a daemon running it is told if this future
    /// is dropped before it ends.
    async fn submit_with_id<I: Input>(
        &self,
        id: String,
        sub: Submission,
        input: I,
        on_drop: OnDrop,
    ) -> Result<Finished, TaskError> {
        let started = Instant::now();
        let task = self
            .catalog
            .admit(&sub.task, sub.args.clone(), sub.input_len, Caller::Local)
            .map_err(|r| TaskError::new(r.code.as_str(), r.message))?
            .with_task_id(&id);
        let mut input = Some(Replay::fresh(input));
        // Why earlier attempts of this task were lost mid-run, for the reason text.
        let mut lost: Vec<String> = Vec::new();
        // The daemon the last attempt was lost on: it may still run (or have finished)
        // that attempt, and only it can answer the retry without a second run.
        let mut lost_on: Option<String> = None;
        // A daemon that went silent during the last attempt (its connection open, no
        // load report since the attempt began): likely dead, so not tried again at once.
        let mut avoid: Option<String> = None;
        let (placed, decided, result, output) = loop {
            let mut chosen = None;
            if let Some(address) = &lost_on {
                // Give it `failover_wait` to come back (a blip of the board's own link)
                // before the task moves to another daemon or the board.
                chosen = self
                    .uplink
                    .wait_for(address, self.config.link.failover_wait)
                    .await;
            }
            let back_on_same = chosen.is_some();
            if chosen.is_none() {
                chosen = self.uplink.pick_avoiding(avoid.as_deref());
            }
            let decided = self.knowledge.place(
                task.spec(),
                sub.where_,
                chosen.as_ref(),
                self.executor.load(),
                sub.input_len,
            );
            let mut placed = decided.placement.clone();
            if back_on_same && placed.side == Side::Local && !placed.forced {
                placed.side = Side::Cloud;
                placed.reason = format!(
                    "{}, but the daemon that may hold its first run is back",
                    placed.reason
                );
            }
            if !lost.is_empty() {
                placed.reason = format!("{}; retried: {}", losses(&lost), placed.reason);
            }
            let forced = placed.forced;
            let mut output = self.new_spool();
            let mut result = None;
            if placed.side == Side::Cloud {
                match chosen {
                    None if forced => {
                        let why = self.why_no_cloud(avoid.as_deref());
                        let code = if lost.is_empty() {
                            "cloud_unavailable"
                        } else {
                            "cloud_failed"
                        };
                        return Err(TaskError::new(
                            code,
                            format!(
                                "task `{}` must run in the cloud ({}) but {why}",
                                sub.task, placed.reason
                            ),
                        ));
                    }
                    None => {
                        // decide() only picks cloud for auto when one was usable; it may have
                        // gone in between.
                        placed.side = Side::Local;
                        placed.kind = ReasonKind::Fallback;
                        placed.reason = format!(
                            "{}; then {}; ran on the board",
                            placed.reason,
                            self.why_no_cloud(avoid.as_deref())
                        );
                    }
                    Some(c) => {
                        let header = RequestHeader {
                            id: id.clone(),
                            task: sub.task.clone(),
                            args: sub.args.clone(),
                            input_len: sub.input_len,
                        };
                        let sent = input.take().expect("input is unspent before the offload");
                        let _inflight = c.link.begin();
                        if !placed.reason.contains(c.link.address()) {
                            placed.reason =
                                format!("{}; daemon {}", placed.reason, c.link.address());
                        }
                        let offload_started = Instant::now();
                        match offload(
                            &c.conn,
                            &header,
                            sent,
                            &mut output,
                            &self.config.link,
                            on_drop,
                        )
                        .await
                        {
                            Ok(trailer) => {
                                if trailer.exit_code.is_some() {
                                    self.knowledge.record_cloud(
                                        &sub.task,
                                        c.link.address(),
                                        offload_started.elapsed(),
                                        Some(c.conn.rtt()),
                                        &trailer,
                                    );
                                }
                                result = Some(match (trailer.exit_code, trailer.error) {
                                    (Some(code), None) => Ok(Exit {
                                        code,
                                        stderr_tail: trailer.stderr_tail,
                                    }),
                                    (_, Some(e)) => {
                                        Err(TaskError::new(e.as_str(), trailer.message))
                                    }
                                    (None, None) => Err(TaskError::new(
                                        "cloud_failed",
                                        "daemon sent a trailer with neither exit code nor error",
                                    )),
                                });
                            }
                            Err(OffloadError::NotStarted {
                                code,
                                reason: why,
                                input: back,
                            }) => {
                                let daemon = c.link.address();
                                if forced {
                                    let code = code.map_or("cloud_unavailable".to_string(), |c| {
                                        remote_code(c).to_string()
                                    });
                                    return Err(TaskError::new(
                                        code,
                                        format!(
                                            "daemon {daemon} did not run task `{}`: {why}",
                                            sub.task
                                        ),
                                    ));
                                }
                                warn!(
                                    task = sub.task,
                                    id,
                                    daemon,
                                    "cloud did not take the task ({why}); running it on the board"
                                );
                                placed.side = Side::Local;
                                placed.kind = ReasonKind::Fallback;
                                let prefix = if lost.is_empty() {
                                    String::new()
                                } else {
                                    format!("{}; ", losses(&lost))
                                };
                                placed.reason = match code {
                                    Some(code) => format!("{prefix}daemon {daemon} refused the task ({code}: {why}); ran on the board"),
                                    None => format!("{prefix}cloud failed before the task started (daemon {daemon}: {why}); ran on the board"),
                                };
                                input = Some(back);
                            }
                            Err(OffloadError::Failed {
                                reason: why,
                                input: Some(back),
                            }) if lost.len() < MAX_MID_TASK_RETRIES => {
                                warn!(
                                    task = sub.task,
                                    id,
                                    daemon = c.link.address(),
                                    "task lost mid-run ({why}); retrying it with the same id"
                                );
                                lost.push(format!(
                                    "daemon {} lost the task mid-run ({why})",
                                    c.link.address()
                                ));
                                let address = c.link.address().to_string();
                                if c.conn.close_reason().is_none()
                                    && !c.link.heard_since(offload_started)
                                {
                                    (lost_on, avoid) = (None, Some(address));
                                } else {
                                    (lost_on, avoid) = (Some(address), None);
                                }
                                input = Some(back);
                                continue;
                            }
                            Err(OffloadError::Failed {
                                reason: why,
                                input: Some(back),
                            }) if !forced => {
                                let daemon = c.link.address();
                                warn!(
                                    task = sub.task,
                                    id,
                                    daemon,
                                    "task lost mid-run again ({why}); running it on the board"
                                );
                                placed.side = Side::Local;
                                placed.kind = ReasonKind::Fallback;
                                placed.reason = format!(
                                    "{}; daemon {daemon} lost the task mid-run ({why}); ran on the board",
                                    losses(&lost)
                                );
                                // What the lost run sent back is not this run's output.
                                output = self.new_spool();
                                input = Some(back);
                            }
                            Err(OffloadError::Failed { reason: why, input }) => {
                                let why = if input.is_none() && !lost.is_empty() {
                                    format!("{why}; earlier: {}", losses(&lost))
                                } else {
                                    why
                                };
                                result = Some(Err(TaskError::new(
                                    "cloud_failed",
                                    format!(
                                        "task `{}` failed in the cloud (daemon {}): {why}",
                                        sub.task,
                                        c.link.address()
                                    ),
                                )));
                            }
                        }
                    }
                }
            }
            break (placed, decided, result, output);
        };
        let mut output = output;
        let result = match result {
            Some(r) => r,
            None => match self
                .executor
                .run(
                    &task,
                    input.take().expect("input is unspent when running locally"),
                    &mut output,
                )
                .await
            {
                Ok(o) => {
                    self.knowledge.record_local(
                        &sub.task,
                        o.run_time,
                        decided.cpu_share,
                        o.input_bytes,
                        o.output_bytes,
                    );
                    Ok(Exit {
                        code: o.exit_code,
                        stderr_tail: String::from_utf8_lossy(&o.stderr_tail).into_owned(),
                    })
                }
                Err(e) => Err(TaskError::new(
                    e.code().as_str(),
                    format!("task `{}`: {e}", sub.task),
                )),
            },
        };
        output
            .flush()
            .await
            .map_err(|e| spool_error("spooling output", &e))?;
        self.record(&id, &sub.task, &placed, &result, started.elapsed());
        Ok(Finished {
            id,
            side: placed.side,
            reason: placed.reason,
            result,
            output,
        })
    }

    /// Why no daemon can take a task now; `avoided` is one left out because it went
    /// silent during the task's last attempt.
    fn why_no_cloud(&self, avoided: Option<&str>) -> String {
        let status = self.uplink.status();
        if status.is_empty() {
            return "no [[cloud]] daemon is configured".into();
        }
        let parts: Vec<String> = status
            .iter()
            .map(|s| {
                let state = if Some(s.address.as_str()) == avoided {
                    "silent since the last attempt began".to_string()
                } else if s.connected && s.draining {
                    "draining".to_string()
                } else if s.connected {
                    "connected".to_string()
                } else {
                    s.last_error
                        .clone()
                        .unwrap_or_else(|| "not connected yet".into())
                };
                format!("{}: {state}", s.address)
            })
            .collect();
        format!("no daemon is usable ({})", parts.join("; "))
    }

    fn record(
        &self,
        id: &str,
        task: &str,
        placed: &Placement,
        result: &Result<Exit, TaskError>,
        elapsed: Duration,
    ) {
        let (side, kind, reason) = (placed.side, placed.kind, placed.reason.as_str());
        let outcome = match result {
            Ok(e) if e.code == 0 => "ok".to_string(),
            Ok(e) => format!("exit {}", e.code),
            Err(e) => e.code.clone(),
        };
        info!(
            id,
            task,
            placement = side.as_str(),
            reason,
            outcome,
            elapsed_ms = elapsed.as_millis() as u64,
            "task finished"
        );
        {
            let mut c = self.counters.lock().expect("counters lock");
            let outcome_label = match result {
                Ok(e) if e.code == 0 => "ok",
                Ok(_) => "exit_nonzero",
                Err(e) => e.code.as_str(),
            };
            // Only catalog names become labels, so the series stay bounded.
            let label = if self.catalog.get(task).is_some() {
                task
            } else {
                "other"
            };
            self.task_stats
                .record(side.as_str(), label, outcome_label, elapsed);
            *c.decisions
                .entry((side.as_str(), kind.as_str()))
                .or_default() += 1;
        }
        let mut r = self.recent.lock().expect("recent lock");
        if r.len() == RECENT_DECISIONS {
            r.pop_front();
        }
        r.push_back(Decision {
            id: id.to_string(),
            task: task.to_string(),
            placement: side,
            kind,
            reason: reason.to_string(),
            outcome,
            elapsed_ms: elapsed.as_millis() as u64,
            at_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        });
    }

    /// Accepts a detached task: admits it, spools its input, and stores both in the
    /// journal with a durable commit; only then is the id returned (and the 202 sent),
    /// so an accepted task survives a crash. It runs in the background
    /// ([`Agent::run_detached`]).
    pub async fn submit_detached<I: Input>(
        self: &Arc<Self>,
        sub: Submission,
        mut input: I,
    ) -> Result<String, TaskError> {
        // Check admission before spooling so a bad request costs nothing.
        let task = self
            .catalog
            .admit(&sub.task, sub.args.clone(), sub.input_len, Caller::Local)
            .map_err(|r| TaskError::new(r.code.as_str(), r.message))?;
        let max = task.spec().max_input;
        let mut spool = self.new_spool();
        use updraft_shared::exec::Output;
        while let Some(chunk) = input
            .next_chunk()
            .await
            .map_err(|e| TaskError::new("bad_request", format!("reading input: {e}")))?
        {
            if spool.len() + chunk.len() as u64 > max {
                return Err(TaskError::new(
                    "too_large",
                    format!(
                        "input is over task `{}`'s max_input of {max} bytes",
                        sub.task
                    ),
                ));
            }
            spool
                .write(chunk)
                .await
                .map_err(|e| spool_error("spooling input", &e))?;
        }
        spool
            .flush()
            .await
            .map_err(|e| spool_error("spooling input", &e))?;
        let id = new_task_id();
        let new = NewTask {
            id: id.clone(),
            task: sub.task.clone(),
            args: sub.args.clone(),
            requested: sub.where_,
        };
        let len = spool.len();
        let journal = self.journal.clone();
        tokio::task::spawn_blocking(move || {
            let mut reader = spool
                .into_blocking_reader()
                .map_err(|e| TaskError::new("internal", format!("reading spooled input: {e}")))?;
            journal
                .insert(&new, len, &mut reader, unix_ms())
                .map_err(journal_error)
        })
        .await
        .map_err(|e| TaskError::new("internal", format!("storing the task: {e}")))??;
        info!(
            id,
            task = sub.task,
            input_bytes = len,
            "detached task accepted"
        );
        let _ = self.detached_tx.send(id.clone());
        Ok(id)
    }

    /// Runs a journaled task to its end and stores the result: waits for the cloud
    /// first when the task may only run there, retries it (same id) when it is lost
    /// mid-run with an input too large to replay from memory.
    async fn run_detached(self: &Arc<Self>, id: String, resumed: bool, stop: &CancellationToken) {
        let Some(row) = self
            .journal_call(|j, id| j.get(id), &id)
            .await
            .ok()
            .flatten()
        else {
            return;
        };
        if row.state.is_finished() {
            return;
        }
        let fail = |code: &str, message: String| Finish {
            state: journal::Outcome::Failed,
            placement: Side::Local,
            reason: "not run".into(),
            exit_code: None,
            error: Some((code.to_string(), message)),
            stderr_tail: String::new(),
        };
        if resumed
            && row.state == journal::State::Running
            && row.attempts >= self.config.journal.max_attempts
        {
            let message = format!(
                "task `{}` was started {} times and never finished (the agent stopped or crashed each time); not starting it again (raise [journal] max_attempts to allow more)",
                row.task, row.attempts
            );
            warn!(id, task = row.task, "{message}");
            self.store_result(&row, fail("crash_loop", message), None)
                .await;
            return;
        }
        let Some(spec) = self.catalog.get(&row.task) else {
            let message = format!(
                "unknown task `{}`: there is no [tasks.{}] in the config any more",
                row.task, row.task
            );
            self.store_result(&row, fail("unknown_task", message), None)
                .await;
            return;
        };
        let must_cloud = row.requested == Where::Cloud
            || (row.requested == Where::Auto
                && spec.offload == updraft_shared::catalog::Offload::Always);
        let sub = Submission {
            task: row.task.clone(),
            args: row.args.clone(),
            where_: row.requested,
            input_len: Some(row.input_len),
        };
        let mut lost_runs = 0;
        loop {
            if must_cloud && self.uplink.pick().is_none() {
                debug!(id, task = row.task, "detached task waits for a daemon");
                tokio::select! {
                    _ = self.uplink.wait_usable(DETACHED_CLOUD_POLL) => continue,
                    () = stop.cancelled() => return,
                }
            }
            if let Err(e) = self.journal_call(|j, id| j.start(id, unix_ms()), &id).await {
                warn!(id, error = %e, "cannot mark the detached task running; failing it");
                let message = format!("task `{}` was not started: {}", row.task, e.message);
                self.store_result(&row, fail(&e.code, message), None).await;
                return;
            }
            let input = JournalInput::new(self.journal.clone(), id.clone());
            let r = tokio::select! {
                // Never cancelled on the daemon: after a restart the journal runs it
                // again with the same id, and the daemon may answer from that run.
                r = self.submit_with_id(id.clone(), sub.clone(), input, OnDrop::Leave) => r,
                // The journal still says running: the next start resumes it.
                () = stop.cancelled() => return,
            };
            match r {
                Err(e)
                    if must_cloud
                        && matches!(
                            e.code.as_str(),
                            "cloud_unavailable" | "cloud_failed" | "busy" | "draining"
                        ) =>
                {
                    info!(id, task = row.task, error = %e.message, "detached task waits for the cloud and will be retried");
                    let _ = self.journal_call(|j, id| j.requeue(id), &id).await;
                    tokio::select! {
                        () = tokio::time::sleep(self.config.link.reconnect_min) => continue,
                        () = stop.cancelled() => return,
                    }
                }
                Ok(f)
                    if lost_runs < MAX_DETACHED_RETRIES
                        && matches!(&f.result, Err(e) if e.code == "cloud_failed") =>
                {
                    lost_runs += 1;
                    // Lost mid-run and not replayable from memory: the journal has the
                    // whole input, so run it again from there (the daemon answers a
                    // retry it still remembers from its memory).
                    info!(id, task = row.task, reason = %f.reason, "detached task lost mid-run; retrying from the journal");
                    continue;
                }
                Err(e) => {
                    self.store_result(&row, fail(&e.code, e.message), None)
                        .await;
                    return;
                }
                Ok(f) if f.output.disk_full() => {
                    let message = format!(
                        "task `{}`: its output could not be spooled in {}: the filesystem is full; free space there (the task is not run again)",
                        row.task,
                        self.config.state_dir.join("spool").display()
                    );
                    let fin = Finish {
                        placement: f.side,
                        reason: f.reason,
                        ..fail("storage_full", message)
                    };
                    self.store_result(&row, fin, None).await;
                    return;
                }
                Ok(f) => {
                    let fin = Finish {
                        state: if f.result.is_ok() {
                            journal::Outcome::Done
                        } else {
                            journal::Outcome::Failed
                        },
                        placement: f.side,
                        reason: f.reason,
                        exit_code: f.result.as_ref().ok().map(|e| e.code),
                        error: f
                            .result
                            .as_ref()
                            .err()
                            .map(|e| (e.code.clone(), e.message.clone())),
                        stderr_tail: match &f.result {
                            Ok(e) => e.stderr_tail.clone(),
                            Err(_) => String::new(),
                        },
                    };
                    self.store_result(&row, fin, Some(f.output)).await;
                    return;
                }
            }
        }
    }

    /// Stores how a detached task ended, with its output, and wakes its waiters. When
    /// that fails (a full disk, most likely), the task is stored as failed without its
    /// output (`storage_full` or `internal`); when even that fails, the failure is kept
    /// in memory, shown from there, and written as soon as the journal takes it. Either
    /// way the task has ended: it is not run again in this process.
    async fn store_result(&self, row: &TaskRow, fin: Finish, output: Option<Spool>) {
        let journal = self.journal.clone();
        let id = row.id.clone();
        let task = row.task.clone();
        let stored =
            tokio::task::spawn_blocking(move || store_or_fail(&journal, &id, &task, fin, output))
                .await;
        let id = row.id.as_str();
        match stored {
            Ok(Stored::Output(journal::Stored::Output)) => {}
            Ok(Stored::Output(journal::Stored::JournalFull)) => {
                warn!(id, "the journal is full: the task's output was not kept (it is marked journal_full); fetch old results or raise [journal] max_bytes");
            }
            Ok(Stored::Failure(fin)) => {
                let (code, message) = fin.error.clone().unwrap_or_default();
                warn!(id, code, "{message}");
            }
            Ok(Stored::Gone(e)) => {
                warn!(id, error = %e, "the detached task's result was not stored")
            }
            Ok(Stored::Nowhere(fin, e)) => {
                let (code, message) = fin.error.clone().unwrap_or_default();
                tracing::error!(id, code, error = %e, "{message}; not even this failure could be written to the journal: it is kept in memory and written once there is room (if the agent restarts first, the task runs again)");
                // Its attempts as counted now, when the journal can still be read.
                let now = self.journal_call(|j, id| j.get(id), id).await;
                let failed = failed_row(&now.ok().flatten().unwrap_or_else(|| row.clone()), &fin);
                self.unstored
                    .lock()
                    .expect("unstored lock")
                    .insert(row.id.clone(), failed);
            }
            Err(e) => warn!(id, error = %e, "storing the detached task's result failed"),
        }
        self.detached_done.notify_waiters();
    }

    /// Writes the failures kept in memory (when even a failure could not be stored) to
    /// the journal, as many as it takes now.
    pub async fn store_unstored(&self) {
        let pending: Vec<TaskRow> = {
            let unstored = self.unstored.lock().expect("unstored lock");
            unstored.values().cloned().collect()
        };
        for row in pending {
            let journal = self.journal.clone();
            let fin = row_finish(&row);
            let id = row.id.clone();
            let r = tokio::task::spawn_blocking(move || {
                journal.finish(&id, &fin, 0, &mut std::io::empty(), unix_ms())
            })
            .await;
            let done = match r {
                Ok(Ok(_)) => {
                    info!(
                        id = row.id,
                        "the failure kept in memory is now written to the journal"
                    );
                    true
                }
                Ok(Err(
                    journal::JournalError::NotFound { .. }
                    | journal::JournalError::WrongState { .. },
                )) => true,
                _ => false,
            };
            if done {
                self.unstored.lock().expect("unstored lock").remove(&row.id);
            }
        }
    }

    async fn journal_call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Journal, &str) -> Result<T, journal::JournalError> + Send + 'static,
        id: &str,
    ) -> Result<T, TaskError> {
        let journal = self.journal.clone();
        let id = id.to_string();
        tokio::task::spawn_blocking(move || f(&journal, &id))
            .await
            .map_err(|e| TaskError::new("internal", format!("journal call failed: {e}")))?
            .map_err(journal_error)
    }

    /// A detached task's state; with `wait`, blocks until it has finished.
    pub async fn task_state(&self, id: &str, wait: bool) -> Result<Option<TaskRow>, TaskError> {
        if !valid_task_id(id) {
            return Ok(None);
        }
        loop {
            let notified = self.detached_done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(r) = self.unstored.lock().expect("unstored lock").get(id) {
                return Ok(Some(r.clone()));
            }
            let row = self.journal_call(|j, id| j.get(id), id).await?;
            match row {
                Some(r) if wait && !r.state.is_finished() => notified.await,
                other => return Ok(other),
            }
        }
    }

    /// A finished detached task's output, streamed from the journal; marks it fetched.
    pub async fn task_output(&self, id: &str) -> Result<(TaskRow, JournalInput), TaskError> {
        let row = self
            .task_state(id, false)
            .await?
            .ok_or_else(|| detached_not_found(id))?;
        if !row.state.is_finished() {
            return Err(TaskError::new(
                "not_ready",
                format!("task `{id}` is still {}", row.state),
            ));
        }
        if self
            .unstored
            .lock()
            .expect("unstored lock")
            .contains_key(id)
        {
            let (code, message) = row.error.unwrap_or_default();
            return Err(TaskError::new(code, message));
        }
        self.journal_call(|j, id| j.mark_fetched(id, unix_ms()), id)
            .await?;
        Ok((row, JournalInput::output(self.journal.clone(), id)))
    }

    /// Deletes a finished detached task and its output (`DELETE /v1/tasks/{id}`). A
    /// queued or running one is refused with `not_ready`: it is not cancelled.
    pub async fn delete_task(&self, id: &str) -> Result<(), TaskError> {
        if !valid_task_id(id) {
            return Err(detached_not_found(id));
        }
        // A failure kept in memory is a journal row still unfinished: write it first.
        self.store_unstored().await;
        if self
            .unstored
            .lock()
            .expect("unstored lock")
            .contains_key(id)
        {
            return Err(TaskError::new(
                "storage_full",
                format!("task `{id}` failed but even its failure could not be written to the journal yet (the filesystem holding state_dir is full); free space there and delete it again"),
            ));
        }
        let journal = self.journal.clone();
        let key = id.to_string();
        let r = tokio::task::spawn_blocking(move || journal.delete(&key))
            .await
            .map_err(|e| TaskError::new("internal", format!("deleting the task: {e}")))?;
        match r {
            Ok(()) => {
                info!(id, "detached task deleted");
                // Room for a failure still waiting to be written.
                self.store_unstored().await;
                Ok(())
            }
            Err(journal::JournalError::NotFound { .. }) => Err(detached_not_found(id)),
            Err(journal::JournalError::WrongState { state, .. }) => Err(TaskError::new(
                "not_ready",
                format!("task `{id}` is still {state}; only a finished task can be deleted (wait for it with ?wait=true)"),
            )),
            Err(e) => Err(journal_error(e)),
        }
    }

    /// The journal of detached tasks.
    pub fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }

    fn certificate_json(&self) -> serde_json::Value {
        let (_, not_after) = self.cert_validity();
        let now = SystemTime::now();
        let renew = self.renew_time();
        let unix = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        serde_json::json!({
            "path": self.cert_files.cert.display().to_string(),
            "not_after_unix": unix(not_after),
            "expires_in_s": not_after.duration_since(now).map_or(0, |d| d.as_secs()),
            "expired": now >= not_after,
            "renew_at_unix": unix(renew),
        })
    }

    /// When the certificate in use is due for renewal.
    fn renew_time(&self) -> SystemTime {
        let (not_before, not_after) = self.cert_validity();
        let since = *self.cert_since.lock().expect("cert lock");
        crate::enroll::renew_at(not_before, not_after, self.config.renew_before, since)
    }

    /// When the certificate in use starts and stops being valid.
    pub fn cert_validity(&self) -> (SystemTime, SystemTime) {
        *self.cert_validity.lock().expect("cert lock")
    }

    /// The agent's status as JSON.
    pub fn status_json(&self) -> serde_json::Value {
        let load = self.executor.load();
        serde_json::json!({
            "agent_id": self.agent_id,
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": self.started.elapsed().as_secs(),
            "local": { "running": load.running, "queued": load.queued, "capacity": load.capacity },
            "clouds": self.uplink.status(),
            "tasks": self.catalog.names().collect::<Vec<_>>(),
            "policy": self.knowledge.policy().status(),
            "signals": signals_json(&self.knowledge.signals(self.uplink.pick().as_ref(), load, None)),
            "estimates": self.knowledge.estimates_summary(),
            "journal": journal_json(&self.journal.usage()),
            "certificate": self.certificate_json(),
            "recent": self.recent.lock().expect("recent lock").iter().rev().collect::<Vec<_>>(),
        })
    }

    /// Prometheus text exposition of the agent's counters and gauges.
    pub fn metrics_text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        self.task_stats.render("updraft_agent", &mut out);
        let c = self.counters.lock().expect("counters lock");
        metrics::header(
            &mut out,
            "updraft_agent_decisions_total",
            "counter",
            "Placement decisions, by placement and reason kind.",
        );
        for ((p, k), n) in &c.decisions {
            let _ = writeln!(
                out,
                "updraft_agent_decisions_total{{placement=\"{p}\",reason=\"{k}\"}} {n}"
            );
        }
        let load = self.executor.load();
        metrics::gauge(
            &mut out,
            "updraft_agent_certificate_expiry_timestamp_seconds",
            "When the agent certificate in use expires, Unix seconds (renewed before).",
            self.cert_validity()
                .1
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        );
        metrics::gauge(
            &mut out,
            "updraft_agent_local_running",
            "Tasks running on the board.",
            load.running,
        );
        metrics::gauge(
            &mut out,
            "updraft_agent_local_queued",
            "Tasks waiting for a local slot.",
            load.queued,
        );
        let board = self.knowledge.board();
        let gauges = [
            (
                "updraft_agent_cpu_percent",
                "Busy CPU across all cores, smoothed, percent.",
                board.cpu_percent,
            ),
            (
                "updraft_agent_load_avg",
                "One-minute load average.",
                board.load_avg,
            ),
            (
                "updraft_agent_memory_available_mb",
                "Available memory, MiB.",
                board.memory_available_mb,
            ),
            (
                "updraft_agent_temperature_celsius",
                "Hottest thermal zone.",
                board.temperature_c,
            ),
            (
                "updraft_agent_battery_percent",
                "Combined battery charge.",
                board.power.battery_percent,
            ),
            (
                "updraft_agent_on_battery",
                "1 when running on battery.",
                board.power.on_battery.map(|b| f64::from(u8::from(b))),
            ),
        ];
        for (name, help, value) in gauges {
            // Absent signals (no battery, no thermal zone) are left out, not reported as 0.
            if let Some(v) = value {
                metrics::gauge(&mut out, name, help, v);
            }
        }
        journal_metrics(&mut out, &self.journal.usage());
        metrics::header(
            &mut out,
            "updraft_agent_cloud_connected",
            "gauge",
            "Whether each daemon is connected.",
        );
        for s in self.uplink.status() {
            let _ = writeln!(
                out,
                "updraft_agent_cloud_connected{{{}}} {}",
                metrics::labels(&[("daemon", &s.address)]),
                u8::from(s.connected)
            );
        }
        out
    }
}

/// How [`store_or_fail`] left a finished detached task.
enum Stored {
    /// As it ended, with its output (or as `journal_full`).
    Output(journal::Stored),
    /// Its result could not be stored; this failure was, instead.
    Failure(Finish),
    /// Nothing to store: the journal no longer holds it unfinished.
    Gone(journal::JournalError),
    /// Neither its result nor this failure could be stored (the second error).
    Nowhere(Finish, journal::JournalError),
}

/// Stores a finished detached task's result; when that fails, stores it as failed
/// (`storage_full` when the disk is full) without output instead. Blocking.
fn store_or_fail(
    journal: &Journal,
    id: &str,
    task: &str,
    fin: Finish,
    output: Option<Spool>,
) -> Stored {
    use journal::JournalError as E;
    let now = unix_ms();
    let r = match output {
        Some(spool) => {
            let len = spool.len();
            match spool.into_blocking_reader() {
                Ok(mut reader) => journal.finish(id, &fin, len, &mut reader, now),
                Err(source) => Err(E::Read {
                    path: journal.path().to_path_buf(),
                    id: id.to_string(),
                    what: "output",
                    source,
                }),
            }
        }
        None => journal.finish(id, &fin, 0, &mut std::io::empty(), now),
    };
    let e = match r {
        Ok(stored) => return Stored::Output(stored),
        Err(e @ (E::NotFound { .. } | E::WrongState { .. })) => return Stored::Gone(e),
        Err(e) => e,
    };
    let full = match &e {
        E::DiskFull { .. } => true,
        E::Read { source, .. } => crate::spool::is_disk_full(source),
        _ => false,
    };
    let code = if full { "storage_full" } else { "internal" };
    let mut message =
        format!("task `{task}` ended but its result could not be stored: {e}; it is not run again");
    if let Some((c, m)) = &fin.error {
        message.push_str(&format!("; the run itself failed: {c}: {m}"));
    }
    let failure = Finish {
        state: journal::Outcome::Failed,
        error: Some((code.to_string(), message)),
        ..fin
    };
    match journal.finish(id, &failure, 0, &mut std::io::empty(), now) {
        Ok(_) => Stored::Failure(failure),
        Err(e @ (E::NotFound { .. } | E::WrongState { .. })) => Stored::Gone(e),
        Err(e) => Stored::Nowhere(failure, e),
    }
}

/// A detached task as it ended, for a failure kept in memory.
fn failed_row(row: &TaskRow, fin: &Finish) -> TaskRow {
    TaskRow {
        state: fin.state.into(),
        finished_ms: Some(unix_ms()),
        placement: Some(fin.placement),
        reason: Some(fin.reason.clone()),
        exit_code: fin.exit_code,
        error: fin.error.clone(),
        stderr_tail: Some(fin.stderr_tail.clone()),
        output_len: Some(0),
        ..row.clone()
    }
}

/// The [`Finish`] a failure kept in memory is written with.
fn row_finish(row: &TaskRow) -> Finish {
    Finish {
        state: journal::Outcome::Failed,
        placement: row.placement.unwrap_or(Side::Local),
        reason: row.reason.clone().unwrap_or_default(),
        exit_code: row.exit_code,
        error: row.error.clone(),
        stderr_tail: row.stderr_tail.clone().unwrap_or_default(),
    }
}

/// The journal's figures for `status`.
/// The journal's gauges, for `/metrics`. Its figures are u64 on every target, so a
/// journal past 4 GiB shows as such on a 32-bit board too.
fn journal_metrics(out: &mut String, usage: &journal::Usage) {
    for (name, help, value) in [
        (
            "updraft_agent_journal_tasks",
            "Detached tasks held in the journal, finished or not.",
            usage.tasks,
        ),
        (
            "updraft_agent_journal_unfinished",
            "Detached tasks queued or running.",
            usage.unfinished,
        ),
        (
            "updraft_agent_journal_bytes",
            "Bytes the journal holds, against [journal] max_bytes.",
            usage.bytes,
        ),
        (
            "updraft_agent_journal_max_bytes",
            "[journal] max_bytes.",
            usage.max_bytes,
        ),
    ] {
        metrics::gauge(out, name, help, value);
    }
}

fn journal_json(u: &journal::Usage) -> serde_json::Value {
    serde_json::json!({
        "tasks": u.tasks,
        "unfinished": u.unfinished,
        "bytes": u.bytes,
        "max_bytes": u.max_bytes,
    })
}

/// The attempts of a task lost mid-run, for its reason: repeats said once, counted.
fn losses(lost: &[String]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < lost.len() {
        let n = lost[i..].iter().take_while(|l| **l == lost[i]).count();
        parts.push(if n > 1 {
            format!("{} ({n} times)", lost[i])
        } else {
            lost[i].clone()
        });
        i += n;
    }
    parts.join("; ")
}

/// A detached task as `GET /v1/tasks/{id}` shows it.
pub fn task_json(r: &TaskRow) -> serde_json::Value {
    serde_json::json!({
        "id": r.id,
        "task": r.task,
        "state": r.state.as_str(),
        "placement": r.placement.map(|p| p.as_str()),
        "reason": r.reason,
        "exit_code": r.exit_code,
        "error": r.error.as_ref().map(|(code, message)| serde_json::json!({"code": code, "message": message})),
        "output_bytes": r.output_len,
        "input_bytes": r.input_len,
        "attempts": r.attempts,
        "submitted_unix_ms": r.submitted_ms,
        "finished_unix_ms": r.finished_ms,
    })
}

/// Maps a daemon's refusal to the code the submitter sees.
fn remote_code(c: ErrorCode) -> &'static str {
    c.as_str()
}

/// Signals as JSON for `status` and `explain` (absent ones as null).
pub fn signals_json(s: &updraft_shared::policy::Signals) -> serde_json::Value {
    use updraft_shared::policy::{Signal, Value};
    let mut m = serde_json::Map::new();
    for sig in Signal::ALL {
        let v = match s.get(sig) {
            Some(Value::Number(n)) => serde_json::json!((n * 100.0).round() / 100.0),
            Some(Value::Bool(b)) => serde_json::json!(b),
            None => serde_json::Value::Null,
        };
        m.insert(sig.name().to_string(), v);
    }
    serde_json::Value::Object(m)
}

/// Now, in Unix milliseconds (the journal's clock).
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A journal failure as the submitter sees it.
fn journal_error(e: journal::JournalError) -> TaskError {
    let code = match e {
        journal::JournalError::Full { .. } => "journal_full",
        journal::JournalError::DiskFull { .. } => "storage_full",
        journal::JournalError::TooLarge { .. } => "too_large",
        _ => "internal",
    };
    TaskError::new(code, e.to_string())
}

/// A spool that could not be written: `storage_full` when the disk is.
fn spool_error(what: &str, e: &std::io::Error) -> TaskError {
    if crate::spool::is_disk_full(e) {
        TaskError::new(
            "storage_full",
            format!("{what}: {e}; the filesystem holding state_dir is full, free space there"),
        )
    } else {
        TaskError::new("internal", format!("{what}: {e}"))
    }
}

/// True for an id this agent could have made (32 lowercase hex digits).
fn valid_task_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The error for an id the journal does not hold.
pub fn detached_not_found(id: &str) -> TaskError {
    TaskError::new(
        "not_found",
        format!("no detached task `{id}` (finished tasks are kept for [journal] result_ttl, and for fetched_ttl after their output was fetched)"),
    )
}

/// A fresh task id: 32 hex digits.
pub fn new_task_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Runs the agent until `shutdown` resolves: connects to the daemons, serves the API
/// on `listener`, then stops taking requests and lets running ones finish.
pub async fn run(
    agent: Arc<Agent>,
    listener: tokio::net::UnixListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    agent.uplink.start(stop.clone());
    tokio::spawn(sample_loop(agent.clone(), stop.clone()));
    tokio::spawn(reload_on_sighup(agent.clone(), stop.clone()));
    tokio::spawn(rebind_on_sigusr1(agent.clone(), stop.clone()));
    tokio::spawn(renew_certificate(agent.clone(), stop.clone()));
    let detached = tokio_util::task::TaskTracker::new();
    tokio::spawn(dispatch_detached(
        agent.clone(),
        detached.clone(),
        stop.clone(),
    ));
    info!(
        agent = agent.agent_id(),
        socket = %agent.config.socket.display(),
        daemons = agent.config.clouds.len(),
        "updraft-agent serving"
    );
    updraft_shared::notify::ready(&format!(
        "serving on {}: agent {}, {} daemons configured",
        agent.config.socket.display(),
        agent.agent_id(),
        agent.config.clouds.len()
    ));
    updraft_shared::notify::spawn_watchdog();
    let served = crate::api::serve(agent.clone(), listener, shutdown).await;
    updraft_shared::notify::stopping("stopping: finishing the requests in progress");
    stop.cancel();
    // Detached runs stop where they are; the journal still has them, so the next start
    // resumes them.
    detached.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), detached.wait()).await;
    agent.store_unstored().await;
    let unstored = agent.unstored.lock().expect("unstored lock").len();
    if unstored > 0 {
        warn!(
            tasks = unstored,
            "failures of detached tasks could not be written to the journal (full disk); those tasks run again at the next start"
        );
    }
    agent.knowledge.persist();
    agent
        .uplink
        .endpoint()
        .close(0u32.into(), b"agent stopping");
    let _ = tokio::time::timeout(Duration::from_secs(2), agent.uplink.endpoint().wait_idle()).await;
    served
}

/// Binds the API socket ([`crate::api::bind_socket`]).
pub fn bind_socket(path: &std::path::Path) -> anyhow::Result<tokio::net::UnixListener> {
    crate::api::bind_socket(path)
}

/// Samples signals on one timer until shutdown.
async fn sample_loop(agent: Arc<Agent>, stop: CancellationToken) {
    let interval = agent.config.sample_interval;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                agent.knowledge.tick(&agent.uplink, agent.executor.load());
                probe_links(&agent);
            }
            () = stop.cancelled() => return,
        }
    }
}

/// Starts a link probe of each daemon whose link estimate needs one, as the prober
/// allows (`[link] probe`, `probe_budget`, `probe_bytes`).
fn probe_links(agent: &Arc<Agent>) {
    let Some(prober) = agent.prober.as_ref() else {
        return;
    };
    for (address, conn) in agent.uplink.connections() {
        let Some(why) = agent.knowledge.link_needs_probe(&address) else {
            continue;
        };
        let Some(ticket) = prober.begin(&address, conn.stable_id(), Instant::now()) else {
            continue;
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let result = crate::probe::probe(&conn, ticket.bytes, ticket.bytes).await;
            match &result {
                Ok(s) => {
                    let (up, down) = (s.up.bytes_per_sec(), s.down.bytes_per_sec());
                    let mbps = |r: Option<f64>| {
                        r.map_or("untimed".to_string(), |r| format!("{:.1} Mbit/s", r * 8e-6))
                    };
                    tracing::debug!(daemon = %address, why, up = %mbps(up), down = %mbps(down), "link probe");
                    agent.knowledge.record_probe(&address, up, down);
                }
                Err(crate::probe::ProbeError::Unsupported(_)) => {
                    info!(daemon = %address, "the daemon does not support link probes; the link is measured from task transfers only");
                }
                Err(e) => tracing::debug!(daemon = %address, "link probe: {e}"),
            }
            if let Some(prober) = agent.prober.as_ref() {
                prober.end(&address, conn.stable_id(), &result, Instant::now());
            }
        });
    }
}

/// Keeps the certificate valid: renews it over a live connection when it is due,
/// swaps it in for new connections, and says loudly what to run once it has expired.
async fn renew_certificate(agent: Arc<Agent>, stop: CancellationToken) {
    let mut failures = 0u32;
    loop {
        let (_, not_after) = agent.cert_validity();
        let now = SystemTime::now();
        let pause = if now >= not_after {
            let message = crate::enroll::expired_message(&agent.cert_files, not_after);
            tracing::error!("{message}");
            agent.uplink.set_note(Some(message));
            // Nothing to renew with; a new enrollment and a restart fix it.
            Duration::from_secs(3600)
        } else {
            let at = agent.renew_time();
            match at.duration_since(now) {
                // Sleep in bounded steps so a clock that jumps is noticed.
                Ok(wait) if !wait.is_zero() => wait.min(Duration::from_secs(3600)),
                _ => match renew_once(&agent).await {
                    Ok(()) => {
                        failures = 0;
                        continue;
                    }
                    Err(e) => {
                        failures += 1;
                        let left = not_after.duration_since(now).unwrap_or_default();
                        let pause = Duration::from_secs(1 << failures.min(8))
                            .min(Duration::from_secs(300))
                            .min(left / 4)
                            .max(Duration::from_millis(500));
                        warn!(error = %e, retry_in = ?pause, expires_in = ?left, "certificate renewal failed; trying again");
                        pause
                    }
                },
            }
        };
        debug!(next_check = ?pause, "certificate checked");
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// One renewal over the first daemon that does it.
async fn renew_once(agent: &Agent) -> anyhow::Result<()> {
    let connections = agent.uplink.connections();
    if connections.is_empty() {
        anyhow::bail!("no daemon is connected to renew with");
    }
    let mut last = None;
    for (daemon, conn) in connections {
        match crate::enroll::renew(&conn, &agent.cert_files, &agent.agent_id).await {
            Ok((identity, not_after)) => {
                agent.uplink.set_identity(&identity)?;
                *agent.cert_validity.lock().expect("cert lock") =
                    updraft_shared::tls::validity_of(&identity.chain[0])?;
                *agent.cert_since.lock().expect("cert lock") = SystemTime::now();
                agent.uplink.set_note(None);
                info!(
                    daemon,
                    valid_until = %humantime::format_rfc3339_seconds(not_after),
                    cert = %agent.cert_files.cert.display(),
                    "certificate renewed; tasks running keep their connections, new connections use the new certificate"
                );
                return Ok(());
            }
            Err(e) => last = Some(anyhow::anyhow!("{daemon}: {e:#}")),
        }
    }
    Err(last.expect("at least one connection was tried"))
}

/// Runs detached tasks: the journal's unfinished ones first (after a restart), then each
/// newly accepted one, at most `[journal] max_running` at once; drops expired results.
async fn dispatch_detached(
    agent: Arc<Agent>,
    tracker: tokio_util::task::TaskTracker,
    stop: CancellationToken,
) {
    let Some(mut rx) = agent.detached_rx.lock().expect("detached lock").take() else {
        return;
    };
    let journal = agent.journal.clone();
    let resumed = match tokio::task::spawn_blocking(move || journal.unfinished()).await {
        Ok(Ok(rows)) => rows,
        Ok(Err(e)) => {
            warn!(error = %e, "cannot list the journal's unfinished tasks; they run after the next restart");
            Vec::new()
        }
        Err(e) => {
            warn!(error = %e, "listing the journal's unfinished tasks failed");
            Vec::new()
        }
    };
    if !resumed.is_empty() {
        info!(
            tasks = resumed.len(),
            "resuming detached tasks from the journal"
        );
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(
        agent.config.journal.max_running,
    ));
    let mut resumed = resumed.into_iter().map(|r| r.id);
    let mut expire = tokio::time::interval(EXPIRE_EVERY);
    expire.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut unstored = tokio::time::interval(UNSTORED_RETRY_EVERY);
    unstored.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let (id, was_resumed) = match resumed.next() {
            Some(id) => (id, true),
            None => tokio::select! {
                id = rx.recv() => match id {
                    Some(id) => (id, false),
                    None => return,
                },
                _ = expire.tick() => {
                    let journal = agent.journal.clone();
                    match tokio::task::spawn_blocking(move || journal.expire(unix_ms())).await {
                        Ok(Ok(n)) if n > 0 => debug!(tasks = n, "expired finished detached tasks"),
                        Ok(Err(e)) => warn!(error = %e, "cannot drop expired results from the journal"),
                        _ => {}
                    }
                    continue;
                }
                _ = unstored.tick() => {
                    agent.store_unstored().await;
                    continue;
                }
                () = stop.cancelled() => return,
            },
        };
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            () = stop.cancelled() => return,
        };
        let (agent, stop) = (agent.clone(), stop.clone());
        tracker.spawn(async move {
            agent.run_detached(id, was_resumed, &stop).await;
            drop(permit);
        });
    }
}

/// Rebinds the QUIC socket on SIGUSR1, so connections migrate after a network change
/// (a new address, a changed interface) instead of timing out.
async fn rebind_on_sigusr1(agent: Arc<Agent>, stop: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut usr1) = signal(SignalKind::user_defined1()) else {
        warn!("cannot install a SIGUSR1 handler; connections reconnect after a network change instead of migrating");
        return;
    };
    loop {
        tokio::select! {
            _ = usr1.recv() => match agent.uplink.rebind() {
                Ok(addr) => info!(local = %addr, "SIGUSR1: rebound the QUIC socket; connections migrate to it"),
                Err(e) => warn!(error = %e, "SIGUSR1: cannot rebind the QUIC socket; connections stay on the old one"),
            },
            () = stop.cancelled() => return,
        }
    }
}

/// Reloads the policy on SIGHUP, and says what a changed agent.toml needs.
async fn reload_on_sighup(agent: Arc<Agent>, stop: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        warn!("cannot install a SIGHUP handler; the policy still reloads when its file changes");
        return;
    };
    loop {
        tokio::select! {
            _ = hup.recv() => {
                agent.knowledge.reload_policy("SIGHUP");
                crate::config::log_reread(&agent.config);
            }
            () = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{journal, journal_json, journal_metrics, losses};

    #[test]
    fn journal_figures_past_4_gib_show_whole() {
        // u64 end to end: a 32-bit board must not show 5 GiB as 1 GiB.
        let usage = journal::Usage {
            tasks: 3,
            unfinished: 1,
            bytes: (5 << 30) + 1,
            max_bytes: 6 << 30,
        };
        let mut out = String::new();
        journal_metrics(&mut out, &usage);
        for line in [
            "updraft_agent_journal_bytes 5368709121",
            "updraft_agent_journal_max_bytes 6442450944",
            "updraft_agent_journal_tasks 3",
        ] {
            assert!(out.lines().any(|l| l == line), "no `{line}` in {out}");
        }
        let json = journal_json(&usage);
        assert_eq!(json["bytes"].as_u64(), Some(5_368_709_121), "{json}");
        assert_eq!(json["max_bytes"].as_u64(), Some(6_442_450_944), "{json}");
    }

    #[test]
    fn losses_say_a_repeated_attempt_once_with_its_count() {
        let a = "daemon d1 lost the task mid-run (no answer)".to_string();
        let b = "daemon d2 lost the task mid-run (connection lost)".to_string();
        assert_eq!(losses(&[]), "");
        assert_eq!(losses(std::slice::from_ref(&a)), a);
        assert_eq!(
            losses(&[a.clone(), a.clone(), b.clone(), a.clone()]),
            format!("{a} (2 times); {b}; {a}")
        );
    }
}
