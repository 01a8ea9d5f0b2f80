//! Placement end to end: policy rules on live signals (a fake power_supply tree in the
//! kernel's layout), policy reloads without a restart, and estimates that survive an
//! agent restart. Real `updraftd` and `updraft-agent` processes.

mod common;

use common::*;
use std::path::Path;
use std::time::Duration;

/// Writes a battery and an AC adapter the way the kernel lays them out.
fn power(root: &Path, capacity: u8, status: &str, ac_online: bool) {
    let bat = root.join("BAT0");
    std::fs::create_dir_all(&bat).unwrap();
    std::fs::write(bat.join("type"), "Battery\n").unwrap();
    std::fs::write(bat.join("present"), "1\n").unwrap();
    std::fs::write(bat.join("capacity"), format!("{capacity}\n")).unwrap();
    std::fs::write(bat.join("status"), format!("{status}\n")).unwrap();
    let ac = root.join("AC");
    std::fs::create_dir_all(&ac).unwrap();
    std::fs::write(ac.join("type"), "Mains\n").unwrap();
    std::fs::write(ac.join("online"), if ac_online { "1\n" } else { "0\n" }).unwrap();
}

const SIGNALS: &str = "[signals]\npower_supply_root = \"power\"\nsample_interval = \"100ms\"\n";

fn explain_line(c: &Cluster, task: &str) -> String {
    let o = c.run(&[task, "--explain"], None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stderr)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn battery_rule_sends_work_to_the_cloud_and_charging_brings_it_back() {
    let dir = tempfile::tempdir().unwrap();
    power(&dir.path().join("power"), 22, "Discharging", false);
    std::fs::write(
        dir.path().join("policy.toml"),
        r#"
default = "local"

[[rule]]
name  = "save battery"
when  = { battery_percent = { below = 30 }, charging = false }
place = "cloud"

[[rule]]
name  = "on mains"
when  = { on_battery = false }
place = "local"
"#,
    )
    .unwrap();
    let c = Cluster::start_in(dir, "", SIGNALS);
    let line = explain_line(&c, "echo");
    assert!(
        line.starts_with(r#"cloud (rule "save battery": battery 22% < 30%, discharging"#),
        "{line}"
    );
    // The board is plugged in and charges: the next task follows the next rule.
    power(&c.dir.path().join("power"), 23, "Charging", true);
    wait_for(
        "the agent to see the charger",
        Duration::from_secs(10),
        || (c.status().ok()?["signals"]["charging"] == true).then_some(()),
    );
    let line = explain_line(&c, "echo");
    assert!(line.starts_with(r#"local (rule "on mains""#), "{line}");
    // Unplugged at a healthy charge: no rule matches, the default decides.
    power(&c.dir.path().join("power"), 90, "Discharging", false);
    wait_for(
        "the agent to see the battery at 90%",
        Duration::from_secs(10),
        || (c.status().ok()?["signals"]["battery_percent"] == 90.0).then_some(()),
    );
    let line = explain_line(&c, "echo");
    assert!(
        line.starts_with("local (no rule matched; default local"),
        "{line}"
    );
    // Decisions are counted by reason kind.
    let m = http(&c.socket, "GET", "/metrics", b"").unwrap();
    let text = String::from_utf8(m.body).unwrap();
    assert!(
        text.contains(r#"updraft_agent_decisions_total{placement="cloud",reason="rule"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"updraft_agent_decisions_total{placement="local",reason="default"} 1"#),
        "{text}"
    );
}

#[test]
fn a_board_without_a_battery_never_matches_battery_rules() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("policy.toml"),
        "default = \"local\"\n[[rule]]\nname = \"save battery\"\nwhen = { battery_percent = { below = 30 } }\nplace = \"cloud\"\n",
    )
    .unwrap();
    // `power` does not exist: no power_supply entries at all.
    let c = Cluster::start_in(dir, "", SIGNALS);
    assert!(c.status().unwrap()["signals"]["battery_percent"].is_null());
    let line = explain_line(&c, "echo");
    assert!(
        line.starts_with("local (no rule matched; default local"),
        "{line}"
    );
}

#[test]
fn editing_the_policy_file_changes_placement_and_a_broken_edit_keeps_the_old_policy() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, "default = \"local\"\n").unwrap();
    let c = Cluster::start_in(dir, "", SIGNALS);
    assert_eq!(c.explain("echo")["placement"], "local");

    // An edit in place takes effect without a restart.
    std::fs::write(&policy, "default = \"cloud\"\n").unwrap();
    wait_for(
        "the edited policy to take effect",
        Duration::from_secs(10),
        || (c.explain("echo")["placement"] == "cloud").then_some(()),
    );

    // A broken edit is refused: the old policy stays, status shows file:line:column.
    std::fs::write(
        &policy,
        "default = \"cloud\"\n\n[[rule]]\nname = \"x\"\nplace = \"moon\"\n",
    )
    .unwrap();
    let error = wait_for(
        "status to show the policy error",
        Duration::from_secs(10),
        || {
            c.status().ok()?["policy"]["error"]
                .as_str()
                .map(str::to_string)
        },
    );
    assert!(
        error.contains("policy.toml:5:9") && error.contains("moon"),
        "{error}"
    );
    assert_eq!(
        c.explain("echo")["placement"],
        "cloud",
        "the old policy stays in force"
    );
    // The text status says it too, not only --json.
    let o = std::process::Command::new(bin("updraft-agent"))
        .arg("--socket")
        .arg(&c.socket)
        .arg("status")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("reload refused") && text.contains("policy.toml:5:9"),
        "text status shows the refused policy:\n{text}"
    );
    let o = std::process::Command::new(bin("updraft-agent"))
        .args(["policy", "check", policy.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&o.stderr).contains("policy.toml:5:9"));

    // A file replaced by rename (as editors do), then SIGHUP: a rule now decides.
    let fresh = c.dir.path().join("policy.new");
    std::fs::write(
        &fresh,
        "default = \"cloud\"\n[[rule]]\nname = \"echo stays\"\nmatch = { names = [\"echo\"] }\nplace = \"local\"\n",
    )
    .unwrap();
    std::fs::rename(&fresh, &policy).unwrap();
    c.agent.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for(
        "the replaced policy to take effect",
        Duration::from_secs(10),
        || (c.explain("echo")["reason"].as_str()?.contains("echo stays")).then_some(()),
    );
    let s = c.status().unwrap();
    assert!(s["policy"]["error"].is_null(), "{}", s["policy"]);
    assert_eq!(s["policy"]["rules"], 1);
}

