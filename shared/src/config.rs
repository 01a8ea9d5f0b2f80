//! Layered configuration: a TOML file, then environment overrides, through the `config`
//! crate; and [`ConfigError`], which always names the file and the key.
//!
//! The file is first parsed on its own with `toml` so that a mistake in it is reported
//! with its line and column; the merged result (file + environment) is then
//! deserialized into the same `deny_unknown_fields` structs.

use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read config file: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or has an unknown key or a bad value.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// Parser message: line, column, key and what was expected.
        message: String,
    },
    /// An environment override is unknown or has a bad value.
    #[error("{path} with environment overrides ({vars}): {message}")]
    Env {
        /// The file the overrides applied to.
        path: PathBuf,
        /// The variables that were set.
        vars: String,
        /// What was wrong.
        message: String,
    },
    /// A value parsed but is not acceptable.
    #[error("{path}: {key}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key, dotted (`tasks.thumb.timeout`).
        key: String,
        /// What is wrong and what would be right.
        reason: String,
    },
}

/// Range checks for numeric and duration keys, naming the file and the key.
#[derive(Debug, Clone, Copy)]
pub struct Ranges<'a> {
    /// The config file, for the error.
    pub path: &'a Path,
}

impl Ranges<'_> {
    fn invalid(&self, key: &str, reason: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            key: key.into(),
            reason,
        }
    }

    /// `value` (or `default`) if it lies in `min..=max`.
    pub fn count<T>(
        &self,
        key: &str,
        value: Option<T>,
        default: T,
        min: T,
        max: T,
    ) -> Result<T, ConfigError>
    where
        T: PartialOrd + Copy + std::fmt::Display,
    {
        let v = value.unwrap_or(default);
        if v < min || v > max {
            return Err(self.invalid(key, format!("{v} is out of range: use {min} to {max}")));
        }
        Ok(v)
    }

    /// A size in bytes held in memory (a buffer), checked in u64 against `min..=max`
    /// like [`Ranges::bytes`], then made a `usize` without truncation: a value that
    /// passes the range but not this target's address space is refused too.
    pub fn bytes_usize(
        &self,
        key: &str,
        value: Option<updraft_proto::units::ByteSize>,
        default: u64,
        min: u64,
        max: u64,
    ) -> Result<usize, ConfigError> {
        let v = self.bytes(key, value, default, min, max)?;
        usize::try_from(v).map_err(|_| {
            self.invalid(
                key,
                format!("{v} bytes is more than this machine can hold in memory"),
            )
        })
    }

    /// A count of things held in memory (slots, queue places, connections), written as
    /// any u64 and checked against `min..=max` before it becomes a `usize`: read as a
    /// `usize` itself, a value past 4 294 967 295 would fail to parse on a 32-bit
    /// board instead of being refused with its range as on a 64-bit one.
    pub fn count_usize(
        &self,
        key: &str,
        value: Option<u64>,
        default: usize,
        min: usize,
        max: usize,
    ) -> Result<usize, ConfigError> {
        let wide = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        let v = self.count(key, value, wide(default), wide(min), wide(max))?;
        Ok(usize::try_from(v).expect("at most `max`, which is a usize"))
    }

    /// A duration (or `default`) if it lies in `min..=max`.
    pub fn duration(
        &self,
        key: &str,
        value: Option<updraft_proto::units::HumanDuration>,
        default: Duration,
        min: Duration,
        max: Duration,
    ) -> Result<Duration, ConfigError> {
        check_duration(value.map_or(default, |d| d.0), (min, max))
            .map_err(|reason| self.invalid(key, reason.to_string()))
    }

    /// A size in bytes (or `default`) if it lies in `min..=max`.
    pub fn bytes(
        &self,
        key: &str,
        value: Option<updraft_proto::units::ByteSize>,
        default: u64,
        min: u64,
        max: u64,
    ) -> Result<u64, ConfigError> {
        let v = value.map_or(default, |b| b.0);
        if v < min || v > max {
            return Err(self.invalid(
                key,
                format!("{v} bytes is out of range: use {min} to {max} bytes"),
            ));
        }
        Ok(v)
    }
}

