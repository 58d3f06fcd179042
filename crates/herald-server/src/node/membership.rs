//! Who is where: connections attaching and detaching, rooms joined and left (with the
//! replay of what a connection missed), members and online status, and the leaves of users
//! whose node died.

use super::*;
use crate::engine::presence::{LocalEntry, PresenceHandler};

impl Node {
    /// Registers an open connection (hub with limits, user channel, presence) and starts
    /// replaying the inbox entries its user has not acknowledged, before any live direct
    /// message. The replay runs in its own task, beside the connection's request loop, once
    /// the first page is read: it waits for the writer to drain each page (the welcome, queued
    /// before, goes first), and the client may `ack` meanwhile. With a `device`, the replay
    /// starts at that device's mark.
    pub async fn connect(
        &self,
        handle: &ConnHandle,
        device: Option<Arc<str>>,
    ) -> Result<(), ConnectError> {
        handle.begin_catch_up(StreamKey::Inbox);
        if let Err(error) = self.attach(handle).await {
            handle.end_catch_up(&StreamKey::Inbox);
            return Err(error);
        }
        metrics::gauge!("herald_connections").increment(1.0);
        match self.start_inbox_replay(handle, device).await {
            Ok(Some(replay)) => {
                self.tasks.spawn(async move {
                    replay.run().await;
                });
            }
            Ok(None) => {}
            Err(error) => {
                handle.end_catch_up(&StreamKey::Inbox);
                self.disconnect(handle).await;
                return Err(error.into());
            }
        }
        Ok(())
    }

    /// Reads the first page of the inbox replay; `None` when there is nothing to replay (the
    /// handle is live then).
    async fn start_inbox_replay(
        &self,
        handle: &ConnHandle,
        device: Option<Arc<str>>,
    ) -> Result<Option<Replay>, EngineError> {
        // Checked after the connection is registered: an entry committed after this check is
        // fanned out to it live (and was held until now), one committed before is in the set.
        // A device is read every time: it may be new and need its mark.
        if device.is_none() && !self.store.inbox_may_hold_unacked(handle.user()) {
            handle.end_catch_up(&StreamKey::Inbox);
            return Ok(None);
        }
        let read = self
            .store
            .read_inbox(handle.user(), device.as_deref(), Offset(0), PAGE)
            .await?;
        if let Some(device) = device.as_deref()
            && !read.device_has_mark
        {
            // A new device gets its mark where it starts reading: from now on, acks of the
            // user's other devices do not hide entries from it.
            self.store
                .ack_inbox(handle.user(), Some(device), read.acked)
                .await?;
        }
        Ok(Some(Replay::paged(
            handle.clone(),
            StreamKey::Inbox,
            read.acked,
            self.replay_wait(),
            read.messages,
            self.store.clone(),
            Source::Inbox {
                user: handle.user().clone(),
                device,
            },
        )))
    }

    async fn attach(&self, handle: &ConnHandle) -> Result<(), ConnectError> {
        let limits = &self.config.limits;
        let first_local = self.hub.register(
            handle.clone(),
            limits.max_connections,
            limits.max_connections_per_user,
        )?;
        // Checked after registering: `shut_down` closes every connection it finds registered
        // after it cancels, so a connection either is found there or sees the cancel here.
        // Nothing was subscribed yet, so only the hub has anything to undo.
        if self.shutdown.is_cancelled() {
            self.hub.unregister(handle.id(), handle.user());
            return Err(ConnectError::ShuttingDown);
        }
        let channel = Channel::User(handle.user().clone());
        let attached = async {
            if first_local {
                self.subscriptions
                    .follow(&channel, || self.hub.has_user(handle.user()))
                    .await?;
            }
            self.presence.connect(handle.user(), handle.id()).await
        }
        .await;
        if let Err(error) = attached {
            self.release(handle).await;
            // A re-assertion may have written the entry meanwhile (see `detach_presence`).
            self.detach_presence(handle).await;
            return Err(error.into());
        }
        Ok(())
    }

    /// Detaches a connection that has already left its rooms.
    pub async fn disconnect(&self, handle: &ConnHandle) {
        self.release(handle).await;
        self.detach_presence(handle).await;
        metrics::gauge!("herald_connections").decrement(1.0);
    }

