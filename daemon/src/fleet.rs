//! The fleet this daemon knows: every agent that connected or enrolled, what it said on
//! its fleet stream (version, policy in force, placement mix), its certificate, and
//! whether an operator revoked it. Kept in `state_dir/fleet/ID.json` across restarts;
//! `updraftd agents` reads it through the admin socket ([`crate::admin`]).
//!
//! The registry is the one seam fleet state goes through: the fleet stream ([`stream`])
//! and the connection handler write it, the admin socket reads it and revokes through it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tracing::{info, warn};
use updraft_proto::fleet::{AgentReport, FleetNotice, PlacementMix, PolicyState, PushOutcome};
use updraft_proto::CLOSE_REVOKED;
use updraft_shared::files::write_atomic;
use updraft_shared::tls::AuthenticatedPeer;

use crate::issued::{Issued, IssuedError};

pub(crate) mod push;
pub(crate) mod stream;

/// Most agents the registry keeps. An agent needs a certificate from this CA to be
/// registered, so the bound is against a runaway, not a stranger; past it, new agents
/// are served but not registered (and a warning says so).
pub(crate) const MAX_AGENTS: usize = 100_000;

/// Most agents with their own series on `/metrics` (the first by id): 4 series each, so
/// a scrape stays under ~4000 agent series however large the fleet.
pub(crate) const MAX_AGENT_SERIES: usize = 1000;

/// What the registry keeps of one agent, as `updraftd agents --json` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct AgentRecord {
    /// The agent id (its certificate's common name).
    pub(crate) agent_id: String,
    /// When this daemon first saw it (enrolled or connected), Unix milliseconds.
    pub(crate) first_seen_unix_ms: u64,
    /// When it was last connected or reported, Unix milliseconds.
    pub(crate) last_seen_unix_ms: u64,
    /// The address its last connection came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) address: Option<String>,
    /// Its version, from its last report (absent: it never sent one; an agent older
    /// than the fleet stream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) version: Option<String>,
    /// Serial (lowercase hex) of the certificate it last connected or enrolled with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) cert_serial: Option<String>,
    /// When that certificate expires, Unix milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) cert_not_after_unix_ms: Option<u64>,
    /// The placement policy in force, from its last report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) policy: Option<PolicyState>,
    /// Where its tasks ran over the hour before its last report.
    #[serde(default)]
    pub(crate) mix: PlacementMix,
    /// Where its tasks ran since it started, as of its last report.
    #[serde(default)]
    pub(crate) totals: PlacementMix,
    /// Whether it applies pushed policies.
    #[serde(default)]
    pub(crate) accept_push: bool,
    /// What it did with the last pushed policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) push: Option<PushOutcome>,
    /// When an operator revoked it, Unix milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) revoked_unix_ms: Option<u64>,
    /// Cluster mode: the server id of the replica it is connected to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) connected_to: Option<u8>,
}

/// One agent as listed: its record and whether it is connected now.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct AgentView {
    /// What is kept.
    #[serde(flatten)]
    pub(crate) record: AgentRecord,
    /// Connections it holds to this daemon now (in cluster mode: at least 1 while it
    /// is connected to another replica).
    pub(crate) connections: usize,
}

/// A live connection of an agent, so a revocation can close it and a push reach it.
struct Live {
    id: usize,
    conn: quinn::Connection,
    /// Its fleet stream's notice queue, once the stream is open.
    notices: Option<mpsc::Sender<FleetNotice>>,
    /// The pushed policy already sent on this connection.
    sent: Option<String>,
}

#[derive(Default)]
struct Entry {
    record: AgentRecord,
    live: Vec<Live>,
}

