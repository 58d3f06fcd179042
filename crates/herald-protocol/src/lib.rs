//! Herald's wire protocol, shared by the server, the Rust client, the tests and the bench tool.
//!
//! Everything here is plain data and pure functions: no I/O, no async runtime.
//!
//! # Layout
//! - [`request`]: what a client sends (`send`, `join`, `publish`, …) and the strict parser that
//!   turns a text or binary frame into a validated [`Request`], or an [`ProtocolError`] that
//!   names the problem and echoes the request id.
//! - [`event`]: what the server sends (`welcome`, `message`, `joined`, `ack`, `error`, …), with
//!   an encoder used once per message and a decoder for clients.
//! - [`codes`]: error codes carried in `error` frames and WebSocket close codes.
//! - [`binary`]: the framing of binary payloads (a JSON header plus raw bytes in one frame).
//!
//! The full specification, with an example of every frame, is `docs/protocol.md`.

pub mod binary;
pub mod codes;
pub mod event;
pub mod names;
pub mod request;

pub use codes::{CloseCode, ErrorCode};
pub use event::{
    Ack, ContentEncoding, ErrorEvent, History, Members, Message, Pong, PresenceDiff, PresenceReply,
    RefreshNotice, ServerEvent, Welcome,
};
pub use request::{HistoryTarget, Payload, ProtocolError, Request, RequestBody};
