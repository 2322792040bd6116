//! The serving side: which queued incoming request to answer next.
//!
//! Peers ask us for chunks with a priority. [`ServeQueue`] decides the order in which we answer:
//! every queued `Demand` request before any `Background` one (a VM somewhere is blocked on it), and
//! within a priority, round robin across peers one chunk at a time, so that one peer pulling a whole
//! image cannot starve another peer's boot. Within one peer and priority, requests are answered in
//! arrival order. A request for a chunk already queued at `Background` for the same peer at `Demand`
//! moves it to the Demand queue (the fetch scheduler re-requests in-flight chunks that way when a VM
//! starts waiting for them). Each peer may have at most [`Config::max_queued_per_peer`] chunks
//! queued; requests past that are refused as busy, and the requester tries elsewhere.
//!
//! At most [`Config::max_active_uploads`] chunks are being sent at once: [`ServeQueue::poll_next`]
//! hands out no more until the caller reports one finished with [`ServeQueue::handle_sent`]. Sending
//! a few chunks at a time, rather than every request at once, is what makes the priority order mean
//! something on a saturated uplink.
//!
//! It does not read chunks or decide whether we hold them (the caller answers `NotFound` before
//! queueing) and it has no timers: a request waits until served, cancelled, or its peer leaves.

use std::collections::{BTreeMap, VecDeque};

use crate::ids::ChunkId;
use crate::priority::Priority;

/// Serve queue settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Most chunks queued for one peer; more are refused as busy.
    pub max_queued_per_peer: usize,
    /// Most chunks being sent at once (handed out by `poll_next`, not yet `handle_sent`).
    pub max_active_uploads: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_queued_per_peer: 256,
            max_active_uploads: 8,
        }
    }
}

/// What became of one requested chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    /// Queued for serving.
    Queued,
    /// Already queued at Background; now queued at Demand.
    Upgraded,
    /// Already queued at this or a higher priority: nothing changed.
    Duplicate,
    /// The peer's queue is full: answer `Reject { reason: Busy }`.
    Busy,
}

/// The next chunk to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Serve<P> {
    /// Who asked.
    pub peer: P,
    /// What they asked for.
    pub chunk: ChunkId,
    /// At what priority.
    pub priority: Priority,
}

#[derive(Debug, Default)]
struct PeerQueue {
    demand: VecDeque<ChunkId>,
    background: VecDeque<ChunkId>,
    queued: BTreeMap<ChunkId, Priority>,
    in_demand_rotation: bool,
    in_background_rotation: bool,
}

/// Incoming requests waiting to be served. `P` is the caller's peer identifier.
#[derive(Debug)]
pub struct ServeQueue<P> {
    config: Config,
    peers: BTreeMap<P, PeerQueue>,
    demand_rotation: VecDeque<P>,
    background_rotation: VecDeque<P>,
    len: usize,
    active: usize,
}

impl<P: Clone + Ord> ServeQueue<P> {
    /// An empty queue.
    pub fn new(config: Config) -> Self {
        ServeQueue {
            config,
            peers: BTreeMap::new(),
            demand_rotation: VecDeque::new(),
            background_rotation: VecDeque::new(),
            len: 0,
            active: 0,
        }
    }

    /// Chunks queued in all.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Chunks queued for `peer`.
    pub fn queued_for(&self, peer: &P) -> usize {
        self.peers.get(peer).map_or(0, |q| q.queued.len())
    }

    /// Queues `peer`'s request for `chunks`; returns what became of each, in order.
    pub fn handle_request(
        &mut self,
        peer: &P,
        priority: Priority,
        chunks: &[ChunkId],
    ) -> Vec<Queued> {
        let max = self.config.max_queued_per_peer;
        let q = self.peers.entry(peer.clone()).or_default();
        let mut out = Vec::with_capacity(chunks.len());
        for &chunk in chunks {
            let result = match q.queued.get(&chunk).copied() {
                Some(Priority::Background) if priority == Priority::Demand => {
                    q.background.retain(|c| *c != chunk);
                    q.demand.push_back(chunk);
                    q.queued.insert(chunk, Priority::Demand);
                    Queued::Upgraded
                }
                Some(_) => Queued::Duplicate,
                None if q.queued.len() >= max => Queued::Busy,
                None => {
                    match priority {
                        Priority::Demand => q.demand.push_back(chunk),
                        Priority::Background => q.background.push_back(chunk),
                    }
                    q.queued.insert(chunk, priority);
                    self.len += 1;
                    Queued::Queued
                }
            };
            out.push(result);
        }
        if !q.demand.is_empty() && !q.in_demand_rotation {
            q.in_demand_rotation = true;
            self.demand_rotation.push_back(peer.clone());
        }
        if !q.background.is_empty() && !q.in_background_rotation {
            q.in_background_rotation = true;
            self.background_rotation.push_back(peer.clone());
        }
        if q.queued.is_empty() {
            self.peers.remove(peer);
        }
        out
    }

