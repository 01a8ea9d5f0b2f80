//! `updraft bench placement`: how close `auto` placement comes to the best placement in
//! hindsight, against the two static choices, under conditions that change mid-run.
//!
//! **Topology.** This process is the board: the real agent runs in it (through
//! [`harness::start_agent`]) and so does the client that submits tasks through the
//! agent's local API. The cloud is a child process (this binary's hidden
//! `bench-placement-cloud` command) running the real daemon and, in front of it, the
//! `linkem` relay the agent connects through; the parent changes the link by writing the
//! relay's command language (`delay 75ms`, `bandwidth 5mbit`) to the child's stdin. The
//! relay lives in the child so that the board's CPU limit never slows the emulated wire.
//!
//! **The board's CPU.** A cgroup v1 `cpu` group holds every thread of this process (and
//! so every task the agent runs locally, which inherit it); its CFS quota is the board's
//! speed: 100 % of one core when idle, 25 % when busy, rewritten mid-run. The cloud
//! process gets a group of its own without a quota. Both groups get a large
//! `cpu.shares` ([`CPU_SHARES`]), so other work on a shared machine does not set the
//! board's or the cloud's speed. The agent is not told: it sees the machine through
//! sysinfo as it would on a board, and learns the quota only from its run times. Where
//! no cgroup v1 `cpu` controller is writable (not root, cgroup v2 only), busy phases are
//! emulated by spinner threads competing for the cores instead — cruder, since they slow
//! the cloud process on the same machine too — and the output says which was used.
//!
//! **Tasks.** `crunch` is CPU-heavy: a fixed amount of work ([`CRUNCH_MS`] at a full
//! core, calibrated at start), run as a command (this binary's hidden
//! `bench-placement-burn`) so that it slows down with the board's quota; its input is a
//! few bytes. `digest` is data-heavy: the `sha256` builtin over [`DIGEST_SIZES`] of input.
//! Every third task is a `digest`. The built-in `spin` is not used: it burns for a wall
//! time, so it takes as long on a throttled board as on an idle one.
//!
//! **Strategies.** Each scenario runs [`TASKS`] tasks one after another through the
//! local API, once per strategy, each pass with a fresh agent (fresh state dir, nothing
//! learnt): `where=local`, `where=cloud`, and auto (default policy, so the cost model
//! decides; its exploration counts), the latter [`AUTO_PASSES`] times since its
//! exploration is random. Conditions are defined by task index, so every pass sees the
//! same conditions at the same task. The hindsight oracle takes, per task index, the
//! faster of the measured local and cloud runs. A task's time is submit to last byte of
//! the reply; a pass's total is the sum over its tasks. Each auto reply's
//! `Updraft-Reason` sorts its extra time over the oracle into exploration, choices the
//! oracle made the other way, and same-side noise.
//!
//! **Generated scenarios.** `--random N --seed S` runs N scenarios drawn from a seed
//! instead of the six named ones (real programs, random sizes, links, CPU and mid-run
//! changes, battery phases): see [`random`].
//!
//! **Decision cost.** [`Evaluator::decide`] on a realistic policy plus
//! [`CostModel::predict`] with trained estimates, in a tight loop, beside a baseline
//! measured in the same loop: reading the clock and cloning the [`Signals`] snapshot,
//! which every decision does anyway. The agent's whole `Knowledge::place` (locks, signal
//! assembly, the reason text) is timed too, on the last auto agent with what it learnt.

use anyhow::Context;
use bytes::Bytes;
use std::io::{BufRead, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use updraft_agent::client::{body_bytes, Client, RunRequest};
use updraft_agent::ChannelBody;
use updraft_agent::Where;
use updraft_linkem::{LinkParams, Relay, Reply};
use updraft_proto::policy::cost::{CloudRun, Conditions, CostModel, CostParams, LocalRun};
use updraft_proto::policy::eval::Evaluator;
use updraft_proto::policy::{rules, Place, Signals, TaskInfo};
use updraft_shared::exec::Load;

use crate::harness::{self, AgentHandle, Pki};

mod random;

/// Tasks per scenario and strategy; conditions may change at the halfway mark. Enough
/// for auto's learning to be a cost it must earn back, few enough that the always-cloud
/// pass over the slow link stays around 20 s.
const TASKS: usize = 48;
/// Auto passes per scenario, each on a fresh agent: its exploration is random, so one
/// pass is one draw. They run first and last, around the static passes, so that drift
/// in the machine's load falls on auto's mean and the static passes alike.
const AUTO_PASSES: usize = 2;
/// CPU time of one `crunch` at a full core: a small inference or image step. On a board
/// at 25 % it takes four times as long, which the cloud beats over a fast link.
const CRUNCH_MS: f64 = 40.0;
/// `digest` inputs, cycled. Cheap to hash on the board, slow to send over a 5 Mbit/s
/// link (0.4–1.7 s); kept below the issue's 1–4 MiB so always-cloud finishes in time.
const DIGEST_SIZES: [usize; 3] = [256 * 1024, 512 * 1024, 1024 * 1024];
/// Longest wait for one task: a stuck task fails the run instead of hanging it.
const TASK_LIMIT: Duration = Duration::from_secs(30);
/// Longest wait for an agent to connect through the relay.
const CONNECT_LIMIT: Duration = Duration::from_secs(10);
/// Longest wait for the cloud child to start, answer a command or stop.
const CHILD_LIMIT: Duration = Duration::from_secs(10);
/// CFS period of the board's cgroup. Short, so a quota slows a task evenly (2.5 ms of
/// every 10 ms at 25 %) rather than in 100 ms stalls.
const CFS_PERIOD_US: u64 = 10_000;
/// The board's CPU when idle, percent of one core: a one-core board.
const BOARD_IDLE: u32 = 100;
/// The board's CPU when busy (other work, throttling), percent of one core.
const BOARD_BUSY: u32 = 25;
/// Auto's goal on each named scenario: total completion time within this factor of the
/// oracle's.
const GOAL_RATIO: f64 = 1.05;
/// Decisions per timed batch for the decision cost: ~1 ms, well above the clock's
/// resolution.
const DECISION_BATCH: usize = 1_000;
/// Timed batches per side; the figure is their median, so a preempted batch is ignored.
const DECISION_BATCHES: usize = 100;
/// Burn loop iterations per work unit (see [`burn`]).
const UNIT_ITERATIONS: u64 = 1_000;
/// Units in one calibration probe (a few ms).
const CALIBRATION_UNITS: u64 = 5_000;
/// Calibration probes; the fastest counts, as other load only ever slows one down.
const CALIBRATION_PROBES: usize = 7;
/// Seed of the relay's loss and jitter draws (none are configured; kept fixed anyway).
const RELAY_SEED: u64 = 7;

/// The link, round trip and rate both ways.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Link {
    rtt_ms: u64,
    mbit: u64,
}

