//! The flow-level network: links with capacities, flows crossing them, and max-min fair rates.
//!
//! A flow is one chunk transfer. Its rate is constant between two changes of the flow set and set
//! by max-min fairness ([`maxmin`]) over the links it crosses. When flows start or end, only the
//! affected part of the network is solved again: starting from the links whose flow set changed,
//! the solver takes the flows crossing them, treats every other flow as fixed (its share of a link
//! outside the set is subtracted from that link's capacity), and solves; any flow whose rate changed
//! (or that is held back by an outside link on which an outside flow runs faster) pulls its other
//! links into the set, and this repeats until nothing outside needs to change. The result is the
//! allocation of a whole-network solve (tested), to within [`RISE_EPS`]: a rate increase smaller
//! than that is not applied, so that a change does not ripple through a whole saturated swarm in
//! ever smaller steps. The cost is proportional to the region that actually changed. This module also keeps each link's byte count and peak
//! utilisation and the bytes per [`LinkClass`] over time. It decides nothing about which flows
//! exist; the world (`crate::world`) starts and ends them.

pub mod maxmin;

use std::collections::BTreeSet;

use crate::engine::secs;
use vmswarm_protocol::Instant;

/// Index of a link.
pub type LinkId = u32;
/// Index of a flow (slots are reused after a flow ends).
pub type FlowId = u32;

/// Most links one flow crosses.
pub const MAX_PATH: usize = 8;

/// Relative decrease below which a recomputed rate is not applied (rounding noise).
const FALL_EPS: f64 = 1e-9;
/// Relative increase below which a recomputed rate is not applied: the flow keeps its slightly
/// lower rate, which is still feasible. This stops a change from rippling through a whole
/// saturated swarm in ever smaller steps; the price is that a rate may sit up to this fraction
/// below its max-min share.
pub const RISE_EPS: f64 = 1e-3;

/// What a link models, for reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LinkClass {
    /// A host's NIC, upload direction.
    HostUp,
    /// A host's NIC, download direction.
    HostDown,
    /// A source server's NIC, upload direction.
    SourceUp,
    /// A source server's NIC, download direction.
    SourceDown,
    /// A site's WAN uplink (traffic leaving the site).
    WanUp,
    /// A site's WAN downlink (traffic entering the site).
    WanDown,
    /// A site's core (all traffic of flows starting or ending in the site).
    SiteCore,
    /// A connection's flow-control window (W / RTT); not a physical link.
    Window,
}

impl LinkClass {
    /// Every class, in report order.
    pub const ALL: [LinkClass; 8] = [
        LinkClass::SourceUp,
        LinkClass::HostUp,
        LinkClass::WanUp,
        LinkClass::WanDown,
        LinkClass::HostDown,
        LinkClass::SourceDown,
        LinkClass::SiteCore,
        LinkClass::Window,
    ];

