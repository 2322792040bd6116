//! Pulling one image: carrying out the fetch scheduler's decisions and reporting to `pull` clients.
//!
//! A [`Transfer`] exists while an image is incomplete and wanted. Its scheduler gets every ready peer
//! and every missing chunk (Background); this module turns the scheduler's actions into requests,
//! has each chunk checked against the manifest before the scheduler hears of it and stored
//! ([`super::ingest`]), and ends the transfer when every chunk is stored — or, if the scheduler gave
//! up on some chunk, fails its waiters naming the missing chunks. While the store is behind
//! ([`super::ingest::MAX_UNSTORED_BYTES`]), the scheduler's new decisions wait inside it.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::Instant as StdInstant;

use libp2p::PeerId;
use tokio::sync::mpsc;
use vmswarm_protocol::fetch::{
    self, Action, ChunkOutcome, Delivery, Event, FailReason, FetchScheduler,
};
use vmswarm_protocol::wire::{Capabilities, Message, have_update_delay};
use vmswarm_protocol::{ChunkId, ImageId, Priority};

use super::ingest::{Checked, Received};
use super::{Daemon, Outbound};
use crate::control::Reply;

/// Most missing chunks named in a failed pull's message.
const MAX_NAMED_MISSING: usize = 20;

/// A `pull` client waiting for an image.
#[derive(Debug)]
pub(super) struct Waiter {
    reply: mpsc::UnboundedSender<Reply>,
    output: Option<PathBuf>,
    bytes: u64,
}

impl Waiter {
    pub(super) fn new(reply: mpsc::UnboundedSender<Reply>, output: Option<PathBuf>) -> Self {
        Waiter {
            reply,
            output,
            bytes: 0,
        }
    }

    pub(super) fn fail(self, message: String) {
        let _ = self.reply.send(Reply::Error { message });
    }

    pub(super) fn into_parts(self) -> (mpsc::UnboundedSender<Reply>, Option<PathBuf>, u64) {
        (self.reply, self.output, self.bytes)
    }
}

/// An image being pulled.
#[derive(Debug)]
pub(super) struct Transfer {
    pub(super) sched: FetchScheduler<PeerId>,
    pub(super) waiters: Vec<Waiter>,
    /// Chunks received and not yet committed (being checked or written).
    storing: u32,
    failed: BTreeMap<u32, FailReason>,
    pub(super) done: u64,
    total: u64,
    reported: Option<u64>,
    /// When to ask the DHT for providers again (pullers become providers as they go).
    pub(super) next_lookup: StdInstant,
    /// Accepted chunks a VM was waiting for, announced as soon as they are committed
    /// (`wire::have_update_delay`).
    announce_at_once: HashSet<u32>,
    /// When it started.
    pub(super) started: StdInstant,
    /// How many site gateways its scheduler was last given (0: none yet, [`super::gateways`]).
    pub(super) site_gateways: usize,
}

impl Transfer {
    pub(super) fn add_waiter(&mut self, w: Waiter) {
        self.waiters.push(w);
        self.reported = None;
    }

    /// Sends a progress line to waiters if anything changed.
    pub(super) fn report_progress(&mut self) {
        if self.reported == Some(self.done) {
            return;
        }
        self.reported = Some(self.done);
        self.waiters.retain(|w| {
            w.reply
                .send(Reply::Progress {
                    done: self.done,
                    total: self.total,
                    bytes: w.bytes,
                })
                .is_ok()
        });
    }
}

impl Daemon {
    /// Starts pulling `image` (its manifest is known) for `waiters`.
    pub(super) fn start_transfer(&mut self, image: ImageId, waiters: Vec<Waiter>) {
        self.start_transfer_wanting(image, waiters, true);
    }

