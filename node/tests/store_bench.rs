//! Store figures, not a timed test: ignored by default. Run with
//!
//! ```text
//! cargo test -p vmswarm-node --release --test store_bench -- --ignored --nocapture
//! ```
//!
//! Prints BLAKE3 speed on one chunk, `put` throughput with full durability (pack append + shared
//! fdatasync) from 1, 4 and 16 threads, verified `get` against unverified `read_at`, import
//! throughput, and the time to open a store of 60,000 chunks (index built from pack headers).
//! Uses a temp dir on the file system holding `TMPDIR`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vmswarm_node::store::{ChunkStore, Verified};
use vmswarm_protocol::ChunkId;
use vmswarm_protocol::manifest::DEFAULT_CHUNK_SIZE;

const CHUNK: usize = DEFAULT_CHUNK_SIZE as usize;
const MIB: f64 = 1024.0 * 1024.0;

fn chunks(seed: u64, n: usize) -> Vec<(ChunkId, Vec<u8>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let mut data = vec![0u8; CHUNK];
            rng.fill_bytes(&mut data);
            (ChunkId::of(&data), data)
        })
        .collect()
}

fn rate(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / MIB / d.as_secs_f64()
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn store_figures() {
    // BLAKE3 on one default-size chunk.
    let data = chunks(1, 1).pop().unwrap().1;
    let reps = 2000;
    let t = Instant::now();
    for _ in 0..reps {
        std::hint::black_box(ChunkId::of(std::hint::black_box(&data)));
    }
    let d = t.elapsed();
    println!(
        "blake3, one 256 KiB chunk: {:.0} MiB/s ({:.1} us per chunk)",
        rate(reps * CHUNK, d),
        d.as_secs_f64() * 1e6 / reps as f64
    );

    // put throughput, full durability.
    for threads in [1usize, 4, 16] {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(ChunkStore::open(dir.path()).unwrap());
        let n = 64 * threads.min(4);
        let work = Arc::new(chunks(threads as u64 + 10, n));
        let t = Instant::now();
        let handles: Vec<_> = (0..threads)
            .map(|k| {
                let store = Arc::clone(&store);
                let work = Arc::clone(&work);
                std::thread::spawn(move || {
                    for (id, data) in work.iter().skip(k).step_by(threads) {
                        store.put(id, data).unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let d = t.elapsed();
        println!(
            "put, {threads:2} threads, {n} x 256 KiB: {:.1} MiB/s ({:.2} ms per chunk per thread)",
            rate(n * CHUNK, d),
            d.as_secs_f64() * 1e3 * threads as f64 / n as f64
        );

        if threads == 4 {
            // Reads, warm page cache.
            let mut buf = Vec::new();
            let t = Instant::now();
            for _ in 0..4 {
                for (id, _) in work.iter() {
                    assert!(store.get_into(id, &mut buf).unwrap());
                }
            }
            let d_get = t.elapsed();
            let mut raw = vec![0u8; CHUNK];
            let t = Instant::now();
            for _ in 0..4 {
                for (id, _) in work.iter() {
                    assert!(store.read_at(id, 0, &mut raw).unwrap());
                }
            }
            let d_raw = t.elapsed();
            println!(
                "get (verified) {:.0} MiB/s vs read_at of whole chunks (unverified) {:.0} MiB/s, warm cache",
                rate(4 * n * CHUNK, d_get),
                rate(4 * n * CHUNK, d_raw)
            );
        }
    }

    // Import of a 128 MiB random image.
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path()).unwrap();
    let mut image = vec![0u8; 128 << 20];
    ChaCha8Rng::seed_from_u64(99).fill_bytes(&mut image);
    let t = Instant::now();
    let (_, stats) = store
        .import_image(
            &image[..],
            DEFAULT_CHUNK_SIZE,
            "bench".into(),
            None,
            BTreeMap::new(),
        )
        .unwrap();
    let d = t.elapsed();
    println!(
        "import, 128 MiB random image: {:.1} MiB/s ({} chunks stored)",
        rate(image.len(), d),
        stats.stored_chunks
    );
    drop(store);

    // Open with 60,000 chunks: the index comes from the pack headers. The chunks are tiny (only
    // their headers matter here) and committed in batches of 1,000.
    let dir = tempfile::tempdir().unwrap();
    {
        let store = ChunkStore::open(dir.path()).unwrap();
        // Never all zeros (zero chunks are not stored).
        let data: Vec<[u8; 8]> = (0..60_000u64)
            .map(|i| (i | 1 << 40).to_le_bytes())
            .collect();
        let ids: Vec<ChunkId> = data.iter().map(|d| ChunkId::of(d)).collect();
        for (ids, data) in ids.chunks(1000).zip(data.chunks(1000)) {
            let batch: Vec<Verified<'_>> = ids
                .iter()
                .zip(data)
                .map(|(id, d)| Verified::new(*id, d).unwrap())
                .collect();
            store.put_many(&batch).unwrap();
        }
    }
    let t = Instant::now();
    let store = ChunkStore::open(dir.path()).unwrap();
    let d = t.elapsed();
    assert_eq!(store.stats().chunks, 60_000);
    assert_eq!(store.stats().chunk_reads, 0);
    println!(
        "open, 60,000 chunks (headers in a warm page cache): {:.0} ms",
        d.as_secs_f64() * 1e3
    );
}
