//! The daemon's configuration: the file layout with documented defaults, validated into
//! [`DaemonConfig`]. Relative paths are taken relative to the config file's directory.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use updraft_proto::units::{ByteSize, HumanDuration};
use updraft_shared::catalog::{Catalog, TaskFile, TaskKind};
use updraft_shared::config::ConfigError;
use updraft_shared::config::TlsFile;
use updraft_shared::exec::DEFAULT_PATH;
use updraft_shared::tls::{Identity, TlsError};

use crate::recent::{
    DedupLimits, DEFAULT_HOLD_INPUT, DEFAULT_MAX_ENTRIES, DEFAULT_MAX_MEMORY, DEFAULT_MAX_RESULT,
    DEFAULT_REMEMBER,
};

/// Where `updraftd` looks for its config when none is given (defined with the command
/// line, whose help and man page show it).
/// Environment prefix for overrides: `UPDRAFTD__LISTEN=...`.
pub const ENV_PREFIX: &str = "UPDRAFTD";
/// Default of `listen`: every IPv4 address, on the port QUIC over UDP commonly uses
/// for HTTP/3-like services (open it in the firewall).
pub const DEFAULT_LISTEN: &str = "0.0.0.0:4433";
/// Default of `max_queued_tasks`, per slot: a burst of four tasks per slot waits a few
/// task lengths at most, rather than being sent elsewhere at once.
pub const DEFAULT_QUEUED_PER_SLOT: usize = 4;
/// Default of `max_streams_per_connection`: far over what one agent keeps in flight
/// (its own concurrency is a few tasks), while a misbehaving agent pins at most this
/// many handlers.
pub const DEFAULT_STREAMS_PER_CONNECTION: u32 = 256;
/// Default of `drain_timeout`: a minute lets typical tasks (seconds) finish and
/// deliver, and fits within systemd's default stop timeout of 90s.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Default of `load_report_interval`: agents place tasks on load a second old at
/// most, for one small frame a second per connection.
pub const DEFAULT_LOAD_REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// Default of `idle_timeout`: several missed keep-alives (5s) before a silent
/// connection is given up.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default of `max_uploads_per_agent`: a burst of small tasks from one agent passes
/// (each upload usually lasts one packet), while one agent's held inputs stay within
/// 64 × `[dedup] hold_input` (64 MiB by default) of memory.
pub const DEFAULT_MAX_UPLOADS_PER_AGENT: u32 = 64;
/// Most of `max_uploads_per_agent`: each upload may hold up to `[dedup] hold_input`
/// in memory, and 4096 of the default 1 MiB are already 4 GiB for one agent.
pub const MAX_UPLOADS_PER_AGENT: u32 = 4096;
/// Default of `probe_budget`: four times an agent's default, so an agent that probes
/// within its own budget is never refused.
pub const DEFAULT_PROBE_BUDGET: u64 = 64 << 20;

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/updraftd";
/// The admin socket's name in the state directory when `admin_socket` is not set.
pub const ADMIN_SOCKET_NAME: &str = "admin.sock";
/// Longest Unix socket path Linux takes (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// `daemon.toml` as written.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonFile {
    /// UDP address to listen on. Default `0.0.0.0:4433`.
    pub listen: Option<String>,
    /// Log level (`error` .. `trace`) or filter directive; `UPDRAFTD_LOG` overrides it. Default `info`.
    pub log_level: Option<String>,
    /// Where the daemon keeps its state (task working directories). Default `/var/lib/updraftd`.
    pub state_dir: Option<PathBuf>,
    /// Tasks run at once. Default: the number of CPUs.
    pub max_concurrent_tasks: Option<usize>,
    /// Tasks admitted and waiting for a slot before new ones get `busy`. Default 4 × slots.
    pub max_queued_tasks: Option<usize>,
    /// TCP address for the Prometheus `/metrics` endpoint.
    pub metrics_listen: Option<String>,
    /// Unix socket `updraftd agents` and the other fleet commands talk to. Default
    /// `STATE_DIR/admin.sock`.
    pub admin_socket: Option<PathBuf>,
    /// How long SIGTERM waits for running tasks before closing anyway. Default 60s.
    pub drain_timeout: Option<HumanDuration>,
    /// How often load reports go to each agent. Default 1s.
    pub load_report_interval: Option<HumanDuration>,
    /// Close a connection silent for this long. Default 30s.
    pub idle_timeout: Option<HumanDuration>,
    /// Concurrent task streams one agent may open. Default 256.
    pub max_streams_per_connection: Option<u32>,
    /// Tasks one agent (all its connections) may have receiving a held input at once;
    /// more get `busy`. 1..=4096, default 64.
    pub max_uploads_per_agent: Option<u32>,
    /// Link probe bytes (both directions) one agent connection may use an hour; a
    /// probe past it gets `busy`, and 0 refuses every probe. Default 64MiB.
    pub probe_budget: Option<ByteSize>,
    /// TLS material.
    #[serde(default)]
    pub tls: TlsFile,
    /// The memory of recent task ids that answers retries.
    #[serde(default)]
    pub dedup: DedupFile,
    /// Enrollment of agents with one-time tokens.
    #[serde(default)]
    pub enroll: EnrollFile,
    /// The catalog of tasks this daemon will run.
    #[serde(default)]
    pub tasks: BTreeMap<String, TaskFile>,
    /// Cluster mode: replicas sharing task claims, work and results in NATS JetStream.
    pub cluster: Option<ClusterFile>,
}

