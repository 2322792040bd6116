//! The fetch scheduler: which wanted chunk to request from which peer, and when to give up.
//!
//! One [`FetchScheduler`] serves one image (like a torrent in BitTorrent). Its caller — the node's
//! tokio task or the simulator's event loop — feeds it what happened (`handle_*`, each with `now`) and
//! drains what to do ([`FetchScheduler::poll_action`]), what to report
//! ([`FetchScheduler::poll_event`]) and when to call back ([`FetchScheduler::poll_timeout`] /
//! [`FetchScheduler::handle_timeout`]). It never sees bytes: the caller verifies a chunk against its
//! [`ChunkId`](crate::ChunkId) and reports the [`ChunkOutcome`].
//!
//! # The rules (each decided here and nowhere else)
//! - **Priorities.** Every `Demand` want (a VM is blocked on it) is assigned before any `Background`
//!   want in the same pass, Demand wants in arrival order. Each peer keeps
//!   [`Config::demand_reserved_slots`] of its [`Config::max_in_flight_per_peer`] slots free of
//!   Background requests, so a Demand want never waits for Background traffic to drain. A Background
//!   want that becomes Demand while in flight is re-requested at Demand priority from the same peer,
//!   which lets the serving side move it up its queue.
//! - **Background yields while a VM reads.** While Demand wants exist, and for
//!   [`Config::demand_backoff`] after the last one ended, a peer takes at most
//!   [`Config::background_during_demand`] new Background requests beside its Demand ones: a
//!   prefetch's streams would otherwise share the connection (and the nodes' CPU) with the chunk a
//!   VM is blocked on. Full windows resume when the back-off ends.
//! - **Background order.** An explicit priority list ([`FetchScheduler::set_priority_order`], used for
//!   boot profiles) first; then rarest first (fewest connected holders); ties broken by a random key
//!   drawn from the seeded RNG, so that nodes pulling the same image spread over different chunks.
//! - **Peer choice.** Peers not in cool-down first, then same site, then lower RTT (power-of-two
//!   buckets), then fewer requests in flight, then a random per-peer key. An *origin* (a source
//!   server announcing [`PeerInfo::origin`]) counts as outside the site even when it sits in ours, so
//!   a flash crowd against a same-site source is deduplicated like a WAN fetch.
//! - **Once per site.** If any same-site peer holds a chunk, it is fetched only inside the site
//!   (waiting for a free slot there rather than crossing the WAN). Otherwise exactly one node of the
//!   site is *assigned* the chunk's outside fetch: the one with the highest rendezvous score
//!   (a hash of its stable peer key and the chunk index) among itself and its connected same-site
//!   peers ([`FetchScheduler::set_local_peer`]; without it every node counts as assigned), or,
//!   once the caller names the site's gateways for the image ([`FetchScheduler::set_site_gateways`],
//!   [`crate::site`]), among the live gateways alone, so that the site agrees on one assignee
//!   whatever part of it each node sees. A Demand want assigned to a connected gateway that
//!   nobody in the site holds or fetches is told to that gateway ([`Action::Need`]), which fetches
//!   it at once at Demand priority and announces it ([`FetchScheduler::handle_peer_need`]), so a
//!   VM blocked on a chunk its site lacks waits one intra-site round trip for the gateway's
//!   announcement instead of crossing the WAN itself. The
//!   assigned node queues its assigned Background chunks first; the others' Background wants wait
//!   for its copy for at most [`Config::site_assign_wait`]. A same-site peer's `Fetching`
//!   announcement is waited for, for at most [`Config::local_pending_wait`] by a Background want
//!   and at most [`Config::demand_local_wait`] (from the moment it became Demand) by a Demand want.
//!   A Demand want waits for an unannounced assignment only [`Config::demand_assign_wait`] (5 ms:
//!   the assignee may not want the chunk at all, but in a flash crowd of VMs reading the same
//!   block it does, and its announcement arrives within that time), so a flash crowd is
//!   deduplicated by the assignee's announcement. Whenever we
//!   request a chunk from outside the site we announce it to our same-site peers
//!   ([`Action::AnnounceFetching`]).
//! - **Pipelining.** Each peer gets as many requests in flight as fill its bandwidth-delay product
//!   ([`Config::peer_rate_target`] x RTT / [`Config::chunk_bytes`]), at least
//!   [`Config::max_in_flight_per_peer`] and at most 256.
//! - **Hedging.** A Demand want whose only request has been outstanding for
//!   [`Config::hedge_delay`] is also requested from a better-ranked peer that obtains the chunk
//!   meanwhile (a same-site host when the request waits at a busy origin, or a less loaded peer);
//!   the first copy wins and the other request is cancelled.
//! - **Failure.** A request times out only when the peer has shown no progress (no chunk, no
//!   reject) for [`Config::request_timeout`] plus four RTTs since the request was sent: requests
//!   merely queued at a busy but working server do not time out, up to
//!   [`Config::request_max_wait`], and neither does a request whose chunk is arriving from outside
//!   the site ([`FetchScheduler::handle_chunk_arriving`]; such a request is not hedged either) or
//!   at Background priority (a gateway that serves its whole site's prefetch is slow, not gone). A
//!   timed-out request is cancelled and re-queued, and the peer gets a cool-down that doubles with
//!   each consecutive timeout (up to 30 s); a peer in cool-down keeps one request slot as a probe,
//!   so the only holder of a chunk is never abandoned by everyone at once, and a delivery ends the
//!   cool-down. A disconnect or a `Reject` re-queues the peer's requests. A chunk with a wrong hash
//!   bans its sender for the life of the scheduler ([`Event::PeerBanned`]) and re-queues the chunk.
//!   Wanted chunks that no connected peer holds are reported ([`Event::NoSource`]) so the caller
//!   can look for providers. A Demand want not delivered within [`Config::demand_deadline`] fails
//!   ([`Event::WantFailed`]) instead of waiting forever, and so does any want that has had no
//!   connected holder for [`Config::unavailable_deadline`] (a pull of an image nobody fully holds
//!   ends with the missing chunks named, instead of hanging).
//! - **Fan-out refusals.** A peer that answers `Reject { Fanout }` is sending that chunk to as
//!   many others as it serves one chunk to at once (`serve`, `fanout`). It is not asked for that
//!   chunk again for [`Config::relay_retry`], and gets no cool-down (it is not overloaded);
//!   meanwhile the want goes to a peer that announces the chunk later, typically one of those it
//!   was being sent to, which announce a Demand chunk at once (`wire::have_update_delay`). A
//!   lockstep flash crowd so spreads each block as a tree instead of through one node's uplink.
//!   To keep the whole crowd from asking every new holder in turn (each would accept a few and
//!   refuse the rest: messages growing with the square of the crowd), a refused want asks only
//!   holders whose rendezvous score for this requester and chunk beats that of every peer that
//!   refused it within `relay_retry` (`peer::relay_score`): a new holder among `k` is then asked
//!   by about `1/k` of the waiting crowd, and the crowd splits over the tree's branches. A
//!   Background refusal (a server with `serve::Config::background_fanout`) has no such bar:
//!   every other holder may be asked, and the refusing peer takes no Background request at all
//!   for `relay_retry` (a crowd prefetching in the same order would have its next chunk refused
//!   too: one refusal per peer per `relay_retry`, not one per chunk).
//! - **Endgame.** When every wanted chunk is in flight and at most [`Config::endgame_threshold`]
//!   remain, each is also requested from up to [`Config::endgame_max_requests`] peers; the first valid
//!   copy wins and the others are cancelled.
//!
//! Scheduling runs at the end of every `handle_*` call. Its cost is proportional to the work it
//! assigns plus the number of peers with free slots: a peer that had nothing to pick is skipped until
//! something that could give it work changes (a new want, a re-queue, its own Have set growing).

mod peer;
mod wake;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::fmt::Debug;
use std::hash::Hash;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::bitfield::ChunkBitmap;
use crate::priority::Priority;
use crate::time::Instant;
use peer::{Peer, RankKey, relay_score, site_score, stable_key};
use wake::{Look, Wakes};

/// How many Background queue entries to scan for a peer before switching to a bitmap intersection.
const SCAN_BUDGET: usize = 64;
/// Most indices carried by one [`Event::NoSource`].
const MAX_REPORTED_INDICES: usize = 1024;
/// Longest cool-down a peer gets after repeated timeouts.
const MAX_COOLDOWN: Duration = Duration::from_secs(30);
/// How long after a chunk's first bytes arrived its receiver reports it as arriving
/// ([`FetchScheduler::handle_chunk_arriving`]) if it is still incomplete. Quick transfers report
/// nothing; a slow one is reported well before [`Config::request_timeout`] could cancel it.
pub const ARRIVING_REPORT_AFTER: Duration = Duration::from_millis(500);
/// Most requests in flight to one peer, however large its bandwidth-delay product (a serving node
/// queues at most 256 chunks per peer by default).
pub const MAX_WINDOW: u32 = 256;

/// Scheduler settings. [`Config::default`] gives the values the node ships with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Our own site (data center) name; peers announcing the same name are "same site".
    pub local_site: String,
    /// Fewest requests in flight one peer may have (its window grows with its bandwidth-delay
    /// product, see [`Config::peer_rate_target`]).
    pub max_in_flight_per_peer: u32,
    /// Of those, how many Background requests may never use (kept for Demand).
    pub demand_reserved_slots: u32,
    /// How long a peer may show no progress (no chunk, no reject) while a request to it is
    /// outstanding before that request times out; four times the peer's RTT is added.
    pub request_timeout: Duration,
    /// Longest a request may stay outstanding at a peer that keeps making progress on others.
    pub request_max_wait: Duration,
    /// A Demand want not delivered within this time fails with [`Event::WantFailed`].
    pub demand_deadline: Duration,
    /// How long a Background want waits for a same-site peer's announced fetch (`Fetching`) before
    /// fetching from outside the site itself.
    pub local_pending_wait: Duration,
    /// How long a Background want waits for the same-site peer assigned its outside fetch
    /// (rendezvous) when that peer has announced nothing.
    pub site_assign_wait: Duration,
    /// How long a Demand want waits for a same-site peer's announced fetch before fetching from
    /// outside the site itself, counted from the moment it became Demand.
    pub demand_local_wait: Duration,
    /// How long a Demand want that another same-site node is assigned (rendezvous) waits for that
    /// node's `Fetching` announcement when nothing is announced yet, counted from the moment it
    /// became Demand. It covers a flash crowd of VMs reading the same block at nearly the same
    /// moment, which would otherwise all cross the WAN before any of them has announced.
    pub demand_assign_wait: Duration,
    /// How many site gateways the caller chooses for [`FetchScheduler::set_site_gateways`] (the
    /// best ranked by [`crate::site::gateway_rank`] among the site's providers it knows, itself
    /// included); 0 turns gateways off. Every node of a site must use the same number. At most
    /// [`crate::site::SITE_GATEWAYS`], the providers one per-site lookup returns.
    pub site_gateways: usize,
    /// A Demand want whose only request is this old is also requested from a better-ranked peer
    /// that obtains the chunk.
    pub hedge_delay: Duration,
    /// How long a peer that refused a chunk with [`RejectKind::Fanout`] is not asked for it again.
    /// Meanwhile the peers it is sending the chunk to announce it (at once: a Demand chunk's Have
    /// update is not batched, see `wire::have_update_delay`) and the want goes to one of them;
    /// this is the fallback for a requester connected to none of them.
    pub relay_retry: Duration,
    /// The image's chunk size in bytes, for the bandwidth-delay window (0: unknown, the window
    /// stays at `max_in_flight_per_peer`).
    pub chunk_bytes: u32,
    /// Bytes per second one peer's window should sustain at its RTT.
    pub peer_rate_target: u64,
    /// Endgame starts when every wanted chunk is in flight and at most this many remain.
    pub endgame_threshold: u32,
    /// In endgame, the most peers one chunk is requested from at once.
    pub endgame_max_requests: u32,
    /// While Demand wants exist, and for `demand_backoff` after the last one ended, each peer takes
    /// at most `background_during_demand` Background requests (new ones; those in flight finish).
    pub demand_backoff: Duration,
    /// See [`Config::demand_backoff`].
    pub background_during_demand: u32,
    /// Cool-down after a peer's first timeout (doubles per consecutive timeout, up to 30 s) and after
    /// a `Busy` reject.
    pub timeout_backoff: Duration,
    /// How often [`Event::NoSource`] is repeated while wanted chunks still have no connected holder.
    pub no_source_retry: Duration,
    /// A want (of either priority) that has had no connected holder for this long fails with
    /// [`Event::WantFailed`]. It should leave the caller time to find and connect providers.
    pub unavailable_deadline: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            local_site: "default".into(),
            max_in_flight_per_peer: 16,
            demand_reserved_slots: 4,
            request_timeout: Duration::from_secs(4),
            request_max_wait: Duration::from_secs(60),
            demand_deadline: Duration::from_secs(30),
            local_pending_wait: Duration::from_secs(4),
            site_assign_wait: Duration::from_secs(10),
            demand_local_wait: Duration::from_millis(500),
            demand_assign_wait: Duration::from_millis(5),
            site_gateways: crate::site::SITE_GATEWAYS,
            hedge_delay: Duration::from_millis(200),
            relay_retry: Duration::from_millis(100),
            chunk_bytes: 0,
            peer_rate_target: 250_000_000,
            endgame_threshold: 16,
            endgame_max_requests: 2,
            demand_backoff: Duration::from_millis(250),
            background_during_demand: 2,
            timeout_backoff: Duration::from_millis(500),
            no_source_retry: Duration::from_secs(5),
            unavailable_deadline: Duration::from_secs(60),
        }
    }
}

