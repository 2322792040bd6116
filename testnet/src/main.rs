//! The `vmswarm-testnet` command line; the work is in the library's modules.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use vmswarm_testnet::plan::{self, Plan, PlanRequest};
use vmswarm_testnet::state::State;
use vmswarm_testnet::{probe, sys, up, wan};

/// Runs real vmswarm nodes across emulated sites on one machine.
#[derive(Debug, Parser)]
#[command(name = "vmswarm-testnet", version, about, long_about = None)]
struct Cli {
    /// Where the testnet keeps its state, data dirs and logs.
    #[arg(long, global = true, env = "VMSWARM_TESTNET_DIR")]
    dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create the sites and start the nodes (they keep running after this command returns).
    Up(UpArgs),
    /// Stop every node and remove everything `up` created.
    Down,
    /// Show the nodes and whether they run.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Run a simulator scenario on the testnet that is up: publish, mount through NBD, replay boots.
    Run {
        /// The scenario (vmswarm-sim TOML).
        scenario: PathBuf,
        /// Where to write vms.csv, wan.csv, summary.json.
        #[arg(long)]
        out: PathBuf,
        /// Seed for the image and the boot traces.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Override scenario fields, as in vmswarm-sim (e.g. --set image.size="64 MiB").
        #[arg(long = "set")]
        overrides: Vec<String>,
        /// Give up on VMs still booting after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout_s: u64,
        /// The vmswarm binary (default: next to this program, then $PATH).
        #[arg(long, env = "VMSWARM_BIN")]
        vmswarm: Option<PathBuf>,
    },
    /// Compare a `run`'s results with the simulator on the same scenario and network.
    Compare {
        /// The directory `run --out` wrote.
        results: PathBuf,
        /// Run the simulator (the only comparison there is; kept for the documented command line).
        #[arg(long)]
        sim: bool,
    },
    /// The README's main command: 3 sites x 4 nodes, 12 VM clones booting lazily over a WAN.
    Demo {
        /// Where results and plots go.
        #[arg(long, default_value = "testnet-demo-results")]
        out: PathBuf,
        /// Seed for the image and the boot traces.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// The vmswarm binary (default: next to this program, then $PATH).
        #[arg(long, env = "VMSWARM_BIN")]
        vmswarm: Option<PathBuf>,
    },
    /// Measure RTT or throughput between two nodes (e.g. `probe s0n0 s1n0 --rtt 10`).
    Probe {
        /// The node that sends.
        from: String,
        /// The node that answers.
        to: String,
        /// Number of round trips to time.
        #[arg(long, conflicts_with = "bytes")]
        rtt: Option<usize>,
        /// Bytes to send over one TCP stream.
        #[arg(long)]
        bytes: Option<u64>,
    },
    #[command(hide = true)]
    WanEmulator {
        #[arg(long)]
        spec: PathBuf,
    },
    #[command(hide = true)]
    ProbeServe {
        #[arg(long)]
        bind: SocketAddr,
        #[arg(long)]
        lifetime_s: u64,
    },
    #[command(hide = true)]
    ProbeClient {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        rtt: Option<usize>,
        #[arg(long)]
        bytes: Option<u64>,
    },
}

#[derive(Debug, clap::Args)]
struct UpArgs {
    /// Number of sites.
    #[arg(long, default_value_t = 3)]
    sites: usize,
    /// Nodes in each site.
    #[arg(long, default_value_t = 4)]
    nodes_per_site: usize,
    /// Round-trip times between sites: one for all pairs, or one per pair in the order
    /// 0-1, 0-2, ..., 1-2, ... [default: "31ms,75ms,165ms" for three sites, else "50ms"]
    #[arg(long)]
    wan: Option<String>,
    /// Each site's WAN link, up and down (e.g. 200mbit); unlimited if not given.
    #[arg(long)]
    wan_bw: Option<String>,
    /// Each node's NIC, up and down (e.g. 100mbit); unlimited if not given.
    #[arg(long)]
    nic_bw: Option<String>,
    /// Longest queueing delay at a WAN link before packets are dropped.
    #[arg(long, default_value = "50ms")]
    wan_queue: String,
    /// Do not use network namespaces: loopback addresses, no WAN emulation.
    #[arg(long)]
    no_netns: bool,
    /// First UDP port in loopback mode.
    #[arg(long, default_value_t = 17400)]
    base_port: u16,
    /// The vmswarm binary (default: next to this program, then $PATH).
    #[arg(long, env = "VMSWARM_BIN")]
    vmswarm: Option<PathBuf>,
    /// RUST_LOG for the nodes.
    #[arg(long, default_value = "info,libp2p=warn")]
    node_log: String,
}

fn state_dir(cli: &Cli) -> PathBuf {
    cli.dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("vmswarm-testnet"))
}

