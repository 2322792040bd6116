//! The durable chunk store: content-addressed chunks and image manifests on local disk.
//!
//! # What this module decides
//! - **Layout and commit discipline.** Chunks are appended to *pack files* (`packs/`, format in
//!   [`pack`]) and committed by *group commit*: several verified chunks are written, one
//!   `fdatasync` covers them all, and only then do they become visible together (in the index,
//!   returned by [`ChunkStore::contains`] and [`ChunkStore::get`]). [`ChunkStore::put`] commits one
//!   chunk; [`ChunkStore::put_many`] a batch; concurrent callers share fsyncs either way. Manifests
//!   (rare, small) keep one file each, committed by *temp file + fsync + rename + directory fsync*.
//! - **What the store knows on restart.** [`ChunkStore::open`] reads the pack headers (64 bytes
//!   per chunk, never the bytes of a chunk a commit record vouches for) into an in-memory
//!   [`DashMap`] from chunk id to location, so `contains` is a sharded hash lookup and the store is
//!   `Send + Sync`. Only the records after a pack's last commit record (the groups in flight at a
//!   crash) are re-hashed. Bytes of a pack that hold no valid record are skipped, not the rest of
//!   the pack: the scan resumes at the next valid header and re-hashes every chunk from there
//!   ([`pack`]); the skipped ranges are in [`OpenSummary::skipped`] and in every
//!   [`ChunkStore::verify`] report, which is not clean while a pack holds damage.
//! - **Zero chunks are never stored.** `put` of an all-zero chunk is a no-op answered with
//!   [`Put::Zero`]; callers learn zero chunks from the manifest ([`Manifest::zero_map`]), and
//!   [`ChunkStore::image_status`] counts them as present.
//! - **When bytes are hashed.** Every chunk is hashed once on the way in: [`ChunkStore::put`]
//!   hashes it, or the caller does through [`Verified::new`] and hands the proof to
//!   [`ChunkStore::put_many`] (the node checks a received chunk once, to judge the peer, and the
//!   store trusts that check). [`ChunkStore::get`] re-hashes every chunk it reads: BLAKE3 runs at
//!   about 3.8 GB/s here (66 µs per 256 KiB chunk), nothing next to a read from disk. A chunk that no
//!   longer matches its id is copied to `quarantine/`, killed by a tombstone record and dropped from
//!   the index, so it reads as absent and can be fetched again. [`ChunkStore::export_image`] always
//!   goes through `get`, so an export is verified end to end.
//! - **No unverified byte leaves through `read_at` either.** [`ChunkStore::read_at`] (partial reads
//!   for the NBD server) checks a chunk on its *first* read since [`ChunkStore::open`]: it reads the
//!   whole chunk, hashes it against its id, and remembers the chunk as checked in memory (a set of
//!   ids, about 60 bytes per chunk held). Later partial reads of that chunk are plain `pread`s.
//!   Chunks committed by this process count as checked (their bytes were hashed on the way in).
//!   Why the first read and not every read: checking a 4 KiB read of a 256 KiB chunk would mean
//!   reading and hashing the whole chunk each time (64x the bytes). Why not never: bytes at rest
//!   while the node was stopped (bit rot, a failing disk, a careless operator) are exactly what
//!   nobody has checked; one check per chunk per start costs one whole-chunk read, whose pages the
//!   partial reads that follow then find in the page cache. Rot that appears while the node runs,
//!   after a chunk's first read, is caught by [`ChunkStore::verify`] (a scrub) and by every `get`
//!   (peers are always served through `get`). A chunk that fails is quarantined as in `get`, and
//!   `read_at` reports it not held, so the caller fetches a verified copy.
//! - **Who hears of a dropped chunk.** Every chunk dropped from the index after open (quarantined,
//!   vanished from its pack, removed) is passed to the hook set with [`ChunkStore::on_dropped`], so
//!   the node can stop advertising it and fetch it again.
//! - **One process per store**: `open` holds an exclusive `flock` on `store.lock` (the
//!   [`DataDirLock`] mechanism) for the store's lifetime, so two processes never append to the same
//!   pack or race a quarantine.
//!
//! It leaves to others: which chunks to fetch and from whom (the protocol crate's scheduler), when to
//! run `verify`, garbage collection of chunks no image needs any more (a later addition: tombstone
//! them with [`ChunkStore::remove`], then compact packs whose live share fell low), and the async
//! boundary (the node calls this synchronous API from the blocking pool).
//!
//! # Using it
//! ```
//! use std::collections::BTreeMap;
//! use vmswarm_node::store::{ChunkStore, DataDirLock, Put, Verified};
//! use vmswarm_protocol::ChunkId;
//! use vmswarm_protocol::manifest::MIN_CHUNK_SIZE;
//!
//! let data_dir = tempfile::tempdir()?;
//! // The daemon claims its data dir first; the store (say in DIR/store) has its own lock.
//! let _lock = DataDirLock::acquire(data_dir.path())?;
//! let store = ChunkStore::open(&data_dir.path().join("store"))?;
//!
//! let bytes = b"some chunk bytes".to_vec();
//! let id = ChunkId::of(&bytes);
//! assert_eq!(store.put(&id, &bytes)?, Put::Stored);
//! assert_eq!(store.get(&id)?, Some(bytes));
//!
//! // A batch: hashed once by `Verified::new`, written with one fdatasync.
//! let (a, b) = (vec![1u8; 1000], vec![2u8; 1000]);
//! let batch = [Verified::new(ChunkId::of(&a), &a)?, Verified::new(ChunkId::of(&b), &b)?];
//! assert_eq!(store.put_many(&batch)?, vec![Put::Stored, Put::Stored]);
//!
//! // Publish: chunk an image, store its chunks and manifest; pull -o: export it.
//! let image = vec![7u8; 100_000];
//! let (manifest, _stats) =
//!     store.import_image(&image[..], MIN_CHUNK_SIZE, "demo".into(), None, BTreeMap::new())?;
//! assert!(store.image_status(&manifest).complete);
//! let mut out = std::io::Cursor::new(Vec::new());
//! store.export_image(&manifest, &mut out)?;
//! assert_eq!(out.into_inner(), image);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Why append-only packs rather than one file per chunk
//! The first version stored one file per chunk (temp file + fsync + rename + directory fsync).
//! Profiling a 1 GiB pull (BENCHMARKS.md, "Node pull throughput") put 61% of the puller's CPU in
//! that `put`: creating an inode per chunk (ext4's inode allocator alone took 10–11% of the
//! puller), two fsyncs per 256 KiB chunk (8%), and the page-cache copy, which any design pays.
//! Packs remove the first two costs:
//! - **No file per chunk.** A chunk is two `pwrite`s at the end of an open file; no inode, no
//!   directory entry, no rename. Reads are `pread`s on handles the store keeps open.
//! - **Group commit.** One `fdatasync` per batch instead of two fsyncs per chunk. A `put` still
//!   returns only when its chunk is durable; visibility waits for the fsync. On this project's VM
//!   disk (`node/tests/store_bench.rs`, release build) single 256 KiB `put`s commit about
//!   66 MiB/s from one thread (one fsync each), 340 MiB/s from 4 threads and 940–1240 MiB/s from
//!   16 (they share fsyncs); an import runs at 510–840 MiB/s. One file per chunk managed 31, 255–275
//!   and 385–405 MiB/s.
//! - **Crash safety stays simple.** Packs are append-only and a process never appends to a pack an
//!   earlier process wrote, so a crash can only leave a torn tail in the pack it was writing.
//!   Recovery checks headers, re-hashes what no commit record covers, and ignores the rest; nothing
//!   is rewritten in place.
//! - **Restart cost.** One 64-byte `pread` per chunk (60,000 for a 15 GiB image) instead of a
//!   `readdir` + `stat` per chunk: 52 ms for 60,000 chunks with the headers in a warm page cache
//!   (`node/tests/store_bench.rs`). From a cold cache each header costs a disk read.
//! - **The price.** Reclaiming a dead chunk's space needs compaction (rewriting a pack's live
//!   records into a new pack) instead of an `unlink`. The store never drops chunks yet except by
//!   quarantine, so only quarantined bytes stay dead for now. A pack is closed at 1 GiB, so a later
//!   compaction works one pack at a time.
//!
//! # On-disk layout
//! ```text
//! DIR/store.lock           flock held by the process that has the store open (holds its pid)
//! DIR/FORMAT               "vmswarm-chunk-store 2"
//! DIR/packs/00000001.pack  append-only records: chunks, tombstones, commit records (see `pack`)
//! DIR/manifests/<image id> canonical manifest encoding
//! DIR/tmp/                 temp files being written; emptied on open
//! DIR/quarantine/          copies of chunks and manifests that failed verification
//! ```
//!
//! # Crash safety, stated
//! A `put` or `put_many` that returned `Ok` survives `kill -9` and power loss (the fdatasync
//! covering its records happened before it returned; the pack's creation was fsynced in its
//! directory). A `put` interrupted at any point leaves either nothing visible or the whole verified
//! chunk visible after the next `open`: a record is indexed on open only if its header is intact
//! and either a commit record vouches for it or its bytes hash to its id. A full disk fails the
//! `put` with [`StoreError::DiskFull`], truncates the pack back to where that batch began and
//! changes nothing else.

