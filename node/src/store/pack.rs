//! Append-only pack files: the on-disk record format, group commit, and recovery after a crash.
//!
//! # What this module decides
//! - **The record format.** A pack is a sequence of records, each a 64-byte header optionally
//!   followed by a chunk's bytes. The header carries a magic, the record kind, the chunk length,
//!   the chunk id and a check (the first 8 bytes of the BLAKE3 of the other 56 header bytes), so a
//!   torn or overwritten header is recognised without reading any chunk bytes:
//!   ```text
//!   0..4   magic "VSPK"          4      kind (1 chunk, 2 tombstone, 3 commit)
//!   8..12  chunk length (LE)     12..16 tombstone: pack number of the record it kills (LE)
//!   16..48 chunk id              48..56 tombstone: offset it kills; commit: synced end (LE)
//!   56..64 header check
//!   ```
//! - **Group commit.** [`PackSet::append`] writes records at the end of the active pack under one
//!   mutex (a `pwrite` per header and per chunk, straight from the caller's buffer) and returns a
//!   ticket; [`PackSet::sync_to`] makes the ticket durable. The first waiter becomes the leader and
//!   runs one `fdatasync` for everything appended so far; the others wait on a condition variable
//!   and return when a sync covered their records. So the number of fsyncs follows the number of
//!   concurrent writers and batches, not the number of chunks. After each successful sync the
//!   leader appends a *commit record* naming the synced end. It costs no extra fsync (the next
//!   group's sync carries it) and bounds what recovery must re-hash.
//! - **Recovery** ([`scan`]). Headers are read one by one (no chunk bytes) up to the last commit
//!   record: that region was fsynced before the commit record was written, so it is trusted. Chunk
//!   records after it (at most the groups in flight at the crash) are re-hashed; the first that
//!   is torn, has a bad header or fails its hash ends the pack's valid part. A crash can only damage
//!   the tail: appends never rewrite earlier bytes, and a sync covering a record covers every
//!   record before it.
//! - **Packs are never appended to after a restart.** Each process writes to a fresh pack, created
//!   on its first write, so a damaged tail of an older pack is left where it is (counted and
//!   reported, never indexed) and nothing has to be truncated in place. A pack is also closed
//!   after [`PACK_TARGET_BYTES`], so a later compaction can rewrite one pack at a time.
//! - **A failed append** (full disk) truncates the pack back to where the append started, so the
//!   pack ends at a record boundary again, and fails the whole batch.
//! - **Page cache.** After each group commit, pages of the active pack more than [`CACHE_WINDOW`]
//!   behind the synced end are dropped from the page cache (`posix_fadvise(DONTNEED)`; they are
//!   clean by then). Writes then reuse just-freed pages instead of growing the cache into memory
//!   the VM host has not backed yet, which made the kernel's copy into the page cache the largest
//!   cost of a pull (36% of a puller's CPU samples; 2.6% with the window, BENCHMARKS.md). Chunks
//!   written earlier than the window are read from disk when served.
//!
//! It leaves to the store: the index (which record a chunk id resolves to), tombstone semantics,
//! hashing before an append, and quarantine.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};

use vmswarm_protocol::ChunkId;
use vmswarm_protocol::manifest::MAX_CHUNK_SIZE;

use super::durable::sync_dir;
use super::error::{StoreError, io_at, io_error};

/// Length of a record header.
pub(crate) const HEADER_LEN: u64 = 64;
/// A pack is closed and a new one started once it holds this many bytes.
pub(crate) const PACK_TARGET_BYTES: u64 = 1 << 30;
/// Synced bytes further than this behind the end of the active pack are dropped from the page
/// cache (see the module docs).
pub(crate) const CACHE_WINDOW: u64 = 64 << 20;
const MAGIC: [u8; 4] = *b"VSPK";
const PACK_SUFFIX: &str = ".pack";

/// Where a chunk's record lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Loc {
    /// Pack number.
    pub(crate) pack: u32,
    /// Offset of the record's header in the pack.
    pub(crate) offset: u64,
    /// Chunk length.
    pub(crate) len: u32,
}

impl Loc {
    /// Offset of the chunk's bytes.
    pub(crate) fn data_offset(&self) -> u64 {
        self.offset + HEADER_LEN
    }
}

/// A record's meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Record {
    /// A chunk's bytes follow the header.
    Chunk { id: ChunkId, len: u32 },
    /// The chunk record at (`pack`, `offset`) is dead (quarantined or removed).
    Tombstone { id: ChunkId, pack: u32, offset: u64 },
    /// Everything before `synced` in this pack was fsynced before this record was written.
    Commit { synced: u64 },
}

