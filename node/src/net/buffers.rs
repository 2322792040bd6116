//! Recycled chunk buffers.
//!
//! This module decides that buffers of chunk size are reused instead of freed. A pull moves
//! thousands of 256 KiB chunks; each freshly allocated buffer of that size comes from newly mapped
//! pages, so every chunk paid page faults and the kernel's zeroing of each page (on the project's
//! VM, where the host backs guest memory lazily, about 5% of a puller's CPU). Buffers come from
//! [`take`] (receiving a chunk, reading one from the store to serve it) and go back with [`give`]
//! once their bytes are written (to the store, to the QUIC stream, or to an NBD client: a READ
//! reply's buffer comes from here too). At most [`MAX_POOLED`] buffers and [`MAX_POOLED_BYTES`]
//! bytes are kept, however large the image or the reads.
//!
//! It leaves to callers what the bytes mean: a buffer from [`take`] has the requested length and
//! unspecified contents, and every caller overwrites all of it.

use std::sync::{Mutex, PoisonError};

use vmswarm_protocol::wire::MAX_CHUNK_BYTES;

/// Most buffers kept for reuse.
pub const MAX_POOLED: usize = 64;
/// Most bytes (capacity) kept for reuse.
pub const MAX_POOLED_BYTES: usize = 64 << 20;
/// Buffers smaller than this are not worth keeping.
const MIN_POOLED: usize = 64 * 1024;

static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// A buffer of exactly `len` bytes with unspecified contents (zeros where it had to grow).
pub fn take(len: usize) -> Vec<u8> {
    let reused = if len >= MIN_POOLED {
        // A poisoned pool only ever holds whole Vecs: keep using it.
        POOL.lock().unwrap_or_else(PoisonError::into_inner).pop()
    } else {
        None
    };
    let mut buf = reused.unwrap_or_default();
    buf.truncate(len);
    buf.resize(len, 0);
    buf
}

/// Returns a buffer for reuse (dropped if the pool is full or the buffer is not chunk-sized).
pub fn give(buf: Vec<u8>) {
    if !(MIN_POOLED..=MAX_CHUNK_BYTES).contains(&buf.capacity()) {
        return;
    }
    let mut pool = POOL.lock().unwrap_or_else(PoisonError::into_inner);
    let held: usize = pool.iter().map(Vec::capacity).sum();
    if pool.len() < MAX_POOLED && held + buf.capacity() <= MAX_POOLED_BYTES {
        pool.push(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_have_the_asked_length_and_are_bounded() {
        let mut b = take(100_000);
        assert_eq!(b.len(), 100_000);
        b.fill(7);
        give(b);
        let again = take(50_000);
        assert_eq!(again.len(), 50_000);
        give(again);
        let grown = take(200_000);
        assert_eq!(grown.len(), 200_000);
        assert!(grown[100_000..].iter().all(|&x| x == 0), "growth is zeroed");
        give(vec![0; 10]); // too small: not kept
        for _ in 0..2 * MAX_POOLED {
            give(vec![0u8; MIN_POOLED]);
        }
        assert!(POOL.lock().unwrap().len() <= MAX_POOLED);
        for _ in 0..8 {
            give(vec![0u8; MAX_CHUNK_BYTES]);
        }
        let pool = POOL.lock().unwrap();
        assert!(pool.iter().map(Vec::capacity).sum::<usize>() <= MAX_POOLED_BYTES);
    }
}
