//! The agent's configuration: `agent.toml` as written, validated into [`AgentConfig`].
//! Relative paths are taken relative to the config file's directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use updraft_proto::units::{ByteSize, HumanDuration};
use updraft_shared::catalog::{Catalog, TaskFile};
use updraft_shared::config::TlsFile;
use updraft_shared::config::{ConfigError, Ranges};

/// Where the agent looks for its config when none is given.
pub const DEFAULT_CONFIG: &str = "/etc/updraft/agent.toml";
/// Default local API socket.
pub const DEFAULT_SOCKET: &str = "/run/updraft/agent.sock";
/// Environment prefix for overrides: `UPDRAFT_AGENT__SOCKET=...`.
pub const ENV_PREFIX: &str = "UPDRAFT_AGENT";

/// `agent.toml` as written.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    /// This board's id. Default: the common name of the agent certificate.
    pub agent_id: Option<String>,
    /// Local API socket. Default `/run/updraft/agent.sock`.
    pub socket: Option<PathBuf>,
    /// TCP address to serve `GET /metrics` on for Prometheus (off by default; the
    /// socket's `/metrics` is always there).
    pub metrics_listen: Option<String>,
    /// Log level (`error` .. `trace`) or filter directive; `UPDRAFT_AGENT_LOG` overrides it. Default `info`.
    pub log_level: Option<String>,
    /// Agent state (certificates, spooled output). Default `/var/lib/updraft`.
    pub state_dir: Option<PathBuf>,
    /// Tasks run on the board at once. Default: the number of CPUs. (Counts are read
    /// as u64 and range-checked before they become a usize, on every target.)
    pub max_local_concurrency: Option<u64>,
    /// Local tasks waiting for a slot before new ones get `busy`. Default 64.
    pub max_local_queue: Option<u64>,
    /// Output kept in memory per task before it spills to a file in `state_dir`. Default 1MiB.
    pub spool_memory: Option<ByteSize>,
    /// Daemons to offload to, in order of preference when equally loaded.
    #[serde(default)]
    pub cloud: Vec<CloudFile>,
    /// TLS material.
    #[serde(default)]
    pub tls: TlsFile,
    /// Link timing.
    #[serde(default)]
    pub link: LinkFile,
    /// Placement policy: `policy = "FILE"`, or a `[policy]` table with `file` and
    /// `accept_push`. Default file `/etc/updraft/policy.toml`; when it does not exist,
    /// every task is placed automatically.
    pub policy: Option<PolicyKey>,
    /// Signal sampling.
    #[serde(default)]
    pub signals: SignalsFile,
    /// The local API's limits.
    #[serde(default)]
    pub api: ApiFile,
    /// The store of detached tasks.
    #[serde(default)]
    pub journal: JournalFile,
    /// The catalog of tasks this agent accepts.
    #[serde(default)]
    pub tasks: BTreeMap<String, TaskFile>,
}

/// One `[[cloud]]` entry.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudFile {
    /// `host:port` of a daemon.
    pub address: String,
    /// Name to verify in the daemon's certificate. Default: the host part of `address`.
    pub server_name: Option<String>,
}

/// `[link]` as written.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkFile {
    /// QUIC keep-alive period. Default 500ms (keep it below the daemon's load_report_interval).
    pub keep_alive: Option<HumanDuration>,
    /// A connection silent this long is dead. Default 10s.
    pub idle_timeout: Option<HumanDuration>,
    /// Limit for one connection attempt. Default 5s.
    pub connect_timeout: Option<HumanDuration>,
    /// How long a daemon may take to accept a task before it runs on the board instead. Default 3s.
    pub accept_timeout: Option<HumanDuration>,
    /// First reconnect delay. Default 200ms.
    pub reconnect_min: Option<HumanDuration>,
    /// Longest reconnect delay. Default 30s.
    pub reconnect_max: Option<HumanDuration>,
    /// Input bytes kept per task until the daemon accepts it, so the task can still
    /// run on the board if the daemon does not. Default 1MiB.
    pub replay_buffer: Option<ByteSize>,
    /// How long a task that must run in the cloud waits for a daemon after losing its
    /// connection mid-task, before it fails with `cloud_failed` (detached tasks wait on).
    /// Default 10s.
    pub failover_wait: Option<HumanDuration>,
    /// Measure the link with small probes over the live connection when its estimate
    /// is unknown or stale. `false` never probes (metered links). Default true.
    pub probe: Option<bool>,
    /// Probe bytes (both directions together) the agent may spend an hour, per daemon.
    /// Default 16MiB, range 32KiB to 1GiB and at least twice `probe_bytes`.
    pub probe_budget: Option<ByteSize>,
    /// Payload bytes each way of one probe. Default 256KiB, range 16KiB to 1MiB.
    pub probe_bytes: Option<ByteSize>,
}

