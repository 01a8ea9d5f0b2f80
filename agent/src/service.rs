//! `updraft-agent serve`: wires the catalog, the local executor, the uplink to the
//! daemons, placement and the local API, and owns shutdown.
//!
//! [`Agent::submit`] is the one path every task takes: admit against the catalog,
//! decide placement, run on the board or offload (falling back to the board when the
//! cloud fails before the task starts), record the decision.

use crate::config::AgentConfig;
use crate::knowledge::Knowledge;
use crate::placement::{Placement, ReasonKind, Side, Where};
use crate::spool::Spool;
use crate::uplink::{offload, OffloadError, Replay, Uplink};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use updraft_shared::catalog::{Caller, Catalog};
use updraft_shared::exec::{Executor, Input};
use updraft_shared::protocol::{ErrorCode, RequestHeader};
use updraft_shared::tls::Identity;

/// Decisions kept for `status`.
pub const RECENT_DECISIONS: usize = 50;
/// Finished detached tasks kept in memory; the oldest are forgotten first.
pub const DETACHED_KEEP: usize = 1024;

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

/// State of a detached task.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TaskState {
    /// Task id.
    pub id: String,
    /// Task name.
    pub task: String,
    /// `running`, `done` or `failed`.
    pub state: &'static str,
    /// Side, once placed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub placement: Option<Side>,
    /// Reason, once placed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Exit code, when done.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Error, when failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskError>,
    /// Output bytes, when finished.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_bytes: Option<u64>,
}

