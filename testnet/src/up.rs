//! `vmswarm-testnet up`: creates the namespaces, links, shaping and WAN emulator of a [`Plan`] and
//! starts one `vmswarm serve` per node, bootstrapped into one overlay.
//!
//! Every namespace and process is recorded in the state file before (namespaces) or right after
//! (processes) it is created, so `down` can undo a partial `up`. If `up` itself fails, it tears
//! down what it made before returning the error.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::plan::NodePlan;
use crate::state::State;
use crate::sys::{run, run_in};
use crate::wan::EmulatorSpec;

/// Name of the TUN device in the router namespace.
pub const TUN: &str = "wan0";
/// The policy-routing table that sends inter-site traffic to the TUN device.
const WAN_TABLE: &str = "100";
/// How long a node may take to write node.json.
const NODE_START_TIMEOUT: Duration = Duration::from_secs(60);

/// What `up` needs besides the plan.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// The `vmswarm` binary.
    pub vmswarm: PathBuf,
    /// This program (started again as the WAN emulator).
    pub self_exe: PathBuf,
    /// `RUST_LOG` for the nodes.
    pub node_log: String,
}

/// Brings the testnet up; on failure removes everything it created.
pub fn up(state: &mut State, opts: &UpOptions) -> anyhow::Result<()> {
    let result = build(state, opts);
    if let Err(e) = result {
        let cleanup = state.teardown();
        return Err(match cleanup {
            Ok(()) => e.context("`up` failed; everything it created was removed"),
            Err(c) => e.context(format!(
                "`up` failed, and cleaning up failed too ({c:#}); run `vmswarm-testnet down`"
            )),
        });
    }
    state.complete = true;
    state.save()
}

fn build(state: &mut State, opts: &UpOptions) -> anyhow::Result<()> {
    std::fs::create_dir_all(state.dir.join("logs"))?;
    std::fs::create_dir_all(state.dir.join("nodes"))?;
    if state.plan.netns {
        build_router(state)?;
        let nodes = state.plan.nodes.clone();
        for node in &nodes {
            build_node_netns(state, node)?;
        }
        start_emulator(state, opts)?;
    }
    start_nodes(state, opts)
}

fn sysctl(ns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    run_in(ns, "sysctl", &["-qw", &format!("{key}={value}")]).map(|_| ())
}

fn build_router(state: &mut State) -> anyhow::Result<()> {
    let r = state.plan.router_netns.clone();
    state.will_create_netns(&r)?;
    run("ip", &["netns", "add", &r])?;
    run("ip", &["-n", &r, "link", "set", "lo", "up"])?;
    sysctl(&r, "net.ipv4.ip_forward", "1")?;
    // Packets come back out of the TUN device with their original (other-site) source address.
    sysctl(&r, "net.ipv4.conf.all.rp_filter", "0")?;
    sysctl(&r, "net.ipv4.conf.default.rp_filter", "0")?;
    run(
        "ip",
        &["-n", &r, "tuntap", "add", "dev", TUN, "mode", "tun"],
    )?;
    run("ip", &["-n", &r, "link", "set", TUN, "up"])?;
    run(
        "ip",
        &[
            "-n",
            &r,
            "route",
            "add",
            "10.0.0.0/8",
            "dev",
            TUN,
            "table",
            WAN_TABLE,
        ],
    )?;
    // What the emulator writes back is routed normally (to the destination site's bridge)...
    run(
        "ip",
        &[
            "-n", &r, "rule", "add", "iif", TUN, "lookup", "main", "pref", "100",
        ],
    )?;
    for s in 0..state.plan.sites.len() {
        let br = format!("br{s}");
        run("ip", &["-n", &r, "link", "add", &br, "type", "bridge"])?;
        run(
            "ip",
            &[
                "-n",
                &r,
                "addr",
                "add",
                &format!("10.{s}.0.1/24"),
                "dev",
                &br,
            ],
        )?;
        run("ip", &["-n", &r, "link", "set", &br, "up"])?;
        // ...while what a site sends to another site goes to the emulator first.
        run(
            "ip",
            &[
                "-n", &r, "rule", "add", "iif", &br, "lookup", WAN_TABLE, "pref", "200",
            ],
        )?;
    }
    Ok(())
}

/// tbf parameters for `bps`: a burst of 2 ms at line rate (at least 16 KiB), 50 ms of queue.
fn tbf_args(bps: u64) -> Vec<String> {
    let burst = (bps / 8 / 500).max(16 * 1024);
    vec![
        "root".into(),
        "tbf".into(),
        "rate".into(),
        format!("{bps}bit"),
        "burst".into(),
        format!("{burst}"),
        "latency".into(),
        "50ms".into(),
    ]
}

