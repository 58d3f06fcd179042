//! The hub: this node's connections, indexed by id, by user and by room.
//!
//! It only routes: a frame arrives already encoded (once, by the node) and the same bytes are
//! queued on every recipient's bounded outbox with `try_send`. A full outbox means the consumer
//! is too slow: it is cut off with [`CloseCode::SLOW_CONSUMER`] instead of growing memory or
//! stalling everyone else. Nothing here awaits, so no lock is ever held across an `.await`.
//!
//! A connection catching up on a stream (a room joined with `since`, its inbox at connect)
//! holds that stream's live frames in a bounded buffer of its handle while the node replays
//! stored messages; the node then drains the buffer, dropping frames at or below the last
//! replayed offset, and the handle goes live. The fan-out of a message read from the store may
//! still be on its way at that point, so after the switch the handle keeps dropping frames of
//! that stream at or below the replayed offset until the first newer one passes (a stream's
//! frames arrive in offset order). Whichever side of the switch a live frame lands on, it is
//! delivered once and after the replayed messages.
//!
//! # Invariants
//! - A connection is in `rooms[r]` only while it is in `conns` (the node removes it from its
//!   rooms before unregistering it).
//! - `users[u]` holds exactly the registered connections of `u`; empty entries are removed.
//!
//! [`ConnHandle`] (`handle.rs`) is the hub's handle on one connection, with its catch-up
//! buffers.
//!
//! Below the node and above the engines: [`control`] (what a connection's reader, writer and
//! the hub share to end it), [`outbox`] (the bounded queue of one connection) and
//! [`catch_up`] (replaying stored messages to one connection) live here because the hub's
//! handles hold them; the connection layer above uses them.

pub mod catch_up;
pub mod control;
mod handle;
pub mod outbox;

use handle::StreamKeyRef;
pub use handle::{ConnHandle, HeldFrames, StreamKey};

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use crate::delivery::{ConnId, Delivery, OutFrame, Outgoing};
use crate::hub::control::{CloseReason, ConnControl};

/// Why a connection could not be registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    #[error("this node is at limits.max_connections")]
    NodeFull,
    #[error("this user is at limits.max_connections_per_user")]
    UserFull,
}

#[derive(Default)]
pub struct Hub {
    conns: DashMap<ConnId, ConnHandle>,
    users: DashMap<Arc<str>, Vec<ConnHandle>>,
    rooms: DashMap<Arc<str>, HashMap<ConnId, ConnHandle>>,
    /// Registered connections; kept beside `conns` so the limit check is one atomic step.
    open: AtomicUsize,
    /// The compression threshold when connections may compress (`compression.enabled`): a
    /// fan-out of a message this large carries a
    /// [`SharedDeflate`](crate::deflate::SharedDeflate) for its recipients.
    shared_deflate_from: Option<usize>,
}

impl Hub {
    pub fn new() -> Self {
        Self::default()
    }

    /// A hub whose fan-outs of messages of `threshold` bytes or more let their recipients
    /// share one compression per window size.
    pub fn with_shared_deflate(threshold: usize) -> Self {
        Hub {
            shared_deflate_from: Some(threshold),
            ..Self::default()
        }
    }

