//! The relay tree's fan-out: to how many peers at once one Demand chunk is sent, chosen from rates
//! this node measures.
//!
//! In a lockstep flash crowd every VM of a site reads the same block within milliseconds. The block
//! spreads as a tree: a holder sends it to `f` peers at a time, each receiver announces it at once
//! (`wire::have_update_delay`) and serves the next ones (`serve` refuses the rest with
//! `Reject { Fanout }`). One generation of that tree takes `f·τ + L`, where
//! - `τ` is the time this node takes to upload one chunk at the rate it actually gets (the `f`
//!   copies share its uplink, so each takes `f·τ`), and
//! - `L` is the hop latency: the receiver's announcement, the next request and the first byte,
//!   about 1.5 round trips.
//!
//! Each generation multiplies the holders by `1 + f`, so reaching `N` peers takes
//! `(f·τ + L) · ln N / ln(1 + f)`. The `f` that minimises `(f·τ + L) / ln(1 + f)` does not depend on
//! `N`, which no node knows: when the upload dominates (a LAN: `τ` = 2.1 ms for a 256 KiB chunk at
//! 1 Gbit/s, `L` = 0.15 ms) it is 1, a pipelined binary tree in which every holder keeps sending;
//! when the round trip dominates it grows (τ = 8.4 ms for 1 MiB at 1 Gbit/s over a 31 ms round
//! trip, `L` = 46.5 ms, gives 5). [`FanoutRule`] computes that `f`, bounded by the configured maximum
//! (`serve::Config::demand_fanout`, which is also the fan-out until a first copy is measured).
//!
//! **What is measured.** `τ` comes from the Demand copies themselves. A copy accepted while `k`
//! Demand copies were on their way (itself included) and announced by its receiver `D` later took
//! `D − L` to cross a link it shared with `k` copies: `τ ≈ (D − L) / k`. Anything else on the uplink
//! (Background uploads, a slow receiver, queueing behind the upload slots) shows up as a larger `τ`,
//! and so as a smaller fan-out, which is what the tree wants: fewer copies that each finish sooner.
//! `L` is 1.5 times the receivers' round-trip time as the driver knows it (the node's ping, the
//! simulator's RTT matrix). Both are moving averages with weight 1/8 for each new sample.
//!
//! Pure arithmetic on what the caller reports: no clock, no I/O.

use std::time::Duration;

/// Weight of a new sample in the moving averages.
const EWMA_WEIGHT: f64 = 1.0 / 8.0;

/// The fan-out rule: measured `τ` and `L`, and the `f` they give. See the module docs.
#[derive(Debug, Clone)]
pub struct FanoutRule {
    max: usize,
    /// Whether measurements choose the fan-out (else it stays `max`).
    adaptive: bool,
    /// Seconds to upload one chunk at the measured rate (`τ`); `None` until a copy is measured.
    chunk_time: Option<f64>,
    /// Hop latency in seconds (`L`); `None` until a round-trip time is known.
    hop_latency: Option<f64>,
    current: usize,
}

impl FanoutRule {
    /// A rule with at most `max` copies of one chunk at once (0: no limit, and nothing measured).
    /// With `adaptive` false the fan-out stays `max` (measurements are still kept, for metrics).
    pub fn new(max: usize, adaptive: bool) -> Self {
        FanoutRule {
            max,
            adaptive,
            chunk_time: None,
            hop_latency: None,
            current: max,
        }
    }

    /// The fan-out to use now: at least 1 and at most the maximum (0 only when there is no limit).
    pub fn fanout(&self) -> usize {
        self.current
    }

    /// The configured maximum.
    pub fn max(&self) -> usize {
        self.max
    }

    /// The measured time to upload one chunk (`τ`), once a copy has been measured.
    pub fn chunk_time(&self) -> Option<Duration> {
        self.chunk_time.map(Duration::from_secs_f64)
    }

    /// The hop latency in use (`L`), once a round-trip time is known.
    pub fn hop_latency(&self) -> Option<Duration> {
        self.hop_latency.map(Duration::from_secs_f64)
    }

