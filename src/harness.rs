//! Start a real daemon and a real agent in this process, on loopback, with throwaway
//! certificates: what the demo and the benchmarks build on.

use anyhow::Context;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use updraft_agent::config::{AgentConfig, AgentFile};
use updraft_agent::Agent;
use updraft_daemon::config::{DaemonConfig, DaemonFile};
use updraft_shared::tls::Identity;

/// Throwaway PKI files in a directory: `ca.pem ca.key server.pem server.key` and
/// `agent/agent.pem agent/agent.key` for agent id `board-1`.
#[derive(Debug, Clone)]
pub struct Pki {
    /// The directory.
    pub dir: PathBuf,
}

impl Pki {
    /// Creates the files in `dir` (server names `localhost` and `127.0.0.1`).
    pub fn create(dir: &Path) -> anyhow::Result<Self> {
        updraft_daemon::pki::ca_init(dir, &["localhost".into(), "127.0.0.1".into()])?;
        updraft_daemon::pki::cert_issue(
            dir,
            "board-1",
            &dir.join("agent"),
            updraft_daemon::pki::AGENT_VALIDITY,
        )?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// `[tls]` lines for the daemon.
    pub fn daemon_tls(&self) -> String {
        let d = self.dir.display();
        format!("[tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/server.pem\"\nkey = \"{d}/server.key\"\n")
    }

    /// `[tls]` lines for the agent.
    pub fn agent_tls(&self) -> String {
        let d = self.dir.display();
        format!("[tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/agent/agent.pem\"\nkey = \"{d}/agent/agent.key\"\n")
    }

    /// The agent's identity.
    pub fn agent_identity(&self) -> anyhow::Result<Identity> {
        Ok(Identity::load(
            &self.dir.join("ca.pem"),
            &self.dir.join("agent/agent.pem"),
            &self.dir.join("agent/agent.key"),
        )?)
    }

    /// The daemon's identity.
    pub fn daemon_identity(&self) -> anyhow::Result<Identity> {
        Ok(Identity::load(
            &self.dir.join("ca.pem"),
            &self.dir.join("server.pem"),
            &self.dir.join("server.key"),
        )?)
    }
}

/// A daemon serving in this process.
#[derive(Debug)]
pub struct DaemonHandle {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl DaemonHandle {
    /// Starts draining (like SIGTERM) and waits until the daemon has stopped.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.await?
    }
}

/// Starts a daemon on `127.0.0.1:0`. `extra` is TOML appended to the generated config
/// (top-level keys first, then `[tasks.*]` tables).
pub async fn start_daemon(
    pki: &Pki,
    state_dir: &Path,
    extra: &str,
) -> anyhow::Result<DaemonHandle> {
    let text = format!(
        "listen = \"127.0.0.1:0\"\nstate_dir = \"{}\"\n{extra}\n{}",
        state_dir.display(),
        pki.daemon_tls()
    );
    let path = state_dir.join("daemon.toml");
    let file: DaemonFile = toml::from_str(&text).context("harness daemon config")?;
    let config = DaemonConfig::from_file(file, &path)?;
    let endpoint = updraft_daemon::bind(&config)?;
    let addr = endpoint.local_addr()?;
    let (tx, rx) = oneshot::channel();
    let run = updraft_daemon::run(config, endpoint, async move {
        let _ = rx.await;
    });
    let task = tokio::spawn(async move {
        run.await?;
        Ok(())
    });
    Ok(DaemonHandle {
        addr,
        stop: Some(tx),
        task,
    })
}

/// An agent serving in this process.
#[derive(Debug)]
pub struct AgentHandle {
    /// The agent.
    pub agent: Arc<Agent>,
    /// Its API socket.
    pub socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl AgentHandle {
    /// Stops the agent and waits for it.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        Ok(self.task.await?)
    }

    /// A client for its socket.
    pub fn client(&self) -> updraft_agent::client::Client {
        updraft_agent::client::Client::new(&self.socket)
    }
}

/// Starts an agent with its socket and state in `state_dir`, connected to `daemons`.
/// `extra` is TOML appended to the generated config (top-level keys, `[link]`, `[tasks.*]`).
pub async fn start_agent(
    pki: &Pki,
    state_dir: &Path,
    daemons: &[SocketAddr],
    extra: &str,
) -> anyhow::Result<AgentHandle> {
    let socket = state_dir.join("agent.sock");
    let mut text = format!(
        "socket = \"{}\"\nstate_dir = \"{}\"\n",
        socket.display(),
        state_dir.display()
    );
    text.push_str(extra);
    text.push('\n');
    for d in daemons {
        text.push_str(&format!(
            "[[cloud]]\naddress = \"{d}\"\nserver_name = \"localhost\"\n"
        ));
    }
    text.push_str(&pki.agent_tls());
    let file: AgentFile = toml::from_str(&text).context("harness agent config")?;
    let config = AgentConfig::from_file(file, &state_dir.join("agent.toml"))?;
    let listener = updraft_agent::bind_socket(&config.socket)?;
    let agent = Agent::new(config, &pki.agent_identity()?)?;
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(updraft_agent::run(agent.clone(), listener, async move {
        let _ = rx.await;
    }));
    Ok(AgentHandle {
        agent,
        socket,
        stop: Some(tx),
        task,
    })
}

/// A NATS JetStream node's config for the benchmarks and tests: `sync_interval:
/// always`, file storage in `store`, and with `cluster` (its cluster name, route port
/// and every node's route URL) a member of a cluster.
pub fn nats_conf(
    server_name: &str,
    ports: NatsPorts,
    store: &Path,
    cluster: Option<(&str, &[String])>,
) -> String {
    let NatsPorts {
        client,
        route,
        monitor,
    } = ports;
    let mut conf = format!(
        "server_name: {server_name}\nlisten: 127.0.0.1:{client}\nhttp: 127.0.0.1:{monitor}\n\
         jetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n}}\n",
        store.display()
    );
    if let Some((name, routes)) = cluster {
        conf.push_str(&format!(
            "cluster {{\n  name: {name}\n  listen: 127.0.0.1:{route}\n  routes: [{}]\n}}\n",
            routes.join(", ")
        ));
    }
    conf
}

/// The loopback ports of one NATS node.
#[derive(Debug, Clone, Copy)]
pub struct NatsPorts {
    /// Where clients connect.
    pub client: u16,
    /// Where the other nodes of its cluster connect.
    pub route: u16,
    /// The monitoring port (`/healthz`).
    pub monitor: u16,
}

impl NatsPorts {
    /// Three free ports (bound, then let go).
    pub fn free() -> std::io::Result<Self> {
        let free = || -> std::io::Result<u16> {
            Ok(std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port())
        };
        Ok(Self {
            client: free()?,
            route: free()?,
            monitor: free()?,
        })
    }

    /// This node's route URL, as the others list it.
    pub fn route_url(&self) -> String {
        format!("nats-route://127.0.0.1:{}", self.route)
    }
}

/// The status code of `GET /healthz` on a NATS monitoring port (200 once JetStream is
/// ready), or `None` while it does not answer.
pub fn nats_health(monitor: u16) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", monitor)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .ok()?;
    s.write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split_whitespace().nth(1)?.parse().ok()
}