/// A duration as config files write it: `500ms`, `30s`, `5m`, `1h`, `90d` (rather than
/// humantime's months); other values in humantime's words.
pub fn duration_text(d: Duration) -> String {
    let ms = d.as_millis();
    if d.subsec_nanos().is_multiple_of(1_000_000) {
        for (unit, size) in [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1000),
        ] {
            if ms >= size && ms.is_multiple_of(size) {
                return format!("{}{unit}", ms / size);
            }
        }
        if ms > 0 && ms < 1000 {
            return format!("{ms}ms");
        }
    }
    humantime::format_duration(d).to_string()
}

/// A number or duration outside the range its key allows; the text names the value and
/// the range, for a config error or a command-line message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// A number outside `least..=most`.
    #[error("{value} is out of range: use {least} to {most}")]
    Count {
        /// The value given.
        value: u64,
        /// The smallest allowed.
        least: u64,
        /// The largest allowed.
        most: u64,
    },
    /// A duration outside `least..=most`, each written as [`duration_text`] writes it.
    #[error(
        "`{}` is out of range: use {} to {}",
        duration_text(*.value),
        duration_text(*.least),
        duration_text(*.most)
    )]
    Duration {
        /// The value given.
        value: Duration,
        /// The shortest allowed.
        least: Duration,
        /// The longest allowed.
        most: Duration,
    },
}

/// `value` within `(least, most)`, else the reason, for a number.
pub fn check_count(value: u64, (least, most): (u64, u64)) -> Result<u64, RangeError> {
    if (least..=most).contains(&value) {
        Ok(value)
    } else {
        Err(RangeError::Count { value, least, most })
    }
}

/// `value` within `(least, most)`, else the reason, for a duration.
pub fn check_duration(
    value: Duration,
    (least, most): (Duration, Duration),
) -> Result<Duration, RangeError> {
    if (least..=most).contains(&value) {
        Ok(value)
    } else {
        Err(RangeError::Duration { value, least, most })
    }
}

/// `[tasks.NAME] timeout`: a task may run up to a week.
pub const TASK_TIMEOUT: (Duration, Duration) =
    (Duration::from_millis(1), Duration::from_secs(7 * 86_400));
/// `[tasks.NAME] max_input`, `max_output`: up to 1 TiB, far past any board's disk, so
/// no sum or multiple of them can overflow.
pub const TASK_BYTES: (u64, u64) = (0, 1 << 40);

/// The ranges of the numbers in each `[tasks.NAME]` table, on either side: the key
/// (`tasks.NAME.timeout`) and the reason of the first out of range.
pub fn check_task_ranges(catalog: &crate::catalog::Catalog) -> Result<(), (String, String)> {
    for name in catalog.names() {
        let Some(spec) = catalog.get(name) else {
            continue;
        };
        let at = |k: &str, e: RangeError| (format!("tasks.{name}.{k}"), e.to_string());
        check_duration(spec.timeout, TASK_TIMEOUT).map_err(|e| at("timeout", e))?;
        check_count(spec.max_input, TASK_BYTES).map_err(|e| at("max_input", e))?;
        check_count(spec.max_output, TASK_BYTES).map_err(|e| at("max_output", e))?;
    }
    Ok(())
}

/// Loads `path` (which must exist unless `optional`), overlaid with environment
/// variables `PREFIX__KEY` (`__` between levels), into `T`.
pub fn load<T: DeserializeOwned>(
    path: &Path,
    env_prefix: &str,
    optional: bool,
) -> Result<T, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if optional && e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    from_str(&text, path, env_prefix)
}

