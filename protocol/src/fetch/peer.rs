//! What the scheduler knows about one connected peer, and how peers rank against each other.
//!
//! Ranking decides "nearest": same site before any other site, then lower RTT. RTTs are compared in
//! power-of-two buckets so that peers whose RTTs differ by noise count as equally near; among equally
//! near peers the one with fewer requests in flight ranks first (load spreading), then a per-peer random
//! tie-break drawn from the scheduler's seeded RNG. A peer in cool-down ranks behind every peer
//! that is not, and keeps one request slot (a probe) unless it refused us outright.
//!
//! It also gives each peer a stable key ([`stable_key`]) for the per-site assignment of WAN fetches
//! (rendezvous hashing, [`site_score`]): every node of a site computes the same key for the same peer.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::time::Duration;

use crate::bitfield::ChunkBitmap;
use crate::time::Instant;

/// RTT bucket used for peers whose RTT is not known yet: about one second, i.e. behind every
/// measured peer in the same class.
const UNKNOWN_RTT_BUCKET: u32 = 20;

/// Per-peer scheduler state.
#[derive(Debug)]
pub(crate) struct Peer {
    /// Whether the peer announced the same site as ours.
    pub(crate) same_site: bool,
    /// Latest RTT estimate, if any.
    pub(crate) rtt: Option<Duration>,
    /// Chunks the peer holds.
    pub(crate) have: ChunkBitmap,
    /// Chunks this same-site peer is fetching from another site, with the instant we stop waiting.
    pub(crate) pending: BTreeMap<u32, Instant>,
    /// Requests in flight to this peer, by priority.
    pub(crate) in_flight_demand: u32,
    pub(crate) in_flight_background: u32,
    /// No new requests go to this peer before this instant (after timeouts or `Busy`).
    pub(crate) cooldown_until: Instant,
    /// Timeouts since the last chunk this peer delivered.
    pub(crate) consecutive_timeouts: u32,
    /// A request to this peer timed out and it has not delivered since (or it refused us): its
    /// chunks do not count as held inside our site, so they do not keep us off the WAN.
    pub(crate) suspect: bool,
    /// Random tie-break among otherwise equal peers.
    pub(crate) tiebreak: u64,
    /// Last instant the peer showed it is serving us (a chunk or a reject arrived from it).
    pub(crate) last_progress: Instant,
    /// Most requests in flight to this peer (its bandwidth-delay window, at least the configured
    /// minimum).
    pub(crate) limit: u32,
    /// Stable key for the per-site assignment of WAN fetches.
    pub(crate) key: u64,
    /// No new Background requests go to this peer before this instant: it refused one for
    /// fan-out (it is sending its chunks to enough others; they will relay).
    pub(crate) bg_choked_until: Instant,
}

/// Sort key: lower is better (cooling down, other site, RTT bucket, load, random).
pub(crate) type RankKey = (bool, bool, u32, u32, u64);

impl Peer {
    pub(crate) fn new(
        same_site: bool,
        rtt: Option<Duration>,
        chunks: u32,
        tiebreak: u64,
        key: u64,
    ) -> Self {
        Peer {
            same_site,
            rtt,
            have: ChunkBitmap::new(chunks),
            pending: BTreeMap::new(),
            in_flight_demand: 0,
            in_flight_background: 0,
            cooldown_until: Instant::ZERO,
            consecutive_timeouts: 0,
            suspect: false,
            tiebreak,
            bg_choked_until: Instant::ZERO,
            last_progress: Instant::ZERO,
            limit: 1,
            key,
        }
    }

    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight_demand + self.in_flight_background
    }

    pub(crate) fn rtt_bucket(&self) -> u32 {
        match self.rtt {
            // ilog2 of microseconds: 0.1 ms -> 6, 2 ms -> 10, 31 ms -> 14, 165 ms -> 17.
            Some(rtt) => (rtt.as_micros().min(u128::from(u64::MAX)) as u64 + 1).ilog2(),
            None => UNKNOWN_RTT_BUCKET,
        }
    }

    pub(crate) fn rank(&self, now: Instant) -> RankKey {
        (
            self.cooling(now),
            !self.same_site,
            self.rtt_bucket(),
            self.in_flight(),
            self.tiebreak,
        )
    }

    /// In cool-down (after timeouts or `Busy`), but not refused for good.
    pub(crate) fn cooling(&self, now: Instant) -> bool {
        self.cooldown_until > now
    }

    /// How many requests may be in flight to this peer now, given the slot limit `limit` of the
    /// request's priority: all of them normally, one probe while cooling down (so that a peer
    /// holding chunks nobody else has is never abandoned by every requester at once), none if it
    /// refused us.
    pub(crate) fn capacity(&self, now: Instant, limit: u32) -> u32 {
        if self.cooldown_until == Instant::MAX {
            0
        } else if self.cooling(now) {
            limit.min(1)
        } else {
            limit
        }
    }

    /// Whether one more request of slot limit `limit` may go to this peer now.
    pub(crate) fn has_room(&self, now: Instant, limit: u32) -> bool {
        self.in_flight() < self.capacity(now, limit)
    }

    /// Whether this peer's chunks count as held inside our site.
    pub(crate) fn counts_as_local(&self) -> bool {
        self.same_site && !self.suspect
    }
}

