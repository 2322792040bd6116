//! The image manifest: what an image is, its validation and its canonical encoding.
//!
//! A [`Manifest`] lists an image's size, its chunk size and the ordered [`ChunkId`]s of its chunks,
//! plus a name, an optional parent image and free-form metadata. It fully determines the image's
//! bytes. Its [`ImageId`] is the BLAKE3 hash of its *canonical encoding*: bincode 2 with the fixed
//! configuration [`CANONICAL_CONFIG`] (little-endian, fixed-width integers, lengths as `u64`).
//!
//! This module decides:
//! - the format limits ([`MIN_CHUNK_SIZE`], [`MAX_CHUNK_SIZE`], [`MAX_MANIFEST_BYTES`],
//!   [`MAX_CHUNKS`], name and metadata limits) and what makes a manifest valid ([`Manifest::validate`]);
//! - how a manifest is encoded and how untrusted bytes are decoded ([`Manifest::decode`]): size-capped
//!   before decoding, decoded with a byte limit so hostile length prefixes cannot make us allocate,
//!   no trailing bytes, valid, and canonical (re-encoding gives back exactly the input), so one image
//!   has exactly one encoding and one id;
//! - the chunk geometry: which byte range a chunk index covers and which chunks cover a byte range;
//! - which chunks are all-zero ("sparse") chunks, known without transfer ([`zero_chunk_id`],
//!   [`ZeroIds`], [`Manifest::zero_map`]).
//!
//! It leaves to others: producing a manifest from image bytes ([`crate::chunker`]), moving manifest
//! bytes between peers ([`crate::wire`], [`crate::codec`]; a frame must be able to carry
//! [`MAX_MANIFEST_BYTES`] plus its envelope), and storing chunks (the node).
//!
//! ## Canonical layout
//! With [`CANONICAL_CONFIG`], fields are encoded in declaration order:
//!
//! | field | bytes |
//! | --- | --- |
//! | `version` | 2 |
//! | `image_size` | 8 |
//! | `chunk_size` | 4 |
//! | `chunks` | 8 (count) + 32 per chunk |
//! | `name` | 8 (length) + UTF-8 bytes |
//! | `parent` | 1 (0 = none, 1 = some) + 32 if some |
//! | `metadata` | 8 (count) + per entry 8 + key bytes + 8 + value bytes, keys ascending |
//!
//! ## Chunk count bound
//! A manifest must fit in [`MAX_MANIFEST_BYTES`] (16 MiB), so the chunk count is bounded: everything
//! but the chunk ids takes at most [`MAX_OVERHEAD_BYTES`] = 271,686 bytes (fixed fields, a
//! 255-byte name, a parent, and 64 metadata entries of a 128-byte key and a 4096-byte value), which
//! leaves room for [`MAX_CHUNKS`] = (16,777,216 − 271,686) / 32 = **515,797** chunk ids. So any
//! valid manifest encodes to at most 16 MiB whatever its name and metadata. That caps an image at
//! about 31.5 GiB with 64 KiB chunks, 125.9 GiB with the default 256 KiB chunks, and 7.87 TiB with
//! 16 MiB chunks; [`chunk_size_for`] picks a chunk size for a given image size.

use std::collections::BTreeMap;
use std::ops::Range;

use bincode::config::{Configuration, Fixint, LittleEndian, NoLimit};
use bincode::{Decode, Encode};

use crate::bitfield::ChunkBitmap;
use crate::ids::{ChunkId, ImageId};

/// The manifest format version this crate writes and accepts.
pub const FORMAT_VERSION: u16 = 1;
/// Smallest allowed chunk size (64 KiB).
pub const MIN_CHUNK_SIZE: u32 = 64 * 1024;
/// Largest allowed chunk size (16 MiB).
pub const MAX_CHUNK_SIZE: u32 = 16 * 1024 * 1024;
/// Chunk size used unless the publisher picks another (256 KiB).
pub const DEFAULT_CHUNK_SIZE: u32 = 256 * 1024;
/// Largest canonical manifest encoding: a manifest must fit in one wire frame (16 MiB).
pub const MAX_MANIFEST_BYTES: usize = 16 * 1024 * 1024;
/// Longest image name, in UTF-8 bytes.
pub const MAX_NAME_BYTES: usize = 255;
/// Most metadata entries.
pub const MAX_METADATA_ENTRIES: usize = 64;
/// Longest metadata key, in UTF-8 bytes.
pub const MAX_METADATA_KEY_BYTES: usize = 128;
/// Longest metadata value, in UTF-8 bytes.
pub const MAX_METADATA_VALUE_BYTES: usize = 4096;

/// Encoded size of one chunk id.
const CHUNK_ID_BYTES: usize = 32;
/// Encoded size of a length prefix (a `u64` under fixed-int encoding).
const LEN_BYTES: usize = 8;

/// Largest canonical encoding of everything in a manifest except the chunk ids themselves.
pub const MAX_OVERHEAD_BYTES: usize = 2 // version
    + 8 // image_size
    + 4 // chunk_size
    + LEN_BYTES // chunks count
    + LEN_BYTES + MAX_NAME_BYTES // name
    + 1 + CHUNK_ID_BYTES // parent
    + LEN_BYTES // metadata count
    + MAX_METADATA_ENTRIES
        * (LEN_BYTES + MAX_METADATA_KEY_BYTES + LEN_BYTES + MAX_METADATA_VALUE_BYTES);

/// Most chunks in one image: as many ids as fit in [`MAX_MANIFEST_BYTES`] next to the largest
/// possible name and metadata (515,797; see the module docs).
pub const MAX_CHUNKS: u32 = ((MAX_MANIFEST_BYTES - MAX_OVERHEAD_BYTES) / CHUNK_ID_BYTES) as u32;

// A manifest at every limit at once still fits in one frame.
const _: () =
    assert!(MAX_OVERHEAD_BYTES + MAX_CHUNKS as usize * CHUNK_ID_BYTES <= MAX_MANIFEST_BYTES);
const _: () = assert!(MAX_CHUNKS == 515_797);

/// The bincode configuration of the canonical encoding: little-endian, fixed-width integers
/// (collection and string lengths as `u64`), no limit. Decoding adds a limit of
/// [`MAX_MANIFEST_BYTES`].
pub const CANONICAL_CONFIG: Configuration<LittleEndian, Fixint, NoLimit> =
    bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding();

