//! The fetching side of a host: starting, finding and connecting to providers, feeding its fetch
//! scheduler and carrying out its actions, committing chunks, and its VMs' reads.

use std::rc::Rc;

use vmswarm_protocol::fetch::{Action, ChunkOutcome, Delivery, Event, FetchScheduler, PeerInfo};
use vmswarm_protocol::site::top_gateways;
use vmswarm_protocol::wire::have_update_delay;
use vmswarm_protocol::{Instant, Priority};

use super::{Ev, Msg, NodeId, STREAM_SCHED, World, substream};
use crate::boot::exponential;
use crate::routing;
use crate::strategy::Background;

impl World {
    pub(super) fn host_start(&mut self, h: u32) {
        let now = self.now();
        let chunks = self.manifest.chunk_count();
        let mut config = self.sc.fetch.clone();
        config.local_site = self.sc.sites[self.hosts[h as usize].site].name.clone();
        config.chunk_bytes = self.sc.chunk_size;
        let seed = substream(self.seed, STREAM_SCHED, h.into());
        // Invariant: this configuration was accepted by `FetchScheduler::new` in `World::new`, and
        // only `local_site` differs, which the scheduler does not check.
        let mut sched = FetchScheduler::new(config, chunks, seed).expect("checked in World::new");
        sched.set_local_peer(now, &self.hosts[h as usize].node);
        let store = &self.hosts[h as usize].store;
        // Held chunks (the all-zero ones) are not wanted, as a node's pull does not want them.
        let background: Vec<u32> = match self.plan.background {
            Background::None => Vec::new(),
            Background::All => (0..chunks).filter(|&c| !store.contains(c)).collect(),
            Background::Profile => self
                .profile
                .iter()
                .copied()
                .filter(|&c| !store.contains(c))
                .collect(),
        };
        if self.plan.profile_order {
            sched.set_priority_order(now, &self.profile);
        }
        let profile_left = self.profile.iter().filter(|&&c| !store.contains(c)).count() as u32;
        let host = &mut self.hosts[h as usize];
        host.started = Some(now);
        host.bg_left = background.len() as u32;
        host.profile_left = profile_left;
        if !background.is_empty() {
            // Invariant: every index is below the chunk count.
            sched
                .handle_want_many(now, background.iter().copied(), Priority::Background)
                .expect("indices in range");
        } else if self.plan.background != Background::None {
            host.bg_done = Some(now);
            self.bg_left -= 1;
        }
        self.hosts[h as usize].sched = Some(sched);
        if self.plan.boot_after_profile && profile_left == 0 {
            // Nothing of the boot profile to stage: VMs already waiting start now.
            self.start_waiting_vms(h, now);
        }
        let node = self.hosts[h as usize].node;
        if self.plan.peers {
            let publish = self.lookup_delay[self.hosts[h as usize].site];
            self.providers.push((now + publish, node));
            self.start_lookup(h);
        } else {
            for src in 0..self.sources {
                let rtt = self.rtt(node, src);
                self.q.schedule_in(rtt, Ev::Connect { host: h, peer: src });
            }
        }
        self.drain(h);
    }

    fn start_lookup(&mut self, h: u32) {
        let host = &mut self.hosts[h as usize];
        if host.lookup_pending {
            return;
        }
        host.lookup_pending = true;
        self.counters.lookups += 1;
        let delay = self.lookup_delay[host.site];
        self.q.schedule_in(delay, Ev::LookupDone(h));
    }