/// Like [`load`] with the file's text already in hand (`path` only names it in errors).
pub fn from_str<T: DeserializeOwned>(
    text: &str,
    path: &Path,
    env_prefix: &str,
) -> Result<T, ConfigError> {
    let file_err = |message: String| ConfigError::File {
        path: path.to_path_buf(),
        message: one_line(&message),
    };
    // Pass 1: the file alone, for precise line/column errors.
    let from_file: T = toml::from_str(text).map_err(|e| file_err(e.to_string()))?;
    let vars: Vec<String> = std::env::vars()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with(&format!("{env_prefix}__")))
        .collect();
    if vars.is_empty() {
        return Ok(from_file);
    }
    // Pass 2: file + environment, merged by the `config` crate.
    let merged = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .add_source(
            config::Environment::with_prefix(env_prefix)
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("tags"),
        )
        .build()
        .and_then(|c| c.try_deserialize::<T>());
    merged.map_err(|e| ConfigError::Env {
        path: path.to_path_buf(),
        vars: vars.join(", "),
        message: one_line(&e.to_string()),
    })
}

/// toml's messages span several lines with a source excerpt; operators get one line
/// that keeps the position, the offending source line (which names the key) and the
/// complaint.
fn one_line(message: &str) -> String {
    let mut head = String::new();
    let mut source = None;
    let mut rest = Vec::new();
    for line in message.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if head.is_empty() {
            head = line.to_string();
        } else if let Some((num, text)) = line.split_once('|') {
            let text = text.trim();
            if num.trim().chars().all(|c| c.is_ascii_digit())
                && !num.trim().is_empty()
                && !text.is_empty()
            {
                source = Some(text.to_string());
            }
        } else if !line.chars().all(|c| c == '^' || c == ' ') {
            rest.push(line.to_string());
        }
    }
    let mut out = head;
    if let Some(src) = source {
        out.push_str(&format!(" (`{src}`)"));
    }
    if !rest.is_empty() {
        out.push_str(": ");
        out.push_str(&rest.join("; "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        #[allow(dead_code)]
        listen: String,
        #[serde(default)]
        max: u32,
    }

    #[test]
    fn unknown_key_names_key_file_and_line() {
        let e = from_str::<Cfg>(
            "listen = \"x\"\nlisen = 3\n",
            Path::new("/etc/u.toml"),
            "UPDRAFT_TEST_NONE",
        )
        .unwrap_err();
        let m = e.to_string();
        assert!(m.contains("/etc/u.toml"), "{m}");
        assert!(m.contains("lisen"), "{m}");
        assert!(m.contains("line 2"), "{m}");
        assert!(!m.contains('\n'), "{m}");
    }

    #[test]
    fn ranges_name_file_key_and_bounds() {
        let r = Ranges {
            path: Path::new("/etc/u.toml"),
        };
        assert_eq!(r.count("n", None, 4, 1, 8).unwrap(), 4);
        let m = r
            .count("n", Some(1u64 << 61), 4, 1, 1024)
            .unwrap_err()
            .to_string();
        assert!(
            m.starts_with("/etc/u.toml: n: ") && m.contains("1 to 1024"),
            "{m}"
        );
        let zero = Some(updraft_proto::units::HumanDuration(Duration::ZERO));
        let (min, max) = (Duration::from_millis(10), Duration::from_secs(60));
        let m = r
            .duration("link.keep_alive", zero, min, min, max)
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("link.keep_alive") && m.contains("10ms to 1m"),
            "{m}"
        );
    }

    #[test]
    fn sizes_and_counts_past_4_gib_are_checked_whole() {
        // Byte sizes are u64 on every target: on a 32-bit board, narrowed to usize
        // before the check, 5 GiB would read as 1 GiB and 4 GiB as 0.
        const FIVE_GIB: u64 = 5 << 30;
        let r = Ranges {
            path: Path::new("/etc/u.toml"),
        };
        let size = |n: u64| Some(updraft_proto::units::ByteSize(n));
        let max_bytes = r.bytes("journal.max_bytes", size(FIVE_GIB), 0, 64 << 10, 1 << 40);
        assert_eq!(max_bytes.unwrap(), 5_368_709_120);
        for (n, shown) in [(FIVE_GIB, "5368709120"), (4 << 30, "4294967296")] {
            let m = r
                .bytes("spool_memory", size(n), 1 << 20, 0, 1 << 30)
                .unwrap_err()
                .to_string();
            assert!(
                m.contains(&format!("spool_memory: {shown} bytes is out of range")),
                "{m}"
            );
        }
        assert_eq!(check_count(FIVE_GIB, TASK_BYTES), Ok(FIVE_GIB));
        // A buffer size: range-checked whole, then refused where no usize holds it.
        let m = r
            .bytes_usize("spool_memory", size(FIVE_GIB), 1 << 20, 0, 1 << 30)
            .unwrap_err()
            .to_string();
        assert!(m.contains("5368709120 bytes is out of range"), "{m}");
        let held = r.bytes_usize("k", size(FIVE_GIB), 0, 0, 1 << 40);
        match usize::try_from(FIVE_GIB) {
            Ok(n) => assert_eq!(held.unwrap(), n),
            Err(_) => {
                let m = held.unwrap_err().to_string();
                assert!(m.contains("k: 5368709120 bytes is more than"), "{m}");
            }
        }
        let m = r
            .count_usize("n", Some((1 << 32) + 1), 4, 1, 1024)
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("n: 4294967297 is out of range: use 1 to 1024"),
            "{m}"
        );
    }

    #[test]
    fn environment_overrides_file() {
        std::env::set_var("UPDRAFT_TEST_A__MAX", "7");
        let c: Cfg = from_str("listen = \"x\"\n", Path::new("f.toml"), "UPDRAFT_TEST_A").unwrap();
        assert_eq!(c.max, 7);
        std::env::set_var("UPDRAFT_TEST_B__BOGUS", "1");
        let e =
            from_str::<Cfg>("listen = \"x\"\n", Path::new("f.toml"), "UPDRAFT_TEST_B").unwrap_err();
        assert!(e.to_string().contains("UPDRAFT_TEST_B__BOGUS"), "{e}");
    }

    #[test]
    fn range_errors_name_the_value_and_the_range() {
        assert_eq!(
            check_count(9, (1, 8)).unwrap_err().to_string(),
            "9 is out of range: use 1 to 8"
        );
        let e = check_duration(Duration::ZERO, (Duration::from_millis(10), TASK_TIMEOUT.1));
        assert_eq!(
            e.unwrap_err().to_string(),
            "`0s` is out of range: use 10ms to 7d"
        );
        assert_eq!(
            check_duration(Duration::from_secs(1), TASK_TIMEOUT),
            Ok(Duration::from_secs(1))
        );
    }
}

