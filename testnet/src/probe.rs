//! Measuring the emulated network itself: round-trip time (UDP echo) and throughput (one TCP
//! stream) between two nodes' namespaces, so tests and users can check that the WAN emulator and
//! the NIC shaping do what `up` was told.
//!
//! `probe` starts `probe-serve` in the target node's namespace and `probe-client` in the source
//! node's namespace (both are this binary) and prints what the client measured.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::plan::NodePlan;
use crate::state::State;

/// Port the probe server listens on (UDP and TCP), inside the target's namespace.
pub const PROBE_PORT: u16 = 9555;

/// What the probe measured.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ProbeResult {
    /// Round-trip times in milliseconds (rtt probe).
    pub rtt_ms: Vec<f64>,
    /// Bytes received by the server (throughput probe).
    pub bytes: u64,
    /// Seconds from the server's first received byte to end of stream.
    pub seconds: f64,
    /// bytes * 8 / seconds.
    pub bits_per_second: f64,
}

/// Serves UDP echo and a TCP byte sink on `bind` for at most `lifetime`.
pub fn serve(bind: SocketAddr, lifetime: Duration) -> anyhow::Result<()> {
    let udp = UdpSocket::bind(bind).with_context(|| format!("binding UDP {bind}"))?;
    let tcp = TcpListener::bind(bind).with_context(|| format!("binding TCP {bind}"))?;
    let end = Instant::now() + lifetime;
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        udp.set_read_timeout(Some(Duration::from_millis(200))).ok();
        while Instant::now() < end {
            if let Ok((n, from)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(&buf[..n], from);
            }
        }
    });
    println!("ready");
    std::io::stdout().flush()?;
    tcp.set_nonblocking(true)?;
    while Instant::now() < end {
        match tcp.accept() {
            Ok((mut s, _)) => {
                s.set_nonblocking(false)?;
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                let mut first = None;
                loop {
                    let n = s.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    first.get_or_insert_with(Instant::now);
                    total += n as u64;
                }
                let secs = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
                writeln!(s, "{total} {secs}")?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// `count` UDP echoes to `to`, one at a time.
pub fn client_rtt(to: SocketAddr, count: usize) -> anyhow::Result<ProbeResult> {
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    sock.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut rtts = Vec::new();
    let mut buf = [0u8; 64];
    for i in 0..count as u64 {
        let t = Instant::now();
        sock.send_to(&i.to_be_bytes(), to)?;
        loop {
            let (n, _) = sock
                .recv_from(&mut buf)
                .with_context(|| format!("no echo from {to} within 3 s"))?;
            if n == 8 && buf[..8] == i.to_be_bytes() {
                break;
            }
        }
        rtts.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(ProbeResult {
        rtt_ms: rtts,
        bytes: 0,
        seconds: 0.0,
        bits_per_second: 0.0,
    })
}

/// Sends `bytes` over one TCP connection to `to`; the server reports what it received and when.
pub fn client_throughput(to: SocketAddr, bytes: u64) -> anyhow::Result<ProbeResult> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))
        .with_context(|| format!("connecting to {to}"))?;
    let chunk = vec![0x5au8; 64 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        s.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    s.shutdown(Shutdown::Write)?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    let mut it = line.split_whitespace();
    let got: u64 = it.next().context("empty reply")?.parse()?;
    let seconds: f64 = it.next().context("short reply")?.parse()?;
    if got != bytes {
        bail!("server received {got} of {bytes} bytes");
    }
    Ok(ProbeResult {
        rtt_ms: Vec::new(),
        bytes: got,
        seconds,
        bits_per_second: if seconds > 0.0 {
            got as f64 * 8.0 / seconds
        } else {
            0.0
        },
    })
}

/// Kills and reaps the probe server when dropped.
struct ServerGuard(Child);

impl Drop for ServerGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn in_node(state: &State, node: &NodePlan, exe: &Path) -> Command {
    if state.plan.netns {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &node.netns]).arg(exe);
        c
    } else {
        Command::new(exe)
    }
}

/// What to measure.
#[derive(Debug, Clone, Copy)]
pub enum Measure {
    /// `count` round trips.
    Rtt(usize),
    /// One stream of this many bytes.
    Throughput(u64),
}

/// Measures between two nodes of a running testnet.
pub fn probe(
    state: &State,
    exe: &Path,
    from: &NodePlan,
    to: &NodePlan,
    what: Measure,
) -> anyhow::Result<ProbeResult> {
    // In loopback mode every node shares 127.0.0.1, so the port must not collide with node ports.
    let addr = SocketAddr::from((to.addr, PROBE_PORT));
    let mut server = ServerGuard(
        in_node(state, to, exe)
            .args([
                "probe-serve",
                "--bind",
                &addr.to_string(),
                "--lifetime-s",
                "120",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the probe server")?,
    );
    let stdout = server.0.stdout.take().context("probe server stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    if line.trim() != "ready" {
        bail!("probe server did not start (said {line:?})");
    }
    let mut client = in_node(state, from, exe);
    client.arg("probe-client").arg("--to").arg(addr.to_string());
    match what {
        Measure::Rtt(n) => client.args(["--rtt", &n.to_string()]),
        Measure::Throughput(b) => client.args(["--bytes", &b.to_string()]),
    };
    let out = client
        .stdin(Stdio::null())
        .output()
        .context("running the probe client")?;
    if !out.status.success() {
        bail!(
            "probe client failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("parsing the probe client's output")
}
