//! The checkpointer: copies committed pages from the WAL back into the database file, on its
//! own connection and thread, so that this I/O (and its fsync) never sits in the writer's
//! commit path. Measured on a 2-core VM disk, the writer's own automatic checkpoints took
//! most of its commit time.
//!
//! Passive checkpoints never wait for the writer or the readers. When one has copied the whole
//! WAL while the writer was idle, the writer's next transaction starts the WAL over from its
//! beginning; under sustained writes that moment never comes (a restarting checkpoint from
//! this thread starves behind the writer's back-to-back transactions), so the writer itself
//! restarts the WAL between two batches, about once a second (see `writer.rs`): by then this
//! thread has copied nearly everything, so that costs the writer little more than an fsync.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use rusqlite::Connection;

/// Time between two checkpoints.
const INTERVAL: Duration = Duration::from_millis(200);

/// Checkpoints every [`INTERVAL`] until `stop` disconnects (the writer is gone), then once more.
pub fn run(conn: Connection, stop: Receiver<()>) {
    // Anything but a timeout means the writer is gone.
    while let Err(RecvTimeoutError::Timeout) = stop.recv_timeout(INTERVAL) {
        checkpoint(&conn, "PASSIVE");
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
