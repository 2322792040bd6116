//! The peer-to-peer messages.
//!
//! This module decides *what* two peers can say to each other: the [`Message`] set, the handshake
//! ([`Hello`] and [`Hello::check`]), and the structural bounds every message must respect
//! ([`Message::validate`]), so that nothing a peer sends can make us hold more than one frame's worth
//! of memory or log an unbounded string.
//!
//! It leaves to others:
//! - the byte encoding and framing ([`crate::codec`], which runs [`Message::validate`] after every
//!   decode and before every encode);
//! - checking a [`ChunkSet`] against an image's real chunk count
//!   ([`crate::bitfield::ChunkBitmap::from_wire`]) and chunk indices against the manifest;
//! - decoding and verifying manifest bytes ([`crate::manifest`]) and chunk bytes
//!   ([`ChunkId::verify`]);
//! - deciding what to request from whom and in which order ([`crate::fetch`], [`crate::serve`]).
//!
//! Bounds here are loose, structural limits: a message that passes [`Message::validate`] is safe to
//! hold and to log, not necessarily meaningful for the image it names.

use bincode::{Decode, Encode};

use crate::bitfield::{ChunkSet, ChunkSetError};
use crate::{ChunkId, ImageId, Priority};

/// The protocol version this crate speaks. Peers with a different version are refused at the
/// handshake ([`Hello::check`]).
pub const PROTOCOL_VERSION: u16 = 1;

/// Largest chunk a [`Message::Chunk`] may carry: 16 MiB, the largest chunk size an image may use.
pub const MAX_CHUNK_BYTES: usize = 16 * 1024 * 1024;

/// Largest canonical manifest encoding a [`Message::Manifest`] may carry: 16 MiB.
pub const MAX_MANIFEST_BYTES: usize = 16 * 1024 * 1024;

/// Most chunk ids in one [`Message::Request`] or [`Message::Cancel`]. A fetcher with more
/// outstanding wants sends several requests.
pub const MAX_REQUEST_CHUNKS: usize = 256;

/// Longest site name in a [`Hello`], in bytes.
pub const MAX_SITE_LEN: usize = 64;

/// Longest agent string in a [`Hello`], in bytes.
pub const MAX_AGENT_LEN: usize = 128;

/// How long a node collects newly held chunks before sending them as one [`Message::HaveUpdate`] to
/// each interested peer. Shorter spreads news faster; longer sends fewer messages (at 10,000 hosts
/// HaveUpdates are most of the traffic). Both the node and the simulator use this default.
pub const HAVE_UPDATE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// How long a node may hold back the [`Message::HaveUpdate`] for a chunk it has just committed,
/// given the priority it fetched the chunk at. A chunk a VM was waiting for is announced at once:
/// in a flash crowd the other nodes of the site read the same block at nearly the same moment,
/// and a server that refused them with [`RejectReason::Fanout`] sends them to the nodes it gave
/// the chunk to, so every batching delay lengthens every VM's read chain. Background chunks
/// wait for the next batch ([`HAVE_UPDATE_INTERVAL`]). The node and the simulator both use this.
pub fn have_update_delay(fetched_at: Priority) -> std::time::Duration {
    match fetched_at {
        Priority::Demand => std::time::Duration::ZERO,
        Priority::Background => HAVE_UPDATE_INTERVAL,
    }
}

/// Most chunk indices in one [`Message::HaveUpdate`] or [`Message::Fetching`]. A sender with more
/// splits them over several messages (or sends a full [`Message::Have`]).
pub const MAX_UPDATE_INDICES: usize = 65_536;

/// Largest chunk count of an image the wire can describe, and so the bound on every chunk index.
///
/// This is a loose structural limit (2^24 chunks: a 2 MiB bitmap, 4 TiB of 256 KiB chunks); the real
/// count of an image comes from its manifest and is checked by
/// [`crate::bitfield::ChunkBitmap::from_wire`].
pub const MAX_IMAGE_CHUNKS: u32 = 1 << 24;

/// Most runs in a [`ChunkSet::Runs`] carried by [`Message::Have`] (and never more than the set's
/// chunk count). [`crate::bitfield::ChunkBitmap::to_wire`] only picks runs when they are smaller than
/// the bitmap, i.e. fewer than `count / 48` of them, far below this bound.
pub const MAX_HAVE_RUNS: usize = 1 << 20;

/// What a peer offers, as a bit set. Unknown bits are kept and ignored, so a newer peer can announce
/// capabilities an older one does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Encode, Decode)]
pub struct Capabilities(pub u32);