mod durable;
mod error;
mod image;
mod lock;
mod pack;
#[cfg(test)]
mod tests;

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use dashmap::{DashMap, DashSet};
use vmswarm_protocol::chunker::is_all_zero;
use vmswarm_protocol::manifest::{MAX_CHUNK_SIZE, MAX_MANIFEST_BYTES, Manifest};
use vmswarm_protocol::{ChunkId, ImageId};

use durable::{TEMP_SUFFIX, TempFile, ensure_dir, sync_dir};
pub use error::StoreError;
use error::{io_at, io_error};
pub use image::{ExportStats, ImageStatus, ImportStats, PARTIAL_SUFFIX};
pub use lock::{DATA_DIR_LOCK_FILE, DataDirLock, STORE_LOCK_FILE};
use pack::{Loc, PackSet, Record};

/// The store format this code writes and reads, recorded in `DIR/FORMAT`.
pub const FORMAT: &str = "vmswarm-chunk-store 2";
const FORMAT_FILE: &str = "FORMAT";
const PACKS_DIR: &str = "packs";
const MANIFESTS_DIR: &str = "manifests";
const TMP_DIR: &str = "tmp";
const QUARANTINE_DIR: &str = "quarantine";
/// Number of mutexes serialising, per id, "commit and index" against "check, tombstone, unindex".
const STRIPES: usize = 64;

/// What [`ChunkStore::put`] did with a chunk whose bytes matched its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// The chunk was written and is now committed.
    Stored,
    /// The store already held the chunk; nothing was written.
    AlreadyPresent,
    /// The chunk is all zeros: such chunks are never stored (manifests say which chunks are zero),
    /// so nothing was written and [`ChunkStore::contains`] stays false for it.
    Zero,
}

/// Counters of a store, cheap to read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Chunks held.
    pub chunks: u64,
    /// Bytes of chunk data held.
    pub bytes: u64,
    /// Manifests held.
    pub images: u64,
    /// Chunk reads since open (by `get`, `read_at`, `verify` and exports).
    pub chunk_reads: u64,
    /// Bytes of chunks read since open.
    pub read_bytes: u64,
}

