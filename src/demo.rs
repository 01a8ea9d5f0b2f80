//! `updraft demo`: two daemons and an agent in one process on loopback, over real QUIC
//! with mutual TLS and throwaway certificates, running a scripted day of tasks through
//! the agent's real local API (HTTP on its Unix socket) and printing a live table of
//! where each task ran and why.
//!
//! The board follows a policy file written for the day ([`policy_toml`]) and reads its
//! battery from a fake power_supply tree in the kernel's layout; cloud-b sits behind a
//! userspace link emulator. So the day can change what placement sees: the battery
//! drains and charges, spinner threads make the CPU busy, the link to cloud-b slows and
//! recovers, and daemons drain away. Whenever the script waits for the agent to notice a
//! change, it polls what the agent sees (its signals, or a `policy explain` decision)
//! with a time limit; it never sleeps a fixed time.
//!
//! The day is a list of [`Step`]s, each a list of [`Action`]s. Every row carries what the
//! script expects; rows placed by the cost model accept either side as long as the
//! reason comes from the cost model (`auto: ...`). A row that differs is flagged with a
//! `!` line instead of stopping the show, and the summary counts them.
//!
//! This machine is not a quiet board: other programs may keep its CPU above the
//! busy-board threshold, and then the policy rightly sends tasks away before the cost
//! model is asked. Such rows are noted with a `*` line, not flagged.

use crate::harness::{self, AgentHandle, DaemonHandle, Pki};
use anyhow::Context;
use bytes::Bytes;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use updraft_agent::client::{body_bytes, Client, RunRequest};
use updraft_agent::fake_power as fake;
use updraft_agent::Agent;
use updraft_agent::Where;
use updraft_agent::{header_text_decode, ChannelBody};
use updraft_linkem::{LinkParams, Relay};

/// Names the demo gives its daemons, in the order the agent lists them. The second is
/// reached through the link emulator.
const DAEMON_NAMES: [&str; 2] = ["cloud-a", "cloud-b"];
/// Index of the daemon behind the link emulator.
const RELAYED: usize = 1;
/// Longest wait for one task's reply: a hang becomes an error row, not a stuck demo.
const TASK_LIMIT: Duration = Duration::from_secs(20);
/// Longest wait for the agent to connect to the daemons at the start.
const CONNECT_LIMIT: Duration = Duration::from_secs(10);
/// Longest wait for the agent to notice a change (load report, drain, disconnect, a new
/// battery reading). Load reports come every 100 ms and signals are sampled every
/// [`SAMPLE_INTERVAL`], so this is many of them.
const NOTICE_LIMIT: Duration = Duration::from_secs(3);
/// Longest wait for a rule to turn on or off. The slowest is `slow link`: QUIC's smoothed
/// RTT moves 1/8 of the way to each new sample, about five samples a second here, so it
/// takes one to two seconds to cross the threshold; a loaded machine may take longer.
const RULE_LIMIT: Duration = Duration::from_secs(8);
/// Longest wait for the CPU to calm down once nothing of the demo's burns it: the smoothed
/// reading halves its distance every sample, so a calm machine takes a few hundred ms.
/// Past that, other programs are keeping the machine busy, and the demo carries on.
const CALM_LIMIT: Duration = Duration::from_secs(2);
/// How often the demo polls the agent while waiting.
const POLL: Duration = Duration::from_millis(20);
/// Output width the table is laid out for (fits a 100-column terminal).
const WIDTH: usize = 99;

/// How often board-1 samples its signals: fast, so the day's changes show at once.
const SAMPLE_INTERVAL: &str = "100ms";
/// The task `policy explain` is asked about while waiting for a rule. It has no tags
/// and its offload is auto, so only the board's signals decide which rule applies.
const PROBE_TASK: &str = "echo";

/// The policy's rules, by name.
const PRIVATE_RULE: &str = "keep private data on the board";
const BATTERY_RULE: &str = "save battery";
const SLOW_RULE: &str = "slow link";
const BUSY_RULE: &str = "busy board";
/// `save battery`: below this charge, and not charging.
const LOW_BATTERY_PERCENT: u8 = 30;
/// `busy board`: CPU above this, sustained for [`BUSY_FOR`].
const BUSY_CPU_PERCENT: f64 = 80.0;
const BUSY_FOR: &str = "1s";
/// `slow link`: round trip above this.
const SLOW_RTT_MS: f64 = 150.0;

/// One-way delay the link emulator adds to cloud-b normally: a farther region, so with
/// equal load board-1 prefers cloud-a (nearest first).
const NEAR_ONE_WAY: Duration = Duration::from_millis(5);
/// One-way delay while the link is slow: a congested uplink, ~300 ms round trip, well
/// past the `slow link` threshold so the smoothed RTT crosses it quickly.
const SLOW_ONE_WAY: Duration = Duration::from_millis(150);

/// board-1's policy for the day. `slow link` comes before `busy board`: on a link that
/// slow, moving work off even a busy board costs more than it saves.
fn policy_toml() -> String {
    format!(
        r#"# board-1's placement policy for the demo: the first rule that matches decides.
default = "auto"

[[rule]]
name  = "{PRIVATE_RULE}"
match = {{ tags = ["private"] }}
place = "local"

[[rule]]
name  = "{BATTERY_RULE}"
when  = {{ battery_percent = {{ below = {LOW_BATTERY_PERCENT} }}, charging = false }}
place = "cloud"

[[rule]]
name  = "{SLOW_RULE}"
when  = {{ rtt_ms = {{ above = {SLOW_RTT_MS} }} }}
place = "local"

[[rule]]
name  = "{BUSY_RULE}"
when  = {{ cpu_percent = {{ above = {BUSY_CPU_PERCENT}, for = "{BUSY_FOR}" }} }}
place = "cloud"
"#
    )
}

/// Daemon settings: two slots so loads read `n/2`, frequent load reports so the agent
/// sees drains and load at once, and a drain limit well above the longest task.
const DAEMON_SETTINGS: &str = r#"
max_concurrent_tasks = 2
load_report_interval = "100ms"
drain_timeout = "5s"
"#;

/// The daemon's catalog. `count-lines` is missing on purpose: the cloud runs only what
/// its own catalog names.
const DAEMON_TASKS: &str = r#"
[tasks.echo]
builtin = "echo"

[tasks.sha256]
builtin = "sha256"

[tasks.spin]
builtin = "spin"
allow_args = true

[tasks.wc]
command = ["wc", "-c"]
timeout = "10s"

[tasks.grep-errors]
command = ["grep", "-c"]
allow_args = true
timeout = "10s"

[tasks.infer]
builtin = "spin"
"#;

/// Agent settings: short link timers so the failure scenes take well under a second.
/// Top-level keys first: the demo puts `policy = ...` above them.
///
/// `keep_alive` is below the daemons' `load_report_interval` on purpose. The agent's RTT
/// estimate only moves when the daemon acknowledges something the agent sent, and QUIC
/// restarts the keep-alive timer on every packet *received*: with load reports arriving
/// more often than the keep-alive period, an idle agent sends nothing to acknowledge and
/// its `rtt_ms` stays where it was, so the link scene would never see the link slow.
const AGENT_SETTINGS: &str = r#"
max_local_concurrency = 2