/// A LAN-like uplink.
const FAST: Link = Link {
    rtt_ms: 10,
    mbit: 100,
};
/// A poor cellular uplink.
const SLOW: Link = Link {
    rtt_ms: 150,
    mbit: 5,
};

/// What the board and the link are like while a task runs.
#[derive(Debug, Clone, Copy, PartialEq)]
struct World {
    board_pct: u32,
    link: Link,
}

/// A named schedule: the first half of the tasks under `phases[0]`, the rest `phases[1]`.
#[derive(Debug, Clone, Copy)]
struct Scenario {
    name: &'static str,
    phases: [World; 2],
}

impl Scenario {
    fn changing(&self) -> bool {
        self.phases[0] != self.phases[1]
    }

    fn world(&self, i: usize) -> World {
        self.phases[usize::from(i >= TASKS / 2)]
    }

    fn describe(&self) -> String {
        let w = |w: &World| {
            format!(
                "board {}%, rtt {} ms, {} Mbit/s",
                w.board_pct, w.link.rtt_ms, w.link.mbit
            )
        };
        if self.changing() {
            format!("{} -> {}", w(&self.phases[0]), w(&self.phases[1]))
        } else {
            w(&self.phases[0])
        }
    }
}

fn scenarios() -> Vec<Scenario> {
    let idle = |link| World {
        board_pct: BOARD_IDLE,
        link,
    };
    let busy = |link| World {
        board_pct: BOARD_BUSY,
        link,
    };
    vec![
        Scenario {
            name: "fast_idle",
            phases: [idle(FAST), idle(FAST)],
        },
        Scenario {
            name: "fast_busy",
            phases: [busy(FAST), busy(FAST)],
        },
        Scenario {
            name: "slow_idle",
            phases: [idle(SLOW), idle(SLOW)],
        },
        Scenario {
            name: "link_degrades",
            phases: [busy(FAST), busy(SLOW)],
        },
        Scenario {
            name: "board_gets_busy",
            phases: [idle(FAST), busy(FAST)],
        },
        Scenario {
            name: "board_recovers",
            phases: [busy(FAST), idle(FAST)],
        },
    ]
}

/// The two tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Crunch,
    Digest,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Crunch => "crunch",
            Kind::Digest => "digest",
        }
    }
}

/// Task `i` of every scenario: every third one a `digest`, with its size's index in
/// [`DIGEST_SIZES`] (cycling).
fn task_at(i: usize) -> (Kind, usize) {
    if i % 3 == 2 {
        (Kind::Digest, (i / 3) % DIGEST_SIZES.len())
    } else {
        (Kind::Crunch, 0)
    }
}

/// How a pass places its tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Strategy {
    Local,
    Cloud,
    Auto,
}

impl Strategy {
    fn name(self) -> &'static str {
        match self {
            Strategy::Local => "local",
            Strategy::Cloud => "cloud",
            Strategy::Auto => "auto",
        }
    }

    fn where_(self) -> Option<Where> {
        match self {
            Strategy::Local => Some(Where::Local),
            Strategy::Cloud => Some(Where::Cloud),
            Strategy::Auto => None,
        }
    }
}

/// One task's outcome.
#[derive(Debug, Clone)]
struct TaskRun {
    ms: f64,
    cloud: bool,
    reason: String,
    /// Bytes of the reply's body (the task's output).
    output_bytes: u64,
}

/// Whether an `Updraft-Reason` says the side was chosen to measure it rather than
/// because it looked cheaper: the one place that knows the cost model's wording.
fn is_exploration(reason: &str) -> bool {
    [
        "exploring",
        "to measure it",
        "to re-sample it",
        "first run: measuring",
    ]
    .iter()
    .any(|m| reason.contains(m))
}

impl TaskRun {
    /// The cost model chose this side to measure it rather than because it looked cheaper.
    fn explored(&self) -> bool {
        is_exploration(&self.reason)
    }

    /// One side's estimate was a prior (`~` in the reason): never measured for this task.
    fn on_prior(&self) -> bool {
        self.reason.contains(" ~")
    }
}

/// One scenario's passes.
struct ScenarioResult {
    scenario: Scenario,
    local: Vec<TaskRun>,
    cloud: Vec<TaskRun>,
    /// [`AUTO_PASSES`] passes, each on a fresh agent.
    auto: Vec<Vec<TaskRun>>,
}

fn total(runs: &[TaskRun]) -> f64 {
    runs.iter().map(|r| r.ms).sum()
}

impl ScenarioResult {
    fn oracle(&self, i: usize) -> f64 {
        self.local[i].ms.min(self.cloud[i].ms)
    }

    fn oracle_total(&self) -> f64 {
        (0..TASKS).map(|i| self.oracle(i)).sum()
    }

    /// Auto's total, the mean over its passes.
    fn auto_total(&self) -> f64 {
        self.auto.iter().map(|p| total(p)).sum::<f64>() / self.auto.len().max(1) as f64
    }

    /// Largest minus smallest auto total.
    fn auto_spread(&self) -> f64 {
        let totals = self.auto.iter().map(|p| total(p));
        totals.clone().fold(0.0, f64::max) - totals.fold(f64::INFINITY, f64::min)
    }

    fn ratio(&self) -> f64 {
        self.auto_total() / self.oracle_total()
    }

    fn beats_statics(&self) -> bool {
        let a = self.auto_total();
        a < total(&self.local) && a < total(&self.cloud)
    }

    /// Where auto's extra time over the oracle went, summed over its passes.
    fn breakdown(&self) -> Breakdown {
        let mut b = Breakdown::default();
        let mut worst = 0.0;
        for (i, a) in self.auto.iter().flat_map(|p| p.iter().enumerate()) {
            let (kind, _) = task_at(i);
            let counts = match kind {
                Kind::Crunch => &mut b.crunch,
                Kind::Digest => &mut b.digest,
            };
            counts[usize::from(a.cloud)] += 1;
            let oracle_cloud = self.cloud[i].ms < self.local[i].ms;
            let extra = a.ms - self.oracle(i);
            if a.explored() {
                b.explored += 1;
                b.explored_ms += extra;
            } else if a.cloud != oracle_cloud {
                if a.on_prior() {
                    b.prior += 1;
                    b.prior_ms += extra;
                } else {
                    b.off += 1;
                    b.off_ms += extra;
                }
                if extra > worst {
                    worst = extra;
                    b.example = Some(format!(
                        "#{i} {} on {} {:.0} ms (other side {:.0} ms): {}",
                        kind.name(),
                        if a.cloud { "cloud" } else { "local" },
                        a.ms,
                        if a.cloud {
                            self.local[i].ms
                        } else {
                            self.cloud[i].ms
                        },
                        a.reason
                    ));
                }
            } else {
                b.same_ms += extra;
            }
        }
        b
    }
}

