//! Tests of the fetch scheduler: one unit test per rule, and property tests that drive it in virtual
//! time against random peers.

use super::*;
use proptest::prelude::*;

/// Property-test settings: `cases` cases, failures kept in `proptest-regressions`.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::SourceParallel("proptest-regressions"),
        )),
        ..ProptestConfig::default()
    }
}

fn t(ms: u64) -> Instant {
    Instant::from_nanos(ms * 1_000_000)
}

fn cfg() -> Config {
    Config {
        local_site: "dc1".into(),
        ..Config::default()
    }
}

fn info(site: &str, rtt_ms: u64) -> PeerInfo {
    PeerInfo {
        site: site.into(),
        rtt: Some(Duration::from_millis(rtt_ms)),
        origin: false,
    }
}

fn full(n: u32) -> ChunkBitmap {
    ChunkBitmap::full(n)
}

fn bitmap(n: u32, indices: &[u32]) -> ChunkBitmap {
    let mut b = ChunkBitmap::new(n);
    for &i in indices {
        b.insert(i);
    }
    b
}

fn drain_actions(s: &mut FetchScheduler<u32>) -> Vec<Action<u32>> {
    std::iter::from_fn(|| s.poll_action()).collect()
}

/// Runs every timer due up to `until`, returning the actions they produced.
fn advance(s: &mut FetchScheduler<u32>, until: Instant) -> Vec<Action<u32>> {
    let mut out = drain_actions(s);
    while let Some(at) = s.poll_timeout().filter(|&at| at <= until) {
        s.handle_timeout(at);
        out.extend(drain_actions(s));
    }
    out
}

fn drain_events(s: &mut FetchScheduler<u32>) -> Vec<Event<u32>> {
    std::iter::from_fn(|| s.poll_event()).collect()
}

/// (peer, priority, index) of every Request action.
fn requests(actions: &[Action<u32>]) -> Vec<(u32, Priority, u32)> {
    let mut out = Vec::new();
    for a in actions {
        if let Action::Request {
            peer,
            priority,
            indices,
        } = a
        {
            out.extend(indices.iter().map(|&i| (*peer, *priority, i)));
        }
    }
    out
}

fn cancels(actions: &[Action<u32>]) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    for a in actions {
        if let Action::Cancel { peer, indices } = a {
            out.extend(indices.iter().map(|&i| (*peer, i)));
        }
    }
    out
}

#[test]
fn rejects_unworkable_config_and_bad_indices() {
    let bad = Config {
        demand_reserved_slots: 16,
        ..cfg()
    };
    assert!(matches!(
        FetchScheduler::<u32>::new(bad, 4, 0),
        Err(FetchError::InvalidConfig(_))
    ));
    let mut s = FetchScheduler::<u32>::new(cfg(), 4, 0).unwrap();
    assert_eq!(
        s.handle_want(t(0), 4, Priority::Demand),
        Err(FetchError::IndexOutOfRange { index: 4, count: 4 })
    );
    assert_eq!(
        s.handle_want_many(t(0), [1, 2, 9], Priority::Background),
        Err(FetchError::IndexOutOfRange { index: 9, count: 4 })
    );
    assert_eq!(s.stats().wanted, 0, "a failed want_many changes nothing");
}

#[test]
fn demand_goes_before_background_and_keeps_reserved_slots() {
    let config = Config {
        max_in_flight_per_peer: 4,
        demand_reserved_slots: 1,
        ..cfg()
    };
    let mut s = FetchScheduler::new(config, 100, 1).unwrap();
    s.handle_peer_connected(t(0), 7, info("dc1", 1));
    s.handle_peer_have(t(0), &7, &full(100));
    s.handle_want_many(t(0), 0..50, Priority::Background)
        .unwrap();
    let reqs = requests(&drain_actions(&mut s));
    assert_eq!(reqs.len(), 3, "Background may use 3 of 4 slots");
    assert!(reqs.iter().all(|r| r.1 == Priority::Background));
    // A Demand want gets the reserved slot at once.
    s.handle_want(t(1), 80, Priority::Demand).unwrap();
    assert_eq!(
        requests(&drain_actions(&mut s)),
        vec![(7, Priority::Demand, 80)]
    );
    assert_eq!(s.peer_in_flight(&7), 4);
    // When a slot frees, queued Demand wants go before the 47 queued Background ones.
    s.handle_want(t(2), 90, Priority::Demand).unwrap();
    assert!(requests(&drain_actions(&mut s)).is_empty(), "no slot free");
    let first_bg = reqs[0].2;
    assert_eq!(
        s.handle_chunk(t(3), &7, first_bg, ChunkOutcome::Valid),
        Delivery::Accept
    );
    assert_eq!(
        requests(&drain_actions(&mut s)),
        vec![(7, Priority::Demand, 90)]
    );
}

#[test]
fn demand_wants_are_served_in_arrival_order() {
    let config = Config {
        max_in_flight_per_peer: 2,
        demand_reserved_slots: 1,
        ..cfg()
    };
    let mut s = FetchScheduler::new(config, 10, 1).unwrap();
    s.handle_want(t(0), 5, Priority::Demand).unwrap();
    s.handle_want(t(1), 2, Priority::Demand).unwrap();
    s.handle_want(t(2), 8, Priority::Demand).unwrap();
    s.handle_peer_connected(t(3), 1, info("dc1", 1));
    s.handle_peer_have(t(3), &1, &full(10));
    let reqs: Vec<u32> = requests(&drain_actions(&mut s))
        .iter()
        .map(|r| r.2)
        .collect();
    assert_eq!(reqs, vec![5, 2]);
}

/// A scheduler whose only peer, 1 (in `site`, `rtt_ms` away), holds all 4 chunks, and which has
/// just asked it for chunk `index` at `priority`.
fn asked_peer_1(site: &str, rtt_ms: u64, index: u32, priority: Priority) -> FetchScheduler<u32> {
    let mut s = FetchScheduler::new(cfg(), 4, 9).unwrap();
    s.handle_peer_connected(t(0), 1, info(site, rtt_ms));
    s.handle_peer_have(t(0), &1, &full(4));
    s.handle_want(t(0), index, priority).unwrap();
    assert_eq!(requests(&drain_actions(&mut s)), vec![(1, priority, index)]);
    s
}

#[test]
fn background_want_promoted_while_in_flight_is_rerequested_at_demand() {
    let mut s = asked_peer_1("dc1", 1, 3, Priority::Background);
    s.handle_want(t(1), 3, Priority::Demand).unwrap();
    assert_eq!(
        requests(&drain_actions(&mut s)),
        vec![(1, Priority::Demand, 3)]
    );
    assert_eq!(s.want_priority(3), Some(Priority::Demand));
    assert_eq!(s.stats().requests_in_flight, 1, "same request, upgraded");
}

#[test]
fn background_is_rarest_first() {
    let mut s = FetchScheduler::new(
        Config {
            max_in_flight_per_peer: 2,
            demand_reserved_slots: 1,
            ..cfg()
        },
        4,
        3,
    )
    .unwrap();
    // Chunk 2 is held by one peer, the rest by three.
    for p in 1..=3 {
        s.handle_peer_connected(t(0), p, info("dc1", 1));
    }
    s.handle_peer_have(t(0), &1, &full(4));
    s.handle_peer_have(t(0), &2, &bitmap(4, &[0, 1, 3]));
    s.handle_peer_have(t(0), &3, &bitmap(4, &[0, 1, 3]));
    drain_actions(&mut s);
    s.handle_want_many(t(1), 0..4, Priority::Background)
        .unwrap();
    let reqs = requests(&drain_actions(&mut s));
    assert_eq!(reqs.len(), 3, "one background slot per peer");
    assert!(
        reqs.contains(&(1, Priority::Background, 2)),
        "the only holder of the rarest chunk fetches it: {reqs:?}"
    );
}

#[test]
fn priority_order_overrides_rarity() {
    let mut s = FetchScheduler::new(
        Config {
            max_in_flight_per_peer: 2,
            demand_reserved_slots: 1,
            ..cfg()
        },
        6,
        3,
    )
    .unwrap();
    s.set_priority_order(t(0), &[4, 1, 99]);
    s.handle_peer_connected(t(0), 1, info("dc1", 1));
    s.handle_peer_have(t(0), &1, &full(6));
    s.handle_want_many(t(0), 0..6, Priority::Background)
        .unwrap();
    assert_eq!(
        requests(&drain_actions(&mut s)),
        vec![(1, Priority::Background, 4)]
    );
    s.handle_chunk(t(1), &1, 4, ChunkOutcome::Valid);
    assert_eq!(
        requests(&drain_actions(&mut s)),
        vec![(1, Priority::Background, 1)]
    );
}

#[test]
fn same_site_first_then_lowest_rtt() {
    let mut s = FetchScheduler::new(cfg(), 8, 5).unwrap();
    s.handle_peer_connected(t(0), 10, info("far", 165));
    s.handle_peer_connected(t(0), 11, info("near", 31));
    s.handle_peer_connected(t(0), 12, info("dc1", 3));
    for p in [10, 11] {
        s.handle_peer_have(t(0), &p, &full(8));
    }
    s.handle_peer_have(t(0), &12, &bitmap(8, &[0]));
    drain_actions(&mut s);
    s.handle_want(t(1), 0, Priority::Demand).unwrap();
    assert_eq!(
        requests(&drain_actions(&mut s)),
        vec![(12, Priority::Demand, 0)]
    );
    s.handle_want(t(1), 1, Priority::Demand).unwrap();
    let actions = drain_actions(&mut s);
    assert_eq!(requests(&actions), vec![(11, Priority::Demand, 1)]);
    assert!(
        actions.contains(&Action::AnnounceFetching {
            peer: 12,
            indices: vec![1]
        }),
        "a WAN fetch is announced to same-site peers: {actions:?}"
    );
}

#[test]
fn load_spreads_among_equally_near_peers() {
    let mut s = FetchScheduler::new(cfg(), 64, 5).unwrap();
    for p in 0..4 {
        s.handle_peer_connected(t(0), p, info("dc1", 1));
        s.handle_peer_have(t(0), &p, &full(64));
    }
    s.handle_want_many(t(0), 0..24, Priority::Background)
        .unwrap();
    drain_actions(&mut s);
    for p in 0..4 {
        assert_eq!(s.peer_in_flight(&p), 6, "peer {p}");
    }
}

#[test]
fn local_holder_is_waited_for_instead_of_the_wan() {
    let config = Config {
        max_in_flight_per_peer: 2,
        demand_reserved_slots: 1,
        ..cfg()
    };
    let mut s = FetchScheduler::new(config, 8, 5).unwrap();
    s.handle_peer_connected(t(0), 1, info("dc1", 1));
    s.handle_peer_connected(t(0), 2, info("dc2", 30));
    s.handle_peer_have(t(0), &1, &full(8));
    s.handle_peer_have(t(0), &2, &full(8));
    s.handle_want_many(t(0), 0..4, Priority::Background)
        .unwrap();
    let reqs = requests(&drain_actions(&mut s));
    assert_eq!(
        reqs.len(),
        1,
        "local peer's one background slot only: {reqs:?}"
    );
    assert_eq!(reqs[0].0, 1);
    // The local peer leaves: now the WAN is the only way.
    s.handle_peer_disconnected(t(1), &1);
    let reqs = requests(&drain_actions(&mut s));
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].0, 2);
}

