//! Cluster mode end to end: real `updraftd` replicas sharing a real three-node NATS
//! JetStream cluster (`sync_interval: always`, R3), agents as in-process QUIC
//! connections with real certificates. Every test task appends `ID PPID start|end`
//! to one O_APPEND log (PPID is the replica that ran it), so runs are counted, not
//! guessed. Crashes are SIGKILL of the replica and of its task processes (what a
//! machine or pod dying does); pauses are SIGSTOP.

mod common;

use common::nats::Nats;
use common::wire::*;
use common::*;
use nix::sys::signal::Signal;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use updraft_proto::{ReplyHeader, Trailer};
use updraft_shared::wire::FrameReader;

/// Longest any single wait may take before it counts as a hang.
const WAIT: Duration = Duration::from_secs(60);

/// One scenario at a time: each runs three NATS nodes and up to three replicas, and
/// on two cores several at once would starve heartbeats into takeovers no test asked
/// for.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Replicas sharing one NATS cluster, and the run log their tasks write.
struct Replicas {
    dir: tempfile::TempDir,
    nats: Nats,
    replicas: Vec<Option<Proc>>,
    addrs: Vec<String>,
    log: PathBuf,
    gate: PathBuf,
    ack_wait: String,
    cluster_extra: String,
}

/// The catalog every replica has. `logged` echoes its input; `gated` reads its input,
/// then waits for the gate file before echoing it; `stream` writes 40 numbered lines
/// over about two seconds.
fn tasks(log: &Path, gate: &Path) -> String {
    let (l, g) = (log.display(), gate.display());
    format!(
        r#"[tasks.logged]
command = ["sh", "-c", "echo \"$UPDRAFT_TASK_ID $PPID start\" >> {l}; cat; echo \"$UPDRAFT_TASK_ID $PPID end\" >> {l}"]
[tasks.gated]
command = ["sh", "-c", "echo \"$UPDRAFT_TASK_ID $PPID start\" >> {l}; in=$(cat); while [ ! -e {g} ]; do sleep 0.02; done; printf %s \"$in\"; echo \"$UPDRAFT_TASK_ID $PPID end\" >> {l}"]
timeout = "120s"
[tasks.stream]
command = ["sh", "-c", "echo \"$UPDRAFT_TASK_ID $PPID start\" >> {l}; cat >/dev/null; i=0; while [ $i -lt 40 ]; do i=$((i+1)); echo line $i; sleep 0.05; done; echo \"$UPDRAFT_TASK_ID $PPID end\" >> {l}"]
timeout = "120s"
[tasks.pure]
builtin = "echo"
idempotent = true
[tasks.count]
command = ["sh", "-c", "echo \"$UPDRAFT_TASK_ID $PPID start\" >> {l}; wc -c; echo \"$UPDRAFT_TASK_ID $PPID end\" >> {l}"]
max_input = "8MiB"
"#
    )
}

impl Replicas {
    /// NATS and `n` replicas, each with `slots` task slots and an `ack_wait` of 4 s.
    fn start(n: usize, slots: usize) -> Self {
        Self::start_with(n, slots, "4s", "")
    }

    /// Like [`start`](Self::start) with this `ack_wait`, and `cluster_extra` lines in
    /// `[cluster]`.
    fn start_with(n: usize, slots: usize, ack_wait: &str, cluster_extra: &str) -> Self {
        let nats = Nats::start();
        let dir = tempfile::tempdir().unwrap();
        make_pki(dir.path());
        let log = dir.path().join("runs.log");
        let gate = dir.path().join("gate");
        let mut r = Self {
            dir,
            nats,
            replicas: Vec::new(),
            addrs: Vec::new(),
            log,
            gate,
            ack_wait: ack_wait.to_string(),
            cluster_extra: cluster_extra.to_string(),
        };
        for i in 0..n {
            let (p, addr) = r.spawn(i, "127.0.0.1:0", slots);
            r.replicas.push(Some(p));
            r.addrs.push(addr);
        }
        r
    }

    fn spawn(&self, i: usize, listen: &str, slots: usize) -> (Proc, String) {
        let extra = format!(
            "max_concurrent_tasks = {slots}\n[cluster]\nnats = {}\nserver_id = {i}\nreplicas = 3\nack_wait = \"{}\"\n{}{}",
            self.nats.urls_toml(),
            self.ack_wait,
            self.cluster_extra,
            tasks(&self.log, &self.gate)
        );
        // The CA key signs enrollments on every replica.
        start_daemon_tls(
            self.dir.path(),
            &format!("r{i}"),
            listen,
            &extra,
            "ca_key = \"pki/ca.key\"\n",
        )
    }

