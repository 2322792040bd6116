//! Answering peers' control messages, and the answers to our own.
//!
//! Everything that arrives over request-response (`/vmswarm/msg/1`) is answered on the spot; chunk
//! requests and chunks travel on lanes instead ([`super::lanes`]), and a chunk request arriving
//! here is a protocol violation like any other message that makes no sense where it arrives: the
//! stream is dropped and the event logged. A request that is not a message at all (undecodable
//! bytes, an oversized frame) never reaches this module: the codec refuses it (the frame limit is
//! checked from the prefix) and libp2p drops the stream without an event (libp2p-request-response
//! 0.30 only logs a failed `read_request`), so such a sender cannot be banned from here; it costs
//! us one refused stream each time. Peers that lie in *answers* (garbage or oversized responses,
//! bad manifests) are banned, as are peers that send garbage on a lane.

use libp2p::PeerId;
use libp2p::request_response::{self, ResponseChannel};
use libp2p::swarm::ConnectionId;
use vmswarm_protocol::bitfield::{ChunkBitmap, ChunkSet};
use vmswarm_protocol::manifest::Manifest;
use vmswarm_protocol::wire::{Message, StageRefusal};
use vmswarm_protocol::{ChunkId, ImageId};

use super::{Daemon, IoDone, Outbound};

type Event = request_response::Event<Message, Message>;

