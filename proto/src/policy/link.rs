//! Link estimates that know what they do not know, sans IO.
//!
//! A [`RateEstimate`] follows one direction's throughput (bytes per second) from real
//! transfers: bytes over the time the stream actually moved them, from task runs and
//! link probes. It keeps the logarithm of the rate and its variance, as a one-dimensional
//! Kalman filter on a random walk:
//!
//! - **cold**: no sample yet, no estimate ([`RateEstimate::get`] is `None`); callers fall
//!   back to a prior with [`PRIOR_SD`] of uncertainty, and should measure;
//! - **stale**: the variance grows with the time since the last sample
//!   ([`DRIFT_PER_SEC`]), so an old figure is trusted less and less, and exploration and
//!   probes are drawn to it;
//! - **degraded / recovered**: a sample far outside what the estimate allows (beyond
//!   [`CHANGE_GATE`] standard deviations) is taken as a change of the link, not noise:
//!   the variance is raised to the surprise, so the estimate moves most of the way to
//!   the new level at once and the next samples confirm it (within 3 samples).
//!
//! An idle connection's congestion window over its RTT is not capacity, and nothing here
//! uses it.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{exp, ln};

/// Standard deviation (natural log) of one sample around the link's true rate: a
/// transfer's rate varies by about ±35 % with slow start, competing traffic and timers.
pub const SAMPLE_SD: f64 = 0.35;

/// Uncertainty (natural log, 1 sd) of a rate nobody measured: a factor of about 3 either
/// way around the prior.
pub const PRIOR_SD: f64 = 1.1;

/// Growth of the variance per second without a sample: after 10 minutes an estimate's sd
/// has grown by about 0.55 (a factor 1.7), after an hour by about 1.3.
pub const DRIFT_PER_SEC: f64 = 5e-4;

/// A sample more than this many standard deviations (of estimate and sample together)
/// from the estimate is a change of the link.
pub const CHANGE_GATE: f64 = 3.0;

/// An estimate with at most this sd (natural log, about ±40 %) is sure enough that
/// neither exploration nor a probe is needed on its account.
pub const SURE_SD: f64 = 0.4;

/// Fewest bytes a transfer must move to be a rate sample: below it, round trips and
/// window growth dominate its time, not the link's rate.
pub const MIN_SAMPLE_BYTES: u64 = 64 * 1024;

/// Shortest transfer time taken as a sample: shorter is timer noise.
const MIN_SAMPLE_SECS: f64 = 1e-4;

/// Largest variance kept: beyond it the estimate says nothing anyway.
const MAX_VAR: f64 = 16.0;

/// One direction's throughput estimate.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct RateEstimate {
    /// Samples taken (saturating); 0: cold.
    pub n: u32,
    /// ln(bytes per second).
    pub mean: f64,
    /// Variance of `mean` as of the last sample.
    pub var: f64,
    /// When the last sample was taken; `None` for an estimate restored from disk before
    /// [`RateEstimate::aged`] placed it in time.
    #[serde(skip)]
    pub at: Option<Instant>,
}

/// What an estimate says now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Megabits per second.
    pub mbps: f64,
    /// Standard deviation of its natural logarithm now (with its age).
    pub sd: f64,
    /// Time since the last sample.
    pub age: Duration,
    /// Samples taken.
    pub samples: u32,
}

impl Rate {
    /// The rate at `k` standard deviations above its estimate (optimism), Mbit/s.
    pub fn optimistic(&self, k: f64) -> f64 {
        self.mbps * exp((k * self.sd).min(MAX_VAR))
    }

    /// True when the estimate is sure enough not to need measuring.
    pub fn is_sure(&self) -> bool {
        self.sd <= SURE_SD
    }
}

impl RateEstimate {
    /// A cold estimate.
    pub const COLD: RateEstimate = RateEstimate {
        n: 0,
        mean: 0.0,
        var: 0.0,
        at: None,
    };

    /// Variance now: the last one plus drift for the time since.
    fn var_at(&self, now: Instant) -> f64 {
        let age = self
            .at
            .map_or(0.0, |at| now.saturating_duration_since(at).as_secs_f64());
        (self.var + DRIFT_PER_SEC * age).min(MAX_VAR)
    }

    /// Adds a transfer of `bytes` that took `secs`; ignored below [`MIN_SAMPLE_BYTES`]
    /// or with a time that is not a positive number. Returns whether it counted.
    pub fn record(&mut self, bytes: u64, secs: f64, now: Instant) -> bool {
        if bytes < MIN_SAMPLE_BYTES || !secs.is_finite() || secs < MIN_SAMPLE_SECS {
            return false;
        }
        self.record_log(ln(bytes as f64 / secs), now);
        true
    }

