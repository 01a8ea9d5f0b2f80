//! Logging set-up shared by both services: `tracing` to stderr. Under systemd's journal
//! lines carry no timestamp (the journal stamps every line already) and start with
//! their syslog priority (`<4>` for a warning), which the journal keeps as the entry's
//! level.
//!
//! The level comes from an environment variable (e.g. `UPDRAFTD_LOG=debug`) when it is
//! set, else from `log_level` in the config file once that is loaded
//! ([`set_level`]), else `info`.

use std::sync::OnceLock;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, Registry};

/// The default filter: our own lines at `info`, the QUIC, TLS and NATS libraries
/// quieter (the cluster store logs what NATS connection events mean itself).
const DEFAULT: &str = "info,quinn=warn,rustls=warn,async_nats=warn";

/// Replaces the filter; set by [`init`] unless the environment chose the level.
static RELOAD: OnceLock<reload::Handle<Targets, Registry>> = OnceLock::new();

/// Installs the global subscriber. `env_var` holds a level or filter, as `log_level`
/// does ([`parse_level`]); one that does not parse is reported on stderr and the
/// default used.
pub fn init(env_var: &str) {
    let from_env = std::env::var(env_var)
        .ok()
        .and_then(|value| match parse_level(&value) {
            Ok(filter) => Some(filter),
            Err(e) => {
                eprintln!("{env_var} ignored: {e}; logging at the default ({DEFAULT})");
                None
            }
        });
    let env_chose = from_env.is_some();
    let filter = from_env.unwrap_or_else(|| DEFAULT.parse().expect("the default filter parses"));
    let (filter, handle) = reload::Layer::new(filter);
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false);
    let installed = if under_journal {
        tracing_subscriber::registry()
            .with(filter)
            .with(layer.event_format(journal_format()))
            .try_init()
    } else {
        use std::io::IsTerminal;
        tracing_subscriber::registry()
            .with(filter)
            .with(layer.with_ansi(std::io::stderr().is_terminal()))
            .try_init()
    };
    if installed.is_ok() && !env_chose {
        let _ = RELOAD.set(handle);
    }
}

/// Starts each line with the `<N>` syslog priority of its level, which journald takes
/// as the entry's priority (and strips), so `journalctl -p warning` shows warnings and
/// errors only; without it every line would be logged at the stream's default, info.
struct JournalLevel<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for JournalLevel<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        write!(writer, "<{}>", syslog_priority(*event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

/// How a line looks under journald: its priority, no time, no target, no colour.
fn journal_format(
) -> JournalLevel<tracing_subscriber::fmt::format::Format<tracing_subscriber::fmt::format::Full, ()>>
{
    JournalLevel(
        tracing_subscriber::fmt::format()
            .without_time()
            .with_target(false)
            .with_ansi(false),
    )
}

/// The syslog priority journald files a line of this level under.
fn syslog_priority(level: tracing::Level) -> u8 {
    match level {
        tracing::Level::ERROR => 3,
        tracing::Level::WARN => 4,
        tracing::Level::INFO => 6,
        _ => 7,
    }
}

/// The level words `log_level` accepts; `warning` is taken as `warn`.
const LEVELS: &str = "off, error, warn (or warning), info, debug, trace";

/// Why a `log_level` value was refused; each text quotes the value and lists the levels.
#[derive(Debug, thiserror::Error)]
pub enum LevelError {
    /// A word where a level belongs is not one of the levels.
    #[error("`{text}` is not a log level ({levels}) or filter: `{word}` is not a level", levels = LEVELS)]
    NotALevel {
        /// The whole value.
        text: String,
        /// The word that is no level.
        word: String,
    },
    /// A `target=level` part with nothing before the `=`.
    #[error("`{text}` is not a log level ({levels}) or filter: `{part}` names no target", levels = LEVELS)]
    NoTarget {
        /// The whole value.
        text: String,
        /// The part without a target.
        part: String,
    },
    /// A target that is not a module path.
    #[error("`{text}` is not a log level ({levels}) or filter: `{target}` is not a target (a module path such as updraft_agent::uplink)", levels = LEVELS)]
    BadTarget {
        /// The whole value.
        text: String,
        /// The target refused.
        target: String,
    },
}

/// Checks a `log_level` value from a config file: a level (`debug`) or a full filter
/// directive (`info,updraft_agent=debug`). Every level word in it must be a level:
/// tracing would take an unknown bare word (`warning`, `verbose`) as a target name and
/// silence every line, so that is refused here instead.
pub fn parse_level(level: &str) -> Result<Targets, LevelError> {
    let mut parts = Vec::new();
    for part in level.split(',').map(str::trim) {
        let (target, word) = match part.rsplit_once('=') {
            Some((t, w)) => (Some(t), w),
            None => (None, part),
        };
        let word = match word.to_ascii_lowercase().as_str() {
            "warning" => "warn".to_string(),
            w @ ("off" | "error" | "warn" | "info" | "debug" | "trace") => w.to_string(),
            _ => {
                return Err(LevelError::NotALevel {
                    text: level.to_string(),
                    word: word.to_string(),
                })
            }
        };
        parts.push(match target {
            Some(t) if !t.is_empty() => {
                if !t
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                {
                    return Err(LevelError::BadTarget {
                        text: level.to_string(),
                        target: t.to_string(),
                    });
                }
                format!("{t}={word}")
            }
            Some(_) => {
                return Err(LevelError::NoTarget {
                    text: level.to_string(),
                    part: part.to_string(),
                })
            }
            None => word,
        });
    }
    let directive = match parts.as_slice() {
        [one] if !one.contains('=') => format!("{one},quinn=warn,rustls=warn"),
        _ => parts.join(","),
    };
    Ok(directive
        .parse()
        .expect("a filter of checked targets and levels parses"))
}

/// Exit status of a service that panicked (EX_SOFTWARE).
pub const EXIT_PANIC: i32 = 70;

/// Makes any panic, in any thread or spawned task, end the process: the panic is
/// logged (message and place) and the process exits with [`EXIT_PANIC`], so systemd's
/// `Restart=on-failure` starts it afresh. Without this a panic in a spawned task
/// kills only that task (tokio catches it) and leaves the service half-alive: a
/// dispatcher or accept loop gone while the process still answers its watchdog.
pub fn exit_on_panic(service: &'static str) {
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        let place = info
            .location()
            .map_or_else(String::new, |l| format!(" at {}:{}", l.file(), l.line()));
        let line = format!(
            "{service} panicked{place}: {message}; exiting so the service manager restarts it"
        );
        if tracing::dispatcher::has_been_set() {
            tracing::error!("{line}");
        } else {
            eprintln!("{line}");
        }
        std::process::exit(EXIT_PANIC);
    }));
}