/// `[cluster]` as written: this daemon is one of several replicas behind a UDP load
/// balancer, sharing task claims, the work queue and results in NATS JetStream.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    /// NATS servers of the JetStream cluster, e.g. `["nats://10.0.0.5:4222"]`. Required.
    pub nats: Option<Vec<String>>,
    /// This replica's server id, carried in its QUIC connection ids; unique per replica.
    /// 0..=255. Required.
    pub server_id: Option<u64>,
    /// Replicas of every JetStream stream and bucket: 1, 3 or 5. Default 3.
    pub replicas: Option<u64>,
    /// Prefix of the JetStream names, so two clusters can share one NATS. Default `updraft`.
    pub name: Option<String>,
    /// How long a worker may go silent before its task goes to another replica. Default 30s.
    pub ack_wait: Option<HumanDuration>,
    /// The UDP balancer routes by QUIC connection id, so agents may migrate. Default false.
    pub route_by_cid: Option<bool>,
    /// Tasks one agent may have in the shared queue through this replica. Default 256.
    pub max_tasks_per_agent: Option<u64>,
    /// Bytes of task output the results stream keeps, oldest dropped first. Default 1GiB.
    pub max_result_store: Option<ByteSize>,
    /// NATS credentials file (`.creds`), when the NATS servers ask for one.
    pub credentials: Option<PathBuf>,
}

/// Cluster mode, validated (`[cluster]` in `daemon.toml`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// NATS server URLs.
    pub nats: Vec<String>,
    /// This replica's QUIC-LB server id.
    pub server_id: u8,
    /// JetStream replicas.
    pub replicas: usize,
    /// JetStream name prefix.
    pub name: String,
    /// Silence after which a task is redelivered.
    pub ack_wait: Duration,
    /// Agents may migrate (the balancer routes by connection id).
    pub route_by_cid: bool,
    /// Shared-store tasks one agent may have in flight through this replica.
    pub max_tasks_per_agent: u32,
    /// Bytes the results stream keeps.
    pub max_result_store: u64,
    /// NATS credentials file.
    pub credentials: Option<PathBuf>,
}

/// Default of `[cluster] ack_wait`: long enough that a busy replica's heartbeats (a
/// third of it) never miss, short enough that a dead replica's tasks move on within
/// half a minute.
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);
/// Default of `[cluster] max_tasks_per_agent`: the default streams one connection may
/// open, so one board's burst passes while a thousand boards share the queue.
pub const DEFAULT_TASKS_PER_AGENT: u64 = 256;
/// Default of `[cluster] max_result_store`.
pub const DEFAULT_RESULT_STORE: u64 = 1 << 30;

/// `[enroll]` as written: certificates for agents that join with a token.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollFile {
    /// Lifetime of the certificates issued at enrollment and renewal. Default 90d.
    pub cert_lifetime: Option<HumanDuration>,
}

/// `[dedup]` as written: how much the daemon remembers of recent tasks so that a
/// retry with the same id gets the first result instead of a second run.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupFile {
    /// How long a finished task's result is kept. Default 10m.
    pub remember: Option<HumanDuration>,
    /// Most task ids remembered, running and finished; 0 turns the memory off.
    /// Default 10000.
    pub max_entries: Option<usize>,
    /// Most output kept for one task; a retry of a task with more output runs it
    /// again. Default 1MiB.
    pub max_result: Option<ByteSize>,
    /// Most output kept for all tasks; the oldest results go first. Default 64MiB.
    pub max_memory: Option<ByteSize>,
    /// Largest input received whole before its task starts, so a cut upload runs
    /// nothing; a bigger input streams into the task. Default 1MiB.
    pub hold_input: Option<ByteSize>,
}