fn find_vmswarm(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return std::fs::canonicalize(&p)
            .with_context(|| format!("vmswarm binary {} not found", p.display()));
    }
    let me = std::env::current_exe()?;
    if let Some(dir) = me.parent() {
        let sib = dir.join("vmswarm");
        if sib.is_file() {
            return Ok(sib);
        }
        // Integration tests run from target/<profile>/deps.
        if let Some(up) = dir.parent() {
            let sib = up.join("vmswarm");
            if sib.is_file() {
                return Ok(sib);
            }
        }
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let p = dir.join("vmswarm");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "cannot find the vmswarm binary: build it (`cargo build -p vmswarm-node`) or pass --vmswarm"
    )
}

fn random_id() -> String {
    use rand::RngCore;
    format!("{:06x}", rand::rng().next_u32() & 0xff_ffff)
}

fn cmd_up(dir: &Path, a: UpArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = std::fs::canonicalize(dir)?;
    if State::path(&dir).exists() {
        bail!(
            "a testnet is already up in {} (run `vmswarm-testnet --dir {} down` first)",
            dir.display(),
            dir.display()
        );
    }
    let vmswarm = find_vmswarm(a.vmswarm)?;
    let id = random_id();
    let mut netns = !a.no_netns;
    if netns && !sys::can_create_netns(&format!("vmsw-{id}-probe")) {
        eprintln!(
            "WARNING: cannot create network namespaces here (not root?). FALLING BACK to loopback \
             addresses: all sites share 127.0.0.1, there is NO WAN latency or bandwidth emulation \
             and NO NIC shaping. Results are not representative of a WAN."
        );
        netns = false;
    } else if !netns {
        eprintln!("WARNING: --no-netns: loopback addresses, NO WAN emulation and NO NIC shaping.");
    }
    let wan = a.wan.unwrap_or_else(|| {
        if a.sites == 3 {
            "31ms,75ms,165ms"
        } else {
            "50ms"
        }
        .to_owned()
    });
    let wan_rtt = wan
        .split(',')
        .map(plan::parse_duration)
        .collect::<Result<Vec<_>, _>>()?;
    let req = PlanRequest {
        sites: a.sites,
        nodes_per_site: a.nodes_per_site,
        wan_rtt,
        wan_bps: a.wan_bw.as_deref().map(plan::parse_bandwidth).transpose()?,
        nic_bps: a.nic_bw.as_deref().map(plan::parse_bandwidth).transpose()?,
        queue_limit: plan::parse_duration(&a.wan_queue)?,
        netns,
        base_port: a.base_port,
    };
    let plan = Plan::new(&id, &req)?;
    let mut state = State {
        dir: dir.clone(),
        plan,
        namespaces: Vec::new(),
        procs: Vec::new(),
        complete: false,
    };
    state.save()?;
    let opts = up::UpOptions {
        vmswarm,
        self_exe: std::env::current_exe()?,
        node_log: a.node_log,
    };
    up::up(&mut state, &opts)?;
    print_status(&state, false)?;
    println!(
        "\ntestnet {} is up in {} ({} mode). Talk to a node with:\n  vmswarm --data {} status\nStop everything with:\n  vmswarm-testnet --dir {} down",
        state.plan.id,
        dir.display(),
        if state.plan.netns {
            "namespaces + WAN emulator"
        } else {
            "loopback fallback"
        },
        state.data_dir(&state.plan.nodes[0].name).display(),
        dir.display()
    );
    Ok(())
}

fn cmd_demo(
    dir: &Path,
    dir_given: bool,
    out: PathBuf,
    seed: u64,
    vmswarm: Option<PathBuf>,
) -> anyhow::Result<()> {
    use vmswarm_testnet::demo;
    let vmswarm = find_vmswarm(vmswarm)?;
    // Without --dir the demo uses its own state dir, so it never touches a testnet already up.
    let dir = if dir_given {
        dir.to_path_buf()
    } else {
        std::env::temp_dir().join(format!("vmswarm-demo-{}", std::process::id()))
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let out = std::fs::canonicalize(&out)?;
    let teardown = demo::Teardown::new(std::fs::canonicalize(
        std::fs::create_dir_all(&dir).map(|_| dir.clone())?,
    )?);
    let on_signal = teardown.clone();
    ctrlc::set_handler(move || {
        eprintln!("\ninterrupted: tearing the demo testnet down");
        if let Err(e) = on_signal.run() {
            eprintln!("{e:#}");
        }
        std::process::exit(130);
    })
    .context("installing the Ctrl-C handler")?;
    eprintln!(
        "== bringing up {} sites x {} nodes (WAN RTTs {}, {} per site, {} NICs)",
        demo::SITES,
        demo::NODES_PER_SITE,
        demo::WAN,
        demo::WAN_BW,
        demo::NIC_BW
    );
    let result = (|| {
        cmd_up(
            &dir,
            UpArgs {
                sites: demo::SITES,
                nodes_per_site: demo::NODES_PER_SITE,
                wan: Some(demo::WAN.to_owned()),
                wan_bw: Some(demo::WAN_BW.to_owned()),
                nic_bw: Some(demo::NIC_BW.to_owned()),
                wan_queue: "50ms".to_owned(),
                no_netns: false,
                base_port: 17400,
                vmswarm: Some(vmswarm.clone()),
                node_log: "warn".to_owned(),
            },
        )?;
        eprintln!("== publishing a generated 256 MiB image in site0; 12 VMs boot through NBD");
        let state = State::load(&dir)?;
        demo::run_demo(&state, vmswarm.clone(), &out, seed)
    })();
    let down = teardown.run();
    let text = result?;
    down?;
    println!("{text}");
    println!("testnet torn down; nothing left behind");
    Ok(())
}

fn print_status(state: &State, json: bool) -> anyhow::Result<()> {
    let rows: Vec<serde_json::Value> = state
        .plan
        .nodes
        .iter()
        .map(|n| {
            let dir = state.data_dir(&n.name);
            let marker = dir.display().to_string();
            let running = state
                .procs
                .iter()
                .any(|p| p.marker == marker && State::alive(p));
            serde_json::json!({
                "name": n.name,
                "site": state.plan.sites[n.site],
                "listen": n.listen(),
                "netns": if state.plan.netns { Some(&n.netns) } else { None },
                "data_dir": dir,
                "running": running,
            })
        })
        .collect();
    if json {
        let emulator = state
            .procs
            .iter()
            .find(|p| p.role == "wan-emulator")
            .map(State::alive);
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "id": state.plan.id,
                "dir": state.dir,
                "netns": state.plan.netns,
                "complete": state.complete,
                "wan_emulator_running": emulator,
                "namespaces": state.namespaces,
                "nodes": rows,
            }))?
        );
        return Ok(());
    }
    println!(
        "{:<8} {:<8} {:<34} {:<8}",
        "node", "site", "listen", "state"
    );
    for r in &rows {
        println!(
            "{:<8} {:<8} {:<34} {:<8}",
            r["name"].as_str().unwrap_or(""),
            r["site"].as_str().unwrap_or(""),
            r["listen"].as_str().unwrap_or(""),
            if r["running"].as_bool() == Some(true) {
                "running"
            } else {
                "STOPPED"
            }
        );
    }
    Ok(())
}

