//! Which chunks of an image a peer holds.
//!
//! [`ChunkBitmap`] is the in-memory form: one bit per chunk index, with a cached population count.
//! [`ChunkSet`] is the wire form: whichever of a raw bitmap or a run-length list is smaller, chosen by
//! [`ChunkBitmap::to_wire`]. A sparse or nearly complete image costs a handful of bytes instead of
//! one bit per chunk. Decoding a `ChunkSet` validates it fully ([`ChunkBitmap::from_wire`]): a hostile
//! peer cannot make us allocate past the image's chunk count or smuggle bits past its end.

use bincode::{Decode, Encode};

/// Errors from turning a wire [`ChunkSet`] into a bitmap for an image of a known chunk count.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkSetError {
    /// The set claims a different chunk count than the image has.
    #[error("chunk set is for {got} chunks, image has {expected}")]
    CountMismatch {
        /// Chunk count of the image.
        expected: u32,
        /// Chunk count the set claims.
        got: u32,
    },
    /// A raw bitmap has the wrong number of bytes for its chunk count.
    #[error("bitmap of {got} bytes for {count} chunks (expected {expected})")]
    BitmapLength {
        /// Chunk count.
        count: u32,
        /// Expected byte length, `ceil(count / 8)`.
        expected: usize,
        /// Byte length received.
        got: usize,
    },
    /// A raw bitmap sets bits at or past its chunk count.
    #[error("bitmap sets bits past chunk {count}")]
    TrailingBits {
        /// Chunk count.
        count: u32,
    },
    /// A run is empty, out of order, overlapping, or runs past the chunk count.
    #[error("run {index} ({start}+{len}) is empty, unsorted, overlapping or past chunk {count}")]
    BadRun {
        /// Position of the run in the list.
        index: usize,
        /// First chunk of the run.
        start: u32,
        /// Length of the run.
        len: u32,
        /// Chunk count.
        count: u32,
    },
}

/// A set of chunk indices `0..len`, one bit each.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct ChunkBitmap {
    words: Vec<u64>,
    len: u32,
    ones: u32,
}

impl std::fmt::Debug for ChunkBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChunkBitmap({}/{})", self.ones, self.len)
    }
}

impl ChunkBitmap {
    /// An empty set over `len` chunks.
    pub fn new(len: u32) -> Self {
        ChunkBitmap {
            words: vec![0; (len as usize).div_ceil(64)],
            len,
            ones: 0,
        }
    }

    /// A full set over `len` chunks.
    pub fn full(len: u32) -> Self {
        let mut b = ChunkBitmap {
            words: vec![u64::MAX; (len as usize).div_ceil(64)],
            len,
            ones: len,
        };
        b.clear_tail();
        b
    }

