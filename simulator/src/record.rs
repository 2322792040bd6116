//! What a run produces: per-VM, per-host and per-link records, the byte series per link class, and
//! run-wide counters. Plain data, filled in by the world and read by checks and reports; this
//! module decides nothing.

use serde::Serialize;

/// One VM.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VmRecord {
    /// VM index.
    pub vm: u32,
    /// Host index.
    pub host: u32,
    /// Site name.
    pub site: String,
    /// When it was started, s.
    pub start_s: f64,
    /// When its last boot read completed, s (`None`: not booted when the run stopped).
    pub boot_done_s: Option<f64>,
    /// Reads it issued.
    pub reads: u64,
    /// Reads that failed (a Demand want's deadline passed) and were retried.
    pub read_failures: u64,
    /// Bytes fetched for this VM's reads (chunks it was the first on its host to wait for).
    pub fetched_bytes: u64,
    /// Of those, per site of the sender (same order as the run's site list).
    pub fetched_from_site: Vec<u64>,
}

impl VmRecord {
    /// Boot time (done - start), s.
    pub fn boot_s(&self) -> Option<f64> {
        self.boot_done_s.map(|d| d - self.start_s)
    }
}

/// One host.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostRecord {
    /// Host index.
    pub host: u32,
    /// Site name.
    pub site: String,
    /// When it started fetching, s.
    pub start_s: Option<f64>,
    /// When its background target (full image or profile) was complete, s.
    pub background_done_s: Option<f64>,
    /// Chunks it holds at the end.
    pub chunks: u32,
    /// Bytes it fetched (accepted chunks).
    pub fetched_bytes: u64,
    /// Of those, per site of the sender.
    pub fetched_from_site: Vec<u64>,
    /// Of those, from source servers.
    pub fetched_from_sources: u64,
    /// Bytes received but discarded (duplicates: endgame, or a re-request that crossed a delivery).
    pub duplicate_bytes: u64,
    /// Bytes it uploaded to peers.
    pub uploaded_bytes: u64,
    /// Peers (hosts and sources) it was connected to at the end.
    pub peers: u32,
}

/// One link.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LinkRecord {
    /// Class name (`host_up`, `wan_down`, ...).
    pub class: String,
    /// Owner: `host17`, `source0`, or a site name.
    pub owner: String,
    /// Capacity, bytes/s.
    pub capacity: f64,
    /// Bytes that crossed it.
    pub bytes: f64,
    /// Highest utilisation seen (load / capacity).
    pub peak_utilisation: f64,
}

/// Run-wide counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Counters {
    /// Events processed.
    pub events: u64,
    /// Simulated time at the end, s.
    pub end_s: f64,
    /// Whether the run hit `run.max_time_s` before every VM booted.
    pub stopped_at_limit: bool,
    /// Flows (chunk transfers) started.
    pub flows: u64,
    /// Of those, aborted because the requester cancelled.
    pub flows_aborted: u64,
    /// Flows still running at the end (aborted for accounting).
    pub flows_unfinished: u64,
    /// Rate updates (a batch of flow starts and ends at one instant).
    pub rate_updates: u64,
    /// Max-min solves (an update solves a growing region until nothing outside changes).
    pub solves: u64,
    /// Flows taken into rate recomputations, summed.
    pub solved_flows: u64,
    /// Request messages sent (one per Request action).
    pub requests: u64,
    /// Chunk indices requested in all.
    pub requested_chunks: u64,
    /// Cancel messages.
    pub cancels: u64,
    /// `Reject { Busy }` answers.
    pub busy_rejects: u64,
    /// `Reject { Fanout }` answers (a Demand chunk already on its way to `serve.demand_fanout`
    /// other peers).
    pub fanout_rejects: u64,
    /// `Need` messages (a blocked host telling its site gateway, `fetch::Action::Need`).
    pub needs: u64,
    /// Bytes that crossed a WAN link into a site gateway (`site`), summed over sites.
    pub wan_in_gateway_bytes: f64,
    /// Bytes that crossed a WAN link at Demand priority into a host that is not a gateway.
    pub wan_in_demand_bytes: f64,
    /// Nodes whose fan-out rule measured at least one Demand copy, at the end of the run.
    pub fanout_measured_nodes: u64,
    /// Their smallest fan-out in use at the end.
    pub fanout_min: u64,
    /// Their mean fan-out in use at the end.
    pub fanout_mean: f64,
    /// Their largest fan-out in use at the end.
    pub fanout_max: u64,
    /// Their measured time to upload one chunk (`fanout::FanoutRule`), mean in milliseconds.
    pub fanout_chunk_ms_mean: f64,
    /// Chunk writes that waited for room in a full send buffer (holding an upload slot).
    pub writes_waited: u64,
    /// `NoSource` events.
    pub no_source_events: u64,
    /// `WantFailed` events (Demand deadlines passed).
    pub want_failures: u64,
    /// Content-routing lookups.
    pub lookups: u64,
    /// Connections made.
    pub connections: u64,
    /// `HaveUpdate` messages sent.
    pub have_updates: u64,
    /// Bytes sent by all nodes (completed flows and the sent part of aborted ones).
    pub bytes_sent: f64,
    /// Bytes of chunks that reached their receiver (counted on arrival, accepted or discarded).
    pub bytes_delivered: f64,
    /// Bytes of chunks fully sent but still propagating when the run stopped.
    pub bytes_in_transit: f64,
    /// Bytes of aborted or unfinished flows (wasted).
    pub bytes_wasted: f64,
    /// Highest link utilisation seen (must not exceed 1).
    pub max_utilisation: f64,
    /// Largest difference between a flow's integrated rate and its size, in bytes, beyond the
    /// nanosecond rounding of completion instants.
    pub max_fluid_error: f64,
}

/// Everything a run produced.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunResult {
    /// Scenario name.
    pub scenario: String,
    /// Strategy name.
    pub strategy: String,
    /// Label used in comparisons (scenario, strategy, overrides).
    pub label: String,
    /// Seed.
    pub seed: u64,
    /// Site names.
    pub sites: Vec<String>,
    /// Image size, bytes.
    pub image_size: u64,
    /// Chunk size, bytes.
    pub chunk_size: u32,
    /// Whether VMs boot only after a full copy.
    pub full_copy: bool,
    /// Whether every host's background target is the whole image (full copy or prefetch all).
    pub background_all: bool,
    /// VMs.
    pub vms: Vec<VmRecord>,
    /// Hosts.
    pub hosts: Vec<HostRecord>,
    /// Physical links.
    pub links: Vec<LinkRecord>,
    /// Bytes leaving each site over the WAN.
    pub wan_out: Vec<f64>,
    /// Bytes entering each site over the WAN.
    pub wan_in: Vec<f64>,
    /// Bytes uploaded by source servers.
    pub source_egress: f64,
    /// Bin width of `series`, s.
    pub series_bin_s: f64,
    /// Bytes per link class per bin: `(class name, bytes per bin)`.
    pub series: Vec<(String, Vec<f64>)>,
    /// Counters.
    pub counters: Counters,
    /// Kumar-Ross inputs: source upload, sum of host uploads, slowest host download (bytes/s).
    pub kr_inputs: (f64, f64, f64),
    /// Earliest host start, s.
    pub first_start_s: f64,
}