/// Auto's placements and the cost of each kind of miss.
#[derive(Debug, Default)]
struct Breakdown {
    /// `[local, cloud]` counts.
    crunch: [usize; 2],
    digest: [usize; 2],
    explored: usize,
    explored_ms: f64,
    /// Chosen as cheaper while one side was a prior (never measured), and the other
    /// side was faster.
    prior: usize,
    prior_ms: f64,
    /// Chosen as cheaper on measured estimates, and the other side was faster.
    off: usize,
    off_ms: f64,
    /// Same side as the oracle: the passes' noise.
    same_ms: f64,
    /// The costliest choice of the wrong side (not exploring), with its reason.
    example: Option<String>,
}

/// What to run and how to report it.
#[derive(Debug, Default)]
pub struct Options {
    /// One JSON line instead of a table.
    pub json: bool,
    /// Only these scenarios (by name); empty means all.
    pub scenarios: Vec<String>,
    /// Every auto task's placement and reason on stderr, as it finishes.
    pub trace: bool,
    /// Run this many generated scenarios instead of the named ones (1..=200).
    pub random: Option<usize>,
    /// Seed of the generated scenarios (with `random`; default 1).
    pub seed: Option<u64>,
}

/// What both modes run on: the cloud child, the board's CPU, the calibrated work unit.
struct Rig {
    dir: tempfile::TempDir,
    pki: Pki,
    exe: PathBuf,
    cloud: CloudChild,
    board: BoardCpu,
    /// Burn units in [`CRUNCH_MS`] at a full core.
    units: u64,
}

impl Rig {
    /// Starts the cloud (its daemon serving the named tasks plus `extra_tasks`) and puts
    /// this process under the board's CPU limit.
    async fn start(extra_tasks: &str) -> anyhow::Result<Rig> {
        let dir = tempfile::tempdir().context("temporary directory for the benchmark")?;
        let pki = Pki::create(dir.path()).context("throwaway certificates")?;
        let exe = std::env::current_exe().context("path of this program")?;
        // The cloud first: it must not inherit the board's CPU limit.
        let daemon_dir = dir.path().join("daemon");
        std::fs::create_dir_all(&daemon_dir)?;
        let config = daemon_dir.join("daemon.toml");
        std::fs::write(&config, daemon_config(&pki, &daemon_dir, &exe, extra_tasks))?;
        let cloud = CloudChild::start(&exe, &config).await?;
        let board = match BoardCpu::cgroup(cloud.pid()) {
            Ok(b) => b,
            Err(e) => BoardCpu::spinners(e),
        };
        // On the board at its idle speed (and its priority, with cgroups).
        let units = tokio::task::spawn_blocking(calibrate).await?;
        Ok(Rig {
            dir,
            pki,
            exe,
            cloud,
            board,
            units,
        })
    }
}

/// Runs the placement benchmark and prints a table, or one JSON line with `json`.
pub async fn run(options: Options) -> anyhow::Result<()> {
    if let Some(n) = options.random {
        anyhow::ensure!(
            options.scenarios.is_empty(),
            "--scenario names a fixed scenario; it does not go with --random"
        );
        return random::run(&options, n).await;
    }
    anyhow::ensure!(
        options.seed.is_none(),
        "--seed chooses the generated scenarios; it needs --random N"
    );
    let all: Vec<Scenario> = scenarios()
        .into_iter()
        .filter(|s| options.scenarios.is_empty() || options.scenarios.iter().any(|n| n == s.name))
        .collect();
    if all.is_empty() {
        let names: Vec<&str> = scenarios().iter().map(|s| s.name).collect();
        anyhow::bail!(
            "no scenario named {}; the scenarios are {}",
            options.scenarios.join(", "),
            names.join(", ")
        );
    }
    let json = options.json;
    let Rig {
        dir,
        pki,
        exe,
        cloud,
        mut board,
        units,
    } = Rig::start("").await?;

    let result = async {
        let mut results = Vec::new();
        let mut place_cost = None;
        for (n, scenario) in all.iter().enumerate() {
            let mut result = ScenarioResult {
                scenario: *scenario,
                local: Vec::new(),
                cloud: Vec::new(),
                auto: Vec::new(),
            };
            let mut order = vec![Strategy::Auto, Strategy::Local, Strategy::Cloud];
            for _ in 1..AUTO_PASSES {
                order.push(Strategy::Auto);
            }
            for (k, &strategy) in order.iter().enumerate() {
                let last = n + 1 == all.len() && k + 1 == order.len();
                let state =
                    dir.path()
                        .join(format!("agent-{}-{}-{k}", scenario.name, strategy.name()));
                let (runs, cost) = run_pass(
                    &Pass {
                        pki: &pki,
                        state: &state,
                        relay: cloud.relay,
                        exe: &exe,
                        units,
                        scenario,
                        strategy,
                        time_place: last,
                        trace: options.trace,
                    },
                    &mut board,
                    &cloud,
                )
                .await
                .with_context(|| format!("scenario {} ({})", scenario.name, strategy.name()))?;
                place_cost = place_cost.or(cost);
                match strategy {
                    Strategy::Local => result.local = runs,
                    Strategy::Cloud => result.cloud = runs,
                    Strategy::Auto => result.auto.push(runs),
                }
            }
            results.push(result);
        }
        anyhow::Ok((results, place_cost))
    }
    .await;

    let emulation = board.describe();
    let stopped = cloud.shutdown().await;
    board.close();
    let (results, place_cost) = result?;
    stopped.context("cloud process shutdown")?;
    let decision = tokio::task::spawn_blocking(decision_cost).await??;
    print(
        json,
        &Report {
            results: &results,
            decision,
            place_cost,
            emulation,
            units,
        },
    );
    Ok(())
}

/// A path as a TOML string, quoted and escaped.
fn toml_path(p: &Path) -> String {
    toml::Value::String(p.display().to_string()).to_string()
}