impl Capabilities {
    /// No capabilities.
    pub const NONE: Capabilities = Capabilities(0);
    /// Serves chunks and manifests it holds to other peers.
    pub const SERVE: Capabilities = Capabilities(1);
    /// Takes part in relay-tree distribution: understands [`RejectReason::Fanout`] (peers without
    /// it are answered `Busy` instead, which an older decoder knows) and relays what it fetches.
    /// Also takes staged pushes: understands [`Message::Stage`] and answers
    /// [`Message::StageRefused`] (peers without it are never sent a `Stage`).
    pub const MULTICAST: Capabilities = Capabilities(2);
    /// Understands [`Message::GetBootProfile`] (peers without it are never sent one).
    pub const BOOT_PROFILES: Capabilities = Capabilities(4);
    /// An origin: a source server that holds images for others and is not a swarm member. Fetch
    /// schedulers treat fetches from it like fetches from another site (once per site), even when
    /// it announces their own site ([`crate::fetch::PeerInfo::origin`]).
    pub const ORIGIN: Capabilities = Capabilities(8);

    /// The raw bits.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Whether every capability in `other` is also in `self`.
    pub const fn contains(self, other: Capabilities) -> bool {
        self.0 & other.0 == other.0
    }

    /// The capabilities in either `self` or `other`.
    #[must_use]
    pub const fn union(self, other: Capabilities) -> Capabilities {
        Capabilities(self.0 | other.0)
    }
}

impl std::ops::BitOr for Capabilities {
    type Output = Capabilities;
    fn bitor(self, rhs: Capabilities) -> Capabilities {
        self.union(rhs)
    }
}

/// Why a handshake is refused ([`Hello::check`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: we speak version {ours}, the peer speaks version {theirs}")]
    VersionMismatch {
        /// Our version, [`PROTOCOL_VERSION`].
        ours: u16,
        /// The version in the peer's [`Hello`].
        theirs: u16,
    },
    /// The site name is empty.
    #[error("site name is empty")]
    EmptySite,
    /// The site name is longer than [`MAX_SITE_LEN`].
    #[error("site name is {len} bytes long, at most {max} are allowed")]
    SiteTooLong {
        /// Length in bytes.
        len: usize,
        /// [`MAX_SITE_LEN`].
        max: usize,
    },
    /// The site name holds a character outside `[A-Za-z0-9._-]`.
    #[error("site name contains {ch:?}; only A-Z, a-z, 0-9, '.', '_' and '-' are allowed")]
    BadSiteChar {
        /// The first offending character.
        ch: char,
    },
    /// The agent string is longer than [`MAX_AGENT_LEN`].
    #[error("agent string is {len} bytes long, at most {max} are allowed")]
    AgentTooLong {
        /// Length in bytes.
        len: usize,
        /// [`MAX_AGENT_LEN`].
        max: usize,
    },
}

/// The first message on a connection, in both directions.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Hello {
    /// Protocol version of the sender, [`PROTOCOL_VERSION`] for this crate.
    pub version: u16,
    /// The sender's site (data center): 1 to [`MAX_SITE_LEN`] bytes of `[A-Za-z0-9._-]`.
    pub site: String,
    /// What the sender offers.
    pub capabilities: Capabilities,
    /// Free-form software name and version (e.g. `vmswarm/0.1.0`), at most [`MAX_AGENT_LEN`] bytes.
    pub agent: String,
}

impl Hello {
    /// A hello for this crate's [`PROTOCOL_VERSION`].
    pub fn new(
        site: impl Into<String>,
        capabilities: Capabilities,
        agent: impl Into<String>,
    ) -> Self {
        Hello {
            version: PROTOCOL_VERSION,
            site: site.into(),
            capabilities,
            agent: agent.into(),
        }
    }

    /// Whether we accept a peer that sent this hello: same version, a well-formed site name, and an
    /// agent string of bounded length. Checks run in that order; the first failure is returned.
    pub fn check(&self) -> Result<(), HandshakeError> {
        if self.version != PROTOCOL_VERSION {
            return Err(HandshakeError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: self.version,
            });
        }
        if self.site.is_empty() {
            return Err(HandshakeError::EmptySite);
        }
        if self.site.len() > MAX_SITE_LEN {
            return Err(HandshakeError::SiteTooLong {
                len: self.site.len(),
                max: MAX_SITE_LEN,
            });
        }
        if let Some(ch) = self
            .site
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(HandshakeError::BadSiteChar { ch });
        }
        if self.agent.len() > MAX_AGENT_LEN {
            return Err(HandshakeError::AgentTooLong {
                len: self.agent.len(),
                max: MAX_AGENT_LEN,
            });
        }
        Ok(())
    }

    /// The length bounds only, which hold for any hello we decode, whatever its version.
    fn validate_lengths(&self) -> Result<(), WireError> {
        for (field, len, max) in [
            ("site", self.site.len(), MAX_SITE_LEN),
            ("agent", self.agent.len(), MAX_AGENT_LEN),
        ] {
            if len > max {
                return Err(WireError::StringTooLong { field, len, max });
            }
        }
        Ok(())
    }
}

