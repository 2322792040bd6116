//! `vmswarm stage IMAGE`: a staged push of an image to a group of nodes (group boots), built as
//! push-by-request on top of the pull machinery: the staging node asks each target to pull, and the
//! swarm does the distribution (site gateways bring one WAN copy per site, targets relay to each
//! other as they go), so the staging node uploads about one copy per site instead of one per target.
//!
//! **Targets.** A peers file, every connected peer announcing a site, or (`--asked`) every
//! connected peer that asked us for the image since the daemon started. Asking is recorded per
//! image we hold (a manifest at least) in [`Askers`]: a peer asks when it sends `GetManifest` for
//! it, requests any of its chunks on a lane (a chunk shared by several images counts for each), or
//! sends a `Have` (not holding every chunk) or a `HaveUpdate` (it is getting chunks) for it. A
//! peer stays recorded across disconnections; only connected ones become targets. At most
//! [`MAX_ASKERS_PER_IMAGE`] are kept per image, the one that first asked longest ago dropped
//! first. A peer that asked before we held the image is not recorded. Nobody connected having
//! asked is an error, as is a site nobody announces.
//!
//! **Staging side** (the node holding the whole image). Each target is dialed if not connected
//! (its multiaddr if given, else its peer id through the DHT) and, once its `Hello` arrives, sent
//! our `Have` for the image: its answer tells what it holds. A target holding everything is done at
//! once (so re-running a stage is resumable: only targets missing chunks are asked again); others
//! are sent `Message::Stage` (only peers announcing `Capabilities::MULTICAST`: others could not
//! decode it, and fail as "does not take staged pushes"). From then on the target's `Have` and
//! `HaveUpdate`s for the image (we are its provider and interested peer) give its chunks held; a
//! target that has not changed for [`STAGE_REPROBE_AFTER`] is sent our `Have` again (a lost
//! `HaveUpdate` is never resent). A target fails, named with the reason, when it is not connected
//! within [`STAGE_DIAL_TIMEOUT`], refuses, disconnects before holding the image, or makes no
//! progress for [`STAGE_STALL_TIMEOUT`]. The command answers when every target is complete or
//! failed (with `--no-wait`: once every target answered `Stage`), with one result object.
//!
//! **Target side.** A `Stage` for an image held in full, or already being pulled, is acknowledged
//! (the pull then wants every chunk, like `vmswarm pull`). Otherwise the node takes it only if it
//! runs fewer than [`MAX_STAGED_PULLS`] staged pulls (pending manifests included) and only once
//! the image's manifest arrived from the swarm (fetched as a pull does; the answer waits for it, and
//! a manifest nobody hands over in time is refused `NoManifest`): a hostile peer can make a node
//! fetch at most that many images at once, each one the swarm actually serves. The pull then runs
//! exactly as `vmswarm pull` does, in boot-profile order when a profile is known locally or from a
//! peer.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::{Duration, Instant as StdInstant};

use libp2p::request_response::ResponseChannel;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::mpsc;
use vmswarm_protocol::bitfield::{ChunkBitmap, ChunkSet};
use vmswarm_protocol::wire::{Capabilities, Message, StageRefusal};
use vmswarm_protocol::{ChunkId, ImageId};

use super::{Daemon, Outbound};
use crate::control::Reply;

/// Most staged pulls a node runs at once for peers' `Stage` requests (pulls waiting for their
/// manifest included). A `Stage` beyond it is refused `Busy`: a peer, hostile or not, can make a
/// node fetch at most this many images it did not ask for. Four covers a group boot of a few images
/// (OS, application, data disk) while bounding the bandwidth and disk a stranger can commit.
pub(super) const MAX_STAGED_PULLS: usize = 4;

/// Most `Stage` requests for one image whose answers wait for its manifest (more are refused
/// `Busy`): each holds an open stream.
const MAX_WAITING_STAGE_REQUESTS: usize = 16;

