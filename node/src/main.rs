//! `vmswarm`: the node binary. `serve` runs the daemon; every other subcommand talks to the daemon
//! of its data dir over the control socket.
//!
//! A command's stdout is collected and written at the end; a closed stdout (`vmswarm images |
//! head -0`) ends the command quietly with exit 0. A `--chunk-size` outside the manifest format's
//! limits is refused by the argument parser, and `pull -o` checks its destination
//! ([`vmswarm_node::output`]) before asking the daemon for anything.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{ArgGroup, CommandFactory, Parser, Subcommand};
use libp2p::Multiaddr;
use vmswarm_node::config::FileConfig;
use vmswarm_node::control::{self, MountRequest, PrefetchMode, Request};
use vmswarm_node::daemon;
use vmswarm_node::progress::{self, Progress};

/// The `--version` text: the crate version, then the wire protocol version (peers of another
/// protocol version are refused at Hello) and the manifest format version.
fn version() -> &'static str {
    static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VERSION.get_or_init(|| {
        format!(
            "{} (protocol {}, manifest format {})",
            env!("CARGO_PKG_VERSION"),
            vmswarm_protocol::wire::PROTOCOL_VERSION,
            vmswarm_protocol::manifest::FORMAT_VERSION
        )
    })
}

/// Peer-to-peer VM image distribution node.
#[derive(Debug, Parser)]
#[command(name = "vmswarm", version = version(), about, long_about = None)]
struct Cli {
    /// Data dir (default: $VMSWARM_DATA, then the user's data dir + /vmswarm).
    #[arg(long, global = true)]
    data: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node (foreground; stops cleanly on SIGINT/SIGTERM).
    Serve {
        /// QUIC listen address (repeatable).
        #[arg(long)]
        listen: Vec<Multiaddr>,
        /// This node's site (data center) name.
        #[arg(long)]
        site: Option<String>,
        /// A peer to join through, with /p2p/<peer id> (repeatable).
        #[arg(long)]
        bootstrap: Vec<Multiaddr>,
        /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9100).
        #[arg(long)]
        metrics: Option<std::net::SocketAddr>,
        /// TOML configuration file (flags win).
        #[arg(long)]
        config: Option<PathBuf>,
        /// A read of a chunk no peer delivers within this many milliseconds fails with EIO
        /// (the fetch scheduler's Demand deadline; default 30000, or `fetch.demand_deadline_ms`).
        #[arg(long, value_name = "MS")]
        demand_deadline_ms: Option<u64>,
        /// How long a mount records its boot profile, in seconds (default 60).
        #[arg(long, value_name = "SECS")]
        profile_window: Option<u64>,
        /// Announce this node as an origin (a source server, not a swarm member): peers fetch each
        /// chunk from it once per site and share it among themselves, even in its own site.
        #[arg(long)]
        origin: bool,
        /// TEST ONLY: corrupt every chunk this node serves.
        #[arg(long, hide = true)]
        corrupt_served_chunks: bool,
    },
    /// Chunk an image file into the store and provide it; the last line printed is the image id.
    Publish {
        /// The image file.
        file: PathBuf,
        /// Image name (default: the file name).
        #[arg(long)]
        name: Option<String>,
        /// Chunk size: a power of two from 64KiB to 16MiB.
        #[arg(long, default_value = "256KiB", value_parser = parse_size)]
        chunk_size: u32,
    },
    /// Fetch an image from the swarm; exits 0 only when every byte is verified.
    Pull {
        /// Image id (64 hex digits).
        image: String,
        /// Write the verified image to this file: a new path or a regular file (replaced
        /// atomically); a symlink is followed to the regular file it leads to. Directories,
        /// devices, FIFOs and sockets are refused.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Have a group of nodes pull an image this node holds in full (a group boot): the swarm
    /// distributes it (one WAN copy per site, targets relay to each other). Re-running it only
    /// asks targets that do not hold the whole image yet.
    #[command(group(ArgGroup::new("targets").required(true).args(["peers", "site", "asked"])))]
    Stage {
        /// Image id (64 hex digits).
        image: String,
        /// File naming the target nodes: one peer id or multiaddr (with /p2p/<peer id>) per line;
        /// `#` starts a comment.
        #[arg(long)]
        peers: Option<PathBuf>,
        /// Stage to every connected node announcing this site.
        #[arg(long)]
        site: Option<String>,
        /// Stage to every connected node that asked this node for the image (requested its
        /// manifest or chunks, or announced it wants it) since this node's daemon started.
        #[arg(long)]
        asked: bool,
        /// Print one JSON result object.
        #[arg(long)]
        json: bool,
        /// Return once every target answered (accepted or refused), without waiting for them to
        /// hold the image.
        #[arg(long)]
        no_wait: bool,
    },
    /// Images held, fully or partly.
    Images {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Connected peers.
    Peers {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Node status: id, addresses, peers, images, counters.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-hash every stored chunk; quarantine bad ones.
    Verify,
    /// Export an image (read-only) or a clone (writable) over NBD; chunks are fetched on demand.
    Mount {
        /// Image id (64 hex digits); or use --clone.
        #[arg(required_unless_present = "clone", conflicts_with = "clone")]
        image: Option<String>,
        /// Mount this clone (writable) instead of an image.
        #[arg(long)]
        clone: Option<String>,
        /// Where to listen: unix:/abs/path.sock or tcp:127.0.0.1:10809.
        #[arg(long)]
        nbd: String,
        /// Export name (default: the clone's name, or the image's name).
        #[arg(long)]
        name: Option<String>,
        /// Fetch in the background, beyond what reads demand: `--prefetch` or `--prefetch=all`
        /// wants the whole image (boot-profile order first); `--prefetch=profile` wants only the
        /// image's boot-profile chunks (in profile order) and leaves the rest to on-demand reads.
        #[arg(
            long,
            value_enum,
            value_name = "MODE",
            num_args = 0..=1,
            require_equals = true,
            default_missing_value = "all"
        )]
        prefetch: Option<PrefetchMode>,
        /// Allow a TCP address outside loopback (NBD has no authentication).
        #[arg(long)]
        nbd_allow_remote: bool,
    },
    /// Stop an export.
    Umount {
        /// Export name.
        name: String,
    },
    /// Exports, their NBD URIs and counters.
    Mounts {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Create a writable copy-on-write clone of an image (`clone rm NAME` deletes one).
    Clone {
        #[command(subcommand)]
        action: Option<CloneAction>,
        /// Image id (64 hex digits).
        image: Option<String>,
        /// Clone name.
        #[arg(long)]
        name: Option<String>,
    },
    /// Clones in the data dir.
    Clones {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script, e.g. `vmswarm completions bash >
    /// /etc/bash_completion.d/vmswarm` or `vmswarm completions zsh > "${fpath[1]}/_vmswarm"`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
enum CloneAction {
    /// Delete a clone and its writes (not while mounted).
    Rm {
        /// Clone name.
        name: String,
    },
}

/// Parses a `--chunk-size`: `256KiB`, `1MiB`, `65536` (bytes); it must be a power of two from
/// 64KiB to 16MiB (the manifest format's limits). No arithmetic can wrap.
fn parse_size(s: &str) -> Result<u32, String> {
    use vmswarm_protocol::manifest::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
    let allowed = format!(
        "a chunk size must be a power of two from {}KiB to {}MiB (e.g. 256KiB)",
        MIN_CHUNK_SIZE >> 10,
        MAX_CHUNK_SIZE >> 20
    );
    let t = s.trim();
    let (num, mult) = if let Some(n) = t.strip_suffix("KiB") {
        (n, 1u64 << 10)
    } else if let Some(n) = t.strip_suffix("MiB") {
        (n, 1 << 20)
    } else if let Some(n) = t.strip_suffix("GiB") {
        (n, 1 << 30)
    } else {
        (t, 1)
    };
    let n: u64 = num.trim().parse().map_err(|_| {
        format!("{s:?} is not a size (use e.g. 256KiB, 1MiB or a byte count); {allowed}")
    })?;
    let bytes = n
        .checked_mul(mult)
        .and_then(|b| u32::try_from(b).ok())
        .ok_or_else(|| format!("{s:?} is too large: {allowed}"))?;
    vmswarm_protocol::manifest::check_chunk_size(bytes)
        .map_err(|e| format!("{s:?}: {e}: {allowed}"))?;
    Ok(bytes)
}

fn data_dir(cli: &Option<PathBuf>, file: Option<&FileConfig>) -> Result<PathBuf> {
    if let Some(d) = cli {
        return Ok(d.clone());
    }
    if let Some(d) = file.and_then(|f| f.data.clone()) {
        return Ok(d);
    }
    if let Some(d) = std::env::var_os("VMSWARM_DATA") {
        return Ok(PathBuf::from(d));
    }
    dirs::data_dir()
        .map(|d| d.join("vmswarm"))
        .context("no --data given, $VMSWARM_DATA unset, and no user data dir known")
}

fn prepare_data_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create data dir {}", dir.display()))?;
    let probe = dir.join(".write-test");
    std::fs::write(&probe, b"")
        .with_context(|| format!("data dir {} is not writable", dir.display()))?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "vmswarm: cannot start the async runtime: {e}"
            );
            return ExitCode::FAILURE;
        }
    };
    use std::io::Write as _;
    match runtime.block_on(run(cli)) {
        Ok(text) => match write_stdout(&text) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "vmswarm: writing to stdout: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "vmswarm: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Appends a line to a command's output (written to stdout at the end by [`write_stdout`]).
macro_rules! outln {
    ($out:expr, $($arg:tt)*) => {{
        use std::fmt::Write as _;
        // Writing to a String cannot fail.
        let _ = writeln!($out, $($arg)*);
    }};
}

/// Writes a command's output; a reader that went away (`vmswarm images | head -0`) is not an
/// error: nobody wants the rest.
fn write_stdout(text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r,
    }
}

