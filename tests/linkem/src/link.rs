//! The sans-IO model of one direction of the link: given when a datagram entered and how
//! long it is on the wire, decide whether it is dropped and, if not, when it arrives.
//!
//! Timing: `departure = max(now, link_free_at) + wire_len * 8 / bandwidth` (the datagram
//! waits for the bottleneck, then is serialised onto it), and
//! `arrival = departure + delay + jitter_sample`, clamped so it is never before departure
//! and, unless reordering is allowed, never before the previous arrival.
//!
//! Randomness: each direction owns two seeded generators, one for loss and one for
//! jitter, and draws exactly one number from each for *every* datagram offered, whatever
//! the settings. So datagram *n*'s loss roll depends only on the seed and *n*: a run is
//! reproducible given the same datagram sequence and the same setting changes, even
//! though queue drops (which depend on wall-clock timing) may differ between runs.

use crate::params::LinkParams;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use std::time::Duration;
use tokio::time::Instant;

/// Bytes an IPv4 + UDP header adds to each datagram on a real link.
pub const IPV4_UDP_OVERHEAD: usize = 20 + 8;
/// Bytes an IPv6 + UDP header adds to each datagram on a real link.
pub const IPV6_UDP_OVERHEAD: usize = 40 + 8;

/// Mixed into the seed so the jitter stream differs from the loss stream.
const JITTER_STREAM: u64 = 0x6a09_e667_f3bc_c908;

/// What happens to one datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It arrives at the far end at this instant.
    Deliver {
        /// Arrival time.
        at: Instant,
    },
    /// Lost at random.
    Lost,
    /// Dropped because the bandwidth queue was full.
    QueueFull,
    /// Dropped because the link is blackholed.
    Blackholed,
}

/// One direction of the emulated link.
#[derive(Debug)]
pub struct Link {
    params: LinkParams,
    loss_rng: StdRng,
    jitter_rng: StdRng,
    /// When the bottleneck finishes serialising the last accepted datagram.
    link_free_at: Option<Instant>,
    /// Arrival time of the last delivered datagram, to keep order.
    last_arrival: Option<Instant>,
}

impl Link {
    /// A link with these settings whose random decisions follow `seed`.
    pub fn new(params: LinkParams, seed: u64) -> Self {
        Self {
            params,
            loss_rng: StdRng::seed_from_u64(seed),
            jitter_rng: StdRng::seed_from_u64(seed ^ JITTER_STREAM),
            link_free_at: None,
            last_arrival: None,
        }
    }

    /// The settings in force.
    pub fn params(&self) -> &LinkParams {
        &self.params
    }

    /// Replaces the settings for datagrams offered from now on. The bottleneck's backlog is
    /// kept, so lowering the cap does not empty the queue.
    pub fn set_params(&mut self, params: LinkParams) {
        self.params = params;
    }

    /// Offers a datagram that entered the link at `now` and takes `wire_len` bytes on the
    /// wire (payload plus headers).
    pub fn admit(&mut self, now: Instant, wire_len: usize) -> Verdict {
        // Always draw, so the n-th datagram's fate does not depend on what came before.
        let loss_roll: f64 = self.loss_rng.random();
        let jitter_roll: f64 = self.jitter_rng.random();
        let p = &self.params;

        if p.blackhole {
            return Verdict::Blackholed;
        }

        let mut departure = now;
        if let Some(bps) = p.bandwidth_bps {
            let start = self.link_free_at.map_or(now, |free| free.max(now));
            // The queue holds whatever the link has yet to serialise.
            let backlog = start.saturating_duration_since(now);
            let backlog_bytes = (backlog.as_nanos() * u128::from(bps) / 8 / 1_000_000_000) as usize;
            if backlog_bytes + wire_len > p.queue_limit_bytes {
                return Verdict::QueueFull;
            }
            departure = start + serialisation(wire_len, bps);
            self.link_free_at = Some(departure);
        }

        if loss_roll < p.loss {
            return Verdict::Lost;
        }

        let mut at = departure + p.delay;
        if !p.jitter.is_zero() {
            // Uniform in [-jitter, +jitter), never before departure.
            let offset = (jitter_roll * 2.0 - 1.0) * p.jitter.as_secs_f64();
            at = if offset >= 0.0 {
                at + Duration::from_secs_f64(offset)
            } else {
                at.checked_sub(Duration::from_secs_f64(-offset))
                    .unwrap_or(departure)
                    .max(departure)
            };
        }
        if !p.reorder {
            if let Some(last) = self.last_arrival {
                at = at.max(last);
            }
        }
        self.last_arrival = Some(self.last_arrival.map_or(at, |last| last.max(at)));
        Verdict::Deliver { at }
    }
}

