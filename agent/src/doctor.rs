//! `updraft-agent doctor`: one line per check of what a board needs to work, each `ok`,
//! `warn` or `FAIL` with what to do; exit 1 when any check failed.
//!
//! Checks: the config; the certificate (expired, or due for renewal); the policy (it
//! reads, and every rule's `match` names a task in the catalog); each daemon (reachable,
//! its certificate chains to the pinned CA, its clock, the tasks it offers against those
//! the board may offload); the journal; the disk space in `state_dir`. When the agent
//! runs, the daemon checks read its status (what its live connections learnt); when it
//! does not, doctor connects to each daemon itself.

use std::path::Path;
use std::time::{Duration, SystemTime};
use updraft_proto::policy::rules::Policy;
use updraft_proto::policy::TaskInfo;
use updraft_proto::spec::Offload;
use updraft_shared::catalog::Catalog;

use crate::config::AgentConfig;

/// How long doctor waits for each daemon it connects to itself.
const CONNECT_WAIT: Duration = Duration::from_secs(10);
/// Clock skew past which certificates may look not yet valid or already expired to the
/// other side.
const SKEW_FAIL: Duration = Duration::from_secs(300);
/// Clock skew worth a warning: timings in placement and logs drift apart.
const SKEW_WARN: Duration = Duration::from_secs(2);
/// Free space in `state_dir` below which the journal and spools may run out.
const DISK_WARN: u64 = 256 << 20;
/// Free space below which they will.
const DISK_FAIL: u64 = 16 << 20;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    Ok,
    Warn,
    Fail,
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Line {
    pub(crate) level: Level,
    pub(crate) text: String,
}

fn line(level: Level, text: impl Into<String>) -> Line {
    Line {
        level,
        text: text.into(),
    }
}

impl std::fmt::Display for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tag = match self.level {
            Level::Ok => "ok  ",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        };
        write!(f, "{tag}  {}", self.text)
    }
}

/// The certificate, as of `now`.
pub(crate) fn certificate(
    path: &Path,
    not_after: SystemTime,
    renew_at: SystemTime,
    now: SystemTime,
) -> Line {
    let p = path.display();
    match not_after.duration_since(now) {
        Err(_) => line(
            Level::Fail,
            format!("certificate {p} has EXPIRED: daemons refuse it; enroll again with a token (`updraftd token create --agent-id ID`, then `updraft-agent enroll`)"),
        ),
        Ok(left) if now >= renew_at => line(
            Level::Warn,
            format!("certificate {p} expires in {}, past its renewal time: the agent renews it while connected (see `status`)", span(left)),
        ),
        Ok(left) => line(Level::Ok, format!("certificate {p} expires in {}", span(left))),
    }
}

/// Rules whose `match` no task in `catalog` passes: they never decide anything.
pub(crate) fn unmatched_rules(policy: &Policy, catalog: &Catalog) -> Vec<String> {
    policy
        .rules()
        .iter()
        .filter(|r| r.task_match.is_some())
        .filter(|r| {
            !catalog.names().any(|name| {
                catalog.get(name).is_some_and(|spec| {
                    r.applies_to(TaskInfo {
                        name,
                        tags: &spec.tags,
                    })
                })
            })
        })
        .map(|r| r.name.to_string())
        .collect()
}

/// Tasks the board may offload that none of `offered` (the daemons' catalogs) offers.
pub(crate) fn unoffered<'a>(catalog: &'a Catalog, offered: &[String]) -> Vec<&'a str> {
    catalog
        .names()
        .filter(|n| catalog.get(n).is_some_and(|s| s.offload != Offload::Never))
        .filter(|n| !offered.iter().any(|o| o == n))
        .collect()
}

/// The daemon at `address`'s clock against ours.
pub(crate) fn skew(address: &str, skew_ms: i64) -> Line {
    let d = Duration::from_millis(skew_ms.unsigned_abs());
    let side = if skew_ms >= 0 { "ahead of" } else { "behind" };
    let text = format!(
        "daemon {address}: its clock is {} {side} this board's",
        span_ms(d)
    );
    if d >= SKEW_FAIL {
        line(Level::Fail, format!("{text}: certificates may look expired or not yet valid to one side; fix the time (NTP) on the one that is wrong"))
    } else if d >= SKEW_WARN {
        line(Level::Warn, format!("{text}: run NTP on both"))
    } else {
        line(Level::Ok, text)
    }
}

/// Free space in `state_dir`.
pub(crate) fn disk(dir: &Path, free: u64) -> Line {
    let text = format!("{} has {} MiB free", dir.display(), free >> 20);
    if free < DISK_FAIL {
        line(
            Level::Fail,
            format!("{text}: detached tasks and spooled output will be refused; free some space"),
        )
    } else if free < DISK_WARN {
        line(
            Level::Warn,
            format!("{text}: the journal and output spools may run out"),
        )
    } else {
        line(Level::Ok, text)
    }
}