    pub(super) fn lookup_done(&mut self, h: u32) {
        let now = self.now();
        self.hosts[h as usize].lookup_pending = false;
        let node = self.hosts[h as usize].node;
        let mut targets: Vec<NodeId> = (0..self.sources)
            .filter(|s| !self.hosts[h as usize].conns.contains(s))
            .collect();
        let host_peers = self.hosts[h as usize]
            .conns
            .iter()
            .filter(|&&c| !self.is_source(c))
            .count();
        let room = (self.sc.routing.max_peers as usize).saturating_sub(host_peers);
        let visible = self.providers.partition_point(|p| p.0 <= now);
        // Providers are pushed in start order, so their visibility times are sorted too.
        let candidates: Vec<NodeId> = self.providers[..visible].iter().map(|p| p.1).collect();
        let conns = &self.hosts[h as usize].conns;
        let picked = routing::choose(
            &candidates,
            room,
            |c| c == node || conns.contains(&c),
            &mut self.routing_rng,
        );
        // The per-site key's answer: up to `site_peers` same-site providers. With site gateways on,
        // the record holders keep the providers ranked highest as gateways (`site`, as the node's
        // record store does), so every lookup gets the same best ones; without, a random draw.
        let site = self.nodes[node as usize].site;
        let nodes = &self.nodes;
        let same_site = |c: NodeId| nodes[c as usize].site == site;
        let k = self.sc.fetch.site_gateways;
        let (local, gateways) = if k > 0 {
            let rank = &self.gateway_rank;
            let answer = top_gateways(
                candidates
                    .iter()
                    .filter(|&&c| c != node && same_site(c))
                    .map(|&c| (rank[c as usize], c)),
                self.sc.routing.site_peers as usize,
            );
            let gateways = top_gateways(
                answer
                    .iter()
                    .chain(std::iter::once(&node))
                    .map(|&c| (rank[c as usize], c)),
                k,
            );
            let fresh = answer
                .into_iter()
                .filter(|c| !conns.contains(c) && !picked.contains(c))
                .collect();
            // As the node does (`node/src/daemon/gateways.rs`), a host names gateways only once it
            // knows `k` of its site's providers (itself included): an early or small answer would
            // make it name itself among too few, and fetch their shares from outside.
            (fresh, (gateways.len() >= k).then_some(gateways))
        } else {
            let site_have = conns
                .iter()
                .filter(|&&c| c >= self.sources && same_site(c))
                .count();
            let site_room = (self.sc.routing.site_peers as usize).saturating_sub(site_have);
            let drawn = routing::choose(
                &candidates,
                site_room,
                |c| c == node || !same_site(c) || conns.contains(&c) || picked.contains(&c),
                &mut self.routing_rng,
            );
            (drawn, None)
        };
        if let (Some(gateways), Some(sched)) = (gateways, self.hosts[h as usize].sched.as_mut()) {
            sched.set_site_gateways(now, &gateways);
        }
        targets.extend(picked);
        targets.extend(local);
        for peer in targets {
            let rtt = self.rtt(node, peer);
            self.q.schedule_in(rtt, Ev::Connect { host: h, peer });
        }
    }

    /// The QUIC handshake with `peer` completed: both sides exchange Hello with their Have set.
    pub(super) fn connect(&mut self, h: u32, peer: NodeId) {
        let node = self.hosts[h as usize].node;
        if !self.hosts[h as usize].conns.insert(peer) {
            return;
        }
        self.counters.connections += 1;
        let peer_have = match self.host_of(peer) {
            None => {
                // A source hears our Have updates, as the node's publisher does once it has sent
                // us a chunk; its serve queue's fan-out needs them. An origin without a fan-out
                // limit ignores them, so they are not simulated.
                if self.nodes[peer as usize].serve.fanout_rule().max() > 0 {
                    self.hosts[h as usize].have_peers.push(peer);
                }
                None
            }
            Some(ph) => {
                let p = &mut self.hosts[ph as usize];
                p.conns.insert(node);
                p.have_peers.push(node);
                self.hosts[h as usize].have_peers.push(peer);
                let mine = Box::new(self.hosts[h as usize].store.clone());
                self.send(node, peer, Msg::Hello { have: Some(mine) });
                Some(Box::new(self.hosts[ph as usize].store.clone()))
            }
        };
        self.send(peer, node, Msg::Hello { have: peer_have });
    }

    pub(super) fn on_host_message(&mut self, h: u32, from: NodeId, msg: Msg) {
        let now = self.now();
        let host_site = self.hosts[h as usize].site;
        let full = &self.full;
        let host = &mut self.hosts[h as usize];
        let store = &host.store;
        let Some(sched) = host.sched.as_mut() else {
            return;
        };
        match msg {
            Msg::Hello { have } => {
                // Source servers announce themselves as origins (`Capabilities::ORIGIN`) unless
                // the scenario says otherwise.
                let info = PeerInfo {
                    site: self.sc.sites[self.nodes[from as usize].site].name.clone(),
                    rtt: Some(self.sc.rtt[host_site][self.nodes[from as usize].site]),
                    origin: from < self.sources && self.sc.sources[from as usize].origin,
                };
                sched.handle_peer_connected(now, from, info);
                sched.handle_peer_have(now, &from, have.as_deref().unwrap_or(full));
            }
            Msg::HaveUpdate { indices } => sched.handle_peer_have_update(now, &from, &indices),
            Msg::Fetching { indices } => sched.handle_peer_fetching(now, &from, &indices),
            Msg::Need { priority, indices } => {
                let missing: Vec<u32> = indices
                    .into_iter()
                    .filter(|&i| !store.contains(i))
                    .collect();
                sched.handle_peer_need(now, &from, priority, &missing);
            }
            Msg::Reject { index, kind } => sched.handle_reject(now, &from, index, kind),
            Msg::ChunkArriving { index } => sched.handle_chunk_arriving(now, &from, index),
            Msg::Request { .. } | Msg::Cancel { .. } | Msg::Chunk { .. } => return,
        }
        self.drain(h);
    }

