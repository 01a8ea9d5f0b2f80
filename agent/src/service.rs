//! The running agent: [`Agent`] holds the catalog, the local executor, the uplink to the
//! daemons and what placement learns, and [`Agent::submit`] is the one path every
//! task takes: admit against the catalog, decide placement, run on the board or
//! offload, and record the decision.
//!
//! What to do when an offload fails is decided in [`crate::attempt`]; this module only
//! performs it. It also holds the state the other jobs keep on the agent (decisions and
//! counters, detached tasks, the certificate), so it imports none of them: detached
//! tasks are run in [`crate::detached`], `status` and `/metrics` rendered in
//! [`crate::status`], the background loops in [`crate::serve`].

use crate::attempt::{Action, Attempt, Failure, Fallback, Next, NoCloud};
use crate::config::AgentConfig;
use crate::enroll::CertFiles;
use crate::journal::{Journal, TaskRow};
use crate::knowledge::Knowledge;
use crate::placement::{Placement, Side};
use crate::spool::Spool;
use crate::task::{new_task_id, Decision, Exit, Finished, Submission, TaskCode, TaskError};
use crate::uplink::{offload, Chosen, OffloadError, OnDrop, Replay, Uplink};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, Notify};
use tracing::{info, warn};
use updraft_proto::{ErrorCode, RequestHeader};
use updraft_shared::catalog::{AdmittedTask, Caller, Catalog};
use updraft_shared::exec::{Executor, Input};
use updraft_shared::metrics;
use updraft_shared::tls::Identity;

/// The journal of detached tasks, in `state_dir`.
pub(crate) const JOURNAL_FILE: &str = "journal.db";

