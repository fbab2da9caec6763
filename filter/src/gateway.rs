//! The filter's callbacks as plain functions of a [`Host`]: what to do with every host
//! call's answer, failures included. The proxy-wasm glue (`glue`) only forwards the
//! SDK's callbacks here with the real host (`abi::Abi`); the tests below drive the same
//! code with a host that fails on purpose.
//!
//! The rule for a failing host call: **auth fails closed, metering fails open.** A
//! request whose headers cannot be read, whose smuggled identity headers cannot be
//! removed, whose credential cannot be stripped or whose clock cannot be read (for a
//! JWT) is answered 500; a response whose headers or body cannot be read is served and
//! its event recorded as `usage_missing`; a callout that fails, arrives without headers
//! or cannot be dispatched leaves its events queued for the next tick, with their ids.

use std::cell::{OnceCell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::auth::{decide, CredentialCache, Verdict};
use crate::config::{Settings, UsageSettings};
use crate::events::{report_path, EventIds, EventQueue, QueueLimits, QueueStats, SendOutcome, UsageEvent};
use crate::header_map::{self, HeaderPairs};
use crate::host::{Buffer, Host, HostError, Level, Map};
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
/// Most of a tracker answer read (to count the events it refused).
const MAX_CALL_RESPONSE_BODY: usize = 64 * 1024;
/// Cached JWTs are re-verified at least this often, whatever their `exp`.
const TOKEN_CACHE_MAX_AGE_SECS: u64 = 300;

/// What the host should do with the stream after a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    Pause,
}

/// The host's log level, read at configure time and on every tick, so a line the host
/// would drop is never formatted (the ALLOW/DENY lines run on every request).
static HOST_LOG_LEVEL: AtomicU32 = AtomicU32::new(0);

fn refresh_log_level(host: &impl Host) {
    if let Ok(level) = host.log_level() {
        HOST_LOG_LEVEL.store(level as u32, Ordering::Relaxed);
    }
}

fn log_enabled(level: Level) -> bool {
    (level as u32) >= HOST_LOG_LEVEL.load(Ordering::Relaxed)
}

fn log(host: &impl Host, level: Level, context_id: u32, message: std::fmt::Arguments<'_>) {
    if log_enabled(level) {
        host.log(level, &format!("[ctx {context_id}] {message}"));
    }
}

/// What a configured root context shares with its HTTP contexts.
pub struct State {
    settings: Settings,
    credentials: RefCell<CredentialCache>,
    /// Usage events waiting for a root context's next tick: this plugin's queue in
    /// this VM, shared with the root contexts of later config pushes (see [`QUEUES`]).
    queue: Rc<RefCell<EventQueue>>,
}

thread_local! {
    /// Each plugin's (name and root id's) event queue in this VM — one VM per worker, so one
    /// queue per worker and plugin. A live config push (Istio's every `pluginConfig`
    /// change) makes Envoy create a new root context and send the old one `on_done`;
    /// the queue outlives both, so what the old root held (queued events, batches in
    /// flight) and what its HTTP contexts still record reaches the tracker through the
    /// new one.
    static QUEUES: RefCell<HashMap<String, Rc<RefCell<EventQueue>>>> = RefCell::new(HashMap::new());
}

/// The queue of plugin `plugin_id` in this VM, with these limits, created if new.
fn plugin_queue(plugin_id: &str, limits: QueueLimits, random: impl FnOnce() -> u64) -> Rc<RefCell<EventQueue>> {
    QUEUES.with(|queues| {
        let Ok(mut queues) = queues.try_borrow_mut() else {
            return Rc::new(RefCell::new(EventQueue::new(limits, EventIds::new(random()))));
        };
        let queue = queues
            .entry(plugin_id.to_string())
            .or_insert_with(|| Rc::new(RefCell::new(EventQueue::new(limits, EventIds::new(random())))))
            .clone();
        if let Ok(mut q) = queue.try_borrow_mut() {
            q.set_limits(limits);
        }
        queue
    })
}

impl State {
    fn record(&self, event: UsageEvent) {
        if self.settings.usage.is_some() {
            if let Ok(mut queue) = self.queue.try_borrow_mut() {
                queue.push(event);
            }
        }
    }

    fn record_denial(&self, reason: &str, path: &str) {
        if self.settings.usage.is_some() {
            if let Ok(mut queue) = self.queue.try_borrow_mut() {
                queue.deny(reason, path);
            }
        }
    }

    /// What the queue did so far (for logs and tests).
    pub fn queue_stats(&self) -> QueueStats {
        self.queue.try_borrow().map(|q| q.stats()).unwrap_or_default()
    }
}

/// The root context: configuration, the event queue, the flushes.
pub struct Root {
    context_id: u32,
    state: Option<Rc<State>>,
    last_stats: QueueStats,
    /// Callouts this root context made that have not been answered yet: it stays
    /// alive after `on_done` until they are (a deleted root's callouts are cancelled).
    sent: HashSet<u32>,
    /// `on_done` was called: call the host's `done` once `sent` is empty.
    finishing: bool,
}

impl Root {
    pub fn new(context_id: u32) -> Root {
        Root { context_id, state: None, last_stats: QueueStats::default(), sent: HashSet::new(), finishing: false }
    }

    pub fn state(&self) -> Option<&Rc<State>> {
        self.state.as_ref()
    }

    pub fn start(&self, host: &impl Host) -> bool {
        refresh_log_level(host);
        log(
            host,
            Level::Info,
            self.context_id,
            format_args!("tollgate filter {} (git {}) started", crate::VERSION, crate::GIT_HASH),
        );
        true
    }