/// Why a serving peer refuses to send a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Encode, Decode)]
pub enum RejectReason {
    /// The peer does not hold the chunk (any more).
    NotFound,
    /// The peer is overloaded; try someone else or later.
    Busy,
    /// The peer has banned the requester.
    Banned,
    /// The peer is shutting down.
    Shutdown,
    /// The peer is already sending this chunk, for VMs waiting on it, to as many peers as it
    /// fans one chunk out to (`serve::Config::demand_fanout`): get it from one of them once they
    /// announce it. Says nothing about other chunks. Only sent to peers announcing
    /// [`Capabilities::MULTICAST`]: a peer without it would fail to decode this variant, and is
    /// answered `Busy` instead.
    Fanout,
}

impl RejectReason {
    /// How to refuse a chunk already on its way to `serve::Config::demand_fanout` other peers,
    /// to a peer whose `Hello` announced `peer`: [`RejectReason::Fanout`] if it understands it
    /// ([`Capabilities::MULTICAST`]), else [`RejectReason::Busy`] (a peer of protocol version 1
    /// without that bit fails to decode `Fanout`, and treats `Busy` as "ask elsewhere for a while").
    pub fn fanout_for(peer: Capabilities) -> RejectReason {
        if peer.contains(Capabilities::MULTICAST) {
            RejectReason::Fanout
        } else {
            RejectReason::Busy
        }
    }
}

/// Why a node refuses a peer's [`Message::Stage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Encode, Decode)]
pub enum StageRefusal {
    /// No peer handed over the image's manifest in time: the node cannot pull it.
    NoManifest,
    /// The node already runs as many staged pulls as it takes at once.
    Busy,
}

/// A structural violation found by [`Message::validate`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A [`Message::Request`] or [`Message::Cancel`] names no chunk.
    #[error("{kind} names no chunks")]
    NoChunks {
        /// [`Message::kind`] of the message.
        kind: &'static str,
    },
    /// A [`Message::Request`] or [`Message::Cancel`] names more than [`MAX_REQUEST_CHUNKS`] chunks.
    #[error("{kind} names {count} chunks, at most {max} are allowed")]
    TooManyChunks {
        /// [`Message::kind`] of the message.
        kind: &'static str,
        /// Number of chunk ids.
        count: usize,
        /// [`MAX_REQUEST_CHUNKS`].
        max: usize,
    },
    /// A [`Message::Chunk`] carries more than [`MAX_CHUNK_BYTES`].
    #[error("chunk of {len} bytes, at most {max} are allowed")]
    ChunkTooLarge {
        /// Length of the chunk data.
        len: usize,
        /// [`MAX_CHUNK_BYTES`].
        max: usize,
    },
    /// A [`Message::Manifest`] carries more than [`MAX_MANIFEST_BYTES`].
    #[error("manifest of {len} bytes, at most {max} are allowed")]
    ManifestTooLarge {
        /// Length of the manifest bytes.
        len: usize,
        /// [`MAX_MANIFEST_BYTES`].
        max: usize,
    },
    /// A [`Message::HaveUpdate`] or [`Message::Fetching`] lists more than [`MAX_UPDATE_INDICES`].
    #[error("{kind} lists {count} indices, at most {max} are allowed")]
    TooManyIndices {
        /// [`Message::kind`] of the message.
        kind: &'static str,
        /// Number of indices.
        count: usize,
        /// [`MAX_UPDATE_INDICES`].
        max: usize,
    },
    /// A chunk index is not below [`MAX_IMAGE_CHUNKS`].
    #[error("{kind} lists chunk index {index}, indices must be below {max}")]
    IndexOutOfRange {
        /// [`Message::kind`] of the message.
        kind: &'static str,
        /// The first offending index.
        index: u32,
        /// [`MAX_IMAGE_CHUNKS`].
        max: u32,
    },
    /// A [`Message::Have`] describes an image of more than [`MAX_IMAGE_CHUNKS`] chunks.
    #[error("chunk set over {count} chunks, at most {max} are allowed")]
    TooManyImageChunks {
        /// The count the set claims.
        count: u32,
        /// [`MAX_IMAGE_CHUNKS`].
        max: u32,
    },
    /// A [`Message::Have`] run list is longer than its chunk count or [`MAX_HAVE_RUNS`].
    #[error("chunk set of {runs} runs, at most {max} are allowed")]
    TooManyRuns {
        /// Number of runs.
        runs: usize,
        /// The smaller of the set's chunk count and [`MAX_HAVE_RUNS`].
        max: usize,
    },
    /// A [`Message::Have`] bitmap does not have `ceil(count / 8)` bytes.
    #[error("malformed chunk set: {0}")]
    ChunkSet(#[from] ChunkSetError),
    /// A [`Hello`] string field is too long.
    #[error("hello {field} is {len} bytes long, at most {max} are allowed")]
    StringTooLong {
        /// `"site"` or `"agent"`.
        field: &'static str,
        /// Length in bytes.
        len: usize,
        /// The bound for that field.
        max: usize,
    },
}