/// `[journal]` as written: the SQLite store of detached tasks in `state_dir`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalFile {
    /// Input and output bytes the journal may hold; past it, new detached tasks are
    /// refused with `journal_full`. Default 256MiB.
    pub max_bytes: Option<ByteSize>,
    /// How long a finished task's result is kept when nobody fetches it. Default 24h.
    pub result_ttl: Option<HumanDuration>,
    /// How long a result is kept after its output was first fetched. Default 1h.
    pub fetched_ttl: Option<HumanDuration>,
    /// Detached tasks in progress at once (running, or offloaded). Default 16.
    pub max_running: Option<u64>,
    /// Starts of one task before it is failed: a task whose run keeps taking the agent
    /// down must not crash-loop it. Default 5.
    pub max_attempts: Option<u32>,
}

/// `[signals]` as written.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalsFile {
    /// Where the kernel's power_supply class is. Default `/sys/class/power_supply`.
    pub power_supply_root: Option<PathBuf>,
    /// How often signals are sampled. Default 1s.
    pub sample_interval: Option<HumanDuration>,
}

/// `[api]` as written: limits of the local API socket.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiFile {
    /// Connections open at once; past it a new connection gets `503 busy` and is
    /// closed. Default 128, range 1 to 1024.
    pub max_connections: Option<u64>,
    /// Time a client has to send a request's headers, and the longest an open
    /// connection may sit idle between requests. Default 10s, range 100ms to 5m.
    pub header_timeout: Option<HumanDuration>,
    /// Longest pause between two pieces of a request body before the request fails
    /// with `bad_request` (a stalled upload). Default 30s, range 100ms to 1h.
    pub body_stall_timeout: Option<HumanDuration>,
}

/// `[api]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiConfig {
    /// Connections open at once.
    pub max_connections: usize,
    /// Header read (and idle) timeout.
    pub header_timeout: Duration,
    /// Longest pause inside a request body.
    pub body_stall_timeout: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            max_connections: 128,
            header_timeout: Duration::from_secs(10),
            body_stall_timeout: Duration::from_secs(30),
        }
    }
}

/// Largest `[api] max_connections`; `LimitNOFILE=` in the unit is sized for it.
pub const MAX_API_CONNECTIONS: usize = 1024;

/// Default policy file.
pub const DEFAULT_POLICY: &str = "/etc/updraft/policy.toml";
/// Where a pushed policy is kept, in `state_dir`.
pub const PUSHED_POLICY: &str = "policy.pushed.toml";

/// `policy` as written: a file name, or a `[policy]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyKey {
    /// `policy = "/etc/updraft/policy.toml"`.
    File(PathBuf),
    /// `[policy]` with `file` and `accept_push`.
    Table(PolicyTable),
}

/// The `[policy]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyTable {
    /// The policy file.
    pub file: Option<PathBuf>,
    /// Apply policies the daemons push (default true).
    pub accept_push: Option<bool>,
}

impl PolicyKey {
    fn file(&self) -> Option<PathBuf> {
        match self {
            Self::File(p) => Some(p.clone()),
            Self::Table(t) => t.file.clone(),
        }
    }

    fn accept_push(&self) -> Option<bool> {
        match self {
            Self::File(_) => None,
            Self::Table(t) => t.accept_push,
        }
    }
}

impl<'de> serde::Deserialize<'de> for PolicyKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = PolicyKey;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a policy file name, or a [policy] table with file and accept_push")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PolicyKey, E> {
                Ok(PolicyKey::File(v.into()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<PolicyKey, A::Error> {
                let table = serde::Deserialize::deserialize(
                    serde::de::value::MapAccessDeserializer::new(map),
                )?;
                Ok(PolicyKey::Table(table))
            }
        }
        d.deserialize_any(V)
    }
}

