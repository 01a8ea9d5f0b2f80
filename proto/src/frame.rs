//! Frame codec: `kind: u8 | length: u32 big-endian | payload[length]`.
//!
//! The decoder returns `Ok(None)` until a whole frame is buffered, and checks the
//! announced length against the kind's cap *before* the payload is awaited or
//! allocated, so a peer cannot make us reserve memory by lying about a length.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Bytes of the frame prelude: one kind byte and a four-byte length.
pub const PRELUDE_LEN: usize = 5;

/// Cap on a JSON header frame (request, reply, trailer, load report). Headers carry a
/// task name, a bounded list of arguments and a stderr tail; 64 KiB is far above any
/// legitimate header and small enough that a hostile peer cannot hurt a board with it.
pub const MAX_HEADER_LEN: u32 = 64 * 1024;

/// Cap on one output data frame. Senders use [`DATA_CHUNK`]; receivers accept up to
/// 1 MiB so that a peer with a larger write size still interoperates.
pub const MAX_DATA_LEN: u32 = 1024 * 1024;
/// Maximum FleetNotice payload: a pushed policy of [`crate::fleet::MAX_POLICY_LEN`]
/// bytes, every byte escaped as JSON's longest escape (`\u0000`), and room to spare.
pub const MAX_NOTICE_LEN: u32 = 400 * 1024;

/// The data frame size senders should use: large enough to amortise the prelude,
/// small enough to keep per-task buffering low on small boards.
pub const DATA_CHUNK: usize = 64 * 1024;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// Agent → daemon, first frame of a task stream: JSON [`super::RequestHeader`].
    Request = 1,
    /// Daemon → agent, first frame of the reply: JSON [`super::ReplyHeader`].
    Reply = 2,
    /// Daemon → agent: a chunk of task output (raw bytes).
    Data = 3,
    /// Daemon → agent, last frame of the reply: JSON [`super::Trailer`].
    Trailer = 4,
    /// Daemon → agent on the load stream: JSON [`super::LoadReport`].
    Load = 5,
    /// Agent → daemon, first frame of an enrollment or renewal stream: JSON
    /// [`super::CertRequest`].
    CertRequest = 6,
    /// Daemon → agent, the answer to a [`FrameKind::CertRequest`]: JSON [`super::CertReply`].
    CertReply = 7,
    /// Agent → daemon, first frame of a link probe stream: JSON [`super::ProbeRequest`];
    /// the upload payload follows as raw stream bytes.
    Probe = 8,
    /// Daemon → agent, the answer to a [`FrameKind::Probe`]: JSON [`super::ProbeReply`];
    /// the download payload follows as raw stream bytes.
    ProbeReply = 9,
    /// Agent → daemon, every frame of the fleet stream: JSON [`crate::fleet::AgentReport`].
    AgentReport = 10,
    /// Daemon → agent on the fleet stream: JSON [`crate::fleet::FleetNotice`].
    FleetNotice = 11,
}

impl FrameKind {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Request,
            2 => Self::Reply,
            3 => Self::Data,
            4 => Self::Trailer,
            5 => Self::Load,
            6 => Self::CertRequest,
            7 => Self::CertReply,
            8 => Self::Probe,
            9 => Self::ProbeReply,
            10 => Self::AgentReport,
            11 => Self::FleetNotice,
            _ => return None,
        })
    }

    /// The largest payload this kind may announce.
    pub fn max_len(self) -> u32 {
        match self {
            Self::Data => MAX_DATA_LEN,
            Self::FleetNotice => MAX_NOTICE_LEN,
            _ => MAX_HEADER_LEN,
        }
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What the payload is.
    pub kind: FrameKind,
    /// The payload, exactly `length` bytes.
    pub payload: Bytes,
}