[link]
keep_alive = "50ms"
idle_timeout = "1s"
connect_timeout = "500ms"
accept_timeout = "1s"
reconnect_min = "100ms"
reconnect_max = "500ms"
"#;

/// The agent's catalog: the daemon's tasks plus three that never leave the board
/// (`private-log` by its offload, `fingerprint` by the policy's first rule,
/// `count-lines` because the cloud does not list it).
const AGENT_TASKS: &str = r#"
[tasks.echo]
builtin = "echo"

[tasks.sha256]
builtin = "sha256"

[tasks.spin]
builtin = "spin"
allow_args = true

[tasks.wc]
command = ["wc", "-c"]
timeout = "10s"

[tasks.grep-errors]
command = ["grep", "-c"]
allow_args = true
timeout = "10s"

[tasks.infer]
builtin = "spin"
offload = "always"
tags = ["model"]

[tasks.private-log]
command = ["wc", "-l"]
offload = "never"
tags = ["private"]
timeout = "10s"

[tasks.fingerprint]
builtin = "sha256"
tags = ["private"]

[tasks.count-lines]
command = ["wc", "-l"]
timeout = "10s"
"#;

// ---------------------------------------------------------------------------------
// The script.
// ---------------------------------------------------------------------------------

/// One scene of the day.
struct Step {
    title: String,
    actions: Vec<Action>,
}

/// What a step does.
enum Action {
    /// Submit one after another; each row prints as it finishes.
    Sequential(Vec<Job>),
    /// Submit all at once; rows print in the order they finish.
    Concurrent(Vec<Job>),
    /// Start `long`, find the daemon running it, drain that daemon (as on SIGTERM)
    /// while it runs, then submit `after`, which must not go to the draining daemon.
    DrainWhileBusy { long: Job, after: Vec<Job> },
    /// Drain every daemon still up and wait until the agent has no usable daemon.
    DrainAll,
    /// Rewrites the fake power_supply tree: mains online or not, and the battery at each
    /// of `levels` in turn with kernel status `status`, waiting each time until the
    /// agent has read it.
    Power {
        mains: bool,
        status: &'static str,
        levels: Vec<u8>,
    },
    /// Starts a spinner thread per core and waits until the agent's smoothed CPU is above
    /// the busy threshold (the rule's `for` has only just started counting).
    SpinStart,
    /// Stops the spinner threads.
    SpinStop,
    /// Sets the link emulator's one-way delay (both directions) in front of cloud-b.
    Link { one_way: Duration },
    /// Waits until the policy rule `rule` decides (`on`) or no longer decides (`!on`)
    /// for [`PROBE_TASK`], as `policy explain` shows it; `signal` is the signal it
    /// watches, printed with the outcome.
    AwaitRule {
        rule: &'static str,
        on: bool,
        signal: &'static str,
    },
}

/// Where a row is expected to end up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Cloud,
    Local,
    /// The cost model's choice: either side.
    Either,
    /// Refused before placement (no placement header).
    Nowhere,
}

impl Place {
    fn as_str(self) -> &'static str {
        match self {
            Self::Cloud => "cloud",
            Self::Local => "local",
            Self::Either => "either",
            Self::Nowhere => "-",
        }
    }
}

/// Who is expected to have decided a row, judged by how its reason starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decider {
    /// The cost model: `auto: ...`.
    Auto,
    /// A policy rule: `rule "NAME": ...`.
    Rule(&'static str),
    /// Not checked by its start (see [`Job::reason_has`]).
    Any,
}

/// How a row is expected to end.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Want {
    Exit(i32),
    Error(&'static str),
}

/// One submission and what the script expects of it.
#[derive(Debug, Clone)]
struct Job {
    task: &'static str,
    input: Bytes,
    args: Vec<String>,
    where_: Option<Where>,
    place: Place,
    want: Want,
    decider: Decider,
    reason_has: Option<&'static str>,
    output: Option<Bytes>,
    /// Rule `busy board` may decide this row instead of the cost model when other
    /// programs keep the machine's CPU busy (noted, not flagged). Rows that expect a rule
    /// are always checked: `busy board` comes last, so it cannot pre-empt one that held.
    busy_ok: bool,
}

impl Job {
    /// A task left to placement: the cost model decides, either side will do.
    fn new(task: &'static str, input: impl Into<Bytes>) -> Self {
        Self {
            task,
            input: input.into(),
            args: Vec::new(),
            where_: None,
            place: Place::Either,
            want: Want::Exit(0),
            decider: Decider::Auto,
            reason_has: None,
            output: None,
            busy_ok: true,
        }
    }
    /// Expected on the board, for a reason given by `rule` or `because`.
    fn local(mut self) -> Self {
        self.place = Place::Local;
        self.decider = Decider::Any;
        self
    }
    /// Expected in the cloud, for a reason given by `rule` or `because`.
    fn cloud(mut self) -> Self {
        self.place = Place::Cloud;
        self.decider = Decider::Any;
        self
    }
    /// Forced by the submitter (`where=`).
    fn at(mut self, w: Where) -> Self {
        self.where_ = Some(w);
        (self.place, self.reason_has) = match w {
            Where::Local => (Place::Local, Some("where=local")),
            Where::Cloud => (Place::Cloud, Some("where=cloud")),
            Where::Auto => (Place::Either, None),
        };
        self.decider = Decider::Any;
        self.busy_ok = false;
        self
    }
    /// Decided by the policy rule `name`.
    fn rule(mut self, name: &'static str) -> Self {
        self.decider = Decider::Rule(name);
        self
    }
    /// Only the cost model may decide this row, even on a busy machine.
    fn strict(mut self) -> Self {
        self.busy_ok = false;
        self
    }
    fn arg(mut self, a: &str) -> Self {
        self.args.push(a.to_string());
        self
    }
    fn exit(mut self, code: i32) -> Self {
        self.want = Want::Exit(code);
        self
    }
    fn refused(mut self, code: &'static str) -> Self {
        self.place = Place::Nowhere;
        self.decider = Decider::Any;
        self.want = Want::Error(code);
        self
    }
    fn because(mut self, text: &'static str) -> Self {
        self.reason_has = Some(text);
        self
    }
    fn output(mut self, out: impl Into<Bytes>) -> Self {
        self.output = Some(out.into());
        self
    }
    fn echoed(self) -> Self {
        let input = self.input.clone();
        self.output(input)
    }
}

