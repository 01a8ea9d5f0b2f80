//! `updraft bench placement --random N --seed S`: auto against the oracle and the static
//! choices on N generated scenarios, so that no change to the cost model can be tuned to
//! the workload it is judged on.
//!
//! **What is drawn.** Scenario `k` comes from its own splitmix64 stream seeded by `S`
//! and `k`, so `--random 3 --seed S` runs the first three scenarios of `--random 20
//! --seed S`. Each scenario draws:
//! - 2–3 task classes from a pool of real programs (the first `burn` or `xz`, so that
//!   every scenario has work the cloud can win), run as command tasks by the agent
//!   and the daemon alike: `burn` (this binary's `bench-placement-burn`, CPU-bound, a
//!   class work of [`BURN_MS`] at a full core, each task ×/÷ up to [`BURN_SPREAD`]),
//!   `xz -1 -c` and `gzip -c` (compression of text-like input), `sha256sum`, and the
//!   `sha256` builtin on tiny inputs ([`TINY_BYTES`]). Data classes draw a centre size
//!   log-uniformly in [`INPUT_BYTES`], each task ×/÷ up to [`SIZE_SPREAD`] (clamped).
//! - [`TASKS`] tasks, each of a class drawn uniformly.
//! - the start: board CPU uniformly in [`CPU_PCT`] of one core, link rate and RTT
//!   log-uniformly in [`MBIT`] and [`RTT_MS`], on mains power.
//! - 1–2 changes at distinct task indices (not in the first or last [`CHANGE_MARGIN`]):
//!   a new CPU quota, a new link rate and/or RTT, or the battery flipping (mains to
//!   battery, or back).
//!
//! Draws whose static passes would take over [`PASS_LIMIT_S`] by a nominal estimate are
//! redrawn (from the same stream, so still deterministic), which keeps a run's length
//! predictable without narrowing any single range.
//!
//! **Objective.** What the agent's cost model minimises: per task, the time to the
//! reply, plus while on battery `energy_weight` × the energy it took (local:
//! `cpu_watts` × CPU-seconds, the measured run × the CPU share it had; cloud:
//! `radio_joules_per_mb` × MB moved), with the policy's default `[auto]` coefficients.
//! Every pass (local, cloud, auto) and the oracle (per task, the smaller of the local and
//! cloud runs' objective) are scored by it.

use super::*;
use std::fmt::Write as _;

/// Most scenarios one run generates.
const MAX_SCENARIOS: usize = 200;
/// Tasks per scenario, inclusive.
const TASKS: (usize, usize) = (48, 64);
/// Work of a `burn` class at a full core, ms (log-uniform).
const BURN_MS: (f64, f64) = (20.0, 400.0);
/// A `burn` task's work around its class's, ×/÷ up to this (log-uniform, clamped).
const BURN_SPREAD: f64 = 1.5;
/// Input of a data class's tasks, bytes (centre log-uniform; tasks clamped to it).
const INPUT_BYTES: (f64, f64) = (4.0 * 1024.0, 4.0 * 1024.0 * 1024.0);
/// A data task's input around its class's centre, ×/÷ up to this (log-uniform).
const SIZE_SPREAD: f64 = 4.0;
/// Input of the tiny `sha256` builtin class, bytes (log-uniform).
const TINY_BYTES: (f64, f64) = (4.0 * 1024.0, 16.0 * 1024.0);
/// Board CPU, percent of one core (uniform).
const CPU_PCT: (u32, u32) = (10, 100);
/// Link rate both ways, Mbit/s (log-uniform).
const MBIT: (f64, f64) = (5.0, 100.0);
/// Link round trip, ms (log-uniform).
const RTT_MS: (f64, f64) = (5.0, 300.0);
/// No change within this many tasks of either end.
const CHANGE_MARGIN: usize = 4;
/// Longest nominal static pass, seconds: longer draws are redrawn.
const PASS_LIMIT_S: f64 = 60.0;
/// Redraws before a scenario over [`PASS_LIMIT_S`] is kept anyway.
const REDRAWS: usize = 100;
/// Goals from the issue: auto/oracle p95 and max, and auto against the better static.
const GOAL_P95: f64 = 1.15;
const GOAL_MAX: f64 = 1.30;
const GOAL_STATIC: f64 = 1.05;
/// Battery charge in the fake power_supply tree.
const BATTERY_PERCENT: u32 = 80;
/// Longest wait for the agent to see a power change.
const POWER_LIMIT: Duration = Duration::from_secs(5);

/// The `--random` count, checked.
fn check_count(n: usize) -> anyhow::Result<usize> {
    anyhow::ensure!(
        (1..=MAX_SCENARIOS).contains(&n),
        "--random takes a scenario count from 1 to {MAX_SCENARIOS}, got {n}"
    );
    Ok(n)
}

/// splitmix64: small, seedable, good enough to draw a benchmark's scenarios.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform integer in `lo..=hi`.
    fn int(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }

    /// Log-uniform in `[lo, hi]`.
    fn log_uniform(&mut self, (lo, hi): (f64, f64)) -> f64 {
        (lo.ln() + self.unit() * (hi.ln() - lo.ln()))
            .exp()
            .clamp(lo, hi)
    }
}

