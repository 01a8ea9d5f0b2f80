//! End-to-end tests of a real `updraftd` and a real `updraft-agent`, as processes,
//! talking QUIC with mutual TLS on loopback.

mod common;

use common::*;
use std::time::Duration;

#[test]
fn sha256_matches_the_command_run_directly_both_ways_and_memory_stays_flat() {
    let c = Cluster::start();
    let dir = c.dir.path();
    let sizes: [(usize, &str); 3] = [(0, "empty"), (1, "one"), (64 << 20, "big")];
    for (len, name) in sizes {
        std::fs::write(dir.join(name), noise(len, len as u64 + 7)).unwrap();
    }
    // Warm both processes up with a 1 MiB task each way, so buffers that live for the
    // whole process are counted in the baseline.
    std::fs::write(dir.join("warm"), noise(1 << 20, 1)).unwrap();
    for side in ["cloud", "local"] {
        let o = c.run(
            &[
                "sha",
                "--where",
                side,
                "--input",
                dir.join("warm").to_str().unwrap(),
            ],
            None,
        );
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let (agent_rss, daemon_rss) = (c.agent.rss(), c.daemon.rss());

    for (_, name) in sizes {
        let input = dir.join(name);
        let want = sha256sum_direct(&input);
        for side in ["cloud", "local"] {
            c.sha_checked(side, &input, &dir.join(format!("{name}.{side}.out")), &want);
        }
        // Through stdin and stdout as well (unknown length, streamed).
        if name != "big" {
            let o = c.run(
                &["sha", "--where", "cloud", "--input", "-"],
                Some(&std::fs::read(&input).unwrap()),
            );
            assert_eq!(o.stdout, want, "{name} via stdin");
        }
    }
    let grew = |before: u64, after: u64| after.saturating_sub(before);
    let (agent_growth, daemon_growth) = (
        grew(agent_rss, c.agent.rss()),
        grew(daemon_rss, c.daemon.rss()),
    );
    assert!(
        agent_growth <= 16 << 20,
        "agent RSS grew by {agent_growth} bytes moving 64 MiB"
    );
    assert!(
        daemon_growth <= 16 << 20,
        "daemon RSS grew by {daemon_growth} bytes moving 64 MiB"
    );
}

#[test]
fn local_api_with_a_plain_http_client() {
    let c = Cluster::start();
    let input = noise(100_000, 3);
    let path = c.dir.path().join("in");
    std::fs::write(&path, &input).unwrap();
    let want = sha256sum_direct(&path);
    for side in ["cloud", "local"] {
        let r = http(
            &c.socket,
            "POST",
            &format!("/v1/tasks/sha?where={side}"),
            &input,
        )
        .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, want);
        assert_eq!(r.header("updraft-placement"), Some(side));
        assert_eq!(r.header("updraft-exit-code"), Some("0"));
        assert!(r
            .header("updraft-reason")
            .unwrap()
            .contains(&format!("where={side}")));
        assert_eq!(r.header("updraft-task-id").unwrap().len(), 32);
    }
    // Auto placement picks a side and says why, naming the side it picked (a task never
    // measured runs where a typical task would finish first: either side can be right).
    let r = http(&c.socket, "POST", "/v1/tasks/echo", b"hi").unwrap();
    assert_eq!((r.status, r.body.as_slice()), (200, &b"hi"[..]));
    let placement = r.header("updraft-placement").unwrap().to_string();
    assert!(
        ["local", "cloud"].contains(&placement.as_str()),
        "{placement}"
    );
    let reason = r.header("updraft-reason").unwrap();
    assert!(
        reason.starts_with(&format!("auto: {placement}")),
        "{reason}"
    );
    // Errors are JSON with a code.
    let r = http(&c.socket, "POST", "/v1/tasks/nope", b"").unwrap();
    assert_eq!(r.status, 404);
    let e: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(e["code"], "unknown_task");
    assert!(e["error"].as_str().unwrap().contains("nope"));
    let r = http(&c.socket, "POST", "/v1/tasks/echo?where=mars", b"").unwrap();
    assert_eq!(r.status, 400);
    // Status and metrics answer.
    let s = c.status().unwrap();
    assert_eq!(s["agent_id"], "board-1");
    assert!(s["recent"].as_array().unwrap().len() >= 3);
    let m = http(&c.socket, "GET", "/metrics", b"").unwrap();
    let text = String::from_utf8(m.body).unwrap();
    assert!(
        text.contains(&format!(
            "updraft_agent_tasks_total{{placement=\"{placement}\",task=\"echo\",outcome=\"ok\"}}"
        )),
        "{text}"
    );
}

