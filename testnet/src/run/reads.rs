//! What a VM's `qemu-io` log says about its reads: each read's offset, length and time, and which
//! of them were served from chunks the node already held.
//!
//! `run` uses it to measure the block export's own cost per read under the run's real load (the
//! NBD round trip, the store read, the reply: everything but the network), which `compare` hands
//! to the simulator as `boot.read_ms`, as it hands over the RTTs and bandwidths the testnet had.
//! A read counts as local when the VM's node is a source (it holds the whole image), or when every
//! chunk it touches was touched by an earlier read of the same VM: reads are issued one at a time,
//! so those chunks were on the node before this read began.

use std::collections::HashSet;

/// One read in a `qemu-io` log.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoggedRead {
    /// Byte offset.
    pub offset: u64,
    /// Length, bytes.
    pub len: u64,
    /// How long the read took, s (from qemu-io's `ops/sec`, the precise one of its figures).
    pub secs: f64,
}

/// The reads of a `qemu-io` log, in order. A read whose timing line is missing or unreadable (a
/// failed read, a log cut short) is skipped.
pub fn parse_log(log: &str) -> Vec<LoggedRead> {
    let mut out = Vec::new();
    let mut pending: Option<(u64, u64)> = None;
    for line in log.lines() {
        let read = line
            .split("read ")
            .nth(1)
            .and_then(|rest| rest.split_once(" bytes at offset "));
        if let Some((lens, offset)) = read {
            let len = lens.split('/').next().and_then(|l| l.trim().parse().ok());
            let offset = offset.trim().parse().ok();
            pending = len.zip(offset).map(|(len, offset)| (offset, len));
            continue;
        }
        let Some(head) = line.strip_suffix(" ops/sec)") else {
            continue;
        };
        let rate = head.rsplit(' ').next().and_then(|r| r.parse::<f64>().ok());
        if let (Some((offset, len)), Some(rate)) =
            (pending.take(), rate.filter(|r| r.is_finite() && *r > 0.0))
        {
            out.push(LoggedRead {
                offset,
                len,
                secs: 1.0 / rate,
            });
        }
    }
    out
}

/// The times (s) of the reads in `reads` that were served from chunks the node held: all of them
/// when `all_local` (the node is a source), else those whose chunks all an earlier read touched.
pub fn local_read_times(reads: &[LoggedRead], chunk_size: u64, all_local: bool) -> Vec<f64> {
    let chunk_size = chunk_size.max(1);
    let mut seen: HashSet<u64> = HashSet::new();
    let mut out = Vec::new();
    for r in reads.iter().filter(|r| r.len > 0) {
        let chunks = r.offset / chunk_size..=(r.offset + r.len - 1) / chunk_size;
        if all_local || chunks.clone().all(|c| seen.contains(&c)) {
            out.push(r.secs);
        }
        seen.extend(chunks);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "qemu-io> read 20480/20480 bytes at offset 202166272
20 KiB, 1 ops; 00.00 sec (5.147 MiB/sec and 263.5402 ops/sec)
qemu-io> qemu-io> read 131072/131072 bytes at offset 262144
128 KiB, 1 ops; 00.01 sec (19.545 MiB/sec and 100.0000 ops/sec)
qemu-io> read 131072/131072 bytes at offset 393216
qemu-io> read failed: Input/output error
qemu-io> read 65536/65536 bytes at offset 380000
64 KiB, 1 ops; 00.00 sec (5.141 MiB/sec and 200.0000 ops/sec)
qemu-io> qemu-io> ";

    #[test]
    fn reads_and_times_come_from_the_log() {
        let reads = parse_log(LOG);
        assert_eq!(reads.len(), 3, "{reads:?}");
        assert_eq!((reads[0].offset, reads[0].len), (202_166_272, 20_480));
        assert!((reads[0].secs - 1.0 / 263.5402).abs() < 1e-9);
        // The failed read has no timing line and is skipped, not paired with the next one's.
        assert_eq!((reads[2].offset, reads[2].len), (380_000, 65_536));
        assert!((reads[2].secs - 0.005).abs() < 1e-9);
    }

    #[test]
    fn a_read_is_local_when_earlier_reads_touched_its_chunks() {
        let reads = parse_log(LOG);
        // 256 KiB chunks: the first two reads touch new chunks, the third (380000..445536) lies in
        // chunk 1, which the second read brought.
        assert_eq!(local_read_times(&reads, 262_144, false), vec![0.005]);
        // On a source node every read is local.
        assert_eq!(local_read_times(&reads, 262_144, true).len(), 3);
        // 64 KiB chunks: the third read spans chunks 5 and 6; chunk 6 is new.
        assert!(local_read_times(&reads, 65_536, false).is_empty());
    }

    #[test]
    fn garbage_is_no_read() {
        assert!(parse_log("read x/y bytes at offset z\n1 ops; (nan ops/sec)\n").is_empty());
        assert!(parse_log("").is_empty());
    }
}
