//! Detached tasks (`detach=true`): accepted into the SQLite journal with a durable
//! commit, run in the background by one dispatcher at most `[journal] max_running` at
//! once, resumed after a restart, and kept with their output until fetched, deleted or
//! expired.

use crate::journal::{self, Finish, Journal, JournalInput, NewTask, TaskRow};
use crate::placement::{Side, Where};
use crate::service::spool_error;
use crate::service::Agent;
use crate::spool::Spool;
use crate::task::{new_task_id, valid_task_id, Finished, Submission, TaskCode, TaskError};
use crate::uplink::OnDrop;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use updraft_proto::ErrorCode;
use updraft_shared::catalog::Caller;
use updraft_shared::exec::Input;

/// Runs of one detached task lost mid-run before it is failed with `cloud_failed`: a
/// task that keeps losing its daemon must not be passed around forever.
pub(crate) const MAX_DETACHED_RETRIES: u32 = 10;
/// How often a detached task that may only run in the cloud re-checks for a daemon
/// while none is usable. It is also woken as soon as one connects, so this only
/// bounds how long a missed wake-up can cost; 5 s is nothing next to a reconnect.
pub(crate) const DETACHED_CLOUD_POLL: Duration = Duration::from_secs(5);
/// How often finished detached tasks past their time-to-live are dropped: TTLs are
/// minutes to days, so a minute late costs little, and a sweep is one small query.
pub(crate) const EXPIRE_EVERY: Duration = Duration::from_secs(60);
/// How often a failure that could not be written to the journal (a full disk) is
/// tried again: soon after space is freed, and a failed try costs one write.
pub(crate) const UNSTORED_RETRY_EVERY: Duration = Duration::from_secs(5);

/// The dispatcher's housekeeping between tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chore {
    /// Drop finished tasks past their time-to-live ([`EXPIRE_EVERY`]).
    Expire,
    /// Write failures kept in memory ([`UNSTORED_RETRY_EVERY`]).
    StoreUnstored,
}

/// The timers of the dispatcher's chores. Both fire at once on the first call, and a
/// late tick (a busy dispatcher) delays the next rather than bunching them.
#[derive(Debug)]
pub(crate) struct Chores {
    expire: tokio::time::Interval,
    unstored: tokio::time::Interval,
}

impl Chores {
    pub(crate) fn new() -> Self {
        let interval = |every| {
            let mut i = tokio::time::interval(every);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        };
        Self {
            expire: interval(EXPIRE_EVERY),
            unstored: interval(UNSTORED_RETRY_EVERY),
        }
    }

    /// The next chore that is due.
    pub(crate) async fn next(&mut self) -> Chore {
        tokio::select! {
            _ = self.expire.tick() => Chore::Expire,
            _ = self.unstored.tick() => Chore::StoreUnstored,
        }
    }
}

impl Agent {
    async fn do_chore(&self, chore: Chore) {
        match chore {
            Chore::Expire => {
                let journal = self.detached.journal.clone();
                match tokio::task::spawn_blocking(move || journal.expire(unix_ms())).await {
                    Ok(Ok(n)) if n > 0 => debug!(tasks = n, "expired finished detached tasks"),
                    Ok(Err(e)) => {
                        warn!(error = %e, "cannot drop expired results from the journal")
                    }
                    _ => {}
                }
            }
            Chore::StoreUnstored => self.store_unstored().await,
        }
    }

    /// Detached tasks whose failure is kept in memory only (a full disk).
    pub(crate) fn unstored_count(&self) -> usize {
        self.detached.unstored.lock().expect("unstored lock").len()
    }

