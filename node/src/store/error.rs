//! The store's one error type, [`StoreError`], and the mapping of I/O errors onto it.
//!
//! Every variant names the path, chunk or image involved, so a message read on its own (in a log,
//! or printed by the CLI) says what failed and where. A full disk is its own variant
//! ([`StoreError::DiskFull`]) because the operator's remedy differs from any other I/O failure.

use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};

use vmswarm_protocol::chunker::ChunkerError;
use vmswarm_protocol::manifest::ManifestError;
use vmswarm_protocol::{ChunkId, ImageId};

/// How many missing chunks a [`StoreError::MissingChunks`] message lists before "and N more".
const MISSING_LISTED: usize = 8;

/// Errors from the chunk store, its lock and its import/export helpers.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process (or another handle in this process) holds the advisory lock on this lock
    /// file: a second daemon, or a command that opened the store directly, is using the directory.
    #[error(
        "{path} is held by another vmswarm process{}: only one process may use a data dir at a time",
        holder_text(*.holder)
    )]
    Locked {
        /// The lock file.
        path: PathBuf,
        /// The holder's pid, as it wrote it into the lock file (absent if unreadable).
        holder: Option<u32>,
    },
    /// A file system operation failed for a reason other than a full disk (permissions, a missing
    /// or read-only directory, an I/O error from the device, ...).
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What the store was doing, as a verb phrase ("create directory", "read chunk file").
        action: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The device holding the store (or the export target) is full, or a disk quota is exhausted.
    /// The half-written temp file has been removed; everything committed before is intact.
    #[error(
        "no space left on the device holding {path} (while trying to {action}); free some space \
         and retry: nothing was half-written and everything stored before is intact"
    )]
    DiskFull {
        /// What the store was doing.
        action: &'static str,
        /// The file being written.
        path: PathBuf,
        /// The underlying `ENOSPC`/`EDQUOT` error.
        #[source]
        source: io::Error,
    },
    /// The directory holds a store in a format this version does not understand.
    #[error("{path} holds a store of format {found:?}; this vmswarm understands {expected:?}")]
    UnsupportedFormat {
        /// The format marker file.
        path: PathBuf,
        /// Its first line.
        found: String,
        /// The format this code writes.
        expected: &'static str,
    },
    /// Bytes offered to [`crate::store::ChunkStore::put`] do not hash to the id they were offered
    /// under. Nothing was written.
    #[error("{len} chunk bytes hash to {actual}, not to {expected}; nothing was written")]
    HashMismatch {
        /// The id the caller claimed.
        expected: ChunkId,
        /// The BLAKE3 of the bytes.
        actual: ChunkId,
        /// Length of the bytes.
        len: usize,
    },
    /// Bytes offered to `put` are longer than any chunk can be.
    #[error("chunk {id} is {len} bytes, more than the largest chunk size ({max} bytes)")]
    ChunkTooLarge {
        /// The id the caller claimed.
        id: ChunkId,
        /// Length of the bytes.
        len: usize,
        /// [`vmswarm_protocol::manifest::MAX_CHUNK_SIZE`].
        max: u32,
    },
    /// A partial read asked for bytes past the end of a chunk.
    #[error(
        "reading {len} bytes at offset {offset} runs past the end of chunk {id} ({chunk_len} bytes)"
    )]
    OutOfRange {
        /// The chunk.
        id: ChunkId,
        /// Requested offset in the chunk.
        offset: u32,
        /// Requested length.
        len: usize,
        /// The chunk's length.
        chunk_len: u32,
    },
    /// A stored chunk no longer hashes to its id (bit rot, a truncated or tampered file). It was
    /// moved to the quarantine directory and dropped from the index, so it reads as absent from now
    /// on and can be fetched again.
    #[error(
        "chunk {id} is corrupt on disk (its bytes no longer hash to its id); moved to {quarantined} \
         and dropped from the store"
    )]
    CorruptChunk {
        /// The chunk.
        id: ChunkId,
        /// Where the bad file now lies.
        quarantined: PathBuf,
    },
    /// A stored manifest no longer decodes or no longer hashes to its image id. It was moved to the
    /// quarantine directory and dropped from the image list.
    #[error("manifest of image {id} is corrupt on disk ({source}); moved to {quarantined}")]
    CorruptManifest {
        /// The image.
        id: ImageId,
        /// Where the bad file now lies.
        quarantined: PathBuf,
        /// Why it was refused (boxed: keeps `StoreError` small).
        #[source]
        source: Box<ManifestError>,
    },
    /// A manifest handed to the store (to store or to export) breaks the manifest rules.
    #[error("invalid manifest for image {name:?}: {source}")]
    InvalidManifest {
        /// The manifest's name field.
        name: String,
        /// The rule it breaks (boxed: keeps `StoreError` small).
        #[source]
        source: Box<ManifestError>,
    },
    /// A manifest lists a chunk whose stored bytes (which do hash to the listed id) are not as long
    /// as the manifest's geometry says chunk `index` is: the manifest is inconsistent.
    #[error(
        "image {image}: chunk #{index} ({id}) is {actual} bytes but the manifest says {expected}"
    )]
    ChunkLengthMismatch {
        /// The image.
        image: ImageId,
        /// Chunk index in the image.
        index: u32,
        /// The chunk.
        id: ChunkId,
        /// Length from the manifest's geometry.
        expected: u32,
        /// Length of the stored chunk.
        actual: usize,
    },
    /// Importing an image failed while reading or chunking the input (nothing is half-visible:
    /// chunks stored so far are whole and verified, and no manifest was written).
    #[error("importing the image failed: {0}")]
    Import(#[source] Box<ChunkerError>),
    /// An image cannot be exported because the store lacks some of its chunks.
    #[error(
        "image {image} lacks {} of its {total} chunks: {}",
        missing.len(),
        missing_text(missing)
    )]
    MissingChunks {
        /// The image.
        image: ImageId,
        /// The image's chunk count.
        total: u32,
        /// `(index, id)` of every missing chunk, in image order.
        missing: Vec<(u32, ChunkId)>,
    },
    /// Writing the exported image to the caller's writer failed.
    #[error("writing the exported image failed at byte {offset}: {source}")]
    Output {
        /// Image offset being written.
        offset: u64,
        /// The writer's error.
        #[source]
        source: io::Error,
    },
}

