//! Damage in the middle of a pack, made by hand on real files: the scan at open resynchronises past
//! a bad record, keeps every intact record after it, never indexes a chunk with wrong bytes, and
//! the open summary, `ChunkStore::verify` and `vmswarm verify` name the skipped range.
//!
//! The store writes chunks in batches of [`BATCH`] with `put_many`; each batch is followed by a
//! commit record, so the pack reads: 10 chunk records, a commit record, 10 chunk records, ...
//! Record 6 is chunk 5. Randomised tests print their seed; replay with `VMSWARM_TEST_SEED`.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use vmswarm_node::store::{ChunkStore, SkipKind, SkippedRange, StoreError, Verified};
use vmswarm_protocol::ChunkId;
use vmswarm_protocol::manifest::MIN_CHUNK_SIZE;

const HEADER: u64 = 64;
const BATCH: usize = 10;

/// A chunk as written: its id, bytes, and where its record lies in the pack.
#[derive(Debug, Clone)]
struct Written {
    id: ChunkId,
    data: Vec<u8>,
    pack: PathBuf,
    /// Offset of the record's header.
    header: u64,
}

impl Written {
    fn end(&self) -> u64 {
        self.header + HEADER + self.data.len() as u64
    }
}

/// Writes `sizes.len()` random chunks into a fresh store in `dir`, in batches of `batch`.
fn write_store(dir: &Path, sizes: &[usize], batch: usize, seed: u64) -> Vec<Written> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let chunks: Vec<(ChunkId, Vec<u8>)> = sizes
        .iter()
        .map(|&len| {
            let mut data = vec![0u8; len];
            rng.fill_bytes(&mut data);
            (ChunkId::of(&data), data)
        })
        .collect();
    let store = common::open_store(dir);
    for group in chunks.chunks(batch) {
        let verified: Vec<_> = group
            .iter()
            .map(|(id, data)| Verified::new(*id, data).unwrap())
            .collect();
        store.put_many(&verified).unwrap();
    }
    chunks
        .into_iter()
        .map(|(id, data)| {
            let loc = store.chunk_location(&id).unwrap();
            Written {
                id,
                data,
                pack: loc.path,
                header: loc.offset - HEADER,
            }
        })
        .collect()
}

fn xor_byte(path: &Path, at: u64, mask: u8) {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    file.read_exact_at(&mut b, at).unwrap();
    b[0] ^= mask;
    file.write_all_at(&b, at).unwrap();
}

/// Every chunk but those in `lost` is present with its bytes; those in `lost` are absent.
fn assert_present_except(store: &ChunkStore, chunks: &[Written], lost: &[usize], case: &str) {
    for (i, c) in chunks.iter().enumerate() {
        if lost.contains(&i) {
            assert!(!store.contains(&c.id), "{case}: damaged chunk {i} indexed");
            assert_eq!(store.get(&c.id).unwrap(), None, "{case}: chunk {i}");
        } else {
            assert!(store.contains(&c.id), "{case}: intact chunk {i} lost");
            assert_eq!(
                store.get(&c.id).unwrap().as_deref(),
                Some(&c.data[..]),
                "{case}: chunk {i}"
            );
        }
    }
}

fn sizes(n: usize) -> Vec<usize> {
    (0..n).map(|i| 1000 + i * 37).collect()
}

#[test]
fn one_damaged_record_header_loses_only_that_record() {
    // (case, offset within chunk 5's header of the flipped byte)
    for (case, at, mask) in [
        ("chunk id", 20, 0x01),
        ("length field", 9, 0x40),
        ("magic", 0, 0xff),
        ("kind", 4, 0x02),
        ("header check", 60, 0x80),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let chunks = write_store(dir.path(), &sizes(100), BATCH, 1);
        let victim = &chunks[5];
        xor_byte(&victim.pack, victim.header + at, mask);

        let store = common::open_store(dir.path());
        let expected = vec![SkippedRange {
            pack: victim.pack.clone(),
            offset: victim.header,
            len: victim.end() - victim.header,
            kind: SkipKind::Damaged,
        }];
        let summary = store.open_summary().clone();
        assert_eq!(summary.skipped, expected, "{case}");
        assert_eq!(summary.damaged_bytes, expected[0].len, "{case}");
        assert_eq!(summary.chunks, 99, "{case}");
        // Every chunk was re-hashed: those after the damage because nothing after it is trusted
        // unhashed, chunks 0-4 because no commit record precedes the damage.
        assert_eq!(summary.rehashed_chunks, 99, "{case}");
        assert_present_except(&store, &chunks, &[5], case);
        let report = store.verify().unwrap();
        assert!(!report.is_clean(), "{case}: verify says clean: {report:?}");
        assert_eq!(report.skipped_at_open, expected, "{case}");
        assert_eq!(report.damaged_ranges(), 1);
        assert_eq!(report.chunks_checked, 99, "{case}");
        assert!(report.corrupt_chunks.is_empty(), "{case}");
        drop(store);

        // Still reported (the bytes are left in place), and new writes go on as usual.
        let store = common::open_store(dir.path());
        assert_eq!(store.open_summary().skipped, expected, "{case}");
        store.put(&victim.id, &victim.data).unwrap();
        assert_eq!(store.get(&victim.id).unwrap().as_ref(), Some(&victim.data));
    }
}

