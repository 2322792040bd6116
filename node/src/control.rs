//! The control socket: how `vmswarm publish | pull | stage | images | peers | status | verify |
//! mount | umount | mounts | clone | clones` talk to the daemon that owns a data dir.
//!
//! A unix stream socket at `DATA/control.sock`, mode 0600 (only the daemon's user may drive it).
//! Each connection carries one request as a JSON line; the daemon answers with zero or more
//! `progress` (or, for `stage`, `line`) lines and then exactly one `done` or `error` line. This module defines the messages,
//! the client, and how the daemon reads a request line: at most [`MAX_REQUEST_LINE`] bytes are
//! buffered; a longer line is answered with an `error` and the connection is closed, so a client
//! cannot make the daemon hold an unbounded line in memory. The daemon implements the commands.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// The socket's file name inside the data dir.
pub const SOCKET_NAME: &str = "control.sock";

/// Longest request line the daemon reads, newline included. The largest legitimate request is a
/// `publish` or `pull -o` naming a path (at most `PATH_MAX`, 4096 bytes, on Linux; JSON escaping can
/// make it up to six times longer) plus a name: 64 KiB leaves ample room.
pub const MAX_REQUEST_LINE: usize = 64 << 10;

/// Why the daemon could not read a request line.
#[derive(Debug, thiserror::Error)]
pub enum RequestLineError {
    /// No newline within [`MAX_REQUEST_LINE`] bytes.
    #[error(
        "control request longer than {MAX_REQUEST_LINE} bytes (a request is one JSON line); closing the connection"
    )]
    TooLong,
    /// Reading the socket failed.
    #[error("reading the control request: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads one request line (without its line ending) from a control connection, buffering at most
/// [`MAX_REQUEST_LINE`] bytes. `None` if the client closed before sending anything; a last line
/// without a newline counts as a line.
pub async fn read_request_line<R: AsyncBufRead + Unpin>(
    rd: &mut R,
) -> Result<Option<Vec<u8>>, RequestLineError> {
    let mut line = Vec::new();
    let n = (&mut *rd)
        .take(MAX_REQUEST_LINE as u64)
        .read_until(b'\n', &mut line)
        .await?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
    } else if line.len() >= MAX_REQUEST_LINE {
        return Err(RequestLineError::TooLong);
    }
    Ok(Some(line))
}

/// What a mount fetches in the background, beyond what reads demand (`vmswarm mount --prefetch`).
///
/// On the control socket it is the mount request's `prefetch` field: `"none"`, `"all"` or
/// `"profile"`. Older clients sent a boolean there, which still reads as `false` = none and
/// `true` = all; a missing or `null` field is none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum PrefetchMode {
    /// Nothing: every chunk is fetched when a read first needs it (a lazy mount).
    #[default]
    #[value(skip)]
    None,
    /// The whole image at Background priority, boot-profile order first.
    All,
    /// Only the chunks of the image's boot profile, in profile order, at Background priority;
    /// the rest is left to on-demand reads. Without a boot profile (here or from a peer) nothing
    /// more than the reads' chunks is fetched.
    Profile,
}

impl PrefetchMode {
    /// The name used on the command line and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            PrefetchMode::None => "none",
            PrefetchMode::All => "all",
            PrefetchMode::Profile => "profile",
        }
    }

    /// Whether the mount fetches anything in the background.
    pub fn is_some(self) -> bool {
        self != PrefetchMode::None
    }
}

impl std::fmt::Display for PrefetchMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for PrefetchMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = PrefetchMode;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(r#""none", "all", "profile" or a boolean"#)
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<PrefetchMode, E> {
                Ok(if v {
                    PrefetchMode::All
                } else {
                    PrefetchMode::None
                })
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PrefetchMode, E> {
                match v {
                    "none" => Ok(PrefetchMode::None),
                    "all" => Ok(PrefetchMode::All),
                    "profile" => Ok(PrefetchMode::Profile),
                    _ => Err(E::unknown_variant(v, &["none", "all", "profile"])),
                }
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<PrefetchMode, E> {
                Ok(PrefetchMode::None)
            }
            fn visit_none<E: serde::de::Error>(self) -> Result<PrefetchMode, E> {
                Ok(PrefetchMode::None)
            }
        }
        d.deserialize_any(V)
    }
}

/// What `vmswarm mount` asks the daemon for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MountRequest {
    /// Image id (64 hex digits); exactly one of `image` and `clone`.
    pub image: Option<String>,
    /// Clone name.
    pub clone: Option<String>,
    /// `unix:/abs/path.sock` or `tcp:IP:PORT`.
    pub nbd: String,
    /// Export name (default: the clone's name, or the image's name).
    pub name: Option<String>,
    /// What to fetch in the background ([`PrefetchMode`]; a boolean from older clients).
    #[serde(default)]
    pub prefetch: PrefetchMode,
    /// Allow a TCP address outside loopback.
    pub allow_remote: bool,
}

