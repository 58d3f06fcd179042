//! The retention passes' steps. A pass ([`PruneJob`]) walks the streams in id order, a few at a
//! time, each step its own short transaction; the writer takes a step only while no command
//! waits. The steps read and write the file alone, never the cached stream states, which is why
//! they stand apart from the batch: the writer forgets the states of the streams a step removed.

use std::time::Duration;

use rusqlite::{Connection, Transaction, TransactionBehavior, params};
use tokio::sync::oneshot;

use crate::engine::sqlite::schema::{FLOOR, NEWEST, entry_table};
use crate::engine::store::{PruneReport, Retention, StoreError};

/// Most rows one pruning step deletes, and most streams it looks at.
const PRUNE_STEP_ROWS: u64 = 1000;
const PRUNE_STEP_STREAMS: i64 = 64;

pub(super) struct PruneJob {
    pub(super) retention: Retention,
    pub(super) now_ms: u64,
    /// The id of the last stream fully pruned in this pass.
    pub(super) cursor: i64,
    pub(super) report: PruneReport,
    pub(super) reply: oneshot::Sender<Result<PruneReport, StoreError>>,
}

/// One pruning step: looks at up to [`PRUNE_STEP_STREAMS`] streams after the job's cursor and
/// deletes at most [`PRUNE_STEP_ROWS`] rows, and the streams it left empty by age (their names
/// go to `removed`). Returns whether the pass is complete.
pub(super) fn prune_some(
    conn: &mut Connection,
    job: &mut PruneJob,
    removed: &mut Vec<String>,
) -> rusqlite::Result<bool> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let streams: Vec<(i64, String, u64, u64)> = tx
        .prepare_cached(&format!(
            "SELECT id, name, {NEWEST}, {FLOOR} FROM streams WHERE id > ?1 ORDER BY id LIMIT ?2"
        ))?
        .query_map(params![job.cursor, PRUNE_STEP_STREAMS], |row| {
            Ok((
                row.get(0)?,
                row.get(1)?,
                row.get::<_, i64>(2)? as u64,
                row.get::<_, i64>(3)? as u64,
            ))
        })?
        .collect::<rusqlite::Result<_>>()?;
    if streams.is_empty() {
        // Every stream is done: the direct messages no entry keeps any more go last.
        let finished = prune_direct_messages(&tx, job)?;
        tx.commit()?;
        return Ok(finished);
    }
    let mut budget = PRUNE_STEP_ROWS;
    for (id, name, last, acked) in streams {
        let finished = prune_stream(&tx, job, id, &name, last, acked, &mut budget)?;
        if !finished {
            break;
        }
        if remove_if_expired(&tx, job, id, &name, last, acked)? {
            removed.push(name);
        }
        job.cursor = id;
        if budget == 0 {
            break;
        }
    }
    tx.commit()?;
    Ok(false)
}

