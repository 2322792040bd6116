//! The state file: everything `up` created, written before each thing is created, so that `down`
//! can remove all of it even when `up` or `run` was killed half-way.
//!
//! The file is `STATE_DIR/testnet.json`, replaced atomically (write, fsync, rename) on every change.
//! Processes are recorded with their pid and start time; `down` only signals a pid whose start time
//! still matches, so a recycled pid is never killed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::plan::Plan;
use crate::sys;

/// The state file's name inside the state dir.
pub const STATE_FILE: &str = "testnet.json";

/// A process the testnet started.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Proc {
    /// What it is (`node s0n1`, `wan-emulator`).
    pub role: String,
    /// Its pid.
    pub pid: u32,
    /// A string its command line contains (its data dir or spec file).
    pub marker: String,
    /// Its start time (see [`sys::start_ticks`]): with the pid, what identifies it before signalling.
    #[serde(default)]
    pub start_ticks: Option<u64>,
}

/// Everything a testnet consists of.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct State {
    /// The state dir (data dirs, logs, this file).
    pub dir: PathBuf,
    /// The layout.
    pub plan: Plan,
    /// Namespaces that may exist (recorded before creation).
    pub namespaces: Vec<String>,
    /// Processes started.
    pub procs: Vec<Proc>,
    /// Whether `up` finished.
    pub complete: bool,
}

impl State {
    /// The state file of `dir`.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(STATE_FILE)
    }

    /// Loads the state of the testnet in `dir`.
    pub fn load(dir: &Path) -> anyhow::Result<State> {
        let path = State::path(dir);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "no testnet in {} (reading {}); start one with `vmswarm-testnet up`",
                dir.display(),
                path.display()
            )
        })?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a testnet state file", path.display()))
    }

    /// Writes the state atomically.
    pub fn save(&self) -> anyhow::Result<()> {
        let path = State::path(&self.dir);
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(self)?;
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)
                .with_context(|| format!("creating {}", tmp.display()))?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path).with_context(|| format!("renaming {}", path.display()))?;
        Ok(())
    }

    /// Records a namespace before it is created.
    pub fn will_create_netns(&mut self, name: &str) -> anyhow::Result<()> {
        if !self.namespaces.iter().any(|n| n == name) {
            self.namespaces.push(name.to_owned());
            self.save()?;
        }
        Ok(())
    }

    /// Records a process right after it was spawned.
    pub fn started(&mut self, role: &str, pid: u32, marker: &str) -> anyhow::Result<()> {
        self.procs.push(Proc {
            role: role.to_owned(),
            pid,
            marker: marker.to_owned(),
            start_ticks: sys::start_ticks(pid),
        });
        self.save()
    }

    /// Where node `name` keeps its data.
    pub fn data_dir(&self, name: &str) -> PathBuf {
        self.dir.join("nodes").join(name)
    }

    /// Whether a recorded process still runs (and is still ours: same pid and start time, so a
    /// recycled pid is never mistaken for it, and a child caught between fork and exec — whose
    /// command line is still its parent's — is not missed).
    pub fn alive(p: &Proc) -> bool {
        match p.start_ticks {
            Some(t) => sys::start_ticks(p.pid) == Some(t),
            None => sys::pid_matches(p.pid, &p.marker),
        }
    }

    /// Stops every process, deletes every namespace, and removes the state dir's contents this
    /// testnet created. Goes on past failures and reports them all at the end.
    pub fn teardown(&self) -> anyhow::Result<()> {
        let mut problems = Vec::new();
        for p in &self.procs {
            if Self::alive(p) {
                sys::signal(p.pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for p in &self.procs {
            while Self::alive(p) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if Self::alive(p) {
                sys::signal(p.pid, libc::SIGKILL);
                let hard = Instant::now() + Duration::from_secs(5);
                while Self::alive(p) && Instant::now() < hard {
                    std::thread::sleep(Duration::from_millis(20));
                }
                if Self::alive(p) {
                    problems.push(format!("{} (pid {}) did not exit", p.role, p.pid));
                }
            }
        }
        // Anything else started for this testnet: a process `up` spawned but was killed before
        // recording (it names this dir on its command line).
        let dir = std::fs::canonicalize(&self.dir).unwrap_or_else(|_| self.dir.clone());
        let strays = sys::pids_under(&dir);
        for &pid in &strays {
            sys::signal(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && strays.iter().any(|&p| sys::start_ticks(p).is_some()) {
            std::thread::sleep(Duration::from_millis(50));
        }
        for &pid in &strays {
            if sys::start_ticks(pid).is_some() {
                sys::signal(pid, libc::SIGKILL);
            }
        }
        // Node namespaces first, the router (with bridges, veth peers and the TUN device) last.
        for ns in self.namespaces.iter().rev() {
            if sys::netns_exists(ns)
                && let Err(e) = sys::run("ip", &["netns", "del", ns])
            {
                problems.push(format!("{e:#}"));
            }
        }
        for sub in ["nodes", "logs", "images", "nbd"] {
            let p = self.dir.join(sub);
            if p.exists()
                && let Err(e) = std::fs::remove_dir_all(&p)
            {
                problems.push(format!("removing {}: {e}", p.display()));
            }
        }
        for f in ["wan.json", "wan-stats.json", "wan-stats.tmp"] {
            let _ = std::fs::remove_file(self.dir.join(f));
        }
        if !problems.is_empty() {
            bail!("teardown incomplete:\n  {}", problems.join("\n  "));
        }
        std::fs::remove_file(State::path(&self.dir))
            .with_context(|| format!("removing {}", State::path(&self.dir).display()))?;
        // Remove the dir itself if nothing else is in it.
        let _ = std::fs::remove_dir(&self.dir);
        Ok(())
    }
}
