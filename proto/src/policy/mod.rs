//! Placement policy, sans IO: the policy file model ([`rules`]), its evaluator
//! ([`eval`]: signals + now → verdict), and the automatic cost model ([`cost`]).
//!
//! Nothing here reads files, sockets or the clock: callers pass text, signal snapshots
//! and `now`, so every decision can be replayed in a test.

pub mod cost;
pub mod eval;
pub mod link;
pub mod rules;

/// `exp` and `ln` of the cost model, in pure Rust (the `libm` crate, a port of musl's):
/// the same bits on every board and architecture whatever its C library, so a decision
/// replays identically anywhere, and the agent links no libm.so (whose pages were
/// 0.58 MiB of an idle agent's memory, for these two functions). The agent uses it for
/// what it shows of the model, too.
pub fn exp(x: f64) -> f64 {
    libm::exp(x)
}

/// See [`exp`].
pub fn ln(x: f64) -> f64 {
    libm::log(x)
}

/// A snapshot of what the agent knows about the board, the link and the task at the
/// moment of a decision. `None` means "not available here" (no battery, no thermal
/// zone, no daemon connected): a rule testing an absent signal never matches.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Signals {
    /// Busy CPU, percent of all cores (smoothed), 0–100.
    pub cpu_percent: Option<f64>,
    /// One-minute load average.
    pub load_avg: Option<f64>,
    /// Memory available to new work, MiB.
    pub memory_available_mb: Option<f64>,
    /// Hottest thermal zone, °C.
    pub temperature_c: Option<f64>,
    /// Combined battery charge, percent 0–100 (absent on boards without a battery).
    pub battery_percent: Option<f64>,
    /// A battery is charging.
    pub charging: Option<bool>,
    /// No external power is online and a battery is present.
    pub on_battery: Option<bool>,
    /// Smoothed RTT to the daemon that would take the task, ms.
    pub rtt_ms: Option<f64>,
    /// Recent throughput to that daemon, megabits per second.
    pub bandwidth_mbps: Option<f64>,
    /// Some daemon is connected and not draining.
    pub cloud_connected: Option<bool>,
    /// Running + queued tasks on that daemon.
    pub cloud_queue: Option<f64>,
    /// Running + queued tasks on the board.
    pub local_queue: Option<f64>,
    /// The task's input size, bytes (per task; absent when unknown).
    pub input_bytes: Option<f64>,
}

/// The signals a rule can test, by their names in the policy file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Signal {
    /// `cpu_percent`
    CpuPercent,
    /// `load_avg`
    LoadAvg,
    /// `memory_available_mb`
    MemoryAvailableMb,
    /// `temperature_c`
    TemperatureC,
    /// `battery_percent`
    BatteryPercent,
    /// `charging` (boolean)
    Charging,
    /// `on_battery` (boolean)
    OnBattery,
    /// `rtt_ms`
    RttMs,
    /// `bandwidth_mbps`
    BandwidthMbps,
    /// `cloud_connected` (boolean)
    CloudConnected,
    /// `cloud_queue`
    CloudQueue,
    /// `local_queue`
    LocalQueue,
    /// `input_bytes`
    InputBytes,
}

impl Signal {
    /// Every signal, in documentation order.
    pub const ALL: [Signal; 13] = [
        Signal::CpuPercent,
        Signal::LoadAvg,
        Signal::MemoryAvailableMb,
        Signal::TemperatureC,
        Signal::BatteryPercent,
        Signal::Charging,
        Signal::OnBattery,
        Signal::RttMs,
        Signal::BandwidthMbps,
        Signal::CloudConnected,
        Signal::CloudQueue,
        Signal::LocalQueue,
        Signal::InputBytes,
    ];

    /// The name used in policy files, logs and explanations.
    pub fn name(self) -> &'static str {
        match self {
            Signal::CpuPercent => "cpu_percent",
            Signal::LoadAvg => "load_avg",
            Signal::MemoryAvailableMb => "memory_available_mb",
            Signal::TemperatureC => "temperature_c",
            Signal::BatteryPercent => "battery_percent",
            Signal::Charging => "charging",
            Signal::OnBattery => "on_battery",
            Signal::RttMs => "rtt_ms",
            Signal::BandwidthMbps => "bandwidth_mbps",
            Signal::CloudConnected => "cloud_connected",
            Signal::CloudQueue => "cloud_queue",
            Signal::LocalQueue => "local_queue",
            Signal::InputBytes => "input_bytes",
        }
    }

    /// Looks a signal up by its policy-file name.
    pub fn from_name(name: &str) -> Option<Signal> {
        Signal::ALL.into_iter().find(|s| s.name() == name)
    }

    /// True for `charging`, `on_battery`, `cloud_connected`.
    pub fn is_bool(self) -> bool {
        matches!(
            self,
            Signal::Charging | Signal::OnBattery | Signal::CloudConnected
        )
    }
}

/// A signal's value in a snapshot.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    /// A number.
    Number(f64),
    /// A boolean.
    Bool(bool),
}

impl Signals {
    /// The value of one signal, if present.
    pub fn get(&self, s: Signal) -> Option<Value> {
        let n = |v: Option<f64>| v.map(Value::Number);
        let b = |v: Option<bool>| v.map(Value::Bool);
        match s {
            Signal::CpuPercent => n(self.cpu_percent),
            Signal::LoadAvg => n(self.load_avg),
            Signal::MemoryAvailableMb => n(self.memory_available_mb),
            Signal::TemperatureC => n(self.temperature_c),
            Signal::BatteryPercent => n(self.battery_percent),
            Signal::Charging => b(self.charging),
            Signal::OnBattery => b(self.on_battery),
            Signal::RttMs => n(self.rtt_ms),
            Signal::BandwidthMbps => n(self.bandwidth_mbps),
            Signal::CloudConnected => b(self.cloud_connected),
            Signal::CloudQueue => n(self.cloud_queue),
            Signal::LocalQueue => n(self.local_queue),
            Signal::InputBytes => n(self.input_bytes),
        }
    }
}

/// Where a policy rule or default sends a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// On the board.
    Local,
    /// In the cloud.
    Cloud,
    /// Let the cost model decide.
    Auto,
}

impl Place {
    /// `local`, `cloud` or `auto`.
    pub fn as_str(self) -> &'static str {
        match self {
            Place::Local => "local",
            Place::Cloud => "cloud",
            Place::Auto => "auto",
        }
    }
}

/// What the placement code knows about the task being placed.
#[derive(Debug, Clone, Copy)]
pub struct TaskInfo<'a> {
    /// Catalog name.
    pub name: &'a str,
    /// Catalog tags.
    pub tags: &'a [String],
}
