//! Link settings for one direction, their validation, and the text forms (`100ms`,
//! `10mbit`, `256KiB`, `5%`) shared by the `linkem` command line and its stdin commands.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// Drop-tail queue in front of a bandwidth cap, when none is given.
///
/// 256 KiB is roughly what a home router or a cellular modem buffers: about 2 s at
/// 1 Mbit/s, enough to show bufferbloat in a benchmark without making a capped link
/// hold minutes of data.
pub const DEFAULT_QUEUE_LIMIT_BYTES: usize = 256 * 1024;

/// How one direction of the emulated link treats the datagrams that enter it.
///
/// [`Default`] is a perfect link: no delay, no loss, no cap. Changes apply to datagrams
/// that enter the link after the change; datagrams already scheduled keep their arrival
/// time, except that turning [`blackhole`](Self::blackhole) on also drops everything
/// still in flight (a cut cable loses what was on it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkParams {
    /// One-way propagation delay added to every datagram.
    pub delay: Duration,
    /// Jitter: each datagram's delay is `delay + u`, with `u` drawn uniformly from
    /// `[-jitter, +jitter)` (uniform rather than normal so the bounds are hard and easy to
    /// reason about in tests). The total is never below zero, and unless
    /// [`reorder`](Self::reorder) is set a datagram never arrives before the one in front of
    /// it, so with jitter the mean delay sits a little above `delay`.
    pub jitter: Duration,
    /// Probability in `0..=1` that a datagram is lost, decided independently per datagram.
    /// Lost datagrams still occupy the bandwidth cap: they are lost on the path after the
    /// bottleneck.
    pub loss: f64,
    /// Bandwidth cap in bits per second, `None` for unlimited. A datagram occupies the link
    /// for `wire_len * 8 / bandwidth_bps`, where `wire_len` counts the IP and UDP headers
    /// (28 bytes for IPv4, 48 for IPv6) as a real link would; datagrams wait in a FIFO
    /// queue for their turn.
    pub bandwidth_bps: Option<u64>,
    /// Drop every datagram, including those already in flight, while set.
    pub blackhole: bool,
    /// Bytes the bandwidth queue holds before it drops new arrivals (drop-tail). Only
    /// meaningful with a bandwidth cap. Default [`DEFAULT_QUEUE_LIMIT_BYTES`].
    pub queue_limit_bytes: usize,
    /// Let jitter reorder datagrams. Off by default: real links mostly keep order, and
    /// QUIC treats reordering beyond its threshold as loss.
    pub reorder: bool,
}

impl Default for LinkParams {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            bandwidth_bps: None,
            blackhole: false,
            queue_limit_bytes: DEFAULT_QUEUE_LIMIT_BYTES,
            reorder: false,
        }
    }
}

/// A link setting that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ParamsError {
    /// Loss must be a probability.
    #[error("loss {0} is not a probability in 0..=1")]
    Loss(f64),
    /// A bandwidth cap of zero would be a blackhole; say `blackhole on` instead.
    #[error(
        "bandwidth must be above 0 bit/s (use `bandwidth off` for no cap, `blackhole on` for none)"
    )]
    ZeroBandwidth,
    /// The value could not be read; the message names what was expected.
    #[error("{0}")]
    Parse(String),
}

impl LinkParams {
    /// Checks that the settings make sense.
    pub fn validate(&self) -> Result<(), ParamsError> {
        if !(0.0..=1.0).contains(&self.loss) {
            return Err(ParamsError::Loss(self.loss));
        }
        if self.bandwidth_bps == Some(0) {
            return Err(ParamsError::ZeroBandwidth);
        }
        Ok(())
    }

    /// The settings as JSON with human units, for the `params` command.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "delay": humantime::format_duration(self.delay).to_string(),
            "jitter": humantime::format_duration(self.jitter).to_string(),
            "loss": self.loss,
            "bandwidth_bps": self.bandwidth_bps,
            "blackhole": self.blackhole,
            "queue_limit_bytes": self.queue_limit_bytes,
            "reorder": self.reorder,
        })
    }
}

/// Reads a duration such as `100ms`, `1.5s` or `0`.
pub fn parse_duration(s: &str) -> Result<Duration, ParamsError> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s)
        .map_err(|e| ParamsError::Parse(format!("bad duration {s:?} ({e}); e.g. 100ms, 1s")))
}

/// Reads a bandwidth in bits per second: a number with an optional decimal (SI) suffix
/// `bit`, `kbit`, `mbit` or `gbit`, e.g. `10mbit`, `1.5mbit`, `64000`. `off`, `none` and
/// `unlimited` mean no cap (`None`). Suffixes ending in `bps` are refused because `tc`
/// reads them as bytes per second and other tools as bits; spelling it `mbit` leaves no
/// doubt.
pub fn parse_bandwidth(s: &str) -> Result<Option<u64>, ParamsError> {
    let lower = s.trim().to_ascii_lowercase();
    if matches!(lower.as_str(), "off" | "none" | "unlimited") {
        return Ok(None);
    }
    let bad = || {
        ParamsError::Parse(format!(
            "bad bandwidth {s:?}; e.g. 10mbit, 500kbit, 64000 (bit/s), or off"
        ))
    };
    if lower.ends_with("bps") {
        return Err(ParamsError::Parse(format!(
            "ambiguous bandwidth {s:?}: write bits per second as kbit/mbit/gbit, e.g. 10mbit"
        )));
    }
    let split = lower
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(lower.len());
    let (number, unit) = lower.split_at(split);
    let number: f64 = number.parse().map_err(|_| bad())?;
    let scale = match unit {
        "" | "bit" => 1.0,
        "kbit" | "k" => 1e3,
        "mbit" | "m" => 1e6,
        "gbit" | "g" => 1e9,
        _ => return Err(bad()),
    };
    let bps = (number * scale).round();
    if !bps.is_finite() || bps > u64::MAX as f64 {
        return Err(bad());
    }
    if bps < 1.0 {
        return Err(ParamsError::ZeroBandwidth);
    }
    Ok(Some(bps as u64))
}

