//! `updraft-agent`: parse the command line, load config, call into the library.
#![forbid(unsafe_code)]

use clap::Parser;
use std::process::ExitCode;
use updraft_agent::cli::{Cli, Command, ConfigArg, EXIT_BAD_CONFIG, EXIT_UNAVAILABLE};

/// Exit code for a command line that asks for something that would do nothing (EX_USAGE).
const EXIT_USAGE: u8 = 64;
use updraft_agent::config::{AgentConfig, DEFAULT_CONFIG};

fn main() -> ExitCode {
    // First: a task's entry into its cgroup never reaches the rest.
    updraft_shared::contain::task_entry();
    updraft_shared::logging::exit_on_panic("updraft-agent");
    let mut cli = Cli::parse();
    if let Err(e) = cli.normalize() {
        eprintln!("updraft-agent: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
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
    match &cli.command {
        Command::Policy {
            command: updraft_agent::cli::PolicyCommand::Check { file },
        } => return ExitCode::from(updraft_agent::cli::policy_check(file)),
        Command::CheckConfig { config } => return check_config(config),
        Command::Enroll {
            server,
            server_name,
            token,
            ca_sha256,
            agent_id,
            force,
            config,
        } => {
            let config = match load_config(config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let enrolled = rt.block_on(updraft_agent::enroll::enroll(
                &config,
                server,
                server_name.as_deref(),
                token,
                ca_sha256,
                agent_id.as_deref(),
                *force,
            ));
            return match enrolled {
                Ok(e) => {
                    println!(
                        "enrolled as `{}`: {} (certificate, valid until {}), {}, {}; start or restart the agent to use it",
                        e.agent_id,
                        e.files.cert.display(),
                        humantime::format_rfc3339_seconds(e.not_after),
                        e.files.key.display(),
                        e.files.ca.display(),
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("updraft-agent: enroll: {e:#}");
                    ExitCode::from(EXIT_UNAVAILABLE)
                }
            };
        }
        Command::Serve { .. } => {}
        _ => return ExitCode::from(rt.block_on(updraft_agent::cli::run_client(cli))),
    }
    let Command::Serve { config } = &cli.command else {
        unreachable!("only serve is left")
    };
    updraft_shared::logging::init("UPDRAFT_AGENT_LOG");
    let config = match load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Some(level) = &config.log_level {
        if let Ok(filter) = updraft_shared::logging::parse_level(level) {
            updraft_shared::logging::set_level(filter);
        }
    }
    match rt.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("updraft-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The config `--config` names (default /etc/updraft/agent.toml), or the exit code for
/// a bad one, already explained on stderr.
fn load_config(arg: &ConfigArg) -> Result<AgentConfig, ExitCode> {
    let path = arg.config.clone().unwrap_or_else(|| DEFAULT_CONFIG.into());
    AgentConfig::load(&path).map_err(|e| {
        eprintln!("updraft-agent: {e}");
        ExitCode::from(EXIT_BAD_CONFIG)
    })
}

/// `check-config`: 0 and one line on stdout when `serve` would start; 64 and the
/// reason on stderr otherwise.
fn check_config(arg: &ConfigArg) -> ExitCode {
    let config = match load_config(arg) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let path = arg.config.clone().unwrap_or_else(|| DEFAULT_CONFIG.into());
    match updraft_agent::cli::check_config(&config) {
        Ok(summary) => {
            println!("{}: {summary}", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("updraft-agent: {}: {e:#}", path.display());
            ExitCode::from(EXIT_BAD_CONFIG)
        }
    }
}

async fn serve(config: AgentConfig) -> anyhow::Result<()> {
    use anyhow::Context;
    // Before any task runs: everything a task starts must be found when it ends.
    updraft_shared::contain::init();
    let files = updraft_agent::enroll::CertFiles::of(&config);
    if files
        .finish_swap()
        .context("finishing a certificate replacement")?
    {
        tracing::info!(cert = %files.cert.display(), "finished a certificate replacement a restart interrupted");
    }
    let identity = files.load().context(
        "loading the agent's TLS files (enroll with `updraft-agent enroll`, or set [tls] in agent.toml)",
    )?;
    let listener = updraft_agent::api::bind_socket(&config.socket)?;
    let agent = updraft_agent::service::Agent::new(config, &identity)?;
    updraft_agent::serve::run(agent, listener, updraft_shared::signals::terminated()).await;
    Ok(())
}