    /// Replica `i`'s config file, for `updraftd` commands.
    fn config(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("r{i}.toml"))
    }

    fn pid(&self, i: usize) -> i32 {
        self.replicas[i].as_ref().expect("replica running").pid()
    }

    /// SIGKILLs replica `i` and every task process it started, as a machine dying
    /// would: stopped first, so nothing it runs can finish in between.
    fn crash(&mut self, i: usize) {
        let pid = self.pid(i);
        let p = self.replicas[i].take().unwrap();
        p.signal(Signal::SIGSTOP);
        for child in descendants(pid) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child), Signal::SIGKILL);
        }
        p.signal(Signal::SIGKILL);
        let mut p = p;
        p.wait_exit(WAIT);
    }

    fn agent(&self, cn: &str) -> quinn::ClientConfig {
        client_config(self.dir.path(), cn)
    }

    async fn connect(
        &self,
        ep: &quinn::Endpoint,
        cfg: &quinn::ClientConfig,
        i: usize,
    ) -> quinn::Connection {
        tokio::time::timeout(
            WAIT,
            ep.connect_with(cfg.clone(), self.addrs[i].parse().unwrap(), "localhost")
                .unwrap(),
        )
        .await
        .expect("connecting within the wait limit")
        .expect("connecting to a replica")
    }

    /// The run log: for each task id, the PPIDs of its starts and of its ends.
    fn runs(&self) -> HashMap<String, (Vec<i32>, Vec<i32>)> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut runs: HashMap<String, (Vec<i32>, Vec<i32>)> = HashMap::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let [id, ppid, what] = f[..] else { continue };
            let e = runs.entry(id.to_string()).or_default();
            let ppid = ppid.parse().unwrap_or(0);
            match what {
                "start" => e.0.push(ppid),
                "end" => e.1.push(ppid),
                _ => {}
            }
        }
        runs
    }

    fn wait_starts(&self, id: &str, n: usize) -> Vec<i32> {
        wait_for(&format!("{n} start(s) of {id}"), WAIT, || {
            let r = self.runs();
            let s = &r.get(id)?.0;
            (s.len() >= n).then(|| s.clone())
        })
    }

    fn replica_of(&self, ppid: i32) -> Option<usize> {
        (0..self.replicas.len())
            .find(|&i| self.replicas[i].as_ref().is_some_and(|p| p.pid() == ppid))
    }

    fn open_gate(&self) {
        std::fs::write(&self.gate, b"").unwrap();
    }
}

/// Every process below `pid`, from /proc.
fn descendants(pid: i32) -> Vec<i32> {
    let mut parent_of = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let ppid: i32 = after
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        parent_of.push((p, ppid));
    }
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for &(c, pp) in &parent_of {
            if pp == p {
                out.push(c);
                frontier.push(c);
            }
        }
    }
    out
}

fn endpoint() -> quinn::Endpoint {
    quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap()
}

async fn send_task(
    conn: &quinn::Connection,
    id: &str,
    task: &str,
    input: &[u8],
) -> FrameReader<quinn::RecvStream> {
    let (mut send, recv) = conn.open_bi().await.expect("opening a task stream");
    let _ = send
        .write_all(&request_bytes(id, task, Some(input.len() as u64), input))
        .await;
    let _ = send.finish();
    FrameReader::new(recv)
}

async fn run_task(
    conn: &quinn::Connection,
    id: &str,
    task: &str,
    input: &[u8],
) -> (Vec<u8>, Trailer) {
    let mut reader = send_task(conn, id, task, input).await;
    assert_eq!(
        read_reply(&mut reader, WAIT).await,
        ReplyHeader::Accepted,
        "task {id}"
    );
    read_result(&mut reader, WAIT).await
}

/// Scenario 1: three replicas, 50 agents × 20 tasks, each agent (an in-process
/// connection) on one replica, then a real agent process with all three in its
/// `[[cloud]]` list: every result right, every task exactly one start and one end, and
/// each replica ran a share of the work (the work queue spreads it, whoever received
/// it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_agents_twenty_tasks_each_run_once_spread_over_three_replicas() {
    if !common::nats::available() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let r = Replicas::start(3, 2);
    let mut jobs = Vec::new();
    for a in 0..50 {
        let cfg = r.agent(&format!("board-{a}"));
        let ep = endpoint();
        let conn = r.connect(&ep, &cfg, a % 3).await;
        jobs.push(tokio::spawn(async move {
            for t in 0..20 {
                let id = format!("a{a}-t{t}");
                let input = format!("input of {id}");
                let (out, trailer) = run_task(&conn, &id, "logged", input.as_bytes()).await;
                assert_eq!(out, input.as_bytes(), "{id}");
                assert_eq!(trailer.exit_code, Some(0), "{id}: {trailer:?}");
            }
            ep.close(0u32.into(), b"");
        }));
    }
    for j in jobs {
        j.await.unwrap();
    }
    // And a real agent process with the three replicas in its `[[cloud]]` list.
    let addrs: Vec<&str> = r.addrs.iter().map(String::as_str).collect();
    let (_agent, socket) = start_agent_clouds(
        r.dir.path(),
        &addrs,
        "[tasks.logged]\ncommand = [\"cat\"]\noffload = \"always\"\n",
    );
    wait_for("the agent to connect to all three replicas", WAIT, || {
        let s = agent_status(&socket)?;
        let clouds = s["clouds"].as_array()?;
        (clouds.len() == 3 && clouds.iter().all(|c| c["connected"] == true)).then_some(())
    });
    for t in 0..20 {
        let input = format!("agent task {t}");
        let reply = http(&socket, "POST", "/v1/tasks/logged", input.as_bytes()).unwrap();
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        assert_eq!(reply.header("updraft-placement"), Some("cloud"));
        assert_eq!(reply.body, input.as_bytes());
    }
    let runs = r.runs();
    assert_eq!(runs.len(), 1020);
    let mut per_replica = [0usize; 3];
    for (id, (starts, ends)) in &runs {
        assert_eq!(starts.len(), 1, "{id} started {} times", starts.len());
        assert_eq!(ends.len(), 1, "{id} ended {} times", ends.len());
        per_replica[r.replica_of(ends[0]).expect("ran on a replica")] += 1;
    }
    for (i, n) in per_replica.iter().enumerate() {
        assert!(
            *n > 0,
            "replica {i} ran none of the 1000 tasks: {per_replica:?}"
        );
    }
    eprintln!("tasks run per replica: {per_replica:?}");
}

