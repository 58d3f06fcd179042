//! Server events: everything the server writes to a client.
//!
//! The server encodes each event once ([`ServerEvent::encode`]) and shares the bytes between all
//! recipients. Clients decode with [`ServerEvent::decode`], which reads `type` first and then
//! the matching struct, so that `content` stays raw JSON text on both sides.

use std::borrow::Cow;
use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::binary;
use crate::codes::ErrorCode;

/// First frame on every authenticated connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// This connection's id, unique across nodes.
    pub conn: String,
    /// The authenticated user (the token's `sub`).
    pub user: String,
    /// The node the connection landed on.
    pub node: String,
    /// Seconds between the server's Ping frames; silence for twice this closes the connection.
    pub heartbeat: u64,
}

/// A delivered message: direct (`to` set), room (`room` set) or broadcast (neither).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Message {
    /// Server-assigned id, unique across nodes and time-ordered (UUIDv7).
    pub id: String,
    /// The authenticated sender; never taken from the client.
    pub from: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
    /// The sender's JSON content, verbatim. Absent in the header of a binary message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Box<RawValue>>,
    /// Unix time in milliseconds when the server accepted the message.
    pub ts: u64,
    /// Position of a stored message in its stream: the room for room messages, the recipient's
    /// inbox for live and offline direct messages, the conversation in a `history` reply with
    /// `with`. Absent on ephemeral (`persist: false`) messages, broadcasts and the sender's own
    /// copies of a direct message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// Set when `content` is not the message itself but an encoding of it: binary messages in a
    /// `history` reply carry their bytes as a base64 string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<ContentEncoding>,
}

/// How `content` encodes a binary payload inside a JSON event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContentEncoding {
    /// Standard base64 with padding (RFC 4648 §4).
    Base64,
}

/// Who entered and who left a room during one presence window, and how many users it holds
/// at the end of it. A user is listed at most once, with where they are at the end of the
/// window: in `joined` if they are in the room, in `left` if they are not, whatever they did
/// in between; so adding `joined` to a member list and removing `left` from it always gives
/// the room's members. Above the server's `presence.max_members_listed` the lists are absent
/// and only `count` is sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceDiff {
    pub room: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub joined: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub left: Option<Vec<String>>,
    /// Users in the room at the end of the window.
    pub count: u64,
}

/// The answer to a request that carried an `id`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    #[serde(rename = "ref")]
    pub reference: Option<String>,
    /// The id the server gave the message (`send`, `publish`, `broadcast`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Recipients with at least one open connection when the message was sent (`send`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub online: Option<Vec<String>>,
    /// Recipients with no open connection (`send`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline: Option<Vec<String>>,
    /// The room joined or left (`join`, `leave`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
    /// Users in that room afterwards (`join`, `leave`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// The message's offset in its room (`publish` of a stored message); the room's newest
    /// offset (`join`): every message after it reaches the connection live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// The room stream's epoch (`join`, `publish`); offsets compare only within one epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
    /// The message's offset in each recipient's inbox (`send`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offsets: Option<BTreeMap<String, u64>>,
    /// Whether the messages after `since` were all replayed (`join` with `since`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered: Option<bool>,
    /// The inbox offset acknowledged so far (client `ack`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbox: Option<u64>,
}

/// The answer to `history`: one page of stored messages, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct History {
    #[serde(rename = "ref")]
    pub reference: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub with: Option<String>,
    /// The epoch of the stream the offsets belong to (absent while the stream is empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
    /// Ascending by offset; the page holds the newest messages older than `before`.
    pub messages: Vec<Message>,
    /// Whether older messages exist: ask again with `before` = the first message's offset.
    pub more: bool,
}

/// The answer to `members`: one page of the room's users.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Members {
    #[serde(rename = "ref")]
    pub reference: Option<String>,
    pub room: String,
    /// Users in the whole room.
    pub count: u64,
    /// The page: users sorted by name, each after the request's `after`.
    pub users: Vec<String>,
    /// Set when more users follow: ask again with `after` = this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// The answer to `presence`: for each user asked about, whether they are online.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceReply {
    #[serde(rename = "ref")]
    pub reference: Option<String>,
    pub online: std::collections::BTreeMap<String, bool>,
}

