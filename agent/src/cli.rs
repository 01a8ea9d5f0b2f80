//! The `updraft-agent` command line: what each command does once `main` has parsed
//! it and loaded the config: `serve`, `check-config`, `enroll`, `policy check`, and the
//! client commands that talk to a running agent over its socket.

use crate::client::{body_bytes, Client, RunRequest};
use crate::config::AgentConfig;
use crate::http::{header_text_decode, BodyInput, ChannelBody};
use crate::placement::Where;
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;
use updraft_shared::exec::Input;

mod args;
mod parse;
pub use args::{Cli, ClientArgs, Command, ConfigArg, PolicyCommand};
pub use parse::{parse, Parsed};

/// What `--version` prints after the name: the package version and the git commit the
/// binary was built from (`unknown` when built outside a checkout; see build.rs).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("UPDRAFT_COMMIT"),
    ")"
);

/// Exit code when Updraft could not run the task at all (EX_UNAVAILABLE).
pub const EXIT_UNAVAILABLE: u8 = 69;
/// Exit code when the task timed out, as `timeout(1)` reports it.
pub const EXIT_TIMED_OUT: u8 = 124;
/// Exit code for a bad configuration (EX_USAGE).
pub const EXIT_BAD_CONFIG: u8 = 64;

/// How much task input is read from stdin or a file at a time: large enough that a
/// big input costs few reads and HTTP chunks, small enough to be nothing on a board.
const INPUT_CHUNK: usize = 64 * 1024;

/// How many recent decisions `status` prints: a screenful with the daemons above it;
/// `status --json` has them all.
const RECENT_SHOWN: usize = 10;

/// What `serve` does with a loaded config: finishes a certificate replacement a
/// restart interrupted, loads the TLS identity, binds the socket, and runs the agent
/// until SIGTERM or SIGINT.
pub async fn serve(config: AgentConfig) -> anyhow::Result<()> {
    use anyhow::Context;
    // Before any task runs: everything a task starts must be found when it ends.
    updraft_shared::contain::init();
    let files = crate::enroll::CertFiles::of(&config);
    if files
        .finish_swap()
        .context("finishing a certificate replacement")?
    {
        tracing::info!(cert = %files.cert.display(), "finished a certificate replacement a restart interrupted");
    }
    let identity = files.load().context(
        "loading the agent's TLS files (enroll with `updraft-agent enroll`, or set [tls] in agent.toml)",
    )?;
    let listener = crate::api::bind_socket(&config.socket)?;
    let metrics_listen = config.metrics_listen;
    let agent = crate::service::Agent::new(config, &identity)?;
    if let Some(addr) = metrics_listen {
        let a = agent.clone();
        updraft_shared::metrics_http::serve(
            addr,
            "agent.toml",
            std::sync::Arc::new(move || a.metrics_text()),
        )
        .await?;
    }
    crate::serve::run(agent, listener, updraft_shared::shutdown::terminated()).await;
    Ok(())
}

/// `enroll`: joins the daemon at `server` (see [`crate::enroll::enroll`]) and says
/// where the files went; returns the exit code.
pub async fn enroll(
    config: &AgentConfig,
    server: &str,
    server_name: Option<&str>,
    token: &str,
    ca_sha256: &str,
    agent_id: Option<&str>,
    force: bool,
) -> u8 {
    let enrolled = crate::enroll::enroll(
        config,
        server,
        server_name,
        token,
        ca_sha256,
        agent_id,
        force,
    )
    .await;
    match enrolled {
        Ok(e) => {
            println!(
                "enrolled as `{}`: {} (certificate, valid until {}), {}, {}; start or restart the agent to use it",
                e.agent_id,
                e.files.cert.display(),
                humantime::format_rfc3339_seconds(e.not_after),
                e.files.key.display(),
                e.files.ca.display(),
            );
            0
        }
        Err(e) => {
            eprintln!("updraft-agent: enroll: {e}");
            EXIT_UNAVAILABLE
        }
    }
}

