//! Scenario files: what is simulated (sites, hosts, sources, the image, the boot access model, the
//! strategy and the protocol settings).
//!
//! This module decides what a valid scenario is and turns the TOML text (see `raw`) into checked
//! values in simulator units: bytes, bytes per second, [`Duration`]s, site indices. Every error names
//! the file and the field at fault. It does not decide anything about how the simulation runs.

mod overrides;
mod raw;

use crate::content::Content;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vmswarm_protocol::fetch;
use vmswarm_protocol::manifest::{self, MAX_CHUNKS};
use vmswarm_protocol::serve;

use crate::units::{self, UnitError};
pub use overrides::apply_override;
pub use raw::{Prefetch, Strategy};

/// Default RTT between two hosts of the same site (anchors.md: same zone 0.1 ms).
pub const DEFAULT_INTRA_SITE_RTT_MS: f64 = 0.1;
/// Default per-connection flow-control window: libp2p-quic's default `max_connection_data`
/// (15 MB; its per-stream `max_stream_data` is 10 MB, larger than any chunk).
pub const DEFAULT_WINDOW_BYTES: u64 = 15_000_000;
/// Default initial congestion window: quinn's (ten 1200-byte datagrams), which libp2p-quic keeps.
pub const DEFAULT_INITIAL_WINDOW_BYTES: u64 = 12_000;
/// Default cap on the peers (other than sources) a host connects to.
pub const DEFAULT_MAX_PEERS: u32 = 50;
/// Default `routing.site_peers`: one answer of the node's per-site provider key (Kademlia's k = 20,
/// `node/src/net/store.rs`).
pub const DEFAULT_SITE_PEERS: u32 = 20;
/// Kademlia's lookup parallelism.
pub const DEFAULT_ALPHA: u32 = 3;
/// Default interval at which a host batches its `HaveUpdate`s.
pub const DEFAULT_HAVE_BATCH_MS: f64 =
    vmswarm_protocol::wire::HAVE_UPDATE_INTERVAL.as_millis() as f64;
/// Default stop time of a run, in simulated seconds.
pub const DEFAULT_MAX_TIME_S: f64 = 86_400.0;

/// Errors from loading a scenario file.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file (or a trace file it names) could not be read.
    #[error("{file}: cannot read: {source}")]
    Io {
        /// The file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed, a field is missing or unknown, or has the wrong type.
    #[error("{file}: {message}")]
    Toml {
        /// The file.
        file: PathBuf,
        /// The parser's message (it names the key and the line).
        message: String,
    },
    /// A field has a value the simulator cannot use.
    #[error("{file}: {field}: {message}")]
    Invalid {
        /// The file.
        file: PathBuf,
        /// The field, as a TOML path (`hosts[0].site`).
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A `--set` override is malformed.
    #[error(
        "override {0:?}: expected KEY=VALUE with a dotted key, e.g. image.chunk_size=\"1 MiB\""
    )]
    Override(String),
}

/// A site (data center).
#[derive(Debug, Clone, PartialEq)]
pub struct Site {
    /// Its name, as peers announce it.
    pub name: String,
    /// WAN uplink capacity in bytes/s (`None`: not a bottleneck).
    pub wan_up: Option<f64>,
    /// WAN downlink capacity in bytes/s.
    pub wan_down: Option<f64>,
    /// Site core (aggregate switching) capacity in bytes/s, crossed by every flow inside the site.
    pub core: Option<f64>,
}

/// A group of identical hosts.
#[derive(Debug, Clone, PartialEq)]
pub struct HostGroup {
    /// Site index.
    pub site: usize,
    /// Number of hosts.
    pub count: u32,
    /// NIC upload capacity, bytes/s.
    pub nic_up: f64,
    /// NIC download capacity, bytes/s.
    pub nic_down: f64,
    /// VMs per host.
    pub vms: u32,
    /// Earliest VM start, seconds.
    pub start_s: f64,
    /// VM starts are uniform in `[start_s, start_s + start_spread_s]`.
    pub start_spread_s: f64,
}

