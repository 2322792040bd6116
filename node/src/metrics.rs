//! Node counters, for `status --json` and the opt-in Prometheus endpoint.
//!
//! Bytes in and out are kept per peer site; chunk fetch latency (request sent to verified chunk) goes
//! into a fixed-bucket histogram. The endpoint is a minimal HTTP/1.1 responder for `GET /metrics` on
//! the address the operator gives (text exposition format 0.0.4); it serves nothing else. A failing
//! `accept()` (out of file descriptors) is retried with a backoff ([`crate::accept`]), never in a
//! busy loop.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Upper bounds of the fetch latency buckets, in seconds.
const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Counters shared by the daemon's tasks.
#[derive(Debug, Default)]
pub struct Metrics {
    bytes_in_by_site: Mutex<BTreeMap<String, u64>>,
    bytes_out_by_site: Mutex<BTreeMap<String, u64>>,
    /// Verified chunks fetched from peers.
    pub chunks_fetched: AtomicU64,
    /// Chunks sent to peers.
    pub chunks_served: AtomicU64,
    /// Demand requests refused because the chunk was on its way to `demand_fanout` other peers.
    pub fanout_refusals: AtomicU64,
    /// The relay fan-out in use (a gauge; 0: no limit), set by the daemon as it changes.
    pub demand_fanout: AtomicU64,
    /// Chunks that failed verification.
    pub chunks_corrupt: AtomicU64,
    /// Chunks the local store dropped after start (found rotten and quarantined, or vanished).
    pub store_chunks_dropped: AtomicU64,
    /// Peers banned.
    pub bans: AtomicU64,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
    /// Per NBD export counters, by export name.
    exports: Mutex<BTreeMap<String, std::sync::Arc<ExportMetrics>>>,
}

/// A latency histogram with the fixed [`LATENCY_BUCKETS`].
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(
            d.as_micros().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
    }

    /// Observations recorded.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Mean in milliseconds (0 when empty).
    pub fn mean_ms(&self) -> f64 {
        let n = self.count();
        if n == 0 {
            0.0
        } else {
            self.sum_micros.load(Ordering::Relaxed) as f64 / n as f64 / 1000.0
        }
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            let n = self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {n}");
        }
        let count = self.count();
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// Counters of one NBD export (a mount), shown by `mounts --json` and the Prometheus endpoint.
#[derive(Debug, Default)]
pub struct ExportMetrics {
    /// Bytes the export's clients read.
    pub bytes_read: AtomicU64,
    /// Of those, bytes that needed no fetch: chunks already stored, zero chunks, clone overlay.
    pub bytes_local: AtomicU64,
    /// Bytes the clients wrote (clones).
    pub bytes_written: AtomicU64,
    /// Chunks fetched from peers because this export read them (Demand).
    pub demand_chunks: AtomicU64,
    /// Reads failed with EIO because a chunk could not be fetched in time.
    pub demand_failures: AtomicU64,
    /// Chunk bytes fetched from peers for this export (Demand and its prefetch), by peer site.
    fetched_by_site: Mutex<BTreeMap<String, u64>>,
    /// Demand want to verified, stored chunk.
    pub demand_latency: Histogram,
    /// Requests that found their connection's in-flight byte budget spent, so the server stopped
    /// reading that client's requests until replies drained (see `nbd::server::MAX_IN_FLIGHT_BYTES`).
    pub budget_waits: AtomicU64,
}

/// A copy of an export's counters.
#[derive(Debug, Clone, Serialize, serde::Deserialize, Default, PartialEq)]
pub struct ExportSnapshot {
    /// Bytes read by clients.
    pub bytes_read: u64,
    /// Bytes read that needed no fetch.
    pub bytes_local: u64,
    /// Bytes written by clients.
    pub bytes_written: u64,
    /// Chunk bytes fetched from peers, by site.
    pub fetched_by_site: BTreeMap<String, u64>,
    /// Total chunk bytes fetched from peers.
    pub bytes_fetched: u64,
    /// Chunks fetched on demand.
    pub demand_chunks: u64,
    /// Reads failed because a chunk could not be fetched in time.
    pub demand_failures: u64,
    /// Demand fetches measured.
    pub demand_latency_count: u64,
    /// Mean Demand fetch latency in milliseconds.
    pub demand_latency_mean_ms: f64,
    /// Requests that waited for their connection's in-flight byte budget.
    #[serde(default)]
    pub budget_waits: u64,
}

