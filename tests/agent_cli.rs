//! The agent's command line and start-up: `check-config` checks what `serve` would
//! (config ranges, log level, TLS pair, policy) without binding or opening anything;
//! flags given where they do nothing are errors; `serve` removes only a stale socket;
//! SIGHUP says which agent.toml changes need a restart.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// An agent.toml in `dir` (which has `make_pki` material) with `extra` on top.
fn write_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let cfg = dir.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "socket = \"agent.sock\"\nstate_dir = \"astate\"\npolicy = \"policy.toml\"\n{extra}\n[[cloud]]\naddress = \"127.0.0.1:9\"\nserver_name = \"localhost\"\n[tls]\nca = \"pki/ca.pem\"\ncert = \"agent/agent.pem\"\nkey = \"agent/agent.key\"\n{AGENT_TASKS}"
        ),
    )
    .unwrap();
    cfg
}

fn agent(args: &[&str]) -> std::process::Output {
    Command::new(bin("updraft-agent"))
        .args(args)
        .output()
        .expect("running updraft-agent")
}

fn check_config(cfg: &Path) -> (i32, String) {
    let o = agent(&["check-config", "--config", cfg.to_str().unwrap()]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.code().unwrap_or(-1), text)
}

#[test]
fn check_config_checks_what_serve_would_and_touches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    let cfg = write_config(dir.path(), "log_level = \"warning\"");
    let (code, out) = check_config(&cfg);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok: agent `board-1`"), "{out}");
    assert!(
        !dir.path().join("agent.sock").exists() && !dir.path().join("astate").exists(),
        "check-config binds no socket and opens no journal"
    );
    for (extra, named) in [
        ("log_level = \"verbose\"", "log_level"),
        (
            "max_local_concurrency = 2305843009213693952",
            "max_local_concurrency",
        ),
        (
            "[journal]\nmax_running = 2305843009213693952",
            "journal.max_running",
        ),
        ("[link]\nkeep_alive = \"0s\"", "link.keep_alive"),
    ] {
        let cfg = write_config(dir.path(), extra);
        let (code, out) = check_config(&cfg);
        assert_eq!(code, 64, "{extra}: {out}");
        assert!(
            out.contains("agent.toml") && out.contains(named),
            "{extra}: {out}"
        );
    }
    // A key that is not the certificate's.
    let cfg = write_config(dir.path(), "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("agent/agent.key", "pki/server.key");
    std::fs::write(&cfg, text).unwrap();
    let (code, out) = check_config(&cfg);
    assert_eq!(code, 64, "{out}");
    assert!(
        out.contains("server.key does not belong to") && out.contains("agent.pem"),
        "{out}"
    );
    // A missing certificate, and a broken policy file.
    let cfg = write_config(dir.path(), "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("agent/agent.pem", "agent/missing.pem");
    std::fs::write(&cfg, text).unwrap();
    let (code, out) = check_config(&cfg);
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("missing.pem"), "{out}");
    let cfg = write_config(dir.path(), "");
    std::fs::write(dir.path().join("policy.toml"), "default = \"sideways\"\n").unwrap();
    let (code, out) = check_config(&cfg);
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("policy.toml"), "{out}");
}

#[test]
fn flags_that_would_do_nothing_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("x.sock");
    let sock = sock.to_str().unwrap();
    for args in [
        vec!["serve", "--socket", sock],
        vec!["--socket", sock, "serve"],
        vec!["--socket", sock, "check-config"],
        vec!["--config", "/nonexistent.toml", "policy", "check", "p.toml"],
        vec!["status", "--socket", sock, "--config", "/nonexistent.toml"],
        vec!["--socket", sock, "status", "--socket", sock],
    ] {
        let o = agent(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            matches!(o.status.code(), Some(2 | 64)),
            "{args:?}: {:?} {err}",
            o.status
        );
        assert!(
            err.contains("--socket") || err.contains("--config"),
            "{args:?}: {err}"
        );
        assert!(!Path::new(sock).exists(), "{args:?} served nothing");
    }
    // Both places are still accepted where the flag is used.
    for args in [
        vec!["--socket", sock, "status"],
        vec!["status", "--socket", sock],
    ] {
        let o = agent(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(69), "{args:?}: {err}");
        assert!(err.contains("x.sock"), "{args:?}: {err}");
    }
}

#[test]
fn serve_replaces_only_a_stale_socket() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    // A regular file where the socket should be: refused, and left alone.
    std::fs::write(dir.path().join("agent.sock"), b"precious").unwrap();
    let (mut a, socket) = start_agent(dir.path(), "127.0.0.1:9", "");
    let status = a.wait_exit(Duration::from_secs(20));
    assert!(!status.success());
    let log = a.log();
    assert!(
        log.contains(&socket.display().to_string()) && log.contains("is not a socket"),
        "{log}"
    );
    assert_eq!(std::fs::read(&socket).unwrap(), b"precious");
    // A socket nobody answers on is replaced.
    std::fs::remove_file(&socket).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let (a, socket) = start_agent(dir.path(), "127.0.0.1:9", "");
    wait_for("the agent to serve", Duration::from_secs(20), || {
        http(&socket, "GET", "/v1/status", b"").ok()
    });
    drop(a);
}

#[test]
fn sighup_names_agent_toml_changes_that_need_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    let (a, socket) = start_agent(dir.path(), "127.0.0.1:9", "max_local_queue = 8");
    wait_for("the agent to serve", Duration::from_secs(20), || {
        http(&socket, "GET", "/v1/status", b"").ok()
    });
    let cfg = dir.path().join("agent.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("max_local_queue = 8", "max_local_queue = 9"),
    )
    .unwrap();
    a.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for("the SIGHUP report", Duration::from_secs(20), || {
        let log = a.log();
        (log.contains("max_local_queue changed") && log.contains("restart")).then_some(())
    });
    // A file that would not load is reported, and the agent serves on.
    std::fs::write(
        &cfg,
        text.replace("max_local_queue = 8", "max_local_queue = -1"),
    )
    .unwrap();
    a.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for("the refusal", Duration::from_secs(20), || {
        a.log()
            .contains("would not start with this file")
            .then_some(())
    });
    assert_eq!(http(&socket, "GET", "/v1/status", b"").unwrap().status, 200);
}