/// Why the agent could not be built ([`Agent::new`]).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// `agent_id` in the config names another agent than the certificate.
    #[error("agent_id `{config}` in the config does not match the certificate's `{cert}`; fix agent_id or issue a certificate for `{config}`")]
    AgentIdMismatch {
        /// The config's `agent_id`.
        config: String,
        /// The certificate's.
        cert: String,
    },
    /// The certificate names no agent or cannot be read.
    #[error(transparent)]
    Certificate(#[from] updraft_shared::tls::TlsError),
    /// The directory for the tasks' working directories cannot be prepared.
    #[error("cannot prepare {}: {source} (check state_dir in agent.toml)", path.display())]
    WorkDir {
        /// `state_dir/work`.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The journal of detached tasks cannot be opened.
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
    /// The uplink or the policy and estimates could not be set up.
    #[error(transparent)]
    Setup(Box<dyn std::error::Error + Send + Sync>),
}

/// The running agent: everything the API needs.
#[derive(Debug)]
pub struct Agent {
    pub(crate) agent_id: String,
    pub(crate) config: AgentConfig,
    pub(crate) catalog: Catalog,
    pub(crate) executor: Executor,
    pub(crate) uplink: Uplink,
    pub(crate) knowledge: Knowledge,
    /// Link probes (`None` with `[link] probe = false`).
    pub(crate) prober: Option<crate::probe::Prober>,
    pub(crate) started: Instant,
    /// Decisions and counters for `status` and `/metrics`.
    pub(crate) stats: Stats,
    /// Detached tasks: the journal and the tasks on their way through it.
    pub(crate) detached: Detached,
    /// The certificate in use, and when it is due for renewal.
    pub(crate) cert: Cert,
    /// What the agent tells daemons about itself, and what they answered.
    pub(crate) fleet: Arc<crate::fleet::Fleet>,
}

impl Agent {
    /// Builds the agent from its config and TLS identity. Nothing connects yet.
    pub fn new(config: AgentConfig, identity: &Identity) -> Result<Arc<Self>, StartError> {
        let cert_id = updraft_shared::tls::agent_id_of(&identity.chain[0])?;
        let cert_validity = updraft_shared::tls::validity_of(&identity.chain[0])?;
        let agent_id = match &config.agent_id {
            Some(id) if *id != cert_id => {
                return Err(StartError::AgentIdMismatch {
                    config: id.clone(),
                    cert: cert_id,
                })
            }
            _ => cert_id,
        };
        let work = config.state_dir.join("work");
        let swept =
            updraft_shared::exec::sweep_work_root(&work).map_err(|source| StartError::WorkDir {
                path: work.clone(),
                source,
            })?;
        if swept > 0 {
            tracing::info!(dir = %work.display(), "removed {swept} task working directories left by an earlier run");
        }
        let uplink = Uplink::new(identity, config.clouds.clone(), config.link.clone())
            .map_err(|e| StartError::Setup(e.into()))?;
        let knowledge = Knowledge::load(&config).map_err(|e| StartError::Setup(e.into()))?;
        let journal = Journal::open(config.state_dir.join(JOURNAL_FILE), config.journal.limits)?;
        let fleet = crate::fleet::Fleet::new(crate::cli::VERSION);
        Ok(Arc::new(Self {
            fleet,
            knowledge,
            prober: crate::probe::Prober::new(&config.link),
            agent_id,
            catalog: config.catalog.clone(),
            executor: Executor::new(config.max_local_concurrency, config.max_local_queue, work),
            uplink,
            started: Instant::now(),
            stats: Stats::default(),
            detached: Detached::new(journal),
            cert: Cert::new(CertFiles::of(&config), cert_validity, SystemTime::now()),
            config,
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

    /// The uplink to the daemons.
    pub fn uplink(&self) -> &Uplink {
        &self.uplink
    }

    /// The configuration in force.
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// The journal of detached tasks.
    pub fn journal(&self) -> &Arc<Journal> {
        &self.detached.journal
    }

    /// When the certificate in use starts and stops being valid.
    pub fn cert_validity(&self) -> (SystemTime, SystemTime) {
        self.cert.validity()
    }

    pub(crate) fn new_spool(&self) -> Spool {
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
    pub(crate) async fn submit_with_id<I: Input>(
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
            .map_err(|r| TaskError::new(r.code, r.message))?
            .with_task_id(&id);
        let mut input = Some(Replay::fresh(input));
        let mut attempt = Attempt::new(&sub.task);
        let (placed, cpu_share, cloud_result, mut output) = loop {
            let (chosen, back_on_same) = self.choose(attempt.next()).await;
            let decided = self.knowledge.place(
                task.spec(),
                sub.where_,
                chosen.as_ref(),
                self.executor.load(),
                sub.input_len,
            );
            let mut placed = attempt.placed(decided.placement.clone(), back_on_same);
            let mut output = self.new_spool();
            let action = match (placed.side, chosen) {
                (Side::Local, _) => break (placed, decided.cpu_share, None, output),
                (Side::Cloud, None) => {
                    attempt.without_daemon(&placed, self.no_cloud(attempt.avoided()))
                }
                (Side::Cloud, Some(c)) => {
                    let daemon = c.link.address().to_string();
                    if !placed.reason.contains(&daemon) {
                        placed.reason = format!("{}; daemon {daemon}", placed.reason);
                    }
                    let sent = input.take().expect("input is unspent before the offload");
                    match self
                        .offload_once(&id, &sub, &c, sent, &mut output, on_drop)
                        .await
                    {
                        Ok(result) => break (placed, decided.cpu_share, Some(result), output),
                        Err((failure, back)) => {
                            input = back;
                            attempt.after(&daemon, placed.forced, failure)
                        }
                    }
                }
            };
            match action {
                Action::Offload => {
                    let loss = attempt.lost().last().expect("a retry follows a loss");
                    warn!(
                        task = sub.task,
                        id,
                        daemon = loss.daemon,
                        "task lost mid-run ({}); retrying it with the same id",
                        loss.why
                    );
                }
                Action::Local(fallback) => {
                    log_fallback(&sub.task, &id, &fallback);
                    // What a lost run sent back is not this run's output.
                    break (
                        fallback.apply(placed),
                        decided.cpu_share,
                        None,
                        self.new_spool(),
                    );
                }
                Action::Refuse(e) => return Err(e),
                Action::Fail(e) => break (placed, decided.cpu_share, Some(Err(e)), output),
            }
        };
        let result = match cloud_result {
            Some(r) => r,
            None => {
                let input = input.take().expect("input is unspent when running locally");
                self.run_local(&task, input, &mut output, cpu_share).await
            }
        };
        output
            .flush()
            .await
            .map_err(|e| spool_error("spooling output", &e))?;
        self.stats.record(
            &self.catalog,
            &id,
            &sub.task,
            &placed,
            &result,
            started.elapsed(),
        );
        self.fleet.ran(placed.side, placed.kind, result.is_err());
        Ok(Finished {
            id,
            side: placed.side,
            reason: placed.reason,
            result,
            output,
        })
    }

    /// The daemon for the next try, and whether it is the one the last try was lost on,
    /// back within `failover_wait` (a blip of the board's own link).
    async fn choose(&self, next: &Next) -> (Option<Chosen>, bool) {
        match next {
            Next::WaitFor(address) => {
                match self
                    .uplink
                    .wait_for(address, self.config.link.failover_wait)
                    .await
                {
                    Some(c) => (Some(c), true),
                    None => (self.uplink.pick_avoiding(None), false),
                }
            }
            Next::Avoid(address) => (self.uplink.pick_avoiding(Some(address)), false),
            Next::Any => (self.uplink.pick(), false),
        }
    }

    /// One try of the task on daemon `c`: its result, or how the try failed with the
    /// input back when it can be sent again.
    async fn offload_once<I: Input>(
        &self,
        id: &str,
        sub: &Submission,
        c: &Chosen,
        sent: Replay<I>,
        output: &mut Spool,
        on_drop: OnDrop,
    ) -> Result<Result<Exit, TaskError>, (Failure, Option<Replay<I>>)> {
        let header = RequestHeader {
            id: id.to_string(),
            task: sub.task.clone(),
            args: sub.args.clone(),
            input_len: sub.input_len,
        };
        let _inflight = c.link.begin();
        let started = Instant::now();
        let trailer =
            match offload(&c.conn, &header, sent, output, &self.config.link, on_drop).await {
                Ok(trailer) => trailer,
                Err(OffloadError::NotStarted {
                    code,
                    reason: why,
                    input,
                }) => return Err((Failure::NotStarted { code, why }, Some(input))),
                Err(OffloadError::Failed { reason: why, input }) => {
                    let silent = c.conn.close_reason().is_none() && !c.link.heard_since(started);
                    let failure = Failure::Lost {
                        why,
                        replayable: input.is_some(),
                        silent,
                    };
                    return Err((failure, input));
                }
            };
        if trailer.exit_code.is_some() {
            self.knowledge.record_cloud(
                &sub.task,
                c.link.address(),
                started.elapsed(),
                Some(c.conn.rtt()),
                &trailer,
            );
        }
        Ok(match (trailer.exit_code, trailer.error) {
            (Some(code), None) => Ok(Exit {
                code,
                stderr_tail: trailer.stderr_tail,
            }),
            (_, Some(e)) => Err(TaskError::new(e, trailer.message)),
            (None, None) => Err(TaskError::new(
                TaskCode::CloudFailed,
                "daemon sent a trailer with neither exit code nor error",
            )),
        })
    }

    /// Runs the task on the board, learning its run time at `cpu_share`.
    async fn run_local<I: Input>(
        &self,
        task: &AdmittedTask,
        input: Replay<I>,
        output: &mut Spool,
        cpu_share: f64,
    ) -> Result<Exit, TaskError> {
        let name = &task.spec().name;
        match self.executor.run(task, input, output).await {
            Ok(o) => {
                self.knowledge.record_local(
                    name,
                    o.run_time,
                    cpu_share,
                    o.input_bytes,
                    o.output_bytes,
                );
                Ok(Exit {
                    code: o.exit_code,
                    stderr_tail: String::from_utf8_lossy(&o.stderr_tail).into_owned(),
                })
            }
            Err(e) => Err(TaskError::new(e.code(), format!("task `{name}`: {e}"))),
        }
    }

    /// Why no daemon can take a task now; `avoided` is one left out because it went
    /// silent during the task's last attempt.
    fn no_cloud(&self, avoided: Option<&str>) -> NoCloud {
        NoCloud::of(&self.uplink.status(), avoided)
    }
}

/// Says why a task placed in the cloud runs on the board after a try there.
fn log_fallback(task: &str, id: &str, fallback: &Fallback) {
    match fallback {
        Fallback::NoDaemon { .. } => {}
        Fallback::Refused { daemon, why, .. } | Fallback::NotStarted { daemon, why, .. } => {
            warn!(
                task,
                id, daemon, "cloud did not take the task ({why}); running it on the board"
            );
        }
        Fallback::LostAgain { daemon, why, .. } => {
            warn!(
                task,
                id, daemon, "task lost mid-run again ({why}); running it on the board"
            );
        }
    }
}

/// A spool that could not be written: `storage_full` when the disk is.
pub(crate) fn spool_error(what: &str, e: &std::io::Error) -> TaskError {
    if crate::spool::is_disk_full(e) {
        TaskError::new(
            TaskCode::StorageFull,
            format!("{what}: {e}; the filesystem holding state_dir is full, free space there"),
        )
    } else {
        TaskError::new(TaskCode::Wire(ErrorCode::Internal), format!("{what}: {e}"))
    }
}

/// Decisions kept for `status`: enough to show how the last minutes of a busy board
/// were placed, few enough that memory and the JSON stay small (each holds its reason).
pub(crate) const RECENT_DECISIONS: usize = 50;

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// (placement, reason kind) → count
    pub(crate) decisions: BTreeMap<(&'static str, &'static str), u64>,
}

/// What the agent keeps of finished tasks for `status` and `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) recent: Mutex<VecDeque<Decision>>,
    pub(crate) counters: Mutex<Counters>,
    /// Finished tasks by placement, task and outcome, with latency histograms.
    pub(crate) task_stats: metrics::TaskStats,
}

impl Stats {
    /// Records how a task placed at `placed` ended: logged, counted, and kept among
    /// the recent decisions.
    pub(crate) fn record(
        &self,
        catalog: &Catalog,
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
            Err(e) => e.code.as_str().to_string(),
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
            let label = if catalog.get(task).is_some() {
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
}

/// The agent's detached tasks: the journal and the tasks on their way through it.
#[derive(Debug)]
pub(crate) struct Detached {
    /// Accepted, running and finished tasks.
    pub(crate) journal: Arc<Journal>,
    /// Ids of detached tasks to run, to the dispatcher
    /// ([`crate::detached::dispatch_detached`]).
    pub(crate) tx: mpsc::UnboundedSender<String>,
    pub(crate) rx: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
    /// Woken whenever a detached task finishes.
    pub(crate) done: Notify,
    /// Detached tasks that ended while even their failure could not be written to the
    /// journal (a full disk): shown from here, and written when the journal can take
    /// them ([`Agent::store_unstored`]).
    pub(crate) unstored: Mutex<HashMap<String, TaskRow>>,
}

impl Detached {
    /// Detached tasks kept in `journal`; none dispatched yet.
    pub(crate) fn new(journal: Journal) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            journal: Arc::new(journal),
            tx,
            rx: Mutex::new(Some(rx)),
            done: Notify::new(),
            unstored: Mutex::default(),
        }
    }
}

/// The certificate in use: where it lives, when it is valid, and since when it is in
/// use (renewal is due a share of its life after that).
#[derive(Debug)]
pub(crate) struct Cert {
    /// Where the certificate and key live.
    pub(crate) files: CertFiles,
    validity: Mutex<(SystemTime, SystemTime)>,
    since: Mutex<SystemTime>,
}

impl Cert {
    /// The certificate at `files`, valid over `validity`, in use since `since`.
    pub(crate) fn new(
        files: CertFiles,
        validity: (SystemTime, SystemTime),
        since: SystemTime,
    ) -> Self {
        Self {
            files,
            validity: Mutex::new(validity),
            since: Mutex::new(since),
        }
    }

    /// When the certificate in use starts and stops being valid.
    pub(crate) fn validity(&self) -> (SystemTime, SystemTime) {
        *self.validity.lock().expect("cert lock")
    }

    /// When the certificate in use is due for renewal (`renew_before` from the config).
    pub(crate) fn renew_time(&self, renew_before: Option<Duration>) -> SystemTime {
        let (not_before, not_after) = self.validity();
        let since = *self.since.lock().expect("cert lock");
        crate::enroll::renew_at(not_before, not_after, renew_before, since)
    }

    /// A renewed certificate valid over `validity` is in use from `now`.
    pub(crate) fn renewed(&self, validity: (SystemTime, SystemTime), now: SystemTime) {
        *self.validity.lock().expect("cert lock") = validity;
        *self.since.lock().expect("cert lock") = now;
    }
}
