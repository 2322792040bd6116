//! Harness for tests that run real `vmswarm` processes on loopback.
//!
//! Every daemon is owned by a [`Node`] whose `Drop` kills and reaps it, so a failing or panicking test
//! leaves no process behind; data dirs live in a per-test temp dir that is removed on drop.

#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_vmswarm");

/// A running `vmswarm serve`.
pub struct Node {
    pub dir: PathBuf,
    pub site: String,
    child: Option<Child>,
    pub addr: String,
}

impl Node {
    /// Starts a daemon on `dir` and waits until it is listening and answering.
    pub fn start(dir: &Path, site: &str, bootstrap: Option<&str>, extra: &[&str]) -> Node {
        std::fs::create_dir_all(dir).unwrap();
        let _ = std::fs::remove_file(dir.join("node.json"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("daemon.log"))
            .unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("--data")
            .arg(dir)
            .args([
                "serve",
                "--listen",
                "/ip4/127.0.0.1/udp/0/quic-v1",
                "--site",
                site,
            ])
            .args(extra)
            .env("RUST_LOG", "info,libp2p=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(b) = bootstrap {
            cmd.args(["--bootstrap", b]);
        }
        let child = cmd.spawn().expect("spawn vmswarm serve");
        let mut node = Node {
            dir: dir.to_path_buf(),
            site: site.to_owned(),
            child: Some(child),
            addr: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(dir.join("node.json")) {
                let info: Value = serde_json::from_str(&text).unwrap();
                if let Some(a) = info["listen_addrs"][0].as_str() {
                    node.addr = a.to_owned();
                    if node.cli(&["status", "--json"]).status.success() {
                        return node;
                    }
                }
            }
            if let Some(status) = node.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "daemon on {} exited early ({status}):\n{}",
                    dir.display(),
                    node.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not come up:\n{}",
                node.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `vmswarm --data DIR args...`.
    pub fn cli(&self, args: &[&str]) -> Output {
        cli(&self.dir, args)
    }

    pub fn status(&self) -> Value {
        let out = self.cli(&["status", "--json"]);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGKILL, no cleanup.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns whether it exited 0.
    pub fn stop(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        unsafe_free_sigterm(c.id());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s.success();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn unsafe_free_sigterm(pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
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
    Command::new(BIN)
        .arg("--data")
        .arg(dir)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run vmswarm")
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
