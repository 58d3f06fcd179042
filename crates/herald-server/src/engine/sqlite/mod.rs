//! The embedded store: one SQLite file in WAL mode, `herald.db` in the data folder.
//!
//! One writer thread ([`writer`]) owns the only writing connection and group-commits; reads run
//! on their own connections ([`read`]); a checkpointer thread ([`checkpoint`]) copies the WAL
//! back into the database so the writer never does. A `herald.lock` file beside the database, locked for
//! the writer's life, keeps a second process from writing the same folder.

pub mod backup;
mod checkpoint;
mod read;
pub mod schema;
pub mod staging;
mod writer;

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use crate::delivery::ConnId;
use crate::engine::broker::Broker;
use crate::engine::fanout::{self, AwaitingCommit};
use crate::engine::store::{
    Append, InboxRead, Offset, OnCommit, Page, PruneReport, Retention, Store, StoreError,
    StoreLimits, StreamBounds, StreamRead,
};
use read::{ReadKind, ReaderPool};
pub use schema::Synchronous;
use staging::{MergeTuning, Merger, Staged};
use writer::{Command, Writer};
pub use writer::{DEFAULT_COMMIT_SPACING, WriterStats};

/// When commits reach the disk and how they are grouped (`store.synchronous` and
/// `store.commit_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Durability {
    pub synchronous: Synchronous,
    /// Under load, the least time between the starts of two commits; zero: commit as soon as
    /// the previous commit is done (see `writer/mod.rs`).
    pub commit_spacing: Duration,
}

impl From<Synchronous> for Durability {
    fn from(synchronous: Synchronous) -> Durability {
        Durability {
            synchronous,
            commit_spacing: DEFAULT_COMMIT_SPACING,
        }
    }
}

/// The database file inside the data folder.
pub const DATABASE_FILE: &str = "herald.db";
const LOCK_FILE: &str = "herald.lock";

/// Commands the writer's queue holds before `append` waits (backpressure on publishers).
const WRITER_QUEUE: usize = 16 * 1024;

/// Reader connections: reads are short, and the machine's cores are shared with the writer.
const READERS: usize = 4;

/// Users tracked in [`UnackedInboxes`] at most. Direct messages to made-up names (or to users
/// who never read) would otherwise grow the set without bound; past it the set stops telling
/// "nothing to replay", which only costs each connect an inbox read.
const MAX_TRACKED_INBOXES: usize = 100_000;

/// The users whose inbox holds entries they have not acknowledged: loaded at open (at most
/// [`MAX_TRACKED_INBOXES`] of them), kept by the writer after each commit. A connect whose user
/// is known to have none skips the inbox read (a trip to the blocking pool and a SQLite query,
/// a fifth of a handshake's cost) since there is nothing to replay. std Mutex: held for one set
/// operation, never across an `.await`.
pub struct UnackedInboxes {
    users: Mutex<Tracked>,
    capacity: usize,
}

#[derive(Default)]
struct Tracked {
    users: HashSet<Box<str>>,
    /// Set once a user could not be added for lack of room: from then on a user missing from
    /// the set may still have entries.
    overflowed: bool,
}

impl Default for UnackedInboxes {
    fn default() -> Self {
        UnackedInboxes::with_capacity(MAX_TRACKED_INBOXES)
    }
}

impl UnackedInboxes {
    fn with_capacity(capacity: usize) -> Self {
        UnackedInboxes {
            users: Mutex::default(),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tracked> {
        self.users
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// False only when `user` certainly has no unacknowledged entry.
    pub fn may_contain(&self, user: &str) -> bool {
        let tracked = self.lock();
        tracked.overflowed || tracked.users.contains(user)
    }

    /// Records, under one lock, whether each user's inbox holds unacknowledged entries.
    pub fn set<'a>(&self, changes: impl IntoIterator<Item = (&'a str, bool)>) {
        let mut tracked = self.lock();
        for (user, unacked) in changes {
            if !unacked {
                tracked.users.remove(user);
            } else if !tracked.users.contains(user) {
                if tracked.users.len() < self.capacity {
                    tracked.users.insert(user.into());
                } else {
                    tracked.overflowed = true;
                }
            }
        }
    }
}

pub struct SqliteStore {
    commands: mpsc::Sender<Command>,
    unacked: Arc<UnackedInboxes>,
    /// The entries the writer staged, which reads of conversations and inboxes add to theirs.
    staged: Arc<Staged>,
    readers: ReaderPool,
    path: PathBuf,
    stats: Arc<WriterStats>,
    /// The writer and checkpointer threads, joined by `close`. std Mutex: taken once, never
    /// across an `.await`.
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl SqliteStore {
    /// Opens (creating if needed, migrating if older) the store in `folder`, publishing
    /// committed messages to `broker`. Every failure names the path. Must run inside a tokio
    /// runtime (the publishing task starts here).
    pub fn open(
        folder: &Path,
        durability: impl Into<Durability>,
        limits: StoreLimits,
        broker: Arc<dyn Broker>,
    ) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_tuned(folder, durability, limits, broker, MergeTuning::default())
    }