/// A command for the daemon.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Node id, addresses, peers, images, counters.
    Status,
    /// Connected peers.
    Peers,
    /// Images held, fully or partly.
    Images,
    /// Chunk a local file into the store and provide it.
    Publish {
        /// Absolute path of the image file (the daemon reads it).
        path: PathBuf,
        /// Image name (defaults to the file name).
        name: Option<String>,
        /// Chunk size in bytes.
        chunk_size: u32,
    },
    /// Fetch an image from the swarm (and write it to `output`, if given).
    Pull {
        /// Image id, 64 hex digits.
        image: String,
        /// Absolute path to write the verified image to.
        output: Option<PathBuf>,
    },
    /// Re-hash every stored chunk; quarantine bad ones.
    Verify,
    /// Export an image (read-only) or a clone (writable) over NBD.
    Mount(MountRequest),
    /// Stop an export (its connections are closed).
    Umount {
        /// Export name.
        name: String,
    },
    /// Exports and their counters.
    Mounts,
    /// Create a writable copy-on-write clone of an image.
    Clone {
        /// Image id.
        image: String,
        /// Clone name.
        name: String,
    },
    /// Delete a clone (not while mounted).
    CloneRm {
        /// Clone name.
        name: String,
    },
    /// Clones in the data dir.
    Clones,
    /// Have target nodes pull an image this node holds in full (`vmswarm stage`).
    Stage {
        /// Image id, 64 hex digits.
        image: String,
        /// Targets: peer ids or multiaddrs with `/p2p/<peer id>` (empty with `site` or `asked`).
        peers: Vec<String>,
        /// Stage to every connected peer announcing this site.
        site: Option<String>,
        /// Stage to every connected peer that asked this node for the image (its manifest or
        /// chunks, or announced it wants it) since the daemon started.
        #[serde(default)]
        asked: bool,
        /// Answer once every target holds the image (or failed), not once they accepted.
        wait: bool,
    },
}

/// One line of the daemon's answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    /// Progress of a long command.
    Progress {
        /// Chunks held (zero chunks included).
        done: u64,
        /// Chunks in the image.
        total: u64,
        /// Bytes fetched so far by this command.
        bytes: u64,
    },
    /// A progress line for a person (`stage`).
    Line {
        /// The text, without a newline.
        text: String,
    },
    /// The command succeeded.
    Done {
        /// Command-specific result.
        result: serde_json::Value,
    },
    /// The command failed.
    Error {
        /// What went wrong, for a person.
        message: String,
    },
}

/// Errors of the control client.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No daemon listens on the data dir's socket.
    #[error(
        "no vmswarm daemon is running for data dir {dir} (start one with `vmswarm serve --data {dir}`)"
    )]
    NoDaemon {
        /// The data dir.
        dir: PathBuf,
    },
    /// Talking to the daemon failed.
    #[error("control socket {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The daemon answered something unreadable.
    #[error("control socket {path}: bad reply {line:?}: {reason}")]
    BadReply {
        /// The socket.
        path: PathBuf,
        /// The line.
        line: String,
        /// The parse error.
        reason: String,
    },
    /// The daemon closed the connection without a final answer (it stopped or crashed).
    #[error("the daemon closed the control connection before answering (did it stop?)")]
    Closed,
    /// The daemon reported an error.
    #[error("{0}")]
    Remote(String),
}

/// Sends `request` to the daemon of `data_dir`; calls `on_progress` for each progress line and returns
/// the final result.
pub async fn call(
    data_dir: &Path,
    request: &Request,
    on_progress: impl FnMut(u64, u64, u64),
) -> Result<serde_json::Value, ControlError> {
    call_with_lines(data_dir, request, on_progress, |_| {}).await
}