/// A source server: holds the whole image from time zero, never fetches.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceSpec {
    /// Site index.
    pub site: usize,
    /// NIC upload capacity, bytes/s.
    pub nic_up: f64,
    /// NIC download capacity, bytes/s.
    pub nic_down: f64,
    /// It announces `Capabilities::ORIGIN` (a dedicated source server, as `vmswarm serve
    /// --origin`): hosts fetch each chunk from it once per site, even in its own site. Default
    /// true; false models an image published on an ordinary node.
    pub origin: bool,
}

/// One read of a recorded boot trace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TraceRead {
    /// Byte offset in the image.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Think time before the next read, if the trace records it.
    pub think: Option<Duration>,
}

/// How booting VMs read their image.
#[derive(Debug, Clone, PartialEq)]
pub struct BootSpec {
    /// Fraction of the image a VM reads while booting (model only).
    pub working_set: f64,
    /// Mean length of a contiguous extent (a file) read during boot, bytes.
    pub extent_mean: u64,
    /// Largest single read request, bytes (an extent is read in pieces of this size).
    pub read_size: u64,
    /// Mean think time between two reads (exponentially distributed).
    pub think_mean: Duration,
    /// What each read costs the host's block export once its chunks are local (the NBD round
    /// trip, the store read, the reply), added to every read; zero models a free export.
    /// `vmswarm-testnet compare` sets it to what the testnet's VMs measured for local reads.
    pub read_service: Duration,
    /// Fraction of the working set common to all VMs of the image; the rest is per VM.
    pub shared: f64,
    /// A recorded trace that replaces the model's shared reads.
    pub trace: Option<Vec<TraceRead>>,
}

/// Content-routing and peer-set model.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    /// Most non-source peers a host connects to by itself, from the image's fleet-wide provider
    /// records.
    pub max_peers: u32,
    /// Most same-site peers a host connects to from the image's per-site provider records (in
    /// addition to `max_peers`).
    pub site_peers: u32,
    /// Kademlia lookup parallelism.
    pub alpha: u32,
    /// `HaveUpdate` batching interval.
    pub have_batch: Duration,
}

/// A checked scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Short name, used in reports.
    pub name: String,
    /// Free text.
    pub description: String,
    /// The file it came from.
    pub file: PathBuf,
    /// The strategy all hosts follow.
    pub strategy: Strategy,
    /// Image size, bytes.
    pub image_size: u64,
    /// Chunk size, bytes.
    pub chunk_size: u32,
    /// Which chunks are zero or share content; `None`: all distinct. A layout set by hand must
    /// describe [`Scenario::chunk_count`] chunks ([`crate::world::World::new`] checks).
    pub content: Option<Content>,
    /// RTT between two nodes of the same site.
    pub intra_site_rtt: Duration,
    /// Per-connection flow-control window, bytes.
    pub window: f64,
    /// Initial congestion window of a connection, bytes (`network.initial_window`); zero when the
    /// congestion model is off (`network.congestion = false`: a connection is then capped by
    /// `window` / RTT only, as before the model existed). The model: `world::links`.
    pub initial_window: f64,
    /// Rates are recomputed at most once per this interval (zero: at every flow start and end).
    /// A flow then starts up to this late and a finished flow's bandwidth is handed on up to this
    /// late; rates stay feasible.
    pub rate_quantum: Duration,
    /// Sites.
    pub sites: Vec<Site>,
    /// RTT between sites, `rtt[a][b]`; the diagonal is `intra_site_rtt`.
    pub rtt: Vec<Vec<Duration>>,
    /// Host groups.
    pub hosts: Vec<HostGroup>,
    /// Source servers (one entry per server).
    pub sources: Vec<SourceSpec>,
    /// Boot access model.
    pub boot: BootSpec,
    /// vmswarm's background prefetch.
    pub prefetch: Prefetch,
    /// vmswarm: order background fetches by the boot profile.
    pub boot_profile: bool,
    /// Content routing.
    pub routing: Routing,
    /// Fetch scheduler settings (its `local_site` is set per host).
    pub fetch: fetch::Config,
    /// Serve queue settings.
    pub serve: serve::Config,
    /// The run stops at this simulated time even if VMs are still booting.
    pub max_time: Duration,
}

