//! Human-readable durations (`"30s"`, `"1h 5m"`) and sizes (`"16MiB"`, `1024`) for config files.

use serde::{Deserialize, Deserializer};
use std::time::Duration;

/// A duration written the way people write them: `"250ms"`, `"30s"`, `"1h"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map(HumanDuration)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "`{text}` is not a duration ({e}); write e.g. \"500ms\", \"30s\", \"5m\""
                ))
            })
    }
}

/// A size in bytes: a plain integer or a string such as `"64KiB"`, `"16MiB"`, `"1GB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Text(text) => parse_size(&text)
                .map(ByteSize)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// A size that is not a number with a known unit, or that does not fit 64 bits; holds
/// the text given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a size; write e.g. 4096, \"64KiB\", \"16MiB\"")]
pub struct SizeError(pub String);

/// Parses `"16MiB"`, `"64 KiB"`, `"1GB"`, `"512"`.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || SizeError(text.to_string());
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("16MiB").unwrap(), 16 << 20);
        assert_eq!(parse_size("64 KiB").unwrap(), 64 << 10);
        assert_eq!(parse_size("1GB").unwrap(), 1_000_000_000);
        assert_eq!(parse_size("7").unwrap(), 7);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("16 parsecs").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
    }

    #[test]
    fn a_bad_size_says_how_to_write_one() {
        assert_eq!(
            parse_size("16 parsecs").unwrap_err().to_string(),
            "`16 parsecs` is not a size; write e.g. 4096, \"64KiB\", \"16MiB\""
        );
        assert_eq!(
            parse_size("17179869184GiB"),
            Err(SizeError("17179869184GiB".into()))
        );
        let e = toml::from_str::<std::collections::BTreeMap<String, ByteSize>>("a = \"lots\"");
        assert!(e
            .unwrap_err()
            .to_string()
            .contains("`lots` is not a size; write e.g. 4096"),);
    }

    #[test]
    fn sizes_past_4_gib_stay_whole() {
        // u64 on every target: a 32-bit board must not read 5 GiB as 1 GiB.
        assert_eq!(parse_size("5GiB").unwrap(), 5_368_709_120);
        assert_eq!(parse_size("5368709120").unwrap(), 5_368_709_120);
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        #[derive(Deserialize)]
        struct F {
            text: ByteSize,
            int: ByteSize,
        }
        let f: F = toml::from_str("text = \"5GiB\"\nint = 5368709120").unwrap();
        assert_eq!((f.text.0, f.int.0), (5_368_709_120, 5_368_709_120));
    }
}
