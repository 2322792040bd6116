//! A real Linux guest boots from a vmswarm lazy NBD export.
//!
//! The test VM is a Debian bookworm kernel, a busybox initramfs that loads the virtio and ext4
//! modules (resolved from `modules.dep`) and a 512 MiB raw ext4 disk whose `/sbin/init` reads a few
//! files, prints their SHA-256 over the serial console and powers off; most of the disk is data the
//! boot never reads. `scripts/build-test-vm` builds it from Debian packages (with a private
//! `qemu-system-x86_64`, unpacked beside the machine's qemu-utils) and caches it under
//! `target/test-vm/` (or `$VMSWARM_TEST_VM_DIR`); `.ci/install-deps` runs it. Without those assets
//! (no network to Debian's archive the first time) the tests fail and say so: they never pass
//! without booting.
//!
//! What it proves, against real `vmswarm serve` processes on loopback:
//! - the disk is published on node A and mounted lazily on node B, which does not hold it; QEMU's
//!   virtio disk is B's NBD export, so every block the kernel reads is fetched on demand from A;
//! - the guest boots (kernel, initramfs, `switch_root` into the export, `/sbin/init` from it) and
//!   the checksum it prints equals the one computed on the host from the same files;
//! - B fetched only a small fraction of the image (the figure is printed), and still does not
//!   hold it whole;
//! - writable clones (`vmswarm clone`) of that lazily held image boot read-write, two at the same
//!   time from one base: each guest writes a file, a second boot of the same clone (after an
//!   umount and a new mount) reads it back, the other clone does not see it, and the base is
//!   unchanged (a boot from it finds no file; `qemu-img compare` finds every byte of its export
//!   equal to the published disk).
//!
//! QEMU runs under TCG unless `VMSWARM_TEST_VM_ACCEL=kvm` opts in: a `/dev/kvm` that exists may
//! still not work (nested virtualization), and TCG always does. The boot time is printed, never
//! asserted; a guest that has not powered off after `VMSWARM_TEST_VM_TIMEOUT` seconds (default 300)
//! is a failure, not a stuck test.

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{Node, publish};
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// The test VM built by `scripts/build-test-vm`.
struct Assets {
    qemu: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    disk: PathBuf,
    /// Host copies of the files the guest reads, in its reading order.
    boot_read: Vec<PathBuf>,
    kernel_version: String,
}

/// Builds the test VM (a no-op when cached) once per test process; panics with what is missing.
fn assets() -> &'static Assets {
    static ASSETS: OnceLock<Assets> = OnceLock::new();
    ASSETS.get_or_init(|| {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let script = repo.join("scripts/build-test-vm");
        let dir = std::env::var_os("VMSWARM_TEST_VM_DIR").map_or_else(
            || {
                Path::new(env!("CARGO_TARGET_TMPDIR"))
                    .parent()
                    .unwrap()
                    .join("test-vm")
            },
            PathBuf::from,
        );
        let out = Command::new(&script)
            .env("VMSWARM_TEST_VM_DIR", &dir)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "the VM boot test needs a test VM and qemu-system-x86_64, which {} builds from Debian \
             packages into {} (.ci/install-deps runs it; it needs apt-get and Debian's archive \
             the first time), and it failed:\n{}",
            script.display(),
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let info = std::fs::read_to_string(dir.join("info")).expect("test-vm/info");
        let field = |k: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap_or_else(|| panic!("no {k} in test-vm/info:\n{info}"))
                .to_owned()
        };
        let mut boot_read: Vec<PathBuf> = std::fs::read_dir(dir.join("boot-read"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        boot_read.sort(); // the guest's `cat /srv/boot/*` order
        // The PVH entry of the decompressed kernel boots ~2x faster under TCG than the bzImage;
        // VMSWARM_TEST_VM_KERNEL=vmlinuz boots the bzImage instead.
        let kernel = std::env::var("VMSWARM_TEST_VM_KERNEL").unwrap_or_else(|_| "vmlinux".into());
        let a = Assets {
            qemu: std::env::var_os("VMSWARM_QEMU")
                .map_or_else(|| dir.join("qemu-system-x86_64"), PathBuf::from),
            kernel: dir.join(kernel),
            initrd: dir.join("initramfs.cpio.gz"),
            disk: dir.join("disk.raw"),
            boot_read,
            kernel_version: field("kernel"),
        };
        assert_eq!(
            std::fs::metadata(&a.disk).unwrap().len(),
            field("disk_bytes").parse::<u64>().unwrap()
        );
        a
    })
}

