//! THE placement seam: a submission, the task's spec and what is known right now go
//! in; a side and a reason an operator can read come out. Every placement decision
//! the agent makes passes through [`decide`].

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

/// The two sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// On the board.
    Local,
    /// On a daemon.
    Cloud,
}

impl Side {
    /// `local` or `cloud`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Cloud => "cloud",
        }
    }
}

/// What decided, for metrics: one label value per kind of reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReasonKind {
    /// `--where` / `where=`.
    Requested,
    /// The task's `offload`.
    TaskOffload,
    /// Automatic placement.
    Auto,
    /// The cloud failed before the task started; ran on the board instead.
    Fallback,
}

impl ReasonKind {
    /// Metrics label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::TaskOffload => "task_offload",
            Self::Auto => "auto",
            Self::Fallback => "fallback",
        }
    }
}

/// A decision and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Where the task goes.
    pub side: Side,
    /// Why, in words.
    pub reason: String,
    /// What kind of reason.
    pub kind: ReasonKind,
    /// True when the side is mandatory: no fallback, a clear error if impossible.
    pub forced: bool,
}

/// What the agent knows right now that placement may use.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// The daemon that would take the task, if any is connected and not draining:
    /// its address, running + queued, and capacity.
    pub cloud: Option<(String, u32, u32)>,
}

/// Decides where a task runs.
pub fn decide(spec: &TaskSpec, requested: Where, ctx: &Context) -> Placement {
    let p = |side, reason: String, kind, forced| Placement {
        side,
        reason,
        kind,
        forced,
    };
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
    match &ctx.cloud {
        Some((addr, busy, capacity)) => p(
            Side::Cloud,
            format!("auto: daemon {addr} connected, load {busy}/{capacity}"),
            ReasonKind::Auto,
            false,
        ),
        None => p(
            Side::Local,
            "auto: no daemon connected".into(),
            ReasonKind::Auto,
            false,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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

    #[test]
    fn order_of_precedence() {
        let up = Context {
            cloud: Some(("d:1".into(), 0, 2)),
        };
        let down = Context::default();
        // --where wins over the task's offload.
        let d = decide(&spec(Offload::Never), Where::Cloud, &up);
        assert_eq!((d.side, d.forced), (Side::Cloud, true));
        // offload wins over auto.
        let d = decide(&spec(Offload::Never), Where::Auto, &up);
        assert_eq!((d.side, d.kind), (Side::Local, ReasonKind::TaskOffload));
        let d = decide(&spec(Offload::Always), Where::Auto, &down);
        assert_eq!((d.side, d.forced), (Side::Cloud, true));
        // auto follows connectivity.
        let d = decide(&spec(Offload::Auto), Where::Auto, &up);
        assert_eq!((d.side, d.forced), (Side::Cloud, false));
        assert!(d.reason.contains("d:1"), "{}", d.reason);
        assert_eq!(
            decide(&spec(Offload::Auto), Where::Auto, &down).side,
            Side::Local
        );
    }
}
