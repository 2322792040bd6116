//! Running iproute2/tc, checking processes and namespaces: the testnet's contact with the system.

#![allow(unsafe_code)]

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

/// Runs `program args...`, returning its stdout; a failure names the command and its stderr.
pub fn run<P: AsRef<OsStr>, A: AsRef<OsStr>>(program: P, args: &[A]) -> anyhow::Result<String> {
    let program = program.as_ref();
    let shown = || {
        std::iter::once(program)
            .chain(args.iter().map(AsRef::as_ref))
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} (is it installed?)", program.to_string_lossy()))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            shown(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `program args...` inside network namespace `ns`.
pub fn run_in(ns: &str, program: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut full = vec!["netns", "exec", ns, program];
    full.extend_from_slice(args);
    run("ip", &full)
}

/// Whether the named network namespace exists.
pub fn netns_exists(name: &str) -> bool {
    std::path::Path::new("/run/netns").join(name).exists()
}

/// Every namespace whose name starts with `prefix`.
pub fn netns_with_prefix(prefix: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return Vec::new();
    };
    let mut v: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    v.sort();
    v
}

/// Whether this process may create network namespaces (tries one and deletes it).
pub fn can_create_netns(probe_name: &str) -> bool {
    if run("ip", &["netns", "add", probe_name]).is_err() {
        return false;
    }
    let _ = run("ip", &["netns", "del", probe_name]);
    true
}

/// Whether `pid` runs and its command line contains `marker` (guards against recycled pids).
/// Zombies have an empty command line and count as gone.
pub fn pid_matches(pid: u32, marker: &str) -> bool {
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(raw) => {
            let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
            cmdline.contains(marker)
        }
        Err(_) => false,
    }
}

/// The start time of `pid` (clock ticks after boot, `/proc/<pid>/stat` field 22), unless it is
/// gone or a zombie. Together with the pid it identifies one process for good.
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain anything; fields follow the
    // last ')'. Field 3 is the state, field 22 the start time.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Sends `sig` to `pid`, ignoring a process that is already gone.
pub fn signal(pid: u32, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    if pid <= 0 {
        return;
    }
    // SAFETY: kill(2) has no memory-safety preconditions; a positive pid targets one process.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Live processes (not this one) with an argument that is `dir` or lies under it: what a testnet
/// in `dir` started, found by its command line (`--data DIR/nodes/..`, `--spec DIR/wan.json`),
/// including a process whose start was never recorded because `up` was killed right after
/// spawning it.
pub fn pids_under(dir: &Path) -> Vec<u32> {
    let me = std::process::id();
    let dir = dir.as_os_str().as_bytes();
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let under = cmdline
            .split(|b| *b == 0)
            .any(|arg| arg == dir || (arg.starts_with(dir) && arg.get(dir.len()) == Some(&b'/')));
        if under && start_ticks(pid).is_some() {
            out.push(pid);
        }
    }
    out
}
