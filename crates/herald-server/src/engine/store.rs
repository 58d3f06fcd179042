//! The store keeps messages: room history, each user's inbox of direct messages, and the
//! direct conversation between two users.
//!
//! # Contract
//! - Streams: every room has one, every user an inbox, every pair of users a conversation.
//!   Offsets in a stream start at 1 and grow by exactly 1 per stored message, with no gap and
//!   no reuse, for as long as the stream's [`Epoch`] lasts. A new epoch (a recreated database)
//!   restarts the offsets, so a client's `(offset, epoch)` position from another epoch is
//!   reported as not recoverable instead of being silently misread.
//! - Append and publish are one operation: [`Store::append_then`] stores the message and hands
//!   its frames ([`fanout::frames`](super::fanout::frames)) to the deployment's broker, and
//!   reports the outcome only once both are done, so the sender is told only about a durable,
//!   delivered message. Each stream's frames are published in offset order, whichever
//!   node appends (a networked store assigns the offset and publishes in one atomic step), which
//!   is what lets a catching-up connection drop what it already replayed by offset alone.
//! - A direct message is stored in the conversation of the sender with each recipient and
//!   appended to each recipient's inbox. An inbox keeps acknowledged marks, each the highest
//!   offset confirmed: the user's, raised by every acknowledgement, and one per device that
//!   acknowledged with its id, raised by that device's only. Pending entries are those above
//!   the reader's mark: the device's, or for a device without one yet, the user's *floor* (the
//!   lowest of its device marks, or the user's mark while it has none); without a device, the
//!   user's mark. Acknowledging never moves a mark backwards nor past the inbox's newest offset.
//!   A user keeps at most [`StoreLimits::max_devices_per_user`] device marks: a new one evicts
//!   the one acknowledged least recently (that device then reads as a new one).
//! - Entries at or below the floor were delivered to every device and may be pruned.
//! - Reads see a consistent snapshot of committed data; pages come oldest first.
//! - Pruning removes whole prefixes of streams (oldest first), in small steps between appends,
//!   so retention never leaves a hole in the middle of a stream nor stalls the writer for long.
//!   An inbox or conversation it empties by age (not an inbox emptied by acknowledgements) is
//!   removed altogether: a later message recreates it with a new epoch.
//! - Retries: a message may carry an [`IdempotencyKey`]. A store shared by several nodes (Redis)
//!   records the key with the message's result, for the key's window, beside the data it
//!   protects, and answers a later append with the same key (from any node, or after a reply
//!   lost to a timeout) with the first attempt's message id, timestamp and positions, storing
//!   and publishing nothing again; it completes a direct message the first attempt left half
//!   done under the first attempt's id. A store that only one node uses (SQLite) ignores the
//!   key: the node's own memory of its requests ([`crate::idempotency`]) covers that case.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use herald_protocol::Payload;
use tokio::sync::oneshot;

use crate::delivery::ConnId;

/// A position in one stream. Starts at 1; 0 means "before the first message".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Offset(pub u64);

