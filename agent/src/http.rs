//! HTTP plumbing shared by the API server and the client: bodies fed from a channel,
//! request bodies as task input, small helpers for queries and header values.

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::mpsc;
use updraft_proto::ErrorCode;
use updraft_shared::exec::Input;

/// Header: the task id.
pub const H_TASK_ID: &str = "updraft-task-id";
/// Header: `local` or `cloud`.
pub const H_PLACEMENT: &str = "updraft-placement";
/// Header: why it ran there.
pub const H_REASON: &str = "updraft-reason";
/// Header: the task's exit code.
pub const H_EXIT_CODE: &str = "updraft-exit-code";
/// Header: the task's stderr tail, as a JSON string literal (ASCII-escaped).
pub const H_STDERR_TAIL: &str = "updraft-stderr-tail";
/// Header on error replies: the error code.
pub const H_ERROR_CODE: &str = "updraft-error-code";
/// Longest request head (request line and headers) accepted; hyper refuses a longer
/// one with 431, which [`ApiIo`] turns into the JSON error every other refusal carries.
pub(crate) const MAX_HEAD_BYTES: usize = 32 << 10;
/// Most headers in one request: curl and HTTP libraries send under a dozen.
pub(crate) const MAX_HEADERS: usize = 64;

/// Chunks in flight between a producer task and the HTTP body: enough to keep the
/// socket busy, few enough to bound memory (4 × 64 KiB).
const BODY_CHANNEL: usize = 4;

/// A body whose chunks come from a channel, the producer running as its own task, or
/// from memory when they are all there already.
#[derive(Debug)]
pub struct ChannelBody {
    chunks: Chunks,
    len: Option<u64>,
}

/// Where a [`ChannelBody`]'s chunks come from.
#[derive(Debug)]
enum Chunks {
    /// A producer task, through a bounded channel.
    Channel(mpsc::Receiver<std::io::Result<Bytes>>),
    /// Memory: the whole body, with no task or channel between it and the socket.
    Ready(std::collections::VecDeque<Bytes>),
}

impl ChannelBody {
    /// A body of `len` bytes (if known) and the sender that feeds it.
    pub fn new(len: Option<u64>) -> (mpsc::Sender<std::io::Result<Bytes>>, Self) {
        let (tx, rx) = mpsc::channel(BODY_CHANNEL);
        let body = Self {
            chunks: Chunks::Channel(rx),
            len,
        };
        (tx, body)
    }

    /// A body made of `chunks`, all in memory.
    pub fn from_chunks(chunks: impl IntoIterator<Item = Bytes>) -> Self {
        let chunks: std::collections::VecDeque<Bytes> =
            chunks.into_iter().filter(|c| !c.is_empty()).collect();
        let len = chunks.iter().map(|c| c.len() as u64).sum();
        Self {
            chunks: Chunks::Ready(chunks),
            len: Some(len),
        }
    }

    /// A body that streams everything `input` yields.
    pub fn from_input<I: Input + 'static>(mut input: I, len: Option<u64>) -> Self {
        let (tx, body) = Self::new(len);
        tokio::spawn(async move {
            loop {
                match input.next_chunk().await {
                    Ok(Some(c)) => {
                        if tx.send(Ok(c)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            }
        });
        body
    }

    /// A body holding `bytes`.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        Self::from_chunks([bytes.into()])
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match &mut self.chunks {
            Chunks::Channel(rx) => rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data))),
            Chunks::Ready(chunks) => Poll::Ready(chunks.pop_front().map(|c| Ok(Frame::data(c)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(&self.chunks, Chunks::Ready(chunks) if chunks.is_empty())
    }

    fn size_hint(&self) -> SizeHint {
        self.len
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

/// A request or response body read as task input.
#[derive(Debug)]
pub(crate) struct BodyInput(pub Incoming);

impl Input for BodyInput {
    async fn next_chunk(&mut self) -> std::io::Result<Option<Bytes>> {
        loop {
            match self.0.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(std::io::Error::other(e)),
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        if !data.is_empty() {
                            return Ok(Some(data));
                        }
                    }
                }
            }
        }
    }
}

/// A request body read as task input, with the API's limits: a pause longer than
/// `stall` between two pieces of it is an error, and the first error (a stall or a
/// malformed chunked encoding) is kept in `failed`, so the API can answer
/// `400 bad_request` whatever the task or the daemon made of the cut input.
#[derive(Debug)]
pub(crate) struct RequestBody {
    body: Incoming,
    stall: std::time::Duration,
    /// The first error reading the body.
    pub failed: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

impl RequestBody {
    /// `body`, failing after a pause of `stall`.
    pub(crate) fn new(body: Incoming, stall: std::time::Duration) -> Self {
        Self {
            body,
            stall,
            failed: Default::default(),
        }
    }

