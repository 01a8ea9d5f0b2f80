//! Logging set-up shared by both services: `tracing` to stderr, and no timestamps when
//! running under systemd, whose journal stamps every line already.
//!
//! The level comes from an environment variable (e.g. `UPDRAFTD_LOG=debug`) when it is
//! set, else from `log_level` in the config file once that is loaded
//! ([`set_level`]), else `info`.

use std::sync::OnceLock;

/// The default filter: our own lines at `info`, the QUIC and TLS libraries quieter.
const DEFAULT: &str = "info,quinn=warn,rustls=warn";

type Reload = Box<dyn Fn(tracing_subscriber::EnvFilter) -> Result<(), String> + Send + Sync>;

/// Replaces the filter; set by [`init`] unless the environment chose the level.
static RELOAD: OnceLock<Reload> = OnceLock::new();

/// Installs the global subscriber. `env_var` holds an `EnvFilter` directive.
pub fn init(env_var: &str) {
    let from_env = tracing_subscriber::EnvFilter::try_from_env(env_var).ok();
    let env_chose = from_env.is_some();
    let filter = from_env.unwrap_or_else(|| tracing_subscriber::EnvFilter::new(DEFAULT));
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    macro_rules! install {
        ($b:expr) => {{
            let b = $b;
            let handle = b.reload_handle();
            if b.try_init().is_ok() && !env_chose {
                let _ = RELOAD.set(Box::new(move |f| {
                    handle.reload(f).map_err(|e| e.to_string())
                }));
            }
        }};
    }
    if under_journal {
        install!(builder
            .without_time()
            .with_ansi(false)
            .with_filter_reloading());
    } else {
        use std::io::IsTerminal;
        install!(builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_filter_reloading());
    }
}

/// Checks a `log_level` value from a config file: a level (`debug`) or a full filter
/// directive (`info,updraft_agent=debug`).
pub fn parse_level(level: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    let directive = match level {
        "error" | "warn" | "info" | "debug" | "trace" => format!("{level},quinn=warn,rustls=warn"),
        other => other.to_string(),
    };
    tracing_subscriber::EnvFilter::try_new(&directive).map_err(|e| {
        format!("`{level}` is not a log level (error, warn, info, debug, trace) or filter: {e}")
    })
}

/// Applies the config file's `log_level`, unless the environment variable set one.
pub fn set_level(filter: tracing_subscriber::EnvFilter) {
    if let Some(reload) = RELOAD.get() {
        let _ = reload(filter);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn levels_parse() {
        assert!(super::parse_level("debug").is_ok());
        assert!(super::parse_level("info,updraft_agent=trace").is_ok());
        assert!(super::parse_level("loud[").is_err());
    }
}
