//! The agent's policy in force: loaded from the policy file, reloaded on SIGHUP and
//! when the file changes, and kept as it was when a new version is broken (the error
//! is logged and shown in `status`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tracing::{info, warn};
use updraft_proto::policy::eval::{Evaluator, Verdict};
use updraft_proto::policy::rules::{self, Policy};
use updraft_proto::policy::{Signals, TaskInfo};

/// What `status` shows about the policy.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PolicyStatus {
    /// The policy file.
    pub path: PathBuf,
    /// `file` when loaded from the file, `pushed` when a daemon pushed it, `default`
    /// when there is neither (everything auto).
    pub source: &'static str,
    /// SHA-256 of the policy file in force, lowercase hex; empty for the default.
    pub hash: String,
    /// Rules in force.
    pub rules: usize,
    /// Default placement in force.
    pub default: &'static str,
    /// When the policy in force was loaded, Unix milliseconds.
    pub loaded_at_unix_ms: u64,
    /// Why the last reload was refused (the previous policy stayed in force).
    pub error: Option<String>,
}

/// A file's identity for change detection: editors often replace a file by renaming
/// a new one over it, so the inode matters as much as the modification time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        inode: m.ino(),
    })
}

/// The policy in force and its evaluator state.
#[derive(Debug)]
pub struct PolicyHolder {
    path: PathBuf,
    /// Where a pushed policy is kept, when the agent accepts pushed policies: while
    /// the file is there it is in force instead of `path`.
    pushed: Option<PathBuf>,
    evaluator: Mutex<Evaluator>,
    status: Mutex<PolicyStatus>,
    seen: Mutex<(Option<Stamp>, Option<Stamp>)>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Why a pushed policy was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PushRefused {
    /// `[policy] accept_push = false` in agent.toml.
    #[error(
        "this agent does not apply pushed policies ([policy] accept_push = false in agent.toml)"
    )]
    Declined,
    /// It does not parse or check, or could not be written: `path:line:column: reason`.
    #[error("{0}")]
    Invalid(String),
}

/// Why the policy file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyLoadError {
    /// The file could not be read (other than missing, which means the default policy).
    #[error("{}: cannot read policy file: {error}", .path.display())]
    Read {
        /// The policy file.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// The file is not a valid policy: its path, line and column, and what is wrong.
    #[error("{0}")]
    Parse(rules::PolicyError),
}

/// A policy as read: the rules, where they came from (`file`, or `default` when there
/// is no file) and the file's hash (empty for the default).
struct Read {
    policy: Policy,
    source: &'static str,
    hash: String,
}

/// The policy in force: the pushed one when there is one that reads, else the file.
fn read_in_force(path: &Path, pushed: Option<&Path>) -> Result<Read, PolicyLoadError> {
    if let Some(pushed) = pushed {
        match std::fs::read_to_string(pushed) {
            Ok(text) => match rules::parse(&text, pushed) {
                Ok(policy) => {
                    return Ok(Read {
                        policy,
                        source: "pushed",
                        hash: updraft_shared::files::sha256_hex(text.as_bytes()),
                    })
                }
                Err(e) => {
                    warn!(error = %e, file = %path.display(), "the pushed policy does not read; the policy file is in force instead");
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(pushed = %pushed.display(), error = %e, "cannot read the pushed policy; the policy file is in force instead");
            }
        }
    }
    read_policy(path)
}

fn read_policy(path: &Path) -> Result<Read, PolicyLoadError> {
    match std::fs::read_to_string(path) {
        Ok(text) => rules::parse(&text, path)
            .map(|policy| Read {
                policy,
                source: "file",
                hash: updraft_shared::files::sha256_hex(text.as_bytes()),
            })
            .map_err(PolicyLoadError::Parse),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Read {
            policy: Policy::default_policy(),
            source: "default",
            hash: String::new(),
        }),
        Err(error) => Err(PolicyLoadError::Read {
            path: path.to_path_buf(),
            error,
        }),
    }
}

impl PolicyHolder {
    /// Loads `path`. A missing file means the default policy (everything auto); a
    /// broken one is an error, so a service never starts with a policy it cannot read.
    pub fn load(path: &Path) -> Result<Self, PolicyLoadError> {
        Self::load_with(path, None)
    }

    /// Like [`load`](Self::load), with a pushed policy kept at `pushed` (when the agent
    /// accepts them) in force instead of `path` while it is there.
    pub fn load_with(path: &Path, pushed: Option<&Path>) -> Result<Self, PolicyLoadError> {
        let seen = (stamp(path), pushed.and_then(stamp));
        let read = read_in_force(path, pushed)?;
        let status = status_of(path, pushed, &read, None);
        Ok(Self {
            path: path.to_path_buf(),
            pushed: pushed.map(Path::to_path_buf),
            evaluator: Mutex::new(Evaluator::new(Arc::new(read.policy))),
            status: Mutex::new(status),
            seen: Mutex::new(seen),
        })
    }

