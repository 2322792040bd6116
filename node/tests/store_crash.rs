//! Crash safety of the chunk store with real processes and real `kill -9`.
//!
//! `kill_9_at_random_points_loses_nothing_committed` re-executes this test binary with
//! `VMSWARM_STORE_CRASH_WRITER` set, which makes `crash_writer_child` (a no-op in a normal run) the
//! writer: it opens the store and commits random chunks (and now and then a manifest) from three
//! threads, one of them in `put_many` batches, printing each id after the call returns. The parent
//! SIGKILLs it after a random (seeded) delay, several times; after each kill it reopens the store
//! (recovering the torn pack tail), checks that every chunk the writer reported committed is there,
//! and re-hashes everything visible (`verify` must find nothing corrupt).
//!
//! Rerun a failure with `VMSWARM_STORE_CRASH_SEED=<seed printed by the failing run>`.
//! `kill -9` tests atomic visibility (no partial chunk is ever visible, nothing committed is lost
//! from the store's point of view); losing power would additionally test the fsyncs, which no
//! process-level test can.

use std::collections::HashSet;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vmswarm_node::store::{ChunkStore, Verified};
use vmswarm_protocol::manifest::{MIN_CHUNK_SIZE, Manifest};
use vmswarm_protocol::{ChunkId, ImageId};

const ROLE_ENV: &str = "VMSWARM_STORE_CRASH_WRITER";
const SEED_ENV: &str = "VMSWARM_STORE_CRASH_SEED";
const ROUNDS: u64 = 6;
const WRITER_THREADS: u64 = 3;
/// The writer gives up on its own after this long (in case nobody kills it).
const WRITER_MAX_RUNTIME: Duration = Duration::from_secs(20);

/// The writer role. Does nothing unless started by the crash test with `ROLE_ENV` set.
#[test]
fn crash_writer_child() {
    let Ok(dir) = std::env::var(ROLE_ENV) else {
        return;
    };
    let seed: u64 = std::env::var(SEED_ENV).unwrap().parse().unwrap();
    let parent = std::os::unix::process::parent_id();
    let store = ChunkStore::open(Path::new(&dir)).unwrap();
    say(&format!(
        "OPENED {} {}",
        store.open_summary().stale_temp_files,
        store.stats().chunks
    ));
    let started = std::time::Instant::now();
    std::thread::scope(|s| {
        for t in 0..WRITER_THREADS {
            let store = &store;
            s.spawn(move || {
                let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_mul(31).wrapping_add(t));
                let mut batch = Vec::new();
                while started.elapsed() < WRITER_MAX_RUNTIME
                    && std::os::unix::process::parent_id() == parent
                {
                    // Thread 0 commits batches of 1 to 8 chunks at once, the others one by one.
                    let n = if t == 0 { rng.random_range(1..=8) } else { 1 };
                    let chunks: Vec<(ChunkId, Vec<u8>)> = (0..n)
                        .map(|_| {
                            // Sizes around the default chunk size, some larger, some tiny.
                            let len = rng.random_range(1..=320 * 1024);
                            let mut data = vec![0u8; len];
                            rng.fill_bytes(&mut data);
                            (ChunkId::of(&data), data)
                        })
                        .collect();
                    if t == 0 {
                        let verified: Vec<Verified<'_>> = chunks
                            .iter()
                            .map(|(id, data)| Verified::new(*id, data).unwrap())
                            .collect();
                        store.put_many(&verified).unwrap();
                    } else {
                        for (id, data) in &chunks {
                            store.put(id, data).unwrap();
                        }
                    }
                    for (id, _) in chunks {
                        say(&format!("COMMITTED {id}"));
                        batch.push(id);
                    }
                    if batch.len() >= 5 {
                        let m = Manifest::new(
                            batch.len() as u64 * u64::from(MIN_CHUNK_SIZE),
                            MIN_CHUNK_SIZE,
                            std::mem::take(&mut batch),
                            format!("crash-{seed}-{t}"),
                            None,
                            Default::default(),
                        )
                        .unwrap();
                        let image = store.put_manifest(&m).unwrap();
                        say(&format!("MANIFEST {image}"));
                    }
                }
            });
        }
    });
}

/// One line to stdout, written whole and flushed (bypassing the test harness's capture).
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Kills and reaps the child when dropped, so a failing test leaves no writer behind.
struct ChildGuard(Option<Child>);

