//! Link probes (`docs/PROTOCOL.md`, "Link probe"): an agent measures its link by
//! sending a small payload and asking for one back. The daemon times the payload as it
//! arrives, reads and drops it in chunks (nothing is held), sends the bytes asked for,
//! and takes no task slot. Each connection may have one probe at a time, within
//! `probe_budget` bytes an hour, so a probe cannot make the daemon send without bound.

use bytes::Bytes;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tracing::{debug, warn};
use updraft_proto::frame::DATA_CHUNK;
use updraft_proto::msg::bounded_message;
use updraft_proto::probe::{Arrivals, Measured, ProbeBudget};
use updraft_proto::{ErrorCode, Frame, ProbeReply, ProbeRequest, STOP_INPUT};
use updraft_shared::wire::{write_frame, FrameReader};

/// Longest a probe may take to arrive, and then to be sent back: 1 MiB at about
/// 140 kbit/s. Past it the daemon gives up on the probe.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

/// The download payload: zeros (QUIC encrypts them anyway), shared by every probe.
static ZEROS: [u8; DATA_CHUNK] = [0; DATA_CHUNK];

/// One connection's probes: at most one at a time, within a byte budget an hour.
#[derive(Debug)]
pub(crate) struct ProbeGate {
    state: Mutex<(ProbeBudget, bool)>,
}

/// Why a [`ProbeGate`] did not admit a probe; the text of the `busy` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ProbeBusy {
    /// The connection's previous probe has not finished.
    #[error("another probe is in progress on this connection")]
    InProgress,
    /// The budget has fewer bytes left than asked for; they are back after `wait`.
    #[error(
        "this connection's probe budget ({per_hour} bytes an hour, daemon.toml probe_budget) has {left} bytes left, fewer than the {bytes} asked for; they are there in {}s",
        .wait.as_secs() + 1
    )]
    OverBudget {
        /// The budget, bytes an hour.
        per_hour: u64,
        /// Bytes left in it now.
        left: u64,
        /// Bytes asked for.
        bytes: u64,
        /// How long until enough bytes are back.
        wait: Duration,
    },
    /// More bytes asked for than the whole budget holds: never admitted.
    #[error(
        "the {bytes} bytes asked for are more than this daemon's probe budget of {per_hour} bytes an hour (daemon.toml probe_budget)"
    )]
    OverAnyBudget {
        /// The budget, bytes an hour.
        per_hour: u64,
        /// Bytes asked for.
        bytes: u64,
    },
}

/// A probe admitted by a [`ProbeGate`]; the next may start once it is dropped.
#[derive(Debug)]
pub(crate) struct ProbeSlot<'a>(&'a ProbeGate);

impl Drop for ProbeSlot<'_> {
    fn drop(&mut self) {
        self.0.state.lock().unwrap_or_else(|e| e.into_inner()).1 = false;
    }
}

impl ProbeGate {
    /// A gate allowing `per_hour` probe bytes (both directions), full at `now`.
    pub(crate) fn new(per_hour: u64, now: Instant) -> Self {
        Self {
            state: Mutex::new((ProbeBudget::new(per_hour, now), false)),
        }
    }

    /// Admits a probe moving `bytes` (up and down together) at `now`, taking them from
    /// the budget; or says why not, for a `busy` reply.
    pub(crate) fn admit(&self, bytes: u64, now: Instant) -> Result<ProbeSlot<'_>, ProbeBusy> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (budget, active) = &mut *state;
        if *active {
            return Err(ProbeBusy::InProgress);
        }
        if !budget.try_spend(bytes, now) {
            let per_hour = budget.per_hour();
            return Err(match budget.wait_for(bytes, now) {
                Some(wait) => ProbeBusy::OverBudget {
                    per_hour,
                    left: budget.available(now),
                    bytes,
                    wait,
                },
                None => ProbeBusy::OverAnyBudget { per_hour, bytes },
            });
        }
        *active = true;
        Ok(ProbeSlot(self))
    }
}

