//! The discrete-event engine: virtual time and an event queue.
//!
//! Time is a [`vmswarm_protocol::Instant`] counted in nanoseconds from the start of the simulation
//! (epoch 0). Events scheduled for the same instant come out in the order they were scheduled (a
//! sequence number breaks ties), which makes a run a pure function of its inputs and seed. The
//! engine decides nothing about what events mean.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::time::Duration;

use vmswarm_protocol::Instant;

struct Entry<E> {
    at: Instant,
    seq: u64,
    event: E,
}

impl<E> PartialEq for Entry<E> {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at && self.seq == other.seq
    }
}
impl<E> Eq for Entry<E> {}
impl<E> PartialOrd for Entry<E> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<E> Ord for Entry<E> {
    fn cmp(&self, other: &Self) -> Ordering {
        // BinaryHeap is a max-heap: reverse so the earliest (then first scheduled) pops first.
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// A queue of future events of type `E` and the current virtual time.
pub struct EventQueue<E> {
    heap: BinaryHeap<Entry<E>>,
    now: Instant,
    seq: u64,
    popped: u64,
}

impl<E> std::fmt::Debug for EventQueue<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventQueue")
            .field("now", &self.now)
            .field("pending", &self.heap.len())
            .field("popped", &self.popped)
            .finish()
    }
}

impl<E> Default for EventQueue<E> {
    fn default() -> Self {
        EventQueue {
            heap: BinaryHeap::new(),
            now: Instant::ZERO,
            seq: 0,
            popped: 0,
        }
    }
}

impl<E> EventQueue<E> {
    /// An empty queue at time zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current virtual time: the time of the last event popped.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Schedules `event` at `at`; an instant in the past is taken as now.
    pub fn schedule_at(&mut self, at: Instant, event: E) {
        let at = at.max(self.now);
        self.heap.push(Entry {
            at,
            seq: self.seq,
            event,
        });
        self.seq += 1;
    }

    /// Schedules `event` after `delay`.
    pub fn schedule_in(&mut self, delay: Duration, event: E) {
        self.schedule_at(self.now + delay, event);
    }

    /// The time of the next event, if any.
    pub fn peek_time(&self) -> Option<Instant> {
        self.heap.peek().map(|e| e.at)
    }

    /// Removes the next event and advances the clock to its time.
    pub fn pop(&mut self) -> Option<(Instant, E)> {
        let e = self.heap.pop()?;
        self.now = e.at;
        self.popped += 1;
        Some((e.at, e.event))
    }

    /// Moves the clock forward to `at` without an event (for work the caller keeps outside the
    /// queue, such as flow completions). Earlier instants are ignored.
    pub fn advance_to(&mut self, at: Instant) {
        self.now = self.now.max(at);
    }

    /// Events popped so far.
    pub fn popped(&self) -> u64 {
        self.popped
    }

    /// Events waiting.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Whether no event is waiting.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

/// Nanoseconds as an [`Instant`] from seconds (for scenario start times).
pub fn instant_from_secs(s: f64) -> Instant {
    Instant::from_duration(Duration::from_secs_f64(s.max(0.0)))
}

/// Seconds since the epoch, for reports.
pub fn secs(t: Instant) -> f64 {
    t.as_nanos() as f64 / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_order_then_fifo() {
        let mut q = EventQueue::new();
        q.schedule_at(Instant::from_nanos(5), "b");
        q.schedule_at(Instant::from_nanos(1), "a");
        q.schedule_at(Instant::from_nanos(5), "c");
        assert_eq!(q.pop(), Some((Instant::from_nanos(1), "a")));
        q.schedule_in(Duration::from_nanos(4), "d");
        assert_eq!(q.pop().map(|e| e.1), Some("b"));
        assert_eq!(q.pop().map(|e| e.1), Some("c"));
        assert_eq!(q.pop().map(|e| e.1), Some("d"));
        assert_eq!(q.now(), Instant::from_nanos(5));
        // The past is clamped to now.
        q.schedule_at(Instant::ZERO, "e");
        assert_eq!(q.pop(), Some((Instant::from_nanos(5), "e")));
        assert!(q.is_empty());
        assert_eq!(q.popped(), 5);
    }
}
