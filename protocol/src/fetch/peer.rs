//! What the scheduler knows about one connected peer, and how peers rank against each other.
//!
//! Ranking decides "nearest": same site before any other site, then lower RTT. RTTs are compared in
//! power-of-two buckets so that peers whose RTTs differ by noise count as equally near; among equally
//! near peers the one with fewer requests in flight ranks first (load spreading), then a per-peer random
//! tie-break drawn from the scheduler's seeded RNG.

use std::collections::BTreeMap;
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
    /// Scheduler generation at which this peer last had nothing to pick for Background.
    pub(crate) exhausted_gen: Option<u64>,
}

/// Sort key: lower is better.
pub(crate) type RankKey = (bool, u32, u32, u64);

impl Peer {
    pub(crate) fn new(same_site: bool, rtt: Option<Duration>, chunks: u32, tiebreak: u64) -> Self {
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
            exhausted_gen: None,
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

    pub(crate) fn rank(&self) -> RankKey {
        (
            !self.same_site,
            self.rtt_bucket(),
            self.in_flight(),
            self.tiebreak,
        )
    }

    pub(crate) fn usable(&self, now: Instant) -> bool {
        self.cooldown_until <= now
    }

    /// Whether this peer's chunks count as held inside our site.
    pub(crate) fn counts_as_local(&self) -> bool {
        self.same_site && !self.suspect
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_site_beats_any_rtt_and_buckets_absorb_noise() {
        let mut local = Peer::new(true, Some(Duration::from_millis(5)), 1, 9);
        let remote = Peer::new(false, Some(Duration::from_micros(100)), 1, 0);
        assert!(local.rank() < remote.rank());
        let a = Peer::new(false, Some(Duration::from_millis(31)), 1, 1);
        let b = Peer::new(false, Some(Duration::from_millis(29)), 1, 2);
        assert_eq!(a.rtt_bucket(), b.rtt_bucket());
        let far = Peer::new(false, Some(Duration::from_millis(165)), 1, 0);
        assert!(a.rank() < far.rank());
        let unknown = Peer::new(false, None, 1, 0);
        assert!(far.rank() < unknown.rank());
        local.in_flight_background = 3;
        let idle_local = Peer::new(true, Some(Duration::from_millis(5)), 1, 100);
        assert!(
            idle_local.rank() < local.rank(),
            "load breaks ties before the random key"
        );
    }
}