    /// Name in reports.
    pub fn name(self) -> &'static str {
        match self {
            LinkClass::HostUp => "host_up",
            LinkClass::HostDown => "host_down",
            LinkClass::SourceUp => "source_up",
            LinkClass::SourceDown => "source_down",
            LinkClass::WanUp => "wan_up",
            LinkClass::WanDown => "wan_down",
            LinkClass::SiteCore => "site_core",
            LinkClass::Window => "window",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Number of link classes.
pub const CLASSES: usize = 8;

/// A link and its accounting.
#[derive(Debug, Clone)]
pub struct Link {
    /// Capacity, bytes/s.
    pub capacity: f64,
    /// What it models.
    pub class: LinkClass,
    /// The node or site it belongs to (for reports).
    pub owner: u32,
    /// Bytes that crossed it (whole flows, and the sent part of aborted ones).
    pub bytes: f64,
    /// Highest load / capacity seen.
    pub peak: f64,
    /// Whether the slot holds a link (window links come and go).
    pub live: bool,
    flows: Vec<FlowId>,
    load: f64,
    dirty: bool,
    mark: u64,
    local: u32,
}

#[derive(Debug, Clone)]
struct Flow<T> {
    links: [LinkId; MAX_PATH],
    nlinks: u8,
    size: u64,
    done: f64,
    rate: f64,
    since: u64,
    /// When its last byte leaves at the current rate (`u64::MAX`: not scheduled).
    due: u64,
    mark: u64,
    tag: Option<T>,
}

impl<T> Flow<T> {
    fn links(&self) -> &[LinkId] {
        &self.links[..self.nlinks as usize]
    }
}

/// Whole-run network counters and checks.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct NetStats {
    /// Rate recomputations.
    pub solves: u64,
    /// Flows taken into a solve, summed over solves.
    pub solved_flows: u64,
    /// Calls to [`Network::update`] that had something to do.
    pub updates: u64,
    /// Flows started.
    pub flows_started: u64,
    /// Highest load / capacity over all links at any time (must not exceed 1).
    pub max_utilisation: f64,
    /// Largest |integrated bytes - size| of a completed flow beyond the nanosecond rounding of its
    /// completion instant, in bytes (integration error).
    pub max_fluid_error: f64,
}

/// The network. `T` is what the caller attaches to a flow (returned when it ends).
#[derive(Debug)]
pub struct Network<T> {
    links: Vec<Link>,
    free_links: Vec<LinkId>,
    flows: Vec<Flow<T>>,
    free_flows: Vec<FlowId>,
    dirty: Vec<LinkId>,
    /// Flows by the time their last byte leaves.
    due: BTreeSet<(u64, FlowId)>,
    epoch: u64,
    solver: maxmin::Solver,
    // Scratch buffers for an update.
    set: Vec<LinkId>,
    region: Vec<FlowId>,
    locals: Vec<LinkId>,
    caps: Vec<f64>,
    outside_max: Vec<f64>,
    local_load: Vec<f64>,
    local_max: Vec<f64>,
    off: Vec<u32>,
    path: Vec<u32>,
    rates: Vec<f64>,
    /// Bytes per class per time bin.
    series: Vec<[f64; CLASSES]>,
    bin_ns: u64,
    stats: NetStats,
}

impl<T> Network<T> {
    /// An empty network whose per-class byte series uses bins of `bin_ns` nanoseconds.
    pub fn new(bin_ns: u64) -> Self {
        Network {
            links: Vec::new(),
            free_links: Vec::new(),
            flows: Vec::new(),
            free_flows: Vec::new(),
            dirty: Vec::new(),
            due: BTreeSet::new(),
            epoch: 0,
            solver: maxmin::Solver::new(),
            set: Vec::new(),
            region: Vec::new(),
            locals: Vec::new(),
            caps: Vec::new(),
            outside_max: Vec::new(),
            local_load: Vec::new(),
            local_max: Vec::new(),
            off: Vec::new(),
            path: Vec::new(),
            rates: Vec::new(),
            series: Vec::new(),
            bin_ns: bin_ns.max(1),
            stats: NetStats::default(),
        }
    }

    /// Adds a link of `capacity` bytes/s.
    pub fn add_link(&mut self, capacity: f64, class: LinkClass, owner: u32) -> LinkId {
        let link = Link {
            capacity,
            class,
            owner,
            bytes: 0.0,
            peak: 0.0,
            live: true,
            flows: Vec::new(),
            load: 0.0,
            dirty: false,
            mark: 0,
            local: 0,
        };
        match self.free_links.pop() {
            Some(id) => {
                self.links[id as usize] = link;
                id
            }
            None => {
                self.links.push(link);
                (self.links.len() - 1) as LinkId
            }
        }
    }

    /// Changes a link's capacity (its flows' rates are recomputed at the next update).
    pub fn set_capacity(&mut self, id: LinkId, capacity: f64) {
        if self.links[id as usize].capacity != capacity {
            self.links[id as usize].capacity = capacity;
            self.mark_dirty(id);
        }
    }

    /// Removes a link no flow crosses any more (its slot is reused). Returns false if flows remain.
    pub fn remove_link(&mut self, id: LinkId) -> bool {
        let l = &mut self.links[id as usize];
        if !l.flows.is_empty() || !l.live {
            return false;
        }
        l.live = false;
        self.free_links.push(id);
        true
    }

    /// A link.
    pub fn link(&self, id: LinkId) -> &Link {
        &self.links[id as usize]
    }

    /// All link slots (check [`Link::live`] for window links).
    pub fn links(&self) -> &[Link] {
        &self.links
    }

    /// Number of flows crossing a link.
    pub fn link_flow_count(&self, id: LinkId) -> usize {
        self.links[id as usize].flows.len()
    }

