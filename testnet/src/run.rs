//! `vmswarm-testnet run`: a simulator scenario on the real testnet.
//!
//! Takes the parts of a `vmswarm-sim` scenario that apply to real processes — sites, hosts per site,
//! VMs per host and their start times, source servers, image size and chunk size, the boot access
//! model — and carries them out: generates an image with a realistic layout ([`image`]), publishes
//! it on the source nodes, mounts it through NBD on every VM's host, and replays each VM's boot reads
//! with a real NBD client (`qemu-io`, one process per VM, blocked on each read, think times as
//! `sleep`). The network (RTTs, WAN and NIC bandwidth) is the testnet's, set by `up`; `compare`
//! re-runs the simulator with exactly those values.
//!
//! A host with several VMs (`vms = 2`) is one node with one export and one `qemu-io` per VM; the
//! node fetches each chunk once for all of them, and `vms.csv` charges each VM an equal share of
//! the node's fetched bytes (the first VM of the node also the remainder, so they add up).
//!
//! Results use the simulator's schema: `vms.csv` (same columns as `vmswarm-sim run`), `wan.csv`
//! (bytes per site pair counted by the WAN emulator, on the wire), and `summary.json`.

pub mod image;
pub mod reads;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rand_chacha::ChaCha8Rng;
use vmswarm_sim::boot::{self, VmReads};
use vmswarm_sim::record::{LinkRecord, VmRecord};
use vmswarm_sim::scenario::{Prefetch, Scenario};

use crate::plan::NodePlan;

/// The image's content layout in a results folder (`vmswarm_sim::content`'s JSON).
pub const CONTENT_FILE: &str = "content.json";
use crate::state::State;
use crate::{sys, wan};

/// A testnet node in a scenario role.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NodeRef {
    /// Node name (`s1n2`).
    pub name: String,
    /// Its site index.
    pub site: usize,
}

/// Which testnet node plays which scenario role.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Roles {
    /// The source servers.
    pub sources: Vec<NodeRef>,
    /// Each scenario host, in scenario order (host groups in file order).
    pub hosts: Vec<NodeRef>,
}

/// Maps the scenario's sources and hosts onto the testnet's nodes, site by site: sources first,
/// then hosts. A site with one node too few lets its first source share a node with a host
/// (the source then also boots VMs); anything less is an error naming the numbers.
pub fn assign(sc: &Scenario, state: &State) -> anyhow::Result<Roles> {
    let plan = &state.plan;
    if sc.sites.len() != plan.sites.len() {
        bail!(
            "scenario {} has {} sites, the testnet {}: start it with `up --sites {}`",
            sc.name,
            sc.sites.len(),
            plan.sites.len(),
            sc.sites.len()
        );
    }
    let node_ref = |n: &NodePlan| NodeRef {
        name: n.name.clone(),
        site: n.site,
    };
    let mut sources = Vec::new();
    // Per site, the nodes its hosts get, handed out to host groups in file order below.
    let mut host_nodes: Vec<std::vec::IntoIter<NodeRef>> = Vec::new();
    for s in 0..sc.sites.len() {
        let nodes: Vec<&NodePlan> = plan.nodes.iter().filter(|n| n.site == s).collect();
        let n_sources = sc.sources.iter().filter(|x| x.site == s).count();
        let n_hosts: u32 = sc
            .hosts
            .iter()
            .filter(|h| h.site == s)
            .map(|h| h.count)
            .sum();
        let n_hosts = n_hosts as usize;
        let shared = n_sources > 0 && n_sources + n_hosts == nodes.len() + 1;
        if n_sources + n_hosts > nodes.len() + usize::from(shared) {
            bail!(
                "site {} needs {} nodes ({n_sources} sources + {n_hosts} hosts) but has {}",
                sc.sites[s].name,
                n_sources + n_hosts,
                nodes.len()
            );
        }
        sources.extend(nodes.iter().take(n_sources).map(|n| node_ref(n)));
        let first_host = n_sources - usize::from(shared);
        let hosts: Vec<NodeRef> = nodes
            .iter()
            .skip(first_host)
            .take(n_hosts)
            .map(|n| node_ref(n))
            .collect();
        host_nodes.push(hosts.into_iter());
    }
    let mut hosts = Vec::new();
    for g in &sc.hosts {
        for _ in 0..g.count {
            // The site's list holds exactly as many nodes as its groups have hosts (checked above).
            hosts.extend(host_nodes[g.site].next());
        }
    }
    Ok(Roles { sources, hosts })
}

