//! Who may take an agent id. An unbound token may enroll a free id (never enrolled, or
//! whose certificates all expired) but not one that holds an unexpired certificate from
//! this CA; re-enrolling a held id needs a token bound to it, is logged with who
//! replaced whom, and revokes the replaced certificate at the handshake. And `enroll`
//! verifies the daemon under the right name: `--server-name`, else the `server_name`
//! of the `[[cloud]]` entry for that address.

mod common;

use common::{bin, serve_agent, start_daemon, stderr, updraftd, wait_for, AGENT_TASKS};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

/// `updraftd ca init` into `dir/pki` for `names`; returns the CA fingerprint.
fn ca_init(dir: &Path, names: &[&str]) -> String {
    let pki = dir.join("pki");
    let mut args = vec!["ca", "init", "--dir", pki.to_str().unwrap(), "--name"];
    args.extend(names);
    let out = updraftd(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// `updraftd token create`, bound to `agent_id` when given.
fn token(dir: &Path, agent_id: Option<&str>) -> String {
    let cfg = dir.join("daemon.toml");
    let mut args = vec!["token", "create", "--config", cfg.to_str().unwrap()];
    if let Some(id) = agent_id {
        args.extend(["--agent-id", id]);
    }
    let out = updraftd(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A board: `dir/NAME/agent.toml` with its own state_dir, asking for `agent_id`, with
/// one `[[cloud]]` entry `cloud_address` (server_name `localhost`).
fn board(dir: &Path, name: &str, agent_id: &str, cloud_address: &str) -> PathBuf {
    let home = dir.join(name);
    std::fs::create_dir_all(&home).unwrap();
    let cfg = home.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "agent_id = \"{agent_id}\"\nsocket = \"agent.sock\"\nstate_dir = \"astate\"\n[link]\naccept_timeout = \"1s\"\n[[cloud]]\naddress = \"{cloud_address}\"\nserver_name = \"localhost\"\n{AGENT_TASKS}"
        ),
    )
    .unwrap();
    cfg
}

fn enroll(cfg: &Path, server: &str, token: &str, fingerprint: &str, extra: &[&str]) -> Output {
    Command::new(bin("updraft-agent"))
        .args(["--config", cfg.to_str().unwrap(), "enroll"])
        .args([
            "--server",
            server,
            "--token",
            token,
            "--ca-sha256",
            fingerprint,
        ])
        .args(extra)
        .output()
        .unwrap()
}

fn localhost(addr: &str) -> String {
    format!("localhost:{}", addr.rsplit_once(':').unwrap().1)
}

#[test]
fn an_unbound_token_cannot_take_a_live_identity() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let fp = ca_init(dir, &["localhost", "127.0.0.1"]);
    let (daemon, addr) = start_daemon(dir, "");
    let server = localhost(&addr);

    // A fresh id, with an unbound token: enrolled.
    let first = board(dir, "first", "board-7", &addr);
    let o = enroll(&first, &server, &token(dir, None), &fp, &[]);
    assert!(o.status.success(), "{}", stderr(&o));

    // Another board asking for the same id with an unbound token: refused, and the
    // token is not spent.
    let thief = board(dir, "thief", "board-7", &addr);
    let unbound = token(dir, None);
    let o = enroll(&thief, &server, &unbound, &fp, &[]);
    assert!(!o.status.success());
    let said = stderr(&o);
    assert!(
        said.contains("bad_token")
            && said.contains("`board-7` already has a certificate")
            && said.contains("updraftd token create --agent-id board-7"),
        "{said}"
    );
    assert!(!thief.with_file_name("astate").join("agent.pem").exists());
    // The same token still enrolls a fresh id.
    let other = board(dir, "other", "board-8", &addr);
    let o = enroll(&other, &server, &unbound, &fp, &[]);
    assert!(o.status.success(), "{}", stderr(&o));

    // A token bound to the id re-enrolls it, and the log says who replaced whom.
    let o = enroll(&thief, &server, &token(dir, Some("board-7")), &fp, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let line = wait_for(
        "the replacement to be logged",
        Duration::from_secs(10),
        || {
            daemon
                .log()
                .lines()
                .find(|l| l.contains("enrolled again with a token bound to it"))
                .map(str::to_string)
        },
    );
    assert!(
        line.contains("board-7") && line.contains("revoked") && line.contains("127.0.0.1"),
        "{line}"
    );

    // The replaced certificate is refused at the handshake; the new one connects.
    let old = serve_agent(&first);
    wait_for(
        "the old certificate to be refused",
        Duration::from_secs(20),
        || {
            daemon
                .log()
                .lines()
                .any(|l| l.contains("refused a revoked certificate") && l.contains("board-7"))
                .then_some(())
        },
    );
    drop(old);
    let new = serve_agent(&thief);
    let socket = thief.with_file_name("agent.sock");
    wait_for("the new holder to connect", Duration::from_secs(20), || {
        let r = common::http(&socket, "GET", "/v1/status", b"").ok()?;
        let s: serde_json::Value = serde_json::from_slice(&r.body).ok()?;
        (s["clouds"][0]["connected"] == true).then_some(())
    });
    drop(new);
}

#[test]
fn an_id_whose_certificate_expired_is_free_again() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let fp = ca_init(dir, &["localhost"]);
    let (_daemon, addr) = start_daemon(dir, "");
    let server = localhost(&addr);
    // Issued by hand and recorded in the daemon's state_dir.
    let out = updraftd(&[
        "cert",
        "issue",
        "--agent-id",
        "board-9",
        "--out",
        dir.join("byhand").to_str().unwrap(),
        "--ca-dir",
        dir.join("pki").to_str().unwrap(),
        "--valid-for",
        "2s",
        "--state-dir",
        dir.join("dstate").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let issued = SystemTime::now();
    let cfg = board(dir, "new", "board-9", &addr);
    let unbound = token(dir, None);
    let o = enroll(&cfg, &server, &unbound, &fp, &[]);
    assert!(
        stderr(&o).contains("already has a certificate"),
        "{}",
        stderr(&o)
    );
    wait_for("the certificate to expire", Duration::from_secs(10), || {
        // X.509 times have whole seconds, and "not after" includes its second.
        (SystemTime::now() > issued + Duration::from_millis(3500)).then_some(())
    });
    let o = enroll(&cfg, &server, &unbound, &fp, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn enroll_verifies_the_daemon_under_its_configured_server_name() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    // The daemon's certificate names `localhost` only; agents dial 127.0.0.1.
    let fp = ca_init(dir, &["localhost"]);
    let (_daemon, addr) = start_daemon(dir, "");
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");

    // The config's [[cloud]] entry for this address says server_name = "localhost".
    let cfg = board(dir, "configured", "board-1", &addr);
    let o = enroll(&cfg, &addr, &token(dir, None), &fp, &[]);
    assert!(o.status.success(), "{}", stderr(&o));

    // No entry for this address: the host is the name, and the error says the CA
    // matched but the certificate names other hosts, and which.
    let cfg = board(dir, "bare", "board-2", "cloud.invalid:4433");
    let t = token(dir, None);
    let o = enroll(&cfg, &addr, &t, &fp, &[]);
    assert!(!o.status.success());
    let said = stderr(&o);
    assert!(
        said.contains("has the pinned CA")
            && said.contains("does not name `127.0.0.1`")
            && said.contains("it names localhost")
            && said.contains("--server-name"),
        "{said}"
    );
    assert!(!said.contains("not the one you meant"), "{said}");

    // --server-name gives the name.
    let o = enroll(&cfg, &addr, &t, &fp, &["--server-name", "localhost"]);
    assert!(o.status.success(), "{}", stderr(&o));
}
