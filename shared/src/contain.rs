//! Task containment: every process a task starts, however it detaches itself, is found
//! and killed when the task ends. Both the agent and the daemon use it through
//! [`crate::exec`].
//!
//! Three layers, strongest first:
//! - **cgroup v2**: when the service may create cgroups below its own (a delegated
//!   subtree, `Delegate=yes` under systemd) and the kernel has `cgroup.kill` (Linux
//!   5.14), each task runs in its own cgroup, killed whole when the task ends. Nothing
//!   a task does without privileges leaves it.
//! - **child subreaper**: the service marks itself `PR_SET_CHILD_SUBREAPER`, so a
//!   descendant whose parent dies (a double fork, `setsid`) is re-parented to the
//!   service instead of init. A reaper ([`init`]) reaps those that exited and kills
//!   those that no running task can own (see [`sweep`]).
//! - **process group**: each task's leader starts its own group, killed whole when the
//!   task ends, whichever way it ends (exit, timeout, submitter gone).
//!
//! The reaper never waits on a task's leader: tokio owns those pids and reaps them.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

/// Name prefix of the per-task cgroups (and of the start-up probe).
const CGROUP_PREFIX: &str = "updraft-task-";
/// How often the reaper looks for orphans even without a SIGCHLD: a safety net for a
/// signal coalesced with one tokio consumed first.
const SWEEP_INTERVAL: Duration = Duration::from_secs(2);
/// Least time between two sweeps: a busy service ends many tasks a second, and one scan
/// of /proc serves all the exits that arrived meanwhile.
const SWEEP_GAP: Duration = Duration::from_millis(100);

/// Environment variable that turns per-task cgroups off (`off`; default `auto`), for a
/// host where another tool manages the service's cgroup.
pub const CGROUPS_ENV: &str = "UPDRAFT_TASK_CGROUPS";

/// The containment in force, chosen once at start by [`init`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Containment {
    /// Per-task cgroups below this directory, plus the subreaper.
    Cgroup(PathBuf),
    /// The subreaper and process groups only; why cgroups are not used.
    Subreaper(String),
    /// Process groups only (not a service process, or the subreaper could not be set).
    GroupsOnly(String),
}

impl std::fmt::Display for Containment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cgroup(dir) => write!(f, "per-task cgroups under {}", dir.display()),
            Self::Subreaper(why) => write!(f, "child subreaper and process groups ({why})"),
            Self::GroupsOnly(why) => write!(f, "process groups only ({why})"),
        }
    }
}

static MODE: OnceLock<Containment> = OnceLock::new();
static REAPER: OnceLock<tokio::sync::Notify> = OnceLock::new();
static REGISTRY: Mutex<Registry> = Mutex::new(Registry::new());
static NEXT_TASK: AtomicU64 = AtomicU64::new(1);

/// What the reaper must know: running tasks and the leader pids tokio owns.
struct Registry {
    /// Running tasks: id → the start time (clock ticks since boot) of its leader.
    tasks: Vec<(u64, u64)>,
    /// Task leaders tokio has not reaped yet: pid → start time (a pid reused by
    /// another process has another start time).
    leaders: Option<HashMap<i32, u64>>,
    /// Task cgroups killed but not yet removed (removal waits until they are empty).
    dead_cgroups: Vec<PathBuf>,
}

impl Registry {
    const fn new() -> Self {
        Self {
            tasks: Vec::new(),
            leaders: None,
            dead_cgroups: Vec::new(),
        }
    }

    fn leaders(&mut self) -> &mut HashMap<i32, u64> {
        self.leaders.get_or_insert_with(HashMap::new)
    }
}

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner())
}

