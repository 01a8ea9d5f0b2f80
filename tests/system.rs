//! The packages under a real systemd: a minimal Debian bookworm booted with
//! `systemd-nspawn` (systemd is PID 1 there, cgroup v2 as on a booted bookworm), both
//! `.deb`s built from this tree installed in it, README's "Install from .deb" walked as
//! written, and then each promise of the shipped units shown inside that systemd
//! (README, "systemd", "Shutdown" and "Task containment").
//!
//! Opt-in, because it needs root, `debootstrap` and `systemd-nspawn` (packages
//! `debootstrap` and `systemd-container`) and, the first time, a Debian mirror:
//! - `UPDRAFT_SYSTEM_TEST` unset: the test says so and passes;
//! - `UPDRAFT_SYSTEM_TEST=1`: it runs when those are there, else says what is missing;
//! - `UPDRAFT_SYSTEM_TEST=require` (`.ci/run`): anything missing fails it.
//!
//! The rootfs is made once and kept in `/var/cache/updraft-test/bookworm-HASH`
//! (`UPDRAFT_SYSTEM_TEST_CACHE` moves it; `UPDRAFT_SYSTEM_TEST_MIRROR` names another
//! mirror); HASH covers the package list, so changing it makes a new one. Each run
//! boots it with `--volatile=overlay` (writes go to a tmpfs and vanish with the
//! container), so runs are independent and the cache stays pristine.
//!
//! The walk: README's sh blocks in "Install from .deb" are run command by command as
//! root in the guest (the build block excepted: the packages are built here from the
//! test build, as tests/package.rs does), with what the README leaves to the operator
//! supplied: `$EDITOR` makes the edit the comment beside it describes, `<token>` and
//! `<fingerprint>` become what `token create` and `ca init` printed, and
//! the user README adds to group `updraft` (`alice`) is made beforehand; from
//! `usermod -aG updraft alice` on, commands run as alice. `#   stdout:`/`#   stderr:` comments are checked as in
//! tests/readme.rs, and `# log: "TEXT"` after `systemctl start UNIT` is looked for in
//! the unit's journal. The guest is named `board-1` and resolves `cloud.example.com` to
//! itself: it is the cloud machine and the board at once.

mod common;
#[path = "system/guest.rs"]
mod guest;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use guest::{cgroup2_root, rootfs, Guest, SHARE};

use common::readme::{blocks, commands, matches, section, Step};

/// The user the walk adds to group `updraft`.
const USER: &str = "alice";
/// The guest's host name, so the agent enrolls as README's `board-1`.
const HOSTNAME: &str = "board-1";

/// Tasks the walk's `$EDITOR` adds to daemon.toml. `slow` runs long enough to be
/// caught running; `spawner` leaves a child and a `setsid` grandchild behind; `scratch`
/// writes where only README's drop-in lets it.
const DAEMON_TASKS: &str = r#"
[tasks.slow]
command = ["sh", "-c", "sleep 5.02; echo finished in the cloud"]
timeout = "60s"

[tasks.spawner]
command = ["sh", "-c", "sleep 4242 </dev/null >/dev/null 2>&1 & setsid sleep 4343 </dev/null >/dev/null 2>&1 & echo spawned"]

[tasks.scratch]
command = ["sh", "-c", "echo written by a task > /srv/scratch/note && cat /srv/scratch/note"]
"#;

/// Tasks the walk's `$EDITOR` adds to agent.toml (after uncommenting `[[cloud]]`).
const AGENT_TASKS: &str = r#"
[tasks.slow]
command = ["sh", "-c", "sleep 5.01; echo finished on the board"]
timeout = "60s"

[tasks.spawner]
command = ["sh", "-c", "sleep 4242 </dev/null >/dev/null 2>&1 & setsid sleep 4343 </dev/null >/dev/null 2>&1 & echo spawned"]

[tasks.holder]
command = ["sh", "-c", "setsid sleep 4444 </dev/null >/dev/null 2>&1 & exec sleep 4545"]
timeout = "10s"

