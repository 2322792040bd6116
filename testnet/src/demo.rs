//! `vmswarm-testnet demo`: the README's main command. Three sites of four nodes over an emulated
//! WAN, a generated 256 MiB image published in site0, twelve VM clones booting lazily through NBD
//! with a boot-like access trace, then a summary (boot time per VM, WAN bytes per site next to what
//! a full copy would have moved, the simulator's figures for the same case) and plots; then a real
//! Debian kernel boots under QEMU from a lazy export in the farthest site ([`crate::realboot`]).
//!
//! The scenario is `simulator/scenarios/small-3site.toml`, compiled into the binary so the demo
//! runs from any directory. Everything is torn down at the end, also on failure or Ctrl-C.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;

use crate::run::{self, RunOptions};
use crate::state::State;

/// The demo scenario.
pub const SCENARIO: &str = include_str!("../../simulator/scenarios/small-3site.toml");

/// What `up` needs for the demo's network (matches the scenario file).
pub const SITES: usize = 3;
/// Nodes per site.
pub const NODES_PER_SITE: usize = 4;
/// RTTs 0-1, 0-2, 1-2.
pub const WAN: &str = "31ms,75ms,165ms";
/// Per-site WAN link.
pub const WAN_BW: &str = "100mbit";
/// Per-node NIC.
pub const NIC_BW: &str = "200mbit";

/// Formats the demo's closing summary.
pub fn report(summary: &run::RunSummary, dir: &Path, comparison: Option<&str>) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "\n== vmswarm testnet demo: {} VMs booted lazily from image {}\n",
        summary.vms,
        &summary.image_id[..16.min(summary.image_id.len())]
    ));
    if let Ok(text) = std::fs::read_to_string(dir.join("vms.csv")) {
        s.push_str(&format!(
            "\n{:<5} {:<7} {:>9} {:>14}\n",
            "vm", "site", "boot (s)", "fetched (MiB)"
        ));
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split(',').collect();
            if f.len() > 8 {
                let boot = if f[5].is_empty() { "FAILED" } else { f[5] };
                let mib = f[8].parse::<f64>().unwrap_or(0.0) / 1048576.0;
                s.push_str(&format!(
                    "{:<5} {:<7} {:>9} {:>14.1}\n",
                    f[0],
                    f[2],
                    boot.get(..boot.len().min(7)).unwrap_or(boot),
                    mib
                ));
            }
        }
    }
    s.push_str(&format!(
        "\nboot time: p50 {:.2} s, max {:.2} s ({} of {} booted)\n",
        summary.p50_s, summary.max_s, summary.booted, summary.vms
    ));
    let image_mib = summary.image_size as f64 / 1048576.0;
    s.push_str(&format!(
        "\n{:<8} {:>18} {:>18} {:>26}\n",
        "site", "WAN in, chunks", "WAN in, on wire", "a full copy per host would be"
    ));
    for (i, site) in summary.sites.iter().enumerate() {
        let vms_here = summary.roles.hosts.iter().filter(|h| h.site == i).count();
        let has_source = summary.roles.sources.iter().any(|h| h.site == i);
        let full = if has_source {
            0.0
        } else {
            vms_here as f64 * image_mib
        };
        s.push_str(&format!(
            "{:<8} {:>14.1} MiB {:>14.1} MiB {:>22.0} MiB\n",
            site,
            summary.wan_in_payload[i] as f64 / 1048576.0,
            summary.wan_in_wire.get(i).copied().unwrap_or(0) as f64 / 1048576.0,
            full
        ));
    }
    s.push_str(&format!(
        "source egress: {:.1} MiB ({:.2} images)\n",
        summary.source_egress as f64 / 1048576.0,
        summary.source_egress as f64 / summary.image_size as f64
    ));
    if let Some(c) = comparison {
        s.push_str("\n== the simulator on the same scenario and network\n");
        s.push_str(c);
    }
    s.push_str(&format!(
        "\nresults, per-VM CSV and plots (boot_cdf.svg/png): {}\n",
        dir.display()
    ));
    s
}

/// Tears the testnet in `dir` down once, from whichever path gets there first.
#[derive(Debug, Clone)]
pub struct Teardown(Arc<Mutex<Option<PathBuf>>>);

impl Teardown {
    /// Armed for the testnet in `dir`.
    pub fn new(dir: PathBuf) -> Teardown {
        Teardown(Arc::new(Mutex::new(Some(dir))))
    }

    /// Tears down (once).
    pub fn run(&self) -> anyhow::Result<()> {
        let dir = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(dir) = dir
            && State::path(&dir).exists()
        {
            State::load(&dir)?
                .teardown()
                .context("tearing the demo testnet down")?;
        }
        Ok(())
    }
}

/// Runs the demo's scenario on the testnet in `state` and returns the report text.
pub fn run_demo(state: &State, vmswarm: PathBuf, out: &Path, seed: u64) -> anyhow::Result<String> {
    // The scenario is kept next to the results: `compare` reads it from there.
    let scenario = out.join("scenario.toml");
    std::fs::write(&scenario, SCENARIO)?;
    let summary = run::run(
        state,
        &RunOptions {
            scenario,
            overrides: Vec::new(),
            seed,
            out: out.to_path_buf(),
            vmswarm: vmswarm.clone(),
            timeout: std::time::Duration::from_secs(300),
        },
    )?;
    let comparison = crate::compare::compare(out).map(|(_, t)| t);
    let cmp_text = match &comparison {
        Ok(t) => Some(t.as_str()),
        Err(e) => {
            eprintln!("demo: the simulator comparison failed: {e:#}");
            None
        }
    };
    let mut text = report(&summary, out, cmp_text);
    eprintln!("== a real Linux kernel boots from a lazy export in the farthest site");
    let real = crate::realboot::boot(state, &summary.roles, &vmswarm, out);
    text.push_str(&crate::realboot::report(&real));
    if let Err(crate::realboot::NoBoot::Failed(_)) = real {
        anyhow::bail!("{text}");
    }
    Ok(text)
}
