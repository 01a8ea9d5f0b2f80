//! Shared fixtures for the end-to-end tests: the real `updraftd` and `updraft-agent`
//! binaries started as child processes with throwaway certificates, a plain HTTP/1.1
//! client for the agent's socket, and bounded waiting helpers.
// Each test binary includes this as `mod common` and uses a different part of it: what
// one leaves unused is not dead, and `pub` is how the binaries see it.
#![allow(dead_code, unreachable_pub)]

pub mod deb;
pub mod nats;
pub mod readme;
pub mod udp_balancer;
pub mod wire;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Path of a workspace binary, next to the test executable's directory.
///
/// `cargo test` builds only the binaries of the package whose tests run, so the first
/// call builds `updraftd` and `updraft-agent` (a no-op when they are fresh) with the
/// same cargo, profile and target directory as this test: the tests always run the
/// binaries of the code under test, never stale ones.
///
/// `UPDRAFT_TEST_AGENT`, when set, names the `updraft-agent` to run instead: an agent
/// cross-built for a board (tests/cross_agent.rs).
pub fn bin(name: &str) -> PathBuf {
    if let Some(agent) = std::env::var_os("UPDRAFT_TEST_AGENT").filter(|_| name == "updraft-agent")
    {
        return PathBuf::from(agent);
    }
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile directory");
    BUILT.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        // cargo test sets CARGO_MANIFEST_DIR, CARGO_PKG_NAME... for the test; ring's
        // build tracks them, so passing them on would make this build and the next
        // plain `cargo build` or `cargo test` each rebuild ring and all above it.
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            let per_crate = [
                "CARGO_MANIFEST_",
                "CARGO_PKG_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
            ]
            .iter()
            .any(|p| k.starts_with(p))
                || [
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "CARGO_RUSTC_CURRENT_DIR",
                ]
                .contains(&k.as_ref());
            if per_crate {
                cmd.env_remove(&key);
            }
        }
        cmd.args([
            "build",
            "--bins",
            "-p",
            "updraft-daemon",
            "-p",
            "updraft-agent",
        ]);
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let out = cmd
            .output()
            .expect("running cargo build for the service binaries");
        assert!(
            out.status.success(),
            "building the service binaries failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing after building it",
        path.display()
    );
    path
}

/// Polls `f` until it returns `Some`, or panics after `timeout` naming `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process whose stderr is collected in the background.
pub struct Proc {
    pub child: Child,
    pub log: Arc<Mutex<String>>,
    pub name: &'static str,
}

impl Proc {
    pub fn spawn(name: &'static str, mut cmd: Command) -> Self {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        Self { child, log, name }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Resident set size in bytes, from /proc.
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("process status");
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS line");
        kb * 1024
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).expect("signal");
    }

    /// Waits for exit (bounded) and returns the exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let name = self.name;
        let child = &mut self.child;
        wait_for(&format!("{name} to exit"), timeout, || {
            child.try_wait().expect("try_wait")
        })
    }
}

impl Drop for Proc {
    /// Stops the process; when a test is failing, prints the end of its log so the
    /// failure explains itself.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!(
                "--- last {} log lines of {} ---\n{}",
                tail.len(),
                self.name,
                tail.join("\n")
            );
        }
    }
}

/// Daemon catalog used by most tests.
pub const DAEMON_TASKS: &str = r#"
[tasks.echo]
builtin = "echo"
[tasks.sha]
command = ["sha256sum"]
max_input = "128MiB"
[tasks.fail]
command = ["sh", "-c", "echo boom on stderr >&2; exit 7"]
[tasks.hang]
command = ["sh", "-c", "sleep 1234.5 & sleep 1234.6; true"]
timeout = "1s"
[tasks.slow]
command = ["sleep", "2"]
[tasks.small]
builtin = "echo"
max_input = "1KiB"
[tasks.restricted]
builtin = "echo"
allowed_agents = ["someone-else"]
"#;

