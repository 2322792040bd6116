//! Boot profiles: the order in which a booting VM first touched an image's chunks.
//!
//! A mount records, for the first [`DEFAULT_WINDOW`] (configurable) after it starts, each chunk
//! index the first time a read touches it ([`Recorder`]). When the window ends (or the mount goes
//! away first) the order is saved as `DATA/profiles/<image id>.json` — unless a profile is already
//! there: the first boot of an image defines its profile. A later mount with `--prefetch` hands the
//! order to the image's fetch scheduler ([`vmswarm_protocol::fetch::FetchScheduler::set_priority_order`]),
//! so Background prefetch fetches chunks in the order the next boot will need them, and only then
//! the rest (rarest first). A mount with `--prefetch=profile` wants only the profile's chunks, in
//! this order, and leaves the rest to on-demand reads. Demand reads still go first: the order only
//! ranks Background work.
//!
//! This module decides the recording rule and the file format; the daemon decides when to save and
//! when to apply.
//!
//! Profiles travel with the image through the swarm: every node that holds a profile answers the
//! wire request `GetBootProfile` (peers announce the `BOOT_PROFILES` capability in their `Hello`).
//! A prefetching mount (either mode) without a local profile asks its peers, checks the first
//! answer against the manifest (indices in range, none repeated), saves it as its own and applies
//! it. A profile only ranks Background work (and, for a profile-only mount, picks what is
//! prefetched), so a peer lying about it can cost order and bytes, never correctness. The first
//! boot anywhere thus sets the order for every later boot of the image in the swarm.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmswarm_protocol::ImageId;

/// How long a mount records first touches.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(60);

/// Records first touches during a window.
#[derive(Debug)]
pub struct Recorder {
    started: Instant,
    window: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    seen: Vec<bool>,
    order: Vec<u32>,
}

impl Recorder {
    /// A recorder for an image of `chunks` chunks, starting now.
    pub fn new(chunks: u32, window: Duration) -> Recorder {
        Recorder {
            started: Instant::now(),
            window,
            state: Mutex::new(State {
                seen: vec![false; chunks as usize],
                order: Vec::new(),
            }),
        }
    }

    /// Notes that chunk `index` was read (ignored after the window or if seen before).
    pub fn touch(&self, index: u32) {
        if self.started.elapsed() > self.window {
            return;
        }
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(seen) = s.seen.get_mut(index as usize) {
            if !*seen {
                *seen = true;
                s.order.push(index);
            }
        }
    }

    /// The first-touch order so far.
    pub fn order(&self) -> Vec<u32> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .order
            .clone()
    }

    /// The recording window.
    pub fn window(&self) -> Duration {
        self.window
    }
}

/// A saved profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// The image (hex id).
    pub image: String,
    /// Recording window in milliseconds.
    pub window_ms: u64,
    /// Chunk indices in first-touch order.
    pub order: Vec<u32>,
}

/// Errors reading or writing profiles.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// File I/O failed.
    #[error("boot profile {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not a profile of this image.
    #[error("boot profile {path} is unusable: {reason}")]
    Bad {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Where the profile of `image` lives.
pub fn path(data_dir: &Path, image: &ImageId) -> PathBuf {
    data_dir.join("profiles").join(format!("{image}.json"))
}

/// Loads the profile of `image`, if one was saved. Indices past `chunks` are refused.
pub fn load(
    data_dir: &Path,
    image: &ImageId,
    chunks: u32,
) -> Result<Option<Profile>, ProfileError> {
    let p = path(data_dir, image);
    let bytes = match std::fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(ProfileError::Io { path: p, source }),
    };
    let prof: Profile = serde_json::from_slice(&bytes).map_err(|e| ProfileError::Bad {
        path: p.clone(),
        reason: e.to_string(),
    })?;
    if prof.image != image.to_string() || prof.order.iter().any(|&i| i >= chunks) {
        return Err(ProfileError::Bad {
            path: p,
            reason: "made for another image".into(),
        });
    }
    Ok(Some(prof))
}

/// Saves `order` as the profile of `image` unless one exists; returns whether it wrote.
/// Written atomically (temp file, fsync, rename).
pub fn save_if_absent(
    data_dir: &Path,
    image: &ImageId,
    window: Duration,
    order: Vec<u32>,
) -> Result<bool, ProfileError> {
    let p = path(data_dir, image);
    if p.exists() || order.is_empty() {
        return Ok(false);
    }
    let io = |source| ProfileError::Io {
        path: p.clone(),
        source,
    };
    let dir = data_dir.join("profiles");
    std::fs::create_dir_all(&dir).map_err(io)?;
    let prof = Profile {
        image: image.to_string(),
        window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
        order,
    };
    let bytes = serde_json::to_vec(&prof).map_err(|e| io(std::io::Error::other(e)))?;
    let tmp = dir.join(format!("{image}.json.tmp"));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, &p).map_err(io)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_first_touches_and_round_trips() {
        let r = Recorder::new(10, Duration::from_secs(3600));
        for i in [3, 1, 3, 9, 1, 42] {
            r.touch(i);
        }
        assert_eq!(r.order(), vec![3, 1, 9]);
        let dir = tempfile::tempdir().unwrap();
        let image = ImageId([7; 32]);
        assert!(save_if_absent(dir.path(), &image, r.window(), r.order()).unwrap());
        assert!(!save_if_absent(dir.path(), &image, r.window(), vec![1]).unwrap());
        let p = load(dir.path(), &image, 10).unwrap().unwrap();
        assert_eq!(p.order, vec![3, 1, 9]);
        assert!(load(dir.path(), &image, 5).is_err());
        assert!(load(dir.path(), &ImageId([8; 32]), 10).unwrap().is_none());
        let closed = Recorder::new(10, Duration::ZERO);
        std::thread::sleep(Duration::from_millis(2));
        closed.touch(1);
        assert!(closed.order().is_empty());
    }
}
