//! An empty Proxy-Wasm HTTP filter: every callback keeps its SDK default (Continue).
//! Measures the fixed per-request cost of a Rust Wasm filter in Envoy (see Cargo.toml).
//!
//! Configured with `{"host_calls": true}` it also makes, per request, exactly the host
//! calls any auth filter that strips the credential and passes the caller's identity
//! upstream must make (read the request headers; remove `authorization`; set the user
//! and groups headers), and nothing else: the floor of the Wasm ABI for that job.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType, Status};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { host_calls: false }) });
}}

struct Root {
    host_calls: bool,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = hostcalls::get_buffer(proxy_wasm::types::BufferType::PluginConfiguration, 0, usize::MAX);
        self.host_calls = matches!(config, Ok(Some(c)) if c.windows(10).any(|w| w == b"host_calls"));
        true
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        if self.host_calls {
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
