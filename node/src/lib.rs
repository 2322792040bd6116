//! # vmswarm-node: the node operators run on every compute node
//!
//! - [`daemon`]: `vmswarm serve`, the event loop that drives the protocol state machines.
//! - [`net`]: libp2p transport (QUIC) and behaviours (Kademlia, identify, ping, request-response,
//!   chunk lanes).
//! - [`store`]: the durable, content-addressed chunk store.
//! - [`control`]: the unix control socket the other subcommands use.
//! - [`accept`]: how the control, metrics and NBD accept loops survive `accept()` failures.
//! - [`identity`]: the node's persistent Ed25519 identity.
//! - [`metrics`]: counters and the Prometheus endpoint.
//! - [`config`]: the TOML configuration file.
//! - [`output`]: where `pull -o` may write (regular files only).
//! - [`nbd`]: NBD exports of images and clones (on-demand fetch through the daemon).
//! - [`overlay`]: copy-on-write overlays of writable clones.
//! - [`profile`]: boot profiles (first-touch chunk order) recorded by mounts, replayed by prefetch.
//! - [`stage`]: the target list of `vmswarm stage` (peers files).
//! - [`progress`]: what `pull` and `stage` show while they run (a bar on a terminal, else lines).
//!
//! Scheduling decisions (which chunk, from whom, when to give up, whom to ban, what to serve next)
//! are made by `vmswarm-protocol`, never here.

pub mod accept;
pub mod config;
pub mod control;
pub mod daemon;
pub mod identity;
pub mod metrics;
pub mod nbd;
pub mod net;
pub mod output;
pub mod overlay;
pub mod profile;
pub mod progress;
pub mod stage;
pub mod store;