    /// Reads and checks the plugin configuration; false refuses it.
    pub fn configure(&mut self, host: &impl Host) -> bool {
        refresh_log_level(host);
        let bytes = match host.buffer(Buffer::PluginConfiguration, 0, usize::MAX) {
            Ok(b) => b.unwrap_or_default(),
            Err(status) => {
                log(
                    host,
                    Level::Critical,
                    self.context_id,
                    format_args!("cannot read plugin configuration: {status:?}"),
                );
                return false;
            }
        };
        let settings = match Settings::parse(&bytes, &|name| host.env(name)) {
            Ok(settings) => settings,
            Err(e) => {
                log(host, Level::Critical, self.context_id, format_args!("{e}"));
                return false;
            }
        };
        log(
            host,
            Level::Info,
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
                max_batch_bytes: u.max_batch_bytes,
                max_attempts: u.max_attempts,
                max_in_flight: MAX_IN_FLIGHT,
                backoff_base_ms: u.flush_interval_ms,
                backoff_max_ms: BACKOFF_MAX_MS,
            },
            None => QueueLimits {
                max_queue: 1,
                max_batch: 1,
                max_batch_bytes: 4096,
                max_attempts: 1,
                max_in_flight: 1,
                backoff_base_ms: 0,
                backoff_max_ms: 0,
            },
        };
        if let Some(u) = &settings.usage {
            if let Err(status) = host.set_tick_period(Duration::from_millis(u.flush_interval_ms)) {
                log(host, Level::Error, self.context_id, format_args!("cannot set the tick period: {status:?}"));
            }
        }
        let plugin_id = host.plugin_id().unwrap_or_default();
        let queue = plugin_queue(&plugin_id, limits, || host.random_u64());
        self.state = Some(Rc::new(State { settings, credentials: RefCell::new(cache), queue }));
        true
    }

    /// The host is done with this root context (a config push replaced it, or the
    /// plugin goes away). Sends what is queued, then finishes once every callout it
    /// made is answered: true at once if none is outstanding, else false and the host's
    /// `done` is called from [`Root::call_response`].
    pub fn done(&mut self, host: &impl Host) -> bool {
        self.finishing = true;
        if let Some(state) = self.state.clone() {
            if let Some(usage) = &state.settings.usage {
                self.flush(host, usage, &state);
            }
        }
        log(
            host,
            Level::Info,
            self.context_id,
            format_args!("root context done; {} usage reports still in flight", self.sent.len()),
        );
        self.sent.is_empty()
    }

    pub fn tick(&mut self, host: &impl Host) {
        refresh_log_level(host);
        let Some(state) = self.state.clone() else { return };
        if let Some(usage) = &state.settings.usage {
            self.flush(host, usage, &state);
        }
    }

    /// Sends what the queue holds, a batch at a time, up to the in-flight bound.
    fn flush(&mut self, host: &impl Host, usage: &UsageSettings, state: &State) {
        let Ok(mut queue) = state.queue.try_borrow_mut() else { return };
        let timeout = Duration::from_millis(usage.timeout_ms);
        let headers = [
            (":method", "POST"),
            (":path", usage.path.as_str()),
            (":authority", usage.authority.as_str()),
            ("content-type", "application/json"),
        ];
        loop {
            let now_ms = now_ms(host);
            let Some((batch, handles)) = queue.next_batch(now_ms) else { break };
            match host.dispatch(&usage.cluster, &headers, &batch.body, timeout) {
                Ok(token) => {
                    self.sent.insert(token);
                    queue.sent(token, handles);
                }
                Err(status) => {
                    queue.send_failed(handles, now_ms);
                    log(
                        host,
                        Level::Warn,
                        self.context_id,
                        format_args!("usage report to cluster {} not sent: {status:?}", usage.cluster),
                    );
                    break;
                }
            }
        }
        let stats = queue.stats();
        drop(queue);
        self.log_losses(host, stats);
    }

    fn log_losses(&mut self, host: &impl Host, stats: QueueStats) {
        let last = self.last_stats;
        if (stats.dropped_overflow, stats.dropped_attempts, stats.rejected, stats.denials_lost)
            != (last.dropped_overflow, last.dropped_attempts, last.rejected, last.denials_lost)
        {
            log(
                host,
                Level::Warn,
                self.context_id,
                format_args!(
                    "usage events lost so far: {} queue overflow, {} out of attempts, {} refused by the tracker; {} denials lost",
                    stats.dropped_overflow, stats.dropped_attempts, stats.rejected, stats.denials_lost
                ),
            );
        }
        self.last_stats = stats;
    }

    /// The answer to a usage batch, or its failure. A failed callout (reset, over a
    /// buffer limit) comes with no headers, and its maps cannot be read (Envoy says
    /// BadArgument): it is a retry, never a trap.
    pub fn call_response(&mut self, host: &impl Host, token: u32, num_headers: usize, body_size: usize) {
        self.sent.remove(&token);
        self.record_response(host, token, num_headers, body_size);
        if self.finishing && self.sent.is_empty() {
            if let Err(status) = host.done() {
                log(host, Level::Error, self.context_id, format_args!("cannot finish the root context: {status:?}"));
            }
        }
    }

    fn record_response(&mut self, host: &impl Host, token: u32, num_headers: usize, body_size: usize) {
        let Some(state) = self.state.clone() else { return };
        let status = if num_headers == 0 {
            None
        } else {
            let raw = host.header_pairs(Map::CallResponseHeaders).ok();
            let headers = raw.as_deref().and_then(header_map::parse).unwrap_or_default();
            header_map::find(&headers, ":status").and_then(|s| s.trim().parse::<u32>().ok())
        };
        let outcome = SendOutcome::from_status(status);
        if outcome != SendOutcome::Delivered {
            log(
                host,
                Level::Debug,
                self.context_id,
                format_args!("usage batch {token}: {outcome:?} (status {status:?})"),
            );
        }
        let refused = if outcome == SendOutcome::Delivered && body_size > 0 {
            host.buffer(Buffer::CallResponseBody, 0, body_size.min(MAX_CALL_RESPONSE_BODY))
                .ok()
                .flatten()
                .map_or(0, |body| refused_events(&body))
        } else {
            0
        };
        let Ok(mut queue) = state.queue.try_borrow_mut() else { return };
        queue.completed(token, outcome, now_ms(host));
        queue.tracker_refused(refused);
        let stats = queue.stats();
        drop(queue);
        if refused > 0 {
            self.log_losses(host, stats);
        }
    }

    /// A new HTTP context of this root.
    pub fn stream(&self, context_id: u32) -> Stream {
        Stream {
            context_id,
            state: self.state.clone(),
            event: None,
            inject_pending: false,
            parser: None,
            response_done: false,
            limit: None,
            stripper: None,
        }
    }
}

