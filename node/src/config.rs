//! The optional TOML configuration file of `vmswarm serve` (`--config FILE`).
//!
//! Every field is optional; command-line flags win over the file, and the file over the defaults.
//! Unknown fields are an error (a typo must not be silently ignored).
//!
//! `packaging/vmswarm.toml` (installed as `/etc/vmswarm/vmswarm.toml`) documents every field with
//! its default; `node/tests/package.rs` loads it with [`FileConfig::load`] and checks those
//! defaults against the ones here and in `vmswarm_protocol`, so the file cannot drift.

use std::net::SocketAddr;
use std::path::Path;

use libp2p::Multiaddr;
use serde::Deserialize;

/// The QUIC listen address `vmswarm serve` uses when neither `--listen` nor `listen` names one.
pub const DEFAULT_LISTEN: &str = "/ip4/0.0.0.0/udp/7400/quic-v1";

/// The site name when neither `--site` nor `site` names one.
pub const DEFAULT_SITE: &str = "default";

/// The default of `[fetch] manifest_timeout_ms`.
pub const DEFAULT_MANIFEST_TIMEOUT_MS: u64 = 30_000;

/// The file's contents.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Data dir.
    pub data: Option<std::path::PathBuf>,
    /// QUIC listen addresses.
    #[serde(default)]
    pub listen: Vec<Multiaddr>,
    /// Site name.
    pub site: Option<String>,
    /// Bootstrap peers.
    #[serde(default)]
    pub bootstrap: Vec<Multiaddr>,
    /// Prometheus endpoint.
    pub metrics: Option<SocketAddr>,
    /// Announce this node as an origin (`Capabilities::ORIGIN`).
    #[serde(default)]
    pub origin: bool,
    /// Fetch tuning.
    #[serde(default)]
    pub fetch: FetchTuning,
    /// Serving tuning.
    #[serde(default)]
    pub serve: ServeTuning,
}

/// Serve queue settings that operators may tune.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServeTuning {
    /// Most peers one chunk is sent to at once for VMs waiting on it (0: no limit). Default
    /// `serve::DEFAULT_DEMAND_FANOUT`.
    pub demand_fanout: Option<usize>,
    /// The same for `serve --origin` (0: no limit). Default
    /// `serve::DEFAULT_ORIGIN_DEMAND_FANOUT`.
    pub origin_demand_fanout: Option<usize>,
    /// Whether the fan-out in use is chosen from measured rates, at most `demand_fanout`
    /// (default true); false pins it to `demand_fanout`.
    pub fanout_from_rates: Option<bool>,
    /// Whether Background requests are held to the same fan-out (default false).
    pub background_fanout: Option<bool>,
    /// Most chunks being sent at once.
    pub max_active_uploads: Option<usize>,
}

/// Fetch scheduler settings that operators may tune (milliseconds for durations).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FetchTuning {
    /// Most requests in flight per peer.
    pub max_in_flight_per_peer: Option<u32>,
    /// Base request timeout.
    pub request_timeout_ms: Option<u64>,
    /// Deadline of a Demand want.
    pub demand_deadline_ms: Option<u64>,
    /// How long a want may have no connected holder before it fails.
    pub unavailable_deadline_ms: Option<u64>,
    /// How long a pull waits for any peer to provide the image's manifest.
    pub manifest_timeout_ms: Option<u64>,
    /// How many site gateways (the best-ranked site providers of an image, which alone fetch its
    /// chunks from outside the site) each node names; 0 turns gateways off. Every node of a site
    /// must use the same number. At most `vmswarm_protocol::site::SITE_GATEWAYS` (the default).
    pub site_gateways: Option<usize>,
}

/// Errors reading the configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("config file {path}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong, with line and column.
        source: toml::de::Error,
    },
    /// A value is out of range.
    #[error("config file {path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

