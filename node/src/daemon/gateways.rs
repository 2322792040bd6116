//! Site gateways: which few nodes of our site bring an image's chunks in from outside
//! ([`vmswarm_protocol::site`]).
//!
//! Every answer to a lookup of an image's per-site key ([`crate::net::store::site_key`]) is merged
//! into the best [`SITE_GATEWAYS`] site providers we know of the image, ranked by
//! [`gateway_rank`] (the record holders keep exactly those, [`crate::net::store`]). The transfer's
//! gateways are the best `k` of them and ourselves (`k` = `fetch::Config::site_gateways`, the
//! `[fetch] site_gateways` key; 0 turns gateways off), handed to its scheduler with
//! `FetchScheduler::set_site_gateways` on each new answer and when the transfer starts. The
//! provider dialling loop dials every provider found, the gateways among them.
//!
//! Gateways are named only once `k` site providers are known (ourselves included): a node that
//! knew only itself at the start of a flash crowd (the other pullers' records not yet in the DHT)
//! would otherwise name itself the site's only gateway and fetch the whole image from outside. A
//! site with fewer than `k` providers keeps the scheduler's fallback, the rendezvous over the
//! connected same-site peers (a site that small is fully connected). While fewer than `k` are
//! known, during the first [`QUICK_LOOKUP_PERIOD`] of a transfer, the providers are looked up
//! again every [`QUICK_LOOKUP`] instead of every `PROVIDER_RETRY`: the crowd's records arrive
//! within moments.

use std::time::{Duration, Instant as StdInstant};

use libp2p::PeerId;
use libp2p::kad::RecordKey;
use vmswarm_protocol::ImageId;
use vmswarm_protocol::site::{SITE_GATEWAYS, top_gateways};

use super::Daemon;
use crate::net::store::{is_site_key, site_key, site_rank};

/// How soon the providers are looked up again while fewer than `k` site providers are known.
pub(super) const QUICK_LOOKUP: Duration = Duration::from_millis(500);
/// How long after a transfer's start quick lookups are made.
pub(super) const QUICK_LOOKUP_PERIOD: Duration = Duration::from_secs(5);

impl Daemon {
    /// A lookup of `key` found `providers`: if `key` is the site key of an image we want, they
    /// join its known site providers and its transfer's gateways are chosen again.
    pub(super) fn on_site_providers(&mut self, key: &RecordKey, providers: &[PeerId]) {
        if !is_site_key(key) {
            return;
        }
        let site = &self.opts.site;
        let image = self
            .transfers
            .keys()
            .chain(self.pending_manifests.keys())
            .copied()
            .find(|image| site_key(&image.0, site) == *key);
        let Some(image) = image else {
            return;
        };
        let known = self.site_providers.entry(image).or_default();
        let candidates = known
            .iter()
            .chain(providers.iter().filter(|p| !self.banned.contains(p)))
            .map(|p| (site_rank(key, p), *p))
            .collect::<Vec<_>>();
        *known = top_gateways(candidates, SITE_GATEWAYS);
        self.apply_site_gateways(image);
    }

    /// Names `image`'s transfer's site gateways from the site providers known (see the module
    /// docs); does nothing when gateways are off or fewer than `k` providers are known.
    pub(super) fn apply_site_gateways(&mut self, image: ImageId) {
        let me = *self.swarm.local_peer_id();
        let key = site_key(&image.0, &self.opts.site);
        let known = self.site_providers.get(&image);
        let Some(t) = self.transfers.get_mut(&image) else {
            return;
        };
        let k = t.sched.config().site_gateways;
        if k == 0 {
            return;
        }
        let candidates = known
            .into_iter()
            .flatten()
            .chain(std::iter::once(&me))
            .map(|p| (site_rank(&key, p), *p))
            .collect::<Vec<_>>();
        let gateways = top_gateways(candidates, k);
        if gateways.len() < k {
            let std_now = StdInstant::now();
            if std_now < t.started + QUICK_LOOKUP_PERIOD {
                t.next_lookup = t.next_lookup.min(std_now + QUICK_LOOKUP);
            }
            return;
        }
        let now = self.now();
        let Some(t) = self.transfers.get_mut(&image) else {
            return;
        };
        t.sched.set_site_gateways(now, &gateways);
        t.site_gateways = gateways.len();
    }
}