/// Errors from scheduler inputs that name something the scheduler cannot know about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// The chunk index is past the end of the image.
    #[error("chunk index {index} is out of range: the image has {count} chunks")]
    IndexOutOfRange {
        /// The index given.
        index: u32,
        /// Chunks in the image.
        count: u32,
    },
    /// The configuration cannot work.
    #[error("invalid fetch configuration: {0}")]
    InvalidConfig(&'static str),
}

/// What a connecting peer told us about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The site the peer announced in its `Hello`.
    pub site: String,
    /// Initial RTT estimate, if the caller has one.
    pub rtt: Option<Duration>,
    /// The peer is an origin (a source server, not a swarm member; `Capabilities::ORIGIN` in its
    /// `Hello`): fetching from it counts as leaving the site for the once-per-site rules.
    pub origin: bool,
}

/// What the caller found when it checked a received chunk against its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkOutcome {
    /// The bytes hash to the chunk's id.
    Valid,
    /// The bytes do not hash to the chunk's id (or have the wrong length).
    Corrupt,
}

/// Whether the caller should commit a received chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The chunk was wanted and is valid: commit it; the want is done.
    Accept,
    /// Not wanted (any more), or corrupt: drop the bytes.
    Discard,
}

/// Why a peer refused a request (mirrors the wire's reject reasons).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectKind {
    /// The peer does not hold the chunk.
    NotFound,
    /// The peer's queue is full; try later or elsewhere.
    Busy,
    /// The peer refuses to serve us at all (it banned us, or is shutting down).
    Refused,
    /// The peer is already sending this chunk to as many peers as it fans one chunk out to: it
    /// is asked for this chunk again only after [`Config::relay_retry`], and meanwhile the want
    /// waits for one of those peers to announce it. Not a sign of load: no cool-down.
    Fanout,
}

/// Something the caller must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action<P> {
    /// Send a `Request` for these chunk indices to `peer`.
    Request {
        /// Whom to ask.
        peer: P,
        /// Priority to put in the request.
        priority: Priority,
        /// Chunk indices, ascending order not guaranteed.
        indices: Vec<u32>,
    },
    /// Send a `Cancel` for these chunk indices to `peer`.
    Cancel {
        /// Whom to tell.
        peer: P,
        /// Chunk indices.
        indices: Vec<u32>,
    },
    /// Tell same-site `peer` that we are fetching these chunks from another site (`Fetching`).
    AnnounceFetching {
        /// A same-site peer.
        peer: P,
        /// Chunk indices.
        indices: Vec<u32>,
    },
    /// Tell site gateway `peer` that we want these chunks, which it is assigned to bring into the
    /// site and nobody in the site holds or fetches (`Need`): it fetches them at `priority`
    /// ([`FetchScheduler::handle_peer_need`]; Demand: a VM here is blocked on them) and announces
    /// that it does, and we wait for its copy.
    Need {
        /// The site gateway assigned the chunks.
        peer: P,
        /// Demand if a VM is blocked on them, else Background.
        priority: Priority,
        /// Chunk indices.
        indices: Vec<u32>,
    },
}

/// Something the caller should know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<P> {
    /// These wanted chunks are held by no connected peer: look for providers.
    NoSource {
        /// Up to 1024 of the indices.
        indices: Vec<u32>,
        /// How many wanted chunks have no source in all.
        total: u32,
    },
    /// A want failed and is no longer wanted.
    WantFailed {
        /// The chunk index.
        index: u32,
        /// Why.
        reason: FailReason,
    },
    /// The peer sent a chunk whose hash did not match; it gets no more requests from this scheduler.
    PeerBanned {
        /// The banned peer.
        peer: P,
    },
}

/// Why a want failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailReason {
    /// A Demand want was not delivered within [`Config::demand_deadline`].
    DemandDeadline,
    /// No connected peer held the chunk for [`Config::unavailable_deadline`].
    Unavailable,
}

/// Counters for status displays and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Chunks wanted (queued or in flight).
    pub wanted: u32,
    /// Of those, Demand.
    pub wanted_demand: u32,
    /// Wanted chunks waiting for a peer.
    pub queued: u32,
    /// Requests in flight (a chunk requested twice in endgame counts twice).
    pub requests_in_flight: u32,
    /// Connected, unbanned peers.
    pub peers: u32,
    /// Peers banned.
    pub banned: u32,
    /// Wanted chunks that no connected peer holds.
    pub without_source: u32,
}

/// Background queue key: explicit rank, then availability, then random tie-break.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct BgKey {
    rank: u32,
    /// Another node of our site is assigned the chunk's outside fetch.
    foreign: bool,
    avail: u32,
    tiebreak: u32,
    index: u32,
}

#[derive(Debug)]
struct Want<P> {
    priority: Priority,
    /// When the want became Demand (the Demand queue is FIFO on this).
    demand_since: Option<Instant>,
    /// When the Demand want fails.
    demand_deadline: Option<Instant>,
    /// When the want fails if it still has no connected holder.
    unavailable_deadline: Option<Instant>,
    /// Peers a request for this chunk is in flight to.
    requested_from: Vec<P>,
    /// The key it is queued under while unassigned Background.
    bg_key: Option<BgKey>,
    tiebreak: u32,
    /// After this instant the want no longer waits for a same-site copy (announced or assigned).
    wan_after: Instant,
    /// While Demand: until this instant it waits for its assignee's announcement
    /// ([`Config::demand_assign_wait`]).
    assign_after: Option<Instant>,
    /// Peers that refused this chunk with [`RejectKind::Fanout`], each not asked for it again
    /// before its instant ([`Config::relay_retry`]), with its relay score
    /// ([`peer::relay_score`]): until then only holders scoring higher are asked.
    relayed: Vec<(P, Instant, u64)>,
    /// The site gateway (its key) told that we need this chunk ([`Action::Need`]), and at what
    /// priority, if any.
    needed_from: Option<(u64, Priority)>,
    /// A live site gateway announced fetching this chunk, until this instant: a Demand want waits
    /// for its copy that long, beyond [`Config::demand_local_wait`] (the gateway's copy is the
    /// site's one; crossing the WAN beside it would only compete with it for the same links).
    gateway_fetch_until: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    priority: Priority,
    deadline: Instant,
    sent: Instant,
    /// The chunk's bytes have started to arrive ([`FetchScheduler::handle_chunk_arriving`]).
    arriving: bool,
}

/// Per-pass batch of what to send to one peer.
#[derive(Debug, Default)]
struct Batch {
    demand: Vec<u32>,
    background: Vec<u32>,
}

/// What one scheduling pass decided, emitted as actions at its end.
#[derive(Debug)]
struct Pass<P> {
    batches: BTreeMap<P, Batch>,
    /// Chunks requested from other sites in this pass (announced to same-site peers).
    announce: Vec<u32>,
}

/// The fetch scheduler for one image. `P` is the caller's peer identifier.
#[derive(Debug)]
pub struct FetchScheduler<P> {
    config: Config,
    chunks: u32,
    rng: ChaCha8Rng,

    /// Boxed: a slot per chunk costs a pointer, not a whole `Want` (10,000 simulated nodes of a
    /// 2,000-chunk image would otherwise hold gigabytes of empty slots).
    wants: Vec<Option<Box<Want<P>>>>,
    wanted: ChunkBitmap,
    wanted_demand: u32,
    /// Background stays throttled until then (see [`Config::demand_backoff`]).
    demand_backoff_until: Option<Instant>,
    demand_queue: BTreeSet<(Instant, u32)>,
    bg_queue: BTreeSet<BgKey>,
    bg_unassigned: ChunkBitmap,
    profile_rank: Option<Vec<u32>>,

    /// Connected, unbanned peers holding each chunk.
    avail: Vec<u32>,
    /// Same-site, non-suspect peers holding each chunk.
    local_avail: Vec<u32>,
    /// Same-site peers with an unexpired `Fetching` announcement for each chunk.
    local_pending: Vec<u32>,
    /// Wanted chunks with `avail == 0`.
    sourceless: ChunkBitmap,
    no_source_due: Instant,

