//! Running a fleet from the cloud side, with the real binaries: `updraftd agents` lists
//! every board with what it reported on its fleet stream (version, certificate expiry,
//! policy in force, where its tasks ran), and `updraftd agent revoke` shuts one out —
//! disconnected at once, refused at every reconnect, and still after a daemon restart.
mod common;
use common::{
    agent_status as status, bin, ca_init, http, serve_agent, serve_daemon, stderr, updraftd,
    wait_for, Proc, AGENT_TASKS, DAEMON_TASKS,
};
use sha2::Digest;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const WAIT: Duration = Duration::from_secs(30);

fn write_daemon_config(dir: &Path) -> PathBuf {
    let cfg = dir.join("daemon.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = \"dstate\"\nload_report_interval = \"100ms\"\ndrain_timeout = \"5s\"\n[tls]\nca = \"pki/ca.pem\"\ncert = \"pki/server.pem\"\nkey = \"pki/server.key\"\nca_key = \"pki/ca.key\"\n{DAEMON_TASKS}"
        ),
    )
    .unwrap();
    cfg
}

/// A CA in `dir/pki`, and a daemon serving with it: the daemon, its address, its
/// config file and the CA fingerprint boards pin.
fn fleet_daemon(dir: &Path) -> (Proc, String, PathBuf, String) {
    let fingerprint = ca_init(dir, "pki");
    let cfg = write_daemon_config(dir);
    let (daemon, addr) = serve_daemon(&cfg, "the daemon");
    (daemon, addr, cfg, fingerprint)
}

/// A board: its certificate from `cert issue` (recorded in the daemon's state), its
/// config, and optionally a policy file.
fn board(dir: &Path, id: &str, daemon: &str, policy: Option<&str>) -> (PathBuf, PathBuf) {
    board_with(dir, id, daemon, policy, "policy = \"policy.toml\"\n")
}

/// Like [`board`], with `policy_key` (the `policy` line or `[policy]` table) and
/// anything after it in agent.toml.
fn board_with(
    dir: &Path,
    id: &str,
    daemon: &str,
    policy: Option<&str>,
    policy_key: &str,
) -> (PathBuf, PathBuf) {
    let home = dir.join(id);
    std::fs::create_dir_all(&home).unwrap();
    let out = updraftd(&[
        "cert",
        "issue",
        "--agent-id",
        id,
        "--out",
        home.join("tls").to_str().unwrap(),
        "--ca-dir",
        dir.join("pki").to_str().unwrap(),
        "--state-dir",
        dir.join("dstate").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "cert issue: {}", stderr(&out));
    if let Some(p) = policy {
        std::fs::write(home.join("policy.toml"), p).unwrap();
    }
    let ca = dir.join("pki/ca.pem");
    let cfg = home.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "socket = \"agent.sock\"\nstate_dir = \"state\"\n{policy_key}\n[link]\naccept_timeout = \"1s\"\nreconnect_min = \"50ms\"\nreconnect_max = \"200ms\"\n[[cloud]]\naddress = \"{daemon}\"\nserver_name = \"localhost\"\n[tls]\nca = \"{}\"\ncert = \"tls/agent.pem\"\nkey = \"tls/agent.key\"\n[tasks.board_only]\nbuiltin = \"echo\"\n{AGENT_TASKS}",
            ca.display()
        ),
    )
    .unwrap();
    (cfg, home.join("agent.sock"))
}

/// `updraftd agents --json` (with `--id`), parsed; `None` while the daemon is not up.
fn agents(cfg: &Path, id: Option<&str>) -> Option<serde_json::Value> {
    let mut args = vec!["agents", "--json", "--config", cfg.to_str().unwrap()];
    if let Some(id) = id {
        args.extend(["--id", id]);
    }
    let out = updraftd(&args);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).expect("agents --json is JSON"))
}

