//! The shipped systemd units, checked by systemd's own tools: `systemd-analyze verify`
//! passes and `systemd-analyze security --offline=true` scores each at most 2.0.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::bin;

/// The most exposure `systemd-analyze security` may report for a shipped unit.
const MAX_EXPOSURE: f64 = 2.0;

const UNITS: [(&str, &str); 2] = [
    ("updraftd.service", "updraftd"),
    ("updraft-agent.service", "updraft-agent"),
];

fn unit_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("systemd")
        .join(name)
}

/// A copy of the unit in `dir` whose ExecStart names the freshly built binary, because
/// `verify` checks that the command exists and nothing is installed in /usr/bin here.
fn with_built_binary(dir: &Path, unit: &str, binary: &str) -> PathBuf {
    let text = std::fs::read_to_string(unit_path(unit)).unwrap();
    let installed = format!("/usr/bin/{binary} ");
    assert!(
        text.contains(&format!("ExecStart={installed}")),
        "{unit}: ExecStart should run {installed}"
    );
    let built = format!("{} ", bin(binary).display());
    let path = dir.join(unit);
    std::fs::write(&path, text.replace(&installed, &built)).unwrap();
    path
}

fn analyze(args: &[&str]) -> std::process::Output {
    Command::new("systemd-analyze")
        .args(args)
        .output()
        .expect("systemd-analyze runs (package systemd)")
}

#[test]
fn both_units_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    for (unit, binary) in UNITS {
        let path = with_built_binary(dir.path(), unit, binary);
        let o = analyze(&["verify", path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{unit}: verify failed: {err}");
        // verify reports problems on stderr even when it exits 0.
        let own: Vec<&str> = err.lines().filter(|l| l.contains(unit)).collect();
        assert!(own.is_empty(), "{unit}: verify complained: {own:?}");
    }
}

#[test]
fn both_units_score_at_most_two_in_systemd_analyze_security() {
    for (unit, _) in UNITS {
        let path = unit_path(unit);
        let o = analyze(&["security", "--offline=true", path.to_str().unwrap()]);
        let out = String::from_utf8_lossy(&o.stdout);
        let marker = format!("Overall exposure level for {unit}: ");
        let line = out
            .lines()
            .find(|l| l.contains(&marker))
            .unwrap_or_else(|| panic!("{unit}: no exposure level in: {out}"));
        let score: f64 = line[line.find(&marker).unwrap() + marker.len()..]
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{unit}: unreadable exposure level: {line}"));
        assert!(
            score <= MAX_EXPOSURE,
            "{unit}: exposure {score} > {MAX_EXPOSURE}:\n{out}"
        );
    }
}

#[test]
fn both_units_are_notify_services_with_watchdog_restart_and_their_directories() {
    for (unit, _) in UNITS {
        let text = std::fs::read_to_string(unit_path(unit)).unwrap();
        let keys: Vec<&str> = text
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim()))
            .collect();
        for line in ["Type=notify", "Restart=on-failure", "User=updraft"] {
            assert!(text.lines().any(|l| l == line), "{unit}: missing {line}");
        }
        for key in [
            "WatchdogSec",
            "StateDirectory",
            "RuntimeDirectory",
            "ConfigurationDirectory",
        ] {
            assert!(keys.contains(&key), "{unit}: missing {key}=");
        }
    }
}
