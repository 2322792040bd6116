//! Feeds arbitrary bytes, split at points derived from the input's first bytes, through a
//! `FrameDecoder`, and checks that every decoded message re-encodes to an equal message and that the
//! decoder's buffer stays within its documented bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmswarm_protocol::codec::{self, CodecError, FRAME_HEADER_LEN, FrameDecoder};
use vmswarm_protocol::wire::Message;

fuzz_target!(|data: &[u8]| {
    // Byte 0: maximum frame length (full size, or small to exercise the prefix check).
    // Bytes 1..4: seed of the piece sizes. The rest is the stream.
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Some((seed, stream)) = rest.split_first_chunk::<4>() else {
        return;
    };
    let mut dec = if mode & 1 == 0 {
        FrameDecoder::new()
    } else {
        FrameDecoder::with_max_frame(usize::from(mode) * 8)
    };
    let mut state = u32::from_le_bytes(*seed) | 1;
    let mut rest = stream;
    while !rest.is_empty() {
        // xorshift32: piece sizes of 1 to 256 bytes, or everything left.
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let n = if state % 16 == 0 {
            rest.len()
        } else {
            (state as usize % 256 + 1).min(rest.len())
        };
        let (piece, tail) = rest.split_at(n);
        rest = tail;
        dec.push(piece);
        assert!(dec.buffered() <= dec.max_frame() + FRAME_HEADER_LEN + piece.len());
        loop {
            match dec.next_message() {
                Ok(Some(msg)) => check_round_trip(&msg),
                Ok(None) => {
                    assert!(dec.buffered() < dec.max_frame() + FRAME_HEADER_LEN);
                    break;
                }
                Err(_) => {
                    assert!(dec.is_poisoned());
                    assert_eq!(dec.buffered(), 0);
                    assert_eq!(dec.next_message(), Err(CodecError::Poisoned));
                    return;
                }
            }
        }
    }
});

fn check_round_trip(msg: &Message) {
    let payload = codec::encode(msg).expect("a decoded message re-encodes");
    assert_eq!(&codec::decode(&payload).expect("re-encoding decodes"), msg);
    let mut framed = Vec::new();
    codec::encode_frame(msg, &mut framed).expect("a decoded message re-frames");
    let mut dec = FrameDecoder::new();
    dec.push(&framed);
    assert_eq!(dec.next_message(), Ok(Some(msg.clone())));
    assert_eq!(dec.next_message(), Ok(None));
}
