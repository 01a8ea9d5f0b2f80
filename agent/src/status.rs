//! What the agent shows of itself: `status` and `explain` JSON, the Prometheus text
//! of `/metrics`, a detached task's JSON, and the decisions and counters behind them.

use crate::journal::{self, TaskRow};
use crate::knowledge::Decided;
use crate::placement::Where;
use crate::service::{Agent, Cert};
use crate::task::{TaskCode, TaskError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use updraft_proto::ErrorCode;
use updraft_shared::metrics;

impl Agent {
    /// Where a task would run now, and why, without running it (`policy explain`).
    pub fn explain(
        &self,
        task: &str,
        where_: Where,
        input_bytes: Option<u64>,
    ) -> Result<serde_json::Value, TaskError> {
        let spec = self.catalog.get(task).ok_or_else(|| {
            TaskError::new(
                TaskCode::Wire(ErrorCode::UnknownTask),
                format!("unknown task `{task}`: there is no [tasks.{task}] in the config"),
            )
        })?;
        let chosen = self.uplink.pick();
        let d = self.knowledge.place(
            spec,
            where_,
            chosen.as_ref(),
            self.executor.load(),
            input_bytes,
        );
        Ok(explain_json(task, &d))
    }

    /// The agent's status as JSON.
    pub fn status_json(&self) -> serde_json::Value {
        let load = self.executor.load();
        serde_json::json!({
            "agent_id": self.agent_id,
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": self.started.elapsed().as_secs(),
            "local": { "running": load.running, "queued": load.queued, "capacity": load.capacity },
            "clouds": self.uplink.status(),
            "daemons": self.fleet.heard(),
            "tasks": self.catalog.names().collect::<Vec<_>>(),
            "policy": self.knowledge.policy().status(),
            "policy_push": self.fleet.last_push(),
            "signals": signals_json(&self.knowledge.signals(self.uplink.pick().as_ref(), load, None)),
            "estimates": self.knowledge.estimates_summary(),
            "journal": journal_json(&self.detached.journal.usage()),
            "certificate": certificate_json(&self.cert, self.config.renew_before, SystemTime::now()),
            "recent": self.stats.recent.lock().expect("recent lock").iter().rev().collect::<Vec<_>>(),
        })
    }

    /// Prometheus text exposition of the agent's counters and gauges.
    pub fn metrics_text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        self.stats.task_stats.render("updraft_agent", &mut out);
        let c = self.stats.counters.lock().expect("counters lock");
        metrics::header(
            &mut out,
            "updraft_agent_decisions_total",
            "counter",
            "Placement decisions, by placement and reason kind.",
        );
        for ((p, k), n) in &c.decisions {
            let _ = writeln!(
                out,
                "updraft_agent_decisions_total{{placement=\"{p}\",reason=\"{k}\"}} {n}"
            );
        }
        let load = self.executor.load();
        metrics::gauge(
            &mut out,
            "updraft_agent_certificate_expiry_timestamp_seconds",
            "When the agent certificate in use expires, Unix seconds (renewed before).",
            self.cert_validity()
                .1
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        );
        metrics::gauge(
            &mut out,
            "updraft_agent_local_running",
            "Tasks running on the board.",
            load.running,
        );
        metrics::gauge(
            &mut out,
            "updraft_agent_local_queued",
            "Tasks waiting for a local slot.",
            load.queued,
        );
        let board = self.knowledge.board();
        let gauges = [
            (
                "updraft_agent_cpu_percent",
                "Busy CPU across all cores, smoothed, percent.",
                board.cpu_percent,
            ),
            (
                "updraft_agent_load_avg",
                "One-minute load average.",
                board.load_avg,
            ),
            (
                "updraft_agent_memory_available_mb",
                "Available memory, MiB.",
                board.memory_available_mb,
            ),
            (
                "updraft_agent_temperature_celsius",
                "Hottest thermal zone.",
                board.temperature_c,
            ),
            (
                "updraft_agent_battery_percent",
                "Combined battery charge.",
                board.power.battery_percent,
            ),
            (
                "updraft_agent_on_battery",
                "1 when running on battery.",
                board.power.on_battery.map(|b| f64::from(u8::from(b))),
            ),
        ];
        for (name, help, value) in gauges {
            // Absent signals (no battery, no thermal zone) are left out, not reported as 0.
            if let Some(v) = value {
                metrics::gauge(&mut out, name, help, v);
            }
        }
        journal_metrics(&mut out, &self.detached.journal.usage());
        metrics::header(
            &mut out,
            "updraft_agent_cloud_connected",
            "gauge",
            "Whether each daemon is connected.",
        );
        for s in self.uplink.status() {
            let _ = writeln!(
                out,
                "updraft_agent_cloud_connected{{{}}} {}",
                metrics::labels(&[("daemon", &s.address)]),
                u8::from(s.connected)
            );
        }
        out
    }
}

/// The certificate in use, for `status`, as of `now`.
fn certificate_json(
    cert: &Cert,
    renew_before: Option<Duration>,
    now: SystemTime,
) -> serde_json::Value {
    let (_, not_after) = cert.validity();
    let renew = cert.renew_time(renew_before);
    let unix = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    serde_json::json!({
        "path": cert.files.cert.display().to_string(),
        "not_after_unix": unix(not_after),
        "expires_in_s": not_after.duration_since(now).map_or(0, |d| d.as_secs()),
        "expired": now >= not_after,
        "renew_at_unix": unix(renew),
    })
}

