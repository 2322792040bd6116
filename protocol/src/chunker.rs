//! Turning a byte stream into chunks and a manifest, in constant memory.
//!
//! A [`Chunker`] reads any [`std::io::Read`] one fixed-size chunk at a time into a single reused
//! buffer, hashes each chunk, and remembers only the chunk ids; [`Chunker::finish`] turns those into a
//! validated [`Manifest`]. Memory is one chunk buffer plus 32 bytes per chunk, whatever the image
//! size.
//!
//! This module decides how an image is cut (fixed-size chunks, every chunk full except possibly the
//! last), how short reads and `Interrupted` errors are absorbed, and how all-zero chunks are
//! recognised: a word-wise scan of the buffer, then the precomputed zero id for that length instead
//! of hashing ([`crate::manifest::zero_chunk_id`]). Non-zero chunks are hashed with BLAKE3 on the
//! calling thread (SIMD, no threads).
//!
//! It leaves to others where the bytes come from (a file, a block device, a socket: the caller's
//! `Read`), what happens to each chunk (the caller stores or uploads the [`ChunkView`] it is lent),
//! and the manifest's rules ([`crate::manifest`]).

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read};

use crate::ids::{ChunkId, ImageId};
use crate::manifest::{self, MAX_CHUNKS, Manifest, ManifestError, ZeroIds};

/// Errors from chunking an image.
#[derive(Debug, thiserror::Error)]
pub enum ChunkerError {
    /// Reading the input failed (other than `Interrupted`, which is retried). The chunker keeps the
    /// bytes read so far: calling [`Chunker::next_chunk`] again resumes the read.
    #[error("reading the image failed at byte {offset}")]
    Io {
        /// Image offset the failed read would have filled.
        offset: u64,
        /// The reader's error.
        #[source]
        source: io::Error,
    },
    /// The chunk size is not allowed by the manifest format.
    #[error("bad chunk size: {0}")]
    ChunkSize(ManifestError),
    /// The input has more chunks than a manifest can list.
    #[error(
        "image exceeds {max_chunks} chunks of {chunk_size} bytes ({max_bytes} bytes); use a larger chunk size"
    )]
    ImageTooLarge {
        /// The chunk size in use.
        chunk_size: u32,
        /// [`MAX_CHUNKS`].
        max_chunks: u32,
        /// The largest image at this chunk size.
        max_bytes: u64,
    },
    /// [`Chunker::finish`] was called before the input was used up.
    #[error("input continues past byte {offset}; chunk it to the end before finishing")]
    NotAtEnd {
        /// Bytes chunked so far.
        offset: u64,
    },
    /// The chunks and the given name or metadata do not make a valid manifest.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

/// One chunk, lent from the chunker's buffer until the next call to [`Chunker::next_chunk`].
#[derive(Clone, Copy)]
pub struct ChunkView<'a> {
    /// Chunk index in the image.
    pub index: u32,
    /// Image offset of the chunk's first byte.
    pub offset: u64,
    /// BLAKE3 of `data`.
    pub id: ChunkId,
    /// The chunk's bytes: `chunk_size` of them, fewer only for the last chunk.
    pub data: &'a [u8],
    /// Whether every byte is zero (such a chunk need not be stored or sent).
    pub is_zero: bool,
}

impl fmt::Debug for ChunkView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkView")
            .field("index", &self.index)
            .field("offset", &self.offset)
            .field("id", &self.id)
            .field("len", &self.data.len())
            .field("is_zero", &self.is_zero)
            .finish()
    }
}

/// Running totals of a chunking pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChunkStats {
    /// Chunks produced.
    pub chunks: u32,
    /// Of those, all-zero chunks.
    pub zero_chunks: u32,
    /// Bytes read (the image size once finished).
    pub bytes: u64,
    /// Bytes in all-zero chunks.
    pub zero_bytes: u64,
}