#[test]
fn same_site_fetch_announcement_defers_our_wan_fetch_for_a_bounded_time() {
    let mut s = FetchScheduler::new(cfg(), 4, 5).unwrap();
    s.handle_peer_connected(t(0), 1, info("dc1", 1));
    s.handle_peer_connected(t(0), 2, info("dc2", 30));
    s.handle_peer_have(t(0), &2, &full(4));
    s.handle_peer_fetching(t(0), &1, &[0]);
    s.handle_want(t(0), 0, Priority::Demand).unwrap();
    assert!(
        requests(&drain_actions(&mut s)).is_empty(),
        "wait for the site's copy"
    );
    // The neighbour got it: fetch locally.
    s.handle_peer_have_update(t(100), &1, &[0]);
    assert_eq!(
        requests(&drain_actions(&mut s)),
        vec![(1, Priority::Demand, 0)]
    );
    assert_eq!(
        s.handle_chunk(t(110), &1, 0, ChunkOutcome::Valid),
        Delivery::Accept
    );

    // Another chunk: the announcement expires, so we cross the WAN ourselves.
    s.handle_peer_fetching(t(200), &1, &[1]);
    s.handle_want(t(200), 1, Priority::Demand).unwrap();
    assert!(requests(&drain_actions(&mut s)).is_empty());
    assert!(requests(&advance(&mut s, t(699))).is_empty());
    assert_eq!(
        requests(&advance(&mut s, t(700))),
        vec![(2, Priority::Demand, 1)],
        "a Demand want waits demand_local_wait for the announced copy"
    );

    // Announcements from other sites do not defer anything.
    s.handle_peer_fetching(t(300), &2, &[2]);
    s.handle_want(t(300), 2, Priority::Demand).unwrap();
    assert_eq!(
        requests(&drain_actions(&mut s)),
        vec![(2, Priority::Demand, 2)]
    );
}

/// Chunk 0 wanted at Demand and requested from peer 1 (the only holder) at t = 0; a second
/// holder, peer 2 (a little farther), connects at t = 10 ms.
fn demand_at_1_then_2_joins() -> FetchScheduler<u32> {
    let mut s = asked_peer_1("dc1", 1, 0, Priority::Demand);
    s.handle_peer_connected(t(10), 2, info("dc1", 2));
    s.handle_peer_have(t(10), &2, &full(4));
    s
}

#[test]
fn timeout_requeues_elsewhere_cancels_and_cools_down() {
    let mut s = demand_at_1_then_2_joins();
    let deadline = t(0) + Duration::from_secs(4) + Duration::from_millis(4);
    assert!(
        advance(&mut s, t(4003)).is_empty(),
        "nothing before the timeout (peer 2 is not better ranked: no hedge)"
    );
    let actions = advance(&mut s, deadline);
    assert_eq!(cancels(&actions), vec![(1, 0)]);
    assert_eq!(requests(&actions), vec![(2, Priority::Demand, 0)]);
    // Peer 1 is cooling down: a new want goes to peer 2 although 1 is nearer.
    s.handle_want(deadline, 1, Priority::Demand).unwrap();
    assert_eq!(
        requests(&drain_actions(&mut s)),
        vec![(2, Priority::Demand, 1)]
    );
}

/// A chunk whose request was cancelled may already be on the wire (the node's lanes and the
/// simulator deliver it whole). It is as good as any copy: accepted while still wanted, and the
/// request that replaced it is cancelled.
#[test]
fn a_cancelled_request_s_chunk_that_arrives_is_accepted() {
    let mut s = demand_at_1_then_2_joins();
    let deadline = t(4004);
    let actions = advance(&mut s, deadline);
    assert_eq!(cancels(&actions), vec![(1, 0)]);
    assert_eq!(requests(&actions), vec![(2, Priority::Demand, 0)]);
    // Peer 1 had already written it.
    let late = deadline + Duration::from_millis(1);
    assert_eq!(
        s.handle_chunk(late, &1, 0, ChunkOutcome::Valid),
        Delivery::Accept
    );
    assert_eq!(cancels(&drain_actions(&mut s)), vec![(2, 0)]);
    // Peer 2's copy, crossing that Cancel, is now a duplicate.
    assert_eq!(
        s.handle_chunk(late, &2, 0, ChunkOutcome::Valid),
        Delivery::Discard
    );
}

/// A Demand want of chunk 0 requested from peer 1 in another site at t = 0 (its bytes reported
/// arriving at 545 ms if `arriving`); a same-site holder, peer 2, connects at 1.5 s. Returns
/// everything the scheduler does until just before the Demand deadline.
fn remote_request_then_local_holder(arriving: bool) -> Vec<Action<u32>> {
    let mut s = asked_peer_1("dc2", 30, 0, Priority::Demand);
    if arriving {
        s.handle_chunk_arriving(t(545), &1, 0);
    }
    s.handle_peer_connected(t(1500), 2, info("dc1", 1));
    s.handle_peer_have(t(1500), &2, &full(4));
    advance(&mut s, t(29_999))
}

/// A chunk arriving from outside the site is being served, however slowly (a crowd sharing an
/// origin's uplink), and a Cancel cannot stop bytes already on the way: it is neither hedged
/// nor timed out. Unreported, the same request is hedged to the nearer holder.
#[test]
fn a_remote_chunk_that_is_arriving_is_neither_hedged_nor_timed_out() {
    let quiet = remote_request_then_local_holder(true);
    assert!(quiet.is_empty(), "nothing while it arrives: {quiet:?}");
    // Unreported: hedged to peer 2 once it holds the chunk (then, neither delivering, re-asked
    // in turn as each request times out).
    let hedged = remote_request_then_local_holder(false);
    assert_eq!(requests(&hedged).first(), Some(&(2, Priority::Demand, 0)));
}

/// Inside the site a second copy is cheap: a same-site chunk that is arriving still times out
/// when the peer falls silent, and is fetched elsewhere.
#[test]
fn a_same_site_chunk_that_is_arriving_still_times_out() {
    let mut s = demand_at_1_then_2_joins();
    s.handle_chunk_arriving(t(3000), &1, 0);
    let actions = advance(&mut s, t(4004));
    assert_eq!(cancels(&actions), vec![(1, 0)]);
    assert_eq!(requests(&actions), vec![(2, Priority::Demand, 0)]);
}

/// An arriving Background chunk from a same-site peer (a gateway serving its whole site's
/// prefetch shares its uplink among hundreds) is slow, not gone: it is not timed out, and the
/// peer does not turn suspect, until `request_max_wait`. At Demand it still times out.
#[test]
fn a_same_site_background_chunk_that_is_arriving_waits_for_the_hard_limit() {
    let mut s = asked_peer_1("dc1", 1, 0, Priority::Background);
    s.handle_chunk_arriving(t(100), &1, 0);
    let quiet = advance(&mut s, t(59_999));
    assert!(quiet.is_empty(), "nothing while it arrives: {quiet:?}");
    let late = advance(&mut s, t(60_010));
    assert_eq!(cancels(&late), vec![(1, 0)], "the hard limit still holds");

    let mut d = asked_peer_1("dc1", 1, 0, Priority::Demand);
    d.handle_chunk_arriving(t(100), &1, 0);
    assert_eq!(cancels(&advance(&mut d, t(4_010))), vec![(1, 0)]);
}

#[test]
fn a_dead_local_holder_does_not_keep_us_off_the_wan() {
    let mut s = FetchScheduler::new(cfg(), 4, 9).unwrap();
    s.handle_peer_connected(t(0), 1, info("dc1", 1));
    s.handle_peer_connected(t(0), 2, info("dc2", 30));
    s.handle_peer_have(t(0), &1, &full(4));
    s.handle_peer_have(t(0), &2, &full(4));
    s.handle_want(t(0), 0, Priority::Demand).unwrap();
    assert_eq!(
        requests(&drain_actions(&mut s)),
        vec![(1, Priority::Demand, 0)]
    );
    assert_eq!(
        requests(&advance(&mut s, t(4004))),
        vec![(2, Priority::Demand, 0)]
    );
}

#[test]
fn disconnect_requeues_on_another_peer() {
    let mut s = FetchScheduler::new(cfg(), 4, 9).unwrap();
    for p in [1, 2] {
        s.handle_peer_connected(t(0), p, info("dc1", p as u64));
        s.handle_peer_have(t(0), &p, &full(4));
    }
    s.handle_want(t(0), 3, Priority::Demand).unwrap();
    assert_eq!(
        requests(&drain_actions(&mut s)),
        vec![(1, Priority::Demand, 3)]
    );
    s.handle_peer_disconnected(t(1), &1);
    assert_eq!(
        requests(&drain_actions(&mut s)),
        vec![(2, Priority::Demand, 3)]
    );
}

#[test]
fn reject_not_found_forgets_the_chunk_and_busy_cools_down() {
    let mut s = FetchScheduler::new(cfg(), 4, 9).unwrap();
    for p in [1, 2] {
        s.handle_peer_connected(t(0), p, info("dc1", p as u64));
        s.handle_peer_have(t(0), &p, &full(4));
    }
    s.handle_want(t(0), 0, Priority::Demand).unwrap();
    drain_actions(&mut s);
    s.handle_reject(t(1), &1, 0, RejectKind::NotFound);
    assert_eq!(
        requests(&drain_actions(&mut s)),
        vec![(2, Priority::Demand, 0)]
    );
    s.handle_chunk(t(2), &2, 0, ChunkOutcome::Valid);
    // Peer 1 still has chunk 1, but says Busy: chunk 1 goes to peer 2.
    s.handle_want(t(3), 1, Priority::Demand).unwrap();
    assert_eq!(
        requests(&drain_actions(&mut s)),
        vec![(1, Priority::Demand, 1)]
    );
    s.handle_reject(t(4), &1, 1, RejectKind::Busy);
    assert_eq!(
        requests(&drain_actions(&mut s)),
        vec![(2, Priority::Demand, 1)]
    );
}

/// For a requester without a local key (0) and chunk 0: a peer id scoring above peer 1, and one
/// scoring below it ([`relay_score`]).
fn relay_ids_around_peer_1() -> (u32, u32) {
    let score = |p: u32| relay_score(0, stable_key(&p), 0);
    let above = (2..100).find(|&p| score(p) > score(1)).unwrap();
    let below = (2..100).find(|&p| score(p) < score(1)).unwrap();
    (above, below)
}