impl FileConfig {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let config: FileConfig = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source,
        })?;
        let max = vmswarm_protocol::site::SITE_GATEWAYS;
        if let Some(n) = config.fetch.site_gateways.filter(|&n| n > max) {
            return Err(ConfigError::Invalid {
                path: path.display().to_string(),
                message: format!(
                    "[fetch] site_gateways = {n}: at most {max} (the providers one site lookup returns); 0 turns gateways off"
                ),
            });
        }
        Ok(config)
    }

    /// The manifest lookup timeout (default [`DEFAULT_MANIFEST_TIMEOUT_MS`]).
    pub fn manifest_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(
            self.fetch
                .manifest_timeout_ms
                .unwrap_or(DEFAULT_MANIFEST_TIMEOUT_MS),
        )
    }

    /// Applies the serving tuning to a serve queue configuration.
    pub fn apply_serve(&self, c: &mut vmswarm_protocol::serve::Config) {
        if let Some(v) = self.serve.demand_fanout {
            c.demand_fanout = v;
        }
        if let Some(v) = self.serve.origin_demand_fanout {
            c.origin_demand_fanout = v;
        }
        if let Some(v) = self.serve.fanout_from_rates {
            c.fanout_from_rates = v;
        }
        if let Some(v) = self.serve.background_fanout {
            c.background_fanout = v;
        }
        if let Some(v) = self.serve.max_active_uploads {
            c.max_active_uploads = v.max(1);
        }
    }

    /// Applies the tuning to a scheduler configuration.
    pub fn apply(&self, c: &mut vmswarm_protocol::fetch::Config) {
        use std::time::Duration;
        let f = &self.fetch;
        if let Some(v) = f.max_in_flight_per_peer {
            c.max_in_flight_per_peer = v;
        }
        if let Some(v) = f.request_timeout_ms {
            c.request_timeout = Duration::from_millis(v);
        }
        if let Some(v) = f.demand_deadline_ms {
            c.demand_deadline = Duration::from_millis(v);
        }
        if let Some(v) = f.unavailable_deadline_ms {
            c.unavailable_deadline = Duration::from_millis(v);
        }
        if let Some(v) = f.site_gateways {
            c.site_gateways = v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_unknown_fields() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "site = \"dc1\"\nlisten = [\"/ip4/127.0.0.1/udp/0/quic-v1\"]\norigin = true\n[fetch]\nrequest_timeout_ms = 900\n",
        )
        .unwrap();
        let c = FileConfig::load(&p).unwrap();
        assert_eq!(c.site.as_deref(), Some("dc1"));
        assert!(c.origin);
        assert!(!FileConfig::default().origin);
        let mut f = vmswarm_protocol::fetch::Config::default();
        c.apply(&mut f);
        assert_eq!(f.request_timeout.as_millis(), 900);
        std::fs::write(
            &p,
            "[serve]\ndemand_fanout = 1\nfanout_from_rates = false\norigin_demand_fanout = 6\nmax_active_uploads = 3\nbackground_fanout = true\n",
        )
        .unwrap();
        let mut s = vmswarm_protocol::serve::Config::default();
        FileConfig::load(&p).unwrap().apply_serve(&mut s);
        assert_eq!(s.demand_fanout, 1);
        assert!(!s.fanout_from_rates);
        assert_eq!(s.origin_demand_fanout, 6);
        assert_eq!(s.for_origin().demand_fanout, 6);
        assert_eq!(s.max_active_uploads, 3);
        assert!(s.background_fanout);
        std::fs::write(&p, "[fetch]\nsite_gateways = 2\n").unwrap();
        let mut f = vmswarm_protocol::fetch::Config::default();
        FileConfig::load(&p).unwrap().apply(&mut f);
        assert_eq!(f.site_gateways, 2);
        std::fs::write(&p, "[fetch]\nsite_gateways = 0\n").unwrap();
        FileConfig::load(&p).unwrap().apply(&mut f);
        assert_eq!(f.site_gateways, 0, "0 turns gateways off");
        let max = vmswarm_protocol::site::SITE_GATEWAYS;
        std::fs::write(&p, format!("[fetch]\nsite_gateways = {}\n", max + 1)).unwrap();
        let err = FileConfig::load(&p).unwrap_err().to_string();
        assert!(
            err.contains("site_gateways") && err.contains(&format!("at most {max}")),
            "{err}"
        );
        std::fs::write(&p, "sitee = \"dc1\"\n").unwrap();
        let err = FileConfig::load(&p).unwrap_err().to_string();
        assert!(err.contains("sitee"), "{err}");
    }
}
