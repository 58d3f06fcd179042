//! Retries of stored messages. A `publish` or `send` whose `id` its user already sent, with
//! the same request, within `limits.idempotency_window`, is answered with the first one's
//! `ack` (same message id and offsets) and not stored again.
//!
//! Why: a connection that closes (shutdown, slow consumer, kick, a lost network) can have
//! stored messages whose acks never reached the client, and a client that retries them after
//! reconnecting would otherwise store each one twice under new ids.
//!
//! A retry is recognised by the user, the request `id` and a fingerprint of the request (its
//! type, target and content): the same `id` with a different request is a new message, so a
//! client that numbers its requests afresh on each connection loses nothing, it only gets no
//! deduplication. A retry that arrives while the first is still being stored waits for its ack.
//!
//! This node's memory is the fast path. A new request's [`IdempotencyKey`] also goes with its
//! append, so that a store shared by several nodes (Redis) recognises a retry that reaches
//! another node, or follows a reply lost to a timeout (see the store's contract).
//!
//! Invariants, which bound the memory:
//! - at most `limits.idempotency_keys_per_user` entries per user; the oldest goes first;
//! - an entry is forgotten once the window has passed: a user's expired entries go when that
//!   user sends again, and a sweep over every user runs at most once per window;
//! - entries live on the node that stored the message.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use herald_protocol::{Ack, Payload};
use tokio::sync::watch;
use xxhash_rust::xxh3::Xxh3;

use crate::engine::store::IdempotencyKey;

/// The ids remembered on this node, per user.
pub struct Idempotency {
    window: Duration,
    per_user: usize,
    /// User → entries, oldest first. Each shard lock is held for one lookup, never across an
    /// `.await`.
    users: DashMap<Arc<str>, VecDeque<Entry>>,
    /// When the last sweep over every user ran. std Mutex: only `try_lock`ed, so a sweep never
    /// makes a request wait.
    last_sweep: Mutex<Instant>,
}

struct Entry {
    id: Box<str>,
    fingerprint: u128,
    at: Instant,
    /// The first attempt's ack (without `ref`), once stored.
    ack: watch::Receiver<Option<Ack>>,
}

