//! `updraft demo`: two daemons and an agent in one process on loopback, over real QUIC
//! with mutual TLS and throwaway certificates, running a short scripted day of tasks
//! through the agent's real local API (HTTP on its Unix socket) and printing a live
//! table of where each task ran and why.
//!
//! The day is a list of [`Step`]s, each a list of [`Action`]s, so new scenes (battery,
//! CPU, link changes) are one more `Action` variant and a few lines in [`script`].
//! Every row carries what the script expects; a row that differs is flagged with a
//! `!` line instead of stopping the show, and the summary counts them.

use crate::harness::{self, AgentHandle, DaemonHandle, Pki};
use anyhow::Context;
use bytes::Bytes;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use updraft_agent::client::{body_bytes, Client, RunRequest};
use updraft_agent::http::{header_text_decode, ChannelBody};
use updraft_agent::placement::Where;
use updraft_agent::service::Agent;

/// Names the demo gives its daemons, in the order the agent lists them.
const DAEMON_NAMES: [&str; 2] = ["cloud-a", "cloud-b"];
/// Longest wait for one task's reply: a hang becomes an error row, not a stuck demo.
const TASK_LIMIT: Duration = Duration::from_secs(20);
/// Longest wait for the agent to connect to the daemons at the start.
const CONNECT_LIMIT: Duration = Duration::from_secs(10);
/// Longest wait for the agent to notice a change (load report, drain, disconnect).
/// Load reports come every 100 ms here, so this is many of them.
const NOTICE_LIMIT: Duration = Duration::from_secs(3);
/// How often the demo polls the agent's view of its daemons while waiting.
const POLL: Duration = Duration::from_millis(20);
/// Output width the table is laid out for (fits a 100-column terminal).
const WIDTH: usize = 99;

/// Daemon settings: two slots so loads read `n/2`, frequent load reports so the agent
/// sees drains and load at once, and a drain limit well above the longest task.
const DAEMON_SETTINGS: &str = r#"
max_concurrent_tasks = 2
load_report_interval = "100ms"
drain_timeout = "5s"
"#;

/// The daemon's catalog. `count-lines` is missing on purpose: the cloud runs only what
/// its own catalog names.
const DAEMON_TASKS: &str = r#"
[tasks.echo]
builtin = "echo"

[tasks.sha256]
builtin = "sha256"

[tasks.spin]
builtin = "spin"
allow_args = true

[tasks.wc]
command = ["wc", "-c"]
timeout = "10s"

[tasks.grep-errors]
command = ["grep", "-c"]
allow_args = true
timeout = "10s"

[tasks.infer]
builtin = "spin"
"#;

/// Agent settings: short link timers so the failure scenes take well under a second.
const AGENT_SETTINGS: &str = r#"
max_local_concurrency = 2

[link]
keep_alive = "200ms"
idle_timeout = "1s"
connect_timeout = "500ms"
accept_timeout = "1s"
reconnect_min = "100ms"
reconnect_max = "500ms"
"#;

/// The agent's catalog: the daemon's tasks plus two that never leave the board.
const AGENT_TASKS: &str = r#"
[tasks.echo]
builtin = "echo"

[tasks.sha256]
builtin = "sha256"

[tasks.spin]
builtin = "spin"
allow_args = true

[tasks.wc]
command = ["wc", "-c"]
timeout = "10s"

[tasks.grep-errors]
command = ["grep", "-c"]
allow_args = true
timeout = "10s"

[tasks.infer]
builtin = "spin"
offload = "always"
tags = ["model"]

[tasks.private-log]
command = ["wc", "-l"]
offload = "never"
tags = ["private"]
timeout = "10s"

[tasks.count-lines]
command = ["wc", "-l"]
timeout = "10s"
"#;

// ---------------------------------------------------------------------------------
// The script.
// ---------------------------------------------------------------------------------

/// One scene of the day.
struct Step {
    title: &'static str,
    actions: Vec<Action>,
}

/// What a step does.
enum Action {
    /// Submit one after another; each row prints as it finishes.
    Sequential(Vec<Job>),
    /// Submit all at once; rows print in the order they finish.
    Concurrent(Vec<Job>),
    /// Start `long`, find the daemon running it, drain that daemon (as on SIGTERM)
    /// while it runs, then submit `after`, which must go to another daemon.
    DrainWhileBusy { long: Job, after: Vec<Job> },
    /// Drain every daemon still up and wait until the agent has no usable daemon.
    DrainAll,
}

