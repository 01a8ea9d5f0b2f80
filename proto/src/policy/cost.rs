//! The automatic placement cost model behind `auto` (SPEC "Placement", step 4), sans IO.
//!
//! For every task the model keeps smoothed measurements of both sides and, per decision,
//! predicts when the result would be back on the board:
//!
//! - **local** = local queue wait + run, where run = (CPU-seconds the task needs at a
//!   full core) ÷ (share of a core available to it now);
//! - **cloud** = RTT + transfer (input up at the uplink's rate, output down at the
//!   downlink's, plus a per-task correction learned from observed totals) + daemon queue
//!   wait + daemon run.
//!
//! On battery each side also costs energy — CPU-seconds × `cpu_watts` on the board, bytes
//! moved × `radio_joules_per_mb` for the cloud — turned into seconds by `energy_weight`.
//! The side with the lower score wins; a tie stays on the board.
//!
//! **Learning.** Averages are exponentially weighted ([`CostParams::smoothing`]) and taken
//! over logarithms (geometric means): a single run 10× slower than usual moves an estimate
//! by about 2×, not 4×, and a real change still converges in a few samples. Run times and
//! output sizes are fitted against the input size as a power law (`run ∝ input^k`, k
//! fitted in 0..=2) once inputs vary by more than ~10 %, so one task with small and large
//! inputs predicts both well; with constant inputs it is a plain average.
//!
//! **Exploration.** The model only measures the side it runs, so it must try the other
//! side now and then, and every try that loses costs time. Each side's estimate carries
//! its uncertainty: the link's rates (see [`super::link`]: unknown, aging, or changed),
//! and run times (unmeasured, few samples). Exploring is *optimism under uncertainty*:
//! the other side is tried only when its **optimistic** score — transfer at the upper
//! end of the link estimate ([`EXPLORE_SD`] standard deviations), run time at the lower
//! end of its noise — beats the chosen side; what the live signals alone guarantee
//! (RTT, queues) is never discounted. Then, in order:
//! - **link unsure**: the link's rate is unknown or stale (sd over
//!   [`super::link::SURE_SD`]), no link probe is coming ([`Conditions::link_probing`]),
//!   and moving the task's data — enough bytes to be a rate sample — is a large part of
//!   the cloud's cost: one cloud run measures it;
//! - **unmeasured**: a side never measured is tried once its prior is within
//!   [`UNMEASURED_TRY_FACTOR`] of the chosen side (the first run of a task goes where a
//!   typical task of this agent would finish first, see [`FIRST_RUN_PRIOR`]);
//! - **guard**: after [`GUARD_RUNS`] runs in a row on one side, the other is sampled
//!   once; each such sample doubles the streak needed for the next (up to
//!   [`GUARD_RUNS`] × 2^[`GUARD_MAX_LEVEL`]), so a wrong estimate of the side not taken
//!   cannot lock it out, and the cost of checking grows only logarithmically with the
//!   number of runs;
//! - **stale**: a side last sampled over [`CostParams::stale_after`] ago, with fewer
//!   than [`FRESH_SAMPLES`] samples, not sampled since a restart, or whose last sample
//!   was far off its estimate, is chosen with probability `explore_rate × (chosen score
//!   ÷ its score)`, which bounds the expected cost to `explore_rate` × the chosen side's.
//!   A run-time estimate's uncertainty grows with its age as a link's does, so a side
//!   3× worse than the chosen one becomes plausible again after about 10 minutes
//!   without a sample, one 10× worse after about 45.
//!
//! Each try is bounded: the optimistic score must beat the chosen side, so a side whose
//! live parts alone (RTT + the optimistic transfer + queue) lose is not tried; and once
//! measured, a side's uncertainty shrinks, so exploring stops when the estimates are
//! sure. The reason says `exploring: ...` and why.
//!
//! No clock, randomness or files here: callers pass `now`, a uniform random draw in
//! `[0, 1)`, and persist [`CostModel::snapshot`] themselves (in `state_dir`).
//!
//! # What callers must pass
//! - [`Conditions::cpu_share`]: the share of one core a new task would get when it starts,
//!   from load *not counting the task itself* — [`available_cpu_share`] computes it from
//!   `cpu_percent`, the core count and the load average.
//! - Queue waits: [`queue_wait`] from slot counts and a mean service time
//!   ([`CostModel::expected_local_run`] for the agent's own queue,
//!   [`CostModel::typical_cloud_run`] for a daemon's [`LoadReport`](crate::LoadReport)).
//! - After every run that ended with an exit code (success or not): [`CostModel::record_local`]
//!   with the wall time and the share available at its start, or [`CostModel::record_cloud`]
//!   with the agent-side total and the trailer's timings ([`CloudRun::from_trailer`]).
//!   Runs that never finished (rejected, connection lost) are not samples.
//!
//! # Assumptions
//! - A task is single-threaded and CPU-bound on the board: its speed is proportional to
//!   the CPU share it gets, and it burns one core while running (the energy term). I/O-bound
//!   tasks are predicted pessimistically on a busy board, which errs toward the cloud.
//! - Transfer time is bytes over the direction's rate; a slow-start or per-request cost
//!   the rate does not explain is the per-task correction.
//! - Radio energy is proportional to bytes moved; idle listening while waiting is ignored.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::link::{self, LinkEstimate, PRIOR_SD};
use super::{exp, ln, Place};
use crate::name::valid_task_name;
use crate::Trailer;

/// Most tasks the model keeps statistics for; the least recently measured is evicted.
/// Catalogs hold tens of tasks: this bounds memory (~200 B a task) and the snapshot
/// (~500 B of JSON a task) even if catalogs churn over a long uptime.
pub const MAX_TASKS: usize = 1024;

/// Smallest CPU share assumed for a new task. The kernel's fair scheduler gives even a
/// saturated board some time slices; the floor keeps predictions finite (at most 20× the
/// idle run time).
pub const MIN_CPU_SHARE: f64 = 0.05;

/// A side with fewer samples than this counts as stale (and its size fit is not trusted):
/// with the default smoothing, three samples carry two thirds of the weight.
pub const FRESH_SAMPLES: u32 = 3;

/// A side never measured is tried at once if its prior score is within this factor of the
/// chosen side's: a wrong guess costs at most one run this much slower. Beyond it, it is
/// left to ordinary (cost-scaled) exploration.
pub const UNMEASURED_TRY_FACTOR: f64 = 2.0;

/// A sample more than this factor away from its side's estimate (either way) marks the
/// side unsettled, i.e. stale until a sample agrees again, so a real change is confirmed
/// quickly instead of after `stale_after`.
pub const SURPRISE_FACTOR: f64 = 2.0;

/// A task never measured on either side is assumed to take what tasks measured on this
/// agent typically take at a full core (the geometric mean of their local runs, or of
/// their cloud runs × the speed ratio); before any task was measured, this: a small
/// task. Its first run goes where that typical task would finish first: the board at
/// the CPU share available now, or the cloud after RTT + transfer + queue. Guessing
/// wrong costs one run either way, but not the same: a first cloud run of a task that
/// takes milliseconds on the board costs a round trip, many times the task, while a
/// first local run of a long task costs at most 1/share of it, so with nothing known
/// the guess is small and the first run stays on the board unless the board is
/// throttled and the daemon near.
pub const FIRST_RUN_PRIOR: Duration = Duration::from_millis(10);

/// Cloud runs moving fewer bytes than this are not bandwidth samples: their transfer time
/// is dominated by round trips and congestion-window growth, not by the link's rate.
pub const MIN_BANDWIDTH_SAMPLE_BYTES: u64 = link::MIN_SAMPLE_BYTES;

/// How many standard deviations of optimism exploration allows (see the module doc).
pub const EXPLORE_SD: f64 = 2.0;

/// Noise of one measured run time (natural log, 1 sd): the optimistic end of a measured
/// side is its estimate × exp(−[`EXPLORE_SD`] × this ÷ √samples).
const RUN_SD: f64 = 0.35;

/// Runs in a row on one side after which the guard samples the other (if its optimistic
/// score beats the chosen side).
pub const GUARD_RUNS: u32 = 8;

/// The guard's streak doubles with each guard sample, up to [`GUARD_RUNS`] × 2^this.
pub const GUARD_MAX_LEVEL: u8 = 6;

/// Transfer counts as "a large part" of the cloud's cost (for the link-unsure rule) from
/// this share of its predicted finish time.
const DATA_HEAVY_SHARE: f64 = 0.25;

/// Link bandwidth assumed when neither the agent nor the model has a figure: a modest
/// uplink (Wi-Fi or LTE at the edge). Per-task corrections absorb the error for the
/// sizes a task usually moves.
pub const DEFAULT_BANDWIDTH_MBPS: f64 = 10.0;

/// Assumed ratio of board to cloud run time for a task measured on one side only, until
/// tasks measured on both sides teach the model the real ratio. 1 favours neither side.
pub const DEFAULT_SPEED_RATIO: f64 = 1.0;

/// Input sizes must vary by about this much (standard deviation of their logarithm) before
/// a size fit is trusted; below it, size differences are noise and the plain average wins.
const MIN_LOG_SPREAD: f64 = 0.1;

/// Fitted exponent of run time (or output size) in input size is clamped to `0..=this`:
/// nothing gets faster with more input, and super-quadratic slopes are noise.
const MAX_ELASTICITY: f64 = 2.0;

/// Run times are floored here before taking logarithms: shorter runs are timer noise.
const MIN_RUN_SECS: f64 = 1e-5;

/// Tasks shorter than this on either side do not teach the board/cloud speed ratio: their
/// run time is dominated by fixed costs, not by the CPU.
const MIN_SPEED_SAMPLE_SECS: f64 = 1e-3;

/// The learned board/cloud speed ratio is clamped to `1/100..=100` (in logarithms).
const MAX_LOG_SPEED: f64 = 4.605_170_185_988_091; // ln 100

/// Predictions are clamped to this many seconds (about 30 years), far beyond any task
/// timeout, so that converting to [`Duration`] can never overflow.
const MAX_PREDICTED_SECS: f64 = 1e9;

/// Version of the [`CostModel::snapshot`] format.
pub const SNAPSHOT_VERSION: u64 = 1;

/// Tunables of the cost model: the policy file's `[auto]` table, one type for both so
/// the two cannot drift apart (field docs and defaults live in [`super::rules::AutoParams`]).
pub use super::rules::AutoParams as CostParams;

/// A `[auto]` value out of its range; the text names the key and the value.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum CostParamsError {
    /// `explore_rate` is not a number in `0..=1`; the value given.
    #[error("`explore_rate` must be between 0 and 1, got {0}")]
    ExploreRate(f64),
    /// `stale_after` is zero.
    #[error("`stale_after` must be longer than zero")]
    StaleAfter,
    /// `smoothing` is not a number above 0 and at most 1; the value given.
    #[error("`smoothing` must be above 0 and at most 1, got {0}")]
    Smoothing(f64),
    /// A weight that must be a finite number `>= 0` is not.
    #[error("`{key}` must be a number >= 0, got {value}")]
    Negative {
        /// The `[auto]` key: `cpu_watts`, `radio_joules_per_mb` or `energy_weight`.
        key: &'static str,
        /// The value given.
        value: f64,
    },
}

impl CostParams {
    /// Checks every field's range; the error names the `[auto]` key.
    pub fn validate(&self) -> Result<(), CostParamsError> {
        let unit = |v: f64| v.is_finite() && (0.0..=1.0).contains(&v);
        let non_negative = |v: f64| v.is_finite() && v >= 0.0;
        if !unit(self.explore_rate) {
            return Err(CostParamsError::ExploreRate(self.explore_rate));
        }
        if self.stale_after.is_zero() {
            return Err(CostParamsError::StaleAfter);
        }
        if !(unit(self.smoothing) && self.smoothing > 0.0) {
            return Err(CostParamsError::Smoothing(self.smoothing));
        }
        for (key, value) in [
            ("cpu_watts", self.cpu_watts),
            ("radio_joules_per_mb", self.radio_joules_per_mb),
            ("energy_weight", self.energy_weight),
        ] {
            if !non_negative(value) {
                return Err(CostParamsError::Negative { key, value });
            }
        }
        Ok(())
    }

    /// Each out-of-range field replaced by its default, so the model never divides by a
    /// NaN; the config layer reports such values with [`CostParams::validate`].
    fn sanitized(self) -> Self {
        let d = CostParams::default();
        let ok_unit = |v: f64| v.is_finite() && (0.0..=1.0).contains(&v);
        let ok_pos = |v: f64| v.is_finite() && v >= 0.0;
        CostParams {
            explore_rate: if ok_unit(self.explore_rate) {
                self.explore_rate
            } else {
                d.explore_rate
            },
            stale_after: if self.stale_after.is_zero() {
                d.stale_after
            } else {
                self.stale_after
            },
            smoothing: if ok_unit(self.smoothing) && self.smoothing > 0.0 {
                self.smoothing
            } else {
                d.smoothing
            },
            cpu_watts: if ok_pos(self.cpu_watts) {
                self.cpu_watts
            } else {
                d.cpu_watts
            },
            radio_joules_per_mb: if ok_pos(self.radio_joules_per_mb) {
                self.radio_joules_per_mb
            } else {
                d.radio_joules_per_mb
            },
            energy_weight: if ok_pos(self.energy_weight) {
                self.energy_weight
            } else {
                d.energy_weight
            },
        }
    }
}

