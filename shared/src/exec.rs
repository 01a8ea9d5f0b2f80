//! The executor: runs an [`AdmittedTask`] with its input streamed in and its output
//! streamed out, under the task's limits. Both the agent and the daemon use it.
//!
//! Command tasks get argv (never a shell), an empty environment plus the task's `env`,
//! a fresh private working directory that is removed afterwards, and their own process
//! group, which is killed whole on timeout and swept after exit so nothing lingers.
//! Descendants that leave the group (`setsid`, double forks) are caught by the task's
//! cgroup or the service's subreaper ([`crate::contain`]). Whichever way a run ends,
//! its submitter going away included, everything it started is killed.

use crate::catalog::{AdmittedTask, Builtin, TaskKind};
use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use updraft_proto::ErrorCode;

/// Bytes of stderr kept for error reports: enough for a stack trace's last lines.
pub const STDERR_TAIL: usize = 4096;
/// Read size for a child's stdout; matches the protocol's data chunk.
pub const READ_CHUNK: usize = updraft_proto::frame::DATA_CHUNK;
/// Where a command's program is looked up when it is not a path and the task's `env`
/// sets no `PATH`: the system directories, never the service's own environment.
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// A source of task input, read chunk by chunk.
pub trait Input: Send {
    /// The next chunk, or `None` at the end of input.
    fn next_chunk(&mut self) -> impl Future<Output = io::Result<Option<Bytes>>> + Send;
}

/// A sink for task output.
pub trait Output: Send {
    /// Delivers one chunk; back-pressure is applied by awaiting.
    fn write(&mut self, chunk: Bytes) -> impl Future<Output = io::Result<()>> + Send;
}

/// Input from a byte slice already in memory.
impl Input for Option<Bytes> {
    async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        Ok(self.take().filter(|b| !b.is_empty()))
    }
}

impl<T: Input> Input for &mut T {
    fn next_chunk(&mut self) -> impl Future<Output = io::Result<Option<Bytes>>> + Send {
        (**self).next_chunk()
    }
}

impl<T: Output> Output for &mut T {
    fn write(&mut self, chunk: Bytes) -> impl Future<Output = io::Result<()>> + Send {
        (**self).write(chunk)
    }
}

/// Output collected in memory (tests and small builtins only).
impl Output for Vec<u8> {
    async fn write(&mut self, chunk: Bytes) -> io::Result<()> {
        self.extend_from_slice(&chunk);
        Ok(())
    }
}

/// How a run ended, when it ran to an exit.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Exit code (128 + signal number when killed by a signal, as shells report it).
    pub exit_code: i32,
    /// The last [`STDERR_TAIL`] bytes of stderr.
    pub stderr_tail: Vec<u8>,
    /// Input bytes consumed.
    pub input_bytes: u64,
    /// Output bytes produced.
    pub output_bytes: u64,
    /// Time spent waiting for a slot.
    pub queue_time: Duration,
    /// Time spent running.
    pub run_time: Duration,
}

/// Why a run did not produce an [`Outcome`].
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// All slots and queue places are taken.
    #[error("busy: {running} tasks running and {queued} queued{}, the limit", uploading_text(*.uploading))]
    Busy {
        /// Running now.
        running: usize,
        /// Queued now.
        queued: usize,
        /// Accepted and still receiving their input (they hold queue places).
        uploading: usize,
    },
    /// Input exceeded `max_input`; the task was stopped.
    #[error("input is over max_input of {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: u64,
    },
    /// Output exceeded `max_output`; the task was stopped.
    #[error("output is over max_output of {limit} bytes")]
    OutputTooLarge {
        /// The limit.
        limit: u64,
    },
    /// The task ran past its timeout; its process group was killed.
    #[error("timed out after {0:?}; the task and its children were killed")]
    TimedOut(Duration),
    /// The program could not be started.
    #[error("cannot start `{program}`: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The OS error.
        source: io::Error,
    },
    /// The private working directory could not be made.
    #[error("cannot create a working directory under {dir}: {source}")]
    Workdir {
        /// The parent directory.
        dir: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Reading input failed (the submitter went away, the connection broke).
    #[error("reading input: {0}")]
    Input(io::Error),
    /// Delivering output failed (the receiver went away).
    #[error("delivering output: {0}")]
    Output(io::Error),
    /// Talking to the child failed.
    #[error("child process: {0}")]
    Child(io::Error),
}

