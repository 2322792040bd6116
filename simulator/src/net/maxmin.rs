//! Max-min fair rates by progressive filling.
//!
//! Given links with capacities and flows that each cross a set of links, every flow's rate is raised
//! at the same pace until some link is full; the flows crossing that link are frozen at its fair
//! share, and filling continues for the others. The result is the unique max-min fair allocation:
//! no flow can get more without taking from a flow that has no more than it. This module decides
//! only the rates of one problem; which flows form a problem (and when it is solved again) is
//! decided in [`super`].
//!
//! The implementation keeps the links in a heap keyed by their current fair share (remaining
//! capacity / unfrozen flows), so a problem with F flows of path length p costs O(F p log L).

use std::cmp::Ordering;
use std::collections::BinaryHeap;

#[derive(Debug, Clone, Copy)]
struct Item {
    share: f64,
    link: u32,
    stamp: u32,
}

impl PartialEq for Item {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Item {}
impl PartialOrd for Item {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Item {
    fn cmp(&self, other: &Self) -> Ordering {
        // Max-heap reversed: smallest share first, then lowest link index (determinism).
        other
            .share
            .total_cmp(&self.share)
            .then(other.link.cmp(&self.link))
            .then(other.stamp.cmp(&self.stamp))
    }
}

/// Reusable buffers for solving max-min problems (no allocation once warm).
#[derive(Debug, Default)]
pub struct Solver {
    rem: Vec<f64>,
    cnt: Vec<u32>,
    stamp: Vec<u32>,
    frozen: Vec<bool>,
    link_off: Vec<u32>,
    link_flows: Vec<u32>,
    fill: Vec<u32>,
    heap: BinaryHeap<Item>,
}

impl Solver {
    /// A solver with empty buffers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Solves one problem. Link `l` has capacity `caps[l]` (bytes/s, >= 0). Flow `f` crosses links
    /// `flow_links[flow_off[f]..flow_off[f + 1]]` (each at most once); `flow_off` has one entry
    /// more than there are flows. Writes each flow's rate to `rates`. A flow that crosses no link
    /// gets an infinite rate.
    pub fn solve(
        &mut self,
        caps: &[f64],
        flow_off: &[u32],
        flow_links: &[u32],
        rates: &mut Vec<f64>,
    ) {
        let nl = caps.len();
        let nf = flow_off.len().saturating_sub(1);
        rates.clear();
        rates.resize(nf, f64::INFINITY);
        self.rem.clear();
        self.rem.extend(caps.iter().map(|c| c.max(0.0)));
        self.cnt.clear();
        self.cnt.resize(nl, 0);
        self.stamp.clear();
        self.stamp.resize(nl, 0);
        self.frozen.clear();
        self.frozen.resize(nf, false);
        // Link -> flows adjacency (CSR).
        for &l in flow_links {
            self.cnt[l as usize] += 1;
        }
        self.link_off.clear();
        self.link_off.reserve(nl + 1);
        let mut acc = 0u32;
        self.link_off.push(0);
        for &c in &self.cnt {
            acc += c;
            self.link_off.push(acc);
        }
        self.fill.clear();
        self.fill.extend_from_slice(&self.link_off[..nl]);
        self.link_flows.clear();
        self.link_flows.resize(flow_links.len(), 0);
        for f in 0..nf {
            for &l in &flow_links[flow_off[f] as usize..flow_off[f + 1] as usize] {
                let slot = &mut self.fill[l as usize];
                self.link_flows[*slot as usize] = f as u32;
                *slot += 1;
            }
        }
        self.heap.clear();
        for l in 0..nl {
            if self.cnt[l] > 0 {
                self.heap.push(Item {
                    share: self.rem[l] / f64::from(self.cnt[l]),
                    link: l as u32,
                    stamp: 0,
                });
            }
        }
        while let Some(item) = self.heap.pop() {
            let l = item.link as usize;
            if item.stamp != self.stamp[l] || self.cnt[l] == 0 {
                continue;
            }
            let level = item.share;
            for k in self.link_off[l]..self.link_off[l + 1] {
                let f = self.link_flows[k as usize] as usize;
                if self.frozen[f] {
                    continue;
                }
                self.frozen[f] = true;
                rates[f] = level;
                for &m in &flow_links[flow_off[f] as usize..flow_off[f + 1] as usize] {
                    let m = m as usize;
                    if m == l {
                        continue;
                    }
                    self.rem[m] = (self.rem[m] - level).max(0.0);
                    self.cnt[m] -= 1;
                    self.stamp[m] += 1;
                    if self.cnt[m] > 0 {
                        self.heap.push(Item {
                            share: self.rem[m] / f64::from(self.cnt[m]),
                            link: m as u32,
                            stamp: self.stamp[m],
                        });
                    }
                }
            }
            self.cnt[l] = 0;
            self.rem[l] = 0.0;
        }
    }
}

/// Convenience for tests and small problems: `flows[f]` lists the links flow `f` crosses.
pub fn solve(caps: &[f64], flows: &[Vec<u32>]) -> Vec<f64> {
    let mut off = vec![0u32];
    let mut links = Vec::new();
    for f in flows {
        links.extend_from_slice(f);
        off.push(links.len() as u32);
    }
    let mut rates = Vec::new();
    Solver::new().solve(caps, &off, &links, &mut rates);
    rates
}

/// Checks an allocation: feasible (no link over capacity, within `tol` relative) and max-min
/// (every flow has a saturated link on which no flow has a higher rate). Returns what is wrong.
pub fn check(caps: &[f64], flows: &[Vec<u32>], rates: &[f64], tol: f64) -> Result<(), String> {
    let mut load = vec![0.0; caps.len()];
    let mut max_rate = vec![0.0f64; caps.len()];
    for (f, links) in flows.iter().enumerate() {
        for &l in links {
            load[l as usize] += rates[f];
            max_rate[l as usize] = max_rate[l as usize].max(rates[f]);
        }
    }
    for (l, (&ld, &c)) in load.iter().zip(caps).enumerate() {
        if ld > c * (1.0 + tol) + tol {
            return Err(format!("link {l} carries {ld} > capacity {c}"));
        }
    }
    for (f, links) in flows.iter().enumerate() {
        if links.is_empty() {
            continue;
        }
        let r = rates[f];
        let bottleneck = links.iter().any(|&l| {
            let l = l as usize;
            let saturated = load[l] >= caps[l] * (1.0 - tol) - tol;
            saturated && r >= max_rate[l] * (1.0 - tol) - tol
        });
        if !bottleneck {
            return Err(format!("flow {f} (rate {r}) has no bottleneck link"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| (x - y).abs() <= 1e-9 * x.abs().max(1.0))
    }

    #[test]
    fn two_flows_share_one_link() {
        let r = solve(&[10.0], &[vec![0], vec![0]]);
        assert!(close(&r, &[5.0, 5.0]), "{r:?}");
    }

    #[test]
    fn bottlenecked_flow_leaves_its_share() {
        // Flow 0 crosses links 0 (cap 10) and 1 (cap 2); flow 1 only link 0. Flow 0 gets 2 (its
        // bottleneck is link 1), flow 1 takes the remaining 8 of link 0.
        let r = solve(&[10.0, 2.0], &[vec![0, 1], vec![0]]);
        assert!(close(&r, &[2.0, 8.0]), "{r:?}");
    }

    #[test]
    fn three_link_chain() {
        // Links A=0 (cap 1), B=1 (cap 2), C=2 (cap 3). Flow 0 crosses A,B,C; flow 1 A; flow 2 B;
        // flow 3 C. Link A: flows 0,1 -> 0.5 each. Then B: 2 - 0.5 = 1.5 for flow 2. C: 3 - 0.5 =
        // 2.5 for flow 3.
        let r = solve(
            &[1.0, 2.0, 3.0],
            &[vec![0, 1, 2], vec![0], vec![1], vec![2]],
        );
        assert!(close(&r, &[0.5, 0.5, 1.5, 2.5]), "{r:?}");
        // The classic parking lot: a long flow over two links, each shared with a short flow.
        let r = solve(&[1.0, 1.0], &[vec![0, 1], vec![0], vec![1]]);
        assert!(close(&r, &[0.5, 0.5, 0.5]), "{r:?}");
    }

    #[test]
    fn empty_and_linkless() {
        assert!(solve(&[1.0], &[]).is_empty());
        let r = solve(&[1.0], &[vec![]]);
        assert!(r[0].is_infinite());
    }

    fn problem() -> impl Strategy<Value = (Vec<f64>, Vec<Vec<u32>>)> {
        (1usize..8).prop_flat_map(|nl| {
            let caps = proptest::collection::vec(0.5f64..100.0, nl);
            let flows = proptest::collection::vec(
                proptest::collection::btree_set(0..nl as u32, 1..=nl.min(4)),
                0..12,
            )
            .prop_map(|fs| fs.into_iter().map(|s| s.into_iter().collect()).collect());
            (caps, flows)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, rng_seed: proptest::test_runner::RngSeed::Fixed(7), ..ProptestConfig::default() })]

        /// Feasibility and max-min optimality on random problems.
        #[test]
        fn feasible_and_max_min((caps, flows) in problem()) {
            let rates = solve(&caps, &flows);
            prop_assert!(rates.iter().all(|r| r.is_finite() && *r > 0.0));
            if let Err(e) = check(&caps, &flows, &rates, 1e-9) {
                prop_assert!(false, "{}", e);
            }
        }
    }
}