/// A refused request. The connection stays open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorEvent {
    pub code: ErrorCode,
    pub message: String,
    #[serde(rename = "ref")]
    pub reference: Option<String>,
}

/// The answer to an application-level `ping`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
}

/// The token expires soon: answer with `{"type":"refresh","token":…}` before it does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshNotice {
    /// Seconds until the token expires and the connection closes with 4100.
    pub expires_in: u64,
}

/// Every event the server sends, tagged by `type` on the wire.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerEvent {
    Welcome(Welcome),
    Message(Message),
    PresenceDiff(PresenceDiff),
    Ack(Ack),
    Members(Members),
    Presence(PresenceReply),
    Error(ErrorEvent),
    Pong(Pong),
    History(History),
    Refresh(RefreshNotice),
}

#[derive(Deserialize)]
struct TypeTag<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
}

impl ServerEvent {
    /// The JSON text of this event, ready to be written as a text frame.
    pub fn encode(&self) -> Bytes {
        // Serializing these types cannot fail: every map key is a string and RawValue holds
        // already-validated JSON.
        Bytes::from(serde_json::to_vec(self).expect("server events always serialize"))
    }

    /// Builds the binary frame for a message whose payload is raw bytes.
    pub fn encode_binary(header: &Message, payload: &[u8]) -> Bytes {
        let header = ServerEvent::Message(Message {
            content: None,
            ..header.clone()
        })
        .encode();
        binary::join(&header, payload)
    }

    /// Reads a text frame sent by the server.
    pub fn decode(text: &str) -> Result<ServerEvent, serde_json::Error> {
        let tag: TypeTag = serde_json::from_str(text)?;
        Ok(match tag.kind.as_ref() {
            "welcome" => ServerEvent::Welcome(serde_json::from_str(text)?),
            "message" => ServerEvent::Message(serde_json::from_str(text)?),
            "presence_diff" => ServerEvent::PresenceDiff(serde_json::from_str(text)?),
            "ack" => ServerEvent::Ack(serde_json::from_str(text)?),
            "members" => ServerEvent::Members(serde_json::from_str(text)?),
            "presence" => ServerEvent::Presence(serde_json::from_str(text)?),
            "error" => ServerEvent::Error(serde_json::from_str(text)?),
            "pong" => ServerEvent::Pong(serde_json::from_str(text)?),
            "history" => ServerEvent::History(serde_json::from_str(text)?),
            "refresh" => ServerEvent::Refresh(serde_json::from_str(text)?),
            other => {
                return Err(serde::de::Error::custom(format!(
                    "unknown event type {other:?}"
                )));
            }
        })
    }

