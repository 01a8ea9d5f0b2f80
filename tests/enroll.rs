//! Enrollment with one-time tokens, renewal over the live connection, and what an
//! expired certificate says — with the real binaries, real QUIC and mutual TLS.

mod common;

use common::{
    agent_status, bin, serve_agent, start_daemon, stderr, updraftd, wait_for, AGENT_TASKS,
};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime};

/// `updraftd ca init` into `dir/pki`; returns the CA fingerprint it printed.
fn ca_init(dir: &Path) -> String {
    let out = updraftd(&[
        "ca",
        "init",
        "--dir",
        dir.join("pki").to_str().unwrap(),
        "--name",
        "localhost",
        "127.0.0.1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// `updraftd token create`; returns the token and what was said on stderr.
fn token_create(dir: &Path, ttl: &str) -> (String, String) {
    let cfg = dir.join("daemon.toml");
    let out = updraftd(&[
        "token",
        "create",
        "--ttl",
        ttl,
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8(out.stdout).unwrap().trim().to_string(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// An agent config with no `[tls]`: key, certificate and CA default to `state_dir`.
fn write_agent_config(dir: &Path, daemon: &str, extra: &str) -> PathBuf {
    let cfg = dir.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "agent_id = \"board-7\"\nsocket = \"agent.sock\"\nstate_dir = \"astate\"\npolicy = \"policy.toml\"\n{extra}\n[[cloud]]\naddress = \"{daemon}\"\nserver_name = \"localhost\"\n{AGENT_TASKS}"
        ),
    )
    .unwrap();
    cfg
}

fn enroll(cfg: &Path, daemon: &str, token: &str, fingerprint: &str, force: bool) -> Output {
    let mut cmd = common::enroll_command(cfg, daemon, token, fingerprint);
    if force {
        cmd.arg("--force");
    }
    cmd.output().unwrap()
}

fn wait_connected(socket: &Path) {
    wait_for("the agent to connect", Duration::from_secs(20), || {
        (agent_status(socket)?["clouds"][0]["connected"] == true).then_some(())
    });
}

fn run_cloud(socket: &Path, task: &str, input: &[u8]) -> Output {
    let mut child = Command::new(bin("updraft-agent"))
        .arg("--socket")
        .arg(socket)
        .args(["run", task, "--where", "cloud", "--input", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn enrollment_round_trip_and_refusals() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let fingerprint = ca_init(dir);
    let (_daemon, addr) = start_daemon(dir, "");
    let cfg = write_agent_config(dir, &addr, "");

    let (token, said) = token_create(dir, "1h");
    assert_eq!(token.len(), 40, "{token}");
    assert!(
        said.contains("updraft-agent enroll --server") && said.contains(&fingerprint),
        "token create tells the operator what to run: {said}"
    );
    // The token is stored hashed: its text is nowhere in the daemon's state.
    let tokens = std::fs::read_dir(dir.join("dstate/tokens")).unwrap();
    for e in tokens.flatten() {
        assert!(!e.file_name().to_string_lossy().contains(&token));
        if e.path().is_file() {
            assert!(!std::fs::read_to_string(e.path()).unwrap().contains(&token));
        }
    }

    // A daemon whose CA is not the pinned one: refused before the token is sent.
    let wrong = "ab".repeat(32);
    let out = enroll(&cfg, &addr, &token, &wrong, false);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains("fingerprint") && e.contains(&fingerprint) && e.contains("nothing was sent"),
        "{e}"
    );
    assert_eq!(e.trim().lines().count(), 1, "one line: {e}");
    assert!(!dir.join("astate/agent.pem").exists());

    // The right fingerprint: enrolled, with the same token (it was not spent above).
    let out = enroll(&cfg, &addr, &token, &fingerprint, false);
    assert!(out.status.success(), "{}", stderr(&out));
    for f in ["agent.pem", "agent.key", "ca.pem"] {
        assert!(dir.join("astate").join(f).exists(), "{f} in state_dir");
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join("astate/agent.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "the key is private");

    // The same token again: refused, saying who used it.
    let out = enroll(&cfg, &addr, &token, &fingerprint, true);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(e.contains("already used") && e.contains("board-7"), "{e}");

    // An expired token.
    let (short, _) = token_create(dir, "1s");
    let made = SystemTime::now();
    wait_for("the token to expire", Duration::from_secs(5), || {
        (SystemTime::now() > made + Duration::from_millis(1100)).then_some(())
    });
    let out = enroll(&cfg, &addr, &short, &fingerprint, true);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("expired"), "{}", stderr(&out));

    // Without --force a valid certificate is not replaced.
    let (t3, _) = token_create(dir, "1h");
    let out = enroll(&cfg, &addr, &t3, &fingerprint, false);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));

    // The enrolled agent serves with no [tls] config and offloads a task.
    let agent = serve_agent(&cfg);
    let socket = dir.join("agent.sock");
    wait_connected(&socket);
    assert_eq!(agent_status(&socket).unwrap()["agent_id"], "board-7");
    let out = run_cloud(&socket, "echo", b"enrolled and offloaded");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout, b"enrolled and offloaded");
    drop(agent);
}

#[test]
fn renewal_swaps_the_certificate_without_dropping_a_running_task() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let fingerprint = ca_init(dir);
    let started = dir.join("started");
    let release = dir.join("release");
    let hold = format!(
        "[tasks.hold]\ncommand = [\"sh\", \"-c\", \"touch {s}; while [ ! -e {r} ]; do sleep 0.05; done; echo held\"]\ntimeout = \"2m\"\n",
        s = started.display(),
        r = release.display()
    );
    // Certificates of 30 s, renewed 22 s before their end: the first renewal is due
    // 8 s after enrollment, while the task below is running.
    let (daemon, addr) = start_daemon(dir, &format!("[enroll]\ncert_lifetime = \"30s\"\n{hold}"));
    let cfg = write_agent_config(
        dir,
        &addr,
        &format!("[tls]\nrenew_before = \"22s\"\n{hold}"),
    );
    let (token, _) = token_create(dir, "1h");
    let out = enroll(&cfg, &addr, &token, &fingerprint, false);
    assert!(out.status.success(), "{}", stderr(&out));
    let first = std::fs::read(dir.join("astate/agent.pem")).unwrap();

    let mut agent = serve_agent(&cfg);
    let socket = dir.join("agent.sock");
    wait_connected(&socket);
    let running = {
        let socket = socket.clone();
        std::thread::spawn(move || run_cloud(&socket, "hold", b""))
    };
    wait_for(
        "the task to start on the daemon",
        Duration::from_secs(20),
        || started.exists().then_some(()),
    );
    assert!(
        !agent.log().contains("certificate renewed"),
        "renewal came before the task started; the test proves nothing"
    );
    wait_for(
        "the agent to renew its certificate",
        Duration::from_secs(40),
        || agent.log().contains("certificate renewed").then_some(()),
    );
    assert!(daemon.log().contains("renewed an agent certificate"));
    let second = std::fs::read(dir.join("astate/agent.pem")).unwrap();
    assert_ne!(first, second, "the renewed certificate is on disk");

    std::fs::write(&release, b"").unwrap();
    let out = running.join().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout, b"held\n");
    assert_eq!(
        daemon.log().matches("agent connected").count(),
        1,
        "the connection the task ran on was never dropped"
    );

    // A restart loads the renewed files, and the daemon takes them.
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    agent.wait_exit(Duration::from_secs(20));
    drop(agent);
    let agent = serve_agent(&cfg);
    wait_connected(&socket);
    let out = run_cloud(&socket, "echo", b"after renewal");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout, b"after renewal");
    drop(agent);
}

#[test]
fn an_expired_certificate_says_what_to_run() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    ca_init(dir);
    let (_daemon, addr) = start_daemon(dir, "");
    let out = updraftd(&[
        "cert",
        "issue",
        "--agent-id",
        "board-7",
        "--out",
        dir.join("astate").to_str().unwrap(),
        "--ca-dir",
        dir.join("pki").to_str().unwrap(),
        "--valid-for",
        "1s",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::copy(dir.join("pki/ca.pem"), dir.join("astate/ca.pem")).unwrap();
    let issued = SystemTime::now();
    wait_for("the certificate to expire", Duration::from_secs(5), || {
        // X.509 times have whole seconds, and "not after" includes its second.
        (SystemTime::now() > issued + Duration::from_millis(2500)).then_some(())
    });
    let cfg = write_agent_config(dir, &addr, "");
    let agent = serve_agent(&cfg);
    let socket = dir.join("agent.sock");
    let line = wait_for("the expiry to be reported", Duration::from_secs(20), || {
        agent
            .log()
            .lines()
            .find(|l| l.contains("expired at"))
            .map(str::to_string)
    });
    assert!(
        line.contains("updraftd token create") && line.contains("updraft-agent enroll"),
        "{line}"
    );
    let s = wait_for("status", Duration::from_secs(10), || agent_status(&socket));
    assert_eq!(s["certificate"]["expired"], true);
    // Connection attempts carry the same advice.
    wait_for(
        "the advice on the daemon's link",
        Duration::from_secs(20),
        || {
            let s = agent_status(&socket)?;
            let e = s["clouds"][0]["last_error"].as_str()?.to_string();
            e.contains("updraft-agent enroll").then_some(())
        },
    );
}