impl ExportMetrics {
    /// Counts chunk bytes fetched from a peer of `site` for this export.
    pub fn fetched(&self, site: &str, n: u64) {
        add(&self.fetched_by_site, site, n);
    }

    /// A copy of the counters.
    pub fn snapshot(&self) -> ExportSnapshot {
        let fetched_by_site = get(&self.fetched_by_site);
        ExportSnapshot {
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            bytes_local: self.bytes_local.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            bytes_fetched: fetched_by_site.values().sum(),
            fetched_by_site,
            demand_chunks: self.demand_chunks.load(Ordering::Relaxed),
            demand_failures: self.demand_failures.load(Ordering::Relaxed),
            demand_latency_count: self.demand_latency.count(),
            demand_latency_mean_ms: self.demand_latency.mean_ms(),
            budget_waits: self.budget_waits.load(Ordering::Relaxed),
        }
    }
}

/// A copy of the counters, for `status --json`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, Default, PartialEq)]
pub struct Snapshot {
    /// Bytes received from peers, by their site.
    pub bytes_in_by_site: BTreeMap<String, u64>,
    /// Bytes sent to peers, by their site.
    pub bytes_out_by_site: BTreeMap<String, u64>,
    /// Total bytes received.
    pub bytes_in: u64,
    /// Total bytes sent.
    pub bytes_out: u64,
    /// Verified chunks fetched.
    pub chunks_fetched: u64,
    /// Chunks served.
    pub chunks_served: u64,
    /// Demand requests refused with `Fanout` (the chunk was on its way to enough peers).
    #[serde(default)]
    pub fanout_refusals: u64,
    /// The relay fan-out in use (0: no limit).
    #[serde(default)]
    pub demand_fanout: u64,
    /// Corrupt chunks received.
    pub chunks_corrupt: u64,
    /// Chunks the local store dropped after start (rotten or vanished).
    pub store_chunks_dropped: u64,
    /// Peers banned.
    pub bans: u64,
    /// Chunk fetches measured.
    pub fetch_latency_count: u64,
    /// Mean fetch latency in milliseconds.
    pub fetch_latency_mean_ms: f64,
}

fn add(map: &Mutex<BTreeMap<String, u64>>, site: &str, n: u64) {
    // A poisoned lock only means another thread panicked mid-update of a counter; keep counting.
    let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
    *m.entry(site.to_owned()).or_default() += n;
}

