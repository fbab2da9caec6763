//! A native, in-memory [`Host`] for the filter's `gateway`, so a whole request (its
//! callbacks in Envoy's order, with the host calls they make) runs natively under
//! callgrind: the instructions of Tollgate's own code per request, without the Wasm VM
//! and without the noise of a shared machine (`auth-cost --mode path-…`).
//!
//! Host calls cost nothing here beyond copying, so counts are the filter's side only.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::time::Duration;

use tollgate_filter::host::{serialize_pairs, Buffer, Host, HostError, HostResult, Level, Map};

/// Maps and buffers of one stream at a time, shared data, and the callouts made.
#[derive(Default)]
pub struct NativeHost {
    pub config: Vec<u8>,
    pub request_headers: RefCell<Vec<(String, String)>>,
    pub response_headers: RefCell<Vec<(String, String)>>,
    pub request_body: RefCell<Vec<u8>>,
    pub response_body: RefCell<Vec<u8>>,
    pub call_response_body: RefCell<Vec<u8>>,
    pub shared: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    pub callouts: Cell<u32>,
    pub replies: Cell<u32>,
    pub clock_ms: Cell<u64>,
}

impl NativeHost {
    fn map(&self, map: Map) -> Option<&RefCell<Vec<(String, String)>>> {
        match map {
            Map::RequestHeaders => Some(&self.request_headers),
            Map::ResponseHeaders => Some(&self.response_headers),
            Map::CallResponseHeaders => None,
        }
    }
}

impl Host for NativeHost {
    fn log_level(&self) -> HostResult<Level> {
        Ok(Level::Warn)
    }
    fn log(&self, _level: Level, _message: &str) {}
    fn now(&self) -> HostResult<Duration> {
        Ok(Duration::from_millis(self.clock_ms.get()))
    }
    fn header_pairs(&self, map: Map) -> HostResult<Vec<u8>> {
        match self.map(map) {
            Some(m) => {
                let m = m.borrow();
                let pairs: Vec<(&str, &str)> = m.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                Ok(serialize_pairs(&pairs))
            }
            None => Ok(serialize_pairs(&[(":status", "200")])),
        }
    }
    fn set_header(&self, map: Map, name: &str, value: Option<&str>) -> HostResult<()> {
        let m = self.map(map).ok_or(HostError::BadArgument)?;
        let mut m = m.borrow_mut();
        m.retain(|(k, _)| k != name);
        if let Some(v) = value {
            m.push((name.to_string(), v.to_string()));
        }
        Ok(())
    }
    fn set_header_pairs(&self, map: Map, pairs: &[(&str, &str)]) -> HostResult<()> {
        let m = self.map(map).ok_or(HostError::BadArgument)?;
        *m.borrow_mut() = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Ok(())
    }
    fn buffer(&self, buffer: Buffer, start: usize, max: usize) -> HostResult<Option<Vec<u8>>> {
        let data = match buffer {
            Buffer::RequestBody => self.request_body.borrow(),
            Buffer::ResponseBody => self.response_body.borrow(),
            Buffer::CallResponseBody => self.call_response_body.borrow(),
            Buffer::PluginConfiguration => return Ok(Some(self.config.clone())),
        };
        let end = start.saturating_add(max).min(data.len());
        Ok(data.get(start..end).filter(|d| !d.is_empty()).map(<[u8]>::to_vec))
    }
    fn set_buffer(&self, buffer: Buffer, start: usize, size: usize, data: &[u8]) -> HostResult<()> {
        let mut body = match buffer {
            Buffer::RequestBody => self.request_body.borrow_mut(),
            Buffer::ResponseBody => self.response_body.borrow_mut(),
            _ => return Err(HostError::BadArgument),
        };
        if start == 0 {
            let size = size.min(body.len());
            body.splice(..size, data.iter().copied());
        } else {
            body.extend_from_slice(data);
        }
        Ok(())
    }
    fn shared_get(&self, key: &str) -> HostResult<(Option<Vec<u8>>, Option<u32>)> {
        Ok(match self.shared.borrow().get(key) {
            Some((v, cas)) => (Some(v.clone()), Some(*cas)),
            None => (None, None),
        })
    }
    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> HostResult<()> {
        let mut shared = self.shared.borrow_mut();
        let entry = shared.entry(key.to_string()).or_insert_with(|| (Vec::new(), 0));
        if cas.is_some_and(|c| c != entry.1) {
            return Err(HostError::CasMismatch);
        }
        *entry = (value.to_vec(), entry.1.wrapping_add(1));
        Ok(())
    }
    fn dispatch(&self, _cluster: &str, _headers: &[(&str, &str)], _body: &[u8], _timeout: Duration) -> HostResult<u32> {
        self.callouts.set(self.callouts.get() + 1);
        Ok(self.callouts.get())
    }
    fn send_response(&self, _status: u32, _headers: &[(&str, &str)], _body: &[u8]) -> HostResult<()> {
        self.replies.set(self.replies.get() + 1);
        Ok(())
    }
    fn set_tick_period(&self, _period: Duration) -> HostResult<()> {
        Ok(())
    }
    fn env(&self, _name: &str) -> Option<String> {
        None
    }
    fn random_u64(&self) -> u64 {
        0x5eed
    }
    fn plugin_id(&self) -> Option<String> {
        Some("bench.tollgate".into())
    }
    fn done(&self) -> HostResult<()> {
        Ok(())
    }
    fn resume_request(&self) -> HostResult<()> {
        Ok(())
    }
    fn set_effective_context(&self, _context_id: u32) -> HostResult<()> {
        Ok(())
    }
}
