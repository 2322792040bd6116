//! How urgently a chunk is wanted.
//!
//! Shared by the fetch scheduler (which wants to send first), the serve queue (which request to answer
//! first) and the wire (a request carries its priority so the serving peer can order it too).

use bincode::{Decode, Encode};

/// Urgency of a chunk want or request. Orders `Demand` before `Background`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Encode, Decode)]
pub enum Priority {
    /// A VM is blocked on this chunk right now.
    Demand,
    /// Prefetch or full pull: nobody is waiting on this particular chunk.
    Background,
}