    fn fail(&self, why: String) -> std::io::Error {
        let mut f = self.failed.lock().expect("body error lock");
        f.get_or_insert_with(|| why.clone());
        std::io::Error::new(std::io::ErrorKind::InvalidData, why)
    }
}

impl Input for RequestBody {
    async fn next_chunk(&mut self) -> std::io::Result<Option<Bytes>> {
        loop {
            let frame = match tokio::time::timeout(self.stall, self.body.frame()).await {
                Err(_) => {
                    return Err(self.fail(format!(
                    "the request body stalled: nothing arrived for {:?} ([api] body_stall_timeout)",
                    self.stall
                )))
                }
                Ok(f) => f,
            };
            match frame {
                None => return Ok(None),
                Some(Err(e)) => {
                    return Err(self.fail(format!("the request body is malformed: {e}")))
                }
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        if !data.is_empty() {
                            return Ok(Some(data));
                        }
                    }
                }
            }
        }
    }
}

/// The API socket as hyper sees it, with two guards:
///
/// - a write that makes no progress for `stall` (a client that stopped reading its
///   reply) fails, so the connection and its slot are freed;
/// - hyper's own replies to a request it cannot parse (400, 414 URI too long, 431
///   headers too large: a bare head, `content-length: 0`, no body) are replaced by the
///   API's JSON error with an `Updraft-Error-Code` header, like every other refusal.
///   Hyper writes one only before any reply of the request, as one whole write (or
///   the first slice of a vectored one), and ours always carry `updraft-error-code`,
///   so a task's output is never mistaken for one.
#[derive(Debug)]
pub(crate) struct ApiIo<S> {
    inner: S,
    stall: std::time::Duration,
    write_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A replacement reply still being written, and how much of it is out.
    pending: Option<(Vec<u8>, usize)>,
}

impl<S> ApiIo<S> {
    /// Wraps `inner`; writes fail after `stall` without progress.
    pub(crate) fn new(inner: S, stall: std::time::Duration) -> Self {
        Self {
            inner,
            stall,
            write_timer: None,
            pending: None,
        }
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> ApiIo<S> {
    /// Applies the stall timeout to a write that returned `Pending`.
    fn stalled<T>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if r.is_ready() {
            self.write_timer = None;
            return r;
        }
        let stall = self.stall;
        let timer = self
            .write_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the client read nothing of its reply for {stall:?} ([api] body_stall_timeout)"
                ),
            )));
        }
        Poll::Pending
    }

    /// Writes out a replacement reply; `Ready(Ok)` once it is all out.
    fn drive_pending(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while let Some((buf, at)) = &mut self.pending {
            if *at >= buf.len() {
                self.pending = None;
                break;
            }
            let r = Pin::new(&mut self.inner).poll_write(cx, &buf[*at..]);
            let n = match r {
                Poll::Ready(Ok(n)) => n,
                other => {
                    let r = other.map(|r| r.map(|_| ()));
                    return self.stalled(cx, r);
                }
            };
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            if let Some((_, at)) = &mut self.pending {
                *at += n;
            }
        }
        self.write_timer = None;
        Poll::Ready(Ok(()))
    }
}