/// What `run` records beside the CSV files, and what `compare` reads back.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RunSummary {
    /// The scenario file.
    pub scenario_file: PathBuf,
    /// Its name.
    pub scenario: String,
    /// `--set` overrides applied to it.
    pub overrides: Vec<String>,
    /// Seed of the boot traces.
    pub seed: u64,
    /// The testnet's network: RTT matrix (ms), WAN and NIC bandwidth (bit/s).
    pub rtt_ms: Vec<Vec<f64>>,
    /// Per-site WAN link, bit/s.
    pub wan_bps: Option<u64>,
    /// Per-node NIC, bit/s.
    pub nic_bps: Option<u64>,
    /// Whether namespaces and the WAN emulator were used.
    pub emulated: bool,
    /// The image.
    pub image_id: String,
    /// Image size, bytes.
    pub image_size: u64,
    /// Chunk size, bytes.
    pub chunk_size: u32,
    /// Roles.
    pub roles: Roles,
    /// Site names.
    pub sites: Vec<String>,
    /// Boot time percentiles over booted VMs, s.
    pub p50_s: f64,
    /// 99th percentile.
    pub p99_s: f64,
    /// Slowest.
    pub max_s: f64,
    /// VMs booted / VMs.
    pub booted: usize,
    /// VMs.
    pub vms: usize,
    /// Chunk payload bytes that entered each site from other sites (nodes' counters).
    pub wan_in_payload: Vec<u64>,
    /// Bytes on the wire that entered each site (WAN emulator), including QUIC/IP overhead and
    /// overlay traffic.
    pub wan_in_wire: Vec<u64>,
    /// Chunk payload bytes uploaded by the source nodes.
    pub source_egress: u64,
    /// Wall time of the whole run, s.
    pub wall_s: f64,
    /// Mean time of the VMs' reads that the node served from chunks it held, ms ([`reads`]):
    /// the block export's own cost per read under this run's load (the mean, as a boot's time is
    /// the sum of its reads'). `None` when no read was local (and in runs recorded before it was
    /// measured).
    #[serde(default)]
    pub local_read_ms: Option<f64>,
    /// How many local reads that mean is over.
    #[serde(default)]
    pub local_reads: usize,
}

/// Options of `run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Scenario file.
    pub scenario: PathBuf,
    /// `--set` overrides.
    pub overrides: Vec<String>,
    /// Seed for the image and the boot traces.
    pub seed: u64,
    /// Output directory.
    pub out: PathBuf,
    /// The vmswarm binary.
    pub vmswarm: PathBuf,
    /// Give up on VMs still booting after this long.
    pub timeout: Duration,
}

/// `vmswarm --data DATA args...` (the node's CLI), returning its stdout.
fn vmswarm(bin: &Path, data: &Path, args: &[&str]) -> anyhow::Result<String> {
    let mut full: Vec<&OsStr> = vec![OsStr::new("--data"), data.as_os_str()];
    full.extend(args.iter().map(OsStr::new));
    sys::run(bin, &full)
}