/// Errors from decoding or validating a manifest. Each names the numbers involved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// The input is longer than any valid manifest can be; refused before decoding.
    #[error("manifest of {len} bytes exceeds the limit of {max} bytes")]
    TooLong {
        /// Input length.
        len: usize,
        /// [`MAX_MANIFEST_BYTES`].
        max: usize,
    },
    /// The input is not a bincode encoding of a manifest (truncated, bad UTF-8, a bad option tag,
    /// a length prefix past the byte limit, ...).
    #[error("manifest does not decode: {0}")]
    Decode(String),
    /// The input holds bytes after the end of the manifest.
    #[error("manifest ends after {consumed} of {len} bytes")]
    TrailingBytes {
        /// Bytes the manifest took.
        consumed: usize,
        /// Input length.
        len: usize,
    },
    /// The input decodes to a valid manifest whose canonical encoding differs from the input (for
    /// instance metadata keys out of order or repeated).
    #[error("manifest encoding is not canonical ({len} bytes, canonical form differs)")]
    NonCanonical {
        /// Input length.
        len: usize,
    },
    /// The manifest bytes do not hash to the id they were fetched for.
    #[error("manifest hashes to {actual}, expected {expected}")]
    HashMismatch {
        /// The id asked for.
        expected: ImageId,
        /// The hash of the bytes received.
        actual: ImageId,
    },
    /// The format version is not [`FORMAT_VERSION`].
    #[error("manifest format version {got} is not supported (expected {expected})")]
    UnsupportedVersion {
        /// Version in the manifest.
        got: u16,
        /// [`FORMAT_VERSION`].
        expected: u16,
    },
    /// The chunk size is not a power of two.
    #[error("chunk size {chunk_size} is not a power of two")]
    ChunkSizeNotPowerOfTwo {
        /// Chunk size in the manifest.
        chunk_size: u32,
    },
    /// The chunk size is outside `[MIN_CHUNK_SIZE, MAX_CHUNK_SIZE]`.
    #[error("chunk size {chunk_size} is outside [{min}, {max}]")]
    ChunkSizeOutOfRange {
        /// Chunk size in the manifest.
        chunk_size: u32,
        /// [`MIN_CHUNK_SIZE`].
        min: u32,
        /// [`MAX_CHUNK_SIZE`].
        max: u32,
    },
    /// The image needs more chunks than a manifest can list.
    #[error(
        "image of {image_size} bytes needs {count} chunks of {chunk_size} bytes, limit is {max}"
    )]
    TooManyChunks {
        /// Image size in the manifest.
        image_size: u64,
        /// Chunk size in the manifest.
        chunk_size: u32,
        /// `ceil(image_size / chunk_size)`.
        count: u64,
        /// [`MAX_CHUNKS`].
        max: u32,
    },
    /// The number of chunk ids is not `ceil(image_size / chunk_size)`.
    #[error(
        "image of {image_size} bytes in {chunk_size}-byte chunks has {expected} chunks, manifest lists {got}"
    )]
    ChunkCountMismatch {
        /// Image size in the manifest.
        image_size: u64,
        /// Chunk size in the manifest.
        chunk_size: u32,
        /// `ceil(image_size / chunk_size)`.
        expected: u64,
        /// Number of chunk ids listed.
        got: usize,
    },
    /// The name is empty.
    #[error("image name is empty")]
    NameEmpty,
    /// The name is longer than [`MAX_NAME_BYTES`].
    #[error("image name is {len} bytes, limit is {max}")]
    NameTooLong {
        /// Name length in bytes.
        len: usize,
        /// [`MAX_NAME_BYTES`].
        max: usize,
    },
    /// The name holds a control character.
    #[error("image name has control character {ch:?} at byte {position}")]
    NameControlChar {
        /// Byte offset of the character.
        position: usize,
        /// The character.
        ch: char,
    },
    /// There are more than [`MAX_METADATA_ENTRIES`] metadata entries.
    #[error("{count} metadata entries, limit is {max}")]
    TooManyMetadataEntries {
        /// Number of entries.
        count: usize,
        /// [`MAX_METADATA_ENTRIES`].
        max: usize,
    },
    /// A metadata key is empty.
    #[error("metadata key is empty")]
    MetadataKeyEmpty,
    /// A metadata key is longer than [`MAX_METADATA_KEY_BYTES`].
    #[error("metadata key of {len} bytes, limit is {max}")]
    MetadataKeyTooLong {
        /// Key length in bytes.
        len: usize,
        /// [`MAX_METADATA_KEY_BYTES`].
        max: usize,
    },
    /// A metadata key holds a control character.
    #[error("metadata key {key:?} has control character {ch:?} at byte {position}")]
    MetadataKeyControlChar {
        /// The key.
        key: String,
        /// Byte offset of the character.
        position: usize,
        /// The character.
        ch: char,
    },
    /// A metadata value is longer than [`MAX_METADATA_VALUE_BYTES`].
    #[error("metadata value for {key:?} is {len} bytes, limit is {max}")]
    MetadataValueTooLong {
        /// The key.
        key: String,
        /// Value length in bytes.
        len: usize,
        /// [`MAX_METADATA_VALUE_BYTES`].
        max: usize,
    },
}

/// An image manifest. See the module docs for the canonical encoding and the limits.
///
/// Fields are public so a publisher can build one; anything received from outside goes through
/// [`Manifest::decode`] (or [`Manifest::decode_verified`]), which validates. The geometry helpers
/// never panic, but their answers mean something only for a valid manifest.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Manifest {
    /// Format version, [`FORMAT_VERSION`].
    pub version: u16,
    /// Image size in bytes.
    pub image_size: u64,
    /// Chunk size in bytes: a power of two in `[MIN_CHUNK_SIZE, MAX_CHUNK_SIZE]`. Every chunk is this
    /// long except possibly the last.
    pub chunk_size: u32,
    /// The chunk ids, in image order: `ceil(image_size / chunk_size)` of them.
    pub chunks: Vec<ChunkId>,
    /// Human-readable name: 1 to [`MAX_NAME_BYTES`] bytes, no control characters.
    pub name: String,
    /// The image this one was derived from, if any (shares most chunks with it).
    pub parent: Option<ImageId>,
    /// Free-form metadata (OS, format, creator, ...), within the metadata limits.
    pub metadata: BTreeMap<String, String>,
}

impl Manifest {
    /// A manifest of the current [`FORMAT_VERSION`], validated.
    pub fn new(
        image_size: u64,
        chunk_size: u32,
        chunks: Vec<ChunkId>,
        name: String,
        parent: Option<ImageId>,
        metadata: BTreeMap<String, String>,
    ) -> Result<Manifest, ManifestError> {
        let m = Manifest {
            version: FORMAT_VERSION,
            image_size,
            chunk_size,
            chunks,
            name,
            parent,
            metadata,
        };
        m.validate()?;
        Ok(m)
    }

