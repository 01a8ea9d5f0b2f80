//! `updraft bench footprint`: what the agent costs a board — its binary size, its
//! resident memory idle and under a steady task load, and its CPU use when idle —
//! beside a bare `sleep` process measured in the same run.
//!
//! The agent and the daemon are the real binaries (by default the `board` build next
//! to this one, else the build this binary belongs to), on loopback.
//!
//! `--agent` may name an agent built for another machine (`scripts/cross.sh`): the kernel
//! runs it through qemu-user (binfmt_misc), so its size is the board's but its memory and
//! CPU include the emulator's and are marked indicative only.

use anyhow::{bail, Context};
use bytes::Bytes;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use updraft_agent::client::{body_bytes, Client, RunRequest};
use updraft_agent::ChannelBody;
use updraft_agent::Where;

use crate::harness::Pki;

/// Bytes of input per task under load.
const INPUT_BYTES: usize = 64 * 1024;
/// Longest a process may take to start.
const START_LIMIT: Duration = Duration::from_secs(30);

/// What to run.
#[derive(Debug)]
pub struct Options {
    /// One JSON line instead of a table.
    pub json: bool,
    /// The agent binary; default: the board build, else this build's.
    pub agent: Option<PathBuf>,
    /// How long the idle figures are taken over.
    pub idle: Duration,
    /// How long the steady load lasts.
    pub load: Duration,
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Memory and CPU of a process, from /proc.
#[derive(Debug, Clone, Copy)]
struct Sample {
    rss_kib: u64,
    /// Anonymous memory (heap, stacks): what the agent itself allocated.
    anon_kib: u64,
    /// File-backed pages: mostly the binary's own code, paged in.
    file_kib: u64,
    hwm_kib: u64,
    cpu_ticks: u64,
}

fn sample(pid: u32) -> anyhow::Result<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').context("unreadable /proc stat")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
    let ticks = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(Sample {
        rss_kib: kib("VmRSS:"),
        anon_kib: kib("RssAnon:"),
        file_kib: kib("RssFile:"),
        hwm_kib: kib("VmHWM:"),
        cpu_ticks: ticks,
    })
}

/// Clock ticks per second of /proc/PID/stat (USER_HZ, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

fn default_agent() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("no directory for this binary")?;
    let board = dir.join("../board/updraft-agent");
    let here = dir.join("updraft-agent");
    for p in [board, here] {
        if p.is_file() {
            return Ok(p.canonicalize()?);
        }
    }
    bail!(
        "no updraft-agent binary next to {}: build it with `cargo build --profile board -p updraft-agent` or pass --agent PATH",
        exe.display()
    )
}

/// The machine an ELF binary is built for, from its header.
pub fn elf_machine(path: &Path) -> anyhow::Result<&'static str> {
    use std::io::Read;
    let mut head = [0u8; 20];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .with_context(|| format!("cannot read {}", path.display()))?;
    if &head[..4] != b"\x7fELF" {
        bail!("{} is not an ELF program", path.display());
    }
    Ok(match u16::from_le_bytes([head[18], head[19]]) {
        0x3e => "x86_64",
        0xb7 => "aarch64",
        0x28 => "arm",
        _ => "another machine",
    })
}

