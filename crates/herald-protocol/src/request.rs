//! Client requests and their strict parser.
//!
//! A frame is first read as a flat JSON object of raw values, then each field the request type
//! needs is decoded on its own, so that an error names the field (`"to" must be an array of
//! user ids`) and still carries the request `id` back to the client as `ref`. The `content` of a
//! message is kept as raw JSON text and never re-encoded: the server copies it into the outgoing
//! event verbatim.

use std::borrow::Cow;
use std::collections::BTreeMap;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

use crate::binary;
use crate::codes::ErrorCode;
use crate::names::check_name;

/// Longest request `id`, in bytes. The id is echoed in acks and errors, so it is kept short.
pub const MAX_ID_BYTES: usize = 64;

/// A validated client request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The client's request id, echoed as `ref` in the `ack` or `error` that answers it.
    pub id: Option<String>,
    pub body: RequestBody,
}

/// What the client asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum RequestBody {
    /// A direct message to every connection of each listed user.
    Send {
        to: Vec<String>,
        content: Payload,
    },
    /// Join a room. `since` (the last offset the client saw) asks for the messages it missed;
    /// `epoch` (from an earlier ack) lets the server tell a recreated stream from a gap.
    Join {
        room: String,
        since: Option<u64>,
        epoch: Option<String>,
    },
    Leave {
        room: String,
    },
    /// Publish to a room the connection has joined. `echo` sends it back to the publisher's own
    /// connection too; `persist: false` marks an ephemeral message (typing indicators).
    Publish {
        room: String,
        content: Payload,
        echo: bool,
        persist: bool,
    },
    /// One page of the users in a room, sorted by name, and their count: the users after
    /// `after` (a name from a previous page's `next`), at most `limit` of them.
    Members {
        room: String,
        after: Option<String>,
        limit: Option<u32>,
    },
    /// Whether each listed user has an open connection anywhere.
    Presence {
        users: Vec<String>,
    },
    /// A message to every connection on every node; needs an admin token.
    Broadcast {
        content: Payload,
    },
    /// Application-level ping for browsers, which cannot send WebSocket Ping frames.
    Ping,
    /// Authenticate a connection accepted without a token.
    Auth {
        token: String,
    },
    /// Replace the connection's token before it expires.
    Refresh {
        token: String,
    },
    /// A page of stored messages older than `before` (newest page when absent).
    History {
        target: HistoryTarget,
        before: Option<u64>,
        limit: Option<u32>,
    },
    /// The client has received its inbox up to and including this offset.
    Ack {
        inbox: u64,
    },
}

/// What a `history` request pages through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HistoryTarget {
    /// A room's messages.
    Room(String),
    /// The direct conversation between the caller and this user, both directions.
    With(String),
}

impl RequestBody {
    /// The wire name of the request type.
    pub fn kind(&self) -> &'static str {
        match self {
            RequestBody::Send { .. } => "send",
            RequestBody::Join { .. } => "join",
            RequestBody::Leave { .. } => "leave",
            RequestBody::Publish { .. } => "publish",
            RequestBody::Members { .. } => "members",
            RequestBody::Presence { .. } => "presence",
            RequestBody::Broadcast { .. } => "broadcast",
            RequestBody::Ping => "ping",
            RequestBody::Auth { .. } => "auth",
            RequestBody::Refresh { .. } => "refresh",
            RequestBody::History { .. } => "history",
            RequestBody::Ack { .. } => "ack",
        }
    }
}

/// A message body: JSON (from a text frame) or raw bytes (from a binary frame).
#[derive(Debug, Clone)]
pub enum Payload {
    Json(Box<RawValue>),
    Binary(Bytes),
}

impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Payload::Json(a), Payload::Json(b)) => a.get() == b.get(),
            (Payload::Binary(a), Payload::Binary(b)) => a == b,
            _ => false,
        }
    }
}

/// A request the server refuses, with everything needed for the `error` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    pub code: ErrorCode,
    pub message: String,
    /// The request id, when it could be read.
    pub id: Option<String>,
}

impl ProtocolError {
    pub fn new(code: ErrorCode, message: impl Into<String>, id: Option<String>) -> Self {
        ProtocolError {
            code,
            message: message.into(),
            id,
        }
    }
}

