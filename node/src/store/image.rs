//! Whole images: which chunks of an image the store holds, importing an image file (`vmswarm
//! publish`) and exporting one (`vmswarm pull -o`).
//!
//! This module decides that an import commits every non-zero chunk before the manifest (an
//! interrupted import leaves whole, verified chunks and no manifest), that imports write through a
//! few threads (their `put`s share the store's group commits),
//! and that an export checks up front that every chunk is there, re-verifies each chunk as it
//! reads it, and writes zero chunks as holes.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError, mpsc};

use vmswarm_protocol::bitfield::ChunkBitmap;
use vmswarm_protocol::chunker::Chunker;
use vmswarm_protocol::manifest::Manifest;
use vmswarm_protocol::{ChunkId, ImageId};

use super::durable::sync_parent;
use super::error::{io_at, io_error};
use super::{ChunkStore, Put, StoreError};

/// Threads committing chunks during an import.
const IMPORT_WRITERS: usize = 4;
/// Chunk bytes queued between the chunker and the writers (bounds an import's memory).
const IMPORT_QUEUE_BYTES: usize = 32 << 20;
/// Suffix of the file [`ChunkStore::export_to_file`] writes before renaming it into place.
pub const PARTIAL_SUFFIX: &str = ".vmswarm-partial";

/// How much of an image the store holds. From [`ChunkStore::image_status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageStatus {
    /// Chunk indices held; zero chunks count as held (they need no storage or transfer).
    pub present: ChunkBitmap,
    /// The image's chunk count.
    pub chunks: u32,
    /// Chunks held, zero chunks included.
    pub present_chunks: u32,
    /// All-zero chunks in the image.
    pub zero_chunks: u32,
    /// The image size.
    pub image_bytes: u64,
    /// Image bytes covered by held chunks, zero chunks included.
    pub present_bytes: u64,
    /// Image bytes covered by held non-zero chunks (a chunk used twice counts twice).
    pub stored_bytes: u64,
    /// Whether every chunk is held: the image can be exported.
    pub complete: bool,
}

impl ImageStatus {
    /// Indices of the chunks not held.
    pub fn missing(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.chunks).filter(|&i| !self.present.contains(i))
    }
}

/// What [`ChunkStore::import_image`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImportStats {
    /// Chunks in the image.
    pub chunks: u32,
    /// Of those, all-zero chunks (not stored).
    pub zero_chunks: u32,
    /// Chunks written to the store.
    pub stored_chunks: u64,
    /// Non-zero chunks not written because the store already held them (from another image, or
    /// earlier in this one).
    pub deduplicated_chunks: u64,
    /// Image size.
    pub bytes: u64,
    /// Bytes in all-zero chunks.
    pub zero_bytes: u64,
    /// Bytes written to the store.
    pub stored_bytes: u64,
}

/// What [`ChunkStore::export_image`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Image size.
    pub bytes: u64,
    /// Chunks written (each re-verified).
    pub chunks_written: u32,
    /// Zero chunks left as holes.
    pub zero_chunks: u32,
    /// Bytes written (excluding holes).
    pub bytes_written: u64,
}

impl ChunkStore {
    /// Which chunks of the image `m` describes the store holds (zero chunks count as held).
    pub fn image_status(&self, m: &Manifest) -> ImageStatus {
        let count = m.chunk_count();
        let zeros = m.zero_ids();
        let mut status = ImageStatus {
            present: ChunkBitmap::new(count),
            chunks: count,
            present_chunks: 0,
            zero_chunks: 0,
            image_bytes: m.image_size,
            present_bytes: 0,
            stored_bytes: 0,
            complete: false,
        };
        for (index, id) in (0..count).zip(&m.chunks) {
            let Some(len) = m.chunk_len(index) else {
                break; // only in an invalid manifest
            };
            let is_zero = *id == zeros.get(len);
            if is_zero {
                status.zero_chunks += 1;
            }
            if is_zero || self.contains(id) {
                status.present.insert(index);
                status.present_bytes += u64::from(len);
                if !is_zero {
                    status.stored_bytes += u64::from(len);
                }
            }
        }
        status.present_chunks = status.present.count();
        status.complete = status.present.is_full();
        status
    }

    /// `(index, id)` of every non-zero chunk of `m` the store does not hold, in image order.
    pub fn missing_chunks(&self, m: &Manifest) -> Vec<(u32, ChunkId)> {
        let zeros = m.zero_ids();
        (0..m.chunk_count())
            .zip(&m.chunks)
            .filter(|&(index, id)| {
                m.chunk_len(index)
                    .is_some_and(|len| *id != zeros.get(len) && !self.contains(id))
            })
            .map(|(index, id)| (index, *id))
            .collect()
    }

