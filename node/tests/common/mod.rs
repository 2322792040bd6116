//! Harness for tests that run real `vmswarm` processes on loopback.
//!
//! Every daemon is owned by a [`Node`] whose `Drop` kills and reaps it, so a failing or panicking test
//! leaves no process behind; data dirs live in a per-test temp dir that is removed on drop. Starting
//! and stopping daemons is [`daemon`], shared with the pull benchmark.

#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::Output;

use rand::{RngCore, SeedableRng};
use serde_json::Value;

pub mod daemon;
pub mod raw_codec;

pub const BIN: &str = env!("CARGO_BIN_EXE_vmswarm");

/// A running `vmswarm serve` ([`daemon::Daemon`], panicking on errors as a test should).
pub struct Node {
    pub dir: PathBuf,
    pub site: String,
    pub addr: String,
    inner: daemon::Daemon,
}

impl Node {
    /// Starts a daemon on `dir` and waits until it is listening and answering.
    pub fn start(dir: &Path, site: &str, bootstrap: Option<&str>, extra: &[&str]) -> Node {
        Node::start_on(dir, site, bootstrap, extra, None)
    }

    /// [`Node::start`] listening on `listen` (a QUIC multiaddr without `/p2p/`), e.g. the
    /// address a stopped node had, to restart it as it was.
    pub fn start_on(
        dir: &Path,
        site: &str,
        bootstrap: Option<&str>,
        extra: &[&str],
        listen: Option<&str>,
    ) -> Node {
        let inner = daemon::Daemon::start(&daemon::Spawn {
            bin: Path::new(BIN),
            dir,
            site,
            bootstrap,
            listen,
            extra,
            log_filter: "info,libp2p=warn",
        })
        .unwrap_or_else(|e| panic!("{e:#}"));
        Node {
            dir: dir.to_path_buf(),
            site: site.to_owned(),
            addr: inner.addr.clone(),
            inner,
        }
    }

    /// Runs `vmswarm --data DIR args...`.
    pub fn cli(&self, args: &[&str]) -> Output {
        cli(&self.dir, args)
    }

    pub fn status(&self) -> Value {
        self.inner.status().unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub fn log(&self) -> String {
        self.inner.log()
    }

    pub fn pid(&self) -> u32 {
        self.inner.pid()
    }

    /// SIGKILL, no cleanup.
    pub fn kill9(&mut self) {
        self.inner.kill9();
    }

    /// SIGTERM and wait for a clean exit; returns whether it exited 0.
    pub fn stop(&mut self) -> bool {
        self.inner.stop()
    }
}

/// Node config for tests: give up on unavailable chunks after 3 s instead of 60 s.
pub fn fast_config(dir: &Path) -> PathBuf {
    let p = dir.join("fast.toml");
    std::fs::write(
        &p,
        "[fetch]\nunavailable_deadline_ms = 3000\nrequest_timeout_ms = 2000\nmanifest_timeout_ms = 2000\n",
    )
    .unwrap();
    p
}

/// Runs `vmswarm --data DIR args...`.
pub fn cli(dir: &Path, args: &[&str]) -> Output {
    daemon::cli(Path::new(BIN), dir, args).expect("run vmswarm")
}

/// A deterministic image of `size` bytes: random data with some all-zero chunks.
pub fn make_image(path: &Path, size: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut data = vec![0u8; size];
    rng.fill_bytes(&mut data);
    // Every 7th 256 KiB chunk is zero (sparse regions, as in real images).
    for (i, c) in data.chunks_mut(256 * 1024).enumerate() {
        if i % 7 == 3 {
            c.fill(0);
        }
    }
    std::fs::write(path, &data).unwrap();
    data
}

/// Publishes `file` on `node`; returns the image id (the last stdout line).
pub fn publish(node: &Node, file: &Path) -> String {
    let out = node.cli(&["publish", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "publish failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        node.log()
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    stdout.lines().last().unwrap().trim().to_owned()
}

/// The test's seed: `VMSWARM_TEST_SEED` or a fixed default; printed so failures can be replayed.
pub fn seed() -> u64 {
    let seed = std::env::var("VMSWARM_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    eprintln!("test seed: {seed} (set VMSWARM_TEST_SEED to replay)");
    seed
}

/// [`vmswarm_node::store::ChunkStore::open`] for test binaries that also spawn daemons.
///
/// The store lock is an `flock`, which belongs to the open file description. While another test
/// thread spawns a daemon, the child holds a copy of every descriptor of this process between its
/// `fork` and its `exec` (`O_CLOEXEC` closes them only at `exec`), so a store just dropped by this
/// test can still look locked, by this very process, for that instant. Only that case is retried
/// (a lock held by another process is not) and only for a few seconds.
pub fn open_store(dir: &Path) -> vmswarm_node::store::ChunkStore {
    use vmswarm_node::store::{ChunkStore, StoreError};
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match ChunkStore::open(dir) {
            Ok(store) => return store,
            Err(StoreError::Locked { holder, .. })
                if holder == Some(std::process::id()) && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("open store {}: {e}", dir.display()),
        }
    }
}
