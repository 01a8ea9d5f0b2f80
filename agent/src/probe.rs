//! The link probe, agent side (`docs/PROTOCOL.md`, "Link probe"): a small timed
//! transfer each way over a live connection, to learn what the link carries when no
//! task has crossed it lately. [`probe`] runs one; whoever calls it checks a
//! [`ProbeBudget`] first (`[link] probe_budget`) and does nothing when `[link] probe`
//! is false.

use std::time::{Duration, Instant};
use updraft_proto::frame::DATA_CHUNK;
pub(crate) use updraft_proto::probe::ProbeBudget;
use updraft_proto::probe::{Arrivals, Measured};
use updraft_proto::{ErrorCode, FrameKind, ProbeReply, ProbeRequest, ReplyHeader, RESET_ABANDONED};
use updraft_shared::wire::{write_frame, FrameReader, WireError};

/// Longest one probe may take, from opening its stream to the last downloaded byte.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// The upload payload: zeros (QUIC encrypts them anyway).
static ZEROS: [u8; DATA_CHUNK] = [0; DATA_CHUNK];

/// One direction of a probe, as its receiver timed it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transfer {
    /// Payload bytes moved.
    pub bytes: u64,
    /// Seconds from the arrival of the first payload byte to that of the last, at the
    /// receiver (the daemon for the upload, the agent for the download). Excludes the
    /// request's latency, not the connection's slow start.
    pub secs: f64,
    /// Bytes that arrived during the tail: after the read that brought the payload to
    /// half its size or more.
    pub tail_bytes: u64,
    /// Seconds the tail took, to the last byte's arrival. Past slow start, this is the
    /// better measure of what the stream sustains.
    pub tail_secs: f64,
}

impl Transfer {
    fn from_measured(m: Measured) -> Self {
        Self {
            bytes: m.bytes,
            secs: m.elapsed.as_secs_f64(),
            tail_bytes: m.tail_bytes,
            tail_secs: m.tail.as_secs_f64(),
        }
    }

    /// Bytes a second the stream moved: over the tail when it was timed, else over the
    /// whole payload; `None` when no time could be measured (it arrived in one read).
    pub fn bytes_per_sec(&self) -> Option<f64> {
        if self.tail_bytes > 0 && self.tail_secs > 0.0 {
            Some(self.tail_bytes as f64 / self.tail_secs)
        } else if self.bytes > 0 && self.secs > 0.0 {
            Some(self.bytes as f64 / self.secs)
        } else {
            None
        }
    }
}

/// What one probe measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProbeSample {
    /// Agent → daemon, timed by the daemon (its ProbeReply).
    pub up: Transfer,
    /// Daemon → agent, timed by the agent.
    pub down: Transfer,
    /// The whole exchange as the agent saw it, from opening the stream to the end of
    /// the download: an upper bound, round trips included.
    pub elapsed: Duration,
}

/// Why a probe measured nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// The daemon does not know probes (it answered with a task Reply, as daemons
    /// before the probe do): stop probing this connection.
    #[error("the daemon does not support link probes: {0}")]
    Unsupported(String),
    /// The daemon refused: `busy` (its budget for this connection is spent, or a probe
    /// is in progress), `draining`, `bad_request`, `timed_out`.
    #[error("the daemon refused the probe ({code}): {message}")]
    Refused {
        /// The daemon's code.
        code: ErrorCode,
        /// Its reason.
        message: String,
    },
    /// The probe was not sent as asked (over [`updraft_proto::MAX_PROBE_BYTES`]),
    /// the stream or connection failed, the daemon misbehaved, or the probe took longer
    /// than [`PROBE_TIMEOUT`].
    #[error("link probe failed: {0}")]
    Failed(String),
}

/// Sends `up` payload bytes to the daemon on `conn` and has it send `down` back, each
/// at most 1 MiB, and returns how each direction was timed. Takes no task slot on the
/// daemon; the daemon limits each connection to one probe at a time and to its own
/// `probe_budget` bytes an hour (over it: [`ProbeError::Refused`] with `busy`).
pub async fn probe(
    conn: &quinn::Connection,
    up: u32,
    down: u32,
) -> Result<ProbeSample, ProbeError> {
    let request = ProbeRequest { up, down };
    request
        .validate()
        .map_err(|e| ProbeError::Failed(e.to_string()))?;
    let started = Instant::now();
    let mut stream = None;
    let result = tokio::time::timeout(PROBE_TIMEOUT, exchange(conn, request, &mut stream)).await;
    let result = result.unwrap_or_else(|_| {
        Err(ProbeError::Failed(format!(
            "no whole answer within {PROBE_TIMEOUT:?}"
        )))
    });
    if let (Err(_), Some((send, recv))) = (&result, stream.as_mut()) {
        // Tell the daemon at once instead of leaving it to its own timeout.
        let _ = send.reset(RESET_ABANDONED.into());
        let _ = recv.get_mut().stop(0u32.into());
    }
    let (up, down) = result?;
    Ok(ProbeSample {
        up,
        down,
        elapsed: started.elapsed(),
    })
}

