//! Upgrades keep data: a database written by an earlier release opens with every message, is
//! migrated in place, and a database written by a newer herald is refused untouched.

use std::path::Path;

use std::sync::Arc;

use herald_server::engine::memory::MemoryBroker;
use herald_server::engine::sqlite::{SqliteStore, Synchronous, schema};
use herald_server::engine::store::{Offset, Store, StoreLimits};

/// The tables exactly as the last release before versioned migrations wrote them (its `meta`
/// says schema "3"), with a room message, a direct message from alice to bob (inbox and both
/// conversation entries) and bob's mark.
const RELEASED_SCHEMA_3: &str = "
PRAGMA application_id = 1213353028;
BEGIN;
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS streams (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    epoch TEXT NOT NULL,
    last_pos INTEGER NOT NULL,
    acked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS room_messages (
    stream INTEGER NOT NULL,
    pos INTEGER NOT NULL,
    id TEXT NOT NULL,
    sender TEXT NOT NULL,
    ts INTEGER NOT NULL,
    is_binary INTEGER NOT NULL,
    content BLOB NOT NULL,
    PRIMARY KEY (stream, pos)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS direct_messages (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    sender TEXT NOT NULL,
    recipients TEXT NOT NULL,
    ts INTEGER NOT NULL,
    is_binary INTEGER NOT NULL,
    content BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS conversations (
    stream INTEGER NOT NULL,
    pos INTEGER NOT NULL,
    message INTEGER NOT NULL,
    PRIMARY KEY (stream, pos)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS inbox (
    stream INTEGER NOT NULL,
    pos INTEGER NOT NULL,
    message INTEGER NOT NULL,
    PRIMARY KEY (stream, pos)
) WITHOUT ROWID;
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', '3');
INSERT INTO streams (id, name, epoch, last_pos, acked) VALUES
    (1, 'r/lobby', '00000000000000aa', 2, 0),
    (2, 'c/alice,bob', '00000000000000bb', 2, 0),
    (3, 'u/bob', '00000000000000cc', 2, 1);
INSERT INTO room_messages VALUES
    (1, 1, 'm1', 'alice', 1000, 0, CAST('\"hello\"' AS BLOB)),
    (1, 2, 'm2', 'bob', 1001, 0, CAST('\"hi\"' AS BLOB));
INSERT INTO direct_messages VALUES
    (1, 'd1', 'alice', '[\"bob\"]', 1002, 0, CAST('\"one\"' AS BLOB)),
    (2, 'd2', 'alice', '[\"bob\"]', 1003, 1, X'0102');
INSERT INTO conversations VALUES (2, 1, 1), (2, 2, 2);
INSERT INTO inbox VALUES (3, 1, 1), (3, 2, 2);
COMMIT;
";

fn write_release_3(folder: &Path) {
    let conn = rusqlite::Connection::open(folder.join("herald.db")).unwrap();
    conn.execute_batch(RELEASED_SCHEMA_3).unwrap();
}

fn user_version(folder: &Path) -> i64 {
    let conn = rusqlite::Connection::open(folder.join("herald.db")).unwrap();
    conn.query_row("PRAGMA user_version", [], |row| row.get(0))
        .unwrap()
}

#[tokio::test]
async fn a_store_written_before_migrations_opens_with_every_message_and_keeps_counting() {
    let folder = tempfile::tempdir().unwrap();
    write_release_3(folder.path());

    let store = SqliteStore::open(
        folder.path(),
        Synchronous::Normal,
        StoreLimits::default(),
        Arc::new(MemoryBroker::new()),
    )
    .unwrap();
    let room = store.read_room("lobby", Offset(0), 10).await.unwrap();
    assert_eq!(room.bounds.top.offset, Offset(2));
    assert_eq!(room.bounds.top.epoch.0, "00000000000000aa");
    let ids: Vec<_> = room.messages.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["m1", "m2"]);

    let inbox = store.read_inbox("bob", None, Offset(0), 10).await.unwrap();
    assert_eq!(inbox.acked, Offset(1));
    let pending: Vec<_> = inbox.messages.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(pending, ["d2"], "only what bob had not acknowledged");

    let conversation = store
        .conversation_history("bob", "alice", None, 10)
        .await
        .unwrap();
    let ids: Vec<_> = conversation
        .messages
        .iter()
        .map(|m| m.id.as_str())
        .collect();
    assert_eq!(ids, ["d1", "d2"]);
    // A device mark lives in a table of migration 2.
    let mark = store.ack_inbox("bob", Some("phone"), Offset(2)).await;
    assert_eq!(mark.unwrap(), Offset(2));
    store.close().await;

    assert_eq!(
        user_version(folder.path()),
        schema::current_version() as i64
    );
    // Migrated once: it opens again as it is, marks and all.
    let store = SqliteStore::open(
        folder.path(),
        Synchronous::Normal,
        StoreLimits::default(),
        Arc::new(MemoryBroker::new()),
    )
    .unwrap();
    let inbox = store.read_inbox("bob", None, Offset(0), 10).await.unwrap();
    assert_eq!(inbox.acked, Offset(2));
    assert!(inbox.messages.is_empty());
    let phone = store.read_inbox("bob", Some("phone"), Offset(0), 10).await;
    assert!(phone.unwrap().device_has_mark);
    store.close().await;
}

#[tokio::test]
async fn a_store_written_by_a_newer_herald_is_refused_and_left_untouched() {
    let folder = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(
        folder.path(),
        Synchronous::Normal,
        StoreLimits::default(),
        Arc::new(MemoryBroker::new()),
    )
    .unwrap();
    store.close().await;
    drop(store);
    let newer = schema::current_version() as i64 + 1;
    let conn = rusqlite::Connection::open(folder.path().join("herald.db")).unwrap();
    conn.execute_batch(&format!(
        "PRAGMA user_version = {newer}; CREATE TABLE from_the_future (x INTEGER);"
    ))
    .unwrap();
    drop(conn);

    let error = SqliteStore::open(
        folder.path(),
        Synchronous::Normal,
        StoreLimits::default(),
        Arc::new(MemoryBroker::new()),
    )
    .err()
    .expect("a newer schema must be refused");
    let text = error.to_string();
    assert!(text.contains(&format!("schema version {newer}")), "{text}");
    assert!(text.contains("newer herald"), "{text}");
    assert_eq!(user_version(folder.path()), newer, "the file is untouched");
}