/// The daemon's config: two slots, the two tasks (and `extra_tasks`), drain quickly at
/// the end.
fn daemon_config(pki: &Pki, state: &Path, exe: &Path, extra_tasks: &str) -> String {
    format!(
        "listen = \"127.0.0.1:0\"\nstate_dir = {}\nmax_concurrent_tasks = 2\n\
         drain_timeout = \"2s\"\n{}\n{}\n{extra_tasks}",
        toml_path(state),
        pki.daemon_tls(),
        catalog(exe)
    )
}

/// The `[tasks.*]` both sides share.
fn catalog(exe: &Path) -> String {
    format!(
        "[tasks.crunch]\ncommand = [{}, \"bench-placement-burn\"]\ntimeout = \"30s\"\n\n\
         [tasks.digest]\nbuiltin = \"sha256\"\n",
        toml_path(exe)
    )
}

/// Everything one pass needs.
struct Pass<'a> {
    pki: &'a Pki,
    state: &'a Path,
    relay: SocketAddr,
    exe: &'a Path,
    units: u64,
    scenario: &'a Scenario,
    strategy: Strategy,
    /// Time `Knowledge::place` on this agent after its tasks.
    time_place: bool,
    /// Print each auto task's placement and reason on stderr.
    trace: bool,
}

/// Runs one scenario's tasks with one strategy on a fresh agent.
async fn run_pass(
    pass: &Pass<'_>,
    board: &mut BoardCpu,
    cloud: &CloudChild,
) -> anyhow::Result<(Vec<TaskRun>, Option<PlaceCost>)> {
    std::fs::create_dir_all(pass.state)?;
    let mut world = pass.scenario.world(0);
    board.set_pct(world.board_pct)?;
    cloud.set_link(world.link).await?;
    // No policy file (so the default: everything auto) and no battery.
    let extra = format!(
        "max_local_concurrency = 1\npolicy = {}\n[signals]\npower_supply_root = {}\n{}",
        toml_path(&pass.state.join("no-policy.toml")),
        toml_path(&pass.state.join("no-power-supply")),
        catalog(pass.exe)
    );
    let agent = harness::start_agent(pass.pki, pass.state, &[pass.relay], &extra).await?;
    let result = async {
        anyhow::ensure!(
            agent.agent.uplink().wait_usable(CONNECT_LIMIT).await,
            "the agent did not connect to the daemon through the relay"
        );
        let client = agent.client();
        let crunch_input = Bytes::from(format!("{}\n", pass.units));
        let digests: Vec<Bytes> = DIGEST_SIZES.iter().map(|&n| digest_input(n)).collect();
        let mut runs = Vec::with_capacity(TASKS);
        for i in 0..TASKS {
            let w = pass.scenario.world(i);
            if w.board_pct != world.board_pct {
                board.set_pct(w.board_pct)?;
            }
            if w.link != world.link {
                cloud.set_link(w.link).await?;
            }
            world = w;
            let (kind, size) = task_at(i);
            let input = match kind {
                Kind::Crunch => crunch_input.clone(),
                Kind::Digest => digests[size].clone(),
            };
            let run = submit(&client, kind, input, pass.strategy)
                .await
                .with_context(|| format!("task #{i} ({})", kind.name()))?;
            if pass.trace && pass.strategy == Strategy::Auto {
                eprintln!(
                    "{} #{i} {} {:.1} ms {}: {}",
                    pass.scenario.name,
                    kind.name(),
                    run.ms,
                    if run.cloud { "cloud" } else { "local" },
                    run.reason
                );
            }
            runs.push(run);
        }
        let cost = if pass.time_place {
            board.set_pct(BOARD_IDLE)?;
            Some(time_place(&agent).await?)
        } else {
            None
        };
        anyhow::Ok((runs, cost))
    }
    .await;
    let stopped = agent.shutdown().await;
    let out = result?;
    stopped.context("agent shutdown")?;
    Ok(out)
}

/// Deterministic, incompressible-looking input of `n` bytes.
fn digest_input(n: usize) -> Bytes {
    let mut x: u64 = 0x243f_6a88_85a3_08d3;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    Bytes::from(v)
}

/// Submits one task through the local API and waits for the whole reply.
async fn submit(
    client: &Client,
    kind: Kind,
    input: Bytes,
    strategy: Strategy,
) -> anyhow::Result<TaskRun> {
    submit_task(client, kind.name(), input, strategy, |body| match kind {
        Kind::Crunch => body.starts_with(b"burnt "),
        Kind::Digest => body.len() == 65,
    })
    .await
}

/// Submits `task` through the local API, waits for the whole reply and checks its
/// output with `expected`.
async fn submit_task(
    client: &Client,
    task: &str,
    input: Bytes,
    strategy: Strategy,
    expected: impl Fn(&[u8]) -> bool,
) -> anyhow::Result<TaskRun> {
    use updraft_agent::{H_EXIT_CODE, H_PLACEMENT, H_REASON};
    let req = RunRequest {
        task: task.into(),
        where_: strategy.where_(),
        ..Default::default()
    };
    let start = Instant::now();
    let (status, headers, body) = tokio::time::timeout(TASK_LIMIT, async {
        let resp = client.run(&req, ChannelBody::full(input)).await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = body_bytes(resp).await?;
        anyhow::Ok((status, headers, body))
    })
    .await
    .map_err(|_| anyhow::anyhow!("no reply within {TASK_LIMIT:?}"))??;
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    anyhow::ensure!(
        status.is_success() && header(H_EXIT_CODE) == "0",
        "agent answered {status}, exit code `{}`: {}",
        header(H_EXIT_CODE),
        String::from_utf8_lossy(&body)
    );
    anyhow::ensure!(
        expected(&body),
        "unexpected output: {:?}",
        String::from_utf8_lossy(&body[..body.len().min(200)])
    );
    let placement = header(H_PLACEMENT);
    let cloud = placement == "cloud";
    if let Some(w) = strategy.where_() {
        let wanted = if w == Where::Cloud { "cloud" } else { "local" };
        anyhow::ensure!(placement == wanted, "asked for {wanted}, ran {placement}");
    }
    Ok(TaskRun {
        ms,
        cloud,
        reason: header(H_REASON),
        output_bytes: body.len() as u64,
    })
}

// ---------------------------------------------------------------------------------------
// The CPU-heavy task's work.

/// Burns `units` of fixed CPU work (not wall time, unlike the `spin` builtin) and
/// returns a checksum so the work cannot be optimised away.
pub fn burn(units: u64) -> u64 {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..units.saturating_mul(UNIT_ITERATIONS) {
        x = std::hint::black_box(x.rotate_left(5) ^ 0x2545_f491_4f6c_dd1d).wrapping_mul(31);
    }
    x
}