#[test]
fn a_fanout_refusal_waits_for_a_relay_without_cooling_the_peer() {
    // Peer 1 holds everything; two same-site peers hold nothing yet.
    let (above, below) = relay_ids_around_peer_1();
    let mut s = asked_peer_1("dc1", 1, 0, Priority::Demand);
    for p in [above, below] {
        s.handle_peer_connected(t(0), p, info("dc1", 1));
        s.handle_peer_have(t(0), &p, &ChunkBitmap::new(4));
    }
    s.handle_reject(t(1), &1, 0, RejectKind::Fanout);
    assert!(
        requests(&drain_actions(&mut s)).is_empty(),
        "peer 1 is not asked for chunk 0 again at once, and nobody else holds it"
    );
    // Not a sign of load: another chunk goes to peer 1 at once.
    s.handle_want(t(2), 1, Priority::Demand).unwrap();
    assert_eq!(
        requests(&drain_actions(&mut s)),
        vec![(1, Priority::Demand, 1)]
    );
    // A relay scoring below the refusing peer announces chunk 0: the rest of the crowd asks it,
    // not us (the crowd splits over the relays by score).
    s.handle_peer_have_update(t(4), &below, &[0]);
    assert!(requests(&drain_actions(&mut s)).is_empty());
    // One scoring above announces it: chunk 0 goes there.
    s.handle_peer_have_update(t(5), &above, &[0]);
    assert_eq!(
        requests(&drain_actions(&mut s)),
        vec![(above, Priority::Demand, 0)]
    );
}

#[test]
fn after_relay_retry_any_holder_may_be_asked() {
    let (_, below) = relay_ids_around_peer_1();
    let mut s = asked_peer_1("dc1", 1, 0, Priority::Demand);
    s.handle_peer_connected(t(0), below, info("dc1", 1));
    s.handle_peer_have(t(0), &below, &ChunkBitmap::new(4));
    s.handle_reject(t(1), &1, 0, RejectKind::Fanout);
    s.handle_peer_have_update(t(2), &below, &[0]);
    assert!(requests(&drain_actions(&mut s)).is_empty());
    let retry = cfg().relay_retry;
    let asked = requests(&advance(&mut s, t(1) + retry));
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(asked[0].2, 0);
}

#[test]
fn a_fanout_refusal_is_retried_after_relay_retry() {
    let mut s = asked_peer_1("dc1", 1, 0, Priority::Demand);
    let retry = cfg().relay_retry;
    s.handle_reject(t(1), &1, 0, RejectKind::Fanout);
    let almost = t(1) + (retry - Duration::from_millis(1));
    assert!(requests(&advance(&mut s, almost)).is_empty());
    assert_eq!(
        requests(&advance(&mut s, t(1) + retry)),
        vec![(1, Priority::Demand, 0)],
        "with nobody else to ask, the refusing peer is asked again after relay_retry"
    );
}

#[test]
fn two_refusing_peers_are_not_asked_in_turn() {
    // Peers 1 and 2 both hold chunk 0 and both refuse it: each waits out its own relay_retry,
    // instead of the want bouncing between them. After the first refusal the second is asked only
    // if it scores above the first (the relay bar).
    let mut s = FetchScheduler::new(cfg(), 4, 9).unwrap();
    for p in [1, 2] {
        s.handle_peer_connected(t(0), p, info("dc1", 1));
        s.handle_peer_have(t(0), &p, &full(4));
    }
    s.handle_want(t(0), 0, Priority::Demand).unwrap();
    let first = requests(&drain_actions(&mut s));
    assert_eq!(first.len(), 1);
    let (a, b) = if first[0].0 == 1 { (1, 2) } else { (2, 1) };
    s.handle_reject(t(1), &a, 0, RejectKind::Fanout);
    let score = |p: u32| relay_score(0, stable_key(&p), 0);
    if score(b) > score(a) {
        assert_eq!(
            requests(&drain_actions(&mut s)),
            vec![(b, Priority::Demand, 0)]
        );
        s.handle_reject(t(2), &b, 0, RejectKind::Fanout);
    }
    assert!(requests(&drain_actions(&mut s)).is_empty());
    let retry = cfg().relay_retry;
    assert_eq!(
        requests(&advance(&mut s, t(1) + retry)).len(),
        if score(b) > score(a) { 0 } else { 1 },
        "the bar set by {a} ends at its relay_retry; {b}'s refusal, if any, lasts longer"
    );
}

#[test]
fn corrupt_chunk_bans_the_sender_and_requeues() {
    let mut s = FetchScheduler::new(cfg(), 4, 9).unwrap();
    for p in [1, 2] {
        s.handle_peer_connected(t(0), p, info("dc1", p as u64));
        s.handle_peer_have(t(0), &p, &full(4));
    }
    s.handle_want_many(t(0), [0, 1], Priority::Demand).unwrap();
    let reqs = requests(&drain_actions(&mut s));
    assert_eq!(reqs.len(), 2);
    let from_1: Vec<u32> = reqs.iter().filter(|r| r.0 == 1).map(|r| r.2).collect();
    assert!(!from_1.is_empty());
    assert_eq!(
        s.handle_chunk(t(1), &1, from_1[0], ChunkOutcome::Corrupt),
        Delivery::Discard
    );
    assert_eq!(drain_events(&mut s), vec![Event::PeerBanned { peer: 1 }]);
    assert!(s.is_banned(&1));
    let reqs = requests(&drain_actions(&mut s));
    assert!(reqs.iter().all(|r| r.0 == 2), "{reqs:?}");
    assert!(reqs.iter().any(|r| r.2 == from_1[0]));
    // A banned peer that reconnects stays out.
    s.handle_peer_connected(t(2), 1, info("dc1", 1));
    s.handle_peer_have(t(2), &1, &full(4));
    s.handle_want(t(2), 3, Priority::Demand).unwrap();
    assert!(requests(&drain_actions(&mut s)).iter().all(|r| r.0 == 2));
    assert_eq!(s.stats().peers, 1);
}

#[test]
fn no_source_is_reported_and_repeated() {
    let mut s = FetchScheduler::new(cfg(), 8, 9).unwrap();
    s.handle_want_many(t(0), [2, 5], Priority::Background)
        .unwrap();
    assert_eq!(
        drain_events(&mut s),
        vec![Event::NoSource {
            indices: vec![2, 5],
            total: 2
        }]
    );
    assert_eq!(s.poll_timeout(), Some(t(5000)));
    s.handle_timeout(t(5000));
    assert_eq!(
        drain_events(&mut s).len(),
        1,
        "repeated after no_source_retry"
    );
    s.handle_peer_connected(t(5001), 1, info("dc1", 1));
    s.handle_peer_have(t(5001), &1, &bitmap(8, &[2, 5]));
    assert_eq!(s.stats().without_source, 0);
    s.handle_timeout(t(20_000));
    assert!(
        drain_events(&mut s)
            .iter()
            .all(|e| !matches!(e, Event::NoSource { .. }))
    );
}

#[test]
fn unservable_demand_fails_after_the_deadline() {
    let mut s = FetchScheduler::new(cfg(), 8, 9).unwrap();
    s.handle_want(t(0), 4, Priority::Demand).unwrap();
    drain_events(&mut s);
    let mut now = t(0);
    while let Some(next) = s.poll_timeout() {
        assert!(next <= t(30_000), "the want must fail by its deadline");
        now = next;
        s.handle_timeout(now);
        if !s.is_wanted(4) {
            break;
        }
    }
    assert_eq!(now, t(30_000));
    assert!(drain_events(&mut s).contains(&Event::WantFailed {
        index: 4,
        reason: FailReason::DemandDeadline
    }));
    assert_eq!(s.stats().wanted_demand, 0);
}

#[test]
fn background_want_without_any_holder_fails_after_the_unavailable_deadline() {
    let mut s = FetchScheduler::new(cfg(), 8, 9).unwrap();
    s.handle_want_many(t(0), [1, 2], Priority::Background)
        .unwrap();
    // Chunk 2 finds a holder after 10 s; chunk 1 never does.
    s.handle_peer_connected(t(10_000), 1, info("dc1", 1));
    s.handle_peer_have(t(10_000), &1, &bitmap(8, &[2]));
    s.handle_chunk(t(10_001), &1, 2, ChunkOutcome::Valid);
    while let Some(next) = s.poll_timeout() {
        assert!(next <= t(60_000));
        s.handle_timeout(next);
        if !s.is_wanted(1) {
            assert_eq!(next, t(60_000));
            break;
        }
    }
    let failed: Vec<_> = drain_events(&mut s)
        .into_iter()
        .filter(|e| matches!(e, Event::WantFailed { .. }))
        .collect();
    assert_eq!(
        failed,
        vec![Event::WantFailed {
            index: 1,
            reason: FailReason::Unavailable
        }]
    );
}

#[test]
fn endgame_duplicates_the_tail_and_cancels_the_loser() {
    let config = Config {
        endgame_threshold: 2,
        ..cfg()
    };
    let mut s = FetchScheduler::new(config, 4, 9).unwrap();
    for p in [1, 2] {
        s.handle_peer_connected(t(0), p, info("dc1", p as u64));
        s.handle_peer_have(t(0), &p, &full(4));
    }
    s.handle_want_many(t(0), 0..4, Priority::Background)
        .unwrap();
    let reqs = requests(&drain_actions(&mut s));
    assert_eq!(reqs.len(), 4, "not endgame yet: one request per chunk");
    for r in reqs.iter().take(2) {
        s.handle_chunk(t(1), &r.0, r.2, ChunkOutcome::Valid);
    }
    let dups = requests(&drain_actions(&mut s));
    assert_eq!(
        dups.len(),
        2,
        "each remaining chunk asked from the other peer: {dups:?}"
    );
    for d in &dups {
        assert_eq!(s.requested_from(d.2).len(), 2);
    }
    let (winner, index) = (dups[0].0, dups[0].2);
    assert_eq!(
        s.handle_chunk(t(2), &winner, index, ChunkOutcome::Valid),
        Delivery::Accept
    );
    let loser = if winner == 1 { 2 } else { 1 };
    assert_eq!(cancels(&drain_actions(&mut s)), vec![(loser, index)]);
    assert_eq!(
        s.handle_chunk(t(3), &loser, index, ChunkOutcome::Valid),
        Delivery::Discard,
        "a late duplicate is not committed twice"
    );
}

#[test]
fn lazy_demand_reads_are_not_duplicated() {
    let mut s = FetchScheduler::new(cfg(), 100, 9).unwrap();
    for p in [1, 2] {
        s.handle_peer_connected(t(0), p, info("dc1", p as u64));
        s.handle_peer_have(t(0), &p, &full(100));
    }
    s.handle_want(t(0), 7, Priority::Demand).unwrap();
    assert_eq!(requests(&drain_actions(&mut s)).len(), 1);
}

