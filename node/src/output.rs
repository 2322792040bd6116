//! Where `vmswarm pull -o PATH` may write, decided before any chunk is fetched (by the client, so it
//! fails at once) and again by the daemon just before it writes (the path may have changed since).
//!
//! The image is written to `NAME.vmswarm-partial` in the destination's directory, verified, fsynced
//! and renamed onto the destination ([`crate::store::ChunkStore::export_to_file`]), so a rename may
//! only ever replace a regular file or create a new one:
//! - a new path (its parent an existing directory) or an existing regular file: written there;
//! - a symlink: **resolved** (all links followed); if it ends at a regular file, that file is
//!   replaced and the link is left as it is (pointing at the new contents); a dangling link or one
//!   that ends at anything else is refused;
//! - a directory, character or block device, FIFO or socket: refused with an error naming the path
//!   and what it is (writing into a block device is not supported: pull to a file and copy it).

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

/// Why a `pull -o` destination is refused.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The destination is something a rename must not replace.
    #[error(
        "refusing to write the image to {path}: it is {what} (pull -o writes regular files only)"
    )]
    NotAFile {
        /// The destination (as given, or the symlink's target).
        path: PathBuf,
        /// What it is ("a directory", "a character device", ...).
        what: &'static str,
    },
    /// A symlink whose target does not exist.
    #[error("refusing to write the image to {path}: it is a symlink to a missing file")]
    DanglingLink {
        /// The symlink.
        path: PathBuf,
    },
    /// The destination's directory does not exist or is not a directory.
    #[error("cannot write the image to {path}: its directory {dir} does not exist")]
    NoParent {
        /// The destination.
        path: PathBuf,
        /// Its parent.
        dir: PathBuf,
    },
    /// The destination could not be inspected.
    #[error("cannot write the image to {path}: {source}")]
    Io {
        /// The destination.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

impl From<OutputError> for std::io::Error {
    fn from(e: OutputError) -> Self {
        let kind = match &e {
            OutputError::NotAFile { .. } => std::io::ErrorKind::InvalidInput,
            OutputError::DanglingLink { .. } | OutputError::NoParent { .. } => {
                std::io::ErrorKind::NotFound
            }
            OutputError::Io { source, .. } => source.kind(),
        };
        std::io::Error::new(kind, e.to_string())
    }
}

fn kind_of(t: std::fs::FileType) -> Option<&'static str> {
    if t.is_file() {
        None
    } else if t.is_dir() {
        Some("a directory")
    } else if t.is_char_device() {
        Some("a character device")
    } else if t.is_block_device() {
        Some("a block device")
    } else if t.is_fifo() {
        Some("a FIFO")
    } else if t.is_socket() {
        Some("a socket")
    } else {
        Some("not a regular file")
    }
}

/// The regular file (existing or new) that `pull -o path` replaces; `path` must be absolute.
pub fn resolve(path: &Path) -> Result<PathBuf, OutputError> {
    let io = |source| OutputError::Io {
        path: path.to_path_buf(),
        source,
    };
    let target = match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => match std::fs::canonicalize(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(OutputError::DanglingLink {
                    path: path.to_path_buf(),
                });
            }
            Err(e) => return Err(io(e)),
        },
        Ok(_) => path.to_path_buf(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
            let dir = if dir.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                dir
            };
            return match std::fs::metadata(&dir) {
                Ok(m) if m.is_dir() => Ok(path.to_path_buf()),
                _ => Err(OutputError::NoParent {
                    path: path.to_path_buf(),
                    dir,
                }),
            };
        }
        Err(e) => return Err(io(e)),
    };
    let meta = std::fs::metadata(&target).map_err(io)?;
    match kind_of(meta.file_type()) {
        None => Ok(target),
        Some(what) => Err(OutputError::NotAFile { path: target, what }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decides_by_file_type() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let new = d.join("new.img");
        assert_eq!(resolve(&new).unwrap(), new);
        let file = d.join("old.img");
        std::fs::write(&file, b"x").unwrap();
        assert_eq!(resolve(&file).unwrap(), file);
        let link = d.join("link.img");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert_eq!(
            resolve(&link).unwrap(),
            std::fs::canonicalize(&file).unwrap()
        );
        let dangling = d.join("dangling.img");
        std::os::unix::fs::symlink(d.join("missing"), &dangling).unwrap();
        assert!(matches!(
            resolve(&dangling),
            Err(OutputError::DanglingLink { .. })
        ));
        let err = resolve(d).unwrap_err().to_string();
        assert!(err.contains("a directory"), "{err}");
        let err = resolve(Path::new("/dev/null")).unwrap_err().to_string();
        assert!(
            err.contains("/dev/null") && err.contains("character device"),
            "{err}"
        );
        assert!(matches!(
            resolve(&d.join("no/such/dir/x.img")),
            Err(OutputError::NoParent { .. })
        ));
    }
}
