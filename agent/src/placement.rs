//! THE placement seam: a submission, the task's spec and what is known right now go
//! in; a side and a reason an operator can read come out. Every placement decision
//! the agent makes passes through [`decide`].

use updraft_proto::policy::cost::Prediction;
use updraft_proto::policy::eval::Verdict;
use updraft_proto::policy::Place;
use updraft_shared::catalog::{Offload, TaskSpec};

/// Where a run was asked to go (`--where`, `where=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Where {
    /// Let placement decide.
    #[default]
    Auto,
    /// On the board, no fallback.
    Local,
    /// In the cloud, no fallback.
    Cloud,
}

impl std::str::FromStr for Where {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "local" => Ok(Self::Local),
            "cloud" => Ok(Self::Cloud),
            other => Err(format!("where must be auto, local or cloud, not `{other}`")),
        }
    }
}

/// The two sides: the cost model's own type, so a prediction and a placement speak
/// the same language.
pub(crate) use updraft_proto::policy::cost::Side;

/// What decided, for metrics: one label value per kind of reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReasonKind {
    /// `--where` / `where=`.
    Requested,
    /// The task's `offload`.
    TaskOffload,
    /// A policy rule.
    Rule,
    /// The policy's `default` (local or cloud).
    Default,
    /// The cost model.
    Auto,
    /// The cost model, re-sampling the side whose estimate is stale.
    Explore,
    /// The chosen cloud was not usable or failed before the task started; ran on the board.
    Fallback,
}

impl ReasonKind {
    /// Metrics label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::TaskOffload => "task_offload",
            Self::Rule => "rule",
            Self::Default => "default",
            Self::Auto => "auto",
            Self::Explore => "explore",
            Self::Fallback => "fallback",
        }
    }
}

/// A decision and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    /// Where the task goes.
    pub side: Side,
    /// Why, in words.
    pub reason: String,
    /// What kind of reason.
    pub kind: ReasonKind,
    /// True when the side is mandatory: no fallback, a clear error if impossible.
    pub forced: bool,
    /// The cost model's prediction, when it decided.
    pub prediction: Option<Prediction>,
}

/// The daemon that would take the task, if any is usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CloudView {
    /// Its address.
    pub address: String,
    /// Running + queued there.
    pub busy: u32,
    /// Its slots.
    pub capacity: u32,
}

/// Why `requested` may not be honoured for a task: `offload = "never"` is the
/// operator's word that the task's data stays on the board, so no submitter may move it
/// off (`where=cloud`); `offload = "always"` may not be pulled onto the board
/// (`where=local`). `None` when the request is compatible.
pub(crate) fn conflict(spec: &TaskSpec, requested: Where) -> Option<String> {
    match (spec.offload, requested) {
        (Offload::Never, Where::Cloud) => Some(format!(
            "task `{}` has offload = \"never\" in the agent's config: it may not run in the cloud, whatever where= asks",
            spec.name
        )),
        (Offload::Always, Where::Local) => Some(format!(
            "task `{}` has offload = \"always\" in the agent's config: it may not run on the board, whatever where= asks",
            spec.name
        )),
        _ => None,
    }
}

