//! NBD exports with real clients (qemu-img, qemu-io, nbdinfo, nbdcopy) against real `vmswarm serve`
//! processes on loopback: lazy mounts, on-demand fetch, clones, provider loss, hostile clients.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{Node, publish, seed};
use rand::{Rng, SeedableRng};
use serde_json::Value;

const MIB: usize = 1 << 20;
const BLOCK: usize = 4096;

/// Node config for tests: a Demand read fails after 3 s, unavailable chunks after 3 s.
fn fast_config(dir: &Path) -> PathBuf {
    let p = dir.join("fast.toml");
    std::fs::write(
        &p,
        "[fetch]\ndemand_deadline_ms = 3000\nunavailable_deadline_ms = 3000\nrequest_timeout_ms = 1000\nmanifest_timeout_ms = 5000\n",
    )
    .unwrap();
    p
}

/// The byte every 4 KiB block `b` of a test image is filled with: a hash of `b`, never 0, so that
/// qemu-io can check any block with `read -P` and no two chunks are alike.
fn pattern(b: usize) -> u8 {
    let h = (b as u64 ^ 0x9e37_79b9).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56;
    (h % 255) as u8 + 1
}

fn make_pattern_image(path: &Path, size: usize) -> Vec<u8> {
    let mut data = vec![0u8; size];
    for (b, block) in data.chunks_mut(BLOCK).enumerate() {
        block.fill(pattern(b));
    }
    std::fs::write(path, &data).unwrap();
    data
}

