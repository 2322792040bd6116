//! `vmswarm-sim`: the discrete-event simulator (issue #5). It will drive the same
//! `vmswarm-protocol` state machines as the node, in virtual time. Not built yet.

use clap::Parser;

/// Discrete-event simulator for vmswarm.
#[derive(Debug, Parser)]
#[command(name = "vmswarm-sim", version, about, long_about = None)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
    eprintln!("vmswarm-sim: the simulator is not built yet; see README.md");
    std::process::exit(2);
}
