//! The fleet stream: one long-lived stream per connection on which an agent tells the
//! daemon who it is and what it runs ([`AgentReport`]), and the daemon answers with its
//! catalog and clock, and pushes policy files ([`FleetNotice`]). `docs/PROTOCOL.md`,
//! "Fleet stream", is the prose version.

use crate::frame::{DecodeError, Frame, FrameKind};
use crate::msg::{decode_json, encode_json};
use serde::{Deserialize, Serialize};

/// Longest policy file a daemon pushes, in bytes of TOML.
pub const MAX_POLICY_LEN: usize = 64 * 1024;
/// Longest `version` an agent reports.
pub const MAX_VERSION_LEN: usize = 128;
/// Longest text field (a refusal, a push outcome's message) in an [`AgentReport`].
pub const MAX_NOTE_LEN: usize = 4096;
/// Most task names a [`FleetNotice::Hello`] lists.
pub const MAX_CATALOG_NAMES: usize = 1024;

/// Agent → daemon on the fleet stream: sent when the stream opens and again whenever
/// something in it changes (at most every few seconds), and at least every minute.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentReport {
    /// The agent's version, as `updraft-agent --version` prints it.
    pub version: String,
    /// The placement policy in force.
    pub policy: PolicyState,
    /// Where this agent's tasks ran over the last hour.
    #[serde(default)]
    pub mix: PlacementMix,
    /// Where its tasks ran since it started (a daemon watching a policy rollout takes
    /// differences of these).
    #[serde(default)]
    pub totals: PlacementMix,
    /// Whether the agent applies pushed policies (`accept_push` in agent.toml).
    #[serde(default)]
    pub accept_push: bool,
    /// What became of the last policy the daemons pushed, if any was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<PushOutcome>,
}

/// The placement policy an agent has in force.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyState {
    /// SHA-256 of the policy file's bytes, 64 lowercase hex digits; empty for the
    /// built-in default (no file).
    pub hash: String,
    /// `file` (the local policy file), `pushed` (a policy a daemon pushed) or `default`.
    pub source: String,
    /// Why the last reload of the policy was refused (`path:line:column: reason`); the
    /// policy above stayed in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// Tasks submitted to an agent over the last hour, by where they ran.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementMix {
    /// Ran on the board by decision.
    #[serde(default)]
    pub local: u64,
    /// Ran on a daemon.
    #[serde(default)]
    pub cloud: u64,
    /// Ran on the board after a cloud attempt failed or no daemon was usable.
    #[serde(default)]
    pub fallback: u64,
    /// Ended in an error of the agent's own (`cloud_failed`, `cloud_unavailable`,
    /// `spawn_failed`, ...), wherever they were placed; counted besides the above.
    #[serde(default)]
    pub failed: u64,
}

impl PlacementMix {
    /// Tasks counted (failed ones are counted in their placement too).
    pub fn total(&self) -> u64 {
        self.local + self.cloud + self.fallback
    }

    /// Each count minus `earlier`'s (0 where it is lower: the agent restarted).
    pub fn since(&self, earlier: &PlacementMix) -> PlacementMix {
        PlacementMix {
            local: self.local.saturating_sub(earlier.local),
            cloud: self.cloud.saturating_sub(earlier.cloud),
            fallback: self.fallback.saturating_sub(earlier.fallback),
            failed: self.failed.saturating_sub(earlier.failed),
        }
    }

    /// The share of tasks that fell back or failed, 0.0 to 1.0 (0.0 without tasks).
    pub fn trouble_rate(&self) -> f64 {
        match self.total() {
            0 => 0.0,
            n => (self.fallback + self.failed).min(n) as f64 / n as f64,
        }
    }
}

/// What an agent did with a pushed policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushOutcome {
    /// The pushed policy's hash.
    pub hash: String,
    /// `applied`, `refused` (it did not parse or check) or `declined` (`accept_push =
    /// false`).
    pub result: PushResult,
    /// For `refused`: `path:line:column: reason`; for `declined`: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// See [`PushOutcome::result`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PushResult {
    /// In force now.
    Applied,
    /// Not valid; the policy before stays in force.
    Refused,
    /// The agent does not take pushed policies.
    Declined,
}

impl PushResult {
    /// The wire string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Refused => "refused",
            Self::Declined => "declined",
        }
    }
}

