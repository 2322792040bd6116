//! `run` and `compare` on a real testnet: a small three-site scenario booted lazily through NBD.
//! Needs root (network namespaces); without it the test says so and returns.

mod common;

use std::path::Path;

use common::{Down, is_root, ok};
use serde_json::Value;

#[test]
fn a_scenario_boots_lazily_over_the_emulated_wan_and_compares_with_the_simulator() {
    if !is_root() {
        eprintln!("SKIPPED: creating network namespaces needs root");
        return;
    }
    let state = tempfile::Builder::new()
        .prefix("vtr")
        .tempdir_in("/tmp")
        .unwrap();
    let out = tempfile::tempdir().unwrap();
    let _down = Down(state.path());
    ok(
        state.path(),
        &[
            "up",
            "--sites",
            "3",
            "--nodes-per-site",
            "2",
            "--wan-bw",
            "100mbit",
            "--nic-bw",
            "200mbit",
        ],
    );
    let scenario =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../simulator/scenarios/small-3site.toml");
    ok(
        state.path(),
        &[
            "run",
            scenario.to_str().unwrap(),
            "--out",
            out.path().to_str().unwrap(),
            "--set",
            "image.size=\"64 MiB\"",
            "--set",
            "hosts.0.count=2",
            "--set",
            "hosts.1.count=2",
            "--set",
            "hosts.2.count=2",
            "--timeout-s",
            "240",
        ],
    );
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["vms"], 6);
    assert_eq!(summary["booted"], 6, "{summary}");
    // Lazy: the sites without the source received some chunks over the WAN, but far less than one
    // image per VM (each VM reads ~5% of the image).
    let image = summary["image_size"].as_f64().unwrap();
    for site in [1, 2] {
        let wan_in = summary["wan_in_payload"][site].as_f64().unwrap();
        assert!(
            wan_in > 0.0,
            "site {site} fetched nothing over the WAN: {summary}"
        );
        assert!(
            wan_in < image,
            "site {site} fetched a full image or more: {summary}"
        );
        assert!(summary["wan_in_wire"][site].as_f64().unwrap() >= wan_in);
    }
    let vms = std::fs::read_to_string(out.path().join("vms.csv")).unwrap();
    assert!(vms.starts_with(
        "vm,host,site,start_s,boot_done_s,boot_s,reads,read_failures,fetched_bytes,from_site0"
    ));
    assert_eq!(vms.lines().count(), 7);
    for line in vms.lines().skip(1) {
        assert_eq!(line.split(',').nth(7), Some("0"), "read failures: {line}");
    }

    // Per-link results in the simulator's schema; WAN-down payload per site as in the summary.
    let links = std::fs::read_to_string(out.path().join("links.csv")).unwrap();
    assert!(
        links.starts_with(
            "class,owner,capacity_bytes_per_s,bytes,mean_utilisation,peak_utilisation\n"
        ),
        "{links}"
    );
    for site in [1, 2] {
        let row = links
            .lines()
            .find(|l| l.starts_with(&format!("wan_down,site{site},")))
            .unwrap_or_else(|| panic!("no wan_down row for site{site}: {links}"));
        let bytes: f64 = row.split(',').nth(3).unwrap().parse().unwrap();
        assert_eq!(
            bytes,
            summary["wan_in_payload"][site].as_f64().unwrap(),
            "{row}"
        );
        assert_eq!(row.split(',').nth(2), Some("12500000"), "100 Mbit/s: {row}");
    }
    assert_eq!(
        links.lines().filter(|l| l.starts_with("host_up,")).count(),
        6
    );

    let table = ok(
        state.path(),
        &["compare", out.path().to_str().unwrap(), "--sim"],
    );
    assert!(
        table.contains("p50 boot (s)") && table.contains("WAN in site1"),
        "{table}"
    );
    for f in [
        "compare.txt",
        "compare.json",
        "sim-vms.csv",
        "boot_cdf.svg",
        "boot_cdf.png",
    ] {
        assert!(out.path().join(f).exists(), "{f} missing");
    }
    ok(state.path(), &["down"]);
    assert!(
        !state.path().exists(),
        "down left files in the state dir: {:?}",
        std::fs::read_dir(state.path()).map(|d| d.count())
    );
}
