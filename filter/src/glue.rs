//! The thin proxy-wasm layer: the SDK's callbacks, forwarded to `gateway` with the real
//! host (`abi::Abi`). Compiled for `wasm32-wasip1` only. No SDK helper that can panic
//! on a host status is called here or in `gateway` (see `abi`).

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{self, ContextType, LogLevel};

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use crate::abi::Abi;
use crate::gateway::{self, Action, Wake};
use crate::host::Host;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(Root(gateway::Root::new(context_id)))
    });
}}

fn action(a: Action) -> types::Action {
    match a {
        Action::Continue => types::Action::Continue,
        Action::Pause => types::Action::Pause,
    }
}

struct Root(gateway::Root);

impl Context for Root {
    /// A callout of the root answered; a JWKS fetch wakes the requests that waited for it.
    fn on_http_call_response(&mut self, token_id: u32, num_headers: usize, body_size: usize, _num_trailers: usize) {
        let wakes = self.0.call_response(&Abi, token_id, num_headers, body_size);
        for w in wakes {
            wake(w, self.0.context_id());
        }
    }

    /// A config push replaced this root context (or the plugin goes away): false until
    /// its callouts are answered, then `gateway` calls the host's `done`.
    fn on_done(&mut self) -> bool {
        self.0.done(&Abi)
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        self.0.start(&Abi)
    }

    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        self.0.configure(&Abi)
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn on_tick(&mut self) {
        for w in self.0.tick(&Abi) {
            wake(w, self.0.context_id());
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http::new(context_id, self.0.stream(context_id))))
    }
}

thread_local! {
    /// The streams of this VM by context id, so a stream whose key lookup was answered
    /// can wake the others that waited for the same key, and a root the requests that
    /// waited for a JWKS fetch (see `wake`).
    static STREAMS: RefCell<HashMap<u32, Rc<RefCell<gateway::Stream>>>> = RefCell::new(HashMap::new());
}

/// Wakes the streams `wake` names, each in its own context, then returns to `current`.
fn wake(wake: Wake, current: u32) {
    if wake.contexts.is_empty() {
        return;
    }
    for id in wake.contexts {
        let stream = STREAMS.with(|s| s.try_borrow().ok().and_then(|s| s.get(&id).cloned()));
        if let Some(stream) = stream {
            if Abi.set_effective_context(id).is_ok() {
                if let Ok(mut stream) = stream.try_borrow_mut() {
                    stream.key_ready(&Abi, wake.done);
                }
            }
        }
    }
    let _ = Abi.set_effective_context(current);
}

struct Http {
    id: u32,
    stream: Rc<RefCell<gateway::Stream>>,
}

impl Http {
    fn new(id: u32, stream: gateway::Stream) -> Http {
        let stream = Rc::new(RefCell::new(stream));
        STREAMS.with(|s| {
            if let Ok(mut s) = s.try_borrow_mut() {
                s.insert(id, stream.clone());
            }
        });
        Http { id, stream }
    }

    /// The stream, borrowed for one callback (never borrowed across callbacks; a busy
    /// stream means a callback re-entered, which the host does not do).
    fn with<T: Default>(&self, f: impl FnOnce(&mut gateway::Stream) -> T) -> T {
        self.stream.try_borrow_mut().map(|mut s| f(&mut s)).unwrap_or_default()
    }
}

impl Drop for Http {
    fn drop(&mut self) {
        STREAMS.with(|s| {
            if let Ok(mut s) = s.try_borrow_mut() {
                s.remove(&self.id);
            }
        });
    }
}

impl Context for Http {
    /// The answer to a callout of this request: an acquire (a lease) or a key lookup.
    fn on_http_call_response(&mut self, token_id: u32, num_headers: usize, body_size: usize, _num_trailers: usize) {
        let woken = self.with(|s| s.call_response(&Abi, token_id, num_headers, body_size));
        wake(woken, self.id);
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> types::Action {
        #[cfg(feature = "test-trap")]
        test_trap();
        action(self.with(|s| s.request_headers(&Abi, end_of_stream)))
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> types::Action {
        action(self.with(|s| s.request_body(&Abi, body_size, end_of_stream)))
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> types::Action {
        action(self.with(|s| s.request_trailers(&Abi)))
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> types::Action {
        action(self.with(|s| s.response_headers(&Abi, end_of_stream)))
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> types::Action {
        action(self.with(|s| s.response_body(&Abi, body_size, end_of_stream)))
    }

    fn on_log(&mut self) {
        let woken = self.with(|s| s.log(&Abi));
        wake(woken, self.id);
    }
}

/// Test builds only (feature `test-trap`): traps the VM when the request carries
/// `x-tollgate-test-trap`, as a bug would, so recovery (FAIL_RELOAD) can be tested.
#[cfg(feature = "test-trap")]
fn test_trap() {
    use crate::host::{Host, Map};
    let raw = Abi.header_pairs(Map::RequestHeaders).unwrap_or_default();
    if crate::header_map::parse(&raw).is_some_and(|h| crate::header_map::contains(&h, "x-tollgate-test-trap")) {
        std::process::abort();
    }
}
