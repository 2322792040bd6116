//! `vmswarm serve`: the long-running node.
//!
//! One tokio task owns all mutable state. It reacts to libp2p events, control-socket commands,
//! finished store operations, Demand requests from NBD exports (`mounts`) and timers, and after
//! each reaction drains the protocol state machines:
//! - one `vmswarm_protocol::fetch::FetchScheduler` per image being pulled decides which chunk to
//!   request from which peer, when to give up, and whom to ban;
//! - one `vmswarm_protocol::serve::ServeQueue` decides which incoming request to answer next and how
//!   many chunks are sent at once.
//!
//! This module only carries their decisions out (sends requests, verifies and stores chunks, answers
//! peers) and feeds them what happened. Store I/O and the hashing of received chunks run on tokio's
//! blocking pool ([`ingest`] batches received chunks into group commits and applies backpressure);
//! their results come back to the owning task as messages. Shutdown (SIGINT/SIGTERM) removes the
//! control socket and `node.json`, ends every NBD export (clone overlays flushed, socket files
//! removed), and closes every connection (waiting at most [`CLOSE_TIMEOUT`] and
//! [`CLOSE_FLUSH`] for the closes to go out), so that peers drop us at once rather than after
//! QUIC's idle timeout; the data-dir lock is released when the process ends. A listen address that
//! cannot be bound stops the daemon with the OS's reason; a bootstrap peer still not connected
//! `BOOTSTRAP_WARN_AFTER` (10 s) after start is warned about (and `status` shows which are).
//!
//! A peer that restarts (or loses every connection to us while we still hold one) sends a new
//! `Hello` request on a new connection: that starts a new session with it
//! ([`Daemon::on_hello_request`]), its older connections are closed and everything we asked of it
//! is asked again or re-planned. A request to a peer lost with one of several connections is sent
//! again on another ([`inbound`]).
//!
//! Each transfer's site gateways (the few nodes of our site that take its chunks from outside) are
//! chosen from the answers to the image's per-site provider lookups ([`gateways`]).
//!
//! Under systemd (`Type=notify`, `$NOTIFY_SOCKET` set) the daemon tells the service manager
//! `READY=1` once its control socket is bound and its first QUIC listen address is up (after
//! `node.json` names it, so `vmswarm status` works from then on), and `STOPPING=1` when shutdown
//! begins ([`notify_systemd`]); without `$NOTIFY_SOCKET` both are no-ops.
//!
//! `vmswarm stage` asks target nodes to pull an image we hold, and follows their progress; a
//! peer's `Stage` request makes us pull one, within bounds ([`stage`]).

mod dropped;
mod gateways;
mod inbound;
mod ingest;
mod lanes;
mod mounts;
mod stage;
mod transfer;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use futures::StreamExt;
use libp2p::kad;
use libp2p::request_response::OutboundRequestId;
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, identify, ping};
use serde::Serialize;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use vmswarm_protocol::bitfield::ChunkBitmap;
use vmswarm_protocol::fetch;
use vmswarm_protocol::manifest::Manifest;
use vmswarm_protocol::serve::{self, ServeQueue};
use vmswarm_protocol::wire::{Capabilities, Hello, Message, PROTOCOL_VERSION};
use vmswarm_protocol::{ChunkId, ImageId, Instant};

use crate::control::{self, Reply, Request};
use crate::metrics::Metrics;
use crate::net::{self, Behaviour, BehaviourEvent};
use crate::store::{ChunkStore, DataDirLock, StoreError};
use transfer::{Transfer, Waiter};

/// How often pending manifest lookups ask the DHT for providers again.
const PROVIDER_RETRY: Duration = Duration::from_secs(3);
/// How long shutdown waits for its connections to close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long shutdown then keeps the QUIC endpoint running, so that its `CONNECTION_CLOSE` frames
/// leave (the endpoint's task sends them; it ends with the process).
const CLOSE_FLUSH: Duration = Duration::from_millis(100);
/// How often Have updates are flushed to interested peers (the protocol's batching interval).
const FLUSH_INTERVAL: Duration = vmswarm_protocol::wire::HAVE_UPDATE_INTERVAL;

/// How long after start a bootstrap peer we are still not connected to is warned about.
const BOOTSTRAP_WARN_AFTER: Duration = Duration::from_secs(10);

/// Everything `vmswarm serve` is told.
#[derive(Debug, Clone)]
pub struct Options {
    /// The data dir (store, identity, control socket, node.json).
    pub data_dir: PathBuf,
    /// QUIC listen addresses.
    pub listen: Vec<Multiaddr>,
    /// Our site (data center) name, announced in `Hello`.
    pub site: String,
    /// Peers to join through (each with a `/p2p/<peer id>` suffix).
    pub bootstrap: Vec<Multiaddr>,
    /// Address for the Prometheus endpoint, if wanted.
    pub metrics: Option<SocketAddr>,
    /// Fetch scheduler settings (its `local_site` is overwritten with `site`).
    pub fetch: fetch::Config,
    /// Serve queue settings.
    pub serve: serve::Config,
    /// How long a pull waits for some peer to hand over the manifest before it fails.
    pub manifest_timeout: Duration,
    /// Announce `Capabilities::ORIGIN` in our `Hello`: we are a source server, and peers fetch
    /// each chunk from us once per site (as from another site), then share it among themselves.
    pub origin: bool,
    /// TEST ONLY: flip a byte in every chunk we serve (to test that peers detect and ban us).
    pub corrupt_served_chunks: bool,
    /// How long a mount records its boot profile (first chunk touches).
    pub profile_window: Duration,
}

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The data dir could not be prepared or locked.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The identity key could not be loaded.
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    /// The swarm could not be built.
    #[error(transparent)]
    Net(#[from] net::NetError),
    /// A listen address was refused.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
    /// A bootstrap address has no `/p2p/<peer id>` suffix.
    #[error("bootstrap address {0} must end in /p2p/<peer id> (see node.json of that node)")]
    BootstrapWithoutPeerId(Multiaddr),
    /// The control socket or metrics endpoint could not be bound, or node.json not written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path or address.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

/// What `node.json` says about a running node.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct NodeInfo {
    /// The node's peer id.
    pub peer_id: String,
    /// Addresses other nodes can bootstrap from (with `/p2p/<peer id>`).
    pub listen_addrs: Vec<String>,
    /// The node's site.
    pub site: String,
    /// The daemon's process id.
    pub pid: u32,
}

