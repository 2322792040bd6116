//! The libp2p side of the node: transport, behaviours and the swarm.
//!
//! QUIC (quinn + rustls, encrypted and authenticated by each node's Ed25519 identity) is the only
//! transport. Kademlia (our own protocol name, server mode) finds peers and per-image provider
//! records (kept as random samples, [`store`]); identify tells us peers' listen addresses; ping measures RTT for the fetch scheduler;
//! request-response carries the vmswarm control messages ([`codec`]); chunk requests and chunks
//! travel on long-lived streams of their own ([`lane`], through `libp2p-stream`). Which chunk to ask
//! whom for is not decided here but in `vmswarm_protocol::fetch`.

pub mod buffers;
pub mod codec;
pub mod lane;
pub mod store;

use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::kad;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::NetworkBehaviour;
use libp2p::{StreamProtocol, Swarm, SwarmBuilder, identify, ping};

/// Kademlia protocol name: vmswarm overlays do not mix with other Kademlia networks.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/vmswarm/kad/1.0.0");

/// The node's libp2p behaviours.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// Peer routing and provider records.
    pub kad: kad::Behaviour<store::SampledStore>,
    /// Listen addresses and agent strings.
    pub identify: identify::Behaviour,
    /// RTT.
    pub ping: ping::Behaviour,
    /// vmswarm control messages.
    pub msg: request_response::Behaviour<codec::WireCodec>,
    /// Chunk lanes ([`lane`]).
    pub lanes: libp2p_stream::Behaviour,
}

impl std::fmt::Debug for Behaviour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Behaviour")
    }
}

/// Errors building the swarm.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// libp2p refused to build the swarm.
    #[error("building the libp2p swarm: {0}")]
    Build(String),
}

/// Builds the swarm for `keypair`.
pub fn build_swarm(keypair: Keypair) -> Result<Swarm<Behaviour>, NetError> {
    let swarm = SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_quic()
        .with_behaviour(|key| {
            let peer_id = key.public().to_peer_id();
            let mut kad_config = kad::Config::new(KAD_PROTOCOL);
            kad_config.set_query_timeout(Duration::from_secs(30));
            // Provider lists are random samples, not the first 20 (see [`store`]); the sampling
            // seed only needs to differ between nodes.
            let seed = u64::from_le_bytes(
                blake3::hash(&peer_id.to_bytes()).as_bytes()[..8]
                    .try_into()
                    .unwrap_or_default(),
            );
            let mut kad = kad::Behaviour::with_config(
                peer_id,
                store::SampledStore::new(peer_id, seed),
                kad_config,
            );
            // Every node answers queries: nodes in one data center often have no confirmed public
            // address, and a client-mode network cannot route.
            kad.set_mode(Some(kad::Mode::Server));
            let identify = identify::Behaviour::new(
                identify::Config::new("/vmswarm/id/1".into(), key.public())
                    .with_agent_version(format!("vmswarm/{}", env!("CARGO_PKG_VERSION"))),
            );
            let ping =
                ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(5)));
            // The fetch scheduler times requests out itself; this is only the stream's last resort.
            let msg = request_response::Behaviour::new(
                [(codec::PROTOCOL, ProtocolSupport::Full)],
                request_response::Config::default()
                    .with_request_timeout(Duration::from_secs(120))
                    .with_max_concurrent_streams(1024),
            );
            Ok(Behaviour {
                kad,
                identify,
                ping,
                msg,
                lanes: libp2p_stream::Behaviour::new(),
            })
        })
        .map_err(|e| NetError::Build(e.to_string()))?
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(Duration::from_secs(300))
                // Every peer speaks the protocols we open streams for, so a new stream sends its
                // protocol name and its first message together instead of waiting one round trip
                // for the listener's confirmation: a chunk request costs one RTT, not two (which
                // is what a Demand read across a WAN waits for).
                .with_substream_upgrade_protocol_override(libp2p::core::upgrade::Version::V1Lazy)
        })
        .build();
    Ok(swarm)
}
