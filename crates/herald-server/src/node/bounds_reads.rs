//! Joins of one room share its bounds reads. A join reads the room's position after its
//! connection is in the room, so that every later message reaches it live; when thousands
//! join at once (a live event starting), one store read per join would queue thousands of reads
//! for the same answer.
//!
//! Reads of a room are grouped like a group commit: at most one is in flight per room, run by a
//! task of its own; joins arriving meanwhile gather in the next group, which that task reads for
//! as soon as the read in flight is done. Each join so gets a read that started after it asked,
//! which is all it needs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::engine::store::{Store, StoreError, StreamBounds};

type Outcome = Option<Result<StreamBounds, StoreError>>;

#[derive(Default)]
pub struct BoundsReads {
    /// Rooms with a read in flight → the group waiting for the next read, if any.
    rooms: Mutex<HashMap<Arc<str>, Option<watch::Sender<Outcome>>>>,
}

impl BoundsReads {
    /// The room's bounds from a read that started after this call.
    pub async fn read(
        self: &Arc<Self>,
        store: &Arc<dyn Store>,
        room: &Arc<str>,
    ) -> Result<StreamBounds, StoreError> {
        let mut answer = {
            let mut rooms = self.rooms.lock().expect("no panics while holding the lock");
            match rooms.get_mut(room) {
                Some(Some(group)) => group.subscribe(),
                Some(next) => {
                    let (group, answer) = watch::channel(None);
                    *next = Some(group);
                    answer
                }
                None => {
                    let (group, answer) = watch::channel(None);
                    rooms.insert(room.clone(), Some(group));
                    tokio::spawn(self.clone().run(store.clone(), room.clone()));
                    answer
                }
            }
        };
        match answer.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone().expect("waited for an outcome"),
            // The reading task is gone (the runtime is shutting down).
            Err(_) => Err(StoreError::Closed),
        }
    }

    /// Reads for each waiting group in turn until none is left, then forgets the room.
    async fn run(self: Arc<Self>, store: Arc<dyn Store>, room: Arc<str>) {
        loop {
            let group = {
                let mut rooms = self.rooms.lock().expect("no panics while holding the lock");
                match rooms.get_mut(&room).and_then(Option::take) {
                    Some(group) => group,
                    None => {
                        rooms.remove(&room);
                        return;
                    }
                }
            };
            group.send_replace(Some(store.room_bounds(&room).await));
        }
    }
}