/// Request types that carry a `content` and so may arrive as binary frames.
const KINDS_WITH_CONTENT: [&str; 3] = ["send", "publish", "broadcast"];

/// Parses a text frame.
pub fn parse_text(frame: &[u8]) -> Result<Request, ProtocolError> {
    let fields = RawFields::parse(frame)?;
    fields.into_request(None)
}

/// Parses a binary frame: a JSON header without `content`, then the payload (see [`binary`]).
pub fn parse_binary(frame: &Bytes) -> Result<Request, ProtocolError> {
    let (header, payload) = binary::split(frame)
        .map_err(|e| ProtocolError::new(ErrorCode::InvalidJson, e.describe(), None))?;
    let fields = RawFields::parse(header)?;
    fields.into_request(Some(payload))
}

/// A JSON object's fields, refusing one named twice: a map would keep the last silently, and
/// a proxy or another parser reading the first would then see a different request.
struct UniqueFields<'a>(BTreeMap<Cow<'a, str>, &'a RawValue>);

impl<'de: 'a, 'a> serde::Deserialize<'de> for UniqueFields<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor<'a>(std::marker::PhantomData<&'a ()>);

        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visitor<'a> {
            type Value = UniqueFields<'a>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut map: M,
            ) -> Result<Self::Value, M::Error> {
                let mut fields = BTreeMap::new();
                while let Some((name, value)) = map.next_entry::<Cow<'a, str>, &'a RawValue>()? {
                    if fields.contains_key(&name) {
                        return Err(serde::de::Error::custom(format_args!(
                            "field \"{name}\" appears twice"
                        )));
                    }
                    fields.insert(name, value);
                }
                Ok(UniqueFields(fields))
            }
        }

        deserializer.deserialize_map(Visitor(std::marker::PhantomData))
    }
}

/// The top-level fields of a request object, each still raw JSON.
struct RawFields<'a> {
    fields: BTreeMap<Cow<'a, str>, &'a RawValue>,
    id: Option<String>,
}

impl<'a> RawFields<'a> {
    fn parse(frame: &'a [u8]) -> Result<Self, ProtocolError> {
        let UniqueFields(fields) = serde_json::from_slice(frame).map_err(|e| {
            ProtocolError::new(
                ErrorCode::InvalidJson,
                format!("frame is not a JSON object: {e}"),
                None,
            )
        })?;
        let mut parsed = RawFields { fields, id: None };
        parsed.id = parsed.id_field()?;
        Ok(parsed)
    }

    fn id_field(&self) -> Result<Option<String>, ProtocolError> {
        let Some(raw) = self.fields.get("id") else {
            return Ok(None);
        };
        match serde_json::from_str::<String>(raw.get()) {
            Ok(id) if id.len() <= MAX_ID_BYTES => Ok(Some(id)),
            Ok(_) => Err(self.invalid("\"id\" is longer than 64 bytes")),
            Err(_) => Err(self.invalid("\"id\" must be a string")),
        }
    }

    fn invalid(&self, message: impl Into<String>) -> ProtocolError {
        ProtocolError::new(ErrorCode::InvalidField, message, self.id.clone())
    }

    fn optional<T: DeserializeOwned>(
        &self,
        name: &str,
        expected: &str,
    ) -> Result<Option<T>, ProtocolError> {
        match self.fields.get(name) {
            None => Ok(None),
            Some(raw) if raw.get() == "null" => Ok(None),
            Some(raw) => serde_json::from_str(raw.get())
                .map(Some)
                .map_err(|_| self.invalid(format!("\"{name}\" must be {expected}"))),
        }
    }

    fn required<T: DeserializeOwned>(
        &self,
        name: &str,
        expected: &str,
    ) -> Result<T, ProtocolError> {
        self.optional(name, expected)?
            .ok_or_else(|| self.invalid(format!("\"{name}\" is required ({expected})")))
    }

    fn room(&self) -> Result<String, ProtocolError> {
        let room: String = self.required("room", "a room name")?;
        check_name(&room).map_err(|why| self.invalid(format!("\"room\" {why}")))?;
        Ok(room)
    }