/// The programs task classes are drawn from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Program {
    Burn,
    Xz,
    Gzip,
    Sha256sum,
    Sha256,
}

/// The pool; the first two are the compute-heavy ones.
const POOL: [Program; 5] = [
    Program::Burn,
    Program::Xz,
    Program::Gzip,
    Program::Sha256sum,
    Program::Sha256,
];

impl Program {
    /// The task's name in both catalogs.
    fn task(self) -> &'static str {
        match self {
            Program::Burn => "rand-burn",
            Program::Xz => "rand-xz",
            Program::Gzip => "rand-gzip",
            Program::Sha256sum => "rand-sha256sum",
            Program::Sha256 => "rand-sha256",
        }
    }

    /// The external program and the Debian package it comes from.
    fn binary(self) -> Option<(&'static str, &'static str)> {
        match self {
            Program::Xz => Some(("xz", "xz-utils")),
            Program::Gzip => Some(("gzip", "gzip")),
            Program::Sha256sum => Some(("sha256sum", "coreutils")),
            Program::Burn | Program::Sha256 => None,
        }
    }

    /// Rough throughput at a full core, bytes per ms, for the nominal pass estimate.
    fn bytes_per_ms(self) -> f64 {
        match self {
            Program::Xz => 8_000.0,
            Program::Gzip => 35_000.0,
            Program::Sha256sum | Program::Sha256 => 300_000.0,
            Program::Burn => f64::INFINITY,
        }
    }

    /// Rough output size for `input` bytes, for the nominal pass estimate.
    fn nominal_output(self, input: f64) -> f64 {
        match self {
            Program::Xz => input * 0.4,
            Program::Gzip => input * 0.45,
            _ => 80.0,
        }
    }

    /// Whether `out` is what this program prints.
    fn output_ok(self, out: &[u8]) -> bool {
        match self {
            Program::Burn => out.starts_with(b"burnt "),
            Program::Xz => out.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]),
            Program::Gzip => out.starts_with(&[0x1f, 0x8b]),
            Program::Sha256sum => out.len() == 68 && out.ends_with(b"  -\n"),
            Program::Sha256 => out.len() == 65,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Program::Burn => "burn",
            Program::Xz => "xz -1",
            Program::Gzip => "gzip",
            Program::Sha256sum => "sha256sum",
            Program::Sha256 => "sha256 builtin",
        }
    }
}

/// One generated task.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Task {
    program: Program,
    /// Input bytes (data classes); a unit count's few bytes for `burn`.
    bytes: usize,
    /// CPU work at a full core, ms (`burn` only).
    work_ms: f64,
}

/// The board, link and power while a task runs.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Env {
    cpu_pct: u32,
    link: Link,
    battery: bool,
}

/// A mid-run change, applied before the task at its index.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Change {
    Cpu(u32),
    Link(Link),
    Battery(bool),
}

/// One generated scenario.
#[derive(Debug, Clone, PartialEq)]
struct Generated {
    /// 1-based number in the run.
    number: usize,
    classes: Vec<Program>,
    tasks: Vec<Task>,
    start: Env,
    /// `(task index, change)`, by index.
    changes: Vec<(usize, Change)>,
}

fn draw_link(rng: &mut Rng) -> Link {
    Link {
        rtt_ms: rng.log_uniform(RTT_MS).round() as u64,
        mbit: rng.log_uniform(MBIT).round() as u64,
    }
}

/// A class's centre: `(input bytes, work ms)`.
fn draw_class(rng: &mut Rng, p: Program) -> (f64, f64) {
    match p {
        Program::Burn => (8.0, rng.log_uniform(BURN_MS)),
        Program::Sha256 => (0.0, 0.0),
        _ => (rng.log_uniform(INPUT_BYTES), 0.0),
    }
}

fn draw_task(rng: &mut Rng, p: Program, (bytes, work): (f64, f64)) -> Task {
    let around = |rng: &mut Rng, centre: f64, spread: f64, range: (f64, f64)| {
        (centre * rng.log_uniform((1.0 / spread, spread))).clamp(range.0, range.1)
    };
    match p {
        Program::Burn => Task {
            program: p,
            bytes: bytes as usize,
            work_ms: around(rng, work, BURN_SPREAD, BURN_MS),
        },
        Program::Sha256 => Task {
            program: p,
            bytes: rng.log_uniform(TINY_BYTES).round() as usize,
            work_ms: 0.0,
        },
        _ => Task {
            program: p,
            bytes: around(rng, bytes, SIZE_SPREAD, INPUT_BYTES).round() as usize,
            work_ms: 0.0,
        },
    }
}

fn draw_change(rng: &mut Rng, env: &Env) -> Change {
    match rng.int(0, 2) {
        0 => loop {
            let pct = rng.int(CPU_PCT.0 as usize, CPU_PCT.1 as usize) as u32;
            if pct != env.cpu_pct {
                break Change::Cpu(pct);
            }
        },
        1 => {
            let new = draw_link(rng);
            Change::Link(match rng.int(0, 2) {
                0 => Link {
                    rtt_ms: new.rtt_ms,
                    mbit: env.link.mbit,
                },
                1 => Link {
                    rtt_ms: env.link.rtt_ms,
                    mbit: new.mbit,
                },
                _ => new,
            })
        }
        _ => Change::Battery(!env.battery),
    }
}