type ProbeStream = (quinn::SendStream, FrameReader<quinn::RecvStream>);

/// The probe on a new stream, kept in `stream` so [`probe`] can end it on failure.
async fn exchange(
    conn: &quinn::Connection,
    request: ProbeRequest,
    stream: &mut Option<ProbeStream>,
) -> Result<(Transfer, Transfer), ProbeError> {
    let failed = |what: &str, e: &dyn std::fmt::Display| ProbeError::Failed(format!("{what}: {e}"));
    let (send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| failed("cannot open a stream", &e))?;
    let (send, reader) = stream.insert((send, FrameReader::new(recv)));
    // A daemon that refuses stops reading (STOP_SENDING): the write fails and the
    // reply says why, so a failed write is not the answer.
    let _ = send_upload(send, request).await;
    let reply = read_reply(reader).await?;
    let up = match reply {
        ProbeReply::Measured {
            received_bytes,
            received_us,
            tail_bytes,
            tail_us,
        } => {
            if received_bytes != u64::from(request.up) || tail_bytes > received_bytes {
                return Err(ProbeError::Failed(format!(
                    "daemon misbehaved: it says it received {received_bytes} bytes (tail {tail_bytes}) of the {} sent",
                    request.up
                )));
            }
            Transfer {
                bytes: received_bytes,
                secs: received_us as f64 / 1e6,
                tail_bytes,
                tail_secs: tail_us as f64 / 1e6,
            }
        }
        ProbeReply::Rejected { code, message } => {
            return Err(ProbeError::Refused { code, message })
        }
    };
    let down = receive_download(reader, request.down).await?;
    Ok((up, down))
}

/// The Probe frame, `up` zero bytes, FIN.
async fn send_upload(
    send: &mut quinn::SendStream,
    request: ProbeRequest,
) -> Result<(), quinn::WriteError> {
    write_frame(send, &request.to_frame()).await?;
    let mut left = request.up as usize;
    while left > 0 {
        let n = left.min(ZEROS.len());
        send.write_chunk(bytes::Bytes::from_static(&ZEROS[..n]))
            .await?;
        left -= n;
    }
    let _ = send.finish();
    Ok(())
}

/// The daemon's first frame: a ProbeReply, or a task Reply from a daemon that does
/// not know probes.
async fn read_reply<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
) -> Result<ProbeReply, ProbeError> {
    let frame = match reader.next().await {
        Ok(Some(frame)) => frame,
        Ok(None) => {
            return Err(ProbeError::Failed(
                "the daemon closed the stream without answering".into(),
            ))
        }
        Err(WireError::Io(e)) => return Err(ProbeError::Failed(format!("connection failed: {e}"))),
        Err(e) => return Err(ProbeError::Failed(format!("daemon misbehaved: {e}"))),
    };
    if frame.kind == FrameKind::Reply {
        let why = match ReplyHeader::from_frame(&frame) {
            Ok(ReplyHeader::Rejected { code, message }) => format!("it answered {code}: {message}"),
            _ => "it answered with a task reply".into(),
        };
        return Err(ProbeError::Unsupported(why));
    }
    ProbeReply::from_frame(&frame)
        .map_err(|e| ProbeError::Failed(format!("daemon misbehaved: {e}")))
}

