//! The thin proxy-wasm layer: the SDK's callbacks, forwarded to `gateway` with the real
//! host (`abi::Abi`). Compiled for `wasm32-wasip1` only. No SDK helper that can panic
//! on a host status is called here or in `gateway` (see `abi`).

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{self, ContextType, LogLevel};

use crate::abi::Abi;
use crate::gateway::{self, Action};

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
    fn on_http_call_response(&mut self, token_id: u32, num_headers: usize, body_size: usize, _num_trailers: usize) {
        self.0.call_response(&Abi, token_id, num_headers, body_size);
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
        self.0.tick(&Abi);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http(self.0.stream(context_id))))
    }
}

struct Http(gateway::Stream);

impl Context for Http {
    /// The answer to the acquire callout of a request waiting for a lease.
    fn on_http_call_response(&mut self, token_id: u32, num_headers: usize, body_size: usize, _num_trailers: usize) {
        self.0.call_response(&Abi, token_id, num_headers, body_size);
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> types::Action {
        #[cfg(feature = "test-trap")]
        test_trap();
        action(self.0.request_headers(&Abi, end_of_stream))
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> types::Action {
        action(self.0.request_body(&Abi, body_size, end_of_stream))
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> types::Action {
        action(self.0.request_trailers(&Abi))
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> types::Action {
        action(self.0.response_headers(&Abi, end_of_stream))
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> types::Action {
        action(self.0.response_body(&Abi, body_size, end_of_stream))
    }

    fn on_log(&mut self) {
        self.0.log(&Abi);
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