/// The documented range of every number and duration in `daemon.toml` (README,
/// "Configuration"): (key, least, most).
pub mod range {
    use std::time::Duration;

    const fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }
    const fn ms(m: u64) -> Duration {
        Duration::from_millis(m)
    }
    const DAY: u64 = 86400;

    /// `max_concurrent_tasks`.
    pub const SLOTS: (u64, u64) = (1, 4096);
    /// `max_queued_tasks`.
    pub const QUEUED: (u64, u64) = (0, 65536);
    /// `updraftd policy push --window`: how long canaries are watched.
    pub const PUSH_WINDOW: (Duration, Duration) =
        (Duration::from_secs(1), Duration::from_secs(86_400));
    /// `max_streams_per_connection`.
    pub const STREAMS: (u64, u64) = (1, 10_000);
    /// `drain_timeout`.
    pub const DRAIN: (Duration, Duration) = (secs(0), secs(DAY));
    /// `load_report_interval`.
    pub const LOAD_REPORT: (Duration, Duration) = (ms(10), secs(600));
    /// `idle_timeout`.
    pub const IDLE: (Duration, Duration) = (ms(100), secs(DAY));
    /// `[enroll] cert_lifetime`: the CA itself lives ten years.
    pub const CERT_LIFETIME: (Duration, Duration) = (secs(10), secs(3650 * DAY));
    /// `updraftd cert issue --valid-for`.
    pub const CERT_ISSUE: (Duration, Duration) = (secs(1), secs(3650 * DAY));
    /// `updraftd token create --ttl`.
    pub const TOKEN_TTL: (Duration, Duration) = (secs(1), secs(365 * DAY));
    /// `[dedup] remember`.
    pub const REMEMBER: (Duration, Duration) = (secs(0), secs(7 * DAY));
    /// `[dedup] max_entries`.
    pub const MAX_ENTRIES: (u64, u64) = (0, 1_000_000);
    /// `[dedup] max_result`, `max_memory`.
    pub const DEDUP_BYTES: (u64, u64) = (0, 16 << 30);
    /// `[dedup] hold_input`.
    pub const HOLD_INPUT: (u64, u64) = (0, 64 << 20);
    /// `probe_budget`.
    pub const PROBE_BUDGET: (u64, u64) = (0, 4 << 30);
    /// `[cluster] server_id`: one byte of the connection id.
    pub const SERVER_ID: (u64, u64) = (0, 255);
    /// `[cluster] ack_wait`.
    pub const ACK_WAIT: (Duration, Duration) = (secs(1), secs(3600));
    /// `[cluster] max_tasks_per_agent`.
    pub const TASKS_PER_AGENT: (u64, u64) = (1, 65_536);
    /// `[cluster] max_result_store`.
    pub const RESULT_STORE: (u64, u64) = (1 << 20, 1 << 40);
    /// `[cluster] nats`: servers listed.
    pub const NATS_SERVERS: (u64, u64) = (1, 64);
}

use updraft_shared::config::check_task_ranges;
pub use updraft_shared::config::{check_count, check_duration, duration_text};

/// A validated daemon configuration.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// The file it was loaded from (SIGHUP reloads it).
    pub source: PathBuf,
    /// UDP listen address.
    pub listen: SocketAddr,
    /// Log level or filter from the file, checked.
    pub log_level: Option<String>,
    /// State directory.
    pub state_dir: PathBuf,
    /// Execution slots.
    pub max_concurrent_tasks: usize,
    /// Queue places.
    pub max_queued_tasks: usize,
    /// Metrics address, if any.
    pub metrics_listen: Option<SocketAddr>,
    /// The admin socket.
    pub admin_socket: PathBuf,
    /// Drain limit.
    pub drain_timeout: Duration,
    /// Load report period.
    pub load_report_interval: Duration,
    /// QUIC idle timeout.
    pub idle_timeout: Duration,
    /// Stream limit per connection.
    pub max_streams_per_connection: u32,
    /// Held inputs one agent may be sending at once.
    pub max_uploads_per_agent: u32,
    /// Link probe bytes an hour per connection.
    pub probe_budget: u64,
    /// CA certificate path.
    pub tls_ca: PathBuf,
    /// Certificate path.
    pub tls_cert: PathBuf,
    /// Key path.
    pub tls_key: PathBuf,
    /// CA key path (enrollment and renewal).
    pub tls_ca_key: PathBuf,
    /// Lifetime of agent certificates the daemon issues.
    pub cert_lifetime: Duration,
    /// Bounds of the memory of recent task ids.
    pub dedup: DedupLimits,
    /// Task catalog.
    pub catalog: Catalog,
    /// Cluster mode, when `[cluster]` is set.
    pub cluster: Option<ClusterConfig>,
}