    /// Accepts a detached task: admits it, spools its input, and stores both in the
    /// journal with a durable commit; only then is the id returned (and the 202 sent),
    /// so an accepted task survives a crash. It runs in the background
    /// ([`Agent::run_detached`]).
    pub async fn submit_detached<I: Input>(
        self: &Arc<Self>,
        sub: Submission,
        mut input: I,
    ) -> Result<String, TaskError> {
        // Check admission before spooling so a bad request costs nothing.
        let task = self
            .catalog
            .admit(&sub.task, sub.args.clone(), sub.input_len, Caller::Local)
            .map_err(|r| TaskError::new(r.code, r.message))?;
        let max = task.spec().max_input;
        let mut spool = self.new_spool();
        use updraft_shared::exec::Output;
        while let Some(chunk) = input.next_chunk().await.map_err(|e| {
            TaskError::new(
                TaskCode::Wire(ErrorCode::BadRequest),
                format!("reading input: {e}"),
            )
        })? {
            if spool.len() + chunk.len() as u64 > max {
                return Err(TaskError::new(
                    TaskCode::Wire(ErrorCode::TooLarge),
                    format!(
                        "input is over task `{}`'s max_input of {max} bytes",
                        sub.task
                    ),
                ));
            }
            spool
                .write(chunk)
                .await
                .map_err(|e| spool_error("spooling input", &e))?;
        }
        spool
            .flush()
            .await
            .map_err(|e| spool_error("spooling input", &e))?;
        let id = new_task_id();
        let new = NewTask {
            id: id.clone(),
            task: sub.task.clone(),
            args: sub.args.clone(),
            requested: sub.where_,
        };
        let len = spool.len();
        let journal = self.detached.journal.clone();
        tokio::task::spawn_blocking(move || {
            let mut reader = spool.into_blocking_reader().map_err(|e| {
                TaskError::new(
                    TaskCode::Wire(ErrorCode::Internal),
                    format!("reading spooled input: {e}"),
                )
            })?;
            journal
                .insert(&new, len, &mut reader, unix_ms())
                .map_err(journal_error)
        })
        .await
        .map_err(|e| {
            TaskError::new(
                TaskCode::Wire(ErrorCode::Internal),
                format!("storing the task: {e}"),
            )
        })??;
        info!(
            id,
            task = sub.task,
            input_bytes = len,
            "detached task accepted"
        );
        let _ = self.detached.tx.send(id.clone());
        Ok(id)
    }

