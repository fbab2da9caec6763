//! The thin proxy-wasm layer: reads what the host offers, calls the pure logic, and
//! applies its decisions. Compiled for `wasm32-wasip1` only.
//!
//! It uses `proxy_wasm::hostcalls` with explicit error handling where the SDK's
//! trait helpers would unwrap a host error, and reads headers as bytes because the
//! SDK's string variant panics on a header value that is not UTF-8 (HTTP/1 allows
//! obs-text), which would trap the VM. The request headers are read with the raw host
//! call and parsed in place (`header_map`): the SDK's reader copies each header and
//! panics on a host error.

use std::cell::{OnceCell, RefCell};
use std::hash::{BuildHasher, Hasher};
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, Status};

use crate::auth::{decide, CredentialCache, Verdict};
use crate::config::{Settings, UsageSettings};
use crate::events::{report_path, EventIds, EventQueue, QueueLimits, QueueStats, SendOutcome, UsageEvent};
use crate::header_map::{self, HeaderPairs};
use crate::limits::{state_key, Headroom, LimitSpec, LimitState, Limits, IDENTITY_COUNT_KEY, OVERFLOW_KEY};
use crate::response::{openai_error_body, ratelimit_headers, LocalReply};
use crate::strip::UsageOnlyStripper;
use crate::usage::{inject_include_usage, BodyKind, UsageParser, DEFAULT_MAX_CARRY};

/// Request bodies up to this size are read to add `stream_options.include_usage`.
const MAX_INJECT_BODY: usize = 64 * 1024;
/// Usage batches in flight at once per worker.
const MAX_IN_FLIGHT: usize = 4;
/// Compare-and-swap rounds before a shared-data update gives up.
const CAS_ATTEMPTS: usize = 16;
/// Longest wait between two attempts while the tracker is failing.
const BACKOFF_MAX_MS: u64 = 10_000;

/// Cached JWTs are re-verified at least this often, whatever their `exp`.
const TOKEN_CACHE_MAX_AGE_SECS: u64 = 300;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(Root { context_id, state: None, last_stats: QueueStats::default() })
    });
}}

/// The host's log level, read at configure time and on every tick, so a line the host
/// would drop is never formatted (the ALLOW/DENY lines run on every request).
static HOST_LOG_LEVEL: AtomicU32 = AtomicU32::new(0);

fn refresh_log_level() {
    if let Ok(level) = hostcalls::get_log_level() {
        HOST_LOG_LEVEL.store(level as u32, Ordering::Relaxed);
    }
}

fn log_enabled(level: LogLevel) -> bool {
    (level as u32) >= HOST_LOG_LEVEL.load(Ordering::Relaxed)
}

fn log(level: LogLevel, context_id: u32, message: std::fmt::Arguments<'_>) {
    if !log_enabled(level) {
        return;
    }
    let _ = hostcalls::log(level, &format!("[ctx {context_id}] {message}"));
}

fn now() -> Duration {
    hostcalls::get_current_time().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).unwrap_or_default()
}

/// A random u64 from the VM's entropy (std seeds `RandomState` from WASI random_get).
fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(now().as_nanos());
    h.finish()
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// What a configured root context shares with its HTTP contexts.
struct State {
    settings: Settings,
    credentials: RefCell<CredentialCache>,
    /// Usage events waiting for the root context's next tick.
    queue: RefCell<EventQueue>,
    ids: RefCell<EventIds>,
}

impl State {
    fn record(&self, mut event: UsageEvent) {
        if self.settings.usage.is_some() {
            event.id = self.ids.borrow_mut().next_id();
            self.queue.borrow_mut().push(&event);
        }
    }
}

struct Root {
    context_id: u32,
    state: Option<Rc<State>>,
    last_stats: QueueStats,
}

impl Root {
    /// Sends what the queue holds, a batch at a time, up to the in-flight bound.
    fn flush(&mut self, usage: &UsageSettings, state: &State) {
        let timeout = Duration::from_millis(usage.timeout_ms);
        loop {
            let now_ms = now().as_millis() as u64;
            let Some((batch, handles)) = state.queue.borrow_mut().next_batch(now_ms) else { break };
            let headers = vec![
                (":method", "POST"),
                (":path", usage.path.as_str()),
                (":authority", usage.authority.as_str()),
                ("content-type", "application/json"),
            ];
            match hostcalls::dispatch_http_call(&usage.cluster, headers, Some(&batch.body), vec![], timeout) {
                Ok(token) => state.queue.borrow_mut().sent(token, handles),
                Err(status) => {
                    state.queue.borrow_mut().send_failed(handles, now_ms);
                    log(
                        LogLevel::Warn,
                        self.context_id,
                        format_args!("usage report to cluster {} not sent: {status:?}", usage.cluster),
                    );
                    break;
                }
            }
        }
        let stats = state.queue.borrow().stats();
        if stats.dropped_overflow != self.last_stats.dropped_overflow
            || stats.dropped_attempts != self.last_stats.dropped_attempts
            || stats.rejected != self.last_stats.rejected
        {
            log(
                LogLevel::Warn,
                self.context_id,
                format_args!(
                    "usage events lost so far: {} queue overflow, {} out of attempts, {} refused by the tracker",
                    stats.dropped_overflow, stats.dropped_attempts, stats.rejected
                ),
            );
        }
        self.last_stats = stats;
    }
}

