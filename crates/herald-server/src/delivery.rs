//! What travels from a publisher to the writers: an encoded frame, where it goes, and whom to
//! skip. These types are shared by the hub, the engines and the connections.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;

use crate::deflate::SharedDeflate;

/// A connection id, unique across nodes: a random per-process base plus a counter, so two nodes
/// collide only if their 2^64 ranges overlap within the counter's reach (negligible).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl std::str::FromStr for ConnId {
    type Err = std::num::ParseIntError;

    /// Reads the 16 hex digits that `Display` writes.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        u64::from_str_radix(text, 16).map(ConnId)
    }
}

/// As its 16 hex digits, the form clients see in `welcome` and the server API.
impl serde::Serialize for ConnId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ConnId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Hands out [`ConnId`]s for one process.
pub struct ConnIds {
    next: AtomicU64,
}

impl ConnIds {
    pub fn new() -> Self {
        ConnIds {
            next: AtomicU64::new(rand::random()),
        }
    }

    pub fn next(&self) -> ConnId {
        ConnId(self.next.fetch_add(1, Ordering::Relaxed))
    }
}

impl Default for ConnIds {
    fn default() -> Self {
        Self::new()
    }
}

/// One encoded WebSocket message. Cloning shares the bytes: the same allocation goes to every
/// recipient's writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutFrame {
    Text(Bytes),
    Binary(Bytes),
}

impl OutFrame {
    pub fn len(&self) -> usize {
        match self {
            OutFrame::Text(bytes) | OutFrame::Binary(bytes) => bytes.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The frame's bytes, and whether it is a binary frame.
    pub fn parts(&self) -> (&Bytes, bool) {
        match self {
            OutFrame::Text(bytes) => (bytes, false),
            OutFrame::Binary(bytes) => (bytes, true),
        }
    }
}

/// A frame in one connection's outbox, with the moment its message reached the hub, from which
/// the writer measures delivery latency.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub frame: OutFrame,
    pub accepted: Instant,
    /// The message's compressed forms, shared by its recipients; present on a fan-out's frames
    /// when the node compresses and the message is large enough.
    pub deflate: Option<Arc<SharedDeflate>>,
}

impl Outgoing {
    /// A frame for one connection only: nobody shares its compressed form.
    pub fn single(frame: OutFrame, accepted: Instant) -> Self {
        Outgoing {
            frame,
            accepted,
            deflate: None,
        }
    }
}

/// A fan-out destination, shared by every node through the broker.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Channel {
    /// Every connection that joined the room.
    Room(Arc<str>),
    /// Every connection of one user.
    User(Arc<str>),
    /// Every connection.
    All,
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Channel::Room(room) => write!(f, "room:{room}"),
            Channel::User(user) => write!(f, "user:{user}"),
            Channel::All => f.write_str("all"),
        }
    }
}

/// A frame on its way to a channel's connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub frame: OutFrame,
    /// A connection that must not receive it (the publisher, when it asked for no echo).
    pub except: Option<ConnId>,
    /// The message's offset in the channel's stream (the room, or the user's inbox) when it was
    /// stored: a connection catching up on that stream drops what it has already replayed.
    pub offset: Option<u64>,
}

/// A command for the connections on a channel. It travels through the broker like a frame, so
/// it reaches the user's connections on every node, but the node acts on it instead of
/// writing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Close every connection on the channel with this code and reason (server API).
    Disconnect { code: u16, reason: Arc<str> },
}
