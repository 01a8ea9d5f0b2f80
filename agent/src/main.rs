//! `updraft-agent`: parse the command line, load config, call into the library.
#![forbid(unsafe_code)]

use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;
use updraft_agent::cli::{
    self, Command, ConfigArg, Parsed, PolicyCommand, EXIT_BAD_CONFIG, EXIT_UNAVAILABLE,
};
use updraft_agent::client::RunRequest;
use updraft_agent::config::{AgentConfig, DEFAULT_CONFIG};

/// Exit code for a command line that asks for something that would do nothing (EX_USAGE).
const EXIT_USAGE: u8 = 64;
/// Exit code for a command line that does not parse (what clap-based tools exit with).
const EXIT_PARSE: u8 = 2;

fn main() -> ExitCode {
    // First: a task's entry into its cgroup never reaches the rest.
    updraft_shared::contain::task_entry();
    updraft_shared::logging::exit_on_panic("updraft-agent");
    let mut cli = match cli::parse(std::env::args_os()) {
        Parsed::Run(cli) => cli,
        Parsed::Print(text) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Parsed::Usage(text) => {
            eprint!("{text}");
            return ExitCode::from(EXIT_PARSE);
        }
    };
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
    // Every command is one future run on the runtime: a single `block_on` instantiation,
    // since each one adds a copy of the scheduler loop to the binary.
    let job: Pin<Box<dyn Future<Output = u8>>> = match cli.command {
        Command::Serve { config } => match serve(&config) {
            Ok(job) => job,
            Err(code) => return code,
        },
        Command::CheckConfig { config } => return check_config(&config),
        Command::Doctor { config } => {
            let path = config.config.unwrap_or_else(|| DEFAULT_CONFIG.into());
            Box::pin(async move { updraft_agent::doctor(&path).await })
        }
        Command::Policy {
            command: PolicyCommand::Check { file },
        } => return ExitCode::from(cli::policy_check(&file)),
        Command::Enroll {
            server,
            server_name,
            token,
            ca_sha256,
            agent_id,
            force,
            config,
        } => match load_config(&config) {
            Ok(config) => Box::pin(async move {
                cli::enroll(
                    &config,
                    &server,
                    server_name.as_deref(),
                    &token,
                    &ca_sha256,
                    agent_id.as_deref(),
                    force,
                )
                .await
            }),
            Err(code) => return code,
        },
        Command::Run {
            task,
            input,
            output,
            where_,
            detach,
            explain,
            at,
            args,
        } => {
            let req = RunRequest {
                task,
                args,
                where_,
                detach,
            };
            Box::pin(async move {
                cli::run(&at, req, input.as_deref(), output.as_deref(), explain).await
            })
        }
        Command::Result {
            id,
            wait,
            delete,
            at,
        } => Box::pin(async move { cli::result(&at, &id, wait, delete).await }),
        Command::Status { json, at } => Box::pin(async move { cli::status(&at, json).await }),
        Command::Policy {
            command:
                PolicyCommand::Explain {
                    task,
                    input_bytes,
                    json,
                    at,
                },
        } => Box::pin(async move { cli::explain(&at, &task, input_bytes, json).await }),
    };
    ExitCode::from(rt.block_on(job))
}

/// `serve`: logging and the config now, then (the future returned) the agent until
/// SIGTERM/SIGINT; or the exit code for a bad config, already explained on stderr.
fn serve(arg: &ConfigArg) -> Result<Pin<Box<dyn Future<Output = u8>>>, ExitCode> {
    updraft_shared::logging::init("UPDRAFT_AGENT_LOG");
    let config = load_config(arg)?;
    if let Some(level) = &config.log_level {
        if let Ok(filter) = updraft_shared::logging::parse_level(level) {
            updraft_shared::logging::set_level(filter);
        }
    }
    Ok(Box::pin(async move {
        match cli::serve(config).await {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("updraft-agent: {e:#}");
                1
            }
        }
    }))
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
    match cli::check_config(&config) {
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
