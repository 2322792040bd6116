//! Packaging: what an operator installs is what the code accepts.
//!
//! - `packaging/vmswarm.toml` (the packaged `/etc/vmswarm/vmswarm.toml`) loads with the node's own
//!   config loader, its active values are exactly the built-in defaults, and with its `#key = value`
//!   examples uncommented it sets every field the loader accepts (an exhaustive destructuring
//!   breaks this test's build when a field is added, until the file documents it);
//! - `packaging/systemd/vmswarm.service` passes `systemd-analyze verify` with no complaint (the tool
//!   exits 0 even on unknown keys, so its output is checked; a unit with a typo is shown to fail);
//! - `vmswarm serve` under `Type=notify` semantics: with `$NOTIFY_SOCKET` set it sends `READY=1`
//!   only once `status` answers (control socket and listen address up), and `STOPPING=1` on SIGTERM;
//! - `scripts/build-deb` builds a .deb from this test's binary that `dpkg-deb` accepts, whose
//!   extracted `/usr/bin/vmswarm` runs, and which publishes and pulls an image with the packaged
//!   config; as root with `VMSWARM_TEST_DPKG_INSTALL=1` the package is also installed with
//!   `dpkg -i` and purged again (also when the test fails).
//!
//! Every daemon is killed and every temp dir removed on drop, also when an assertion fails.

mod common;

use std::io::ErrorKind;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::BIN;
use vmswarm_node::config::{self, FetchTuning, FileConfig, ServeTuning};

/// The repository's root (node/..).
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("node/ has a parent")
        .to_path_buf()
}

fn packaged_config() -> PathBuf {
    repo().join("packaging/vmswarm.toml")
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn packaged_config_shows_the_builtin_defaults() {
    let c = FileConfig::load(&packaged_config()).unwrap_or_else(|e| panic!("{e}"));
    let fetch = vmswarm_protocol::fetch::Config::default();
    let serve = vmswarm_protocol::serve::Config::default();
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap();
    // Exhaustive: a new field must be added here (and to the file).
    let FileConfig {
        data,
        listen,
        site,
        bootstrap,
        metrics,
        origin,
        fetch: f,
        serve: s,
    } = c.clone();
    assert_eq!(data, None, "data has no default: an example only");
    assert_eq!(
        listen,
        vec![config::DEFAULT_LISTEN.parse::<libp2p::Multiaddr>().unwrap()]
    );
    assert_eq!(site.as_deref(), Some(config::DEFAULT_SITE));
    assert!(bootstrap.is_empty(), "bootstrap has no default");
    assert_eq!(metrics, None, "metrics has no default");
    assert!(!origin);
    let FetchTuning {
        max_in_flight_per_peer,
        request_timeout_ms,
        demand_deadline_ms,
        unavailable_deadline_ms,
        manifest_timeout_ms,
        site_gateways,
    } = f;
    assert_eq!(max_in_flight_per_peer, Some(fetch.max_in_flight_per_peer));
    assert_eq!(request_timeout_ms, Some(ms(fetch.request_timeout)));
    assert_eq!(demand_deadline_ms, Some(ms(fetch.demand_deadline)));
    assert_eq!(
        unavailable_deadline_ms,
        Some(ms(fetch.unavailable_deadline))
    );
    assert_eq!(
        manifest_timeout_ms,
        Some(config::DEFAULT_MANIFEST_TIMEOUT_MS)
    );
    assert_eq!(site_gateways, Some(fetch.site_gateways));
    let ServeTuning {
        demand_fanout,
        origin_demand_fanout,
        fanout_from_rates,
        background_fanout,
        max_active_uploads,
    } = s;
    assert_eq!(demand_fanout, Some(serve.demand_fanout));
    assert_eq!(origin_demand_fanout, Some(serve.origin_demand_fanout));
    assert_eq!(fanout_from_rates, Some(serve.fanout_from_rates));
    assert_eq!(background_fanout, Some(serve.background_fanout));
    assert_eq!(max_active_uploads, Some(serve.max_active_uploads));

    // Applying the file changes nothing either.
    let mut applied = vmswarm_protocol::fetch::Config::default();
    c.apply(&mut applied);
    assert_eq!(applied, fetch);
    let mut applied = vmswarm_protocol::serve::Config::default();
    c.apply_serve(&mut applied);
    assert_eq!(applied, serve);
    assert_eq!(
        FileConfig::default().manifest_timeout(),
        c.manifest_timeout()
    );
}

#[test]
fn packaged_config_examples_set_every_field() {
    let text = std::fs::read_to_string(packaged_config()).unwrap();
    let mut examples = 0;
    let uncommented: String = text
        .lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest) if rest.starts_with(|c: char| c.is_ascii_lowercase()) => {
                examples += 1;
                rest
            }
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(examples, 3, "data, bootstrap and metrics have examples");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("all.toml");
    std::fs::write(&p, uncommented).unwrap();
    let c = FileConfig::load(&p).unwrap_or_else(|e| panic!("{e}"));
    let FileConfig {
        data,
        listen,
        site,
        bootstrap,
        metrics,
        origin: _,
        fetch,
        serve,
    } = c;
    assert!(data.is_some() && site.is_some() && metrics.is_some());
    assert!(!listen.is_empty() && !bootstrap.is_empty());
    assert!(
        bootstrap[0]
            .iter()
            .any(|p| matches!(p, libp2p::multiaddr::Protocol::P2p(_))),
        "a bootstrap address names its peer"
    );
    let FetchTuning {
        max_in_flight_per_peer,
        request_timeout_ms,
        demand_deadline_ms,
        unavailable_deadline_ms,
        manifest_timeout_ms,
        site_gateways,
    } = fetch;
    assert!(max_in_flight_per_peer.is_some() && request_timeout_ms.is_some());
    assert!(demand_deadline_ms.is_some() && unavailable_deadline_ms.is_some());
    assert!(manifest_timeout_ms.is_some() && site_gateways.is_some());
    let ServeTuning {
        demand_fanout,
        origin_demand_fanout,
        fanout_from_rates,
        background_fanout,
        max_active_uploads,
    } = serve;
    assert!(demand_fanout.is_some() && origin_demand_fanout.is_some());
    assert!(fanout_from_rates.is_some() && background_fanout.is_some());
    assert!(max_active_uploads.is_some());
}

