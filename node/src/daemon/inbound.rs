//! Answering peers: requests that arrive, and the answers to our own requests.
//!
//! Chunk requests go through the protocol's `ServeQueue` (Demand first, round robin across peers, a
//! bounded number of uploads at once); everything else is answered on the spot. Messages that make
//! no sense where they arrive are protocol violations: the stream is dropped and the event logged.
//! A request that is not a message at all (undecodable bytes, an oversized frame) never reaches this
//! module: the codec refuses it (the frame limit is checked from the prefix) and libp2p drops the
//! stream without an event (libp2p-request-response 0.30 only logs a failed `read_request`), so
//! such a sender cannot be banned from here; it costs us one refused stream each time. Peers that
//! lie in *answers* (corrupt chunks, garbage or oversized responses, bad manifests) are banned.

use libp2p::PeerId;
use libp2p::request_response::{self, InboundRequestId, ResponseChannel};
use vmswarm_protocol::bitfield::{ChunkBitmap, ChunkSet};
use vmswarm_protocol::manifest::Manifest;
use vmswarm_protocol::serve::Queued;
use vmswarm_protocol::wire::{Message, RejectReason};
use vmswarm_protocol::{ChunkId, ImageId, Priority};

use super::{Daemon, IoDone, Outbound};

type Event = request_response::Event<Message, Message>;

