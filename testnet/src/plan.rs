//! What a testnet looks like, decided before anything is created: names, addresses, links.
//!
//! Site `s` gets the subnet `10.s.0.0/24` behind a bridge `brs` in the router namespace (address
//! `10.s.0.1`, the site's gateway); node `n` of site `s` lives in its own namespace with one veth
//! interface `eth0` at `10.s.0.(n+2)`, whose peer `hsnn` in the router namespace is a port of the
//! site's bridge. Namespace names carry the testnet's id, so several testnets can exist at once.
//! In loopback fallback mode every node listens on 127.0.0.1 with its own port instead.

use std::net::Ipv4Addr;
use std::time::Duration;

use crate::wan::model::WanConfig;

/// The largest number of sites and nodes per site the address plan supports.
pub const MAX_SITES: usize = 200;
/// See [`MAX_SITES`].
pub const MAX_NODES_PER_SITE: usize = 200;
/// UDP port every node listens on (inside its own namespace).
pub const NODE_PORT: u16 = 7400;

/// Mistakes in what the user asked for.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    /// Sites or nodes out of range.
    #[error("{what} must be between 1 and {max}, not {got}")]
    OutOfRange {
        /// Which parameter.
        what: &'static str,
        /// The limit.
        max: usize,
        /// What was given.
        got: usize,
    },
    /// `--wan` has the wrong number of entries.
    #[error(
        "--wan needs one RTT for all site pairs or one per pair ({pairs} for {sites} sites, in the order 0-1, 0-2, ..., 1-2, ...), not {got}"
    )]
    WanCount {
        /// Sites.
        sites: usize,
        /// Pairs.
        pairs: usize,
        /// Entries given.
        got: usize,
    },
    /// A duration that does not parse.
    #[error("bad duration {0:?}: expected a number with unit us, ms or s (e.g. 31ms)")]
    Duration(String),
    /// A bandwidth that does not parse.
    #[error("bad bandwidth {0:?}: expected a number with unit kbit, mbit or gbit (e.g. 200mbit)")]
    Bandwidth(String),
}

/// Parses `31ms`, `0.5s`, `800us`.
pub fn parse_duration(s: &str) -> Result<Duration, PlanError> {
    let t = s.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else {
        return Err(PlanError::Duration(s.to_owned()));
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| PlanError::Duration(s.to_owned()))?;
    if !v.is_finite() || !(0.0..=3600.0).contains(&v) {
        return Err(PlanError::Duration(s.to_owned()));
    }
    Ok(Duration::from_secs_f64(v * scale))
}

/// Parses `200mbit`, `1gbit`, `500kbit` into bits per second.
pub fn parse_bandwidth(s: &str) -> Result<u64, PlanError> {
    let t = s.trim().to_ascii_lowercase();
    let (num, scale) = if let Some(n) = t.strip_suffix("gbit") {
        (n.to_owned(), 1e9)
    } else if let Some(n) = t.strip_suffix("mbit") {
        (n.to_owned(), 1e6)
    } else if let Some(n) = t.strip_suffix("kbit") {
        (n.to_owned(), 1e3)
    } else {
        return Err(PlanError::Bandwidth(s.to_owned()));
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| PlanError::Bandwidth(s.to_owned()))?;
    let bps = v * scale;
    if !bps.is_finite() || !(8_000.0..=1e12).contains(&bps) {
        return Err(PlanError::Bandwidth(s.to_owned()));
    }
    Ok(bps as u64)
}

/// The RTT matrix from `--wan`: one value for every pair, or one per pair in the order
/// 0-1, 0-2, ..., 0-(n-1), 1-2, ...
pub fn rtt_matrix(sites: usize, wan: &[Duration]) -> Result<Vec<Vec<Duration>>, PlanError> {
    let pairs = sites * (sites - 1) / 2;
    let mut m = vec![vec![Duration::ZERO; sites]; sites];
    if wan.len() != 1 && wan.len() != pairs {
        return Err(PlanError::WanCount {
            sites,
            pairs,
            got: wan.len(),
        });
    }
    let pair_list = (0..sites).flat_map(|i| (i + 1..sites).map(move |j| (i, j)));
    for (k, (i, j)) in pair_list.enumerate() {
        let rtt = if wan.len() == 1 { wan[0] } else { wan[k] };
        m[i][j] = rtt;
        m[j][i] = rtt;
    }
    Ok(m)
}