    /// `peer` no longer wants these chunks. Unknown chunks are ignored.
    pub fn handle_cancel(&mut self, peer: &P, chunks: &[ChunkId]) {
        let Some(q) = self.peers.get_mut(peer) else {
            return;
        };
        for chunk in chunks {
            match q.queued.remove(chunk) {
                Some(Priority::Demand) => q.demand.retain(|c| c != chunk),
                Some(Priority::Background) => q.background.retain(|c| c != chunk),
                None => continue,
            }
            self.len -= 1;
        }
        if q.queued.is_empty() {
            self.handle_peer_gone(peer);
        }
    }

    /// `peer` disconnected or was banned: drop everything it asked for.
    pub fn handle_peer_gone(&mut self, peer: &P) {
        if let Some(q) = self.peers.remove(peer) {
            self.len -= q.queued.len();
            self.demand_rotation.retain(|p| p != peer);
            self.background_rotation.retain(|p| p != peer);
        }
    }

    /// Chunks handed out by [`Self::poll_next`] and not yet reported sent.
    pub fn active_uploads(&self) -> usize {
        self.active
    }

    /// The next chunk to serve, if any and if fewer than `max_active_uploads` are being sent.
    pub fn poll_next(&mut self) -> Option<Serve<P>> {
        if self.active >= self.config.max_active_uploads {
            return None;
        }
        let next = self
            .next_from(Priority::Demand)
            .or_else(|| self.next_from(Priority::Background));
        self.active += usize::from(next.is_some());
        next
    }

    /// A chunk handed out by [`Self::poll_next`] has been sent (or its sending failed or was
    /// abandoned): its upload slot is free.
    pub fn handle_sent(&mut self) {
        self.active = self.active.saturating_sub(1);
    }