/// One draw of a scenario from `rng`.
fn draw(rng: &mut Rng, number: usize) -> Generated {
    // One compute-heavy class (`burn` or `xz`), so the cloud can win somewhere; the
    // rest from the whole pool.
    let mut pool = POOL.to_vec();
    let mut classes = vec![pool.remove(rng.int(0, 1))];
    for _ in 1..rng.int(2, 3) {
        classes.push(pool.remove(rng.int(0, pool.len() - 1)));
    }
    let centres: Vec<(f64, f64)> = classes.iter().map(|&p| draw_class(rng, p)).collect();
    let n = rng.int(TASKS.0, TASKS.1);
    let tasks = (0..n)
        .map(|_| {
            let c = rng.int(0, classes.len() - 1);
            draw_task(rng, classes[c], centres[c])
        })
        .collect();
    let start = Env {
        cpu_pct: rng.int(CPU_PCT.0 as usize, CPU_PCT.1 as usize) as u32,
        link: draw_link(rng),
        battery: false,
    };
    let count = rng.int(1, 2);
    let mut at = Vec::new();
    while at.len() < count {
        let i = rng.int(CHANGE_MARGIN, n - 1 - CHANGE_MARGIN);
        if !at.contains(&i) {
            at.push(i);
        }
    }
    at.sort_unstable();
    let mut g = Generated {
        number,
        classes,
        tasks,
        start,
        changes: Vec::new(),
    };
    for i in at {
        let change = draw_change(rng, &g.env(i));
        g.changes.push((i, change));
    }
    g
}

/// Scenario `number` (1-based) of the run seeded with `seed`.
fn generate_one(seed: u64, number: usize) -> Generated {
    let mut rng = Rng(seed ^ (number as u64).wrapping_mul(0xd1b5_4a32_d192_ed03));
    let mut g = draw(&mut rng, number);
    for _ in 0..REDRAWS {
        let (local, cloud) = g.nominal_passes();
        if local.max(cloud) <= PASS_LIMIT_S {
            break;
        }
        g = draw(&mut rng, number);
    }
    g
}

/// The `n` scenarios of the run seeded with `seed`.
fn generate(seed: u64, n: usize) -> Vec<Generated> {
    (1..=n).map(|k| generate_one(seed, k)).collect()
}

impl Generated {
    /// Conditions at task `i`.
    fn env(&self, i: usize) -> Env {
        let mut e = self.start;
        for &(at, change) in &self.changes {
            if at <= i {
                match change {
                    Change::Cpu(p) => e.cpu_pct = p,
                    Change::Link(l) => e.link = l,
                    Change::Battery(b) => e.battery = b,
                }
            }
        }
        e
    }

    /// Rough seconds of the always-local and always-cloud passes.
    fn nominal_passes(&self) -> (f64, f64) {
        let (mut local, mut cloud) = (0.0, 0.0);
        for (i, t) in self.tasks.iter().enumerate() {
            let e = self.env(i);
            let bytes = t.bytes as f64;
            let full_ms = t.work_ms + bytes / t.program.bytes_per_ms();
            local += full_ms / f64::from(e.cpu_pct) * 100.0 / 1000.0;
            let moved = bytes + t.program.nominal_output(bytes);
            cloud += 2.0 * e.link.rtt_ms as f64 / 1000.0
                + moved * 8.0 / (e.link.mbit as f64 * 1e6)
                + full_ms / 1000.0;
        }
        (local, cloud)
    }

    fn describe(&self) -> String {
        let mut s = String::new();
        for (k, &p) in self.classes.iter().enumerate() {
            let of: Vec<&Task> = self.tasks.iter().filter(|t| t.program == p).collect();
            let _ = write!(
                s,
                "{}{} ×{}",
                if k > 0 { ", " } else { "" },
                p.describe(),
                of.len()
            );
            if p == Program::Burn {
                let lo = of.iter().map(|t| t.work_ms).fold(f64::INFINITY, f64::min);
                let hi = of.iter().map(|t| t.work_ms).fold(0.0, f64::max);
                let _ = write!(s, " {lo:.0}–{hi:.0} ms");
            } else {
                let lo = of.iter().map(|t| t.bytes).min().unwrap_or(0);
                let hi = of.iter().map(|t| t.bytes).max().unwrap_or(0);
                let _ = write!(s, " {}–{}", kib(lo), kib(hi));
            }
        }
        let e = self.start;
        let _ = write!(
            s,
            "; {} tasks; cpu {}%, {} Mbit/s, rtt {} ms, mains",
            self.tasks.len(),
            e.cpu_pct,
            e.link.mbit,
            e.link.rtt_ms
        );
        for &(i, c) in &self.changes {
            let _ = match c {
                Change::Cpu(p) => write!(s, "; @{i} cpu {p}%"),
                Change::Link(l) => write!(s, "; @{i} {} Mbit/s, rtt {} ms", l.mbit, l.rtt_ms),
                Change::Battery(true) => write!(s, "; @{i} battery"),
                Change::Battery(false) => write!(s, "; @{i} mains"),
            };
        }
        s
    }
}

