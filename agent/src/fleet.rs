//! What the agent tells daemons about itself: one fleet stream per daemon connection
//! carries [`AgentReport`]s (version, policy in force, where tasks ran over the last
//! hour), and brings back each daemon's catalog and clock ([`FleetNotice::Hello`]) and
//! the policies operators push ([`FleetNotice::Policy`], applied once per hash).
//!
//! A report goes when the stream opens; then every [`REPORT_MIN_INTERVAL`] the agent
//! looks whether anything in it changed, and sends it when something did, or when
//! [`REPORT_INTERVAL`] passed since the last.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tracing::{debug, info, warn};
use updraft_proto::fleet::{
    AgentReport, FleetNotice, PlacementMix, PolicyState, PushOutcome, PushResult,
};
use updraft_proto::FrameKind;
use updraft_shared::wire::{write_frame, FrameReader};

use crate::placement::{ReasonKind, Side};
use crate::policy_file::PushRefused;

/// Shortest time between two reports on one stream: a busy board changes its mix with
/// every task, and the daemon needs no more than a glance every few seconds.
pub(crate) const REPORT_MIN_INTERVAL: Duration = Duration::from_secs(5);
/// Longest time between two reports: `updraftd agents` shows "last seen" from them.
pub(crate) const REPORT_INTERVAL: Duration = Duration::from_secs(60);
/// The mix counts the last hour, in minute buckets.
const MIX_BUCKETS: usize = 60;
const BUCKET_SECS: u64 = 60;

/// Tasks by where they ran, over the last hour, in minute buckets.
#[derive(Debug)]
pub(crate) struct MixWindow {
    /// (minute since the epoch, counts of that minute); a bucket from more than an hour
    /// ago is stale and counts for nothing.
    buckets: [(u64, PlacementMix); MIX_BUCKETS],
}

impl Default for MixWindow {
    fn default() -> Self {
        Self {
            buckets: [(0, PlacementMix::default()); MIX_BUCKETS],
        }
    }
}

impl MixWindow {
    /// Counts one task that ran on `side` for `kind` at `now_s` (Unix seconds), and
    /// whether it ended in an error of the agent's own.
    pub(crate) fn add(&mut self, side: Side, kind: ReasonKind, failed: bool, now_s: u64) {
        let minute = now_s / BUCKET_SECS;
        let bucket = &mut self.buckets[(minute % MIX_BUCKETS as u64) as usize];
        if bucket.0 != minute {
            *bucket = (minute, PlacementMix::default());
        }
        count(&mut bucket.1, side, kind, failed);
    }

    /// The counts of the hour up to `now_s`.
    pub(crate) fn sum(&self, now_s: u64) -> PlacementMix {
        let minute = now_s / BUCKET_SECS;
        let mut total = PlacementMix::default();
        for (at, m) in &self.buckets {
            if *at + MIX_BUCKETS as u64 > minute && *at <= minute {
                total.local += m.local;
                total.cloud += m.cloud;
                total.fallback += m.fallback;
                total.failed += m.failed;
            }
        }
        total
    }
}

fn count(m: &mut PlacementMix, side: Side, kind: ReasonKind, failed: bool) {
    match (side, kind) {
        (Side::Cloud, _) => m.cloud += 1,
        (Side::Local, ReasonKind::Fallback) => m.fallback += 1,
        (Side::Local, _) => m.local += 1,
    }
    if failed {
        m.failed += 1;
    }
}

/// What one daemon said on its fleet stream.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Heard {
    /// The task names its catalog offers.
    pub(crate) tasks: Vec<String>,
    /// Its clock minus ours when it answered, milliseconds (half the round trip is
    /// within the error).
    pub(crate) clock_skew_ms: i64,
}

/// The agent's side of the fleet streams.
#[derive(Debug)]
pub(crate) struct Fleet {
    version: &'static str,
    mix: Mutex<MixWindow>,
    /// Since the agent started.
    totals: Mutex<PlacementMix>,
    /// What became of the last pushed policy.
    push: Mutex<Option<PushOutcome>>,
    /// What each daemon said, by its configured address.
    heard: Mutex<BTreeMap<String, Heard>>,
}

