//! One transaction's writes: finding or creating each stream's row ([`Batch::slot`]),
//! assigning offsets ([`Batch::bump`]), inserting room and direct messages (staging their
//! conversation and inbox entries, see `staging.rs`), acks with their
//! device marks, and the changed stream rows written back before the commit
//! ([`Batch::flush`]). The writer's loop decides what goes into a batch and commits it; this is
//! only what runs inside the transaction.

use herald_protocol::Payload;
use rusqlite::{CachedStatement, OptionalExtension, Transaction, params};

use super::streams::{StreamState, Streams};
use crate::engine::sqlite::schema::{
    conversation_name, entry_table, inbox_name, newest_in_table, room_name,
};
use crate::engine::sqlite::staging::{Staged, Unmerged};
use crate::engine::store::{
    Append, Appended, Epoch, Offset, StoreError, StoreLimits, StreamPosition,
};

/// The writes of one transaction, with its statements prepared once.
pub(super) struct Batch<'a> {
    streams: &'a mut Streams,
    /// The entries staged by earlier batches, which a stream's newest offset counts.
    staged_before: &'a Staged,
    limits: StoreLimits,
    /// Streams whose row changed in this batch (indexes into `streams.states`), written back
    /// before the commit: rooms given new offsets, inboxes acknowledged. Conversations and
    /// inboxes given new entries are not: their newest offset is their newest entry's.
    dirty: Vec<usize>,
    /// The name of the stream being looked up, reused so lookups do not allocate.
    name: String,
    /// The conversation and inbox entries this batch staged, by stream name, for
    /// [`crate::engine::sqlite::staging::Staged`] once the batch has committed.
    pub(super) staged: Vec<(String, Unmerged)>,
    tx: &'a Transaction<'a>,
    select_stream: CachedStatement<'a>,
    insert_stream: CachedStatement<'a>,
    update_stream: CachedStatement<'a>,
    insert_room: CachedStatement<'a>,
    insert_direct: CachedStatement<'a>,
    insert_staged: CachedStatement<'a>,
}

