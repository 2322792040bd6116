//! Reports: the summary of a run (text and JSON), the per-VM, per-host, per-link and time-series CSV
//! files, a comparison table across runs, and the plots ([`plot`]). Everything written here is a
//! pure function of the run result, so the same seed and scenario give byte-identical files.

pub mod plot;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::checks::{self, Checks};
use crate::record::{Counters, LinkRecord, RunResult, VmRecord};
use crate::units::fmt_bytes;

/// Errors from writing reports.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A summary could not be encoded.
    #[error("cannot encode the summary: {0}")]
    Json(#[from] serde_json::Error),
    /// A plot failed.
    #[error(transparent)]
    Plot(#[from] plot::PlotError),
}

/// Boot-time statistics over the VMs that booted, s.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BootStats {
    /// VMs that booted.
    pub booted: usize,
    /// VMs in all.
    pub vms: usize,
    /// Median.
    pub p50_s: f64,
    /// 90th percentile.
    pub p90_s: f64,
    /// 99th percentile.
    pub p99_s: f64,
    /// Slowest.
    pub max_s: f64,
    /// Mean.
    pub mean_s: f64,
    /// Time from the first VM start until the last VM booted.
    pub all_booted_after_s: f64,
}

/// The summary of one run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// Label of the run.
    pub label: String,
    /// Scenario name.
    pub scenario: String,
    /// Strategy.
    pub strategy: String,
    /// Seed.
    pub seed: u64,
    /// Hosts.
    pub hosts: usize,
    /// Image size, bytes.
    pub image_size: u64,
    /// Chunk size, bytes.
    pub chunk_size: u32,
    /// Boot times.
    pub boot: Option<BootStats>,
    /// Bytes uploaded by the source servers.
    pub source_egress_bytes: f64,
    /// The same in images.
    pub source_egress_images: f64,
    /// Bytes entering each site over the WAN.
    pub wan_in_bytes: BTreeMap<String, f64>,
    /// Bytes leaving each site over the WAN.
    pub wan_out_bytes: BTreeMap<String, f64>,
    /// Bytes delivered to hosts in all (accepted chunks).
    pub fetched_bytes: f64,
    /// Duplicate bytes received and discarded.
    pub duplicate_bytes: f64,
    /// Checks.
    pub checks: Checks,
    /// Counters.
    pub counters: Counters,
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Summarises a run (running the checks).
pub fn summarise(r: &RunResult) -> Summary {
    let mut boots: Vec<f64> = r.vms.iter().filter_map(|v| v.boot_s()).collect();
    boots.sort_by(f64::total_cmp);
    let first = r
        .vms
        .iter()
        .map(|v| v.start_s)
        .fold(f64::INFINITY, f64::min);
    let last = r
        .vms
        .iter()
        .filter_map(|v| v.boot_done_s)
        .fold(0.0, f64::max);
    let boot = (!boots.is_empty()).then(|| BootStats {
        booted: boots.len(),
        vms: r.vms.len(),
        p50_s: percentile(&boots, 50.0),
        p90_s: percentile(&boots, 90.0),
        p99_s: percentile(&boots, 99.0),
        max_s: percentile(&boots, 100.0),
        mean_s: boots.iter().sum::<f64>() / boots.len() as f64,
        all_booted_after_s: last - first,
    });
    let per_site = |v: &[f64]| -> BTreeMap<String, f64> {
        r.sites.iter().cloned().zip(v.iter().copied()).collect()
    };
    Summary {
        label: r.label.clone(),
        scenario: r.scenario.clone(),
        strategy: r.strategy.clone(),
        seed: r.seed,
        hosts: r.hosts.len(),
        image_size: r.image_size,
        chunk_size: r.chunk_size,
        boot,
        source_egress_bytes: r.source_egress,
        source_egress_images: r.source_egress / r.image_size as f64,
        wan_in_bytes: per_site(&r.wan_in),
        wan_out_bytes: per_site(&r.wan_out),
        fetched_bytes: r.hosts.iter().map(|h| h.fetched_bytes as f64).sum(),
        duplicate_bytes: r.hosts.iter().map(|h| h.duplicate_bytes as f64).sum(),
        checks: checks::check(r),
        counters: r.counters.clone(),
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |x| format!("{x:.digits$}"))
}

