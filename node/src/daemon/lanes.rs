//! Chunk traffic on lanes ([`crate::net::lane`]), both ways: our requests and their answers, and
//! peers' requests and our chunks.
//!
//! # What this module decides
//! - **Requests in flight are keyed by (server, chunk id).** A lane's answer names only its chunk,
//!   so that is the key; several wants can wait on one request (a chunk id that occurs at several
//!   indices, or in two images), and only the first sends it. When the chunk arrives, each waiting
//!   want gets it (copies for the rare extra ones). An answer nobody waits for (it crossed our
//!   `Cancel`) is dropped.
//! - **A lane that ends fails its requests.** If the peer broke the protocol on it, the peer is
//!   banned; otherwise its requests count as refused-busy, and the scheduler asks elsewhere. The
//!   next request to that peer opens a new lane.
//! - **Serving:** a `Request` is answered at once when it must be refused (banned, not held, queue
//!   full), else queued in the `ServeQueue`, which picks what to send next; each chunk goes out on
//!   the lane its request (or its upgrade to Demand) arrived on. A serving lane that ends frees the
//!   upload slots of the chunks it was told to send.

use std::collections::HashMap;
use std::time::Instant as StdInstant;

use libp2p::PeerId;
use tokio::sync::mpsc;
use vmswarm_protocol::fetch::{self, ChunkOutcome};
use vmswarm_protocol::serve::Queued;
use vmswarm_protocol::wire::{MAX_REQUEST_CHUNKS, Message, RejectReason};
use vmswarm_protocol::{ChunkId, ImageId, Priority};

use super::Daemon;
use crate::net::lane::{self, LaneClass, LaneError, LaneEvent, LaneId, ServeCmd};

/// A want of ours waiting on a chunk request.
#[derive(Debug, Clone, Copy)]
pub(super) struct Requested {
    pub(super) image: ImageId,
    pub(super) index: u32,
    pub(super) sent: StdInstant,
    /// The class of the lane its answer will come on.
    pub(super) class: LaneClass,
    /// That lane.
    pub(super) lane: LaneId,
}

/// One of our lanes.
#[derive(Debug)]
pub(super) struct OutLane {
    id: LaneId,
    tx: mpsc::UnboundedSender<Message>,
}

/// A lane a peer opened to us.
#[derive(Debug)]
pub(super) struct InLane {
    peer: PeerId,
    tx: mpsc::UnboundedSender<ServeCmd>,
    /// Chunks handed to its writer and not yet reported served.
    serving: u32,
}

