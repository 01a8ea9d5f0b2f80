//! The reply side of a task stream. `accepted` goes once. Once a task has taken its
//! place, `accepted` is held back until the task first has to wait (for its input, a
//! slot or its program) or has something to send, and then goes in the same write as
//! the first Data frame or the Trailer: a task that finishes at once is answered in one
//! packet, not two.

use bytes::Bytes;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::Poll;
use updraft_proto::{ReplyHeader, Trailer};
use updraft_shared::wire::DataFrameOutput;

/// How far the `accepted` answer has got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Accepted {
    /// Not accepted (yet): a refusal is a `rejected` reply.
    No,
    /// Accepted; the answer goes with the next write, or before the task waits.
    Owed,
    /// Sent.
    Sent,
}

/// A task stream's send side and whether `accepted` went.
pub(crate) struct Reply {
    send: quinn::SendStream,
    accepted: Accepted,
}

impl Reply {
    /// The reply side of a stream nothing was sent on yet.
    pub(crate) fn new(send: quinn::SendStream) -> Self {
        Self {
            send,
            accepted: Accepted::No,
        }
    }

    /// The stream itself, for a `rejected` reply.
    pub(crate) fn stream(&mut self) -> &mut quinn::SendStream {
        &mut self.send
    }

    /// The task was accepted (the answer sent or owed): a refusal can then only travel
    /// in a trailer.
    pub(crate) fn is_accepted(&self) -> bool {
        self.accepted != Accepted::No
    }

    /// Notes that the task took its place: `accepted` is owed, and goes with the next
    /// write or when the task first waits ([`Reply::accept`]).
    pub(crate) fn owe(&mut self) {
        if self.accepted == Accepted::No {
            self.accepted = Accepted::Owed;
        }
    }

    /// Sends `accepted` unless it went already; false when the agent is gone.
    pub(crate) async fn accept(&mut self) -> bool {
        if self.accepted == Accepted::Sent {
            return true;
        }
        self.accepted = Accepted::Sent;
        let mut accepted = [ReplyHeader::Accepted.encoded()];
        self.send.write_all_chunks(&mut accepted).await.is_ok()
    }

    /// The `accepted` frame when it is owed, marked sent: the caller writes it first.
    fn take_owed(&mut self) -> Option<Bytes> {
        if self.accepted != Accepted::Owed {
            return None;
        }
        self.accepted = Accepted::Sent;
        Some(ReplyHeader::Accepted.encoded())
    }

    /// Writes `chunk` as Data frames, after an owed `accepted` in the same write.
    pub(crate) async fn write_data(&mut self, chunk: Bytes) -> io::Result<()> {
        let head = self.take_owed();
        DataFrameOutput::new(&mut self.send)
            .write_after(head, chunk)
            .await
    }

    /// Sends the trailer (after an owed `accepted`, in the same write) and finishes the
    /// stream.
    pub(crate) async fn end(&mut self, trailer: &Trailer) {
        let trailer = trailer.encoded();
        let written = match self.take_owed() {
            Some(head) => self.send.write_all_chunks(&mut [head, trailer]).await,
            None => self.send.write_all_chunks(&mut [trailer]).await,
        };
        if written.is_ok() {
            let _ = self.send.finish();
            // Keep the stream until the agent has everything: dropping it early could
            // cut the trailer off when the connection closes during drain.
            let _ = self.send.stopped().await;
        }
    }

    /// Lends the reply to a run: its output writes and the watch that sends an owed
    /// `accepted` when the run first waits share it.
    pub(crate) fn running(&mut self) -> Running<'_> {
        Running(tokio::sync::Mutex::new(self))
    }
}

/// A [`Reply`] while the task runs. The run's output and [`Running::accepting`] are
/// polled by one task, never at once, so the lock only orders them: a run waiting in
/// a write holds it, and that write carried any owed `accepted`.
pub(crate) struct Running<'s>(tokio::sync::Mutex<&'s mut Reply>);

impl Running<'_> {
    /// Writes output as Data frames (see [`Reply::write_data`]).
    pub(crate) async fn write_data(&self, chunk: Bytes) -> io::Result<()> {
        self.0.lock().await.write_data(chunk).await
    }

    /// Runs `fut` to its end; the first time it has to wait, an owed `accepted` goes
    /// out, so the agent hears it within its accept timeout however long the run is
    /// silent. A lost agent is left for the run's writes to find.
    pub(crate) async fn accepting<F: Future>(&self, mut fut: Pin<&mut F>) -> F::Output {
        if let Some(out) = ready_now(&mut fut).await {
            return out;
        }
        if let Ok(mut reply) = self.0.try_lock() {
            reply.accept().await;
        }
        fut.await
    }
}

/// `fut`'s output if it is ready at once. It is polled with the caller's waker, so
/// when it is not ready the caller may go on to await it.
pub(crate) async fn ready_now<F: Future + Unpin>(fut: &mut F) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        Poll::Ready(match Pin::new(&mut *fut).poll(cx) {
            Poll::Ready(out) => Some(out),
            Poll::Pending => None,
        })
    })
    .await
}
