//! Readers: a few connections of their own, so reads never queue behind the writer (WAL lets
//! them read the last committed state while it writes). Each read runs on tokio's blocking
//! pool inside one read transaction, so bounds and rows come from the same snapshot.
//! [`ReaderPool`] shares the connections so that clients looping big reads cannot starve the
//! small ones (docs/architecture.md, "Store reads").

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use herald_protocol::Payload;
use rusqlite::{Connection, OptionalExtension, Row, params};
use serde_json::value::RawValue;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::schema::{conversation_name, inbox_name, newest_in_table, room_name};
use super::staging::{Staged, StagedEntry};
use crate::engine::store::{
    Epoch, InboxRead, Offset, Page, StoreError, StoredMessage, StreamBounds, StreamPosition,
    StreamRead,
};

/// Connections for reads, shared fairly between clients (see [`ReadKind`]).
///
/// Invariants:
/// - a permit of `free` stands for one connection in `idle`; the blocking task that runs a
///   read puts its connection back before releasing its permits, even when the caller stopped
///   waiting (a closing client drops its request) or the read panicked;
/// - heavy reads hold at most `connections - 1` connections at once, so a light read waits
///   only for other light reads and for heavy reads already running, never for a queue of
///   heavy ones.
pub struct ReaderPool {
    /// std Mutex: held only to push or pop a connection, never across an `.await`.
    idle: Arc<Mutex<Vec<Connection>>>,
    /// Idle connections. tokio's semaphore is fair (first come, first served) and a client
    /// connection has one request in progress at a time, so a client that loops reads waits
    /// behind every other waiting client at each turn.
    free: Arc<Semaphore>,
    /// Connections heavy reads may hold at once.
    heavy: Arc<Semaphore>,
}

/// What a read may cost, which decides the connections it may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadKind {
    /// A few index lookups (a room's bounds at a join), or a page of the user's own inbox,
    /// read once per connection and paced by the client taking it.
    Light,
    /// A page of up to a request's `limit` messages that a client can ask for again and again:
    /// `history`, a room's recovery on `join`.
    Heavy,
}

/// A connection taken from the pool, given back (before its permits) when dropped.
struct Lease {
    conn: Option<Connection>,
    idle: Arc<Mutex<Vec<Connection>>>,
    _free: OwnedSemaphorePermit,
    _heavy: Option<OwnedSemaphorePermit>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        // After a panic too: the read's transaction rolled back as it unwound, so the
        // connection is clean. The permits are fields, released after this body.
        if let Some(conn) = self.conn.take() {
            lock(&self.idle).push(conn);
        }
    }
}

fn lock(idle: &Mutex<Vec<Connection>>) -> std::sync::MutexGuard<'_, Vec<Connection>> {
    idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ReaderPool {
    pub fn new(connections: Vec<Connection>) -> ReaderPool {
        let count = connections.len();
        ReaderPool {
            free: Arc::new(Semaphore::new(count)),
            heavy: Arc::new(Semaphore::new(count.saturating_sub(1).max(1))),
            idle: Arc::new(Mutex::new(connections)),
        }
    }

    /// Runs `read` on an idle connection inside a read transaction.
    pub async fn read<T, F>(
        &self,
        kind: ReadKind,
        operation: &'static str,
        read: F,
    ) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Transaction<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        let heavy = match kind {
            ReadKind::Light => None,
            ReadKind::Heavy => Some(acquire(&self.heavy).await?),
        };
        let free = acquire(&self.free).await?;
        let idle = self.idle.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let conn = lock(&idle).pop();
            let mut lease = Lease {
                conn,
                idle,
                _free: free,
                _heavy: heavy,
            };
            let Some(conn) = lease.conn.as_mut() else {
                // Each permit of `free` stands for an idle connection, so this is not reached.
                return Err(StoreError::Backend {
                    operation,
                    reason: "no reader connection available".into(),
                });
            };
            conn.transaction()
                .map_err(|e| backend(operation, e))
                .and_then(|tx| read(&tx))
        })
        .await;
        joined.unwrap_or_else(|error| {
            Err(StoreError::Backend {
                operation,
                reason: error.to_string(),
            })
        })
    }
}

async fn acquire(permits: &Arc<Semaphore>) -> Result<OwnedSemaphorePermit, StoreError> {
    permits
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| StoreError::Closed)
}

pub fn backend(operation: &'static str, error: rusqlite::Error) -> StoreError {
    StoreError::Backend {
        operation,
        reason: error.to_string(),
    }
}

