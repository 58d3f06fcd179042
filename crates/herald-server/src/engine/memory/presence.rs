//! In-process presence: sharded maps of room → user → connections and user → connections.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use crate::delivery::ConnId;
use crate::engine::EngineError;
use crate::engine::presence::{Presence, PresenceHandler, RoomChange, RoomCount};

#[derive(Default)]
pub struct MemoryPresence {
    /// room → user → that user's connections in the room. DashMap shards the locks; each entry
    /// is held only for a map update, never across an `.await`.
    rooms: DashMap<String, HashMap<String, Vec<ConnId>>>,
    /// user → open connections.
    users: DashMap<String, Vec<ConnId>>,
}

impl MemoryPresence {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Presence for MemoryPresence {
    /// One process holds every entry, so none ever expires: the handler is never called.
    fn start(&self, _handler: Arc<dyn PresenceHandler>) {}

    async fn join(&self, room: &str, user: &str, conn: ConnId) -> Result<RoomChange, EngineError> {
        let mut members = self.rooms.entry(room.to_owned()).or_default();
        let conns = members.entry(user.to_owned()).or_default();
        let user_changed = conns.is_empty();
        if !conns.contains(&conn) {
            conns.push(conn);
        }
        Ok(RoomChange {
            user_changed,
            count: members.len() as u64,
        })
    }

    async fn leave(&self, room: &str, user: &str, conn: ConnId) -> Result<RoomChange, EngineError> {
        let Entry::Occupied(mut members) = self.rooms.entry(room.to_owned()) else {
            return Ok(RoomChange {
                user_changed: false,
                count: 0,
            });
        };
        let mut user_changed = false;
        if let Some(conns) = members.get_mut().get_mut(user) {
            conns.retain(|c| *c != conn);
            if conns.is_empty() {
                members.get_mut().remove(user);
                user_changed = true;
            }
        }
        let count = members.get().len() as u64;
        if count == 0 {
            members.remove();
        }
        Ok(RoomChange {
            user_changed,
            count,
        })
    }

    async fn members(&self, room: &str) -> Result<Vec<String>, EngineError> {
        let mut users: Vec<String> = self
            .rooms
            .get(room)
            .map(|members| members.keys().cloned().collect())
            .unwrap_or_default();
        users.sort_unstable();
        Ok(users)
    }

    async fn count(&self, room: &str) -> Result<u64, EngineError> {
        Ok(self
            .rooms
            .get(room)
            .map_or(0, |members| members.len() as u64))
    }

    async fn connect(&self, user: &str, conn: ConnId) -> Result<(), EngineError> {
        self.users.entry(user.to_owned()).or_default().push(conn);
        Ok(())
    }

    async fn disconnect(&self, user: &str, conn: ConnId) -> Result<(), EngineError> {
        if let Entry::Occupied(mut conns) = self.users.entry(user.to_owned()) {
            conns.get_mut().retain(|c| *c != conn);
            if conns.get().is_empty() {
                conns.remove();
            }
        }
        Ok(())
    }

    async fn online(&self, users: &[String]) -> Result<Vec<bool>, EngineError> {
        Ok(users.iter().map(|u| self.users.contains_key(u)).collect())
    }

    async fn connections(&self, user: &str) -> Result<Vec<ConnId>, EngineError> {
        Ok(self.users.get(user).map(|c| c.clone()).unwrap_or_default())
    }

    async fn rooms(&self) -> Result<Vec<RoomCount>, EngineError> {
        let mut rooms: Vec<RoomCount> = self
            .rooms
            .iter()
            .map(|entry| RoomCount {
                room: entry.key().clone(),
                users: entry.value().len() as u64,
            })
            .collect();
        rooms.sort_unstable_by(|a, b| a.room.cmp(&b.room));
        Ok(rooms)
    }

    /// Entries die with the process.
    async fn close(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_user_enters_with_the_first_connection_and_leaves_with_the_last() {
        let presence = MemoryPresence::new();
        let first = presence.join("r", "alice", ConnId(1)).await.unwrap();
        assert_eq!(
            first,
            RoomChange {
                user_changed: true,
                count: 1
            }
        );
        let second = presence.join("r", "alice", ConnId(2)).await.unwrap();
        assert_eq!(
            second,
            RoomChange {
                user_changed: false,
                count: 1
            }
        );
        presence.join("r", "bob", ConnId(3)).await.unwrap();
        assert_eq!(presence.members("r").await.unwrap(), ["alice", "bob"]);
        assert_eq!(presence.count("r").await.unwrap(), 2);
        assert_eq!(presence.count("nowhere").await.unwrap(), 0);

        let left = presence.leave("r", "alice", ConnId(1)).await.unwrap();
        assert_eq!(
            left,
            RoomChange {
                user_changed: false,
                count: 2
            }
        );
        let left = presence.leave("r", "alice", ConnId(2)).await.unwrap();
        assert_eq!(
            left,
            RoomChange {
                user_changed: true,
                count: 1
            }
        );
        presence.join("a", "carol", ConnId(4)).await.unwrap();
        assert_eq!(
            presence.rooms().await.unwrap(),
            [
                RoomCount {
                    room: "a".into(),
                    users: 1
                },
                RoomCount {
                    room: "r".into(),
                    users: 1
                }
            ]
        );
        presence.leave("a", "carol", ConnId(4)).await.unwrap();
        presence.leave("r", "bob", ConnId(3)).await.unwrap();
        assert!(presence.rooms.is_empty(), "empty rooms are dropped");
    }

    #[tokio::test]
    async fn online_follows_open_connections() {
        let presence = MemoryPresence::new();
        presence.connect("alice", ConnId(1)).await.unwrap();
        let users = ["alice".to_owned(), "bob".to_owned()];
        assert_eq!(presence.online(&users).await.unwrap(), [true, false]);
        presence.disconnect("alice", ConnId(1)).await.unwrap();
        assert_eq!(presence.online(&users).await.unwrap(), [false, false]);
    }
}