/// A message between two peers. Chunks are named by content ([`ChunkId`]); which chunks of an image a
/// peer holds are named by index within that image ([`ImageId`] plus index).
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum Message {
    /// Handshake; the first message each way.
    Hello(Hello),
    /// The full set of chunk indices of `image` the sender holds.
    Have {
        /// The image.
        image: ImageId,
        /// Indices held, in wire form.
        chunks: ChunkSet,
    },
    /// Indices of `image` the sender newly holds since its last `Have` or `HaveUpdate`.
    HaveUpdate {
        /// The image.
        image: ImageId,
        /// Newly held indices.
        indices: Vec<u32>,
    },
    /// Indices of `image` the sender is currently fetching from another site, so that same-site
    /// peers can wait for the local copy instead of fetching over the WAN again.
    Fetching {
        /// The image.
        image: ImageId,
        /// Indices being fetched.
        indices: Vec<u32>,
    },
    /// Asks for chunks by content id.
    Request {
        /// How urgently the requester needs them.
        priority: Priority,
        /// 1 to [`MAX_REQUEST_CHUNKS`] chunk ids.
        chunks: Vec<ChunkId>,
    },
    /// One chunk's bytes, answering a request. The receiver verifies them against `id`.
    Chunk {
        /// Content id the bytes should hash to.
        id: ChunkId,
        /// At most [`MAX_CHUNK_BYTES`] bytes.
        data: Vec<u8>,
    },
    /// Withdraws earlier requests (the chunk arrived from elsewhere or is no longer wanted).
    Cancel {
        /// 1 to [`MAX_REQUEST_CHUNKS`] chunk ids.
        chunks: Vec<ChunkId>,
    },
    /// Refuses one requested chunk.
    Reject {
        /// The chunk refused.
        chunk: ChunkId,
        /// Why.
        reason: RejectReason,
    },
    /// Asks for the manifest of an image.
    GetManifest {
        /// The image.
        image: ImageId,
    },
    /// The canonical manifest encoding of an image; the receiver decodes it and checks it hashes to
    /// `image`.
    Manifest {
        /// The image.
        image: ImageId,
        /// At most [`MAX_MANIFEST_BYTES`] bytes.
        bytes: Vec<u8>,
    },
    /// The sender does not have the manifest of `image`.
    ManifestNotFound {
        /// The image.
        image: ImageId,
    },
    /// Acknowledges a message that has no other answer (`HaveUpdate`, `Fetching`, `Cancel`) on
    /// transports where every message gets a reply (libp2p request-response).
    Ack,
    /// Asks for the boot profile of an image: the order in which a booting VM first read its
    /// chunks. Only sent to peers announcing [`Capabilities::BOOT_PROFILES`].
    GetBootProfile {
        /// The image.
        image: ImageId,
    },
    /// A boot profile: chunk indices of `image` in first-touch order, at most
    /// [`MAX_UPDATE_INDICES`]. The receiver checks the indices against the manifest. A profile only
    /// ranks Background prefetch; it never affects which bytes are accepted.
    BootProfile {
        /// The image.
        image: ImageId,
        /// Chunk indices, first touched first.
        order: Vec<u32>,
    },
    /// The sender has no boot profile of `image`.
    BootProfileNotFound {
        /// The image.
        image: ImageId,
    },
    /// The sender wants these chunks of `image`, which the receiver, a gateway of the sender's
    /// site (`site`), is assigned to bring into the site and which nobody there holds or fetches
    /// yet: the receiver fetches them from outside at `priority` (Demand: a VM on the sender is
    /// blocked on them) and announces it (`Fetching`). Only sent to peers announcing
    /// [`Capabilities::MULTICAST`].
    Need {
        /// The image.
        image: ImageId,
        /// How urgently the sender needs them.
        priority: Priority,
        /// Chunk indices, at most [`MAX_UPDATE_INDICES`].
        indices: Vec<u32>,
    },
    /// Asks the receiver to pull the whole of `image` now (`vmswarm stage`, a group boot): it
    /// fetches the manifest from the swarm and pulls as `vmswarm pull` does, boot profile first.
    /// Answered [`Message::Ack`] once the receiver holds the manifest and pulls (or holds) the
    /// image, or [`Message::StageRefused`]. Only sent to peers announcing
    /// [`Capabilities::MULTICAST`].
    Stage {
        /// The image.
        image: ImageId,
    },
    /// The sender will not pull `image` for a [`Message::Stage`].
    StageRefused {
        /// The image.
        image: ImageId,
        /// Why.
        reason: StageRefusal,
    },
}