/// Where a row is expected to end up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Cloud,
    Local,
    /// Refused before placement (no placement header).
    Nowhere,
}

impl Place {
    fn as_str(self) -> &'static str {
        match self {
            Self::Cloud => "cloud",
            Self::Local => "local",
            Self::Nowhere => "-",
        }
    }
}

/// How a row is expected to end.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Want {
    Exit(i32),
    Error(&'static str),
}

/// One submission and what the script expects of it.
#[derive(Debug, Clone)]
struct Job {
    task: &'static str,
    input: Bytes,
    args: Vec<String>,
    where_: Option<Where>,
    place: Place,
    want: Want,
    reason_has: Option<&'static str>,
    output: Option<Bytes>,
}

impl Job {
    fn new(task: &'static str, input: impl Into<Bytes>) -> Self {
        Self {
            task,
            input: input.into(),
            args: Vec::new(),
            where_: None,
            place: Place::Cloud,
            want: Want::Exit(0),
            reason_has: None,
            output: None,
        }
    }
    fn local(mut self) -> Self {
        self.place = Place::Local;
        self
    }
    fn at(mut self, w: Where) -> Self {
        self.where_ = Some(w);
        self
    }
    fn arg(mut self, a: &str) -> Self {
        self.args.push(a.to_string());
        self
    }
    fn exit(mut self, code: i32) -> Self {
        self.want = Want::Exit(code);
        self
    }
    fn refused(mut self, code: &'static str) -> Self {
        self.place = Place::Nowhere;
        self.want = Want::Error(code);
        self
    }
    fn because(mut self, text: &'static str) -> Self {
        self.reason_has = Some(text);
        self
    }
    fn output(mut self, out: impl Into<Bytes>) -> Self {
        self.output = Some(out.into());
        self
    }
    fn echoed(self) -> Self {
        let input = self.input.clone();
        self.output(input)
    }
}

/// The scripted day.
fn script() -> Vec<Step> {
    let mib = pseudo_random(1 << 20);
    let hello = "hello from board-1\n";
    let log = sample_log(200, 3);
    let quiet_log = sample_log(120, 0);
    let readings = pseudo_random(64 << 10);
    vec![
        Step {
            title: "Cloud up: automatic placement offloads",
            actions: vec![Action::Sequential(vec![
                Job::new("echo", hello).echoed().because("auto:"),
                Job::new("sha256", mib.clone()).because("auto:"),
                Job::new("spin", "50").because("auto:"),
                Job::new("wc", readings.clone()).output(format!("{}\n", readings.len())),
            ])],
        },
        Step {
            title: "The submitter decides: where=local / where=cloud win",
            actions: vec![Action::Sequential(vec![
                Job::new("sha256", mib.clone())
                    .at(Where::Local)
                    .local()
                    .because("where=local"),
                Job::new("spin", "50")
                    .at(Where::Cloud)
                    .because("where=cloud"),
            ])],
        },
        Step {
            title: "Private data stays on the board (offload = \"never\")",
            actions: vec![Action::Sequential(vec![Job::new(
                "private-log",
                log.clone(),
            )
            .local()
            .because("offload = never")
            .output("200\n")])],
        },
        Step {
            title: "Arguments, exit codes, and a task the cloud does not list",
            actions: vec![Action::Sequential(vec![
                Job::new("spin", "").arg("120").output("spun 120 ms\n"),
                Job::new("grep-errors", log.clone())
                    .arg("ERROR")
                    .output("3\n"),
                Job::new("grep-errors", quiet_log)
                    .arg("ERROR")
                    .exit(1)
                    .output("0\n"),
                Job::new("count-lines", log.clone())
                    .local()
                    .because("cloud failed before the task started")
                    .output("200\n"),
            ])],
        },
        Step {
            title: "A burst of eight at once (each daemon runs two at a time, queues the rest)",
            actions: vec![Action::Concurrent(vec![
                Job::new("spin", "").arg("150"),
                Job::new("spin", "").arg("150"),
                Job::new("spin", "").arg("150"),
                Job::new("spin", "").arg("150"),
                Job::new("sha256", mib.clone()),
                Job::new("sha256", mib.clone()),
                Job::new("echo", hello).echoed(),
                Job::new("wc", readings.clone()).output(format!("{}\n", readings.len())),
            ])],
        },
        Step {
            title: "A daemon drains mid-task (SIGTERM): its task finishes, new work fails over",
            actions: vec![Action::DrainWhileBusy {
                long: Job::new("spin", "").arg("600").output("spun 600 ms\n"),
                after: vec![
                    Job::new("echo", hello).echoed().because("auto:"),
                    Job::new("sha256", mib.clone()).because("auto:"),
                ],
            }],
        },
        Step {
            title: "The whole cloud is gone: the board carries on alone",
            actions: vec![
                Action::DrainAll,
                Action::Sequential(vec![
                    Job::new("echo", hello)
                        .echoed()
                        .local()
                        .because("no daemon connected"),
                    Job::new("sha256", mib)
                        .local()
                        .because("no daemon connected"),
                    Job::new("private-log", log).local().output("200\n"),
                    Job::new("infer", "80").refused("cloud_unavailable"),
                    Job::new("spin", "50")
                        .at(Where::Cloud)
                        .refused("cloud_unavailable"),
                ]),
            ],
        },
    ]
}