    /// A non-empty array of valid user ids.
    fn users(&self, name: &str) -> Result<Vec<String>, ProtocolError> {
        let users: Vec<String> = self.required(name, "an array of user ids")?;
        if users.is_empty() {
            return Err(self.invalid(format!("\"{name}\" must name at least one user")));
        }
        for user in &users {
            check_name(user)
                .map_err(|why| self.invalid(format!("\"{name}\" entry {user:?} {why}")))?;
        }
        Ok(users)
    }

    fn token(&self) -> Result<String, ProtocolError> {
        self.required("token", "a JWT string")
    }

    fn content(&self, binary: Option<Bytes>) -> Result<Payload, ProtocolError> {
        match (binary, self.fields.get("content")) {
            (Some(_), Some(_)) => Err(self.invalid(
                "a binary frame carries its content after the header, not in \"content\"",
            )),
            (Some(bytes), None) => Ok(Payload::Binary(bytes)),
            (None, Some(raw)) => Ok(Payload::Json((*raw).to_owned())),
            (None, None) => Err(self.invalid("\"content\" is required (any JSON value)")),
        }
    }

    fn history(&self) -> Result<RequestBody, ProtocolError> {
        let room: Option<String> = self.optional("room", "a room name")?;
        let with: Option<String> = self.optional("with", "a user id")?;
        let target = match (room, with) {
            (Some(room), None) => {
                check_name(&room).map_err(|why| self.invalid(format!("\"room\" {why}")))?;
                HistoryTarget::Room(room)
            }
            (None, Some(user)) => {
                check_name(&user).map_err(|why| self.invalid(format!("\"with\" {why}")))?;
                HistoryTarget::With(user)
            }
            (Some(_), Some(_)) => {
                return Err(self.invalid("give either \"room\" or \"with\", not both"));
            }
            (None, None) => {
                return Err(
                    self.invalid("\"room\" (a room name) or \"with\" (a user id) is required")
                );
            }
        };
        let limit: Option<u32> = self.optional("limit", "a positive integer")?;
        if limit == Some(0) {
            return Err(self.invalid("\"limit\" must be a positive integer"));
        }
        Ok(RequestBody::History {
            target,
            before: self.optional("before", "a non-negative integer offset")?,
            limit,
        })
    }

    fn members(&self) -> Result<RequestBody, ProtocolError> {
        let room = self.room()?;
        let limit: Option<u32> = self.optional("limit", "a positive integer")?;
        if limit == Some(0) {
            return Err(self.invalid("\"limit\" must be a positive integer"));
        }
        let after: Option<String> = self.optional("after", "a user id")?;
        if let Some(after) = &after {
            check_name(after).map_err(|why| self.invalid(format!("\"after\" {why}")))?;
        }
        Ok(RequestBody::Members { room, after, limit })
    }

