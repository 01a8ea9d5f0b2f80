//! README's "Five-minute setup", run as written against the built binaries.
//!
//! The section is read from README.md itself, so what it shows and what the product does
//! cannot drift apart:
//! - a ```toml block is written to the file named in backticks on the line before it
//!   (`` `/etc/updraft/daemon.toml`: ``);
//! - a ```sh block is run command by command (`\` continues a line) with `sh -c`, in one
//!   working directory, with the built binaries first on PATH; each must exit 0;
//! - a command ending in `&` is a service: it is started, and the walk waits until it
//!   serves (the daemon listens; the agent is connected) before going on;
//! - a comment `#   stdout: PATTERN` or `#   stderr: PATTERN` after a command says a line
//!   of that output matches PATTERN, where `...` stands for any text.
//!
//! Only what cannot be the same here is substituted: the fixed paths move into a scratch
//! directory, the daemon's public address and port become 127.0.0.1 and a free port, and
//! `<token>` / `<fingerprint>` become what `token create` and `ca init` printed.

mod common;

use common::readme::{commands, matches, Step};
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// The steps of README's "Five-minute setup", in order.
fn steps(readme: &str) -> Vec<Step> {
    let start = readme
        .find("\n## Five-minute setup")
        .expect("README has a Five-minute setup section");
    let section = &readme[start + 1..];
    let end = section[3..].find("\n## ").map_or(section.len(), |e| e + 3);
    let section = &section[..end];

    let mut out = Vec::new();
    let mut lines = section.lines().peekable();
    let mut prose_before = String::new();
    while let Some(line) = lines.next() {
        let fence = line.trim_start();
        if let Some(lang) = fence.strip_prefix("```") {
            let body: Vec<&str> = lines
                .by_ref()
                .take_while(|l| !l.trim_start().starts_with("```"))
                .collect();
            match lang.trim() {
                "toml" => {
                    let path = prose_before
                        .split('`')
                        .skip(1)
                        .step_by(2)
                        .filter(|p| p.ends_with(".toml"))
                        .last()
                        .unwrap_or_else(|| {
                            panic!("no `file.toml` named before a toml block: {prose_before:?}")
                        })
                        .to_string();
                    out.push(Step::File {
                        path,
                        text: body.join("\n") + "\n",
                    });
                }
                "sh" => out.extend(commands(&body)),
                other => {
                    panic!("unexpected code block language {other:?} in the five-minute setup")
                }
            }
            prose_before.clear();
        } else if !line.trim().is_empty() {
            prose_before = line.to_string();
        }
    }
    out
}

/// The walk's substitutions, longest first so `/var/lib/updraftd` is not taken for
/// `/var/lib/updraft`.
struct Place {
    root: PathBuf,
    port: u16,
    vars: Vec<(String, String)>,
}

impl Place {
    fn apply(&self, s: &str) -> String {
        let root = self.root.to_str().unwrap();
        let addr = format!("127.0.0.1:{}", self.port);
        let mut s = s
            .replace("/var/lib/updraftd", &format!("{root}/var/lib/updraftd"))
            .replace("/var/lib/updraft", &format!("{root}/var/lib/updraft"))
            .replace("/etc/updraft", &format!("{root}/etc/updraft"))
            .replace("/run/updraft", &format!("{root}/run/updraft"))
            .replace("cloud.example.com:4433", &addr)
            .replace("0.0.0.0:4433", &addr)
            .replace("203.0.113.7", "127.0.0.1");
        for (k, v) in &self.vars {
            s = s.replace(k, v);
        }
        s
    }
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free UDP port")
        .port()
}