[tasks.scratch]
command = ["sh", "-c", "echo written by a task > /srv/scratch/note && cat /srv/scratch/note"]
"#;

/// `$EDITOR` (and `SYSTEMD_EDITOR`) in the guest: makes the edit README's comment
/// describes, for the file it is given.
const EDITOR: &str = r#"#!/bin/sh
set -e
case "$1" in
  */daemon.toml) cat /mnt/updraft/daemon-tasks.toml >> "$1" ;;
  */agent.toml)
    sed -i 's/^# \[\[cloud\]\]$/[[cloud]]/; s/^# address = /address = /' "$1"
    grep -q '^\[\[cloud\]\]$' "$1" || { echo "agent.toml has no [[cloud]] to uncomment" >&2; exit 1; }
    cat /mnt/updraft/agent-tasks.toml >> "$1" ;;
  *updraftd.service.d/*) cat /mnt/updraft/dropin.conf > "$1" ;;
  *) echo "the test's editor does not know $1" >&2; exit 1 ;;
esac
"#;

/// Whether to run, from `UPDRAFT_SYSTEM_TEST`; `None` when the test should skip.
fn wanted() -> Option<bool> {
    let mode = std::env::var("UPDRAFT_SYSTEM_TEST").unwrap_or_default();
    if mode.is_empty() || mode == "0" {
        eprintln!(
            "system test skipped: set UPDRAFT_SYSTEM_TEST=1 to boot a bookworm guest with \
             systemd-nspawn and walk the .deb install in it (needs root, debootstrap, \
             systemd-nspawn, cargo-deb), or =require to fail when any of those is missing"
        );
        return None;
    }
    let require = mode == "require";
    let missing = missing_prerequisites();
    if missing.is_empty() {
        return Some(true);
    }
    assert!(
        !require,
        "UPDRAFT_SYSTEM_TEST=require, but: {}",
        missing.join("; ")
    );
    eprintln!("system test skipped: {}", missing.join("; "));
    None
}

fn missing_prerequisites() -> Vec<String> {
    let mut missing = Vec::new();
    // /proc/self belongs to the process's effective user.
    let euid =
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").expect("/proc/self"));
    if euid != 0 {
        missing.push("it must run as root (systemd-nspawn)".to_string());
    }
    for (tool, package) in [
        ("debootstrap", "debootstrap"),
        ("systemd-nspawn", "systemd-container"),
        ("nsenter", "util-linux"),
    ] {
        let found = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            missing.push(format!("`{tool}` not found (apt install {package})"));
        }
    }
    if cgroup2_root().is_none() {
        missing.push("no cgroup v2 hierarchy mounted on the host".to_string());
    }
    if !common::deb::have_cargo_deb("UPDRAFT_SYSTEM_TEST") {
        missing.push("cargo-deb not installed (cargo install cargo-deb)".to_string());
    }
    missing
}

fn progress(started: Instant, what: &str) {
    eprintln!("system test: {:>6.1?}  {what}", started.elapsed());
}

#[test]
fn packages_install_and_keep_their_promises_under_a_booted_systemd() {
    if wanted().is_none() {
        return;
    }
    let started = Instant::now();
    let rootfs = rootfs();
    progress(started, "rootfs ready");

    let share = tempfile::tempdir().unwrap();
    let daemon_deb = common::deb::build_deb("updraft-daemon", "updraftd", share.path());
    let agent_deb = common::deb::build_deb("updraft-agent", "updraft-agent", share.path());
    write_share(share.path());
    progress(started, "packages built");

    let guest = Guest::boot(&rootfs, share.path());
    progress(started, "guest booted");
    guest.ok(
        "setup",
        &format!(
            "hostname {HOSTNAME} && echo {HOSTNAME} > /etc/hostname \
             && echo '127.0.0.1 cloud.example.com' >> /etc/hosts && useradd -m {USER} \
             && cp {SHARE}/*.deb /root/"
        ),
    );

    let debs = [file_name(&daemon_deb), file_name(&agent_deb)];
    walk_install_section(&guest, &debs);
    progress(started, "README's \"Install from .deb\" walked");

    analyze_security(&guest);
    signals_under_the_sandbox(&guest);
    command_task_under_the_sandbox(&guest);
    fleet_under_the_sandbox(&guest);
    progress(
        started,
        "security, signals, a command task, the fleet commands",
    );
    reload_and_journal_levels(&guest);
    progress(started, "reload and journal levels");
    restart_resumes_detached(&guest);
    progress(started, "Restart=on-failure resumes a detached task");
    stop_drains(&guest);
    progress(started, "stop drains");
    containment(&guest);
    progress(started, "task containment");
    drop_in(&guest);
    progress(started, "README's drop-in");
    watchdog(&guest);
    progress(started, "watchdog");
}

fn file_name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md")
}

/// The files the guest sees under [`SHARE`]: the editor, the edits it makes, and
/// README's drop-in example (its ```ini block in "systemd").
fn write_share(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let editor = dir.join("edit");
    std::fs::write(&editor, EDITOR).unwrap();
    std::fs::set_permissions(&editor, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(dir.join("daemon-tasks.toml"), DAEMON_TASKS).unwrap();
    std::fs::write(dir.join("agent-tasks.toml"), AGENT_TASKS).unwrap();
    let readme = readme();
    let ini = blocks(section(&readme, "systemd"), "ini");
    assert_eq!(
        ini.len(),
        1,
        "README's systemd section has one ```ini drop-in example"
    );
    std::fs::write(dir.join("dropin.conf"), ini[0].join("\n") + "\n").unwrap();
}

/// What the walk learned from earlier commands.
#[derive(Default)]
struct Walk {
    fingerprint: Option<String>,
    token: Option<String>,
    /// The enroll command `token create` printed for the board.
    enroll: Option<String>,
    /// Set once `usermod -aG updraft alice` ran: later commands are alice's.
    as_user: bool,
}

impl Walk {
    /// The README line with `<token>` and `<fingerprint>` replaced by what
    /// `token create` and `ca init` printed.
    fn substitute(&self, line: &str) -> String {
        let mut line = line.to_string();
        for (k, v) in [
            ("<token>", &self.token),
            ("<fingerprint>", &self.fingerprint),
        ] {
            if let Some(v) = v {
                line = line.replace(k, v);
            }
        }
        line
    }
}

/// README's "Install from .deb", run in the guest.
fn walk_install_section(guest: &Guest, debs: &[String; 2]) {
    let readme = readme();
    let text = section(&readme, "Install from .deb");
    let sh = blocks(text, "sh");
    assert!(
        sh.len() >= 3,
        "Install from .deb: expected the build, cloud and board blocks"
    );
    // The build block: the test built the same packages from the tree.
    let build = sh[0].join("\n");
    for p in ["cargo deb -p updraft-daemon", "cargo deb -p updraft-agent"] {
        assert!(
            build.contains(p),
            "README's build block lost `{p}`: {build}"
        );
    }
    for deb in debs {
        assert!(
            text.contains(&format!("apt install ./{deb}")),
            "README should install the package the build makes, `./{deb}`"
        );
    }
    let mut walk = Walk::default();
    let mut ran = 0;
    for block in &sh[1..] {
        for step in commands(block) {
            let Step::Run {
                line,
                stdout,
                stderr,
            } = step
            else {
                unreachable!("sh blocks hold commands")
            };
            run_step(guest, &mut walk, &line, &stdout, &stderr);
            ran += 1;
        }
    }
    assert!(ran >= 12, "the install walk lost its commands ({ran} ran)");
    assert!(walk.token.is_some(), "the walk never made a token");
    assert!(
        walk.as_user,
        "the walk never added the user to group updraft"
    );
}

fn run_step(guest: &Guest, walk: &mut Walk, line: &str, stdout: &[String], stderr: &[String]) {
    let cmd = walk.substitute(line);
    if cmd.starts_with("updraft-agent enroll ") {
        assert_eq!(
            Some(cmd.trim()),
            walk.enroll.as_deref(),
            "README's enroll line is the one `token create` prints"
        );
    }
    let user = walk.as_user.then_some(USER);
    let out = guest.run(user, &cmd);
    let who = user.unwrap_or("root");
    assert!(
        out.ok(),
        "README: `{line}` (as {who}) failed: {out}\n{}",
        guest.journals()
    );
    for (what, text, patterns) in [
        ("stdout", &out.stdout, stdout),
        ("stderr", &out.stderr, stderr),
    ] {
        for p in patterns {
            assert!(
                text.lines().any(|l| matches(p, l.trim())),
                "README: `{line}`: no line of its {what} matches `{p}`: {out}"
            );
        }
    }
    let words: Vec<&str> = line.split_whitespace().collect();
    if let ["apt", "install", deb] = words[..] {
        // Installed: the unit is enabled, not started.
        let unit = deb.trim_start_matches("./").split('_').next().unwrap();
        assert_eq!(
            guest.show(unit, "UnitFileState"),
            "enabled",
            "{unit} after `{line}`"
        );
        assert_eq!(
            guest.show(unit, "ActiveState"),
            "inactive",
            "{unit} after `{line}`"
        );
    }
    if line.contains("ca init") {
        walk.fingerprint = Some(out.stdout.trim().to_string());
    } else if line.contains("token create") {
        walk.token = Some(out.stdout.trim().to_string());
        walk.enroll = out
            .stderr
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("updraft-agent enroll "))
            .map(str::to_string);
    } else if line.contains("usermod -aG updraft") {
        assert_eq!(
            words.get(3).copied(),
            Some(USER),
            "README: `{line}`: the walk made the user {USER}"
        );
        walk.as_user = true;
    } else if let ["systemctl", "start", unit, ..] = words.as_slice() {
        started_notify(guest, unit);
        if let Some(pattern) = line.split("# log: \"").nth(1) {
            let pattern = pattern.trim_end().trim_end_matches('"');
            let journal = guest.journal(unit);
            assert!(
                journal.lines().any(|l| matches(pattern, strip_level(l))),
                "README: `{line}`: no line of the {unit} journal matches `{pattern}`:\n{journal}"
            );
        }
    }
}

/// A journal line without its level word (`INFO`, ` WARN`...).
fn strip_level(line: &str) -> &str {
    let l = line.trim_start();
    ["ERROR ", "WARN ", "INFO ", "DEBUG ", "TRACE "]
        .iter()
        .find_map(|w| l.strip_prefix(w))
        .unwrap_or(l)
}

/// Type=notify: `systemctl start` returned, so the unit is active, says what it serves
/// (`StatusText`), logged that it serves before systemd logged it started, and the
/// agent's socket answers at once.
fn started_notify(guest: &Guest, unit: &str) {
    let unit = unit.trim_end_matches(".service");
    assert_eq!(guest.show(unit, "Type"), "notify", "{unit}: Type");
    assert_eq!(
        guest.show(unit, "ActiveState"),
        "active",
        "{unit} is active once `systemctl start` returns"
    );
    let status = guest.show(unit, "StatusText");
    assert!(
        status.starts_with("serving on "),
        "{unit}: StatusText says what it serves: `{status}`"
    );
    let journal = guest.journal(unit);
    let lines: Vec<&str> = journal.lines().collect();
    let serving = lines
        .iter()
        .rposition(|l| l.contains(&format!("{unit} serving")));
    let started = lines.iter().rposition(|l| l.starts_with("Started "));
    assert!(
        serving.is_some() && started.is_some() && serving < started,
        "{unit}: READY comes after it serves (its `serving` line before systemd's `Started`):\n{journal}"
    );
    if unit == "updraft-agent" {
        guest.ok(
            "the agent answers as soon as it is active",
            "updraft-agent status --json >/dev/null",
        );
    }
}

/// `systemd-analyze security` of the running units: exposure at most 2.0.
fn analyze_security(guest: &Guest) {
    for unit in ["updraftd.service", "updraft-agent.service"] {
        let out = guest.ok(
            "systemd-analyze security",
            &format!("systemd-analyze security --no-pager {unit}"),
        );
        let exposure: f64 = out
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|l| l.split(": ").nth(1))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{unit}: no exposure level in:\n{out}"));
        assert!(exposure <= 2.0, "{unit}: exposure {exposure} > 2.0:\n{out}");
        eprintln!("system test: {unit}: exposure {exposure} in the booted guest");
    }
}

/// The agent reads CPU, memory, thermal zones and power_supply under its sandbox.
/// Where the machine has no thermal zone or battery (a VM), a sysfs-shaped tree is
/// bind-mounted over /sys/class/thermal and /sys/class/power_supply in the guest
/// before the agent restarts, so what it reads there still passes the sandbox.
fn signals_under_the_sandbox(guest: &Guest) {
    let has = guest.sh(
        "ls -d /sys/class/thermal/thermal_zone* >/dev/null 2>&1 && grep -qx Battery /sys/class/power_supply/*/type",
    );
    let (temp, battery) = if has.ok() {
        (None, None)
    } else {
        guest.ok(
            "a thermal zone and a battery for the guest",
            "set -e; t=/run/fake-sys/thermal/thermal_zone0; b=/run/fake-sys/power_supply/BAT0; \
             mkdir -p $t $b; echo x86_pkg_temp > $t/type; echo 47500 > $t/temp; \
             echo Battery > $b/type; echo 1 > $b/present; echo 64 > $b/capacity; \
             echo Discharging > $b/status; \
             mount --bind /run/fake-sys/thermal /sys/class/thermal; \
             mount --bind /run/fake-sys/power_supply /sys/class/power_supply; \
             systemctl restart updraft-agent",
        );
        (Some(47.5), Some(64.0))
    };
    let status = guest.wait_until(
        "the agent's signals",
        Duration::from_secs(30),
        "updraft-agent status --json | grep -q '\"temperature_c\":[0-9]' \
         && updraft-agent status --json",
    );
    let v: serde_json::Value = serde_json::from_str(&status).expect("status --json");
    let s = &v["signals"];
    for key in ["cpu_percent", "load_avg", "memory_available_mb"] {
        assert!(s[key].is_number(), "signals.{key} is read: {s}");
    }
    assert!(s["memory_available_mb"].as_f64().unwrap() > 0.0, "{s}");
    match (temp, battery) {
        (Some(t), Some(b)) => {
            assert_eq!(s["temperature_c"].as_f64(), Some(t), "{s}");
            let wait = guest.wait_until(
                "the battery in the agent's signals",
                Duration::from_secs(30),
                "updraft-agent status --json | grep -q '\"battery_percent\":64'",
            );
            let _ = wait;
            let v: serde_json::Value =
                serde_json::from_str(&guest.ok("status", "updraft-agent status --json")).unwrap();
            let s = &v["signals"];
            assert_eq!(s["battery_percent"].as_f64(), Some(b), "{s}");
            assert_eq!(s["on_battery"], true, "{s}");
        }
        _ => {
            assert!(s["temperature_c"].is_number(), "{s}");
            assert!(s["battery_percent"].is_number(), "{s}");
        }
    }
}

