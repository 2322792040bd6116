use std::collections::BTreeMap;
use std::fs;
use std::io::Cursor;
use std::sync::Arc;

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vmswarm_protocol::manifest::{MIN_CHUNK_SIZE, zero_chunk_id};

use super::*;

fn random_bytes(rng: &mut ChaCha8Rng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

fn chunk(seed: u64, len: usize) -> (ChunkId, Vec<u8>) {
    let data = random_bytes(&mut ChaCha8Rng::seed_from_u64(seed), len);
    (ChunkId::of(&data), data)
}

fn tmp_files(store: &ChunkStore) -> usize {
    fs::read_dir(&store.tmp_dir).unwrap().count()
}

fn pack_bytes(store: &ChunkStore) -> u64 {
    fs::read_dir(store.root().join(PACKS_DIR))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

/// XORs `mask` into byte `at` of chunk `id` where it lies on disk, behind the store's back.
fn flip_on_disk(store: &ChunkStore, id: &ChunkId, at: u64, mask: u8) {
    use std::os::unix::fs::FileExt;
    let loc = store.chunk_location(id).unwrap();
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&loc.path)
        .unwrap();
    let mut b = [0u8];
    file.read_exact_at(&mut b, loc.offset + at).unwrap();
    b[0] ^= mask;
    file.write_all_at(&b, loc.offset + at).unwrap();
}

/// An image of `chunks` chunks of MIN_CHUNK_SIZE plus a `tail`-byte tail; chunk `i` is zero when
/// `zero(i)`; random otherwise.
fn image(seed: u64, chunks: usize, tail: usize, zero: impl Fn(usize) -> bool) -> Vec<u8> {
    let cs = MIN_CHUNK_SIZE as usize;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut img = random_bytes(&mut rng, chunks * cs + tail);
    for i in 0..chunks + usize::from(tail > 0) {
        if zero(i) {
            let end = ((i + 1) * cs).min(img.len());
            img[i * cs..end].fill(0);
        }
    }
    img
}

fn import(store: &ChunkStore, img: &[u8], name: &str) -> (Manifest, ImportStats) {
    store
        .import_image(img, MIN_CHUNK_SIZE, name.to_owned(), None, BTreeMap::new())
        .unwrap()
}

#[test]
fn put_get_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path()).unwrap();
    let (id, data) = chunk(1, 100_000);
    assert!(!store.contains(&id));
    assert_eq!(store.get(&id).unwrap(), None);
    assert_eq!(store.put(&id, &data).unwrap(), Put::Stored);
    assert!(store.contains(&id));
    assert_eq!(store.chunk_len(&id), Some(100_000));
    assert_eq!(store.get(&id).unwrap().as_deref(), Some(&data[..]));
    let loc = store.chunk_location(&id).unwrap();
    assert!(loc.path.is_file());
    assert_eq!(loc.len, 100_000);
    assert_eq!(tmp_files(&store), 0);

    let mut part = [0u8; 1000];
    assert!(store.read_at(&id, 5000, &mut part).unwrap());
    assert_eq!(&part[..], &data[5000..6000]);
    let mut end = [0u8; 10];
    assert!(store.read_at(&id, 99_990, &mut end).unwrap());
    assert!(matches!(
        store.read_at(&id, 99_991, &mut end),
        Err(StoreError::OutOfRange {
            chunk_len: 100_000,
            ..
        })
    ));
    let (absent, _) = chunk(2, 10);
    assert!(!store.read_at(&absent, 0, &mut end).unwrap());

    let stats = store.stats();
    assert_eq!((stats.chunks, stats.bytes, stats.images), (1, 100_000, 0));
}

#[test]
fn put_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path()).unwrap();
    let (id, data) = chunk(3, 70_000);
    assert_eq!(store.put(&id, &data).unwrap(), Put::Stored);
    assert_eq!(store.put(&id, &data).unwrap(), Put::AlreadyPresent);
    assert_eq!(store.stats().chunks, 1);
    assert_eq!(store.stats().bytes, 70_000);
    assert_eq!(tmp_files(&store), 0);
}

