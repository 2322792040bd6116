//! `vmswarm`: the node binary operators run on every compute node.
//!
//! This crate will hold the libp2p swarm, the chunk store, the NBD server and the control socket
//! (issue #3 and #4). It drives the state machines of `vmswarm-protocol` and makes no scheduling
//! decision of its own. Until the daemon lands, the binary only reports its version and the wire
//! protocol version it speaks.

use clap::Parser;

/// Peer-to-peer VM image distribution node.
#[derive(Debug, Parser)]
#[command(name = "vmswarm", version, about, long_about = None)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
    println!(
        "vmswarm {} (wire protocol v{}): the node daemon is not built yet; see README.md",
        env!("CARGO_PKG_VERSION"),
        vmswarm_protocol::wire::PROTOCOL_VERSION
    );
    std::process::exit(2);
}