impl Message {
    /// A short, stable name for logs and metrics (`"hello"`, `"have"`, `"request"`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Have { .. } => "have",
            Message::HaveUpdate { .. } => "have_update",
            Message::Fetching { .. } => "fetching",
            Message::Need { .. } => "need",
            Message::Request { .. } => "request",
            Message::Chunk { .. } => "chunk",
            Message::Cancel { .. } => "cancel",
            Message::Reject { .. } => "reject",
            Message::GetManifest { .. } => "get_manifest",
            Message::Manifest { .. } => "manifest",
            Message::ManifestNotFound { .. } => "manifest_not_found",
            Message::Ack => "ack",
            Message::GetBootProfile { .. } => "get_boot_profile",
            Message::BootProfile { .. } => "boot_profile",
            Message::BootProfileNotFound { .. } => "boot_profile_not_found",
            Message::Stage { .. } => "stage",
            Message::StageRefused { .. } => "stage_refused",
        }
    }

    /// Checks the structural bounds of this module (the `MAX_*` constants): list and byte lengths,
    /// index ranges, the shape of a `Have` set, the lengths of `Hello` strings. The codec runs this
    /// after decoding and before encoding.
    ///
    /// A `Hello` of another version passes (its lengths are still checked), so that the handshake
    /// can report the mismatch precisely with [`Hello::check`].
    pub fn validate(&self) -> Result<(), WireError> {
        let kind = self.kind();
        match self {
            Message::Hello(hello) => hello.validate_lengths(),
            Message::Have { chunks, .. } => validate_chunk_set(chunks),
            Message::HaveUpdate { indices, .. }
            | Message::Fetching { indices, .. }
            | Message::Need { indices, .. }
            | Message::BootProfile { order: indices, .. } => validate_indices(kind, indices),
            Message::Request { chunks, .. } | Message::Cancel { chunks } => {
                validate_chunk_list(kind, chunks)
            }
            Message::Chunk { data, .. } => {
                if data.len() > MAX_CHUNK_BYTES {
                    return Err(WireError::ChunkTooLarge {
                        len: data.len(),
                        max: MAX_CHUNK_BYTES,
                    });
                }
                Ok(())
            }
            Message::Manifest { bytes, .. } => {
                if bytes.len() > MAX_MANIFEST_BYTES {
                    return Err(WireError::ManifestTooLarge {
                        len: bytes.len(),
                        max: MAX_MANIFEST_BYTES,
                    });
                }
                Ok(())
            }
            Message::Reject { .. }
            | Message::GetManifest { .. }
            | Message::ManifestNotFound { .. }
            | Message::Ack
            | Message::GetBootProfile { .. }
            | Message::BootProfileNotFound { .. }
            | Message::Stage { .. }
            | Message::StageRefused { .. } => Ok(()),
        }
    }
}

fn validate_chunk_list(kind: &'static str, chunks: &[ChunkId]) -> Result<(), WireError> {
    if chunks.is_empty() {
        return Err(WireError::NoChunks { kind });
    }
    if chunks.len() > MAX_REQUEST_CHUNKS {
        return Err(WireError::TooManyChunks {
            kind,
            count: chunks.len(),
            max: MAX_REQUEST_CHUNKS,
        });
    }
    Ok(())
}

fn validate_indices(kind: &'static str, indices: &[u32]) -> Result<(), WireError> {
    if indices.len() > MAX_UPDATE_INDICES {
        return Err(WireError::TooManyIndices {
            kind,
            count: indices.len(),
            max: MAX_UPDATE_INDICES,
        });
    }
    if let Some(&index) = indices.iter().find(|&&i| i >= MAX_IMAGE_CHUNKS) {
        return Err(WireError::IndexOutOfRange {
            kind,
            index,
            max: MAX_IMAGE_CHUNKS,
        });
    }
    Ok(())
}

/// The shape of a set, independent of the image: bounded count, a bitmap of exactly the right length,
/// no more runs than chunks. Run order and overlap are left to `ChunkBitmap::from_wire`.
fn validate_chunk_set(set: &ChunkSet) -> Result<(), WireError> {
    let count = set.count();
    if count > MAX_IMAGE_CHUNKS {
        return Err(WireError::TooManyImageChunks {
            count,
            max: MAX_IMAGE_CHUNKS,
        });
    }
    set.check_bitmap_length()?;
    match set {
        ChunkSet::Bitmap { .. } => {}
        ChunkSet::Runs { count, runs } => {
            let max = (*count as usize).min(MAX_HAVE_RUNS);
            if runs.len() > max {
                return Err(WireError::TooManyRuns {
                    runs: runs.len(),
                    max,
                });
            }
        }
    }
    Ok(())
}