impl Context for Root {
    fn on_http_call_response(&mut self, token_id: u32, _num_headers: usize, _body_size: usize, _num_trailers: usize) {
        let Some(state) = self.state.clone() else { return };
        // A failed callout (connect error, timeout) arrives without `:status`.
        let status = map_value(MapType::HttpCallResponseHeaders, ":status").and_then(|s| s.parse::<u32>().ok());
        let outcome = SendOutcome::from_status(status);
        if outcome != SendOutcome::Delivered {
            log(
                LogLevel::Debug,
                self.context_id,
                format_args!("usage batch {token_id}: {outcome:?} (status {status:?})"),
            );
        }
        state.queue.borrow_mut().completed(token_id, outcome, now().as_millis() as u64);
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        log(
            LogLevel::Info,
            self.context_id,
            format_args!("tollgate filter {} (git {}) started", crate::VERSION, crate::GIT_HASH),
        );
        true
    }

    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        refresh_log_level();
        let bytes = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(b) => b.unwrap_or_default(),
            Err(status) => {
                log(LogLevel::Critical, self.context_id, format_args!("cannot read plugin configuration: {status:?}"));
                return false;
            }
        };
        match Settings::parse(&bytes, &env_var) {
            Ok(settings) => {
                log(
                    LogLevel::Info,
                    self.context_id,
                    format_args!(
                        "configured: {} api keys, jwt {}, allowed_groups={:?}",
                        settings.keys.len(),
                        if settings.jwt.is_empty() { "off" } else { "on" },
                        settings.allowed_groups
                    ),
                );
                let cache = CredentialCache::new(settings.jwt_cache_entries, TOKEN_CACHE_MAX_AGE_SECS);
                let limits = match &settings.usage {
                    Some(u) => QueueLimits {
                        max_queue: u.max_queue,
                        max_batch: u.max_batch,
                        max_attempts: u.max_attempts,
                        max_in_flight: MAX_IN_FLIGHT,
                        backoff_base_ms: u.flush_interval_ms,
                        backoff_max_ms: BACKOFF_MAX_MS,
                    },
                    None => QueueLimits {
                        max_queue: 1,
                        max_batch: 1,
                        max_attempts: 1,
                        max_in_flight: 1,
                        backoff_base_ms: 0,
                        backoff_max_ms: 0,
                    },
                };
                if let Some(u) = &settings.usage {
                    if let Err(status) = hostcalls::set_tick_period(Duration::from_millis(u.flush_interval_ms)) {
                        log(LogLevel::Error, self.context_id, format_args!("cannot set the tick period: {status:?}"));
                    }
                }
                self.state = Some(Rc::new(State {
                    settings,
                    credentials: RefCell::new(cache),
                    queue: RefCell::new(EventQueue::new(limits)),
                    ids: RefCell::new(EventIds::new(random_u64())),
                }));
                true
            }
            Err(e) => {
                log(LogLevel::Critical, self.context_id, format_args!("{e}"));
                false
            }
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn on_tick(&mut self) {
        refresh_log_level();
        let Some(state) = self.state.clone() else { return };
        if let Some(usage) = &state.settings.usage {
            self.flush(usage, &state);
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            context_id,
            state: self.state.clone(),
            event: None,
            inject_pending: false,
            parser: None,
            response_done: false,
            limit: None,
            stripper: None,
        }))
    }
}

struct Http {
    context_id: u32,
    state: Option<Rc<State>>,
    /// The usage event being filled in; recorded in `on_log`.
    event: Option<UsageEvent>,
    /// The request body is being read to add `stream_options.include_usage`.
    inject_pending: bool,
    parser: Option<UsageParser>,
    response_done: bool,
    /// The limit state this request was admitted under, to charge its tokens to.
    limit: Option<LimitTicket>,
    /// Set when the filter added include_usage: the usage-only event is removed again.
    stripper: Option<UsageOnlyStripper>,
}