/// The two sides a task can run on (the agent's placement uses this type too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// On the board.
    Local,
    /// On a cloud daemon.
    Cloud,
}

impl Side {
    /// `local` or `cloud`.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Local => "local",
            Side::Cloud => "cloud",
        }
    }

    /// The other side.
    pub fn other(self) -> Side {
        match self {
            Side::Local => Side::Cloud,
            Side::Cloud => Side::Local,
        }
    }
}

impl From<Side> for Place {
    fn from(side: Side) -> Place {
        match side {
            Side::Local => Place::Local,
            Side::Cloud => Place::Cloud,
        }
    }
}

/// The world as the agent sees it at the moment of a decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Conditions {
    /// Share of one core a new task would get when it starts, `0..=1`, from load not
    /// counting the task itself (see [`available_cpu_share`]). Floored at
    /// [`MIN_CPU_SHARE`]; a NaN counts as 1.
    pub cpu_share: f64,
    /// Expected wait for a local execution slot (see [`queue_wait`]).
    pub local_queue_wait: Duration,
    /// Smoothed RTT to the daemon that would take the task.
    pub rtt: Option<Duration>,
    /// Throughput to that daemon (task input, board to cloud), megabits per second.
    /// `None`: the model's own estimate ([`CostModel::observed_bandwidth_mbps`]), else
    /// [`DEFAULT_BANDWIDTH_MBPS`], with their uncertainty.
    pub bandwidth_mbps: Option<f64>,
    /// Throughput from that daemon (task output), megabits per second; `None`: the same
    /// as `bandwidth_mbps`.
    pub download_mbps: Option<f64>,
    /// Uncertainty of the two figures above: standard deviation of their natural
    /// logarithm (0: trusted as exact; [`link::PRIOR_SD`] for a guess; see
    /// [`link::Rate::sd`]). A NaN or negative value counts as a guess.
    pub bandwidth_sd: f64,
    /// A link probe will measure the link shortly (the caller probes links it does not
    /// know): no task is sent to the cloud just to measure the link.
    pub link_probing: bool,
    /// Expected wait for a slot on that daemon (see [`queue_wait`]).
    pub cloud_queue_wait: Duration,
    /// A daemon is connected and not draining.
    pub cloud_available: bool,
    /// The board runs on its battery: the energy term counts.
    pub on_battery: bool,
}

impl Default for Conditions {
    /// An idle board on mains power with no cloud.
    fn default() -> Self {
        Conditions {
            cpu_share: 1.0,
            local_queue_wait: Duration::ZERO,
            rtt: None,
            bandwidth_mbps: None,
            download_mbps: None,
            bandwidth_sd: 0.0,
            link_probing: false,
            cloud_queue_wait: Duration::ZERO,
            cloud_available: false,
            on_battery: false,
        }
    }
}

/// One side's predicted cost.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cost {
    /// From now until the result is back on the board: `network + queue + run`.
    pub finish: Duration,
    /// Of which running: on the board at the current CPU share, or on the daemon.
    pub run: Duration,
    /// Of which waiting for an execution slot (local or daemon queue).
    pub queue: Duration,
    /// Of which on the network: RTT + transfer (zero on the board).
    pub network: Duration,
    /// Energy the board spends: CPU locally, radio for the cloud.
    pub energy_j: f64,
    /// What is compared, in seconds: finish, plus `energy_weight × energy_j` on battery.
    pub score: f64,
    /// Runs measured on this side (saturating); 0 means the estimate is a prior.
    pub samples: u32,
}

/// The model's answer for one task.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// Where to run it.
    pub choice: Side,
    /// The board's cost.
    pub local: Cost,
    /// The cloud's cost; `None` when no daemon is available.
    pub cloud: Option<Cost>,
    /// The choice was made to measure that side, not because it looked cheaper.
    pub explore: bool,
    /// One operator-readable line, e.g.
    /// `auto: cloud 42 ms (rtt 20 + transfer 8 + queue 0 + run 14) < local 120 ms (run 100 at 83% cpu + queue 20)`.
    /// Parts are in the unit of their total (`ms`, or `s` from 10 s); `~` marks a prior.
    pub reason: String,
}

/// A finished local run, as the agent measured it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalRun {
    /// Wall time from the task's start to its exit (not counting its queue wait).
    pub run: Duration,
    /// The CPU share that was available when it started (the [`Conditions::cpu_share`]
    /// of its decision, or a fresh reading): it normalises the run to a full core.
    pub cpu_share: f64,
    /// Bytes read from its input.
    pub input_bytes: u64,
    /// Bytes it wrote as output.
    pub output_bytes: u64,
}

/// A finished cloud run, as the agent measured it plus the daemon's trailer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CloudRun {
    /// Agent-side wall time from opening the task's stream to receiving the trailer.
    pub total: Duration,
    /// Daemon-side wait for a slot (trailer `timings.queue_us`).
    pub daemon_queue: Duration,
    /// Daemon-side time receiving the input before the run (trailer
    /// `timings.input_us`). It is transfer, not queueing: it stays in the network
    /// share of `total` that teaches the link's speed.
    pub daemon_input: Duration,
    /// Daemon-side run time (trailer `timings.run_us`).
    pub daemon_run: Duration,
    /// The connection's smoothed RTT during the run; pass it whenever known, as the
    /// per-task correction learnt otherwise includes it.
    pub rtt: Option<Duration>,
    /// The uplink figure the agent has for the connection *after* learning from this
    /// run (what it will pass as [`Conditions::bandwidth_mbps`]), so the per-task
    /// correction is relative to it. `None`: the model's own, likewise updated first.
    pub bandwidth_mbps: Option<f64>,
    /// Likewise for the downlink ([`Conditions::download_mbps`]).
    pub download_mbps: Option<f64>,
    /// Bytes sent as input.
    pub input_bytes: u64,
    /// Bytes received as output.
    pub output_bytes: u64,
}

impl CloudRun {
    /// A sample from the agent's own measurements and the daemon's trailer.
    pub fn from_trailer(
        total: Duration,
        rtt: Option<Duration>,
        bandwidth_mbps: Option<f64>,
        trailer: &Trailer,
    ) -> CloudRun {
        CloudRun {
            total,
            daemon_queue: Duration::from_micros(trailer.timings.queue_us),
            daemon_input: Duration::from_micros(trailer.timings.input_us),
            daemon_run: Duration::from_micros(trailer.timings.run_us),
            rtt,
            bandwidth_mbps,
            download_mbps: None,
            input_bytes: trailer.input_bytes,
            output_bytes: trailer.output_bytes,
        }
    }
}

impl CloudRun {
    /// The network share of the run: the agent's total less the daemon's queue and run
    /// time, and at least the daemon's input time whatever the clocks say.
    pub fn network_secs(&self) -> f64 {
        (self.total.as_secs_f64() - self.daemon_queue.as_secs_f64() - self.daemon_run.as_secs_f64())
            .max(self.daemon_input.as_secs_f64())
    }

    /// The time the run's bytes took to cross: its network share less one RTT; `None`
    /// when nothing is left.
    pub fn transfer_secs(&self) -> Option<f64> {
        let rtt = self.rtt.map_or(0.0, |r| r.as_secs_f64());
        let net = self.network_secs();
        (net > rtt).then_some(net - rtt)
    }
}

/// [`CostModel::restore`] could not use a snapshot.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RestoreError {
    /// The snapshot was written by another format version; start afresh.
    #[error("cost model snapshot has version {0}, this agent reads version {SNAPSHOT_VERSION}")]
    Version(u64),
    /// The snapshot is not a JSON object with a `version`.
    #[error("cost model snapshot is malformed: {0}")]
    Malformed(String),
}

/// Share of one core a new single-threaded task would get now.
///
/// `cpu_percent` is busy time over all `cores` (0–100), `load_avg` the run-queue length if
/// known. The task gets an idle core if there is one; otherwise the scheduler shares the
/// cores fairly among the runnable tasks and it. The larger of the two views wins, capped
/// at one core and floored at [`MIN_CPU_SHARE`].
pub fn available_cpu_share(cpu_percent: f64, cores: usize, load_avg: Option<f64>) -> f64 {
    let cores = cores.max(1) as f64;
    let busy = if cpu_percent.is_finite() {
        (cpu_percent / 100.0).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let idle = cores * (1.0 - busy);
    let fair = match load_avg {
        Some(load) if load.is_finite() && load >= 0.0 => cores / (load + 1.0),
        _ => 0.0,
    };
    idle.max(fair).clamp(MIN_CPU_SHARE, 1.0)
}

/// Expected wait for an execution slot: with `running + queued` tasks ahead on `slots`
/// slots (a `slots` of 0 counts as 1), a new task starts after the tasks beyond the free
/// slots have been served, `slots` at a time, each taking `mean_service` (assumed
/// memoryless, so a running task's remaining time is a whole `mean_service`).
pub fn queue_wait(running: u32, queued: u32, slots: u32, mean_service: Duration) -> Duration {
    let slots = slots.max(1);
    let ahead = u64::from(running) + u64::from(queued);
    if ahead < u64::from(slots) {
        return Duration::ZERO;
    }
    let rounds = ahead - u64::from(slots) + 1;
    to_duration(mean_service.as_secs_f64() * rounds as f64 / f64::from(slots))
}

/// An exponentially weighted average.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
struct Avg {
    /// Samples seen (saturating).
    n: u32,
    /// The average.
    v: f64,
}

impl Avg {
    const EMPTY: Avg = Avg { n: 0, v: 0.0 };

    fn update(&mut self, sample: f64, w: f64) {
        if self.n == 0 {
            self.v = sample;
        } else {
            self.v += w * (sample - self.v);
        }
        self.n = self.n.saturating_add(1);
    }

    fn get(&self) -> Option<f64> {
        (self.n > 0).then_some(self.v)
    }

    fn is_valid(&self) -> bool {
        self.v.is_finite()
    }
}

/// Exponentially weighted least squares of `ly` on `lx` (both logarithms): a geometric
/// average of `y` that follows `x` as a power law once `x` varies enough.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
struct Fit {
    /// Samples seen (saturating).
    n: u32,
    /// Average of `lx`.
    mx: f64,
    /// Average of `ly`.
    my: f64,
    /// Variance of `lx`.
    vx: f64,
    /// Covariance of `lx` and `ly`.
    cxy: f64,
}

impl Fit {
    const EMPTY: Fit = Fit {
        n: 0,
        mx: 0.0,
        my: 0.0,
        vx: 0.0,
        cxy: 0.0,
    };

    /// Adds a sample; true when it was more than [`SURPRISE_FACTOR`] off the estimate.
    fn update(&mut self, lx: f64, ly: f64, w: f64) -> bool {
        if self.n == 0 {
            *self = Fit {
                n: 1,
                mx: lx,
                my: ly,
                vx: 0.0,
                cxy: 0.0,
            };
            return false;
        }
        let surprise = (ly - self.at(lx)).abs() > ln(SURPRISE_FACTOR);
        // West's weighted incremental update: deviations from the old means.
        let dx = lx - self.mx;
        let dy = ly - self.my;
        self.mx += w * dx;
        self.my += w * dy;
        self.vx = (1.0 - w) * (self.vx + w * dx * dx);
        self.cxy = (1.0 - w) * (self.cxy + w * dx * dy);
        self.n = self.n.saturating_add(1);
        surprise
    }

    /// The exponent of `y` in `x`, or 0 while the inputs have not varied enough.
    fn slope(&self) -> f64 {
        if self.n < FRESH_SAMPLES || self.vx < MIN_LOG_SPREAD * MIN_LOG_SPREAD {
            return 0.0;
        }
        (self.cxy / self.vx).clamp(0.0, MAX_ELASTICITY)
    }

    /// Estimated `ly` at `lx`.
    fn at(&self, lx: f64) -> f64 {
        self.my + self.slope() * (lx - self.mx)
    }

    fn is_valid(&self) -> bool {
        [self.mx, self.my, self.vx, self.cxy]
            .iter()
            .all(|v| v.is_finite())
            && self.vx >= 0.0
    }
}

fn ln_bytes(bytes: f64) -> f64 {
    ln(bytes.max(0.0) + 1.0)
}

fn exp_bytes(l: f64) -> f64 {
    (exp(l) - 1.0).max(0.0)
}

fn ln_secs(secs: f64) -> f64 {
    ln(secs.max(MIN_RUN_SECS))
}

fn to_duration(secs: f64) -> Duration {
    if secs.is_finite() && secs > 0.0 {
        Duration::from_secs_f64(secs.min(MAX_PREDICTED_SECS))
    } else {
        Duration::ZERO
    }
}

fn sanitize_share(share: f64) -> f64 {
    if share.is_nan() {
        1.0
    } else {
        share.clamp(MIN_CPU_SHARE, 1.0)
    }
}

/// The factor a side's run time may be below its estimate at the optimistic end: its
/// noise shrinks with the samples taken and grows with the estimate's age (as a link's
/// does, [`link::DRIFT_PER_SEC`]; one restored from disk counts as [`RESTORED_AGE`]
/// old); a side never measured is a prior off by up to [`UNMEASURED_TRY_FACTOR`].
fn run_optimism(side: &SideStats, now: Instant) -> f64 {
    let n = side.fit.n;
    if n == 0 {
        return 1.0 / UNMEASURED_TRY_FACTOR;
    }
    let age = side
        .at
        .map_or(RESTORED_AGE, |at| now.saturating_duration_since(at));
    let var =
        RUN_SD * RUN_SD / f64::from(n.min(FRESH_SAMPLES)) + link::DRIFT_PER_SEC * age.as_secs_f64();
    exp(-EXPLORE_SD * var.sqrt())
}

/// Age assumed for a run-time estimate restored from disk.
const RESTORED_AGE: Duration = Duration::from_secs(600);

/// What the model knows about one side of one task.
#[derive(Debug, Clone, Copy)]
struct SideStats {
    /// Local: ln(run × share) i.e. CPU-seconds at a full core; cloud: ln(daemon run);
    /// both against ln(1 + input bytes).
    fit: Fit,
    /// When the last sample was recorded; `None` since a restart.
    at: Option<Instant>,
    /// The last sample agreed with the estimate within [`SURPRISE_FACTOR`].
    settled: bool,
}

impl SideStats {
    const EMPTY: SideStats = SideStats {
        fit: Fit::EMPTY,
        at: None,
        settled: true,
    };

    fn record(&mut self, lx: f64, ly: f64, w: f64, now: Instant) {
        self.settled = !self.fit.update(lx, ly, w);
        self.at = Some(now);
    }

    /// Why this side's estimate is stale, if it is.
    fn staleness(&self, now: Instant, stale_after: Duration) -> Option<Stale> {
        let n = self.fit.n;
        if n == 0 {
            return Some(Stale::Unmeasured);
        }
        if n < FRESH_SAMPLES {
            return Some(Stale::Few(n));
        }
        if !self.settled {
            return Some(Stale::Unsettled);
        }
        match self.at {
            None => Some(Stale::NotSinceRestart),
            Some(at) => {
                let age = now.saturating_duration_since(at);
                (age > stale_after).then_some(Stale::Old(age))
            }
        }
    }
}

/// Why a side's estimate counts as stale.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stale {
    Unmeasured,
    Few(u32),
    Unsettled,
    NotSinceRestart,
    Old(Duration),
}