/// `n` bytes that do not compress (xorshift), the same on every run.
fn pseudo_random(n: usize) -> Bytes {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out.into()
}

/// A sensor log of `lines` lines, `errors` of them containing `ERROR`.
fn sample_log(lines: usize, errors: usize) -> Bytes {
    let mut s = String::new();
    for i in 0..lines {
        let level = if errors > 0 && i % (lines / errors) == lines / errors / 2 {
            "ERROR"
        } else {
            "info"
        };
        s.push_str(&format!(
            "t={i:04} {level} temp_c={}.{} rpm={}\n",
            40 + i % 7,
            i % 10,
            1200 + (i * 37) % 300
        ));
    }
    s.into()
}

// ---------------------------------------------------------------------------------
// Running it.
// ---------------------------------------------------------------------------------

/// Runs the demo.
pub async fn run() -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("updraft-demo-")
        .tempdir()
        .context("creating a temporary directory")?;
    let table = Arc::new(Table::new());
    table.banner();
    let mut demo = Demo::start(dir.path(), table.clone()).await?;
    for (i, step) in script().into_iter().enumerate() {
        table.step(i + 1, step.title);
        for action in step.actions {
            demo.act(action).await;
        }
    }
    demo.finish().await;
    Ok(())
}

/// A daemon the demo started.
struct Daemon {
    name: &'static str,
    addr: SocketAddr,
    handle: Option<DaemonHandle>,
}

/// Everything that is up.
struct Demo {
    table: Arc<Table>,
    daemons: Vec<Daemon>,
    agent: AgentHandle,
    client: Client,
}

impl Demo {
    async fn start(dir: &Path, table: Arc<Table>) -> anyhow::Result<Self> {
        let pki = Pki::create(dir).context("creating throwaway certificates")?;
        table.event(&format!(
            "throwaway CA, daemon certificate (localhost) and agent certificate (board-1) in {}",
            dir.display()
        ));
        let mut daemons = Vec::new();
        for name in DAEMON_NAMES {
            let state = dir.join(name);
            std::fs::create_dir_all(&state)
                .with_context(|| format!("creating {}", state.display()))?;
            let handle =
                harness::start_daemon(&pki, &state, &format!("{DAEMON_SETTINGS}{DAEMON_TASKS}"))
                    .await
                    .with_context(|| format!("starting daemon {name}"))?;
            table.event(&format!(
                "{name}: updraftd listening on udp {} (QUIC, mutual TLS, 2 slots)",
                handle.addr
            ));
            daemons.push(Daemon {
                name,
                addr: handle.addr,
                handle: Some(handle),
            });
        }
        table.set_names(
            daemons
                .iter()
                .map(|d| (d.addr.to_string(), d.name))
                .collect(),
        );
        let state = dir.join("board-1");
        std::fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
        let addrs: Vec<SocketAddr> = daemons.iter().map(|d| d.addr).collect();
        let agent = harness::start_agent(
            &pki,
            &state,
            &addrs,
            &format!("{AGENT_SETTINGS}{AGENT_TASKS}"),
        )
        .await
        .context("starting the agent")?;
        table.event(&format!(
            "board-1: updraft-agent API on {}",
            agent.socket.display()
        ));
        let client = agent.client();
        let demo = Self {
            table,
            daemons,
            agent,
            client,
        };
        let t0 = Instant::now();
        let all = demo
            .wait_for(CONNECT_LIMIT, |a| {
                a.uplink()
                    .status()
                    .iter()
                    .all(|s| s.connected && s.load.is_some())
            })
            .await;
        if all {
            demo.table.event(&format!(
                "board-1 connected to {} in {} ms",
                DAEMON_NAMES.join(" and "),
                t0.elapsed().as_millis()
            ));
        } else if demo.agent.agent.uplink().pick().is_some() {
            demo.table
                .warn("only some daemons connected in time; carrying on with those");
        } else {
            demo.table.warn(&format!(
                "no daemon connected within {CONNECT_LIMIT:?}; the cloud rows below will differ"
            ));
        }
        Ok(demo)
    }