fn find<'a>(list: &'a serde_json::Value, id: &str) -> Option<&'a serde_json::Value> {
    list.as_array()?.iter().find(|a| a["agent_id"] == id)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn agents_lists_every_board_and_a_revoked_one_stays_out() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (mut daemon, addr, dcfg, _) = fleet_daemon(d);

    let policy_1 = "default = \"cloud\"\n";
    let policy_2 = "default = \"local\"\n[[rule]]\nname = \"big\"\nplace = \"cloud\"\nwhen = { input_bytes = { above = 1000000 } }\n";
    let boards = [
        ("board-1", Some(policy_1)),
        ("board-2", Some(policy_2)),
        ("board-3", None),
    ];
    let mut procs = Vec::new();
    let mut sockets = Vec::new();
    for (id, policy) in boards {
        let (cfg, socket) = board(d, id, &addr, policy);
        procs.push(serve_agent(&cfg));
        sockets.push(socket);
    }

    // Every board reports in: version, certificate expiry, policy in force.
    let version = String::from_utf8(
        Command::new(bin("updraft-agent"))
            .arg("--version")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let list = wait_for("three boards to report", WAIT, || {
        let list = agents(&dcfg, None)?;
        boards
            .iter()
            .all(|(id, _)| {
                find(&list, id).is_some_and(|a| a["connections"] == 1 && a["version"].is_string())
            })
            .then_some(list)
    });
    let year_ms = 365 * 86_400_000u64;
    for (id, policy) in boards {
        let a = find(&list, id).unwrap();
        let v = a["version"].as_str().unwrap();
        assert!(
            version.contains(v),
            "{id}: reported {v}, binary says {version}"
        );
        let expires = a["cert_not_after_unix_ms"].as_u64().unwrap();
        assert!(
            expires > now_ms() + year_ms - 86_400_000 && expires < now_ms() + year_ms + 86_400_000,
            "{id}: expiry {expires}"
        );
        assert!(
            a["cert_serial"].as_str().is_some_and(|s| !s.is_empty()),
            "{a}"
        );
        assert!(
            a["address"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{a}"
        );
        match policy {
            Some(text) => {
                assert_eq!(a["policy"]["source"], "file", "{a}");
                assert_eq!(
                    a["policy"]["hash"],
                    hex::encode(sha2::Sha256::digest(text.as_bytes())),
                    "{id}: the hash of the file in force"
                );
            }
            None => {
                assert_eq!(a["policy"]["source"], "default", "{a}");
                assert_eq!(a["policy"]["hash"], "", "{a}");
            }
        }
    }
    // The table says the same.
    let table = updraftd(&["agents", "--config", dcfg.to_str().unwrap()]);
    assert!(table.status.success(), "{}", stderr(&table));
    let table = String::from_utf8(table.stdout).unwrap();
    for (id, _) in boards {
        let line = table
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("{table}"));
        assert!(
            line.contains("connected") && line.contains("in 36"),
            "{table}"
        );
    }

    // A task offloaded from board-1 shows in its mix.
    let r = http(&sockets[0], "POST", "/v1/tasks/echo", b"hi").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("updraft-placement"), Some("cloud"));
    wait_for("board-1's mix to show its cloud task", WAIT, || {
        let a = agents(&dcfg, Some("board-1"))?;
        (a["mix"]["cloud"].as_u64()? >= 1).then_some(())
    });

    // Revoking board-2 closes its connection, and it cannot come back.
    let out = updraftd(&[
        "agent",
        "revoke",
        "board-2",
        "--config",
        dcfg.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = String::from_utf8(out.stdout).unwrap();
    assert!(
        said.contains("revoked agent `board-2`") && said.contains("1 live connection(s) closed"),
        "{said}"
    );
    let why = wait_for("board-2 to say it is refused", WAIT, || {
        let s = status(&sockets[1])?;
        let c = &s["clouds"][0];
        (c["connected"] == false).then_some(())?;
        let e = c["last_error"].as_str()?.to_string();
        e.contains("revoked by the operator").then_some(e)
    });
    assert!(
        why.contains("updraftd token create --agent-id board-2"),
        "{why}"
    );
    let a = agents(&dcfg, Some("board-2")).unwrap();
    assert!(a["revoked_unix_ms"].is_u64(), "{a}");
    assert_eq!(a["connections"], 0, "{a}");
    // The others carry on.
    let a = agents(&dcfg, Some("board-3")).unwrap();
    assert_eq!(a["connections"], 1, "{a}");

    // An unknown id is refused by name.
    let out = updraftd(&[
        "agent",
        "revoke",
        "nobody",
        "--config",
        dcfg.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no agent `nobody`"),
        "{}",
        stderr(&out)
    );

    // After a restart the registry and the deny list are still there.
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(daemon.wait_exit(WAIT).success(), "{}", daemon.log());
    let before = std::fs::read_dir(d.join("dstate/fleet")).unwrap().count();
    assert_eq!(before, 3, "one record per board");
    let (daemon, _) = serve_daemon_at(&dcfg, &addr);
    wait_for(
        "the revoked board to be refused by the restarted daemon",
        WAIT,
        || {
            daemon
                .log()
                .lines()
                .any(|l| l.contains("refused a revoked certificate") && l.contains("board-2"))
                .then_some(())
        },
    );
    let list = agents(&dcfg, None).unwrap();
    assert!(
        find(&list, "board-2").unwrap()["revoked_unix_ms"].is_u64(),
        "{list}"
    );
    wait_for("board-1 to reconnect after the restart", WAIT, || {
        (agents(&dcfg, Some("board-1"))?["connections"] == 1).then_some(())
    });
    assert!(
        status(&sockets[1]).unwrap()["clouds"][0]["connected"] == false,
        "board-2 stays out"
    );
}

/// Restarts the daemon on the address it had, so the boards find it again.
fn serve_daemon_at(cfg: &Path, addr: &str) -> (Proc, String) {
    let text = std::fs::read_to_string(cfg).unwrap();
    std::fs::write(
        cfg,
        text.replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{addr}\"")),
    )
    .unwrap();
    serve_daemon(cfg, "the restarted daemon")
}