#[test]
fn exit_code_and_stderr_tail_travel_back() {
    let c = Cluster::start();
    for side in ["cloud", "local"] {
        let o = c.run(&["fail", "--where", side], None);
        assert_eq!(o.status.code(), Some(7), "{side}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("boom on stderr"),
            "{side}: {}",
            stderr(&o)
        );
        let r = http(
            &c.socket,
            "POST",
            &format!("/v1/tasks/fail?where={side}"),
            b"",
        )
        .unwrap();
        assert_eq!(r.header("updraft-exit-code"), Some("7"));
        assert!(r
            .header("updraft-stderr-tail")
            .unwrap()
            .contains("boom on stderr"));
    }
}

#[test]
fn timeout_kills_the_task_and_its_children() {
    let c = Cluster::start();
    for side in ["cloud", "local"] {
        let o = c.run(&["hang", "--where", side], None);
        assert_eq!(o.status.code(), Some(124), "{side}: {}", stderr(&o));
        assert!(stderr(&o).contains("timed out"), "{side}: {}", stderr(&o));
        // killpg is immediate; reaping by init may take a moment.
        wait_for(
            "no `sleep 1234.5` left behind",
            Duration::from_secs(10),
            || processes_with("sleep 1234.5").is_empty().then_some(()),
        );
        assert!(processes_with("sleep 1234.6").is_empty());
    }
}

/// A cluster whose policy sends tasks to the cloud without forcing them there, so that a
/// cloud that fails or refuses falls back to the board. (`auto` would run a task it never
/// measured wherever a typical task finishes first, which may be the board from the start.)
fn preferring_cloud() -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.toml"), "default = \"cloud\"\n").unwrap();
    Cluster::start_in(dir, "", "[link]\naccept_timeout = \"1s\"\n")
}