/// How long a target may take to connect and send its `Hello` before it counts as unreachable.
pub(super) const STAGE_DIAL_TIMEOUT: Duration = Duration::from_secs(20);

/// How often an unconnected target is dialed again while [`STAGE_DIAL_TIMEOUT`] runs.
const STAGE_REDIAL: Duration = Duration::from_secs(2);

/// A target that accepted and whose chunks held did not change for this long is sent our `Have`
/// again (its answer is its current set).
const STAGE_REPROBE_AFTER: Duration = Duration::from_secs(5);

/// A target that accepted and made no progress for this long fails as stalled.
pub(super) const STAGE_STALL_TIMEOUT: Duration = Duration::from_secs(120);

/// How often a running stage sends its client a progress line (when something changed).
const STAGE_REPORT_EVERY: Duration = Duration::from_secs(1);

/// Most peers remembered as having asked for one image (`vmswarm stage --asked`): beyond it the
/// one that first asked longest ago is forgotten, so a swarm of strangers costs a bounded memory.
pub(super) const MAX_ASKERS_PER_IMAGE: usize = 4096;

/// The peers that asked us for one image since the daemon started, in the order they first asked
/// (at most [`MAX_ASKERS_PER_IMAGE`], oldest dropped).
#[derive(Debug, Default)]
pub(super) struct Askers {
    order: VecDeque<PeerId>,
    set: HashSet<PeerId>,
}

impl Askers {
    fn insert(&mut self, peer: PeerId) {
        if self.set.insert(peer) {
            self.order.push_back(peer);
            if self.order.len() > MAX_ASKERS_PER_IMAGE {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }
}

/// Where a target of a stage is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TargetState {
    /// Not connected (or its `Hello` not yet arrived): being dialed.
    Dialing,
    /// Sent our `Have`; waiting for its set.
    Probing,
    /// Sent `Stage`; waiting for its answer.
    Asked,
    /// It pulls the image.
    Accepted,
    /// It holds every chunk.
    Complete,
    /// It will not get the image from this stage.
    Failed(String),
}

impl TargetState {
    fn name(&self) -> &'static str {
        match self {
            TargetState::Dialing => "dialing",
            TargetState::Probing => "probing",
            TargetState::Asked => "asked",
            TargetState::Accepted => "accepted",
            TargetState::Complete => "complete",
            TargetState::Failed(_) => "failed",
        }
    }

    fn is_final(&self) -> bool {
        matches!(self, TargetState::Complete | TargetState::Failed(_))
    }
}

#[derive(Debug)]
struct StageTarget {
    addr: Option<Multiaddr>,
    state: TargetState,
    /// Its chunks of the image, once it told us.
    held: Option<ChunkBitmap>,
    /// When its state or chunks held last changed.
    changed: StdInstant,
    /// When we last dialed it or sent it our `Have`.
    poked: StdInstant,
}

/// One running `vmswarm stage`.
#[derive(Debug)]
pub(super) struct StageRun {
    image: ImageId,
    reply: mpsc::UnboundedSender<Reply>,
    wait: bool,
    started: StdInstant,
    bytes_out_at_start: u64,
    targets: BTreeMap<PeerId, StageTarget>,
    last_report: StdInstant,
    last_line: String,
}

impl Daemon {
    /// `peer` asked us for `image` (its manifest, or announced it wants it): it becomes a target of
    /// `vmswarm stage --asked`. Only images we hold (a manifest at least) are tracked.
    pub(super) fn note_asker(&mut self, peer: PeerId, image: ImageId) {
        if self.images.contains_key(&image) && peer != *self.swarm.local_peer_id() {
            self.askers.entry(image).or_default().insert(peer);
        }
    }

