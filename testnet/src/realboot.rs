//! The demo's last act: a real Linux kernel boots from the swarm.
//!
//! The test VM of `node/tests/vm_boot.rs` (a Debian kernel, a busybox initramfs and a 512 MiB ext4
//! disk, built with a private `qemu-system-x86_64` by `scripts/build-test-vm`) is published on the
//! demo's source node and mounted lazily on a node of the farthest site, which does not hold it;
//! QEMU (TCG) boots it from that node's NBD export across the emulated WAN. The guest prints a
//! checksum of the files it read, checked against the host's; the node's fetched bytes show how
//! little of the disk a boot needs.
//!
//! The VM is looked up in `$VMSWARM_TEST_VM_DIR`, else in the `test-vm/` beside the vmswarm
//! binary's profile directory (`target/test-vm` for `target/release/vmswarm`); when it is missing
//! and `scripts/build-test-vm` is in the working directory, that script builds it. Without it the
//! demo says, loudly, that it skipped the real boot and how to get it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::run::Roles;
use crate::state::State;

/// What the real boot did.
#[derive(Debug, Clone)]
pub struct RealBoot {
    /// The kernel release the guest reported.
    pub kernel: String,
    /// The node whose export the guest booted from, and its site.
    pub node: String,
    /// Its site name.
    pub site: String,
    /// Where the image was published.
    pub source: String,
    /// From QEMU's start to the guest's power-off, s.
    pub secs: f64,
    /// Bytes the node fetched for the boot.
    pub fetched: u64,
    /// The disk's size.
    pub disk_bytes: u64,
}

/// Why there was no real boot: the VM is not available (a skip), or the boot failed (an error).
#[derive(Debug)]
pub enum NoBoot {
    /// The test VM or QEMU is missing; the text says how to get them.
    Missing(String),
    /// Something went wrong.
    Failed(anyhow::Error),
}

/// The test VM's directory, built if missing and the build script is at hand.
fn assets(vmswarm: &Path) -> Result<PathBuf, String> {
    let dir = std::env::var_os("VMSWARM_TEST_VM_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            let profile = vmswarm.canonicalize().ok()?.parent()?.to_path_buf();
            Some(profile.parent()?.join("test-vm"))
        })
        .ok_or("no test VM directory (set VMSWARM_TEST_VM_DIR)")?;
    let ready = |d: &Path| {
        ["info", "qemu-system-x86_64", "vmlinux", "disk.raw"]
            .iter()
            .all(|f| d.join(f).exists())
    };
    if ready(&dir) {
        return Ok(dir);
    }
    let script = Path::new("scripts/build-test-vm");
    if script.exists() {
        eprintln!("== building the test VM with {}", script.display());
        let out = Command::new(script)
            .env("VMSWARM_TEST_VM_DIR", &dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| format!("running {}: {e}", script.display()))?;
        if out.status.success() && ready(&dir) {
            return Ok(dir);
        }
        return Err(format!(
            "scripts/build-test-vm failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Err(format!(
        "no test VM in {} (run scripts/build-test-vm from the repository, as .ci/install-deps \
         does, or set VMSWARM_TEST_VM_DIR)",
        dir.display()
    ))
}

fn vmswarm_cli(bin: &Path, data: &Path, args: &[&str]) -> anyhow::Result<String> {
    let mut full: Vec<&std::ffi::OsStr> = vec!["--data".as_ref(), data.as_os_str()];
    full.extend(args.iter().map(std::ffi::OsStr::new));
    crate::sys::run(bin, &full)
}

/// SHA-256 (hex) of the concatenation of the files in `dir`, in name order (the guest's order).
fn sha256_of_dir(dir: &Path) -> anyhow::Result<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.sort();
    let mut cat = Command::new("cat")
        .args(&files)
        .stdout(Stdio::piped())
        .spawn()
        .context("cat")?;
    let out = Command::new("sha256sum")
        .stdin(cat.stdout.take().context("cat's stdout")?)
        .output()
        .context("sha256sum")?;
    if !cat.wait()?.success() || !out.status.success() || out.stdout.len() < 64 {
        bail!("hashing {} failed", dir.display());
    }
    Ok(String::from_utf8_lossy(&out.stdout[..64]).into_owned())
}