/// `check-config`: what `serve` checks before it binds anything: the config (already
/// loaded by the caller), the TLS files (read, the key matched to the certificate, the
/// certificate's id to `agent_id`), and the policy file. Returns one summary line.
pub fn check_config(config: &crate::config::AgentConfig) -> anyhow::Result<String> {
    use anyhow::Context;
    let files = crate::enroll::CertFiles::of(config);
    let identity = files.load().context(
        "loading the agent's TLS files (enroll with `updraft-agent enroll`, or set [tls] in agent.toml)",
    )?;
    identity.rustls_client().with_context(|| {
        format!(
            "{} does not belong to {} (or is not a key rustls can use)",
            files.key.display(),
            files.cert.display()
        )
    })?;
    let cert_id = updraft_shared::tls::agent_id_of(&identity.chain[0])
        .with_context(|| format!("reading the agent id in {}", files.cert.display()))?;
    if let Some(id) = config.agent_id.as_ref().filter(|id| **id != cert_id) {
        anyhow::bail!(
            "agent_id `{id}` in the config does not match `{cert_id}` in {}; fix agent_id or enroll as `{id}`",
            files.cert.display()
        );
    }
    let policy = crate::policy_file::PolicyHolder::load(&config.policy)?;
    let (_, not_after) = updraft_shared::tls::validity_of(&identity.chain[0])?;
    let expired = if not_after < std::time::SystemTime::now() {
        " (the certificate has EXPIRED: re-enroll with a token)"
    } else {
        ""
    };
    Ok(format!(
        "ok: agent `{cert_id}`{expired}, {} tasks ({}), {} daemons, policy {}",
        config.catalog.names().count(),
        config.catalog.names().collect::<Vec<_>>().join(", "),
        config.clouds.len(),
        match policy.status() {
            s if s.source == "file" => format!("{} ({} rules)", s.path.display(), s.rules),
            s => format!("{} absent (everything auto)", s.path.display()),
        },
    ))
}

/// `policy check FILE`: exit 0 when valid, 64 with one line naming file:line:column.
pub fn policy_check(file: &std::path::Path) -> u8 {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!(
                "updraft-agent: {}: cannot read policy file: {e}",
                file.display()
            );
            return EXIT_BAD_CONFIG;
        }
    };
    match updraft_proto::policy::rules::parse(&text, file) {
        Ok(p) => {
            println!(
                "{}: ok, {} rules, default {}",
                file.display(),
                p.rules().len(),
                p.default_place().as_str()
            );
            for (i, r) in p.rules().iter().enumerate() {
                println!(
                    "  {}. \"{}\" -> {} ({} tests{})",
                    i + 1,
                    r.name,
                    r.place.as_str(),
                    r.when.len(),
                    if r.task_match.is_some() {
                        ", with match"
                    } else {
                        ""
                    }
                );
            }
            0
        }
        Err(e) => {
            eprintln!("updraft-agent: {e}");
            EXIT_BAD_CONFIG
        }
    }
}

impl Cli {
    /// Moves `--socket`/`--config` given before the command into the command, or
    /// says why the command has no use for them: a flag that would do nothing is an
    /// error, not ignored.
    pub fn normalize(&mut self) -> Result<(), String> {
        let (socket, config) = (self.socket.take(), self.config.take());
        let name = self.command.name();
        let (cfg_slot, socket_slot) = match &mut self.command {
            Command::Serve { config: c }
            | Command::CheckConfig { config: c }
            | Command::Doctor { config: c }
            | Command::Enroll { config: c, .. } => (Some(&mut c.config), None),
            Command::Run { at, .. }
            | Command::Result { at, .. }
            | Command::Status { at, .. }
            | Command::Policy {
                command: PolicyCommand::Explain { at, .. },
            } => (Some(&mut at.config), Some(&mut at.socket)),
            Command::Policy {
                command: PolicyCommand::Check { .. },
            } => (None, None),
        };
        if let Some(s) = socket {
            let slot = socket_slot.ok_or_else(|| {
                format!("--socket does nothing for `{name}`: only run, result, status and policy explain talk to the agent's socket (serve listens on `socket` from agent.toml)")
            })?;
            if slot.replace(s).is_some() {
                return Err("--socket is given twice".into());
            }
        }
        if let Some(c) = config {
            let slot = cfg_slot.ok_or_else(|| {
                format!("--config does nothing for `{name}`: it checks the file it is given")
            })?;
            if slot.replace(c).is_some() {
                return Err("--config is given twice".into());
            }
        }
        if let Command::Run { at, .. }
        | Command::Result { at, .. }
        | Command::Status { at, .. }
        | Command::Policy {
            command: PolicyCommand::Explain { at, .. },
        } = &self.command
        {
            if at.socket.is_some() && at.config.is_some() {
                return Err("give --socket or --config, not both: --socket wins and --config would be unused".into());
            }
        }
        Ok(())
    }
}

