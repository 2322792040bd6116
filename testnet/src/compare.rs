//! `vmswarm-testnet compare DIR --sim`: the simulator on the same scenario and the same network as
//! a testnet run, side by side.
//!
//! The simulator gets the scenario file and overrides the testnet run used, with the network
//! replaced by what the testnet really had: the RTT matrix and per-site WAN bandwidth of `up`, and
//! the NIC shaping if `up` set one (else the scenario's NICs stay), and the block export's cost
//! per read that `run` measured (`boot.read_ms`). Sites are matched by index.
//! Printed: p50/p99/max boot time, WAN payload bytes into each site, source egress, each with the
//! ratio simulator / testnet; plotted: both boot CDFs in one figure.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use vmswarm_sim::content::Content;
use vmswarm_sim::record::{Counters, RunResult, VmRecord};
use vmswarm_sim::scenario::Scenario;

use crate::run::RunSummary;

/// One row of the comparison.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    /// What is compared.
    pub metric: String,
    /// The testnet's value.
    pub testnet: f64,
    /// The simulator's value.
    pub simulator: f64,
}

impl Row {
    /// simulator / testnet.
    pub fn ratio(&self) -> f64 {
        self.simulator / self.testnet
    }
}

/// The comparison of one testnet run with the simulator.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Comparison {
    /// Rows: boot times (s), then bytes.
    pub rows: Vec<Row>,
}