    /// The canonical encoding (see the module docs). Its BLAKE3 hash is [`Manifest::id`].
    pub fn encode_canonical(&self) -> Vec<u8> {
        // Invariant: encoding into a Vec cannot fail: the Vec writer never runs out of room and
        // none of the field types has a fallible `Encode`.
        bincode::encode_to_vec(self, CANONICAL_CONFIG).expect("encoding a manifest into a Vec")
    }

    /// The image id: BLAKE3 of the canonical encoding (hashed while encoding, without buffering it).
    pub fn id(&self) -> ImageId {
        let mut hasher = blake3::Hasher::new();
        // Invariant: `blake3::Hasher`'s `io::Write` never fails, and no field has a fallible `Encode`.
        bincode::encode_into_std_write(self, &mut hasher, CANONICAL_CONFIG)
            .expect("encoding a manifest into a hasher");
        ImageId(*hasher.finalize().as_bytes())
    }

    /// Decodes and fully checks untrusted manifest bytes: at most [`MAX_MANIFEST_BYTES`] long,
    /// decoded under that byte limit (a hostile length prefix fails instead of allocating), no
    /// trailing bytes, [valid](Manifest::validate), and canonical.
    pub fn decode(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLong {
                len: bytes.len(),
                max: MAX_MANIFEST_BYTES,
            });
        }
        let config = CANONICAL_CONFIG.with_limit::<MAX_MANIFEST_BYTES>();
        let (manifest, consumed): (Manifest, usize) = bincode::decode_from_slice(bytes, config)
            .map_err(|e| ManifestError::Decode(e.to_string()))?;
        if consumed != bytes.len() {
            return Err(ManifestError::TrailingBytes {
                consumed,
                len: bytes.len(),
            });
        }
        manifest.validate()?;
        if !manifest.encodes_to(bytes) {
            return Err(ManifestError::NonCanonical { len: bytes.len() });
        }
        Ok(manifest)
    }

    /// [`Manifest::decode`], after checking that `bytes` hash to `expected`. For a manifest that
    /// decodes, this means `manifest.id() == *expected`.
    pub fn decode_verified(bytes: &[u8], expected: &ImageId) -> Result<Manifest, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLong {
                len: bytes.len(),
                max: MAX_MANIFEST_BYTES,
            });
        }
        let actual = ImageId(*blake3::hash(bytes).as_bytes());
        if actual != *expected {
            return Err(ManifestError::HashMismatch {
                expected: *expected,
                actual,
            });
        }
        Manifest::decode(bytes)
    }

    /// Whether the canonical encoding of `self` is exactly `bytes`, compared while encoding.
    fn encodes_to(&self, bytes: &[u8]) -> bool {
        let mut cmp = CompareWriter {
            expected: bytes,
            pos: 0,
        };
        bincode::encode_into_writer(self, &mut cmp, CANONICAL_CONFIG).is_ok()
            && cmp.pos == bytes.len()
    }

    /// Checks every rule of the format; the first broken one is returned.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.version != FORMAT_VERSION {
            return Err(ManifestError::UnsupportedVersion {
                got: self.version,
                expected: FORMAT_VERSION,
            });
        }
        check_chunk_size(self.chunk_size)?;
        let expected = self.image_size.div_ceil(u64::from(self.chunk_size));
        if expected > u64::from(MAX_CHUNKS) {
            return Err(ManifestError::TooManyChunks {
                image_size: self.image_size,
                chunk_size: self.chunk_size,
                count: expected,
                max: MAX_CHUNKS,
            });
        }
        if self.chunks.len() as u64 != expected {
            return Err(ManifestError::ChunkCountMismatch {
                image_size: self.image_size,
                chunk_size: self.chunk_size,
                expected,
                got: self.chunks.len(),
            });
        }
        if self.name.is_empty() {
            return Err(ManifestError::NameEmpty);
        }
        if self.name.len() > MAX_NAME_BYTES {
            return Err(ManifestError::NameTooLong {
                len: self.name.len(),
                max: MAX_NAME_BYTES,
            });
        }
        if let Some((position, ch)) = first_control_char(&self.name) {
            return Err(ManifestError::NameControlChar { position, ch });
        }
        if self.metadata.len() > MAX_METADATA_ENTRIES {
            return Err(ManifestError::TooManyMetadataEntries {
                count: self.metadata.len(),
                max: MAX_METADATA_ENTRIES,
            });
        }
        for (key, value) in &self.metadata {
            if key.is_empty() {
                return Err(ManifestError::MetadataKeyEmpty);
            }
            if key.len() > MAX_METADATA_KEY_BYTES {
                return Err(ManifestError::MetadataKeyTooLong {
                    len: key.len(),
                    max: MAX_METADATA_KEY_BYTES,
                });
            }
            if let Some((position, ch)) = first_control_char(key) {
                return Err(ManifestError::MetadataKeyControlChar {
                    key: key.clone(),
                    position,
                    ch,
                });
            }
            if value.len() > MAX_METADATA_VALUE_BYTES {
                return Err(ManifestError::MetadataValueTooLong {
                    key: key.clone(),
                    len: value.len(),
                    max: MAX_METADATA_VALUE_BYTES,
                });
            }
        }
        Ok(())
    }

    /// Number of chunks listed (at most [`MAX_CHUNKS`] in a valid manifest; saturates at
    /// `u32::MAX` otherwise).
    pub fn chunk_count(&self) -> u32 {
        u32::try_from(self.chunks.len()).unwrap_or(u32::MAX)
    }

    /// Byte range of chunk `index` in the image, or `None` past the last chunk. Every range is
    /// `chunk_size` long except possibly the last.
    pub fn chunk_range(&self, index: u32) -> Option<Range<u64>> {
        if index as usize >= self.chunks.len() {
            return None;
        }
        let size = u64::from(self.chunk_size);
        let start = u64::from(index).checked_mul(size)?;
        if start >= self.image_size {
            return None; // only in an invalid manifest: more ids than the size allows
        }
        Some(start..start.saturating_add(size).min(self.image_size))
    }

    /// Length of chunk `index`, or `None` past the last chunk. Only the last chunk may be shorter
    /// than `chunk_size`.
    pub fn chunk_len(&self, index: u32) -> Option<u32> {
        let range = self.chunk_range(index)?;
        u32::try_from(range.end - range.start).ok()
    }

    /// Indices of the chunks that cover bytes `offset..offset + len` of the image, clamped to the
    /// image. The NBD server maps a read or write to chunks with this. Empty when `len` is 0 (`i..i`,
    /// `i` the chunk holding `offset`) or `offset` is at or past the end of the image
    /// (`count..count`).
    pub fn chunks_for_range(&self, offset: u64, len: u64) -> Range<u32> {
        let count = self.chunk_count();
        if self.chunk_size == 0 {
            return count..count; // only in an invalid manifest
        }
        let size = u64::from(self.chunk_size);
        let clamp = |chunk: u64| u32::try_from(chunk.min(u64::from(count))).unwrap_or(count);
        if offset >= self.image_size {
            return count..count;
        }
        let first = clamp(offset / size);
        if len == 0 {
            return first..first;
        }
        let end_byte = offset.saturating_add(len).min(self.image_size);
        first..clamp(end_byte.div_ceil(size))
    }

    /// The zero-chunk ids for this manifest's chunk size and tail length, computed once.
    pub fn zero_ids(&self) -> ZeroIds {
        ZeroIds::new(self.chunk_size, self.image_size)
    }

    /// Whether chunk `index` is all zeros (its id is the id of that many zero bytes). False past
    /// the last chunk. Cheap for full-size chunks; for the short tail chunk this hashes its length
    /// in zeros, so to test many chunks use [`Manifest::zero_map`] or [`Manifest::zero_ids`].
    pub fn is_zero_chunk(&self, index: u32) -> bool {
        match self.chunk_len(index) {
            Some(len) => self.chunks[index as usize] == zero_chunk_id(len),
            None => false,
        }
    }

    /// The set of chunk indices that are all-zero chunks: these are known without transfer.
    pub fn zero_map(&self) -> ChunkBitmap {
        let zeros = self.zero_ids();
        let mut map = ChunkBitmap::new(self.chunk_count());
        for (index, id) in (0..self.chunk_count()).zip(&self.chunks) {
            if let Some(len) = self.chunk_len(index) {
                if *id == zeros.get(len) {
                    map.insert(index);
                }
            }
        }
        map
    }

    /// Number of distinct chunk ids (zero chunks included), for stats.
    pub fn unique_chunks(&self) -> usize {
        let mut ids: Vec<&ChunkId> = self.chunks.iter().collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len()
    }

    /// Bytes a peer stores to hold the whole image: the total length of the distinct non-zero
    /// chunks (a chunk's id determines its bytes and so its length). For stats.
    pub fn stored_bytes(&self) -> u64 {
        let zeros = self.zero_ids();
        let mut stored: Vec<(&ChunkId, u32)> = (0..self.chunk_count())
            .zip(&self.chunks)
            .filter_map(|(index, id)| {
                let len = self.chunk_len(index)?;
                (*id != zeros.get(len)).then_some((id, len))
            })
            .collect();
        stored.sort_unstable_by_key(|&(id, _)| id);
        stored.dedup_by_key(|&mut (id, _)| id);
        stored.iter().map(|&(_, len)| u64::from(len)).sum()
    }
}