    /// Adds a measured rate in bytes per second (a link probe's, timed over the part of
    /// its transfer that was not slow start); ignored unless a positive number.
    pub fn record_rate(&mut self, bytes_per_sec: f64, now: Instant) -> bool {
        if !(bytes_per_sec.is_finite() && bytes_per_sec > 0.0) {
            return false;
        }
        self.record_log(ln(bytes_per_sec), now);
        true
    }

    /// Adds a sample given as ln(bytes per second).
    fn record_log(&mut self, y: f64, now: Instant) {
        let r = SAMPLE_SD * SAMPLE_SD;
        if self.n == 0 {
            self.mean = y;
            self.var = r;
        } else {
            let mut p = self.var_at(now);
            let d = y - self.mean;
            if d * d > CHANGE_GATE * CHANGE_GATE * (p + r) {
                // A change of the link: what was known before says little now.
                p = p.max(d * d);
            }
            let k = p / (p + r);
            self.mean += k * d;
            self.var = ((1.0 - k) * p).min(MAX_VAR);
        }
        self.n = self.n.saturating_add(1);
        self.at = Some(now);
    }

    /// The estimate now; `None` while cold.
    pub fn get(&self, now: Instant) -> Option<Rate> {
        (self.n > 0).then(|| Rate {
            mbps: exp(self.mean) * 8e-6,
            sd: self.var_at(now).sqrt(),
            age: self
                .at
                .map_or(Duration::ZERO, |at| now.saturating_duration_since(at)),
            samples: self.n,
        })
    }

    /// Places an estimate read from disk in time: its last sample `ago` before `now`
    /// (its variance grows from there).
    pub fn aged(mut self, now: Instant, ago: Duration) -> Self {
        if self.n > 0 {
            self.at = Some(now.checked_sub(ago).unwrap_or(now));
            if self.at == Some(now) {
                // `now` is too close to the clock's origin to go back: age it by hand.
                self.var = (self.var + DRIFT_PER_SEC * ago.as_secs_f64()).min(MAX_VAR);
            }
        }
        self
    }

    /// True when the fields are usable numbers (a restored estimate may not be).
    pub fn is_valid(&self) -> bool {
        self.mean.is_finite() && self.var.is_finite() && self.var >= 0.0
    }
}

/// Both directions of one link.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct LinkEstimate {
    /// Board to daemon (task input).
    pub up: RateEstimate,
    /// Daemon to board (task output).
    pub down: RateEstimate,
}

impl LinkEstimate {
    /// A cold link.
    pub const COLD: LinkEstimate = LinkEstimate {
        up: RateEstimate::COLD,
        down: RateEstimate::COLD,
    };

    /// Learns from a task's transfer: `input` bytes up and `output` bytes down that
    /// together took `secs` of network time. A transfer that is mostly one way (4:1 or
    /// more) teaches that direction; a mixed one teaches both the combined rate.
    pub fn record_transfer(&mut self, input: u64, output: u64, secs: f64, now: Instant) {
        let bytes = input.saturating_add(output);
        if input >= output.saturating_mul(4) {
            self.up.record(bytes, secs, now);
        } else if output >= input.saturating_mul(4) {
            self.down.record(bytes, secs, now);
        } else {
            self.up.record(bytes, secs, now);
            self.down.record(bytes, secs, now);
        }
    }

    /// Both directions placed in time after a restore (see [`RateEstimate::aged`]).
    pub fn aged(self, now: Instant, ago: Duration) -> Self {
        LinkEstimate {
            up: self.up.aged(now, ago),
            down: self.down.aged(now, ago),
        }
    }