    /// Polls the agent until `cond` holds or `limit` passes. True if it held.
    async fn wait_for(&self, limit: Duration, cond: impl Fn(&Agent) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if cond(&self.agent.agent) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn act(&mut self, action: Action) {
        match action {
            Action::Sequential(jobs) => {
                for job in jobs {
                    submit(&self.client, &self.table, job).await;
                }
            }
            Action::Concurrent(jobs) => {
                let mut set = tokio::task::JoinSet::new();
                for job in jobs {
                    let (client, table) = (self.client.clone(), self.table.clone());
                    set.spawn(async move { submit(&client, &table, job).await });
                }
                while set.join_next().await.is_some() {}
            }
            Action::DrainWhileBusy { long, after } => self.drain_while_busy(long, after).await,
            Action::DrainAll => self.drain_all().await,
        }
    }

    async fn drain_while_busy(&mut self, long: Job, after: Vec<Job>) {
        // Start from quiet daemons so the one that reports a running task is ours.
        let busy = |s: &updraft_agent::uplink::LinkStatus| {
            s.load.is_some_and(|l| l.running + l.queued > 0)
        };
        if !self
            .wait_for(NOTICE_LIMIT, |a| !a.uplink().status().iter().any(busy))
            .await
        {
            self.table
                .warn("daemons still report load from earlier tasks");
        }
        let long_task = long.task;
        let runner = {
            let (client, table) = (self.client.clone(), self.table.clone());
            tokio::spawn(async move { submit(&client, &table, long).await })
        };
        let mut victim = None;
        let deadline = Instant::now() + NOTICE_LIMIT;
        while victim.is_none() && Instant::now() < deadline {
            victim = self
                .agent
                .agent
                .uplink()
                .status()
                .iter()
                .position(busy)
                .filter(|&i| self.daemons.get(i).is_some_and(|d| d.handle.is_some()));
            if victim.is_none() {
                tokio::time::sleep(POLL).await;
            }
        }
        let i = match victim {
            Some(i) => i,
            None => {
                self.table.warn(&format!(
                    "no daemon reported running `{long_task}`; draining the first one still up"
                ));
                match self.daemons.iter().position(|d| d.handle.is_some()) {
                    Some(i) => i,
                    None => {
                        let _ = runner.await;
                        return;
                    }
                }
            }
        };
        let name = self.daemons[i].name;
        let handle = self.daemons[i].handle.take().expect("victim is up");
        self.table.event(&format!(
            "{name} is running `{long_task}`; draining {name} now (as on SIGTERM)"
        ));
        let drain = tokio::spawn(async move {
            let t = Instant::now();
            (handle.shutdown().await, t.elapsed())
        });
        let noticed = self
            .wait_for(NOTICE_LIMIT, |a| {
                a.uplink()
                    .status()
                    .get(i)
                    .is_some_and(|s| s.draining || !s.connected)
            })
            .await;
        if noticed {
            self.table.event(&format!(
                "board-1 heard {name} is draining: new tasks go to the other daemon"
            ));
        } else {
            self.table
                .warn(&format!("board-1 did not notice {name} draining in time"));
        }
        for job in after {
            let row = submit(&self.client, &self.table, job).await;
            if row.reason.contains(name) {
                self.table.warn(&format!(
                    "that task went to {name}, which was draining; expected failover"
                ));
            }
        }
        match runner.await {
            Ok(row) if row.place == Place::Cloud && !row.reason.contains(name) => {
                self.table.warn(&format!(
                    "`{long_task}` did not report running on {name}; the drain may not have overlapped it"
                ));
            }
            Ok(_) => {}
            Err(e) => self
                .table
                .warn(&format!("`{long_task}` submitter failed: {e}")),
        }
        Self::report_drain(&self.table, name, drain.await);
    }

    fn report_drain(
        table: &Table,
        name: &str,
        r: Result<(anyhow::Result<()>, Duration), tokio::task::JoinError>,
    ) {
        match r {
            Ok((Ok(()), took)) => table.event(&format!(
                "{name} drained and stopped after {} ms",
                took.as_millis()
            )),
            Ok((Err(e), _)) => table.warn(&format!("{name} stopped with an error: {e:#}")),
            Err(e) => table.warn(&format!("{name} shutdown task failed: {e}")),
        }
    }

    async fn drain_all(&mut self) {
        for d in &mut self.daemons {
            if let Some(handle) = d.handle.take() {
                self.table
                    .event(&format!("draining {} (as on SIGTERM)", d.name));
                let t = Instant::now();
                let r = handle.shutdown().await;
                let name = d.name;
                Self::report_drain(&self.table, name, Ok((r, t.elapsed())));
            }
        }
        if self
            .wait_for(NOTICE_LIMIT, |a| a.uplink().pick().is_none())
            .await
        {
            self.table
                .event("board-1 has no usable daemon; it keeps reconnecting with backoff");
        } else {
            self.table
                .warn("board-1 still sees a usable daemon after every daemon stopped");
        }
    }

    /// Stops whatever is still up and prints the summary.
    async fn finish(mut self) {
        for d in &mut self.daemons {
            if let Some(handle) = d.handle.take() {
                let t = Instant::now();
                let r = handle.shutdown().await;
                let name = d.name;
                self.table.event(&format!("{name} stopped"));
                if let Err(e) = r {
                    self.table.warn(&format!(
                        "{name} stopped with an error after {:?}: {e:#}",
                        t.elapsed()
                    ));
                }
            }
        }
        let status = self.agent.agent.status_json();
        let Demo { table, agent, .. } = self;
        let t = Instant::now();
        match agent.shutdown().await {
            Ok(()) => table.event(&format!(
                "board-1 stopped in {} ms",
                t.elapsed().as_millis()
            )),
            Err(e) => table.warn(&format!("the agent stopped with an error: {e:#}")),
        }
        table.summary(&status);
    }
}

/// What one submission came to, for the summary and for checks by the caller.
#[derive(Debug, Clone)]
struct Row {
    place: Place,
    /// Reason (or error), daemon addresses replaced by their names.
    reason: String,
    daemon: Option<&'static str>,
    surprise: bool,
}

/// Submits one job through the agent's socket, prints its row, checks it.
async fn submit(client: &Client, table: &Table, job: Job) -> Row {
    let req = RunRequest {
        task: job.task.to_string(),
        args: job.args.clone(),
        where_: job.where_,
        detach: false,
    };
    let t = Instant::now();
    let got = tokio::time::timeout(TASK_LIMIT, async {
        let resp = client
            .run(&req, ChannelBody::full(job.input.clone()))
            .await?;
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let ok = resp.status().is_success();
        let place = match header(updraft_agent::api::H_PLACEMENT).as_deref() {
            Some("cloud") => Place::Cloud,
            Some("local") => Place::Local,
            _ => Place::Nowhere,
        };
        let reason = header(updraft_agent::api::H_REASON).unwrap_or_default();
        let exit = header(updraft_agent::api::H_EXIT_CODE).and_then(|v| v.parse::<i32>().ok());
        let stderr = header(updraft_agent::api::H_STDERR_TAIL)
            .map(|s| header_text_decode(&s))
            .unwrap_or_default();
        let code = header(updraft_agent::api::H_ERROR_CODE);
        let body = body_bytes(resp).await?;
        let outcome = if ok {
            match exit {
                Some(c) => Ok(c),
                None => Err((
                    "no_exit_code".to_string(),
                    "reply had no updraft-exit-code header".to_string(),
                )),
            }
        } else {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let code = v["code"]
                .as_str()
                .map(str::to_string)
                .or(code)
                .unwrap_or_else(|| "unknown".into());
            let message = v["error"].as_str().map_or_else(
                || String::from_utf8_lossy(&body).into_owned(),
                str::to_string,
            );
            Err((code, message))
        };
        anyhow::Ok(Reply {
            place,
            reason,
            outcome,
            stderr,
            output: body,
        })
    })
    .await;
    let reply = match got {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Reply::failed("api_error", format!("{e:#}")),
        Err(_) => Reply::failed(
            "demo_timeout",
            format!("no reply within {TASK_LIMIT:?}; the demo moved on"),
        ),
    };
    table.row(&job, &reply, t.elapsed())
}

/// A reply as read from the API.
struct Reply {
    place: Place,
    reason: String,
    /// Exit code, or (error code, message).
    outcome: Result<i32, (String, String)>,
    stderr: String,
    output: Bytes,
}

impl Reply {
    fn failed(code: &str, message: String) -> Self {
        Self {
            place: Place::Nowhere,
            reason: String::new(),
            outcome: Err((code.to_string(), message)),
            stderr: String::new(),
            output: Bytes::new(),
        }
    }
}

// ---------------------------------------------------------------------------------
// Printing.
// ---------------------------------------------------------------------------------

/// The live table: rows and events, printed as they happen, and the tally.
struct Table {
    start: Instant,
    /// Daemon address → demo name, so reasons read `cloud-a`, not `127.0.0.1:40123`.
    names: Mutex<Vec<(String, &'static str)>>,
    rows: Mutex<Vec<Row>>,
    warnings: Mutex<usize>,
}

impl Table {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            names: Mutex::new(Vec::new()),
            rows: Mutex::new(Vec::new()),
            warnings: Mutex::new(0),
        }
    }