impl Command {
    /// The command as typed.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Serve { .. } => "serve",
            Command::CheckConfig { .. } => "check-config",
            Command::Doctor { .. } => "doctor",
            Command::Enroll { .. } => "enroll",
            Command::Run { .. } => "run",
            Command::Result { .. } => "result",
            Command::Status { .. } => "status",
            Command::Policy {
                command: PolicyCommand::Check { .. },
            } => "policy check",
            Command::Policy {
                command: PolicyCommand::Explain { .. },
            } => "policy explain",
        }
    }
}

impl ClientArgs {
    /// The socket a client command should use: `--socket`, else the config's
    /// `socket`, else `UPDRAFT_AGENT__SOCKET`, else the default.
    pub fn socket_path(&self) -> anyhow::Result<PathBuf> {
        if let Some(s) = &self.socket {
            return Ok(s.clone());
        }
        if let Some(c) = &self.config {
            return Ok(crate::config::AgentConfig::load(c)?.socket);
        }
        if let Some(s) = std::env::var_os("UPDRAFT_AGENT__SOCKET") {
            return Ok(s.into());
        }
        Ok(crate::config::DEFAULT_SOCKET.into())
    }
}

/// Stdin or a file as task input.
struct ReaderInput<R>(R);

impl<R: tokio::io::AsyncRead + Unpin + Send> Input for ReaderInput<R> {
    async fn next_chunk(&mut self) -> std::io::Result<Option<bytes::Bytes>> {
        use tokio::io::AsyncReadExt;
        let mut buf = bytes::BytesMut::with_capacity(INPUT_CHUNK);
        let n = self.0.read_buf(&mut buf).await?;
        Ok((n > 0).then(|| buf.freeze()))
    }
}

/// Prints one line to stderr and gives the exit code for an Updraft-side error.
fn fail(msg: impl std::fmt::Display) -> u8 {
    eprintln!("updraft-agent: {msg}");
    EXIT_UNAVAILABLE
}

fn header<'a>(resp: &'a hyper::Response<hyper::body::Incoming>, name: &str) -> Option<&'a str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

async fn error_of(resp: hyper::Response<hyper::body::Incoming>) -> (String, String) {
    let code = header(&resp, crate::http::H_ERROR_CODE)
        .unwrap_or("error")
        .to_string();
    let body = body_bytes(resp).await.unwrap_or_default();
    let msg = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
    (code, msg)
}

/// Copies a response body to `--output` (or stdout).
async fn copy_body(
    resp: hyper::Response<hyper::body::Incoming>,
    output: Option<&Path>,
) -> anyhow::Result<()> {
    let mut body = BodyInput(resp.into_body());
    let mut out: Box<dyn tokio::io::AsyncWrite + Unpin + Send> = match output {
        Some(p) if p.as_os_str() != "-" => Box::new(
            tokio::fs::File::create(p)
                .await
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", p.display()))?,
        ),
        _ => Box::new(tokio::io::stdout()),
    };
    while let Some(chunk) = body.next_chunk().await? {
        out.write_all(&chunk).await?;
    }
    out.flush().await?;
    Ok(())
}

