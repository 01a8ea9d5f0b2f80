//! Samplers for the live signals placement uses: the board (CPU, load, memory,
//! temperature from sysinfo; battery and AC from power_supply). The link's RTT is the
//! QUIC connection's; its throughput is estimated from real transfers (see
//! `updraft_proto::policy::link` and [`crate::knowledge`]), never from an idle
//! connection's congestion window.
//!
//! Sampling runs on one cheap timer (default 1 s); decisions read the latest snapshot.

pub(crate) mod power;

use std::path::{Path, PathBuf};

/// Weight of a new CPU sample in the smoothed CPU percentage: about a 3-sample memory,
/// so one busy second does not flip a rule but a sustained load shows within seconds.
pub(crate) const CPU_SMOOTHING: f64 = 0.5;

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

/// This process's cgroup CPU quota, with its files held open so that reading it again
/// costs one `pread` per file (about a microsecond) instead of path walks and opens
/// (about ten). Placement reads it for every decision: a quota can change at any
/// moment (an operator, a thermal governor, an orchestrator), and a one-second-old
/// figure sends the first tasks after a change to the wrong side.
#[derive(Debug)]
pub(crate) struct CpuQuota {
    /// cgroup v2 `cpu.max` ("QUOTA PERIOD" or "max PERIOD"), or v1 `cpu.cfs_quota_us`
    /// (-1 = none).
    quota: std::fs::File,
    /// cgroup v1 `cpu.cfs_period_us`; `None` on v2, where `quota` holds both.
    period: Option<std::fs::File>,
}

/// Longest quota file text read: "max 100000\n" and v1's numbers are far shorter.
const QUOTA_TEXT_MAX: usize = 64;

impl CpuQuota {
    /// The quota files of this process's cgroup, if the CPU controller is mounted.
    pub(crate) fn locate() -> Option<Self> {
        let membership = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        Self::locate_in(&membership, Path::new("/sys/fs/cgroup"))
    }

    /// [`CpuQuota::locate`] for a `/proc/PID/cgroup` text and a cgroup mount root.
    pub(crate) fn locate_in(membership: &str, root: &Path) -> Option<Self> {
        let open = |p: PathBuf| std::fs::File::open(p).ok();
        for line in membership.lines() {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            let path = path.trim_start_matches('/');
            if controllers.is_empty() {
                // v2: "0::/path"
                if let Some(quota) = open(root.join(path).join("cpu.max")) {
                    return Some(Self {
                        quota,
                        period: None,
                    });
                }
            } else if controllers.split(',').any(|c| c == "cpu") {
                for mount in ["cpu", "cpu,cpuacct", "cpuacct,cpu"] {
                    let dir = root.join(mount).join(path);
                    if let (Some(quota), Some(period)) = (
                        open(dir.join("cpu.cfs_quota_us")),
                        open(dir.join("cpu.cfs_period_us")),
                    ) {
                        return Some(Self {
                            quota,
                            period: Some(period),
                        });
                    }
                }
            }
        }
        None
    }

    /// The quota now, in cores; `None` when unlimited or unreadable.
    pub(crate) fn read(&self) -> Option<f64> {
        use std::os::unix::fs::FileExt;
        let text = |f: &std::fs::File, buf: &mut [u8; QUOTA_TEXT_MAX]| -> Option<usize> {
            // Positional reads from 0 make the kernel render the file afresh.
            f.read_at(buf, 0).ok()
        };
        let mut buf = [0u8; QUOTA_TEXT_MAX];
        let n = text(&self.quota, &mut buf)?;
        let mut fields = std::str::from_utf8(&buf[..n]).ok()?.split_whitespace();
        let quota = fields.next()?.parse::<f64>().ok()?;
        let period = match &self.period {
            None => fields.next()?.parse::<f64>().ok()?,
            Some(f) => {
                let mut pbuf = [0u8; QUOTA_TEXT_MAX];
                let n = text(f, &mut pbuf)?;
                std::str::from_utf8(&pbuf[..n])
                    .ok()?
                    .trim()
                    .parse::<f64>()
                    .ok()?
            }
        };
        (quota > 0.0 && period > 0.0).then(|| quota / period)
    }
}

/// Samples the board's CPU, memory, temperature and power state.
pub(crate) struct BoardSampler {
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
    pub(crate) fn new(power_root: PathBuf) -> Self {
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
    pub(crate) fn sample(&mut self) -> BoardSignals {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cgroup_cpu_limit_in(membership: &str, root: &Path) -> Option<f64> {
        CpuQuota::locate_in(membership, root)?.read()
    }

    #[test]
    fn cgroup_quotas_v1_and_v2() {
        let d = tempfile::tempdir().unwrap();
        let v1 = d.path().join("cpu,cpuacct/board");
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::write(v1.join("cpu.cfs_quota_us"), "25000\n").unwrap();
        std::fs::write(v1.join("cpu.cfs_period_us"), "100000\n").unwrap();
        let m = "12:memory:/board\n4:cpu,cpuacct:/board\n";
        assert_eq!(cgroup_cpu_limit_in(m, d.path()), Some(0.25));
        std::fs::write(v1.join("cpu.cfs_quota_us"), "-1\n").unwrap();
        assert_eq!(cgroup_cpu_limit_in(m, d.path()), None, "-1 means unlimited");
        let v2 = d.path().join("system.slice/updraft-agent.service");
        std::fs::create_dir_all(&v2).unwrap();
        std::fs::write(v2.join("cpu.max"), "150000 100000\n").unwrap();
        let m2 = "0::/system.slice/updraft-agent.service\n";
        assert_eq!(cgroup_cpu_limit_in(m2, d.path()), Some(1.5));
        std::fs::write(v2.join("cpu.max"), "max 100000\n").unwrap();
        assert_eq!(cgroup_cpu_limit_in(m2, d.path()), None);
    }

    #[test]
    fn a_located_quota_follows_later_changes() {
        let d = tempfile::tempdir().unwrap();
        let v1 = d.path().join("cpu/board");
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::write(v1.join("cpu.cfs_quota_us"), "100000\n").unwrap();
        std::fs::write(v1.join("cpu.cfs_period_us"), "100000\n").unwrap();
        let q = CpuQuota::locate_in("4:cpu:/board\n", d.path()).unwrap();
        assert_eq!(q.read(), Some(1.0));
        std::fs::write(v1.join("cpu.cfs_quota_us"), "25000\n").unwrap();
        assert_eq!(q.read(), Some(0.25), "the held file shows the new quota");
        std::fs::write(v1.join("cpu.cfs_quota_us"), "-1\n").unwrap();
        assert_eq!(q.read(), None);
        assert!(CpuQuota::locate_in("4:memory:/board\n", d.path()).is_none());
    }

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