/// A `bincode` writer that checks the bytes written against an expected slice, failing at the
/// first difference or overrun.
struct CompareWriter<'a> {
    expected: &'a [u8],
    pos: usize,
}

impl bincode::enc::write::Writer for CompareWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        let end = self.pos + bytes.len();
        if self.expected.get(self.pos..end) != Some(bytes) {
            return Err(bincode::error::EncodeError::Other("not canonical"));
        }
        self.pos = end;
        Ok(())
    }
}

fn first_control_char(s: &str) -> Option<(usize, char)> {
    s.char_indices().find(|(_, c)| c.is_control())
}

/// Checks that `chunk_size` is a power of two in `[MIN_CHUNK_SIZE, MAX_CHUNK_SIZE]`.
pub fn check_chunk_size(chunk_size: u32) -> Result<(), ManifestError> {
    if !chunk_size.is_power_of_two() {
        return Err(ManifestError::ChunkSizeNotPowerOfTwo { chunk_size });
    }
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        return Err(ManifestError::ChunkSizeOutOfRange {
            chunk_size,
            min: MIN_CHUNK_SIZE,
            max: MAX_CHUNK_SIZE,
        });
    }
    Ok(())
}

/// The chunk size to publish an image of `image_size` bytes with: [`DEFAULT_CHUNK_SIZE`] if the
/// image fits in [`MAX_CHUNKS`] chunks of it, else the smallest larger power of two that fits.
/// `None` if the image is too large even for [`MAX_CHUNK_SIZE`].
pub fn chunk_size_for(image_size: u64) -> Option<u32> {
    let mut size = DEFAULT_CHUNK_SIZE;
    loop {
        if image_size.div_ceil(u64::from(size)) <= u64::from(MAX_CHUNKS) {
            return Some(size);
        }
        if size >= MAX_CHUNK_SIZE {
            return None;
        }
        size *= 2;
    }
}

/// Ids of all-zero chunks of every allowed chunk size: `ZERO_IDS[k]` is BLAKE3 of
/// `MIN_CHUNK_SIZE << k` zero bytes (`head -c N /dev/zero | b3sum`). Checked against a direct hash
/// in the tests.
const ZERO_IDS: [[u8; 32]; 9] = [
    hex32("3bdeaf8f8e98780b318106aafdc3ca257f73df123d97b69112b26044c91a7d56"), // 64 KiB
    hex32("33badd2c738dbf1cbeebf3279bf6da04ee43995276f786ef8dd30fb708f16e95"), // 128 KiB
    hex32("86bb2b521a10612d5a1d38204fac4fa632466d1866144d8a6a7e3afc050ce7ae"), // 256 KiB
    hex32("934d6b7aea5a339a9e858430cca7ac455d3537e70fd2b302931cc93b25e1df9a"), // 512 KiB
    hex32("488de202f73bd976de4e7048f4e1f39a776d86d582b7348ff53bf432b987fca8"), // 1 MiB
    hex32("8ac83f8ce09d064b023ab3c15880b02f2686cd1817fd25915b8153316ee059f8"), // 2 MiB
    hex32("04e52cd2da6a0e1f338b0078369130d96585c1de65057da5dd1283b12fb853e1"), // 4 MiB
    hex32("27ddc0a1d824fa6befe0596ddc0136fc4a1dc060d526800851f87498768b755c"), // 8 MiB
    hex32("b4834959bc889fed1abf3c45d5da0e384134386a4b2786cc5dbb9fe8fa853bbb"), // 16 MiB
];