impl<'a> Batch<'a> {
    pub(super) fn new(
        tx: &'a Transaction<'a>,
        streams: &'a mut Streams,
        staged_before: &'a Staged,
        limits: StoreLimits,
    ) -> rusqlite::Result<Batch<'a>> {
        Ok(Batch {
            streams,
            staged_before,
            limits,
            dirty: Vec::new(),
            name: String::new(),
            staged: Vec::new(),
            tx,
            select_stream: tx.prepare_cached(
                "SELECT id, epoch, last_pos, acked,
                     (SELECT min(m.acked) FROM inbox_marks m WHERE m.stream = streams.id)
                 FROM streams WHERE name = ?1",
            )?,
            insert_stream: tx.prepare_cached(
                "INSERT INTO streams (name, epoch, last_pos, acked) VALUES (?1, ?2, 0, 0)",
            )?,
            update_stream: tx
                .prepare_cached("UPDATE streams SET last_pos = ?2, acked = ?3 WHERE id = ?1")?,
            insert_room: tx.prepare_cached(
                "INSERT INTO room_messages (stream, pos, id, sender, ts, is_binary, content)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?,
            insert_direct: tx.prepare_cached(
                "INSERT INTO direct_messages (id, sender, recipients, ts, is_binary, content)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?,
            insert_staged: tx.prepare_cached(
                "INSERT INTO staged_entries (inbox, stream, pos, message) VALUES (?1, ?2, ?3, ?4)",
            )?,
        })
    }

    /// The slot of the stream named `self.name`: cached, read from the file, or created.
    fn slot(&mut self) -> rusqlite::Result<usize> {
        if let Some(&slot) = self.streams.slots.get(self.name.as_str()) {
            self.streams.states[slot].used = self.streams.batch;
            return Ok(slot);
        }
        let stored = self
            .select_stream
            .query_row([self.name.as_str()], |row| {
                Ok(StreamState {
                    id: row.get(0)?,
                    epoch: row.get(1)?,
                    last: row.get::<_, i64>(2)? as u64,
                    acked: row.get::<_, i64>(3)? as u64,
                    lowest_device_mark: row.get::<_, Option<i64>>(4)?.map(|mark| mark as u64),
                    used: 0,
                })
            })
            .optional()?;
        let state = match stored {
            Some(mut state) => {
                state.last = state.last.max(self.newest_entry(state.id)?);
                state
            }
            None => {
                let epoch = Epoch::random().0;
                self.insert_stream
                    .execute(params![self.name.as_str(), epoch])?;
                StreamState {
                    id: self.tx.last_insert_rowid(),
                    epoch,
                    last: 0,
                    acked: 0,
                    lowest_device_mark: None,
                    used: 0,
                }
            }
        };
        Ok(self.streams.insert(self.name.clone(), state))
    }

    /// The offset of the newest entry, staged or in its table, of the conversation or inbox
    /// named `self.name` (0 for a room, or with no entry).
    fn newest_entry(&mut self, stream: i64) -> rusqlite::Result<u64> {
        let Some(table) = entry_table(&self.name) else {
            return Ok(0);
        };
        match self.staged_before.newest(&self.name) {
            // Staged entries are a stream's newest.
            Some(staged) => Ok(staged),
            None => newest_in_table(self.tx, table, stream),
        }
    }

    /// Assigns the next offset of a stream; returns the stream's id and the offset.
    fn bump(&mut self, slot: usize) -> (i64, u64) {
        let state = &mut self.streams.states[slot];
        state.last += 1;
        (state.id, state.last)
    }

    pub(super) fn append(
        &mut self,
        append: Append,
    ) -> rusqlite::Result<Result<Appended, StoreError>> {
        match append {
            Append::Room { room, message } => {
                room_name(&mut self.name, &room);
                let slot = self.slot()?;
                let (stream, pos) = self.bump(slot);
                self.dirty.push(slot);
                let (is_binary, content) = content_bytes(&message.content);
                self.insert_room.execute(params![
                    stream,
                    pos as i64,
                    message.id,
                    &*message.from,
                    message.ts as i64,
                    is_binary,
                    content
                ])?;
                Ok(Ok(Appended::Room {
                    room,
                    message,
                    position: StreamPosition {
                        offset: Offset(pos),
                        epoch: Epoch(self.streams.states[slot].epoch.clone()),
                    },
                }))
            }
            Append::Direct {
                to,
                recipients,
                message,
            } => {
                let mut inbox = Vec::with_capacity(recipients.len());
                if recipients.is_empty() {
                    return Ok(Ok(Appended::Direct { to, message, inbox }));
                }
                let full = self.full_inboxes(&recipients)?;
                if !full.is_empty() {
                    return Ok(Err(StoreError::InboxFull {
                        users: full,
                        limit: self.limits.max_inbox_messages,
                    }));
                }
                // Stored once; each conversation and inbox entry points at it.
                let (is_binary, content) = content_bytes(&message.content);
                self.insert_direct.execute(params![
                    message.id,
                    &*message.from,
                    // A list of plain strings always serializes.
                    serde_json::to_string(&to).unwrap_or_default(),
                    message.ts as i64,
                    is_binary,
                    content
                ])?;
                let seq = self.tx.last_insert_rowid();
                for recipient in recipients {
                    conversation_name(&mut self.name, &message.from, &recipient);
                    let slot = self.slot()?;
                    self.stage(slot, false, seq)?;
                    inbox_name(&mut self.name, &recipient);
                    let slot = self.slot()?;
                    let pos = self.stage(slot, true, seq)?;
                    inbox.push((recipient, Offset(pos)));
                }
                Ok(Ok(Appended::Direct { to, message, inbox }))
            }
        }
    }

    /// Gives the stream named `self.name` (at `slot`) its next offset, with an entry pointing
    /// at direct message `message`, staged (see `staging.rs`); returns the offset.
    fn stage(&mut self, slot: usize, inbox: bool, message: i64) -> rusqlite::Result<u64> {
        let (stream, pos) = self.bump(slot);
        self.insert_staged
            .execute(params![inbox, stream, pos as i64, message])?;
        let entry = Unmerged {
            inbox,
            stream,
            pos,
            message,
            row: self.tx.last_insert_rowid(),
        };
        self.staged.push((self.name.clone(), entry));
        Ok(pos)
    }

    /// The recipients whose inbox already holds `max_inbox_messages` entries above its floor.
    fn full_inboxes(&mut self, recipients: &[String]) -> rusqlite::Result<Vec<String>> {
        let limit = self.limits.max_inbox_messages;
        let mut full = Vec::new();
        if limit == 0 {
            return Ok(full);
        }
        for recipient in recipients {
            inbox_name(&mut self.name, recipient);
            let slot = self.slot()?;
            let state = &self.streams.states[slot];
            if state.last - state.floor() >= limit {
                full.push(recipient.clone());
            }
        }
        Ok(full)
    }

    pub(super) fn ack(
        &mut self,
        user: &str,
        device: Option<&str>,
        offset: Offset,
    ) -> rusqlite::Result<Result<Offset, StoreError>> {
        inbox_name(&mut self.name, user);
        let slot = self.slot()?;
        let state = &self.streams.states[slot];
        if offset.0 > state.last {
            return Ok(Err(StoreError::AckBeyondInbox {
                requested: offset.0,
                newest: state.last,
            }));
        }
        let device_mark = match device {
            Some(device) => Some(self.ack_device(slot, device, offset.0)?),
            None => None,
        };
        let state = &mut self.streams.states[slot];
        if offset.0 > state.acked {
            state.acked = offset.0;
            self.dirty.push(slot);
        }
        Ok(Ok(Offset(device_mark.unwrap_or(state.acked))))
    }

    /// Raises one device's mark to `offset` (from the inbox's floor for a device without
    /// one, evicting the least recently used mark when the user has the most allowed); returns
    /// the device's mark after.
    fn ack_device(&mut self, slot: usize, device: &str, offset: u64) -> rusqlite::Result<u64> {
        let state = &self.streams.states[slot];
        let (stream, floor) = (state.id, state.floor());
        let known: Option<i64> = self
            .tx
            .prepare_cached("SELECT acked FROM inbox_marks WHERE stream = ?1 AND device = ?2")?
            .query_row(params![stream, device], |row| row.get(0))
            .optional()?;
        if known.is_none() {
            let marks: i64 = self
                .tx
                .prepare_cached("SELECT count(*) FROM inbox_marks WHERE stream = ?1")?
                .query_row([stream], |row| row.get(0))?;
            if marks as usize >= self.limits.max_devices_per_user {
                let evicted: Option<String> = self
                    .tx
                    .prepare_cached(
                        "DELETE FROM inbox_marks WHERE stream = ?1 AND device =
                         (SELECT device FROM inbox_marks WHERE stream = ?1
                          ORDER BY used_ms, acked, device LIMIT 1)
                         RETURNING device",
                    )?
                    .query_row([stream], |row| row.get(0))
                    .optional()?;
                tracing::info!(
                    stream,
                    ?evicted,
                    "store.max_devices_per_user reached: the least recently used device mark was dropped"
                );
            }
        }
        let mark = (known.map_or(floor, |mark| mark as u64)).max(offset);
        self.tx
            .prepare_cached(
                "INSERT INTO inbox_marks (stream, device, acked, used_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (stream, device) DO UPDATE SET acked = ?3, used_ms = ?4",
            )?
            .execute(params![stream, device, mark as i64, unix_millis()])?;
        let lowest: Option<i64> = self
            .tx
            .prepare_cached("SELECT min(acked) FROM inbox_marks WHERE stream = ?1")?
            .query_row([stream], |row| row.get(0))?;
        self.streams.states[slot].lowest_device_mark = lowest.map(|mark| mark as u64);
        Ok(mark)
    }

    /// Writes every changed stream's state.
    pub(super) fn flush(&mut self) -> rusqlite::Result<()> {
        self.dirty.sort_unstable();
        self.dirty.dedup();
        for &slot in &self.dirty {
            let state = &self.streams.states[slot];
            self.update_stream
                .execute(params![state.id, state.last as i64, state.acked as i64])?;
        }
        Ok(())
    }
}

fn unix_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}

fn content_bytes(content: &Payload) -> (bool, &[u8]) {
    match content {
        Payload::Json(raw) => (false, raw.get().as_bytes()),
        Payload::Binary(bytes) => (true, &bytes[..]),
    }
}
