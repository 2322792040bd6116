//! The Kademlia record store: which provider records a node keeps when more peers provide a key
//! than one record set holds.
//!
//! libp2p's `MemoryStore` keeps the *first* 20 providers of a key and ignores every later one
//! until one expires (48 h). For vmswarm that is a scaling fault: in a boot storm of a thousand
//! nodes, every lookup of an image returns the same 20 nodes (the first to start pulling), so the
//! whole fleet dials those 20 and nobody discovers the other 980, whose uploads then go unused.
//! This store keeps instead a **uniform random sample** of every provider it has been told about
//! (reservoir sampling, Vitter's algorithm R): the n-th distinct provider of a key replaces a
//! random stored one with probability 20/n. The record holders of a key sample independently, so
//! one lookup, which merges the answers of several holders, returns a spread of providers, and
//! different nodes' lookups return different ones.
//!
//! The local node's own provider records are never evicted: Kademlia re-publishes what
//! [`RecordStore::provided`] lists, and an evicted own record would stop being re-published.
//! Everything else (value records, expiry, limits on keys) is `MemoryStore`'s.
//!
//! A sample keeps the answer the same size as before (20 records), so Kademlia messages do not
//! grow; the price is that a holder forgets the providers it drops (they re-publish every 12 h,
//! and other holders keep their own samples).
//!
//! **Keys.** A node provides each image it holds under two keys: the image's own id
//! ([`image_key`], 32 bytes) and a per-site key ([`site_key`]: the byte [`SITE_KEY_PREFIX`] and a
//! 32-byte hash of the image id and the site name, 33 bytes, so that any record holder recognises
//! it, [`is_site_key`]). A lookup asks for both, so a node finds providers in its own data center
//! even when its site is a small part of a large fleet (a random sample of all providers would
//! hold few of them).
//!
//! **Site keys keep the best, not a sample.** For a site key the store keeps the
//! [`PROVIDERS_PER_KEY`] providers ranked highest by
//! [`vmswarm_protocol::site::gateway_rank`]`(key, provider)` (a newcomer replaces the lowest-ranked
//! foreign record when it ranks higher), whatever order they arrive in. Every holder of the key
//! that has heard of the best providers keeps the same ones, so every lookup of the key returns
//! them, and every node of the site computes the same site gateways from its answer
//! ([`vmswarm_protocol::site`]). Our own record is still always kept (it then takes the place of
//! the lowest-ranked foreign one). The price: a holder does not spread the site's other
//! providers; those are found through the image key's sample and the swarm itself.

use std::borrow::Cow;
use std::collections::HashMap;

