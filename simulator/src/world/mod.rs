//! The simulated world: nodes (source servers and hosts), VMs, the messages between nodes, and the
//! event loop that ties them to the network model.
//!
//! Each host runs one [`FetchScheduler<u32>`] for the image and each node one [`ServeQueue<u32>`],
//! driven exactly as the node drives them: inputs through `handle_*(now, ...)`, outputs drained with
//! `poll_action` / `poll_event` / `poll_next`, and `handle_timeout` called at `poll_timeout`. Peers
//! are node indices. The world decides only what the protocol leaves to the node: how long a
//! message takes (half the RTT), how bytes move (a flow in [`crate::net`]), when a host looks for
//! providers and whom it connects to ([`crate::routing`]), what its VMs read ([`crate::boot`]) and
//! which wants a strategy gives ([`crate::strategy`]). It makes no choice of chunk, peer, order or
//! timeout of its own.
//!
//! Node-level behaviour modelled here, as the node is expected to do it:
//! - A `Request` reaches the serving node after RTT/2. Chunks it does not hold are answered
//!   `NotFound`; a chunk already being sent to that peer is ignored; the rest go to its serve
//!   queue (`Busy` is answered as a reject). A chunk the queue hands out is written into the
//!   connection's send buffer and its upload slot freed when that write returns, as the node
//!   does (a lane's task writes one chunk at a time; the write returns once the bytes are
//!   buffered, and waits, holding the slot, while the send buffer is full). The buffer holds at
//!   most quinn's `send_window` (10 MB, or `network.window` if lower) of the connection's chunks
//!   in progress (a
//!   chunk alone on its connection always fits); a write that does not fit waits until earlier
//!   chunks of that connection finish (`write_chunk`, `release_window` in `links`). So
//!   `max_active_uploads` bounds the chunks being read and blocked on full connections, not the
//!   chunks on the wire. The connection's chunks share its rate, one flow each. Holding the slot
//!   until the last byte left made a single origin with eight slots and thousands of cold
//!   (slow-start) connections deliver a few chunks per second (a 1000-host `big10k` booted in
//!   457 s instead of 68 s).
//! - A chunk's bytes are a flow from the server's NIC to the requester's; the chunk is delivered
//!   RTT/2 after its last byte left (propagation), verified (always valid here) and committed.
//!   A flow still under way `ARRIVING_REPORT_AFTER` after it started is reported to the
//!   requester as arriving (as the node's lane does): the scheduler then neither hedges it nor,
//!   if it went outside the site, times it out for silence.
//! - A `Cancel` removes a queued request; a chunk already written goes out whole (it is in the
//!   lane's stream, as on the node), and the requester's scheduler takes it like any copy
//!   (accepted if still wanted; the peer's progress either way). A request for a chunk already
//!   on its way to that peer is ignored (the node would queue a second copy, which the first
//!   satisfies).
//! - A host batches the chunks it commits into one `HaveUpdate` per connected host every
//!   `routing.have_batch_ms`. The messages of one batch to the hosts of one site arrive at the
//!   same instant (RTT/2 depends only on the sites), so they travel as one event that delivers
//!   them in turn: the same messages at the same instants, far fewer queue operations.
//! - A VM read maps to chunks through the manifest; missing chunks become Demand wants; the VM
//!   waits for all of them. A failed Demand want (deadline passed) is re-wanted at once (the guest
//!   retries the read) and counted.

mod host;
mod links;
mod server;

use crate::content::Content;
use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;
use std::time::Duration;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use vmswarm_protocol::bitfield::ChunkBitmap;
use vmswarm_protocol::fetch::{FetchScheduler, RejectKind};
use vmswarm_protocol::manifest::Manifest;
use vmswarm_protocol::serve::ServeQueue;
use vmswarm_protocol::site::gateway_rank;
use vmswarm_protocol::{ChunkId, Instant, Priority};

use crate::boot::{self, SharedTrace, VmReads};
use crate::engine::{EventQueue, instant_from_secs, secs};
use crate::net::{FlowId, LinkClass, LinkId, Network};
use crate::record::{Counters, HostRecord, LinkRecord, RunResult, VmRecord};
use crate::routing;
use crate::scenario::Scenario;
use crate::strategy::{Background, Plan};

/// Node index: source servers first, then hosts.
pub type NodeId = u32;

