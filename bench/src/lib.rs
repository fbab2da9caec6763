//! Shared pieces of Tollgate's side-by-side benchmarks (`make bench`).
//!
//! The claim under test is that authentication and metering inside the gateway cost
//! about as much as Envoy's own C++ filters and far less than an out-of-process
//! `ext_authz` round trip. To make that comparison fair, every variant runs as one
//! listener of the *same* Envoy process, in front of the same upstreams, driven by
//! the same load generator settings, and the variants are interleaved round by round
//! so that drift on a shared, noisy machine hits them all alike.
//!
//! - [`variants`]: the credentials, the filter configs and the Envoy bootstrap with
//!   one listener per variant.
//! - [`load`]: runs `wrk` and `h2load` and parses what they print.
//! - [`sys`]: CPU time and memory of a process, machine facts.
//! - [`stats`]: medians and percentiles.
//! - [`native_host`]: an in-memory host for the filter's `gateway`, so whole requests
//!   run natively under callgrind (`auth-cost --mode path-key|path-metered`).
//! - [`sse_stream`]: the OpenAI stream the SSE throughput benches parse (shared with
//!   `bench/sse-wasm`).
//! - [`fleet`]: global limits on a harness fleet (overshoot) and a keep-alive
//!   HTTP/1.1 client for the lease-wait latency.

pub mod fleet;
pub mod load;
pub mod lua;
pub mod native_host;
pub mod sse_stream;
pub mod stats;
pub mod sys;
pub mod variants;