/// Runs a command; returns what it prints on stdout.
async fn run(cli: Cli) -> Result<String> {
    let mut out = String::new();
    run_into(cli, &mut out).await?;
    Ok(out)
}

async fn run_into(cli: Cli, out: &mut String) -> Result<()> {
    match cli.command {
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "vmswarm", &mut script);
            out.push_str(&String::from_utf8(script).context("a completion script is not UTF-8")?);
            Ok(())
        }
        Command::Serve {
            listen,
            site,
            bootstrap,
            metrics,
            config,
            demand_deadline_ms,
            profile_window,
            origin,
            corrupt_served_chunks,
        } => {
            let file = match &config {
                Some(p) => FileConfig::load(p)?,
                None => FileConfig::default(),
            };
            let data = data_dir(&cli.data, Some(&file))?;
            prepare_data_dir(&data)?;
            let mut fetch = vmswarm_protocol::fetch::Config::default();
            file.apply(&mut fetch);
            if let Some(ms) = demand_deadline_ms {
                fetch.demand_deadline = std::time::Duration::from_millis(ms);
            }
            let listen = if !listen.is_empty() {
                listen
            } else if !file.listen.is_empty() {
                file.listen.clone()
            } else {
                vec![vmswarm_node::config::DEFAULT_LISTEN.parse()?]
            };
            let opts = daemon::Options {
                data_dir: data,
                listen,
                site: site
                    .or(file.site.clone())
                    .unwrap_or_else(|| vmswarm_node::config::DEFAULT_SITE.into()),
                bootstrap: if bootstrap.is_empty() {
                    file.bootstrap.clone()
                } else {
                    bootstrap
                },
                metrics: metrics.or(file.metrics),
                fetch,
                serve: {
                    let mut s = vmswarm_protocol::serve::Config::default();
                    file.apply_serve(&mut s);
                    s
                },
                manifest_timeout: file.manifest_timeout(),
                origin: origin || file.origin,
                corrupt_served_chunks,
                profile_window: profile_window
                    .map(std::time::Duration::from_secs)
                    .unwrap_or(vmswarm_node::profile::DEFAULT_WINDOW),
            };
            // On a worker, not on this thread's `block_on`: the daemon task is woken for every
            // chunk, and a wake from a worker then stays on the workers instead of unparking the
            // main thread each time (a futex call and a context switch per wake).
            tokio::spawn(daemon::run(opts))
                .await
                .context("the daemon task failed")??;
            Ok(())
        }
        Command::Publish {
            file,
            name,
            chunk_size,
        } => {
            let path = std::fs::canonicalize(&file)
                .with_context(|| format!("cannot read image file {}", file.display()))?;
            if !path.is_file() {
                bail!("{} is not a regular file", path.display());
            }
            let data = data_dir(&cli.data, None)?;
            let result = control::call(
                &data,
                &Request::Publish {
                    path,
                    name,
                    chunk_size,
                },
                |_, _, _| {},
            )
            .await?;
            outln!(
                out,
                "name:   {}",
                result["name"].as_str().unwrap_or_default()
            );
            outln!(out, "size:   {} bytes", result["size"]);
            outln!(
                out,
                "chunks: {} x {} bytes",
                result["chunks"],
                result["chunk_size"]
            );
            outln!(out, "{}", result["image"].as_str().unwrap_or_default());
            Ok(())
        }
        Command::Pull { image, output } => {
            let image_id: vmswarm_protocol::ImageId = image
                .parse()
                .with_context(|| format!("bad image id {image:?}"))?;
            let output = match output {
                Some(o) => {
                    let o = absolute(&o)?;
                    // Fail before anything is fetched; the daemon checks again when it writes.
                    vmswarm_node::output::resolve(&o)?;
                    Some(o)
                }
                None => None,
            };
            let data = data_dir(&cli.data, None)?;
            let progress = Progress::new("pull", "fetched", "chunks", progress::Style::Lines);
            let result = control::call(
                &data,
                &Request::Pull {
                    image: image_id.to_string(),
                    output,
                },
                |done, total, bytes| progress.update(done, total, bytes),
            )
            .await;
            progress.finish();
            let result = result?;
            outln!(
                out,
                "pulled {} ({} bytes, {} fetched){}",
                result["image"].as_str().unwrap_or_default(),
                result["size"],
                result["bytes_fetched"],
                result["output"]
                    .as_str()
                    .map(|o| format!(" -> {o}"))
                    .unwrap_or_default()
            );
            Ok(())
        }
        Command::Stage {
            image,
            peers,
            site,
            asked,
            json,
            no_wait,
        } => stage(&cli.data, out, image, peers, site, asked, json, no_wait).await,
        Command::Images { json } => {
            let v =
                control::call(&data_dir(&cli.data, None)?, &Request::Images, |_, _, _| {}).await?;
            if json {
                outln!(out, "{}", serde_json::to_string_pretty(&v)?);
            } else {
                for i in v.as_array().into_iter().flatten() {
                    outln!(
                        out,
                        "{}  {:<24} {:>6}/{:<6} chunks{}",
                        i["id"].as_str().unwrap_or_default(),
                        i["name"].as_str().unwrap_or_default(),
                        i["present"],
                        i["chunks"],
                        image_activity(i)
                            .map(|a| format!("  ({a})"))
                            .unwrap_or_default()
                    );
                }
            }
            Ok(())
        }
        Command::Peers { json } => {
            let v =
                control::call(&data_dir(&cli.data, None)?, &Request::Peers, |_, _, _| {}).await?;
            if json {
                outln!(out, "{}", serde_json::to_string_pretty(&v)?);
            } else {
                for (id, p) in v.as_object().into_iter().flatten() {
                    outln!(
                        out,
                        "{id}  site={}  rtt={}",
                        p["site"].as_str().unwrap_or("?"),
                        p["rtt_ms"]
                            .as_f64()
                            .map(|r| format!("{r:.2}ms"))
                            .unwrap_or_else(|| "?".into())
                    );
                }
            }
            Ok(())
        }
        Command::Status { json } => {
            let v =
                control::call(&data_dir(&cli.data, None)?, &Request::Status, |_, _, _| {}).await?;
            if json {
                outln!(out, "{}", serde_json::to_string_pretty(&v)?);
            } else {
                outln!(
                    out,
                    "peer id:  {}",
                    v["peer_id"].as_str().unwrap_or_default()
                );
                outln!(out, "site:     {}", v["site"].as_str().unwrap_or_default());
                outln!(
                    out,
                    "peers:    {}",
                    v["peers"].as_object().map_or(0, |m| m.len())
                );
                outln!(
                    out,
                    "images:   {}",
                    v["images"].as_array().map_or(0, |a| a.len())
                );
                outln!(out, "in:       {} bytes", v["metrics"]["bytes_in"]);
                outln!(out, "out:      {} bytes", v["metrics"]["bytes_out"]);
                outln!(out, "fetching: {} chunks in flight", v["fetches_in_flight"]);
            }
            Ok(())
        }
        Command::Mount {
            image,
            clone,
            nbd,
            name,
            prefetch,
            nbd_allow_remote,
        } => {
            let v = control::call(
                &data_dir(&cli.data, None)?,
                &Request::Mount(MountRequest {
                    image,
                    clone,
                    nbd,
                    name,
                    prefetch: prefetch.unwrap_or_default(),
                    allow_remote: nbd_allow_remote,
                }),
                |_, _, _| {},
            )
            .await?;
            outln!(
                out,
                "exported {} ({} bytes, {}, prefetch {}) at {}",
                v["name"].as_str().unwrap_or_default(),
                v["size"],
                if v["writable"].as_bool() == Some(true) {
                    "writable clone"
                } else {
                    "read-only"
                },
                v["prefetch"].as_str().unwrap_or("none"),
                v["uri"].as_str().unwrap_or_default()
            );
            Ok(())
        }
        Command::Umount { name } => {
            control::call(
                &data_dir(&cli.data, None)?,
                &Request::Umount { name: name.clone() },
                |_, _, _| {},
            )
            .await?;
            outln!(out, "unmounted {name}");
            Ok(())
        }
        Command::Mounts { json } => {
            let v =
                control::call(&data_dir(&cli.data, None)?, &Request::Mounts, |_, _, _| {}).await?;
            if json {
                outln!(out, "{}", serde_json::to_string_pretty(&v)?);
            } else {
                for m in v.as_array().into_iter().flatten() {
                    outln!(
                        out,
                        "{:<20} {:<8} {:<16} {:>6}/{:<6} chunks  read {} B ({} B local)  {}",
                        m["name"].as_str().unwrap_or_default(),
                        if m["writable"].as_bool() == Some(true) {
                            "clone"
                        } else {
                            "ro"
                        },
                        format!("prefetch={}", m["prefetch"].as_str().unwrap_or("none")),
                        m["chunks_present"],
                        m["chunks"],
                        m["metrics"]["bytes_read"],
                        m["metrics"]["bytes_local"],
                        m["uri"].as_str().unwrap_or_default()
                    );
                }
            }
            Ok(())
        }
        Command::Clone {
            action: Some(CloneAction::Rm { name }),
            ..
        } => {
            control::call(
                &data_dir(&cli.data, None)?,
                &Request::CloneRm { name: name.clone() },
                |_, _, _| {},
            )
            .await?;
            outln!(out, "removed clone {name}");
            Ok(())
        }
        Command::Clone {
            action: None,
            image,
            name,
        } => {
            let (Some(image), Some(name)) = (image, name) else {
                bail!("usage: vmswarm clone IMAGE_ID --name NAME | vmswarm clone rm NAME");
            };
            let v = control::call(
                &data_dir(&cli.data, None)?,
                &Request::Clone { image, name },
                |_, _, _| {},
            )
            .await?;
            outln!(
                out,
                "created clone {} of image {}",
                v["name"].as_str().unwrap_or_default(),
                v["image"].as_str().unwrap_or_default()
            );
            Ok(())
        }
        Command::Clones { json } => {
            let v =
                control::call(&data_dir(&cli.data, None)?, &Request::Clones, |_, _, _| {}).await?;
            if json {
                outln!(out, "{}", serde_json::to_string_pretty(&v)?);
            } else {
                for c in v.as_array().into_iter().flatten() {
                    outln!(
                        out,
                        "{:<20} {}{}",
                        c["name"].as_str().unwrap_or_default(),
                        c["image"].as_str().unwrap_or("(damaged)"),
                        c["mounted_as"]
                            .as_str()
                            .map(|m| format!("  mounted as {m}"))
                            .unwrap_or_default()
                    );
                }
            }
            Ok(())
        }
        Command::Verify => {
            let v =
                control::call(&data_dir(&cli.data, None)?, &Request::Verify, |_, _, _| {}).await?;
            outln!(out, "{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
    }
}

