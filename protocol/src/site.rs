//! Site gateways: which few nodes of a site bring an image's chunks into the site.
//!
//! The fetch scheduler assigns each chunk's outside fetch to one node of the site by rendezvous
//! hashing ([`crate::fetch`], "Once per site"). Computed over each node's *connected* same-site
//! peers, that assignment is only the same on every node when every node sees the whole site. At
//! 200 nodes per site, with some 55 same-site peers each, about 200/56 nodes see themselves as a
//! chunk's assignee, and each brings its own copy over the WAN (2.2-3.1 images per site measured
//! in the simulator); at 2,500 nodes per site it would be worse.
//!
//! Three ways to converge on one assignee per chunk were weighed:
//! - **Rendezvous over the full membership** (learned by gossip): each node scores every chunk
//!   against every member, `chunks x members` hashes per node (2.5 M at 2,500 nodes and 1,000
//!   chunks, on each of 10,000 nodes), and a node must hear an unconnected assignee's copy through
//!   third parties.
//! - **Forwarding `Fetching` announcements one hop:** the local maxima of a partial view all decide
//!   in the same instant of a flash crowd, before any forwarded announcement can arrive, and each
//!   announcement would reach `degree^2` nodes.
//! - **A few gateways per site, chosen by rendezvous (what is built).** Every node of a site ranks
//!   the site's providers of the image by [`gateway_rank`] and takes the best [`SITE_GATEWAYS`]:
//!   the same set on every node that knows the same best providers. Each node connects to them,
//!   and the chunk's outside fetch goes to the gateway scoring highest for the chunk
//!   ([`crate::fetch::FetchScheduler::set_site_gateways`]). Other nodes tell the chunk's gateway
//!   that they want it (`Need`, at the want's priority), and wait for its copy instead of fetching
//!   from outside: a Background want as long as the gateway is alive, a Demand want while the
//!   gateway's announcement of its fetch holds.
//!
//! Agreement needs only the best few providers to be known everywhere, not the whole membership,
//! and that is what a DHT can answer: the node's record holders keep, for a per-site key, the
//! providers ranked highest by [`gateway_rank`] (instead of a random sample), so every lookup of
//! the key returns the same best ones. The cost is concentrated: each gateway serves the first
//! copy of 1/[`SITE_GATEWAYS`] of the image to its site (the swarm spreads it from there) and
//! holds a connection to every node of the site that wants the image.
//!
//! A gateway that disconnects or turns suspect drops out of the assignment on every node that
//! sees it go, and its chunks move to the next best gateway; with no gateway left the scheduler
//! falls back to rendezvous over the connected same-site peers.

/// How many gateways a site has per image: Kademlia's k, the size of one answer for the per-site
/// provider key, so one lookup returns all of them.
pub const SITE_GATEWAYS: usize = 20;

/// The rank of site member `member` (its peer id, as bytes) as a gateway for `scope` (the image's
/// per-site key): higher ranks first. Every node computes the same rank for the same inputs.
pub fn gateway_rank(scope: &[u8], member: &[u8]) -> u64 {
    let mut h = blake3::Hasher::new_derive_key("vmswarm 2026 site gateway rank v1");
    h.update(&(scope.len() as u64).to_le_bytes());
    h.update(scope);
    h.update(member);
    let out = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&out.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// The `k` candidates of highest rank (each given with its rank), best first; equal ranks keep
/// the candidates' order, and a candidate given twice counts once (at its best rank). Costs a sort
/// of the candidates and at most `k` comparisons per candidate taken: callers pass a lookup's
/// whole answer (thousands of providers in a large site) and a small `k`.
pub fn top_gateways<T: PartialEq>(
    candidates: impl IntoIterator<Item = (u64, T)>,
    k: usize,
) -> Vec<T> {
    let mut all: Vec<(u64, T)> = candidates.into_iter().collect();
    // Stable: equal ranks keep their order.
    all.sort_by_key(|c| std::cmp::Reverse(c.0));
    let mut top: Vec<T> = Vec::with_capacity(k.min(all.len()));
    for (_, c) in all {
        if top.len() == k {
            break;
        }
        if !top.contains(&c) {
            top.push(c);
        }
    }
    top
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ranks_depend_on_scope_and_member() {
        let a = gateway_rank(b"site-a", b"node-1");
        assert_eq!(a, gateway_rank(b"site-a", b"node-1"));
        assert_ne!(a, gateway_rank(b"site-b", b"node-1"));
        assert_ne!(a, gateway_rank(b"site-a", b"node-2"));
        // The scope's length is hashed, so moving bytes between scope and member changes the rank.
        assert_ne!(gateway_rank(b"ab", b"c"), gateway_rank(b"a", b"bc"),);
    }

    proptest! {
        /// Any two nodes that know the best k members (whatever else they know) choose the same
        /// gateways: the property the per-site assignment relies on.
        #[test]
        fn views_holding_the_best_agree(
            members in proptest::collection::btree_set(any::<u32>(), 1..200),
            k in 1usize..30,
            drop_a in any::<u64>(),
            drop_b in any::<u64>(),
        ) {
            let scope = b"image/site";
            let ranked: Vec<(u64, u32)> =
                members.iter().map(|&m| (gateway_rank(scope, &m.to_le_bytes()), m)).collect();
            let best = top_gateways(ranked.clone(), k);
            prop_assert_eq!(best.len(), k.min(members.len()));
            // Two partial views: each keeps the best k and a different pseudo-random rest.
            let view = |salt: u64| -> Vec<(u64, u32)> {
                ranked
                    .iter()
                    .copied()
                    .filter(|(r, m)| best.contains(m) || (r ^ salt) % 3 == 0)
                    .collect()
            };
            prop_assert_eq!(top_gateways(view(drop_a), k), best.clone());
            prop_assert_eq!(top_gateways(view(drop_b), k), best);
        }

        #[test]
        fn duplicates_count_once(ranks in proptest::collection::vec(any::<u16>(), 0..50), k in 0usize..10) {
            let mut c: Vec<(u64, u16)> = ranks.iter().map(|&r| (u64::from(r), r)).collect();
            c.extend(c.clone());
            let top = top_gateways(c, k);
            let mut dedup = top.clone();
            dedup.sort_unstable();
            dedup.dedup();
            prop_assert_eq!(dedup.len(), top.len());
        }
    }
}