/// Serves a probe stream whose first frame, `frame`, was a Probe: checks it, receives
/// and times the upload, answers, sends the download and finishes.
pub(crate) async fn serve(
    mut send: quinn::SendStream,
    reader: FrameReader<quinn::RecvStream>,
    frame: &Frame,
    gate: &ProbeGate,
    draining: bool,
    agent: &str,
) {
    let (mut recv, leftover) = reader.into_parts();
    let admitted = match admit(frame, gate, draining) {
        Ok(admitted) => admitted,
        Err((code, message)) => {
            if code == ErrorCode::BadRequest {
                warn!(
                    agent,
                    reason = message,
                    "peer misbehaved: bad probe request"
                );
            } else {
                debug!(agent, code = %code, reason = message, "probe refused");
            }
            let _ = recv.stop(STOP_INPUT.into());
            refuse(&mut send, code, message).await;
            return;
        }
    };
    let (request, slot) = admitted;
    let received = tokio::time::timeout(PROBE_TIMEOUT, receive(leftover, &mut recv, request.up))
        .await
        .unwrap_or_else(|_| {
            Err((
                ErrorCode::TimedOut,
                format!(
                    "the probe's {} payload bytes did not arrive within {PROBE_TIMEOUT:?}",
                    request.up
                ),
            ))
        });
    let measured = match received {
        Ok(m) => m,
        Err((code, message)) => {
            debug!(agent, code = %code, reason = message, "probe failed");
            let _ = recv.stop(STOP_INPUT.into());
            refuse(&mut send, code, message).await;
            return;
        }
    };
    let reply = ProbeReply::Measured {
        received_bytes: measured.bytes,
        received_us: measured.elapsed.as_micros() as u64,
        tail_bytes: measured.tail_bytes,
        tail_us: measured.tail.as_micros() as u64,
    };
    let sent = tokio::time::timeout(PROBE_TIMEOUT, respond(&mut send, &reply, request.down)).await;
    if !matches!(sent, Ok(Ok(()))) {
        debug!(
            agent,
            "probe answer not delivered: the agent went away or stopped reading"
        );
        let _ = send.reset(0u32.into());
        return;
    }
    // Everything is sent: the next probe may start as soon as the agent has read it.
    drop(slot);
    // Keep the stream until the agent has the payload (or the time is up).
    let _ = tokio::time::timeout(PROBE_TIMEOUT, send.stopped()).await;
    debug!(agent, up = request.up, down = request.down, "probe served");
}

/// The checked request and its slot, or the refusal to send.
fn admit<'g>(
    frame: &Frame,
    gate: &'g ProbeGate,
    draining: bool,
) -> Result<(ProbeRequest, ProbeSlot<'g>), (ErrorCode, String)> {
    let bad = |e: String| (ErrorCode::BadRequest, format!("bad probe request: {e}"));
    let request = ProbeRequest::from_frame(frame).map_err(|e| bad(e.to_string()))?;
    request.validate().map_err(|e| bad(e.to_string()))?;
    if draining {
        return Err((
            ErrorCode::Draining,
            "the daemon is draining; probe another".into(),
        ));
    }
    let bytes = u64::from(request.up) + u64::from(request.down);
    let slot = gate
        .admit(bytes, Instant::now())
        .map_err(|m| (ErrorCode::Busy, m.to_string()))?;
    Ok((request, slot))
}