/// Why a byte sequence is not a valid frame. Every variant means the peer misbehaved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The kind byte is not one this version knows.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// The announced length is over the cap for its kind; nothing was allocated.
    #[error("{kind:?} frame announces {len} bytes, over the {max}-byte limit")]
    TooLong {
        /// The frame's kind.
        kind: FrameKind,
        /// The length the peer announced.
        len: u32,
        /// The cap for that kind.
        max: u32,
    },
    /// A header frame's JSON did not parse as the expected message.
    #[error("malformed {what}: {reason}")]
    BadMessage {
        /// Which message was expected.
        what: &'static str,
        /// The parser's complaint.
        reason: String,
    },
    /// A request header decoded but breaks one of the protocol's rules for its fields.
    #[error("{0}")]
    InvalidHeader(#[from] crate::msg::HeaderError),
    /// A frame of the wrong kind arrived for this point of the exchange.
    #[error("expected a {expected} frame, got {got:?}")]
    Unexpected {
        /// What the exchange called for.
        expected: &'static str,
        /// What came.
        got: FrameKind,
    },
}

impl Frame {
    /// A frame of `kind` with `payload`.
    pub fn new(kind: FrameKind, payload: impl Into<Bytes>) -> Self {
        Self {
            kind,
            payload: payload.into(),
        }
    }

    /// Tries to take one frame off the front of `buf`.
    ///
    /// `Ok(None)` means more bytes are needed; `buf` is then left untouched apart from
    /// a reservation bounded by the kind's cap.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        if buf.len() < PRELUDE_LEN {
            return Ok(None);
        }
        let kind = FrameKind::from_u8(buf[0]).ok_or(DecodeError::UnknownKind(buf[0]))?;
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
        if len > kind.max_len() {
            return Err(DecodeError::TooLong {
                kind,
                len,
                max: kind.max_len(),
            });
        }
        let total = PRELUDE_LEN + len as usize;
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        buf.advance(PRELUDE_LEN);
        let payload = buf.split_to(len as usize).freeze();
        Ok(Some(Frame { kind, payload }))
    }

    /// The frame as it goes on the wire, in one buffer.
    pub fn encoded(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(PRELUDE_LEN + self.payload.len());
        self.encode(&mut out);
        out.freeze()
    }

    /// Appends this frame's encoding to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        debug_assert!(self.payload.len() <= self.kind.max_len() as usize);
        out.reserve(PRELUDE_LEN + self.payload.len());
        out.put_u8(self.kind as u8);
        out.put_u32(self.payload.len() as u32);
        out.put_slice(&self.payload);
    }

    /// The prelude alone, for writing a data payload without copying it.
    pub fn prelude(kind: FrameKind, len: usize) -> [u8; PRELUDE_LEN] {
        let l = (len as u32).to_be_bytes();
        [kind as u8, l[0], l[1], l[2], l[3]]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_partial() {
        let mut out = BytesMut::new();
        Frame::new(FrameKind::Data, &b"hello"[..]).encode(&mut out);
        Frame::new(FrameKind::Trailer, &b"{}"[..]).encode(&mut out);
        let whole = out.clone();
        // Feed one byte at a time: no frame until complete, then exactly the frames.
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in whole.iter() {
            buf.put_u8(*b);
            while let Some(f) = Frame::decode(&mut buf).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].payload, &b"hello"[..]);
        assert_eq!(got[1].kind, FrameKind::Trailer);
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_is_refused_before_payload_arrives() {
        let mut buf = BytesMut::from(&[1u8, 0xff, 0xff, 0xff, 0xff][..]);
        let err = Frame::decode(&mut buf).unwrap_err();
        assert!(matches!(
            err,
            DecodeError::TooLong {
                kind: FrameKind::Request,
                ..
            }
        ));
        // Nothing was reserved for the announced 4 GiB.
        assert!(buf.capacity() < 1024);
    }

    #[test]
    fn header_cap_is_tighter_than_data_cap() {
        let mut buf = BytesMut::new();
        buf.put_u8(FrameKind::Reply as u8);
        buf.put_u32(MAX_HEADER_LEN + 1);
        assert!(Frame::decode(&mut buf).is_err());
        let mut buf = BytesMut::new();
        buf.put_u8(FrameKind::Data as u8);
        buf.put_u32(MAX_HEADER_LEN + 1);
        assert_eq!(Frame::decode(&mut buf).unwrap(), None);
    }

    #[test]
    fn unknown_kind() {
        let mut buf = BytesMut::from(&[12u8, 0, 0, 0, 0][..]);
        assert_eq!(Frame::decode(&mut buf), Err(DecodeError::UnknownKind(12)));
    }
}
