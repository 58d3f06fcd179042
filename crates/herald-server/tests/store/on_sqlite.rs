//! What only the SQLite store does: WAL restarts, staged entries and their merges, the cache
//! of stream states, pruning, and the files it refuses.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use herald_protocol::Payload;
use herald_server::engine::sqlite::staging::MergeTuning;
use herald_server::engine::sqlite::{SqliteStore, Synchronous};
use herald_server::engine::store::{Append, Offset, Retention, Store, StoreLimits, StoredMessage};
use tempfile::TempDir;

use crate::support::*;

/// A SQLite store in `folder` with default limits, `synchronous = "normal"`.
/// Merges of staged entries small and frequent (the server waits for 64k entries), so that
/// reads meet them (`engine/sqlite/staging.rs`).
fn open_sqlite_merging_often(folder: &TempDir) -> Arc<SqliteStore> {
    let merges = MergeTuning {
        merge_at: 1000,
        slice: 300,
    };
    let broker = recording_broker().0;
    let store = SqliteStore::open_tuned(
        folder.path(),
        Synchronous::Normal,
        StoreLimits::default(),
        broker,
        merges,
    );
    Arc::new(store.unwrap())
}

fn open_sqlite(folder: &TempDir) -> Arc<SqliteStore> {
    Arc::new(
        SqliteStore::open(
            folder.path(),
            Synchronous::Normal,
            StoreLimits::default(),
            recording_broker().0,
        )
        .unwrap(),
    )
}

/// SQLite-specific: under appends that never pause, the writer still starts the WAL over about
/// once a second, each time after the checkpointer has caught up (so the restart, which holds
/// every append, has little left to copy), and nothing appended meanwhile is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_unbroken_appends_the_wal_starts_over_after_the_checkpointer_caught_up() {
    let folder = tempfile::tempdir().unwrap();
    let store = open_sqlite(&folder);
    let restarts = || store.stats().wal_restarts.load(Ordering::Relaxed);
    // Keep 256 appends queued until the WAL has been started over twice.
    let mut in_flight = std::collections::VecDeque::new();
    let mut appended = 0u64;
    while restarts() < 2 {
        while in_flight.len() < 256 {
            let append = Append::Room {
                room: format!("r{}", appended % 64).into(),
                message: message("p", appended, "x"),
            };
            in_flight.push_back(queue(&*store, append).await);
            appended += 1;
        }
        in_flight.pop_front().unwrap().await.unwrap();
    }
    for wait in in_flight {
        wait.await.unwrap();
    }
    assert_eq!(
        store
            .stats()
            .wal_restarts_unprepared
            .load(Ordering::Relaxed),
        0,
        "a restart did not wait for the checkpointer to catch up"
    );
    let stored: u64 = futures::future::join_all((0..64).map(|room| {
        let store = store.clone();
        async move {
            store
                .room_bounds(&format!("r{room}"))
                .await
                .unwrap()
                .top
                .offset
                .0
        }
    }))
    .await
    .into_iter()
    .sum();
    assert_eq!(stored, appended, "every append is in its room once");
    store.close().await;
}