/// [`call`], also handing each progress `line` to `on_line`.
pub async fn call_with_lines(
    data_dir: &Path,
    request: &Request,
    mut on_progress: impl FnMut(u64, u64, u64),
    mut on_line: impl FnMut(&str),
) -> Result<serde_json::Value, ControlError> {
    let path = data_dir.join(SOCKET_NAME);
    let io = |source| ControlError::Io {
        path: path.clone(),
        source,
    };
    let stream = match UnixStream::connect(&path).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(ControlError::NoDaemon {
                dir: data_dir.to_path_buf(),
            });
        }
        Err(e) => return Err(io(e)),
    };
    let (rd, mut wr) = stream.into_split();
    let mut line = serde_json::to_string(request).map_err(|e| ControlError::BadReply {
        path: path.clone(),
        line: String::new(),
        reason: e.to_string(),
    })?;
    line.push('\n');
    wr.write_all(line.as_bytes()).await.map_err(io)?;
    let mut lines = BufReader::new(rd).lines();
    while let Some(line) = lines.next_line().await.map_err(io)? {
        let reply: Reply = serde_json::from_str(&line).map_err(|e| ControlError::BadReply {
            path: path.clone(),
            line: line.clone(),
            reason: e.to_string(),
        })?;
        match reply {
            Reply::Progress { done, total, bytes } => on_progress(done, total, bytes),
            Reply::Line { text } => on_line(&text),
            Reply::Done { result } => return Ok(result),
            Reply::Error { message } => return Err(ControlError::Remote(message)),
        }
    }
    Err(ControlError::Closed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_is_tagged_json() {
        let r = Request::Pull {
            image: "ab".into(),
            output: None,
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"{"cmd":"pull","image":"ab","output":null}"#);
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        // A mount's fields sit beside the tag, like every other command's.
        let m = Request::Mount(MountRequest {
            image: None,
            clone: Some("vm1".into()),
            nbd: "unix:/s".into(),
            name: None,
            prefetch: PrefetchMode::Profile,
            allow_remote: false,
        });
        let s = serde_json::to_string(&m).unwrap();
        assert_eq!(
            s,
            r#"{"cmd":"mount","image":null,"clone":"vm1","nbd":"unix:/s","name":null,"prefetch":"profile","allow_remote":false}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), m);
        let e: Reply = serde_json::from_str(r#"{"type":"error","message":"x"}"#).unwrap();
        assert_eq!(
            e,
            Reply::Error {
                message: "x".into()
            }
        );
    }

    #[test]
    fn prefetch_mode_round_trips_and_reads_old_booleans() {
        let mount = |prefetch: &str| -> Result<PrefetchMode, serde_json::Error> {
            let line = format!(
                r#"{{"cmd":"mount","image":null,"clone":"vm1","nbd":"unix:/s","name":null{prefetch},"allow_remote":false}}"#
            );
            match serde_json::from_str::<Request>(&line)? {
                Request::Mount(m) => Ok(m.prefetch),
                other => panic!("{other:?}"),
            }
        };
        for mode in [PrefetchMode::None, PrefetchMode::All, PrefetchMode::Profile] {
            let json = serde_json::to_string(&mode).unwrap();
            assert_eq!(json, format!("\"{mode}\""));
            assert_eq!(mount(&format!(r#","prefetch":{json}"#)).unwrap(), mode);
        }
        // What older clients send.
        assert_eq!(mount(r#","prefetch":true"#).unwrap(), PrefetchMode::All);
        assert_eq!(mount(r#","prefetch":false"#).unwrap(), PrefetchMode::None);
        assert_eq!(mount(r#","prefetch":null"#).unwrap(), PrefetchMode::None);
        assert_eq!(mount("").unwrap(), PrefetchMode::None);
        let e = mount(r#","prefetch":"bogus""#).unwrap_err().to_string();
        assert!(e.contains("bogus") && e.contains("profile"), "{e}");
        assert!(mount(r#","prefetch":3"#).is_err());
    }

    #[tokio::test]
    async fn request_lines_are_capped() {
        let mut ok: &[u8] = b"{\"cmd\":\"status\"}\r\nrest";
        assert_eq!(
            read_request_line(&mut ok).await.unwrap().unwrap(),
            br#"{"cmd":"status"}"#
        );
        let mut last: &[u8] = b"no newline";
        assert_eq!(
            read_request_line(&mut last).await.unwrap().unwrap(),
            b"no newline"
        );
        let mut empty: &[u8] = b"";
        assert!(read_request_line(&mut empty).await.unwrap().is_none());
        let mut fits = vec![b'x'; MAX_REQUEST_LINE - 1];
        fits.push(b'\n');
        let got = read_request_line(&mut fits.as_slice()).await.unwrap();
        assert_eq!(got.unwrap().len(), MAX_REQUEST_LINE - 1);
        let long = vec![b'x'; 4 * MAX_REQUEST_LINE];
        let mut rd = long.as_slice();
        assert!(matches!(
            read_request_line(&mut rd).await,
            Err(RequestLineError::TooLong)
        ));
        // Nothing past the cap was consumed.
        assert_eq!(rd.len(), 3 * MAX_REQUEST_LINE);
    }

    #[tokio::test]
    async fn no_daemon_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = call(dir.path(), &Request::Status, |_, _, _| {})
            .await
            .unwrap_err();
        assert!(matches!(err, ControlError::NoDaemon { .. }));
        assert!(err.to_string().contains("vmswarm serve --data"));
    }
}