#[derive(Debug)]
struct Detached {
    state: TaskState,
    output: Option<Arc<Spool>>,
    done: Arc<tokio::sync::Notify>,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
struct Counters {
    /// (placement, outcome) → count
    tasks: BTreeMap<(&'static str, String), u64>,
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
    started: Instant,
    recent: Mutex<VecDeque<Decision>>,
    counters: Mutex<Counters>,
    detached: Mutex<(HashMap<String, Detached>, VecDeque<String>)>,
}

impl Agent {
    /// Builds the agent from its config and TLS identity. Nothing connects yet.
    pub fn new(config: AgentConfig, identity: &Identity) -> anyhow::Result<Arc<Self>> {
        let cert_id = updraft_shared::tls::agent_id_of(&identity.chain[0])?;
        let agent_id = match &config.agent_id {
            Some(id) if *id != cert_id => {
                anyhow::bail!(
                    "agent_id `{id}` in the config does not match the certificate's `{cert_id}`; fix agent_id or issue a certificate for `{id}`"
                )
            }
            _ => cert_id,
        };
        let work = config.state_dir.join("work");
        std::fs::create_dir_all(&work).map_err(|e| {
            anyhow::anyhow!(
                "cannot create {}: {e} (check state_dir in agent.toml)",
                work.display()
            )
        })?;
        let uplink = Uplink::new(identity, config.clouds.clone(), config.link.clone())?;
        let knowledge = Knowledge::load(&config)?;
        Ok(Arc::new(Self {
            knowledge,
            agent_id,
            catalog: config.catalog.clone(),
            executor: Executor::new(config.max_local_concurrency, config.max_local_queue, work),
            uplink,
            config,
            started: Instant::now(),
            recent: Mutex::new(VecDeque::new()),
            counters: Mutex::default(),
            detached: Mutex::default(),
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
        self.submit_with_id(id, sub, input).await
    }

    async fn submit_with_id<I: Input>(
        &self,
        id: String,
        sub: Submission,
        input: I,
    ) -> Result<Finished, TaskError> {
        let started = Instant::now();
        let task = self
            .catalog
            .admit(&sub.task, sub.args.clone(), sub.input_len, Caller::Local)
            .map_err(|r| TaskError::new(r.code.as_str(), r.message))?;
        let chosen = self.uplink.pick();
        let decided = self.knowledge.place(
            task.spec(),
            sub.where_,
            chosen.as_ref(),
            self.executor.load(),
            sub.input_len,
        );
        let mut placed = decided.placement;
        let forced = placed.forced;
        let mut output = self.new_spool();
        let mut input = Some(Replay::fresh(input));
        let mut result = None;
        if placed.side == Side::Cloud {
            match chosen {
                None if forced => {
                    let why = self.why_no_cloud();
                    return Err(TaskError::new(
                        "cloud_unavailable",
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
                        self.why_no_cloud()
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
                        placed.reason = format!("{}; daemon {}", placed.reason, c.link.address());
                    }
                    let offload_started = Instant::now();
                    match offload(&c.conn, &header, sent, &mut output, &self.config.link).await {
                        Ok(trailer) => {
                            if trailer.exit_code.is_some() {
                                self.knowledge.record_cloud(
                                    &sub.task,
                                    offload_started.elapsed(),
                                    Some(c.conn.rtt()),
                                    decided.bandwidth_mbps,
                                    &trailer,
                                );
                            }
                            result = Some(match (trailer.exit_code, trailer.error) {
                                (Some(code), None) => Ok(Exit {
                                    code,
                                    stderr_tail: trailer.stderr_tail,
                                }),
                                (_, Some(e)) => Err(TaskError::new(e.as_str(), trailer.message)),
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
                            placed.reason = match code {
                                Some(code) => format!("daemon {daemon} refused the task ({code}: {why}); ran on the board"),
                                None => format!("cloud failed before the task started (daemon {daemon}: {why}); ran on the board"),
                            };
                            input = Some(back);
                        }
                        Err(OffloadError::Failed { reason: why }) => {
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
            .map_err(|e| TaskError::new("internal", format!("spooling output: {e}")))?;
        self.record(&id, &sub.task, &placed, &result, started.elapsed());
        Ok(Finished {
            id,
            side: placed.side,
            reason: placed.reason,
            result,
            output,
        })
    }

    fn why_no_cloud(&self) -> String {
        let status = self.uplink.status();
        if status.is_empty() {
            return "no [[cloud]] daemon is configured".into();
        }
        let parts: Vec<String> = status
            .iter()
            .map(|s| {
                let state = if s.connected && s.draining {
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
                Ok(e) if e.code == 0 => "ok".to_string(),
                Ok(_) => "exit_nonzero".to_string(),
                Err(e) => e.code.clone(),
            };
            *c.tasks.entry((side.as_str(), outcome_label)).or_default() += 1;
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

    /// Accepts a detached task: its input is spooled first, then it runs in the
    /// background. Returns the task id.
    ///
    /// Detached tasks are kept in memory by this version: they do not survive an agent
    /// restart.
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
                .map_err(|e| TaskError::new("internal", format!("spooling input: {e}")))?;
        }
        spool
            .flush()
            .await
            .map_err(|e| TaskError::new("internal", format!("spooling input: {e}")))?;
        let id = new_task_id();
        let done = Arc::new(tokio::sync::Notify::new());
        {
            let mut d = self.detached.lock().expect("detached lock");
            d.0.insert(
                id.clone(),
                Detached {
                    state: TaskState {
                        id: id.clone(),
                        task: sub.task.clone(),
                        state: "running",
                        placement: None,
                        reason: None,
                        exit_code: None,
                        error: None,
                        output_bytes: None,
                    },
                    output: None,
                    done: done.clone(),
                },
            );
            d.1.push_back(id.clone());
            while d.1.len() > DETACHED_KEEP {
                if let Some(old) = d.1.pop_front() {
                    d.0.remove(&old);
                }
            }
        }
        let agent = self.clone();
        let task_id = id.clone();
        let sub = Submission {
            input_len: Some(spool.len()),
            ..sub
        };
        tokio::spawn(async move {
            let reader = match spool.reader().await {
                Ok(r) => r,
                Err(e) => {
                    agent.finish_detached(
                        &task_id,
                        Err(TaskError::new(
                            "internal",
                            format!("reading spooled input: {e}"),
                        )),
                    );
                    return;
                }
            };
            let r = agent.submit_with_id(task_id.clone(), sub, reader).await;
            agent.finish_detached(&task_id, r);
        });
        Ok(id)
    }

    fn finish_detached(&self, id: &str, r: Result<Finished, TaskError>) {
        let mut d = self.detached.lock().expect("detached lock");
        let Some(entry) = d.0.get_mut(id) else { return };
        match r {
            Ok(f) => {
                entry.state.placement = Some(f.side);
                entry.state.reason = Some(f.reason);
                entry.state.output_bytes = Some(f.output.len());
                match f.result {
                    Ok(exit) => {
                        entry.state.state = "done";
                        entry.state.exit_code = Some(exit.code);
                    }
                    Err(e) => {
                        entry.state.state = "failed";
                        entry.state.error = Some(e);
                    }
                }
                entry.output = Some(Arc::new(f.output));
            }
            Err(e) => {
                entry.state.state = "failed";
                entry.state.error = Some(e);
            }
        }
        entry.done.notify_waiters();
    }

    /// A detached task's state; with `wait`, blocks until it has finished.
    pub async fn task_state(
        &self,
        id: &str,
        wait: bool,
    ) -> Option<(TaskState, Option<Arc<Spool>>)> {
        loop {
            let notified = {
                let d = self.detached.lock().expect("detached lock");
                let entry = d.0.get(id)?;
                if !wait || entry.state.state != "running" {
                    return Some((entry.state.clone(), entry.output.clone()));
                }
                entry.done.clone()
            };
            let n = notified.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            // Re-check: the task may have finished between the lock and `enable`.
            {
                let d = self.detached.lock().expect("detached lock");
                if d.0.get(id).is_none_or(|e| e.state.state != "running") {
                    continue;
                }
            }
            n.await;
        }
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
            "recent": self.recent.lock().expect("recent lock").iter().rev().collect::<Vec<_>>(),
        })
    }

    /// Prometheus text exposition of the agent's counters and gauges.
    pub fn metrics_text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let c = self.counters.lock().expect("counters lock");
        let _ = writeln!(
            out,
            "# HELP updraft_agent_tasks_total Tasks finished, by placement and outcome."
        );
        let _ = writeln!(out, "# TYPE updraft_agent_tasks_total counter");
        for ((p, o), n) in &c.tasks {
            let _ = writeln!(
                out,
                "updraft_agent_tasks_total{{placement=\"{p}\",outcome=\"{o}\"}} {n}"
            );
        }
        let _ = writeln!(out, "# HELP updraft_agent_decisions_total Placement decisions, by placement and reason kind.");
        let _ = writeln!(out, "# TYPE updraft_agent_decisions_total counter");
        for ((p, k), n) in &c.decisions {
            let _ = writeln!(
                out,
                "updraft_agent_decisions_total{{placement=\"{p}\",reason=\"{k}\"}} {n}"
            );
        }
        let load = self.executor.load();
        let _ = writeln!(
            out,
            "# HELP updraft_agent_local_running Tasks running on the board."
        );
        let _ = writeln!(out, "# TYPE updraft_agent_local_running gauge");
        let _ = writeln!(out, "updraft_agent_local_running {}", load.running);
        let _ = writeln!(
            out,
            "# HELP updraft_agent_local_queued Tasks waiting for a local slot."
        );
        let _ = writeln!(out, "# TYPE updraft_agent_local_queued gauge");
        let _ = writeln!(out, "updraft_agent_local_queued {}", load.queued);
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
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
            }
        }
        let _ = writeln!(
            out,
            "# HELP updraft_agent_cloud_connected Whether each daemon is connected."
        );
        let _ = writeln!(out, "# TYPE updraft_agent_cloud_connected gauge");
        for s in self.uplink.status() {
            let _ = writeln!(
                out,
                "updraft_agent_cloud_connected{{daemon=\"{}\"}} {}",
                s.address,
                u8::from(s.connected)
            );
        }
        out
    }
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
    info!(
        agent = agent.agent_id(),
        socket = %agent.config.socket.display(),
        daemons = agent.config.clouds.len(),
        "updraft-agent serving"
    );
    updraft_shared::notify::ready();
    updraft_shared::notify::spawn_watchdog();
    let served = crate::api::serve(agent.clone(), listener, shutdown).await;
    updraft_shared::notify::stopping();
    stop.cancel();
    agent.knowledge.persist();
    agent
        .uplink
        .endpoint()
        .close(0u32.into(), b"agent stopping");
    let _ = tokio::time::timeout(Duration::from_secs(2), agent.uplink.endpoint().wait_idle()).await;
    served
}

/// Binds the API socket: creates its directory, replaces a stale socket file left by
/// a previous run, refuses to steal one another agent is serving on, and restricts
/// access to the owner and group (mode 0660).
pub fn bind_socket(path: &std::path::Path) -> anyhow::Result<tokio::net::UnixListener> {
    use anyhow::Context;
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "{} is in use by a running agent; stop it or choose another socket",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("cannot set permissions on {}", path.display()))?;
    Ok(listener)
}

/// Samples signals on one timer until shutdown.
async fn sample_loop(agent: Arc<Agent>, stop: CancellationToken) {
    let interval = agent.config.sample_interval;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => agent.knowledge.tick(&agent.uplink, agent.executor.load(), interval),
            () = stop.cancelled() => return,
        }
    }
}

/// Reloads the policy on SIGHUP.
async fn reload_on_sighup(agent: Arc<Agent>, stop: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        warn!("cannot install a SIGHUP handler; the policy still reloads when its file changes");
        return;
    };
    loop {
        tokio::select! {
            _ = hup.recv() => agent.knowledge.reload_policy("SIGHUP"),
            () = stop.cancelled() => return,
        }
    }
}
