//! The `updraftd` command line.

use std::time::Duration;

use crate::config::{check_duration, range};

mod args;
pub use args::{
    AgentCommand, CaCommand, CertCommand, Cli, Command, PolicyCommand, TokenCommand, DEFAULT_CONFIG,
};

/// What `--version` prints after the name: the package version and the git commit the
/// binary was built from (`unknown` when built outside a checkout; see build.rs).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("UPDRAFT_COMMIT"),
    ")"
);

fn parse_ttl(s: &str) -> Result<Duration, String> {
    parse_duration(s, range::TOKEN_TTL)
}

fn parse_lifetime(s: &str) -> Result<Duration, String> {
    parse_duration(s, range::CERT_ISSUE)
}

fn parse_window(s: &str) -> Result<Duration, String> {
    parse_duration(s, range::PUSH_WINDOW)
}

fn parse_duration(s: &str, bounds: (Duration, Duration)) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("`{s}`: {e}"))?;
    check_duration(d, bounds).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_on_the_command_line_are_bounded() {
        assert_eq!(parse_ttl("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_ttl("0s").unwrap_err().contains("out of range"));
        let e = parse_ttl("100000000d").unwrap_err();
        assert!(
            e.contains("out of range") && e.contains("1s to 365d"),
            "{e}"
        );
        assert!(parse_lifetime("100000000d").is_err());
        assert!(parse_lifetime("300000000000d").is_err());
        assert!(parse_lifetime("90d").is_ok());
        assert!(parse_ttl("soon").unwrap_err().contains("`soon`"));
    }
}
