//! The userspace WAN emulator (`vmswarm-testnet wan-emulator`, started by `up` in the router
//! namespace).
//!
//! The kernel here has no netem, so inter-site latency and WAN bandwidth are emulated in a process:
//! the router namespace routes every packet that crosses from one site's bridge towards another site
//! into a TUN device; this process reads it, lets [`model::Wan`] decide when it comes out (or that it
//! is dropped), and writes it back into the TUN device at that time, from where the kernel forwards
//! it to the destination site's bridge. Same-site traffic is switched by the site's bridge and never
//! reaches the emulator.
//!
//! Timing: one thread, `ppoll` with a nanosecond timeout until the next packet is due. The sleep
//! granularity of the kernel (tens of microseconds) is the error on each packet's release time.

pub mod model;
pub mod tun;

use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;

use model::{Wan, WanConfig, WanStats};

/// How often the counters are written to the stats file.
const STATS_INTERVAL: Duration = Duration::from_millis(200);
/// Largest packet the TUN device can hand us (its MTU is 1500; leave room for anything larger).
const MAX_PACKET: usize = 65_536;

/// What the emulator process is told (written by `up` as JSON).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EmulatorSpec {
    /// TUN interface to attach to.
    pub tun: String,
    /// The WAN's behaviour.
    pub wan: WanConfig,
    /// Where to keep writing the counters (JSON of [`WanStats`]).
    pub stats_file: PathBuf,
}

/// Reads the counters an emulator last wrote.
pub fn read_stats(path: &Path) -> anyhow::Result<WanStats> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading WAN counters {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing WAN counters {}", path.display()))
}

fn write_stats(path: &Path, stats: &WanStats) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(stats)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Runs the emulator until the process is killed.
pub fn run(spec: &EmulatorSpec) -> anyhow::Result<()> {
    let mut dev =
        tun::attach(&spec.tun).with_context(|| format!("attaching to TUN device {}", spec.tun))?;
    let mut wan = Wan::new(spec.wan.clone());
    let origin = Instant::now();
    let now = || u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let mut buf = vec![0u8; MAX_PACKET];
    let mut next_stats = Instant::now();
    write_stats(&spec.stats_file, wan.stats())?;
    loop {
        let t = now();
        let until_due = wan
            .poll_timeout()
            .map(|due| Duration::from_nanos(due.saturating_sub(t)));
        let until_stats = next_stats.saturating_duration_since(Instant::now());
        let timeout = until_due.map_or(until_stats, |d| d.min(until_stats));
        if tun::wait_readable(&dev, Some(timeout))? {
            // Read everything queued, stamping each packet with the time it was read.
            loop {
                match dev.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        wan.handle_packet(now(), buf[..n].to_vec());
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e).context("reading from the TUN device"),
                }
            }
        }
        let t = now();
        while let Some(packet) = wan.poll_transmit(t) {
            match dev.write(&packet) {
                Ok(_) => {}
                // The kernel's queue behind the TUN device is full: the packet is lost, as on a
                // congested router.
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e).context("writing to the TUN device"),
            }
        }
        if Instant::now() >= next_stats {
            write_stats(&spec.stats_file, wan.stats())?;
            next_stats = Instant::now() + STATS_INTERVAL;
        }
    }
}
