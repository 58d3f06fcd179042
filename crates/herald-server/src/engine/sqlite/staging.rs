//! Staged entries: the conversation and inbox entries of new direct messages are appended to
//! `staged_entries`, and moved to their clustered tables (`conversations`, `inbox`) in large,
//! stream-sorted merges.
//!
//! Why: every commit writes each page it dirtied, whole, to the WAL. Inserted straight into the
//! clustered tables, the entries of a commit land on the newest page of every stream it touched
//! (at 20k direct messages/s over 1,000 users, ~450 pages, 1.8 MB per commit of ~250 messages),
//! and that page traffic was most of the store's cost per direct message. Appended to a rowid
//! table, a commit's entries fill a couple of pages; a merge then writes each stream's page once
//! for all the entries it gathered since the last merge.
//!
//! A merge ([`Merger`]) takes the `MERGE_AT` or more entries staged since the last one, sorts
//! them by stream, and inserts them into their tables a slice at a time, each slice its own
//! short transaction between two batches of appends (one large transaction held every append
//! for 40–60 ms); then it deletes the merged rows from `staged_entries`, a slice at a time too.
//!
//! Readers see staged entries through [`Staged`], the writer's in-memory index of what the table
//! holds (by stream name, the table's row of each entry), and read those rows in their own
//! snapshot. While a merge is under way an entry may be in both tables: a reader takes from
//! `staged_entries` only the entries above the newest one its snapshot finds in the stream's
//! table.
//!
//! # Invariants
//! - `Staged` lists exactly the rows of `staged_entries`, except between a commit and the
//!   writer's next step: the writer adds a batch's entries after it committed them (before any
//!   of them is answered or delivered), and forgets merged ones after the transaction that
//!   deleted them committed.
//! - Above the newest entry of a stream's table, the stream's entries are all staged, in offset
//!   order (offsets only grow, and a merge inserts a stream's entries oldest first).
//! - A reader copies a stream's staged list before its read transaction takes its snapshot (see
//!   [`Staged::above`]).

use std::collections::HashMap;
use std::sync::Mutex;

use std::sync::Arc;

use rusqlite::{Connection, Transaction, TransactionBehavior, params};

use super::schema::Synchronous;

/// One staged entry: its offset in its stream, and its row in `staged_entries`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StagedEntry {
    pub pos: u64,
    pub row: i64,
}

/// The rows of `staged_entries` by stream name (`c/…` conversations, `u/…` inboxes), in offset
/// order. std Mutex: held to copy or extend one list, never across an `.await` or a query.
#[derive(Default)]
pub(crate) struct Staged {
    streams: Mutex<HashMap<String, Vec<StagedEntry>>>,
}

impl Staged {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<StagedEntry>>> {
        self.streams
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records a committed batch's staged entries.
    pub(super) fn add(&self, entries: impl IntoIterator<Item = (String, StagedEntry)>) {
        let mut streams = self.lock();
        for (name, entry) in entries {
            streams.entry(name).or_default().push(entry);
        }
    }

    /// The offset of a stream's newest staged entry.
    pub fn newest(&self, name: &str) -> Option<u64> {
        self.lock()
            .get(name)
            .and_then(|entries| entries.last())
            .map(|entry| entry.pos)
    }

    /// Forgets the entries of rows up to `last_row`, once their deletion has committed.
    fn forget_through(&self, last_row: i64) {
        self.lock().retain(|_, entries| {
            // A stream's rows grow with its offsets.
            let merged = entries.partition_point(|entry| entry.row <= last_row);
            entries.drain(..merged);
            !entries.is_empty()
        });
    }

    /// Forgets every entry, once a merge that moved them all has committed.
    fn clear(&self) {
        self.lock().clear();
    }

    /// A stream's staged entries with an offset above `after`. A reader calls this before its
    /// read transaction takes its snapshot (before its first query): whatever a merge moved
    /// since is then in the clustered table of that snapshot, and whatever is committed after
    /// was not answered before the read began.
    pub fn above(&self, name: &str, after: u64) -> Vec<StagedEntry> {
        self.copy_part(name, |entries| {
            &entries[entries.partition_point(|entry| entry.pos <= after)..]
        })
    }