/// A daemon to connect to.
#[derive(Debug, Clone)]
pub struct CloudTarget {
    /// `host:port`.
    pub address: String,
    /// TLS server name.
    pub server_name: String,
}

/// Link timing, validated.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// Keep-alive period.
    pub keep_alive: Duration,
    /// Idle timeout.
    pub idle_timeout: Duration,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Accept timeout.
    pub accept_timeout: Duration,
    /// Backoff floor.
    pub reconnect_min: Duration,
    /// Backoff ceiling.
    pub reconnect_max: Duration,
    /// Replay buffer, bytes.
    pub replay_buffer: usize,
    /// Wait for a daemon after a mid-task loss, for tasks that must run in the cloud.
    pub failover_wait: Duration,
    /// Link probes allowed (`[link] probe`); false on metered links.
    pub probe: bool,
    /// Probe bytes, both directions together, allowed an hour per daemon.
    pub probe_budget: u64,
    /// Payload bytes each way of one probe.
    pub probe_bytes: u32,
}

/// `[journal]`, validated.
#[derive(Debug, Clone)]
pub struct JournalConfig {
    /// Limits of the store.
    pub limits: crate::journal::JournalLimits,
    /// Detached tasks in progress at once.
    pub max_running: usize,
    /// Starts of one task before it is failed.
    pub max_attempts: u32,
}

impl Default for JournalConfig {
    fn default() -> Self {
        Self {
            limits: crate::journal::JournalLimits::default(),
            max_running: 16,
            max_attempts: 5,
        }
    }
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            // Shorter than the daemon's default 1 s load reports: quinn restarts the
            // keep-alive timer on every packet received, so a longer period would never
            // fire, the agent would send nothing to be acknowledged, and its RTT (a
            // placement signal) would go stale on an idle link.
            keep_alive: Duration::from_millis(500),
            idle_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            accept_timeout: Duration::from_secs(3),
            reconnect_min: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(30),
            replay_buffer: 1 << 20,
            failover_wait: Duration::from_secs(10),
            probe: true,
            probe_budget: 16 << 20,
            probe_bytes: 256 << 10,
        }
    }
}

/// A validated agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The file it was loaded from.
    pub path: PathBuf,
    /// Agent id, if configured.
    pub agent_id: Option<String>,
    /// Local API socket.
    pub socket: PathBuf,
    /// `metrics_listen`, if set.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Log level or filter from the file, checked.
    pub log_level: Option<String>,
    /// State directory.
    pub state_dir: PathBuf,
    /// Local slots.
    pub max_local_concurrency: usize,
    /// Local queue places.
    pub max_local_queue: usize,
    /// In-memory output per task before spilling.
    pub spool_memory: usize,
    /// Daemons.
    pub clouds: Vec<CloudTarget>,
    /// CA path.
    pub tls_ca: PathBuf,
    /// Certificate path.
    pub tls_cert: PathBuf,
    /// Key path.
    pub tls_key: PathBuf,
    /// How long before expiry the certificate is renewed; `None`: a third of its lifetime.
    pub renew_before: Option<Duration>,
    /// Link timing.
    pub link: LinkConfig,
    /// Policy file (may not exist).
    pub policy: PathBuf,
    /// Whether a policy a daemon pushes is applied (`[policy] accept_push`, default
    /// true); it is kept as `state_dir/policy.pushed.toml` and is in force instead of
    /// the file while it is there.
    pub accept_push: bool,
    /// power_supply root.
    pub power_supply_root: PathBuf,
    /// Signal sampling period.
    pub sample_interval: Duration,
    /// Detached-task store.
    pub journal: JournalConfig,
    /// Local API limits.
    pub api: ApiConfig,
    /// Task catalog.
    pub catalog: Catalog,
}

