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
//!   records after it (at most the groups in flight at the crash) are re-hashed, and one that fails
//!   its hash is skipped (its header passed its check, so its length, and where the next record
//!   starts, are right). A crash can only damage the tail: appends never rewrite earlier bytes, and
//!   a sync covering a record covers every record before it.
//! - **Damage in the middle** (a flipped byte in a header, from the disk or a person) does not end
//!   the pack. Where a header fails its check (magic, kind, plausible length, the record fitting
//!   in the pack, the 8-byte header check), the scan searches forward for the next offset holding a
//!   well-formed header (1 MiB reads, the magic found in memory) and carries on from there. The
//!   bytes in between are *skipped*: reported per pack as (offset, length), never indexed. After
//!   the first damage in a pack nothing is trusted on its header alone: a header found by searching
//!   may be a header-shaped run of bytes inside a chunk (a VM image can hold a vmswarm store), so
//!   every chunk record from there to the end of the pack is re-hashed, commit records there vouch
//!   for nothing, and a chunk record that fails its hash is treated as damage (the search resumes
//!   one byte after its start, since its length may be made up). This costs one read of the rest of
//!   a damaged pack at open, and only for a damaged pack. A skipped range that runs to the end of
//!   the pack is a *tail* (what a crash leaves; damage to the very last records looks the same);
//!   one followed by a valid record is damage.
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

/// A range of a pack that holds no valid record, found by [`scan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Skipped {
    /// Offset of its first byte.
    pub(crate) offset: u64,
    /// Its length.
    pub(crate) len: u64,
    /// It runs to the end of the pack with no valid record after it (a torn tail, as a crash
    /// leaves; or damage to the last records, which looks the same).
    pub(crate) tail: bool,
}

/// What [`scan`] found in one pack.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    /// Valid records and their offsets, in file order.
    pub(crate) records: Vec<(u64, Record)>,
    /// Ranges that hold no valid record (damage, a torn tail), in file order, adjacent ones
    /// merged; never indexed.
    pub(crate) skipped: Vec<Skipped>,
    /// Chunk records re-hashed because no commit record covered them.
    pub(crate) rehashed: u64,
    /// Bytes read to re-hash them.
    pub(crate) rehashed_bytes: u64,
}

impl Scan {
    /// Bytes in [`Scan::skipped`].
    pub(crate) fn skipped_bytes(&self) -> u64 {
        self.skipped.iter().map(|s| s.len).sum()
    }
}

/// Bytes read at a time when searching for the next record after damage.
const SEARCH_BLOCK: usize = 1 << 20;

/// Reads the records of a pack (see "Recovery" in the module docs): headers only up to the last
/// commit record, headers and chunk bytes after it, and after damage a search for the next valid
/// header, with every chunk record from there on re-hashed.
pub(crate) fn scan(file: &File, path: &Path) -> Result<Scan, StoreError> {
    let file_len = file.metadata().map_err(io_at("stat", path))?.len();
    let mut out = Scan::default();
    // Records, and whether their bytes were re-hashed already (those found after a resync).
    let mut found: Vec<(u64, Record, bool)> = Vec::new();
    let mut bad: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0u64;
    let mut committed = 0u64;
    // Set at the first damage: from there on nothing is trusted without its hash.
    let mut resynced = false;
    let mut header = [0u8; HEADER_LEN as usize];
    let mut buf = Vec::new();
    while pos < file_len {
        let record = if pos + HEADER_LEN <= file_len {
            file.read_exact_at(&mut header, pos)
                .map_err(io_at("read pack", path))?;
            // A record whose bytes run past the end is torn: the header made it, not the rest.
            Record::decode(&header).filter(|r| pos + r.size() <= file_len)
        } else {
            None
        };
        let record = match record {
            Some(Record::Chunk { id, len }) if resynced => {
                // Found by searching, so possibly a header-shaped run of bytes inside a chunk
                // (an image can hold a vmswarm store): only its hash makes it a record.
                buf.resize(len as usize, 0);
                file.read_exact_at(&mut buf, pos + HEADER_LEN)
                    .map_err(io_at("read pack", path))?;
                out.rehashed += 1;
                out.rehashed_bytes += u64::from(len);
                id.verify(&buf).then_some(Record::Chunk { id, len })
            }
            other => other,
        };
        match record {
            Some(record) => {
                if let Record::Commit { synced } = record {
                    // Only a commit record reached from the pack's start, with no damage before
                    // it, vouches for anything.
                    if !resynced && synced <= pos {
                        committed = committed.max(synced);
                    }
                }
                found.push((pos, record, resynced));
                pos += record.size();
            }
            None => {
                let next = find_record(file, path, pos + 1, file_len)?;
                let end = next.unwrap_or(file_len);
                bad.push((pos, end));
                resynced = true;
                pos = end;
            }
        }
    }
    // Re-hash the chunks (before any damage) no commit record vouches for; a bad one is skipped.
    // Its header passed its check, so its length is right and the records after it stand.
    for (offset, record, hashed) in found {
        if let Record::Chunk { id, len } = record {
            if !hashed && offset >= committed {
                buf.resize(len as usize, 0);
                file.read_exact_at(&mut buf, offset + HEADER_LEN)
                    .map_err(io_at("read pack", path))?;
                out.rehashed += 1;
                out.rehashed_bytes += u64::from(len);
                if !id.verify(&buf) {
                    bad.push((offset, offset + record.size()));
                    continue;
                }
            }
        }
        out.records.push((offset, record));
    }
    bad.sort_unstable();
    for (start, end) in bad {
        match out.skipped.last_mut() {
            Some(last) if last.offset + last.len >= start => {
                last.len = last.len.max(end - last.offset);
            }
            _ => out.skipped.push(Skipped {
                offset: start,
                len: end - start,
                tail: false,
            }),
        }
    }
    if let Some(last) = out.skipped.last_mut() {
        last.tail = last.offset + last.len == file_len;
    }
    Ok(out)
}