/// Per-link chunk payload in the simulator's link schema: each node's NIC up (bytes it served) and
/// down (bytes it fetched), each site's WAN up and down (chunk bytes fetched across sites, from
/// the nodes' per-site counters). Capacities are the shaped rates (unknown when unshaped); peak
/// utilisation is not measured (left empty).
fn link_records(
    plan: &crate::plan::Plan,
    host_in: &[Vec<u64>],
    host_out: &[u64],
) -> Vec<LinkRecord> {
    let cap = |bps: Option<u64>| bps.map_or(f64::NAN, |b| b as f64 / 8.0);
    let mut links = Vec::new();
    let nsites = plan.sites.len();
    let mut wan_up = vec![0u64; nsites];
    let mut wan_down = vec![0u64; nsites];
    for (i, n) in plan.nodes.iter().enumerate() {
        let fetched = host_in.get(i).cloned().unwrap_or_default();
        for (s, b) in fetched.iter().enumerate() {
            if s != n.site {
                wan_down[n.site] += b;
                wan_up[s] += b;
            }
        }
        for (class, bytes) in [
            ("host_up", host_out.get(i).copied().unwrap_or(0)),
            ("host_down", fetched.iter().sum()),
        ] {
            links.push(LinkRecord {
                class: class.to_owned(),
                owner: n.name.clone(),
                capacity: cap(plan.nic_bps.filter(|_| plan.netns)),
                bytes: bytes as f64,
                peak_utilisation: f64::NAN,
            });
        }
    }
    let wan = if plan.netns {
        plan.wan.uplink_bps
    } else {
        None
    };
    for (s, site) in plan.sites.iter().enumerate() {
        for (class, bytes) in [("wan_up", wan_up[s]), ("wan_down", wan_down[s])] {
            links.push(LinkRecord {
                class: class.to_owned(),
                owner: site.clone(),
                capacity: cap(wan),
                bytes: bytes as f64,
                peak_utilisation: f64::NAN,
            });
        }
    }
    links
}

/// The qemu-io commands that replay one VM's boot: reads, and think times as `sleep` (qemu-io
/// sleeps in whole milliseconds, so fractions are carried over to the next think time).
pub fn qemu_io_script(reads: &VmReads, think_mean: Duration, rng: &mut ChaCha8Rng) -> String {
    let mut s = String::new();
    let mut carry = 0.0f64;
    for i in 0..reads.len() {
        let Some((r, think)) = reads.get(i) else {
            break;
        };
        s.push_str(&format!("read {} {}\n", r.offset, r.len));
        let t = think.map_or_else(
            || boot::exponential(rng, think_mean.as_secs_f64() * 1000.0),
            |d| d.as_secs_f64() * 1000.0,
        );
        carry += t;
        if carry >= 1.0 {
            let ms = carry.floor();
            s.push_str(&format!("sleep {}\n", ms as u64));
            carry -= ms;
        }
    }
    s.push_str("quit\n");
    s
}

struct VmProc {
    child: Child,
    started: Instant,
    vm: usize,
}