impl DaemonConfig {
    /// Loads and validates `path` with `UPDRAFTD__*` overrides.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file: DaemonFile = updraft_shared::config::load(path, ENV_PREFIX, false)?;
        Self::from_file(file, path)
    }

    /// Loads the TLS files exactly as `serve` does: CA, certificate chain and key, the
    /// key checked against the certificate. Errors name the file and the `[tls]` key.
    pub fn load_identity(&self) -> Result<Identity, ConfigError> {
        Identity::load(&self.tls_ca, &self.tls_cert, &self.tls_key).map_err(|e| {
            let key = match &e {
                TlsError::File { path, .. } if *path == self.tls_ca => "tls.ca",
                TlsError::File { path, .. } if *path == self.tls_cert => "tls.cert",
                _ => "tls.key",
            };
            ConfigError::Invalid {
                path: self.source.clone(),
                key: key.into(),
                reason: e.to_string(),
            }
        })
    }

    /// What is allowed but probably wrong: a task whose program is not an executable
    /// file (it would fail with `spawn_failed` at every run).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for name in self.catalog.names() {
            let Some(spec) = self.catalog.get(name) else {
                continue;
            };
            let TaskKind::Command(argv) = &spec.kind else {
                continue;
            };
            let path = spec.env.get("PATH").map_or(DEFAULT_PATH, String::as_str);
            if let Err(why) = find_executable(&argv[0], path) {
                out.push(format!(
                    "{}: tasks.{name}.command: {why}; the task fails with spawn_failed until it is installed",
                    self.source.display()
                ));
            }
        }
        out
    }

    /// Validates a parsed file; `path` anchors relative paths and names errors.
    pub fn from_file(file: DaemonFile, path: &Path) -> Result<Self, ConfigError> {
        let keys = Keys(path);
        let base = path.parent().unwrap_or(Path::new("."));
        let rel = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let listen = file.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen: SocketAddr = listen.parse().map_err(|_| {
            keys.invalid(
                "listen",
                format!("`{listen}` is not an address like 0.0.0.0:4433"),
            )
        })?;
        let metrics_listen = match file.metrics_listen {
            None => None,
            Some(m) => Some(m.parse().map_err(|_| {
                keys.invalid(
                    "metrics_listen",
                    format!("`{m}` is not an address like 127.0.0.1:9464"),
                )
            })?),
        };

        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let slots = file
            .max_concurrent_tasks
            .unwrap_or(cpus.min(range::SLOTS.1 as usize));
        keys.count("max_concurrent_tasks", slots as u64, range::SLOTS)?;
        let queued = file
            .max_queued_tasks
            .unwrap_or(slots * DEFAULT_QUEUED_PER_SLOT);
        keys.count("max_queued_tasks", queued as u64, range::QUEUED)?;
        let streams = file
            .max_streams_per_connection
            .unwrap_or(DEFAULT_STREAMS_PER_CONNECTION);
        keys.count("max_streams_per_connection", streams.into(), range::STREAMS)?;
        let uploads = file
            .max_uploads_per_agent
            .unwrap_or(DEFAULT_MAX_UPLOADS_PER_AGENT);
        keys.count(
            "max_uploads_per_agent",
            uploads.into(),
            (1, MAX_UPLOADS_PER_AGENT.into()),
        )?;
        let probe_budget = keys.count(
            "probe_budget",
            file.probe_budget.map_or(DEFAULT_PROBE_BUDGET, |b| b.0),
            range::PROBE_BUDGET,
        )?;
        let catalog = Catalog::from_files(file.tasks)
            .map_err(|e| keys.invalid(&format!("tasks.{}", e.task), e.reason))?;
        check_task_ranges(&catalog).map_err(|(key, e)| keys.invalid(&key, e))?;
        let drain_timeout = keys.duration(
            "drain_timeout",
            file.drain_timeout,
            DEFAULT_DRAIN_TIMEOUT,
            range::DRAIN,
        )?;
        let load_report_interval = keys.duration(
            "load_report_interval",
            file.load_report_interval,
            DEFAULT_LOAD_REPORT_INTERVAL,
            range::LOAD_REPORT,
        )?;
        let idle_timeout = keys.duration(
            "idle_timeout",
            file.idle_timeout,
            DEFAULT_IDLE_TIMEOUT,
            range::IDLE,
        )?;
        let dedup = dedup_limits(&file.dedup, path)?;
        let cluster = match &file.cluster {
            Some(c) => Some(cluster_config(c, path, &rel)?),
            None => None,
        };
        let cert_lifetime = keys.duration(
            "enroll.cert_lifetime",
            file.enroll.cert_lifetime,
            crate::pki::ENROLLED_VALIDITY,
            range::CERT_LIFETIME,
        )?;
        if let Some((key, why)) = file.tls.refuse(false) {
            return Err(keys.invalid(key, why.to_string()));
        }
        let tls_ca = rel(file.tls.ca.unwrap_or_else(|| "ca.pem".into()));
        let tls_ca_key = match file.tls.ca_key {
            Some(p) => rel(p),
            None => tls_ca.with_file_name("ca.key"),
        };
        if let Some(level) = &file.log_level {
            updraft_shared::logging::parse_level(level)
                .map_err(|e| keys.invalid("log_level", e.to_string()))?;
        }
        let state_dir = rel(file.state_dir.unwrap_or_else(|| DEFAULT_STATE_DIR.into()));
        let admin_socket = rel(file
            .admin_socket
            .unwrap_or_else(|| state_dir.join(ADMIN_SOCKET_NAME)));
        if admin_socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(keys.invalid(
                "admin_socket",
                format!(
                    "`{}` is longer than the {MAX_SOCKET_PATH} bytes a Unix socket path may have; set a shorter admin_socket",
                    admin_socket.display()
                ),
            ));
        }
        Ok(Self {
            log_level: file.log_level.clone(),
            listen,
            state_dir,
            admin_socket,
            source: path.to_path_buf(),
            max_concurrent_tasks: slots,
            max_queued_tasks: queued,
            metrics_listen,
            drain_timeout,
            load_report_interval,
            idle_timeout,
            max_streams_per_connection: streams,
            max_uploads_per_agent: uploads,
            probe_budget,
            tls_ca,
            tls_ca_key,
            cert_lifetime,
            tls_cert: rel(file.tls.cert.unwrap_or_else(|| "server.pem".into())),
            tls_key: rel(file.tls.key.unwrap_or_else(|| "server.key".into())),
            dedup,
            catalog,
            cluster,
        })
    }
}

