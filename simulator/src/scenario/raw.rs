//! The scenario file as written: serde structures mirroring the TOML, with quantities still as
//! text. Unknown keys are rejected. Checking values and converting units is [`super`]'s job.

use serde::Deserialize;

/// Which strategy every host follows (see [`crate::strategy`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Copy the whole image from the sources, then boot.
    Central,
    /// Copy the whole image from sources and peers (BitTorrent-like), then boot.
    SwarmFull,
    /// Read on demand from the sources only.
    LazyCentral,
    /// Read on demand from sources and peers, with locality; optional prefetch.
    Vmswarm,
    /// Stage the whole image on every host (`vmswarm stage`: boot profile first, then the rest,
    /// through the swarm), each host's VMs booting once its boot profile is staged.
    Multicast,
}

impl Strategy {
    /// All strategies, in the order reports list them.
    pub const ALL: [Strategy; 5] = [
        Strategy::Central,
        Strategy::SwarmFull,
        Strategy::LazyCentral,
        Strategy::Vmswarm,
        Strategy::Multicast,
    ];

    /// The name used in scenario files and reports.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Central => "central",
            Strategy::SwarmFull => "swarm-full",
            Strategy::LazyCentral => "lazy-central",
            Strategy::Vmswarm => "vmswarm",
            Strategy::Multicast => "multicast",
        }
    }

    /// Parses a strategy name as written in scenario files.
    pub fn from_name(name: &str) -> Option<Strategy> {
        Strategy::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// What a vmswarm host prefetches in the background while its VMs boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Prefetch {
    /// Nothing: only Demand reads.
    #[default]
    None,
    /// The chunks of the boot profile (the shared boot trace), in profile order.
    Profile,
    /// The whole image (boot profile first if `boot_profile` is set, else rarest first).
    All,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawScenario {
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) description: String,
    pub(crate) strategy: Strategy,
    pub(crate) image: RawImage,
    #[serde(default)]
    pub(crate) network: RawNetwork,
    pub(crate) sites: Vec<RawSite>,
    #[serde(default)]
    pub(crate) rtt: Vec<RawRtt>,
    pub(crate) hosts: Vec<RawHostGroup>,
    pub(crate) sources: Vec<RawSource>,
    pub(crate) boot: RawBoot,
    #[serde(default)]
    pub(crate) vmswarm: RawVmswarm,
    #[serde(default)]
    pub(crate) routing: RawRouting,
    #[serde(default)]
    pub(crate) protocol: RawProtocol,
    #[serde(default)]
    pub(crate) run: RawRun,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawImage {
    pub(crate) size: String,
    pub(crate) chunk_size: Option<String>,
    /// A content layout file (see `content`), relative to the scenario file.
    pub(crate) content: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawNetwork {
    pub(crate) intra_site_rtt_ms: Option<f64>,
    pub(crate) window: Option<String>,
    pub(crate) rate_quantum_ms: Option<f64>,
    pub(crate) initial_window: Option<String>,
    pub(crate) congestion: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSite {
    pub(crate) name: String,
    pub(crate) wan_up: Option<String>,
    pub(crate) wan_down: Option<String>,
    pub(crate) core: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRtt {
    pub(crate) a: String,
    pub(crate) b: String,
    pub(crate) ms: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHostGroup {
    pub(crate) site: String,
    pub(crate) count: u32,
    pub(crate) nic_up: String,
    pub(crate) nic_down: Option<String>,
    #[serde(default = "one")]
    pub(crate) vms: u32,
    #[serde(default)]
    pub(crate) start_s: f64,
    #[serde(default)]
    pub(crate) start_spread_s: f64,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSource {
    pub(crate) site: String,
    pub(crate) nic_up: String,
    pub(crate) nic_down: Option<String>,
    #[serde(default = "one")]
    pub(crate) count: u32,
    pub(crate) origin: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBoot {
    pub(crate) working_set: Option<f64>,
    pub(crate) extent_mean: Option<String>,
    pub(crate) read_size: Option<String>,
    pub(crate) think_ms: Option<f64>,
    pub(crate) read_ms: Option<f64>,
    pub(crate) shared: Option<f64>,
    pub(crate) trace: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawVmswarm {
    #[serde(default)]
    pub(crate) prefetch: Prefetch,
    #[serde(default)]
    pub(crate) boot_profile: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRouting {
    pub(crate) max_peers: Option<u32>,
    pub(crate) site_peers: Option<u32>,
    pub(crate) alpha: Option<u32>,
    pub(crate) have_batch_ms: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProtocol {
    pub(crate) max_in_flight_per_peer: Option<u32>,
    pub(crate) demand_reserved_slots: Option<u32>,
    pub(crate) request_timeout_ms: Option<f64>,
    pub(crate) demand_deadline_ms: Option<f64>,
    pub(crate) local_pending_wait_ms: Option<f64>,
    pub(crate) request_max_wait_ms: Option<f64>,
    pub(crate) site_assign_wait_ms: Option<f64>,
    pub(crate) demand_local_wait_ms: Option<f64>,
    pub(crate) demand_assign_wait_ms: Option<f64>,
    pub(crate) site_gateways: Option<usize>,
    pub(crate) hedge_delay_ms: Option<f64>,
    pub(crate) relay_retry_ms: Option<f64>,
    pub(crate) peer_rate_target: Option<String>,
    pub(crate) endgame_threshold: Option<u32>,
    pub(crate) endgame_max_requests: Option<u32>,
    pub(crate) timeout_backoff_ms: Option<f64>,
    pub(crate) no_source_retry_ms: Option<f64>,
    pub(crate) max_queued_per_peer: Option<u32>,
    pub(crate) max_active_uploads: Option<u32>,
    pub(crate) demand_fanout: Option<u32>,
    pub(crate) origin_demand_fanout: Option<u32>,
    pub(crate) fanout_from_rates: Option<bool>,
    pub(crate) background_fanout: Option<bool>,
    pub(crate) fanout_hold_ms: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRun {
    pub(crate) max_time_s: Option<f64>,
}