/// A command task (`sha256sum`) runs on the board under the agent's sandbox and gives
/// what `sha256sum` gives outside it.
fn command_task_under_the_sandbox(guest: &Guest) {
    let out = guest.ok(
        "a local command task",
        "head -c 100000 /dev/urandom > in.bin && updraft-agent run sha --input in.bin --where local \
         && sha256sum < in.bin",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!(lines[0], lines[1], "the task's sha256sum is sha256sum's");
}

/// The hardened daemon serves its admin socket in its state directory, and the board
/// reported on its fleet stream: `updraftd agents` (as root, with the installed config)
/// lists it connected, with its version.
fn fleet_under_the_sandbox(guest: &Guest) {
    guest.wait_until(
        "the board's report in updraftd agents",
        Duration::from_secs(30),
        "updraftd agents --json | grep -q '\"version\"'",
    );
    let out = guest.ok("updraftd agents", "updraftd agents");
    assert!(
        out.lines()
            .any(|l| l.starts_with(HOSTNAME) && l.contains("connected")),
        "{out}"
    );
}

/// `systemctl reload updraft-agent` reloads the policy; the journal keeps each line's
/// level (a refused reload is a warning, priority 4) and no line carries a timestamp
/// of its own.
fn reload_and_journal_levels(guest: &Guest) {
    guest.ok(
        "a broken policy, reloaded",
        "echo 'default = \"sideways\"' > /etc/updraft/policy.toml && systemctl reload updraft-agent",
    );
    guest.wait_until(
        "the refused reload in the journal",
        Duration::from_secs(20),
        "journalctl -u updraft-agent -o cat | grep -q 'policy reload refused'",
    );
    guest.ok(
        "a policy that keeps tasks on the board, reloaded",
        "echo 'default = \"local\"' > /etc/updraft/policy.toml && systemctl reload updraft-agent",
    );
    guest.wait_until(
        "the SIGHUP reload in the journal",
        Duration::from_secs(20),
        "journalctl -u updraft-agent -o cat | grep 'policy loaded' | grep -q SIGHUP",
    );
    let out = guest.sh("echo hi | updraft-agent run sha --input - --explain");
    assert!(out.ok(), "{out}");
    assert!(
        out.stderr.trim_start().starts_with("local"),
        "the reloaded policy places the task: {out}"
    );

    for unit in ["updraftd", "updraft-agent"] {
        let json = guest.ok(
            "the journal as JSON",
            &format!("journalctl -u {unit} -o json --no-pager _COMM={unit}"),
        );
        let mut levels = std::collections::BTreeMap::new();
        for line in json.lines() {
            let e: serde_json::Value = serde_json::from_str(line).expect("journal JSON");
            let Some(msg) = e["MESSAGE"].as_str() else {
                continue;
            };
            let prio = e["PRIORITY"].as_str().unwrap_or("?").to_string();
            let t = msg.trim_start();
            let stamped = t.len() > 10
                && t.as_bytes()[..4].iter().all(u8::is_ascii_digit)
                && t.as_bytes()[4] == b'-';
            assert!(
                !stamped,
                "{unit}: a journal line with its own timestamp: {msg}"
            );
            for (word, want) in [("ERROR", "3"), ("WARN", "4"), ("INFO", "6")] {
                if t.starts_with(word) {
                    assert_eq!(prio, want, "{unit}: `{msg}` is logged at priority {prio}");
                    *levels.entry(word).or_insert(0) += 1;
                }
            }
        }
        assert!(levels.contains_key("INFO"), "{unit}: {levels:?}");
        if unit == "updraft-agent" {
            assert!(levels.contains_key("WARN"), "{unit}: {levels:?}");
            guest.ok(
                "journalctl -p warning shows the warning",
                "journalctl -u updraft-agent -p warning -o cat | grep -q 'policy reload refused'",
            );
        }
    }
}

/// kill -9 of the agent with a detached task running: systemd restarts it and the task
/// runs again and finishes.
fn restart_resumes_detached(guest: &Guest) {
    let id = guest.ok(
        "a detached task",
        "updraft-agent run slow --detach --where local",
    );
    let id = id.trim();
    guest.wait_until(
        "the detached task to run",
        Duration::from_secs(20),
        "pgrep -fx 'sleep 5.01'",
    );
    let before = guest.show("updraft-agent", "NRestarts");
    let pid = guest.show("updraft-agent", "MainPID");
    guest.ok("kill -9 the agent", &format!("kill -9 {pid}"));
    guest.wait_until(
        "systemd to restart the agent",
        Duration::from_secs(30),
        &format!(
            "[ \"$(systemctl show -p NRestarts --value updraft-agent)\" -gt {before} ] \
             && [ \"$(systemctl show -p MainPID --value updraft-agent)\" != {pid} ] \
             && systemctl is-active -q updraft-agent"
        ),
    );
    let out = guest.ok(
        "the detached task's result",
        &format!("updraft-agent result --wait {id}"),
    );
    assert_eq!(out.trim(), "finished on the board");
}

/// `systemctl stop updraftd` with a cloud task running: the status says it drains,
/// the task finishes and its result reaches the board.
fn stop_drains(guest: &Guest) {
    guest.ok(
        "a cloud task in the background",
        "(updraft-agent run slow --where cloud > drain.out 2> drain.err; echo $? > drain.rc) \
         </dev/null >/dev/null 2>&1 &",
    );
    guest.wait_until(
        "the cloud task to run",
        Duration::from_secs(30),
        "pgrep -fx 'sleep 5.02'",
    );
    guest.ok("stop the daemon", "systemctl stop --no-block updraftd");
    let status = guest.wait_until(
        "the daemon's draining status",
        Duration::from_secs(10),
        "systemctl show -p StatusText --value updraftd | grep '^draining: '",
    );
    assert_eq!(
        status.trim(),
        "draining: finishing 1 running and 0 queued tasks"
    );
    guest.wait_until(
        "the daemon to stop",
        Duration::from_secs(60),
        "systemctl is-active -q updraftd; [ $? -ne 0 ]",
    );
    let out = guest.wait_until(
        "the drained task's result",
        Duration::from_secs(30),
        "cat drain.rc drain.out",
    );
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["0", "finished in the cloud"],
        "{}",
        guest.sh("cat drain.err").stdout
    );
    assert!(guest.journal("updraftd").contains("draining:"));
    start_daemon(guest);
}

