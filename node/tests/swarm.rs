//! Real `vmswarm serve` processes on loopback QUIC: publish, swarm pull, failures.

mod common;

use std::time::Duration;

use common::{Node, make_image, publish, seed};
use serde_json::Value;
use vmswarm_node::store::ChunkStore;
use vmswarm_protocol::manifest::Manifest;

const MIB: usize = 1 << 20;

fn metric(status: &Value, name: &str) -> u64 {
    status["metrics"][name].as_u64().unwrap_or(0)
}

fn stored_manifest(dir: &std::path::Path, image: &str) -> (ChunkStore, Manifest) {
    let store = common::open_store(&dir.join("store"));
    let m = store.manifest(&image.parse().unwrap()).unwrap().unwrap();
    (store, m)
}

#[test]
fn five_nodes_pull_at_once_and_feed_each_other() {
    let seed = seed();
    let tmp = tempfile::tempdir().unwrap();
    let publisher = Node::start(&tmp.path().join("n0"), "dc1", None, &[]);
    let pullers: Vec<Node> = (1..5)
        .map(|i| {
            Node::start(
                &tmp.path().join(format!("n{i}")),
                "dc1",
                Some(&publisher.addr),
                &[],
            )
        })
        .collect();
    let file = tmp.path().join("disk.raw");
    let data = make_image(&file, 64 * MIB, seed);
    let image = publish(&publisher, &file);

    let handles: Vec<_> = pullers
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let dir = n.dir.clone();
            let image = image.clone();
            let out = tmp.path().join(format!("out{i}.raw"));
            std::thread::spawn(move || {
                let res = common::cli(&dir, &["pull", &image, "-o", out.to_str().unwrap()]);
                (res, out)
            })
        })
        .collect();
    for (h, n) in handles.into_iter().zip(&pullers) {
        let (res, out) = h.join().unwrap();
        assert!(
            res.status.success(),
            "pull failed: {}\n{}",
            String::from_utf8_lossy(&res.stderr),
            n.log()
        );
        assert!(std::fs::read(&out).unwrap() == data, "pulled image differs");
    }
    let served = metric(&publisher.status(), "bytes_out");
    let fetched: u64 = pullers
        .iter()
        .map(|n| metric(&n.status(), "bytes_in"))
        .sum();
    eprintln!(
        "publisher served {served} bytes = {:.2} images; pullers fetched {fetched} bytes",
        served as f64 / data.len() as f64
    );
    assert!(
        (served as f64) < 3.0 * data.len() as f64,
        "the publisher served {served} bytes for 4 pulls of {}: the pullers did not feed each other",
        data.len()
    );
}

#[test]
fn pulls_complete_when_the_publisher_is_killed_and_another_node_has_everything() {
    let seed = seed();
    let tmp = tempfile::tempdir().unwrap();
    let mut publisher = Node::start(&tmp.path().join("n0"), "dc1", None, &[]);
    let full = Node::start(&tmp.path().join("n1"), "dc1", Some(&publisher.addr), &[]);
    let file = tmp.path().join("disk.raw");
    let data = make_image(&file, 16 * MIB, seed);
    let image = publish(&publisher, &file);
    let res = full.cli(&["pull", &image]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );

    let late = Node::start(&tmp.path().join("n2"), "dc1", Some(&full.addr), &[]);
    publisher.kill9();
    let out = tmp.path().join("late.raw");
    let res = late.cli(&["pull", &image, "-o", out.to_str().unwrap()]);
    assert!(
        res.status.success(),
        "pull failed: {}\n{}",
        String::from_utf8_lossy(&res.stderr),
        late.log()
    );
    assert!(std::fs::read(&out).unwrap() == data);
}

