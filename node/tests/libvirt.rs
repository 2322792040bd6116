//! libvirt/QEMU integration as documented in docs/libvirt.md, against a real `vmswarm serve`.
//!
//! - The checked-in domain XML (`packaging/libvirt/*.xml`) is valid libvirt domain XML
//!   (`virt-xml-validate FILE domain`; a domain with a bogus element is shown to fail; without the
//!   tool, well-formedness with `xmllint`; without either the check says SKIPPED).
//! - Its NBD disk (export name, host, port) is what `vmswarm mount` prints for the documented mount
//!   command, and docs/libvirt.md shows the same values.
//! - The documented QEMU forms work against that export: `qemu-img info nbd://HOST:PORT/NAME`,
//!   `qemu-io -r -f raw` reads of the right bytes, the `json:` / `-blockdev` form libvirt generates,
//!   writes refused on the read-only export, and written and read back on the clone's (the image
//!   itself unchanged).
//!
//! The documented TCP ports are used when free; if another process holds one, a free port stands in
//! (said on stderr) and everything else is checked the same. The daemon is killed and the temp dir
//! removed on drop, also when an assertion fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{Node, publish};

const BLOCK: usize = 4096;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("node/ has a parent")
        .to_path_buf()
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs a tool with a hard time limit (a hang is a failure, not a stuck test).
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

/// Whether a qemu-io run succeeded and reported no failed command.
fn qemu_io_ok(out: &Output) -> bool {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.status.success() && !text.contains("failed") && !text.contains("Pattern verification")
}

/// The domain XML files of docs/libvirt.md.
fn domains() -> [PathBuf; 2] {
    let dir = repo().join("packaging/libvirt");
    [
        dir.join("vmswarm-readonly.xml"),
        dir.join("vmswarm-clone.xml"),
    ]
}

/// The value of attribute `attr` in the first `<tag ...>` of `xml` that has it.
fn attr(xml: &str, tag: &str, attr: &str) -> String {
    let open = format!("<{tag} ");
    for (i, _) in xml.match_indices(&open) {
        let rest = &xml[i..];
        let end = rest.find('>').expect("a tag ends");
        let tag_text = &rest[..end];
        let key = format!("{attr}='");
        if let Some(j) = tag_text.find(&key) {
            let v = &tag_text[j + key.len()..];
            return v[..v.find('\'').expect("a quoted value")].to_owned();
        }
    }
    panic!("no <{tag} {attr}=...> in the domain XML");
}

/// The NBD disk of a domain: export name, host, port, read-only.
#[derive(Debug)]
struct NbdDisk {
    name: String,
    host: String,
    port: u16,
    readonly: bool,
}

fn nbd_disk(path: &Path) -> NbdDisk {
    let xml = std::fs::read_to_string(path).unwrap();
    assert!(
        xml.contains("<disk type='network' device='disk'>")
            && xml.contains("<source protocol='nbd' name='")
            && xml.contains("<driver name='qemu' type='raw'"),
        "{}: not an NBD raw network disk",
        path.display()
    );
    assert_eq!(xml.matches("<disk ").count(), 1, "one disk");
    NbdDisk {
        name: attr(&xml, "source", "name"),
        host: attr(&xml, "host", "name"),
        port: attr(&xml, "host", "port").parse().unwrap(),
        readonly: xml.contains("<readonly/>"),
    }
}

#[test]
fn domain_xml_validates() {
    let tmp = tempfile::tempdir().unwrap();
    if have("virt-xml-validate") {
        for d in domains() {
            let out = run("virt-xml-validate", &[d.to_str().unwrap(), "domain"]);
            assert!(out.status.success(), "{} does not validate", d.display());
        }
        // The check can fail: an element libvirt does not know is refused.
        let text = std::fs::read_to_string(&domains()[0]).unwrap();
        let bad = tmp.path().join("bad.xml");
        std::fs::write(&bad, text.replace("<readonly/>", "<readonly/><bogus/>")).unwrap();
        let out = run("virt-xml-validate", &[bad.to_str().unwrap(), "domain"]);
        assert!(!out.status.success(), "virt-xml-validate accepted <bogus/>");
    } else if have("xmllint") {
        eprintln!(
            "virt-xml-validate not installed (libvirt-clients): only well-formedness checked"
        );
        for d in domains() {
            let out = run("xmllint", &["--noout", d.to_str().unwrap()]);
            assert!(out.status.success(), "{} is not well-formed", d.display());
        }
    } else {
        eprintln!("SKIPPED: neither virt-xml-validate nor xmllint is installed");
    }
    let docs = std::fs::read_to_string(repo().join("docs/libvirt.md")).unwrap();
    for d in domains() {
        let disk = nbd_disk(&d);
        for shown in [
            format!("<source protocol='nbd' name='{}'>", disk.name),
            format!("<host name='{}' port='{}'/>", disk.host, disk.port),
            format!("nbd://{}:{}/{}", disk.host, disk.port, disk.name),
            format!("--nbd tcp:{}:{}", disk.host, disk.port),
        ] {
            assert!(docs.contains(&shown), "docs/libvirt.md lacks {shown}");
        }
    }
}