/// Agent catalog: the daemon's, a task only the agent knows, and `small` with a larger
/// limit so the daemon's own limit is what refuses.
pub const AGENT_TASKS: &str = r#"
[tasks.echo]
builtin = "echo"
[tasks.sha]
command = ["sha256sum"]
max_input = "128MiB"
[tasks.fail]
command = ["sh", "-c", "echo boom on stderr >&2; exit 7"]
[tasks.hang]
command = ["sh", "-c", "sleep 1234.5 & sleep 1234.6; true"]
timeout = "1s"
[tasks.slow]
command = ["sleep", "2"]
[tasks.small]
builtin = "echo"
max_input = "64MiB"
[tasks.restricted]
builtin = "echo"
[tasks.ghost]
builtin = "echo"
"#;

/// A daemon and an agent, both real processes, with certificates made by the real
/// `updraftd ca init` and `updraftd cert issue`.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub daemon: Proc,
    pub daemon_addr: String,
    pub agent: Proc,
    pub socket: PathBuf,
}

pub fn updraftd(args: &[&str]) -> Output {
    Command::new(bin("updraftd"))
        .args(args)
        .output()
        .expect("running updraftd")
}

pub fn make_pki(dir: &Path) {
    let pki = dir.join("pki");
    let out = updraftd(&[
        "ca",
        "init",
        "--dir",
        pki.to_str().unwrap(),
        "--name",
        "localhost",
        "127.0.0.1",
    ]);
    assert!(
        out.status.success(),
        "ca init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fp = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        fp.trim().len(),
        64,
        "ca init prints the CA fingerprint: {fp}"
    );
    let out = updraftd(&[
        "cert",
        "issue",
        "--agent-id",
        "board-1",
        "--out",
        dir.join("agent").to_str().unwrap(),
        "--ca-dir",
        pki.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "cert issue: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `updraftd serve --config cfg`, and the address it listens on once it says so
/// (`what` names it in a timeout).
pub fn serve_daemon(cfg: &Path, what: &str) -> (Proc, String) {
    let mut cmd = Command::new(bin("updraftd"));
    cmd.args(["serve", "--config", cfg.to_str().unwrap()]);
    let daemon = Proc::spawn("updraftd", cmd);
    let addr = wait_for(
        &format!("{what} to listen"),
        Duration::from_secs(20),
        || {
            let log = daemon.log();
            let line = log.lines().find(|l| l.contains("updraftd serving"))?;
            let at = line.find("listen=")? + "listen=".len();
            Some(line[at..].split_whitespace().next()?.to_string())
        },
    );
    (daemon, addr)
}

/// `updraftd ca init --dir dir/NAME --name localhost`; returns the CA fingerprint it
/// printed.
pub fn ca_init(dir: &Path, name: &str) -> String {
    let out = updraftd(&[
        "ca",
        "init",
        "--dir",
        dir.join(name).to_str().unwrap(),
        "--name",
        "localhost",
    ]);
    assert!(
        out.status.success(),
        "ca init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

pub fn start_daemon(dir: &Path, extra: &str) -> (Proc, String) {
    let cfg = dir.join("daemon.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = \"dstate\"\nload_report_interval = \"100ms\"\ndrain_timeout = \"20s\"\n{extra}\n[tls]\nca = \"pki/ca.pem\"\ncert = \"pki/server.pem\"\nkey = \"pki/server.key\"\n{DAEMON_TASKS}"
        ),
    )
    .unwrap();
    serve_daemon(&cfg, "the daemon")
}

pub fn start_agent(dir: &Path, daemon_addr: &str, extra: &str) -> (Proc, PathBuf) {
    let cfg = dir.join("agent.toml");
    let socket = dir.join("agent.sock");
    std::fs::write(
        &cfg,
        format!(
            "socket = \"agent.sock\"\nstate_dir = \"astate\"\npolicy = \"policy.toml\"\n{extra}\n[[cloud]]\naddress = \"{daemon_addr}\"\nserver_name = \"localhost\"\n[tls]\nca = \"pki/ca.pem\"\ncert = \"agent/agent.pem\"\nkey = \"agent/agent.key\"\n{AGENT_TASKS}"
        ),
    )
    .unwrap();
    (serve_agent(&cfg), socket)
}

/// `updraft-agent --config CFG enroll` through the daemon at `daemon` (its port, as
/// `localhost`) with `token`, pinning the CA `fingerprint`; not yet run.
pub fn enroll_command(cfg: &Path, daemon: &str, token: &str, fingerprint: &str) -> Command {
    let port = daemon.rsplit_once(':').unwrap().1;
    let mut cmd = Command::new(bin("updraft-agent"));
    cmd.args(["--config", cfg.to_str().unwrap(), "enroll"])
        .args(["--server", &format!("localhost:{port}")])
        .args(["--token", token, "--ca-sha256", fingerprint]);
    cmd
}

/// `updraft-agent serve --config cfg`.
pub fn serve_agent(cfg: &Path) -> Proc {
    let mut cmd = Command::new(bin("updraft-agent"));
    cmd.args(["serve", "--config", cfg.to_str().unwrap()]);
    Proc::spawn("updraft-agent", cmd)
}

/// The agent's `GET /v1/status` on `socket`; `None` while it does not answer.
pub fn agent_status(socket: &Path) -> Option<serde_json::Value> {
    let r = http(socket, "GET", "/v1/status", b"").ok()?;
    serde_json::from_slice(&r.body).ok()
}

impl Cluster {
    /// Starts both and waits until the agent is connected to the daemon.
    pub fn start() -> Self {
        Self::start_with("", "[link]\naccept_timeout = \"1s\"\n")
    }

    pub fn start_with(daemon_extra: &str, agent_extra: &str) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), daemon_extra, agent_extra)
    }

    /// Like [`Cluster::start_with`] in a directory the test prepared (policy file,
    /// fake power_supply tree).
    pub fn start_in(dir: tempfile::TempDir, daemon_extra: &str, agent_extra: &str) -> Self {
        make_pki(dir.path());
        let (daemon, daemon_addr) = start_daemon(dir.path(), daemon_extra);
        let (agent, socket) = start_agent(dir.path(), &daemon_addr, agent_extra);
        let c = Cluster {
            dir,
            daemon,
            daemon_addr,
            agent,
            socket,
        };
        c.wait_connected();
        c
    }

    pub fn wait_connected(&self) {
        wait_for(
            "the agent to connect to the daemon",
            Duration::from_secs(20),
            || {
                let s = self.status().ok()?;
                (s["clouds"][0]["connected"] == true).then_some(())
            },
        );
    }

    pub fn status(&self) -> std::io::Result<serde_json::Value> {
        let r = http(&self.socket, "GET", "/v1/status", b"")?;
        Ok(serde_json::from_slice(&r.body).expect("status is JSON"))
    }

    /// `sha --where SIDE --explain` from `input` into `output`: it succeeds, `--explain`
    /// names the side, and the output is `want` (what `sha256sum` gave for the input).
    pub fn sha_checked(&self, side: &str, input: &Path, output: &Path, want: &[u8]) {
        let o = self.run(
            &[
                "sha",
                "--where",
                side,
                "--explain",
                "--input",
                input.to_str().unwrap(),
                "--output",
                output.to_str().unwrap(),
            ],
            None,
        );
        let what = format!("{} via {side}", input.display());
        assert!(o.status.success(), "{what}: {}", stderr(&o));
        assert!(
            stderr(&o).starts_with(side),
            "{what}: --explain names the side: {}",
            stderr(&o)
        );
        assert_eq!(
            std::fs::read(output).unwrap(),
            want,
            "{what}: output differs from sha256sum"
        );
    }

    /// Runs `updraft-agent run` against this agent.
    pub fn run(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut cmd = Command::new(bin("updraft-agent"));
        cmd.arg("--socket").arg(&self.socket).arg("run").args(args);
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("running updraft-agent run");
        if let Some(input) = stdin {
            let mut s = child.stdin.take().unwrap();
            let input = input.to_vec();
            std::thread::spawn(move || {
                let _ = s.write_all(&input);
            });
        }
        child.wait_with_output().expect("updraft-agent run output")
    }
}

/// A reply from the agent's socket.
pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpReply {
    /// The body as JSON; panics with the body when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A finished command's stderr, as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A plain HTTP/1.1 request over the Unix socket, written and parsed by hand.
pub fn http(socket: &Path, method: &str, path: &str, body: &[u8]) -> std::io::Result<HttpReply> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
    request.extend_from_slice(body);
    // The agent may answer (a refusal) from the head alone and close without reading
    // the body: the reply is still there to read.
    match s.write_all(&request) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        other => other?,
    }
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of HTTP head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let body = raw[split + 4..].to_vec();
    let reply = HttpReply {
        status,
        headers,
        body,
    };
    if let Some(len) = reply.header("content-length") {
        assert_eq!(
            len.parse::<usize>().unwrap(),
            reply.body.len(),
            "body length matches Content-Length"
        );
    }
    Ok(reply)
}