fn now_s() -> u64 {
    unix_ms(SystemTime::now()) / 1000
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Fleet {
    /// The fleet streams of an agent of `version`.
    pub(crate) fn new(version: &'static str) -> Arc<Self> {
        Arc::new(Self {
            version,
            mix: Mutex::default(),
            totals: Mutex::default(),
            push: Mutex::default(),
            heard: Mutex::default(),
        })
    }

    /// Counts a finished task; `failed` when it ended in an error of the agent's own.
    pub(crate) fn ran(&self, side: Side, kind: ReasonKind, failed: bool) {
        self.mix
            .lock()
            .expect("mix lock")
            .add(side, kind, failed, now_s());
        count(
            &mut self.totals.lock().expect("mix lock"),
            side,
            kind,
            failed,
        );
    }

    /// What became of the last pushed policy.
    pub(crate) fn last_push(&self) -> Option<PushOutcome> {
        self.push.lock().expect("push lock").clone()
    }

    /// What each daemon said, by address.
    pub(crate) fn heard(&self) -> BTreeMap<String, Heard> {
        self.heard.lock().expect("heard lock").clone()
    }

    fn report(&self, policy: &crate::policy_file::PolicyStatus, accept_push: bool) -> AgentReport {
        AgentReport {
            version: self.version.to_string(),
            policy: PolicyState {
                hash: policy.hash.clone(),
                source: policy.source.to_string(),
                refused: policy
                    .error
                    .as_ref()
                    .map(|e| updraft_proto::msg::bounded_message(e.clone())),
            },
            mix: self.mix.lock().expect("mix lock").sum(now_s()),
            totals: *self.totals.lock().expect("mix lock"),
            accept_push,
            push: self.push.lock().expect("push lock").clone(),
        }
    }

    /// Handles a pushed policy once per hash: applies it with `apply` (or declines it)
    /// and keeps the outcome for the next report. True when this was new.
    fn pushed(&self, hash: &str, text: &str, apply: &ApplyPush, daemon: &str) -> bool {
        if self
            .push
            .lock()
            .expect("push lock")
            .as_ref()
            .is_some_and(|p| p.hash == hash)
        {
            return false;
        }
        let outcome = if updraft_shared::files::sha256_hex(text.as_bytes()) != hash {
            Err(PushRefused::Invalid(
                "the pushed policy does not match its hash".into(),
            ))
        } else {
            apply(text)
        };
        let (result, message) = match outcome {
            Ok(()) => {
                info!(daemon, hash, "applied the policy a daemon pushed");
                (PushResult::Applied, None)
            }
            Err(PushRefused::Declined) => {
                info!(
                    daemon,
                    hash, "declined a pushed policy ([policy] accept_push = false)"
                );
                (
                    PushResult::Declined,
                    Some(PushRefused::Declined.to_string()),
                )
            }
            Err(e) => {
                warn!(daemon, hash, error = %e, "refused a pushed policy; the policy in force stays");
                (PushResult::Refused, Some(e.to_string()))
            }
        };
        *self.push.lock().expect("push lock") = Some(PushOutcome {
            hash: hash.to_string(),
            result,
            message: message.map(updraft_proto::msg::bounded_message),
        });
        true
    }
}

/// Where a report's policy comes from: the agent's policy holder, read when the report
/// is sent (`None` once the agent is going away).
pub(crate) type PolicySource =
    Arc<dyn Fn() -> Option<crate::policy_file::PolicyStatus> + Send + Sync>;

/// Applies a pushed policy's text (see `PolicyHolder::apply_pushed`).
pub(crate) type ApplyPush = Arc<dyn Fn(&str) -> Result<(), PushRefused> + Send + Sync>;

/// What the uplink needs to run fleet streams.
#[derive(Clone)]
pub(crate) struct Hook {
    /// The agent's fleet state.
    pub(crate) fleet: Arc<Fleet>,
    /// The policy in force, read when a report is sent.
    pub(crate) policy: PolicySource,
    /// Applies a pushed policy.
    pub(crate) apply: ApplyPush,
    /// `[policy] accept_push`.
    pub(crate) accept_push: bool,
}

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hook").field("fleet", &self.fleet).finish()
    }
}

/// Runs the fleet stream on `conn` to the daemon at `daemon` until the connection
/// closes. A daemon older than the fleet stream answers it like an unknown task stream
/// (a Reply); the agent then leaves it be on that connection.
pub(crate) async fn run_stream(conn: quinn::Connection, daemon: String, hook: Hook) {
    let Hook {
        fleet,
        policy,
        apply,
        accept_push,
    } = hook;
    let Ok((mut send, recv)) = conn.open_bi().await else {
        return;
    };
    let mut reader = FrameReader::new(recv);
    // The first report, and the daemon's hello in answer.
    let sent_at = unix_ms(SystemTime::now());
    let Some(status) = policy() else { return };
    let mut last = fleet.report(&status, accept_push);
    if write_frame(&mut send, &last.to_frame()).await.is_err()
        || !greeted(&mut reader, &daemon, &fleet, sent_at).await
    {
        return;
    }
    let mut last_at = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(REPORT_MIN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let Some(status) = policy() else { return };
                let report = fleet.report(&status, accept_push);
                if report == last && last_at.elapsed() < REPORT_INTERVAL {
                    continue;
                }
                if write_frame(&mut send, &report.to_frame()).await.is_err() {
                    return;
                }
                last = report;
                last_at = tokio::time::Instant::now();
            }
            next = reader.next() => match next {
                Ok(Some(frame)) => {
                    if notice(&frame, &daemon, &fleet, &apply) {
                        // Say at once what became of a pushed policy.
                        let Some(status) = policy() else { return };
                        let report = fleet.report(&status, accept_push);
                        if write_frame(&mut send, &report.to_frame()).await.is_err() {
                            return;
                        }
                        last = report;
                        last_at = tokio::time::Instant::now();
                    }
                }
                Ok(None) | Err(_) => return,
            },
        }
    }
}