    /// Reads a binary frame sent by the server: the message header and its payload.
    pub fn decode_binary(frame: &Bytes) -> Result<(Message, Bytes), serde_json::Error> {
        let (header, payload) =
            binary::split(frame).map_err(|e| serde::de::Error::custom(e.describe()))?;
        Ok((serde_json::from_slice(header)?, payload))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(json: &str) -> Box<RawValue> {
        RawValue::from_string(json.to_owned()).unwrap()
    }

    #[test]
    fn message_encodes_content_verbatim_with_its_tag() {
        let event = ServerEvent::Message(Message {
            id: "m1".into(),
            from: "carol".into(),
            to: Some(vec!["alice".into()]),
            room: None,
            content: Some(raw(r#"{"text": "hi"}"#)),
            ts: 5,
            offset: None,
            encoding: None,
        });
        let text = String::from_utf8(event.encode().to_vec()).unwrap();
        assert_eq!(
            text,
            r#"{"type":"message","id":"m1","from":"carol","to":["alice"],"content":{"text": "hi"},"ts":5}"#
        );
        let ServerEvent::Message(decoded) = ServerEvent::decode(&text).unwrap() else {
            panic!("not a message")
        };
        assert_eq!(decoded.content.unwrap().get(), r#"{"text": "hi"}"#);
    }

    #[test]
    fn every_event_round_trips_through_decode() {
        let events = [
            ServerEvent::Welcome(Welcome {
                conn: "c".into(),
                user: "u".into(),
                node: "n".into(),
                heartbeat: 25,
            }),
            ServerEvent::PresenceDiff(PresenceDiff {
                room: "r".into(),
                joined: Some(vec!["u".into()]),
                left: Some(vec!["v".into()]),
                count: 2,
            }),
            ServerEvent::PresenceDiff(PresenceDiff {
                room: "r".into(),
                joined: None,
                left: None,
                count: 10_000,
            }),
            ServerEvent::Ack(Ack {
                reference: Some("1".into()),
                online: Some(vec!["a".into()]),
                ..Ack::default()
            }),
            ServerEvent::Members(Members {
                reference: None,
                room: "r".into(),
                count: 1,
                users: vec!["u".into()],
                next: Some("u".into()),
            }),
            ServerEvent::Error(ErrorEvent {
                code: ErrorCode::Forbidden,
                message: "no".into(),
                reference: None,
            }),
            ServerEvent::Pong(Pong { reference: None }),
            ServerEvent::Ack(Ack {
                reference: Some("j".into()),
                room: Some("r".into()),
                count: Some(2),
                offset: Some(41),
                epoch: Some("e".into()),
                recovered: Some(false),
                ..Ack::default()
            }),
            ServerEvent::Ack(Ack {
                reference: Some("s".into()),
                offsets: Some([("bob".to_owned(), 7)].into()),
                ..Ack::default()
            }),
            ServerEvent::History(History {
                reference: Some("h".into()),
                room: None,
                with: Some("bob".into()),
                epoch: Some("e".into()),
                messages: vec![Message {
                    id: "m".into(),
                    from: "bob".into(),
                    to: Some(vec!["alice".into()]),
                    room: None,
                    content: Some(raw(r#""AAE=""#)),
                    ts: 9,
                    offset: Some(4),
                    encoding: Some(ContentEncoding::Base64),
                }],
                more: true,
            }),
            ServerEvent::Refresh(RefreshNotice { expires_in: 30 }),
            ServerEvent::Presence(PresenceReply {
                reference: Some("p".into()),
                online: [("a".to_owned(), true), ("b".to_owned(), false)].into(),
            }),
        ];
        for event in events {
            let text = String::from_utf8(event.encode().to_vec()).unwrap();
            let again = ServerEvent::decode(&text).unwrap();
            assert_eq!(again.encode(), event.encode(), "{text}");
        }
    }

    #[test]
    fn stored_message_carries_its_offset_and_ephemeral_one_does_not() {
        let mut message = Message {
            id: "m".into(),
            from: "a".into(),
            to: None,
            room: Some("r".into()),
            content: Some(raw("1")),
            ts: 1,
            offset: Some(12),
            encoding: None,
        };
        let text = String::from_utf8(ServerEvent::Message(message.clone()).encode().to_vec());
        assert!(text.unwrap().contains(r#""offset":12"#));
        message.offset = None;
        let text = String::from_utf8(ServerEvent::Message(message).encode().to_vec()).unwrap();
        assert!(!text.contains("offset"), "{text}");
    }

    #[test]
    fn binary_message_header_has_no_content() {
        let header = Message {
            id: "m".into(),
            from: "a".into(),
            to: None,
            room: Some("r".into()),
            content: None,
            ts: 1,
            offset: Some(3),
            encoding: None,
        };
        let frame = ServerEvent::encode_binary(&header, &[9, 9]);
        let (decoded, payload) = ServerEvent::decode_binary(&frame).unwrap();
        assert_eq!(decoded.room.as_deref(), Some("r"));
        assert_eq!(decoded.offset, Some(3));
        assert!(decoded.content.is_none());
        assert_eq!(&payload[..], &[9, 9]);
    }
}