#[test]
fn hash_mismatch_is_refused_and_nothing_written() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path()).unwrap();
    let (id, mut data) = chunk(4, 4096);
    data[17] ^= 1;
    match store.put(&id, &data) {
        Err(StoreError::HashMismatch {
            expected,
            actual,
            len,
        }) => {
            assert_eq!(expected, id);
            assert_eq!(actual, ChunkId::of(&data));
            assert_eq!(len, 4096);
        }
        other => panic!("expected a hash mismatch, got {other:?}"),
    }
    assert!(!store.contains(&id));
    assert!(store.chunk_location(&id).is_none());
    assert_eq!(pack_bytes(&store), 0, "nothing may be written");
    assert_eq!(tmp_files(&store), 0);
    assert_eq!(store.stats().chunks, 0);
}

#[test]
fn zero_and_oversized_chunks_are_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path()).unwrap();
    let zeros = vec![0u8; MIN_CHUNK_SIZE as usize];
    let zid = zero_chunk_id(MIN_CHUNK_SIZE);
    assert_eq!(store.put(&zid, &zeros).unwrap(), Put::Zero);
    assert!(!store.contains(&zid));
    assert_eq!(store.stats().chunks, 0);

    let big = vec![1u8; MAX_CHUNK_SIZE as usize + 1];
    let bid = ChunkId::of(&big);
    assert!(matches!(
        store.put(&bid, &big),
        Err(StoreError::ChunkTooLarge { .. })
    ));
}

#[test]
fn dedup_across_images() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path()).unwrap();
    let base = image(5, 6, 0, |_| false);
    // The derivative shares chunks 0..4 and changes the last two.
    let mut derived = base.clone();
    let cs = MIN_CHUNK_SIZE as usize;
    derived[4 * cs..].copy_from_slice(&image(6, 2, 0, |_| false));
    let (m1, s1) = import(&store, &base, "base");
    assert_eq!((s1.stored_chunks, s1.deduplicated_chunks), (6, 0));
    let (m2, s2) = import(&store, &derived, "derived");
    assert_eq!((s2.stored_chunks, s2.deduplicated_chunks), (2, 4));
    assert_eq!(store.stats().chunks, 8);
    assert_eq!(store.stats().bytes, 8 * cs as u64);
    assert_eq!(store.images().len(), 2);
    for m in [&m1, &m2] {
        assert!(store.image_status(m).complete);
    }
    // Same chunk offered again under "another image": still one copy.
    let (id, data) = (m1.chunks[0], &base[..cs]);
    assert_eq!(store.put(&id, data).unwrap(), Put::AlreadyPresent);
    assert_eq!(store.stats().chunks, 8);
}

#[test]
fn reopen_rebuilds_the_index_from_headers_without_reading_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let mut ids = Vec::new();
    let manifest_id;
    {
        let store = ChunkStore::open(dir.path()).unwrap();
        for seed in 0..20 {
            let (id, data) = chunk(100 + seed, 1000 + seed as usize);
            store.put(&id, &data).unwrap();
            ids.push(id);
        }
        let (m, _) = import(&store, &image(7, 3, 1000, |i| i == 1), "img");
        manifest_id = m.id();
        assert!(store.missing_chunks(&m).is_empty());
    }
    // Damage one committed chunk's bytes: if open read the bytes, it would notice.
    let victim = ids[0];
    let store = ChunkStore::open(dir.path()).unwrap();
    assert_eq!(store.open_summary().rehashed_chunks, 0);
    flip_on_disk(&store, &victim, 500, 0xAA);
    drop(store);

    let store = ChunkStore::open(dir.path()).unwrap();
    let stats = store.stats();
    assert_eq!(stats.chunk_reads, 0, "open must not read chunk files");
    assert_eq!(stats.read_bytes, 0);
    assert_eq!(stats.chunks, 20 + 3);
    assert_eq!(store.open_summary().chunks, 23);
    assert!(ids.iter().all(|id| store.contains(id)));
    assert_eq!(store.images(), vec![manifest_id]);
    assert_eq!(store.chunk_len(&ids[5]), Some(1005));
    // The garbage is caught on the first full read, and quarantined.
    assert!(matches!(
        store.get(&victim),
        Err(StoreError::CorruptChunk { id, .. }) if id == victim
    ));
    assert!(!store.contains(&victim));
    assert_eq!(store.get(&victim).unwrap(), None);
    assert_eq!(store.stats().chunks, 22);
    drop(store);
    // The quarantine is durable (a tombstone); a fresh copy put afterwards wins over it.
    let store = ChunkStore::open(dir.path()).unwrap();
    assert!(!store.contains(&victim));
    assert_eq!(store.stats().chunks, 22);
    let (_, data) = chunk(100, 1000);
    assert_eq!(store.put(&victim, &data).unwrap(), Put::Stored);
    drop(store);
    let store = ChunkStore::open(dir.path()).unwrap();
    assert_eq!(store.get(&victim).unwrap(), Some(data));
    assert_eq!(store.stats().chunks, 23);
    assert!(store.verify().unwrap().is_clean());
}

