//! Copy-on-write overlays of writable clones: where a clone's writes and trims live.
//!
//! A clone is a directory `DATA/clones/NAME/` holding `clone.json` (which image it is a clone of),
//! `overlay.data` and `overlay.map`. The base image's chunks are never written: every write of the
//! clone goes to its overlay, and a read falls through to the base for blocks the clone never wrote.
//!
//! # Granularity: 4 KiB blocks in a sparse file, a 2-bit state per block
//! - **4 KiB** is the page and filesystem block size of every guest and host this runs on, and what
//!   guests write in (qemu and Linux issue 4 KiB-aligned I/O to virtual disks). Finer blocks would
//!   grow the map with no saving; coarser ones (a 256 KiB chunk) would turn every small guest write
//!   into a read-modify-write of a whole chunk, fetching it from peers first if absent — exactly the
//!   latency a lazily booting VM cannot afford. Unaligned writes are rare and are handled by a
//!   read-modify-write of the edge blocks in [`crate::nbd::export`].
//! - **The data** sits at its own offset in `overlay.data`, a sparse file as large as the image:
//!   no allocation table to maintain, no fragmentation logic, and the filesystem only allocates the
//!   blocks actually written.
//! - **The map** holds a state per block: *base* (read from the image), *data* (read from
//!   `overlay.data`) or *zero* (trimmed or zeroed: reads as zeros, the data file has a hole). At 2
//!   bits per block it is 64 KiB per GiB of image, kept in memory.
//!
//! # Durability (what FLUSH guarantees)
//! A write goes to `overlay.data` (`pwrite`) and only then marks its blocks in the in-memory map.
//! [`Overlay::flush`] snapshots the map, `fsync`s the data file, then commits the snapshot as
//! `overlay.map` (temp file, fsync, rename, directory fsync). After a crash the map on disk is the
//! last flushed one and every block it marks has its data on disk; writes that were never flushed
//! may be lost, which is what a disk without FLUSH promises anyway. The map file carries a BLAKE3
//! checksum, so a damaged map is refused (clear error) rather than read as garbage.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Overlay block size in bytes.
pub const BLOCK: u64 = 4096;
const MAGIC: &[u8; 16] = b"vmswarm-overlay1";
const HEADER_LEN: usize = 16 + 8 + 4 + 4 + 32;

/// Where the bytes of a block come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The base image.
    Base,
    /// The overlay's data file.
    Data,
    /// Zeros.
    Zero,
}

impl Source {
    fn bits(self) -> u8 {
        match self {
            Source::Base => 0,
            Source::Data => 1,
            Source::Zero => 2,
        }
    }
    fn from_bits(b: u8) -> Source {
        match b & 3 {
            1 => Source::Data,
            2 => Source::Zero,
            _ => Source::Base,
        }
    }
}