/// Runs `systemd-analyze verify` on `unit` (a copy whose ExecStart names `bin`); returns its
/// complaints about that unit.
fn verify_unit(unit_text: &str, bin: &Path) -> String {
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("vmswarm.service");
    let text = unit_text.replace("/usr/bin/vmswarm", bin.to_str().unwrap());
    std::fs::write(&unit, text).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("vmswarm.service"))
        .collect();
    if !out.status.success() {
        return format!("exit {}: {stderr}", out.status);
    }
    complaints.join("\n")
}

#[test]
fn systemd_unit_verifies() {
    if !have("systemd-analyze") {
        eprintln!("SKIPPED: systemd-analyze not installed");
        return;
    }
    let text = std::fs::read_to_string(repo().join("packaging/systemd/vmswarm.service")).unwrap();
    for key in [
        "Type=notify",
        "ExecStart=/usr/bin/vmswarm --data %S/vmswarm serve --config /etc/vmswarm/vmswarm.toml",
        "Restart=on-failure",
        "StateDirectory=vmswarm",
        "RuntimeDirectory=vmswarm",
        "ProtectSystem=strict",
        "DynamicUser=yes",
    ] {
        assert!(text.lines().any(|l| l == key), "the unit lacks {key}");
    }
    let complaints = verify_unit(&text, Path::new(BIN));
    assert!(
        complaints.is_empty(),
        "systemd-analyze verify: {complaints}"
    );
    // The check can fail: a typo is reported.
    let typo = text.replace("PrivateTmp=yes", "PrivatTmp=yes");
    assert!(
        verify_unit(&typo, Path::new(BIN)).contains("PrivatTmp"),
        "systemd-analyze verify did not notice an unknown key"
    );
}