/// Waits until the agent reports its daemon connected.
fn wait_connected(guest: &Guest, what: &str) {
    guest.wait_until(
        what,
        Duration::from_secs(60),
        "updraft-agent status --json | grep -q '\"connected\":true'",
    );
}

fn start_daemon(guest: &Guest) {
    guest.ok("start the daemon", "systemctl start updraftd");
    wait_connected(guest, "the agent to reconnect");
}

/// A task's child and `setsid` grandchild are gone when the task ends (on the board
/// and in the cloud), and when the service stops; each task has its own cgroup.
fn containment(guest: &Guest) {
    for unit in ["updraftd", "updraft-agent"] {
        assert_eq!(guest.show(unit, "Delegate"), "yes", "{unit}: Delegate=");
        let line = format!(
            "task containment: per-task cgroups under /sys/fs/cgroup/system.slice/{unit}.service"
        );
        assert!(guest.journal(unit).contains(&line), "{unit} logs `{line}`");
    }
    for place in ["local", "cloud"] {
        let out = guest.ok(
            "a task that leaves processes behind",
            &format!("updraft-agent run spawner --where {place}"),
        );
        assert_eq!(out.trim(), "spawned");
        guest.wait_until(
            &format!("the {place} task's descendants to be gone"),
            Duration::from_secs(10),
            "! pgrep -fx 'sleep (4242|4343)'",
        );
    }
    // A synchronous task whose submitter goes away.
    guest.ok(
        "a task still running",
        "updraft-agent run holder --where local </dev/null >/dev/null 2>&1 &",
    );
    let pid = guest.wait_until(
        "the task's setsid grandchild",
        Duration::from_secs(20),
        "pgrep -fx 'sleep 4444'",
    );
    let cgroup = guest.ok("its cgroup", &format!("cat /proc/{}/cgroup", pid.trim()));
    assert!(
        cgroup.contains("/system.slice/updraft-agent.service/updraft-task-"),
        "a task's processes are in a cgroup of their own: {cgroup}\n{}",
        guest.journals()
    );
    guest.ok(
        "the submitter goes away",
        "pkill -fx 'updraft-agent run holder --where local'",
    );
    guest.wait_until(
        "the abandoned task's processes to be gone",
        Duration::from_secs(10),
        "! pgrep -fx 'sleep (4444|4545)'",
    );
    // A detached task when the service stops.
    guest.ok(
        "a detached task still running",
        "updraft-agent run holder --detach --where local",
    );
    guest.wait_until(
        "the detached task's setsid grandchild",
        Duration::from_secs(20),
        "pgrep -fx 'sleep 4444'",
    );
    guest.ok("stop the agent", "systemctl stop updraft-agent");
    guest.ok(
        "nothing of the task after stop",
        "! pgrep -fx 'sleep (4444|4545)'",
    );
    guest.ok("start the agent", "systemctl start updraft-agent");
    wait_connected(guest, "the agent to connect");
}