impl Offset {
    pub fn next(self) -> Offset {
        Offset(self.0 + 1)
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Identifies one life of a stream: chosen at random when the stream is created.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Epoch(pub String);

impl Epoch {
    pub fn random() -> Epoch {
        Epoch(format!("{:016x}", rand::random::<u64>()))
    }

    /// The epoch of a stream that has never stored a message.
    pub fn is_unset(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An offset with the epoch it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StreamPosition {
    pub offset: Offset,
    pub epoch: Epoch,
}

/// A message accepted by the node, before it has a position.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub id: String,
    pub from: Arc<str>,
    /// Unix milliseconds.
    pub ts: u64,
    pub content: Payload,
    /// Set when the sender may retry the request that carried this message (see the
    /// contract).
    pub idempotency: Option<IdempotencyKey>,
}

/// Identifies a request of the message's sender (`from`) that may come again: its `id` and a
/// fingerprint of the rest (type, target, content). A repeat within `window` is the same
/// message; the same `request` with another fingerprint is a new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    pub request: String,
    /// Stable across processes and builds, so every node computes the same one.
    pub fingerprint: u128,
    pub window: Duration,
}

/// What to append.
#[derive(Debug, Clone)]
pub enum Append {
    Room {
        room: Arc<str>,
        message: NewMessage,
    },
    /// `recipients` are distinct; `to` is the recipient list as the sender wrote it, which every
    /// copy carries.
    Direct {
        to: Vec<String>,
        recipients: Vec<String>,
        message: NewMessage,
    },
}

/// The result of an append, handed back with the message so the caller can fan it out.
#[derive(Debug, Clone)]
pub enum Appended {
    Room {
        room: Arc<str>,
        message: NewMessage,
        position: StreamPosition,
    },
    Direct {
        to: Vec<String>,
        message: NewMessage,
        /// For each recipient, in the order given: the offset in their inbox.
        inbox: Vec<(String, Offset)>,
    },
}

/// An append on its way: resolves once the message is stored and published, or has failed.
pub type Committing = futures::future::BoxFuture<'static, Result<Appended, StoreError>>;

/// What an append calls once the message is stored and published, or has failed: exactly
/// once, on the store's side (the embedded store's publishing task, a networked store's
/// append task), so no task of the caller's waits for it. Dropped uncalled (a store that
/// stopped holding it), it is called with [`StoreError::Closed`]. It must not block.
pub struct OnCommit(Then);

/// What an append comes to.
type Outcome = Result<Appended, StoreError>;

enum Then {
    Call(Box<dyn FnOnce(Outcome) + Send>),
    /// For [`Store::append`]'s future: no closure to allocate.
    Reply(oneshot::Sender<Outcome>),
    Called,
}

impl OnCommit {
    pub fn new(then: impl FnOnce(Outcome) + Send + 'static) -> Self {
        OnCommit(Then::Call(Box::new(then)))
    }

    pub fn call(mut self, outcome: Outcome) {
        self.take(outcome);
    }

    fn take(&mut self, outcome: Outcome) {
        match std::mem::replace(&mut self.0, Then::Called) {
            Then::Call(then) => then(outcome),
            Then::Reply(reply) => {
                let _ = reply.send(outcome);
            }
            Then::Called => {}
        }
    }
}

impl Drop for OnCommit {
    fn drop(&mut self) {
        self.take(Err(StoreError::Closed));
    }
}

impl fmt::Debug for OnCommit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OnCommit")
    }
}

/// A message read back from a stream.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    pub id: String,
    pub from: String,
    /// Direct messages: the recipients as sent.
    pub to: Option<Vec<String>>,
    /// Room messages: the room.
    pub room: Option<String>,
    pub ts: u64,
    pub content: Payload,
    pub offset: Offset,
}

/// A stream's bounds at the moment of a read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StreamBounds {
    /// The newest offset and the epoch (offset 0 and an unset epoch for an empty stream).
    pub top: StreamPosition,
    /// The oldest offset still stored; `top + 1` when nothing is.
    pub first: Offset,
}

/// Messages read in one snapshot, with the stream's bounds in that snapshot.
#[derive(Debug, Clone, Default)]
pub struct StreamRead {
    pub bounds: StreamBounds,
    /// Ascending by offset.
    pub messages: Vec<StoredMessage>,
}

/// One page of history.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub epoch: Epoch,
    /// Ascending by offset.
    pub messages: Vec<StoredMessage>,
    /// Older messages exist before the first one.
    pub more: bool,
}

/// Inbox entries above the acknowledged mark.
#[derive(Debug, Clone, Default)]
pub struct InboxRead {
    /// The mark read from (the device's, its floor, or the user's).
    pub acked: Offset,
    /// With a device: whether it has a mark of its own (false: it read from the floor).
    pub device_has_mark: bool,
    /// Ascending by inbox offset; each message's `offset` is its inbox offset.
    pub messages: Vec<StoredMessage>,
}

/// Bounds a store keeps per user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreLimits {
    /// Device marks one user's inbox keeps (see the contract).
    pub max_devices_per_user: usize,
    /// Entries one inbox holds above its floor; a direct message to a user at this bound is
    /// refused ([`StoreError::InboxFull`]). 0: no bound.
    pub max_inbox_messages: u64,
}

impl Default for StoreLimits {
    fn default() -> Self {
        StoreLimits {
            max_devices_per_user: 16,
            max_inbox_messages: 100_000,
        }
    }
}

/// How long messages are kept. A zero count or duration means "no limit".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Retention {
    pub room_max_messages: u64,
    pub room_max_age: Duration,
    /// Direct messages: the inbox entries and the conversation copies.
    pub inbox_max_age: Duration,
}

/// What one pruning pass removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PruneReport {
    pub room_messages: u64,
    pub direct_messages: u64,
    pub inbox_entries: u64,
    /// Inboxes and conversations that retention emptied by age, removed with their positions;
    /// not counted in [`total`](Self::total), which counts messages.
    pub empty_streams: u64,
}

impl PruneReport {
    pub fn total(&self) -> u64 {
        self.room_messages + self.direct_messages + self.inbox_entries
    }
}

