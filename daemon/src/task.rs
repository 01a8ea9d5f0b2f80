//! One task stream, from its request header to its trailer: check the header, resolve
//! the id against recent results, admit, take a place, run, settle.
//!
//! A task id the agent retries is answered from [`crate::recent`] when it can: a kept
//! result is sent again, a run in progress is joined, and a first run whose agent went
//! away after sending all its input keeps running so the retry can collect it.
//! What to do at each step is decided by small functions ([`decide`], [`place`]) the
//! async code here only performs.

mod relay;
mod reply;
mod tee;

use crate::recent::{Claim, Lookup, Record, Settled, TaskKey, Waiter};
use crate::state::{Shared, Tally, Uploading, Uploads};
use bytes::Bytes;
use reply::{ready_now, Reply};
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tee::{HeldInput, TeeOutput, Teed, WatchedInput};
use tracing::{debug, info, warn};
use updraft_proto::msg::{bounded_message, bounded_tail};
use updraft_proto::{
    DecodeError, ErrorCode, Frame, ReplyHeader, RequestHeader, Timings, Trailer, STOP_CANCELLED,
    STOP_INPUT,
};
use updraft_shared::catalog::{AdmittedTask, Caller, Refusal};
use updraft_shared::exec::{ExecError, Executor, Outcome, Reservation, Upload};
use updraft_shared::tls::AuthenticatedPeer;
use updraft_shared::wire::{write_frame, FrameReader, StreamInput, WireError};

/// Serves a task stream whose first frame, `frame`, should be its request header.
pub(crate) async fn serve(
    send: quinn::SendStream,
    reader: FrameReader<quinn::RecvStream>,
    frame: &Frame,
    peer: &AuthenticatedPeer,
    shared: &Shared,
) {
    let agent = peer.agent_id();
    let header = match read_header(frame) {
        Ok(h) => h,
        Err(e) => return refuse_header(send, reader, agent, e).await,
    };
    let RequestHeader {
        id,
        task,
        args,
        input_len,
    } = header;
    let (recv, leftover) = reader.into_parts();
    // Resolves when the agent stops reading (it cancelled the task, or gave up on it).
    let mut stopped = std::pin::pin!(stop_code(send.stopped()));
    let mut ts = TaskStream {
        reply: Reply::new(send),
        input: StreamInput::new(leftover, recv),
        agent,
        task: &task,
        id: &id,
    };
    // Only catalog names become metric labels, so the series stay bounded.
    let label = match shared.catalog().get(&task) {
        Some(_) => task.as_str(),
        None => "other",
    };
    let mut tally = Tally::new(shared, label);
    let asked = Asked {
        peer,
        args,
        input_len,
    };
    if relay::is_shared(shared, &task, asked.input_len) {
        if let Some(cluster) = shared.cluster.as_deref() {
            return Box::pin(relay::serve(
                ts,
                shared,
                cluster,
                asked,
                &mut stopped,
                &mut tally,
            ))
            .await;
        }
    }
    let Some((claim, admitted)) = resolve(&mut ts, shared, asked, &mut stopped, &mut tally).await
    else {
        return;
    };
    run(ts, shared, admitted, claim, &mut stopped, &mut tally).await;
}

/// What the agent asked for, besides the task name and id a stream logs.
struct Asked<'a> {
    peer: &'a AuthenticatedPeer,
    args: Vec<String>,
    input_len: Option<u64>,
}

/// Decodes and checks a request header. A header that breaks a rule is the peer
/// misbehaving, like a frame that does not decode.
fn read_header(frame: &Frame) -> Result<RequestHeader, WireError> {
    let header = RequestHeader::from_frame(frame)?;
    header.validate().map_err(DecodeError::from)?;
    Ok(header)
}

/// Refuses a stream whose request header could not be read, decoded or accepted.
pub(crate) async fn refuse_header(
    mut send: quinn::SendStream,
    reader: FrameReader<quinn::RecvStream>,
    agent: &str,
    e: WireError,
) {
    warn!(agent, error = %e, "peer misbehaved: bad request header; task refused");
    let (mut recv, _) = reader.into_parts();
    let _ = recv.stop(STOP_INPUT.into());
    reject(
        &mut send,
        ErrorCode::BadRequest,
        format!("bad request header: {e}"),
    )
    .await;
}