/// SHA-256 (hex) of the concatenation of `files`, by the host's coreutils.
fn sha256_of(files: &[PathBuf]) -> String {
    let mut cat = Command::new("cat")
        .args(files)
        .stdout(Stdio::piped())
        .spawn()
        .expect("cat");
    let out = Command::new("sha256sum")
        .stdin(cat.stdout.take().unwrap())
        .output()
        .expect("sha256sum (coreutils)");
    assert!(cat.wait().unwrap().success() && out.status.success());
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

/// A running QEMU; dropping it kills and reaps the process.
struct Guest {
    child: Child,
    console: PathBuf,
    started: Instant,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a finished boot printed.
struct Boot {
    console: String,
    secs: f64,
}

impl Boot {
    /// The rest of the first console line that starts with `marker`.
    fn value(&self, marker: &str) -> Option<&str> {
        self.console
            .lines()
            .find_map(|l| l.find(marker).map(|i| &l[i + marker.len()..]))
            .map(str::trim)
    }
}

/// Boots the test VM with its virtio disk on `drive` (a QEMU NBD URI); `cmdline` is appended to
/// the kernel command line. The serial console goes to `console`.
fn boot(a: &Assets, drive: &str, writable: bool, cmdline: &str, console: &Path) -> Guest {
    let kvm = std::env::var("VMSWARM_TEST_VM_ACCEL").is_ok_and(|v| v == "kvm");
    let (accel, cpu) = if kvm { ("kvm", "host") } else { ("tcg", "max") };
    let log = File::create(console).unwrap();
    let mut drive_opt = format!("file={drive},format=raw,if=virtio");
    if !writable {
        drive_opt.push_str(",readonly=on");
    }
    let append = format!("console=ttyS0 panic=-1 quiet {cmdline}");
    let child = Command::new(&a.qemu)
        .args(["-machine", &format!("q35,accel={accel}"), "-cpu", cpu])
        .args(["-m", "256", "-smp", "1", "-nodefaults", "-no-user-config"])
        .args(["-display", "none", "-serial", "stdio", "-no-reboot"])
        .arg("-kernel")
        .arg(&a.kernel)
        .arg("-initrd")
        .arg(&a.initrd)
        .args(["-append", &append, "-drive", &drive_opt])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "starting {} (built by scripts/build-test-vm, run by .ci/install-deps): {e}",
                a.qemu.display()
            )
        });
    Guest {
        child,
        console: console.to_path_buf(),
        started: Instant::now(),
    }
}