fn get(map: &Mutex<BTreeMap<String, u64>>) -> BTreeMap<String, u64> {
    map.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

impl Metrics {
    /// Counts bytes received from a peer of `site`.
    pub fn bytes_in(&self, site: &str, n: u64) {
        add(&self.bytes_in_by_site, site, n);
    }

    /// Counts bytes sent to a peer of `site`.
    pub fn bytes_out(&self, site: &str, n: u64) {
        add(&self.bytes_out_by_site, site, n);
    }

    /// Records one chunk fetch latency.
    pub fn fetch_latency(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_micros.fetch_add(
            d.as_micros().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
    }

    /// Registers an export's counters under `name` (replacing an older export of that name).
    pub fn register_export(&self, name: &str, m: std::sync::Arc<ExportMetrics>) {
        let mut e = self.exports.lock().unwrap_or_else(|p| p.into_inner());
        e.insert(name.to_owned(), m);
    }

    /// Drops an export's counters.
    pub fn unregister_export(&self, name: &str) {
        let mut e = self.exports.lock().unwrap_or_else(|p| p.into_inner());
        e.remove(name);
    }

    /// A copy of every counter.
    pub fn snapshot(&self) -> Snapshot {
        let bytes_in_by_site = get(&self.bytes_in_by_site);
        let bytes_out_by_site = get(&self.bytes_out_by_site);
        let count = self.latency_count.load(Ordering::Relaxed);
        let sum = self.latency_sum_micros.load(Ordering::Relaxed);
        Snapshot {
            bytes_in: bytes_in_by_site.values().sum(),
            bytes_out: bytes_out_by_site.values().sum(),
            bytes_in_by_site,
            bytes_out_by_site,
            chunks_fetched: self.chunks_fetched.load(Ordering::Relaxed),
            chunks_served: self.chunks_served.load(Ordering::Relaxed),
            fanout_refusals: self.fanout_refusals.load(Ordering::Relaxed),
            demand_fanout: self.demand_fanout.load(Ordering::Relaxed),
            chunks_corrupt: self.chunks_corrupt.load(Ordering::Relaxed),
            store_chunks_dropped: self.store_chunks_dropped.load(Ordering::Relaxed),
            bans: self.bans.load(Ordering::Relaxed),
            fetch_latency_count: count,
            fetch_latency_mean_ms: if count == 0 {
                0.0
            } else {
                sum as f64 / count as f64 / 1000.0
            },
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let s = self.snapshot();
        let mut out = String::new();
        let mut family = |name: &str, help: &str, kind: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        family(
            "vmswarm_bytes_in_total",
            "Bytes received from peers, by peer site.",
            "counter",
        );
        family(
            "vmswarm_bytes_out_total",
            "Bytes sent to peers, by peer site.",
            "counter",
        );
        for (site, n) in &s.bytes_in_by_site {
            let _ = writeln!(out, "vmswarm_bytes_in_total{{site=\"{site}\"}} {n}");
        }
        for (site, n) in &s.bytes_out_by_site {
            let _ = writeln!(out, "vmswarm_bytes_out_total{{site=\"{site}\"}} {n}");
        }
        for (name, help, v) in [
            (
                "vmswarm_chunks_fetched_total",
                "Verified chunks fetched from peers.",
                s.chunks_fetched,
            ),
            (
                "vmswarm_chunks_served_total",
                "Chunks served to peers.",
                s.chunks_served,
            ),
            (
                "vmswarm_fanout_refusals_total",
                "Demand requests refused because the chunk was on its way to enough other peers.",
                s.fanout_refusals,
            ),
            (
                "vmswarm_chunks_corrupt_total",
                "Chunks received that failed verification.",
                s.chunks_corrupt,
            ),
            (
                "vmswarm_store_chunks_dropped_total",
                "Chunks the local store dropped after start (failed their hash and were quarantined, or vanished from their pack).",
                s.store_chunks_dropped,
            ),
            (
                "vmswarm_bans_total",
                "Peers banned for sending corrupt chunks.",
                s.bans,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP vmswarm_demand_fanout Peers one chunk VMs wait for is sent to at once (chosen from measured rates; 0: no limit).\n# TYPE vmswarm_demand_fanout gauge\nvmswarm_demand_fanout {}",
            s.demand_fanout
        );
        let _ = writeln!(
            out,
            "# HELP vmswarm_fetch_latency_seconds Chunk request to verified chunk.\n# TYPE vmswarm_fetch_latency_seconds histogram"
        );
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            let n = self.latency_buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "vmswarm_fetch_latency_seconds_bucket{{le=\"{bound}\"}} {n}"
            );
        }
        let count = self.latency_count.load(Ordering::Relaxed);
        let sum = self.latency_sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(
            out,
            "vmswarm_fetch_latency_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(out, "vmswarm_fetch_latency_seconds_sum {sum}");
        let _ = writeln!(out, "vmswarm_fetch_latency_seconds_count {count}");
        self.render_exports(&mut out);
        out
    }

    fn render_exports(&self, out: &mut String) {
        let exports: Vec<(String, std::sync::Arc<ExportMetrics>)> = self
            .exports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if exports.is_empty() {
            return;
        }
        // Export names are checked at mount time to be [A-Za-z0-9._-], safe inside a label.
        let snaps: Vec<(String, ExportSnapshot)> = exports
            .iter()
            .map(|(n, m)| (n.clone(), m.snapshot()))
            .collect();
        for (name, help, get) in [
            (
                "vmswarm_export_bytes_read_total",
                "Bytes read by the export's NBD clients.",
                (|s: &ExportSnapshot| s.bytes_read) as fn(&ExportSnapshot) -> u64,
            ),
            (
                "vmswarm_export_bytes_local_total",
                "Bytes read that were served without a fetch (stored, zero or overlay).",
                |s| s.bytes_local,
            ),
            (
                "vmswarm_export_bytes_written_total",
                "Bytes written by the export's NBD clients.",
                |s| s.bytes_written,
            ),
            (
                "vmswarm_export_demand_chunks_total",
                "Chunks fetched from peers on demand for the export.",
                |s| s.demand_chunks,
            ),
            (
                "vmswarm_export_demand_failures_total",
                "Reads failed with EIO because a chunk was not fetched in time.",
                |s| s.demand_failures,
            ),
            (
                "vmswarm_export_budget_waits_total",
                "NBD requests that waited for their connection's in-flight byte budget (replies not read fast enough).",
                |s| s.budget_waits,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (export, s) in &snaps {
                let _ = writeln!(out, "{name}{{export=\"{export}\"}} {}", get(s));
            }
        }
        let _ = writeln!(
            out,
            "# HELP vmswarm_export_bytes_fetched_total Chunk bytes fetched from peers for the export, by peer site.\n# TYPE vmswarm_export_bytes_fetched_total counter"
        );
        for (export, s) in &snaps {
            for (site, n) in &s.fetched_by_site {
                let _ = writeln!(
                    out,
                    "vmswarm_export_bytes_fetched_total{{export=\"{export}\",site=\"{site}\"}} {n}"
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP vmswarm_export_demand_latency_seconds Demand want to stored chunk, per export.\n# TYPE vmswarm_export_demand_latency_seconds histogram"
        );
        for (export, m) in &exports {
            m.demand_latency.render(
                out,
                "vmswarm_export_demand_latency_seconds",
                &format!("export=\"{export}\""),
            );
        }
    }
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve_http(listener: TcpListener, metrics: std::sync::Arc<Metrics>) {
    let mut backoff = crate::accept::Backoff::new("metrics endpoint");
    loop {
        let mut sock = match listener.accept().await {
            Ok((sock, _)) => {
                backoff.accepted();
                sock
            }
            Err(e) => {
                backoff.failed(&e).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            // Read the request head (up to the blank line), at most 4 KiB, within 5 s.
            let mut buf = Vec::with_capacity(1024);
            let read_head = async {
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 4096 {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                true
            };
            if !matches!(
                tokio::time::timeout(Duration::from_secs(5), read_head).await,
                Ok(true)
            ) {
                return;
            }
            let head = String::from_utf8_lossy(&buf);
            let (status, body) = if head.starts_with("GET /metrics ") {
                ("200 OK", metrics.render())
            } else {
                ("404 Not Found", "only GET /metrics is served\n".to_owned())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_renders() {
        let m = Metrics::default();
        m.bytes_in("dc1", 10);
        m.bytes_in("dc2", 5);
        m.bytes_out("dc1", 7);
        m.fetch_latency(Duration::from_millis(3));
        let s = m.snapshot();
        assert_eq!((s.bytes_in, s.bytes_out), (15, 7));
        let text = m.render();
        assert!(text.contains("vmswarm_bytes_in_total{site=\"dc2\"} 5"));
        assert!(text.contains("vmswarm_fetch_latency_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("vmswarm_fetch_latency_seconds_bucket{le=\"0.001\"} 0"));
        assert!(text.contains("vmswarm_fetch_latency_seconds_count 1"));
        assert!(!text.contains("vmswarm_export_"));
        let e = std::sync::Arc::new(ExportMetrics::default());
        e.bytes_read.fetch_add(4096, Ordering::Relaxed);
        e.fetched("dc2", 262144);
        e.demand_latency.observe(Duration::from_millis(20));
        m.register_export("vm1", e.clone());
        let text = m.render();
        assert!(text.contains("vmswarm_export_bytes_read_total{export=\"vm1\"} 4096"));
        assert!(
            text.contains("vmswarm_export_bytes_fetched_total{export=\"vm1\",site=\"dc2\"} 262144")
        );
        assert!(text.contains(
            "vmswarm_export_demand_latency_seconds_bucket{export=\"vm1\",le=\"0.025\"} 1"
        ));
        assert_eq!(e.snapshot().bytes_fetched, 262144);
        m.unregister_export("vm1");
        assert!(!m.render().contains("vmswarm_export_bytes_read_total{"));
    }
}
