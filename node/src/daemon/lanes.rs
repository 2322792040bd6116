//! Chunk traffic on lanes ([`crate::net::lane`]), both ways: our requests and their answers, and
//! peers' requests and our chunks.
//!
//! # What this module decides
//! - **Requests in flight are keyed by (server, chunk id).** A lane's answer names only its chunk,
//!   so that is the key; several wants can wait on one request (a chunk id that occurs at several
//!   indices, or in two images), and only the first sends it. When the chunk arrives, each waiting
//!   want gets it (copies for the rare extra ones). An answer nobody waits for (it crossed our
//!   `Cancel`) goes to a transfer of an image that contains it, verified like any other (the
//!   scheduler accepts it if still wanted, and counts it as the peer's progress); with no such
//!   transfer it is dropped.
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Requested {
    pub(super) image: ImageId,
    pub(super) index: u32,
    pub(super) sent: StdInstant,
    /// The class of the lane its answer will come on.
    pub(super) class: LaneClass,
    /// That lane.
    pub(super) lane: LaneId,
}

/// Our chunk requests in flight, by server and chunk id: which wants wait on which request, and on
/// which lane each request went out. Every want in one entry shares one request (one class, one
/// lane). Pure bookkeeping; the daemon sends what it says.
#[derive(Debug)]
pub(super) struct RequestBook<P> {
    by_chunk: HashMap<(P, ChunkId), Vec<Requested>>,
}

impl<P> Default for RequestBook<P> {
    fn default() -> Self {
        RequestBook {
            by_chunk: HashMap::new(),
        }
    }
}

impl<P: Clone + Eq + std::hash::Hash> RequestBook<P> {
    /// Records that want (`image`, `index`), whose chunk is `id`, is asked of `peer` at `class`,
    /// where `lane` is our running lane of that class. Returns whether `id` must be sent on `lane`:
    /// it is the first want of `id` at `peer`, or the request so far was Background and this one is
    /// Demand (an upgrade: the whole request moves to `lane`). A want already recorded is not
    /// recorded twice.
    pub(super) fn ask(
        &mut self,
        peer: &P,
        id: ChunkId,
        (image, index): (ImageId, u32),
        (class, lane): (LaneClass, LaneId),
        now: StdInstant,
    ) -> bool {
        let waiting = self.by_chunk.entry((peer.clone(), id)).or_default();
        let upgrade = class == LaneClass::Demand
            && waiting
                .first()
                .is_some_and(|r| r.class == LaneClass::Background);
        if upgrade {
            for r in waiting.iter_mut() {
                r.class = class;
                r.lane = lane;
            }
        }
        let first = waiting.is_empty();
        if !waiting.iter().any(|r| r.image == image && r.index == index) {
            let (class, lane) = waiting.first().map_or((class, lane), |r| (r.class, r.lane));
            waiting.push(Requested {
                image,
                index,
                sent: now,
                class,
                lane,
            });
        }
        first || upgrade
    }

    /// Withdraws want (`image`, `index`) of chunk `id` from `peer`. Returns the lane to send a
    /// `Cancel` on if it was the last want of that request.
    pub(super) fn withdraw(
        &mut self,
        peer: &P,
        id: ChunkId,
        (image, index): (ImageId, u32),
    ) -> Option<LaneId> {
        let key = (peer.clone(), id);
        let waiting = self.by_chunk.get_mut(&key)?;
        let pos = waiting
            .iter()
            .position(|r| r.image == image && r.index == index)?;
        let r = waiting.swap_remove(pos);
        if waiting.is_empty() {
            self.by_chunk.remove(&key);
            Some(r.lane)
        } else {
            None
        }
    }

    /// The answer for `id` came from `peer`: the wants that waited on it (none if it crossed our
    /// `Cancel`).
    pub(super) fn answer(&mut self, peer: &P, id: ChunkId) -> Vec<Requested> {
        self.by_chunk
            .remove(&(peer.clone(), id))
            .unwrap_or_default()
    }

    /// The wants waiting on `peer`'s answer for `id`.
    pub(super) fn waiting(&self, peer: &P, id: ChunkId) -> &[Requested] {
        self.by_chunk
            .get(&(peer.clone(), id))
            .map_or(&[], Vec::as_slice)
    }

    /// Our lane `lane` to `peer` ended: the wants whose request went out on it.
    pub(super) fn fail_lane(&mut self, peer: &P, lane: LaneId) -> Vec<Requested> {
        let mut failed = Vec::new();
        self.by_chunk.retain(|(p, _), waiting| {
            if p == peer && waiting.first().is_some_and(|r| r.lane == lane) {
                failed.append(waiting);
            }
            !waiting.is_empty()
        });
        failed
    }

    /// Forgets everything asked of `peer`.
    pub(super) fn drop_peer(&mut self, peer: &P) {
        self.by_chunk.retain(|(p, _), _| p != peer);
    }