/// The scripted day.
fn script() -> Vec<Step> {
    let mib = pseudo_random(1 << 20);
    let hello = "hello from board-1\n";
    let log = sample_log(200, 3);
    let quiet_log = sample_log(120, 0);
    let readings = pseudo_random(64 << 10);
    let wc_out = format!("{}\n", readings.len());
    let slow_rtt = 2 * SLOW_ONE_WAY.as_millis();
    vec![
        Step {
            title: "Morning, on mains, the cloud up: the cost model places each task".into(),
            actions: vec![Action::Sequential(vec![
                Job::new("echo", hello).echoed(),
                Job::new("sha256", mib.clone()),
                Job::new("spin", "50"),
                Job::new("wc", readings.clone()).output(wc_out.clone()),
            ])],
        },
        Step {
            title: "The submitter decides: where=local / where=cloud win".into(),
            actions: vec![Action::Sequential(vec![
                Job::new("sha256", mib.clone()).at(Where::Local),
                Job::new("spin", "50").at(Where::Cloud),
            ])],
        },
        Step {
            title: "Private data stays on the board (offload = \"never\"; the policy's first rule)"
                .into(),
            actions: vec![Action::Sequential(vec![
                Job::new("private-log", log.clone())
                    .local()
                    .because("offload = never")
                    .output("200\n"),
                Job::new("fingerprint", readings.clone())
                    .local()
                    .rule(PRIVATE_RULE),
            ])],
        },
        Step {
            title: "Arguments, exit codes, and a task the cloud does not list".into(),
            actions: vec![Action::Sequential(vec![
                Job::new("spin", "").arg("120").output("spun 120 ms\n"),
                Job::new("grep-errors", log.clone())
                    .arg("ERROR")
                    .output("3\n"),
                Job::new("grep-errors", quiet_log)
                    .arg("ERROR")
                    .exit(1)
                    .output("0\n"),
                // Its first run goes to the cloud to measure it, which refuses it.
                Job::new("count-lines", log.clone())
                    .local()
                    .because("ran on the board")
                    .output("200\n"),
            ])],
        },
        Step {
            title: "A burst of eight at once (each daemon runs two at a time, queues the rest)"
                .into(),
            actions: vec![Action::Concurrent(vec![
                Job::new("spin", "").arg("150"),
                Job::new("spin", "").arg("150"),
                Job::new("spin", "").arg("150"),
                Job::new("spin", "").arg("150"),
                Job::new("sha256", mib.clone()),
                Job::new("sha256", mib.clone()),
                Job::new("echo", hello).echoed(),
                Job::new("wc", readings.clone()).output(wc_out),
            ])],
        },
        Step {
            title: format!(
                "Unplugged: the battery drains (rule \"{BATTERY_RULE}\": below \
                 {LOW_BATTERY_PERCENT}%, discharging)"
            ),
            actions: vec![
                Action::Power {
                    mains: false,
                    status: "Discharging",
                    levels: vec![80],
                },
                // On battery the cost model counts energy too.
                Action::Sequential(vec![Job::new("spin", "50").because("on battery")]),
                Action::Power {
                    mains: false,
                    status: "Discharging",
                    levels: vec![65, 50, 36, 22],
                },
                Action::Sequential(vec![
                    Job::new("sha256", mib.clone()).cloud().rule(BATTERY_RULE),
                    Job::new("spin", "")
                        .arg("120")
                        .cloud()
                        .rule(BATTERY_RULE)
                        .output("spun 120 ms\n"),
                    // The first rule still wins.
                    Job::new("fingerprint", readings.clone())
                        .local()
                        .rule(PRIVATE_RULE),
                ]),
            ],
        },
        Step {
            title: "Plugged in again: charging, so the cost model decides again".into(),
            actions: vec![
                Action::Power {
                    mains: true,
                    status: "Charging",
                    levels: vec![23],
                },
                Action::Sequential(vec![
                    Job::new("sha256", mib.clone()),
                    Job::new("spin", "50"),
                ]),
            ],
        },
        Step {
            title: format!(
                "The board gets busy (rule \"{BUSY_RULE}\": cpu above {BUSY_CPU_PERCENT}% \
                 for {BUSY_FOR})"
            ),
            actions: vec![
                // Start from a calm board, if this machine has one.
                Action::AwaitRule {
                    rule: BUSY_RULE,
                    on: false,
                    signal: "cpu_percent",
                },
                Action::SpinStart,
                // Busy, but not for long enough yet: the cost model still decides.
                Action::Sequential(vec![Job::new("echo", hello).echoed().strict()]),
                Action::AwaitRule {
                    rule: BUSY_RULE,
                    on: true,
                    signal: "cpu_percent",
                },
                Action::Sequential(vec![
                    Job::new("echo", hello).echoed().cloud().rule(BUSY_RULE),
                    Job::new("sha256", mib.clone()).cloud().rule(BUSY_RULE),
                ]),
                Action::SpinStop,
                Action::AwaitRule {
                    rule: BUSY_RULE,
                    on: false,
                    signal: "cpu_percent",
                },
            ],
        },
        Step {
            title: "A daemon drains mid-task (SIGTERM): its task finishes, new work fails over"
                .into(),
            actions: vec![Action::DrainWhileBusy {
                // Forced to the cloud, where board-1 picks the nearest idle daemon.
                long: Job::new("spin", "")
                    .arg("600")
                    .at(Where::Cloud)
                    .output("spun 600 ms\n"),
                after: vec![
                    Job::new("echo", hello).echoed(),
                    Job::new("sha256", mib.clone()),
                ],
            }],
        },
        Step {
            title: format!(
                "The link to {} slows to ~{slow_rtt} ms round trip (rule \"{SLOW_RULE}\": rtt \
                 above {SLOW_RTT_MS} ms)",
                DAEMON_NAMES[RELAYED]
            ),
            actions: vec![
                Action::Link {
                    one_way: SLOW_ONE_WAY,
                },
                Action::AwaitRule {
                    rule: SLOW_RULE,
                    on: true,
                    signal: "rtt_ms",
                },
                Action::Sequential(vec![
                    Job::new("sha256", mib.clone()).local().rule(SLOW_RULE),
                    Job::new("spin", "")
                        .arg("120")
                        .local()
                        .rule(SLOW_RULE)
                        .output("spun 120 ms\n"),
                    // A task that must run in the cloud still goes, slowly.
                    Job::new("infer", "80")
                        .cloud()
                        .because("offload = always")
                        .output("spun 80 ms\n"),
                ]),
                Action::Link {
                    one_way: NEAR_ONE_WAY,
                },
                Action::AwaitRule {
                    rule: SLOW_RULE,
                    on: false,
                    signal: "rtt_ms",
                },
                Action::Sequential(vec![Job::new("sha256", mib.clone())]),
            ],
        },
        Step {
            title: "The whole cloud is gone: the board carries on alone".into(),
            actions: vec![
                Action::DrainAll,
                Action::Sequential(vec![
                    Job::new("echo", hello)
                        .echoed()
                        .local()
                        .because("cloud unavailable"),
                    Job::new("sha256", mib).local().because("cloud unavailable"),
                    Job::new("private-log", log).local().output("200\n"),
                    Job::new("infer", "80").refused("cloud_unavailable"),
                    Job::new("spin", "50")
                        .at(Where::Cloud)
                        .refused("cloud_unavailable"),
                ]),
                // Evening: unplugged again, low; the rule wants the cloud, there is none.
                Action::Power {
                    mains: false,
                    status: "Discharging",
                    levels: vec![18],
                },
                Action::Sequential(vec![Job::new("spin", "50")
                    .local()
                    .rule(BATTERY_RULE)
                    .because("no daemon is usable")]),
            ],
        },
    ]
}

/// `n` bytes that do not compress (xorshift), the same on every run.
fn pseudo_random(n: usize) -> Bytes {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out.into()
}

