//! What placement knows: the live signals (sampled on one timer), the policy in force
//! and the cost model's estimates, persisted in `state_dir` across restarts.
//!
//! [`Knowledge::place`] assembles a [`Signals`] snapshot and [`Conditions`] for one
//! task and hands them to the pure [`placement::decide`]; after the run,
//! [`Knowledge::record_local`] / [`Knowledge::record_cloud`] teach the cost model.

use crate::config::AgentConfig;
use crate::placement::{self, CloudView, Placement, Where};
use crate::policy_file::PolicyHolder;
use crate::signals::{BoardSampler, BoardSignals, CpuQuota};
use crate::uplink::{Chosen, Uplink};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tracing::{info, warn};
use updraft_proto::policy::cost::{self, CloudRun, Conditions, CostModel, LocalRun};
use updraft_proto::policy::link::{LinkEstimate, Rate};
use updraft_proto::policy::{Signals, TaskInfo};
use updraft_proto::Trailer;
use updraft_shared::catalog::TaskSpec;
use updraft_shared::exec::Load;

/// File in `state_dir` holding the cost model's estimates.
pub(crate) const ESTIMATES_FILE: &str = "estimates.json";
/// How often changed estimates are written out: often enough that a crash loses
/// little learning, rarely enough to spare a board's flash.
pub(crate) const PERSIST_EVERY: Duration = Duration::from_secs(30);

/// A link whose estimate is no longer sure is probed only while tasks that move this
/// much data have been placed this recently: an idle or tiny-task board does not spend
/// its budget.
pub(crate) const DATA_HEAVY_RECENT: Duration = Duration::from_secs(600);

/// A placement decision with what it was based on.
#[derive(Debug, Clone)]
pub struct Decided {
    /// The decision.
    pub placement: Placement,
    /// The signals it saw.
    pub signals: Signals,
    /// CPU share a local run would get (for teaching the cost model afterwards).
    pub cpu_share: f64,
    /// The uplink figure used for the chosen daemon.
    pub bandwidth_mbps: Option<f64>,
}

/// What placement knows of one daemon's link now: each direction's estimate, `None`
/// while no transfer or probe has measured it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LinkNow {
    /// Board to daemon.
    pub up: Option<Rate>,
    /// Daemon to board.
    pub down: Option<Rate>,
}

impl LinkNow {
    /// True when both directions are measured and sure enough to decide on.
    pub fn is_sure(&self) -> bool {
        self.up.is_some_and(|r| r.is_sure()) && self.down.is_some_and(|r| r.is_sure())
    }
}

/// Why [`Knowledge::load`] failed.
#[derive(Debug, thiserror::Error)]
pub enum KnowledgeError {
    /// The policy file is broken: its path, line and column, and what is wrong.
    #[error("{0}")]
    Policy(crate::policy_file::PolicyLoadError),
}

/// Signals, policy and estimates.
#[derive(Debug)]
pub struct Knowledge {
    policy: PolicyHolder,
    cost: Mutex<CostModel>,
    board: Mutex<BoardSignals>,
    sampler: Mutex<BoardSampler>,
    /// This process's cgroup CPU quota files, read at every decision (host-wide CPU
    /// figures cannot show a quota).
    quota: Option<CpuQuota>,
    /// Each daemon's link, by address, from its tasks' transfers and link probes.
    links: Mutex<HashMap<String, LinkEstimate>>,
    /// When a task whose input is large enough to be a rate sample was last placed.
    data_heavy: Mutex<Option<Instant>>,
    /// `[link] probe`: links not known are measured by probes, not by tasks.
    probes: bool,
    /// Woken when a decision found its link not sure: probe now, not at the next tick.
    pub probe_wanted: tokio::sync::Notify,
    estimates: PathBuf,
    dirty: AtomicBool,
    last_persist: Mutex<Instant>,
}

