//! Mounts: NBD exports of images and clones, owned by the daemon's task, and the Demand fetches
//! their reads cause.
//!
//! This module decides:
//! - **Lifecycle.** `mount` binds (or joins) a listener for the `--nbd` address, builds a
//!   [`MountExport`] and adds it to that listener's export table; `umount` removes it, which closes
//!   its connections, and drops the listener (and its socket file) with the last export. Exports are
//!   not persisted: they end with the daemon (clones and their data are persisted; see
//!   [`crate::overlay`]). Mounting an image whose manifest the node lacks fetches the manifest first
//!   through the pull path (`pending_manifests`), without wanting any chunk, and marks the image
//!   *lazy* (`DATA/lazy/<id>`), so that a restart does not turn it into a full pull.
//! - **Clones.** `clone IMAGE` needs the image's manifest in the store (fully or partly held):
//!   an image the node does not know is refused at once, with nothing created, rather than
//!   failing at mount time (a pull or a lazy mount fetches the manifest first).
//! - **Demand.** A read's [`DemandRequest`] for an absent chunk becomes one Demand want in the
//!   image's fetch scheduler (creating a transfer that wants nothing else if there is none). Every
//!   request for the same chunk joins the same waiters list: one fetch, however many readers. The
//!   waiters are answered when the chunk is stored, or with the reason when the scheduler gives up
//!   on it (its `demand_deadline` / `unavailable_deadline`) or the store fails.
//! - **Prefetch.** A mount's [`PrefetchMode`] says what it fetches beyond its reads' Demand
//!   chunks; the scheduler keeps Demand ahead of it either way.
//!   - `--prefetch` (`--prefetch=all`) wants every missing chunk at Background priority, in
//!     boot-profile order first when the image has one ([`crate::profile`]).
//!   - `--prefetch=profile` wants only the chunks of the image's boot profile, in profile order, at
//!     Background priority, and leaves the rest to on-demand reads: what booting many clones of
//!     one image needs, without copying whole images (the simulator's `prefetch = "profile"`).
//!     Without a local profile it asks its peers ([`Daemon::ask_boot_profiles`]) and, once one
//!     arrives ([`Daemon::on_boot_profile`]), wants that profile's chunks. With no profile at all
//!     it wants nothing more than the reads do (logged), and never falls back to the whole image.
//!
//!   The mode is shown by `vmswarm mounts` (and in the `mount` answer). Exports are not persisted,
//!   so neither is the mode; what a restart keeps is the image's lazy marker, so a partly fetched
//!   image stays partial (it is not resumed as a full pull) until it is mounted again.
//! - **Attribution.** Chunk bytes fetched are counted for the export that first demanded the chunk,
//!   or for the prefetching export of the image.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use vmswarm_protocol::fetch::FailReason;
use vmswarm_protocol::{ImageId, Priority};

use super::{Daemon, PendingManifest};
use crate::control::{MountRequest, PrefetchMode, Reply};
use crate::metrics::ExportMetrics;
use crate::nbd::NbdAddr;
use crate::nbd::export::{DemandRequest, ExportParts, MountExport};
use crate::nbd::server::{self, Backend, ExportTable};
use crate::overlay::Overlay;
use crate::profile::{self, Recorder};

/// A mount request, as parsed from the control command.
#[derive(Debug)]
pub(super) struct MountSpec {
    image: ImageId,
    clone: Option<String>,
    addr: NbdAddr,
    name: Option<String>,
    prefetch: PrefetchMode,
}

/// A mount waiting for its image's manifest.
#[derive(Debug)]
pub(super) struct PendingMount {
    spec: MountSpec,
    reply: mpsc::UnboundedSender<Reply>,
}

impl PendingMount {
    pub(super) fn fail(self, message: String) {
        let _ = self.reply.send(Reply::Error { message });
    }
}

/// A read waiting for a chunk.
#[derive(Debug)]
struct Waiter {
    export: Arc<ExportMetrics>,
    since: StdInstant,
    reply: oneshot::Sender<Result<(), String>>,
}

#[derive(Debug)]
struct Listener {
    table: ExportTable<MountExport>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug)]
struct Mount {
    image: ImageId,
    clone: Option<String>,
    addr: NbdAddr,
    prefetch: PrefetchMode,
    export: Arc<MountExport>,
    recorder: Option<Arc<Recorder>>,
    recorder_task: Option<tokio::task::JoinHandle<()>>,
}

/// What `DATA/clones/NAME/clone.json` says.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CloneInfo {
    image: String,
}

/// The daemon's mount state.
#[derive(Debug)]
pub(super) struct Mounts {
    demand_tx: mpsc::UnboundedSender<DemandRequest>,
    listeners: HashMap<NbdAddr, Listener>,
    mounts: BTreeMap<String, Mount>,
    waiters: HashMap<(ImageId, u32), Vec<Waiter>>,
    /// Chunks accepted from a peer and being written to the store.
    storing: HashSet<(ImageId, u32)>,
    prefetching: HashMap<ImageId, Arc<ExportMetrics>>,
    /// How long a mount records its boot profile.
    pub(super) profile_window: Duration,
}