/// Proptest strategies for messages, shared with the codec tests.
#[cfg(test)]
pub(crate) mod strategies {
    use proptest::collection::vec;
    use proptest::prelude::*;

    use super::*;

    fn chunk_id() -> impl Strategy<Value = ChunkId> {
        any::<[u8; 32]>().prop_map(ChunkId)
    }

    fn image_id() -> impl Strategy<Value = ImageId> {
        any::<[u8; 32]>().prop_map(ImageId)
    }

    fn priority() -> impl Strategy<Value = Priority> {
        prop_oneof![Just(Priority::Demand), Just(Priority::Background)]
    }

    fn reason() -> impl Strategy<Value = RejectReason> {
        prop_oneof![
            Just(RejectReason::NotFound),
            Just(RejectReason::Busy),
            Just(RejectReason::Banned),
            Just(RejectReason::Shutdown),
            Just(RejectReason::Fanout),
        ]
    }

    /// A set that passes [`Message::validate`] (not necessarily `from_wire`: runs are arbitrary).
    fn chunk_set() -> impl Strategy<Value = ChunkSet> {
        prop_oneof![
            (0u32..2000).prop_flat_map(|count| {
                vec(any::<u8>(), (count as usize).div_ceil(8))
                    .prop_map(move |bytes| ChunkSet::Bitmap { count, bytes })
            }),
            (0u32..2000).prop_flat_map(|count| {
                vec(any::<(u32, u32)>(), 0..=(count as usize).min(40))
                    .prop_map(move |runs| ChunkSet::Runs { count, runs })
            }),
            // Large counts exercise multi-byte varints.
            (0..=MAX_IMAGE_CHUNKS).prop_map(|count| ChunkSet::Runs {
                count,
                runs: vec![(count / 2, 1)],
            }),
        ]
    }

    fn indices() -> impl Strategy<Value = Vec<u32>> {
        vec(0..MAX_IMAGE_CHUNKS, 0..64)
    }

    fn chunk_list() -> impl Strategy<Value = Vec<ChunkId>> {
        vec(chunk_id(), 1..=16)
    }

    fn site() -> impl Strategy<Value = String> {
        "[A-Za-z0-9._-]{1,64}"
    }

    /// Any valid message, with byte payloads of at most `max_bytes`.
    pub(crate) fn message(max_bytes: usize) -> impl Strategy<Value = Message> {
        prop_oneof![
            (any::<u16>(), site(), any::<u32>(), "\\PC{0,32}").prop_map(
                |(version, site, caps, agent)| {
                    Message::Hello(Hello {
                        version,
                        site,
                        capabilities: Capabilities(caps),
                        agent,
                    })
                }
            ),
            (image_id(), chunk_set()).prop_map(|(image, chunks)| Message::Have { image, chunks }),
            (image_id(), indices())
                .prop_map(|(image, indices)| Message::HaveUpdate { image, indices }),
            (image_id(), indices())
                .prop_map(|(image, indices)| Message::Fetching { image, indices }),
            (image_id(), priority(), indices()).prop_map(|(image, priority, indices)| {
                Message::Need {
                    image,
                    priority,
                    indices,
                }
            }),
            (priority(), chunk_list())
                .prop_map(|(priority, chunks)| Message::Request { priority, chunks }),
            (chunk_id(), vec(any::<u8>(), 0..=max_bytes))
                .prop_map(|(id, data)| Message::Chunk { id, data }),
            chunk_list().prop_map(|chunks| Message::Cancel { chunks }),
            (chunk_id(), reason()).prop_map(|(chunk, reason)| Message::Reject { chunk, reason }),
            image_id().prop_map(|image| Message::GetManifest { image }),
            (image_id(), vec(any::<u8>(), 0..=max_bytes))
                .prop_map(|(image, bytes)| Message::Manifest { image, bytes }),
            image_id().prop_map(|image| Message::ManifestNotFound { image }),
            Just(Message::Ack),
            image_id().prop_map(|image| Message::GetBootProfile { image }),
            (image_id(), indices())
                .prop_map(|(image, order)| Message::BootProfile { image, order }),
            image_id().prop_map(|image| Message::BootProfileNotFound { image }),
            image_id().prop_map(|image| Message::Stage { image }),
            (
                image_id(),
                prop_oneof![Just(StageRefusal::NoManifest), Just(StageRefusal::Busy)]
            )
                .prop_map(|(image, reason)| Message::StageRefused { image, reason }),
        ]
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn hello(site: &str) -> Hello {
        Hello::new(site, Capabilities::SERVE, "vmswarm/0.1.0")
    }

    #[test]
    fn capabilities_bits() {
        let both = Capabilities::SERVE.union(Capabilities::MULTICAST);
        assert_eq!(both, Capabilities::SERVE | Capabilities::MULTICAST);
        assert_eq!(both.bits(), 3);
        assert!(both.contains(Capabilities::SERVE));
        assert!(both.contains(Capabilities::NONE));
        assert!(!Capabilities::SERVE.contains(both));
        assert!(!Capabilities::NONE.contains(Capabilities::SERVE));
        // Unknown bits are kept.
        assert!(Capabilities(0x8000_0001).contains(Capabilities::SERVE));
    }

    #[test]
    fn fanout_is_only_sent_to_peers_that_understand_it() {
        // A peer without MULTICAST (any peer before the fan-out limit) gets a reason it decodes.
        assert_eq!(
            RejectReason::fanout_for(Capabilities::SERVE | Capabilities::BOOT_PROFILES),
            RejectReason::Busy
        );
        assert_eq!(
            RejectReason::fanout_for(Capabilities::NONE),
            RejectReason::Busy
        );
        assert_eq!(
            RejectReason::fanout_for(Capabilities::SERVE | Capabilities::MULTICAST),
            RejectReason::Fanout
        );
    }

    #[test]
    fn hello_check_accepts_good_sites() {
        for site in ["dc1", "eu-west.rack_7", "A", &"x".repeat(MAX_SITE_LEN)] {
            assert_eq!(hello(site).check(), Ok(()), "{site}");
        }
    }

    #[test]
    fn hello_check_names_both_versions() {
        let mut h = hello("dc1");
        h.version = PROTOCOL_VERSION + 1;
        let err = h.check().unwrap_err();
        assert_eq!(
            err,
            HandshakeError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: PROTOCOL_VERSION + 1
            }
        );
        assert_eq!(
            err.to_string(),
            "protocol version mismatch: we speak version 1, the peer speaks version 2"
        );
        // A mismatched hello still passes structural validation, so it can be decoded and reported.
        assert_eq!(Message::Hello(h).validate(), Ok(()));
    }