/// How many events of a delivered batch the tracker refused (`rejected` in its answer).
fn refused_events(body: &[u8]) -> u64 {
    #[derive(serde::Deserialize)]
    struct Answer {
        #[serde(default)]
        rejected: Vec<serde::de::IgnoredAny>,
    }
    serde_json::from_slice::<Answer>(body).map_or(0, |a| a.rejected.len() as u64)
}

fn now_ms(host: &impl Host) -> u64 {
    u64::try_from(host.now().unwrap_or_default().as_millis()).unwrap_or(u64::MAX)
}

/// One HTTP stream.
pub struct Stream {
    context_id: u32,
    state: Option<Rc<State>>,
    /// The usage event being filled in; recorded in `log`.
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

/// Read-modify-write of one shared-data key (process-wide, all workers) with
/// compare-and-swap. `f` gets the current bytes (empty if absent) and returns the new
/// bytes (None: leave as is) and a result. None when the host fails or CAS keeps losing.
fn update_shared<T>(host: &impl Host, key: &str, f: impl Fn(&[u8]) -> (Option<Vec<u8>>, T)) -> Option<T> {
    update_shared_from(host, key, host.shared_get(key).ok()?, f)
}

/// `update_shared` starting from a value already read (saves a host call).
fn update_shared_from<T>(
    host: &impl Host,
    key: &str,
    first: (Option<Vec<u8>>, Option<u32>),
    f: impl Fn(&[u8]) -> (Option<Vec<u8>>, T),
) -> Option<T> {
    let mut current = first;
    for _ in 0..CAS_ATTEMPTS {
        let (bytes, cas) = current;
        let (new, out) = f(bytes.as_deref().unwrap_or_default());
        let Some(new) = new else { return Some(out) };
        match host.shared_set(key, &new, cas) {
            Ok(()) => return Some(out),
            Err(HostError::CasMismatch) => current = host.shared_get(key).ok()?,
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
    host: &impl Host,
    limits: &Limits,
    spec: &LimitSpec,
    user: &str,
    now_ms: u64,
) -> Option<(String, Result<Headroom, crate::limits::LimitError>)> {
    let mut key = state_key(user);
    let mut first = host.shared_get(&key).ok()?;
    if first.0.as_ref().is_none_or(|b| b.is_empty()) {
        let max = limits.max_identities;
        let admitted = update_shared(host, IDENTITY_COUNT_KEY, |bytes| {
            let n = <[u8; 8]>::try_from(bytes).map_or(0, u64::from_le_bytes);
            if n < max {
                (Some((n + 1).to_le_bytes().to_vec()), true)
            } else {
                (None, false)
            }
        })?;
        if !admitted {
            key = OVERFLOW_KEY.to_string();
            first = host.shared_get(&key).ok()?;
        }
    }
    let verdict = update_shared_from(host, &key, first, |bytes| {
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

impl Stream {
    fn reply(&self, host: &impl Host, reply: &LocalReply) -> Action {
        let headers: Vec<(&str, &str)> = reply.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        if let Err(status) = host.send_response(reply.status, &headers, reply.body.as_bytes()) {
            log(host, Level::Error, self.context_id, format_args!("cannot send local reply: {status:?}"));
        }
        Action::Pause
    }

    /// A 500 in the OpenAI error format, for host failures (fail closed); counted as
    /// a denial (`internal_error`).
    fn internal_error(&self, host: &impl Host, state: &State, path: &str, message: &str) -> Action {
        log(host, Level::Error, self.context_id, format_args!("request refused: {message}"));
        state.record_denial("internal_error", path);
        let body = openai_error_body(message, "server_error", "internal_error");
        self.reply(
            host,
            &LocalReply { status: 500, headers: vec![("content-type".into(), "application/json".into())], body },
        )
    }

    /// Logs the denial, counts it for the tracker and sends the reply.
    fn deny(&self, host: &impl Host, state: &State, reason: &str, reply: &LocalReply, path: &str) -> Action {
        log(host, Level::Info, self.context_id, format_args!("DENY reason={reason} path={}", report_path(path)));
        state.record_denial(reason, path);
        self.reply(host, reply)
    }

    pub fn request_headers(&mut self, host: &impl Host, end_of_stream: bool) -> Action {
        let Some(state) = self.state.clone() else {
            // Not configured: refuse rather than let anything through.
            let body = openai_error_body("Gateway authentication is not configured.", "server_error", "unavailable");
            return self.reply(
                host,
                &LocalReply { status: 503, headers: vec![("content-type".into(), "application/json".into())], body },
            );
        };
        let raw = host.header_pairs(Map::RequestHeaders).ok();
        let Some(headers) = raw.as_deref().and_then(header_map::parse) else {
            return self.internal_error(host, &state, "", "Cannot read request headers.");
        };
        // Held to the end of the request callback: the verdict may borrow from it. Never
        // borrowed elsewhere; refusing beats the panic `borrow_mut` would risk.
        let Ok(mut cache) = state.credentials.try_borrow_mut() else {
            return self.internal_error(host, &state, header_map::get(&headers, ":path"), "Credential cache busy.");
        };
        let path = header_map::get(&headers, ":path");
        // Read from the host only when something needs the time (not an API key alone).
        // A clock that cannot be read fails the request closed (an expiry check against
        // a made-up time would let expired tokens in).
        let clock: OnceCell<Option<Duration>> = OnceCell::new();
        let now = || clock.get_or_init(|| host.now().ok()).unwrap_or_default();
        let verdict = decide(&state.settings, &mut cache, &headers, || now().as_secs());
        if clock.get().is_some_and(Option::is_none) {
            return self.internal_error(host, &state, path, "Cannot read the clock.");
        }
        match verdict {
            Verdict::Allow { identity, edits } => {
                if let Some(limits) = &state.settings.limits {
                    if let Some(spec) = limits.spec_for(&identity) {
                        match admit_shared(host, limits, spec, &identity.user, now().as_millis() as u64) {
                            Some((key, Ok(headroom))) => {
                                self.limit = Some(LimitTicket { key, spec: spec.clone(), headroom });
                            }
                            Some((_, Err(error))) => {
                                return self.deny(host, &state, error.reason(), &LocalReply::from(&error), path);
                            }
                            None => log(
                                host,
                                Level::Warn,
                                self.context_id,
                                format_args!("limit state unavailable; request allowed unlimited"),
                            ),
                        }
                    }
                }
                // Smuggled identity headers and the credential must go, or nothing goes.
                for name in &edits.remove {
                    if header_map::contains(&headers, name) && host.set_header(Map::RequestHeaders, name, None).is_err()
                    {
                        return self.internal_error(host, &state, path, "Cannot edit request headers.");
                    }
                }
                for (name, value) in &edits.set {
                    if host.set_header(Map::RequestHeaders, name, Some(value.as_ref())).is_err() {
                        return self.internal_error(host, &state, path, "Cannot edit request headers.");
                    }
                }
                if log_enabled(Level::Info) {
                    log(
                        host,
                        Level::Info,
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
                let mut event = new_event(&headers, now());
                let identity = identity.into_owned();
                event.user = Some(identity.user);
                event.groups = identity.groups;
                self.event = Some(event);
                let Some(usage) = &state.settings.usage else { return Action::Continue };
                // Ask for an uncompressed answer so its usage can be read (see README).
                if header_map::contains(&headers, "accept-encoding")
                    && host.set_header(Map::RequestHeaders, "accept-encoding", None).is_err()
                {
                    log(host, Level::Warn, self.context_id, format_args!("cannot remove accept-encoding"));
                }
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
                    // `request_body` until complete.
                    self.inject_pending = host.set_header(Map::RequestHeaders, "content-length", None).is_ok();
                }
                Action::Continue
            }
            // A denied request never reaches the upstream: no header needs editing.
            Verdict::Deny { error, .. } => self.deny(host, &state, error.reason(), &LocalReply::from(&error), path),
        }
    }

    pub fn request_body(&mut self, host: &impl Host, body_size: usize, end_of_stream: bool) -> Action {
        if !self.inject_pending {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause; // Envoy buffers; bounded by MAX_INJECT_BODY via content-length.
        }
        self.inject_pending = false;
        let Ok(Some(body)) = host.buffer(Buffer::RequestBody, 0, body_size) else { return Action::Continue };
        if let Some(new_body) = inject_include_usage(&body, MAX_INJECT_BODY) {
            if host.set_buffer(Buffer::RequestBody, 0, body_size, &new_body).is_ok() {
                self.stripper = Some(UsageOnlyStripper::default());
            }
        }
        Action::Continue
    }

    pub fn response_headers(&mut self, host: &impl Host, end_of_stream: bool) -> Action {
        if let Some(ticket) = &self.limit {
            for (name, value) in ratelimit_headers(&ticket.headroom) {
                let _ = host.set_header(Map::ResponseHeaders, &name, Some(&value));
            }
        }
        let Some(event) = self.event.as_mut() else { return Action::Continue };
        // One host call for the three headers needed (each single read is a call and a
        // call back into the VM to allocate the copy).
        let Some(raw) = host.header_pairs(Map::ResponseHeaders).ok() else {
            // Unreadable: served as is, recorded without usage.
            self.stripper = None;
            return Action::Continue;
        };
        let headers = header_map::parse(&raw).unwrap_or_default();
        let get = |name: &str| header_map::find(&headers, name);
        event.set_status(get(":status"));
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

    pub fn response_body(&mut self, host: &impl Host, body_size: usize, end_of_stream: bool) -> Action {
        if let Some(parser) = self.parser.as_mut() {
            if body_size > 0 {
                match host.buffer(Buffer::ResponseBody, 0, body_size) {
                    Ok(Some(chunk)) => {
                        parser.feed(&chunk);
                        if let Some(stripped) = self.stripper.as_mut().and_then(|s| s.strip(&chunk)) {
                            if host.set_buffer(Buffer::ResponseBody, 0, body_size, &stripped).is_err() {
                                self.stripper = None;
                            }
                        }
                    }
                    Ok(None) => {}
                    Err(status) => {
                        // A hole in what the parser saw: its usage cannot be trusted.
                        log(host, Level::Debug, self.context_id, format_args!("response body unreadable: {status:?}"));
                        self.parser = None;
                        self.stripper = None;
                    }
                }
            }
            if end_of_stream {
                if let Some(parser) = self.parser.as_mut() {
                    parser.finish();
                }
            }
        }
        if end_of_stream {
            self.response_done = true;
        }
        // Never Pause here: that would make Envoy buffer the whole response.
        Action::Continue
    }

    /// The stream ended (completed, reset or abandoned): charge and record its usage.
    pub fn log(&mut self, host: &impl Host) {
        let (Some(state), Some(mut event)) = (self.state.clone(), self.event.take()) else { return };
        let mut done = self.response_done;
        if let Some(parser) = self.parser.as_mut() {
            if !self.response_done {
                parser.finish();
            }
            done |= parser.done();
            event.set_usage(parser.usage());
            event.model = parser.model().map(|m| tollgate_rules::truncate(m).to_string());
        }
        // The client left (or the upstream reset) before the response ended.
        event.incomplete = !done;
        if let Some(ticket) = &self.limit {
            let tokens = event.prompt_tokens.saturating_add(event.completion_tokens);
            if tokens > 0 && ticket.spec.counts_tokens() {
                let now_ms = now_ms(host);
                let charged = update_shared(host, &ticket.key, |bytes| {
                    let mut state = LimitState::decode(bytes);
                    state.charge(&ticket.spec, tokens, now_ms);
                    (Some(state.encode()), ())
                });
                if charged.is_none() {
                    log(host, Level::Warn, self.context_id, format_args!("could not charge {tokens} tokens"));
                }
            }
        }
        state.record(event);
    }
}

#[cfg(test)]
mod tests {
    //! Every host call the callbacks make, failed on purpose: the callbacks must answer
    //! as the module docs promise (auth closed, metering open, events kept) and never
    //! panic. Under wasm-bindgen-test the same tests run compiled to wasm32.
    use super::*;
    use crate::host::HostResult;
    use std::collections::{BTreeMap, HashSet};
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const KEY: &str = "tg-test-key";

    /// Host calls, by name, that a [`FakeHost`] can be told to fail.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    #[allow(clippy::enum_variant_names)] // named after the host's maps and buffers
    enum Call {
        LogLevel,
        Now,
        RequestHeaders,
        ResponseHeaders,
        CallResponseHeaders,
        RemoveRequestHeader,
        SetRequestHeader,
        SetResponseHeader,
        RequestBody,
        SetRequestBody,
        ResponseBody,
        CallResponseBody,
        PluginConfiguration,
        SharedGet,
        SharedSet,
        Dispatch,
        SendResponse,
        TickPeriod,
    }

    #[derive(Default)]
    struct FakeHost {
        failing: RefCell<HashSet<Call>>,
        config: Vec<u8>,
        request_headers: RefCell<Vec<(String, String)>>,
        /// The request headers as the last request that went on left the filter.
        upstream: RefCell<Vec<(String, String)>>,
        response_headers: Vec<(String, String)>,
        call_response_headers: Vec<(String, String)>,
        call_response_body: Vec<u8>,
        request_body: RefCell<Vec<u8>>,
        response_body: RefCell<Vec<u8>>,
        shared: RefCell<BTreeMap<String, (Vec<u8>, u32)>>,
        dispatched: RefCell<Vec<(u32, Vec<u8>)>>,
        replies: RefCell<Vec<(u32, String)>>,
        logs: RefCell<Vec<String>>,
        clock: Cell<u64>,
        /// The plugin's root id: unique per host, so tests never share a VM queue.
        root: String,
        /// Times the host's `done` was called.
        done_calls: Cell<u32>,
    }

    static NEXT_ROOT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

    use std::cell::Cell;

    fn pairs(list: &[(String, String)]) -> Vec<u8> {
        let refs: Vec<(&str, &str)> = list.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        crate::host::serialize_pairs(&refs)
    }

    impl FakeHost {
        fn fails(&self, call: Call) -> HostResult<()> {
            if self.failing.borrow().contains(&call) {
                Err(HostError::BadArgument)
            } else {
                Ok(())
            }
        }
        fn header(&self, name: &str) -> Option<String> {
            self.upstream.borrow().iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        }
        fn fail(&self, call: Call) {
            self.failing.borrow_mut().insert(call);
        }
        fn heal(&self) {
            self.failing.borrow_mut().clear();
        }
    }

    impl Host for FakeHost {
        fn log_level(&self) -> HostResult<Level> {
            self.fails(Call::LogLevel).map(|_| Level::Trace)
        }
        fn log(&self, _level: Level, message: &str) {
            self.logs.borrow_mut().push(message.to_string());
        }
        fn now(&self) -> HostResult<Duration> {
            self.fails(Call::Now)?;
            Ok(Duration::from_millis(self.clock.get()))
        }
        fn header_pairs(&self, map: Map) -> HostResult<Vec<u8>> {
            match map {
                Map::RequestHeaders => self.fails(Call::RequestHeaders).map(|_| pairs(&self.request_headers.borrow())),
                Map::ResponseHeaders => self.fails(Call::ResponseHeaders).map(|_| pairs(&self.response_headers)),
                Map::CallResponseHeaders => {
                    self.fails(Call::CallResponseHeaders).map(|_| pairs(&self.call_response_headers))
                }
            }
        }
        fn set_header(&self, map: Map, name: &str, value: Option<&str>) -> HostResult<()> {
            match (map, value) {
                (Map::RequestHeaders, None) => self.fails(Call::RemoveRequestHeader)?,
                (Map::RequestHeaders, Some(_)) => self.fails(Call::SetRequestHeader)?,
                (_, _) => self.fails(Call::SetResponseHeader)?,
            }
            if map == Map::RequestHeaders {
                let mut headers = self.request_headers.borrow_mut();
                headers.retain(|(k, _)| k != name);
                if let Some(v) = value {
                    headers.push((name.to_string(), v.to_string()));
                }
            }
            Ok(())
        }
        fn buffer(&self, buffer: Buffer, start: usize, max: usize) -> HostResult<Option<Vec<u8>>> {
            let (call, data) = match buffer {
                Buffer::RequestBody => (Call::RequestBody, self.request_body.borrow().clone()),
                Buffer::ResponseBody => (Call::ResponseBody, self.response_body.borrow().clone()),
                Buffer::CallResponseBody => (Call::CallResponseBody, self.call_response_body.clone()),
                Buffer::PluginConfiguration => (Call::PluginConfiguration, self.config.clone()),
            };
            self.fails(call)?;
            let end = start.saturating_add(max).min(data.len());
            Ok(data.get(start..end).filter(|d| !d.is_empty()).map(<[u8]>::to_vec))
        }
        fn set_buffer(&self, buffer: Buffer, _start: usize, _size: usize, data: &[u8]) -> HostResult<()> {
            match buffer {
                Buffer::RequestBody => {
                    self.fails(Call::SetRequestBody)?;
                    *self.request_body.borrow_mut() = data.to_vec();
                }
                _ => *self.response_body.borrow_mut() = data.to_vec(),
            }
            Ok(())
        }
        fn shared_get(&self, key: &str) -> HostResult<(Option<Vec<u8>>, Option<u32>)> {
            self.fails(Call::SharedGet)?;
            Ok(self.shared.borrow().get(key).map_or((None, None), |(v, cas)| (Some(v.clone()), Some(*cas))))
        }
        fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> HostResult<()> {
            self.fails(Call::SharedSet)?;
            let mut shared = self.shared.borrow_mut();
            let current = shared.get(key).map(|(_, c)| *c);
            if cas.is_some() && current.is_some() && cas != current {
                return Err(HostError::CasMismatch);
            }
            shared.insert(key.to_string(), (value.to_vec(), current.unwrap_or(0) + 1));
            Ok(())
        }
        fn dispatch(&self, _cluster: &str, _h: &[(&str, &str)], body: &[u8], _t: Duration) -> HostResult<u32> {
            self.fails(Call::Dispatch)?;
            let mut d = self.dispatched.borrow_mut();
            let token = d.len() as u32 + 1;
            d.push((token, body.to_vec()));
            Ok(token)
        }
        fn send_response(&self, status: u32, _headers: &[(&str, &str)], body: &[u8]) -> HostResult<()> {
            self.fails(Call::SendResponse)?;
            self.replies.borrow_mut().push((status, String::from_utf8_lossy(body).into_owned()));
            Ok(())
        }
        fn set_tick_period(&self, _period: Duration) -> HostResult<()> {
            self.fails(Call::TickPeriod)
        }
        fn env(&self, _name: &str) -> Option<String> {
            None
        }
        fn random_u64(&self) -> u64 {
            7
        }
        fn plugin_id(&self) -> Option<String> {
            Some(self.root.clone())
        }
        fn done(&self) -> HostResult<()> {
            self.done_calls.set(self.done_calls.get() + 1);
            Ok(())
        }
    }

    fn config(usage: &str, extra: &str) -> Vec<u8> {
        let digest = crate::keys::sha256_hex(KEY);
        format!(
            r#"{{"api_keys":{{"keys":[{{"sha256":"{digest}","user":"mittens","groups":["premium"]}}]}},
                "usage":{{"cluster":"tracker"{usage}}}{extra}}}"#
        )
        .into_bytes()
    }

    fn host(extra: &str) -> FakeHost {
        host_with("", extra)
    }

    /// A host whose upstream answers a chat completion with usage (12 + 7 tokens).
    fn host_with(usage: &str, extra: &str) -> FakeHost {
        let h = FakeHost {
            config: config(usage, extra),
            root: format!("test.plugin-{}", NEXT_ROOT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)),
            response_headers: vec![
                (":status".into(), "200".into()),
                ("content-type".into(), "application/json".into()),
            ],
            ..FakeHost::default()
        };
        *h.response_body.borrow_mut() = br#"{"model":"m","usage":{"prompt_tokens":12,"completion_tokens":7}}"#.to_vec();
        h.clock.set(1_763_800_000_000);
        *h.request_headers.borrow_mut() = vec![
            (":method".into(), "POST".into()),
            (":path".into(), "/v1/chat/completions".into()),
            (":authority".into(), "gw".into()),
            ("authorization".into(), format!("Bearer {KEY}")),
            ("x-tollgate-user".into(), "smuggled".into()),
        ];
        h
    }

    fn configured(h: &FakeHost) -> Root {
        let mut root = Root::new(1);
        assert!(root.configure(h));
        root
    }

    /// One request through every callback; the local reply's status, if any.
    fn request(root: &Root, h: &FakeHost) -> (Action, Option<u32>) {
        let sent_headers = h.request_headers.borrow().clone();
        let result = request_once(root, h);
        *h.request_headers.borrow_mut() = sent_headers;
        result
    }

    fn request_once(root: &Root, h: &FakeHost) -> (Action, Option<u32>) {
        let before = h.replies.borrow().len();
        let mut s = root.stream(2);
        let action = s.request_headers(h, false);
        if action == Action::Continue {
            *h.upstream.borrow_mut() = h.request_headers.borrow().clone();
            s.request_body(h, h.request_body.borrow().len(), true);
            s.response_headers(h, false);
            s.response_body(h, h.response_body.borrow().len(), true);
        }
        s.log(h);
        let reply = h.replies.borrow().get(before).map(|(status, _)| *status);
        (action, reply)
    }

    fn sent_events(h: &FakeHost) -> Vec<serde_json::Value> {
        let d = h.dispatched.borrow();
        d.iter().flat_map(|(_, body)| serde_json::from_slice::<Vec<serde_json::Value>>(body).unwrap()).collect()
    }

    #[test]
    fn the_request_path_fails_closed_on_every_host_error_that_could_let_identity_through() {
        // (failing call, expected action, expected local reply)
        let cases = [
            (None, Action::Continue, None),
            (Some(Call::RequestHeaders), Action::Pause, Some(500)),
            (Some(Call::RemoveRequestHeader), Action::Pause, Some(500)),
            (Some(Call::SetRequestHeader), Action::Pause, Some(500)),
            // Metering's own edits and reads fail open.
            (Some(Call::ResponseHeaders), Action::Continue, None),
            (Some(Call::ResponseBody), Action::Continue, None),
            (Some(Call::RequestBody), Action::Continue, None),
            (Some(Call::SetRequestBody), Action::Continue, None),
            (Some(Call::SetResponseHeader), Action::Continue, None),
            (Some(Call::LogLevel), Action::Continue, None),
            // An API key needs no clock.
            (Some(Call::Now), Action::Continue, None),
        ];
        for (call, want_action, want_reply) in cases {
            let h = host("");
            let root = configured(&h);
            if let Some(call) = call {
                h.fail(call);
            }
            let (action, reply) = request(&root, &h);
            assert_eq!((action, reply), (want_action, want_reply), "{call:?}");
            let mut root = root;
            root.tick(&h);
            let events = sent_events(&h);
            assert_eq!(events.len(), 1, "{call:?}: every request is recorded");
            assert_eq!(events[0]["denied"].is_null(), reply.is_none(), "{call:?}: {}", events[0]);
            let metered = events[0]["prompt_tokens"] == 12;
            let want_metered = !matches!(call, Some(Call::ResponseHeaders | Call::ResponseBody)) && reply.is_none();
            assert_eq!(metered, want_metered, "{call:?}: {}", events[0]);
            if action == Action::Continue {
                assert_eq!(h.header("x-tollgate-user").as_deref(), Some("mittens"), "{call:?}");
                assert_eq!(h.header("authorization"), None, "{call:?}: credential stripped");
            }
        }
    }

    #[test]
    fn a_jwt_without_a_readable_clock_is_refused() {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine;
        use hmac::{Hmac, Mac};
        let secret = b"0123456789abcdef0123456789abcdef";
        let jwks = serde_json::to_string(&format!(
            r#"{{"keys":[{{"kty":"oct","kid":"k","k":"{}"}}]}}"#,
            URL_SAFE_NO_PAD.encode(secret)
        ))
        .unwrap();
        let h = host(&format!(r#","jwt":{{"providers":[{{"issuer":"dev","jwks":{jwks}}}]}}"#));
        let head = URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","kid":"k"}"#);
        let claims = URL_SAFE_NO_PAD.encode(r#"{"iss":"dev","sub":"alice","exp":1}"#);
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
        mac.update(format!("{head}.{claims}").as_bytes());
        let token = format!("{head}.{claims}.{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()));
        h.request_headers.borrow_mut().retain(|(k, _)| k != "authorization");
        h.request_headers.borrow_mut().push(("authorization".into(), format!("Bearer {token}")));
        let root = configured(&h);
        h.fail(Call::Now);
        assert_eq!(request(&root, &h), (Action::Pause, Some(500)), "expired by any real clock");
        h.heal();
        assert_eq!(request(&root, &h), (Action::Pause, Some(401)));
    }

    #[test]
    fn a_local_reply_that_cannot_be_sent_still_pauses() {
        let h = host("");
        h.request_headers.borrow_mut().retain(|(k, _)| k != "authorization");
        let root = configured(&h);
        h.fail(Call::SendResponse);
        assert_eq!(request(&root, &h), (Action::Pause, None));
        assert!(h.logs.borrow().iter().any(|l| l.contains("cannot send local reply")));
    }

    #[test]
    fn limits_without_shared_data_let_the_request_through_and_say_so() {
        let h = host(r#","limits":{"users":{"mittens":{"requests_per_minute":1}}}"#);
        let root = configured(&h);
        for call in [Call::SharedGet, Call::SharedSet] {
            h.heal();
            h.fail(call);
            assert_eq!(request(&root, &h), (Action::Continue, None), "{call:?}");
        }
        assert!(h.logs.borrow().iter().any(|l| l.contains("limit state unavailable")));
    }

    #[test]
    fn configuration_errors_refuse_the_config_and_tick_errors_are_logged() {
        let h = host("");
        h.fail(Call::PluginConfiguration);
        assert!(!Root::new(1).configure(&h));
        h.heal();
        h.fail(Call::TickPeriod);
        assert!(Root::new(1).configure(&h));
        assert!(h.logs.borrow().iter().any(|l| l.contains("cannot set the tick period")));
    }

    /// Every way a usage callout can end: the events are resent with the same ids until
    /// a 2xx, and nothing panics.
    #[test]
    fn failed_callouts_keep_their_events_with_their_ids() {
        // (failing call, call response headers, outcome the events should see)
        let ok = vec![(":status".to_string(), "200".to_string())];
        let cases: Vec<(Option<Call>, usize, Vec<(String, String)>, bool)> = vec![
            (None, 1, ok.clone(), true),
            // Reset after the head / mid-body / over the buffer limit: no headers.
            (None, 0, vec![], false),
            // Headers announced but unreadable.
            (Some(Call::CallResponseHeaders), 1, ok.clone(), false),
            (None, 1, vec![(":status".into(), "503".into())], false),
            (None, 1, vec![(":status".into(), "500".into())], false),
            (None, 1, vec![(":status".into(), "not a number".into())], false),
            (None, 1, vec![], false),
        ];
        for (call, num_headers, headers, delivered) in cases {
            let mut h = host("");
            h.call_response_headers = headers.clone();
            let mut root = configured(&h);
            request(&root, &h);
            root.tick(&h);
            let first = sent_events(&h);
            assert_eq!(first.len(), 1);
            if let Some(call) = call {
                h.fail(call);
            }
            root.call_response(&h, 1, num_headers, 0);
            h.heal();
            h.clock.set(h.clock.get() + 60_000); // past any back-off
            root.tick(&h);
            let all = sent_events(&h);
            let stats = root.state().unwrap().queue_stats();
            if delivered {
                assert_eq!((all.len(), stats.delivered), (1, 1), "{headers:?}");
            } else {
                assert_eq!(all.len(), 2, "{call:?} {headers:?}: resent");
                assert_eq!(all[1]["id"], first[0]["id"], "{headers:?}: same id");
                assert_eq!(stats.delivered, 0);
            }
        }
    }

    /// A live config push: a new root context, `on_done` for the old one, streams of
    /// the old one still running. Nothing queued, in flight or recorded late is lost,
    /// and the old root finishes only when its callouts are answered.
    #[test]
    fn a_config_push_hands_queued_and_in_flight_events_to_the_new_root() {
        let mut h = host("");
        h.call_response_headers = vec![(":status".into(), "200".into())];
        let mut old = configured(&h);
        request(&old, &h);
        old.tick(&h); // batch 1 in flight from the old root
        let mut late = old.stream(9); // a stream of the old root, still running
        let sent_headers = h.request_headers.borrow().clone();
        assert_eq!(late.request_headers(&h, true), Action::Continue);
        *h.request_headers.borrow_mut() = sent_headers;
        let mut new = Root::new(3);
        assert!(new.configure(&h), "the pushed config");
        request(&new, &h);
        late.response_headers(&h, true);
        late.log(&h); // recorded after the push
        assert!(!old.done(&h), "a callout is still out");
        assert_eq!(h.dispatched.borrow().len(), 2, "the old root flushed what was queued");
        old.call_response(&h, 1, 0, 0); // batch 1 failed: back to the shared queue
        assert_eq!(h.done_calls.get(), 0, "batch 2 is still out");
        old.call_response(&h, 2, 1, 0);
        assert_eq!(h.done_calls.get(), 1, "done once every callout was answered");
        h.clock.set(h.clock.get() + 60_000);
        new.tick(&h);
        let events = sent_events(&h);
        let ids: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
        assert_eq!(ids.len(), 4, "{ids:?}: batch 1, batch 2, batch 1 again");
        assert_eq!(ids[0], ids[3], "resent with its id");
        let unique: HashSet<&str> = ids.iter().copied().collect();
        assert_eq!(unique.len(), 3, "three requests");
        new.call_response(&h, 3, 1, 0);
        assert_eq!(new.state().unwrap().queue_stats().delivered, 3);
        assert!(old.done(&h), "nothing out: done at once");
    }

    #[test]
    fn a_refused_dispatch_keeps_the_events_for_the_next_tick() {
        let h = host("");
        let mut root = configured(&h);
        request(&root, &h);
        h.fail(Call::Dispatch);
        root.tick(&h);
        assert!(h.dispatched.borrow().is_empty());
        assert!(h.logs.borrow().iter().any(|l| l.contains("not sent")));
        h.heal();
        h.clock.set(h.clock.get() + 60_000);
        root.tick(&h);
        assert_eq!(sent_events(&h).len(), 1);
    }

    #[test]
    fn events_the_tracker_refused_by_index_are_counted_as_rejected() {
        let mut h = host("");
        h.call_response_headers = vec![(":status".into(), "200".into())];
        h.call_response_body =
            br#"{"accepted":1,"duplicates":0,"rejected":[{"index":1,"reason":"invalid_event","message":"m"}]}"#
                .to_vec();
        let mut root = configured(&h);
        request(&root, &h);
        request(&root, &h);
        root.tick(&h);
        root.call_response(&h, 1, 1, h.call_response_body.len());
        let stats = root.state().unwrap().queue_stats();
        assert_eq!((stats.delivered, stats.rejected), (1, 1));
        // An unreadable answer body: the batch still counts as delivered.
        h.fail(Call::CallResponseBody);
        request(&root, &h);
        root.tick(&h);
        root.call_response(&h, 2, 1, 10);
        assert_eq!(root.state().unwrap().queue_stats().delivered, 2);
    }

    #[test]
    fn denials_are_counted_apart_from_authorized_requests() {
        let h = host_with(r#","max_queue":1,"max_batch":1"#, "");
        let mut root = configured(&h);
        request(&root, &h);
        let key = h.request_headers.borrow().iter().find(|(k, _)| k == "authorization").cloned();
        h.request_headers.borrow_mut().retain(|(k, _)| k != "authorization");
        for _ in 0..1000 {
            assert_eq!(request(&root, &h), (Action::Pause, Some(401)));
        }
        if let Some(k) = key {
            h.request_headers.borrow_mut().push(k);
        }
        root.tick(&h);
        let events = sent_events(&h);
        let authorized: Vec<_> = events.iter().filter(|e| e["denied"].is_null()).collect();
        let denied: u64 = events.iter().filter_map(|e| e["count"].as_u64()).sum();
        assert_eq!((authorized.len(), denied), (1, 1000));
        assert_eq!(authorized[0]["user"], "mittens");
    }

    #[test]
    fn no_panicking_sdk_helper_is_called_from_the_filter() {
        #[cfg(not(target_arch = "wasm32"))]
        {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
            // SDK helpers that panic on an unexpected host status (proxy-wasm 0.2).
            let banned = [
                "hostcalls::get_",
                "hostcalls::set_",
                "hostcalls::send_",
                "hostcalls::add_",
                "hostcalls::remove_",
                "hostcalls::log",
                "self.get_http_",
                "self.set_http_",
                "self.add_http_",
                "self.get_shared_data",
                "self.set_shared_data",
                "self.send_http_response",
                "self.get_property",
                "self.get_current_time",
                "self.dispatch_http_call",
            ];
            let mut found = Vec::new();
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let text = std::fs::read_to_string(&path).unwrap();
                // This test names them; skip its own file's test module.
                let code: String = text
                    .split("#[cfg(test)]")
                    .next()
                    .unwrap_or("")
                    .lines()
                    .filter(|l| !l.trim_start().starts_with("//"))
                    .collect::<Vec<_>>()
                    .join("\n");
                for b in banned {
                    if code.contains(b) {
                        found.push(format!("{}: {b}", path.display()));
                    }
                }
                let calls = code.matches("hostcalls::").count();
                let allowed = usize::from(path.ends_with("abi.rs")); // dispatch_http_call, see abi.rs
                if calls > allowed {
                    found.push(format!("{}: {calls} hostcalls:: uses", path.display()));
                }
            }
            assert!(found.is_empty(), "{found:#?}");
        }
    }
}