impl Mounts {
    pub(super) fn new(
        demand_tx: mpsc::UnboundedSender<DemandRequest>,
        profile_window: Duration,
    ) -> Self {
        Mounts {
            demand_tx,
            listeners: HashMap::new(),
            mounts: BTreeMap::new(),
            waiters: HashMap::new(),
            storing: HashSet::new(),
            prefetching: HashMap::new(),
            profile_window,
        }
    }
}

/// Export and clone names: what NBD URIs, file names and metric labels can all carry.
fn check_name(kind: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{kind} name {name:?} must be 1-64 characters of A-Z a-z 0-9 . _ - and not start with '.'"
        ))
    }
}

/// An image name turned into a default export name.
fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    let s = s.trim_start_matches('.').to_owned();
    if s.is_empty() { "image".into() } else { s }
}

fn clone_dir(data: &Path, name: &str) -> PathBuf {
    data.join("clones").join(name)
}

fn lazy_marker(data: &Path, image: &ImageId) -> PathBuf {
    data.join("lazy").join(image.to_string())
}

/// Whether `image` was only ever mounted (fetched lazily), so a restart must not pull it whole.
pub(super) fn is_lazy(data: &Path, image: &ImageId) -> bool {
    lazy_marker(data, image).exists()
}

/// A pull wants the whole image: it is no longer lazy.
pub(super) fn clear_lazy(data: &Path, image: &ImageId) {
    let _ = std::fs::remove_file(lazy_marker(data, image));
}

fn mark_lazy(data: &Path, image: &ImageId) -> std::io::Result<()> {
    std::fs::create_dir_all(data.join("lazy"))?;
    std::fs::write(lazy_marker(data, image), b"")
}

fn read_clone(data: &Path, name: &str) -> Result<ImageId, String> {
    check_name("clone", name)?;
    let p = clone_dir(data, name).join("clone.json");
    let bytes = std::fs::read(&p).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            format!(
                "no clone named {name:?} (create it with `vmswarm clone IMAGE_ID --name {name}`)"
            )
        } else {
            format!("reading {}: {e}", p.display())
        }
    })?;
    let info: CloneInfo =
        serde_json::from_slice(&bytes).map_err(|e| format!("{} is damaged: {e}", p.display()))?;
    info.image
        .parse()
        .map_err(|e| format!("{} names a bad image id: {e}", p.display()))
}

/// Binds a listener socket for `addr`. A leftover unix socket file nobody listens on is replaced;
/// any other existing file is refused.
fn bind(addr: &NbdAddr) -> Result<BoundListener, String> {
    match addr {
        NbdAddr::Unix(path) => {
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                use std::os::unix::fs::FileTypeExt;
                if !meta.file_type().is_socket() {
                    return Err(format!("{} exists and is not a socket", path.display()));
                }
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(format!("{} is in use by another server", path.display()));
                }
                std::fs::remove_file(path)
                    .map_err(|e| format!("removing stale socket {}: {e}", path.display()))?;
            }
            let l = std::os::unix::net::UnixListener::bind(path)
                .map_err(|e| format!("binding {}: {e}", path.display()))?;
            l.set_nonblocking(true)
                .map_err(|e| format!("binding {}: {e}", path.display()))?;
            tokio::net::UnixListener::from_std(l)
                .map(BoundListener::Unix)
                .map_err(|e| format!("binding {}: {e}", path.display()))
        }
        NbdAddr::Tcp(a) => {
            let l = std::net::TcpListener::bind(a).map_err(|e| format!("binding {a}: {e}"))?;
            l.set_nonblocking(true)
                .map_err(|e| format!("binding {a}: {e}"))?;
            tokio::net::TcpListener::from_std(l)
                .map(BoundListener::Tcp)
                .map_err(|e| format!("binding {a}: {e}"))
        }
    }
}

enum BoundListener {
    Unix(tokio::net::UnixListener),
    Tcp(tokio::net::TcpListener),
}

/// Connections one listener serves at once; more are closed on accept.
const MAX_CONNECTIONS: usize = 256;

async fn accept_loop(listener: BoundListener, table: ExportTable<MountExport>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = crate::accept::Backoff::new("NBD listener");
    loop {
        match &listener {
            BoundListener::Unix(l) => match l.accept().await {
                Ok((s, _)) => {
                    backoff.accepted();
                    spawn_conn(s, table.clone(), &slots)
                }
                Err(e) => backoff.failed(&e).await,
            },
            BoundListener::Tcp(l) => match l.accept().await {
                Ok((s, _)) => {
                    backoff.accepted();
                    let _ = s.set_nodelay(true);
                    spawn_conn(s, table.clone(), &slots)
                }
                Err(e) => backoff.failed(&e).await,
            },
        }
    }
}

