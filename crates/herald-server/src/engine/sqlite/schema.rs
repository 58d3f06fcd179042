//! The database file: connection settings, tables, and how stream names map to keys.
//!
//! Tables:
//! - `streams`: one row per stream, keyed by a small integer id (a rowid), with its name, epoch,
//!   newest offset and (inboxes) acked mark. Names are `r/ROOM`, `u/USER`, `c/A,B` (A ≤ B);
//!   names never contain a comma, so the pair name is unambiguous. Other tables refer to a
//!   stream by its id: keys are small integers, rows short, comparisons cheap.
//! - `inbox_marks (stream, device)`: the acknowledged mark of each device of an inbox.
//! - `room_messages (stream, pos)`: room history.
//! - `direct_messages (seq)`: each direct message once, appended in commit order (a rowid
//!   table, so a new row goes at the end of the B-tree, on pages it shares with its neighbours).
//! - `conversations (stream, pos)` and `inbox (stream, pos)`: the entries of each conversation
//!   and each recipient's inbox, pointing at a `direct_messages` row. A direct message lands at
//!   two unrelated places per recipient; these rows are a few bytes, so those places are few
//!   pages, and each commit writes fewer of them.
//!
//! - `staged_entries (seq)`: new conversation and inbox entries, appended in commit order until
//!   a merge moves them to `conversations` and `inbox` (see `staging.rs`).
//!
//! `room_messages`, `conversations` and `inbox` are `WITHOUT ROWID`, clustered on their primary
//! key, so a stream's rows sit together and a page of history is one range scan.
//!
//! # Invariants
//! - A room's `streams.last_pos` is the newest offset ever assigned in it, whatever pruning
//!   removed since. A conversation's or an inbox's newest offset is the highest of its
//!   `last_pos` and its entries' offsets ([`NEWEST`]): appends do not write the row (at one
//!   update per entry, that was a tenth of the writer's work); acks write it whole, and pruning
//!   raises `last_pos` to the newest entry before it deletes entries.
//! - `direct_messages.seq` is never reused: pruning never removes the newest row, so a new row
//!   always gets a number above every entry's `message`.

use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{Connection, OptionalExtension};

/// The `meta` schema value of the files written before migrations: they hold exactly the
/// tables of migration 1.
const PRE_MIGRATION_SCHEMA: &str = "3";

/// Marks the file as Herald's in the SQLite header ("HRLD").
const APPLICATION_ID: i64 = 0x4852_4c44;

/// Page cache each connection keeps between transactions, in KiB. SQLite keeps every page it
/// has read until the cache is full, so a larger cache grows with the database (a 30-minute soak
/// saw the writer's climb by 1 MiB a minute); past this, clean pages are freed as they are
/// released.
const CACHE_KIB: u32 = 8 * 1024;

/// Dirty pages the writer may hold in one transaction before it spills any to the WAL, in KiB.
/// A group commit touches a page per active stream; spilling in the middle of a batch writes
/// and re-reads pages, so for the length of a transaction the writer's cache may grow past
/// [`CACHE_KIB`] to this, and it shrinks back to [`CACHE_KIB`] once the pages are clean.
const WRITER_SPILL_KIB: u32 = 64 * 1024;

/// How long a connection waits for a lock held by another (a reader during a checkpoint).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// When a commit reaches the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// fsync at every commit: an acknowledged message survives a power loss.
    Full,
    /// fsync at checkpoints only: an acknowledged message survives a crash or `kill -9` of the
    /// process, and the last commits may be lost if the machine itself loses power.
    Normal,
}

