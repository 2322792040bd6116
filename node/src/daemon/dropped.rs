//! What the node does when its store drops a chunk it held: a chunk found rotten (by a mount's
//! first read, by serving it to a peer, or by `verify`) and quarantined, or whose bytes vanished
//! from their pack.
//!
//! This module decides, once per dropped chunk id (an id can be several indices of several images):
//! - **It is no longer counted.** Every index of every image that names the id leaves the image's
//!   present set, so `images` and `status` stop showing the image complete, and a Demand read of it
//!   fetches it like any missing chunk.
//! - **It is no longer advertised.** Indices not yet announced are withdrawn from the next Have
//!   update, and every connected peer that shares the image gets a fresh full `Have` (a `Have`
//!   replaces what the peer knew of us, so the chunk leaves its view and it stops asking us).
//! - **A full copy heals.** If the image is held for a pull (not a lazy mount's image), the
//!   dropped indices are wanted at Background, so the node fetches verified copies from the swarm
//!   and the image becomes complete again without the operator's help. A lazily mounted image
//!   fetches them when a read needs them.

use libp2p::PeerId;
use vmswarm_protocol::{ChunkId, ImageId, Priority};

use super::{Daemon, Outbound, mounts};

impl Daemon {
    /// The store dropped chunk `id` (see the module docs).
    pub(super) fn on_chunk_dropped(&mut self, id: ChunkId) {
        if self.store.contains(&id) {
            return; // already held again (a verified copy arrived meanwhile)
        }
        let mut touched: Vec<(ImageId, Vec<u32>, bool)> = Vec::new();
        for (image, img) in &mut self.images {
            let Some(indices) = img.by_id.get(&id) else {
                continue;
            };
            let was_full = img.present.is_full();
            let mut lost = Vec::new();
            for &i in indices {
                if img.present.remove(i) {
                    lost.push(i);
                }
            }
            if lost.is_empty() {
                continue;
            }
            img.unannounced.retain(|i| !lost.contains(i));
            touched.push((*image, lost, was_full));
        }
        if touched.is_empty() {
            return;
        }
        self.metrics
            .store_chunks_dropped
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for (image, lost, was_full) in touched {
            tracing::warn!(%image, chunk = %id, indices = ?lost, "chunk dropped from the store: no longer advertised; fetching it again where the image is wanted whole");
            self.readvertise(image);
            let present = self.images.get(&image).map_or(0, |i| i.present.count());
            let now = self.now();
            if let Some(t) = self.transfers.get_mut(&image) {
                t.done = u64::from(present);
                if !mounts::is_lazy(&self.opts.data_dir, &image) {
                    // Indices are the image's own, so in range.
                    let _ =
                        t.sched
                            .handle_want_many(now, lost.iter().copied(), Priority::Background);
                }
            } else if was_full && !mounts::is_lazy(&self.opts.data_dir, &image) {
                self.start_transfer_wanting(image, Vec::new(), true);
            }
            self.pump_transfer(image);
        }
    }

    /// Sends our full Have set of `image` to every connected peer that shares it.
    fn readvertise(&mut self, image: ImageId) {
        let Some(img) = self.images.get(&image) else {
            return;
        };
        let peers: Vec<PeerId> = img
            .interested
            .iter()
            .filter(|p| self.peers.contains_key(p))
            .copied()
            .collect();
        for peer in peers {
            let have = self.have_message(image);
            self.send(peer, have, Outbound::Have(image));
        }
    }
}