fn spawn_conn<S>(s: S, table: ExportTable<MountExport>, slots: &Arc<tokio::sync::Semaphore>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let Ok(slot) = slots.clone().try_acquire_owned() else {
        tracing::warn!("NBD listener at {MAX_CONNECTIONS} connections: refusing one more");
        return; // dropping `s` closes it
    };
    tokio::spawn(async move {
        if let Err(e) = server::serve_connection(s, table).await {
            tracing::info!("NBD connection closed: {e}");
        }
        drop(slot);
    });
}

impl Daemon {
    /// `vmswarm mount`.
    pub(super) fn on_mount(&mut self, req: MountRequest, reply: mpsc::UnboundedSender<Reply>) {
        let MountRequest {
            image,
            clone,
            nbd,
            name,
            prefetch,
            allow_remote,
        } = req;
        let fail = |m: String| {
            let _ = reply.send(Reply::Error { message: m });
        };
        let addr: NbdAddr = match nbd.parse() {
            Ok(a) => a,
            Err(e) => return fail(format!("{e}")),
        };
        if addr.is_remote() && !allow_remote {
            return fail(format!(
                "{addr} is not a loopback address; NBD has no authentication, so pass --nbd-allow-remote to export beyond this host"
            ));
        }
        if let Some(n) = &name {
            if let Err(e) = check_name("export", n) {
                return fail(e);
            }
        }
        let image = match (image, &clone) {
            (Some(i), None) => match i.parse::<ImageId>() {
                Ok(id) => id,
                Err(e) => return fail(format!("bad image id {i:?}: {e}")),
            },
            (None, Some(c)) => match read_clone(&self.opts.data_dir, c) {
                Ok(id) => id,
                Err(e) => return fail(e),
            },
            _ => return fail("give exactly one of IMAGE_ID and --clone NAME".into()),
        };
        if let Some(c) = &clone {
            if let Some((n, _)) = self
                .mounts
                .mounts
                .iter()
                .find(|(_, m)| m.clone.as_deref() == Some(c.as_str()))
            {
                return fail(format!("clone {c:?} is already mounted as export {n:?}"));
            }
        }
        let pending = PendingMount {
            spec: MountSpec {
                image,
                clone,
                addr,
                name,
                prefetch,
            },
            reply,
        };
        if self.images.contains_key(&image) {
            self.finish_mount(pending);
            return;
        }
        // Manifest first, through the pull path, wanting no chunk.
        if let Err(e) = mark_lazy(&self.opts.data_dir, &image) {
            return pending.fail(format!("marking image {image} as lazily mounted: {e}"));
        }
        self.request_manifest(image, None, Some(pending));
    }

    /// The manifest of a pending mount's image is stored (or the mount was for a held image).
    pub(super) fn finish_mount(&mut self, p: PendingMount) {
        let PendingMount { spec, reply } = p;
        match self.create_mount(spec) {
            Ok(result) => {
                let _ = reply.send(Reply::Done { result });
            }
            Err(message) => {
                let _ = reply.send(Reply::Error { message });
            }
        }
    }