/// Runs a client tool with a hard time limit (a hang is a failure, not a stuck test).
fn run(tool: &str, args: &[&str]) -> Output {
    let out = Command::new("timeout")
        .arg("120")
        .arg(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {tool}: {e}"));
    eprintln!(
        "$ {tool} {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ok(node: &Node, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    let out = node.cli(&a);
    assert!(
        out.status.success(),
        "{args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        node.log()
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn cli_ok(node: &Node, args: &[&str]) -> String {
    let out = node.cli(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        node.log()
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Reads the first 4 KiB block through `uri` with qemu-io and checks its pattern.
fn read_block_0(uri: &str) {
    let cmd = format!("read -P {} 0 4096", pattern(0));
    let out = run("qemu-io", &["-r", "-f", "raw", "-c", &cmd, uri]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !stdout.contains("failed"),
        "reading block 0 through {uri}: {stdout}"
    );
}

/// Copies the whole export at `uri` into `out` with `qemu-img convert`.
fn convert(uri: &str, out: &Path) -> Output {
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            uri,
            out.to_str().unwrap(),
        ],
    )
}

/// Reads 4 KiB block `block` through `uri` with qemu-io, checking its pattern.
fn read_pattern(uri: &str, block: usize) -> Output {
    let cmd = format!("read -P {} {} 4096", pattern(block), block * BLOCK);
    run("qemu-io", &["-r", "-f", "raw", "-c", &cmd, uri])
}

/// Whether a qemu-io run succeeded and reported no failed command.
fn io_ok(out: &Output) -> bool {
    out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("failed")
}

fn mount_of<'a>(mounts: &'a Value, name: &str) -> &'a Value {
    mounts
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .unwrap_or_else(|| panic!("no mount {name} in {mounts}"))
}

fn unix_uri(sock: &Path, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", sock.display())
}

/// A free loopback TCP port.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_peers(node: &Node, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while node.status()["peers"].as_object().map_or(0, |p| p.len()) < n {
        assert!(
            Instant::now() < deadline,
            "peers did not connect\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn image_published_on_a_and_mounted_on_b_reads_byte_identical_with_every_client() {
    let seed = seed();
    let tmp = tempfile::tempdir().unwrap();
    let a = Node::start(&tmp.path().join("a"), "dc1", None, &[]);
    let b = Node::start(&tmp.path().join("b"), "dc2", Some(&a.addr), &[]);
    let file = tmp.path().join("disk.raw");
    // Random bytes with zero chunks, and a size that is not a multiple of the chunk size.
    let mut data = common::make_image(&file, 24 * MIB, seed);
    // qemu rounds sizes up to 512-byte sectors, so the size is a sector multiple.
    data.truncate(24 * MIB - 12_800);
    std::fs::write(&file, &data).unwrap();
    let image = publish(&a, &file);
    wait_for_peers(&b, 1);

    let sock = tmp.path().join("b.sock");
    let sock_arg = format!("unix:{}", sock.display());
    cli_ok(&b, &["mount", &image, "--nbd", &sock_arg, "--name", "disk"]);
    let port = free_port();
    let tcp = format!("tcp:127.0.0.1:{port}");
    // A second export of the same image on TCP, and a third on the same socket.
    cli_ok(&b, &["mount", &image, "--nbd", &tcp, "--name", "disk-tcp"]);
    cli_ok(
        &b,
        &["mount", &image, "--nbd", &sock_arg, "--name", "disk2"],
    );

    let out = run("nbdinfo", &["--size", &unix_uri(&sock, "disk")]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        data.len().to_string()
    );
    let out = run(
        "nbdinfo",
        &["--list", &format!("nbd+unix://?socket={}", sock.display())],
    );
    assert!(out.status.success());
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains("disk") && listing.contains("disk2"),
        "{listing}"
    );

    let converted = tmp.path().join("converted.raw");
    let out = convert(&unix_uri(&sock, "disk"), &converted);
    assert!(out.status.success());
    assert!(
        std::fs::read(&converted).unwrap() == data,
        "qemu-img convert differs"
    );

    let copied = tmp.path().join("copied.raw");
    std::fs::write(&copied, b"").unwrap();
    let out = run(
        "nbdcopy",
        &[
            &format!("nbd://127.0.0.1:{port}/disk-tcp"),
            copied.to_str().unwrap(),
        ],
    );
    assert!(out.status.success());
    assert!(std::fs::read(&copied).unwrap() == data, "nbdcopy differs");

    let mounts = ok(&b, &["mounts"]);
    let m = mount_of(&mounts, "disk");
    assert_eq!(m["size"], data.len() as u64);
    assert_eq!(m["writable"], false);
    assert!(m["metrics"]["bytes_read"].as_u64().unwrap() >= data.len() as u64);
    // Each chunk crossed the network once for all exports (shared base).
    let st = b.status();
    let stored = st["store"]["bytes"].as_u64().unwrap();
    assert!(
        st["metrics"]["bytes_in"].as_u64().unwrap() <= stored + stored / 10,
        "chunks were fetched more than once: {st}"
    );
    // Writes to a read-only export are refused.
    let out = run(
        "qemu-io",
        &["-f", "raw", "-c", "write 0 4096", &unix_uri(&sock, "disk")],
    );
    assert!(!out.status.success() || String::from_utf8_lossy(&out.stdout).contains("failed"));

    cli_ok(&b, &["umount", "disk"]);
    cli_ok(&b, &["umount", "disk2"]);
    assert!(
        !sock.exists(),
        "socket file left behind after the last umount"
    );
    let out = b.cli(&["umount", "disk"]);
    assert!(!out.status.success());
}

#[test]
fn lazy_random_reads_fetch_only_the_touched_chunks() {
    let seed = seed();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().unwrap();
    let a = Node::start(&tmp.path().join("a"), "dc1", None, &[]);
    let b = Node::start(&tmp.path().join("b"), "dc2", Some(&a.addr), &[]);
    // 128 MiB in 256 KiB chunks = 512 chunks; ~1% touched (the issue's 1 GiB at the same ratio).
    let size = 128 * MIB;
    let file = tmp.path().join("disk.raw");
    make_pattern_image(&file, size);
    let image = publish(&a, &file);
    wait_for_peers(&b, 1);
    let sock = tmp.path().join("b.sock");
    cli_ok(
        &b,
        &[
            "mount",
            &image,
            "--nbd",
            &format!("unix:{}", sock.display()),
            "--name",
            "lazy",
        ],
    );

    let chunk = 256 * 1024;
    let mut touched = std::collections::BTreeSet::new();
    let mut cmds = Vec::new();
    while touched.len() < 5 {
        let block = rng.random_range(0..size / BLOCK);
        touched.insert(block * BLOCK / chunk);
        cmds.push(format!(
            "read -P {} {} {}",
            pattern(block),
            block * BLOCK,
            BLOCK
        ));
    }
    let mut args = vec!["-r", "-f", "raw"];
    for c in &cmds {
        args.push("-c");
        args.push(c);
    }
    let uri = unix_uri(&sock, "lazy");
    args.push(&uri);
    let out = run("qemu-io", &args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !stdout.contains("failed"),
        "reads failed or returned wrong bytes (seed {seed}):\n{stdout}\n{}",
        b.log()
    );

    let st = b.status();
    let fetched = st["metrics"]["chunks_fetched"].as_u64().unwrap();
    let m = ok(&b, &["mounts"]);
    let m = mount_of(&m, "lazy");
    eprintln!(
        "touched chunks {touched:?}; fetched {fetched}; export {}",
        m["metrics"]
    );
    assert!(
        fetched <= touched.len() as u64,
        "fetched {fetched} chunks for {} touched (seed {seed})",
        touched.len()
    );
    assert_eq!(m["metrics"]["demand_chunks"], touched.len() as u64);
    assert!(st["metrics"]["bytes_in"].as_u64().unwrap() <= (touched.len() * chunk) as u64);
    assert_eq!(
        m["metrics"]["fetched_by_site"]["dc1"],
        (touched.len() * chunk) as u64
    );
    assert!(m["chunks_present"].as_u64().unwrap() < 512);
    // A restart does not turn the lazy mount's image into a full pull.
    drop(b);
    let b = Node::start(&tmp.path().join("b"), "dc2", Some(&a.addr), &[]);
    wait_for_peers(&b, 1);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(b.status()["metrics"]["chunks_fetched"], 0, "{}", b.log());
    // A pull joining the mounted image's on-demand transfer wants everything and completes.
    cli_ok(
        &b,
        &[
            "mount",
            &image,
            "--nbd",
            &format!("unix:{}", sock.display()),
            "--name",
            "lazy",
        ],
    );
    read_block_0(&unix_uri(&sock, "lazy"));
    let pulled = tmp.path().join("pulled.raw");
    cli_ok(&b, &["pull", &image, "-o", pulled.to_str().unwrap()]);
    assert!(std::fs::read(&pulled).unwrap() == std::fs::read(&file).unwrap());
}

#[test]
fn writable_clone_survives_kill9_is_isolated_and_leaves_the_base_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("n");
    let mut node = Node::start(&dir, "dc1", None, &[]);
    let file = tmp.path().join("disk.raw");
    let data = make_pattern_image(&file, 8 * MIB + 3 * BLOCK);
    let image = publish(&node, &file);
    cli_ok(&node, &["clone", &image, "--name", "vm1"]);
    cli_ok(&node, &["clone", &image, "--name", "vm2"]);
    let out = node.cli(&["clone", &image, "--name", "vm1"]);
    assert!(
        !out.status.success(),
        "a second clone with the same name was created"
    );

    let sock = tmp.path().join("c.sock");
    let sock_arg = format!("unix:{}", sock.display());
    cli_ok(&node, &["mount", "--clone", "vm1", "--nbd", &sock_arg]);
    let vm1 = unix_uri(&sock, "vm1");
    // Unaligned write across a block edge, a zeroed range, a trim; then flush.
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 5000 10000",
            "-c",
            "write -z 65536 131072",
            "-c",
            "discard 1048576 65536",
            "-c",
            "flush",
            "-c",
            "read -P 0xab 5000 10000",
            "-c",
            "read -P 0 65536 131072",
            &vm1,
        ],
    );
    assert!(io_ok(&out));
    // Bytes around the write are the base's.
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            &format!("read -P {} 4096 904", pattern(1)),
            "-c",
            &format!("read -P {} 15000 1384", pattern(3)),
            &vm1,
        ],
    );
    assert!(io_ok(&out));

    // kill -9: only what FLUSH made durable counts, and it all survives.
    node.kill9();
    let node = Node::start(&dir, "dc1", None, &[]);
    cli_ok(&node, &["mount", "--clone", "vm1", "--nbd", &sock_arg]);
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0xab 5000 10000",
            "-c",
            "read -P 0 65536 131072",
            &vm1,
        ],
    );
    assert!(io_ok(&out), "{}", node.log());
    // The second clone and the base see the original bytes.
    let port = free_port();
    cli_ok(
        &node,
        &[
            "mount",
            "--clone",
            "vm2",
            "--nbd",
            &format!("tcp:127.0.0.1:{port}"),
        ],
    );
    cli_ok(
        &node,
        &["mount", &image, "--nbd", &sock_arg, "--name", "base"],
    );
    for uri in [
        format!("nbd://127.0.0.1:{port}/vm2"),
        unix_uri(&sock, "base"),
    ] {
        let out_file = tmp.path().join("read.raw");
        let out = convert(&uri, &out_file);
        assert!(out.status.success());
        assert!(
            std::fs::read(&out_file).unwrap() == data,
            "{uri} differs from the base"
        );
    }
    let v = ok(&node, &["status"]);
    assert_eq!(v["images"][0]["complete"], true);
    let verify = node.cli(&["verify"]);
    let report: Value = serde_json::from_slice(&verify.stdout).unwrap();
    assert_eq!(report["clean"], true, "{report}");

    let out = node.cli(&["clone", "rm", "vm1"]);
    assert!(!out.status.success(), "a mounted clone was removed");
    cli_ok(&node, &["umount", "vm1"]);
    cli_ok(&node, &["clone", "rm", "vm1"]);
    assert!(!dir.join("clones/vm1").exists());
    let clones = ok(&node, &["clones"]);
    assert_eq!(clones.as_array().unwrap().len(), 1);
}

