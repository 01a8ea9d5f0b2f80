// The `updraft-agent` command line as clap sees it: only clap and std here, and
// names from the parent module, so the build script can include this file to write the
// man page and shell completions (see build.rs) without linking them into the binary.

use super::{parse_where, Where, VERSION};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Updraft edge agent: runs tasks on this board or offloads them to the cloud.
#[derive(Debug, Parser)]
#[command(name = "updraft-agent", version = VERSION, about)]
pub struct Cli {
    /// The agent's API socket, for the client commands (run, result, status, policy
    /// explain); may also follow the command.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Config file, for serve, check-config, enroll, and the client commands (which
    /// read its `socket`); may also follow the command.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// `--config` of the commands that read the agent's config.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConfigArg {
    /// Config file. Default /etc/updraft/agent.toml.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// Where a client command finds the agent.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientArgs {
    /// The agent's API socket.
    #[arg(long, conflicts_with = "config")]
    pub socket: Option<PathBuf>,
    /// Config file whose `socket` to use.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// `updraft-agent` subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent service until SIGTERM/SIGINT.
    Serve {
        /// Config.
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Check the config as `serve` would, without serving: agent.toml, the TLS
    /// files (loaded, and the key matched to the certificate), the policy file.
    /// Binds no socket and opens no journal. Exit 0 when all is well, 64 otherwise.
    CheckConfig {
        /// Config.
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Check what this board needs, one line per check: config, certificate expiry,
    /// policy against the catalog (rules that match no task), each daemon (reachable,
    /// CA pin, clock skew, tasks it does not offer), journal, disk space in state_dir.
    /// Exit 0 when no check failed, 1 otherwise.
    Doctor {
        /// Config.
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Join a daemon: make a key here, send a certificate request with a one-time
    /// token over TLS pinned to the CA fingerprint, and store key, certificate and CA
    /// where `serve` finds them (`[tls]` paths, default in state_dir).
    Enroll {
        /// The daemon, `host:port`.
        #[arg(long)]
        server: String,
        /// The name the daemon's certificate must have. Default: server_name of the
        /// [[cloud]] entry with this address in the config, else the host of --server.
        #[arg(long)]
        server_name: Option<String>,
        /// The token `updraftd token create` printed.
        #[arg(long)]
        token: String,
        /// The CA fingerprint `updraftd ca init` printed (SHA-256, hex).
        #[arg(long = "ca-sha256")]
        ca_sha256: String,
        /// The agent id to ask for. Default: agent_id in the config, else the host name
        /// (a name images ship with, like raspberrypi, gets the first 12 hex digits of
        /// /etc/machine-id appended).
        #[arg(long)]
        agent_id: Option<String>,
        /// Replace a certificate that is still valid.
        #[arg(long)]
        force: bool,
        /// Config.
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Run a task and print its output; exits with the task's exit code.
    Run {
        /// Task name from the catalog.
        task: String,
        /// Input file, or `-` for stdin. Default: no input.
        #[arg(long)]
        input: Option<PathBuf>,
        /// Output file, or `-` for stdout (default).
        #[arg(long)]
        output: Option<PathBuf>,
        /// Where to run: auto, local or cloud (local/cloud: no fallback).
        #[arg(long = "where", value_name = "WHERE", value_parser = parse_where)]
        where_: Option<Where>,
        /// Return at once and print only the task id.
        #[arg(long)]
        detach: bool,
        /// Print where the task ran and why, on stderr.
        #[arg(long)]
        explain: bool,
        /// Where the agent is.
        #[command(flatten)]
        at: ClientArgs,
        /// Extra arguments for the task (needs allow_args = true).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Print a detached task's output; exits with its exit code.
    Result {
        /// Task id printed by `run --detach`.
        id: String,
        /// Wait until the task has finished.
        #[arg(long)]
        wait: bool,
        /// Then delete the task and its output from the agent's journal, freeing its
        /// space now instead of the journal's fetched_ttl after this fetch.
        #[arg(long)]
        delete: bool,
        /// Where the agent is.
        #[command(flatten)]
        at: ClientArgs,
    },
    /// Show the agent's state: daemons, local load, recent decisions.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Where the agent is.
        #[command(flatten)]
        at: ClientArgs,
    },
    /// Policy commands.
    Policy {
        /// What to do with the policy.
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

/// `updraft-agent policy ...`
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Check a policy file before deploying it: prints its rules, or the error with
    /// file:line:column. Needs no running agent.
    Check {
        /// The policy file.
        file: PathBuf,
    },
    /// Ask the running agent where a task would run now, and why.
    Explain {
        /// Task name.
        task: String,
        /// Assume an input of this many bytes.
        #[arg(long)]
        input_bytes: Option<u64>,
        /// Print JSON (with every signal) instead of one line.
        #[arg(long)]
        json: bool,
        /// Where the agent is.
        #[command(flatten)]
        at: ClientArgs,
    },
}
