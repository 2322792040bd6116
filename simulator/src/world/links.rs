//! Which links a chunk transfer crosses: the sender's NIC up, the receiver's NIC down, each site's
//! core if it has one, both sites' WAN links when it crosses sites, and the connection's
//! flow-control window when W / RTT is below both NICs (a window link shared by all flows of that
//! sender-receiver pair, created and dropped with them).

use super::{NodeId, Transfer, World};
use crate::net::{LinkClass, LinkId, MAX_PATH, Network};
use crate::scenario::Scenario;

/// A site's shared links.
#[derive(Debug, Clone, Copy)]
pub(super) struct SiteLinks {
    pub(super) wan_up: Option<LinkId>,
    pub(super) wan_down: Option<LinkId>,
    pub(super) core: Option<LinkId>,
}

pub(super) fn site_links(sc: &Scenario, net: &mut Network<Transfer>) -> Vec<SiteLinks> {
    sc.sites
        .iter()
        .enumerate()
        .map(|(i, s)| SiteLinks {
            wan_up: s
                .wan_up
                .map(|c| net.add_link(c, LinkClass::WanUp, i as u32)),
            wan_down: s
                .wan_down
                .map(|c| net.add_link(c, LinkClass::WanDown, i as u32)),
            core: s
                .core
                .map(|c| net.add_link(c, LinkClass::SiteCore, i as u32)),
        })
        .collect()
}

impl World {
    /// The links a transfer from `from` to `to` crosses (taking a reference on the window link).
    pub(super) fn path(&mut self, from: NodeId, to: NodeId) -> ([LinkId; MAX_PATH], usize) {
        let (a, b) = (&self.nodes[from as usize], &self.nodes[to as usize]);
        let mut p = [0; MAX_PATH];
        let mut n = 0;
        let mut push = |l: Option<LinkId>| {
            if let Some(l) = l {
                p[n] = l;
                n += 1;
            }
        };
        push(Some(a.up));
        push(Some(b.down));
        let (sa, sb) = (a.site, b.site);
        push(self.site_links[sa].core);
        if sa != sb {
            push(self.site_links[sa].wan_up);
            push(self.site_links[sb].wan_down);
            push(self.site_links[sb].core);
        }
        let cap = self.sc.window / self.rtt(from, to).as_secs_f64().max(1e-9);
        let nic = self
            .net
            .link(self.nodes[from as usize].up)
            .capacity
            .min(self.net.link(self.nodes[to as usize].down).capacity);
        if cap < nic {
            let net = &mut self.net;
            let entry = self
                .windows
                .entry((from, to))
                .or_insert_with(|| (net.add_link(cap, LinkClass::Window, from), 0));
            entry.1 += 1;
            p[n] = entry.0;
            n += 1;
        }
        (p, n)
    }

    /// Drops a transfer's reference on its window link (removing the link with the last one).
    pub(super) fn release_window(&mut self, from: NodeId, to: NodeId) {
        if let Some(entry) = self.windows.get_mut(&(from, to)) {
            entry.1 -= 1;
            if entry.1 == 0 {
                let link = entry.0;
                self.windows.remove(&(from, to));
                self.net.remove_link(link);
            }
        }
    }
}
