//! The agent as built for a board (`scripts/cross.sh`, aarch64 or armv7), run under
//! qemu-user against the x86_64 `updraftd` of this build over QUIC with mutual TLS on
//! loopback: `sha256` of 0 B, 1 B and 8 MiB on the board and in the cloud, byte-identical
//! to `sha256sum`; a detached task that outlives `kill -9` of the agent; enrollment.
//!
//! Runs when `UPDRAFT_TEST_AGENT` names the ARM `updraft-agent` (`.ci/run` builds it for
//! both targets and runs this file once for each); the kernel starts it through qemu
//! (binfmt_misc, which `scripts/cross.sh` registers), and `QEMU_LD_PREFIX` finds its libc.
//! Without the variable the tests say so and pass, unless `UPDRAFT_CROSS_TEST=require`.

mod common;

use common::*;
use nix::sys::signal::Signal;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Everything runs under emulation: waits are generous, never a measure of speed.
const WAIT: Duration = Duration::from_secs(120);

/// The ARM agent under test, or `None` (after saying why) when none was given.
fn arm_agent() -> Option<&'static str> {
    let Ok(path) = std::env::var("UPDRAFT_TEST_AGENT") else {
        assert_ne!(
            std::env::var("UPDRAFT_CROSS_TEST").as_deref(),
            Ok("require"),
            "UPDRAFT_TEST_AGENT must name an ARM updraft-agent (scripts/cross.sh TRIPLE build -p updraft-agent)"
        );
        eprintln!("UPDRAFT_TEST_AGENT is not set: the ARM agent test is skipped");
        return None;
    };
    let machine = updraft::bench::footprint::elf_machine(Path::new(&path)).unwrap();
    assert!(
        machine == "aarch64" || machine == "arm",
        "{path} is built for {machine}, not for an ARM board"
    );
    eprintln!("testing the {machine} agent {path}");
    Some(machine)
}

#[test]
fn sha256_on_the_board_and_in_the_cloud_matches_sha256sum() {
    if arm_agent().is_none() {
        return;
    }
    let c = Cluster::start();
    let dir = c.dir.path();
    let status = wait_for("the agent's first signal readings", WAIT, || {
        let s = c.status().ok()?;
        s["signals"]["cpu_percent"].is_number().then_some(s)
    });
    assert!(
        status["signals"]["memory_available_mb"]
            .as_f64()
            .unwrap_or(0.0)
            > 0.0,
        "the ARM agent reads the machine's memory: {status}"
    );
    for (len, name) in [(0usize, "empty"), (1, "one"), (8 << 20, "eight-mib")] {
        let input = dir.join(name);
        std::fs::write(&input, noise(len, len as u64 + 3)).unwrap();
        let want = sha256sum_direct(&input);
        for side in ["local", "cloud"] {
            c.sha_checked(side, &input, &dir.join(format!("{name}.{side}")), &want);
        }
    }
}

#[test]
fn a_detached_task_outlives_kill_9_of_the_agent() {
    if arm_agent().is_none() {
        return;
    }
    let mut c = Cluster::start();
    let input = noise(1 << 20, 11);
    std::fs::write(c.dir.path().join("input"), &input).unwrap();
    let want = sha256sum_direct(&c.dir.path().join("input"));
    let r = http(&c.socket, "POST", "/v1/tasks/sha?detach=true", &input).unwrap();
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["id"].as_str().unwrap().to_string();
    c.agent.signal(Signal::SIGKILL);
    c.agent.wait_exit(WAIT);

    // The same config and state_dir: the journal on disk is all that carries the task.
    let (agent, socket) = start_agent(c.dir.path(), &c.daemon_addr, "");
    c.agent = agent;
    wait_for("the restarted agent to serve", WAIT, || {
        http(&socket, "GET", "/v1/status", b"").ok()
    });
    let r = http(&socket, "GET", &format!("/v1/tasks/{id}?wait=true"), b"").unwrap();
    assert_eq!(
        r.json()["state"],
        "done",
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let r = http(&socket, "GET", &format!("/v1/tasks/{id}/output"), b"").unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.body, want, "the resumed task's output");
}

#[test]
fn enroll_with_a_token_then_offload() {
    if arm_agent().is_none() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let fingerprint = ca_init(dir, "pki");
    let (_daemon, addr) = start_daemon(dir, "");
    let out = updraftd(&[
        "token",
        "create",
        "--config",
        dir.join("daemon.toml").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();

    let cfg = dir.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "agent_id = \"arm-board\"\nsocket = \"agent.sock\"\nstate_dir = \"astate\"\n[[cloud]]\naddress = \"{addr}\"\nserver_name = \"localhost\"\n{AGENT_TASKS}"
        ),
    )
    .unwrap();
    let port = addr.rsplit_once(':').unwrap().1;
    let o = Command::new(bin("updraft-agent"))
        .args(["--config", cfg.to_str().unwrap(), "enroll"])
        .args(["--server", &format!("localhost:{port}")])
        .args(["--token", &token, "--ca-sha256", &fingerprint])
        .output()
        .unwrap();
    assert!(o.status.success(), "enroll: {}", stderr(&o));
    for file in ["agent.key", "agent.pem", "ca.pem"] {
        assert!(
            dir.join("astate").join(file).exists(),
            "{file} after enroll"
        );
    }

    let mut cmd = Command::new(bin("updraft-agent"));
    cmd.args(["serve", "--config", cfg.to_str().unwrap()]);
    let _agent = Proc::spawn("updraft-agent", cmd);
    let socket = dir.join("agent.sock");
    wait_for("the enrolled agent to connect", WAIT, || {
        let r = http(&socket, "GET", "/v1/status", b"").ok()?;
        (r.json()["clouds"][0]["connected"] == true).then_some(())
    });
    let r = http(&socket, "POST", "/v1/tasks/echo?where=cloud", b"from arm").unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("updraft-placement"), Some("cloud"));
    assert_eq!(r.body, b"from arm");
}