/// Deterministic pseudo-random bytes.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `sha256sum` run directly on `input`, the reference output.
pub fn sha256sum_direct(input: &Path) -> Vec<u8> {
    let out = Command::new("sha256sum")
        .stdin(std::fs::File::open(input).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success());
    out.stdout
}

/// Processes whose command line contains `needle`.
pub fn processes_with(needle: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) {
                found.push(pid);
            }
        }
    }
    found
}

impl Cluster {
    /// Where the agent would place `task` now (`GET /v1/explain/{task}`).
    pub fn explain(&self, task: &str) -> serde_json::Value {
        let r = http(&self.socket, "GET", &format!("/v1/explain/{task}"), b"").expect("explain");
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        serde_json::from_slice(&r.body).expect("explain is JSON")
    }
}

/// Like [`start_daemon`], for tests that run several daemons in one directory or
/// restart one on the address it had: the config is `{name}.toml` with state in
/// `{name}-state`, listening on `listen` (`127.0.0.1:0` for any port).
pub fn start_daemon_named(dir: &Path, name: &str, listen: &str, extra: &str) -> (Proc, String) {
    start_daemon_tls(dir, name, listen, extra, "")
}

/// Like [`start_daemon_named`], with `tls_extra` lines in its `[tls]` table.
pub fn start_daemon_tls(
    dir: &Path,
    name: &str,
    listen: &str,
    extra: &str,
    tls_extra: &str,
) -> (Proc, String) {
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "listen = \"{listen}\"\nstate_dir = \"{name}-state\"\nload_report_interval = \"100ms\"\ndrain_timeout = \"20s\"\n{extra}\n[tls]\nca = \"pki/ca.pem\"\ncert = \"pki/server.pem\"\nkey = \"pki/server.key\"\n{tls_extra}{DAEMON_TASKS}"
        ),
    )
    .unwrap();
    serve_daemon(&cfg, &format!("daemon {name}"))
}

