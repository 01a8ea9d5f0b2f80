//! The `linkem` binary: start-up line, stdin commands and their replies, refusal of
//! non-loopback addresses.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;

/// The binary with piped stdio; stdout lines arrive on a channel so reads can time out.
struct Linkem {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Linkem {
    fn spawn(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_linkem"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            stdin,
            lines,
        }
    }

    fn line(&self) -> String {
        self.lines.recv_timeout(WAIT).expect("a line from linkem")
    }

    fn command(&mut self, cmd: &str) -> String {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.line()
    }
}

impl Drop for Linkem {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_change_the_running_link() {
    let server = EchoServer::start(true).await;
    let upstream = server.addr.to_string();
    let mut linkem = Linkem::spawn(&[
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &upstream,
        "--delay",
        "5ms",
        "--seed",
        "1",
    ]);
    let banner = linkem.line();
    let addr = banner
        .strip_prefix("listening ")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected banner {banner:?}"));
    let client = Client::connect(addr.parse().unwrap()).await;
    client.round_trip(b"hello").await;

    assert_eq!(linkem.command("blackhole on"), "ok");
    client.send(b"dropped").await;
    wait_until("the datagram to be blackholed", || {
        let stats: serde_json::Value = serde_json::from_str(&linkem.command("stats")).unwrap();
        stats["up"]["blackholed"] == 1
    })
    .await;
    assert_eq!(linkem.command("blackhole off"), "ok");
    client.round_trip(b"again").await;

    assert_eq!(linkem.command("up loss 10%"), "ok");
    assert_eq!(linkem.command("down bandwidth 2mbit"), "ok");
    let params: serde_json::Value = serde_json::from_str(&linkem.command("params")).unwrap();
    assert_eq!(params["up"]["loss"], 0.1);
    assert_eq!(params["down"]["loss"], 0.0);
    assert_eq!(params["down"]["bandwidth_bps"], 2_000_000);
    assert_eq!(params["up"]["delay"], "5ms");

    assert!(linkem.command("loss 2").starts_with("error: "));
    assert!(linkem.command("warp 9").starts_with("error: "));

    writeln!(linkem.stdin, "quit").unwrap();
    let status = linkem.child.wait().unwrap();
    assert!(status.success());
}

#[test]
fn refuses_non_loopback_addresses() {
    for args in [
        ["--listen", "0.0.0.0:0", "--upstream", "127.0.0.1:9"],
        ["--listen", "127.0.0.1:0", "--upstream", "192.168.1.1:9"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_linkem"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains("not a loopback address"), "{err}");
        assert!(out.stdout.is_empty());
    }
}