/// Scenario 4: an agent that restarts and replays 200 finished task ids to another
/// replica gets 200 results and starts nothing new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_finished_ids_replayed_elsewhere_run_nothing_again() {
    if !common::nats::available() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let r = Replicas::start(2, 2);
    let cfg = r.agent("board-r");
    let ep = endpoint();
    let conn = r.connect(&ep, &cfg, 0).await;
    let mut first = Vec::new();
    for t in 0..200 {
        let id = format!("d{t}");
        first.push(run_task(&conn, &id, "logged", id.as_bytes()).await);
    }
    ep.close(0u32.into(), b"restart");
    let ep = endpoint();
    let conn = r.connect(&ep, &cfg, 1).await;
    for (t, want) in first.iter().enumerate() {
        let id = format!("d{t}");
        let got = run_task(&conn, &id, "logged", id.as_bytes()).await;
        assert_eq!(&got, want, "{id}: the replay is the first result");
    }
    let runs = r.runs();
    assert_eq!(runs.len(), 200);
    assert!(
        runs.values().all(|(s, e)| s.len() == 1 && e.len() == 1),
        "a replay ran a task again"
    );
    // The idempotent fast path never touches the store: it runs where it lands.
    let (out, trailer) = run_task(&conn, "p1", "pure", b"pure").await;
    assert_eq!((out.as_slice(), trailer.exit_code), (&b"pure"[..], Some(0)));
    ep.close(0u32.into(), b"");
}

/// Scenario 2: kill -9 the replica running long tasks. Their work messages come back
/// after `ack_wait` and run elsewhere; agents whose front died retry on another
/// replica and join. Every task completes, none is lost, none ends twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_worker_s_tasks_complete_elsewhere_once() {
    if !common::nats::available() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let mut r = Replicas::start(3, 3);
    let ids: Vec<String> = (0..6).map(|t| format!("long{t}")).collect();
    let mut streams = Vec::new();
    let mut eps = Vec::new();
    for (t, id) in ids.iter().enumerate() {
        let cfg = r.agent("board-k");
        let ep = endpoint();
        let front = t % 3;
        let conn = r.connect(&ep, &cfg, front).await;
        let mut reader = send_task(&conn, id, "gated", id.as_bytes()).await;
        assert_eq!(read_reply(&mut reader, WAIT).await, ReplyHeader::Accepted);
        streams.push((front, conn, reader));
        eps.push(ep);
    }
    for id in &ids {
        r.wait_starts(id, 1);
    }
    // The replica running the most of them dies.
    let runs = r.runs();
    let mut count = [0usize; 3];
    for id in &ids {
        count[r.replica_of(runs[id].0[0]).unwrap()] += 1;
    }
    let victim = (0..3).max_by_key(|&i| count[i]).unwrap();
    let moved: Vec<&String> = ids
        .iter()
        .filter(|id| r.replica_of(runs[*id].0[0]) == Some(victim))
        .collect();
    r.crash(victim);
    for id in &moved {
        r.wait_starts(id, 2);
    }
    r.open_gate();
    let cfg = r.agent("board-k");
    for (t, (front, conn, mut reader)) in streams.into_iter().enumerate() {
        let id = &ids[t];
        let result = if front == victim {
            // The front died with the connection: retry the id on a live replica.
            drop(reader);
            drop(conn);
            let ep = endpoint();
            let conn = r.connect(&ep, &cfg, (victim + 1) % 3).await;
            let got = run_task(&conn, id, "gated", id.as_bytes()).await;
            eps.push(ep);
            got
        } else {
            read_result(&mut reader, WAIT).await
        };
        assert_eq!(result.0, id.as_bytes(), "{id}: {:?}", result.1);
        assert_eq!(result.1.exit_code, Some(0), "{id}");
    }
    let runs = r.runs();
    for id in &ids {
        let (starts, ends) = &runs[id];
        assert_eq!(
            ends.len(),
            1,
            "{id} ended {} times (starts {starts:?})",
            ends.len()
        );
        let want = if moved.contains(&id) { 2 } else { 1 };
        assert_eq!(starts.len(), want, "{id}");
    }
    assert!(!moved.is_empty());
}