    fn stamps(&self) -> (Option<Stamp>, Option<Stamp>) {
        (stamp(&self.path), self.pushed.as_deref().and_then(stamp))
    }

    /// Applies a policy a daemon pushed: checked with the same parser as the file,
    /// written whole to the pushed policy's place, and put in force. `Err` says why it
    /// was refused (`path:line:column: reason`), or that this agent takes no pushes.
    pub fn apply_pushed(&self, text: &str) -> Result<(), PushRefused> {
        let Some(pushed) = &self.pushed else {
            return Err(PushRefused::Declined);
        };
        rules::parse(text, pushed).map_err(|e| PushRefused::Invalid(e.to_string()))?;
        updraft_shared::files::write_atomic(pushed, text.as_bytes(), 0o644).map_err(|e| {
            PushRefused::Invalid(format!(
                "{}: cannot write the pushed policy: {e}",
                pushed.display()
            ))
        })?;
        match self.reload("pushed by a daemon") {
            None => Ok(()),
            Some(e) => Err(PushRefused::Invalid(e)),
        }
    }

    /// Re-reads the file. On success the new policy replaces the old; on failure the
    /// old one stays and the error is kept for `status`. Returns the error, if any.
    pub fn reload(&self, why: &str) -> Option<String> {
        *self.seen.lock().expect("policy lock") = self.stamps();
        match read_in_force(&self.path, self.pushed.as_deref()).map_err(|e| e.to_string()) {
            Ok(read) => {
                info!(path = %self.path.display(), source = read.source, rules = read.policy.rules().len(), why, "policy loaded");
                *self.status.lock().expect("policy lock") =
                    status_of(&self.path, self.pushed.as_deref(), &read, None);
                self.evaluator
                    .lock()
                    .expect("policy lock")
                    .replace_policy(Arc::new(read.policy));
                None
            }
            Err(e) => {
                warn!(error = %e, why, "policy reload refused; the previous policy stays in force");
                self.status.lock().expect("policy lock").error = Some(e.clone());
                Some(e)
            }
        }
    }

    /// True when the file changed since it was last read (cheap: one `stat`). Polled
    /// from the sampling timer, which wakes anyway: no watcher thread, and it sees an
    /// editor's rename-over-the-file as well as an in-place write.
    pub fn changed(&self) -> bool {
        *self.seen.lock().expect("policy lock") != self.stamps()
    }

    /// Feeds a periodic sample to the stateful tests (`for`, hysteresis).
    pub fn observe(&self, signals: &Signals, now: Instant) {
        self.evaluator
            .lock()
            .expect("policy lock")
            .observe(signals, now);
    }

    /// What the policy says for one task now.
    pub fn decide(&self, task: TaskInfo<'_>, signals: &Signals, now: Instant) -> Verdict {
        self.evaluator
            .lock()
            .expect("policy lock")
            .decide(task, signals, now)
    }

    /// `f` of the policy in force.
    pub fn with_policy<T>(&self, f: impl FnOnce(&Policy) -> T) -> T {
        f(self.evaluator.lock().expect("policy lock").policy())
    }

    /// The `[auto]` coefficients in force.
    pub fn auto_params(&self) -> updraft_proto::policy::rules::AutoParams {
        self.evaluator
            .lock()
            .expect("policy lock")
            .policy()
            .auto()
            .clone()
    }

    /// For `status`.
    pub fn status(&self) -> PolicyStatus {
        self.status.lock().expect("policy lock").clone()
    }
}

fn status_of(
    path: &Path,
    pushed: Option<&Path>,
    read: &Read,
    error: Option<String>,
) -> PolicyStatus {
    let path = match (read.source, pushed) {
        ("pushed", Some(p)) => p,
        _ => path,
    };
    PolicyStatus {
        path: path.to_path_buf(),
        source: read.source,
        hash: read.hash.clone(),
        rules: read.policy.rules().len(),
        default: read.policy.default_place().as_str(),
        loaded_at_unix_ms: now_ms(),
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("policy.toml");
        let held = PolicyHolder::load(&missing).unwrap();
        assert_eq!(held.status().source, "default");
        // A directory cannot be read as a file.
        let e = PolicyHolder::load(dir.path()).unwrap_err();
        assert!(matches!(e, PolicyLoadError::Read { .. }), "{e:?}");
        let os = std::fs::read_to_string(dir.path()).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{}: cannot read policy file: {os}", dir.path().display())
        );
        std::fs::write(&missing, "default = \"nowhere\"\n").unwrap();
        let e = PolicyHolder::load(&missing).unwrap_err();
        let PolicyLoadError::Parse(parse) = &e else {
            panic!("{e:?}")
        };
        assert_eq!(e.to_string(), parse.to_string());
        assert!(
            e.to_string()
                .starts_with(&format!("{}:1:", missing.display())),
            "{e}"
        );
    }
}