use libp2p::PeerId;
use libp2p::kad::store::{MemoryStore, MemoryStoreConfig, RecordStore, Result};
use libp2p::kad::{ProviderRecord, Record, RecordKey};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Providers kept per key (Kademlia's k, the size of one answer).
pub const PROVIDERS_PER_KEY: usize = 20;

/// The key an image's providers are recorded under.
pub fn image_key(image: &[u8; 32]) -> RecordKey {
    RecordKey::new(image)
}

/// The first byte of every [`site_key`] (an image key is 32 bytes, a site key 33).
pub const SITE_KEY_PREFIX: u8 = b'S';

/// The key an image's providers in `site` are recorded under: [`SITE_KEY_PREFIX`] and a 32-byte
/// hash of the image id and the site name.
pub fn site_key(image: &[u8; 32], site: &str) -> RecordKey {
    let mut h = blake3::Hasher::new_derive_key("vmswarm 2026 site providers v2");
    h.update(image);
    h.update(site.as_bytes());
    let mut key = Vec::with_capacity(33);
    key.push(SITE_KEY_PREFIX);
    key.extend_from_slice(h.finalize().as_bytes());
    RecordKey::new(&key)
}

/// Whether `key` is a per-site key ([`site_key`]), whose providers are ranked rather than sampled.
pub fn is_site_key(key: &RecordKey) -> bool {
    let k = key.as_ref();
    k.len() == 33 && k[0] == SITE_KEY_PREFIX
}

/// `provider`'s rank as a gateway for the site key `key` ([`vmswarm_protocol::site::gateway_rank`]).
pub fn site_rank(key: &RecordKey, provider: &PeerId) -> u64 {
    vmswarm_protocol::site::gateway_rank(key.as_ref(), &provider.to_bytes())
}

/// A `MemoryStore` whose provider lists are random samples of all providers seen (image keys) or
/// the best-ranked ones (site keys).
pub struct SampledStore {
    inner: MemoryStore,
    local: PeerId,
    /// Distinct providers offered per key while its list was full or filling (the n of algorithm R).
    seen: HashMap<RecordKey, u64>,
    rng: ChaCha8Rng,
}

impl SampledStore {
    /// A store for node `local`; `seed` drives the sampling (tests pass a fixed one).
    pub fn new(local: PeerId, seed: u64) -> Self {
        let config = MemoryStoreConfig {
            max_providers_per_key: PROVIDERS_PER_KEY,
            ..MemoryStoreConfig::default()
        };
        SampledStore {
            inner: MemoryStore::with_config(local, config),
            local,
            seen: HashMap::new(),
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// Forgets the counters of keys that no longer have providers (bounds `seen` by twice the keys
    /// the inner store may hold).
    fn prune(&mut self) {
        let inner = &self.inner;
        self.seen.retain(|k, _| !inner.providers(k).is_empty());
    }
}

impl std::fmt::Debug for SampledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SampledStore")
            .field("local", &self.local)
            .field("keys_counted", &self.seen.len())
            .finish()
    }
}

impl RecordStore for SampledStore {
    type RecordsIter<'a> = <MemoryStore as RecordStore>::RecordsIter<'a>;
    type ProvidedIter<'a> = <MemoryStore as RecordStore>::ProvidedIter<'a>;

    fn get(&self, k: &RecordKey) -> Option<Cow<'_, Record>> {
        self.inner.get(k)
    }

    fn put(&mut self, r: Record) -> Result<()> {
        self.inner.put(r)
    }

    fn remove(&mut self, k: &RecordKey) {
        self.inner.remove(k)
    }

    fn records(&self) -> Self::RecordsIter<'_> {
        self.inner.records()
    }

    fn add_provider(&mut self, record: ProviderRecord) -> Result<()> {
        let current = self.inner.providers(&record.key);
        if current.iter().any(|p| p.provider == record.provider) {
            // A re-publication: refresh it in place.
            return self.inner.add_provider(record);
        }
        if is_site_key(&record.key) {
            return self.add_ranked(record, &current);
        }
        if self.seen.len() >= 2 * MemoryStoreConfig::default().max_provided_keys {
            self.prune();
        }
        let n = {
            let n = self.seen.entry(record.key.clone()).or_insert(0);
            // Providers already stored count as seen (after a prune, or for the first ones).
            *n = (*n).max(current.len() as u64) + 1;
            *n
        };
        if current.len() < PROVIDERS_PER_KEY || record.provider == self.local {
            if current.len() >= PROVIDERS_PER_KEY {
                // Our own record always gets in: make room by dropping a random foreign one.
                self.evict_random_foreign(&record.key, &current);
            }
            return self.inner.add_provider(record);
        }
        // Algorithm R: keep the n-th provider with probability k / n, in a random slot.
        if self.rng.random_range(0..n) >= PROVIDERS_PER_KEY as u64 {
            return Ok(());
        }
        if self.evict_random_foreign(&record.key, &current) {
            self.inner.add_provider(record)
        } else {
            Ok(())
        }
    }

    fn providers(&self, key: &RecordKey) -> Vec<ProviderRecord> {
        self.inner.providers(key)
    }

    fn provided(&self) -> Self::ProvidedIter<'_> {
        self.inner.provided()
    }

    fn remove_provider(&mut self, k: &RecordKey, p: &PeerId) {
        self.inner.remove_provider(k, p)
    }
}