/// 64 lowercase hex digits to 32 bytes, at compile time (a bad literal fails the build).
const fn hex32(s: &str) -> [u8; 32] {
    const fn nibble(c: u8) -> u8 {
        match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => panic!("not a lowercase hex digit"),
        }
    }
    let s = s.as_bytes();
    assert!(s.len() == 64, "expected 64 hex digits");
    let mut out = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        out[i] = (nibble(s[2 * i]) << 4) | nibble(s[2 * i + 1]);
        i += 1;
    }
    out
}

/// The id of a chunk of `len` zero bytes. Free for the allowed chunk sizes (a table); other
/// lengths (a short tail chunk) are hashed without allocating `len` bytes.
pub fn zero_chunk_id(len: u32) -> ChunkId {
    if len.is_power_of_two() && (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&len) {
        let k = (len / MIN_CHUNK_SIZE).trailing_zeros() as usize;
        return ChunkId(ZERO_IDS[k]);
    }
    hash_zeros(u64::from(len))
}

/// BLAKE3 of `len` zero bytes, fed from a fixed zero buffer.
fn hash_zeros(len: u64) -> ChunkId {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    let mut hasher = blake3::Hasher::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(ZEROS.len() as u64) as usize;
        hasher.update(&ZEROS[..n]);
        left -= n as u64;
    }
    ChunkId(*hasher.finalize().as_bytes())
}

/// The two zero-chunk ids an image can have: full-size and (if the image size is not a multiple
/// of the chunk size) the short tail. Computed once, then [`ZeroIds::get`] is a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroIds {
    full_len: u32,
    full: ChunkId,
    tail: Option<(u32, ChunkId)>,
}

impl ZeroIds {
    /// Zero ids for an image of `image_size` bytes in chunks of `chunk_size`.
    pub fn new(chunk_size: u32, image_size: u64) -> ZeroIds {
        let tail = image_size
            .checked_rem(u64::from(chunk_size))
            .filter(|&t| t != 0)
            // The remainder is below `chunk_size`, a u32.
            .map(|t| (t as u32, hash_zeros(t)));
        ZeroIds {
            full_len: chunk_size,
            full: zero_chunk_id(chunk_size),
            tail,
        }
    }

    /// The id of `len` zero bytes: cached for the full and tail lengths, computed otherwise.
    pub fn get(&self, len: u32) -> ChunkId {
        if len == self.full_len {
            return self.full;
        }
        match self.tail {
            Some((tail_len, id)) if tail_len == len => id,
            _ => zero_chunk_id(len),
        }
    }