    /// `peer` requested `chunks` of us: it asked for every image of ours holding one of them.
    pub(super) fn note_chunk_asker(&mut self, peer: PeerId, chunks: &[ChunkId]) {
        if chunks.is_empty() {
            return;
        }
        for (id, img) in &self.images {
            let known = self.askers.get(id).is_some_and(|a| a.set.contains(&peer));
            if !known && chunks.iter().any(|c| img.by_id.contains_key(c)) {
                self.askers.entry(*id).or_default().insert(peer);
            }
        }
    }

    /// `vmswarm stage`: starts a stage run (answered when it ends).
    pub(super) fn on_stage_command(
        &mut self,
        image: String,
        peers: Vec<String>,
        site: Option<String>,
        asked: bool,
        wait: bool,
        reply: mpsc::UnboundedSender<Reply>,
    ) {
        let fail = |message: String| {
            let _ = reply.send(Reply::Error { message });
        };
        let id: ImageId = match image.parse() {
            Ok(id) => id,
            Err(e) => return fail(format!("bad image id {image:?}: {e}")),
        };
        match self.images.get(&id) {
            Some(img) if img.present.is_full() => {}
            Some(img) => {
                return fail(format!(
                    "image {id} is not held in full here ({} of {} chunks): stage only from a node that holds the whole image (pull it first)",
                    img.present.count(),
                    img.manifest.chunk_count()
                ));
            }
            None => {
                return fail(format!(
                    "image {id} is not held here: stage only from a node that holds the whole image (publish or pull it first)"
                ));
            }
        }
        let me = *self.swarm.local_peer_id();
        let mut targets: Vec<(PeerId, Option<Multiaddr>)> = Vec::new();
        for p in &peers {
            let Some(t) = crate::stage::parse_target(p) else {
                return fail(format!(
                    "{p:?} is neither a peer id nor a multiaddr ending in /p2p/<peer id>"
                ));
            };
            if t.peer != me && !targets.iter().any(|(q, _)| *q == t.peer) {
                targets.push((t.peer, t.addr));
            }
        }
        if let Some(site) = &site {
            let mut in_site: Vec<PeerId> = self
                .peers
                .iter()
                .filter(|(_, p)| p.site.as_deref() == Some(site.as_str()))
                .map(|(id, _)| *id)
                .collect();
            in_site.sort();
            if in_site.is_empty() {
                return fail(format!(
                    "no connected peer announces site {site:?} (see `vmswarm peers`)"
                ));
            }
            add_targets(&mut targets, in_site, me);
        }
        if asked {
            let mut askers: Vec<PeerId> = self
                .askers
                .get(&id)
                .map(|a| {
                    a.order
                        .iter()
                        .filter(|p| self.peers.contains_key(p))
                        .copied()
                        .collect()
                })
                .unwrap_or_default();
            askers.sort();
            if askers.is_empty() {
                return fail(format!(
                    "no node has asked for {id}: no connected node requested its manifest or chunks, or announced it wants it, since this node started"
                ));
            }
            add_targets(&mut targets, askers, me);
        }
        if targets.is_empty() {
            return fail("no target node other than this one".into());
        }
        let now = StdInstant::now();
        let run = StageRun {
            image: id,
            reply,
            wait,
            started: now,
            bytes_out_at_start: self.metrics.snapshot().bytes_out,
            targets: targets
                .iter()
                .map(|(p, addr)| {
                    (
                        *p,
                        StageTarget {
                            addr: addr.clone(),
                            state: TargetState::Dialing,
                            held: None,
                            changed: now,
                            poked: now,
                        },
                    )
                })
                .collect(),
            last_report: now,
            last_line: String::new(),
        };
        tracing::info!(image = %id, targets = targets.len(), "staging");
        self.next_stage += 1;
        let run_id = self.next_stage;
        self.stages.insert(run_id, run);
        for (peer, _) in targets {
            self.stage_contact(run_id, peer);
        }
        self.stage_maybe_finish(run_id);
    }

    /// Sends a line to a run's client.
    fn stage_line(&mut self, run_id: u64, text: String) {
        if let Some(run) = self.stages.get(&run_id) {
            let _ = run.reply.send(Reply::Line { text });
        }
    }