    #[test]
    fn hello_check_rejects_bad_fields() {
        assert_eq!(hello("").check(), Err(HandshakeError::EmptySite));
        assert_eq!(
            hello(&"x".repeat(MAX_SITE_LEN + 1)).check(),
            Err(HandshakeError::SiteTooLong {
                len: MAX_SITE_LEN + 1,
                max: MAX_SITE_LEN
            })
        );
        for (site, ch) in [("dc 1", ' '), ("dc/1", '/'), ("dcé", 'é'), ("a\n", '\n')] {
            assert_eq!(
                hello(site).check(),
                Err(HandshakeError::BadSiteChar { ch }),
                "{site:?}"
            );
        }
        let mut h = hello("dc1");
        h.agent = "a".repeat(MAX_AGENT_LEN + 1);
        assert_eq!(
            h.check(),
            Err(HandshakeError::AgentTooLong {
                len: MAX_AGENT_LEN + 1,
                max: MAX_AGENT_LEN
            })
        );
        assert_eq!(
            Message::Hello(h).validate(),
            Err(WireError::StringTooLong {
                field: "agent",
                len: MAX_AGENT_LEN + 1,
                max: MAX_AGENT_LEN
            })
        );
        assert!(matches!(
            Message::Hello(hello(&"x".repeat(MAX_SITE_LEN + 1))).validate(),
            Err(WireError::StringTooLong { field: "site", .. })
        ));
    }

    #[test]
    fn validate_request_and_cancel_bounds() {
        let ids = |n: usize| (0..n).map(|i| ChunkId([i as u8; 32])).collect::<Vec<_>>();
        let request = |n| Message::Request {
            priority: Priority::Demand,
            chunks: ids(n),
        };
        assert_eq!(
            request(0).validate(),
            Err(WireError::NoChunks { kind: "request" })
        );
        assert_eq!(request(1).validate(), Ok(()));
        assert_eq!(request(MAX_REQUEST_CHUNKS).validate(), Ok(()));
        assert_eq!(
            request(MAX_REQUEST_CHUNKS + 1).validate(),
            Err(WireError::TooManyChunks {
                kind: "request",
                count: MAX_REQUEST_CHUNKS + 1,
                max: MAX_REQUEST_CHUNKS
            })
        );
        assert_eq!(
            Message::Cancel { chunks: vec![] }.validate(),
            Err(WireError::NoChunks { kind: "cancel" })
        );
        assert!(matches!(
            Message::Cancel {
                chunks: ids(MAX_REQUEST_CHUNKS + 1)
            }
            .validate(),
            Err(WireError::TooManyChunks { kind: "cancel", .. })
        ));
    }