/// Reads a loss probability: `0.05` or `5%`.
pub fn parse_loss(s: &str) -> Result<f64, ParamsError> {
    let s = s.trim();
    let bad = || ParamsError::Parse(format!("bad loss {s:?}; e.g. 0.05 or 5%"));
    let loss = match s.strip_suffix('%') {
        Some(pct) => pct.trim().parse::<f64>().map_err(|_| bad())? / 100.0,
        None => s.parse::<f64>().map_err(|_| bad())?,
    };
    if !(0.0..=1.0).contains(&loss) {
        return Err(ParamsError::Loss(loss));
    }
    Ok(loss)
}

/// Reads a byte size such as `256KiB`, `1MiB` or `65536`.
pub fn parse_size(s: &str) -> Result<usize, ParamsError> {
    let s = s.trim();
    let size: bytesize::ByteSize = s
        .parse()
        .map_err(|e| ParamsError::Parse(format!("bad size {s:?} ({e}); e.g. 256KiB")))?;
    usize::try_from(size.as_u64()).map_err(|_| ParamsError::Parse(format!("size {s:?} too large")))
}

/// Reads `on`/`off` (also `true`/`false`, `1`/`0`, `yes`/`no`).
pub fn parse_switch(s: &str) -> Result<bool, ParamsError> {
    match s.trim().to_ascii_lowercase().as_str() {
        "on" | "true" | "1" | "yes" => Ok(true),
        "off" | "false" | "0" | "no" => Ok(false),
        other => Err(ParamsError::Parse(format!(
            "expected on or off, got {other:?}"
        ))),
    }
}

/// Whether `addr` is on the loopback network: `127.0.0.0/8`, `::1`, or an IPv4-mapped
/// IPv6 form of `127.0.0.0/8`. These are the only addresses the relay uses by default.
pub fn is_loopback(addr: &SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidth_units() {
        assert_eq!(parse_bandwidth("10mbit").unwrap(), Some(10_000_000));
        assert_eq!(parse_bandwidth("1.5Mbit").unwrap(), Some(1_500_000));
        assert_eq!(parse_bandwidth("500kbit").unwrap(), Some(500_000));
        assert_eq!(parse_bandwidth("64000").unwrap(), Some(64_000));
        assert_eq!(parse_bandwidth("1gbit").unwrap(), Some(1_000_000_000));
        assert_eq!(parse_bandwidth("off").unwrap(), None);
        assert!(parse_bandwidth("10mbps").is_err());
        assert!(parse_bandwidth("0").is_err());
        assert!(parse_bandwidth("fast").is_err());
        assert!(parse_bandwidth("10furlong").is_err());
    }

    #[test]
    fn durations_losses_sizes_switches() {
        assert_eq!(parse_duration("100ms").unwrap(), Duration::from_millis(100));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("soon").is_err());
        assert_eq!(parse_loss("0.05").unwrap(), 0.05);
        assert_eq!(parse_loss("5%").unwrap(), 0.05);
        assert!(parse_loss("1.5").is_err());
        assert!(parse_loss("-0.1").is_err());
        assert!(parse_loss("NaN").is_err());
        assert_eq!(parse_size("256KiB").unwrap(), 256 * 1024);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_switch("on").unwrap());
        assert!(!parse_switch("off").unwrap());
        assert!(parse_switch("maybe").is_err());
    }

    #[test]
    fn validation() {
        assert!(LinkParams::default().validate().is_ok());
        let p = LinkParams {
            loss: 1.2,
            ..LinkParams::default()
        };
        assert_eq!(p.validate(), Err(ParamsError::Loss(1.2)));
        let p = LinkParams {
            bandwidth_bps: Some(0),
            ..LinkParams::default()
        };
        assert_eq!(p.validate(), Err(ParamsError::ZeroBandwidth));
    }

    #[test]
    fn loopback_only() {
        let yes = [
            "127.0.0.1:1",
            "127.9.8.7:1",
            "[::1]:1",
            "[::ffff:127.0.0.1]:1",
        ];
        let no = [
            "0.0.0.0:1",
            "10.0.0.1:1",
            "192.168.1.1:1",
            "[::]:1",
            "8.8.8.8:53",
        ];
        for a in yes {
            assert!(is_loopback(&a.parse().unwrap()), "{a}");
        }
        for a in no {
            assert!(!is_loopback(&a.parse().unwrap()), "{a}");
        }
    }
}