struct LimitTicket {
    key: String,
    spec: LimitSpec,
    headroom: Headroom,
}

impl Context for Http {}

fn new_event(headers: &HeaderPairs<'_>, ts: Duration) -> UsageEvent {
    UsageEvent {
        id: String::new(),
        ts: ts.as_secs_f64(),
        user: None,
        groups: Vec::new(),
        method: header_map::get(headers, ":method").chars().take(16).collect(),
        host: header_map::get(headers, ":authority").chars().take(256).collect(),
        path: report_path(header_map::get(headers, ":path")).to_string(),
        model: None,
        status: None,
        prompt_tokens: 0,
        completion_tokens: 0,
        cached_tokens: 0,
        reasoning_tokens: 0,
        incomplete: false,
        usage_missing: true,
        denied: None,
    }
}

/// One header value, read as bytes: the SDK's string variant panics (and traps the VM)
/// on a value that is not UTF-8, which an upstream may send.
fn map_value(map: MapType, name: &str) -> Option<String> {
    let bytes = hostcalls::get_map_value_bytes(map, name).ok().flatten()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

#[link(wasm_import_module = "env")]
extern "C" {
    // The SDK's own import, declared with the SDK's signature.
    fn proxy_get_header_map_pairs(
        map_type: MapType,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> Status;
}

/// A whole header map as the host serializes it (see `header_map`), or None when the
/// host refuses (the SDK's `get_map_bytes` panics then).
#[allow(unsafe_code)]
fn header_map_bytes(map: MapType) -> Option<Vec<u8>> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: on Ok the host has filled `data` with a buffer of `size` bytes that it got
    // from this module's `proxy_on_memory_allocate` (the SDK's: a leaked boxed slice of
    // exactly `size` bytes), which we now own; this is the SDK's own `get_map_bytes`.
    unsafe {
        match proxy_get_header_map_pairs(map, &mut data, &mut size) {
            Status::Ok if data.is_null() => Some(Vec::new()),
            Status::Ok => Some(Vec::from_raw_parts(data, size, size)),
            _ => None,
        }
    }
}

/// Removes every copy of a request header, with a host call only when one was sent
/// (host calls dominate the filter's cost in V8).
fn remove_if_present(headers: &HeaderPairs<'_>, name: &str) {
    if header_map::contains(headers, name) {
        let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, None);
    }
}

/// Read-modify-write of one shared-data key (process-wide, all workers) with
/// compare-and-swap. `f` gets the current bytes (empty if absent) and returns the new
/// bytes (None: leave as is) and a result. None when the host fails or CAS keeps losing.
fn update_shared<T>(key: &str, f: impl Fn(&[u8]) -> (Option<Vec<u8>>, T)) -> Option<T> {
    update_shared_from(key, hostcalls::get_shared_data(key).ok()?, f)
}

/// `update_shared` starting from a value already read (saves a host call).
fn update_shared_from<T>(
    key: &str,
    first: (Option<Vec<u8>>, Option<u32>),
    f: impl Fn(&[u8]) -> (Option<Vec<u8>>, T),
) -> Option<T> {
    let mut current = first;
    for _ in 0..CAS_ATTEMPTS {
        let (bytes, cas) = current;
        let (new, out) = f(bytes.as_deref().unwrap_or_default());
        let Some(new) = new else { return Some(out) };
        match hostcalls::set_shared_data(key, Some(&new), cas) {
            Ok(()) => return Some(out),
            Err(proxy_wasm::types::Status::CasMismatch) => current = hostcalls::get_shared_data(key).ok()?,
            Err(_) => return None,
        }
    }
    None
}

/// Admits a request against its user's limit state: one shared-data read and one
/// compare-and-swap write in the common case. A user seen for the first time is
/// counted; beyond `max_identities` new users share one overflow state (stricter,
/// never looser), since Envoy's shared data has no expiry or deletion.
fn admit_shared(
    limits: &Limits,
    spec: &LimitSpec,
    user: &str,
    now_ms: u64,
) -> Option<(String, Result<Headroom, crate::limits::LimitError>)> {
    let mut key = state_key(user);
    let mut first = hostcalls::get_shared_data(&key).ok()?;
    if first.0.as_ref().is_none_or(|b| b.is_empty()) {
        let max = limits.max_identities;
        let admitted = update_shared(IDENTITY_COUNT_KEY, |bytes| {
            let n = <[u8; 8]>::try_from(bytes).map_or(0, u64::from_le_bytes);
            if n < max {
                (Some((n + 1).to_le_bytes().to_vec()), true)
            } else {
                (None, false)
            }
        })?;
        if !admitted {
            key = OVERFLOW_KEY.to_string();
            first = hostcalls::get_shared_data(&key).ok()?;
        }
    }
    let verdict = update_shared_from(&key, first, |bytes| {
        let mut state = LimitState::decode(bytes);
        match state.admit(spec, now_ms) {
            Ok(h) => (Some(state.encode()), Ok(h)),
            Err(e) => (None, Err(e)),
        }
    })?;
    Some((key, verdict))
}

