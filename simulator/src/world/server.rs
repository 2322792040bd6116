//! The serving side of a node: requests into its [`ServeQueue`](vmswarm_protocol::serve::ServeQueue),
//! chunks out as flows, cancels, and the byte accounting of finished flows.

use vmswarm_protocol::Priority;
use vmswarm_protocol::fetch::{ARRIVING_REPORT_AFTER, RejectKind};
use vmswarm_protocol::serve::Queued;

use super::{Ev, Msg, NodeId, Transfer, World, chunk_id, chunk_index};

impl World {
    fn holds(&self, node: NodeId, index: u32) -> bool {
        match self.host_of(node) {
            None => true,
            Some(h) => self.hosts[h as usize].store.contains(index),
        }
    }

    pub(super) fn on_request(
        &mut self,
        server: NodeId,
        from: NodeId,
        priority: Priority,
        indices: Vec<u32>,
    ) {
        let mut ids = Vec::with_capacity(indices.len());
        let mut kept = Vec::with_capacity(indices.len());
        for index in indices {
            if !self.holds(server, index) {
                self.send(
                    server,
                    from,
                    Msg::Reject {
                        index,
                        kind: RejectKind::NotFound,
                    },
                );
                continue;
            }
            if self.nodes[server as usize]
                .sending
                .contains_key(&(from, index))
            {
                continue; // already on its way
            }
            ids.push(chunk_id(index));
            kept.push(index);
        }
        if ids.is_empty() {
            return;
        }
        let now = self.now();
        let results = self.nodes[server as usize]
            .serve
            .handle_request(now, &from, priority, &ids);
        for (index, r) in kept.into_iter().zip(results) {
            let kind = match r {
                Queued::Busy => {
                    self.counters.busy_rejects += 1;
                    RejectKind::Busy
                }
                Queued::Relay => {
                    self.counters.fanout_rejects += 1;
                    RejectKind::Fanout
                }
                Queued::Queued | Queued::Upgraded | Queued::Duplicate => continue,
            };
            self.send(server, from, Msg::Reject { index, kind });
        }
        self.pump(server);
    }

    /// A `Cancel` withdraws queued requests only. A chunk already written into the connection is
    /// in the stream and goes out whole, as on the node's lanes (`node/src/net/lane.rs`); the
    /// requester's scheduler takes it like any copy (`on_chunk`).
    pub(super) fn on_cancel(&mut self, server: NodeId, from: NodeId, indices: &[u32]) {
        let ids: Vec<_> = indices.iter().map(|&i| chunk_id(i)).collect();
        self.nodes[server as usize].serve.handle_cancel(&from, &ids);
    }

    /// Starts sending whatever the serve queue hands out.
    pub(super) fn pump(&mut self, server: NodeId) {
        let now = self.now();
        while let Some(serve) = self.nodes[server as usize].serve.poll_next() {
            let index = chunk_index(&serve.chunk);
            let to = serve.peer;
            let (path, n) = self.path(server, to);
            let size = self.chunk_len(index);
            let flow = self.net.start(
                now,
                &path[..n],
                size,
                Transfer {
                    from: server,
                    to,
                    index,
                    priority: serve.priority,
                },
            );
            self.nodes[server as usize]
                .sending
                .insert((to, index), flow);
            // A chunk still on its way after ARRIVING_REPORT_AFTER is reported as arriving, as
            // the node's lane does once it has read the chunk's header that long ago.
            self.q.schedule_in(
                ARRIVING_REPORT_AFTER,
                Ev::ArrivingCheck {
                    server,
                    to,
                    index,
                    flow,
                },
            );
            // Written into the connection's send buffer: the slot is free again, unless the
            // buffer is full (see the module docs of `world`).
            if self.write_chunk(server, to, flow, size as f64) {
                self.nodes[server as usize].serve.handle_sent();
            } else {
                self.counters.writes_waited += 1;
            }
        }
    }

    pub(super) fn flow_done(&mut self, flow: u32) {
        let now = self.now();
        let Some((t, size)) = self.net.complete(now, flow) else {
            return;
        };
        self.account(t, size as f64, false);
        let slots = self.release_window(t.from, t.to, flow, size as f64, size as f64);
        let server = &mut self.nodes[t.from as usize];
        for _ in 0..slots {
            server.serve.handle_sent();
        }
        server.sending.remove(&(t.to, t.index));
        self.send(t.from, t.to, Msg::Chunk { index: t.index });
        self.pump(t.from);
    }

    /// Counts `bytes` of a transfer as sent and received (and as crossing the WAN if it did).
    pub(super) fn account(&mut self, t: Transfer, bytes: f64, wasted: bool) {
        self.counters.bytes_sent += bytes;
        if wasted {
            self.counters.bytes_wasted += bytes;
        } else {
            self.counters.bytes_in_transit += bytes;
        }
        self.nodes[t.from as usize].uploaded += bytes;
        let (sa, sb) = (
            self.nodes[t.from as usize].site,
            self.nodes[t.to as usize].site,
        );
        if sa != sb {
            self.wan_out[sa] += bytes;
            self.wan_in[sb] += bytes;
            let gateway = self
                .host_of(t.to)
                .and_then(|h| self.hosts[h as usize].sched.as_ref())
                .is_some_and(|s| s.is_site_gateway());
            if gateway {
                self.counters.wan_in_gateway_bytes += bytes;
            } else if t.priority == Priority::Demand {
                self.counters.wan_in_demand_bytes += bytes;
            }
        }
    }
}
