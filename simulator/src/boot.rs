//! What a booting VM reads, and when.
//!
//! A boot is a sequence of reads (byte ranges of the image). The VM is blocked on each read: it
//! issues the next one only after the previous one completed plus a think time. The reads come from
//! a recorded trace or from a model:
//!
//! - The *working set* (a fraction of the image) is made of *extents* (files) whose lengths are
//!   exponentially distributed around `extent_mean` (rounded up to 4 KiB pages) and whose offsets
//!   are uniform over the image (page aligned). Extents are read in a random order, each front to
//!   back in reads of at most `read_size`.
//! - A fraction `shared` of the working set is common to every VM of the image (the OS boot path:
//!   same kernel, same libraries); it is drawn once per run. The rest is drawn per VM and its reads
//!   are interleaved at random positions.
//! - Think times are exponential with mean `think_mean`, drawn per VM, unless the trace gives them.
//!
//! The boot profile (the chunks of the shared reads in first-touch order) is what vmswarm's
//! `boot_profile` option hands to the scheduler. This module decides only the reads; mapping them
//! to chunks is the manifest's job and fetching them the scheduler's.

use std::rc::Rc;
use std::time::Duration;

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use vmswarm_protocol::manifest::Manifest;

use crate::scenario::BootSpec;

const PAGE: u64 = 4096;

/// One read: `len` bytes at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Read {
    /// Byte offset in the image.
    pub offset: u64,
    /// Length in bytes (> 0).
    pub len: u64,
}

/// The reads every VM of the image shares, with think times if they were recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedTrace {
    /// The reads, in order.
    pub reads: Vec<Read>,
    /// Recorded think time after each read (`None`: drawn from the model).
    pub thinks: Vec<Option<Duration>>,
}

/// Draws an exponential variate with the given mean.
pub fn exponential(rng: &mut ChaCha8Rng, mean: f64) -> f64 {
    if mean <= 0.0 {
        return 0.0;
    }
    let u: f64 = rng.random::<f64>();
    -mean * (1.0 - u).ln()
}

/// Extents totalling at least `target` bytes, split into reads.
fn model_reads(spec: &BootSpec, image_size: u64, target: u64, rng: &mut ChaCha8Rng) -> Vec<Read> {
    let mut reads = Vec::new();
    let mut total = 0u64;
    let max_extent = image_size.clamp(PAGE, u64::MAX);
    while total < target {
        let raw = exponential(rng, spec.extent_mean as f64).ceil() as u64;
        let len = raw
            .div_ceil(PAGE)
            .max(1)
            .saturating_mul(PAGE)
            .min(max_extent);
        let slots = (image_size.saturating_sub(len)) / PAGE + 1;
        let offset = rng.random_range(0..slots) * PAGE;
        let len = len.min(image_size - offset);
        let mut at = offset;
        while at < offset + len {
            let n = spec.read_size.min(offset + len - at);
            reads.push(Read { offset: at, len: n });
            at += n;
        }
        total += len;
    }
    reads
}

/// The shared part of the boot: the trace if one was given, else the model's shared extents.
pub fn shared_trace(spec: &BootSpec, image_size: u64, rng: &mut ChaCha8Rng) -> SharedTrace {
    if let Some(trace) = &spec.trace {
        return SharedTrace {
            reads: trace
                .iter()
                .map(|r| Read {
                    offset: r.offset,
                    len: r.len,
                })
                .collect(),
            thinks: trace.iter().map(|r| r.think).collect(),
        };
    }
    let target = (spec.working_set * spec.shared * image_size as f64).round() as u64;
    let reads = model_reads(spec, image_size, target.max(1), rng);
    let thinks = vec![None; reads.len()];
    SharedTrace { reads, thinks }
}

/// One VM's reads: the shared trace, with the VM's private reads interleaved if it has any.
#[derive(Debug, Clone)]
pub enum VmReads {
    /// Exactly the shared trace (no private reads): nothing is copied.
    Shared(Rc<SharedTrace>),
    /// The merged sequence.
    Own(Vec<(Read, Option<Duration>)>),
}

