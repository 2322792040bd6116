//! # vmswarm-protocol: the sans-IO core of vmswarm
//!
//! Everything that decides *what* happens lives here; the node (tokio + libp2p) and the simulator
//! (virtual time) decide only *how* bytes move. No module in this crate reads a clock, touches a file
//! or a socket, or draws from a global RNG: `now` is an argument, randomness comes from a seed the
//! caller supplies, and outputs are drained with `poll_*` methods. `clippy.toml` in this crate and
//! `.ci/check-sans-io` enforce that.
//!
//! - [`time`]: time as a value.
//! - [`ids`]: chunk and image identifiers (BLAKE3).
//! - [`manifest`]: the image manifest, its validation and canonical encoding.
//! - [`chunker`]: turning a byte stream into chunks and a manifest in constant memory.
//! - [`bitfield`]: which chunks a peer holds, in memory and on the wire.
//! - [`wire`] and [`codec`]: the peer-to-peer messages and their framing.
//! - [`fetch`]: the fetch scheduler — which chunk to request from whom, and when to give up.
//! - [`serve`]: the serving side's queue — which incoming request to answer next.
//! - [`site`]: which few nodes of a site bring an image into it (site gateways).

pub mod bitfield;
pub mod chunker;
pub mod codec;
pub mod fanout;
pub mod fetch;
pub mod ids;
pub mod manifest;
pub mod priority;
pub mod serve;
pub mod site;
pub mod time;
pub mod wire;

pub use ids::{ChunkId, ImageId};
pub use priority::Priority;
pub use time::Instant;
