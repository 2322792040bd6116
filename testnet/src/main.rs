//! `vmswarm-testnet`: real node processes across emulated sites (issue #6). Not built yet.

use clap::Parser;

/// Runs real vmswarm nodes across emulated sites on one machine.
#[derive(Debug, Parser)]
#[command(name = "vmswarm-testnet", version, about, long_about = None)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
    eprintln!("vmswarm-testnet: the testnet is not built yet; see README.md");
    std::process::exit(2);
}