    fn create_mount(&mut self, spec: MountSpec) -> Result<serde_json::Value, String> {
        let Some(img) = self.images.get(&spec.image) else {
            return Err(format!("image {} is not known", spec.image));
        };
        let manifest = img.manifest.clone();
        let name = match (&spec.name, &spec.clone) {
            (Some(n), _) => n.clone(),
            (None, Some(c)) => c.clone(),
            (None, None) => sanitize(&manifest.name),
        };
        if self.mounts.mounts.contains_key(&name) {
            return Err(format!(
                "an export named {name:?} exists already (choose another with --name)"
            ));
        }
        let overlay = match &spec.clone {
            Some(c) => {
                let dir = clone_dir(&self.opts.data_dir, c);
                Some(Arc::new(
                    Overlay::open(&dir, manifest.image_size).map_err(|e| e.to_string())?,
                ))
            }
            None => None,
        };
        // Record a boot profile unless the image has one.
        let has_profile = profile::path(&self.opts.data_dir, &spec.image).exists();
        let recorder = (!has_profile).then(|| {
            Arc::new(Recorder::new(
                manifest.chunk_count(),
                self.mounts.profile_window,
            ))
        });
        let metrics = Arc::new(ExportMetrics::default());
        let export = Arc::new(MountExport::new(ExportParts {
            name: name.clone(),
            image: spec.image,
            manifest: manifest.clone(),
            store: self.store.clone(),
            demand: self.mounts.demand_tx.clone(),
            backstop: self
                .opts
                .fetch
                .demand_deadline
                .max(self.opts.fetch.unavailable_deadline)
                + Duration::from_secs(10),
            overlay,
            metrics: metrics.clone(),
            recorder: recorder.clone(),
        }));
        if !self.mounts.listeners.contains_key(&spec.addr) {
            let bound = bind(&spec.addr)?;
            if let NbdAddr::Unix(path) = &spec.addr {
                // Only the daemon's user may connect (like the control socket).
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
            }
            let table = ExportTable::default();
            let task = tokio::spawn(accept_loop(bound, table.clone()));
            self.mounts
                .listeners
                .insert(spec.addr.clone(), Listener { table, task });
        }
        let Some(listener) = self.mounts.listeners.get(&spec.addr) else {
            return Err("internal error: listener vanished".into());
        };
        if !listener.table.insert(export.clone()) {
            return Err(format!(
                "an export named {name:?} exists already on {}",
                spec.addr
            ));
        }
        self.metrics.register_export(&name, metrics.clone());
        let recorder_task = recorder.as_ref().map(|r| {
            let r = r.clone();
            let data = self.opts.data_dir.clone();
            let image = spec.image;
            tokio::spawn(async move {
                tokio::time::sleep(r.window()).await;
                let _ = tokio::task::spawn_blocking(move || save_profile(&data, &image, &r)).await;
            })
        });
        if spec.prefetch.is_some() {
            self.start_prefetch(spec.image, metrics, spec.prefetch);
        } else if !self.transfers.contains_key(&spec.image)
            && self
                .images
                .get(&spec.image)
                .is_some_and(|i| !i.present.is_full())
        {
            // A lazy mount's transfer starts now, wanting nothing: peers' Have sets, RTTs and the
            // provider lookup are in place before the first read, and the transfer lives as long
            // as the mount ([`Daemon::is_mounted`]), so a read never waits for them again.
            self.start_transfer_wanting(spec.image, Vec::new(), false);
        }
        let result = serde_json::json!({
            "name": name,
            "image": spec.image.to_string(),
            "clone": spec.clone,
            "nbd": spec.addr.to_string(),
            "uri": spec.addr.uri(&name),
            "size": manifest.image_size,
            "writable": spec.clone.is_some(),
            "prefetch": spec.prefetch,
        });
        tracing::info!(export = %name, image = %spec.image, addr = %spec.addr, prefetch = %spec.prefetch, "mounted");
        self.mounts.mounts.insert(
            name,
            Mount {
                image: spec.image,
                clone: spec.clone,
                addr: spec.addr,
                prefetch: spec.prefetch,
                export,
                recorder,
                recorder_task,
            },
        );
        Ok(result)
    }

    /// Starts a mount's background fetch of `image` as `mode` says (not [`PrefetchMode::None`]).
    fn start_prefetch(&mut self, image: ImageId, metrics: Arc<ExportMetrics>, mode: PrefetchMode) {
        let Some(img) = self.images.get(&image) else {
            return;
        };
        if img.present.is_full() || mode == PrefetchMode::None {
            return;
        }
        let chunks = img.manifest.chunk_count();
        let order = match profile::load(&self.opts.data_dir, &image, chunks) {
            Ok(p) => p.map(|p| p.order),
            Err(e) => {
                tracing::warn!(%image, "ignoring boot profile: {e}");
                None
            }
        };
        self.mounts.prefetching.entry(image).or_insert(metrics);
        let now = self.now();
        match mode {
            PrefetchMode::None => {}
            PrefetchMode::All => {
                if let Some(t) = self.transfers.get_mut(&image) {
                    if let Some(order) = &order {
                        t.sched.set_priority_order(now, order);
                    }
                    self.want_all_missing(image);
                } else {
                    self.start_transfer_wanting(image, Vec::new(), true);
                    if let (Some(order), Some(t)) = (&order, self.transfers.get_mut(&image)) {
                        t.sched.set_priority_order(now, order);
                    }
                }
                if order.is_some() {
                    tracing::info!(%image, "prefetching in boot-profile order");
                }
            }
            PrefetchMode::Profile => {
                // The transfer lives as long as the mount, wanting the profile's chunks if any.
                if !self.transfers.contains_key(&image) {
                    self.start_transfer_wanting(image, Vec::new(), false);
                }
                match &order {
                    Some(order) => self.want_profile(image, order),
                    None => tracing::info!(
                        %image,
                        "profile prefetch: no boot profile here, asking peers; until one arrives only chunks that reads need are fetched (not the whole image)"
                    ),
                }
            }
        }
        if order.is_none() {
            self.ask_boot_profiles(image);
        }
    }

    /// The widest background fetch that the mounts of `image` ask for.
    pub(super) fn prefetch_mode(&self, image: &ImageId) -> PrefetchMode {
        let modes = self.mounts.mounts.values().filter(|m| m.image == *image);
        modes.fold(PrefetchMode::None, |acc, m| match (acc, m.prefetch) {
            (PrefetchMode::All, _) | (_, PrefetchMode::All) => PrefetchMode::All,
            (PrefetchMode::Profile, _) | (_, PrefetchMode::Profile) => PrefetchMode::Profile,
            _ => PrefetchMode::None,
        })
    }