/// The offset of the first well-formed record header at or after `from` whose record fits in the
/// pack, or `None`. Reads [`SEARCH_BLOCK`] bytes at a time and looks for the magic in memory.
fn find_record(
    file: &File,
    path: &Path,
    from: u64,
    file_len: u64,
) -> Result<Option<u64>, StoreError> {
    let header_len = HEADER_LEN as usize;
    let mut buf = Vec::new();
    let mut start = from;
    while start + HEADER_LEN <= file_len {
        // Candidates at [start, start + SEARCH_BLOCK); the block carries the bytes of the last
        // candidate's header too.
        let want = (SEARCH_BLOCK + header_len - 1) as u64;
        let len = want.min(file_len - start) as usize;
        buf.resize(len, 0);
        file.read_exact_at(&mut buf, start)
            .map_err(io_at("read pack", path))?;
        let candidates = (len + 1 - header_len).min(SEARCH_BLOCK);
        let mut i = 0;
        while i < candidates {
            let Some(skip) = buf[i..candidates].iter().position(|&b| b == MAGIC[0]) else {
                break;
            };
            i += skip;
            let at = start + i as u64;
            if buf[i..i + 4] == MAGIC {
                let mut h = [0u8; HEADER_LEN as usize];
                h.copy_from_slice(&buf[i..i + header_len]);
                if Record::decode(&h).is_some_and(|r| at + r.size() <= file_len) {
                    return Ok(Some(at));
                }
            }
            i += 1;
        }
        start += SEARCH_BLOCK as u64;
    }
    Ok(None)
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
    #[test]
    fn the_search_finds_headers_across_block_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p");
        let commit = Record::Commit { synced: 0 }.encode();
        // Garbage with stray magics, then a header straddling the first block's end, then one
        // exactly at the start of the third block, then a header cut off by the end of the file.
        let mut bytes = vec![0x5au8; 2 * SEARCH_BLOCK];
        for at in (0..bytes.len() - 8).step_by(4099) {
            bytes[at..at + 4].copy_from_slice(&MAGIC);
        }
        let first = SEARCH_BLOCK as u64 - 30;
        bytes[first as usize..first as usize + 64].copy_from_slice(&commit);
        bytes.extend_from_slice(&commit);
        bytes.extend_from_slice(&commit[..63]);
        fs::write(&path, &bytes).unwrap();
        let file = File::open(&path).unwrap();
        let len = bytes.len() as u64;
        assert_eq!(find_record(&file, &path, 1, len).unwrap(), Some(first));
        assert_eq!(find_record(&file, &path, first, len).unwrap(), Some(first));
        let second = 2 * SEARCH_BLOCK as u64;
        assert_eq!(
            find_record(&file, &path, first + 1, len).unwrap(),
            Some(second)
        );
        assert_eq!(find_record(&file, &path, second + 1, len).unwrap(), None);
    }

    #[test]
    fn a_damaged_record_in_the_middle_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p");
        let chunks: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i + 1; 1000]).collect();
        let mut bytes = Vec::new();
        let mut offsets = Vec::new();
        for c in &chunks {
            offsets.push(bytes.len() as u64);
            let id = ChunkId::of(c);
            bytes.extend_from_slice(&Record::Chunk { id, len: 1000 }.encode());
            bytes.extend_from_slice(c);
        }
        let synced = bytes.len() as u64;
        bytes.extend_from_slice(&Record::Commit { synced }.encode());
        bytes[offsets[1] as usize + 10] ^= 1;
        fs::write(&path, &bytes).unwrap();
        let found = scan(&File::open(&path).unwrap(), &path).unwrap();
        let kept: Vec<u64> = found.records.iter().map(|(o, _)| *o).collect();
        assert_eq!(kept, vec![offsets[0], offsets[2], offsets[3], synced]);
        assert_eq!(
            found.skipped,
            vec![Skipped {
                offset: offsets[1],
                len: 1064,
                tail: false
            }]
        );
        // Chunk 0 lies before the damage but no commit record before it vouches for it.
        assert_eq!(found.rehashed, 3);
    }
}