impl Guest {
    /// Waits for the guest to power off and checks it got to the end of its `/sbin/init`.
    fn finish(mut self, what: &str) -> Boot {
        let limit = std::env::var("VMSWARM_TEST_VM_TIMEOUT")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(300);
        let deadline = self.started + Duration::from_secs(limit);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break Some(s);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let secs = self.started.elapsed().as_secs_f64();
        let console = String::from_utf8_lossy(&std::fs::read(&self.console).unwrap()).into_owned();
        let b = Boot { console, secs };
        assert!(
            status.is_some(),
            "{what}: the guest had not powered off after {limit} s (VMSWARM_TEST_VM_TIMEOUT); \
             console:\n{}",
            b.console
        );
        assert!(
            status.unwrap().success() && b.value("VMSWARM-DONE").is_some(),
            "{what}: QEMU exited with {status:?} before the guest's init finished; console:\n{}",
            b.console
        );
        assert!(
            !b.console.contains("VMSWARM-FAIL"),
            "{what}: the guest reported a failure; console:\n{}",
            b.console
        );
        eprintln!("{what}: booted and powered off in {secs:.1} s");
        b
    }
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

fn json_ok(node: &Node, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    serde_json::from_str(&cli_ok(node, &a)).unwrap()
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

fn nbd_uri(sock: &Path, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", sock.display())
}

/// The entry of `image` in `node`'s status.
fn image_status(node: &Node, image: &str) -> Value {
    node.status()["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == image)
        .cloned()
        .unwrap_or_else(|| panic!("no image {image} in status\n{}", node.status()))
}

#[test]
fn a_debian_kernel_boots_from_a_lazy_export_on_a_node_without_the_image() {
    let a_vm = assets();
    let expected = sha256_of(&a_vm.boot_read);
    let disk_bytes = std::fs::metadata(&a_vm.disk).unwrap().len();
    let tmp = tempfile::tempdir().unwrap();
    let a = Node::start(&tmp.path().join("a"), "dc1", None, &[]);
    let b = Node::start(&tmp.path().join("b"), "dc2", Some(&a.addr), &[]);
    let t = Instant::now();
    let image = publish(&a, &a_vm.disk);
    eprintln!("published on A in {:.1} s", t.elapsed().as_secs_f64());
    wait_for_peers(&b, 1);
    assert_eq!(
        b.status()["metrics"]["bytes_in"],
        0,
        "B fetched before the boot"
    );

    let sock = tmp.path().join("b.sock");
    cli_ok(
        &b,
        &[
            "mount",
            &image,
            "--nbd",
            &format!("unix:{}", sock.display()),
            "--name",
            "root",
        ],
    );
    let guest = boot(
        a_vm,
        &nbd_uri(&sock, "root"),
        false,
        "",
        &tmp.path().join("console.log"),
    );
    let booted = guest.finish("lazy boot from node B");

    assert_eq!(
        booted.value("VMSWARM-BOOTED"),
        Some(a_vm.kernel_version.as_str()),
        "{}",
        booted.console
    );
    assert_eq!(
        booted.value("VMSWARM-CHECKSUM"),
        Some(expected.as_str()),
        "the guest read other bytes than the image's; console:\n{}",
        booted.console
    );
    assert_eq!(booted.value("VMSWARM-NOTE"), Some("none"));

    let fetched = b.status()["metrics"]["bytes_in"].as_u64().unwrap();
    let mounts = json_ok(&b, &["mounts"]);
    let st = image_status(&b, &image);
    eprintln!(
        "node B fetched {:.1} MiB of the {} MiB image ({:.2}%) to boot kernel {} in {:.1} s; \
         image on B: {st}; export: {}",
        fetched as f64 / MIB as f64,
        disk_bytes / MIB,
        100.0 * fetched as f64 / disk_bytes as f64,
        a_vm.kernel_version,
        booted.secs,
        mounts[0]["metrics"]
    );
    assert!(
        fetched > 0,
        "B fetched nothing: the boot did not read the export"
    );
    assert!(
        fetched * 10 < disk_bytes,
        "B fetched {fetched} bytes of {disk_bytes}: more than a tenth of the image for a boot that \
         reads a few MiB\n{}",
        b.log()
    );
    assert_eq!(st["complete"], false, "B holds the whole image: {st}");
    assert_eq!(
        image_status(&a, &image)["complete"],
        true,
        "A lost the image"
    );
}

/// Runs a host tool with a hard time limit (a hang is a failure, not a stuck test).
fn run(tool: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new("timeout")
        .arg("300")
        .arg(tool)
        .args(args)
        .stdin(Stdio::null())
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

#[test]
fn writable_clones_boot_together_keep_their_writes_and_leave_the_base_alone() {
    let vm = assets();
    let expected = sha256_of(&vm.boot_read);
    let tmp = tempfile::tempdir().unwrap();
    let a = Node::start(&tmp.path().join("a"), "dc1", None, &[]);
    let b = Node::start(&tmp.path().join("b"), "dc2", Some(&a.addr), &[]);
    let image = publish(&a, &vm.disk);
    wait_for_peers(&b, 1);
    let sock = tmp.path().join("b.sock");
    let sock_arg = format!("unix:{}", sock.display());
    // B learns the image (its manifest) by mounting it lazily; clones of it live on B, and what
    // they do not hold or overwrite is read from the base, fetched on demand from A.
    cli_ok(&b, &["mount", &image, "--nbd", &sock_arg, "--name", "base"]);
    for name in ["vm1", "vm2"] {
        cli_ok(&b, &["clone", &image, "--name", name]);
        cli_ok(&b, &["mount", "--clone", name, "--nbd", &sock_arg]);
    }

    // Two clones of one base boot at the same time, the root mounted read-write; each writes its
    // own note.
    let console = |n: &str| tmp.path().join(format!("{n}.log"));
    let g1 = boot(
        vm,
        &nbd_uri(&sock, "vm1"),
        true,
        "vmswarm.rw vmswarm.write=written-by-vm1",
        &console("vm1-first"),
    );
    let g2 = boot(
        vm,
        &nbd_uri(&sock, "vm2"),
        true,
        "vmswarm.rw vmswarm.write=written-by-vm2",
        &console("vm2-first"),
    );
    let first = [
        g1.finish("clone vm1, first boot (concurrent with vm2)"),
        g2.finish("clone vm2, first boot (concurrent with vm1)"),
    ];
    for (boot, name) in first.iter().zip(["vm1", "vm2"]) {
        assert_eq!(
            boot.value("VMSWARM-CHECKSUM"),
            Some(expected.as_str()),
            "{name}: {}",
            boot.console
        );
        let note = format!("written-by-{name}");
        assert_eq!(boot.value("VMSWARM-WROTE"), Some(note.as_str()));
        assert_eq!(boot.value("VMSWARM-NOTE"), Some(note.as_str()));
    }
    let clones = json_ok(&b, &["mounts"]);
    eprintln!("exports after the first boots: {clones}");

    // The export goes away and comes back: the second boot of vm1 (root mounted read-only, no
    // write asked) reads the note its first boot wrote; vm2's note is not there.
    cli_ok(&b, &["umount", "vm1"]);
    cli_ok(&b, &["mount", "--clone", "vm1", "--nbd", &sock_arg]);
    let again = boot(vm, &nbd_uri(&sock, "vm1"), true, "", &console("vm1-second"))
        .finish("clone vm1, second boot");
    assert_eq!(again.value("VMSWARM-NOTE"), Some("written-by-vm1"));
    assert_eq!(again.value("VMSWARM-WROTE"), None);
    assert_eq!(again.value("VMSWARM-CHECKSUM"), Some(expected.as_str()));

    // The base is untouched: a boot from its export finds no note, and every byte of it is the
    // published file's (which fetches the rest of the image from A).
    let base = boot(vm, &nbd_uri(&sock, "base"), false, "", &console("base"))
        .finish("base image after the clones' boots");
    assert_eq!(base.value("VMSWARM-NOTE"), Some("none"));
    assert_eq!(base.value("VMSWARM-CHECKSUM"), Some(expected.as_str()));
    let disk = vm.disk.to_str().unwrap();
    let out = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &nbd_uri(&sock, "base"),
            disk,
        ],
    );
    assert!(
        out.status.success(),
        "the base export differs from the published disk\n{}",
        b.log()
    );
    // ...while a clone does differ from it.
    let out = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &nbd_uri(&sock, "vm2"),
            disk,
        ],
    );
    assert_eq!(out.status.code(), Some(1), "clone vm2 reads as the base");
    let verify: Value = serde_json::from_slice(&b.cli(&["verify"]).stdout).unwrap();
    assert_eq!(verify["clean"], true, "{verify}");
    assert_eq!(image_status(&b, &image)["complete"], true);
}