impl Knowledge {
    /// Loads the policy (a broken file is an error) and the saved estimates (a broken
    /// or foreign estimates file is logged and set aside: learning starts afresh).
    pub fn load(config: &AgentConfig) -> Result<Self, KnowledgeError> {
        let pushed = config
            .accept_push
            .then(|| config.state_dir.join(crate::config::PUSHED_POLICY));
        let policy = PolicyHolder::load_with(&config.policy, pushed.as_deref())
            .map_err(KnowledgeError::Policy)?;
        let params = policy.auto_params();
        let estimates = config.state_dir.join(ESTIMATES_FILE);
        // The link estimate's age goes on from when the file was written.
        let since_saved = std::fs::metadata(&estimates)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .unwrap_or_default();
        let cost = match std::fs::read(&estimates) {
            Ok(bytes) => match serde_json::from_slice(&bytes)
                .map_err(|e| e.to_string())
                .and_then(|v| {
                    CostModel::restore(&v, params.clone(), Instant::now(), since_saved)
                        .map_err(|e| e.to_string())
                }) {
                Ok(m) => {
                    info!(path = %estimates.display(), tasks = m.len(), "estimates restored");
                    m
                }
                Err(e) => {
                    let aside = estimates.with_extension("json.unreadable");
                    warn!(path = %estimates.display(), error = %e, moved_to = %aside.display(), "estimates file unreadable; starting afresh");
                    let _ = std::fs::rename(&estimates, &aside);
                    CostModel::new(params)
                }
            },
            Err(_) => CostModel::new(params),
        };
        let mut sampler = BoardSampler::new(config.power_supply_root.clone());
        let board = sampler.sample();
        Ok(Self {
            policy,
            cost: Mutex::new(cost),
            board: Mutex::new(board),
            sampler: Mutex::new(sampler),
            quota: CpuQuota::locate(),
            links: Mutex::default(),
            data_heavy: Mutex::default(),
            probes: config.link.probe,
            probe_wanted: tokio::sync::Notify::new(),
            estimates,
            dirty: AtomicBool::new(false),
            last_persist: Mutex::new(Instant::now()),
        })
    }

    /// The policy in force.
    pub fn policy(&self) -> &PolicyHolder {
        &self.policy
    }

    /// Applies a policy a daemon pushed (see [`PolicyHolder::apply_pushed`]) and its
    /// `[auto]` coefficients.
    pub fn apply_pushed_policy(&self, text: &str) -> Result<(), crate::policy_file::PushRefused> {
        self.policy.apply_pushed(text)?;
        self.cost
            .lock()
            .expect("cost lock")
            .set_params(self.policy.auto_params());
        Ok(())
    }

    /// Reloads the policy (SIGHUP) and applies its `[auto]` coefficients.
    pub fn reload_policy(&self, why: &str) {
        if self.policy.reload(why).is_none() {
            self.cost
                .lock()
                .expect("cost lock")
                .set_params(self.policy.auto_params());
        }
    }

    /// The latest board sample.
    pub fn board(&self) -> BoardSignals {
        *self.board.lock().expect("board lock")
    }

    /// What is known of the link to the daemon at `address` now.
    pub fn link(&self, address: &str) -> LinkNow {
        let now = Instant::now();
        let links = self.links.lock().expect("links lock");
        let l = links.get(address).copied().unwrap_or(LinkEstimate::COLD);
        LinkNow {
            up: l.up.get(now),
            down: l.down.get(now),
        }
    }

    /// Learns from a link probe of the daemon at `address`: each way's rate in bytes
    /// per second, where the probe could time it.
    pub fn record_probe(&self, address: &str, up: Option<f64>, down: Option<f64>) {
        let now = Instant::now();
        let mut links = self.links.lock().expect("links lock");
        let l = links.entry(address.to_string()).or_default();
        if let Some(up) = up {
            l.up.record_rate(up, now);
        }
        if let Some(down) = down {
            l.down.record_rate(down, now);
        }
    }

