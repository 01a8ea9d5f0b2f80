//! What the shared store holds of one task, and the decisions made on it: the claim
//! (a JSON value in the claims bucket), the work message a worker pulls, and the
//! headers of results messages. Pure code, tested without NATS.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use updraft_proto::Trailer;

/// Largest work header (task, arguments, key); the request header's own bounds keep
/// real ones far smaller.
pub(crate) const MAX_WORK_HEADER: usize = 64 << 10;
/// Results header: `out` (a chunk of output) or `end` (the attempt's result).
pub(crate) const KIND: &str = "Updraft-Kind";
/// Results header: byte offset of an output chunk within its attempt's output.
pub(crate) const OFFSET: &str = "Updraft-Offset";

/// A task id's claim in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Claim {
    /// The task the id was first used for.
    pub(crate) task: String,
    /// SHA-256 of its arguments: a retry must name the same.
    pub(crate) args: String,
    /// Which replica process wrote this value (its random nonce).
    pub(crate) by: String,
    /// Where the task stands.
    #[serde(flatten)]
    pub(crate) state: State,
}

/// Where a claimed task stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub(crate) enum State {
    /// Waiting for a worker; `runs` attempts were made before.
    Queued {
        /// Attempts started before this one was queued.
        runs: u32,
    },
    /// A worker holds it: attempt `attempt`, on replica `replica`.
    Running {
        /// 1 for the first run; each takeover adds one.
        attempt: u32,
        /// The server id of the replica running it.
        replica: u8,
        /// The work message's delivery count when it was taken: an older delivery
        /// (one a paused replica still held) may not take it over.
        delivery: u64,
    },
    /// Its result is recorded.
    Finished {
        /// The attempt whose output and trailer are the result.
        attempt: u32,
        /// The output is whole in the results stream and within `[dedup]
        /// max_result`, so a retry gets it; otherwise a retry runs the task again.
        kept: bool,
        /// How the run ended.
        trailer: Trailer,
    },
}

/// SHA-256 of a task's arguments, each with its length, so `["a b"]` and `["a", "b"]`
/// differ.
pub(crate) fn args_digest(args: &[String]) -> String {
    let mut h = Sha256::new();
    for a in args {
        h.update((a.len() as u64).to_be_bytes());
        h.update(a.as_bytes());
    }
    hex::encode(h.finalize())
}

impl Claim {
    /// The value written to the bucket.
    pub(crate) fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("a claim always serializes"))
    }

    /// A value read from the bucket.
    pub(crate) fn decode(value: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(value)
    }

    /// Whether this claim is for the same request (task and arguments).
    pub(crate) fn same_request(&self, task: &str, args: &str) -> bool {
        self.task == task && self.args == args
    }

    /// The attempt a reader of this claim's results should start from: earlier
    /// attempts were superseded or their result was not kept.
    pub(crate) fn first_attempt(&self) -> u32 {
        match self.state {
            State::Queued { runs } => runs + 1,
            State::Running { attempt, .. } | State::Finished { attempt, .. } => attempt,
        }
    }
}

/// What a worker does with a work message, given the claim it finds.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Take {
    /// Run it as attempt `attempt`, replacing the claim (compare-and-set).
    Run(Claim),
    /// Nothing to run: the result is recorded, or the claim is gone (expired or
    /// forgotten). Acknowledge the message.
    Drop,
    /// A delivery older than the one whose worker holds the task: a replica that was
    /// paused is catching up. Leave the message alone.
    Stale,
}