#[test]
fn a_damaged_commit_record_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let chunks = write_store(dir.path(), &sizes(100), BATCH, 2);
    // The commit record of the first batch lies between chunk 9 and chunk 10.
    let commit = chunks[9].end();
    assert_eq!(chunks[10].header, commit + HEADER);
    xor_byte(&chunks[9].pack, commit + 50, 0x04);

    let store = common::open_store(dir.path());
    let expected = vec![SkippedRange {
        pack: chunks[9].pack.clone(),
        offset: commit,
        len: HEADER,
        kind: SkipKind::Damaged,
    }];
    assert_eq!(store.open_summary().skipped, expected);
    assert_present_except(&store, &chunks, &[], "commit");
    let report = store.verify().unwrap();
    assert!(!report.is_clean());
    assert_eq!(report.skipped_at_open, expected);
}

#[test]
fn a_commit_record_after_damage_vouches_for_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let chunks = write_store(dir.path(), &sizes(100), BATCH, 3);
    // Chunk 5's header and chunk 7's bytes: the commit record after them (the batch's) must not
    // make chunk 7 trusted without its hash.
    xor_byte(&chunks[5].pack, chunks[5].header + 30, 0x01);
    xor_byte(&chunks[7].pack, chunks[7].header + HEADER + 100, 0x01);

    let store = common::open_store(dir.path());
    let skipped = &store.open_summary().skipped;
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert_eq!(skipped[0].offset, chunks[5].header);
    assert_eq!(skipped[1].offset, chunks[7].header);
    assert_eq!(skipped[1].len, chunks[8].header - chunks[7].header);
    assert_present_except(&store, &chunks, &[5, 7], "commit after damage");
    let report = store.verify().unwrap();
    assert!(report.corrupt_chunks.is_empty(), "{report:?}");
    assert_eq!(report.damaged_ranges(), 2);
}

#[test]
fn a_torn_tail_is_reported_apart_from_damage() {
    let dir = tempfile::tempdir().unwrap();
    let chunks = write_store(dir.path(), &sizes(30), BATCH, 4);
    let last = &chunks[29];
    // A crash in the middle of the last chunk's bytes, and damage earlier on.
    let cut = last.header + HEADER + 10;
    fs::OpenOptions::new()
        .write(true)
        .open(&last.pack)
        .unwrap()
        .set_len(cut)
        .unwrap();
    xor_byte(&chunks[5].pack, chunks[5].header + 20, 0x01);

    let store = common::open_store(dir.path());
    let summary = store.open_summary();
    assert_eq!(
        summary.skipped,
        vec![
            SkippedRange {
                pack: last.pack.clone(),
                offset: chunks[5].header,
                len: chunks[5].end() - chunks[5].header,
                kind: SkipKind::Damaged,
            },
            SkippedRange {
                pack: last.pack.clone(),
                offset: last.header,
                len: HEADER + 10,
                kind: SkipKind::TornTail,
            },
        ]
    );
    assert_present_except(&store, &chunks, &[5, 29], "tail");
    drop(store);

    // A torn tail alone does not make the store unclean.
    let dir = tempfile::tempdir().unwrap();
    let chunks = write_store(dir.path(), &sizes(30), BATCH, 5);
    let last = &chunks[29];
    fs::OpenOptions::new()
        .write(true)
        .open(&last.pack)
        .unwrap()
        .set_len(last.header + HEADER + 10)
        .unwrap();
    let store = common::open_store(dir.path());
    let report = store.verify().unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.skipped_at_open.len(), 1);
    assert_eq!(report.skipped_at_open[0].kind, SkipKind::TornTail);
}

/// A chunk holding a whole pack (a VM image can hold a vmswarm store): when its own header is
/// damaged, the search finds the records inside it. Their chunks are kept only if they hash to
/// their ids, and the inner pack's commit records vouch for nothing, so a chunk of the inner pack
/// with damaged bytes is never indexed.
#[test]
fn headers_inside_chunk_bytes_are_never_trusted() {
    let inner_dir = tempfile::tempdir().unwrap();
    let inner = write_store(inner_dir.path(), &sizes(20), 5, 6);
    // Damage inner chunk 2's bytes; a commit record follows it in the inner pack.
    xor_byte(&inner[2].pack, inner[2].header + HEADER + 7, 0x20);
    let inner_pack = fs::read(&inner[0].pack).unwrap();
    assert!(
        inner[2].header < inner[4].end(),
        "a commit record vouches for it"
    );

    let dir = tempfile::tempdir().unwrap();
    let store = common::open_store(dir.path());
    let mut chunks = Vec::new();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for i in 0..12 {
        let data = if i == 5 {
            inner_pack.clone()
        } else {
            let mut d = vec![0u8; 2000 + i];
            rng.fill_bytes(&mut d);
            d
        };
        let id = ChunkId::of(&data);
        store.put(&id, &data).unwrap();
        let loc = store.chunk_location(&id).unwrap();
        chunks.push(Written {
            id,
            data,
            pack: loc.path,
            header: loc.offset - HEADER,
        });
    }
    drop(store);
    xor_byte(&chunks[5].pack, chunks[5].header + 20, 0x01);

    let store = common::open_store(dir.path());
    assert_present_except(&store, &chunks, &[5], "inner pack");
    // The intact inner chunks were found and hash right; the damaged one is not indexed, so `get`
    // does not even meet it.
    for (i, c) in inner.iter().enumerate() {
        if i == 2 {
            assert!(!store.contains(&c.id));
        } else {
            assert_eq!(
                store.get(&c.id).unwrap().as_ref(),
                Some(&c.data),
                "inner {i}"
            );
        }
    }
    let report = store.verify().unwrap();
    assert!(report.corrupt_chunks.is_empty(), "{report:?}");
    assert!(!report.is_clean());
}