    fn next_from(&mut self, priority: Priority) -> Option<Serve<P>> {
        loop {
            let rotation = match priority {
                Priority::Demand => &mut self.demand_rotation,
                Priority::Background => &mut self.background_rotation,
            };
            let peer = rotation.pop_front()?;
            let Some(q) = self.peers.get_mut(&peer) else {
                continue;
            };
            let (deque, in_rotation) = match priority {
                Priority::Demand => (&mut q.demand, &mut q.in_demand_rotation),
                Priority::Background => (&mut q.background, &mut q.in_background_rotation),
            };
            let Some(chunk) = deque.pop_front() else {
                *in_rotation = false;
                continue;
            };
            if deque.is_empty() {
                *in_rotation = false;
            } else {
                rotation.push_back(peer.clone());
            }
            q.queued.remove(&chunk);
            self.len -= 1;
            if q.queued.is_empty() {
                self.peers.remove(&peer);
            }
            return Some(Serve {
                peer,
                chunk,
                priority,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn c(n: u8) -> ChunkId {
        ChunkId([n; 32])
    }

    fn drain(q: &mut ServeQueue<u32>) -> Vec<(u32, u8, Priority)> {
        std::iter::from_fn(|| q.poll_next())
            .map(|s| (s.peer, s.chunk.0[0], s.priority))
            .collect()
    }

    #[test]
    fn demand_first_then_round_robin() {
        let mut q = ServeQueue::new(Config {
            max_active_uploads: usize::MAX,
            ..Config::default()
        });
        q.handle_request(&1, Priority::Background, &[c(1), c(2), c(3)]);
        q.handle_request(&2, Priority::Background, &[c(4)]);
        q.handle_request(&3, Priority::Demand, &[c(5), c(6)]);
        q.handle_request(&2, Priority::Demand, &[c(7)]);
        assert_eq!(q.len(), 7);
        assert_eq!(
            drain(&mut q),
            vec![
                (3, 5, Priority::Demand),
                (2, 7, Priority::Demand),
                (3, 6, Priority::Demand),
                (1, 1, Priority::Background),
                (2, 4, Priority::Background),
                (1, 2, Priority::Background),
                (1, 3, Priority::Background),
            ]
        );
        assert!(q.is_empty());
    }

    #[test]
    fn upgrade_duplicate_busy_cancel_and_gone() {
        let mut q = ServeQueue::new(Config {
            max_queued_per_peer: 2,
            max_active_uploads: 100,
        });
        assert_eq!(
            q.handle_request(&1, Priority::Background, &[c(1), c(2), c(3)]),
            vec![Queued::Queued, Queued::Queued, Queued::Busy]
        );
        assert_eq!(
            q.handle_request(&1, Priority::Demand, &[c(2), c(2)]),
            vec![Queued::Upgraded, Queued::Duplicate]
        );
        assert_eq!(q.poll_next().map(|s| s.chunk), Some(c(2)));
        q.handle_cancel(&1, &[c(1), c(9)]);
        assert!(q.poll_next().is_none());
        q.handle_request(&5, Priority::Demand, &[c(1)]);
        q.handle_request(&6, Priority::Demand, &[c(2)]);
        q.handle_peer_gone(&5);
        assert_eq!(drain(&mut q), vec![(6, 2, Priority::Demand)]);
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn active_uploads_are_bounded() {
        let mut q = ServeQueue::new(Config {
            max_active_uploads: 2,
            ..Config::default()
        });
        q.handle_request(&1, Priority::Background, &[c(1), c(2), c(3)]);
        assert!(q.poll_next().is_some());
        assert!(q.poll_next().is_some());
        assert_eq!(q.poll_next(), None, "two uploads already active");
        assert_eq!(q.active_uploads(), 2);
        q.handle_sent();
        assert_eq!(q.poll_next().map(|s| s.chunk), Some(c(3)));
        assert_eq!(q.len(), 0);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Request(u8, bool, Vec<u8>),
        Cancel(u8, Vec<u8>),
        Gone(u8),
        Poll,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..4, any::<bool>(), proptest::collection::vec(0u8..12, 1..5))
                .prop_map(|(p, d, cs)| Op::Request(p, d, cs)),
            1 => (0u8..4, proptest::collection::vec(0u8..12, 1..3)).prop_map(|(p, cs)| Op::Cancel(p, cs)),
            1 => (0u8..4).prop_map(Op::Gone),
            4 => Just(Op::Poll),
        ]
    }

    proptest! {
        /// Against a simple model: Demand never waits behind Background, nothing is served twice or
        /// lost, per-peer limits hold.
        #[test]
        fn matches_model(ops in proptest::collection::vec(op(), 1..200)) {
            let mut q = ServeQueue::new(Config { max_queued_per_peer: 6, max_active_uploads: usize::MAX });
            let mut model: BTreeMap<(u8, u8), Priority> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Request(p, demand, cs) => {
                        let prio = if demand { Priority::Demand } else { Priority::Background };
                        let ids: Vec<ChunkId> = cs.iter().map(|&n| c(n)).collect();
                        let res = q.handle_request(&u32::from(p), prio, &ids);
                        for (n, r) in cs.iter().zip(res) {
                            let count = model.keys().filter(|k| k.0 == p).count();
                            match (model.get(&(p, *n)).copied(), r) {
                                (None, Queued::Queued) => { prop_assert!(count < 6); model.insert((p, *n), prio); }
                                (None, Queued::Busy) => prop_assert_eq!(count, 6),
                                (Some(Priority::Background), Queued::Upgraded) => { prop_assert_eq!(prio, Priority::Demand); model.insert((p, *n), prio); }
                                (Some(_), Queued::Duplicate) => {}
                                (m, r) => prop_assert!(false, "model {:?} but {:?}", m, r),
                            }
                        }
                    }
                    Op::Cancel(p, cs) => {
                        let ids: Vec<ChunkId> = cs.iter().map(|&n| c(n)).collect();
                        q.handle_cancel(&u32::from(p), &ids);
                        for n in cs { model.remove(&(p, n)); }
                    }
                    Op::Gone(p) => {
                        q.handle_peer_gone(&u32::from(p));
                        model.retain(|k, _| k.0 != p);
                    }
                    Op::Poll => {
                        let any_demand = model.values().any(|&p| p == Priority::Demand);
                        match q.poll_next() {
                            None => prop_assert!(model.is_empty()),
                            Some(s) => {
                                let key = (s.peer as u8, s.chunk.0[0]);
                                prop_assert_eq!(model.remove(&key), Some(s.priority));
                                if any_demand { prop_assert_eq!(s.priority, Priority::Demand); }
                            }
                        }
                    }
                }
                prop_assert_eq!(q.len(), model.len());
            }
        }
    }
}