/// The JSON reply for hyper's own bare error head in `buf`, if it is one.
pub(crate) fn replace_parse_error_reply(buf: &[u8]) -> Option<Vec<u8>> {
    // Every write of every reply passes here: anything but a short head with one of
    // the three statuses hyper answers by itself is let through without a look.
    let status = buf.get(..13)?;
    if buf.len() > 1024
        || !status.starts_with(b"HTTP/1.1 ")
        || ![&b"400 "[..], b"414 ", b"431 "].contains(&&status[9..13])
    {
        return None;
    }
    let head = std::str::from_utf8(buf).ok()?;
    let rest = head.strip_prefix("HTTP/1.1 ")?;
    if !head.ends_with("\r\n\r\n")
        || !head
            .to_ascii_lowercase()
            .contains("\r\ncontent-length: 0\r\n")
        || head.to_ascii_lowercase().contains("updraft-error-code")
    {
        return None;
    }
    let (status, message) = match rest.get(..4)? {
        "400 " => ("400 Bad Request", "malformed HTTP request".to_string()),
        "414 " => (
            "414 URI Too Long",
            "the request URI is too long".to_string(),
        ),
        "431 " => (
            "431 Request Header Fields Too Large",
            format!(
                "the request head is too large (at most {} bytes and {} headers)",
                MAX_HEAD_BYTES, MAX_HEADERS
            ),
        ),
        _ => return None,
    };
    let code = crate::task::TaskCode::Wire(ErrorCode::BadRequest).as_str();
    let body = serde_json::json!({ "error": message, "code": code }).to_string();
    Some(
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n{}: {code}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            H_ERROR_CODE,
            body.len()
        )
        .into_bytes(),
    )
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for ApiIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for ApiIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        std::task::ready!(this.drive_pending(cx))?;
        if let Some(reply) = replace_parse_error_reply(buf) {
            this.pending = Some((reply, 0));
            std::task::ready!(this.drive_pending(cx))?;
            return Poll::Ready(Ok(buf.len()));
        }
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.stalled(cx, r)
    }

    /// Output goes out as hyper queued it (head, then body chunks), without the copy
    /// into one buffer that hyper makes for a writer that cannot write vectors. A head
    /// hyper wrote by itself has no body, so it is the first slice alone.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        std::task::ready!(this.drive_pending(cx))?;
        if let Some(reply) = bufs.first().and_then(|b| replace_parse_error_reply(b)) {
            this.pending = Some((reply, 0));
            std::task::ready!(this.drive_pending(cx))?;
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.stalled(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        std::task::ready!(this.drive_pending(cx))?;
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.stalled(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        std::task::ready!(this.drive_pending(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// Why a query string could not be decoded; the API answers 400 with this text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum QueryError {
    /// A `%` with fewer than two characters after it.
    #[error("truncated %-escape")]
    Truncated,
    /// A `%` followed by something other than two hex digits.
    #[error("bad %-escape")]
    BadEscape,
    /// The decoded bytes are not UTF-8.
    #[error("query is not UTF-8")]
    NotUtf8,
}

/// Decodes `%XX` and `+` in a query component.
pub(crate) fn percent_decode(s: &str) -> Result<String, QueryError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or(QueryError::Truncated)?;
                let hex = std::str::from_utf8(hex).map_err(|_| QueryError::BadEscape)?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| QueryError::BadEscape)?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| QueryError::NotUtf8)
}

/// Encodes a query component.
pub(crate) fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Splits a query string into decoded pairs.
pub(crate) fn parse_query(q: &str) -> Result<Vec<(String, String)>, QueryError> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Ok((percent_decode(k)?, percent_decode(v)?))
        })
        .collect()
}