/// What [`ChunkStore::open`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenSummary {
    /// Chunks found (and indexed).
    pub chunks: u64,
    /// Their total size.
    pub bytes: u64,
    /// Manifests found.
    pub images: u64,
    /// Temp files left by an interrupted write, removed.
    pub stale_temp_files: u64,
    /// Pack files found.
    pub packs: u64,
    /// Chunk records re-hashed because no commit record covered them (written just before a
    /// crash).
    pub rehashed_chunks: u64,
    /// Bytes of packs that hold no valid record (a torn tail after a crash, or damage): never
    /// indexed, left in place. The sum of the lengths in `skipped`.
    pub damaged_bytes: u64,
    /// Where those bytes are, pack by pack in file order (see [`SkippedRange`]).
    pub skipped: Vec<SkippedRange>,
    /// Entries that are not ours (unexpected names), left alone and logged.
    pub ignored_entries: u64,
}

/// Bytes of a pack that [`ChunkStore::open`] could not read as records and skipped (the scan
/// resumed at the next valid record header after them, see [`pack`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedRange {
    /// The pack file.
    pub pack: PathBuf,
    /// Offset of the first skipped byte.
    pub offset: u64,
    /// Number of bytes skipped.
    pub len: u64,
    /// What the range looks like.
    pub kind: SkipKind,
}

/// Whether a [`SkippedRange`] is what a crash leaves or damage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipKind {
    /// The range runs to the end of its pack: a torn tail, normal after a crash (damage to the
    /// last records of a pack looks the same).
    TornTail,
    /// Valid records follow the range: bytes were damaged after they were written (records in
    /// the range, and any chunk they held, are lost from this store).
    Damaged,
}

impl fmt::Display for SkipKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SkipKind::TornTail => "torn tail",
            SkipKind::Damaged => "damaged",
        })
    }
}

/// What [`ChunkStore::verify`] checked and found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Chunks re-hashed.
    pub chunks_checked: u64,
    /// Bytes re-hashed.
    pub bytes_checked: u64,
    /// Chunks whose bytes no longer match their id: moved to the quarantine dir, dropped from the
    /// index.
    pub corrupt_chunks: Vec<ChunkId>,
    /// Chunks in the index whose bytes are no longer in their pack (it was truncated behind the
    /// store's back): dropped from the index.
    pub vanished_chunks: Vec<ChunkId>,
    /// Manifests decoded and checked against their id.
    pub manifests_checked: u64,
    /// Manifests that no longer decode or match their id: quarantined, dropped.
    pub corrupt_manifests: Vec<ImageId>,
    /// Where bad files were moved.
    pub quarantine_dir: PathBuf,
    /// Ranges of packs that [`ChunkStore::open`] skipped because they held no valid record
    /// ([`OpenSummary::skipped`]); `verify` does not rescan packs.
    pub skipped_at_open: Vec<SkippedRange>,
}

impl VerifyReport {
    /// Whether nothing bad was found: no corrupt or vanished chunk, no corrupt manifest, and no
    /// pack damage skipped at open. A torn tail ([`SkipKind::TornTail`]) is listed in
    /// `skipped_at_open` but does not count: every crash leaves one.
    pub fn is_clean(&self) -> bool {
        self.corrupt_chunks.is_empty()
            && self.vanished_chunks.is_empty()
            && self.corrupt_manifests.is_empty()
            && self.damaged_ranges() == 0
    }

    /// Number of [`SkipKind::Damaged`] ranges in `skipped_at_open`.
    pub fn damaged_ranges(&self) -> usize {
        self.skipped_at_open
            .iter()
            .filter(|r| r.kind == SkipKind::Damaged)
            .count()
    }
}

/// A callback told of each chunk dropped from the index (see [`ChunkStore::on_dropped`]).
pub type DroppedHook = Box<dyn Fn(&ChunkId) + Send + Sync>;

/// Identity of an open file (device and inode), to tell "the file I read" from "a file put there
/// since".
type FileIdent = (u64, u64);

/// Outcome of moving a file (or a chunk record) to quarantine.
enum Quarantine {
    /// Moved there.
    Moved(PathBuf),
    /// The file is gone already.
    Vanished,
    /// A different file or record (a fresh commit) now has the name; it was left alone.
    Replaced,
}

/// Chunk bytes checked against their id: not longer than the largest chunk, hashing to the id.
/// The only way to make one is [`Verified::new`], so [`ChunkStore::put_many`] can trust it without
/// hashing again.
#[derive(Debug, Clone, Copy)]
pub struct Verified<'a> {
    id: ChunkId,
    data: &'a [u8],
}

impl<'a> Verified<'a> {
    /// Checks `data` against `id`: [`StoreError::ChunkTooLarge`] or [`StoreError::HashMismatch`]
    /// if it does not pass.
    pub fn new(id: ChunkId, data: &'a [u8]) -> Result<Verified<'a>, StoreError> {
        if data.len() > MAX_CHUNK_SIZE as usize {
            return Err(StoreError::ChunkTooLarge {
                id,
                len: data.len(),
                max: MAX_CHUNK_SIZE,
            });
        }
        let actual = ChunkId::of(data);
        if actual != id {
            return Err(StoreError::HashMismatch {
                expected: id,
                actual,
                len: data.len(),
            });
        }
        Ok(Verified { id, data })
    }

    /// For bytes whose id was computed from these very bytes by the caller (the import's chunker).
    fn trusted(id: ChunkId, data: &'a [u8]) -> Verified<'a> {
        Verified { id, data }
    }

    /// The chunk's id.
    pub fn id(&self) -> &ChunkId {
        &self.id
    }

    /// The chunk's bytes.
    pub fn data(&self) -> &'a [u8] {
        self.data
    }
}

/// Where a chunk's bytes lie on disk, for diagnostics and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkLocation {
    /// The pack file.
    pub path: PathBuf,
    /// Offset of the chunk's first byte in it.
    pub offset: u64,
    /// The chunk's length.
    pub len: u32,
}