#[test]
fn agents_without_a_running_daemon_says_what_to_check() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("daemon.toml");
    std::fs::write(
        &cfg,
        "state_dir = \"dstate\"\n[tls]\nca = \"ca.pem\"\ncert = \"s.pem\"\nkey = \"s.key\"\n",
    )
    .unwrap();
    let out = updraftd(&["agents", "--config", cfg.to_str().unwrap()]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains("cannot reach updraftd on its admin socket") && e.contains("admin.sock"),
        "{e}"
    );
    assert_eq!(e.trim().lines().count(), 1, "{e}");
}

/// A board enrolled with `token`: a config without `[tls]` (files go to its state_dir).
fn enrolled_board(dir: &Path, id: &str, daemon: &str, token: &str, fingerprint: &str) -> PathBuf {
    let home = dir.join(id);
    std::fs::create_dir_all(&home).unwrap();
    let cfg = home.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "agent_id = \"{id}\"\nsocket = \"agent.sock\"\nstate_dir = \"state\"\n[[cloud]]\naddress = \"{daemon}\"\nserver_name = \"localhost\"\n{AGENT_TASKS}"
        ),
    )
    .unwrap();
    let out = common::enroll_command(&cfg, daemon, token, fingerprint)
        .output()
        .unwrap();
    assert!(out.status.success(), "enroll {id}: {}", stderr(&out));
    cfg
}

#[test]
fn boards_enrolled_in_bulk_are_listed_and_tokens_can_be_withdrawn() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_daemon, addr, dcfg, fingerprint) = fleet_daemon(d);
    let c = dcfg.to_str().unwrap();

    // One token for three boards whose ids start with farm-, written to a file.
    let file = d.join("tokens.txt");
    let out = updraftd(&[
        "token",
        "create",
        "--uses",
        "3",
        "--agent-id-prefix",
        "farm-",
        "--out",
        file.to_str().unwrap(),
        "--config",
        c,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("token for 3 boards"),
        "{}",
        stderr(&out)
    );
    let shared_token = std::fs::read_to_string(&file).unwrap().trim().to_string();
    // And two one-time tokens, one per line.
    let out = updraftd(&["token", "create", "--count", "2", "--config", c]);
    assert!(out.status.success(), "{}", stderr(&out));
    let singles: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(singles.len(), 2);
    assert_ne!(singles[0], singles[1]);

    let mut procs = Vec::new();
    for id in ["farm-1", "farm-2", "farm-3"] {
        let cfg = enrolled_board(d, id, &addr, &shared_token, &fingerprint);
        procs.push(serve_agent(&cfg));
    }
    // The shared token is used up.
    let list = updraftd(&["token", "list", "--json", "--config", c]);
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let shared = list
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["uses"] == 3)
        .unwrap();
    assert_eq!(shared["state"], "used", "{list}");
    assert_eq!(
        shared["enrolled"],
        serde_json::json!(["farm-1", "farm-2", "farm-3"])
    );

    // A withdrawn one-time token enrolls nothing, and the board is told why.
    let id = &hex::encode(sha2::Sha256::digest(singles[0].as_bytes()))[..12];
    let out = updraftd(&["token", "revoke", id, "--config", c]);
    assert!(out.status.success(), "{}", stderr(&out));
    let after: serde_json::Value =
        serde_json::from_slice(&updraftd(&["token", "list", "--json", "--config", c]).stdout)
            .unwrap();
    let state_of = |id: &str| {
        after
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["id"] == id)
            .unwrap()["state"]
            .clone()
    };
    assert_eq!(state_of(id), "revoked", "{after}");
    let other = &hex::encode(sha2::Sha256::digest(singles[1].as_bytes()))[..12];
    assert_eq!(state_of(other), "live", "{after}");
    let home = d.join("late");
    std::fs::create_dir_all(&home).unwrap();
    let cfg = home.join("agent.toml");
    std::fs::write(
        &cfg,
        format!("agent_id = \"late-1\"\nsocket = \"agent.sock\"\nstate_dir = \"state\"\n[[cloud]]\naddress = \"{addr}\"\nserver_name = \"localhost\"\n"),
    )
    .unwrap();
    let out = common::enroll_command(&cfg, &addr, &singles[0], &fingerprint)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("the token was revoked"),
        "{}",
        stderr(&out)
    );

    let listed = wait_for("the three boards to report", WAIT, || {
        let list = agents(&dcfg, None)?;
        ["farm-1", "farm-2", "farm-3"]
            .iter()
            .all(|id| {
                find(&list, id).is_some_and(|a| a["connections"] == 1 && a["version"].is_string())
            })
            .then_some(list)
    });
    for id in ["farm-1", "farm-2", "farm-3"] {
        let a = find(&listed, id).unwrap();
        assert!(
            a["cert_not_after_unix_ms"].as_u64().unwrap() > now_ms(),
            "{a}"
        );
        assert_eq!(a["policy"]["source"], "default", "{a}");
    }
}

