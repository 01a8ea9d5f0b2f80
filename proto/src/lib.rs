//! Updraft's pure core: the wire protocol (frames in [`frame`], the messages they carry in
//! [`msg`]; the fleet stream's in [`fleet`]), task names ([`name`]), the placement policy and cost model ([`policy`]), the
//! link probe's budget and timing ([`probe`]), and config units ([`units`]).
//!
//! Nothing here touches a socket, a file or the clock: callers pass bytes, text, signal
//! snapshots and `now`, so every decision can be replayed in a test. The crate depends on
//! no async runtime, and Cargo keeps it that way. `docs/PROTOCOL.md` is the prose version
//! of [`frame`] and [`msg`] and the two must agree.
#![forbid(unsafe_code)]

pub mod fleet;
pub mod frame;
pub mod msg;
pub mod name;
pub mod policy;
pub mod probe;
pub mod spec;
pub mod units;

pub use frame::{DecodeError, Frame, FrameKind};
pub use msg::{
    CertReply, CertRequest, ErrorCode, LoadReport, ProbeReply, ProbeRequest, ReplyHeader,
    RequestHeader, Timings, Trailer, MAX_PROBE_BYTES,
};

/// ALPN protocol name both sides must offer.
pub const ALPN: &[u8] = b"updraft/1";
/// ALPN of an enrollment connection: the agent has no certificate yet, proves itself
/// with a one-time token, and may do nothing but ask for a certificate.
pub const ENROLL_ALPN: &[u8] = b"updraft-enroll/1";

/// QUIC application close code: normal close.
pub const CLOSE_OK: u32 = 0;
/// QUIC application close code: the daemon is draining; go elsewhere.
pub const CLOSE_DRAINING: u32 = 1;
/// QUIC application close code: the peer broke the protocol.
pub const CLOSE_PROTOCOL: u32 = 2;
/// QUIC application close code: an operator revoked this agent (`updraftd agent
/// revoke`); its certificate is refused from now on.
pub const CLOSE_REVOKED: u32 = 3;

/// QUIC stream code with STOP_SENDING: the daemon refuses (the rest of) the input.
pub const STOP_INPUT: u32 = 1;
/// QUIC stream code with RESET_STREAM: the agent abandons the task (its input failed,
/// or it gave up waiting for the daemon to accept).
pub const RESET_ABANDONED: u32 = 0;
/// QUIC stream code with RESET_STREAM on the agent's input: the task's submitter
/// cancelled it (went away); sent together with [`STOP_CANCELLED`].
pub const RESET_CANCELLED: u32 = 2;
/// QUIC stream code with STOP_SENDING on the daemon's direction: the task's submitter
/// cancelled it. The daemon kills the run unless a retry of the same id waits for it.
pub const STOP_CANCELLED: u32 = 2;
