//! Serving: [`run`] starts the uplink and the background loops (signal sampling and
//! link probes, certificate renewal, the detached-task dispatcher, SIGUSR1 rebind,
//! SIGHUP reload), serves the local API until shutdown, then drains.

use crate::service::Agent;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use crate::api::bind_socket;

/// How long shutdown waits for detached runs to stop where they are: they are resumed
/// from the journal at the next start, so this only lets journal writes in progress end.
const DETACHED_STOP_WAIT: Duration = Duration::from_secs(2);
/// How long shutdown waits for QUIC connections to close cleanly, so daemons see the
/// agent leave instead of timing it out; a dead link must not hold shutdown longer.
const UPLINK_CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Runs the agent until `shutdown` resolves: connects to the daemons, serves the API
/// on `listener`, then stops taking requests and lets running ones finish.
pub async fn run(
    agent: Arc<Agent>,
    listener: tokio::net::UnixListener,
    shutdown: impl Future<Output = ()>,
) {
    let stop = CancellationToken::new();
    // Weak: the uplink is the agent's, and must not keep it alive.
    let (policy_of, apply_to) = (Arc::downgrade(&agent), Arc::downgrade(&agent));
    agent.uplink.set_fleet(crate::fleet::Hook {
        fleet: agent.fleet.clone(),
        policy: Arc::new(move || Some(policy_of.upgrade()?.knowledge.policy().status())),
        apply: Arc::new(move |text: &str| match apply_to.upgrade() {
            Some(a) => a.knowledge.apply_pushed_policy(text),
            None => Err(crate::policy_file::PushRefused::Invalid(
                "the agent is stopping".into(),
            )),
        }),
        accept_push: agent.config.accept_push,
    });
    agent.uplink.start(stop.clone());
    tokio::spawn(sample_loop(agent.clone(), stop.clone()));
    tokio::spawn(reload_on_sighup(agent.clone(), stop.clone()));
    tokio::spawn(rebind_on_sigusr1(agent.clone(), stop.clone()));
    tokio::spawn(renew_certificate(agent.clone(), stop.clone()));
    let detached = tokio_util::task::TaskTracker::new();
    tokio::spawn(crate::detached::dispatch_detached(
        agent.clone(),
        detached.clone(),
        stop.clone(),
    ));
    info!(
        agent = agent.agent_id(),
        socket = %agent.config.socket.display(),
        daemons = agent.config.clouds.len(),
        "updraft-agent serving"
    );
    updraft_shared::notify::ready(&format!(
        "serving on {}: agent {}, {} daemons configured",
        agent.config.socket.display(),
        agent.agent_id(),
        agent.config.clouds.len()
    ));
    updraft_shared::notify::spawn_watchdog();
    crate::api::serve(agent.clone(), listener, shutdown).await;
    updraft_shared::notify::stopping("stopping: finishing the requests in progress");
    stop.cancel();
    // Detached runs stop where they are; the journal still has them, so the next start
    // resumes them.
    detached.close();
    let _ = tokio::time::timeout(DETACHED_STOP_WAIT, detached.wait()).await;
    agent.store_unstored().await;
    let unstored = agent.unstored_count();
    if unstored > 0 {
        warn!(
            tasks = unstored,
            "failures of detached tasks could not be written to the journal (full disk); those tasks run again at the next start"
        );
    }
    agent.knowledge.persist();
    agent
        .uplink
        .endpoint()
        .close(0u32.into(), b"agent stopping");
    let _ = tokio::time::timeout(UPLINK_CLOSE_WAIT, agent.uplink.endpoint().wait_idle()).await;
}

/// How often an expired certificate is reported again: nothing can renew it (a new
/// enrollment and a restart do), so once an hour keeps the log readable.
const EXPIRED_REPORT_EVERY: Duration = Duration::from_secs(3600);
/// Longest sleep before renewal is due: sleeping in bounded steps notices a clock
/// that jumps (a board without RTC setting its time late) within the hour.
const RENEW_CHECK_MAX: Duration = Duration::from_secs(3600);
/// Longest pause between failed renewals: a daemon back from a restart is used
/// within five minutes.
const RENEW_RETRY_MAX: Duration = Duration::from_secs(300);
/// Shortest pause between failed renewals, even close to expiry: no busy loop.
const RENEW_RETRY_MIN: Duration = Duration::from_millis(500);

/// What the renewal loop does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RenewStep {
    /// The certificate has expired: say so, and look again after this long.
    Expired(Duration),
    /// Not due yet: look again after this long.
    Wait(Duration),
    /// Due: renew now.
    Renew,
}

