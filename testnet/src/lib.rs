//! `vmswarm-testnet`: real `vmswarm serve` processes across emulated sites on one machine.
//!
//! Sites are network namespaces behind a router namespace; a userspace WAN emulator ([`wan`]) adds
//! the inter-site latency and bandwidth limits, and tc tbf shapes each node's NIC. Without the
//! permission to create namespaces it falls back to loopback addresses with no WAN emulation, and
//! says so. Everything created is recorded in a state file ([`state`]) so `down` removes all of it.

pub mod compare;
pub mod demo;
pub mod plan;
pub mod probe;
pub mod realboot;
pub mod run;
pub mod state;
pub mod sys;
pub mod up;
pub mod wan;