/// How a busy message names tasks still receiving their input (none: nothing).
fn uploading_text(uploading: usize) -> String {
    match uploading {
        0 => String::new(),
        n => format!(" (and {n} receiving their input)"),
    }
}

impl ExecError {
    /// The wire code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Busy { .. } => ErrorCode::Busy,
            Self::TooLarge { .. } => ErrorCode::TooLarge,
            Self::OutputTooLarge { .. } => ErrorCode::OutputTooLarge,
            Self::TimedOut(_) => ErrorCode::TimedOut,
            Self::Spawn { .. } => ErrorCode::SpawnFailed,
            Self::Workdir { .. } | Self::Input(_) | Self::Output(_) | Self::Child(_) => {
                ErrorCode::Internal
            }
        }
    }
}

/// Running, queued and capacity of an executor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Load {
    /// Tasks running now.
    pub running: usize,
    /// Tasks waiting for a slot.
    pub queued: usize,
    /// Slots.
    pub capacity: usize,
    /// Tasks accepted and still receiving their input ([`Executor::reserve_upload`]).
    pub uploading: usize,
}

/// Runs tasks with at most `capacity` at once and at most `queue_limit` waiting.
#[derive(Debug)]
pub struct Executor {
    slots: Arc<Semaphore>,
    capacity: usize,
    queue_limit: usize,
    queued: Arc<AtomicUsize>,
    running: Arc<AtomicUsize>,
    uploading: Arc<AtomicUsize>,
    work_root: PathBuf,
}

/// A held execution slot. Dropping it frees the slot.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    running: Arc<AtomicUsize>,
    /// How long the caller waited for it.
    pub waited: Duration,
}

#[derive(Debug, Clone)]
struct ExecHandle {
    slots: Arc<Semaphore>,
    running: Arc<AtomicUsize>,
    queued: Arc<AtomicUsize>,
}

#[derive(Debug)]
enum ReservationState {
    Ready(OwnedSemaphorePermit),
    Queued,
}

/// A slot taken, or a queue place held, by [`Executor::reserve`]. Dropping it gives
/// the place back.
#[derive(Debug)]
pub struct Reservation {
    state: Option<ReservationState>,
    exec: ExecHandle,
    start: Instant,
}

impl Reservation {
    /// True when the task has to wait for a slot.
    pub fn is_queued(&self) -> bool {
        matches!(self.state, Some(ReservationState::Queued))
    }

    /// Waits for the slot (at once when one was free at reservation time).
    pub async fn slot(mut self) -> Slot {
        if let Some(ReservationState::Queued) = self.state {
            // If this future is dropped while waiting, `state` is still `Queued` and
            // `Drop` gives the queue place back.
            let p = self
                .exec
                .slots
                .clone()
                .acquire_owned()
                .await
                .expect("executor semaphore is never closed");
            self.exec.queued.fetch_sub(1, Ordering::Relaxed);
            self.state = Some(ReservationState::Ready(p));
        }
        let Some(ReservationState::Ready(permit)) = self.state.take() else {
            unreachable!("a reservation is ready once its queue wait is over")
        };
        self.exec.running.fetch_add(1, Ordering::Relaxed);
        Slot {
            _permit: permit,
            running: self.exec.running.clone(),
            waited: self.start.elapsed(),
        }
    }
}

/// A task admitted while its input is still arriving, from
/// [`Executor::reserve_upload`]. It holds no slot and no queue place, so a slow upload
/// delays no one; [`Upload::into_reservation`] then takes a slot or a queue place
/// without being refused. Counted in [`Load::uploading`] until then or dropped.
#[derive(Debug)]
pub struct Upload {
    exec: ExecHandle,
    uploading: Arc<AtomicUsize>,
}