/// Scenario 3: kill -9 the replica relaying a task's output mid-stream (not the one
/// running it): the agent retries on another replica and gets the whole output,
/// from the results stream, and the task ran once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_relay_costs_a_retry_not_a_second_run() {
    if !common::nats::available() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let mut r = Replicas::start(3, 2);
    let cfg = r.agent("board-s");
    let ep = endpoint();
    let conn = r.connect(&ep, &cfg, 0).await;
    let mut first = send_task(&conn, "s1", "stream", b"").await;
    assert_eq!(read_reply(&mut first, WAIT).await, ReplyHeader::Accepted);
    let worker = r.replica_of(r.wait_starts("s1", 1)[0]).unwrap();
    // The relay under test is a replica that does not run the task: a retry of the
    // id through it joins the run and relays its output.
    let relay = (worker + 1) % 3;
    let ep2 = endpoint();
    let conn2 = r.connect(&ep2, &cfg, relay).await;
    let mut joined = send_task(&conn2, "s1", "stream", b"").await;
    assert_eq!(read_reply(&mut joined, WAIT).await, ReplyHeader::Accepted);
    let frame = next_frame(&mut joined, WAIT).await;
    assert_eq!(
        frame.kind,
        updraft_proto::FrameKind::Data,
        "output arrives through the relay"
    );
    r.crash(relay);
    let other = (0..3).find(|&i| i != relay).unwrap();
    let ep3 = endpoint();
    let conn3 = r.connect(&ep3, &cfg, other).await;
    let (out, trailer) = run_task(&conn3, "s1", "stream", b"").await;
    let want: String = (1..=40).map(|i| format!("line {i}\n")).collect();
    assert_eq!(String::from_utf8_lossy(&out), want, "the whole output");
    assert_eq!(trailer.exit_code, Some(0));
    assert_eq!(r.runs()["s1"].0.len(), 1, "no second run");
    if relay != 0 {
        let (out0, _) = read_result(&mut first, WAIT).await;
        assert_eq!(out0, out, "the first stream got the same output");
    }
    drop((ep, ep2, ep3));
}

/// Scenario 6: a worker paused (SIGSTOP) past its ack deadline loses the task to
/// another replica; resumed (SIGCONT), it finishes too, and its late result is
/// dropped. At most two starts, exactly one recorded result: a pause can repeat a
/// side effect (README, "Running more than one daemon").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_worker_may_start_twice_but_one_result_is_recorded() {
    if !common::nats::available() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let r = Replicas::start(3, 2);
    let cfg = r.agent("board-p");
    let ep = endpoint();
    let conn = r.connect(&ep, &cfg, 0).await;
    let mut first = send_task(&conn, "p1", "gated", b"paused").await;
    assert_eq!(read_reply(&mut first, WAIT).await, ReplyHeader::Accepted);
    let worker = r.replica_of(r.wait_starts("p1", 1)[0]).unwrap();
    // Follow the task through a replica that is not the one paused.
    let front = if worker == 0 { 1 } else { 0 };
    let ep2 = endpoint();
    let conn2 = r.connect(&ep2, &cfg, front).await;
    let mut reader = send_task(&conn2, "p1", "gated", b"paused").await;
    assert_eq!(read_reply(&mut reader, WAIT).await, ReplyHeader::Accepted);
    let paused = r.replicas[worker].as_ref().unwrap();
    paused.signal(Signal::SIGSTOP);
    let starts = r.wait_starts("p1", 2);
    assert_ne!(
        r.replica_of(starts[1]),
        Some(worker),
        "taken over elsewhere"
    );
    paused.signal(Signal::SIGCONT);
    r.open_gate();
    let (out, trailer) = read_result(&mut reader, WAIT).await;
    assert_eq!(
        (out.as_slice(), trailer.exit_code),
        (&b"paused"[..], Some(0))
    );
    wait_for("the paused worker to drop its late result", WAIT, || {
        paused
            .log()
            .contains("a late result was dropped")
            .then_some(())
    });
    let runs = r.runs();
    assert_eq!(runs["p1"].0.len(), 2, "at most two starts");
    // Exactly one result is recorded: a later retry gets the same one, and runs nothing.
    let ep3 = endpoint();
    let conn3 = r.connect(&ep3, &cfg, 2).await;
    assert_eq!(
        run_task(&conn3, "p1", "gated", b"paused").await,
        (out, trailer)
    );
    assert_eq!(r.runs()["p1"].0.len(), 2);
    drop((first, ep, ep2, ep3));
}