    /// [`SqliteStore::open`] with merges of staged entries sized by `merges` (tests make them
    /// small and frequent).
    pub fn open_tuned(
        folder: &Path,
        durability: impl Into<Durability>,
        limits: StoreLimits,
        broker: Arc<dyn Broker>,
        merges: MergeTuning,
    ) -> Result<SqliteStore, StoreError> {
        let Durability {
            synchronous,
            commit_spacing,
        } = durability.into();
        let open_error = |path: &Path, reason: String| StoreError::Open {
            path: path.display().to_string(),
            reason,
        };
        std::fs::create_dir_all(folder)
            .map_err(|e| open_error(folder, format!("cannot create the data folder: {e}")))?;
        let lock_path = folder.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| open_error(&lock_path, format!("cannot write in the data folder: {e}")))?;
        lock_exclusively(&lock).map_err(|reason| open_error(folder, reason))?;

        let path = folder.join(DATABASE_FILE);
        let connect = || -> Result<Connection, StoreError> {
            let conn = Connection::open(&path).map_err(|e| open_error(&path, e.to_string()))?;
            schema::configure(&conn, synchronous).map_err(|e| open_error(&path, e.to_string()))?;
            Ok(conn)
        };
        let mut writer_conn = connect()?;
        schema::configure_writer(&writer_conn).map_err(|e| open_error(&path, e.to_string()))?;
        let checkpointer_conn = connect()?;
        schema::prepare(&writer_conn).map_err(|reason| open_error(&path, reason))?;
        // Entries a previous run staged and never merged (it stopped, or crashed): no list
        // tells readers about them, so they move to their tables before the first read.
        staging::merge_all(&mut writer_conn).map_err(|e| open_error(&path, e.to_string()))?;
        let readers = (0..READERS)
            .map(|_| {
                let conn = connect()?;
                conn.execute_batch("PRAGMA query_only = ON;")
                    .map_err(|e| open_error(&path, e.to_string()))?;
                Ok(conn)
            })
            .collect::<Result<Vec<_>, StoreError>>()?;

        let unacked = Arc::new(UnackedInboxes::default());
        // One more than fits: if it is found, the set overflows as it should.
        let users = schema::unacked_inboxes(&writer_conn, MAX_TRACKED_INBOXES + 1)
            .map_err(|e| open_error(&path, e.to_string()))?;
        unacked.set(users.iter().map(|user| (user.as_str(), true)));
        let staged = Arc::new(Staged::default());
        let (commands, receiver) = mpsc::channel(WRITER_QUEUE);
        let (checkpoints, asks) = checkpoint::channel();
        let checkpointer = std::thread::Builder::new()
            .name("herald-store-checkpointer".into())
            .spawn(move || checkpoint::run(checkpointer_conn, asks))
            .map_err(|e| open_error(&path, format!("cannot start the checkpointer thread: {e}")))?;
        let writer = Writer::new(
            writer_conn,
            lock,
            fanout::publish_in_commit_order(broker),
            checkpoints,
            unacked.clone(),
            Merger::new(staged.clone(), merges, synchronous),
            limits,
        )
        .with_commit_spacing(commit_spacing);
        let stats = writer.stats();
        let thread = std::thread::Builder::new()
            .name("herald-store-writer".into())
            .spawn(move || writer.run(receiver))
            .map_err(|e| open_error(&path, format!("cannot start the writer thread: {e}")))?;
        Ok(SqliteStore {
            commands,
            unacked,
            staged,
            readers: ReaderPool::new(readers),
            path,
            stats,
            threads: Mutex::new(vec![thread, checkpointer]),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the writer's time went so far (for benchmarks).
    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }

    async fn command(&self, command: Command) -> Result<(), StoreError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| StoreError::Closed)
    }
}