/// Errors of an overlay.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// A file operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The map file is damaged or belongs to another image size.
    #[error("overlay map {path} is unusable: {reason}")]
    BadMap {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> OverlayError + 'a {
    move |source| OverlayError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// One clone's overlay; see the module docs. Safe to share between threads.
#[derive(Debug)]
pub struct Overlay {
    dir: PathBuf,
    size: u64,
    blocks: u64,
    data: File,
    map: Mutex<Vec<u8>>,
    dirty: AtomicBool,
    /// Serialises flushes (two flushes writing the same temp file would race).
    flushing: Mutex<()>,
}

impl Overlay {
    /// Opens the overlay in `dir` for an image of `size` bytes, creating it if absent.
    pub fn open(dir: &Path, size: u64) -> Result<Overlay, OverlayError> {
        std::fs::create_dir_all(dir).map_err(io_err("create overlay dir", dir))?;
        let blocks = size.div_ceil(BLOCK);
        let data_path = dir.join("overlay.data");
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&data_path)
            .map_err(io_err("open overlay data", &data_path))?;
        data.set_len(size)
            .map_err(io_err("size overlay data", &data_path))?;
        let map_len = blocks.div_ceil(4) as usize;
        let map_path = dir.join("overlay.map");
        let map = match std::fs::read(&map_path) {
            Ok(bytes) => {
                decode_map(&bytes, size, map_len).map_err(|reason| OverlayError::BadMap {
                    path: map_path.clone(),
                    reason,
                })?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => vec![0u8; map_len],
            Err(e) => return Err(io_err("read overlay map", &map_path)(e)),
        };
        Ok(Overlay {
            dir: dir.to_path_buf(),
            size,
            blocks,
            data,
            map: Mutex::new(map),
            dirty: AtomicBool::new(false),
            flushing: Mutex::new(()),
        })
    }

    /// The image size.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn lock_map(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        // A poisoned lock means a thread panicked between two bit updates; the bits are still valid.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The source of block `b`.
    pub fn state(&self, b: u64) -> Source {
        let m = self.lock_map();
        get_bits(&m, b)
    }

    /// Blocks written or zeroed (not falling through to the base).
    pub fn overlaid_blocks(&self) -> u64 {
        let m = self.lock_map();
        (0..self.blocks)
            .filter(|&b| get_bits(&m, b) != Source::Base)
            .count() as u64
    }

    /// Splits `[offset, offset+len)` into runs of one source each: `(source, offset, len)`.
    pub fn segments(&self, offset: u64, len: u64) -> Vec<(Source, u64, u64)> {
        let mut out: Vec<(Source, u64, u64)> = Vec::new();
        if len == 0 {
            return out;
        }
        let end = offset + len;
        let m = self.lock_map();
        let mut pos = offset;
        while pos < end {
            let b = pos / BLOCK;
            let next = ((b + 1) * BLOCK).min(end);
            let s = get_bits(&m, b);
            match out.last_mut() {
                Some((last, _, l)) if *last == s => *l += next - pos,
                _ => out.push((s, pos, next - pos)),
            }
            pos = next;
        }
        out
    }

    /// Reads overlay data at `offset` (blocks in state [`Source::Data`]).
    pub fn read_data(&self, offset: u64, buf: &mut [u8]) -> Result<(), OverlayError> {
        self.data
            .read_exact_at(buf, offset)
            .map_err(io_err("read overlay data", &self.dir))
    }

    /// Writes whole blocks starting at block-aligned `offset` (the last may end at the image end),
    /// then marks them [`Source::Data`].
    pub fn write_blocks(&self, offset: u64, data: &[u8]) -> Result<(), OverlayError> {
        debug_assert!(offset % BLOCK == 0);
        self.data
            .write_all_at(data, offset)
            .map_err(io_err("write overlay data", &self.dir))?;
        let first = offset / BLOCK;
        let count = (data.len() as u64).div_ceil(BLOCK);
        self.mark(first, count, Source::Data);
        Ok(())
    }

    /// Makes blocks `first..first+count` read as zeros (punching a hole in the data file).
    pub fn zero_blocks(&self, first: u64, count: u64) -> Result<(), OverlayError> {
        if count == 0 {
            return Ok(());
        }
        let off = first * BLOCK;
        let len = (count * BLOCK).min(self.size - off);
        // Punching is an optimisation (space); the map decides what reads see.
        let _ = rustix::fs::fallocate(
            &self.data,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            off,
            len,
        );
        self.mark(first, count, Source::Zero);
        Ok(())
    }

    fn mark(&self, first: u64, count: u64, s: Source) {
        let mut m = self.lock_map();
        for b in first..(first + count).min(self.blocks) {
            set_bits(&mut m, b, s);
        }
        self.dirty.store(true, Ordering::Release);
    }

    /// Makes every completed write durable; see the module docs for the order.
    pub fn flush(&self) -> Result<(), OverlayError> {
        let _one = self.flushing.lock().unwrap_or_else(|p| p.into_inner());
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let snapshot = self.lock_map().clone();
        let result = (|| {
            self.data
                .sync_data()
                .map_err(io_err("fsync overlay data", &self.dir))?;
            let bytes = encode_map(&snapshot, self.size);
            let tmp = self.dir.join("overlay.map.tmp");
            let path = self.dir.join("overlay.map");
            let mut f = File::create(&tmp).map_err(io_err("create overlay map", &tmp))?;
            f.write_all(&bytes)
                .map_err(io_err("write overlay map", &tmp))?;
            f.sync_all().map_err(io_err("fsync overlay map", &tmp))?;
            std::fs::rename(&tmp, &path).map_err(io_err("commit overlay map", &path))?;
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err("fsync overlay dir", &self.dir))
        })();
        if result.is_err() {
            // Not durable: the next flush must try again.
            self.dirty.store(true, Ordering::Release);
        }
        result
    }
}