/// Scenario 5: kill -9 one NATS node under load: nothing is lost (store calls are
/// retried while JetStream moves its leaders). Then kill all three and start them
/// again: every task acknowledged before is still there, replayed without a run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_nodes_lost_under_load_lose_no_acknowledged_task() {
    if !common::nats::available() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    // A NATS node's leader elections take seconds: an ack_wait shorter than that
    // would count the store's pause as the worker's (scenario 6).
    let mut r = Replicas::start_with(2, 2, "15s", "");
    let cfg = r.agent("board-n");
    let mut eps = Vec::new();
    let mut conns = Vec::new();
    for i in 0..4 {
        let ep = endpoint();
        conns.push(r.connect(&ep, &cfg, i % 2).await);
        eps.push(ep);
    }
    let load = |conns: Vec<quinn::Connection>, from: usize| {
        conns
            .into_iter()
            .enumerate()
            .map(|(c, conn)| {
                tokio::spawn(async move {
                    let mut done = Vec::new();
                    for t in 0..25 {
                        let id = format!("n{}-{c}-{t}", from);
                        let (out, trailer) = run_task(&conn, &id, "logged", id.as_bytes()).await;
                        assert_eq!(out, id.as_bytes(), "{id}: {trailer:?}");
                        assert_eq!(trailer.exit_code, Some(0), "{id}: {trailer:?}");
                        done.push(id);
                    }
                    done
                })
            })
            .collect::<Vec<_>>()
    };
    let jobs = load(conns.clone(), 0);
    wait_for("some tasks to finish before a NATS node dies", WAIT, || {
        (r.runs().len() >= 20).then_some(())
    });
    r.nats.kill(1);
    let mut acknowledged = Vec::new();
    for j in jobs {
        acknowledged.extend(j.await.unwrap());
    }
    assert_eq!(acknowledged.len(), 100);
    let runs = r.runs();
    for id in &acknowledged {
        assert_eq!(runs[id].1.len(), 1, "{id} ended {:?}", runs[id].1);
    }
    // All three nodes die and come back on the same stores.
    r.nats.start_node(1);
    for i in 0..3 {
        r.nats.kill(i);
    }
    for i in 0..3 {
        r.nats.start_node(i);
    }
    for i in 0..3 {
        r.nats.wait_ready(i);
    }
    for id in &acknowledged {
        let (out, trailer) = run_task(&conns[0], id, "logged", id.as_bytes()).await;
        assert_eq!(out, id.as_bytes(), "{id} after the restart: {trailer:?}");
    }
    let runs = r.runs();
    assert!(
        acknowledged.iter().all(|id| runs[id].0.len() == 1),
        "a task acknowledged before the restart ran again"
    );
    drop(eps);
}

/// Scenario 7: behind a plain 4-tuple balancer (`tests/common/udp_balancer.rs`), an
/// agent whose port changes lands on another replica, which does not know its
/// connection: the agent reconnects and retries the id, and the retry is
/// deduplicated (the task runs once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_change_behind_a_four_tuple_balancer_costs_a_deduplicated_retry() {
    if !common::nats::available() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let r = Replicas::start(2, 2);
    let backends: Vec<std::net::SocketAddr> = r.addrs.iter().map(|a| a.parse().unwrap()).collect();
    let lb = common::udp_balancer::UdpBalancer::start(&backends)
        .await
        .unwrap();
    let mut cfg = r.agent("board-m");
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(Duration::from_secs(3).try_into().unwrap()))
        .keep_alive_interval(Some(Duration::from_millis(500)));
    cfg.transport_config(std::sync::Arc::new(transport));
    let ep = endpoint();
    let conn = ep
        .connect_with(cfg.clone(), lb.addr(), "localhost")
        .unwrap()
        .await
        .expect("connecting through the balancer");
    let mut first = send_task(&conn, "m1", "gated", b"moved").await;
    assert_eq!(read_reply(&mut first, WAIT).await, ReplyHeader::Accepted);
    r.wait_starts("m1", 1);
    let before = lb
        .backend_of(ep.local_addr().unwrap())
        .expect("a flow for the client");
    // The client's port changes; its packets now reach the other replica.
    lb.pin(1 - before);
    ep.rebind(std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
        .unwrap();
    let closed = tokio::time::timeout(WAIT, conn.closed())
        .await
        .expect("the moved connection ends");
    eprintln!("the moved connection ended: {closed}");
    let conn = ep
        .connect_with(cfg, lb.addr(), "localhost")
        .unwrap()
        .await
        .expect("reconnecting through the balancer");
    assert_eq!(lb.backend_of(ep.local_addr().unwrap()), Some(1 - before));
    let mut retry = send_task(&conn, "m1", "gated", b"moved").await;
    assert_eq!(read_reply(&mut retry, WAIT).await, ReplyHeader::Accepted);
    r.open_gate();
    let (out, trailer) = read_result(&mut retry, WAIT).await;
    assert_eq!(
        (out.as_slice(), trailer.exit_code),
        (&b"moved"[..], Some(0))
    );
    let runs = r.runs();
    assert_eq!((runs["m1"].0.len(), runs["m1"].1.len()), (1, 1), "ran once");
    drop(first);
}