#[test]
fn estimates_survive_an_agent_restart() {
    let mut c = Cluster::start_with("", "[link]\naccept_timeout = \"1s\"\n");
    for _ in 0..3 {
        let o = c.run(&["sha", "--input", "-"], Some(&noise(10_000, 9)));
        assert!(o.status.success());
    }
    c.agent.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(c.agent.wait_exit(Duration::from_secs(20)).success());
    let saved = std::fs::read(c.dir.path().join("astate/estimates.json"))
        .expect("estimates saved at shutdown");
    let saved: serde_json::Value = serde_json::from_slice(&saved).expect("estimates are JSON");
    assert!(saved.to_string().contains("\"sha\""), "{saved}");

    let (agent, _) = start_agent(
        c.dir.path(),
        &c.daemon_addr,
        "[link]\naccept_timeout = \"1s\"\n",
    );
    c.agent = agent;
    c.wait_connected();
    assert!(c.status().unwrap()["estimates"]["tasks"].as_u64().unwrap() >= 1);
}

/// The link is measured from real transfers only: before any data has crossed, `status`
/// says so (no figure from the idle connection); cloud runs that move data give each
/// daemon a rate with its uncertainty, age and samples; the model's own estimate is
/// saved with its age and restored.
#[test]
fn link_estimates_come_from_transfers_and_are_saved_with_their_age() {
    let agent_extra = "[link]\naccept_timeout = \"1s\"\nprobe = false\n";
    let mut c = Cluster::start_with("", agent_extra);
    let status = c.status().unwrap();
    let links = &status["estimates"]["links"];
    let cold = links
        .as_object()
        .map(|m| {
            m.values()
                .all(|l| l["up"] == "unmeasured" && l["down"] == "unmeasured")
        })
        .unwrap_or(true);
    assert!(cold, "nothing has crossed yet: {status:#}");
    assert!(status["signals"]["bandwidth_mbps"].is_null(), "{status:#}");

    let input = noise(1 << 20, 3);
    for _ in 0..2 {
        let o = c.run(&["sha", "--where", "cloud", "--input", "-"], Some(&input));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let status = c.status().unwrap();
    let (_, link) = status["estimates"]["links"]
        .as_object()
        .and_then(|m| m.iter().next())
        .unwrap_or_else(|| panic!("a link estimate: {status:#}"));
    let up = &link["up"];
    assert_eq!(up["samples"].as_u64(), Some(2), "{status:#}");
    assert!(up["mbps"].as_f64().unwrap() > 0.0, "{status:#}");
    assert!(up["uncertainty_pct"].as_f64().unwrap() > 0.0, "{status:#}");
    assert!(up["age_s"].as_u64().is_some(), "{status:#}");
    assert_eq!(link["down"], "unmeasured", "32 bytes came down: {status:#}");
    assert!(status["signals"]["bandwidth_mbps"].as_f64().unwrap() > 0.0);

    c.agent.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(c.agent.wait_exit(Duration::from_secs(20)).success());
    let saved = std::fs::read(c.dir.path().join("astate/estimates.json")).unwrap();
    let saved: serde_json::Value = serde_json::from_slice(&saved).unwrap();
    assert!(saved["link"]["up"]["n"].as_u64().unwrap() >= 2, "{saved:#}");
    assert!(saved["link_age_secs"].is_array(), "{saved:#}");
    let (agent, _) = start_agent(c.dir.path(), &c.daemon_addr, agent_extra);
    c.agent = agent;
    c.wait_connected();
    let status = c.status().unwrap();
    assert!(
        status["estimates"]["observed_bandwidth_mbps"]
            .as_f64()
            .unwrap()
            > 0.0,
        "{status:#}"
    );
}