/// `--where`. A function, not clap's possible-values parser, which costs the board
/// binary 4 KB; build.rs declares the values for the completions and the man page.
fn parse_where(s: &str) -> Result<Where, String> {
    s.parse()
}

/// The client for the agent `at` names, or the exit code after saying why there is none.
fn connect(at: &ClientArgs) -> Result<Client, u8> {
    at.socket_path().map(Client::new).map_err(fail)
}

/// `policy explain TASK`: where the agent would run `task` now, and why.
pub async fn explain(at: &ClientArgs, task: &str, input_bytes: Option<u64>, json: bool) -> u8 {
    let client = match connect(at) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut path = format!("/v1/explain/{}", crate::http::percent_encode(task));
    if let Some(n) = input_bytes {
        path.push_str(&format!("?input_bytes={n}"));
    }
    let resp = match client.get(&path).await {
        Ok(r) => r,
        Err(e) => return fail(format!("{e:#}")),
    };
    if !resp.status().is_success() {
        let (code, msg) = error_of(resp).await;
        return fail(format!("{msg} [{code}]"));
    }
    let body = match body_bytes(resp).await {
        Ok(b) => b,
        Err(e) => return fail(format!("{e:#}")),
    };
    let v: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return fail(format!("the agent sent an unreadable explanation: {e}")),
    };
    if json {
        println!("{v}");
    } else {
        println!(
            "{} ({})",
            v["placement"].as_str().unwrap_or("?"),
            v["reason"].as_str().unwrap_or("")
        );
    }
    0
}

/// `run TASK`: submits `req` with `input` (a file, `-` for stdin, or none) and prints
/// the output to `output` (or stdout); exits with the task's exit code, or prints the
/// task id when detached. `explain` prints where it ran and why, on stderr.
pub async fn run(
    at: &ClientArgs,
    req: RunRequest,
    input: Option<&Path>,
    output: Option<&Path>,
    explain: bool,
) -> u8 {
    let client = match connect(at) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let body = match input {
        None => ChannelBody::full(Vec::new()),
        Some(p) if p.as_os_str() == "-" => {
            ChannelBody::from_input(ReaderInput(tokio::io::stdin()), None)
        }
        Some(p) => match tokio::fs::File::open(p).await {
            Ok(f) => {
                let len = f.metadata().await.ok().map(|m| m.len());
                ChannelBody::from_input(ReaderInput(f), len)
            }
            Err(e) => return fail(format!("cannot read input {}: {e}", p.display())),
        },
    };
    let resp = match client.run(&req, body).await {
        Ok(r) => r,
        Err(e) => return fail(format!("{e:#}")),
    };
    if explain {
        if let (Some(p), Some(r)) = (
            header(&resp, crate::http::H_PLACEMENT),
            header(&resp, crate::http::H_REASON),
        ) {
            eprintln!("{p} ({r})");
        }
    }
    if !resp.status().is_success() {
        let (code, msg) = error_of(resp).await;
        eprintln!("updraft-agent: {msg} [{code}]");
        return exit_for(&code);
    }
    if req.detach {
        let id = header(&resp, crate::http::H_TASK_ID)
            .unwrap_or_default()
            .to_string();
        println!("{id}");
        return 0;
    }
    finish(resp, output).await
}

/// The exit code for a task Updraft could not finish, by its error code: `timed_out`
/// as `timeout(1)` reports it, anything else as unavailable.
fn exit_for(code: &str) -> u8 {
    if code == "timed_out" {
        EXIT_TIMED_OUT
    } else {
        EXIT_UNAVAILABLE
    }
}