impl Record {
    pub(crate) fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut h = [0u8; HEADER_LEN as usize];
        h[..4].copy_from_slice(&MAGIC);
        match *self {
            Record::Chunk { id, len } => {
                h[4] = 1;
                h[8..12].copy_from_slice(&len.to_le_bytes());
                h[16..48].copy_from_slice(&id.0);
            }
            Record::Tombstone { id, pack, offset } => {
                h[4] = 2;
                h[12..16].copy_from_slice(&pack.to_le_bytes());
                h[16..48].copy_from_slice(&id.0);
                h[48..56].copy_from_slice(&offset.to_le_bytes());
            }
            Record::Commit { synced } => {
                h[4] = 3;
                h[48..56].copy_from_slice(&synced.to_le_bytes());
            }
        }
        let check = blake3::hash(&h[..56]);
        h[56..].copy_from_slice(&check.as_bytes()[..8]);
        h
    }

    /// Decodes a header; `None` if it is not a well-formed one.
    fn decode(h: &[u8; HEADER_LEN as usize]) -> Option<Record> {
        if h[..4] != MAGIC || h[56..] != blake3::hash(&h[..56]).as_bytes()[..8] {
            return None;
        }
        let u32_at = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[i..i + 8]);
            u64::from_le_bytes(b)
        };
        let mut id = [0u8; 32];
        id.copy_from_slice(&h[16..48]);
        let id = ChunkId(id);
        match h[4] {
            1 => {
                let len = u32_at(8);
                (len > 0 && len <= MAX_CHUNK_SIZE).then_some(Record::Chunk { id, len })
            }
            2 => Some(Record::Tombstone {
                id,
                pack: u32_at(12),
                offset: u64_at(48),
            }),
            3 => Some(Record::Commit { synced: u64_at(48) }),
            _ => None,
        }
    }

    /// Bytes the record occupies, header included.
    fn size(&self) -> u64 {
        match self {
            Record::Chunk { len, .. } => HEADER_LEN + u64::from(*len),
            _ => HEADER_LEN,
        }
    }
}

/// What [`scan`] found in one pack.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    /// Valid records and their offsets, in file order.
    pub(crate) records: Vec<(u64, Record)>,
    /// Bytes after the valid part (a torn tail or damage), never indexed.
    pub(crate) damaged_bytes: u64,
    /// Chunk records re-hashed because no commit record covered them.
    pub(crate) rehashed: u64,
    /// Bytes read to re-hash them.
    pub(crate) rehashed_bytes: u64,
}

/// Reads the records of a pack: headers only up to the last commit record, headers and chunk bytes
/// after it (see the module docs).
pub(crate) fn scan(file: &File, path: &Path) -> Result<Scan, StoreError> {
    let file_len = file.metadata().map_err(io_at("stat", path))?.len();
    let mut out = Scan::default();
    let mut pos = 0u64;
    let mut committed = 0u64;
    let mut header = [0u8; HEADER_LEN as usize];
    while pos + HEADER_LEN <= file_len {
        file.read_exact_at(&mut header, pos)
            .map_err(io_at("read pack", path))?;
        let Some(record) = Record::decode(&header) else {
            break;
        };
        if pos + record.size() > file_len {
            break; // torn: the header made it, not all of the bytes
        }
        if let Record::Commit { synced } = record {
            if synced <= pos {
                committed = committed.max(synced);
            }
        }
        out.records.push((pos, record));
        pos += record.size();
    }
    // Re-hash the chunks no commit record vouches for; the first bad one ends the valid part.
    let mut buf = Vec::new();
    let mut keep = out.records.len();
    for (i, (offset, record)) in out.records.iter().enumerate() {
        let Record::Chunk { id, len } = *record else {
            continue;
        };
        if *offset < committed {
            continue;
        }
        buf.resize(len as usize, 0);
        file.read_exact_at(&mut buf, offset + HEADER_LEN)
            .map_err(io_at("read pack", path))?;
        out.rehashed += 1;
        out.rehashed_bytes += u64::from(len);
        if !id.verify(&buf) {
            keep = i;
            pos = *offset;
            break;
        }
    }
    out.records.truncate(keep);
    out.damaged_bytes = file_len - pos;
    Ok(out)
}

/// Where durability stands.
#[derive(Debug, Default)]
struct SyncState {
    /// Every byte of pack `.0` before `.1`, and every byte of older packs, is durable.
    synced: (u32, u64),
    /// A leader is running an fsync.
    leader: bool,
}