/// `vmswarm stage`: prints the result; fails (after printing it) when a target failed.
#[allow(clippy::too_many_arguments)] // the command's options, passed through
async fn stage(
    data: &Option<PathBuf>,
    out: &mut String,
    image: String,
    peers: Option<PathBuf>,
    site: Option<String>,
    asked: bool,
    json: bool,
    no_wait: bool,
) -> Result<()> {
    let image_id: vmswarm_protocol::ImageId = image
        .parse()
        .with_context(|| format!("bad image id {image:?}"))?;
    let targets = match &peers {
        Some(file) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read peers file {}", file.display()))?;
            vmswarm_node::stage::parse_targets(&file.display().to_string(), &text)?
                .iter()
                .map(vmswarm_node::stage::Target::to_wire_string)
                .collect()
        }
        None => Vec::new(),
    };
    let data = data_dir(data, None)?;
    // With --json nothing but the result is printed. The daemon's summary lines come every second;
    // off a terminal they carry the rate and ETA, on one the bar does.
    let progress = (!json).then(|| {
        Progress::new(
            "stage",
            "uploaded",
            "chunks held",
            progress::Style::Annotate,
        )
    });
    let result = control::call_with_lines(
        &data,
        &Request::Stage {
            image: image_id.to_string(),
            peers: targets,
            site,
            asked,
            wait: !no_wait,
        },
        |done, total, bytes| {
            if let Some(p) = &progress {
                p.update(done, total, bytes);
            }
        },
        |line| {
            if let Some(p) = &progress {
                p.println(line);
            }
        },
    )
    .await;
    if let Some(p) = &progress {
        p.finish();
    }
    let result = result?;
    if json {
        outln!(out, "{}", serde_json::to_string_pretty(&result)?);
    } else {
        for t in result["targets"].as_array().into_iter().flatten() {
            outln!(
                out,
                "{}  {:<9} {:>6}/{:<6} chunks{}",
                t["peer_id"].as_str().unwrap_or_default(),
                t["state"].as_str().unwrap_or_default(),
                t["chunks_held"],
                t["chunks"],
                t["reason"]
                    .as_str()
                    .map(|r| format!("  ({r})"))
                    .unwrap_or_default()
            );
        }
        outln!(
            out,
            "staged {} to {} targets in {:.1}s; this node uploaded {} bytes",
            result["image"].as_str().unwrap_or_default(),
            result["targets"].as_array().map_or(0, |a| a.len()),
            result["seconds"].as_f64().unwrap_or(0.0),
            result["publisher_upload_bytes"]
        );
    }
    let failed = result["failed"].as_u64().unwrap_or(0);
    if failed > 0 {
        // The result is the operator's record of what failed: print it before failing.
        write_stdout(&std::mem::take(out))?;
        bail!(
            "stage incomplete: {failed} of {} targets failed (see above)",
            result["targets"].as_array().map_or(0, |a| a.len())
        );
    }
    Ok(())
}