/// Why the registry could not do what an operator asked.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FleetError {
    /// No agent with that id connected to or enrolled with this daemon.
    #[error("no agent `{0}` is known to this daemon (see `updraftd agents`)")]
    Unknown(String),
    /// The deny list could not be written.
    #[error(transparent)]
    Issued(#[from] IssuedError),
    /// The agent's record could not be written.
    #[error("cannot write {}: {error} (check state_dir in daemon.toml)", path.display())]
    Write {
        /// The record file.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
}

/// What a revocation did.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Revoked {
    /// The agent.
    pub(crate) agent_id: String,
    /// Certificate serials now on the deny list.
    pub(crate) serials: Vec<String>,
    /// Live connections closed.
    pub(crate) closed: usize,
}

/// The fleet: agents by id.
pub(crate) struct Registry {
    dir: PathBuf,
    agents: Mutex<BTreeMap<String, Entry>>,
    /// The policy rollout, if one was pushed; kept at `push_path`.
    rollout: Mutex<Option<push::Rollout>>,
    push_path: PathBuf,
    /// Cluster mode: where changes go so the other replicas see them.
    mirror: std::sync::OnceLock<crate::cluster::fleet::Mirror>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("dir", &self.dir).finish()
    }
}

pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Registry {
    /// The registry kept in `state_dir/fleet`, read back from the records there. A
    /// damaged record is skipped with a warning (the agent is registered again when it
    /// next connects).
    pub(crate) fn open(state_dir: &Path) -> Self {
        let dir = state_dir.join("fleet");
        let mut agents = BTreeMap::new();
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let path = e.path();
                if path.extension().and_then(|x| x.to_str()) != Some("json") {
                    continue;
                }
                if agents.len() >= MAX_AGENTS {
                    warn!(dir = %dir.display(), "more than {MAX_AGENTS} agent records; the rest are not loaded");
                    break;
                }
                let parsed = std::fs::read(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|d| {
                        serde_json::from_slice::<AgentRecord>(&d).map_err(|e| e.to_string())
                    });
                match parsed {
                    Ok(record) if updraft_shared::tls::check_agent_id(&record.agent_id).is_ok() => {
                        agents.insert(
                            record.agent_id.clone(),
                            Entry {
                                record,
                                live: Vec::new(),
                            },
                        );
                    }
                    Ok(_) => {
                        warn!(path = %path.display(), "agent record names an invalid agent id; skipped")
                    }
                    Err(error) => {
                        warn!(path = %path.display(), %error, "agent record is damaged; skipped (the agent is registered again when it next connects)")
                    }
                }
            }
        }
        let push_path = state_dir.join("push.json");
        let rollout = match std::fs::read(&push_path) {
            Ok(d) => match serde_json::from_slice::<push::Rollout>(&d) {
                Ok(r) => Some(r),
                Err(error) => {
                    warn!(path = %push_path.display(), %error, "the saved policy rollout is damaged; it is dropped (push again)");
                    None
                }
            },
            Err(_) => None,
        };
        Self {
            dir,
            agents: Mutex::new(agents),
            rollout: Mutex::new(rollout),
            push_path,
            mirror: std::sync::OnceLock::new(),
        }
    }

    /// Cluster mode: from now on every change also goes to `mirror`.
    pub(crate) fn mirror_to(&self, mirror: crate::cluster::fleet::Mirror) {
        let _ = self.mirror.set(mirror);
    }

    /// This replica's server id, in cluster mode.
    fn me(&self) -> Option<u8> {
        self.mirror.get().map(|m| m.server_id)
    }

    /// Takes in a record another replica wrote, when it is newer than the one here
    /// (live connections here are kept; a revocation is never undone).
    pub(crate) fn merge(&self, remote: AgentRecord) {
        let mut agents = self.agents.lock().unwrap_or_else(|e| e.into_inner());
        if !agents.contains_key(&remote.agent_id) && agents.len() >= MAX_AGENTS {
            return;
        }
        let entry = agents.entry(remote.agent_id.clone()).or_default();
        let local = &entry.record;
        if !local.agent_id.is_empty() && remote.last_seen_unix_ms <= local.last_seen_unix_ms {
            return;
        }
        let mut record = remote;
        if !local.agent_id.is_empty() {
            record.first_seen_unix_ms = record.first_seen_unix_ms.min(local.first_seen_unix_ms);
            record.revoked_unix_ms = record.revoked_unix_ms.or(local.revoked_unix_ms);
        }
        entry.record = record;
        if let Err(e) = self.save(&entry.record) {
            warn!(agent = entry.record.agent_id, error = %e, "cannot save an agent record from another replica; it is kept in memory");
        }
    }

    /// Another replica revoked `agent_id`: its connections here close with
    /// [`CLOSE_REVOKED`] and its record says revoked. Returns the connections closed.
    pub(crate) fn revoked_elsewhere(&self, agent_id: &str) -> usize {
        let now = SystemTime::now();
        let mut agents = self.agents.lock().unwrap_or_else(|e| e.into_inner());
        let Some(entry) = agents.get_mut(agent_id) else {
            return 0;
        };
        entry.record.revoked_unix_ms.get_or_insert(unix_ms(now));
        let why = crate::enroll::revoked_message(crate::issued::Revocation::Operator, agent_id);
        let closed = entry.live.len();
        for live in entry.live.drain(..) {
            live.conn.close(CLOSE_REVOKED.into(), why.as_bytes());
        }
        if let Err(e) = self.save(&entry.record) {
            warn!(agent = agent_id, error = %e, "cannot save the agent's record");
        }
        closed
    }

    fn path(&self, agent_id: &str) -> PathBuf {
        // Agent ids are letters, digits, '-', '_', '.' (checked at the handshake and
        // enrollment): no separator, and the suffix keeps "." and ".." from naming
        // directories.
        self.dir.join(format!("{agent_id}.json"))
    }

    fn save(&self, record: &AgentRecord) -> Result<(), FleetError> {
        let path = self.path(&record.agent_id);
        let write = || {
            std::fs::create_dir_all(&self.dir)?;
            let json = serde_json::to_vec(record).expect("records always serialize");
            write_atomic(&path, &json, 0o600)
        };
        write().map_err(|error| FleetError::Write { path, error })
    }

    /// Updates (or creates, within [`MAX_AGENTS`]) the record of `agent_id` with `f`
    /// and saves it; a failed save is logged, the daemon serves on.
    fn update<T>(
        &self,
        agent_id: &str,
        now: SystemTime,
        f: impl FnOnce(&mut Entry) -> T,
    ) -> Option<T> {
        let mut agents = self.agents.lock().unwrap_or_else(|e| e.into_inner());
        if !agents.contains_key(agent_id) {
            if agents.len() >= MAX_AGENTS {
                warn!(
                    agent = agent_id,
                    "the registry holds {MAX_AGENTS} agents; this one is served but not registered"
                );
                return None;
            }
            let mut entry = Entry::default();
            entry.record.agent_id = agent_id.to_string();
            entry.record.first_seen_unix_ms = unix_ms(now);
            agents.insert(agent_id.to_string(), entry);
        }
        let entry = agents.get_mut(agent_id)?;
        entry.record.last_seen_unix_ms = unix_ms(now);
        let out = f(entry);
        if let Some(me) = self.me() {
            if !entry.live.is_empty() {
                entry.record.connected_to = Some(me);
            } else if entry.record.connected_to == Some(me) {
                entry.record.connected_to = None;
            }
        }
        if let Err(e) = self.save(&entry.record) {
            warn!(agent = agent_id, error = %e, "cannot save the agent's record; it is kept in memory");
        }
        if let Some(m) = self.mirror.get() {
            m.send(crate::cluster::fleet::Change::Agent(Box::new(
                entry.record.clone(),
            )));
        }
        Some(out)
    }

    /// An agent's connection `conn` passed the handshake.
    pub(crate) fn connected(&self, peer: &AuthenticatedPeer, conn: &quinn::Connection) {
        let now = SystemTime::now();
        self.update(peer.agent_id(), now, |e| {
            e.record.address = Some(conn.remote_address().to_string());
            e.record.cert_serial = Some(peer.serial().to_string());
            e.record.cert_not_after_unix_ms = Some(unix_ms(peer.not_after()));
            e.live.push(Live {
                id: conn.stable_id(),
                conn: conn.clone(),
                notices: None,
                sent: None,
            });
        });
    }

    /// The connection with `conn_id` of `agent_id` ended.
    pub(crate) fn disconnected(&self, agent_id: &str, conn_id: usize) {
        self.update(agent_id, SystemTime::now(), |e| {
            e.live.retain(|l| l.id != conn_id);
        });
    }

    /// An agent enrolled or renewed: `serial`, valid until `not_after_ms`.
    pub(crate) fn issued(
        &self,
        agent_id: &str,
        serial: &str,
        not_after_ms: u64,
        from: Option<String>,
    ) {
        self.update(agent_id, SystemTime::now(), |e| {
            e.record.cert_serial = Some(serial.to_string());
            e.record.cert_not_after_unix_ms = Some(not_after_ms);
            if from.is_some() {
                e.record.address = from;
            }
        });
    }

    /// A validated report arrived on the fleet stream of connection `conn_id`, whose
    /// notices go to `notices`. A rollout in progress moves on, and the policy goes to
    /// this agent when it is due one.
    pub(crate) fn reported(
        &self,
        agent_id: &str,
        conn_id: usize,
        report: AgentReport,
        notices: &mpsc::Sender<FleetNotice>,
    ) {
        self.update(agent_id, SystemTime::now(), |e| {
            let r = &mut e.record;
            r.version = Some(report.version);
            r.policy = Some(report.policy);
            r.mix = report.mix;
            r.totals = report.totals;
            r.accept_push = report.accept_push;
            if report.push.is_some() {
                r.push = report.push;
            }
            if let Some(live) = e.live.iter_mut().find(|l| l.id == conn_id) {
                live.notices.get_or_insert_with(|| notices.clone());
            }
        });
        self.advance(Some(agent_id));
    }

    /// [`advance`](Self::advance) when a rollout is in its canary stage: a timer calls
    /// this, so a canary window that ends with no report still moves the rollout on.
    pub(crate) fn advance_canary(&self) {
        let canary = self
            .rollout
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|r| r.phase == push::Phase::Canary);
        if canary {
            self.advance(None);
        }
    }

    /// Moves a rollout in its canary stage on. Sends the policy to every live agent due
    /// it that does not have it yet when the stage changed (or `only` is `None` and
    /// `all` asks for it), else to agent `only`.
    fn advance(&self, only: Option<&str>) {
        self.advance_and(only, false);
    }

    fn advance_and(&self, only: Option<&str>, all: bool) {
        let mut agents = self.agents.lock().unwrap_or_else(|e| e.into_inner());
        let mut rollout = self.rollout.lock().unwrap_or_else(|e| e.into_inner());
        let Some(r) = rollout.as_mut() else { return };
        let records: BTreeMap<String, AgentRecord> = match r.phase {
            push::Phase::Canary => agents
                .iter()
                .filter(|(id, _)| r.canary.contains(id))
                .map(|(id, e)| (id.clone(), e.record.clone()))
                .collect(),
            _ => BTreeMap::new(),
        };
        let before = r.phase;
        r.step(&records, unix_ms(SystemTime::now()));
        if r.phase != before {
            match &r.stopped {
                Some(why) => warn!(hash = r.hash, "policy push of {} stopped: {why}", r.name),
                None => info!(
                    hash = r.hash,
                    "policy push of {}: the canaries took it; now every board in scope gets it",
                    r.name
                ),
            }
            self.save_rollout(r);
        }
        if all || r.phase != before {
            for e in agents.values_mut() {
                deliver(r, e);
            }
        } else if let Some(e) = only.and_then(|a| agents.get_mut(a)) {
            deliver(r, e);
        }
    }

    /// Starts pushing `spec` (see [`push::Rollout::start`]); replaces a push before it.
    pub(crate) fn push(&self, spec: push::PushSpec) -> Result<serde_json::Value, push::StartError> {
        {
            let agents = self.agents.lock().unwrap_or_else(|e| e.into_inner());
            let list: Vec<(AgentRecord, bool)> = agents
                .values()
                .map(|e| (e.record.clone(), view(e).connections > 0))
                .collect();
            let now = unix_ms(SystemTime::now());
            let r = push::Rollout::start(spec, &list, now)?;
            info!(
                hash = r.hash,
                canary = r.canary.join(","),
                "policy push of {} started",
                r.name
            );
            self.save_rollout(&r);
            *self.rollout.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        }
        self.advance_and(None, true);
        Ok(self.push_status())
    }

    /// The rollout and each board in its scope: the policy it runs, and what it did
    /// with the pushed one.
    pub(crate) fn push_status(&self) -> serde_json::Value {
        let agents = self.agents.lock().unwrap_or_else(|e| e.into_inner());
        let rollout = self.rollout.lock().unwrap_or_else(|e| e.into_inner());
        let Some(r) = rollout.as_ref() else {
            return serde_json::json!({ "push": null });
        };
        let boards: Vec<serde_json::Value> = agents
            .values()
            .filter(|e| r.in_scope(&e.record.agent_id))
            .map(|e| {
                let rec = &e.record;
                let has = rec.policy.as_ref().is_some_and(|p| p.hash == r.hash);
                let outcome = rec.push.as_ref().filter(|p| p.hash == r.hash);
                serde_json::json!({
                    "agent_id": rec.agent_id,
                    "connected": view(e).connections > 0,
                    "in_force": has,
                    "canary": r.canary.contains(&rec.agent_id),
                    "result": outcome.map(|p| p.result.as_str()),
                    "message": outcome.and_then(|p| p.message.clone()),
                })
            })
            .collect();
        serde_json::json!({
            "push": {
                "hash": r.hash,
                "file": r.name,
                "phase": r.phase,
                "stopped": r.stopped,
                "canary": r.canary,
                "targets": r.targets,
                "window_ms": r.window_ms,
                "started_unix_ms": r.started_unix_ms,
            },
            "boards": boards,
        })
    }

    /// Saves the rollout, and in cluster mode shares it with the other replicas.
    fn save_rollout(&self, r: &push::Rollout) {
        self.keep_rollout(r);
        if let Some(m) = self.mirror.get() {
            m.send(crate::cluster::fleet::Change::Push(Box::new(r.clone())));
        }
    }

    fn keep_rollout(&self, r: &push::Rollout) {
        let json = serde_json::to_vec(r).expect("rollouts always serialize");
        if let Err(e) = write_atomic(&self.push_path, &json, 0o600) {
            warn!(path = %self.push_path.display(), error = %e, "cannot save the policy rollout; it goes on in memory");
        }
    }

    /// Cluster mode: takes up the rollout another replica shared when it is a newer
    /// push, or the same push at a later stage; the policy then goes to the boards
    /// connected here that are due it.
    pub(crate) fn adopt_rollout(&self, remote: push::Rollout) {
        {
            let mut rollout = self.rollout.lock().unwrap_or_else(|e| e.into_inner());
            if !rollout
                .as_ref()
                .is_none_or(|local| remote.supersedes(local))
            {
                return;
            }
            info!(
                hash = remote.hash,
                phase = ?remote.phase,
                "policy push of {} taken up from another replica",
                remote.name
            );
            self.keep_rollout(&remote);
            *rollout = Some(remote);
        }
        self.advance_and(None, true);
    }

    /// The per-agent series for `/metrics`: the first [`MAX_AGENT_SERIES`] agents by
    /// id, and counts of all agents by state.
    pub(crate) fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        use updraft_shared::metrics::{header, labels};
        let agents = self.agents.lock().unwrap_or_else(|e| e.into_inner());
        let state = |e: &Entry| match (e.record.revoked_unix_ms, e.live.is_empty()) {
            (Some(_), _) => "revoked",
            (None, false) => "connected",
            (None, true) => "offline",
        };
        header(
            out,
            "updraftd_agents",
            "gauge",
            "Agents in the registry, by state.",
        );
        for s in ["connected", "offline", "revoked"] {
            let n = agents.values().filter(|e| state(e) == s).count();
            let _ = writeln!(out, "updraftd_agents{{state=\"{s}\"}} {n}");
        }
        let shown: Vec<&Entry> = agents.values().take(MAX_AGENT_SERIES).collect();
        header(
            out,
            "updraftd_agent_series_dropped",
            "gauge",
            "Agents left out of the per-agent series (past the limit of 1000).",
        );
        let _ = writeln!(
            out,
            "updraftd_agent_series_dropped {}",
            agents.len() - shown.len()
        );
        header(
            out,
            "updraftd_agent_connected",
            "gauge",
            "1 when the agent holds a connection to this daemon.",
        );
        for e in &shown {
            let l = labels(&[("agent", &e.record.agent_id)]);
            let _ = writeln!(
                out,
                "updraftd_agent_connected{{{l}}} {}",
                u8::from(!e.live.is_empty())
            );
        }
        header(
            out,
            "updraftd_agent_cert_expiry_timestamp_seconds",
            "gauge",
            "When the certificate the agent last connected with expires, Unix seconds.",
        );
        for e in &shown {
            if let Some(t) = e.record.cert_not_after_unix_ms {
                let l = labels(&[("agent", &e.record.agent_id)]);
                let _ = writeln!(
                    out,
                    "updraftd_agent_cert_expiry_timestamp_seconds{{{l}}} {}",
                    t / 1000
                );
            }
        }
        header(out, "updraftd_agent_tasks_total", "counter", "Tasks the agent ran since it started, by placement (local, cloud, fallback), as it last reported; resets when the agent restarts.");
        for e in &shown {
            let t = &e.record.totals;
            for (placement, n) in [
                ("local", t.local),
                ("cloud", t.cloud),
                ("fallback", t.fallback),
            ] {
                let l = labels(&[("agent", &e.record.agent_id), ("placement", placement)]);
                let _ = writeln!(out, "updraftd_agent_tasks_total{{{l}}} {n}");
            }
        }
    }

    /// Every agent, by id.
    pub(crate) fn list(&self) -> Vec<AgentView> {
        let agents = self.agents.lock().unwrap_or_else(|e| e.into_inner());
        agents.values().map(view).collect()
    }

    /// One agent.
    pub(crate) fn get(&self, agent_id: &str) -> Option<AgentView> {
        let agents = self.agents.lock().unwrap_or_else(|e| e.into_inner());
        agents.get(agent_id).map(view)
    }

    /// Revokes `agent_id`: the certificates issued to it and the one it was last seen
    /// with go on `issued`'s deny list (checked at every handshake and renewal), and its
    /// live connections are closed with [`CLOSE_REVOKED`].
    pub(crate) fn revoke(&self, agent_id: &str, issued: &Issued) -> Result<Revoked, FleetError> {
        let now = SystemTime::now();
        let mut agents = self.agents.lock().unwrap_or_else(|e| e.into_inner());
        let entry = agents
            .get_mut(agent_id)
            .ok_or_else(|| FleetError::Unknown(agent_id.to_string()))?;
        let seen: Vec<(String, u64)> = entry
            .record
            .cert_serial
            .clone()
            .zip(entry.record.cert_not_after_unix_ms)
            .into_iter()
            .collect();
        let denied = issued.revoke(agent_id, &seen, now)?;
        if let Some(m) = self.mirror.get() {
            for (serial, not_after_ms) in &denied {
                m.send(crate::cluster::fleet::Change::Revoked(
                    crate::cluster::fleet::Denied {
                        serial: serial.clone(),
                        agent_id: agent_id.to_string(),
                        not_after_ms: *not_after_ms,
                        why: crate::issued::Revocation::Operator,
                    },
                ));
            }
        }
        let serials = denied.into_iter().map(|(s, _)| s).collect();
        entry.record.revoked_unix_ms = Some(unix_ms(now));
        let closed = entry.live.len();
        let why = crate::enroll::revoked_message(crate::issued::Revocation::Operator, agent_id);
        for live in entry.live.drain(..) {
            live.conn.close(CLOSE_REVOKED.into(), why.as_bytes());
        }
        self.save(&entry.record)?;
        if let Some(m) = self.mirror.get() {
            m.send(crate::cluster::fleet::Change::Agent(Box::new(
                entry.record.clone(),
            )));
        }
        Ok(Revoked {
            agent_id: agent_id.to_string(),
            serials,
            closed,
        })
    }
}