/// Why an [`AgentReport`] that decoded was refused: a length a peer controls is out of
/// bounds, or a field is not what the protocol says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// `version` is empty or longer than [`MAX_VERSION_LEN`], or holds a control character.
    #[error("version must be 1..={MAX_VERSION_LEN} printable characters")]
    Version,
    /// A hash is not empty or 64 lowercase hex digits.
    #[error("a policy hash must be 64 lowercase hex digits (or empty for the default policy)")]
    Hash,
    /// `policy.source` is not `file`, `pushed` or `default`.
    #[error("policy.source must be file, pushed or default")]
    Source,
    /// A refusal or push message is longer than [`MAX_NOTE_LEN`].
    #[error("a refusal or push message must be at most {MAX_NOTE_LEN} bytes")]
    Note,
}

/// Whether `hash` is a SHA-256 in lowercase hex.
pub fn is_policy_hash(hash: &str) -> bool {
    hash.len() == 64 && hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl AgentReport {
    /// Checks what a peer controls before the daemon keeps any of it.
    pub fn validate(&self) -> Result<(), ReportError> {
        let v = &self.version;
        if v.is_empty() || v.len() > MAX_VERSION_LEN || v.chars().any(char::is_control) {
            return Err(ReportError::Version);
        }
        let p = &self.policy;
        if !(p.hash.is_empty() || is_policy_hash(&p.hash)) {
            return Err(ReportError::Hash);
        }
        if !matches!(p.source.as_str(), "file" | "pushed" | "default") {
            return Err(ReportError::Source);
        }
        let long = |s: &Option<String>| s.as_ref().is_some_and(|s| s.len() > MAX_NOTE_LEN);
        if long(&p.refused) {
            return Err(ReportError::Note);
        }
        if let Some(push) = &self.push {
            if !is_policy_hash(&push.hash) {
                return Err(ReportError::Hash);
            }
            if long(&push.message) {
                return Err(ReportError::Note);
            }
        }
        Ok(())
    }

    /// Encodes this message as its frame.
    pub fn to_frame(&self) -> Frame {
        encode_json(FrameKind::AgentReport, self)
    }

    /// Decodes this message from a frame, checking the frame's kind.
    pub fn from_frame(frame: &Frame) -> Result<Self, DecodeError> {
        decode_json(frame, FrameKind::AgentReport, "agent report")
    }
}

/// Daemon → agent on the fleet stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FleetNotice {
    /// The answer to the first report: the daemon's catalog and clock.
    Hello {
        /// The task names the daemon's catalog offers, at most [`MAX_CATALOG_NAMES`].
        tasks: Vec<String>,
        /// The daemon's wall clock when it sent this, Unix milliseconds.
        time_unix_ms: u64,
    },
    /// A policy file to apply as the managed policy.
    Policy {
        /// SHA-256 of `text`, lowercase hex.
        hash: String,
        /// The policy file, TOML, at most [`MAX_POLICY_LEN`] bytes.
        text: String,
    },
    /// A notice of a type this version does not know; agents ignore it.
    #[serde(other)]
    Unknown,
}

impl FleetNotice {
    /// Checks what a peer controls before the agent acts on it.
    pub fn validate(&self) -> Result<(), NoticeError> {
        match self {
            Self::Hello { tasks, .. } if tasks.len() > MAX_CATALOG_NAMES => {
                Err(NoticeError::Catalog)
            }
            Self::Policy { text, .. } if text.len() > MAX_POLICY_LEN => Err(NoticeError::Policy),
            Self::Policy { hash, .. } if !is_policy_hash(hash) => Err(NoticeError::Hash),
            _ => Ok(()),
        }
    }

    /// Encodes this message as its frame.
    pub fn to_frame(&self) -> Frame {
        encode_json(FrameKind::FleetNotice, self)
    }

    /// Decodes this message from a frame, checking the frame's kind.
    pub fn from_frame(frame: &Frame) -> Result<Self, DecodeError> {
        decode_json(frame, FrameKind::FleetNotice, "fleet notice")
    }
}