    /// Starts a transfer of `image`; with `want_missing` every missing chunk is wanted at Background
    /// priority (a pull, a prefetching mount), without it nothing is wanted yet (a mount's Demand
    /// reads add wants).
    pub(super) fn start_transfer_wanting(
        &mut self,
        image: ImageId,
        waiters: Vec<Waiter>,
        want_missing: bool,
    ) {
        let Some(img) = self.images.get(&image) else {
            return;
        };
        let chunks = img.manifest.chunk_count();
        let missing: Vec<u32> = if want_missing {
            (0..chunks).filter(|&i| !img.present.contains(i)).collect()
        } else {
            Vec::new()
        };
        let done = u64::from(img.present.count());
        self.seed_counter += 1;
        let seed = u64::from_le_bytes(image.0[..8].try_into().unwrap_or([0; 8]))
            ^ self.seed_counter
            ^ u64::from(std::process::id());
        let mut config = self.opts.fetch.clone();
        config.chunk_bytes = img.manifest.chunk_size;
        let mut sched = match FetchScheduler::new(config, chunks, seed) {
            Ok(s) => s,
            Err(e) => {
                for w in waiters {
                    w.fail(format!("fetch configuration: {e}"));
                }
                return;
            }
        };
        let now = self.now();
        // Our own id enables the per-site assignment of outside fetches.
        sched.set_local_peer(now, self.swarm.local_peer_id());
        let ready: Vec<(PeerId, String, Option<std::time::Duration>, bool)> = self
            .peers
            .iter()
            .filter(|(id, _)| !self.banned.contains(id))
            .filter_map(|(id, p)| p.site.clone().map(|s| (*id, s, p.rtt, p.origin)))
            .collect();
        for (peer, site, rtt, origin) in &ready {
            sched.handle_peer_connected(
                now,
                *peer,
                fetch::PeerInfo {
                    site: site.clone(),
                    rtt: *rtt,
                    origin: *origin,
                },
            );
        }
        // Indices are in range by construction (0..chunks).
        let _ = sched.handle_want_many(now, missing.iter().copied(), Priority::Background);
        self.transfers.insert(
            image,
            Transfer {
                sched,
                waiters,
                storing: 0,
                failed: BTreeMap::new(),
                done,
                total: u64::from(chunks),
                reported: None,
                next_lookup: StdInstant::now() + super::PROVIDER_RETRY,
                announce_at_once: HashSet::new(),
                started: StdInstant::now(),
                site_gateways: 0,
            },
        );
        self.apply_site_gateways(image);
        for (peer, _, _, _) in ready {
            let have = self.have_message(image);
            self.send(peer, have, Outbound::Have(image));
        }
        self.lookup_providers(image);
    }

    /// Carries out what `image`'s scheduler decided, and ends the transfer when it is over.
    pub(super) fn pump_transfer(&mut self, image: ImageId) {
        let backlogged = self.ingest.backlogged();
        let Some(t) = self.transfers.get_mut(&image) else {
            return;
        };
        // While the store is behind, new requests wait (queued in the scheduler): backpressure.
        let actions: Vec<Action<PeerId>> = if backlogged {
            Vec::new()
        } else {
            std::iter::from_fn(|| t.sched.poll_action()).collect()
        };
        let events: Vec<Event<PeerId>> = std::iter::from_fn(|| t.sched.poll_event()).collect();
        for action in actions {
            match action {
                Action::Request {
                    peer,
                    priority,
                    indices,
                } => {
                    if tracing::enabled!(tracing::Level::DEBUG) {
                        let site = self.site_of(&peer);
                        tracing::debug!(%image, %peer, %site, ?priority, ?indices, "requesting");
                    }
                    self.request_chunks(peer, image, priority, &indices);
                }
                Action::Cancel { peer, indices } => self.cancel_chunks(peer, image, &indices),
                Action::AnnounceFetching { peer, indices } => {
                    self.send(peer, Message::Fetching { image, indices }, Outbound::Ack);
                }
                Action::Need {
                    peer,
                    priority,
                    indices,
                } => {
                    // A peer of protocol version 1 could not decode `Need`: it is not told.
                    let multicast = self
                        .peers
                        .get(&peer)
                        .is_some_and(|p| p.capabilities.contains(Capabilities::MULTICAST));
                    if multicast {
                        let need = Message::Need {
                            image,
                            priority,
                            indices,
                        };
                        self.send(peer, need, Outbound::Ack);
                    }
                }
            }
        }
        for event in events {
            match event {
                Event::NoSource { total, .. } => {
                    tracing::debug!(%image, total, "chunks without a connected source; asking the DHT");
                    self.lookup_providers(image);
                }
                Event::WantFailed { index, reason } => {
                    if let Some(t) = self.transfers.get_mut(&image) {
                        t.failed.insert(index, reason);
                    }
                    self.mounts_want_failed(image, index, reason);
                }
                Event::PeerBanned { peer } => self.ban(peer, "it sent a corrupt chunk"),
            }
        }
        self.maybe_finish(image);
    }