/// What an outbound request was for.
#[derive(Debug, Clone)]
enum Outbound {
    Hello,
    Have(ImageId),
    Manifest(ImageId),
    Ack,
    /// A `GetBootProfile` for this image.
    BootProfile(ImageId),
    /// Our `Have` sent to a stage target, for its set ([`stage`]).
    StageHave(ImageId),
    /// A `Stage` request ([`stage`]).
    Stage(ImageId),
}

/// A connected peer.
#[derive(Debug, Default)]
struct PeerState {
    /// Its connections we hold for live, oldest first (one we closed is no longer listed, even
    /// before libp2p reports it closed).
    connections: Vec<ConnectionId>,
    /// The connection its `Hello` request came on: its session with us. A `Hello` request on
    /// another connection starts a new session ([`Daemon::on_hello_request`]).
    session: Option<ConnectionId>,
    /// Its site, once its `Hello` arrived.
    site: Option<String>,
    rtt: Option<Duration>,
    /// It announced [`Capabilities::BOOT_PROFILES`].
    boot_profiles: bool,
    /// What its `Hello` announced (`NONE` until it arrives): among others whether it understands
    /// `Reject { Fanout }` ([`RejectReason::fanout_for`](vmswarm_protocol::wire::RejectReason::fanout_for)).
    capabilities: Capabilities,
    /// Its `Hello` announced `Capabilities::ORIGIN` (a source server, not a swarm member).
    origin: bool,
}

/// An image we hold a manifest for (fully or partly).
#[derive(Debug)]
struct Image {
    manifest: Arc<Manifest>,
    /// Chunks held, zero chunks included.
    present: ChunkBitmap,
    /// Indices of each chunk id (an id may occur several times in one image).
    by_id: HashMap<ChunkId, Vec<u32>>,
    /// Peers that told us they share this image (they get our Have updates).
    interested: HashSet<PeerId>,
    /// Indices completed since the last Have update flush.
    unannounced: Vec<u32>,
    /// At the end of its last transfer: whether we were one of our site's gateways for the image,
    /// and how many gateways were named ([`gateways`]).
    last_site_gateway: (bool, usize),
}

impl Image {
    fn new(manifest: Manifest, present: ChunkBitmap) -> Self {
        let mut by_id: HashMap<ChunkId, Vec<u32>> = HashMap::new();
        for (i, id) in manifest.chunks.iter().enumerate() {
            by_id.entry(*id).or_default().push(i as u32);
        }
        Image {
            manifest: Arc::new(manifest),
            present,
            by_id,
            interested: HashSet::new(),
            unannounced: Vec::new(),
            last_site_gateway: (false, 0),
        }
    }
}

/// A pull waiting for its manifest.
#[derive(Debug)]
struct PendingManifest {
    waiters: Vec<Waiter>,
    since: StdInstant,
    last_lookup: StdInstant,
    /// Peers already asked.
    asked: HashSet<PeerId>,
    /// A good copy arrived and is being stored.
    storing: bool,
    /// Mounts waiting for the manifest (they want no chunks).
    mounts: Vec<mounts::PendingMount>,
}

/// Results of blocking store work, sent back to the owning task.
enum IoDone {
    /// Received chunks hashed (valid or not).
    Checked(Vec<ingest::Checked>),
    /// A batch of valid received chunks committed (or failed to be).
    Stored {
        chunks: Vec<(ImageId, ChunkId)>,
        bytes: usize,
        result: Result<(), StoreError>,
    },
    ManifestStored {
        manifest: Manifest,
        present: Result<ChunkBitmap, StoreError>,
    },
    Published {
        reply: mpsc::UnboundedSender<Reply>,
        result: Result<(Manifest, ChunkBitmap, serde_json::Value), StoreError>,
    },
    Exported {
        reply: mpsc::UnboundedSender<Reply>,
        result: Result<serde_json::Value, StoreError>,
    },
    Verified {
        reply: mpsc::UnboundedSender<Reply>,
        result: Result<serde_json::Value, StoreError>,
    },
}

/// A control command and where to send its replies.
struct Command {
    request: Request,
    reply: mpsc::UnboundedSender<Reply>,
}