/// Validates `[cluster]`; `path` names errors, `rel` anchors the credentials path.
fn cluster_config(
    c: &ClusterFile,
    path: &Path,
    rel: &dyn Fn(PathBuf) -> PathBuf,
) -> Result<ClusterConfig, ConfigError> {
    let keys = Keys(path);

    let nats = c.nats.clone().unwrap_or_default();
    keys.count("cluster.nats", nats.len() as u64, range::NATS_SERVERS).map_err(|_| {
        keys.invalid(
            "cluster.nats",
            format!(
                "lists {} servers; list 1..={} NATS servers of the JetStream cluster, like [\"nats://10.0.0.5:4222\"]",
                nats.len(),
                range::NATS_SERVERS.1
            ),
        )
    })?;
    for url in &nats {
        if url.parse::<async_nats::ServerAddr>().is_err() {
            return Err(keys.invalid(
                "cluster.nats",
                format!("`{url}` is not a NATS server address like nats://10.0.0.5:4222"),
            ));
        }
    }
    let Some(server_id) = c.server_id else {
        return Err(keys.invalid(
            "cluster.server_id",
            "is required: give each replica its own number 0..=255".into(),
        ));
    };
    let server_id = keys.count("cluster.server_id", server_id, range::SERVER_ID)? as u8;
    let replicas = c.replicas.unwrap_or(3);
    if ![1, 3, 5].contains(&replicas) {
        return Err(keys.invalid(
            "cluster.replicas",
            format!(
                "{replicas} is not 1, 3 or 5 (JetStream replicas; 3 survives one NATS node lost)"
            ),
        ));
    }
    let name = c.name.clone().unwrap_or_else(|| "updraft".into());
    if name.is_empty()
        || name.len() > 32
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(keys.invalid(
            "cluster.name",
            format!("`{name}` must be 1..=32 letters, digits, '-' or '_'"),
        ));
    }
    let ack_wait = check_duration(
        c.ack_wait.map_or(DEFAULT_ACK_WAIT, |d| d.0),
        range::ACK_WAIT,
    )
    .map_err(|e| keys.invalid("cluster.ack_wait", e.to_string()))?;
    let max_tasks_per_agent = keys.count(
        "cluster.max_tasks_per_agent",
        c.max_tasks_per_agent.unwrap_or(DEFAULT_TASKS_PER_AGENT),
        range::TASKS_PER_AGENT,
    )? as u32;
    let max_result_store = keys.count(
        "cluster.max_result_store",
        c.max_result_store.map_or(DEFAULT_RESULT_STORE, |b| b.0),
        range::RESULT_STORE,
    )?;
    Ok(ClusterConfig {
        nats,
        server_id,
        replicas: replicas as usize,
        name,
        ack_wait,
        route_by_cid: c.route_by_cid.unwrap_or(false),
        max_tasks_per_agent,
        max_result_store,
        credentials: c.credentials.clone().map(rel),
    })
}