impl SampledStore {
    /// Site keys: keeps the [`PROVIDERS_PER_KEY`] best-ranked providers (and our own record).
    fn add_ranked(&mut self, record: ProviderRecord, current: &[ProviderRecord]) -> Result<()> {
        if current.len() < PROVIDERS_PER_KEY {
            return self.inner.add_provider(record);
        }
        let worst = current
            .iter()
            .map(|p| p.provider)
            .filter(|p| *p != self.local)
            .min_by_key(|p| site_rank(&record.key, p));
        let Some(worst) = worst else {
            // Only our own record is stored (PROVIDERS_PER_KEY is more than 1): nothing to evict.
            return Ok(());
        };
        if record.provider == self.local
            || site_rank(&record.key, &record.provider) > site_rank(&record.key, &worst)
        {
            self.inner.remove_provider(&record.key, &worst);
            return self.inner.add_provider(record);
        }
        Ok(())
    }

    /// Drops one uniformly chosen provider of `key` other than ourselves. False if there is none.
    fn evict_random_foreign(&mut self, key: &RecordKey, current: &[ProviderRecord]) -> bool {
        let foreign: Vec<&PeerId> = current
            .iter()
            .map(|p| &p.provider)
            .filter(|p| **p != self.local)
            .collect();
        if foreign.is_empty() {
            return false;
        }
        let victim = *foreign[self.rng.random_range(0..foreign.len())];
        self.inner.remove_provider(key, &victim);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &RecordKey, provider: PeerId) -> ProviderRecord {
        ProviderRecord::new(key.clone(), provider, Vec::new())
    }

    #[test]
    fn keeps_a_spread_sample_not_the_first_twenty() {
        // Seeded: the sample is random but the test is reproducible.
        let seed = 11;
        let local = PeerId::random();
        let mut store = SampledStore::new(local, seed);
        let key = RecordKey::new(b"image");
        let peers: Vec<PeerId> = (0..1000).map(|_| PeerId::random()).collect();
        for p in &peers {
            store.add_provider(record(&key, *p)).unwrap();
        }
        let kept = store.providers(&key);
        assert_eq!(kept.len(), PROVIDERS_PER_KEY, "seed {seed}");
        let positions: Vec<usize> = kept
            .iter()
            .map(|r| peers.iter().position(|p| *p == r.provider).unwrap())
            .collect();
        let late = positions.iter().filter(|&&i| i >= 500).count();
        // Uniform over 1000 arrivals: about half from the second half (binomial(20, 1/2) is
        // below 4 with probability 0.13%).
        assert!(
            (4..=16).contains(&late),
            "seed {seed}: kept positions {positions:?}"
        );
        assert!(
            positions.iter().any(|&i| i >= PROVIDERS_PER_KEY),
            "seed {seed}: the first twenty only"
        );
    }

    #[test]
    fn own_record_is_never_evicted_and_always_admitted() {
        let local = PeerId::random();
        let mut store = SampledStore::new(local, 3);
        let key = RecordKey::new(b"image");
        for _ in 0..PROVIDERS_PER_KEY {
            store.add_provider(record(&key, PeerId::random())).unwrap();
        }
        store.add_provider(record(&key, local)).unwrap();
        for _ in 0..500 {
            store.add_provider(record(&key, PeerId::random())).unwrap();
        }
        let kept = store.providers(&key);
        assert_eq!(kept.len(), PROVIDERS_PER_KEY);
        assert!(kept.iter().any(|r| r.provider == local));
        assert_eq!(store.provided().count(), 1, "still re-published");
    }

    #[test]
    fn site_keys_differ_by_site_and_from_the_image_key() {
        let image = [7u8; 32];
        let a = site_key(&image, "dc1");
        assert_ne!(a, site_key(&image, "dc2"));
        assert_ne!(a, site_key(&[8u8; 32], "dc1"));
        assert_ne!(a, image_key(&image));
        assert_eq!(a, site_key(&image, "dc1"));
    }

    #[test]
    fn site_keys_are_recognisable() {
        let image = [7u8; 32];
        assert!(is_site_key(&site_key(&image, "dc1")));
        assert!(!is_site_key(&image_key(&image)));
        assert!(!is_site_key(&image_key(&[SITE_KEY_PREFIX; 32])));
    }