/// `result ID`: prints a detached task's output and exits with its exit code; with
/// `wait`, once it has finished; with `delete`, then deletes it from the journal.
pub async fn result(at: &ClientArgs, id: &str, wait: bool, delete: bool) -> u8 {
    let client = match connect(at) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let state = match client
        .get(&format!(
            "/v1/tasks/{}?wait={wait}",
            crate::http::percent_encode(id)
        ))
        .await
    {
        Ok(r) => r,
        Err(e) => return fail(format!("{e:#}")),
    };
    if !state.status().is_success() {
        let (code, msg) = error_of(state).await;
        return fail(format!("{msg} [{code}]"));
    }
    let state: serde_json::Value = match body_bytes(state).await.map(|b| serde_json::from_slice(&b))
    {
        Ok(Ok(v)) => v,
        _ => return fail("the agent sent an unreadable task state"),
    };
    if state["state"] == "running" || state["state"] == "queued" {
        return fail(format!(
            "task {id} is still {} (use --wait)",
            state["state"].as_str().unwrap_or("running")
        ));
    }
    let resp = match client
        .get(&format!(
            "/v1/tasks/{}/output",
            crate::http::percent_encode(id)
        ))
        .await
    {
        Ok(resp) => resp,
        Err(e) => return fail(format!("{e:#}")),
    };
    let code = if let Some(e) = state.get("error").filter(|e| !e.is_null()) {
        eprintln!(
            "updraft-agent: {} [{}]",
            e["message"].as_str().unwrap_or("failed"),
            e["code"].as_str().unwrap_or("error")
        );
        exit_for(e["code"].as_str().unwrap_or_default())
    } else {
        match deliver(resp, None).await {
            Ok(code) => code,
            // Not printed, so not deleted.
            Err(code) => return code,
        }
    };
    if delete {
        if let Err(e) = delete_task(&client, id).await {
            return fail(e);
        }
    }
    code
}

/// `status`: the agent's state as a table, or its JSON as sent.
pub async fn status(at: &ClientArgs, json: bool) -> u8 {
    let client = match connect(at) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let resp = match client.get("/v1/status").await {
        Ok(r) => r,
        Err(e) => return fail(format!("{e:#}")),
    };
    let body = match body_bytes(resp).await {
        Ok(b) => b,
        Err(e) => return fail(format!("{e:#}")),
    };
    if json {
        println!("{}", String::from_utf8_lossy(&body));
        return 0;
    }
    match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(v) => {
            print_status(&v);
            0
        }
        Err(e) => fail(format!("the agent sent unreadable status: {e}")),
    }
}

async fn finish(resp: hyper::Response<hyper::body::Incoming>, output: Option<&Path>) -> u8 {
    deliver(resp, output).await.unwrap_or_else(|code| code)
}

/// `DELETE /v1/tasks/{id}`: the agent's refusal as one line.
async fn delete_task(client: &Client, id: &str) -> Result<(), String> {
    let req = hyper::Request::delete(format!("/v1/tasks/{}", crate::http::percent_encode(id)))
        .header("host", "updraft-agent")
        .body(ChannelBody::full(Vec::new()))
        .map_err(|e| e.to_string())?;
    let resp = client.send(req).await.map_err(|e| format!("{e:#}"))?;
    if resp.status().is_success() {
        return Ok(());
    }
    let (code, msg) = error_of(resp).await;
    Err(format!("printed, but not deleted: {msg} [{code}]"))
}

/// Like [`finish`], but `Err` (with the exit code) when the output could not be
/// written out.
async fn deliver(
    resp: hyper::Response<hyper::body::Incoming>,
    output: Option<&Path>,
) -> Result<u8, u8> {
    let exit: Option<i32> = header(&resp, crate::http::H_EXIT_CODE).and_then(|v| v.parse().ok());
    let tail = header(&resp, crate::http::H_STDERR_TAIL).map(header_text_decode);
    if let Err(e) = copy_body(resp, output).await {
        return Err(fail(format!("{e:#}")));
    }
    let code = exit.unwrap_or(i32::from(EXIT_UNAVAILABLE));
    if code != 0 {
        if let Some(t) = tail {
            eprint!("{t}");
            if !t.ends_with('\n') {
                eprintln!();
            }
        }
    }
    Ok(u8::try_from(code.clamp(0, 255)).unwrap_or(EXIT_UNAVAILABLE))
}