/// A streaming chunker over a reader. See the module docs.
///
/// ```
/// use std::collections::BTreeMap;
/// use vmswarm_protocol::chunker::Chunker;
/// use vmswarm_protocol::manifest::MIN_CHUNK_SIZE;
///
/// let image = vec![7u8; 100_000];
/// let mut chunker = Chunker::new(&image[..], MIN_CHUNK_SIZE)?;
/// while let Some(chunk) = chunker.next_chunk()? {
///     // Store `chunk.data` under `chunk.id` here (a zero chunk needs no storing).
///     assert!(chunk.id.verify(chunk.data));
/// }
/// let manifest = chunker.finish("example".into(), None, BTreeMap::new())?;
/// assert_eq!(manifest.chunk_count(), 2);
/// assert_eq!(manifest.chunk_len(1), Some(100_000 - MIN_CHUNK_SIZE));
/// # Ok::<(), vmswarm_protocol::chunker::ChunkerError>(())
/// ```
pub struct Chunker<R> {
    reader: R,
    chunk_size: u32,
    /// The one chunk buffer, `chunk_size` long, reused for every chunk.
    buf: Box<[u8]>,
    /// Bytes of the next chunk already in `buf`.
    filled: usize,
    /// The reader has reported end of input.
    at_eof: bool,
    chunks: Vec<ChunkId>,
    zeros: ZeroIds,
    stats: ChunkStats,
    max_chunks: u32,
}