#[test]
fn missing_chunks_fail_the_pull_naming_them_and_a_restart_refetches_only_what_is_missing() {
    let seed = seed();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = common::fast_config(tmp.path());
    let cfg = cfg.to_str().unwrap();
    let mut publisher = Node::start(&tmp.path().join("n0"), "dc1", None, &[]);
    let puller_dir = tmp.path().join("n1");
    let mut puller = Node::start(
        &puller_dir,
        "dc1",
        Some(&publisher.addr),
        &["--config", cfg],
    );
    let file = tmp.path().join("disk.raw");
    let data = make_image(&file, 16 * MIB, seed);
    let image = publish(&publisher, &file);
    let res = puller.cli(&["pull", &image]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );

    // Lose three chunks on the puller while it is down.
    assert!(puller.stop(), "clean shutdown on SIGTERM");
    let lost: Vec<u32> = {
        let (store, m) = stored_manifest(&puller_dir, &image);
        let lost: Vec<u32> = (0..m.chunk_count())
            .filter(|&i| !m.is_zero_chunk(i))
            .step_by(9)
            .take(3)
            .collect();
        for &i in &lost {
            assert!(store.remove(&m.chunks[i as usize]).unwrap());
        }
        lost
    };

    // With the only other holder gone, the pull must fail within bounded time and name them.
    publisher.kill9();
    let puller = Node::start(&puller_dir, "dc1", None, &["--config", cfg]);
    let res = puller.cli(&["pull", &image]);
    assert!(
        !res.status.success(),
        "pull of an image nobody fully holds must fail"
    );
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        err.contains("3 of") && err.contains("could not be fetched"),
        "{err}"
    );
    for i in &lost {
        assert!(
            err.contains(&format!("chunk {i} ")),
            "chunk {i} not named in: {err}"
        );
    }
    drop(puller);

    // The publisher returns: the restarted puller fetches exactly the lost chunks.
    let publisher = Node::start(&tmp.path().join("n0"), "dc1", None, &[]);
    let puller = Node::start(
        &puller_dir,
        "dc1",
        Some(&publisher.addr),
        &["--config", cfg],
    );
    let out = tmp.path().join("again.raw");
    let res = puller.cli(&["pull", &image, "-o", out.to_str().unwrap()]);
    assert!(
        res.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&res.stderr),
        puller.log()
    );
    assert!(std::fs::read(&out).unwrap() == data);
    assert_eq!(
        metric(&puller.status(), "chunks_fetched"),
        lost.len() as u64
    );
}

#[test]
fn a_peer_serving_corrupt_chunks_is_banned_and_the_image_is_still_correct() {
    let seed = seed();
    let tmp = tempfile::tempdir().unwrap();
    let publisher = Node::start(&tmp.path().join("n0"), "dc1", None, &[]);
    let file = tmp.path().join("disk.raw");
    let data = make_image(&file, 16 * MIB, seed);
    let image = publish(&publisher, &file);
    let liar = Node::start(
        &tmp.path().join("liar"),
        "dc1",
        Some(&publisher.addr),
        &["--corrupt-served-chunks"],
    );
    let res = liar.cli(&["pull", &image]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );

    let victim = Node::start(&tmp.path().join("n2"), "dc1", Some(&liar.addr), &[]);
    let out = tmp.path().join("out.raw");
    let res = victim.cli(&["pull", &image, "-o", out.to_str().unwrap()]);
    assert!(
        res.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&res.stderr),
        victim.log()
    );
    assert!(
        std::fs::read(&out).unwrap() == data,
        "a corrupt chunk reached the image"
    );
    let status = victim.status();
    assert!(
        metric(&status, "chunks_corrupt") >= 1,
        "the victim never asked the liar: {status}"
    );
    assert_eq!(metric(&status, "bans"), 1);
    let banned = status["banned"].as_array().unwrap();
    let liar_id = liar.status()["peer_id"].clone();
    assert!(banned.contains(&liar_id), "liar not banned: {status}");
}

#[test]
fn kill_9_during_pulls_never_leaves_a_corrupt_store() {
    let seed = seed();
    let tmp = tempfile::tempdir().unwrap();
    let publisher = Node::start(&tmp.path().join("n0"), "dc1", None, &[]);
    let file = tmp.path().join("disk.raw");
    let data = make_image(&file, 32 * MIB, seed);
    let image = publish(&publisher, &file);
    let dir = tmp.path().join("n1");
    for round in 0..4u64 {
        let mut node = Node::start(&dir, "dc1", Some(&publisher.addr), &[]);
        // Start (or resume) the pull in the background and kill the daemon at a seeded moment.
        let pull = std::process::Command::new(common::BIN)
            .arg("--data")
            .arg(&dir)
            .args(["pull", &image])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut pull = ChildGuard(pull);
        std::thread::sleep(Duration::from_millis(
            50 + (seed.wrapping_mul(31).wrapping_add(round * 97)) % 400,
        ));
        node.kill9();
        let _ = pull.0.wait();
    }
    // Everything committed verifies; the pull completes after a final restart.
    let node = Node::start(&dir, "dc1", Some(&publisher.addr), &[]);
    let v = node.cli(&["verify"]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    let report: Value = serde_json::from_slice(&v.stdout).unwrap();
    assert_eq!(
        report["corrupt_chunks"].as_array().map(|a| a.len()),
        Some(0),
        "{report}"
    );
    let out = tmp.path().join("out.raw");
    let res = node.cli(&["pull", &image, "-o", out.to_str().unwrap()]);
    assert!(
        res.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&res.stderr),
        node.log()
    );
    assert!(std::fs::read(&out).unwrap() == data);
}