#[test]
fn killing_the_only_provider_gives_eio_in_bounded_time_and_reads_recover_when_it_returns() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = fast_config(tmp.path());
    let cfg = cfg.to_str().unwrap();
    let a_dir = tmp.path().join("a");
    let mut a = Node::start(&a_dir, "dc1", None, &[]);
    let b = Node::start(
        &tmp.path().join("b"),
        "dc2",
        Some(&a.addr),
        &["--config", cfg],
    );
    let file = tmp.path().join("disk.raw");
    make_pattern_image(&file, 16 * MIB);
    let image = publish(&a, &file);
    wait_for_peers(&b, 1);
    let sock = tmp.path().join("b.sock");
    cli_ok(
        &b,
        &[
            "mount",
            &image,
            "--nbd",
            &format!("unix:{}", sock.display()),
            "--name",
            "d",
        ],
    );
    let uri = unix_uri(&sock, "d");
    let read = |block: usize| read_pattern(&uri, block);
    let out = read(0);
    assert!(io_ok(&out));

    a.kill9();
    let far = 3000; // chunk 46, not held by B
    let started = Instant::now();
    let out = read(far);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("failed read returned after {:?}", started.elapsed());
    assert!(
        text.contains("Input/output error"),
        "expected EIO, got: {text}\n{}",
        b.log()
    );
    // The daemon is healthy: status answers, local chunks still read.
    let st = b.status();
    let m = ok(&b, &["mounts"]);
    assert!(
        mount_of(&m, "d")["metrics"]["demand_failures"]
            .as_u64()
            .unwrap()
            >= 1,
        "{st}"
    );
    let out = read(1);
    assert!(io_ok(&out));

    // B notices the dead connection (QUIC idle timeout); then the provider returns (same identity
    // and store, joining through B) and reads work again.
    let deadline = Instant::now() + Duration::from_secs(60);
    while b.status()["peers"]
        .as_object()
        .is_some_and(|p| !p.is_empty())
    {
        assert!(
            Instant::now() < deadline,
            "B never noticed A was gone\n{}",
            b.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let _a = Node::start(&a_dir, "dc1", Some(&b.addr), &[]);
    wait_for_peers(&b, 1);
    let out = read(far);
    assert!(io_ok(&out), "{}", b.log());
}

/// Flips one byte in the middle of chunk `index` of `image` in the (stopped) node's store, as rot
/// at rest would; returns the chunk's id.
fn rot_chunk(data_dir: &Path, image: &str, index: usize) -> String {
    let store = common::open_store(&data_dir.join("store"));
    let manifest = store.manifest(&image.parse().unwrap()).unwrap().unwrap();
    let id = manifest.chunks[index];
    let loc = store.chunk_location(&id).unwrap();
    drop(store);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&loc.path)
        .unwrap();
    let at = loc.offset + u64::from(loc.len / 2);
    let mut b = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut b, at).unwrap();
    b[0] ^= 0x5a;
    std::os::unix::fs::FileExt::write_all_at(&file, &b, at).unwrap();
    id.to_string()
}

fn image_json(node: &Node, image: &str) -> Value {
    ok(node, &["images"])
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == image)
        .unwrap_or_else(|| panic!("no image {image}"))
        .clone()
}