/// Text made safe for a header value: a JSON string literal with every non-ASCII
/// character escaped, so newlines and UTF-8 survive and nothing breaks the header.
pub(crate) fn header_text(s: &str) -> String {
    let json = serde_json::to_string(s).expect("strings serialize");
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if c.is_ascii() && !c.is_ascii_control() {
            out.push(c);
        } else {
            let mut buf = [0u16; 2];
            for unit in c.encode_utf16(&mut buf) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

/// Reverses [`header_text`]; text that is not a JSON string is returned as it is.
pub fn header_text_decode(s: &str) -> String {
    serde_json::from_str::<String>(s).unwrap_or_else(|_| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_past_4_gib_announces_its_whole_length() {
        // What `run --input FILE` sends as Content-Length: u64 on every target.
        let (_tx, body) = ChannelBody::new(Some(5 << 30));
        assert_eq!(body.size_hint().exact(), Some(5_368_709_120));
    }

    #[tokio::test]
    async fn a_body_from_memory_gives_its_chunks_then_ends() {
        let chunks = [
            Bytes::from_static(b"ab"),
            Bytes::new(),
            Bytes::from_static(b"c"),
        ];
        let body = ChannelBody::from_chunks(chunks);
        assert_eq!(body.size_hint().exact(), Some(3));
        assert!(!body.is_end_stream());
        let collected = body.collect().await.unwrap().to_bytes();
        assert_eq!(&collected[..], b"abc");
        let empty = ChannelBody::full(Vec::new());
        assert!(empty.is_end_stream());
        assert_eq!(empty.size_hint().exact(), Some(0));
    }

    #[test]
    fn query_round_trip() {
        let q = format!(
            "where=cloud&arg={}&arg={}",
            percent_encode("a b&c"),
            percent_encode("é")
        );
        let pairs = parse_query(&q).unwrap();
        assert_eq!(pairs[1].1, "a b&c");
        assert_eq!(pairs[2].1, "é");
        assert!(parse_query("arg=%zz").is_err());
    }

    #[test]
    fn query_errors_keep_their_text() {
        let text = |q: &str| parse_query(q).unwrap_err().to_string();
        assert_eq!(text("arg=%zz"), "bad %-escape");
        assert_eq!(text("arg=%e"), "truncated %-escape");
        assert_eq!(text("arg=%ff"), "query is not UTF-8");
        assert_eq!(percent_decode("%c3%a9+x"), Ok("é x".to_string()));
        assert_eq!(percent_decode("%é"), Err(QueryError::BadEscape));
    }

    #[test]
    fn hyper_parse_error_replies_get_the_json_body() {
        let bare = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Sat, 05 Dec 2026 16:00:00 GMT\r\n\r\n";
        let r = String::from_utf8(replace_parse_error_reply(bare).unwrap()).unwrap();
        assert!(r.starts_with("HTTP/1.1 431 "), "{r}");
        assert!(r.contains("updraft-error-code: bad_request"), "{r}");
        assert!(r.ends_with("\"code\":\"bad_request\",\"error\":\"the request head is too large (at most 32768 bytes and 64 headers)\"}") || r.contains("\"code\":\"bad_request\""), "{r}");
        // Ours, a 200, and body bytes are left alone.
        assert!(replace_parse_error_reply(b"HTTP/1.1 400 Bad Request\r\nupdraft-error-code: bad_request\r\ncontent-length: 0\r\n\r\n").is_none());
        assert!(
            replace_parse_error_reply(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_none()
        );
        assert!(replace_parse_error_reply(
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 5\r\n\r\nhello"
        )
        .is_none());
    }

    #[test]
    fn header_text_is_ascii_and_reversible() {
        let s = "line one\nzwei – drei \u{1F600}";
        let h = header_text(s);
        assert!(h.bytes().all(|b| (0x20..0x7f).contains(&b)), "{h}");
        assert_eq!(header_text_decode(&h), s);
    }
}