impl VmReads {
    /// A VM's reads: its private reads (if `shared < 1` and no trace is given) are placed at random
    /// positions of the shared sequence.
    pub fn new(
        spec: &BootSpec,
        image_size: u64,
        shared: Rc<SharedTrace>,
        rng: &mut ChaCha8Rng,
    ) -> VmReads {
        if spec.trace.is_some() || spec.shared >= 1.0 {
            return VmReads::Shared(shared);
        }
        let target = (spec.working_set * (1.0 - spec.shared) * image_size as f64).round();
        let n = shared.reads.len();
        let mut private: Vec<(usize, Read)> = model_reads(spec, image_size, target as u64, rng)
            .into_iter()
            .map(|r| (rng.random_range(0..=n), r))
            .collect();
        private.sort_by_key(|p| p.0);
        let mut merged = Vec::with_capacity(n + private.len());
        let mut p = 0;
        for (i, r) in shared.reads.iter().enumerate() {
            while p < private.len() && private[p].0 <= i {
                merged.push((private[p].1, None));
                p += 1;
            }
            merged.push((*r, shared.thinks[i]));
        }
        merged.extend(private[p..].iter().map(|x| (x.1, None)));
        VmReads::Own(merged)
    }

    /// Number of reads.
    pub fn len(&self) -> usize {
        match self {
            VmReads::Shared(s) => s.reads.len(),
            VmReads::Own(v) => v.len(),
        }
    }

    /// Whether there are no reads.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Read number `i` and its recorded think time, if any.
    pub fn get(&self, i: usize) -> Option<(Read, Option<Duration>)> {
        match self {
            VmReads::Shared(s) => Some((*s.reads.get(i)?, s.thinks[i])),
            VmReads::Own(v) => v.get(i).copied(),
        }
    }
}

/// The boot profile: chunk indices of the shared reads in first-touch order.
pub fn profile(trace: &SharedTrace, manifest: &Manifest) -> Vec<u32> {
    let mut seen = vec![false; manifest.chunk_count() as usize];
    let mut order = Vec::new();
    for r in &trace.reads {
        for c in manifest.chunks_for_range(r.offset, r.len) {
            if !std::mem::replace(&mut seen[c as usize], true) {
                order.push(c);
            }
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn spec() -> BootSpec {
        BootSpec {
            working_set: 0.05,
            extent_mean: 512 * 1024,
            read_size: 128 * 1024,
            think_mean: Duration::from_millis(1),
            read_service: Duration::ZERO,
            shared: 1.0,
            trace: None,
        }
    }

    #[test]
    fn working_set_size_and_read_sizes() {
        let size = 1u64 << 30;
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let t = shared_trace(&spec(), size, &mut rng);
        let total: u64 = t.reads.iter().map(|r| r.len).sum();
        let target = size / 20;
        assert!(
            total >= target && total < target + 16 * 1024 * 1024,
            "{total}"
        );
        assert!(
            t.reads
                .iter()
                .all(|r| r.len > 0 && r.len <= 128 * 1024 && r.offset + r.len <= size)
        );
    }

    #[test]
    fn private_reads_interleave_in_order() {
        let size = 1u64 << 28;
        let mut s = spec();
        s.shared = 0.5;
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let shared = Rc::new(shared_trace(&s, size, &mut rng));
        let vm = VmReads::new(&s, size, shared.clone(), &mut rng);
        let merged: Vec<Read> = (0..vm.len()).map(|i| vm.get(i).unwrap().0).collect();
        // The shared reads appear in order, and the private ones add about as many bytes again.
        let mut it = merged.iter();
        for r in &shared.reads {
            assert!(it.any(|m| m == r), "shared read missing or out of order");
        }
        let total: u64 = merged.iter().map(|r| r.len).sum();
        let shared_total: u64 = shared.reads.iter().map(|r| r.len).sum();
        assert!(total > shared_total * 3 / 2, "{total} vs {shared_total}");
        assert!(vm.get(vm.len()).is_none());
    }
}
