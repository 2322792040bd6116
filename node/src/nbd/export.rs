//! The backend of one mount: reads of the base image, on-demand fetch of absent chunks, and the
//! copy-on-write overlay of a clone.
//!
//! This module decides how a request maps to chunks and overlay blocks:
//! - A READ maps to chunk indices ([`Manifest::chunks_for_range`]). Zero chunks are zeros; stored
//!   chunks are read with [`ChunkStore::read_at`] on the blocking pool, with no network round trip;
//!   absent chunks are sent to the daemon's owning task as [`DemandRequest`]s and the read waits
//!   until each arrives verified and stored (or fails). The daemon, not this module, turns them into
//!   Demand wants of the image's fetch scheduler, joins concurrent waiters of one chunk into one
//!   fetch, and fails them when the scheduler gives up ([`vmswarm_protocol::fetch::Config::demand_deadline`]).
//!   Such a failure is an `EIO` for that READ only.
//! - On a clone, a READ is split into runs by the overlay's block map: written blocks come from the
//!   overlay, zeroed ones are zeros, the rest falls through to the base as above.
//! - A WRITE covers whole overlay blocks; partial edge blocks are completed by a read-modify-write
//!   under a per-block lock (striped), so two unaligned writes into one block never lose each other.
//!   TRIM zeroes the whole blocks it covers (the spec leaves trimmed bytes unspecified; zeros are the
//!   cheapest honest answer) and ignores partial edges. WRITE_ZEROES zeroes whole blocks and
//!   writes zeros into partial ones. The base image is never written.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use vmswarm_protocol::ImageId;
use vmswarm_protocol::bitfield::ChunkBitmap;
use vmswarm_protocol::manifest::Manifest;

use super::proto::{Errno, ExportInfo, Refusal};
use super::server::Backend;
use crate::metrics::ExportMetrics;
use crate::overlay::{self, Overlay, Source};
use crate::profile::Recorder;
use crate::store::ChunkStore;

/// Lock stripes for read-modify-write of overlay blocks.
const STRIPES: usize = 64;
/// Most times one READ fetches chunks that left the store under it before it gives up (`EIO`).
const MAX_READ_ROUNDS: u32 = 3;

/// A read's request for an absent chunk, answered when the chunk is stored (or cannot be had).
#[derive(Debug)]
pub struct DemandRequest {
    /// The image.
    pub image: ImageId,
    /// The chunk index.
    pub index: u32,
    /// The export that asked (for its counters).
    pub export: Arc<ExportMetrics>,
    /// `Ok` once the chunk is in the store; `Err` with a reason when it could not be fetched.
    pub reply: oneshot::Sender<Result<(), String>>,
}

/// How a mount reaches the daemon's owning task.
pub type DemandSender = mpsc::UnboundedSender<DemandRequest>;

/// The backend of one mount; see the module docs.
#[derive(Debug)]
pub struct MountExport {
    info: ExportInfo,
    image: ImageId,
    manifest: Arc<Manifest>,
    zero: ChunkBitmap,
    store: Arc<ChunkStore>,
    demand: DemandSender,
    /// Backstop for a demand answer that never comes (the daemon's scheduler decides the real
    /// deadline and answers before this).
    backstop: Duration,
    overlay: Option<Arc<Overlay>>,
    stripes: Vec<tokio::sync::Mutex<()>>,
    metrics: Arc<ExportMetrics>,
    recorder: Option<Arc<Recorder>>,
}

/// What a mount is made of.
#[derive(Debug)]
pub struct ExportParts {
    /// Export name.
    pub name: String,
    /// The image and its manifest.
    pub image: ImageId,
    /// The manifest.
    pub manifest: Arc<Manifest>,
    /// The node's store.
    pub store: Arc<ChunkStore>,
    /// The daemon's demand channel.
    pub demand: DemandSender,
    /// See [`MountExport`].
    pub backstop: Duration,
    /// A clone's overlay (writable export), or none (read-only).
    pub overlay: Option<Arc<Overlay>>,
    /// Counters.
    pub metrics: Arc<ExportMetrics>,
    /// Boot profile recorder, while recording.
    pub recorder: Option<Arc<Recorder>>,
}