    /// A profile-only prefetch: ranks Background work by `order` and wants the missing chunks of
    /// `order` (and only those) at Background priority in `image`'s transfer.
    fn want_profile(&mut self, image: ImageId, order: &[u32]) {
        let Some(img) = self.images.get(&image) else {
            return;
        };
        let missing: Vec<u32> = order
            .iter()
            .copied()
            .filter(|&i| {
                i < img.manifest.chunk_count()
                    && !img.present.contains(i)
                    && !self.mounts.storing.contains(&(image, i))
            })
            .collect();
        let now = self.now();
        if let Some(t) = self.transfers.get_mut(&image) {
            t.sched.set_priority_order(now, order);
            // In range by construction; chunks already wanted keep their (higher) priority.
            let _ = t
                .sched
                .handle_want_many(now, missing.iter().copied(), Priority::Background);
            tracing::info!(
                %image,
                profile_chunks = order.len(),
                missing = missing.len(),
                "prefetching the boot profile only (the rest on demand)"
            );
        }
    }

    /// Asks every ready peer that knows boot profiles for `image`'s; the first valid answer is
    /// saved and applied ([`Daemon::on_boot_profile`]).
    pub(super) fn ask_boot_profiles(&mut self, image: ImageId) {
        let peers: Vec<libp2p::PeerId> = self
            .peers
            .iter()
            .filter(|(id, p)| p.site.is_some() && p.boot_profiles && !self.banned.contains(id))
            .map(|(id, _)| *id)
            .collect();
        for peer in peers {
            self.send(
                peer,
                vmswarm_protocol::wire::Message::GetBootProfile { image },
                super::Outbound::BootProfile(image),
            );
        }
    }

    /// Whether a running prefetch (or staged pull, [`super::stage`]) of `image` still waits for a
    /// peer's boot profile.
    pub(super) fn wants_boot_profile(&self, image: ImageId) -> bool {
        (self.mounts.prefetching.contains_key(&image) || self.staged.contains(&image))
            && self.transfers.contains_key(&image)
            && !profile::path(&self.opts.data_dir, &image).exists()
    }

    /// The images whose prefetch still waits for a peer's boot profile (a peer that comes is
    /// asked for them).
    pub(super) fn boot_profiles_wanted(&self) -> Vec<ImageId> {
        self.mounts
            .prefetching
            .keys()
            .chain(self.staged.iter())
            .copied()
            .filter(|image| self.wants_boot_profile(*image))
            .collect::<HashSet<ImageId>>()
            .into_iter()
            .collect()
    }

    /// Answers a peer's `GetBootProfile` from the local profile, if any (at most
    /// [`vmswarm_protocol::wire::MAX_UPDATE_INDICES`] entries: the head of the order).
    pub(super) fn boot_profile_answer(&self, image: ImageId) -> vmswarm_protocol::wire::Message {
        use vmswarm_protocol::wire::{MAX_UPDATE_INDICES, Message};
        let loaded = self
            .images
            .get(&image)
            .map(|img| profile::load(&self.opts.data_dir, &image, img.manifest.chunk_count()));
        match loaded {
            Some(Ok(Some(mut p))) => {
                p.order.truncate(MAX_UPDATE_INDICES);
                Message::BootProfile {
                    image,
                    order: p.order,
                }
            }
            _ => Message::BootProfileNotFound { image },
        }
    }

    /// A peer sent the boot profile of `image`: if we still lack one, check it, save it and apply it
    /// to a running prefetch: it ranks a whole-image prefetch's Background work, and it is what a
    /// profile-only prefetch wants. A bad one thus costs order (or, for a profile-only prefetch, at
    /// most the chunks a whole-image prefetch would fetch anyway), never correctness; one with
    /// out-of-range or repeated indices is refused.
    pub(super) fn on_boot_profile(
        &mut self,
        peer: libp2p::PeerId,
        image: ImageId,
        order: Vec<u32>,
    ) {
        let Some(chunks) = self.images.get(&image).map(|i| i.manifest.chunk_count()) else {
            return;
        };
        if order.is_empty() || profile::path(&self.opts.data_dir, &image).exists() {
            return;
        }
        let mut seen = vec![false; chunks as usize];
        for &i in &order {
            match seen.get_mut(i as usize) {
                Some(s) if !*s => *s = true,
                _ => {
                    tracing::warn!(%peer, %image, "peer sent an invalid boot profile");
                    return;
                }
            }
        }
        match profile::save_if_absent(
            &self.opts.data_dir,
            &image,
            self.mounts.profile_window,
            order.clone(),
        ) {
            Ok(_) => {}
            Err(e) => tracing::warn!(%image, "saving a peer's boot profile: {e}"),
        }
        if !self.mounts.prefetching.contains_key(&image) && !self.staged.contains(&image) {
            return;
        }
        if !self.staged.contains(&image) && self.prefetch_mode(&image) == PrefetchMode::Profile {
            // Profile-only mounts: the profile's chunks are what they want.
            tracing::info!(%image, %peer, "boot profile from a peer: prefetching its chunks");
            self.want_profile(image, &order);
            return;
        }
        let now = self.now();
        if let Some(t) = self.transfers.get_mut(&image) {
            t.sched.set_priority_order(now, &order);
            tracing::info!(%image, %peer, "prefetching in boot-profile order (profile from a peer)");
        }
    }

