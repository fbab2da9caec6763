//! Tollgate: authentication, quotas and token metering for LLM APIs, inside Envoy.
//!
//! Everything except `glue` and `abi` is pure logic: data in, decisions out, the clock
//! and the host passed in. It compiles and is unit-tested natively and on wasm32.
//! `gateway` holds the callbacks as functions of a `host::Host`, tested natively with
//! a host that fails on purpose; `glue` (the SDK's traits) and `abi` (the raw proxy-wasm
//! ABI, the only `unsafe` code) are compiled for `wasm32-wasip1` alone.
#![cfg_attr(not(test), deny(unsafe_code))]

pub mod auth;
pub mod config;
pub mod credentials;
pub mod ct;
pub mod events;
pub mod gateway;
pub mod header_map;
pub mod host;
pub mod identity;
pub mod jwk;
pub mod jwt;
pub mod keys;
pub mod lease;
pub mod limits;
pub mod remote_jwks;
pub mod remote_keys;
pub mod request;
pub mod response;
pub mod strip;
pub mod usage;

#[cfg(all(target_arch = "wasm32", target_os = "wasi"))]
mod abi;
#[cfg(all(target_arch = "wasm32", target_os = "wasi"))]
mod glue;

/// Version and git hash of this build, logged by `on_vm_start`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const GIT_HASH: &str = env!("TOLLGATE_GIT_HASH");
