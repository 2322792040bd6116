//! Bytes on the wire: encoding [`Message`]s and framing them on a stream.
//!
//! This module decides how a message becomes bytes and back, and how messages are delimited on a
//! byte stream. It leaves to [`crate::wire`] what a message may contain ([`Message::validate`], run
//! after every decode and before every encode), and to the caller every I/O decision: reading from the
//! stream, when to push, closing the stream after an error.
//!
//! # Encoding
//!
//! A payload is the bincode 2 encoding of a [`Message`] under one private configuration (`CONFIG`):
//! little-endian, variable-length integers, and a decode limit of [`MAX_FRAME_LEN`]. The encoding is
//! reached only through [`encode`], [`decode`], [`encode_frame`], [`FrameDecoder`] and the chunk
//! head functions below (and the error type carries text, not bincode's error type), so it can be
//! swapped without touching callers.
//!
//! # Chunk messages without copying their bytes
//!
//! The payload of a [`Message::Chunk`] is a short *head* (variant tag, id, data length) followed by
//! the data bytes unchanged. [`chunk_payload_head`] builds that head, so a sender can write the head
//! and then the bytes straight from its buffer; [`decode_chunk_head`] recognises it, so a receiver
//! can read the bytes straight into their final buffer. A payload that is exactly a recognised head
//! plus `data_len` bytes decodes with [`decode`] to the same message (tested, and fuzzed by
//! `fuzz/fuzz_targets/chunk_head.rs`); anything else goes through [`decode`].
//!
//! The limit matters for safety, not only for size. bincode decodes a `Vec<T>` by reading its length
//! and then allocating `Vec::with_capacity(len)` (or `vec![0u8; len]` for bytes) *before* reading the
//! elements. With a limit set, it first calls `Decoder::claim_container_read::<T>(len)`, which fails
//! with `LimitExceeded` if `len * size_of::<T>()` overflows or would take the running total of claimed
//! bytes past the limit. So a hostile length prefix (a `Vec` claiming 2^40 elements) is refused
//! before any allocation, and no decode ever allocates more than about [`MAX_FRAME_LEN`] bytes.
//! (Claims count in-memory sizes: a `u32` claims 4 bytes even when its varint takes 1. The bounds in
//! [`crate::wire`] keep every valid message's claims under the limit.)
//!
//! One amplification remains, bounded by the limit: a short frame whose byte vector claims a length
//! of up to [`MAX_FRAME_LEN`] makes bincode allocate (zeroed) that much before it notices the frame
//! ends early. That is no more than an honest maximal frame costs.
//!
//! Decoding accepts non-minimal varints; re-encoding a decoded message gives an equal message, not
//! necessarily the same bytes. Nothing here relies on the wire bytes being canonical (manifests have
//! their own canonical encoding in [`crate::manifest`]).
//!
//! # Framing
//!
//! A frame is a 4-byte big-endian payload length followed by the payload. The length must be between
//! 1 and the maximum frame length ([`MAX_FRAME_LEN`] unless [`FrameDecoder::with_max_frame`] lowers
//! it); a bad length is refused from the prefix alone, before the payload is buffered.

use bincode::config::{Configuration, LittleEndian, Varint};
use bincode::error::EncodeError;

use crate::ChunkId;
use crate::wire::{MAX_CHUNK_BYTES, Message, WireError};

/// Bytes of the length prefix in front of each payload.
pub const FRAME_HEADER_LEN: usize = 4;

/// Room in a frame beyond the largest chunk, for the message around it (tag, id, length prefix).
pub const FRAME_SLACK: usize = 64 * 1024;

/// Largest payload of a frame: the largest chunk plus [`FRAME_SLACK`].
pub const MAX_FRAME_LEN: usize = MAX_CHUNK_BYTES + FRAME_SLACK;

/// Capacity a [`FrameDecoder`] keeps after its buffer empties; a larger buffer (left by a big frame)
/// is released then.
const RETAINED_CAPACITY: usize = 1024 * 1024;

/// The bincode configuration of the wire: little-endian, varint integers, decode limit
/// [`MAX_FRAME_LEN`] (see the module docs for why the limit is essential).
type Config = Configuration<LittleEndian, Varint, bincode::config::Limit<MAX_FRAME_LEN>>;

/// The one configuration every payload is encoded and decoded with.
const CONFIG: Config = bincode::config::standard()
    .with_little_endian()
    .with_variable_int_encoding()
    .with_limit::<MAX_FRAME_LEN>();