    /// Runs a journaled task to its end and stores the result: waits for the cloud
    /// first when the task may only run there, retries it (same id) when it is lost
    /// mid-run with an input too large to replay from memory.
    async fn run_detached(self: &Arc<Self>, id: String, resumed: bool, stop: &CancellationToken) {
        let Some(row) = self
            .journal_call(|j, id| j.get(id), &id)
            .await
            .ok()
            .flatten()
        else {
            return;
        };
        if row.state.is_finished() {
            return;
        }
        let fail = |code: TaskCode, message: String| Finish {
            state: journal::Ending::Failed,
            placement: Side::Local,
            reason: "not run".into(),
            exit_code: None,
            error: Some((code.as_str().to_string(), message)),
            stderr_tail: String::new(),
        };
        if resumed
            && row.state == journal::State::Running
            && row.attempts >= self.config.journal.max_attempts
        {
            let message = format!(
                "task `{}` was started {} times and never finished (the agent stopped or crashed each time); not starting it again (raise [journal] max_attempts to allow more)",
                row.task, row.attempts
            );
            warn!(id, task = row.task, "{message}");
            self.store_result(&row, fail(TaskCode::CrashLoop, message), None)
                .await;
            return;
        }
        let Some(spec) = self.catalog.get(&row.task) else {
            let message = format!(
                "unknown task `{}`: there is no [tasks.{}] in the config any more",
                row.task, row.task
            );
            self.store_result(
                &row,
                fail(TaskCode::Wire(ErrorCode::UnknownTask), message),
                None,
            )
            .await;
            return;
        };
        let must_cloud = row.requested == Where::Cloud
            || (row.requested == Where::Auto
                && spec.offload == updraft_shared::catalog::Offload::Always);
        let sub = Submission {
            task: row.task.clone(),
            args: row.args.clone(),
            where_: row.requested,
            input_len: Some(row.input_len),
        };
        let mut lost_runs = 0;
        loop {
            if must_cloud && self.uplink.pick().is_none() {
                debug!(id, task = row.task, "detached task waits for a daemon");
                tokio::select! {
                    _ = self.uplink.wait_usable(DETACHED_CLOUD_POLL) => continue,
                    () = stop.cancelled() => return,
                }
            }
            if let Err(e) = self.journal_call(|j, id| j.start(id, unix_ms()), &id).await {
                warn!(id, error = %e, "cannot mark the detached task running; failing it");
                let message = format!("task `{}` was not started: {}", row.task, e.message);
                self.store_result(&row, fail(e.code, message), None).await;
                return;
            }
            let input = JournalInput::new(self.detached.journal.clone(), id.clone());
            let r = tokio::select! {
                // Never cancelled on the daemon: after a restart the journal runs it
                // again with the same id, and the daemon may answer from that run.
                r = self.submit_with_id(id.clone(), sub.clone(), input, OnDrop::Leave) => r,
                // The journal still says running: the next start resumes it.
                () = stop.cancelled() => return,
            };
            match r {
                Err(e) if must_cloud && e.code.cloud_may_come_back() => {
                    info!(id, task = row.task, error = %e.message, "detached task waits for the cloud and will be retried");
                    let _ = self.journal_call(|j, id| j.requeue(id), &id).await;
                    tokio::select! {
                        () = tokio::time::sleep(self.config.link.reconnect_min) => continue,
                        () = stop.cancelled() => return,
                    }
                }
                Ok(f)
                    if lost_runs < MAX_DETACHED_RETRIES
                        && matches!(&f.result, Err(e) if e.code == TaskCode::CloudFailed) =>
                {
                    lost_runs += 1;
                    // Lost mid-run and not replayable from memory: the journal has the
                    // whole input, so run it again from there (the daemon answers a
                    // retry it still remembers from its memory).
                    info!(id, task = row.task, reason = %f.reason, "detached task lost mid-run; retrying from the journal");
                    continue;
                }
                Err(e) => {
                    self.store_result(&row, fail(e.code, e.message), None).await;
                    return;
                }
                Ok(f) if f.output.disk_full() => {
                    let message = format!(
                        "task `{}`: its output could not be spooled in {}: the filesystem is full; free space there (the task is not run again)",
                        row.task,
                        self.config.state_dir.join("spool").display()
                    );
                    let fin = Finish {
                        placement: f.side,
                        reason: f.reason,
                        ..fail(TaskCode::StorageFull, message)
                    };
                    self.store_result(&row, fin, None).await;
                    return;
                }
                Ok(f) => {
                    let (fin, output) = finish_of(f);
                    self.store_result(&row, fin, Some(output)).await;
                    return;
                }
            }
        }
    }

    /// Stores how a detached task ended, with its output, and wakes its waiters. When
    /// that fails (a full disk, most likely), the task is stored as failed without its
    /// output (`storage_full` or `internal`); when even that fails, the failure is kept
    /// in memory, shown from there, and written as soon as the journal takes it. Either
    /// way the task has ended: it is not run again in this process.
    async fn store_result(&self, row: &TaskRow, fin: Finish, output: Option<Spool>) {
        let journal = self.detached.journal.clone();
        let id = row.id.clone();
        let task = row.task.clone();
        let stored =
            tokio::task::spawn_blocking(move || store_or_fail(&journal, &id, &task, fin, output))
                .await;
        let id = row.id.as_str();
        match stored {
            Ok(Stored::Output(journal::Stored::Output)) => {}
            Ok(Stored::Output(journal::Stored::JournalFull)) => {
                warn!(id, "the journal is full: the task's output was not kept (it is marked journal_full); fetch old results or raise [journal] max_bytes");
            }
            Ok(Stored::Failure(fin)) => {
                let (code, message) = fin.error.clone().unwrap_or_default();
                warn!(id, code, "{message}");
            }
            Ok(Stored::Gone(e)) => {
                warn!(id, error = %e, "the detached task's result was not stored")
            }
            Ok(Stored::Nowhere(fin, e)) => {
                let (code, message) = fin.error.clone().unwrap_or_default();
                tracing::error!(id, code, error = %e, "{message}; not even this failure could be written to the journal: it is kept in memory and written once there is room (if the agent restarts first, the task runs again)");
                // Its attempts as counted now, when the journal can still be read.
                let now = self.journal_call(|j, id| j.get(id), id).await;
                let failed = failed_row(&now.ok().flatten().unwrap_or_else(|| row.clone()), &fin);
                self.detached
                    .unstored
                    .lock()
                    .expect("unstored lock")
                    .insert(row.id.clone(), failed);
            }
            Err(e) => warn!(id, error = %e, "storing the detached task's result failed"),
        }
        self.detached.done.notify_waiters();
    }

