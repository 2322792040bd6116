//! Which links a chunk transfer crosses: the sender's NIC up, the receiver's NIC down, each site's
//! core if it has one, both sites' WAN links when it crosses sites, and the connection's own cap
//! when that is below both NICs (a window link shared by all flows of that sender-receiver pair,
//! created and dropped with them).
//!
//! The connection's cap is min(flow-control window, 1.25 x congestion window) / RTT: QUIC (quinn,
//! under libp2p-quic) paces a connection at 1.25 cwnd / RTT, starts cwnd at ten datagrams, and
//! grows it in slow start by the bytes acknowledged *while it has data to send* (acks that arrive
//! when the connection is idle, app-limited, do not count). So a connection that carries one chunk
//! at a time over a long RTT keeps a cwnd of about one chunk, and each chunk takes about one RTT to
//! pace out on top of the request's round trip: the testnet measured 2.1-2.4 RTT per 256 KiB Demand
//! fetch at 75 ms (RESULTS.md section 7), where a fixed window predicted 1.3. Bulk transfers (many
//! chunks in flight) keep the connection busy, so cwnd doubles every RTT up to the NICs' rate.
//!
//! The fluid version: while a connection has flows, a tick every RTT / 4 records the bytes it sent
//! in the last quarter (its current rate x RTT / 4); the bytes sent one RTT earlier are acknowledged
//! now, while busy, and add to cwnd. Ticking stops once the cap no longer binds: when it exceeds
//! both NICs, or when the connection runs below it because another link holds it back; then each
//! chunk it finishes adds its bytes to cwnd at once (less the last RTT's worth when the connection
//! goes idle), and its next chunk starts the ticks again. Losses are not
//! modelled (the testnet's shaped links dropped nothing), so cwnd never shrinks.
//!
//! Why ticks cannot storm: a tick that finds the cap binding adds at least 0.95 x 1.25 / 4 of
//! cwnd, so cwnd more than doubles per RTT of binding ticks, and it never shrinks; a connection
//! therefore ticks while binding for at most about log2(W / initial window) RTTs over the whole
//! run (10 RTTs, 40 ticks, for 15 MB from 12,000 bytes), plus one tick per chunk it starts that
//! finds it held back elsewhere. Ticks are bounded by 40 per connection plus one per flow.

use std::collections::VecDeque;

use super::{Ev, NodeId, Transfer, World};
use crate::net::{FlowId, LinkClass, LinkId, MAX_PATH, Network};
use crate::scenario::Scenario;

/// Pacing rate / (cwnd / RTT) in quinn.
const PACING_GAIN: f64 = 1.25;
/// Congestion-window ticks per RTT.
const TICKS_PER_RTT: u32 = 4;
/// A connection whose load is below this share of its cap is limited elsewhere.
const CAP_BINDING: f64 = 0.95;
/// quinn's default `send_window` (8 x 1.25 MB; libp2p-quic keeps it): the most bytes a connection
/// buffers unacknowledged. A write into a stream waits while it is full (or while the stream's or
/// connection's flow-control window, `network.window`, if lower, is).
const SEND_WINDOW: f64 = 10_000_000.0;

/// One direction of a connection: its congestion window and its cap link.
#[derive(Debug)]
pub(super) struct Conn {
    /// Congestion window, bytes.
    cwnd: f64,
    /// The cap link, while flows cross it.
    link: Option<LinkId>,
    /// Flows in progress.
    flows: u32,
    /// Bytes sent in each of the last ticks (oldest first) of the current busy period.
    sent: VecDeque<f64>,
    /// A tick is scheduled.
    ticking: bool,
    /// Bytes of the chunks in progress whose write into the send buffer has returned.
    written: f64,
    /// Chunks in progress whose write waits for room in the send buffer (each holds its server's
    /// upload slot), oldest first: flow and size.
    blocked: VecDeque<(FlowId, f64)>,
}

/// A site's shared links.
#[derive(Debug, Clone, Copy)]
pub(super) struct SiteLinks {
    pub(super) wan_up: Option<LinkId>,
    pub(super) wan_down: Option<LinkId>,
    pub(super) core: Option<LinkId>,
}