/// Errors that stop a run before it starts.
#[derive(Debug, thiserror::Error)]
pub enum WorldError {
    /// The image cannot be described by a manifest.
    #[error("image: {0}")]
    Manifest(#[from] vmswarm_protocol::manifest::ManifestError),
    /// The scheduler refused its configuration.
    #[error("fetch scheduler: {0}")]
    Fetch(#[from] vmswarm_protocol::fetch::FetchError),
    /// The content layout does not fit the image.
    #[error("image: {0}")]
    Content(#[from] crate::content::ContentError),
}

/// Progress of a run, for a status line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Simulated time, s.
    pub now_s: f64,
    /// Events processed.
    pub events: u64,
    /// VMs booted.
    pub vms_booted: u64,
    /// VMs in all.
    pub vms: u64,
    /// Hosts whose background target is complete.
    pub hosts_done: u64,
    /// Hosts with a background target.
    pub hosts_with_target: u64,
    /// Flows in progress.
    pub flows: usize,
}

#[derive(Debug)]
enum Msg {
    Request {
        priority: Priority,
        indices: Vec<u32>,
    },
    Cancel {
        indices: Vec<u32>,
    },
    Fetching {
        indices: Vec<u32>,
    },
    /// `Need`: a same-site host wants chunks we are the gateway for.
    Need {
        priority: Priority,
        indices: Vec<u32>,
    },
    HaveUpdate {
        indices: Rc<[u32]>,
    },
    Reject {
        index: u32,
        kind: RejectKind,
    },
    Hello {
        /// The sender's Have set (`None`: a source, which holds everything).
        have: Option<Box<ChunkBitmap>>,
    },
    /// A chunk's bytes have been arriving for `ARRIVING_REPORT_AFTER` and it is not complete.
    ChunkArriving {
        index: u32,
    },
    Chunk {
        index: u32,
    },
}

#[derive(Debug)]
enum Ev {
    HostStart(u32),
    VmStart(u32),
    LookupDone(u32),
    Connect {
        host: u32,
        peer: NodeId,
    },
    Msg {
        to: NodeId,
        from: NodeId,
        msg: Msg,
    },
    Timer(u32),
    ReadIssue(u32),
    HaveFlush(u32),
    /// A flow started `ARRIVING_REPORT_AFTER` ago: if it is still on its way, its requester
    /// reports the chunk as arriving.
    ArrivingCheck {
        server: NodeId,
        to: NodeId,
        index: u32,
        flow: u32,
    },
    /// A congestion-window tick of the connection `from -> to` (see `links`).
    CwndTick {
        from: NodeId,
        to: NodeId,
    },
    /// One `HaveUpdate` batch from `from` to each of `to` (hosts of one site).
    HaveBatch {
        from: NodeId,
        to: Box<[NodeId]>,
        indices: Rc<[u32]>,
    },
}

/// What a flow carries.
#[derive(Debug, Clone, Copy)]
struct Transfer {
    from: NodeId,
    to: NodeId,
    index: u32,
    priority: Priority,
}

#[derive(Debug)]
struct Node {
    site: usize,
    up: LinkId,
    down: LinkId,
    serve: ServeQueue<NodeId>,
    /// Chunks being sent: `(peer, index) -> flow`.
    sending: HashMap<(NodeId, u32), FlowId>,
    uploaded: f64,
}

#[derive(Debug)]
struct Host {
    node: NodeId,
    site: usize,
    sched: Option<FetchScheduler<NodeId>>,
    store: ChunkBitmap,
    conns: BTreeSet<NodeId>,
    have_peers: Vec<NodeId>,
    pending_have: Vec<u32>,
    flush_armed: bool,
    timer_at: Option<Instant>,
    waiters: HashMap<u32, Vec<u32>>,
    vms: Vec<u32>,
    started: Option<Instant>,
    lookup_pending: bool,
    bg_left: u32,
    bg_done: Option<Instant>,
    /// Boot-profile chunks not held yet (`multicast`: VMs start when it reaches 0).
    profile_left: u32,
    fetched: u64,
    from_site: Vec<u64>,
    from_sources: u64,
    duplicate: u64,
}

#[derive(Debug)]
struct Vm {
    host: u32,
    start: Instant,
    reads: VmReads,
    next: usize,
    waiting: u32,
    reading: bool,
    boot_done: Option<Instant>,
    issued: u64,
    failures: u64,
    fetched: u64,
    from_site: Vec<u64>,
    rng: ChaCha8Rng,
}

/// Seeds an independent stream for `purpose` / `index` from the run seed (SplitMix64 mixing).
pub fn substream(seed: u64, purpose: u64, index: u64) -> u64 {
    let mut z = seed
        .wrapping_add(purpose.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(index.wrapping_mul(0xBF58_476D_1CE4_E5B9));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const STREAM_BOOT: u64 = 1;
const STREAM_VM: u64 = 2;
const STREAM_START: u64 = 3;
const STREAM_ROUTING: u64 = 4;
const STREAM_SCHED: u64 = 5;

/// The part of the boot trace all VMs share, for run `seed`.
fn shared_trace(sc: &Scenario, seed: u64) -> Rc<SharedTrace> {
    let mut boot_rng = ChaCha8Rng::seed_from_u64(substream(seed, STREAM_BOOT, 0));
    Rc::new(boot::shared_trace(&sc.boot, sc.image_size, &mut boot_rng))
}

/// VM `v`'s boot reads and the random stream its think times are then drawn from.
fn vm_trace(sc: &Scenario, seed: u64, shared: &Rc<SharedTrace>, v: u32) -> (VmReads, ChaCha8Rng) {
    let mut rng = ChaCha8Rng::seed_from_u64(substream(seed, STREAM_VM, v.into()));
    let reads = VmReads::new(&sc.boot, sc.image_size, shared.clone(), &mut rng);
    (reads, rng)
}

/// Every VM's boot reads and think-time stream for run `seed`, in VM order (host groups in file
/// order, their hosts, their VMs), exactly as [`World::new`] draws them: the testnet replays these.
pub fn vm_traces(sc: &Scenario, seed: u64) -> Vec<(VmReads, ChaCha8Rng)> {
    let shared = shared_trace(sc, seed);
    let vms: u32 = sc.hosts.iter().map(|g| g.count * g.vms).sum();
    (0..vms).map(|v| vm_trace(sc, seed, &shared, v)).collect()
}

/// Every VM's start time (s) for run `seed`, in VM order (as [`vm_traces`]).
pub fn vm_start_times(sc: &Scenario, seed: u64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(substream(seed, STREAM_START, 0));
    let mut out = Vec::new();
    for g in &sc.hosts {
        for _ in 0..g.count * g.vms {
            let offset = if g.start_spread_s > 0.0 {
                rand::Rng::random::<f64>(&mut rng) * g.start_spread_s
            } else {
                0.0
            };
            out.push(g.start_s + offset);
        }
    }
    out
}

/// The synthetic id of chunk `index` (distinct per index, never an all-zero chunk's id).
pub fn chunk_id(index: u32) -> ChunkId {
    let mut b = [0xA5u8; 32];
    b[..4].copy_from_slice(&index.to_le_bytes());
    ChunkId(b)
}

fn chunk_index(id: &ChunkId) -> u32 {
    u32::from_le_bytes([id.0[0], id.0[1], id.0[2], id.0[3]])
}

/// One simulation run.
pub struct World {
    sc: Scenario,
    plan: Plan,
    seed: u64,
    label: String,
    q: EventQueue<Ev>,
    net: Network<Transfer>,
    manifest: Manifest,
    content: Content,
    full: ChunkBitmap,
    profile: Vec<u32>,
    profile_set: ChunkBitmap,
    nodes: Vec<Node>,
    hosts: Vec<Host>,
    vms: Vec<Vm>,
    sources: u32,
    site_links: Vec<links::SiteLinks>,
    conns: HashMap<(NodeId, NodeId), links::Conn>,
    providers: Vec<(Instant, u32)>,
    lookup_delay: Vec<Duration>,
    /// Each node's rank as a gateway of its site for the image (`site::gateway_rank`).
    gateway_rank: Vec<u64>,
    routing_rng: ChaCha8Rng,
    vms_left: u64,
    bg_left: u64,
    bg_hosts: u64,
    wan_out: Vec<f64>,
    wan_in: Vec<f64>,
    counters: Counters,
    first_start: Instant,
    events: u64,
    last_rate_update: Instant,
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("World")
            .field("scenario", &self.sc.name)
            .field("now", &self.q.now())
            .finish()
    }
}

impl World {
    /// Builds the world of a scenario: nodes, links, VMs and their start events.
    pub fn new(sc: Scenario, seed: u64, label: String) -> Result<World, WorldError> {
        let plan = Plan::of(&sc);
        let chunks = sc.chunk_count();
        let manifest = Manifest::new(
            sc.image_size,
            sc.chunk_size,
            (0..chunks).map(chunk_id).collect(),
            sc.name.clone(),
            None,
            Default::default(),
        )?;
        // Check the scheduler configuration once, before building anything.
        FetchScheduler::<NodeId>::new(sc.fetch.clone(), chunks, 0)?;
        let content = match &sc.content {
            Some(c) => {
                c.check_len(chunks)?;
                c.clone()
            }
            None => Content::distinct(chunks),
        };
        // Every host holds the all-zero chunks from the start, as a node does (the manifest
        // names them; reads of them are zeros).
        let mut empty_store = ChunkBitmap::new(chunks);
        for i in (0..chunks).filter(|&i| content.is_zero(i)) {
            empty_store.insert(i);
        }
        let shared = shared_trace(&sc, seed);
        let profile = boot::profile(&shared, &manifest);
        let mut profile_set = ChunkBitmap::new(chunks);
        for &c in &profile {
            profile_set.insert(c);
        }
        // A bin of about 1/500 of the expected span is fine; the span is not known in advance, so
        // use 100 ms (reports aggregate bins for plotting).
        let mut net = Network::new(100_000_000);
        let site_links = links::site_links(&sc, &mut net);
        let mut nodes = Vec::new();
        for (i, s) in sc.sources.iter().enumerate() {
            let up = net.add_link(s.nic_up, LinkClass::SourceUp, i as u32);
            let down = net.add_link(s.nic_down, LinkClass::SourceDown, i as u32);
            // An origin serves with the origin's fan-out, as the node's `serve --origin` does.
            let serve = if s.origin {
                ServeQueue::new(sc.serve.for_origin())
            } else {
                ServeQueue::new(sc.serve.clone())
            };
            nodes.push(Node {
                site: s.site,
                up,
                down,
                serve,
                sending: HashMap::new(),
                uploaded: 0.0,
            });
        }
        let sources = nodes.len() as u32;
        let mut q = EventQueue::new();
        let mut hosts = Vec::new();
        let mut vms = Vec::new();
        let vm_starts = vm_start_times(&sc, seed);
        let mut first_start = Instant::MAX;
        for g in &sc.hosts {
            for _ in 0..g.count {
                let h = hosts.len() as u32;
                let node = nodes.len() as NodeId;
                let up = net.add_link(g.nic_up, LinkClass::HostUp, h);
                let down = net.add_link(g.nic_down, LinkClass::HostDown, h);
                nodes.push(Node {
                    site: g.site,
                    up,
                    down,
                    serve: ServeQueue::new(sc.serve.clone()),
                    sending: HashMap::new(),
                    uploaded: 0.0,
                });
                let starts: Vec<Instant> = (0..g.vms as usize)
                    .map(|k| instant_from_secs(vm_starts[vms.len() + k]))
                    .collect();
                // The host starts with its first VM, and before it (events at one instant run in
                // the order they were scheduled).
                let host_start = starts.iter().copied().min().unwrap_or(Instant::ZERO);
                q.schedule_at(host_start, Ev::HostStart(h));
                let mut host_vms = Vec::new();
                for start in starts {
                    let v = vms.len() as u32;
                    let (reads, rng) = vm_trace(&sc, seed, &shared, v);
                    vms.push(Vm {
                        host: h,
                        start,
                        reads,
                        next: 0,
                        waiting: 0,
                        reading: false,
                        boot_done: None,
                        issued: 0,
                        failures: 0,
                        fetched: 0,
                        from_site: vec![0; sc.sites.len()],
                        rng,
                    });
                    q.schedule_at(start, Ev::VmStart(v));
                    host_vms.push(v);
                }
                first_start = first_start.min(host_start);
                hosts.push(Host {
                    node,
                    site: g.site,
                    sched: None,
                    store: empty_store.clone(),
                    conns: BTreeSet::new(),
                    have_peers: Vec::new(),
                    pending_have: Vec::new(),
                    flush_armed: false,
                    timer_at: None,
                    waiters: HashMap::new(),
                    vms: host_vms,
                    started: None,
                    lookup_pending: false,
                    bg_left: 0,
                    bg_done: None,
                    profile_left: 0,
                    fetched: 0,
                    from_site: vec![0; sc.sites.len()],
                    from_sources: 0,
                    duplicate: 0,
                });
            }
        }
        let lookup_delay = (0..sc.sites.len())
            .map(|s| routing::lookup_delay(&sc, s))
            .collect();
        let bg_hosts = match plan.background {
            Background::None => 0,
            _ => hosts.len() as u64,
        };
        let n_sites = sc.sites.len();
        // A node's rank as a gateway: its site's per-image scope (the node's per-site key) and its id.
        let image = manifest.id();
        let gateway_rank = nodes
            .iter()
            .enumerate()
            .map(|(id, n)| {
                let mut scope = image.0.to_vec();
                scope.extend_from_slice(sc.sites[n.site].name.as_bytes());
                gateway_rank(&scope, &(id as u32).to_le_bytes())
            })
            .collect();
        Ok(World {
            plan,
            seed,
            label,
            q,
            net,
            full: ChunkBitmap::full(chunks),
            manifest,
            content,
            profile,
            profile_set,
            nodes,
            vms_left: vms.len() as u64,
            bg_left: bg_hosts,
            bg_hosts,
            hosts,
            vms,
            sources,
            site_links,
            conns: HashMap::new(),
            providers: Vec::new(),
            lookup_delay,
            gateway_rank,
            routing_rng: ChaCha8Rng::seed_from_u64(substream(seed, STREAM_ROUTING, 0)),
            wan_out: vec![0.0; n_sites],
            wan_in: vec![0.0; n_sites],
            counters: Counters::default(),
            events: 0,
            last_rate_update: Instant::ZERO,
            first_start: if first_start == Instant::MAX {
                Instant::ZERO
            } else {
                first_start
            },
            sc,
        })
    }

    fn now(&self) -> Instant {
        self.q.now()
    }

    fn is_source(&self, n: NodeId) -> bool {
        n < self.sources
    }

    fn host_of(&self, n: NodeId) -> Option<u32> {
        n.checked_sub(self.sources)
    }

    fn rtt(&self, a: NodeId, b: NodeId) -> Duration {
        self.sc.rtt[self.nodes[a as usize].site][self.nodes[b as usize].site]
    }

    fn send(&mut self, from: NodeId, to: NodeId, msg: Msg) {
        let delay = self.rtt(from, to) / 2;
        self.q.schedule_in(delay, Ev::Msg { to, from, msg });
    }

    fn chunk_len(&self, index: u32) -> u64 {
        u64::from(self.manifest.chunk_len(index).unwrap_or(0))
    }

    fn progress(&self) -> Progress {
        Progress {
            now_s: secs(self.now()),
            events: self.events,
            vms_booted: self.vms.len() as u64 - self.vms_left,
            vms: self.vms.len() as u64,
            hosts_done: self.bg_hosts - self.bg_left,
            hosts_with_target: self.bg_hosts,
            flows: self.net.active_flows(),
        }
    }

    /// Runs to the end (every VM booted and every background target complete, or the time limit),
    /// calling `progress` every 2^16 events.
    pub fn run(mut self, progress: &mut dyn FnMut(&Progress)) -> RunResult {
        let limit = Instant::from_duration(self.sc.max_time);
        loop {
            if self.vms_left == 0 && self.bg_left == 0 {
                break;
            }
            // Rates change only when flows start or end: settle them before time moves on (or,
            // with a rate quantum, at most once per quantum).
            if self.net.has_changes() && self.q.peek_time().is_none_or(|t| t > self.now()) {
                let due = self.last_rate_update + self.sc.rate_quantum;
                if self.now() >= due {
                    self.net.update(self.now());
                    self.last_rate_update = self.now();
                } else if self.net.next_completion().is_none_or(|(t, _)| t > due)
                    && self.q.peek_time().is_none_or(|t| t > due)
                {
                    self.q.advance_to(due);
                    self.net.update(due);
                    self.last_rate_update = due;
                }
            }
            let next_event = self.q.peek_time();
            let next_flow = self.net.next_completion();
            let flow_first = match (next_flow, next_event) {
                (Some((tf, _)), Some(te)) => tf <= te,
                (Some(_), None) => true,
                (None, _) => false,
            };
            if flow_first {
                let Some((at, flow)) = next_flow else {
                    break;
                };
                if at > limit {
                    self.counters.stopped_at_limit = true;
                    break;
                }
                self.q.advance_to(at);
                self.flow_done(flow);
            } else {
                let Some((now, ev)) = self.q.pop() else {
                    break;
                };
                if now > limit {
                    self.counters.stopped_at_limit = true;
                    break;
                }
                self.dispatch(ev);
            }
            self.events += 1;
            if self.events & 0xFFFF == 0 {
                progress(&self.progress());
            }
        }
        progress(&self.progress());
        self.finish()
    }

    fn dispatch(&mut self, ev: Ev) {
        match ev {
            Ev::HostStart(h) => self.host_start(h),
            Ev::VmStart(v) => self.vm_start(v),
            Ev::LookupDone(h) => self.lookup_done(h),
            Ev::Connect { host, peer } => self.connect(host, peer),
            Ev::Msg { to, from, msg } => self.message(to, from, msg),
            Ev::Timer(h) => self.timer(h),
            Ev::ReadIssue(v) => {
                let now = self.now();
                self.run_vm(v, now);
            }
            Ev::HaveFlush(h) => self.have_flush(h),
            Ev::ArrivingCheck {
                server,
                to,
                index,
                flow,
            } => {
                if self.nodes[server as usize].sending.get(&(to, index)) == Some(&flow) {
                    self.send(server, to, Msg::ChunkArriving { index });
                }
            }
            Ev::CwndTick { from, to } => self.cwnd_tick(from, to),
            Ev::HaveBatch { from, to, indices } => {
                let mut ids: Option<Vec<ChunkId>> = None;
                let now = self.now();
                for &peer in to.iter() {
                    // Our copies to `from` of these chunks stop counting towards the fan-out, and
                    // their times are the fan-out rule's measurements.
                    let rtt = self.rtt(peer, from);
                    let serve = &mut self.nodes[peer as usize].serve;
                    if serve.has_fanout_copies() {
                        let ids = ids
                            .get_or_insert_with(|| indices.iter().map(|&i| chunk_id(i)).collect());
                        serve.handle_peer_has(now, &from, Some(rtt), ids);
                    }
                    if let Some(h) = self.host_of(peer) {
                        self.on_host_message(
                            h,
                            from,
                            Msg::HaveUpdate {
                                indices: indices.clone(),
                            },
                        );
                    }
                }
            }
        }
    }

    fn message(&mut self, to: NodeId, from: NodeId, msg: Msg) {
        match msg {
            Msg::Request { priority, indices } => self.on_request(to, from, priority, indices),
            Msg::Cancel { indices } => self.on_cancel(to, from, &indices),
            Msg::Chunk { index } => self.on_chunk(to, from, index),
            other => {
                let Some(h) = self.host_of(to) else {
                    return; // sources ignore everything else
                };
                self.on_host_message(h, from, other);
            }
        }
    }

    fn finish(mut self) -> RunResult {
        let now = self.now();
        self.net.settle(now);
        for f in self.net.live_flows() {
            if let Some((t, sent)) = self.net.abort(now, f) {
                self.counters.flows_unfinished += 1;
                self.account(t, sent, true);
            }
        }
        let ns = self.net.stats();
        let c = &mut self.counters;
        c.events = self.events;
        let last_boot = self.vms.iter().filter_map(|v| v.boot_done).max();
        let last_bg = self.hosts.iter().filter_map(|h| h.bg_done).max();
        c.end_s = secs(
            now.max(last_boot.unwrap_or(now))
                .max(last_bg.unwrap_or(now)),
        );
        c.flows = ns.flows_started;
        c.solves = ns.solves;
        c.rate_updates = ns.updates;
        c.solved_flows = ns.solved_flows;
        c.max_utilisation = ns.max_utilisation;
        c.max_fluid_error = ns.max_fluid_error;
        let site_name = |s: usize| self.sc.sites[s].name.clone();
        let vms = self
            .vms
            .iter()
            .enumerate()
            .map(|(i, v)| VmRecord {
                vm: i as u32,
                host: v.host,
                site: site_name(self.hosts[v.host as usize].site),
                start_s: secs(v.start),
                boot_done_s: v.boot_done.map(secs),
                reads: v.issued,
                read_failures: v.failures,
                fetched_bytes: v.fetched,
                fetched_from_site: v.from_site.clone(),
            })
            .collect();
        let hosts = self
            .hosts
            .iter()
            .enumerate()
            .map(|(i, h)| HostRecord {
                host: i as u32,
                site: site_name(h.site),
                start_s: h.started.map(secs),
                background_done_s: h.bg_done.map(secs),
                chunks: h.store.count(),
                fetched_bytes: h.fetched,
                fetched_from_site: h.from_site.clone(),
                fetched_from_sources: h.from_sources,
                duplicate_bytes: h.duplicate,
                uploaded_bytes: self.nodes[h.node as usize].uploaded.round() as u64,
                peers: h.conns.len() as u32,
            })
            .collect();
        let links = self
            .net
            .links()
            .iter()
            .filter(|l| l.live && l.class != LinkClass::Window)
            .map(|l| LinkRecord {
                class: l.class.name().to_owned(),
                owner: match l.class {
                    LinkClass::HostUp | LinkClass::HostDown => format!("host{}", l.owner),
                    LinkClass::SourceUp | LinkClass::SourceDown => format!("source{}", l.owner),
                    _ => site_name(l.owner as usize),
                },
                capacity: l.capacity,
                bytes: l.bytes,
                peak_utilisation: l.peak,
            })
            .collect();
        let (series, bin_ns) = self.net.series();
        let series = LinkClass::ALL
            .iter()
            .filter(|c| **c != LinkClass::Window)
            .map(|c| {
                (
                    c.name().to_owned(),
                    series.iter().map(|b| b[*c as usize]).collect(),
                )
            })
            .collect();
        let source_egress = self.nodes[..self.sources as usize]
            .iter()
            .map(|n| n.uploaded)
            .sum();
        let u_s: f64 = self.sc.sources.iter().map(|s| s.nic_up).sum();
        let u_hosts: f64 = self
            .sc
            .hosts
            .iter()
            .map(|g| g.nic_up * f64::from(g.count))
            .sum();
        let d_min = self
            .sc
            .hosts
            .iter()
            .map(|g| g.nic_down)
            .fold(f64::INFINITY, f64::min);
        RunResult {
            scenario: self.sc.name.clone(),
            strategy: self.sc.strategy.name().to_owned(),
            label: self.label.clone(),
            seed: self.seed,
            sites: self.sc.sites.iter().map(|s| s.name.clone()).collect(),
            image_size: self.sc.image_size,
            chunk_size: self.sc.chunk_size,
            full_copy: self.plan.full_copy(),
            background_all: self.plan.background == Background::All,
            vms,
            hosts,
            links,
            wan_out: self.wan_out.clone(),
            wan_in: self.wan_in.clone(),
            source_egress,
            series_bin_s: bin_ns as f64 / 1e9,
            series,
            counters: {
                let mut k = self.counters.clone();
                let measured: Vec<(usize, f64)> = self
                    .nodes
                    .iter()
                    .filter_map(|n| {
                        let rule = n.serve.fanout_rule();
                        rule.chunk_time()
                            .map(|t| (rule.fanout(), t.as_secs_f64() * 1e3))
                    })
                    .collect();
                if !measured.is_empty() {
                    let n = measured.len() as f64;
                    k.fanout_measured_nodes = measured.len() as u64;
                    k.fanout_min = measured.iter().map(|m| m.0).min().unwrap_or(0) as u64;
                    k.fanout_max = measured.iter().map(|m| m.0).max().unwrap_or(0) as u64;
                    k.fanout_mean = measured.iter().map(|m| m.0 as f64).sum::<f64>() / n;
                    k.fanout_chunk_ms_mean = measured.iter().map(|m| m.1).sum::<f64>() / n;
                }
                k
            },
            kr_inputs: (u_s, u_hosts, d_min),
            first_start_s: secs(self.first_start),
        }
    }
}

/// Runs a scenario with a seed; `label` names the run in comparisons.
pub fn run(
    sc: Scenario,
    seed: u64,
    label: String,
    progress: &mut dyn FnMut(&Progress),
) -> Result<RunResult, WorldError> {
    Ok(World::new(sc, seed, label)?.run(progress))
}
