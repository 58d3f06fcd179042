//! `herald backup`: a consistent copy of the database while the server runs.
//!
//! Copying `herald.db` with `cp` while the server writes can catch a page half-written or miss
//! what still sits in the write-ahead log. SQLite's online backup API copies the database as
//! one read transaction sees it (WAL included), and in WAL mode that read does not block the
//! server's writer. The copy is written next to the destination and renamed into place, so a
//! failed backup never leaves a truncated file under the final name.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};

use super::DATABASE_FILE;

/// How long a step waits before retrying when the database is momentarily locked.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Why a backup failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("no database at {0} (is store.path the server's data folder?)")]
    NoDatabase(PathBuf),
    #[error("{destination} exists already; choose a new file name")]
    DestinationExists { destination: PathBuf },
    #[error("cannot back up {source_path} to {destination}: {reason}")]
    Copy {
        source_path: PathBuf,
        destination: PathBuf,
        reason: String,
    },
}

/// What a finished backup copied.
#[derive(Debug, Clone, Copy)]
pub struct BackupReport {
    /// Database pages copied.
    pub pages: u64,
    /// Size of the copy in bytes.
    pub bytes: u64,
}

/// Copies the database in the data folder `folder` to `destination`, a file that must not
/// exist yet.
pub fn backup(folder: &Path, destination: &Path) -> Result<BackupReport, BackupError> {
    let source_path = folder.join(DATABASE_FILE);
    if !source_path.is_file() {
        return Err(BackupError::NoDatabase(source_path));
    }
    if destination.exists() {
        return Err(BackupError::DestinationExists {
            destination: destination.to_owned(),
        });
    }
    let failed = |reason: String| BackupError::Copy {
        source_path: source_path.clone(),
        destination: destination.to_owned(),
        reason,
    };
    let mut partial = destination.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let copy = || -> rusqlite::Result<i64> {
        let source = Connection::open_with_flags(
            &source_path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        let mut target = Connection::open(&partial)?;
        {
            let backup = Backup::new(&source, &mut target)?;
            // All pages in one step: one read transaction, so the copy is one consistent
            // state even while the server commits (a copy in several steps restarts whenever
            // another connection writes between them).
            loop {
                match backup.step(-1)? {
                    StepResult::Done => break,
                    // Busy or locked: retry after a pause (`More` cannot follow a step of
                    // every page).
                    _ => std::thread::sleep(RETRY_PAUSE),
                }
            }
        }
        // A standalone file: fold any WAL the copy has into it.
        target.pragma_update(None, "journal_mode", "DELETE")?;
        target.query_row("PRAGMA page_count", [], |row| row.get::<_, i64>(0))
    };
    let pages = match copy() {
        Ok(pages) => pages.unsigned_abs(),
        Err(error) => {
            let _ = std::fs::remove_file(&partial);
            return Err(failed(error.to_string()));
        }
    };
    std::fs::rename(&partial, destination).map_err(|e| failed(e.to_string()))?;
    let bytes = std::fs::metadata(destination)
        .map(|m| m.len())
        .unwrap_or_default();
    Ok(BackupReport { pages, bytes })
}
