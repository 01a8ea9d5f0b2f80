//! Arbitrary bytes through the frame decoder and every JSON message parser (task,
//! load and certificate messages).
//!
//! None of it may panic, and no decoded payload may be longer than its kind's cap:
//! the cap is what keeps a hostile peer from making us allocate. Whatever parses must
//! also encode back to the same message, so both sides read each other's JSON alike.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use std::fmt::Debug;
use updraft_proto::frame::MAX_HEADER_LEN;
use updraft_proto::{
    CertReply, CertRequest, Frame, LoadReport, ReplyHeader, RequestHeader, Trailer,
};

/// Re-encodes `msg` and checks it decodes to itself. Skipped when the re-encoding is
/// over the header cap (a trailer's defaulted fields are written out in full, so it
/// can grow a little), because `to_frame` rightly refuses to build such a frame.
fn round_trip<T: Serialize + PartialEq + Debug>(
    msg: &T,
    to_frame: impl Fn(&T) -> Frame,
    from_frame: impl Fn(&Frame) -> Option<T>,
) {
    let len = serde_json::to_vec(msg).expect("messages serialize").len();
    if len <= MAX_HEADER_LEN as usize {
        assert_eq!(from_frame(&to_frame(msg)).as_ref(), Some(msg));
    }
}

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    // Each decoded frame consumes at least its prelude, so this ends; the bound only
    // turns a livelock into a failure instead of a hang.
    for _ in 0..=data.len() {
        let frame = match Frame::decode(&mut buf) {
            Ok(Some(frame)) => frame,
            Ok(None) | Err(_) => break,
        };
        assert!(
            frame.payload.len() <= frame.kind.max_len() as usize,
            "{:?} payload of {} bytes over its cap",
            frame.kind,
            frame.payload.len()
        );
        if let Ok(req) = RequestHeader::from_frame(&frame) {
            let _ = req.validate();
            round_trip(&req, RequestHeader::to_frame, |f| {
                RequestHeader::from_frame(f).ok()
            });
        }
        if let Ok(reply) = ReplyHeader::from_frame(&frame) {
            round_trip(&reply, ReplyHeader::to_frame, |f| {
                ReplyHeader::from_frame(f).ok()
            });
        }
        if let Ok(trailer) = Trailer::from_frame(&frame) {
            round_trip(&trailer, Trailer::to_frame, |f| Trailer::from_frame(f).ok());
        }
        if let Ok(load) = LoadReport::from_frame(&frame) {
            round_trip(&load, LoadReport::to_frame, |f| {
                LoadReport::from_frame(f).ok()
            });
        }
        if let Ok(request) = CertRequest::from_frame(&frame) {
            let _ = request.validate();
            round_trip(&request, CertRequest::to_frame, |f| {
                CertRequest::from_frame(f).ok()
            });
        }
        if let Ok(reply) = CertReply::from_frame(&frame) {
            round_trip(&reply, CertReply::to_frame, |f| CertReply::from_frame(f).ok());
        }
    }
});
