//! A policy rollout: which agents a pushed policy goes to, in which stage, and when it
//! stops. Pure: the registry feeds it the agents' records and the time.
//!
//! With a canary of N boards the policy goes to those first. The rollout stops when one
//! of them refuses it, or when, over `window` after the last canary answered, the share
//! of their tasks that fell back to the board or failed rose by more than
//! [`MAX_TROUBLE_RISE`] over their share in the hour before the push. Otherwise it goes
//! to every other board in scope. Boards offline get it when they next connect.

use std::collections::BTreeMap;
use updraft_proto::fleet::{PlacementMix, PushResult};

use super::AgentRecord;

/// How much the share of a canary's tasks that fell back or failed may rise (0.10 is
/// ten percentage points) before a rollout stops.
pub(crate) const MAX_TROUBLE_RISE: f64 = 0.10;

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Phase {
    /// Only the canaries get it.
    Canary,
    /// Every board in scope gets it.
    All,
    /// No board gets it any more; `stopped` says why.
    Stopped,
}

/// One pushed policy and how far it went.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Rollout {
    /// SHA-256 of `text`.
    pub(crate) hash: String,
    /// The policy file.
    pub(crate) text: String,
    /// The file name the operator pushed (for messages).
    pub(crate) name: String,
    /// The boards in scope; absent: every board.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) targets: Option<Vec<String>>,
    /// The canaries; empty: no canary stage.
    #[serde(default)]
    pub(crate) canary: Vec<String>,
    /// How long the canaries are watched after the last of them answered, ms.
    pub(crate) window_ms: u64,
    /// When the push started, Unix ms.
    pub(crate) started_unix_ms: u64,
    /// The stage.
    pub(crate) phase: Phase,
    /// Why it stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) stopped: Option<String>,
    /// Each canary's last-hour mix and totals when the push started.
    #[serde(default)]
    pub(crate) baseline: BTreeMap<String, (PlacementMix, PlacementMix)>,
    /// When the last canary answered, Unix ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) canary_answered_unix_ms: Option<u64>,
}

/// Why a push could not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum StartError {
    /// A canary was asked for, and no board in scope is connected and takes pushes.
    #[error("no board in scope is connected and accepts pushed policies, so there is no canary: push without --canary, or when boards are up")]
    NoCanary,
}

/// What an operator pushes: a checked policy file, where to, and how.
#[derive(Debug, Clone)]
pub(crate) struct PushSpec {
    /// SHA-256 of `text`.
    pub(crate) hash: String,
    /// The policy file.
    pub(crate) text: String,
    /// The file name the operator pushed (for messages).
    pub(crate) name: String,
    /// The boards in scope; `None`: every board.
    pub(crate) targets: Option<Vec<String>>,
    /// Canaries first; 0: every board at once.
    pub(crate) canary: usize,
    /// How long the canaries are watched after they answered, ms.
    pub(crate) window_ms: u64,
}

impl Rollout {
    /// A rollout of `spec` among `agents` (each record, and whether it is connected),
    /// started at `now_ms`. The canaries are the first boards in scope, by id, that are
    /// connected, not revoked and accept pushes.
    pub(crate) fn start(
        spec: PushSpec,
        agents: &[(AgentRecord, bool)],
        now_ms: u64,
    ) -> Result<Self, StartError> {
        let PushSpec {
            hash,
            text,
            name,
            targets,
            canary,
            window_ms,
        } = spec;
        let mut r = Rollout {
            hash,
            text,
            name,
            targets,
            canary: Vec::new(),
            window_ms,
            started_unix_ms: now_ms,
            phase: Phase::All,
            stopped: None,
            baseline: BTreeMap::new(),
            canary_answered_unix_ms: None,
        };
        if canary > 0 {
            let picked: Vec<&AgentRecord> = agents
                .iter()
                .filter(|(a, connected)| {
                    *connected
                        && a.revoked_unix_ms.is_none()
                        && a.accept_push
                        && r.in_scope(&a.agent_id)
                })
                .map(|(a, _)| a)
                .take(canary)
                .collect();
            if picked.is_empty() {
                return Err(StartError::NoCanary);
            }
            r.canary = picked.iter().map(|a| a.agent_id.clone()).collect();
            r.baseline = picked
                .iter()
                .map(|a| (a.agent_id.clone(), (a.mix, a.totals)))
                .collect();
            r.phase = Phase::Canary;
        }
        Ok(r)
    }