/// What a worker on replica `replica` (process `by`) does with a delivered work
/// message whose claim is `claim`. A claim still `running` means the worker holding
/// it stopped answering (the message came back after its ack deadline), so this
/// worker takes over with the next attempt; the old worker's late result then fails
/// its compare-and-set and is dropped.
pub(crate) fn take(claim: Option<&Claim>, replica: u8, by: &str, delivery: u64) -> Take {
    let Some(claim) = claim else {
        return Take::Drop;
    };
    let attempt = match claim.state {
        State::Queued { runs } => runs + 1,
        State::Running {
            delivery: holder, ..
        } if delivery <= holder => return Take::Stale,
        State::Running { attempt, .. } => attempt + 1,
        State::Finished { .. } => return Take::Drop,
    };
    Take::Run(Claim {
        by: by.to_string(),
        state: State::Running {
            attempt,
            replica,
            delivery,
        },
        ..claim.clone()
    })
}

/// The request a work message carries besides its input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct WorkHeader {
    /// The claim's key (`AGENT.ID`).
    pub(crate) key: String,
    /// The agent that sent the task (from its certificate).
    pub(crate) agent: String,
    /// The agent's task id.
    pub(crate) id: String,
    /// Catalog name.
    pub(crate) task: String,
    /// Extra arguments.
    pub(crate) args: Vec<String>,
}

/// A work message: its header, then the task's whole input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Work {
    pub(crate) header: WorkHeader,
    pub(crate) input: Bytes,
}

/// Why a work message could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum WorkError {
    /// Shorter than its length prefix says.
    #[error("work message is truncated")]
    Truncated,
    /// The header is over [`MAX_WORK_HEADER`].
    #[error("work header of {0} bytes is over the {MAX_WORK_HEADER}-byte limit")]
    HeaderTooLarge(usize),
    /// The header is not the JSON expected.
    #[error("work header does not decode: {0}")]
    Header(String),
}

impl Work {
    /// The message body: a 4-byte big-endian header length, the JSON header, the input.
    pub(crate) fn encode(header: &WorkHeader, input: &[Bytes]) -> Bytes {
        let json = serde_json::to_vec(header).expect("a work header always serializes");
        let len: usize = input.iter().map(Bytes::len).sum();
        let mut out = BytesMut::with_capacity(4 + json.len() + len);
        out.put_u32(json.len() as u32);
        out.put_slice(&json);
        for chunk in input {
            out.put_slice(chunk);
        }
        out.freeze()
    }

    /// Reads a message body; every length is checked before use.
    pub(crate) fn decode(mut body: Bytes) -> Result<Self, WorkError> {
        if body.len() < 4 {
            return Err(WorkError::Truncated);
        }
        let len = body.get_u32() as usize;
        if len > MAX_WORK_HEADER {
            return Err(WorkError::HeaderTooLarge(len));
        }
        if body.len() < len {
            return Err(WorkError::Truncated);
        }
        let json = body.split_to(len);
        let header = serde_json::from_slice(&json).map_err(|e| WorkError::Header(e.to_string()))?;
        Ok(Self {
            header,
            input: body,
        })
    }
}

/// The attempt a results subject (`NAME.out.AGENT.ID.ATTEMPT`) names.
pub(crate) fn attempt_of(subject: &str) -> Option<u32> {
    subject.rsplit('.').next()?.parse().ok()
}