/// The daemon's state; see the module docs.
struct Daemon {
    opts: Options,
    swarm: Swarm<Behaviour>,
    store: Arc<ChunkStore>,
    metrics: Arc<Metrics>,
    epoch: StdInstant,
    peers: HashMap<PeerId, PeerState>,
    banned: HashSet<PeerId>,
    images: HashMap<ImageId, Image>,
    transfers: HashMap<ImageId, Transfer>,
    /// The best site providers known of each image being looked up, best first ([`gateways`]).
    site_providers: HashMap<ImageId, Vec<PeerId>>,
    pending_manifests: HashMap<ImageId, PendingManifest>,
    /// Our requests on `/vmswarm/msg/1` awaiting an answer: whom we asked, and what for.
    outbound: HashMap<OutboundRequestId, (PeerId, Outbound)>,
    serve: ServeQueue<PeerId>,
    /// Opens chunk lanes ([`lanes`]).
    lane_control: libp2p_stream::Control,
    lane_tx: mpsc::UnboundedSender<net::lane::LaneEvent>,
    next_lane: net::lane::LaneId,
    /// Our chunk lanes, by server and class.
    out_lanes: HashMap<(PeerId, net::lane::LaneClass), lanes::OutLane>,
    /// Our chunk requests awaiting an answer, by server and chunk id.
    requested: lanes::RequestBook<PeerId>,
    /// Lanes peers opened to us.
    in_lanes: HashMap<net::lane::LaneId, lanes::InLane>,
    /// The lane each queued chunk request is to be answered on.
    serve_lanes: HashMap<(PeerId, ChunkId), net::lane::LaneId>,
    io_tx: mpsc::UnboundedSender<IoDone>,
    ingest: ingest::Ingest,
    listen_addrs: Vec<Multiaddr>,
    /// Whether systemd was told `READY=1` (on the first listen address).
    notified_ready: bool,
    seed_counter: u64,
    mounts: mounts::Mounts,
    /// Chunks the store dropped from its index (quarantined, vanished): see `on_chunk_dropped`.
    dropped_rx: mpsc::UnboundedReceiver<ChunkId>,
    /// Running `vmswarm stage` commands, by run number ([`stage`]).
    stages: HashMap<u64, stage::StageRun>,
    next_stage: u64,
    /// Images we pull because a peer's `Stage` asked us to (while their transfer runs).
    staged: HashSet<ImageId>,
    /// Peers that asked us for each image we hold (`vmswarm stage --asked`; [`stage::Askers`]).
    askers: HashMap<ImageId, stage::Askers>,
    /// Peers' `Stage` requests waiting for the image's manifest.
    stage_requests: HashMap<ImageId, Vec<libp2p::request_response::ResponseChannel<Message>>>,
}

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(mut opts: Options) -> Result<(), DaemonError> {
    opts.fetch.local_site = opts.site.clone();
    let lock = DataDirLock::acquire(&opts.data_dir)?;
    let store = Arc::new(ChunkStore::open(&opts.data_dir.join("store"))?);
    let keypair = crate::identity::load_or_create(&opts.data_dir)?;
    let mut swarm = net::build_swarm(keypair)?;
    for addr in &opts.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| DaemonError::Listen {
                addr: addr.clone(),
                reason: error_chain(&e),
            })?;
    }
    for addr in &opts.bootstrap {
        let Some(peer) = peer_id_of(addr) else {
            return Err(DaemonError::BootstrapWithoutPeerId(addr.clone()));
        };
        swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
        if let Err(e) = swarm.dial(addr.clone()) {
            tracing::warn!(%addr, "dialing bootstrap peer: {e}");
        }
    }
    if !opts.bootstrap.is_empty() {
        let _ = swarm.behaviour_mut().kad.bootstrap();
    }

    let metrics = Arc::new(Metrics::default());
    if let Some(addr) = opts.metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| DaemonError::Io {
                what: "binding the metrics endpoint",
                path: addr.to_string(),
                source,
            })?;
        tokio::spawn(crate::metrics::serve_http(listener, metrics.clone()));
    }

    let socket_path = opts.data_dir.join(control::SOCKET_NAME);
    // The lock guarantees no other daemon owns this socket: a leftover file is from a dead one.
    let _ = std::fs::remove_file(&socket_path);
    let listener = UnixListener::bind(&socket_path).map_err(|source| DaemonError::Io {
        what: "binding the control socket",
        path: socket_path.display().to_string(),
        source,
    })?;
    set_mode_0600(&socket_path)?;

    let (lane_tx, mut lane_rx) = mpsc::unbounded_channel();
    let mut lane_control = swarm.behaviour().lanes.new_control();
    let incoming = lane_control
        .accept(net::lane::PROTOCOL)
        .map_err(|e| DaemonError::Net(net::NetError::Build(e.to_string())))?;
    net::lane::spawn_accept(
        incoming,
        store.clone(),
        opts.corrupt_served_chunks,
        lane_tx.clone(),
    );

    let (io_tx, mut io_rx) = mpsc::unbounded_channel();
    let (cmd_tx, mut cmd_rx) = mpsc::unbounded_channel::<Command>();
    tokio::spawn(accept_control(listener, cmd_tx));
    let (demand_tx, mut demand_rx) = mpsc::unbounded_channel();
    let (dropped_tx, dropped_rx) = mpsc::unbounded_channel();
    store.on_dropped(Box::new(move |id: &ChunkId| {
        // Only fails once the daemon's loop is gone (shutting down).
        let _ = dropped_tx.send(*id);
    }));

    let opts_profile_window = opts.profile_window;
    let mut d = Daemon {
        serve: ServeQueue::new(if opts.origin {
            opts.serve.for_origin()
        } else {
            opts.serve.clone()
        }),
        opts,
        swarm,
        store,
        metrics,
        epoch: StdInstant::now(),
        peers: HashMap::new(),
        banned: HashSet::new(),
        images: HashMap::new(),
        transfers: HashMap::new(),
        site_providers: HashMap::new(),
        pending_manifests: HashMap::new(),
        outbound: HashMap::new(),
        lane_control,
        lane_tx,
        next_lane: 0,
        out_lanes: HashMap::new(),
        requested: lanes::RequestBook::default(),
        in_lanes: HashMap::new(),
        serve_lanes: HashMap::new(),
        io_tx,
        ingest: ingest::Ingest::default(),
        listen_addrs: Vec::new(),
        notified_ready: false,
        seed_counter: 0,
        mounts: mounts::Mounts::new(demand_tx, opts_profile_window),
        dropped_rx,
        stages: HashMap::new(),
        next_stage: 0,
        staged: HashSet::new(),
        askers: HashMap::new(),
        stage_requests: HashMap::new(),
    };
    d.metrics.demand_fanout.store(
        d.serve.demand_fanout() as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    d.load_images();

    // Warn once about bootstrap peers still not connected after BOOTSTRAP_WARN_AFTER.
    let mut bootstrap_unchecked = !d.opts.bootstrap.is_empty();
    let bootstrap_check = tokio::time::sleep(BOOTSTRAP_WARN_AFTER);
    tokio::pin!(bootstrap_check);
    let mut flush = tokio::time::interval(FLUSH_INTERVAL);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| DaemonError::Io {
            what: "installing the SIGTERM handler",
            path: String::new(),
            source,
        })?;
    loop {
        let deadline = d.next_deadline();
        tokio::select! {
            event = d.swarm.select_next_some() => d.on_swarm_event(event),
            Some(cmd) = cmd_rx.recv() => d.on_command(cmd),
            Some(done) = io_rx.recv() => d.on_io(done),
            Some(event) = lane_rx.recv() => d.on_lane_event(event),
            Some(demand) = demand_rx.recv() => d.on_demand(demand),
            Some(id) = d.dropped_rx.recv() => d.on_chunk_dropped(id),
            _ = sleep_until(deadline) => d.on_timeout(),
            _ = flush.tick() => d.on_flush(),
            _ = &mut bootstrap_check, if bootstrap_unchecked => {
                bootstrap_unchecked = false;
                d.warn_unanswered_bootstrap();
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
        d.pump();
    }
    tracing::info!("shutting down");
    notify_systemd(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("shutting down"),
    ]);
    d.shutdown_mounts();
    d.close_connections().await;
    let _ = std::fs::remove_file(&socket_path);
    let _ = std::fs::remove_file(d.opts.data_dir.join("node.json"));
    drop(lock);
    Ok(())
}

/// Sends `states` to systemd's notification socket (`$NOTIFY_SOCKET`; nothing happens when it is
/// unset). A failure is logged, not fatal: the service manager then times the start out itself.
fn notify_systemd(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("notifying systemd ($NOTIFY_SOCKET): {e}");
    }
}

async fn sleep_until(deadline: Option<StdInstant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => futures::future::pending().await,
    }
}

fn set_mode_0600(path: &Path) -> Result<(), DaemonError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        DaemonError::Io {
            what: "restricting the control socket",
            path: path.display().to_string(),
            source,
        }
    })
}