/// The chunk store. See the module docs. `Send + Sync`: share it in an `Arc`.
pub struct ChunkStore {
    root: PathBuf,
    manifests_dir: PathBuf,
    tmp_dir: PathBuf,
    quarantine_dir: PathBuf,
    /// Committed chunks and where they lie.
    index: DashMap<ChunkId, Loc>,
    /// The pack files.
    packs: PackSet,
    /// Committed manifests.
    images: DashSet<ImageId>,
    /// Sum of the lengths in `index`.
    bytes: AtomicU64,
    /// Makes temp and quarantine names unique within this process.
    counter: AtomicU64,
    /// Serialise, per id (by its first byte), a commit's index insert against a quarantine's
    /// check + tombstone + index removal (and manifest renames likewise).
    stripes: Vec<Mutex<()>>,
    chunk_reads: AtomicU64,
    read_bytes: AtomicU64,
    /// Chunks hashed against their id since open (committed by this process, or read whole and
    /// checked): [`ChunkStore::read_at`] serves their bytes without hashing again.
    checked: DashSet<ChunkId>,
    /// Told of every chunk dropped from the index after open (see [`ChunkStore::on_dropped`]).
    dropped_hook: OnceLock<DroppedHook>,
    opened: OpenSummary,
    /// Held for the store's lifetime.
    _lock: DataDirLock,
}

impl fmt::Debug for ChunkStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkStore")
            .field("root", &self.root)
            .field("chunks", &self.index.len())
            .field("images", &self.images.len())
            .finish_non_exhaustive()
    }
}

impl ChunkStore {
    /// Opens the store in `dir`, creating `dir` and the layout if missing.
    ///
    /// Takes the store lock ([`StoreError::Locked`] if another process has the store open), checks
    /// the format marker, removes temp files left by an interrupted write, and builds the index from
    /// the pack headers (see the module docs; only records no commit record covers are re-hashed).
    /// A directory that cannot be created, listed or written fails with a [`StoreError::Io`]
    /// naming it.
    pub fn open(dir: &Path) -> Result<ChunkStore, StoreError> {
        fs::create_dir_all(dir).map_err(io_at("create store directory", dir))?;
        let lock = DataDirLock::acquire_file(&dir.join(STORE_LOCK_FILE))?;
        let root = dir.to_path_buf();
        let tmp_dir = root.join(TMP_DIR);
        let root_changed = ensure_dir(&tmp_dir)?;
        let counter = AtomicU64::new(0);
        check_format(&root, &tmp_dir, &counter)?;
        let mut root_changed = root_changed | ensure_dir(&root.join(PACKS_DIR))?;
        for sub in [MANIFESTS_DIR, QUARANTINE_DIR] {
            root_changed |= ensure_dir(&root.join(sub))?;
        }
        if root_changed {
            sync_dir(&root)?;
        }
        let pack::OpenedPacks {
            set: packs,
            packs: pack_list,
            ignored: ignored_packs,
        } = PackSet::open(&root.join(PACKS_DIR))?;
        let mut store = ChunkStore {
            manifests_dir: root.join(MANIFESTS_DIR),
            tmp_dir,
            quarantine_dir: root.join(QUARANTINE_DIR),
            root,
            index: DashMap::new(),
            packs,
            images: DashSet::new(),
            bytes: AtomicU64::new(0),
            counter,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            chunk_reads: AtomicU64::new(0),
            read_bytes: AtomicU64::new(0),
            checked: DashSet::new(),
            dropped_hook: OnceLock::new(),
            opened: OpenSummary::default(),
            _lock: lock,
        };
        store.opened.stale_temp_files = store.clean_tmp()?;
        store.opened.ignored_entries += ignored_packs;
        store.load_chunks(&pack_list)?;
        store.load_manifests()?;
        store.opened.chunks = store.index.len() as u64;
        store.opened.bytes = store.bytes.load(Ordering::Relaxed);
        store.opened.images = store.images.len() as u64;
        tracing::info!(
            dir = %store.root.display(),
            chunks = store.opened.chunks,
            bytes = store.opened.bytes,
            images = store.opened.images,
            stale_temp_files = store.opened.stale_temp_files,
            packs = store.opened.packs,
            rehashed_chunks = store.opened.rehashed_chunks,
            damaged_bytes = store.opened.damaged_bytes,
            "chunk store opened"
        );
        Ok(store)
    }

    /// Removes everything in `tmp/` (only interrupted writes put files there); returns the count.
    fn clean_tmp(&self) -> Result<u64, StoreError> {
        let mut removed = 0;
        for entry in fs::read_dir(&self.tmp_dir).map_err(io_at("list", &self.tmp_dir))? {
            let entry = entry.map_err(io_at("list", &self.tmp_dir))?;
            let path = entry.path();
            if !entry.file_name().to_string_lossy().ends_with(TEMP_SUFFIX) {
                tracing::warn!(path = %path.display(), "removing unexpected file from the temp dir");
            }
            let result = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            result.map_err(io_at("remove stale temp file", &path))?;
            removed += 1;
        }
        if removed > 0 {
            sync_dir(&self.tmp_dir)?;
            tracing::info!(removed, "removed temp files of interrupted writes");
        }
        Ok(removed)
    }

