//! `updraftd`: parse the command line, load config, call into the library.
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::Parser;
use std::process::ExitCode;
use updraft_daemon::cli::{CaCommand, CertCommand, Cli, Command};
use updraft_daemon::config::DaemonConfig;

/// sysexits EX_CONFIG-style code for a bad configuration (EX_USAGE, 64).
const EXIT_BAD_CONFIG: u8 = 64;

fn main() -> ExitCode {
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

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("updraftd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