    /// Wants every missing chunk of `image` at Background priority in its existing transfer (a pull
    /// or a prefetch joining a transfer that so far only served Demand reads).
    pub(super) fn want_all_missing(&mut self, image: ImageId) {
        let Some(img) = self.images.get(&image) else {
            return;
        };
        let missing: Vec<u32> = (0..img.manifest.chunk_count())
            .filter(|&i| !img.present.contains(i) && !self.mounts.storing.contains(&(image, i)))
            .collect();
        let now = self.now();
        if let Some(t) = self.transfers.get_mut(&image) {
            // In range by construction; chunks already wanted keep their (higher) priority.
            let _ = t.sched.handle_want_many(now, missing, Priority::Background);
        }
    }

    /// Whether some export serves `image` (its transfer then stays, wanting or not).
    pub(super) fn is_mounted(&self, image: &ImageId) -> bool {
        self.mounts.mounts.values().any(|m| m.image == *image)
    }

    /// The names of the exports that serve `image` (an image's or a clone's), in name order.
    pub(super) fn mount_names(&self, image: &ImageId) -> Vec<&str> {
        self.mounts
            .mounts
            .iter()
            .filter(|(_, m)| m.image == *image)
            .map(|(name, _)| name.as_str())
            .collect()
    }

    /// `vmswarm umount`.
    pub(super) fn on_umount(&mut self, name: &str) -> Result<serde_json::Value, String> {
        let Some(m) = self.mounts.mounts.remove(name) else {
            return Err(format!("no export named {name:?} (see `vmswarm mounts`)"));
        };
        let image = m.image;
        let result = self.drop_mount(name, m);
        self.after_last_umount(image);
        result?;
        Ok(serde_json::json!({ "name": name }))
    }

    /// Once no export serves `image`, its mounts' fetches end: prefetch (Background) wants are
    /// dropped unless a pull wants the whole image, and an idle transfer is finished.
    fn after_last_umount(&mut self, image: ImageId) {
        if self.is_mounted(&image) {
            return;
        }
        self.mounts.prefetching.remove(&image);
        let now = self.now();
        let mut dropped = Vec::new();
        if let Some(t) = self.transfers.get_mut(&image) {
            if t.waiters.is_empty() {
                dropped = (0..t.sched.chunk_count())
                    .filter(|&i| t.sched.is_wanted(i))
                    .collect();
                t.sched.handle_unwant_many(now, dropped.iter().copied());
            }
        }
        // Reads still waiting came through the closed exports: nobody is left to answer.
        for index in dropped {
            self.fail_waiters(image, index, "the export was unmounted");
        }
        self.pump_transfer(image);
    }

    fn drop_mount(&mut self, name: &str, m: Mount) -> Result<(), String> {
        if let Some(l) = self.mounts.listeners.get(&m.addr) {
            l.table.remove(name);
            if l.table.is_empty() {
                if let Some(l) = self.mounts.listeners.remove(&m.addr) {
                    l.task.abort();
                }
                if let NbdAddr::Unix(p) = &m.addr {
                    let _ = std::fs::remove_file(p);
                }
            }
        }
        self.metrics.unregister_export(name);
        if m.prefetch.is_some() {
            self.mounts
                .prefetching
                .retain(|_, e| !Arc::ptr_eq(e, m.export.metrics()));
        }
        if let Some(t) = &m.recorder_task {
            t.abort();
        }
        if let Some(r) = &m.recorder {
            save_profile(&self.opts.data_dir, &m.image, r);
        }
        tracing::info!(export = %name, "unmounted");
        match m.export.overlay() {
            Some(ov) => ov
                .flush()
                .map_err(|e| format!("unmounted, but flushing the clone overlay failed: {e}")),
            None => Ok(()),
        }
    }

    /// Ends every mount (daemon shutdown): overlays flushed, socket files removed.
    pub(super) fn shutdown_mounts(&mut self) {
        let names: Vec<String> = self.mounts.mounts.keys().cloned().collect();
        for name in names {
            if let Some(m) = self.mounts.mounts.remove(&name) {
                if let Err(e) = self.drop_mount(&name, m) {
                    tracing::error!(export = %name, "{e}");
                }
            }
        }
        for w in std::mem::take(&mut self.mounts.waiters)
            .into_values()
            .flatten()
        {
            let _ = w.reply.send(Err("the node is shutting down".into()));
        }
    }

