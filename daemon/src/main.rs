//! `updraftd`: parse the command line, load config, call into the library.
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::Parser;
use std::path::Path;
use std::process::ExitCode;
use updraft_daemon::cli::{
    AgentCommand, CaCommand, CertCommand, Cli, Command, PolicyCommand, TokenCommand,
};
use updraft_daemon::config::DaemonConfig;
use updraft_daemon::{Issued, IssuedCert};

/// sysexits EX_CONFIG-style code for a bad configuration (EX_USAGE, 64).
const EXIT_BAD_CONFIG: u8 = 64;

fn main() -> ExitCode {
    // First: a task's entry into its cgroup never reaches the rest.
    updraft_shared::contain::task_entry();
    updraft_shared::logging::exit_on_panic("updraftd");
    let cli = Cli::parse();
    updraft_shared::logging::init("UPDRAFTD_LOG");
    match cli.command {
        Command::CheckConfig { config } => {
            let (config, _) = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            for warning in config.warnings() {
                eprintln!("updraftd: warning: {warning}");
            }
            if let Err(e) =
                updraft_daemon::pki::load_issuer_files(&config.tls_ca, &config.tls_ca_key)
            {
                eprintln!("updraftd: warning: enrollment will be off: {e:#} ([tls] ca_key)");
            }
            println!(
                "{}: ok ({} tasks: {})",
                config.source.display(),
                config.catalog.names().count(),
                config.catalog.names().collect::<Vec<_>>().join(", ")
            );
            ExitCode::SUCCESS
        }
        Command::Serve { config } => {
            let (config, server) = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if let Some(level) = &config.log_level {
                if let Ok(filter) = updraft_shared::logging::parse_level(level) {
                    updraft_shared::logging::set_level(filter);
                }
            }
            for warning in config.warnings() {
                tracing::warn!("{warning}");
            }
            report(serve(config, server))
        }
        Command::Ca {
            command: CaCommand::Show { config },
        } => with_config(&config, |config| {
            report(ca_show(config))
        }),
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
                    agent_id_prefix,
                    count,
                    uses,
                    out,
                    config,
                },
        } => with_config(&config, |config| {
            let spec = updraft_daemon::TokenSpec {
                ttl,
                agent_id,
                agent_id_prefix,
                uses,
            };
            report(token_create(config, &spec, count, out.as_deref()))
        }),
        Command::Token {
            command: TokenCommand::List { json, config },
        } => with_config(&config, |config| {
            report(token_list(config, json))
        }),
        Command::Token {
            command: TokenCommand::Revoke { id, config },
        } => with_config(&config, |config| {
            report(
                updraft_daemon::TokenStore::open(config)
                    .and_then(|tokens| tokens.revoke(&id, std::time::SystemTime::now()))
                    .map(|id| println!("revoked token {id}: it enrolls nothing from now on")),
            )
        }),
        Command::Agents { json, id, config } => with_config(&config, |config| {
            report(agents(config, json, id.as_deref()))
        }),
        Command::Policy {
            command:
                PolicyCommand::Push {
                    file,
                    agents,
                    canary,
                    window,
                    config,
                },
        } => with_config(&config, |config| {
            report(policy_push(config, &file, agents, canary, window))
        }),
        Command::Policy {
            command: PolicyCommand::Status { json, config },
        } => with_config(&config, |config| {
            report(
                admin(config, hyper::Method::GET, "/v1/policy/push").map(|s| {
                    if json {
                        println!("{s}");
                    } else {
                        print!("{}", updraft_daemon::admin_client::render_push(&s));
                    }
                }),
            )
        }),
        Command::Agent {
            command: AgentCommand::Revoke { id, config },
        } => with_config(&config, |config| {
            report(revoke(config, &id))
        }),
        Command::Cert {
            command: CertCommand::Server { names, out, ca_dir },
        } => report(
            updraft_daemon::pki::server_issue(&ca_dir, &names, &out).map(|(cert, key)| {
                println!(
                    "wrote {} and {}; put them in [tls] cert and key, then `systemctl reload updraftd`",
                    cert.display(),
                    key.display()
                );
            }),
        ),
        Command::Cert {
            command:
                CertCommand::Issue {
                    agent_id,
                    out,
                    ca_dir,
                    valid_for,
                    state_dir,
                },
        } => report(cert_issue(
            &ca_dir,
            &agent_id,
            &out,
            valid_for,
            state_dir.as_deref(),
        )),
    }
}

/// Runs one admin request on a current-thread runtime.
fn admin(
    config: &DaemonConfig,
    method: hyper::Method,
    path: &str,
) -> anyhow::Result<serde_json::Value> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    Ok(rt.block_on(updraft_daemon::admin_client::request(
        &config.admin_socket,
        method,
        path,
    ))?)
}