/// The errors of one config file: each names the file and the key.
struct Keys<'a>(&'a Path);

impl Keys<'_> {
    fn invalid(&self, key: &str, reason: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.0.to_path_buf(),
            key: key.into(),
            reason,
        }
    }

    /// `v` if it is within `r`.
    fn count(&self, key: &str, v: u64, r: (u64, u64)) -> Result<u64, ConfigError> {
        check_count(v, r).map_err(|e| self.invalid(key, e.to_string()))
    }

    /// `v`, or `default` when absent, if it is within `r`.
    fn duration(
        &self,
        key: &str,
        v: Option<HumanDuration>,
        default: Duration,
        r: (Duration, Duration),
    ) -> Result<Duration, ConfigError> {
        check_duration(v.map_or(default, |d| d.0), r).map_err(|e| self.invalid(key, e.to_string()))
    }
}

/// Validates `[dedup]`; `path` names errors.
fn dedup_limits(d: &DedupFile, path: &Path) -> Result<DedupLimits, ConfigError> {
    let keys = Keys(path);

    let dedup = DedupLimits {
        remember: keys.duration(
            "dedup.remember",
            d.remember,
            DEFAULT_REMEMBER,
            range::REMEMBER,
        )?,
        max_entries: keys.count(
            "dedup.max_entries",
            d.max_entries.unwrap_or(DEFAULT_MAX_ENTRIES) as u64,
            range::MAX_ENTRIES,
        )? as usize,
        max_result: keys.count(
            "dedup.max_result",
            d.max_result.map_or(DEFAULT_MAX_RESULT, |b| b.0),
            range::DEDUP_BYTES,
        )?,
        max_memory: keys.count(
            "dedup.max_memory",
            d.max_memory.map_or(DEFAULT_MAX_MEMORY, |b| b.0),
            range::DEDUP_BYTES,
        )?,
        hold_input: keys.count(
            "dedup.hold_input",
            d.hold_input.map_or(DEFAULT_HOLD_INPUT, |b| b.0),
            range::HOLD_INPUT,
        )?,
    };
    if dedup.max_result > dedup.max_memory {
        return Err(keys.invalid(
            "dedup.max_result",
            format!(
                "{} bytes is more than dedup.max_memory ({} bytes); one result must fit in the whole memory",
                dedup.max_result, dedup.max_memory
            ),
        ));
    }
    Ok(dedup)
}

/// Finds `program` the way the executor will (a path as given, else in `path`) and
/// checks it is an executable file.
fn find_executable(program: &str, path: &str) -> Result<PathBuf, NotFound> {
    use std::os::unix::fs::PermissionsExt;
    let candidates: Vec<PathBuf> = if program.contains('/') {
        vec![PathBuf::from(program)]
    } else {
        path.split(':')
            .filter(|d| !d.is_empty())
            .map(|d| Path::new(d).join(program))
            .collect()
    };
    for c in &candidates {
        if let Ok(m) = std::fs::metadata(c) {
            if m.is_file() && m.permissions().mode() & 0o111 != 0 {
                return Ok(c.clone());
            }
            if program.contains('/') {
                return Err(NotFound::NotExecutable(program.to_string()));
            }
        }
    }
    if program.contains('/') {
        Err(NotFound::Absent(program.to_string()))
    } else {
        Err(NotFound::NotInPath {
            program: program.to_string(),
            path: path.to_string(),
        })
    }
}