fn wait_for_line(log: &Path, needle: &str) -> anyhow::Result<String> {
    let start = Instant::now();
    while start.elapsed() < START_LIMIT {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains(needle)) {
            return Ok(line.to_string());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!(
        "`{needle}` did not appear in {} within {START_LIMIT:?}",
        log.display()
    )
}

/// Runs the benchmark.
pub async fn run(opts: Options) -> anyhow::Result<()> {
    let agent_bin = match opts.agent {
        Some(p) => p,
        None => default_agent()?,
    };
    let machine = elf_machine(&agent_bin)?;
    let emulated = machine != elf_machine(&std::env::current_exe()?)?;
    if emulated && std::env::var_os("QEMU_LD_PREFIX").is_none() {
        bail!(
            "{} is built for {machine}: run it under qemu-user with its libraries, e.g. \
             eval \"$(scripts/cross.sh --env aarch64-unknown-linux-gnu)\" first (or the armv7 triple)",
            agent_bin.display()
        );
    }
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(&dir.path().join("pki"))?;
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let daemon_cfg = dir.path().join("daemon.toml");
    std::fs::write(
        &daemon_cfg,
        format!(
            "listen = \"127.0.0.1:{port}\"\nstate_dir = \"dstate\"\n{}\n[tasks.echo]\nbuiltin = \"echo\"\n",
            pki.daemon_tls()
        ),
    )?;
    let socket = dir.path().join("agent.sock");
    let agent_cfg = dir.path().join("agent.toml");
    std::fs::write(
        &agent_cfg,
        format!(
            "socket = \"agent.sock\"\nstate_dir = \"astate\"\n[[cloud]]\naddress = \"127.0.0.1:{port}\"\nserver_name = \"localhost\"\n{}\n[tasks.echo]\nbuiltin = \"echo\"\n",
            pki.agent_tls()
        ),
    )?;
    let daemon_log = dir.path().join("daemon.log");
    let agent_log = dir.path().join("agent.log");
    let _daemon = Proc(
        Command::new(std::env::current_exe().context("locating this program")?)
            .args(["bench-faults-daemon", "--config"])
            .arg(&daemon_cfg)
            .env("UPDRAFT_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&daemon_log)?)
            .spawn()?,
    );
    wait_for_line(&daemon_log, "updraftd serving")?;
    let agent = Proc(
        Command::new(&agent_bin)
            .args(["serve", "--config"])
            .arg(&agent_cfg)
            .env("UPDRAFT_AGENT_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&agent_log)?)
            .spawn()
            .with_context(|| format!("cannot start {}", agent_bin.display()))?,
    );
    wait_for_line(&agent_log, "connected to daemon")?;
    let baseline = Proc(Command::new("sleep").arg("100000").spawn()?);
    let (agent_pid, baseline_pid) = (agent.0.id(), baseline.0.id());

    // Idle: the first second of start-up is over; take the figures over `idle`.
    let before = sample(agent_pid)?;
    tokio::time::sleep(opts.idle).await;
    let idle = sample(agent_pid)?;
    let base = sample(baseline_pid)?;
    let idle_cpu_percent =
        (idle.cpu_ticks - before.cpu_ticks) as f64 / TICKS_PER_SECOND / opts.idle.as_secs_f64()
            * 100.0;

    // Steady load: one synchronous task after another, alternating sides.
    let client = Client::new(&socket);
    let input = Bytes::from(vec![7u8; INPUT_BYTES]);
    let start = Instant::now();
    let mut tasks = 0u64;
    while start.elapsed() < opts.load {
        let run = RunRequest {
            task: "echo".into(),
            where_: Some(if tasks.is_multiple_of(2) {
                Where::Cloud
            } else {
                Where::Local
            }),
            ..Default::default()
        };
        let resp = client.run(&run, ChannelBody::full(input.clone())).await?;
        let status = resp.status();
        let body = body_bytes(resp).await?;
        if status != 200 || body != input {
            bail!(
                "task {tasks} under load: HTTP {status}, {} bytes back",
                body.len()
            );
        }
        tasks += 1;
    }
    let loaded = sample(agent_pid)?;
    let rate = tasks as f64 / start.elapsed().as_secs_f64();
    let size = std::fs::metadata(&agent_bin)?.len();
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let kib_mib = |k: u64| k as f64 / 1024.0;

    if opts.json {
        println!(
            "{}",
            serde_json::json!({
                "agent_binary": agent_bin.display().to_string(),
                "agent_machine": machine,
                "emulated": emulated,
                "binary_mib": mib(size),
                "idle_rss_mib": kib_mib(idle.rss_kib),
                "idle_anon_mib": kib_mib(idle.anon_kib),
                "idle_file_mib": kib_mib(idle.file_kib),
                "load_hwm_mib": kib_mib(loaded.hwm_kib),
                "baseline_sleep_rss_mib": kib_mib(base.rss_kib),
                "idle_rss_over_baseline": idle.rss_kib as f64 / base.rss_kib as f64,
                "idle_cpu_percent_of_core": idle_cpu_percent,
                "idle_seconds": opts.idle.as_secs_f64(),
                "load_tasks": tasks,
                "load_tasks_per_s": rate,
                "load_input_bytes": INPUT_BYTES,
            })
        );
        return Ok(());
    }
    println!(
        "updraft bench footprint: {} ({machine})",
        agent_bin.display()
    );
    if emulated {
        println!(
            "under qemu-user: RSS and CPU include the emulator and are indicative only; the size is the board's"
        );
    }
    println!("{:<28}{:>10}   goal", "", "");
    println!(
        "{:<28}{:>7.2} MiB   <= 4 MiB",
        "binary (as built)",
        mib(size)
    );
    println!(
        "{:<28}{:>7.2} MiB   <= 5 MiB    ({:.1}x a bare `sleep`: {:.2} MiB)",
        "RSS idle",
        kib_mib(idle.rss_kib),
        idle.rss_kib as f64 / base.rss_kib as f64,
        kib_mib(base.rss_kib)
    );
    println!(
        "{:<28}{:>7.2} MiB   <= 1.5 MiB  (file-backed, mostly the binary's code: {:.2} MiB)",
        "RSS idle, anonymous",
        kib_mib(idle.anon_kib),
        kib_mib(idle.file_kib)
    );
    println!(
        "{:<28}{:>7.2} MiB               ({tasks} tasks of {} KiB, {rate:.0}/s, half cloud, half local)",
        "RSS peak under load",
        kib_mib(loaded.hwm_kib),
        INPUT_BYTES / 1024
    );
    println!(
        "{:<28}{:>7.3} %     <= 0.2 % of a core (over {:?}, 1/100 s ticks)",
        "CPU idle", idle_cpu_percent, opts.idle
    );
    Ok(())
}
