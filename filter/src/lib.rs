//! Tollgate: authentication, quotas and token metering for LLM APIs, inside Envoy.
//!
//! Everything except `glue` is pure logic: data in, decisions out, the clock passed
//! as an argument. It compiles and is unit-tested natively and on wasm32. Only `glue`
//! touches proxy-wasm, and it is compiled for `wasm32-wasip1` alone.
//! The one `unsafe` block is in `glue` (reading the host's header buffer in place).
#![cfg_attr(not(test), deny(unsafe_code))]

pub mod auth;
pub mod config;
pub mod credentials;
pub mod ct;
pub mod events;
pub mod header_map;
pub mod identity;
pub mod jwt;
pub mod keys;
pub mod limits;
pub mod response;
pub mod strip;
pub mod usage;

#[cfg(all(target_arch = "wasm32", target_os = "wasi"))]
mod glue;

/// Version and git hash of this build, logged by `on_vm_start`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const GIT_HASH: &str = env!("TOLLGATE_GIT_HASH");
