//! The database file: connection settings, tables, and how stream names map to keys.
//!
//! Tables (all `WITHOUT ROWID`, clustered on their primary key so a stream's rows sit together
//! and a page of history is one range scan):
//! - `streams`: one row per stream with its epoch, newest offset and (inboxes) acked mark.
//!   Stream keys are `r/ROOM`, `u/USER`, `c/A,B` (A ≤ B). Names never contain a comma, so the
//!   pair key is unambiguous.
//! - `room_messages (room, pos)`: room history.
//! - `direct_messages (pair, pos)`: each direct message once per conversation it belongs to.
//! - `inbox (user, pos)`: a recipient's delivery queue, pointing into `direct_messages`.

use std::time::Duration;

use rusqlite::Connection;

/// Bumped when the tables change incompatibly; a file from another version is refused.
const SCHEMA_VERSION: &str = "1";

/// Marks the file as Herald's in the SQLite header ("HRLD").
const APPLICATION_ID: i64 = 0x4852_4c44;

/// Page cache per connection, in KiB. A group commit touches a page per active stream; with
/// SQLite's 2 MiB default the writer spills and re-reads pages in the middle of a batch.
const CACHE_KIB: u32 = 64 * 1024;

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

const TABLES: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS streams (
    stream TEXT PRIMARY KEY,
    epoch TEXT NOT NULL,
    last_pos INTEGER NOT NULL,
    acked INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS room_messages (
    room TEXT NOT NULL,
    pos INTEGER NOT NULL,
    id TEXT NOT NULL,
    sender TEXT NOT NULL,
    ts INTEGER NOT NULL,
    is_binary INTEGER NOT NULL,
    content BLOB NOT NULL,
    PRIMARY KEY (room, pos)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS direct_messages (
    pair TEXT NOT NULL,
    pos INTEGER NOT NULL,
    id TEXT NOT NULL,
    sender TEXT NOT NULL,
    recipients TEXT NOT NULL,
    ts INTEGER NOT NULL,
    is_binary INTEGER NOT NULL,
    content BLOB NOT NULL,
    PRIMARY KEY (pair, pos)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS inbox (
    user TEXT NOT NULL,
    pos INTEGER NOT NULL,
    pair TEXT NOT NULL,
    pair_pos INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    PRIMARY KEY (user, pos)
) WITHOUT ROWID;
";

/// Settings every connection needs. Fails on a file that is not a SQLite database.
pub fn configure(conn: &Connection, synchronous: Synchronous) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
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

/// Creates the tables on a new file; checks that an existing file is a Herald store of this
/// version. Returns a reason when it is not.
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
    conn.execute_batch(&format!(
        "BEGIN IMMEDIATE; {TABLES} PRAGMA application_id = {APPLICATION_ID}; COMMIT;"
    ))
    .map_err(|e| e.to_string())?;
    let version: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |row| {
            row.get(0)
        })
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            other => Err(other),
        })
        .map_err(|e| e.to_string())?;
    match version {
        None => conn
            .execute(
                "INSERT INTO meta (key, value) VALUES ('schema', ?1)",
                [SCHEMA_VERSION],
            )
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Some(version) if version == SCHEMA_VERSION => Ok(()),
        Some(version) => Err(format!(
            "the store has schema version {version}; this herald reads version {SCHEMA_VERSION}"
        )),
    }
}

pub fn room_key(room: &str) -> String {
    format!("r/{room}")
}

pub fn inbox_key(user: &str) -> String {
    format!("u/{user}")
}

/// The conversation of two users, the same whichever of them asks.
pub fn pair(a: &str, b: &str) -> String {
    if a <= b {
        format!("{a},{b}")
    } else {
        format!("{b},{a}")
    }
}

pub fn conversation_key(pair: &str) -> String {
    format!("c/{pair}")
}