fn node<'a>(state: &'a State, name: &str) -> anyhow::Result<&'a plan::NodePlan> {
    state
        .plan
        .nodes
        .iter()
        .find(|n| n.name == name)
        .with_context(|| {
            format!("no node {name:?} in this testnet (nodes are named s<site>n<index>, e.g. s0n0)")
        })
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let dir = state_dir(&cli);
    match cli.cmd {
        Cmd::Up(a) => cmd_up(&dir, a),
        Cmd::Run {
            scenario,
            out,
            seed,
            overrides,
            timeout_s,
            vmswarm,
        } => {
            let state = State::load(&dir)?;
            let summary = vmswarm_testnet::run::run(
                &state,
                &vmswarm_testnet::run::RunOptions {
                    scenario,
                    overrides,
                    seed,
                    out: out.clone(),
                    vmswarm: find_vmswarm(vmswarm)?,
                    timeout: Duration::from_secs(timeout_s),
                },
            )?;
            println!(
                "{} of {} VMs booted: p50 {:.2} s, p99 {:.2} s, max {:.2} s; results in {}",
                summary.booted,
                summary.vms,
                summary.p50_s,
                summary.p99_s,
                summary.max_s,
                out.display()
            );
            Ok(())
        }
        Cmd::Compare { results, sim: _ } => {
            let (_, table) = vmswarm_testnet::compare::compare(&results)?;
            print!("{table}");
            println!("plot: {}/boot_cdf.svg (and .png)", results.display());
            Ok(())
        }
        Cmd::Demo { out, seed, vmswarm } => cmd_demo(&dir, cli.dir.is_some(), out, seed, vmswarm),
        Cmd::Down => {
            if !State::path(&dir).exists() {
                println!("no testnet in {}; nothing to do", dir.display());
                return Ok(());
            }
            let state = State::load(&dir)?;
            state.teardown()?;
            println!("testnet {} is down; nothing left behind", state.plan.id);
            Ok(())
        }
        Cmd::Status { json } => print_status(&State::load(&dir)?, json),
        Cmd::Probe {
            from,
            to,
            rtt,
            bytes,
        } => {
            let state = State::load(&dir)?;
            let what = match (rtt, bytes) {
                (_, Some(b)) => probe::Measure::Throughput(b),
                (Some(n), None) => probe::Measure::Rtt(n),
                (None, None) => probe::Measure::Rtt(10),
            };
            let exe = std::env::current_exe()?;
            let r = probe::probe(&state, &exe, node(&state, &from)?, node(&state, &to)?, what)?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Cmd::WanEmulator { spec } => {
            let text = std::fs::read_to_string(&spec)
                .with_context(|| format!("reading {}", spec.display()))?;
            let spec: wan::EmulatorSpec = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", spec.display()))?;
            wan::run(&spec)
        }
        Cmd::ProbeServe { bind, lifetime_s } => probe::serve(bind, Duration::from_secs(lifetime_s)),
        Cmd::ProbeClient { to, rtt, bytes } => {
            let r = match (rtt, bytes) {
                (_, Some(b)) => probe::client_throughput(to, b)?,
                (Some(n), None) => probe::client_rtt(to, n)?,
                (None, None) => bail!("--rtt or --bytes"),
            };
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
    }
}