/// Reads and times the download to its FIN; it must be exactly `down` bytes.
async fn receive_download(
    reader: &mut FrameReader<quinn::RecvStream>,
    down: u32,
) -> Result<Transfer, ProbeError> {
    let expected = u64::from(down);
    let mut arrivals = Arrivals::new(expected);
    // Bytes read along with the reply arrived with it.
    let leftover = reader.take_buffered().len() as u64;
    arrivals.add(leftover, Instant::now());
    let recv = reader.get_mut();
    while arrivals.received() <= expected {
        match recv.read_chunk(DATA_CHUNK, true).await {
            Ok(Some(chunk)) => arrivals.add(chunk.bytes.len() as u64, Instant::now()),
            Ok(None) => break,
            Err(e) => return Err(ProbeError::Failed(format!("download failed: {e}"))),
        }
    }
    if arrivals.received() != expected {
        return Err(ProbeError::Failed(format!(
            "daemon misbehaved: it sent {}{} of the {expected} bytes asked for",
            arrivals.received(),
            if arrivals.received() > expected {
                " or more"
            } else {
                ""
            },
        )));
    }
    Ok(Transfer::from_measured(arrivals.measured()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use updraft_proto::Frame;

    async fn reply_to(frames: &[Frame]) -> Result<ProbeReply, ProbeError> {
        let mut buf = BytesMut::new();
        for f in frames {
            f.encode(&mut buf);
        }
        let bytes = buf.freeze();
        read_reply(&mut FrameReader::new(&bytes[..])).await
    }

    #[tokio::test]
    async fn a_task_reply_means_the_daemon_does_not_know_probes() {
        // What a daemon before probes answers a first frame of kind 8.
        let old = ReplyHeader::Rejected {
            code: ErrorCode::BadRequest,
            message: "bad request header: peer misbehaved: unknown frame kind 8".into(),
        };
        let err = reply_to(&[old.to_frame()]).await.unwrap_err();
        assert!(
            matches!(&err, ProbeError::Unsupported(m) if m.contains("unknown frame kind 8")),
            "{err}"
        );
        let busy = ProbeReply::Rejected {
            code: ErrorCode::Busy,
            message: "spent".into(),
        };
        assert_eq!(reply_to(&[busy.to_frame()]).await.unwrap(), busy);
        let err = reply_to(&[]).await.unwrap_err();
        assert!(matches!(err, ProbeError::Failed(_)), "{err}");
        let err = reply_to(&[Frame::new(FrameKind::ProbeReply, &b"[]"[..])])
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ProbeError::Failed(m) if m.contains("misbehaved")),
            "{err}"
        );
    }

    #[test]
    fn a_rate_comes_from_the_tail_when_it_was_timed() {
        let t = Transfer {
            bytes: 1000,
            secs: 2.0,
            tail_bytes: 400,
            tail_secs: 0.5,
        };
        assert_eq!(t.bytes_per_sec(), Some(800.0));
        let whole = Transfer {
            tail_bytes: 0,
            tail_secs: 0.0,
            ..t
        };
        assert_eq!(whole.bytes_per_sec(), Some(500.0));
        let at_once = Transfer { secs: 0.0, ..whole };
        assert_eq!(at_once.bytes_per_sec(), None);
    }
}

/// Least time between two probes of one link, whatever the estimate says: a probe
/// that could not make it sure (a link that varies that much) is not repeated at once.
pub(crate) const PROBE_GAP: Duration = Duration::from_secs(30);

/// After a refusal or a failure, the link is not probed again for this long.
pub(crate) const PROBE_BACKOFF: Duration = Duration::from_secs(120);

/// When to probe each daemon's link: one probe at a time per link, at most one per
/// [`PROBE_GAP`], within `[link] probe_budget` per daemon, never on a connection whose
/// daemon does not support probes. Whether a link needs one is the caller's (see
/// `Knowledge::link_needs_probe`).
#[derive(Debug)]
pub(crate) struct Prober {
    per_hour: u64,
    bytes: u32,
    links: std::sync::Mutex<std::collections::HashMap<String, ProbeState>>,
}

/// One link's probing state.
#[derive(Debug, Clone)]
struct ProbeState {
    budget: ProbeBudget,
    in_flight: bool,
    /// The connection (its `stable_id`) whose daemon answered "unsupported".
    unsupported: Option<usize>,
    /// Not before this.
    next: Option<std::time::Instant>,
}

impl ProbeState {
    fn new(per_hour: u64, now: std::time::Instant) -> Self {
        ProbeState {
            budget: ProbeBudget::new(per_hour, now),
            in_flight: false,
            unsupported: None,
            next: None,
        }
    }
}

/// A probe the caller should run now (see [`Prober::begin`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ticket {
    /// Bytes each way.
    pub bytes: u32,
}

impl Prober {
    /// A prober for `[link]` (`None` with `probe = false`).
    pub(crate) fn new(link: &crate::config::LinkConfig) -> Option<Self> {
        link.probe.then(|| Prober {
            per_hour: link.probe_budget,
            bytes: link.probe_bytes,
            links: std::sync::Mutex::default(),
        })
    }