/// Applies the config file's `log_level`, unless the environment variable set one.
pub fn set_level(filter: Targets) {
    if let Some(handle) = RELOAD.get() {
        let _ = handle.reload(filter);
    }
}

#[cfg(test)]
mod tests {
    /// A panic in a spawned task ends the whole process with [`super::EXIT_PANIC`]
    /// (tokio alone would catch it and keep the process running). The test runs
    /// itself as a child process that installs the hook and panics.
    #[test]
    fn a_panic_in_a_spawned_task_exits_the_process() {
        const CHILD: &str = "UPDRAFT_TEST_PANIC_CHILD";
        if std::env::var_os(CHILD).is_some() {
            super::exit_on_panic("test-service");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let _ = tokio::spawn(async { panic!("boom in a task") }).await;
                // Reached only when the panic did not end the process.
                std::process::exit(0);
            });
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "logging::tests::a_panic_in_a_spawned_task_exits_the_process",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(super::EXIT_PANIC), "{stderr}");
        assert!(
            stderr.contains("test-service panicked at") && stderr.contains("boom in a task"),
            "{stderr}"
        );
    }

    /// Under journald each line starts with its level's syslog priority, and carries
    /// no timestamp of its own (the journal stamps it).
    #[test]
    fn journal_lines_start_with_their_priority_and_have_no_time() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .event_format(super::journal_format())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!("e");
            tracing::warn!("w");
            tracing::info!("i");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines, ["<3>ERROR e", "<4> WARN w", "<6> INFO i"], "{text}");
    }

    #[test]
    fn levels_parse() {
        assert!(super::parse_level("debug").is_ok());
        assert!(super::parse_level("info,updraft_agent=trace").is_ok());
        assert!(super::parse_level("loud[").is_err());
    }

    #[test]
    fn filters_choose_by_target_and_level() {
        use tracing::Level;
        let f = super::parse_level("warning").unwrap();
        assert!(f.would_enable("updraft_agent::uplink", &Level::WARN));
        assert!(!f.would_enable("updraft_agent::uplink", &Level::INFO));
        // A bare level keeps the QUIC and TLS libraries at warn.
        let f = super::parse_level("debug").unwrap();
        assert!(f.would_enable("updraft_agent", &Level::DEBUG));
        assert!(!f.would_enable("quinn_proto::connection", &Level::INFO));
        let f = super::parse_level("info,updraft_agent=debug").unwrap();
        assert!(f.would_enable("updraft_agent::uplink", &Level::DEBUG));
        assert!(!f.would_enable("updraft_daemon::task", &Level::DEBUG));
        assert!(f.would_enable("updraft_daemon::task", &Level::INFO));
        assert!(!super::parse_level("off")
            .unwrap()
            .would_enable("x", &Level::ERROR));
    }

    #[test]
    fn warning_is_warn_and_unknown_words_are_refused() {
        assert!(super::parse_level("warn").is_ok());
        assert!(super::parse_level("warning").is_ok());
        assert!(super::parse_level("info,updraft_agent=warning").is_ok());
        for bad in ["verbose", "warnings", "info,quinn=loud", "info,=debug", ""] {
            let e = super::parse_level(bad).unwrap_err().to_string();
            assert!(e.contains("is not a log level"), "{bad}: {e}");
        }
    }

    #[test]
    fn level_errors_quote_the_value_and_list_the_levels() {
        let text = |level: &str| super::parse_level(level).unwrap_err().to_string();
        assert_eq!(
            text("info,quinn=loud"),
            "`info,quinn=loud` is not a log level (off, error, warn (or warning), info, debug, trace) or filter: `loud` is not a level"
        );
        assert_eq!(
            text("info,=debug"),
            "`info,=debug` is not a log level (off, error, warn (or warning), info, debug, trace) or filter: `=debug` names no target"
        );
        assert_eq!(
            text("a[=info"),
            "`a[=info` is not a log level (off, error, warn (or warning), info, debug, trace) or filter: `a[` is not a target (a module path such as updraft_agent::uplink)"
        );
    }
}