fn lock_exclusively(lock: &File) -> Result<(), String> {
    match lock.try_lock() {
        Ok(()) => Ok(()),
        Err(std::fs::TryLockError::WouldBlock) => {
            Err("the data folder is in use by another herald process".into())
        }
        Err(std::fs::TryLockError::Error(e)) => Err(format!("cannot lock the data folder: {e}")),
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn append_then(&self, append: Append, except: Option<ConnId>, then: OnCommit) {
        // A closed store drops the command, and with it `then`, which reports `Closed`.
        let _ = self
            .command(Command::Append(append, AwaitingCommit { except, then }))
            .await;
    }

    async fn read_room(
        &self,
        room: &str,
        after: Offset,
        limit: usize,
    ) -> Result<StreamRead, StoreError> {
        let room = room.to_owned();
        self.readers
            .read(ReadKind::Heavy, "read room", move |tx| {
                read::read_room(tx, &room, after, limit)
            })
            .await
    }

    async fn room_bounds(&self, room: &str) -> Result<StreamBounds, StoreError> {
        let room = room.to_owned();
        self.readers
            .read(ReadKind::Light, "room bounds", move |tx| {
                read::room_bounds(tx, &room).map_err(|e| read::backend("room bounds", e))
            })
            .await
    }

    async fn room_history(
        &self,
        room: &str,
        before: Option<Offset>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let room = room.to_owned();
        self.readers
            .read(ReadKind::Heavy, "room history", move |tx| {
                read::room_history(tx, &room, before, limit)
            })
            .await
    }

    async fn conversation_history(
        &self,
        user: &str,
        with: &str,
        before: Option<Offset>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let (user, with) = (user.to_owned(), with.to_owned());
        let staged = self.staged.clone();
        self.readers
            .read(ReadKind::Heavy, "conversation history", move |tx| {
                read::conversation_history(tx, &staged, &user, &with, before, limit)
            })
            .await
    }

    fn inbox_may_hold_unacked(&self, user: &str) -> bool {
        self.unacked.may_contain(user)
    }

    async fn read_inbox(
        &self,
        user: &str,
        device: Option<&str>,
        after: Offset,
        limit: usize,
    ) -> Result<InboxRead, StoreError> {
        let user = user.to_owned();
        let device = device.map(str::to_owned);
        let staged = self.staged.clone();
        self.readers
            .read(ReadKind::Light, "read inbox", move |tx| {
                read::read_inbox(tx, &staged, &user, device.as_deref(), after, limit)
            })
            .await
    }

    async fn ack_inbox(
        &self,
        user: &str,
        device: Option<&str>,
        offset: Offset,
    ) -> Result<Offset, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.command(Command::Ack {
            user: user.to_owned(),
            device: device.map(str::to_owned),
            offset,
            reply,
        })
        .await?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    async fn prune(&self, retention: Retention, now_ms: u64) -> Result<PruneReport, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.command(Command::Prune {
            retention,
            now_ms,
            reply,
        })
        .await?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    async fn close(&self) {
        let (reply, answer) = oneshot::channel();
        if self.command(Command::Close(reply)).await.is_ok() {
            let _ = answer.await;
        }
        let threads = std::mem::take(
            &mut *self
                .threads
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        // The writer has replied, so it is at its last instruction; the checkpointer folds the
        // WAL into the database once the writer is gone, then ends.
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
        tracing::debug!(
            path = %self.path.display(),
            batches = self.stats.batches.load(Ordering::Relaxed),
            "store closed"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    use herald_protocol::Payload;
    use serde_json::value::RawValue;

    use super::{SqliteStore, Synchronous, UnackedInboxes};
    use crate::engine::memory::MemoryBroker;
    use crate::engine::store::{Append, Appended, NewMessage, Store, StoreLimits};

    /// Appends queued while the writer commits share its next commit, and that commit reaches
    /// the publishing task as one batch: one hand-off (one wake-up) per commit, never one per
    /// message, with every append still answered, in order.
    #[tokio::test]
    async fn a_commit_hands_all_its_messages_to_the_publishing_task_at_once() {
        let folder = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(
            folder.path(),
            Synchronous::Full,
            StoreLimits::default(),
            Arc::new(MemoryBroker::new()),
        )
        .unwrap();
        const MESSAGES: u64 = 500;
        let mut committing = Vec::new();
        for n in 0..MESSAGES {
            let message = NewMessage {
                id: format!("m{n}"),
                from: Arc::from("alice"),
                ts: n,
                content: Payload::Json(RawValue::from_string(n.to_string()).unwrap()),
                idempotency: None,
            };
            let append = Append::Room {
                room: Arc::from("lobby"),
                message,
            };
            committing.push((&store as &dyn Store).append(append, None).await);
        }
        for (n, committing) in committing.into_iter().enumerate() {
            let Appended::Room { position, .. } = committing.await.unwrap() else {
                panic!("a room append came back as a direct one");
            };
            assert_eq!(position.offset.0, n as u64 + 1, "answered in commit order");
        }
        let stats = store.stats();
        let batches = stats.batches.load(Ordering::Relaxed);
        assert_eq!(stats.appends.load(Ordering::Relaxed), MESSAGES);
        assert!(
            batches < MESSAGES,
            "{batches} commits: appends were not grouped"
        );
        assert_eq!(stats.handoffs.load(Ordering::Relaxed), batches);
        store.close().await;
    }

    #[test]
    fn past_its_capacity_the_unacked_set_stops_ruling_users_out() {
        let set = UnackedInboxes::with_capacity(2);
        set.set([("a", true), ("b", true)]);
        assert!(!set.may_contain("c"));
        set.set([("a", false)]);
        assert!(!set.may_contain("a"), "an ack removes a user");
        set.set([("c", true), ("d", true)]);
        assert!(set.may_contain("d"), "not tracked, so possibly unacked");
        assert!(set.may_contain("someone-else"));
        assert_eq!(set.lock().users.len(), 2, "bounded");
    }
}