    /// Whatever order providers arrive in, a site key keeps the best-ranked ones.
    #[test]
    fn site_keys_keep_the_best_ranked_in_any_order() {
        use rand::seq::SliceRandom;
        let seed = seed();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let key = site_key(&[3u8; 32], "dc1");
        let peers: Vec<PeerId> = (0..200).map(|_| PeerId::random()).collect();
        let mut ranked = peers.clone();
        ranked.sort_by_key(|p| std::cmp::Reverse(site_rank(&key, p)));
        let mut best: Vec<PeerId> = ranked[..PROVIDERS_PER_KEY].to_vec();
        best.sort();
        for round in 0..5 {
            let mut order = peers.clone();
            order.shuffle(&mut rng);
            let mut store = SampledStore::new(PeerId::random(), seed);
            for p in &order {
                store.add_provider(record(&key, *p)).unwrap();
            }
            // Re-publications do not disturb it.
            for p in order.iter().take(50) {
                store.add_provider(record(&key, *p)).unwrap();
            }
            let mut kept: Vec<PeerId> = store.providers(&key).iter().map(|r| r.provider).collect();
            kept.sort();
            assert_eq!(kept, best, "seed {seed}, round {round}");
        }
    }

    #[test]
    fn site_keys_keep_the_own_record() {
        let seed = seed();
        let local = PeerId::random();
        let key = site_key(&[4u8; 32], "dc1");
        let mut store = SampledStore::new(local, seed);
        store.add_provider(record(&key, local)).unwrap();
        let peers: Vec<PeerId> = (0..100).map(|_| PeerId::random()).collect();
        for p in &peers {
            store.add_provider(record(&key, *p)).unwrap();
        }
        let kept: Vec<PeerId> = store.providers(&key).iter().map(|r| r.provider).collect();
        assert_eq!(kept.len(), PROVIDERS_PER_KEY);
        assert!(kept.contains(&local), "seed {seed}");
        // The others are the best-ranked foreign providers.
        let mut ranked = peers.clone();
        ranked.sort_by_key(|p| std::cmp::Reverse(site_rank(&key, p)));
        for p in &ranked[..PROVIDERS_PER_KEY - 1] {
            assert!(kept.contains(p), "seed {seed}");
        }
        // Added last, when full, it still gets in.
        let mut store = SampledStore::new(local, seed);
        for p in &peers {
            store.add_provider(record(&key, *p)).unwrap();
        }
        store.add_provider(record(&key, local)).unwrap();
        assert!(store.providers(&key).iter().any(|r| r.provider == local));
        assert_eq!(store.providers(&key).len(), PROVIDERS_PER_KEY);
        assert_eq!(store.provided().count(), 1, "still re-published");
    }

    /// Image keys are still sampled: not simply the best-ranked ones.
    #[test]
    fn image_keys_are_still_sampled() {
        let seed = seed();
        let key = image_key(&[5u8; 32]);
        let mut store = SampledStore::new(PeerId::random(), seed);
        let peers: Vec<PeerId> = (0..1000).map(|_| PeerId::random()).collect();
        for p in &peers {
            store.add_provider(record(&key, *p)).unwrap();
        }
        let mut ranked = peers.clone();
        ranked.sort_by_key(|p| std::cmp::Reverse(site_rank(&key, p)));
        let kept: Vec<PeerId> = store.providers(&key).iter().map(|r| r.provider).collect();
        assert_eq!(kept.len(), PROVIDERS_PER_KEY);
        let in_best = kept
            .iter()
            .filter(|p| ranked[..PROVIDERS_PER_KEY].contains(p))
            .count();
        // A uniform sample of 20 out of 1000 holds about 0.4 of the best 20.
        assert!(in_best <= 5, "seed {seed}: {in_best} of the best 20 kept");
    }

    /// The test's seed: `VMSWARM_TEST_SEED` or a fixed default, printed.
    fn seed() -> u64 {
        let seed = std::env::var("VMSWARM_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(7);
        eprintln!("test seed: {seed} (set VMSWARM_TEST_SEED to replay)");
        seed
    }

    #[test]
    fn republication_refreshes_without_counting_again() {
        let local = PeerId::random();
        let mut store = SampledStore::new(local, 5);
        let key = RecordKey::new(b"image");
        let p = PeerId::random();
        for _ in 0..50 {
            store.add_provider(record(&key, p)).unwrap();
        }
        assert_eq!(store.providers(&key).len(), 1);
        assert_eq!(store.seen.get(&key), Some(&1));
    }
}
