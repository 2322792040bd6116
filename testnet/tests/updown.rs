//! `up` / `down` with real namespaces, the WAN emulator, and the loopback fallback: nothing is left
//! behind, and the emulated network delays and shapes as configured.
//!
//! Tests that need network namespaces need root (CI runs as root); without it they say so and
//! return early, and the fallback test still runs.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, is_root};
use serde_json::Value;

/// A testnet state dir whose testnet is torn down on drop (also when the test fails).
struct Testnet {
    dir: tempfile::TempDir,
}

impl Testnet {
    fn new() -> Testnet {
        Testnet {
            dir: tempfile::Builder::new()
                .prefix("vt")
                .tempdir_in("/tmp")
                .unwrap(),
        }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn cmd(&self, args: &[&str]) -> Output {
        common::cli(self.path(), args)
    }
    fn ok(&self, args: &[&str]) -> String {
        common::ok(self.path(), args)
    }
    fn state(&self) -> Value {
        serde_json::from_str(&std::fs::read_to_string(self.path().join("testnet.json")).unwrap())
            .unwrap()
    }
}

impl Drop for Testnet {
    fn drop(&mut self) {
        if self.path().join("testnet.json").exists() {
            let _ = self.cmd(&["down"]);
        }
    }
}

fn pid_alive(pid: u64) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
}

fn netns_list() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Asserts that nothing recorded in `state` exists any more.
fn assert_nothing_left(state: &Value, dir: &Path) {
    let id = state["plan"]["id"].as_str().unwrap();
    let prefix = format!("vmsw-{id}-");
    let left: Vec<String> = netns_list()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    for p in state["procs"].as_array().unwrap() {
        let pid = p["pid"].as_u64().unwrap();
        let marker = p["marker"].as_str().unwrap();
        let still = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains(marker))
            .unwrap_or(false);
        assert!(!still, "process {} (pid {pid}) left behind", p["role"]);
    }
    // Nor anything unrecorded (a node `up` spawned but was killed before recording).
    let strays = vmswarm_testnet::sys::pids_under(dir);
    assert!(
        strays.is_empty(),
        "processes naming {} left: {strays:?}",
        dir.display()
    );
    assert!(!dir.join("testnet.json").exists());
    assert!(!dir.join("nodes").exists(), "data dirs left behind");
}

fn probe(t: &Testnet, from: &str, to: &str, arg: &[&str]) -> Value {
    let mut args = vec!["probe", from, to];
    args.extend_from_slice(arg);
    serde_json::from_str(&t.ok(&args)).unwrap()
}