fn sha(text: &str) -> String {
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

/// `updraftd policy status --json`.
fn push_status(cfg: &Path) -> serde_json::Value {
    let out = updraftd(&[
        "policy",
        "status",
        "--json",
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_pushed_policy_reaches_every_board_and_a_canary_that_falls_back_stops_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_daemon, addr, dcfg, _) = fleet_daemon(d);
    let c = dcfg.to_str().unwrap();
    let local = "default = \"local\"\n";
    let (cfg1, sock1) = board(d, "p-1", &addr, Some(local));
    let (cfg2, _) = board(d, "p-2", &addr, Some(local));
    let (cfg3, _) = board_with(
        d,
        "p-3",
        &addr,
        Some(local),
        "[policy]\nfile = \"policy.toml\"\naccept_push = false\n",
    );
    let (cfg4, _) = board(d, "p-4", &addr, None);
    let mut procs = vec![serve_agent(&cfg1), serve_agent(&cfg2), serve_agent(&cfg3)];
    wait_for("three boards to report", WAIT, || {
        let list = agents(&dcfg, None)?;
        ["p-1", "p-2", "p-3"]
            .iter()
            .all(|id| {
                find(&list, id).is_some_and(|a| a["version"].is_string() && a["connections"] == 1)
            })
            .then_some(())
    });

    // A broken file is refused before anything is sent, with file:line:col.
    let broken = d.join("broken.toml");
    std::fs::write(&broken, "default = \"lcoal\"\n").unwrap();
    let out = updraftd(&["policy", "push", broken.to_str().unwrap(), "--config", c]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("broken.toml:1:11"),
        "{}",
        stderr(&out)
    );

    // Pushed to every board: two apply it, one declines, the one offline gets it later.
    let policy_a = "default = \"local\"\n[[rule]]\nname = \"big inputs\"\nplace = \"cloud\"\nwhen = { input_bytes = { above = 1000000 } }\n";
    let file_a = d.join("policy-a.toml");
    std::fs::write(&file_a, policy_a).unwrap();
    let out = updraftd(&["policy", "push", file_a.to_str().unwrap(), "--config", c]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("push of"),
        "{out:?}"
    );
    wait_for(
        "p-1 and p-2 to run the pushed policy, p-3 to decline it",
        WAIT,
        || {
            let list = agents(&dcfg, None)?;
            let runs = |id: &str| {
                find(&list, id).is_some_and(|a| {
                    a["policy"]["hash"] == sha(policy_a) && a["policy"]["source"] == "pushed"
                })
            };
            let declined = find(&list, "p-3")?["push"]["result"] == "declined";
            (runs("p-1") && runs("p-2") && declined).then_some(())
        },
    );
    let p3 = agents(&dcfg, Some("p-3")).unwrap();
    assert_eq!(p3["policy"]["hash"], sha(local), "p-3 keeps its own: {p3}");
    assert!(d.join("p-1/state/policy.pushed.toml").is_file());
    procs.push(serve_agent(&cfg4));
    wait_for(
        "p-4, offline at the push, to get it when it connects",
        WAIT,
        || (agents(&dcfg, Some("p-4"))?["policy"]["hash"] == sha(policy_a)).then_some(()),
    );
    let status = push_status(&dcfg);
    assert_eq!(status["push"]["phase"], "all", "{status}");
    let text = String::from_utf8(updraftd(&["policy", "status", "--config", c]).stdout).unwrap();
    assert!(text.contains("3 of 4 boards in scope run it"), "{text}");
    assert!(
        text.contains("p-3  declined: this agent does not apply pushed policies"),
        "{text}"
    );

    // The board's own tasks before the next push: all on the board, none fell back.
    for _ in 0..3 {
        let r = http(&sock1, "POST", "/v1/tasks/board_only", b"x").unwrap();
        assert_eq!(r.status, 200);
    }
    wait_for("p-1's three local runs to be reported", WAIT, || {
        (agents(&dcfg, Some("p-1"))?["mix"]["local"].as_u64()? >= 3).then_some(())
    });

    // A canary push that sends p-1's tasks to a daemon that lacks them: they fall back,
    // and the rollout stops before p-2 gets it.
    let policy_b = "default = \"cloud\"\n";
    let file_b = d.join("policy-b.toml");
    std::fs::write(&file_b, policy_b).unwrap();
    let out = updraftd(&[
        "policy",
        "push",
        file_b.to_str().unwrap(),
        "--canary",
        "1",
        "--window",
        "20s",
        "--agents",
        "p-1,p-2",
        "--config",
        c,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let status = push_status(&dcfg);
    assert_eq!(
        status["push"]["canary"],
        serde_json::json!(["p-1"]),
        "{status}"
    );
    wait_for("the canary to apply it", WAIT, || {
        (agents(&dcfg, Some("p-1"))?["policy"]["hash"] == sha(policy_b)).then_some(())
    });
    for _ in 0..4 {
        let r = http(&sock1, "POST", "/v1/tasks/board_only", b"x").unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("updraft-placement"), Some("local"));
    }
    let status = wait_for("the rollout to stop", Duration::from_secs(60), || {
        let s = push_status(&dcfg);
        (s["push"]["phase"] == "stopped").then_some(s)
    });
    let why = status["push"]["stopped"].as_str().unwrap();
    assert!(
        why.contains("canary `p-1`") && why.contains("fell back"),
        "{why}"
    );
    let p2 = agents(&dcfg, Some("p-2")).unwrap();
    assert_eq!(
        p2["policy"]["hash"],
        sha(policy_a),
        "p-2 never got it: {p2}"
    );
}

#[test]
fn ca_show_gives_the_fingerprint_boards_pin_and_the_names_they_may_dial() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = updraftd(&[
        "ca",
        "init",
        "--dir",
        d.join("pki").to_str().unwrap(),
        "--name",
        "localhost",
        "10.0.0.9",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let fingerprint = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let cfg = write_daemon_config(d);
    let out = updraftd(&["ca", "show", "--config", cfg.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let shown = String::from_utf8(out.stdout).unwrap();
    assert!(shown.contains(&format!("sha256 {fingerprint}")), "{shown}");
    assert!(shown.contains("names localhost, 10.0.0.9"), "{shown}");
    assert_eq!(shown.matches("valid until 20").count(), 2, "{shown}");

    // A server certificate with new names, from the same CA: boards keep trusting it.
    let out = updraftd(&[
        "cert",
        "server",
        "--ca-dir",
        d.join("pki").to_str().unwrap(),
        "--name",
        "localhost",
        "10.0.0.10",
        "--out",
        d.join("reissue").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    for f in ["server.pem", "server.key"] {
        std::fs::copy(d.join("reissue").join(f), d.join("pki").join(f)).unwrap();
    }
    let out = updraftd(&["ca", "show", "--config", cfg.to_str().unwrap()]);
    let shown = String::from_utf8(out.stdout).unwrap();
    assert!(shown.contains(&format!("sha256 {fingerprint}")), "{shown}");
    assert!(shown.contains("names localhost, 10.0.0.10"), "{shown}");
    let (_daemon, addr) = serve_daemon(&cfg, "the daemon with the new certificate");
    let (acfg, socket) = board(d, "b-1", &addr, None);
    let _agent = serve_agent(&acfg);
    wait_for(
        "the board to connect to the reissued certificate",
        WAIT,
        || (status(&socket)?["clouds"][0]["connected"] == true).then_some(()),
    );
}

fn doctor(cfg: &Path) -> (bool, String) {
    let out = Command::new(bin("updraft-agent"))
        .args(["doctor", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8(out.stdout).unwrap())
}

#[test]
fn doctor_flags_a_rule_that_matches_no_task_and_an_expired_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_daemon, addr, _, _) = fleet_daemon(d);

    // A healthy board but for one rule, whose match names a task the catalog lacks.
    let policy = "[[rule]]\nname = \"typo\"\nmatch = { names = [\"shaa\"] }\nplace = \"cloud\"\n[[rule]]\nname = \"hashes\"\nmatch = { names = [\"sha\"] }\nplace = \"cloud\"\n";
    let (cfg, socket) = board(d, "doc-1", &addr, Some(policy));
    // First with the agent stopped: doctor dials the daemon itself.
    let (ok, said) = doctor(&cfg);
    assert!(!ok, "{said}");
    let fail: Vec<&str> = said.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert_eq!(fail.len(), 1, "{said}");
    assert!(fail[0].contains("rule \"typo\" matches no task"), "{said}");
    assert!(
        said.lines().any(|l| l.starts_with("ok")
            && l.contains("certificate")
            && l.contains("expires in 36")),
        "{said}"
    );
    assert!(
        said.lines().any(|l| l.starts_with("ok")
            && l.contains(&format!("daemon {addr}: reachable"))
            && l.contains("echo")),
        "{said}"
    );
    assert!(
        said.lines()
            .any(|l| l.starts_with("ok") && l.contains("its clock is")),
        "{said}"
    );
    assert!(
        said.lines()
            .any(|l| l.starts_with("warn") && l.contains("does not offer board_only")),
        "{said}"
    );
    assert!(
        said.lines()
            .any(|l| l.starts_with("ok") && l.contains("journal")),
        "{said}"
    );
    assert!(
        said.lines()
            .any(|l| l.starts_with("ok") && l.contains("MiB free")),
        "{said}"
    );
    // Then with the agent running: the daemon lines come from its live connection.
    let _agent = serve_agent(&cfg);
    wait_for("the board to connect", WAIT, || {
        (status(&socket)?["daemons"][&addr]["tasks"].is_array()).then_some(())
    });
    let (_, said) = doctor(&cfg);
    assert!(
        said.lines()
            .any(|l| l.starts_with("ok") && l.contains(&format!("daemon {addr}: reachable"))),
        "{said}"
    );

    // A board whose certificate ran out.
    let home = d.join("old-1");
    let out = updraftd(&[
        "cert",
        "issue",
        "--agent-id",
        "old-1",
        "--valid-for",
        "2s",
        "--out",
        home.join("tls").to_str().unwrap(),
        "--ca-dir",
        d.join("pki").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let cfg = home.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "socket = \"agent.sock\"\nstate_dir = \"state\"\n[[cloud]]\naddress = \"{addr}\"\nserver_name = \"localhost\"\n[tls]\nca = \"{}\"\ncert = \"tls/agent.pem\"\nkey = \"tls/agent.key\"\n",
            d.join("pki/ca.pem").display()
        ),
    )
    .unwrap();
    // X.509 times are whole seconds and "not after" includes its second: the daemon
    // may take the certificate for up to a second after doctor calls it expired.
    let refused = |said: &str| {
        said.lines()
            .any(|l| l.starts_with("FAIL") && l.contains(&format!("daemon {addr}")))
    };
    let said = wait_for(
        "doctor to see the certificate expired and refused",
        WAIT,
        || {
            let (ok, said) = doctor(&cfg);
            (!ok && said.contains("has EXPIRED") && refused(&said)).then_some(said)
        },
    );
    assert!(
        said.lines().any(|l| l.starts_with("FAIL")
            && l.contains("certificate")
            && l.contains("enroll again")),
        "{said}"
    );
    assert!(
        said.lines()
            .any(|l| l.starts_with("FAIL") && l.contains(&format!("daemon {addr}"))),
        "{said}"
    );
}
