//! The WAN emulator's queueing model, without I/O (the clock is passed in).
//!
//! Decides, for every IPv4 packet that leaves one emulated site for another, when it is delivered or
//! whether it is dropped. A packet from site `a` to site `b` crosses three stages, as in the
//! simulator's flow model (simulator/README.md):
//! 1. `a`'s WAN uplink: a FIFO served at `uplink` bits per second;
//! 2. the propagation delay, half the configured round-trip time of the pair `(a, b)`;
//! 3. `b`'s WAN downlink: a FIFO served at `downlink` bits per second.
//!
//! Each FIFO is drop-tail: a packet that would wait longer than `queue_limit` behind the packets
//! already queued at that stage is dropped, as a router with a buffer of `queue_limit` x rate bytes
//! would drop it, so TCP/QUIC congestion control sees loss instead of an ever-growing delay.
//! Packets to a site that is not emulated (or that are not IPv4) are dropped and counted.
//!
//! The model keeps one event heap ordered by time (then arrival order), so a downlink serves packets
//! in the order they reach it, whichever uplink they came from.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::Ipv4Addr;
use std::time::Duration;

/// Nanoseconds since an arbitrary origin chosen by the caller (monotonic).
pub type Nanos = u64;

/// How the WAN between sites behaves.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WanConfig {
    /// Round-trip time between site `i` and site `j` (symmetric, zero on the diagonal).
    pub rtt: Vec<Vec<Duration>>,
    /// Each site's WAN uplink in bits per second (`None`: unlimited).
    pub uplink_bps: Option<u64>,
    /// Each site's WAN downlink in bits per second (`None`: unlimited).
    pub downlink_bps: Option<u64>,
    /// The longest a packet may wait in one FIFO before it is dropped instead.
    pub queue_limit: Duration,
}

impl WanConfig {
    /// The number of sites.
    pub fn sites(&self) -> usize {
        self.rtt.len()
    }
}

/// Which site an address belongs to: the testnet gives site `s` the subnet `10.s.0.0/16`.
pub fn site_of(addr: Ipv4Addr) -> Option<usize> {
    let o = addr.octets();
    (o[0] == 10).then_some(usize::from(o[1]))
}

/// Source and destination of an IPv4 packet, if it is one.
pub fn ipv4_endpoints(packet: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr)> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return None;
    }
    let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    Some((src, dst))
}

/// What happened to a packet handed to [`Wan::handle_packet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Queued; it comes out of [`Wan::poll_transmit`] later.
    Queued,
    /// Dropped: the source site's uplink queue is full.
    DroppedUplink,
    /// Not an IPv4 packet between two emulated sites.
    Unroutable,
}

/// Byte and packet counters, per site pair and per stage.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WanStats {
    /// Bytes delivered from site `i` to site `j` (`delivered[i][j]`).
    pub delivered: Vec<Vec<u64>>,
    /// Packets dropped at site `i`'s uplink.
    pub dropped_uplink: Vec<u64>,
    /// Packets dropped at site `j`'s downlink.
    pub dropped_downlink: Vec<u64>,
    /// Packets that were not IPv4 between emulated sites.
    pub unroutable: u64,
}

#[derive(Debug)]
enum Stage {
    /// The packet has crossed the propagation delay and reaches the destination's downlink.
    AtDownlink { from: usize, to: usize },
    /// The packet has left the downlink: hand it back to the kernel.
    Deliver { from: usize, to: usize },
}

#[derive(Debug)]
struct Event {
    at: Nanos,
    seq: u64,
    stage: Stage,
    packet: Vec<u8>,
}

impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Event {}
impl PartialOrd for Event {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Event {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// The emulated WAN: feed it packets, poll it for packets due.
#[derive(Debug)]
pub struct Wan {
    cfg: WanConfig,
    /// When each site's uplink finishes sending what is queued on it.
    uplink_free: Vec<Nanos>,
    /// When each site's downlink finishes sending what is queued on it.
    downlink_free: Vec<Nanos>,
    events: BinaryHeap<Reverse<Event>>,
    seq: u64,
    stats: WanStats,
}

/// Time to serialise `len` bytes at `bps` bits per second, in nanoseconds (rounded up).
fn serialisation(len: usize, bps: Option<u64>) -> Nanos {
    match bps {
        None | Some(0) => 0,
        Some(bps) => {
            let bits = u128::from(len as u64) * 8 * 1_000_000_000;
            bits.div_ceil(u128::from(bps))
                .try_into()
                .unwrap_or(Nanos::MAX)
        }
    }
}

fn nanos(d: Duration) -> Nanos {
    d.as_nanos().try_into().unwrap_or(Nanos::MAX)
}

impl Wan {
    /// A WAN with nothing in flight.
    pub fn new(cfg: WanConfig) -> Wan {
        let n = cfg.sites();
        Wan {
            uplink_free: vec![0; n],
            downlink_free: vec![0; n],
            events: BinaryHeap::new(),
            seq: 0,
            stats: WanStats {
                delivered: vec![vec![0; n]; n],
                dropped_uplink: vec![0; n],
                dropped_downlink: vec![0; n],
                unroutable: 0,
            },
            cfg,
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> &WanStats {
        &self.stats
    }

    /// Packets currently held.
    pub fn in_flight(&self) -> usize {
        self.events.len()
    }

    fn push(&mut self, at: Nanos, stage: Stage, packet: Vec<u8>) {
        self.seq += 1;
        self.events.push(Reverse(Event {
            at,
            seq: self.seq,
            stage,
            packet,
        }));
    }

    /// A packet read from the TUN device at `now`.
    pub fn handle_packet(&mut self, now: Nanos, packet: Vec<u8>) -> Verdict {
        let route = ipv4_endpoints(&packet).and_then(|(src, dst)| {
            let (a, b) = (site_of(src)?, site_of(dst)?);
            (a < self.cfg.sites() && b < self.cfg.sites()).then_some((a, b))
        });
        let Some((from, to)) = route else {
            self.stats.unroutable += 1;
            return Verdict::Unroutable;
        };
        let start = self.uplink_free[from].max(now);
        if start - now > nanos(self.cfg.queue_limit) {
            self.stats.dropped_uplink[from] += 1;
            return Verdict::DroppedUplink;
        }
        let sent = start + serialisation(packet.len(), self.cfg.uplink_bps);
        self.uplink_free[from] = sent;
        let one_way = nanos(self.cfg.rtt[from][to]) / 2;
        self.push(sent + one_way, Stage::AtDownlink { from, to }, packet);
        Verdict::Queued
    }

    /// When [`Wan::poll_transmit`] next has something to do.
    pub fn poll_timeout(&self) -> Option<Nanos> {
        self.events.peek().map(|Reverse(e)| e.at)
    }

    /// The next packet due at `now`, if any, to be written back to the TUN device.
    pub fn poll_transmit(&mut self, now: Nanos) -> Option<Vec<u8>> {
        loop {
            let due = matches!(self.events.peek(), Some(Reverse(e)) if e.at <= now);
            if !due {
                return None;
            }
            let Reverse(event) = self.events.pop()?;
            match event.stage {
                Stage::AtDownlink { from, to } => {
                    // Served in the order packets reach the downlink (heap order), at event time.
                    let start = self.downlink_free[to].max(event.at);
                    if start - event.at > nanos(self.cfg.queue_limit) {
                        self.stats.dropped_downlink[to] += 1;
                        continue;
                    }
                    let done = start + serialisation(event.packet.len(), self.cfg.downlink_bps);
                    self.downlink_free[to] = done;
                    self.push(done, Stage::Deliver { from, to }, event.packet);
                }
                Stage::Deliver { from, to } => {
                    self.stats.delivered[from][to] += event.packet.len() as u64;
                    return Some(event.packet);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn packet(src: [u8; 4], dst: [u8; 4], len: usize, tag: u32) -> Vec<u8> {
        let mut p = vec![0u8; len.max(24)];
        p[0] = 0x45;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p[20..24].copy_from_slice(&tag.to_be_bytes());
        p
    }

    fn tag(p: &[u8]) -> u32 {
        u32::from_be_bytes([p[20], p[21], p[22], p[23]])
    }

    fn cfg(bps: Option<u64>) -> WanConfig {
        let ms = Duration::from_millis;
        WanConfig {
            rtt: vec![
                vec![ms(0), ms(30), ms(100)],
                vec![ms(30), ms(0), ms(60)],
                vec![ms(100), ms(60), ms(0)],
            ],
            uplink_bps: bps,
            downlink_bps: bps,
            queue_limit: ms(50),
        }
    }

    /// Drains everything, returning (time, packet) pairs in delivery order.
    fn drain(wan: &mut Wan) -> Vec<(Nanos, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some(t) = wan.poll_timeout() {
            while let Some(p) = wan.poll_transmit(t) {
                out.push((t, p));
            }
        }
        out
    }

    #[test]
    fn delay_is_half_the_rtt_without_bandwidth_limit() {
        let mut wan = Wan::new(cfg(None));
        assert_eq!(
            wan.handle_packet(1_000, packet([10, 0, 0, 2], [10, 2, 0, 3], 100, 1)),
            Verdict::Queued
        );
        assert_eq!(wan.poll_transmit(1_000 + 49_999_999), None);
        let out = drain(&mut wan);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, 1_000 + 50_000_000);
        assert_eq!(wan.stats().delivered[0][2], 100);
    }

    #[test]
    fn bandwidth_spaces_packets_on_the_uplink_and_downlink() {
        // 8 Mbit/s: a 1000-byte packet takes 1 ms per stage.
        let mut wan = Wan::new(cfg(Some(8_000_000)));
        for i in 0..3 {
            wan.handle_packet(0, packet([10, 0, 0, 2], [10, 1, 0, 2], 1000, i));
        }
        let times: Vec<Nanos> = drain(&mut wan).into_iter().map(|(t, _)| t).collect();
        // Uplink done at 1, 2, 3 ms; +15 ms; downlink adds 1 ms each, no extra queueing.
        assert_eq!(times, vec![17_000_000, 18_000_000, 19_000_000]);
    }

    #[test]
    fn a_full_uplink_drops() {
        let mut wan = Wan::new(cfg(Some(8_000_000)));
        let mut dropped = 0;
        for i in 0..100 {
            if wan.handle_packet(0, packet([10, 0, 0, 2], [10, 1, 0, 2], 1000, i))
                == Verdict::DroppedUplink
            {
                dropped += 1;
            }
        }
        // 50 ms of queue at 1 ms per packet: 51 accepted (the 51st starts exactly at the limit).
        assert_eq!(dropped, 49);
        assert_eq!(drain(&mut wan).len(), 51);
    }

    #[test]
    fn downlink_is_shared_by_two_sources_and_drops_when_full() {
        // Sites 0 and 1 both send to 2 over unlimited uplinks: all 80 packets reach site 2's
        // 8 Mbit/s downlink at once (1 ms each), which can hold 50 ms of backlog.
        let mut c = cfg(Some(8_000_000));
        c.uplink_bps = None;
        c.rtt[0][2] = Duration::from_millis(20);
        c.rtt[2][0] = Duration::from_millis(20);
        c.rtt[1][2] = Duration::from_millis(20);
        c.rtt[2][1] = Duration::from_millis(20);
        let mut wan = Wan::new(c);
        for i in 0..40 {
            wan.handle_packet(0, packet([10, 0, 0, 2], [10, 2, 0, 2], 1000, i));
            wan.handle_packet(0, packet([10, 1, 0, 2], [10, 2, 0, 2], 1000, 1000 + i));
        }
        let out = drain(&mut wan);
        assert_eq!(out.len(), 51);
        assert_eq!(wan.stats().dropped_downlink[2], 29);
        for w in out.windows(2) {
            assert!(w[1].0 - w[0].0 >= 1_000_000, "downlink rate exceeded");
        }
    }

    #[test]
    fn non_ipv4_and_unknown_sites_are_unroutable() {
        let mut wan = Wan::new(cfg(None));
        let mut v6 = packet([10, 0, 0, 2], [10, 1, 0, 2], 60, 0);
        v6[0] = 0x60;
        assert_eq!(wan.handle_packet(0, v6), Verdict::Unroutable);
        assert_eq!(
            wan.handle_packet(0, packet([10, 0, 0, 2], [10, 9, 0, 2], 60, 0)),
            Verdict::Unroutable
        );
        assert_eq!(
            wan.handle_packet(0, packet([192, 168, 0, 2], [10, 1, 0, 2], 60, 0)),
            Verdict::Unroutable
        );
        assert_eq!(wan.handle_packet(0, vec![0x45; 10]), Verdict::Unroutable);
        assert_eq!(wan.stats().unroutable, 4);
        assert_eq!(wan.poll_timeout(), None);
    }

    proptest! {
        /// Whatever arrives: nothing leaves before arrival + one-way delay, packets of one site pair
        /// keep their order, every packet is delivered or counted as dropped, and no downlink
        /// delivers faster than its rate.
        #[test]
        fn prop_delay_order_conservation_and_rate(
            seed_packets in proptest::collection::vec((0u8..3, 0u8..3, 40usize..1500, 0u64..20_000_000), 1..200),
            bps in proptest::option::of(1_000_000u64..100_000_000),
        ) {
            let c = cfg(bps);
            let mut wan = Wan::new(c.clone());
            let mut arrivals: Vec<(u8, u8, usize, u64)> = seed_packets;
            arrivals.sort_by_key(|a| a.3);
            let mut sent = std::collections::HashMap::new();
            let mut out: Vec<(Nanos, Vec<u8>)> = Vec::new();
            let mut queued = 0u64;
            for (i, &(a, b, len, at)) in arrivals.iter().enumerate() {
                while let Some(t) = wan.poll_timeout().filter(|t| *t <= at) {
                    while let Some(p) = wan.poll_transmit(t) { out.push((t, p)); }
                }
                let p = packet([10, a, 0, 2], [10, b, 0, 3], len, i as u32);
                if wan.handle_packet(at, p) == Verdict::Queued {
                    queued += 1;
                    sent.insert(i as u32, (a, b, at, len));
                }
            }
            out.extend(drain(&mut wan));
            let drops: u64 = wan.stats().dropped_downlink.iter().sum();
            prop_assert_eq!(out.len() as u64 + drops, queued);
            let mut last_per_pair = std::collections::HashMap::new();
            let mut last_per_dst: std::collections::HashMap<u8, Nanos> = std::collections::HashMap::new();
            for (t, p) in &out {
                let (a, b, at, len) = sent[&tag(p)];
                let one_way = nanos(c.rtt[a as usize][b as usize]) / 2;
                prop_assert!(*t >= at + one_way);
                if let Some(prev) = last_per_pair.insert((a, b), tag(p)) {
                    prop_assert!(prev < tag(p), "reordered within a site pair");
                }
                if let Some(prev) = last_per_dst.insert(b, *t) {
                    prop_assert!(*t >= prev + serialisation(len, bps));
                }
            }
        }
    }
}