#[test]
fn local_have_cancels_in_flight_requests() {
    let mut s = FetchScheduler::new(cfg(), 4, 9).unwrap();
    s.handle_peer_connected(t(0), 1, info("dc1", 1));
    s.handle_peer_have(t(0), &1, &full(4));
    s.handle_want(t(0), 2, Priority::Demand).unwrap();
    drain_actions(&mut s);
    s.handle_local_have(t(1), 2);
    assert_eq!(cancels(&drain_actions(&mut s)), vec![(1, 2)]);
    assert_eq!(s.stats().requests_in_flight, 0);
    assert_eq!(s.peer_in_flight(&1), 0);
}

#[test]
fn unwant_many_drops_wants_and_cancels_their_requests() {
    let mut s = FetchScheduler::new(cfg(), 8, 9).unwrap();
    s.handle_peer_connected(t(0), 1, info("dc1", 1));
    s.handle_peer_have(t(0), &1, &full(8));
    s.handle_want_many(t(0), 0..8, Priority::Background)
        .unwrap();
    let sent = requests(&drain_actions(&mut s));
    assert!(!sent.is_empty());
    s.handle_unwant_many(t(1), 0..8);
    let mut cancelled: Vec<u32> = cancels(&drain_actions(&mut s))
        .into_iter()
        .map(|(_, i)| i)
        .collect();
    cancelled.sort_unstable();
    let mut requested: Vec<u32> = sent.iter().map(|r| r.2).collect();
    requested.sort_unstable();
    assert_eq!(cancelled, requested);
    assert_eq!(s.stats().wanted, 0);
    assert_eq!(s.stats().requests_in_flight, 0);
    assert!((0..8).all(|i| !s.is_wanted(i)));
}

#[test]
fn background_backs_off_while_a_vm_reads_and_resumes_after() {
    let mut s = FetchScheduler::new(cfg(), 64, 9).unwrap();
    s.handle_peer_connected(t(0), 1, info("dc1", 1));
    s.handle_peer_have(t(0), &1, &full(64));
    // A VM reads chunk 0 before the prefetch starts.
    s.handle_want(t(0), 0, Priority::Demand).unwrap();
    s.handle_want_many(t(0), 1..64, Priority::Background)
        .unwrap();
    let sent = requests(&drain_actions(&mut s));
    let bg = sent.iter().filter(|r| r.1 == Priority::Background).count();
    assert_eq!(
        bg, 2,
        "two Background requests beside the Demand one: {sent:?}"
    );
    // The Demand chunk arrives; Background stays throttled for the back-off.
    s.handle_chunk(t(10), &1, 0, ChunkOutcome::Valid);
    assert!(
        requests(&drain_actions(&mut s)).is_empty(),
        "no Background request while the back-off runs"
    );
    let until = s.poll_timeout().unwrap();
    assert_eq!(until, t(10) + Config::default().demand_backoff);
    // When it ends, the full window (16 - 4 reserved) is used.
    s.handle_timeout(until);
    let more = requests(&drain_actions(&mut s));
    assert_eq!(more.len(), 12 - 2, "{more:?}");
    assert!(
        s.poll_timeout() != Some(until),
        "the back-off timer is spent"
    );
}

#[test]
fn busy_server_that_keeps_delivering_is_not_timed_out() {
    let config = Config {
        request_max_wait: Duration::from_secs(20),
        ..cfg()
    };
    let mut s = FetchScheduler::new(config, 8, 9).unwrap();
    s.handle_peer_connected(t(0), 1, info("dc1", 1));
    s.handle_peer_have(t(0), &1, &full(8));
    s.handle_want_many(t(0), 0..4, Priority::Demand).unwrap();
    let reqs = requests(&drain_actions(&mut s));
    assert_eq!(reqs.len(), 4);
    // The server delivers one chunk every 3 s: each request waits longer than the 4 s timeout in
    // its queue, but the peer is making progress, so nothing times out.
    for (k, r) in reqs.iter().take(3).enumerate() {
        let at = t(3_000 * (k as u64 + 1));
        assert!(
            cancels(&advance(&mut s, at)).is_empty(),
            "no timeout by {at:?}"
        );
        assert_eq!(
            s.handle_chunk(at, &1, r.2, ChunkOutcome::Valid),
            Delivery::Accept
        );
    }
    // Then it stalls: the last request times out 4 s + 4 RTT after the last delivery.
    assert!(cancels(&advance(&mut s, t(13_003))).is_empty());
    assert_eq!(cancels(&advance(&mut s, t(13_004))), vec![(1, reqs[3].2)]);
}

#[test]
fn a_request_waits_at_most_request_max_wait() {
    let config = Config {
        request_max_wait: Duration::from_secs(10),
        ..cfg()
    };
    let mut s = FetchScheduler::new(config, 8, 9).unwrap();
    s.handle_peer_connected(t(0), 1, info("dc1", 1));
    s.handle_peer_have(t(0), &1, &full(8));
    s.handle_want_many(t(0), 0..2, Priority::Background)
        .unwrap();
    let reqs = requests(&drain_actions(&mut s));
    assert_eq!(reqs.len(), 2);
    // The peer keeps delivering other chunks (unsolicited here), never ours.
    for k in 1..=4 {
        let at = t(2_000 * k);
        let a = advance(&mut s, at);
        assert!(cancels(&a).is_empty(), "{at:?} {a:?}");
        s.handle_chunk(at, &1, 7, ChunkOutcome::Valid);
    }
    assert!(cancels(&advance(&mut s, t(9_999))).is_empty());
    let cancelled = cancels(&advance(&mut s, t(10_000)));
    assert_eq!(cancelled.len(), 2, "both give up at 10 s: {cancelled:?}");
}

#[test]
fn cooling_peer_keeps_a_probe_for_chunks_only_it_holds() {
    let mut s = FetchScheduler::new(cfg(), 64, 9).unwrap();
    s.handle_peer_connected(t(0), 1, info("dc2", 10));
    s.handle_peer_have(t(0), &1, &full(64));
    s.handle_want_many(t(0), 0..64, Priority::Background)
        .unwrap();
    assert_eq!(requests(&drain_actions(&mut s)).len(), 12);
    // All 12 time out together: the peer cools down, but keeps one request (a probe) instead of
    // leaving every chunk unrequested for the cool-down.
    let actions = advance(&mut s, t(4_040));
    assert_eq!(cancels(&actions).len(), 12);
    let probe = requests(&actions);
    assert_eq!(probe.len(), 1, "one probe while cooling: {probe:?}");
    assert_eq!(s.peer_in_flight(&1), 1);
    // The probe is answered: the cool-down ends and the full window is used again.
    s.handle_chunk(t(4_100), &1, probe[0].2, ChunkOutcome::Valid);
    assert_eq!(requests(&drain_actions(&mut s)).len(), 12);
}

#[test]
fn queued_demand_request_is_hedged_to_a_peer_that_obtains_the_chunk() {
    // No endgame here: it would duplicate the Background tail for its own reasons.
    let config = Config {
        endgame_threshold: 0,
        ..cfg()
    };
    let mut s = FetchScheduler::new(config, 8, 9).unwrap();
    // Peer 1 is an origin in our own site, busy with 3 of our requests; peer 2 a same-site host.
    s.handle_peer_connected(
        t(0),
        1,
        PeerInfo {
            origin: true,
            ..info("dc1", 1)
        },
    );
    s.handle_peer_connected(t(0), 2, info("dc1", 1));
    s.handle_peer_have(t(0), &1, &full(8));
    s.handle_want_many(t(0), [0, 1, 2], Priority::Demand)
        .unwrap();
    let actions = drain_actions(&mut s);
    assert_eq!(requests(&actions).len(), 3);
    assert!(
        actions.contains(&Action::AnnounceFetching {
            peer: 2,
            indices: vec![0, 1, 2]
        }),
        "a fetch from an origin is announced like a WAN fetch: {actions:?}"
    );
    // Peer 2 obtains chunk 0 after 50 ms: too early to hedge, so we look again at 200 ms.
    s.handle_peer_have_update(t(50), &2, &[0]);
    assert!(requests(&drain_actions(&mut s)).is_empty());
    assert_eq!(
        requests(&advance(&mut s, t(200))),
        vec![(2, Priority::Demand, 0)]
    );
    assert_eq!(s.requested_from(0).len(), 2);
    // The hedge wins; the queued request at the origin is cancelled.
    assert_eq!(
        s.handle_chunk(t(210), &2, 0, ChunkOutcome::Valid),
        Delivery::Accept
    );
    assert_eq!(cancels(&drain_actions(&mut s)), vec![(1, 0)]);
    // A Background want is never hedged.
    s.handle_want(t(300), 5, Priority::Background).unwrap();
    let a = drain_actions(&mut s);
    assert_eq!(requests(&a), vec![(1, Priority::Background, 5)], "{a:?}");
    s.handle_peer_have_update(t(600), &2, &[5]);
    let a = advance(&mut s, t(1_000));
    assert!(requests(&a).is_empty(), "{a:?}");
}

/// The peer among `members` (plus ourselves, `me`) with the highest score for `index`.
fn site_owner(me: u32, members: &[u32], index: u32) -> u32 {
    std::iter::once(me)
        .chain(members.iter().copied())
        .max_by_key(|p| site_score(stable_key(p), index))
        .unwrap()
}

#[test]
fn outside_fetches_are_assigned_once_per_site() {
    let n = 40;
    let mut s = FetchScheduler::new(cfg(), n, 9).unwrap();
    s.set_local_peer(t(0), &100);
    for p in [1, 2, 3] {
        s.handle_peer_connected(t(0), p, info("dc1", 1));
    }
    s.handle_peer_connected(t(0), 9, info("dc2", 30));
    s.handle_peer_have(t(0), &9, &full(n));
    s.handle_want_many(t(0), 0..n, Priority::Background)
        .unwrap();
    let ours: Vec<u32> = (0..n)
        .filter(|&i| site_owner(100, &[1, 2, 3], i) == 100)
        .collect();
    assert!(!ours.is_empty() && ours.len() < n as usize);
    let mut got: Vec<u32> = requests(&drain_actions(&mut s))
        .iter()
        .map(|r| r.2)
        .collect();
    got.sort();
    assert_eq!(got.len(), 12.min(ours.len()));
    assert!(
        got.iter().all(|i| ours.contains(i)),
        "only chunks assigned to us cross the WAN: {got:?}, ours {ours:?}"
    );
    // A neighbour's chunk arrives at the neighbour: fetched inside the site.
    let theirs = (0..n)
        .find(|&i| site_owner(100, &[1, 2, 3], i) == 2)
        .unwrap();
    s.handle_peer_have_update(t(100), &2, &[theirs]);
    assert!(requests(&drain_actions(&mut s)).contains(&(2, Priority::Background, theirs)));
    // After `site_assign_wait` without copies, we fetch the rest ourselves.
    for r in got {
        s.handle_chunk(t(500), &9, r, ChunkOutcome::Valid);
    }
    let before: Vec<u32> = requests(&drain_actions(&mut s))
        .iter()
        .map(|r| r.2)
        .collect();
    assert!(before.iter().all(|i| ours.contains(i)), "{before:?}");
    let after = requests(&advance(&mut s, t(10_000)));
    assert!(
        after.iter().any(|r| !ours.contains(&r.2)),
        "the wait is bounded: {after:?}"
    );
    // Without our own id, every node counts as assigned (the old behaviour).
    let mut s = FetchScheduler::new(cfg(), n, 9).unwrap();
    s.handle_peer_connected(t(0), 1, info("dc1", 1));
    s.handle_peer_connected(t(0), 9, info("dc2", 30));
    s.handle_peer_have(t(0), &9, &full(n));
    s.handle_want_many(t(0), 0..n, Priority::Background)
        .unwrap();
    assert_eq!(requests(&drain_actions(&mut s)).len(), 12);
}