impl<R> fmt::Debug for Chunker<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chunker")
            .field("chunk_size", &self.chunk_size)
            .field("filled", &self.filled)
            .field("at_eof", &self.at_eof)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl<R: Read> Chunker<R> {
    /// A chunker cutting `reader` into chunks of `chunk_size` bytes, which must be a power of two in
    /// `[MIN_CHUNK_SIZE, MAX_CHUNK_SIZE]`. Allocates the chunk buffer.
    pub fn new(reader: R, chunk_size: u32) -> Result<Self, ChunkerError> {
        manifest::check_chunk_size(chunk_size).map_err(ChunkerError::ChunkSize)?;
        Ok(Chunker {
            reader,
            chunk_size,
            buf: vec![0; chunk_size as usize].into_boxed_slice(),
            filled: 0,
            at_eof: false,
            chunks: Vec::new(),
            zeros: ZeroIds::new(chunk_size, 0),
            stats: ChunkStats::default(),
            max_chunks: MAX_CHUNKS,
        })
    }

    /// The next chunk, or `None` once the input is used up. Reads until the chunk is full or the
    /// input ends, so only the last chunk can be short.
    pub fn next_chunk(&mut self) -> Result<Option<ChunkView<'_>>, ChunkerError> {
        if self.at_eof && self.filled == 0 {
            return Ok(None);
        }
        self.fill()?;
        if self.filled == 0 {
            return Ok(None);
        }
        if self.stats.chunks >= self.max_chunks {
            return Err(ChunkerError::ImageTooLarge {
                chunk_size: self.chunk_size,
                max_chunks: self.max_chunks,
                max_bytes: u64::from(self.max_chunks) * u64::from(self.chunk_size),
            });
        }
        let len = self.filled;
        self.filled = 0;
        let data = &self.buf[..len];
        // `len` is at most `chunk_size`, a u32.
        let len32 = len as u32;
        let is_zero = is_all_zero(data);
        let id = if is_zero {
            self.zeros.get(len32)
        } else {
            ChunkId::of(data)
        };
        let view = ChunkView {
            index: self.stats.chunks,
            offset: self.stats.bytes,
            id,
            data,
            is_zero,
        };
        self.chunks.push(id);
        self.stats.chunks += 1;
        self.stats.bytes += len as u64;
        if is_zero {
            self.stats.zero_chunks += 1;
            self.stats.zero_bytes += len as u64;
        }
        Ok(Some(view))
    }

    /// Reads into `buf` until it is full or the reader reports end of input.
    fn fill(&mut self) -> Result<(), ChunkerError> {
        while self.filled < self.buf.len() && !self.at_eof {
            match self.reader.read(&mut self.buf[self.filled..]) {
                Ok(0) => self.at_eof = true,
                // `min` guards against a reader claiming more bytes than it was given room for.
                Ok(n) => self.filled = (self.filled + n).min(self.buf.len()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(ChunkerError::Io {
                        offset: self.stats.bytes + self.filled as u64,
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// Totals so far.
    pub fn stats(&self) -> ChunkStats {
        self.stats
    }

    /// The chunk size in use.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// The manifest of the chunked image. The input must be used up: if the last chunk returned was
    /// full, this reads once more to make sure the input ends there ([`ChunkerError::NotAtEnd`] if
    /// not).
    pub fn finish(
        mut self,
        name: String,
        parent: Option<ImageId>,
        metadata: BTreeMap<String, String>,
    ) -> Result<Manifest, ChunkerError> {
        self.fill()?;
        if self.filled > 0 {
            return Err(ChunkerError::NotAtEnd {
                offset: self.stats.bytes,
            });
        }
        Ok(Manifest::new(
            self.stats.bytes,
            self.chunk_size,
            self.chunks,
            name,
            parent,
            metadata,
        )?)
    }
}

/// Chunks all of `reader` and returns the manifest and the totals, discarding the chunk bytes (only
/// the ids are kept). For computing an image id or stats; to store chunks too, drive a [`Chunker`].
pub fn chunk_all<R: Read>(
    reader: R,
    chunk_size: u32,
    name: String,
    parent: Option<ImageId>,
    metadata: BTreeMap<String, String>,
) -> Result<(Manifest, ChunkStats), ChunkerError> {
    let mut chunker = Chunker::new(reader, chunk_size)?;
    while chunker.next_chunk()?.is_some() {}
    let stats = chunker.stats();
    Ok((chunker.finish(name, parent, metadata)?, stats))
}

/// Whether every byte of `data` is zero. Scans 256-byte blocks with a branch-free OR reduction (which
/// the compiler vectorises) and stops at the first block with a non-zero byte.
pub fn is_all_zero(data: &[u8]) -> bool {
    const BLOCK: usize = 256;
    let blocks = data.chunks_exact(BLOCK);
    let rest = blocks.remainder();
    for block in blocks {
        if block.iter().fold(0u8, |acc, &b| acc | b) != 0 {
            return false;
        }
    }
    rest.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{MIN_CHUNK_SIZE, zero_chunk_id};
    use proptest::prelude::*;

    const CS: u32 = MIN_CHUNK_SIZE;
    const C: usize = CS as usize;

    /// Deterministic non-zero, non-periodic bytes (xorshift).
    fn data(len: usize, seed: u8) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(seed);
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8 | 1
            })
            .collect()
    }

    /// An owned copy of a [`ChunkView`].
    #[derive(Debug, PartialEq)]
    struct Seen {
        index: u32,
        offset: u64,
        id: ChunkId,
        data: Vec<u8>,
        is_zero: bool,
    }

    /// Chunks `reader`, returning a copy of every chunk and the manifest.
    fn run<R: Read>(reader: R, chunk_size: u32) -> (Vec<Seen>, Manifest) {
        let mut chunker = Chunker::new(reader, chunk_size).unwrap();
        let mut out = Vec::new();
        while let Some(c) = chunker.next_chunk().unwrap() {
            out.push(Seen {
                index: c.index,
                offset: c.offset,
                id: c.id,
                data: c.data.to_vec(),
                is_zero: c.is_zero,
            });
        }
        assert!(chunker.next_chunk().unwrap().is_none(), "None is sticky");
        let m = chunker.finish("img".into(), None, BTreeMap::new()).unwrap();
        (out, m)
    }

    fn check_consistent(input: &[u8], chunks: &[Seen], m: &Manifest) {
        assert_eq!(m.image_size, input.len() as u64);
        assert_eq!(m.chunks.len(), chunks.len());
        let mut joined = Vec::new();
        for (i, seen) in chunks.iter().enumerate() {
            let Seen {
                index,
                offset,
                id,
                data: bytes,
                is_zero,
            } = seen;
            assert_eq!(*index as usize, i);
            assert_eq!(*offset, joined.len() as u64);
            assert_eq!(
                m.chunk_range(*index),
                Some(*offset..*offset + bytes.len() as u64)
            );
            assert!(id.verify(bytes));
            assert_eq!(m.chunks[i], *id);
            assert_eq!(*is_zero, bytes.iter().all(|&b| b == 0));
            joined.extend_from_slice(bytes);
        }
        assert_eq!(joined, input);
        assert_eq!(m.validate(), Ok(()));
    }

    #[test]
    fn empty_input() {
        let (chunks, m) = run(&[][..], CS);
        assert!(chunks.is_empty());
        assert_eq!(m.image_size, 0);
        assert_eq!(m.chunk_count(), 0);
        assert_eq!(m.chunk_size, CS);
    }

    #[test]
    fn exact_multiple_of_chunk_size() {
        let input = data(3 * C, 5);
        let (chunks, m) = run(&input[..], CS);
        assert_eq!(chunks.len(), 3);
        assert!(chunks.iter().all(|c| c.data.len() == C));
        check_consistent(&input, &chunks, &m);
    }

    #[test]
    fn short_last_chunk() {
        let input = data(2 * C + 17, 9);
        let (chunks, m) = run(&input[..], CS);
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks[2].data.len(), 17);
        assert_eq!(m.chunk_len(2), Some(17));
        check_consistent(&input, &chunks, &m);
    }

    /// Returns at most one byte per read and `Interrupted` before every other read.
    struct Trickle<'a> {
        data: &'a [u8],
        interrupt: bool,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.interrupt = !self.interrupt;
            if self.interrupt {
                return Err(io::ErrorKind::Interrupted.into());
            }
            let Some((&first, rest)) = self.data.split_first() else {
                return Ok(0);
            };
            if buf.is_empty() {
                return Ok(0);
            }
            buf[0] = first;
            self.data = rest;
            Ok(1)
        }
    }

    #[test]
    fn trickling_interrupted_reader_gives_identical_results() {
        let mut input = data(2 * C + 1000, 3);
        input[C..2 * C].fill(0);
        let (a, ma) = run(&input[..], CS);
        let (b, mb) = run(
            Trickle {
                data: &input,
                interrupt: false,
            },
            CS,
        );
        assert_eq!(a, b);
        assert_eq!(ma, mb);
        assert_eq!(ma.id(), mb.id());
        check_consistent(&input, &b, &mb);
    }

    #[test]
    fn zero_chunks_detected_full_and_tail() {
        let mut input = vec![0u8; 3 * C + 4321];
        input[C + 5] = 1; // chunk 1 is not zero
        let (chunks, m) = run(&input[..], CS);
        let zero: Vec<bool> = chunks.iter().map(|c| c.is_zero).collect();
        assert_eq!(zero, vec![true, false, true, true]);
        let full = ChunkId::of(&vec![0; C]);
        let tail = ChunkId::of(&[0; 4321]);
        assert_eq!(chunks[0].id, full);
        assert_eq!(chunks[2].id, full);
        assert_eq!(chunks[3].id, tail);
        assert_eq!(zero_chunk_id(4321), tail);
        assert_eq!(m.zero_map().iter().collect::<Vec<_>>(), vec![0, 2, 3]);
        check_consistent(&input, &chunks, &m);

        let (_, stats) = chunk_all(&input[..], CS, "z".into(), None, BTreeMap::new()).unwrap();
        assert_eq!(
            stats,
            ChunkStats {
                chunks: 4,
                zero_chunks: 3,
                bytes: input.len() as u64,
                zero_bytes: input.len() as u64 - C as u64,
            }
        );
    }

    #[test]
    fn is_all_zero_finds_any_byte() {
        for len in [0, 1, 255, 256, 257, 1000, 4096] {
            assert!(is_all_zero(&vec![0; len]));
            for at in [0, len / 2, len.saturating_sub(1)] {
                if len > 0 {
                    let mut v = vec![0; len];
                    v[at] = 0x80;
                    assert!(!is_all_zero(&v), "{len} {at}");
                }
            }
        }
    }

    /// Fails once with `kind` after `ok` bytes, then serves the rest.
    struct Failing<'a> {
        data: &'a [u8],
        ok: usize,
        kind: io::ErrorKind,
        failed: bool,
    }

    impl Read for Failing<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if !self.failed && self.ok == 0 {
                self.failed = true;
                return Err(io::Error::new(self.kind, "disk on fire"));
            }
            let limit = if self.failed { usize::MAX } else { self.ok };
            let n = buf.len().min(self.data.len()).min(limit);
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            if !self.failed {
                self.ok -= n;
            }
            Ok(n)
        }
    }

    #[test]
    fn reader_errors_propagate_and_reads_resume() {
        let input = data(2 * C + 10, 1);
        let mut chunker = Chunker::new(
            Failing {
                data: &input,
                ok: C + 100,
                kind: io::ErrorKind::Other,
                failed: false,
            },
            CS,
        )
        .unwrap();
        assert!(chunker.next_chunk().unwrap().is_some());
        let err = chunker.next_chunk().unwrap_err();
        match &err {
            ChunkerError::Io { offset, source } => {
                assert_eq!(*offset, C as u64 + 100);
                assert_eq!(source.to_string(), "disk on fire");
            }
            other => panic!("{other:?}"),
        }
        assert!(std::error::Error::source(&err).is_some());
        // The bytes read before the error are kept; the retry completes the chunk.
        let mut rest = Vec::new();
        while let Some(c) = chunker.next_chunk().unwrap() {
            rest.push((c.offset, c.data.to_vec()));
        }
        assert_eq!(rest.len(), 2);
        assert_eq!(rest[0].1, &input[C..2 * C]);
        let m = chunker.finish("img".into(), None, BTreeMap::new()).unwrap();
        let (_, expected) = run(&input[..], CS);
        assert_eq!(m, expected);
        assert_eq!(m.unique_chunks(), 3);
    }

    #[test]
    fn bad_chunk_sizes_are_refused() {
        for cs in [
            0,
            1000,
            MIN_CHUNK_SIZE / 2,
            3 * MIN_CHUNK_SIZE,
            32 * 1024 * 1024,
        ] {
            assert!(
                matches!(Chunker::new(&[][..], cs), Err(ChunkerError::ChunkSize(_))),
                "{cs}"
            );
        }
    }

    #[test]
    fn finish_checks_the_end_and_the_manifest() {
        let input = data(2 * C, 7);
        // Stopped after a full chunk with more input behind it.
        let mut chunker = Chunker::new(&input[..], CS).unwrap();
        chunker.next_chunk().unwrap();
        assert!(matches!(
            chunker.finish("a".into(), None, BTreeMap::new()),
            Err(ChunkerError::NotAtEnd { offset }) if offset == C as u64
        ));
        // Stopped after the last full chunk: finish confirms the end itself.
        let mut chunker = Chunker::new(&input[..], CS).unwrap();
        chunker.next_chunk().unwrap();
        chunker.next_chunk().unwrap();
        let m = chunker.finish("a".into(), None, BTreeMap::new()).unwrap();
        assert_eq!(m.chunk_count(), 2);
        // An invalid name.
        let chunker = Chunker::new(&input[..0], CS).unwrap();
        assert!(matches!(
            chunker.finish(String::new(), None, BTreeMap::new()),
            Err(ChunkerError::Manifest(ManifestError::NameEmpty))
        ));
    }

    #[test]
    fn too_many_chunks() {
        let input = vec![0u8; 3 * C + 1];
        let mut chunker = Chunker::new(&input[..], CS).unwrap();
        chunker.max_chunks = 3;
        for _ in 0..3 {
            chunker.next_chunk().unwrap();
        }
        assert!(matches!(
            chunker.next_chunk(),
            Err(ChunkerError::ImageTooLarge {
                chunk_size: CS,
                max_chunks: 3,
                max_bytes
            }) if max_bytes == 3 * C as u64
        ));
        // Exactly at the limit is fine.
        let mut chunker = Chunker::new(&input[..3 * C], CS).unwrap();
        chunker.max_chunks = 3;
        while chunker.next_chunk().unwrap().is_some() {}
        assert_eq!(chunker.stats().chunks, 3);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn chunks_reassemble_and_verify(
            shift in 0u32..3,
            len in 0usize..300 * 1024,
            seed in any::<u8>(),
            zero_runs in proptest::collection::vec((any::<prop::sample::Index>(), 0usize..200_000), 0..3),
        ) {
            let chunk_size = MIN_CHUNK_SIZE << shift;
            let mut input = data(len, seed);
            for (at, run_len) in zero_runs {
                if len > 0 {
                    let start = at.index(len);
                    let end = (start + run_len).min(len);
                    input[start..end].fill(0);
                }
            }
            let (chunks, m) = run(&input[..], chunk_size);
            prop_assert_eq!(chunks.len(), len.div_ceil(chunk_size as usize));
            check_consistent(&input, &chunks, &m);
            let zero_map: Vec<u32> = m.zero_map().iter().collect();
            let flagged: Vec<u32> = chunks.iter().filter(|c| c.is_zero).map(|c| c.index).collect();
            prop_assert_eq!(zero_map, flagged);
        }
    }
}