/// What to do `now` with a certificate that expires at `not_after`, due for renewal
/// at `renew_at`.
fn renew_step(now: SystemTime, not_after: SystemTime, renew_at: SystemTime) -> RenewStep {
    if now >= not_after {
        return RenewStep::Expired(EXPIRED_REPORT_EVERY);
    }
    match renew_at.duration_since(now) {
        Ok(wait) if !wait.is_zero() => RenewStep::Wait(wait.min(RENEW_CHECK_MAX)),
        _ => RenewStep::Renew,
    }
}

/// The pause after `failures` renewals in a row failed, `left` before expiry: doubling
/// from 2 s up to [`RENEW_RETRY_MAX`], and at most a quarter of what is left so a
/// certificate near its end gets several more tries.
fn renew_retry_pause(failures: u32, left: Duration) -> Duration {
    Duration::from_secs(1 << failures.min(8))
        .min(RENEW_RETRY_MAX)
        .min(left / 4)
        .max(RENEW_RETRY_MIN)
}

/// Keeps the certificate valid: renews it over a live connection when it is due,
/// swaps it in for new connections, and says loudly what to run once it has expired.
async fn renew_certificate(agent: Arc<Agent>, stop: CancellationToken) {
    let mut failures = 0u32;
    loop {
        let (_, not_after) = agent.cert.validity();
        let now = SystemTime::now();
        let renew_at = agent.cert.renew_time(agent.config.renew_before);
        let pause = match renew_step(now, not_after, renew_at) {
            RenewStep::Expired(pause) => {
                let message = crate::enroll::expired_message(&agent.cert.files, not_after);
                tracing::error!("{message}");
                agent.uplink.set_note(Some(message));
                pause
            }
            RenewStep::Wait(pause) => pause,
            RenewStep::Renew => match renew_once(&agent).await {
                Ok(()) => {
                    failures = 0;
                    continue;
                }
                Err(e) => {
                    failures += 1;
                    let left = not_after.duration_since(now).unwrap_or_default();
                    let pause = renew_retry_pause(failures, left);
                    warn!(error = %e, retry_in = ?pause, expires_in = ?left, "certificate renewal failed; trying again");
                    pause
                }
            },
        };
        debug!(next_check = ?pause, "certificate checked");
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// Why a certificate renewal did not happen.
#[derive(Debug, thiserror::Error)]
enum RenewError {
    /// No daemon to ask.
    #[error("no daemon is connected to renew with")]
    NoConnection,
    /// The last daemon asked did not renew it.
    #[error("{daemon}: {message}")]
    Daemon {
        /// The daemon.
        daemon: String,
        /// Its answer or what failed, with its causes.
        message: String,
    },
    /// The new certificate could not be put in use.
    #[error(transparent)]
    Swap(Box<dyn std::error::Error + Send + Sync>),
}

/// One renewal over the first daemon that does it.
async fn renew_once(agent: &Agent) -> Result<(), RenewError> {
    let connections = agent.uplink.connections();
    if connections.is_empty() {
        return Err(RenewError::NoConnection);
    }
    let mut last = None;
    for (daemon, conn) in connections {
        match crate::enroll::renew(&conn, &agent.cert.files, &agent.agent_id).await {
            Ok((identity, not_after)) => {
                agent
                    .uplink
                    .set_identity(&identity)
                    .map_err(|e| RenewError::Swap(e.into()))?;
                let validity = updraft_shared::tls::validity_of(&identity.chain[0])
                    .map_err(|e| RenewError::Swap(e.into()))?;
                agent.cert.renewed(validity, SystemTime::now());
                agent.uplink.set_note(None);
                info!(
                    daemon,
                    valid_until = %humantime::format_rfc3339_seconds(not_after),
                    cert = %agent.cert.files.cert.display(),
                    "certificate renewed; tasks running keep their connections, new connections use the new certificate"
                );
                return Ok(());
            }
            Err(e) => {
                last = Some(RenewError::Daemon {
                    daemon,
                    message: format!("{e:#}"),
                })
            }
        }
    }
    Err(last.expect("at least one connection was tried"))
}

/// Samples signals on one timer until shutdown.
async fn sample_loop(agent: Arc<Agent>, stop: CancellationToken) {
    let interval = agent.config.sample_interval;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                agent.knowledge.tick(&agent.uplink, agent.executor.load());
                probe_links(&agent);
            }
            () = stop.cancelled() => return,
        }
    }
}