/// What a task stream does after one look at the memory of recent ids.
#[derive(Debug)]
pub(crate) enum Step {
    /// The id's first run finished and its result is kept: send that result again.
    Replay(Arc<Record>),
    /// The id's first run is in progress: wait for its result.
    Join(Waiter),
    /// The id was used for another request: refuse this one.
    Conflict(Refusal),
    /// The daemon is draining: refuse, so the agent runs the task elsewhere.
    Draining,
    /// The catalog refused the task (unknown, not allowed, input too large, ...).
    NotAdmitted(Refusal),
    /// Run the task; a claim when its result is remembered for retries.
    Run(Option<Claim>, AdmittedTask),
}

/// What to do with task `id` given what the memory says of it (`lookup`), whether the
/// daemon is `draining`, and the catalog's verdict (`admit`, asked only when the task
/// would run). A known id is answered even while draining: that costs no run.
pub(crate) fn decide(
    lookup: Lookup,
    id: &str,
    draining: bool,
    admit: impl FnOnce() -> Result<AdmittedTask, Refusal>,
) -> Step {
    let claim = match lookup {
        Lookup::Finished(record) => return Step::Replay(record),
        Lookup::Running(waiter) => return Step::Join(waiter),
        Lookup::Conflict { task } => {
            return Step::Conflict(Refusal {
                code: ErrorCode::BadRequest,
                message: format!("task id {id} was already used for task `{task}` with other arguments; give every new task a new id"),
            })
        }
        Lookup::Run { claim, .. } => Some(claim),
        Lookup::Untracked => None,
    };
    if draining {
        return Step::Draining;
    }
    match admit() {
        Ok(task) => Step::Run(claim, task),
        Err(refusal) => Step::NotAdmitted(refusal),
    }
}

/// The refusal of a task that would run while the daemon drains.
fn draining_refusal() -> Refusal {
    Refusal {
        code: ErrorCode::Draining,
        message: "daemon is draining; run the task elsewhere".into(),
    }
}

/// Logs what the memory said of a task id (a kept result is logged as it is sent).
fn note(lookup: &Lookup, ts: &TaskStream<'_>) {
    let (agent, task, id) = (ts.agent, ts.task, ts.id);
    match lookup {
        Lookup::Running(_) => {
            info!(agent, task, id, "task id {id} retried while its first run is in progress; waiting for that run's result");
        }
        Lookup::Conflict { task: first_task } => {
            warn!(
                agent,
                task,
                id,
                first_task,
                "peer misbehaved: task id reused for a different request; task refused"
            );
        }
        Lookup::Run {
            rerun: Some(bytes), ..
        } => {
            info!(agent, task, id, "task id {id} retried; its first output ({bytes} bytes) was over [dedup] max_result and was not kept, so the task runs again");
        }
        Lookup::Untracked => {
            debug!(agent, task, id, "task id not remembered: the memory of recent ids is off or full of running tasks ([dedup] max_entries)");
        }
        Lookup::Run { rerun: None, .. } | Lookup::Finished(_) => {}
    }
}

/// Resolves the task against the memory of recent ids until it is answered (`None`)
/// or is to run. Each pass answers from memory, claims the id to run it, or waits for
/// the run that holds it. A run that leaves no result sends its waiters round again,
/// so passes are bounded by the retries of one id that arrive together.
async fn resolve<S: Future<Output = u64> + Unpin>(
    ts: &mut TaskStream<'_>,
    shared: &Shared,
    mut asked: Asked<'_>,
    stopped: &mut S,
    tally: &mut Tally<'_>,
) -> Option<(Option<Claim>, AdmittedTask)> {
    let (agent, task, id) = (ts.agent, ts.task, ts.id);
    let key = TaskKey::new(asked.peer, id);
    loop {
        let lookup = shared
            .recent
            .lookup(key.clone(), task, &asked.args, Instant::now());
        note(&lookup, ts);
        let admit = || {
            let args = std::mem::take(&mut asked.args);
            let caller = Caller::Agent(asked.peer);
            let admitted = shared.catalog().admit(task, args, asked.input_len, caller);
            admitted.map(|t| t.with_task_id(id))
        };
        let refusal = match decide(lookup, id, shared.is_draining(), admit) {
            Step::Replay(record) => return replay(ts, shared, tally, &record).await,
            Step::Join(waiter) => match join(ts, waiter, stopped, tally).await? {
                Settled::Kept(record) => return replay(ts, shared, tally, &record).await,
                Settled::NotKept | Settled::Forgotten => continue,
            },
            Step::Run(claim, task) => return Some((claim, task)),
            Step::Conflict(refusal) => refusal,
            Step::Draining => draining_refusal(),
            Step::NotAdmitted(refusal) => {
                info!(agent, task, id, code = %refusal.code, "task refused: {}", refusal.message);
                refusal
            }
        };
        tally.outcome = refusal.code.as_str();
        ts.refuse(refusal).await;
        return None;
    }
}

