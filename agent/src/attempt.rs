//! What to do after a try to offload a task did not end in a result: offload it again
//! (to which daemon), run it on the board (and why, in words), or fail it. A pure
//! state machine: [`Attempt`] keeps what earlier tries taught, [`Attempt::after`] and
//! [`Attempt::without_daemon`] return an [`Action`]; the service performs it.

use crate::placement::{Placement, ReasonKind, Side};
use crate::task::{TaskCode, TaskError};
use crate::uplink::LinkStatus;
use std::fmt;
use updraft_proto::ErrorCode;

/// Retries of one task after its connection died mid-run, before it fails: enough to
/// ride out a daemon dying and the next one failing over too, few enough that a task
/// that brings daemons down is not passed around forever.
pub(crate) const MAX_MID_TASK_RETRIES: usize = 3;

/// One try of a task lost mid-run, for the reason text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Loss {
    /// The daemon it was lost on.
    pub daemon: String,
    /// Why, as the uplink said.
    pub why: String,
}

impl fmt::Display for Loss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "daemon {} lost the task mid-run ({})",
            self.daemon, self.why
        )
    }
}

/// The tries of a task lost mid-run: repeats said once, counted, joined with `; `.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Losses<'a>(pub &'a [Loss]);

impl fmt::Display for Losses<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        let mut first = true;
        while let Some(loss) = rest.first() {
            let n = rest.iter().take_while(|l| *l == loss).count();
            if !first {
                f.write_str("; ")?;
            }
            first = false;
            if n > 1 {
                write!(f, "{loss} ({n} times)")?;
            } else {
                write!(f, "{loss}")?;
            }
            rest = &rest[n..];
        }
        Ok(())
    }
}

/// `{losses}; ` when there were any, else nothing: the head of a fallback reason.
struct LossesPrefix<'a>(&'a [Loss]);

impl fmt::Display for LossesPrefix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            Ok(())
        } else {
            write!(f, "{}; ", Losses(self.0))
        }
    }
}

/// How one configured daemon stands, for [`NoCloud`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DaemonState {
    /// Left out: it went silent during the task's last try.
    Silent,
    /// Connected, but shutting down.
    Draining,
    /// Connected (and still not usable: full, or just gone).
    Connected,
    /// Not connected, for this reason.
    Failed(String),
    /// Never connected yet.
    NotConnectedYet,
}

impl fmt::Display for DaemonState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Silent => f.write_str("silent since the last attempt began"),
            Self::Draining => f.write_str("draining"),
            Self::Connected => f.write_str("connected"),
            Self::Failed(why) => f.write_str(why),
            Self::NotConnectedYet => f.write_str("not connected yet"),
        }
    }
}

/// Why no daemon can take a task now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NoCloud {
    /// There is no `[[cloud]]` in the config.
    NoneConfigured,
    /// Each configured daemon (address) and how it stands.
    NoneUsable(Vec<(String, DaemonState)>),
}

impl NoCloud {
    /// From the uplink's status; `avoided` is a daemon left out because it went silent
    /// during the task's last try.
    pub(crate) fn of(status: &[LinkStatus], avoided: Option<&str>) -> Self {
        if status.is_empty() {
            return Self::NoneConfigured;
        }
        Self::NoneUsable(
            status
                .iter()
                .map(|s| {
                    let state = if Some(s.address.as_str()) == avoided {
                        DaemonState::Silent
                    } else if s.connected && s.draining {
                        DaemonState::Draining
                    } else if s.connected {
                        DaemonState::Connected
                    } else {
                        s.last_error
                            .clone()
                            .map_or(DaemonState::NotConnectedYet, DaemonState::Failed)
                    };
                    (s.address.clone(), state)
                })
                .collect(),
        )
    }
}

impl fmt::Display for NoCloud {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoneConfigured => f.write_str("no [[cloud]] daemon is configured"),
            Self::NoneUsable(daemons) => {
                f.write_str("no daemon is usable (")?;
                for (i, (address, state)) in daemons.iter().enumerate() {
                    if i > 0 {
                        f.write_str("; ")?;
                    }
                    write!(f, "{address}: {state}")?;
                }
                f.write_str(")")
            }
        }
    }
}

