//! The checkpointer: copies committed pages from the WAL back into the database file, on its
//! own connection and thread, so that this I/O (and its fsync) never sits in the writer's
//! commit path. Measured on a 2-core VM disk, the writer's own automatic checkpoints took
//! most of its commit time.
//!
//! Passive checkpoints never wait for the writer or the readers. When one has copied the whole
//! WAL while the writer was idle, the writer's next transaction starts the WAL over from its
//! beginning; under sustained writes that moment never comes (a restarting checkpoint from
//! this thread starves behind the writer's back-to-back transactions), so the writer itself
//! restarts the WAL between two batches, about once a second (see `writer/mod.rs`).
//!
//! A restart holds the writer while it copies what is left of the WAL and fsyncs the database,
//! and an fsync costs about 15 µs per dirty page on the VM disk: restarting at a random moment,
//! up to 200 ms of commits after the last checkpoint, stalled every append for 20–70 ms once a
//! second at 20k messages/s. So the writer first asks for a restart ([`Checkpoints::ask`]); this
//! thread answers with two passive checkpoints in a row, the second copying only what was
//! committed during the first, and then says it has caught up ([`Checkpoints::caught_up`]). The
//! writer restarts at its next batch boundary, with a few milliseconds of commits left to copy.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::Duration;

use rusqlite::Connection;

/// Time between two checkpoints.
const INTERVAL: Duration = Duration::from_millis(200);

/// Passive checkpoints run back to back before a restart: each copies what was committed
/// during the one before, so the restart's own copy and fsync stay small.
const PASSES_BEFORE_RESTART: usize = 2;

/// The writer's side of the checkpointer. Dropped with the writer: the checkpointer then runs
/// a last checkpoint and stops.
pub struct Checkpoints {
    asks: Sender<()>,
    caught_up: Arc<AtomicBool>,
}

impl Checkpoints {
    /// Asks the checkpointer to copy the WAL now, ahead of a restart. False if it has stopped.
    pub fn ask(&self) -> bool {
        self.asks.send(()).is_ok()
    }

    /// True once after each asked-for catch-up: the WAL is copied nearly to its end.
    pub fn caught_up(&self) -> bool {
        self.caught_up.swap(false, Ordering::AcqRel)
    }
}

/// The checkpointer's side: what it listens to and where it says it has caught up.
pub struct Asks {
    asks: Receiver<()>,
    caught_up: Arc<AtomicBool>,
}

pub fn channel() -> (Checkpoints, Asks) {
    let (asks, asked) = std::sync::mpsc::channel();
    let caught_up = Arc::new(AtomicBool::new(false));
    (
        Checkpoints {
            asks,
            caught_up: caught_up.clone(),
        },
        Asks {
            asks: asked,
            caught_up,
        },
    )
}

/// Checkpoints every [`INTERVAL`], and at once when the writer asks, until the writer is gone;
/// then once more.
pub fn run(conn: Connection, asks: Asks) {
    loop {
        match asks.asks.recv_timeout(INTERVAL) {
            Err(RecvTimeoutError::Timeout) => checkpoint(&conn, "PASSIVE"),
            Ok(()) => {
                for _ in 0..PASSES_BEFORE_RESTART {
                    checkpoint(&conn, "PASSIVE");
                }
                asks.caught_up.store(true, Ordering::Release);
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    // The writer has closed: fold the WAL into the database and empty it.
    checkpoint(&conn, "TRUNCATE");
}

/// Runs one checkpoint of the given mode (`PASSIVE`, `RESTART`, `TRUNCATE`).
pub fn checkpoint(conn: &Connection, mode: &str) {
    let result = conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |row| {
        row.get::<_, i64>(0)
    });
    if let Err(error) = result {
        tracing::warn!(%error, mode, "WAL checkpoint failed; will retry");
    }
}