impl Drop for VmProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn site_bytes_in(status: &serde_json::Value, own_site: &str) -> Vec<(String, u64)> {
    status["metrics"]["bytes_in_by_site"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| k.as_str() != own_site)
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

/// One VM's share of what its host fetched from each site, when `vms` VMs share the host: an
/// equal part, plus the division's remainder for the host's `first` VM, so the shares add up to
/// the host's bytes exactly.
fn vm_share(host_bytes: &[u64], vms: u64, first: bool) -> Vec<u64> {
    let vms = vms.max(1);
    host_bytes
        .iter()
        .map(|b| b / vms + if first { b % vms } else { 0 })
        .collect()
}

/// Runs the scenario on the testnet in `state`.
pub fn run(state: &State, opts: &RunOptions) -> anyhow::Result<RunSummary> {
    let wall = Instant::now();
    let sc = Scenario::load(&opts.scenario, &opts.overrides).map_err(|e| anyhow::anyhow!("{e}"))?;
    let roles = assign(&sc, state)?;
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    let node_dir = |name: &str| state.data_dir(name);
    let site_of = |name: &str| {
        state
            .plan
            .nodes
            .iter()
            .find(|n| n.name == name)
            .map_or(0, |n| n.site)
    };

    // 1. The image, published on every source.
    let images = state.dir.join("images");
    std::fs::create_dir_all(&images)?;
    let file = images.join(format!("{}.raw", sc.name));
    image::generate(&file, sc.image_size, sc.chunk_size, opts.seed)?;
    // What the nodes will find in it (zero and repeated chunks), for `compare`'s simulator run.
    let content = image::content_layout(&file, sc.chunk_size)?;
    std::fs::write(opts.out.join(CONTENT_FILE), content.to_json())
        .with_context(|| format!("writing {}", opts.out.join(CONTENT_FILE).display()))?;
    let chunk = format!("{}", sc.chunk_size);
    let mut image_id = String::new();
    for src in roles.sources.iter().map(|n| &n.name) {
        let out = vmswarm(
            &opts.vmswarm,
            &node_dir(src),
            &[
                "publish",
                &file.display().to_string(),
                "--name",
                &sc.name,
                "--chunk-size",
                &chunk,
            ],
        )?;
        image_id = out.lines().last().unwrap_or_default().trim().to_owned();
    }
    std::fs::remove_file(&file).ok();
    if image_id.is_empty() {
        bail!("scenario {} has no source to publish the image on", sc.name);
    }
    let baseline: Vec<serde_json::Value> = state
        .plan
        .nodes
        .iter()
        .map(|n| {
            vmswarm(&opts.vmswarm, &node_dir(&n.name), &["status", "--json"])
                .ok()
                .and_then(|s| serde_json::from_str(&s).ok())
                .unwrap_or_default()
        })
        .collect();
    let wan_before = if state.plan.netns {
        wan::read_stats(&state.dir.join("wan-stats.json")).ok()
    } else {
        None
    };

    // 2. One export per VM, and its boot reads: the very reads, think times and start times the
    // simulator draws for this seed, so `compare` holds both to the same boot traces.
    let mut traces = vmswarm_sim::world::vm_traces(&sc, opts.seed).into_iter();
    let mut starts = vmswarm_sim::world::vm_start_times(&sc, opts.seed).into_iter();
    let sockets = state.dir.join("nbd");
    std::fs::create_dir_all(&sockets)?;
    struct Vm {
        host: usize,
        node: String,
        name: String,
        socket: PathBuf,
        start_s: f64,
        script: String,
        reads: u64,
    }
    let mut vms = Vec::new();
    let mut h = 0usize;
    for g in &sc.hosts {
        for _ in 0..g.count {
            for _ in 0..g.vms {
                let k = vms.len();
                let (Some((reads, mut rng)), Some(start_s)) = (traces.next(), starts.next()) else {
                    bail!("the simulator drew fewer VMs than the scenario has");
                };
                let script = qemu_io_script(&reads, sc.boot.think_mean, &mut rng);
                vms.push(Vm {
                    host: h,
                    node: roles.hosts[h].name.clone(),
                    name: format!("vm{k}"),
                    socket: sockets.join(format!("vm{k}.sock")),
                    start_s,
                    script,
                    reads: reads.len() as u64,
                });
            }
            h += 1;
        }
    }
    // The node's mount flag for the simulator's prefetch mode, so that both do the same.
    let prefetch = match sc.prefetch {
        Prefetch::None => None,
        Prefetch::Profile => Some("--prefetch=profile"),
        Prefetch::All => Some("--prefetch=all"),
    };
    for vm in &vms {
        let nbd = format!("unix:{}", vm.socket.display());
        let mut args = vec![
            "mount",
            image_id.as_str(),
            "--nbd",
            nbd.as_str(),
            "--name",
            vm.name.as_str(),
        ];
        if let Some(flag) = prefetch {
            args.push(flag);
        }
        vmswarm(&opts.vmswarm, &node_dir(&vm.node), &args)?;
    }

    // 3. Boot: every VM at its start time, one qemu-io each.
    let t0 = Instant::now();
    let mut pending: Vec<usize> = (0..vms.len()).collect();
    pending.sort_by(|a, b| vms[*a].start_s.total_cmp(&vms[*b].start_s));
    let mut running: Vec<VmProc> = Vec::new();
    let mut records: Vec<Option<VmRecord>> = vec![None; vms.len()];
    let mut failures = vec![0u64; vms.len()];
    let mut local_reads: Vec<f64> = Vec::new();
    let mut next = 0;
    let deadline = t0 + opts.timeout;
    while next < pending.len() || !running.is_empty() {
        while next < pending.len() && t0.elapsed().as_secs_f64() >= vms[pending[next]].start_s {
            let k = pending[next];
            let vm = &vms[k];
            let url = format!("nbd+unix:///{}?socket={}", vm.name, vm.socket.display());
            let script_path = opts.out.join(format!("{}.qemu-io", vm.name));
            std::fs::write(&script_path, &vm.script)?;
            let stdin = std::fs::File::open(&script_path)?;
            let log = std::fs::File::create(opts.out.join(format!("{}.log", vm.name)))?;
            let started = Instant::now();
            let child = Command::new("qemu-io")
                .args(["-r", "-f", "raw", &url])
                .stdin(stdin)
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting qemu-io (install qemu-utils)")?;
            running.push(VmProc {
                child,
                started,
                vm: k,
            });
            next += 1;
        }
        let mut i = 0;
        while i < running.len() {
            if let Some(status) = running[i].child.try_wait()? {
                let p = running.swap_remove(i);
                let k = p.vm;
                let log = std::fs::read_to_string(opts.out.join(format!("{}.log", vms[k].name)))
                    .unwrap_or_default();
                failures[k] = log.matches("read failed").count() as u64;
                let on_source = roles.sources.iter().any(|s| s.name == vms[k].node);
                local_reads.extend(reads::local_read_times(
                    &reads::parse_log(&log),
                    u64::from(sc.chunk_size),
                    on_source,
                ));
                let done = p.started.duration_since(t0) + p.started.elapsed();
                let ok = status.success() && failures[k] == 0;
                records[k] = Some(VmRecord {
                    vm: k as u32,
                    host: vms[k].host as u32,
                    site: state.plan.sites[site_of(&vms[k].node)].clone(),
                    start_s: p.started.duration_since(t0).as_secs_f64(),
                    boot_done_s: ok.then_some(done.as_secs_f64()),
                    reads: vms[k].reads,
                    read_failures: failures[k],
                    fetched_bytes: 0,
                    fetched_from_site: vec![0; state.plan.sites.len()],
                });
                continue;
            }
            i += 1;
        }
        if Instant::now() > deadline {
            eprintln!(
                "run: {} VMs still booting after {:?}; stopping them",
                running.len(),
                opts.timeout
            );
            for p in running.drain(..) {
                let k = p.vm;
                records[k] = Some(VmRecord {
                    vm: k as u32,
                    host: vms[k].host as u32,
                    site: state.plan.sites[site_of(&vms[k].node)].clone(),
                    start_s: p.started.duration_since(t0).as_secs_f64(),
                    boot_done_s: None,
                    reads: vms[k].reads,
                    read_failures: 0,
                    fetched_bytes: 0,
                    fetched_from_site: vec![0; state.plan.sites.len()],
                });
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }

    // 4. Counters: chunk payload per site from the nodes, wire bytes from the emulator.
    let nsites = state.plan.sites.len();
    let mut wan_in_payload = vec![0u64; nsites];
    let mut source_egress = 0u64;
    let mut host_in: Vec<Vec<u64>> = Vec::new();
    let mut host_out: Vec<u64> = Vec::new();
    for (i, n) in state.plan.nodes.iter().enumerate() {
        let now: serde_json::Value =
            vmswarm(&opts.vmswarm, &node_dir(&n.name), &["status", "--json"])
                .ok()
                .and_then(|s| serde_json::from_str(&s).ok())
                .unwrap_or_default();
        let own = &state.plan.sites[n.site];
        let before: std::collections::HashMap<String, u64> =
            site_bytes_in(&baseline[i], own).into_iter().collect();
        for (site, b) in site_bytes_in(&now, own) {
            wan_in_payload[n.site] += b - before.get(&site).copied().unwrap_or(0).min(b);
        }
        let out = now["metrics"]["bytes_out"].as_u64().unwrap_or(0);
        let was = baseline[i]["metrics"]["bytes_out"].as_u64().unwrap_or(0);
        host_out.push(out.saturating_sub(was));
        if roles.sources.iter().any(|s| s.name == n.name) {
            source_egress += out.saturating_sub(was);
        }
        let mut per_site = vec![0u64; nsites];
        if let Some(m) = now["metrics"]["bytes_in_by_site"].as_object() {
            for (site, v) in m {
                if let Some(s) = state.plan.sites.iter().position(|x| x == site) {
                    let was = baseline[i]["metrics"]["bytes_in_by_site"][site]
                        .as_u64()
                        .unwrap_or(0);
                    per_site[s] = v.as_u64().unwrap_or(0).saturating_sub(was);
                }
            }
        }
        host_in.push(per_site);
    }
    // A host's fetches are charged to its VMs in equal parts, the first VM of the host taking the
    // remainder of the division, so that the VMs of a host add up to exactly what the host
    // fetched (several VMs per host share one node, which fetches each chunk once).
    let mut records: Vec<VmRecord> = records.into_iter().flatten().collect();
    for r in &mut records {
        let k = r.vm as usize;
        let node = &vms[k].node;
        let on_host: Vec<usize> = (0..vms.len()).filter(|j| &vms[*j].node == node).collect();
        let n = on_host.len().max(1) as u64;
        let first = on_host.first() == Some(&k);
        if let Some(i) = state.plan.nodes.iter().position(|n| &n.name == node) {
            r.fetched_from_site = vm_share(&host_in[i], n, first);
            r.fetched_bytes = r.fetched_from_site.iter().sum();
        }
    }
    let mut wan_in_wire = vec![0u64; nsites];
    let mut wan_csv = String::from("from_site,to_site,wire_bytes\n");
    if let (Some(before), Ok(after)) = (
        wan_before,
        wan::read_stats(&state.dir.join("wan-stats.json")),
    ) {
        for a in 0..nsites {
            for (b, into) in wan_in_wire.iter_mut().enumerate() {
                let d = after.delivered[a][b].saturating_sub(before.delivered[a][b]);
                *into += d;
                if a != b {
                    wan_csv.push_str(&format!(
                        "{},{},{d}\n",
                        state.plan.sites[a], state.plan.sites[b]
                    ));
                }
            }
        }
    }
    for vm in &vms {
        let _ = vmswarm(&opts.vmswarm, &node_dir(&vm.node), &["umount", &vm.name]);
    }

    // 5. Files in the simulator's schema.
    let mut boots: Vec<f64> = records.iter().filter_map(|r| r.boot_s()).collect();
    boots.sort_by(f64::total_cmp);
    let pct = |p: f64| vmswarm_sim::report::percentile(&boots, p);
    let summary = RunSummary {
        scenario_file: std::fs::canonicalize(&opts.scenario)?,
        scenario: sc.name.clone(),
        overrides: opts.overrides.clone(),
        seed: opts.seed,
        rtt_ms: state
            .plan
            .wan
            .rtt
            .iter()
            .map(|row| row.iter().map(|d| d.as_secs_f64() * 1000.0).collect())
            .collect(),
        wan_bps: state.plan.wan.uplink_bps,
        nic_bps: state.plan.nic_bps,
        emulated: state.plan.netns,
        image_id,
        image_size: sc.image_size,
        chunk_size: sc.chunk_size,
        roles,
        sites: state.plan.sites.clone(),
        p50_s: pct(50.0),
        p99_s: pct(99.0),
        max_s: boots.last().copied().unwrap_or(f64::NAN),
        booted: boots.len(),
        vms: records.len(),
        wan_in_payload,
        wan_in_wire,
        source_egress,
        wall_s: wall.elapsed().as_secs_f64(),
        local_read_ms: (!local_reads.is_empty())
            .then(|| local_reads.iter().sum::<f64>() / local_reads.len() as f64 * 1000.0),
        local_reads: local_reads.len(),
    };
    std::fs::write(
        opts.out.join("vms.csv"),
        vmswarm_sim::report::vm_records_csv(&state.plan.sites, &records),
    )?;
    std::fs::write(opts.out.join("wan.csv"), wan_csv)?;
    std::fs::write(
        opts.out.join("links.csv"),
        vmswarm_sim::report::link_records_csv(
            &link_records(&state.plan, &host_in, &host_out),
            t0.elapsed().as_secs_f64(),
        ),
    )?;
    std::fs::write(
        opts.out.join("summary.json"),
        serde_json::to_vec_pretty(&summary)?,
    )?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::vm_share;

    #[test]
    fn the_vms_of_a_host_share_its_fetched_bytes_exactly() {
        let host = [0, 7, 1_048_577];
        let first = vm_share(&host, 2, true);
        let second = vm_share(&host, 2, false);
        assert_eq!(first, vec![0, 4, 524_289]);
        assert_eq!(second, vec![0, 3, 524_288]);
        assert_eq!(vm_share(&host, 1, true), host.to_vec());
        for n in 1..5u64 {
            let total: u64 = (0..n).map(|k| vm_share(&host, n, k == 0)[2]).sum();
            assert_eq!(total, host[2], "{n} VMs");
        }
    }
}