fn get_bits(m: &[u8], b: u64) -> Source {
    let byte = m.get((b / 4) as usize).copied().unwrap_or(0);
    Source::from_bits(byte >> ((b % 4) * 2))
}

fn set_bits(m: &mut [u8], b: u64, s: Source) {
    if let Some(byte) = m.get_mut((b / 4) as usize) {
        let shift = (b % 4) * 2;
        *byte = (*byte & !(3 << shift)) | (s.bits() << shift);
    }
}

fn encode_map(map: &[u8], size: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + map.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&size.to_le_bytes());
    out.extend_from_slice(&(BLOCK as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(blake3::hash(map).as_bytes());
    out.extend_from_slice(map);
    out
}

fn decode_map(bytes: &[u8], size: u64, map_len: usize) -> Result<Vec<u8>, String> {
    if bytes.len() != HEADER_LEN + map_len || &bytes[..16] != MAGIC {
        return Err(format!(
            "not an overlay map for a {size}-byte image ({} bytes)",
            bytes.len()
        ));
    }
    let stored_size = u64::from_le_bytes(bytes[16..24].try_into().unwrap_or([0; 8]));
    let block = u32::from_le_bytes(bytes[24..28].try_into().unwrap_or([0; 4]));
    if stored_size != size || u64::from(block) != BLOCK {
        return Err(format!(
            "made for a {stored_size}-byte image with {block}-byte blocks"
        ));
    }
    let map = &bytes[HEADER_LEN..];
    if blake3::hash(map).as_bytes() != &bytes[32..64] {
        return Err("checksum mismatch (damaged file)".into());
    }
    Ok(map.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_zeroes_segments_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let size = 10 * BLOCK + 100;
        let o = Overlay::open(dir.path(), size).unwrap();
        assert_eq!(o.segments(0, size), vec![(Source::Base, 0, size)]);
        o.write_blocks(BLOCK, &vec![7u8; 2 * BLOCK as usize])
            .unwrap();
        o.write_blocks(10 * BLOCK, &[9u8; 100]).unwrap();
        o.zero_blocks(5, 2).unwrap();
        assert_eq!(
            o.segments(100, 8 * BLOCK),
            vec![
                (Source::Base, 100, BLOCK - 100),
                (Source::Data, BLOCK, 2 * BLOCK),
                (Source::Base, 3 * BLOCK, 2 * BLOCK),
                (Source::Zero, 5 * BLOCK, 2 * BLOCK),
                (Source::Base, 7 * BLOCK, 100 + BLOCK),
            ]
        );
        let mut b = [0u8; 4];
        o.read_data(BLOCK + 10, &mut b).unwrap();
        assert_eq!(b, [7; 4]);
        // Unflushed writes are not in a reopened overlay; flushed ones are.
        drop(o);
        let o = Overlay::open(dir.path(), size).unwrap();
        assert_eq!(o.overlaid_blocks(), 0);
        o.write_blocks(BLOCK, &vec![7u8; BLOCK as usize]).unwrap();
        o.write_blocks(10 * BLOCK, &[9u8; 100]).unwrap();
        o.flush().unwrap();
        drop(o);
        let o = Overlay::open(dir.path(), size).unwrap();
        assert_eq!(o.state(1), Source::Data);
        assert_eq!(o.state(10), Source::Data);
        assert_eq!(o.overlaid_blocks(), 2);
        let mut b = [0u8; 100];
        o.read_data(10 * BLOCK, &mut b).unwrap();
        assert_eq!(b, [9; 100]);
        // Wrong size or damage is refused.
        drop(o);
        assert!(matches!(
            Overlay::open(dir.path(), size + BLOCK),
            Err(OverlayError::BadMap { .. })
        ));
        let p = dir.path().join("overlay.map");
        let mut bytes = std::fs::read(&p).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        std::fs::write(&p, bytes).unwrap();
        assert!(matches!(
            Overlay::open(dir.path(), size),
            Err(OverlayError::BadMap { .. })
        ));
    }
}