    /// Sets a target's state (and tells the client when it changed).
    fn stage_set(&mut self, run_id: u64, peer: PeerId, state: TargetState) {
        let Some(t) = self
            .stages
            .get_mut(&run_id)
            .and_then(|r| r.targets.get_mut(&peer))
        else {
            return;
        };
        if t.state == state || t.state.is_final() {
            return;
        }
        t.state = state.clone();
        t.changed = StdInstant::now();
        let text = match &state {
            TargetState::Failed(why) => format!("{peer}: failed: {why}"),
            s => format!("{peer}: {}", s.name()),
        };
        if matches!(
            state,
            TargetState::Accepted | TargetState::Complete | TargetState::Failed(_)
        ) {
            tracing::info!(target_peer = %peer, "stage: {text}");
            self.stage_line(run_id, text);
        }
    }

    /// Dials a target, or (connected and ready) sends it our `Have`.
    fn stage_contact(&mut self, run_id: u64, peer: PeerId) {
        let Some(run) = self.stages.get(&run_id) else {
            return;
        };
        let image = run.image;
        let addr = run.targets.get(&peer).and_then(|t| t.addr.clone());
        if self.banned.contains(&peer) {
            self.stage_set(run_id, peer, TargetState::Failed("banned by us".into()));
            return;
        }
        match self.peers.get(&peer) {
            Some(p) if p.site.is_some() => {
                if !p.capabilities.contains(Capabilities::MULTICAST) {
                    self.stage_set(
                        run_id,
                        peer,
                        TargetState::Failed(
                            "does not take staged pushes (no MULTICAST capability)".into(),
                        ),
                    );
                    return;
                }
                self.stage_set(run_id, peer, TargetState::Probing);
                let have = self.have_message(image);
                self.send(peer, have, Outbound::StageHave(image));
            }
            Some(_) => {} // Connected; its `Hello` is on its way (`stage_on_peer_ready`).
            None => {
                let dialed = match addr {
                    Some(a) => {
                        self.swarm.behaviour_mut().kad.add_address(&peer, a.clone());
                        self.swarm.dial(a).is_ok()
                    }
                    None => self.swarm.dial(peer).is_ok(),
                };
                if !dialed {
                    // No address known yet: ask the DHT (the next redial may find one).
                    self.swarm.behaviour_mut().kad.get_closest_peers(peer);
                }
            }
        }
        if let Some(t) = self
            .stages
            .get_mut(&run_id)
            .and_then(|r| r.targets.get_mut(&peer))
        {
            t.poked = StdInstant::now();
        }
    }

    /// The runs (and their image) that have `peer` as a target.
    fn stage_runs_of(&self, peer: &PeerId, image: Option<ImageId>) -> Vec<u64> {
        self.stages
            .iter()
            .filter(|(_, r)| image.is_none_or(|i| r.image == i) && r.targets.contains_key(peer))
            .map(|(id, _)| *id)
            .collect()
    }

    fn stage_state(&self, run_id: u64, peer: &PeerId) -> Option<TargetState> {
        self.stages
            .get(&run_id)
            .and_then(|r| r.targets.get(peer))
            .map(|t| t.state.clone())
    }

    /// `peer`'s `Hello` arrived: targets waiting for it are contacted.
    pub(super) fn stage_on_peer_ready(&mut self, peer: PeerId) {
        for run_id in self.stage_runs_of(&peer, None) {
            if self.stage_state(run_id, &peer) == Some(TargetState::Dialing) {
                self.stage_contact(run_id, peer);
            }
        }
    }

