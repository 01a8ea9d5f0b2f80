//! `systemctl reload updraftd` sends SIGHUP: the real daemon reloads its catalog and
//! TLS files and keeps serving; a config that does not load is refused (logged with
//! file and key) and the previous one kept.

mod common;

use common::{make_pki, stderr, Cluster};
use nix::sys::signal::Signal;
use std::time::Duration;

/// Sends SIGHUP and waits for the `n`th reload log line containing `marker`.
fn hangup(c: &Cluster, marker: &str, n: usize) -> String {
    c.daemon.signal(Signal::SIGHUP);
    common::wait_for(
        &format!("reload #{n} logged with `{marker}`"),
        Duration::from_secs(20),
        || {
            let log = c.daemon.log();
            let lines: Vec<&str> = log.lines().filter(|l| l.contains(marker)).collect();
            (lines.len() >= n).then(|| lines[n - 1].to_string())
        },
    )
}

fn ghost_in_cloud(c: &Cluster) -> std::process::Output {
    c.run(&["ghost", "--where", "cloud", "--input", "-"], Some(b"boo"))
}

#[test]
fn sighup_reloads_the_catalog_and_refuses_a_broken_config() {
    let mut c = Cluster::start();
    let cfg = c.dir.path().join("daemon.toml");
    let good = std::fs::read_to_string(&cfg).unwrap();

    // Not in the daemon's catalog yet.
    let o = ghost_in_cloud(&c);
    assert_eq!(o.status.code(), Some(69), "{}", stderr(&o));
    assert!(stderr(&o).contains("unknown_task"), "{}", stderr(&o));

    // Added to the file: SIGHUP applies it, and the daemon is still there.
    let with_ghost = format!("{good}\n[tasks.ghost]\nbuiltin = \"echo\"\n");
    std::fs::write(&cfg, &with_ghost).unwrap();
    let line = hangup(&c, "configuration reloaded", 1);
    assert!(line.contains("tasks added: ghost"), "{line}");
    assert!(c.daemon.child.try_wait().unwrap().is_none(), "daemon died");
    let o = ghost_in_cloud(&c);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(o.stdout, b"boo");

    // A broken catalog: refused with file and key, the previous catalog kept.
    std::fs::write(
        &cfg,
        format!("{with_ghost}\n[tasks.bad]\nbuiltin = \"nope\"\n"),
    )
    .unwrap();
    let line = hangup(&c, "reload refused", 1);
    assert!(
        line.contains(cfg.to_str().unwrap()) && line.contains("tasks.bad"),
        "{line}"
    );
    let o = ghost_in_cloud(&c);
    assert!(o.status.success(), "{}", stderr(&o));

    // A key that does not belong to the certificate: refused, naming the key file.
    make_pki(&c.dir.path().join("other"));
    std::fs::write(
        &cfg,
        with_ghost.replace("pki/server.key", "other/pki/server.key"),
    )
    .unwrap();
    let line = hangup(&c, "reload refused", 2);
    assert!(
        line.contains("tls.key") && line.contains("does not belong to"),
        "{line}"
    );

    // A key that needs a restart is named as such; the catalog still applies.
    std::fs::write(
        &cfg,
        good.replace(
            "load_report_interval = \"100ms\"",
            "load_report_interval = \"200ms\"",
        ),
    )
    .unwrap();
    let line = hangup(&c, "configuration reloaded", 2);
    assert!(line.contains("tasks removed: ghost"), "{line}");
    common::wait_for("the restart note", Duration::from_secs(10), || {
        c.daemon
            .log()
            .lines()
            .any(|l| l.contains("load_report_interval changed but applies only after a restart"))
            .then_some(())
    });
    let o = ghost_in_cloud(&c);
    assert_eq!(o.status.code(), Some(69), "{}", stderr(&o));

    // Still serving after four reloads; SIGTERM still drains and exits cleanly.
    let o = c.run(&["echo", "--where", "cloud", "--input", "-"], Some(b"hi"));
    assert!(o.status.success(), "{}", stderr(&o));
    c.daemon.signal(Signal::SIGTERM);
    let status = c.daemon.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
}

#[test]
fn sighup_swaps_the_tls_files_for_new_connections() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let old_fp = common::ca_init(dir, "pki");
    let new_fp = common::ca_init(dir, "newpki");
    let (daemon, addr) = common::start_daemon(dir, "");
    let cfg = dir.join("daemon.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("\"pki/", "\"newpki/")).unwrap();
    daemon.signal(Signal::SIGHUP);
    let line = common::wait_for("the reload", Duration::from_secs(20), || {
        daemon
            .log()
            .lines()
            .find(|l| l.contains("configuration reloaded"))
            .map(str::to_string)
    });
    assert!(
        line.contains("server certificate") && line.contains("CA agents are verified against"),
        "{line}"
    );
    // A new connection meets the new certificate and CA: enrollment pinned to the new
    // CA works (signed by the new CA key), pinned to the old one it is refused.
    let agent_cfg = dir.join("agent.toml");
    std::fs::write(
        &agent_cfg,
        format!("agent_id = \"board-5\"\nsocket = \"agent.sock\"\nstate_dir = \"astate\"\n[[cloud]]\naddress = \"{addr}\"\nserver_name = \"localhost\"\n"),
    )
    .unwrap();
    let token = common::updraftd(&["token", "create", "--config", cfg.to_str().unwrap()]);
    assert!(token.status.success(), "{}", stderr(&token));
    let token = String::from_utf8(token.stdout).unwrap().trim().to_string();
    let enroll = |fp: &str| {
        std::process::Command::new(common::bin("updraft-agent"))
            .args(["--config", agent_cfg.to_str().unwrap(), "enroll"])
            .args(["--server", &addr, "--token", &token, "--ca-sha256", fp])
            .output()
            .unwrap()
    };
    let o = enroll(&old_fp);
    assert!(
        stderr(&o).contains("not the one you meant"),
        "{}",
        stderr(&o)
    );
    let o = enroll(&new_fp);
    assert!(o.status.success(), "{}", stderr(&o));
}