/// Where a task would run and why, as `explain` shows it.
pub(crate) fn explain_json(task: &str, d: &Decided) -> serde_json::Value {
    let prediction = d.placement.prediction.as_ref().map(|p| {
        serde_json::json!({
            "choice": p.choice.as_str(),
            "explore": p.explore,
            "local_ms": p.local.finish.as_secs_f64() * 1000.0,
            "cloud_ms": p.cloud.map(|c| c.finish.as_secs_f64() * 1000.0),
        })
    });
    serde_json::json!({
        "task": task,
        "placement": d.placement.side,
        "kind": d.placement.kind,
        "reason": d.placement.reason,
        "forced": d.placement.forced,
        "prediction": prediction,
        "signals": signals_json(&d.signals),
    })
}

/// The journal's gauges, for `/metrics`. Its figures are u64 on every target, so a
/// journal past 4 GiB shows as such on a 32-bit board too.
fn journal_metrics(out: &mut String, usage: &journal::JournalUsage) {
    for (name, help, value) in [
        (
            "updraft_agent_journal_tasks",
            "Detached tasks held in the journal, finished or not.",
            usage.tasks,
        ),
        (
            "updraft_agent_journal_unfinished",
            "Detached tasks queued or running.",
            usage.unfinished,
        ),
        (
            "updraft_agent_journal_bytes",
            "Bytes the journal holds, against [journal] max_bytes.",
            usage.bytes,
        ),
        (
            "updraft_agent_journal_max_bytes",
            "[journal] max_bytes.",
            usage.max_bytes,
        ),
    ] {
        metrics::gauge(out, name, help, value);
    }
}

/// The journal's figures for `status`.
fn journal_json(u: &journal::JournalUsage) -> serde_json::Value {
    serde_json::json!({
        "tasks": u.tasks,
        "unfinished": u.unfinished,
        "bytes": u.bytes,
        "max_bytes": u.max_bytes,
    })
}

/// A detached task as `GET /v1/tasks/{id}` shows it.
pub(crate) fn task_json(r: &TaskRow) -> serde_json::Value {
    serde_json::json!({
        "id": r.id,
        "task": r.task,
        "state": r.state.as_str(),
        "placement": r.placement.map(|p| p.as_str()),
        "reason": r.reason,
        "exit_code": r.exit_code,
        "error": r.error.as_ref().map(|(code, message)| serde_json::json!({"code": code, "message": message})),
        "output_bytes": r.output_len,
        "input_bytes": r.input_len,
        "attempts": r.attempts,
        "submitted_unix_ms": r.submitted_ms,
        "finished_unix_ms": r.finished_ms,
    })
}

/// Signals as JSON for `status` and `explain` (absent ones as null).
pub(crate) fn signals_json(s: &updraft_proto::policy::Signals) -> serde_json::Value {
    use updraft_proto::policy::{Signal, Value};
    let mut m = serde_json::Map::new();
    for sig in Signal::ALL {
        let v = match s.get(sig) {
            Some(Value::Number(n)) => serde_json::json!((n * 100.0).round() / 100.0),
            Some(Value::Bool(b)) => serde_json::json!(b),
            None => serde_json::Value::Null,
        };
        m.insert(sig.name().to_string(), v);
    }
    serde_json::Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::{certificate_json, journal, journal_json, journal_metrics};
    use crate::enroll::CertFiles;
    use crate::service::Cert;
    use std::time::{Duration, SystemTime};

    #[test]
    fn the_certificate_shows_its_expiry_and_renewal_as_of_now() {
        let h = Duration::from_secs(3600);
        let t0 = SystemTime::UNIX_EPOCH + 1000 * h;
        let files = CertFiles {
            ca: "/s/ca.pem".into(),
            cert: "/s/agent.pem".into(),
            key: "/s/agent.key".into(),
        };
        let cert = Cert::new(files, (t0, t0 + 90 * h), t0);
        let json = certificate_json(&cert, Some(10 * h), t0 + 50 * h);
        assert_eq!(json["path"], "/s/agent.pem");
        assert_eq!(json["not_after_unix"], 1090 * 3600);
        assert_eq!(json["expires_in_s"], 40 * 3600);
        assert_eq!(json["expired"], false);
        assert_eq!(json["renew_at_unix"], 1080 * 3600);
        let json = certificate_json(&cert, None, t0 + 91 * h);
        assert_eq!(json["expires_in_s"], 0);
        assert_eq!(json["expired"], true);
    }

    #[test]
    fn journal_figures_past_4_gib_show_whole() {
        // u64 end to end: a 32-bit board must not show 5 GiB as 1 GiB.
        let usage = journal::JournalUsage {
            tasks: 3,
            unfinished: 1,
            bytes: (5 << 30) + 1,
            max_bytes: 6 << 30,
        };
        let mut out = String::new();
        journal_metrics(&mut out, &usage);
        for line in [
            "updraft_agent_journal_bytes 5368709121",
            "updraft_agent_journal_max_bytes 6442450944",
            "updraft_agent_journal_tasks 3",
        ] {
            assert!(out.lines().any(|l| l == line), "no `{line}` in {out}");
        }
        let json = journal_json(&usage);
        assert_eq!(json["bytes"].as_u64(), Some(5_368_709_121), "{json}");
        assert_eq!(json["max_bytes"].as_u64(), Some(6_442_450_944), "{json}");
    }
}
