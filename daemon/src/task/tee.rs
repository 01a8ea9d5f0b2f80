//! A task's input and output as the run sees them: the held start of the input, the
//! input that notes when it arrived whole, and the output teed to the agent and, for a
//! remembered run, into the record a retry gets.

use super::reply::Running;
use super::runs_on;
use crate::recent::Claim;
use bytes::Bytes;
use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use updraft_shared::exec::{ExecError, Input, Output};
use updraft_shared::wire::StreamInput;

/// The start of a task's input, received before the task runs.
#[derive(Default)]
pub(crate) struct HeldInput {
    chunks: VecDeque<Bytes>,
    /// Bytes held.
    pub(crate) len: u64,
    /// The stream ended within the held part: nothing more to read.
    whole: bool,
}

impl HeldInput {
    /// Reads from `input` until it ends or more than `limit` bytes are held; with a
    /// `limit` of 0, reads nothing. Fails with `TooLarge` as soon as more than
    /// `max_input` bytes arrived, and with `Input` when the stream does (the agent
    /// reset it or went away).
    pub(crate) async fn receive(
        input: &mut StreamInput,
        limit: u64,
        max_input: u64,
    ) -> Result<Self, ExecError> {
        let mut held = Self::default();
        while limit > 0 && held.len <= limit {
            match input.next_chunk().await.map_err(ExecError::Input)? {
                Some(chunk) => {
                    held.len += chunk.len() as u64;
                    if held.len > max_input {
                        return Err(ExecError::TooLarge { limit: max_input });
                    }
                    held.chunks.push_back(chunk);
                }
                None => {
                    held.whole = true;
                    break;
                }
            }
        }
        Ok(held)
    }

    /// Whether the whole input is held (it ended within the limit).
    pub(crate) fn is_whole(&self) -> bool {
        self.whole
    }

    /// The held chunks, in order.
    pub(crate) fn chunks(&self) -> Vec<bytes::Bytes> {
        self.chunks.iter().cloned().collect()
    }
}

/// Task input that notes when it was received whole (the agent finished sending):
/// the held part first, then the rest of the stream.
pub(crate) struct WatchedInput<'a> {
    /// The part received before the run.
    pub(crate) held: HeldInput,
    /// The stream the rest comes from.
    pub(crate) inner: &'a mut StreamInput,
    /// Set once the input ended.
    pub(crate) whole: &'a AtomicBool,
}

impl Input for WatchedInput<'_> {
    async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        if let Some(chunk) = self.held.chunks.pop_front() {
            return Ok(Some(chunk));
        }
        let chunk = if self.held.whole {
            None
        } else {
            self.inner.next_chunk().await?
        };
        if chunk.is_none() {
            self.whole.store(true, Ordering::Release);
        }
        Ok(chunk)
    }
}

/// What the first run keeps of its output for retries.
enum Keep {
    /// Not remembered: the stream is the only consumer, as before retries existed.
    Off,
    /// Everything so far, within `max_result`.
    On(Vec<u8>),
    /// The output went over `max_result`; nothing is kept.
    Over,
}

/// Task output streamed to the agent with its back-pressure and, for a remembered
/// run, copied into the record (up to `max_result`). If the agent's connection is
/// lost after its whole input arrived, the run goes on into the record alone, so a
/// retry can collect it; it stops (as a failed delivery) once that record cannot
/// be kept.
pub(crate) struct TeeOutput<'a, 's> {
    stream: &'a Running<'s>,
    /// The run's claim on its id, when it is remembered.
    claim: Option<&'a Claim>,
    /// The connection is gone; output goes to the record only.
    lost: bool,
    keep: Keep,
    max_result: u64,
    /// Output bytes the task wrote.
    produced: u64,
    input_whole: &'a AtomicBool,
}

/// What a [`TeeOutput`] ends with.
pub(crate) struct Teed {
    /// The whole output, when it was kept.
    pub(crate) record: Option<Vec<u8>>,
    /// Output bytes the task wrote.
    pub(crate) produced: u64,
    /// The agent's connection was lost during the run.
    pub(crate) lost: bool,
}

impl<'a, 's> TeeOutput<'a, 's> {
    /// Output to `stream`, recording up to `max_result` bytes when the run is remembered.
    pub(crate) fn new(
        stream: &'a Running<'s>,
        claim: Option<&'a Claim>,
        input_whole: &'a AtomicBool,
    ) -> Self {
        let max_result = claim.map(Claim::max_result);
        Self {
            stream,
            claim,
            lost: false,
            keep: if max_result.is_some() {
                Keep::On(Vec::new())
            } else {
                Keep::Off
            },
            max_result: max_result.unwrap_or(0),
            produced: 0,
            input_whole,
        }
    }

    /// What the run left: the record, when kept, and what became of the agent.
    pub(crate) fn finish(self) -> Teed {
        Teed {
            record: match self.keep {
                Keep::On(v) => Some(v),
                Keep::Off | Keep::Over => None,
            },
            produced: self.produced,
            lost: self.lost,
        }
    }
}

/// Why a stream write failed, when the agent is gone: `Some(None)` the connection was
/// lost, `Some(Some(code))` the agent stopped reading (STOP_SENDING with `code`).
fn agent_gone(e: &io::Error) -> Option<Option<u64>> {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<quinn::WriteError>())
    {
        Some(quinn::WriteError::ConnectionLost(_)) => Some(None),
        Some(quinn::WriteError::Stopped(code)) => Some(Some(code.into_inner())),
        _ => None,
    }
}

impl Output for TeeOutput<'_, '_> {
    async fn write(&mut self, chunk: Bytes) -> io::Result<()> {
        self.produced += chunk.len() as u64;
        if let Keep::On(buf) = &mut self.keep {
            if (buf.len() + chunk.len()) as u64 > self.max_result {
                self.keep = Keep::Over;
            } else {
                buf.extend_from_slice(&chunk);
            }
        }
        if !self.lost {
            let Err(e) = self.stream.write_data(chunk).await else {
                return Ok(());
            };
            let recording = matches!(self.keep, Keep::On(_));
            let whole = self.input_whole.load(Ordering::Acquire);
            match agent_gone(&e) {
                Some(stop) if recording && runs_on(self.claim, whole, stop) => {}
                _ => return Err(e),
            }
            self.lost = true;
            return Ok(());
        }
        match self.keep {
            Keep::On(_) => Ok(()),
            Keep::Off | Keep::Over => Err(io::Error::other(format!(
                "the agent went away and the output is over [dedup] max_result of {} bytes, so no retry could collect it; the task was stopped",
                self.max_result
            ))),
        }
    }
}