    peers: BTreeMap<P, Peer>,
    banned: BTreeSet<P>,
    in_flight: BTreeMap<(P, u32), InFlight>,
    request_deadlines: BTreeSet<(Instant, P, u32)>,
    demand_deadlines: BTreeSet<(Instant, u32)>,
    unavailable_deadlines: BTreeSet<(Instant, u32)>,
    pending_expiry: BTreeSet<(Instant, P, u32)>,
    /// Peers' cool-down ends, so that queued work is looked at again when one passes.
    cooldowns: BTreeSet<(Instant, P)>,
    /// The peers the Background pass visits, and where each looks ([`wake`]).
    bg: Wakes<P>,
    /// Queued Background chunks that peers may take now and could not at their last look (newly
    /// queued, re-queued, or a rule that kept them from them ended). The next pass wakes, for
    /// each, the peers that hold it and may be asked for it.
    bg_fresh: BTreeSet<u32>,
    /// Queued Demand wants to look at in the next pass: new, re-queued, or with a new holder.
    demand_fresh: BTreeSet<u32>,
    /// Peers that freed a slot since the last pass (they may take queued Demand wants).
    demand_freed: BTreeSet<P>,
    /// Something changed for every queued Demand want (locality, a cool-down ended): look at all.
    demand_rescan: bool,
    /// Our own stable key, if the caller told us who we are (enables the per-site assignment).
    local_key: Option<u64>,
    /// Per chunk, the highest rendezvous score among the other nodes the site's outside fetches
    /// are assigned among (empty without a local key): the live site gateways when
    /// [`Self::via_gateways`], else the connected same-site, non-suspect peers.
    best_other: Vec<u64>,
    /// The stable keys of our site's gateways for this image ([`crate::site`]), ours included
    /// if we are one; empty when the caller named none.
    gateway_keys: Vec<u64>,
    /// Gateways whose connection was lost (they count again once they reconnect).
    gateways_down: BTreeSet<u64>,
    /// The gateways that count (not down, not suspect), ours excluded.
    gateways_live: BTreeSet<u64>,
    /// Outside fetches are assigned among the live gateways (we are one, or one is alive).
    via_gateways: bool,
    /// We are one of the site's gateways.
    local_gateway: bool,
    /// The gateways' ids by key (ours included if we are one).
    gateway_ids: BTreeMap<u64, P>,
    /// Wants to tell their gateway about in the next pass ([`Action::Need`]).
    need_fresh: BTreeSet<u32>,
    /// Look at every want for [`Action::Need`] in the next pass (the gateways changed).
    need_all: bool,
    /// When wants stop waiting for a same-site copy.
    wan_after_deadlines: BTreeSet<(Instant, u32)>,
    /// Demand wants in flight to one peer whose chunk a new peer obtained: hedge candidates.
    hedge_candidates: BTreeSet<u32>,
    /// Hedge candidates whose request is too young yet, by the instant to look again.
    hedge_due: BTreeSet<(Instant, u32)>,
    /// Wants whose fan-out refusal ([`Want::relayed`]) ends, by that instant.
    relay_due: BTreeSet<(Instant, u32)>,
    /// Peers that take no Background requests until that instant ([`Peer::bg_choked_until`]).
    bg_chokes: BTreeSet<(Instant, P)>,

    actions: VecDeque<Action<P>>,
    events: VecDeque<Event<P>>,
}

impl<P: Clone + Ord + Debug + Hash> FetchScheduler<P> {
    /// A scheduler for an image of `chunks` chunks; `seed` drives every random tie-break.
    pub fn new(config: Config, chunks: u32, seed: u64) -> Result<Self, FetchError> {
        if config.max_in_flight_per_peer == 0 {
            return Err(FetchError::InvalidConfig(
                "max_in_flight_per_peer must be at least 1",
            ));
        }
        if config.demand_reserved_slots >= config.max_in_flight_per_peer {
            return Err(FetchError::InvalidConfig(
                "demand_reserved_slots must leave Background at least one slot",
            ));
        }
        if config.site_gateways > crate::site::SITE_GATEWAYS {
            return Err(FetchError::InvalidConfig(
                "site_gateways must be at most site::SITE_GATEWAYS (one lookup's answer)",
            ));
        }
        if config.endgame_max_requests == 0 {
            return Err(FetchError::InvalidConfig(
                "endgame_max_requests must be at least 1",
            ));
        }
        let n = chunks as usize;
        Ok(FetchScheduler {
            config,
            chunks,
            rng: ChaCha8Rng::seed_from_u64(seed),
            wants: (0..n).map(|_| None).collect(),
            wanted: ChunkBitmap::new(chunks),
            wanted_demand: 0,
            demand_queue: BTreeSet::new(),
            bg_queue: BTreeSet::new(),
            bg_unassigned: ChunkBitmap::new(chunks),
            profile_rank: None,
            avail: vec![0; n],
            local_avail: vec![0; n],
            local_pending: vec![0; n],
            sourceless: ChunkBitmap::new(chunks),
            no_source_due: Instant::ZERO,
            peers: BTreeMap::new(),
            banned: BTreeSet::new(),
            in_flight: BTreeMap::new(),
            request_deadlines: BTreeSet::new(),
            demand_deadlines: BTreeSet::new(),
            unavailable_deadlines: BTreeSet::new(),
            pending_expiry: BTreeSet::new(),
            cooldowns: BTreeSet::new(),
            bg: Wakes::new(),
            bg_fresh: BTreeSet::new(),
            demand_fresh: BTreeSet::new(),
            demand_freed: BTreeSet::new(),
            demand_rescan: false,
            local_key: None,
            best_other: Vec::new(),
            gateway_keys: Vec::new(),
            gateways_down: BTreeSet::new(),
            gateways_live: BTreeSet::new(),
            via_gateways: false,
            local_gateway: false,
            gateway_ids: BTreeMap::new(),
            need_fresh: BTreeSet::new(),
            need_all: false,
            wan_after_deadlines: BTreeSet::new(),
            hedge_candidates: BTreeSet::new(),
            hedge_due: BTreeSet::new(),
            relay_due: BTreeSet::new(),
            bg_chokes: BTreeSet::new(),
            demand_backoff_until: None,
            actions: VecDeque::new(),
            events: VecDeque::new(),
        })
    }

    /// Tells the scheduler our own peer id, which enables the per-site assignment of outside
    /// fetches (every node of the site must use the same kind of id for itself and its peers).
    /// Call it before connecting peers; calling it again is ignored.
    pub fn set_local_peer(&mut self, now: Instant, me: &P) {
        if self.local_key.is_some() {
            return;
        }
        self.local_key = Some(stable_key(me));
        self.rebuild_site_scores();
        self.schedule(now);
    }

    /// Tells the scheduler its site's gateways for this image ([`crate::site`]), our own peer id
    /// among them if we are one. From then on each chunk's outside fetch is assigned to the live
    /// gateway with the highest rendezvous score for it, among the gateways alone: a node that is
    /// not a gateway waits for their copies (for at most the assignment waits) instead of taking
    /// the chunk from outside itself, so the site agrees on one assignee however little of it each
    /// node sees. A gateway counts as alive until its connection is lost or it turns suspect (and
    /// again once it reconnects), also before we first connect to it. When we are not a gateway
    /// and none is alive (or the list is empty) the assignment returns to the connected same-site
    /// peers. Takes effect once [`Self::set_local_peer`] was called; a new list replaces the old.
    pub fn set_site_gateways(&mut self, now: Instant, gateways: &[P]) {
        let ids: BTreeMap<u64, P> = gateways
            .iter()
            .map(|g| (stable_key(g), g.clone()))
            .collect();
        let keys: Vec<u64> = ids.keys().copied().collect();
        if keys == self.gateway_keys {
            return;
        }
        self.gateway_keys = keys;
        self.gateway_ids = ids;
        self.need_all = true;
        self.gateways_down
            .retain(|k| self.gateway_keys.binary_search(k).is_ok());
        self.rebuild_site_scores();
        self.rescan_all();
        self.demand_rescan = true;
        self.schedule(now);
    }

    /// Connecting to `peer` failed. A site gateway we are not connected to then counts as down
    /// until it connects (its provider record may outlive it by hours): the chunks it was
    /// assigned move to the next gateway at once instead of after the assignment waits.
    pub fn handle_peer_unreachable(&mut self, now: Instant, peer: &P) {
        if self.peers.contains_key(peer) {
            return;
        }
        let key = stable_key(peer);
        if self.gateway_ids.contains_key(&key) && self.gateways_down.insert(key) {
            self.rebuild_site_scores();
            self.rescan_all();
            self.need_all = true;
            self.schedule(now);
        }
    }

    /// Whether we are one of our site's gateways for this image and the assignment runs over them.
    pub fn is_site_gateway(&self) -> bool {
        self.via_gateways && self.local_gateway
    }

    /// Same-site `peer` is blocked on these chunks ([`Action::Need`]). Those we are the site
    /// gateway assigned to become Demand wants of ours (new wants if we did not want them), so we
    /// fetch them from outside at once and announce it; the rest, and out-of-range indices, are
    /// ignored, as is a peer of another site. The caller leaves out chunks it holds.
    pub fn handle_peer_need(
        &mut self,
        now: Instant,
        peer: &P,
        priority: Priority,
        indices: &[u32],
    ) {
        if !self.is_site_gateway() || !self.peers.get(peer).is_some_and(|p| p.same_site) {
            return;
        }
        for &index in indices {
            if index < self.chunks && self.site_assigned_to_us(index) {
                self.want(now, index, priority);
            }
        }
        self.schedule(now);
    }