/// A sensor log of `lines` lines, `errors` of them containing `ERROR`.
fn sample_log(lines: usize, errors: usize) -> Bytes {
    let mut s = String::new();
    for i in 0..lines {
        let level = if errors > 0 && i % (lines / errors) == lines / errors / 2 {
            "ERROR"
        } else {
            "info"
        };
        s.push_str(&format!(
            "t={i:04} {level} temp_c={}.{} rpm={}\n",
            40 + i % 7,
            i % 10,
            1200 + (i * 37) % 300
        ));
    }
    s.into()
}

// ---------------------------------------------------------------------------------
// Running it.
// ---------------------------------------------------------------------------------

/// Runs the demo.
pub async fn run() -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("updraft-demo-")
        .tempdir()
        .context("creating a temporary directory")?;
    let table = Arc::new(Table::new());
    table.banner();
    let mut demo = Demo::start(dir.path(), table.clone()).await?;
    for (i, step) in script().into_iter().enumerate() {
        table.step(i + 1, &step.title);
        for action in step.actions {
            demo.act(action).await;
        }
    }
    demo.finish().await;
    Ok(())
}

/// A daemon the demo started.
struct Daemon {
    name: &'static str,
    handle: Option<DaemonHandle>,
}

/// Threads that burn every core until stopped (also when dropped), so the board's real
/// CPU reading climbs the way it would under a heavy local workload.
struct Spinners {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Spinners {
    fn start(n: usize) -> std::io::Result<Self> {
        let mut s = Self {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::with_capacity(n),
        };
        for i in 0..n {
            let stop = s.stop.clone();
            // On error `s` is dropped, which stops the threads already started.
            s.threads.push(
                std::thread::Builder::new()
                    .name(format!("demo-spin-{i}"))
                    .spawn(move || {
                        let mut x: u64 = 1;
                        while !stop.load(Ordering::Relaxed) {
                            for _ in 0..10_000 {
                                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                            }
                            std::hint::black_box(x);
                        }
                    })?,
            );
        }
        Ok(s)
    }