/// Why a task's program was not found (a warning: it may be installed later).
#[derive(Debug, thiserror::Error)]
enum NotFound {
    /// The path names something that is not an executable file.
    #[error("`{0}` is not an executable file")]
    NotExecutable(String),
    /// The path names nothing.
    #[error("`{0}` does not exist")]
    Absent(String),
    /// No directory of the task's `PATH` holds an executable of that name.
    #[error("`{program}` is not an executable file in {path}")]
    NotInPath {
        /// The program name.
        program: String,
        /// The `PATH` searched.
        path: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<DaemonConfig, ConfigError> {
        let path = Path::new("/etc/updraft/daemon.toml");
        let file = updraft_shared::config::from_str(text, path, "UPDRAFTD_TEST_NONE")?;
        DaemonConfig::from_file(file, path)
    }

    #[test]
    fn missing_programs_are_named_with_where_they_were_sought() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("plain");
        std::fs::write(&file, "").unwrap();
        let shown = file.display().to_string();
        assert_eq!(
            find_executable(&shown, "/bin").unwrap_err().to_string(),
            format!("`{shown}` is not an executable file")
        );
        assert_eq!(
            find_executable("/no/such/tool", "/bin")
                .unwrap_err()
                .to_string(),
            "`/no/such/tool` does not exist"
        );
        let dir = d.path().display().to_string();
        assert_eq!(
            find_executable("plain", &dir).unwrap_err().to_string(),
            format!("`plain` is not an executable file in {dir}")
        );
        assert!(find_executable("sh", DEFAULT_PATH).is_ok());
    }

    #[test]
    fn defaults_and_relative_paths() {
        let c = parse("listen = \"127.0.0.1:5000\"\n[tasks.e]\nbuiltin = \"echo\"\n").unwrap();
        assert_eq!(c.listen.port(), 5000);
        assert_eq!(c.tls_ca, Path::new("/etc/updraft/ca.pem"));
        assert_eq!(c.tls_ca_key, Path::new("/etc/updraft/ca.key"));
        assert_eq!(c.cert_lifetime, crate::pki::ENROLLED_VALIDITY);
        assert!(c.catalog.get("e").is_some());
        assert!(c.max_queued_tasks >= c.max_concurrent_tasks);
        assert_eq!(c.dedup, DedupLimits::default());
        assert_eq!(c.probe_budget, DEFAULT_PROBE_BUDGET);
        assert_eq!(parse("probe_budget = 0").unwrap().probe_budget, 0);
        let c =
            parse("[tls]\nca = \"/srv/pki/ca.pem\"\n[enroll]\ncert_lifetime = \"30d\"").unwrap();
        assert_eq!(c.tls_ca_key, Path::new("/srv/pki/ca.key"));
        assert_eq!(c.cert_lifetime, Duration::from_secs(30 * 86400));
    }