/// Streaming-capable OpenAI routes whose request may get `include_usage` added.
fn wants_include_usage(path: &str) -> bool {
    let p = path.split('?').next().unwrap_or("");
    p.ends_with("/chat/completions") || p.ends_with("/completions")
}

impl Http {
    fn reply(&self, reply: &LocalReply) -> Action {
        let headers: Vec<(&str, &str)> = reply.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        if let Err(status) = hostcalls::send_http_response(reply.status, headers, Some(reply.body.as_bytes())) {
            log(LogLevel::Error, self.context_id, format_args!("cannot send local reply: {status:?}"));
        }
        Action::Pause
    }

    /// A 500 in the OpenAI error format, for host failures (fail closed).
    fn internal_error(&self, message: &str) -> Action {
        let body = openai_error_body(message, "server_error", "internal_error");
        self.reply(&LocalReply { status: 500, headers: vec![("content-type".into(), "application/json".into())], body })
    }

    /// Logs the denial, records its usage event and sends the reply.
    fn deny(
        &self,
        state: &State,
        event: impl FnOnce() -> UsageEvent,
        reason: &str,
        reply: &LocalReply,
        path: &str,
    ) -> Action {
        log(LogLevel::Info, self.context_id, format_args!("DENY reason={reason} path={}", report_path(path)));
        if state.settings.usage.is_some() {
            let mut event = event();
            event.denied = Some(reason.to_string());
            event.status = Some(reply.status);
            event.usage_missing = false;
            state.record(event);
        }
        self.reply(reply)
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(state) = self.state.clone() else {
            // Not configured: refuse rather than let anything through.
            let body = openai_error_body("Gateway authentication is not configured.", "server_error", "unavailable");
            return self.reply(&LocalReply {
                status: 503,
                headers: vec![("content-type".into(), "application/json".into())],
                body,
            });
        };
        let raw = header_map_bytes(MapType::HttpRequestHeaders);
        let Some(headers) = raw.as_deref().and_then(header_map::parse) else {
            return self.internal_error("Cannot read request headers.");
        };
        // Held to the end of the request callback: the verdict may borrow from it. Never
        // borrowed elsewhere; refusing beats the panic `borrow_mut` would risk.
        let Ok(mut cache) = state.credentials.try_borrow_mut() else {
            return self.internal_error("Credential cache busy.");
        };
        let path = header_map::get(&headers, ":path");
        // Read from the host only when something needs the time (not an API key alone).
        let clock = OnceCell::new();
        let now = || *clock.get_or_init(now);
        let verdict = decide(&state.settings, &mut cache, &headers, || now().as_secs());
        // Built only when it will be recorded (see `deny` and the allow branch).
        let event = || new_event(&headers, now());
        match verdict {
            Verdict::Allow { identity, edits } => {
                if let Some(limits) = &state.settings.limits {
                    if let Some(spec) = limits.spec_for(&identity) {
                        match admit_shared(limits, spec, &identity.user, now().as_millis() as u64) {
                            Some((key, Ok(headroom))) => {
                                self.limit = Some(LimitTicket { key, spec: spec.clone(), headroom });
                            }
                            Some((_, Err(error))) => {
                                return self.deny(&state, event, error.reason(), &LocalReply::from(&error), path);
                            }
                            None => log(
                                LogLevel::Warn,
                                self.context_id,
                                format_args!("limit state unavailable; request allowed unlimited"),
                            ),
                        }
                    }
                }
                for name in &edits.remove {
                    remove_if_present(&headers, name);
                }
                for (name, value) in &edits.set {
                    let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value.as_ref()));
                }
                if log_enabled(LogLevel::Info) {
                    log(
                        LogLevel::Info,
                        self.context_id,
                        format_args!(
                            "ALLOW user={} groups={} path={}",
                            identity.user,
                            identity.groups_csv(),
                            report_path(path)
                        ),
                    );
                }
                // The response is only looked at when something needs its usage.
                let counts_tokens = self.limit.as_ref().is_some_and(|t| t.spec.counts_tokens());
                if state.settings.usage.is_none() && !counts_tokens {
                    return Action::Continue;
                }
                let mut event = event();
                let identity = identity.into_owned();
                event.user = Some(identity.user);
                event.groups = identity.groups;
                self.event = Some(event);
                let Some(usage) = &state.settings.usage else { return Action::Continue };
                // Ask for an uncompressed answer so its usage can be read (see README).
                remove_if_present(&headers, "accept-encoding");
                let small_body = header_map::get(&headers, "content-length")
                    .parse::<usize>()
                    .is_ok_and(|n| n > 0 && n <= MAX_INJECT_BODY);
                if usage.inject_include_usage
                    && !end_of_stream
                    && small_body
                    && header_map::get(&headers, ":method") == "POST"
                    && wants_include_usage(path)
                {
                    // Pausing here would stop the body callbacks too (the host turns
                    // StopIteration into StopAllIteration), so the headers go on
                    // without a length (chunked upstream) and the body is held in
                    // `on_http_request_body` until complete.
                    self.inject_pending = true;
                    let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, "content-length", None);
                }
                Action::Continue
            }
            // A denied request never reaches the upstream: no header needs editing.
            Verdict::Deny { error, .. } => self.deny(&state, event, error.reason(), &LocalReply::from(&error), path),
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !self.inject_pending {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause; // Envoy buffers; bounded by MAX_INJECT_BODY via content-length.
        }
        self.inject_pending = false;
        let body = match hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size) {
            Ok(Some(b)) => b,
            _ => return Action::Continue,
        };
        if let Some(new_body) = inject_include_usage(&body, MAX_INJECT_BODY) {
            if hostcalls::set_buffer(BufferType::HttpRequestBody, 0, body_size, &new_body).is_ok() {
                self.stripper = Some(UsageOnlyStripper::default());
            }
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if let Some(ticket) = &self.limit {
            for (name, value) in ratelimit_headers(&ticket.headroom) {
                let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, &name, Some(&value));
            }
        }
        let Some(event) = self.event.as_mut() else { return Action::Continue };
        // One host call for the three headers needed (each single read is a call and a
        // call back into the VM to allocate the copy).
        let raw = header_map_bytes(MapType::HttpResponseHeaders);
        let headers = raw.as_deref().and_then(header_map::parse).unwrap_or_default();
        let get = |name: &str| header_map::find(&headers, name);
        event.status = get(":status").and_then(|s| s.parse().ok());
        let readable = get("content-encoding").is_none_or(|e| e.eq_ignore_ascii_case("identity"));
        let kind = BodyKind::from_content_type(get("content-type"));
        if readable {
            self.parser = Some(UsageParser::new(kind, DEFAULT_MAX_CARRY));
        }
        if !readable || kind != BodyKind::Sse {
            self.stripper = None;
        }
        if end_of_stream {
            self.response_done = true;
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if let Some(parser) = self.parser.as_mut() {
            if body_size > 0 {
                if let Ok(Some(chunk)) = hostcalls::get_buffer(BufferType::HttpResponseBody, 0, body_size) {
                    parser.feed(&chunk);
                    if let Some(stripped) = self.stripper.as_mut().and_then(|s| s.strip(&chunk)) {
                        let _ = hostcalls::set_buffer(BufferType::HttpResponseBody, 0, body_size, &stripped);
                    }
                }
            }
            if end_of_stream {
                parser.finish();
            }
        }
        if end_of_stream {
            self.response_done = true;
        }
        // Never Pause here: that would make Envoy buffer the whole response.
        Action::Continue
    }

    fn on_log(&mut self) {
        let (Some(state), Some(mut event)) = (self.state.clone(), self.event.take()) else { return };
        let mut done = self.response_done;
        if let Some(parser) = self.parser.as_mut() {
            if !self.response_done {
                parser.finish();
            }
            done |= parser.done();
            event.set_usage(parser.usage());
            event.model = parser.model().map(|m| m.chars().take(256).collect());
        }
        // The client left (or the upstream reset) before the response ended.
        event.incomplete = !done;
        if let Some(ticket) = &self.limit {
            let tokens = event.prompt_tokens.saturating_add(event.completion_tokens);
            if tokens > 0 && ticket.spec.counts_tokens() {
                let now_ms = now().as_millis() as u64;
                let charged = update_shared(&ticket.key, |bytes| {
                    let mut state = LimitState::decode(bytes);
                    state.charge(&ticket.spec, tokens, now_ms);
                    (Some(state.encode()), ())
                });
                if charged.is_none() {
                    log(LogLevel::Warn, self.context_id, format_args!("could not charge {tokens} tokens"));
                }
            }
        }
        state.record(event);
    }
}