/// SQLite-specific: conversation and inbox entries are staged and merged into their tables in
/// bulk (`engine/sqlite/staging.rs`). A reader running while the writer stages and merges
/// always sees an inbox's entries from the first with no gap, every acknowledged one included;
/// and pages read the same on either side of a merge and after a reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_messages_read_back_whole_while_their_entries_are_merged_and_after_a_reopen() {
    // Two entries each (a conversation's and an inbox's): ten merges, of four slices each.
    const MESSAGES: u64 = 5_000;
    let folder = tempfile::tempdir().unwrap();
    let store = open_sqlite_merging_often(&folder);
    let acknowledged = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = tokio::spawn({
        let (store, acknowledged, done) = (store.clone(), acknowledged.clone(), done.clone());
        async move {
            let mut reads = 0;
            while !done.load(Ordering::Relaxed) {
                let before = acknowledged.load(Ordering::Relaxed);
                let inbox = store.read_inbox("bob", None, Offset(0), 100_000).await;
                let offsets: Vec<u64> =
                    inbox.unwrap().messages.iter().map(|m| m.offset.0).collect();
                assert!(
                    offsets.len() as u64 >= before,
                    "an acknowledged entry is missing"
                );
                let expected: Vec<u64> = (1..=offsets.len() as u64).collect();
                assert!(
                    offsets == expected,
                    "a gap or a repeat in {} entries",
                    offsets.len()
                );
                // The newest page of the conversation, more than is staged at once: no gap, no
                // repeat, nothing acknowledged missing.
                let page = store
                    .conversation_history("alice", "bob", None, 2_000)
                    .await;
                let offsets: Vec<u64> = page.unwrap().messages.iter().map(|m| m.offset.0).collect();
                let newest = offsets.last().copied().unwrap_or(0);
                assert!(
                    newest >= before,
                    "an acknowledged message is missing from the history"
                );
                let first = newest + 1 - offsets.len() as u64;
                assert!(
                    offsets == (first..=newest).collect::<Vec<_>>(),
                    "a gap in the history"
                );
                reads += 1;
            }
            reads
        }
    });
    for chunk in 0..MESSAGES / 500 {
        let mut waits = Vec::new();
        for n in chunk * 500 + 1..=(chunk + 1) * 500 {
            let append = Append::Direct {
                to: vec!["bob".into()],
                recipients: vec!["bob".into()],
                message: message("alice", n, &format!("m{n}")),
            };
            waits.push(queue(&*store, append).await);
        }
        for wait in waits {
            wait.await.unwrap();
        }
        acknowledged.store((chunk + 1) * 500, Ordering::Relaxed);
    }
    done.store(true, Ordering::Relaxed);
    assert!(reader.await.unwrap() > 0);
    assert!(
        store.stats().merges.load(Ordering::Relaxed) >= 2,
        "entries were never merged"
    );

    async fn read_all(store: &SqliteStore) {
        let mut texts = Vec::new();
        let mut after = Offset(0);
        loop {
            let inbox = store.read_inbox("bob", None, after, 999).await.unwrap();
            let Some(last) = inbox.messages.last() else {
                break;
            };
            after = last.offset;
            texts.extend(inbox.messages.iter().map(|m| (m.offset.0, content_text(m))));
        }
        let expected: Vec<(u64, String)> = (1..=MESSAGES).map(|n| (n, format!("m{n}"))).collect();
        assert!(
            texts == expected,
            "the inbox read back {} entries, not in order",
            texts.len()
        );
        let mut offsets = Vec::new();
        let mut before = None;
        loop {
            let page = store
                .conversation_history("bob", "alice", before, 999)
                .await
                .unwrap();
            offsets.splice(0..0, page.messages.iter().map(|m| m.offset.0));
            before = page.messages.first().map(|m| m.offset);
            if !page.more {
                break;
            }
        }
        assert!(
            offsets == (1..=MESSAGES).collect::<Vec<_>>(),
            "the conversation pages differ"
        );
    }
    read_all(&store).await;
    store.close().await;
    drop(store);

    let store = open_sqlite_merging_often(&folder);
    read_all(&store).await;
    assert_eq!(
        direct(&*store, "alice", &["bob"], 0, "next").await,
        [MESSAGES + 1]
    );
    store.close().await;
}

/// SQLite-specific: the writer caches the state of the 10,000 streams it used last, and reads a
/// forgotten one back from the file and the staged entries (a conversation's or an inbox's
/// newest offset is its newest entry's, staged or merged). Offsets go on where they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_go_on_for_a_stream_the_writer_forgot_whose_entries_are_still_staged() {
    // 2 streams each (an inbox and a conversation): past the cache, and under one merge.
    const USERS: usize = 6_000;
    let folder = tempfile::tempdir().unwrap();
    let store = open_sqlite(&folder);
    let mut waits = Vec::new();
    for user in 0..USERS {
        let to = vec![format!("user-{user}")];
        let append = Append::Direct {
            to: to.clone(),
            recipients: to,
            message: message("sender", 1, "x"),
        };
        waits.push(queue(&*store, append).await);
    }
    for wait in waits {
        wait.await.unwrap();
    }
    assert_eq!(
        store.stats().merges.load(Ordering::Relaxed),
        0,
        "merged: the test proves nothing"
    );
    assert_eq!(direct(&*store, "sender", &["user-0"], 2, "x").await, [2]);
    let history = store
        .conversation_history("user-0", "sender", None, 10)
        .await
        .unwrap();
    let offsets: Vec<u64> = history.messages.iter().map(|m| m.offset.0).collect();
    assert_eq!(offsets, [1, 2]);
    store.close().await;
}

fn content_text(message: &StoredMessage) -> String {
    match &message.content {
        Payload::Json(raw) => serde_json::from_str(raw.get()).unwrap(),
        Payload::Binary(_) => panic!("binary content"),
    }
}

/// SQLite-specific: it watches the writer's step counter to append while a pass is running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_are_not_held_up_behind_a_long_pruning_pass() {
    let folder = tempfile::tempdir().unwrap();
    let store = open_sqlite(&folder);
    // A backlog of 30,000 messages, appended without waiting for each commit.
    let mut waits = Vec::new();
    for n in 0..30_000u64 {
        let append = Append::Room {
            room: "backlog".into(),
            message: message("p", n, "x"),
        };
        waits.push(queue(&*store, append).await);
    }
    for wait in waits {
        wait.await.unwrap();
    }
    let retention = Retention {
        room_max_messages: 1,
        ..Retention::default()
    };
    let pruning = {
        let store = store.clone();
        tokio::spawn(async move { store.prune(retention, 0).await.unwrap() })
    };
    // Append only once the pass is under way.
    while store.stats().prune_steps.load(Ordering::Relaxed) == 0 {
        tokio::task::yield_now().await;
    }
    let urgent = Append::Room {
        room: "other".into(),
        message: message("p", 0, "urgent"),
    };
    queue(&*store, urgent).await.await.unwrap();
    // Steps delete 1,000 rows each: most of the backlog is still there when the append is done.
    let bounds = store.room_bounds("backlog").await.unwrap();
    assert!(
        bounds.first.0 < 25_000,
        "the append waited for the pruning pass (oldest kept offset {})",
        bounds.first
    );
    assert_eq!(pruning.await.unwrap().room_messages, 29_999);
    store.close().await;
}

