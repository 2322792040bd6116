//! Received chunks on their way into the store: hashing off the event loop, group commit, and
//! backpressure.
//!
//! # What this module decides
//! - **Each received chunk is hashed exactly once**, on the blocking pool. A batch task checks every
//!   chunk of its batch ([`Verified::new`]) and reports the outcomes to the event loop at once (the
//!   fetch scheduler judges the peer on them: a corrupt chunk bans it), then hands the verified
//!   chunks to [`ChunkStore::put_many`], which trusts that check: one append and one shared
//!   `fdatasync` for the batch. The first version hashed each chunk on the event loop, then again
//!   in `put`, and paid two fsyncs and a new file per chunk.
//! - **Batching.** Chunks queue while earlier batches are written; a batch takes at most
//!   [`MAX_BATCH_BYTES`] and at most [`MAX_BATCHES`] run at once, so one batch fills the page cache
//!   while another waits for its fsync. Under load, batches grow by themselves (everything that
//!   arrived during the previous fsync), so the fsync count follows the disk's latency rather
//!   than the chunk count.
//! - **Backpressure.** Bytes received but not yet committed ([`Ingest::unstored_bytes`]) are bounded
//!   by [`MAX_UNSTORED_BYTES`]: above it the daemon stops carrying out its schedulers' new request
//!   decisions until batches complete (the decisions wait, queued, inside the scheduler). A stalled
//!   disk therefore stalls fetching instead of growing memory. Together with the scheduler's
//!   per-peer in-flight limit this bounds a puller's chunk memory independently of image size.
//!
//! The scheduler still makes every decision; this module only decides when bytes are hashed and
//! written, and pauses the daemon's execution of new requests while the store is behind.

use std::time::Instant as StdInstant;

use libp2p::PeerId;
use vmswarm_protocol::{ChunkId, ImageId};

use super::{Daemon, IoDone};
use crate::store::{StoreError, Verified};

/// Most chunk bytes in one batch.
pub(super) const MAX_BATCH_BYTES: usize = 8 << 20;
/// Most batches being checked and written at once.
pub(super) const MAX_BATCHES: usize = 2;
/// Most bytes received and not yet committed before new requests wait.
pub(super) const MAX_UNSTORED_BYTES: usize = 32 << 20;

/// A chunk received for a request of ours, not yet checked.
#[derive(Debug)]
pub(super) struct Received {
    pub(super) image: ImageId,
    pub(super) index: u32,
    pub(super) peer: PeerId,
    pub(super) sent: StdInstant,
    /// The id the manifest names for `index` (the peer said the same, and the length matches).
    pub(super) id: ChunkId,
    pub(super) data: Vec<u8>,
}

/// The outcome of checking one received chunk.
#[derive(Debug)]
pub(super) struct Checked {
    pub(super) image: ImageId,
    pub(super) index: u32,
    pub(super) peer: PeerId,
    pub(super) sent: StdInstant,
    pub(super) len: usize,
    pub(super) valid: bool,
}

/// The ingest pipeline's state (owned by the daemon task).
#[derive(Debug, Default)]
pub(super) struct Ingest {
    queue: Vec<Received>,
    batches: usize,
    unstored_bytes: usize,
}

impl Ingest {
    /// Bytes received and not yet committed (queued, being checked, or being written).
    pub(super) fn unstored_bytes(&self) -> usize {
        self.unstored_bytes
    }

    /// Whether the store is so far behind that new requests must wait.
    pub(super) fn backlogged(&self) -> bool {
        self.unstored_bytes >= MAX_UNSTORED_BYTES
    }
}

impl Daemon {
    /// Queues a received chunk for checking and storing.
    pub(super) fn ingest(&mut self, chunk: Received) {
        self.ingest.unstored_bytes += chunk.data.len();
        self.ingest.queue.push(chunk);
        self.start_batches();
    }

    /// Starts batches while fewer than [`MAX_BATCHES`] run.
    fn start_batches(&mut self) {
        while self.ingest.batches < MAX_BATCHES && !self.ingest.queue.is_empty() {
            let mut bytes = 0;
            let take = self
                .ingest
                .queue
                .iter()
                .take_while(|c| {
                    let first = bytes == 0;
                    bytes += c.data.len();
                    first || bytes <= MAX_BATCH_BYTES
                })
                .count();
            let batch: Vec<Received> = self.ingest.queue.drain(..take).collect();
            self.ingest.batches += 1;
            let store = self.store.clone();
            let io = self.io_tx.clone();
            tokio::task::spawn_blocking(move || {
                let verified: Vec<Option<Verified<'_>>> = batch
                    .iter()
                    .map(|c| Verified::new(c.id, &c.data).ok())
                    .collect();
                let checked: Vec<Checked> = batch
                    .iter()
                    .zip(&verified)
                    .map(|(c, v)| Checked {
                        image: c.image,
                        index: c.index,
                        peer: c.peer,
                        sent: c.sent,
                        len: c.data.len(),
                        valid: v.is_some(),
                    })
                    .collect();
                let stored: Vec<(ImageId, ChunkId)> = batch
                    .iter()
                    .zip(&verified)
                    .filter(|(_, v)| v.is_some())
                    .map(|(c, _)| (c.image, c.id))
                    .collect();
                let verified: Vec<Verified<'_>> = verified.into_iter().flatten().collect();
                let bytes = batch.iter().map(|c| c.data.len()).sum();
                let _ = io.send(IoDone::Checked(checked));
                let result = store.put_many(&verified).map(|_| ());
                drop(verified);
                for c in batch {
                    crate::net::buffers::give(c.data);
                }
                let _ = io.send(IoDone::Stored {
                    chunks: stored,
                    bytes,
                    result,
                });
            });
        }
    }

    /// A batch was written (or failed to be).
    pub(super) fn on_batch_stored(
        &mut self,
        chunks: Vec<(ImageId, ChunkId)>,
        bytes: usize,
        result: Result<(), StoreError>,
    ) {
        self.ingest.batches = self.ingest.batches.saturating_sub(1);
        self.ingest.unstored_bytes = self.ingest.unstored_bytes.saturating_sub(bytes);
        match result {
            Ok(()) => {
                for (image, id) in chunks {
                    self.on_stored(image, id, None);
                }
            }
            Err(e) => {
                let message = e.to_string();
                for (image, id) in chunks {
                    self.on_stored(image, id, Some(&message));
                }
            }
        }
        self.start_batches();
    }
}