/// Why the store failed. Opening errors name the file; others the operation.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("store {operation} failed: {reason}")]
    Backend {
        operation: &'static str,
        reason: String,
    },
    #[error("inbox offset {requested} is beyond the newest inbox offset {newest}")]
    AckBeyondInbox { requested: u64, newest: u64 },
    #[error(
        "the inbox of {} holds {limit} unacknowledged messages, the most it keeps \
         (store.max_inbox_messages)",
        users.join(", ")
    )]
    InboxFull { users: Vec<String>, limit: u64 },
    #[error("the store is closed")]
    Closed,
    /// The backend cannot be reached now (a networked store); nothing was stored.
    #[error("store {operation} failed, the backend is unreachable: {reason}")]
    Unavailable {
        operation: &'static str,
        reason: String,
    },
}

#[async_trait]
pub trait Store: Send + Sync {
    /// Queues an append that publishes the message's frames, skipping the connection `except`
    /// (see the contract), and calls `then` with its outcome once it is stored and published.
    /// Waits only while the store's bounded queue is full; appends queued one after another by
    /// one caller commit, publish and call `then` in that order. A closed store calls `then`
    /// at once with [`StoreError::Closed`].
    async fn append_then(&self, append: Append, except: Option<ConnId>, then: OnCommit);

    /// The room's messages with offsets in `after+1 ..`, at most `limit`, with the bounds.
    async fn read_room(
        &self,
        room: &str,
        after: Offset,
        limit: usize,
    ) -> Result<StreamRead, StoreError>;

    /// The room's bounds only.
    async fn room_bounds(&self, room: &str) -> Result<StreamBounds, StoreError>;

    /// The newest `limit` messages of a room with offsets below `before` (all when `None`).
    async fn room_history(
        &self,
        room: &str,
        before: Option<Offset>,
        limit: usize,
    ) -> Result<Page, StoreError>;

    /// Like `room_history`, for the direct conversation between two users.
    async fn conversation_history(
        &self,
        user: &str,
        with: &str,
        before: Option<Offset>,
        limit: usize,
    ) -> Result<Page, StoreError>;

    /// False only when `user`'s inbox certainly holds nothing above its floor, so the inbox
    /// read at connect can be skipped. A store that does not track it says true.
    fn inbox_may_hold_unacked(&self, _user: &str) -> bool {
        true
    }

    /// Inbox entries above `max(after, mark)`, at most `limit`, where the mark is `device`'s
    /// (or the user's floor while it has none) or, without a device, the user's.
    async fn read_inbox(
        &self,
        user: &str,
        device: Option<&str>,
        after: Offset,
        limit: usize,
    ) -> Result<InboxRead, StoreError>;

    /// Raises the user's mark, and `device`'s when given, to `offset`; returns the mark after
    /// (the device's when given).
    async fn ack_inbox(
        &self,
        user: &str,
        device: Option<&str>,
        offset: Offset,
    ) -> Result<Offset, StoreError>;

    /// Removes what `retention` no longer covers at time `now_ms`.
    async fn prune(&self, retention: Retention, now_ms: u64) -> Result<PruneReport, StoreError>;

    /// Finishes queued appends and releases the database; later calls fail with `Closed`.
    async fn close(&self);

    /// Whether the backend answers now (for readiness checks).
    async fn ready(&self) -> bool {
        true
    }
}

impl dyn Store + '_ {
    /// [`append_then`](Store::append_then) with its outcome as a future, which a closed store
    /// resolves at once. Not a trait method: this future is not boxed again.
    pub async fn append(&self, append: Append, except: Option<ConnId>) -> Committing {
        let (reply, outcome) = oneshot::channel();
        let then = OnCommit(Then::Reply(reply));
        self.append_then(append, except, then).await;
        Box::pin(async move { outcome.await.unwrap_or(Err(StoreError::Closed)) })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    fn recording() -> (OnCommit, Arc<Mutex<Vec<String>>>) {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let record = calls.clone();
        let then = OnCommit::new(move |outcome: Result<Appended, StoreError>| {
            let outcome = outcome.map(|_| "stored".to_owned());
            record
                .lock()
                .unwrap()
                .push(outcome.unwrap_or_else(|error| error.to_string()));
        });
        (then, calls)
    }

    #[test]
    fn an_on_commit_dropped_uncalled_reports_the_store_closed() {
        let (then, calls) = recording();
        drop(then);
        assert_eq!(*calls.lock().unwrap(), [StoreError::Closed.to_string()]);
    }

    #[test]
    fn an_on_commit_called_is_called_once() {
        let (then, calls) = recording();
        then.call(Err(StoreError::Unavailable {
            operation: "append",
            reason: "down".into(),
        }));
        assert_eq!(calls.lock().unwrap().len(), 1);
    }
}