#[test]
fn catalog_refusals_are_clear_and_do_not_hurt_the_connection() {
    let c = preferring_cloud();
    // Not in allowed_agents.
    let o = c.run(&["restricted", "--where", "cloud"], None);
    assert_eq!(o.status.code(), Some(69));
    assert!(
        stderr(&o).contains("not allowed") && stderr(&o).contains("board-1"),
        "{}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("not_allowed"), "{}", stderr(&o));
    // Unknown to the daemon.
    let o = c.run(&["ghost", "--where", "cloud"], None);
    assert_eq!(o.status.code(), Some(69));
    assert!(
        stderr(&o).contains("unknown task") && stderr(&o).contains("unknown_task"),
        "{}",
        stderr(&o)
    );
    // Placed by the policy, not forced, the agent runs it on the board instead, and says so.
    let o = c.run(&["ghost", "--explain"], Some(b"boo"));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(o.stdout, b"");
    assert!(
        stderr(&o).starts_with("local (daemon ")
            && stderr(&o).contains("refused the task (unknown_task"),
        "{}",
        stderr(&o)
    );
    // Input over the daemon's max_input, declared up front (file) and streamed (stdin).
    let big = c.dir.path().join("big");
    std::fs::write(&big, noise(10 << 20, 5)).unwrap();
    let o = c.run(
        &[
            "small",
            "--where",
            "cloud",
            "--input",
            big.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(69), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("max_input") && stderr(&o).contains("too_large"),
        "{}",
        stderr(&o)
    );
    let o = c.run(
        &["small", "--where", "cloud", "--input", "-"],
        Some(&noise(4 << 20, 6)),
    );
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("too_large"), "{}", stderr(&o));
    // The same connection still works.
    let o = c.run(
        &["echo", "--where", "cloud", "--input", "-"],
        Some(b"still here"),
    );
    assert_eq!(o.stdout, b"still here", "{}", stderr(&o));
    assert_eq!(c.status().unwrap()["clouds"][0]["connected"], true);
}

#[test]
fn sigterm_drains_the_daemon_running_task_delivered_new_task_on_the_board() {
    let mut c = Cluster::start();
    let socket = c.socket.clone();
    let slow = std::thread::spawn(move || {
        http(&socket, "POST", "/v1/tasks/slow?where=cloud", b"").unwrap()
    });
    wait_for(
        "the slow task to run on the daemon",
        Duration::from_secs(10),
        || {
            let s = c.status().ok()?;
            (s["clouds"][0]["load"]["running"].as_u64()? >= 1).then_some(())
        },
    );
    c.daemon.signal(nix::sys::signal::Signal::SIGTERM);
    wait_for(
        "the agent to see the drain",
        Duration::from_secs(10),
        || {
            let s = c.status().ok()?;
            (s["clouds"][0]["draining"] == true || s["clouds"][0]["connected"] == false)
                .then_some(())
        },
    );
    let after = http(&c.socket, "POST", "/v1/tasks/echo", b"after").unwrap();
    assert_eq!(after.status, 200);
    assert_eq!(after.body, b"after");
    assert_eq!(
        after.header("updraft-placement"),
        Some("local"),
        "{:?}",
        after.header("updraft-reason")
    );
    let slow = slow.join().unwrap();
    assert_eq!(slow.status, 200, "{}", String::from_utf8_lossy(&slow.body));
    assert_eq!(slow.header("updraft-placement"), Some("cloud"));
    assert_eq!(slow.header("updraft-exit-code"), Some("0"));
    let status = c.daemon.wait_exit(Duration::from_secs(20));
    assert!(
        status.success(),
        "daemon exit: {status:?}\n{}",
        c.daemon.log()
    );
}

#[test]
fn sigkill_of_the_daemon_before_a_task_runs_it_on_the_board_and_says_so() {
    let mut c = preferring_cloud();
    c.daemon.signal(nix::sys::signal::Signal::SIGKILL);
    c.daemon.wait_exit(Duration::from_secs(10));
    let r = http(&c.socket, "POST", "/v1/tasks/echo", b"x").unwrap();
    assert_eq!((r.status, r.body.as_slice()), (200, &b"x"[..]));
    assert_eq!(r.header("updraft-placement"), Some("local"));
    let reason = r.header("updraft-reason").unwrap();
    // Either the agent saw the daemon gone, or it sent the task and got no answer
    // (the daemon silent since), then ran it on the board.
    assert!(
        reason.contains("cloud failed before the task started")
            || reason.contains("no daemon")
            || reason.contains("may still run it"),
        "{reason}"
    );
    assert!(
        reason.contains(&c.daemon_addr) || reason.contains("no daemon"),
        "{reason}"
    );
    // Forced cloud fails clearly instead: either no daemon was usable, or the task was
    // sent to the dead daemon, went unanswered, and no daemon was left to retry on.
    let o = c.run(&["echo", "--where", "cloud"], None);
    assert_eq!(o.status.code(), Some(69));
    let e = stderr(&o);
    assert!(
        e.contains("[cloud_unavailable]")
            || (e.contains("[cloud_failed]") && e.contains("silent since the last attempt")),
        "{e}"
    );
    assert!(e.contains(&c.daemon_addr), "{e}");
}

#[test]
fn check_config_names_the_misspelled_key_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("daemon.toml");
    std::fs::write(
        &cfg,
        "listen = \"127.0.0.1:4433\"\n[tasks.echo]\nbuiltin = \"echo\"\ntimeuot = \"5s\"\n",
    )
    .unwrap();
    let o = updraftd(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("timeuot") && e.contains(cfg.to_str().unwrap()),
        "{e}"
    );
    assert_eq!(e.trim().lines().count(), 1, "one line: {e}");
    // check-config loads the TLS files as serve does: they must exist.
    common::make_pki(dir.path());
    std::fs::write(
        &cfg,
        "listen = \"127.0.0.1:4433\"\n[tls]\nca = \"pki/ca.pem\"\ncert = \"pki/server.pem\"\nkey = \"pki/server.key\"\n[tasks.echo]\nbuiltin = \"echo\"\n",
    )
    .unwrap();
    let o = updraftd(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
}