    /// Like [`Staged::above`]: the newest `count` entries of a stream with an offset below
    /// `before`, oldest first.
    pub fn newest_below(&self, name: &str, before: u64, count: usize) -> Vec<StagedEntry> {
        self.copy_part(name, |entries| {
            let end = entries.partition_point(|entry| entry.pos < before);
            &entries[end.saturating_sub(count)..end]
        })
    }

    /// A copy of the `part` of a stream's staged entries (in offset order) a reader needs.
    fn copy_part(
        &self,
        name: &str,
        part: impl FnOnce(&[StagedEntry]) -> &[StagedEntry],
    ) -> Vec<StagedEntry> {
        self.lock()
            .get(name)
            .map_or_else(Vec::new, |entries| part(entries).to_vec())
    }
}

/// When merges start and how much each of their transactions takes. The defaults are what
/// the server uses; tests make merges small and frequent.
#[derive(Debug, Clone, Copy)]
pub struct MergeTuning {
    /// Staged entries that start a merge.
    pub merge_at: usize,
    /// Entries one merge transaction inserts.
    pub slice: usize,
}

impl Default for MergeTuning {
    fn default() -> Self {
        MergeTuning {
            merge_at: MERGE_AT,
            slice: MERGE_SLICE,
        }
    }
}

/// Staged entries that start a merge. The more entries a merge takes, the more each stream's
/// page gathers before it is written (measured at 20–30k direct messages/s, each merge one
/// transaction: 2.5 µs per entry at 16k, 1 µs at 64k).
const MERGE_AT: usize = 64 * 1024;

/// Entries one merge transaction inserts: under 2.5 ms of work in 96% of the steps at 30k
/// direct messages/s, so an append waits little behind a merge (slices of 4,096 took 2.5–10 ms,
/// and p99 at that rate was 24–98 ms against 18–25 ms with these).
const MERGE_SLICE: usize = 2048;

/// An entry as the writer keeps it until it is merged.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Unmerged {
    pub inbox: bool,
    pub stream: i64,
    pub pos: u64,
    pub message: i64,
    pub row: i64,
}

/// A merge under way: its entries in stream order, how many are inserted, the newest row it
/// moves, and the rows deleted so far from `staged_entries` (all up to that one).
struct Round {
    entries: Vec<Unmerged>,
    inserted: usize,
    last_row: i64,
    deleted_through: i64,
}

/// The writer's side of staging: what was staged since the last merge, and the merge under way.
pub(crate) struct Merger {
    staged: Arc<Staged>,
    waiting: Vec<Unmerged>,
    round: Option<Round>,
    tuning: MergeTuning,
    /// Whether the store's commits fsync (see [`Merger::step`]).
    synchronous: Synchronous,
}

impl Merger {
    pub fn new(staged: Arc<Staged>, tuning: MergeTuning, synchronous: Synchronous) -> Merger {
        Merger {
            staged,
            waiting: Vec::new(),
            round: None,
            tuning,
            synchronous,
        }
    }

    /// Records a committed batch's staged entries, for readers and for the next merge.
    pub fn committed(&mut self, entries: Vec<(String, Unmerged)>) {
        if entries.is_empty() {
            return;
        }
        self.waiting.extend(entries.iter().map(|(_, entry)| *entry));
        self.staged.add(entries.into_iter().map(|(name, entry)| {
            (
                name,
                StagedEntry {
                    pos: entry.pos,
                    row: entry.row,
                },
            )
        }));
    }

    /// The readers' index, which the writer reads too (a stream's newest staged offset).
    pub fn staged(&self) -> &Staged {
        &self.staged
    }

    /// Whether a merge is under way or due: the writer then takes a step between batches.
    pub fn due(&self) -> bool {
        self.round.is_some() || self.waiting.len() >= self.tuning.merge_at
    }

    /// Whether anything is staged at all.
    pub fn holds_entries(&self) -> bool {
        self.round.is_some() || !self.waiting.is_empty()
    }

