//! The task catalog: what each side is willing to run, validated from config.
//!
//! An [`AdmittedTask`] can only be built by [`Catalog::admit`], and the executor only
//! takes an `AdmittedTask`: nothing reaches a process spawn without passing the catalog,
//! its `allowed_agents` and its `allow_args`.

use crate::protocol::ErrorCode;
use crate::tls::AuthenticatedPeer;
use crate::units::{ByteSize, HumanDuration};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

/// Default task timeout: long enough for real work, short enough that a stuck task
/// frees its slot within a minute.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `max_input` and `max_output`: 16 MiB, a large image or a batch of readings.
pub const DEFAULT_MAX_BYTES: u64 = 16 << 20;
/// Longest task name; names appear in logs, metrics labels and URLs.
pub const MAX_TASK_NAME_LEN: usize = 64;

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

/// True for names usable in URLs, metrics labels and logs.
pub fn valid_task_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TASK_NAME_LEN
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.'
        })
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
        })
    }
}

/// Who is asking to run a task.
#[derive(Debug, Clone, Copy)]
pub enum Caller<'a> {
    /// A program on the same board, through the agent's local socket.
    Local,
    /// An agent, identified by its TLS certificate.
    Agent(&'a AuthenticatedPeer),
}

/// Why a task was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// Wire code.
    pub code: ErrorCode,
    /// Operator-readable reason naming the task and what to do.
    pub message: String,
}

/// A task that passed the catalog: its spec and the arguments to append.
#[derive(Debug, Clone)]
pub struct AdmittedTask {
    spec: Arc<TaskSpec>,
    args: Vec<String>,
    task_id: Option<String>,
}

impl AdmittedTask {
    /// The task's spec.
    pub fn spec(&self) -> &Arc<TaskSpec> {
        &self.spec
    }
    /// The submitter's extra arguments (empty unless the task allows them).
    pub fn args(&self) -> &[String] {
        &self.args
    }
    /// The task id, given to a command as `UPDRAFT_TASK_ID` so that a program can make
    /// its side effects idempotent across the retries of one task.
    pub fn task_id(&self) -> Option<&str> {
        self.task_id.as_deref()
    }
    /// Sets the task id (the caller has validated it: agent-generated, or checked by
    /// [`RequestHeader::validate`](crate::protocol::RequestHeader::validate)).
    pub fn with_task_id(mut self, id: &str) -> Self {
        self.task_id = Some(id.to_string());
        self
    }
}

/// The validated set of tasks a side will run.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    tasks: BTreeMap<String, Arc<TaskSpec>>,
}

impl Catalog {
    /// Validates every `[tasks.*]` table.
    pub fn from_files(files: BTreeMap<String, TaskFile>) -> Result<Self, TaskSpecError> {
        let mut tasks = BTreeMap::new();
        for (name, file) in files {
            let spec = TaskSpec::from_file(&name, file)?;
            tasks.insert(name, Arc::new(spec));
        }
        Ok(Self { tasks })
    }

    /// Builds a catalog from specs already validated.
    pub fn from_specs(specs: impl IntoIterator<Item = TaskSpec>) -> Self {
        Self {
            tasks: specs
                .into_iter()
                .map(|s| (s.name.clone(), Arc::new(s)))
                .collect(),
        }
    }

    /// Looks a task up by name.
    pub fn get(&self, name: &str) -> Option<&Arc<TaskSpec>> {
        self.tasks.get(name)
    }