    /// The id of a full-size zero chunk.
    pub fn full(&self) -> ChunkId {
        self.full
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KIB: u32 = 1024;

    fn id(i: u64) -> ChunkId {
        ChunkId::of(&i.to_le_bytes())
    }

    /// A valid manifest of `image_size` bytes with distinct non-zero chunk ids.
    fn sample(image_size: u64, chunk_size: u32) -> Manifest {
        let n = image_size.div_ceil(u64::from(chunk_size));
        let mut metadata = BTreeMap::new();
        metadata.insert("os".to_owned(), "debian-13".to_owned());
        metadata.insert("format".to_owned(), "raw".to_owned());
        Manifest::new(
            image_size,
            chunk_size,
            (0..n).map(id).collect(),
            "base image".to_owned(),
            Some(ImageId([7; 32])),
            metadata,
        )
        .unwrap()
    }

    #[test]
    fn round_trip_and_id() {
        for m in [
            sample(0, MIN_CHUNK_SIZE),
            sample(1, MIN_CHUNK_SIZE),
            sample(10 * u64::from(DEFAULT_CHUNK_SIZE), DEFAULT_CHUNK_SIZE),
            sample(10 * u64::from(DEFAULT_CHUNK_SIZE) + 5, DEFAULT_CHUNK_SIZE),
        ] {
            let bytes = m.encode_canonical();
            assert_eq!(Manifest::decode(&bytes).unwrap(), m);
            assert_eq!(m.id(), ImageId(*blake3::hash(&bytes).as_bytes()));
            assert_eq!(Manifest::decode_verified(&bytes, &m.id()).unwrap(), m);
        }
    }

    #[test]
    fn canonical_layout_is_as_documented() {
        let m = sample(3 * u64::from(MIN_CHUNK_SIZE), MIN_CHUNK_SIZE);
        let bytes = m.encode_canonical();
        let meta: usize = m.metadata.iter().map(|(k, v)| 16 + k.len() + v.len()).sum();
        let expected = 2 + 8 + 4 + (8 + 3 * 32) + (8 + m.name.len()) + (1 + 32) + 8 + meta;
        assert_eq!(bytes.len(), expected);
        assert_eq!(&bytes[..2], &1u16.to_le_bytes());
        assert_eq!(
            &bytes[2..10],
            &(3 * u64::from(MIN_CHUNK_SIZE)).to_le_bytes()
        );
        assert_eq!(&bytes[10..14], &MIN_CHUNK_SIZE.to_le_bytes());
        assert_eq!(&bytes[14..22], &3u64.to_le_bytes());
        assert_eq!(&bytes[22..54], id(0).as_bytes());
    }

    /// Pins the encoding: if this changes, every published image id changes with it.
    #[test]
    fn golden_id() {
        let m = Manifest::new(
            100_000,
            MIN_CHUNK_SIZE,
            vec![ChunkId::of(b"a"), ChunkId::of(b"b")],
            "golden".to_owned(),
            None,
            BTreeMap::from([("k".to_owned(), "v".to_owned())]),
        )
        .unwrap();
        assert_eq!(m.id(), m.id());
        assert_eq!(m.id().to_string(), GOLDEN_ID);
    }
    const GOLDEN_ID: &str = "c0f9f3858f5a7c39d44cc0eb6b7fd98f8a9fcf603528722e5daf02ddb3cda022";

    #[test]
    fn id_changes_with_every_field() {
        let base = sample(5 * u64::from(MIN_CHUNK_SIZE) - 1, MIN_CHUNK_SIZE);
        type Mutation = Box<dyn Fn(&mut Manifest)>;
        let mutations: Vec<Mutation> = vec![
            Box::new(|m| m.version += 1),
            Box::new(|m| m.image_size -= 1),
            Box::new(|m| m.chunk_size *= 2),
            Box::new(|m| m.chunks[4] = id(99)),
            Box::new(|m| m.chunks.swap(0, 1)),
            Box::new(|m| m.name.push('!')),
            Box::new(|m| m.parent = None),
            Box::new(|m| m.parent = Some(ImageId([8; 32]))),
            Box::new(|m| {
                m.metadata.insert("os".into(), "debian-12".into());
            }),
            Box::new(|m| {
                m.metadata.insert("extra".into(), String::new());
            }),
            Box::new(|m| m.metadata.clear()),
        ];
        let mut seen = std::collections::HashSet::from([base.id()]);
        for mutate in &mutations {
            let mut m = base.clone();
            mutate(&mut m);
            assert!(seen.insert(m.id()), "{m:?}");
        }
    }

    #[test]
    fn every_validation_error() {
        let base = sample(3 * u64::from(MIN_CHUNK_SIZE), MIN_CHUNK_SIZE);
        let check = |f: &dyn Fn(&mut Manifest), want: ManifestError| {
            let mut m = base.clone();
            f(&mut m);
            assert_eq!(m.validate(), Err(want.clone()));
            // Decoding its encoding reports the same rule.
            assert_eq!(Manifest::decode(&m.encode_canonical()), Err(want));
        };
        check(
            &|m| m.version = 2,
            ManifestError::UnsupportedVersion {
                got: 2,
                expected: 1,
            },
        );
        check(
            &|m| m.chunk_size = 3 * MIN_CHUNK_SIZE,
            ManifestError::ChunkSizeNotPowerOfTwo {
                chunk_size: 3 * MIN_CHUNK_SIZE,
            },
        );
        check(
            &|m| m.chunk_size = 0,
            ManifestError::ChunkSizeNotPowerOfTwo { chunk_size: 0 },
        );
        for bad in [MIN_CHUNK_SIZE / 2, MAX_CHUNK_SIZE * 2, 1] {
            check(
                &|m| m.chunk_size = bad,
                ManifestError::ChunkSizeOutOfRange {
                    chunk_size: bad,
                    min: MIN_CHUNK_SIZE,
                    max: MAX_CHUNK_SIZE,
                },
            );
        }
        let huge = u64::from(MAX_CHUNKS) * u64::from(MIN_CHUNK_SIZE) + 1;
        check(
            &|m| m.image_size = huge,
            ManifestError::TooManyChunks {
                image_size: huge,
                chunk_size: MIN_CHUNK_SIZE,
                count: u64::from(MAX_CHUNKS) + 1,
                max: MAX_CHUNKS,
            },
        );
        check(
            &|m| m.image_size = u64::MAX,
            ManifestError::TooManyChunks {
                image_size: u64::MAX,
                chunk_size: MIN_CHUNK_SIZE,
                count: u64::MAX.div_ceil(u64::from(MIN_CHUNK_SIZE)),
                max: MAX_CHUNKS,
            },
        );
        let size = 3 * u64::from(MIN_CHUNK_SIZE);
        let mismatch = |expected, got| ManifestError::ChunkCountMismatch {
            image_size: size,
            chunk_size: MIN_CHUNK_SIZE,
            expected,
            got,
        };
        check(
            &|m| m.image_size = size + 1,
            ManifestError::ChunkCountMismatch {
                image_size: size + 1,
                chunk_size: MIN_CHUNK_SIZE,
                expected: 4,
                got: 3,
            },
        );
        check(
            &|m| m.image_size = 0,
            ManifestError::ChunkCountMismatch {
                image_size: 0,
                chunk_size: MIN_CHUNK_SIZE,
                expected: 0,
                got: 3,
            },
        );
        check(
            &|m| {
                m.chunks.pop();
            },
            mismatch(3, 2),
        );
        check(&|m| m.chunks.push(id(9)), mismatch(3, 4));
        check(&|m| m.name.clear(), ManifestError::NameEmpty);
        check(
            &|m| m.name = "x".repeat(256),
            ManifestError::NameTooLong { len: 256, max: 255 },
        );
        check(
            &|m| m.name = "é".repeat(128),
            ManifestError::NameTooLong { len: 256, max: 255 },
        );
        check(
            &|m| m.name = "ab\ncd".into(),
            ManifestError::NameControlChar {
                position: 2,
                ch: '\n',
            },
        );
        check(
            &|m| m.name = "é\u{7f}".into(),
            ManifestError::NameControlChar {
                position: 2,
                ch: '\u{7f}',
            },
        );
        check(
            &|m| m.metadata = (0..65).map(|i| (format!("k{i}"), String::new())).collect(),
            ManifestError::TooManyMetadataEntries { count: 65, max: 64 },
        );
        check(
            &|m| drop(m.metadata.insert(String::new(), "v".into())),
            ManifestError::MetadataKeyEmpty,
        );
        check(
            &|m| drop(m.metadata.insert("k".repeat(129), "v".into())),
            ManifestError::MetadataKeyTooLong { len: 129, max: 128 },
        );
        check(
            &|m| drop(m.metadata.insert("a\tb".into(), "v".into())),
            ManifestError::MetadataKeyControlChar {
                key: "a\tb".into(),
                position: 1,
                ch: '\t',
            },
        );
        check(
            &|m| drop(m.metadata.insert("big".into(), "v".repeat(4097))),
            ManifestError::MetadataValueTooLong {
                key: "big".into(),
                len: 4097,
                max: 4096,
            },
        );
    }

    #[test]
    fn limits_are_inclusive() {
        let mut m = sample(u64::from(MAX_CHUNK_SIZE) + 1, MAX_CHUNK_SIZE);
        m.name = "n".repeat(MAX_NAME_BYTES);
        m.metadata = (0..MAX_METADATA_ENTRIES)
            .map(|i| (format!("{i:0>128}"), "\n".repeat(MAX_METADATA_VALUE_BYTES)))
            .collect();
        assert_eq!(m.validate(), Ok(()));
        assert_eq!(Manifest::decode(&m.encode_canonical()), Ok(m));
    }

    /// The documented bound: a manifest at every limit at once decodes, and one more chunk does not
    /// fit.
    #[test]
    fn largest_manifest_fits_in_a_frame() {
        let count = u64::from(MAX_CHUNKS);
        let mut m = Manifest {
            version: FORMAT_VERSION,
            image_size: count * u64::from(MAX_CHUNK_SIZE),
            chunk_size: MAX_CHUNK_SIZE,
            chunks: (0..count).map(|i| ChunkId([(i % 251) as u8; 32])).collect(),
            name: "n".repeat(MAX_NAME_BYTES),
            parent: Some(ImageId([1; 32])),
            metadata: (0..MAX_METADATA_ENTRIES)
                .map(|i| (format!("{i:0>128}"), "v".repeat(MAX_METADATA_VALUE_BYTES)))
                .collect(),
        };
        let bytes = m.encode_canonical();
        assert_eq!(bytes.len(), MAX_OVERHEAD_BYTES + MAX_CHUNKS as usize * 32);
        assert!(bytes.len() <= MAX_MANIFEST_BYTES);
        let back = Manifest::decode(&bytes).unwrap();
        assert_eq!(back.chunk_count(), MAX_CHUNKS);
        assert_eq!(back, m);

        // Many tiny metadata entries: bincode's allocation claims must not trip the limit either.
        m.metadata = (0..MAX_METADATA_ENTRIES)
            .map(|i| (format!("{i}"), String::new()))
            .collect();
        assert_eq!(Manifest::decode(&m.encode_canonical()), Ok(m.clone()));

        m.image_size += 1;
        m.chunks.push(id(0));
        assert!(matches!(
            m.validate(),
            Err(ManifestError::TooManyChunks { count, .. }) if count == count_plus_one()
        ));
        fn count_plus_one() -> u64 {
            u64::from(MAX_CHUNKS) + 1
        }
    }

    #[test]
    fn rejects_non_canonical_and_malformed_bytes() {
        let mut m = sample(2 * u64::from(MIN_CHUNK_SIZE), MIN_CHUNK_SIZE);
        m.metadata = BTreeMap::from([("a".into(), "1".into()), ("b".into(), "2".into())]);
        let bytes = m.encode_canonical();
        let len = bytes.len();

        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(
            Manifest::decode(&longer),
            Err(ManifestError::TrailingBytes {
                consumed: len,
                len: len + 1
            })
        );

        for cut in [0, 1, 13, 30, len / 2, len - 1] {
            assert!(
                matches!(
                    Manifest::decode(&bytes[..cut]),
                    Err(ManifestError::Decode(_))
                ),
                "cut at {cut}"
            );
        }

        // Metadata layout at the end: 8 count, then (8 "a"-len, 'a', 8, '1'), (8, 'b', 8, '2').
        let key_a = len - 2 * 18 + 8;
        let key_b = len - 18 + 8;
        assert_eq!((bytes[key_a], bytes[key_b]), (b'a', b'b'));
        // Keys out of order: decodes to {a: 2, b: 1}, which encodes differently.
        let mut swapped = bytes.clone();
        swapped.swap(key_a, key_b);
        assert_eq!(
            Manifest::decode(&swapped),
            Err(ManifestError::NonCanonical { len })
        );
        // A repeated key: decodes to {a: 2}.
        let mut repeated = bytes.clone();
        repeated[key_b] = b'a';
        assert_eq!(
            Manifest::decode(&repeated),
            Err(ManifestError::NonCanonical { len })
        );

        // The parent's option tag must be 0 or 1.
        let tag = 2 + 8 + 4 + 8 + 2 * 32 + 8 + m.name.len();
        assert_eq!(bytes[tag], 1);
        let mut bad_tag = bytes.clone();
        bad_tag[tag] = 2;
        assert!(matches!(
            Manifest::decode(&bad_tag),
            Err(ManifestError::Decode(_))
        ));

        // Invalid UTF-8 in the name.
        let mut bad_utf8 = bytes.clone();
        bad_utf8[tag - 1] = 0xff;
        assert!(matches!(
            Manifest::decode(&bad_utf8),
            Err(ManifestError::Decode(_))
        ));

        let too_long = vec![0u8; MAX_MANIFEST_BYTES + 1];
        assert_eq!(
            Manifest::decode(&too_long),
            Err(ManifestError::TooLong {
                len: MAX_MANIFEST_BYTES + 1,
                max: MAX_MANIFEST_BYTES
            })
        );
        assert!(matches!(
            Manifest::decode_verified(&too_long, &ImageId([0; 32])),
            Err(ManifestError::TooLong { .. })
        ));
    }

    #[test]
    fn decode_verified_checks_the_hash() {
        let m = sample(1000, MIN_CHUNK_SIZE);
        let bytes = m.encode_canonical();
        let wrong = ImageId([3; 32]);
        assert_eq!(
            Manifest::decode_verified(&bytes, &wrong),
            Err(ManifestError::HashMismatch {
                expected: wrong,
                actual: m.id()
            })
        );
        assert_eq!(Manifest::decode_verified(&bytes, &m.id()), Ok(m));
    }

    /// Length prefixes claiming huge collections fail on the byte limit instead of allocating.
    #[test]
    fn hostile_length_prefixes_do_not_allocate() {
        let mut header = Vec::new();
        header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        header.extend_from_slice(&(1u64 << 40).to_le_bytes());
        header.extend_from_slice(&MIN_CHUNK_SIZE.to_le_bytes());
        for claim in [1u64 << 60, u64::MAX, (MAX_MANIFEST_BYTES as u64 / 32) + 1] {
            let mut bytes = header.clone();
            bytes.extend_from_slice(&claim.to_le_bytes());
            bytes.extend_from_slice(&[0; 64]);
            let err = Manifest::decode(&bytes).unwrap_err();
            assert!(matches!(err, ManifestError::Decode(_)), "{claim}: {err}");
        }
        // A huge name length after an empty chunk list.
        let mut bytes = header.clone();
        bytes.extend_from_slice(&0u64.to_le_bytes());
        bytes.extend_from_slice(&(1u64 << 62).to_le_bytes());
        assert!(matches!(
            Manifest::decode(&bytes),
            Err(ManifestError::Decode(_))
        ));
        // A huge metadata count after a small name and no parent.
        let mut bytes = header;
        bytes.extend_from_slice(&0u64.to_le_bytes());
        bytes.extend_from_slice(&1u64.to_le_bytes());
        bytes.push(b'n');
        bytes.push(0);
        bytes.extend_from_slice(&(1u64 << 50).to_le_bytes());
        assert!(matches!(
            Manifest::decode(&bytes),
            Err(ManifestError::Decode(_))
        ));
    }

    #[test]
    fn chunk_geometry() {
        let cs = MIN_CHUNK_SIZE;
        let c = u64::from(cs);
        let m = sample(3 * c + 10, cs);
        assert_eq!(m.chunk_count(), 4);
        assert_eq!(m.chunk_range(0), Some(0..c));
        assert_eq!(m.chunk_range(2), Some(2 * c..3 * c));
        assert_eq!(m.chunk_range(3), Some(3 * c..3 * c + 10));
        assert_eq!(m.chunk_range(4), None);
        assert_eq!(m.chunk_range(u32::MAX), None);
        assert_eq!(m.chunk_len(0), Some(cs));
        assert_eq!(m.chunk_len(3), Some(10));
        assert_eq!(m.chunk_len(4), None);

        assert_eq!(m.chunks_for_range(0, 1), 0..1);
        assert_eq!(m.chunks_for_range(0, c), 0..1);
        assert_eq!(m.chunks_for_range(0, c + 1), 0..2);
        assert_eq!(m.chunks_for_range(c - 1, 2), 0..2);
        assert_eq!(m.chunks_for_range(c, c), 1..2);
        assert_eq!(m.chunks_for_range(c, 0), 1..1);
        assert_eq!(m.chunks_for_range(0, u64::MAX), 0..4);
        assert_eq!(m.chunks_for_range(3 * c + 9, 100), 3..4);
        assert_eq!(m.chunks_for_range(3 * c + 10, 100), 4..4);
        assert_eq!(m.chunks_for_range(u64::MAX, u64::MAX), 4..4);

        let exact = sample(2 * c, cs);
        assert_eq!(exact.chunk_len(1), Some(cs));
        assert_eq!(exact.chunks_for_range(c, 2 * c), 1..2);

        let empty = sample(0, cs);
        assert_eq!(empty.chunk_count(), 0);
        assert_eq!(empty.chunk_range(0), None);
        assert_eq!(empty.chunks_for_range(0, 100), 0..0);
        assert!(empty.zero_map().is_empty());
        assert_eq!(empty.stored_bytes(), 0);

        // Helpers do not panic on invalid manifests.
        let mut broken = m.clone();
        broken.chunk_size = 0;
        broken.chunks_for_range(5, 5);
        broken.chunk_range(1);
        broken.zero_map();
        broken.image_size = 0;
        broken.chunk_size = cs;
        assert_eq!(broken.chunk_range(0), None);
        assert!(!broken.is_zero_chunk(0));
    }

    #[test]
    fn zero_ids_are_hashes_of_zeros() {
        for k in 0..9 {
            let len = MIN_CHUNK_SIZE << k;
            assert_eq!(
                zero_chunk_id(len),
                ChunkId::of(&vec![0; len as usize]),
                "{len}"
            );
        }
        for len in [0, 1, 1023, 1024, 1025, 65 * KIB + 3, 3 * MIN_CHUNK_SIZE] {
            assert_eq!(
                zero_chunk_id(len),
                ChunkId::of(&vec![0; len as usize]),
                "{len}"
            );
        }
        let z = ZeroIds::new(MIN_CHUNK_SIZE, 2 * u64::from(MIN_CHUNK_SIZE) + 7);
        assert_eq!(z.full(), zero_chunk_id(MIN_CHUNK_SIZE));
        assert_eq!(z.get(7), ChunkId::of(&[0; 7]));
        assert_eq!(z.get(8), ChunkId::of(&[0; 8]));
    }

    #[test]
    fn zero_chunks_and_stats() {
        let cs = MIN_CHUNK_SIZE;
        let size = 5 * u64::from(cs) + 100;
        let full_zero = zero_chunk_id(cs);
        let tail_zero = zero_chunk_id(100);
        let m = Manifest::new(
            size,
            cs,
            vec![full_zero, id(1), full_zero, id(1), id(2), tail_zero],
            "sparse".into(),
            None,
            BTreeMap::new(),
        )
        .unwrap();
        let zeros: Vec<u32> = m.zero_map().iter().collect();
        assert_eq!(zeros, vec![0, 2, 5]);
        for i in 0..6 {
            assert_eq!(m.is_zero_chunk(i), zeros.contains(&i), "{i}");
        }
        assert!(!m.is_zero_chunk(6));
        assert_eq!(m.unique_chunks(), 4);
        assert_eq!(m.stored_bytes(), 2 * u64::from(cs));

        // A full-size zero id in the tail position is not a zero chunk of the tail's length.
        let mut odd = m.clone();
        odd.chunks[5] = full_zero;
        assert!(!odd.is_zero_chunk(5));
        assert_eq!(odd.zero_map().count(), 2);
    }

    #[test]
    fn chunk_size_for_picks_the_smallest_that_fits() {
        assert_eq!(chunk_size_for(0), Some(DEFAULT_CHUNK_SIZE));
        let max_default = u64::from(MAX_CHUNKS) * u64::from(DEFAULT_CHUNK_SIZE);
        assert_eq!(chunk_size_for(max_default), Some(DEFAULT_CHUNK_SIZE));
        assert_eq!(
            chunk_size_for(max_default + 1),
            Some(2 * DEFAULT_CHUNK_SIZE)
        );
        let max_image = u64::from(MAX_CHUNKS) * u64::from(MAX_CHUNK_SIZE);
        assert_eq!(chunk_size_for(max_image), Some(MAX_CHUNK_SIZE));
        assert_eq!(chunk_size_for(max_image + 1), None);
        assert_eq!(chunk_size_for(u64::MAX), None);
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Manifest::decode(&bytes);
        }

        /// Corrupting a valid encoding either fails or yields a manifest that re-encodes to exactly
        /// the corrupted bytes.
        #[test]
        fn corrupted_encodings_fail_or_are_canonical(
            size in 0u64..(8 * u64::from(MIN_CHUNK_SIZE)),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let mut bytes = sample(size, MIN_CHUNK_SIZE).encode_canonical();
            for (at, value) in flips {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            if let Ok(m) = Manifest::decode(&bytes) {
                prop_assert_eq!(m.encode_canonical(), bytes);
            }
        }

        #[test]
        fn chunks_for_range_covers_exactly(
            size in 0u64..(10 * u64::from(MIN_CHUNK_SIZE)),
            offset in 0u64..(11 * u64::from(MIN_CHUNK_SIZE)),
            len in 0u64..(3 * u64::from(MIN_CHUNK_SIZE)),
        ) {
            let m = sample(size, MIN_CHUNK_SIZE);
            let r = m.chunks_for_range(offset, len);
            let end = (offset + len).min(size);
            for i in 0..m.chunk_count() {
                let cr = m.chunk_range(i).unwrap();
                let overlaps = len > 0 && cr.start < end && offset < cr.end;
                prop_assert_eq!(r.contains(&i), overlaps, "chunk {} {:?}", i, cr);
            }
        }
    }
}