    fn clear_tail(&mut self) {
        let rem = self.len % 64;
        if rem != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << rem) - 1;
            }
        }
    }

    /// Number of chunk indices the set ranges over.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Whether the set ranges over zero chunks.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of indices in the set.
    pub fn count(&self) -> u32 {
        self.ones
    }

    /// Whether every index `0..len` is in the set.
    pub fn is_full(&self) -> bool {
        self.ones == self.len
    }

    /// Whether `index` is in the set (false for indices past the end).
    pub fn contains(&self, index: u32) -> bool {
        index < self.len && self.words[(index / 64) as usize] & (1 << (index % 64)) != 0
    }

    /// Adds `index`; returns whether it was newly added. Indices past the end are ignored.
    pub fn insert(&mut self, index: u32) -> bool {
        if index >= self.len {
            return false;
        }
        let w = &mut self.words[(index / 64) as usize];
        let bit = 1 << (index % 64);
        let new = *w & bit == 0;
        *w |= bit;
        self.ones += u32::from(new);
        new
    }

    /// Removes `index`; returns whether it was present.
    pub fn remove(&mut self, index: u32) -> bool {
        if index >= self.len {
            return false;
        }
        let w = &mut self.words[(index / 64) as usize];
        let bit = 1 << (index % 64);
        let had = *w & bit != 0;
        *w &= !bit;
        self.ones -= u32::from(had);
        had
    }

    /// The indices in the set, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            let base = wi as u32 * 64;
            BitIter(w).map(move |b| base + b)
        })
    }

    /// The indices in both `self` and `other`, ascending (over the shorter range).
    pub fn iter_and<'a>(&'a self, other: &'a ChunkBitmap) -> impl Iterator<Item = u32> + 'a {
        self.words
            .iter()
            .zip(&other.words)
            .enumerate()
            .flat_map(|(wi, (&a, &b))| {
                let base = wi as u32 * 64;
                BitIter(a & b).map(move |bit| base + bit)
            })
    }

    /// Maximal runs of consecutive indices, as `(start, len)`, ascending.
    pub fn runs(&self) -> Vec<(u32, u32)> {
        let mut runs: Vec<(u32, u32)> = Vec::new();
        for i in self.iter() {
            match runs.last_mut() {
                Some((s, l)) if *s + *l == i => *l += 1,
                _ => runs.push((i, 1)),
            }
        }
        runs
    }

    /// The compact wire form: a run list when that is smaller than the raw bitmap.
    pub fn to_wire(&self) -> ChunkSet {
        let bitmap_bytes = (self.len as usize).div_ceil(8);
        let runs = self.runs();
        // A run costs at most 10 bytes under bincode's varint encoding (two u32); usually 2-6.
        if runs.len() * 6 < bitmap_bytes {
            ChunkSet::Runs {
                count: self.len,
                runs,
            }
        } else {
            let mut bytes = Vec::with_capacity(bitmap_bytes);
            for w in &self.words {
                bytes.extend_from_slice(&w.to_le_bytes());
            }
            bytes.truncate(bitmap_bytes);
            ChunkSet::Bitmap {
                count: self.len,
                bytes,
            }
        }
    }

    /// Validates a wire set against an image of `expected_count` chunks.
    pub fn from_wire(set: &ChunkSet, expected_count: u32) -> Result<ChunkBitmap, ChunkSetError> {
        if set.count() != expected_count {
            return Err(ChunkSetError::CountMismatch {
                expected: expected_count,
                got: set.count(),
            });
        }
        set.check_bitmap_length()?;
        let mut out = ChunkBitmap::new(expected_count);
        match set {
            ChunkSet::Bitmap { count, bytes } => {
                for (w, chunk) in out.words.iter_mut().zip(bytes.chunks(8)) {
                    let mut buf = [0u8; 8];
                    buf[..chunk.len()].copy_from_slice(chunk);
                    *w = u64::from_le_bytes(buf);
                }
                let before: u32 = out.words.iter().map(|w| w.count_ones()).sum();
                out.clear_tail();
                let ones: u32 = out.words.iter().map(|w| w.count_ones()).sum();
                if ones != before {
                    return Err(ChunkSetError::TrailingBits { count: *count });
                }
                out.ones = ones;
            }
            ChunkSet::Runs { count, runs } => {
                let mut next_free = 0u64;
                for (index, &(start, len)) in runs.iter().enumerate() {
                    let end = u64::from(start) + u64::from(len);
                    if len == 0 || u64::from(start) < next_free || end > u64::from(*count) {
                        return Err(ChunkSetError::BadRun {
                            index,
                            start,
                            len,
                            count: *count,
                        });
                    }
                    // Adjacent runs are tolerated (not maximal but unambiguous).
                    next_free = end;
                    for i in start..start + len {
                        out.insert(i);
                    }
                }
            }
        }
        Ok(out)
    }
}

struct BitIter(u64);

impl Iterator for BitIter {
    type Item = u32;
    fn next(&mut self) -> Option<u32> {
        if self.0 == 0 {
            return None;
        }
        let b = self.0.trailing_zeros();
        self.0 &= self.0 - 1;
        Some(b)
    }
}