/// We are node 100 of site dc1 with one same-site neighbour (1) and one remote holder of all 40
/// chunks (9, in dc2).
fn one_neighbour_one_remote() -> FetchScheduler<u32> {
    let mut s = FetchScheduler::new(cfg(), 40, 9).unwrap();
    s.set_local_peer(t(0), &100);
    s.handle_peer_connected(t(0), 1, info("dc1", 1));
    s.handle_peer_connected(t(0), 9, info("dc2", 30));
    s.handle_peer_have(t(0), &9, &full(40));
    s
}

#[test]
fn demand_waits_briefly_for_a_neighbours_copy() {
    let mut s = one_neighbour_one_remote();
    let theirs = (0..40).find(|&i| site_owner(100, &[1], i) == 1).unwrap();
    let other = (0..40)
        .find(|&i| i != theirs && site_owner(100, &[1], i) == 1)
        .unwrap();
    let ours = (0..40).find(|&i| site_owner(100, &[1], i) == 100).unwrap();
    // A chunk assigned to us crosses the WAN at once.
    s.handle_want(t(0), ours, Priority::Demand).unwrap();
    assert_eq!(
        requests(&drain_actions(&mut s)),
        vec![(9, Priority::Demand, ours)]
    );
    // A blocked VM waits only `demand_assign_wait` for an assignment nobody has announced...
    s.handle_want(t(0), other, Priority::Demand).unwrap();
    assert!(requests(&drain_actions(&mut s)).is_empty());
    assert!(requests(&advance(&mut s, t(4))).is_empty());
    assert_eq!(
        requests(&advance(&mut s, t(5))),
        vec![(9, Priority::Demand, other)],
        "the assignee announced nothing within demand_assign_wait"
    );
    // ...but waits for an announced fetch, briefly.
    s.handle_peer_fetching(t(0), &1, &[theirs]);
    s.handle_want(t(0), theirs, Priority::Demand).unwrap();
    assert!(
        requests(&drain_actions(&mut s)).is_empty(),
        "peer 1 is fetching it"
    );
    assert!(requests(&advance(&mut s, t(499))).is_empty());
    assert_eq!(
        requests(&advance(&mut s, t(500))),
        vec![(9, Priority::Demand, theirs)],
        "a blocked VM waits at most demand_local_wait"
    );
}

/// A flash crowd: the assignee reads the same block a moment later and announces its fetch within
/// `demand_assign_wait`; we then wait for its copy instead of crossing the WAN as well.
#[test]
fn demand_flash_crowd_waits_for_the_assignees_announcement() {
    let mut s = one_neighbour_one_remote();
    let theirs = (0..40).find(|&i| site_owner(100, &[1], i) == 1).unwrap();
    s.handle_want(t(10), theirs, Priority::Demand).unwrap();
    assert!(requests(&advance(&mut s, t(13))).is_empty());
    s.handle_peer_fetching(t(13), &1, &[theirs]);
    assert!(
        requests(&advance(&mut s, t(300))).is_empty(),
        "the assignee announced its fetch: wait for its copy"
    );
    s.handle_peer_have_update(t(300), &1, &[theirs]);
    assert_eq!(
        requests(&drain_actions(&mut s)),
        vec![(1, Priority::Demand, theirs)],
        "fetched inside the site"
    );
}

#[test]
fn window_grows_with_the_bandwidth_delay_product() {
    let config = Config {
        chunk_bytes: 1 << 20,
        ..cfg()
    };
    let mut s = FetchScheduler::new(config, 400, 9).unwrap();
    s.handle_peer_connected(t(0), 1, info("dc2", 165));
    s.handle_peer_connected(t(0), 2, info("dc3", 1));
    s.handle_peer_have(t(0), &1, &full(400));
    s.handle_want_many(t(0), 0..200, Priority::Background)
        .unwrap();
    drain_actions(&mut s);
    // 250 MB/s x 165 ms = 41 MB = 40 chunks of 1 MiB, 4 of them kept for Demand.
    assert_eq!(s.peer_in_flight(&1), 36);
    s.handle_peer_have(t(0), &2, &full(400));
    drain_actions(&mut s);
    assert_eq!(
        s.peer_in_flight(&2),
        12,
        "a near peer keeps the minimum of 16"
    );
    // A new RTT estimate resizes the window.
    s.handle_rtt(t(1), &2, Duration::from_millis(100));
    drain_actions(&mut s);
    assert_eq!(s.peer_in_flight(&2), 20);
}

// --------------------------------------------------------------------------------------------------
// Property tests: the scheduler in virtual time against random peers.
// --------------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct SimPeer {
    site: u8,
    rtt_ms: u64,
    have: Vec<bool>,
    behaviour: Behaviour,
    /// Disconnects at this virtual millisecond (and reconnects 2 s later), if set.
    flap_at: Option<u64>,
    /// Announces itself as an origin (a source server).
    origin: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    Honest,
    Corrupt,
    /// Never answers.
    Dead,
    /// A busy server: answers its requests one at a time, [`SLOW_SERVICE_MS`] each, in arrival
    /// order (its queue makes later requests wait far longer than the request timeout).
    Slow,
    /// Honest, but refuses the first Demand request for each chunk with `Fanout`, as a server
    /// whose copies of that chunk are all on their way to others does.
    Relaying,
}

/// The scheduler's own id in the property tests (peers are 0..7).
const SELF_ID: u32 = 1_000;

/// Service time of one chunk at a [`Behaviour::Slow`] peer.
const SLOW_SERVICE_MS: u64 = 1_500;

#[derive(Debug, Clone)]
struct Scenario {
    chunks: u32,
    peers: Vec<SimPeer>,
    /// (at ms, index, priority)
    wants: Vec<(u64, u32, Priority)>,
    seed: u64,
    max_in_flight: u32,
    /// Whether the scheduler knows its own id (per-site assignment of outside fetches on).
    know_self: bool,
    /// `Config::chunk_bytes` (0: no bandwidth-delay window).
    chunk_bytes: u32,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        1u32..48,
        1usize..7,
        any::<u64>(),
        2u32..6,
        any::<bool>(),
        prop_oneof![Just(0u32), Just(65_536u32), Just(1 << 20)],
    )
        .prop_flat_map(|(chunks, npeers, seed, max_in_flight, know_self, chunk_bytes)| {
        let peer = (
            0u8..3,
            1u64..200,
            proptest::collection::vec(any::<bool>(), chunks as usize),
            prop_oneof![6 => Just(Behaviour::Honest), 1 => Just(Behaviour::Corrupt), 1 => Just(Behaviour::Dead), 2 => Just(Behaviour::Slow), 2 => Just(Behaviour::Relaying)],
            proptest::option::weighted(0.3, 0u64..20_000),
            proptest::bool::weighted(0.15),
        )
            .prop_map(|(site, rtt_ms, have, behaviour, flap_at, origin)| SimPeer {
                site,
                rtt_ms,
                have,
                behaviour,
                flap_at,
                origin,
            });
        let want = (0u64..5_000, 0..chunks, prop_oneof![Just(Priority::Demand), Just(Priority::Background)]);
        (
            proptest::collection::vec(peer, npeers),
            proptest::collection::vec(want, 1..40),
        )
            .prop_map(move |(peers, wants)| Scenario {
                chunks,
                peers,
                wants,
                seed,
                max_in_flight,
                know_self,
                chunk_bytes,
            })
    })
}

/// Simulated events in time order (ties in insertion order).
#[derive(Debug, Default)]
struct SimQueue {
    queue: BTreeSet<(u64, usize)>,
    events: Vec<Option<SimEvent>>,
}

impl SimQueue {
    fn push(&mut self, at: u64, e: SimEvent) {
        self.queue.insert((at, self.events.len()));
        self.events.push(Some(e));
    }

    fn next_at(&self) -> Option<u64> {
        self.queue.first().map(|e| e.0)
    }

    fn pop(&mut self) -> SimEvent {
        let (_, id) = self.queue.pop_first().unwrap();
        self.events[id].take().unwrap()
    }
}

#[derive(Debug, PartialEq, Eq)]
enum SimEvent {
    Want(u32, Priority),
    /// A response from a peer for a request (peer, index, connection epoch).
    Response(u32, u32, u32),
    /// A slow response's bytes have been arriving for `ARRIVING_REPORT_AFTER` (peer, index,
    /// connection epoch).
    Arriving(u32, u32, u32),
    /// A `Fanout` refusal (peer, index, connection epoch).
    Fanout(u32, u32, u32),
    Disconnect(u32),
    Reconnect(u32),
}

/// Everything observable about one run, for the determinism check.
#[derive(Debug, PartialEq, Eq, Default)]
struct Trace {
    actions: Vec<(u64, Action<u32>)>,
    events: Vec<(u64, Event<u32>)>,
    delivered: Vec<(u64, u32)>,
}

fn site_name(site: u8) -> String {
    format!("dc{}", site + 1)
}