    /// A Demand copy ended with its receiver's announcement: it took `took` from acceptance, while
    /// `sharing` Demand copies (itself included) were on their way when it was accepted; `rtt` is
    /// the receiver's round-trip time if known.
    pub fn handle_copy_done(&mut self, took: Duration, sharing: usize, rtt: Option<Duration>) {
        if self.max == 0 {
            return;
        }
        if let Some(rtt) = rtt {
            let l = 1.5 * rtt.as_secs_f64();
            self.hop_latency = Some(ewma(self.hop_latency, l));
        }
        let l = self.hop_latency.unwrap_or(0.0);
        let tau = (took.as_secs_f64() - l).max(0.0) / sharing.max(1) as f64;
        self.chunk_time = Some(ewma(self.chunk_time, tau));
        if self.adaptive {
            self.current = best_fanout(self.chunk_time.unwrap_or(0.0), l, self.max);
        }
    }
}

fn ewma(old: Option<f64>, sample: f64) -> f64 {
    match old {
        None => sample,
        Some(v) => v + EWMA_WEIGHT * (sample - v),
    }
}

/// The `f` in `1..=max` minimising `(f·τ + L) / ln(1 + f)` (the smallest on ties).
pub fn best_fanout(chunk_time: f64, hop_latency: f64, max: usize) -> usize {
    let cost = |f: usize| (f as f64 * chunk_time + hop_latency) / (1.0 + f as f64).ln();
    let mut best = 1;
    let mut best_cost = cost(1);
    for f in 2..=max {
        let c = cost(f);
        if c < best_cost {
            best = f;
            best_cost = c;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn upload_bound_trees_are_binary_and_latency_bound_trees_wide() {
        // VirtMan's LAN: 256 KiB at 1 Gbit/s, 0.1 ms RTT.
        assert_eq!(best_fanout(262_144.0 / 125e6, 0.15e-3, 8), 1);
        // A 31 ms WAN path, 1 MiB at 1 Gbit/s.
        assert_eq!(best_fanout(1_048_576.0 / 125e6, 1.5 * 31e-3, 8), 5);
        // Latency only: as wide as allowed.
        assert_eq!(best_fanout(0.0, 0.01, 6), 6);
        assert_eq!(best_fanout(0.0, 0.0, 6), 1);
    }

    #[test]
    fn the_configured_maximum_holds_until_a_copy_is_measured() {
        let mut r = FanoutRule::new(4, true);
        assert_eq!(r.fanout(), 4);
        // Four copies shared a 1 Gbit/s uplink for a 256 KiB chunk on a 0.1 ms LAN.
        let tau = 262_144.0 / 125e6;
        let took = Duration::from_secs_f64(4.0 * tau + 0.15e-3);
        r.handle_copy_done(took, 4, Some(Duration::from_micros(100)));
        assert_eq!(r.fanout(), 1);
        let measured = r.chunk_time().unwrap().as_secs_f64();
        assert!((measured - tau).abs() < 1e-9, "{measured} vs {tau}");
    }

    #[test]
    fn a_fixed_fanout_is_measured_but_not_changed() {
        let mut r = FanoutRule::new(3, false);
        r.handle_copy_done(
            Duration::from_millis(9),
            3,
            Some(Duration::from_micros(100)),
        );
        assert_eq!(r.fanout(), 3);
        assert!(r.chunk_time().is_some());
    }

    #[test]
    fn no_limit_stays_no_limit() {
        let mut r = FanoutRule::new(0, true);
        r.handle_copy_done(Duration::from_millis(5), 1, Some(Duration::from_millis(1)));
        assert_eq!(r.fanout(), 0);
    }

    proptest! {
        /// Whatever is measured, the fan-out is between 1 and the maximum.
        #[test]
        fn fanout_stays_within_bounds(
            max in 1usize..12,
            samples in proptest::collection::vec((0u64..5_000_000, 1usize..40, proptest::option::of(0u64..500_000)), 0..50),
        ) {
            let mut r = FanoutRule::new(max, true);
            prop_assert_eq!(r.fanout(), max);
            for (took_us, sharing, rtt_us) in samples {
                r.handle_copy_done(
                    Duration::from_micros(took_us),
                    sharing,
                    rtt_us.map(Duration::from_micros),
                );
                prop_assert!((1..=max).contains(&r.fanout()), "{} not in 1..={}", r.fanout(), max);
            }
        }
    }
}
