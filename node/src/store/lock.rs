//! One process per directory: an advisory `flock(2)` on a lock file holding the owner's pid.
//!
//! This module decides how a directory is claimed: an exclusive, non-blocking `flock` on a lock file
//! inside it, held for as long as the [`DataDirLock`] value lives. The kernel drops the lock when the
//! process exits, however it exits (`kill -9` included), so there is no stale lock to clean up and
//! the lock file itself is never deleted (deleting it would let two processes lock two different
//! files of the same name). The holder writes its pid into the file so that a refused process can
//! name it. The daemon takes [`DataDirLock::acquire`] on its data dir before doing anything else;
//! [`crate::store::ChunkStore::open`] takes its own lock ([`STORE_LOCK_FILE`]) on the store
//! directory, so the two never conflict even when the store lives in the data dir itself.
//!
//! `flock` is advisory: it keeps out other vmswarm processes, not a user with `rm`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, flock};

use super::error::{StoreError, io_at};

/// Name of the data-dir lock file taken by [`DataDirLock::acquire`].
pub const DATA_DIR_LOCK_FILE: &str = "vmswarm.lock";
/// Name of the store's own lock file, taken by [`crate::store::ChunkStore::open`].
pub const STORE_LOCK_FILE: &str = "store.lock";

/// An exclusive claim on a directory, released when dropped (or when the process dies).
#[derive(Debug)]
pub struct DataDirLock {
    /// The open lock file; closing it releases the `flock`.
    _file: File,
    path: PathBuf,
}

impl DataDirLock {
    /// Claims `dir` (which must exist and be writable) by locking `dir/vmswarm.lock`.
    ///
    /// Fails with [`StoreError::Locked`] naming the holder's pid if another process (or another
    /// `DataDirLock` in this process) holds it, and with [`StoreError::Io`] if the directory is
    /// missing or the lock file cannot be created.
    pub fn acquire(dir: &Path) -> Result<DataDirLock, StoreError> {
        Self::acquire_file(&dir.join(DATA_DIR_LOCK_FILE))
    }

    /// Locks the lock file at `path` (created if missing) and writes our pid into it.
    pub(crate) fn acquire_file(path: &Path) -> Result<DataDirLock, StoreError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io_at("create lock file", path))?;
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(StoreError::Locked {
                    path: path.to_path_buf(),
                    holder: read_pid(&mut file),
                });
            }
            Err(e) => {
                return Err(StoreError::Io {
                    action: "lock",
                    path: path.to_path_buf(),
                    source: e.into(),
                });
            }
        }
        // We hold the lock: record who we are. Not fsynced: after a crash the lock is gone anyway.
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| writeln!(file, "{}", std::process::id()))
            .map_err(io_at("write pid into lock file", path))?;
        Ok(DataDirLock {
            _file: file,
            path: path.to_path_buf(),
        })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The pid a holder wrote into the lock file, if readable.
fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.take(64).read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}