/// The fleet is shared: an agent connected to one replica is listed by another, and
/// revoked through another it is cut off where it is connected and refused by every
/// replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_shows_the_fleet_and_refuses_a_revoked_agent() {
    if !common::nats::available() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let r = Replicas::start(2, 1);
    let cfg = r.agent("board-f");
    let ep = endpoint();
    let conn = r.connect(&ep, &cfg, 0).await;
    let other = r.dir.path().join("r1.toml");
    let agents = |id: &str| {
        let out = updraftd(&[
            "agents",
            "--json",
            "--id",
            id,
            "--config",
            other.to_str().unwrap(),
        ]);
        out.status
            .success()
            .then(|| serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap())
    };
    let seen = wait_for(
        "replica 1 to list the agent connected to replica 0",
        WAIT,
        || {
            let a = agents("board-f")?;
            (a["connections"] == 1).then_some(a)
        },
    );
    assert_eq!(seen["connected_to"], 0, "{seen}");
    let out = updraftd(&[
        "agent",
        "revoke",
        "board-f",
        "--config",
        other.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Replica 0 closes the connection it holds, with CLOSE_REVOKED (3).
    let closed = tokio::time::timeout(WAIT, conn.closed())
        .await
        .expect("closed in time");
    match closed {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, 3u32.into(), "{c:?}");
        }
        other => panic!("closed with {other:?}"),
    }
    // Neither replica takes the certificate again.
    for i in 0..2 {
        let ep = endpoint();
        let refused = match ep
            .connect_with(cfg.clone(), r.addrs[i].parse().unwrap(), "localhost")
            .unwrap()
            .await
        {
            Ok(c) => tokio::time::timeout(WAIT, c.closed())
                .await
                .expect("closed after the handshake"),
            Err(e) => e,
        };
        assert!(
            matches!(&refused, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == 3u32.into()),
            "replica {i}: {refused:?}"
        );
    }
}

/// An input bigger than a work message carries: announced, it runs on the replica that
/// received it, as on a single daemon; unannounced, it is refused with `too_large`
/// and a message saying to announce it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_too_big_for_the_queue_runs_on_the_front_or_is_refused() {
    if !common::nats::available() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let r = Replicas::start(2, 2);
    let cfg = r.agent("board-b");
    let ep = endpoint();
    let conn = r.connect(&ep, &cfg, 1).await;
    let input = noise(2 << 20, 7);
    let (out, trailer) = run_task(&conn, "big1", "count", &input).await;
    assert_eq!(trailer.exit_code, Some(0), "{trailer:?}");
    assert_eq!(
        String::from_utf8_lossy(&out).trim(),
        (2u64 << 20).to_string()
    );
    let starts = r.wait_starts("big1", 1);
    assert_eq!(r.replica_of(starts[0]), Some(1), "ran on the front replica");
    // The same input without its length announced.
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let _ = send
        .write_all(&request_bytes("big2", "count", None, &input))
        .await;
    let _ = send.finish();
    let mut reader = FrameReader::new(recv);
    assert_eq!(read_reply(&mut reader, WAIT).await, ReplyHeader::Accepted);
    let (_, trailer) = read_result(&mut reader, WAIT).await;
    assert_eq!(
        trailer.error,
        Some(updraft_proto::ErrorCode::TooLarge),
        "{trailer:?}"
    );
    assert!(
        trailer.message.contains("announce its length"),
        "{}",
        trailer.message
    );
    assert!(!r.runs().contains_key("big2"), "nothing ran");
}

/// `updraftd ARGS --config CONFIG`: its stdout, after asserting it succeeded.
fn updraftd_ok(args: &[&str], config: &Path) -> String {
    let mut all = args.to_vec();
    all.extend(["--config", config.to_str().unwrap()]);
    let out = updraftd(&all);
    assert!(out.status.success(), "updraftd {args:?}: {}", stderr(&out));
    String::from_utf8(out.stdout).unwrap()
}

/// `updraftd agents --json --id ID` on the replica with `config`.
fn agent_json(config: &Path, id: &str) -> Option<serde_json::Value> {
    serde_json::from_str(&updraftd_ok(&["agents", "--json", "--id", id], config)).ok()
}