#[test]
fn up_down_with_namespaces_emulates_the_wan_and_leaves_nothing() {
    if !is_root() {
        eprintln!("SKIPPED: creating network namespaces needs root");
        return;
    }
    let t = Testnet::new();
    t.ok(&[
        "up",
        "--sites",
        "2",
        "--nodes-per-site",
        "2",
        "--wan",
        "40ms",
        "--wan-bw",
        "40mbit",
        "--nic-bw",
        "100mbit",
    ]);
    let state = t.state();
    let status: Value = serde_json::from_str(&t.ok(&["status", "--json"])).unwrap();
    assert_eq!(status["netns"], true);
    assert_eq!(status["wan_emulator_running"], true);
    for n in status["nodes"].as_array().unwrap() {
        assert_eq!(n["running"], true, "{n}");
    }

    // Across the WAN: at least the configured RTT (the emulator holds each packet half of it each
    // way); the upper bound is loose because the machine is shared.
    let rtt = probe(&t, "s0n0", "s1n1", &["--rtt", "10"]);
    let rtts: Vec<f64> = rtt["rtt_ms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let min = rtts.iter().cloned().fold(f64::MAX, f64::min);
    assert!(
        min >= 40.0,
        "WAN RTT {min} ms is below the configured 40 ms"
    );
    assert!(
        min < 200.0,
        "WAN RTT {min} ms: the emulator holds packets far too long"
    );
    // Within a site the bridge switches directly; the emulator is not on the path.
    let local = probe(&t, "s0n0", "s0n1", &["--rtt", "5"]);
    let local_min = local["rtt_ms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .fold(f64::MAX, f64::min);
    assert!(
        local_min < 20.0,
        "same-site RTT {local_min} ms goes through the WAN"
    );

    // Through the WAN a TCP stream cannot beat the 40 Mbit/s link (payload < wire bytes).
    let tput = probe(&t, "s1n0", "s0n1", &["--bytes", "8000000"]);
    let bps = tput["bits_per_second"].as_f64().unwrap();
    assert!(
        bps <= 40e6 * 1.02,
        "WAN throughput {bps} above the 40 Mbit/s limit"
    );
    assert!(
        bps >= 40e6 * 0.25,
        "WAN throughput {bps}: far below the link"
    );
    // The emulator counted the bytes as crossing from site 1 to site 0.
    let stats: Value =
        serde_json::from_str(&std::fs::read_to_string(t.path().join("wan-stats.json")).unwrap())
            .unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut crossed = stats["delivered"][1][0].as_u64().unwrap();
    while crossed < 8_000_000 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let s: Value = serde_json::from_str(
            &std::fs::read_to_string(t.path().join("wan-stats.json")).unwrap(),
        )
        .unwrap();
        crossed = s["delivered"][1][0].as_u64().unwrap();
    }
    assert!(
        crossed >= 8_000_000,
        "emulator saw {crossed} bytes from site 1 to 0"
    );

    // Same site: the 100 Mbit/s NIC shaping (tbf) applies.
    let nic = probe(&t, "s0n0", "s0n1", &["--bytes", "12000000"]);
    let nic_bps = nic["bits_per_second"].as_f64().unwrap();
    assert!(
        nic_bps <= 100e6 * 1.05,
        "NIC throughput {nic_bps} above 100 Mbit/s"
    );

    // The nodes found each other across sites with the right site labels.
    let peers = Command::new(Path::new(BIN).parent().unwrap().join("vmswarm"))
        .arg("--data")
        .arg(t.path().join("nodes/s1n1"))
        .args(["peers", "--json"])
        .output()
        .unwrap();
    let peers = String::from_utf8_lossy(&peers.stdout);
    assert!(peers.contains("site0"), "s1n1 sees no site0 peer: {peers}");

    t.ok(&["down"]);
    assert_nothing_left(&state, t.path());
}

#[test]
fn down_cleans_up_after_a_killed_up() {
    if !is_root() {
        eprintln!("SKIPPED: creating network namespaces needs root");
        return;
    }
    let t = Testnet::new();
    let mut up = Command::new(BIN)
        .arg("--dir")
        .arg(t.path())
        .args(["up", "--sites", "3", "--nodes-per-site", "3"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill it once it has created namespaces and started some processes, before it finishes.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(text) = std::fs::read_to_string(t.path().join("testnet.json"))
            && let Ok(v) = serde_json::from_str::<Value>(&text)
            && v["procs"].as_array().is_some_and(|p| p.len() >= 3)
        {
            break;
        }
        if up.try_wait().unwrap().is_some() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut up.stderr.take().unwrap(), &mut err).unwrap();
            panic!("up finished before it could be killed:\n{err}");
        }
        assert!(Instant::now() < deadline, "up made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    up.kill().unwrap();
    up.wait().unwrap();
    let state = t.state();
    assert_eq!(state["complete"], false);
    let live: Vec<u64> = state["procs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pid"].as_u64().unwrap())
        .filter(|p| pid_alive(*p))
        .collect();
    assert!(
        !live.is_empty(),
        "the killed up left no process to clean up"
    );
    t.ok(&["down"]);
    assert_nothing_left(&state, t.path());
}

fn free_base_port() -> u16 {
    // Ports 20000-29999, spread by pid so parallel runs do not collide.
    20_000 + (std::process::id() % 1000) as u16 * 10
}

#[test]
fn loopback_fallback_runs_nodes_and_says_so() {
    let t = Testnet::new();
    let out = t.cmd(&[
        "up",
        "--no-netns",
        "--sites",
        "2",
        "--nodes-per-site",
        "2",
        "--base-port",
        &free_base_port().to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("NO WAN emulation"),
        "no loud warning: {stderr}"
    );
    let state = t.state();
    assert_eq!(state["plan"]["netns"], false);
    assert!(state["namespaces"].as_array().unwrap().is_empty());
    let rtt = probe(&t, "s0n0", "s1n1", &["--rtt", "3"]);
    assert_eq!(rtt["rtt_ms"].as_array().unwrap().len(), 3);
    t.ok(&["down"]);
    assert_nothing_left(&state, t.path());
}

#[test]
fn bad_input_is_refused_clearly() {
    let t = Testnet::new();
    let out = t.cmd(&["up", "--sites", "3", "--wan", "10ms,20ms"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--wan needs one RTT"), "{err}");
    let out = t.cmd(&["up", "--wan-bw", "fast"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad bandwidth"));
    let out = t.cmd(&["status"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no testnet in"));
    // Nothing was created by the refused commands.
    assert!(!t.path().join("testnet.json").exists());
}