    /// Writes the failures kept in memory (when even a failure could not be stored) to
    /// the journal, as many as it takes now.
    pub async fn store_unstored(&self) {
        let pending: Vec<TaskRow> = {
            let unstored = self.detached.unstored.lock().expect("unstored lock");
            unstored.values().cloned().collect()
        };
        for row in pending {
            let journal = self.detached.journal.clone();
            let fin = row_finish(&row);
            let id = row.id.clone();
            let r = tokio::task::spawn_blocking(move || {
                journal.finish(&id, &fin, 0, &mut std::io::empty(), unix_ms())
            })
            .await;
            let done = match r {
                Ok(Ok(_)) => {
                    info!(
                        id = row.id,
                        "the failure kept in memory is now written to the journal"
                    );
                    true
                }
                Ok(Err(
                    journal::JournalError::NotFound { .. }
                    | journal::JournalError::WrongState { .. },
                )) => true,
                _ => false,
            };
            if done {
                self.detached
                    .unstored
                    .lock()
                    .expect("unstored lock")
                    .remove(&row.id);
            }
        }
    }

    async fn journal_call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Journal, &str) -> Result<T, journal::JournalError> + Send + 'static,
        id: &str,
    ) -> Result<T, TaskError> {
        let journal = self.detached.journal.clone();
        let id = id.to_string();
        tokio::task::spawn_blocking(move || f(&journal, &id))
            .await
            .map_err(|e| {
                TaskError::new(
                    TaskCode::Wire(ErrorCode::Internal),
                    format!("journal call failed: {e}"),
                )
            })?
            .map_err(journal_error)
    }

    /// A detached task's state; with `wait`, blocks until it has finished.
    pub async fn task_state(&self, id: &str, wait: bool) -> Result<Option<TaskRow>, TaskError> {
        if !valid_task_id(id) {
            return Ok(None);
        }
        loop {
            let notified = self.detached.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(r) = self
                .detached
                .unstored
                .lock()
                .expect("unstored lock")
                .get(id)
            {
                return Ok(Some(r.clone()));
            }
            let row = self.journal_call(|j, id| j.get(id), id).await?;
            match row {
                Some(r) if wait && !r.state.is_finished() => notified.await,
                other => return Ok(other),
            }
        }
    }

    /// A finished detached task's output, streamed from the journal; marks it fetched.
    pub async fn task_output(&self, id: &str) -> Result<(TaskRow, JournalInput), TaskError> {
        let row = self
            .task_state(id, false)
            .await?
            .ok_or_else(|| detached_not_found(id))?;
        if !row.state.is_finished() {
            return Err(TaskError::new(
                TaskCode::NotReady,
                format!("task `{id}` is still {}", row.state),
            ));
        }
        if self
            .detached
            .unstored
            .lock()
            .expect("unstored lock")
            .contains_key(id)
        {
            let (code, message) = row.error.unwrap_or_default();
            let code = TaskCode::parse(&code).unwrap_or(TaskCode::Wire(ErrorCode::Internal));
            return Err(TaskError::new(code, message));
        }
        self.journal_call(|j, id| j.mark_fetched(id, unix_ms()), id)
            .await?;
        Ok((row, JournalInput::output(self.detached.journal.clone(), id)))
    }

    /// Deletes a finished detached task and its output (`DELETE /v1/tasks/{id}`). A
    /// queued or running one is refused with `not_ready`: it is not cancelled.
    pub async fn delete_task(&self, id: &str) -> Result<(), TaskError> {
        if !valid_task_id(id) {
            return Err(detached_not_found(id));
        }
        // A failure kept in memory is a journal row still unfinished: write it first.
        self.store_unstored().await;
        if self
            .detached
            .unstored
            .lock()
            .expect("unstored lock")
            .contains_key(id)
        {
            return Err(TaskError::new(
                TaskCode::StorageFull,
                format!("task `{id}` failed but even its failure could not be written to the journal yet (the filesystem holding state_dir is full); free space there and delete it again"),
            ));
        }
        let journal = self.detached.journal.clone();
        let key = id.to_string();
        let r = tokio::task::spawn_blocking(move || journal.delete(&key))
            .await
            .map_err(|e| {
                TaskError::new(
                    TaskCode::Wire(ErrorCode::Internal),
                    format!("deleting the task: {e}"),
                )
            })?;
        match r {
            Ok(()) => {
                info!(id, "detached task deleted");
                // Room for a failure still waiting to be written.
                self.store_unstored().await;
                Ok(())
            }
            Err(journal::JournalError::NotFound { .. }) => Err(detached_not_found(id)),
            Err(journal::JournalError::WrongState { state, .. }) => Err(TaskError::new(
                TaskCode::NotReady,
                format!("task `{id}` is still {state}; only a finished task can be deleted (wait for it with ?wait=true)"),
            )),
            Err(e) => Err(journal_error(e)),
        }
    }
}