/// An error and its sources, joined with ": ", skipping empty messages (libp2p's
/// `TransportError::Other` displays as nothing; the OS reason is in its sources).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(err) = next {
        let text = err.to_string();
        if !text.is_empty() && !parts.last().is_some_and(|p| p.ends_with(&text)) {
            parts.push(text);
        }
        next = err.source();
    }
    if parts.is_empty() {
        "unknown error".into()
    } else {
        parts.join(": ")
    }
}

/// The `/p2p/<peer id>` of an address, if it has one.
pub fn peer_id_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        libp2p::multiaddr::Protocol::P2p(id) => Some(id),
        _ => None,
    })
}

/// Drives a closing swarm until `until` (or, with `until_closed`, until no connection is left),
/// closing connections that come up meanwhile.
async fn drive_closing(
    swarm: &mut Swarm<Behaviour>,
    until: tokio::time::Instant,
    until_closed: bool,
) {
    loop {
        if until_closed && swarm.network_info().num_peers() == 0 {
            return;
        }
        let Ok(event) = tokio::time::timeout_at(until, swarm.select_next_some()).await else {
            return;
        };
        if let SwarmEvent::ConnectionEstablished { peer_id, .. } = event {
            let _ = swarm.disconnect_peer_id(peer_id);
        }
    }
}

/// Accepts control connections and forwards their one request each. A request line longer than
/// [`crate::control::MAX_REQUEST_LINE`] is answered with an error and the connection closed;
/// `accept()` failures back off ([`crate::accept`]).
async fn accept_control(listener: UnixListener, cmds: mpsc::UnboundedSender<Command>) {
    let mut backoff = crate::accept::Backoff::new("control socket");
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                backoff.accepted();
                stream
            }
            Err(e) => {
                backoff.failed(&e).await;
                continue;
            }
        };
        let cmds = cmds.clone();
        tokio::spawn(async move {
            let (rd, mut wr) = stream.into_split();
            let mut rd = BufReader::new(rd);
            let (reply_tx, mut reply_rx) = mpsc::unbounded_channel();
            match crate::control::read_request_line(&mut rd).await {
                Ok(Some(line)) => match serde_json::from_slice::<Request>(&line) {
                    Ok(request) => {
                        if cmds
                            .send(Command {
                                request,
                                reply: reply_tx,
                            })
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = reply_tx.send(Reply::Error {
                            message: format!("malformed control request: {e}"),
                        });
                    }
                },
                Err(e @ crate::control::RequestLineError::TooLong) => {
                    tracing::warn!("control socket: {e}");
                    let _ = reply_tx.send(Reply::Error {
                        message: e.to_string(),
                    });
                }
                Ok(None) | Err(crate::control::RequestLineError::Io(_)) => return,
            }
            drop(rd);
            while let Some(reply) = reply_rx.recv().await {
                let last = !matches!(reply, Reply::Progress { .. } | Reply::Line { .. });
                let Ok(mut line) = serde_json::to_string(&reply) else {
                    return;
                };
                line.push('\n');
                if wr.write_all(line.as_bytes()).await.is_err() || last {
                    return;
                }
            }
        });
    }
}

impl Daemon {
    /// Closes every connection and waits a bounded moment for the closes to go out, so that peers
    /// drop us at once instead of after QUIC's idle timeout. Connections that come up meanwhile
    /// are closed too.
    async fn close_connections(&mut self) {
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        for peer in peers {
            let _ = self.swarm.disconnect_peer_id(peer);
        }
        let until = tokio::time::Instant::now() + CLOSE_TIMEOUT;
        drive_closing(&mut self.swarm, until, true).await;
        let until = tokio::time::Instant::now() + CLOSE_FLUSH;
        drive_closing(&mut self.swarm, until, false).await;
        tracing::debug!(
            open = self.swarm.network_info().num_peers(),
            "connections closed"
        );
    }

    fn now(&self) -> Instant {
        Instant::from_duration(self.epoch.elapsed())
    }

    fn to_std(&self, t: Instant) -> StdInstant {
        self.epoch + t.since_epoch()
    }

    fn site_of(&self, peer: &PeerId) -> String {
        self.peers
            .get(peer)
            .and_then(|p| p.site.clone())
            .unwrap_or_else(|| "unknown".into())
    }

