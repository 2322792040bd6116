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
//! **Fan-out of one chunk.** A `Demand` request for a chunk that is already on its way at Demand
//! to as many other peers as the current fan-out is refused ([`Queued::Relay`], answered with
//! `Reject { reason: Fanout }`): the requester gets it from one of those peers once they announce
//! it. Without this a lockstep flash crowd (every VM of a site reading the same block within
//! milliseconds) is served entirely by the first node to hold each block, every copy sharing its
//! uplink, so that the others can relay nothing until all copies finish together; with it the
//! block spreads as a tree. The fan-out is chosen from measured rates by
//! [`crate::fanout::FanoutRule`] (at most [`Config::demand_fanout`]): each copy's time from
//! acceptance to its receiver's announcement, and the receiver's round-trip time, are the
//! measurements. A copy stops counting when its peer announces holding the chunk
//! ([`ServeQueue::handle_peer_has`]: the end-to-end signal, since a write into the connection does
//! not say when the bytes arrived), cancels it, leaves, or after [`Config::fanout_hold`], whichever
//! comes first. Background requests are not refused this way unless
//! [`Config::background_fanout`] is set: a full pull spreads by rarest-first already. With it set
//! they are refused and counted alike, which spreads a crowd of prefetching hosts as a tree too
//! (a site's hosts all pulling a boot profile, in the same order, from its gateways: a 1,000-host
//! flash crowd boots 4.5x sooner), at the cost of a refusal per requester and serving peer every
//! `relay_retry` (the fetch scheduler chokes a refusing peer's Background that long). It is off by
//! default until it is measured on every scenario; RESULTS.md section 5 has the figures.
//!
//! It does not read chunks or decide whether we hold them (the caller answers `NotFound` before
//! queueing) and it has no timers: a request waits until served, cancelled, or its peer leaves.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use crate::fanout::FanoutRule;
use crate::ids::ChunkId;
use crate::priority::Priority;
use crate::time::Instant;

/// Serve queue settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Most chunks queued for one peer; more are refused as busy.
    pub max_queued_per_peer: usize,
    /// Most chunks being sent at once (handed out by `poll_next`, not yet `handle_sent`).
    pub max_active_uploads: usize,
    /// Most peers one chunk is on its way to at Demand priority; further Demand requests for it
    /// are refused with [`Queued::Relay`]. The fan-out in use is chosen from measured rates
    /// ([`crate::fanout::FanoutRule`]) and never exceeds this; it is this until a copy has been
    /// measured. 0: no limit (an origin, whose Demand copies the fetch
    /// rules already limit to about one per site, and whose requesters have nobody else to ask).
    pub demand_fanout: usize,
    /// Longest a Demand copy counts towards `demand_fanout` without its peer announcing the chunk.
    pub fanout_hold: Duration,
    /// Whether the fan-out in use is chosen from measured rates (at most `demand_fanout`); false
    /// pins it to `demand_fanout`.
    pub fanout_from_rates: bool,
    /// `demand_fanout` of an origin (`vmswarm serve --origin`, a simulated source with
    /// `origin = true`), see [`Config::for_origin`]. 0: no limit.
    pub origin_demand_fanout: usize,
    /// Whether Background requests are held to the same fan-out as Demand ones, and count
    /// towards it (a request for a chunk already on its way to that many peers, at either
    /// priority, is refused with [`Queued::Relay`]). Default false, see the module docs.
    pub background_fanout: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_queued_per_peer: 256,
            max_active_uploads: 8,
            demand_fanout: DEFAULT_DEMAND_FANOUT,
            fanout_hold: Duration::from_secs(2),
            fanout_from_rates: true,
            origin_demand_fanout: DEFAULT_ORIGIN_DEMAND_FANOUT,
            background_fanout: false,
        }
    }
}

impl Config {
    /// The settings an origin serves with: `demand_fanout` replaced by `origin_demand_fanout`.
    /// Both the node and the simulator take an origin's serve queue from here.
    pub fn for_origin(&self) -> Config {
        Config {
            demand_fanout: self.origin_demand_fanout,
            ..self.clone()
        }
    }
}

/// The default [`Config::demand_fanout`].
pub const DEFAULT_DEMAND_FANOUT: usize = 4;