impl Scenario {
    /// Loads and checks a scenario file, applying `overrides` (`key=value`, TOML values) first.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Io {
            file: path.to_owned(),
            source,
        })?;
        Scenario::parse(&text, path, overrides)
    }

    /// Parses and checks scenario text; `file` names it in errors and anchors relative trace paths.
    pub fn parse(text: &str, file: &Path, overrides: &[String]) -> Result<Scenario, ScenarioError> {
        let toml_err = |e: toml::de::Error| ScenarioError::Toml {
            file: file.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        };
        let raw: raw::RawScenario = if overrides.is_empty() {
            toml::from_str(text).map_err(toml_err)?
        } else {
            let mut table: toml::Table = toml::from_str(text).map_err(toml_err)?;
            for o in overrides {
                apply_override(&mut table, o)?;
            }
            let merged = toml::to_string(&table).map_err(|e| ScenarioError::Toml {
                file: file.to_owned(),
                message: e.to_string(),
            })?;
            toml::from_str(&merged).map_err(toml_err)?
        };
        Checker { file }.check(raw)
    }

    /// Number of chunks in the image.
    pub fn chunk_count(&self) -> u32 {
        u32::try_from(self.image_size.div_ceil(u64::from(self.chunk_size))).unwrap_or(u32::MAX)
    }

    /// Total number of hosts.
    pub fn host_count(&self) -> u32 {
        self.hosts.iter().map(|g| g.count).sum()
    }

    /// Total number of VMs.
    pub fn vm_count(&self) -> u64 {
        self.hosts
            .iter()
            .map(|g| u64::from(g.count) * u64::from(g.vms))
            .sum()
    }
}

struct Checker<'a> {
    file: &'a Path,
}