impl Daemon {
    pub(super) fn on_msg_event(&mut self, event: Event) {
        match event {
            request_response::Event::Message {
                peer,
                connection_id,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
            } => self.on_request(peer, connection_id, request, channel),
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some((_, kind)) = self.outbound.remove(&request_id) {
                    self.on_response(peer, kind, response);
                }
            }
            request_response::Event::OutboundFailure {
                peer,
                connection_id,
                request_id,
                error,
            } => {
                let Some((_, kind)) = self.outbound.remove(&request_id) else {
                    return;
                };
                tracing::debug!(%peer, ?kind, "request failed: {error}");
                if matches!(kind, Outbound::Stage(_) | Outbound::StageHave(_)) {
                    self.stage_request_failed(peer, connection_id, kind, error.to_string());
                    return;
                }
                if matches!(
                    &error,
                    request_response::OutboundFailure::Io(e) if e.kind() == std::io::ErrorKind::InvalidData
                ) {
                    self.ban(peer, "it answered with bytes that are not a message");
                    return;
                }
                self.on_outbound_failure(peer, connection_id, kind);
            }
            request_response::Event::InboundFailure { .. }
            | request_response::Event::ResponseSent { .. } => {}
        }
    }

    pub(super) fn respond(&mut self, channel: ResponseChannel<Message>, msg: Message) -> bool {
        self.swarm
            .behaviour_mut()
            .msg
            .send_response(channel, msg)
            .is_ok()
    }

    fn on_request(
        &mut self,
        peer: PeerId,
        conn: ConnectionId,
        request: Message,
        channel: ResponseChannel<Message>,
    ) {
        let now = self.now();
        match request {
            Message::Hello(hello) => {
                let ours = self.hello();
                self.respond(channel, ours);
                self.on_hello_request(peer, conn, &hello);
            }
            Message::Have { image, chunks } => {
                self.apply_have(peer, image, &chunks);
                self.stage_on_have(peer, image, &chunks);
                if let Some(img) = self.images.get_mut(&image) {
                    img.interested.insert(peer);
                    let count = img.manifest.chunk_count();
                    // Not holding it all: it wants the image (`vmswarm stage --asked`).
                    if !ChunkBitmap::from_wire(&chunks, count).is_ok_and(|h| h.is_full()) {
                        self.note_asker(peer, image);
                    }
                }
                let ours = self.have_message(image);
                self.respond(channel, ours);
            }
            Message::HaveUpdate { image, indices } => {
                if let Some(t) = self.transfers.get_mut(&image) {
                    t.sched.handle_peer_have_update(now, &peer, &indices);
                }
                self.stage_on_have_update(peer, image, &indices);
                // It is getting chunks of the image, so it did not hold it all.
                self.note_asker(peer, image);
                if let Some(img) = self.images.get_mut(&image) {
                    img.interested.insert(peer);
                    // Copies we were sending the peer stop counting towards the fan-out.
                    if self.serve.has_fanout_copies() {
                        let ids: Vec<ChunkId> = indices
                            .iter()
                            .filter_map(|&i| img.manifest.chunks.get(i as usize).copied())
                            .collect();
                        let rtt = self.peers.get(&peer).and_then(|p| p.rtt);
                        self.serve.handle_peer_has(now, &peer, rtt, &ids);
                        self.metrics.demand_fanout.store(
                            self.serve.demand_fanout() as u64,
                            std::sync::atomic::Ordering::Relaxed,
                        );
                    }
                }
                self.respond(channel, Message::Ack);
            }
            Message::Fetching { image, indices } => {
                if let Some(t) = self.transfers.get_mut(&image) {
                    t.sched.handle_peer_fetching(now, &peer, &indices);
                }
                self.respond(channel, Message::Ack);
            }
            Message::Need {
                image,
                priority,
                indices,
            } => {
                // Chunks we hold already are announced (the peer's want waits for them); the
                // scheduler takes the rest if we are the site gateway assigned them.
                if let (Some(t), Some(img)) =
                    (self.transfers.get_mut(&image), self.images.get(&image))
                {
                    let missing: Vec<u32> = indices
                        .into_iter()
                        .filter(|&i| !img.present.contains(i))
                        .collect();
                    t.sched.handle_peer_need(now, &peer, priority, &missing);
                }
                self.respond(channel, Message::Ack);
            }
            Message::GetManifest { image } => {
                self.note_asker(peer, image);
                let answer = match self.images.get(&image) {
                    Some(img) => Message::Manifest {
                        image,
                        bytes: img.manifest.encode_canonical(),
                    },
                    None => Message::ManifestNotFound { image },
                };
                self.respond(channel, answer);
            }
            Message::GetBootProfile { image } => {
                let answer = self.boot_profile_answer(image);
                self.respond(channel, answer);
            }
            Message::Stage { image } => self.on_stage_request(peer, image, channel),
            other => {
                tracing::warn!(%peer, kind = other.kind(), "protocol violation: not a request");
                drop(channel);
            }
        }
    }

    /// Our request `kind` to `peer`, sent on `conn`, failed (not for a hostile answer). A request
    /// lost with its connection while the peer is still connected on another is sent again at once
    /// (a connection closes once, so this ends); a failed `GetManifest` is in any case forgotten as
    /// asked, so the periodic re-ask ([`Daemon::on_timeout`]) repeats it. Chunk requests are not
    /// here: they travel on lanes, whose end fails them back to the scheduler ([`super::lanes`]).
    fn on_outbound_failure(&mut self, peer: PeerId, conn: ConnectionId, kind: Outbound) {
        if let Outbound::Manifest(image) = kind {
            if let Some(p) = self.pending_manifests.get_mut(&image) {
                p.asked.remove(&peer);
            }
        }
        let Some(state) = self.peers.get(&peer) else {
            // Gone: everything is asked again when it comes back.
            return;
        };
        if state.connections.contains(&conn) || state.connections.is_empty() {
            return;
        }
        let ready = state.site.is_some() && !self.banned.contains(&peer);
        let boot_profiles = state.boot_profiles;
        tracing::debug!(%peer, ?kind, "request lost with its connection: sending it again");
        match kind {
            Outbound::Hello if !ready => {
                let hello = self.hello();
                self.send(peer, hello, Outbound::Hello);
            }
            Outbound::Have(image) if ready && self.transfers.contains_key(&image) => {
                let have = self.have_message(image);
                self.send(peer, have, Outbound::Have(image));
            }
            Outbound::Manifest(image) if ready => self.ask_manifest(peer, image),
            Outbound::BootProfile(image)
                if ready && boot_profiles && self.wants_boot_profile(image) =>
            {
                self.send(
                    peer,
                    Message::GetBootProfile { image },
                    Outbound::BootProfile(image),
                );
            }
            // `HaveUpdate`s and `Fetching` announcements are hints; the next ones follow.
            _ => {}
        }
    }

    fn on_response(&mut self, peer: PeerId, kind: Outbound, response: Message) {
        match (kind, response) {
            (Outbound::Hello, Message::Hello(hello)) => self.on_peer_ready(peer, &hello),
            (Outbound::Have(asked), Message::Have { image, chunks }) if image == asked => {
                self.apply_have(peer, image, &chunks)
            }
            (Outbound::Manifest(image), Message::Manifest { image: got, bytes })
                if got == image =>
            {
                self.on_manifest(peer, image, &bytes)
            }
            (Outbound::BootProfile(asked), Message::BootProfile { image, order })
                if image == asked =>
            {
                self.on_boot_profile(peer, image, order)
            }
            (Outbound::StageHave(asked), Message::Have { image, chunks }) if image == asked => {
                self.stage_on_have(peer, image, &chunks)
            }
            (Outbound::Stage(asked), Message::Ack) => self.stage_on_answer(peer, asked, Ok(())),
            (Outbound::Stage(asked), Message::StageRefused { image, reason }) if image == asked => {
                let why = match reason {
                    StageRefusal::NoManifest => "refused: it could not get the image's manifest",
                    StageRefusal::Busy => "refused: it runs as many staged pulls as it takes",
                };
                self.stage_on_answer(peer, asked, Err(why.to_owned()))
            }
            (Outbound::BootProfile(_), Message::BootProfileNotFound { .. })
            | (Outbound::Manifest(_), Message::ManifestNotFound { .. })
            | (Outbound::Ack, Message::Ack) => {}
            (kind, other) => {
                tracing::warn!(%peer, ?kind, got = other.kind(), "protocol violation: unexpected answer");
            }
        }
    }

    fn on_manifest(&mut self, peer: PeerId, image: ImageId, bytes: &[u8]) {
        if !self.pending_manifests.contains_key(&image) {
            return;
        }
        let manifest = match Manifest::decode_verified(bytes, &image) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(%peer, %image, "peer sent a bad manifest: {e}");
                self.ban(peer, "it sent a bad manifest");
                return;
            }
        };
        // Only the first good copy is stored; the waiters stay pending until it is.
        match self.pending_manifests.get_mut(&image) {
            Some(p) if !p.storing => p.storing = true,
            _ => return,
        }
        let store = self.store.clone();
        let io = self.io_tx.clone();
        tokio::task::spawn_blocking(move || {
            let present = store
                .put_manifest(&manifest)
                .map(|_| store.image_status(&manifest).present);
            let _ = io.send(IoDone::ManifestStored { manifest, present });
        });
    }

    /// A peer told us which chunks of `image` it holds.
    fn apply_have(&mut self, peer: PeerId, image: ImageId, chunks: &ChunkSet) {
        let now = self.now();
        let Some(count) = self.images.get(&image).map(|i| i.manifest.chunk_count()) else {
            return;
        };
        let have = match ChunkBitmap::from_wire(chunks, count) {
            Ok(b) => b,
            Err(e) if chunks.count() == 0 => {
                // The peer does not know this image (yet).
                let _ = e;
                return;
            }
            Err(e) => {
                tracing::warn!(%peer, %image, "bad Have set: {e}");
                return;
            }
        };
        if let Some(t) = self.transfers.get_mut(&image) {
            t.sched.handle_peer_have(now, &peer, &have);
        }
    }
}