/// Like [`start_agent`] with one `[[cloud]]` entry per address, in that order.
pub fn start_agent_clouds(dir: &Path, daemon_addrs: &[&str], extra: &str) -> (Proc, PathBuf) {
    let cfg = dir.join("agent.toml");
    let socket = dir.join("agent.sock");
    let clouds: String = daemon_addrs
        .iter()
        .map(|a| format!("[[cloud]]\naddress = \"{a}\"\nserver_name = \"localhost\"\n"))
        .collect();
    std::fs::write(
        &cfg,
        format!(
            "socket = \"agent.sock\"\nstate_dir = \"astate\"\npolicy = \"policy.toml\"\n{extra}\n{clouds}[tls]\nca = \"pki/ca.pem\"\ncert = \"agent/agent.pem\"\nkey = \"agent/agent.key\"\n{AGENT_TASKS}"
        ),
    )
    .unwrap();
    (serve_agent(&cfg), socket)
}

/// A daemon started with `extra` config, and a QUIC endpoint to reach it as any agent
/// of the test PKI: for tests that speak the protocol's frames themselves.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub daemon: Proc,
    pub addr: String,
    pub endpoint: quinn::Endpoint,
}

impl Daemon {
    pub fn start(extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        make_pki(dir.path());
        let (daemon, addr) = start_daemon(dir.path(), extra);
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        Self {
            dir,
            daemon,
            addr,
            endpoint,
        }
    }

    /// A connection as agent `cn`, within 30 s.
    pub async fn connect(&self, cn: &str) -> quinn::Connection {
        let cfg = wire::client_config(self.dir.path(), cn);
        tokio::time::timeout(
            Duration::from_secs(30),
            self.endpoint
                .connect_with(cfg, self.addr.parse().unwrap(), "localhost")
                .unwrap(),
        )
        .await
        .expect("connecting within the wait limit")
        .expect("connecting to the daemon")
    }
}