/// A key for `peer` that every node computes alike (FNV-1a over the peer id's `Hash` encoding, so
/// independent of the process's hash seed).
pub(crate) fn stable_key<P: Hash>(peer: &P) -> u64 {
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    peer.hash(&mut h);
    mix(h.0)
}

/// Rendezvous score of a node with key `key` for chunk `index`: among the nodes of a site, the one
/// with the highest score fetches the chunk from outside the site.
pub(crate) fn site_score(key: u64, index: u32) -> u64 {
    mix(key ^ mix(u64::from(index).wrapping_add(0x9E37_79B9_7F4A_7C15)))
}

/// Rendezvous score of holder `holder` for chunk `index` as seen by requester `requester`: after a
/// fan-out refusal a requester asks only holders scoring above every holder that refused it, so
/// the crowd waiting for one chunk splits over the new holders instead of all asking each one.
pub(crate) fn relay_score(requester: u64, holder: u64, index: u32) -> u64 {
    site_score(holder ^ mix(requester ^ 0xA076_1D64_78BD_642F), index)
}

/// SplitMix64 finaliser.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_site_beats_any_rtt_and_buckets_absorb_noise() {
        let now = Instant::ZERO;
        let mut local = Peer::new(true, Some(Duration::from_millis(5)), 1, 9, 0);
        let remote = Peer::new(false, Some(Duration::from_micros(100)), 1, 0, 0);
        assert!(local.rank(now) < remote.rank(now));
        let a = Peer::new(false, Some(Duration::from_millis(31)), 1, 1, 0);
        let b = Peer::new(false, Some(Duration::from_millis(29)), 1, 2, 0);
        assert_eq!(a.rtt_bucket(), b.rtt_bucket());
        let far = Peer::new(false, Some(Duration::from_millis(165)), 1, 0, 0);
        assert!(a.rank(now) < far.rank(now));
        let unknown = Peer::new(false, None, 1, 0, 0);
        assert!(far.rank(now) < unknown.rank(now));
        local.in_flight_background = 3;
        let idle_local = Peer::new(true, Some(Duration::from_millis(5)), 1, 100, 0);
        assert!(
            idle_local.rank(now) < local.rank(now),
            "load breaks ties before the random key"
        );
    }

    #[test]
    fn cooling_peer_ranks_last_and_keeps_one_probe() {
        let now = Instant::from_nanos(1_000);
        let mut cooling = Peer::new(true, Some(Duration::from_millis(1)), 1, 0, 0);
        cooling.cooldown_until = Instant::from_nanos(2_000);
        let far = Peer::new(false, None, 1, 0, 0);
        assert!(far.rank(now) < cooling.rank(now));
        assert_eq!(cooling.capacity(now, 16), 1);
        assert!(cooling.has_room(now, 16));
        cooling.in_flight_demand = 1;
        assert!(!cooling.has_room(now, 16));
        assert_eq!(cooling.capacity(Instant::from_nanos(2_000), 16), 16);
        cooling.cooldown_until = Instant::MAX;
        assert_eq!(
            cooling.capacity(now, 16),
            0,
            "a peer that refused us gets nothing"
        );
    }

    #[test]
    fn stable_keys_and_scores_spread() {
        assert_eq!(stable_key(&7u32), stable_key(&7u32));
        assert_ne!(stable_key(&7u32), stable_key(&8u32));
        // Each of 8 nodes should own roughly 1/8 of 8000 chunks.
        let keys: Vec<u64> = (0..8u32).map(|n| stable_key(&n)).collect();
        let mut owned = [0u32; 8];
        for c in 0..8000 {
            let best = (0..8).max_by_key(|&n| site_score(keys[n], c)).unwrap();
            owned[best] += 1;
        }
        for o in owned {
            assert!((800..1200).contains(&o), "{owned:?}");
        }
    }
}