/// Errors from encoding, decoding and framing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// A frame (announced by its prefix, or about to be encoded) is longer than allowed.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    FrameTooLarge {
        /// Payload length.
        len: usize,
        /// The maximum frame length in force.
        max: usize,
    },
    /// A length prefix announced an empty payload.
    #[error("empty frame")]
    EmptyFrame,
    /// The payload is not the encoding of a message (truncated, unknown variant, bad UTF-8,
    /// a length past the decode limit, ...). Holds the decoder's description.
    #[error("malformed message: {0}")]
    Decode(String),
    /// The payload holds bytes after a complete message.
    #[error("{extra} trailing bytes after the message")]
    TrailingBytes {
        /// Number of unread bytes.
        extra: usize,
    },
    /// The message decodes (or is about to be encoded) but breaks a bound of [`crate::wire`].
    #[error("invalid message: {0}")]
    Invalid(#[from] WireError),
    /// The encoder failed. Holds its description.
    #[error("encoding failed: {0}")]
    Encode(String),
    /// A [`FrameDecoder`] already failed; the stream must be closed.
    #[error("frame decoder failed earlier; the stream must be closed")]
    Poisoned,
}

/// Encodes `msg` as a payload (no length prefix). Refuses invalid messages and payloads longer than
/// [`MAX_FRAME_LEN`].
pub fn encode(msg: &Message) -> Result<Vec<u8>, CodecError> {
    msg.validate()?;
    let payload = bincode::encode_to_vec(msg, CONFIG).map_err(encode_error)?;
    check_len(payload.len(), MAX_FRAME_LEN)?;
    Ok(payload)
}

/// Decodes one payload (no length prefix): exactly one message, with no trailing bytes, that passes
/// [`Message::validate`].
pub fn decode(payload: &[u8]) -> Result<Message, CodecError> {
    check_len(payload.len(), MAX_FRAME_LEN)?;
    let (msg, used): (Message, usize) = bincode::decode_from_slice(payload, CONFIG)
        .map_err(|e| CodecError::Decode(e.to_string()))?;
    if used != payload.len() {
        return Err(CodecError::TrailingBytes {
            extra: payload.len() - used,
        });
    }
    msg.validate()?;
    Ok(msg)
}

/// Longest head [`chunk_payload_head`] makes: tag, 32-byte id and a varint length (at most 9 bytes),
/// with room to spare.
pub const MAX_CHUNK_HEAD_LEN: usize = 48;

/// The start of a [`Message::Chunk`] payload, as [`decode_chunk_head`] found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHead {
    /// The chunk's id.
    pub id: ChunkId,
    /// Length of the data that follows the head.
    pub data_len: usize,
    /// Length of the head itself.
    pub head_len: usize,
}

/// The encoded tag of [`Message::Chunk`]: its payload minus the id and a one-byte empty length.
fn chunk_tag() -> Result<Vec<u8>, CodecError> {
    let empty = Message::Chunk {
        id: ChunkId([0; 32]),
        data: Vec::new(),
    };
    let mut payload = bincode::encode_to_vec(&empty, CONFIG).map_err(encode_error)?;
    // The payload ends in the 32 id bytes and the varint 0.
    payload.truncate(payload.len().saturating_sub(33));
    Ok(payload)
}

/// The head of the payload of `Message::Chunk { id, data }` for any `data` of `data_len` bytes: that
/// payload is this head followed by the data. Refuses a `data_len` over [`MAX_CHUNK_BYTES`].
pub fn chunk_payload_head(id: &ChunkId, data_len: usize) -> Result<Vec<u8>, CodecError> {
    if data_len > MAX_CHUNK_BYTES {
        return Err(CodecError::Invalid(WireError::ChunkTooLarge {
            len: data_len,
            max: MAX_CHUNK_BYTES,
        }));
    }
    let mut head = chunk_tag()?;
    head.extend_from_slice(&id.0);
    let len = bincode::encode_to_vec(data_len as u64, CONFIG).map_err(encode_error)?;
    head.extend_from_slice(&len);
    Ok(head)
}

/// If `bytes` (the first bytes of a payload, up to [`MAX_CHUNK_HEAD_LEN`]) start with the head of a
/// [`Message::Chunk`] whose data length is within [`MAX_CHUNK_BYTES`], returns it. `None` means only
/// "not recognised here": decode the whole payload with [`decode`] instead.
pub fn decode_chunk_head(bytes: &[u8]) -> Option<ChunkHead> {
    let tag = chunk_tag().ok()?;
    let rest = bytes.strip_prefix(tag.as_slice())?;
    let (id, rest) = rest.split_first_chunk::<32>()?;
    let (data_len, used): (u64, usize) = bincode::decode_from_slice(rest, CONFIG).ok()?;
    let data_len = usize::try_from(data_len).ok()?;
    (data_len <= MAX_CHUNK_BYTES).then_some(ChunkHead {
        id: ChunkId(*id),
        data_len,
        head_len: tag.len() + 32 + used,
    })
}

/// Appends one frame (length prefix and payload) for `msg` to `out`. On error `out` is left as it
/// was. Refuses invalid messages and payloads longer than [`MAX_FRAME_LEN`].
pub fn encode_frame(msg: &Message, out: &mut Vec<u8>) -> Result<(), CodecError> {
    msg.validate()?;
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_LEN]);
    let result = bincode::encode_into_writer(msg, VecWriter(out), CONFIG)
        .map_err(encode_error)
        .and_then(|()| {
            let len = out.len() - start - FRAME_HEADER_LEN;
            check_len(len, MAX_FRAME_LEN)?;
            // MAX_FRAME_LEN < 2^32, so the checked length fits the prefix.
            u32::try_from(len).map_err(|_| CodecError::FrameTooLarge {
                len,
                max: MAX_FRAME_LEN,
            })
        });
    match result {
        Ok(len) => {
            out[start..start + FRAME_HEADER_LEN].copy_from_slice(&len.to_be_bytes());
            Ok(())
        }
        Err(e) => {
            out.truncate(start);
            Err(e)
        }
    }
}

