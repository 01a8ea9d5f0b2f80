//! What a task is to the agent's callers: the [`Submission`] that asks for it, how it
//! ended ([`Finished`], [`Exit`]), the [`Decision`] kept for `status`, and the
//! [`TaskError`] a submitter sees, whose [`TaskCode`] holds every stable error string
//! and its HTTP status in one place.

use crate::placement::{ReasonKind, Side, Where};
use crate::spool::Spool;
use updraft_proto::ErrorCode;

/// A request to run a task.
#[derive(Debug, Clone, Default)]
pub struct Submission {
    /// Catalog name.
    pub task: String,
    /// Extra arguments.
    pub args: Vec<String>,
    /// Requested side.
    pub where_: Where,
    /// Input length when known.
    pub input_len: Option<u64>,
}

/// Why a task was refused or failed: a wire code ([`ErrorCode`], the daemon's or one the
/// agent gives the same meaning) or one of the agent's own. The strings
/// ([`TaskCode::as_str`]) are stable: clients match on them in the `code` field and the
/// `updraft-error-code` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskCode {
    /// A code of the wire protocol, with its wire string.
    Wire(ErrorCode),
    /// The task must run in the cloud and no daemon is usable.
    CloudUnavailable,
    /// The task was lost in the cloud, or the daemon answered nonsense.
    CloudFailed,
    /// The journal of detached tasks is at `[journal] max_bytes`.
    JournalFull,
    /// The filesystem holding `state_dir` is full.
    StorageFull,
    /// No such detached task, or no such endpoint.
    NotFound,
    /// The detached task has not finished yet.
    NotReady,
    /// The detached task was started `[journal] max_attempts` times and never finished.
    CrashLoop,
    /// The endpoint exists but not with this HTTP method.
    MethodNotAllowed,
}

impl TaskCode {
    /// The agent's own codes, beside the wire ones.
    const OWN: [TaskCode; 8] = [
        Self::CloudUnavailable,
        Self::CloudFailed,
        Self::JournalFull,
        Self::StorageFull,
        Self::NotFound,
        Self::NotReady,
        Self::CrashLoop,
        Self::MethodNotAllowed,
    ];

    /// Every code: the wire ones, then the agent's own.
    pub fn all() -> impl Iterator<Item = TaskCode> {
        ErrorCode::ALL.into_iter().map(Self::Wire).chain(Self::OWN)
    }

    /// The stable string of this code.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Wire(c) => c.as_str(),
            Self::CloudUnavailable => "cloud_unavailable",
            Self::CloudFailed => "cloud_failed",
            Self::JournalFull => "journal_full",
            Self::StorageFull => "storage_full",
            Self::NotFound => "not_found",
            Self::NotReady => "not_ready",
            Self::CrashLoop => "crash_loop",
            Self::MethodNotAllowed => "method_not_allowed",
        }
    }

    /// The code whose string is `s` (as the journal stores it).
    pub fn parse(s: &str) -> Option<Self> {
        Self::all().find(|c| c.as_str() == s)
    }

    /// The HTTP status that fits the code.
    pub fn http_status(self) -> u16 {
        match self {
            Self::Wire(c) => match c {
                ErrorCode::UnknownTask => 404,
                ErrorCode::NotAllowed => 403,
                ErrorCode::BadRequest => 400,
                ErrorCode::TooLarge => 413,
                ErrorCode::Busy | ErrorCode::Draining => 503,
                ErrorCode::TimedOut => 504,
                ErrorCode::OutputTooLarge => 502,
                ErrorCode::SpawnFailed
                | ErrorCode::Internal
                | ErrorCode::BadToken
                | ErrorCode::CannotIssue
                | ErrorCode::Other => 500,
            },
            Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::CloudUnavailable => 503,
            Self::JournalFull | Self::StorageFull => 507,
            Self::NotReady => 409,
            Self::CloudFailed => 502,
            Self::CrashLoop => 500,
        }
    }

    /// Whether a task that may only run in the cloud waits for it and tries again
    /// after this error, instead of failing: the cloud was missing or full, not the task.
    pub fn cloud_may_come_back(self) -> bool {
        matches!(
            self,
            Self::CloudUnavailable
                | Self::CloudFailed
                | Self::Wire(ErrorCode::Busy | ErrorCode::Draining)
        )
    }
}

impl From<ErrorCode> for TaskCode {
    fn from(c: ErrorCode) -> Self {
        Self::Wire(c)
    }
}

impl std::fmt::Display for TaskCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for TaskCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A refusal or failure the submitter sees as one clear error.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, thiserror::Error)]
#[error("{message}")]
pub struct TaskError {
    /// What kind of error, with its stable string.
    pub code: TaskCode,
    /// What happened and what to do.
    pub message: String,
}

impl TaskError {
    /// An error with `code` and `message`.
    pub fn new(code: impl Into<TaskCode>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
        }
    }

    /// The HTTP status that fits the code.
    pub fn http_status(&self) -> u16 {
        self.code.http_status()
    }
}