/// How long `wire_len` bytes occupy a link of `bps` bits per second.
fn serialisation(wire_len: usize, bps: u64) -> Duration {
    let nanos = (wire_len as u128) * 8 * 1_000_000_000 / u128::from(bps.max(1));
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(v: Verdict) -> Instant {
        match v {
            Verdict::Deliver { at } => at,
            other => panic!("expected delivery, got {other:?}"),
        }
    }

    #[test]
    fn perfect_link_delivers_now() {
        let mut link = Link::new(LinkParams::default(), 1);
        let now = Instant::now();
        for _ in 0..100 {
            assert_eq!(link.admit(now, 1200), Verdict::Deliver { at: now });
        }
    }

    #[test]
    fn delay_is_added() {
        let p = LinkParams {
            delay: Duration::from_millis(100),
            ..LinkParams::default()
        };
        let mut link = Link::new(p, 1);
        let now = Instant::now();
        assert_eq!(at(link.admit(now, 100)), now + Duration::from_millis(100));
    }

    #[test]
    fn bandwidth_serialises_back_to_back() {
        // 1 Mbit/s, 1000-byte datagrams: 8 ms each.
        let p = LinkParams {
            bandwidth_bps: Some(1_000_000),
            ..LinkParams::default()
        };
        let mut link = Link::new(p, 1);
        let now = Instant::now();
        for i in 1..=10u64 {
            assert_eq!(
                at(link.admit(now, 1000)),
                now + Duration::from_millis(8 * i)
            );
        }
        // Later, once the link is idle again, a datagram goes straight through.
        let later = now + Duration::from_secs(1);
        assert_eq!(
            at(link.admit(later, 1000)),
            later + Duration::from_millis(8)
        );
    }

    #[test]
    fn queue_drops_tail() {
        let p = LinkParams {
            bandwidth_bps: Some(8_000), // 1000 bytes/s
            queue_limit_bytes: 3000,
            ..LinkParams::default()
        };
        let mut link = Link::new(p, 1);
        let now = Instant::now();
        // The first datagram's own serialisation counts as backlog for the next ones.
        assert!(matches!(link.admit(now, 1000), Verdict::Deliver { .. }));
        assert!(matches!(link.admit(now, 1000), Verdict::Deliver { .. }));
        assert!(matches!(link.admit(now, 1000), Verdict::Deliver { .. }));
        assert_eq!(link.admit(now, 1000), Verdict::QueueFull);
        // After one second one datagram has drained, so one more fits.
        let later = now + Duration::from_secs(1);
        assert!(matches!(link.admit(later, 1000), Verdict::Deliver { .. }));
        assert_eq!(link.admit(later, 1000), Verdict::QueueFull);
    }

    #[test]
    fn loss_is_seeded_and_roughly_right() {
        let p = LinkParams {
            loss: 0.2,
            ..LinkParams::default()
        };
        let now = Instant::now();
        let run = |seed| {
            let mut link = Link::new(p, seed);
            (0..10_000)
                .map(|_| link.admit(now, 100) == Verdict::Lost)
                .collect::<Vec<_>>()
        };
        let a = run(7);
        assert_eq!(a, run(7));
        assert_ne!(a, run(8));
        let lost = a.iter().filter(|l| **l).count();
        assert!((1500..2500).contains(&lost), "lost {lost} of 10000");
    }

    #[test]
    fn loss_pattern_ignores_other_settings() {
        // Blackholing some datagrams must not shift which later ones are lost.
        let now = Instant::now();
        let lossy = LinkParams {
            loss: 0.3,
            ..LinkParams::default()
        };
        let mut plain = Link::new(lossy, 3);
        let mut toggled = Link::new(lossy, 3);
        for i in 0..1000 {
            let a = plain.admit(now, 100);
            toggled.set_params(LinkParams {
                blackhole: i % 7 == 0,
                ..lossy
            });
            let b = toggled.admit(now, 100);
            if i % 7 != 0 {
                assert_eq!(a == Verdict::Lost, b == Verdict::Lost, "datagram {i}");
            }
        }
    }

    #[test]
    fn jitter_stays_in_bounds_and_keeps_order() {
        let p = LinkParams {
            delay: Duration::from_millis(50),
            jitter: Duration::from_millis(10),
            ..LinkParams::default()
        };
        let mut link = Link::new(p, 9);
        let now = Instant::now();
        let mut prev = now;
        for i in 0..1000u64 {
            let sent = now + Duration::from_micros(100 * i);
            let t = at(link.admit(sent, 100));
            assert!(t >= prev, "reordered at {i}");
            assert!(t >= sent + Duration::from_millis(40));
            // Order-keeping may push an arrival past +jitter, but only to the previous one.
            assert!(t <= (sent + Duration::from_millis(60)).max(prev));
            prev = t;
        }
    }

    #[test]
    fn jitter_may_reorder_when_allowed() {
        let p = LinkParams {
            delay: Duration::from_millis(50),
            jitter: Duration::from_millis(20),
            reorder: true,
            ..LinkParams::default()
        };
        let mut link = Link::new(p, 9);
        let now = Instant::now();
        let times: Vec<_> = (0..200).map(|_| at(link.admit(now, 100))).collect();
        assert!(times.windows(2).any(|w| w[1] < w[0]));
        assert!(times.iter().all(|t| *t >= now + Duration::from_millis(30)));
    }

    #[test]
    fn blackhole_drops() {
        let p = LinkParams {
            blackhole: true,
            ..LinkParams::default()
        };
        let mut link = Link::new(p, 1);
        assert_eq!(link.admit(Instant::now(), 100), Verdict::Blackholed);
    }
}