    fn into_request(self, binary: Option<Bytes>) -> Result<Request, ProtocolError> {
        let kind: String = match self.fields.get("type") {
            None => {
                return Err(ProtocolError::new(
                    ErrorCode::UnknownType,
                    "\"type\" is required",
                    self.id.clone(),
                ));
            }
            Some(raw) => serde_json::from_str(raw.get()).map_err(|_| {
                ProtocolError::new(
                    ErrorCode::UnknownType,
                    "\"type\" must be a string",
                    self.id.clone(),
                )
            })?,
        };
        if binary.is_some() && !KINDS_WITH_CONTENT.contains(&kind.as_str()) {
            return Err(self.invalid(format!(
                "\"{kind}\" cannot be sent as a binary frame; only send, publish and broadcast can"
            )));
        }
        let body = match kind.as_str() {
            "send" => {
                let to: Vec<String> = self.required("to", "an array of user ids")?;
                if to.is_empty() {
                    return Err(self.invalid("\"to\" must name at least one user"));
                }
                for user in &to {
                    check_name(user)
                        .map_err(|why| self.invalid(format!("\"to\" entry {user:?} {why}")))?;
                }
                RequestBody::Send {
                    to,
                    content: self.content(binary)?,
                }
            }
            "join" => RequestBody::Join {
                room: self.room()?,
                since: self.optional("since", "a non-negative integer offset")?,
                epoch: self.optional("epoch", "the epoch string from an earlier ack")?,
            },
            "leave" => RequestBody::Leave { room: self.room()? },
            "publish" => RequestBody::Publish {
                room: self.room()?,
                content: self.content(binary)?,
                echo: self.optional("echo", "true or false")?.unwrap_or(true),
                persist: self.optional("persist", "true or false")?.unwrap_or(true),
            },
            "members" => self.members()?,
            "presence" => RequestBody::Presence {
                users: self.users("users")?,
            },
            "broadcast" => RequestBody::Broadcast {
                content: self.content(binary)?,
            },
            "ping" => RequestBody::Ping,
            "auth" => RequestBody::Auth {
                token: self.token()?,
            },
            "refresh" => RequestBody::Refresh {
                token: self.token()?,
            },
            "history" => self.history()?,
            "ack" => RequestBody::Ack {
                inbox: self.required("inbox", "a non-negative integer offset")?,
            },
            other => {
                return Err(ProtocolError::new(
                    ErrorCode::UnknownType,
                    format!("unknown request type {other:?}"),
                    self.id.clone(),
                ));
            }
        };
        Ok(Request { id: self.id, body })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(frame: &str) -> ProtocolError {
        parse_text(frame.as_bytes()).unwrap_err()
    }

    #[test]
    fn send_keeps_content_verbatim() {
        let request = parse_text(
            br#"{"type":"send","to":["alice","bob"],"content":{"a": [1, 2]},"id":"c1"}"#,
        )
        .unwrap();
        assert_eq!(request.id.as_deref(), Some("c1"));
        let RequestBody::Send { to, content } = request.body else {
            panic!("not a send");
        };
        assert_eq!(to, ["alice", "bob"]);
        let Payload::Json(raw) = content else {
            panic!("not json")
        };
        assert_eq!(raw.get(), r#"{"a": [1, 2]}"#);
    }

    #[test]
    fn publish_defaults_to_echo_and_persist() {
        let request = parse_text(br#"{"type":"publish","room":"lobby","content":"hi"}"#).unwrap();
        assert!(matches!(
            request.body,
            RequestBody::Publish {
                echo: true,
                persist: true,
                ..
            }
        ));
    }

    #[test]
    fn errors_name_the_field_and_keep_the_id() {
        let error = error_of(r#"{"type":"send","to":"alice","content":1,"id":"x"}"#);
        assert_eq!(error.code, ErrorCode::InvalidField);
        assert!(error.message.contains("\"to\""), "{}", error.message);
        assert_eq!(error.id.as_deref(), Some("x"));

        let error = error_of(r#"{"type":"join","id":"j"}"#);
        assert!(error.message.contains("\"room\" is required"));

        let error = error_of(r#"{"type":"publish","room":"a b","content":1}"#);
        assert!(error.message.contains("whitespace"));
    }

    #[test]
    fn unknown_and_missing_types_are_distinguished_from_bad_json() {
        assert_eq!(error_of("not json").code, ErrorCode::InvalidJson);
        assert_eq!(error_of("[1,2]").code, ErrorCode::InvalidJson);
        assert_eq!(error_of(r#"{"id":"1"}"#).code, ErrorCode::UnknownType);
        let error = error_of(r#"{"type":"teleport","id":"t"}"#);
        assert_eq!(error.code, ErrorCode::UnknownType);
        assert_eq!(error.id.as_deref(), Some("t"));
    }

    #[test]
    fn a_field_named_twice_is_refused_whichever_it_is() {
        for frame in [
            r#"{"type":"ping","id":"a","id":"b"}"#,
            r#"{"type":"ping","type":"join","room":"r"}"#,
            r#"{"type":"publish","room":"a","room":"b","content":1}"#,
        ] {
            let error = error_of(frame);
            assert_eq!(error.code, ErrorCode::InvalidJson, "{frame}");
            assert!(error.message.contains("appears twice"), "{}", error.message);
        }
    }

    #[test]
    fn empty_recipient_list_is_refused() {
        let error = error_of(r#"{"type":"send","to":[],"content":1}"#);
        assert_eq!(error.code, ErrorCode::InvalidField);
    }

    #[test]
    fn binary_frames_carry_content_after_the_header() {
        let frame = binary::join(br#"{"type":"publish","room":"r","id":"b"}"#, b"\x00\x01");
        let request = parse_binary(&frame).unwrap();
        let RequestBody::Publish { content, .. } = request.body else {
            panic!("not a publish")
        };
        assert_eq!(content, Payload::Binary(Bytes::from_static(b"\x00\x01")));

        let frame = binary::join(br#"{"type":"join","room":"r"}"#, b"");
        assert_eq!(
            parse_binary(&frame).unwrap_err().code,
            ErrorCode::InvalidField
        );
    }

    #[test]
    fn join_reads_since_and_epoch_and_stays_compatible_without_them() {
        let request =
            parse_text(br#"{"type":"join","room":"lobby","since":41,"epoch":"e1"}"#).unwrap();
        assert_eq!(
            request.body,
            RequestBody::Join {
                room: "lobby".into(),
                since: Some(41),
                epoch: Some("e1".into()),
            }
        );
        let request = parse_text(br#"{"type":"join","room":"lobby"}"#).unwrap();
        assert_eq!(
            request.body,
            RequestBody::Join {
                room: "lobby".into(),
                since: None,
                epoch: None,
            }
        );
        let error = error_of(r#"{"type":"join","room":"lobby","since":"7"}"#);
        assert!(error.message.contains("\"since\""), "{}", error.message);
    }

    #[test]
    fn members_pages_with_after_and_limit() {
        let request =
            parse_text(br#"{"type":"members","room":"lobby","after":"bob","limit":2}"#).unwrap();
        assert_eq!(
            request.body,
            RequestBody::Members {
                room: "lobby".into(),
                after: Some("bob".into()),
                limit: Some(2),
            }
        );
        for (frame, field) in [
            (r#"{"type":"members","room":"a","limit":0}"#, "\"limit\""),
            (r#"{"type":"members","room":"a","after":7}"#, "\"after\""),
            (r#"{"type":"members","room":"a","after":""}"#, "\"after\""),
        ] {
            let error = error_of(frame);
            assert!(error.message.contains(field), "{frame}: {}", error.message);
        }
    }

    #[test]
    fn history_names_a_room_or_a_user_and_checks_its_numbers() {
        let request =
            parse_text(br#"{"type":"history","room":"lobby","before":10,"limit":5}"#).unwrap();
        assert_eq!(
            request.body,
            RequestBody::History {
                target: HistoryTarget::Room("lobby".into()),
                before: Some(10),
                limit: Some(5),
            }
        );
        let request = parse_text(br#"{"type":"history","with":"bob"}"#).unwrap();
        assert_eq!(
            request.body,
            RequestBody::History {
                target: HistoryTarget::With("bob".into()),
                before: None,
                limit: None,
            }
        );
        for (frame, field) in [
            (r#"{"type":"history"}"#, "\"with\""),
            (r#"{"type":"history","room":"a","with":"b"}"#, "not both"),
            (r#"{"type":"history","room":"a","limit":0}"#, "\"limit\""),
            (r#"{"type":"history","room":"a","limit":-3}"#, "\"limit\""),
            (
                r#"{"type":"history","room":"a","before":1.5}"#,
                "\"before\"",
            ),
            (r#"{"type":"history","with":"b c"}"#, "\"with\""),
        ] {
            let error = error_of(frame);
            assert_eq!(error.code, ErrorCode::InvalidField, "{frame}");
            assert!(error.message.contains(field), "{frame}: {}", error.message);
        }
    }

    #[test]
    fn inbox_ack_needs_an_offset() {
        let request = parse_text(br#"{"type":"ack","inbox":12,"id":"a"}"#).unwrap();
        assert_eq!(request.body, RequestBody::Ack { inbox: 12 });
        let error = error_of(r#"{"type":"ack"}"#);
        assert!(error.message.contains("\"inbox\" is required"));
        let error = error_of(r#"{"type":"ack","inbox":-1}"#);
        assert_eq!(error.code, ErrorCode::InvalidField);
    }

    #[test]
    fn hostile_input_never_panics() {
        let inputs: [&[u8]; 8] = [
            b"",
            b"{",
            b"{\"type\":",
            b"\xff\xfe",
            b"{\"type\":\"send\",\"to\":[1,2],\"content\":null}",
            b"{\"type\":\"join\",\"room\":\"\",\"since\":-1}",
            b"{\"type\":\"join\",\"room\":\"r\",\"since\":1e400}",
            b"{\"\\ud800\":1}",
        ];
        for input in inputs {
            assert!(parse_text(input).is_err());
        }
    }
}