fn kib(bytes: usize) -> String {
    if bytes >= 1024 * 1024 {
        format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
    } else {
        format!("{} KiB", bytes.div_ceil(1024))
    }
}

/// Deterministic text-like input (words from a small vocabulary): compresses about 2.5×,
/// like logs or readings, so the compressors do real work.
fn text_input(seed: u64, n: usize) -> Bytes {
    let mut rng = Rng(seed);
    let words: Vec<Vec<u8>> = (0..2048)
        .map(|_| {
            (0..rng.int(2, 9))
                .map(|_| b'a' + rng.int(0, 25) as u8)
                .collect()
        })
        .collect();
    let mut v = Vec::with_capacity(n + 16);
    while v.len() < n {
        v.extend_from_slice(&words[rng.int(0, words.len() - 1)]);
        v.push(if rng.int(0, 9) == 0 { b'\n' } else { b' ' });
    }
    v.truncate(n);
    Bytes::from(v)
}

/// The first directory on `PATH` holding an executable `name`.
fn find_program(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The `[tasks.rand-*]` both sides share; fails naming a program that is not installed.
fn random_catalog(exe: &Path) -> anyhow::Result<String> {
    let mut s = String::new();
    for p in POOL {
        let command = match (p, p.binary()) {
            (Program::Sha256, _) => {
                let _ = write!(s, "\n[tasks.{}]\nbuiltin = \"sha256\"\n", p.task());
                continue;
            }
            (_, Some((name, package))) => {
                let path = find_program(name).with_context(|| {
                    format!(
                        "the random scenarios run `{name}`, which is not on PATH; install \
                         {package}"
                    )
                })?;
                let mut c = vec![toml_path(&path)];
                match p {
                    Program::Xz => c.extend(["\"-1\"".into(), "\"-c\"".into()]),
                    Program::Gzip => c.push("\"-c\"".into()),
                    _ => {}
                }
                c
            }
            (_, None) => vec![toml_path(exe), "\"bench-placement-burn\"".into()],
        };
        let _ = write!(
            s,
            "\n[tasks.{}]\ncommand = [{}]\ntimeout = \"30s\"\n",
            p.task(),
            command.join(", ")
        );
    }
    Ok(s)
}

/// Writes a battery and a mains adapter in the kernel's power_supply layout.
fn write_power(root: &Path, battery: bool) -> anyhow::Result<()> {
    let bat = root.join("BAT0");
    let ac = root.join("AC");
    let files = [
        (bat.join("type"), "Battery".to_string()),
        (bat.join("present"), "1".into()),
        (bat.join("capacity"), BATTERY_PERCENT.to_string()),
        (
            bat.join("status"),
            if battery { "Discharging" } else { "Charging" }.into(),
        ),
        (ac.join("type"), "Mains".into()),
        (ac.join("online"), if battery { "0" } else { "1" }.into()),
    ];
    for dir in [&bat, &ac] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    for (path, text) in files {
        std::fs::write(&path, format!("{text}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Flips the fake power tree and waits until the agent's signals show it.
async fn set_power(agent: &AgentHandle, root: &Path, battery: bool) -> anyhow::Result<()> {
    write_power(root, battery)?;
    let deadline = Instant::now() + POWER_LIMIT;
    while agent.agent.knowledge().board().power.on_battery != Some(battery) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the agent did not see the power change (on battery: {battery}) within \
             {POWER_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// One pass of one generated scenario.
struct RandomPass<'a> {
    dir: &'a Path,
    pki: &'a Pki,
    exe: &'a Path,
    cloud: &'a CloudChild,
    scenario: &'a Generated,
    strategy: Strategy,
    catalog: &'a str,
    /// Burn units per ms of work at a full core.
    units_per_ms: f64,
    seed: u64,
    trace: bool,
}

impl RandomPass<'_> {
    fn input(&self, i: usize) -> Bytes {
        let t = &self.scenario.tasks[i];
        match t.program {
            Program::Burn => {
                let units = (t.work_ms * self.units_per_ms).round().max(1.0) as u64;
                Bytes::from(format!("{units}\n"))
            }
            _ => text_input(self.seed ^ ((i as u64) << 32) ^ t.bytes as u64, t.bytes),
        }
    }
}

/// Runs one generated scenario's tasks with one strategy on a fresh agent.
async fn run_random_pass(
    pass: &RandomPass<'_>,
    board: &mut BoardCpu,
    k: usize,
) -> anyhow::Result<Vec<TaskRun>> {
    let g = pass.scenario;
    let state = pass.dir.join(format!(
        "agent-rand{}-{}-{k}",
        g.number,
        pass.strategy.name()
    ));
    std::fs::create_dir_all(&state)?;
    let power = state.join("power_supply");
    let policy = state.join("policy.toml");
    std::fs::write(&policy, "default = \"auto\"\n")?;
    let mut env = g.start;
    write_power(&power, env.battery)?;
    board.set_pct(env.cpu_pct)?;
    pass.cloud.set_link(env.link).await?;
    let extra = format!(
        "max_local_concurrency = 1\npolicy = {}\n[signals]\npower_supply_root = {}\n\
         sample_interval = \"100ms\"\n{}{}",
        toml_path(&policy),
        toml_path(&power),
        catalog(pass.exe),
        pass.catalog
    );
    let agent = harness::start_agent(pass.pki, &state, &[pass.cloud.relay], &extra).await?;
    let result = async {
        anyhow::ensure!(
            agent.agent.uplink().wait_usable(CONNECT_LIMIT).await,
            "the agent did not connect to the daemon through the relay"
        );
        set_power(&agent, &power, env.battery).await?;
        let client = agent.client();
        let mut runs = Vec::with_capacity(g.tasks.len());
        for (i, t) in g.tasks.iter().enumerate() {
            let e = g.env(i);
            if e.cpu_pct != env.cpu_pct {
                board.set_pct(e.cpu_pct)?;
            }
            if e.link != env.link {
                pass.cloud.set_link(e.link).await?;
            }
            if e.battery != env.battery {
                set_power(&agent, &power, e.battery).await?;
            }
            env = e;
            let input = pass.input(i);
            let p = t.program;
            let run = submit_task(&client, p.task(), input, pass.strategy, |b| p.output_ok(b))
                .await
                .with_context(|| format!("task #{i} ({})", p.task()))?;
            if pass.trace && pass.strategy == Strategy::Auto {
                eprintln!(
                    "random #{} #{i} {} {:.1} ms {}: {}",
                    g.number,
                    p.task(),
                    run.ms,
                    if run.cloud { "cloud" } else { "local" },
                    run.reason
                );
            }
            runs.push(run);
        }
        anyhow::Ok(runs)
    }
    .await;
    let stopped = agent.shutdown().await;
    let runs = result?;
    stopped.context("agent shutdown")?;
    Ok(runs)
}

/// The agent's objective, with the policy's default `[auto]` coefficients.
#[derive(Debug, Clone, Copy)]
struct Objective {
    cpu_watts: f64,
    radio_joules_per_mb: f64,
    /// Seconds per joule.
    energy_weight: f64,
}

impl Objective {
    fn agents_default() -> Objective {
        let p = CostParams::default();
        Objective {
            cpu_watts: p.cpu_watts,
            radio_joules_per_mb: p.radio_joules_per_mb,
            energy_weight: p.energy_weight,
        }
    }

    /// A task's score in ms: its time, plus on battery the weighted energy it took.
    fn score_ms(&self, run: &TaskRun, env: &Env, input_bytes: usize) -> f64 {
        if !env.battery {
            return run.ms;
        }
        let joules = if run.cloud {
            self.radio_joules_per_mb * (input_bytes as f64 + run.output_bytes as f64) / 1e6
        } else {
            self.cpu_watts * run.ms / 1000.0 * f64::from(env.cpu_pct) / 100.0
        };
        run.ms + self.energy_weight * joules * 1000.0
    }

    fn describe(&self) -> String {
        format!(
            "per task, ms to the reply; on battery plus {} s/J × energy (local {} W × \
             CPU-seconds, cloud {} J per MB moved): the agent's own cost objective",
            self.energy_weight, self.cpu_watts, self.radio_joules_per_mb
        )
    }
}

/// One scenario's scored totals.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Figures {
    local: f64,
    cloud: f64,
    auto: f64,
    oracle: f64,
    explored: usize,
    decisions: usize,
}

impl Figures {
    fn score(
        g: &Generated,
        obj: &Objective,
        local: &[TaskRun],
        cloud: &[TaskRun],
        auto: &[TaskRun],
    ) -> Figures {
        let mut f = Figures::default();
        for (i, t) in g.tasks.iter().enumerate() {
            let e = g.env(i);
            let (l, c, a) = (
                obj.score_ms(&local[i], &e, t.bytes),
                obj.score_ms(&cloud[i], &e, t.bytes),
                obj.score_ms(&auto[i], &e, t.bytes),
            );
            f.local += l;
            f.cloud += c;
            f.auto += a;
            f.oracle += l.min(c);
        }
        f.explored = auto.iter().filter(|r| r.explored()).count();
        f.decisions = auto.len();
        f
    }

    fn auto_ratio(&self) -> f64 {
        self.auto / self.oracle.max(1e-9)
    }

    /// Auto over the better of always-local and always-cloud.
    fn static_ratio(&self) -> f64 {
        self.auto / self.local.min(self.cloud).max(1e-9)
    }
}

/// Nearest-rank percentile of `xs` (sorted here), `p` in `(0, 100]`.
fn percentile(xs: &[f64], p: f64) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0 * v.len() as f64).ceil() as usize).clamp(1, v.len().max(1));
    v.get(rank - 1).copied().unwrap_or(f64::NAN)
}

/// The distribution over scenarios.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Summary {
    p50: f64,
    p95: f64,
    max: f64,
    /// Scenarios where auto scored worse than the better static choice.
    slower: usize,
    /// Of those, by more than [`GOAL_STATIC`].
    slower_over_goal: usize,
    /// Largest and mean excess over the better static choice (fractions, 0.03 = 3 %),
    /// over the scenarios where auto was slower.
    max_excess: f64,
    mean_excess: f64,
    explored: usize,
    decisions: usize,
}