    /// Counters and checks.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Bytes per class per bin, and the bin width in ns.
    pub fn series(&self) -> (&[[f64; CLASSES]], u64) {
        (&self.series, self.bin_ns)
    }

    /// Flows in progress.
    pub fn active_flows(&self) -> usize {
        self.flows.len() - self.free_flows.len()
    }

    /// Starts a flow of `size` bytes over `links` at `now`. Its rate is set by the next
    /// [`Network::update`].
    pub fn start(&mut self, now: Instant, links: &[LinkId], size: u64, tag: T) -> FlowId {
        debug_assert!(!links.is_empty() && links.len() <= MAX_PATH);
        let mut arr = [0; MAX_PATH];
        let n = links.len().min(MAX_PATH);
        arr[..n].copy_from_slice(&links[..n]);
        let flow = Flow {
            links: arr,
            nlinks: n as u8,
            size,
            done: 0.0,
            rate: 0.0,
            since: now.as_nanos(),
            due: u64::MAX,
            mark: 0,
            tag: Some(tag),
        };
        let id = match self.free_flows.pop() {
            Some(id) => {
                self.flows[id as usize] = flow;
                id
            }
            None => {
                self.flows.push(flow);
                (self.flows.len() - 1) as FlowId
            }
        };
        for &l in &links[..n] {
            self.links[l as usize].flows.push(id);
            self.mark_dirty(l);
        }
        self.stats.flows_started += 1;
        id
    }

    /// The flow whose last byte leaves first, and when.
    pub fn next_completion(&self) -> Option<(Instant, FlowId)> {
        self.due
            .first()
            .map(|&(at, id)| (Instant::from_nanos(at), id))
    }

    /// Ends flow `id`, due at `now` (see [`Network::next_completion`]): its bytes are all sent.
    /// Returns its tag and size.
    pub fn complete(&mut self, now: Instant, id: FlowId) -> Option<(T, u64)> {
        let f = self.flows.get(id as usize)?;
        if f.due > now.as_nanos() || f.tag.is_none() {
            return None;
        }
        self.advance(id, now.as_nanos());
        let f = &self.flows[id as usize];
        let size = f.size as f64;
        // Completion instants are rounded up to the nanosecond, so a flow may integrate up to its
        // rate x 1 ns beyond its size (a few bytes); anything more is a model error.
        let err = (f.done - size).abs() - f.rate * 1e-9;
        self.stats.max_fluid_error = self.stats.max_fluid_error.max(err);
        self.finish(id, size)
            .map(|tag| (tag, self.flows[id as usize].size))
    }

    /// Stops flow `id` early (a cancelled send). Returns its tag and the bytes sent so far.
    pub fn abort(&mut self, now: Instant, id: FlowId) -> Option<(T, f64)> {
        self.flows.get(id as usize)?.tag.as_ref()?;
        self.advance(id, now.as_nanos());
        let done = self.flows[id as usize]
            .done
            .min(self.flows[id as usize].size as f64);
        self.finish(id, done).map(|tag| (tag, done))
    }

    fn finish(&mut self, id: FlowId, bytes: f64) -> Option<T> {
        let f = &mut self.flows[id as usize];
        let tag = f.tag.take()?;
        self.due.remove(&(f.due, id));
        f.due = u64::MAX;
        f.rate = 0.0;
        let links = f.links;
        let n = f.nlinks as usize;
        for &l in &links[..n] {
            let link = &mut self.links[l as usize];
            link.bytes += bytes;
            if let Some(pos) = link.flows.iter().position(|&x| x == id) {
                link.flows.swap_remove(pos);
            }
            self.mark_dirty(l);
        }
        self.free_flows.push(id);
        Some(tag)
    }

    fn mark_dirty(&mut self, l: LinkId) {
        let link = &mut self.links[l as usize];
        if !link.dirty {
            link.dirty = true;
            self.dirty.push(l);
        }
    }

