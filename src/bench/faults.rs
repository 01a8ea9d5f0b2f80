//! `updraft bench faults`: delivery under a schedule of faults.
//!
//! Two daemons and N agents, each a real process of its own (this binary in a hidden
//! serve mode), each agent reaching each daemon through its own link emulator relay.
//! Every agent gets M tasks at a steady pace — a third synchronous, two thirds
//! detached — while the schedule kills, drains and restarts daemons, kills and
//! restarts an agent, blackholes an agent's links past its idle timeout, makes every
//! link lossy and slow, and rebinds the agents' sockets. Every task notes
//! `UPDRAFT_TASK_ID` and the process generation it ran in in one runs file, so the
//! figures are counted, not inferred: submitted, delivered (output checked against the
//! input), failed with an error the submitter saw, lost, and duplicate runs — those
//! explained by a process that was killed, and the rest.

use anyhow::{bail, Context};
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use updraft_agent::client::{body_bytes, Client, RunRequest};
use updraft_agent::ChannelBody;
use updraft_linkem::{LinkParams, Relay};

use crate::harness::Pki;

/// Daemons in the run: enough for a failover target while one is down.
const DAEMONS: usize = 2;
/// How long submissions are spread over; the fault schedule fits inside it.
const LOAD: Duration = Duration::from_secs(20);
/// How long every task sleeps between noting its run and echoing its input, so that
/// faults find tasks mid-run.
const TASK_SLEEP: &str = "0.3";
/// Bytes of input per task (checked against the output).
const INPUT_BYTES: usize = 4096;
/// Longest the run waits, after the load, for every task to be settled.
const SETTLE_LIMIT: Duration = Duration::from_secs(180);
/// Longest any process start or stop may take.
const PROCESS_LIMIT: Duration = Duration::from_secs(30);
/// The lossy phase: 20 % loss and 100 ms each way (200 ms RTT).
fn lossy() -> LinkParams {
    LinkParams {
        delay: Duration::from_millis(100),
        loss: 0.20,
        ..LinkParams::default()
    }
}

/// What `updraft bench faults` was asked for.
#[derive(Debug, Clone)]
pub struct Options {
    /// One JSON line instead of a table.
    pub json: bool,
    /// Agents (each its own process).
    pub agents: usize,
    /// Tasks per agent.
    pub tasks: usize,
    /// Keep the run's directory (configs, logs, journals, the runs file) and print it.
    pub keep: bool,
}

/// One step of the fault schedule, at an offset from the start of the load.
#[derive(Debug, Clone, Copy)]
enum Fault {
    KillDaemon(usize),
    StartDaemon(usize),
    DrainDaemon(usize),
    KillAgent(usize),
    StartAgent(usize),
    Blackhole(usize, bool),
    Lossy(bool),
    Rebind,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::KillDaemon(d) => write!(f, "SIGKILL daemon d{d}"),
            Fault::StartDaemon(d) => write!(f, "restart daemon d{d} on its address"),
            Fault::DrainDaemon(d) => write!(f, "SIGTERM daemon d{d} (drain), then restart it"),
            Fault::KillAgent(a) => write!(f, "SIGKILL agent a{a}"),
            Fault::StartAgent(a) => write!(f, "restart agent a{a} on its journal"),
            Fault::Blackhole(a, true) => write!(f, "blackhole agent a{a}'s links"),
            Fault::Blackhole(a, false) => write!(f, "restore agent a{a}'s links"),
            Fault::Lossy(true) => write!(f, "every link: 20 % loss, 200 ms RTT"),
            Fault::Lossy(false) => write!(f, "every link clean again"),
            Fault::Rebind => write!(f, "SIGUSR1 every agent (rebind its socket)"),
        }
    }
}