/// What the model knows about one task.
#[derive(Debug, Clone, Copy)]
struct TaskStats {
    local: SideStats,
    cloud: SideStats,
    /// ln(1 + output bytes) against ln(1 + input bytes), from both sides.
    output: Fit,
    /// Cloud total minus daemon queue, daemon run, RTT and the transfer time at the
    /// bandwidth then known, seconds (signed: corrects bandwidth errors both ways).
    overhead: Avg,
    /// Recency for eviction: the model's record counter at the last sample.
    touch: u64,
    /// The side of the latest runs and how many in a row (for the guard).
    streak: (Option<Side>, u32),
    /// Guard samples taken: the streak that triggers the next is
    /// [`GUARD_RUNS`] × 2^this.
    guard_level: u8,
}

impl TaskStats {
    const EMPTY: TaskStats = TaskStats {
        local: SideStats::EMPTY,
        cloud: SideStats::EMPTY,
        output: Fit::EMPTY,
        overhead: Avg::EMPTY,
        touch: 0,
        streak: (None, 0),
        guard_level: 0,
    };

    /// Runs in a row on one side that make the guard sample the other.
    fn guard_streak(&self) -> u32 {
        GUARD_RUNS << self.guard_level.min(GUARD_MAX_LEVEL)
    }

    /// Notes a run on `side`: a run after a streak long enough for the guard on the
    /// other side raises the guard's level.
    fn note_run(&mut self, side: Side) {
        match self.streak {
            (Some(s), n) if s == side => self.streak.1 = n.saturating_add(1),
            (_, n) => {
                if n >= self.guard_streak() {
                    self.guard_level = (self.guard_level + 1).min(GUARD_MAX_LEVEL);
                }
                self.streak = (Some(side), 1);
            }
        }
    }

    /// Run-time estimates (local at a full core, cloud), seconds, at `lx`; a side with
    /// no samples borrows the other's through the speed ratio, and 0 if neither has any.
    fn runs(&self, lx: f64, speed_ratio: f64) -> (f64, f64) {
        let local = (self.local.fit.n > 0).then(|| exp(self.local.fit.at(lx)));
        let cloud = (self.cloud.fit.n > 0).then(|| exp(self.cloud.fit.at(lx)));
        match (local, cloud) {
            (Some(l), Some(c)) => (l, c),
            (Some(l), None) => (l, l / speed_ratio),
            (None, Some(c)) => (c * speed_ratio, c),
            (None, None) => (0.0, 0.0),
        }
    }
}

/// One side's estimate, in seconds, before conversion to a [`Cost`].
#[derive(Debug, Clone, Copy)]
struct Est {
    rtt: f64,
    transfer: f64,
    queue: f64,
    run: f64,
    energy: f64,
    score: f64,
    /// The score with every learnt part (run, overhead, CPU energy) taken as zero and
    /// the transfer at the optimistic end of the link estimate: what this side costs at
    /// the very least.
    floor: f64,
    /// The score at the optimistic end of every uncertain part (see the module doc).
    optimistic: f64,
    /// The transfer is a large part of the cost and the link's rate is not sure.
    link_unsure: bool,
    samples: u32,
}

impl Est {
    fn finish(&self) -> f64 {
        self.rtt + self.transfer + self.queue + self.run
    }

    fn cost(&self) -> Cost {
        Cost {
            finish: to_duration(self.finish()),
            run: to_duration(self.run),
            queue: to_duration(self.queue),
            network: to_duration(self.rtt + self.transfer),
            energy_j: self.energy,
            score: self.score,
            samples: self.samples,
        }
    }
}

/// Why the model chose what it chose.
#[derive(Debug, Clone, Copy)]
enum Why {
    CloudUnavailable,
    /// What a typical task would take on the board and in the cloud, seconds.
    FirstRun(f64, f64),
    Measure,
    /// The link's rate is not sure: its sd, and its age (`None`: never measured).
    LinkUnsure(f64, Option<Duration>),
    /// Runs in a row on the other side.
    Guard(u32),
    Explore(Stale, f64),
    Cheaper,
}

/// The link figures a prediction uses: bytes per second each way, and the sd of their
/// logarithm.
#[derive(Debug, Clone, Copy)]
struct LinkFig {
    up: f64,
    down: f64,
    sd: f64,
    /// Time since the estimate's last sample; `None` when it is a guess.
    age: Option<Duration>,
}

/// The automatic placement cost model: per-task estimates, link estimates, decisions.
/// One per agent, behind its placement lock.
#[derive(Debug, Clone)]
pub struct CostModel {
    params: CostParams,
    tasks: HashMap<String, TaskStats>,
    /// The link, from cloud runs moving enough bytes: the prior when the caller has no
    /// figure of its own.
    link: LinkEstimate,
    /// ln(local run at a full core ÷ cloud run), over tasks measured on both sides.
    speed: Avg,
    /// ln(daemon run), over all tasks: a daemon queue's service time.
    cloud_run: Avg,
    /// ln(local run at a full core), over all tasks: the prior of a task never measured.
    local_run: Avg,
    /// Counts records, for least-recently-measured eviction.
    clock: u64,
}

impl CostModel {
    /// An empty model. Out-of-range parameters fall back to their defaults.
    pub fn new(params: CostParams) -> Self {
        CostModel {
            params: params.sanitized(),
            tasks: HashMap::new(),
            link: LinkEstimate::COLD,
            speed: Avg::EMPTY,
            cloud_run: Avg::EMPTY,
            local_run: Avg::EMPTY,
            clock: 0,
        }
    }

    /// The parameters in use.
    pub fn params(&self) -> &CostParams {
        &self.params
    }

    /// Replaces the parameters (policy reload) and keeps what was learnt.
    pub fn set_params(&mut self, params: CostParams) {
        self.params = params.sanitized();
    }

    /// Tasks with statistics.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// True before anything was recorded.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// True if `task` has statistics.
    pub fn knows(&self, task: &str) -> bool {
        self.tasks.contains_key(task)
    }

    /// Keeps only the tasks `keep` accepts, e.g. those still in the catalog after a reload.
    pub fn retain_tasks(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.tasks.retain(|name, _| keep(name));
    }

    /// Link throughput learnt from cloud runs that moved at least
    /// [`MIN_BANDWIDTH_SAMPLE_BYTES`], megabits per second: bytes ÷ (total − daemon queue −
    /// daemon run − RTT). A lower bound of the link's rate, since that span includes
    /// protocol overhead; use it when the agent has no better figure.
    pub fn observed_bandwidth_mbps(&self) -> Option<f64> {
        let up = self.link.up;
        (up.n > 0).then(|| exp(up.mean) * 8e-6)
    }

    /// The link the model learnt from cloud runs, both ways, with uncertainty and age.
    pub fn observed_link(&self) -> LinkEstimate {
        self.link
    }

    /// Expected local run time of `task` at `cpu_share` (for summing the local queue).
    /// `None` for a task never measured on either side.
    pub fn expected_local_run(
        &self,
        task: &str,
        input_bytes: Option<u64>,
        cpu_share: f64,
    ) -> Option<Duration> {
        let s = self.tasks.get(task)?;
        let (local, _) = s.runs(self.input_log(s, input_bytes), self.speed_ratio());
        Some(to_duration(local / sanitize_share(cpu_share)))
    }

    /// Expected daemon run time of `task`. `None` for a task never measured.
    pub fn expected_cloud_run(&self, task: &str, input_bytes: Option<u64>) -> Option<Duration> {
        let s = self.tasks.get(task)?;
        let (_, cloud) = s.runs(self.input_log(s, input_bytes), self.speed_ratio());
        Some(to_duration(cloud))
    }

    /// Geometric average daemon run time over all tasks: the service time to pass to
    /// [`queue_wait`] for a daemon's queue of other agents' tasks.
    pub fn typical_cloud_run(&self) -> Option<Duration> {
        self.cloud_run.get().map(|l| to_duration(exp(l)))
    }

    /// What a task never measured is assumed to take at a full core (see
    /// [`FIRST_RUN_PRIOR`]), seconds.
    fn typical_local_full(&self) -> f64 {
        self.local_run
            .get()
            .map(exp)
            .or_else(|| self.cloud_run.get().map(|l| exp(l) * self.speed_ratio()))
            .unwrap_or(FIRST_RUN_PRIOR.as_secs_f64())
    }

    /// Board run time at a full core ÷ cloud run time, learnt over tasks measured on both
    /// sides ([`DEFAULT_SPEED_RATIO`] until then). Used as the prior for a side never
    /// measured.
    pub fn speed_ratio(&self) -> f64 {
        self.speed.get().map_or(DEFAULT_SPEED_RATIO, exp)
    }

    fn input_log(&self, s: &TaskStats, input_bytes: Option<u64>) -> f64 {
        match input_bytes {
            Some(b) => ln_bytes(b as f64),
            // The typical input: both sides feed the output fit's x average.
            None => s.output.mx,
        }
    }

    /// The link figures for a prediction or a sample: the caller's when it has them,
    /// else the model's own estimate (up and down each falling back on the other), else
    /// [`DEFAULT_BANDWIDTH_MBPS`] as a guess.
    fn link_fig(&self, up: Option<f64>, down: Option<f64>, sd: f64, now: Instant) -> LinkFig {
        let valid = |b: &f64| b.is_finite() && *b > 0.0;
        let bps = |mbps: f64| mbps * 1e6 / 8.0;
        if let Some(up) = up.filter(valid) {
            let down = down.filter(valid).unwrap_or(up);
            let sd = if sd.is_finite() && sd >= 0.0 {
                sd
            } else {
                PRIOR_SD
            };
            return LinkFig {
                up: bps(up),
                down: bps(down),
                sd,
                age: Some(Duration::ZERO),
            };
        }
        let (up, down) = (self.link.up.get(now), self.link.down.get(now));
        match (up.or(down), down.or(up)) {
            (Some(u), Some(d)) => LinkFig {
                up: bps(u.mbps),
                down: bps(d.mbps),
                sd: u.sd.max(d.sd),
                age: Some(u.age.min(d.age)),
            },
            _ => LinkFig {
                up: bps(DEFAULT_BANDWIDTH_MBPS),
                down: bps(DEFAULT_BANDWIDTH_MBPS),
                sd: PRIOR_SD,
                age: None,
            },
        }
    }

