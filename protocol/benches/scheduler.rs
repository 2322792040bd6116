//! Fetch scheduler decisions per second, with 60,000 chunks (15 GiB at 256 KiB) and 100 peers.
//!
//! Peers: 25 in our site and 75 in three other sites (RTTs 2, 31, 75, 165 ms), each holding a seeded
//! random half of the image. Benchmarks:
//! - `setup`: connect the 100 peers with their Have bitmaps and want all 60,000 chunks;
//! - `full_pull_background`: from that state, a closed loop that answers every request at once with a
//!   valid chunk until nothing is wanted. Each answer triggers a scheduling pass; the figure is
//!   chunk decisions (requests issued) per second;
//! - `demand_burst`: 1,000 Demand wants arriving one by one on a scheduler already busy with the
//!   background pull (each `handle_want` assigns it ahead of the Background queue).
//!
//! Run: `cargo bench -p vmswarm-protocol --bench scheduler`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vmswarm_protocol::bitfield::ChunkBitmap;
use vmswarm_protocol::fetch::{Action, ChunkOutcome, Config, FetchScheduler, PeerInfo};
use vmswarm_protocol::{Instant, Priority};

const CHUNKS: u32 = 60_000;
const PEERS: u32 = 100;

struct World {
    infos: Vec<PeerInfo>,
    haves: Vec<ChunkBitmap>,
}

fn world() -> World {
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let sites = [("dc1", 2), ("dc2", 31), ("dc3", 75), ("dc4", 165)];
    let mut infos = Vec::new();
    let mut haves = Vec::new();
    for p in 0..PEERS {
        let (site, rtt) = sites[(p % 4) as usize];
        infos.push(PeerInfo {
            site: site.into(),
            rtt: Some(Duration::from_millis(rtt)),
            origin: false,
        });
        let mut have = ChunkBitmap::new(CHUNKS);
        for i in 0..CHUNKS {
            if rng.random::<bool>() {
                have.insert(i);
            }
        }
        haves.push(have);
    }
    World { infos, haves }
}

fn setup(w: &World) -> FetchScheduler<u32> {
    let config = Config {
        local_site: "dc1".into(),
        ..Config::default()
    };
    let mut s = FetchScheduler::new(config, CHUNKS, 7).expect("valid config");
    let now = Instant::ZERO;
    for p in 0..PEERS {
        s.handle_peer_connected(now, p, w.infos[p as usize].clone());
        s.handle_peer_have(now, &p, &w.haves[p as usize]);
    }
    s.handle_want_many(now, 0..CHUNKS, Priority::Background)
        .expect("indices in range");
    s
}

/// Answers requests in FIFO order until nothing is wanted; returns requests issued.
fn full_pull(s: &mut FetchScheduler<u32>) -> u64 {
    let mut pending = std::collections::VecDeque::new();
    let mut issued = 0u64;
    let mut now_ns = 1u64;
    loop {
        while let Some(a) = s.poll_action() {
            if let Action::Request { peer, indices, .. } = a {
                issued += indices.len() as u64;
                pending.extend(indices.into_iter().map(|i| (peer, i)));
            }
        }
        let Some((peer, index)) = pending.pop_front() else {
            break;
        };
        now_ns += 1_000;
        s.handle_chunk(
            Instant::from_nanos(now_ns),
            &peer,
            index,
            ChunkOutcome::Valid,
        );
    }
    assert_eq!(s.stats().wanted, 0, "the pull must complete");
    issued
}

fn bench(c: &mut Criterion) {
    let w = world();
    let mut g = c.benchmark_group("scheduler_60k_chunks_100_peers");
    g.sample_size(10).measurement_time(Duration::from_secs(20));

    g.throughput(Throughput::Elements(u64::from(CHUNKS)));
    g.bench_function("setup", |b| b.iter(|| black_box(setup(&w))));

    let issued = full_pull(&mut setup(&w));
    println!(
        "full pull issues {issued} requests for {CHUNKS} chunks (endgame duplicates included)"
    );
    g.throughput(Throughput::Elements(issued));
    g.bench_function("full_pull_background", |b| {
        // The scheduler is returned so that criterion drops it outside the timed section.
        b.iter_batched(
            || setup(&w),
            |mut s| {
                black_box(full_pull(&mut s));
                s
            },
            BatchSize::PerIteration,
        )
    });

    g.throughput(Throughput::Elements(1_000));
    g.bench_function("demand_burst", |b| {
        b.iter_batched(
            || {
                let mut s = setup(&w);
                while s.poll_action().is_some() {}
                s
            },
            |mut s| {
                for i in 0..1_000u32 {
                    let index = (i * 59) % CHUNKS;
                    s.handle_want(Instant::from_nanos(1), index, Priority::Demand)
                        .expect("index in range");
                }
                black_box(s.stats());
                s
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
