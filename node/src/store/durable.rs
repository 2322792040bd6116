//! Durable, atomic file creation: write a temp file, fsync it, rename it into place, fsync the
//! directory.
//!
//! This module decides the commit discipline every stored file follows (chunks, manifests, the
//! format marker) and guarantees that a failed write leaves no temp file behind. It does not decide
//! names or layout (the store does) and it is not a lock: callers serialise renames of one
//! destination themselves where that matters.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::error::{StoreError, io_at, io_error};

/// Suffix of every temp file; anything in the temp directory is removed when a store opens.
pub(crate) const TEMP_SUFFIX: &str = ".tmp";

/// A fully written and fsynced temp file, not yet visible under its final name. Dropping it
/// without [`TempFile::commit`] removes it.
#[derive(Debug)]
pub(crate) struct TempFile {
    path: PathBuf,
    committed: bool,
}

impl TempFile {
    /// Writes `data` to a new file in `tmp_dir` (which must be on the same file system as the final
    /// destination) and fsyncs it. `stem` only makes the name readable; uniqueness comes from the
    /// pid and `counter`. On any error the partial file is removed.
    pub(crate) fn write(
        tmp_dir: &Path,
        stem: &str,
        counter: &AtomicU64,
        data: &[u8],
    ) -> Result<TempFile, StoreError> {
        let n = counter.fetch_add(1, Ordering::Relaxed);
        let path = tmp_dir.join(format!("{stem}.{}.{n}{TEMP_SUFFIX}", std::process::id()));
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_at("create temp file", &path))?;
        // From here on, dropping `temp` removes the file, whatever fails next.
        let temp = TempFile {
            path,
            committed: false,
        };
        file.write_all(data)
            .map_err(io_at("write temp file", &temp.path))?;
        // fdatasync: the bytes and the file size are on disk before the name can point at them.
        file.sync_data()
            .map_err(io_at("fsync temp file", &temp.path))?;
        Ok(temp)
    }

    /// Renames the temp file to `dest` (replacing any file there) and fsyncs `dest`'s directory, so
    /// the new name survives a crash. Once this returns `Ok`, the file is committed.
    ///
    /// If the directory fsync fails, the file already lies at `dest` (whole and fsynced, so never
    /// corrupt) but is not known to be durable: the error is returned and the caller must not count
    /// it as committed.
    pub(crate) fn commit(mut self, dest: &Path) -> Result<(), StoreError> {
        fs::rename(&self.path, dest).map_err(io_at("rename temp file into", dest))?;
        self.committed = true;
        sync_parent(dest)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.committed {
            if let Err(e) = fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "could not remove temp file");
            }
        }
    }
}

/// Fsyncs the directory holding `path`.
pub(crate) fn sync_parent(path: &Path) -> Result<(), StoreError> {
    match path.parent() {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

/// Fsyncs a directory, making the names created, renamed or removed in it durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    let d = File::open(dir).map_err(io_at("open directory", dir))?;
    d.sync_all()
        .map_err(|e| io_error("fsync directory", dir, e))
}

/// Creates `dir` if missing; returns whether it was created (its parent then needs an fsync).
pub(crate) fn ensure_dir(dir: &Path) -> Result<bool, StoreError> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            if dir.is_dir() {
                Ok(false)
            } else {
                Err(StoreError::Io {
                    action: "use as a directory",
                    path: dir.to_path_buf(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        "a file of that name is in the way",
                    ),
                })
            }
        }
        Err(e) => Err(io_error("create directory", dir, e)),
    }
}
