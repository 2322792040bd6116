//! Checks `codec::decode_chunk_head` against `codec::decode` on arbitrary payloads: whenever the
//! head is recognised and the payload is exactly the head plus the announced data, the full decoder
//! must produce the same chunk message. (The node reads chunk bytes straight into their buffer on
//! the strength of the head alone.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmswarm_protocol::codec::{self, MAX_CHUNK_HEAD_LEN};
use vmswarm_protocol::wire::Message;

fuzz_target!(|data: &[u8]| {
    let Some(h) = codec::decode_chunk_head(&data[..data.len().min(MAX_CHUNK_HEAD_LEN)]) else {
        return;
    };
    assert!(h.head_len <= MAX_CHUNK_HEAD_LEN);
    if h.head_len + h.data_len != data.len() {
        return;
    }
    let expected = Message::Chunk {
        id: h.id,
        data: data[h.head_len..].to_vec(),
    };
    assert_eq!(codec::decode(data), Ok(expected));
});