/// What `streams` holds about one stream at the moment of a read.
#[derive(Default)]
struct Stream {
    /// 0 when the stream has no row yet: no message row refers to it.
    id: i64,
    /// The newest offset and the epoch (zero and unset for a stream never written). The
    /// offset is exact for rooms only (see `schema.rs`); reads of the others use the epoch.
    top: StreamPosition,
    acked: Offset,
}

/// Looks a stream up by the name `name_of` writes.
fn stream(
    tx: &rusqlite::Transaction<'_>,
    name_of: impl FnOnce(&mut String),
) -> rusqlite::Result<Stream> {
    let mut name = String::new();
    name_of(&mut name);
    let stream = tx
        .prepare_cached("SELECT id, epoch, last_pos, acked FROM streams WHERE name = ?1")?
        .query_row([&name], |row| {
            Ok(Stream {
                id: row.get(0)?,
                top: StreamPosition {
                    epoch: Epoch(row.get(1)?),
                    offset: Offset(row.get::<_, i64>(2)? as u64),
                },
                acked: Offset(row.get::<_, i64>(3)? as u64),
            })
        })
        .optional()?;
    Ok(stream.unwrap_or_default())
}

fn room_stream(tx: &rusqlite::Transaction<'_>, room: &str) -> rusqlite::Result<Stream> {
    stream(tx, |name| room_name(name, room))
}

pub fn room_bounds(tx: &rusqlite::Transaction<'_>, room: &str) -> rusqlite::Result<StreamBounds> {
    bounds(tx, &room_stream(tx, room)?)
}

fn bounds(tx: &rusqlite::Transaction<'_>, stream: &Stream) -> rusqlite::Result<StreamBounds> {
    let first: Option<i64> = tx
        .prepare_cached("SELECT min(pos) FROM room_messages WHERE stream = ?1")?
        .query_row([stream.id], |row| row.get(0))?;
    let first = first.map_or(stream.top.offset.next(), |pos| Offset(pos as u64));
    Ok(StreamBounds {
        top: stream.top.clone(),
        first,
    })
}

const ROOM_COLUMNS: &str = "pos, id, sender, ts, is_binary, content";
/// Entries of a conversation or an inbox (`e`) with their messages (`d`). CROSS JOIN keeps the
/// entries as the outer loop: a range of one stream, then one rowid lookup per entry.
const DIRECT_COLUMNS: &str = "e.pos, d.id, d.sender, d.ts, d.is_binary, d.content, d.recipients";

