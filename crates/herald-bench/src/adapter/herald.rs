//! Herald's protocol, through `herald-protocol`: requests in the shapes `request.rs` parses,
//! events read with [`ServerEvent::decode`]. Two frames take a shortcut, since the tool must
//! parse hundreds of thousands of them per second on one core: a delivered bench message (a
//! frame that starts like a `message` event and holds the bench marker), and a `presence_diff`,
//! of which only the count is read (its lists can name a thousand users).

use herald_protocol::ServerEvent;

use super::{Incoming, Protocol};
use crate::stamp;

/// How every message event begins on the wire (`type` is serialized first).
const MESSAGE_PREFIX: &str = r#"{"type":"message""#;
/// How a presence diff begins on the wire: about one per member and presence window while a
/// room forms.
const PRESENCE_PREFIX: &str = r#"{"type":"presence_diff""#;
/// The diff's top-level count. Inside a JSON string a quote is escaped, so this text can only be
/// the key itself; the lists hold strings only.
const COUNT_KEY: &str = r#""count":"#;

pub struct Herald;

impl Protocol for Herald {
    fn name(&self) -> &'static str {
        "herald"
    }

    fn path(&self, token: &str) -> String {
        format!("/ws?token={token}")
    }

    fn join(&self, room: &str) -> String {
        format!(r#"{{"type":"join","room":"{room}","id":"join"}}"#)
    }

    fn publish(&self, room: &str, content: &str) -> String {
        format!(r#"{{"type":"publish","room":"{room}","echo":false,"content":{content}}}"#)
    }

    fn direct(&self, user: &str, content: &str) -> String {
        format!(r#"{{"type":"send","to":["{user}"],"content":{content}}}"#)
    }

    fn sends_presence(&self) -> bool {
        true
    }

    fn decode(&self, frame: &str) -> Incoming {
        if frame.starts_with(MESSAGE_PREFIX)
            && let Some(sent_ns) = stamp::find(frame)
        {
            return Incoming::Delivery { sent_ns };
        }
        if frame.starts_with(PRESENCE_PREFIX)
            && let Some(count) = presence_count(frame)
        {
            return Incoming::Presence { count };
        }
        match ServerEvent::decode(frame) {
            Ok(ServerEvent::Welcome(_)) => Incoming::Ready,
            Ok(ServerEvent::Ack(ack)) if ack.room.is_some() => Incoming::Joined,
            Ok(ServerEvent::Message(message)) => message
                .content
                .and_then(|content| stamp::find(content.get()))
                .map_or(Incoming::Other, |sent_ns| Incoming::Delivery { sent_ns }),
            Ok(ServerEvent::PresenceDiff(diff)) => Incoming::Presence { count: diff.count },
            Ok(ServerEvent::Error(error)) => {
                Incoming::Refused(format!("{}: {}", error.code.as_str(), error.message))
            }
            Ok(_) => Incoming::Other,
            Err(error) => Incoming::Refused(format!("undecodable frame: {error}")),
        }
    }
}

/// The `count` of a presence diff, read without decoding its lists.
fn presence_count(frame: &str) -> Option<u64> {
    let at = frame.rfind(COUNT_KEY)? + COUNT_KEY.len();
    let digits = &frame[at..];
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_protocol::request::{RequestBody, parse_text};
    use herald_protocol::{Ack, ErrorCode, ErrorEvent, Message, PresenceDiff, Welcome};
    use serde_json::value::RawValue;

    #[test]
    fn requests_are_what_the_server_parses() {
        let content = stamp::content(7, "");
        let join = parse_text(Herald.join("lobby").as_bytes()).unwrap();
        assert!(matches!(join.body, RequestBody::Join { ref room, .. } if room == "lobby"));
        let publish = parse_text(Herald.publish("lobby", &content).as_bytes()).unwrap();
        assert!(matches!(
            publish.body,
            RequestBody::Publish { echo: false, .. }
        ));
        let send = parse_text(Herald.direct("bob", &content).as_bytes()).unwrap();
        assert!(matches!(send.body, RequestBody::Send { ref to, .. } if to == &["bob"]));
    }

    #[test]
    fn server_events_are_classified_as_the_full_decoder_reads_them() {
        let message = ServerEvent::Message(Message {
            id: "m".into(),
            from: "a".into(),
            to: None,
            room: Some("r".into()),
            content: Some(RawValue::from_string(stamp::content(42, "pp")).unwrap()),
            ts: 1,
            offset: None,
            encoding: None,
        });
        let frame = String::from_utf8(message.encode().to_vec()).unwrap();
        assert_eq!(Herald.decode(&frame), Incoming::Delivery { sent_ns: 42 });

        let welcome = ServerEvent::Welcome(Welcome {
            conn: "c".into(),
            user: "u".into(),
            node: "n".into(),
            heartbeat: 25,
        });
        let welcome = String::from_utf8(welcome.encode().to_vec()).unwrap();
        assert_eq!(Herald.decode(&welcome), Incoming::Ready);

        let ack = ServerEvent::Ack(Ack {
            reference: Some("join".into()),
            room: Some("r".into()),
            count: Some(1),
            ..Ack::default()
        });
        let ack = String::from_utf8(ack.encode().to_vec()).unwrap();
        assert_eq!(Herald.decode(&ack), Incoming::Joined);

        let error = ServerEvent::Error(ErrorEvent {
            code: ErrorCode::RateLimited,
            message: "slow down".into(),
            reference: None,
        });
        let error = String::from_utf8(error.encode().to_vec()).unwrap();
        assert!(
            matches!(Herald.decode(&error), Incoming::Refused(text) if text.starts_with("rate_limited"))
        );
    }

    #[test]
    fn presence_diffs_give_their_count_whatever_the_names() {
        let tricky = r#"a "count":9 b"#.to_owned();
        for (joined, left) in [
            (
                Some(vec!["alice".to_owned(), tricky.clone()]),
                Some(vec![tricky]),
            ),
            (None, None),
        ] {
            let diff = ServerEvent::PresenceDiff(PresenceDiff {
                room: "count".into(),
                joined,
                left,
                count: 10_000,
            });
            let frame = String::from_utf8(diff.encode().to_vec()).unwrap();
            assert_eq!(Herald.decode(&frame), Incoming::Presence { count: 10_000 });
        }
        assert!(Herald.sends_presence());
    }
}