/// Reads `[offset, end)` of the base image from chunks `range` into a recycled buffer. `Ok(Err)`
/// names the chunks that were not in the store (they left it since the caller checked).
fn read_chunks(
    store: &ChunkStore,
    manifest: &Manifest,
    zero: &ChunkBitmap,
    range: std::ops::Range<u32>,
    offset: u64,
    end: u64,
) -> Result<Result<Vec<u8>, Vec<u32>>, Refusal> {
    // A recycled buffer (the reply writer gives it back): a fresh one of a large READ would be
    // new pages, faulted in and zeroed by the kernel on every request. Its contents are
    // unspecified, so every byte is written below: the range's chunks cover [offset, end) exactly.
    let mut buf = crate::net::buffers::take((end - offset) as usize);
    let mut gone = Vec::new();
    for i in range {
        let Some(r) = manifest.chunk_range(i) else {
            return Err(eio(format!("chunk {i} is outside the image")));
        };
        let from = r.start.max(offset);
        let to = r.end.min(end);
        let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
        if zero.contains(i) {
            dst.fill(0);
            continue;
        }
        let id = manifest.chunks[i as usize];
        match store.read_at(&id, (from - r.start) as u32, dst) {
            Ok(true) => {}
            Ok(false) => gone.push(i),
            Err(e) => return Err(eio(format!("reading chunk {i}: {e}"))),
        }
    }
    if gone.is_empty() {
        Ok(Ok(buf))
    } else {
        crate::net::buffers::give(buf);
        Ok(Err(gone))
    }
}

fn eio(message: impl Into<String>) -> Refusal {
    Refusal {
        errno: Errno::Io,
        message: message.into(),
    }
}

impl MountExport {
    /// Builds the backend.
    pub fn new(p: ExportParts) -> MountExport {
        let description = match &p.overlay {
            Some(_) => format!("vmswarm clone of {} ({})", p.manifest.name, p.image),
            None => format!("vmswarm image {} ({})", p.manifest.name, p.image),
        };
        MountExport {
            info: ExportInfo {
                name: p.name,
                size: p.manifest.image_size,
                writable: p.overlay.is_some(),
                description,
                preferred_block: overlay::BLOCK as u32,
            },
            image: p.image,
            zero: p.manifest.zero_map(),
            manifest: p.manifest,
            store: p.store,
            demand: p.demand,
            backstop: p.backstop,
            overlay: p.overlay,
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            metrics: p.metrics,
            recorder: p.recorder,
        }
    }

    /// The export's counters.
    pub fn metrics(&self) -> &Arc<ExportMetrics> {
        &self.metrics
    }

    /// The image.
    pub fn image(&self) -> ImageId {
        self.image
    }

    /// The clone overlay, if writable.
    pub fn overlay(&self) -> Option<&Arc<Overlay>> {
        self.overlay.as_ref()
    }

    /// Reads `len` bytes of the base image at `offset` into a new buffer, fetching absent chunks.
    /// Returns the buffer and how many of its bytes needed a fetch.
    ///
    /// A chunk can leave the store between the check and the read: the store found it rotten on
    /// its first read since start and quarantined it (see `ChunkStore::read_at`). Such a chunk is
    /// fetched like any missing one and the read tried again, [`MAX_READ_ROUNDS`] times at most
    /// (each fetch is bounded by the Demand deadline), so a read never returns unverified bytes
    /// and fails with `EIO` only if no verified copy can be had.
    async fn read_base(&self, offset: u64, len: u64) -> Result<(Vec<u8>, u64), Refusal> {
        let range = self.manifest.chunks_for_range(offset, len);
        let end = offset + len;
        let mut missing = Vec::new();
        let mut fetched_bytes = 0u64;
        for i in range.clone() {
            if let Some(rec) = &self.recorder {
                rec.touch(i);
            }
            if self.zero.contains(i) || self.store.contains(&self.manifest.chunks[i as usize]) {
                continue;
            }
            missing.push(i);
        }
        let mut round = 0;
        loop {
            round += 1;
            if !missing.is_empty() {
                for &i in &missing {
                    if let Some(r) = self.manifest.chunk_range(i) {
                        fetched_bytes += r.end.min(end) - r.start.max(offset);
                    }
                }
                self.fetch(&missing).await?;
            }
            let store = self.store.clone();
            let manifest = self.manifest.clone();
            let zero = self.zero.clone();
            let range = range.clone();
            let read = tokio::task::spawn_blocking(move || {
                read_chunks(&store, &manifest, &zero, range, offset, end)
            })
            .await
            .map_err(|e| eio(format!("read task failed: {e}")))??;
            match read {
                Ok(buf) => return Ok((buf, fetched_bytes)),
                Err(gone) if round < MAX_READ_ROUNDS => {
                    tracing::warn!(
                        image = %self.image,
                        chunks = ?gone,
                        "chunks left the store during a read (quarantined?); fetching verified copies"
                    );
                    missing = gone;
                }
                Err(gone) => {
                    return Err(eio(format!(
                        "chunks {gone:?} of image {} left the store {MAX_READ_ROUNDS} times during one read",
                        self.image
                    )));
                }
            }
        }
    }

