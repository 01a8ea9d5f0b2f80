//! The daemon's short memory of recent task ids, so that a retry (same agent, same id)
//! gets the first run's result instead of running the task twice.
//!
//! Keyed by the authenticated agent id and the agent's task id: one agent can never
//! see, join or evict-by-name another agent's results. An entry is *running* (a retry
//! can wait for it) or *finished* (the output and trailer, or only a note that the
//! output was too big to keep). Finished entries are bounded by age, by count and by
//! total bytes, oldest first. Time is passed in as `now`, so the bounds are tested
//! without waiting.

use bytes::Bytes;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use updraft_proto::Trailer;
use updraft_shared::tls::AuthenticatedPeer;

/// Default for `[dedup] remember`: how long a finished result is kept. Agents retry
/// within their reconnect backoff (30 s at most) or when a restarted board replays its
/// journal, which takes minutes, not hours; ten minutes covers both with room to spare.
pub(crate) const DEFAULT_REMEMBER: Duration = Duration::from_secs(10 * 60);
/// Default for `[dedup] max_entries`: about 16 tasks a second for the whole
/// `remember` window. An entry without output costs a few hundred bytes, so the
/// table itself stays in the low megabytes.
pub(crate) const DEFAULT_MAX_ENTRIES: usize = 10_000;
/// Default for `[dedup] max_result`: 1 MiB holds the typical result (a digest, a
/// thumbnail, a batch of readings); a bigger output is cheaper to compute again than
/// to hold for every task.
pub(crate) const DEFAULT_MAX_RESULT: u64 = 1 << 20;
/// Default for `[dedup] max_memory`: 64 MiB bounds what the memory adds to the
/// daemon's resident size: 64 full-size results, or thousands of small ones.
pub(crate) const DEFAULT_MAX_MEMORY: u64 = 64 << 20;
/// Default for `[dedup] hold_input`: an input up to 1 MiB is received whole before
/// its task starts, so a link cut during the upload leaves nothing run and the retry
/// runs the task once. Waiting costs little at that size; a bigger input streams into
/// the task as it arrives, as the fastest path for bulk data.
pub(crate) const DEFAULT_HOLD_INPUT: u64 = 1 << 20;

/// The bounds of the memory (`[dedup]` in `daemon.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupLimits {
    /// How long a finished entry is kept.
    pub remember: Duration,
    /// Most entries, running and finished; 0 turns the memory off.
    pub max_entries: usize,
    /// Most output bytes kept for one task; a bigger output is not kept.
    pub max_result: u64,
    /// Most bytes kept in all (output and the trailer's text); oldest go first.
    pub max_memory: u64,
    /// Largest input received whole before a remembered task starts.
    pub hold_input: u64,
}

impl Default for DedupLimits {
    fn default() -> Self {
        Self {
            remember: DEFAULT_REMEMBER,
            max_entries: DEFAULT_MAX_ENTRIES,
            max_result: DEFAULT_MAX_RESULT,
            max_memory: DEFAULT_MAX_MEMORY,
            hold_input: DEFAULT_HOLD_INPUT,
        }
    }
}

/// Whose task: the agent named by its verified certificate, and the id it chose.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct TaskKey {
    agent: String,
    id: String,
}

impl TaskKey {
    /// The key of task `id` sent by `peer`. Only the TLS layer makes peers, so a key
    /// always names an agent that proved who it is.
    pub(crate) fn new(peer: &AuthenticatedPeer, id: &str) -> Self {
        Self {
            agent: peer.agent_id().to_string(),
            id: id.to_string(),
        }
    }

    #[cfg(test)]
    pub(crate) fn raw(agent: &str, id: &str) -> Self {
        Self {
            agent: agent.into(),
            id: id.into(),
        }
    }
}

/// A finished run as a retry receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    /// The whole output, sent again as data frames.
    pub output: Bytes,
    /// The first run's trailer, sent again as it was.
    pub trailer: Trailer,
}

impl Record {
    /// Bytes this record holds: output plus the trailer's text.
    fn size(&self) -> u64 {
        (self.output.len() + self.trailer.stderr_tail.len() + self.trailer.message.len()) as u64
    }
}

/// How a run that others waited for ended.
#[derive(Debug, Clone)]
pub(crate) enum Settled {
    /// It finished and its result was kept.
    Kept(Arc<Record>),
    /// It finished, but its output was over `max_result` and was not kept.
    NotKept,
    /// It left no result a retry could trust (refused, cut-off input, lost output).
    Forgotten,
}