fn wait_until(what: &str, node: &Node, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}\n{}", node.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn rotten_store_bytes_never_reach_an_nbd_client() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = fast_config(tmp.path());
    let cfg = cfg.to_str().unwrap();
    let a_dir = tmp.path().join("a");
    let mut a = Node::start(&a_dir, "dc1", None, &["--config", cfg]);
    let file = tmp.path().join("disk.raw");
    let data = make_pattern_image(&file, 16 * MIB);
    let image = publish(&a, &file);
    let mut b = Node::start(
        &tmp.path().join("b"),
        "dc1",
        Some(&a.addr),
        &["--config", cfg],
    );
    wait_for_peers(&b, 1);
    cli_ok(&b, &["pull", &image]);

    // Rot at rest in A's store while it is stopped; A comes back next to B, which holds the image.
    assert!(a.stop());
    let rotten = [rot_chunk(&a_dir, &image, 5), rot_chunk(&a_dir, &image, 9)];
    let mut a = Node::start(&a_dir, "dc1", Some(&b.addr), &["--config", cfg]);
    wait_for_peers(&a, 1);
    let sock = tmp.path().join("a.sock");
    let mount = |node: &Node| {
        cli_ok(
            node,
            &[
                "mount",
                &image,
                "--nbd",
                &format!("unix:{}", sock.display()),
                "--name",
                "d",
            ],
        )
    };
    mount(&a);
    let out_file = tmp.path().join("out.raw");
    let out = convert(&unix_uri(&sock, "d"), &out_file);
    assert!(out.status.success(), "{}", a.log());
    // Byte for byte: the rotten chunks were refused, quarantined and fetched again from B.
    assert!(
        std::fs::read(&out_file).unwrap() == data,
        "the export served bytes that differ from the image\n{}",
        a.log()
    );
    let st = a.status();
    assert_eq!(st["metrics"]["store_chunks_dropped"], 2, "{st}");
    let quarantined = std::fs::read_dir(a_dir.join("store/quarantine"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect::<Vec<_>>();
    for id in &rotten {
        assert!(
            quarantined.iter().any(|q| q.contains(id.as_str())),
            "{id} not quarantined: {quarantined:?}"
        );
    }
    wait_until("A never held the whole image again", &a, || {
        image_json(&a, &image)["complete"] == true
    });

    // Rot again, with no other holder in reach: the read fails (EIO), it never returns the rot.
    cli_ok(&a, &["umount", "d"]);
    assert!(a.stop());
    assert!(b.stop());
    rot_chunk(&a_dir, &image, 20);
    let a = Node::start(&a_dir, "dc1", None, &["--config", cfg]);
    mount(&a);
    let read = |block: usize| {
        let out = read_pattern(&unix_uri(&sock, "d"), block);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let chunk_blocks = 256 * 1024 / BLOCK;
    let text = read(20 * chunk_blocks);
    assert!(
        text.contains("Input/output error"),
        "expected EIO for a rotten chunk with no other holder, got: {text}\n{}",
        a.log()
    );
    let text = read(21 * chunk_blocks);
    assert!(
        !text.contains("failed") && !text.contains("error"),
        "{text}"
    );
    let img = image_json(&a, &image);
    assert_eq!(img["complete"], false, "{img}");
}

#[test]
fn chunks_verify_quarantines_are_no_longer_counted_or_advertised() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = fast_config(tmp.path());
    let cfg = cfg.to_str().unwrap();
    let a_dir = tmp.path().join("a");
    let mut a = Node::start(&a_dir, "dc1", None, &[]);
    let file = tmp.path().join("disk.raw");
    make_pattern_image(&file, 4 * MIB);
    let image = publish(&a, &file);
    assert!(a.stop());
    let rotten = rot_chunk(&a_dir, &image, 3);
    let a = Node::start(&a_dir, "dc1", None, &[]);
    let c = Node::start(
        &tmp.path().join("c"),
        "dc2",
        Some(&a.addr),
        &["--config", cfg],
    );
    wait_for_peers(&c, 1);
    let sock = tmp.path().join("c.sock");
    cli_ok(
        &c,
        &[
            "mount",
            &image,
            "--nbd",
            &format!("unix:{}", sock.display()),
            "--name",
            "d",
        ],
    );
    let chunks = image_json(&a, &image)["chunks"].as_u64().unwrap();
    wait_until("C never learnt what A holds", &c, || {
        image_json(&c, &image)["peer_held"] == chunks
    });

    let out = a.cli(&["verify"]);
    assert!(out.status.success(), "{}", a.log());
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["corrupt_chunks"],
        serde_json::json!([rotten]),
        "{report}"
    );
    // Counted: A no longer calls the image complete (nobody else holds the chunk to heal it).
    let img = image_json(&a, &image);
    assert_eq!(img["present"], chunks - 1, "{img}");
    assert_eq!(img["complete"], false, "{img}");
    // Advertised: A withdrew the chunk from what it told C.
    wait_until("A still advertises the quarantined chunk to C", &c, || {
        image_json(&c, &image)["peer_held"] == chunks - 1
    });
}

/// Sends raw bytes as a client and returns what the server answered before closing (or 1 s).
fn raw_client(sock: &Path, bytes: &[u8]) -> Vec<u8> {
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

#[test]
fn hostile_clients_do_not_disturb_other_exports() {
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("n"), "dc1", None, &[]);
    let file = tmp.path().join("disk.raw");
    let data = make_pattern_image(&file, 4 * MIB);
    let image = publish(&node, &file);
    let sock1 = tmp.path().join("one.sock");
    let sock2 = tmp.path().join("two.sock");
    cli_ok(
        &node,
        &[
            "mount",
            &image,
            "--nbd",
            &format!("unix:{}", sock1.display()),
            "--name",
            "one",
        ],
    );
    cli_ok(
        &node,
        &[
            "mount",
            &image,
            "--nbd",
            &format!("unix:{}", sock2.display()),
            "--name",
            "two",
        ],
    );

    // Garbage instead of client flags / options: the server closes that connection.
    let answer = raw_client(&sock1, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(&answer[..8], b"NBDMAGIC");
    assert_eq!(
        answer.len(),
        18,
        "the server answered garbage with more than its greeting"
    );
    // Valid flags, then an option claiming 1 GiB of data.
    let mut evil = 3u32.to_be_bytes().to_vec();
    evil.extend_from_slice(b"IHAVEOPT");
    evil.extend_from_slice(&7u32.to_be_bytes());
    evil.extend_from_slice(&(1u32 << 30).to_be_bytes());
    assert_eq!(raw_client(&sock1, &evil).len(), 18);
    // A valid handshake, then an oversized READ (error reply, connection stays) and an oversized
    // WRITE (connection closed).
    let mut s = std::os::unix::net::UnixStream::connect(&sock1).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    let mut hs = 3u32.to_be_bytes().to_vec();
    hs.extend_from_slice(b"IHAVEOPT");
    hs.extend_from_slice(&1u32.to_be_bytes()); // EXPORT_NAME
    hs.extend_from_slice(&3u32.to_be_bytes());
    hs.extend_from_slice(b"one");
    s.write_all(&hs).unwrap();
    let mut info = [0u8; 10];
    s.read_exact(&mut info).unwrap();
    assert_eq!(
        u64::from_be_bytes(info[..8].try_into().unwrap()),
        data.len() as u64
    );
    let req = |cmd: u16, len: u32| {
        let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&cmd.to_be_bytes());
        r.extend_from_slice(&77u64.to_be_bytes());
        r.extend_from_slice(&0u64.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r
    };
    s.write_all(&req(0, 64 << 20)).unwrap();
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(
        u32::from_be_bytes(reply[4..8].try_into().unwrap()),
        75,
        "EOVERFLOW expected"
    );
    s.write_all(&req(0, 4096)).unwrap();
    let mut reply = vec![0u8; 16 + 4096];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(u32::from_be_bytes(reply[4..8].try_into().unwrap()), 0);
    assert!(reply[16..].iter().all(|&b| b == pattern(0)));
    s.write_all(&req(1, u32::MAX)).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "the server answered an oversized write");

    // Both exports still serve real clients.
    for (sock, name) in [(&sock1, "one"), (&sock2, "two")] {
        let out_file = tmp.path().join(format!("{name}.raw"));
        let out = convert(&unix_uri(sock, name), &out_file);
        assert!(out.status.success());
        assert!(std::fs::read(&out_file).unwrap() == data);
    }
    assert!(node.status()["peer_id"].is_string());
}

