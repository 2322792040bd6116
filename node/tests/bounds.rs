//! One hostile client must not exhaust a real daemon's memory or CPU (issue 18, finding 6), with raw
//! clients written here against real `vmswarm serve` processes:
//!
//! - an NBD client that queues 40 READs of 32 MiB and does not read the replies: the daemon's RSS
//!   stays bounded and it keeps answering control commands; then every reply arrives, correct;
//! - a 256 MiB control-socket line without a newline: the daemon's RSS stays bounded, the client gets
//!   a clear error, other control clients are served;
//! - a daemon out of file descriptors with connections waiting on its control socket and metrics
//!   endpoint: its accept loops sleep instead of spinning (CPU time consumed, not wall-clock speed, is
//!   asserted), and it serves again once descriptors are free.
//!
//! Rerun with `VMSWARM_TEST_SEED=<seed>` (printed at the start).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Node, make_image, publish, seed};
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// The resident set of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// CPU time (user + system) process `pid` has consumed.
fn cpu_time(pid: u32) -> Duration {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15 of the line.
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    let out = Command::new("getconf").arg("CLK_TCK").output().unwrap();
    let hz: u64 = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    Duration::from_secs_f64(ticks as f64 / hz as f64)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
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

/// An export's counters from `mounts --json`.
fn export_metrics(node: &Node, export: &str) -> Value {
    let mounts: Value = serde_json::from_str(&cli_ok(node, &["mounts", "--json"])).unwrap();
    let m = mounts
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == export)
        .unwrap_or_else(|| panic!("no mount {export} in {mounts}"));
    m["metrics"].clone()
}

/// An NBD READ request (simple replies: no structured reply was negotiated).
fn read_request(cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&0u16.to_be_bytes()); // READ
    r.extend_from_slice(&cookie.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    r
}

#[test]
fn an_nbd_client_that_never_reads_its_replies_cannot_grow_the_daemon() {
    const READS: u64 = 40;
    const LEN: u64 = 32 * MIB;
    let seed = seed();
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("n"), "dc1", None, &[]);
    let file = tmp.path().join("disk.raw");
    let data = make_image(&file, LEN as usize, seed);
    let image = publish(&node, &file);
    let sock = tmp.path().join("big.sock");
    cli_ok(
        &node,
        &[
            "mount",
            &image,
            "--nbd",
            &format!("unix:{}", sock.display()),
            "--name",
            "big",
        ],
    );
    let pid = node.pid();

    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    // Fixed newstyle + no zeroes, then NBD_OPT_EXPORT_NAME "big".
    let mut hs = 3u32.to_be_bytes().to_vec();
    hs.extend_from_slice(b"IHAVEOPT");
    hs.extend_from_slice(&1u32.to_be_bytes());
    hs.extend_from_slice(&3u32.to_be_bytes());
    hs.extend_from_slice(b"big");
    s.write_all(&hs).unwrap();
    let mut info = [0u8; 10];
    s.read_exact(&mut info).unwrap();
    assert_eq!(u64::from_be_bytes(info[..8].try_into().unwrap()), LEN);

    let base = rss(pid);
    let mut reqs = Vec::new();
    for cookie in 0..READS {
        reqs.extend_from_slice(&read_request(cookie, 0, LEN as u32));
    }
    s.write_all(&reqs).unwrap();

    // Watch the daemon until it has served everything it is going to serve without the client
    // reading: `bytes_read` stops moving (or reaches all 40 reads).
    let mut peak = base;
    let mut last = u64::MAX;
    let mut still = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while still < 6 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        peak = peak.max(rss(pid));
        let n = export_metrics(&node, "big")["bytes_read"].as_u64().unwrap();
        if n == last {
            still += 1;
        } else {
            still = 0;
            last = n;
        }
        if n == READS * LEN {
            break;
        }
    }
    peak = peak.max(rss(pid));
    let growth = peak.saturating_sub(base);
    eprintln!(
        "RSS {} MiB -> peak {} MiB (+{} MiB); {} MiB of READs served before the client read anything",
        base / MIB,
        peak / MIB,
        growth / MIB,
        last / MIB
    );
    assert!(
        growth < 400 * MIB,
        "the daemon grew by {} MiB for one client's unread replies",
        growth / MIB
    );
    // The daemon still answers control commands, and counted the stall.
    assert!(node.status()["peer_id"].is_string());
    let waits = export_metrics(&node, "big")["budget_waits"]
        .as_u64()
        .unwrap();
    assert!(waits > 0, "no request waited for the byte budget");

    // Now the client reads every reply: all arrive, each correct.
    let mut seen = vec![false; READS as usize];
    let mut buf = vec![0u8; LEN as usize];
    for _ in 0..READS {
        let mut head = [0u8; 16];
        s.read_exact(&mut head).unwrap();
        assert_eq!(
            &head[..4],
            &0x6744_6698u32.to_be_bytes(),
            "simple reply magic"
        );
        assert_eq!(
            u32::from_be_bytes(head[4..8].try_into().unwrap()),
            0,
            "error"
        );
        let cookie = u64::from_be_bytes(head[8..16].try_into().unwrap());
        assert!(!std::mem::replace(&mut seen[cookie as usize], true));
        s.read_exact(&mut buf).unwrap();
        assert!(buf == data, "reply {cookie} differs from the image");
    }
    assert!(seen.iter().all(|&x| x));
}