    /// Indexes every chunk record of every pack, oldest pack first, replaying tombstones.
    fn load_chunks(&mut self, packs: &[(u32, PathBuf)]) -> Result<(), StoreError> {
        for (n, path) in packs {
            let Some(file) = self.packs.file(*n) else {
                continue;
            };
            let scan = pack::scan(&file, path)?;
            self.opened.packs += 1;
            self.opened.rehashed_chunks += scan.rehashed;
            self.opened.damaged_bytes += scan.skipped_bytes();
            self.chunk_reads.fetch_add(scan.rehashed, Ordering::Relaxed);
            self.read_bytes
                .fetch_add(scan.rehashed_bytes, Ordering::Relaxed);
            for skipped in &scan.skipped {
                let kind = if skipped.tail {
                    tracing::warn!(
                        path = %path.display(),
                        offset = skipped.offset,
                        bytes = skipped.len,
                        "pack ends in bytes that hold no valid record (torn by a crash?); ignored"
                    );
                    SkipKind::TornTail
                } else {
                    tracing::warn!(
                        path = %path.display(),
                        offset = skipped.offset,
                        bytes = skipped.len,
                        "damaged bytes in the middle of a pack skipped; the records after them were kept (re-hashed)"
                    );
                    SkipKind::Damaged
                };
                self.opened.skipped.push(SkippedRange {
                    pack: path.clone(),
                    offset: skipped.offset,
                    len: skipped.len,
                    kind,
                });
            }
            for (offset, record) in scan.records {
                match record {
                    Record::Chunk { id, len } => {
                        let loc = Loc {
                            pack: *n,
                            offset,
                            len,
                        };
                        self.index_insert(id, loc);
                    }
                    Record::Tombstone { id, pack, offset } => {
                        if self
                            .index
                            .get(&id)
                            .is_some_and(|l| l.pack == pack && l.offset == offset)
                        {
                            self.unindex(&id);
                        }
                    }
                    Record::Commit { .. } => {}
                }
            }
        }
        Ok(())
    }

    /// Indexes every manifest from the directory listing.
    fn load_manifests(&mut self) -> Result<(), StoreError> {
        let dir = &self.manifests_dir;
        for entry in fs::read_dir(dir).map_err(io_at("list", dir))? {
            let entry = entry.map_err(io_at("list", dir))?;
            match parse_name::<ImageId>(&entry.file_name()) {
                Some(id) if entry.file_type().is_ok_and(|t| t.is_file()) => {
                    self.images.insert(id);
                }
                _ => {
                    tracing::warn!(path = %entry.path().display(), "ignoring unexpected entry in manifest dir");
                    self.opened.ignored_entries += 1;
                }
            }
        }
        Ok(())
    }

    /// The store directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where chunks and manifests that failed verification are moved.
    pub fn quarantine_dir(&self) -> &Path {
        &self.quarantine_dir
    }

    /// What [`ChunkStore::open`] found.
    pub fn open_summary(&self) -> &OpenSummary {
        &self.opened
    }