/// One node of the testnet.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NodePlan {
    /// `s{site}n{index}`, also its data dir's name.
    pub name: String,
    /// Site index.
    pub site: usize,
    /// Index within the site.
    pub index: usize,
    /// Its namespace (netns mode).
    pub netns: String,
    /// Its router-side interface (netns mode).
    pub host_if: String,
    /// The address it listens on.
    pub addr: Ipv4Addr,
    /// The UDP port it listens on.
    pub port: u16,
}

impl NodePlan {
    /// Its QUIC listen multiaddr.
    pub fn listen(&self) -> String {
        format!("/ip4/{}/udp/{}/quic-v1", self.addr, self.port)
    }
}

/// The whole testnet's layout.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Plan {
    /// Short random id in every namespace name.
    pub id: String,
    /// Whether namespaces are used (false: loopback fallback).
    pub netns: bool,
    /// Site names, `site0`, `site1`, ...
    pub sites: Vec<String>,
    /// Every node, site by site.
    pub nodes: Vec<NodePlan>,
    /// The router namespace.
    pub router_netns: String,
    /// The WAN (RTTs, per-site WAN bandwidth, queue limit).
    pub wan: WanConfig,
    /// Per-node NIC bandwidth in bits per second, both directions.
    pub nic_bps: Option<u64>,
}

/// What `up` was asked for.
#[derive(Debug, Clone)]
pub struct PlanRequest {
    /// Number of sites.
    pub sites: usize,
    /// Nodes in each site.
    pub nodes_per_site: usize,
    /// `--wan` RTTs.
    pub wan_rtt: Vec<Duration>,
    /// `--wan-bw`.
    pub wan_bps: Option<u64>,
    /// `--nic-bw`.
    pub nic_bps: Option<u64>,
    /// Drop-tail limit of each WAN queue.
    pub queue_limit: Duration,
    /// Use namespaces (false: loopback fallback).
    pub netns: bool,
    /// First port in loopback mode.
    pub base_port: u16,
}

impl Plan {
    /// Lays the testnet out.
    pub fn new(id: &str, req: &PlanRequest) -> Result<Plan, PlanError> {
        if !(1..=MAX_SITES).contains(&req.sites) {
            return Err(PlanError::OutOfRange {
                what: "--sites",
                max: MAX_SITES,
                got: req.sites,
            });
        }
        if !(1..=MAX_NODES_PER_SITE).contains(&req.nodes_per_site) {
            return Err(PlanError::OutOfRange {
                what: "--nodes-per-site",
                max: MAX_NODES_PER_SITE,
                got: req.nodes_per_site,
            });
        }
        let rtt = if req.sites == 1 {
            vec![vec![Duration::ZERO]]
        } else {
            rtt_matrix(req.sites, &req.wan_rtt)?
        };
        let mut nodes = Vec::new();
        for s in 0..req.sites {
            for n in 0..req.nodes_per_site {
                let k = nodes.len();
                let (addr, port) = if req.netns {
                    (Ipv4Addr::new(10, s as u8, 0, (n + 2) as u8), NODE_PORT)
                } else {
                    (Ipv4Addr::LOCALHOST, req.base_port.saturating_add(k as u16))
                };
                nodes.push(NodePlan {
                    name: format!("s{s}n{n}"),
                    site: s,
                    index: n,
                    netns: format!("vmsw-{id}-s{s}n{n}"),
                    host_if: format!("h{s}n{n}"),
                    addr,
                    port,
                });
            }
        }
        Ok(Plan {
            id: id.to_owned(),
            netns: req.netns,
            sites: (0..req.sites).map(|s| format!("site{s}")).collect(),
            nodes,
            router_netns: format!("vmsw-{id}-r"),
            wan: WanConfig {
                rtt,
                uplink_bps: req.wan_bps,
                downlink_bps: req.wan_bps,
                queue_limit: req.queue_limit,
            },
            nic_bps: req.nic_bps,
        })
    }

