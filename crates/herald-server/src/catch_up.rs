//! Catching one connection up on a stream (a room joined with `since`, its inbox at connect)
//! with no gap and no duplicate at the seam between stored and live messages.
//!
//! The race: a message committed while the stored ones are being read may reach the
//! connection both ways, or, read too early, neither. It is closed like this:
//! 1. before the connection is attached to the stream, its handle starts holding that stream's
//!    live frames ([`ConnHandle::begin_catch_up`]);
//! 2. the stored messages are read (every message committed before the read is in it; every
//!    one committed after reaches the hub after its commit, so it is held);
//! 3. [`Replay::run`] sends the stored messages, then the held frames whose offset is above the
//!    last one sent, and switches the handle to live once nothing is held;
//! 4. a message read in step 2 may have its fan-out still queued behind the commit: the live
//!    handle drops frames of the stream up to the last replayed offset until a newer one
//!    passes.

use std::time::{Duration, Instant};

use base64::Engine;
use herald_protocol::{ContentEncoding, Message, Payload};
use serde_json::value::RawValue;

use crate::delivery::{OutFrame, Outgoing};
use crate::engine::store::{Offset, StoredMessage};
use crate::hub::{ConnHandle, StreamKey};
use crate::node::encode;

/// Stored messages to send to one connection before its held live frames.
pub struct Replay {
    handle: ConnHandle,
    key: StreamKey,
    /// The highest offset sent or known to the client: nothing at or below it is sent again.
    last: Offset,
    queued: Vec<StoredMessage>,
    wait: Duration,
    finished: bool,
}

impl Replay {
    /// For a handle already catching up on `key`. `seen`: offsets the client has (or has
    /// acknowledged). `wait`: how long one frame may wait for room in the outbox before the
    /// connection is cut off as too slow.
    pub fn new(handle: ConnHandle, key: StreamKey, seen: Offset, wait: Duration) -> Replay {
        Replay {
            handle,
            key,
            last: seen,
            queued: Vec::new(),
            wait,
            finished: false,
        }
    }

    /// Keeps stored messages to send when the replay runs.
    pub fn queue(&mut self, messages: Vec<StoredMessage>) {
        self.queued.extend(messages);
    }

    /// Sends stored messages now (ascending offsets). Returns false when the connection went
    /// away.
    pub async fn send(&mut self, messages: Vec<StoredMessage>) -> bool {
        for message in messages {
            if message.offset <= self.last {
                continue;
            }
            self.last = message.offset;
            let frame = Outgoing {
                frame: encode_stored(message),
                accepted: Instant::now(),
            };
            if !self.handle.send(frame, self.wait).await {
                return false;
            }
        }
        true
    }

    /// Sends the queued messages and then the held frames, and goes live. Returns false when
    /// the connection went away first.
    pub async fn run(mut self) -> bool {
        let queued = std::mem::take(&mut self.queued);
        if !self.send(queued).await {
            return false;
        }
        while let Some(held) = self.handle.take_held(&self.key, self.last.0) {
            for (offset, frame) in held {
                if let Some(offset) = offset {
                    if offset <= self.last.0 {
                        continue;
                    }
                    self.last = Offset(offset);
                }
                if !self.handle.send(frame, self.wait).await {
                    return false;
                }
            }
        }
        self.finished = true;
        true
    }
}

impl Drop for Replay {
    /// A replay abandoned (an error, a closed connection) still releases what it held.
    fn drop(&mut self) {
        if !self.finished {
            self.handle.end_catch_up(&self.key);
        }
    }
}

/// The frame of a stored message, in the same wire form as when it was live.
pub fn encode_stored(message: StoredMessage) -> OutFrame {
    let (header, content) = split(message);
    encode(header, content)
}

/// A stored message as an element of a `history` reply (JSON only: binary content becomes a
/// base64 string marked with `encoding`).
pub fn history_message(message: StoredMessage) -> Message {
    let (mut header, content) = split(message);
    match content {
        Payload::Json(raw) => header.content = Some(raw),
        Payload::Binary(bytes) => {
            let text = base64::engine::general_purpose::STANDARD.encode(&bytes);
            // A base64 string quoted is always valid JSON.
            header.content = RawValue::from_string(format!("\"{text}\"")).ok();
            header.encoding = Some(ContentEncoding::Base64);
        }
    }
    header
}

fn split(message: StoredMessage) -> (Message, Payload) {
    (
        Message {
            id: message.id,
            from: message.from,
            to: message.to,
            room: message.room,
            content: None,
            ts: message.ts,
            offset: Some(message.offset.0),
            encoding: None,
        },
        message.content,
    )
}