/// Decides where a task runs, in the contract's order: the task's `offload`, then the
/// request's `where` (a `where` that contradicts `offload` is refused earlier, by
/// [`conflict`]), then the policy's rules and default, then the cost model.
/// `policy` and `auto` are only called when their step is reached.
pub(crate) fn decide(
    spec: &TaskSpec,
    requested: Where,
    cloud: Option<&CloudView>,
    policy: impl FnOnce() -> Verdict,
    auto: impl FnOnce() -> Prediction,
) -> Placement {
    let p = |side, reason: String, kind, forced| Placement {
        side,
        reason,
        kind,
        forced,
        prediction: None,
    };
    match spec.offload {
        Offload::Never => {
            return p(
                Side::Local,
                format!("task `{}` has offload = never", spec.name),
                ReasonKind::TaskOffload,
                true,
            )
        }
        Offload::Always => {
            return p(
                Side::Cloud,
                format!("task `{}` has offload = always", spec.name),
                ReasonKind::TaskOffload,
                true,
            )
        }
        Offload::Auto => {}
    }
    match requested {
        Where::Local => {
            return p(
                Side::Local,
                "requested: where=local".into(),
                ReasonKind::Requested,
                true,
            )
        }
        Where::Cloud => {
            return p(
                Side::Cloud,
                "requested: where=cloud".into(),
                ReasonKind::Requested,
                true,
            )
        }
        Where::Auto => {}
    }
    let verdict = policy();
    let kind = if verdict.rule.is_some() {
        ReasonKind::Rule
    } else {
        ReasonKind::Default
    };
    match verdict.place {
        Place::Local => p(Side::Local, verdict.reason, kind, false),
        Place::Cloud => match cloud {
            Some(_) => p(Side::Cloud, verdict.reason, kind, false),
            None => p(
                Side::Local,
                format!(
                    "{}; but no daemon is usable, so on the board",
                    verdict.reason
                ),
                ReasonKind::Fallback,
                false,
            ),
        },
        Place::Auto => {
            let prediction = auto();
            let side = match (prediction.choice, cloud) {
                (Side::Cloud, Some(_)) => Side::Cloud,
                _ => Side::Local,
            };
            let reason = match verdict.rule {
                Some(_) => format!("{}; {}", verdict.reason, prediction.reason),
                None => prediction.reason.clone(),
            };
            let kind = if prediction.explore {
                ReasonKind::Explore
            } else {
                ReasonKind::Auto
            };
            Placement {
                side,
                reason,
                kind,
                forced: false,
                prediction: Some(prediction),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use updraft_proto::policy::cost::Cost;
    use updraft_shared::catalog::{Catalog, TaskFile};

    fn spec(offload: Offload) -> TaskSpec {
        let f = TaskFile {
            builtin: Some("echo".into()),
            offload: Some(offload),
            ..Default::default()
        };
        let c = Catalog::from_files([("t".to_string(), f)].into_iter().collect()).unwrap();
        (**c.get("t").unwrap()).clone()
    }

    fn verdict(place: Place, rule: Option<&str>) -> impl FnOnce() -> Verdict {
        let v = Verdict {
            place,
            rule: rule.map(Into::into),
            reason: format!("because {}", place.as_str()),
        };
        move || v
    }

    fn prediction(choice: Side) -> impl FnOnce() -> Prediction {
        let cost = Cost {
            finish: Duration::from_millis(1),
            run: Duration::ZERO,
            queue: Duration::ZERO,
            network: Duration::ZERO,
            energy_j: 0.0,
            score: 0.001,
            samples: 1,
        };
        move || Prediction {
            choice,
            local: cost,
            cloud: Some(cost),
            explore: false,
            reason: format!("auto: {}", choice.as_str()),
        }
    }

    fn never<T>() -> impl FnOnce() -> T {
        || panic!("this step must not be reached")
    }

    #[test]
    fn order_of_precedence() {
        let up = CloudView {
            address: "d:1".into(),
            busy: 0,
            capacity: 2,
        };
        // offload wins over --where: a contradiction is refused, and were it to
        // reach decide() the task would still stay where offload says.
        assert!(conflict(&spec(Offload::Never), Where::Cloud).is_some());
        assert!(conflict(&spec(Offload::Always), Where::Local).is_some());
        assert!(conflict(&spec(Offload::Never), Where::Local).is_none());
        assert!(conflict(&spec(Offload::Auto), Where::Cloud).is_none());
        let d = decide(&spec(Offload::Never), Where::Cloud, None, never(), never());
        assert_eq!(
            (d.side, d.forced, d.kind),
            (Side::Local, true, ReasonKind::TaskOffload)
        );
        // --where wins over the policy, and is forced.
        let d = decide(&spec(Offload::Auto), Where::Cloud, None, never(), never());
        assert_eq!(
            (d.side, d.forced, d.kind),
            (Side::Cloud, true, ReasonKind::Requested)
        );
        // offload wins over the policy.
        let d = decide(
            &spec(Offload::Never),
            Where::Auto,
            Some(&up),
            never(),
            never(),
        );
        assert_eq!((d.side, d.kind), (Side::Local, ReasonKind::TaskOffload));
        let d = decide(&spec(Offload::Always), Where::Auto, None, never(), never());
        assert_eq!((d.side, d.forced), (Side::Cloud, true));
        // A rule decides without the cost model.
        let d = decide(
            &spec(Offload::Auto),
            Where::Auto,
            Some(&up),
            verdict(Place::Cloud, Some("r")),
            never(),
        );
        assert_eq!(
            (d.side, d.kind, d.forced),
            (Side::Cloud, ReasonKind::Rule, false)
        );
        // A rule for the cloud with no usable daemon runs on the board and says so.
        let d = decide(
            &spec(Offload::Auto),
            Where::Auto,
            None,
            verdict(Place::Cloud, Some("r")),
            never(),
        );
        assert_eq!((d.side, d.kind), (Side::Local, ReasonKind::Fallback));
        assert!(d.reason.contains("no daemon"), "{}", d.reason);
        // The default local does not consult the cost model either.
        let d = decide(
            &spec(Offload::Auto),
            Where::Auto,
            Some(&up),
            verdict(Place::Local, None),
            never(),
        );
        assert_eq!((d.side, d.kind), (Side::Local, ReasonKind::Default));
        // auto hands over to the cost model.
        let d = decide(
            &spec(Offload::Auto),
            Where::Auto,
            Some(&up),
            verdict(Place::Auto, None),
            prediction(Side::Cloud),
        );
        assert_eq!((d.side, d.kind), (Side::Cloud, ReasonKind::Auto));
        assert_eq!(d.reason, "auto: cloud");
        // ...but never sends to a cloud that is not there.
        let d = decide(
            &spec(Offload::Auto),
            Where::Auto,
            None,
            verdict(Place::Auto, None),
            prediction(Side::Cloud),
        );
        assert_eq!(d.side, Side::Local);
        // A rule that says auto keeps its name in the reason.
        let d = decide(
            &spec(Offload::Auto),
            Where::Auto,
            Some(&up),
            verdict(Place::Auto, Some("r")),
            prediction(Side::Local),
        );
        assert_eq!(d.reason, "because auto; auto: local");
    }
}