    /// Brings a flow's byte count up to `now` at its current rate (and the class series with it).
    fn advance(&mut self, id: FlowId, now: u64) {
        let f = &mut self.flows[id as usize];
        if now <= f.since {
            return;
        }
        let (t0, rate) = (f.since, f.rate);
        f.since = now;
        if rate <= 0.0 {
            return;
        }
        let bytes = rate * (now - t0) as f64 / 1e9;
        f.done += bytes;
        let mut classes = [false; CLASSES];
        for &l in f.links() {
            classes[self.links[l as usize].class.index()] = true;
        }
        // Spread the bytes over the time bins the interval covers.
        let (b0, b1) = (t0 / self.bin_ns, (now - 1) / self.bin_ns);
        if self.series.len() <= b1 as usize {
            self.series.resize(b1 as usize + 1, [0.0; CLASSES]);
        }
        for b in b0..=b1 {
            let lo = t0.max(b * self.bin_ns);
            let hi = now.min((b + 1) * self.bin_ns);
            let part = rate * (hi - lo) as f64 / 1e9;
            let bin = &mut self.series[b as usize];
            for (c, on) in classes.iter().enumerate() {
                if *on {
                    bin[c] += part;
                }
            }
        }
    }

    /// The current rate of a flow, bytes/s.
    pub fn rate(&self, id: FlowId) -> f64 {
        self.flows.get(id as usize).map_or(0.0, |f| f.rate)
    }