    /// `peer` is gone: targets that were being asked or pulling fail.
    pub(super) fn stage_on_peer_gone(&mut self, peer: PeerId) {
        for run_id in self.stage_runs_of(&peer, None) {
            if let Some(TargetState::Probing | TargetState::Asked | TargetState::Accepted) =
                self.stage_state(run_id, &peer)
            {
                self.stage_set(
                    run_id,
                    peer,
                    TargetState::Failed(
                        "unreachable: disconnected before it held the whole image".into(),
                    ),
                );
                self.stage_maybe_finish(run_id);
            }
        }
    }

    /// `peer` told us its whole set of `image` (a `Have` request, or the answer to ours).
    pub(super) fn stage_on_have(&mut self, peer: PeerId, image: ImageId, chunks: &ChunkSet) {
        let runs = self.stage_runs_of(&peer, Some(image));
        if runs.is_empty() {
            return;
        }
        let Some(count) = self.images.get(&image).map(|i| i.manifest.chunk_count()) else {
            return;
        };
        // A peer that does not know the image yet answers an empty set of no chunks.
        let held =
            ChunkBitmap::from_wire(chunks, count).unwrap_or_else(|_| ChunkBitmap::new(count));
        for run_id in runs {
            if let Some(t) = self
                .stages
                .get_mut(&run_id)
                .and_then(|r| r.targets.get_mut(&peer))
            {
                if t.held.as_ref().is_none_or(|h| h.count() != held.count()) {
                    t.changed = StdInstant::now();
                }
                t.held = Some(held.clone());
            }
            self.stage_progressed(run_id, peer);
        }
    }

    /// `peer` newly holds `indices` of `image`.
    pub(super) fn stage_on_have_update(&mut self, peer: PeerId, image: ImageId, indices: &[u32]) {
        for run_id in self.stage_runs_of(&peer, Some(image)) {
            if let Some(t) = self
                .stages
                .get_mut(&run_id)
                .and_then(|r| r.targets.get_mut(&peer))
            {
                if let Some(h) = t.held.as_mut() {
                    let mut grew = false;
                    for &i in indices {
                        if i < h.len() {
                            grew |= h.insert(i);
                        }
                    }
                    if grew {
                        t.changed = StdInstant::now();
                    }
                }
            }
            self.stage_progressed(run_id, peer);
        }
    }

    /// A target's set changed or arrived: it may be complete, or (after our probe) need `Stage`.
    fn stage_progressed(&mut self, run_id: u64, peer: PeerId) {
        let Some(run) = self.stages.get(&run_id) else {
            return;
        };
        let image = run.image;
        let Some(t) = run.targets.get(&peer) else {
            return;
        };
        let full = t.held.as_ref().is_some_and(ChunkBitmap::is_full);
        match t.state {
            _ if t.state.is_final() => {}
            _ if full => self.stage_set(run_id, peer, TargetState::Complete),
            TargetState::Probing => {
                self.stage_set(run_id, peer, TargetState::Asked);
                self.send(peer, Message::Stage { image }, Outbound::Stage(image));
            }
            _ => {}
        }
        self.stage_maybe_finish(run_id);
    }

    /// `peer` answered our `Stage` for `image`: `Ok` accepted, `Err` refused (why).
    pub(super) fn stage_on_answer(
        &mut self,
        peer: PeerId,
        image: ImageId,
        answer: Result<(), String>,
    ) {
        for run_id in self.stage_runs_of(&peer, Some(image)) {
            if self.stage_state(run_id, &peer) != Some(TargetState::Asked) {
                continue;
            }
            match &answer {
                Ok(()) => {
                    self.stage_set(run_id, peer, TargetState::Accepted);
                    // It holds the manifest now, so this makes us its interested peer (its
                    // HaveUpdates come to us) and tells us its set.
                    let have = self.have_message(image);
                    self.send(peer, have, Outbound::StageHave(image));
                }
                Err(why) => self.stage_set(run_id, peer, TargetState::Failed(why.clone())),
            }
            self.stage_maybe_finish(run_id);
        }
    }