    /// Decides where to run `task` with `input_bytes` (`None`: its typical input) under
    /// `c`. `draw` is a uniform random number in `[0, 1)` for exploration; the same
    /// arguments always give the same prediction. Allocates only the reason.
    pub fn predict(
        &self,
        task: &str,
        input_bytes: Option<u64>,
        c: &Conditions,
        now: Instant,
        draw: f64,
    ) -> Prediction {
        let p = &self.params;
        let s = self.tasks.get(task).unwrap_or(&TaskStats::EMPTY);
        let lx = self.input_log(s, input_bytes);
        let (local_full, cloud_run) = s.runs(lx, self.speed_ratio());
        let energy_weight = if c.on_battery { p.energy_weight } else { 0.0 };
        let share = sanitize_share(c.cpu_share);

        let queue = c.local_queue_wait.as_secs_f64();
        let mut local = Est {
            rtt: 0.0,
            transfer: 0.0,
            queue,
            run: local_full / share,
            // CPU-bound: it burns `local_full` core-seconds whatever its share.
            energy: p.cpu_watts * local_full,
            score: 0.0,
            floor: queue,
            optimistic: 0.0,
            link_unsure: false,
            samples: s.local.fit.n,
        };
        local.score = local.finish() + energy_weight * local.energy;
        local.optimistic = queue + (local.score - queue) * run_optimism(&s.local, now);

        let link = self.link_fig(c.bandwidth_mbps, c.download_mbps, c.bandwidth_sd, now);
        let cloud = c.cloud_available.then(|| {
            let input = exp_bytes(lx);
            let output = if s.output.n > 0 {
                exp_bytes(s.output.at(lx))
            } else {
                0.0
            };
            let overhead = s.overhead.get().unwrap_or(0.0);
            let raw_transfer = input / link.up + output / link.down;
            let hopeful_transfer = raw_transfer * exp(-EXPLORE_SD * link.sd);
            let mut e = Est {
                rtt: c.rtt.map_or(0.0, |r| r.as_secs_f64()),
                transfer: (raw_transfer + overhead).max(0.0),
                queue: c.cloud_queue_wait.as_secs_f64(),
                run: cloud_run,
                energy: p.radio_joules_per_mb * (input + output) / 1e6,
                score: 0.0,
                floor: 0.0,
                optimistic: 0.0,
                link_unsure: false,
                samples: s.cloud.fit.n,
            };
            e.score = e.finish() + energy_weight * e.energy;
            let live = e.rtt + e.queue + energy_weight * e.energy;
            e.floor = live + hopeful_transfer;
            e.optimistic = live
                + (hopeful_transfer + overhead).max(0.0)
                + cloud_run * run_optimism(&s.cloud, now);
            // Only a run that moves enough bytes to be a rate sample teaches the link, and
            // only when no probe is about to.
            e.link_unsure = !c.link_probing
                && link.sd > link::SURE_SD
                && raw_transfer >= DATA_HEAVY_SHARE * e.finish()
                && input + output >= MIN_BANDWIDTH_SAMPLE_BYTES as f64;
            e
        });

        let (choice, why) = match &cloud {
            None => (Side::Local, Why::CloudUnavailable),
            Some(cl) if s.local.fit.n == 0 && s.cloud.fit.n == 0 => {
                // A typical task of this agent, both ways; the link at its estimate's
                // mean (a first run sent over a link nobody measured is a bet on a guess).
                let typical = self.typical_local_full();
                let on_board = local.queue + typical / share;
                let in_cloud = cl.rtt + cl.queue + cl.transfer + typical / self.speed_ratio();
                let side = if in_cloud < on_board {
                    Side::Cloud
                } else {
                    Side::Local
                };
                (side, Why::FirstRun(on_board, in_cloud))
            }
            Some(cl) => self.choose(s, &local, cl, &link, now, draw),
        };

        let reason = self.reason(choice, why, &local, cloud.as_ref(), share, c.on_battery);
        Prediction {
            choice,
            local: local.cost(),
            cloud: cloud.as_ref().map(Est::cost),
            explore: !matches!(why, Why::CloudUnavailable | Why::Cheaper),
            reason,
        }
    }

    /// The choice between two available sides, exploring as the module doc says.
    fn choose(
        &self,
        s: &TaskStats,
        local: &Est,
        cloud: &Est,
        link: &LinkFig,
        now: Instant,
        draw: f64,
    ) -> (Side, Why) {
        let cheaper = if cloud.score < local.score {
            Side::Cloud
        } else {
            Side::Local
        };
        let (best, other, other_stats) = match cheaper {
            Side::Local => (local, cloud, &s.cloud),
            Side::Cloud => (cloud, local, &s.local),
        };
        // What the live signals guarantee makes it lose: nothing to learn there now.
        if other.floor >= best.score {
            return (cheaper, Why::Cheaper);
        }
        let plausible = other.optimistic < best.score;
        if cheaper == Side::Local && other.link_unsure && plausible {
            return (Side::Cloud, Why::LinkUnsure(link.sd, link.age));
        }
        let stale = other_stats.staleness(now, self.params.stale_after);
        if stale == Some(Stale::Unmeasured) && other.score <= UNMEASURED_TRY_FACTOR * best.score {
            return (cheaper.other(), Why::Measure);
        }
        match s.streak {
            (Some(side), n) if side == cheaper && n >= s.guard_streak() && plausible => {
                return (cheaper.other(), Why::Guard(n));
            }
            _ => {}
        }
        match stale {
            Some(stale) if plausible => {
                let ratio = if other.score > 0.0 {
                    (best.score / other.score).min(1.0)
                } else {
                    1.0
                };
                let prob = self.params.explore_rate * ratio;
                if draw < prob {
                    (cheaper.other(), Why::Explore(stale, prob))
                } else {
                    (cheaper, Why::Cheaper)
                }
            }
            _ => (cheaper, Why::Cheaper),
        }
    }

    fn reason(
        &self,
        choice: Side,
        why: Why,
        local: &Est,
        cloud: Option<&Est>,
        share: f64,
        on_battery: bool,
    ) -> String {
        let mut out = String::with_capacity(160);
        out.push_str("auto: ");
        let energy = on_battery && self.params.energy_weight > 0.0;
        let (chosen, other) = match (choice, cloud) {
            (Side::Local, Some(cl)) => (local, Some(cl)),
            (Side::Cloud, Some(cl)) => (cl, Some(local)),
            (_, None) => (local, None),
        };
        match why {
            Why::CloudUnavailable => {
                out.push_str("local (cloud unavailable)");
                if local.samples > 0 {
                    out.push_str(": ");
                    push_side(&mut out, Side::Local, local, share, energy);
                }
            }
            Why::FirstRun(on_board, in_cloud) => {
                let _ = write!(
                    out,
                    "{} (exploring: first run; a typical task here takes ~",
                    choice.as_str()
                );
                push_amount(&mut out, on_board);
                out.push_str(" on the board now, ~");
                push_amount(&mut out, in_cloud);
                out.push_str(" in the cloud)");
            }
            Why::Measure
            | Why::LinkUnsure(..)
            | Why::Guard(_)
            | Why::Explore(..)
            | Why::Cheaper => {
                let c = choice.as_str();
                match why {
                    Why::Measure => {
                        let _ = write!(out, "{c} (exploring: no {c} run yet): ");
                    }
                    Why::LinkUnsure(sd, age) => {
                        out.push_str("cloud (exploring: link speed ");
                        match age {
                            None => out.push_str("unmeasured"),
                            Some(age) => {
                                let _ = write!(
                                    out,
                                    "uncertain, ±{:.0}% at {} s old",
                                    (exp(sd) - 1.0) * 100.0,
                                    age.as_secs()
                                );
                            }
                        }
                        out.push_str(", transfer could be ");
                        let hopeful = chosen.transfer * exp(-EXPLORE_SD * sd);
                        push_amount(&mut out, hopeful);
                        out.push_str("): ");
                    }
                    Why::Guard(n) => {
                        let _ = write!(
                            out,
                            "{c} (exploring: {n} runs in a row on the {o}, {c} could be faster): ",
                            o = choice.other().as_str()
                        );
                    }
                    Why::Explore(stale, prob) => {
                        let _ = write!(out, "{c} (exploring: ");
                        push_stale(&mut out, stale);
                        let _ = write!(out, ", p {:.1}%): ", prob * 100.0);
                    }
                    _ => {}
                }
                push_side(&mut out, choice, chosen, share, energy);
                if let Some(other) = other {
                    out.push_str(match why {
                        Why::Cheaper if chosen.score < other.score => " < ",
                        Why::Cheaper => " <= ",
                        _ => " vs ",
                    });
                    push_side(&mut out, choice.other(), other, share, energy);
                }
            }
        }
        if energy && !matches!(why, Why::FirstRun(..)) && (cloud.is_some() || local.samples > 0) {
            out.push_str("; on battery, 1 J = ");
            push_amount(&mut out, self.params.energy_weight);
        }
        out
    }

    /// Records a local run of `task` that ended at `now`.
    pub fn record_local(&mut self, task: &str, run: &LocalRun, now: Instant) {
        let w = self.params.smoothing;
        let lx = ln_bytes(run.input_bytes as f64);
        let full = run.run.as_secs_f64() * sanitize_share(run.cpu_share);
        self.local_run.update(ln_secs(full), w);
        let s = self.entry(task);
        s.local.record(lx, ln_secs(full), w, now);
        s.output.update(lx, ln_bytes(run.output_bytes as f64), w);
        s.note_run(Side::Local);
        self.learn_speed(task, lx);
    }

    /// Records a cloud run of `task` whose trailer arrived at `now`.
    pub fn record_cloud(&mut self, task: &str, run: &CloudRun, now: Instant) {
        let w = self.params.smoothing;
        let lx = ln_bytes(run.input_bytes as f64);
        let daemon_run = run.daemon_run.as_secs_f64();
        let rtt = run.rtt.map_or(0.0, |r| r.as_secs_f64());
        // The network share: rtt, transfer (the daemon's input time included) and
        // per-task overhead.
        let net = run.network_secs();
        if let Some(secs) = run.transfer_secs() {
            self.link
                .record_transfer(run.input_bytes, run.output_bytes, secs, now);
        }
        // Relative to the link figures as they are now, this run learnt: what they do
        // not explain (slow start, per-request costs) is the task's own correction.
        let fig = self.link_fig(run.bandwidth_mbps, run.download_mbps, 0.0, now);
        let transfer = run.input_bytes as f64 / fig.up + run.output_bytes as f64 / fig.down;
        let overhead = net - rtt - transfer;
        self.cloud_run.update(ln_secs(daemon_run), w);
        let s = self.entry(task);
        s.cloud.record(lx, ln_secs(daemon_run), w, now);
        s.output.update(lx, ln_bytes(run.output_bytes as f64), w);
        s.overhead.update(overhead, w);
        s.note_run(Side::Cloud);
        self.learn_speed(task, lx);
    }

    /// After a sample of `task`, if both sides are measured, learns their speed ratio.
    fn learn_speed(&mut self, task: &str, lx: f64) {
        let Some(s) = self.tasks.get(task) else {
            return;
        };
        if s.local.fit.n == 0 || s.cloud.fit.n == 0 {
            return;
        }
        let (l, c) = (s.local.fit.at(lx), s.cloud.fit.at(lx));
        let floor = ln(MIN_SPEED_SAMPLE_SECS);
        if l < floor || c < floor {
            return;
        }
        let sample = (l - c).clamp(-MAX_LOG_SPEED, MAX_LOG_SPEED);
        self.speed.update(sample, self.params.smoothing);
    }

    /// The task's statistics, created (evicting the least recently measured task when
    /// full) if needed, marked as just measured.
    fn entry(&mut self, task: &str) -> &mut TaskStats {
        self.clock += 1;
        if !self.tasks.contains_key(task) {
            if self.tasks.len() >= MAX_TASKS {
                let oldest = self
                    .tasks
                    .iter()
                    .min_by_key(|(_, s)| s.touch)
                    .map(|(name, _)| name.clone());
                if let Some(oldest) = oldest {
                    self.tasks.remove(&oldest);
                }
            }
            self.tasks.insert(task.to_owned(), TaskStats::EMPTY);
        }
        let s = self
            .tasks
            .get_mut(task)
            .expect("the task was inserted above");
        s.touch = self.clock;
        s
    }

