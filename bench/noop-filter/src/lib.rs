//! An empty Proxy-Wasm HTTP filter: every callback keeps its SDK default (Continue).
//! Measures the fixed per-request cost of a Rust Wasm filter in Envoy (see Cargo.toml).
//!
//! Configured with `{"host_calls": true}` it also makes, per request, exactly the host
//! calls any auth filter that strips the credential and passes the caller's identity
//! upstream must make (read the request headers; remove `authorization`; set the user
//! and groups headers), and nothing else: the floor of the Wasm ABI for that job.
//! With `{"host_calls": "bulk"}` it does the same edits with one call that replaces the
//! whole header map (`proxy_set_header_map_pairs`) instead of three single edits.
//!
//! With `"meter": true` as well (variant m) it also makes exactly the host calls
//! metering must make, and nothing else: the response headers read in one call (the
//! status and content type), each response body chunk copied into the VM
//! (`get_buffer_bytes`; not parsed), the clock read for the event at `on_log`, where a
//! fixed usage event is appended to the worker's queue, and one `dispatch_http_call`
//! per flush (`on_tick`, every 500 ms) posting the queued events to the tracker
//! (`"cluster"`, `"authority"`, `"path"` in the config). With `"limits": true` too
//! (variant m', the floor of Tollgate with limits and metering): the clock and a
//! shared-data read plus compare-and-swap write to admit at the request headers, the
//! same again to settle at `on_log`, the six `x-ratelimit-*` response headers set (a
//! request and a token limit, as the bench's (e)), and a request body chunk copied into
//! the VM (the reservation reads `max_tokens`).

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, Status};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Default)]
struct Root {
    host_calls: bool,
    bulk: bool,
    meter: Option<Rc<Meter>>,
}

/// The metering floor's state, one per root context (per worker).
#[derive(Default)]
struct Meter {
    limits: bool,
    cluster: String,
    authority: String,
    path: String,
    /// Queued events (JSON), at most [`MAX_QUEUE`].
    queue: RefCell<Vec<String>>,
    /// Event ids: a per-VM prefix (the clock at configure time) and a counter.
    prefix: u64,
    next: RefCell<u64>,
}

/// The string value of `"name":"…"` in the (flat, unescaped) plugin config.
fn config_str(config: &[u8], name: &str) -> String {
    let key = format!("\"{name}\":\"");
    let Some(at) = config.windows(key.len()).position(|w| w == key.as_bytes()) else { return String::new() };
    let rest = config.get(at + key.len()..).unwrap_or_default();
    let end = rest.iter().position(|&b| b == b'"').unwrap_or(rest.len());
    String::from_utf8_lossy(rest.get(..end).unwrap_or_default()).into_owned()
}

fn config_true(config: &[u8], name: &str) -> bool {
    let key = format!("\"{name}\":true");
    config.windows(key.len()).any(|w| w == key.as_bytes())
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX);
        let config = config.ok().flatten().unwrap_or_default();
        self.host_calls = config.windows(10).any(|w| w == b"host_calls");
        self.bulk = config.windows(4).any(|w| w == b"bulk");
        if config_true(&config, "meter") {
            let prefix = hostcalls::get_current_time()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos() as u64);
            self.meter = Some(Rc::new(Meter {
                limits: config_true(&config, "limits"),
                cluster: config_str(&config, "cluster"),
                authority: config_str(&config, "authority"),
                path: config_str(&config, "path"),
                prefix,
                ..Meter::default()
            }));
            let _ = hostcalls::set_tick_period(Duration::from_millis(500));
        }
        true
    }

    /// One batched callout per [`MAX_BATCH`] queued events per flush (the filter's
    /// `usage.max_batch` default; the tracker takes at most 1 MiB per body).
    fn on_tick(&mut self) {
        let Some(meter) = &self.meter else { return };
        let mut queue = meter.queue.borrow_mut();
        for batch in queue.chunks(MAX_BATCH) {
            let mut body = Vec::with_capacity(batch.iter().map(|e| e.len() + 1).sum::<usize>() + 2);
            body.push(b'[');
            for (i, event) in batch.iter().enumerate() {
                if i > 0 {
                    body.push(b',');
                }
                body.extend_from_slice(event.as_bytes());
            }
            body.push(b']');
            let headers = vec![
                (":method", "POST"),
                (":path", meter.path.as_str()),
                (":authority", meter.authority.as_str()),
                ("content-type", "application/json"),
            ];
            let _ = hostcalls::dispatch_http_call(&meter.cluster, headers, Some(&body), vec![], Duration::from_secs(1));
        }
        queue.clear();
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        if let Some(meter) = &self.meter {
            Some(Box::new(Metered { meter: Rc::clone(meter) }))
        } else if self.bulk {
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
    fn proxy_get_header_map_pairs(
        map_type: MapType,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> Status;
}

/// A serialized header map, not parsed (the floor reads it and no more).
fn header_bytes(map: MapType) -> Vec<u8> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: as the SDK's get_map_bytes: the host returns a buffer it allocated through
    // this module's proxy_on_memory_allocate, of `size` bytes.
    unsafe {
        match proxy_get_header_map_pairs(map, &mut data, &mut size) {
            Status::Ok if !data.is_null() => Vec::from_raw_parts(data, size, size),
            _ => Vec::new(),
        }
    }
}

/// (h')'s four host calls: read the request headers, remove the credential, set the
/// user and the groups.
fn auth_host_calls() {
    let headers = header_bytes(MapType::HttpRequestHeaders);
    if headers.windows(13).any(|w| w == b"authorization") {
        let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, "authorization", None);
    }
    let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, "x-tollgate-user", Some("user50"));
    let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, "x-tollgate-groups", Some("bench"));
}

