//! Logging set-up shared by both services: `tracing` to stderr, level from an
//! environment variable (e.g. `UPDRAFTD_LOG=debug`), and no timestamps when running
//! under systemd, whose journal stamps every line already.

/// Installs the global subscriber. `env_var` holds an `EnvFilter` directive; default `info`.
pub fn init(env_var: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env(env_var)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,quinn=warn,rustls=warn"));
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = if under_journal {
        builder.without_time().with_ansi(false).try_init()
    } else {
        use std::io::IsTerminal;
        builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init()
    };
}