    /// Everything learnt, as versioned JSON for `state_dir`, taken at `now`. Run-time
    /// sample times are not kept: after a restore every run estimate is stale, so each
    /// side is re-sampled (at the exploration rate) before being trusted as fresh. The
    /// link estimate keeps its age (`link_age_secs`, up and down), so its uncertainty
    /// goes on growing across a restart.
    pub fn snapshot(&self, now: Instant) -> serde_json::Value {
        let age = |r: &link::RateEstimate| r.get(now).map_or(0, |r| r.age.as_secs());
        let tasks: BTreeMap<&str, TaskSnap> = self
            .tasks
            .iter()
            .map(|(name, s)| {
                let snap = TaskSnap {
                    local: s.local.fit,
                    cloud: s.cloud.fit,
                    output: s.output,
                    overhead: s.overhead,
                    touch: s.touch,
                };
                (name.as_str(), snap)
            })
            .collect();
        serde_json::json!({
            "version": SNAPSHOT_VERSION,
            "link": self.link,
            "link_age_secs": [age(&self.link.up), age(&self.link.down)],
            "speed": self.speed,
            "cloud_run": self.cloud_run,
            "local_run": self.local_run,
            "tasks": tasks,
        })
    }

    /// A model from a [`CostModel::snapshot`]. Tolerant within a version: unknown fields
    /// are ignored, a task entry that is malformed or badly named is dropped, and at
    /// most [`MAX_TASKS`] (the most recently measured) are kept. Tasks no longer in the
    /// catalog are kept too; drop them with [`CostModel::retain_tasks`]. `since_saved`
    /// is the time since the snapshot was taken (e.g. from the file's modification
    /// time): the link estimate's age at the snapshot plus this is its age at `now`.
    pub fn restore(
        value: &serde_json::Value,
        params: CostParams,
        now: Instant,
        since_saved: Duration,
    ) -> Result<Self, RestoreError> {
        let version = value
            .get("version")
            .ok_or_else(|| RestoreError::Malformed("no `version`".to_string()))?
            .as_u64()
            .ok_or_else(|| RestoreError::Malformed("`version` is not a number".to_string()))?;
        if version != SNAPSHOT_VERSION {
            return Err(RestoreError::Version(version));
        }
        let avg = |key: &str| {
            value
                .get(key)
                .and_then(|v| serde_json::from_value::<Avg>(v.clone()).ok())
                .filter(Avg::is_valid)
                .unwrap_or(Avg::EMPTY)
        };
        let mut model = CostModel::new(params);
        let ages: [u64; 2] = value
            .get("link_age_secs")
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or([0, 0]);
        let link = value
            .get("link")
            .and_then(|v| serde_json::from_value::<LinkEstimate>(v.clone()).ok())
            .filter(LinkEstimate::is_valid)
            .unwrap_or(LinkEstimate::COLD);
        let ago = |secs: u64| Duration::from_secs(secs).saturating_add(since_saved);
        model.link = LinkEstimate {
            up: link.up.aged(now, ago(ages[0])),
            down: link.down.aged(now, ago(ages[1])),
        };
        model.speed = avg("speed");
        model.cloud_run = avg("cloud_run");
        model.local_run = avg("local_run");
        let mut kept: Vec<(String, TaskStats)> = Vec::new();
        if let Some(tasks) = value.get("tasks").and_then(|t| t.as_object()) {
            for (name, v) in tasks {
                if !valid_task_name(name) {
                    continue;
                }
                let Ok(snap) = serde_json::from_value::<TaskSnap>(v.clone()) else {
                    continue;
                };
                if !snap.is_valid() {
                    continue;
                }
                let side = |fit: Fit| SideStats {
                    fit,
                    at: None,
                    settled: true,
                };
                let stats = TaskStats {
                    local: side(snap.local),
                    cloud: side(snap.cloud),
                    output: snap.output,
                    overhead: snap.overhead,
                    touch: snap.touch,
                    ..TaskStats::EMPTY
                };
                kept.push((name.clone(), stats));
            }
        }
        kept.sort_by_key(|(_, s)| std::cmp::Reverse(s.touch));
        kept.truncate(MAX_TASKS);
        model.clock = kept.iter().map(|(_, s)| s.touch).max().unwrap_or(0);
        model.tasks = kept.into_iter().collect();
        Ok(model)
    }
}

/// A task's entry in the snapshot.
#[derive(Debug, Serialize, Deserialize)]
struct TaskSnap {
    #[serde(default)]
    local: Fit,
    #[serde(default)]
    cloud: Fit,
    #[serde(default)]
    output: Fit,
    #[serde(default)]
    overhead: Avg,
    #[serde(default)]
    touch: u64,
}

impl TaskSnap {
    fn is_valid(&self) -> bool {
        self.local.is_valid()
            && self.cloud.is_valid()
            && self.output.is_valid()
            && self.overhead.is_valid()
    }
}

/// Writes `secs` in ms (one decimal below 10 ms) or, with `in_seconds`, in s; a zero
/// as `0`.
fn push_secs(out: &mut String, secs: f64, in_seconds: bool) {
    let _ = if secs == 0.0 {
        write!(out, "0")
    } else if in_seconds {
        write!(out, "{secs:.1}")
    } else {
        let ms = secs * 1000.0;
        if ms < 9.95 {
            write!(out, "{ms:.1}")
        } else {
            write!(out, "{ms:.0}")
        }
    };
}

/// Writes a duration given in seconds with its unit: `42 ms`, `3.5 ms`, `12.3 s`.
fn push_amount(out: &mut String, secs: f64) {
    let in_seconds = secs >= 10.0;
    push_secs(out, secs, in_seconds);
    out.push_str(if in_seconds { " s" } else { " ms" });
}

/// `local 120 ms (run 100 at 83% cpu + queue 20)` or
/// `cloud 42 ms (rtt 20 + transfer 8 + queue 0 + run 14)`, `+ 0.080 J` with energy.
fn push_side(out: &mut String, side: Side, e: &Est, share: f64, energy: bool) {
    let finish = e.finish();
    let sec = finish >= 10.0;
    out.push_str(side.as_str());
    out.push(' ');
    if e.samples == 0 {
        out.push('~');
    }
    push_amount(out, finish);
    match side {
        Side::Local => {
            out.push_str(" (run ");
            push_secs(out, e.run, sec);
            let _ = write!(out, " at {:.0}% cpu + queue ", share * 100.0);
            push_secs(out, e.queue, sec);
        }
        Side::Cloud => {
            out.push_str(" (rtt ");
            push_secs(out, e.rtt, sec);
            out.push_str(" + transfer ");
            push_secs(out, e.transfer, sec);
            out.push_str(" + queue ");
            push_secs(out, e.queue, sec);
            out.push_str(" + run ");
            push_secs(out, e.run, sec);
        }
    }
    out.push(')');
    if energy {
        let _ = write!(out, " + {:.3} J", e.energy);
    }
}