/// What a stored message's request is, for telling a retry from a new message.
pub enum Target<'a> {
    Room(&'a str),
    Users(&'a [String]),
}

/// What to do with a request.
pub enum Claim {
    /// Not seen before: store it, then hand its ack to the recorder.
    New(Recorder),
    /// A retry: answer with this ack (once the first attempt has it).
    Retry(watch::Receiver<Option<Ack>>),
}

/// Records the ack of a first attempt. Dropped without recording (the store failed), the
/// entry no longer counts, and a retry is stored as a new message.
pub struct Recorder {
    ack: watch::Sender<Option<Ack>>,
    key: IdempotencyKey,
}

impl Recorder {
    /// The request's key, for the store to recognise retries that reach other nodes.
    pub fn key(&self) -> IdempotencyKey {
        self.key.clone()
    }

    pub fn record(self, ack: &Ack) {
        self.ack.send_replace(Some(Ack {
            reference: None,
            ..ack.clone()
        }));
    }
}

impl Idempotency {
    /// `window` zero turns retries off: every request is new and nothing is kept.
    pub fn new(window: Duration, per_user: usize) -> Self {
        Idempotency {
            window,
            per_user,
            users: DashMap::new(),
            last_sweep: Mutex::new(Instant::now()),
        }
    }

    /// Looks `id` up for `user`, or remembers it as new. `None` when retries are off.
    pub fn claim(
        &self,
        user: &Arc<str>,
        id: &str,
        kind: &str,
        target: Target<'_>,
        content: &Payload,
    ) -> Option<Claim> {
        if self.window.is_zero() {
            return None;
        }
        let now = Instant::now();
        self.sweep_if_due(now);
        let fingerprint = fingerprint(kind, &target, content);
        let mut entries = self.users.entry(user.clone()).or_default();
        while entries
            .front()
            .is_some_and(|entry| now.duration_since(entry.at) >= self.window)
        {
            entries.pop_front();
        }
        if let Some(entry) = entries
            .iter()
            .rev()
            .find(|entry| &*entry.id == id && entry.fingerprint == fingerprint)
        {
            let failed = entry.ack.borrow().is_none() && entry.ack.has_changed().is_err();
            if !failed {
                return Some(Claim::Retry(entry.ack.clone()));
            }
        }
        if entries.len() >= self.per_user {
            entries.pop_front();
        }
        let (sender, ack) = watch::channel(None);
        entries.push_back(Entry {
            id: id.into(),
            fingerprint,
            at: now,
            ack,
        });
        Some(Claim::New(Recorder {
            ack: sender,
            key: IdempotencyKey {
                request: id.to_owned(),
                fingerprint,
                window: self.window,
            },
        }))
    }

    /// Drops every expired entry, and users left with none, at most once per window.
    fn sweep_if_due(&self, now: Instant) {
        let Ok(mut last) = self.last_sweep.try_lock() else {
            return;
        };
        if now.duration_since(*last) < self.window {
            return;
        }
        *last = now;
        drop(last);
        self.users.retain(|_, entries| {
            entries.retain(|entry| now.duration_since(entry.at) < self.window);
            !entries.is_empty()
        });
    }

    /// Entries held, for tests of the bounds.
    pub fn len(&self) -> usize {
        self.users.iter().map(|entries| entries.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// XXH3-128 of the request's type, target and content: a retry repeats them byte for byte.
/// Each part is length-prefixed, so no two requests feed the same bytes; the algorithm is
/// fixed, so every node (whatever its build) computes the same fingerprint.
fn fingerprint(kind: &str, target: &Target<'_>, content: &Payload) -> u128 {
    let mut hasher = Xxh3::new();
    let mut part = |tag: u8, bytes: &[u8]| {
        hasher.update(&[tag]);
        hasher.update(&(bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    };
    part(b'k', kind.as_bytes());
    match target {
        Target::Room(room) => part(b'r', room.as_bytes()),
        Target::Users(users) => {
            part(b'n', &(users.len() as u64).to_le_bytes());
            for user in *users {
                part(b'u', user.as_bytes());
            }
        }
    }
    match content {
        Payload::Json(raw) => part(b'j', raw.get().as_bytes()),
        Payload::Binary(bytes) => part(b'b', bytes),
    }
    hasher.digest128()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(text: &str) -> Payload {
        Payload::Json(serde_json::value::RawValue::from_string(text.to_owned()).unwrap())
    }

    fn claim(cache: &Idempotency, user: &str, id: &str, text: &str) -> Option<Claim> {
        cache.claim(
            &Arc::from(user),
            id,
            "publish",
            Target::Room("lobby"),
            &json(text),
        )
    }

    #[test]
    fn a_repeated_request_is_a_retry_and_a_changed_one_is_new() {
        let cache = Idempotency::new(Duration::from_secs(60), 10);
        let Some(Claim::New(recorder)) = claim(&cache, "alice", "c1", "\"hi\"") else {
            panic!("first is new")
        };
        recorder.record(&Ack {
            reference: Some("c1".into()),
            id: Some("m1".into()),
            ..Ack::default()
        });
        let Some(Claim::Retry(ack)) = claim(&cache, "alice", "c1", "\"hi\"") else {
            panic!("second is a retry")
        };
        assert_eq!(ack.borrow().as_ref().unwrap().id.as_deref(), Some("m1"));
        assert!(matches!(
            claim(&cache, "alice", "c1", "\"other\""),
            Some(Claim::New(_))
        ));
        assert!(matches!(
            claim(&cache, "bob", "c1", "\"hi\""),
            Some(Claim::New(_))
        ));
    }

    #[test]
    fn a_failed_first_attempt_does_not_block_a_retry() {
        let cache = Idempotency::new(Duration::from_secs(60), 10);
        drop(claim(&cache, "alice", "c1", "1"));
        assert!(matches!(
            claim(&cache, "alice", "c1", "1"),
            Some(Claim::New(_))
        ));
    }

    #[test]
    fn entries_are_capped_per_user_and_off_with_a_zero_window() {
        let cache = Idempotency::new(Duration::from_secs(60), 3);
        let recorders: Vec<_> = (0..10)
            .map(|n| claim(&cache, "alice", &format!("c{n}"), "1"))
            .collect();
        assert_eq!(cache.len(), 3);
        drop(recorders);
        let off = Idempotency::new(Duration::ZERO, 3);
        assert!(claim(&off, "alice", "c1", "1").is_none());
        assert!(off.is_empty());
    }
}