/// Chooses the containment for this process, makes it a child subreaper, removes task
/// cgroups a crashed predecessor left, and logs what applies. Call once at service
/// start, from within the tokio runtime (the reaper runs on it). Later calls return
/// the first choice.
pub fn init() -> &'static Containment {
    MODE.get_or_init(|| {
        let mode = choose();
        if !matches!(mode, Containment::GroupsOnly(_)) {
            spawn_reaper();
        }
        if let Containment::Cgroup(dir) = &mode {
            let n = sweep_stale_cgroups(dir);
            if n > 0 {
                tracing::info!(dir = %dir.display(), "removed {n} task cgroups left by an earlier run");
            }
        }
        tracing::info!("task containment: {mode}");
        mode
    })
}

/// The containment chosen by [`init`], if it ran.
pub fn current() -> Option<&'static Containment> {
    MODE.get()
}

fn choose() -> Containment {
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        return Containment::GroupsOnly(format!("PR_SET_CHILD_SUBREAPER failed: {e}"));
    }
    match std::env::var(CGROUPS_ENV).as_deref() {
        Ok("off") => return Containment::Subreaper(format!("{CGROUPS_ENV}=off")),
        Ok("auto") | Err(_) => {}
        Ok(other) => {
            tracing::warn!("{CGROUPS_ENV}={other:?} is neither `auto` nor `off`; using `auto`")
        }
    }
    match cgroup_dir() {
        Ok(dir) => Containment::Cgroup(dir),
        Err(why) => Containment::Subreaper(why.to_string()),
    }
}

/// Why tasks cannot be given cgroups: the reason [`Containment::Subreaper`] shows.
#[derive(Debug, thiserror::Error)]
enum CgroupError {
    /// `/proc/self/cgroup` could not be read.
    #[error("cannot read /proc/self/cgroup: {0}")]
    ReadCgroup(std::io::Error),
    /// The process is in no cgroup v2 hierarchy (v1 only, or none).
    #[error("this process is in no cgroup v2 hierarchy")]
    NoHierarchy,
    /// `/proc/self/mountinfo` could not be read.
    #[error("cannot read /proc/self/mountinfo: {0}")]
    ReadMountinfo(std::io::Error),
    /// No cgroup2 file system is mounted.
    #[error("no cgroup2 file system is mounted")]
    NoMount,
    /// A cgroup could not be made below this process's own (not delegated to us).
    #[error(
        "cannot create a cgroup in {}: {error}; under systemd set Delegate=yes and ProtectControlGroups=no",
        .dir.display()
    )]
    Create {
        /// This process's cgroup directory.
        dir: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// The kernel cannot kill a whole cgroup at once.
    #[error("the kernel has no cgroup.kill (Linux 5.14 or later)")]
    NoKill,
}

/// This process's cgroup v2 directory, if tasks can be given cgroups below it.
fn cgroup_dir() -> Result<PathBuf, CgroupError> {
    let own = std::fs::read_to_string("/proc/self/cgroup").map_err(CgroupError::ReadCgroup)?;
    let rel = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or(CgroupError::NoHierarchy)?;
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(CgroupError::ReadMountinfo)?;
    let (root, mount) = cgroup2_mount(&mountinfo).ok_or(CgroupError::NoMount)?;
    let rel = rel.strip_prefix(root.as_str()).unwrap_or(rel);
    let rel = rel.trim_start_matches('/');
    let dir = if rel.is_empty() {
        PathBuf::from(mount)
    } else {
        Path::new(&mount).join(rel)
    };
    let probe = dir.join(format!("{CGROUP_PREFIX}probe-{}", std::process::id()));
    if let Err(error) = std::fs::create_dir(&probe) {
        return Err(CgroupError::Create { dir, error });
    }
    let has_kill = probe.join("cgroup.kill").exists();
    let _ = std::fs::remove_dir(&probe);
    if !has_kill {
        return Err(CgroupError::NoKill);
    }
    Ok(dir)
}

/// The root and mount point of the first cgroup2 mount in `mountinfo` text.
fn cgroup2_mount(mountinfo: &str) -> Option<(String, String)> {
    mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mut f = left.split_whitespace().skip(3);
        Some((f.next()?.to_string(), f.next()?.to_string()))
    })
}