#[test]
fn put_many_commits_a_batch_and_reports_each_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path()).unwrap();
    let (a, da) = chunk(40, 3000);
    let (b, db) = chunk(41, 5000);
    let zeros = vec![0u8; 4096];
    let z = ChunkId::of(&zeros);
    assert_eq!(store.put(&a, &da).unwrap(), Put::Stored);
    let batch = [
        Verified::new(a, &da).unwrap(),
        Verified::new(b, &db).unwrap(),
        Verified::new(b, &db).unwrap(),
        Verified::new(z, &zeros).unwrap(),
    ];
    assert_eq!(
        store.put_many(&batch).unwrap(),
        vec![
            Put::AlreadyPresent,
            Put::Stored,
            Put::AlreadyPresent,
            Put::Zero
        ]
    );
    assert_eq!(store.get(&b).unwrap(), Some(db.clone()));
    assert_eq!(store.stats().chunks, 2);
    assert_eq!(store.stats().bytes, 8000);
    // A chunk whose bytes do not hash to its id cannot even be made into a batch entry.
    assert!(matches!(
        Verified::new(a, &db),
        Err(StoreError::HashMismatch { .. })
    ));
    assert!(store.remove(&a).unwrap());
    assert!(!store.remove(&a).unwrap());
    drop(store);
    let store = ChunkStore::open(dir.path()).unwrap();
    assert!(!store.contains(&a), "the removal is durable");
    assert_eq!(store.get(&b).unwrap(), Some(db));
    assert_eq!(store.open_summary().packs, 1);
    // A new process appends to a new pack, never to one an earlier process wrote.
    store.put(&a, &da).unwrap();
    assert_eq!(
        store.chunk_location(&a).unwrap().path.file_name().unwrap(),
        "00000002.pack"
    );
}

#[test]
fn open_removes_stale_temp_files_and_ignores_torn_pack_tails() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let (id, data) = chunk(8, 5000);
    let pack_path;
    {
        let store = ChunkStore::open(dir.path()).unwrap();
        store.put(&id, &data).unwrap();
        pack_path = store.chunk_location(&id).unwrap().path;
    }
    fs::write(dir.path().join("tmp/deadbeef.1.2.tmp"), b"half a chunk").unwrap();
    fs::write(dir.path().join("tmp/other.tmp"), b"").unwrap();
    fs::write(dir.path().join("packs/not-a-pack"), b"x").unwrap();
    // What a crash can leave after the last commit record: a whole chunk record that made it
    // (kept: its bytes hash to its id), then one whose bytes are wrong (torn), then half a header.
    let (good, good_data) = chunk(9, 3000);
    let (torn, torn_data) = chunk(10, 3000);
    let mut tail = Vec::new();
    tail.extend_from_slice(
        &pack::Record::Chunk {
            id: good,
            len: 3000,
        }
        .encode(),
    );
    tail.extend_from_slice(&good_data);
    tail.extend_from_slice(
        &pack::Record::Chunk {
            id: torn,
            len: 3000,
        }
        .encode(),
    );
    tail.extend_from_slice(&torn_data[..1000]);
    tail.extend_from_slice(&[0u8; 2000]);
    tail.extend_from_slice(&[0x56, 0x53, 0x50]);
    let damaged = (64 + 3000 + 3) as u64;
    fs::OpenOptions::new()
        .append(true)
        .open(&pack_path)
        .unwrap()
        .write_all(&tail)
        .unwrap();

    let store = ChunkStore::open(dir.path()).unwrap();
    let summary = store.open_summary();
    assert_eq!(summary.stale_temp_files, 2);
    assert_eq!(summary.ignored_entries, 1);
    assert_eq!(summary.rehashed_chunks, 2);
    assert_eq!(summary.damaged_bytes, damaged);
    assert_eq!(tmp_files(&store), 0);
    assert!(store.contains(&id));
    assert!(store.contains(&good));
    assert!(!store.contains(&torn));
    assert_eq!(store.get(&good).unwrap(), Some(good_data));
    assert!(store.verify().unwrap().is_clean());
    // The damaged tail is left where it is, and later writes go to a new pack.
    store.put(&torn, &torn_data).unwrap();
    drop(store);
    let store = ChunkStore::open(dir.path()).unwrap();
    assert_eq!(store.open_summary().damaged_bytes, damaged);
    assert_eq!(store.get(&torn).unwrap(), Some(torn_data));
}

