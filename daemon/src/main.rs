//! `updraftd`: parse the command line, load config, call into the library.
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::Parser;
use std::process::ExitCode;
use updraft_daemon::cli::{CaCommand, CertCommand, Cli, Command, TokenCommand};
use updraft_daemon::config::DaemonConfig;

/// sysexits EX_CONFIG-style code for a bad configuration (EX_USAGE, 64).
const EXIT_BAD_CONFIG: u8 = 64;

fn main() -> ExitCode {
    updraft_shared::logging::exit_on_panic("updraftd");
    let cli = Cli::parse();
    updraft_shared::logging::init("UPDRAFTD_LOG");
    match cli.command {
        Command::CheckConfig { config } => match DaemonConfig::load(&config) {
            Ok(c) => {
                println!(
                    "{}: ok ({} tasks: {})",
                    config.display(),
                    c.catalog.names().count(),
                    c.catalog.names().collect::<Vec<_>>().join(", ")
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("updraftd: {e}");
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        },
        Command::Serve { config } => {
            let config = match DaemonConfig::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("updraftd: {e}");
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            if let Some(level) = &config.log_level {
                if let Ok(filter) = updraft_shared::logging::parse_level(level) {
                    updraft_shared::logging::set_level(filter);
                }
            }
            report(serve(config))
        }
        Command::Ca {
            command: CaCommand::Init { dir, names },
        } => report(updraft_daemon::pki::ca_init(&dir, &names).map(|f| {
            eprintln!(
                "wrote {}, {}, {}, {}",
                f.ca_cert.display(),
                f.ca_key.display(),
                f.server_cert.display(),
                f.server_key.display()
            );
            println!("{}", f.fingerprint);
        })),
        Command::Token {
            command:
                TokenCommand::Create {
                    ttl,
                    agent_id,
                    config,
                },
        } => {
            let config = match DaemonConfig::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("updraftd: {e}");
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            report(token_create(&config, ttl, agent_id.as_deref()))
        }
        Command::Cert {
            command:
                CertCommand::Issue {
                    agent_id,
                    out,
                    ca_dir,
                    valid_for,
                },
        } => report(
            updraft_daemon::pki::cert_issue(&ca_dir, &agent_id, &out, valid_for).map(|(c, k)| {
                println!("wrote {} and {}", c.display(), k.display());
            }),
        ),
    }
}

fn serve(config: DaemonConfig) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        let endpoint = updraft_daemon::server::bind(&config)?;
        updraft_daemon::server::run(config, endpoint, updraft_shared::signals::terminated()).await
    })
}

fn token_create(
    config: &DaemonConfig,
    ttl: std::time::Duration,
    agent_id: Option<&str>,
) -> anyhow::Result<()> {
    if let Some(id) = agent_id {
        updraft_shared::tls::check_agent_id(id).map_err(|e| anyhow::anyhow!("--agent-id: {e}"))?;
    }
    let created = updraft_daemon::enroll::Tokens::new(&config.state_dir).create(ttl, agent_id)?;
    println!("{}", created.token);
    // The command to run on the board, with what this daemon knows of itself.
    let fingerprint = updraft_shared::tls::load_certs(&config.tls_ca)
        .map(|c| updraft_shared::tls::fingerprint(&c[0]))
        .unwrap_or_else(|_| "<CA fingerprint>".into());
    let host = updraft_shared::tls::load_certs(&config.tls_cert)
        .ok()
        .and_then(|c| updraft_shared::tls::agent_id_of(&c[0]).ok())
        .unwrap_or_else(|| "<daemon host>".into());
    eprintln!(
        "one-time token, valid until {}{}; on the board run:\n  updraft-agent enroll --server {host}:{} --token {} --ca-sha256 {fingerprint}",
        humantime::format_rfc3339_seconds(created.expires),
        agent_id.map(|a| format!(" for agent `{a}`")).unwrap_or_default(),
        config.listen.port(),
        created.token,
    );
    Ok(())
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("updraftd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