/// Answers a retry with the first run's result.
async fn replay<T>(
    ts: &mut TaskStream<'_>,
    shared: &Shared,
    tally: &mut Tally<'_>,
    record: &Record,
) -> Option<T> {
    let (agent, task, id) = (ts.agent, ts.task, ts.id);
    info!(
        agent,
        task, id, "task id {id} retried; returning its first result"
    );
    shared.recent.counters().hit();
    tally.outcome = "deduplicated";
    ts.deliver_record(record).await;
    None
}

/// Joins the run in progress of the same id: answers `accepted`, then waits for how
/// that run settles. `None` when the agent went away or stopped this stream first.
async fn join<S: Future<Output = u64> + Unpin>(
    ts: &mut TaskStream<'_>,
    waiter: Waiter,
    stopped: &mut S,
    tally: &mut Tally<'_>,
) -> Option<Settled> {
    if !ts.reply.accept().await {
        return None;
    }
    // This stream's input is left unread: if the first run leaves no result, the next
    // pass runs the task on it. If this retry is cancelled the first run carries on
    // (its result is kept for the next retry).
    tokio::select! {
        settled = waiter.settled() => Some(settled),
        code = stopped => {
            ts.stopped(tally, code, "while it waited for the first run of its id");
            None
        }
    }
}

/// How a run ended, and what the stream knows of its input and output.
struct Ran {
    result: Result<Outcome, ExecError>,
    teed: Teed,
    /// The agent's whole input arrived.
    input_whole: bool,
    /// Time the held input took to arrive.
    input_time: Duration,
}

/// Takes the task's place, runs it, and settles it.
async fn run<S: Future<Output = u64> + Unpin>(
    mut ts: TaskStream<'_>,
    shared: &Shared,
    task: AdmittedTask,
    claim: Option<Claim>,
    stopped: &mut S,
    tally: &mut Tally<'_>,
) {
    let hold = claim.as_ref().map_or(0, Claim::hold_input);
    let ran = match take_place(&mut ts, shared, &task, hold, stopped, tally).await {
        Place::Answered => return,
        Place::Refused(e, input_time) => Ran {
            result: Err(e),
            teed: Teed {
                record: claim.as_ref().map(|_| Vec::new()),
                produced: 0,
                lost: false,
            },
            input_whole: false,
            input_time,
        },
        Place::Ready(reservation, held, input_time) => {
            let claim = claim.as_ref();
            let ready = (reservation, held);
            let Some((result, teed, input_whole)) =
                execute(&mut ts, shared, &task, claim, ready, stopped, tally).await
            else {
                return;
            };
            Ran {
                result,
                teed,
                input_whole,
                input_time,
            }
        }
    };
    finish(ts, tally, claim, ran).await;
}