/// `[tls]` as written, in `agent.toml` and `daemon.toml` alike: where a service's
/// certificate, key and CA are. Defaults are each side's (README, the config tables).
/// `ca_key` is read by the daemon only and `renew_before` by the agent only; each side
/// refuses the other's key by name ([`TlsFile::refuse`]).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    /// The CA certificate peers must chain to (agent: `state_dir/ca.pem`; daemon:
    /// `ca.pem` beside the config).
    pub ca: Option<std::path::PathBuf>,
    /// This service's certificate (agent: `state_dir/agent.pem`; daemon: `server.pem`).
    pub cert: Option<std::path::PathBuf>,
    /// This service's private key (agent: `state_dir/agent.key`; daemon: `server.key`).
    pub key: Option<std::path::PathBuf>,
    /// Daemon only: the CA's private key, to sign agent certificates at enrollment and
    /// renewal. Default `ca.key` beside `ca`; when it cannot be read, agents cannot
    /// enroll.
    pub ca_key: Option<std::path::PathBuf>,
    /// Agent only: renew the certificate over the live connection this long before it
    /// expires. Default: a third of its lifetime (30 days of a 90-day certificate).
    pub renew_before: Option<updraft_proto::units::HumanDuration>,
}

impl TlsFile {
    /// A key set that this side (`agent` or the daemon) does not read: `(key, what to
    /// do)`.
    pub fn refuse(&self, agent: bool) -> Option<(&'static str, &'static str)> {
        if agent && self.ca_key.is_some() {
            Some((
                "tls.ca_key",
                "is read by updraftd only (daemon.toml): a board never holds the CA's key; remove it",
            ))
        } else if !agent && self.renew_before.is_some() {
            Some((
                "tls.renew_before",
                "is read by updraft-agent only (agent.toml); remove it",
            ))
        } else {
            None
        }
    }
}