/// Sends the rollout's policy on every live fleet stream of agent `e` if it is due it,
/// runs another policy, has not answered this one, and was not sent it on that
/// connection.
fn deliver(r: &push::Rollout, e: &mut Entry) {
    {
        let rec = &e.record;
        if !r.wants(&rec.agent_id)
            || rec.revoked_unix_ms.is_some()
            || rec.policy.as_ref().is_some_and(|p| p.hash == r.hash)
            || rec.push.as_ref().is_some_and(|p| p.hash == r.hash)
        {
            return;
        }
        for live in &mut e.live {
            let Some(tx) = &live.notices else { continue };
            if live.sent.as_deref() == Some(r.hash.as_str()) {
                continue;
            }
            let notice = FleetNotice::Policy {
                hash: r.hash.clone(),
                text: r.text.clone(),
            };
            // A full queue: the next report tries again.
            if tx.try_send(notice).is_ok() {
                live.sent = Some(r.hash.clone());
            }
        }
    }
}

fn view(e: &Entry) -> AgentView {
    // Connected to another replica of the cluster: one connection, not here.
    let elsewhere = e.live.is_empty() && e.record.connected_to.is_some();
    AgentView {
        record: e.record.clone(),
        connections: e.live.len() + usize::from(elsewhere),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_a_restart_and_damaged_ones_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path());
        let now = SystemTime::now();
        reg.update("board-1", now, |e| {
            e.record.version = Some("0.1.0".into());
        });
        reg.issued("board-2", "0a0b", 42, Some("10.0.0.2:4433".into()));
        std::fs::write(dir.path().join("fleet/broken.json"), b"{not json").unwrap();
        let again = Registry::open(dir.path());
        let list = again.list();
        let ids: Vec<&str> = list.iter().map(|a| a.record.agent_id.as_str()).collect();
        assert_eq!(ids, ["board-1", "board-2"]);
        assert_eq!(list[0].record.version.as_deref(), Some("0.1.0"));
        assert_eq!(list[1].record.cert_serial.as_deref(), Some("0a0b"));
        assert_eq!(list[1].connections, 0);
    }

    #[test]
    fn revoking_an_unknown_agent_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path());
        let e = reg.revoke("nobody", &Issued::new(dir.path())).unwrap_err();
        assert!(e.to_string().contains("no agent `nobody`"), "{e}");
    }

    #[test]
    fn revocation_denies_the_certificates_seen_and_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path());
        let issued = Issued::new(dir.path());
        let far = unix_ms(SystemTime::now()) + 3_600_000;
        reg.issued("board-1", "abcd", far, None);
        let r = reg.revoke("board-1", &issued).unwrap();
        assert_eq!(r.serials, ["abcd"]);
        assert!(issued.is_revoked("abcd"));
        assert_eq!(
            issued.revocation("abcd"),
            Some(crate::issued::Revocation::Operator)
        );
        let again = Registry::open(dir.path());
        assert!(again
            .get("board-1")
            .unwrap()
            .record
            .revoked_unix_ms
            .is_some());
    }
}