fn span(d: Duration) -> String {
    match d.as_secs() {
        s @ 0..=119 => format!("{s}s"),
        s @ 120..=7199 => format!("{}m", s / 60),
        s @ 7200..=172_799 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

fn span_ms(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else {
        span(d)
    }
}

/// What doctor learnt of one daemon.
pub(crate) struct Daemon {
    address: String,
    /// `Err`: why it is not reachable.
    reached: Result<(Vec<String>, i64), String>,
}

/// Runs every check for the agent configured at `config_path`; prints them and returns
/// the exit code.
pub async fn run(config_path: &Path) -> u8 {
    let mut lines = Vec::new();
    let config = match AgentConfig::load(config_path) {
        Ok(c) => {
            lines.push(line(Level::Ok, format!("config {}", config_path.display())));
            c
        }
        Err(e) => {
            println!("{}", line(Level::Fail, format!("config: {e}")));
            return 1;
        }
    };
    lines.extend(local_checks(&config));
    for d in daemons(&config).await {
        lines.extend(daemon_lines(&d, &config.catalog));
    }
    let mut failed = false;
    for l in &lines {
        failed |= l.level == Level::Fail;
        println!("{l}");
    }
    u8::from(failed)
}

/// The checks that need no daemon.
fn local_checks(config: &AgentConfig) -> Vec<Line> {
    let mut lines = Vec::new();
    let files = crate::enroll::CertFiles::of(config);
    match files.load() {
        Ok(identity) => match updraft_shared::tls::validity_of(&identity.chain[0]) {
            Ok((not_before, not_after)) => {
                let cert = crate::service::Cert::new(
                    files.clone(),
                    (not_before, not_after),
                    SystemTime::now(),
                );
                let renew_at = cert.renew_time(config.renew_before);
                lines.push(certificate(
                    &files.cert,
                    not_after,
                    renew_at,
                    SystemTime::now(),
                ));
            }
            Err(e) => lines.push(line(
                Level::Fail,
                format!("certificate {}: {e}", files.cert.display()),
            )),
        },
        Err(e) => lines.push(line(
            Level::Fail,
            format!(
                "certificate: {e} (enroll with `updraft-agent enroll`, or set [tls] in agent.toml)"
            ),
        )),
    }
    match crate::policy_file::PolicyHolder::load(&config.policy) {
        Ok(holder) => {
            let status = holder.status();
            lines.push(line(
                Level::Ok,
                format!(
                    "policy {} ({}, {} rules)",
                    status.path.display(),
                    status.source,
                    status.rules
                ),
            ));
            let unmatched = holder.with_policy(|p| unmatched_rules(p, &config.catalog));
            for rule in unmatched {
                lines.push(line(
                    Level::Fail,
                    format!("policy {}: rule \"{rule}\" matches no task in the catalog (check its match names and tags against [tasks.*])", config.policy.display()),
                ));
            }
        }
        Err(e) => lines.push(line(Level::Fail, format!("policy: {e}"))),
    }
    let journal = config.state_dir.join(crate::service::JOURNAL_FILE);
    if journal.exists() {
        lines.push(journal_line(&journal, config));
    } else {
        lines.push(line(
            Level::Ok,
            format!(
                "journal {}: none yet (the agent makes it at its first start)",
                journal.display()
            ),
        ));
    }
    // The state directory, or where it will be made.
    let dir = config
        .state_dir
        .ancestors()
        .find(|d| d.is_dir())
        .unwrap_or(Path::new("/"));
    match nix::sys::statvfs::statvfs(dir) {
        Ok(s) => {
            // u32 on 32-bit boards, u64 elsewhere.
            #[allow(clippy::useless_conversion)]
            let free = u64::from(s.blocks_available()).saturating_mul(u64::from(s.fragment_size()));
            lines.push(disk(&config.state_dir, free));
        }
        Err(e) => lines.push(line(Level::Fail, format!("{}: {e}", dir.display()))),
    }
    lines
}

fn journal_line(journal: &Path, config: &AgentConfig) -> Line {
    match crate::journal::Journal::open(journal, config.journal.limits) {
        Ok(j) => {
            let u = j.usage();
            line(
                Level::Ok,
                format!(
                    "journal {}: {} detached tasks ({} unfinished), {} of {} bytes",
                    journal.display(),
                    u.tasks,
                    u.unfinished,
                    u.bytes,
                    u.max_bytes
                ),
            )
        }
        Err(e) => line(Level::Fail, format!("journal: {e}")),
    }
}

/// Each daemon: from the running agent's status when it answers, else by connecting.
async fn daemons(config: &AgentConfig) -> Vec<Daemon> {
    let client = crate::client::Client::new(&config.socket);
    if let Ok(resp) = client.get("/v1/status").await {
        if let Ok(body) = crate::client::body_bytes(resp).await {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
                return from_status(&v);
            }
        }
    }
    connect_each(config).await
}

fn from_status(v: &serde_json::Value) -> Vec<Daemon> {
    v["clouds"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let address = c["address"].as_str().unwrap_or("?").to_string();
            let heard = &v["daemons"][&address];
            let reached = if c["connected"] != true {
                Err(c["last_error"]
                    .as_str()
                    .unwrap_or("not connected")
                    .to_string())
            } else if heard.is_null() {
                Err(
                    "connected, but it answered no fleet report (a daemon older than this agent?)"
                        .into(),
                )
            } else {
                let tasks = heard["tasks"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|t| t.as_str().map(str::to_string))
                    .collect();
                Ok((tasks, heard["clock_skew_ms"].as_i64().unwrap_or(0)))
            };
            Daemon { address, reached }
        })
        .collect()
}