    fn set_names(&self, names: Vec<(String, &'static str)>) {
        *self.names.lock().expect("names lock") = names;
    }

    fn rename(&self, text: &str) -> String {
        let mut text = text.to_string();
        for (addr, name) in self.names.lock().expect("names lock").iter() {
            text = text.replace(addr.as_str(), name);
        }
        text
    }

    fn clock(&self) -> String {
        format!("{:.2}s", self.start.elapsed().as_secs_f64())
    }

    fn print(&self, lines: &[String]) {
        let mut out = std::io::stdout().lock();
        for l in lines {
            let _ = writeln!(out, "{}", l.trim_end());
        }
        let _ = out.flush();
    }

    fn banner(&self) {
        self.print(&[
            "Updraft demo: two cloud daemons and one board agent in this process, on loopback,"
                .into(),
            "over QUIC with mutual TLS. Every task goes through the agent's local API (HTTP on"
                .into(),
            "its Unix socket), exactly as a program on the board would submit it.".into(),
            "(The services log to stderr; `2>/dev/null` or UPDRAFT_LOG=warn shows the table alone.)"
                .into(),
            String::new(),
        ]);
    }

    fn step(&self, n: usize, title: &str) {
        let head = format!("-- {n}. {title} ");
        let fill = WIDTH.saturating_sub(head.chars().count());
        self.print(&[
            String::new(),
            format!("{head}{}", "-".repeat(fill)),
            format!(
                "{:>6} {:<17} {:>7} {:<5} {:>5} {:<6} {}",
                "time", "task", "input", "where", "ms", "result", "reason"
            ),
        ]);
    }

    /// An event between rows: `   1.23s * text`.
    fn event(&self, text: &str) {
        let prefix = format!("{:>6} * ", self.clock());
        self.print(&indent_wrap(&prefix, &self.rename(text)));
    }

    /// A line flagging something the script did not expect.
    fn warn(&self, text: &str) {
        *self.warnings.lock().expect("warnings lock") += 1;
        let prefix = format!("{:>6} ! ", self.clock());
        self.print(&indent_wrap(&prefix, &self.rename(text)));
    }

    /// Prints one task row (and `!` lines for whatever differs from the script).
    fn row(&self, job: &Job, reply: &Reply, took: Duration) -> Row {
        let reason = self.rename(&reply.reason);
        let (result, mut text) = match &reply.outcome {
            Ok(code) => (format!("exit {code}"), reason.clone()),
            Err((code, message)) => {
                let message = self.rename(message);
                let text = if reason.is_empty() {
                    format!("{code}: {message}")
                } else {
                    format!("{code}: {message} [placed: {reason}]")
                };
                ("ERROR".to_string(), text)
            }
        };
        let stderr = reply.stderr.trim();
        if !stderr.is_empty() {
            text.push_str(&format!(" [stderr: {stderr}]"));
        }
        let mut task = job.task.to_string();
        if !job.args.is_empty() {
            task.push(' ');
            task.push_str(&job.args.join(" "));
        }
        let first = format!(
            "{:>6} {:<17} {:>7} {:<5} {:>5} {:<6} ",
            self.clock(),
            task,
            human_bytes(job.input.len()),
            reply.place.as_str(),
            took.as_millis(),
            result
        );
        let mut lines = indent_wrap(&first, &text);
        let surprises = check(job, reply, &reason);
        for s in &surprises {
            lines.push(format!("{:>6} ! {s}", ""));
        }
        self.print(&lines);
        let daemon = (reply.place == Place::Cloud)
            .then(|| {
                DAEMON_NAMES
                    .into_iter()
                    .find(|n| reason.contains(&format!("daemon {n}")))
            })
            .flatten();
        let row = Row {
            place: reply.place,
            reason: text,
            daemon,
            surprise: !surprises.is_empty(),
        };
        self.rows.lock().expect("rows lock").push(row.clone());
        row
    }

    fn summary(&self, status: &serde_json::Value) {
        let rows = self.rows.lock().expect("rows lock").clone();
        let count = |p: Place| rows.iter().filter(|r| r.place == p).count();
        let by_daemon: Vec<String> = DAEMON_NAMES
            .iter()
            .map(|n| {
                let k = rows.iter().filter(|r| r.daemon == Some(*n)).count();
                format!("{n} {k}")
            })
            .collect();
        let surprises = rows.iter().filter(|r| r.surprise).count();
        let warnings = *self.warnings.lock().expect("warnings lock");
        let mut lines = vec![
            String::new(),
            format!("-- Summary {}", "-".repeat(WIDTH - 11)),
            format!(
                "{} tasks in {:.1}s: cloud {} ({}, not named in the reason {}), local {}, refused {}",
                rows.len(),
                self.start.elapsed().as_secs_f64(),
                count(Place::Cloud),
                by_daemon.join(", "),
                count(Place::Cloud) - rows.iter().filter(|r| r.daemon.is_some()).count(),
                count(Place::Local),
                count(Place::Nowhere),
            ),
        ];
        lines.push(if surprises + warnings == 0 {
            "every row and event went as the script expected".into()
        } else {
            format!(
                "{surprises} rows and {warnings} events differed from the script (see the ! lines)"
            )
        });
        lines.push("board-1's view of its daemons at the end (from its status):".into());
        for c in status["clouds"].as_array().into_iter().flatten() {
            let addr = c["address"].as_str().unwrap_or("?");
            let state = match (c["connected"].as_bool(), c["draining"].as_bool()) {
                (Some(true), Some(true)) => "connected, draining",
                (Some(true), _) => "connected",
                (_, Some(true)) => "disconnected, was draining",
                _ => "disconnected",
            };
            let err = c["last_error"]
                .as_str()
                .map_or(String::new(), |e| format!("; last error: {e}"));
            let prefix = format!("  {:<8} ", self.rename(addr));
            lines.extend(indent_wrap(&prefix, &format!("{state}{err}")));
        }
        self.print(&lines);
    }
}

/// What differs from the script, one line each.
fn check(job: &Job, reply: &Reply, reason: &str) -> Vec<String> {
    let mut out = Vec::new();
    if reply.place != job.place {
        out.push(format!(
            "expected placement {}, got {}",
            job.place.as_str(),
            reply.place.as_str()
        ));
    }
    match (&job.want, &reply.outcome) {
        (Want::Exit(w), Ok(g)) if w == g => {}
        (Want::Error(w), Err((g, _))) if w == g => {}
        (Want::Exit(w), Ok(g)) => out.push(format!("expected exit {w}, got exit {g}")),
        (Want::Exit(w), Err((g, _))) => out.push(format!("expected exit {w}, got error {g}")),
        (Want::Error(w), Ok(g)) => out.push(format!("expected error {w}, got exit {g}")),
        (Want::Error(w), Err((g, _))) => out.push(format!("expected error {w}, got {g}")),
    }
    if let Some(want) = job.reason_has {
        if reply.outcome.is_ok() && !reason.contains(want) {
            out.push(format!("expected the reason to mention `{want}`"));
        }
    }
    if let (Some(want), Ok(_)) = (&job.output, &reply.outcome) {
        if *want != reply.output {
            out.push(format!(
                "output differs: expected {}, got {}",
                human_bytes(want.len()),
                human_bytes(reply.output.len())
            ));
        }
    }
    out
}

/// `prefix` then `text` wrapped to [`WIDTH`], continuation lines indented to the
/// text's column.
fn indent_wrap(prefix: &str, text: &str) -> Vec<String> {
    let col = prefix.chars().count();
    let room = WIDTH.saturating_sub(col).max(20);
    let mut lines = Vec::new();
    let mut cur = String::new();
    for word in text.split_whitespace() {
        let mut word = word.to_string();
        // Words longer than a line (paths) are cut rather than overflowing.
        while word.chars().count() > room {
            if !cur.is_empty() {
                lines.push(std::mem::take(&mut cur));
            }
            let head: String = word.chars().take(room).collect();
            word = word.chars().skip(room).collect();
            lines.push(head);
        }
        let need = cur.chars().count() + usize::from(!cur.is_empty()) + word.chars().count();
        if need > room && !cur.is_empty() {
            lines.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(&word);
    }
    if !cur.is_empty() || lines.is_empty() {
        lines.push(cur);
    }
    lines
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            if i == 0 {
                format!("{prefix}{l}")
            } else {
                format!("{}{l}", " ".repeat(col))
            }
        })
        .collect()
}

