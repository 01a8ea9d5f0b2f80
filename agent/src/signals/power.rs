//! Battery and AC state from the kernel's power_supply class
//! (`/sys/class/power_supply/*/{type,status,capacity,online,present}`), read from a
//! configurable root so tests can point it at a fake tree in the same layout.

use std::path::Path;

/// Combined power state of the board. All `None` when the board has no battery.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PowerState {
    /// Charge across present batteries, percent (weighted by capacity when the kernel
    /// reports `energy_full`/`charge_full`, else the mean).
    pub battery_percent: Option<f64>,
    /// Some battery reports `Charging`.
    pub charging: Option<bool>,
    /// Batteries are present and no external supply (Mains, USB, ...) is online.
    pub on_battery: Option<bool>,
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn read_num(path: &Path) -> Option<f64> {
    read_trimmed(path)?.parse().ok()
}

/// Reads every supply under `root`. A missing root means no supplies: a board without
/// power_supply entries has no battery signals.
pub(crate) fn read(root: &Path) -> PowerState {
    let Ok(entries) = std::fs::read_dir(root) else {
        return PowerState::default();
    };
    let mut weighted = 0.0;
    let mut weight = 0.0;
    let mut batteries = 0usize;
    let mut charging = false;
    let mut discharging = 0usize;
    let mut external: Option<bool> = None;
    for entry in entries.flatten() {
        let dir = entry.path();
        let Some(kind) = read_trimmed(&dir.join("type")) else {
            continue;
        };
        if kind == "Battery" {
            if read_num(&dir.join("present")) == Some(0.0) {
                continue;
            }
            let Some(capacity) = read_num(&dir.join("capacity")) else {
                continue;
            };
            batteries += 1;
            let full =
                read_num(&dir.join("energy_full")).or_else(|| read_num(&dir.join("charge_full")));
            let w = full.filter(|f| *f > 0.0).unwrap_or(1.0);
            weighted += capacity.clamp(0.0, 100.0) * w;
            weight += w;
            match read_trimmed(&dir.join("status")).as_deref() {
                Some("Charging") => charging = true,
                Some("Discharging") => discharging += 1,
                _ => {}
            }
        } else if let Some(online) = read_num(&dir.join("online")) {
            // Mains, USB, UPS, Wireless...: any online external supply powers the board.
            external = Some(external.unwrap_or(false) || online > 0.0);
        }
    }
    if batteries == 0 {
        return PowerState::default();
    }
    // Without an external supply entry, fall back on the batteries' own status.
    let on_battery = match external {
        Some(online) => !online,
        None => discharging > 0 && !charging,
    };
    PowerState {
        battery_percent: Some(weighted / weight),
        charging: Some(charging),
        on_battery: Some(on_battery),
    }
}

/// Writes a fake power_supply tree in the kernel's layout (tests, demo, benchmarks).
pub mod fake {
    use std::path::Path;

    /// Writes (or rewrites) a battery `name` under `root`.
    pub fn battery(root: &Path, name: &str, capacity: u8, status: &str) -> std::io::Result<()> {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("type"), "Battery\n")?;
        std::fs::write(dir.join("present"), "1\n")?;
        std::fs::write(dir.join("capacity"), format!("{capacity}\n"))?;
        std::fs::write(dir.join("status"), format!("{status}\n"))
    }

    /// Writes (or rewrites) an AC adapter `name` under `root`.
    pub fn mains(root: &Path, name: &str, online: bool) -> std::io::Result<()> {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("type"), "Mains\n")?;
        std::fs::write(dir.join("online"), if online { "1\n" } else { "0\n" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_tree_or_no_battery_means_absent() {
        assert_eq!(
            read(Path::new("/nonexistent/power_supply")),
            PowerState::default()
        );
        let d = tempfile::tempdir().unwrap();
        fake::mains(d.path(), "AC", true).unwrap();
        assert_eq!(read(d.path()), PowerState::default());
    }

    #[test]
    fn single_battery_states() {
        let d = tempfile::tempdir().unwrap();
        fake::battery(d.path(), "BAT0", 22, "Discharging").unwrap();
        fake::mains(d.path(), "AC", false).unwrap();
        let p = read(d.path());
        assert_eq!(
            (p.battery_percent, p.charging, p.on_battery),
            (Some(22.0), Some(false), Some(true))
        );
        fake::battery(d.path(), "BAT0", 23, "Charging").unwrap();
        fake::mains(d.path(), "AC", true).unwrap();
        let p = read(d.path());
        assert_eq!(
            (p.battery_percent, p.charging, p.on_battery),
            (Some(23.0), Some(true), Some(false))
        );
    }

    #[test]
    fn several_batteries_combine_and_absent_ones_are_skipped() {
        let d = tempfile::tempdir().unwrap();
        fake::battery(d.path(), "BAT0", 80, "Discharging").unwrap();
        fake::battery(d.path(), "BAT1", 20, "Discharging").unwrap();
        // BAT1 holds three times the energy of BAT0.
        std::fs::write(d.path().join("BAT0/energy_full"), "10000000\n").unwrap();
        std::fs::write(d.path().join("BAT1/energy_full"), "30000000\n").unwrap();
        fake::battery(d.path(), "BAT2", 5, "Discharging").unwrap();
        std::fs::write(d.path().join("BAT2/present"), "0\n").unwrap();
        let p = read(d.path());
        assert_eq!(p.battery_percent, Some(35.0));
        // No AC entry: discharging batteries mean the board runs on battery.
        assert_eq!(p.on_battery, Some(true));
    }
}