fn print_status(v: &serde_json::Value) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    print!("{}", render_status(v, now));
}

/// `status` as text: what `--json` holds, for a person, as of `now_ms`.
fn render_status(v: &serde_json::Value, now_ms: u64) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "agent {}  (updraft {}, up {}s)",
        v["agent_id"].as_str().unwrap_or("?"),
        v["version"].as_str().unwrap_or("?"),
        v["uptime_s"]
    );
    let l = &v["local"];
    let _ = writeln!(
        o,
        "local: {} running, {} queued, {} slots",
        l["running"], l["queued"], l["capacity"]
    );
    let p = &v["policy"];
    let hash: String = p["hash"].as_str().unwrap_or("").chars().take(12).collect();
    let _ = writeln!(
        o,
        "policy: {} ({}{}, {} rules, default {})",
        p["path"].as_str().unwrap_or("?"),
        p["source"].as_str().unwrap_or("?"),
        if hash.is_empty() {
            String::new()
        } else {
            format!(" {hash}")
        },
        p["rules"],
        p["default"].as_str().unwrap_or("?")
    );
    if let Some(e) = p["error"].as_str() {
        let _ = writeln!(
            o,
            "  last reload refused, the policy above stays in force: {e}"
        );
    }
    let push = &v["policy_push"];
    if let Some(result) = push["result"].as_str() {
        let hash: String = push["hash"]
            .as_str()
            .unwrap_or("")
            .chars()
            .take(12)
            .collect();
        let why = push["message"]
            .as_str()
            .map(|m| format!(": {m}"))
            .unwrap_or_default();
        let _ = writeln!(o, "  last pushed policy {hash}: {result}{why}");
    }
    let c = &v["certificate"];
    if let Some(until) = c["not_after_unix"].as_u64() {
        let left = (until * 1000) as i64 - now_ms as i64;
        let when = if left <= 0 {
            "EXPIRED: enroll again with a token (`updraft-agent enroll`)".to_string()
        } else {
            format!("expires in {}", days(left as u64 / 1000))
        };
        let renew = c["renew_at_unix"]
            .as_u64()
            .map(|r| {
                format!(
                    ", renewed from {}",
                    humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + std::time::Duration::from_secs(r)
                    )
                )
            })
            .unwrap_or_default();
        let _ = writeln!(
            o,
            "certificate: {} {when}{renew}",
            c["path"].as_str().unwrap_or("?")
        );
    }
    let j = &v["journal"];
    if let (Some(bytes), Some(max)) = (j["bytes"].as_u64(), j["max_bytes"].as_u64()) {
        let pct = if max == 0 {
            0.0
        } else {
            bytes as f64 * 100.0 / max as f64
        };
        let _ = writeln!(
            o,
            "journal: {} detached tasks ({} unfinished), {} of {} bytes ({pct:.0} %)",
            j["tasks"], j["unfinished"], bytes, max
        );
    }
    let _ = writeln!(o, "daemons:");
    for c in v["clouds"].as_array().into_iter().flatten() {
        let state = if c["draining"] == true {
            "draining".to_string()
        } else if c["connected"] == true {
            format!(
                "connected, rtt {:.1} ms",
                c["rtt_ms"].as_f64().unwrap_or(0.0)
            )
        } else {
            format!(
                "down: {}",
                c["last_error"].as_str().unwrap_or("not connected yet")
            )
        };
        let load = &c["load"];
        let load = if load.is_null() {
            String::new()
        } else {
            format!(
                ", load {}+{}/{}",
                load["running"], load["queued"], load["capacity"]
            )
        };
        let _ = writeln!(
            o,
            "  {:<28} {state}{load}",
            c["address"].as_str().unwrap_or("?")
        );
    }
    let _ = writeln!(o, "recent decisions:");
    for d in v["recent"]
        .as_array()
        .into_iter()
        .flatten()
        .take(RECENT_SHOWN)
    {
        let at = d["at_unix_ms"].as_u64().map_or("?".to_string(), |t| {
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(t),
            )
            .to_string()
        });
        let _ = writeln!(
            o,
            "  {at}  {:<32} {:<16} {:<6} {:<10} {}",
            d["id"].as_str().unwrap_or("?"),
            d["task"].as_str().unwrap_or("?"),
            d["placement"].as_str().unwrap_or("?"),
            d["outcome"].as_str().unwrap_or("?"),
            d["reason"].as_str().unwrap_or("")
        );
    }
    o
}

