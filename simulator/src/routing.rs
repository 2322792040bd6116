//! Content routing: how long finding an image's providers takes, and which of them a host
//! connects to.
//!
//! The node uses libp2p's Kademlia, which reads the system clock and so cannot run in virtual time.
//! It is modelled instead:
//!
//! - A lookup (and publishing a provider record) takes `ceil(log2(N) / alpha)` sequential round
//!   trips (alpha = 3 parallel queries per step), each the mean RTT from the host's site to a node
//!   picked uniformly from all N nodes: Kademlia contacts ids, not sites.
//! - A host becomes a provider of the image when it starts fetching it (its record is visible one
//!   publish delay later); source servers are providers from the start.
//! - A host connects to every source server, to up to `max_peers` other providers drawn
//!   uniformly at random, and to up to `site_peers` (20) more drawn uniformly from the providers of
//!   its own site. This follows the node (`node/src/net/store.rs`): a record holder keeps a uniform
//!   random sample of 20 providers per key, so the image key's answers are a random spread over
//!   the fleet (how many depends on how many holders answer one lookup; `max_peers` stands for
//!   that), and the node also looks up a per-site key, whose answer holds up to 20 providers of
//!   its site. Connections are symmetric and accepted without limit, so a popular host can end up
//!   with more peers, as with libp2p's default connection limits.
//!
//! This module decides the delays and the draw; connecting and the protocol messages are the
//! world's job.

use std::time::Duration;

use rand::seq::index::sample;
use rand_chacha::ChaCha8Rng;

use crate::scenario::Scenario;

/// Sequential round trips of one lookup among `nodes` nodes with parallelism `alpha`.
pub fn lookup_hops(nodes: u64, alpha: u32) -> u32 {
    let log = (nodes.max(2) as f64).log2();
    ((log / f64::from(alpha.max(1))).ceil() as u32).max(1)
}

/// Mean RTT from a node of `site` to a node drawn uniformly from all hosts and sources.
pub fn mean_rtt_from(sc: &Scenario, site: usize) -> Duration {
    let mut per_site = vec![0u64; sc.sites.len()];
    for g in &sc.hosts {
        per_site[g.site] += u64::from(g.count);
    }
    for s in &sc.sources {
        per_site[s.site] += 1;
    }
    let total: u64 = per_site.iter().sum();
    let sum: f64 = per_site
        .iter()
        .enumerate()
        .map(|(b, &n)| n as f64 * sc.rtt[site][b].as_secs_f64())
        .sum();
    Duration::from_secs_f64(sum / total.max(1) as f64)
}

/// The lookup delay for a host of `site`.
pub fn lookup_delay(sc: &Scenario, site: usize) -> Duration {
    let nodes = u64::from(sc.host_count()) + sc.sources.len() as u64;
    mean_rtt_from(sc, site) * lookup_hops(nodes, sc.routing.alpha)
}

/// Draws up to `k` candidates uniformly without replacement, skipping those `skip` rejects. The
/// result keeps the draw order.
pub fn choose(
    candidates: &[u32],
    k: usize,
    skip: impl Fn(u32) -> bool,
    rng: &mut ChaCha8Rng,
) -> Vec<u32> {
    if k == 0 || candidates.is_empty() {
        return Vec::new();
    }
    let eligible: usize = candidates.iter().filter(|&&c| !skip(c)).count();
    if eligible <= k {
        return candidates.iter().copied().filter(|&c| !skip(c)).collect();
    }
    // Draw a few more than k from all candidates and drop the skipped ones; fall back to drawing
    // from the eligible list when too many were skipped.
    let skipped = candidates.len() - eligible;
    if skipped * 4 <= candidates.len() {
        let want = (k + skipped).min(candidates.len());
        let picked: Vec<u32> = sample(rng, candidates.len(), want)
            .into_iter()
            .map(|i| candidates[i])
            .filter(|&c| !skip(c))
            .take(k)
            .collect();
        if picked.len() == k {
            return picked;
        }
    }
    let eligible: Vec<u32> = candidates.iter().copied().filter(|&c| !skip(c)).collect();
    sample(rng, eligible.len(), k)
        .into_iter()
        .map(|i| eligible[i])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn hops() {
        assert_eq!(lookup_hops(100, 3), 3); // log2(100) = 6.6
        assert_eq!(lookup_hops(10_000, 3), 5); // 13.3
        assert_eq!(lookup_hops(1, 3), 1);
    }

    #[test]
    fn choose_respects_k_and_skip() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let c: Vec<u32> = (0..100).collect();
        let p = choose(&c, 10, |x| x % 2 == 0, &mut rng);
        assert_eq!(p.len(), 10);
        assert!(p.iter().all(|x| x % 2 == 1));
        let mut q = p.clone();
        q.sort_unstable();
        q.dedup();
        assert_eq!(q.len(), 10);
        assert_eq!(choose(&c, 200, |x| x < 95, &mut rng).len(), 5);
    }
}