/// A board `id` whose only `[[cloud]]` is `daemon`, without a certificate yet.
fn board_home(dir: &Path, id: &str, daemon: &str) -> PathBuf {
    let home = dir.join(id);
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(home.join("policy.toml"), "default = \"local\"\n").unwrap();
    let cfg = home.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "agent_id = \"{id}\"\nsocket = \"agent.sock\"\nstate_dir = \"state\"\npolicy = \"policy.toml\"\n[[cloud]]\naddress = \"{daemon}\"\nserver_name = \"localhost\"\n{AGENT_TASKS}"
        ),
    )
    .unwrap();
    cfg
}

/// `updraft-agent enroll` of the board at `cfg` through `daemon`, not yet waited for.
fn enroll(cfg: &Path, daemon: &str, token: &str, fingerprint: &str) -> std::process::Child {
    enroll_command(cfg, daemon, token, fingerprint)
        .arg("--force")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Enrollment and policy pushes work through any replica: a token made on one enrolls
/// through another, once (two boards racing for one token through two replicas: one
/// wins); an id enrolled through one is held on all; a re-enrollment through one
/// denies the replaced certificate on all; and a policy pushed through a replica the
/// board is not connected to reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_pushed_policies_work_through_any_replica() {
    if !common::nats::available() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let r = Replicas::start(2, 1);
    let d = r.dir.path();
    let (c0, c1) = (r.config(0), r.config(1));
    let ca = updraft_shared::tls::load_certs(&d.join("pki/ca.pem")).unwrap();
    let fingerprint = updraft_shared::tls::fingerprint(&ca[0]);

    // A token made on replica 0 enrolls e-1 through replica 1...
    let t1 = updraftd_ok(&["token", "create"], &c0).trim().to_string();
    let e1 = board_home(d, "e-1", &r.addrs[1]);
    let out = enroll(&e1, &r.addrs[1], &t1, &fingerprint)
        .wait_with_output()
        .unwrap();
    assert!(out.status.success(), "enroll e-1: {}", stderr(&out));
    // ...once: through replica 0 it is used.
    let e2 = board_home(d, "e-2", &r.addrs[0]);
    let out = enroll(&e2, &r.addrs[0], &t1, &fingerprint)
        .wait_with_output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("already used by agent `e-1`"),
        "{}",
        stderr(&out)
    );

    // Two boards race for one token through the two replicas: one enrolls.
    let t2 = updraftd_ok(&["token", "create"], &c1).trim().to_string();
    let e3 = board_home(d, "e-3", &r.addrs[0]);
    let e4 = board_home(d, "e-4", &r.addrs[1]);
    let racing = [
        enroll(&e3, &r.addrs[0], &t2, &fingerprint),
        enroll(&e4, &r.addrs[1], &t2, &fingerprint),
    ];
    let outcomes: Vec<std::process::Output> = racing
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let won = outcomes.iter().filter(|o| o.status.success()).count();
    assert_eq!(
        won,
        1,
        "{:?}",
        outcomes.iter().map(stderr).collect::<Vec<_>>()
    );
    let listed: serde_json::Value =
        serde_json::from_str(&updraftd_ok(&["token", "list", "--json"], &c0)).unwrap();
    let states: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["used", "used"], "{listed}");

    // e-1's id is held on replica 0 too: an unbound token cannot take it there.
    let out = updraftd(&["token", "create", "--config", c0.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(
        !stderr(&out).contains("INFO"),
        "the NATS client's chatter stays out of commands: {}",
        stderr(&out)
    );
    let t3 = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let thief = board_home(&d.join("thief"), "e-1", &r.addrs[0]);
    let out = enroll(&thief, &r.addrs[0], &t3, &fingerprint)
        .wait_with_output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("already has a certificate"),
        "{}",
        stderr(&out)
    );
    // Withdrawn through replica 1 (the id `token list` shows, on replica 0).
    let listed: serde_json::Value =
        serde_json::from_str(&updraftd_ok(&["token", "list", "--json"], &c0)).unwrap();
    let live: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["state"] == "live")
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(live.len(), 1, "{listed}");
    let revoked = updraftd_ok(&["token", "revoke", live[0]], &c1);
    assert!(revoked.contains("revoked token"), "{revoked}");

    // A token bound to e-1, redeemed through replica 0, replaces its certificate: the
    // old one is denied on replica 1, where e-1 enrolled.
    let old = wait_for("replica 0 to know e-1's certificate", WAIT, || {
        let a = agent_json(&c0, "e-1")?;
        a["cert_serial"].as_str().map(str::to_string)
    });
    let t4 = updraftd_ok(&["token", "create", "--agent-id", "e-1"], &c1)
        .trim()
        .to_string();
    let again = board_home(&d.join("again"), "e-1", &r.addrs[0]);
    let out = enroll(&again, &r.addrs[0], &t4, &fingerprint)
        .wait_with_output()
        .unwrap();
    assert!(out.status.success(), "re-enroll e-1: {}", stderr(&out));
    let denied = d.join(format!("r1-state/revoked/{old}.json"));
    wait_for("replica 1 to deny e-1's replaced certificate", WAIT, || {
        denied.is_file().then_some(())
    });

    // A policy pushed through replica 1 reaches e-1, connected to replica 0.
    let _agent = serve_agent(&again);
    wait_for(
        "replica 1 to see e-1 report through replica 0",
        WAIT,
        || {
            let a = agent_json(&c1, "e-1")?;
            (a["version"].is_string() && a["connected_to"] == 0).then_some(())
        },
    );
    let policy = "default = \"local\"\n[[rule]]\nname = \"pushed\"\nplace = \"cloud\"\nwhen = { input_bytes = { above = 1000000 } }\n";
    let file = d.join("pushed.toml");
    std::fs::write(&file, policy).unwrap();
    updraftd_ok(&["policy", "push", file.to_str().unwrap()], &c1);
    let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(policy.as_bytes()));
    wait_for(
        "e-1 to run the policy pushed through replica 1",
        WAIT,
        || {
            let a = agent_json(&c1, "e-1")?;
            (a["policy"]["hash"] == hash && a["policy"]["source"] == "pushed").then_some(())
        },
    );
    let status: serde_json::Value =
        serde_json::from_str(&updraftd_ok(&["policy", "status", "--json"], &c0)).unwrap();
    assert_eq!(status["push"]["hash"], hash, "{status}");
}