/// What `vmswarm images` says about an image beside its chunk count: how it is held (pulled,
/// mounted lazily or with a prefetch) and whether anything is being fetched, from the daemon's
/// `images` entry. `None` for a complete image. A daemon too old to send `activity` gets the old
/// `pulling` flag.
fn image_activity(i: &serde_json::Value) -> Option<String> {
    let Some(activity) = i["activity"].as_str() else {
        return (i["pulling"].as_bool() == Some(true)).then(|| "pulling".to_owned());
    };
    if activity == "complete" {
        return None;
    }
    let fetching = (activity == "fetching").then(|| {
        let wanted = i["wanted"].as_u64().unwrap_or(0);
        let demand = i["wanted_demand"].as_u64().unwrap_or(0);
        let in_flight = i["requests_in_flight"].as_u64().unwrap_or(0);
        let count = |n: u64, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
        let reads = if demand > 0 {
            format!("{demand} for reads, ")
        } else {
            String::new()
        };
        format!(
            "fetching {} ({reads}{} in flight)",
            count(wanted, "chunk"),
            count(in_flight, "request")
        )
    });
    let mounts: Vec<&str> = i["mounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m.as_str())
        .collect();
    if mounts.is_empty() {
        return Some(match fetching {
            Some(f) => format!("pulling: {f}"),
            None => "incomplete, idle: nothing being fetched".to_owned(),
        });
    }
    let names = mounts.join(", ");
    let how = match i["prefetch"].as_str() {
        Some("all") => format!("mounted as {names}, prefetching the whole image"),
        Some("profile") => format!("mounted as {names}, prefetching its boot profile"),
        _ => format!("mounted lazily as {names}"),
    };
    Some(match fetching {
        Some(f) => format!("{how}; {f}"),
        None => format!("{how}; idle: chunks are fetched when read"),
    })
}

fn absolute(p: &Path) -> Result<PathBuf> {
    if p.is_absolute() {
        Ok(p.to_path_buf())
    } else {
        Ok(std::env::current_dir()?.join(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmswarm_protocol::manifest::DEFAULT_CHUNK_SIZE;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256KiB"), Ok(262_144));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("65536"), Ok(65_536));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("9999999MiB").is_err());
        // 2^44 MiB + 1 MiB wraps to 1 MiB in unchecked u64 arithmetic.
        assert!(parse_size("17592186044417MiB").is_err());
        assert!(parse_size("18446744073709551615").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("32KiB").is_err());
        assert!(parse_size("32MiB").is_err());
        assert!(parse_size("100000").is_err());
        assert_eq!(parse_size("64KiB"), Ok(65_536));
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        let err = parse_size("17592186044417MiB").unwrap_err();
        assert!(err.contains("64KiB") && err.contains("16MiB"), "{err}");
        assert_eq!(DEFAULT_CHUNK_SIZE, 262_144);
    }

    #[test]
    fn image_activity_says_what_is_happening() {
        use serde_json::json;
        let complete = json!({"activity": "complete", "pulling": false, "mounts": ["a"]});
        assert_eq!(image_activity(&complete), None);
        let lazy_idle = json!({
            "activity": "idle", "pulling": true, "mounts": ["vm1"], "prefetch": "none",
            "wanted": 0, "wanted_demand": 0, "requests_in_flight": 0,
        });
        assert_eq!(
            image_activity(&lazy_idle).unwrap(),
            "mounted lazily as vm1; idle: chunks are fetched when read"
        );
        let lazy_reading = json!({
            "activity": "fetching", "pulling": true, "mounts": ["vm1", "vm2"], "prefetch": "none",
            "wanted": 3, "wanted_demand": 3, "requests_in_flight": 2,
        });
        assert_eq!(
            image_activity(&lazy_reading).unwrap(),
            "mounted lazily as vm1, vm2; fetching 3 chunks (3 for reads, 2 requests in flight)"
        );
        let prefetch = json!({
            "activity": "fetching", "pulling": true, "mounts": ["pre"], "prefetch": "all",
            "wanted": 1, "wanted_demand": 0, "requests_in_flight": 1,
        });
        assert_eq!(
            image_activity(&prefetch).unwrap(),
            "mounted as pre, prefetching the whole image; fetching 1 chunk (1 request in flight)"
        );
        let pull = json!({
            "activity": "fetching", "pulling": true, "mounts": [], "prefetch": null,
            "wanted": 900, "wanted_demand": 0, "requests_in_flight": 16,
        });
        assert_eq!(
            image_activity(&pull).unwrap(),
            "pulling: fetching 900 chunks (16 requests in flight)"
        );
        let partial = json!({"activity": "idle", "pulling": false, "mounts": []});
        assert_eq!(
            image_activity(&partial).unwrap(),
            "incomplete, idle: nothing being fetched"
        );
        // A daemon from before `activity`.
        assert_eq!(
            image_activity(&json!({"pulling": true})).as_deref(),
            Some("pulling")
        );
        assert_eq!(image_activity(&json!({"pulling": false})), None);
    }

    #[test]
    fn mount_prefetch_modes() {
        let id = "ab".repeat(32);
        let parse = |extra: &[&str]| {
            let mut args = vec!["vmswarm", "mount", id.as_str(), "--nbd", "unix:/s"];
            args.extend_from_slice(extra);
            Cli::try_parse_from(args).map(|c| match c.command {
                Command::Mount { prefetch, .. } => prefetch,
                other => panic!("{other:?}"),
            })
        };
        assert_eq!(parse(&[]).unwrap(), None);
        assert_eq!(parse(&["--prefetch"]).unwrap(), Some(PrefetchMode::All));
        assert_eq!(parse(&["--prefetch=all"]).unwrap(), Some(PrefetchMode::All));
        assert_eq!(
            parse(&["--prefetch=profile"]).unwrap(),
            Some(PrefetchMode::Profile)
        );
        // The bare flag before the image id still means the whole image.
        let c = Cli::try_parse_from([
            "vmswarm",
            "mount",
            "--prefetch",
            id.as_str(),
            "--nbd",
            "unix:/s",
        ])
        .unwrap();
        assert!(matches!(
            c.command,
            Command::Mount { prefetch: Some(PrefetchMode::All), image: Some(ref i), .. } if *i == id
        ));
        let err = parse(&["--prefetch=bogus"]).unwrap_err().to_string();
        assert!(
            err.contains("bogus") && err.contains("all") && err.contains("profile"),
            "{err}"
        );
        // `none` is the wire's "no prefetch", not a command-line value.
        assert!(parse(&["--prefetch=none"]).is_err());
    }
}