    /// Every namespace this plan creates, router first.
    pub fn namespaces(&self) -> Vec<String> {
        if !self.netns {
            return Vec::new();
        }
        std::iter::once(self.router_netns.clone())
            .chain(self.nodes.iter().map(|n| n.netns.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(sites: usize, nodes: usize) -> PlanRequest {
        PlanRequest {
            sites,
            nodes_per_site: nodes,
            wan_rtt: vec![
                Duration::from_millis(31),
                Duration::from_millis(75),
                Duration::from_millis(165),
            ],
            wan_bps: Some(200_000_000),
            nic_bps: None,
            queue_limit: Duration::from_millis(50),
            netns: true,
            base_port: 7400,
        }
    }

    #[test]
    fn parses_units() {
        assert_eq!(parse_duration("31ms").unwrap(), Duration::from_millis(31));
        assert_eq!(parse_duration("0.5s").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("800us").unwrap(), Duration::from_micros(800));
        assert!(parse_duration("31").is_err());
        assert!(parse_duration("-1ms").is_err());
        assert_eq!(parse_bandwidth("200mbit").unwrap(), 200_000_000);
        assert_eq!(parse_bandwidth("1Gbit").unwrap(), 1_000_000_000);
        assert!(parse_bandwidth("200").is_err());
        assert!(parse_bandwidth("0mbit").is_err());
    }

    #[test]
    fn rtt_pairs_fill_a_symmetric_matrix() {
        let p = Plan::new("ab12", &req(3, 2)).unwrap();
        let ms = Duration::from_millis;
        assert_eq!(p.wan.rtt[0][1], ms(31));
        assert_eq!(p.wan.rtt[2][0], ms(75));
        assert_eq!(p.wan.rtt[1][2], ms(165));
        assert_eq!(p.wan.rtt[1][1], Duration::ZERO);
        let one = Plan::new(
            "ab12",
            &PlanRequest {
                wan_rtt: vec![ms(10)],
                ..req(4, 1)
            },
        )
        .unwrap();
        assert!(one.wan.rtt[3][1] == ms(10));
        let err = Plan::new(
            "ab12",
            &PlanRequest {
                wan_rtt: vec![ms(10), ms(20)],
                ..req(3, 1)
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("3 for 3 sites"), "{err}");
    }

    #[test]
    fn names_and_addresses_are_unique_and_fit_interface_limits() {
        let p = Plan::new("ab12", &req(3, 4)).unwrap();
        assert_eq!(p.nodes.len(), 12);
        let mut addrs: Vec<_> = p.nodes.iter().map(|n| (n.addr, n.port)).collect();
        addrs.sort();
        addrs.dedup();
        assert_eq!(addrs.len(), 12);
        assert_eq!(p.nodes[5].addr, Ipv4Addr::new(10, 1, 0, 3));
        assert_eq!(p.nodes[5].listen(), "/ip4/10.1.0.3/udp/7400/quic-v1");
        let big = Plan::new(
            "ab12",
            &PlanRequest {
                wan_rtt: vec![Duration::from_millis(10)],
                ..req(MAX_SITES, MAX_NODES_PER_SITE)
            },
        )
        .unwrap();
        assert!(big.nodes.iter().all(|n| n.host_if.len() < 16));
        assert_eq!(p.namespaces().len(), 13);
        assert!(Plan::new("ab12", &req(0, 1)).is_err());
        assert!(Plan::new("ab12", &req(3, 201)).is_err());
    }

    #[test]
    fn loopback_plan_uses_distinct_ports() {
        let p = Plan::new(
            "ab12",
            &PlanRequest {
                netns: false,
                ..req(3, 2)
            },
        )
        .unwrap();
        assert!(p.namespaces().is_empty());
        assert!(p.nodes.iter().all(|n| n.addr == Ipv4Addr::LOCALHOST));
        assert_eq!(p.nodes[5].port, 7405);
    }
}
