//! Async adapter from a byte stream (a QUIC stream) to [`protocol`](updraft_proto) frames.
//!
//! Kept apart from `protocol/` so the codec stays sans-IO.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};
use updraft_proto::{DecodeError, Frame};

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The peer sent bytes that are not a valid frame.
    #[error("peer misbehaved: {0}")]
    PeerMisbehaved(#[from] DecodeError),
    /// The stream ended inside a frame.
    #[error("stream ended in the middle of a frame")]
    Truncated,
    /// The transport failed.
    #[error("transport: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads frames from `R`, keeping bytes that arrive past a frame for the caller.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps a stream.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            buf: BytesMut::with_capacity(4096),
        }
    }

    /// The next frame, or `None` at a clean end of stream.
    pub async fn next(&mut self) -> Result<Option<Frame>, WireError> {
        loop {
            if let Some(frame) = Frame::decode(&mut self.buf)? {
                return Ok(Some(frame));
            }
            if self.buf.capacity() - self.buf.len() < 1024 {
                self.buf.reserve(8192);
            }
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(WireError::Truncated)
                };
            }
        }
    }

    /// The stream, to act on it (stop it) while frames are still read from it.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Takes out whatever was read past the last frame, leaving the stream to be read
    /// directly (raw bytes after a header frame).
    pub fn take_buffered(&mut self) -> Bytes {
        self.buf.split().freeze()
    }

    /// Gives back the stream and whatever was read past the last frame.
    pub fn into_parts(self) -> (R, Bytes) {
        (self.inner, self.buf.freeze())
    }
}

/// Task input read from a QUIC stream: the bytes already buffered past the request
/// header, then the rest of the stream until the sender finishes it.
#[derive(Debug)]
pub struct StreamInput {
    leftover: Option<Bytes>,
    recv: quinn::RecvStream,
}

impl StreamInput {
    /// Input made of `leftover` followed by `recv`.
    pub fn new(leftover: Bytes, recv: quinn::RecvStream) -> Self {
        Self {
            leftover: Some(leftover).filter(|b| !b.is_empty()),
            recv,
        }
    }

    /// Asks the sender to stop sending (the input is refused or no longer needed).
    pub fn stop(&mut self, code: u32) {
        let _ = self.recv.stop(quinn::VarInt::from_u32(code));
    }
}

impl crate::exec::Input for StreamInput {
    async fn next_chunk(&mut self) -> std::io::Result<Option<Bytes>> {
        if let Some(b) = self.leftover.take() {
            return Ok(Some(b));
        }
        match self
            .recv
            .read_chunk(updraft_proto::frame::DATA_CHUNK, true)
            .await
        {
            Ok(Some(chunk)) => Ok(Some(chunk.bytes)),
            Ok(None) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

/// Task output written to a QUIC stream as data frames.
#[derive(Debug)]
pub struct DataFrameOutput<'a> {
    send: &'a mut quinn::SendStream,
}

impl<'a> DataFrameOutput<'a> {
    /// Output to `send`.
    pub fn new(send: &'a mut quinn::SendStream) -> Self {
        Self { send }
    }
}

impl DataFrameOutput<'_> {
    /// Writes `head` (frames already encoded), then `chunk` as Data frames; `head` goes
    /// in the same write as the first of them, so both can leave in one packet.
    pub async fn write_after(
        &mut self,
        head: Option<Bytes>,
        mut chunk: Bytes,
    ) -> std::io::Result<()> {
        use updraft_proto::frame::DATA_CHUNK;
        use updraft_proto::FrameKind;
        let mut head = head;
        if chunk.is_empty() {
            if let Some(head) = head {
                self.send
                    .write_all_chunks(&mut [head])
                    .await
                    .map_err(std::io::Error::from)?;
            }
            return Ok(());
        }
        while !chunk.is_empty() {
            let part = chunk.split_to(chunk.len().min(DATA_CHUNK));
            let prelude =
                Bytes::copy_from_slice(&updraft_proto::Frame::prelude(FrameKind::Data, part.len()));
            let written = match head.take() {
                Some(head) => self.send.write_all_chunks(&mut [head, prelude, part]).await,
                None => self.send.write_all_chunks(&mut [prelude, part]).await,
            };
            written.map_err(std::io::Error::from)?;
        }
        Ok(())
    }
}

impl crate::exec::Output for DataFrameOutput<'_> {
    async fn write(&mut self, chunk: Bytes) -> std::io::Result<()> {
        self.write_after(None, chunk).await
    }
}

/// Writes one frame.
pub async fn write_frame(
    send: &mut quinn::SendStream,
    frame: &Frame,
) -> Result<(), quinn::WriteError> {
    send.write_all_chunks(&mut [frame.encoded()]).await
}