/// The hidden `bench-placement-burn` command: reads a unit count on stdin, burns it,
/// prints the checksum.
pub fn burn_stdin() -> anyhow::Result<()> {
    let mut text = String::new();
    std::io::stdin()
        .read_line(&mut text)
        .context("reading the unit count")?;
    let units: u64 = text
        .trim()
        .parse()
        .with_context(|| format!("`{}` is not a unit count", text.trim()))?;
    let sum = burn(units);
    println!("burnt {units} units: {sum:016x}");
    Ok(())
}

/// Units that take [`CRUNCH_MS`] on an idle core of this machine (the fastest of a few
/// probes: other load only ever slows a probe down).
fn calibrate() -> u64 {
    let best = (0..CALIBRATION_PROBES)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(burn(CALIBRATION_UNITS));
            t.elapsed().as_secs_f64() * 1000.0
        })
        .fold(f64::INFINITY, f64::min)
        .max(1e-3);
    ((CALIBRATION_UNITS as f64 * CRUNCH_MS / best).round() as u64).max(1)
}

// ---------------------------------------------------------------------------------------
// The cloud: a child process with the daemon and the link emulator.

/// The hidden `bench-placement-cloud --config PATH` command: serves the daemon on
/// loopback behind a `linkem` relay, prints `{"daemon": ADDR, "relay": ADDR}` on stdout,
/// then applies relay commands read on stdin (answering each on one line) until `quit`
/// or end of input, and drains.
pub async fn serve_cloud(config: &Path) -> anyhow::Result<()> {
    let config = updraft_daemon::config::DaemonConfig::load(config)?;
    let endpoint = updraft_daemon::bind(&config)?;
    let daemon_addr = endpoint.local_addr()?;
    let relay = Relay::start(
        "127.0.0.1:0".parse()?,
        daemon_addr,
        LinkParams::default(),
        RELAY_SEED,
    )?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(updraft_daemon::run(config, endpoint, async move {
        let _ = stopped.await;
    }));
    let mut out = std::io::stdout();
    writeln!(
        out,
        "{}",
        serde_json::json!({ "daemon": daemon_addr, "relay": relay.local_addr() })
    )?;
    out.flush()?;

    // Stdin on a thread of its own: a blocking read must not hold a runtime worker.
    let (tx, mut lines) = tokio::sync::mpsc::channel::<String>(16);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    let handle = relay.handle();
    while let Some(line) = lines.recv().await {
        let answer = match updraft_linkem::Command::parse(&line) {
            Ok(None) => continue,
            Ok(Some(cmd)) => match cmd.execute(&handle) {
                Ok(Reply::Quit) => break,
                Ok(Reply::Print(s)) => s,
                Err(e) => format!("error: {e}"),
            },
            Err(e) => format!("error: {e}"),
        };
        writeln!(out, "{}", answer.replace('\n', " "))?;
        out.flush()?;
    }
    let _ = stop.send(());
    let served = daemon.await;
    relay.shutdown().await;
    served??;
    Ok(())
}

/// The parent's handle on the cloud process.
struct CloudChild {
    child: Option<Child>,
    io: Arc<Mutex<(ChildStdin, BufReader<ChildStdout>)>>,
    relay: SocketAddr,
}