pub fn read_room(
    tx: &rusqlite::Transaction<'_>,
    room: &str,
    after: Offset,
    limit: usize,
) -> Result<StreamRead, StoreError> {
    let stream = room_stream(tx, room).map_err(|e| backend("read room", e))?;
    let bounds = bounds(tx, &stream).map_err(|e| backend("read room", e))?;
    let messages = tx
        .prepare_cached(&format!(
            "SELECT {ROOM_COLUMNS} FROM room_messages WHERE stream = ?1 AND pos > ?2
             ORDER BY pos LIMIT ?3"
        ))
        .and_then(|mut statement| {
            statement
                .query_map(params![stream.id, after.0 as i64, limit as i64], |row| {
                    room_row(row, room)
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(|e| backend("read room", e))?;
    Ok(StreamRead {
        bounds,
        messages: messages.into_iter().collect::<Result<_, _>>()?,
    })
}

pub fn room_history(
    tx: &rusqlite::Transaction<'_>,
    room: &str,
    before: Option<Offset>,
    limit: usize,
) -> Result<Page, StoreError> {
    let stream = room_stream(tx, room).map_err(|e| backend("room history", e))?;
    let rows = tx
        .prepare_cached(&format!(
            "SELECT {ROOM_COLUMNS} FROM room_messages WHERE stream = ?1 AND pos < ?2
             ORDER BY pos DESC LIMIT ?3"
        ))
        .and_then(|mut statement| {
            statement
                .query_map(params![stream.id, upper(before), limit as i64 + 1], |row| {
                    room_row(row, room)
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(|e| backend("room history", e))?;
    page(stream.top.epoch, rows, limit)
}

pub fn conversation_history(
    tx: &rusqlite::Transaction<'_>,
    staged: &Staged,
    user: &str,
    with: &str,
    before: Option<Offset>,
    limit: usize,
) -> Result<Page, StoreError> {
    let mut name = String::new();
    conversation_name(&mut name, user, with);
    let upper = upper(before);
    // Before the first query, which takes the snapshot (see `staging.rs`). Those at or below
    // the table's newest are dropped below, so the page's worth above it is among these.
    let candidates = staged.newest_below(&name, upper as u64, limit + 1);
    let failed = |e| backend("conversation history", e);
    let stream = stream(tx, |buffer| buffer.clone_from(&name)).map_err(failed)?;
    // Newest first, the staged entries (the stream's newest) ahead of the table's.
    let in_table = merged_through(tx, "conversations", &stream, &candidates).map_err(failed)?;
    let mut rows = staged_rows(
        tx,
        &stream,
        candidates
            .iter()
            .rev()
            .filter(|entry| entry.pos > in_table && (entry.pos as i64) < upper),
        limit + 1,
    )
    .map_err(failed)?;
    if rows.len() <= limit {
        let stored = tx
            .prepare_cached(&format!(
                "SELECT {DIRECT_COLUMNS} FROM conversations e CROSS JOIN direct_messages d
                 ON d.seq = e.message WHERE e.stream = ?1 AND e.pos < ?2
                 ORDER BY e.pos DESC LIMIT ?3"
            ))
            .and_then(|mut statement| {
                statement
                    .query_map(
                        params![stream.id, upper, (limit + 1 - rows.len()) as i64],
                        direct_row,
                    )?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(failed)?;
        rows.extend(stored);
    }
    page(stream.top.epoch, rows, limit)
}

pub fn read_inbox(
    tx: &rusqlite::Transaction<'_>,
    staged: &Staged,
    user: &str,
    device: Option<&str>,
    after: Offset,
    limit: usize,
) -> Result<InboxRead, StoreError> {
    let mut name = String::new();
    inbox_name(&mut name, user);
    // Before the first query, which takes the snapshot (see `staging.rs`); the mark is not
    // known yet, so every staged entry above `after` (those the table holds too are dropped
    // below).
    let candidates = staged.above(&name, after.0);
    let failed = |e| backend("read inbox", e);
    let stream = stream(tx, |buffer| buffer.clone_from(&name)).map_err(failed)?;
    let (acked, device_has_mark) = match device {
        None => (stream.acked, false),
        Some(device) => device_mark(tx, &stream, device).map_err(failed)?,
    };
    let from = after.max(acked);
    let mut rows = tx
        .prepare_cached(&format!(
            "SELECT {DIRECT_COLUMNS} FROM inbox e CROSS JOIN direct_messages d
             ON d.seq = e.message WHERE e.stream = ?1 AND e.pos > ?2
             ORDER BY e.pos LIMIT ?3"
        ))
        .and_then(|mut statement| {
            statement
                .query_map(params![stream.id, from.0 as i64, limit as i64], direct_row)?
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(failed)?;
    if rows.len() < limit {
        // The staged entries are the inbox's newest: they follow the table's.
        let in_table = merged_through(tx, "inbox", &stream, &candidates).map_err(failed)?;
        let newer = candidates
            .iter()
            .filter(|entry| entry.pos > from.0.max(in_table));
        let staged = staged_rows(tx, &stream, newer, limit - rows.len()).map_err(failed)?;
        rows.extend(staged);
    }
    Ok(InboxRead {
        acked,
        device_has_mark,
        messages: rows.into_iter().collect::<Result<_, _>>()?,
    })
}

/// The offset of the stream's newest entry in `table`, when there are staged `candidates`
/// (0 when there are none): those at or below it were merged already (see `staging.rs`).
fn merged_through(
    tx: &rusqlite::Transaction<'_>,
    table: &str,
    stream: &Stream,
    candidates: &[StagedEntry],
) -> rusqlite::Result<u64> {
    if candidates.is_empty() {
        return Ok(0);
    }
    newest_in_table(tx, table, stream.id)
}

/// Up to `limit` of the `candidates` (a stream's staged entries above its table's newest, as
/// listed before the snapshot, in the order wanted) that this snapshot holds in
/// `staged_entries`; those it does not were merged before it, and its read of the stream's
/// table finds them. A row is checked by stream and offset too: rows are numbered afresh after
/// a merge emptied the table.
fn staged_rows<'a>(
    tx: &rusqlite::Transaction<'_>,
    stream: &Stream,
    candidates: impl Iterator<Item = &'a StagedEntry>,
    limit: usize,
) -> rusqlite::Result<Vec<Decoded>> {
    let mut rows = Vec::new();
    if limit == 0 {
        return Ok(rows);
    }
    let mut statement = tx.prepare_cached(&format!(
        "SELECT {DIRECT_COLUMNS} FROM staged_entries e CROSS JOIN direct_messages d
         ON d.seq = e.message WHERE e.seq = ?1 AND e.stream = ?2 AND e.pos = ?3"
    ))?;
    for entry in candidates {
        let row = statement
            .query_row(params![entry.row, stream.id, entry.pos as i64], direct_row)
            .optional()?;
        rows.extend(row);
        if rows.len() == limit {
            break;
        }
    }
    Ok(rows)
}

/// The mark `device` reads from (its own, or the inbox's floor while it has none) and whether
/// it has one.
fn device_mark(
    tx: &rusqlite::Transaction<'_>,
    stream: &Stream,
    device: &str,
) -> rusqlite::Result<(Offset, bool)> {
    let (own, floor): (Option<i64>, i64) = tx
        .prepare_cached(
            "SELECT (SELECT acked FROM inbox_marks WHERE stream = ?1 AND device = ?2),
                 min(?3, coalesce((SELECT min(acked) FROM inbox_marks WHERE stream = ?1), ?3))",
        )?
        .query_row(params![stream.id, device, stream.acked.0 as i64], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })?;
    Ok((Offset(own.unwrap_or(floor) as u64), own.is_some()))
}

/// SQLite integers are signed: "no upper bound" is the largest one.
fn upper(before: Option<Offset>) -> i64 {
    before.map_or(i64::MAX, |offset| offset.0.min(i64::MAX as u64) as i64)
}

/// Rows come newest first with one extra row that only tells whether there are more.
fn page(
    epoch: Epoch,
    rows: Vec<Result<StoredMessage, StoreError>>,
    limit: usize,
) -> Result<Page, StoreError> {
    let more = rows.len() > limit;
    let mut messages = rows
        .into_iter()
        .take(limit)
        .collect::<Result<Vec<_>, _>>()?;
    messages.reverse();
    Ok(Page {
        epoch,
        messages,
        more,
    })
}

type Decoded = Result<StoredMessage, StoreError>;

fn room_row(row: &Row<'_>, room: &str) -> rusqlite::Result<Decoded> {
    common_row(row, None, Some(room.to_owned()))
}

fn direct_row(row: &Row<'_>) -> rusqlite::Result<Decoded> {
    let recipients: String = row.get(6)?;
    let to = serde_json::from_str::<Vec<String>>(&recipients).unwrap_or_default();
    common_row(row, Some(to), None)
}

/// Columns 0..6: pos, id, sender, ts, is_binary, content. A row whose content does not decode
/// becomes an error value rather than failing the whole read's SQL.
fn common_row(
    row: &Row<'_>,
    to: Option<Vec<String>>,
    room: Option<String>,
) -> rusqlite::Result<Decoded> {
    let offset = Offset(row.get::<_, i64>(0)? as u64);
    let id: String = row.get(1)?;
    let from: String = row.get(2)?;
    let ts = row.get::<_, i64>(3)? as u64;
    let is_binary: bool = row.get(4)?;
    let bytes: Vec<u8> = row.get(5)?;
    let content = if is_binary {
        Ok(Payload::Binary(Bytes::from(bytes)))
    } else {
        String::from_utf8(bytes)
            .map_err(|e| e.to_string())
            .and_then(|text| RawValue::from_string(text).map_err(|e| e.to_string()))
            .map(Payload::Json)
    };
    Ok(content
        .map(|content| StoredMessage {
            id,
            from,
            to,
            room,
            ts,
            content,
            offset,
        })
        .map_err(|reason| StoreError::Backend {
            operation: "decode message",
            reason: format!("stored message at offset {offset} is damaged: {reason}"),
        }))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::oneshot;

    use super::*;

    fn pool(connections: usize) -> (tempfile::TempDir, Arc<ReaderPool>) {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("herald.db");
        let connections = (0..connections)
            .map(|_| Connection::open(&path).unwrap())
            .collect();
        (folder, Arc::new(ReaderPool::new(connections)))
    }

    /// Starts a read that runs until `release` is sent; returns once it is running.
    async fn blocked_read(
        pool: &Arc<ReaderPool>,
        kind: ReadKind,
    ) -> (
        tokio::task::JoinHandle<Result<(), StoreError>>,
        std::sync::mpsc::Sender<()>,
    ) {
        let (started, running) = oneshot::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let read = tokio::spawn({
            let pool = pool.clone();
            async move {
                pool.read(kind, "blocked read", move |_| {
                    let _ = started.send(());
                    let _ = released.recv();
                    Ok(())
                })
                .await
            }
        });
        running.await.unwrap();
        (read, release)
    }

    async fn select_one(pool: &ReaderPool, kind: ReadKind) -> Result<i64, StoreError> {
        let read = pool.read(kind, "select one", |tx| {
            tx.query_row("SELECT 1", [], |row| row.get(0))
                .map_err(|e| backend("select one", e))
        });
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("the read got a connection")
    }

    /// During a merge an entry can be in its table and still in `staged_entries`: a read lists
    /// it once, pages included.
    #[test]
    fn an_entry_both_merged_and_still_staged_is_read_once() {
        let folder = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(folder.path().join("herald.db")).unwrap();
        super::super::schema::prepare(&conn).unwrap();
        conn.execute_batch(
            r#"INSERT INTO streams (id, name, epoch, last_pos, acked)
                 VALUES (1, 'u/bob', 'e', 0, 0), (2, 'c/alice,bob', 'e', 0, 0);
             INSERT INTO direct_messages (seq, id, sender, recipients, ts, is_binary, content)
                 VALUES (1, 'm1', 'alice', '["bob"]', 1, 0, CAST('1' AS BLOB)),
                        (2, 'm2', 'alice', '["bob"]', 2, 0, CAST('2' AS BLOB)),
                        (3, 'm3', 'alice', '["bob"]', 3, 0, CAST('3' AS BLOB)),
                        (4, 'm4', 'alice', '["bob"]', 4, 0, CAST('4' AS BLOB));
             -- 1 and 2 merged, 2 not yet deleted from staging; 3 and 4 staged
             INSERT INTO inbox VALUES (1, 1, 1), (1, 2, 2);
             INSERT INTO conversations VALUES (2, 1, 1), (2, 2, 2);
             INSERT INTO staged_entries (seq, inbox, stream, pos, message)
                 VALUES (10, 1, 1, 2, 2), (11, 0, 2, 2, 2), (12, 1, 1, 3, 3),
                        (13, 0, 2, 3, 3), (14, 1, 1, 4, 4), (15, 0, 2, 4, 4);"#,
        )
        .unwrap();
        let staged = Staged::default();
        for (name, first_row) in [("u/bob", 10), ("c/alice,bob", 11)] {
            staged.add((0..3).map(|n| {
                let entry = StagedEntry {
                    pos: n as u64 + 2,
                    row: first_row + 2 * n,
                };
                (name.to_owned(), entry)
            }));
        }
        let tx = conn.transaction().unwrap();
        let offsets = |messages: &[StoredMessage]| -> Vec<u64> {
            messages.iter().map(|m| m.offset.0).collect()
        };
        let inbox = |after, limit| {
            let read = read_inbox(&tx, &staged, "bob", None, Offset(after), limit).unwrap();
            offsets(&read.messages)
        };
        assert_eq!(inbox(0, 10), [1, 2, 3, 4]);
        assert_eq!(inbox(0, 3), [1, 2, 3]);
        assert_eq!(inbox(1, 2), [2, 3]);
        let history = |before, limit| {
            let page = conversation_history(&tx, &staged, "alice", "bob", before, limit).unwrap();
            (offsets(&page.messages), page.more)
        };
        assert_eq!(history(None, 10), (vec![1, 2, 3, 4], false));
        assert_eq!(history(None, 3), (vec![2, 3, 4], true));
        assert_eq!(history(Some(Offset(4)), 10), (vec![1, 2, 3], false));
    }

    #[tokio::test]
    async fn a_read_whose_caller_went_away_gives_its_connection_back() {
        let (_folder, pool) = pool(1);
        let (abandoned, release) = blocked_read(&pool, ReadKind::Light).await;
        abandoned.abort();
        assert!(abandoned.await.unwrap_err().is_cancelled());
        release.send(()).unwrap();
        assert_eq!(select_one(&pool, ReadKind::Light).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn heavy_reads_leave_a_connection_to_light_ones() {
        let (_folder, pool) = pool(2);
        let (first, release_first) = blocked_read(&pool, ReadKind::Heavy).await;
        let second = tokio::spawn({
            let pool = pool.clone();
            async move { select_one(&pool, ReadKind::Heavy).await }
        });
        // The second heavy read waits for the first; a light read does not.
        assert_eq!(select_one(&pool, ReadKind::Light).await.unwrap(), 1);
        assert!(!second.is_finished());
        release_first.send(()).unwrap();
        first.await.unwrap().unwrap();
        assert_eq!(second.await.unwrap().unwrap(), 1);
    }
}
