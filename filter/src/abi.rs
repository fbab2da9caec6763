//! The `Host` of a real proxy (Envoy): the raw proxy-wasm ABI, every status returned as
//! an error. The SDK's `hostcalls::*` panic on statuses they do not expect (a trapped VM);
//! these declarations take the status as a plain `u32`, so even a status number the SDK's
//! `Status` enum lacks is an error here, not undefined behaviour.
//!
//! One exception: callouts go through the SDK's `hostcalls::dispatch_http_call`, because
//! only it registers the token with the SDK's dispatcher, which otherwise panics when the
//! answer arrives. Envoy's `proxy_http_call` returns Ok, BadArgument or InternalFailure
//! (unknown cluster, missing pseudo-header, async client refused) — all three handled by
//! the SDK without a panic — or InvalidMemoryAccess for pointers outside the VM's memory,
//! which slices of this module's own memory never are (README, "Delivery guarantees").

#![allow(unsafe_code)]

use std::hash::{BuildHasher, Hasher};
use std::ptr::{null, null_mut};
use std::time::Duration;

use crate::host::{serialize_pairs, Buffer, Host, HostError, HostResult, Level, Map};

// ABI numbers of the enums (proxy-wasm spec 0.2.1).
fn map_type(map: Map) -> u32 {
    match map {
        Map::RequestHeaders => 0,
        Map::ResponseHeaders => 2,
        Map::CallResponseHeaders => 6,
    }
}

