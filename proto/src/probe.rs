//! The clock-free parts of the link probe (`docs/PROTOCOL.md`, "Link probe"): the
//! byte budget both sides keep, and the timing of a payload as it arrives.
//!
//! Nothing here reads the clock: every call is given `now`, so tests step time by hand.

use std::time::{Duration, Instant};

const HOUR: Duration = Duration::from_secs(3600);

/// A token bucket of probe bytes: full at `per_hour` bytes, refilled at `per_hour`
/// bytes an hour. A probe is sent (or served) only when its bytes, both directions
/// together, are in the bucket; they are taken out when it starts.
#[derive(Debug, Clone)]
pub struct ProbeBudget {
    per_hour: u64,
    tokens: f64,
    last: Instant,
}

impl ProbeBudget {
    /// A full bucket of `per_hour` bytes at `now`. A budget of 0 never admits a probe.
    pub fn new(per_hour: u64, now: Instant) -> Self {
        Self {
            per_hour,
            tokens: per_hour as f64,
            last: now,
        }
    }

    /// The bytes an hour this budget allows.
    pub fn per_hour(&self) -> u64 {
        self.per_hour
    }

    /// Whole bytes available at `now`.
    pub fn available(&mut self, now: Instant) -> u64 {
        self.refill(now);
        self.tokens as u64
    }

    /// Takes `bytes` out of the bucket if they are all there at `now`; otherwise
    /// takes nothing and says false.
    pub fn try_spend(&mut self, bytes: u64, now: Instant) -> bool {
        self.refill(now);
        if bytes as f64 > self.tokens {
            return false;
        }
        self.tokens -= bytes as f64;
        true
    }

    /// How long from `now` until `bytes` are available; `None` when they never will be
    /// (more than the bucket holds).
    pub fn wait_for(&mut self, bytes: u64, now: Instant) -> Option<Duration> {
        if bytes > self.per_hour {
            return None;
        }
        self.refill(now);
        let missing = bytes as f64 - self.tokens;
        if missing <= 0.0 {
            return Some(Duration::ZERO);
        }
        Some(HOUR.mul_f64(missing / self.per_hour as f64))
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        if now > self.last {
            self.last = now;
        }
        let added = self.per_hour as f64 * (elapsed.as_secs_f64() / HOUR.as_secs_f64());
        self.tokens = (self.tokens + added).min(self.per_hour as f64);
    }
}

/// When a probe payload's bytes arrived, read by read: from the first byte to the last,
/// and over its tail, which begins when the read that brought the count to half the
/// payload or more arrived. The tail leaves out the connection's slow start and the
/// request's own latency, so its rate is the one the link sustains.
#[derive(Debug, Clone, Default)]
pub struct Arrivals {
    expected: u64,
    received: u64,
    first: Option<Instant>,
    /// When the tail began, and the bytes received by then.
    tail_start: Option<(Instant, u64)>,
    last: Option<Instant>,
}

/// What [`Arrivals`] measured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Measured {
    /// Payload bytes received.
    pub bytes: u64,
    /// From the first payload byte's arrival to the last's.
    pub elapsed: Duration,
    /// Bytes that arrived after the tail began.
    pub tail_bytes: u64,
    /// From the start of the tail to the last byte's arrival.
    pub tail: Duration,
}

impl Arrivals {
    /// Timing for a payload of `expected` bytes.
    pub fn new(expected: u64) -> Self {
        Self {
            expected,
            ..Self::default()
        }
    }

    /// `n` more bytes arrived at `now`.
    pub fn add(&mut self, n: u64, now: Instant) {
        if n == 0 {
            return;
        }
        self.first.get_or_insert(now);
        self.received += n;
        self.last = Some(now);
        if self.tail_start.is_none() && self.received * 2 >= self.expected {
            self.tail_start = Some((now, self.received));
        }
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// The timings so far.
    pub fn measured(&self) -> Measured {
        let (Some(first), Some(last)) = (self.first, self.last) else {
            return Measured::default();
        };
        let (tail, tail_bytes) = match self.tail_start {
            Some((at, by_then)) => (last.duration_since(at), self.received - by_then),
            None => (Duration::ZERO, 0),
        };
        Measured {
            bytes: self.received,
            elapsed: last.duration_since(first),
            tail_bytes,
            tail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_budget_starts_full_and_refills_at_its_hourly_rate() {
        let t0 = Instant::now();
        let mut b = ProbeBudget::new(16 * MIB, t0);
        assert_eq!(b.available(t0), 16 * MIB);
        assert!(b.try_spend(10 * MIB, t0));
        assert!(!b.try_spend(7 * MIB, t0), "only 6 MiB are left");
        assert_eq!(b.available(t0), 6 * MIB, "a refused probe takes nothing");
        assert!(b.try_spend(6 * MIB, t0));
        assert!(!b.try_spend(1, t0));
        // Half an hour gives back half the hourly budget, no more.
        let half = t0 + HOUR / 2;
        assert_eq!(b.available(half), 8 * MIB);
        // The bucket never holds more than an hour's worth.
        assert_eq!(b.available(t0 + 10 * HOUR), 16 * MIB);
    }

    #[test]
    fn a_budget_says_how_long_until_a_probe_fits() {
        let t0 = Instant::now();
        let mut b = ProbeBudget::new(4 * MIB, t0);
        assert_eq!(b.wait_for(MIB, t0), Some(Duration::ZERO));
        assert!(b.try_spend(4 * MIB, t0));
        assert_eq!(b.wait_for(MIB, t0), Some(HOUR / 4));
        assert_eq!(b.wait_for(5 * MIB, t0), None, "more than the bucket holds");
        // Time going backwards (a caller's stale `now`) neither adds nor takes.
        assert_eq!(b.available(t0 + HOUR / 4), MIB);
        assert_eq!(b.available(t0), MIB);
    }

    #[test]
    fn a_zero_budget_admits_nothing() {
        let t0 = Instant::now();
        let mut b = ProbeBudget::new(0, t0);
        assert!(!b.try_spend(1, t0 + HOUR));
        assert!(b.try_spend(0, t0), "an empty probe costs nothing");
        assert_eq!(b.wait_for(1, t0), None);
    }

    #[test]
    fn arrivals_time_the_whole_payload_and_its_tail() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut a = Arrivals::new(100);
        a.add(10, t0);
        a.add(30, t0 + ms(40));
        a.add(0, t0 + ms(45));
        // 50 of 100: the tail begins with this read.
        a.add(10, t0 + ms(50));
        a.add(25, t0 + ms(60));
        a.add(25, t0 + ms(70));
        assert_eq!(
            a.measured(),
            Measured {
                bytes: 100,
                elapsed: ms(70),
                tail_bytes: 50,
                tail: ms(20),
            }
        );
        assert_eq!(a.received(), 100);
    }

    #[test]
    fn a_payload_read_at_once_has_no_time_to_measure() {
        let t0 = Instant::now();
        let mut a = Arrivals::new(64);
        assert_eq!(a.measured(), Measured::default());
        a.add(64, t0);
        let m = a.measured();
        assert_eq!(
            (m.bytes, m.elapsed, m.tail_bytes, m.tail),
            (64, Duration::ZERO, 0, Duration::ZERO)
        );
        // An empty payload measures nothing.
        assert_eq!(Arrivals::new(0).measured(), Measured::default());
    }
}
