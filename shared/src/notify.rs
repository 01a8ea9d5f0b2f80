//! systemd notifications: READY, STOPPING and watchdog pings. All are no-ops when the
//! service is not started by systemd (no `NOTIFY_SOCKET`).

use sd_notify::NotifyState;
use std::time::Duration;

/// Tells systemd start-up is done, with a one-line status for `systemctl status`
/// (`StatusText`), e.g. what the service serves on.
pub fn ready(status: &str) {
    let _ = sd_notify::notify(false, &[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells systemd we are shutting down, and what the stop is waiting for.
pub fn stopping(status: &str) {
    let _ = sd_notify::notify(false, &[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// Pings the watchdog at half its period from the calling runtime, for as long as the
/// runtime's timers run: a wedged event loop stops the pings and systemd restarts us.
pub fn spawn_watchdog() {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let period = Duration::from_micros(usec) / 2;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
        }
    });
}