/// Kills and removes `updraft-task-<pid>-<n>` cgroups in `dir` whose service `pid` is
/// gone. Returns how many were removed.
fn sweep_stale_cgroups(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(owner) = name
            .to_str()
            .and_then(|n| n.strip_prefix(CGROUP_PREFIX))
            .and_then(|n| n.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        let _ = std::fs::write(e.path().join("cgroup.kill"), "1");
        if remove_cgroup(&e.path()) {
            removed += 1;
        }
    }
    removed
}

/// Removes an emptied cgroup, waiting (bounded) for killed members to leave it.
fn remove_cgroup(dir: &Path) -> bool {
    for _ in 0..50 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return true,
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    false
}

fn spawn_reaper() {
    REAPER.get_or_init(tokio::sync::Notify::new);
    tokio::spawn(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut chld = signal(SignalKind::child()).ok();
        let wake = REAPER.get().expect("set above");
        loop {
            tokio::select! {
                _ = async { match chld.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => {}
                () = wake.notified() => {}
                () = tokio::time::sleep(SWEEP_INTERVAL) => {}
            }
            sweep();
            tokio::time::sleep(SWEEP_GAP).await;
        }
    });
}

/// One task's containment: its process group and, where available, its cgroup.
/// Dropping it kills everything the task started.
#[derive(Debug)]
pub(crate) struct TaskGuard {
    id: u64,
    pgid: Option<i32>,
    cgroup: Option<PathBuf>,
}

/// `argv[1]` by which a service runs itself as a task's entry: see [`task_entry`].
const ENTRY_ARG: &str = "__updraft-task-entry";
/// How a service runs itself: set by [`task_entry`] in a binary that honours
/// [`ENTRY_ARG`].
static ENTRY_EXE: OnceLock<PathBuf> = OnceLock::new();

/// Call first in `main`. Started as `<self> __updraft-task-entry <cgroup.procs>
/// <program> [args]`, this process moves itself into the task cgroup and then becomes
/// `program` (same pid, environment, working directory, descriptors and process
/// group), so the program starts inside its cgroup and nothing it forks, however
/// early, starts outside. Never returns then: a program that cannot be executed is one
/// line on stderr and exit status 127. Otherwise it returns at once, and tasks are
/// started this way from now on when they get cgroups.
pub fn task_entry() {
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() != Some(std::ffi::OsStr::new(ENTRY_ARG)) {
        let exe = Path::new("/proc/self/exe");
        if exe.exists() {
            let _ = ENTRY_EXE.set(exe.to_path_buf());
        }
        return;
    }
    let (Some(procs), Some(program)) = (args.next(), args.next()) else {
        eprintln!("updraft: {ENTRY_ARG} needs a cgroup.procs path and a program");
        std::process::exit(127);
    };
    // If this fails the service moves this process from outside (and logs why).
    let _ = std::fs::write(&procs, "0");
    let err = std::process::Command::new(&program).args(args).exec();
    eprintln!(
        "updraft: cannot execute {}: {err}",
        Path::new(&program).display()
    );
    std::process::exit(127);
}

/// A task about to start: its containment id and, where available, its cgroup.
/// Dropped without [`spawn`], it removes the cgroup it made.
#[derive(Debug)]
pub(crate) struct Prepared {
    id: u64,
    cgroup: Option<PathBuf>,
}

impl Drop for Prepared {
    fn drop(&mut self) {
        if let Some(cg) = self.cgroup.take() {
            let _ = std::fs::remove_dir(cg);
        }
    }
}