/// Opens a fleet stream on `conn` to the daemon at `daemon`, sends one report of an
/// agent that has run nothing yet, and returns the hello: the daemon's task names and
/// its clock against ours (ms). For `doctor` when the agent is not running.
pub(crate) async fn hello(
    conn: &quinn::Connection,
    daemon: &str,
    policy: &crate::policy_file::PolicyStatus,
    accept_push: bool,
) -> Result<(Vec<String>, i64), String> {
    let (mut send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let mut reader = FrameReader::new(recv);
    let fleet = Fleet::new(crate::cli::VERSION);
    let sent_at = unix_ms(SystemTime::now());
    write_frame(&mut send, &fleet.report(policy, accept_push).to_frame())
        .await
        .map_err(|e| e.to_string())?;
    let answered = tokio::time::timeout(
        Duration::from_secs(10),
        greeted(&mut reader, daemon, &fleet, sent_at),
    )
    .await
    .unwrap_or(false);
    let _ = send.finish();
    match fleet.heard().remove(daemon) {
        Some(h) if answered => Ok((h.tasks, h.clock_skew_ms)),
        _ => Err(
            "connected, but it answered no fleet report (a daemon older than this agent?)".into(),
        ),
    }
}

/// Reads the daemon's answer to the first report; false when there is none to wait for
/// (an older daemon, or the stream ended).
async fn greeted(
    reader: &mut FrameReader<quinn::RecvStream>,
    daemon: &str,
    fleet: &Fleet,
    sent_at_ms: u64,
) -> bool {
    let frame = match reader.next().await {
        Ok(Some(f)) => f,
        Ok(None) | Err(_) => return false,
    };
    if frame.kind == FrameKind::Reply {
        debug!(
            daemon,
            "the daemon predates the fleet stream; not reporting to it"
        );
        return false;
    }
    match FleetNotice::from_frame(&frame) {
        Ok(FleetNotice::Hello {
            tasks,
            time_unix_ms,
        }) => {
            let back_ms = unix_ms(SystemTime::now());
            let mid = (sent_at_ms + back_ms) / 2;
            let heard = Heard {
                tasks,
                clock_skew_ms: time_unix_ms as i64 - mid as i64,
            };
            fleet
                .heard
                .lock()
                .expect("heard lock")
                .insert(daemon.to_string(), heard);
            true
        }
        Ok(_) => true,
        Err(e) => {
            info!(daemon, error = %e, "daemon misbehaved on the fleet stream; not reporting to it");
            false
        }
    }
}

/// A notice after the hello. True when it changed what the next report says.
fn notice(frame: &updraft_proto::Frame, daemon: &str, fleet: &Fleet, apply: &ApplyPush) -> bool {
    let notice = match FleetNotice::from_frame(frame) {
        Ok(n) => n,
        Err(e) => {
            debug!(daemon, error = %e, "ignored a fleet notice that does not decode");
            return false;
        }
    };
    if let Err(e) = notice.validate() {
        warn!(daemon, error = %e, "ignored a fleet notice that breaks the protocol");
        return false;
    }
    match notice {
        FleetNotice::Policy { hash, text } => fleet.pushed(&hash, &text, apply, daemon),
        FleetNotice::Hello { .. } | FleetNotice::Unknown => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mix_counts_the_last_hour_by_side_and_fallback() {
        let mut w = MixWindow::default();
        let t0 = 1_000_000_000;
        w.add(Side::Local, ReasonKind::Auto, false, t0);
        w.add(Side::Local, ReasonKind::Fallback, true, t0 + 10);
        w.add(Side::Cloud, ReasonKind::Rule, false, t0 + 1800);
        assert_eq!(
            w.sum(t0 + 1800),
            PlacementMix {
                local: 1,
                cloud: 1,
                fallback: 1,
                failed: 1,
            }
        );
        // An hour later the first minute has gone; the cloud task is still counted.
        let later = w.sum(t0 + 3600 + 60);
        assert_eq!((later.local, later.fallback, later.cloud), (0, 0, 1));
        // A bucket reused a lap later starts from zero.
        w.add(Side::Local, ReasonKind::Auto, false, t0 + 3600 * 2);
        assert_eq!(w.sum(t0 + 3600 * 2).local, 1);
        assert_eq!(w.sum(t0 + 3600 * 2).cloud, 0);
    }
}