    #[test]
    fn cluster_table_is_checked_key_by_key() {
        let path = Path::new("/etc/updraft/daemon.toml");
        let load = |text: &str| {
            let file = updraft_shared::config::from_str(text, path, "UPDRAFTD_TEST_NONE")?;
            DaemonConfig::from_file(file, path)
        };
        let c = load("[cluster]\nnats = [\"nats://10.0.0.5:4222\"]\nserver_id = 7\n").unwrap();
        let cluster = c.cluster.unwrap();
        assert_eq!(cluster.server_id, 7);
        assert_eq!(cluster.replicas, 3);
        assert_eq!(cluster.ack_wait, DEFAULT_ACK_WAIT);
        assert!(!cluster.route_by_cid);
        assert!(load("").unwrap().cluster.is_none());
        for (text, key, why) in [
            (
                "[cluster]\nserver_id = 1\n",
                "cluster.nats",
                "lists 0 servers",
            ),
            (
                "[cluster]\nnats = [\"nats://a:4222\"]\n",
                "cluster.server_id",
                "is required",
            ),
            (
                "[cluster]\nnats = [\"nats://a:4222\"]\nserver_id = 256\n",
                "cluster.server_id",
                "out of range",
            ),
            (
                "[cluster]\nnats = [\"nats://a:4222\"]\nserver_id = 1\nreplicas = 2\n",
                "cluster.replicas",
                "not 1, 3 or 5",
            ),
            (
                "[cluster]\nnats = [\"nats://a:4222\"]\nserver_id = 1\nname = \"a.b\"\n",
                "cluster.name",
                "must be",
            ),
            (
                "[cluster]\nnats = [\"nats://a:4222\"]\nserver_id = 1\nack_wait = \"2h\"\n",
                "cluster.ack_wait",
                "out of range",
            ),
            (
                "[cluster]\nnats = [\"nats://a:4222\"]\nserver_id = 1\nmax_tasks_per_agent = 0\n",
                "cluster.max_tasks_per_agent",
                "out of range",
            ),
        ] {
            let e = load(text).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(why), "{text}: {e}");
        }
    }

    #[test]
    fn dedup_table() {
        let c = parse(
            "[dedup]\nremember = \"30s\"\nmax_entries = 5\nmax_result = \"4KiB\"\nmax_memory = 65536\nhold_input = \"2KiB\"\n",
        )
        .unwrap();
        assert_eq!(
            c.dedup,
            DedupLimits {
                remember: Duration::from_secs(30),
                max_entries: 5,
                max_result: 4096,
                max_memory: 65536,
                hold_input: 2048,
            }
        );
    }

    #[test]
    fn dedup_environment_override() {
        std::env::set_var("UPDRAFTD_TEST_DEDUP__DEDUP__MAX_RESULT", "2KiB");
        let path = Path::new("/etc/updraft/daemon.toml");
        let file = updraft_shared::config::from_str(
            "[dedup]\nremember = \"1m\"\n",
            path,
            "UPDRAFTD_TEST_DEDUP",
        )
        .unwrap();
        let c = DaemonConfig::from_file(file, path).unwrap();
        assert_eq!(c.dedup.max_result, 2048);
        assert_eq!(c.dedup.remember, Duration::from_secs(60));
    }

    #[test]
    fn errors_name_file_and_key() {
        for (text, key) in [
            ("lisen = \"x\"", "lisen"),
            ("[tls]\nrenew_before = \"30d\"", "tls.renew_before"),
            ("listen = \"nowhere\"", "listen"),
            ("[tasks.e]\nbuiltin = \"echo\"\ncomand = [\"x\"]", "comand"),
            ("[tasks.e]\nbuiltin = \"nope\"", "tasks.e"),
            ("drain_timeout = \"soon\"", "drain_timeout"),
            ("load_report_interval = \"0s\"", "load_report_interval"),
            ("[dedup]\nremembr = \"1m\"", "remembr"),
            ("[enroll]\ncert_lifetime = \"1s\"", "enroll.cert_lifetime"),
            (
                "[enroll]\ncert_lifetime = \"100000000d\"",
                "enroll.cert_lifetime",
            ),
            (
                "max_concurrent_tasks = 2305843009213693952",
                "max_concurrent_tasks",
            ),
            ("max_concurrent_tasks = 0", "max_concurrent_tasks"),
            ("max_queued_tasks = 100000000", "max_queued_tasks"),
            (
                "max_streams_per_connection = 0",
                "max_streams_per_connection",
            ),
            ("idle_timeout = \"300000000000d\"", "idle_timeout"),
            ("drain_timeout = \"400d\"", "drain_timeout"),
            ("load_report_interval = \"1y\"", "load_report_interval"),
            ("[dedup]\nremember = \"30d\"", "dedup.remember"),
            ("[dedup]\nmax_entries = 99999999", "dedup.max_entries"),
            ("[dedup]\nhold_input = \"1GiB\"", "dedup.hold_input"),
            ("[dedup]\nmax_memory = \"20GiB\"", "dedup.max_memory"),
            (
                "[tasks.e]\nbuiltin = \"echo\"\ntimeout = \"300000000000d\"",
                "tasks.e.timeout",
            ),
            (
                "[tasks.e]\nbuiltin = \"echo\"\nmax_output = \"99999999GiB\"",
                "tasks.e.max_output",
            ),
            ("log_level = \"loud[\"", "log_level"),
            ("max_uploads_per_agent = 0", "max_uploads_per_agent"),
            ("max_uploads_per_agent = 4097", "max_uploads_per_agent"),
            ("probe_budget = \"5GiB\"", "probe_budget"),
            ("probe_budget = \"lots\"", "probe_budget"),
            ("[dedup]\nmax_result = \"lots\"", "max_result"),
            (
                "[dedup]\nmax_result = \"2MiB\"\nmax_memory = \"1MiB\"",
                "dedup.max_result",
            ),
        ] {
            let m = parse(text).unwrap_err().to_string();
            assert!(
                m.contains("/etc/updraft/daemon.toml") && m.contains(key),
                "{text}: {m}"
            );
        }
    }
}
