//! The `vmswarm` command line against real daemons: where `pull -o` may write, `--chunk-size`
//! limits, unbindable listen addresses, a closed stdout, clones of unknown images, and bootstrap
//! peers that never answer; and without a daemon: `--version` and `completions`.

mod common;

use std::os::unix::fs::FileTypeExt;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, Node, make_image, publish, seed};

const MIB: usize = 1 << 20;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A child process killed and reaped on drop (also when the test fails).
struct Reaped(Option<Child>);

impl Reaped {
    /// Waits for the process to exit by itself (60 s at most, then kills it and panics).
    fn wait(&mut self) -> Output {
        let Some(mut child) = self.0.take() else {
            panic!("waited twice");
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if child.try_wait().unwrap().is_some() {
                return child.wait_with_output().unwrap();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!("vmswarm did not exit: {}", stderr(&out));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn images_of(node: &Node) -> usize {
    let out = node.cli(&["images", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .len()
}

#[test]
fn pull_output_replaces_only_regular_files_and_refuses_the_rest_before_fetching() {
    let seed = seed();
    let tmp = tempfile::tempdir().unwrap();
    let a = Node::start(&tmp.path().join("a"), "dc1", None, &[]);
    let b = Node::start(&tmp.path().join("b"), "dc1", Some(&a.addr), &[]);
    let file = tmp.path().join("disk.raw");
    let data = make_image(&file, 3 * MIB, seed);
    let image = publish(&a, &file);
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();

    // Things a rename must not replace. A character device of our own (root only), not /dev/null.
    let dev = out.join("null-dev");
    let have_dev = Command::new("mknod")
        .arg(&dev)
        .args(["c", "1", "3"])
        .status()
        .is_ok_and(|s| s.success());
    if !have_dev {
        eprintln!("cannot mknod (not root?): skipping the character device case");
    }
    let fifo = out.join("fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let dir = out.join("dir");
    std::fs::create_dir(&dir).unwrap();
    let dangling = out.join("dangling");
    std::os::unix::fs::symlink(out.join("missing"), &dangling).unwrap();
    let fifo_link = out.join("fifo-link");
    std::os::unix::fs::symlink(&fifo, &fifo_link).unwrap();

    let mut refused = vec![
        (fifo.clone(), "FIFO"),
        (dir.clone(), "directory"),
        (dangling.clone(), "symlink"),
        (fifo_link.clone(), "FIFO"),
    ];
    if have_dev {
        refused.push((dev.clone(), "character device"));
    }
    for (path, what) in &refused {
        let res = b.cli(&["pull", &image, "-o", path.to_str().unwrap()]);
        let err = stderr(&res);
        assert!(
            !res.status.success(),
            "pull -o {} succeeded",
            path.display()
        );
        assert!(
            err.contains(what) && err.contains(out.to_str().unwrap()),
            "pull -o {}: unclear error {err:?}",
            path.display()
        );
    }
    // Nothing was fetched for any of them, and nothing is left beside them.
    assert_eq!(images_of(&b), 0, "a refused pull fetched the image");
    assert!(
        std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo()
    );
    assert!(std::fs::metadata(&dir).unwrap().is_dir());
    assert!(std::fs::read_link(&dangling).is_ok());
    assert_eq!(std::fs::read_link(&fifo_link).unwrap(), fifo);
    if have_dev {
        let t = std::fs::symlink_metadata(&dev).unwrap().file_type();
        assert!(t.is_char_device(), "the device node was replaced");
    }
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut expected = vec!["dangling", "dir", "fifo", "fifo-link"];
    if have_dev {
        expected.push("null-dev");
    }
    assert_eq!(names, expected);

    // A symlink to a regular file: the file gets the image, the link stays a link.
    let target = out.join("target.img");
    std::fs::write(&target, b"old contents").unwrap();
    let link = out.join("link.img");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let res = b.cli(&["pull", &image, "-o", link.to_str().unwrap()]);
    assert!(res.status.success(), "{}", stderr(&res));
    assert_eq!(std::fs::read_link(&link).unwrap(), target);
    assert!(std::fs::read(&target).unwrap() == data, "wrong contents");

    // An existing regular file is replaced (a new inode: renamed into place), contents right.
    let plain = out.join("plain.img");
    std::fs::write(&plain, b"old contents").unwrap();
    let res = b.cli(&["pull", &image, "-o", plain.to_str().unwrap()]);
    assert!(res.status.success(), "{}", stderr(&res));
    assert!(std::fs::read(&plain).unwrap() == data, "wrong contents");
    assert!(!out.join("plain.img.vmswarm-partial").exists());
}

#[test]
fn absurd_chunk_sizes_are_refused_with_the_allowed_range() {
    let seed = seed();
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("n"), "dc1", None, &[]);
    let file = tmp.path().join("disk.raw");
    make_image(&file, MIB, seed);
    // 2^44 MiB + 1 MiB is 1 MiB after a u64 wrap-around.
    for size in [
        "17592186044417MiB",
        "18446744073709551615",
        "0",
        "4GiB",
        "3KiB",
        "100000",
    ] {
        let res = node.cli(&["publish", file.to_str().unwrap(), "--chunk-size", size]);
        let err = stderr(&res);
        assert!(!res.status.success(), "--chunk-size {size} was accepted");
        assert!(
            err.contains("64KiB") && err.contains("16MiB"),
            "--chunk-size {size}: {err:?}"
        );
    }
    assert_eq!(images_of(&node), 0);
}

#[test]
fn an_unbindable_listen_address_names_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    // TEST-NET-1: assigned to no interface, so binding fails; no packet is sent.
    let addr = "/ip4/192.0.2.1/udp/0/quic-v1";
    let mut child = Reaped(Some(
        Command::new(BIN)
            .arg("--data")
            .arg(tmp.path())
            .args(["serve", "--listen", addr])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    let out = child.wait();
    let err = stderr(&out);
    assert!(!out.status.success(), "serve on {addr} started: {err}");
    let prefix = format!("cannot listen on {addr}: ");
    let reason = err
        .lines()
        .find_map(|l| l.split_once(&prefix).map(|(_, r)| r.trim().to_owned()))
        .unwrap_or_else(|| panic!("no listen error in {err:?}"));
    assert!(!reason.is_empty(), "empty reason: {err:?}");
}

#[test]
fn a_closed_stdout_ends_commands_quietly() {
    let seed = seed();
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("n"), "dc1", None, &[]);
    let file = tmp.path().join("disk.raw");
    make_image(&file, MIB, seed);
    let image = publish(&node, &file);
    for args in [
        vec!["images"],
        vec!["images", "--json"],
        vec!["status"],
        vec!["verify"],
        vec!["pull", image.as_str()],
    ] {
        let mut child = Command::new(BIN)
            .arg("--data")
            .arg(&node.dir)
            .args(&args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Close the read end before the command has its answer (`| head -0`).
        drop(child.stdout.take());
        let out = Reaped(Some(child)).wait();
        let err = stderr(&out);
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
        assert!(out.status.success(), "{args:?}: {:?} {err}", out.status);
    }
}

#[test]
fn a_clone_of_an_unknown_image_is_refused_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("n"), "dc1", None, &[]);
    let unknown = "ab".repeat(32);
    let res = node.cli(&["clone", &unknown, "--name", "vm1"]);
    let err = stderr(&res);
    assert!(
        !res.status.success(),
        "a clone of an unknown image was created"
    );
    assert!(err.contains(&unknown), "{err:?}");
    let clones = node.dir.join("clones");
    let left: Vec<_> = std::fs::read_dir(&clones)
        .map(|rd| rd.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "left behind in {}: {left:?}",
        clones.display()
    );
}

#[test]
fn a_bootstrap_peer_that_never_answers_is_warned_about() {
    let tmp = tempfile::tempdir().unwrap();
    // A real node's address and peer id, then the node is gone.
    let mut gone = Node::start(&tmp.path().join("gone"), "dc1", None, &[]);
    let addr = gone.addr.clone();
    assert!(gone.stop());
    let node = Node::start(&tmp.path().join("n"), "dc1", Some(&addr), &[]);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let log = node.log();
        if log
            .lines()
            .any(|l| l.contains("has not answered") && l.contains(&addr))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no warning about bootstrap {addr}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = node.status();
    assert_eq!(status["bootstrap"][0]["addr"], addr.as_str());
    assert_eq!(status["bootstrap"][0]["connected"], false);
}

#[test]
fn version_names_the_protocol_and_manifest_format_versions() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        text.trim_end(),
        format!(
            "vmswarm {} (protocol {}, manifest format {})",
            env!("CARGO_PKG_VERSION"),
            vmswarm_protocol::wire::PROTOCOL_VERSION,
            vmswarm_protocol::manifest::FORMAT_VERSION
        )
    );
    // Pinned: changing either version is a compatibility decision, not a refactor.
    assert!(text.contains("(protocol 1, manifest format 1)"), "{text}");
}

#[test]
fn completions_print_a_script_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(BIN)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(
            script.contains("vmswarm") && script.contains("publish") && script.contains("stage"),
            "{shell}: {script}"
        );
    }
    let out = Command::new(BIN)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("bash"), "{}", stderr(&out));
}