/// "42s", "5h", "89d".
fn days(s: u64) -> String {
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn where_takes_the_three_places_and_the_completions_offer_them() {
        let cli = Cli::try_parse_from(["updraft-agent", "run", "sha", "--where", "cloud"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Run {
                where_: Some(Where::Cloud),
                ..
            }
        ));
        let e = Cli::try_parse_from(["updraft-agent", "run", "sha", "--where", "moon"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("auto, local or cloud, not `moon`"), "{e}");
        // build.rs wrote the completions into the profile's directory, OUT_DIR's
        // PROFILE/build/PACKAGE-HASH/out.
        let profile = std::path::Path::new(env!("OUT_DIR"))
            .ancestors()
            .nth(3)
            .unwrap();
        let bash = std::fs::read_to_string(profile.join("completions/bash/updraft-agent")).unwrap();
        let offered = bash
            .split("--where)")
            .nth(1)
            .and_then(|rest| rest.split("compgen -W \"").nth(1))
            .and_then(|rest| rest.split('"').next())
            .unwrap_or_else(|| panic!("no --where values in the bash completion:\n{bash}"));
        let offered: Vec<&str> = offered.split_whitespace().collect();
        assert_eq!(offered, ["auto", "local", "cloud"]);
        for v in offered {
            assert!(v.parse::<Where>().is_ok(), "{v} is offered but refused");
        }
    }

    #[test]
    fn text_status_shows_what_json_has() {
        let now = 1_800_000_000_000u64;
        let v = serde_json::json!({
            "agent_id": "board-1", "version": "0.1.0", "uptime_s": 5,
            "local": {"running": 0, "queued": 0, "capacity": 2},
            "policy": {"path": "/var/lib/updraft/policy.pushed.toml", "source": "pushed",
                       "hash": "ab".repeat(32), "rules": 2, "default": "auto",
                       "error": "/etc/updraft/policy.toml:3:9: place must be local, cloud or auto"},
            "policy_push": {"hash": "ab".repeat(32), "result": "applied"},
            "certificate": {"path": "/var/lib/updraft/agent.pem",
                            "not_after_unix": now / 1000 + 90 * 86_400,
                            "renew_at_unix": now / 1000 + 60 * 86_400},
            "journal": {"tasks": 3, "unfinished": 1, "bytes": 512, "max_bytes": 1024},
            "clouds": [],
            "recent": [{"id": "0123abcd", "task": "sha", "placement": "cloud",
                        "outcome": "ok", "reason": "auto: ...", "at_unix_ms": now}],
        });
        let t = render_status(&v, now);
        assert!(
            t.contains("policy: /var/lib/updraft/policy.pushed.toml (pushed abababababab, 2 rules"),
            "{t}"
        );
        assert!(
            t.contains("last reload refused") && t.contains("policy.toml:3:9"),
            "{t}"
        );
        assert!(
            t.contains("last pushed policy abababababab: applied"),
            "{t}"
        );
        assert!(
            t.contains(
                "certificate: /var/lib/updraft/agent.pem expires in 90d, renewed from 2027-"
            ),
            "{t}"
        );
        assert!(
            t.contains("journal: 3 detached tasks (1 unfinished), 512 of 1024 bytes (50 %)"),
            "{t}"
        );
        assert!(t.contains("2027-01-15T08:00:00Z  0123abcd"), "{t}");
        let expired = serde_json::json!({"certificate": {"path": "a.pem", "not_after_unix": 1}});
        assert!(render_status(&expired, now).contains("EXPIRED: enroll again"));
    }
}