/// Wire form of a set of chunk indices of one image.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum ChunkSet {
    /// One bit per chunk, little-endian within each byte (bit `i` is `bytes[i/8] >> (i%8) & 1`).
    Bitmap {
        /// Number of chunks in the image.
        count: u32,
        /// `ceil(count / 8)` bytes; bits at or past `count` must be zero.
        bytes: Vec<u8>,
    },
    /// Sorted, non-overlapping, non-empty runs `(start, len)`.
    Runs {
        /// Number of chunks in the image.
        count: u32,
        /// The runs.
        runs: Vec<(u32, u32)>,
    },
}

impl ChunkSet {
    /// Checks that a raw bitmap has exactly `ceil(count / 8)` bytes (run lists pass).
    pub fn check_bitmap_length(&self) -> Result<(), ChunkSetError> {
        if let ChunkSet::Bitmap { count, bytes } = self {
            let expected = (*count as usize).div_ceil(8);
            if bytes.len() != expected {
                return Err(ChunkSetError::BitmapLength {
                    count: *count,
                    expected,
                    got: bytes.len(),
                });
            }
        }
        Ok(())
    }

    /// The chunk count the set claims to range over.
    pub fn count(&self) -> u32 {
        match self {
            ChunkSet::Bitmap { count, .. } | ChunkSet::Runs { count, .. } => *count,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn insert_remove_count() {
        let mut b = ChunkBitmap::new(130);
        assert!(b.insert(0));
        assert!(!b.insert(0));
        assert!(b.insert(129));
        assert!(!b.insert(130), "past the end is ignored");
        assert_eq!(b.count(), 2);
        assert!(b.contains(129) && !b.contains(128) && !b.contains(1000));
        assert!(b.remove(0));
        assert!(!b.remove(0));
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![129]);
        let f = ChunkBitmap::full(130);
        assert!(f.is_full());
        assert_eq!(f.iter().count(), 130);
    }

    #[test]
    fn full_set_is_a_single_run() {
        let f = ChunkBitmap::full(100_000);
        let w = f.to_wire();
        assert!(matches!(&w, ChunkSet::Runs { runs, .. } if runs == &[(0, 100_000)]));
        assert_eq!(ChunkBitmap::from_wire(&w, 100_000).unwrap(), f);
    }

    #[test]
    fn rejects_hostile_sets() {
        let bad_count = ChunkSet::Runs {
            count: 10,
            runs: vec![],
        };
        assert!(matches!(
            ChunkBitmap::from_wire(&bad_count, 11),
            Err(ChunkSetError::CountMismatch { .. })
        ));
        let short = ChunkSet::Bitmap {
            count: 20,
            bytes: vec![0xff, 0xff],
        };
        assert!(matches!(
            ChunkBitmap::from_wire(&short, 20),
            Err(ChunkSetError::BitmapLength { .. })
        ));
        let trailing = ChunkSet::Bitmap {
            count: 12,
            bytes: vec![0xff, 0xff],
        };
        assert_eq!(
            ChunkBitmap::from_wire(&trailing, 12),
            Err(ChunkSetError::TrailingBits { count: 12 })
        );
        for runs in [
            vec![(0, 0)],
            vec![(5, 3), (6, 1)],
            vec![(5, 3), (1, 1)],
            vec![(9, 2)],
            vec![(u32::MAX, u32::MAX)],
        ] {
            let set = ChunkSet::Runs { count: 10, runs };
            assert!(
                matches!(
                    ChunkBitmap::from_wire(&set, 10),
                    Err(ChunkSetError::BadRun { .. })
                ),
                "{set:?}"
            );
        }
    }

    proptest! {
        #[test]
        fn wire_round_trip(len in 0u32..2000, seed in proptest::collection::vec(any::<u32>(), 0..300)) {
            let mut b = ChunkBitmap::new(len);
            for s in seed {
                if len > 0 {
                    // Mix sparse points and runs.
                    let start = s % len;
                    let run = (s >> 20) % 16;
                    for i in start..(start + run + 1).min(len) {
                        b.insert(i);
                    }
                }
            }
            let w = b.to_wire();
            let back = ChunkBitmap::from_wire(&w, len).unwrap();
            prop_assert_eq!(&back, &b);
            prop_assert_eq!(back.count() as usize, b.iter().count());
        }
    }
}
