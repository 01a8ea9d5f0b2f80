//! `updraftd check-config` checks what `serve` would load: the file, every number in
//! range, and the TLS files (present, parseable, key matching certificate). Both print
//! the same one-line error naming file and key; check-config warns about a task whose
//! program is not installed.

mod common;

use common::{bin, ca_init, updraftd};
use std::path::Path;
use std::process::{Command, Output};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A daemon.toml in `dir` with these `[tls]` files and extra lines.
fn write_config(dir: &Path, cert: &str, key: &str, extra: &str) -> String {
    let cfg = dir.join("daemon.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = \"dstate\"\n{extra}\n[tls]\nca = \"pki/ca.pem\"\ncert = \"{cert}\"\nkey = \"{key}\"\n[tasks.echo]\nbuiltin = \"echo\"\n"
        ),
    )
    .unwrap();
    cfg.to_str().unwrap().to_string()
}

fn check(cfg: &str) -> Output {
    updraftd(&["check-config", "--config", cfg])
}

/// `serve` with a config it must refuse: exits at once (bounded by the test's own
/// timeout through `output()` on a process that never binds).
fn serve(cfg: &str) -> Output {
    Command::new(bin("updraftd"))
        .args(["serve", "--config", cfg])
        .output()
        .unwrap()
}

#[test]
fn a_key_from_another_pair_fails_check_config_and_serve_alike() {
    let d = tempfile::tempdir().unwrap();
    ca_init(d.path(), "pki");
    ca_init(d.path(), "other");
    let cfg = write_config(d.path(), "pki/server.pem", "other/server.key", "");
    let out = check(&cfg);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out.stderr));
    let said = text(&out.stderr);
    assert!(
        said.contains("other/server.key does not belong to")
            && said.contains("pki/server.pem")
            && said.contains("daemon.toml")
            && said.contains("tls.key"),
        "{said}"
    );
    assert_eq!(said.trim().lines().count(), 1, "{said}");
    let served = serve(&cfg);
    assert_eq!(served.status.code(), Some(64));
    assert_eq!(
        text(&served.stderr),
        said,
        "serve says what check-config said"
    );
}

#[test]
fn a_missing_certificate_file_fails_check_config() {
    let d = tempfile::tempdir().unwrap();
    ca_init(d.path(), "pki");
    let cfg = write_config(d.path(), "pki/nowhere.pem", "pki/server.key", "");
    let out = check(&cfg);
    let said = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{said}");
    assert!(
        said.contains("tls.cert") && said.contains("pki/nowhere.pem"),
        "{said}"
    );
    assert!(!text(&out.stdout).contains("ok"));
}

#[test]
fn out_of_range_values_fail_check_config_naming_the_key() {
    let d = tempfile::tempdir().unwrap();
    ca_init(d.path(), "pki");
    for (line, key) in [
        (
            "max_concurrent_tasks = 2305843009213693952",
            "max_concurrent_tasks",
        ),
        ("idle_timeout = \"300000000000d\"", "idle_timeout"),
        (
            "[enroll]\ncert_lifetime = \"100000000d\"",
            "enroll.cert_lifetime",
        ),
    ] {
        let cfg = write_config(d.path(), "pki/server.pem", "pki/server.key", line);
        let out = check(&cfg);
        let said = text(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{line}: {said}");
        assert!(
            said.contains(key) && said.contains("out of range"),
            "{said}"
        );
        let served = serve(&cfg);
        assert_eq!(served.status.code(), Some(64), "{line}");
    }
}

#[test]
fn a_task_program_that_is_not_installed_is_a_warning() {
    let d = tempfile::tempdir().unwrap();
    ca_init(d.path(), "pki");
    let cfg = write_config(
        d.path(),
        "pki/server.pem",
        "pki/server.key",
        "[tasks.thumb]\ncommand = [\"/opt/nowhere/thumbnailer\", \"-q\"]\n[tasks.count]\ncommand = [\"no-such-program-here\"]\n[tasks.sum]\ncommand = [\"sha256sum\"]",
    );
    let out = check(&cfg);
    let said = text(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(text(&out.stdout).contains(": ok"), "{}", text(&out.stdout));
    assert!(
        said.contains("warning")
            && said.contains("tasks.thumb.command")
            && said.contains("/opt/nowhere/thumbnailer"),
        "{said}"
    );
    assert!(said.contains("tasks.count.command"), "{said}");
    assert!(!said.contains("tasks.sum"), "{said}");
}
