//! Which peers the Background pass looks at, and where in the queue each looks.
//!
//! A peer whose last look found nothing it could take is *exhausted* and left out of later passes
//! until something gives it work: a chunk it holds is queued or re-queued, or a rule that kept a
//! chunk from it ends (a same-site wait, a fan-out refusal). It then looks at those chunks alone
//! ([`Look::Only`]), not the whole queue: nothing else changed for it. A peer whose Background is
//! choked (it refused us for fan-out) cannot take anything until the choke ends, so it is *parked*
//! meanwhile, with whatever it was woken for kept, instead of being visited by every pass.
//!
//! Why: a site gateway has hundreds of peers, nearly all holding nothing it wants, and in a crowd
//! with Background fan-out every refusal re-queues a chunk and chokes a peer. Waking every peer for
//! every change made each pass walk the queue once per peer (at 1,000 hosts with boot-profile
//! prefetch and fan-out: 282-300 CPU seconds, against 129 with targeted waking and parking).
//!
//! The rule this relies on, checked by debug assertions in the scheduler's pass: a peer that is
//! neither awake nor parked has nothing it may take.

use std::collections::BTreeMap;

/// Most chunks an exhausted peer is woken for before it looks at the whole queue instead.
pub(crate) const MAX_ONLY: usize = 64;

/// Where an awake peer looks for Background work in the next pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Look {
    /// The whole queue, best key first (it was never exhausted, or many chunks changed at once).
    Scan,
    /// Only these chunks: they became takeable for it since it was exhausted.
    Only(Vec<u32>),
}

impl Look {
    fn add(&mut self, index: u32) {
        let full = match self {
            Look::Scan => false,
            Look::Only(v) => {
                if !v.contains(&index) {
                    v.push(index);
                }
                v.len() > MAX_ONLY
            }
        };
        if full {
            *self = Look::Scan;
        }
    }
}

/// The Background pass's peer set: awake peers (visited by passes) and parked ones (choked).
#[derive(Debug)]
pub(crate) struct Wakes<P> {
    awake: BTreeMap<P, Look>,
    /// Choked peers, with what they will look at when the choke ends (`Only([])`: nothing, they
    /// were exhausted).
    parked: BTreeMap<P, Look>,
}

impl<P: Ord + Clone> Wakes<P> {
    pub(crate) fn new() -> Self {
        Self {
            awake: BTreeMap::new(),
            parked: BTreeMap::new(),
        }
    }

    /// The peers passes visit.
    pub(crate) fn awake(&self) -> impl Iterator<Item = &P> {
        self.awake.keys()
    }

    /// Where awake `peer` looks (`None`: not awake).
    pub(crate) fn look(&self, peer: &P) -> Option<&Look> {
        self.awake.get(peer)
    }

    /// Whether `peer` is awake or parked (not exhausted).
    pub(crate) fn is_listed(&self, peer: &P) -> bool {
        self.awake.contains_key(peer) || self.parked.contains_key(peer)
    }

    /// `peer` looks at the whole queue (it connected, or something changed for all its chunks).
    pub(crate) fn wake_all(&mut self, peer: &P) {
        match self.parked.get_mut(peer) {
            Some(look) => *look = Look::Scan,
            None => {
                self.awake.insert(peer.clone(), Look::Scan);
            }
        }
    }

    /// Queued chunk `index` became takeable for `peer`.
    pub(crate) fn wake(&mut self, peer: &P, index: u32) {
        if let Some(look) = self.parked.get_mut(peer) {
            look.add(index);
        } else if let Some(look) = self.awake.get_mut(peer) {
            look.add(index);
        } else {
            self.awake.insert(peer.clone(), Look::Only(vec![index]));
        }
    }

    /// `peer` found nothing it could take.
    pub(crate) fn exhaust(&mut self, peer: &P) {
        self.awake.remove(peer);
    }

    /// `peer`'s Background is choked: passes skip it until [`Self::unpark`].
    pub(crate) fn park(&mut self, peer: &P) {
        if self.parked.contains_key(peer) {
            return;
        }
        let look = self
            .awake
            .remove(peer)
            .unwrap_or_else(|| Look::Only(Vec::new()));
        self.parked.insert(peer.clone(), look);
    }

    /// `peer`'s choke ended: it looks where it was woken for meanwhile (or stays exhausted).
    pub(crate) fn unpark(&mut self, peer: &P) {
        let Some(look) = self.parked.remove(peer) else {
            return;
        };
        if look != Look::Only(Vec::new()) {
            self.awake.insert(peer.clone(), look);
        }
    }

    /// `peer` is gone.
    pub(crate) fn remove(&mut self, peer: &P) {
        self.awake.remove(peer);
        self.parked.remove(peer);
    }

    /// Every peer in `peers` looks at the whole queue; those in `choked` stay parked.
    pub(crate) fn wake_everyone<'a>(
        &mut self,
        peers: impl Iterator<Item = &'a P>,
        choked: impl Fn(&P) -> bool,
    ) where
        P: 'a,
    {
        self.awake.clear();
        self.parked.clear();
        for p in peers {
            if choked(p) {
                self.parked.insert(p.clone(), Look::Scan);
            } else {
                self.awake.insert(p.clone(), Look::Scan);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exhausted_peer_woken_for_chunks_looks_at_those_alone() {
        let mut w = Wakes::new();
        w.wake_all(&1u32);
        w.exhaust(&1);
        assert!(!w.is_listed(&1));
        w.wake(&1, 7);
        w.wake(&1, 3);
        w.wake(&1, 7);
        assert_eq!(w.look(&1), Some(&Look::Only(vec![7, 3])));
        for i in 0..MAX_ONLY as u32 {
            w.wake(&1, 100 + i);
        }
        assert_eq!(w.look(&1), Some(&Look::Scan), "too many: a scan");
    }

    #[test]
    fn a_parked_peer_keeps_what_it_was_woken_for() {
        let mut w = Wakes::new();
        // Exhausted, then choked: woken for a chunk while parked, it looks at that at the end.
        w.park(&2u32);
        assert!(w.awake().next().is_none());
        w.wake(&2, 5);
        assert!(w.awake().next().is_none(), "parked peers are not visited");
        w.unpark(&2);
        assert_eq!(w.look(&2), Some(&Look::Only(vec![5])));
        // Exhausted, choked, nothing happened: still exhausted after the choke.
        w.exhaust(&2);
        w.park(&2);
        w.unpark(&2);
        assert!(!w.is_listed(&2));
        // Awake with a scan, choked: scans after.
        w.wake_all(&2);
        w.park(&2);
        w.unpark(&2);
        assert_eq!(w.look(&2), Some(&Look::Scan));
        w.remove(&2);
        assert!(!w.is_listed(&2));
    }

    #[test]
    fn waking_everyone_parks_the_choked() {
        let mut w = Wakes::new();
        w.wake(&9u32, 1);
        w.wake_everyone([1u32, 2, 3].iter(), |p| *p == 2);
        assert_eq!(w.awake().copied().collect::<Vec<_>>(), vec![1, 3]);
        w.unpark(&2);
        assert_eq!(w.look(&2), Some(&Look::Scan));
        assert!(!w.is_listed(&9));
    }
}