    /// Our `Stage` or probe to `peer` failed. Sent again if the peer is still connected on another
    /// connection than the one it was lost with; otherwise the target fails.
    pub(super) fn stage_request_failed(
        &mut self,
        peer: PeerId,
        conn: libp2p::swarm::ConnectionId,
        kind: Outbound,
        error: String,
    ) {
        let (Outbound::Stage(image) | Outbound::StageHave(image)) = kind else {
            return;
        };
        let resend = self
            .peers
            .get(&peer)
            .is_some_and(|s| !s.connections.contains(&conn) && !s.connections.is_empty());
        if resend {
            let msg = match kind {
                Outbound::Stage(_) => Message::Stage { image },
                _ => self.have_message(image),
            };
            self.send(peer, msg, kind);
            return;
        }
        for run_id in self.stage_runs_of(&peer, Some(image)) {
            if matches!(
                self.stage_state(run_id, &peer),
                Some(TargetState::Probing | TargetState::Asked)
            ) {
                self.stage_set(
                    run_id,
                    peer,
                    TargetState::Failed(format!("unreachable: {error}")),
                );
                self.stage_maybe_finish(run_id);
            }
        }
    }

    /// Timers of running stages (called every flush interval): dial deadlines, redials, re-probes,
    /// stalls, progress lines.
    pub(super) fn stage_tick(&mut self) {
        let staged = std::mem::take(&mut self.staged);
        self.staged = staged
            .into_iter()
            .filter(|i| self.transfers.contains_key(i))
            .collect();
        let now = StdInstant::now();
        let run_ids: Vec<u64> = self.stages.keys().copied().collect();
        for run_id in run_ids {
            let Some(run) = self.stages.get(&run_id) else {
                continue;
            };
            let image = run.image;
            let started = run.started;
            let mut redial = Vec::new();
            let mut unreachable = Vec::new();
            let mut reprobe = Vec::new();
            let mut stalled = Vec::new();
            for (peer, t) in &run.targets {
                match t.state {
                    TargetState::Dialing if now >= started + STAGE_DIAL_TIMEOUT => {
                        unreachable.push(*peer)
                    }
                    TargetState::Dialing if now >= t.poked + STAGE_REDIAL => redial.push(*peer),
                    TargetState::Accepted if now >= t.changed + STAGE_STALL_TIMEOUT => {
                        stalled.push(*peer)
                    }
                    TargetState::Accepted
                        if now >= t.changed + STAGE_REPROBE_AFTER
                            && now >= t.poked + STAGE_REPROBE_AFTER =>
                    {
                        reprobe.push(*peer)
                    }
                    _ => {}
                }
            }
            for peer in unreachable {
                self.stage_set(
                    run_id,
                    peer,
                    TargetState::Failed(format!(
                        "unreachable: not connected within {}s",
                        STAGE_DIAL_TIMEOUT.as_secs()
                    )),
                );
            }
            for peer in stalled {
                self.stage_set(
                    run_id,
                    peer,
                    TargetState::Failed(format!(
                        "stalled: no progress for {}s",
                        STAGE_STALL_TIMEOUT.as_secs()
                    )),
                );
            }
            for peer in redial {
                self.stage_contact(run_id, peer);
            }
            for peer in reprobe {
                if let Some(t) = self
                    .stages
                    .get_mut(&run_id)
                    .and_then(|r| r.targets.get_mut(&peer))
                {
                    t.poked = now;
                }
                let have = self.have_message(image);
                self.send(peer, have, Outbound::StageHave(image));
            }
            self.stage_report(run_id, false);
            self.stage_maybe_finish(run_id);
        }
    }

