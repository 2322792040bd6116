//! Scenario parsing: a valid file, and files with mistakes rejected with the file and field named.

use super::*;

const GOOD: &str = r#"
name = "t"
strategy = "vmswarm"
[image]
size = "64 MiB"
chunk_size = "256 KiB"
[[sites]]
name = "a"
wan_up = "10 Gbit/s"
wan_down = "10 Gbit/s"
[[sites]]
name = "b"
[[rtt]]
a = "a"
b = "b"
ms = 31
[[hosts]]
site = "a"
count = 3
nic_up = "1 Gbit/s"
vms = 2
start_spread_s = 1.5
[[hosts]]
site = "b"
count = 2
nic_up = "1 Gbit/s"
nic_down = "2 Gbit/s"
[[sources]]
site = "b"
nic_up = "10 Gbit/s"
count = 2
[boot]
working_set = 0.1
[vmswarm]
prefetch = "all"
boot_profile = true
[protocol]
max_in_flight_per_peer = 8
demand_reserved_slots = 2
"#;

fn parse(text: &str) -> Result<Scenario, ScenarioError> {
    Scenario::parse(text, Path::new("dir/test.toml"), &[])
}

fn err(text: &str) -> String {
    parse(text).expect_err("should be rejected").to_string()
}

#[test]
fn good_file_parses_to_simulator_units() {
    let sc = parse(GOOD).unwrap();
    assert_eq!(sc.image_size, 64 << 20);
    assert_eq!(sc.chunk_count(), 256);
    assert_eq!(sc.host_count(), 5);
    assert_eq!(sc.vm_count(), 8);
    assert_eq!(sc.sources.len(), 2);
    assert_eq!(sc.rtt[0][1], Duration::from_millis(31));
    assert_eq!(sc.rtt[1][0], Duration::from_millis(31));
    assert_eq!(sc.rtt[0][0], Duration::from_micros(100));
    assert_eq!(sc.sites[0].wan_up, Some(1.25e9));
    assert_eq!(sc.sites[1].wan_up, None);
    assert_eq!(sc.hosts[1].nic_down, 2.5e8);
    assert_eq!(sc.hosts[0].nic_down, 1.25e8);
    assert_eq!(sc.fetch.max_in_flight_per_peer, 8);
    assert_eq!(sc.prefetch, Prefetch::All);
    assert_eq!(sc.window, DEFAULT_WINDOW_BYTES as f64);
}

#[test]
fn overrides_change_fields_before_checking() {
    let sc = Scenario::parse(
        GOOD,
        Path::new("t.toml"),
        &[
            "image.chunk_size=\"1 MiB\"".into(),
            "hosts.0.count=7".into(),
            "strategy=central".into(),
        ],
    )
    .unwrap();
    assert_eq!(sc.chunk_size, 1 << 20);
    assert_eq!(sc.hosts[0].count, 7);
    assert_eq!(sc.strategy, Strategy::Central);
    let e = Scenario::parse(GOOD, Path::new("t.toml"), &["nonsense".into()]).unwrap_err();
    assert!(e.to_string().contains("KEY=VALUE"), "{e}");
    let e = Scenario::parse(
        GOOD,
        Path::new("t.toml"),
        &["image.chunk_size=\"3 MiB\"".into()],
    )
    .unwrap_err();
    assert!(e.to_string().contains("image.chunk_size"), "{e}");
}

#[test]
fn unknown_site_is_named() {
    let e = err(&GOOD.replace("site = \"b\"\ncount = 2", "site = \"z\"\ncount = 2"));
    assert!(
        e.starts_with("dir/test.toml: hosts[1].site: unknown site \"z\""),
        "{e}"
    );
    assert!(e.contains("sites: a, b"), "{e}");
}

#[test]
fn negative_bandwidth_is_named() {
    let e = err(&GOOD.replace("nic_up = \"10 Gbit/s\"", "nic_up = \"-10 Gbit/s\""));
    assert!(e.contains("sources[0].nic_up"), "{e}");
    assert!(e.contains("positive"), "{e}");
    let e = err(&GOOD.replace("wan_down = \"10 Gbit/s\"", "wan_down = \"10 GB\""));
    assert!(
        e.contains("sites[0].wan_down") && e.contains("unknown unit"),
        "{e}"
    );
}

#[test]
fn missing_and_unknown_fields_are_named() {
    let e = err(&GOOD.replace("size = \"64 MiB\"", ""));
    assert!(e.starts_with("dir/test.toml:"), "{e}");
    assert!(e.contains("missing field `size`"), "{e}");
    let e = err(&GOOD.replace("vms = 2", "vms = 2\ncolour = \"red\""));
    assert!(e.contains("unknown field `colour`"), "{e}");
    let e = err(&GOOD.replace("strategy = \"vmswarm\"", "strategy = \"magic\""));
    assert!(e.contains("magic"), "{e}");
    let e = err("name = ");
    assert!(e.starts_with("dir/test.toml:"), "{e}");
}

#[test]
fn inconsistent_values_are_rejected() {
    let no_rtt = GOOD.replace("[[rtt]]\na = \"a\"\nb = \"b\"\nms = 31\n", "");
    assert!(err(&no_rtt).contains("no RTT between sites \"a\" and \"b\""));
    let e = err(&GOOD.replace("count = 3", "count = 0"));
    assert!(e.contains("hosts[0].count"), "{e}");
    let e = err(&GOOD.replace("working_set = 0.1", "working_set = 1.5"));
    assert!(e.contains("boot.working_set"), "{e}");
    let e = err(&GOOD.replace("demand_reserved_slots = 2", "demand_reserved_slots = 8"));
    assert!(
        e.contains("protocol:") && e.contains("demand_reserved_slots"),
        "{e}"
    );
    let e = err(&GOOD.replace("prefetch = \"all\"", "prefetch = \"none\""));
    assert!(e.contains("vmswarm.boot_profile"), "{e}");
    let e = err(&GOOD.replace("chunk_size = \"256 KiB\"", "chunk_size = \"100 KiB\""));
    assert!(e.contains("image.chunk_size"), "{e}");
}

#[test]
fn trace_files_are_read_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("boot.csv");
    std::fs::write(&trace, "# offset,len,think_ms\n0,4096,1.5\n1048576,65536\n").unwrap();
    let scenario = dir.path().join("s.toml");
    let text = GOOD.replace("working_set = 0.1", "trace = \"boot.csv\"");
    std::fs::write(&scenario, &text).unwrap();
    let sc = Scenario::load(&scenario, &[]).unwrap();
    let t = sc.boot.trace.unwrap();
    assert_eq!(t.len(), 2);
    assert_eq!(t[0].think, Some(Duration::from_micros(1500)));
    assert_eq!(t[1].offset, 1 << 20);
    std::fs::write(&trace, "0,4096\n999999999999,1\n").unwrap();
    let e = Scenario::load(&scenario, &[]).unwrap_err().to_string();
    assert!(e.contains("boot.csv: line 2"), "{e}");
    let e = Scenario::load(&dir.path().join("missing.toml"), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.toml: cannot read"), "{e}");
}