/// The summary as text.
pub fn summary_text(s: &Summary) -> String {
    let mut t = String::new();
    let img = s.image_size as f64;
    let _ = writeln!(
        t,
        "run {} (scenario {}, strategy {}, seed {})",
        s.label, s.scenario, s.strategy, s.seed
    );
    let _ = writeln!(
        t,
        "  {} hosts, image {} in chunks of {}",
        s.hosts,
        fmt_bytes(img),
        fmt_bytes(f64::from(s.chunk_size))
    );
    match &s.boot {
        Some(b) => {
            let _ = writeln!(
                t,
                "  boot time (s): p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}  mean {:.2}  ({} of {} VMs booted; all within {:.2} s of the first start)",
                b.p50_s, b.p90_s, b.p99_s, b.max_s, b.mean_s, b.booted, b.vms, b.all_booted_after_s
            );
        }
        None => {
            let _ = writeln!(t, "  boot time: no VM booted");
        }
    }
    let _ = writeln!(
        t,
        "  source egress: {} ({:.2} images)",
        fmt_bytes(s.source_egress_bytes),
        s.source_egress_images
    );
    for (site, b) in &s.wan_in_bytes {
        let out = s.wan_out_bytes.get(site).copied().unwrap_or(0.0);
        let _ = writeln!(
            t,
            "  WAN {site}: in {} ({:.2} images), out {} ({:.2} images)",
            fmt_bytes(*b),
            b / img,
            fmt_bytes(out),
            out / img
        );
    }
    let _ = writeln!(
        t,
        "  fetched by hosts: {} ({:.2} images); duplicates discarded: {}; wasted (cancelled/unfinished): {}",
        fmt_bytes(s.fetched_bytes),
        s.fetched_bytes / img,
        fmt_bytes(s.duplicate_bytes),
        fmt_bytes(s.counters.bytes_wasted)
    );
    let c = &s.checks;
    let _ = writeln!(
        t,
        "  checks: Kumar-Ross bound {} s, full copy {} s, ratio {}; bytes conserved: {}; max link utilisation {:.6}; all booted: {}",
        opt(c.kumar_ross_bound_s, 2),
        opt(c.full_copy_s, 2),
        opt(c.kumar_ross_ratio, 3),
        c.bytes_conserved,
        c.max_utilisation,
        c.all_booted
    );
    for p in &c.problems {
        let _ = writeln!(t, "  CHECK FAILED: {p}");
    }
    let k = &s.counters;
    if k.fanout_measured_nodes > 0 {
        let _ = writeln!(
            t,
            "  relay fan-out at the end ({} nodes measured): min {}, mean {:.2}, max {}; measured chunk upload time {:.2} ms (mean)",
            k.fanout_measured_nodes,
            k.fanout_min,
            k.fanout_mean,
            k.fanout_max,
            k.fanout_chunk_ms_mean
        );
    }
    let wan_in: f64 = s.wan_in_bytes.values().sum();
    if wan_in > 0.0 {
        let image = img.max(1.0);
        let _ = writeln!(
            t,
            "  WAN in, all sites: {:.2} images; into site gateways {:.2}, at Demand into other hosts {:.2}, the rest {:.2}; Need messages {}",
            wan_in / image,
            k.wan_in_gateway_bytes / image,
            k.wan_in_demand_bytes / image,
            (wan_in - k.wan_in_gateway_bytes - k.wan_in_demand_bytes) / image,
            k.needs
        );
    }
    let _ = writeln!(
        t,
        "  events {}, simulated {:.2} s, flows {} ({} aborted), requests {}, cancels {}, busy {}, fan-out refusals {}, writes waited {}, want failures {}, no-source {}, lookups {}, connections {}, have updates {}, rate updates {}, solves {} ({:.1} flows each)",
        k.events,
        k.end_s,
        k.flows,
        k.flows_aborted,
        k.requests,
        k.cancels,
        k.busy_rejects,
        k.fanout_rejects,
        k.writes_waited,
        k.want_failures,
        k.no_source_events,
        k.lookups,
        k.connections,
        k.have_updates,
        k.rate_updates,
        k.solves,
        k.solved_flows as f64 / k.solves.max(1) as f64
    );
    t
}