/// The default [`Config::origin_demand_fanout`].
pub const DEFAULT_ORIGIN_DEMAND_FANOUT: usize = 0;

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
    /// The chunk is on its way at Demand to [`Config::demand_fanout`] other peers: answer
    /// `Reject { reason: Fanout }`.
    Relay,
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
    fanout: Fanout<P>,
}

/// The Demand copies of each chunk on their way, for [`Config::demand_fanout`].
#[derive(Debug)]
struct Fanout<P> {
    /// Per chunk, the peers a Demand copy is on its way to, with when it was accepted and how many
    /// Demand copies (all chunks, itself included) were then on their way.
    copies: BTreeMap<ChunkId, Vec<(P, Instant, usize)>>,
    /// Every accepted copy in acceptance order, for expiry after `fanout_hold` (entries already
    /// removed from `copies` are skipped when they come up).
    order: VecDeque<(Instant, ChunkId, P)>,
    /// Entries in `copies`, all chunks together.
    live: usize,
    /// The fan-out in use, from the copies' measured times.
    rule: FanoutRule,
}

impl<P: Clone + Ord> Fanout<P> {
    fn new(max: usize, adaptive: bool) -> Self {
        Fanout {
            copies: BTreeMap::new(),
            order: VecDeque::new(),
            live: 0,
            rule: FanoutRule::new(max, adaptive),
        }
    }

    fn expire(&mut self, now: Instant, hold: Duration) {
        while let Some((at, chunk, peer)) = self.order.front() {
            if *at + hold > now {
                break;
            }
            let (at, chunk, peer) = (*at, *chunk, peer.clone());
            self.order.pop_front();
            self.remove_if(&chunk, |(p, t, _)| *p == peer && *t == at);
        }
    }

    /// Removes the copies of `chunk` matching `pred`; returns them.
    fn remove_if(
        &mut self,
        chunk: &ChunkId,
        pred: impl Fn(&(P, Instant, usize)) -> bool,
    ) -> Vec<(P, Instant, usize)> {
        let mut removed = Vec::new();
        if let Some(v) = self.copies.get_mut(chunk) {
            let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(v).into_iter().partition(&pred);
            *v = kept;
            removed = gone;
            if v.is_empty() {
                self.copies.remove(chunk);
            }
        }
        self.live -= removed.len();
        if self.copies.is_empty() {
            // Nothing counts any more: the stale order entries can go at once.
            self.order.clear();
        }
        removed
    }

    fn count_without(&self, chunk: &ChunkId, peer: &P) -> (usize, bool) {
        self.copies.get(chunk).map_or((0, false), |v| {
            let mine = v.iter().any(|(p, _, _)| p == peer);
            (v.len() - usize::from(mine), mine)
        })
    }

    fn add(&mut self, now: Instant, chunk: ChunkId, peer: &P) {
        self.live += 1;
        let sharing = self.live;
        self.copies
            .entry(chunk)
            .or_default()
            .push((peer.clone(), now, sharing));
        self.order.push_back((now, chunk, peer.clone()));
    }
}

impl<P: Clone + Ord> ServeQueue<P> {
    /// An empty queue.
    pub fn new(config: Config) -> Self {
        ServeQueue {
            fanout: Fanout::new(config.demand_fanout, config.fanout_from_rates),
            config,
            peers: BTreeMap::new(),
            demand_rotation: VecDeque::new(),
            background_rotation: VecDeque::new(),
            len: 0,
            active: 0,
        }
    }

    /// The fan-out in use now (0: no limit), see [`crate::fanout::FanoutRule`].
    pub fn demand_fanout(&self) -> usize {
        self.fanout.rule.fanout()
    }

    /// The fan-out rule, for its measurements.
    pub fn fanout_rule(&self) -> &FanoutRule {
        &self.fanout.rule
    }

    /// Whether any Demand copy still counts towards [`Config::demand_fanout`] (if not, Have
    /// updates need not be passed to [`Self::handle_peer_has`]).
    pub fn has_fanout_copies(&self) -> bool {
        !self.fanout.copies.is_empty()
    }