impl Summary {
    fn of(figures: &[Figures]) -> Summary {
        let ratios: Vec<f64> = figures.iter().map(Figures::auto_ratio).collect();
        let excess: Vec<f64> = figures
            .iter()
            .map(|f| f.static_ratio() - 1.0)
            .filter(|&x| x > 0.0)
            .collect();
        Summary {
            p50: percentile(&ratios, 50.0),
            p95: percentile(&ratios, 95.0),
            max: ratios.iter().copied().fold(0.0, f64::max),
            slower: excess.len(),
            slower_over_goal: excess.iter().filter(|&&x| x > GOAL_STATIC - 1.0).count(),
            max_excess: excess.iter().copied().fold(0.0, f64::max),
            mean_excess: if excess.is_empty() {
                0.0
            } else {
                excess.iter().sum::<f64>() / excess.len() as f64
            },
            explored: figures.iter().map(|f| f.explored).sum(),
            decisions: figures.iter().map(|f| f.decisions).sum(),
        }
    }

    /// `(what, figure, goal, holds)` for each of the goals.
    fn goals(&self) -> [(&'static str, f64, f64, bool); 3] {
        [
            ("auto/oracle p95", self.p95, GOAL_P95, self.p95 <= GOAL_P95),
            ("auto/oracle max", self.max, GOAL_MAX, self.max <= GOAL_MAX),
            (
                "auto/better static, worst",
                1.0 + self.max_excess,
                GOAL_STATIC,
                self.slower_over_goal == 0,
            ),
        ]
    }
}

/// Runs `--random n --seed S` and prints the report.
pub(super) async fn run(options: &Options, n: usize) -> anyhow::Result<()> {
    let n = check_count(n)?;
    let seed = options.seed.unwrap_or(1);
    let scenarios = generate(seed, n);
    let exe = std::env::current_exe().context("path of this program")?;
    let catalog = random_catalog(&exe)?;
    let started = Instant::now();
    let Rig {
        dir,
        pki,
        exe,
        cloud,
        mut board,
        units,
    } = Rig::start(&catalog).await?;
    let obj = Objective::agents_default();
    let units_per_ms = units as f64 / CRUNCH_MS;
    let result = async {
        let mut figures = Vec::new();
        for g in &scenarios {
            let mut runs: [Vec<TaskRun>; 3] = Default::default();
            for (k, strategy) in [Strategy::Auto, Strategy::Local, Strategy::Cloud]
                .into_iter()
                .enumerate()
            {
                let pass = RandomPass {
                    dir: dir.path(),
                    pki: &pki,
                    exe: &exe,
                    cloud: &cloud,
                    scenario: g,
                    strategy,
                    catalog: &catalog,
                    units_per_ms,
                    seed: seed ^ ((g.number as u64) << 40),
                    trace: options.trace,
                };
                runs[k] = run_random_pass(&pass, &mut board, k)
                    .await
                    .with_context(|| {
                        format!("random scenario {} ({})", g.number, strategy.name())
                    })?;
            }
            let [auto, local, cloud] = &runs;
            let f = Figures::score(g, &obj, local, cloud, auto);
            if !options.json {
                print_scenario(g, &f);
            }
            figures.push(f);
        }
        anyhow::Ok(figures)
    }
    .await;
    let emulation = board.describe();
    board.close();
    let stopped = cloud.shutdown().await;
    let figures = result?;
    stopped.context("cloud process shutdown")?;
    let report = RandomReport {
        seed,
        scenarios: &scenarios,
        figures: &figures,
        objective: obj,
        emulation,
        secs: started.elapsed().as_secs_f64(),
    };
    if options.json {
        println!("{}", report.json());
    } else {
        report.print();
    }
    Ok(())
}

fn print_scenario(g: &Generated, f: &Figures) {
    println!("#{:<3} {}", g.number, g.describe());
    println!(
        "     auto/oracle {:.3}  local/oracle {:.3}  cloud/oracle {:.3}  auto/better static \
         {:.3}  explored {} of {}",
        f.auto_ratio(),
        f.local / f.oracle.max(1e-9),
        f.cloud / f.oracle.max(1e-9),
        f.static_ratio(),
        f.explored,
        f.decisions
    );
}

struct RandomReport<'a> {
    seed: u64,
    scenarios: &'a [Generated],
    figures: &'a [Figures],
    objective: Objective,
    emulation: String,
    secs: f64,
}

