//! NBD exports: how a VM (or `qemu-img`, `nbdcopy`, the kernel's `nbd-client`) reads an image
//! straight from the node.
//!
//! - [`proto`]: the wire format, sans I/O (handshake, options, requests, replies).
//! - [`server`]: listeners and connections, driving [`proto`]; exports implement [`server::Backend`].
//! - [`export`]: the backend of a mount: base image chunks from the store (fetched on demand
//!   through the daemon when absent), plus a copy-on-write [`crate::overlay`] for clones.
//!
//! # Why a hand-written server
//! The crates that exist were checked (docs.rs, 2026): `tokio-nbd` (0.1–0.3, 2025) is GPL-2.0, which
//! this MIT/Apache project cannot link, and is a few weeks old; `nbd` (0.2) is synchronous, has no
//! structured replies and no option haggling beyond the basics; `nbdkit` binds the C nbdkit server
//! (a plugin model, not an embeddable server). The protocol subset needed here (fixed newstyle,
//! `NBD_OPT_GO/INFO/LIST/ABORT/EXPORT_NAME/STRUCTURED_REPLY`, block size info, READ, WRITE,
//! FLUSH, TRIM, WRITE_ZEROES, DISC) is small and fully specified, and writing it as a sans-IO codec
//! lets it be proptested and fuzzed like the rest of the project's decoders.
//!
//! Addresses: `unix:/path/to.sock` or `tcp:HOST:PORT`. TCP binds loopback only unless the caller
//! explicitly allows other addresses (`--nbd-allow-remote`): NBD has no authentication.

pub mod export;
pub mod proto;
pub mod server;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Where an export listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum NbdAddr {
    /// A unix stream socket at this path.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(SocketAddr),
}

/// A bad `--nbd` address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    /// Neither `unix:` nor `tcp:`.
    #[error("NBD address {0:?} must be unix:/path/to.sock or tcp:HOST:PORT")]
    Scheme(String),
    /// The TCP part is not `IP:PORT`.
    #[error("NBD address {0:?}: {1}")]
    Tcp(String, String),
    /// A unix path must be absolute (the daemon resolves it, not the caller's shell).
    #[error("NBD unix socket path {0:?} must be absolute")]
    Relative(String),
}

impl std::str::FromStr for NbdAddr {
    type Err = AddrError;
    fn from_str(s: &str) -> Result<Self, AddrError> {
        if let Some(p) = s.strip_prefix("unix:") {
            let path = PathBuf::from(p);
            if !path.is_absolute() {
                return Err(AddrError::Relative(p.into()));
            }
            Ok(NbdAddr::Unix(path))
        } else if let Some(t) = s.strip_prefix("tcp:") {
            let t = t.strip_prefix("//").unwrap_or(t);
            let t = t.replace("localhost:", "127.0.0.1:");
            t.parse()
                .map(NbdAddr::Tcp)
                .map_err(|e: std::net::AddrParseError| AddrError::Tcp(s.into(), e.to_string()))
        } else {
            Err(AddrError::Scheme(s.into()))
        }
    }
}

impl TryFrom<String> for NbdAddr {
    type Error = AddrError;
    fn try_from(s: String) -> Result<Self, AddrError> {
        s.parse()
    }
}

impl From<NbdAddr> for String {
    fn from(a: NbdAddr) -> String {
        a.to_string()
    }
}

impl fmt::Display for NbdAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            NbdAddr::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

impl NbdAddr {
    /// The NBD URI a client uses for export `name` on this address (qemu, libnbd).
    pub fn uri(&self, name: &str) -> String {
        match self {
            NbdAddr::Unix(p) => format!("nbd+unix:///{name}?socket={}", p.display()),
            NbdAddr::Tcp(a) => format!("nbd://{a}/{name}"),
        }
    }

    /// Whether this is a TCP address outside loopback.
    pub fn is_remote(&self) -> bool {
        matches!(self, NbdAddr::Tcp(a) if !a.ip().is_loopback())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let u: NbdAddr = "unix:/run/x.sock".parse().unwrap();
        assert_eq!(u.uri("d"), "nbd+unix:///d?socket=/run/x.sock");
        assert!(!u.is_remote());
        let t: NbdAddr = "tcp:127.0.0.1:10809".parse().unwrap();
        assert_eq!(t.to_string(), "tcp:127.0.0.1:10809");
        assert_eq!(t.uri("d"), "nbd://127.0.0.1:10809/d");
        assert!(!t.is_remote());
        assert!("tcp:0.0.0.0:1".parse::<NbdAddr>().unwrap().is_remote());
        assert!("unix:rel.sock".parse::<NbdAddr>().is_err());
        assert!("tcp:nohost".parse::<NbdAddr>().is_err());
        assert!("nbd:/x".parse::<NbdAddr>().is_err());
        let j = serde_json::to_string(&t).unwrap();
        assert_eq!(serde_json::from_str::<NbdAddr>(&j).unwrap(), t);
    }
}