    /// Whether this rollout, shared by another replica, replaces `local`: a push
    /// started later, or the same push at a later stage ([`Phase::Stopped`] last).
    pub(crate) fn supersedes(&self, local: &Rollout) -> bool {
        let rank = |p: Phase| match p {
            Phase::Canary => 0,
            Phase::All => 1,
            Phase::Stopped => 2,
        };
        let same = self.hash == local.hash && self.started_unix_ms == local.started_unix_ms;
        if same {
            rank(self.phase) > rank(local.phase)
        } else {
            self.started_unix_ms > local.started_unix_ms
        }
    }

    /// Whether `agent` is one the push is for at all.
    pub(crate) fn in_scope(&self, agent: &str) -> bool {
        self.targets
            .as_ref()
            .is_none_or(|t| t.iter().any(|a| a == agent))
    }

    /// Whether `agent` should get the policy now.
    pub(crate) fn wants(&self, agent: &str) -> bool {
        match self.phase {
            Phase::Stopped => false,
            Phase::Canary => self.canary.iter().any(|a| a == agent),
            Phase::All => self.in_scope(agent),
        }
    }

    /// Moves the rollout on from what the agents' records say at `now_ms`. Returns true
    /// when it moved to [`Phase::All`] (the rest of the boards are due the policy).
    pub(crate) fn step(&mut self, records: &BTreeMap<String, AgentRecord>, now_ms: u64) -> bool {
        if self.phase != Phase::Canary {
            return false;
        }
        let mut answered = 0;
        let mut applied = Vec::new();
        for c in &self.canary {
            let Some(r) = records.get(c) else { continue };
            let Some(p) = r.push.as_ref().filter(|p| p.hash == self.hash) else {
                continue;
            };
            answered += 1;
            match p.result {
                PushResult::Refused => {
                    let why = p.message.as_deref().unwrap_or("no reason given");
                    return self.stop(format!("canary `{c}` refused the policy: {why}"));
                }
                PushResult::Applied => applied.push(r),
                PushResult::Declined => {}
            }
        }
        if answered < self.canary.len() {
            return false;
        }
        if applied.is_empty() {
            return self.stop(
                "no canary applied the policy (they declined it: [policy] accept_push = false)"
                    .into(),
            );
        }
        let since = *self.canary_answered_unix_ms.get_or_insert(now_ms);
        if now_ms < since.saturating_add(self.window_ms) {
            return false;
        }
        for r in applied {
            let (hour, totals) = self.baseline.get(&r.agent_id).copied().unwrap_or_default();
            let during = r.totals.since(&totals);
            if during.total() == 0 {
                continue;
            }
            let (before, after) = (hour.trouble_rate(), during.trouble_rate());
            if after > before + MAX_TROUBLE_RISE {
                return self.stop(format!(
                    "canary `{}`: {:.0} % of its tasks fell back to the board or failed in the {} s after it applied the policy ({} of {}), against {:.0} % in the hour before; the other boards keep their policy",
                    r.agent_id,
                    after * 100.0,
                    self.window_ms / 1000,
                    during.fallback + during.failed,
                    during.total(),
                    before * 100.0
                ));
            }
        }
        self.phase = Phase::All;
        true
    }