    /// Asks the daemon for `indices` and waits until all are stored.
    async fn fetch(&self, indices: &[u32]) -> Result<(), Refusal> {
        let mut waits = Vec::with_capacity(indices.len());
        for &index in indices {
            let (tx, rx) = oneshot::channel();
            self.demand
                .send(DemandRequest {
                    image: self.image,
                    index,
                    export: self.metrics.clone(),
                    reply: tx,
                })
                .map_err(|_| eio("the node is shutting down"))?;
            waits.push((index, rx));
        }
        let started = Instant::now();
        for (index, rx) in waits {
            let left = self.backstop.saturating_sub(started.elapsed());
            let outcome = match tokio::time::timeout(left, rx).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => Err("the node dropped the request (shutting down?)".to_owned()),
                Err(_) => Err(format!(
                    "no answer within {:.1}s",
                    self.backstop.as_secs_f64()
                )),
            };
            if let Err(why) = outcome {
                self.metrics.demand_failures.fetch_add(1, Ordering::Relaxed);
                return Err(eio(format!(
                    "chunk {index} of image {} could not be fetched: {why}",
                    self.image
                )));
            }
        }
        Ok(())
    }

    /// Reads through the overlay (clones) or the base.
    async fn read_any(&self, offset: u64, len: u64) -> Result<(Vec<u8>, u64), Refusal> {
        let Some(ov) = &self.overlay else {
            return self.read_base(offset, len).await;
        };
        let mut buf = vec![0u8; len as usize];
        let mut fetched = 0;
        for (src, off, l) in ov.segments(offset, len) {
            let dst = (off - offset) as usize..(off - offset + l) as usize;
            match src {
                Source::Zero => {}
                Source::Data => {
                    let ov = ov.clone();
                    let part = tokio::task::spawn_blocking(move || {
                        let mut b = vec![0u8; l as usize];
                        ov.read_data(off, &mut b).map(|()| b)
                    })
                    .await
                    .map_err(|e| eio(format!("read task failed: {e}")))?
                    .map_err(|e| eio(e.to_string()))?;
                    buf[dst].copy_from_slice(&part);
                }
                Source::Base => {
                    let (part, f) = self.read_base(off, l).await?;
                    fetched += f;
                    buf[dst].copy_from_slice(&part);
                }
            }
        }
        Ok((buf, fetched))
    }

    fn overlay_or_perm(&self) -> Result<&Arc<Overlay>, Refusal> {
        self.overlay.as_ref().ok_or(Refusal {
            errno: Errno::Perm,
            message: "read-only export".into(),
        })
    }

    /// Locks the stripes of blocks `first..=last` in ascending order (no deadlock between writers).
    async fn lock_blocks(&self, first: u64, last: u64) -> Vec<tokio::sync::MutexGuard<'_, ()>> {
        let mut idx: Vec<usize> = (first..=last.min(first + STRIPES as u64))
            .map(|b| (b % STRIPES as u64) as usize)
            .collect();
        idx.sort_unstable();
        idx.dedup();
        let mut guards = Vec::with_capacity(idx.len());
        for i in idx {
            guards.push(self.stripes[i].lock().await);
        }
        guards
    }

    /// Writes `data` at `offset` into the overlay: whole blocks, edges completed from the current
    /// contents. `data == None` writes zeros.
    async fn write_range(
        &self,
        offset: u64,
        len: u64,
        data: Option<Vec<u8>>,
    ) -> Result<(), Refusal> {
        let ov = self.overlay_or_perm()?.clone();
        if len == 0 {
            return Ok(());
        }
        let size = self.info.size;
        let first = offset / overlay::BLOCK;
        let last = (offset + len - 1) / overlay::BLOCK;
        let _guards = self.lock_blocks(first, last).await;
        let start = first * overlay::BLOCK;
        let stop = ((last + 1) * overlay::BLOCK).min(size);
        let head_partial = offset != start;
        let tail_partial = offset + len != stop;
        if data.is_none() {
            // Whole blocks become holes; partial edges get zeros written below.
            let inner_first = if head_partial { first + 1 } else { first };
            let inner_end = if tail_partial { last } else { last + 1 };
            if inner_end > inner_first {
                let ov2 = ov.clone();
                tokio::task::spawn_blocking(move || {
                    ov2.zero_blocks(inner_first, inner_end - inner_first)
                })
                .await
                .map_err(|e| eio(format!("write task failed: {e}")))?
                .map_err(|e| eio(e.to_string()))?;
            }
            for (partial, b) in [(head_partial, first), (tail_partial, last)] {
                if partial {
                    let bs = b * overlay::BLOCK;
                    let be = (bs + overlay::BLOCK).min(size);
                    let (mut block, _) = self.read_any(bs, be - bs).await?;
                    let from = offset.max(bs) - bs;
                    let to = (offset + len).min(be) - bs;
                    block[from as usize..to as usize].fill(0);
                    let ov2 = ov.clone();
                    tokio::task::spawn_blocking(move || ov2.write_blocks(bs, &block))
                        .await
                        .map_err(|e| eio(format!("write task failed: {e}")))?
                        .map_err(|e| eio(e.to_string()))?;
                }
            }
            return Ok(());
        }
        let data = data.unwrap_or_default();
        let mut buf = if head_partial || tail_partial {
            let mut buf = vec![0u8; (stop - start) as usize];
            if head_partial {
                let be = (start + overlay::BLOCK).min(size);
                let (b, _) = self.read_any(start, be - start).await?;
                buf[..b.len()].copy_from_slice(&b);
            }
            if tail_partial {
                let bs = last * overlay::BLOCK;
                let (b, _) = self.read_any(bs, stop - bs).await?;
                let at = (bs - start) as usize;
                buf[at..at + b.len()].copy_from_slice(&b);
            }
            buf
        } else {
            Vec::new()
        };
        let payload = if buf.is_empty() {
            data
        } else {
            let at = (offset - start) as usize;
            buf[at..at + data.len()].copy_from_slice(&data);
            std::mem::take(&mut buf)
        };
        tokio::task::spawn_blocking(move || ov.write_blocks(start, &payload))
            .await
            .map_err(|e| eio(format!("write task failed: {e}")))?
            .map_err(|e| eio(e.to_string()))
    }

    async fn flush_overlay(&self) -> Result<(), Refusal> {
        let Some(ov) = self.overlay.clone() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || ov.flush())
            .await
            .map_err(|e| eio(format!("flush task failed: {e}")))?
            .map_err(|e| eio(e.to_string()))
    }
}