/// How a placed task ended.
#[derive(Debug)]
pub struct Finished {
    /// Task id.
    pub id: String,
    /// Where it ran.
    pub side: Side,
    /// Why there.
    pub reason: String,
    /// The exit code, or why there is none.
    pub result: Result<Exit, TaskError>,
    /// The output (possibly partial when `result` is an error).
    pub output: Spool,
}

/// A run that ended in an exit code.
#[derive(Debug, Clone)]
pub struct Exit {
    /// Exit code.
    pub code: i32,
    /// Last bytes of stderr.
    pub stderr_tail: String,
}

/// One decision, for `status`.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Decision {
    /// Task id.
    pub id: String,
    /// Task name.
    pub task: String,
    /// Side.
    pub placement: Side,
    /// Reason kind.
    pub kind: ReasonKind,
    /// Reason text.
    pub reason: String,
    /// `exit N` or an error code.
    pub outcome: String,
    /// Wall time, milliseconds.
    pub elapsed_ms: u64,
    /// When it finished, Unix milliseconds.
    pub at_unix_ms: u64,
}

/// A fresh task id: 32 hex digits.
pub(crate) fn new_task_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// True for an id this agent could have made (32 lowercase hex digits).
pub(crate) fn valid_task_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::{new_task_id, valid_task_id, ErrorCode, TaskCode, TaskError};

    /// Every code's string and status, spelled out: renaming a string or moving a
    /// code to another status fails here.
    const TABLE: [(TaskCode, &str, u16); 21] = [
        (TaskCode::Wire(ErrorCode::UnknownTask), "unknown_task", 404),
        (TaskCode::Wire(ErrorCode::NotAllowed), "not_allowed", 403),
        (TaskCode::Wire(ErrorCode::TooLarge), "too_large", 413),
        (
            TaskCode::Wire(ErrorCode::OutputTooLarge),
            "output_too_large",
            502,
        ),
        (TaskCode::Wire(ErrorCode::TimedOut), "timed_out", 504),
        (TaskCode::Wire(ErrorCode::Busy), "busy", 503),
        (TaskCode::Wire(ErrorCode::Draining), "draining", 503),
        (TaskCode::Wire(ErrorCode::BadRequest), "bad_request", 400),
        (TaskCode::Wire(ErrorCode::SpawnFailed), "spawn_failed", 500),
        (TaskCode::Wire(ErrorCode::Internal), "internal", 500),
        (TaskCode::Wire(ErrorCode::BadToken), "bad_token", 500),
        (TaskCode::Wire(ErrorCode::CannotIssue), "cannot_issue", 500),
        (TaskCode::Wire(ErrorCode::Other), "other", 500),
        (TaskCode::CloudUnavailable, "cloud_unavailable", 503),
        (TaskCode::CloudFailed, "cloud_failed", 502),
        (TaskCode::JournalFull, "journal_full", 507),
        (TaskCode::StorageFull, "storage_full", 507),
        (TaskCode::NotFound, "not_found", 404),
        (TaskCode::NotReady, "not_ready", 409),
        (TaskCode::CrashLoop, "crash_loop", 500),
        (TaskCode::MethodNotAllowed, "method_not_allowed", 405),
    ];

    #[test]
    fn every_code_has_its_string_and_status() {
        assert_eq!(TABLE.len(), TaskCode::all().count());
        for (code, s, status) in TABLE {
            assert!(
                TaskCode::all().any(|c| c == code),
                "{code:?} missing from all()"
            );
            assert_eq!(code.as_str(), s);
            assert_eq!(code.to_string(), s);
            assert_eq!(code.http_status(), status, "{s}");
            assert_eq!(TaskCode::parse(s), Some(code));
            assert_eq!(TaskError::new(code, "m").http_status(), status);
        }
        assert_eq!(TaskCode::parse("exit_nonzero"), None);
    }

    #[test]
    fn wire_codes_keep_their_strings() {
        for wire in ErrorCode::ALL {
            assert_eq!(TaskCode::from(wire).as_str(), wire.as_str());
        }
    }

    #[test]
    fn an_error_serializes_its_code_as_the_string() {
        let e = TaskError::new(TaskCode::JournalFull, "full");
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"code":"journal_full","message":"full"}"#
        );
    }

    #[test]
    fn only_the_cloud_missing_or_full_is_waited_out() {
        let waited: Vec<_> = TaskCode::all()
            .filter(|c| c.cloud_may_come_back())
            .map(TaskCode::as_str)
            .collect();
        assert_eq!(
            waited,
            ["busy", "draining", "cloud_unavailable", "cloud_failed"]
        );
    }

    #[test]
    fn task_ids_are_32_lowercase_hex_digits() {
        let id = new_task_id();
        assert!(valid_task_id(&id), "{id}");
        assert!(!valid_task_id(&"A".repeat(32)));
        assert!(!valid_task_id(&id[1..]));
        assert!(!valid_task_id("../../etc/passwd"));
    }
}