    /// `vmswarm mounts`.
    pub(super) fn mounts_json(&self) -> serde_json::Value {
        let v: Vec<serde_json::Value> = self
            .mounts
            .mounts
            .iter()
            .map(|(name, m)| {
                let (present, chunks) = self
                    .images
                    .get(&m.image)
                    .map(|i| (i.present.count(), i.manifest.chunk_count()))
                    .unwrap_or((0, 0));
                serde_json::json!({
                    "name": name,
                    "image": m.image.to_string(),
                    "clone": m.clone,
                    "nbd": m.addr.to_string(),
                    "uri": m.addr.uri(name),
                    "size": m.export.info().size,
                    "writable": m.clone.is_some(),
                    "prefetch": m.prefetch,
                    "chunks": chunks,
                    "chunks_present": present,
                    "overlay_blocks": m.export.overlay().map(|o| o.overlaid_blocks()),
                    "metrics": m.export.metrics().snapshot(),
                })
            })
            .collect();
        serde_json::Value::Array(v)
    }

    /// `vmswarm clone IMAGE --name NAME`.
    pub(super) fn on_clone(
        &mut self,
        image: &str,
        name: &str,
    ) -> Result<serde_json::Value, String> {
        check_name("clone", name)?;
        let id: ImageId = image
            .parse()
            .map_err(|e| format!("bad image id {image:?}: {e}"))?;
        if !self.images.contains_key(&id) {
            return Err(format!(
                "unknown image {id}: this node holds no manifest for it (`vmswarm pull {id}` or `vmswarm mount {id}` fetches it first)"
            ));
        }
        let dir = clone_dir(&self.opts.data_dir, name);
        if dir.exists() {
            return Err(format!("a clone named {name:?} exists already"));
        }
        let parent = self.opts.data_dir.join("clones");
        let tmp = parent.join(format!(".{name}.creating"));
        let io = |e: std::io::Error| format!("creating clone {name:?}: {e}");
        std::fs::create_dir_all(&tmp).map_err(io)?;
        let info = serde_json::to_vec_pretty(&CloneInfo {
            image: id.to_string(),
        })
        .map_err(|e| io(std::io::Error::other(e)))?;
        {
            use std::io::Write;
            let mut f = std::fs::File::create(tmp.join("clone.json")).map_err(io)?;
            f.write_all(&info).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &dir).map_err(io)?;
        std::fs::File::open(&parent)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(serde_json::json!({ "name": name, "image": id.to_string() }))
    }

    /// `vmswarm clone rm NAME`.
    pub(super) fn on_clone_rm(&mut self, name: &str) -> Result<serde_json::Value, String> {
        read_clone(&self.opts.data_dir, name)?;
        if let Some((n, _)) = self
            .mounts
            .mounts
            .iter()
            .find(|(_, m)| m.clone.as_deref() == Some(name))
        {
            return Err(format!(
                "clone {name:?} is mounted as export {n:?}; `vmswarm umount {n}` first"
            ));
        }
        std::fs::remove_dir_all(clone_dir(&self.opts.data_dir, name))
            .map_err(|e| format!("removing clone {name:?}: {e}"))?;
        Ok(serde_json::json!({ "name": name, "removed": true }))
    }