/// Runs a scenario to quiescence, checking the invariants after every step. Returns the trace.
fn run(sc: &Scenario) -> Result<Trace, TestCaseError> {
    let config = Config {
        local_site: "dc1".into(),
        max_in_flight_per_peer: sc.max_in_flight,
        demand_reserved_slots: 1,
        chunk_bytes: sc.chunk_bytes,
        ..Config::default()
    };
    let mut s = FetchScheduler::<u32>::new(config.clone(), sc.chunks, sc.seed).unwrap();
    if sc.know_self {
        s.set_local_peer(t(0), &SELF_ID);
    }
    // When each Slow peer is free to serve its next request.
    let mut slow_free_at = vec![0u64; sc.peers.len()];
    // When each outstanding request was sent, by (peer, index).
    let mut sent_at: BTreeMap<(u32, u32), u64> = BTreeMap::new();
    // When a Relaying peer refused a chunk with `Fanout`, by (peer, index).
    let mut refused_at: BTreeMap<(u32, u32), u64> = BTreeMap::new();
    let mut queue = SimQueue::default();
    let mut connected = vec![false; sc.peers.len()];
    let mut epoch = vec![0u32; sc.peers.len()];
    let mut trace = Trace::default();
    let mut ever_wanted = BTreeSet::new();
    let mut demand_wanted_at: BTreeMap<u32, u64> = BTreeMap::new();
    let mut delivered = BTreeSet::new();
    let mut failed = BTreeSet::new();
    let mut banned = BTreeSet::new();

    for (i, p) in sc.peers.iter().enumerate() {
        queue.push(0, SimEvent::Reconnect(i as u32));
        if let Some(at) = p.flap_at {
            queue.push(at, SimEvent::Disconnect(i as u32));
            queue.push(at + 2_000, SimEvent::Reconnect(i as u32));
        }
    }
    for &(at, index, priority) in &sc.wants {
        queue.push(at, SimEvent::Want(index, priority));
    }

    let mut now_ms = 0u64;
    for _step in 0..200_000 {
        let timer = s.poll_timeout().map(|t| t.as_nanos().div_ceil(1_000_000));
        let next_ev = queue.next_at();
        let (at, is_timer) = match (timer, next_ev) {
            (None, None) => break,
            (Some(tm), Some(ev)) if tm <= ev => (tm, true),
            (Some(tm), None) => (tm, true),
            (_, Some(ev)) => (ev, false),
        };
        prop_assert!(at >= now_ms, "time went backwards");
        now_ms = at;
        let now = t(now_ms);
        if now_ms > 600_000 {
            break;
        }
        if is_timer {
            s.handle_timeout(now);
        } else {
            match queue.pop() {
                SimEvent::Want(index, priority) => {
                    if !delivered.contains(&index) {
                        ever_wanted.insert(index);
                        if priority == Priority::Demand {
                            demand_wanted_at.entry(index).or_insert(now_ms);
                        }
                        s.handle_want(now, index, priority).unwrap();
                    }
                }
                SimEvent::Disconnect(p) => {
                    if connected[p as usize] {
                        slow_free_at[p as usize] = 0;
                        connected[p as usize] = false;
                        epoch[p as usize] += 1;
                        s.handle_peer_disconnected(now, &p);
                    }
                }
                SimEvent::Reconnect(p) => {
                    if !connected[p as usize] {
                        connected[p as usize] = true;
                        epoch[p as usize] += 1;
                        let sp = &sc.peers[p as usize];
                        s.handle_peer_connected(
                            now,
                            p,
                            PeerInfo {
                                site: site_name(sp.site),
                                rtt: Some(Duration::from_millis(sp.rtt_ms)),
                                origin: sp.origin,
                            },
                        );
                        let mut have = ChunkBitmap::new(sc.chunks);
                        for (i, &h) in sp.have.iter().enumerate() {
                            if h {
                                have.insert(i as u32);
                            }
                        }
                        s.handle_peer_have(now, &p, &have);
                    }
                }
                SimEvent::Arriving(p, index, ep) => {
                    if connected[p as usize] && epoch[p as usize] == ep {
                        s.handle_chunk_arriving(now, &p, index);
                    }
                }
                SimEvent::Fanout(p, index, ep) => {
                    if connected[p as usize] && epoch[p as usize] == ep {
                        sent_at.remove(&(p, index));
                        refused_at.insert((p, index), now_ms);
                        s.handle_reject(now, &p, index, RejectKind::Fanout);
                    }
                }
                SimEvent::Response(p, index, ep) => {
                    if connected[p as usize] && epoch[p as usize] == ep {
                        sent_at.remove(&(p, index));
                        let outcome = match sc.peers[p as usize].behaviour {
                            Behaviour::Corrupt => ChunkOutcome::Corrupt,
                            _ => ChunkOutcome::Valid,
                        };
                        if s.handle_chunk(now, &p, index, outcome) == Delivery::Accept {
                            prop_assert!(outcome == ChunkOutcome::Valid);
                            prop_assert!(delivered.insert(index), "chunk {index} accepted twice");
                            trace.delivered.push((now_ms, index));
                        }
                    }
                }
            }
        }
        // Drain outputs and check them.
        while let Some(a) = s.poll_action() {
            if let Action::Cancel { peer, indices } = &a {
                for &i in indices {
                    let sent = sent_at.remove(&(*peer, i));
                    // Still wanted after a Cancel: the request timed out (a delivered or failed
                    // want is no longer wanted). A busy server that keeps serving is never timed
                    // out before `request_max_wait`.
                    if s.is_wanted(i) && sc.peers[*peer as usize].behaviour == Behaviour::Slow {
                        let waited = now_ms - sent.unwrap_or(now_ms);
                        prop_assert!(
                            waited >= config.request_max_wait.as_millis() as u64,
                            "request for {i} queued at busy peer {peer} timed out after {waited} ms (seed {})",
                            sc.seed
                        );
                    }
                }
            }
            if let Action::Request {
                peer,
                indices,
                priority,
            } = &a
            {
                for &i in indices {
                    sent_at.entry((*peer, i)).or_insert(now_ms);
                    if *priority == Priority::Background {
                        let p = &s.peers[peer];
                        prop_assert!(
                            model_locality_allows(&s, now, p, i),
                            "Background request for {i} to peer {peer} breaks the locality rules (seed {})",
                            sc.seed
                        );
                    }
                }
                prop_assert!(!banned.contains(peer), "request to banned peer {peer}");
                prop_assert!(
                    connected[*peer as usize],
                    "request to disconnected peer {peer}"
                );
                let sp = &sc.peers[*peer as usize];
                for &i in indices {
                    prop_assert!(
                        sp.have[i as usize],
                        "peer {peer} asked for chunk {i} it lacks"
                    );
                    if let Some(&at) = refused_at.get(&(*peer, i)) {
                        let waited = now_ms - at;
                        prop_assert!(
                            waited >= config.relay_retry.as_millis() as u64,
                            "peer {peer} asked again for {i} {waited} ms after its Fanout refusal (seed {})",
                            sc.seed
                        );
                    }
                    let refuse = sp.behaviour == Behaviour::Relaying
                        && *priority == Priority::Demand
                        && !refused_at.contains_key(&(*peer, i));
                    match sp.behaviour {
                        Behaviour::Dead => {}
                        Behaviour::Relaying if refuse => queue.push(
                            now_ms + sp.rtt_ms,
                            SimEvent::Fanout(*peer, i, epoch[*peer as usize]),
                        ),
                        Behaviour::Slow => {
                            let p = *peer as usize;
                            let start = slow_free_at[p].max(now_ms + sp.rtt_ms / 2);
                            slow_free_at[p] = start + SLOW_SERVICE_MS;
                            // The chunk takes SLOW_SERVICE_MS to arrive: the caller reports it
                            // as arriving on the way, as the node's lanes do.
                            queue.push(
                                start + ARRIVING_REPORT_AFTER.as_millis() as u64 + sp.rtt_ms / 2,
                                SimEvent::Arriving(*peer, i, epoch[*peer as usize]),
                            );
                            queue.push(
                                start + SLOW_SERVICE_MS + sp.rtt_ms / 2,
                                SimEvent::Response(*peer, i, epoch[*peer as usize]),
                            );
                        }
                        Behaviour::Honest | Behaviour::Corrupt | Behaviour::Relaying => queue.push(
                            now_ms + sp.rtt_ms,
                            SimEvent::Response(*peer, i, epoch[*peer as usize]),
                        ),
                    }
                }
            }
            trace.actions.push((now_ms, a));
        }
        while let Some(e) = s.poll_event() {
            match &e {
                Event::PeerBanned { peer } => {
                    prop_assert_eq!(sc.peers[*peer as usize].behaviour, Behaviour::Corrupt);
                    banned.insert(*peer);
                }
                Event::WantFailed { index, .. } => {
                    failed.insert(*index);
                }
                Event::NoSource { .. } => {}
            }
            trace.events.push((now_ms, e));
        }
        check_invariants(&s, &config, sc, &connected, &banned, now)?;
    }

    // Liveness: every wanted chunk that some honest peer holds and that is not a failed Demand want
    // was delivered. Honest holders are connected at the end (flapping peers reconnect).
    for &index in &ever_wanted {
        let honest_holder = sc.peers.iter().any(|p| {
            matches!(p.behaviour, Behaviour::Honest | Behaviour::Relaying) && p.have[index as usize]
        });
        if honest_holder {
            prop_assert!(
                delivered.contains(&index) || failed.contains(&index),
                "chunk {index} held by an honest peer was never delivered"
            );
            if failed.contains(&index) {
                // A Demand want may only fail if honest holders were unreachable for its whole
                // deadline: here that means it was wanted while they were all flapping or dead.
                let since = demand_wanted_at.get(&index).copied().unwrap_or(0);
                prop_assert!(
                    sc.peers
                        .iter()
                        .any(|p| p.flap_at.is_some() || p.behaviour == Behaviour::Dead),
                    "demand want {index} (since {since} ms) failed although honest peers were always up"
                );
            }
        }
    }
    Ok(trace)
}

/// The locality rules, restated from the scheduler's state without its helpers: may `p` be asked
/// for `index` now?
fn model_locality_allows(s: &FetchScheduler<u32>, now: Instant, p: &Peer, index: u32) -> bool {
    if p.same_site {
        return true;
    }
    let members = || s.peers.values().filter(|q| q.same_site && !q.suspect);
    if members().any(|q| q.have.contains(index)) {
        return false;
    }
    let Some(w) = s.wants[index as usize].as_ref() else {
        return true;
    };
    let announced = s.local_pending[index as usize] > 0;
    let assigned_elsewhere = s.local_key.is_some_and(|me| {
        let mine = site_score(me, index);
        members().any(|q| site_score(q.key, index) >= mine)
    });
    match w.priority {
        Priority::Demand => {
            !(now < w.wan_after
                && (announced || (assigned_elsewhere && w.assign_after.is_some_and(|t| now < t))))
        }
        Priority::Background => !(announced || (assigned_elsewhere && now < w.wan_after)),
    }
}

