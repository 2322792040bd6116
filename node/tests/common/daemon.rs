//! Running real `vmswarm serve` processes: the one piece the multi-process tests
//! (`tests/common/mod.rs`) and the pull benchmark (`benches/pull.rs`, which includes this file with
//! `#[path]`) share.
//!
//! It decides how a daemon is started on loopback QUIC (one `--listen`, by default on a free UDP port, stderr to
//! `DIR/daemon.log`), when it counts as up (`node.json` names an address and `status` answers), and
//! that a [`Daemon`] kills and reaps its process when dropped, so a failing test or bench leaves
//! nothing behind. Callers add their own conveniences on top (the tests panic, the bench returns
//! errors).

#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

/// How to start a daemon.
#[derive(Debug, Clone)]
pub struct Spawn<'a> {
    /// The `vmswarm` binary.
    pub bin: &'a Path,
    /// Its data dir (created if missing).
    pub dir: &'a Path,
    /// Its `--site`.
    pub site: &'a str,
    /// A `--bootstrap` address.
    pub bootstrap: Option<&'a str>,
    /// The `--listen` address (without `/p2p/`); a free loopback UDP port if `None`.
    pub listen: Option<&'a str>,
    /// More `serve` arguments.
    pub extra: &'a [&'a str],
    /// `RUST_LOG` for the daemon.
    pub log_filter: &'a str,
}

/// A running `vmswarm serve`; dropping it kills and reaps the process.
#[derive(Debug)]
pub struct Daemon {
    pub dir: PathBuf,
    pub bin: PathBuf,
    /// Its first listen address, with `/p2p/<peer id>`.
    pub addr: String,
    child: Option<Child>,
}

impl Daemon {
    /// Starts a daemon and waits (30 s at most) until it listens and answers `status`.
    pub fn start(s: &Spawn<'_>) -> Result<Daemon> {
        std::fs::create_dir_all(s.dir).with_context(|| format!("creating {}", s.dir.display()))?;
        let _ = std::fs::remove_file(s.dir.join("node.json"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(s.dir.join("daemon.log"))?;
        let mut cmd = Command::new(s.bin);
        cmd.arg("--data")
            .arg(s.dir)
            .args([
                "serve",
                "--listen",
                s.listen.unwrap_or("/ip4/127.0.0.1/udp/0/quic-v1"),
                "--site",
                s.site,
            ])
            .args(s.extra)
            .env("RUST_LOG", s.log_filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(b) = s.bootstrap {
            cmd.args(["--bootstrap", b]);
        }
        let child = cmd.spawn().context("spawning vmswarm serve")?;
        let mut d = Daemon {
            dir: s.dir.to_path_buf(),
            bin: s.bin.to_path_buf(),
            addr: String::new(),
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(s.dir.join("node.json")) {
                let info: Value = serde_json::from_str(&text)?;
                if let Some(a) = info["listen_addrs"][0].as_str() {
                    d.addr = a.to_owned();
                    if d.cli(&["status", "--json"])?.status.success() {
                        return Ok(d);
                    }
                }
            }
            if let Some(status) = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!(
                    "daemon on {} exited early ({status}):\n{}",
                    s.dir.display(),
                    d.log()
                );
            }
            ensure!(
                Instant::now() < deadline,
                "daemon on {} did not come up:\n{}",
                s.dir.display(),
                d.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `vmswarm --data DIR args...` against this daemon's data dir.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        cli(&self.bin, &self.dir, args)
    }

    /// `status --json`.
    pub fn status(&self) -> Result<Value> {
        let out = self.cli(&["status", "--json"])?;
        ensure!(
            out.status.success(),
            "status on {}: {}",
            self.dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Its process id (0 once stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGKILL, no cleanup.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (10 s at most, then SIGKILL); returns whether it exited 0 on its own.
    pub fn stop(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(s)) = c.try_wait() {
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

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs `BIN --data DIR args...` (`RUST_LOG=warn`).
pub fn cli(bin: &Path, dir: &Path, args: &[&str]) -> Result<Output> {
    Command::new(bin)
        .arg("--data")
        .arg(dir)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .context("running vmswarm")
}
