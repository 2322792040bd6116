//! What an accept loop does when `accept()` fails: the one policy the control socket, the metrics
//! endpoint and the NBD listeners share.
//!
//! This module decides that errors about one pending connection (it was aborted or reset before we
//! took it, the call was interrupted) are skipped at once, and that every other error (out of file
//! descriptors: `EMFILE`/`ENFILE`; out of kernel memory: `ENOBUFS`/`ENOMEM`; anything unknown) makes
//! the loop sleep before it tries again: [`MIN_BACKOFF`] after the first failure, doubling up to
//! [`MAX_BACKOFF`] while failures continue, back to nothing after the next successful accept. Without
//! the sleep such a loop spins at 100% CPU, because the pending connection stays in the listen
//! backlog and the listener stays readable. The connection is not lost: it is accepted once a
//! descriptor is free again. Failures are logged at most once per [`LOG_EVERY`], with a count of
//! those not logged, so a long outage does not flood the log either.

use std::io;
use std::time::{Duration, Instant};

/// Sleep after the first failure in a row.
pub const MIN_BACKOFF: Duration = Duration::from_millis(50);
/// Longest sleep between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// At most one log line per this interval per loop.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// The error state of one accept loop.
#[derive(Debug)]
pub struct Backoff {
    what: &'static str,
    delay: Duration,
    last_log: Option<Instant>,
    unlogged: u64,
}

impl Backoff {
    /// A fresh state for the loop that accepts `what` (used in log lines).
    pub fn new(what: &'static str) -> Self {
        Backoff {
            what,
            delay: Duration::ZERO,
            last_log: None,
            unlogged: 0,
        }
    }

    /// A connection was accepted: the next failure starts from [`MIN_BACKOFF`] again.
    pub fn accepted(&mut self) {
        if !self.delay.is_zero() {
            tracing::info!(
                "{}: accepting connections again (after {} unlogged failures)",
                self.what,
                self.unlogged
            );
            self.unlogged = 0;
        }
        self.delay = Duration::ZERO;
    }

    /// Handles a failed `accept()`: returns at once for an error about that one connection,
    /// otherwise logs (rate-limited) and sleeps the current backoff.
    pub async fn failed(&mut self, e: &io::Error) {
        let sleep = self.on_failure(e);
        if !sleep.is_zero() {
            tokio::time::sleep(sleep).await;
        }
    }

    /// The bookkeeping of [`Backoff::failed`] without the sleep: returns how long to sleep (zero
    /// for an error about that one connection).
    fn on_failure(&mut self, e: &io::Error) -> Duration {
        if per_connection(e) {
            tracing::debug!("{}: skipping a connection: {e}", self.what);
            return Duration::ZERO;
        }
        self.delay = if self.delay.is_zero() {
            MIN_BACKOFF
        } else {
            (self.delay * 2).min(MAX_BACKOFF)
        };
        let now = Instant::now();
        if self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= LOG_EVERY)
        {
            tracing::warn!(
                "{}: accept failed: {e} (retrying in {:?}; {} more failures since the last report)",
                self.what,
                self.delay,
                self.unlogged
            );
            self.last_log = Some(now);
            self.unlogged = 0;
        } else {
            self.unlogged += 1;
        }
        self.delay
    }

    /// The sleep the next failure would start from (zero after a success).
    pub fn delay(&self) -> Duration {
        self.delay
    }
}

/// Whether `e` concerns only the connection being accepted (the listener itself is fine).
fn per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::PermissionDenied
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_errors_back_off_and_connection_errors_do_not() {
        let mut b = Backoff::new("test");
        let aborted = io::Error::from(io::ErrorKind::ConnectionAborted);
        assert_eq!(b.on_failure(&aborted), Duration::ZERO);
        assert_eq!(b.delay(), Duration::ZERO);
        // EMFILE
        let emfile = io::Error::from_raw_os_error(24);
        let seen: Vec<Duration> = (0..8).map(|_| b.on_failure(&emfile)).collect();
        assert_eq!(seen[0], MIN_BACKOFF);
        assert_eq!(seen[1], MIN_BACKOFF * 2);
        assert_eq!(*seen.last().unwrap(), MAX_BACKOFF);
        b.accepted();
        assert_eq!(b.delay(), Duration::ZERO);
        assert_eq!(b.on_failure(&emfile), MIN_BACKOFF);
    }
}