/// Waits for the slot, then runs the task with its output teed into the record when
/// remembered. `None` when the agent stopped the stream first and the run ended for
/// it (see [`runs_on`]).
async fn execute<S: Future<Output = u64> + Unpin>(
    ts: &mut TaskStream<'_>,
    shared: &Shared,
    task: &AdmittedTask,
    claim: Option<&Claim>,
    (reservation, held): (Reservation, HeldInput),
    stopped: &mut S,
    tally: &mut Tally<'_>,
) -> Option<(Result<Outcome, ExecError>, Teed, bool)> {
    let mut slot = std::pin::pin!(reservation.slot());
    let slot = match wait_accepted(&mut ts.reply, &mut slot, stopped).await {
        Ok(slot) => slot,
        Err(stop) => {
            if let Some(code) = stop {
                ts.stopped(tally, code, "while it waited for a slot; it did not run");
            }
            return None;
        }
    };
    shared.recent.counters().run();
    let (agent, name, id) = (ts.agent, ts.task, ts.id);
    debug!(
        agent,
        task = name,
        id,
        held_bytes = held.len,
        "task started"
    );
    let input_whole = AtomicBool::new(false);
    let running = ts.reply.running();
    let mut output = TeeOutput::new(&running, claim, &input_whole);
    let input = WatchedInput {
        held,
        inner: &mut ts.input,
        whole: &input_whole,
    };
    let watched = {
        // Pinned here, not moved into watch_run: the run's state is stored once.
        let run = std::pin::pin!(shared.executor.run_in_slot(&slot, task, input, &mut output));
        let run = std::pin::pin!(running.accepting(run));
        watch_run(run, stopped, claim, &input_whole).await
    };
    drop(slot);
    let teed = output.finish();
    match watched {
        Ok(result) => Some((result, teed, input_whole.into_inner())),
        Err(code) => {
            ts.stopped(tally, code, "the run was killed");
            None
        }
    }
}

/// A task stream after its header was read, and what its log lines name.
struct TaskStream<'a> {
    reply: Reply,
    input: StreamInput,
    agent: &'a str,
    task: &'a str,
    id: &'a str,
}

impl TaskStream<'_> {
    /// Notes that the agent stopped reading this stream with `code` (STOP_SENDING)
    /// and what became of the task.
    fn stopped(&self, tally: &mut Tally<'_>, code: u64, then: &str) {
        let (agent, task, id) = (self.agent, self.task, self.id);
        if code == u64::from(STOP_CANCELLED) {
            tally.outcome = "cancelled";
            info!(agent, task, id, "the task's submitter cancelled it {then}");
        } else {
            tally.outcome = "agent_gone";
            info!(
                agent,
                task, id, code, "the agent stopped reading the task's stream {then}"
            );
        }
    }

    /// Refuses the task after its header was read: a rejection, or a failure trailer
    /// when the stream was already accepted (a retry that waited for a run that left
    /// no result).
    async fn refuse(&mut self, refusal: Refusal) {
        self.input.stop(STOP_INPUT);
        if self.reply.is_accepted() {
            let trailer = Trailer {
                error: Some(refusal.code),
                message: bounded_message(refusal.message),
                ..Default::default()
            };
            self.reply.end(&trailer).await;
        } else {
            reject(self.reply.stream(), refusal.code, refusal.message).await;
        }
    }

    /// Answers a retry from memory: its input is not needed, the output and trailer
    /// are the first run's.
    async fn deliver_record(&mut self, record: &Record) {
        self.input.stop(STOP_INPUT);
        self.reply.owe();
        if self.reply.write_data(record.output.clone()).await.is_err() {
            return;
        }
        self.reply.end(&record.trailer).await;
    }
}

/// Refuses a stream before anything was accepted: a `rejected` reply, then FIN.
pub(crate) async fn reject(send: &mut quinn::SendStream, code: ErrorCode, message: String) {
    let message = bounded_message(message);
    let _ = write_frame(send, &ReplyHeader::Rejected { code, message }.to_frame()).await;
    let _ = send.finish();
}

/// Where a task stands once it has its place.
enum Place {
    /// It holds a slot or a queue place; its held input arrived (in that time).
    Ready(Reservation, HeldInput, Duration),
    /// It was accepted but cannot run: its held input went over `max_input`, or the
    /// agent reset it before it was whole (after that long).
    Refused(ExecError, Duration),
    /// The stream was answered (refused) or is gone; nothing more to send.
    Answered,
}

/// How a task holds its place before it runs.
pub(crate) enum Placement<'a> {
    /// A slot or a queue place, taken now; its input streams into the run.
    Reserved(Reservation),
    /// Admitted to receive its held input first, holding no slot, counted as an
    /// upload of its agent until the input is here.
    Uploading(Uploading<'a>, Upload),
}