fn check_len(len: usize, max: usize) -> Result<(), CodecError> {
    if len > max {
        return Err(CodecError::FrameTooLarge { len, max });
    }
    Ok(())
}

fn encode_error(e: EncodeError) -> CodecError {
    CodecError::Encode(e.to_string())
}

/// Appends bincode's output to a `Vec` in place, so a frame is written without an extra copy.
struct VecWriter<'a>(&'a mut Vec<u8>);

impl bincode::enc::write::Writer for VecWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), EncodeError> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

/// Incremental, sans-IO decoder of a framed byte stream.
///
/// Push bytes as they arrive ([`push`](Self::push)), then call [`next_message`](Self::next_message)
/// until it returns `Ok(None)` (more bytes needed). Any number of frames may arrive in one push and a
/// frame may be split over any number of pushes.
///
/// # Memory
///
/// The decoder holds only bytes not yet consumed. After `next_message` returns `Ok(None)` what
/// remains is part of one frame, so fewer than `max_frame + 4` bytes; `push` then adds exactly what
/// it is given. A caller that alternates pushes of at most `n` bytes with draining `next_message` to
/// `None` therefore never has more than `max_frame + 4 + n` bytes buffered. Pushing more without
/// draining buffers it all (the decoder never drops stream bytes it has not refused); nothing else is
/// allocated ahead of arriving bytes, even when a prefix announces a large frame. A length prefix
/// outside `1..=max_frame` is refused as soon as its 4 bytes are present, by `push` already, and the
/// buffer is dropped. Consumed bytes are reclaimed by an offset and occasional compaction that moves
/// at most as many bytes as were consumed, so total copying stays linear; a buffer grown by a large
/// frame is released once it empties.
///
/// # Errors
///
/// After any error the decoder is poisoned: it drops its buffer, ignores further pushes, and every
/// later `next_message` returns [`CodecError::Poisoned`]. The caller should close the stream.
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Offset in `buf` of the first unconsumed byte.
    start: usize,
    max_frame: usize,
    /// An error found by `push`, to be reported by the next `next_message`.
    pending: Option<CodecError>,
    poisoned: bool,
}

