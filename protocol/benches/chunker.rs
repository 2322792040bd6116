//! Chunker throughput against raw BLAKE3 on the same bytes, in the same run.
//!
//! Generates 1 GiB of seeded pseudo-random data once (and a sparse 1 GiB image, 90% zero chunks),
//! then measures:
//! - `raw_blake3_1GiB`: `blake3::hash` of the whole buffer, and of it in 256 KiB and 1 MiB slices
//!   (the fair baseline: the chunker hashes chunk by chunk);
//! - `chunker_1GiB`: [`Chunker`] over a `&[u8]` reader (copy into the chunk buffer, zero scan, hash)
//!   at 256 KiB and 1 MiB chunks;
//! - `chunker_sparse_1GiB`: the same on the sparse image, where zero chunks skip hashing;
//! - `zero_scan_256KiB`: the all-zero check on a zero chunk, against a naive `iter().all`.
//!
//! Run: `cargo bench -p vmswarm-protocol --bench chunker`. Small flat samples keep the whole run
//! near a minute.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput, measurement::WallTime};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vmswarm_protocol::chunker::{Chunker, is_all_zero};

const GIB: usize = 1 << 30;
const KIB_256: usize = 256 * 1024;
const MIB: usize = 1 << 20;

fn random_gib() -> Vec<u8> {
    let mut data = vec![0u8; GIB];
    ChaCha8Rng::seed_from_u64(0x5eed).fill_bytes(&mut data);
    data
}

/// 1 GiB where only every tenth 256 KiB chunk holds data.
fn sparse_gib(random: &[u8]) -> Vec<u8> {
    let mut data = vec![0u8; GIB];
    for (i, (dst, src)) in data
        .chunks_mut(KIB_256)
        .zip(random.chunks(KIB_256))
        .enumerate()
    {
        if i % 10 == 0 {
            dst.copy_from_slice(src);
        }
    }
    data
}

fn slow_group<'a>(c: &'a mut Criterion, name: &str, bytes: usize) -> BenchmarkGroup<'a, WallTime> {
    let mut g = c.benchmark_group(name);
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Bytes(bytes as u64));
    g
}

/// Runs a chunker over `data` and returns the chunk count (so nothing is optimised away).
fn chunk(data: &[u8], chunk_size: usize) -> u32 {
    let mut chunker = Chunker::new(data, chunk_size as u32).expect("valid chunk size");
    while let Some(view) = chunker.next_chunk().expect("reading a slice cannot fail") {
        black_box(view.id);
    }
    chunker.stats().chunks
}

fn benches(c: &mut Criterion) {
    let random = random_gib();
    let sparse = sparse_gib(&random);

    let mut g = slow_group(c, "raw_blake3_1GiB", GIB);
    g.bench_function("whole", |b| b.iter(|| blake3::hash(black_box(&random))));
    for (label, size) in [("slices_256KiB", KIB_256), ("slices_1MiB", MIB)] {
        g.bench_function(label, |b| {
            b.iter(|| {
                for slice in black_box(&random).chunks(size) {
                    black_box(blake3::hash(slice));
                }
            })
        });
    }
    g.finish();

    let mut g = slow_group(c, "chunker_1GiB", GIB);
    for (label, size) in [("256KiB", KIB_256), ("1MiB", MIB)] {
        g.bench_function(label, |b| b.iter(|| chunk(black_box(&random), size)));
    }
    g.finish();

    let mut g = slow_group(c, "chunker_sparse_1GiB", GIB);
    g.bench_function("256KiB_90pct_zero", |b| {
        b.iter(|| chunk(black_box(&sparse), KIB_256))
    });
    g.finish();

    let zeros = vec![0u8; KIB_256];
    let mut g = c.benchmark_group("zero_scan_256KiB");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(1))
        .throughput(Throughput::Bytes(KIB_256 as u64));
    g.bench_function("is_all_zero", |b| b.iter(|| is_all_zero(black_box(&zeros))));
    g.bench_function("iter_all_naive", |b| {
        b.iter(|| black_box(&zeros).iter().all(|&x| x == 0))
    });
    g.finish();
}

criterion::criterion_group!(chunker_benches, benches);
criterion::criterion_main!(chunker_benches);