impl Daemon {
    pub(super) fn on_lane_event(&mut self, event: LaneEvent) {
        match event {
            LaneEvent::Answer { peer, msg } => self.on_lane_answer(peer, msg),
            LaneEvent::OutboundClosed {
                peer,
                class,
                lane,
                error,
            } => self.on_out_lane_closed(peer, class, lane, &error),
            LaneEvent::InboundOpened { peer, lane, serve } => {
                if self.banned.contains(&peer) {
                    return; // dropping `serve` ends the lane
                }
                self.in_lanes.insert(
                    lane,
                    InLane {
                        peer,
                        tx: serve,
                        serving: 0,
                    },
                );
            }
            LaneEvent::Request { peer, lane, msg } => match msg {
                Message::Request { priority, chunks } => {
                    self.on_chunk_request(peer, lane, priority, &chunks)
                }
                Message::Cancel { chunks } => {
                    self.serve.handle_cancel(&peer, &chunks);
                    for id in &chunks {
                        self.serve_lanes.remove(&(peer, *id));
                    }
                }
                // The lane lets only those two through.
                _ => {}
            },
            LaneEvent::Served {
                peer,
                lane,
                id,
                bytes,
            } => {
                if let Some(l) = self.in_lanes.get_mut(&lane) {
                    l.serving = l.serving.saturating_sub(1);
                }
                self.serve.handle_sent();
                if let Some(len) = bytes {
                    tracing::debug!(%peer, chunk = %id, "chunk sent");
                    let site = self.site_of(&peer);
                    self.metrics.bytes_out(&site, len);
                    self.metrics
                        .chunks_served
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            LaneEvent::InboundClosed { peer, lane, error } => {
                if let Some(l) = self.in_lanes.remove(&lane) {
                    for _ in 0..l.serving {
                        self.serve.handle_sent();
                    }
                }
                match error {
                    Some(e) if e.is_hostile() => {
                        tracing::warn!(%peer, "{e}");
                        self.ban(peer, "it sent garbage on a chunk lane");
                    }
                    Some(e) => tracing::debug!(%peer, lane, "serving lane ended: {e}"),
                    None => {}
                }
            }
        }
    }

    /// Sends `image`'s chunk requests to `peer` (the scheduler's `Action::Request`).
    pub(super) fn request_chunks(
        &mut self,
        peer: PeerId,
        image: ImageId,
        priority: Priority,
        indices: &[u32],
    ) {
        let Some(manifest) = self.images.get(&image).map(|i| i.manifest.clone()) else {
            return;
        };
        let class = LaneClass::from(priority);
        let lane = self.lane_to(peer, class);
        let now = StdInstant::now();
        let mut ids = Vec::with_capacity(indices.len());
        for &index in indices {
            let Some(&id) = manifest.chunks.get(index as usize) else {
                continue;
            };
            // Every want in `waiting` shares one request: one class, one lane.
            let waiting = self.requested.entry((peer, id)).or_default();
            let upgrade = class == LaneClass::Demand
                && waiting
                    .first()
                    .is_some_and(|r| r.class == LaneClass::Background);
            if upgrade {
                // Asked at Background: ask again at Demand, on the Demand lane (the server moves
                // the queued request and answers it there).
                for r in waiting.iter_mut() {
                    r.class = class;
                    r.lane = lane;
                }
                ids.push(id);
            }
            if waiting.iter().any(|r| r.image == image && r.index == index) {
                continue;
            }
            if waiting.is_empty() {
                ids.push(id);
            }
            let (class, lane) = waiting.first().map_or((class, lane), |r| (r.class, r.lane));
            waiting.push(Requested {
                image,
                index,
                sent: now,
                class,
                lane,
            });
        }
        ids.sort_unstable();
        ids.dedup();
        if let Some(l) = self.out_lanes.get(&(peer, class)) {
            for part in ids.chunks(MAX_REQUEST_CHUNKS) {
                // If the lane's task has ended, its `OutboundClosed` fails these requests.
                let _ = l.tx.send(Message::Request {
                    priority,
                    chunks: part.to_vec(),
                });
            }
        }
    }

    /// Withdraws `image`'s requests for `indices` from `peer` (the scheduler's `Action::Cancel`).
    pub(super) fn cancel_chunks(&mut self, peer: PeerId, image: ImageId, indices: &[u32]) {
        let Some(manifest) = self.images.get(&image).map(|i| i.manifest.clone()) else {
            return;
        };
        let mut cancels: HashMap<LaneId, Vec<ChunkId>> = HashMap::new();
        for &index in indices {
            let Some(&id) = manifest.chunks.get(index as usize) else {
                continue;
            };
            let Some(waiting) = self.requested.get_mut(&(peer, id)) else {
                continue;
            };
            let Some(pos) = waiting
                .iter()
                .position(|r| r.image == image && r.index == index)
            else {
                continue;
            };
            let r = waiting.swap_remove(pos);
            if waiting.is_empty() {
                self.requested.remove(&(peer, id));
                cancels.entry(r.lane).or_default().push(id);
            }
        }
        for (lane, ids) in cancels {
            // Only on a lane that still runs: the server drops what a dead lane asked for.
            let Some(l) = self.out_lanes.values().find(|l| l.id == lane) else {
                continue;
            };
            for part in ids.chunks(MAX_REQUEST_CHUNKS) {
                let _ = l.tx.send(Message::Cancel {
                    chunks: part.to_vec(),
                });
            }
        }
    }

    /// Our running `class` lane to `peer`, opened now if there is none.
    fn lane_to(&mut self, peer: PeerId, class: LaneClass) -> LaneId {
        if let Some(l) = self.out_lanes.get(&(peer, class)) {
            if !l.tx.is_closed() {
                return l.id;
            }
        }
        self.next_lane += 1;
        let id = self.next_lane;
        let (tx, rx) = mpsc::unbounded_channel();
        lane::spawn_outbound(
            self.lane_control.clone(),
            peer,
            class,
            id,
            rx,
            self.lane_tx.clone(),
        );
        tracing::debug!(%peer, ?class, lane = id, "opening chunk lane");
        self.out_lanes.insert((peer, class), OutLane { id, tx });
        id
    }

    /// Forgets `peer`'s lanes and requests (it went away or was banned; its schedulers know).
    pub(super) fn drop_peer_lanes(&mut self, peer: &PeerId) {
        self.out_lanes.retain(|(p, _), _| p != peer);
        self.requested.retain(|(p, _), _| p != peer);
        self.serve_lanes.retain(|(p, _), _| p != peer);
        // Dropping the writers' senders ends the serving lanes; their slots are freed when their
        // `InboundClosed` arrives.
        for l in self.in_lanes.values_mut() {
            if l.peer == *peer {
                let (tx, _) = mpsc::unbounded_channel();
                l.tx = tx;
            }
        }
    }

    fn on_lane_answer(&mut self, peer: PeerId, msg: Message) {
        match msg {
            Message::Chunk { id, data } => {
                let Some(waiting) = self.requested.remove(&(peer, id)) else {
                    tracing::debug!(%peer, chunk = %id, "chunk nobody waits for (cancelled)");
                    crate::net::buffers::give(data);
                    return;
                };
                let mut data = Some(data);
                let last = waiting.len() - 1;
                for (i, r) in waiting.into_iter().enumerate() {
                    let copy = if i == last {
                        data.take()
                    } else {
                        data.clone()
                    };
                    if let Some(d) = copy {
                        self.on_chunk_response(peer, r.image, r.index, r.sent, id, d);
                    }
                }
            }
            Message::Reject { chunk, reason } => {
                let Some(waiting) = self.requested.remove(&(peer, chunk)) else {
                    return;
                };
                let kind = match reason {
                    RejectReason::NotFound => fetch::RejectKind::NotFound,
                    RejectReason::Busy => fetch::RejectKind::Busy,
                    RejectReason::Banned | RejectReason::Shutdown => fetch::RejectKind::Refused,
                };
                let now = self.now();
                for r in waiting {
                    if let Some(t) = self.transfers.get_mut(&r.image) {
                        t.sched.handle_reject(now, &peer, r.index, kind);
                    }
                }
            }
            // The lane lets only those two through.
            _ => {}
        }
    }

    fn on_out_lane_closed(&mut self, peer: PeerId, class: LaneClass, lane: LaneId, e: &LaneError) {
        if self
            .out_lanes
            .get(&(peer, class))
            .is_some_and(|l| l.id == lane)
        {
            self.out_lanes.remove(&(peer, class));
        }
        if e.is_hostile() {
            tracing::warn!(%peer, "{e}");
        } else {
            tracing::debug!(%peer, ?class, lane, "chunk lane ended: {e}");
        }
        let now = self.now();
        let mut failed = Vec::new();
        self.requested.retain(|(p, _), waiting| {
            if *p == peer && waiting.first().is_some_and(|r| r.lane == lane) {
                failed.append(waiting);
            }
            !waiting.is_empty()
        });
        for r in failed {
            if let Some(t) = self.transfers.get_mut(&r.image) {
                if e.is_hostile() {
                    t.sched
                        .handle_chunk(now, &peer, r.index, ChunkOutcome::Corrupt);
                } else {
                    t.sched
                        .handle_reject(now, &peer, r.index, fetch::RejectKind::Busy);
                }
            }
        }
        if e.is_hostile() {
            self.ban(peer, "it sent garbage on a chunk lane");
        }
    }

    fn on_chunk_request(
        &mut self,
        peer: PeerId,
        lane: LaneId,
        priority: Priority,
        chunks: &[ChunkId],
    ) {
        tracing::debug!(%peer, n = chunks.len(), first = ?chunks.first(), ?priority, "chunk request");
        let reject = |chunk, reason| Message::Reject { chunk, reason };
        let mut answers = Vec::new();
        if self.banned.contains(&peer) {
            answers.extend(chunks.iter().map(|&id| reject(id, RejectReason::Banned)));
        } else {
            let held: Vec<ChunkId> = chunks
                .iter()
                .copied()
                .filter(|id| {
                    let held = self.store.contains(id);
                    if !held {
                        answers.push(reject(*id, RejectReason::NotFound));
                    }
                    held
                })
                .collect();
            let queued = self.serve.handle_request(&peer, priority, &held);
            for (id, q) in held.into_iter().zip(queued) {
                match q {
                    // Answered on the lane of this request; an upgrade moves the answer here.
                    Queued::Queued | Queued::Upgraded => {
                        self.serve_lanes.insert((peer, id), lane);
                    }
                    Queued::Duplicate => {}
                    Queued::Busy => answers.push(reject(id, RejectReason::Busy)),
                }
            }
        }
        if let Some(l) = self.in_lanes.get(&lane) {
            for a in answers {
                let _ = l.tx.send(ServeCmd::Send(a));
            }
        }
    }

    /// Hands chunks to serving lanes as the serve queue allows.
    pub(super) fn pump_serve(&mut self) {
        while let Some(s) = self.serve.poll_next() {
            let lane = self.serve_lanes.remove(&(s.peer, s.chunk));
            let sent = lane
                .and_then(|id| self.in_lanes.get_mut(&id))
                .is_some_and(|l| {
                    let ok = l.tx.send(ServeCmd::Chunk(s.chunk)).is_ok();
                    l.serving += u32::from(ok);
                    ok
                });
            if !sent {
                // The lane is gone (its peer with it): nothing to send, the slot is free.
                self.serve.handle_sent();
            }
        }
    }
}