    fn stop(&mut self, why: String) -> bool {
        self.phase = Phase::Stopped;
        self.stopped = Some(why);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use updraft_proto::fleet::PushOutcome;

    fn board(id: &str, accept: bool) -> AgentRecord {
        AgentRecord {
            agent_id: id.into(),
            accept_push: accept,
            ..AgentRecord::default()
        }
    }

    fn start(canary: usize, agents: &[(AgentRecord, bool)]) -> Result<Rollout, StartError> {
        let spec = PushSpec {
            hash: "ab".repeat(32),
            text: "default = \"cloud\"\n".into(),
            name: "p.toml".into(),
            targets: None,
            canary,
            window_ms: 60_000,
        };
        Rollout::start(spec, agents, 1_000)
    }

    #[test]
    fn a_shared_rollout_replaces_an_older_push_or_an_earlier_stage_only() {
        let boards = [(board("b-1", true), true)];
        let canary = start(1, &boards).unwrap();
        let mut all = canary.clone();
        all.phase = Phase::All;
        let mut stopped = canary.clone();
        stopped.phase = Phase::Stopped;
        assert!(all.supersedes(&canary) && stopped.supersedes(&all));
        assert!(!canary.supersedes(&all) && !all.supersedes(&all));
        // A later push wins whatever its stage; an earlier one never does.
        let mut later = canary.clone();
        later.started_unix_ms += 1;
        later.hash = "cd".repeat(32);
        assert!(later.supersedes(&stopped));
        assert!(!stopped.supersedes(&later));
    }

    fn answered(mut r: AgentRecord, result: PushResult) -> AgentRecord {
        r.push = Some(PushOutcome {
            hash: "ab".repeat(32),
            result,
            message: Some("p.toml:1:1: nope".into()),
        });
        r
    }

    #[test]
    fn canaries_are_connected_boards_that_take_pushes() {
        let agents = [
            (board("a", true), false),
            (board("b", false), true),
            (board("c", true), true),
            (board("d", true), true),
        ];
        let r = start(1, &agents).unwrap();
        assert_eq!(r.canary, ["c"]);
        assert!(r.wants("c") && !r.wants("d"));
        assert_eq!(start(1, &agents[..2]).unwrap_err(), StartError::NoCanary);
        let all = start(0, &agents).unwrap();
        assert!(all.wants("a") && all.wants("d"));
    }

    #[test]
    fn a_refusing_canary_stops_the_rollout() {
        let mut r = start(1, &[(board("c", true), true)]).unwrap();
        let records =
            BTreeMap::from([("c".into(), answered(board("c", true), PushResult::Refused))]);
        assert!(!r.step(&records, 2_000));
        assert_eq!(r.phase, Phase::Stopped);
        assert!(r.stopped.as_ref().unwrap().contains("p.toml:1:1: nope"));
        assert!(!r.wants("c"));
    }

    #[test]
    fn the_rest_follow_after_a_quiet_window_and_not_after_a_rise_in_fallbacks() {
        let mut quiet = board("c", true);
        quiet.mix = PlacementMix {
            local: 10,
            ..Default::default()
        };
        let mut r = start(1, &[(quiet.clone(), true)]).unwrap();
        let mut after = answered(quiet.clone(), PushResult::Applied);
        after.totals = PlacementMix {
            local: 3,
            cloud: 2,
            ..Default::default()
        };
        let records = BTreeMap::from([("c".into(), after.clone())]);
        assert!(!r.step(&records, 2_000), "the window has only started");
        assert_eq!(r.phase, Phase::Canary);
        assert!(r.step(&records, 2_000 + 60_000), "a quiet window promotes");
        assert!(r.wants("zz"));

        let mut r = start(1, &[(quiet.clone(), true)]).unwrap();
        let mut worse = answered(quiet, PushResult::Applied);
        worse.totals = PlacementMix {
            local: 1,
            fallback: 4,
            ..Default::default()
        };
        let records = BTreeMap::from([("c".into(), worse)]);
        assert!(!r.step(&records, 2_000));
        assert!(!r.step(&records, 62_000));
        assert_eq!(r.phase, Phase::Stopped);
        let why = r.stopped.unwrap();
        assert!(
            why.contains("80 %") && why.contains("4 of 5") && why.contains("0 %"),
            "{why}"
        );
    }

    #[test]
    fn canaries_that_all_decline_stop_the_rollout() {
        let mut r = start(1, &[(board("c", true), true)]).unwrap();
        let records =
            BTreeMap::from([("c".into(), answered(board("c", true), PushResult::Declined))]);
        r.step(&records, 2_000);
        assert_eq!(r.phase, Phase::Stopped);
        assert!(r.stopped.unwrap().contains("declined"));
    }
}