impl AgentConfig {
    /// Loads and validates `path` with `UPDRAFT_AGENT__*` overrides.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file: AgentFile = updraft_shared::config::load(path, ENV_PREFIX, false)?;
        Self::from_file(file, path)
    }

    /// Validates a parsed file; `path` anchors relative paths and names errors.
    pub fn from_file(file: AgentFile, path: &Path) -> Result<Self, ConfigError> {
        let invalid = |key: &str, reason: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.into(),
            reason,
        };
        let base = path.parent().unwrap_or(Path::new("."));
        let rel = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let state_dir = rel(file.state_dir.unwrap_or_else(|| "/var/lib/updraft".into()));
        let mut clouds = Vec::new();
        for (i, c) in file.cloud.into_iter().enumerate() {
            let host = split_host(&c.address).ok_or_else(|| {
                invalid(
                    &format!("cloud[{i}].address"),
                    format!("`{}` is not host:port", c.address),
                )
            })?;
            clouds.push(CloudTarget {
                server_name: c.server_name.unwrap_or_else(|| host.to_string()),
                address: c.address,
            });
        }
        let r = updraft_shared::config::Ranges { path };
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let slots = r.count_usize(
            "max_local_concurrency",
            file.max_local_concurrency,
            cpus.min(MAX_LOCAL_SLOTS),
            1,
            MAX_LOCAL_SLOTS,
        )?;
        let link = link_config(&r, file.link)?;
        let journal = journal_config(&r, file.journal)?;
        let api = api_config(&r, file.api)?;
        let catalog = Catalog::from_files(file.tasks)
            .map_err(|e| invalid(&format!("tasks.{}", e.task), e.reason))?;
        updraft_shared::config::check_task_ranges(&catalog)
            .map_err(|(key, reason)| invalid(&key, reason))?;
        let sample_interval = r.duration(
            "signals.sample_interval",
            file.signals.sample_interval,
            Duration::from_secs(1),
            Duration::from_millis(10),
            HOUR,
        )?;
        if let Some((key, why)) = file.tls.refuse(true) {
            return Err(invalid(key, why.to_string()));
        }
        let renew_before = match file.tls.renew_before {
            None => None,
            Some(d) => Some(r.duration(
                "tls.renew_before",
                Some(d),
                d.0,
                Duration::from_secs(1),
                3650 * DAY,
            )?),
        };
        let max_local_queue =
            r.count_usize("max_local_queue", file.max_local_queue, 64, 0, 65_536)?;
        let spool_memory = r.bytes_usize("spool_memory", file.spool_memory, 1 << 20, 0, 1 << 30)?;
        if let Some(level) = &file.log_level {
            updraft_shared::logging::parse_level(level)
                .map_err(|e| invalid("log_level", e.to_string()))?;
        }
        let metrics_listen = match &file.metrics_listen {
            None => None,
            Some(m) => Some(m.parse().map_err(|_| {
                invalid(
                    "metrics_listen",
                    format!("`{m}` is not an address like 127.0.0.1:9465"),
                )
            })?),
        };
        Ok(Self {
            metrics_listen,
            path: path.to_path_buf(),
            log_level: file.log_level.clone(),
            policy: file
                .policy
                .as_ref()
                .and_then(PolicyKey::file)
                .map(rel)
                .unwrap_or_else(|| DEFAULT_POLICY.into()),
            accept_push: file
                .policy
                .as_ref()
                .and_then(PolicyKey::accept_push)
                .unwrap_or(true),
            power_supply_root: file
                .signals
                .power_supply_root
                .map(rel)
                .unwrap_or_else(|| "/sys/class/power_supply".into()),
            sample_interval,
            agent_id: file.agent_id,
            socket: rel(file.socket.unwrap_or_else(|| DEFAULT_SOCKET.into())),
            tls_ca: file
                .tls
                .ca
                .map(rel)
                .unwrap_or_else(|| state_dir.join("ca.pem")),
            tls_cert: file
                .tls
                .cert
                .map(rel)
                .unwrap_or_else(|| state_dir.join("agent.pem")),
            tls_key: file
                .tls
                .key
                .map(rel)
                .unwrap_or_else(|| state_dir.join("agent.key")),
            renew_before,
            state_dir,
            max_local_concurrency: slots,
            max_local_queue,
            spool_memory,
            clouds,
            link,
            journal,
            api,
            catalog,
        })
    }
}

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);
/// Largest `max_local_concurrency` (and `[journal] max_running`): far more than any
/// board has cores, far below what a semaphore can hold.
pub const MAX_LOCAL_SLOTS: usize = 1024;
/// Least `[link] probe_bytes`: a smaller probe would measure little but latency.
pub const MIN_PROBE_BYTES: u64 = 16 << 10;