    /// Task names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tasks.keys().map(String::as_str)
    }

    /// Decides whether `caller` may run `name` with `args` and a declared input length.
    pub fn admit(
        &self,
        name: &str,
        args: Vec<String>,
        input_len: Option<u64>,
        caller: Caller<'_>,
    ) -> Result<AdmittedTask, Refusal> {
        let spec = self.tasks.get(name).ok_or_else(|| Refusal {
            code: ErrorCode::UnknownTask,
            message: format!("unknown task `{name}`: there is no [tasks.{name}] in the config"),
        })?;
        if let (Caller::Agent(peer), Some(allowed)) = (caller, &spec.allowed_agents) {
            if !allowed.contains(peer.agent_id()) {
                return Err(Refusal {
                    code: ErrorCode::NotAllowed,
                    message: format!(
                        "agent `{}` is not allowed to run task `{name}`: add it to tasks.{name}.allowed_agents",
                        peer.agent_id()
                    ),
                });
            }
        }
        if !args.is_empty() && !spec.allow_args {
            return Err(Refusal {
                code: ErrorCode::BadRequest,
                message: format!(
                    "task `{name}` takes no extra arguments (set allow_args = true to permit them)"
                ),
            });
        }
        if let Some(len) = input_len {
            if len > spec.max_input {
                return Err(Refusal {
                    code: ErrorCode::TooLarge,
                    message: format!(
                        "input of {len} bytes is over task `{name}`'s max_input of {} bytes",
                        spec.max_input
                    ),
                });
            }
        }
        Ok(AdmittedTask {
            spec: spec.clone(),
            args,
            task_id: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog(toml_text: &str) -> Result<Catalog, TaskSpecError> {
        #[derive(Deserialize)]
        struct F {
            tasks: BTreeMap<String, TaskFile>,
        }
        Catalog::from_files(toml::from_str::<F>(toml_text).unwrap().tasks)
    }

    #[test]
    fn specs_validate() {
        let c = catalog(
            r#"
            [tasks.thumb]
            command = ["/usr/bin/convert", "-"]
            timeout = "5s"
            max_input = "1MiB"
            offload = "always"
            tags = ["media"]
            [tasks.e]
            builtin = "echo"
            "#,
        )
        .unwrap();
        let t = c.get("thumb").unwrap();
        assert_eq!(t.timeout, Duration::from_secs(5));
        assert_eq!(t.max_input, 1 << 20);
        assert_eq!(t.max_output, DEFAULT_MAX_BYTES);
        assert_eq!(t.offload, Offload::Always);
        assert_eq!(c.get("e").unwrap().kind, TaskKind::Builtin(Builtin::Echo));
    }

    #[test]
    fn bad_specs_name_the_task() {
        for (text, want) in [
            ("[tasks.a]\nbuiltin = \"nope\"", "unknown builtin"),
            ("[tasks.a]\ncommand = []", "must name a program"),
            ("[tasks.a]\n", "set command"),
            (
                "[tasks.a]\nbuiltin = \"echo\"\ncommand = [\"/bin/true\"]",
                "not both",
            ),
            ("[tasks.\"A B\"]\nbuiltin = \"echo\"", "task names"),
            (
                "[tasks.a]\nbuiltin = \"echo\"\ntimeout = \"0s\"",
                "more than zero",
            ),
        ] {
            let e = catalog(text).unwrap_err();
            assert!(e.to_string().contains(want), "{text}: {e}");
            assert!(e.to_string().starts_with("tasks."), "{e}");
        }
    }

    #[test]
    fn admission() {
        let c = catalog("[tasks.e]\nbuiltin = \"echo\"\nmax_input = 10\n[tasks.a]\nbuiltin = \"echo\"\nallow_args = true").unwrap();
        assert_eq!(
            c.admit("nope", vec![], None, Caller::Local)
                .unwrap_err()
                .code,
            ErrorCode::UnknownTask
        );
        assert_eq!(
            c.admit("e", vec!["x".into()], None, Caller::Local)
                .unwrap_err()
                .code,
            ErrorCode::BadRequest
        );
        assert_eq!(
            c.admit("e", vec![], Some(11), Caller::Local)
                .unwrap_err()
                .code,
            ErrorCode::TooLarge
        );
        assert!(c.admit("e", vec![], Some(10), Caller::Local).is_ok());
        assert_eq!(
            c.admit("a", vec!["x".into()], None, Caller::Local)
                .unwrap()
                .args(),
            ["x"]
        );
    }

    #[test]
    fn input_lengths_past_4_gib_are_measured_whole() {
        // Compared in u64 on every target. Narrowed to 32 bits, 5 GiB would be 1 GiB
        // and pass a 1 GiB max_input, and 4 GiB would be 0 and pass any.
        const FIVE_GIB: u64 = 5 << 30;
        let c = catalog(
            "[tasks.one]\nbuiltin = \"sha256\"\nmax_input = \"1GiB\"\n\
             [tasks.five]\nbuiltin = \"sha256\"\nmax_input = \"5GiB\"\n\
             [tasks.small]\nbuiltin = \"sha256\"",
        )
        .unwrap();
        assert_eq!(c.get("five").unwrap().max_input, 5_368_709_120);
        let refusal = c
            .admit("one", vec![], Some(FIVE_GIB), Caller::Local)
            .unwrap_err();
        assert_eq!(refusal.code, ErrorCode::TooLarge);
        assert_eq!(
            refusal.message,
            "input of 5368709120 bytes is over task `one`'s max_input of 1073741824 bytes"
        );
        let refusal = c
            .admit("small", vec![], Some(4 << 30), Caller::Local)
            .unwrap_err();
        assert!(refusal.message.contains("4294967296 bytes"), "{refusal:?}");
        assert!(c
            .admit("five", vec![], Some(FIVE_GIB), Caller::Local)
            .is_ok());
        let refusal = c
            .admit("five", vec![], Some(FIVE_GIB + 1), Caller::Local)
            .unwrap_err();
        assert!(refusal.message.contains("5368709121 bytes"), "{refusal:?}");
    }

    #[test]
    fn allowed_agents_checked_for_remote_callers() {
        let c = catalog("[tasks.e]\nbuiltin = \"echo\"\nallowed_agents = [\"board-1\"]").unwrap();
        let good = AuthenticatedPeer::for_tests("board-1");
        let bad = AuthenticatedPeer::for_tests("board-2");
        assert!(c.admit("e", vec![], None, Caller::Agent(&good)).is_ok());
        assert_eq!(
            c.admit("e", vec![], None, Caller::Agent(&bad))
                .unwrap_err()
                .code,
            ErrorCode::NotAllowed
        );
    }
}