/// The body of an `end` message: the attempt's recorded result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct End {
    /// Whether a retry may be answered with this output.
    pub(crate) kept: bool,
    /// How the run ended.
    pub(crate) trailer: Trailer,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(state: State) -> Claim {
        Claim {
            task: "echo".into(),
            args: args_digest(&[]),
            by: "front".into(),
            state,
        }
    }

    #[test]
    fn a_claim_round_trips_and_names_its_state() {
        let c = claim(State::Finished {
            attempt: 2,
            kept: true,
            trailer: Trailer {
                exit_code: Some(0),
                output_bytes: 5,
                ..Default::default()
            },
        });
        let bytes = c.encode();
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(text.contains("\"state\":\"finished\""), "{text}");
        assert_eq!(Claim::decode(&bytes).unwrap(), c);
        assert!(Claim::decode(b"{\"task\":1}").is_err());
    }

    #[test]
    fn arguments_are_compared_by_digest_with_their_boundaries() {
        assert_ne!(
            args_digest(&["a b".into()]),
            args_digest(&["a".into(), "b".into()])
        );
        let c = claim(State::Queued { runs: 0 });
        assert!(c.same_request("echo", &args_digest(&[])));
        assert!(!c.same_request("sha", &args_digest(&[])));
        assert!(!c.same_request("echo", &args_digest(&["x".into()])));
    }

    #[test]
    fn a_worker_runs_queued_work_and_takes_over_a_silent_run() {
        match take(Some(&claim(State::Queued { runs: 0 })), 2, "w", 1) {
            Take::Run(c) => {
                assert_eq!(
                    c.state,
                    State::Running {
                        attempt: 1,
                        replica: 2,
                        delivery: 1
                    }
                );
                assert_eq!(c.by, "w");
                assert_eq!(c.task, "echo");
            }
            other => panic!("queued work is run, not {other:?}"),
        }
        // Redelivered while a worker holds it: that worker went silent.
        let running = claim(State::Running {
            attempt: 1,
            replica: 0,
            delivery: 1,
        });
        match take(Some(&running), 1, "w2", 2) {
            Take::Run(c) => assert_eq!(
                c.state,
                State::Running {
                    attempt: 2,
                    replica: 1,
                    delivery: 2
                }
            ),
            other => panic!("a silent run is taken over, not {other:?}"),
        }
        // A replica that was paused with an older delivery in hand takes nothing.
        let taken_over = claim(State::Running {
            attempt: 2,
            replica: 1,
            delivery: 2,
        });
        assert_eq!(take(Some(&taken_over), 0, "w", 2), Take::Stale);
        assert_eq!(take(Some(&taken_over), 0, "w", 1), Take::Stale);
        let finished = claim(State::Finished {
            attempt: 1,
            kept: true,
            trailer: Trailer::default(),
        });
        assert_eq!(take(Some(&finished), 1, "w", 3), Take::Drop);
        assert_eq!(take(None, 1, "w", 1), Take::Drop);
    }

    #[test]
    fn readers_start_at_the_attempt_that_can_still_finish() {
        assert_eq!(claim(State::Queued { runs: 0 }).first_attempt(), 1);
        assert_eq!(claim(State::Queued { runs: 3 }).first_attempt(), 4);
        let running = State::Running {
            attempt: 2,
            replica: 0,
            delivery: 2,
        };
        assert_eq!(claim(running).first_attempt(), 2);
    }

    #[test]
    fn work_round_trips_and_bad_bodies_are_refused() {
        let header = WorkHeader {
            key: "board-1.t1".into(),
            agent: "board-1".into(),
            id: "t1".into(),
            task: "echo".into(),
            args: vec!["-n".into()],
        };
        let body = Work::encode(
            &header,
            &[Bytes::from_static(b"he"), Bytes::from_static(b"llo")],
        );
        let work = Work::decode(body.clone()).unwrap();
        assert_eq!(work.header, header);
        assert_eq!(work.input.as_ref(), b"hello");
        assert_eq!(
            Work::decode(body.slice(..10)).unwrap_err(),
            WorkError::Truncated
        );
        assert_eq!(
            Work::decode(Bytes::from_static(b"\0\0")).unwrap_err(),
            WorkError::Truncated
        );
        let mut huge = BytesMut::new();
        huge.put_u32(u32::MAX);
        assert_eq!(
            Work::decode(huge.freeze()).unwrap_err(),
            WorkError::HeaderTooLarge(u32::MAX as usize)
        );
        let mut bad = BytesMut::new();
        bad.put_u32(2);
        bad.put_slice(b"{}");
        assert!(matches!(
            Work::decode(bad.freeze()).unwrap_err(),
            WorkError::Header(_)
        ));
    }

    #[test]
    fn the_attempt_is_the_subjects_last_token() {
        assert_eq!(attempt_of("updraft.out.board.1.t1.3"), Some(3));
        assert_eq!(attempt_of("updraft.out.board.t1.x"), None);
    }
}
