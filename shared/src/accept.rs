//! One accept loop for the services' stream listeners (the agent's API socket, the
//! daemon's `/metrics` port): a connection cap, backoff when `accept` fails, and a stop.
//!
//! What a connection is served with, and how a refused one is answered, is the caller's.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

/// First pause after `accept` failed: short, since a descriptor is often freed at once.
pub const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(10);
/// Longest pause between accept retries after `accept` failed (EMFILE and the like):
/// long enough not to spin, short enough that service resumes within a second.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A listener of byte streams.
pub trait Listener {
    /// An accepted connection.
    type Stream: Send + 'static;
    /// Waits for the next connection.
    fn accept_stream(&self) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_stream(&self) -> io::Result<Self::Stream> {
        self.accept().await.map(|(s, _)| s)
    }
}

impl Listener for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_stream(&self) -> io::Result<Self::Stream> {
        self.accept().await.map(|(s, _)| s)
    }
}

/// Accepts on `listener` until `shutdown`: each connection gets one of `max_connections`
/// slots and goes to `serve` with it (the slot frees when the permit drops); one past the
/// cap goes to `refuse`. A failing `accept` is retried after a pause doubling from
/// [`ACCEPT_BACKOFF_FIRST`] to [`ACCEPT_BACKOFF_MAX`], with one warning naming `what`
/// (the listener, as an operator knows it) until an accept succeeds again.
pub async fn accept_loop<L: Listener>(
    listener: &L,
    what: &str,
    max_connections: usize,
    shutdown: impl Future<Output = ()>,
    mut serve: impl FnMut(L::Stream, OwnedSemaphorePermit),
    mut refuse: impl FnMut(L::Stream),
) {
    let slots = Arc::new(Semaphore::new(max_connections));
    let mut backoff = Backoff::default();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            r = listener.accept_stream() => match r {
                Ok(stream) => {
                    backoff.reset();
                    match slots.clone().try_acquire_owned() {
                        Ok(slot) => serve(stream, slot),
                        Err(_) => refuse(stream),
                    }
                }
                Err(e) => {
                    let pause = backoff.next();
                    if pause == ACCEPT_BACKOFF_FIRST {
                        warn!(error = %e, "accepting on {what} failed; retrying with backoff up to {ACCEPT_BACKOFF_MAX:?}");
                    } else {
                        debug!(error = %e, ?pause, "accepting on {what} failed again");
                    }
                    tokio::time::sleep(pause).await;
                }
            },
            () = &mut shutdown => break,
        }
    }
}

/// Exponential pause between failing `accept` calls: [`ACCEPT_BACKOFF_FIRST`] doubling
/// to [`ACCEPT_BACKOFF_MAX`], back to the start after a success.
#[derive(Debug, Default)]
struct Backoff(Option<Duration>);

impl Backoff {
    fn next(&mut self) -> Duration {
        let d = self
            .0
            .map_or(ACCEPT_BACKOFF_FIRST, |d| (d * 2).min(ACCEPT_BACKOFF_MAX));
        self.0 = Some(d);
        d
    }

    fn reset(&mut self) {
        self.0 = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    #[test]
    fn backoff_doubles_to_its_cap_and_restarts_after_a_success() {
        let mut b = Backoff::default();
        let seen: Vec<_> = (0..9).map(|_| b.next()).collect();
        assert_eq!(seen[0], ACCEPT_BACKOFF_FIRST);
        assert_eq!(seen[1], ACCEPT_BACKOFF_FIRST * 2);
        assert!(seen.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*seen.last().unwrap(), ACCEPT_BACKOFF_MAX);
        b.reset();
        assert_eq!(b.next(), ACCEPT_BACKOFF_FIRST);
    }

    /// A listener whose `accept` fails `failures` times, then yields streams numbered
    /// from 0, then waits forever.
    struct Scripted {
        failures: AtomicUsize,
        streams: Mutex<std::ops::Range<usize>>,
    }

    impl Listener for Scripted {
        type Stream = usize;
        async fn accept_stream(&self) -> io::Result<usize> {
            if self
                .failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(io::Error::from_raw_os_error(24)); // EMFILE
            }
            let next = self.streams.lock().unwrap().next();
            match next {
                Some(n) => Ok(n),
                None => std::future::pending().await,
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_then_connections_past_the_cap_are_refused() {
        let listener = Scripted {
            failures: AtomicUsize::new(5),
            streams: Mutex::new(0..5),
        };
        let mut served = Vec::new();
        let mut refused = Vec::new();
        let stop = tokio::sync::Notify::new();
        let started = tokio::time::Instant::now();
        let mut permits = Vec::new();
        accept_loop(
            &listener,
            "the test listener",
            3,
            stop.notified(),
            |s, permit| {
                served.push(s);
                permits.push(permit);
            },
            |s| {
                refused.push(s);
                if s == 4 {
                    stop.notify_one();
                }
            },
        )
        .await;
        // Five failures paused 10+20+40+80+160 ms (paused clock: exact).
        assert_eq!(started.elapsed(), Duration::from_millis(310));
        assert_eq!(served, [0, 1, 2]);
        assert_eq!(refused, [3, 4]);
    }
}