#[test]
fn verify_quarantines_a_flipped_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path()).unwrap();
    let chunks: Vec<_> = (0..10).map(|s| chunk(200 + s, 20_000)).collect();
    for (id, data) in &chunks {
        store.put(id, data).unwrap();
    }
    let m = Manifest::new(
        20_000,
        MIN_CHUNK_SIZE,
        vec![chunks[0].0],
        "tiny".into(),
        None,
        BTreeMap::new(),
    )
    .unwrap();
    let mid = store.put_manifest(&m).unwrap();

    let clean = store.verify().unwrap();
    assert!(clean.is_clean());
    assert_eq!(clean.chunks_checked, 10);
    assert_eq!(clean.bytes_checked, 200_000);
    assert_eq!(clean.manifests_checked, 1);

    // Flip one bit of chunk 3 on disk, in place.
    let (bad, _) = chunks[3];
    flip_on_disk(&store, &bad, 12_345, 0x10);
    let report = store.verify().unwrap();
    assert!(!report.is_clean());
    assert_eq!(report.corrupt_chunks, vec![bad]);
    assert!(report.vanished_chunks.is_empty());
    assert_eq!(report.chunks_checked, 10);
    assert!(!store.contains(&bad));
    assert!(store.chunk_location(&bad).is_none());

    // Cut the pack short in the middle of a chunk, behind the store's back.
    let (gone, _) = chunks[9];
    let loc = store.chunk_location(&gone).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&loc.path)
        .unwrap()
        .set_len(loc.offset + 10)
        .unwrap();
    let report = store.verify().unwrap();
    assert_eq!(report.vanished_chunks, vec![gone]);
    assert!(report.corrupt_chunks.is_empty());
    assert_eq!(report.chunks_checked, 8);
    assert!(!store.contains(&gone));
    let quarantined: Vec<_> = fs::read_dir(store.quarantine_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(quarantined.len(), 1);
    assert!(quarantined[0].starts_with(&format!("chunk-{bad}")));
    assert_eq!(store.stats().chunks, 8);
    assert_eq!(store.stats().bytes, 160_000);

    // The chunk can be fetched again, and the store is clean afterwards.
    store.put(&bad, &chunks[3].1).unwrap();
    assert!(store.verify().unwrap().is_clean());
    assert_eq!(store.manifest(&mid).unwrap(), Some(m));
}

#[test]
fn manifests_round_trip_and_corrupt_ones_are_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(9, 2, 10, |_| false);
    let (m, _) = {
        let store = ChunkStore::open(dir.path()).unwrap();
        import(&store, &img, "disk")
    };
    let id = m.id();
    let store = ChunkStore::open(dir.path()).unwrap();
    assert!(store.has_manifest(&id));
    assert_eq!(store.manifest(&id).unwrap().as_ref(), Some(&m));
    assert_eq!(store.put_manifest(&m).unwrap(), id);
    let other = ImageId([7; 32]);
    assert_eq!(store.manifest(&other).unwrap(), None);

    // An invalid manifest is refused.
    let mut bad = m.clone();
    bad.chunks.pop();
    assert!(matches!(
        store.put_manifest(&bad),
        Err(StoreError::InvalidManifest { .. })
    ));

    // A manifest file damaged on disk is caught by `manifest` and quarantined.
    let path = store.manifest_path(&id);
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&path, bytes).unwrap();
    assert!(matches!(
        store.manifest(&id),
        Err(StoreError::CorruptManifest { .. })
    ));
    assert!(!store.has_manifest(&id));
    assert!(store.images().is_empty());
    assert_eq!(store.put_manifest(&m).unwrap(), id);
    assert!(store.verify().unwrap().is_clean());
}