/// Deletes the prefix of one stream that retention no longer covers, within `budget` rows.
/// Returns whether nothing more is left to delete in it.
fn prune_stream(
    tx: &Transaction<'_>,
    job: &mut PruneJob,
    id: i64,
    name: &str,
    last: u64,
    acked: u64,
    budget: &mut u64,
) -> rusqlite::Result<bool> {
    let retention = job.retention;
    let older_than = |age: Duration| {
        (!age.is_zero()).then(|| job.now_ms.saturating_sub(age.as_millis() as u64) as i64)
    };
    let (table, cut_by_rule, age_limit) = if name.starts_with("r/") {
        let by_count = if retention.room_max_messages > 0 {
            last.saturating_sub(retention.room_max_messages)
        } else {
            0
        };
        (
            "room_messages",
            by_count,
            older_than(retention.room_max_age),
        )
    } else if name.starts_with("u/") {
        // Acknowledged entries were delivered: the conversation keeps the message itself.
        ("inbox", acked, older_than(retention.inbox_max_age))
    } else if name.starts_with("c/") {
        ("conversations", 0, older_than(retention.inbox_max_age))
    } else {
        return Ok(true);
    };
    let mut cut = cut_by_rule;
    if let Some(limit) = age_limit {
        // Timestamps follow offsets (both come from the accepting node in order), so the old
        // messages are the oldest offsets: look at the oldest `budget` rows only. An entry whose
        // message is gone counts as old.
        let oldest = if table == "room_messages" {
            format!("SELECT pos, ts FROM {table} WHERE stream = ?1 ORDER BY pos LIMIT ?2")
        } else {
            format!(
                "SELECT e.pos, d.ts FROM (SELECT pos, message FROM {table} WHERE stream = ?1
                 ORDER BY pos LIMIT ?2) e LEFT JOIN direct_messages d ON d.seq = e.message"
            )
        };
        let by_age: Option<i64> = tx
            .prepare_cached(&format!(
                "SELECT max(pos) FROM ({oldest}) WHERE ts IS NULL OR ts < ?3"
            ))?
            .query_row(params![id, *budget as i64, limit], |row| row.get(0))?;
        cut = cut.max(by_age.unwrap_or(0) as u64);
    }
    if cut == 0 || *budget == 0 {
        return Ok(cut == 0);
    }
    if table != "room_messages" {
        // The newest entry may be among those deleted: its offset must stay taken.
        tx.prepare_cached("UPDATE streams SET last_pos = ?2 WHERE id = ?1 AND last_pos < ?2")?
            .execute(params![id, last as i64])?;
    }
    let deleted = tx
        .prepare_cached(&format!(
            "DELETE FROM {table} WHERE stream = ?1 AND pos IN
             (SELECT pos FROM {table} WHERE stream = ?1 AND pos <= ?2 ORDER BY pos LIMIT ?3)"
        ))?
        .execute(params![id, cut as i64, *budget as i64])? as u64;
    *budget -= deleted;
    match table {
        "room_messages" => job.report.room_messages += deleted,
        "inbox" => job.report.inbox_entries += deleted,
        _ => job.report.direct_messages += deleted,
    }
    Ok(*budget > 0)
}

/// Removes an inbox or a conversation that retention emptied by age: its row (so its epoch and
/// offsets go; a later message starts a new epoch) and its device marks. Without this, every
/// name a direct message was ever sent to would keep rows forever. An inbox emptied because its
/// entries were acknowledged stays, and so do rooms: connected clients count on their offsets
/// going on.
fn remove_if_expired(
    tx: &Transaction<'_>,
    job: &mut PruneJob,
    id: i64,
    name: &str,
    last: u64,
    floor: u64,
) -> rusqlite::Result<bool> {
    let Some(table) = entry_table(name) else {
        return Ok(false);
    };
    let acked_through_the_end = table == "inbox" && floor >= last;
    if acked_through_the_end || job.retention.inbox_max_age.is_zero() || last == 0 {
        return Ok(false);
    }
    let holds_entries: bool = tx
        .prepare_cached(&format!(
            "SELECT EXISTS (SELECT 1 FROM {table} WHERE stream = ?1)"
        ))?
        .query_row([id], |row| row.get(0))?;
    if holds_entries {
        return Ok(false);
    }
    tx.prepare_cached("DELETE FROM inbox_marks WHERE stream = ?1")?
        .execute([id])?;
    tx.prepare_cached("DELETE FROM streams WHERE id = ?1")?
        .execute([id])?;
    job.report.empty_streams += 1;
    Ok(true)
}

/// Deletes up to [`PRUNE_STEP_ROWS`] of the oldest direct messages older than the inbox age
/// limit (their conversation and inbox entries went before them). The newest row always stays,
/// so `seq` numbers are never reused. Returns whether nothing more is left to delete.
fn prune_direct_messages(tx: &Transaction<'_>, job: &PruneJob) -> rusqlite::Result<bool> {
    let age = job.retention.inbox_max_age;
    if age.is_zero() {
        return Ok(true);
    }
    let limit = job.now_ms.saturating_sub(age.as_millis() as u64) as i64;
    let cut: Option<i64> = tx
        .prepare_cached(
            "SELECT max(seq) FROM (SELECT seq, ts FROM direct_messages
             WHERE seq < (SELECT max(seq) FROM direct_messages) ORDER BY seq LIMIT ?1)
             WHERE ts < ?2",
        )?
        .query_row(params![PRUNE_STEP_ROWS as i64, limit], |row| row.get(0))?;
    let Some(cut) = cut else {
        return Ok(true);
    };
    let deleted = tx
        .prepare_cached("DELETE FROM direct_messages WHERE seq <= ?1")?
        .execute([cut])? as u64;
    Ok(deleted < PRUNE_STEP_ROWS)
}