fn build_node_netns(state: &mut State, node: &NodePlan) -> anyhow::Result<()> {
    let r = state.plan.router_netns.clone();
    let ns = node.netns.clone();
    state.will_create_netns(&ns)?;
    run("ip", &["netns", "add", &ns])?;
    run(
        "ip",
        &[
            "link",
            "add",
            "eth0",
            "netns",
            &ns,
            "type",
            "veth",
            "peer",
            "name",
            &node.host_if,
            "netns",
            &r,
        ],
    )?;
    run(
        "ip",
        &[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/24", node.addr),
            "dev",
            "eth0",
        ],
    )?;
    run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
    run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
    run(
        "ip",
        &[
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &format!("10.{}.0.1", node.site),
        ],
    )?;
    run(
        "ip",
        &[
            "-n",
            &r,
            "link",
            "set",
            &node.host_if,
            "master",
            &format!("br{}", node.site),
        ],
    )?;
    run("ip", &["-n", &r, "link", "set", &node.host_if, "up"])?;
    if let Some(bps) = state.plan.nic_bps {
        let args = tbf_args(bps);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        // Upload: the node's own interface. Download: its peer in the router namespace.
        let mut up = vec!["-n", &ns, "qdisc", "add", "dev", "eth0"];
        up.extend_from_slice(&args);
        run("tc", &up)?;
        let mut down = vec!["-n", &r, "qdisc", "add", "dev", &node.host_if];
        down.extend_from_slice(&args);
        run("tc", &down)?;
    }
    Ok(())
}

/// Spawns `program args` detached from us (own process group, output to `log`), optionally in `ns`.
fn spawn_detached(
    ns: Option<&str>,
    program: &Path,
    args: &[String],
    env: &[(&str, &str)],
    log: &Path,
) -> anyhow::Result<Child> {
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    };
    cmd.args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf)
        .process_group(0);
    cmd.spawn()
        .with_context(|| format!("starting {}", program.display()))
}

/// Whether a child we started has exited. (Until `ip netns exec` has exec'd the real program,
/// `/proc/<pid>/cmdline` is still ours, so startup checks use the child handle, not the marker.)
fn exited(child: &mut Child) -> bool {
    !matches!(child.try_wait(), Ok(None))
}

fn start_emulator(state: &mut State, opts: &UpOptions) -> anyhow::Result<()> {
    let spec_path = state.dir.join("wan.json");
    let spec = EmulatorSpec {
        tun: TUN.to_owned(),
        wan: state.plan.wan.clone(),
        stats_file: state.dir.join("wan-stats.json"),
    };
    std::fs::write(&spec_path, serde_json::to_vec_pretty(&spec)?)?;
    let _ = std::fs::remove_file(&spec.stats_file);
    let marker = spec_path.display().to_string();
    let mut child = spawn_detached(
        Some(&state.plan.router_netns.clone()),
        &opts.self_exe,
        &["wan-emulator".into(), "--spec".into(), marker.clone()],
        &[],
        &state.dir.join("logs").join("wan-emulator.log"),
    )?;
    state.started("wan-emulator", child.id(), &marker)?;
    // It writes its stats file once attached to the TUN device.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !spec.stats_file.exists() {
        if exited(&mut child) {
            bail!(
                "the WAN emulator exited:\n{}",
                log_tail(&state.dir.join("logs").join("wan-emulator.log"))
            );
        }
        if Instant::now() > deadline {
            bail!("the WAN emulator did not attach to {TUN} within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The last lines of a log file, for error messages.
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

fn start_node(
    state: &mut State,
    opts: &UpOptions,
    node: &NodePlan,
    bootstrap: Option<&str>,
) -> anyhow::Result<Child> {
    let dir = state.data_dir(&node.name);
    std::fs::create_dir_all(&dir)?;
    let _ = std::fs::remove_file(dir.join("node.json"));
    let mut args = vec![
        "--data".to_owned(),
        dir.display().to_string(),
        "serve".to_owned(),
        "--listen".to_owned(),
        node.listen(),
        "--site".to_owned(),
        state.plan.sites[node.site].clone(),
    ];
    if let Some(b) = bootstrap {
        args.push("--bootstrap".to_owned());
        args.push(b.to_owned());
    }
    let ns = state.plan.netns.then(|| node.netns.clone());
    let child = spawn_detached(
        ns.as_deref(),
        &opts.vmswarm,
        &args,
        &[("RUST_LOG", &opts.node_log)],
        &state.dir.join("logs").join(format!("{}.log", node.name)),
    )?;
    state.started(
        &format!("node {}", node.name),
        child.id(),
        &dir.display().to_string(),
    )?;
    Ok(child)
}

/// Waits for node.json of `node` and returns its first listen address.
fn wait_node(state: &State, node: &NodePlan, child: &mut Child) -> anyhow::Result<String> {
    let dir = state.data_dir(&node.name);
    let deadline = Instant::now() + NODE_START_TIMEOUT;
    loop {
        if let Ok(text) = std::fs::read_to_string(dir.join("node.json"))
            && let Ok(info) = serde_json::from_str::<serde_json::Value>(&text)
            && let Some(addr) = info["listen_addrs"][0].as_str()
        {
            return Ok(addr.to_owned());
        }
        if exited(child) {
            bail!(
                "node {} exited while starting:\n{}",
                node.name,
                log_tail(&state.dir.join("logs").join(format!("{}.log", node.name)))
            );
        }
        if Instant::now() > deadline {
            bail!(
                "node {} did not start within {NODE_START_TIMEOUT:?}",
                node.name
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn start_nodes(state: &mut State, opts: &UpOptions) -> anyhow::Result<()> {
    let nodes = state.plan.nodes.clone();
    let Some((first, rest)) = nodes.split_first() else {
        return Ok(());
    };
    let mut child = start_node(state, opts, first, None)?;
    let boot = wait_node(state, first, &mut child)?;
    let mut children = Vec::new();
    for node in rest {
        children.push(start_node(state, opts, node, Some(&boot))?);
    }
    for (node, child) in rest.iter().zip(children.iter_mut()) {
        wait_node(state, node, child)?;
    }
    Ok(())
}