/// The command that runs `program` as a contained task: the program itself, or, when
/// the task gets a cgroup and this binary honours [`task_entry`], this binary entering
/// the cgroup first. Set the arguments, environment and stdio on it, start it with its
/// own process group, then pass both to [`spawn`].
pub(crate) fn command(program: &Path) -> io::Result<(tokio::process::Command, Prepared)> {
    let id = NEXT_TASK.fetch_add(1, Ordering::Relaxed);
    let cgroup = match current() {
        Some(Containment::Cgroup(dir)) => make_cgroup(dir, id),
        _ => None,
    };
    let prepared = Prepared { id, cgroup };
    let cmd = match (&prepared.cgroup, ENTRY_EXE.get()) {
        (Some(cg), Some(exe)) => {
            // What the entry can only report as exit status 127 is found here first.
            check_executable(program)?;
            let mut cmd = tokio::process::Command::new(exe);
            cmd.arg(ENTRY_ARG).arg(cg.join("cgroup.procs")).arg(program);
            cmd
        }
        _ => tokio::process::Command::new(program),
    };
    Ok((cmd, prepared))
}

/// The errors exec(2) gives for a path that is missing, not a file or not executable.
fn check_executable(program: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(program)?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(io::Error::from(io::ErrorKind::PermissionDenied));
    }
    Ok(())
}

/// Spawns `cmd` from [`command`] (which must start its own process group) as a
/// contained task.
pub(crate) fn spawn(
    cmd: &mut tokio::process::Command,
    mut prepared: Prepared,
) -> io::Result<(tokio::process::Child, TaskGuard)> {
    let id = prepared.id;
    let cgroup = prepared.cgroup.take();
    // Held across the spawn so the reaper never sees the new leader unregistered.
    let mut reg = registry();
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            drop(reg);
            if let Some(cg) = &cgroup {
                let _ = std::fs::remove_dir(cg);
            }
            return Err(e);
        }
    };
    let pid = child.id().and_then(|p| i32::try_from(p).ok());
    // Only a reaper needs the record (and prunes it).
    if let (Some(pid), Some(_)) = (pid, REAPER.get()) {
        // Unknown (no /proc): 0, which keeps every orphan while the task runs and
        // marks the pid as a leader whatever its start time.
        let start = proc_stat(pid).map_or(0, |s| s.start);
        reg.tasks.push((id, start));
        reg.leaders().insert(pid, start);
    }
    drop(reg);
    if let (Some(cg), Some(pid)) = (&cgroup, pid) {
        enter_cgroup(cg, pid);
    }
    Ok((
        child,
        TaskGuard {
            id,
            pgid: pid,
            cgroup,
        },
    ))
}

fn make_cgroup(dir: &Path, id: u64) -> Option<PathBuf> {
    let cg = dir.join(format!("{CGROUP_PREFIX}{}-{id}", std::process::id()));
    match std::fs::create_dir(&cg) {
        Ok(()) => Some(cg),
        Err(e) => {
            tracing::warn!(cgroup = %cg.display(), "cannot create a task cgroup: {e}; the task is contained by its process group and the subreaper only");
            None
        }
    }
}

/// Moves the leader, and any descendants it already has, into the cgroup: a fallback
/// for a leader that did not move itself (see [`task_entry`]). Forks from here on land
/// in the cgroup.
fn enter_cgroup(cg: &Path, leader: i32) {
    let procs = cg.join("cgroup.procs");
    if let Err(e) = std::fs::write(&procs, leader.to_string()) {
        tracing::warn!(cgroup = %cg.display(), "cannot move task process {leader} into its cgroup: {e}");
        return;
    }
    let mut todo = vec![leader];
    // Bounded: a task cannot have forked more than this in the microseconds since exec.
    let mut budget = 1024;
    while let Some(pid) = todo.pop() {
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        for child in children
            .split_whitespace()
            .filter_map(|c| c.parse::<i32>().ok())
        {
            let _ = std::fs::write(&procs, child.to_string());
            if budget > 0 {
                budget -= 1;
                todo.push(child);
            }
        }
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if let Some(cg) = &self.cgroup {
            if let Err(e) = std::fs::write(cg.join("cgroup.kill"), "1") {
                tracing::warn!(cgroup = %cg.display(), "cannot kill a task cgroup: {e}");
            }
        }
        if let Some(pgid) = self.pgid {
            // A group that is already gone is fine.
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
        let mut reg = registry();
        reg.tasks.retain(|(id, _)| *id != self.id);
        if let Some(cg) = self.cgroup.take() {
            reg.dead_cgroups.push(cg);
        }
        drop(reg);
        if let Some(n) = REAPER.get() {
            n.notify_one();
        }
    }
}

/// One process, from `/proc/<pid>/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProcStat {
    pid: i32,
    state: char,
    ppid: i32,
    pgrp: i32,
    /// Clock ticks since boot at which it started.
    start: u64,
}