/// What the memory says about a task id.
#[derive(Debug)]
pub(crate) enum Lookup {
    /// Unknown (or its output was not kept): run it; the claim records the outcome.
    Run {
        /// Settles the entry; dropping it unsettled forgets the id.
        claim: Claim,
        /// The first run's output size, when this is a rerun of a result not kept.
        rerun: Option<u64>,
    },
    /// The memory is full of running tasks (or off): run it without remembering.
    Untracked,
    /// Finished and kept: send this instead of running.
    Finished(Arc<Record>),
    /// Running now: wait for it.
    Running(Waiter),
    /// The id is in use for a different task or arguments.
    Conflict {
        /// The task the id was first used for.
        task: String,
    },
}

/// Waits for a running entry to settle.
#[derive(Debug)]
pub(crate) struct Waiter(watch::Receiver<Option<Settled>>);

impl Waiter {
    /// How the run ended; a run whose handler vanished counts as forgotten.
    pub(crate) async fn settled(mut self) -> Settled {
        match self.0.wait_for(Option::is_some).await {
            Ok(s) => s.clone().unwrap_or(Settled::Forgotten),
            Err(_) => Settled::Forgotten,
        }
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Tasks run (a slot was taken and the task started).
    pub runs: AtomicU64,
    /// Retries answered from memory (a kept result, or a run in progress joined).
    pub dedup_hits: AtomicU64,
}

impl Counters {
    /// Counts one run.
    pub(crate) fn run(&self) {
        self.runs.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one retry answered from memory.
    pub(crate) fn hit(&self) {
        self.dedup_hits.fetch_add(1, Ordering::Relaxed);
    }
}

/// How full the memory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MemoryUsage {
    /// Entries, running and finished.
    pub entries: usize,
    /// Bytes held by kept results.
    pub kept_bytes: u64,
}

/// The memory: a table behind a lock, shared by every task handler.
#[derive(Debug)]
pub(crate) struct Recent {
    limits: DedupLimits,
    table: Mutex<Table>,
    counters: Counters,
}

/// Which request an id was used for; a retry must name the same.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Request {
    task: String,
    args: Vec<String>,
}

#[derive(Debug)]
enum State {
    Running {
        done: watch::Sender<Option<Settled>>,
    },
    Finished {
        /// `None`: the output was over `max_result`; holds its size instead.
        record: Option<Arc<Record>>,
        output_bytes: u64,
        at: Instant,
        /// Position in [`Table::by_age`].
        seq: u64,
        size: u64,
    },
}

#[derive(Debug)]
struct Entry {
    request: Request,
    /// Tells a stale [`Claim`] from the one that owns a running entry.
    generation: u64,
    state: State,
}

#[derive(Debug, Default)]
struct Table {
    entries: HashMap<TaskKey, Entry>,
    /// Finished entries, oldest first.
    by_age: BTreeMap<u64, TaskKey>,
    kept_bytes: u64,
    next_seq: u64,
    next_generation: u64,
}

impl Table {
    fn drop_finished(&mut self, seq: u64) {
        let Some(key) = self.by_age.remove(&seq) else {
            return;
        };
        if let Some(Entry {
            state: State::Finished { size, .. },
            ..
        }) = self.entries.remove(&key)
        {
            self.kept_bytes -= size;
        }
    }

    fn oldest(&self) -> Option<(u64, Instant)> {
        let (&seq, key) = self.by_age.first_key_value()?;
        match self.entries.get(key)?.state {
            State::Finished { at, .. } => Some((seq, at)),
            State::Running { .. } => None,
        }
    }

    fn expire(&mut self, limits: &DedupLimits, now: Instant) {
        while let Some((seq, at)) = self.oldest() {
            if now.saturating_duration_since(at) < limits.remember {
                break;
            }
            self.drop_finished(seq);
        }
    }

    fn shrink_to(&mut self, max_memory: u64) {
        while self.kept_bytes > max_memory {
            let Some((seq, _)) = self.oldest() else { break };
            self.drop_finished(seq);
        }
    }
}