    fn hello(&self) -> Message {
        Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            site: self.opts.site.clone(),
            capabilities: if self.opts.origin {
                Capabilities::SERVE
                    | Capabilities::BOOT_PROFILES
                    | Capabilities::MULTICAST
                    | Capabilities::ORIGIN
            } else {
                Capabilities::SERVE | Capabilities::BOOT_PROFILES | Capabilities::MULTICAST
            },
            agent: format!("vmswarm/{}", env!("CARGO_PKG_VERSION")),
        })
    }

    fn send(&mut self, peer: PeerId, msg: Message, kind: Outbound) {
        let id = self.swarm.behaviour_mut().msg.send_request(&peer, msg);
        self.outbound.insert(id, (peer, kind));
    }

    /// Registers every image in the store, provides it, and resumes unfinished pulls.
    fn load_images(&mut self) {
        for id in self.store.images() {
            let manifest = match self.store.manifest(&id) {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(image = %id, "reading stored manifest: {e}");
                    continue;
                }
            };
            let present = self.store.image_status(&manifest).present;
            let complete = present.is_full();
            self.images.insert(id, Image::new(manifest, present));
            self.provide(id);
            if !complete && mounts::is_lazy(&self.opts.data_dir, &id) {
                tracing::info!(image = %id, "partly held image (mounted lazily): not resuming a pull");
            } else if !complete {
                tracing::info!(image = %id, "resuming unfinished pull");
                self.start_transfer(id, Vec::new());
            }
        }
    }

    /// Records us as a provider of `image`, fleet-wide and within our site ([`net::store`]).
    fn provide(&mut self, image: ImageId) {
        let keys = [
            net::store::image_key(&image.0),
            net::store::site_key(&image.0, &self.opts.site),
        ];
        for key in keys {
            if let Err(e) = self.swarm.behaviour_mut().kad.start_providing(key) {
                tracing::warn!(%image, "providing: {e}");
            }
        }
    }

    /// Looks for providers of `image`, fleet-wide and within our site.
    fn lookup_providers(&mut self, image: ImageId) {
        let kad = &mut self.swarm.behaviour_mut().kad;
        kad.get_providers(net::store::image_key(&image.0));
        kad.get_providers(net::store::site_key(&image.0, &self.opts.site));
    }

    fn next_deadline(&self) -> Option<StdInstant> {
        let sched = self
            .transfers
            .values()
            .filter_map(|t| t.sched.poll_timeout())
            .min()
            .map(|t| self.to_std(t));
        let manifests = self
            .pending_manifests
            .values()
            .map(|p| (p.since + self.opts.manifest_timeout).min(p.last_lookup + PROVIDER_RETRY))
            .min();
        let lookups = self.transfers.values().map(|t| t.next_lookup).min();
        sched.into_iter().chain(manifests).chain(lookups).min()
    }

    fn on_timeout(&mut self) {
        let now = self.now();
        for t in self.transfers.values_mut() {
            if t.sched.poll_timeout().is_some_and(|d| d <= now) {
                t.sched.handle_timeout(now);
            }
        }
        let std_now = StdInstant::now();
        let manifest_timeout = self.opts.manifest_timeout;
        let mut expired = Vec::new();
        let mut relookup = Vec::new();
        let mut reask = Vec::new();
        for (image, t) in &mut self.transfers {
            if std_now >= t.next_lookup {
                t.next_lookup = std_now + PROVIDER_RETRY;
                relookup.push(*image);
            }
        }
        for (image, p) in &mut self.pending_manifests {
            if p.storing {
                continue;
            }
            if std_now >= p.since + manifest_timeout {
                expired.push(*image);
            } else if std_now >= p.last_lookup + PROVIDER_RETRY {
                p.last_lookup = std_now;
                relookup.push(*image);
                reask.push(*image);
            }
        }
        for image in relookup {
            self.lookup_providers(image);
        }
        let transfers = &self.transfers;
        let pending = &self.pending_manifests;
        self.site_providers
            .retain(|image, _| transfers.contains_key(image) || pending.contains_key(image));
        // Ready peers whose `GetManifest` failed (it is no longer in `asked`) are asked again.
        let ready: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(id, p)| p.site.is_some() && !self.banned.contains(id))
            .map(|(id, _)| *id)
            .collect();
        for image in reask {
            for &peer in &ready {
                self.ask_manifest(peer, image);
            }
        }
        for image in expired {
            if let Some(p) = self.pending_manifests.remove(&image) {
                let message = format!(
                    "no peer provided the manifest of image {image} within {:.1}s: is the image published and its node reachable?",
                    manifest_timeout.as_secs_f64()
                );
                for w in p.waiters {
                    w.fail(message.clone());
                }
                for m in p.mounts {
                    m.fail(message.clone());
                }
            }
            self.stage_manifest_failed(image);
        }
    }

    fn on_flush(&mut self) {
        let images: Vec<ImageId> = self
            .images
            .iter()
            .filter(|(_, img)| !img.unannounced.is_empty())
            .map(|(id, _)| *id)
            .collect();
        for image in images {
            self.flush_have(image);
        }
        for t in self.transfers.values_mut() {
            t.report_progress();
        }
        self.stage_tick();
    }

    /// Sends the chunks of `image` completed since its last Have update to every interested peer.
    /// Called every `FLUSH_INTERVAL`, and at once for a chunk a VM waited for
    /// (`wire::have_update_delay`).
    fn flush_have(&mut self, image: ImageId) {
        let Some(img) = self.images.get_mut(&image) else {
            return;
        };
        if img.unannounced.is_empty() {
            return;
        }
        let indices = std::mem::take(&mut img.unannounced);
        let peers: Vec<PeerId> = img.interested.iter().copied().collect();
        for peer in peers {
            if self.peers.contains_key(&peer) {
                let indices = indices.clone();
                self.send(peer, Message::HaveUpdate { image, indices }, Outbound::Ack);
            }
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                self.listen_addrs.push(address);
                self.write_node_json();
                if !self.notified_ready {
                    // The control socket was bound before the event loop started.
                    self.notified_ready = true;
                    let status = format!("listening on {}", self.listen_addrs[0]);
                    notify_systemd(&[
                        sd_notify::NotifyState::Ready,
                        sd_notify::NotifyState::Status(&status),
                    ]);
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                if self.banned.contains(&peer_id) {
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return;
                }
                let first = num_established.get() == 1;
                if first && self.peers.contains_key(&peer_id) {
                    // Its only connection, yet we still hold state from an earlier one (its
                    // close was not reported): that state is stale.
                    self.on_peer_gone(peer_id);
                }
                self.peers
                    .entry(peer_id)
                    .or_default()
                    .connections
                    .push(connection_id);
                if first {
                    let hello = self.hello();
                    self.send(peer_id, hello, Outbound::Hello);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                if num_established == 0 {
                    self.on_peer_gone(peer_id);
                } else if let Some(p) = self.peers.get_mut(&peer_id) {
                    // Requests that were on it fail ([`Daemon::on_outbound_failure`]) and are
                    // sent again on a remaining connection.
                    p.connections.retain(|c| *c != connection_id);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Msg(e)) => self.on_msg_event(e),
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            })) => {
                let now = self.now();
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.rtt = Some(rtt);
                }
                for t in self.transfers.values_mut() {
                    t.sched.handle_rtt(now, &peer, rtt);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                for addr in info.listen_addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                result:
                    kad::QueryResult::GetProviders(Ok(kad::GetProvidersOk::FoundProviders {
                        key,
                        providers,
                    })),
                ..
            })) => {
                let me = *self.swarm.local_peer_id();
                let found: Vec<PeerId> = providers.into_iter().collect();
                self.on_site_providers(&key, &found);
                for p in found {
                    if p != me && !self.banned.contains(&p) && !self.swarm.is_connected(&p) {
                        let _ = self.swarm.dial(p);
                    }
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(?peer_id, "dial failed: {error}");
                // A site gateway we cannot reach hands its chunks on (its record may be stale).
                if let Some(peer) = peer_id {
                    let now = self.now();
                    for t in self.transfers.values_mut() {
                        t.sched.handle_peer_unreachable(now, &peer);
                    }
                }
            }
            _ => {}
        }
    }

    /// `peer` is gone (or starts afresh): everything we asked of it and it of us is forgotten;
    /// its schedulers re-plan the chunks it was asked for.
    fn on_peer_gone(&mut self, peer: PeerId) {
        let now = self.now();
        self.peers.remove(&peer);
        // Their answers, if any still come, are ignored; their failures are nothing to retry.
        self.outbound.retain(|_, (p, _)| *p != peer);
        for t in self.transfers.values_mut() {
            t.sched.handle_peer_disconnected(now, &peer);
        }
        for img in self.images.values_mut() {
            img.interested.remove(&peer);
        }
        self.serve.handle_peer_gone(&peer);
        self.drop_peer_lanes(&peer);
        for p in self.pending_manifests.values_mut() {
            p.asked.remove(&peer);
        }
        self.stage_on_peer_gone(peer);
    }

    /// `peer` sent its `Hello` request on `conn`. A peer sends one when its first connection to
    /// us comes up, so one on a connection other than its session's means that it restarted, or
    /// that it saw every connection to us die while we still hold some: those connections are
    /// dead or dying, and whatever we sent into them is lost. So we close every other connection
    /// to it (QUIC would keep a dead one up to its idle timeout, and libp2p spreads requests and
    /// streams over all connections of a peer), forget what we asked of it (the schedulers re-plan
    /// its chunks, and the transfers' `Have` and pending `GetManifest`s go out again when its
    /// `Hello` is taken) and treat it as a peer that just came.
    pub(super) fn on_hello_request(&mut self, peer: PeerId, conn: ConnectionId, hello: &Hello) {
        if !self.peers.contains_key(&peer) {
            // Its connections are gone already (the request was queued before), or it is banned.
            return;
        }
        let restarted = self
            .peers
            .get(&peer)
            .filter(|s| s.session.is_some_and(|s| s != conn));
        if let Some(state) = restarted {
            tracing::info!(%peer, "peer started a new session (restarted?): closing its other connections and asking again");
            let rtt = state.rtt;
            let stale: Vec<ConnectionId> = state
                .connections
                .iter()
                .copied()
                .filter(|c| *c != conn)
                .collect();
            for c in stale {
                self.swarm.close_connection(c);
            }
            self.on_peer_gone(peer);
            self.peers.insert(
                peer,
                PeerState {
                    connections: vec![conn],
                    rtt,
                    ..PeerState::default()
                },
            );
        }
        if let Some(state) = self.peers.get_mut(&peer) {
            state.session = Some(conn);
        }
        self.on_peer_ready(peer, hello);
    }

    /// A peer's `Hello` arrived: it can now take part in transfers.
    fn on_peer_ready(&mut self, peer: PeerId, hello: &Hello) {
        if let Err(e) = hello.check() {
            tracing::warn!(%peer, "incompatible peer: {e}");
            let _ = self.swarm.disconnect_peer_id(peer);
            return;
        }
        let first = {
            let state = self.peers.entry(peer).or_default();
            let first = state.site.is_none();
            state.site = Some(hello.site.clone());
            state.boot_profiles = hello.capabilities.contains(Capabilities::BOOT_PROFILES);
            state.origin = hello.capabilities.contains(Capabilities::ORIGIN);
            state.capabilities = hello.capabilities;
            first
        };
        if !first || self.banned.contains(&peer) {
            return;
        }
        self.stage_on_peer_ready(peer);
        let now = self.now();
        let rtt = self.peers.get(&peer).and_then(|p| p.rtt);
        let images: Vec<ImageId> = self.transfers.keys().copied().collect();
        for image in images {
            if let Some(t) = self.transfers.get_mut(&image) {
                t.sched.handle_peer_connected(
                    now,
                    peer,
                    fetch::PeerInfo {
                        site: hello.site.clone(),
                        rtt,
                        origin: hello.capabilities.contains(Capabilities::ORIGIN),
                    },
                );
            }
            let have = self.have_message(image);
            self.send(peer, have, Outbound::Have(image));
        }
        let pending: Vec<ImageId> = self.pending_manifests.keys().copied().collect();
        for image in pending {
            self.ask_manifest(peer, image);
        }
        if hello.capabilities.contains(Capabilities::BOOT_PROFILES) {
            for image in self.boot_profiles_wanted() {
                self.send(
                    peer,
                    Message::GetBootProfile { image },
                    Outbound::BootProfile(image),
                );
            }
        }
    }

    fn ask_manifest(&mut self, peer: PeerId, image: ImageId) {
        if let Some(p) = self.pending_manifests.get_mut(&image) {
            if p.asked.insert(peer) {
                self.send(
                    peer,
                    Message::GetManifest { image },
                    Outbound::Manifest(image),
                );
            }
        }
    }

    fn have_message(&self, image: ImageId) -> Message {
        let chunks = match self.images.get(&image) {
            Some(img) => img.present.to_wire(),
            None => ChunkBitmap::new(0).to_wire(),
        };
        Message::Have { image, chunks }
    }

    fn write_node_json(&self) {
        let me = *self.swarm.local_peer_id();
        let info = NodeInfo {
            peer_id: me.to_string(),
            listen_addrs: self
                .listen_addrs
                .iter()
                .map(|a| a.clone().with_p2p(me).unwrap_or_else(|a| a).to_string())
                .collect(),
            site: self.opts.site.clone(),
            pid: std::process::id(),
        };
        let path = self.opts.data_dir.join("node.json");
        let tmp = self.opts.data_dir.join("node.json.tmp");
        let result = serde_json::to_vec_pretty(&info)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = result {
            tracing::error!(path = %path.display(), "writing node.json: {e}");
        }
    }

    /// Drains the state machines and carries out what they decided.
    fn pump(&mut self) {
        let images: Vec<ImageId> = self.transfers.keys().copied().collect();
        for image in images {
            self.pump_transfer(image);
        }
        self.pump_serve();
    }

    fn on_command(&mut self, cmd: Command) {
        let Command { request, reply } = cmd;
        match request {
            Request::Status => {
                let _ = reply.send(Reply::Done {
                    result: self.status_json(),
                });
            }
            Request::Peers => {
                let _ = reply.send(Reply::Done {
                    result: self.peers_json(),
                });
            }
            Request::Images => {
                let _ = reply.send(Reply::Done {
                    result: self.images_json(),
                });
            }
            Request::Publish {
                path,
                name,
                chunk_size,
            } => {
                let store = self.store.clone();
                let io = self.io_tx.clone();
                tokio::task::spawn_blocking(move || {
                    let result = publish_blocking(&store, &path, name, chunk_size);
                    let _ = io.send(IoDone::Published { reply, result });
                });
            }
            Request::Pull { image, output } => self.on_pull(image, output, reply),
            Request::Stage {
                image,
                peers,
                site,
                asked,
                wait,
            } => self.on_stage_command(image, peers, site, asked, wait, reply),
            Request::Mount(req) => self.on_mount(req, reply),
            Request::Umount { name } => answer(&reply, self.on_umount(&name)),
            Request::Mounts => answer(&reply, Ok(self.mounts_json())),
            Request::Clone { image, name } => answer(&reply, self.on_clone(&image, &name)),
            Request::CloneRm { name } => answer(&reply, self.on_clone_rm(&name)),
            Request::Clones => answer(&reply, Ok(self.clones_json())),
            Request::Verify => {
                let store = self.store.clone();
                let io = self.io_tx.clone();
                tokio::task::spawn_blocking(move || {
                    let result = store.verify().map(|r| {
                        let ids = |v: &[ChunkId]| v.iter().map(|i| i.to_string()).collect::<Vec<_>>();
                        serde_json::json!({
                            "clean": r.is_clean(),
                            "chunks_checked": r.chunks_checked,
                            "bytes_checked": r.bytes_checked,
                            "corrupt_chunks": ids(&r.corrupt_chunks),
                            "vanished_chunks": ids(&r.vanished_chunks),
                            "manifests_checked": r.manifests_checked,
                            "corrupt_manifests": r.corrupt_manifests.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
                            "quarantine_dir": r.quarantine_dir.display().to_string(),
                            "skipped_at_open": r.skipped_at_open.iter().map(|s| serde_json::json!({
                                "pack": s.pack.display().to_string(),
                                "offset": s.offset,
                                "len": s.len,
                                "kind": s.kind.to_string(),
                            })).collect::<Vec<_>>(),
                        })
                    });
                    let _ = io.send(IoDone::Verified { reply, result });
                });
            }
        }
    }

    fn on_pull(
        &mut self,
        image: String,
        output: Option<PathBuf>,
        reply: mpsc::UnboundedSender<Reply>,
    ) {
        let id: ImageId = match image.parse() {
            Ok(id) => id,
            Err(e) => {
                let _ = reply.send(Reply::Error {
                    message: format!("bad image id {image:?}: {e}"),
                });
                return;
            }
        };
        // Refuse a destination a rename must not replace before fetching anything
        // ([`crate::output`]); it is checked again just before the image is written.
        if let Some(Err(e)) = output.as_deref().map(crate::output::resolve) {
            let _ = reply.send(Reply::Error {
                message: e.to_string(),
            });
            return;
        }
        let waiter = Waiter::new(reply, output);
        // The user wants the whole image now.
        mounts::clear_lazy(&self.opts.data_dir, &id);
        if let Some(img) = self.images.get(&id) {
            if img.present.is_full() {
                self.finish_waiter(id, waiter);
                return;
            }
        }
        if let Some(t) = self.transfers.get_mut(&id) {
            t.add_waiter(waiter);
            // A mount's transfer may want only its Demand chunks so far.
            self.want_all_missing(id);
            return;
        }
        if self.images.contains_key(&id) {
            self.start_transfer(id, vec![waiter]);
            return;
        }
        // Manifest first: ask every connected peer and the DHT.
        self.request_manifest(id, Some(waiter), None);
    }

    /// Answers a pull waiter for a complete image (exporting it if asked to).
    fn finish_waiter(&mut self, image: ImageId, waiter: Waiter) {
        let Some(img) = self.images.get(&image) else {
            waiter.fail(format!("image {image} is not held"));
            return;
        };
        let manifest = img.manifest.clone();
        let (reply, output, bytes) = waiter.into_parts();
        let summary = serde_json::json!({
            "image": image.to_string(),
            "name": manifest.name,
            "size": manifest.image_size,
            "chunks": manifest.chunk_count(),
            "bytes_fetched": bytes,
        });
        match output {
            None => {
                let _ = reply.send(Reply::Done { result: summary });
            }
            Some(path) => {
                let store = self.store.clone();
                let io = self.io_tx.clone();
                tokio::task::spawn_blocking(move || {
                    let result = export_blocking(&store, &manifest, &path).map(|()| {
                        let mut s = summary;
                        s["output"] = serde_json::Value::String(path.display().to_string());
                        s
                    });
                    let _ = io.send(IoDone::Exported { reply, result });
                });
            }
        }
    }

    fn on_io(&mut self, done: IoDone) {
        match done {
            IoDone::Checked(checked) => self.on_checked(checked),
            IoDone::Stored {
                chunks,
                bytes,
                result,
            } => self.on_batch_stored(chunks, bytes, result),
            IoDone::ManifestStored { manifest, present } => {
                let id = manifest.id();
                let present = match present {
                    Ok(p) => p,
                    Err(e) => {
                        if let Some(p) = self.pending_manifests.remove(&id) {
                            for w in p.waiters {
                                w.fail(format!("storing the manifest of {id}: {e}"));
                            }
                            for m in p.mounts {
                                m.fail(format!("storing the manifest of {id}: {e}"));
                            }
                        }
                        self.stage_manifest_failed(id);
                        return;
                    }
                };
                self.images.insert(id, Image::new(manifest, present));
                self.provide(id);
                let (waiters, mounts) = self
                    .pending_manifests
                    .remove(&id)
                    .map(|p| (p.waiters, p.mounts))
                    .unwrap_or_default();
                if self.images.get(&id).is_some_and(|i| i.present.is_full()) {
                    for w in waiters {
                        self.finish_waiter(id, w);
                    }
                } else if !waiters.is_empty() {
                    self.start_transfer(id, waiters);
                }
                for m in mounts {
                    self.finish_mount(m);
                }
                self.stage_manifest_stored(id);
            }
            IoDone::Published { reply, result } => match result {
                Ok((manifest, present, summary)) => {
                    let id = manifest.id();
                    self.images.insert(id, Image::new(manifest, present));
                    self.provide(id);
                    let _ = reply.send(Reply::Done { result: summary });
                }
                Err(e) => {
                    let _ = reply.send(Reply::Error {
                        message: e.to_string(),
                    });
                }
            },
            IoDone::Verified { reply, result } => {
                // The store told of every chunk `verify` dropped before it returned: act on them
                // before answering, so that what the operator looks at next is already right.
                while let Ok(id) = self.dropped_rx.try_recv() {
                    self.on_chunk_dropped(id);
                }
                let _ = reply.send(match result {
                    Ok(result) => Reply::Done { result },
                    Err(e) => Reply::Error {
                        message: e.to_string(),
                    },
                });
            }
            IoDone::Exported { reply, result } => {
                let _ = reply.send(match result {
                    Ok(result) => Reply::Done { result },
                    Err(e) => Reply::Error {
                        message: e.to_string(),
                    },
                });
            }
        }
    }

    /// Logs a warning for each bootstrap address whose peer we are not connected to.
    fn warn_unanswered_bootstrap(&self) {
        for addr in &self.opts.bootstrap {
            if peer_id_of(addr).is_some_and(|p| !self.swarm.is_connected(&p)) {
                tracing::warn!(
                    %addr,
                    "bootstrap peer {addr} has not answered within {}s: is it running and reachable?",
                    BOOTSTRAP_WARN_AFTER.as_secs()
                );
            }
        }
    }

    fn status_json(&self) -> serde_json::Value {
        let in_flight: u32 = self
            .transfers
            .values()
            .map(|t| t.sched.stats().requests_in_flight)
            .sum();
        let st = self.store.stats();
        let store =
            serde_json::json!({ "chunks": st.chunks, "bytes": st.bytes, "images": st.images });
        serde_json::json!({
            "peer_id": self.swarm.local_peer_id().to_string(),
            "site": self.opts.site,
            "listen_addrs": self.listen_addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "peers": self.peers_json(),
            "images": self.images_json(),
            "fetches_in_flight": in_flight,
            "unstored_bytes": self.ingest.unstored_bytes(),
            "serving": {
                "queued": self.serve.len(),
                "active": self.serve.active_uploads(),
                // The relay tree's fan-out in use and what it was chosen from.
                "demand_fanout": self.serve.demand_fanout(),
                "demand_fanout_max": self.serve.fanout_rule().max(),
                "chunk_upload_ms": self.serve.fanout_rule().chunk_time().map(|d| d.as_secs_f64() * 1e3),
                "hop_latency_ms": self.serve.fanout_rule().hop_latency().map(|d| d.as_secs_f64() * 1e3),
            },
            "banned": self.banned.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
            "bootstrap": self.opts.bootstrap.iter().map(|a| serde_json::json!({
                "addr": a.to_string(),
                "connected": peer_id_of(a).is_some_and(|p| self.swarm.is_connected(&p)),
            })).collect::<Vec<_>>(),
            "store": store,
            "metrics": self.metrics.snapshot(),
        })
    }

    fn peers_json(&self) -> serde_json::Value {
        let peers: BTreeMap<String, serde_json::Value> = self
            .peers
            .iter()
            .map(|(id, p)| {
                (
                    id.to_string(),
                    serde_json::json!({
                        "site": p.site,
                        "rtt_ms": p.rtt.map(|r| r.as_secs_f64() * 1000.0),
                        "origin": p.origin,
                    }),
                )
            })
            .collect();
        serde_json::to_value(peers).unwrap_or(serde_json::Value::Null)
    }

    fn images_json(&self) -> serde_json::Value {
        let mut v: Vec<serde_json::Value> = self
            .images
            .iter()
            .map(|(id, img)| {
                let mounts = self.mount_names(id);
                let stats = self.transfers.get(id).map(|t| t.sched.stats());
                // What is happening to it now: `complete`; `fetching` (some chunks are wanted:
                // a pull, a stage, a prefetch, or a mount's reads); `idle` (incomplete and
                // nothing wanted, e.g. a lazy mount between reads).
                let activity = if img.present.is_full() {
                    "complete"
                } else if stats.is_some_and(|s| s.wanted > 0) {
                    "fetching"
                } else {
                    "idle"
                };
                serde_json::json!({
                    "id": id.to_string(),
                    "name": img.manifest.name,
                    "size": img.manifest.image_size,
                    "chunks": img.manifest.chunk_count(),
                    "present": img.present.count(),
                    "complete": img.present.is_full(),
                    // Whether a transfer exists (a pull, a stage, a prefetch, or a mount of an
                    // incomplete image even while it fetches nothing): `activity` says more.
                    "pulling": self.transfers.contains_key(id),
                    "activity": activity,
                    // Exports serving it, and the widest prefetch among them (null: none).
                    "prefetch": (!mounts.is_empty()).then(|| self.prefetch_mode(id)),
                    "mounts": mounts,
                    // While a transfer exists: chunks wanted (queued or in flight), of those for
                    // VMs' reads (Demand), and requests in flight.
                    "wanted": stats.map(|s| s.wanted),
                    "wanted_demand": stats.map(|s| s.wanted_demand),
                    "requests_in_flight": stats.map(|s| s.requests_in_flight),
                    // While a transfer runs: chunks some connected peer holds, as far as we know
                    // from their Have sets (what a pull or a lazy mount can still get).
                    "peer_held": self.transfers.get(id).map(|t| t.sched.chunks_with_holders()),
                    // Whether we are (while pulling; else were, at the end of the last pull) one
                    // of our site's gateways for the image, and how many were named (0: none).
                    "site_gateway": self.transfers.get(id).map_or(img.last_site_gateway.0, |t| t.sched.is_site_gateway()),
                    "site_gateways": self.transfers.get(id).map_or(img.last_site_gateway.1, |t| t.site_gateways),
                })
            })
            .collect();
        v.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        serde_json::Value::Array(v)
    }
}