    /// Adds a connection, enforcing the node and per-user limits atomically. Returns whether it
    /// is the user's first connection on this node.
    pub fn register(
        &self,
        handle: ConnHandle,
        max_connections: usize,
        max_per_user: usize,
    ) -> Result<bool, RegisterError> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= max_connections {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(RegisterError::NodeFull);
        }
        let mut conns = self.users.entry(handle.user().clone()).or_default();
        if conns.len() >= max_per_user {
            let empty = conns.is_empty();
            drop(conns);
            if empty {
                self.users.remove_if(handle.user(), |_, c| c.is_empty());
            }
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(RegisterError::UserFull);
        }
        let first = conns.is_empty();
        conns.push(handle.clone());
        drop(conns);
        self.conns.insert(handle.id(), handle);
        Ok(first)
    }

    /// Removes a connection. Returns whether it was the user's last connection on this node.
    pub fn unregister(&self, id: ConnId, user: &Arc<str>) -> bool {
        if self.conns.remove(&id).is_none() {
            return false;
        }
        self.open.fetch_sub(1, Ordering::AcqRel);
        match self.users.entry(user.clone()) {
            Entry::Occupied(mut conns) => {
                conns.get_mut().retain(|c| c.id() != id);
                if conns.get().is_empty() {
                    conns.remove();
                    true
                } else {
                    false
                }
            }
            Entry::Vacant(_) => true,
        }
    }

    /// Adds a registered connection to a room. Returns whether it is the room's first local
    /// member (the node then subscribes the room's channel).
    pub fn join(&self, room: &Arc<str>, handle: &ConnHandle) -> bool {
        let mut members = self.rooms.entry(room.clone()).or_default();
        let first = members.is_empty();
        members.insert(handle.id(), handle.clone());
        first
    }

    /// Removes a connection from a room. Returns whether the room has no local member left.
    pub fn leave(&self, room: &str, id: ConnId) -> bool {
        match self.rooms.entry(Arc::from(room)) {
            Entry::Occupied(mut members) => {
                members.get_mut().remove(&id);
                if members.get().is_empty() {
                    members.remove();
                    true
                } else {
                    false
                }
            }
            Entry::Vacant(_) => false,
        }
    }

    /// Open connections of one user on this node.
    pub fn user_connection_count(&self, user: &str) -> usize {
        self.users.get(user).map_or(0, |conns| conns.len())
    }

    pub fn has_room(&self, room: &str) -> bool {
        self.rooms.contains_key(room)
    }

    pub fn has_user(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// Queues a frame for every local member of a room but `except`. Returns how many took it.
    pub fn deliver_to_room(&self, room: &str, delivery: &Delivery) -> usize {
        let Some(members) = self.rooms.get(room) else {
            return 0;
        };
        let outgoing = self.outgoing(&delivery.frame, members.len());
        members
            .values()
            .filter(|handle| Some(handle.id()) != delivery.except)
            .filter(|handle| handle.deliver(StreamKeyRef::Room(room), &outgoing, delivery.offset))
            .count()
    }

    /// Queues a frame for every local connection of a user but `except`.
    pub fn deliver_to_user(&self, user: &str, delivery: &Delivery) -> usize {
        let Some(conns) = self.users.get(user) else {
            return 0;
        };
        let outgoing = self.outgoing(&delivery.frame, conns.len());
        conns
            .iter()
            .filter(|handle| Some(handle.id()) != delivery.except)
            .filter(|handle| handle.deliver(StreamKeyRef::Inbox, &outgoing, delivery.offset))
            .count()
    }

    /// Queues a frame for every local connection but `except`.
    pub fn deliver_to_all(&self, frame: &OutFrame, except: Option<ConnId>) -> usize {
        let outgoing = self.outgoing(frame, self.conns.len());
        self.conns
            .iter()
            .filter(|handle| Some(handle.id()) != except)
            .filter(|handle| handle.offer_outgoing(outgoing.clone()))
            .count()
    }

    /// What each of `recipients` connections gets queued for `frame`: the frame, the moment it
    /// reached the hub (one clock read per message, not per recipient) and, for a message
    /// large enough to be compressed going to several connections, the compressed forms its
    /// recipients share.
    fn outgoing(&self, frame: &OutFrame, recipients: usize) -> Outgoing {
        let deflate = self
            .shared_deflate_from
            .filter(|&threshold| recipients > 1 && frame.len() >= threshold)
            .map(|_| Arc::default());
        Outgoing {
            frame: frame.clone(),
            accepted: Instant::now(),
            deflate,
        }
    }

    /// Asks every local connection of a user to close. Returns how many were asked.
    pub fn close_user(&self, user: &str, reason: &CloseReason) -> usize {
        let Some(conns) = self.users.get(user) else {
            return 0;
        };
        for handle in conns.iter() {
            handle.close(reason.clone());
        }
        conns.len()
    }

    /// Asks every local member of a room to close.
    pub fn close_room(&self, room: &str, reason: &CloseReason) -> usize {
        let Some(members) = self.rooms.get(room) else {
            return 0;
        };
        for handle in members.values() {
            handle.close(reason.clone());
        }
        members.len()
    }

    /// One local connection.
    pub fn connection(&self, id: ConnId) -> Option<ConnHandle> {
        self.conns.get(&id).map(|entry| entry.value().clone())
    }

    /// The local connections of one user.
    pub fn user_connections(&self, user: &str) -> Vec<ConnHandle> {
        self.users
            .get(user)
            .map(|conns| conns.clone())
            .unwrap_or_default()
    }

    /// The rooms one local connection is in, sorted. Scans the rooms: for the server API, not
    /// for a hot path.
    pub fn rooms_of(&self, id: ConnId) -> Vec<Arc<str>> {
        let mut rooms: Vec<Arc<str>> = self
            .rooms
            .iter()
            .filter(|entry| entry.value().contains_key(&id))
            .map(|entry| entry.key().clone())
            .collect();
        rooms.sort_unstable();
        rooms
    }

    /// Every local connection's rooms, in one pass over the rooms.
    pub fn rooms_by_connection(&self) -> HashMap<ConnId, Vec<Arc<str>>> {
        let mut index: HashMap<ConnId, Vec<Arc<str>>> = HashMap::new();
        for entry in self.rooms.iter() {
            for id in entry.value().keys() {
                index.entry(*id).or_default().push(entry.key().clone());
            }
        }
        for rooms in index.values_mut() {
            rooms.sort_unstable();
        }
        index
    }

    /// Open connections on this node.
    pub fn connection_count(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// The registered connection whose control block is `control`. A scan of every connection:
    /// only for the cleanup after a connection's task panicked, which has nothing else left.
    pub fn find_by_control(&self, control: &Arc<ConnControl>) -> Option<ConnHandle> {
        self.conns
            .iter()
            .find(|entry| Arc::ptr_eq(&entry.value().inner.control, control))
            .map(|entry| entry.value().clone())
    }

    /// Every local connection, for shutdown.
    pub fn snapshot(&self) -> Vec<ConnHandle> {
        self.conns
            .iter()
            .map(|entry| entry.value().clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::outbox::Outbox;
    use bytes::Bytes;
    use herald_protocol::CloseCode;

    fn handle(id: u64, user: &str, queue: usize) -> (ConnHandle, Arc<Outbox>, Arc<ConnControl>) {
        let outbox = Arc::new(Outbox::new(queue, 1 << 20));
        let signal = Arc::new(ConnControl::new());
        (
            ConnHandle::new(
                ConnId(id),
                user.into(),
                std::net::Ipv4Addr::LOCALHOST.into(),
                outbox.clone(),
                signal.clone(),
            ),
            outbox,
            signal,
        )
    }

    #[test]
    fn one_encoded_frame_reaches_every_member_but_the_excluded() {
        let hub = Hub::new();
        let room: Arc<str> = "r".into();
        let (a, a_rx, _) = handle(1, "a", 4);
        let (b, b_rx, _) = handle(2, "b", 4);
        for h in [&a, &b] {
            hub.register(h.clone(), 10, 10).unwrap();
            hub.join(&room, h);
        }
        let frame = OutFrame::Text(Bytes::from_static(b"x"));
        let delivery = Delivery {
            frame: frame.clone(),
            except: Some(ConnId(1)),
            offset: None,
        };
        assert_eq!(hub.deliver_to_room("r", &delivery), 1);
        assert!(a_rx.pop().is_none());
        let OutFrame::Text(got) = b_rx.pop().unwrap().frame else {
            panic!()
        };
        let OutFrame::Text(sent) = &frame else {
            panic!()
        };
        assert_eq!(
            got.as_ptr(),
            sent.as_ptr(),
            "recipients share the encoded bytes"
        );
    }

    #[test]
    fn a_full_outbox_cuts_off_only_that_consumer() {
        crate::metrics::install();
        let hub = Hub::new();
        let room: Arc<str> = "r".into();
        let (slow, _slow_rx, slow_signal) = handle(1, "slow", 1);
        let (fast, fast_rx, fast_signal) = handle(2, "fast", 8);
        for h in [&slow, &fast] {
            hub.register(h.clone(), 10, 10).unwrap();
            hub.join(&room, h);
        }
        let delivery = Delivery {
            frame: OutFrame::Text(Bytes::from_static(b"x")),
            except: None,
            offset: None,
        };
        for _ in 0..3 {
            hub.deliver_to_room("r", &delivery);
        }
        assert_eq!(
            slow_signal.reason(),
            Some(CloseReason::Send(CloseCode::SLOW_CONSUMER))
        );
        assert_eq!(fast_signal.reason(), None);
        for _ in 0..3 {
            fast_rx.pop().unwrap();
        }
        let rendered = crate::metrics::render();
        let cut_off = rendered
            .lines()
            .find_map(|line| line.strip_prefix("herald_slow_consumers_total "))
            .and_then(|value| value.parse::<f64>().ok());
        assert!(cut_off >= Some(1.0), "{rendered}");
    }

    #[test]
    fn closing_a_user_reaches_only_that_users_connections() {
        let hub = Hub::new();
        let (a1, _r1, a1_signal) = handle(1, "a", 1);
        let (a2, _r2, a2_signal) = handle(2, "a", 1);
        let (b, _r3, b_signal) = handle(3, "b", 1);
        for h in [&a1, &a2, &b] {
            hub.register(h.clone(), 10, 10).unwrap();
        }
        let reason = CloseReason::Kicked {
            code: 4403,
            reason: "banned".into(),
        };
        assert_eq!(hub.close_user("a", &reason), 2);
        assert_eq!(a1_signal.reason(), Some(reason.clone()));
        assert_eq!(a2_signal.reason(), Some(reason));
        assert_eq!(b_signal.reason(), None);
        assert_eq!(hub.close_user("nobody", &CloseReason::PeerGone), 0);
    }

    #[test]
    fn rooms_are_indexed_by_connection() {
        let hub = Hub::new();
        let (a, _ra, _) = handle(1, "a", 1);
        let (b, _rb, _) = handle(2, "b", 1);
        for h in [&a, &b] {
            hub.register(h.clone(), 10, 10).unwrap();
        }
        for room in ["z", "m"] {
            hub.join(&Arc::from(room), &a);
        }
        hub.join(&Arc::from("m"), &b);
        let index = hub.rooms_by_connection();
        let names =
            |id: u64| -> Vec<String> { index[&ConnId(id)].iter().map(|r| r.to_string()).collect() };
        assert_eq!(names(1), ["m", "z"]);
        assert_eq!(names(2), ["m"]);
        assert_eq!(
            hub.rooms_of(ConnId(1)),
            hub.rooms_by_connection()[&ConnId(1)]
        );
        assert!(hub.rooms_of(ConnId(9)).is_empty());
    }

    fn text(outgoing: Outgoing) -> Bytes {
        match outgoing.frame {
            OutFrame::Text(bytes) | OutFrame::Binary(bytes) => bytes,
        }
    }

    #[test]
    fn frames_of_a_stream_being_caught_up_on_are_held_until_drained() {
        let hub = Hub::new();
        let room: Arc<str> = "r".into();
        let (a, a_rx, _) = handle(1, "a", 8);
        hub.register(a.clone(), 10, 10).unwrap();
        a.begin_catch_up(StreamKey::Room(room.clone()));
        hub.join(&room, &a);
        let live = |offset: u64, body: &'static [u8]| Delivery {
            frame: OutFrame::Text(Bytes::from_static(body)),
            except: None,
            offset: Some(offset),
        };
        hub.deliver_to_room("r", &live(5, b"five"));
        // Other streams are not held.
        hub.deliver_to_user("a", &live(1, b"inbox"));
        assert_eq!(text(a_rx.pop().unwrap()), "inbox");
        assert!(a_rx.pop().is_none(), "the room frame is held");

        let key = StreamKey::Room(room.clone());
        let held = a.take_held(&key, 5).unwrap();
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].0, Some(5));
        hub.deliver_to_room("r", &live(6, b"six"));
        assert_eq!(a.take_held(&key, 6).unwrap().len(), 1);
        assert!(a.take_held(&key, 7).is_none(), "now live");
        // A late fan-out of an offset the replay covered is dropped, newer ones pass.
        hub.deliver_to_room("r", &live(7, b"late seven"));
        hub.deliver_to_room("r", &live(8, b"eight"));
        hub.deliver_to_room("r", &live(8, b"not filtered any more"));
        assert_eq!(text(a_rx.pop().unwrap()), "eight");
        assert_eq!(text(a_rx.pop().unwrap()), "not filtered any more");
    }

    #[test]
    fn an_overfull_catch_up_buffer_cuts_the_connection_off() {
        let hub = Hub::new();
        let room: Arc<str> = "r".into();
        let (a, _a_rx, signal) = handle(1, "a", 2);
        hub.register(a.clone(), 10, 10).unwrap();
        a.begin_catch_up(StreamKey::Room(room.clone()));
        hub.join(&room, &a);
        let delivery = Delivery {
            frame: OutFrame::Text(Bytes::from_static(b"x")),
            except: None,
            offset: None,
        };
        for _ in 0..3 {
            hub.deliver_to_room("r", &delivery);
        }
        assert_eq!(
            signal.reason(),
            Some(CloseReason::Send(CloseCode::SLOW_CONSUMER))
        );
    }

    #[test]
    fn limits_are_enforced_and_released() {
        let hub = Hub::new();
        let (a1, _r1, _) = handle(1, "a", 1);
        let (a2, _r2, _) = handle(2, "a", 1);
        let (b, _r3, _) = handle(3, "b", 1);
        assert_eq!(hub.register(a1.clone(), 2, 1), Ok(true));
        assert_eq!(hub.register(a2, 2, 1), Err(RegisterError::UserFull));
        assert_eq!(hub.register(b.clone(), 2, 1), Ok(true));
        let (c, _r4, _) = handle(4, "c", 1);
        assert_eq!(hub.register(c.clone(), 2, 1), Err(RegisterError::NodeFull));
        assert!(hub.unregister(a1.id(), a1.user()));
        assert_eq!(hub.register(c, 2, 1), Ok(true));
        assert_eq!(hub.connection_count(), 2);
    }
}