    /// `vmswarm clones`.
    pub(super) fn clones_json(&self) -> serde_json::Value {
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(self.opts.data_dir.join("clones")) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue;
                }
                let image = read_clone(&self.opts.data_dir, &name).map(|i| i.to_string());
                let mounted = self
                    .mounts
                    .mounts
                    .iter()
                    .find(|(_, m)| m.clone.as_deref() == Some(name.as_str()))
                    .map(|(n, _)| n.clone());
                out.push(serde_json::json!({
                    "name": name,
                    "image": image.as_ref().ok(),
                    "error": image.err(),
                    "mounted_as": mounted,
                }));
            }
        }
        out.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        serde_json::Value::Array(out)
    }

    /// A read needs chunk `index` of `image`.
    pub(super) fn on_demand(&mut self, r: DemandRequest) {
        let DemandRequest {
            image,
            index,
            export,
            reply,
        } = r;
        let Some(img) = self.images.get(&image) else {
            let _ = reply.send(Err(format!("image {image} is not held")));
            return;
        };
        let Some(id) = img.manifest.chunks.get(index as usize).copied() else {
            let _ = reply.send(Err(format!("chunk {index} is out of range")));
            return;
        };
        // The store, not the present set, is the authority: a chunk can leave the store (found
        // rotten on a mount's first read of it) before its drop reaches `on_chunk_dropped`.
        let (zero, counted) = (
            img.manifest.is_zero_chunk(index),
            img.present.contains(index),
        );
        if zero || self.store.contains(&id) {
            let _ = reply.send(Ok(()));
            return;
        }
        if counted {
            self.on_chunk_dropped(id);
        }
        let key = (image, index);
        let first = !self.mounts.waiters.contains_key(&key);
        self.mounts.waiters.entry(key).or_default().push(Waiter {
            export,
            since: StdInstant::now(),
            reply,
        });
        if !first || self.mounts.storing.contains(&key) {
            return; // one fetch per chunk: it is wanted or being stored already
        }
        tracing::debug!(%image, index, "demand read of a missing chunk");
        if !self.transfers.contains_key(&image) {
            self.start_transfer_wanting(image, Vec::new(), false);
        }
        let now = self.now();
        let result = match self.transfers.get_mut(&image) {
            Some(t) => t
                .sched
                .handle_want(now, index, Priority::Demand)
                .map_err(|e| e.to_string()),
            None => Err("the fetch could not be started (see the daemon log)".into()),
        };
        if let Err(e) = result {
            self.fail_waiters(image, index, &e);
        }
    }

    fn fail_waiters(&mut self, image: ImageId, index: u32, why: &str) {
        for w in self
            .mounts
            .waiters
            .remove(&(image, index))
            .unwrap_or_default()
        {
            w.export
                .demand_failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let _ = w.reply.send(Err(why.to_owned()));
        }
    }

    /// Hook: chunks `indices` of `image` are now stored.
    pub(super) fn mounts_chunk_present(&mut self, image: ImageId, indices: &[u32]) {
        for &index in indices {
            self.mounts.storing.remove(&(image, index));
            let waiters = self
                .mounts
                .waiters
                .remove(&(image, index))
                .unwrap_or_default();
            for (n, w) in waiters.into_iter().enumerate() {
                w.export.demand_latency.observe(w.since.elapsed());
                if n == 0 {
                    w.export
                        .demand_chunks
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                let _ = w.reply.send(Ok(()));
            }
        }
    }

    /// Hook: the scheduler gave up on chunk `index` of `image`.
    pub(super) fn mounts_want_failed(&mut self, image: ImageId, index: u32, reason: FailReason) {
        let why = match reason {
            FailReason::DemandDeadline => format!(
                "not delivered within the Demand deadline ({:.1}s)",
                self.opts.fetch.demand_deadline.as_secs_f64()
            ),
            FailReason::Unavailable => "no connected peer holds it".to_owned(),
        };
        self.fail_waiters(image, index, &why);
    }

    /// Hook: storing a chunk of `image` failed and its transfer stopped.
    pub(super) fn mounts_store_failed(&mut self, image: ImageId, error: &str) {
        let keys: Vec<(ImageId, u32)> = self
            .mounts
            .waiters
            .keys()
            .filter(|(i, _)| *i == image)
            .copied()
            .collect();
        for (i, index) in keys {
            self.fail_waiters(i, index, &format!("storing a chunk failed: {error}"));
        }
        self.mounts.storing.retain(|(i, _)| *i != image);
    }

    /// Hook: a verified chunk of `image` arrived from a peer of `site` and is being stored.
    pub(super) fn mounts_fetched(&mut self, image: ImageId, index: u32, site: &str, len: u64) {
        if self.mounts.mounts.is_empty() {
            return;
        }
        self.mounts.storing.insert((image, index));
        let export = self
            .mounts
            .waiters
            .get(&(image, index))
            .and_then(|w| w.first())
            .map(|w| w.export.clone())
            .or_else(|| self.mounts.prefetching.get(&image).cloned());
        if let Some(e) = export {
            e.fetched(site, len);
        }
    }

    /// Asks peers and the DHT for `image`'s manifest on behalf of a pull waiter or a mount.
    pub(super) fn request_manifest(
        &mut self,
        image: ImageId,
        waiter: Option<super::transfer::Waiter>,
        mount: Option<PendingMount>,
    ) {
        let now = StdInstant::now();
        if let Some(p) = self.pending_manifests.get_mut(&image) {
            p.waiters.extend(waiter);
            p.mounts.extend(mount);
            return;
        }
        self.pending_manifests.insert(
            image,
            PendingManifest {
                waiters: waiter.into_iter().collect(),
                mounts: mount.into_iter().collect(),
                since: now,
                last_lookup: now,
                asked: HashSet::new(),
                storing: false,
            },
        );
        self.lookup_providers(image);
        let ready: Vec<libp2p::PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.site.is_some())
            .map(|(id, _)| *id)
            .collect();
        for peer in ready {
            self.ask_manifest(peer, image);
        }
    }
}

fn save_profile(data: &Path, image: &ImageId, r: &Recorder) {
    match profile::save_if_absent(data, image, r.window(), r.order()) {
        Ok(true) => tracing::info!(%image, chunks = r.order().len(), "boot profile saved"),
        Ok(false) => {}
        Err(e) => tracing::warn!(%image, "saving boot profile: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("x", "vm17").is_ok());
        assert!(check_name("x", "a.b_c-d").is_ok());
        assert!(check_name("x", "").is_err());
        assert!(check_name("x", ".hidden").is_err());
        assert!(check_name("x", "a/b").is_err());
        assert!(check_name("x", &"a".repeat(65)).is_err());
        assert_eq!(sanitize("debian 12.raw"), "debian_12.raw");
        assert_eq!(sanitize("..."), "image");
    }
}