impl Upload {
    /// The input is here: takes a free slot, or else a place in the queue even when
    /// it is full (the task was admitted already): the queue may run over its limit
    /// by the uploads that were in progress when it filled.
    pub fn into_reservation(self) -> Reservation {
        let exec = self.exec.clone();
        drop(self);
        if let Ok(permit) = exec.slots.clone().try_acquire_owned() {
            return Reservation {
                state: Some(ReservationState::Ready(permit)),
                exec,
                start: Instant::now(),
            };
        }
        exec.queued.fetch_add(1, Ordering::Relaxed);
        Reservation {
            state: Some(ReservationState::Queued),
            exec,
            start: Instant::now(),
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        self.uploading.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(ReservationState::Queued) = self.state {
            self.exec.queued.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.running.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Executor {
    /// An executor with `capacity` slots (at least 1), a queue of `queue_limit`, and
    /// task working directories made under `work_root`.
    pub fn new(capacity: usize, queue_limit: usize, work_root: PathBuf) -> Self {
        let capacity = capacity.max(1);
        Self {
            slots: Arc::new(Semaphore::new(capacity)),
            capacity,
            queue_limit,
            queued: Arc::new(AtomicUsize::new(0)),
            running: Arc::new(AtomicUsize::new(0)),
            uploading: Arc::new(AtomicUsize::new(0)),
            work_root,
        }
    }

    /// Current load.
    pub fn load(&self) -> Load {
        Load {
            running: self.running.load(Ordering::Relaxed),
            queued: self.queued.load(Ordering::Relaxed),
            capacity: self.capacity,
            uploading: self.uploading.load(Ordering::Relaxed),
        }
    }

    /// Takes a slot now or a place in the bounded queue, without waiting; `Busy` when
    /// both are full. Callers that must answer "accepted" or "busy" before waiting use
    /// this, then [`Reservation::slot`].
    pub fn reserve(&self) -> Result<Reservation, ExecError> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(Reservation {
                state: Some(ReservationState::Ready(permit)),
                exec: self.handle(),
                start: Instant::now(),
            });
        }
        let q = self.queued.fetch_add(1, Ordering::Relaxed);
        if q >= self.queue_limit {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(ExecError::Busy {
                running: self.running.load(Ordering::Relaxed),
                queued: q,
                uploading: self.uploading.load(Ordering::Relaxed),
            });
        }
        Ok(Reservation {
            state: Some(ReservationState::Queued),
            exec: self.handle(),
            start: Instant::now(),
        })
    }

    /// Admits a task whose input is still to arrive, without taking anything: `Busy`
    /// when no slot is free and the queue is full now, as [`reserve`](Self::reserve)
    /// would say. Other uploads are not counted, so a slow upload never turns a
    /// task away; each takes its slot or queue place once its input is here.
    pub fn reserve_upload(&self) -> Result<Upload, ExecError> {
        let queued = self.queued.load(Ordering::Relaxed);
        if queued >= self.queue_limit + self.slots.available_permits() {
            return Err(ExecError::Busy {
                running: self.running.load(Ordering::Relaxed),
                queued,
                uploading: self.uploading.load(Ordering::Relaxed),
            });
        }
        self.uploading.fetch_add(1, Ordering::Relaxed);
        Ok(Upload {
            exec: self.handle(),
            uploading: self.uploading.clone(),
        })
    }

    /// Takes a slot, waiting in the bounded queue; `Busy` when the queue is full.
    pub async fn acquire(&self) -> Result<Slot, ExecError> {
        Ok(self.reserve()?.slot().await)
    }

    fn handle(&self) -> ExecHandle {
        ExecHandle {
            slots: self.slots.clone(),
            running: self.running.clone(),
            queued: self.queued.clone(),
        }
    }

    /// Waits for a slot, then runs the task.
    pub async fn run<I: Input, O: Output>(
        &self,
        task: &AdmittedTask,
        input: I,
        output: O,
    ) -> Result<Outcome, ExecError> {
        let slot = self.acquire().await?;
        let mut outcome = self.run_in_slot(&slot, task, input, output).await?;
        outcome.queue_time = slot.waited;
        Ok(outcome)
    }

    /// Runs the task in a slot the caller already holds.
    pub async fn run_in_slot<I: Input, O: Output>(
        &self,
        slot: &Slot,
        task: &AdmittedTask,
        input: I,
        output: O,
    ) -> Result<Outcome, ExecError> {
        let spec = task.spec();
        let start = Instant::now();
        let mut outcome = match &spec.kind {
            TaskKind::Builtin(b) => {
                let limits = Limits {
                    max_input: spec.max_input,
                    max_output: spec.max_output,
                };
                let fut = run_builtin(*b, task.args(), spec.timeout, limits, input, output);
                tokio::time::timeout(spec.timeout, fut)
                    .await
                    .map_err(|_| ExecError::TimedOut(spec.timeout))??
            }
            TaskKind::Command(argv) => {
                // Boxed: a command run holds a child, pipes and read buffers (~14 KiB of
                // future state) that every builtin run would otherwise carry and copy
                // each time its task is spawned.
                Box::pin(run_command(&self.work_root, task, argv, input, output)).await?
            }
        };
        outcome.queue_time = slot.waited;
        outcome.run_time = start.elapsed();
        Ok(outcome)
    }
}

#[derive(Clone, Copy)]
struct Limits {
    max_input: u64,
    max_output: u64,
}

async fn run_builtin<I: Input, O: Output>(
    which: Builtin,
    args: &[String],
    timeout: Duration,
    limits: Limits,
    mut input: I,
    mut output: O,
) -> Result<Outcome, ExecError> {
    let mut out = Outcome::default();
    match which {
        Builtin::Echo => {
            while let Some(chunk) = input.next_chunk().await.map_err(ExecError::Input)? {
                out.input_bytes += chunk.len() as u64;
                if out.input_bytes > limits.max_input {
                    return Err(ExecError::TooLarge {
                        limit: limits.max_input,
                    });
                }
                out.output_bytes += chunk.len() as u64;
                if out.output_bytes > limits.max_output {
                    return Err(ExecError::OutputTooLarge {
                        limit: limits.max_output,
                    });
                }
                output.write(chunk).await.map_err(ExecError::Output)?;
            }
        }
        Builtin::Sha256 => {
            let mut h = Sha256::new();
            while let Some(chunk) = input.next_chunk().await.map_err(ExecError::Input)? {
                out.input_bytes += chunk.len() as u64;
                if out.input_bytes > limits.max_input {
                    return Err(ExecError::TooLarge {
                        limit: limits.max_input,
                    });
                }
                h.update(&chunk);
            }
            let digest = format!("{}\n", hex::encode(h.finalize()));
            out.output_bytes = digest.len() as u64;
            output
                .write(Bytes::from(digest))
                .await
                .map_err(ExecError::Output)?;
        }
        Builtin::Spin => {
            let mut text = BytesMut::new();
            while let Some(chunk) = input.next_chunk().await.map_err(ExecError::Input)? {
                out.input_bytes += chunk.len() as u64;
                // The input is a number of milliseconds; a few bytes at most.
                if out.input_bytes > limits.max_input.min(64) {
                    return Err(ExecError::TooLarge {
                        limit: limits.max_input.min(64),
                    });
                }
                text.extend_from_slice(&chunk);
            }
            let from_input = std::str::from_utf8(&text)
                .ok()
                .and_then(|t| t.trim().parse::<u64>().ok());
            let ms = args
                .first()
                .and_then(|a| a.parse::<u64>().ok())
                .or(from_input)
                .unwrap_or(100);
            let want = Duration::from_millis(ms);
            // Stop at the timeout too: a blocking thread cannot be cancelled.
            let budget = want.min(timeout);
            tokio::task::spawn_blocking(move || spin(budget))
                .await
                .map_err(|e| ExecError::Child(io::Error::other(e)))?;
            let msg = format!("spun {ms} ms\n");
            out.output_bytes = msg.len() as u64;
            output
                .write(Bytes::from(msg))
                .await
                .map_err(ExecError::Output)?;
        }
    }
    Ok(out)
}

/// Burns one core until `d` has passed.
fn spin(d: Duration) {
    let end = Instant::now() + d;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while Instant::now() < end {
        for _ in 0..1000 {
            x = std::hint::black_box(x.rotate_left(5) ^ 0x2545_f491_4f6c_dd1d).wrapping_mul(31);
        }
    }
    std::hint::black_box(x);
}

/// Resolves a program name the way the child would, but only in `path` (never the
/// service's own `PATH`).
fn resolve_program(program: &str, path: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

/// Name prefix of a task's private working directory under the work root.
pub const WORKDIR_PREFIX: &str = "updraft-task-";

/// Creates `work_root` if needed and removes the task working directories a crashed or
/// killed run left in it (`updraft-task-*`; nothing else is touched). Call at service
/// start, before any task runs. Returns how many were removed.
pub fn sweep_work_root(work_root: &Path) -> io::Result<usize> {
    std::fs::create_dir_all(work_root)?;
    let mut removed = 0;
    for entry in std::fs::read_dir(work_root)? {
        let entry = entry?;
        let stale = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(WORKDIR_PREFIX));
        // Not followed: a symlink named like a working directory is not ours.
        if !stale || !entry.file_type()?.is_dir() {
            continue;
        }
        match std::fs::remove_dir_all(entry.path()) {
            Ok(()) => removed += 1,
            Err(e) => tracing::warn!(
                dir = %entry.path().display(),
                "cannot remove a stale task working directory: {e}; remove it by hand"
            ),
        }
    }
    Ok(removed)
}

async fn run_command<I: Input, O: Output>(
    work_root: &Path,
    task: &AdmittedTask,
    argv: &[String],
    mut input: I,
    mut output: O,
) -> Result<Outcome, ExecError> {
    let spec = task.spec();
    let path = spec.env.get("PATH").map_or(DEFAULT_PATH, String::as_str);
    let program = resolve_program(&argv[0], path).ok_or_else(|| ExecError::Spawn {
        program: argv[0].clone(),
        source: io::Error::new(io::ErrorKind::NotFound, format!("not found in {path}")),
    })?;
    let workdir = tempfile::Builder::new()
        .prefix(WORKDIR_PREFIX)
        .tempdir_in(work_root)
        .map_err(|source| ExecError::Workdir {
            dir: work_root.to_path_buf(),
            source,
        })?;
    let spawn_error = |source| ExecError::Spawn {
        program: argv[0].clone(),
        source,
    };
    let (mut cmd, prepared) = crate::contain::command(&program).map_err(spawn_error)?;
    cmd.args(&argv[1..])
        .args(task.args())
        .env_clear()
        .envs(&spec.env)
        .envs(task.task_id().map(|id| ("UPDRAFT_TASK_ID", id)))
        .current_dir(workdir.path())
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // Dropping the guard, on every way out of this function (the caller's future
    // dropped included), kills everything the task started.
    let (mut child, guard) = crate::contain::spawn(&mut cmd, prepared).map_err(spawn_error)?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let (max_input, max_output) = (spec.max_input, spec.max_output);

    let feed = async {
        let mut n: u64 = 0;
        let mut child_reads = true;
        while let Some(chunk) = input.next_chunk().await.map_err(ExecError::Input)? {
            n += chunk.len() as u64;
            if n > max_input {
                return Err(ExecError::TooLarge { limit: max_input });
            }
            // A child may stop reading early (`head -c1`); the rest of the input is
            // still consumed so the submitter is not left blocked, and still counted.
            if child_reads && stdin.write_all(&chunk).await.is_err() {
                child_reads = false;
            }
        }
        drop(stdin);
        Ok(n)
    };
    let drain = async {
        let mut n: u64 = 0;
        loop {
            let mut buf = BytesMut::with_capacity(READ_CHUNK);
            let got = stdout.read_buf(&mut buf).await.map_err(ExecError::Child)?;
            if got == 0 {
                return Ok(n);
            }
            n += got as u64;
            if n > max_output {
                return Err(ExecError::OutputTooLarge { limit: max_output });
            }
            output
                .write(buf.freeze())
                .await
                .map_err(ExecError::Output)?;
        }
    };
    let tail = async {
        let mut tail: Vec<u8> = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(got) = stderr.read(&mut buf).await {
            if got == 0 {
                break;
            }
            tail.extend_from_slice(&buf[..got]);
            if tail.len() > STDERR_TAIL {
                tail.drain(..tail.len() - STDERR_TAIL);
            }
        }
        tail
    };
    let all = async {
        // The first error (input too large, output too large, receiver gone) ends the
        // run at once; stderr is read alongside so a chatty child cannot block on it.
        let (input_bytes, output_bytes, tail) =
            tokio::try_join!(feed, drain, async { Ok(tail.await) })?;
        let status = child.wait().await.map_err(ExecError::Child)?;
        Ok::<_, ExecError>((status, input_bytes, output_bytes, tail))
    };
    let result = tokio::time::timeout(spec.timeout, all).await;
    // Whatever happened, nothing the task started may outlive it: a background child
    // that closed its stdout would otherwise linger.
    drop(guard);
    let (status, input_bytes, output_bytes, stderr_tail) = match result {
        Ok(r) => r?,
        Err(_) => return Err(ExecError::TimedOut(spec.timeout)),
    };
    drop(workdir);
    use std::os::unix::process::ExitStatusExt;
    let exit_code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1);
    Ok(Outcome {
        exit_code,
        stderr_tail,
        input_bytes,
        output_bytes,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Caller, Catalog, TaskFile};
    use std::collections::BTreeMap;

    fn task(name: &str, file: TaskFile) -> AdmittedTask {
        let mut m = BTreeMap::new();
        m.insert(name.to_string(), file);
        Catalog::from_files(m)
            .unwrap()
            .admit(name, vec![], None, Caller::Local)
            .unwrap()
    }

    fn cmd(argv: &[&str]) -> TaskFile {
        TaskFile {
            command: Some(argv.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        }
    }

    fn exec() -> (Executor, tempfile::TempDir) {
        let d = tempfile::tempdir().unwrap();
        (Executor::new(2, 4, d.path().to_path_buf()), d)
    }

    #[tokio::test]
    async fn command_streams_and_reports_exit() {
        let (ex, _d) = exec();
        let t = task("cat", cmd(&["cat"]));
        let mut out = Vec::new();
        let o = ex
            .run(&t, Some(Bytes::from_static(b"hello")), &mut out)
            .await
            .unwrap();
        assert_eq!(out, b"hello");
        assert_eq!(o.exit_code, 0);
        assert_eq!(o.input_bytes, 5);

        let t = task("fail", cmd(&["sh", "-c", "echo oops >&2; exit 3"]));
        let o = ex.run(&t, None, Vec::new()).await.unwrap();
        assert_eq!(o.exit_code, 3);
        assert_eq!(o.stderr_tail, b"oops\n");
    }

    #[tokio::test]
    async fn clean_environment_and_private_workdir() {
        let (ex, d) = exec();
        let mut f = cmd(&["sh", "-c", "env; pwd"]);
        f.env.insert("ONLY".into(), "me".into());
        let t = task("env", f);
        let mut out = Vec::new();
        ex.run(&t, None, &mut out).await.unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("ONLY=me"), "{text}");
        assert!(
            !text.contains("HOME="),
            "service environment leaked: {text}"
        );
        let pwd = text.lines().last().unwrap();
        assert!(pwd.starts_with(d.path().to_str().unwrap()), "{pwd}");
        assert!(
            !Path::new(pwd).exists(),
            "working directory was not removed"
        );
    }

    #[tokio::test]
    async fn limits_are_enforced() {
        let (ex, _d) = exec();
        let mut f = cmd(&["cat"]);
        f.max_input = Some(updraft_proto::units::ByteSize(4));
        let t = task("cat", f);
        let e = ex
            .run(&t, Some(Bytes::from_static(b"hello")), Vec::new())
            .await
            .unwrap_err();
        assert_eq!(e.code(), ErrorCode::TooLarge);

        let mut f = cmd(&["sh", "-c", "yes | head -c 100000"]);
        f.max_output = Some(updraft_proto::units::ByteSize(1000));
        let e = ex.run(&task("yes", f), None, Vec::new()).await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::OutputTooLarge);
    }

    #[tokio::test]
    async fn builtins() {
        let (ex, _d) = exec();
        let mut out = Vec::new();
        let t = task(
            "s",
            TaskFile {
                builtin: Some("sha256".into()),
                ..Default::default()
            },
        );
        ex.run(&t, Some(Bytes::from_static(b"abc")), &mut out)
            .await
            .unwrap();
        assert_eq!(
            out,
            b"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n"
        );
        let mut out = Vec::new();
        let t = task(
            "e",
            TaskFile {
                builtin: Some("echo".into()),
                ..Default::default()
            },
        );
        ex.run(&t, Some(Bytes::from_static(b"xyz")), &mut out)
            .await
            .unwrap();
        assert_eq!(out, b"xyz");
    }

    #[tokio::test]
    async fn queue_is_bounded() {
        let d = tempfile::tempdir().unwrap();
        let ex = Executor::new(1, 1, d.path().to_path_buf());
        let _held = ex.acquire().await.unwrap();
        let waiting = ex.acquire();
        tokio::pin!(waiting);
        // Poll once so the second caller takes the one queue place.
        assert!(futures_poll_once(waiting.as_mut()).await.is_none());
        assert_eq!(ex.load().queued, 1);
        assert!(matches!(ex.acquire().await, Err(ExecError::Busy { .. })));
    }

    #[test]
    fn sweep_work_root_removes_only_task_dirs() {
        let d = tempfile::tempdir().unwrap();
        let work = d.path().join("work");
        std::fs::create_dir_all(work.join("updraft-task-x1/sub")).unwrap();
        std::fs::write(work.join("updraft-task-x1/sub/f"), b"x").unwrap();
        std::fs::create_dir(work.join("updraft-task-x2")).unwrap();
        std::fs::write(work.join("updraft-task-file"), b"not a dir").unwrap();
        std::fs::write(work.join("keep"), b"k").unwrap();
        let outside = d.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, work.join("updraft-task-link")).unwrap();
        assert_eq!(sweep_work_root(&work).unwrap(), 2);
        let mut left: Vec<String> = std::fs::read_dir(&work)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["keep", "updraft-task-file", "updraft-task-link"]);
        assert!(outside.is_dir());
        // A missing root is created.
        assert_eq!(sweep_work_root(&d.path().join("new/work")).unwrap(), 0);
        assert!(d.path().join("new/work").is_dir());
    }

    fn alive(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit(')').next().map(|r| r.trim_start().to_string()))
            .is_some_and(|r| !r.starts_with('Z'))
    }

    #[tokio::test]
    async fn a_dropped_run_kills_the_whole_process_group() {
        let (ex, d) = exec();
        let pidfile = d.path().join("bg.pid");
        let script = format!(
            "sleep 1001 >/dev/null 2>&1 & echo $! > {0}.tmp; mv {0}.tmp {0}; exec sleep 1003",
            pidfile.display()
        );
        let t = task("wait", cmd(&["sh", "-c", &script]));
        let run = ex.run(&t, None, Vec::new());
        let pid = tokio::select! {
            r = run => panic!("the run ended early: {r:?}"),
            pid = async {
                for _ in 0..1000 {
                    if let Some(pid) = std::fs::read_to_string(&pidfile).ok().and_then(|p| p.trim().parse::<i32>().ok()) {
                        return pid;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                panic!("the task never wrote {}", pidfile.display());
            } => pid,
        };
        // The run's future is dropped here, as when a submitter goes away.
        for _ in 0..1000 {
            if !alive(pid) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("background child {pid} outlived its dropped run");
    }

    #[tokio::test]
    async fn an_upload_holds_no_slot_and_no_queue_place() {
        let d = tempfile::tempdir().unwrap();
        let ex = Executor::new(1, 1, d.path().to_path_buf());
        let upload = ex.reserve_upload().unwrap();
        assert_eq!((ex.load().uploading, ex.load().running), (1, 0));
        // The slot and the queue place are still there for others.
        let _slot = ex.reserve().unwrap().slot().await;
        let waiting = ex.reserve().unwrap();
        assert!(waiting.is_queued());
        let e = ex.reserve().unwrap_err();
        assert!(e.to_string().contains("1 receiving their input"), "{e}");
        // Nothing free now: a new upload is refused like any task.
        assert!(matches!(ex.reserve_upload(), Err(ExecError::Busy { .. })));
        // The admitted upload's input arrived: it queues, over the limit if need be.
        let queued = upload.into_reservation();
        assert!(queued.is_queued());
        assert_eq!((ex.load().uploading, ex.load().queued), (0, 2));
        drop((queued, waiting));
        assert_eq!(ex.load().queued, 0);
    }

    async fn futures_poll_once<F: Future + Unpin>(f: F) -> Option<F::Output> {
        let mut f = f;
        std::future::poll_fn(|cx| match std::pin::Pin::new(&mut f).poll(cx) {
            std::task::Poll::Ready(v) => std::task::Poll::Ready(Some(v)),
            std::task::Poll::Pending => std::task::Poll::Ready(None),
        })
        .await
    }
}