    fn maybe_finish(&mut self, image: ImageId) {
        let Some(t) = self.transfers.get(&image) else {
            return;
        };
        if t.sched.stats().wanted > 0 || t.storing > 0 {
            return;
        }
        let complete = self.images.get(&image).is_some_and(|i| i.present.is_full());
        if !complete && t.waiters.is_empty() && self.is_mounted(&image) {
            // A mounted image's next read needs the peers' Have sets, RTTs and announcements
            // the scheduler holds: it stays, idle, until the last umount.
            return;
        }
        let Some(t) = self.transfers.remove(&image) else {
            return;
        };
        if let Some(img) = self.images.get_mut(&image) {
            img.last_site_gateway = (t.sched.is_site_gateway(), t.site_gateways);
        }
        if complete {
            tracing::info!(%image, "image complete");
            for w in t.waiters {
                self.finish_waiter(image, w);
            }
            return;
        }
        if t.waiters.is_empty() {
            // Only mounts' Demand wants: the waiting reads were answered one by one.
            tracing::debug!(%image, failed = t.failed.len(), "on-demand transfer idle");
            return;
        }
        let manifest = self.images.get(&image).map(|i| i.manifest.clone());
        let mut named = Vec::new();
        for (&index, reason) in t.failed.iter().take(MAX_NAMED_MISSING) {
            let id = manifest
                .as_ref()
                .map(|m| m.chunks[index as usize].to_string())
                .unwrap_or_default();
            let why = match reason {
                FailReason::Unavailable => "no connected peer holds it",
                FailReason::DemandDeadline => "not delivered in time",
            };
            named.push(format!("  chunk {index} ({id}): {why}"));
        }
        let more = t.failed.len().saturating_sub(MAX_NAMED_MISSING);
        let message = format!(
            "pull of image {image} failed: {} of {} chunks could not be fetched\n{}{}",
            t.failed.len(),
            t.total,
            named.join("\n"),
            if more > 0 {
                format!("\n  ... and {more} more")
            } else {
                String::new()
            }
        );
        tracing::warn!("{message}");
        for w in t.waiters {
            w.fail(message.clone());
        }
    }

    /// A chunk arrived for a request of ours (`sent` when we asked): it is hashed and stored,
    /// or judged corrupt at once if it is not the chunk the manifest names at `index`.
    pub(super) fn on_chunk_response(
        &mut self,
        peer: PeerId,
        image: ImageId,
        index: u32,
        sent: StdInstant,
        id: ChunkId,
        data: Vec<u8>,
    ) {
        let site = self.site_of(&peer);
        let Some(manifest) = self.images.get(&image).map(|i| i.manifest.clone()) else {
            return;
        };
        let Some(t) = self.transfers.get_mut(&image) else {
            return;
        };
        self.metrics.bytes_in(&site, data.len() as u64);
        let expected = manifest.chunks[index as usize];
        // Counted until `on_checked` (invalid) or `on_stored` (valid) lets it go.
        t.storing += 1;
        if id == expected && manifest.chunk_len(index) == Some(data.len() as u32) {
            // Hashed on the blocking pool; the scheduler hears of it in `on_checked`.
            self.ingest(Received {
                image,
                index,
                peer,
                sent,
                id: expected,
                data,
            });
        } else {
            self.on_checked(vec![Checked {
                image,
                index,
                peer,
                sent,
                len: data.len(),
                valid: false,
            }]);
        }
    }