/// Starts a link probe of each daemon whose link estimate needs one, as the prober
/// allows (`[link] probe`, `probe_budget`, `probe_bytes`).
fn probe_links(agent: &Arc<Agent>) {
    let Some(prober) = agent.prober.as_ref() else {
        return;
    };
    for (address, conn) in agent.uplink.connections() {
        let Some(why) = agent.knowledge.link_needs_probe(&address) else {
            continue;
        };
        let Some(ticket) = prober.begin(&address, conn.stable_id(), Instant::now()) else {
            continue;
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let result = crate::probe::probe(&conn, ticket.bytes, ticket.bytes).await;
            match &result {
                Ok(s) => {
                    let (up, down) = (s.up.bytes_per_sec(), s.down.bytes_per_sec());
                    let mbps = |r: Option<f64>| {
                        r.map_or("untimed".to_string(), |r| format!("{:.1} Mbit/s", r * 8e-6))
                    };
                    tracing::debug!(daemon = %address, why, up = %mbps(up), down = %mbps(down), "link probe");
                    agent.knowledge.record_probe(&address, up, down);
                }
                Err(crate::probe::ProbeError::Unsupported(_)) => {
                    info!(daemon = %address, "the daemon does not support link probes; the link is measured from task transfers only");
                }
                Err(e) => tracing::debug!(daemon = %address, "link probe: {e}"),
            }
            if let Some(prober) = agent.prober.as_ref() {
                prober.end(&address, conn.stable_id(), &result, Instant::now());
            }
        });
    }
}

/// Rebinds the QUIC socket on SIGUSR1, so connections migrate after a network change
/// (a new address, a changed interface) instead of timing out.
async fn rebind_on_sigusr1(agent: Arc<Agent>, stop: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut usr1) = signal(SignalKind::user_defined1()) else {
        warn!("cannot install a SIGUSR1 handler; connections reconnect after a network change instead of migrating");
        return;
    };
    loop {
        tokio::select! {
            _ = usr1.recv() => match agent.uplink.rebind() {
                Ok(addr) => info!(local = %addr, "SIGUSR1: rebound the QUIC socket; connections migrate to it"),
                Err(e) => warn!(error = %e, "SIGUSR1: cannot rebind the QUIC socket; connections stay on the old one"),
            },
            () = stop.cancelled() => return,
        }
    }
}

/// Reloads the policy on SIGHUP, and says what a changed agent.toml needs.
async fn reload_on_sighup(agent: Arc<Agent>, stop: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        warn!("cannot install a SIGHUP handler; the policy still reloads when its file changes");
        return;
    };
    loop {
        tokio::select! {
            _ = hup.recv() => {
                agent.knowledge.reload_policy("SIGHUP");
                crate::config::log_reread(&agent.config);
            }
            () = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enroll::CertFiles;
    use crate::service::Cert;

    const H: Duration = Duration::from_secs(3600);

    #[test]
    fn renewal_waits_in_bounded_steps_until_due() {
        let now = SystemTime::UNIX_EPOCH + 1000 * H;
        let not_after = now + 100 * H;
        assert_eq!(
            renew_step(now, not_after, now + 30 * H),
            RenewStep::Wait(RENEW_CHECK_MAX)
        );
        assert_eq!(
            renew_step(now, not_after, now + Duration::from_secs(90)),
            RenewStep::Wait(Duration::from_secs(90))
        );
        assert_eq!(renew_step(now, not_after, now), RenewStep::Renew);
        assert_eq!(renew_step(now, not_after, now - H), RenewStep::Renew);
    }

    #[test]
    fn an_expired_certificate_is_reported_hourly_not_renewed() {
        let now = SystemTime::UNIX_EPOCH + 1000 * H;
        assert_eq!(
            renew_step(now, now, now - H),
            RenewStep::Expired(EXPIRED_REPORT_EVERY)
        );
        assert_eq!(
            renew_step(now + H, now, now - H),
            RenewStep::Expired(EXPIRED_REPORT_EVERY)
        );
    }

    #[test]
    fn failed_renewals_back_off_within_what_is_left() {
        let plenty = 100 * H;
        let secs: Vec<u64> = (1..=10)
            .map(|f| renew_retry_pause(f, plenty).as_secs())
            .collect();
        assert_eq!(secs, [2, 4, 8, 16, 32, 64, 128, 256, 256, 256]);
        // Near expiry: a quarter of what is left, never under half a second.
        assert_eq!(
            renew_retry_pause(8, Duration::from_secs(40)),
            Duration::from_secs(10)
        );
        assert_eq!(renew_retry_pause(8, Duration::ZERO), RENEW_RETRY_MIN);
    }

    #[test]
    fn a_renewed_certificate_moves_the_renewal_time() {
        let t0 = SystemTime::UNIX_EPOCH + 1000 * H;
        let files = CertFiles {
            cert: "/nonexistent/agent.pem".into(),
            key: "/nonexistent/agent.key".into(),
            ca: "/nonexistent/ca.pem".into(),
        };
        let cert = Cert::new(files, (t0, t0 + 90 * H), t0);
        let first = cert.renew_time(None);
        assert!(first > t0 && first < t0 + 90 * H, "{first:?}");
        cert.renewed((t0 + 60 * H, t0 + 150 * H), t0 + 60 * H);
        assert_eq!(cert.validity(), (t0 + 60 * H, t0 + 150 * H));
        assert_eq!(cert.renew_time(None), first + 60 * H);
    }
}