impl Daemon {
    pub(super) fn on_msg_event(&mut self, event: Event) {
        match event {
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request_id,
                        request,
                        channel,
                    },
                ..
            } => self.on_request(peer, request_id, request, channel),
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some(kind) = self.outbound.remove(&request_id) {
                    self.on_response(peer, kind, response);
                }
            }
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                let Some(kind) = self.outbound.remove(&request_id) else {
                    return;
                };
                tracing::debug!(%peer, ?kind, "request failed: {error}");
                if let Outbound::Chunk { image, index, .. } = kind {
                    let hostile = matches!(
                        &error,
                        request_response::OutboundFailure::Io(e) if e.kind() == std::io::ErrorKind::InvalidData
                    );
                    self.on_chunk_failure(peer, image, index, hostile);
                }
            }
            request_response::Event::InboundFailure { request_id, .. }
            | request_response::Event::ResponseSent { request_id, .. } => {
                if self.serving.remove(&request_id) {
                    self.serve.handle_sent();
                }
            }
        }
    }

    fn respond(&mut self, channel: ResponseChannel<Message>, msg: Message) -> bool {
        self.swarm
            .behaviour_mut()
            .msg
            .send_response(channel, msg)
            .is_ok()
    }

    fn on_request(
        &mut self,
        peer: PeerId,
        request_id: InboundRequestId,
        request: Message,
        channel: ResponseChannel<Message>,
    ) {
        let now = self.now();
        match request {
            Message::Hello(hello) => {
                let ours = self.hello();
                self.respond(channel, ours);
                self.on_peer_ready(peer, &hello);
            }
            Message::Have { image, chunks } => {
                self.apply_have(peer, image, &chunks);
                if let Some(img) = self.images.get_mut(&image) {
                    img.interested.insert(peer);
                }
                let ours = self.have_message(image);
                self.respond(channel, ours);
            }
            Message::HaveUpdate { image, indices } => {
                if let Some(t) = self.transfers.get_mut(&image) {
                    t.sched.handle_peer_have_update(now, &peer, &indices);
                }
                if let Some(img) = self.images.get_mut(&image) {
                    img.interested.insert(peer);
                }
                self.respond(channel, Message::Ack);
            }
            Message::Fetching { image, indices } => {
                if let Some(t) = self.transfers.get_mut(&image) {
                    t.sched.handle_peer_fetching(now, &peer, &indices);
                }
                self.respond(channel, Message::Ack);
            }
            Message::Request { priority, chunks } => {
                self.on_chunk_request(peer, request_id, priority, &chunks, channel)
            }
            Message::Cancel { chunks } => {
                self.serve.handle_cancel(&peer, &chunks);
                for id in &chunks {
                    self.serve_channels.remove(&(peer, *id));
                }
                self.respond(channel, Message::Ack);
            }
            Message::GetManifest { image } => {
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
            other => {
                tracing::warn!(%peer, kind = other.kind(), "protocol violation: not a request");
                drop(channel);
            }
        }
    }

    fn on_chunk_request(
        &mut self,
        peer: PeerId,
        request_id: InboundRequestId,
        priority: Priority,
        chunks: &[ChunkId],
        channel: ResponseChannel<Message>,
    ) {
        // The codec guarantees at least one chunk. This transport carries one chunk per stream;
        // extra ids in one request are not served.
        let Some(&id) = chunks.first() else {
            return;
        };
        tracing::debug!(%peer, chunk = %id, ?priority, "chunk request");
        if self.banned.contains(&peer) {
            self.respond(
                channel,
                Message::Reject {
                    chunk: id,
                    reason: RejectReason::Banned,
                },
            );
            return;
        }
        if !self.store.contains(&id) {
            self.respond(
                channel,
                Message::Reject {
                    chunk: id,
                    reason: RejectReason::NotFound,
                },
            );
            return;
        }
        match self.serve.handle_request(&peer, priority, &[id]).first() {
            Some(Queued::Queued) => {
                self.serve_channels
                    .insert((peer, id), (request_id, channel));
            }
            Some(Queued::Upgraded | Queued::Duplicate) => {
                self.respond(channel, Message::Ack);
            }
            Some(Queued::Busy) | None => {
                self.respond(
                    channel,
                    Message::Reject {
                        chunk: id,
                        reason: RejectReason::Busy,
                    },
                );
            }
        }
    }

    /// Hands queued chunk requests to the blocking pool as the serve queue allows.
    pub(super) fn pump_serve(&mut self) {
        while let Some(s) = self.serve.poll_next() {
            let Some((request_id, channel)) = self.serve_channels.remove(&(s.peer, s.chunk)) else {
                self.serve.handle_sent();
                continue;
            };
            let store = self.store.clone();
            let io = self.io_tx.clone();
            let (peer, id) = (s.peer, s.chunk);
            tokio::task::spawn_blocking(move || {
                // A recycled buffer: it goes back to the pool once the codec has written it.
                let mut buf = crate::net::buffers::take(store.chunk_len(&id).unwrap_or(0) as usize);
                let result = store
                    .get_into(&id, &mut buf)
                    .map(|held| held.then_some(buf));
                let _ = io.send(IoDone::Read {
                    peer,
                    id,
                    request_id,
                    channel,
                    result,
                });
            });
        }
    }

    pub(super) fn on_read(
        &mut self,
        peer: PeerId,
        id: ChunkId,
        request_id: InboundRequestId,
        channel: ResponseChannel<Message>,
        result: Result<Option<Vec<u8>>, crate::store::StoreError>,
    ) {
        match result {
            Ok(Some(mut data)) => {
                if self.opts.corrupt_served_chunks {
                    if let Some(b) = data.first_mut() {
                        *b ^= 0xff;
                    }
                }
                let len = data.len() as u64;
                tracing::debug!(%peer, chunk = %id, "chunk response queued");
                if self.respond(channel, Message::Chunk { id, data }) {
                    self.serving.insert(request_id);
                    let site = self.site_of(&peer);
                    self.metrics.bytes_out(&site, len);
                    self.metrics
                        .chunks_served
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                } else {
                    self.serve.handle_sent();
                }
            }
            other => {
                if let Err(e) = &other {
                    tracing::error!(chunk = %id, "reading chunk to serve: {e}");
                }
                self.respond(
                    channel,
                    Message::Reject {
                        chunk: id,
                        reason: RejectReason::NotFound,
                    },
                );
                self.serve.handle_sent();
            }
        }
    }

    fn on_response(&mut self, peer: PeerId, kind: Outbound, response: Message) {
        match (kind, response) {
            (Outbound::Hello, Message::Hello(hello)) => self.on_peer_ready(peer, &hello),
            (Outbound::Have(asked), Message::Have { image, chunks }) if image == asked => {
                self.apply_have(peer, image, &chunks)
            }
            (Outbound::Chunk { image, index, sent }, response) => {
                self.on_chunk_response(peer, image, index, sent, response)
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
            (Outbound::BootProfile(_), Message::BootProfileNotFound { .. })
            | (Outbound::Manifest(_), Message::ManifestNotFound { .. })
            | (Outbound::Upgrade | Outbound::Ack, Message::Ack) => {}
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