/// Why a task placed in the cloud ran on the board instead; its `Display` is the
/// task's reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fallback {
    /// No daemon was usable when it came to it (`placed` is the placement's reason).
    NoDaemon {
        /// The placement's reason.
        placed: String,
        /// Why no daemon was usable.
        no_cloud: NoCloud,
    },
    /// The daemon refused the task before it started.
    Refused {
        /// Earlier tries lost mid-run.
        losses: Vec<Loss>,
        /// The daemon.
        daemon: String,
        /// Its refusal.
        code: ErrorCode,
        /// Its message.
        why: String,
    },
    /// The try failed before the task started (connection, accept timeout).
    NotStarted {
        /// Earlier tries lost mid-run.
        losses: Vec<Loss>,
        /// The daemon.
        daemon: String,
        /// What failed.
        why: String,
    },
    /// Lost mid-run once more after the last retry.
    LostAgain {
        /// Earlier tries lost mid-run.
        losses: Vec<Loss>,
        /// The daemon.
        daemon: String,
        /// What failed.
        why: String,
    },
}

impl Fallback {
    /// The daemon the last try went to and why it did not run the task there, when
    /// there was a try.
    #[cfg(test)]
    pub(crate) fn tried(&self) -> Option<(&str, &str)> {
        match self {
            Self::NoDaemon { .. } => None,
            Self::Refused { daemon, why, .. }
            | Self::NotStarted { daemon, why, .. }
            | Self::LostAgain { daemon, why, .. } => Some((daemon, why)),
        }
    }

    /// `placed`, moved to the board for this reason.
    pub(crate) fn apply(&self, mut placed: Placement) -> Placement {
        placed.side = Side::Local;
        placed.kind = ReasonKind::Fallback;
        placed.reason = self.to_string();
        placed
    }
}

impl fmt::Display for Fallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoDaemon { placed, no_cloud } => {
                write!(f, "{placed}; then {no_cloud}; ran on the board")
            }
            Self::Refused {
                losses,
                daemon,
                code,
                why,
            } => write!(
                f,
                "{}daemon {daemon} refused the task ({code}: {why}); ran on the board",
                LossesPrefix(losses)
            ),
            Self::NotStarted {
                losses,
                daemon,
                why,
            } => write!(
                f,
                "{}cloud failed before the task started (daemon {daemon}: {why}); ran on the board",
                LossesPrefix(losses)
            ),
            Self::LostAgain {
                losses,
                daemon,
                why,
            } => write!(
                f,
                "{}daemon {daemon} lost the task mid-run ({why}); ran on the board",
                LossesPrefix(losses)
            ),
        }
    }
}

/// How a try to offload ended without a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The daemon did not start the task: it refused (`code`), or the connection
    /// failed or timed out first (`None`). The input is whole again.
    NotStarted {
        /// The daemon's refusal, if it gave one.
        code: Option<ErrorCode>,
        /// What happened.
        why: String,
    },
    /// The task started and its connection was lost.
    Lost {
        /// What happened.
        why: String,
        /// The whole input is still held, so the task can be sent again.
        replayable: bool,
        /// The daemon went silent during the try (its connection still open, no load
        /// report since the try began): likely dead, so not tried again at once.
        silent: bool,
    },
}

/// Which daemon the next try goes to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) enum Next {
    /// Whichever is usable.
    #[default]
    Any,
    /// The daemon the last try was lost on, given `failover_wait` to come back: it may
    /// still run (or have finished) that try, and only it can answer the retry
    /// without a second run.
    WaitFor(String),
    /// Any but this one, which went silent during the last try.
    Avoid(String),
}

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Offload again, with the same id, as [`Attempt::next`] says.
    Offload,
    /// Run on the board instead.
    Local(Fallback),
    /// Nothing ran: the submitter gets this error, and no decision is recorded.
    Refuse(TaskError),
    /// The run failed: this error is the task's result.
    Fail(TaskError),
}

/// What the tries of one task so far have taught.
#[derive(Debug, Clone, Default)]
pub(crate) struct Attempt {
    task: String,
    lost: Vec<Loss>,
    next: Next,
}

impl Attempt {
    /// Before the first try of `task`.
    pub(crate) fn new(task: &str) -> Self {
        Self {
            task: task.to_string(),
            ..Self::default()
        }
    }

    /// Which daemon the next try goes to.
    pub(crate) fn next(&self) -> &Next {
        &self.next
    }

    /// The daemon left out of the next try, if any.
    pub(crate) fn avoided(&self) -> Option<&str> {
        match &self.next {
            Next::Avoid(address) => Some(address),
            _ => None,
        }
    }

    /// The tries lost mid-run so far.
    pub(crate) fn lost(&self) -> &[Loss] {
        &self.lost
    }