impl Checker<'_> {
    fn invalid(&self, field: impl Into<String>, message: impl Into<String>) -> ScenarioError {
        ScenarioError::Invalid {
            file: self.file.to_owned(),
            field: field.into(),
            message: message.into(),
        }
    }

    fn unit(&self, field: &str, e: UnitError) -> ScenarioError {
        self.invalid(field, e.to_string())
    }

    fn size(&self, field: &str, text: &str) -> Result<u64, ScenarioError> {
        units::parse_size(text).map_err(|e| self.unit(field, e))
    }

    fn rate(&self, field: &str, text: &str) -> Result<f64, ScenarioError> {
        units::parse_rate(text).map_err(|e| self.unit(field, e))
    }

    fn ms(&self, field: &str, ms: f64, allow_zero: bool) -> Result<Duration, ScenarioError> {
        let ok = ms.is_finite() && (ms > 0.0 || (allow_zero && ms == 0.0)) && ms < 1e12;
        if !ok {
            let what = if allow_zero {
                "non-negative"
            } else {
                "positive"
            };
            return Err(self.invalid(field, format!("{ms} must be a {what} number of ms")));
        }
        Ok(Duration::from_secs_f64(ms / 1000.0))
    }

    fn fraction(&self, field: &str, v: f64) -> Result<f64, ScenarioError> {
        if v.is_finite() && v > 0.0 && v <= 1.0 {
            Ok(v)
        } else {
            Err(self.invalid(field, format!("{v} must be in (0, 1]")))
        }
    }

    fn site_index(&self, field: &str, sites: &[Site], name: &str) -> Result<usize, ScenarioError> {
        sites.iter().position(|s| s.name == name).ok_or_else(|| {
            let known: Vec<&str> = sites.iter().map(|s| s.name.as_str()).collect();
            self.invalid(
                field,
                format!("unknown site {name:?} (sites: {})", known.join(", ")),
            )
        })
    }

    fn check(&self, raw: raw::RawScenario) -> Result<Scenario, ScenarioError> {
        if raw.name.trim().is_empty() {
            return Err(self.invalid("name", "must not be empty"));
        }
        // Image.
        let image_size = self.size("image.size", &raw.image.size)?;
        let chunk_size = match &raw.image.chunk_size {
            Some(t) => self.size("image.chunk_size", t)?,
            None => u64::from(manifest::DEFAULT_CHUNK_SIZE),
        };
        let chunk_size =
            u32::try_from(chunk_size).map_err(|_| self.invalid("image.chunk_size", "too large"))?;
        manifest::check_chunk_size(chunk_size)
            .map_err(|e| self.invalid("image.chunk_size", e.to_string()))?;
        let chunks = image_size.div_ceil(u64::from(chunk_size));
        if chunks > u64::from(MAX_CHUNKS) {
            return Err(self.invalid(
                "image.size",
                format!("{chunks} chunks is more than a manifest can list ({MAX_CHUNKS})"),
            ));
        }
        let content = match &raw.image.content {
            None => None,
            Some(rel) => {
                let base = self.file.parent().unwrap_or(Path::new("."));
                let c = Content::load(&base.join(rel))
                    .map_err(|e| self.invalid("image.content", e.to_string()))?;
                c.check_len(chunks as u32)
                    .map_err(|e| self.invalid("image.content", e.to_string()))?;
                Some(c)
            }
        };

        // Network and sites.
        let intra_ms = raw
            .network
            .intra_site_rtt_ms
            .unwrap_or(DEFAULT_INTRA_SITE_RTT_MS);
        let intra_site_rtt = self.ms("network.intra_site_rtt_ms", intra_ms, false)?;
        let window = match &raw.network.window {
            Some(t) => self.size("network.window", t)? as f64,
            None => DEFAULT_WINDOW_BYTES as f64,
        };
        let initial_window = match (&raw.network.initial_window, raw.network.congestion) {
            (_, Some(false)) => 0.0,
            (Some(t), _) => self.size("network.initial_window", t)? as f64,
            (None, _) => DEFAULT_INITIAL_WINDOW_BYTES as f64,
        };
        let rate_quantum = self.ms(
            "network.rate_quantum_ms",
            raw.network.rate_quantum_ms.unwrap_or(0.0),
            true,
        )?;
        if raw.sites.is_empty() {
            return Err(self.invalid("sites", "at least one site is needed"));
        }
        let mut sites = Vec::with_capacity(raw.sites.len());
        for (i, s) in raw.sites.iter().enumerate() {
            let f = |k: &str| format!("sites[{i}].{k}");
            if s.name.trim().is_empty() {
                return Err(self.invalid(f("name"), "must not be empty"));
            }
            if sites.iter().any(|o: &Site| o.name == s.name) {
                return Err(self.invalid(f("name"), format!("site {:?} is listed twice", s.name)));
            }
            let opt_rate = |k: &str, v: &Option<String>| -> Result<Option<f64>, ScenarioError> {
                v.as_deref().map(|t| self.rate(&f(k), t)).transpose()
            };
            sites.push(Site {
                name: s.name.clone(),
                wan_up: opt_rate("wan_up", &s.wan_up)?,
                wan_down: opt_rate("wan_down", &s.wan_down)?,
                core: opt_rate("core", &s.core)?,
            });
        }
        let n = sites.len();
        let mut rtt: Vec<Vec<Option<Duration>>> = vec![vec![None; n]; n];
        for (i, row) in rtt.iter_mut().enumerate() {
            row[i] = Some(intra_site_rtt);
        }
        for (i, r) in raw.rtt.iter().enumerate() {
            let a = self.site_index(&format!("rtt[{i}].a"), &sites, &r.a)?;
            let b = self.site_index(&format!("rtt[{i}].b"), &sites, &r.b)?;
            if a == b {
                return Err(self.invalid(
                    format!("rtt[{i}]"),
                    "an RTT is between two different sites (set network.intra_site_rtt_ms)",
                ));
            }
            let d = self.ms(&format!("rtt[{i}].ms"), r.ms, false)?;
            if rtt[a][b].is_some() {
                return Err(self.invalid(
                    format!("rtt[{i}]"),
                    format!("the RTT between {:?} and {:?} is given twice", r.a, r.b),
                ));
            }
            rtt[a][b] = Some(d);
            rtt[b][a] = Some(d);
        }
        let mut matrix = vec![vec![Duration::ZERO; n]; n];
        for a in 0..n {
            for b in 0..n {
                matrix[a][b] = rtt[a][b].ok_or_else(|| {
                    self.invalid(
                        "rtt",
                        format!(
                            "no RTT between sites {:?} and {:?}",
                            sites[a].name, sites[b].name
                        ),
                    )
                })?;
            }
        }

        // Hosts and sources.
        if raw.hosts.is_empty() {
            return Err(self.invalid("hosts", "at least one host group is needed"));
        }
        let mut hosts = Vec::new();
        for (i, h) in raw.hosts.iter().enumerate() {
            let f = |k: &str| format!("hosts[{i}].{k}");
            let site = self.site_index(&f("site"), &sites, &h.site)?;
            if h.count == 0 {
                return Err(self.invalid(f("count"), "must be at least 1"));
            }
            if h.vms == 0 {
                return Err(self.invalid(f("vms"), "must be at least 1"));
            }
            let nic_up = self.rate(&f("nic_up"), &h.nic_up)?;
            let nic_down = match &h.nic_down {
                Some(t) => self.rate(&f("nic_down"), t)?,
                None => nic_up,
            };
            for (k, v) in [("start_s", h.start_s), ("start_spread_s", h.start_spread_s)] {
                if !(v.is_finite() && v >= 0.0) {
                    return Err(self.invalid(f(k), format!("{v} must be a non-negative number")));
                }
            }
            hosts.push(HostGroup {
                site,
                count: h.count,
                nic_up,
                nic_down,
                vms: h.vms,
                start_s: h.start_s,
                start_spread_s: h.start_spread_s,
            });
        }
        let total_hosts: u64 = hosts.iter().map(|g| u64::from(g.count)).sum();
        if total_hosts > 1_000_000 {
            return Err(self.invalid("hosts", "more than 1,000,000 hosts"));
        }
        if raw.sources.is_empty() {
            return Err(self.invalid("sources", "at least one source server is needed"));
        }
        let mut sources = Vec::new();
        for (i, s) in raw.sources.iter().enumerate() {
            let f = |k: &str| format!("sources[{i}].{k}");
            let site = self.site_index(&f("site"), &sites, &s.site)?;
            if s.count == 0 {
                return Err(self.invalid(f("count"), "must be at least 1"));
            }
            let nic_up = self.rate(&f("nic_up"), &s.nic_up)?;
            let nic_down = match &s.nic_down {
                Some(t) => self.rate(&f("nic_down"), t)?,
                None => nic_up,
            };
            for _ in 0..s.count {
                sources.push(SourceSpec {
                    site,
                    nic_up,
                    nic_down,
                    origin: s.origin.unwrap_or(true),
                });
            }
        }

        let boot = self.boot(&raw.boot, image_size)?;
        let routing = Routing {
            max_peers: raw.routing.max_peers.unwrap_or(DEFAULT_MAX_PEERS),
            site_peers: raw.routing.site_peers.unwrap_or(DEFAULT_SITE_PEERS),
            alpha: raw.routing.alpha.unwrap_or(DEFAULT_ALPHA),
            have_batch: self.ms(
                "routing.have_batch_ms",
                raw.routing.have_batch_ms.unwrap_or(DEFAULT_HAVE_BATCH_MS),
                true,
            )?,
        };
        if routing.alpha == 0 {
            return Err(self.invalid("routing.alpha", "must be at least 1"));
        }
        let (fetch, serve) = self.protocol(&raw.protocol)?;
        let max_time = self.ms(
            "run.max_time_s",
            raw.run.max_time_s.unwrap_or(DEFAULT_MAX_TIME_S) * 1000.0,
            false,
        )?;
        if raw.vmswarm.boot_profile && raw.vmswarm.prefetch == Prefetch::None {
            return Err(self.invalid(
                "vmswarm.boot_profile",
                "orders background prefetch, so it needs vmswarm.prefetch = \"profile\" or \"all\"",
            ));
        }

        Ok(Scenario {
            name: raw.name,
            description: raw.description,
            file: self.file.to_owned(),
            strategy: raw.strategy,
            image_size,
            chunk_size,
            content,
            intra_site_rtt,
            window,
            initial_window,
            rate_quantum,
            sites,
            rtt: matrix,
            hosts,
            sources,
            boot,
            prefetch: raw.vmswarm.prefetch,
            boot_profile: raw.vmswarm.boot_profile,
            routing,
            fetch,
            serve,
            max_time,
        })
    }

    fn boot(&self, b: &raw::RawBoot, image_size: u64) -> Result<BootSpec, ScenarioError> {
        let working_set = self.fraction("boot.working_set", b.working_set.unwrap_or(0.05))?;
        let shared = self.fraction("boot.shared", b.shared.unwrap_or(1.0))?;
        let extent_mean = match &b.extent_mean {
            Some(t) => self.size("boot.extent_mean", t)?,
            None => 512 * 1024,
        };
        let read_size = match &b.read_size {
            Some(t) => self.size("boot.read_size", t)?,
            None => 128 * 1024,
        };
        let think_mean = self.ms("boot.think_ms", b.think_ms.unwrap_or(1.0), true)?;
        let read_service = self.ms("boot.read_ms", b.read_ms.unwrap_or(0.0), true)?;
        let trace = match &b.trace {
            None => None,
            Some(rel) => {
                let base = self.file.parent().unwrap_or(Path::new("."));
                let path = base.join(rel);
                Some(self.trace(&path, image_size)?)
            }
        };
        Ok(BootSpec {
            working_set,
            extent_mean,
            read_size,
            think_mean,
            read_service,
            shared,
            trace,
        })
    }

    /// A trace file: one read per line, `offset,length[,think_ms]` in bytes; `#` starts a comment.
    fn trace(&self, path: &Path, image_size: u64) -> Result<Vec<TraceRead>, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Io {
            file: path.to_owned(),
            source,
        })?;
        let bad = |line: usize, msg: String| ScenarioError::Invalid {
            file: path.to_owned(),
            field: format!("line {line}"),
            message: msg,
        };
        let mut reads = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line_no = i + 1;
            let content = line.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            let fields: Vec<&str> = content.split(',').map(str::trim).collect();
            if !(2..=3).contains(&fields.len()) {
                return Err(bad(line_no, "expected offset,length[,think_ms]".into()));
            }
            let num = |s: &str, what: &str| -> Result<u64, ScenarioError> {
                s.parse::<u64>()
                    .map_err(|_| bad(line_no, format!("{what} {s:?} is not a whole number")))
            };
            let offset = num(fields[0], "offset")?;
            let len = num(fields[1], "length")?;
            if len == 0 || offset.saturating_add(len) > image_size {
                return Err(bad(
                    line_no,
                    format!("read {offset}+{len} is empty or past the image end ({image_size})"),
                ));
            }
            let think = match fields.get(2) {
                None => None,
                Some(s) => {
                    let ms: f64 = s
                        .parse()
                        .map_err(|_| bad(line_no, format!("think_ms {s:?} is not a number")))?;
                    if !(ms.is_finite() && ms >= 0.0) {
                        return Err(bad(line_no, format!("think_ms {ms} must be >= 0")));
                    }
                    Some(Duration::from_secs_f64(ms / 1000.0))
                }
            };
            reads.push(TraceRead { offset, len, think });
        }
        if reads.is_empty() {
            return Err(bad(0, "the trace holds no reads".into()));
        }
        Ok(reads)
    }

    fn protocol(
        &self,
        p: &raw::RawProtocol,
    ) -> Result<(fetch::Config, serve::Config), ScenarioError> {
        let mut f = fetch::Config::default();
        let mut s = serve::Config::default();
        let ms = |field: &str, v: Option<f64>, d: &mut Duration| -> Result<(), ScenarioError> {
            if let Some(v) = v {
                *d = self.ms(&format!("protocol.{field}"), v, false)?;
            }
            Ok(())
        };
        if let Some(v) = p.max_in_flight_per_peer {
            f.max_in_flight_per_peer = v;
        }
        if let Some(v) = p.demand_reserved_slots {
            f.demand_reserved_slots = v;
        }
        ms(
            "request_timeout_ms",
            p.request_timeout_ms,
            &mut f.request_timeout,
        )?;
        ms(
            "demand_deadline_ms",
            p.demand_deadline_ms,
            &mut f.demand_deadline,
        )?;
        ms(
            "local_pending_wait_ms",
            p.local_pending_wait_ms,
            &mut f.local_pending_wait,
        )?;
        ms(
            "request_max_wait_ms",
            p.request_max_wait_ms,
            &mut f.request_max_wait,
        )?;
        ms(
            "site_assign_wait_ms",
            p.site_assign_wait_ms,
            &mut f.site_assign_wait,
        )?;
        ms(
            "demand_local_wait_ms",
            p.demand_local_wait_ms,
            &mut f.demand_local_wait,
        )?;
        ms(
            "demand_assign_wait_ms",
            p.demand_assign_wait_ms,
            &mut f.demand_assign_wait,
        )?;
        if let Some(v) = p.site_gateways {
            if v > vmswarm_protocol::site::SITE_GATEWAYS {
                return Err(self.invalid(
                    "protocol.site_gateways",
                    format!(
                        "{v}: at most {} (one per-site lookup's answer)",
                        vmswarm_protocol::site::SITE_GATEWAYS
                    ),
                ));
            }
            f.site_gateways = v;
        }
        ms("hedge_delay_ms", p.hedge_delay_ms, &mut f.hedge_delay)?;
        ms("relay_retry_ms", p.relay_retry_ms, &mut f.relay_retry)?;
        if let Some(v) = &p.peer_rate_target {
            let rate = self.rate("protocol.peer_rate_target", v)?;
            f.peer_rate_target = rate.round() as u64;
        }
        if let Some(v) = p.endgame_threshold {
            f.endgame_threshold = v;
        }
        if let Some(v) = p.endgame_max_requests {
            f.endgame_max_requests = v;
        }
        ms(
            "timeout_backoff_ms",
            p.timeout_backoff_ms,
            &mut f.timeout_backoff,
        )?;
        ms(
            "no_source_retry_ms",
            p.no_source_retry_ms,
            &mut f.no_source_retry,
        )?;
        if let Some(v) = p.max_queued_per_peer {
            if v == 0 {
                return Err(self.invalid("protocol.max_queued_per_peer", "must be at least 1"));
            }
            s.max_queued_per_peer = v as usize;
        }
        if let Some(v) = p.max_active_uploads {
            if v == 0 {
                return Err(self.invalid("protocol.max_active_uploads", "must be at least 1"));
            }
            s.max_active_uploads = v as usize;
        }
        if let Some(v) = p.demand_fanout {
            s.demand_fanout = v as usize;
        }
        if let Some(v) = p.fanout_from_rates {
            s.fanout_from_rates = v;
        }
        if let Some(v) = p.background_fanout {
            s.background_fanout = v;
        }
        if let Some(v) = p.origin_demand_fanout {
            s.origin_demand_fanout = v as usize;
        }
        let mut hold = s.fanout_hold;
        ms("fanout_hold_ms", p.fanout_hold_ms, &mut hold)?;
        s.fanout_hold = hold;
        // Let the scheduler itself judge the combination (it knows its rules).
        fetch::FetchScheduler::<u32>::new(f.clone(), 1, 0)
            .map_err(|e| self.invalid("protocol", e.to_string()))?;
        Ok((f, s))
    }
}

#[cfg(test)]
mod tests;
