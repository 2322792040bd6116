//! The vmswarm node as a library, so that the `vmswarm` binary, integration tests and benchmarks
//! share one implementation.
//!
//! - [`store`]: the durable, content-addressed chunk store (chunks, manifests, import/export, the
//!   data-dir lock).

pub mod store;
