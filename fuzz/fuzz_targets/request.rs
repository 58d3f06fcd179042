//! The request decoder on any bytes, read both as a text frame and as a binary frame (what the
//! server's reader does with each WebSocket data frame).
//!
//! Beyond "never panics", a request the decoder accepts must hold what the server relies on
//! without checking again: valid names, a short `id`, content of the frame's kind, and JSON
//! content that is itself valid JSON (the server copies it into events verbatim).
#![no_main]

use bytes::Bytes;
use herald_protocol::names::check_name;
use herald_protocol::request::{MAX_ID_BYTES, parse_binary, parse_text};
use herald_protocol::{HistoryTarget, Payload, ProtocolError, Request, RequestBody};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    check(parse_text(data), FrameKind::Text);
    check(parse_binary(&Bytes::copy_from_slice(data)), FrameKind::Binary);
});

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum FrameKind {
    Text,
    Binary,
}

fn check(parsed: Result<Request, ProtocolError>, kind: FrameKind) {
    let request = match parsed {
        Ok(request) => request,
        Err(error) => {
            assert!(error.id.as_ref().is_none_or(|id| id.len() <= MAX_ID_BYTES));
            return;
        }
    };
    assert!(request.id.as_ref().is_none_or(|id| id.len() <= MAX_ID_BYTES));
    let valid = |name: &str| assert_eq!(check_name(name), Ok(()), "{name:?}");
    match &request.body {
        RequestBody::Send { to, content } => {
            assert!(!to.is_empty());
            to.iter().for_each(|user| valid(user));
            check_content(content, kind);
        }
        RequestBody::Publish { room, content, .. } => {
            valid(room);
            check_content(content, kind);
        }
        RequestBody::Broadcast { content } => check_content(content, kind),
        other => {
            assert_eq!(kind, FrameKind::Text, "{other:?} accepted in a binary frame");
            match other {
                RequestBody::Join { room, .. } | RequestBody::Leave { room } => valid(room),
                RequestBody::Members { room, after, limit } => {
                    valid(room);
                    after.iter().for_each(|user| valid(user));
                    assert_ne!(*limit, Some(0));
                }
                RequestBody::Presence { users } => {
                    assert!(!users.is_empty());
                    users.iter().for_each(|user| valid(user));
                }
                RequestBody::History { target, limit, .. } => {
                    assert_ne!(*limit, Some(0));
                    match target {
                        HistoryTarget::Room(name) | HistoryTarget::With(name) => valid(name),
                    }
                }
                _ => {}
            }
        }
    }
}

fn check_content(content: &Payload, kind: FrameKind) {
    match (content, kind) {
        (Payload::Json(raw), FrameKind::Text) => {
            assert!(serde_json::from_str::<serde::de::IgnoredAny>(raw.get()).is_ok());
        }
        (Payload::Binary(_), FrameKind::Binary) => {}
        (content, kind) => panic!("{content:?} from a {kind:?} frame"),
    }
}
