//! `vmswarm-sim` command line.
fn main() {}