/// How a detached task that ran ended, as the journal stores it, and its output.
fn finish_of(f: Finished) -> (Finish, Spool) {
    let (state, exit_code, error, stderr_tail) = match f.result {
        Ok(exit) => (
            journal::Ending::Done,
            Some(exit.code),
            None,
            exit.stderr_tail,
        ),
        Err(e) => (
            journal::Ending::Failed,
            None,
            Some((e.code.as_str().to_string(), e.message)),
            String::new(),
        ),
    };
    let fin = Finish {
        state,
        placement: f.side,
        reason: f.reason,
        exit_code,
        error,
        stderr_tail,
    };
    (fin, f.output)
}

/// How [`store_or_fail`] left a finished detached task.
enum Stored {
    /// As it ended, with its output (or as `journal_full`).
    Output(journal::Stored),
    /// Its result could not be stored; this failure was, instead.
    Failure(Finish),
    /// Nothing to store: the journal no longer holds it unfinished.
    Gone(journal::JournalError),
    /// Neither its result nor this failure could be stored (the second error).
    Nowhere(Finish, journal::JournalError),
}

/// Stores a finished detached task's result; when that fails, stores it as failed
/// (`storage_full` when the disk is full) without output instead. Blocking.
fn store_or_fail(
    journal: &Journal,
    id: &str,
    task: &str,
    fin: Finish,
    output: Option<Spool>,
) -> Stored {
    use journal::JournalError as E;
    let now = unix_ms();
    let r = match output {
        Some(spool) => {
            let len = spool.len();
            match spool.into_blocking_reader() {
                Ok(mut reader) => journal.finish(id, &fin, len, &mut reader, now),
                Err(source) => Err(E::Read {
                    path: journal.path().to_path_buf(),
                    id: id.to_string(),
                    what: "output",
                    source,
                }),
            }
        }
        None => journal.finish(id, &fin, 0, &mut std::io::empty(), now),
    };
    let e = match r {
        Ok(stored) => return Stored::Output(stored),
        Err(e @ (E::NotFound { .. } | E::WrongState { .. })) => return Stored::Gone(e),
        Err(e) => e,
    };
    let full = match &e {
        E::DiskFull { .. } => true,
        E::Read { source, .. } => crate::spool::is_disk_full(source),
        _ => false,
    };
    let code = if full {
        TaskCode::StorageFull
    } else {
        TaskCode::Wire(ErrorCode::Internal)
    };
    let mut message =
        format!("task `{task}` ended but its result could not be stored: {e}; it is not run again");
    if let Some((c, m)) = &fin.error {
        message.push_str(&format!("; the run itself failed: {c}: {m}"));
    }
    let failure = Finish {
        state: journal::Ending::Failed,
        error: Some((code.as_str().to_string(), message)),
        ..fin
    };
    match journal.finish(id, &failure, 0, &mut std::io::empty(), now) {
        Ok(_) => Stored::Failure(failure),
        Err(e @ (E::NotFound { .. } | E::WrongState { .. })) => Stored::Gone(e),
        Err(e) => Stored::Nowhere(failure, e),
    }
}