/// `updraftd agents`.
fn agents(config: &DaemonConfig, json: bool, id: Option<&str>) -> anyhow::Result<()> {
    let path = match id {
        Some(id) => format!("/v1/agents/{id}"),
        None => "/v1/agents".to_string(),
    };
    let answer = admin(config, hyper::Method::GET, &path)?;
    if json {
        println!("{answer}");
        return Ok(());
    }
    let list = match answer {
        serde_json::Value::Array(list) => list,
        one => vec![one],
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    print!(
        "{}",
        updraft_daemon::admin_client::render_agents(&list, now)
    );
    Ok(())
}

/// `updraftd policy push`: checked here first, so a typo is reported without a daemon.
fn policy_push(
    config: &DaemonConfig,
    file: &Path,
    agents: Option<Vec<String>>,
    canary: u32,
    window: std::time::Duration,
) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read the policy file {}", file.display()))?;
    updraft_proto::policy::rules::parse(&text, file)?;
    let body = serde_json::json!({
        "name": file.display().to_string(),
        "text": text,
        "agents": agents,
        "canary": canary,
        "window_ms": window.as_millis() as u64,
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let status = rt.block_on(updraft_daemon::admin_client::request_with(
        &config.admin_socket,
        hyper::Method::POST,
        "/v1/policy/push",
        serde_json::to_vec(&body)?,
    ))?;
    print!("{}", updraft_daemon::admin_client::render_push(&status));
    Ok(())
}

/// `updraftd ca show`.
fn ca_show(config: &DaemonConfig) -> anyhow::Result<()> {
    use updraft_shared::tls;
    let when = |t: std::time::SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    let ca = tls::load_certs(&config.tls_ca)
        .with_context(|| format!("[tls] ca {}", config.tls_ca.display()))?;
    let ca = ca.first().context("no certificate in [tls] ca")?;
    let (_, ca_until) = tls::validity_of(ca)?;
    println!("ca: {}", config.tls_ca.display());
    println!(
        "  sha256 {}  (updraft-agent enroll --ca-sha256 takes this)",
        tls::fingerprint(ca)
    );
    println!("  valid until {}", when(ca_until));
    let server = tls::load_certs(&config.tls_cert)
        .with_context(|| format!("[tls] cert {}", config.tls_cert.display()))?;
    let server = server.first().context("no certificate in [tls] cert")?;
    let (_, server_until) = tls::validity_of(server)?;
    println!("server certificate: {}", config.tls_cert.display());
    println!("  names {}", tls::names_of(server).join(", "));
    println!("  valid until {}", when(server_until));
    Ok(())
}

/// `updraftd agent revoke ID`.
fn revoke(config: &DaemonConfig, id: &str) -> anyhow::Result<()> {
    let done = admin(
        config,
        hyper::Method::POST,
        &format!("/v1/agents/{id}/revoke"),
    )?;
    let serials: Vec<&str> = done["serials"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s.as_str()).collect())
        .unwrap_or_default();
    println!(
        "revoked agent `{id}`: certificate serials {} refused from now on; {} live connection(s) closed. To let the board back: `updraftd token create --agent-id {id}`, then `updraft-agent enroll` on it",
        if serials.is_empty() { "(none known)".to_string() } else { serials.join(", ") },
        done["closed"].as_u64().unwrap_or(0),
    );
    Ok(())
}

/// Loads and checks a config the way `serve` uses it: the file, then the TLS files
/// and transport settings (the quinn server config). A failure is one line on stderr
/// and the exit code for a bad configuration.
fn load_config(path: &Path) -> Result<(DaemonConfig, quinn::ServerConfig), ExitCode> {
    let config = DaemonConfig::load(path).map_err(|e| bad_config(&e))?;
    let server = updraft_daemon::server_config(&config).map_err(|e| bad_config(&e))?;
    Ok((config, server))
}

/// Runs a command that needs only the config file (its paths and `state_dir`; no TLS
/// files loaded) on the file at `path`: `run`'s exit code, or that of a bad config,
/// explained on stderr.
fn with_config(path: &Path, run: impl FnOnce(&DaemonConfig) -> ExitCode) -> ExitCode {
    match DaemonConfig::load(path) {
        Ok(config) => run(&config),
        Err(e) => bad_config(&e),
    }
}

fn bad_config(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("updraftd: {e}");
    ExitCode::from(EXIT_BAD_CONFIG)
}

fn serve(config: DaemonConfig, server: quinn::ServerConfig) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        // Before any task runs: everything a task starts must be found when it ends.
        updraft_shared::contain::init();
        let endpoint = updraft_daemon::bind_with(server, &config)?;
        Ok(updraft_daemon::run(config, endpoint, updraft_shared::shutdown::terminated()).await?)
    })
}