impl Backend for MountExport {
    fn budget_wait(&self) {
        self.metrics.budget_waits.fetch_add(1, Ordering::Relaxed);
    }

    fn info(&self) -> &ExportInfo {
        &self.info
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, Refusal> {
        let (buf, fetched) = self.read_any(offset, u64::from(len)).await?;
        self.metrics
            .bytes_read
            .fetch_add(u64::from(len), Ordering::Relaxed);
        self.metrics
            .bytes_local
            .fetch_add(u64::from(len) - fetched, Ordering::Relaxed);
        Ok(buf)
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), Refusal> {
        let len = data.len() as u64;
        self.write_range(offset, len, Some(data)).await?;
        self.metrics.bytes_written.fetch_add(len, Ordering::Relaxed);
        if fua {
            self.flush_overlay().await?;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), Refusal> {
        self.flush_overlay().await
    }

    async fn trim(&self, offset: u64, len: u32) -> Result<(), Refusal> {
        let ov = self.overlay_or_perm()?.clone();
        let first = offset.div_ceil(overlay::BLOCK);
        let end_byte = offset + u64::from(len);
        // Whole blocks only; the last block of the image counts as whole if the range reaches its end.
        let end = if end_byte >= self.info.size {
            self.info.size.div_ceil(overlay::BLOCK)
        } else {
            end_byte / overlay::BLOCK
        };
        if end <= first {
            return Ok(());
        }
        let _guards = self.lock_blocks(first, end - 1).await;
        tokio::task::spawn_blocking(move || ov.zero_blocks(first, end - first))
            .await
            .map_err(|e| eio(format!("trim task failed: {e}")))?
            .map_err(|e| eio(e.to_string()))
    }

    async fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> Result<(), Refusal> {
        self.write_range(offset, u64::from(len), None).await?;
        if fua {
            self.flush_overlay().await?;
        }
        Ok(())
    }
}