    #[test]
    fn validate_byte_bounds() {
        let id = ChunkId([1; 32]);
        let image = ImageId([2; 32]);
        let chunk = |n| Message::Chunk {
            id,
            data: vec![0; n],
        };
        assert_eq!(chunk(MAX_CHUNK_BYTES).validate(), Ok(()));
        assert_eq!(
            chunk(MAX_CHUNK_BYTES + 1).validate(),
            Err(WireError::ChunkTooLarge {
                len: MAX_CHUNK_BYTES + 1,
                max: MAX_CHUNK_BYTES
            })
        );
        let manifest = |n| Message::Manifest {
            image,
            bytes: vec![0; n],
        };
        assert_eq!(manifest(MAX_MANIFEST_BYTES).validate(), Ok(()));
        assert!(matches!(
            manifest(MAX_MANIFEST_BYTES + 1).validate(),
            Err(WireError::ManifestTooLarge { .. })
        ));
    }

    #[test]
    fn validate_index_bounds() {
        let image = ImageId([3; 32]);
        let ok = Message::HaveUpdate {
            image,
            indices: vec![0, MAX_IMAGE_CHUNKS - 1],
        };
        assert_eq!(ok.validate(), Ok(()));
        let empty = Message::Fetching {
            image,
            indices: vec![],
        };
        assert_eq!(empty.validate(), Ok(()));
        let too_many = Message::Fetching {
            image,
            indices: vec![0; MAX_UPDATE_INDICES + 1],
        };
        assert!(matches!(
            too_many.validate(),
            Err(WireError::TooManyIndices {
                kind: "fetching",
                ..
            })
        ));
        let out_of_range = Message::HaveUpdate {
            image,
            indices: vec![1, MAX_IMAGE_CHUNKS, 2],
        };
        assert_eq!(
            out_of_range.validate(),
            Err(WireError::IndexOutOfRange {
                kind: "have_update",
                index: MAX_IMAGE_CHUNKS,
                max: MAX_IMAGE_CHUNKS
            })
        );
    }

    #[test]
    fn validate_have_shape() {
        let image = ImageId([4; 32]);
        let have = |chunks| Message::Have { image, chunks };
        let full = crate::bitfield::ChunkBitmap::full(MAX_IMAGE_CHUNKS);
        assert_eq!(have(full.to_wire()).validate(), Ok(()));
        assert_eq!(
            have(ChunkSet::Runs {
                count: MAX_IMAGE_CHUNKS + 1,
                runs: vec![]
            })
            .validate(),
            Err(WireError::TooManyImageChunks {
                count: MAX_IMAGE_CHUNKS + 1,
                max: MAX_IMAGE_CHUNKS
            })
        );
        assert_eq!(
            have(ChunkSet::Bitmap {
                count: 9,
                bytes: vec![0]
            })
            .validate(),
            Err(WireError::ChunkSet(ChunkSetError::BitmapLength {
                count: 9,
                expected: 2,
                got: 1
            }))
        );
        assert_eq!(
            have(ChunkSet::Runs {
                count: 2,
                runs: vec![(0, 1), (1, 1), (0, 1)]
            })
            .validate(),
            Err(WireError::TooManyRuns { runs: 3, max: 2 })
        );
    }

    #[test]
    fn kinds_are_distinct() {
        let image = ImageId([0; 32]);
        let id = ChunkId([0; 32]);
        let all = [
            Message::Hello(hello("dc1")),
            Message::Have {
                image,
                chunks: ChunkSet::Runs {
                    count: 0,
                    runs: vec![],
                },
            },
            Message::HaveUpdate {
                image,
                indices: vec![],
            },
            Message::Fetching {
                image,
                indices: vec![],
            },
            Message::Need {
                image,
                priority: Priority::Background,
                indices: vec![],
            },
            Message::Request {
                priority: Priority::Background,
                chunks: vec![id],
            },
            Message::Chunk { id, data: vec![] },
            Message::Cancel { chunks: vec![id] },
            Message::Reject {
                chunk: id,
                reason: RejectReason::Busy,
            },
            Message::GetManifest { image },
            Message::Manifest {
                image,
                bytes: vec![],
            },
            Message::ManifestNotFound { image },
            Message::Ack,
            Message::GetBootProfile { image },
            Message::BootProfile {
                image,
                order: vec![3, 1],
            },
            Message::BootProfileNotFound { image },
            Message::Stage { image },
            Message::StageRefused {
                image,
                reason: StageRefusal::Busy,
            },
        ];
        let kinds: std::collections::BTreeSet<_> = all.iter().map(Message::kind).collect();
        assert_eq!(kinds.len(), all.len());
    }

    proptest! {
        #[test]
        fn generated_messages_are_valid(msg in strategies::message(256)) {
            prop_assert_eq!(msg.validate(), Ok(()));
        }
    }
}