/// `[link]`, each key within its range; `keep_alive` below `idle_timeout`,
/// `reconnect_min` at most `reconnect_max`.
fn link_config(r: &Ranges, l: LinkFile) -> Result<LinkConfig, ConfigError> {
    let d = LinkConfig::default();
    let ms = Duration::from_millis;
    let link = LinkConfig {
        keep_alive: r.duration(
            "link.keep_alive",
            l.keep_alive,
            d.keep_alive,
            ms(10),
            MINUTE,
        )?,
        idle_timeout: r.duration(
            "link.idle_timeout",
            l.idle_timeout,
            d.idle_timeout,
            ms(500),
            DAY,
        )?,
        connect_timeout: r.duration(
            "link.connect_timeout",
            l.connect_timeout,
            d.connect_timeout,
            ms(100),
            5 * MINUTE,
        )?,
        accept_timeout: r.duration(
            "link.accept_timeout",
            l.accept_timeout,
            d.accept_timeout,
            ms(100),
            5 * MINUTE,
        )?,
        reconnect_min: r.duration(
            "link.reconnect_min",
            l.reconnect_min,
            d.reconnect_min,
            ms(10),
            HOUR,
        )?,
        reconnect_max: r.duration(
            "link.reconnect_max",
            l.reconnect_max,
            d.reconnect_max,
            ms(10),
            DAY,
        )?,
        replay_buffer: r.bytes_usize(
            "link.replay_buffer",
            l.replay_buffer,
            d.replay_buffer as u64,
            0,
            1 << 30,
        )?,
        failover_wait: r.duration(
            "link.failover_wait",
            l.failover_wait,
            d.failover_wait,
            Duration::ZERO,
            HOUR,
        )?,
        probe: l.probe.unwrap_or(d.probe),
        probe_budget: r.bytes(
            "link.probe_budget",
            l.probe_budget,
            d.probe_budget,
            2 * MIN_PROBE_BYTES,
            1 << 30,
        )?,
        probe_bytes: r.bytes(
            "link.probe_bytes",
            l.probe_bytes,
            d.probe_bytes.into(),
            MIN_PROBE_BYTES,
            updraft_proto::MAX_PROBE_BYTES.into(),
        )? as u32,
    };
    let invalid = |key: &str, reason: &str| ConfigError::Invalid {
        path: r.path.to_path_buf(),
        key: key.into(),
        reason: reason.into(),
    };
    if link.keep_alive >= link.idle_timeout {
        return Err(invalid(
            "link.keep_alive",
            "must be shorter than link.idle_timeout",
        ));
    }
    if link.probe_budget < 2 * u64::from(link.probe_bytes) {
        return Err(invalid(
            "link.probe_budget",
            "must be at least twice link.probe_bytes (one probe sends and receives link.probe_bytes)",
        ));
    }
    if link.reconnect_min > link.reconnect_max {
        return Err(invalid(
            "link.reconnect_min",
            "must be at most link.reconnect_max",
        ));
    }
    Ok(link)
}

/// `[journal]`, each key within its range.
fn journal_config(r: &Ranges, j: JournalFile) -> Result<JournalConfig, ConfigError> {
    let d = JournalConfig::default();
    Ok(JournalConfig {
        limits: crate::journal::JournalLimits {
            max_bytes: r.bytes(
                "journal.max_bytes",
                j.max_bytes,
                d.limits.max_bytes,
                64 << 10,
                1 << 40,
            )?,
            result_ttl: r.duration(
                "journal.result_ttl",
                j.result_ttl,
                d.limits.result_ttl,
                MINUTE,
                365 * DAY,
            )?,
            fetched_ttl: r.duration(
                "journal.fetched_ttl",
                j.fetched_ttl,
                d.limits.fetched_ttl,
                Duration::ZERO,
                365 * DAY,
            )?,
        },
        max_running: r.count_usize(
            "journal.max_running",
            j.max_running,
            d.max_running,
            1,
            MAX_LOCAL_SLOTS,
        )?,
        max_attempts: r.count(
            "journal.max_attempts",
            j.max_attempts,
            d.max_attempts,
            1,
            100,
        )?,
    })
}

