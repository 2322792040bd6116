//! A generated disk image with a realistic layout: not all zeros, not all random.
//!
//! The image is written in 64 KiB blocks, each drawn (seeded) as one of: unused space (zeros, 35%),
//! a copy of an earlier block (duplicated files and package caches, 15%), text-like low-entropy
//! data (config files, logs, scripts, 25%), or incompressible data (binaries, compressed
//! archives, 25%). At 256 KiB chunks that gives all-zero chunks (sparse, never transferred),
//! duplicate chunks (deduplicated by the store) and distinct ones, as a real OS image has.

use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::Context;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vmswarm_protocol::ChunkId;
use vmswarm_protocol::chunker::is_all_zero;
use vmswarm_sim::content::Content;

const BLOCK: usize = 64 * 1024;
const WORDS: &[&str] = &[
    "kernel",
    "systemd",
    "eth0",
    "root",
    "usr",
    "lib",
    "config",
    "enable",
    "true",
    "false",
    "service",
    "mount",
    "boot",
    "/etc",
    "network",
    "# comment",
    "0x0000",
    "user",
    "daemon",
    "log",
];

/// Writes `size` bytes to `path`. Same seed, same bytes.
pub fn generate(path: &Path, size: u64, chunk_size: u32, seed: u64) -> anyhow::Result<()> {
    let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, f);
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x0069_6d61_6765);
    // Earlier regions (block by block) that duplicate regions copy whole, so the copies are
    // chunk-aligned and produce identical chunks.
    let mut history: Vec<Vec<Vec<u8>>> = Vec::new();
    let mut current: Vec<Vec<u8>> = Vec::new();
    let mut block = vec![0u8; BLOCK];
    let mut left = size;
    // Regions are two chunks long (whole chunks, aligned), so zero and duplicate runs cover chunks.
    let region = (chunk_size as usize).max(BLOCK) / BLOCK * 2;
    let mut kind = 0u32;
    let mut source = None;
    let mut in_region = 0usize;
    while left > 0 {
        if in_region == 0 {
            if kind >= 50 && history.len() < 64 && current.len() == region {
                history.push(std::mem::take(&mut current));
            }
            current.clear();
            kind = rng.random_range(0..100);
            source = (35..50)
                .contains(&kind)
                .then_some(history.len())
                .filter(|n| *n > 0);
            source = source.map(|n| rng.random_range(0..n));
            in_region = region;
        }
        let pos = region - in_region;
        in_region -= 1;
        match (kind, source) {
            (0..35, _) => block.fill(0),
            (35..50, Some(src)) => block.copy_from_slice(&history[src][pos]),
            (35..75, _) => {
                let mut at = 0;
                while at < BLOCK {
                    let word = WORDS[rng.random_range(0..WORDS.len())].as_bytes();
                    let n = word.len().min(BLOCK - at);
                    block[at..at + n].copy_from_slice(&word[..n]);
                    at += n;
                    if at < BLOCK {
                        block[at] = if rng.random_range(0..8) == 0 {
                            b'\n'
                        } else {
                            b' '
                        };
                        at += 1;
                    }
                }
            }
            _ => rng.fill_bytes(&mut block),
        }
        if kind >= 50 {
            current.push(block.clone());
        }
        let n = left.min(BLOCK as u64) as usize;
        w.write_all(&block[..n])
            .with_context(|| format!("writing {}", path.display()))?;
        left -= n as u64;
    }
    w.flush()?;
    w.into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    Ok(())
}

/// The content layout of the image at `path` in `chunk_size` chunks (which chunks are all-zero and
/// which repeat an earlier one), for the simulator to fetch what the nodes fetch.
pub fn content_layout(path: &Path, chunk_size: u32) -> anyhow::Result<Content> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; chunk_size as usize];
    let mut ids = Vec::new();
    let mut zero = Vec::new();
    loop {
        let mut n = 0;
        while n < buf.len() {
            let got = f
                .read(&mut buf[n..])
                .with_context(|| format!("reading {}", path.display()))?;
            if got == 0 {
                break;
            }
            n += got;
        }
        if n == 0 {
            break;
        }
        ids.push(ChunkId::of(&buf[..n]));
        zero.push(is_all_zero(&buf[..n]));
        if n < buf.len() {
            break;
        }
    }
    Ok(Content::from_ids(&ids, |i, _| zero[i as usize]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn content_layout_finds_the_zero_and_repeated_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let c = 64 * 1024;
        let mut bytes = vec![0u8; 5 * c + 100];
        bytes[c..2 * c].fill(7);
        bytes[3 * c..4 * c].fill(7);
        bytes[4 * c..5 * c].fill(9);
        bytes[5 * c..].fill(7);
        std::fs::write(&p, &bytes).unwrap();
        let layout = content_layout(&p, c as u32).unwrap();
        assert_eq!(layout.chunk_count(), 6);
        assert!(layout.is_zero(0) && layout.is_zero(2) && !layout.is_zero(5));
        assert_eq!(layout.group(3), &[1, 3]);
        assert!(
            layout.group(5).is_empty(),
            "a short tail is its own content"
        );
        assert_eq!(layout.summary(), (2, 1, 3));
    }

    #[test]
    fn layout_mixes_zero_duplicate_and_distinct_chunks_deterministically() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let size = 32 << 20;
        generate(&a, size, 256 * 1024, 7).unwrap();
        generate(&b, size, 256 * 1024, 7).unwrap();
        let bytes = std::fs::read(&a).unwrap();
        assert_eq!(bytes.len() as u64, size);
        assert_eq!(bytes, std::fs::read(&b).unwrap(), "same seed, same image");
        let chunks: Vec<&[u8]> = bytes.chunks(256 * 1024).collect();
        let zero = chunks.iter().filter(|c| c.iter().all(|x| *x == 0)).count();
        let distinct: HashSet<&[u8]> = chunks.iter().copied().collect();
        assert!(
            zero > chunks.len() / 10,
            "{zero} zero chunks of {}",
            chunks.len()
        );
        assert!(
            zero < chunks.len() / 2,
            "{zero} zero chunks of {}",
            chunks.len()
        );
        assert!(
            distinct.len() < chunks.len() - zero + 1,
            "no duplicate chunks"
        );
        assert!(distinct.len() > chunks.len() / 3);
        generate(&b, size, 256 * 1024, 8).unwrap();
        assert_ne!(bytes, std::fs::read(&b).unwrap());
    }
}