    /// Whether the store holds chunk `id` (committed and not found corrupt since). Never true for
    /// zero chunks, which are not stored.
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.index.contains_key(id)
    }

    /// Length of chunk `id`, if held.
    pub fn chunk_len(&self, id: &ChunkId) -> Option<u32> {
        self.index.get(id).map(|loc| loc.len)
    }

    /// Stores chunk `id` with bytes `data`.
    ///
    /// Verifies first: bytes that do not hash to `id` fail with [`StoreError::HashMismatch`] and
    /// nothing is written. All-zero bytes are not stored ([`Put::Zero`]). A chunk already held is
    /// not rewritten ([`Put::AlreadyPresent`]). Otherwise the chunk is committed (see the module
    /// docs) before this returns [`Put::Stored`]. Blocks on an fdatasync that concurrent callers
    /// share: call it from a blocking thread, or batch with [`ChunkStore::put_many`].
    pub fn put(&self, id: &ChunkId, data: &[u8]) -> Result<Put, StoreError> {
        let chunk = Verified::new(*id, data)?;
        self.put_many(std::slice::from_ref(&chunk))
            .map(|puts| puts.first().copied().unwrap_or(Put::AlreadyPresent))
    }

    /// Commits a batch of verified chunks with one append and one (shared) fdatasync, then makes
    /// them visible together. Returns what happened to each, in order. If the write fails (a full
    /// disk: [`StoreError::DiskFull`]), none of the batch is committed and the pack is cut back to
    /// where the batch began.
    pub fn put_many(&self, chunks: &[Verified<'_>]) -> Result<Vec<Put>, StoreError> {
        let mut outcome = Vec::with_capacity(chunks.len());
        let mut records = Vec::new();
        for c in chunks {
            if is_all_zero(c.data) {
                outcome.push(Put::Zero);
            } else if self.contains(&c.id)
                || records
                    .iter()
                    .any(|(r, _)| matches!(r, Record::Chunk { id, .. } if *id == c.id))
            {
                outcome.push(Put::AlreadyPresent);
            } else {
                // `Verified::new` checked the length against MAX_CHUNK_SIZE (a u32).
                let len = u32::try_from(c.data.len()).unwrap_or(u32::MAX);
                records.push((Record::Chunk { id: c.id, len }, c.data));
                outcome.push(Put::Stored);
            }
        }
        if records.is_empty() {
            return Ok(outcome);
        }
        let (locs, ticket) = self.packs.append(&records)?;
        self.packs.sync_to(ticket)?;
        let mut locs = locs.into_iter();
        for (c, put) in chunks.iter().zip(outcome.iter_mut()) {
            if *put != Put::Stored {
                continue;
            }
            let Some(loc) = locs.next() else { break };
            let _guard = self.stripe(c.id.0[0]);
            if self.contains(&c.id) {
                // Committed by a concurrent put meanwhile; our copy is dead weight in the pack.
                *put = Put::AlreadyPresent;
            } else {
                self.index_insert(c.id, loc);
                // `Verified` proves the bytes hashed to the id on their way in.
                self.checked.insert(c.id);
            }
        }
        Ok(outcome)
    }

    /// [`ChunkStore::put`] for bytes known to hash to `id` (the chunker computed `id` from these
    /// very bytes). Used by the import path.
    fn put_verified(&self, id: &ChunkId, data: &[u8]) -> Result<Put, StoreError> {
        let chunk = Verified::trusted(*id, data);
        self.put_many(std::slice::from_ref(&chunk))
            .map(|puts| puts.first().copied().unwrap_or(Put::AlreadyPresent))
    }

    /// Drops chunk `id` from the store (a tombstone record, fsynced); returns whether it was held.
    /// Its bytes stay in the pack until a compaction. For tests and a later garbage collector.
    pub fn remove(&self, id: &ChunkId) -> Result<bool, StoreError> {
        let _guard = self.stripe(id.0[0]);
        let Some(loc) = self.index.get(id).map(|l| *l) else {
            return Ok(false);
        };
        self.tombstone(id, loc)?;
        self.unindex(id);
        Ok(true)
    }

    /// Where chunk `id`'s bytes lie, if held.
    pub fn chunk_location(&self, id: &ChunkId) -> Option<ChunkLocation> {
        let loc = *self.index.get(id)?;
        Some(ChunkLocation {
            path: self.packs.path(loc.pack),
            offset: loc.data_offset(),
            len: loc.len,
        })
    }

    /// The bytes of chunk `id`, re-verified against the id, or `None` if not held.
    ///
    /// A chunk whose bytes no longer match is quarantined and reported as
    /// [`StoreError::CorruptChunk`]; afterwards it reads as absent.
    pub fn get(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, StoreError> {
        let mut buf = Vec::new();
        Ok(self.get_into(id, &mut buf)?.then_some(buf))
    }

    /// [`ChunkStore::get`] into a caller's buffer (cleared first), to reuse allocations. Returns
    /// whether the chunk is held.
    pub fn get_into(&self, id: &ChunkId, buf: &mut Vec<u8>) -> Result<bool, StoreError> {
        // Two rounds at most: a second only if a concurrent put replaced the bad record we read.
        for _ in 0..2 {
            let Some(loc) = self.index.get(id).map(|l| *l) else {
                buf.clear();
                return Ok(false);
            };
            if !self.read_chunk(&loc, buf)? {
                if self.forget_if_gone(id, loc) {
                    buf.clear();
                    return Ok(false);
                }
                continue;
            }
            if id.verify(buf) {
                self.checked.insert(*id);
                return Ok(true);
            }
            match self.quarantine_chunk(id, loc, buf)? {
                Quarantine::Moved(quarantined) => {
                    buf.clear();
                    return Err(StoreError::CorruptChunk {
                        id: *id,
                        quarantined,
                    });
                }
                Quarantine::Vanished => {
                    buf.clear();
                    return Ok(false);
                }
                Quarantine::Replaced => continue,
            }
        }
        buf.clear();
        Ok(false)
    }

    /// Reads `buf.len()` bytes of chunk `id` starting at `offset` into `buf`. Returns `false` if the
    /// chunk is not held. On the chunk's first read since open, reads and checks the whole chunk
    /// (see the module docs): a chunk that fails is quarantined and reads as not held (`false`), so
    /// the caller fetches it again. A read past the chunk's end fails with
    /// [`StoreError::OutOfRange`].
    pub fn read_at(&self, id: &ChunkId, offset: u32, buf: &mut [u8]) -> Result<bool, StoreError> {
        let Some(loc) = self.index.get(id).map(|l| *l) else {
            return Ok(false);
        };
        let out_of_range = |chunk_len: u32, len: usize| StoreError::OutOfRange {
            id: *id,
            offset,
            len,
            chunk_len,
        };
        if u64::from(offset) + buf.len() as u64 > u64::from(loc.len) {
            return Err(out_of_range(loc.len, buf.len()));
        }
        if !self.checked.contains(id) {
            let mut whole = Vec::new();
            let held = match self.get_into(id, &mut whole) {
                Ok(held) => held,
                // Quarantined (and logged) by `get_into`: from now on it is simply not held.
                Err(StoreError::CorruptChunk { .. }) => false,
                Err(e) => return Err(e),
            };
            if !held {
                return Ok(false);
            }
            let start = offset as usize;
            let Some(src) = whole.get(start..start + buf.len()) else {
                let chunk_len = u32::try_from(whole.len()).unwrap_or(u32::MAX);
                return Err(out_of_range(chunk_len, buf.len()));
            };
            buf.copy_from_slice(src);
            return Ok(true);
        }
        let path = self.packs.path(loc.pack);
        let Some(file) = self.packs.file(loc.pack) else {
            return Ok(false);
        };
        file.read_exact_at(buf, loc.data_offset() + u64::from(offset))
            .map_err(io_at("read pack", &path))?;
        self.chunk_reads.fetch_add(1, Ordering::Relaxed);
        self.read_bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(true)
    }

    /// Whether chunk `id` has been checked against its id since open (committed by this process
    /// or read whole): its next [`ChunkStore::read_at`] does not hash.
    pub fn is_checked(&self, id: &ChunkId) -> bool {
        self.checked.contains(id)
    }

    /// Sets the hook told of every chunk dropped from the index from now on (quarantined by `get`,
    /// `read_at` or `verify`, vanished from its pack, or removed). It runs on the thread that drops
    /// the chunk, with a store lock held: it must be quick and must not call into the store (send
    /// the id into a channel). Only one hook can be set; a second call returns `false` and changes
    /// nothing.
    pub fn on_dropped(&self, hook: DroppedHook) -> bool {
        self.dropped_hook.set(hook).is_ok()
    }

    /// Stores a manifest (validated first; [`StoreError::InvalidManifest`] if it breaks a rule)
    /// with the same commit discipline as chunks, and returns its image id. Idempotent.
    pub fn put_manifest(&self, m: &Manifest) -> Result<ImageId, StoreError> {
        m.validate().map_err(|source| StoreError::InvalidManifest {
            name: m.name.clone(),
            source: Box::new(source),
        })?;
        let id = m.id();
        if self.images.contains(&id) {
            return Ok(id);
        }
        let bytes = m.encode_canonical();
        let temp = TempFile::write(
            &self.tmp_dir,
            &format!("manifest-{id}"),
            &self.counter,
            &bytes,
        )?;
        let _guard = self.stripe(id.0[0]);
        temp.commit(&self.manifest_path(&id))?;
        self.images.insert(id);
        Ok(id)
    }

    /// The manifest of image `id`, decoded and checked against the id, or `None` if not held. A
    /// stored manifest that fails the check is quarantined ([`StoreError::CorruptManifest`]).
    pub fn manifest(&self, id: &ImageId) -> Result<Option<Manifest>, StoreError> {
        self.read_manifest(id, true)
    }

    fn read_manifest(&self, id: &ImageId, retry: bool) -> Result<Option<Manifest>, StoreError> {
        if !self.images.contains(id) {
            return Ok(None);
        }
        let path = self.manifest_path(id);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let _guard = self.stripe(id.0[0]);
                if !path.exists() {
                    self.images.remove(id);
                }
                return Ok(None);
            }
            Err(e) => return Err(io_error("open manifest", &path, e)),
        };
        let ident = file_ident(&file, &path)?;
        let mut bytes = Vec::new();
        (&file)
            .take(MAX_MANIFEST_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(io_at("read manifest", &path))?;
        match Manifest::decode_verified(&bytes, id) {
            Ok(m) => Ok(Some(m)),
            Err(source) => {
                let outcome = {
                    let _guard = self.stripe(id.0[0]);
                    let outcome =
                        self.move_to_quarantine(&path, "manifest", &id.to_string(), Some(ident))?;
                    if !matches!(outcome, Quarantine::Replaced) {
                        self.images.remove(id);
                    }
                    outcome
                };
                match outcome {
                    Quarantine::Moved(quarantined) => {
                        tracing::warn!(image = %id, error = %source, "corrupt manifest quarantined");
                        Err(StoreError::CorruptManifest {
                            id: *id,
                            quarantined,
                            source: Box::new(source),
                        })
                    }
                    Quarantine::Vanished => Ok(None),
                    // A new file took the name since we read (only possible from outside the store,
                    // since `put_manifest` skips held images): read that one, once.
                    Quarantine::Replaced if retry => self.read_manifest(id, false),
                    Quarantine::Replaced => Ok(None),
                }
            }
        }
    }

    /// Whether the store holds the manifest of image `id`.
    pub fn has_manifest(&self, id: &ImageId) -> bool {
        self.images.contains(id)
    }

    /// The images whose manifests the store holds, sorted.
    pub fn images(&self) -> Vec<ImageId> {
        let mut ids: Vec<ImageId> = self.images.iter().map(|id| *id).collect();
        ids.sort_unstable();
        ids
    }

    /// Counters.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            chunks: self.index.len() as u64,
            bytes: self.bytes.load(Ordering::Relaxed),
            images: self.images.len() as u64,
            chunk_reads: self.chunk_reads.load(Ordering::Relaxed),
            read_bytes: self.read_bytes.load(Ordering::Relaxed),
        }
    }

    /// Re-hashes every chunk and re-checks every manifest. Bad ones are moved to the quarantine dir
    /// and dropped from the index; the report lists them. Reads everything: minutes for a large
    /// store (run it from a blocking thread). Chunks committed while it runs may or may not be
    /// checked.
    pub fn verify(&self) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport {
            quarantine_dir: self.quarantine_dir.clone(),
            skipped_at_open: self.opened.skipped.clone(),
            ..VerifyReport::default()
        };
        let mut chunks: Vec<(ChunkId, Loc)> = self.index.iter().map(|e| (*e.key(), *e)).collect();
        // In pack order: one sequential pass over each pack.
        chunks.sort_unstable_by_key(|(_, loc)| (loc.pack, loc.offset));
        let mut buf = Vec::new();
        for (id, loc) in chunks {
            if !self.read_chunk(&loc, &mut buf)? {
                if self.forget_if_gone(&id, loc) {
                    report.vanished_chunks.push(id);
                }
                continue;
            }
            report.chunks_checked += 1;
            report.bytes_checked += buf.len() as u64;
            if !id.verify(&buf) {
                match self.quarantine_chunk(&id, loc, &buf)? {
                    Quarantine::Moved(_) => report.corrupt_chunks.push(id),
                    Quarantine::Vanished => report.vanished_chunks.push(id),
                    Quarantine::Replaced => {}
                }
            }
        }
        for id in self.images() {
            match self.manifest(&id) {
                Ok(Some(_)) => report.manifests_checked += 1,
                Ok(None) => {}
                Err(StoreError::CorruptManifest { .. }) => {
                    report.manifests_checked += 1;
                    report.corrupt_manifests.push(id);
                }
                Err(e) => return Err(e),
            }
        }
        report.corrupt_chunks.sort_unstable();
        report.vanished_chunks.sort_unstable();
        if !report.is_clean() {
            tracing::warn!(
                corrupt_chunks = report.corrupt_chunks.len(),
                vanished_chunks = report.vanished_chunks.len(),
                corrupt_manifests = report.corrupt_manifests.len(),
                damaged_pack_ranges = report.damaged_ranges(),
                quarantine = %self.quarantine_dir.display(),
                "verify found bad data"
            );
        }
        Ok(report)
    }

    /// Path of image `id`'s manifest file.
    pub fn manifest_path(&self, id: &ImageId) -> PathBuf {
        self.manifests_dir.join(id.to_string())
    }

    fn stripe(&self, key: u8) -> MutexGuard<'_, ()> {
        // The mutexes guard no data (only an order of file operations), so a poisoned one is fine.
        self.stripes[usize::from(key) % STRIPES]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads the chunk at `loc` into `buf` (resized to its length). `false` if its bytes are no
    /// longer in the pack (cut short behind the store's back).
    fn read_chunk(&self, loc: &Loc, buf: &mut Vec<u8>) -> Result<bool, StoreError> {
        let Some(file) = self.packs.file(loc.pack) else {
            buf.clear();
            return Ok(false);
        };
        // Every byte is overwritten by the read: a reused buffer is not zeroed first.
        buf.truncate(loc.len as usize);
        buf.resize(loc.len as usize, 0);
        match file.read_exact_at(buf, loc.data_offset()) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                buf.clear();
                return Ok(false);
            }
            Err(e) => return Err(io_error("read pack", &self.packs.path(loc.pack), e)),
        }
        self.chunk_reads.fetch_add(1, Ordering::Relaxed);
        self.read_bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(true)
    }

    /// Drops `id` from the index if it still points at `loc`, whose bytes are gone. Returns whether
    /// it did.
    fn forget_if_gone(&self, id: &ChunkId, loc: Loc) -> bool {
        let _guard = self.stripe(id.0[0]);
        if self.index.get(id).is_none_or(|l| *l != loc) {
            return false;
        }
        tracing::warn!(chunk = %id, pack = %self.packs.path(loc.pack).display(), "chunk bytes missing from its pack; dropped from the index");
        self.unindex(id);
        true
    }

    fn index_insert(&self, id: ChunkId, loc: Loc) {
        match self.index.insert(id, loc) {
            None => {
                self.bytes.fetch_add(u64::from(loc.len), Ordering::Relaxed);
            }
            Some(old) => {
                self.bytes.fetch_sub(u64::from(old.len), Ordering::Relaxed);
                self.bytes.fetch_add(u64::from(loc.len), Ordering::Relaxed);
            }
        }
    }

    fn unindex(&self, id: &ChunkId) {
        self.checked.remove(id);
        if let Some((_, loc)) = self.index.remove(id) {
            self.bytes.fetch_sub(u64::from(loc.len), Ordering::Relaxed);
            if let Some(hook) = self.dropped_hook.get() {
                hook(id);
            }
        }
    }

    /// Appends and syncs a tombstone killing the record at `loc`.
    fn tombstone(&self, id: &ChunkId, loc: Loc) -> Result<(), StoreError> {
        let record = Record::Tombstone {
            id: *id,
            pack: loc.pack,
            offset: loc.offset,
        };
        let (_, ticket) = self.packs.append(&[(record, &[][..])])?;
        self.packs.sync_to(ticket)
    }

    /// Copies the bad bytes `seen` of chunk `id` (read from `loc`) to quarantine, kills the record
    /// with a tombstone and drops it from the index, provided the index still points at `loc`.
    fn quarantine_chunk(
        &self,
        id: &ChunkId,
        loc: Loc,
        seen: &[u8],
    ) -> Result<Quarantine, StoreError> {
        let _guard = self.stripe(id.0[0]);
        if self.index.get(id).is_none_or(|l| *l != loc) {
            return Ok(Quarantine::Replaced);
        }
        let dest = self.quarantine_path("chunk", &id.to_string());
        let copy = TempFile::write(&self.tmp_dir, "quarantine", &self.counter, seen)?;
        copy.commit(&dest)?;
        self.tombstone(id, loc)?;
        self.unindex(id);
        tracing::warn!(chunk = %id, quarantine = %dest.display(), "corrupt chunk quarantined");
        Ok(Quarantine::Moved(dest))
    }

    /// Renames `path` into the quarantine dir if it is still the file `seen` (any file if `None`).
    /// The caller holds the stripe lock for the id.
    fn move_to_quarantine(
        &self,
        path: &Path,
        kind: &str,
        name: &str,
        seen: Option<FileIdent>,
    ) -> Result<Quarantine, StoreError> {
        match fs::symlink_metadata(path) {
            Ok(meta) => {
                if seen.is_some_and(|s| s != (meta.dev(), meta.ino())) {
                    return Ok(Quarantine::Replaced);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Quarantine::Vanished),
            Err(e) => return Err(io_error("stat", path, e)),
        }
        let dest = self.quarantine_path(kind, name);
        fs::rename(path, &dest).map_err(io_at("move to quarantine", path))?;
        durable::sync_parent(path)?;
        sync_dir(&self.quarantine_dir)?;
        Ok(Quarantine::Moved(dest))
    }

    /// A fresh name in the quarantine dir.
    fn quarantine_path(&self, kind: &str, name: &str) -> PathBuf {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        self.quarantine_dir
            .join(format!("{kind}-{name}.{secs}.{}.{n}", std::process::id()))
    }
}