/// A comparison table of several runs, as text.
pub fn compare_table(summaries: &[Summary]) -> String {
    let mut t = String::new();
    let sites: Vec<String> = summaries
        .first()
        .map(|s| s.wan_in_bytes.keys().cloned().collect())
        .unwrap_or_default();
    let _ = write!(
        t,
        "| run | p50 boot s | p99 boot s | max boot s | all booted after s | source egress (images) | full copy s | KR bound s | KR ratio |"
    );
    for site in &sites {
        let _ = write!(t, " WAN in {site} (images) |");
    }
    let _ = writeln!(t, " checks |");
    let _ = write!(t, "|---|---|---|---|---|---|---|---|---|");
    for _ in &sites {
        let _ = write!(t, "---|");
    }
    let _ = writeln!(t, "---|");
    for s in summaries {
        let img = s.image_size as f64;
        let b = s.boot.as_ref();
        let _ = write!(
            t,
            "| {} | {} | {} | {} | {} | {:.2} | {} | {} | {} |",
            s.label,
            opt(b.map(|b| b.p50_s), 2),
            opt(b.map(|b| b.p99_s), 2),
            opt(b.map(|b| b.max_s), 2),
            opt(b.map(|b| b.all_booted_after_s), 2),
            s.source_egress_images,
            opt(s.checks.full_copy_s, 2),
            opt(s.checks.kumar_ross_bound_s, 2),
            opt(s.checks.kumar_ross_ratio, 3),
        );
        for site in &sites {
            let v = s.wan_in_bytes.get(site).copied().unwrap_or(0.0);
            let _ = write!(t, " {:.2} |", v / img);
        }
        let _ = writeln!(t, " {} |", if s.checks.ok() { "ok" } else { "FAILED" });
    }
    t
}

