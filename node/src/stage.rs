//! `vmswarm stage --peers FILE`: reading the target list.
//!
//! A peers file names one target node per line: a peer id, or a QUIC multiaddr ending in
//! `/p2p/<peer id>` (the addresses `node.json` lists). Blank lines are skipped and `#` starts a
//! comment (a multiaddr never contains `#`). A line that is neither is an error naming the file's
//! line; a file without any target is an error too, so that a typo never stages to nobody. The
//! daemon's side of staging (sending `Stage`, following progress) is `daemon::stage`.

use libp2p::{Multiaddr, PeerId};

/// One target of a stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The node.
    pub peer: PeerId,
    /// Where to dial it, if given (else its address is looked up).
    pub addr: Option<Multiaddr>,
}

impl Target {
    /// The form sent to the daemon: the multiaddr if one was given, else the peer id.
    pub fn to_wire_string(&self) -> String {
        match &self.addr {
            Some(a) => a.to_string(),
            None => self.peer.to_string(),
        }
    }
}

/// Why a target list is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TargetsError {
    /// A line is neither a peer id nor a multiaddr with `/p2p/<peer id>`.
    #[error(
        "{source_name}:{line}: {text:?} is neither a peer id nor a multiaddr ending in /p2p/<peer id>"
    )]
    BadLine {
        /// The file (or other source) name.
        source_name: String,
        /// 1-based line number.
        line: usize,
        /// The line, comment stripped.
        text: String,
    },
    /// No target at all.
    #[error("{source_name} names no target node (one peer id or multiaddr per line)")]
    Empty {
        /// The file name.
        source_name: String,
    },
}

/// Parses one target: a peer id, or a multiaddr whose `/p2p/` names the peer.
pub fn parse_target(text: &str) -> Option<Target> {
    if let Ok(peer) = text.parse::<PeerId>() {
        return Some(Target { peer, addr: None });
    }
    let addr: Multiaddr = text.parse().ok()?;
    let peer = crate::daemon::peer_id_of(&addr)?;
    Some(Target {
        peer,
        addr: Some(addr),
    })
}

/// Parses a peers file's text (`source_name` names it in errors). Duplicate peers are kept once
/// (the first line naming one wins).
pub fn parse_targets(source_name: &str, text: &str) -> Result<Vec<Target>, TargetsError> {
    let mut out: Vec<Target> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let t = parse_target(line).ok_or_else(|| TargetsError::BadLine {
            source_name: source_name.to_owned(),
            line: i + 1,
            text: line.to_owned(),
        })?;
        if !out.iter().any(|o| o.peer == t.peer) {
            out.push(t);
        }
    }
    if out.is_empty() {
        return Err(TargetsError::Empty {
            source_name: source_name.to_owned(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_ids_multiaddrs_comments_and_bad_lines() {
        let a = PeerId::random();
        let b = PeerId::random();
        let text =
            format!("# targets\n\n{a}\n  /ip4/10.0.0.2/udp/7400/quic-v1/p2p/{b}  # rack 2\n{a}\n");
        let t = parse_targets("peers.txt", &text).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(
            t[0],
            Target {
                peer: a,
                addr: None
            }
        );
        assert_eq!(t[1].peer, b);
        assert_eq!(
            t[1].to_wire_string(),
            format!("/ip4/10.0.0.2/udp/7400/quic-v1/p2p/{b}")
        );
        let err = parse_targets("peers.txt", &format!("{a}\nnot-a-peer\n")).unwrap_err();
        assert_eq!(
            err,
            TargetsError::BadLine {
                source_name: "peers.txt".into(),
                line: 2,
                text: "not-a-peer".into()
            }
        );
        assert!(err.to_string().contains("peers.txt:2"), "{err}");
        // A multiaddr without /p2p/ names no node.
        assert!(parse_targets("f", "/ip4/10.0.0.2/udp/7400/quic-v1\n").is_err());
        assert!(matches!(
            parse_targets("f", "# nothing\n\n"),
            Err(TargetsError::Empty { .. })
        ));
    }
}