/// Sends a command's single answer.
fn answer(reply: &mpsc::UnboundedSender<Reply>, result: Result<serde_json::Value, String>) {
    let _ = reply.send(match result {
        Ok(result) => Reply::Done { result },
        Err(message) => Reply::Error { message },
    });
}

fn publish_blocking(
    store: &ChunkStore,
    path: &Path,
    name: Option<String>,
    chunk_size: u32,
) -> Result<(Manifest, ChunkBitmap, serde_json::Value), StoreError> {
    let file = std::fs::File::open(path).map_err(|source| StoreError::Io {
        action: "open image file",
        path: path.to_path_buf(),
        source,
    })?;
    let name = name.unwrap_or_else(|| {
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into())
    });
    let (manifest, stats) = store.import_image(
        std::io::BufReader::with_capacity(1 << 20, file),
        chunk_size,
        name,
        None,
        BTreeMap::new(),
    )?;
    let present = store.image_status(&manifest).present;
    let summary = serde_json::json!({
        "image": manifest.id().to_string(),
        "name": manifest.name,
        "size": manifest.image_size,
        "chunk_size": manifest.chunk_size,
        "chunks": manifest.chunk_count(),
        "stored_chunks": stats.stored_chunks,
        "deduplicated_chunks": stats.deduplicated_chunks,
        "stored_bytes": stats.stored_bytes,
        "zero_chunks": stats.zero_chunks,
    });
    Ok((manifest, present, summary))
}

fn export_blocking(store: &ChunkStore, manifest: &Manifest, path: &Path) -> Result<(), StoreError> {
    // Writes `<path>.vmswarm-partial`, re-verifies every chunk, fsyncs, renames over `path`
    // (or over the regular file a symlink at `path` leads to; anything else is refused).
    let target = crate::output::resolve(path).map_err(|e| StoreError::Io {
        action: "export to",
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    store.export_to_file(manifest, &target).map(|_| ())
}