    /// Whether flows started or ended since the last [`Network::update`].
    pub fn has_changes(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Recomputes the rates affected by flows started or ended since the last call (and with them
    /// the completion times of the flows whose rate changed).
    pub fn update(&mut self, now: Instant) {
        if self.dirty.is_empty() {
            return;
        }
        self.stats.updates += 1;
        self.epoch += 1;
        let set_mark = self.epoch;
        self.set.clear();
        for l in std::mem::take(&mut self.dirty) {
            let link = &mut self.links[l as usize];
            link.dirty = false;
            if link.mark != set_mark {
                link.mark = set_mark;
                self.set.push(l);
            }
        }
        loop {
            self.epoch += 1;
            let flow_mark = self.epoch;
            self.region.clear();
            for &l in &self.set {
                for &f in &self.links[l as usize].flows {
                    let flow = &mut self.flows[f as usize];
                    if flow.mark != flow_mark {
                        flow.mark = flow_mark;
                        self.region.push(f);
                    }
                }
            }
            // Local link numbering: the set first, then outside links the region touches.
            self.epoch += 1;
            let local_mark = self.epoch;
            self.locals.clear();
            self.caps.clear();
            self.outside_max.clear();
            self.off.clear();
            self.path.clear();
            self.off.push(0);
            for &f in &self.region {
                let nlinks = self.flows[f as usize].nlinks as usize;
                for k in 0..nlinks {
                    let l = self.flows[f as usize].links[k];
                    let link = &mut self.links[l as usize];
                    let numbered = link.mark == local_mark || link.mark == set_mark | (1 << 63);
                    if !numbered && link.mark != set_mark {
                        // First time seen: outside the set. Its capacity for the region is what
                        // the flows outside the region leave.
                        link.mark = local_mark;
                        link.local = self.locals.len() as u32;
                        self.locals.push(l);
                        let mut cap = link.capacity;
                        let mut top = 0.0f64;
                        for &g in &link.flows {
                            if self.flows[g as usize].mark != flow_mark {
                                let r = self.flows[g as usize].rate;
                                cap -= r;
                                top = top.max(r);
                            }
                        }
                        self.caps.push(cap.max(0.0));
                        self.outside_max.push(top);
                    } else if link.mark == set_mark {
                        // In the set: number it on first sight via a second mark.
                        link.mark = set_mark | (1 << 63);
                        link.local = self.locals.len() as u32;
                        self.locals.push(l);
                        self.caps.push(link.capacity);
                        self.outside_max.push(0.0);
                    }
                    self.path.push(self.links[l as usize].local);
                }
                self.off.push(self.path.len() as u32);
            }
            // Restore the set marks (the high bit only numbered set links for this pass).
            for &l in &self.locals {
                let link = &mut self.links[l as usize];
                if link.mark == set_mark | (1 << 63) {
                    link.mark = set_mark;
                }
            }
            self.solver
                .solve(&self.caps, &self.off, &self.path, &mut self.rates);
            self.stats.solves += 1;
            self.stats.solved_flows += self.region.len() as u64;
            // Per local link: the region's new load and its highest new rate.
            self.local_load.clear();
            self.local_load.resize(self.locals.len(), 0.0);
            self.local_max.clear();
            self.local_max.resize(self.locals.len(), 0.0);
            for i in 0..self.region.len() {
                let r = self.rates[i];
                for &ll in &self.path[self.off[i] as usize..self.off[i + 1] as usize] {
                    self.local_load[ll as usize] += r;
                    let m = &mut self.local_max[ll as usize];
                    *m = m.max(r);
                }
            }
            let mut grew = false;
            for (i, &f) in self.region.iter().enumerate() {
                let flow = &self.flows[f as usize];
                let r = self.rates[i];
                // A flow needs a bottleneck: a full link on which no flow, inside the region or
                // out, has a higher rate. A flow held back by an outside link where an outside
                // flow runs faster does not have one: that link must be solved too.
                let has_bottleneck = self.path[self.off[i] as usize..self.off[i + 1] as usize]
                    .iter()
                    .any(|&ll| {
                        let ll = ll as usize;
                        let full = self.local_load[ll] >= self.caps[ll] * (1.0 - RISE_EPS) - 1e-9;
                        let top = self.local_max[ll].max(self.outside_max[ll]);
                        full && r >= top * (1.0 - RISE_EPS)
                    });
                if !changed(flow.rate, r) && has_bottleneck {
                    continue;
                }
                for &l in flow.links() {
                    let link = &mut self.links[l as usize];
                    if link.mark != set_mark {
                        link.mark = set_mark;
                        self.set.push(l);
                        grew = true;
                    }
                }
            }
            if !grew {
                break;
            }
        }
        // Commit: advance changed flows at their old rate, then switch to the new one.
        let now_ns = now.as_nanos();
        for i in 0..self.region.len() {
            let f = self.region[i];
            let new = self.rates[i];
            if !changed(self.flows[f as usize].rate, new) {
                continue;
            }
            self.advance(f, now_ns);
            let flow = &mut self.flows[f as usize];
            flow.rate = new;
            let remaining = flow.size as f64 - flow.done;
            let at = if remaining <= 0.0 {
                now_ns
            } else if new > 0.0 && new.is_finite() {
                let dt = (remaining / new * 1e9).ceil();
                if dt >= (u64::MAX - now_ns) as f64 {
                    u64::MAX
                } else {
                    now_ns + dt as u64
                }
            } else {
                u64::MAX
            };
            if flow.due != u64::MAX {
                self.due.remove(&(flow.due, f));
            }
            flow.due = at;
            if at != u64::MAX {
                self.due.insert((at, f));
            }
        }
        // Loads and peaks of every link the region touched (and of set links left without flows).
        for &l in self.locals.iter().chain(&self.set) {
            let link = &self.links[l as usize];
            let load: f64 = link
                .flows
                .iter()
                .map(|&g| self.flows[g as usize].rate)
                .sum();
            let util = if link.capacity > 0.0 {
                load / link.capacity
            } else {
                0.0
            };
            let link = &mut self.links[l as usize];
            link.load = load;
            if link.class != LinkClass::Window {
                link.peak = link.peak.max(util);
                self.stats.max_utilisation = self.stats.max_utilisation.max(util);
            }
        }
    }

    /// Current load of a link, bytes/s (as of the last update).
    pub fn load(&self, id: LinkId) -> f64 {
        self.links[id as usize].load
    }

    /// Brings every flow's counters up to `now` (for end-of-run accounting of unfinished flows).
    pub fn settle(&mut self, now: Instant) {
        for id in 0..self.flows.len() as FlowId {
            if self.flows[id as usize].tag.is_some() {
                self.advance(id, now.as_nanos());
            }
        }
    }

    /// Ids of the flows in progress, in slot order.
    pub fn live_flows(&self) -> Vec<FlowId> {
        (0..self.flows.len() as FlowId)
            .filter(|&i| self.flows[i as usize].tag.is_some())
            .collect()
    }

    /// Total seconds covered by the series.
    pub fn series_span_s(&self) -> f64 {
        secs(Instant::from_nanos(self.series.len() as u64 * self.bin_ns))
    }
}

/// Whether a recomputed rate is applied (see [`FALL_EPS`] and [`RISE_EPS`]).
fn changed(old: f64, new: f64) -> bool {
    new < old * (1.0 - FALL_EPS) || new > old * (1.0 + RISE_EPS)
}

#[cfg(test)]
mod tests;