    /// Removes a connection's presence entry. Called after the hub forgot the connection: a
    /// presence re-asserting this node's entries reads the hub, so in this order it either
    /// still finds the connection (and this removal comes after its write) or never writes it.
    async fn detach_presence(&self, handle: &ConnHandle) {
        if let Err(error) = self.presence.disconnect(handle.user(), handle.id()).await {
            tracing::warn!(conn = %handle.id(), %error, "presence disconnect failed");
        }
    }

    async fn release(&self, handle: &ConnHandle) {
        if self.hub.unregister(handle.id(), handle.user()) {
            let channel = Channel::User(handle.user().clone());
            let wanted = || self.hub.has_user(handle.user());
            if let Err(error) = self.subscriptions.follow(&channel, wanted).await {
                tracing::warn!(%channel, %error, "unsubscribe failed");
            }
        }
    }

    /// Adds a connection to a room and, if the user is new to it, queues the change for the
    /// room's next `presence_diff`. With
    /// a `recovery`, also reads what the client missed; the caller runs the returned replay
    /// after answering the join.
    pub async fn join(
        &self,
        handle: &ConnHandle,
        room: &Arc<str>,
        recovery: Option<Recovery>,
    ) -> Result<Joined, EngineError> {
        let key = StreamKey::Room(room.clone());
        if recovery.is_some() {
            handle.begin_catch_up(key.clone());
        }
        let change = match self.join_room(handle, room).await {
            Ok(change) => change,
            Err(error) => {
                handle.end_catch_up(&key);
                return Err(error);
            }
        };
        match self.read_missed(handle, room, recovery).await {
            Ok((position, recovered, replay)) => Ok(Joined {
                change,
                position,
                recovered,
                replay,
            }),
            Err(error) => {
                handle.end_catch_up(&key);
                if let Err(leave_error) = self.leave(handle, room).await {
                    tracing::warn!(%room, error = %leave_error, "rolling back a join failed");
                }
                Err(error)
            }
        }
    }

    /// The room's position and, with a recovery, the messages to replay. Runs after the
    /// connection is in the room, so every message after the read reaches it live (held).
    async fn read_missed(
        &self,
        handle: &ConnHandle,
        room: &Arc<str>,
        recovery: Option<Recovery>,
    ) -> Result<(StreamPosition, Option<bool>, Option<Replay>), EngineError> {
        let Some(recovery) = recovery else {
            let bounds = self.bounds_reads.read(&self.store, room).await?;
            return Ok((bounds.top, None, None));
        };
        let max = self.config.store.max_recovery;
        // One page now; the replay reads the rest page by page as the writer drains them.
        let read = self.store.read_room(room, recovery.since, PAGE).await?;
        let mut top = read.bounds.top;
        // A client's epoch against a room that has none (recreated and still empty) differs too.
        // Without an epoch the client's offset is taken as one of the room's current stream.
        let epoch_matches = match &recovery.epoch {
            Some(epoch) if !epoch.is_unset() => *epoch == top.epoch,
            _ => true,
        };
        let covered = recovery.since <= top.offset && recovery.since.next() >= read.bounds.first;
        let missed = top.offset.0.saturating_sub(recovery.since.0);
        let recovered = epoch_matches && covered && missed <= max as u64;
        let key = StreamKey::Room(room.clone());
        let replay;
        if recovered {
            replay = Replay::paged(
                handle.clone(),
                key,
                recovery.since,
                self.replay_wait(),
                read.messages,
                self.store.clone(),
                Source::Room(room.clone()),
            );
            metrics::counter!("herald_recoveries_total", "outcome" => "recovered").increment(1);
        } else {
            let limit = DEFAULT_HISTORY_LIMIT.min(self.config.store.history_max_limit);
            let page = self.store.room_history(room, None, limit).await?;
            if let Some(last) = page.messages.last() {
                top.offset = top.offset.max(last.offset);
                top.epoch = page.epoch.clone();
            }
            replay = Replay::new(
                handle.clone(),
                key,
                Offset(0),
                self.replay_wait(),
                page.messages,
            );
            metrics::counter!("herald_recoveries_total", "outcome" => "not_recovered").increment(1);
        }
        Ok((top, Some(recovered), Some(replay)))
    }