    /// Takes the next step of the merge under way (starting one if due), in one transaction:
    /// inserts a slice of its entries into their tables, or, once all are, deletes a slice of
    /// its rows from `staged_entries`. Returns whether the step finished the merge, or `None`
    /// when none was due. On failure nothing changed, and the next step tries it again.
    ///
    /// Its commit does not fsync even with `synchronous = "full"`: it moves entries that are
    /// durable already. The WAL is written in order, so the next append's fsync makes the step
    /// durable too; a step lost with the power leaves its entries staged (or merged and still
    /// staged), which the next open merges (see [`merge_all`]).
    pub fn step(&mut self, conn: &mut Connection) -> rusqlite::Result<Option<bool>> {
        if self.round.is_none() {
            if self.waiting.len() < self.tuning.merge_at {
                return Ok(None);
            }
            let mut entries = std::mem::take(&mut self.waiting);
            entries.sort_unstable_by_key(|entry| (entry.inbox, entry.stream, entry.pos));
            let last_row = entries.iter().map(|entry| entry.row).max().unwrap_or(0);
            let first_row = entries.iter().map(|entry| entry.row).min().unwrap_or(0);
            self.round = Some(Round {
                entries,
                inserted: 0,
                last_row,
                deleted_through: first_row - 1,
            });
        }
        let Some(round) = self.round.as_mut() else {
            return Ok(None);
        };
        let slice = self.tuning.slice.max(1);
        let relaxed = self.synchronous == Synchronous::Full;
        if relaxed {
            conn.execute_batch("PRAGMA synchronous = NORMAL")?;
        }
        let stepped = take_step(conn, round, slice);
        if relaxed {
            // Must not be left relaxed: appends are acknowledged on the strength of it.
            conn.execute_batch("PRAGMA synchronous = FULL")?;
        }
        let finished = stepped?;
        if round.inserted == round.entries.len() {
            self.staged.forget_through(round.deleted_through);
        }
        if finished {
            self.round = None;
        }
        Ok(Some(finished))
    }

    /// Moves every staged entry to its table in one transaction (before pruning, at close).
    pub fn merge_all(&mut self, conn: &mut Connection) -> rusqlite::Result<usize> {
        if !self.holds_entries() {
            return Ok(0);
        }
        let moved = merge_all(conn)?;
        self.staged.clear();
        self.waiting.clear();
        self.round = None;
        Ok(moved)
    }
}

/// One step of `round` (see [`Merger::step`]); returns whether the round is finished. The
/// round's counters move only once the step has committed.
fn take_step(conn: &mut Connection, round: &mut Round, slice: usize) -> rusqlite::Result<bool> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if round.inserted < round.entries.len() {
        let end = (round.inserted + slice).min(round.entries.len());
        insert_entries(&tx, &round.entries[round.inserted..end])?;
        tx.commit()?;
        round.inserted = end;
        return Ok(false);
    }
    // Deleting costs about a quarter of inserting per row.
    let through = round
        .deleted_through
        .saturating_add(4 * slice as i64)
        .min(round.last_row);
    tx.prepare_cached("DELETE FROM staged_entries WHERE seq <= ?1")?
        .execute([through])?;
    tx.commit()?;
    round.deleted_through = through;
    Ok(through == round.last_row)
}

/// Entries one INSERT statement carries: a statement per entry cost three times as much (7.9
/// against 2.7 ms for 4,096 entries; each run opens a cursor and descends from the root).
const ROWS_PER_INSERT: usize = 64;

/// Inserts entries sorted by table, stream and offset into their tables.
fn insert_entries(tx: &Transaction<'_>, entries: &[Unmerged]) -> rusqlite::Result<()> {
    for run in entries.chunk_by(|a, b| a.inbox == b.inbox) {
        let table = if run[0].inbox {
            "inbox"
        } else {
            "conversations"
        };
        let mut rows = run.chunks_exact(ROWS_PER_INSERT);
        let values = vec!["(?, ?, ?)"; ROWS_PER_INSERT].join(", ");
        let mut many = tx.prepare_cached(&format!(
            "INSERT INTO {table} (stream, pos, message) VALUES {values}"
        ))?;
        for chunk in &mut rows {
            let params = chunk
                .iter()
                .flat_map(|entry| [entry.stream, entry.pos as i64, entry.message]);
            many.execute(rusqlite::params_from_iter(params))?;
        }
        let mut one = tx.prepare_cached(&format!(
            "INSERT INTO {table} (stream, pos, message) VALUES (?, ?, ?)"
        ))?;
        for entry in rows.remainder() {
            one.execute(params![entry.stream, entry.pos as i64, entry.message])?;
        }
    }
    Ok(())
}