    pub(super) fn on_chunk(&mut self, to: NodeId, from: NodeId, index: u32) {
        let now = self.now();
        let len = self.chunk_len(index);
        self.counters.bytes_delivered += len as f64;
        self.counters.bytes_in_transit -= len as f64;
        let Some(h) = self.host_of(to) else {
            return;
        };
        let Some(sched) = self.hosts[h as usize].sched.as_mut() else {
            return;
        };
        // A chunk whose request was cancelled after the server had written it still reaches the
        // scheduler, as on the node's lanes: it is accepted if still wanted (from whichever peer)
        // and counts as the peer's progress either way.
        // Chunks are never corrupt here: the simulator models no malicious peer.
        let fetched_at = sched.want_priority(index).unwrap_or(Priority::Background);
        match sched.handle_chunk(now, &from, index, ChunkOutcome::Valid) {
            Delivery::Accept => self.commit(h, index, from, fetched_at),
            Delivery::Discard => self.hosts[h as usize].duplicate += len,
        }
        self.drain(h);
    }

    /// Stores a verified chunk, and so every chunk with the same content (the store keeps one
    /// copy, as a node's does): Have updates, waiting reads, background progress.
    fn commit(&mut self, h: u32, index: u32, from: NodeId, fetched_at: Priority) {
        let now = self.now();
        let len = self.chunk_len(index);
        let from_site = self.nodes[from as usize].site;
        let from_source = self.is_source(from);
        // Background chunks wait for the batch; a chunk a VM waited for goes out at once
        // (`wire::have_update_delay`).
        let urgent = have_update_delay(fetched_at).is_zero();
        let batch = self.sc.routing.have_batch;
        let host = &mut self.hosts[h as usize];
        if !host.store.insert(index) {
            return;
        }
        host.fetched += len;
        host.from_site[from_site] += len;
        if from_source {
            host.from_sources += len;
        }
        let mut copies = Vec::new();
        for &c in self.content.group(index) {
            if host.store.insert(c) {
                copies.push(c);
                if let Some(sched) = host.sched.as_mut() {
                    if sched.is_wanted(c) {
                        sched.handle_local_have(now, c);
                    }
                }
            }
        }
        let mut flush_now = false;
        if !host.have_peers.is_empty() {
            host.pending_have.push(index);
            host.pending_have.extend_from_slice(&copies);
            if urgent {
                flush_now = true;
            } else if !host.flush_armed {
                host.flush_armed = true;
                self.q.schedule_in(batch, Ev::HaveFlush(h));
            }
        }
        if flush_now {
            self.have_flush(h);
        }
        self.settle(h, index, Some((len, from_site)));
        for c in copies {
            self.settle(h, c, None);
        }
    }

    /// Starts host `h`'s VMs that were waiting for the host's copy or boot profile (`reading`
    /// but held back by the plan).
    fn start_waiting_vms(&mut self, h: u32, now: Instant) {
        let vms = self.hosts[h as usize].vms.clone();
        for v in vms {
            if self.vms[v as usize].reading {
                self.run_vm(v, now);
            }
        }
    }