/// The place of a task of `agent` that holds `hold` bytes of input before it runs
/// (0: none), or why it has none: every slot and queue place taken, or the agent
/// already sending `upload_limit` held inputs.
pub(crate) fn place<'a>(
    executor: &Executor,
    uploads: &'a Uploads,
    agent: &'a str,
    upload_limit: u32,
    hold: u64,
) -> Result<Placement<'a>, Refusal> {
    if hold == 0 {
        return executor
            .reserve()
            .map(Placement::Reserved)
            .map_err(|e| Refusal {
                code: e.code(),
                message: e.to_string(),
            });
    }
    let message = match uploads.begin(agent, upload_limit) {
        Ok(counted) => match executor.reserve_upload() {
            Ok(upload) => return Ok(Placement::Uploading(counted, upload)),
            Err(e) => e.to_string(),
        },
        Err(n) => format!("busy: agent `{agent}` already has {n} tasks sending their input, the limit (max_uploads_per_agent in daemon.toml); send fewer at once or finish those uploads"),
    };
    Err(Refusal {
        code: ErrorCode::Busy,
        message,
    })
}

/// Takes the task's place (see [`place`]), so `accepted` is owed (it goes with the
/// first thing sent, or as soon as the task waits). A remembered run
/// with a held input (`hold` > 0) then receives that input holding no slot: it counts
/// as uploading (in load reports, and against the agent's `max_uploads_per_agent`), so
/// a slow upload delays no other task; then it takes a slot or waits in the queue.
async fn take_place<S: Future<Output = u64> + Unpin>(
    ts: &mut TaskStream<'_>,
    shared: &Shared,
    task: &AdmittedTask,
    hold: u64,
    stopped: &mut S,
    tally: &mut Tally<'_>,
) -> Place {
    let limit = shared.config.max_uploads_per_agent;
    let placement = match place(&shared.executor, &shared.uploads, ts.agent, limit, hold) {
        Ok(placement) => placement,
        Err(refusal) => {
            tally.outcome = refusal.code.as_str();
            ts.refuse(refusal).await;
            return Place::Answered;
        }
    };
    ts.reply.owe();
    let (counted, upload) = match placement {
        Placement::Reserved(reservation) => {
            return Place::Ready(reservation, HeldInput::default(), Duration::ZERO)
        }
        Placement::Uploading(counted, upload) => (counted, upload),
    };
    let started = Instant::now();
    let received = {
        let mut receive = std::pin::pin!(HeldInput::receive(
            &mut ts.input,
            hold,
            task.spec().max_input
        ));
        wait_accepted(&mut ts.reply, &mut receive, stopped).await
    };
    let received = match received {
        Ok(r) => r,
        Err(stop) => {
            if let Some(code) = stop {
                ts.stopped(tally, code, "while it was sending its input; nothing ran");
            }
            return Place::Answered;
        }
    };
    let input_time = started.elapsed();
    drop(counted);
    match received {
        Ok(held) => Place::Ready(upload.into_reservation(), held, input_time),
        Err(ExecError::Input(e)) => match reset_code(&e) {
            Some(code) => {
                info!(
                    agent = ts.agent,
                    task = ts.task,
                    id = ts.id,
                    code,
                    "the agent reset the task's input before all of it arrived; nothing ran"
                );
                Place::Refused(ExecError::Input(io::Error::other(format!("the agent reset its input (code {code}) before all of it arrived, so the task did not run"))), input_time)
            }
            None => {
                info!(agent = ts.agent, task = ts.task, id = ts.id, error = %e, "agent went away while sending the task's input; nothing ran");
                Place::Answered
            }
        },
        Err(e) => Place::Refused(e, input_time),
    }
}
/// Waits for `fut` of an accepted task. When `fut` is not ready at once, an owed
/// `accepted` goes out first: a task that waits has been told it was accepted.
/// `Err(Some(code))` when the agent stopped reading first (STOP_SENDING), `Err(None)`
/// when it is gone.
async fn wait_accepted<F: Future + Unpin, S: Future<Output = u64> + Unpin>(
    reply: &mut Reply,
    fut: &mut F,
    stopped: &mut S,
) -> Result<F::Output, Option<u64>> {
    if let Some(out) = ready_now(fut).await {
        return Ok(out);
    }
    if !reply.accept().await {
        return Err(None);
    }
    tokio::select! {
        out = fut => Ok(out),
        code = stopped => Err(Some(code)),
    }
}

