//! Samplers for the live signals placement uses: the board (CPU, load, memory,
//! temperature from sysinfo; battery and AC from power_supply) and the link (RTT and
//! throughput from each QUIC connection's statistics).
//!
//! Sampling runs on one cheap timer (default 1 s); decisions read the latest snapshot.

pub mod power;

use std::path::PathBuf;
use std::time::Duration;

/// Weight of a new CPU sample in the smoothed CPU percentage: about a 3-sample memory,
/// so one busy second does not flip a rule but a sustained load shows within seconds.
pub const CPU_SMOOTHING: f64 = 0.5;

/// What the board sampler reports.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BoardSignals {
    /// Smoothed busy CPU across all cores, percent.
    pub cpu_percent: Option<f64>,
    /// One-minute load average.
    pub load_avg: Option<f64>,
    /// Available memory, MiB.
    pub memory_available_mb: Option<f64>,
    /// Hottest thermal zone, °C (absent when the board exposes none).
    pub temperature_c: Option<f64>,
    /// Battery and AC.
    pub power: power::PowerState,
    /// Cores the board has.
    pub cores: usize,
}

/// Samples the board's CPU, memory, temperature and power state.
pub struct BoardSampler {
    /// `None` where the platform gave no system information: those signals are absent.
    sys: Option<sysinfo::System>,
    components: Option<sysinfo::Components>,
    power_root: PathBuf,
    cpu: Option<f64>,
}

impl std::fmt::Debug for BoardSampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoardSampler")
            .field("power_root", &self.power_root)
            .field("cpu", &self.cpu)
            .finish()
    }
}

impl BoardSampler {
    /// A sampler reading power state under `power_root` (normally `/sys/class/power_supply`).
    pub fn new(power_root: PathBuf) -> Self {
        let mut sys = sysinfo::System::new().ok();
        // The first CPU reading needs a baseline to diff against.
        if let Some(s) = sys.as_mut() {
            s.refresh_cpu_usage();
        }
        Self {
            sys,
            components: sysinfo::Components::new_with_refreshed_list().ok(),
            power_root,
            cpu: None,
        }
    }

    /// Takes one sample. Call it at a steady interval: CPU usage is measured since the
    /// previous call.
    pub fn sample(&mut self) -> BoardSignals {
        let mut out = BoardSignals {
            power: power::read(&self.power_root),
            cores: 1,
            ..Default::default()
        };
        if let Some(sys) = self.sys.as_mut() {
            sys.refresh_cpu_usage();
            sys.refresh_memory();
            let raw = f64::from(sys.global_cpu_usage()).clamp(0.0, 100.0);
            let cpu = match self.cpu {
                Some(prev) => prev + CPU_SMOOTHING * (raw - prev),
                None => raw,
            };
            self.cpu = Some(cpu);
            out.cpu_percent = Some(cpu);
            out.memory_available_mb = Some(sys.available_memory() as f64 / (1024.0 * 1024.0));
            out.cores = sys.cpus().len().max(1);
        }
        out.load_avg = sysinfo::System::load_average().ok().map(|l| l.one);
        if let Some(components) = self.components.as_mut() {
            components.refresh(false);
            out.temperature_c = components
                .iter()
                .filter_map(|c| c.temperature())
                .filter(|t| t.is_finite() && *t > -50.0)
                .map(f64::from)
                .reduce(f64::max);
        }
        out
    }
}

/// An estimate of one QUIC connection's capacity, from its statistics.
///
/// Bytes moved in a sampling interval only bound the capacity from below (a 1 MiB
/// transfer that took 5 ms of a 1 s interval says "at least 8 Mbit/s", not "8 Mbit/s"),
/// and so does the congestion window over the RTT. The meter therefore reports the
/// larger of the two lower bounds: the highest interval rate seen, decaying slowly so a
/// link that got slower is noticed, and cwnd / RTT now.
#[derive(Debug, Default)]
pub struct LinkMeter {
    last_bytes: Option<u64>,
    peak_mbps: Option<f64>,
}

/// Below this many bytes moved in one sample interval, the interval says nothing
/// about the link's capacity (the link was idle, not slow).
const LINK_METER_MIN_BYTES: u64 = 64 * 1024;
/// Per-sample decay of the peak rate: it halves in about 70 samples (70 s at the
/// default 1 s interval) unless traffic shows the link still that fast.
const LINK_METER_DECAY: f64 = 0.99;

impl LinkMeter {
    /// Updates from the connection's counters; returns the estimate in Mbit/s.
    pub fn update(&mut self, conn: &quinn::Connection, interval: Duration) -> Option<f64> {
        let stats = conn.stats();
        let bytes = stats.udp_tx.bytes + stats.udp_rx.bytes;
        let moved = self.last_bytes.map(|b| bytes.saturating_sub(b));
        self.last_bytes = Some(bytes);
        let mut peak = self.peak_mbps.map(|p| p * LINK_METER_DECAY);
        if let Some(moved) = moved.filter(|m| *m >= LINK_METER_MIN_BYTES) {
            let mbps = moved as f64 * 8.0 / interval.as_secs_f64().max(1e-3) / 1e6;
            peak = Some(peak.map_or(mbps, |p| p.max(mbps)));
        }
        self.peak_mbps = peak;
        let rtt = stats.path.rtt.as_secs_f64().max(1e-4);
        let window = stats.path.cwnd as f64 * 8.0 / rtt / 1e6;
        Some(peak.map_or(window, |p| p.max(window)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn board_sample_has_the_basics() {
        let d = tempfile::tempdir().unwrap();
        let mut s = BoardSampler::new(d.path().to_path_buf());
        let a = s.sample();
        let cpu = a.cpu_percent.unwrap();
        assert!((0.0..=100.0).contains(&cpu), "{cpu}");
        assert!(a.memory_available_mb.unwrap() > 0.0);
        assert!(a.cores >= 1);
        assert_eq!(a.power.battery_percent, None, "no battery in an empty tree");
    }
}