    /// Sends a summary progress line (at most every [`STAGE_REPORT_EVERY`] unless `force`, and
    /// only when it changed).
    fn stage_report(&mut self, run_id: u64, force: bool) {
        let Some(run) = self.stages.get_mut(&run_id) else {
            return;
        };
        if !force && run.last_report.elapsed() < STAGE_REPORT_EVERY {
            return;
        }
        let n = run.targets.len();
        let complete = run
            .targets
            .values()
            .filter(|t| t.state == TargetState::Complete)
            .count();
        let failed = run
            .targets
            .values()
            .filter(|t| matches!(t.state, TargetState::Failed(_)))
            .count();
        let held: u64 = run
            .targets
            .values()
            .map(|t| t.held.as_ref().map_or(0, |h| u64::from(h.count())))
            .sum();
        let chunks = self
            .images
            .get(&run.image)
            .map_or(0, |i| u64::from(i.manifest.chunk_count()));
        let line = format!(
            "{complete}/{n} targets complete, {failed} failed; {held}/{} chunks held",
            chunks * n as u64
        );
        // The figures behind the line, for the client's rate and ETA: chunks held by all targets
        // and the bytes this node uploaded since the run started.
        let _ = run.reply.send(Reply::Progress {
            done: held,
            total: chunks * n as u64,
            bytes: self
                .metrics
                .snapshot()
                .bytes_out
                .saturating_sub(run.bytes_out_at_start),
        });
        run.last_report = StdInstant::now();
        if line != run.last_line {
            run.last_line = line.clone();
            let text = format!("[{:6.1}s] {line}", run.started.elapsed().as_secs_f64());
            let _ = run.reply.send(Reply::Line { text });
        }
    }

    /// Ends a run whose targets are all settled, answering its client with the result.
    fn stage_maybe_finish(&mut self, run_id: u64) {
        let Some(run) = self.stages.get(&run_id) else {
            return;
        };
        let settled = |s: &TargetState| {
            if run.wait {
                s.is_final()
            } else {
                !matches!(
                    s,
                    TargetState::Dialing | TargetState::Probing | TargetState::Asked
                )
            }
        };
        if !run.targets.values().all(|t| settled(&t.state)) {
            return;
        }
        self.stage_report(run_id, true);
        let Some(run) = self.stages.remove(&run_id) else {
            return;
        };
        let manifest = self.images.get(&run.image).map(|i| i.manifest.clone());
        let chunks = manifest.as_ref().map_or(0, |m| m.chunk_count());
        let bytes_of = |h: &ChunkBitmap| -> u64 {
            manifest.as_ref().map_or(0, |m| {
                h.iter()
                    .map(|i| u64::from(m.chunk_len(i).unwrap_or(0)))
                    .sum()
            })
        };
        let targets: Vec<serde_json::Value> = run
            .targets
            .iter()
            .map(|(peer, t)| {
                serde_json::json!({
                    "peer_id": peer.to_string(),
                    "state": t.state.name(),
                    "reason": match &t.state { TargetState::Failed(w) => Some(w.clone()), _ => None },
                    "chunks_held": t.held.as_ref().map_or(0, ChunkBitmap::count),
                    "chunks": chunks,
                    "bytes_held": t.held.as_ref().map_or(0, bytes_of),
                })
            })
            .collect();
        let failed = run
            .targets
            .values()
            .filter(|t| matches!(t.state, TargetState::Failed(_)))
            .count();
        let upload = self
            .metrics
            .snapshot()
            .bytes_out
            .saturating_sub(run.bytes_out_at_start);
        let result = serde_json::json!({
            "image": run.image.to_string(),
            "size": manifest.as_ref().map_or(0, |m| m.image_size),
            "chunks": chunks,
            "waited": run.wait,
            "complete": run.targets.values().all(|t| t.state == TargetState::Complete),
            "failed": failed,
            "targets": targets,
            "seconds": run.started.elapsed().as_secs_f64(),
            "publisher_upload_bytes": upload,
        });
        tracing::info!(image = %run.image, failed, "stage finished");
        let _ = run.reply.send(Reply::Done { result });
    }

    // ---- Target side ----