/// `max_tasks_per_agent` is checked before the shared store: an agent past it is told
/// `busy` at once, while another agent, and the same one once its tasks end, are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agent_past_its_limit_is_told_busy_and_others_are_served() {
    if !common::nats::available() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let r = Replicas::start_with(1, 4, "4s", "max_tasks_per_agent = 2\n");
    let ep = endpoint();
    let greedy = r.connect(&ep, &r.agent("board-g"), 0).await;
    let mut held = Vec::new();
    for t in 0..2 {
        let mut reader = send_task(&greedy, &format!("g{t}"), "gated", b"x").await;
        assert_eq!(read_reply(&mut reader, WAIT).await, ReplyHeader::Accepted);
        held.push(reader);
    }
    r.wait_starts("g1", 1);
    let mut third = send_task(&greedy, "g2", "gated", b"x").await;
    match read_reply(&mut third, WAIT).await {
        ReplyHeader::Rejected { code, message } => {
            assert_eq!(code, updraft_proto::ErrorCode::Busy, "{message}");
            assert!(message.contains("max_tasks_per_agent"), "{message}");
        }
        other => panic!("a third task was admitted: {other:?}"),
    }
    assert!(!r.runs().contains_key("g2"), "the refused task ran");
    // Another agent is not held back by the first one's limit.
    let other = r.connect(&ep, &r.agent("board-o"), 0).await;
    let mut theirs = send_task(&other, "o0", "gated", b"y").await;
    assert_eq!(read_reply(&mut theirs, WAIT).await, ReplyHeader::Accepted);
    r.open_gate();
    for mut reader in held {
        let (out, trailer) = read_result(&mut reader, WAIT).await;
        assert_eq!((out.as_slice(), trailer.exit_code), (&b"x"[..], Some(0)));
    }
    assert_eq!(read_result(&mut theirs, WAIT).await.0, b"y");
    // Its tasks done, the first agent is served again (once the replica has closed
    // their streams: the count drops there, not when the agent read the trailer).
    let start = std::time::Instant::now();
    loop {
        let mut reader = send_task(&greedy, "g3", "gated", b"z").await;
        match read_reply(&mut reader, WAIT).await {
            ReplyHeader::Accepted => {
                assert_eq!(read_result(&mut reader, WAIT).await.0, b"z");
                break;
            }
            ReplyHeader::Rejected { code, message } => {
                assert_eq!(code, updraft_proto::ErrorCode::Busy, "{message}");
                assert!(start.elapsed() < WAIT, "still busy: {message}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Many tasks at once through one replica, pulled by its own worker as fast as the
/// queue gives them: every one finishes. A worker that read a task's claim from a NATS
/// node that had not yet applied its creation took the task for a forgotten one and
/// dropped it, and the agent waited for ever; claims are read from the stream leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_through_one_replica_loses_no_task() {
    if !common::nats::available() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let r = Replicas::start(1, 64);
    let ep = endpoint();
    let conn = r.connect(&ep, &r.agent("board-b"), 0).await;
    let jobs: Vec<_> = (0..64)
        .map(|w| {
            let conn = conn.clone();
            tokio::spawn(async move {
                for t in 0..25 {
                    let id = format!("b{w}-{t}");
                    let (out, trailer) = run_task(&conn, &id, "echo", id.as_bytes()).await;
                    assert_eq!(out, id.as_bytes(), "{id}: {trailer:?}");
                }
            })
        })
        .collect();
    for j in jobs {
        j.await.unwrap();
    }
}