impl RandomReport<'_> {
    fn print(&self) {
        let s = Summary::of(self.figures);
        let n = self.figures.len();
        println!();
        println!(
            "updraft bench placement --random {n} --seed {}: each scenario one auto, one \
             always-local and one always-cloud pass, each on a fresh agent (empty state_dir, \
             policy default = \"auto\"); {:.0} s",
            self.seed, self.secs
        );
        println!("objective: {}", self.objective.describe());
        println!("oracle: per task, the smaller objective of the measured local and cloud runs");
        println!("board CPU: {}", self.emulation);
        println!("auto/oracle over {n} scenarios: p50 {:.3}", s.p50);
        for (what, figure, goal, holds) in s.goals() {
            println!(
                "  {what:<26} {figure:>7.3}   goal <= {goal:.2}   {}",
                if holds { "holds" } else { "MISSED" }
            );
        }
        println!(
            "auto slower than the better static choice in {} of {n} scenarios (over {:.0} %: \
             {}); excess max {:.1} %, mean {:.1} %",
            s.slower,
            (GOAL_STATIC - 1.0) * 100.0,
            s.slower_over_goal,
            s.max_excess * 100.0,
            s.mean_excess * 100.0
        );
        println!(
            "decisions explored: {} of {} (reason says exploring / to measure it / to \
             re-sample it / first run: measuring)",
            s.explored, s.decisions
        );
        println!(
            "named scenarios' goal (updraft bench placement): auto/oracle <= {GOAL_RATIO:.2} each"
        );
    }

    fn json(&self) -> serde_json::Value {
        let s = Summary::of(self.figures);
        let scenarios: Vec<serde_json::Value> = self
            .scenarios
            .iter()
            .zip(self.figures)
            .map(|(g, f)| {
                serde_json::json!({
                    "number": g.number,
                    "description": g.describe(),
                    "tasks": g.tasks.len(),
                    "local": round1(f.local),
                    "cloud": round1(f.cloud),
                    "auto": round1(f.auto),
                    "oracle": round1(f.oracle),
                    "auto_over_oracle": round3(f.auto_ratio()),
                    "local_over_oracle": round3(f.local / f.oracle.max(1e-9)),
                    "cloud_over_oracle": round3(f.cloud / f.oracle.max(1e-9)),
                    "auto_over_better_static": round3(f.static_ratio()),
                    "explored": f.explored,
                })
            })
            .collect();
        let [p95, max, stat] = s.goals();
        serde_json::json!({
            "seed": self.seed,
            "scenarios": scenarios,
            "objective": self.objective.describe(),
            "auto_over_oracle_p50": round3(s.p50),
            "auto_over_oracle_p95": round3(s.p95),
            "auto_over_oracle_max": round3(s.max),
            "slower_than_better_static": s.slower,
            "slower_than_better_static_over_5pct": s.slower_over_goal,
            "excess_over_better_static_max": round3(s.max_excess),
            "excess_over_better_static_mean": round3(s.mean_excess),
            "decisions_explored": s.explored,
            "decisions": s.decisions,
            "goal_p95_holds": p95.3,
            "goal_max_holds": max.3,
            "goal_static_holds": stat.3,
            "seconds": round1(self.secs),
            "board_emulation": if self.emulation.starts_with("cgroup") {
                "cgroup_v1_quota"
            } else {
                "spinner_threads"
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_deterministic_per_seed() {
        assert_eq!(generate(7, 10), generate(7, 10));
        assert_ne!(generate(7, 10), generate(8, 10));
        // A shorter run is a prefix of a longer one.
        assert_eq!(generate(7, 3)[..], generate(7, 10)[..3]);
    }

    #[test]
    fn every_draw_is_in_its_documented_range() {
        let heavy = [Program::Burn, Program::Xz];
        let in_range = |x: f64, (lo, hi): (f64, f64)| x >= lo - 0.5 && x <= hi + 0.5;
        for seed in 0..300u64 {
            for g in generate(seed, 2) {
                assert!((2..=3).contains(&g.classes.len()), "{g:?}");
                assert!(heavy.contains(&g.classes[0]), "{g:?}");
                assert!(!g.classes[1..].contains(&g.classes[0]), "{g:?}");
                assert!((TASKS.0..=TASKS.1).contains(&g.tasks.len()), "{g:?}");
                assert!((1..=2).contains(&g.changes.len()), "{g:?}");
                let mut last = 0;
                for &(i, _) in &g.changes {
                    assert!(i >= CHANGE_MARGIN && i < g.tasks.len() - CHANGE_MARGIN);
                    assert!(i > last, "changes at distinct, ordered indices: {g:?}");
                    last = i;
                }
                assert!(!g.start.battery);
                for i in 0..g.tasks.len() {
                    let e = g.env(i);
                    assert!((CPU_PCT.0..=CPU_PCT.1).contains(&e.cpu_pct), "{e:?}");
                    assert!(in_range(e.link.mbit as f64, MBIT), "{e:?}");
                    assert!(in_range(e.link.rtt_ms as f64, RTT_MS), "{e:?}");
                }
                for t in &g.tasks {
                    assert!(g.classes.contains(&t.program));
                    match t.program {
                        Program::Burn => assert!(in_range(t.work_ms, BURN_MS), "{t:?}"),
                        Program::Sha256 => assert!(in_range(t.bytes as f64, TINY_BYTES)),
                        _ => assert!(in_range(t.bytes as f64, INPUT_BYTES), "{t:?}"),
                    }
                }
            }
        }
    }

    #[test]
    fn draws_cover_the_ranges_and_every_kind_of_change() {
        let gs = generate(3, 200);
        let sizes: Vec<usize> = gs
            .iter()
            .flat_map(|g| g.tasks.iter())
            .filter(|t| !matches!(t.program, Program::Burn | Program::Sha256))
            .map(|t| t.bytes)
            .collect();
        let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
        assert!(
            *hi / *lo >= 500,
            "inputs span three orders of magnitude: {lo}..{hi}"
        );
        let kinds = |f: fn(&Change) -> bool| {
            gs.iter()
                .flat_map(|g| g.changes.iter())
                .filter(|(_, c)| f(c))
                .count()
        };
        assert!(kinds(|c| matches!(c, Change::Cpu(_))) > 0);
        assert!(kinds(|c| matches!(c, Change::Link(_))) > 0);
        assert!(kinds(|c| matches!(c, Change::Battery(true))) > 0);
        assert!(gs.iter().any(|g| g.changes.len() == 2));
        assert!(gs.iter().any(|g| g.changes.len() == 1));
    }

    #[test]
    fn a_change_holds_from_its_task_on() {
        let g = generate(11, 1).remove(0);
        let (at, change) = g.changes[0];
        assert_eq!(g.env(0), g.start);
        assert_eq!(g.env(at - 1), g.start);
        let e = g.env(at);
        match change {
            Change::Cpu(p) => assert_eq!(e.cpu_pct, p),
            Change::Link(l) => assert_eq!(e.link, l),
            Change::Battery(b) => assert_eq!(e.battery, b),
        }
    }

    #[test]
    fn random_count_is_checked() {
        assert!(check_count(0).unwrap_err().to_string().contains("--random"));
        assert!(check_count(201).is_err());
        assert_eq!(check_count(20).unwrap(), 20);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let xs: Vec<f64> = (1..=20).map(f64::from).rev().collect();
        assert_eq!(percentile(&xs, 50.0), 10.0);
        assert_eq!(percentile(&xs, 95.0), 19.0);
        assert_eq!(percentile(&xs, 100.0), 20.0);
        assert_eq!(percentile(&[3.0], 95.0), 3.0);
    }

    #[test]
    fn summary_of_hand_made_figures() {
        let f = |auto: f64, local: f64, cloud: f64, oracle: f64| Figures {
            local,
            cloud,
            auto,
            oracle,
            explored: 2,
            decisions: 10,
        };
        let figures = [
            f(100.0, 120.0, 150.0, 100.0), // 1.00, beats both
            f(110.0, 100.0, 200.0, 100.0), // 1.10, 10 % over local
            f(130.0, 126.0, 300.0, 100.0), // 1.30, ~3.2 % over local
            f(105.0, 300.0, 110.0, 100.0), // 1.05, beats cloud
        ];
        let s = Summary::of(&figures);
        assert_eq!(s.p50, 1.05);
        assert_eq!(s.p95, 1.30);
        assert_eq!(s.max, 1.30);
        assert_eq!(s.slower, 2);
        assert_eq!(s.slower_over_goal, 1);
        assert!((s.max_excess - 0.10).abs() < 1e-9, "{s:?}");
        assert!(
            (s.mean_excess - (0.10 + 4.0 / 126.0) / 2.0).abs() < 1e-9,
            "{s:?}"
        );
        assert_eq!((s.explored, s.decisions), (8, 40));
        let [p95, max, stat] = s.goals();
        assert!(!p95.3 && max.3 && !stat.3);
    }

    #[test]
    fn battery_phases_add_the_energy_term() {
        let obj = Objective {
            cpu_watts: 2.0,
            radio_joules_per_mb: 0.5,
            energy_weight: 1.0,
        };
        let run = |cloud| TaskRun {
            ms: 1000.0,
            cloud,
            reason: String::new(),
            output_bytes: 1_000_000,
        };
        let mut e = Env {
            cpu_pct: 50,
            link: Link {
                rtt_ms: 10,
                mbit: 10,
            },
            battery: false,
        };
        assert_eq!(obj.score_ms(&run(false), &e, 1_000_000), 1000.0);
        e.battery = true;
        // 2 W × 1 s × 50 % = 1 J = 1 s.
        assert!((obj.score_ms(&run(false), &e, 1_000_000) - 2000.0).abs() < 1e-6);
        // 0.5 J/MB × 2 MB = 1 J = 1 s.
        assert!((obj.score_ms(&run(true), &e, 1_000_000) - 2000.0).abs() < 1e-6);
    }

    #[test]
    fn exploration_markers_are_recognised() {
        for r in [
            "auto: cloud exploring: cloud transfer unmeasured",
            "auto: local to measure it (no local run yet): ...",
            "auto: cloud to re-sample it (estimate 61 s old)",
            "auto: cloud (first run: measuring the cloud first)",
        ] {
            assert!(is_exploration(r), "{r}");
        }
        assert!(!is_exploration(
            "auto: local (first run: moving its data to the cloud alone takes 4010 ms)"
        ));
        assert!(!is_exploration("auto: local 19.1 s < cloud ~36.2 s"));
    }

    #[test]
    fn outputs_are_recognised() {
        assert!(Program::Sha256sum.output_ok(format!("{}  -\n", "a".repeat(64)).as_bytes()));
        assert!(Program::Gzip.output_ok(&[0x1f, 0x8b, 8]));
        assert!(!Program::Xz.output_ok(b"burnt 3"));
        assert_eq!(text_input(5, 1000), text_input(5, 1000));
        assert_eq!(text_input(5, 1000).len(), 1000);
    }
}