/// The schema's history: entry `i` takes a file from version `i` to version `i + 1` (kept in
/// the header's `user_version`). Released entries are never edited; a change to the tables is
/// a new entry at the end.
const MIGRATIONS: &[&str] = &[
    // 1: the tables as released before versioned migrations.
    "
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE streams (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    epoch TEXT NOT NULL,
    last_pos INTEGER NOT NULL,
    acked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE room_messages (
    stream INTEGER NOT NULL,
    pos INTEGER NOT NULL,
    id TEXT NOT NULL,
    sender TEXT NOT NULL,
    ts INTEGER NOT NULL,
    is_binary INTEGER NOT NULL,
    content BLOB NOT NULL,
    PRIMARY KEY (stream, pos)
) WITHOUT ROWID;
CREATE TABLE direct_messages (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    sender TEXT NOT NULL,
    recipients TEXT NOT NULL,
    ts INTEGER NOT NULL,
    is_binary INTEGER NOT NULL,
    content BLOB NOT NULL
);
CREATE TABLE conversations (
    stream INTEGER NOT NULL,
    pos INTEGER NOT NULL,
    message INTEGER NOT NULL,
    PRIMARY KEY (stream, pos)
) WITHOUT ROWID;
CREATE TABLE inbox (
    stream INTEGER NOT NULL,
    pos INTEGER NOT NULL,
    message INTEGER NOT NULL,
    PRIMARY KEY (stream, pos)
) WITHOUT ROWID;
",
    // 2: each device's inbox mark (`used_ms`: its last acknowledgement, for eviction).
    "
CREATE TABLE inbox_marks (
    stream INTEGER NOT NULL,
    device TEXT NOT NULL,
    acked INTEGER NOT NULL,
    used_ms INTEGER NOT NULL,
    PRIMARY KEY (stream, device)
) WITHOUT ROWID;
",
    // 3: conversation and inbox entries staged before their merge (`staging.rs`).
    "
CREATE TABLE staged_entries (
    seq INTEGER PRIMARY KEY,
    inbox INTEGER NOT NULL,
    stream INTEGER NOT NULL,
    pos INTEGER NOT NULL,
    message INTEGER NOT NULL
);
",
];

/// The version this herald writes: the number of migrations.
pub fn current_version() -> usize {
    MIGRATIONS.len()
}

/// Settings every connection needs. Fails on a file that is not a SQLite database.
pub fn configure(conn: &Connection, synchronous: Synchronous) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // The bundled SQLite has STAT4, which marks a statement whose plan might depend on a bound
    // value (a range over an index, a LIMIT) to be re-planned when that value changes, and
    // rusqlite clears the bindings of every cached statement it takes back: so each use parsed
    // and planned its statement again (10% of the server's CPU per handshake, for the inbox
    // read at connect). These queries have one right plan; the stability guarantee keeps it.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    // The first statement that reads the file: "file is not a database" surfaces here.
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "the database refused WAL mode (it stayed in {mode})"
        )));
    }
    let level = match synchronous {
        Synchronous::Full => "FULL",
        Synchronous::Normal => "NORMAL",
    };
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {level}; PRAGMA cache_size = -{CACHE_KIB};"
    ))?;
    Ok(())
}

/// Settings of the writing connection, on top of [`configure`]: large batches do not spill,
/// and the writer never checkpoints (copying the WAL into the database, and its fsync, happens
/// on the checkpointer thread, off the commit path).
pub fn configure_writer(conn: &Connection) -> rusqlite::Result<()> {
    let page_size: u32 = conn.query_row("PRAGMA page_size", [], |row| row.get(0))?;
    let spill_pages = WRITER_SPILL_KIB * 1024 / page_size.max(512);
    conn.execute_batch(&format!(
        "PRAGMA wal_autocheckpoint = 0; PRAGMA cache_spill = {spill_pages};"
    ))
}

/// Brings the file to the current version: creates the tables on a new file, runs the
/// migrations an older file lacks, each in its own transaction with its version, and refuses
/// (untouched) a file of another application or written by a newer herald. Returns a reason
/// when it refuses or a migration fails (the failed migration is rolled back).
pub fn prepare(conn: &Connection) -> Result<(), String> {
    let application_id: i64 = conn
        .query_row("PRAGMA application_id", [], |row| row.get(0))
        .map_err(|e| e.to_string())?;
    if application_id != 0 && application_id != APPLICATION_ID {
        return Err(format!(
            "the file is a SQLite database of another application (application_id {application_id:#x})"
        ));
    }
    let has_tables: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'table')",
            [],
            |row| row.get(0),
        )
        .map_err(|e| e.to_string())?;
    if has_tables && application_id == 0 {
        return Err("the file is a SQLite database, but not a Herald store".into());
    }
    let mut version = stored_version(conn, has_tables)?;
    if version > MIGRATIONS.len() {
        return Err(format!(
            "the store has schema version {version}, written by a newer herald; this herald \
             knows versions up to {} (run the newer herald)",
            MIGRATIONS.len()
        ));
    }
    while version < MIGRATIONS.len() {
        let next = version + 1;
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE; {} PRAGMA application_id = {APPLICATION_ID};
             PRAGMA user_version = {next};
             INSERT OR REPLACE INTO meta (key, value) VALUES ('schema', 'migration {next}');
             COMMIT;",
            MIGRATIONS[version]
        ))
        .map_err(|e| {
            let _ = conn.execute_batch("ROLLBACK");
            format!("migrating the store to schema version {next} failed: {e}")
        })?;
        tracing::info!(version = next, "store schema migrated");
        version = next;
    }
    Ok(())
}