pub(super) fn site_links(sc: &Scenario, net: &mut Network<Transfer>) -> Vec<SiteLinks> {
    sc.sites
        .iter()
        .enumerate()
        .map(|(i, s)| SiteLinks {
            wan_up: s
                .wan_up
                .map(|c| net.add_link(c, LinkClass::WanUp, i as u32)),
            wan_down: s
                .wan_down
                .map(|c| net.add_link(c, LinkClass::WanDown, i as u32)),
            core: s
                .core
                .map(|c| net.add_link(c, LinkClass::SiteCore, i as u32)),
        })
        .collect()
}

impl World {
    /// The cap of connection `from -> to` with congestion window `cwnd`, bytes/s.
    fn conn_cap(&self, from: NodeId, to: NodeId, cwnd: f64) -> f64 {
        let window = if self.sc.initial_window > 0.0 {
            self.sc.window.min(PACING_GAIN * cwnd)
        } else {
            self.sc.window
        };
        window / self.rtt(from, to).as_secs_f64().max(1e-9)
    }

    /// The lower of the sender's and the receiver's NIC, bytes/s.
    fn nic_rate(&self, from: NodeId, to: NodeId) -> f64 {
        self.net
            .link(self.nodes[from as usize].up)
            .capacity
            .min(self.net.link(self.nodes[to as usize].down).capacity)
    }

    /// The links a transfer from `from` to `to` crosses (taking a reference on the connection's
    /// cap link, and starting its congestion-window ticks when it becomes busy).
    pub(super) fn path(&mut self, from: NodeId, to: NodeId) -> ([LinkId; MAX_PATH], usize) {
        let (a, b) = (&self.nodes[from as usize], &self.nodes[to as usize]);
        let mut p = [0; MAX_PATH];
        let mut n = 0;
        let mut push = |l: Option<LinkId>| {
            if let Some(l) = l {
                p[n] = l;
                n += 1;
            }
        };
        push(Some(a.up));
        push(Some(b.down));
        let (sa, sb) = (a.site, b.site);
        push(self.site_links[sa].core);
        if sa != sb {
            push(self.site_links[sa].wan_up);
            push(self.site_links[sb].wan_down);
            push(self.site_links[sb].core);
        }
        let initial = self.sc.initial_window;
        let cwnd = self.conns.get(&(from, to)).map_or(initial, |c| c.cwnd);
        let cap = self.conn_cap(from, to, cwnd);
        let binds = cap < self.nic_rate(from, to);
        let rtt = self.rtt(from, to);
        let net = &mut self.net;
        let conn = self.conns.entry((from, to)).or_insert_with(|| Conn {
            cwnd: initial,
            link: None,
            flows: 0,
            sent: VecDeque::new(),
            ticking: false,
            written: 0.0,
            blocked: VecDeque::new(),
        });
        conn.flows += 1;
        if conn.link.is_none() && binds {
            conn.link = Some(net.add_link(cap, LinkClass::Window, from));
        }
        if let Some(l) = conn.link {
            p[n] = l;
            n += 1;
        }
        if binds && initial > 0.0 && !conn.ticking {
            conn.ticking = true;
            conn.sent.clear();
            self.q
                .schedule_in(rtt / TICKS_PER_RTT, Ev::CwndTick { from, to });
        }
        (p, n)
    }

    /// Writes a chunk of `size` bytes, sent as `flow`, into connection `from -> to`'s send buffer:
    /// true if the write returns at once (the server's upload slot is free again), false if it
    /// waits for room (the slot stays taken until [`Self::release_window`] lets it in). The buffer
    /// holds at most [`SEND_WINDOW`] (or the flow-control window if lower) of chunks in progress; a chunk alone on its
    /// connection always gets in. Call after [`Self::path`] for that flow.
    pub(super) fn write_chunk(
        &mut self,
        from: NodeId,
        to: NodeId,
        flow: FlowId,
        size: f64,
    ) -> bool {
        let window = self.sc.window.min(SEND_WINDOW);
        let Some(conn) = self.conns.get_mut(&(from, to)) else {
            return true;
        };
        if conn.blocked.is_empty() && (conn.written <= 0.0 || conn.written + size <= window) {
            conn.written += size;
            true
        } else {
            conn.blocked.push_back((flow, size));
            false
        }
    }