/// Parses `/proc/<pid>/stat` text; the command name may hold spaces and parentheses,
/// so fields are counted from its closing parenthesis.
fn parse_stat(pid: i32, text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(ProcStat {
        pid,
        state: f.first()?.chars().next()?,
        ppid: f.get(1)?.parse().ok()?,
        pgrp: f.get(2)?.parse().ok()?,
        start: f.get(19)?.parse().ok()?,
    })
}

fn proc_stat(pid: i32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(pid, &text)
}

fn processes() -> Vec<ProcStat> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(proc_stat)
        .collect()
}

/// What the reaper does with one child of the service.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// A task leader: tokio's to wait for.
    Leave,
    /// Exited: reap it.
    Reap,
    /// Alive, and no running task can have started it: kill it (and its group).
    Kill,
    /// Alive, and a running task started at or before it may own it: not yet.
    Keep,
}

/// Decides for `p`, a child of the service. A descendant starts no earlier than its
/// task's leader, so an orphan that started before every running task (or when none
/// runs) belongs to a task that has ended.
fn verdict(p: &ProcStat, leaders: &HashMap<i32, u64>, running: &[(u64, u64)]) -> Verdict {
    if leaders
        .get(&p.pid)
        .is_some_and(|start| *start == p.start || *start == 0)
    {
        Verdict::Leave
    } else if p.state == 'Z' || p.state == 'X' {
        Verdict::Reap
    } else if running.iter().any(|(_, start)| *start <= p.start) {
        Verdict::Keep
    } else {
        Verdict::Kill
    }
}