    /// Chunks with Demand copies on their way at `now` (counted towards
    /// [`Config::demand_fanout`]).
    pub fn fanning_out(&self, now: Instant) -> usize {
        let hold = self.config.fanout_hold;
        self.fanout
            .copies
            .values()
            .filter(|v| v.iter().any(|(_, at, _)| *at + hold > now))
            .count()
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

    /// Queues `peer`'s request for `chunks` (received at `now`); returns what became of each, in
    /// order.
    pub fn handle_request(
        &mut self,
        now: Instant,
        peer: &P,
        priority: Priority,
        chunks: &[ChunkId],
    ) -> Vec<Queued> {
        let max = self.config.max_queued_per_peer;
        let fanout_limit = self.fanout.rule.fanout();
        let limit_fanout =
            fanout_limit > 0 && (priority == Priority::Demand || self.config.background_fanout);
        if limit_fanout {
            self.fanout.expire(now, self.config.fanout_hold);
        }
        let q = self.peers.entry(peer.clone()).or_default();
        let mut out = Vec::with_capacity(chunks.len());
        for &chunk in chunks {
            let (others, mine) = if limit_fanout {
                self.fanout.count_without(&chunk, peer)
            } else {
                (0, false)
            };
            let result = match q.queued.get(&chunk).copied() {
                Some(Priority::Background) if priority == Priority::Demand => {
                    q.background.retain(|c| *c != chunk);
                    q.demand.push_back(chunk);
                    q.queued.insert(chunk, Priority::Demand);
                    Queued::Upgraded
                }
                Some(_) => Queued::Duplicate,
                None if q.queued.len() >= max => Queued::Busy,
                None if !mine && limit_fanout && others >= fanout_limit => Queued::Relay,
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
            // An upgraded request counts too (it is now on its way at Demand), even past the
            // limit: refusing it would leave its Background copy queued behind the refusal.
            if limit_fanout && !mine && matches!(result, Queued::Queued | Queued::Upgraded) {
                self.fanout.add(now, chunk, peer);
            }
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

    /// `peer` announced holding `chunks` (its Have update) at `now`: the copies we were sending it
    /// no longer count towards the fan-out (it can relay them now), and each one's time from
    /// acceptance to this announcement is a measurement for [`crate::fanout::FanoutRule`], with
    /// `rtt` the peer's round-trip time if known.
    pub fn handle_peer_has(
        &mut self,
        now: Instant,
        peer: &P,
        rtt: Option<Duration>,
        chunks: &[ChunkId],
    ) {
        if self.fanout.copies.is_empty() {
            return;
        }
        for chunk in chunks {
            for (_, at, sharing) in self.fanout.remove_if(chunk, |(p, _, _)| p == peer) {
                let took = now.saturating_duration_since(at);
                self.fanout.rule.handle_copy_done(took, sharing, rtt);
            }
        }
    }

    /// `peer` no longer wants these chunks. Unknown chunks are ignored.
    pub fn handle_cancel(&mut self, peer: &P, chunks: &[ChunkId]) {
        if !self.fanout.copies.is_empty() {
            for chunk in chunks {
                self.fanout.remove_if(chunk, |(p, _, _)| p == peer);
            }
        }
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
            self.remove_queue(peer);
        }
    }

    /// `peer` disconnected or was banned: drop everything it asked for.
    pub fn handle_peer_gone(&mut self, peer: &P) {
        if !self.fanout.copies.is_empty() {
            let chunks: Vec<ChunkId> = self
                .fanout
                .copies
                .iter()
                .filter(|(_, v)| v.iter().any(|(p, _, _)| p == peer))
                .map(|(c, _)| *c)
                .collect();
            for chunk in chunks {
                self.fanout.remove_if(&chunk, |(p, _, _)| p == peer);
            }
        }
        self.remove_queue(peer);
    }

    fn remove_queue(&mut self, peer: &P) {
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

    const T0: Instant = Instant::ZERO;

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
        q.handle_request(T0, &1, Priority::Background, &[c(1), c(2), c(3)]);
        q.handle_request(T0, &2, Priority::Background, &[c(4)]);
        q.handle_request(T0, &3, Priority::Demand, &[c(5), c(6)]);
        q.handle_request(T0, &2, Priority::Demand, &[c(7)]);
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
            ..Config::default()
        });
        assert_eq!(
            q.handle_request(T0, &1, Priority::Background, &[c(1), c(2), c(3)]),
            vec![Queued::Queued, Queued::Queued, Queued::Busy]
        );
        assert_eq!(
            q.handle_request(T0, &1, Priority::Demand, &[c(2), c(2)]),
            vec![Queued::Upgraded, Queued::Duplicate]
        );
        assert_eq!(q.poll_next().map(|s| s.chunk), Some(c(2)));
        q.handle_cancel(&1, &[c(1), c(9)]);
        assert!(q.poll_next().is_none());
        q.handle_request(T0, &5, Priority::Demand, &[c(1)]);
        q.handle_request(T0, &6, Priority::Demand, &[c(2)]);
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
        q.handle_request(T0, &1, Priority::Background, &[c(1), c(2), c(3)]);
        assert!(q.poll_next().is_some());
        assert!(q.poll_next().is_some());
        assert_eq!(q.poll_next(), None, "two uploads already active");
        assert_eq!(q.active_uploads(), 2);
        q.handle_sent();
        assert_eq!(q.poll_next().map(|s| s.chunk), Some(c(3)));
        assert_eq!(q.len(), 0);
    }

    fn fanout_queue(limit: usize) -> ServeQueue<u32> {
        ServeQueue::new(Config {
            max_active_uploads: usize::MAX,
            demand_fanout: limit,
            fanout_from_rates: false,
            background_fanout: true,
            ..Config::default()
        })
    }

    #[test]
    fn a_demand_crowd_for_one_chunk_is_refused_past_the_fanout() {
        let mut q = fanout_queue(3);
        let answers: Vec<Queued> = (1..=6)
            .map(|p| q.handle_request(T0, &p, Priority::Demand, &[c(1)])[0])
            .collect();
        assert_eq!(
            answers,
            [
                Queued::Queued,
                Queued::Queued,
                Queued::Queued,
                Queued::Relay,
                Queued::Relay,
                Queued::Relay
            ]
        );
        // Other chunks are not affected; Background requests for this one are refused alike.
        assert_eq!(
            q.handle_request(T0, &4, Priority::Demand, &[c(2)]),
            [Queued::Queued]
        );
        assert_eq!(
            q.handle_request(T0, &5, Priority::Background, &[c(1)]),
            [Queued::Relay]
        );
        // Unless Background is exempt (the default).
        let mut exempt = ServeQueue::new(Config {
            background_fanout: false,
            ..q.config.clone()
        });
        for p in 1..=3 {
            exempt.handle_request(T0, &p, Priority::Demand, &[c(1)]);
        }
        assert_eq!(
            exempt.handle_request(T0, &5, Priority::Background, &[c(1)]),
            [Queued::Queued]
        );
        // Handing the copies out does not end them: they are on their way until announced.
        assert_eq!(drain(&mut q).len(), 4);
        assert_eq!(
            q.handle_request(T0, &6, Priority::Demand, &[c(1)]),
            [Queued::Relay]
        );
        // A recipient announces the chunk: one more may have it from us.
        q.handle_peer_has(T0, &2, None, &[c(1)]);
        assert_eq!(
            q.handle_request(T0, &6, Priority::Demand, &[c(1)]),
            [Queued::Queued]
        );
        assert_eq!(
            q.handle_request(T0, &7, Priority::Demand, &[c(1)]),
            [Queued::Relay]
        );
        // A peer asking again for a copy already on its way is not refused (nor counted twice).
        assert_eq!(
            q.handle_request(T0, &6, Priority::Demand, &[c(1)]),
            [Queued::Duplicate]
        );
        drain(&mut q);
        assert_eq!(
            q.handle_request(T0, &6, Priority::Demand, &[c(1)]),
            [Queued::Queued]
        );
    }

    #[test]
    fn fanout_copies_end_on_cancel_departure_and_expiry() {
        let mut q = fanout_queue(2);
        q.handle_request(T0, &1, Priority::Demand, &[c(1), c(2)]);
        q.handle_request(T0, &2, Priority::Demand, &[c(1), c(2)]);
        assert_eq!(
            q.handle_request(T0, &3, Priority::Demand, &[c(1), c(2)]),
            [Queued::Relay, Queued::Relay]
        );
        // Cancelling one chunk ends that copy only, even when it empties the peer's queue.
        drain(&mut q);
        q.handle_cancel(&1, &[c(1)]);
        assert_eq!(
            q.handle_request(T0, &3, Priority::Demand, &[c(1), c(2)]),
            [Queued::Queued, Queued::Relay]
        );
        // A peer that leaves takes its copies with it.
        q.handle_peer_gone(&2);
        assert_eq!(
            q.handle_request(T0, &4, Priority::Demand, &[c(2)]),
            [Queued::Queued]
        );
        assert_eq!(q.fanning_out(T0), 2);
        // Copies never announced stop counting after `fanout_hold`.
        let hold = Config::default().fanout_hold;
        let almost = T0 + (hold - Duration::from_millis(1));
        assert_eq!(
            q.handle_request(almost, &5, Priority::Demand, &[c(2)]),
            [Queued::Relay]
        );
        assert_eq!(
            q.handle_request(T0 + hold, &5, Priority::Demand, &[c(2)]),
            [Queued::Queued]
        );
        assert_eq!(
            q.fanning_out(T0 + hold),
            1,
            "only the new copy of c(2) counts"
        );
    }

    #[test]
    fn a_zero_fanout_never_refuses() {
        let mut q = fanout_queue(0);
        for p in 1..=50 {
            assert_eq!(
                q.handle_request(T0, &p, Priority::Demand, &[c(1)]),
                [Queued::Queued]
            );
        }
        assert_eq!(q.fanning_out(T0), 0);
    }

    #[derive(Debug, Clone)]
    enum FanOp {
        Request(u8, u8, bool),
        Has(u8, u8),
        Cancel(u8, u8),
        Gone(u8),
        Poll,
        Wait(u16),
    }

    fn fan_op() -> impl Strategy<Value = FanOp> {
        prop_oneof![
            6 => (0u8..8, 0u8..3, any::<bool>()).prop_map(|(p, c, d)| FanOp::Request(p, c, d)),
            2 => (0u8..8, 0u8..3).prop_map(|(p, c)| FanOp::Has(p, c)),
            1 => (0u8..8, 0u8..3).prop_map(|(p, c)| FanOp::Cancel(p, c)),
            1 => (0u8..8).prop_map(FanOp::Gone),
            3 => Just(FanOp::Poll),
            1 => (0u16..1500).prop_map(FanOp::Wait),
        ]
    }

    proptest! {
        /// The fan-out against a model: a Demand request is refused exactly when its chunk is on
        /// its way at Demand to `demand_fanout` other peers (accepted within `fanout_hold`, not
        /// announced, cancelled or gone since), and never otherwise; with `background_fanout`,
        /// requests and copies of both priorities alike.
        #[test]
        fn fanout_matches_model(
            ops in proptest::collection::vec(fan_op(), 1..300),
            bg in any::<bool>(),
        ) {
            const LIMIT: usize = 3;
            let hold = Duration::from_secs(1);
            let mut q = ServeQueue::new(Config {
                max_active_uploads: usize::MAX,
                demand_fanout: LIMIT,
                fanout_hold: hold,
                fanout_from_rates: false,
                background_fanout: bg,
                ..Config::default()
            });
            // (chunk, peer) -> accepted at; and what is queued, as in the queue.
            let mut copies: BTreeMap<(u8, u8), Instant> = BTreeMap::new();
            let mut queued: BTreeMap<(u8, u8), Priority> = BTreeMap::new();
            let mut now = T0;
            for op in ops {
                copies.retain(|_, at| *at + hold > now);
                match op {
                    FanOp::Request(p, n, demand) => {
                        let prio = if demand { Priority::Demand } else { Priority::Background };
                        let r = q.handle_request(now, &u32::from(p), prio, &[c(n)])[0];
                        let mine = copies.contains_key(&(n, p));
                        let others = copies.keys().filter(|k| k.0 == n && k.1 != p).count();
                        let expected = match queued.get(&(p, n)).copied() {
                            Some(Priority::Background) if demand => Queued::Upgraded,
                            Some(_) => Queued::Duplicate,
                            None if (demand || bg) && !mine && others >= LIMIT => Queued::Relay,
                            None => Queued::Queued,
                        };
                        prop_assert_eq!(r, expected);
                        if matches!(r, Queued::Queued | Queued::Upgraded) {
                            queued.insert((p, n), prio);
                            if (demand || bg) && !mine {
                                copies.insert((n, p), now);
                            }
                        }
                    }
                    FanOp::Has(p, n) => {
                        q.handle_peer_has(now, &u32::from(p), None, &[c(n)]);
                        copies.remove(&(n, p));
                    }
                    FanOp::Cancel(p, n) => {
                        q.handle_cancel(&u32::from(p), &[c(n)]);
                        copies.remove(&(n, p));
                        queued.remove(&(p, n));
                    }
                    FanOp::Gone(p) => {
                        q.handle_peer_gone(&u32::from(p));
                        copies.retain(|k, _| k.1 != p);
                        queued.retain(|k, _| k.0 != p);
                    }
                    FanOp::Poll => {
                        if let Some(s) = q.poll_next() {
                            prop_assert!(queued.remove(&(s.peer as u8, s.chunk.0[0])).is_some());
                        }
                    }
                    FanOp::Wait(ms) => now += Duration::from_millis(u64::from(ms)),
                }
                copies.retain(|_, at| *at + hold > now);
                let chunks: std::collections::BTreeSet<u8> = copies.keys().map(|k| k.0).collect();
                prop_assert_eq!(q.fanning_out(now), chunks.len());
            }
        }
    }

    proptest! {
        /// With the fan-out chosen from measured rates: it stays within 1..=`demand_fanout`, and
        /// no chunk is ever accepted for more peers at once than the fan-out in use when it was
        /// accepted (an upgrade of a queued Background request aside, which is documented to
        /// count past the limit).
        #[test]
        fn fanout_from_rates_is_never_exceeded(
            ops in proptest::collection::vec(fan_op(), 1..300),
            rtt_us in 0u64..50_000,
        ) {
            const LIMIT: usize = 5;
            let mut q = ServeQueue::new(Config {
                max_active_uploads: usize::MAX,
                demand_fanout: LIMIT,
                fanout_hold: Duration::from_secs(1),
                background_fanout: true,
                ..Config::default()
            });
            let rtt = Some(Duration::from_micros(rtt_us));
            let mut now = T0;
            for op in ops {
                match op {
                    FanOp::Request(p, n, demand) => {
                        let prio = if demand { Priority::Demand } else { Priority::Background };
                        let limit = q.demand_fanout();
                        // As `handle_request` does first: copies past their hold no longer count.
                        q.fanout.expire(now, q.config.fanout_hold);
                        let before = q.fanout.count_without(&c(n), &u32::from(p));
                        let r = q.handle_request(now, &u32::from(p), prio, &[c(n)])[0];
                        if r == Queued::Queued && !before.1 {
                            prop_assert!(before.0 < limit, "{} copies on their way, fan-out {}", before.0, limit);
                        }
                    }
                    FanOp::Has(p, n) => q.handle_peer_has(now, &u32::from(p), rtt, &[c(n)]),
                    FanOp::Cancel(p, n) => q.handle_cancel(&u32::from(p), &[c(n)]),
                    FanOp::Gone(p) => q.handle_peer_gone(&u32::from(p)),
                    FanOp::Poll => {
                        q.poll_next();
                    }
                    FanOp::Wait(ms) => now += Duration::from_millis(u64::from(ms)),
                }
                prop_assert!((1..=LIMIT).contains(&q.demand_fanout()));
            }
        }
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
            let mut q = ServeQueue::new(Config { max_queued_per_peer: 6, max_active_uploads: usize::MAX, demand_fanout: 0, ..Config::default() });
            let mut model: BTreeMap<(u8, u8), Priority> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Request(p, demand, cs) => {
                        let prio = if demand { Priority::Demand } else { Priority::Background };
                        let ids: Vec<ChunkId> = cs.iter().map(|&n| c(n)).collect();
                        let res = q.handle_request(T0, &u32::from(p), prio, &ids);
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