/// A detached task as it ended, for a failure kept in memory.
fn failed_row(row: &TaskRow, fin: &Finish) -> TaskRow {
    TaskRow {
        state: fin.state.into(),
        finished_ms: Some(unix_ms()),
        placement: Some(fin.placement),
        reason: Some(fin.reason.clone()),
        exit_code: fin.exit_code,
        error: fin.error.clone(),
        stderr_tail: Some(fin.stderr_tail.clone()),
        output_len: Some(0),
        ..row.clone()
    }
}

/// The [`Finish`] a failure kept in memory is written with.
fn row_finish(row: &TaskRow) -> Finish {
    Finish {
        state: journal::Ending::Failed,
        placement: row.placement.unwrap_or(Side::Local),
        reason: row.reason.clone().unwrap_or_default(),
        exit_code: row.exit_code,
        error: row.error.clone(),
        stderr_tail: row.stderr_tail.clone().unwrap_or_default(),
    }
}

/// Now, in Unix milliseconds (the journal's clock).
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A journal failure as the submitter sees it.
pub(crate) fn journal_error(e: journal::JournalError) -> TaskError {
    let code = match e {
        journal::JournalError::Full { .. } => TaskCode::JournalFull,
        journal::JournalError::DiskFull { .. } => TaskCode::StorageFull,
        journal::JournalError::TooLarge { .. } => TaskCode::Wire(ErrorCode::TooLarge),
        _ => TaskCode::Wire(ErrorCode::Internal),
    };
    TaskError::new(code, e.to_string())
}

/// The error for an id the journal does not hold.
pub(crate) fn detached_not_found(id: &str) -> TaskError {
    TaskError::new(
        TaskCode::NotFound,
        format!("no detached task `{id}` (finished tasks are kept for [journal] result_ttl, and for fetched_ttl after their output was fetched)"),
    )
}