/// README's drop-in, through `systemctl edit updraftd` (in a pseudo-terminal from
/// `script`: systemctl edits only on a terminal), lets a task write where the sandbox
/// alone does not.
fn drop_in(guest: &Guest) {
    let before = guest.sh("updraft-agent run scratch --where cloud");
    assert!(!before.ok(), "the sandbox keeps /srv read-only: {before}");
    guest.ok(
        "the drop-in",
        &format!(
            "mkdir -p /srv/scratch && chown updraft:updraft /srv/scratch \
             && SYSTEMD_EDITOR={SHARE}/edit script -qec 'systemctl edit updraftd' /dev/null \
             && systemctl restart updraftd"
        ),
    );
    wait_connected(guest, "the agent to reconnect");
    let out = guest.ok(
        "the task the drop-in allows",
        "updraft-agent run scratch --where cloud",
    );
    assert_eq!(out.trim(), "written by a task");
}

/// A SIGSTOP-ed service stops pinging the watchdog; systemd kills and restarts it.
/// `WatchdogSec=3` (a drop-in) instead of the shipped 30 s keeps the test short.
fn watchdog(guest: &Guest) {
    for unit in ["updraftd", "updraft-agent"] {
        guest.ok(
            "a shorter watchdog",
            &format!(
                "mkdir -p /etc/systemd/system/{unit}.service.d \
                 && printf '[Service]\\nWatchdogSec=3\\n' > /etc/systemd/system/{unit}.service.d/watchdog.conf \
                 && systemctl daemon-reload && systemctl restart {unit}"
            ),
        );
        let first = guest.show(unit, "WatchdogTimestampMonotonic");
        guest.wait_until(
            &format!("{unit} to ping the watchdog"),
            Duration::from_secs(10),
            &format!(
                "[ \"$(systemctl show -p WatchdogTimestampMonotonic --value {unit})\" != {first} ]"
            ),
        );
        let restarts = guest.show(unit, "NRestarts");
        let pid = guest.show(unit, "MainPID");
        guest.ok("SIGSTOP", &format!("kill -STOP {pid}"));
        guest.wait_until(
            &format!("systemd to restart the stopped {unit}"),
            Duration::from_secs(60),
            &format!(
                "[ \"$(systemctl show -p NRestarts --value {unit})\" -gt {restarts} ] \
                 && [ \"$(systemctl show -p MainPID --value {unit})\" != {pid} ] \
                 && systemctl is-active -q {unit}"
            ),
        );
        let journal = guest.ok(
            "the journal",
            &format!("journalctl -u {unit} -o cat --no-pager"),
        );
        assert!(
            journal.contains("Watchdog timeout"),
            "{unit}: systemd says why it killed it:\n{journal}"
        );
        guest.ok(
            "the shipped watchdog again",
            &format!(
                "rm /etc/systemd/system/{unit}.service.d/watchdog.conf && systemctl daemon-reload"
            ),
        );
    }
}
