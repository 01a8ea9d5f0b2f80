//! Task specs: the `[tasks.NAME]` tables both sides read from config, and their
//! validation into a [`TaskSpec`]. Pure: admission (who may run what) is the catalog's, in
//! `updraft-shared`.

use crate::name::{valid_task_name, MAX_TASK_NAME_LEN};
use crate::units::{ByteSize, HumanDuration};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// Default task timeout: long enough for real work, short enough that a stuck task
/// frees its slot within a minute.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `max_input` and `max_output`: 16 MiB, a large image or a batch of readings.
pub const DEFAULT_MAX_BYTES: u64 = 16 << 20;

/// Where a task may run, from the agent's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Offload {
    /// Placement decides (policy, then the cost model).
    #[default]
    Auto,
    /// Always on the board.
    Never,
    /// Always in the cloud; waits for it (detached) or fails clearly.
    Always,
}

/// In-process handlers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    /// Output = input.
    Echo,
    /// Output = lowercase hex SHA-256 of the input and a newline, like `sha256sum`'s digest.
    Sha256,
    /// Burns one CPU for N milliseconds (N = first argument, else the input text, else 100).
    Spin,
}

impl Builtin {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "echo" => Self::Echo,
            "sha256" => Self::Sha256,
            "spin" => Self::Spin,
            _ => return None,
        })
    }
}

/// What runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskKind {
    /// A child process: argv, never a shell.
    Command(Vec<String>),
    /// An in-process handler.
    Builtin(Builtin),
}

/// One `[tasks.NAME]` table as written in a config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskFile {
    /// argv of the program to run; exclusive with `builtin`.
    pub command: Option<Vec<String>>,
    /// Name of an in-process handler: `echo`, `sha256` or `spin`.
    pub builtin: Option<String>,
    /// Wall-clock limit; the whole process group is killed past it. Default 30s.
    pub timeout: Option<HumanDuration>,
    /// Largest input accepted. Default 16MiB.
    pub max_input: Option<ByteSize>,
    /// Largest output produced before the task is stopped. Default 16MiB.
    pub max_output: Option<ByteSize>,
    /// Agent side: `auto`, `never` or `always`. Ignored by the daemon.
    pub offload: Option<Offload>,
    /// Labels that policy rules can match.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Environment the child gets, on top of an empty one.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Whether submitters may append arguments (always as separate argv items).
    #[serde(default)]
    pub allow_args: bool,
    /// Daemon side: agent ids allowed to run this task; absent = every enrolled agent.
    pub allowed_agents: Option<Vec<String>>,
    /// Daemon side, cluster mode: running the task twice is harmless (a pure function
    /// of its input), so it runs on the replica that received it, without the shared
    /// store, and a retry elsewhere may run it again. Default false.
    #[serde(default)]
    pub idempotent: bool,
}

/// A validated task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskSpec {
    /// Catalog name.
    pub name: String,
    /// What runs.
    pub kind: TaskKind,
    /// Wall-clock limit.
    pub timeout: Duration,
    /// Largest input, bytes.
    pub max_input: u64,
    /// Largest output, bytes.
    pub max_output: u64,
    /// Agent-side placement constraint.
    pub offload: Offload,
    /// Policy labels.
    pub tags: Vec<String>,
    /// Child environment.
    pub env: BTreeMap<String, String>,
    /// Whether extra arguments are accepted.
    pub allow_args: bool,
    /// Agent ids allowed (daemon side); `None` = all.
    pub allowed_agents: Option<BTreeSet<String>>,
    /// Skips the shared store in cluster mode (daemon side).
    pub idempotent: bool,
}

/// A catalog entry that failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tasks.{task}: {reason}")]
pub struct TaskSpecError {
    /// The task's name.
    pub task: String,
    /// What is wrong, and what would be right.
    pub reason: String,
}

impl TaskSpec {
    /// Validates one `[tasks.NAME]` table.
    pub fn from_file(name: &str, file: TaskFile) -> Result<Self, TaskSpecError> {
        let err = |reason: String| TaskSpecError {
            task: name.to_string(),
            reason,
        };
        if !valid_task_name(name) {
            return Err(err(format!(
                "task names are 1..={MAX_TASK_NAME_LEN} characters of a-z, 0-9, '-', '_', '.'"
            )));
        }
        let kind = match (file.command, file.builtin) {
            (Some(argv), None) => {
                if argv.is_empty() || argv[0].is_empty() {
                    return Err(err(
                        "command must name a program: command = [\"/usr/bin/prog\", \"arg\"]"
                            .into(),
                    ));
                }
                TaskKind::Command(argv)
            }
            (None, Some(b)) => TaskKind::Builtin(Builtin::parse(&b).ok_or_else(|| {
                err(format!(
                    "unknown builtin `{b}`; expected echo, sha256 or spin"
                ))
            })?),
            (Some(_), Some(_)) => {
                return Err(err("set either command or builtin, not both".into()))
            }
            (None, None) => {
                return Err(err(
                    "set command = [argv...] or builtin = \"echo\"|\"sha256\"|\"spin\"".into(),
                ))
            }
        };
        let timeout = file.timeout.map_or(DEFAULT_TIMEOUT, |d| d.0);
        if timeout.is_zero() {
            return Err(err("timeout must be more than zero".into()));
        }
        for key in file.env.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(err(format!("env key `{key}` is not a valid variable name")));
            }
        }
        Ok(TaskSpec {
            name: name.to_string(),
            kind,
            timeout,
            max_input: file.max_input.map_or(DEFAULT_MAX_BYTES, |b| b.0),
            max_output: file.max_output.map_or(DEFAULT_MAX_BYTES, |b| b.0),
            offload: file.offload.unwrap_or_default(),
            tags: file.tags,
            env: file.env,
            allow_args: file.allow_args,
            allowed_agents: file.allowed_agents.map(|v| v.into_iter().collect()),
            idempotent: file.idempotent,
        })
    }
}