    /// A peer asks us to pull `image` (`Message::Stage`).
    pub(super) fn on_stage_request(
        &mut self,
        peer: PeerId,
        image: ImageId,
        channel: ResponseChannel<Message>,
    ) {
        if self.images.get(&image).is_some_and(|i| i.present.is_full()) {
            self.respond(channel, Message::Ack);
            return;
        }
        if self.transfers.contains_key(&image) {
            self.start_staged_pull(image);
            self.respond(channel, Message::Ack);
            return;
        }
        if let Some(waiting) = self.stage_requests.get_mut(&image) {
            if waiting.len() < MAX_WAITING_STAGE_REQUESTS {
                waiting.push(channel);
            } else {
                self.respond(
                    channel,
                    Message::StageRefused {
                        image,
                        reason: StageRefusal::Busy,
                    },
                );
            }
            return;
        }
        let running = self
            .staged
            .iter()
            .filter(|i| self.transfers.contains_key(i))
            .count()
            + self.stage_requests.len();
        if running >= MAX_STAGED_PULLS {
            tracing::info!(%peer, %image, "refusing a stage: {running} staged pulls running");
            self.respond(
                channel,
                Message::StageRefused {
                    image,
                    reason: StageRefusal::Busy,
                },
            );
            return;
        }
        tracing::info!(%peer, %image, "staged by a peer");
        if self.images.contains_key(&image) {
            self.start_staged_pull(image);
            self.respond(channel, Message::Ack);
            return;
        }
        // The answer waits for the manifest (`stage_manifest_stored`).
        self.stage_requests.insert(image, vec![channel]);
        self.request_manifest(image, None, None);
    }

    /// The manifest of `image` is stored (after any pull waiting for it started its transfer):
    /// waiting `Stage` requests are taken.
    pub(super) fn stage_manifest_stored(&mut self, image: ImageId) {
        let Some(channels) = self.stage_requests.remove(&image) else {
            return;
        };
        self.start_staged_pull(image);
        for ch in channels {
            self.respond(ch, Message::Ack);
        }
    }

    /// No manifest of `image` could be had: waiting `Stage` requests are refused.
    pub(super) fn stage_manifest_failed(&mut self, image: ImageId) {
        let Some(channels) = self.stage_requests.remove(&image) else {
            return;
        };
        for ch in channels {
            self.respond(
                ch,
                Message::StageRefused {
                    image,
                    reason: StageRefusal::NoManifest,
                },
            );
        }
    }

    /// Pulls all of `image` (its manifest is held) as `vmswarm pull` does, boot profile first.
    fn start_staged_pull(&mut self, image: ImageId) {
        let Some(img) = self.images.get(&image) else {
            return;
        };
        if img.present.is_full() {
            return;
        }
        let chunks = img.manifest.chunk_count();
        super::mounts::clear_lazy(&self.opts.data_dir, &image);
        self.staged.insert(image);
        let order = match crate::profile::load(&self.opts.data_dir, &image, chunks) {
            Ok(p) => p.map(|p| p.order),
            Err(e) => {
                tracing::warn!(%image, "ignoring boot profile: {e}");
                None
            }
        };
        if self.transfers.contains_key(&image) {
            self.want_all_missing(image);
        } else {
            self.start_transfer(image, Vec::new());
        }
        let now = self.now();
        match (&order, self.transfers.get_mut(&image)) {
            (Some(order), Some(t)) => {
                t.sched.set_priority_order(now, order);
                tracing::info!(%image, "staged pull in boot-profile order");
            }
            (None, Some(_)) => self.ask_boot_profiles(image),
            _ => {}
        }
    }
}

/// Adds `group` to the stage's targets (no address: dialed by peer id), skipping ourselves and
/// peers already named.
fn add_targets(targets: &mut Vec<(PeerId, Option<Multiaddr>)>, group: Vec<PeerId>, me: PeerId) {
    for p in group {
        if p != me && !targets.iter().any(|(q, _)| *q == p) {
            targets.push((p, None));
        }
    }
}