fn path_with_binaries() -> String {
    let dir: PathBuf = bin("updraftd").parent().unwrap().to_path_buf();
    assert!(bin("updraft-agent").exists());
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

fn check_lines(place: &Place, what: &str, line: &str, out: &[u8], patterns: &[String]) {
    let text = String::from_utf8_lossy(out);
    for p in patterns {
        let p = &place.apply(p);
        assert!(
            text.lines().any(|l| matches(p, l.trim())),
            "README: `{line}`: no line of its {what} matches `{p}`; it printed:\n{text}"
        );
    }
}

#[test]
fn pattern_matching_is_what_the_walk_assumes() {
    assert!(matches(
        "cloud (auto: ...)",
        "cloud (auto: daemon x connected)"
    ));
    assert!(matches("5891b5b5...f6be03  -", "5891b5b5aaaf6be03  -"));
    assert!(!matches("5891b5b5...f6be03  -", "5891b5b5aaaf6be03  x"));
    assert!(matches("ok", "ok"));
    assert!(!matches("ok", "ok!"));
    assert!(matches("a...b...c", "a1b2c"));
    assert!(!matches("a...b...c", "a1c2b"));
}

#[test]
fn five_minute_setup_runs_as_written() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let steps = steps(&readme);
    assert!(
        steps
            .iter()
            .filter(|s| matches!(s, Step::Run { .. }))
            .count()
            >= 6,
        "the five-minute setup lost its commands: {steps:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let work = dir.path().join("work");
    for d in ["etc/updraft", "run/updraft", "var/lib"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::create_dir_all(&work).unwrap();
    let mut place = Place {
        port: free_udp_port(),
        root,
        vars: Vec::new(),
    };
    let path = path_with_binaries();
    let socket = place.apply("/run/updraft/agent.sock");
    let mut services: Vec<Proc> = Vec::new();

    for step in &steps {
        match step {
            Step::File { path, text } => {
                let target = place.apply(path);
                std::fs::write(&target, place.apply(text))
                    .unwrap_or_else(|e| panic!("README: writing {path} as {target}: {e}"));
            }
            Step::Run {
                line,
                stdout,
                stderr,
            } => {
                let cmd_line = place.apply(line);
                let mut cmd = Command::new("sh");
                cmd.current_dir(&work)
                    .env("PATH", &path)
                    .env("UPDRAFT_AGENT__SOCKET", &socket);
                if let Some(service) = cmd_line.trim_end().strip_suffix('&') {
                    cmd.arg("-c").arg(format!("exec {service}"));
                    let name = if line.contains("updraftd") {
                        "updraftd"
                    } else {
                        "updraft-agent"
                    };
                    let mut proc = Proc::spawn(name, cmd);
                    wait_until_serving(&mut proc, name, Path::new(&socket));
                    services.push(proc);
                    continue;
                }
                let out: Output = cmd.arg("-c").arg(&cmd_line).output().expect("running sh");
                let logs: String = services
                    .iter()
                    .map(|s| format!("--- {} log:\n{}", s.name, s.log()))
                    .collect();
                assert!(
                    out.status.success(),
                    "README: `{line}` failed ({}):\nstdout: {}\nstderr: {}\n{logs}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                check_lines(&place, "stdout", line, &out.stdout, stdout);
                check_lines(&place, "stderr", line, &out.stderr, stderr);
                remember_outputs(&mut place, line, &out);
            }
        }
    }
    assert!(
        place.vars.iter().any(|(k, _)| k == "<token>"),
        "the walk never made a token"
    );
    for mut s in services {
        s.signal(nix::sys::signal::Signal::SIGTERM);
        s.wait_exit(Duration::from_secs(30));
    }
}

/// `ca init` prints the fingerprint the board pins; `token create` the token it spends.
fn remember_outputs(place: &mut Place, line: &str, out: &Output) {
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if line.contains("ca init") {
        place.vars.push(("<fingerprint>".into(), stdout));
    } else if line.contains("token create") {
        place.vars.push(("<token>".into(), stdout));
    }
}

fn wait_until_serving(proc: &mut Proc, name: &str, socket: &Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let serving = if name == "updraftd" {
            proc.log().contains("updraftd serving")
        } else {
            http(socket, "GET", "/v1/status", b"")
                .ok()
                .and_then(|r| serde_json::from_slice::<serde_json::Value>(&r.body).ok())
                .is_some_and(|s| s["clouds"][0]["connected"] == true)
        };
        if serving {
            return;
        }
        if let Ok(Some(status)) = proc.child.try_wait() {
            panic!(
                "README: {name} exited ({status}) instead of serving:\n{}",
                proc.log()
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "README: {name} did not serve within 30 s:\n{}",
            proc.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
