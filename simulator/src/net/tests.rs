//! Tests of the incremental network against the whole-network solver.

use super::*;
use proptest::prelude::*;

fn t(ns: u64) -> Instant {
    Instant::from_nanos(ns)
}

#[test]
fn two_flows_then_one() {
    let mut net: Network<u32> = Network::new(1_000_000_000);
    let l = net.add_link(100.0, LinkClass::HostUp, 0);
    let a = net.start(t(0), &[l], 100, 1);
    let b = net.start(t(0), &[l], 300, 2);
    net.update(t(0));
    assert_eq!(net.rate(a), 50.0);
    // a finishes at 2 s; b has 200 left, alone at 100 B/s: done at 4 s.
    assert_eq!(net.next_completion(), Some((t(2_000_000_000), a)));
    assert_eq!(net.complete(t(1), a), None, "not due yet");
    assert_eq!(net.complete(t(2_000_000_000), a), Some((1, 100)));
    net.update(t(2_000_000_000));
    assert_eq!(net.next_completion(), Some((t(4_000_000_000), b)));
    assert_eq!(net.complete(t(4_000_000_000), b), Some((2, 300)));
    assert_eq!(net.next_completion(), None);
    assert_eq!(net.link(l).bytes, 400.0);
    assert!(net.stats().max_fluid_error < 1e-6);
    assert!((net.stats().max_utilisation - 1.0).abs() < 1e-12);
    // Series: 100 B/s for 4 s.
    let (series, _) = net.series();
    let total: f64 = series.iter().map(|b| b[LinkClass::HostUp as usize]).sum();
    assert!((total - 400.0).abs() < 1e-6);
}

#[test]
fn completion_moves_with_the_rate_and_abort_counts_partial_bytes() {
    let mut net: Network<u32> = Network::new(1_000_000);
    let l = net.add_link(10.0, LinkClass::HostDown, 0);
    let a = net.start(t(0), &[l], 100, 1);
    net.update(t(0));
    assert_eq!(net.next_completion(), Some((t(10_000_000_000), a)));
    let _b = net.start(t(1_000_000_000), &[l], 100, 2);
    net.update(t(1_000_000_000));
    // 90 bytes left at 5 B/s: due 18 s later.
    assert_eq!(net.next_completion().unwrap().0, t(19_000_000_000));
    assert_eq!(
        net.complete(t(10_000_000_000), a),
        None,
        "no longer due then"
    );
    // a sent 10 bytes alone, then 5 B/s for 2 s.
    let (tag, sent) = net.abort(t(3_000_000_000), a).unwrap();
    assert_eq!(tag, 1);
    assert!((sent - 20.0).abs() < 1e-9, "{sent}");
    assert!((net.link(l).bytes - 20.0).abs() < 1e-9);
}

#[test]
fn window_link_caps_a_long_rtt_flow() {
    // A 1 Gbit/s path and a 15 MB window at 165 ms: the flow runs at W / RTT.
    let mut net: Network<()> = Network::new(1_000_000_000);
    let up = net.add_link(125e6, LinkClass::HostUp, 0);
    let down = net.add_link(125e6, LinkClass::HostDown, 1);
    let w = net.add_link(15e6 / 0.165, LinkClass::Window, 0);
    let f = net.start(t(0), &[up, down, w], 1 << 20, ());
    net.update(t(0));
    assert!((net.rate(f) - 15e6 / 0.165).abs() < 1e-6);
    // The window link is not a physical link: it does not count in utilisation.
    assert!(net.stats().max_utilisation < 0.75);
}

#[derive(Debug, Clone)]
enum Op {
    Start(Vec<u32>),
    End(usize),
}

fn ops(nl: u32) -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(
        prop_oneof![
            3 => proptest::collection::btree_set(0..nl, 1..4).prop_map(|s| Op::Start(s.into_iter().collect())),
            2 => any::<usize>().prop_map(Op::End),
        ],
        1..60,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, rng_seed: proptest::test_runner::RngSeed::Fixed(11), ..ProptestConfig::default() })]

    /// After any sequence of starts and ends, the incremental rates equal a whole-network solve,
    /// and they are feasible and max-min.
    #[test]
    fn incremental_matches_full_solve(
        caps in proptest::collection::vec(1.0f64..100.0, 2..10),
        seq in ops(10),
    ) {
        let nl = caps.len() as u32;
        let mut net: Network<usize> = Network::new(1_000_000);
        let links: Vec<LinkId> = caps.iter().map(|&c| net.add_link(c, LinkClass::HostUp, 0)).collect();
        let mut live: Vec<(FlowId, Vec<u32>)> = Vec::new();
        for (step, op) in seq.into_iter().enumerate() {
            let now = t(step as u64 * 1000);
            match op {
                Op::Start(ls) => {
                    let ls: Vec<u32> = ls.into_iter().filter(|&l| l < nl).collect();
                    if ls.is_empty() { continue; }
                    let path: Vec<LinkId> = ls.iter().map(|&l| links[l as usize]).collect();
                    let id = net.start(now, &path, 1 << 30, step);
                    live.push((id, ls));
                }
                Op::End(k) => {
                    if live.is_empty() { continue; }
                    let (id, _) = live.remove(k % live.len());
                    prop_assert!(net.abort(now, id).is_some());
                }
            }
            net.update(now);
            let flows: Vec<Vec<u32>> = live.iter().map(|(_, ls)| ls.clone()).collect();
            let want = maxmin::solve(&caps, &flows);
            for ((id, _), w) in live.iter().zip(&want) {
                let got = net.rate(*id);
                // Within RISE_EPS below the exact share (rises smaller than that are not applied).
                prop_assert!(got <= w * (1.0 + 1e-6) + 1e-9 && got >= w * (1.0 - 2.0 * RISE_EPS) - 1e-9, "flow {} got {} want {}", id, got, w);
            }
            let got: Vec<f64> = live.iter().map(|(id, _)| net.rate(*id)).collect();
            if let Err(e) = maxmin::check(&caps, &flows, &got, 3.0 * RISE_EPS) {
                prop_assert!(false, "{}", e);
            }
        }
        prop_assert!(net.stats().max_utilisation <= 1.0 + 1e-6);
    }
}
