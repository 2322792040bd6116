//! Decodes arbitrary bytes as a payload; for every `Have`, validates its chunk set against an image
//! of the set's own count (capped at 2^20 chunks) and checks that a valid set survives a round trip
//! through `ChunkBitmap`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmswarm_protocol::bitfield::ChunkBitmap;
use vmswarm_protocol::codec;
use vmswarm_protocol::wire::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = codec::decode(data) else {
        return;
    };
    if let Message::Have { chunks, .. } = &msg {
        let count = chunks.count().min(1 << 20);
        if let Ok(bitmap) = ChunkBitmap::from_wire(chunks, count) {
            assert_eq!(bitmap.len(), count);
            assert_eq!(bitmap.count() as usize, bitmap.iter().count());
            let again = ChunkBitmap::from_wire(&bitmap.to_wire(), count).expect("to_wire is valid");
            assert_eq!(again, bitmap);
        }
    }
});