fn check_invariants(
    s: &FetchScheduler<u32>,
    config: &Config,
    sc: &Scenario,
    connected: &[bool],
    banned: &BTreeSet<u32>,
    now: Instant,
) -> Result<(), TestCaseError> {
    for (id, p) in &s.peers {
        prop_assert!(!banned.contains(id), "banned peer {id} still tracked");
        prop_assert!(connected[*id as usize]);
        let sp = &sc.peers[*id as usize];
        prop_assert_eq!(
            p.same_site,
            site_name(sp.site) == config.local_site && !sp.origin,
            "an origin never counts as same-site"
        );
        // The window: the configured minimum, grown to the bandwidth-delay product, capped.
        let bdp = if config.chunk_bytes == 0 {
            0
        } else {
            (config.peer_rate_target as f64 * sp.rtt_ms as f64
                / 1000.0
                / f64::from(config.chunk_bytes))
            .ceil() as u32
        };
        prop_assert_eq!(
            p.limit,
            bdp.min(MAX_WINDOW).max(config.max_in_flight_per_peer)
        );
        prop_assert!(p.in_flight() <= p.limit, "peer {id} over its limit");
        prop_assert!(
            p.in_flight_background <= p.limit - config.demand_reserved_slots,
            "background used reserved slots"
        );
        let counted = s.in_flight.keys().filter(|(q, _)| q == id).count() as u32;
        prop_assert_eq!(counted, p.in_flight());
    }
    // A queued Demand want has no peer that could take it now (checked independently of
    // `best_source`): it never waits behind Background work or idle slots.
    for &(_, index) in &s.demand_queue {
        for (id, p) in &s.peers {
            let capacity = if p.cooldown_until == Instant::MAX {
                0
            } else if p.cooldown_until > now {
                1
            } else {
                p.limit
            };
            // Refused by this peer, or by one scoring at least as high for us (the relay bar).
            let refused = s.wants[index as usize].as_ref().is_some_and(|w| {
                let live = w.relayed.iter().filter(|(_, until, _)| now < *until);
                let mine = relay_score(s.local_key.unwrap_or(0), p.key, index);
                live.clone().any(|(q, _, _)| q == id)
                    || live
                        .map(|(_, _, score)| *score)
                        .max()
                        .is_some_and(|bar| mine <= bar)
            });
            let could = p.have.contains(index)
                && p.in_flight() < capacity
                && model_locality_allows(s, now, p, index)
                && !refused;
            prop_assert!(
                !could,
                "demand want {index} queued while peer {id} could serve it"
            );
        }
    }
    // Queue membership is consistent.
    for index in 0..sc.chunks {
        let w = s.wants[index as usize].as_ref();
        prop_assert_eq!(w.is_some(), s.wanted.contains(index));
        if let Some(w) = w {
            let queued_bg = w.bg_key.is_some();
            let queued_demand = w
                .demand_since
                .is_some_and(|t| s.demand_queue.contains(&(t, index)));
            let in_flight = !w.requested_from.is_empty();
            prop_assert_eq!(
                u8::from(queued_bg) + u8::from(queued_demand) + u8::from(in_flight),
                1,
                "chunk {} must be in exactly one of bg queue / demand queue / in flight",
                index
            );
            prop_assert_eq!(queued_bg, s.bg_unassigned.contains(index));
            prop_assert!(
                w.requested_from.len() <= 2,
                "chunk {} requested from {} peers at once (hedge and endgame allow 2)",
                index,
                w.requested_from.len()
            );
        }
        let avail = s.peers.values().filter(|p| p.have.contains(index)).count() as u32;
        prop_assert_eq!(s.avail[index as usize], avail);
        let local = s
            .peers
            .values()
            .filter(|p| p.same_site && !p.suspect && p.have.contains(index))
            .count() as u32;
        prop_assert_eq!(s.local_avail[index as usize], local);
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn scheduler_delivers_safely_and_deterministically(sc in scenario()) {
        let first = run(&sc)?;
        let second = run(&sc)?;
        prop_assert!(first == second, "same seed, different run (seed {})", sc.seed);
    }
}

// ------------------------------------------------------------------------------------------------
// Site gateways
// ------------------------------------------------------------------------------------------------

/// Chunks of `0..n` requested from remote peer 9 by `s` until `until`, each delivered at once.
fn outside_fetches(s: &mut FetchScheduler<u32>, from: Instant, until: Instant) -> BTreeSet<u32> {
    let mut got = BTreeSet::new();
    let mut now = from;
    loop {
        let fresh: Vec<u32> = requests(&advance(s, now))
            .into_iter()
            .filter(|r| r.0 == 9)
            .map(|r| r.2)
            .collect();
        for &i in &fresh {
            got.insert(i);
            s.handle_chunk(now, &9, i, ChunkOutcome::Valid);
        }
        if fresh.is_empty() {
            match s.poll_timeout() {
                Some(at) if at <= until => now = at,
                _ => return got,
            }
        }
    }
}

/// We (100) with `same_site` peers connected in our site (dc1), peer 9 in dc2 holding all `n`
/// chunks, and `gateways` named as the site's gateways.
fn with_gateways(n: u32, same_site: &[u32], gateways: &[u32]) -> FetchScheduler<u32> {
    let mut s = FetchScheduler::new(cfg(), n, 9).unwrap();
    s.set_local_peer(t(0), &100);
    for &p in same_site {
        s.handle_peer_connected(t(0), p, info("dc1", 1));
    }
    s.handle_peer_connected(t(0), 9, info("dc2", 30));
    s.handle_peer_have(t(0), &9, &full(n));
    s.set_site_gateways(t(0), gateways);
    s
}

#[test]
fn only_the_site_gateways_fetch_from_outside() {
    let n = 60;
    // We (100) are not a gateway; our connected same-site peers are not either.
    let mut s = with_gateways(n, &[1, 2, 3], &[50, 51]);
    assert!(!s.is_site_gateway());
    s.handle_want_many(t(0), 0..n, Priority::Background)
        .unwrap();
    assert!(
        outside_fetches(&mut s, t(0), t(9_000)).is_empty(),
        "a node that is not a gateway waits for the gateways' copies, connected or not"
    );
    // A gateway's chunk arrives at it: fetched inside the site.
    s.handle_peer_connected(t(9_000), 50, info("dc1", 1));
    let theirs = (0..n).find(|&i| site_owner(50, &[51], i) == 50).unwrap();
    s.handle_peer_have_update(t(9_000), &50, &[theirs]);
    assert!(requests(&drain_actions(&mut s)).contains(&(50, Priority::Background, theirs)));
    // The wait is still bounded: after `site_assign_wait` we fetch the rest ourselves.
    assert!(!outside_fetches(&mut s, t(9_001), t(10_001)).is_empty());
}

#[test]
fn a_gateway_fetches_its_share_whoever_else_it_sees() {
    let n = 60;
    // Many connected same-site peers that would win the plain rendezvous for most chunks.
    let same_site: Vec<u32> = (1..30).collect();
    let mut s = with_gateways(n, &same_site, &[100, 50]);
    assert!(s.is_site_gateway());
    s.handle_want_many(t(0), 0..n, Priority::Background)
        .unwrap();
    let ours: BTreeSet<u32> = (0..n)
        .filter(|&i| site_owner(100, &[50], i) == 100)
        .collect();
    assert!(ours.len() > 10, "{ours:?}");
    assert_eq!(outside_fetches(&mut s, t(0), t(9_000)), ours);
    // Gateway 50 connects, then its connection is lost: its chunks become ours (the only live
    // gateway left), long before the assignment wait would have run out.
    s.handle_peer_connected(t(9_000), 50, info("dc1", 1));
    s.handle_peer_disconnected(t(9_001), &50);
    let rest = outside_fetches(&mut s, t(9_001), t(9_002));
    assert_eq!(rest.len(), n as usize - ours.len(), "{rest:?}");
}

#[test]
fn a_suspect_or_lost_gateway_hands_its_chunks_on_and_none_left_falls_back() {
    let n = 60;
    let mut s = with_gateways(n, &[1, 50], &[50]);
    s.handle_want_many(t(0), 0..n, Priority::Background)
        .unwrap();
    assert!(outside_fetches(&mut s, t(0), t(100)).is_empty());
    // The only gateway goes: the plain rendezvous over connected same-site peers (us and 1) again.
    s.handle_peer_disconnected(t(100), &50);
    let ours: BTreeSet<u32> = (0..n)
        .filter(|&i| site_owner(100, &[1], i) == 100)
        .collect();
    assert_eq!(outside_fetches(&mut s, t(100), t(101)), ours);
    // An empty list also returns to it (nothing more to fetch now: ours are all here).
    s.set_site_gateways(t(200), &[]);
    assert!(!s.is_site_gateway());
}

proptest! {
    #![proptest_config(config(48))]

    /// A site whose nodes each see a random part of it, and all know the site's full membership's
    /// best gateways (what the per-site DHT key answers): before the assignment waits run out, each
    /// chunk is fetched from outside the site exactly once, by one gateway, and every chunk is.
    #[test]
    fn with_gateways_each_chunk_enters_the_site_once(
        members in 2u32..40,
        k in 1usize..6,
        chunks in 1u32..80,
        seed in any::<u64>(),
    ) {
        let ids: Vec<u32> = (1000..1000 + members).collect();
        let scope = seed.to_le_bytes();
        let gateways = crate::site::top_gateways(
            ids.iter().map(|&m| (crate::site::gateway_rank(&scope, &m.to_le_bytes()), m)),
            k,
        );
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut entered: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for &me in &ids {
            let mut s = FetchScheduler::new(cfg(), chunks, seed ^ u64::from(me)).unwrap();
            s.set_local_peer(t(0), &me);
            // A partial view: each other member is connected with probability 1/4.
            for &other in &ids {
                if other != me && rng.random_range(0..4) == 0 {
                    s.handle_peer_connected(t(0), other, info("dc1", 1));
                }
            }
            s.handle_peer_connected(t(0), 9, info("dc2", 30));
            s.handle_peer_have(t(0), &9, &full(chunks));
            s.set_site_gateways(t(0), &gateways);
            s.handle_want_many(t(0), 0..chunks, Priority::Background).unwrap();
            for i in outside_fetches(&mut s, t(0), t(9_000)) {
                entered.entry(i).or_default().push(me);
            }
        }
        prop_assert_eq!(entered.len(), chunks as usize, "every chunk enters (seed {})", seed);
        for (i, by) in &entered {
            prop_assert!(by.len() == 1 && gateways.contains(&by[0]),
                "chunk {} entered via {:?}, gateways {:?} (seed {})", i, by, gateways, seed);
        }
    }
}

#[test]
fn a_blocked_node_tells_its_gateway_which_fetches_at_once() {
    let n = 60;
    // Requester side: we (100) are not a gateway; gateway 50 is connected.
    let mut s = with_gateways(n, &[50], &[50, 51]);
    let mine = (0..n).find(|&i| site_owner(50, &[51], i) == 50).unwrap();
    let other = (0..n).find(|&i| site_owner(50, &[51], i) == 51).unwrap();
    s.handle_want(t(1), mine, Priority::Demand).unwrap();
    s.handle_want(t(1), other, Priority::Demand).unwrap();
    let actions = drain_actions(&mut s);
    assert_eq!(
        actions,
        vec![Action::Need {
            peer: 50,
            priority: Priority::Demand,
            indices: vec![mine]
        }],
        "only the connected gateway is told, once, and nothing crosses the WAN yet"
    );
    // Its announcement arrives: we wait for its copy instead of fetching from outside.
    s.handle_peer_fetching(t(2), &50, &[mine]);
    let later = requests(&advance(&mut s, t(100)));
    assert!(later.iter().all(|r| r.2 != mine), "{later:?}");
    // Gateway 51 (not connected, so not told) never announced: after the assignment wait we
    // fetch that one ourselves.
    assert!(later.contains(&(9, Priority::Demand, other)), "{later:?}");
    // The gateway's copy is waited for beyond `demand_local_wait`, while its announcement holds.
    let still = requests(&advance(&mut s, t(3_000)));
    assert!(still.iter().all(|r| r.2 != mine), "{still:?}");
    let expired = requests(&advance(&mut s, t(4_100)));
    assert!(
        expired.contains(&(9, Priority::Demand, mine)),
        "{expired:?}"
    );

    // Gateway side: we (100) are the gateway of `ours`; 50 is the other gateway.
    let mut g = FetchScheduler::new(cfg(), n, 9).unwrap();
    g.set_local_peer(t(0), &100);
    g.handle_peer_connected(t(0), 1, info("dc1", 1));
    g.handle_peer_connected(t(0), 7, info("dc2", 1));
    g.handle_peer_connected(t(0), 9, info("dc2", 30));
    g.handle_peer_have(t(0), &9, &full(n));
    g.set_site_gateways(t(0), &[100, 50]);
    let ours = (0..n).find(|&i| site_owner(100, &[50], i) == 100).unwrap();
    let theirs = (0..n).find(|&i| site_owner(100, &[50], i) == 50).unwrap();
    assert!(drain_actions(&mut g).is_empty());
    // A peer of another site is not listened to.
    g.handle_peer_need(t(1), &7, Priority::Demand, &[ours]);
    assert!(drain_actions(&mut g).is_empty());
    g.handle_peer_need(t(1), &1, Priority::Demand, &[ours, theirs, n + 5]);
    let actions = drain_actions(&mut g);
    assert_eq!(requests(&actions), vec![(9, Priority::Demand, ours)]);
    assert!(actions.contains(&Action::AnnounceFetching {
        peer: 1,
        indices: vec![ours]
    }));
    // A node that is not a gateway ignores `Need`.
    let mut plain = one_neighbour_one_remote();
    plain.handle_peer_need(t(1), &1, Priority::Demand, &[ours]);
    assert!(drain_actions(&mut plain).is_empty());
}

#[test]
fn an_unreachable_gateway_hands_its_chunks_on_at_once() {
    let n = 60;
    let mut s = with_gateways(n, &[], &[100, 50]);
    s.handle_want_many(t(0), 0..n, Priority::Background)
        .unwrap();
    let ours: BTreeSet<u32> = (0..n)
        .filter(|&i| site_owner(100, &[50], i) == 100)
        .collect();
    assert_eq!(outside_fetches(&mut s, t(0), t(1_000)), ours);
    // Dialling gateway 50 failed: its chunks are ours now, long before `site_assign_wait`.
    s.handle_peer_unreachable(t(1_000), &50);
    let rest = outside_fetches(&mut s, t(1_000), t(1_001));
    assert_eq!(rest.len(), n as usize - ours.len(), "{rest:?}");
    // A connected peer is not marked down by a failed extra dial.
    let mut c = FetchScheduler::new(cfg(), n, 9).unwrap();
    c.set_local_peer(t(0), &100);
    c.handle_peer_connected(t(0), 50, info("dc1", 1));
    c.set_site_gateways(t(0), &[100, 50]);
    c.handle_peer_unreachable(t(1), &50);
    assert!(c.gateways_down.is_empty());
}

#[test]
fn a_want_blocked_before_start_up_waits_for_the_gateway_it_told() {
    // A VM reads at t = 0, before any peer is known; the gateways are named at 100 ms and the
    // gateway connects then; the remote holder connects 30 ms later, to us and to the gateway.
    let n = 60;
    let mut s = FetchScheduler::new(cfg(), n, 9).unwrap();
    s.set_local_peer(t(0), &100);
    let chunk = (0..n).find(|&i| site_owner(50, &[51], i) == 50).unwrap();
    s.handle_want(t(0), chunk, Priority::Demand).unwrap();
    assert!(drain_actions(&mut s).is_empty());
    s.set_site_gateways(t(100), &[50, 51]);
    s.handle_peer_connected(t(100), 50, info("dc1", 1));
    assert_eq!(
        drain_actions(&mut s),
        vec![Action::Need {
            peer: 50,
            priority: Priority::Demand,
            indices: vec![chunk]
        }]
    );
    s.handle_peer_connected(t(130), 9, info("dc2", 30));
    s.handle_peer_have(t(130), &9, &full(n));
    assert!(
        requests(&drain_actions(&mut s)).is_empty(),
        "the assignment wait runs from the Need, not from the read"
    );
    s.handle_peer_fetching(t(131), &50, &[chunk]);
    assert!(requests(&advance(&mut s, t(2_000))).is_empty());
}

#[test]
fn a_background_want_told_to_its_live_gateway_waits_for_its_copy_however_long() {
    let n = 60;
    let mut s = with_gateways(n, &[50], &[50]);
    s.handle_want_many(t(0), 0..n, Priority::Background)
        .unwrap();
    let actions = drain_actions(&mut s);
    let told: Vec<u32> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Need {
                peer: 50,
                priority: Priority::Background,
                indices,
            } => Some(indices.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(
        told.len(),
        n as usize,
        "every want is told to the one gateway"
    );
    // Far past `site_assign_wait` (a slow origin): still nothing crosses the WAN from here.
    assert!(outside_fetches(&mut s, t(0), t(60_000)).is_empty());
    // The gateway goes: the wants are ours to fetch at once.
    s.handle_peer_disconnected(t(60_000), &50);
    assert_eq!(
        outside_fetches(&mut s, t(60_000), t(60_001)).len(),
        n as usize
    );
}

/// A holder outside the site that appears while a blocked VM waits for its site's copy is not
/// asked during the wait (its announcement alone changes nothing), but is the moment the wait ends.
#[test]
fn an_outside_holder_that_appears_during_the_wait_is_asked_when_it_ends() {
    let mut s = FetchScheduler::new(cfg(), 40, 9).unwrap();
    s.set_local_peer(t(0), &100);
    s.handle_peer_connected(t(0), 1, info("dc1", 1));
    s.handle_peer_connected(t(0), 9, info("dc2", 30));
    let theirs = (0..40).find(|&i| site_owner(100, &[1], i) == 1).unwrap();
    s.handle_peer_fetching(t(0), &1, &[theirs]);
    s.handle_want(t(0), theirs, Priority::Demand).unwrap();
    assert!(requests(&drain_actions(&mut s)).is_empty());
    s.handle_peer_have_update(t(100), &9, &[theirs]);
    assert!(
        requests(&drain_actions(&mut s)).is_empty(),
        "still waiting for the site's copy"
    );
    assert!(requests(&advance(&mut s, t(499))).is_empty());
    assert_eq!(
        requests(&advance(&mut s, t(500))),
        vec![(9, Priority::Demand, theirs)],
        "the wait ended: the outside holder is asked without any further announcement"
    );
}

/// A holder without a free slot when it announces the chunk is asked once it frees one.
#[test]
fn a_holder_that_was_full_when_it_announced_is_asked_when_a_slot_frees() {
    let config = Config {
        max_in_flight_per_peer: 1,
        demand_reserved_slots: 0,
        ..cfg()
    };
    let mut s = FetchScheduler::new(config, 8, 5).unwrap();
    s.handle_peer_connected(t(0), 1, info("dc1", 1));
    s.handle_peer_have(t(0), &1, &bitmap(8, &[0]));
    s.handle_want(t(0), 0, Priority::Demand).unwrap();
    assert_eq!(
        requests(&drain_actions(&mut s)),
        vec![(1, Priority::Demand, 0)]
    );
    s.handle_want(t(1), 1, Priority::Demand).unwrap();
    assert!(requests(&drain_actions(&mut s)).is_empty(), "no holder yet");
    s.handle_peer_have_update(t(2), &1, &[1]);
    assert!(
        requests(&drain_actions(&mut s)).is_empty(),
        "peer 1's only slot is taken"
    );
    assert_eq!(
        s.handle_chunk(t(3), &1, 0, ChunkOutcome::Valid),
        Delivery::Accept
    );
    assert_eq!(
        requests(&drain_actions(&mut s)),
        vec![(1, Priority::Demand, 1)]
    );
}

/// A Background fan-out refusal (a server with `background_fanout`) chokes that peer's Background
/// for `relay_retry`: the freed slot is not refilled there at once (the next chunk of a crowd's
/// common order would be refused too), another holder takes the chunk, and the peer is asked
/// again when the choke ends.
#[test]
fn a_background_fanout_refusal_chokes_the_peer_for_relay_retry() {
    let mut s = FetchScheduler::new(cfg(), 64, 5).unwrap();
    s.handle_peer_connected(t(0), 1, info("dc1", 1));
    s.handle_peer_have(t(0), &1, &full(64));
    s.handle_want_many(t(0), 0..64, Priority::Background)
        .unwrap();
    let first = requests(&drain_actions(&mut s));
    assert!(!first.is_empty());
    let refused = first[0].2;
    s.handle_reject(t(10), &1, refused, RejectKind::Fanout);
    assert!(
        requests(&drain_actions(&mut s)).is_empty(),
        "peer 1 is choked for Background"
    );
    // Another holder comes: it gets Background work, the refused chunk included.
    s.handle_peer_connected(t(20), 2, info("dc1", 1));
    s.handle_peer_have(t(20), &2, &full(64));
    let to_2 = requests(&drain_actions(&mut s));
    assert!(to_2.iter().all(|r| r.0 == 2), "{to_2:?}");
    assert!(to_2.iter().any(|r| r.2 == refused), "{to_2:?}");
    // The choke ends after relay_retry: peer 1's free slot is filled again.
    assert!(requests(&advance(&mut s, t(109))).is_empty());
    let after = requests(&advance(&mut s, t(111)));
    assert!(
        after.len() == 1 && after[0].0 == 1 && after[0].1 == Priority::Background,
        "{after:?}"
    );
}

#[test]
fn a_refusal_that_has_ended_is_seen_by_the_next_input_before_the_timer() {
    // Peer 1 refuses the only chunk it holds; once relay_retry has passed, any input (here another
    // peer connecting) must ask it again, whether or not the driver's timer fired first.
    let mut s = FetchScheduler::new(cfg(), 4, 5).unwrap();
    s.handle_peer_connected(t(0), 1, info("dc1", 1));
    s.handle_peer_have_update(t(0), &1, &[0]);
    // Chunk 1 has no holder: it stays queued, so peer 1 looks for more work, finds none, and
    // is left out of later passes until something gives it work.
    s.handle_want_many(t(0), 0..2, Priority::Background)
        .unwrap();
    let first = requests(&drain_actions(&mut s));
    assert_eq!(first, vec![(1, Priority::Background, 0)]);
    s.handle_reject(t(10), &1, 0, RejectKind::Fanout);
    assert!(requests(&drain_actions(&mut s)).is_empty());
    s.handle_peer_connected(t(150), 2, info("dc1", 1));
    assert_eq!(
        requests(&drain_actions(&mut s)),
        vec![(1, Priority::Background, 0)]
    );
}