/// The schedule for `agents` agents: every fault the product promises to survive.
fn schedule(agents: usize) -> Vec<(Duration, Fault)> {
    let s = Duration::from_millis;
    let mut v = vec![
        (s(2_000), Fault::KillDaemon(0)),
        (s(5_000), Fault::StartDaemon(0)),
        (s(6_000), Fault::Blackhole(0, true)),
        (s(13_000), Fault::Blackhole(0, false)),
        (s(11_000), Fault::Lossy(true)),
        (s(13_500), Fault::Rebind),
        (s(16_000), Fault::Lossy(false)),
        (s(17_000), Fault::DrainDaemon(1)),
    ];
    if agents > 1 {
        v.push((s(8_000), Fault::KillAgent(1)));
        v.push((s(9_500), Fault::StartAgent(1)));
    }
    v.sort_by_key(|(at, _)| *at);
    v
}

/// The agent's link settings: a dead connection is noticed in 5 s, a blackhole (7 s)
/// outlasts that, and a task lost mid-run with no daemon left waits 8 s for one.
const AGENT_LINK: &str = "[link]\nidle_timeout = \"5s\"\nkeep_alive = \"300ms\"\n\
reconnect_min = \"100ms\"\nreconnect_max = \"1s\"\naccept_timeout = \"3s\"\n\
connect_timeout = \"3s\"\nfailover_wait = \"8s\"\n";

/// How one submission ended, as its submitter saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    /// The output matched the input.
    Delivered { id: String, placement: String },
    /// Output came back but differed from the input.
    Wrong { id: String },
    /// The task failed with an error reply (code).
    Failed { id: Option<String>, code: String },
    /// A synchronous request whose agent was killed under it: the submitter saw the
    /// connection break.
    Cut,
    /// Never accepted (the agent was down or refused it): not a submitted task.
    Refused,
    /// Accepted and then unaccounted for: unknown to the agent, or never settled.
    Lost { id: String, why: String },
}

/// The figures of one run.
#[derive(Debug, Default)]
struct Figures {
    offered: usize,
    submitted: usize,
    delivered: usize,
    delivered_cloud: usize,
    failed: BTreeMap<String, usize>,
    cut: usize,
    refused: usize,
    wrong: usize,
    lost: usize,
    lost_examples: Vec<String>,
    runs: usize,
    duplicates_after_kill: usize,
    duplicates_survived: usize,
    duplicate_examples: Vec<String>,
}

/// A daemon or agent process of this run, restartable on the same files.
struct Proc {
    name: String,
    config: PathBuf,
    log: PathBuf,
    role: &'static str,
    generation: u32,
    child: Option<Child>,
}

impl Proc {
    fn start(&mut self, write_config: &dyn Fn(u32) -> String) -> anyhow::Result<()> {
        self.generation += 1;
        std::fs::write(&self.config, write_config(self.generation))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let exe = std::env::current_exe().context("locating this program")?;
        let child = Command::new(exe)
            .arg(self.role)
            .arg("--config")
            .arg(&self.config)
            .env("UPDRAFT_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.name))?;
        self.child = Some(child);
        Ok(())
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(c) = &self.child {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig);
        }
    }