/// The RESET_STREAM code when a read failed because the agent reset its input.
fn reset_code(e: &io::Error) -> Option<u64> {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<quinn::ReadError>())
    {
        Some(quinn::ReadError::Reset(code)) => Some(code.into_inner()),
        _ => None,
    }
}

/// The code the agent stops this stream's daemon direction with (STOP_SENDING).
/// Never resolves otherwise: a lost connection or a finished stream is seen elsewhere.
async fn stop_code(
    stopped: impl Future<Output = Result<Option<quinn::VarInt>, quinn::StoppedError>>,
) -> u64 {
    match stopped.await {
        Ok(Some(code)) => code.into_inner(),
        _ => std::future::pending().await,
    }
}

/// Whether a run whose agent stopped reading with `stop` (or whose connection was
/// lost: `None`) carries on with its output going to the memory for a retry: only a
/// remembered run whose whole input arrived, and after a cancellation
/// ([`STOP_CANCELLED`]) only while a retry of the same id waits for it.
fn runs_on(claim: Option<&Claim>, input_whole: bool, stop: Option<u64>) -> bool {
    let Some(claim) = claim else {
        return false;
    };
    input_whole && (stop != Some(u64::from(STOP_CANCELLED)) || claim.has_waiters())
}

/// Runs `run` to its end, unless the agent stops reading first and the run may not
/// go on without it ([`runs_on`]): then the run is dropped, which kills the task, and
/// the stop code is returned.
async fn watch_run<T, S: Future<Output = u64> + Unpin>(
    mut run: std::pin::Pin<&mut impl Future<Output = T>>,
    stopped: &mut S,
    claim: Option<&Claim>,
    input_whole: &AtomicBool,
) -> Result<T, u64> {
    tokio::select! {
        r = &mut run => return Ok(r),
        code = stopped => {
            if !runs_on(claim, input_whole.load(Ordering::Acquire), Some(code)) {
                return Err(code);
            }
        }
    }
    Ok(run.await)
}

/// Ends a task that was accepted: its trailer, settled in the memory first so a retry
/// or a waiter has the result as soon as this stream could.
async fn finish(mut ts: TaskStream<'_>, tally: &mut Tally<'_>, claim: Option<Claim>, ran: Ran) {
    let (agent, task, id) = (ts.agent, ts.task, ts.id);
    let trailer = match ran.result {
        Ok(outcome) => trailer_of(&outcome, ran.input_time),
        Err(e) => {
            if matches!(e, ExecError::TooLarge { .. }) {
                ts.input.stop(STOP_INPUT);
            }
            if matches!(e, ExecError::Output(_)) {
                // The claim is dropped unsettled: a retry runs the task afresh.
                info!(agent, task, id, error = %e, "agent went away mid-task");
                return;
            }
            info!(agent, task, id, error = %e, "task failed");
            Trailer {
                error: Some(e.code()),
                message: bounded_message(format!("task `{task}`: {e}")),
                ..Default::default()
            }
        }
    };
    tally.outcome = outcome_label(&trailer);
    let lost = ran.teed.lost;
    let kept = match claim {
        Some(claim) => settle(claim, &trailer, ran.teed, ran.input_whole),
        None => false,
    };
    if lost {
        tally.outcome = "agent_gone";
        if kept {
            info!(agent, task, id, exit_code = ?trailer.exit_code, "agent went away mid-task; the task finished and its result is kept for a retry");
        } else {
            info!(
                agent,
                task,
                id,
                "agent went away mid-task; the task ended without a result a retry could use"
            );
        }
        return;
    }
    debug!(agent, task, id, exit_code = ?trailer.exit_code, "task finished");
    tally.record();
    ts.reply.end(&trailer).await;
}

/// The outcome a finished task is counted under.
fn outcome_label(trailer: &Trailer) -> &'static str {
    match (trailer.exit_code, trailer.error) {
        (_, Some(code)) => code.as_str(),
        (Some(0), None) => "ok",
        (Some(_), None) => "exit_nonzero",
        (None, None) => "internal",
    }
}