impl StoreError {
    /// Whether this is a full disk or exhausted quota, in the store or in an export's output.
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::DiskFull { .. } => true,
            StoreError::Output { source, .. } => is_disk_full(source),
            _ => false,
        }
    }
}

fn holder_text(holder: Option<u32>) -> String {
    match holder {
        Some(pid) => format!(" (pid {pid})"),
        None => String::new(),
    }
}

fn missing_text(missing: &[(u32, ChunkId)]) -> String {
    let mut s = String::new();
    for (n, (index, id)) in missing.iter().take(MISSING_LISTED).enumerate() {
        if n > 0 {
            s.push_str(", ");
        }
        let _ = write!(s, "#{index} {id}");
    }
    if missing.len() > MISSING_LISTED {
        let _ = write!(s, " and {} more", missing.len() - MISSING_LISTED);
    }
    s
}

/// Whether `e` means the device is full or a quota is exhausted.
pub(crate) fn is_disk_full(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull
        || e.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error())
        || e.raw_os_error() == Some(rustix::io::Errno::DQUOT.raw_os_error())
}

/// Maps an I/O error to [`StoreError::DiskFull`] or [`StoreError::Io`].
pub(crate) fn io_error(action: &'static str, path: &Path, source: io::Error) -> StoreError {
    let path = path.to_path_buf();
    if is_disk_full(&source) {
        StoreError::DiskFull {
            action,
            path,
            source,
        }
    } else {
        StoreError::Io {
            action,
            path,
            source,
        }
    }
}

/// `.map_err` helper: `result.map_err(io_at("read chunk file", &path))`.
pub(crate) fn io_at<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |e| io_error(action, path, e)
}
