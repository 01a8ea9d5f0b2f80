//! The state every handler of one daemon shares: catalog, executor, memory of recent
//! ids, counters, the live configuration SIGHUP swaps, and per-agent upload counts.

use crate::config::DaemonConfig;
use crate::enroll::Enroller;
use crate::recent::Recent;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;
use updraft_shared::catalog::Catalog;
use updraft_shared::exec::Executor;
use updraft_shared::metrics::{self, TaskStats};
use updraft_shared::tls::Identity;

/// What every handler shares.
pub(crate) struct Shared {
    /// The task catalog; SIGHUP swaps in a new one.
    pub(crate) catalog: RwLock<Arc<Catalog>>,
    /// Runs admitted tasks in the slots and queue places the config allows.
    pub(crate) executor: Executor,
    /// The configuration the daemon started with.
    pub(crate) config: DaemonConfig,
    /// Flips to true once when draining starts.
    pub(crate) draining: watch::Receiver<bool>,
    /// Task streams in flight; drain waits for them.
    pub(crate) tasks: TaskTracker,
    /// Recent task ids and their results, for retries.
    pub(crate) recent: Arc<Recent>,
    /// Finished tasks by task and outcome, with latency histograms.
    pub(crate) stats: TaskStats,
    /// Agent connections open now.
    pub(crate) connections: AtomicU64,
    /// Issues certificates at enrollment and renewal; SIGHUP swaps in a new one.
    pub(crate) enroller: RwLock<Arc<Enroller>>,
    /// The configuration and TLS files SIGHUP last applied (`config` is the
    /// configuration the daemon started with).
    pub(crate) live: Mutex<(DaemonConfig, Option<Identity>)>,
    /// Held inputs each agent is sending now.
    pub(crate) uploads: Uploads,
    /// Every agent that connected or enrolled.
    pub(crate) fleet: crate::fleet::Registry,
    /// The shared store, in cluster mode (`[cluster]`).
    pub(crate) cluster: Option<Arc<crate::cluster::Cluster>>,
}

impl Shared {
    /// The state of a daemon starting with `config`, its tasks working under `work`;
    /// `draining` flips once when the drain starts.
    pub(crate) fn new(
        config: DaemonConfig,
        work: std::path::PathBuf,
        draining: watch::Receiver<bool>,
    ) -> Self {
        Self {
            catalog: RwLock::new(Arc::new(config.catalog.clone())),
            executor: Executor::new(config.max_concurrent_tasks, config.max_queued_tasks, work),
            draining,
            tasks: TaskTracker::new(),
            recent: Recent::new(config.dedup),
            stats: TaskStats::default(),
            connections: AtomicU64::new(0),
            enroller: RwLock::new(Arc::new(Enroller::load(&config))),
            live: Mutex::new((config.clone(), config.load_identity().ok())),
            uploads: Uploads::default(),
            fleet: crate::fleet::Registry::open(&config.state_dir),
            cluster: None,
            config,
        }
    }