impl ChildGuard {
    fn kill_and_reap(&mut self) -> std::process::ExitStatus {
        let mut child = self.0.take().unwrap();
        let _ = child.kill(); // SIGKILL
        child.wait().unwrap()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[derive(Default)]
struct Reported {
    chunks: HashSet<ChunkId>,
    manifests: HashSet<ImageId>,
    stale_temps_seen: u64,
}

fn run_writer(dir: &Path, seed: u64, kill_after: Duration, reported: &mut Reported) {
    let exe = std::env::current_exe().unwrap();
    let child = Command::new(exe)
        .args([
            "--exact",
            "crash_writer_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE_ENV, dir)
        .env(SEED_ENV, seed.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut guard = ChildGuard(Some(child));
    let stdout = guard.0.as_mut().unwrap().stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Wait until the store is open, so that the kill lands while chunks are being written.
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("writer did not open the store within 30 s");
        // The harness prints "test crash_writer_child ... " on the same line before it.
        if let Some((_, rest)) = line.split_once("OPENED ") {
            let stale: u64 = rest.split(' ').next().unwrap().parse().unwrap();
            reported.stale_temps_seen += stale;
            break;
        }
    }
    std::thread::sleep(kill_after);
    let status = guard.kill_and_reap();
    reader.join().unwrap();
    assert_eq!(
        status.signal(),
        Some(9),
        "the writer must die of SIGKILL, not on its own (it failed?): {status}"
    );
    for line in rx.try_iter() {
        // A line cut short by the kill has the wrong length and fails to parse: skipped.
        if let Some(hex) = line.strip_prefix("COMMITTED ") {
            if let Ok(id) = hex.parse() {
                reported.chunks.insert(id);
            }
        } else if let Some(hex) = line.strip_prefix("MANIFEST ") {
            if let Ok(id) = hex.parse() {
                reported.manifests.insert(id);
            }
        }
    }
}

/// Opens the store as the next process would (recovering whatever the kill left), checks that
/// every reported chunk is there and that every visible chunk hashes to its id. Returns the number
/// of visible chunks.
fn check_store(dir: &Path, seed: u64, reported: &Reported) -> u64 {
    let store = ChunkStore::open(dir).unwrap();
    let opened = store.open_summary();
    println!(
        "reopened: {} chunks, {} re-hashed, {} bytes of torn tail ignored",
        opened.chunks, opened.rehashed_chunks, opened.damaged_bytes
    );
    for id in &reported.chunks {
        assert!(store.contains(id), "seed {seed}: committed chunk {id} lost");
    }
    for id in &reported.manifests {
        assert!(
            store.has_manifest(id),
            "seed {seed}: committed manifest {id} lost"
        );
    }
    let report = store.verify().unwrap();
    assert!(
        report.is_clean(),
        "seed {seed}: a visible chunk is corrupt: {report:?}"
    );
    assert_eq!(report.chunks_checked, store.stats().chunks, "seed {seed}");
    assert_eq!(fs::read_dir(dir.join("tmp")).unwrap().count(), 0);
    store.stats().chunks
}

#[test]
fn kill_9_at_random_points_loses_nothing_committed() {
    let seed = match std::env::var(SEED_ENV) {
        Ok(s) => s.parse().unwrap(),
        Err(_) => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    };
    // Shown by the test harness if the test fails.
    println!("crash test seed {seed} (rerun with {SEED_ENV}={seed})");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut reported = Reported::default();
    for round in 0..ROUNDS {
        let kill_after = Duration::from_millis(rng.random_range(5..200));
        run_writer(
            dir.path(),
            seed.wrapping_add(round),
            kill_after,
            &mut reported,
        );
        // Check every round, while the debris of the kill is still there.
        check_store(dir.path(), seed, &reported);
    }

    let visible = check_store(dir.path(), seed, &reported);
    let store = ChunkStore::open(dir.path()).unwrap();
    for id in &reported.chunks {
        let data = store.get(id).unwrap().unwrap();
        assert!(id.verify(&data));
    }
    for id in &reported.manifests {
        let m = store.manifest(id).unwrap();
        assert!(m.is_some(), "seed {seed}: committed manifest {id} lost");
    }
    println!(
        "{ROUNDS} kills: {} chunks and {} manifests reported committed, {visible} visible, {} stale \
         temp files cleaned by the writers' reopening",
        reported.chunks.len(),
        reported.manifests.len(),
        reported.stale_temps_seen,
    );
    assert!(
        !reported.chunks.is_empty(),
        "seed {seed}: the writers committed nothing; the test tested nothing"
    );
}