/// `[api]`, each key within its range.
fn api_config(r: &Ranges, a: ApiFile) -> Result<ApiConfig, ConfigError> {
    let d = ApiConfig::default();
    let ms = Duration::from_millis;
    Ok(ApiConfig {
        max_connections: r.count_usize(
            "api.max_connections",
            a.max_connections,
            d.max_connections,
            1,
            MAX_API_CONNECTIONS,
        )?,
        header_timeout: r.duration(
            "api.header_timeout",
            a.header_timeout,
            d.header_timeout,
            ms(100),
            5 * MINUTE,
        )?,
        body_stall_timeout: r.duration(
            "api.body_stall_timeout",
            a.body_stall_timeout,
            d.body_stall_timeout,
            ms(100),
            HOUR,
        )?,
    })
}

/// What a SIGHUP did with agent.toml (the policy file reloads on its own).
#[derive(Debug, PartialEq, Eq)]
pub enum Reread {
    /// The file is the same as the one in force.
    Unchanged,
    /// Keys changed. `applied`: reloaded now (`log_level`); `restart`: in force
    /// only after a restart.
    Changed {
        /// Keys applied at once.
        applied: Vec<&'static str>,
        /// Keys that need a restart.
        restart: Vec<&'static str>,
    },
}

impl AgentConfig {
    /// The keys whose values differ between `self` (in force) and `new`.
    pub fn changed_keys(&self, new: &AgentConfig) -> Vec<&'static str> {
        let d =
            |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
        let pairs = [
            ("agent_id", d(&self.agent_id, &new.agent_id)),
            ("socket", d(&self.socket, &new.socket)),
            (
                "metrics_listen",
                d(&self.metrics_listen, &new.metrics_listen),
            ),
            ("log_level", d(&self.log_level, &new.log_level)),
            ("state_dir", d(&self.state_dir, &new.state_dir)),
            (
                "max_local_concurrency",
                d(&self.max_local_concurrency, &new.max_local_concurrency),
            ),
            (
                "max_local_queue",
                d(&self.max_local_queue, &new.max_local_queue),
            ),
            ("spool_memory", d(&self.spool_memory, &new.spool_memory)),
            ("cloud", d(&self.clouds, &new.clouds)),
            (
                "tls",
                d(
                    &(
                        &self.tls_ca,
                        &self.tls_cert,
                        &self.tls_key,
                        self.renew_before,
                    ),
                    &(&new.tls_ca, &new.tls_cert, &new.tls_key, new.renew_before),
                ),
            ),
            ("link", d(&self.link, &new.link)),
            ("policy", d(&self.policy, &new.policy)),
            ("policy.accept_push", d(&self.accept_push, &new.accept_push)),
            (
                "signals.power_supply_root",
                d(&self.power_supply_root, &new.power_supply_root),
            ),
            (
                "signals.sample_interval",
                d(&self.sample_interval, &new.sample_interval),
            ),
            ("journal", d(&self.journal, &new.journal)),
            ("api", d(&self.api, &new.api)),
            ("tasks", d(&self.catalog, &new.catalog)),
        ];
        pairs
            .into_iter()
            .filter(|(_, c)| *c)
            .map(|(k, _)| k)
            .collect()
    }

    /// Rereads the file this config came from and sorts its changes into those
    /// applied now (`log_level`, which this call applies) and those that need a
    /// restart. An invalid file is an error and changes nothing.
    pub fn reread(&self) -> Result<Reread, ConfigError> {
        let new = Self::load(&self.path)?;
        let keys = self.changed_keys(&new);
        if keys.is_empty() {
            return Ok(Reread::Unchanged);
        }
        let (applied, restart): (Vec<_>, Vec<_>) =
            keys.into_iter().partition(|k| *k == "log_level");
        if !applied.is_empty() {
            let level = new.log_level.as_deref().unwrap_or("info");
            if let Ok(filter) = updraft_shared::logging::parse_level(level) {
                updraft_shared::logging::set_level(filter);
            }
        }
        Ok(Reread::Changed { applied, restart })
    }
}

/// On SIGHUP: rereads agent.toml and logs what became of each change.
pub fn log_reread(config: &AgentConfig) {
    let path = config.path.display();
    match config.reread() {
        Ok(Reread::Unchanged) => tracing::info!("SIGHUP: {path} unchanged"),
        Ok(Reread::Changed { applied, restart }) => {
            if !applied.is_empty() {
                tracing::info!("SIGHUP: {path}: applied {}", applied.join(", "));
            }
            if !restart.is_empty() {
                tracing::warn!(
                    "SIGHUP: {path}: {} changed; these take effect only after a restart (systemctl restart updraft-agent), the old values stay in force until then",
                    restart.join(", ")
                );
            }
        }
        Err(e) => tracing::warn!(
            "SIGHUP: {e}; the agent runs on with the config it started with, but would not start with this file"
        ),
    }
}