fn token_create(
    config: &DaemonConfig,
    spec: &updraft_daemon::TokenSpec,
    count: u32,
    out: Option<&Path>,
) -> anyhow::Result<()> {
    let agent_id = spec.agent_id.as_deref();
    if let Some(id) = agent_id {
        updraft_shared::tls::check_agent_id(id).map_err(|e| anyhow::anyhow!("--agent-id: {e}"))?;
        anyhow::ensure!(
            count == 1,
            "--agent-id binds a token to one board; for many boards use --agent-id-prefix with --count, or --uses"
        );
    }
    if let Some(prefix) = &spec.agent_id_prefix {
        updraft_shared::tls::check_agent_id(prefix)
            .map_err(|e| anyhow::anyhow!("--agent-id-prefix: {e}"))?;
    }
    let tokens = updraft_daemon::TokenStore::open(config)?;
    let mut made = Vec::with_capacity(count as usize);
    for _ in 0..count {
        made.push(tokens.create_with(spec)?);
    }
    let text: String = made.iter().map(|c| format!("{}\n", c.token)).collect();
    match out {
        Some(path) => {
            updraft_shared::files::write_atomic(path, text.as_bytes(), 0o600)
                .with_context(|| format!("cannot write the tokens to {}", path.display()))?;
            eprintln!("wrote {count} token(s) to {}", path.display());
        }
        None => print!("{text}"),
    }
    let created = made.last().context("no token made")?;
    let what = match (count, spec.uses) {
        (1, 1) => "one-time token".to_string(),
        (1, n) => format!("token for {n} boards"),
        (n, 1) => format!("{n} one-time tokens"),
        (n, u) => format!("{n} tokens for {u} boards each"),
    };
    let bound = match (agent_id, &spec.agent_id_prefix) {
        (Some(a), _) => format!(" for agent `{a}`"),
        (None, Some(p)) => format!(" for agent ids starting with `{p}`"),
        (None, None) => String::new(),
    };
    let token = if count == 1 {
        created.token.as_str()
    } else {
        "<token>"
    };
    // The command to run on the board, with what this daemon knows of itself.
    let fingerprint = updraft_shared::tls::load_certs(&config.tls_ca)
        .map(|c| updraft_shared::tls::fingerprint(&c[0]))
        .unwrap_or_else(|_| "<CA fingerprint>".into());
    let host = updraft_shared::tls::load_certs(&config.tls_cert)
        .ok()
        .and_then(|c| updraft_shared::tls::agent_id_of(&c[0]).ok())
        .unwrap_or_else(|| "<daemon host>".into());
    eprintln!(
        "{what}, valid until {}{bound}; on the board run:\n  updraft-agent enroll --server {host}:{} --token {token} --ca-sha256 {fingerprint}",
        humantime::format_rfc3339_seconds(created.expires),
        config.listen.port(),
    );
    Ok(())
}

/// `token list`.
fn token_list(config: &DaemonConfig, json: bool) -> anyhow::Result<()> {
    let list = updraft_daemon::TokenStore::open(config)?.list(std::time::SystemTime::now())?;
    if json {
        println!("{}", serde_json::to_string(&list)?);
        return Ok(());
    }
    println!("ID            STATE    EXPIRES               FOR                  USED");
    for t in &list {
        let scope = match (&t.agent_id, &t.agent_id_prefix) {
            (Some(a), _) => a.clone(),
            (None, Some(p)) => format!("{p}*"),
            (None, None) => "any id".into(),
        };
        println!(
            "{:<12}  {:<7}  {:<20}  {:<19}  {}/{} {}",
            t.id,
            t.state,
            t.expires,
            scope,
            t.enrolled.len(),
            t.uses,
            t.enrolled.join(",")
        );
    }
    Ok(())
}

/// `cert issue`: writes the pair, and records it in `state_dir` when given one.
fn cert_issue(
    ca_dir: &Path,
    agent_id: &str,
    out: &Path,
    valid_for: std::time::Duration,
    state_dir: Option<&Path>,
) -> anyhow::Result<()> {
    let (cert, key) = updraft_daemon::pki::cert_issue(ca_dir, agent_id, out, valid_for)?;
    println!("wrote {} and {}", cert.display(), key.display());
    if let Some(dir) = state_dir {
        let now = std::time::SystemTime::now();
        let pem = std::fs::read_to_string(&cert)
            .with_context(|| format!("cannot read back {}", cert.display()))?;
        let issued = IssuedCert::of_pem(&pem, now)?;
        Issued::new(dir)
            .record(agent_id, issued, now)
            .context("the certificate was written but not recorded in --state-dir")?;
    }
    Ok(())
}

fn report<E: Into<anyhow::Error>>(r: Result<(), E>) -> ExitCode {
    match r.map_err(Into::into) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("updraftd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