#[test]
fn a_huge_control_line_is_refused_without_buffering_it() {
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("n"), "dc1", None, &[]);
    let pid = node.pid();
    let base = rss(pid);

    let s = UnixStream::connect(node.dir.join("control.sock")).unwrap();
    let mut w = s.try_clone().unwrap();
    // 256 MiB without a newline. The daemon may close the connection early: the write then fails.
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'x'; MIB as usize];
        let mut sent = 0u64;
        for _ in 0..256 {
            if w.write_all(&chunk).is_err() {
                break;
            }
            sent += MIB;
        }
        sent
    });
    let sent = writer.join().unwrap();
    let growth = rss(pid).saturating_sub(base);
    eprintln!(
        "sent {} MiB of one line; daemon RSS +{} MiB",
        sent / MIB,
        growth / MIB
    );
    assert!(
        growth < 64 * MIB,
        "the daemon grew by {} MiB buffering one control line",
        growth / MIB
    );
    // Other control clients are served.
    assert!(node.status()["peer_id"].is_string());
    // The hostile client was told why.
    let mut s = s;
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(
        answer.contains("\"type\":\"error\"") && answer.contains("longer than"),
        "answer to an over-long line: {answer:?}"
    );
}

#[test]
fn out_of_file_descriptors_the_accept_loops_back_off_and_recover() {
    let tmp = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics = format!("127.0.0.1:{port}");
    let node = Node::start(&tmp.path().join("n"), "dc1", None, &["--metrics", &metrics]);
    let pid = node.pid();
    let control = node.dir.join("control.sock");
    // Leave the daemon a few descriptors more than it uses now.
    let limit = open_fds(pid) + 8;
    let out = Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={limit}:{limit}"),
        ])
        .output()
        .expect("running prlimit (util-linux)");
    assert!(
        out.status.success(),
        "prlimit: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Control connections until the daemon has no descriptor left, then more waiting in both
    // listeners' backlogs.
    let mut held = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while open_fds(pid) < limit {
        assert!(
            Instant::now() < deadline,
            "the daemon never ran out of descriptors ({} of {limit} open)\n{}",
            open_fds(pid),
            node.log()
        );
        held.push(UnixStream::connect(&control).unwrap());
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut waiting_tcp = Vec::new();
    for _ in 0..4 {
        held.push(UnixStream::connect(&control).unwrap());
        waiting_tcp.push(std::net::TcpStream::connect(&metrics).unwrap());
    }
    std::thread::sleep(Duration::from_millis(200));
    let before = cpu_time(pid);
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_time(pid) - before;
    eprintln!(
        "out of descriptors ({limit}): the daemon used {used:?} of CPU while connections waited"
    );
    assert!(
        used < Duration::from_millis(500),
        "the daemon burnt {used:?} of CPU while out of descriptors (accept loop spinning?)"
    );
    assert!(
        node.log().contains("accept failed"),
        "the accept failure was not logged:\n{}",
        node.log()
    );

    // Descriptors free again: the daemon serves control and metrics clients.
    drop(held);
    drop(waiting_tcp);
    assert!(node.status()["peer_id"].is_string());
    let mut m = std::net::TcpStream::connect(&metrics).unwrap();
    m.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    m.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    let _ = m.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 200"), "metrics answer: {resp:?}");
}
