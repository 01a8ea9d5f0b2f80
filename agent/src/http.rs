//! HTTP plumbing shared by the API server and the client: bodies fed from a channel,
//! request bodies as task input, small helpers for queries and header values.

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::mpsc;
use updraft_shared::exec::Input;

/// Chunks in flight between a producer task and the HTTP body: enough to keep the
/// socket busy, few enough to bound memory (4 × 64 KiB).
const BODY_CHANNEL: usize = 4;

/// A body whose chunks come from a channel; the producer runs as its own task.
#[derive(Debug)]
pub struct ChannelBody {
    rx: mpsc::Receiver<std::io::Result<Bytes>>,
    len: Option<u64>,
}

impl ChannelBody {
    /// A body of `len` bytes (if known) and the sender that feeds it.
    pub fn new(len: Option<u64>) -> (mpsc::Sender<std::io::Result<Bytes>>, Self) {
        let (tx, rx) = mpsc::channel(BODY_CHANNEL);
        (tx, Self { rx, len })
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
        let bytes = bytes.into();
        let (tx, body) = Self::new(Some(bytes.len() as u64));
        let _ = tx.try_send(Ok(bytes));
        body
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data)))
    }

    fn size_hint(&self) -> SizeHint {
        self.len
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

/// A request or response body read as task input.
#[derive(Debug)]
pub struct BodyInput(pub Incoming);

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

/// Decodes `%XX` and `+` in a query component.
pub fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or("truncated %-escape")?;
                let hex = std::str::from_utf8(hex).map_err(|_| "bad %-escape")?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| "bad %-escape")?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| "query is not UTF-8".to_string())
}

/// Encodes a query component.
pub fn percent_encode(s: &str) -> String {
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
pub fn parse_query(q: &str) -> Result<Vec<(String, String)>, String> {
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
pub fn header_text(s: &str) -> String {
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
    fn header_text_is_ascii_and_reversible() {
        let s = "line one\nzwei – drei \u{1F600}";
        let h = header_text(s);
        assert!(h.bytes().all(|b| (0x20..0x7f).contains(&b)), "{h}");
        assert_eq!(header_text_decode(&h), s);
    }
}