/// The pack being appended to.
#[derive(Debug)]
struct Active {
    pack: u32,
    file: Arc<File>,
    end: u64,
    /// A failed append could not be truncated away: the next append starts a new pack.
    broken: bool,
    /// Page-cache pages before this offset were released (see [`CACHE_WINDOW`]).
    released: u64,
}

/// A point in the append stream: durable once [`PackSet::sync_to`] returned for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Ticket(u32, u64);

/// What [`PackSet::open`] found.
#[derive(Debug)]
pub(crate) struct OpenedPacks {
    pub(crate) set: PackSet,
    /// The packs' numbers and paths, in ascending order.
    pub(crate) packs: Vec<(u32, PathBuf)>,
    /// Entries that are not packs (left alone).
    pub(crate) ignored: u64,
}

/// The store's packs: open handles for reading, the active pack for appending, group commit.
#[derive(Debug)]
pub(crate) struct PackSet {
    dir: PathBuf,
    files: RwLock<BTreeMap<u32, Arc<File>>>,
    active: Mutex<Option<Active>>,
    /// Number of the next pack to create.
    next: Mutex<u32>,
    sync: Mutex<SyncState>,
    synced: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the guarded state consistent before anything can panic.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl PackSet {
    /// Opens every pack in `dir` for reading.
    pub(crate) fn open(dir: &Path) -> Result<OpenedPacks, StoreError> {
        let mut packs = Vec::new();
        let mut ignored = 0;
        for entry in fs::read_dir(dir).map_err(io_at("list", dir))? {
            let entry = entry.map_err(io_at("list", dir))?;
            let name = entry.file_name();
            let number = name
                .to_str()
                .and_then(|n| n.strip_suffix(PACK_SUFFIX))
                .filter(|n| n.len() == 8 && n.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|n| n.parse::<u32>().ok());
            match number {
                Some(n) if entry.file_type().is_ok_and(|t| t.is_file()) => {
                    packs.push((n, entry.path()))
                }
                _ => {
                    tracing::warn!(path = %entry.path().display(), "ignoring unexpected entry in pack dir");
                    ignored += 1;
                }
            }
        }
        packs.sort_unstable();
        let mut files = BTreeMap::new();
        for (n, path) in &packs {
            let file = File::open(path).map_err(io_at("open pack", path))?;
            files.insert(*n, Arc::new(file));
        }
        let next = packs.last().map_or(1, |(n, _)| n + 1);
        let set = PackSet {
            dir: dir.to_path_buf(),
            files: RwLock::new(files),
            active: Mutex::new(None),
            next: Mutex::new(next),
            sync: Mutex::new(SyncState {
                synced: (next, 0),
                leader: false,
            }),
            synced: Condvar::new(),
        };
        Ok(OpenedPacks {
            set,
            packs,
            ignored,
        })
    }

    /// The open handle of pack `n`.
    pub(crate) fn file(&self, n: u32) -> Option<Arc<File>> {
        self.files
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&n)
            .cloned()
    }

    /// Path of pack `n`.
    pub(crate) fn path(&self, n: u32) -> PathBuf {
        self.dir.join(format!("{n:08}{PACK_SUFFIX}"))
    }