/// The host part of `host:port` or `[v6]:port`.
fn split_host(address: &str) -> Option<&str> {
    let (host, port) = address.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    (!host.is_empty()).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_daemons_tls_key_is_refused_by_name() {
        let m = parse("[tls]\nca_key = \"/etc/updraft/ca.key\"")
            .unwrap_err()
            .to_string();
        assert!(m.contains("tls.ca_key: is read by updraftd only"), "{m}");
    }

    fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        let path = Path::new("/etc/updraft/agent.toml");
        let file = updraft_shared::config::from_str(text, path, "UPDRAFT_AGENT_TEST_NONE")?;
        AgentConfig::from_file(file, path)
    }

    #[test]
    fn defaults() {
        let c = parse("[[cloud]]\naddress = \"cloud.example:4433\"\n[tasks.e]\nbuiltin = \"echo\"")
            .unwrap();
        assert_eq!(c.socket, Path::new(DEFAULT_SOCKET));
        assert_eq!(c.clouds[0].server_name, "cloud.example");
        assert_eq!(c.tls_cert, Path::new("/var/lib/updraft/agent.pem"));
        let c = parse("[[cloud]]\naddress = \"[::1]:4433\"").unwrap();
        assert_eq!(c.clouds[0].server_name, "::1");
        assert!(c.link.probe);
        assert_eq!(c.link.probe_budget, 16 << 20);
        assert_eq!(c.link.probe_bytes, 256 << 10);
    }

    #[test]
    fn link_probe_keys() {
        let c = parse("[link]\nprobe = false\nprobe_budget = \"1MiB\"\nprobe_bytes = \"64KiB\"")
            .unwrap();
        assert!(!c.link.probe);
        assert_eq!(c.link.probe_budget, 1 << 20);
        assert_eq!(c.link.probe_bytes, 64 << 10);
        let m = parse("[link]\nprobe_budget = \"256KiB\"\nprobe_bytes = \"256KiB\"")
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("link.probe_budget") && m.contains("twice link.probe_bytes"),
            "{m}"
        );
        let m = parse("[link]\nprobe = \"sometimes\"")
            .unwrap_err()
            .to_string();
        assert!(m.contains("probe"), "{m}");
    }

    #[test]
    fn out_of_range_values_name_file_and_key() {
        for (text, key) in [
            (
                "max_local_concurrency = 2305843009213693952",
                "max_local_concurrency",
            ),
            ("max_local_concurrency = 0", "max_local_concurrency"),
            ("max_local_queue = 1000000", "max_local_queue"),
            ("spool_memory = \"8GiB\"", "spool_memory"),
            (
                "[journal]\nmax_running = 2305843009213693952",
                "journal.max_running",
            ),
            ("[journal]\nmax_attempts = 0", "journal.max_attempts"),
            ("[journal]\nmax_bytes = 10", "journal.max_bytes"),
            (
                "[journal]\nresult_ttl = \"300000000000d\"",
                "journal.result_ttl",
            ),
            ("[link]\nkeep_alive = \"0s\"", "link.keep_alive"),
            ("[link]\naccept_timeout = \"0s\"", "link.accept_timeout"),
            ("[link]\nconnect_timeout = \"0s\"", "link.connect_timeout"),
            (
                "[link]\nidle_timeout = \"300000000000d\"",
                "link.idle_timeout",
            ),
            (
                "[link]\nreconnect_max = \"300000000000d\"",
                "link.reconnect_max",
            ),
            ("[link]\nreplay_buffer = \"4GiB\"", "link.replay_buffer"),
            (
                "[tasks.e]\nbuiltin = \"echo\"\ntimeout = \"300000000000d\"",
                "tasks.e.timeout",
            ),
            (
                "[tasks.e]\nbuiltin = \"echo\"\nmax_input = \"99999999GiB\"",
                "tasks.e.max_input",
            ),
            ("[link]\nfailover_wait = \"30d\"", "link.failover_wait"),
            ("[link]\nprobe_budget = 0", "link.probe_budget"),
            ("[link]\nprobe_budget = \"2GiB\"", "link.probe_budget"),
            ("[link]\nprobe_bytes = \"1KiB\"", "link.probe_bytes"),
            ("[link]\nprobe_bytes = \"2MiB\"", "link.probe_bytes"),
            ("[link]\nprobe_bytes = \"5GiB\"", "link.probe_bytes"),
            (
                "[signals]\nsample_interval = \"0s\"",
                "signals.sample_interval",
            ),
            ("[tls]\nrenew_before = \"0s\"", "tls.renew_before"),
            ("[api]\nmax_connections = 0", "api.max_connections"),
            ("[api]\nmax_connections = 100000", "api.max_connections"),
            ("[api]\nheader_timeout = \"0s\"", "api.header_timeout"),
            (
                "[api]\nbody_stall_timeout = \"2h\"",
                "api.body_stall_timeout",
            ),
        ] {
            let m = parse(text).unwrap_err().to_string();
            assert!(
                m.contains("/etc/updraft/agent.toml")
                    && m.contains(key)
                    && m.contains("out of range"),
                "{text}: {m}"
            );
        }
        let c = parse("[api]\nmax_connections = 8\nheader_timeout = \"1s\"").unwrap();
        assert_eq!(c.api.max_connections, 8);
        assert_eq!(c.api.header_timeout, Duration::from_secs(1));
    }

    #[test]
    fn sizes_and_counts_past_4_gib_read_as_on_64_bit() {
        // Byte sizes are u64 and counts are read as u64 on every target, so a 32-bit
        // board neither truncates them (5 GiB to 1 GiB, 4 GiB to 0, 2^32 + 1 slots to
        // 1) nor fails to parse them; each gets the same value or range error.
        const FIVE_GIB: u64 = 5 << 30;
        for text in [
            "[journal]\nmax_bytes = \"5GiB\"",
            "[journal]\nmax_bytes = 5368709120",
        ] {
            let c = parse(text).unwrap();
            assert_eq!(c.journal.limits.max_bytes, FIVE_GIB, "{text}");
        }
        let c = parse("[tasks.big]\nbuiltin = \"sha256\"\nmax_input = \"5GiB\"").unwrap();
        assert_eq!(c.catalog.get("big").unwrap().max_input, FIVE_GIB);
        for (text, says) in [
            (
                "spool_memory = \"5GiB\"",
                "spool_memory: 5368709120 bytes is out of range: use 0 to 1073741824 bytes",
            ),
            (
                "spool_memory = \"4GiB\"",
                "spool_memory: 4294967296 bytes is out of range",
            ),
            (
                "[link]\nreplay_buffer = \"5GiB\"",
                "link.replay_buffer: 5368709120 bytes is out of range",
            ),
            (
                "max_local_concurrency = 4294967297",
                "max_local_concurrency: 4294967297 is out of range: use 1 to 1024",
            ),
            (
                "max_local_queue = 4294967296",
                "max_local_queue: 4294967296 is out of range: use 0 to 65536",
            ),
            (
                "[journal]\nmax_running = 4294967297",
                "journal.max_running: 4294967297 is out of range",
            ),
            (
                "[api]\nmax_connections = 4294967297",
                "api.max_connections: 4294967297 is out of range",
            ),
        ] {
            let m = parse(text).unwrap_err().to_string();
            assert!(m.contains(says), "{text}: {m}");
        }
    }

    #[test]
    fn errors_name_file_and_key() {
        for (text, key) in [
            ("sokcet = \"/x\"", "sokcet"),
            ("[[cloud]]\naddress = \"nohost\"", "cloud[0].address"),
            ("[link]\nkeep_alive = \"20s\"", "link.keep_alive"),
            ("[link]\naccept_timeout = \"fast\"", "accept_timeout"),
            ("log_level = \"loud[\"", "log_level"),
            ("log_level = \"verbose\"", "log_level"),
            (
                "[tasks.e]\nbuiltin = \"echo\"\nofload = \"never\"",
                "ofload",
            ),
        ] {
            let m = parse(text).unwrap_err().to_string();
            assert!(
                m.contains("/etc/updraft/agent.toml") && m.contains(key),
                "{text}: {m}"
            );
        }
    }
}