#[test]
fn prefetch_fills_the_image_and_the_boot_profile_is_recorded_and_replayed() {
    let tmp = tempfile::tempdir().unwrap();
    let a = Node::start(&tmp.path().join("a"), "dc1", None, &[]);
    let b = Node::start(&tmp.path().join("b"), "dc2", Some(&a.addr), &[]);
    let file = tmp.path().join("disk.raw");
    let size = 128 * MIB;
    make_pattern_image(&file, size);
    let image = publish(&a, &file);
    wait_for_peers(&b, 1);

    // First boot on B: lazy, records which chunks were touched first, in order.
    let sock = tmp.path().join("b.sock");
    let sock_arg = format!("unix:{}", sock.display());
    cli_ok(
        &b,
        &["mount", &image, "--nbd", &sock_arg, "--name", "boot1"],
    );
    let blocks = [2000usize, 70, 3000];
    let cmds: Vec<String> = blocks
        .iter()
        .map(|&b| format!("read -P {} {} 4096", pattern(b), b * BLOCK))
        .collect();
    let uri = unix_uri(&sock, "boot1");
    let out = run(
        "qemu-io",
        &[
            "-r", "-f", "raw", "-c", &cmds[0], "-c", &cmds[1], "-c", &cmds[2], &uri,
        ],
    );
    assert!(io_ok(&out));
    cli_ok(&b, &["umount", "boot1"]);
    let profile: Value = serde_json::from_slice(
        &std::fs::read(b.dir.join("profiles").join(format!("{image}.json"))).unwrap(),
    )
    .unwrap();
    let order: Vec<u64> = profile["order"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let expected: Vec<u64> = blocks
        .iter()
        .map(|&b| (b * BLOCK / (256 * 1024)) as u64)
        .collect();
    assert!(
        order.ends_with(&expected),
        "profile {order:?}, expected to end with {expected:?}"
    );

    // Demand first: a profile that puts chunk `last` at the very end of the Background order; a
    // prefetching mount starts and `last` is read at once. Had the read waited for Background
    // work, the image would be complete when it returned.
    let chunks = (size / (256 * 1024)) as u32;
    let last = chunks - 5;
    let mut order: Vec<u32> = (0..chunks).filter(|&c| c != last).collect();
    order.push(last);
    std::fs::write(
        b.dir.join("profiles").join(format!("{image}.json")),
        serde_json::json!({ "image": image, "window_ms": 60000, "order": order }).to_string(),
    )
    .unwrap();
    cli_ok(
        &b,
        &[
            "mount",
            &image,
            "--nbd",
            &sock_arg,
            "--name",
            "boot2",
            "--prefetch",
        ],
    );
    let block = last as usize * 64 + 3;
    let out = read_pattern(&unix_uri(&sock, "boot2"), block);
    assert!(io_ok(&out));
    let m = ok(&b, &["mounts"]);
    let m = mount_of(&m, "boot2");
    eprintln!(
        "after the Demand read: {} of {} chunks present",
        m["chunks_present"], m["chunks"]
    );
    assert!(
        m["chunks_present"].as_u64().unwrap() < u64::from(chunks),
        "the Demand read returned only after the whole Background prefetch: {m}"
    );
    // The prefetch then completes the image.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let m = ok(&b, &["mounts"]);
        let m = mount_of(&m, "boot2");
        if m["chunks_present"] == m["chunks"] {
            assert!(m["metrics"]["bytes_fetched"].as_u64().unwrap() > 0);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "prefetch did not finish: {m}\n{}",
            b.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        b.log().contains("prefetching in boot-profile order"),
        "{}",
        b.log()
    );

    // A third node without a profile asks its peers when it prefetches, saves B's and follows it.
    let c = Node::start(&tmp.path().join("c"), "dc2", Some(&b.addr), &[]);
    wait_for_peers(&c, 1);
    let c_sock = tmp.path().join("c.sock");
    cli_ok(
        &c,
        &[
            "mount",
            &image,
            "--nbd",
            &format!("unix:{}", c_sock.display()),
            "--name",
            "boot3",
            "--prefetch",
        ],
    );
    let c_profile = c.dir.join("profiles").join(format!("{image}.json"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !c_profile.exists() {
        assert!(
            Instant::now() < deadline,
            "C never got a boot profile\n{}",
            c.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let got: Value = serde_json::from_slice(&std::fs::read(&c_profile).unwrap()).unwrap();
    assert_eq!(got["order"], serde_json::json!(order));
    assert!(c.log().contains("profile from a peer"), "{}", c.log());
}

#[test]
fn a_lazy_mount_keeps_its_transfer_and_umount_stops_its_prefetch() {
    let tmp = tempfile::tempdir().unwrap();
    let a = Node::start(&tmp.path().join("a"), "dc1", None, &[]);
    let b = Node::start(&tmp.path().join("b"), "dc2", Some(&a.addr), &[]);
    let file = tmp.path().join("disk.raw");
    // Large enough that a prefetch over loopback takes seconds, so the umount lands mid-way.
    let size = 512 * MIB;
    make_pattern_image(&file, size);
    let image = publish(&a, &file);
    wait_for_peers(&b, 1);
    let image_of = |node: &Node| -> Value {
        node.status()["images"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["id"] == image.as_str())
            .cloned()
            .unwrap_or(Value::Null)
    };
    let sock = tmp.path().join("b.sock");
    let sock_arg = format!("unix:{}", sock.display());

    // A lazy mount's transfer exists from the mount on and survives reads that complete.
    cli_ok(&b, &["mount", &image, "--nbd", &sock_arg, "--name", "lazy"]);
    read_block_0(&unix_uri(&sock, "lazy"));
    assert_eq!(image_of(&b)["pulling"], true, "{}", b.log());
    // The read's chunk, and whatever qemu probes on open: a few chunks, not the image.
    let present = image_of(&b)["present"].as_u64().unwrap();
    assert!((1..=4).contains(&present), "{present} chunks present");
    // `images` says what is happening: mounted lazily, nothing fetched between reads (the read's
    // chunk may still be on its way to the store for a moment).
    let deadline = Instant::now() + Duration::from_secs(10);
    while image_of(&b)["activity"] != "idle" {
        assert!(Instant::now() < deadline, "{}\n{}", image_of(&b), b.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let lazy = image_of(&b);
    assert_eq!(lazy["mounts"], serde_json::json!(["lazy"]), "{lazy}");
    assert_eq!(lazy["prefetch"], "none", "{lazy}");
    assert_eq!(lazy["wanted"], 0, "{lazy}");
    let text = cli_ok(&b, &["images"]);
    assert!(
        text.contains("mounted lazily as lazy; idle: chunks are fetched when read"),
        "{text}"
    );
    assert!(!text.contains("(pulling)"), "{text}");
    cli_ok(&b, &["umount", "lazy"]);
    assert_eq!(
        image_of(&b)["pulling"],
        false,
        "the last umount ends the transfer"
    );
    let unmounted = image_of(&b);
    assert_eq!(unmounted["activity"], "idle", "{unmounted}");
    assert_eq!(unmounted["mounts"], serde_json::json!([]), "{unmounted}");
    let text = cli_ok(&b, &["images"]);
    assert!(
        text.contains("(incomplete, idle: nothing being fetched)"),
        "{text}"
    );

    // A prefetching mount, unmounted at once: the prefetch stops short of the whole image.
    cli_ok(
        &b,
        &[
            "mount",
            &image,
            "--nbd",
            &sock_arg,
            "--name",
            "pre",
            "--prefetch",
        ],
    );
    let text = cli_ok(&b, &["images"]);
    assert!(
        text.contains("(mounted as pre, prefetching the whole image; fetching "),
        "{text}"
    );
    cli_ok(&b, &["umount", "pre"]);
    let at_umount = image_of(&b)["present"].as_u64().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let later = image_of(&b);
    let chunks = later["chunks"].as_u64().unwrap();
    assert_eq!(later["pulling"], false, "{later}\n{}", b.log());
    assert!(
        later["present"].as_u64().unwrap() < chunks,
        "the prefetch went on after umount: {at_umount} chunks at umount, {later}"
    );
    assert_eq!(b.status()["fetches_in_flight"], 0);
}

#[test]
fn a_demand_crowd_is_relayed_between_mounts_and_every_copy_is_exact() {
    // The publisher sends each chunk to one peer at a time for waiting VMs (`demand_fanout = 1`):
    // four nodes copying the same lazily mounted image at once must get the rest from each other
    // (`Reject { Fanout }`, then the relays' Have updates) and still read it byte for byte.
    let seed = seed();
    let tmp = tempfile::tempdir().unwrap();
    let names = ["b", "c", "d", "e"];
    let Crowd {
        a,
        nodes,
        data,
        socks,
    } = Crowd::start(tmp.path(), 1, &names, 16 * MIB, seed, 1);
    // All four copies at once, each through its own node's export.
    let copies: Vec<PathBuf> = names
        .iter()
        .map(|n| tmp.path().join(format!("{n}.copy")))
        .collect();
    let children: Vec<std::process::Child> = socks
        .iter()
        .zip(&copies)
        .map(|(sock, copy)| {
            std::fs::write(copy, b"").unwrap();
            Command::new("timeout")
                .args(["120", "nbdcopy"])
                .arg(unix_uri(sock, "disk"))
                .arg(copy)
                .spawn()
                .expect("starting nbdcopy")
        })
        .collect();
    for (mut child, name) in children.into_iter().zip(names) {
        let status = child.wait().unwrap();
        assert!(
            status.success(),
            "nbdcopy through {name} failed (seed {seed})"
        );
    }
    for ((copy, n), name) in copies.iter().zip(&nodes).zip(names) {
        assert!(
            std::fs::read(copy).unwrap() == data,
            "the copy through {name} differs (seed {seed})\n{}",
            n.log()
        );
    }
    let refusals: Vec<u64> = std::iter::once(&a)
        .chain(&nodes)
        .map(|n| n.status()["metrics"]["fanout_refusals"].as_u64().unwrap())
        .collect();
    // How many requests met a full fan-out depends on timing; the figure is for the log only.
    eprintln!("fan-out refusals (a, b, c, d, e): {refusals:?}");
    // The publisher measured its Demand copies (acceptance to the receiver's Have) for the
    // fan-out rule, and the fan-out in use never exceeds the configured maximum.
    let serving = a.status()["serving"].clone();
    eprintln!("publisher serving: {serving}");
    assert_eq!(serving["demand_fanout_max"], 1, "{serving}");
    assert_eq!(serving["demand_fanout"], 1, "{serving}");
    assert_eq!(a.status()["metrics"]["demand_fanout"], 1);
    assert!(
        serving["chunk_upload_ms"].as_f64().is_some(),
        "no Demand copy was measured (seed {seed}): {serving}"
    );
}

/// A publisher `a` holding one image and nodes that lazily mount it through NBD exports, every
/// node with `[serve] demand_fanout = fanout`: the set-up of the flash-crowd tests.
struct Crowd {
    a: Node,
    nodes: Vec<Node>,
    data: Vec<u8>,
    socks: Vec<PathBuf>,
}

impl Crowd {
    /// Starts it in `dir`: `names` are the mounting nodes, each waits until it sees `peers` peers.
    fn start(
        dir: &Path,
        fanout: usize,
        names: &[&str],
        size: usize,
        seed: u64,
        peers: usize,
    ) -> Crowd {
        let config = dir.join("fanout.toml");
        std::fs::write(&config, format!("[serve]\ndemand_fanout = {fanout}\n")).unwrap();
        let config = config.to_str().unwrap().to_owned();
        let extra = ["--config", config.as_str()];
        let a = Node::start(&dir.join("a"), "dc1", None, &extra);
        let file = dir.join("disk.raw");
        let data = common::make_image(&file, size, seed);
        let image = publish(&a, &file);
        let nodes: Vec<Node> = names
            .iter()
            .map(|n| Node::start(&dir.join(n), "dc1", Some(&a.addr), &extra))
            .collect();
        for n in &nodes {
            wait_for_peers(n, peers);
        }
        let mut socks = Vec::new();
        for (n, name) in nodes.iter().zip(names) {
            let sock = dir.join(format!("{name}.sock"));
            let arg = format!("unix:{}", sock.display());
            cli_ok(n, &["mount", &image, "--nbd", &arg, "--name", "disk"]);
            socks.push(sock);
        }
        Crowd {
            a,
            nodes,
            data,
            socks,
        }
    }
}

/// Children that are killed and reaped when dropped, so a failing assertion leaves none behind.
struct Children(Vec<(String, std::process::Child)>);

impl Children {
    /// Waits for every child; panics naming the first that failed.
    fn wait_all(mut self, seed: u64) {
        for (name, child) in &mut self.0 {
            let status = child.wait().unwrap();
            assert!(
                status.success(),
                "nbdcopy through {name} failed: {status} (seed {seed})"
            );
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn lockstep_lazy_readers_on_8_nodes_where_the_first_holders_upload_stays_bounded() {
    // Eight nodes lazily mount one image that only the publisher holds and copy it through their
    // exports at the same moment: a lockstep flash crowd. Every node has `demand_fanout = 2`
    // (`VMSWARM_TEST_FANOUT` sets another value for comparison; the upload bound is for 2 only).
    let seed = seed();
    let fanout: usize = std::env::var("VMSWARM_TEST_FANOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let tmp = tempfile::tempdir().unwrap();
    let names = ["b", "c", "d", "e", "f", "g", "h", "i"];
    // A full mesh: each node sees the publisher and the seven others.
    let Crowd {
        a,
        nodes,
        data,
        socks,
    } = Crowd::start(tmp.path(), fanout, &names, 32 * MIB, seed, names.len());
    let copies: Vec<PathBuf> = names
        .iter()
        .map(|n| tmp.path().join(format!("{n}.copy")))
        .collect();
    for copy in &copies {
        std::fs::write(copy, b"").unwrap();
    }
    // Every nbdcopy is built first and all are spawned back to back, so that the eight readers
    // ask for the same first blocks within milliseconds of each other.
    let mut commands: Vec<(String, Command)> = socks
        .iter()
        .zip(&copies)
        .zip(names)
        .map(|((sock, copy), name)| {
            let mut c = Command::new("timeout");
            c.args(["120", "nbdcopy"])
                .arg(unix_uri(sock, "disk"))
                .arg(copy);
            (name.to_owned(), c)
        })
        .collect();
    let mut children = Children(Vec::new());
    for (name, c) in &mut commands {
        children
            .0
            .push((name.clone(), c.spawn().expect("starting nbdcopy")));
    }
    children.wait_all(seed);
    for ((copy, n), name) in copies.iter().zip(&nodes).zip(names) {
        assert!(
            std::fs::read(copy).unwrap() == data,
            "the copy through {name} differs (seed {seed})\n{}",
            n.log()
        );
    }
    let image_bytes = data.len() as f64;
    let stats: Vec<(&str, Value)> = std::iter::once(("a", a.status()))
        .chain(names.iter().copied().zip(nodes.iter().map(Node::status)))
        .collect();
    for (name, s) in &stats {
        let m = &s["metrics"];
        eprintln!(
            "{name}: out {:.2} images ({} B, {} chunks served), in {:.2} images, {} fan-out refusals",
            m["bytes_out"].as_u64().unwrap() as f64 / image_bytes,
            m["bytes_out"],
            m["chunks_served"],
            m["bytes_in"].as_u64().unwrap() as f64 / image_bytes,
            m["fanout_refusals"],
        );
    }
    // Only non-zero chunks travel (a zero chunk is read as zeros): the publisher's upload in
    // copies of those is how many peers it sent each one to, on average.
    let chunk = 256 * 1024;
    let wire_bytes = (data
        .chunks(chunk)
        .filter(|c| c.iter().any(|&x| x != 0))
        .count()
        * chunk) as f64;
    let published = stats[0].1["metrics"]["bytes_out"].as_u64().unwrap();
    let copies = published as f64 / wire_bytes;
    eprintln!(
        "publisher upload: {:.2} images, {copies:.2} copies of the non-zero chunks (demand_fanout = {fanout}, seed {seed})",
        published as f64 / image_bytes
    );
    // The publisher sends each chunk at Demand to at most `demand_fanout` = 2 peers at once; the
    // six other readers are refused (`Reject { Fanout }`) and take it from a receiver, which
    // announces it as soon as it holds it. A copy stops counting once its receiver announces the
    // chunk, so a requester whose refusal has expired (`relay_retry`) may still get it from the
    // publisher, and hedged and endgame duplicates add some more: measured 2.55 to 2.8 copies over
    // five seeds (2.2 to 2.4 images of 32 MiB), against 7.0 copies (nearly one per reader) with
    // no limit and 4.0 with `demand_fanout = 4`. 3.5 copies leave a quarter of slack
    // over the worst run and still fail without the limit.
    if fanout == 2 {
        assert!(
            copies <= 3.5,
            "the publisher sent each chunk {copies:.2} times on average to 8 lockstep readers (seed {seed})"
        );
    }
}

/// The chunks of `image` in the store at `data_dir` (the daemon must be stopped: the store is
/// locked while it runs).
fn stored_chunks(data_dir: &Path, image: &str) -> Vec<u32> {
    let store = common::open_store(&data_dir.join("store"));
    let manifest = store.manifest(&image.parse().unwrap()).unwrap().unwrap();
    (0..manifest.chunk_count())
        .filter(|&i| store.contains(&manifest.chunks[i as usize]))
        .collect()
}

/// `vmswarm mount IMAGE --nbd NBD --name NAME PREFETCH` on `node`; returns its output.
fn mount_nbd(node: &Node, image: &str, nbd: &str, name: &str, prefetch: &str) -> String {
    cli_ok(
        node,
        &["mount", image, "--nbd", nbd, "--name", name, prefetch],
    )
}

#[test]
fn profile_prefetch_fetches_only_the_boot_profile_and_survives_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let a = Node::start(&tmp.path().join("a"), "dc1", None, &[]);
    let b_dir = tmp.path().join("b");
    let mut b = Node::start(&b_dir, "dc2", Some(&a.addr), &[]);
    let file = tmp.path().join("disk.raw");
    make_pattern_image(&file, 32 * MIB); // 128 chunks of 256 KiB
    let image = publish(&a, &file);
    let file2 = tmp.path().join("other.raw");
    let mut other = vec![0u8; 4 * MIB];
    rand_chacha::ChaCha8Rng::seed_from_u64(seed()).fill(&mut other[..]); // no zero chunks
    std::fs::write(&file2, &other).unwrap();
    let bare = publish(&a, &file2); // no boot profile anywhere
    wait_for_peers(&b, 1);
    let present = |node: &Node, image: &str| -> u64 {
        node.status()["images"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["id"] == image)
            .map_or(0, |i| i["present"].as_u64().unwrap())
    };
    let profile: Vec<u32> = vec![100, 3, 64, 17, 120, 5];
    let mut sorted = profile.clone();
    sorted.sort_unstable();
    std::fs::create_dir_all(b_dir.join("profiles")).unwrap();
    std::fs::write(
        b_dir.join("profiles").join(format!("{image}.json")),
        serde_json::json!({ "image": image, "window_ms": 60000, "order": profile }).to_string(),
    )
    .unwrap();
    let sock = tmp.path().join("b.sock");
    let sock_arg = format!("unix:{}", sock.display());

    // A bad mode is a usage error, before any daemon is asked.
    let out = b.cli(&["mount", &image, "--nbd", &sock_arg, "--prefetch=bogus"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("bogus") && err.contains("possible values: all, profile"),
        "{err}"
    );

    // A profile-only mount, nobody reading: exactly the profile's chunks arrive, nothing else.
    let said = mount_nbd(&b, &image, &sock_arg, "prof", "--prefetch=profile");
    assert!(said.contains("prefetch profile"), "{said}");
    wait_until("the profile's chunks never arrived", &b, || {
        present(&b, &image) >= profile.len() as u64
    });
    let m = ok(&b, &["mounts"]);
    assert_eq!(mount_of(&m, "prof")["prefetch"], "profile", "{m}");
    assert!(cli_ok(&b, &["mounts"]).contains("prefetch=profile"));
    assert!(
        b.log().contains("prefetching the boot profile only"),
        "{}",
        b.log()
    );
    // Without any profile, profile mode wants nothing (and says so).
    mount_nbd(&b, &bare, &sock_arg, "bare", "--prefetch=profile");
    assert!(b.log().contains("no boot profile here"), "{}", b.log());
    // Whatever could still come would have come by now (the profile took less than this).
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(present(&b, &image), profile.len() as u64, "{}", b.log());
    assert_eq!(present(&b, &bare), 0, "{}", b.log());

    // Restart: the store holds the profile's chunks and no others, and the image is not resumed
    // as a whole-image pull; mounted again, profile mode still fetches nothing more.
    assert!(b.stop(), "{}", b.log());
    drop(b);
    assert_eq!(stored_chunks(&b_dir, &image), sorted);
    let b = Node::start(&b_dir, "dc2", Some(&a.addr), &[]);
    wait_for_peers(&b, 1);
    mount_nbd(&b, &image, &sock_arg, "prof2", "--prefetch=profile");
    let m = ok(&b, &["mounts"]);
    assert_eq!(mount_of(&m, "prof2")["prefetch"], "profile", "{m}");
    // `--prefetch` alone still means the whole image.
    mount_nbd(&b, &bare, &sock_arg, "all", "--prefetch");
    let m = ok(&b, &["mounts"]);
    assert_eq!(mount_of(&m, "all")["prefetch"], "all", "{m}");
    wait_until("the --prefetch mount did not fill its image", &b, || {
        let i = image_json(&b, &bare);
        i["present"] == i["chunks"]
    });
    assert_eq!(present(&b, &image), profile.len() as u64, "{}", b.log());

    // A node without a profile gets B's from its peer and then wants exactly its chunks.
    let c_dir = tmp.path().join("c");
    let mut c = Node::start(&c_dir, "dc3", Some(&b.addr), &[]);
    wait_for_peers(&c, 1);
    let c_sock = tmp.path().join("c.sock");
    mount_nbd(
        &c,
        &image,
        &format!("unix:{}", c_sock.display()),
        "prof",
        "--prefetch=profile",
    );
    wait_until("C never fetched the peer's profile chunks", &c, || {
        present(&c, &image) >= profile.len() as u64
    });
    assert!(
        c.log()
            .contains("boot profile from a peer: prefetching its chunks"),
        "{}",
        c.log()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(c.stop(), "{}", c.log());
    assert_eq!(stored_chunks(&c_dir, &image), sorted);
}