/// Why a [`FleetNotice`] that decoded was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NoticeError {
    /// More than [`MAX_CATALOG_NAMES`] task names.
    #[error("a catalog of more than {MAX_CATALOG_NAMES} task names")]
    Catalog,
    /// A policy longer than [`MAX_POLICY_LEN`].
    #[error("a pushed policy longer than {MAX_POLICY_LEN} bytes")]
    Policy,
    /// A policy hash that is not 64 lowercase hex digits.
    #[error("a pushed policy's hash is not 64 lowercase hex digits")]
    Hash,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> AgentReport {
        AgentReport {
            version: "0.1.0 (commit abc)".into(),
            policy: PolicyState {
                hash: "ab".repeat(32),
                source: "file".into(),
                refused: None,
            },
            mix: PlacementMix {
                local: 3,
                cloud: 4,
                fallback: 1,
                failed: 1,
            },
            totals: PlacementMix::default(),
            accept_push: true,
            push: Some(PushOutcome {
                hash: "cd".repeat(32),
                result: PushResult::Refused,
                message: Some("policy.toml:1:1: x".into()),
            }),
        }
    }

    #[test]
    fn reports_round_trip_and_bound_what_a_peer_sends() {
        let r = report();
        assert_eq!(AgentReport::from_frame(&r.to_frame()).unwrap(), r);
        assert!(r.validate().is_ok());
        let mut bad = r.clone();
        bad.version = "x".repeat(MAX_VERSION_LEN + 1);
        assert_eq!(bad.validate(), Err(ReportError::Version));
        bad.version = "1\n2".into();
        assert_eq!(bad.validate(), Err(ReportError::Version));
        let mut bad = r.clone();
        bad.policy.hash = "AB".repeat(32);
        assert_eq!(bad.validate(), Err(ReportError::Hash));
        let mut bad = r.clone();
        bad.policy.source = "mine".into();
        assert_eq!(bad.validate(), Err(ReportError::Source));
        let mut bad = r;
        bad.push.as_mut().unwrap().message = Some("x".repeat(MAX_NOTE_LEN + 1));
        assert_eq!(bad.validate(), Err(ReportError::Note));
    }

    #[test]
    fn an_older_agents_report_and_a_newer_daemons_notice_stay_readable() {
        let minimal = br#"{"version":"0.1.0","policy":{"hash":"","source":"default"},"extra":1}"#;
        let r = AgentReport::from_frame(&Frame::new(FrameKind::AgentReport, &minimal[..])).unwrap();
        assert_eq!(r.mix, PlacementMix::default());
        assert!(!r.accept_push && r.push.is_none());
        let newer = br#"{"type":"reboot","when":"now"}"#;
        let n = FleetNotice::from_frame(&Frame::new(FrameKind::FleetNotice, &newer[..])).unwrap();
        assert_eq!(n, FleetNotice::Unknown);
    }

    #[test]
    fn notices_round_trip_and_are_bounded() {
        let text = "default = \"cloud\"\n".repeat(100);
        let n = FleetNotice::Policy {
            hash: "ef".repeat(32),
            text: text.clone(),
        };
        assert_eq!(FleetNotice::from_frame(&n.to_frame()).unwrap(), n);
        let big = FleetNotice::Policy {
            hash: "ef".repeat(32),
            text: "\"".repeat(MAX_POLICY_LEN),
        };
        // The largest policy, every byte escaped, still fits its frame.
        assert!(big.to_frame().payload.len() <= FrameKind::FleetNotice.max_len() as usize);
        assert!(big.validate().is_ok());
        let over = FleetNotice::Policy {
            hash: "ef".repeat(32),
            text: "x".repeat(MAX_POLICY_LEN + 1),
        };
        assert_eq!(over.validate(), Err(NoticeError::Policy));
        let hello = FleetNotice::Hello {
            tasks: vec!["t".into(); MAX_CATALOG_NAMES + 1],
            time_unix_ms: 1,
        };
        assert_eq!(hello.validate(), Err(NoticeError::Catalog));
    }

    #[test]
    fn the_trouble_rate_counts_fallbacks_and_failures_of_what_ran() {
        let before = PlacementMix {
            local: 5,
            cloud: 5,
            fallback: 0,
            failed: 0,
        };
        let now = PlacementMix {
            local: 5,
            cloud: 7,
            fallback: 6,
            failed: 2,
        };
        let d = now.since(&before);
        assert_eq!((d.total(), d.fallback, d.failed), (8, 6, 2));
        assert_eq!(d.trouble_rate(), 1.0);
        assert_eq!(before.trouble_rate(), 0.0);
        assert_eq!(PlacementMix::default().trouble_rate(), 0.0);
        // A restarted agent's lower totals do not underflow.
        assert_eq!(before.since(&now).total(), 0);
    }
}