    /// Wants waiting, in all.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_chunk.values().map(Vec::len).sum()
    }
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
            LaneEvent::Arriving { peer, id } => {
                let now = self.now();
                for r in self.requested.waiting(&peer, id) {
                    if let Some(t) = self.transfers.get_mut(&r.image) {
                        t.sched.handle_chunk_arriving(now, &peer, r.index);
                    }
                }
            }
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
            if self
                .requested
                .ask(&peer, id, (image, index), (class, lane), now)
            {
                ids.push(id);
            }
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
            if let Some(lane) = self.requested.withdraw(&peer, id, (image, index)) {
                cancels.entry(lane).or_default().push(id);
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
        self.requested.drop_peer(peer);
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
                let waiting = self.requested.answer(&peer, id);
                if waiting.is_empty() {
                    // Its request was cancelled after the peer had written it. If a transfer
                    // still wants that chunk (re-requested elsewhere, or not yet), it is as good
                    // as any copy once verified; either way the scheduler counts it as the peer's
                    // progress, so a peer whose stream carries cancelled chunks does not look
                    // silent and time out the requests behind them.
                    let target = self.transfers.keys().find_map(|image| {
                        let index = *self.images.get(image)?.by_id.get(&id)?.first()?;
                        Some((*image, index))
                    });
                    match target {
                        Some((image, index)) => {
                            tracing::debug!(%peer, chunk = %id, "cancelled chunk arrived: handed to its transfer");
                            self.on_chunk_response(peer, image, index, StdInstant::now(), id, data);
                        }
                        None => {
                            tracing::debug!(%peer, chunk = %id, "chunk nobody waits for (cancelled)");
                            crate::net::buffers::give(data);
                        }
                    }
                    return;
                }
                let mut data = Some(data);
                let last = waiting.len() - 1;
                for (i, r) in waiting.into_iter().enumerate() {
                    let copy = if i == last { data.take() } else { data.clone() };
                    if let Some(d) = copy {
                        self.on_chunk_response(peer, r.image, r.index, r.sent, id, d);
                    }
                }
            }
            Message::Reject { chunk, reason } => {
                let waiting = self.requested.answer(&peer, chunk);
                let kind = match reason {
                    RejectReason::NotFound => fetch::RejectKind::NotFound,
                    RejectReason::Busy => fetch::RejectKind::Busy,
                    RejectReason::Fanout => fetch::RejectKind::Fanout,
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
        for r in self.requested.fail_lane(&peer, lane) {
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
            self.note_chunk_asker(peer, chunks);
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
            let now = self.now();
            let caps = self
                .peers
                .get(&peer)
                .map(|p| p.capabilities)
                .unwrap_or_default();
            let queued = self.serve.handle_request(now, &peer, priority, &held);
            for (id, q) in held.into_iter().zip(queued) {
                match q {
                    // Answered on the lane of this request; an upgrade moves the answer here.
                    Queued::Queued | Queued::Upgraded => {
                        self.serve_lanes.insert((peer, id), lane);
                    }
                    Queued::Duplicate => {}
                    Queued::Busy => answers.push(reject(id, RejectReason::Busy)),
                    Queued::Relay => {
                        self.metrics
                            .fanout_refusals
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        answers.push(reject(id, RejectReason::fanout_for(caps)));
                    }
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

#[cfg(test)]
mod tests {
    //! The request book against a plain model: which asks go on the wire, which lane each answer
    //! and each cancel belongs to, and that every want ends exactly once.

    use std::collections::HashMap;
    use std::time::Instant as StdInstant;

    use proptest::prelude::*;
    use vmswarm_protocol::{ChunkId, ImageId};

    use super::{LaneClass, LaneId, RequestBook};

    const IMAGE: ImageId = ImageId([1; 32]);
    /// Indices 0..8 over 5 chunk ids: 0 and 5, 1 and 6, 2 and 7 are the same chunk.
    fn id_of(index: u32) -> ChunkId {
        ChunkId([(index % 5) as u8; 32])
    }

    #[derive(Debug, Clone)]
    enum Op {
        Ask { peer: u8, index: u32, demand: bool },
        Withdraw { peer: u8, index: u32 },
        Answer { peer: u8, index: u32 },
        LaneEnds { peer: u8, demand: bool },
        DropPeer { peer: u8 },
    }

    fn op() -> impl Strategy<Value = Op> {
        let peer = 0u8..3;
        let index = 0u32..8;
        prop_oneof![
            4 => (peer.clone(), index.clone(), any::<bool>())
                .prop_map(|(peer, index, demand)| Op::Ask { peer, index, demand }),
            2 => (peer.clone(), index.clone()).prop_map(|(peer, index)| Op::Withdraw { peer, index }),
            2 => (peer.clone(), index).prop_map(|(peer, index)| Op::Answer { peer, index }),
            1 => (peer.clone(), any::<bool>()).prop_map(|(peer, demand)| Op::LaneEnds { peer, demand }),
            1 => peer.prop_map(|peer| Op::DropPeer { peer }),
        ]
    }

    type Model = HashMap<(u8, u32), (LaneClass, LaneId)>;

    /// Removes the model's wants that `pick` selects; their indices, sorted.
    fn take(
        pending: &mut Model,
        pick: impl Fn(&(u8, u32), &(LaneClass, LaneId)) -> bool,
    ) -> Vec<u32> {
        let mut taken: Vec<u32> = pending
            .iter()
            .filter(|(k, v)| pick(k, v))
            .map(|((_, i), _)| *i)
            .collect();
        pending.retain(|k, v| !pick(k, v));
        taken.sort_unstable();
        taken
    }

    fn indices(wants: &[super::Requested]) -> Vec<u32> {
        let mut v: Vec<u32> = wants.iter().map(|r| r.index).collect();
        v.sort_unstable();
        v
    }

    fn class(demand: bool) -> LaneClass {
        if demand {
            LaneClass::Demand
        } else {
            LaneClass::Background
        }
    }

    proptest! {
        // A fixed seed: the same cases on every run; a failure prints its shrunk op sequence.
        #![proptest_config(ProptestConfig {
            cases: 512,
            rng_seed: proptest::test_runner::RngSeed::Fixed(23),
            ..ProptestConfig::default()
        })]
        #[test]
        fn the_request_book_agrees_with_a_plain_model(ops in prop::collection::vec(op(), 1..200)) {
            let now = StdInstant::now();
            let mut book = RequestBook::<u8>::default();
            // The model: each pending want's (class, lane), and each (peer, class)'s running lane.
            let mut pending = Model::new();
            let mut lanes: HashMap<(u8, LaneClass), LaneId> = HashMap::new();
            let mut next_lane: LaneId = 0;
            let mut lane_of = |lanes: &mut HashMap<(u8, LaneClass), LaneId>, peer, class| {
                *lanes.entry((peer, class)).or_insert_with(|| {
                    next_lane += 1;
                    next_lane
                })
            };
            let (mut asked, mut ended) = (0usize, 0usize);
            for op in ops {
                match op {
                    Op::Ask { peer, index, demand } => {
                        let c = class(demand);
                        let lane = lane_of(&mut lanes, peer, c);
                        let group: Vec<u32> = pending
                            .keys()
                            .filter(|(p, i)| *p == peer && id_of(*i) == id_of(index))
                            .map(|(_, i)| *i)
                            .collect();
                        let upgrade = c == LaneClass::Demand
                            && group.iter().all(|i| pending[&(peer, *i)].0 == LaneClass::Background)
                            && !group.is_empty();
                        if upgrade {
                            for i in &group {
                                pending.insert((peer, *i), (c, lane));
                            }
                        }
                        let send = book.ask(&peer, id_of(index), (IMAGE, index), (c, lane), now);
                        prop_assert_eq!(send, group.is_empty() || upgrade, "{:?}", op);
                        if !pending.contains_key(&(peer, index)) {
                            asked += 1;
                            let slot = group
                                .first()
                                .map(|i| pending[&(peer, *i)])
                                .unwrap_or((c, lane));
                            pending.insert((peer, index), slot);
                        }
                    }
                    Op::Withdraw { peer, index } => {
                        let got = book.withdraw(&peer, id_of(index), (IMAGE, index));
                        let want = pending.remove(&(peer, index)).and_then(|(_, lane)| {
                            ended += 1;
                            let last = !pending
                                .keys()
                                .any(|(p, i)| *p == peer && id_of(*i) == id_of(index));
                            last.then_some(lane)
                        });
                        prop_assert_eq!(got, want, "{:?}", op);
                    }
                    Op::Answer { peer, index } => {
                        let got = book.answer(&peer, id_of(index));
                        let want = take(&mut pending, |(p, i), _| {
                            *p == peer && id_of(*i) == id_of(index)
                        });
                        ended += want.len();
                        prop_assert_eq!(indices(&got), want, "{:?}", op);
                    }
                    Op::LaneEnds { peer, demand } => {
                        let Some(lane) = lanes.remove(&(peer, class(demand))) else {
                            continue;
                        };
                        let got = book.fail_lane(&peer, lane);
                        let want = take(&mut pending, |(p, _), (_, l)| *p == peer && *l == lane);
                        ended += want.len();
                        prop_assert_eq!(indices(&got), want, "{:?}", op);
                    }
                    Op::DropPeer { peer } => {
                        book.drop_peer(&peer);
                        let before = pending.len();
                        pending.retain(|(p, _), _| *p != peer);
                        ended += before - pending.len();
                        lanes.retain(|(p, _), _| *p != peer);
                    }
                }
                // Every want is pending or ended exactly once, and one request's wants share
                // one class and one lane.
                prop_assert_eq!(book.len(), pending.len());
                prop_assert_eq!(asked, ended + pending.len());
                for ((p, i), slot) in &pending {
                    for ((q, j), other) in &pending {
                        if p == q && id_of(*i) == id_of(*j) {
                            prop_assert_eq!(slot, other);
                        }
                    }
                }
            }
        }
    }
}