    /// The key of the live gateway assigned chunk `index`'s outside fetch (ours if it is us).
    fn assigned_gateway(&self, index: u32) -> Option<u64> {
        let mine = self.local_key?;
        if !self.via_gateways {
            return None;
        }
        if self.site_assigned_to_us(index) {
            return Some(mine);
        }
        self.gateway_keys
            .iter()
            .copied()
            .filter(|&k| k != mine && site_score(k, index) == self.best_other[index as usize])
            .find(|k| !self.gateways_down.contains(k))
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Number of chunks in the image.
    pub fn chunk_count(&self) -> u32 {
        self.chunks
    }

    fn check_index(&self, index: u32) -> Result<(), FetchError> {
        if index < self.chunks {
            Ok(())
        } else {
            Err(FetchError::IndexOutOfRange {
                index,
                count: self.chunks,
            })
        }
    }

    // ----------------------------------------------------------------------------------------------
    // Inputs: wants
    // ----------------------------------------------------------------------------------------------

    /// Wants chunk `index` at `priority`. Wanting a wanted chunk again can only raise its priority
    /// (a Demand want of a chunk already wanted as Demand keeps its original deadline).
    pub fn handle_want(
        &mut self,
        now: Instant,
        index: u32,
        priority: Priority,
    ) -> Result<(), FetchError> {
        self.check_index(index)?;
        self.want(now, index, priority);
        self.schedule(now);
        Ok(())
    }

    /// Wants many chunks at once (one scheduling pass). Fails without change if any index is out of
    /// range.
    pub fn handle_want_many(
        &mut self,
        now: Instant,
        indices: impl IntoIterator<Item = u32> + Clone,
        priority: Priority,
    ) -> Result<(), FetchError> {
        for index in indices.clone() {
            self.check_index(index)?;
        }
        for index in indices {
            self.want(now, index, priority);
        }
        self.schedule(now);
        Ok(())
    }

    fn want(&mut self, now: Instant, index: u32, priority: Priority) {
        let i = index as usize;
        match &mut self.wants[i] {
            None => {
                let tiebreak = self.rng.random::<u32>();
                let wan_after = now
                    + match priority {
                        Priority::Demand => self.config.demand_local_wait,
                        Priority::Background => self.config.site_assign_wait,
                    };
                self.wan_after_deadlines.insert((wan_after, index));
                self.wants[i] = Some(Box::new(Want {
                    priority: Priority::Background,
                    demand_since: None,
                    demand_deadline: None,
                    unavailable_deadline: None,
                    requested_from: Vec::new(),
                    bg_key: None,
                    tiebreak,
                    wan_after,
                    assign_after: None,
                    relayed: Vec::new(),
                    needed_from: None,
                    gateway_fetch_until: None,
                }));
                self.wanted.insert(index);
                if self.avail[i] == 0 {
                    self.mark_sourceless(now, index);
                }
                if priority == Priority::Demand {
                    self.promote(now, index);
                } else {
                    self.need_fresh.insert(index);
                    self.enqueue(index);
                }
            }
            Some(w) => {
                if priority == Priority::Demand && w.priority == Priority::Background {
                    self.promote(now, index);
                }
            }
        }
    }

    /// Turns a Background want (queued, in flight, or just created) into a Demand want.
    fn promote(&mut self, now: Instant, index: u32) {
        let deadline = now + self.config.demand_deadline;
        let Some(w) = self.wants[index as usize].as_mut() else {
            return;
        };
        w.priority = Priority::Demand;
        w.demand_since = Some(now);
        self.need_fresh.insert(index);
        w.demand_deadline = Some(deadline);
        let wan_after = now + self.config.demand_local_wait;
        if wan_after < w.wan_after {
            let old = std::mem::replace(&mut w.wan_after, wan_after);
            self.wan_after_deadlines.insert((wan_after, index));
            forget_wait(&mut self.wan_after_deadlines, w, index, old);
        }
        if let Some(old) = w.assign_after.take() {
            forget_wait(&mut self.wan_after_deadlines, w, index, old);
        }
        if !self.config.demand_assign_wait.is_zero() {
            let assign_after = now + self.config.demand_assign_wait;
            self.wan_after_deadlines.insert((assign_after, index));
            w.assign_after = Some(assign_after);
        }
        self.wanted_demand += 1;
        self.demand_deadlines.insert((deadline, index));
        if let Some(key) = w.bg_key.take() {
            self.bg_queue.remove(&key);
            self.bg_unassigned.remove(index);
        }
        if w.requested_from.is_empty() {
            self.demand_queue.insert((now, index));
            self.demand_fresh.insert(index);
            return;
        }
        // In flight at Background priority: ask again at Demand priority so the serving peer moves it
        // up its queue, and move the slot accounting over.
        let peers = w.requested_from.clone();
        for p in peers {
            if let Some(req) = self.in_flight.get_mut(&(p.clone(), index)) {
                if req.priority == Priority::Background {
                    req.priority = Priority::Demand;
                    if let Some(peer) = self.peers.get_mut(&p) {
                        peer.in_flight_background -= 1;
                        peer.in_flight_demand += 1;
                    }
                    self.actions.push_back(Action::Request {
                        peer: p,
                        priority: Priority::Demand,
                        indices: vec![index],
                    });
                }
            }
        }
    }

    /// Stops wanting chunk `index` (cancelling its requests). Unknown or unwanted indices are ignored.
    pub fn handle_unwant(&mut self, now: Instant, index: u32) {
        self.note_demand(now);
        if index < self.chunks {
            self.drop_want(index, None);
            self.schedule(now);
        }
    }

    /// [`Self::handle_unwant`] for many chunks, rescheduling once.
    pub fn handle_unwant_many(&mut self, now: Instant, indices: impl IntoIterator<Item = u32>) {
        self.note_demand(now);
        for index in indices {
            if index < self.chunks {
                self.drop_want(index, None);
            }
        }
        self.schedule(now);
    }

    /// We obtained chunk `index` some other way (local store, another image sharing the chunk, a
    /// copy that arrived for another index with the same id): the want is done and its requests are
    /// cancelled.
    pub fn handle_local_have(&mut self, now: Instant, index: u32) {
        self.handle_unwant(now, index);
    }

    /// Sets the explicit Background order (a boot profile): `order[0]` first. Chunks not listed come
    /// after all listed ones, rarest first. Indices out of range are ignored.
    pub fn set_priority_order(&mut self, now: Instant, order: &[u32]) {
        let mut rank = vec![u32::MAX; self.chunks as usize];
        for (pos, &index) in order.iter().enumerate() {
            if let Some(r) = rank.get_mut(index as usize) {
                if *r == u32::MAX {
                    *r = u32::try_from(pos).unwrap_or(u32::MAX - 1);
                }
            }
        }
        self.profile_rank = Some(rank);
        let queued: Vec<u32> = self.bg_queue.iter().map(|k| k.index).collect();
        for index in queued {
            self.rekey(index);
        }
        self.rescan_all();
        self.schedule(now);
    }

    // ----------------------------------------------------------------------------------------------
    // Inputs: peers
    // ----------------------------------------------------------------------------------------------

    /// A peer connected (or reconnected). A banned peer stays banned and is ignored.
    pub fn handle_peer_connected(&mut self, now: Instant, peer: P, info: PeerInfo) {
        if self.banned.contains(&peer) {
            return;
        }
        if self.peers.contains_key(&peer) {
            self.remove_peer(now, &peer);
        }
        let same_site = info.site == self.config.local_site && !info.origin;
        let tiebreak = self.rng.random::<u64>();
        let mut p = Peer::new(
            same_site,
            info.rtt,
            self.chunks,
            tiebreak,
            stable_key(&peer),
        );
        p.limit = self.window(info.rtt);
        p.last_progress = now;
        let key = p.key;
        self.bg.wake_all(&peer);
        self.peers.insert(peer, p);
        if self.gateway_ids.contains_key(&key) {
            // A gateway (re)connected: Demand wants it is assigned can be told to it now.
            self.need_all = true;
        }
        if self.gateways_down.remove(&key) {
            self.rebuild_site_scores();
        } else if same_site {
            self.site_member_added(key);
        }
        self.schedule(now);
    }

    /// A peer disconnected: its requests are re-queued and its chunks no longer count as available.
    pub fn handle_peer_disconnected(&mut self, now: Instant, peer: &P) {
        self.remove_peer(now, peer);
        self.schedule(now);
    }

    /// A new RTT estimate for a peer (from ping).
    pub fn handle_rtt(&mut self, now: Instant, peer: &P, rtt: Duration) {
        let limit = self.window(Some(rtt));
        if let Some(p) = self.peers.get_mut(peer) {
            p.rtt = Some(rtt);
            p.limit = limit;
            self.demand_freed.insert(peer.clone());
            self.bg.wake_all(peer);
            self.schedule(now);
        }
    }

    /// A peer's full Have set (replaces what we knew). It must range over this image's chunk count;
    /// the caller validates the wire form with [`ChunkBitmap::from_wire`].
    pub fn handle_peer_have(&mut self, now: Instant, peer: &P, have: &ChunkBitmap) {
        let Some(p) = self.peers.get(peer) else {
            return;
        };
        if have.len() != self.chunks {
            return;
        }
        let old = p.have.clone();
        for index in old.iter().filter(|&i| !have.contains(i)) {
            self.peer_lost_chunk(now, peer, index);
        }
        for index in have.iter().filter(|&i| !old.contains(i)) {
            self.peer_gained_chunk(now, peer, index);
        }
        self.schedule(now);
    }

    /// A peer now holds these chunks too. Out-of-range indices are ignored.
    pub fn handle_peer_have_update(&mut self, now: Instant, peer: &P, indices: &[u32]) {
        if !self.peers.contains_key(peer) {
            return;
        }
        for &index in indices {
            if index < self.chunks {
                self.peer_gained_chunk(now, peer, index);
            }
        }
        self.schedule(now);
    }

    /// A same-site peer is fetching these chunks from another site. Announcements from peers of
    /// other sites are ignored (they do not save us a WAN crossing).
    pub fn handle_peer_fetching(&mut self, now: Instant, peer: &P, indices: &[u32]) {
        let until = now + self.config.local_pending_wait;
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        if !p.same_site {
            return;
        }
        let gateway = self.via_gateways
            && self.gateway_ids.contains_key(&p.key)
            && !self.gateways_down.contains(&p.key);
        for &index in indices {
            if index >= self.chunks || p.have.contains(index) {
                continue;
            }
            if gateway && let Some(w) = self.wants[index as usize].as_mut() {
                // The wait ends at `until`: the want is looked at again then.
                self.wan_after_deadlines.insert((until, index));
                if let Some(old) = w.gateway_fetch_until.replace(until) {
                    forget_wait(&mut self.wan_after_deadlines, w, index, old);
                }
            }
            match p.pending.insert(index, until) {
                Some(old) => {
                    self.pending_expiry.remove(&(old, peer.clone(), index));
                }
                None => self.local_pending[index as usize] += 1,
            }
            self.pending_expiry.insert((until, peer.clone(), index));
        }
        self.schedule(now);
    }

    /// The bytes of chunk `index` have been arriving from `peer` for [`ARRIVING_REPORT_AFTER`]
    /// and the chunk is not complete yet. A `Cancel` can no longer stop them, so a second copy
    /// would only add load: the request is not hedged any more, and if `peer` is outside the site
    /// (or an origin) it no longer times out for silence either, only at
    /// [`Config::request_max_wait`]. A same-site request still times out: a second copy inside
    /// the site is cheap, and a faster peer may serve it.
    pub fn handle_chunk_arriving(&mut self, _now: Instant, peer: &P, index: u32) {
        if let Some(req) = self.in_flight.get_mut(&(peer.clone(), index)) {
            req.arriving = true;
        }
    }

    /// A chunk arrived from `peer` and the caller checked its hash. Returns whether to commit it.
    pub fn handle_chunk(
        &mut self,
        now: Instant,
        peer: &P,
        index: u32,
        outcome: ChunkOutcome,
    ) -> Delivery {
        if index >= self.chunks {
            return Delivery::Discard;
        }
        // The Demand want this chunk may end keeps Background throttled for a while after.
        self.note_demand(now);
        if outcome == ChunkOutcome::Corrupt {
            self.ban(now, peer);
            self.schedule(now);
            return Delivery::Discard;
        }
        let solicited = self.finish_request(peer, index).is_some();
        if let Some(p) = self.peers.get_mut(peer) {
            p.last_progress = now;
        }
        if solicited {
            if let Some(p) = self.peers.get_mut(peer) {
                p.consecutive_timeouts = 0;
            }
            self.end_cooldown(peer);
            self.set_suspect(peer, false);
        }
        let delivery = if self.wanted.contains(index) {
            self.drop_want(index, Some(peer));
            Delivery::Accept
        } else {
            Delivery::Discard
        };
        // A peer that sent the chunk holds it.
        if self.peers.contains_key(peer) {
            self.peer_gained_chunk(now, peer, index);
        }
        self.schedule(now);
        delivery
    }

    /// A peer rejected our request for chunk `index`.
    pub fn handle_reject(&mut self, now: Instant, peer: &P, index: u32, kind: RejectKind) {
        if index >= self.chunks {
            return;
        }
        let finished = self.finish_request(peer, index);
        let was_in_flight = finished.is_some();
        if kind != RejectKind::Refused {
            if let Some(p) = self.peers.get_mut(peer) {
                p.last_progress = now;
            }
        }
        match kind {
            RejectKind::NotFound => self.peer_lost_chunk(now, peer, index),
            RejectKind::Busy => self.cool_down(peer, now + self.config.timeout_backoff),
            RejectKind::Fanout => {
                if was_in_flight {
                    let holder = self
                        .peers
                        .get(peer)
                        .map_or_else(|| stable_key(peer), |p| p.key);
                    let score = relay_score(self.local_key.unwrap_or(0), holder, index);
                    let until = now + self.config.relay_retry;
                    if let Some(w) = self.wants[index as usize].as_mut() {
                        w.relayed.retain(|(p, _, _)| p != peer);
                        w.relayed.push((peer.clone(), until, score));
                        self.relay_due.insert((until, index));
                    }
                    // A Background refusal chokes the peer's Background for `relay_retry`: asking
                    // it for the next chunk at once would be refused too when a whole crowd pulls
                    // the same chunks in the same order (a boot profile), one refusal per chunk.
                    if finished.is_some_and(|r| r.priority == Priority::Background) {
                        if let Some(p) = self.peers.get_mut(peer) {
                            if p.bg_choked_until < until {
                                self.bg_chokes.remove(&(p.bg_choked_until, peer.clone()));
                                p.bg_choked_until = until;
                                self.bg_chokes.insert((until, peer.clone()));
                                self.bg.park(peer);
                            }
                        }
                    }
                }
            }
            RejectKind::Refused => {
                self.cool_down(peer, Instant::MAX);
                self.set_suspect(peer, true);
                // Everything else in flight there will not come either.
                let indices: Vec<u32> = self
                    .in_flight
                    .range((peer.clone(), 0)..=(peer.clone(), u32::MAX))
                    .map(|((_, i), _)| *i)
                    .collect();
                for i in indices {
                    self.finish_request(peer, i);
                    self.requeue(i);
                }
            }
        }
        if was_in_flight {
            self.requeue(index);
        }
        self.schedule(now);
    }

    /// Processes every deadline that has passed by `now`. Call it at [`Self::poll_timeout`].
    pub fn handle_timeout(&mut self, now: Instant) {
        // Request timeouts.
        while let Some((deadline, peer, index)) = self.request_deadlines.first().cloned() {
            if deadline > now {
                break;
            }
            // A peer that made progress since the request was sent is serving, only busy: the
            // request waits on, until the peer stalls or `request_max_wait` passes.
            if let (Some(p), Some(req)) = (
                self.peers.get(&peer),
                self.in_flight.get(&(peer.clone(), index)).copied(),
            ) {
                let base = self.request_base_timeout(p);
                let hard = req.sent + self.config.request_max_wait.max(base);
                // A chunk arriving from outside the site (or from an origin) is being served,
                // however slowly, across the link every copy must cross: only the hard limit (or
                // the connection ending) stops it. So is an arriving Background chunk: nobody
                // waits for it, and a gateway sharing its uplink among a site's prefetching hosts
                // is slow, not gone (timing it out would turn it suspect, and send its whole
                // share across the WAN). Inside the site a second copy of a chunk a VM waits for
                // is cheap, and a slow peer is better left for a faster one.
                let alive_until =
                    if req.arriving && (!p.same_site || req.priority == Priority::Background) {
                        hard
                    } else {
                        p.last_progress + base
                    };
                let next = alive_until.min(hard);
                if next > now {
                    self.request_deadlines
                        .remove(&(deadline, peer.clone(), index));
                    self.request_deadlines.insert((next, peer.clone(), index));
                    if let Some(r) = self.in_flight.get_mut(&(peer.clone(), index)) {
                        r.deadline = next;
                    }
                    continue;
                }
            }
            self.finish_request(&peer, index);
            self.actions.push_back(Action::Cancel {
                peer: peer.clone(),
                indices: vec![index],
            });
            if let Some(p) = self.peers.get_mut(&peer) {
                p.consecutive_timeouts += 1;
                let factor = 1u32 << (p.consecutive_timeouts - 1).min(16);
                let backoff = self
                    .config
                    .timeout_backoff
                    .saturating_mul(factor)
                    .min(MAX_COOLDOWN);
                self.cool_down(&peer, now + backoff);
            }
            self.set_suspect(&peer, true);
            self.requeue(index);
        }
        // Demand deadlines.
        while let Some(&(deadline, index)) = self.demand_deadlines.first() {
            if deadline > now {
                break;
            }
            self.drop_want(index, None);
            self.events.push_back(Event::WantFailed {
                index,
                reason: FailReason::DemandDeadline,
            });
        }
        while let Some(&(deadline, index)) = self.unavailable_deadlines.first() {
            if deadline > now {
                break;
            }
            self.drop_want(index, None);
            self.events.push_back(Event::WantFailed {
                index,
                reason: FailReason::Unavailable,
            });
        }
        self.schedule(now);
    }

    // ----------------------------------------------------------------------------------------------
    // Outputs
    // ----------------------------------------------------------------------------------------------

    /// The next thing to send.
    pub fn poll_action(&mut self) -> Option<Action<P>> {
        self.actions.pop_front()
    }

    /// The next thing to report.
    pub fn poll_event(&mut self) -> Option<Event<P>> {
        self.events.pop_front()
    }

    /// When [`Self::handle_timeout`] must next be called, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut next = [
            self.request_deadlines.first().map(|d| d.0),
            self.demand_deadlines.first().map(|d| d.0),
            self.unavailable_deadlines.first().map(|d| d.0),
            self.pending_expiry.first().map(|d| d.0),
            self.wan_after_deadlines.first().map(|d| d.0),
            self.hedge_due.first().map(|d| d.0),
            self.relay_due.first().map(|d| d.0),
            (self.sourceless.count() > 0).then_some(self.no_source_due),
        ]
        .into_iter()
        .flatten()
        .min();
        if !self.demand_queue.is_empty() || !self.bg_queue.is_empty() {
            // A peer coming out of cool-down may take queued work.
            let cooldown = self.cooldowns.first().map(|c| c.0);
            next = next.into_iter().chain(cooldown).min();
        }
        if !self.bg_queue.is_empty() {
            next = next
                .into_iter()
                .chain(self.bg_chokes.first().map(|c| c.0))
                .min();
        }
        if !self.bg_queue.is_empty() && self.wanted_demand == 0 {
            // Background takes its full windows again when the back-off ends.
            next = next.into_iter().chain(self.demand_backoff_until).min();
        }
        next
    }

    /// Whether chunk `index` is wanted.
    pub fn is_wanted(&self, index: u32) -> bool {
        self.wanted.contains(index)
    }

    /// The priority chunk `index` is wanted at, if it is.
    pub fn want_priority(&self, index: u32) -> Option<Priority> {
        self.wants
            .get(index as usize)
            .and_then(|w| w.as_ref().map(|w| w.priority))
    }

    /// Peers a request for chunk `index` is in flight to.
    pub fn requested_from(&self, index: u32) -> &[P] {
        self.wants
            .get(index as usize)
            .and_then(|w| w.as_ref())
            .map_or(&[], |w| &w.requested_from)
    }

    /// Connected peers known to hold chunk `index` (from their Have sets; 0 if out of range).
    pub fn holders(&self, index: u32) -> u32 {
        self.avail.get(index as usize).copied().unwrap_or(0)
    }

    /// Chunks held by at least one connected peer, as far as their Have sets tell.
    pub fn chunks_with_holders(&self) -> u32 {
        self.avail.iter().filter(|&&a| a > 0).count() as u32
    }

    /// Requests in flight to `peer`.
    pub fn peer_in_flight(&self, peer: &P) -> u32 {
        self.peers.get(peer).map_or(0, Peer::in_flight)
    }

    /// Whether `peer` is banned.
    pub fn is_banned(&self, peer: &P) -> bool {
        self.banned.contains(peer)
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        Stats {
            wanted: self.wanted.count(),
            wanted_demand: self.wanted_demand,
            queued: (self.demand_queue.len() + self.bg_queue.len()) as u32,
            requests_in_flight: self.in_flight.len() as u32,
            peers: self.peers.len() as u32,
            banned: self.banned.len() as u32,
            without_source: self.sourceless.count(),
        }
    }

    // ----------------------------------------------------------------------------------------------
    // Bookkeeping
    // ----------------------------------------------------------------------------------------------

    fn bg_key(&self, index: u32, tiebreak: u32) -> BgKey {
        BgKey {
            rank: self
                .profile_rank
                .as_ref()
                .map_or(u32::MAX, |r| r[index as usize]),
            foreign: !self.site_assigned_to_us(index),
            avail: self.avail[index as usize],
            tiebreak,
            index,
        }
    }

    /// Puts an unassigned want into the queue of its priority.
    fn enqueue(&mut self, index: u32) {
        let Some(w) = self.wants[index as usize].as_ref() else {
            return;
        };
        debug_assert!(w.requested_from.is_empty());
        match w.priority {
            Priority::Demand => {
                let since = w.demand_since.unwrap_or(Instant::ZERO);
                self.demand_queue.insert((since, index));
                self.demand_fresh.insert(index);
            }
            Priority::Background => {
                let key = self.bg_key(index, w.tiebreak);
                self.bg_queue.insert(key);
                self.bg_unassigned.insert(index);
                if let Some(w) = self.wants[index as usize].as_mut() {
                    w.bg_key = Some(key);
                }
                self.bg_fresh.insert(index);
            }
        }
    }

    /// Re-queues a want whose last request ended without the chunk.
    fn requeue(&mut self, index: u32) {
        if let Some(w) = &self.wants[index as usize] {
            if w.requested_from.is_empty() && w.bg_key.is_none() {
                let demand_queued = w
                    .demand_since
                    .is_some_and(|s| self.demand_queue.contains(&(s, index)));
                if !demand_queued {
                    self.enqueue(index);
                }
            }
        }
    }

    /// Refreshes a queued Background want's key after its availability or rank changed.
    fn rekey(&mut self, index: u32) {
        let Some(w) = self.wants[index as usize].as_ref() else {
            return;
        };
        let Some(old) = w.bg_key else {
            return;
        };
        let key = self.bg_key(index, w.tiebreak);
        if key != old {
            self.bg_queue.remove(&old);
            self.bg_queue.insert(key);
            if let Some(w) = self.wants[index as usize].as_mut() {
                w.bg_key = Some(key);
            }
        }
    }

    fn remove_from_queues(&mut self, index: u32) {
        if let Some(w) = self.wants[index as usize].as_mut() {
            if let Some(key) = w.bg_key.take() {
                self.bg_queue.remove(&key);
                self.bg_unassigned.remove(index);
            }
            if let Some(since) = w.demand_since {
                self.demand_queue.remove(&(since, index));
            }
        }
    }

    /// Ends the want for `index`, cancelling requests to every peer but `delivered_by`.
    fn drop_want(&mut self, index: u32, delivered_by: Option<&P>) {
        self.remove_from_queues(index);
        let Some(w) = self.wants[index as usize].take() else {
            return;
        };
        self.wanted.remove(index);
        self.sourceless.remove(index);
        if let Some(deadline) = w.demand_deadline {
            self.demand_deadlines.remove(&(deadline, index));
        }
        if let Some(deadline) = w.unavailable_deadline {
            self.unavailable_deadlines.remove(&(deadline, index));
        }
        self.wan_after_deadlines.remove(&(w.wan_after, index));
        for t in [w.assign_after, w.gateway_fetch_until]
            .into_iter()
            .flatten()
        {
            self.wan_after_deadlines.remove(&(t, index));
        }
        self.hedge_candidates.remove(&index);
        for (_, until, _) in &w.relayed {
            self.relay_due.remove(&(*until, index));
        }
        if w.priority == Priority::Demand {
            self.wanted_demand -= 1;
        }
        for p in w.requested_from {
            if let Some(req) = self.in_flight.remove(&(p.clone(), index)) {
                self.request_deadlines
                    .remove(&(req.deadline, p.clone(), index));
                if let Some(peer) = self.peers.get_mut(&p) {
                    match req.priority {
                        Priority::Demand => peer.in_flight_demand -= 1,
                        Priority::Background => peer.in_flight_background -= 1,
                    }
                    self.demand_freed.insert(p.clone());
                }
            }
            if delivered_by != Some(&p) {
                self.actions.push_back(Action::Cancel {
                    peer: p,
                    indices: vec![index],
                });
            }
        }
    }

    /// Removes the request for `index` in flight to `peer`, if any; the want stays as it is.
    fn finish_request(&mut self, peer: &P, index: u32) -> Option<InFlight> {
        let req = self.in_flight.remove(&(peer.clone(), index))?;
        self.request_deadlines
            .remove(&(req.deadline, peer.clone(), index));
        if let Some(p) = self.peers.get_mut(peer) {
            match req.priority {
                Priority::Demand => p.in_flight_demand -= 1,
                Priority::Background => p.in_flight_background -= 1,
            }
            self.demand_freed.insert(peer.clone());
        }
        if let Some(w) = self.wants[index as usize].as_mut() {
            w.requested_from.retain(|q| q != peer);
        }
        Some(req)
    }

    fn mark_sourceless(&mut self, now: Instant, index: u32) {
        if self.sourceless.insert(index) {
            // Report new sourceless chunks at the end of this pass.
            self.no_source_due = self.no_source_due.min(now);
            let deadline = now + self.config.unavailable_deadline;
            if let Some(w) = self.wants[index as usize].as_mut() {
                w.unavailable_deadline = Some(deadline);
                self.unavailable_deadlines.insert((deadline, index));
            }
        }
    }

    fn clear_sourceless(&mut self, index: u32) {
        if self.sourceless.remove(index) {
            if let Some(w) = self.wants[index as usize].as_mut() {
                if let Some(deadline) = w.unavailable_deadline.take() {
                    self.unavailable_deadlines.remove(&(deadline, index));
                }
            }
        }
    }

    fn peer_gained_chunk(&mut self, now: Instant, peer: &P, index: u32) {
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        if !p.have.insert(index) {
            return;
        }
        // Only a chunk queued at Background is new Background work for this peer (in a crowd,
        // most announcements are of chunks we hold or fetch already).
        if self.wants[index as usize]
            .as_ref()
            .is_some_and(|w| w.bg_key.is_some())
        {
            self.bg.wake(peer, index);
        }
        let local = p.counts_as_local();
        let pending = p.pending.remove(&index);
        let i = index as usize;
        self.avail[i] += 1;
        if local {
            self.local_avail[i] += 1;
        }
        if let Some(until) = pending {
            self.pending_expiry.remove(&(until, peer.clone(), index));
            self.pending_gone(index);
        }
        self.clear_sourceless(index);
        self.rekey(index);
        if let Some(w) = &self.wants[i] {
            if w.priority == Priority::Demand {
                if w.requested_from.is_empty() {
                    // Only a holder the want may ask now changes anything for it: in a flash
                    // crowd most announcements come from peers below the relay bar, outside the
                    // site while it waits for a same-site copy, or without a free slot, and
                    // looking for a source for each would cost a scan of all peers. Whatever
                    // later makes such a holder usable looks at the want again itself (its wait
                    // ending, the peer freeing a slot or ending its cool-down, the refusal ending).
                    let usable = self.peers.get(peer).is_some_and(|p| {
                        p.has_room(now, self.slot_limit(now, p, Priority::Demand))
                            && self.locality_allows(now, p, index)
                    }) && !self.relay_excluded(now, peer, index);
                    if usable {
                        self.demand_fresh.insert(index);
                    }
                } else if w.requested_from.len() == 1 {
                    self.hedge_candidates.insert(index);
                }
            }
        }
    }

    fn peer_lost_chunk(&mut self, now: Instant, peer: &P, index: u32) {
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        if !p.have.remove(index) {
            return;
        }
        let local = p.counts_as_local();
        self.chunk_unavailable(now, index, local);
    }

    /// One holder of `index` is gone; `local` if it counted as held inside our site.
    fn chunk_unavailable(&mut self, now: Instant, index: u32, local: bool) {
        let i = index as usize;
        self.avail[i] -= 1;
        if local {
            self.local_lost(index);
        }
        if self.avail[i] == 0 && self.wanted.contains(index) {
            self.mark_sourceless(now, index);
        }
        self.rekey(index);
    }

    fn local_lost(&mut self, index: u32) {
        let i = index as usize;
        self.local_avail[i] -= 1;
        if self.local_avail[i] == 0 {
            // Other sites' peers may now be asked for it.
            self.locality_changed(index);
        }
    }

    /// Marks a peer suspect (it timed out or refused us) or clears that mark (it delivered).
    fn set_suspect(&mut self, peer: &P, suspect: bool) {
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        if p.suspect == suspect {
            return;
        }
        let was_local = p.counts_as_local();
        p.suspect = suspect;
        let is_local = p.counts_as_local();
        if was_local == is_local {
            return;
        }
        let have: Vec<u32> = p.have.iter().collect();
        for index in have {
            if is_local {
                self.local_avail[index as usize] += 1;
            } else {
                self.local_lost(index);
            }
        }
        // The peer joins or leaves the site members the outside fetches are assigned among.
        self.rebuild_site_scores();
        self.rescan_all();
    }

    fn pending_gone(&mut self, index: u32) {
        let i = index as usize;
        self.local_pending[i] -= 1;
        if self.local_pending[i] == 0 {
            self.locality_changed(index);
        }
    }

    fn remove_peer(&mut self, now: Instant, peer: &P) {
        let Some(p) = self.peers.get(peer) else {
            return;
        };
        let have: Vec<u32> = p.have.iter().collect();
        let pending: Vec<(u32, Instant)> = p.pending.iter().map(|(&i, &t)| (i, t)).collect();
        let local = p.counts_as_local();
        let cooldown = p.cooldown_until;
        let key = p.key;
        let requests: Vec<u32> = self
            .in_flight
            .range((peer.clone(), 0)..=(peer.clone(), u32::MAX))
            .map(|((_, i), _)| *i)
            .collect();
        for index in requests {
            self.finish_request(peer, index);
            self.requeue(index);
        }
        for (index, until) in pending {
            self.pending_expiry.remove(&(until, peer.clone(), index));
            self.pending_gone(index);
        }
        self.cooldowns.remove(&(cooldown, peer.clone()));
        self.peers.remove(peer);
        self.bg.remove(peer);
        for index in have {
            self.chunk_unavailable(now, index, local);
        }
        let gateway_lost =
            self.gateway_keys.binary_search(&key).is_ok() && self.gateways_down.insert(key);
        if local || gateway_lost {
            self.rebuild_site_scores();
        }
        self.rescan_all();
    }

    /// Something changed that may give queued work to peers that had none they could take, for
    /// any want: every queued Demand want is looked at again, and every peer may pick Background.
    fn rescan_all(&mut self) {
        let chokes = &self.bg_chokes;
        let peers = &self.peers;
        self.bg.wake_everyone(peers.keys(), |id| {
            peers
                .get(id)
                .is_some_and(|p| chokes.contains(&(p.bg_choked_until, id.clone())))
        });
        self.demand_rescan = true;
    }

    /// The locality rules may now allow other peers for chunk `index` alone (a wait ended, the
    /// site's last holder or announcement of it went): that want is looked at again, not every
    /// queued one (in a flash crowd these happen per chunk, thousands of times a second).
    fn locality_changed(&mut self, index: u32) {
        match self.wants[index as usize].as_ref().map(|w| w.priority) {
            Some(Priority::Demand) => {
                self.demand_fresh.insert(index);
            }
            Some(Priority::Background) => {
                self.bg_fresh.insert(index);
            }
            None => {}
        }
    }

    /// Chunk `index`, queued at Background, may be asked of `peer` again (its refusal ended).
    fn wake_background(&mut self, peer: &P, index: u32) {
        if self.peers.contains_key(peer) {
            self.bg.wake(peer, index);
        }
    }

    /// Wakes, for each chunk in [`Self::bg_fresh`], the peers that hold it and may be asked for it
    /// now, each to look at those chunks alone. A peer that was exhausted found nothing it could
    /// take, and only a chunk that changed can change that: so it need not walk the whole queue.
    /// (Waking every peer for every re-queued chunk made each pass walk the queue once per peer;
    /// with Background fan-out refusals, which re-queue a chunk at every refusal, that was most
    /// of a crowd's CPU.)
    fn wake_for_fresh(&mut self, now: Instant) {
        let fresh = std::mem::take(&mut self.bg_fresh);
        for index in fresh {
            if self.wants[index as usize]
                .as_ref()
                .is_none_or(|w| w.bg_key.is_none())
            {
                continue;
            }
            for (id, p) in &self.peers {
                if p.have.contains(index)
                    && self.locality_allows(now, p, index)
                    && !self.relay_excluded(now, id, index)
                {
                    self.bg.wake(id, index);
                }
            }
        }
    }

    /// Gives `peer` no new requests before `until` (extending any cool-down it already has).
    fn cool_down(&mut self, peer: &P, until: Instant) {
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        if until <= p.cooldown_until {
            return;
        }
        self.cooldowns.remove(&(p.cooldown_until, peer.clone()));
        p.cooldown_until = until;
        if until != Instant::MAX {
            self.cooldowns.insert((until, peer.clone()));
        }
    }

    /// Ends `peer`'s cool-down (it delivered), unless it refused us for good.
    fn end_cooldown(&mut self, peer: &P) {
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        if p.cooldown_until == Instant::ZERO || p.cooldown_until == Instant::MAX {
            return;
        }
        self.cooldowns.remove(&(p.cooldown_until, peer.clone()));
        p.cooldown_until = Instant::ZERO;
        self.bg.wake_all(peer);
        self.demand_rescan = true;
    }

    /// Requests in flight a peer at `rtt` may have: its bandwidth-delay product in chunks.
    fn window(&self, rtt: Option<Duration>) -> u32 {
        let base = self.config.max_in_flight_per_peer;
        let (Some(rtt), chunk) = (rtt, self.config.chunk_bytes) else {
            return base;
        };
        if chunk == 0 {
            return base;
        }
        let bdp = (self.config.peer_rate_target as f64 * rtt.as_secs_f64() / f64::from(chunk))
            .ceil()
            .min(f64::from(MAX_WINDOW)) as u32;
        bdp.max(base).min(MAX_WINDOW.max(base))
    }

    /// How long a peer may show no progress before its oldest request times out.
    fn request_base_timeout(&self, p: &Peer) -> Duration {
        self.config.request_timeout + p.rtt.unwrap_or(Duration::ZERO).saturating_mul(4)
    }

    /// Emits [`Action::Need`] for wants assigned to a connected gateway that nobody in the site
    /// holds or announced, each once per gateway and priority (a Demand `Need` covers Background).
    fn ask_gateways(&mut self, now: Instant) {
        let fresh = std::mem::take(&mut self.need_fresh);
        let all = std::mem::take(&mut self.need_all);
        if !self.via_gateways || self.local_key.is_none() {
            return;
        }
        let indices: Vec<u32> = if all {
            self.wanted.iter().collect()
        } else {
            fresh.into_iter().collect()
        };
        let mut asks: BTreeMap<(P, Priority), Vec<u32>> = BTreeMap::new();
        for index in indices {
            let i = index as usize;
            if self.local_avail[i] > 0
                || self.local_pending[i] > 0
                || self.site_assigned_to_us(index)
            {
                continue;
            }
            let Some(g) = self.assigned_gateway(index) else {
                continue;
            };
            let Some(w) = self.wants[i].as_mut() else {
                continue;
            };
            let priority = w.priority;
            if w.needed_from == Some((g, priority)) || w.needed_from == Some((g, Priority::Demand))
            {
                continue;
            }
            let Some(id) = self.gateway_ids.get(&g) else {
                continue;
            };
            if !self
                .peers
                .get(id)
                .is_some_and(|p| p.same_site && !p.suspect)
            {
                continue;
            }
            w.needed_from = Some((g, priority));
            if priority == Priority::Background {
                asks.entry((id.clone(), priority)).or_default().push(index);
                continue;
            }
            // The gateway may have had no source for it either until now (a flash crowd at
            // start-up): the want waits for its announcement from now on, as from a promotion.
            let until = now
                + self
                    .config
                    .demand_local_wait
                    .max(self.config.demand_assign_wait);
            // One deadline entry serves both waits (they end at the same instant).
            self.wan_after_deadlines.insert((until, index));
            if w.wan_after < until {
                let old = std::mem::replace(&mut w.wan_after, until);
                forget_wait(&mut self.wan_after_deadlines, w, index, old);
            }
            if let Some(old) = w.assign_after.replace(until) {
                forget_wait(&mut self.wan_after_deadlines, w, index, old);
            }
            asks.entry((id.clone(), priority)).or_default().push(index);
        }
        for ((peer, priority), indices) in asks {
            self.actions.push_back(Action::Need {
                peer,
                priority,
                indices,
            });
        }
    }

    /// Whether we are the node of our site assigned chunk `index`'s outside fetch.
    fn site_assigned_to_us(&self, index: u32) -> bool {
        match self.local_key {
            None => true,
            Some(key) => {
                (!self.via_gateways || self.local_gateway)
                    && site_score(key, index) > self.best_other[index as usize]
            }
        }
    }

    /// A same-site peer with `key` now counts among the site's members: raise the best scores, and
    /// move the chunks it takes over from us behind our own in the Background queue.
    fn site_member_added(&mut self, key: u64) {
        let Some(mine) = self.local_key else {
            return;
        };
        if self.via_gateways {
            // Only the gateways count; a reconnecting one is handled by the caller.
            return;
        }
        for index in 0..self.chunks {
            let i = index as usize;
            let score = site_score(key, index);
            if score > self.best_other[i] {
                let was_ours = site_score(mine, index) > self.best_other[i];
                self.best_other[i] = score;
                if was_ours && score > site_score(mine, index) {
                    self.rekey(index);
                }
            }
        }
    }

    /// Recomputes the best same-site scores from scratch (after a member left or turned suspect).
    fn rebuild_site_scores(&mut self) {
        let Some(mine) = self.local_key else {
            return;
        };
        self.local_gateway = self.gateway_keys.binary_search(&mine).is_ok();
        let suspect: BTreeSet<u64> = if self.gateway_keys.is_empty() {
            BTreeSet::new()
        } else {
            self.peers
                .values()
                .filter(|p| p.suspect)
                .map(|p| p.key)
                .collect()
        };
        let live: Vec<u64> = self
            .gateway_keys
            .iter()
            .copied()
            .filter(|k| *k != mine && !self.gateways_down.contains(k) && !suspect.contains(k))
            .collect();
        self.via_gateways = self.local_gateway || !live.is_empty();
        if self.gateways_live.iter().ne(live.iter()) {
            // Assignments moved: wants told to a gateway that no longer counts ask the new one.
            self.need_all = true;
        }
        self.gateways_live = live.iter().copied().collect();
        let keys: Vec<u64> = if self.via_gateways {
            live
        } else {
            self.peers
                .values()
                .filter(|p| p.counts_as_local())
                .map(|p| p.key)
                .collect()
        };
        self.best_other = (0..self.chunks)
            .map(|index| {
                keys.iter()
                    .map(|&k| site_score(k, index))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let queued: Vec<u32> = self.bg_queue.iter().map(|k| k.index).collect();
        for index in queued {
            self.rekey(index);
        }
    }

    fn ban(&mut self, now: Instant, peer: &P) {
        if self.banned.insert(peer.clone()) {
            self.remove_peer(now, peer);
            self.events
                .push_back(Event::PeerBanned { peer: peer.clone() });
        }
    }

    // ----------------------------------------------------------------------------------------------
    // The scheduling pass
    // ----------------------------------------------------------------------------------------------

    /// Whether `peer` may be asked for `index` now, by the locality rules alone.
    fn locality_allows(&self, now: Instant, peer: &Peer, index: u32) -> bool {
        let i = index as usize;
        if peer.same_site {
            return true;
        }
        if self.local_avail[i] > 0 {
            return false;
        }
        let Some(w) = self.wants[i].as_ref() else {
            return true;
        };
        let announced = self.local_pending[i] > 0;
        let assigned_elsewhere = !self.site_assigned_to_us(index);
        let waiting = match w.priority {
            // A blocked VM waits for an announced fetch. For an assignment nobody has announced
            // it waits only briefly: its assignee may not be reading the chunk at all, but in a
            // flash crowd it is, and announces within an intra-site round trip.
            Priority::Demand => {
                (announced && w.gateway_fetch_until.is_some_and(|t| now < t))
                    || (now < w.wan_after
                        && (announced
                            || (assigned_elsewhere && w.assign_after.is_some_and(|t| now < t))))
            }
            // A Background want told to its live gateway waits for the gateway's copy however
            // long that takes (a slow origin is then crossed once per site, not once per node).
            Priority::Background => {
                announced
                    || (assigned_elsewhere
                        && (now < w.wan_after
                            || w.needed_from.is_some_and(|(g, _)| {
                                self.via_gateways && self.gateways_live.contains(&g)
                            })))
            }
        };
        !waiting
    }

    /// Whether `peer` is not to be asked for `index` now because of fan-out refusals: it refused
    /// it less than [`Config::relay_retry`] ago, or another peer did that scores higher for us
    /// ([`peer::relay_score`]).
    fn relay_excluded(&self, now: Instant, peer: &P, index: u32) -> bool {
        let Some(w) = self.wants[index as usize].as_ref() else {
            return false;
        };
        if w.priority == Priority::Background {
            // No relay bar for Background: a refusing peer is skipped, every other holder may
            // be asked (the rarest-first or profile order spreads the crowd's requests).
            return w
                .relayed
                .iter()
                .any(|(p, until, _)| p == peer && now < *until);
        }
        let mut bar = None;
        for (p, until, score) in &w.relayed {
            if now < *until {
                if p == peer {
                    return true;
                }
                bar = bar.max(Some(*score));
            }
        }
        let Some(bar) = bar else {
            return false;
        };
        let holder = self
            .peers
            .get(peer)
            .map_or_else(|| stable_key(peer), |p| p.key);
        relay_score(self.local_key.unwrap_or(0), holder, index) <= bar
    }

    /// The best peer to ask for `index` at `priority`, skipping `exclude`.
    fn best_source(
        &self,
        now: Instant,
        index: u32,
        priority: Priority,
        exclude: &[P],
    ) -> Option<P> {
        self.peers
            .iter()
            .filter(|(id, p)| {
                p.have.contains(index)
                    && p.has_room(now, self.slot_limit(now, p, priority))
                    && self.locality_allows(now, p, index)
                    && !exclude.contains(id)
                    && !self.relay_excluded(now, id, index)
            })
            .min_by_key(|(_, p)| p.rank(now))
            .map(|(id, _)| id.clone())
    }

    /// Slots requests of `priority` may use at `peer` (its window; Background leaves the reserved
    /// slots free, and takes fewer while a VM is reading: [`Config::demand_backoff`]).
    fn slot_limit(&self, now: Instant, peer: &Peer, priority: Priority) -> u32 {
        match priority {
            Priority::Demand => peer.limit,
            Priority::Background => {
                if now < peer.bg_choked_until {
                    return 0;
                }
                let base = peer.limit - self.config.demand_reserved_slots;
                if self.demand_backoff_until.is_some_and(|t| now < t) {
                    // Room is counted over all requests in flight: this leaves Background
                    // `background_during_demand` of them beside the peer's Demand requests.
                    base.min(peer.in_flight_demand + self.config.background_during_demand)
                } else {
                    base
                }
            }
        }
    }

    /// Pushes the Background back-off forward while Demand wants exist.
    fn note_demand(&mut self, now: Instant) {
        if self.wanted_demand > 0 {
            self.demand_backoff_until = Some(now + self.config.demand_backoff);
        } else if self.demand_backoff_until.is_some_and(|t| now >= t) {
            self.demand_backoff_until = None;
        }
    }

    /// The best queued Background chunk for `peer`, if any, looking where `wake` says.
    fn pick_background(&self, now: Instant, id: &P, peer: &Peer, look: &Look) -> Option<u32> {
        let ok = |index: u32| {
            peer.have.contains(index)
                && self.locality_allows(now, peer, index)
                && !self.relay_excluded(now, id, index)
        };
        if let Look::Only(candidates) = look {
            let pick = candidates
                .iter()
                .filter(|&&i| ok(i))
                .filter_map(|&i| self.wants[i as usize].as_ref().and_then(|w| w.bg_key))
                .min()
                .map(|k| k.index);
            // The invariant that makes the short look right: nothing else became takeable.
            debug_assert_eq!(
                pick,
                self.pick_background(now, id, peer, &Look::Scan),
                "a woken peer's candidates miss a chunk it may take"
            );
            return pick;
        }
        let mut scanned = 0;
        for key in &self.bg_queue {
            if ok(key.index) {
                return Some(key.index);
            }
            scanned += 1;
            if scanned == SCAN_BUDGET {
                break;
            }
        }
        if scanned < SCAN_BUDGET {
            return None;
        }
        // The peer holds little of what is queued: intersect bitmaps instead of walking the queue.
        peer.have
            .iter_and(&self.bg_unassigned)
            .filter(|&i| ok(i))
            .filter_map(|i| self.wants[i as usize].as_ref().and_then(|w| w.bg_key))
            .min()
            .map(|k| k.index)
    }

    fn assign(
        &mut self,
        now: Instant,
        index: u32,
        peer: &P,
        priority: Priority,
        pass: &mut Pass<P>,
    ) {
        self.remove_from_queues(index);
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        let rtt = p.rtt.unwrap_or(Duration::ZERO);
        let deadline = (now + self.config.request_timeout + rtt.saturating_mul(4))
            .max(p.last_progress + self.config.request_timeout + rtt.saturating_mul(4));
        match priority {
            Priority::Demand => p.in_flight_demand += 1,
            Priority::Background => p.in_flight_background += 1,
        }
        let remote = !p.same_site;
        self.in_flight.insert(
            (peer.clone(), index),
            InFlight {
                priority,
                deadline,
                sent: now,
                arriving: false,
            },
        );
        self.request_deadlines
            .insert((deadline, peer.clone(), index));
        if let Some(w) = self.wants[index as usize].as_mut() {
            w.requested_from.push(peer.clone());
        }
        let batch = pass.batches.entry(peer.clone()).or_default();
        match priority {
            Priority::Demand => batch.demand.push(index),
            Priority::Background => batch.background.push(index),
        }
        if remote {
            pass.announce.push(index);
        }
    }

    /// Also requests Demand want `index` from a better-ranked peer than the one its only request
    /// waits at, once that request is [`Config::hedge_delay`] old.
    fn try_hedge(&mut self, now: Instant, index: u32, pass: &mut Pass<P>) {
        let Some(w) = self.wants[index as usize].as_ref() else {
            return;
        };
        if w.priority != Priority::Demand || w.requested_from.len() != 1 {
            return;
        }
        let first = w.requested_from[0].clone();
        let Some(req) = self.in_flight.get(&(first.clone(), index)).copied() else {
            return;
        };
        if req.arriving {
            // Its bytes are on the way and a Cancel cannot stop them: a second copy would only
            // add to the load of whichever link is slow.
            return;
        }
        let due = req.sent + self.config.hedge_delay;
        if now < due {
            self.hedge_due.insert((due, index));
            return;
        }
        let Some(current) = self.peers.get(&first).map(|p| p.rank(now)) else {
            return;
        };
        let Some(better) = self.best_source(now, index, Priority::Demand, &[first]) else {
            return;
        };
        let better_rank = self.peers.get(&better).map(|p| p.rank(now));
        // Compare without the load term's own request: the first peer carries ours already.
        let strictly_better = better_rank.is_some_and(|r| {
            (r.0, r.1, r.2, r.3) < (current.0, current.1, current.2, current.3.saturating_sub(1))
        });
        if strictly_better {
            self.assign(now, index, &better, Priority::Demand, pass);
        }
    }

    /// Ends the waits whose time has come: same-site copies waited for, hedges due, fan-out
    /// refusals and Background chokes, announcements of same-site fetches. Run at the start of
    /// every pass, not only at [`Self::handle_timeout`]: an input handled at or after such an
    /// instant, before the driver's timer fires, must see what the wait's end allows (a peer is
    /// only ever left out of the Background pass when it has nothing it may take).
    fn expire_waits(&mut self, now: Instant) {
        // Wants that stop waiting for a same-site copy: only they are looked at again.
        while let Some((_, index)) = self
            .wan_after_deadlines
            .first()
            .copied()
            .filter(|d| d.0 <= now)
        {
            self.wan_after_deadlines.pop_first();
            self.locality_changed(index);
        }
        while let Some(&(at, index)) = self.hedge_due.first() {
            if at > now {
                break;
            }
            self.hedge_due.pop_first();
            self.hedge_candidates.insert(index);
        }
        // Fan-out refusals that end: the peer may be asked again.
        while let Some(&(at, index)) = self.relay_due.first() {
            if at > now {
                break;
            }
            self.relay_due.pop_first();
            if let Some(w) = self.wants[index as usize].as_mut() {
                let mut ended = Vec::new();
                w.relayed.retain(|(p, until, _)| {
                    let keep = *until > now;
                    if !keep {
                        ended.push(p.clone());
                    }
                    keep
                });
                match w.priority {
                    Priority::Demand => {
                        self.demand_fresh.insert(index);
                    }
                    // Only the refusing peers may now give it (Background has no relay bar).
                    Priority::Background => {
                        for id in ended {
                            self.wake_background(&id, index);
                        }
                    }
                }
            }
        }
        // Background chokes that end: those peers take Background requests again, looking where
        // they were woken for while parked.
        while let Some((at, id)) = self.bg_chokes.first().cloned() {
            if at > now {
                break;
            }
            self.bg_chokes.pop_first();
            self.bg.unpark(&id);
        }
        // Same-site fetch announcements we stop waiting for.
        while let Some((until, peer, index)) = self.pending_expiry.first().cloned() {
            if until > now {
                break;
            }
            if let Some(p) = self.peers.get_mut(&peer) {
                p.pending.remove(&index);
            }
            self.pending_expiry.remove(&(until, peer, index));
            self.pending_gone(index);
        }
    }

    fn schedule(&mut self, now: Instant) {
        self.expire_waits(now);
        self.note_demand(now);
        // Cool-downs that ended: this pass looks at those peers again, and `poll_timeout` only ever
        // reports instants after `now`.
        while self.cooldowns.first().is_some_and(|c| c.0 <= now) {
            self.cooldowns.pop_first();
            self.demand_rescan = true;
        }
        let mut pass = Pass {
            batches: BTreeMap::new(),
            announce: Vec::new(),
        };

        // 0. Tell site gateways about Demand wants they are assigned that nobody in the site
        //    holds or fetches, so they fetch them now instead of each blocked node crossing the WAN.
        self.ask_gateways(now);

        // 1. Demand, oldest first. Only what may have changed is looked at: every queued want after a
        //    global change, else the new ones (best peer each) and the peers that freed a slot (the
        //    oldest wants each can take).
        let rescan = std::mem::take(&mut self.demand_rescan);
        let fresh = std::mem::take(&mut self.demand_fresh);
        let freed = std::mem::take(&mut self.demand_freed);
        if !self.demand_queue.is_empty() {
            let queued: Vec<(Instant, u32)> = if rescan {
                self.demand_queue.iter().copied().collect()
            } else {
                let mut v: Vec<(Instant, u32)> = fresh
                    .iter()
                    .filter_map(|&i| {
                        let since = self.wants[i as usize].as_ref()?.demand_since?;
                        self.demand_queue
                            .contains(&(since, i))
                            .then_some((since, i))
                    })
                    .collect();
                v.sort_unstable();
                v
            };
            for (_, index) in queued {
                if let Some(peer) = self.best_source(now, index, Priority::Demand, &[]) {
                    self.assign(now, index, &peer, Priority::Demand, &mut pass);
                }
            }
            if !rescan {
                let mut freed: Vec<(RankKey, P)> = freed
                    .into_iter()
                    .filter_map(|id| self.peers.get(&id).map(|p| (p.rank(now), id)))
                    .collect();
                freed.sort();
                for (_, id) in freed {
                    let takes: Vec<u32> = match self.peers.get(&id) {
                        Some(p) if p.has_room(now, p.limit) => {
                            let room = (p.capacity(now, p.limit) - p.in_flight()) as usize;
                            self.demand_queue
                                .iter()
                                .map(|&(_, i)| i)
                                .filter(|&i| {
                                    p.have.contains(i)
                                        && self.locality_allows(now, p, i)
                                        && !self.relay_excluded(now, &id, i)
                                })
                                .take(room)
                                .collect()
                        }
                        _ => continue,
                    };
                    for index in takes {
                        self.assign(now, index, &id, Priority::Demand, &mut pass);
                    }
                }
            }
        }

        // 1b. Hedges: a Demand want waiting on one peer whose chunk a better-ranked peer obtained.
        if !self.hedge_candidates.is_empty() {
            let candidates = std::mem::take(&mut self.hedge_candidates);
            for index in candidates {
                self.try_hedge(now, index, &mut pass);
            }
        }

        // 2. Background: best-ranked peer with a free slot picks next, round robin by rank.
        if !self.bg_fresh.is_empty() {
            self.wake_for_fresh(now);
        }
        if !self.bg_queue.is_empty() {
            let mut heap: BinaryHeap<std::cmp::Reverse<(RankKey, P)>> = self
                .bg
                .awake()
                .filter_map(|id| {
                    let p = self.peers.get(id)?;
                    p.has_room(now, self.slot_limit(now, p, Priority::Background))
                        .then(|| std::cmp::Reverse((p.rank(now), id.clone())))
                })
                .collect();
            while let Some(std::cmp::Reverse((_, id))) = heap.pop() {
                let Some(p) = self.peers.get(&id) else {
                    continue;
                };
                let Some(look) = self.bg.look(&id) else {
                    continue;
                };
                match self.pick_background(now, &id, p, look) {
                    Some(index) => {
                        self.assign(now, index, &id, Priority::Background, &mut pass);
                        if let Some(p) = self.peers.get(&id) {
                            if p.has_room(now, self.slot_limit(now, p, Priority::Background))
                                && !self.bg_queue.is_empty()
                            {
                                heap.push(std::cmp::Reverse((p.rank(now), id)));
                            }
                        }
                    }
                    None => {
                        self.bg.exhaust(&id);
                    }
                }
                if self.bg_queue.is_empty() {
                    break;
                }
            }
            // The invariant the pass relies on: a peer left asleep has nothing it could take.
            #[cfg(debug_assertions)]
            for (id, p) in &self.peers {
                if !self.bg.is_listed(id)
                    && p.has_room(now, self.slot_limit(now, p, Priority::Background))
                {
                    debug_assert_eq!(
                        self.pick_background(now, id, p, &Look::Scan),
                        None,
                        "an exhausted peer was not woken for a chunk it may take"
                    );
                }
            }
        }

        // 3. Endgame: a pull is finishing (Background work remains), everything wanted is in flight
        //    and little remains. Lazy Demand-only reads are never duplicated.
        let wanted = self.wanted.count();
        if wanted > self.wanted_demand
            && wanted <= self.config.endgame_threshold
            && self.demand_queue.is_empty()
            && self.bg_queue.is_empty()
        {
            let indices: Vec<u32> = self.wanted.iter().collect();
            for index in indices {
                let Some(w) = self.wants[index as usize].as_ref() else {
                    continue;
                };
                if w.requested_from.len() >= self.config.endgame_max_requests as usize {
                    continue;
                }
                let priority = w.priority;
                let exclude = w.requested_from.clone();
                if let Some(peer) = self.best_source(now, index, priority, &exclude) {
                    self.assign(now, index, &peer, priority, &mut pass);
                }
            }
        }

        // 4. Emit requests, then tell same-site peers what we fetch from other sites.
        for (peer, batch) in pass.batches {
            if !batch.demand.is_empty() {
                self.actions.push_back(Action::Request {
                    peer: peer.clone(),
                    priority: Priority::Demand,
                    indices: batch.demand,
                });
            }
            if !batch.background.is_empty() {
                self.actions.push_back(Action::Request {
                    peer,
                    priority: Priority::Background,
                    indices: batch.background,
                });
            }
        }
        if !pass.announce.is_empty() {
            let neighbours: Vec<P> = self
                .peers
                .iter()
                .filter(|(_, p)| p.same_site)
                .map(|(id, _)| id.clone())
                .collect();
            for peer in neighbours {
                self.actions.push_back(Action::AnnounceFetching {
                    peer,
                    indices: pass.announce.clone(),
                });
            }
        }

        // 5. Report wanted chunks nobody connected holds.
        if self.sourceless.count() > 0 && now >= self.no_source_due {
            let indices: Vec<u32> = self.sourceless.iter().take(MAX_REPORTED_INDICES).collect();
            self.events.push_back(Event::NoSource {
                indices,
                total: self.sourceless.count(),
            });
            self.no_source_due = now + self.config.no_source_retry;
        }
    }
}

/// Removes the deadline entry `(t, index)` of a wait of `w` that changed, unless another of its
/// waits still ends at the same instant (one entry serves every wait ending then).
fn forget_wait<P>(deadlines: &mut BTreeSet<(Instant, u32)>, w: &Want<P>, index: u32, t: Instant) {
    if w.wan_after != t && w.assign_after != Some(t) && w.gateway_fetch_until != Some(t) {
        deadlines.remove(&(t, index));
    }
}
