//! SIGHUP: reload `daemon.toml` through the same code `check-config` and `serve` use.
//!
//! What applies at once: the task catalog (new tasks run, removed ones are refused,
//! running ones finish as they started), the TLS files (server certificate and key, the
//! CA agents are verified against) and the transport settings (`idle_timeout`,
//! `max_streams_per_connection`) for new connections, and enrollment (`[tls] ca_key`,
//! `[enroll] cert_lifetime`). Everything else needs a restart and is logged as such. A
//! file that does not load changes nothing: the refusal is logged with file and key.

use crate::config::DaemonConfig;
use tracing::{info, warn};
use updraft_shared::catalog::Catalog;
use updraft_shared::tls::{fingerprint, Identity};

/// A configuration that loaded whole, ready to be swapped in.
pub(crate) struct Reloaded {
    /// The new configuration.
    pub config: DaemonConfig,
    /// The quinn server config built from it, for new connections.
    pub server: quinn::ServerConfig,
    /// The TLS files it loaded, to tell what the next reload changes.
    pub identity: Identity,
}

impl std::fmt::Debug for Reloaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloaded")
            .field("config", &self.config.source)
            .finish()
    }
}

/// Loads `live.source` again and checks it as `serve` would. On failure logs why, with
/// the file and key, and returns `None`: the daemon keeps what it has. On success logs
/// what changed against `live` and `live_identity` (what is in effect) and, for keys
/// only a restart applies, against `started` (the configuration the daemon started with).
pub(crate) fn load(
    live: &DaemonConfig,
    live_identity: Option<&Identity>,
    started: &DaemonConfig,
) -> Option<Reloaded> {
    let refuse = |e: &dyn std::fmt::Display| {
        warn!("SIGHUP: reload refused, still serving with the previous configuration: {e}");
        None
    };
    let config = match DaemonConfig::load(&live.source) {
        Ok(c) => c,
        Err(e) => return refuse(&e),
    };
    let identity = match config.load_identity() {
        Ok(i) => i,
        Err(e) => return refuse(&e),
    };
    let server = match crate::quic::server_config_from(&identity, &config) {
        Ok(s) => s,
        Err(e) => return refuse(&format!("{}: {e:#}", config.source.display())),
    };
    for w in config.warnings() {
        warn!("{w}");
    }
    let mut changes = catalog_changes(&live.catalog, &config.catalog);
    if let Some(old) = live_identity {
        changes.extend(tls_changes(old, &identity));
    }
    if live.idle_timeout != config.idle_timeout {
        changes.push(format!(
            "idle_timeout {:?} for new connections",
            config.idle_timeout
        ));
    }
    if live.max_streams_per_connection != config.max_streams_per_connection {
        changes.push(format!(
            "max_streams_per_connection {} for new connections",
            config.max_streams_per_connection
        ));
    }
    if live.tls_ca_key != config.tls_ca_key || live.cert_lifetime != config.cert_lifetime {
        changes.push("enrollment ([tls] ca_key, [enroll] cert_lifetime)".into());
    }
    let summary = if changes.is_empty() {
        "nothing that applies without a restart changed".to_string()
    } else {
        changes.join("; ")
    };
    info!(config = %config.source.display(), "SIGHUP: configuration reloaded: {summary}");
    let restart = needs_restart(started, &config);
    if !restart.is_empty() {
        warn!(
            config = %config.source.display(),
            "SIGHUP: {} changed but applies only after a restart (systemctl restart updraftd); until then the daemon keeps the value it started with",
            restart.join(", ")
        );
    }
    Some(Reloaded {
        config,
        server,
        identity,
    })
}

/// "tasks added: a, b", "tasks removed: c", "tasks changed: d".
pub(crate) fn catalog_changes(old: &Catalog, new: &Catalog) -> Vec<String> {
    let (mut added, mut removed, mut changed) = (Vec::new(), Vec::new(), Vec::new());
    for name in new.names() {
        match old.get(name) {
            None => added.push(name),
            Some(spec) if Some(spec) != new.get(name) => changed.push(name),
            Some(_) => {}
        }
    }
    removed.extend(old.names().filter(|n| new.get(n).is_none()));
    [("added", added), ("removed", removed), ("changed", changed)]
        .into_iter()
        .filter(|(_, names)| !names.is_empty())
        .map(|(what, names)| format!("tasks {what}: {}", names.join(", ")))
        .collect()
}

fn tls_changes(old: &Identity, new: &Identity) -> Vec<String> {
    let prints = |certs: &[rustls::pki_types::CertificateDer<'static>]| {
        certs.iter().map(|c| fingerprint(c)).collect::<Vec<_>>()
    };
    let mut out = Vec::new();
    if prints(&old.chain) != prints(&new.chain) {
        out.push("server certificate ([tls] cert/key) for new connections".into());
    }
    if prints(&old.ca) != prints(&new.ca) {
        out.push("CA agents are verified against ([tls] ca) for new connections".into());
    }
    out
}

/// The keys whose new value only a restart applies.
pub(crate) fn needs_restart(started: &DaemonConfig, new: &DaemonConfig) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let mut check = |key, changed: bool| {
        if changed {
            keys.push(key);
        }
    };
    check("listen", started.listen != new.listen);
    check("state_dir", started.state_dir != new.state_dir);
    check("log_level", started.log_level != new.log_level);
    check(
        "max_concurrent_tasks",
        started.max_concurrent_tasks != new.max_concurrent_tasks,
    );
    check(
        "max_queued_tasks",
        started.max_queued_tasks != new.max_queued_tasks,
    );
    check(
        "metrics_listen",
        started.metrics_listen != new.metrics_listen,
    );
    check("admin_socket", started.admin_socket != new.admin_socket);
    check("drain_timeout", started.drain_timeout != new.drain_timeout);
    check(
        "load_report_interval",
        started.load_report_interval != new.load_report_interval,
    );
    check("[dedup]", started.dedup != new.dedup);
    check("probe_budget", started.probe_budget != new.probe_budget);
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(text: &str) -> DaemonConfig {
        let path = Path::new("/etc/updraft/daemon.toml");
        let file = updraft_shared::config::from_str(text, path, "UPDRAFTD_TEST_NONE").unwrap();
        DaemonConfig::from_file(file, path).unwrap()
    }

    #[test]
    fn changes_are_named() {
        let old = parse("max_concurrent_tasks = 2\n[tasks.a]\nbuiltin = \"echo\"\n[tasks.b]\nbuiltin = \"echo\"\n[tasks.c]\nbuiltin = \"echo\"");
        let new = parse("listen = \"0.0.0.0:5000\"\nmax_concurrent_tasks = 3\n[tasks.a]\nbuiltin = \"echo\"\n[tasks.b]\nbuiltin = \"sha256\"\n[tasks.d]\nbuiltin = \"echo\"");
        assert_eq!(
            catalog_changes(&old.catalog, &new.catalog),
            ["tasks added: d", "tasks removed: c", "tasks changed: b"]
        );
        let restart = needs_restart(&old, &new);
        assert!(restart.contains(&"listen"), "{restart:?}");
        assert!(restart.contains(&"max_concurrent_tasks"), "{restart:?}");
        assert!(!restart.contains(&"state_dir"), "{restart:?}");
        assert!(needs_restart(&old, &old).is_empty());
    }
}
