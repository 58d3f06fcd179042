//! The checkpointer: copies committed pages from the WAL back into the database file, on its
//! own connection and thread, so that this I/O (and its fsync) never sits in the writer's
//! commit path. Measured on a 2-core VM disk, the writer's own automatic checkpoints took
//! most of its commit time.
//!
//! Passive checkpoints never wait for the writer or the readers. When one has copied the whole
//! WAL while the writer was idle, the writer's next transaction starts the WAL over from its
//! beginning; under sustained writes that moment never comes, so past [`RESTART_FRAMES`] a
//! restarting checkpoint holds the writer back for the (short) rest of the copy.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use rusqlite::Connection;

/// Time between two checkpoints.
const INTERVAL: Duration = Duration::from_millis(200);

/// WAL frames (pages) past which a checkpoint also restarts the WAL, briefly holding the
/// writer back: under sustained writes passive checkpoints keep up but the WAL never starts
/// over, so it would grow without bound.
const RESTART_FRAMES: i64 = 16 * 1024;

/// Checkpoints every [`INTERVAL`] until `stop` disconnects (the writer is gone), then once more.
pub fn run(conn: Connection, stop: Receiver<()>) {
    // Anything but a timeout means the writer is gone.
    while let Err(RecvTimeoutError::Timeout) = stop.recv_timeout(INTERVAL) {
        if checkpoint(&conn, "PASSIVE") > RESTART_FRAMES {
            checkpoint(&conn, "RESTART");
        }
    }
    // The writer has closed: fold the WAL into the database and empty it.
    checkpoint(&conn, "TRUNCATE");
}

/// Runs one checkpoint; returns the WAL's size in frames (0 when unknown).
fn checkpoint(conn: &Connection, mode: &str) -> i64 {
    let result = conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |row| {
        row.get::<_, i64>(1)
    });
    match result {
        Ok(frames) => frames,
        Err(error) => {
            tracing::warn!(%error, "WAL checkpoint failed; will retry");
            0
        }
    }
}
