//! Presence: which users are in which room and which users are online, across all nodes.
//!
//! # Contract
//! - Membership is per connection; a user is *in* a room while at least one of their
//!   connections is, and *online* while at least one connection is open anywhere.
//! - `join` and `leave` report whether the user entered or left the room with this call (their
//!   first connection in, their last out) and the number of users in the room afterwards, so
//!   that each user's entering and leaving is reported to the room's `presence_diff` once.
//! - Calls for one connection are made in order by its own task; a backend shared by nodes keeps
//!   entries alive only while their node refreshes them (entries of a dead node expire).
//! - When a dead node's entries expire, one surviving node removes them and calls its
//!   [`PresenceHandler::expired`] once for each (room, user) that left because of it, so each
//!   room is told once. A single-process backend never calls it.
//! - A backend shared by nodes re-asserts this node's entries when it finds them possibly lost
//!   (the shared store was emptied, its connection came back, or other nodes reaped this node
//!   while it was alive): it reads [`PresenceHandler::local_entries`], writes each entry back
//!   with the same first-in decision as `join`, and calls [`PresenceHandler::reappeared`] once
//!   for each (room, user) that re-entered, across all nodes. It then reads the local entries
//!   again and removes what left meanwhile, so an entry re-asserted just as its connection
//!   left does not outlive it. For that, the node removes a connection from its own records
//!   before it calls `leave` or `disconnect` (and adds it before `join` or `connect`).
//! - [`Presence::close`] removes this node's entries on a clean shutdown.
//! - [`Presence::claim_count`] names one node per room and count window to send the room's
//!   count, for every node's changes made before its claim ends.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::EngineError;
use crate::delivery::ConnId;

/// The effect of a `join` or `leave` on a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomChange {
    /// The user entered (first connection) or left (last connection) the room with this call.
    pub user_changed: bool,
    /// Users in the room afterwards.
    pub count: u64,
}

/// A room and how many users are in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomCount {
    pub room: String,
    pub users: u64,
}

/// Who sends a big room's count for the window starting now (see [`Presence::claim_count`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CountClaim {
    /// This node: it reads the count once the window has passed and sends it.
    Won,
    /// Another node, for about this much longer: the count it reads after that covers every
    /// change made on this node until then.
    HeldFor(Duration),
}

/// One connection open on this node, with the rooms it is in: the entries the node owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalEntry {
    pub user: Arc<str>,
    pub conn: ConnId,
    pub rooms: Vec<Arc<str>>,
}

/// Told about users who left or re-entered a room without a `join` or `leave` of their own;
/// implemented by the node, which also says which entries it owns.
#[async_trait]
pub trait PresenceHandler: Send + Sync {
    /// `user` left `room`, which has `count` users afterwards: their node died, or an entry
    /// re-asserted as its connection left was removed again. Called once per (room, user)
    /// across all nodes.
    async fn expired(&self, room: &str, user: &str, count: u64);
    /// `user` is in `room` again (which has `count` users afterwards) because this node
    /// re-asserted entries the backend had lost. Called once per (room, user) across all
    /// nodes; a user still present through another connection is not reported.
    async fn reappeared(&self, room: &str, user: &str, count: u64);
    /// Every connection this node holds now, with its rooms. Read only when entries are
    /// re-asserted, so the node's own records serve instead of a copy kept by the backend.
    fn local_entries(&self) -> Vec<LocalEntry>;
}

#[async_trait]
pub trait Presence: Send + Sync {
    /// Starts refreshing this node's entries and reaping dead nodes' entries, reported to
    /// `handler`. Called once, before any other method.
    fn start(&self, handler: Arc<dyn PresenceHandler>);
    async fn join(&self, room: &str, user: &str, conn: ConnId) -> Result<RoomChange, EngineError>;
    async fn leave(&self, room: &str, user: &str, conn: ConnId) -> Result<RoomChange, EngineError>;
    /// Users in the room, sorted.
    async fn members(&self, room: &str) -> Result<Vec<String>, EngineError>;
    /// How many users are in the room now.
    async fn count(&self, room: &str) -> Result<u64, EngineError>;
    /// Claims, for `window`, the sending of `room`'s count-only `presence_diff`: the first node
    /// to claim it wins, and its count, read once the window has passed, covers the changes
    /// every node made while the claim held. A room spread over N nodes then sends one count
    /// per window instead of N. A single-process backend always wins.
    async fn claim_count(&self, _room: &str, _window: Duration) -> Result<CountClaim, EngineError> {
        Ok(CountClaim::Won)
    }
    async fn connect(&self, user: &str, conn: ConnId) -> Result<(), EngineError>;
    async fn disconnect(&self, user: &str, conn: ConnId) -> Result<(), EngineError>;
    /// For each user, whether they have an open connection anywhere.
    async fn online(&self, users: &[String]) -> Result<Vec<bool>, EngineError>;
    /// Open connections of one user, on every node.
    async fn connections(&self, user: &str) -> Result<Vec<ConnId>, EngineError>;
    /// Every room with at least one user, on every node, sorted by name.
    async fn rooms(&self) -> Result<Vec<RoomCount>, EngineError>;
    /// Stops refreshing and removes this node's remaining entries.
    async fn close(&self);
    /// Whether the backend answers now (for readiness checks).
    async fn ready(&self) -> bool {
        true
    }
}