    async fn join_room(
        &self,
        handle: &ConnHandle,
        room: &Arc<str>,
    ) -> Result<RoomChange, EngineError> {
        let channel = Channel::Room(room.clone());
        if self.hub.join(room, handle)
            && let Err(error) = self
                .subscriptions
                .follow(&channel, || self.hub.has_room(room))
                .await
        {
            self.hub.leave(room, handle.id());
            return Err(error);
        }
        let change = match self.presence.join(room, handle.user(), handle.id()).await {
            Ok(change) => change,
            Err(error) => {
                // The entry may exist all the same (a reply lost after the write, or a
                // re-assertion meanwhile): leave like any leave, hub first.
                if let Err(leave_error) = self.leave(handle, room).await {
                    tracing::warn!(%room, error = %leave_error, "rolling back a join failed");
                }
                return Err(error);
            }
        };
        if change.user_changed {
            self.record_presence(room.clone(), handle.user().clone(), true)
                .await;
        }
        Ok(change)
    }

    /// Removes a connection from a room and, if the user left it, queues the change for the
    /// room's next `presence_diff`. The hub forgets the membership before presence does (see
    /// `detach_presence`).
    pub async fn leave(
        &self,
        handle: &ConnHandle,
        room: &Arc<str>,
    ) -> Result<RoomChange, EngineError> {
        self.leave_hub(handle, room).await;
        let change = self
            .presence
            .leave(room, handle.user(), handle.id())
            .await?;
        if change.user_changed {
            self.record_presence(room.clone(), handle.user().clone(), false)
                .await;
        }
        Ok(change)
    }

    /// Queues a user's entering (`present`) or leaving for the room's next `presence_diff`.
    async fn record_presence(&self, room: Arc<str>, user: Arc<str>, present: bool) {
        self.presence_window
            .record(presence_window::RoomChange {
                room,
                user,
                present,
            })
            .await;
    }

    async fn leave_hub(&self, handle: &ConnHandle, room: &Arc<str>) {
        // Forget any replay state: a later join starts afresh.
        handle.end_catch_up(&StreamKey::Room(room.clone()));
        if self.hub.leave(room, handle.id()) {
            let channel = Channel::Room(room.clone());
            let wanted = || self.hub.has_room(room);
            if let Err(error) = self.subscriptions.follow(&channel, wanted).await {
                tracing::warn!(%channel, %error, "unsubscribe failed");
            }
        }
    }

    pub async fn members(&self, room: &str) -> Result<Vec<String>, EngineError> {
        self.presence.members(room).await
    }

    /// One page of a room's users, sorted: those after `after`, at most `limit` (default and
    /// cap [`MAX_MEMBERS_PAGE`]).
    pub async fn members_page(
        &self,
        room: &str,
        after: Option<&str>,
        limit: Option<usize>,
    ) -> Result<MembersPage, EngineError> {
        let users = self.presence.members(room).await?;
        let limit = limit.unwrap_or(MAX_MEMBERS_PAGE).clamp(1, MAX_MEMBERS_PAGE);
        let start = after.map_or(0, |after| {
            users.partition_point(|user| user.as_str() <= after)
        });
        let end = (start + limit).min(users.len());
        let next = (end < users.len()).then(|| users[end - 1].clone());
        Ok(MembersPage {
            count: users.len() as u64,
            users: users[start..end].to_vec(),
            next,
        })
    }

    /// For each user, whether they have an open connection on any node.
    pub async fn online(&self, users: &[String]) -> Result<Vec<bool>, EngineError> {
        self.presence.online(users).await
    }
}

/// Users whose node died leave their rooms like any leave, and users whose entries this node
/// re-asserted enter them like any join: through the room's next `presence_diff` (the window
/// reads the count itself).
#[async_trait::async_trait]
impl PresenceHandler for Node {
    async fn expired(&self, room: &str, user: &str, _count: u64) {
        self.record_presence(room.into(), user.into(), false).await;
    }

    async fn reappeared(&self, room: &str, user: &str, _count: u64) {
        self.record_presence(room.into(), user.into(), true).await;
    }

    /// Rooms are read before connections (a connection registers before it joins, so each
    /// room listed is listed with its connection's user, or dropped with a connection gone). A
    /// connection joining or leaving meanwhile is settled by its own join or leave and by the
    /// second reading a re-assertion makes.
    fn local_entries(&self) -> Vec<LocalEntry> {
        let mut rooms = self.hub.rooms_by_connection();
        self.hub
            .snapshot()
            .into_iter()
            .map(|handle| LocalEntry {
                rooms: rooms.remove(&handle.id()).unwrap_or_default(),
                user: handle.user().clone(),
                conn: handle.id(),
            })
            .collect()
    }
}