#[test]
fn import_export_round_trip_with_zero_chunks_and_short_tail() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path()).unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let cases: [(&str, Vec<u8>); 4] = [
        // Zero chunks in the middle, a short random tail.
        (
            "tail",
            image(10, 12, 12_345, |i| i == 0 || i == 5 || i == 6),
        ),
        // Ends in zero chunks (a zero short tail): the export must still have the right length.
        ("zero-end", image(11, 5, 777, |i| i >= 3)),
        // Nothing but zeros.
        ("all-zero", vec![0u8; 3 * MIN_CHUNK_SIZE as usize + 5]),
        // A repeated chunk.
        ("repeat", {
            let one = image(12, 1, 0, |_| false);
            [one.clone(), one.clone(), one].concat()
        }),
    ];
    for (name, img) in cases {
        let (m, stats) = import(&store, &img, name);
        assert_eq!(stats.bytes, img.len() as u64, "{name}");
        assert_eq!(m.image_size, img.len() as u64);
        assert_eq!(
            u64::from(stats.chunks - stats.zero_chunks),
            stats.stored_chunks + stats.deduplicated_chunks,
            "{name}"
        );
        let status = store.image_status(&m);
        assert!(status.complete, "{name}");
        assert_eq!(status.present_bytes, img.len() as u64);
        assert_eq!(status.zero_chunks, stats.zero_chunks);
        assert_eq!(store.manifest(&m.id()).unwrap().as_ref(), Some(&m));

        // To a writer...
        let mut out = Cursor::new(Vec::new());
        let e = store.export_image(&m, &mut out).unwrap();
        assert_eq!(out.get_ref().len(), img.len(), "{name}");
        assert!(out.get_ref() == &img, "{name}: exported bytes differ");
        assert_eq!(e.zero_chunks, stats.zero_chunks);
        assert_eq!(e.bytes, img.len() as u64);
        // ... and to a file, all or nothing.
        let path = out_dir.path().join(format!("{name}.raw"));
        fs::write(&path, vec![0xFF; img.len() + 99]).unwrap(); // an old file in the way
        store.export_to_file(&m, &path).unwrap();
        assert!(
            fs::read(&path).unwrap() == img,
            "{name}: exported file differs"
        );
    }
    assert_eq!(fs::read_dir(out_dir.path()).unwrap().count(), 4);
    assert_eq!(store.images().len(), 4);
}

#[test]
fn import_checks_the_name_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path()).unwrap();
    let img = image(13, 2, 0, |_| false);
    let err = store
        .import_image(
            &img[..],
            MIN_CHUNK_SIZE,
            String::new(),
            None,
            BTreeMap::new(),
        )
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidManifest { .. }), "{err}");
    let err = store
        .import_image(&img[..], 1000, "x".into(), None, BTreeMap::new())
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidManifest { .. }), "{err}");
    assert_eq!(store.stats().chunks, 0);
}

#[test]
fn export_fails_naming_the_missing_chunks() {
    let src_dir = tempfile::tempdir().unwrap();
    let dst_dir = tempfile::tempdir().unwrap();
    let img = image(14, 12, 500, |i| i == 2);
    let src = ChunkStore::open(src_dir.path()).unwrap();
    let (m, _) = import(&src, &img, "partial");
    // The destination gets the manifest and only the even-numbered chunks.
    let dst = ChunkStore::open(dst_dir.path()).unwrap();
    dst.put_manifest(&m).unwrap();
    for (index, id) in m.chunks.iter().enumerate() {
        if index % 2 == 0 {
            let data = src.get(id).unwrap();
            if let Some(data) = data {
                dst.put(id, &data).unwrap();
            }
        }
    }
    let status = dst.image_status(&m);
    assert!(!status.complete);
    let expect_missing: Vec<u32> = (0..13).filter(|i| i % 2 == 1).collect();
    assert_eq!(status.missing().collect::<Vec<_>>(), expect_missing);
    // 7 even chunks, one of which (index 2) is zero.
    assert_eq!(status.present_chunks, 7);
    assert_eq!(status.zero_chunks, 1);

    let out_dir = tempfile::tempdir().unwrap();
    let path = out_dir.path().join("out.raw");
    let err = dst.export_to_file(&m, &path).unwrap_err();
    let StoreError::MissingChunks {
        image,
        total,
        missing,
    } = &err
    else {
        panic!("expected MissingChunks, got {err}");
    };
    assert_eq!(*image, m.id());
    assert_eq!(*total, 13);
    let indices: Vec<u32> = missing.iter().map(|&(i, _)| i).collect();
    assert_eq!(indices, expect_missing);
    assert!(missing.iter().all(|&(i, id)| m.chunks[i as usize] == id));
    let msg = err.to_string();
    assert!(msg.contains("lacks 6 of its 13 chunks"), "{msg}");
    assert!(msg.contains(&format!("#1 {}", m.chunks[1])), "{msg}");
    // Nothing was left behind at the destination path.
    assert_eq!(fs::read_dir(out_dir.path()).unwrap().count(), 0);
}