impl CloudChild {
    async fn start(exe: &Path, config: &Path) -> anyhow::Result<Self> {
        let mut child = std::process::Command::new(exe)
            .arg("bench-placement-cloud")
            .arg("--config")
            .arg(config)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {} bench-placement-cloud", exe.display()))?;
        let stdin = child.stdin.take().context("child stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("child stdout")?);
        let mut me = CloudChild {
            child: Some(child),
            io: Arc::new(Mutex::new((stdin, stdout))),
            relay: "127.0.0.1:0".parse()?,
        };
        let line = me
            .read_line()
            .await
            .context("cloud process did not start")?;
        let v: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("cloud process said `{line}`"))?;
        me.relay = v["relay"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("no relay address in `{line}`"))?;
        Ok(me)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    async fn read_line(&self) -> anyhow::Result<String> {
        let io = self.io.clone();
        let read = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            let mut io = io.lock().expect("cloud io lock");
            let n = io.1.read_line(&mut line)?;
            anyhow::ensure!(n > 0, "cloud process closed its output");
            Ok(line.trim().to_string())
        });
        tokio::time::timeout(CHILD_LIMIT, read)
            .await
            .map_err(|_| anyhow::anyhow!("cloud process silent for {CHILD_LIMIT:?}"))??
    }

    /// Sends one relay command and waits for its `ok`.
    async fn command(&self, line: &str) -> anyhow::Result<()> {
        {
            let mut io = self.io.lock().expect("cloud io lock");
            writeln!(io.0, "{line}")?;
            io.0.flush()?;
        }
        let answer = self.read_line().await?;
        anyhow::ensure!(answer == "ok", "relay refused `{line}`: {answer}");
        Ok(())
    }

    async fn set_link(&self, link: Link) -> anyhow::Result<()> {
        self.command(&format!("delay {}us", link.rtt_ms * 500))
            .await?;
        self.command(&format!("bandwidth {}mbit", link.mbit)).await
    }

    /// Asks the child to drain and waits for it; kills it if it does not stop in time.
    async fn shutdown(mut self) -> anyhow::Result<()> {
        {
            let mut io = self.io.lock().expect("cloud io lock");
            let _ = writeln!(io.0, "quit");
            let _ = io.0.flush();
        }
        let mut child = self.child.take().expect("child until shutdown");
        let deadline = Instant::now() + CHILD_LIMIT;
        loop {
            if let Some(status) = child.try_wait()? {
                anyhow::ensure!(status.success(), "cloud process exited with {status}");
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!("cloud process did not stop within {CHILD_LIMIT:?}; killed");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for CloudChild {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------
// The board's CPU.

/// Mount points of the cgroup v1 `cpu` controller, in the order tried.
const CGROUP_V1_CPU: [&str; 2] = ["/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"];

/// How the board's CPU speed is set.
enum BoardCpu {
    /// cgroup v1 `cpu` groups: one holding this whole process (the board), its quota
    /// the board's speed; one holding the cloud process, unlimited.
    Cgroup {
        board: PathBuf,
        cloud: PathBuf,
        /// The group this process was in before, where everything goes back.
        home: PathBuf,
        closed: bool,
    },
    /// Spinner threads competing with the tasks (no cgroup available).
    Spinners {
        why: String,
        stop: Arc<AtomicBool>,
        threads: Vec<std::thread::JoinHandle<()>>,
    },
}

/// `cpu.shares` of both groups, against 1024 for every other process on the machine:
/// the emulated board and cloud each get their CPU ahead of whatever else runs here
/// (other builds on a shared machine), so their speeds are the quota's, not the
/// neighbours'. Both together use at most about one core: tasks run one at a time.
const CPU_SHARES: u64 = 16_384;

/// The thread ids of this process.
fn thread_ids() -> std::io::Result<Vec<String>> {
    let mut ids = Vec::new();
    for e in std::fs::read_dir("/proc/self/task")? {
        ids.push(e?.file_name().to_string_lossy().into_owned());
    }
    Ok(ids)
}

/// Writes each id to a cgroup file (`tasks` for threads, `cgroup.procs` for whole
/// processes); ids that have exited meanwhile (ESRCH) are skipped.
fn write_ids(file: &Path, ids: &[String]) -> std::io::Result<()> {
    for id in ids {
        match std::fs::write(file, id) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(3) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Moves every thread of this process into the cgroup `dir`. Twice over, for threads
/// started while the first round ran (new threads inherit their creator's group).
fn move_threads(dir: &Path) -> std::io::Result<()> {
    for _ in 0..2 {
        write_ids(&dir.join("tasks"), &thread_ids()?)?;
    }
    Ok(())
}

/// Moves every process of the group `from` into `to`.
fn move_procs(from: &Path, to: &Path) -> std::io::Result<()> {
    let procs = std::fs::read_to_string(from.join("cgroup.procs"))?;
    let ids: Vec<String> = procs.split_whitespace().map(str::to_string).collect();
    write_ids(&to.join("cgroup.procs"), &ids)
}

/// Removes an emptied group, waiting a little for exiting children to leave it.
fn remove_group(dir: &Path) {
    for _ in 0..50 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("updraft: could not remove {}", dir.display());
}

impl BoardCpu {
    /// Puts this process in a board group and the process `cloud_pid` in a cloud group.
    fn cgroup(cloud_pid: u32) -> anyhow::Result<BoardCpu> {
        let root = CGROUP_V1_CPU
            .iter()
            .map(Path::new)
            .find(|p| p.join("cpu.cfs_quota_us").exists())
            .context("no cgroup v1 cpu controller mounted")?;
        // This process's own cpu group (`N:cpu,cpuacct:/path`), so ours nest inside it.
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        let rel = own
            .lines()
            .filter_map(|l| {
                let mut f = l.splitn(3, ':').skip(1);
                f.next().zip(f.next())
            })
            .find(|(ctrl, _)| ctrl.split(',').any(|c| c == "cpu"))
            .map_or("/", |(_, path)| path);
        let home = root.join(rel.trim_start_matches('/'));
        // Groups left by an interrupted earlier run; removal fails while one is in use.
        if let Ok(entries) = std::fs::read_dir(&home) {
            for e in entries.flatten() {
                if e.file_name()
                    .to_string_lossy()
                    .starts_with("updraft-bench-")
                {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
        let name = format!("updraft-bench-{}", std::process::id());
        let board = home.join(&name);
        let cloud = home.join(format!("{name}-cloud"));
        // Built first, so that whatever fails below, dropping it undoes what was done.
        let mut me = BoardCpu::Cgroup {
            board: board.clone(),
            cloud: cloud.clone(),
            home,
            closed: false,
        };
        for dir in [&board, &cloud] {
            std::fs::create_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
            std::fs::write(dir.join("cpu.shares"), CPU_SHARES.to_string())?;
            std::fs::write(dir.join("cpu.cfs_quota_us"), "-1")?;
        }
        std::fs::write(board.join("cpu.cfs_period_us"), CFS_PERIOD_US.to_string())?;
        write_ids(&cloud.join("cgroup.procs"), &[cloud_pid.to_string()])
            .with_context(|| format!("moving the cloud process into {}", cloud.display()))?;
        move_threads(&board).with_context(|| format!("moving threads into {}", board.display()))?;
        me.set_pct(BOARD_IDLE)?;
        Ok(me)
    }

    fn spinners(why: anyhow::Error) -> BoardCpu {
        BoardCpu::Spinners {
            why: format!("{why:#}"),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        }
    }

    /// Sets the board's CPU to `pct` of one core.
    fn set_pct(&mut self, pct: u32) -> anyhow::Result<()> {
        match self {
            BoardCpu::Cgroup { board, .. } => {
                let quota = (CFS_PERIOD_US * u64::from(pct) / 100).max(1_000);
                std::fs::write(board.join("cpu.cfs_quota_us"), quota.to_string())
                    .with_context(|| format!("setting the quota of {}", board.display()))?;
            }
            BoardCpu::Spinners { stop, threads, .. } => {
                stop.store(true, Ordering::Relaxed);
                for t in threads.drain(..) {
                    let _ = t.join();
                }
                *stop = Arc::new(AtomicBool::new(false));
                // A task among n runnable threads on c cores gets about c/n of a core.
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                let spinners = if pct >= 100 {
                    0
                } else {
                    (cores * 100 / pct.max(1) as usize).saturating_sub(1)
                };
                for _ in 0..spinners {
                    let stop = stop.clone();
                    threads.push(std::thread::spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            std::hint::black_box(burn(1));
                        }
                    }));
                }
            }
        }
        Ok(())
    }

    fn describe(&self) -> String {
        match self {
            BoardCpu::Cgroup { board, .. } => format!(
                "cgroup v1 cpu quota on this process ({}, period {} ms; board and cloud \
                 groups at cpu.shares {CPU_SHARES})",
                board.display(),
                CFS_PERIOD_US / 1000
            ),
            BoardCpu::Spinners { why, .. } => {
                format!("spinner threads competing for the CPU (no cgroup: {why})")
            }
        }
    }

    /// Back to an unlimited CPU: everything home and the groups removed, or spinners
    /// stopped.
    fn close(&mut self) {
        match self {
            BoardCpu::Cgroup {
                board,
                cloud,
                home,
                closed,
            } => {
                if *closed {
                    return;
                }
                *closed = true;
                let _ = move_threads(home);
                for dir in [&*board, &*cloud] {
                    let _ = move_procs(dir, home);
                    remove_group(dir);
                }
            }
            BoardCpu::Spinners { stop, threads, .. } => {
                stop.store(true, Ordering::Relaxed);
                for t in threads.drain(..) {
                    let _ = t.join();
                }
            }
        }
    }
}

impl Drop for BoardCpu {
    fn drop(&mut self) {
        self.close();
    }
}

// ---------------------------------------------------------------------------------------
// Decision cost.

/// A policy like the one in docs/POLICY.md: five rules (a tag match, battery, a
/// sustained CPU test, input size with bandwidth, RTT with hysteresis), none of which
/// matches below, so every decision walks them all and then asks the cost model.
const REALISTIC_POLICY: &str = r#"
default = "auto"

[[rule]]
name  = "keep private data on the board"
match = { tags = ["private"] }
place = "local"

[[rule]]
name  = "save battery"
when  = { battery_percent = { below = 30 }, charging = false }
place = "cloud"

[[rule]]
name  = "busy or hot"
when  = { cpu_percent = { above = 85, for = "10s" } }
place = "cloud"

[[rule]]
name  = "big inputs stay here on a slow link"
when  = { input_bytes = { above = 50_000_000 }, bandwidth_mbps = { below = 5 } }
place = "local"

[[rule]]
name  = "slow link"
when  = { rtt_ms = { above = 250, hysteresis = 50 } }
place = "local"
"#;

/// Nanoseconds per decision (p50 over batches) and per baseline iteration.
#[derive(Debug, Clone, Copy)]
struct DecisionCost {
    decision_ns: f64,
    baseline_ns: f64,
}

/// `Knowledge::place` on a live agent, ns per call (p50 over batches).
#[derive(Debug, Clone, Copy)]
struct PlaceCost {
    place_ns: f64,
}

fn p50(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(0.0)
}

/// Times the pure decision path against its baseline, alternating batches.
fn decision_cost() -> anyhow::Result<DecisionCost> {
    let policy = rules::parse(REALISTIC_POLICY, Path::new("bench-policy.toml"))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut eval = Evaluator::new(Arc::new(policy));
    let mut model = CostModel::new(CostParams::default());
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    for i in 0..20u64 {
        let at = t0 + Duration::from_millis(100 * i);
        let local = LocalRun {
            run: ms(40 + i % 3),
            cpu_share: 1.0,
            input_bytes: 7,
            output_bytes: 40,
        };
        model.record_local("crunch", &local, at);
        let cloud = CloudRun {
            total: ms(52),
            daemon_queue: Duration::ZERO,
            daemon_input: Duration::ZERO,
            daemon_run: ms(41),
            rtt: Some(ms(10)),
            bandwidth_mbps: Some(80.0),
            download_mbps: Some(80.0),
            input_bytes: 7,
            output_bytes: 40,
        };
        model.record_cloud("crunch", &cloud, at);
        let size = DIGEST_SIZES[i as usize % DIGEST_SIZES.len()] as u64;
        let local = LocalRun {
            run: ms(2 + size / 300_000),
            cpu_share: 1.0,
            input_bytes: size,
            output_bytes: 65,
        };
        model.record_local("digest", &local, at);
    }
    let tags: Vec<String> = vec!["vision".into()];
    let signals = Signals {
        cpu_percent: Some(42.0),
        load_avg: Some(0.9),
        memory_available_mb: Some(812.0),
        temperature_c: Some(51.5),
        battery_percent: None,
        charging: None,
        on_battery: None,
        rtt_ms: Some(11.2),
        bandwidth_mbps: Some(78.0),
        cloud_connected: Some(true),
        cloud_queue: Some(0.0),
        local_queue: Some(0.0),
        input_bytes: Some(7.0),
    };
    let conditions = Conditions {
        cpu_share: 0.8,
        local_queue_wait: Duration::ZERO,
        rtt: Some(ms(11)),
        bandwidth_mbps: Some(78.0),
        download_mbps: Some(78.0),
        bandwidth_sd: 0.2,
        link_probing: false,
        cloud_queue_wait: Duration::ZERO,
        cloud_available: true,
        on_battery: false,
    };
    let mut draw_state: u64 = 0x853c_49e6_748f_ea9b;
    let mut draw = move || {
        draw_state ^= draw_state << 13;
        draw_state ^= draw_state >> 7;
        draw_state ^= draw_state << 17;
        (draw_state >> 11) as f64 / (1u64 << 53) as f64
    };
    let (mut decisions, mut baselines) = (Vec::new(), Vec::new());
    let mut autos = 0usize;
    for batch in 0..DECISION_BATCHES * 11 / 10 {
        // The first tenth warms caches and is not kept.
        let keep = batch >= DECISION_BATCHES / 10;
        let t = Instant::now();
        for _ in 0..DECISION_BATCH {
            let now_read = Instant::now();
            let s = std::hint::black_box(&signals).clone();
            std::hint::black_box((now_read, s));
        }
        let base = t.elapsed().as_nanos() as f64 / DECISION_BATCH as f64;
        let t = Instant::now();
        for _ in 0..DECISION_BATCH {
            let now_read = Instant::now();
            let s = std::hint::black_box(&signals).clone();
            let task = TaskInfo {
                name: "crunch",
                tags: &tags,
            };
            let verdict = eval.decide(task, &s, now_read);
            if verdict.place == Place::Auto {
                autos += 1;
                let p = model.predict("crunch", Some(7), &conditions, now_read, draw());
                std::hint::black_box(p);
            }
            std::hint::black_box(verdict);
        }
        let dec = t.elapsed().as_nanos() as f64 / DECISION_BATCH as f64;
        if keep {
            baselines.push(base);
            decisions.push(dec);
        }
    }
    anyhow::ensure!(
        autos > 0,
        "the benchmark policy never reached the cost model"
    );
    Ok(DecisionCost {
        decision_ns: p50(decisions),
        baseline_ns: p50(baselines),
    })
}

/// Times the agent's whole per-task decision, `Knowledge::place`, with what it learnt.
async fn time_place(agent: &AgentHandle) -> anyhow::Result<PlaceCost> {
    let a = agent.agent.clone();
    tokio::task::spawn_blocking(move || {
        let spec = a
            .config()
            .catalog
            .get("crunch")
            .context("crunch in the catalog")?
            .clone();
        let chosen = a.uplink().pick();
        let load = Load {
            running: 0,
            queued: 0,
            capacity: 1,
            uploading: 0,
        };
        let mut batches = Vec::new();
        for batch in 0..DECISION_BATCHES * 11 / 10 {
            let t = Instant::now();
            for _ in 0..DECISION_BATCH / 10 {
                let d = a
                    .knowledge()
                    .place(&spec, Where::Auto, chosen.as_ref(), load, Some(7));
                std::hint::black_box(d);
            }
            if batch >= DECISION_BATCHES / 10 {
                batches.push(t.elapsed().as_nanos() as f64 / (DECISION_BATCH / 10) as f64);
            }
        }
        Ok(PlaceCost {
            place_ns: p50(batches),
        })
    })
    .await?
}

// ---------------------------------------------------------------------------------------
// Output.

struct Report<'a> {
    results: &'a [ScenarioResult],
    decision: DecisionCost,
    place_cost: Option<PlaceCost>,
    emulation: String,
    units: u64,
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn print(json: bool, r: &Report<'_>) {
    let d = r.decision;
    if json {
        let mut m = serde_json::Map::new();
        for s in r.results {
            let n = s.scenario.name;
            let b = s.breakdown();
            let mut put = |k: &str, v: serde_json::Value| {
                m.insert(format!("{n}_{k}"), v);
            };
            put("local_ms", round1(total(&s.local)).into());
            put("cloud_ms", round1(total(&s.cloud)).into());
            put("auto_ms", round1(s.auto_total()).into());
            put("auto_spread_ms", round1(s.auto_spread()).into());
            put("oracle_ms", round1(s.oracle_total()).into());
            put("auto_over_oracle", round3(s.ratio()).into());
            put("auto_explored", b.explored.into());
            put("auto_explored_extra_ms", round1(b.explored_ms).into());
            put("auto_wrong_on_prior", b.prior.into());
            put("auto_wrong_on_prior_extra_ms", round1(b.prior_ms).into());
            put("auto_wrong_on_estimates", b.off.into());
            put("auto_wrong_on_estimates_extra_ms", round1(b.off_ms).into());
            if s.scenario.changing() {
                put("auto_beats_statics", s.beats_statics().into());
            }
        }
        m.insert("decision_ns_p50".into(), round1(d.decision_ns).into());
        m.insert("decision_baseline_ns".into(), round1(d.baseline_ns).into());
        m.insert(
            "decision_over_baseline".into(),
            round3(d.decision_ns / d.baseline_ns.max(1e-9)).into(),
        );
        if let Some(p) = r.place_cost {
            m.insert("place_ns_p50".into(), round1(p.place_ns).into());
        }
        let worst = r
            .results
            .iter()
            .map(ScenarioResult::ratio)
            .fold(0.0, f64::max);
        m.insert("worst_auto_over_oracle".into(), round3(worst).into());
        m.insert("tasks_per_scenario".into(), TASKS.into());
        m.insert("auto_passes".into(), AUTO_PASSES.into());
        m.insert("crunch_units".into(), r.units.into());
        m.insert(
            "board_emulation".into(),
            if r.emulation.starts_with("cgroup") {
                "cgroup_v1_quota"
            } else {
                "spinner_threads"
            }
            .into(),
        );
        println!("{}", serde_json::Value::Object(m));
        return;
    }
    println!(
        "updraft bench placement: {TASKS} tasks per scenario (2 crunch : 1 digest), \
         each pass on a fresh agent; auto = mean of {AUTO_PASSES} passes"
    );
    println!(
        "crunch = {CRUNCH_MS:.0} ms of CPU at a full core ({} units), input a few bytes; \
         digest = sha256 of 256 KiB / 512 KiB / 1 MiB",
        r.units
    );
    println!("board CPU: {}", r.emulation);
    println!();
    println!(
        "{:<16} {:>9} {:>9} {:>9} {:>9} {:>8} {:>6} {:>8}",
        "scenario", "local ms", "cloud ms", "auto ms", "oracle", "a/oracle", "goal", "a<stat"
    );
    for s in r.results {
        let ratio = s.ratio();
        println!(
            "{:<16} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>7.3}x {:>6} {:>8}",
            s.scenario.name,
            total(&s.local),
            total(&s.cloud),
            s.auto_total(),
            s.oracle_total(),
            ratio,
            if ratio <= GOAL_RATIO { "ok" } else { "MISS" },
            match (s.scenario.changing(), s.beats_statics()) {
                (false, _) => "-",
                (true, true) => "yes",
                (true, false) => "NO",
            }
        );
    }
    println!();
    println!(
        "where auto's time went (extra over the oracle, summed over its {AUTO_PASSES} passes; \
         auto ms above is their mean):"
    );
    for s in r.results {
        let b = s.breakdown();
        println!("  {:<16} {}", s.scenario.name, s.scenario.describe());
        println!(
            "  {:<16} placed: crunch {} local / {} cloud, digest {} local / {} cloud",
            "", b.crunch[0], b.crunch[1], b.digest[0], b.digest[1]
        );
        println!(
            "  {:<16} extra: explored {} (+{:.0} ms); wrong side against a prior {} \
             (+{:.0} ms), on measured estimates {} (+{:.0} ms); same side {:+.0} ms",
            "", b.explored, b.explored_ms, b.prior, b.prior_ms, b.off, b.off_ms, b.same_ms
        );
        if let Some(e) = &b.example {
            let e: String = e.chars().take(300).collect();
            println!("  {:<16} worst wrong side: {e}", "");
        }
    }
    println!();
    println!(
        "decision (policy of 5 rules + cost model): p50 {:.0} ns; baseline (clock read + \
         Signals clone) {:.0} ns; ratio {:.1}x",
        d.decision_ns,
        d.baseline_ns,
        d.decision_ns / d.baseline_ns.max(1e-9)
    );
    if let Some(p) = r.place_cost {
        println!(
            "whole Knowledge::place on the last auto agent (locks, signals, reason): p50 {:.0} ns",
            p.place_ns
        );
    }
    println!();
    println!(
        "oracle = per task, the faster of the measured local and cloud runs; a/oracle goal \
         <= {GOAL_RATIO:.2}; a<stat: auto beat both static choices (scenarios that change)."
    );
    if r.emulation.starts_with("spinner") {
        println!("note: spinner threads slow the cloud process too; ratios are rougher.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_split_at_half() {
        for s in scenarios() {
            assert_eq!(s.world(0), s.phases[0]);
            assert_eq!(s.world(TASKS / 2 - 1), s.phases[0]);
            assert_eq!(s.world(TASKS / 2), s.phases[1]);
            assert_eq!(s.world(TASKS - 1), s.phases[1]);
        }
        let digests = (0..TASKS).filter(|&i| task_at(i).0 == Kind::Digest).count();
        assert_eq!(digests, TASKS / 3);
    }

    #[test]
    fn decision_cost_reaches_the_cost_model() {
        let d = decision_cost().unwrap();
        assert!(d.decision_ns > 0.0 && d.baseline_ns > 0.0, "{d:?}");
    }

    #[test]
    fn burn_is_deterministic() {
        assert_eq!(burn(3), burn(3));
        assert_ne!(burn(3), burn(4));
    }
}