fn buffer_type(buffer: Buffer) -> u32 {
    match buffer {
        Buffer::RequestBody => 0,
        Buffer::ResponseBody => 1,
        Buffer::CallResponseBody => 4,
        Buffer::PluginConfiguration => 7,
    }
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_log_level(return_level: *mut u32) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    fn proxy_set_buffer_bytes(
        buffer_type: u32,
        start: usize,
        size: usize,
        buffer_data: *const u8,
        buffer_size: usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(map_type: u32, return_map_data: *mut *mut u8, return_map_size: *mut usize) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
    fn proxy_set_header_map_pairs(map_type: u32, map_data: *const u8, map_size: usize) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    #[allow(clippy::too_many_arguments)]
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_done() -> u32;
    fn proxy_continue_stream(stream_type: u32) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
}

fn check(status: u32) -> HostResult<()> {
    if status == 0 {
        Ok(())
    } else {
        Err(HostError::from_status(status))
    }
}

/// Takes ownership of a buffer the host filled through this module's allocator.
///
/// SAFETY (of the callers): after an Ok status, `data`/`size` come from the host's call
/// of `proxy_on_memory_allocate`, the SDK's allocator, which returns a leaked
/// `Vec<u8>` of exactly `size` bytes; nobody else owns it. This is the SDK's own reader.
unsafe fn owned(data: *mut u8, size: usize) -> Option<Vec<u8>> {
    if data.is_null() {
        None
    } else {
        Some(Vec::from_raw_parts(data, size, size))
    }
}

/// The proxy the filter runs in. Zero-sized: every call goes straight to the host.
#[derive(Debug, Clone, Copy, Default)]
pub struct Abi;

impl Host for Abi {
    fn log_level(&self) -> HostResult<Level> {
        let mut level = 0u32;
        check(unsafe { proxy_get_log_level(&mut level) })?;
        Ok(match level {
            0 => Level::Trace,
            1 => Level::Debug,
            2 => Level::Info,
            3 => Level::Warn,
            4 => Level::Error,
            _ => Level::Critical,
        })
    }

    fn log(&self, level: Level, message: &str) {
        let _ = unsafe { proxy_log(level as u32, message.as_ptr(), message.len()) };
    }

    fn now(&self) -> HostResult<Duration> {
        let mut nanos = 0u64;
        check(unsafe { proxy_get_current_time_nanoseconds(&mut nanos) })?;
        Ok(Duration::from_nanos(nanos))
    }

    fn header_pairs(&self, map: Map) -> HostResult<Vec<u8>> {
        let mut data = null_mut();
        let mut size = 0usize;
        check(unsafe { proxy_get_header_map_pairs(map_type(map), &mut data, &mut size) })?;
        Ok(unsafe { owned(data, size) }.unwrap_or_default())
    }

    fn set_header(&self, map: Map, name: &str, value: Option<&str>) -> HostResult<()> {
        check(unsafe {
            match value {
                Some(v) => {
                    proxy_replace_header_map_value(map_type(map), name.as_ptr(), name.len(), v.as_ptr(), v.len())
                }
                None => proxy_remove_header_map_value(map_type(map), name.as_ptr(), name.len()),
            }
        })
    }

    fn set_header_pairs(&self, map: Map, pairs: &[(&str, &str)]) -> HostResult<()> {
        let data = crate::host::serialize_pairs(pairs);
        check(unsafe { proxy_set_header_map_pairs(map_type(map), data.as_ptr(), data.len()) })
    }

    fn buffer(&self, buffer: Buffer, start: usize, max: usize) -> HostResult<Option<Vec<u8>>> {
        let mut data = null_mut();
        let mut size = 0usize;
        match unsafe { proxy_get_buffer_bytes(buffer_type(buffer), start, max, &mut data, &mut size) } {
            0 => Ok(unsafe { owned(data, size) }),
            1 => Ok(None),
            status => Err(HostError::from_status(status)),
        }
    }

    fn set_buffer(&self, buffer: Buffer, start: usize, size: usize, data: &[u8]) -> HostResult<()> {
        check(unsafe { proxy_set_buffer_bytes(buffer_type(buffer), start, size, data.as_ptr(), data.len()) })
    }

    fn shared_get(&self, key: &str) -> HostResult<(Option<Vec<u8>>, Option<u32>)> {
        let mut data = null_mut();
        let mut size = 0usize;
        let mut cas = 0u32;
        match unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) } {
            0 => Ok((unsafe { owned(data, size) }, (cas != 0).then_some(cas))),
            1 => Ok((None, None)),
            status => Err(HostError::from_status(status)),
        }
    }

    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> HostResult<()> {
        check(unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas.unwrap_or(0)) })
    }

    fn dispatch(&self, cluster: &str, headers: &[(&str, &str)], body: &[u8], timeout: Duration) -> HostResult<u32> {
        // See the module docs: the SDK's call, for the dispatcher's token registration.
        proxy_wasm::hostcalls::dispatch_http_call(cluster, headers.to_vec(), Some(body), vec![], timeout)
            .map_err(|status| HostError::from_status(status as u32))
    }

    fn send_response(&self, status: u32, headers: &[(&str, &str)], body: &[u8]) -> HostResult<()> {
        let pairs = serialize_pairs(headers);
        check(unsafe {
            proxy_send_local_response(status, null(), 0, body.as_ptr(), body.len(), pairs.as_ptr(), pairs.len(), -1)
        })
    }

    fn set_tick_period(&self, period: Duration) -> HostResult<()> {
        let ms = u32::try_from(period.as_millis()).unwrap_or(u32::MAX);
        check(unsafe { proxy_set_tick_period_milliseconds(ms) })
    }

    fn env(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn plugin_id(&self) -> Option<String> {
        let property = |path: &[u8]| {
            let mut data = null_mut();
            let mut size = 0usize;
            match unsafe { proxy_get_property(path.as_ptr(), path.len(), &mut data, &mut size) } {
                0 => unsafe { owned(data, size) }.map(|b| String::from_utf8_lossy(&b).into_owned()),
                _ => None,
            }
        };
        let name = property(b"plugin_name");
        let root_id = property(b"plugin_root_id");
        (name.is_some() || root_id.is_some())
            .then(|| format!("{}/{}", name.unwrap_or_default(), root_id.unwrap_or_default()))
    }

    fn done(&self) -> HostResult<()> {
        check(unsafe { proxy_done() })
    }

    fn resume_request(&self) -> HostResult<()> {
        // Stream type 0: the HTTP request (proxy-wasm ABI 0.2.1).
        check(unsafe { proxy_continue_stream(0) })
    }

    fn set_effective_context(&self, context_id: u32) -> HostResult<()> {
        check(unsafe { proxy_set_effective_context(context_id) })
    }

    fn random_u64(&self) -> u64 {
        // std seeds `RandomState` from WASI random_get.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(self.now().unwrap_or_default().as_nanos());
        h.finish()
    }
}