    /// Why the link to `address` should be measured now, if it should: a direction
    /// never measured, or an estimate no longer sure while tasks that move data are
    /// being placed ([`DATA_HEAVY_RECENT`]).
    pub fn link_needs_probe(&self, address: &str) -> Option<&'static str> {
        let link = self.link(address);
        if link.up.is_none() || link.down.is_none() {
            return Some("unmeasured");
        }
        let recent = self
            .data_heavy
            .lock()
            .expect("data-heavy lock")
            .is_some_and(|at| at.elapsed() < DATA_HEAVY_RECENT);
        (!link.is_sure() && recent).then_some("estimate no longer sure")
    }

    /// The signals as placement sees them for a task with `input_bytes`.
    pub fn signals(
        &self,
        chosen: Option<&Chosen>,
        local: Load,
        input_bytes: Option<u64>,
    ) -> Signals {
        let b = self.board();
        Signals {
            cpu_percent: b.cpu_percent,
            load_avg: b.load_avg,
            memory_available_mb: b.memory_available_mb,
            temperature_c: b.temperature_c,
            battery_percent: b.power.battery_percent,
            charging: b.power.charging,
            on_battery: b.power.on_battery,
            rtt_ms: chosen.map(|c| c.conn.rtt().as_secs_f64() * 1000.0),
            bandwidth_mbps: chosen.and_then(|c| Some(self.link(c.link.address()).up?.mbps)),
            cloud_connected: Some(chosen.is_some()),
            cloud_queue: chosen.map(|c| f64::from(c.link.busy(&c.load))),
            local_queue: Some((local.running + local.queued) as f64),
            input_bytes: input_bytes.map(|b| b as f64),
        }
    }

    /// Decides where `spec` runs now.
    pub fn place(
        &self,
        spec: &TaskSpec,
        requested: Where,
        chosen: Option<&Chosen>,
        local: Load,
        input_bytes: Option<u64>,
    ) -> Decided {
        let now = Instant::now();
        if input_bytes.is_some_and(|b| b >= updraft_proto::policy::link::MIN_SAMPLE_BYTES) {
            *self.data_heavy.lock().expect("data-heavy lock") = Some(now);
        }
        let signals = self.signals(chosen, local, input_bytes);
        let board = self.board();
        let cpu_share = cost::available_cpu_share(
            board.cpu_percent.unwrap_or(0.0),
            board.cores,
            board.load_avg,
        );
        // A cgroup quota (a container, a systemd CPUQuota=) caps what a local task gets,
        // however idle the host looks.
        let limit = self.quota.as_ref().and_then(CpuQuota::read);
        let cpu_share = limit.map_or(cpu_share, |limit| {
            cpu_share.min(limit).max(cost::MIN_CPU_SHARE)
        });
        let link = chosen
            .map(|c| self.link(c.link.address()))
            .unwrap_or_default();
        let link_probing = self.probes && chosen.is_some() && !link.is_sure();
        if link_probing {
            self.probe_wanted.notify_one();
        }
        let bandwidth_mbps = link.up.map(|r| r.mbps);
        let cloud = chosen.map(|c| CloudView {
            address: c.link.address().to_string(),
            busy: c.link.busy(&c.load),
            capacity: c.load.capacity,
        });
        let placement = placement::decide(
            spec,
            requested,
            cloud.as_ref(),
            || {
                self.policy.decide(
                    TaskInfo {
                        name: &spec.name,
                        tags: &spec.tags,
                    },
                    &signals,
                    now,
                )
            },
            || {
                let model = self.cost.lock().expect("cost lock");
                let local_run = model
                    .expected_local_run(&spec.name, input_bytes, cpu_share)
                    .unwrap_or_default();
                let cloud_service = model.typical_cloud_run().unwrap_or_default();
                let c = Conditions {
                    cpu_share,
                    local_queue_wait: cost::queue_wait(
                        local.running as u32,
                        local.queued as u32,
                        local.capacity as u32,
                        local_run,
                    ),
                    rtt: chosen.map(|c| c.conn.rtt()),
                    // A direction not measured yet borrows the other's; neither measured:
                    // the model's own estimate (from earlier runs, persisted), else a guess.
                    bandwidth_mbps: link.up.or(link.down).map(|r| r.mbps),
                    download_mbps: link.down.or(link.up).map(|r| r.mbps),
                    bandwidth_sd: match (link.up, link.down) {
                        (Some(u), Some(d)) => u.sd.max(d.sd),
                        (Some(r), None) | (None, Some(r)) => {
                            r.sd.max(updraft_proto::policy::link::PRIOR_SD)
                        }
                        (None, None) => updraft_proto::policy::link::PRIOR_SD,
                    },
                    link_probing,
                    cloud_queue_wait: chosen.map_or(Duration::ZERO, |c| {
                        cost::queue_wait(
                            c.load.running,
                            c.load.queued,
                            c.load.capacity,
                            cloud_service,
                        )
                    }),
                    cloud_available: chosen.is_some(),
                    on_battery: board.power.on_battery == Some(true),
                };
                model.predict(&spec.name, input_bytes, &c, now, rand::random::<f64>())
            },
        );
        Decided {
            placement,
            signals,
            cpu_share,
            bandwidth_mbps,
        }
    }

    /// Teaches the cost model a local run that ended with an exit code.
    pub fn record_local(
        &self,
        task: &str,
        run: Duration,
        cpu_share: f64,
        input_bytes: u64,
        output_bytes: u64,
    ) {
        let sample = LocalRun {
            run,
            cpu_share,
            input_bytes,
            output_bytes,
        };
        self.cost
            .lock()
            .expect("cost lock")
            .record_local(task, &sample, Instant::now());
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Teaches the cost model a cloud run on the daemon at `address` that ended with an
    /// exit code: first that daemon's link (the run's transfer), then the run itself,
    /// relative to the link as just learnt.
    pub fn record_cloud(
        &self,
        task: &str,
        address: &str,
        total: Duration,
        rtt: Option<Duration>,
        trailer: &Trailer,
    ) {
        let now = Instant::now();
        let mut sample = CloudRun::from_trailer(total, rtt, None, trailer);
        let updated = {
            let mut links = self.links.lock().expect("links lock");
            let l = links.entry(address.to_string()).or_default();
            if let Some(secs) = sample.transfer_secs() {
                l.record_transfer(sample.input_bytes, sample.output_bytes, secs, now);
            }
            *l
        };
        let (up, down) = (updated.up.get(now), updated.down.get(now));
        sample.bandwidth_mbps = up.or(down).map(|r| r.mbps);
        sample.download_mbps = down.or(up).map(|r| r.mbps);
        self.cost
            .lock()
            .expect("cost lock")
            .record_cloud(task, &sample, now);
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// One sampling round: board signals, link throughput, policy observation, policy
    /// file check, and (now and then) persisting the estimates.
    pub fn tick(&self, uplink: &Uplink, local: Load) {
        let board = self.sampler.lock().expect("sampler lock").sample();
        *self.board.lock().expect("board lock") = board;
        let chosen = uplink.pick();
        let signals = self.signals(chosen.as_ref(), local, None);
        self.policy.observe(&signals, Instant::now());
        if self.policy.changed() {
            self.reload_policy("file changed");
        }
        let due = self.last_persist.lock().expect("persist lock").elapsed() >= PERSIST_EVERY;
        if due {
            self.persist();
        }
    }

    /// Writes the estimates if they changed (atomically: a crash never leaves half a file).
    pub fn persist(&self) {
        *self.last_persist.lock().expect("persist lock") = Instant::now();
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return;
        }
        let snapshot = self
            .cost
            .lock()
            .expect("cost lock")
            .snapshot(Instant::now());
        let tmp = self.estimates.with_extension("json.tmp");
        let written = serde_json::to_vec(&snapshot)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &self.estimates));
        if let Err(e) = written {
            warn!(path = %self.estimates.display(), error = %e, "cannot save estimates; will retry");
            self.dirty.store(true, Ordering::Relaxed);
        }
    }

    /// For `status`: the cost model's task count and learnt link bandwidth, and each
    /// daemon's link estimate with its uncertainty and age.
    pub fn estimates_summary(&self) -> serde_json::Value {
        let now = Instant::now();
        let rate = |r: Option<Rate>| match r {
            None => serde_json::json!("unmeasured"),
            Some(r) => serde_json::json!({
                "mbps": (r.mbps * 100.0).round() / 100.0,
                "uncertainty_pct": ((updraft_proto::policy::exp(r.sd) - 1.0) * 100.0).round(),
                "age_s": r.age.as_secs(),
                "samples": r.samples,
            }),
        };
        let links: serde_json::Map<String, serde_json::Value> = self
            .links
            .lock()
            .expect("links lock")
            .iter()
            .map(|(address, l)| {
                let v =
                    serde_json::json!({ "up": rate(l.up.get(now)), "down": rate(l.down.get(now)) });
                (address.clone(), v)
            })
            .collect();
        let m = self.cost.lock().expect("cost lock");
        serde_json::json!({
            "tasks": m.len(),
            "observed_bandwidth_mbps": m.observed_bandwidth_mbps(),
            "links": links,
        })
    }
}