impl Recent {
    /// An empty memory with these bounds.
    pub(crate) fn new(limits: DedupLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            table: Mutex::new(Table::default()),
            counters: Counters::default(),
        })
    }

    /// Run and hit counters.
    pub(crate) fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Entries and bytes held now.
    pub(crate) fn usage(&self) -> MemoryUsage {
        let t = self.lock();
        MemoryUsage {
            entries: t.entries.len(),
            kept_bytes: t.kept_bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // The table is consistent between statements; a panic elsewhere cannot leave
        // it half-updated, so a poisoned lock is still usable.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What to do with task `key` asking for `task` with `args`. `Run` claims the id:
    /// until the claim settles, retries of it wait.
    pub(crate) fn lookup(
        self: &Arc<Self>,
        key: TaskKey,
        task: &str,
        args: &[String],
        now: Instant,
    ) -> Lookup {
        let mut t = self.lock();
        t.expire(&self.limits, now);
        let mut rerun = None;
        if let Some(e) = t.entries.get(&key) {
            if e.request.task != task || e.request.args != args {
                return Lookup::Conflict {
                    task: e.request.task.clone(),
                };
            }
            match &e.state {
                State::Running { done } => return Lookup::Running(Waiter(done.subscribe())),
                State::Finished {
                    record: Some(r), ..
                } => return Lookup::Finished(r.clone()),
                State::Finished {
                    record: None,
                    output_bytes,
                    seq,
                    ..
                } => {
                    rerun = Some(*output_bytes);
                    let seq = *seq;
                    t.drop_finished(seq);
                }
            }
        }
        while t.entries.len() >= self.limits.max_entries {
            let Some((seq, _)) = t.oldest() else {
                return Lookup::Untracked;
            };
            t.drop_finished(seq);
        }
        let generation = t.next_generation;
        t.next_generation += 1;
        t.entries.insert(
            key.clone(),
            Entry {
                request: Request {
                    task: task.to_string(),
                    args: args.to_vec(),
                },
                generation,
                state: State::Running {
                    done: watch::channel(None).0,
                },
            },
        );
        Lookup::Run {
            claim: Claim {
                recent: self.clone(),
                key,
                generation,
                settled: false,
            },
            rerun,
        }
    }

    /// Ends the running entry `generation` of `key`: `Some(record)` keeps the result,
    /// `Err(output_bytes)` notes that it was too big, `None` forgets the id.
    fn settle(
        &self,
        key: &TaskKey,
        generation: u64,
        outcome: Option<Result<Record, u64>>,
        now: Instant,
    ) {
        let mut t = self.lock();
        let Some(entry) = t.entries.get_mut(key) else {
            return;
        };
        if entry.generation != generation || !matches!(entry.state, State::Running { .. }) {
            return;
        }
        let (settled, state) = match outcome {
            None => {
                if let Some(Entry {
                    state: State::Running { done },
                    ..
                }) = t.entries.remove(key)
                {
                    done.send_replace(Some(Settled::Forgotten));
                }
                return;
            }
            Some(Ok(record)) => {
                let size = record.size();
                let output_bytes = record.output.len() as u64;
                let record = Arc::new(record);
                (
                    Settled::Kept(record.clone()),
                    (Some(record), output_bytes, size),
                )
            }
            Some(Err(output_bytes)) => (Settled::NotKept, (None, output_bytes, 0)),
        };
        let seq = t.next_seq;
        t.next_seq += 1;
        let (record, output_bytes, size) = state;
        let entry = t.entries.get_mut(key).expect("entry checked above");
        let old = std::mem::replace(
            &mut entry.state,
            State::Finished {
                record,
                output_bytes,
                at: now,
                seq,
                size,
            },
        );
        t.by_age.insert(seq, key.clone());
        t.kept_bytes += size;
        t.shrink_to(self.limits.max_memory);
        drop(t);
        if let State::Running { done } = old {
            done.send_replace(Some(settled));
        }
    }
}

/// The right to settle one running entry. Dropping it unsettled forgets the id, so a
/// run that was refused, failed inside the daemon or lost its handler is never
/// remembered.
#[derive(Debug)]
pub(crate) struct Claim {
    recent: Arc<Recent>,
    key: TaskKey,
    generation: u64,
    settled: bool,
}

impl Claim {
    /// Most output bytes a record may hold.
    pub(crate) fn max_result(&self) -> u64 {
        self.recent.limits.max_result
    }

    /// Largest input this run receives whole before it starts.
    pub(crate) fn hold_input(&self) -> u64 {
        self.recent.limits.hold_input
    }

    /// True while a retry of this id waits for this run's result.
    pub(crate) fn has_waiters(&self) -> bool {
        let t = self.recent.lock();
        match t.entries.get(&self.key) {
            Some(Entry {
                generation,
                state: State::Running { done },
                ..
            }) => *generation == self.generation && done.receiver_count() > 0,
            _ => false,
        }
    }

    /// Keeps the run's result for retries and hands it to those waiting.
    pub(crate) fn keep(mut self, record: Record, now: Instant) {
        self.settled = true;
        let outcome = if record.output.len() as u64 > self.max_result() {
            Err(record.output.len() as u64)
        } else {
            Ok(record)
        };
        self.recent
            .settle(&self.key, self.generation, Some(outcome), now);
    }

    /// Notes that the run finished with `output_bytes` of output, too many to keep:
    /// a retry runs the task again.
    pub(crate) fn too_large(mut self, output_bytes: u64, now: Instant) {
        self.settled = true;
        self.recent
            .settle(&self.key, self.generation, Some(Err(output_bytes)), now);
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.settled {
            self.recent
                .settle(&self.key, self.generation, None, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use updraft_proto::Timings;

    fn limits() -> DedupLimits {
        DedupLimits {
            remember: Duration::from_secs(60),
            max_entries: 100,
            max_result: 1000,
            max_memory: 10_000,
            hold_input: 1000,
        }
    }

    fn record(output: &[u8], exit_code: i32) -> Record {
        Record {
            output: Bytes::copy_from_slice(output),
            trailer: Trailer {
                exit_code: Some(exit_code),
                output_bytes: output.len() as u64,
                timings: Timings::default(),
                ..Default::default()
            },
        }
    }

    fn key(agent: &str, id: &str) -> TaskKey {
        TaskKey::raw(agent, id)
    }

    fn claim(r: &Arc<Recent>, k: TaskKey, now: Instant) -> Claim {
        match r.lookup(k, "t", &[], now) {
            Lookup::Run { claim, .. } => claim,
            other => panic!("expected a fresh run, got {other:?}"),
        }
    }

    fn run_and_keep(r: &Arc<Recent>, k: TaskKey, output: &[u8], now: Instant) {
        claim(r, k, now).keep(record(output, 0), now);
    }

    fn is_kept(r: &Arc<Recent>, k: TaskKey, now: Instant) -> bool {
        match r.lookup(k, "t", &[], now) {
            Lookup::Finished(_) => true,
            Lookup::Run { claim, .. } => {
                // Leave the table as it was: this lookup only looked.
                drop(claim);
                false
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn finished_result_is_returned_then_expires() {
        let r = Recent::new(limits());
        let t0 = Instant::now();
        run_and_keep(&r, key("a", "1"), b"out", t0);
        match r.lookup(key("a", "1"), "t", &[], t0 + Duration::from_secs(59)) {
            Lookup::Finished(rec) => {
                assert_eq!(rec.output.as_ref(), b"out");
                assert_eq!(rec.trailer.exit_code, Some(0));
            }
            other => panic!("{other:?}"),
        }
        assert!(!is_kept(&r, key("a", "1"), t0 + Duration::from_secs(60)));
        assert_eq!(r.usage().entries, 0);
        assert_eq!(r.usage().kept_bytes, 0);
    }

    #[test]
    fn agents_never_see_each_other() {
        let r = Recent::new(limits());
        let t0 = Instant::now();
        run_and_keep(&r, key("a", "same"), b"a's", t0);
        // The same id from another agent is a new task of that agent.
        let c = claim(&r, key("b", "same"), t0);
        c.keep(record(b"b's", 1), t0);
        for (agent, want) in [("a", &b"a's"[..]), ("b", &b"b's"[..])] {
            match r.lookup(key(agent, "same"), "t", &[], t0) {
                Lookup::Finished(rec) => assert_eq!(rec.output.as_ref(), want),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn count_bound_evicts_oldest_finished() {
        let r = Recent::new(DedupLimits {
            max_entries: 3,
            ..limits()
        });
        let t0 = Instant::now();
        for (i, id) in ["1", "2", "3", "4"].iter().enumerate() {
            run_and_keep(&r, key("a", id), b"x", t0 + Duration::from_secs(i as u64));
        }
        let now = t0 + Duration::from_secs(5);
        assert_eq!(r.usage().entries, 3);
        assert!(!is_kept(&r, key("a", "1"), now), "oldest evicted");
        // That lookup made room by evicting "2", the oldest left.
        assert!(!is_kept(&r, key("a", "2"), now));
        assert!(is_kept(&r, key("a", "4"), now));
    }

    #[test]
    fn running_entries_are_never_evicted() {
        let r = Recent::new(DedupLimits {
            max_entries: 2,
            ..limits()
        });
        let t0 = Instant::now();
        let _a = claim(&r, key("a", "1"), t0);
        let _b = claim(&r, key("a", "2"), t0);
        assert!(matches!(
            r.lookup(key("a", "3"), "t", &[], t0),
            Lookup::Untracked
        ));
        assert!(matches!(
            r.lookup(key("a", "1"), "t", &[], t0),
            Lookup::Running(_)
        ));
        let off = Recent::new(DedupLimits {
            max_entries: 0,
            ..limits()
        });
        assert!(matches!(
            off.lookup(key("a", "1"), "t", &[], t0),
            Lookup::Untracked
        ));
    }

    #[test]
    fn memory_bound_evicts_oldest_first() {
        let r = Recent::new(DedupLimits {
            max_memory: 2500,
            ..limits()
        });
        let t0 = Instant::now();
        for (i, id) in ["1", "2", "3"].iter().enumerate() {
            run_and_keep(
                &r,
                key("a", id),
                &[0; 1000],
                t0 + Duration::from_secs(i as u64),
            );
        }
        assert_eq!(r.usage().kept_bytes, 2000);
        let now = t0 + Duration::from_secs(5);
        assert!(!is_kept(&r, key("a", "1"), now));
        assert!(is_kept(&r, key("a", "2"), now));
        assert!(is_kept(&r, key("a", "3"), now));
    }

    #[test]
    fn output_over_max_result_is_noted_not_kept() {
        let r = Recent::new(limits());
        let t0 = Instant::now();
        claim(&r, key("a", "big"), t0).keep(record(&[0; 1001], 0), t0);
        assert_eq!(r.usage().kept_bytes, 0);
        match r.lookup(key("a", "big"), "t", &[], t0) {
            Lookup::Run { rerun, claim } => {
                assert_eq!(rerun, Some(1001));
                claim.too_large(5000, t0);
            }
            other => panic!("{other:?}"),
        }
        match r.lookup(key("a", "big"), "t", &[], t0) {
            Lookup::Run { rerun, .. } => assert_eq!(rerun, Some(5000)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn dropped_claim_forgets_and_stale_claim_is_ignored() {
        let r = Recent::new(limits());
        let t0 = Instant::now();
        drop(claim(&r, key("a", "1"), t0));
        assert_eq!(r.usage().entries, 0);
        let first = claim(&r, key("a", "1"), t0);
        // A claim for a run that no longer owns the entry changes nothing.
        r.settle(&key("a", "1"), first.generation + 1, None, t0);
        assert!(matches!(
            r.lookup(key("a", "1"), "t", &[], t0),
            Lookup::Running(_)
        ));
        first.keep(record(b"ok", 0), t0);
        assert!(is_kept(&r, key("a", "1"), t0));
    }

    #[test]
    fn reused_id_for_another_request_is_a_conflict() {
        let r = Recent::new(limits());
        let t0 = Instant::now();
        run_and_keep(&r, key("a", "1"), b"x", t0);
        match r.lookup(key("a", "1"), "other", &[], t0) {
            Lookup::Conflict { task } => assert_eq!(task, "t"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            r.lookup(key("a", "1"), "t", &["arg".into()], t0),
            Lookup::Conflict { .. }
        ));
    }

    #[tokio::test]
    async fn waiters_get_the_result_or_learn_it_was_forgotten() {
        let r = Recent::new(limits());
        let t0 = Instant::now();
        let c = claim(&r, key("a", "1"), t0);
        let Lookup::Running(w) = r.lookup(key("a", "1"), "t", &[], t0) else {
            panic!("expected a running entry");
        };
        let waiting = tokio::spawn(w.settled());
        c.keep(record(b"done", 0), t0);
        match waiting.await.unwrap() {
            Settled::Kept(rec) => assert_eq!(rec.output.as_ref(), b"done"),
            other => panic!("{other:?}"),
        }

        let c = claim(&r, key("a", "2"), t0);
        assert!(!c.has_waiters());
        let Lookup::Running(w) = r.lookup(key("a", "2"), "t", &[], t0) else {
            panic!("expected a running entry");
        };
        assert!(c.has_waiters());
        drop(c);
        assert!(matches!(w.settled().await, Settled::Forgotten));
    }
}