    /// Imports an image: cuts `reader` into chunks of `chunk_size` (the protocol's [`Chunker`]),
    /// commits every non-zero chunk not already held, then the manifest, and returns the manifest
    /// and what was done. This is `vmswarm publish`.
    ///
    /// The name, metadata and chunk size are checked before anything is read. On an error
    /// (unreadable input, full disk, ...) no manifest is written; chunks committed so far stay (they
    /// are whole and verified, and a retry skips them).
    pub fn import_image<R: Read>(
        &self,
        reader: R,
        chunk_size: u32,
        name: String,
        parent: Option<ImageId>,
        metadata: BTreeMap<String, String>,
    ) -> Result<(Manifest, ImportStats), StoreError> {
        // Fail fast on a bad name, metadata or chunk size, before reading gigabytes.
        if let Err(source) = Manifest::new(
            0,
            chunk_size,
            Vec::new(),
            name.clone(),
            parent,
            metadata.clone(),
        ) {
            return Err(StoreError::InvalidManifest {
                name,
                source: Box::new(source),
            });
        }
        let mut chunker =
            Chunker::new(reader, chunk_size).map_err(|e| StoreError::Import(Box::new(e)))?;
        let depth = (IMPORT_QUEUE_BYTES / chunk_size as usize).max(2);
        let stored_chunks = AtomicU64::new(0);
        let stored_bytes = AtomicU64::new(0);
        let deduplicated = AtomicU64::new(0);
        let stop = AtomicBool::new(false);
        let first_error: Mutex<Option<StoreError>> = Mutex::new(None);
        let (work_tx, work_rx) = mpsc::sync_channel::<(ChunkId, Vec<u8>)>(depth);
        let work_rx = Mutex::new(work_rx);
        let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();

        let produced = std::thread::scope(|s| {
            for _ in 0..IMPORT_WRITERS {
                let free_tx = free_tx.clone();
                s.spawn(|| {
                    let free_tx = free_tx;
                    loop {
                        // Poisoning cannot leave a Receiver inconsistent; keep going.
                        let next = work_rx
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .recv();
                        let Ok((id, data)) = next else { break };
                        if stop.load(Ordering::Relaxed) {
                            continue; // drain the queue so the producer never blocks
                        }
                        // `id` was computed by the chunker from these very bytes, and zero chunks
                        // were filtered out: no need to hash again.
                        match self.put_verified(&id, &data) {
                            Ok(Put::Stored) => {
                                stored_chunks.fetch_add(1, Ordering::Relaxed);
                                stored_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                            }
                            Ok(Put::AlreadyPresent | Put::Zero) => {
                                deduplicated.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                stop.store(true, Ordering::Relaxed);
                                first_error
                                    .lock()
                                    .unwrap_or_else(PoisonError::into_inner)
                                    .get_or_insert(e);
                            }
                        }
                        let _ = free_tx.send(data);
                    }
                });
            }
            drop(free_tx);
            let result = loop {
                if stop.load(Ordering::Relaxed) {
                    break Ok(());
                }
                let view = match chunker.next_chunk() {
                    Ok(Some(view)) => view,
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(StoreError::Import(Box::new(e))),
                };
                if view.is_zero {
                    continue;
                }
                if self.contains(&view.id) {
                    deduplicated.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let mut data = free_rx.try_recv().unwrap_or_default();
                data.clear();
                data.extend_from_slice(view.data);
                if work_tx.send((view.id, data)).is_err() {
                    break Ok(()); // every writer is gone; their error is recorded
                }
            };
            drop(work_tx); // writers finish the queue and exit; the scope joins them
            result
        });
        if let Some(e) = first_error
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
        {
            return Err(e);
        }
        produced?;
        let chunk_stats = chunker.stats();
        let manifest = chunker
            .finish(name, parent, metadata)
            .map_err(|e| StoreError::Import(Box::new(e)))?;
        self.put_manifest(&manifest)?;
        let stats = ImportStats {
            chunks: chunk_stats.chunks,
            zero_chunks: chunk_stats.zero_chunks,
            stored_chunks: stored_chunks.into_inner(),
            deduplicated_chunks: deduplicated.into_inner(),
            bytes: chunk_stats.bytes,
            zero_bytes: chunk_stats.zero_bytes,
            stored_bytes: stored_bytes.into_inner(),
        };
        tracing::info!(image = %manifest.id(), ?stats, "image imported");
        Ok((manifest, stats))
    }

    /// Writes the image `m` describes to `out`, at offsets from the start of `out`.
    ///
    /// Fails with [`StoreError::MissingChunks`] (naming them) before writing anything if the store
    /// lacks any chunk. Every chunk is re-verified as it is read ([`ChunkStore::get`]); a corrupt
    /// one fails the export with [`StoreError::CorruptChunk`] (and is quarantined). Zero chunks are
    /// skipped with a seek, leaving holes, so **`out` must read as zeros where nothing is written**:
    /// a new or truncated file, not a device or a file with old contents. The last byte is always
    /// written, so the file ends up exactly `image_size` long. [`ChunkStore::export_to_file`] does
    /// all of this safely for a path.
    pub fn export_image<W: Write + Seek>(
        &self,
        m: &Manifest,
        mut out: W,
    ) -> Result<ExportStats, StoreError> {
        m.validate().map_err(|source| StoreError::InvalidManifest {
            name: m.name.clone(),
            source: Box::new(source),
        })?;
        let missing = self.missing_chunks(m);
        if !missing.is_empty() {
            return Err(StoreError::MissingChunks {
                image: m.id(),
                total: m.chunk_count(),
                missing,
            });
        }
        let zeros = m.zero_ids();
        let mut stats = ExportStats {
            bytes: m.image_size,
            ..ExportStats::default()
        };
        let mut buf = Vec::new();
        let mut buffered: Option<ChunkId> = None;
        // Where `out` is positioned, relative to its start (it starts at 0 by contract).
        let mut pos = 0u64;
        for (index, id) in (0..m.chunk_count()).zip(&m.chunks) {
            let (Some(range), Some(len)) = (m.chunk_range(index), m.chunk_len(index)) else {
                break; // unreachable for a validated manifest
            };
            if *id == zeros.get(len) {
                stats.zero_chunks += 1;
                continue;
            }
            if buffered != Some(*id) {
                if !self.get_into(id, &mut buf)? {
                    // Dropped (found corrupt or deleted) since the check above.
                    return Err(StoreError::MissingChunks {
                        image: m.id(),
                        total: m.chunk_count(),
                        missing: vec![(index, *id)],
                    });
                }
                buffered = Some(*id);
            }
            if buf.len() != len as usize {
                return Err(StoreError::ChunkLengthMismatch {
                    image: m.id(),
                    index,
                    id: *id,
                    expected: len,
                    actual: buf.len(),
                });
            }
            if pos != range.start {
                out.seek(SeekFrom::Start(range.start))
                    .map_err(|source| StoreError::Output {
                        offset: range.start,
                        source,
                    })?;
            }
            out.write_all(&buf).map_err(|source| StoreError::Output {
                offset: range.start,
                source,
            })?;
            pos = range.end;
            stats.chunks_written += 1;
            stats.bytes_written += buf.len() as u64;
        }
        if pos != m.image_size {
            // The image ends in holes: write its last byte so the file has the right length.
            let last = m.image_size - 1;
            out.seek(SeekFrom::Start(last))
                .and_then(|_| out.write_all(&[0]))
                .map_err(|source| StoreError::Output {
                    offset: last,
                    source,
                })?;
        }
        out.flush().map_err(|source| StoreError::Output {
            offset: m.image_size,
            source,
        })?;
        Ok(stats)
    }

    /// [`ChunkStore::export_image`] to the file at `path`, all or nothing: writes a sparse
    /// `path` + [`PARTIAL_SUFFIX`] from scratch, fsyncs it, then renames it over `path`. On an error
    /// the partial file is removed and `path` is untouched.
    pub fn export_to_file(&self, m: &Manifest, path: &Path) -> Result<ExportStats, StoreError> {
        let Some(file_name) = path.file_name() else {
            return Err(StoreError::Io {
                action: "export to",
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
            });
        };
        let mut partial_name = file_name.to_os_string();
        partial_name.push(PARTIAL_SUFFIX);
        let partial = path.with_file_name(partial_name);
        let file = File::create(&partial).map_err(io_at("create", &partial))?;
        let result = self
            .export_image(m, &file)
            .map_err(|e| match e {
                StoreError::Output { source, .. } => {
                    io_error("write exported image", &partial, source)
                }
                other => other,
            })
            .and_then(|stats| {
                file.sync_all()
                    .map_err(io_at("fsync exported image", &partial))?;
                fs::rename(&partial, path).map_err(io_at("rename exported image to", path))?;
                sync_parent(path)?;
                Ok(stats)
            });
        if result.is_err() {
            if let Err(e) = fs::remove_file(&partial) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %partial.display(), error = %e, "could not remove partial export");
                }
            }
        }
        result
    }
}