fn push_stale(out: &mut String, stale: Stale) {
    let _ = match stale {
        Stale::Unmeasured => write!(out, "never measured"),
        Stale::Few(n) => write!(out, "only {n} sample{}", if n == 1 { "" } else { "s" }),
        Stale::Unsettled => write!(out, "last sample far off"),
        Stale::NotSinceRestart => write!(out, "not measured since restart"),
        Stale::Old(age) => write!(out, "estimate {} s old", age.as_secs()),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn model() -> CostModel {
        CostModel::new(CostParams::default())
    }

    /// A cloud-connected idle board on mains power.
    fn online(rtt_ms: u64, mbps: f64) -> Conditions {
        Conditions {
            cpu_share: 1.0,
            rtt: Some(ms(rtt_ms)),
            bandwidth_mbps: Some(mbps),
            cloud_available: true,
            ..Conditions::default()
        }
    }

    fn local_run(run: Duration, share: f64, input: u64, output: u64) -> LocalRun {
        LocalRun {
            run,
            cpu_share: share,
            input_bytes: input,
            output_bytes: output,
        }
    }

    /// A cloud run whose total is exactly rtt + transfer at `mbps` + run.
    fn cloud_run(run: Duration, rtt: Duration, mbps: f64, input: u64, output: u64) -> CloudRun {
        let transfer = (input + output) as f64 * 8.0 / (mbps * 1e6);
        CloudRun {
            total: rtt + run + Duration::from_secs_f64(transfer),
            daemon_queue: Duration::ZERO,
            daemon_input: Duration::ZERO,
            daemon_run: run,
            rtt: Some(rtt),
            bandwidth_mbps: Some(mbps),
            download_mbps: None,
            input_bytes: input,
            output_bytes: output,
        }
    }

    /// Feeds `n` samples of each side, `now` advancing 1 s a sample.
    fn teach(
        m: &mut CostModel,
        task: &str,
        t0: Instant,
        n: u32,
        local: LocalRun,
        cloud: CloudRun,
    ) -> Instant {
        let mut now = t0;
        for _ in 0..n {
            now += Duration::from_secs(1);
            m.record_local(task, &local, now);
            m.record_cloud(task, &cloud, now);
        }
        now
    }

    fn close(a: Duration, b: Duration, tolerance: f64) -> bool {
        let (a, b) = (a.as_secs_f64(), b.as_secs_f64());
        (a - b).abs() <= tolerance * b.abs().max(1e-9)
    }

    #[test]
    fn ewma_converges_to_new_level() {
        let mut m = model();
        let t0 = Instant::now();
        let mut now = t0;
        for _ in 0..20 {
            now += Duration::from_secs(1);
            m.record_local("t", &local_run(ms(100), 1.0, 1000, 10), now);
        }
        let got = m.expected_local_run("t", None, 1.0).unwrap();
        assert!(close(got, ms(100), 1e-6), "{got:?}");
        // A lasting change is followed within a few samples, monotonically.
        let mut last = got;
        for i in 0..15 {
            now += Duration::from_secs(1);
            m.record_local("t", &local_run(ms(200), 1.0, 1000, 10), now);
            let est = m.expected_local_run("t", None, 1.0).unwrap();
            assert!(est > last && est <= ms(200), "step {i}: {est:?}");
            last = est;
        }
        assert!(close(last, ms(200), 0.01), "{last:?}");
        // One outlier moves a geometric average far less than the outlier.
        now += Duration::from_secs(1);
        m.record_local("t", &local_run(ms(2000), 1.0, 1000, 10), now);
        let est = m.expected_local_run("t", None, 1.0).unwrap();
        assert!(est < ms(450), "{est:?}");
    }

    #[test]
    fn local_estimate_scales_with_cpu_share() {
        let mut m = model();
        let now = Instant::now();
        // Measured at half a core: 200 ms, i.e. 100 ms of full-core time.
        m.record_local("t", &local_run(ms(200), 0.5, 100, 10), now);
        let idle = m.predict("t", Some(100), &Conditions::default(), now, 0.9);
        assert!(close(idle.local.run, ms(100), 1e-6), "{idle:?}");
        let busy = Conditions {
            cpu_share: 0.5,
            ..Conditions::default()
        };
        let half = m.predict("t", Some(100), &busy, now, 0.9);
        assert!(close(half.local.run, ms(200), 1e-6), "{half:?}");
        // The floor keeps a saturated board's estimate finite.
        let saturated = Conditions {
            cpu_share: 0.0,
            ..Conditions::default()
        };
        let p = m.predict("t", Some(100), &saturated, now, 0.9);
        assert!(close(p.local.run, ms(2000), 1e-6), "{p:?}");
    }

    #[test]
    fn data_heavy_on_slow_link_stays_local_cpu_heavy_on_fast_link_goes_to_cloud() {
        let t0 = Instant::now();
        // Data-heavy: 4 MB in, 40 ms locally, 10 ms in the cloud.
        let mut m = model();
        let big = 4_000_000;
        let now = teach(
            &mut m,
            "resize",
            t0,
            5,
            local_run(ms(40), 1.0, big, 1000),
            cloud_run(ms(10), ms(20), 50.0, big, 1000),
        );
        let slow = m.predict("resize", Some(big), &online(20, 2.0), now, 0.99);
        assert_eq!(slow.choice, Side::Local, "{}", slow.reason);
        let fast = m.predict("resize", Some(big), &online(2, 10_000.0), now, 0.99);
        assert_eq!(fast.choice, Side::Cloud, "{}", fast.reason);

        // CPU-heavy: tiny data, 500 ms locally, 50 ms in the cloud.
        let mut m = model();
        let now = teach(
            &mut m,
            "solve",
            t0,
            5,
            local_run(ms(500), 1.0, 200, 200),
            cloud_run(ms(50), ms(20), 50.0, 200, 200),
        );
        let p = m.predict("solve", Some(200), &online(20, 50.0), now, 0.99);
        assert_eq!(p.choice, Side::Cloud, "{}", p.reason);
        assert!(!p.explore);
        let cloud = p.cloud.unwrap();
        assert!(close(cloud.finish, ms(70), 0.01), "{cloud:?}");
    }

    #[test]
    fn queue_waits_shift_the_choice() {
        let t0 = Instant::now();
        let mut m = model();
        let now = teach(
            &mut m,
            "t",
            t0,
            5,
            local_run(ms(60), 1.0, 100, 100),
            cloud_run(ms(20), ms(20), 50.0, 100, 100),
        );
        let base = online(20, 50.0);
        assert_eq!(m.predict("t", None, &base, now, 0.99).choice, Side::Cloud);
        let daemon_busy = Conditions {
            cloud_queue_wait: ms(100),
            ..base.clone()
        };
        let p = m.predict("t", None, &daemon_busy, now, 0.99);
        assert_eq!(p.choice, Side::Local, "{}", p.reason);
        let both_busy = Conditions {
            local_queue_wait: ms(200),
            ..daemon_busy
        };
        let p = m.predict("t", None, &both_busy, now, 0.99);
        assert_eq!(p.choice, Side::Cloud, "{}", p.reason);
        assert_eq!(p.local.queue, ms(200));
        assert_eq!(p.cloud.unwrap().queue, ms(100));
    }

    #[test]
    fn queue_wait_helper() {
        assert_eq!(queue_wait(1, 0, 2, ms(100)), Duration::ZERO);
        assert_eq!(queue_wait(2, 0, 2, ms(100)), ms(50));
        assert_eq!(queue_wait(2, 3, 2, ms(100)), ms(200));
        assert_eq!(queue_wait(1, 0, 0, ms(100)), ms(100));
        assert_eq!(
            queue_wait(u32::MAX, u32::MAX, 1, ms(100)).as_secs(),
            858_993_459
        );
    }

    #[test]
    fn cpu_share_helper() {
        // A free core is a full share, even when other cores are busy.
        assert_eq!(available_cpu_share(50.0, 2, None), 1.0);
        assert!((available_cpu_share(80.0, 2, None) - 0.4).abs() < 1e-9);
        // Saturated: fair share among the runnable tasks and this one.
        assert!((available_cpu_share(100.0, 2, Some(3.0)) - 0.5).abs() < 1e-9);
        assert_eq!(available_cpu_share(100.0, 1, None), MIN_CPU_SHARE);
        assert_eq!(available_cpu_share(f64::NAN, 4, Some(f64::NAN)), 1.0);
    }

    #[test]
    fn on_battery_energy_moves_borderline_tasks() {
        let t0 = Instant::now();
        // Borderline CPU task: 40 ms locally (0.08 J), 45 ms via the cloud (~0 J).
        let mut m = model();
        let now = teach(
            &mut m,
            "cpu",
            t0,
            5,
            local_run(ms(40), 1.0, 100, 100),
            cloud_run(ms(35), ms(10), 100.0, 100, 100),
        );
        let mains = online(10, 100.0);
        let p = m.predict("cpu", None, &mains, now, 0.99);
        assert_eq!(p.choice, Side::Local, "{}", p.reason);
        let battery = Conditions {
            on_battery: true,
            ..mains.clone()
        };
        let p = m.predict("cpu", None, &battery, now, 0.99);
        assert_eq!(p.choice, Side::Cloud, "{}", p.reason);
        assert!((p.local.energy_j - 0.08).abs() < 1e-6, "{:?}", p.local);
        assert!(
            p.reason.ends_with("; on battery, 1 J = 1000 ms"),
            "{}",
            p.reason
        );

        // Borderline data task: 100 ms locally (0.2 J), 90 ms to move 5 MB (2.5 J).
        let mut m = model();
        let mb5 = 5_000_000;
        let now = teach(
            &mut m,
            "data",
            t0,
            5,
            local_run(ms(100), 1.0, mb5, 0),
            cloud_run(ms(5), ms(5), 500.0, mb5, 0),
        );
        let mains = online(5, 500.0);
        let p = m.predict("data", None, &mains, now, 0.99);
        assert_eq!(p.choice, Side::Cloud, "{}", p.reason);
        let battery = Conditions {
            on_battery: true,
            ..mains
        };
        let p = m.predict("data", None, &battery, now, 0.99);
        assert_eq!(p.choice, Side::Local, "{}", p.reason);
        assert!((p.cloud.unwrap().energy_j - 2.5).abs() < 1e-6);
    }

    #[test]
    fn stale_side_is_explored_at_about_explore_rate() {
        let t0 = Instant::now();
        let mut m = model();
        // Local 100 ms, cloud 50 ms + 10 ms rtt: cloud is chosen, local explored.
        let now = teach(
            &mut m,
            "t",
            t0,
            5,
            local_run(ms(100), 1.0, 100, 100),
            cloud_run(ms(50), ms(10), 1000.0, 100, 100),
        );
        let c = online(10, 1000.0);
        let count = |m: &CostModel, now: Instant| {
            (0..10_000)
                .filter(|i| {
                    let draw = (*i as f64 + 0.5) / 10_000.0;
                    let p = m.predict("t", None, &c, now, draw);
                    if p.explore {
                        assert_eq!(p.choice, Side::Local);
                        assert!(p.reason.starts_with("auto: local (exploring: "));
                    }
                    p.explore
                })
                .count()
        };
        // Fresh: never explored.
        assert_eq!(count(&m, now), 0);
        // Stale: explore_rate scaled by cost ratio (60 / 100).
        let later = now + Duration::from_secs(61);
        let explored = count(&m, later);
        let expected = 0.05 * 0.6 * 10_000.0;
        assert!(
            (explored as f64 - expected).abs() <= 2.0,
            "{explored} vs {expected}"
        );
        let p = m.predict("t", None, &c, later, 0.0);
        assert!(
            p.reason
                .starts_with("auto: local (exploring: estimate 61 s old, p 3.0%): "),
            "{}",
            p.reason
        );
        // Pseudo-random draws give about the same rate.
        let mut rng = Lcg(7);
        let hits = (0..20_000)
            .filter(|_| m.predict("t", None, &c, later, rng.next()).explore)
            .count();
        assert!((hits as f64 / 20_000.0 - 0.03).abs() < 0.006, "{hits}");
        // Once re-sampled, it is fresh again.
        m.record_local("t", &local_run(ms(100), 1.0, 100, 100), later);
        assert_eq!(count(&m, later), 0);
        // A sample far off its estimate makes the side stale at once.
        m.record_local("t", &local_run(ms(20), 1.0, 100, 100), later);
        let p = m.predict("t", None, &c, later, 0.0);
        assert!(
            p.reason.contains("(exploring: last sample far off"),
            "{}",
            p.reason
        );
    }

    /// Decisions over `secs` seconds, one a second, in a world where local takes
    /// `local_ms` and the cloud `cloud_ms` (all of it run, 1 Mbit/s reported exactly);
    /// `draw` for every decision. Returns the decisions that explored.
    fn explorations(local_ms: u64, cloud_ms: u64, secs: u64, draw: f64) -> Vec<String> {
        let t0 = Instant::now();
        let mut m = model();
        let c = Conditions {
            bandwidth_sd: 0.0,
            ..online(0, 1.0)
        };
        let mut now = teach(
            &mut m,
            "t",
            t0,
            3,
            local_run(ms(local_ms), 1.0, 10, 10),
            cloud_run(ms(cloud_ms), ms(0), 1.0, 10, 10),
        );
        let mut explored = Vec::new();
        for _ in 0..secs {
            now += Duration::from_secs(1);
            let p = m.predict("t", None, &c, now, draw);
            match p.choice {
                Side::Local => m.record_local("t", &local_run(ms(local_ms), 1.0, 10, 10), now),
                Side::Cloud => {
                    m.record_cloud("t", &cloud_run(ms(cloud_ms), ms(0), 1.0, 10, 10), now)
                }
            }
            if p.explore {
                explored.push(p.reason);
            }
        }
        explored
    }

    #[test]
    fn exploring_a_side_that_is_surely_worse_is_rare_and_bounded() {
        // 3× worse: re-sampled only once its estimate is old enough to be doubted
        // (about 9 minutes; by the guard or a draw, whichever comes first).
        let over_hour = explorations(100, 300, 3600, 0.0);
        assert!(
            (2..=8).contains(&over_hour.len()),
            "{} explorations: {over_hour:#?}",
            over_hour.len()
        );
        assert!(
            over_hour
                .iter()
                .all(|r| r.starts_with("auto: cloud (exploring: ")),
            "{over_hour:#?}"
        );
        // 20× worse: at most once an hour.
        let far = explorations(100, 2000, 3600, 0.0);
        assert!(far.len() <= 1, "{far:#?}");
        // Sure and fresh (re-measured every few minutes by the schedule above): the
        // first ten minutes after three samples explore nothing.
        assert!(explorations(100, 300, 500, 0.0).is_empty());
        // Without lucky draws, the guard alone re-samples it as rarely.
        let guarded = explorations(100, 300, 3600, 0.999);
        assert!(
            (1..=over_hour.len()).contains(&guarded.len()),
            "{guarded:#?}"
        );
    }

    #[test]
    fn the_guard_samples_a_plausible_side_on_a_doubling_schedule() {
        // Cloud 120 ms vs local 100 ms: close enough to doubt, never picked by the
        // (high) draws. The guard samples it after 8, 16, 32, ... local runs in a row.
        let guarded = explorations(100, 120, 2000, 0.999);
        assert!(!guarded.is_empty());
        assert!(
            guarded
                .iter()
                .all(|r| r.starts_with("auto: cloud (exploring: ")
                    && r.contains("runs in a row on the local, cloud could be faster")),
            "{guarded:#?}"
        );
        // Bounded: about log2(2000 / 8) samples, not a fixed fraction of 2000.
        assert!(
            guarded.len() <= 9,
            "{} guard samples: {guarded:#?}",
            guarded.len()
        );
        let first: Vec<&str> = guarded
            .iter()
            .map(|r| &r[..r.find(" runs").unwrap()])
            .collect();
        assert_eq!(
            first[..3],
            [
                "auto: cloud (exploring: 8",
                "auto: cloud (exploring: 16",
                "auto: cloud (exploring: 32"
            ]
        );
        // A side that really is better is found by the first guard sample and kept.
        let t0 = Instant::now();
        let mut m = model();
        let c = online(0, 1.0);
        let mut now = teach(
            &mut m,
            "t",
            t0,
            3,
            local_run(ms(100), 1.0, 10, 10),
            cloud_run(ms(120), ms(0), 1.0, 10, 10),
        );
        let mut sides = Vec::new();
        for _ in 0..40 {
            now += Duration::from_secs(1);
            let p = m.predict("t", None, &c, now, 0.999);
            match p.choice {
                Side::Local => m.record_local("t", &local_run(ms(100), 1.0, 10, 10), now),
                // The cloud got faster since it was last measured.
                Side::Cloud => m.record_cloud("t", &cloud_run(ms(40), ms(0), 1.0, 10, 10), now),
            }
            sides.push(p.choice);
        }
        let first_cloud = sides.iter().position(|s| *s == Side::Cloud).unwrap();
        assert!(first_cloud <= GUARD_RUNS as usize, "{sides:?}");
        assert!(
            sides[first_cloud + 2..].iter().all(|s| *s == Side::Cloud),
            "{sides:?}"
        );
    }

    #[test]
    fn an_unmeasured_link_is_explored_once_and_then_trusted() {
        // The issue's lock-out: a 30 MB input, local 19 s at 30 % cpu, the cloud never
        // tried and no link figure (a 10 Mbit/s guess says 24 s of transfer).
        let t0 = Instant::now();
        let mut m = model();
        let big = 30_000_000;
        for i in 0..3 {
            m.record_local(
                "xz",
                &local_run(ms(19_000), 0.3, big, big / 4),
                t0 + Duration::from_secs(i),
            );
        }
        let c = Conditions {
            cpu_share: 0.3,
            bandwidth_mbps: None,
            ..online(20, 0.0)
        };
        let now = t0 + Duration::from_secs(10);
        // With a link probe on its way, no task is sent out just to measure the link.
        let probing = Conditions {
            link_probing: true,
            ..c.clone()
        };
        let p = m.predict("xz", Some(big), &probing, now, 0.999);
        assert!(!p.reason.contains("link speed"), "{}", p.reason);
        let p = m.predict("xz", Some(big), &c, now, 0.999);
        assert_eq!(p.choice, Side::Cloud, "{}", p.reason);
        assert!(p.explore);
        assert!(
            p.reason
                .starts_with("auto: cloud (exploring: link speed unmeasured, transfer could be "),
            "{}",
            p.reason
        );
        // The cloud run shows a 25 Mbit/s link each way and a 5.7 s run.
        let transfer = (big + big / 4) as f64 * 8.0 / 25e6;
        let run = CloudRun {
            total: ms(20) + ms(5_700) + Duration::from_secs_f64(transfer),
            daemon_queue: Duration::ZERO,
            daemon_input: Duration::ZERO,
            daemon_run: ms(5_700),
            rtt: Some(ms(20)),
            bandwidth_mbps: None,
            download_mbps: None,
            input_bytes: big,
            output_bytes: big / 4,
        };
        m.record_cloud("xz", &run, now);
        let link = m.observed_link().up.get(now).unwrap();
        assert!((link.mbps - 25.0).abs() < 0.5, "{link:?}");
        assert!(link.is_sure(), "{link:?}");
        // Now the cloud wins on its merits, and the link is not explored again.
        for i in 1..20 {
            let p = m.predict("xz", Some(big), &c, now + Duration::from_secs(i), 0.999);
            assert_eq!(p.choice, Side::Cloud, "{}", p.reason);
            assert!(!p.explore, "{}", p.reason);
        }
        // A link that is unsure but does not matter (a tiny input) is not explored.
        let mut m = model();
        for i in 0..3 {
            m.record_local(
                "tiny",
                &local_run(ms(5), 1.0, 100, 32),
                t0 + Duration::from_secs(i),
            );
        }
        let p = m.predict("tiny", Some(100), &online(200, 0.0), now, 0.999);
        assert_eq!(p.choice, Side::Local, "{}", p.reason);
        assert!(!p.explore, "{}", p.reason);
    }

    #[test]
    fn an_unknown_task_runs_first_where_a_typical_one_would_finish_first() {
        let t0 = Instant::now();
        // Nothing measured yet: a typical task is 10 ms at a full core. An idle board
        // (10 ms) beats the cloud (10 ms away, 10 ms of run): the first run stays local.
        let p = model().predict("new", Some(1000), &online(10, 100.0), t0, 0.99);
        assert_eq!(p.choice, Side::Local, "{}", p.reason);
        assert!(p.explore);
        assert_eq!(
            p.reason,
            "auto: local (exploring: first run; a typical task here takes ~10 ms on the board now, ~20 ms in the cloud)"
        );
        // A board at a quarter of a core takes 40 ms: the first run is offloaded.
        let throttled = Conditions {
            cpu_share: 0.25,
            ..online(10, 100.0)
        };
        let p = model().predict("new", Some(1000), &throttled, t0, 0.99);
        assert_eq!(p.choice, Side::Cloud, "{}", p.reason);
        assert!(
            p.reason.starts_with("auto: cloud (exploring: first run; "),
            "{}",
            p.reason
        );
        // Unless moving its data takes longer than the board would (4 MB at 8 Mbit/s).
        let slow_link = Conditions {
            cpu_share: 0.25,
            ..online(10, 8.0)
        };
        let p = model().predict("new", Some(4_000_000), &slow_link, t0, 0.99);
        assert_eq!(p.choice, Side::Local, "{}", p.reason);
        // Or the round trip alone does: 300 ms.
        let far = Conditions {
            cpu_share: 0.25,
            ..online(300, 100.0)
        };
        let p = model().predict("new", Some(1000), &far, t0, 0.99);
        assert_eq!(p.choice, Side::Local, "{}", p.reason);
        // What the agent has measured of other tasks is the typical task: tiny ones keep
        // even a throttled board's first runs local, long ones send them out.
        let mut tiny = model();
        tiny.record_local("other", &local_run(ms(2), 0.25, 100, 10), t0);
        let p = tiny.predict("new", Some(1000), &throttled, t0, 0.99);
        assert_eq!(p.choice, Side::Local, "{}", p.reason);
        let mut long = model();
        long.record_local("other", &local_run(ms(800), 1.0, 100, 10), t0);
        let p = long.predict("new", Some(1000), &online(150, 100.0), t0, 0.99);
        assert_eq!(p.choice, Side::Local, "an idle board: {}", p.reason);
        let p = long.predict(
            "new",
            Some(1000),
            &Conditions {
                cpu_share: 0.5,
                ..online(150, 100.0)
            },
            t0,
            0.99,
        );
        assert_eq!(p.choice, Side::Cloud, "{}", p.reason);
    }

    #[test]
    fn after_a_first_cloud_run_local_is_measured() {
        let mut m = model();
        let t0 = Instant::now();
        let c = online(10, 100.0);
        m.record_cloud("new", &cloud_run(ms(30), ms(10), 100.0, 1000, 10), t0);
        // Local's prior (the cloud's run at the default speed ratio) looks cheaper.
        let p = m.predict("new", Some(1000), &c, t0, 0.99);
        assert_eq!(p.choice, Side::Local, "{}", p.reason);
        assert!(!p.explore);
        assert!(
            p.reason
                .starts_with("auto: local ~30 ms (run 30 at 100% cpu + queue 0) < cloud 40 ms"),
            "{}",
            p.reason
        );
        // On a half-busy board it looks dearer, but within 2×: measured anyway.
        let busy = Conditions {
            cpu_share: 0.5,
            ..c.clone()
        };
        let p = m.predict("new", Some(1000), &busy, t0, 0.99);
        assert_eq!(p.choice, Side::Local, "{}", p.reason);
        assert!(p.explore);
        assert!(
            p.reason.starts_with(
                "auto: local (exploring: no local run yet): local ~60 ms (run 60 at 50% cpu"
            ),
            "{}",
            p.reason
        );
        // Once measured both ways, the measurements decide.
        m.record_local("new", &local_run(ms(90), 1.0, 1000, 10), t0);
        let p = m.predict("new", Some(1000), &c, t0, 0.99);
        assert_eq!(p.choice, Side::Cloud, "{}", p.reason);

        // Without a cloud, the first run is local.
        let p = model().predict("new", None, &Conditions::default(), t0, 0.0);
        assert_eq!(p.choice, Side::Local);
        assert_eq!(p.reason, "auto: local (cloud unavailable)");

        // A side never measured whose prior is far worse is not forced.
        let mut m = model();
        let big = 50_000_000;
        m.record_local("big", &local_run(ms(20), 1.0, big, 10), t0);
        let p = m.predict("big", Some(big), &online(10, 10.0), t0, 0.99);
        assert_eq!(p.choice, Side::Local, "{}", p.reason);
        assert!(!p.explore);
    }

    #[test]
    fn cloud_unavailable_means_local() {
        let t0 = Instant::now();
        let mut m = model();
        let now = teach(
            &mut m,
            "t",
            t0,
            5,
            local_run(ms(500), 1.0, 100, 100),
            cloud_run(ms(5), ms(5), 100.0, 100, 100),
        );
        let offline = Conditions {
            cloud_available: false,
            ..online(5, 100.0)
        };
        for draw in [0.0, 0.5, 0.999] {
            let p = m.predict("t", None, &offline, now + Duration::from_secs(3600), draw);
            assert_eq!(p.choice, Side::Local);
            assert!(p.cloud.is_none());
            assert!(!p.explore);
            assert_eq!(
                p.reason,
                "auto: local (cloud unavailable): local 500 ms (run 500 at 100% cpu + queue 0)"
            );
        }
    }

    #[test]
    fn reason_is_short_and_exact() {
        let t0 = Instant::now();
        let mut m = model();
        let now = teach(
            &mut m,
            "t",
            t0,
            5,
            local_run(ms(100), 1.0, 100_000, 0),
            cloud_run(ms(14), ms(20), 100.0, 100_000, 0),
        );
        let c = Conditions {
            cpu_share: 100.0 / 120.0,
            local_queue_wait: ms(20),
            cloud_queue_wait: ms(0),
            ..online(20, 100.0)
        };
        let p = m.predict("t", None, &c, now, 0.99);
        assert_eq!(
            p.reason,
            "auto: cloud 42 ms (rtt 20 + transfer 8.0 + queue 0 + run 14) \
             < local 140 ms (run 120 at 83% cpu + queue 20)"
        );
        assert_eq!(p.cloud.unwrap().network, ms(28));
        // Long predictions switch to seconds.
        let slow = Conditions {
            bandwidth_mbps: Some(0.05),
            ..c
        };
        let p = m.predict("t", None, &slow, now, 0.99);
        assert_eq!(
            p.reason,
            "auto: local 140 ms (run 120 at 83% cpu + queue 20) \
             < cloud 16.0 s (rtt 0.0 + transfer 16.0 + queue 0 + run 0.0)"
        );
    }

    #[test]
    fn sizes_are_fitted_when_inputs_vary() {
        let t0 = Instant::now();
        let mut m = model();
        let mut now = t0;
        // Local run and output proportional to input: 1 ms per KB.
        for i in 0..30u64 {
            now += Duration::from_secs(1);
            let kb = if i % 2 == 0 { 10 } else { 1000 };
            m.record_local("t", &local_run(ms(kb), 1.0, kb * 1000, kb * 500), now);
        }
        let small = m.expected_local_run("t", Some(10_000), 1.0).unwrap();
        let large = m.expected_local_run("t", Some(1_000_000), 1.0).unwrap();
        let larger = m.expected_local_run("t", Some(4_000_000), 1.0).unwrap();
        assert!(close(small, ms(10), 0.05), "{small:?}");
        assert!(close(large, ms(1000), 0.05), "{large:?}");
        assert!(close(larger, ms(4000), 0.05), "{larger:?}");
        let s = &m.tasks["t"];
        let out = exp_bytes(s.output.at(ln_bytes(4_000_000.0)));
        assert!((out / 2_000_000.0 - 1.0).abs() < 0.05, "{out}");
    }

    #[test]
    fn bandwidth_is_learnt_from_large_transfers() {
        let t0 = Instant::now();
        let mut m = model();
        assert_eq!(m.observed_bandwidth_mbps(), None);
        // 1 MB each way at 8 Mbps = 2 s, after 50 ms rtt and 100 ms of run.
        let run = CloudRun {
            total: ms(2150),
            daemon_queue: Duration::ZERO,
            daemon_input: Duration::ZERO,
            daemon_run: ms(100),
            rtt: Some(ms(50)),
            bandwidth_mbps: None,
            download_mbps: None,
            input_bytes: 1_000_000,
            output_bytes: 1_000_000,
        };
        m.record_cloud("t", &run, t0);
        let bw = m.observed_bandwidth_mbps().unwrap();
        assert!((bw - 8.0).abs() < 1e-6, "{bw}");
        // Used when the agent has no figure: predicts the same total again.
        let c = Conditions {
            bandwidth_mbps: None,
            ..online(50, 0.0)
        };
        let p = m.predict("t", None, &c, t0, 0.99);
        assert!(close(p.cloud.unwrap().finish, ms(2150), 1e-6), "{p:?}");
        assert_eq!(m.typical_cloud_run().map(|d| d.as_millis()), Some(100));
        // Small transfers are not bandwidth samples.
        let small = CloudRun {
            total: ms(60),
            daemon_run: ms(5),
            input_bytes: 10,
            output_bytes: 10,
            ..run
        };
        m.record_cloud("u", &small, t0);
        assert!((m.observed_bandwidth_mbps().unwrap() - 8.0).abs() < 1e-6);
        // The per-task correction absorbs what the bandwidth figure does not explain.
        let slow_proto = CloudRun {
            total: ms(80),
            ..small
        };
        for i in 0..20 {
            m.record_cloud("v", &slow_proto, t0 + Duration::from_secs(i));
        }
        let p = m.predict("v", None, &online(50, 100.0), t0, 0.99);
        assert!(close(p.cloud.unwrap().finish, ms(80), 0.01), "{p:?}");
    }

    #[test]
    fn upload_time_is_priced_as_transfer_not_queueing() {
        let t0 = Instant::now();
        // 1 MB each way at 8 Mbps = 2 s, after 50 ms rtt and 100 ms of run; the daemon
        // took 1 s of that receiving the input and queued it for no time.
        let trailer = Trailer {
            exit_code: Some(0),
            input_bytes: 1_000_000,
            output_bytes: 1_000_000,
            timings: crate::Timings {
                queue_us: 0,
                run_us: 100_000,
                input_us: 1_000_000,
            },
            ..Default::default()
        };
        let run = CloudRun::from_trailer(ms(2150), Some(ms(50)), None, &trailer);
        assert_eq!(run.daemon_input, ms(1000));
        assert_eq!(run.daemon_queue, Duration::ZERO);
        let mut m = model();
        m.record_cloud("t", &run, t0);
        // The upload is transfer: the link is learnt at its true 8 Mbps (counted as
        // queueing it would have looked twice as fast), and no queue is predicted.
        let bw = m.observed_bandwidth_mbps().unwrap();
        assert!((bw - 8.0).abs() < 1e-6, "{bw}");
        let c = Conditions {
            bandwidth_mbps: None,
            ..online(50, 0.0)
        };
        let p = m.predict("t", None, &c, t0, 0.99).cloud.unwrap();
        assert_eq!(p.queue, Duration::ZERO);
        assert!(close(p.finish, ms(2150), 1e-6), "{p:?}");
        // Whatever the clocks, the network share is at least the daemon's input time.
        let skewed = CloudRun {
            total: ms(900),
            ..run
        };
        let mut m = model();
        m.record_cloud("t", &skewed, t0);
        let bw = m.observed_bandwidth_mbps().unwrap();
        assert!(bw < 17.0, "{bw}");
    }

    #[test]
    fn snapshot_restore_round_trip() {
        let t0 = Instant::now();
        let mut m = model();
        let now = teach(
            &mut m,
            "a",
            t0,
            5,
            local_run(ms(80), 0.5, 5000, 100),
            cloud_run(ms(20), ms(10), 100.0, 5000, 100),
        );
        m.record_cloud("b", &cloud_run(ms(7), ms(10), 100.0, 200_000, 10), now);
        let snap = m.snapshot(t0);
        assert_eq!(snap["version"], 1);
        let r = CostModel::restore(&snap, CostParams::default(), t0, Duration::ZERO).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r.snapshot(t0), snap);
        let c = online(10, 100.0);
        for task in ["a", "b"] {
            let before = m.predict(task, None, &c, now, 0.99);
            let after = r.predict(task, None, &c, now, 0.99);
            assert_eq!(before.local, after.local);
            assert_eq!(before.cloud, after.cloud);
        }
        // Through text, as it is stored (floats may come back an ulp off).
        let text = serde_json::to_string(&snap).unwrap();
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        let t = CostModel::restore(&back, CostParams::default(), t0, Duration::ZERO).unwrap();
        for task in ["a", "b"] {
            let before = m.predict(task, None, &c, now, 0.99);
            let after = t.predict(task, None, &c, now, 0.99);
            assert!(close(after.local.finish, before.local.finish, 1e-9));
            let (a, b) = (after.cloud.unwrap(), before.cloud.unwrap());
            assert!(close(a.finish, b.finish, 1e-9));
            assert_eq!(after.choice, before.choice);
        }
        // Everything is stale after a restore.
        let p = r.predict("a", None, &c, now, 0.0);
        assert!(p.explore, "{}", p.reason);
        assert!(
            p.reason.contains("not measured since restart"),
            "{}",
            p.reason
        );
        assert_eq!(r.observed_bandwidth_mbps(), m.observed_bandwidth_mbps());

        // Tolerant: bad entries are dropped, unknown fields ignored.
        let mut odd = snap.clone();
        odd["tasks"]["bad name!"] = snap["tasks"]["a"].clone();
        odd["tasks"]["c"] = serde_json::json!({"local": "nonsense"});
        odd["tasks"]["d"] = serde_json::json!({"future_field": 1});
        odd["extra"] = serde_json::json!(true);
        let r = CostModel::restore(&odd, CostParams::default(), t0, Duration::ZERO).unwrap();
        assert!(r.knows("a") && r.knows("b") && r.knows("d"));
        assert!(!r.knows("c") && !r.knows("bad name!"));
        // Wrong version or shape: an error, and the caller starts afresh.
        let mut v2 = snap.clone();
        v2["version"] = serde_json::json!(2);
        assert_eq!(
            CostModel::restore(&v2, CostParams::default(), t0, Duration::ZERO).unwrap_err(),
            RestoreError::Version(2)
        );
        assert!(matches!(
            CostModel::restore(
                &serde_json::json!([1, 2]),
                CostParams::default(),
                t0,
                Duration::ZERO
            ),
            Err(RestoreError::Malformed(_))
        ));
    }

    #[test]
    fn task_count_is_bounded_least_recently_measured_goes() {
        let t0 = Instant::now();
        let mut m = model();
        let run = local_run(ms(10), 1.0, 10, 10);
        for i in 0..MAX_TASKS + 10 {
            m.record_local(&format!("t{i}"), &run, t0);
            if i % 100 == 0 {
                // "t0" stays recent.
                m.record_local("t0", &run, t0);
            }
        }
        assert_eq!(m.len(), MAX_TASKS);
        assert!(m.knows("t0"));
        assert!(!m.knows("t1"));
        assert!(m.knows(&format!("t{}", MAX_TASKS + 9)));

        // Restore keeps the most recent MAX_TASKS too.
        let mut snap = m.snapshot(t0);
        for i in 0..20 {
            snap["tasks"][format!("old{i}")] = serde_json::json!({"touch": 0});
        }
        let r = CostModel::restore(&snap, CostParams::default(), t0, Duration::ZERO).unwrap();
        assert_eq!(r.len(), MAX_TASKS);
        assert!(!r.knows("old0"));
        m.retain_tasks(|name| name == "t0");
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn params_validate_and_sanitize() {
        assert_eq!(CostParams::default().validate(), Ok(()));
        let bad = CostParams {
            explore_rate: 1.5,
            ..CostParams::default()
        };
        assert_eq!(bad.validate(), Err(CostParamsError::ExploreRate(1.5)));
        let bad = CostParams {
            smoothing: 0.0,
            cpu_watts: f64::NAN,
            ..CostParams::default()
        };
        assert_eq!(bad.validate(), Err(CostParamsError::Smoothing(0.0)));
        let m = CostModel::new(bad);
        assert_eq!(m.params(), &CostParams::default());
    }

    #[test]
    fn params_errors_name_the_key_and_the_value() {
        let text = |p: CostParams| p.validate().unwrap_err().to_string();
        let d = CostParams::default;
        assert_eq!(
            text(CostParams {
                explore_rate: 1.5,
                ..d()
            }),
            "`explore_rate` must be between 0 and 1, got 1.5"
        );
        assert_eq!(
            text(CostParams {
                stale_after: Duration::ZERO,
                ..d()
            }),
            "`stale_after` must be longer than zero"
        );
        assert_eq!(
            text(CostParams {
                smoothing: 0.0,
                ..d()
            }),
            "`smoothing` must be above 0 and at most 1, got 0"
        );
        assert_eq!(
            text(CostParams {
                radio_joules_per_mb: -1.0,
                ..d()
            }),
            "`radio_joules_per_mb` must be a number >= 0, got -1"
        );
        assert_eq!(
            text(CostParams {
                energy_weight: f64::NAN,
                ..d()
            }),
            "`energy_weight` must be a number >= 0, got NaN"
        );
    }

    #[test]
    fn many_predictions_are_consistent() {
        let t0 = Instant::now();
        let mut m = model();
        let now = teach(
            &mut m,
            "t",
            t0,
            5,
            local_run(ms(30), 1.0, 1000, 100),
            cloud_run(ms(10), ms(10), 100.0, 1000, 100),
        );
        let c = online(10, 100.0);
        let first = m.predict("t", None, &c, now, 0.5);
        for i in 0..100_000u32 {
            let p = m.predict("t", None, &c, now, 0.5);
            assert_eq!(p, first, "call {i}");
        }
        assert_eq!(first.choice, Side::Cloud);
    }

    /// Deterministic pseudo-random numbers in [0, 1) (an LCG: plenty for draws and noise).
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> f64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// A phase of a synthetic day: the true costs of one task.
    #[derive(Clone, Copy)]
    struct World {
        local_full_ms: f64,
        cloud_run_ms: f64,
        rtt_ms: f64,
        mbps: f64,
        share: f64,
        input: u64,
        output: u64,
    }

    impl World {
        fn local_ms(&self) -> f64 {
            self.local_full_ms / self.share
        }

        /// Protocol overhead of 0.5 ms on top of rtt, transfer and run.
        fn cloud_ms(&self) -> f64 {
            self.rtt_ms
                + (self.input + self.output) as f64 * 8.0 / (self.mbps * 1e3)
                + self.cloud_run_ms
                + 0.5
        }

        fn best(&self) -> Side {
            if self.cloud_ms() < self.local_ms() {
                Side::Cloud
            } else {
                Side::Local
            }
        }
    }

    #[derive(Debug, Default)]
    struct Tally {
        decisions: usize,
        right_after_warmup: usize,
        after_warmup: usize,
        auto_ms: f64,
        oracle_ms: f64,
        local_ms: f64,
        cloud_ms: f64,
    }

    /// Runs each phase for `n` decisions, one a second, feeding the model the noisy
    /// (±10 %) outcome of its own choices. Decisions in the first `warmup` of a phase
    /// are not judged.
    fn simulate(phases: &[World], n: usize, warmup: usize) -> Vec<Tally> {
        let mut m = model();
        let mut rng = Lcg(42);
        let mut now = Instant::now();
        let mut tallies = Vec::new();
        for w in phases {
            let mut t = Tally::default();
            let c = Conditions {
                cpu_share: w.share,
                rtt: Some(Duration::from_secs_f64(w.rtt_ms / 1e3)),
                bandwidth_mbps: Some(w.mbps),
                cloud_available: true,
                ..Conditions::default()
            };
            for i in 0..n {
                now += Duration::from_secs(1);
                let p = m.predict("job", Some(w.input), &c, now, rng.next());
                let noise_l = 0.9 + 0.2 * rng.next();
                let noise_c = 0.9 + 0.2 * rng.next();
                let local_ms = w.local_ms() * noise_l;
                let cloud_ms = w.cloud_ms() - w.cloud_run_ms * (1.0 - noise_c);
                let took = match p.choice {
                    Side::Local => {
                        let run = Duration::from_secs_f64(local_ms / 1e3);
                        m.record_local("job", &local_run(run, w.share, w.input, w.output), now);
                        local_ms
                    }
                    Side::Cloud => {
                        let run = CloudRun {
                            total: Duration::from_secs_f64(cloud_ms / 1e3),
                            daemon_queue: Duration::ZERO,
                            daemon_input: Duration::ZERO,
                            daemon_run: Duration::from_secs_f64(w.cloud_run_ms * noise_c / 1e3),
                            rtt: c.rtt,
                            bandwidth_mbps: c.bandwidth_mbps,
                            download_mbps: None,
                            input_bytes: w.input,
                            output_bytes: w.output,
                        };
                        m.record_cloud("job", &run, now);
                        cloud_ms
                    }
                };
                t.decisions += 1;
                if i >= warmup {
                    t.after_warmup += 1;
                    if p.choice == w.best() {
                        t.right_after_warmup += 1;
                    }
                }
                t.auto_ms += took;
                t.oracle_ms += local_ms.min(cloud_ms);
                t.local_ms += local_ms;
                t.cloud_ms += cloud_ms;
            }
            tallies.push(t);
        }
        tallies
    }

    fn check_adapts(phases: &[World]) {
        let tallies = simulate(phases, 300, 10);
        let (mut auto, mut oracle, mut local, mut cloud) = (0.0, 0.0, 0.0, 0.0);
        for (i, t) in tallies.iter().enumerate() {
            let right = t.right_after_warmup as f64 / t.after_warmup as f64;
            assert!(right >= 0.9, "phase {i}: right {right:.3}: {t:?}");
            auto += t.auto_ms;
            oracle += t.oracle_ms;
            local += t.local_ms;
            cloud += t.cloud_ms;
        }
        assert!(
            auto <= 1.10 * oracle,
            "auto {auto:.0} ms, oracle {oracle:.0} ms"
        );
        assert!(auto < local && auto < cloud, "{tallies:?}");
    }

    #[test]
    fn simulation_adapts_when_rtt_jumps() {
        // 50 ms locally, 10 ms in the cloud; the link's RTT goes from 5 to 400 ms.
        let fast = World {
            local_full_ms: 50.0,
            cloud_run_ms: 10.0,
            rtt_ms: 5.0,
            mbps: 50.0,
            share: 1.0,
            input: 10_000,
            output: 1_000,
        };
        let slow = World {
            rtt_ms: 400.0,
            ..fast
        };
        check_adapts(&[fast, slow]);
        check_adapts(&[slow, fast]);
    }

    #[test]
    fn simulation_adapts_when_board_gets_busy() {
        // 30 ms locally at a full core, ~41 ms via the cloud; then the board is loaded.
        let idle = World {
            local_full_ms: 30.0,
            cloud_run_ms: 20.0,
            rtt_ms: 20.0,
            mbps: 50.0,
            share: 1.0,
            input: 2_000,
            output: 2_000,
        };
        let busy = World { share: 0.2, ..idle };
        check_adapts(&[idle, busy]);
        check_adapts(&[busy, idle]);
    }

    #[test]
    fn simulation_adapts_when_bandwidth_drops() {
        // 2 MB in: ~230 ms via a 100 Mbps link against 300 ms locally; then 2 Mbps.
        let good = World {
            local_full_ms: 300.0,
            cloud_run_ms: 50.0,
            rtt_ms: 10.0,
            mbps: 100.0,
            share: 1.0,
            input: 2_000_000,
            output: 10_000,
        };
        let poor = World { mbps: 2.0, ..good };
        check_adapts(&[good, poor]);
        check_adapts(&[poor, good]);
    }

    #[test]
    fn simulation_discovers_a_silently_faster_cloud() {
        // Nothing the agent measures changes, but the daemon gets 20× faster: only
        // exploration can notice. Bounded: it must switch within the phase and stay.
        let slow_cloud = World {
            local_full_ms: 50.0,
            cloud_run_ms: 200.0,
            rtt_ms: 5.0,
            mbps: 100.0,
            share: 1.0,
            input: 1_000,
            output: 1_000,
        };
        let fast_cloud = World {
            cloud_run_ms: 10.0,
            ..slow_cloud
        };
        // Phase 2 gives it 600 decisions to notice; phase 3 (same world) is judged.
        let tallies = simulate(&[slow_cloud, fast_cloud, fast_cloud], 600, 0);
        let t = &tallies[2];
        let right = t.right_after_warmup as f64 / t.after_warmup as f64;
        assert!(right >= 0.9, "{tallies:?}");
        let t = &tallies[0];
        let right = t.right_after_warmup as f64 / t.after_warmup as f64;
        assert!(right >= 0.9, "{tallies:?}");
    }
}