/// The file's schema version: `user_version`, or 1 for a file written before migrations
/// (its `meta` says schema "3", which holds the tables of migration 1).
fn stored_version(conn: &Connection, has_tables: bool) -> Result<usize, String> {
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(|e| e.to_string())?;
    if version > 0 || !has_tables {
        return usize::try_from(version)
            .map_err(|_| format!("the store has an invalid schema version {version}"));
    }
    let schema: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |row| {
            row.get(0)
        })
        .optional()
        .map_err(|e| e.to_string())?;
    match schema.as_deref() {
        Some(PRE_MIGRATION_SCHEMA) => {
            // Recorded at once, so the file reads as version 1 even before a later migration.
            conn.execute_batch("PRAGMA user_version = 1")
                .map_err(|e| e.to_string())?;
            Ok(1)
        }
        other => Err(format!(
            "the store has schema version {}, older than any this herald can migrate from \
             (version {PRE_MIGRATION_SCHEMA} and later); run the herald that wrote it",
            other.unwrap_or("unknown")
        )),
    }
}

/// Stream names. Each writes into `name` (cleared first), so the writer can reuse one buffer
/// and look a stream up without allocating.
pub fn room_name(name: &mut String, room: &str) {
    name.clear();
    name.push_str("r/");
    name.push_str(room);
}

/// A stream's floor (see the store contract): its mark, or its lowest device mark if lower.
/// An SQL expression over a `streams` row.
pub const FLOOR: &str = "min(streams.acked, coalesce((SELECT min(m.acked) FROM inbox_marks m
     WHERE m.stream = streams.id), streams.acked))";

/// A stream's newest offset (see the invariants above), once no entry is staged. An SQL
/// expression over a `streams` row.
pub const NEWEST: &str = "max(streams.last_pos, coalesce(
     (SELECT max(pos) FROM inbox WHERE stream = streams.id),
     (SELECT max(pos) FROM conversations WHERE stream = streams.id), 0))";

/// The table holding the entries of the inbox or conversation named `name`; none for a room.
pub fn entry_table(name: &str) -> Option<&'static str> {
    if name.starts_with("u/") {
        Some("inbox")
    } else if name.starts_with("c/") {
        Some("conversations")
    } else {
        None
    }
}

/// The offset of a stream's newest entry in `table` (its staged ones aside), 0 with none.
pub fn newest_in_table(conn: &Connection, table: &str, stream: i64) -> rusqlite::Result<u64> {
    let newest: Option<i64> = conn
        .prepare_cached(&format!("SELECT max(pos) FROM {table} WHERE stream = ?1"))?
        .query_row([stream], |row| row.get(0))?;
    Ok(newest.unwrap_or(0) as u64)
}

/// Up to `limit` users whose inbox has entries beyond their floor (with no entry staged).
pub fn unacked_inboxes(conn: &Connection, limit: usize) -> rusqlite::Result<Vec<String>> {
    let mut statement = conn.prepare(&format!(
        "SELECT name FROM streams WHERE name LIKE 'u/%' AND {NEWEST} > {FLOOR} LIMIT ?1"
    ))?;
    let names = statement.query_map([limit as i64], |row| row.get::<_, String>(0))?;
    names
        .map(|name| name.map(|name| name["u/".len()..].to_owned()))
        .collect()
}

pub fn inbox_name(name: &mut String, user: &str) {
    name.clear();
    name.push_str("u/");
    name.push_str(user);
}

/// The conversation of two users, the same whichever of them asks.
pub fn conversation_name(name: &mut String, a: &str, b: &str) {
    let (first, second) = if a <= b { (a, b) } else { (b, a) };
    name.clear();
    name.push_str("c/");
    name.push_str(first);
    name.push(',');
    name.push_str(second);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pragma(conn: &Connection, name: &str) -> i64 {
        conn.query_row(&format!("PRAGMA {name}"), [], |row| row.get(0))
            .unwrap()
    }

    #[test]
    fn caches_stay_small_between_transactions_and_the_writer_spills_only_past_a_large_batch() {
        let folder = tempfile::tempdir().unwrap();
        let conn = Connection::open(folder.path().join("herald.db")).unwrap();
        configure(&conn, Synchronous::Full).unwrap();
        configure_writer(&conn).unwrap();
        let page_size = pragma(&conn, "page_size");
        // In KiB when negative: 8 MiB.
        assert_eq!(pragma(&conn, "cache_size"), -8192);
        assert_eq!(
            pragma(&conn, "cache_spill") * page_size,
            i64::from(WRITER_SPILL_KIB) * 1024
        );
        assert_eq!(pragma(&conn, "wal_autocheckpoint"), 0);
    }
}
