//! The `updraftd` command line.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

use crate::config::{check_duration, range};

/// Updraft cloud daemon: runs tasks that edge agents offload to it.
#[derive(Debug, Parser)]
#[command(name = "updraftd", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// `updraftd` subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve agents over QUIC until SIGTERM/SIGINT, then drain.
    Serve {
        /// Config file.
        #[arg(long, default_value = crate::config::DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Certificate authority commands.
    Ca {
        /// What to do with the CA.
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Certificate commands.
    Cert {
        /// What to do with certificates.
        #[command(subcommand)]
        command: CertCommand,
    },
    /// Enrollment token commands.
    Token {
        /// What to do with tokens.
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Validate a config file and exit (0 = valid).
    CheckConfig {
        /// Config file.
        #[arg(long, default_value = crate::config::DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

/// `updraftd ca ...`
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create DIR/ca.pem ca.key server.pem server.key and print the CA fingerprint.
    Init {
        /// Directory for the files.
        #[arg(long)]
        dir: PathBuf,
        /// Host names or IPs agents will use for this daemon (repeatable, or several values).
        #[arg(long = "name", required = true, num_args = 1..)]
        names: Vec<String>,
    },
}

/// `updraftd cert ...`
#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Issue an agent certificate: OUT/agent.pem and OUT/agent.key.
    Issue {
        /// The agent's id (becomes the certificate's common name).
        #[arg(long)]
        agent_id: String,
        /// Directory for agent.pem and agent.key.
        #[arg(long)]
        out: PathBuf,
        /// Directory holding ca.pem and ca.key.
        #[arg(long, default_value = "/etc/updraft")]
        ca_dir: PathBuf,
        /// Certificate lifetime, e.g. "365d", "90d" (1s to 3650d).
        #[arg(long, default_value = "365d", value_parser = parse_lifetime)]
        valid_for: Duration,
        /// The daemon's state_dir: record the certificate there as the agent id's
        /// current one, so an unbound token cannot take the id while it is valid.
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
}

/// `updraftd token ...`
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a one-time token an agent enrolls with (`updraft-agent enroll --token`).
    /// Prints the token on stdout and the enroll command on stderr.
    Create {
        /// How long the token works, e.g. "1h", "30m", "7d" (1s to 365d).
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: Duration,
        /// Only this agent id may enroll with the token.
        #[arg(long)]
        agent_id: Option<String>,
        /// The daemon's config file (its state_dir holds the tokens).
        #[arg(long, default_value = crate::config::DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    parse_duration(s, range::TOKEN_TTL)
}

fn parse_lifetime(s: &str) -> Result<Duration, String> {
    parse_duration(s, range::CERT_ISSUE)
}

fn parse_duration(s: &str, bounds: (Duration, Duration)) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("`{s}`: {e}"))?;
    check_duration(d, bounds)
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
