//! Catching one connection up on a stream (a room joined with `since`, its inbox at connect)
//! with no gap and no duplicate at the seam between stored and live messages, one page at a
//! time.
//!
//! The race: a message committed while the stored ones are being read may reach the
//! connection both ways, or, read too early, neither. It is closed like this:
//! 1. before the connection is attached to the stream, its handle starts holding that stream's
//!    live frames ([`ConnHandle::begin_catch_up`]);
//! 2. a page of stored messages is read (every message committed before the read is in it;
//!    every one committed after reaches the hub after its commit, so it is held);
//! 3. a full page means more is stored: the handle drops the stream's live frames instead of
//!    holding them ([`ConnHandle::skip_live`]; each is committed, so a later read has it), the
//!    page is sent, waiting for room in the outbox, and the next page is read from step 1 on,
//!    after the last offset sent;
//! 4. after a short page, [`Replay::run`] sends it, then the held frames whose offset is above
//!    the last one sent, and switches the handle to live once nothing is held;
//! 5. a message read in step 2 may have its fan-out still queued behind the commit: the live
//!    handle drops frames of the stream up to the last replayed offset until a newer one
//!    passes.
//!
//! So a replay keeps one page in memory, reads the next only once the previous one is in the
//! outbox (the writer drains it meanwhile), and holds live frames only for the last page: a
//! user with any number of pending messages gets them all, in order, with the outbox's bound.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use herald_protocol::{CloseCode, ContentEncoding, Message, Payload};
use serde_json::value::RawValue;

use crate::delivery::{OutFrame, Outgoing};
use crate::engine::fanout::encode;
use crate::engine::store::{Offset, Store, StoreError, StoredMessage};
use crate::hub::control::CloseReason;
use crate::hub::{ConnHandle, StreamKey};

/// Stored messages read per page. Small, so that one page holds a database reader briefly:
/// clients that loop `join` with `since` wait their turn between pages instead of holding
/// readers for long reads (docs/architecture.md, "Store reads").
pub const PAGE: usize = 100;

/// Where a replay reads its next pages.
pub enum Source {
    /// The user's inbox, above the mark of one device (or the user's, without one).
    Inbox {
        user: Arc<str>,
        device: Option<Arc<str>>,
    },
    Room(Arc<str>),
}

impl Source {
    async fn read(
        &self,
        store: &dyn Store,
        after: Offset,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        match self {
            Source::Inbox { user, device } => Ok(store
                .read_inbox(user, device.as_deref(), after, PAGE)
                .await?
                .messages),
            Source::Room(room) => Ok(store.read_room(room, after, PAGE).await?.messages),
        }
    }
}

/// Stored messages to send to one connection before its held live frames.
pub struct Replay {
    handle: ConnHandle,
    key: StreamKey,
    /// The highest offset sent or known to the client: nothing at or below it is sent again.
    last: Offset,
    /// The page read and not sent yet.
    page: Vec<StoredMessage>,
    /// Where the next pages come from; `None` when the page is all there is to send.
    source: Option<(Arc<dyn Store>, Source)>,
    wait: Duration,
    finished: bool,
}

impl Replay {
    /// For a handle already catching up on `key`, which sends `page` and nothing more. `seen`:
    /// offsets the client has (or has acknowledged). `wait`: how long one frame may wait for
    /// room in the outbox before the connection is cut off as too slow.
    pub fn new(
        handle: ConnHandle,
        key: StreamKey,
        seen: Offset,
        wait: Duration,
        page: Vec<StoredMessage>,
    ) -> Replay {
        Replay {
            handle,
            key,
            last: seen,
            page,
            source: None,
            wait,
            finished: false,
        }
    }

    /// Like [`new`](Self::new), where `page` is the first page read from `source` (at most
    /// [`PAGE`] messages after `seen`): a full page is followed by the next ones.
    pub fn paged(
        handle: ConnHandle,
        key: StreamKey,
        seen: Offset,
        wait: Duration,
        page: Vec<StoredMessage>,
        store: Arc<dyn Store>,
        source: Source,
    ) -> Replay {
        let mut replay = Replay::new(handle, key, seen, wait, page);
        replay.source = Some((store, source));
        replay
    }

    /// Sends stored messages (ascending offsets). Returns false when the connection went away.
    async fn send(&mut self, messages: Vec<StoredMessage>) -> bool {
        let mut sent = 0;
        for message in messages {
            if message.offset <= self.last {
                continue;
            }
            self.last = message.offset;
            let frame = Outgoing::single(encode_stored(message), Instant::now());
            if !self.handle.send(frame, self.wait).await {
                return false;
            }
            sent += 1;
        }
        if self.key == StreamKey::Inbox {
            metrics::counter!("herald_inbox_replayed_total").increment(sent);
        }
        true
    }

    /// Sends the stored messages page by page, then the held frames, and goes live. Returns
    /// false when the connection went away first (or a page could not be read: the connection
    /// is then closed, so that the client reconnects and resumes from what it has).
    pub async fn run(mut self) -> bool {
        loop {
            let page = std::mem::take(&mut self.page);
            let more = self.source.is_some() && page.len() >= PAGE;
            if more {
                self.handle.skip_live(&self.key);
            }
            if !self.send(page).await {
                return false;
            }
            if !more {
                break;
            }
            self.handle.begin_catch_up(self.key.clone());
            let Some((store, source)) = &self.source else {
                break;
            };
            match source.read(store.as_ref(), self.last).await {
                Ok(page) => self.page = page,
                Err(error) => {
                    tracing::warn!(conn = %self.handle.id(), %error, "replay read failed");
                    self.handle
                        .close(CloseReason::Send(CloseCode::INTERNAL_ERROR));
                    return false;
                }
            }
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