/// A QEMU that is killed and reaped when dropped.
struct Qemu(std::process::Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Publishes the test VM on the first source and boots it from a lazy export on a host of the
/// last site.
pub fn boot(state: &State, roles: &Roles, vmswarm: &Path, out: &Path) -> Result<RealBoot, NoBoot> {
    let dir = assets(vmswarm).map_err(NoBoot::Missing)?;
    boot_from(state, roles, vmswarm, out, &dir).map_err(NoBoot::Failed)
}

fn boot_from(
    state: &State,
    roles: &Roles,
    vmswarm: &Path,
    out: &Path,
    dir: &Path,
) -> anyhow::Result<RealBoot> {
    let source = roles.sources.first().context("no source node")?;
    let far = state.plan.sites.len().saturating_sub(1);
    let host = roles
        .hosts
        .iter()
        .find(|h| h.site == far && h.site != source.site)
        .or_else(|| roles.hosts.iter().find(|h| h.name != source.name))
        .context("no host node apart from the source")?;
    let disk = dir.join("disk.raw");
    let disk_bytes = std::fs::metadata(&disk)?.len();
    let info = std::fs::read_to_string(dir.join("info"))?;
    let expected = sha256_of_dir(&dir.join("boot-read"))?;

    let published = vmswarm_cli(
        vmswarm,
        &state.data_dir(&source.name),
        &["publish", &disk.display().to_string(), "--name", "test-vm"],
    )?;
    let image = published
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_owned();
    let sock = state.dir.join("nbd").join("real-vm.sock");
    std::fs::create_dir_all(sock.parent().unwrap_or(Path::new("/")))?;
    let host_dir = state.data_dir(&host.name);
    let before = fetched_bytes(vmswarm, &host_dir);
    vmswarm_cli(
        vmswarm,
        &host_dir,
        &[
            "mount",
            &image,
            "--nbd",
            &format!("unix:{}", sock.display()),
            "--name",
            "real-vm",
        ],
    )?;

    let console = out.join("real-vm.console.log");
    let log = std::fs::File::create(&console)?;
    let drive = format!(
        "file=nbd+unix:///real-vm?socket={},format=raw,if=virtio,readonly=on",
        sock.display()
    );
    let started = Instant::now();
    let mut qemu = Qemu(
        Command::new(dir.join("qemu-system-x86_64"))
            .args(["-machine", "q35,accel=tcg", "-cpu", "max", "-m", "256"])
            .args(["-smp", "1", "-nodefaults", "-no-user-config", "-no-reboot"])
            .args(["-display", "none", "-serial", "stdio"])
            .arg("-kernel")
            .arg(dir.join("vmlinux"))
            .arg("-initrd")
            .arg(dir.join("initramfs.cpio.gz"))
            .args(["-append", "console=ttyS0 panic=-1 quiet", "-drive", &drive])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the test VM's qemu-system-x86_64")?,
    );
    let deadline = started + Duration::from_secs(300);
    let status = loop {
        if let Some(s) = qemu.0.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            bail!(
                "the guest had not powered off after 300 s; console in {}",
                console.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let secs = started.elapsed().as_secs_f64();
    drop(qemu);
    let text = String::from_utf8_lossy(&std::fs::read(&console)?).into_owned();
    let value = |marker: &str| {
        text.lines().find_map(|l| {
            l.find(marker)
                .map(|i| l[i + marker.len()..].trim().to_owned())
        })
    };
    let fetched = fetched_bytes(vmswarm, &host_dir).saturating_sub(before);
    let _ = vmswarm_cli(vmswarm, &host_dir, &["umount", "real-vm"]);
    if !status.success() || value("VMSWARM-DONE").is_none() {
        bail!(
            "the guest did not finish booting (QEMU {status}); console in {}",
            console.display()
        );
    }
    match value("VMSWARM-CHECKSUM") {
        Some(sum) if sum == expected => {}
        other => bail!(
            "the guest read other bytes than the image's: checksum {other:?}, expected {expected}"
        ),
    }
    Ok(RealBoot {
        kernel: value("VMSWARM-BOOTED").unwrap_or_else(|| {
            info.lines()
                .find_map(|l| l.strip_prefix("kernel="))
                .unwrap_or("?")
                .to_owned()
        }),
        node: host.name.clone(),
        site: state.plan.sites[host.site].clone(),
        source: source.name.clone(),
        secs,
        fetched,
        disk_bytes,
    })
}

fn fetched_bytes(vmswarm: &Path, data: &Path) -> u64 {
    vmswarm_cli(vmswarm, data, &["status", "--json"])
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| v["metrics"]["bytes_in"].as_u64())
        .unwrap_or(0)
}

/// The report's lines for the real boot.
pub fn report(r: &Result<RealBoot, NoBoot>) -> String {
    match r {
        Ok(b) => format!(
            "\n== a real Linux kernel booted from the swarm\n\
             Debian kernel {} + busybox, {} MiB ext4 disk published on {}, booted under QEMU (TCG) \
             from a lazy NBD export on {} ({}), which did not hold it:\n\
             boot to power-off {:.1} s; the guest's checksum of what it read matches; \
             {} fetched {:.1} MiB ({:.1}% of the disk)\n",
            b.kernel,
            b.disk_bytes >> 20,
            b.source,
            b.node,
            b.site,
            b.secs,
            b.node,
            b.fetched as f64 / 1048576.0,
            100.0 * b.fetched as f64 / b.disk_bytes.max(1) as f64
        ),
        Err(NoBoot::Missing(why)) => {
            format!("\n== real Linux kernel boot SKIPPED: {why}\n")
        }
        Err(NoBoot::Failed(e)) => format!("\n== real Linux kernel boot FAILED: {e:#}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_gives_the_figures_or_says_what_is_missing() {
        let ok = report(&Ok(RealBoot {
            kernel: "6.1.0-57-amd64".into(),
            node: "s2n0".into(),
            site: "site2".into(),
            source: "s0n0".into(),
            secs: 6.64,
            fetched: 5 << 20,
            disk_bytes: 512 << 20,
        }));
        assert!(ok.contains("Debian kernel 6.1.0-57-amd64"), "{ok}");
        assert!(ok.contains("boot to power-off 6.6 s"), "{ok}");
        assert!(
            ok.contains("s2n0 fetched 5.0 MiB (1.0% of the disk)"),
            "{ok}"
        );
        let missing = report(&Err(NoBoot::Missing("no test VM in /x".into())));
        assert!(missing.contains("SKIPPED: no test VM in /x"), "{missing}");
        let failed = report(&Err(NoBoot::Failed(anyhow::anyhow!("qemu died"))));
        assert!(failed.contains("FAILED: qemu died"), "{failed}");
    }
}
