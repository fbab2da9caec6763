//! What the filter needs from its host, as a trait, so the decisions around every host
//! call (`gateway`) compile natively and are tested against a host that fails on
//! purpose (`gateway::tests`).
//!
//! Why: the proxy-wasm SDK's `hostcalls::*` and trait helpers `panic!` on any status
//! they do not expect, and a panic traps the worker's VM (with FAIL_CLOSE every later
//! request of that worker gets a 503). Envoy answers `BadArgument` where a header map or
//! buffer does not exist, e.g. the response maps of a callout that failed (reset,
//! timeout). Every method here returns an error instead; the wasm implementation
//! (`abi`) calls the raw ABI and never panics.

use std::time::Duration;

/// A host status other than Ok, as the filter handles it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostError {
    NotFound,
    BadArgument,
    CasMismatch,
    /// Any other status (its ABI number).
    Other(u32),
}

impl HostError {
    /// From a proxy-wasm ABI status number (0 is Ok and never reaches here).
    pub fn from_status(status: u32) -> HostError {
        match status {
            1 => HostError::NotFound,
            2 => HostError::BadArgument,
            8 => HostError::CasMismatch,
            n => HostError::Other(n),
        }
    }
}

pub type HostResult<T> = Result<T, HostError>;

/// Header maps the filter reads or edits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Map {
    RequestHeaders,
    ResponseHeaders,
    CallResponseHeaders,
}

/// Buffers the filter reads or edits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buffer {
    RequestBody,
    ResponseBody,
    CallResponseBody,
    PluginConfiguration,
}

/// Log levels, in the host's order (trace = 0 … critical = 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Trace = 0,
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

/// The host calls the filter makes. One implementation per host: the raw proxy-wasm
/// ABI in Envoy (`abi`), a scripted fake in tests.
pub trait Host {
    /// The host's log level (lines below it are dropped, so they are never formatted).
    fn log_level(&self) -> HostResult<Level>;
    fn log(&self, level: Level, message: &str);
    /// Wall-clock time since the Unix epoch.
    fn now(&self) -> HostResult<Duration>;
    /// A whole header map in the host's serialization (see `header_map::parse`).
    fn header_pairs(&self, map: Map) -> HostResult<Vec<u8>>;
    /// Replaces every copy of a header (`Some`) or removes every copy (`None`).
    fn set_header(&self, map: Map, name: &str, value: Option<&str>) -> HostResult<()>;
    /// Replaces the whole map with `pairs`, in order: one host call for many edits.
    fn set_header_pairs(&self, map: Map, pairs: &[(&str, &str)]) -> HostResult<()>;
    /// Up to `max` bytes of a buffer from `start`; `None` when it is empty or absent.
    fn buffer(&self, buffer: Buffer, start: usize, max: usize) -> HostResult<Option<Vec<u8>>>;
    /// Replaces `size` bytes at `start` with `data`.
    fn set_buffer(&self, buffer: Buffer, start: usize, size: usize, data: &[u8]) -> HostResult<()>;
    /// A shared-data value (process-wide) and its CAS token.
    fn shared_get(&self, key: &str) -> HostResult<(Option<Vec<u8>>, Option<u32>)>;
    /// Writes a shared-data value if its CAS token still matches (`CasMismatch` otherwise).
    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> HostResult<()>;
    /// Starts an HTTP callout; the answer (or failure) comes to the context that made it
    /// (the root context, or a stream waiting for a lease).
    fn dispatch(&self, cluster: &str, headers: &[(&str, &str)], body: &[u8], timeout: Duration) -> HostResult<u32>;
    /// Answers the request from the filter (the caller then returns `Pause`).
    fn send_response(&self, status: u32, headers: &[(&str, &str)], body: &[u8]) -> HostResult<()>;
    fn set_tick_period(&self, period: Duration) -> HostResult<()>;
    /// An environment variable of the VM (Istio's `vmConfig.env`).
    fn env(&self, name: &str) -> Option<String>;
    /// Random bits from the VM's entropy.
    fn random_u64(&self) -> u64;
    /// What names this plugin across config pushes: its name and root id (Istio:
    /// `<ns>.<WasmPlugin name>` and `pluginName`), if the host says.
    fn plugin_id(&self) -> Option<String>;
    /// Tells the host that a root context which answered `on_done` with false is done.
    fn done(&self) -> HostResult<()>;
    /// Resumes the request of the current stream, paused in its headers or body.
    fn resume_request(&self) -> HostResult<()>;
    /// Makes later host calls act on context `context_id` (another stream of this VM).
    fn set_effective_context(&self, context_id: u32) -> HostResult<()>;
}

/// The host's serialization of a header list (count, then sizes, then NUL-terminated
/// names and values), as `proxy_send_local_response` and `proxy_http_call` take it.
pub fn serialize_pairs(pairs: &[(&str, &str)]) -> Vec<u8> {
    let size = 4 + pairs.iter().map(|(k, v)| k.len() + v.len() + 10).sum::<usize>();
    let mut out = Vec::with_capacity(size);
    let len = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
    out.extend_from_slice(&len(pairs.len()));
    for (k, v) in pairs {
        out.extend_from_slice(&len(k.len()));
        out.extend_from_slice(&len(v.len()));
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn pairs_round_trip_through_the_parser() {
        let pairs = [(":status", "200"), ("content-type", "application/json"), ("x-empty", "")];
        let bytes = serialize_pairs(&pairs);
        let parsed = crate::header_map::parse(&bytes).unwrap();
        let got: Vec<(&str, &str)> = parsed.iter().map(|(k, v)| (k.as_ref(), v.as_ref())).collect();
        assert_eq!(got, pairs);
        assert_eq!(serialize_pairs(&[]), 0u32.to_le_bytes());
    }

    #[test]
    fn statuses() {
        let cases = [
            (1, HostError::NotFound),
            (2, HostError::BadArgument),
            (8, HostError::CasMismatch),
            (10, HostError::Other(10)),
            (12, HostError::Other(12)),
        ];
        for (n, want) in cases {
            assert_eq!(HostError::from_status(n), want);
        }
    }
}
