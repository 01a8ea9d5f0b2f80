// The `updraftd` command line as clap sees it: only clap and std here, and names from
// the parent module, so the build script can include this file to write the man page
// and shell completions (see build.rs) without linking them into the binary.

use super::{parse_lifetime, parse_ttl, parse_window, VERSION};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

/// Where `updraftd` looks for its config when none is given.
pub const DEFAULT_CONFIG: &str = "/etc/updraft/daemon.toml";

/// Updraft cloud daemon: runs tasks that edge agents offload to it.
#[derive(Debug, Parser)]
#[command(name = "updraftd", version = VERSION, about)]
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
        #[arg(long, default_value = DEFAULT_CONFIG)]
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
    /// List the agents the running daemon knows: connected now or last seen, version,
    /// certificate expiry, policy in force and where their tasks ran over the last hour.
    /// Asks the daemon on its admin socket.
    Agents {
        /// One JSON array (one object with --id) instead of a table.
        #[arg(long)]
        json: bool,
        /// Only this agent, with every field.
        #[arg(long)]
        id: Option<String>,
        /// The daemon's config file (names its admin socket).
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Push a policy file to the boards, or see how far a push went.
    Policy {
        /// What to do.
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Commands on one agent.
    Agent {
        /// What to do.
        #[command(subcommand)]
        command: AgentCommand,
    },
    /// Validate a config file and exit (0 = valid).
    CheckConfig {
        /// Config file.
        #[arg(long, default_value = DEFAULT_CONFIG)]
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
    /// Show the CA in use (its fingerprint, what `enroll --ca-sha256` takes, and its
    /// expiry) and the server certificate (the names agents may dial, and its expiry).
    Show {
        /// The daemon's config file (its [tls] names the files).
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

/// `updraftd cert ...`
#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Issue a new server certificate from the CA you have (new names or addresses, or
    /// one nearing its end): OUT/server.pem and OUT/server.key. Agents keep trusting it.
    Server {
        /// Host names or IPs agents will use for this daemon (repeatable, or several values).
        #[arg(long = "name", required = true, num_args = 1..)]
        names: Vec<String>,
        /// Directory for server.pem and server.key.
        #[arg(long)]
        out: PathBuf,
        /// Directory holding ca.pem and ca.key.
        #[arg(long, default_value = "/etc/updraft")]
        ca_dir: PathBuf,
    },
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
        #[arg(long, conflicts_with = "agent_id_prefix")]
        agent_id: Option<String>,
        /// Only agent ids starting with this may enroll with the tokens.
        #[arg(long)]
        agent_id_prefix: Option<String>,
        /// How many tokens to make, one per line (1 to 10000).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        count: u32,
        /// How many boards, each with its own agent id, one token may enroll (1 to 10000).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        uses: u32,
        /// Write the tokens to this file (mode 0600, one per line) instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// The daemon's config file (its state_dir holds the tokens).
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// List tokens: live ones, and used, expired or revoked ones of the last week. A
    /// token is shown by its id (the start of its SHA-256); the token itself is never
    /// stored.
    List {
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
        /// The daemon's config file (its state_dir holds the tokens).
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Withdraw a live token: it enrolls nothing from now on.
    Revoke {
        /// The token's id as `token list` shows it.
        id: String,
        /// The daemon's config file (its state_dir holds the tokens).
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

/// `updraftd agent ...`
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Revoke an agent: its certificates are refused from now on, at the handshake and at
    /// renewal, and its live connections are closed. Only a token bound to its id
    /// (`token create --agent-id ID`) enrolls it again.
    Revoke {
        /// The agent id.
        id: String,
        /// The daemon's config file (names its admin socket).
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

/// `updraftd policy ...`
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Check FILE with the parser agents use and push it over the live connections; each
    /// board applies it as its managed policy (boards offline get it when they connect)
    /// and reports applied, refused (file:line:col) or declined.
    Push {
        /// The policy file.
        file: PathBuf,
        /// Only these agents (comma-separated ids).
        #[arg(long, value_delimiter = ',')]
        agents: Option<Vec<String>>,
        /// Push to this many connected boards first; the rest only if none refused it
        /// and their share of fallbacks and errors did not rise within --window.
        #[arg(long, default_value_t = 0)]
        canary: u32,
        /// How long the canaries are watched after they answered, e.g. "5m" (up to 1d).
        #[arg(long, default_value = "5m", value_parser = parse_window)]
        window: Duration,
        /// The daemon's config file (names its admin socket).
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// How far the last push went: its stage, and each board in its scope.
    Status {
        /// The JSON the admin socket answers instead of text.
        #[arg(long)]
        json: bool,
        /// The daemon's config file (names its admin socket).
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}