fn write(path: &Path, text: &str) -> Result<(), ReportError> {
    std::fs::write(path, text).map_err(|source| ReportError::Io {
        path: path.to_owned(),
        source,
    })
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

fn opt_csv(v: Option<f64>) -> String {
    v.map_or(String::new(), |x| format!("{x:.6}"))
}

/// The per-VM CSV.
pub fn vms_csv(r: &RunResult) -> String {
    vm_records_csv(&r.sites, &r.vms)
}

/// The per-VM CSV of any list of VM records (the testnet writes its results with it too).
pub fn vm_records_csv(sites: &[String], vms: &[VmRecord]) -> String {
    let mut t =
        String::from("vm,host,site,start_s,boot_done_s,boot_s,reads,read_failures,fetched_bytes");
    for s in sites {
        let _ = write!(t, ",from_{}", csv_field(s));
    }
    t.push('\n');
    for v in vms {
        let _ = write!(
            t,
            "{},{},{},{:.6},{},{},{},{},{}",
            v.vm,
            v.host,
            csv_field(&v.site),
            v.start_s,
            opt_csv(v.boot_done_s),
            opt_csv(v.boot_s()),
            v.reads,
            v.read_failures,
            v.fetched_bytes
        );
        for b in &v.fetched_from_site {
            let _ = write!(t, ",{b}");
        }
        t.push('\n');
    }
    t
}

/// The per-host CSV.
pub fn hosts_csv(r: &RunResult) -> String {
    let mut t = String::from(
        "host,site,start_s,background_done_s,chunks,fetched_bytes,from_sources,duplicate_bytes,uploaded_bytes,peers",
    );
    for s in &r.sites {
        let _ = write!(t, ",from_{}", csv_field(s));
    }
    t.push('\n');
    for h in &r.hosts {
        let _ = write!(
            t,
            "{},{},{},{},{},{},{},{},{},{}",
            h.host,
            csv_field(&h.site),
            opt_csv(h.start_s),
            opt_csv(h.background_done_s),
            h.chunks,
            h.fetched_bytes,
            h.fetched_from_sources,
            h.duplicate_bytes,
            h.uploaded_bytes,
            h.peers
        );
        for b in &h.fetched_from_site {
            let _ = write!(t, ",{b}");
        }
        t.push('\n');
    }
    t
}

/// The per-link CSV.
pub fn links_csv(r: &RunResult) -> String {
    link_records_csv(&r.links, r.counters.end_s)
}

/// The per-link CSV of any list of link records over a run of `span_s` seconds (the testnet writes
/// its results with it too). A capacity or peak that is not finite (unknown, unlimited) is left
/// empty, and so is the mean utilisation then.
pub fn link_records_csv(links: &[LinkRecord], span_s: f64) -> String {
    let mut t =
        String::from("class,owner,capacity_bytes_per_s,bytes,mean_utilisation,peak_utilisation\n");
    let span = span_s.max(1e-9);
    let num = |x: f64, digits: usize| {
        if x.is_finite() {
            format!("{x:.digits$}")
        } else {
            String::new()
        }
    };
    for l in links {
        let _ = writeln!(
            t,
            "{},{},{},{:.0},{},{}",
            l.class,
            csv_field(&l.owner),
            num(l.capacity, 0),
            l.bytes,
            num(l.bytes / (l.capacity * span), 6),
            num(l.peak_utilisation, 6)
        );
    }
    t
}

/// Bytes per link class per time bin, as CSV.
pub fn series_csv(r: &RunResult) -> String {
    let mut t = String::from("t_s");
    for (name, _) in &r.series {
        let _ = write!(t, ",{name}_bytes");
    }
    t.push('\n');
    let n = r.series.first().map_or(0, |s| s.1.len());
    for i in 0..n {
        let _ = write!(t, "{:.3}", i as f64 * r.series_bin_s);
        for (_, bins) in &r.series {
            let _ = write!(t, ",{:.0}", bins[i]);
        }
        t.push('\n');
    }
    t
}

/// Writes every file of one run into `dir`: `summary.txt`, `summary.json`, `vms.csv`, `hosts.csv`,
/// `links.csv`, `series.csv`, and (if `plots`) `boot_cdf` and `bytes_over_time` as SVG and PNG.
pub fn write_run(dir: &Path, r: &RunResult, plots: bool) -> Result<Summary, ReportError> {
    std::fs::create_dir_all(dir).map_err(|source| ReportError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let s = summarise(r);
    write(&dir.join("summary.txt"), &summary_text(&s))?;
    write(
        &dir.join("summary.json"),
        &(serde_json::to_string_pretty(&s)? + "\n"),
    )?;
    write(&dir.join("vms.csv"), &vms_csv(r))?;
    write(&dir.join("hosts.csv"), &hosts_csv(r))?;
    write(&dir.join("links.csv"), &links_csv(r))?;
    write(&dir.join("series.csv"), &series_csv(r))?;
    if plots {
        plot::boot_cdf(
            dir,
            "boot_cdf",
            &format!("{}: VM boot completion", r.label),
            &[r],
        )?;
        plot::bytes_over_time(dir, "bytes_over_time", r)?;
    }
    Ok(s)
}

/// Writes the comparison of several runs into `dir`: `compare.md` (table), `compare.json` and the
/// boot CDF of all runs (if `plots`).
pub fn write_compare(
    dir: &Path,
    runs: &[&RunResult],
    summaries: &[Summary],
    plots: bool,
) -> Result<(), ReportError> {
    std::fs::create_dir_all(dir).map_err(|source| ReportError::Io {
        path: dir.to_owned(),
        source,
    })?;
    write(&dir.join("compare.md"), &compare_table(summaries))?;
    write(
        &dir.join("compare.json"),
        &(serde_json::to_string_pretty(summaries)? + "\n"),
    )?;
    if plots {
        plot::boot_cdf(dir, "boot_cdf", "VM boot completion", runs)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[3.0], 50.0), 3.0);
    }

    #[test]
    fn csv_quoting() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("plain"), "plain");
    }
}
