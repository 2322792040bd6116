//! The strategies, as the only thing that differs between them: which wants and which peers a
//! host's fetch scheduler is given, and when its VMs may start reading. Everything else (which
//! chunk, from whom, in what order it is served) is the protocol's, identical for all of them.
//!
//! `multicast` is the node's `vmswarm stage` followed by a group boot: every host pulls the whole
//! image at Background priority, boot profile first (what a staged node does), and its VMs start
//! once the boot profile's chunks are all local, reading the rest on demand meanwhile if they
//! touch it. Its full copy is the stage's completion, held to the Kumar-Ross bound.

use crate::scenario::{Prefetch, Scenario, Strategy};

/// What a host fetches in the background (at Background priority) from the moment it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Background {
    /// Nothing.
    None,
    /// Every chunk of the image.
    All,
    /// The chunks of the boot profile.
    Profile,
}

/// How hosts behave under a strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Connect to other hosts (found by content routing), not only to the source servers.
    pub peers: bool,
    /// What is wanted at Background priority when the host starts.
    pub background: Background,
    /// Hand the scheduler the boot profile as its Background order.
    pub profile_order: bool,
    /// VMs start reading only after the whole image is local (reads are then all local).
    pub boot_after_copy: bool,
    /// VMs start reading only after every chunk of the boot profile is local.
    pub boot_after_profile: bool,
}

impl Plan {
    /// The plan of a scenario's strategy (and, for vmswarm, its prefetch options).
    pub fn of(sc: &Scenario) -> Plan {
        match sc.strategy {
            Strategy::Central => Plan {
                peers: false,
                background: Background::All,
                profile_order: false,
                boot_after_copy: true,
                boot_after_profile: false,
            },
            Strategy::SwarmFull => Plan {
                peers: true,
                background: Background::All,
                profile_order: false,
                boot_after_copy: true,
                boot_after_profile: false,
            },
            Strategy::LazyCentral => Plan {
                peers: false,
                background: Background::None,
                profile_order: false,
                boot_after_copy: false,
                boot_after_profile: false,
            },
            Strategy::Multicast => Plan {
                peers: true,
                background: Background::All,
                profile_order: true,
                boot_after_copy: false,
                boot_after_profile: true,
            },
            Strategy::Vmswarm => Plan {
                peers: true,
                background: match sc.prefetch {
                    Prefetch::None => Background::None,
                    Prefetch::Profile => Background::Profile,
                    Prefetch::All => Background::All,
                },
                profile_order: sc.boot_profile || sc.prefetch == Prefetch::Profile,
                boot_after_copy: false,
                boot_after_profile: false,
            },
        }
    }

    /// Whether this is a full-copy strategy (the Kumar-Ross bound applies).
    pub fn full_copy(&self) -> bool {
        self.boot_after_copy || self.boot_after_profile
    }
}