/// A child process killed and reaped on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits (30 s at most, as a hang guard) for a notification containing `want`; returns every
/// message seen until then.
fn await_notification(sock: &UnixDatagram, want: &str, daemon: &mut Proc, log: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    loop {
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                seen.push_str(&msg);
                seen.push('\n');
                if msg.lines().any(|l| l == want) {
                    return seen;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("reading the notify socket: {e}"),
        }
        if let Ok(Some(status)) = daemon.0.try_wait() {
            panic!(
                "daemon exited ({status}) before {want}; got {seen:?}\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "no {want} from the daemon; got {seen:?}\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
}

#[test]
fn serve_notifies_systemd_ready_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let log_path = dir.path().join("daemon.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut daemon = Proc(
        Command::new(BIN)
            .arg("--data")
            .arg(&data)
            .args([
                "serve",
                "--listen",
                "/ip4/127.0.0.1/udp/0/quic-v1",
                "--config",
            ])
            .arg(packaged_config())
            .env("NOTIFY_SOCKET", &sock_path)
            .env("RUST_LOG", "info,libp2p=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let seen = await_notification(&sock, "READY=1", &mut daemon, &log_path);
    assert!(
        seen.contains("STATUS=listening on /ip4/127.0.0.1/udp/"),
        "{seen}"
    );
    // Ready means ready: the control socket answers at once, node.json names the address.
    let out = common::cli(&data, &["status", "--json"]);
    assert!(
        out.status.success(),
        "status right after READY=1: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(data.join("node.json").exists());
    let pid = daemon.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let seen = await_notification(&sock, "STOPPING=1", &mut daemon, &log_path);
    assert!(!seen.contains("READY=1"), "READY=1 sent twice: {seen}");
    let status = daemon.0.wait().unwrap();
    assert!(status.success(), "daemon exit after SIGTERM: {status}");
}

/// Runs a command, panicking with its output unless it succeeds; returns its stdout.
fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Builds the .deb of this test's binary into `out` with scripts/build-deb; returns its path.
fn build_deb(out: &Path) -> PathBuf {
    let stdout = run_ok(
        Command::new(repo().join("scripts/build-deb"))
            .args(["--binary", BIN, "--out"])
            .arg(out)
            .args(["--compression", "none"]),
    );
    let deb = PathBuf::from(
        stdout
            .lines()
            .last()
            .expect("build-deb names the .deb")
            .trim(),
    );
    assert!(deb.is_file(), "{}", deb.display());
    deb
}

/// What the package must hold, with its mode.
const PACKAGED: &[(&str, &str)] = &[
    ("./usr/bin/vmswarm", "-rwxr-xr-x root/root"),
    (
        "./usr/lib/systemd/system/vmswarm.service",
        "-rw-r--r-- root/root",
    ),
    ("./etc/vmswarm/vmswarm.toml", "-rw-r--r-- root/root"),
    ("./usr/share/doc/vmswarm/copyright", "-rw-r--r-- root/root"),
    ("./usr/share/doc/vmswarm/README.md", "-rw-r--r-- root/root"),
    ("./usr/share/doc/vmswarm/libvirt.md", "-rw-r--r-- root/root"),
    (
        "./usr/share/doc/vmswarm/examples/vmswarm-readonly.xml",
        "-rw-r--r-- root/root",
    ),
    (
        "./usr/share/doc/vmswarm/examples/vmswarm-clone.xml",
        "-rw-r--r-- root/root",
    ),
    (
        "./usr/share/bash-completion/completions/vmswarm",
        "-rw-r--r-- root/root",
    ),
];

#[test]
fn deb_package_builds_extracts_and_serves_with_the_packaged_config() {
    for tool in ["dpkg-deb", "dpkg"] {
        if !have(tool) {
            eprintln!("SKIPPED: {tool} not installed (not a Debian system)");
            return;
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let deb = build_deb(&tmp.path().join("out"));
    let version = env!("CARGO_PKG_VERSION");
    let arch = run_ok(Command::new("dpkg").arg("--print-architecture"));
    assert_eq!(
        deb.file_name().unwrap().to_str().unwrap(),
        format!("vmswarm_{version}_{}.deb", arch.trim())
    );

    let info = run_ok(Command::new("dpkg-deb").arg("--info").arg(&deb));
    for field in [
        "Package: vmswarm".to_owned(),
        format!("Version: {version}"),
        format!("Architecture: {}", arch.trim()),
        "Depends: libc6, libgcc-s1".to_owned(),
    ] {
        assert!(
            info.lines().any(|l| l.trim() == field),
            "control lacks {field}:\n{info}"
        );
    }
    let conffiles = run_ok(
        Command::new("dpkg-deb")
            .args(["--info"])
            .arg(&deb)
            .arg("conffiles"),
    );
    assert_eq!(conffiles.trim(), "/etc/vmswarm/vmswarm.toml");
    for script in ["postinst", "prerm", "postrm"] {
        let text = run_ok(Command::new("dpkg-deb").arg("--info").arg(&deb).arg(script));
        assert!(text.starts_with("#!/bin/sh\n"), "{script}: {text}");
        let check = Command::new("sh")
            .arg("-n")
            .arg(repo().join("packaging/debian").join(script))
            .status()
            .unwrap();
        assert!(check.success(), "{script} has a shell syntax error");
    }
    let contents = run_ok(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    for (path, mode) in PACKAGED {
        assert!(
            contents
                .lines()
                .any(|l| l.starts_with(mode) && l.ends_with(path)),
            "{path} ({mode}) not in the package:\n{contents}"
        );
    }

    let root = tmp.path().join("root");
    run_ok(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
    let bin = root.join("usr/bin/vmswarm");
    let v = run_ok(Command::new(&bin).arg("--version"));
    assert!(
        v.starts_with(&format!("vmswarm {version} (protocol ")),
        "{v}"
    );
    let config = root.join("etc/vmswarm/vmswarm.toml");
    assert_eq!(
        std::fs::read(&config).unwrap(),
        std::fs::read(packaged_config()).unwrap()
    );
    let unit = root.join("usr/lib/systemd/system/vmswarm.service");
    assert_eq!(
        std::fs::read(&unit).unwrap(),
        std::fs::read(repo().join("packaging/systemd/vmswarm.service")).unwrap()
    );
    if have("systemd-analyze") {
        let complaints = verify_unit(&std::fs::read_to_string(&unit).unwrap(), &bin);
        assert!(complaints.is_empty(), "packaged unit: {complaints}");
    }

    // One node of the extracted binary with the packaged config (on a loopback port rather than
    // 7400: flags win over the file): publish, then pull the image out of it again.
    let data = tmp.path().join("data");
    let config_arg = config.to_str().unwrap();
    let node = common::daemon::Daemon::start(&common::daemon::Spawn {
        bin: &bin,
        dir: &data,
        site: "dc1",
        bootstrap: None,
        listen: None,
        extra: &["--config", config_arg],
        log_filter: "info,libp2p=warn",
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
    let image_file = tmp.path().join("image.raw");
    let image = common::make_image(&image_file, 5 << 20, common::seed());
    let out = node
        .cli(&["publish", image_file.to_str().unwrap()])
        .unwrap();
    assert!(
        out.status.success(),
        "publish: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        node.log()
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let id = stdout.lines().last().unwrap().trim().to_owned();
    let pulled = tmp.path().join("pulled.raw");
    let out = node
        .cli(&["pull", &id, "-o", pulled.to_str().unwrap()])
        .unwrap();
    assert!(
        out.status.success(),
        "pull: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        node.log()
    );
    assert!(
        std::fs::read(&pulled).unwrap() == image,
        "pulled image differs"
    );
    let status = node.status().unwrap();
    assert_eq!(status["site"], "dc1", "{status}");
}

/// Purges the package when dropped (also when the test fails).
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let out = Command::new("dpkg").args(["--purge", "vmswarm"]).output();
        if let Ok(out) = out {
            eprintln!(
                "dpkg --purge vmswarm: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// `dpkg -i` of the package and `dpkg --purge` again: only as root, in CI (`CI=true`) or with
/// `VMSWARM_TEST_DPKG_INSTALL=1`, and only on a system where no vmswarm package or file is
/// installed (the purge at the end would remove an operator's).
#[test]
fn deb_package_installs_and_purges_cleanly_as_root() {
    let wanted = std::env::var("CI").is_ok_and(|v| v == "true")
        || std::env::var("VMSWARM_TEST_DPKG_INSTALL").is_ok_and(|v| v == "1");
    let root = run_ok(Command::new("id").arg("-u")).trim() == "0";
    if !wanted || !root || !have("dpkg") {
        eprintln!("SKIPPED: needs root and CI=true or VMSWARM_TEST_DPKG_INSTALL=1");
        return;
    }
    let installed = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "vmswarm"])
        .output()
        .unwrap();
    let paths = [
        "/usr/bin/vmswarm",
        "/etc/vmswarm",
        "/usr/lib/systemd/system/vmswarm.service",
        "/var/lib/vmswarm",
        "/var/lib/private/vmswarm",
    ];
    if installed.status.success() && !installed.stdout.is_empty()
        || paths.iter().any(|p| Path::new(p).exists())
    {
        eprintln!("SKIPPED: a vmswarm package or file is already installed here");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let deb = build_deb(&tmp.path().join("out"));
    let purge = Purge;
    run_ok(Command::new("dpkg").arg("-i").arg(&deb));
    let status =
        run_ok(Command::new("dpkg-query").args(["-W", "-f=${Status} ${Version}", "vmswarm"]));
    assert_eq!(
        status,
        format!("install ok installed {}", env!("CARGO_PKG_VERSION"))
    );
    let v = run_ok(Command::new("/usr/bin/vmswarm").arg("--version"));
    assert!(v.starts_with("vmswarm "), "{v}");
    let conffiles = run_ok(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "vmswarm"]));
    assert!(
        conffiles.contains("/etc/vmswarm/vmswarm.toml"),
        "{conffiles}"
    );
    FileConfig::load(Path::new("/etc/vmswarm/vmswarm.toml")).unwrap_or_else(|e| panic!("{e}"));
    // Reinstalling (an upgrade to the same version) keeps working.
    run_ok(Command::new("dpkg").arg("-i").arg(&deb));
    drop(purge);
    for p in paths {
        assert!(!Path::new(p).exists(), "{p} left behind by dpkg --purge");
    }
    let after = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "vmswarm"])
        .output()
        .unwrap();
    let after = String::from_utf8_lossy(&after.stdout);
    assert!(
        after.is_empty() || after.contains("not-installed"),
        "after purge: {after}"
    );
}