/// Reads the upload to its FIN, dropping each chunk as it comes, and times it. It must
/// be exactly `up` bytes.
async fn receive(
    leftover: Bytes,
    recv: &mut quinn::RecvStream,
    up: u32,
) -> Result<Measured, (ErrorCode, String)> {
    let up = u64::from(up);
    let mut arrivals = Arrivals::new(up);
    arrivals.add(leftover.len() as u64, Instant::now());
    loop {
        if arrivals.received() > up {
            return Err((
                ErrorCode::BadRequest,
                format!("the probe payload is longer than its `up` of {up} bytes"),
            ));
        }
        match recv.read_chunk(DATA_CHUNK, true).await {
            Ok(Some(chunk)) => arrivals.add(chunk.bytes.len() as u64, Instant::now()),
            Ok(None) => break,
            Err(e) => {
                return Err((
                    ErrorCode::BadRequest,
                    format!("the probe payload did not arrive whole: {e}"),
                ))
            }
        }
    }
    if arrivals.received() < up {
        return Err((
            ErrorCode::BadRequest,
            format!(
                "the probe payload ended after {} of its `up` of {up} bytes",
                arrivals.received()
            ),
        ));
    }
    Ok(arrivals.measured())
}

/// Sends the reply, then `down` payload bytes, then FIN.
async fn respond(
    send: &mut quinn::SendStream,
    reply: &ProbeReply,
    down: u32,
) -> Result<(), quinn::WriteError> {
    write_frame(send, &reply.to_frame()).await?;
    let mut left = down as usize;
    while left > 0 {
        let n = left.min(ZEROS.len());
        send.write_chunk(Bytes::from_static(&ZEROS[..n])).await?;
        left -= n;
    }
    let _ = send.finish();
    Ok(())
}

/// A ProbeReply `rejected`, then FIN.
async fn refuse(send: &mut quinn::SendStream, code: ErrorCode, message: String) {
    let reply = ProbeReply::Rejected {
        code,
        message: bounded_message(message),
    };
    let _ = write_frame(send, &reply.to_frame()).await;
    let _ = send.finish();
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn one_probe_at_a_time_per_connection() {
        let t0 = Instant::now();
        let gate = ProbeGate::new(64 * MIB, t0);
        let first = gate.admit(MIB, t0).unwrap();
        let err = gate.admit(MIB, t0).unwrap_err();
        assert_eq!(err, ProbeBusy::InProgress);
        assert_eq!(
            err.to_string(),
            "another probe is in progress on this connection"
        );
        drop(first);
        gate.admit(MIB, t0).unwrap();
    }

    #[test]
    fn the_budget_refuses_what_it_does_not_hold_and_refills() {
        let t0 = Instant::now();
        let gate = ProbeGate::new(3 * MIB, t0);
        drop(gate.admit(2 * MIB, t0).unwrap());
        let err = gate.admit(2 * MIB, t0).unwrap_err();
        let ProbeBusy::OverBudget { wait, .. } = err else {
            panic!("{err:?}")
        };
        assert_eq!(
            err,
            ProbeBusy::OverBudget {
                per_hour: 3 * MIB,
                left: MIB,
                bytes: 2 * MIB,
                wait
            }
        );
        // A third of the hourly budget is missing: back in 20 minutes.
        assert!(
            wait.abs_diff(Duration::from_secs(1200)) < Duration::from_secs(1),
            "{wait:?}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "this connection's probe budget (3145728 bytes an hour, daemon.toml probe_budget) has 1048576 bytes left, fewer than the 2097152 asked for; they are there in {}s",
                wait.as_secs() + 1
            )
        );
        // A refusal takes nothing: the megabyte left is still there.
        drop(gate.admit(MIB, t0).unwrap());
        // 20 minutes give back a third of the hourly budget.
        drop(gate.admit(MIB, t0 + Duration::from_secs(1200)).unwrap());
        let err = gate.admit(4 * MIB, t0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the 4194304 bytes asked for are more than this daemon's probe budget of 3145728 bytes an hour (daemon.toml probe_budget)"
        );
    }

    #[test]
    fn a_zero_budget_refuses_every_probe() {
        let t0 = Instant::now();
        let gate = ProbeGate::new(0, t0);
        let err = gate.admit(1, t0 + Duration::from_secs(7200)).unwrap_err();
        assert_eq!(
            err,
            ProbeBusy::OverAnyBudget {
                per_hour: 0,
                bytes: 1
            }
        );
    }
}