    /// Received chunks were hashed: tell their schedulers. Valid ones are being stored already.
    pub(super) fn on_checked(&mut self, checked: Vec<Checked>) {
        let now = self.now();
        for c in checked {
            let Some(t) = self.transfers.get_mut(&c.image) else {
                continue;
            };
            let outcome = if c.valid {
                ChunkOutcome::Valid
            } else {
                t.storing = t.storing.saturating_sub(1);
                self.metrics
                    .chunks_corrupt
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(peer = %c.peer, image = %c.image, index = c.index, "corrupt chunk received");
                ChunkOutcome::Corrupt
            };
            // Uncommitted chunks count in `storing` until `on_stored`, accepted or not (a valid
            // duplicate is stored once; the store answers the second copy with AlreadyPresent).
            let fetched_at = t.sched.want_priority(c.index);
            if t.sched.handle_chunk(now, &c.peer, c.index, outcome) == Delivery::Accept {
                if fetched_at.is_some_and(|p| have_update_delay(p).is_zero()) {
                    t.announce_at_once.insert(c.index);
                }
                // The sender hears our Have updates from now on, even if it never asked for
                // them (a publisher holding the whole image does not): our announcement is what
                // ends its copy's count towards its fan-out, and its fan-out rule's measurement.
                if let Some(img) = self.images.get_mut(&c.image) {
                    img.interested.insert(c.peer);
                }
                self.metrics.fetch_latency(c.sent.elapsed());
                tracing::debug!(image = %c.image, peer = %c.peer, index = c.index, ms = c.sent.elapsed().as_secs_f64() * 1e3, "chunk accepted");
                self.metrics
                    .chunks_fetched
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                for w in &mut t.waiters {
                    w.bytes += c.len as u64;
                }
                let site = self.site_of(&c.peer);
                self.mounts_fetched(c.image, c.index, &site, c.len as u64);
            }
        }
    }

    /// A chunk received for `image` has been committed, or failed to be (`error`).
    pub(super) fn on_stored(&mut self, image: ImageId, id: ChunkId, error: Option<&str>) {
        let now = self.now();
        if let Some(t) = self.transfers.get_mut(&image) {
            t.storing = t.storing.saturating_sub(1);
        }
        if let Some(e) = error {
            tracing::error!(%image, chunk = %id, "storing chunk: {e}");
            self.mounts_store_failed(image, e);
            if let Some(t) = self.transfers.remove(&image) {
                for w in t.waiters {
                    w.fail(format!(
                        "pull of image {image} stopped: storing chunk {id}: {e}"
                    ));
                }
            }
            return;
        }
        let Some(img) = self.images.get_mut(&image) else {
            return;
        };
        let indices = img.by_id.get(&id).cloned().unwrap_or_default();
        for &i in &indices {
            if img.present.insert(i) {
                img.unannounced.push(i);
            }
        }
        let done = u64::from(img.present.count());
        self.mounts_chunk_present(image, &indices);
        let mut at_once = false;
        if let Some(t) = self.transfers.get_mut(&image) {
            t.done = done;
            for &i in &indices {
                at_once |= t.announce_at_once.remove(&i);
                if t.sched.is_wanted(i) {
                    t.sched.handle_local_have(now, i);
                }
            }
        }
        if at_once {
            self.flush_have(image);
        }
        self.maybe_finish(image);
    }

    /// Bans `peer` everywhere (`reason` is logged): it sent a corrupt chunk to one of our transfers,
    /// a bad manifest, or bytes that are not a message.
    pub(super) fn ban(&mut self, peer: PeerId, reason: &str) {
        if !self.banned.insert(peer) {
            return;
        }
        tracing::warn!(%peer, "banning peer: {reason}");
        self.metrics
            .bans
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _ = self.swarm.disconnect_peer_id(peer);
        self.on_peer_gone(peer);
    }
}