/// `vmswarm verify` against a real daemon names the range skipped at start and is not clean.
#[test]
fn vmswarm_verify_reports_the_skipped_range() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    let image = tmp.path().join("disk.img");
    let data = common::make_image(&image, 40 * MIN_CHUNK_SIZE as usize, common::seed());
    let mut node = common::Node::start(&dir, "a", None, &[]);
    let image_id = common::publish(&node, &image);
    assert!(node.stop());

    // The 6th chunk record of the pack, found through the store's own index.
    let (victim, header, pack) = {
        let store = common::open_store(&dir.join("store"));
        let mut locs: Vec<_> = store
            .images()
            .iter()
            .flat_map(|id| store.manifest(id).unwrap().unwrap().chunks)
            .filter_map(|id| store.chunk_location(&id).map(|l| (l.offset, id, l.path)))
            .collect();
        locs.sort();
        locs.dedup();
        let (offset, id, path) = locs[5].clone();
        (id, offset - HEADER, path)
    };
    xor_byte(&pack, header + 20, 0x01);

    let node = common::Node::start(&dir, "a", None, &[]);
    let out = node.cli(&["verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["clean"], false, "{report}");
    let skipped = report["skipped_at_open"].as_array().unwrap();
    assert_eq!(skipped.len(), 1, "{report}");
    assert_eq!(skipped[0]["offset"], header, "{report}");
    assert_eq!(skipped[0]["kind"], "damaged", "{report}");
    assert_eq!(skipped[0]["pack"], pack.display().to_string(), "{report}");
    drop(node);

    // Only the damaged record is gone.
    let store = common::open_store(&dir.join("store"));
    let id = image_id.parse().unwrap();
    let manifest = store.manifest(&id).unwrap().unwrap();
    let missing: Vec<ChunkId> = store
        .missing_chunks(&manifest)
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    assert_eq!(missing, vec![victim]);
    assert!(data.len() > 5 * MIN_CHUNK_SIZE as usize);
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        failure_persistence: None,
        rng_seed: proptest::test_runner::RngSeed::Fixed(common::seed()),
        ..ProptestConfig::default()
    })]

    /// Random packs, random flipped bytes (half of them in record headers): `get` never returns
    /// wrong bytes, and every chunk whose record was not touched is still there.
    #[test]
    fn random_damage_never_serves_wrong_bytes_and_keeps_intact_records(
        seed in any::<u64>(),
        n in 1usize..60,
        batch in 1usize..8,
        flips in 1usize..6,
    ) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let sizes: Vec<usize> = (0..n).map(|_| rng.random_range(1..5000)).collect();
        let dir = tempfile::tempdir().unwrap();
        let chunks = write_store(dir.path(), &sizes, batch, seed);
        let pack = chunks[0].pack.clone();
        let pack_len = fs::metadata(&pack).unwrap().len();
        let mut touched = Vec::new();
        for _ in 0..flips {
            let at = if rng.random_bool(0.5) {
                chunks[rng.random_range(0..n)].header + rng.random_range(0..HEADER)
            } else {
                rng.random_range(0..pack_len)
            };
            xor_byte(&pack, at, rng.random_range(1..=255u8));
            touched.push(at);
        }
        let store = common::open_store(dir.path());
        let summary = store.open_summary().clone();
        for (i, c) in chunks.iter().enumerate() {
            let hit = touched.iter().any(|&t| t >= c.header && t < c.end());
            match store.get(&c.id) {
                Ok(Some(bytes)) => prop_assert_eq!(&bytes, &c.data, "chunk {}", i),
                Ok(None) => prop_assert!(hit, "intact chunk {} lost; flips {:?}; {:?}", i, touched, summary),
                Err(StoreError::CorruptChunk { .. }) => prop_assert!(hit, "chunk {}", i),
                Err(e) => prop_assert!(false, "chunk {}: {}", i, e),
            }
        }
        let skipped: u64 = summary.skipped.iter().map(|s| s.len).sum();
        prop_assert_eq!(skipped, summary.damaged_bytes);
        for s in &summary.skipped {
            prop_assert!(touched.iter().any(|&t| t >= s.offset && t < s.offset + s.len), "a skipped range without a flip: {:?}", s);
        }
    }
}