    /// The placement for this try, its reason saying what earlier tries went through.
    /// `back_on_same`: the daemon the last try was lost on is usable again, so an
    /// unforced choice of the board goes back to it (it may hold the first run).
    pub(crate) fn placed(&self, mut placed: Placement, back_on_same: bool) -> Placement {
        if back_on_same && placed.side == Side::Local && !placed.forced {
            placed.side = Side::Cloud;
            placed.reason = format!(
                "{}, but the daemon that may hold its first run is back",
                placed.reason
            );
        }
        if !self.lost.is_empty() {
            placed.reason = format!("{}; retried: {}", Losses(&self.lost), placed.reason);
        }
        placed
    }

    /// The task is placed in the cloud (`placed`) but no daemon is usable.
    pub(crate) fn without_daemon(&self, placed: &Placement, no_cloud: NoCloud) -> Action {
        if !placed.forced {
            // Placement only picks the cloud for auto when one was usable; it may have
            // gone in between.
            return Action::Local(Fallback::NoDaemon {
                placed: placed.reason.clone(),
                no_cloud,
            });
        }
        let code = if self.lost.is_empty() {
            TaskCode::CloudUnavailable
        } else {
            TaskCode::CloudFailed
        };
        Action::Refuse(TaskError::new(
            code,
            format!(
                "task `{}` must run in the cloud ({}) but {no_cloud}",
                self.task, placed.reason
            ),
        ))
    }