    /// Drops a transfer's reference on its connection (removing the cap link with the last one;
    /// the congestion window stays) and returns how many upload slots of `from` are freed: the
    /// transfer's own if its write was still waiting, and those of waiting writes that now fit in
    /// the send buffer. `bytes` of it were sent: while the connection is not ticking (held back
    /// elsewhere), they are what its acknowledgements add to cwnd now, except the last RTT's
    /// worth when this was its last flow (those acks arrive when it is idle).
    pub(super) fn release_window(
        &mut self,
        from: NodeId,
        to: NodeId,
        flow: FlowId,
        size: f64,
        bytes: f64,
    ) -> u32 {
        let rtt = self.rtt(from, to).as_secs_f64();
        let window = self.sc.window;
        let congestion = self.sc.initial_window > 0.0;
        let Some(conn) = self.conns.get(&(from, to)) else {
            return 0;
        };
        let load = conn.link.map_or(0.0, |l| self.net.load(l));
        let (ticking, last, link) = (conn.ticking, conn.flows <= 1, conn.link);
        if congestion && !ticking {
            let idle_acks = if last { load * rtt } else { 0.0 };
            let grown = (bytes - idle_acks).max(0.0);
            let cwnd = self
                .conns
                .get(&(from, to))
                .map_or(0.0, |c| (c.cwnd + grown).min(window));
            if let Some(c) = self.conns.get_mut(&(from, to)) {
                c.cwnd = cwnd;
            }
            if let Some(l) = link.filter(|_| !last) {
                let cap = self.conn_cap(from, to, cwnd);
                self.net.set_capacity(l, cap);
            }
        }
        let mut freed = 0;
        if let Some(conn) = self.conns.get_mut(&(from, to)) {
            conn.flows = conn.flows.saturating_sub(1);
            if let Some(i) = conn.blocked.iter().position(|&(f, _)| f == flow) {
                conn.blocked.remove(i);
                freed += 1;
            } else {
                conn.written = (conn.written - size).max(0.0);
            }
            let buffer = window.min(SEND_WINDOW);
            while let Some(&(_, next)) = conn.blocked.front() {
                if conn.written > 0.0 && conn.written + next > buffer {
                    break;
                }
                conn.blocked.pop_front();
                conn.written += next;
                freed += 1;
            }
            if conn.flows == 0 {
                conn.sent.clear();
                conn.written = 0.0;
                if let Some(link) = conn.link.take() {
                    self.net.remove_link(link);
                }
            }
        }
        freed
    }

    /// A congestion-window tick of connection `from -> to` (see the module docs).
    pub(super) fn cwnd_tick(&mut self, from: NodeId, to: NodeId) {
        let rtt = self.rtt(from, to);
        let quarter = rtt.as_secs_f64() / f64::from(TICKS_PER_RTT);
        let window = self.sc.window;
        let Some(conn) = self.conns.get_mut(&(from, to)) else {
            return;
        };
        let Some(link) = conn.link.filter(|_| conn.flows > 0) else {
            conn.ticking = false;
            conn.sent.clear();
            return;
        };
        let load = self.net.load(link);
        if load < CAP_BINDING * self.net.link(link).capacity {
            // Held back elsewhere (a shared NIC or WAN link): its window is not what limits it,
            // so it needs no ticks (thousands of connections sharing saturated links would
            // otherwise tick every RTT/4 for nothing). Its acknowledgements still grow cwnd:
            // `release_window` adds each finished chunk's bytes. Its next chunk restarts ticks.
            conn.ticking = false;
            conn.sent.clear();
            return;
        }
        conn.sent.push_back(load * quarter);
        if conn.sent.len() > TICKS_PER_RTT as usize {
            let acked = conn.sent.pop_front().unwrap_or(0.0);
            conn.cwnd = (conn.cwnd + acked).min(window);
        }
        let cwnd = conn.cwnd;
        let cap = self.conn_cap(from, to, cwnd);
        self.net.set_capacity(link, cap);
        if cap >= self.nic_rate(from, to) || cwnd >= window {
            // The cap no longer binds: no more ticks needed.
            if let Some(conn) = self.conns.get_mut(&(from, to)) {
                conn.ticking = false;
                conn.sent.clear();
            }
            return;
        }
        self.q
            .schedule_in(rtt / TICKS_PER_RTT, Ev::CwndTick { from, to });
    }
}
