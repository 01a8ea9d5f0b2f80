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

/// Why a task was refused or failed: the daemon's wire codes
/// ([`ErrorCode`]) and the agent's own. The strings ([`TaskCode::as_str`]) are stable:
/// clients match on them in the `code` field and the `updraft-error-code` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskCode {
    /// No task by that name in the catalog (here or on the daemon).
    UnknownTask,
    /// The task's `offload` or `allowed_agents` forbids what was asked.
    NotAllowed,
    /// The input is over the task's `max_input`, or the journal cannot ever hold it.
    TooLarge,
    /// The output went over the task's `max_output`.
    OutputTooLarge,
    /// The task ran past its `timeout`.
    TimedOut,
    /// Every slot and queue place is taken (here or on the daemon).
    Busy,
    /// The daemon is shutting down and takes no new tasks.
    Draining,
    /// The request was malformed.
    BadRequest,
    /// The task's program could not be started.
    SpawnFailed,
    /// Something failed inside the agent or the daemon; its log says what.
    Internal,
    /// An enrollment token was refused (a wire code; tasks do not use it).
    BadToken,
    /// The daemon cannot issue certificates (a wire code; tasks do not use it).
    CannotIssue,
    /// A wire code this version does not know (sent by a newer daemon).
    Other,
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
    /// Every code, for tests and lookups.
    pub const ALL: [TaskCode; 21] = [
        Self::UnknownTask,
        Self::NotAllowed,
        Self::TooLarge,
        Self::OutputTooLarge,
        Self::TimedOut,
        Self::Busy,
        Self::Draining,
        Self::BadRequest,
        Self::SpawnFailed,
        Self::Internal,
        Self::BadToken,
        Self::CannotIssue,
        Self::Other,
        Self::CloudUnavailable,
        Self::CloudFailed,
        Self::JournalFull,
        Self::StorageFull,
        Self::NotFound,
        Self::NotReady,
        Self::CrashLoop,
        Self::MethodNotAllowed,
    ];

    /// The stable string of this code.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownTask => "unknown_task",
            Self::NotAllowed => "not_allowed",
            Self::TooLarge => "too_large",
            Self::OutputTooLarge => "output_too_large",
            Self::TimedOut => "timed_out",
            Self::Busy => "busy",
            Self::Draining => "draining",
            Self::BadRequest => "bad_request",
            Self::SpawnFailed => "spawn_failed",
            Self::Internal => "internal",
            Self::BadToken => "bad_token",
            Self::CannotIssue => "cannot_issue",
            Self::Other => "other",
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
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// The HTTP status that fits the code.
    pub fn http_status(self) -> u16 {
        match self {
            Self::UnknownTask | Self::NotFound => 404,
            Self::NotAllowed => 403,
            Self::BadRequest => 400,
            Self::MethodNotAllowed => 405,
            Self::TooLarge => 413,
            Self::Busy | Self::CloudUnavailable | Self::Draining => 503,
            Self::JournalFull | Self::StorageFull => 507,
            Self::TimedOut => 504,
            Self::NotReady => 409,
            Self::CloudFailed | Self::OutputTooLarge => 502,
            Self::SpawnFailed
            | Self::Internal
            | Self::BadToken
            | Self::CannotIssue
            | Self::Other
            | Self::CrashLoop => 500,
        }
    }

    /// Whether a task that may only run in the cloud waits for it and tries again
    /// after this error, instead of failing: the cloud was missing or full, not the task.
    pub fn cloud_may_come_back(self) -> bool {
        matches!(
            self,
            Self::CloudUnavailable | Self::CloudFailed | Self::Busy | Self::Draining
        )
    }
}

impl From<ErrorCode> for TaskCode {
    fn from(c: ErrorCode) -> Self {
        match c {
            ErrorCode::UnknownTask => Self::UnknownTask,
            ErrorCode::NotAllowed => Self::NotAllowed,
            ErrorCode::TooLarge => Self::TooLarge,
            ErrorCode::OutputTooLarge => Self::OutputTooLarge,
            ErrorCode::TimedOut => Self::TimedOut,
            ErrorCode::Busy => Self::Busy,
            ErrorCode::Draining => Self::Draining,
            ErrorCode::BadRequest => Self::BadRequest,
            ErrorCode::SpawnFailed => Self::SpawnFailed,
            ErrorCode::Internal => Self::Internal,
            ErrorCode::BadToken => Self::BadToken,
            ErrorCode::CannotIssue => Self::CannotIssue,
            ErrorCode::Other => Self::Other,
        }
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
        (TaskCode::UnknownTask, "unknown_task", 404),
        (TaskCode::NotAllowed, "not_allowed", 403),
        (TaskCode::TooLarge, "too_large", 413),
        (TaskCode::OutputTooLarge, "output_too_large", 502),
        (TaskCode::TimedOut, "timed_out", 504),
        (TaskCode::Busy, "busy", 503),
        (TaskCode::Draining, "draining", 503),
        (TaskCode::BadRequest, "bad_request", 400),
        (TaskCode::SpawnFailed, "spawn_failed", 500),
        (TaskCode::Internal, "internal", 500),
        (TaskCode::BadToken, "bad_token", 500),
        (TaskCode::CannotIssue, "cannot_issue", 500),
        (TaskCode::Other, "other", 500),
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
        assert_eq!(TABLE.len(), TaskCode::ALL.len());
        for (code, s, status) in TABLE {
            assert!(TaskCode::ALL.contains(&code), "{code:?} missing from ALL");
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
        for wire in [
            ErrorCode::UnknownTask,
            ErrorCode::NotAllowed,
            ErrorCode::TooLarge,
            ErrorCode::OutputTooLarge,
            ErrorCode::TimedOut,
            ErrorCode::Busy,
            ErrorCode::Draining,
            ErrorCode::BadRequest,
            ErrorCode::SpawnFailed,
            ErrorCode::Internal,
            ErrorCode::BadToken,
            ErrorCode::CannotIssue,
            ErrorCode::Other,
        ] {
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
        let waited: Vec<_> = TaskCode::ALL
            .into_iter()
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