    /// Chunk `index` is now held by host `h`: background progress, and the reads waiting for it
    /// (`fetched`: its size and the site it came from, when it was fetched rather than copied
    /// locally from a chunk with the same content).
    fn settle(&mut self, h: u32, index: u32, fetched: Option<(u64, usize)>) {
        let now = self.now();
        let in_target = match self.plan.background {
            Background::None => false,
            Background::All => true,
            Background::Profile => self.profile_set.contains(index),
        };
        let host = &mut self.hosts[h as usize];
        if self.plan.boot_after_profile && host.profile_left > 0 && self.profile_set.contains(index)
        {
            host.profile_left -= 1;
            if host.profile_left == 0 {
                self.start_waiting_vms(h, now);
            }
        }
        let host = &mut self.hosts[h as usize];
        if in_target && host.bg_left > 0 {
            host.bg_left -= 1;
            if host.bg_left == 0 {
                host.bg_done = Some(now);
                self.bg_left -= 1;
                if self.plan.boot_after_copy {
                    self.start_waiting_vms(h, now);
                }
            }
        }
        let Some(waiting) = self.hosts[h as usize].waiters.remove(&index) else {
            return;
        };
        if let (Some(&first), Some((len, from_site))) = (waiting.first(), fetched) {
            let vm = &mut self.vms[first as usize];
            vm.fetched += len;
            vm.from_site[from_site] += len;
        }
        for v in waiting {
            let vm = &mut self.vms[v as usize];
            vm.waiting -= 1;
            if vm.waiting == 0 {
                vm.next += 1;
                let more = vm.next < vm.reads.len();
                let think = if more {
                    self.think(v)
                } else {
                    std::time::Duration::ZERO
                };
                self.run_vm(v, now + self.sc.boot.read_service + think);
            }
        }
    }

    fn think(&mut self, v: u32) -> std::time::Duration {
        let mean = self.sc.boot.think_mean.as_secs_f64();
        let vm = &mut self.vms[v as usize];
        let recorded = vm.next.checked_sub(1).and_then(|i| vm.reads.get(i)?.1);
        match recorded {
            Some(d) => d,
            None => std::time::Duration::from_secs_f64(exponential(&mut vm.rng, mean)),
        }
    }

    pub(super) fn vm_start(&mut self, v: u32) {
        let now = self.now();
        let vm = &mut self.vms[v as usize];
        vm.reading = true;
        let h = vm.host as usize;
        if self.plan.boot_after_copy && self.hosts[h].bg_done.is_none() {
            return; // starts when the copy is complete
        }
        if self.plan.boot_after_profile
            && (self.hosts[h].started.is_none() || self.hosts[h].profile_left > 0)
        {
            return; // starts when the boot profile is staged
        }
        self.run_vm(v, now);
    }

    /// Continues VM `v`'s boot from read `next` at time `at` (>= now): reads whose chunks are all
    /// local complete after the export's service time (`boot.read_ms`; they stay local), so they
    /// are walked without events; the first read that needs chunks is issued when its time comes,
    /// and completes a service time after its last chunk arrives.
    pub(super) fn run_vm(&mut self, v: u32, mut at: Instant) {
        let now = self.now();
        let h = self.vms[v as usize].host as usize;
        loop {
            let vm = &self.vms[v as usize];
            if vm.boot_done.is_some() || vm.waiting > 0 {
                return;
            }
            let Some((read, _)) = vm.reads.get(vm.next) else {
                self.vms[v as usize].boot_done = Some(at);
                self.vms_left -= 1;
                return;
            };
            let range = self.manifest.chunks_for_range(read.offset, read.len);
            let store = &self.hosts[h].store;
            let local = range.clone().all(|c| store.contains(c));
            if local {
                let vm = &mut self.vms[v as usize];
                vm.issued += 1;
                vm.next += 1;
                at += self.sc.boot.read_service;
                if vm.next < vm.reads.len() {
                    at += self.think(v);
                }
                continue;
            }
            if at > now {
                self.q.schedule_at(at, Ev::ReadIssue(v));
                return;
            }
            let missing: Vec<u32> = range.filter(|&c| !store.contains(c)).collect();
            let vm = &mut self.vms[v as usize];
            vm.issued += 1;
            vm.waiting = missing.len() as u32;
            let host = &mut self.hosts[h];
            for &c in &missing {
                host.waiters.entry(c).or_default().push(v);
            }
            if let Some(sched) = host.sched.as_mut() {
                // Invariant: the manifest only yields indices below the chunk count.
                sched
                    .handle_want_many(now, missing.iter().copied(), Priority::Demand)
                    .expect("indices in range");
            }
            self.drain(h as u32);
            return;
        }
    }