    /// True when both directions are usable numbers.
    pub fn is_valid(&self) -> bool {
        self.up.is_valid() && self.down.is_valid()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    /// Seconds to move `bytes` at `mbps`.
    fn secs(bytes: u64, mbps: f64) -> f64 {
        bytes as f64 * 8.0 / (mbps * 1e6)
    }

    fn within(rate: Rate, mbps: f64, factor: f64) -> bool {
        rate.mbps >= mbps / factor && rate.mbps <= mbps * factor
    }

    #[test]
    fn cold_has_no_estimate_and_small_transfers_do_not_count() {
        let now = Instant::now();
        let mut e = RateEstimate::COLD;
        assert_eq!(e.get(now), None, "no figure before any data has crossed");
        assert!(
            !e.record(MIN_SAMPLE_BYTES - 1, 0.001, now),
            "too small to be a sample"
        );
        assert!(!e.record(MIB, 0.0, now), "no time is not a sample");
        assert!(!e.record(MIB, f64::NAN, now));
        assert_eq!(e.get(now), None);
        assert!(e.record(MIB, secs(MIB, 25.0), now));
        let r = e.get(now).unwrap();
        assert!(within(r, 25.0, 1.001), "{r:?}");
        assert!(
            (r.sd - SAMPLE_SD).abs() < 1e-9,
            "as sure as one sample: {r:?}"
        );
        assert_eq!(r.samples, 1);
    }

    #[test]
    fn samples_make_it_sure_and_age_makes_it_stale() {
        let t0 = Instant::now();
        let mut e = RateEstimate::COLD;
        for i in 0..3 {
            // ±20 % around 25 Mbit/s.
            let mbps = [20.0, 30.0, 25.0][i];
            e.record(MIB, secs(MIB, mbps), t0 + Duration::from_secs(i as u64));
        }
        let fresh = e.get(t0 + Duration::from_secs(3)).unwrap();
        assert!(within(fresh, 25.0, 1.15), "{fresh:?}");
        assert!(fresh.is_sure(), "three agreeing samples: {fresh:?}");
        assert!(fresh.sd < SAMPLE_SD, "{fresh:?}");
        let old = e.get(t0 + Duration::from_secs(3600)).unwrap();
        assert_eq!(old.mbps, fresh.mbps, "age does not move the estimate");
        assert!(
            !old.is_sure(),
            "an hour-old figure needs measuring: {old:?}"
        );
        assert!(old.sd > fresh.sd * 2.0);
        assert!(old.optimistic(2.0) > fresh.optimistic(2.0));
    }

    #[test]
    fn follows_a_degradation_and_a_recovery_within_three_samples() {
        let t0 = Instant::now();
        let mut e = RateEstimate::COLD;
        let mut t = t0;
        let mut step = |e: &mut RateEstimate, mbps: f64| {
            t += Duration::from_secs(2);
            e.record(4 * MIB, secs(4 * MIB, mbps), t);
            e.get(t).unwrap()
        };
        for _ in 0..20 {
            step(&mut e, 25.0);
        }
        // Degraded: 25 → 2.5 Mbit/s.
        let after: Vec<Rate> = (0..3).map(|_| step(&mut e, 2.5)).collect();
        assert!(
            after[0].mbps < 25.0 / 3.0,
            "first sample moves it most of the way: {after:?}"
        );
        assert!(within(after[2], 2.5, 1.25), "three samples: {after:?}");
        // Recovered: back to 25.
        let after: Vec<Rate> = (0..3).map(|_| step(&mut e, 25.0)).collect();
        assert!(after[0].mbps > 2.5 * 3.0, "{after:?}");
        assert!(within(after[2], 25.0, 1.25), "{after:?}");
        // Noise within the gate does not throw it about.
        let before = step(&mut e, 25.0);
        let noisy = step(&mut e, 25.0 * 1.3);
        assert!(noisy.mbps < before.mbps * 1.3, "{before:?} {noisy:?}");
    }

    #[test]
    fn transfers_teach_the_direction_that_moved_the_bytes() {
        let now = Instant::now();
        let mut l = LinkEstimate::COLD;
        l.record_transfer(4 * MIB, 32, secs(4 * MIB, 5.0), now);
        assert!(within(l.up.get(now).unwrap(), 5.0, 1.01));
        assert_eq!(l.down.get(now), None, "nothing came down");
        l.record_transfer(1024, 2 * MIB, secs(2 * MIB, 50.0), now);
        assert!(within(l.down.get(now).unwrap(), 50.0, 1.01));
        let up_before = l.up.get(now).unwrap().mbps;
        l.record_transfer(MIB, MIB, secs(2 * MIB, 20.0), now);
        assert!(
            l.up.get(now).unwrap().mbps > up_before,
            "a mixed transfer teaches both"
        );
        assert!(l.down.get(now).unwrap().mbps < 50.0);
    }

    #[test]
    fn a_restored_estimate_carries_its_age() {
        let now = Instant::now() + Duration::from_secs(7200);
        let mut e = RateEstimate::COLD;
        e.record(MIB, secs(MIB, 10.0), now);
        let json = serde_json::to_value(e).unwrap();
        let back: RateEstimate = serde_json::from_value(json).unwrap();
        let restored = back.aged(now, Duration::from_secs(3600));
        let r = restored.get(now).unwrap();
        assert!(within(r, 10.0, 1.001));
        assert!(!r.is_sure(), "saved an hour ago: {r:?}");
        assert!(r.age >= Duration::from_secs(3599), "{r:?}");
        assert!(!RateEstimate {
            mean: f64::NAN,
            ..e
        }
        .is_valid());
    }
}