#[test]
fn export_verifies_every_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path()).unwrap();
    let img = image(15, 4, 0, |_| false);
    let (m, _) = import(&store, &img, "rot");
    let victim = m.chunks[2];
    flip_on_disk(&store, &victim, 0, 0x80);
    let err = store.export_image(&m, Cursor::new(Vec::new())).unwrap_err();
    assert!(
        matches!(err, StoreError::CorruptChunk { id, .. } if id == victim),
        "{err}"
    );
    // Now it is simply missing, and named as such.
    let err = store.export_image(&m, Cursor::new(Vec::new())).unwrap_err();
    assert!(
        matches!(&err, StoreError::MissingChunks { missing, .. } if missing == &vec![(2, victim)]),
        "{err}"
    );
}

#[test]
fn lock_refuses_a_second_holder() {
    let dir = tempfile::tempdir().unwrap();
    let first = DataDirLock::acquire(dir.path()).unwrap();
    assert_eq!(first.path(), dir.path().join(DATA_DIR_LOCK_FILE));
    let err = DataDirLock::acquire(dir.path()).unwrap_err();
    match &err {
        StoreError::Locked { path, holder } => {
            assert_eq!(path, first.path());
            assert_eq!(*holder, Some(std::process::id()));
        }
        other => panic!("expected Locked, got {other:?}"),
    }
    assert!(
        err.to_string()
            .contains(&format!("(pid {})", std::process::id())),
        "{err}"
    );
    drop(first);
    let again = DataDirLock::acquire(dir.path()).unwrap();

    // The store has its own lock file, so it opens in a locked data dir, but only once.
    let store = ChunkStore::open(dir.path()).unwrap();
    assert!(matches!(
        ChunkStore::open(dir.path()),
        Err(StoreError::Locked { .. })
    ));
    drop(store);
    ChunkStore::open(dir.path()).unwrap();
    drop(again);

    // A missing data dir is a clear error, not a panic.
    let missing = dir.path().join("nope");
    let err = DataDirLock::acquire(&missing).unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
}

#[test]
fn open_refuses_bad_directories() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    fs::write(&file, b"x").unwrap();
    let err = ChunkStore::open(&file).unwrap_err();
    assert!(matches!(err, StoreError::Io { .. }), "{err}");
    assert!(err.to_string().contains("a-file"), "{err}");

    let other = dir.path().join("other");
    fs::create_dir(&other).unwrap();
    fs::write(other.join(FORMAT_FILE), "someone-else 9\n").unwrap();
    let err = ChunkStore::open(&other).unwrap_err();
    assert!(
        matches!(err, StoreError::UnsupportedFormat { ref found, .. } if found == "someone-else 9"),
        "{err}"
    );
}

#[test]
fn concurrent_puts_and_reads() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(ChunkStore::open(dir.path()).unwrap());
    let chunks: Arc<Vec<_>> =
        Arc::new((0..64).map(|s| chunk(300 + s, 3000 + s as usize)).collect());
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let store = Arc::clone(&store);
            let chunks = Arc::clone(&chunks);
            std::thread::spawn(move || {
                let mut rng = ChaCha8Rng::seed_from_u64(t);
                let mut stored = 0;
                // Every thread puts every chunk (so the same id races), in its own order.
                let mut order: Vec<usize> = (0..chunks.len()).collect();
                for i in (1..order.len()).rev() {
                    order.swap(i, rng.random_range(0..=i));
                }
                for i in order {
                    let (id, data) = &chunks[i];
                    if store.put(id, data).unwrap() == Put::Stored {
                        stored += 1;
                    }
                    assert_eq!(store.get(id).unwrap().as_ref(), Some(data));
                }
                stored
            })
        })
        .collect();
    let stored: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    // Racing puts of one id: exactly one commits, the others see it under the stripe lock.
    assert_eq!(stored, 64);
    let stats = store.stats();
    assert_eq!(stats.chunks, 64);
    assert_eq!(
        stats.bytes,
        chunks.iter().map(|(_, d)| d.len() as u64).sum::<u64>()
    );
    assert_eq!(tmp_files(&store), 0);
    assert!(store.verify().unwrap().is_clean());
}

#[test]
fn store_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<ChunkStore>();
    check::<DataDirLock>();
    check::<StoreError>();
}