impl HttpContext for HostCalls {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        auth_host_calls();
        Action::Continue
    }
}

/// (m) and (m'): the auth floor plus the metering (and limits) floor.
struct Metered {
    meter: Rc<Meter>,
}

impl Context for Metered {}

const LIMIT_KEY: &str = "floor-limit";
/// Events per report (the filter's `usage.max_batch` default)…
const MAX_BATCH: usize = 500;
/// …and held per worker (its `usage.max_queue` default).
const MAX_QUEUE: usize = 10_000;

/// What a limit must do with its state: read it, write it back with compare-and-swap.
fn limit_update() {
    let _ = hostcalls::get_current_time();
    if let Ok((value, cas)) = hostcalls::get_shared_data(LIMIT_KEY) {
        let mut v = value.unwrap_or_default();
        v.resize(16, 0);
        if let Some(b) = v.first_mut() {
            *b = b.wrapping_add(1);
        }
        let _ = hostcalls::set_shared_data(LIMIT_KEY, Some(&v), cas);
    }
}

impl HttpContext for Metered {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        auth_host_calls();
        if self.meter.limits {
            limit_update();
        }
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        if self.meter.limits && body_size > 0 {
            let _ = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size);
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if self.meter.limits {
            for (name, value) in [
                ("x-ratelimit-limit-requests", "100000000"),
                ("x-ratelimit-remaining-requests", "99999999"),
                ("x-ratelimit-reset-requests", "0s"),
                ("x-ratelimit-limit-tokens", "1000000000000"),
                ("x-ratelimit-remaining-tokens", "999999999999"),
                ("x-ratelimit-reset-tokens", "1m0s"),
            ] {
                let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, Some(value));
            }
        }
        let _ = header_bytes(MapType::HttpResponseHeaders);
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        if body_size > 0 {
            let _ = hostcalls::get_buffer(BufferType::HttpResponseBody, 0, body_size);
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        let ts = hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0.0, |d| d.as_secs_f64());
        if self.meter.limits {
            limit_update();
        }
        let n = {
            let mut next = self.meter.next.borrow_mut();
            *next += 1;
            *next
        };
        let event = format!(
            "{{\"id\":\"{:016x}-{n}\",\"ts\":{ts:.3},\"user\":\"floor\",\"groups\":[\"bench\"],\"method\":\"GET\",\"host\":\"bench\",\"path\":\"/bench\",\"status\":200,\"prompt_tokens\":0,\"completion_tokens\":0,\"cached_tokens\":0,\"reasoning_tokens\":0,\"incomplete\":false,\"usage_missing\":true,\"usage_estimated\":false,\"denied\":null}}",
            self.meter.prefix
        );
        let mut queue = self.meter.queue.borrow_mut();
        if queue.len() < MAX_QUEUE {
            queue.push(event);
        }
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
        let raw = header_bytes(MapType::HttpRequestHeaders);
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