    /// Carries out what host `h`'s scheduler asks for, and re-arms its timer.
    pub(super) fn drain(&mut self, h: u32) {
        let node = self.hosts[h as usize].node;
        let mut failed = Vec::new();
        let mut no_source = false;
        loop {
            let Some(sched) = self.hosts[h as usize].sched.as_mut() else {
                return;
            };
            let Some(action) = sched.poll_action() else {
                while let Some(ev) = sched.poll_event() {
                    match ev {
                        Event::NoSource { .. } => no_source = true,
                        Event::WantFailed { index, .. } => failed.push(index),
                        Event::PeerBanned { .. } => {}
                    }
                }
                break;
            };
            match action {
                Action::Request {
                    peer,
                    priority,
                    indices,
                } => {
                    self.counters.requests += 1;
                    self.counters.requested_chunks += indices.len() as u64;
                    self.send(node, peer, Msg::Request { priority, indices });
                }
                Action::Cancel { peer, indices } => {
                    self.counters.cancels += 1;
                    self.send(node, peer, Msg::Cancel { indices });
                }
                Action::AnnounceFetching { peer, indices } => {
                    self.send(node, peer, Msg::Fetching { indices });
                }
                Action::Need {
                    peer,
                    priority,
                    indices,
                } => {
                    self.counters.needs += 1;
                    self.send(node, peer, Msg::Need { priority, indices });
                }
            }
        }
        if no_source {
            self.counters.no_source_events += 1;
            if self.plan.peers {
                self.start_lookup(h);
            }
        }
        if !failed.is_empty() {
            let now = self.now();
            self.counters.want_failures += failed.len() as u64;
            let mut again = Vec::new();
            for index in failed {
                if let Some(waiting) = self.hosts[h as usize].waiters.get(&index) {
                    for &v in waiting {
                        self.vms[v as usize].failures += 1;
                    }
                    again.push(index);
                }
            }
            // The guest retries a failed read: want the chunks again.
            if let Some(sched) = self.hosts[h as usize].sched.as_mut() {
                if !again.is_empty() {
                    // Invariant: indices came from the scheduler itself.
                    sched
                        .handle_want_many(now, again.iter().copied(), Priority::Demand)
                        .expect("indices in range");
                    self.drain(h);
                    return;
                }
            }
        }
        self.arm_timer(h);
    }

    fn arm_timer(&mut self, h: u32) {
        let now = self.now();
        let host = &mut self.hosts[h as usize];
        let Some(next) = host.sched.as_ref().and_then(|s| s.poll_timeout()) else {
            return;
        };
        // Never re-arm at the current instant (a timer that fired and left its deadline at `now`
        // would spin); one nanosecond later changes nothing the protocol can observe.
        let next = next.max(now + std::time::Duration::from_nanos(1));
        if host.timer_at.is_none_or(|t| next < t || t <= now) {
            host.timer_at = Some(next);
            self.q.schedule_at(next, Ev::Timer(h));
        }
    }

    pub(super) fn timer(&mut self, h: u32) {
        let now = self.now();
        let host = &mut self.hosts[h as usize];
        if host.timer_at == Some(now) {
            host.timer_at = None;
        }
        let Some(sched) = host.sched.as_mut() else {
            return;
        };
        if sched.poll_timeout().is_some_and(|t| t <= now) {
            sched.handle_timeout(now);
            self.drain(h);
        } else {
            self.arm_timer(h);
        }
    }

    pub(super) fn have_flush(&mut self, h: u32) {
        let host = &mut self.hosts[h as usize];
        host.flush_armed = false;
        if host.pending_have.is_empty() {
            return;
        }
        let indices: Rc<[u32]> = std::mem::take(&mut host.pending_have).into();
        let node = host.node;
        // One event per destination site: every message to a site takes the same RTT/2.
        let mut by_site: Vec<Vec<NodeId>> = vec![Vec::new(); self.sc.sites.len()];
        for &peer in &self.hosts[h as usize].have_peers {
            by_site[self.nodes[peer as usize].site].push(peer);
        }
        self.counters.have_updates += self.hosts[h as usize].have_peers.len() as u64;
        for to in by_site.into_iter().filter(|v| !v.is_empty()) {
            let delay = self.rtt(node, to[0]) / 2;
            self.q.schedule_in(
                delay,
                Ev::HaveBatch {
                    from: node,
                    to: to.into_boxed_slice(),
                    indices: indices.clone(),
                },
            );
        }
    }
}