fn read_vms(dir: &Path, sites: usize) -> anyhow::Result<Vec<VmRecord>> {
    let text = std::fs::read_to_string(dir.join("vms.csv"))
        .with_context(|| format!("reading {}/vms.csv", dir.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() < 9 + sites {
            anyhow::bail!("{}/vms.csv line {}: too few fields", dir.display(), i + 1);
        }
        let num = |s: &str| -> anyhow::Result<f64> {
            s.parse()
                .with_context(|| format!("vms.csv line {}: bad number {s:?}", i + 1))
        };
        out.push(VmRecord {
            vm: num(f[0])? as u32,
            host: num(f[1])? as u32,
            site: f[2].to_owned(),
            start_s: num(f[3])?,
            boot_done_s: if f[4].is_empty() {
                None
            } else {
                Some(num(f[4])?)
            },
            reads: num(f[6])? as u64,
            read_failures: num(f[7])? as u64,
            fetched_bytes: num(f[8])? as u64,
            fetched_from_site: f[9..9 + sites]
                .iter()
                .map(|s| num(s).map(|x| x as u64))
                .collect::<Result<_, _>>()?,
        });
    }
    Ok(out)
}

/// The scenario as the testnet ran it, from the results in `dir`: its network, and the image's
/// content layout (zero and repeated chunks) when `run` recorded it.
pub fn scenario_for(dir: &Path, summary: &RunSummary) -> anyhow::Result<Scenario> {
    let mut sc = Scenario::load(&summary.scenario_file, &summary.overrides)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let layout = dir.join(crate::run::CONTENT_FILE);
    if layout.exists() {
        sc.content = Some(Content::load(&layout)?);
    }
    let n = sc.sites.len().min(summary.rtt_ms.len());
    for a in 0..n {
        for b in 0..n {
            if a != b {
                sc.rtt[a][b] = Duration::from_secs_f64(summary.rtt_ms[a][b] / 1000.0);
            }
        }
        if summary.emulated {
            let wan = summary.wan_bps.map(|b| b as f64 / 8.0);
            sc.sites[a].wan_up = wan;
            sc.sites[a].wan_down = wan;
        }
    }
    if let Some(nic) = summary.nic_bps.filter(|_| summary.emulated) {
        let bytes = nic as f64 / 8.0;
        for h in &mut sc.hosts {
            h.nic_up = bytes;
            h.nic_down = bytes;
        }
        for s in &mut sc.sources {
            s.nic_up = bytes;
            s.nic_down = bytes;
        }
    }
    // `run` publishes on ordinary nodes (started by `up` without `--origin`).
    for s in &mut sc.sources {
        s.origin = false;
    }
    // What a read cost the nodes' block exports when its chunks were local, as measured in this
    // run: the simulator does not model the CPU (12 nodes and their NBD clients on a few cores),
    // so it is given the cost, as it is given the RTTs.
    if let Some(ms) = summary
        .local_read_ms
        .filter(|ms| ms.is_finite() && *ms >= 0.0)
    {
        sc.boot.read_service = Duration::from_secs_f64(ms / 1000.0);
    }
    Ok(sc)
}

fn as_run(label: &str, summary: &RunSummary, vms: Vec<VmRecord>) -> RunResult {
    RunResult {
        scenario: summary.scenario.clone(),
        strategy: "vmswarm".to_owned(),
        label: label.to_owned(),
        seed: summary.seed,
        sites: summary.sites.clone(),
        image_size: summary.image_size,
        chunk_size: summary.chunk_size,
        full_copy: false,
        background_all: false,
        vms,
        hosts: Vec::new(),
        links: Vec::new(),
        wan_out: Vec::new(),
        wan_in: summary.wan_in_payload.iter().map(|b| *b as f64).collect(),
        source_egress: summary.source_egress as f64,
        series_bin_s: 1.0,
        series: Vec::new(),
        counters: Counters::default(),
        kr_inputs: (0.0, 0.0, 0.0),
        first_start_s: 0.0,
    }
}

/// Runs the simulator for the testnet run in `dir`, writes `compare.txt`, `compare.json` and the
/// CDF plot there, and returns the comparison.
pub fn compare(dir: &Path) -> anyhow::Result<(Comparison, String)> {
    let text = std::fs::read_to_string(dir.join("summary.json")).with_context(|| {
        format!(
            "{} holds no testnet run (summary.json); run `vmswarm-testnet run` first",
            dir.display()
        )
    })?;
    let summary: RunSummary = serde_json::from_str(&text)
        .with_context(|| format!("parsing {}/summary.json", dir.display()))?;
    let sc = scenario_for(dir, &summary)?;
    let sim = vmswarm_sim::world::run(sc, summary.seed, "simulator".to_owned(), &mut |_| {})
        .map_err(|e| anyhow::anyhow!("simulator: {e}"))?;
    let testnet = as_run("testnet", &summary, read_vms(dir, summary.sites.len())?);

    let boots = |r: &RunResult| {
        let mut v: Vec<f64> = r.vms.iter().filter_map(|v| v.boot_s()).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let (tb, sb) = (boots(&testnet), boots(&sim));
    let pct = vmswarm_sim::report::percentile;
    let mut rows = vec![
        Row {
            metric: "p50 boot (s)".into(),
            testnet: pct(&tb, 50.0),
            simulator: pct(&sb, 50.0),
        },
        Row {
            metric: "p99 boot (s)".into(),
            testnet: pct(&tb, 99.0),
            simulator: pct(&sb, 99.0),
        },
        Row {
            metric: "max boot (s)".into(),
            testnet: tb.last().copied().unwrap_or(f64::NAN),
            simulator: sb.last().copied().unwrap_or(f64::NAN),
        },
    ];
    for (i, site) in summary.sites.iter().enumerate() {
        rows.push(Row {
            metric: format!("WAN in {site} (MB)"),
            testnet: summary.wan_in_payload.get(i).copied().unwrap_or(0) as f64 / 1e6,
            simulator: sim.wan_in.get(i).copied().unwrap_or(0.0) / 1e6,
        });
    }
    rows.push(Row {
        metric: "source egress (MB)".into(),
        testnet: summary.source_egress as f64 / 1e6,
        simulator: sim.source_egress / 1e6,
    });
    let cmp = Comparison { rows };
    let mut table = format!(
        "scenario {} (seed {}), {} VMs; testnet network: {}\n{}\n\n{:<22} {:>12} {:>12} {:>8}\n",
        summary.scenario,
        summary.seed,
        summary.vms,
        if summary.emulated {
            "namespaces + WAN emulator"
        } else {
            "LOOPBACK FALLBACK (no WAN emulation: not comparable)"
        },
        match summary.local_read_ms {
            Some(ms) => format!(
                "block export cost per read, measured (mean of {} local reads) and given to \
                 the simulator: {ms:.2} ms",
                summary.local_reads
            ),
            None => "block export cost per read: not measured (no local read); simulator: the \
                     scenario's boot.read_ms"
                .to_owned(),
        },
        "metric",
        "testnet",
        "simulator",
        "sim/test"
    );
    for r in &cmp.rows {
        let ratio = if r.testnet == 0.0 {
            "-".to_owned()
        } else {
            format!("{:.2}", r.ratio())
        };
        table.push_str(&format!(
            "{:<22} {:>12.2} {:>12.2} {:>8}\n",
            r.metric, r.testnet, r.simulator, ratio
        ));
    }
    std::fs::write(dir.join("compare.txt"), &table)?;
    std::fs::write(dir.join("compare.json"), serde_json::to_vec_pretty(&cmp)?)?;
    std::fs::write(dir.join("sim-vms.csv"), vmswarm_sim::report::vms_csv(&sim))?;
    vmswarm_sim::report::plot::boot_cdf(
        dir,
        "boot_cdf",
        &format!("{}: testnet vs simulator", summary.scenario),
        &[&testnet, &sim],
    )
    .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    Ok((cmp, table))
}