    /// Stops the threads and waits for them (each notices within microseconds).
    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Spinners {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Everything that is up.
struct Demo {
    table: Arc<Table>,
    daemons: Vec<Daemon>,
    /// The link emulator in front of cloud-b.
    relay: Relay,
    agent: AgentHandle,
    client: Client,
    /// The fake power_supply tree board-1 reads.
    power: PathBuf,
    spinners: Option<Spinners>,
    /// Rule `busy board` stayed on with no spinners running: other programs keep this
    /// machine busy, so every row may be decided by it (noted, not flagged).
    ambient_busy: bool,
}

/// Writes the fake power_supply tree: mains `AC` and battery `BAT0`.
fn write_power(root: &Path, mains: bool, percent: u8, status: &str) -> std::io::Result<()> {
    fake::mains(root, "AC", mains)?;
    fake::battery(root, "BAT0", percent, status)
}

/// `on mains, battery 80% charging`.
fn power_words(mains: bool, status: &str) -> String {
    format!(
        "{}, {}",
        if mains { "on mains" } else { "unplugged" },
        status.to_lowercase()
    )
}

/// A path as a TOML string, quoted and escaped.
fn toml_path(p: &Path) -> String {
    toml::Value::String(p.display().to_string()).to_string()
}

impl Demo {
    async fn start(dir: &Path, table: Arc<Table>) -> anyhow::Result<Self> {
        let pki = Pki::create(dir).context("creating throwaway certificates")?;
        table.event(&format!(
            "throwaway CA, daemon certificate (localhost) and agent certificate (board-1) in {}",
            dir.display()
        ));
        let mut daemons = Vec::new();
        let mut addrs = Vec::new();
        let mut names = Vec::new();
        let mut relay = None;
        for (i, name) in DAEMON_NAMES.into_iter().enumerate() {
            let state = dir.join(name);
            std::fs::create_dir_all(&state)
                .with_context(|| format!("creating {}", state.display()))?;
            let handle =
                harness::start_daemon(&pki, &state, &format!("{DAEMON_SETTINGS}{DAEMON_TASKS}"))
                    .await
                    .with_context(|| format!("starting daemon {name}"))?;
            names.push((handle.addr.to_string(), name));
            if i == RELAYED {
                let params = LinkParams {
                    delay: NEAR_ONE_WAY,
                    ..LinkParams::default()
                };
                let r = Relay::start(
                    SocketAddr::from(([127, 0, 0, 1], 0)),
                    handle.addr,
                    params,
                    1,
                )
                .context("starting the link emulator")?;
                table.event(&format!(
                    "{name}: updraftd listening on udp {} (QUIC, mutual TLS, 2 slots); board-1 \
                     reaches it through a link emulator on udp {} adding {} ms each way (a \
                     farther region)",
                    handle.addr,
                    r.local_addr(),
                    NEAR_ONE_WAY.as_millis()
                ));
                addrs.push(r.local_addr());
                names.push((r.local_addr().to_string(), name));
                relay = Some(r);
            } else {
                table.event(&format!(
                    "{name}: updraftd listening on udp {} (QUIC, mutual TLS, 2 slots)",
                    handle.addr
                ));
                addrs.push(handle.addr);
            }
            daemons.push(Daemon {
                name,
                handle: Some(handle),
            });
        }
        let relay = relay.context("no daemon is behind the link emulator")?;
        table.set_names(names);

        let power = dir.join("power");
        write_power(&power, true, 80, "Charging")
            .with_context(|| format!("writing {}", power.display()))?;
        table.event(&format!(
            "board-1's power_supply tree (fake, in the kernel's layout) in {}: {}, battery 80%",
            power.display(),
            power_words(true, "Charging")
        ));
        let policy = dir.join("policy.toml");
        std::fs::write(&policy, policy_toml())
            .with_context(|| format!("writing {}", policy.display()))?;
        table.event(&format!(
            "board-1's policy in {}: rules \"{PRIVATE_RULE}\" (tag private: local), \
             \"{BATTERY_RULE}\" (battery < {LOW_BATTERY_PERCENT}% and discharging: cloud), \
             \"{SLOW_RULE}\" (rtt > {SLOW_RTT_MS} ms: local), \"{BUSY_RULE}\" (cpu > \
             {BUSY_CPU_PERCENT}% for {BUSY_FOR}: cloud); otherwise auto (the cost model)",
            policy.display()
        ));

        let state = dir.join("board-1");
        std::fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
        let extra = format!(
            "policy = {}\n{AGENT_SETTINGS}\n[signals]\npower_supply_root = {}\nsample_interval = \
             \"{SAMPLE_INTERVAL}\"\n{AGENT_TASKS}",
            toml_path(&policy),
            toml_path(&power),
        );
        let agent = harness::start_agent(&pki, &state, &addrs, &extra)
            .await
            .context("starting the agent")?;
        table.event(&format!(
            "board-1: updraft-agent API on {}; signals sampled every {SAMPLE_INTERVAL}",
            agent.socket.display()
        ));
        let client = agent.client();
        let demo = Self {
            table,
            daemons,
            relay,
            agent,
            client,
            power,
            spinners: None,
            ambient_busy: false,
        };
        let t0 = Instant::now();
        let all = demo
            .wait_for(CONNECT_LIMIT, |a| {
                a.uplink()
                    .status()
                    .iter()
                    .all(|s| s.connected && s.load.is_some())
            })
            .await;
        if all {
            demo.table.event(&format!(
                "board-1 connected to {} in {} ms",
                DAEMON_NAMES.join(" and "),
                t0.elapsed().as_millis()
            ));
        } else if demo.agent.agent.uplink().pick().is_some() {
            demo.table
                .warn("only some daemons connected in time; carrying on with those");
        } else {
            demo.table.warn(&format!(
                "no daemon connected within {CONNECT_LIMIT:?}; the cloud rows below will differ"
            ));
        }
        Ok(demo)
    }

    /// Polls the agent until `probe` returns something or `limit` passes.
    async fn poll<T>(&self, limit: Duration, probe: impl Fn(&Agent) -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(v) = probe(&self.agent.agent) {
                return Some(v);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Polls the agent until `cond` holds or `limit` passes. True if it held.
    async fn wait_for(&self, limit: Duration, cond: impl Fn(&Agent) -> bool) -> bool {
        self.poll(limit, |a| cond(a).then_some(())).await.is_some()
    }

    async fn act(&mut self, action: Action) {
        match action {
            Action::Sequential(jobs) => {
                for job in jobs {
                    let job = self.on_this_machine(job);
                    submit(&self.client, &self.table, job).await;
                }
            }
            Action::Concurrent(jobs) => {
                let mut set = tokio::task::JoinSet::new();
                for job in jobs {
                    let job = self.on_this_machine(job);
                    let (client, table) = (self.client.clone(), self.table.clone());
                    set.spawn(async move { submit(&client, &table, job).await });
                }
                while set.join_next().await.is_some() {}
            }
            Action::DrainWhileBusy { long, after } => self.drain_while_busy(long, after).await,
            Action::DrainAll => self.drain_all().await,
            Action::Power {
                mains,
                status,
                levels,
            } => self.power(mains, status, &levels).await,
            Action::SpinStart => self.spin_start().await,
            Action::SpinStop => {
                if let Some(s) = self.spinners.take() {
                    s.stop();
                    self.table.event("spinner threads stopped");
                }
            }
            Action::Link { one_way } => self.link(one_way),
            Action::AwaitRule { rule, on, signal } => self.await_rule(rule, on, signal).await,
        }
    }

    /// While other programs keep the CPU busy, any row placement decides may be decided
    /// by rule `busy board`.
    fn on_this_machine(&self, mut job: Job) -> Job {
        if self.ambient_busy && job.where_.is_none() {
            job.busy_ok = true;
        }
        job
    }

    async fn power(&mut self, mains: bool, status: &'static str, levels: &[u8]) {
        let t = Instant::now();
        for &level in levels {
            if let Err(e) = write_power(&self.power, mains, level, status) {
                self.table.warn(&format!(
                    "cannot write the fake power_supply tree {}: {e}",
                    self.power.display()
                ));
                return;
            }
            let seen = self
                .wait_for(NOTICE_LIMIT, |a| {
                    let p = a.knowledge().board().power;
                    p.battery_percent == Some(f64::from(level))
                        && p.on_battery == Some(!mains)
                        && p.charging == Some(status == "Charging")
                })
                .await;
            if !seen {
                let p = self.agent.agent.knowledge().board().power;
                self.table.warn(&format!(
                    "board-1 did not read battery {level}% ({}) within {NOTICE_LIMIT:?}; it \
                     reads {:?}",
                    power_words(mains, status),
                    p
                ));
                return;
            }
        }
        let levels: Vec<String> = levels.iter().map(|l| format!("{l}%")).collect();
        self.table.event(&format!(
            "{}: battery {}; board-1 read {} in {} ms",
            power_words(mains, status),
            levels.join(" -> "),
            if levels.len() > 1 { "each level" } else { "it" },
            t.elapsed().as_millis()
        ));
    }

    async fn spin_start(&mut self) {
        let n = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
        match Spinners::start(n) {
            Ok(s) => self.spinners = Some(s),
            Err(e) => {
                self.table
                    .warn(&format!("cannot start spinner threads: {e}"));
                return;
            }
        }
        let t = Instant::now();
        let cpu = self
            .poll(NOTICE_LIMIT, |a| {
                a.knowledge()
                    .board()
                    .cpu_percent
                    .filter(|c| *c > BUSY_CPU_PERCENT)
            })
            .await;
        match cpu {
            Some(c) if self.ambient_busy => self.table.event(&format!(
                "{n} spinner threads burn every core; board-1's smoothed cpu reads {c:.0}%, but \
                 this machine was busy before, so rule \"{BUSY_RULE}\" is on already"
            )),
            Some(c) => self.table.event(&format!(
                "{n} spinner threads burn every core; after {} ms board-1's smoothed cpu reads \
                 {c:.0}%: above {BUSY_CPU_PERCENT}%, but not yet for {BUSY_FOR}",
                t.elapsed().as_millis()
            )),
            None => self.table.warn(&format!(
                "{n} spinner threads run, but board-1's cpu did not pass {BUSY_CPU_PERCENT}% \
                 within {NOTICE_LIMIT:?}"
            )),
        }
    }

    fn link(&mut self, one_way: Duration) {
        let name = DAEMON_NAMES[RELAYED];
        if self.daemons[RELAYED].handle.is_none() {
            self.table.warn(&format!(
                "{name} is not up any more, so slowing its link changes nothing"
            ));
        }
        let params = LinkParams {
            delay: one_way,
            ..LinkParams::default()
        };
        match self.relay.handle().set_both(params) {
            Ok(()) => self.table.event(&format!(
                "link emulator: {} ms each way to {name} (~{} ms round trip)",
                one_way.as_millis(),
                2 * one_way.as_millis()
            )),
            Err(e) => self
                .table
                .warn(&format!("cannot change the link emulator: {e}")),
        }
    }

    /// What `policy explain` says for [`PROBE_TASK`] now: reason and signals.
    fn explain(agent: &Agent) -> Option<(String, serde_json::Value)> {
        let v = agent.explain(PROBE_TASK, Where::Auto, None).ok()?;
        Some((v["reason"].as_str()?.to_string(), v["signals"].clone()))
    }

    async fn await_rule(&mut self, rule: &'static str, on: bool, signal: &'static str) {
        let prefix = format!("rule \"{rule}\"");
        let t = Instant::now();
        // Waiting for the CPU to calm down is the one wait others can make fail.
        let ambient = rule == BUSY_RULE && !on && self.spinners.is_none();
        let limit = if ambient { CALM_LIMIT } else { RULE_LIMIT };
        let got = self
            .poll(limit, |a| {
                Self::explain(a).filter(|(reason, _)| reason.starts_with(&prefix) == on)
            })
            .await;
        let value = |signals: &serde_json::Value| {
            signals[signal]
                .as_f64()
                .map_or_else(|| "absent".to_string(), |v| format!("{v:.0}"))
        };
        match got {
            Some((reason, _)) if on => self.table.event(&format!(
                "after {} ms board-1's policy explain says: {reason}",
                t.elapsed().as_millis()
            )),
            Some((_, signals)) => {
                if rule == BUSY_RULE {
                    self.ambient_busy = false;
                }
                self.table.event(&format!(
                    "after {} ms board-1 reads {signal} {}: rule \"{rule}\" is off",
                    t.elapsed().as_millis(),
                    value(&signals)
                ));
            }
            None => {
                let (reason, signals) = Self::explain(&self.agent.agent).unwrap_or_default();
                if ambient {
                    self.ambient_busy = true;
                    self.table.event(&format!(
                        "{signal} still {} after {limit:?}: other programs keep this machine \
                         busy, so rule \"{rule}\" stays on; rows it decides are noted, not flagged",
                        value(&signals)
                    ));
                } else {
                    self.table.warn(&format!(
                        "rule \"{rule}\" did not turn {} within {limit:?} ({signal} {}); \
                         board-1's policy explain says: {reason}",
                        if on { "on" } else { "off" },
                        value(&signals)
                    ));
                }
            }
        }
    }

    async fn drain_while_busy(&mut self, long: Job, after: Vec<Job>) {
        // Start from quiet daemons so the one that reports a running task is ours.
        let busy = |s: &updraft_agent::LinkStatus| s.load.is_some_and(|l| l.running + l.queued > 0);
        if !self
            .wait_for(NOTICE_LIMIT, |a| !a.uplink().status().iter().any(busy))
            .await
        {
            self.table
                .warn("daemons still report load from earlier tasks");
        }
        let long_task = long.task;
        let runner = {
            let (client, table) = (self.client.clone(), self.table.clone());
            tokio::spawn(async move { submit(&client, &table, long).await })
        };
        let victim = self
            .poll(NOTICE_LIMIT, |a| {
                a.uplink()
                    .status()
                    .iter()
                    .position(busy)
                    .filter(|&i| self.daemons.get(i).is_some_and(|d| d.handle.is_some()))
            })
            .await;
        let i = match victim {
            Some(i) => i,
            None => {
                self.table.warn(&format!(
                    "no daemon reported running `{long_task}`; draining the first one still up"
                ));
                match self.daemons.iter().position(|d| d.handle.is_some()) {
                    Some(i) => i,
                    None => {
                        let _ = runner.await;
                        return;
                    }
                }
            }
        };
        let name = self.daemons[i].name;
        let Some(handle) = self.daemons[i].handle.take() else {
            let _ = runner.await;
            return;
        };
        self.table.event(&format!(
            "{name} is running `{long_task}`; draining {name} now (as on SIGTERM)"
        ));
        let drain = tokio::spawn(async move {
            let t = Instant::now();
            (handle.shutdown().await, t.elapsed())
        });
        let noticed = self
            .wait_for(NOTICE_LIMIT, |a| {
                a.uplink()
                    .status()
                    .get(i)
                    .is_some_and(|s| s.draining || !s.connected)
            })
            .await;
        if noticed {
            self.table.event(&format!(
                "board-1 heard {name} is draining: new tasks go to the other daemon or stay here"
            ));
        } else {
            self.table
                .warn(&format!("board-1 did not notice {name} draining in time"));
        }
        for job in after {
            let job = self.on_this_machine(job);
            let row = submit(&self.client, &self.table, job).await;
            if row.daemon == Some(name) {
                self.table.warn(&format!(
                    "that task went to {name}, which was draining; expected failover"
                ));
            }
        }
        match runner.await {
            Ok(row) if row.place == Place::Cloud && row.daemon != Some(name) => {
                self.table.warn(&format!(
                    "`{long_task}` did not report running on {name}; the drain may not have overlapped it"
                ));
            }
            Ok(_) => {}
            Err(e) => self
                .table
                .warn(&format!("`{long_task}` submitter failed: {e}")),
        }
        Self::report_drain(&self.table, name, drain.await);
        if i == RELAYED {
            self.table.warn(&format!(
                "{name} (behind the link emulator) drained instead of the nearer daemon; the \
                 link scene has nothing left to slow"
            ));
        }
    }

    fn report_drain(
        table: &Table,
        name: &str,
        r: Result<(anyhow::Result<()>, Duration), tokio::task::JoinError>,
    ) {
        match r {
            Ok((Ok(()), took)) => table.event(&format!(
                "{name} drained and stopped after {} ms",
                took.as_millis()
            )),
            Ok((Err(e), _)) => table.warn(&format!("{name} stopped with an error: {e:#}")),
            Err(e) => table.warn(&format!("{name} shutdown task failed: {e}")),
        }
    }

    async fn drain_all(&mut self) {
        for d in &mut self.daemons {
            if let Some(handle) = d.handle.take() {
                self.table
                    .event(&format!("draining {} (as on SIGTERM)", d.name));
                let t = Instant::now();
                let r = handle.shutdown().await;
                let name = d.name;
                Self::report_drain(&self.table, name, Ok((r, t.elapsed())));
            }
        }
        if self
            .wait_for(NOTICE_LIMIT, |a| a.uplink().pick().is_none())
            .await
        {
            self.table
                .event("board-1 has no usable daemon; it keeps reconnecting with backoff");
        } else {
            self.table
                .warn("board-1 still sees a usable daemon after every daemon stopped");
        }
    }

    /// Stops whatever is still up and prints the summary.
    async fn finish(mut self) {
        if let Some(s) = self.spinners.take() {
            s.stop();
        }
        for d in &mut self.daemons {
            if let Some(handle) = d.handle.take() {
                let t = Instant::now();
                let r = handle.shutdown().await;
                let name = d.name;
                self.table.event(&format!("{name} stopped"));
                if let Err(e) = r {
                    self.table.warn(&format!(
                        "{name} stopped with an error after {:?}: {e:#}",
                        t.elapsed()
                    ));
                }
            }
        }
        let status = self.agent.agent.status_json();
        let Demo {
            table,
            agent,
            relay,
            ..
        } = self;
        let t = Instant::now();
        match agent.shutdown().await {
            Ok(()) => table.event(&format!(
                "board-1 stopped in {} ms",
                t.elapsed().as_millis()
            )),
            Err(e) => table.warn(&format!("the agent stopped with an error: {e:#}")),
        }
        relay.shutdown().await;
        table.summary(&status);
    }
}

/// What one submission came to, for the summary and for checks by the caller.
#[derive(Debug, Clone)]
struct Row {
    place: Place,
    daemon: Option<&'static str>,
    surprise: bool,
    /// Decided by rule `busy board` because of other programs' load (tolerated).
    noted: bool,
}

/// Submits one job through the agent's socket, prints its row, checks it.
async fn submit(client: &Client, table: &Table, job: Job) -> Row {
    let req = RunRequest {
        task: job.task.to_string(),
        args: job.args.clone(),
        where_: job.where_,
        detach: false,
    };
    let t = Instant::now();
    let got = tokio::time::timeout(TASK_LIMIT, async {
        let resp = client
            .run(&req, ChannelBody::full(job.input.clone()))
            .await?;
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let ok = resp.status().is_success();
        let place = match header(updraft_agent::H_PLACEMENT).as_deref() {
            Some("cloud") => Place::Cloud,
            Some("local") => Place::Local,
            _ => Place::Nowhere,
        };
        let reason = header(updraft_agent::H_REASON).unwrap_or_default();
        let exit = header(updraft_agent::H_EXIT_CODE).and_then(|v| v.parse::<i32>().ok());
        let stderr = header(updraft_agent::H_STDERR_TAIL)
            .map(|s| header_text_decode(&s))
            .unwrap_or_default();
        let code = header(updraft_agent::H_ERROR_CODE);
        let body = body_bytes(resp).await?;
        let outcome = if ok {
            match exit {
                Some(c) => Ok(c),
                None => Err((
                    "no_exit_code".to_string(),
                    "reply had no updraft-exit-code header".to_string(),
                )),
            }
        } else {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let code = v["code"]
                .as_str()
                .map(str::to_string)
                .or(code)
                .unwrap_or_else(|| "unknown".into());
            let message = v["error"].as_str().map_or_else(
                || String::from_utf8_lossy(&body).into_owned(),
                str::to_string,
            );
            Err((code, message))
        };
        anyhow::Ok(Reply {
            place,
            reason,
            outcome,
            stderr,
            output: body,
        })
    })
    .await;
    let reply = match got {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Reply::failed("api_error", format!("{e:#}")),
        Err(_) => Reply::failed(
            "demo_timeout",
            format!("no reply within {TASK_LIMIT:?}; the demo moved on"),
        ),
    };
    table.row(&job, &reply, t.elapsed())
}

/// A reply as read from the API.
struct Reply {
    place: Place,
    reason: String,
    /// Exit code, or (error code, message).
    outcome: Result<i32, (String, String)>,
    stderr: String,
    output: Bytes,
}

impl Reply {
    fn failed(code: &str, message: String) -> Self {
        Self {
            place: Place::Nowhere,
            reason: String::new(),
            outcome: Err((code.to_string(), message)),
            stderr: String::new(),
            output: Bytes::new(),
        }
    }
}
// ---------------------------------------------------------------------------------
// Printing.
// ---------------------------------------------------------------------------------

/// The live table: rows and events, printed as they happen, and the tally.
struct Table {
    start: Instant,
    /// Daemon address → demo name, so reasons read `cloud-a`, not `127.0.0.1:40123`.
    names: Mutex<Vec<(String, &'static str)>>,
    rows: Mutex<Vec<Row>>,
    warnings: Mutex<usize>,
}

impl Table {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            names: Mutex::new(Vec::new()),
            rows: Mutex::new(Vec::new()),
            warnings: Mutex::new(0),
        }
    }

    fn set_names(&self, names: Vec<(String, &'static str)>) {
        *self.names.lock().expect("names lock") = names;
    }

    fn rename(&self, text: &str) -> String {
        let mut text = text.to_string();
        for (addr, name) in self.names.lock().expect("names lock").iter() {
            text = text.replace(addr.as_str(), name);
        }
        text
    }

    fn clock(&self) -> String {
        format!("{:.2}s", self.start.elapsed().as_secs_f64())
    }

    fn print(&self, lines: &[String]) {
        let mut out = std::io::stdout().lock();
        for l in lines {
            let _ = writeln!(out, "{}", l.trim_end());
        }
        let _ = out.flush();
    }

    fn banner(&self) {
        self.print(&[
            "Updraft demo: two cloud daemons (one behind a link emulator) and one board agent"
                .into(),
            "in this process, on loopback, over QUIC with mutual TLS. Every task goes through"
                .into(),
            "the agent's local API (HTTP on its Unix socket), as a program on the board would"
                .into(),
            "submit it. Through a scripted day the battery drains, the CPU gets busy and the"
                .into(),
            "link slows, and the board's policy file and cost model move work accordingly."
                .into(),
            "(The services log to stderr; `2>/dev/null` or UPDRAFT_LOG=warn shows the table alone.)"
                .into(),
            String::new(),
        ]);
    }

    fn step(&self, n: usize, title: &str) {
        let head = format!("-- {n}. {title} ");
        let fill = WIDTH.saturating_sub(head.chars().count());
        self.print(&[
            String::new(),
            format!("{head}{}", "-".repeat(fill)),
            format!(
                "{:>6} {:<17} {:>7} {:<5} {:>5} {:<6} {}",
                "time", "task", "input", "where", "ms", "result", "reason"
            ),
        ]);
    }

    /// An event between rows: `   1.23s * text`.
    fn event(&self, text: &str) {
        let prefix = format!("{:>6} * ", self.clock());
        self.print(&indent_wrap(&prefix, &self.rename(text)));
    }

    /// A line flagging something the script did not expect.
    fn warn(&self, text: &str) {
        *self.warnings.lock().expect("warnings lock") += 1;
        let prefix = format!("{:>6} ! ", self.clock());
        self.print(&indent_wrap(&prefix, &self.rename(text)));
    }

    /// Prints one task row (and `!` lines for whatever differs from the script).
    fn row(&self, job: &Job, reply: &Reply, took: Duration) -> Row {
        let reason = self.rename(&reply.reason);
        let (result, mut text) = match &reply.outcome {
            Ok(code) => (format!("exit {code}"), reason.clone()),
            Err((code, message)) => {
                let message = self.rename(message);
                let text = if reason.is_empty() {
                    format!("{code}: {message}")
                } else {
                    format!("{code}: {message} [placed: {reason}]")
                };
                ("ERROR".to_string(), text)
            }
        };
        let stderr = reply.stderr.trim();
        if !stderr.is_empty() {
            text.push_str(&format!(" [stderr: {stderr}]"));
        }
        let mut task = job.task.to_string();
        if !job.args.is_empty() {
            task.push(' ');
            task.push_str(&job.args.join(" "));
        }
        let first = format!(
            "{:>6} {:<17} {:>7} {:<5} {:>5} {:<6} ",
            self.clock(),
            task,
            human_bytes(job.input.len()),
            reply.place.as_str(),
            took.as_millis(),
            result
        );
        let mut lines = indent_wrap(&first, &text);
        let (surprises, noted) = check(job, reply, &reason);
        for s in &surprises {
            lines.push(format!("{:>6} ! {s}", ""));
        }
        if noted {
            lines.extend(indent_wrap(
                &format!("{:>6} * ", ""),
                "other programs keep this machine's CPU busy, so that rule decided before \
                 the cost model (noted, not flagged)",
            ));
        }
        self.print(&lines);
        let daemon = (reply.place == Place::Cloud)
            .then(|| {
                DAEMON_NAMES
                    .into_iter()
                    .find(|n| reason.contains(&format!("daemon {n}")))
            })
            .flatten();
        let row = Row {
            place: reply.place,
            daemon,
            surprise: !surprises.is_empty(),
            noted,
        };
        self.rows.lock().expect("rows lock").push(row.clone());
        row
    }

    fn summary(&self, status: &serde_json::Value) {
        let rows = self.rows.lock().expect("rows lock").clone();
        let count = |p: Place| rows.iter().filter(|r| r.place == p).count();
        let by_daemon: Vec<String> = DAEMON_NAMES
            .iter()
            .map(|n| {
                let k = rows.iter().filter(|r| r.daemon == Some(*n)).count();
                format!("{n} {k}")
            })
            .collect();
        let surprises = rows.iter().filter(|r| r.surprise).count();
        let noted = rows.iter().filter(|r| r.noted).count();
        let warnings = *self.warnings.lock().expect("warnings lock");
        let mut lines = vec![
            String::new(),
            format!("-- Summary {}", "-".repeat(WIDTH - 11)),
            format!(
                "{} tasks in {:.1}s: cloud {} ({}, not named in the reason {}), local {}, refused {}",
                rows.len(),
                self.start.elapsed().as_secs_f64(),
                count(Place::Cloud),
                by_daemon.join(", "),
                count(Place::Cloud) - rows.iter().filter(|r| r.daemon.is_some()).count(),
                count(Place::Local),
                count(Place::Nowhere),
            ),
        ];
        lines.push(if surprises + warnings == 0 {
            "every row and event went as the script expected".into()
        } else {
            format!(
                "{surprises} rows and {warnings} events differed from the script (see the ! lines)"
            )
        });
        if noted > 0 {
            lines.push(format!(
                "{noted} rows went by rule \"{BUSY_RULE}\" because other programs kept the CPU busy \
                 (see the * lines)"
            ));
        }
        lines.push("board-1's view of its daemons at the end (from its status):".into());
        for c in status["clouds"].as_array().into_iter().flatten() {
            let addr = c["address"].as_str().unwrap_or("?");
            let state = match (c["connected"].as_bool(), c["draining"].as_bool()) {
                (Some(true), Some(true)) => "connected, draining",
                (Some(true), _) => "connected",
                (_, Some(true)) => "disconnected, was draining",
                _ => "disconnected",
            };
            let err = c["last_error"]
                .as_str()
                .map_or(String::new(), |e| format!("; last error: {e}"));
            let prefix = format!("  {:<8} ", self.rename(addr));
            lines.extend(indent_wrap(&prefix, &format!("{state}{err}")));
        }
        self.print(&lines);
    }
}

/// What differs from the script, one line each; and whether the row was left to rule
/// `busy board` by other programs' load (then where it ran and why are not checked).
fn check(job: &Job, reply: &Reply, reason: &str) -> (Vec<String>, bool) {
    let mut out = Vec::new();
    let busy = format!("rule \"{BUSY_RULE}\"");
    // Only rows left to the cost model: a rule above `busy board` that was expected to
    // decide and did not is a real difference.
    let noted = job.busy_ok
        && !matches!(job.decider, Decider::Rule(_))
        && reply.outcome.is_ok()
        && reason.starts_with(&busy);
    if !noted && job.place != Place::Either && reply.place != job.place {
        out.push(format!(
            "expected placement {}, got {}",
            job.place.as_str(),
            reply.place.as_str()
        ));
    }
    match (&job.want, &reply.outcome) {
        (Want::Exit(w), Ok(g)) if w == g => {}
        (Want::Error(w), Err((g, _))) if w == g => {}
        (Want::Exit(w), Ok(g)) => out.push(format!("expected exit {w}, got exit {g}")),
        (Want::Exit(w), Err((g, _))) => out.push(format!("expected exit {w}, got error {g}")),
        (Want::Error(w), Ok(g)) => out.push(format!("expected error {w}, got exit {g}")),
        (Want::Error(w), Err((g, _))) => out.push(format!("expected error {w}, got {g}")),
    }
    if reply.outcome.is_ok() && !noted {
        match job.decider {
            Decider::Auto if !reason.starts_with("auto:") => {
                out.push("expected the cost model to decide (`auto: ...`)".into());
            }
            Decider::Rule(name) if !reason.starts_with(&format!("rule \"{name}\"")) => {
                out.push(format!("expected rule \"{name}\" to decide"));
            }
            _ => {}
        }
        if let Some(want) = job.reason_has {
            if !reason.contains(want) {
                out.push(format!("expected the reason to mention `{want}`"));
            }
        }
    }
    if let (Some(want), Ok(_)) = (&job.output, &reply.outcome) {
        if *want != reply.output {
            out.push(format!(
                "output differs: expected {}, got {}",
                human_bytes(want.len()),
                human_bytes(reply.output.len())
            ));
        }
    }
    (out, noted)
}

/// `prefix` then `text` wrapped to [`WIDTH`], continuation lines indented to the
/// text's column.
fn indent_wrap(prefix: &str, text: &str) -> Vec<String> {
    let col = prefix.chars().count();
    let room = WIDTH.saturating_sub(col).max(20);
    let mut lines = Vec::new();
    let mut cur = String::new();
    for word in text.split_whitespace() {
        let mut word = word.to_string();
        // Words longer than a line (paths) are cut rather than overflowing.
        while word.chars().count() > room {
            if !cur.is_empty() {
                lines.push(std::mem::take(&mut cur));
            }
            let head: String = word.chars().take(room).collect();
            word = word.chars().skip(room).collect();
            lines.push(head);
        }
        let need = cur.chars().count() + usize::from(!cur.is_empty()) + word.chars().count();
        if need > room && !cur.is_empty() {
            lines.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(&word);
    }
    if !cur.is_empty() || lines.is_empty() {
        lines.push(cur);
    }
    lines
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            if i == 0 {
                format!("{prefix}{l}")
            } else {
                format!("{}{l}", " ".repeat(col))
            }
        })
        .collect()
}

fn human_bytes(n: usize) -> String {
    const KIB: usize = 1 << 10;
    const MIB: usize = 1 << 20;
    if n >= MIB {
        format!("{:.1} MiB", n as f64 / MIB as f64)
    } else if n >= KIB {
        format!("{:.0} KiB", n as f64 / KIB as f64)
    } else {
        format!("{n} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_keeps_width_and_indent() {
        let prefix = " ".repeat(52);
        let lines = indent_wrap(&prefix, &"word ".repeat(40));
        assert!(lines.len() > 1);
        for l in &lines {
            assert!(l.chars().count() <= WIDTH, "{l:?}");
            assert!(l.starts_with(&prefix));
        }
        let long = indent_wrap("> ", &"x".repeat(300));
        assert!(long.iter().all(|l| l.chars().count() <= WIDTH));
    }

    #[test]
    fn the_policy_parses_with_its_rules_in_order() {
        let p = updraft_proto::policy::rules::parse(&policy_toml(), Path::new("policy.toml"))
            .unwrap_or_else(|e| panic!("{e}"));
        let names: Vec<&str> = p.rules().iter().map(|r| &*r.name).collect();
        assert_eq!(names, [PRIVATE_RULE, BATTERY_RULE, SLOW_RULE, BUSY_RULE]);
    }

    #[test]
    fn sample_log_has_the_errors_it_claims() {
        let log = sample_log(200, 3);
        let text = std::str::from_utf8(&log).unwrap();
        assert_eq!(text.lines().count(), 200);
        assert_eq!(text.lines().filter(|l| l.contains("ERROR")).count(), 3);
        assert!(!std::str::from_utf8(&sample_log(120, 0))
            .unwrap()
            .contains("ERROR"));
    }

    #[test]
    fn scripted_tasks_exist_in_the_agent_catalog() {
        let agent: toml::Value = toml::from_str(AGENT_TASKS).unwrap();
        for step in script() {
            for action in step.actions {
                let jobs = match action {
                    Action::Sequential(j) | Action::Concurrent(j) => j,
                    Action::DrainWhileBusy { long, after } => {
                        let mut j = after;
                        j.push(long);
                        j
                    }
                    _ => Vec::new(),
                };
                for j in jobs {
                    assert!(agent["tasks"].get(j.task).is_some(), "{}", j.task);
                }
            }
        }
    }
}