    /// A try on `daemon` ended in `failure`; `forced`: the placement allows no other
    /// side than the cloud.
    pub(crate) fn after(&mut self, daemon: &str, forced: bool, failure: Failure) -> Action {
        let daemon = daemon.to_string();
        match failure {
            Failure::NotStarted { code, why } if forced => Action::Refuse(TaskError::new(
                code.map_or(TaskCode::CloudUnavailable, TaskCode::from),
                format!("daemon {daemon} did not run task `{}`: {why}", self.task),
            )),
            Failure::NotStarted {
                code: Some(code),
                why,
            } => Action::Local(Fallback::Refused {
                losses: self.lost.clone(),
                daemon,
                code,
                why,
            }),
            Failure::NotStarted { code: None, why } => Action::Local(Fallback::NotStarted {
                losses: self.lost.clone(),
                daemon,
                why,
            }),
            Failure::Lost {
                why,
                replayable: true,
                silent,
            } if self.lost.len() < MAX_MID_TASK_RETRIES => {
                self.next = if silent {
                    Next::Avoid(daemon.clone())
                } else {
                    Next::WaitFor(daemon.clone())
                };
                self.lost.push(Loss { daemon, why });
                Action::Offload
            }
            Failure::Lost {
                why,
                replayable: true,
                ..
            } if !forced => Action::Local(Fallback::LostAgain {
                losses: self.lost.clone(),
                daemon,
                why,
            }),
            Failure::Lost {
                why, replayable, ..
            } => {
                let why = if !replayable && !self.lost.is_empty() {
                    format!("{why}; earlier: {}", Losses(&self.lost))
                } else {
                    why
                };
                Action::Fail(TaskError::new(
                    TaskCode::CloudFailed,
                    format!(
                        "task `{}` failed in the cloud (daemon {daemon}): {why}",
                        self.task
                    ),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placement(side: Side, forced: bool) -> Placement {
        Placement {
            side,
            reason: "auto: faster".into(),
            kind: ReasonKind::Auto,
            forced,
            prediction: None,
        }
    }

    fn lost(why: &str, replayable: bool, silent: bool) -> Failure {
        Failure::Lost {
            why: why.into(),
            replayable,
            silent,
        }
    }

    fn refused(code: ErrorCode) -> Failure {
        Failure::NotStarted {
            code: Some(code),
            why: "no".into(),
        }
    }

    fn status(address: &str, connected: bool, draining: bool, err: Option<&str>) -> LinkStatus {
        LinkStatus {
            address: address.into(),
            connected,
            draining,
            rtt_ms: None,
            load: None,
            last_error: err.map(String::from),
        }
    }

    fn local_reason(a: Action) -> String {
        match a {
            Action::Local(f) => f.to_string(),
            other => panic!("expected a local run, got {other:?}"),
        }
    }

    fn error(a: Action) -> (bool, TaskCode, String) {
        match a {
            Action::Refuse(e) => (false, e.code, e.message),
            Action::Fail(e) => (true, e.code, e.message),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn a_refusal_runs_on_the_board_saying_the_code() {
        for code in [ErrorCode::Busy, ErrorCode::Draining, ErrorCode::TooLarge] {
            let mut a = Attempt::new("t");
            assert_eq!(
                local_reason(a.after("d1:1", false, refused(code))),
                format!("daemon d1:1 refused the task ({code}: no); ran on the board")
            );
        }
    }

    #[test]
    fn a_forced_refusal_is_the_daemons_code_and_nothing_ran() {
        for (code, want) in [
            (ErrorCode::Busy, TaskCode::Wire(ErrorCode::Busy)),
            (ErrorCode::Draining, TaskCode::Wire(ErrorCode::Draining)),
            (
                ErrorCode::UnknownTask,
                TaskCode::Wire(ErrorCode::UnknownTask),
            ),
        ] {
            let mut a = Attempt::new("t");
            assert_eq!(
                error(a.after("d1:1", true, refused(code))),
                (false, want, "daemon d1:1 did not run task `t`: no".into())
            );
        }
    }

    #[test]
    fn an_accept_timeout_runs_on_the_board_or_is_cloud_unavailable_when_forced() {
        let timeout = || Failure::NotStarted {
            code: None,
            why: "no answer within 2s".into(),
        };
        let mut a = Attempt::new("t");
        assert_eq!(
            local_reason(a.after("d1:1", false, timeout())),
            "cloud failed before the task started (daemon d1:1: no answer within 2s); ran on the board"
        );
        assert_eq!(
            error(a.after("d1:1", true, timeout())),
            (
                false,
                TaskCode::CloudUnavailable,
                "daemon d1:1 did not run task `t`: no answer within 2s".into()
            )
        );
    }

    #[test]
    fn lost_mid_run_with_replay_retries_on_the_same_daemon() {
        let mut a = Attempt::new("t");
        assert_eq!(
            a.after("d1:1", false, lost("reset", true, false)),
            Action::Offload
        );
        assert_eq!(a.next(), &Next::WaitFor("d1:1".into()));
        assert_eq!(a.avoided(), None);
        assert_eq!(
            a.lost(),
            [Loss {
                daemon: "d1:1".into(),
                why: "reset".into()
            }]
        );
    }

    #[test]
    fn a_daemon_silent_during_the_try_is_avoided_on_the_retry() {
        let mut a = Attempt::new("t");
        assert_eq!(
            a.after("d1:1", true, lost("idle", true, true)),
            Action::Offload
        );
        assert_eq!(a.next(), &Next::Avoid("d1:1".into()));
        assert_eq!(a.avoided(), Some("d1:1"));
        // A later loss on a talking daemon waits for that one instead.
        assert_eq!(
            a.after("d2:1", true, lost("reset", true, false)),
            Action::Offload
        );
        assert_eq!(a.next(), &Next::WaitFor("d2:1".into()));
    }

    #[test]
    fn lost_mid_run_without_replay_fails_saying_the_earlier_losses() {
        let mut a = Attempt::new("t");
        assert_eq!(
            error(a.after("d1:1", false, lost("reset", false, false))),
            (
                true,
                TaskCode::CloudFailed,
                "task `t` failed in the cloud (daemon d1:1): reset".into()
            )
        );
        assert_eq!(
            a.after("d1:1", false, lost("reset", true, false)),
            Action::Offload
        );
        assert_eq!(
            error(a.after("d2:1", false, lost("closed", false, false))),
            (
                true,
                TaskCode::CloudFailed,
                "task `t` failed in the cloud (daemon d2:1): closed; earlier: daemon d1:1 lost the task mid-run (reset)".into()
            )
        );
    }

    #[test]
    fn after_the_last_retry_the_board_runs_it_unless_forced() {
        let mut a = Attempt::new("t");
        for _ in 0..MAX_MID_TASK_RETRIES {
            assert_eq!(
                a.after("d1:1", false, lost("reset", true, false)),
                Action::Offload
            );
        }
        let mut forced = a.clone();
        assert_eq!(
            local_reason(a.after("d2:1", false, lost("closed", true, false))),
            "daemon d1:1 lost the task mid-run (reset) (3 times); daemon d2:1 lost the task mid-run (closed); ran on the board"
        );
        // Forced to the cloud: no board to fall back on, and the input is whole so no
        // "earlier" list (the reason already has it).
        assert_eq!(
            error(forced.after("d2:1", true, lost("closed", true, false))),
            (
                true,
                TaskCode::CloudFailed,
                "task `t` failed in the cloud (daemon d2:1): closed".into()
            )
        );
        assert_eq!(forced.lost().len(), MAX_MID_TASK_RETRIES);
    }

    #[test]
    fn a_refusal_after_a_loss_says_the_loss_first() {
        let mut a = Attempt::new("t");
        assert_eq!(
            a.after("d1:1", false, lost("reset", true, false)),
            Action::Offload
        );
        assert_eq!(
            local_reason(a.after("d2:1", false, refused(ErrorCode::Busy))),
            "daemon d1:1 lost the task mid-run (reset); daemon d2:1 refused the task (busy: no); ran on the board"
        );
    }

    #[test]
    fn no_daemon_runs_on_the_board_unless_forced() {
        let a = Attempt::new("t");
        let status = [
            status("d1:1", true, true, None),
            status("d2:1", true, false, None),
            status("d3:1", false, false, Some("refused")),
            status("d4:1", false, false, None),
        ];
        let no_cloud = NoCloud::of(&status, None);
        let want = "no daemon is usable (d1:1: draining; d2:1: connected; d3:1: refused; d4:1: not connected yet)";
        assert_eq!(no_cloud.to_string(), want);
        assert_eq!(
            local_reason(a.without_daemon(&placement(Side::Cloud, false), no_cloud.clone())),
            format!("auto: faster; then {want}; ran on the board")
        );
        assert_eq!(
            error(a.without_daemon(&placement(Side::Cloud, true), no_cloud)),
            (
                false,
                TaskCode::CloudUnavailable,
                format!("task `t` must run in the cloud (auto: faster) but {want}")
            )
        );
        assert_eq!(
            NoCloud::of(&[], None).to_string(),
            "no [[cloud]] daemon is configured"
        );
    }

    #[test]
    fn forced_cloud_with_no_daemon_after_a_loss_is_cloud_failed() {
        let mut a = Attempt::new("t");
        assert_eq!(
            a.after("d1:1", true, lost("idle", true, true)),
            Action::Offload
        );
        let no_cloud = NoCloud::of(&[status("d1:1", true, false, None)], a.avoided());
        assert_eq!(
            no_cloud.to_string(),
            "no daemon is usable (d1:1: silent since the last attempt began)"
        );
        let placed = a.placed(placement(Side::Cloud, true), false);
        assert_eq!(
            error(a.without_daemon(&placed, no_cloud)),
            (
                false,
                TaskCode::CloudFailed,
                "task `t` must run in the cloud (daemon d1:1 lost the task mid-run (idle); retried: auto: faster) but no daemon is usable (d1:1: silent since the last attempt began)".into()
            )
        );
    }

    #[test]
    fn the_daemon_that_may_hold_the_first_run_wins_back_an_unforced_board() {
        let mut a = Attempt::new("t");
        let p = a.placed(placement(Side::Local, false), true);
        assert_eq!(p.side, Side::Cloud);
        assert_eq!(
            p.reason,
            "auto: faster, but the daemon that may hold its first run is back"
        );
        // Forced to the board, or the daemon not back: the board it is.
        assert_eq!(
            a.placed(placement(Side::Local, true), true).side,
            Side::Local
        );
        assert_eq!(
            a.placed(placement(Side::Local, false), false).side,
            Side::Local
        );
        assert_eq!(
            a.after("d1:1", false, lost("x", true, false)),
            Action::Offload
        );
        assert_eq!(
            a.placed(placement(Side::Local, false), true).reason,
            "daemon d1:1 lost the task mid-run (x); retried: auto: faster, but the daemon that may hold its first run is back"
        );
    }

    #[test]
    fn a_fallback_moves_the_placement_to_the_board() {
        let f = Fallback::NotStarted {
            losses: vec![],
            daemon: "d1:1".into(),
            why: "w".into(),
        };
        assert_eq!(f.tried(), Some(("d1:1", "w")));
        let p = f.apply(placement(Side::Cloud, false));
        assert_eq!((p.side, p.kind), (Side::Local, ReasonKind::Fallback));
        assert_eq!(p.reason, f.to_string());
    }

    #[test]
    fn losses_say_a_repeated_attempt_once_with_its_count() {
        let loss = |d: &str, why: &str| Loss {
            daemon: d.into(),
            why: why.into(),
        };
        let a = loss("d1", "no answer");
        let b = loss("d2", "connection lost");
        assert_eq!(Losses(&[]).to_string(), "");
        assert_eq!(
            Losses(std::slice::from_ref(&a)).to_string(),
            "daemon d1 lost the task mid-run (no answer)"
        );
        assert_eq!(
            Losses(&[a.clone(), a.clone(), b.clone(), a.clone()]).to_string(),
            format!("{a} (2 times); {b}; {a}")
        );
    }
}
