//! `updraft-agent`: parse the command line, load config, call into the library.
#![forbid(unsafe_code)]

use clap::Parser;
use std::process::ExitCode;
use updraft_agent::cli::{Cli, Command, EXIT_BAD_CONFIG, EXIT_UNAVAILABLE};
use updraft_agent::config::{AgentConfig, DEFAULT_CONFIG};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("updraft-agent: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
    };
    if let Command::Policy {
        command: updraft_agent::cli::PolicyCommand::Check { file },
    } = &cli.command
    {
        return ExitCode::from(updraft_agent::cli::policy_check(file));
    }
    if !matches!(cli.command, Command::Serve) {
        return ExitCode::from(rt.block_on(updraft_agent::cli::run_client(cli)));
    }
    updraft_shared::logging::init("UPDRAFT_AGENT_LOG");
    let path = cli.config.clone().unwrap_or_else(|| DEFAULT_CONFIG.into());
    let config = match AgentConfig::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("updraft-agent: {e}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    match rt.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("updraft-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: AgentConfig) -> anyhow::Result<()> {
    use anyhow::Context;
    let identity = updraft_shared::tls::Identity::load(&config.tls_ca, &config.tls_cert, &config.tls_key)
        .context("loading the agent's TLS files (issue them with `updraftd cert issue`, or set [tls] in agent.toml)")?;
    let listener = updraft_agent::service::bind_socket(&config.socket)?;
    let agent = updraft_agent::service::Agent::new(config, &identity)?;
    updraft_agent::service::run(agent, listener, updraft_shared::signals::terminated()).await
}