fn human_bytes(n: usize) -> String {
    const KIB: usize = 1 << 10;
    const MIB: usize = 1 << 20;
    if n >= MIB {
        format!("{:.1} MiB", n as f64 / MIB as f64)
    } else if n >= KIB {
        format!("{:.0} KiB", n as f64 / KIB as f64)
    } else {
        format!("{n} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_keeps_width_and_indent() {
        let prefix = " ".repeat(52);
        let lines = indent_wrap(&prefix, &"word ".repeat(40));
        assert!(lines.len() > 1);
        for l in &lines {
            assert!(l.chars().count() <= WIDTH, "{l:?}");
            assert!(l.starts_with(&prefix));
        }
        let long = indent_wrap("> ", &"x".repeat(300));
        assert!(long.iter().all(|l| l.chars().count() <= WIDTH));
    }

    #[test]
    fn sample_log_has_the_errors_it_claims() {
        let log = sample_log(200, 3);
        let text = std::str::from_utf8(&log).unwrap();
        assert_eq!(text.lines().count(), 200);
        assert_eq!(text.lines().filter(|l| l.contains("ERROR")).count(), 3);
        assert!(!std::str::from_utf8(&sample_log(120, 0))
            .unwrap()
            .contains("ERROR"));
    }

    #[test]
    fn scripted_tasks_exist_in_the_agent_catalog() {
        let agent: toml::Value = toml::from_str(AGENT_TASKS).unwrap();
        for step in script() {
            for action in step.actions {
                let jobs = match action {
                    Action::Sequential(j) | Action::Concurrent(j) => j,
                    Action::DrainWhileBusy { long, after } => {
                        let mut j = after;
                        j.push(long);
                        j
                    }
                    Action::DrainAll => Vec::new(),
                };
                for j in jobs {
                    assert!(agent["tasks"].get(j.task).is_some(), "{}", j.task);
                }
            }
        }
    }
}