/// SQLite-specific: a direct message is one row that its conversation and inbox entries share;
/// it leaves the file once retention has removed them.
#[tokio::test]
async fn pruned_direct_messages_leave_the_file_and_new_ones_read_back_whole() {
    const DAY_MS: u64 = 24 * 3600 * 1000;
    let now = 100 * DAY_MS;
    let folder = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(
        folder.path(),
        Synchronous::Normal,
        StoreLimits::default(),
        recording_broker().0,
    )
    .unwrap();
    for age_days in [5, 4, 3] {
        direct(
            &store,
            "alice",
            &["bob", "carol"],
            now - age_days * DAY_MS,
            "old",
        )
        .await;
    }
    let retention = Retention {
        inbox_max_age: Duration::from_millis(DAY_MS),
        ..Retention::default()
    };
    let report = store.prune(retention, now).await.unwrap();
    assert_eq!((report.direct_messages, report.inbox_entries), (6, 6));
    // Every stream emptied by age went too: bob's inbox starts afresh.
    assert_eq!(direct(&store, "alice", &["bob"], now, "new").await, [1]);
    let inbox = store.read_inbox("bob", None, Offset(0), 10).await.unwrap();
    let texts: Vec<String> = inbox
        .messages
        .iter()
        .map(|m| match &m.content {
            Payload::Json(raw) => format!("{}@{}", raw.get(), m.offset),
            Payload::Binary(_) => panic!("stored as JSON"),
        })
        .collect();
    assert_eq!(texts, ["\"new\"@1"]);
    store.close().await;

    let file = rusqlite::Connection::open(folder.path().join("herald.db")).unwrap();
    let rows: i64 = file
        .query_row("SELECT count(*) FROM direct_messages", [], |row| row.get(0))
        .unwrap();
    // The newest old message stays (so its number is never reused), with the new one.
    assert_eq!(rows, 2);
}

#[tokio::test]
async fn a_second_store_on_the_same_folder_is_refused_while_the_first_is_open() {
    let folder = tempfile::tempdir().unwrap();
    let first = SqliteStore::open(
        folder.path(),
        Synchronous::Full,
        StoreLimits::default(),
        recording_broker().0,
    )
    .unwrap();
    let error = SqliteStore::open(
        folder.path(),
        Synchronous::Full,
        StoreLimits::default(),
        recording_broker().0,
    )
    .err()
    .expect("a second writer on one folder must be refused");
    let text = error.to_string();
    assert!(text.contains("in use by another herald process"), "{text}");
    assert!(
        text.contains(&folder.path().display().to_string()),
        "{text}"
    );
    first.close().await;
    SqliteStore::open(
        folder.path(),
        Synchronous::Full,
        StoreLimits::default(),
        recording_broker().0,
    )
    .expect("free again after close");
}

#[tokio::test]
async fn a_file_that_is_not_a_database_is_refused_naming_its_path() {
    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("herald.db");
    std::fs::write(
        &path,
        b"these are not the bytes of a SQLite database, not at all",
    )
    .unwrap();
    let error = SqliteStore::open(
        folder.path(),
        Synchronous::Full,
        StoreLimits::default(),
        recording_broker().0,
    )
    .err()
    .expect("must be refused");
    let text = error.to_string();
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains("not a database"), "{text}");
}

#[tokio::test]
async fn a_sqlite_file_of_another_application_is_refused() {
    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("herald.db");
    let other = rusqlite::Connection::open(&path).unwrap();
    other
        .execute_batch("CREATE TABLE accounts (id INTEGER PRIMARY KEY);")
        .unwrap();
    drop(other);
    let error = SqliteStore::open(
        folder.path(),
        Synchronous::Full,
        StoreLimits::default(),
        recording_broker().0,
    )
    .err()
    .expect("must be refused");
    let text = error.to_string();
    assert!(text.contains("not a Herald store"), "{text}");
}

#[tokio::test]
async fn a_store_of_an_older_schema_version_is_refused_and_left_untouched() {
    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("herald.db");
    let old = rusqlite::Connection::open(&path).unwrap();
    // Version 1 keyed every table by stream name.
    old.execute_batch(
        "PRAGMA application_id = 0x48524c44;
         CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
         INSERT INTO meta VALUES ('schema', '1');
         CREATE TABLE streams (stream TEXT PRIMARY KEY, epoch TEXT NOT NULL,
             last_pos INTEGER NOT NULL, acked INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;",
    )
    .unwrap();
    drop(old);
    let error = SqliteStore::open(
        folder.path(),
        Synchronous::Full,
        StoreLimits::default(),
        recording_broker().0,
    )
    .err()
    .expect("must be refused");
    let text = error.to_string();
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains("schema version 1"), "{text}");
    let old = rusqlite::Connection::open(&path).unwrap();
    let tables: i64 = old
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'table'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(tables, 2, "nothing was created in the old file");
}