/// Settles a remembered run's claim with its result; true when the result was kept
/// for retries. A run is only as good as its input: a cut-off input (the agent
/// vanished mid-upload) or a failure inside the daemon is forgotten. Input refused
/// for its size is a result like any other.
fn settle(claim: Claim, trailer: &Trailer, teed: Teed, input_whole: bool) -> bool {
    let trusted = (input_whole || trailer.error == Some(ErrorCode::TooLarge))
        && trailer.error != Some(ErrorCode::Internal);
    match (trusted, teed.record) {
        (true, Some(mut output)) => {
            output.shrink_to_fit();
            let record = Record {
                output: Bytes::from(output),
                trailer: trailer.clone(),
            };
            claim.keep(record, Instant::now());
            true
        }
        (true, None) => {
            claim.too_large(teed.produced, Instant::now());
            false
        }
        (false, _) => false,
    }
}
/// The trailer of a run that ended in an exit.
pub(crate) fn trailer_of(o: &Outcome, input_time: Duration) -> Trailer {
    Trailer {
        exit_code: Some(o.exit_code),
        error: None,
        message: String::new(),
        stderr_tail: bounded_tail(String::from_utf8_lossy(&o.stderr_tail).into_owned()),
        input_bytes: o.input_bytes,
        output_bytes: o.output_bytes,
        timings: Timings {
            queue_us: o.queue_time.as_micros() as u64,
            run_us: o.run_time.as_micros() as u64,
            input_us: input_time.as_micros() as u64,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recent::{DedupLimits, Recent};
    use updraft_proto::msg::HeaderError;
    use updraft_shared::catalog::Catalog;

    /// A catalog with one task, `echo`, that takes at most 4 bytes of input.
    fn catalog() -> Catalog {
        let path = std::path::Path::new("/etc/updraft/daemon.toml");
        let text = "[tasks.echo]\nbuiltin = \"echo\"\nmax_input = \"4B\"\n";
        let file = updraft_shared::config::from_str(text, path, "UPDRAFTD_TEST_NONE").unwrap();
        crate::config::DaemonConfig::from_file(file, path)
            .unwrap()
            .catalog
    }

    fn admit(input_len: u64) -> Result<AdmittedTask, Refusal> {
        catalog().admit("echo", Vec::new(), Some(input_len), Caller::Local)
    }

    fn never() -> Result<AdmittedTask, Refusal> {
        panic!("the catalog was asked about a task that does not run")
    }

    fn record() -> Arc<Record> {
        Arc::new(Record {
            output: Bytes::from_static(b"first"),
            trailer: Trailer {
                exit_code: Some(0),
                ..Default::default()
            },
        })
    }

    #[test]
    fn a_bad_header_is_the_peer_misbehaving() {
        let header = RequestHeader {
            id: "../etc".into(),
            task: "echo".into(),
            args: Vec::new(),
            input_len: None,
        };
        let e = read_header(&header.to_frame()).unwrap_err();
        assert!(matches!(
            e,
            WireError::PeerMisbehaved(DecodeError::InvalidHeader(HeaderError::IdCharacters))
        ));
        assert_eq!(
            e.to_string(),
            "peer misbehaved: task id may contain only letters, digits, '-' and '_'"
        );
        let e = read_header(&Trailer::default().to_frame()).unwrap_err();
        assert!(matches!(e, WireError::PeerMisbehaved(_)));
        assert!(e.to_string().starts_with("peer misbehaved: "), "{e}");
    }

    #[test]
    fn a_finished_id_is_replayed_without_admission_even_while_draining() {
        for draining in [false, true] {
            match decide(Lookup::Finished(record()), "t1", draining, never) {
                Step::Replay(r) => assert_eq!(r.output, Bytes::from_static(b"first")),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_running_id_is_joined_and_the_join_gets_the_first_result() {
        let recent = Recent::new(DedupLimits::default());
        let now = Instant::now();
        let key = TaskKey::raw("board-1", "t1");
        let Lookup::Run { claim, .. } = recent.lookup(key.clone(), "echo", &[], now) else {
            panic!("a new id is to run");
        };
        let lookup = recent.lookup(key, "echo", &[], now);
        let Step::Join(waiter) = decide(lookup, "t1", true, never) else {
            panic!("a running id is joined, even while draining");
        };
        let kept = Record::clone(&record());
        claim.keep(kept.clone(), now);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        match rt.block_on(waiter.settled()) {
            Settled::Kept(r) => assert_eq!(*r, kept),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_id_reused_for_another_task_is_refused_as_a_bad_request() {
        let lookup = Lookup::Conflict {
            task: "sha256".into(),
        };
        let Step::Conflict(refusal) = decide(lookup, "t1", false, never) else {
            panic!("a conflict is refused");
        };
        assert_eq!(refusal.code, ErrorCode::BadRequest);
        assert!(
            refusal.message.contains("task `sha256`"),
            "{}",
            refusal.message
        );
    }

    #[test]
    fn a_new_task_is_refused_while_draining_and_its_claim_let_go() {
        let recent = Recent::new(DedupLimits::default());
        let now = Instant::now();
        let key = TaskKey::raw("board-1", "t1");
        let lookup = recent.lookup(key.clone(), "echo", &[], now);
        assert!(matches!(decide(lookup, "t1", true, never), Step::Draining));
        assert!(matches!(
            decide(Lookup::Untracked, "t2", true, never),
            Step::Draining
        ));
        // The refused run did not keep the id: a later try runs it.
        let lookup = recent.lookup(key, "echo", &[], now);
        assert!(matches!(lookup, Lookup::Run { .. }), "{lookup:?}");
        assert_eq!(draining_refusal().code, ErrorCode::Draining);
    }

    #[test]
    fn an_input_over_max_input_is_refused_as_too_large() {
        match decide(Lookup::Untracked, "t1", false, || admit(5)) {
            Step::NotAdmitted(refusal) => assert_eq!(refusal.code, ErrorCode::TooLarge),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decide(Lookup::Untracked, "t1", false, || admit(4)),
            Step::Run(None, _)
        ));
    }

    #[test]
    fn a_task_is_refused_busy_when_slots_and_queue_are_full() {
        let work = tempfile::tempdir().unwrap();
        let executor = Executor::new(1, 1, work.path().join("work"));
        let uploads = Uploads::default();
        let first = place(&executor, &uploads, "board-1", 4, 0).unwrap();
        assert!(matches!(first, Placement::Reserved(_)));
        let queued = place(&executor, &uploads, "board-1", 4, 0).unwrap();
        match place(&executor, &uploads, "board-1", 4, 0) {
            Err(refusal) => assert_eq!(refusal.code, ErrorCode::Busy),
            Ok(_) => panic!("a third task found a place with one slot and one queue place"),
        }
        drop(queued);
        assert!(place(&executor, &uploads, "board-1", 4, 0).is_ok());
    }

    #[test]
    fn held_inputs_are_refused_busy_past_the_agents_upload_limit() {
        let work = tempfile::tempdir().unwrap();
        let executor = Executor::new(4, 4, work.path().join("work"));
        let uploads = Uploads::default();
        let first = place(&executor, &uploads, "board-1", 1, 1024).unwrap();
        assert!(matches!(first, Placement::Uploading(..)));
        match place(&executor, &uploads, "board-1", 1, 1024) {
            Err(refusal) => {
                assert_eq!(refusal.code, ErrorCode::Busy);
                assert!(refusal
                    .message
                    .contains("agent `board-1` already has 1 tasks sending"));
            }
            Ok(_) => panic!("a second upload of one agent passed a limit of 1"),
        }
        // Another agent has its own count; a finished upload frees its count.
        assert!(place(&executor, &uploads, "board-2", 1, 1024).is_ok());
        drop(first);
        assert!(place(&executor, &uploads, "board-1", 1, 1024).is_ok());
    }

    #[test]
    fn a_stderr_tail_that_grows_as_utf8_keeps_its_last_line() {
        let mut stderr_tail = vec![0xff; 4000];
        stderr_tail.extend_from_slice(b"\nerror: disk full\n");
        let trailer = trailer_of(
            &Outcome {
                exit_code: 1,
                stderr_tail,
                ..Default::default()
            },
            Duration::ZERO,
        );
        assert!(trailer.stderr_tail.len() <= 4096);
        assert!(
            trailer.stderr_tail.ends_with("error: disk full\n"),
            "tail ends with {:?}",
            trailer
                .stderr_tail
                .chars()
                .rev()
                .take(20)
                .collect::<String>()
        );
    }
}