impl std::fmt::Debug for FrameDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameDecoder")
            .field("buffered", &self.buffered())
            .field("max_frame", &self.max_frame)
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    /// A decoder accepting frames up to [`MAX_FRAME_LEN`].
    pub fn new() -> Self {
        Self::with_max_frame(MAX_FRAME_LEN)
    }

    /// A decoder accepting frames up to `max_frame` bytes of payload, e.g. for a control stream that
    /// never carries chunks. Values above [`MAX_FRAME_LEN`] are lowered to it.
    pub fn with_max_frame(max_frame: usize) -> Self {
        FrameDecoder {
            buf: Vec::new(),
            start: 0,
            max_frame: max_frame.min(MAX_FRAME_LEN),
            pending: None,
            poisoned: false,
        }
    }

    /// The largest payload this decoder accepts.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Bytes pushed and not yet consumed.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Whether the decoder has failed (or found an error it has yet to report).
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Appends bytes read from the stream. Ignored once the decoder has failed.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.poisoned || bytes.is_empty() {
            return;
        }
        self.compact();
        self.buf.extend_from_slice(bytes);
        if let Err(e) = self.frame_len() {
            // `push` cannot return the error: park it for the next `next_message`.
            self.pending = Some(self.fail(e));
        }
    }

    /// Decodes the next complete frame: `Ok(None)` if more bytes are needed. See the type docs for
    /// errors.
    pub fn next_message(&mut self) -> Result<Option<Message>, CodecError> {
        if let Some(e) = self.pending.take() {
            return Err(e);
        }
        if self.poisoned {
            return Err(CodecError::Poisoned);
        }
        let len = match self.frame_len() {
            Ok(Some(len)) => len,
            Ok(None) => return Ok(None),
            Err(e) => return Err(self.fail(e)),
        };
        let begin = self.start + FRAME_HEADER_LEN;
        let end = begin + len;
        if self.buf.len() < end {
            return Ok(None);
        }
        let result = decode(&self.buf[begin..end]);
        self.start = end;
        if self.start == self.buf.len() {
            self.reset_buffer();
        }
        match result {
            Ok(msg) => Ok(Some(msg)),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// The payload length of the frame at the head of the buffer: `None` until its prefix is
    /// complete, an error if the prefix is out of bounds.
    fn frame_len(&self) -> Result<Option<usize>, CodecError> {
        let Some(prefix) = self
            .buf
            .get(self.start..self.start + FRAME_HEADER_LEN)
            .and_then(|p| <[u8; FRAME_HEADER_LEN]>::try_from(p).ok())
        else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(prefix);
        // On a 16-bit target a u32 may not fit; saturating still refuses it below.
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len == 0 {
            return Err(CodecError::EmptyFrame);
        }
        check_len(len, self.max_frame)?;
        Ok(Some(len))
    }

    /// Poisons the decoder and drops its buffer; returns `e` for reporting.
    fn fail(&mut self, e: CodecError) -> CodecError {
        self.poisoned = true;
        self.buf = Vec::new();
        self.start = 0;
        e
    }

    /// Moves unconsumed bytes to the front when at least as many bytes have been consumed, so each
    /// byte is moved at most about once per consumed byte.
    fn compact(&mut self) {
        if self.start == 0 {
            return;
        }
        if self.start == self.buf.len() {
            self.reset_buffer();
        } else if self.start >= self.buf.len() - self.start {
            self.buf.copy_within(self.start.., 0);
            self.buf.truncate(self.buf.len() - self.start);
            self.start = 0;
        }
    }

    /// Empties the buffer, releasing a large allocation.
    fn reset_buffer(&mut self) {
        self.start = 0;
        if self.buf.capacity() > RETAINED_CAPACITY {
            self.buf = Vec::new();
        } else {
            self.buf.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::collection::vec;
    use proptest::prelude::*;

    use super::*;
    use crate::bitfield::{ChunkBitmap, ChunkSet};
    use crate::wire::{
        Capabilities, Hello, MAX_HAVE_RUNS, MAX_IMAGE_CHUNKS, MAX_MANIFEST_BYTES,
        MAX_REQUEST_CHUNKS, MAX_UPDATE_INDICES, RejectReason, StageRefusal, strategies,
    };
    use crate::{ChunkId, ImageId, Priority};

    const IMAGE: ImageId = ImageId([7; 32]);
    const ID: ChunkId = ChunkId([9; 32]);

    fn every_variant() -> Vec<Message> {
        let mut bitmap = ChunkBitmap::new(1000);
        for i in (0..1000).step_by(3) {
            bitmap.insert(i);
        }
        vec![
            Message::Hello(Hello::new(
                "eu-west.dc_1",
                Capabilities::SERVE | Capabilities::MULTICAST,
                "vmswarm/0.1.0",
            )),
            Message::Have {
                image: IMAGE,
                chunks: bitmap.to_wire(),
            },
            Message::Have {
                image: IMAGE,
                chunks: ChunkBitmap::full(100_000).to_wire(),
            },
            Message::HaveUpdate {
                image: IMAGE,
                indices: vec![0, 1, 250, 251, 65_535, 65_536, MAX_IMAGE_CHUNKS - 1],
            },
            Message::Fetching {
                image: IMAGE,
                indices: vec![42],
            },
            Message::Need {
                image: IMAGE,
                priority: Priority::Demand,
                indices: vec![7, 9],
            },
            Message::Request {
                priority: Priority::Demand,
                chunks: vec![ID, ChunkId([1; 32])],
            },
            Message::Chunk {
                id: ChunkId::of(b"hello"),
                data: b"hello".to_vec(),
            },
            Message::Cancel { chunks: vec![ID] },
            Message::Reject {
                chunk: ID,
                reason: RejectReason::Shutdown,
            },
            Message::GetManifest { image: IMAGE },
            Message::Manifest {
                image: IMAGE,
                bytes: vec![1, 2, 3],
            },
            Message::ManifestNotFound { image: IMAGE },
            Message::GetBootProfile { image: IMAGE },
            Message::BootProfile {
                image: IMAGE,
                order: vec![9, 0, 4],
            },
            Message::BootProfileNotFound { image: IMAGE },
            Message::Stage { image: IMAGE },
            Message::StageRefused {
                image: IMAGE,
                reason: StageRefusal::NoManifest,
            },
        ]
    }

    /// Encodes with the wire configuration but without validation, to forge what a peer could send.
    fn raw<T: bincode::Encode>(value: &T) -> Vec<u8> {
        bincode::encode_to_vec(value, CONFIG).unwrap()
    }

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(payload);
        out
    }

    /// A slice length as bincode's varint encodes a `u64` above `u32::MAX`.
    fn varint_u64(v: u64) -> Vec<u8> {
        let mut out = vec![253];
        out.extend_from_slice(&v.to_le_bytes());
        out
    }

    fn decode_stream(dec: &mut FrameDecoder) -> Result<Vec<Message>, CodecError> {
        let mut out = Vec::new();
        while let Some(m) = dec.next_message()? {
            out.push(m);
        }
        Ok(out)
    }

    #[test]
    fn every_variant_round_trips() {
        let msgs = every_variant();
        let mut stream = Vec::new();
        for msg in &msgs {
            let payload = encode(msg).unwrap();
            assert_eq!(&decode(&payload).unwrap(), msg, "{}", msg.kind());
            let before = stream.len();
            encode_frame(msg, &mut stream).unwrap();
            assert_eq!(stream[before..], frame(&payload)[..]);
        }
        let mut dec = FrameDecoder::new();
        dec.push(&stream);
        assert_eq!(decode_stream(&mut dec).unwrap(), msgs);
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn pinned_encoding() {
        // Changing these bytes breaks compatibility with deployed peers: bump PROTOCOL_VERSION.
        let msg = Message::Reject {
            chunk: ChunkId([0xab; 32]),
            reason: RejectReason::Busy,
        };
        let mut expected = vec![7];
        expected.extend_from_slice(&[0xab; 32]);
        expected.push(1);
        assert_eq!(encode(&msg).unwrap(), expected);
        // `Fanout` was added after version 1 shipped: it is the next variant (older peers fail
        // to decode it, so it is only sent to peers announcing MULTICAST).
        let msg = Message::Reject {
            chunk: ChunkId([0xab; 32]),
            reason: RejectReason::Fanout,
        };
        expected.pop();
        expected.push(4);
        assert_eq!(encode(&msg).unwrap(), expected);
        let hello = Message::Hello(Hello::new("dc", Capabilities::SERVE, "a"));
        assert_eq!(encode(&hello).unwrap(), [0, 1, 2, b'd', b'c', 1, 1, b'a']);
    }

    #[test]
    fn largest_valid_messages_fit_the_limit() {
        // Every bound in `wire` must leave the message under the decode limit, which counts
        // in-memory sizes, and under MAX_FRAME_LEN on the wire.
        let big_ids: Vec<u32> = (0..MAX_UPDATE_INDICES as u32)
            .map(|i| MAX_IMAGE_CHUNKS - 1 - i)
            .collect();
        let runs: Vec<(u32, u32)> = (0..MAX_HAVE_RUNS as u32).map(|i| (i * 16, 1)).collect();
        let msgs = [
            Message::Chunk {
                id: ID,
                data: vec![0xa5; MAX_CHUNK_BYTES],
            },
            Message::Manifest {
                image: IMAGE,
                bytes: vec![0x5a; MAX_MANIFEST_BYTES],
            },
            Message::Have {
                image: IMAGE,
                chunks: ChunkSet::Bitmap {
                    count: MAX_IMAGE_CHUNKS,
                    bytes: vec![0xff; MAX_IMAGE_CHUNKS as usize / 8],
                },
            },
            Message::Have {
                image: IMAGE,
                chunks: ChunkSet::Runs {
                    count: MAX_IMAGE_CHUNKS,
                    runs,
                },
            },
            Message::HaveUpdate {
                image: IMAGE,
                indices: big_ids,
            },
            Message::Request {
                priority: Priority::Background,
                chunks: vec![ChunkId([0xff; 32]); MAX_REQUEST_CHUNKS],
            },
        ];
        for msg in &msgs {
            let mut framed = Vec::new();
            encode_frame(msg, &mut framed).unwrap();
            assert!(framed.len() <= MAX_FRAME_LEN + FRAME_HEADER_LEN);
            let mut dec = FrameDecoder::new();
            dec.push(&framed);
            assert_eq!(
                dec.next_message().unwrap().as_ref(),
                Some(msg),
                "{}",
                msg.kind()
            );
        }
    }

    #[test]
    fn oversized_prefix_is_refused_before_buffering() {
        let mut dec = FrameDecoder::new();
        let len = (MAX_FRAME_LEN as u32 + 1).to_be_bytes();
        dec.push(&len[..3]);
        assert_eq!(dec.next_message(), Ok(None));
        dec.push(&len[3..]);
        assert!(dec.is_poisoned(), "refused by push, from the prefix alone");
        assert_eq!(dec.buffered(), 0);
        assert_eq!(
            dec.next_message(),
            Err(CodecError::FrameTooLarge {
                len: MAX_FRAME_LEN + 1,
                max: MAX_FRAME_LEN
            })
        );
        dec.push(&[0; 1000]);
        assert_eq!(dec.buffered(), 0, "a failed decoder ignores pushes");
        assert_eq!(dec.next_message(), Err(CodecError::Poisoned));
        assert_eq!(dec.next_message(), Err(CodecError::Poisoned));

        let mut dec = FrameDecoder::new();
        dec.push(&[0xff; 4]);
        assert_eq!(
            dec.next_message(),
            Err(CodecError::FrameTooLarge {
                len: u32::MAX as usize,
                max: MAX_FRAME_LEN
            })
        );
    }

    #[test]
    fn lowered_max_frame() {
        let msg = Message::Chunk {
            id: ID,
            data: vec![0; 100],
        };
        let mut framed = Vec::new();
        encode_frame(&msg, &mut framed).unwrap();
        let payload_len = framed.len() - FRAME_HEADER_LEN;
        let mut dec = FrameDecoder::with_max_frame(payload_len);
        dec.push(&framed);
        assert_eq!(dec.next_message(), Ok(Some(msg.clone())));
        let mut dec = FrameDecoder::with_max_frame(payload_len - 1);
        dec.push(&framed[..FRAME_HEADER_LEN]);
        assert_eq!(
            dec.next_message(),
            Err(CodecError::FrameTooLarge {
                len: payload_len,
                max: payload_len - 1
            })
        );
        assert_eq!(
            FrameDecoder::with_max_frame(usize::MAX).max_frame(),
            MAX_FRAME_LEN
        );
    }

    #[test]
    fn empty_frame_is_an_error() {
        let mut dec = FrameDecoder::new();
        let mut stream = Vec::new();
        encode_frame(&Message::GetManifest { image: IMAGE }, &mut stream).unwrap();
        stream.extend_from_slice(&[0, 0, 0, 0]);
        dec.push(&stream);
        assert_eq!(
            dec.next_message(),
            Ok(Some(Message::GetManifest { image: IMAGE }))
        );
        assert_eq!(dec.next_message(), Err(CodecError::EmptyFrame));
        assert_eq!(dec.next_message(), Err(CodecError::Poisoned));
        assert!(matches!(decode(&[]), Err(CodecError::Decode(_))));
    }

    #[test]
    fn truncated_frame_waits_for_more_bytes() {
        let msg = Message::Manifest {
            image: IMAGE,
            bytes: vec![3; 1000],
        };
        let mut framed = Vec::new();
        encode_frame(&msg, &mut framed).unwrap();
        let mut dec = FrameDecoder::new();
        for cut in [0, 2, 4, 5, framed.len() - 1] {
            dec.push(&framed[dec.buffered()..cut]);
            assert_eq!(dec.next_message(), Ok(None), "after {cut} bytes");
            assert_eq!(dec.buffered(), cut);
        }
        dec.push(&framed[framed.len() - 1..]);
        assert_eq!(dec.next_message(), Ok(Some(msg)));
        assert_eq!(dec.next_message(), Ok(None));
        // Inside a complete frame, truncation is an error.
        let payload = &framed[FRAME_HEADER_LEN..framed.len() - 1];
        assert!(matches!(decode(payload), Err(CodecError::Decode(_))));
        let mut dec = FrameDecoder::new();
        dec.push(&frame(payload));
        assert!(matches!(dec.next_message(), Err(CodecError::Decode(_))));
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut payload = encode(&Message::GetManifest { image: IMAGE }).unwrap();
        payload.extend_from_slice(&[0, 0]);
        assert_eq!(
            decode(&payload),
            Err(CodecError::TrailingBytes { extra: 2 })
        );
        let mut dec = FrameDecoder::new();
        dec.push(&frame(&payload));
        assert_eq!(
            dec.next_message(),
            Err(CodecError::TrailingBytes { extra: 2 })
        );
    }

    #[test]
    fn invalid_messages_are_refused_both_ways() {
        let cases = [
            Message::Request {
                priority: Priority::Demand,
                chunks: vec![],
            },
            Message::Request {
                priority: Priority::Demand,
                chunks: vec![ID; MAX_REQUEST_CHUNKS + 1],
            },
            Message::Chunk {
                id: ID,
                data: vec![0; MAX_CHUNK_BYTES + 1],
            },
            Message::Hello(Hello::new("x".repeat(65), Capabilities::NONE, "")),
        ];
        for msg in cases {
            let err = msg.validate().unwrap_err();
            assert_eq!(decode(&raw(&msg)), Err(CodecError::Invalid(err.clone())));
            assert_eq!(encode(&msg), Err(CodecError::Invalid(err.clone())));
            let mut out = vec![1, 2, 3];
            assert_eq!(encode_frame(&msg, &mut out), Err(CodecError::Invalid(err)));
            assert_eq!(out, [1, 2, 3], "a failed encode_frame leaves `out` alone");
        }
    }

    #[test]
    fn unknown_discriminants_are_refused() {
        // Message has 18 variants, 0..=17 (11 is Ack, a unit variant: valid on its own).
        assert_eq!(decode(&[11]), Ok(Message::Ack));
        let err = decode(&[18]).unwrap_err();
        assert!(
            matches!(&err, CodecError::Decode(s) if s.contains("UnexpectedVariant")),
            "{err}"
        );
        // Reject (variant 7) with RejectReason 5 (there are 5 reasons, 0..=4).
        let mut payload = vec![7];
        payload.extend_from_slice(&[0; 32]);
        payload.push(5);
        let err = decode(&payload).unwrap_err();
        assert!(
            matches!(&err, CodecError::Decode(s) if s.contains("UnexpectedVariant")),
            "{err}"
        );
    }

    #[test]
    fn hostile_lengths_fail_before_allocating() {
        // Each payload announces a vector of 2^40 (or 2^64 - 1) elements and then ends. Without the
        // decode limit, bincode would call `Vec::with_capacity(len)` (or `vec![0u8; len]`) first and
        // abort the process on the failed allocation; reaching the assertions proves it did not.
        let mut cases: Vec<Vec<u8>> = Vec::new();
        for len in [1u64 << 40, u64::MAX, MAX_FRAME_LEN as u64 + 1] {
            // Request { priority: Demand, chunks: Vec<ChunkId> of `len` }
            let mut p = vec![4, 0];
            p.extend(varint_u64(len));
            cases.push(p);
            // Chunk { id, data: Vec<u8> of `len` }
            let mut p = vec![5];
            p.extend_from_slice(&[0; 32]);
            p.extend(varint_u64(len));
            cases.push(p);
            // HaveUpdate { image, indices: Vec<u32> of `len` }
            let mut p = vec![2];
            p.extend_from_slice(&[0; 32]);
            p.extend(varint_u64(len));
            cases.push(p);
            // Hello { version: 1, site: String of `len` bytes }
            let mut p = vec![0, 1];
            p.extend(varint_u64(len));
            cases.push(p);
            // Have { image, Runs { count: 0, runs: Vec<(u32, u32)> of `len` } }
            let mut p = vec![1];
            p.extend_from_slice(&[0; 32]);
            p.extend([1, 0]);
            p.extend(varint_u64(len));
            cases.push(p);
        }
        for payload in &cases {
            let err = decode(payload).unwrap_err();
            assert!(
                matches!(&err, CodecError::Decode(s) if s.contains("LimitExceeded")),
                "{payload:?}: {err}"
            );
            let mut dec = FrameDecoder::new();
            dec.push(&frame(payload));
            assert!(matches!(dec.next_message(), Err(CodecError::Decode(_))));
        }
    }

    #[test]
    fn oversized_payload_is_refused_by_decode() {
        let payload = vec![0; MAX_FRAME_LEN + 1];
        assert_eq!(
            decode(&payload),
            Err(CodecError::FrameTooLarge {
                len: MAX_FRAME_LEN + 1,
                max: MAX_FRAME_LEN
            })
        );
    }

    #[test]
    fn version_mismatch_decodes_and_is_reported_by_check() {
        let mut hello = Hello::new("dc1", Capabilities::SERVE, "vmswarm/9");
        hello.version = 9;
        let payload = encode(&Message::Hello(hello)).unwrap();
        let Message::Hello(back) = decode(&payload).unwrap() else {
            panic!("not a hello");
        };
        assert_eq!(
            back.check(),
            Err(crate::wire::HandshakeError::VersionMismatch { ours: 1, theirs: 9 })
        );
    }

    #[test]
    fn buffer_is_compacted_and_released() {
        let small = Message::Chunk {
            id: ID,
            data: vec![1; 3000],
        };
        let mut framed = Vec::new();
        encode_frame(&small, &mut framed).unwrap();
        let mut dec = FrameDecoder::new();
        // Pushing 1.5 frames at a time: the decoder never holds more than one partial frame plus
        // the push, however long the stream runs.
        let stream = framed.repeat(1000);
        let piece = framed.len() * 3 / 2;
        let mut decoded = 0;
        for chunk in stream.chunks(piece) {
            dec.push(chunk);
            assert!(dec.buffered() <= framed.len() + piece);
            decoded += decode_stream(&mut dec).unwrap().len();
            assert!(dec.buffered() < framed.len());
            assert!(dec.buf.capacity() <= 2 * (framed.len() + piece));
        }
        assert_eq!(decoded, 1000);

        let big = Message::Chunk {
            id: ID,
            data: vec![1; 4 * RETAINED_CAPACITY],
        };
        let mut framed = Vec::new();
        encode_frame(&big, &mut framed).unwrap();
        dec.push(&framed);
        assert_eq!(dec.next_message(), Ok(Some(big)));
        assert_eq!(
            dec.buf.capacity(),
            0,
            "a large buffer is released once empty"
        );
    }

    /// Message strategy with small payloads, so that many fit a test case.
    fn messages() -> impl Strategy<Value = Vec<Message>> {
        vec(strategies::message(2048), 1..6)
    }

    /// Splits `stream` into pieces whose sizes cycle through `sizes`.
    fn pieces<'a>(stream: &'a [u8], sizes: &'a [usize]) -> impl Iterator<Item = &'a [u8]> + 'a {
        let mut rest = stream;
        let mut sizes = sizes.iter().cycle();
        std::iter::from_fn(move || {
            if rest.is_empty() {
                return None;
            }
            let n = (*sizes.next()?).clamp(1, rest.len());
            let (head, tail) = rest.split_at(n);
            rest = tail;
            Some(head)
        })
    }

    #[test]
    fn chunk_heads_split_chunk_payloads() {
        for len in [
            0usize,
            1,
            250,
            251,
            65_535,
            65_536,
            262_144,
            MAX_CHUNK_BYTES,
        ] {
            let msg = Message::Chunk {
                id: ID,
                data: vec![7; len],
            };
            let payload = encode(&msg).unwrap();
            let head = chunk_payload_head(&ID, len).unwrap();
            assert!(head.len() <= MAX_CHUNK_HEAD_LEN);
            assert_eq!(&payload[..head.len()], &head[..], "len {len}");
            assert_eq!(payload.len(), head.len() + len);
            let prefix = &payload[..payload.len().min(MAX_CHUNK_HEAD_LEN)];
            assert_eq!(
                decode_chunk_head(prefix),
                Some(ChunkHead {
                    id: ID,
                    data_len: len,
                    head_len: head.len()
                })
            );
        }
        assert!(chunk_payload_head(&ID, MAX_CHUNK_BYTES + 1).is_err());
        assert_eq!(decode_chunk_head(&encode(&Message::Ack).unwrap()), None);
        assert_eq!(decode_chunk_head(&[]), None);
    }

    proptest! {
        #[test]
        fn a_recognised_chunk_head_decodes_like_the_whole_payload(
            msg in strategies::message(2048),
            cut in 0usize..4,
        ) {
            let payload = encode(&msg).unwrap();
            let prefix = &payload[..payload.len().min(MAX_CHUNK_HEAD_LEN)];
            match decode_chunk_head(prefix) {
                Some(h) => {
                    let Message::Chunk { id, data } = &msg else {
                        panic!("head recognised in {msg:?}");
                    };
                    prop_assert_eq!(h.id, *id);
                    prop_assert_eq!(h.data_len, data.len());
                    prop_assert_eq!(&payload[h.head_len..], &data[..]);
                }
                None => {
                    let is_chunk = matches!(msg, Message::Chunk { .. });
                    prop_assert!(!is_chunk, "chunk head not recognised");
                }
            }
            // A payload cut short still never yields a head promising more than it can hold.
            let short = &payload[..payload.len().saturating_sub(cut)];
            if let Some(h) = decode_chunk_head(&short[..short.len().min(MAX_CHUNK_HEAD_LEN)]) {
                if h.head_len + h.data_len == short.len() {
                    prop_assert_eq!(
                        decode(short).unwrap(),
                        Message::Chunk { id: h.id, data: short[h.head_len..].to_vec() }
                    );
                }
            }
        }

        #[test]
        fn streams_round_trip_in_random_pieces(
            msgs in messages(),
            sizes in prop_oneof![Just(vec![1usize]), vec(1usize..600, 1..20)],
        ) {
            let mut stream = Vec::new();
            for msg in &msgs {
                prop_assert_eq!(&decode(&encode(msg).unwrap()).unwrap(), msg);
                encode_frame(msg, &mut stream).unwrap();
            }
            let mut dec = FrameDecoder::new();
            let mut decoded = Vec::new();
            for piece in pieces(&stream, &sizes) {
                dec.push(piece);
                decoded.extend(decode_stream(&mut dec).unwrap());
            }
            prop_assert_eq!(decoded, msgs);
            prop_assert_eq!(dec.buffered(), 0);
        }

        #[test]
        fn decode_never_panics(bytes in vec(any::<u8>(), 0..512)) {
            if let Ok(msg) = decode(&bytes) {
                prop_assert_eq!(msg.validate(), Ok(()));
                prop_assert_eq!(decode(&encode(&msg).unwrap()).unwrap(), msg);
            }
        }

        #[test]
        fn decode_of_mutated_messages_never_panics(
            msg in strategies::message(64),
            flips in vec((any::<usize>(), any::<u8>()), 1..4),
        ) {
            let mut bytes = encode(&msg).unwrap();
            for (at, x) in flips {
                let at = at % bytes.len();
                bytes[at] ^= x;
            }
            if let Ok(back) = decode(&bytes) {
                prop_assert_eq!(back.validate(), Ok(()));
            }
        }

        #[test]
        fn frame_decoder_never_panics_and_stays_bounded(
            // Frames with plausible, short prefixes and random payloads, then arbitrary bytes.
            frames in vec((0u32..300, vec(any::<u8>(), 0..300)), 0..8),
            noise in vec(any::<u8>(), 0..64),
            sizes in vec(1usize..200, 1..10),
            max_frame in prop_oneof![Just(MAX_FRAME_LEN), 0usize..400],
        ) {
            let mut stream = Vec::new();
            for (len, payload) in &frames {
                stream.extend_from_slice(&len.to_be_bytes());
                stream.extend_from_slice(payload);
            }
            stream.extend_from_slice(&noise);
            let mut dec = FrameDecoder::with_max_frame(max_frame);
            for piece in pieces(&stream, &sizes) {
                dec.push(piece);
                prop_assert!(dec.buffered() <= dec.max_frame() + FRAME_HEADER_LEN + piece.len());
                loop {
                    match dec.next_message() {
                        Ok(Some(msg)) => prop_assert_eq!(msg.validate(), Ok(())),
                        Ok(None) => {
                            prop_assert!(dec.buffered() < dec.max_frame() + FRAME_HEADER_LEN);
                            break;
                        }
                        Err(_) => {
                            prop_assert!(dec.is_poisoned());
                            prop_assert_eq!(dec.buffered(), 0);
                            prop_assert_eq!(dec.next_message(), Err(CodecError::Poisoned));
                            break;
                        }
                    }
                }
            }
        }
    }
}
