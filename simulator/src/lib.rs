//! # vmswarm-sim: a discrete-event simulator of vmswarm image distribution
//!
//! It runs the real `vmswarm-protocol` state machines — one [`FetchScheduler`] per simulated host
//! and image and one [`ServeQueue`] per node — in virtual time over a flow-level network model, and
//! reports VM boot times, bytes per link and per site, and built-in sanity checks.
//!
//! - [`units`]: sizes and rates as written in scenario files.
//! - [`scenario`]: scenario files and their validation.
//! - [`content`]: which chunks are all-zero or share content (never fetched, fetched once).
//! - [`engine`]: virtual time and the event queue.
//! - [`net`]: links, flows and max-min fair rates.
//! - [`boot`]: what a booting VM reads, and when.
//! - [`routing`]: content routing (Kademlia lookups) and which peers a host connects to.
//! - [`strategy`]: what differs between central, swarm-full, lazy-central and vmswarm.
//! - [`world`]: the simulated nodes and the messages between them; drives the protocol.
//! - [`record`]: what a run produces.
//! - [`checks`]: the Kumar-Ross bound and the consistency checks.
//! - [`report`]: CSV files, summaries and plots.
//!
//! [`FetchScheduler`]: vmswarm_protocol::fetch::FetchScheduler
//! [`ServeQueue`]: vmswarm_protocol::serve::ServeQueue

pub mod boot;
pub mod checks;
pub mod content;
pub mod engine;
pub mod net;
pub mod record;
pub mod report;
pub mod routing;
pub mod scenario;
pub mod strategy;
pub mod units;
pub mod world;
