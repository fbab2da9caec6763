//! An empty Proxy-Wasm HTTP filter: every callback keeps its SDK default (Continue).
//! Measures the fixed per-request cost of a Rust Wasm filter in Envoy (see Cargo.toml).
//!
//! Configured with `{"host_calls": true}` it also makes, per request, exactly the host
//! calls any auth filter that strips the credential and passes the caller's identity
//! upstream must make (read the request headers; remove `authorization`; set the user
//! and groups headers), and nothing else: the floor of the Wasm ABI for that job.
//! With `{"host_calls": "bulk"}` it does the same edits with one call that replaces the
//! whole header map (`proxy_set_header_map_pairs`) instead of three single edits.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType, Status};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { host_calls: false, bulk: false }) });
}}

struct Root {
    host_calls: bool,
    bulk: bool,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = hostcalls::get_buffer(proxy_wasm::types::BufferType::PluginConfiguration, 0, usize::MAX);
        let config = config.ok().flatten().unwrap_or_default();
        self.host_calls = config.windows(10).any(|w| w == b"host_calls");
        self.bulk = config.windows(4).any(|w| w == b"bulk");
        true
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        if self.bulk {
            Some(Box::new(Bulk))
        } else if self.host_calls {
            Some(Box::new(HostCalls))
        } else {
            Some(Box::new(Noop))
        }
    }
}

struct Noop;

impl Context for Noop {}

impl HttpContext for Noop {}

struct HostCalls;

impl Context for HostCalls {}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_pairs(map_type: MapType, return_map_data: *mut *mut u8, return_map_size: *mut usize)
        -> Status;
}

/// The serialized request headers, not parsed (the floor reads them and no more).
fn header_bytes() -> Vec<u8> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: as the SDK's get_map_bytes: the host returns a buffer it allocated through
    // this module's proxy_on_memory_allocate, of `size` bytes.
    unsafe {
        match proxy_get_header_map_pairs(MapType::HttpRequestHeaders, &mut data, &mut size) {
            Status::Ok if !data.is_null() => Vec::from_raw_parts(data, size, size),
            _ => Vec::new(),
        }
    }
}

impl HttpContext for HostCalls {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let headers = header_bytes();
        if headers.windows(13).any(|w| w == b"authorization") {
            let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, "authorization", None);
        }
        let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, "x-tollgate-user", Some("user50"));
        let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, "x-tollgate-groups", Some("bench"));
        Action::Continue
    }
}

struct Bulk;

impl Context for Bulk {}

/// (name, value) slices of a serialized header map; empty on a malformed buffer.
fn pairs(buf: &[u8]) -> Vec<(&[u8], &[u8])> {
    let u32_at = |at: usize| buf.get(at..at + 4).and_then(|b| <[u8; 4]>::try_from(b).ok()).map(u32::from_le_bytes);
    let Some(n) = u32_at(0).map(|n| n as usize) else { return Vec::new() };
    let mut out = Vec::with_capacity(n);
    let mut at = 4 + n * 8;
    for i in 0..n {
        let (Some(k), Some(v)) = (u32_at(4 + i * 8), u32_at(8 + i * 8)) else { return Vec::new() };
        let (k, v) = (k as usize, v as usize);
        let (Some(name), Some(value)) = (buf.get(at..at + k), buf.get(at + k + 1..at + k + 1 + v)) else {
            return Vec::new();
        };
        out.push((name, value));
        at += k + v + 2;
    }
    out
}

impl HttpContext for Bulk {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let raw = header_bytes();
        let mut map: Vec<(&str, &[u8])> = pairs(&raw)
            .into_iter()
            .filter(|(k, _)| !matches!(*k, b"authorization" | b"x-tollgate-user" | b"x-tollgate-groups"))
            .filter_map(|(k, v)| Some((std::str::from_utf8(k).ok()?, v)))
            .collect();
        map.push(("x-tollgate-user", b"user50"));
        map.push(("x-tollgate-groups", b"bench"));
        let _ = hostcalls::set_map_bytes(MapType::HttpRequestHeaders, map);
        Action::Continue
    }
}