#[test]
fn cli_errors_are_clear() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("none");
    let out = common::cli(&dir, &["status"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no vmswarm daemon is running"));

    let node = Node::start(&tmp.path().join("n0"), "dc1", None, &[]);
    let out = node.cli(&["pull", "not-an-id"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad image id"));
    let out = node.cli(&["publish", "/nonexistent/disk.raw"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read image file"));
    // A second daemon on the same data dir is refused.
    let second = std::process::Command::new(common::BIN)
        .arg("--data")
        .arg(&node.dir)
        .args(["serve", "--listen", "/ip4/127.0.0.1/udp/0/quic-v1"])
        .output()
        .unwrap();
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("lock") || err.contains("already"), "{err}");
    drop(node);

    // An image nobody has: a clear failure after the (configured) manifest timeout.
    let cfg = common::fast_config(tmp.path());
    let metrics_port = free_tcp_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let node = Node::start(
        &tmp.path().join("n1"),
        "dc1",
        None,
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--metrics",
            &metrics_addr,
        ],
    );
    let unknown = "ab".repeat(32);
    let out = node.cli(&["pull", &unknown]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no peer provided the manifest") && err.contains(&unknown),
        "{err}"
    );

    // The Prometheus endpoint answers.
    let text = http_get(&metrics_addr, "/metrics");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("# TYPE vmswarm_fetch_latency_seconds histogram"),
        "{text}"
    );
    assert!(text.contains("vmswarm_bans_total 0"), "{text}");
    // The relay fan-out gauge, at the default maximum until a Demand copy is measured.
    assert!(
        text.contains("# TYPE vmswarm_demand_fanout gauge"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "vmswarm_demand_fanout {}",
            vmswarm_protocol::serve::DEFAULT_DEMAND_FANOUT
        )),
        "{text}"
    );
    assert!(http_get(&metrics_addr, "/other").starts_with("HTTP/1.1 404"));

    let bad = std::process::Command::new(common::BIN)
        .args([
            "--data",
            tmp.path().join("x").to_str().unwrap(),
            "serve",
            "--listen",
            "not-a-multiaddr",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn an_origin_is_announced_as_one_and_serves_a_same_site_pull() {
    let seed = seed();
    let tmp = tempfile::tempdir().unwrap();
    let origin = Node::start(&tmp.path().join("origin"), "dc1", None, &["--origin"]);
    let file = tmp.path().join("disk.raw");
    let data = make_image(&file, 8 * MIB, seed);
    let image = publish(&origin, &file);
    let host = Node::start(&tmp.path().join("host"), "dc1", Some(&origin.addr), &[]);
    let out = tmp.path().join("out.raw");
    let res = host.cli(&["pull", &image, "-o", out.to_str().unwrap()]);
    assert!(
        res.status.success(),
        "seed {seed}: {}\n{}",
        String::from_utf8_lossy(&res.stderr),
        host.log()
    );
    assert!(std::fs::read(&out).unwrap() == data, "seed {seed}");
    let origin_id = origin.status()["peer_id"].as_str().unwrap().to_owned();
    let peers = host.status()["peers"].clone();
    assert_eq!(peers[&origin_id]["origin"], true, "{peers}");
    let host_id = host.status()["peer_id"].as_str().unwrap().to_owned();
    assert_eq!(
        origin.status()["peers"][&host_id]["origin"],
        false,
        "an ordinary node does not announce itself as an origin"
    );
}