/// The documented port if it is free, else a free one.
fn port_for(documented: u16) -> u16 {
    if std::net::TcpListener::bind(("127.0.0.1", documented)).is_ok() {
        return documented;
    }
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    eprintln!("port {documented} is in use: testing on {free} instead");
    free
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

/// Block `b`'s fill byte in the test image (never 0, so `read -P` checks real data).
fn pattern(b: usize) -> u8 {
    (b % 251) as u8 + 1
}

#[test]
fn documented_qemu_command_lines_boot_from_a_real_export() {
    for tool in ["qemu-img", "qemu-io"] {
        assert!(
            have(tool),
            "{tool} is needed (qemu-utils; .ci/install-deps installs it)"
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("n"), "dc1", None, &[]);
    let size = 3 << 20;
    let mut data = vec![0u8; size];
    for (b, block) in data.chunks_mut(BLOCK).enumerate() {
        block.fill(pattern(b));
    }
    let file = tmp.path().join("debian12.raw");
    std::fs::write(&file, &data).unwrap();
    let image = publish(&node, &file);
    let [ro, rw] = domains().map(|d| nbd_disk(&d));
    assert!(ro.readonly && !rw.readonly, "{ro:?} {rw:?}");
    assert_eq!(ro.host, "127.0.0.1");

    // Read-only boot: `vmswarm mount IMAGE_ID --nbd tcp:HOST:PORT --name NAME`.
    let port = port_for(ro.port);
    let printed = cli_ok(
        &node,
        &[
            "mount",
            &image,
            "--nbd",
            &format!("tcp:{}:{port}", ro.host),
            "--name",
            &ro.name,
        ],
    );
    let url = format!("nbd://{}:{port}/{}", ro.host, ro.name);
    assert_eq!(
        printed.trim(),
        format!(
            "exported {} ({size} bytes, read-only, prefetch none) at {url}",
            ro.name
        )
    );
    let out = run("qemu-img", &["info", "--output=json", &url]);
    assert!(out.status.success());
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["virtual-size"], size as u64, "{info}");
    for b in [0, 1, size / BLOCK - 1] {
        let cmd = format!("read -P {} {} {BLOCK}", pattern(b), b * BLOCK);
        assert!(qemu_io_ok(&run(
            "qemu-io",
            &["-r", "-f", "raw", "-c", &cmd, &url]
        )));
    }
    // What libvirt passes QEMU for the domain's disk (-blockdev nbd + raw), as a json: filename.
    let blockdev = format!(
        r#"json:{{"driver":"raw","file":{{"driver":"nbd","server":{{"type":"inet","host":"{}","port":"{port}"}},"export":"{}"}}}}"#,
        ro.host, ro.name
    );
    let cmd = format!("read -P {} 0 {BLOCK}", pattern(0));
    assert!(qemu_io_ok(&run("qemu-io", &["-r", "-c", &cmd, &blockdev])));
    // The export is read-only: a write is refused.
    let out = run("qemu-io", &["-f", "raw", "-c", "write -P 7 0 4096", &url]);
    assert!(
        !qemu_io_ok(&out),
        "a write to the read-only export succeeded"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Permission denied") || stderr.contains("read-only"),
        "refused for another reason: {stderr}"
    );

    // Clone boot: `vmswarm clone IMAGE_ID --name NAME`, `vmswarm mount --clone NAME --nbd ...`.
    cli_ok(&node, &["clone", &image, "--name", &rw.name]);
    let port = port_for(rw.port);
    let printed = cli_ok(
        &node,
        &[
            "mount",
            "--clone",
            &rw.name,
            "--nbd",
            &format!("tcp:{}:{port}", rw.host),
            "--prefetch=profile",
        ],
    );
    let url = format!("nbd://{}:{port}/{}", rw.host, rw.name);
    assert_eq!(
        printed.trim(),
        format!(
            "exported {} ({size} bytes, writable clone, prefetch profile) at {url}",
            rw.name
        )
    );
    let out = run("qemu-img", &["info", "--output=json", &url]);
    assert!(out.status.success());
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["virtual-size"], size as u64, "{info}");
    // The guest writes block 1 and reads it back; block 0 is the image's.
    let write = format!("write -P 201 {BLOCK} {BLOCK}");
    assert!(qemu_io_ok(&run(
        "qemu-io",
        &["-f", "raw", "-c", &write, &url]
    )));
    let read_back = format!("read -P 201 {BLOCK} {BLOCK}");
    let read_base = format!("read -P {} 0 {BLOCK}", pattern(0));
    assert!(qemu_io_ok(&run(
        "qemu-io",
        &["-r", "-f", "raw", "-c", &read_back, "-c", &read_base, &url]
    )));
    // The image (its read-only export) is unchanged.
    let ro_url = format!("nbd://{}:{}/{}", ro.host, port_of(&node, &ro.name), ro.name);
    let read_orig = format!("read -P {} {BLOCK} {BLOCK}", pattern(1));
    assert!(qemu_io_ok(&run(
        "qemu-io",
        &["-r", "-f", "raw", "-c", &read_orig, &ro_url]
    )));
    cli_ok(&node, &["umount", &rw.name]);
    cli_ok(&node, &["umount", &ro.name]);
}

/// The TCP port of export `name` (from `mounts --json`).
fn port_of(node: &Node, name: &str) -> u16 {
    let out = cli_ok(node, &["mounts", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let text = v.to_string();
    let uri = v
        .as_array()
        .or_else(|| v["mounts"].as_array())
        .and_then(|m| m.iter().find(|m| m["name"] == name))
        .and_then(|m| m["uri"].as_str())
        .unwrap_or_else(|| panic!("no export {name} in {text}"))
        .to_owned();
    let after = uri.strip_prefix("nbd://127.0.0.1:").expect("a TCP export");
    after[..after.find('/').unwrap()].parse().unwrap()
}