/// Writes the format marker if missing; refuses a store of another format.
fn check_format(root: &Path, tmp_dir: &Path, counter: &AtomicU64) -> Result<(), StoreError> {
    let path = root.join(FORMAT_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let found = text.lines().next().unwrap_or("").trim();
            if found == FORMAT {
                Ok(())
            } else {
                Err(StoreError::UnsupportedFormat {
                    path,
                    found: found.to_owned(),
                    expected: FORMAT,
                })
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let temp = TempFile::write(
                tmp_dir,
                FORMAT_FILE,
                counter,
                format!("{FORMAT}\n").as_bytes(),
            )?;
            temp.commit(&path)
        }
        Err(e) => Err(io_error("read format marker", &path, e)),
    }
}

/// Device and inode of an open file.
fn file_ident(file: &File, path: &Path) -> Result<FileIdent, StoreError> {
    let meta = file.metadata().map_err(io_at("stat", path))?;
    Ok((meta.dev(), meta.ino()))
}

/// Parses a file name that must be an id in its canonical form (64 lowercase hex digits).
fn parse_name<T: std::str::FromStr>(name: &std::ffi::OsStr) -> Option<T> {
    let name = name.to_str()?;
    let canonical = name.len() == 64
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if canonical { name.parse().ok() } else { None }
}
