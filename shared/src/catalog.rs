//! The task catalog: what each side is willing to run, validated from config.
//!
//! An [`AdmittedTask`] can only be built by [`Catalog::admit`], and the executor only
//! takes an `AdmittedTask`: nothing reaches a process spawn without passing the catalog,
//! its `allowed_agents` and its `allow_args`.

use crate::tls::AuthenticatedPeer;
use std::collections::BTreeMap;
use std::sync::Arc;
use updraft_proto::ErrorCode;

pub use updraft_proto::name::{valid_task_name, MAX_TASK_NAME_LEN};
pub use updraft_proto::spec::{
    Builtin, Offload, TaskFile, TaskKind, TaskSpec, TaskSpecError, DEFAULT_MAX_BYTES,
    DEFAULT_TIMEOUT,
};

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
    /// [`RequestHeader::validate`](updraft_proto::RequestHeader::validate)).
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
    use serde::Deserialize;
    use std::time::Duration;

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