    /// Whether the drain has started.
    pub(crate) fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// The catalog new tasks are admitted against now.
    pub(crate) fn catalog(&self) -> Arc<Catalog> {
        self.catalog
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The enroller that answers certificate requests now.
    pub(crate) fn enroller(&self) -> Arc<Enroller> {
        self.enroller
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// SIGHUP: loads the config file again; when it loads whole, new connections get
    /// the new TLS and transport settings and new tasks the new catalog.
    pub(crate) fn reload(&self, endpoint: &quinn::Endpoint) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let Some(new) = crate::reload::load(&live.0, live.1.as_ref(), &self.config) else {
            return;
        };
        endpoint.set_server_config(Some(new.server));
        *self.catalog.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(new.config.catalog.clone());
        *self.enroller.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(Enroller::load(&new.config));
        *live = (new.config, Some(new.identity));
    }

    /// The Prometheus text for `/metrics`.
    pub(crate) fn metrics_text(&self) -> String {
        let mut out = String::new();
        self.stats.render("updraftd", &mut out);
        let load = self.executor.load();
        let usage = self.recent.usage();
        let counters = self.recent.counters();
        metrics::gauge(
            &mut out,
            "updraftd_running",
            "Tasks running now.",
            load.running,
        );
        metrics::gauge(
            &mut out,
            "updraftd_queued",
            "Tasks waiting for a slot.",
            load.queued,
        );
        metrics::gauge(
            &mut out,
            "updraftd_uploading",
            "Tasks accepted whose held input is still arriving (they hold no slot yet).",
            load.uploading,
        );
        metrics::gauge(
            &mut out,
            "updraftd_capacity",
            "Task slots (max_concurrent_tasks).",
            load.capacity,
        );
        metrics::gauge(
            &mut out,
            "updraftd_connections",
            "Agent connections open now.",
            self.connections.load(Ordering::Relaxed),
        );
        metrics::gauge(
            &mut out,
            "updraftd_draining",
            "1 while draining after SIGTERM.",
            u8::from(self.is_draining()),
        );
        metrics::counter(
            &mut out,
            "updraftd_runs_total",
            "Tasks started (a slot taken).",
            counters.runs.load(Ordering::Relaxed),
        );
        metrics::counter(
            &mut out,
            "updraftd_dedup_hits_total",
            "Retries answered from memory instead of a second run.",
            counters.dedup_hits.load(Ordering::Relaxed),
        );
        metrics::gauge(
            &mut out,
            "updraftd_dedup_entries",
            "Task ids remembered, running and finished.",
            usage.entries,
        );
        metrics::gauge(
            &mut out,
            "updraftd_dedup_kept_bytes",
            "Bytes of results kept for retries.",
            usage.kept_bytes,
        );
        self.fleet.render_metrics(&mut out);
        out
    }
}

/// Task streams each agent (by id, over all its connections) has receiving a held
/// input now, bounded by `max_uploads_per_agent`.
#[derive(Default)]
pub(crate) struct Uploads(Mutex<HashMap<String, u32>>);

/// One upload counted in [`Uploads`] until dropped.
pub(crate) struct Uploading<'a> {
    uploads: &'a Uploads,
    agent: &'a str,
}

impl Uploads {
    /// Counts an upload of `agent`, or gives the count when it is at `limit` already.
    pub(crate) fn begin<'a>(&'a self, agent: &'a str, limit: u32) -> Result<Uploading<'a>, u32> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match map.get_mut(agent) {
            Some(n) if *n >= limit => return Err(*n),
            Some(n) => *n += 1,
            None => {
                map.insert(agent.to_string(), 1);
            }
        }
        Ok(Uploading {
            uploads: self,
            agent,
        })
    }
}

impl Drop for Uploading<'_> {
    fn drop(&mut self) {
        let mut map = self.uploads.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(self.agent) {
            *n -= 1;
            if *n == 0 {
                map.remove(self.agent);
            }
        }
    }
}

/// Counts one task stream when it ends, however it ends: the outcome is set on the
/// way; one left unset means the agent went away.
pub(crate) struct Tally<'a> {
    shared: &'a Shared,
    task: &'a str,
    /// The outcome label the task is counted under.
    pub(crate) outcome: &'static str,
    started: Instant,
    /// Counted already (see [`Tally::record`]).
    recorded: bool,
}

impl<'a> Tally<'a> {
    /// Counts a task stream for `task` (a catalog name or `other`), from now; until
    /// told otherwise, the agent went away.
    pub(crate) fn new(shared: &'a Shared, task: &'a str) -> Self {
        Self {
            shared,
            task,
            outcome: "agent_gone",
            started: Instant::now(),
            recorded: false,
        }
    }

    /// Counts the task now, with the outcome it has, rather than when the handler
    /// ends: a trailer is counted before the agent can hold it, so a scrape made after
    /// an agent saw a result counts that result.
    pub(crate) fn record(&mut self) {
        if !std::mem::replace(&mut self.recorded, true) {
            self.shared
                .stats
                .record("", self.task, self.outcome, self.started.elapsed());
        }
    }
}

impl Drop for Tally<'_> {
    fn drop(&mut self) {
        self.record();
    }
}