    /// Closes the active pack (after syncing it whole) and creates the next one.
    fn rotate(&self, active: &mut Option<Active>) -> Result<(), StoreError> {
        if let Some(old) = active.take() {
            let path = self.path(old.pack);
            old.file.sync_data().map_err(io_at("fsync pack", &path))?;
            let mut st = lock(&self.sync);
            if st.synced < (old.pack, old.end) {
                st.synced = (old.pack, old.end);
            }
            drop(st);
            self.synced.notify_all();
        }
        let n = {
            let mut next = lock(&self.next);
            let n = *next;
            *next += 1;
            n
        };
        let path = self.path(n);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_at("create pack", &path))?;
        sync_dir(&self.dir)?;
        let file = Arc::new(file);
        self.files
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(n, Arc::clone(&file));
        *active = Some(Active {
            pack: n,
            file,
            end: 0,
            broken: false,
            released: 0,
        });
        Ok(())
    }

    /// Appends `records` (with the bytes of chunk records) as one batch. Returns each record's
    /// location and a ticket for [`PackSet::sync_to`]. On failure nothing of the batch remains.
    pub(crate) fn append(
        &self,
        records: &[(Record, &[u8])],
    ) -> Result<(Vec<Loc>, Ticket), StoreError> {
        let mut guard = lock(&self.active);
        let full = guard
            .as_ref()
            .is_none_or(|a| a.broken || a.end >= PACK_TARGET_BYTES);
        if full {
            self.rotate(&mut guard)?;
        }
        let Some(active) = guard.as_mut() else {
            // rotate() either fails or leaves an active pack.
            return Err(StoreError::Io {
                action: "append to pack",
                path: self.dir.clone(),
                source: io::Error::other("no active pack"),
            });
        };
        let start = active.end;
        let mut pos = start;
        let mut locs = Vec::with_capacity(records.len());
        let mut write = || -> io::Result<()> {
            for (record, data) in records {
                active.file.write_all_at(&record.encode(), pos)?;
                if let Record::Chunk { len, .. } = record {
                    active.file.write_all_at(data, pos + HEADER_LEN)?;
                    locs.push(Loc {
                        pack: active.pack,
                        offset: pos,
                        len: *len,
                    });
                }
                pos += record.size();
            }
            Ok(())
        };
        if let Err(e) = write() {
            let path = self.path(active.pack);
            if let Err(t) = active.file.set_len(start) {
                // The pack now ends in a partial record; the next append starts a new pack
                // (recovery ignores the partial tail).
                tracing::error!(path = %path.display(), error = %t, "could not truncate a failed append");
                active.broken = true;
            }
            return Err(io_error("append to pack", &path, e));
        }
        active.end = pos;
        Ok((locs, Ticket(active.pack, pos)))
    }

    /// Returns once everything before `ticket` is durable (see the module docs).
    pub(crate) fn sync_to(&self, ticket: Ticket) -> Result<(), StoreError> {
        let mut st = lock(&self.sync);
        loop {
            if (st.synced.0, st.synced.1) >= (ticket.0, ticket.1) {
                return Ok(());
            }
            if st.leader {
                st = self.synced.wait(st).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            st.leader = true;
            drop(st);
            let result = self.sync_active();
            st = lock(&self.sync);
            st.leader = false;
            if let Ok(Some(point)) = result {
                if st.synced < point {
                    st.synced = point;
                }
            }
            self.synced.notify_all();
            match result {
                Err(e) => return Err(e),
                // No pack was ever appended to, so no ticket can be waiting for one.
                Ok(None) if (st.synced.0, st.synced.1) < (ticket.0, ticket.1) => {
                    return Err(StoreError::Io {
                        action: "sync pack",
                        path: self.dir.clone(),
                        source: io::Error::other("no pack is being written"),
                    });
                }
                Ok(_) => {}
            }
        }
    }

    /// One group commit: fdatasync the active pack up to its current end, then append a commit
    /// record (not synced itself). Returns the durable point.
    fn sync_active(&self) -> Result<Option<(u32, u64)>, StoreError> {
        let Some((pack, file, end)) = lock(&self.active)
            .as_ref()
            .map(|a| (a.pack, Arc::clone(&a.file), a.end))
        else {
            return Ok(None);
        };
        file.sync_data()
            .map_err(|e| io_error("fsync pack", &self.path(pack), e))?;
        let mut guard = lock(&self.active);
        if let Some(a) = guard.as_mut().filter(|a| a.pack == pack) {
            let release_to = end.saturating_sub(CACHE_WINDOW);
            if let Some(len) = std::num::NonZeroU64::new(release_to.saturating_sub(a.released)) {
                // Advice only: a failure costs page cache, never data.
                let _ = rustix::fs::fadvise(
                    &*a.file,
                    a.released,
                    Some(len),
                    rustix::fs::Advice::DontNeed,
                );
                a.released = release_to;
            }
        }
        if let Some(a) = guard.as_mut().filter(|a| a.pack == pack && !a.broken) {
            let commit = Record::Commit { synced: end };
            match a.file.write_all_at(&commit.encode(), a.end) {
                Ok(()) => a.end += HEADER_LEN,
                Err(e) => {
                    // Only an optimisation of recovery; the pack stays valid without it.
                    tracing::debug!(error = %e, "could not write a commit record");
                    let _ = a.file.set_len(a.end);
                }
            }
        }
        Ok(Some((pack, end)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_damage_is_detected() {
        let id = ChunkId::of(b"x");
        for r in [
            Record::Chunk { id, len: 1 },
            Record::Tombstone {
                id,
                pack: 7,
                offset: 1 << 40,
            },
            Record::Commit { synced: 12345 },
        ] {
            let h = r.encode();
            assert_eq!(Record::decode(&h), Some(r));
            for bit in 0..h.len() * 8 {
                let mut bad = h;
                bad[bit / 8] ^= 1 << (bit % 8);
                assert_eq!(Record::decode(&bad), None, "bit {bit} of {r:?}");
            }
        }
        let too_long = Record::Chunk {
            id,
            len: MAX_CHUNK_SIZE + 1,
        };
        assert_eq!(Record::decode(&too_long.encode()), None);
    }
}