async fn connect_each(config: &AgentConfig) -> Vec<Daemon> {
    let mut out = Vec::new();
    let identity = match crate::enroll::CertFiles::of(config).load() {
        Ok(i) => i,
        Err(_) => return out,
    };
    let policy = match crate::policy_file::PolicyHolder::load(&config.policy) {
        Ok(h) => h.status(),
        Err(_) => return out,
    };
    for target in &config.clouds {
        let address = target.address.clone();
        let reached = async {
            let uplink =
                crate::uplink::Uplink::new(&identity, vec![target.clone()], config.link.clone())
                    .map_err(|e| e.to_string())?;
            let stop = tokio_util::sync::CancellationToken::new();
            uplink.start(stop.clone());
            let chosen = uplink.wait_for(&address, CONNECT_WAIT).await;
            let result = match chosen {
                Some(c) => {
                    crate::fleet::hello(&c.conn, &address, &policy, config.accept_push).await
                }
                None => Err(uplink
                    .status()
                    .first()
                    .and_then(|s| s.last_error.clone())
                    .unwrap_or_else(|| format!("no connection within {CONNECT_WAIT:?}"))),
            };
            stop.cancel();
            result
        }
        .await;
        out.push(Daemon { address, reached });
    }
    out
}

fn daemon_lines(d: &Daemon, catalog: &Catalog) -> Vec<Line> {
    match &d.reached {
        Err(e) => vec![line(Level::Fail, format!("daemon {}: {e}", d.address))],
        Ok((tasks, skew_ms)) => {
            let mut lines = vec![line(
                Level::Ok,
                format!(
                    "daemon {}: reachable, its certificate chains to the pinned CA; it offers {}",
                    d.address,
                    tasks.join(", ")
                ),
            )];
            lines.push(skew(&d.address, *skew_ms));
            let missing = unoffered(catalog, tasks);
            if !missing.is_empty() {
                lines.push(line(
                    Level::Warn,
                    format!("daemon {}: does not offer {} (they run on the board, or fail where the policy forces the cloud)", d.address, missing.join(", ")),
                ));
            }
            lines
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use updraft_proto::policy::rules;

    fn catalog() -> Catalog {
        let path = Path::new("/etc/updraft/agent.toml");
        let cfg: AgentConfig = updraft_shared::config::from_str::<crate::config::AgentFile>(
            "[tasks.sha]\ncommand = [\"sha256sum\"]\ntags = [\"hash\"]\n[tasks.led]\ncommand = [\"true\"]\noffload = \"never\"\n",
            path,
            "UPDRAFT_TEST_NONE",
        )
        .map(|f| AgentConfig::from_file(f, path).unwrap())
        .unwrap();
        cfg.catalog
    }

    #[test]
    fn a_rule_that_matches_no_task_is_named() {
        let p = rules::parse(
            "[[rule]]\nname = \"hashes\"\nmatch = { tags = [\"hash\"] }\nplace = \"cloud\"\n[[rule]]\nname = \"typo\"\nmatch = { names = [\"shaa\"] }\nplace = \"cloud\"\n[[rule]]\nname = \"all\"\nplace = \"auto\"\n",
            Path::new("p.toml"),
        )
        .unwrap();
        assert_eq!(unmatched_rules(&p, &catalog()), ["typo"]);
    }

    #[test]
    fn tasks_no_daemon_offers_are_the_offloadable_ones_missing() {
        let c = catalog();
        assert_eq!(unoffered(&c, &[]), ["sha"]);
        assert!(unoffered(&c, &["sha".into()]).is_empty());
    }

    #[test]
    fn certificate_clock_and_disk_lines() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let day = Duration::from_secs(86_400);
        let p = Path::new("/var/lib/updraft/agent.pem");
        assert_eq!(
            certificate(p, now + 90 * day, now + 60 * day, now).level,
            Level::Ok
        );
        assert_eq!(
            certificate(p, now + 9 * day, now - day, now).level,
            Level::Warn
        );
        let expired = certificate(p, now - day, now - 2 * day, now);
        assert_eq!(expired.level, Level::Fail);
        assert!(
            expired
                .to_string()
                .starts_with("FAIL  certificate /var/lib/updraft/agent.pem has EXPIRED"),
            "{expired}"
        );
        assert_eq!(skew("d:4433", 40).level, Level::Ok);
        assert_eq!(skew("d:4433", -3_000).level, Level::Warn);
        assert!(skew("d:4433", -3_000).text.contains("3s behind"));
        assert_eq!(skew("d:4433", 600_000).level, Level::Fail);
        assert_eq!(disk(Path::new("/s"), 1 << 30).level, Level::Ok);
        assert_eq!(disk(Path::new("/s"), 100 << 20).level, Level::Warn);
        assert_eq!(disk(Path::new("/s"), 1 << 20).level, Level::Fail);
    }
}