/// Reaps exited orphans and kills live ones that no running task can own. Returns how
/// many were killed.
fn sweep() -> usize {
    let me = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
    let mut reg = registry();
    let all = processes();
    let mut killed = Vec::new();
    reg.leaders().retain(|pid, start| {
        all.iter()
            .any(|p| p.pid == *pid && (p.start == *start || *start == 0) && p.ppid == me)
    });
    let leaders = reg.leaders.clone().unwrap_or_default();
    for p in all.iter().filter(|p| p.ppid == me) {
        match verdict(p, &leaders, &reg.tasks) {
            Verdict::Leave | Verdict::Keep => {}
            Verdict::Reap => {
                let _ = nix::sys::wait::waitpid(
                    Pid::from_raw(p.pid),
                    Some(nix::sys::wait::WaitPidFlag::WNOHANG),
                );
            }
            Verdict::Kill => {
                // A process that made its own group (setsid) takes that group along.
                if p.pgrp == p.pid {
                    let _ = killpg(Pid::from_raw(p.pid), Signal::SIGKILL);
                }
                let _ = kill(Pid::from_raw(p.pid), Signal::SIGKILL);
                killed.push(p.pid);
            }
        }
    }
    reg.dead_cgroups.retain(|cg| match std::fs::remove_dir(cg) {
        Ok(()) => false,
        Err(e) => e.kind() != io::ErrorKind::NotFound,
    });
    drop(reg);
    if !killed.is_empty() {
        tracing::info!(
            pids = ?killed,
            "killed {} processes left running by finished tasks",
            killed.len()
        );
    }
    killed.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parses_past_odd_command_names() {
        let text =
            "4242 (a) b (c) S 1 4242 4242 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 987654 1 2";
        let s = parse_stat(4242, text).unwrap();
        assert_eq!(
            s,
            ProcStat {
                pid: 4242,
                state: 'S',
                ppid: 1,
                pgrp: 4242,
                start: 987654
            }
        );
        assert_eq!(parse_stat(1, "1 (x) S 0"), None);
    }

    #[test]
    fn finds_the_cgroup2_mount_on_hybrid_and_unified_hosts() {
        let hybrid = "30 24 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n\
                      32 30 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(("/".into(), "/sys/fs/cgroup/unified".into()))
        );
        let unified = "35 24 0:30 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw";
        assert_eq!(
            cgroup2_mount(unified),
            Some(("/".into(), "/sys/fs/cgroup".into()))
        );
        assert_eq!(cgroup2_mount("32 30 0:28 / /x rw - cgroup cgroup rw"), None);
    }

    #[test]
    fn verdicts() {
        let p = |pid, state, start| ProcStat {
            pid,
            state,
            ppid: 1,
            pgrp: pid,
            start,
        };
        let leaders: HashMap<i32, u64> = [(10, 100)].into();
        // A leader is tokio's, alive or not; the same pid with another start is not.
        assert_eq!(verdict(&p(10, 'Z', 100), &leaders, &[]), Verdict::Leave);
        assert_eq!(verdict(&p(10, 'Z', 300), &leaders, &[]), Verdict::Reap);
        // A leader whose start time could not be read is left alone whatever it shows.
        let unknown: HashMap<i32, u64> = [(10, 0)].into();
        assert_eq!(verdict(&p(10, 'Z', 300), &unknown, &[]), Verdict::Leave);
        assert_eq!(
            verdict(&p(11, 'Z', 150), &leaders, &[(1, 100)]),
            Verdict::Reap
        );
        // Started after a running task started: it may be that task's.
        assert_eq!(
            verdict(&p(12, 'S', 150), &leaders, &[(1, 100)]),
            Verdict::Keep
        );
        assert_eq!(
            verdict(&p(12, 'S', 100), &leaders, &[(1, 100)]),
            Verdict::Keep
        );
        // Started before every running task, or none runs: its task has ended.
        assert_eq!(
            verdict(&p(12, 'S', 99), &leaders, &[(1, 100)]),
            Verdict::Kill
        );
        assert_eq!(verdict(&p(12, 'R', 150), &leaders, &[]), Verdict::Kill);
    }

    #[test]
    fn cgroup_reasons_say_what_to_change() {
        let denied = std::io::Error::from_raw_os_error(13);
        let e = CgroupError::Create {
            dir: PathBuf::from("/sys/fs/cgroup/system.slice/updraft-agent.service"),
            error: denied,
        };
        assert_eq!(
            e.to_string(),
            format!(
                "cannot create a cgroup in /sys/fs/cgroup/system.slice/updraft-agent.service: {}; under systemd set Delegate=yes and ProtectControlGroups=no",
                std::io::Error::from_raw_os_error(13)
            )
        );
        assert_eq!(
            CgroupError::NoKill.to_string(),
            "the kernel has no cgroup.kill (Linux 5.14 or later)"
        );
        assert_eq!(
            CgroupError::NoHierarchy.to_string(),
            "this process is in no cgroup v2 hierarchy"
        );
        assert_eq!(
            CgroupError::NoMount.to_string(),
            "no cgroup2 file system is mounted"
        );
        let gone = || std::io::Error::from(std::io::ErrorKind::NotFound);
        let text = |e: CgroupError| e.to_string();
        assert_eq!(
            text(CgroupError::ReadCgroup(gone())),
            format!("cannot read /proc/self/cgroup: {}", gone())
        );
        assert_eq!(
            text(CgroupError::ReadMountinfo(gone())),
            format!("cannot read /proc/self/mountinfo: {}", gone())
        );
    }
}