/// Moves every row of `staged_entries` to its table in one transaction, sorted by stream so that
/// each stream's page is written once, and returns how many it inserted. Entries that a
/// merge interrupted by a crash had already inserted are left as they are (the same stream and
/// offset always hold the same entry).
pub(crate) fn merge_all(conn: &mut Connection) -> rusqlite::Result<usize> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut moved = 0;
    for (table, inbox) in [("conversations", false), ("inbox", true)] {
        moved += tx
            .prepare_cached(&format!(
                "INSERT OR IGNORE INTO {table} (stream, pos, message)
                 SELECT stream, pos, message FROM staged_entries WHERE inbox = ?1
                 ORDER BY stream, pos"
            ))?
            .execute([inbox])?;
    }
    tx.prepare_cached("DELETE FROM staged_entries")?
        .execute([])?;
    tx.commit()?;
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::sqlite::schema;

    #[test]
    fn entries_a_merge_had_inserted_before_a_crash_are_merged_once_at_the_next_open() {
        let folder = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(folder.path().join("herald.db")).unwrap();
        schema::prepare(&conn).unwrap();
        conn.execute_batch(
            "INSERT INTO staged_entries (inbox, stream, pos, message)
                 VALUES (1, 7, 1, 10), (0, 8, 1, 10), (1, 7, 2, 11), (0, 8, 2, 11);
             -- the slice that committed before the crash
             INSERT INTO inbox VALUES (7, 1, 10);
             INSERT INTO conversations VALUES (8, 1, 10);",
        )
        .unwrap();
        assert_eq!(merge_all(&mut conn).unwrap(), 2, "the two not yet merged");
        let rows = |table: &str| -> Vec<(i64, i64, i64)> {
            conn.prepare(&format!(
                "SELECT stream, pos, message FROM {table} ORDER BY pos"
            ))
            .unwrap()
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
        };
        assert_eq!(rows("inbox"), [(7, 1, 10), (7, 2, 11)]);
        assert_eq!(rows("conversations"), [(8, 1, 10), (8, 2, 11)]);
        let staged: i64 = conn
            .query_row("SELECT count(*) FROM staged_entries", [], |row| row.get(0))
            .unwrap();
        assert_eq!(staged, 0);
    }

    #[test]
    fn a_reader_gets_a_copy_of_one_streams_entries_in_offset_order() {
        let staged = Staged::default();
        let entry = |pos, row| StagedEntry { pos, row };
        staged.add(vec![
            ("u/bob".into(), entry(1, 1)),
            ("c/alice,bob".into(), entry(7, 2)),
        ]);
        staged.add(vec![("u/bob".into(), entry(2, 3))]);
        staged.add(vec![("u/bob".into(), entry(3, 4))]);
        assert_eq!(
            staged.above("u/bob", 0),
            [entry(1, 1), entry(2, 3), entry(3, 4)]
        );
        assert_eq!(staged.above("u/bob", 2), [entry(3, 4)]);
        assert_eq!(staged.above("u/carol", 0), []);
        assert_eq!(staged.newest_below("u/bob", 3, 1), [entry(2, 3)]);
        assert_eq!(staged.newest_below("u/bob", u64::MAX, 10).len(), 3);
        assert_eq!(staged.newest("u/bob"), Some(3));
        staged.forget_through(2);
        assert_eq!(staged.above("u/bob", 0), [entry(2, 3), entry(3, 4)]);
        assert_eq!(staged.above("c/alice,bob", 0), []);
        staged.clear();
        assert_eq!(staged.above("u/bob", 0), []);
    }
}