    /// Whether to probe the link at `address` over connection `conn_id` now; if so, the
    /// budget is charged and the link marked busy until [`Prober::end`].
    pub(crate) fn begin(
        &self,
        address: &str,
        conn_id: usize,
        now: std::time::Instant,
    ) -> Option<Ticket> {
        let mut links = self.links.lock().expect("prober lock");
        let state = links
            .entry(address.to_string())
            .or_insert_with(|| ProbeState::new(self.per_hour, now));
        if state.in_flight
            || state.unsupported == Some(conn_id)
            || state.next.is_some_and(|next| now < next)
        {
            return None;
        }
        let spend = u64::from(self.bytes) * 2;
        if !state.budget.try_spend(spend, now) {
            return None;
        }
        state.in_flight = true;
        Some(Ticket { bytes: self.bytes })
    }

    /// Records how the probe of `address` over `conn_id` ended.
    pub(crate) fn end(
        &self,
        address: &str,
        conn_id: usize,
        result: &Result<ProbeSample, ProbeError>,
        now: std::time::Instant,
    ) {
        let mut links = self.links.lock().expect("prober lock");
        let state = links
            .entry(address.to_string())
            .or_insert_with(|| ProbeState::new(self.per_hour, now));
        state.in_flight = false;
        state.next = Some(
            now + match result {
                Ok(_) => PROBE_GAP,
                Err(_) => PROBE_BACKOFF,
            },
        );
        if let Err(ProbeError::Unsupported(_)) = result {
            state.unsupported = Some(conn_id);
        }
    }
}

#[cfg(test)]
mod prober_tests {
    use super::*;
    use std::time::Instant;

    fn link(probe: bool, budget: u64, bytes: u32) -> crate::config::LinkConfig {
        crate::config::LinkConfig {
            probe,
            probe_budget: budget,
            probe_bytes: bytes,
            ..crate::config::LinkConfig::default()
        }
    }

    fn sample() -> ProbeSample {
        let t = Transfer {
            bytes: 1,
            secs: 1.0,
            tail_bytes: 0,
            tail_secs: 0.0,
        };
        ProbeSample {
            up: t,
            down: t,
            elapsed: Duration::from_secs(1),
        }
    }

    #[test]
    fn probes_are_spaced_bounded_by_the_budget_and_stop_where_unsupported() {
        let t0 = Instant::now();
        assert!(
            Prober::new(&link(false, 1 << 20, 1 << 16)).is_none(),
            "probe = false"
        );
        // A budget of four probes an hour.
        let p = Prober::new(&link(true, 8 << 16, 1 << 16)).unwrap();
        let ticket = p
            .begin("d:1", 7, t0)
            .expect("a cold link is probed at once");
        assert_eq!(ticket.bytes, 1 << 16);
        assert_eq!(p.begin("d:1", 7, t0), None, "one at a time");
        p.end("d:1", 7, &Ok(sample()), t0);
        assert_eq!(
            p.begin("d:1", 7, t0 + PROBE_GAP / 2),
            None,
            "not again so soon"
        );
        let mut t = t0;
        let mut probes = 1;
        for _ in 0..100 {
            t += PROBE_GAP;
            if p.begin("d:1", 7, t).is_some() {
                probes += 1;
                p.end("d:1", 7, &Ok(sample()), t);
            }
        }
        // 50 minutes: the budget (4 an hour, refilling) bounds it, not the gap.
        assert!((4..=8).contains(&probes), "{probes} probes");
        // A daemon without probes is not asked again on that connection; a new
        // connection (say, after an upgrade) is.
        let p = Prober::new(&link(true, 1 << 30, 1 << 16)).unwrap();
        p.begin("d:2", 1, t0).unwrap();
        p.end("d:2", 1, &Err(ProbeError::Unsupported("old".into())), t0);
        let later = t0 + PROBE_BACKOFF * 2;
        assert_eq!(p.begin("d:2", 1, later), None);
        assert!(p.begin("d:2", 2, later).is_some());
        // A refusal backs off.
        p.end("d:2", 2, &Err(ProbeError::Failed("lost".into())), later);
        assert_eq!(p.begin("d:2", 2, later + PROBE_GAP), None);
        assert!(p.begin("d:2", 2, later + PROBE_BACKOFF).is_some());
    }
}
