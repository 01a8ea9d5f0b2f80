//! `--version` and `-V` of the three binaries: the package version and the git commit
//! they were built from (`commit unknown` when built outside a git checkout).

mod common;

use std::path::PathBuf;
use std::process::Command;

/// `git rev-parse --short HEAD` of this checkout, if it is one.
fn head() -> Option<String> {
    let o = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    Some(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

#[test]
fn every_binary_prints_its_version_and_commit() {
    let expected = head().unwrap_or_else(|| "unknown".into());
    let bins: [(&str, PathBuf); 3] = [
        ("updraft-agent", common::bin("updraft-agent")),
        ("updraftd", common::bin("updraftd")),
        ("updraft", env!("CARGO_BIN_EXE_updraft").into()),
    ];
    for (name, path) in bins {
        for flag in ["--version", "-V"] {
            let o = Command::new(&path).arg(flag).output().unwrap();
            assert!(o.status.success(), "{name} {flag}: {o:?}");
            let line = String::from_utf8_lossy(&o.stdout);
            let prefix = format!("{name} {} (commit ", env!("CARGO_PKG_VERSION"));
            let commit = line
                .trim_end()
                .strip_prefix(&prefix)
                .and_then(|r| r.strip_suffix(')'))
                .unwrap_or_else(|| panic!("{name} {flag} printed {line:?}, not {prefix}...)"));
            // A build from a tree with uncommitted changes says so.
            let commit = commit.strip_suffix("-dirty").unwrap_or(commit);
            assert_eq!(commit, expected, "{name} {flag}: {line}");
        }
    }
}