/// Runs detached tasks: the journal's unfinished ones first (after a restart), then each
/// newly accepted one, at most `[journal] max_running` at once; drops expired results.
pub(crate) async fn dispatch_detached(
    agent: Arc<Agent>,
    tracker: tokio_util::task::TaskTracker,
    stop: CancellationToken,
) {
    let Some(mut rx) = agent.detached.rx.lock().expect("detached lock").take() else {
        return;
    };
    let journal = agent.detached.journal.clone();
    let resumed = match tokio::task::spawn_blocking(move || journal.unfinished()).await {
        Ok(Ok(rows)) => rows,
        Ok(Err(e)) => {
            warn!(error = %e, "cannot list the journal's unfinished tasks; they run after the next restart");
            Vec::new()
        }
        Err(e) => {
            warn!(error = %e, "listing the journal's unfinished tasks failed");
            Vec::new()
        }
    };
    if !resumed.is_empty() {
        info!(
            tasks = resumed.len(),
            "resuming detached tasks from the journal"
        );
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(
        agent.config.journal.max_running,
    ));
    let mut resumed = resumed.into_iter().map(|r| r.id);
    let mut chores = Chores::new();
    loop {
        let (id, was_resumed) = match resumed.next() {
            Some(id) => (id, true),
            None => tokio::select! {
                id = rx.recv() => match id {
                    Some(id) => (id, false),
                    None => return,
                },
                chore = chores.next() => {
                    agent.do_chore(chore).await;
                    continue;
                }
                () = stop.cancelled() => return,
            },
        };
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            () = stop.cancelled() => return,
        };
        let (agent, stop) = (agent.clone(), stop.clone());
        tracker.spawn(async move {
            agent.run_detached(id, was_resumed, &stop).await;
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::{finish_of, journal, Chore, Chores, EXPIRE_EVERY, UNSTORED_RETRY_EVERY};
    use crate::placement::Side;
    use crate::spool::Spool;
    use crate::task::{Exit, Finished, TaskCode, TaskError};
    use updraft_proto::ErrorCode;

    fn finished(result: Result<Exit, TaskError>) -> Finished {
        Finished {
            id: "0".repeat(32),
            side: Side::Cloud,
            reason: "where=cloud".into(),
            result,
            output: Spool::new("/nonexistent".into(), 16),
        }
    }

    #[test]
    fn a_run_is_stored_as_done_with_its_exit_or_failed_with_its_code() {
        let (fin, _) = finish_of(finished(Ok(Exit {
            code: 3,
            stderr_tail: "oops".into(),
        })));
        assert_eq!(fin.state, journal::Ending::Done);
        assert_eq!((fin.exit_code, fin.error), (Some(3), None));
        assert_eq!(
            (fin.placement, fin.reason.as_str()),
            (Side::Cloud, "where=cloud")
        );
        assert_eq!(fin.stderr_tail, "oops");
        let (fin, _) = finish_of(finished(Err(TaskError::new(
            TaskCode::Wire(ErrorCode::TimedOut),
            "too slow",
        ))));
        assert_eq!(fin.state, journal::Ending::Failed);
        assert_eq!(fin.exit_code, None);
        assert_eq!(fin.error, Some(("timed_out".into(), "too slow".into())));
        assert_eq!(fin.stderr_tail, "");
    }
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn chores_come_on_their_own_timers() {
        let start = tokio::time::Instant::now();
        let mut chores = Chores::new();
        let mut seen = Vec::new();
        // Just short of two expiry periods: ticks at 0 and 60 s, and every 5 s.
        let end = start + 2 * EXPIRE_EVERY - Duration::from_secs(1);
        while let Ok(chore) = tokio::time::timeout_at(end, chores.next()).await {
            seen.push((chore, start.elapsed()));
            assert!(seen.len() < 100, "chores livelocked: {seen:?}");
        }
        let at = |want: Chore| -> Vec<u64> {
            seen.iter()
                .filter(|(c, _)| *c == want)
                .map(|(_, t)| t.as_secs())
                .collect()
        };
        assert_eq!(at(Chore::Expire), [0, 60]);
        let every = UNSTORED_RETRY_EVERY.as_secs();
        assert_eq!(
            at(Chore::StoreUnstored),
            (0..24).map(|i| i * every).collect::<Vec<_>>()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_dispatcher_does_not_get_a_burst_of_chores() {
        let start = tokio::time::Instant::now();
        let mut chores = Chores::new();
        for _ in 0..2 {
            chores.next().await;
        }
        // Busy for 30 s: six retry periods missed, one retry due, then on the period.
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(chores.next().await, Chore::StoreUnstored);
        assert_eq!(start.elapsed(), Duration::from_secs(30));
        assert_eq!(chores.next().await, Chore::StoreUnstored);
        assert_eq!(start.elapsed(), Duration::from_secs(35));
    }
}
