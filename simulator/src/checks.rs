//! Built-in checks, reported with every run: the Kumar-Ross lower bound for full copies, byte
//! conservation across the independent counters (network links, senders, receivers, WAN), and
//! link capacities. A failed check means the simulator is wrong, not the protocol.
//!
//! Kumar & Ross (2006): a file of F bytes cannot reach N peers faster than
//! `max(F / u_s, F / d_min, N F / (u_s + sum u_i))`, with u_s the sources' upload, u_i the peers'
//! uploads and d_min the slowest download. Latency, WAN links and windows only add to it, so the
//! simulated full-copy time divided by the bound must be at least 1.

use serde::Serialize;

use crate::record::RunResult;

/// Relative tolerance of the byte and capacity checks.
const TOL: f64 = 1e-6;

/// The outcome of the checks.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Checks {
    /// The Kumar-Ross bound, s (runs in which every host copies the whole image).
    pub kumar_ross_bound_s: Option<f64>,
    /// Time from the first host start until the last host held the whole image, s.
    pub full_copy_s: Option<f64>,
    /// `full_copy_s / kumar_ross_bound_s` (must be >= 1).
    pub kumar_ross_ratio: Option<f64>,
    /// Whether bytes are conserved across every pair of counters.
    pub bytes_conserved: bool,
    /// Highest link utilisation seen.
    pub max_utilisation: f64,
    /// Whether no link ever carried more than its capacity.
    pub capacity_respected: bool,
    /// Whether every VM booted.
    pub all_booted: bool,
    /// What failed, in words (empty when all is well).
    pub problems: Vec<String>,
}

impl Checks {
    /// Whether every check passed.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The Kumar-Ross bound for `f` bytes, `n` peers.
pub fn kumar_ross(f: f64, n: f64, u_s: f64, u_sum: f64, d_min: f64) -> f64 {
    (f / u_s).max(f / d_min).max(n * f / (u_s + u_sum))
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= TOL * a.abs().max(b.abs()).max(1.0)
}

/// Runs every check on a result.
pub fn check(r: &RunResult) -> Checks {
    let mut problems = Vec::new();
    let c = &r.counters;

    // Kumar-Ross.
    let (u_s, u_sum, d_min) = r.kr_inputs;
    let mut bound = None;
    let mut full = None;
    let mut ratio = None;
    if r.background_all && !r.hosts.is_empty() {
        let b = kumar_ross(r.image_size as f64, r.hosts.len() as f64, u_s, u_sum, d_min);
        bound = Some(b);
        let done: Option<Vec<f64>> = r.hosts.iter().map(|h| h.background_done_s).collect();
        if let Some(done) = done {
            let t = done.iter().copied().fold(0.0, f64::max) - r.first_start_s;
            full = Some(t);
            ratio = Some(t / b);
            if t / b < 1.0 - TOL {
                problems.push(format!(
                    "full copy in {t:.3} s beats the Kumar-Ross bound of {b:.3} s: the model is wrong"
                ));
            }
        }
    }

    // Bytes.
    let sum = |classes: &[&str]| -> f64 {
        r.links
            .iter()
            .filter(|l| classes.contains(&l.class.as_str()))
            .map(|l| l.bytes)
            .sum()
    };
    let up = sum(&["host_up", "source_up"]);
    let down = sum(&["host_down", "source_down"]);
    let mut conserve = |what: &str, a: f64, b: f64| {
        if !close(a, b) {
            problems.push(format!("bytes not conserved: {what}: {a} vs {b}"));
        }
    };
    conserve("NIC uplinks vs bytes sent", up, c.bytes_sent);
    conserve("NIC downlinks vs bytes sent", down, c.bytes_sent);
    conserve(
        "sent vs delivered + wasted + in transit",
        c.bytes_sent,
        c.bytes_delivered + c.bytes_wasted + c.bytes_in_transit,
    );
    let fetched: f64 = r
        .hosts
        .iter()
        .map(|h| (h.fetched_bytes + h.duplicate_bytes) as f64)
        .sum();
    conserve(
        "delivered vs hosts' accepted + duplicate",
        c.bytes_delivered,
        fetched,
    );
    conserve(
        "source uplinks vs source egress",
        sum(&["source_up"]),
        r.source_egress,
    );
    for (i, site) in r.sites.iter().enumerate() {
        for (class, counter) in [("wan_up", r.wan_out[i]), ("wan_down", r.wan_in[i])] {
            if let Some(l) = r
                .links
                .iter()
                .find(|l| l.class == class && &l.owner == site)
            {
                conserve(
                    &format!("{class} link of {site} vs WAN counter"),
                    l.bytes,
                    counter,
                );
            }
        }
    }
    let out: f64 = r.wan_out.iter().sum();
    let inn: f64 = r.wan_in.iter().sum();
    conserve("WAN out vs WAN in", out, inn);
    let bytes_conserved = problems.iter().all(|p| !p.starts_with("bytes"));
    if c.max_fluid_error > 1.0 {
        problems.push(format!(
            "a flow's integrated rate differs from its size by {:.3} bytes",
            c.max_fluid_error
        ));
    }

    // Capacities.
    let capacity_respected = c.max_utilisation <= 1.0 + TOL;
    if !capacity_respected {
        problems.push(format!(
            "a link carried {:.6} times its capacity",
            c.max_utilisation
        ));
    }
    let all_booted = r.vms.iter().all(|v| v.boot_done_s.is_some());
    if !all_booted {
        let n = r.vms.iter().filter(|v| v.boot_done_s.is_none()).count();
        problems.push(format!(
            "{n} VMs had not booted when the run stopped at {:.1} s",
            c.end_s
        ));
    }
    Checks {
        kumar_ross_bound_s: bound,
        full_copy_s: full,
        kumar_ross_ratio: ratio,
        bytes_conserved,
        max_utilisation: c.max_utilisation,
        capacity_respected,
        all_booted,
        problems,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_terms() {
        // Source-limited, download-limited and aggregate-limited cases.
        assert_eq!(kumar_ross(100.0, 10.0, 1.0, 1000.0, 100.0), 100.0);
        assert_eq!(kumar_ross(100.0, 10.0, 1000.0, 1000.0, 10.0), 10.0);
        assert_eq!(kumar_ross(100.0, 100.0, 100.0, 900.0, 1000.0), 10.0);
    }
}