    async fn wait_exit(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + PROCESS_LIMIT;
        while let Some(c) = self.child.as_mut() {
            if c.try_wait()?.is_some() {
                self.child = None;
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within {PROCESS_LIMIT:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    async fn kill(&mut self) -> anyhow::Result<()> {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        self.wait_exit().await
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The run's processes and links.
struct World {
    dir: PathBuf,
    pki: Pki,
    runs: PathBuf,
    daemon_ports: Vec<u16>,
    daemons: Vec<Proc>,
    agents: Vec<Proc>,
    /// relays[agent][daemon]
    relays: Vec<Vec<Relay>>,
}

fn task_table(name: &str, runs: &Path, side: &str, offload: &str) -> String {
    format!(
        "[tasks.{name}]\ncommand = [\"sh\", \"-c\", \"echo \\\"$UPDRAFT_TASK_ID $SIDE\\\" >> {runs}; sleep {TASK_SLEEP}; cat\"]\nenv = {{ SIDE = \"{side}\", PATH = \"/usr/bin:/bin\" }}\ntimeout = \"60s\"\n{offload}",
        runs = runs.display()
    )
}

impl World {
    fn daemon_config(&self, d: usize, generation: u32) -> String {
        let side = format!("d{d}.{generation}");
        format!(
            "listen = \"127.0.0.1:{port}\"\nstate_dir = \"{dir}/d{d}\"\nmax_concurrent_tasks = 32\n\
max_queued_tasks = 256\nload_report_interval = \"200ms\"\nidle_timeout = \"5s\"\n\
drain_timeout = \"30s\"\n{tls}{work}{always}",
            port = self.daemon_ports[d],
            dir = self.dir.display(),
            tls = self.pki.daemon_tls(),
            work = task_table("work", &self.runs, &side, ""),
            always = task_table("work_always", &self.runs, &side, ""),
        )
    }

    fn agent_config(&self, a: usize, generation: u32) -> String {
        let side = format!("a{a}.{generation}");
        let d = self.dir.display();
        let clouds: String = self.relays[a]
            .iter()
            .map(|r| {
                format!(
                    "[[cloud]]\naddress = \"{}\"\nserver_name = \"localhost\"\n",
                    r.local_addr()
                )
            })
            .collect();
        format!(
            "socket = \"{d}/a{a}/agent.sock\"\nstate_dir = \"{d}/a{a}\"\npolicy = \"{d}/policy.toml\"\n\
max_local_concurrency = 4\n{AGENT_LINK}[journal]\nmax_running = 16\n{clouds}\
[tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/agent-{a}/agent.pem\"\nkey = \"{d}/agent-{a}/agent.key\"\n\
{work}{always}",
            work = task_table("work", &self.runs, &side, ""),
            always = task_table("work_always", &self.runs, &side, "offload = \"always\"\n"),
        )
    }

    fn start_daemon(&mut self, d: usize) -> anyhow::Result<()> {
        let mut p = std::mem::replace(&mut self.daemons[d], placeholder());
        let r = p.start(&|g| self.daemon_config(d, g));
        self.daemons[d] = p;
        r
    }

    fn start_agent(&mut self, a: usize) -> anyhow::Result<()> {
        let mut p = std::mem::replace(&mut self.agents[a], placeholder());
        let r = p.start(&|g| self.agent_config(a, g));
        self.agents[a] = p;
        r
    }

    fn client(&self, a: usize) -> Client {
        Client::new(self.dir.join(format!("a{a}/agent.sock")))
    }

    /// Waits until agent `a` reports every daemon connected.
    async fn wait_connected(&self, a: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + PROCESS_LIMIT;
        loop {
            if let Ok(resp) = self.client(a).get("/v1/status").await {
                if let Ok(body) = body_bytes(resp).await {
                    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                    let clouds = v["clouds"].as_array().cloned().unwrap_or_default();
                    if clouds.len() == DAEMONS && clouds.iter().all(|c| c["connected"] == true) {
                        return Ok(());
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("agent a{a} did not connect to every daemon within {PROCESS_LIMIT:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn apply(&mut self, fault: Fault) -> anyhow::Result<()> {
        use nix::sys::signal::Signal;
        match fault {
            Fault::KillDaemon(d) => self.daemons[d].kill().await?,
            Fault::StartDaemon(d) => self.start_daemon(d)?,
            Fault::DrainDaemon(d) => {
                self.daemons[d].signal(Signal::SIGTERM);
                self.daemons[d].wait_exit().await?;
                self.start_daemon(d)?;
            }
            Fault::KillAgent(a) => self.agents[a].kill().await?,
            Fault::StartAgent(a) => self.start_agent(a)?,
            Fault::Blackhole(a, on) => {
                for r in &self.relays[a] {
                    r.handle().set_blackhole(on);
                }
            }
            Fault::Lossy(on) => {
                let p = if on { lossy() } else { LinkParams::default() };
                for r in self.relays.iter().flatten() {
                    r.handle().set_both(p)?;
                }
            }
            Fault::Rebind => {
                for a in &self.agents {
                    a.signal(Signal::SIGUSR1);
                }
            }
        }
        Ok(())
    }

    /// Generations that were killed (not drained): `d0.1`, `a1.1`, ...
    fn killed(&self, schedule: &[(Duration, Fault)]) -> BTreeSet<String> {
        let mut gen: BTreeMap<String, u32> = BTreeMap::new();
        let mut killed = BTreeSet::new();
        for d in 0..self.daemons.len() {
            gen.insert(format!("d{d}"), 1);
        }
        for a in 0..self.agents.len() {
            gen.insert(format!("a{a}"), 1);
        }
        for (_, f) in schedule {
            let bump = |gen: &mut BTreeMap<String, u32>, k: String| {
                *gen.entry(k).or_default() += 1;
            };
            match *f {
                Fault::KillDaemon(d) => {
                    killed.insert(format!("d{d}.{}", gen[&format!("d{d}")]));
                }
                Fault::KillAgent(a) => {
                    killed.insert(format!("a{a}.{}", gen[&format!("a{a}")]));
                }
                Fault::StartDaemon(d) | Fault::DrainDaemon(d) => bump(&mut gen, format!("d{d}")),
                Fault::StartAgent(a) => bump(&mut gen, format!("a{a}")),
                _ => {}
            }
        }
        killed
    }
}

fn placeholder() -> Proc {
    Proc {
        name: String::new(),
        config: PathBuf::new(),
        log: PathBuf::new(),
        role: "",
        generation: 0,
        child: None,
    }
}

/// A port free on loopback now, for a daemon that must come back on the same one.
fn free_udp_port() -> anyhow::Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The input of task `j` of agent `a`: its own bytes, so a mixed-up output shows.
fn input_of(a: usize, j: usize) -> Bytes {
    let head = format!("agent {a} task {j}\n");
    let mut v = head.into_bytes();
    let mut x = (a as u64) << 32 | j as u64 | 1;
    while v.len() < INPUT_BYTES {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push(b'a' + (x % 26) as u8);
    }
    Bytes::from(v)
}

fn header<B>(resp: &hyper::Response<B>, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// One synchronous submission, to its end.
async fn submit_sync(client: Client, input: Bytes) -> Seen {
    let run = RunRequest {
        task: "work".into(),
        ..Default::default()
    };
    let resp = match client.run(&run, ChannelBody::full(input.clone())).await {
        Ok(r) => r,
        Err(e) => {
            // Refused when the agent could not be reached at all; cut when it was.
            let text = format!("{e:#}");
            return if text.contains("cannot reach the agent") {
                Seen::Refused
            } else {
                Seen::Cut
            };
        }
    };
    let id = header(&resp, "updraft-task-id");
    let placement = header(&resp, "updraft-placement").unwrap_or_default();
    let status = resp.status();
    let code = header(&resp, "updraft-error-code");
    let Ok(body) = body_bytes(resp).await else {
        return Seen::Cut;
    };
    match (status.as_u16(), id) {
        (200, Some(id)) if body == input => Seen::Delivered { id, placement },
        (200, Some(id)) => Seen::Wrong { id },
        (_, id) => Seen::Failed {
            id,
            code: code.unwrap_or_else(|| status.as_str().into()),
        },
    }
}

/// One detached submission: its id once accepted.
async fn submit_detached(client: &Client, task: &str, input: Bytes) -> Option<String> {
    let run = RunRequest {
        task: task.into(),
        detach: true,
        ..Default::default()
    };
    let resp = client.run(&run, ChannelBody::full(input)).await.ok()?;
    if resp.status() != 202 {
        return None;
    }
    let body = body_bytes(resp).await.ok()?;
    let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    v["id"].as_str().map(str::to_string)
}

/// Waits for a detached task to settle and fetches its output.
async fn collect_detached(
    world: &World,
    a: usize,
    id: &str,
    input: &Bytes,
    deadline: Instant,
) -> Seen {
    loop {
        let client = world.client(a);
        let state = match client.get(&format!("/v1/tasks/{id}?wait=true")).await {
            Ok(resp) if resp.status() == 404 => {
                return Seen::Lost {
                    id: id.into(),
                    why: "the agent does not know the id".into(),
                }
            }
            Ok(resp) => body_bytes(resp)
                .await
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok()),
            Err(_) => None,
        };
        if let Some(v) = state {
            match v["state"].as_str() {
                Some("done") => {
                    let placement = v["placement"].as_str().unwrap_or_default().to_string();
                    let out = match client.get(&format!("/v1/tasks/{id}/output")).await {
                        Ok(r) => body_bytes(r).await.ok(),
                        Err(_) => None,
                    };
                    return match out {
                        Some(out) if out == *input => Seen::Delivered {
                            id: id.into(),
                            placement,
                        },
                        Some(_) => Seen::Wrong { id: id.into() },
                        None => Seen::Lost {
                            id: id.into(),
                            why: "its output could not be fetched".into(),
                        },
                    };
                }
                Some("failed") => {
                    return Seen::Failed {
                        id: Some(id.into()),
                        code: v["error"]["code"].as_str().unwrap_or("failed").into(),
                    }
                }
                _ => {}
            }
        }
        if Instant::now() > deadline {
            return Seen::Lost {
                id: id.into(),
                why: format!("not settled within {SETTLE_LIMIT:?}"),
            };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs the benchmark.
pub async fn run(opts: Options) -> anyhow::Result<()> {
    if opts.agents == 0 || opts.tasks == 0 {
        bail!("--agents and --tasks must be at least 1");
    }
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().to_path_buf();
    let pki = Pki::create(&dir)?;
    for a in 0..opts.agents {
        updraft_daemon::pki::cert_issue(
            &dir,
            &format!("board-{a}"),
            &dir.join(format!("agent-{a}")),
            updraft_daemon::pki::AGENT_VALIDITY,
        )?;
        std::fs::create_dir_all(dir.join(format!("a{a}")))?;
    }
    for d in 0..DAEMONS {
        std::fs::create_dir_all(dir.join(format!("d{d}")))?;
    }
    std::fs::write(
        dir.join("policy.toml"),
        "default = \"auto\"\n\n[[rule]]\nname = \"to the cloud\"\nmatch = { names = [\"work\"] }\nplace = \"cloud\"\n",
    )?;
    let mut daemon_ports = Vec::new();
    for _ in 0..DAEMONS {
        daemon_ports.push(free_udp_port()?);
    }
    let mut relays = Vec::new();
    for a in 0..opts.agents {
        let mut row = Vec::new();
        for (d, port) in daemon_ports.iter().enumerate() {
            let target: SocketAddr = format!("127.0.0.1:{port}").parse()?;
            row.push(Relay::start(
                "127.0.0.1:0".parse()?,
                target,
                LinkParams::default(),
                (a * DAEMONS + d) as u64 + 1,
            )?);
        }
        relays.push(row);
    }
    let proc_of = |name: String, role: &'static str| Proc {
        config: dir.join(format!("{name}.toml")),
        log: dir.join(format!("{name}.log")),
        name,
        role,
        generation: 0,
        child: None,
    };
    let mut world = World {
        runs: dir.join("runs"),
        daemons: (0..DAEMONS)
            .map(|d| proc_of(format!("d{d}"), "bench-faults-daemon"))
            .collect(),
        agents: (0..opts.agents)
            .map(|a| proc_of(format!("a{a}"), "bench-faults-agent"))
            .collect(),
        dir,
        pki,
        daemon_ports,
        relays,
    };
    for d in 0..DAEMONS {
        world.start_daemon(d)?;
    }
    for a in 0..opts.agents {
        world.start_agent(a)?;
    }
    for a in 0..opts.agents {
        world.wait_connected(a).await?;
    }

    let plan = schedule(opts.agents);
    let world = Arc::new(tokio::sync::Mutex::new(world));
    let sockets: Vec<PathBuf> = {
        let w = world.lock().await;
        (0..opts.agents)
            .map(|a| w.dir.join(format!("a{a}/agent.sock")))
            .collect()
    };
    let started = Instant::now();
    let faults = {
        let world = world.clone();
        let plan = plan.clone();
        tokio::spawn(async move {
            for (at, fault) in plan {
                tokio::time::sleep_until((started + at).into()).await;
                world.lock().await.apply(fault).await?;
            }
            anyhow::Ok(())
        })
    };

    // Submissions: per agent, one task every LOAD / tasks, cycling sync `work`,
    // detached `work`, detached `work_always`.
    let detached: Arc<Mutex<Vec<(usize, String, Bytes)>>> = Arc::default();
    let mut sync = Vec::new();
    let mut refused_detached = 0;
    let pace = LOAD / opts.tasks as u32;
    for j in 0..opts.tasks {
        tokio::time::sleep_until((started + pace * j as u32).into()).await;
        for (a, socket) in sockets.iter().enumerate() {
            let client = Client::new(socket);
            let input = input_of(a, j);
            match j % 3 {
                0 => sync.push(tokio::spawn(submit_sync(client, input))),
                k => {
                    let task = if k == 1 { "work" } else { "work_always" };
                    match submit_detached(&client, task, input.clone()).await {
                        Some(id) => detached.lock().unwrap().push((a, id, input)),
                        None => refused_detached += 1,
                    }
                }
            }
        }
    }
    faults.await.context("fault schedule")??;

    let mut seen = Vec::new();
    for h in sync {
        seen.push(h.await?);
    }
    let deadline = Instant::now() + SETTLE_LIMIT;
    let detached = std::mem::take(&mut *detached.lock().unwrap());
    {
        let w = world.lock().await;
        for (a, id, input) in &detached {
            seen.push(collect_detached(&w, *a, id, input, deadline).await);
        }
    }
    let elapsed = started.elapsed();

    let w = world.lock().await;
    let mut f = Figures {
        offered: opts.agents * opts.tasks,
        refused: refused_detached,
        ..Default::default()
    };
    for s in &seen {
        match s {
            Seen::Refused => f.refused += 1,
            Seen::Cut => f.cut += 1,
            Seen::Delivered { placement, .. } => {
                f.delivered += 1;
                if placement == "cloud" {
                    f.delivered_cloud += 1;
                }
            }
            Seen::Wrong { .. } => f.wrong += 1,
            Seen::Failed { code, .. } => *f.failed.entry(code.clone()).or_default() += 1,
            Seen::Lost { id, why } => {
                f.lost += 1;
                if f.lost_examples.len() < 5 {
                    f.lost_examples.push(format!("{id}: {why}"));
                }
            }
        }
    }
    f.submitted = f.offered - f.refused;
    let killed = w.killed(&plan);
    let runs = std::fs::read_to_string(&w.runs).unwrap_or_default();
    let mut by_id: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for line in runs.lines() {
        if let Some((id, side)) = line.split_once(' ') {
            by_id.entry(id).or_default().push(side);
        }
    }
    f.runs = by_id.values().map(Vec::len).sum();
    let mut by_process: BTreeMap<&str, usize> = BTreeMap::new();
    for side in by_id.values().flatten() {
        *by_process.entry(side).or_default() += 1;
    }
    for (id, sides) in &by_id {
        if sides.len() < 2 {
            continue;
        }
        let extra = sides.len() - 1;
        if sides.iter().any(|s| killed.contains(*s)) {
            f.duplicates_after_kill += extra;
        } else {
            f.duplicates_survived += extra;
            if f.duplicate_examples.len() < 5 {
                f.duplicate_examples
                    .push(format!("{id}: {}", sides.join(", ")));
            }
        }
    }
    let failed: usize = f.failed.values().sum();
    if opts.json {
        println!(
            "{}",
            serde_json::json!({
                "agents": opts.agents,
                "daemons": DAEMONS,
                "tasks_per_agent": opts.tasks,
                "offered": f.offered,
                "submitted": f.submitted,
                "delivered": f.delivered,
                "delivered_cloud": f.delivered_cloud,
                "failed": f.failed,
                "cut_by_agent_kill": f.cut,
                "refused": f.refused,
                "wrong_output": f.wrong,
                "lost": f.lost,
                "runs": f.runs,
                "runs_by_process": by_process,
                "duplicate_runs_after_kill": f.duplicates_after_kill,
                "duplicate_runs_where_all_survived": f.duplicates_survived,
                "elapsed_s": elapsed.as_secs_f64(),
            })
        );
    } else {
        println!(
            "updraft bench faults: {} agents x {} tasks, {DAEMONS} daemons, every agent-daemon path through a link emulator",
            opts.agents, opts.tasks
        );
        println!("tasks: 1/3 sync `work` (cloud by a policy rule), 1/3 detached `work`, 1/3 detached `work_always` (offload = always); each sleeps {TASK_SLEEP} s mid-run");
        println!(
            "schedule (from the start of the {} s load):",
            LOAD.as_secs()
        );
        for (at, fault) in &plan {
            println!("  {:>5.1} s  {fault}", at.as_secs_f64());
        }
        println!();
        println!("offered            {:>6}", f.offered);
        println!(
            "refused            {:>6}   (not accepted: the agent was down)",
            f.refused
        );
        println!("submitted          {:>6}", f.submitted);
        println!(
            "delivered          {:>6}   ({} ran in the cloud; output checked against input)",
            f.delivered, f.delivered_cloud
        );
        println!("failed, told       {:>6}   {:?}", failed, f.failed);
        println!(
            "cut, told          {:>6}   (sync requests whose agent was killed under them)",
            f.cut
        );
        println!("wrong output       {:>6}", f.wrong);
        println!("lost               {:>6}", f.lost);
        println!(
            "runs               {:>6}   (of {} distinct tasks)",
            f.runs,
            by_id.len()
        );
        println!(
            "runs by process    {}",
            by_process
                .iter()
                .map(|(p, n)| format!("{p} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!(
            "duplicate runs     {:>6}   after a process was killed ({})",
            f.duplicates_after_kill,
            killed.iter().cloned().collect::<Vec<_>>().join(", ")
        );
        println!(
            "duplicate runs     {:>6}   where every process survived",
            f.duplicates_survived
        );
        println!("elapsed            {:>6.1} s", elapsed.as_secs_f64());
        for e in &f.lost_examples {
            println!("  lost: {e}");
        }
        for e in &f.duplicate_examples {
            println!("  duplicate: {e}");
        }
    }
    drop(w);
    let undelivered = f.lost > 0 || f.wrong > 0;
    if opts.keep || undelivered {
        let kept = tmp.keep();
        eprintln!(
            "run directory kept (configs, logs, journals, runs file): {}",
            kept.display()
        );
    }
    if undelivered {
        bail!(
            "{} task(s) lost and {} delivered with wrong output",
            f.lost,
            f.wrong
        );
    }
    Ok(())
}

/// `bench-faults-daemon`: `updraftd serve` on a config the benchmark wrote.
pub async fn serve_daemon(config: &Path) -> anyhow::Result<()> {
    let config = updraft_daemon::config::DaemonConfig::load(config)?;
    let endpoint = updraft_daemon::bind(&config)?;
    updraft_daemon::run(config, endpoint, updraft_shared::shutdown::terminated()).await?;
    Ok(())
}

/// `bench-faults-agent`: `updraft-agent serve` on a config the benchmark wrote.
pub async fn serve_agent(config: &Path) -> anyhow::Result<()> {
    let config = updraft_agent::config::AgentConfig::load(config)?;
    let identity =
        updraft_shared::tls::Identity::load(&config.tls_ca, &config.tls_cert, &config.tls_key)?;
    let listener = updraft_agent::bind_socket(&config.socket)?;
    let agent = updraft_agent::Agent::new(config, &identity)?;
    updraft_agent::run(agent, listener, updraft_shared::shutdown::terminated()).await;
    Ok(())
}
