//! The filter's callbacks as plain functions of a [`Host`]: what to do with every host
//! call's answer, failures included. The proxy-wasm glue (`glue`) only forwards the
//! SDK's callbacks here with the real host (`abi::Abi`); the tests below drive the same
//! code with a host that fails on purpose.
//!
//! The rule for a failing host call: **auth fails closed, metering fails open.** A
//! request whose headers cannot be read, whose smuggled identity headers cannot be
//! removed, whose credential cannot be stripped or whose clock cannot be read (for a
//! JWT) is answered 500; a response whose headers or body cannot be read is served and
//! its event recorded as `usage_missing` (and charged its estimate); a callout that
//! fails, arrives without headers or cannot be dispatched leaves its events queued for
//! the next tick, with their ids. One exception to metering failing open: a request
//! body whose `content-length` was already promised upstream (see `request`) and that
//! cannot be made that long is answered 500, rather than left hanging upstream. Limit
//! state that cannot be read or written follows `limits.on_contention` (deny: 503).

use std::borrow::Cow;
use std::cell::{OnceCell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use crate::auth::{decide_with, AuthError, CredentialCache, RemoteKey, Verdict};
use crate::config::{CorsPreflight, Metering, Settings, UsageSettings};
use crate::credentials::find_credential_value;
use crate::events::{report_path, EventIds, EventQueue, QueueLimits, QueueStats, SendOutcome, UsageEvent};
use crate::header_map::{self, HeaderPairs};
use crate::host::{Buffer, Host, HostError, Level, Map};
use crate::jwt::{Jwks, JwtError};
use crate::lease::{Admission, Ask, GlobalTicket, Leases, SYNC_PATH};
use crate::limits::{
    state_key, Headroom, LimitError, LimitSpec, LimitState, Limits, OnContention, Reservation, Scope,
    IDENTITY_COUNT_KEY, OVERFLOW_KEY,
};
use crate::remote_jwks::{self, Claim, Entry, Keys, RemoteJwks, WorkerSets};
use crate::remote_keys::{self, CachedKey, KeyLookups, RemoteKeys, Start};
use crate::request::{prompt_estimate, route_of, BodyScan, Facts, Route, MAX_GROWTH};
use crate::response::{openai_error_body, ratelimit_headers, LocalReply};
use crate::strip::UsageOnlyStripper;
use crate::usage::{BodyKind, UsageParser, DEFAULT_MAX_CARRY};

/// Request bodies are held whole (for an in-place rewrite) up to this size; the rest of
/// a larger body passes as it comes, and only its tail (from the closing brace) is held.
/// Far below Envoy's per-stream buffer limit (1 MiB by default), so holding never gets
/// a request a 413.
const MAX_BUFFERED_BODY: u64 = 64 * 1024;
/// Usage batches in flight at once per worker.
const MAX_IN_FLIGHT: usize = 4;
/// Compare-and-swap rounds before a shared-data update gives up.
const CAS_ATTEMPTS: usize = 16;
/// Longest wait between two attempts while the tracker is failing.
const BACKOFF_MAX_MS: u64 = 10_000;
/// Most of a tracker answer read (to count the events it refused).
const MAX_CALL_RESPONSE_BODY: usize = 64 * 1024;
/// Most of a key service answer read.
const MAX_KEY_ANSWER: usize = 16 * 1024;
/// Most of a changes answer read (10 000 digests).
const MAX_CHANGES_ANSWER: usize = 1 << 20;
/// Most of a lease answer read (a sync of `MAX_LEASES_PER_SYNC` windows fits).
const MAX_LEASE_ANSWER: usize = 2 * 1024 * 1024;
/// Cached JWTs are re-verified at least this often, whatever their `exp`.
const TOKEN_CACHE_MAX_AGE_SECS: u64 = 300;
/// With remote JWKS, roots tick at least this often: to start fetches, and to wake
/// requests waiting for a set another worker fetched.
const JWKS_TICK_MS: u64 = 250;
/// Requests of one worker waiting for a provider's keys at once, at most.
const MAX_JWKS_WAITERS: usize = 1024;

/// What the host should do with the stream after a callback (`Pause` by default: the
/// safe answer for a request nothing could decide).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Action {
    Continue,
    #[default]
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

/// Response bytes of this VM (one worker) copied out of chunks that went on before they
/// were parsed (see [`Stream::response_body`]); beyond [`MAX_DEFERRED_BYTES`], chunks are
/// parsed before they go on.
static DEFERRED_BYTES: AtomicUsize = AtomicUsize::new(0);
const MAX_DEFERRED_BYTES: usize = 8 * 1024 * 1024;

/// A response chunk passed on unparsed: parsed at the stream's next body callback, or at
/// `on_log`. Counted in [`DEFERRED_BYTES`] while it lives.
struct Unparsed(Vec<u8>);

impl Unparsed {
    /// The chunk, deferred; or back if the worker's bound would be passed.
    fn defer(bytes: Vec<u8>) -> Result<Unparsed, Vec<u8>> {
        let n = bytes.len();
        let room = |held: usize| held.checked_add(n).filter(|&t| t <= MAX_DEFERRED_BYTES);
        match DEFERRED_BYTES.fetch_update(Ordering::Relaxed, Ordering::Relaxed, room) {
            Ok(_) => Ok(Unparsed(bytes)),
            Err(_) => Err(bytes),
        }
    }
}

impl Drop for Unparsed {
    fn drop(&mut self) {
        DEFERRED_BYTES.fetch_sub(self.0.len(), Ordering::Relaxed);
    }
}

/// What a configured root context shares with its HTTP contexts.
pub struct State {
    settings: Settings,
    credentials: RefCell<CredentialCache>,
    /// Usage events waiting for a root context's next tick: this plugin's queue in
    /// this VM, shared with the root contexts of later config pushes (see [`QUEUES`]).
    queue: Rc<RefCell<EventQueue>>,
    /// Global limits: this worker's leases (see [`LEASES`]).
    leases: Option<Rc<RefCell<Leases>>>,
    /// Managed keys: this worker's lookups in flight and their bounds.
    lookups: RefCell<KeyLookups>,
    /// Remote JWKS: this plugin's shared-data prefix, the sets parsed on this worker,
    /// and the requests waiting for a set.
    plugin_id: String,
    jwks_sets: RefCell<WorkerSets>,
    jwks_waits: Rc<RefCell<JwksWaits>>,
}

/// Requests of this worker waiting for a provider's keys (`remote_jwks`): by provider
/// index, (context id, since when, ms); and the providers a request asked to refetch
/// (an unknown `kid`).
#[derive(Debug, Default)]
struct JwksWaits {
    waiting: HashMap<usize, Vec<(u32, u64)>>,
    refetch: HashSet<usize>,
}

impl JwksWaits {
    fn count(&self) -> usize {
        self.waiting.values().map(Vec::len).sum()
    }

    /// The waiters of `provider` that `ready` selects (by their start time), removed.
    fn take(&mut self, provider: usize, ready: impl Fn(u64) -> bool) -> Vec<u32> {
        let Some(list) = self.waiting.get_mut(&provider) else { return Vec::new() };
        let (go, stay): (Vec<_>, Vec<_>) = list.drain(..).partition(|(_, since)| ready(*since));
        *list = stay;
        go.into_iter().map(|(ctx, _)| ctx).collect()
    }

    fn leave(&mut self, provider: usize, ctx: u32) {
        if let Some(list) = self.waiting.get_mut(&provider) {
            list.retain(|(c, _)| *c != ctx);
        }
    }
}

impl State {
    /// The shared-data key of provider `index`'s fetched set.
    fn jwks_key(&self, index: usize) -> Option<String> {
        Some(remote_jwks::shared_key(&self.plugin_id, self.settings.jwt.issuer(index)?))
    }

    /// Provider `index`'s fetched set, as the request path uses it: `None` for a
    /// provider with configured keys; `KeysUnavailable` when none was fetched yet or
    /// the last good one is older than `max_age_seconds`.
    fn remote_jwks(&self, host: &impl Host, index: usize, now_ms: u64) -> Option<Result<Rc<Jwks>, JwtError>> {
        let conf = self.settings.jwt_remote.get(index)?.as_ref()?;
        let unavailable = Some(Err(JwtError::KeysUnavailable));
        let Some(key) = self.jwks_key(index) else { return unavailable };
        let Ok((bytes, cas)) = host.shared_get(&key) else { return unavailable };
        let Ok(mut sets) = self.jwks_sets.try_borrow_mut() else { return unavailable };
        match sets.keys(index, bytes.as_deref(), cas) {
            Keys::Set(keys, fetched_ms) if now_ms < fetched_ms.saturating_add(conf.max_age_seconds * 1000) => {
                Some(Ok(keys))
            }
            _ => unavailable,
        }
    }
}

type PerPlugin<T> = RefCell<HashMap<String, Rc<RefCell<T>>>>;

thread_local! {
    /// Each plugin's (name and root id's) event queue in this VM — one VM per worker, so one
    /// queue per worker and plugin. A live config push (Istio's every `pluginConfig`
    /// change) makes Envoy create a new root context and send the old one `on_done`;
    /// the queue outlives both, so what the old root held (queued events, batches in
    /// flight) and what its HTTP contexts still record reaches the tracker through the
    /// new one.
    static QUEUES: PerPlugin<EventQueue> = RefCell::new(HashMap::new());
    /// Each plugin's leases in this VM (global limits), kept across config pushes like
    /// the queue: what a worker was granted and used stays its own.
    static LEASES: PerPlugin<Leases> = RefCell::new(HashMap::new());
    /// Each plugin's requests waiting for a remote JWKS in this VM, kept across config
    /// pushes so the new root context wakes what waited under the old one.
    static JWKS_WAITS: PerPlugin<JwksWaits> = RefCell::new(HashMap::new());
}

/// Plugin `plugin_id`'s value in `map` (made by `make` if new), updated by `update`.
fn per_plugin<T>(
    map: &'static std::thread::LocalKey<PerPlugin<T>>,
    plugin_id: &str,
    make: impl FnOnce() -> T,
    update: impl FnOnce(&mut T),
) -> Rc<RefCell<T>> {
    map.with(|values| {
        let value = match values.try_borrow_mut() {
            Ok(mut values) => {
                values.entry(plugin_id.to_string()).or_insert_with(|| Rc::new(RefCell::new(make()))).clone()
            }
            Err(_) => Rc::new(RefCell::new(make())),
        };
        if let Ok(mut v) = value.try_borrow_mut() {
            update(&mut v);
        }
        value
    })
}

/// The queue of plugin `plugin_id` in this VM, with these limits, created if new.
fn plugin_queue(plugin_id: &str, limits: QueueLimits, random: impl FnOnce() -> u64) -> Rc<RefCell<EventQueue>> {
    per_plugin(&QUEUES, plugin_id, || EventQueue::new(limits, EventIds::new(random())), |q| q.set_limits(limits))
}

/// The leases of plugin `plugin_id` in this VM; a new worker is a new replica to the
/// trackers, with a random id.
fn plugin_leases(plugin_id: &str, limits: &Limits, random: impl FnOnce() -> u64) -> Rc<RefCell<Leases>> {
    let max_users = usize::try_from(limits.max_identities).unwrap_or(usize::MAX);
    per_plugin(
        &LEASES,
        plugin_id,
        || Leases::new(format!("gw-{:016x}", random()), limits.sync_interval_ms, max_users),
        |l| l.set_interval(limits.sync_interval_ms, max_users),
    )
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
    /// Lease syncs in flight (also in `sent`): their sequence numbers, and their bodies
    /// until they were retried once.
    syncs: HashMap<u32, (u64, Option<Vec<u8>>)>,
    /// Ticks so far, and every how many ticks usage is flushed and leases synced.
    ticks: u64,
    flush_every: u64,
    sync_every: u64,
    changes_every: u64,
    /// The poll of the key service's changes in flight (also in `sent`).
    changes: Option<u32>,
    /// Remote JWKS fetches in flight (also in `sent`): the provider of each.
    jwks_fetches: HashMap<u32, usize>,
}

impl Root {
    pub fn new(context_id: u32) -> Root {
        Root {
            context_id,
            state: None,
            last_stats: QueueStats::default(),
            sent: HashSet::new(),
            finishing: false,
            syncs: HashMap::new(),
            ticks: 0,
            flush_every: 1,
            sync_every: 1,
            changes_every: 1,
            changes: None,
            jwks_fetches: HashMap::new(),
        }
    }

    pub fn context_id(&self) -> u32 {
        self.context_id
    }

    pub fn state(&self) -> Option<&Rc<State>> {
        self.state.as_ref()
    }

    pub fn start(&self, host: &impl Host) -> bool {
        refresh_log_level(host);
        // At warn: Istio runs the proxy at log level `warning`, and which build Envoy
        // loaded is worth one line per VM start.
        log(
            host,
            Level::Warn,
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
        let plugin_id = host.plugin_id().unwrap_or_default();
        let global = settings.limits.as_ref().filter(|l| l.scope == Scope::Global);
        let leases = global.map(|l| plugin_leases(&plugin_id, l, || host.random_u64()));
        // One tick for all periodic work: the shortest period, the others every so many ticks.
        let flush_ms = settings.usage.as_ref().map(|u| u.flush_interval_ms);
        let sync_ms = global.map(|l| l.sync_interval_ms);
        let changes_ms = settings.remote_keys.as_ref().map(|r| r.changes_interval_seconds * 1000);
        let jwks_ms = settings.jwt_remote.iter().any(Option::is_some).then_some(JWKS_TICK_MS);
        if let Some(tick_ms) = [flush_ms, sync_ms, changes_ms, jwks_ms].into_iter().flatten().min() {
            let every = |period: Option<u64>| (period.unwrap_or(tick_ms) / tick_ms.max(1)).max(1);
            (self.flush_every, self.sync_every, self.changes_every) =
                (every(flush_ms), every(sync_ms), every(changes_ms));
            if let Err(status) = host.set_tick_period(Duration::from_millis(tick_ms.max(1))) {
                log(host, Level::Error, self.context_id, format_args!("cannot set the tick period: {status:?}"));
            }
        }
        let queue = plugin_queue(&plugin_id, limits, || host.random_u64());
        let lookups = RefCell::new(KeyLookups::default());
        let jwks_waits = per_plugin(&JWKS_WAITS, &plugin_id, JwksWaits::default, |_| {});
        self.state = Some(Rc::new(State {
            settings,
            credentials: RefCell::new(cache),
            queue,
            leases,
            lookups,
            plugin_id,
            jwks_sets: RefCell::new(WorkerSets::default()),
            jwks_waits,
        }));
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

    /// The periodic work; returns the requests to wake (remote JWKS waits that ended).
    pub fn tick(&mut self, host: &impl Host) -> Vec<Wake> {
        refresh_log_level(host);
        let Some(state) = self.state.clone() else { return Vec::new() };
        let tick = self.ticks;
        self.ticks = self.ticks.wrapping_add(1);
        let wakes = self.jwks_tick(host, &state);
        if tick.is_multiple_of(self.changes_every) {
            self.poll_key_changes(host, &state);
        }
        let Some(usage) = &state.settings.usage else { return wakes };
        if tick.is_multiple_of(self.sync_every) {
            self.sync(host, usage, &state);
        }
        if tick.is_multiple_of(self.flush_every) {
            self.flush(host, usage, &state);
        }
        wakes
    }

    /// Remote JWKS: for each provider, claims and sends the fetch that is due (first,
    /// refresh, or an unknown kid's refetch within its rate limit), and wakes this
    /// worker's requests whose wait is over: a set was fetched since they began, no
    /// refetch will be made for them, or `wait_ms` passed (then refused, 503).
    fn jwks_tick(&mut self, host: &impl Host, state: &State) -> Vec<Wake> {
        let mut ready = Vec::new();
        let mut expired = Vec::new();
        let now = now_ms(host);
        for (index, conf) in state.settings.jwt_remote.iter().enumerate() {
            let Some(conf) = conf else { continue };
            let Some(key) = state.jwks_key(index) else { continue };
            let Ok((bytes, cas)) = host.shared_get(&key) else { continue };
            let entry = Entry::decode(bytes.as_deref());
            let Ok(mut waits) = state.jwks_waits.try_borrow_mut() else { continue };
            let refetch = waits.refetch.remove(&index);
            let mine = self.jwks_fetches.values().any(|i| *i == index);
            let mut fetching = mine || entry.fetch_in_flight(now, conf);
            if !mine {
                if let Some(claim) = entry.due(now, conf, refetch) {
                    let claimed = entry.claimed(claim, now);
                    // A lost CAS: another worker claimed it at the same time.
                    fetching = match host.shared_set(&key, &claimed.encode(), cas) {
                        Ok(()) => self.fetch_jwks(host, index, conf, claim),
                        Err(e) => e == HostError::CasMismatch,
                    };
                }
            }
            // Woken: a set newer than their wait; or, when no fetch is under way, all
            // (they see the set as it is: a kid still unknown is refused, 401).
            let fetched_ms = entry.fetched_ms;
            ready.extend(waits.take(index, |since| !entry.jwks.is_empty() && (fetched_ms >= since || !fetching)));
            expired.extend(waits.take(index, |since| now >= since.saturating_add(conf.wait_ms)));
        }
        let mut wakes = Vec::new();
        if !ready.is_empty() {
            wakes.push(Wake { contexts: ready, done: true });
        }
        if !expired.is_empty() {
            wakes.push(Wake { contexts: expired, done: false });
        }
        wakes
    }

    /// Sends a claimed fetch of provider `index`'s JWKS; true when it went out.
    fn fetch_jwks(&mut self, host: &impl Host, index: usize, conf: &RemoteJwks, claim: Claim) -> bool {
        let timeout = Duration::from_millis(conf.timeout_ms);
        match host.dispatch(&conf.cluster, &conf.headers(), &[], timeout) {
            Ok(token) => {
                self.sent.insert(token);
                self.jwks_fetches.insert(token, index);
                log(host, Level::Debug, self.context_id, format_args!("jwks fetch {claim:?} for provider {index}"));
                true
            }
            Err(status) => {
                log(
                    host,
                    Level::Warn,
                    self.context_id,
                    format_args!("jwks fetch for provider {index} not sent (cluster {}): {status:?}", conf.cluster),
                );
                false
            }
        }
    }

    /// A JWKS fetch answered: a usable set replaces the shared one (a failure keeps the
    /// last good set); this worker's waiters of that provider go on.
    fn jwks_answer(&mut self, host: &impl Host, index: usize, answer: (usize, usize)) -> Vec<Wake> {
        let Some(state) = self.state.clone() else { return Vec::new() };
        let Some(key) = state.jwks_key(index) else { return Vec::new() };
        let (status, body) = call_answer(host, answer.0, answer.1, remote_jwks::MAX_JWKS_BYTES);
        let now = now_ms(host);
        let issuer = state.settings.jwt.issuer(index).unwrap_or_default();
        match remote_jwks::check_answer(status, body.as_deref()) {
            Ok(text) => {
                let stored = update_shared(host, &key, |bytes| {
                    let entry = Entry::decode(Some(bytes).filter(|b| !b.is_empty()));
                    (Some(entry.fetched(text.clone(), now).encode()), ())
                });
                if stored.is_none() {
                    log(host, Level::Warn, self.context_id, format_args!("jwks of {issuer}: cannot store the set"));
                } else {
                    log(host, Level::Info, self.context_id, format_args!("jwks of {issuer} fetched"));
                }
            }
            Err(why) => log(
                host,
                Level::Warn,
                self.context_id,
                format_args!("jwks fetch of {issuer} failed ({why}); the last good set is kept"),
            ),
        }
        let contexts = state.jwks_waits.try_borrow_mut().map(|mut w| w.take(index, |_| true)).unwrap_or_default();
        if contexts.is_empty() {
            Vec::new()
        } else {
            vec![Wake { contexts, done: true }]
        }
    }

    /// Asks the key service which keys were revoked (or expired) since the last poll,
    /// so they stop on this worker before their cache entries age out.
    fn poll_key_changes(&mut self, host: &impl Host, state: &State) {
        let Some(service) = &state.settings.remote_keys else { return };
        if self.changes.is_some() {
            return;
        }
        let now = now_ms(host);
        let since = state.lookups.try_borrow().ok().and_then(|l| l.changes_since_ms);
        // The first poll looks back one ttl: entries cached before this root started.
        let since = since.unwrap_or_else(|| now.saturating_sub(service.ttl_seconds * 1000));
        let path = format!("{}?since={since}", service.changes_path);
        let headers = service.headers("GET", &path);
        if let Ok(token) = host.dispatch(&service.cluster, &headers, &[], Duration::from_millis(service.timeout_ms)) {
            self.sent.insert(token);
            self.changes = Some(token);
        }
    }

    /// The revoked digests: a negative entry in their cache slots, out of this worker's
    /// memo. A failed poll is asked again from the same point.
    fn key_changes(&mut self, host: &impl Host, answer: (usize, usize)) {
        let Some(state) = self.state.clone() else { return };
        let Some(service) = &state.settings.remote_keys else { return };
        let (status, body) = call_answer(host, answer.0, answer.1, MAX_CHANGES_ANSWER);
        let Some(changes) = body.and_then(|b| serde_json::from_slice::<remote_keys::Changes>(&b).ok()) else {
            log(host, Level::Debug, self.context_id, format_args!("key changes not read (status {status:?})"));
            return;
        };
        let now_s = now_ms(host) / 1000;
        for hex_digest in &changes.revoked {
            let mut digest = [0u8; 32];
            if hex::decode_to_slice(hex_digest, &mut digest).is_err() {
                continue;
            }
            store_key(host, service, &digest, CachedKey { digest: hex::encode(digest), cached_s: now_s, key: None });
            if let Ok(mut cache) = state.credentials.try_borrow_mut() {
                cache.remote.remove(&digest);
            }
        }
        if let Ok(mut lookups) = state.lookups.try_borrow_mut() {
            // A second of overlap: a revocation committed as the answer was formed.
            lookups.changes_since_ms = Some(changes.now.saturating_sub(1_000));
        }
        if !changes.revoked.is_empty() {
            log(host, Level::Info, self.context_id, format_args!("{} managed keys revoked", changes.revoked.len()));
        }
    }

    /// Reports this worker's leases to the trackers (one sync in flight at a time).
    fn sync(&mut self, host: &impl Host, usage: &UsageSettings, state: &State) {
        let Some(leases) = &state.leases else { return };
        if !self.syncs.is_empty() {
            return;
        }
        let Ok(mut leases) = leases.try_borrow_mut() else { return };
        let Some(body) = leases.sync_body(now_ms(host)) else { return };
        let seq = leases.last_seq();
        let headers = usage.headers_for(SYNC_PATH);
        match host.dispatch(&usage.cluster, &headers, &body, Duration::from_millis(usage.timeout_ms)) {
            Ok(token) => {
                self.sent.insert(token);
                self.syncs.insert(token, (seq, Some(body)));
            }
            Err(status) => {
                let changed = leases.unreachable(now_ms(host));
                drop(leases);
                log_reachability(host, self.context_id, changed, false, format_args!("sync not sent: {status:?}"));
            }
        }
    }

    /// Sends what the queue holds, a batch at a time, up to the in-flight bound.
    fn flush(&mut self, host: &impl Host, usage: &UsageSettings, state: &State) {
        let Ok(mut queue) = state.queue.try_borrow_mut() else { return };
        let timeout = Duration::from_millis(usage.timeout_ms);
        // `:method`, `:path`, `:authority`, content type, and the tracker's ingest token.
        let headers = usage.report_headers();
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

    /// The answer to a sync; a failed one is sent once more (the cluster may pick
    /// another tracker replica) before it counts as a failure.
    fn sync_answer(&mut self, host: &impl Host, seq: u64, body: Option<Vec<u8>>, answer: (usize, usize)) {
        let Some(state) = self.state.clone() else { return };
        let (Some(leases), Some(usage)) = (&state.leases, &state.settings.usage) else { return };
        let (status, reply) = call_answer(host, answer.0, answer.1, MAX_LEASE_ANSWER);
        if let (None, Some(body)) = (&reply, body) {
            let timeout = Duration::from_millis(usage.timeout_ms);
            if let Ok(token) = host.dispatch(&usage.cluster, &usage.headers_for(SYNC_PATH), &body, timeout) {
                self.sent.insert(token);
                self.syncs.insert(token, (seq, None));
                return;
            }
        }
        lease_answer(host, self.context_id, leases, seq, (status, reply.as_deref()));
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
    pub fn call_response(&mut self, host: &impl Host, token: u32, num_headers: usize, body_size: usize) -> Vec<Wake> {
        self.sent.remove(&token);
        let mut wakes = Vec::new();
        if let Some(index) = self.jwks_fetches.remove(&token) {
            wakes = self.jwks_answer(host, index, (num_headers, body_size));
        } else if let Some((seq, body)) = self.syncs.remove(&token) {
            self.sync_answer(host, seq, body, (num_headers, body_size));
        } else if self.changes == Some(token) {
            self.changes = None;
            self.key_changes(host, (num_headers, body_size));
        } else {
            self.record_response(host, token, num_headers, body_size);
        }
        if self.finishing && self.sent.is_empty() {
            if let Err(status) = host.done() {
                log(host, Level::Error, self.context_id, format_args!("cannot finish the root context: {status:?}"));
            }
        }
        wakes
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
        if matches!(status, Some(401 | 403)) {
            log(
                host,
                Level::Warn,
                self.context_id,
                format_args!("the tracker refuses the ingest token (status {status:?}); usage kept and resent"),
            );
        } else if outcome != SendOutcome::Delivered {
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
        let (stats, backlog) = (queue.stats(), queue.backlog());
        drop(queue);
        if refused > 0 {
            self.log_losses(host, stats);
        }
        // The tracker took a batch and full ones wait: the next goes now, not at the next
        // tick, so delivery keeps up with traffic (in-flight bound as ever). A root that
        // is finishing sends nothing new.
        if outcome == SendOutcome::Delivered && backlog && !self.finishing {
            if let Some(usage) = &state.settings.usage {
                self.flush(host, usage, &state);
            }
        }
    }

    /// A new HTTP context of this root.
    pub fn stream(&self, context_id: u32) -> Stream {
        Stream::new(context_id, self.state.clone())
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

/// The answer of a callout: its status (None: it failed) and, on a 200, its body.
fn call_answer(host: &impl Host, num_headers: usize, body_size: usize, max: usize) -> (Option<u32>, Option<Vec<u8>>) {
    if num_headers == 0 {
        return (None, None);
    }
    let raw = host.header_pairs(Map::CallResponseHeaders).ok();
    let headers = raw.as_deref().and_then(header_map::parse).unwrap_or_default();
    let status = header_map::find(&headers, ":status").and_then(|s| s.trim().parse::<u32>().ok());
    let body = if status == Some(200) && body_size > 0 {
        host.buffer(Buffer::CallResponseBody, 0, body_size.min(max)).ok().flatten()
    } else {
        None
    };
    (status, body)
}

/// Applies the trackers' answer to message `seq` (a sync or an acquire), or its final
/// failure (`body` None, after its one retry), to `leases`.
fn lease_answer(
    host: &impl Host,
    context_id: u32,
    leases: &RefCell<Leases>,
    seq: u64,
    (status, body): (Option<u32>, Option<&[u8]>),
) {
    let now_ms = now_ms(host);
    let Ok(mut leases) = leases.try_borrow_mut() else { return };
    let changed = leases.answered(body, seq, now_ms);
    let reachable = leases.reachable();
    drop(leases);
    log_reachability(host, context_id, changed, reachable, format_args!("status {status:?}"));
}

/// One line when the trackers stop or start answering lease callouts.
fn log_reachability(
    host: &impl Host,
    context_id: u32,
    changed: bool,
    reachable: bool,
    detail: std::fmt::Arguments<'_>,
) {
    if !changed {
        return;
    }
    if reachable {
        log(host, Level::Warn, context_id, format_args!("global limits: the trackers answer again; leases resume"));
    } else {
        log(
            host,
            Level::Warn,
            context_id,
            format_args!(
                "global limits: the trackers cannot be reached ({detail}); admitting from the leases held, then a share of each limit"
            ),
        );
    }
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
    parser: Option<UsageParser>,
    /// The last response chunk, passed on before the parser read it.
    unparsed: Option<Unparsed>,
    response_done: bool,
    /// The limit state this request was admitted under, to settle its tokens with.
    limit: Option<LimitTicket>,
    /// Set when the filter forced include_usage: the usage-only event is removed again.
    stripper: Option<UsageOnlyStripper>,
    /// The body of a metered inference request, as it passes.
    body: Option<Box<RequestBody>>,
    /// What the request may cost: charged when no usage can be read.
    estimate: Option<Estimate>,
    /// Waiting for a lease (global limits): the acquire callout and where to go on.
    waiting: Option<Waiting>,
    /// The request waited for a lease in its headers / its body already (once each).
    waited_headers: bool,
    waited_body: bool,
    /// Its API key was looked up already (a second miss is a 503).
    looked_up: bool,
    /// It waited for a provider's keys already (`remote_jwks`; once per request).
    jwks_waited: bool,
    /// Body (size, end of stream) and trailers that arrived while the headers waited.
    pending_body: Option<(usize, bool)>,
    pending_trailers: bool,
}

/// A request paused for an acquire callout.
struct Waiting {
    token: u32,
    resume: Resume,
    /// The acquire and its sequence number, kept to try once more if the first
    /// answer fails.
    body: Vec<u8>,
    seq: u64,
    retried: bool,
    /// A key lookup (managed keys) rather than a lease: the digest. `token` 0: another
    /// request of this worker sent the lookup.
    key: Option<[u8; 32]>,
    /// A wait for a provider's keys (`remote_jwks`): its index; woken by the root.
    jwks: Option<usize>,
}

/// Requests to wake after a key lookup ended in another stream (see `glue`): they
/// wait for the same digest. `done`: the lookup was answered (or failed); else its
/// owner went away and they are refused (retryable).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Wake {
    pub contexts: Vec<u32>,
    pub done: bool,
}

/// Where a request that waited for a lease goes on: its headers are admitted again,
/// or the end of its body.
#[derive(Debug, Clone, Copy)]
enum Resume {
    Headers { end_of_stream: bool },
    Body { size: u64, trailers: bool },
}

struct LimitTicket {
    /// Shared-data key (local scope); empty with global scope.
    key: String,
    /// Global scope: what the request holds of its worker's leases.
    global: Option<GlobalTicket>,
    spec: LimitSpec,
    headroom: Headroom,
    reservation: Reservation,
    /// Admitted on its request limits; its tokens are reserved (and checked) once the
    /// body says how many it may cost.
    pending: bool,
}

/// The request body of a metered inference request.
struct RequestBody {
    route: Route,
    /// The scanner (absent when the body is only counted, or could not be read).
    scan: Option<BodyScan>,
    /// `stream_options.include_usage` may be forced into it.
    rewrite: bool,
    /// The `content-length` sent upstream (the client's plus `MAX_GROWTH`): the body is
    /// padded to exactly that.
    promised: Option<u64>,
    /// Bytes passed upstream already.
    sent: u64,
    /// Bytes held in the host's buffer (already fed to the scanner).
    held: u64,
    done: bool,
}

/// Tokens a request may cost, from its body: charged (flagged `usage_estimated`) when
/// its usage cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Estimate {
    prompt: u64,
    completion: u64,
}

impl Estimate {
    fn total(self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }
}

impl RequestBody {
    /// The estimate of a body of `total` bytes, from what the scan read of it.
    fn estimate(&self, total: u64, metering: Metering) -> Estimate {
        let facts = self.scan.as_ref().map(BodyScan::facts).unwrap_or_default();
        Estimate {
            prompt: prompt_estimate(total, metering.prompt_bytes_per_token),
            completion: facts.completion_budget(self.route, metering.default_max_tokens),
        }
    }
}

fn new_event(headers: &HeaderPairs<'_>, ts: Duration) -> UsageEvent {
    let get = |name| header_map::get(headers, name);
    UsageEvent::started(get(":method"), get(":authority"), get(":path"), ts.as_secs_f64())
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

type LocalAdmission = Result<(Headroom, Reservation), LimitError>;

/// Admits a request against its user's limit state, reserving `reserve` tokens: one
/// shared-data read and one compare-and-swap write in the common case. A user seen for
/// the first time is counted; beyond `max_identities` new users share one overflow
/// state (stricter, never looser), since Envoy's shared data has no expiry or deletion.
fn admit_shared(
    host: &impl Host,
    limits: &Limits,
    spec: &LimitSpec,
    user: &str,
    now_ms: u64,
    reserve: u64,
) -> Option<(String, LocalAdmission)> {
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
        match state.admit_reserving(spec, now_ms, reserve) {
            Ok(h) => (Some(state.encode()), Ok(h)),
            Err(e) => (None, Err(e)),
        }
    })?;
    Some((key, verdict))
}

/// The shared cache slot of `digest` and its CAS, as stored (any digest).
fn key_slot(host: &impl Host, service: &RemoteKeys, digest: &[u8; 32]) -> (Option<CachedKey>, Option<u32>) {
    match host.shared_get(&remote_keys::slot_key(digest, service.max_entries)) {
        Ok((bytes, cas)) => (bytes.and_then(|b| CachedKey::decode(&b)), cas),
        Err(_) => (None, None),
    }
}

/// Writes an answer into the slot of `digest` unless the slot holds another key still
/// usable that this answer must not evict (`CachedKey::replaces`). Best effort: a
/// negative answer that loses a race (CAS) or a failed write leaves the slot as it was.
fn store_key(host: &impl Host, service: &RemoteKeys, digest: &[u8; 32], entry: CachedKey) {
    let (existing, cas) = key_slot(host, service, digest);
    if !entry.replaces(existing.as_ref(), entry.cached_s, service) {
        return;
    }
    let cas = if entry.key.is_some() { None } else { cas };
    if let Some(bytes) = entry.encode() {
        let _ = host.shared_set(&remote_keys::slot_key(digest, service.max_entries), &bytes, cas);
    }
}

/// What the shared cache of the key service says of `digest` (see `remote_keys`).
fn remote_cached(host: &impl Host, state: &State, digest: &[u8; 32], now_s: u64) -> RemoteKey {
    let Some(service) = &state.settings.remote_keys else { return RemoteKey::Invalid };
    let (down, unknown) = match state.lookups.try_borrow() {
        Ok(l) => (l.down, l.is_unknown(digest, now_s, service.negative_ttl_seconds)),
        Err(_) => (false, false),
    };
    if unknown {
        return RemoteKey::Invalid;
    }
    let (slot, _) = key_slot(host, service, digest);
    match remote_keys::classify(slot, &hex::encode(digest), now_s, service, down) {
        remote_keys::Cached::Valid(key, at) => RemoteKey::Known(key, at),
        remote_keys::Cached::Invalid => RemoteKey::Invalid,
        remote_keys::Cached::Lookup(_) => RemoteKey::Lookup,
    }
}

/// Admits a request against its worker's leases (global scope); `None` when they are
/// busy or hold too many users.
fn admit_global(
    state: &State,
    spec: &LimitSpec,
    user: &str,
    ask: Ask,
    now_ms: u64,
    may_wait: bool,
) -> Option<Admission> {
    state.leases.as_ref()?.try_borrow_mut().ok()?.admit(spec, user, ask, now_ms, may_wait)
}

/// Reserves `tokens` in an admitted request's limit state (once its body is read).
fn reserve_shared(host: &impl Host, key: &str, spec: &LimitSpec, tokens: u64, now_ms: u64) -> Option<LocalAdmission> {
    update_shared(host, key, |bytes| {
        let mut state = LimitState::decode(bytes);
        match state.reserve(spec, now_ms, tokens) {
            Ok(h) => (Some(state.encode()), Ok(h)),
            Err(e) => (None, Err(e)),
        }
    })
}

/// A CORS preflight: `OPTIONS` with `Origin` and `Access-Control-Request-Method`.
fn is_preflight(headers: &HeaderPairs<'_>) -> bool {
    header_map::get(headers, ":method") == "OPTIONS"
        && header_map::contains(headers, "origin")
        && header_map::contains(headers, "access-control-request-method")
}

/// Sets the `x-ratelimit-*` headers on the response: with one call that rewrites the
/// map read in `headers` (its other headers kept as they are, in order), instead of
/// one call each; one by one when the map could not be read whole or has a value
/// that is not UTF-8 (read lossily, it must not be written back).
fn write_ratelimit_headers(
    host: &impl Host,
    headers: Option<&[(Cow<'_, str>, Cow<'_, str>)]>,
    ours: &[(&str, String)],
) {
    let intact = |h: &&[(Cow<'_, str>, Cow<'_, str>)]| {
        !h.is_empty() && h.iter().all(|(k, v)| matches!((k, v), (Cow::Borrowed(_), Cow::Borrowed(_))))
    };
    if let Some(headers) = headers.filter(intact) {
        let mut pairs: Vec<(&str, &str)> = Vec::with_capacity(headers.len() + ours.len());
        pairs.extend(
            headers
                .iter()
                .filter(|(k, _)| !ours.iter().any(|(name, _)| k.eq_ignore_ascii_case(name)))
                .map(|(k, v)| (k.as_ref(), v.as_ref())),
        );
        pairs.extend(ours.iter().map(|(k, v)| (*k, v.as_str())));
        if host.set_header_pairs(Map::ResponseHeaders, &pairs).is_ok() {
            return;
        }
    }
    for (name, value) in ours {
        let _ = host.set_header(Map::ResponseHeaders, name, Some(value));
    }
}

/// Whether a request body is JSON as the model server reads it: no content type, or a
/// JSON one (FastAPI parses nothing else as JSON).
fn json_body(headers: &HeaderPairs<'_>) -> bool {
    match header_map::find(headers, "content-type") {
        None => true,
        Some(ct) => BodyKind::from_content_type(Some(ct)) == BodyKind::Json,
    }
}

impl Stream {
    /// A stream of a root context with this state (`None`: not configured).
    pub fn new(context_id: u32, state: Option<Rc<State>>) -> Stream {
        Stream {
            context_id,
            state,
            event: None,
            parser: None,
            unparsed: None,
            response_done: false,
            limit: None,
            stripper: None,
            body: None,
            estimate: None,
            waiting: None,
            waited_headers: false,
            waited_body: false,
            looked_up: false,
            jwks_waited: false,
            pending_body: None,
            pending_trailers: false,
        }
    }

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

    /// A request refused after its headers went on (its body decided): counted as a
    /// denial, not as an authorized request, and nothing is charged.
    fn deny_late(&mut self, host: &impl Host, reason: &str, reply: &LocalReply) -> Action {
        let Some(state) = self.state.clone() else { return self.reply(host, reply) };
        let path = self.event.take().map(|e| e.path).unwrap_or_default();
        self.limit = None;
        self.estimate = None;
        self.stripper = None;
        self.deny(host, &state, reason, reply, &path)
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
        let path = header_map::get(&headers, ":path");
        if state.settings.cors_preflight == CorsPreflight::Allow && is_preflight(&headers) {
            return self.preflight(host, &state, &headers, path);
        }
        // Held to the end of the request callback: the verdict may borrow from it. Never
        // borrowed elsewhere; refusing beats the panic `borrow_mut` would risk.
        let Ok(mut cache) = state.credentials.try_borrow_mut() else {
            return self.internal_error(host, &state, path, "Credential cache busy.");
        };
        // Read from the host only when something needs the time (not an API key alone).
        // A clock that cannot be read fails the request closed (an expiry check against
        // a made-up time would let expired tokens in).
        let clock: OnceCell<Option<Duration>> = OnceCell::new();
        let now = || clock.get_or_init(|| host.now().ok()).unwrap_or_default();
        let mut remote = |digest: &[u8; 32]| remote_cached(host, &state, digest, now().as_secs());
        let now_ms_ = || u64::try_from(now().as_millis()).unwrap_or(u64::MAX);
        let jwks = |index: usize| state.remote_jwks(host, index, now_ms_());
        let verdict = decide_with(&state.settings, &mut cache, &headers, || now().as_secs(), &mut remote, &jwks);
        if clock.get().is_some_and(Option::is_none) {
            return self.internal_error(host, &state, path, "Cannot read the clock.");
        }
        match verdict {
            Verdict::Allow { identity, edits } => {
                let route = if header_map::get(&headers, ":method") == "POST" { route_of(path) } else { Route::Other };
                let metering = state.settings.metering;
                if let Some(limits) = &state.settings.limits {
                    if let Some(spec) = limits.spec_for(&identity) {
                        // Tokens are reserved when the body says how many the request may
                        // cost; without a body, at once (the default).
                        let tokens = spec.counts_tokens() && route.is_inference();
                        let pending = tokens && !end_of_stream;
                        let reserve = if tokens && end_of_stream {
                            Facts::default().completion_budget(route, metering.default_max_tokens)
                        } else {
                            0
                        };
                        let now_ms = u64::try_from(now().as_millis()).unwrap_or(u64::MAX);
                        let admission = if limits.scope == Scope::Global {
                            let ask = Ask { request: true, tokens: (tokens && end_of_stream).then_some(reserve) };
                            match admit_global(&state, spec, &identity.user, ask, now_ms, !self.waited_headers) {
                                Some(Admission::Wait(body)) => {
                                    drop(cache);
                                    return self.wait(host, &state, body, Resume::Headers { end_of_stream });
                                }
                                Some(Admission::Admitted(ticket, headroom)) => {
                                    Some((String::new(), Some(ticket), Ok((headroom, Reservation::default()))))
                                }
                                Some(Admission::Refused(error)) => Some((String::new(), None, Err(error))),
                                None => None,
                            }
                        } else {
                            admit_shared(host, limits, spec, &identity.user, now_ms, reserve)
                                .map(|(key, verdict)| (key, None, verdict))
                        };
                        match admission {
                            Some((key, global, Ok((headroom, reservation)))) => {
                                self.limit = Some(LimitTicket {
                                    key,
                                    global,
                                    spec: spec.clone(),
                                    headroom,
                                    reservation,
                                    pending,
                                });
                            }
                            Some((_, _, Err(error))) => {
                                return self.deny(host, &state, error.reason(), &LocalReply::from(&error), path);
                            }
                            None => match limits.on_contention {
                                OnContention::Deny => {
                                    log(
                                        host,
                                        Level::Warn,
                                        self.context_id,
                                        format_args!("limit state unavailable; request refused (on_contention: deny)"),
                                    );
                                    return self.deny(
                                        host,
                                        &state,
                                        "limit_unavailable",
                                        &LocalReply::limit_unavailable(),
                                        path,
                                    );
                                }
                                OnContention::Allow => log(
                                    host,
                                    Level::Warn,
                                    self.context_id,
                                    format_args!("limit state unavailable; request allowed unlimited"),
                                ),
                            },
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
                // The request is metered when its usage is reported or its tokens limited.
                let counts_tokens = self.limit.as_ref().is_some_and(|t| t.spec.counts_tokens());
                if state.settings.usage.is_none() && !counts_tokens {
                    return Action::Continue;
                }
                let mut event = new_event(&headers, now());
                let identity = identity.into_owned();
                event.user = Some(identity.user);
                event.groups = identity.groups;
                self.event = Some(event);
                // Ask for an uncompressed answer so its usage can be read (see README).
                if header_map::contains(&headers, "accept-encoding")
                    && host.set_header(Map::RequestHeaders, "accept-encoding", None).is_err()
                {
                    log(host, Level::Warn, self.context_id, format_args!("cannot remove accept-encoding"));
                }
                if route.is_inference() {
                    if end_of_stream {
                        let completion = Facts::default().completion_budget(route, metering.default_max_tokens);
                        self.estimate = Some(Estimate { prompt: 0, completion });
                    } else {
                        self.start_body(host, &headers, route, counts_tokens, metering);
                    }
                }
                Action::Continue
            }
            // A denied request never reaches the upstream: no header needs editing.
            Verdict::Deny { error, .. } => {
                drop(cache);
                if let Some(action) = self.jwks_wait(host, &state, &headers, &error, end_of_stream) {
                    return action;
                }
                self.deny(host, &state, error.reason(), &LocalReply::from(&error), path)
            }
            Verdict::Lookup { digest } => {
                drop(cache);
                self.key_lookup(host, &state, digest, end_of_stream, path)
            }
        }
    }

    /// A token refused for want of keys from a remote JWKS waits (once) for its
    /// worker's root to fetch them: none was fetched yet, or its `kid` is unknown and a
    /// refetch may be made (`kid_refetch_min_interval_ms`, for the whole gateway). None:
    /// the refusal stands (a kid refetched lately is refused at once, 401).
    fn jwks_wait(
        &mut self,
        host: &impl Host,
        state: &Rc<State>,
        headers: &HeaderPairs<'_>,
        error: &AuthError,
        end_of_stream: bool,
    ) -> Option<Action> {
        let AuthError::InvalidToken(why @ (JwtError::UnknownKid | JwtError::KeysUnavailable)) = error else {
            return None;
        };
        if self.jwks_waited {
            return None;
        }
        let token = find_credential_value(headers, &state.settings.sources)?;
        let index = state.settings.jwt.provider_of(token)?;
        let conf = state.settings.jwt_remote.get(index)?.as_ref()?;
        let now = now_ms(host);
        let entry = Entry::decode(host.shared_get(&state.jwks_key(index)?).ok()?.0.as_deref());
        let mut waits = state.jwks_waits.try_borrow_mut().ok()?;
        match why {
            // Never fetched: wait for the first set. Too old: refused (503).
            JwtError::KeysUnavailable if !entry.jwks.is_empty() => return None,
            JwtError::UnknownKid if !entry.fetch_in_flight(now, conf) && !entry.refetch_allowed(now, conf) => {
                return None
            }
            JwtError::UnknownKid => {
                waits.refetch.insert(index);
            }
            _ => {}
        }
        if conf.wait_ms == 0 || waits.count() >= MAX_JWKS_WAITERS {
            return None;
        }
        waits.waiting.entry(index).or_default().push((self.context_id, now));
        self.jwks_waited = true;
        let resume = Resume::Headers { end_of_stream };
        self.waiting =
            Some(Waiting { token: 0, resume, body: Vec::new(), seq: 0, retried: false, key: None, jwks: Some(index) });
        Some(Action::Pause)
    }

    /// Waits for a lookup of `digest` by the key service: this request sends it, or
    /// joins the one of this worker under way; beyond the bounds, or when it was looked
    /// up already without an answer, a 503 `key_service_unavailable`.
    fn key_lookup(
        &mut self,
        host: &impl Host,
        state: &Rc<State>,
        digest: [u8; 32],
        end_of_stream: bool,
        path: &str,
    ) -> Action {
        let unavailable = |s: &mut Stream| {
            s.deny(host, state, "key_service_unavailable", &LocalReply::key_service_unavailable(), path)
        };
        let Some(service) = &state.settings.remote_keys else { return unavailable(self) };
        if self.looked_up {
            return unavailable(self);
        }
        let Ok(mut lookups) = state.lookups.try_borrow_mut() else { return unavailable(self) };
        let resume = Resume::Headers { end_of_stream };
        let waiting =
            |token| Waiting { token, resume, body: Vec::new(), seq: 0, retried: false, key: Some(digest), jwks: None };
        match lookups.start(digest, self.context_id, now_ms(host), service) {
            Start::Join => {
                self.waiting = Some(waiting(0));
                Action::Pause
            }
            Start::Dispatch => {
                let body = format!(r#"{{"sha256":"{}"}}"#, hex::encode(digest));
                let headers = service.headers("POST", &service.path);
                let timeout = Duration::from_millis(service.timeout_ms);
                match host.dispatch(&service.cluster, &headers, body.as_bytes(), timeout) {
                    Ok(token) => {
                        self.waiting = Some(waiting(token));
                        Action::Pause
                    }
                    Err(status) => {
                        lookups.finish(&digest, None, 0);
                        lookups.down = true;
                        drop(lookups);
                        log(host, Level::Warn, self.context_id, format_args!("key lookup not sent: {status:?}"));
                        unavailable(self)
                    }
                }
            }
            Start::Refused => {
                let refused = lookups.refused;
                drop(lookups);
                if refused.is_power_of_two() {
                    log(
                        host,
                        Level::Warn,
                        self.context_id,
                        format_args!("key lookups refused by their bounds so far: {refused}"),
                    );
                }
                unavailable(self)
            }
        }
    }

    /// The key service's answer for the lookup this request sent: cached (shared data
    /// for all workers, and this worker's memo), then this request goes on; the others
    /// that waited for it are returned, to be woken in their own contexts.
    fn key_answer(&mut self, host: &impl Host, waiting: Waiting, digest: [u8; 32], answer: (usize, usize)) -> Wake {
        let Some(state) = self.state.clone() else { return Wake::default() };
        let Some(service) = &state.settings.remote_keys else { return Wake::default() };
        let (status, body) = call_answer(host, answer.0, answer.1, MAX_KEY_ANSWER);
        let resolved = remote_keys::parse_resolve(status, body.as_deref());
        let now_s = now_ms(host) / 1000;
        if let Some(known) = &resolved {
            store_key(
                host,
                service,
                &digest,
                CachedKey { digest: hex::encode(digest), cached_s: now_s, key: known.clone() },
            );
            if let (Some(key), Ok(mut cache)) = (known, state.credentials.try_borrow_mut()) {
                cache.remote.insert(digest, key, now_s);
            }
        } else {
            log(host, Level::Warn, self.context_id, format_args!("key service unavailable (status {status:?})"));
        }
        let mut contexts = match state.lookups.try_borrow_mut() {
            Ok(mut lookups) => {
                lookups.down = resolved.is_none();
                lookups.finish(&digest, resolved.as_ref(), now_s)
            }
            Err(_) => Vec::new(),
        };
        contexts.retain(|c| *c != self.context_id);
        self.looked_up = true;
        self.after_wait(host, waiting.resume);
        Wake { contexts, done: true }
    }

    /// Woken after a key lookup it waited for ended in another request (`done`), or
    /// was abandoned by the request that sent it (then refused: retryable). Its lease
    /// waits are over too: a callout sent from another context's callback would be
    /// answered to that one.
    pub fn key_ready(&mut self, host: &impl Host, done: bool) {
        let Some(waiting) = self.waiting.take_if(|w| w.key.is_some() || w.jwks.is_some()) else { return };
        if waiting.key.is_some() {
            self.looked_up = true;
        }
        self.waited_headers = true;
        self.waited_body = true;
        if !done {
            let Some(state) = self.state.clone() else { return };
            if waiting.jwks.is_some() {
                self.deny(host, &state, "jwks_unavailable", &LocalReply::jwks_unavailable(), "");
            } else {
                let reply = LocalReply::key_service_unavailable();
                self.deny(host, &state, "key_service_unavailable", &reply, "");
            }
            return;
        }
        self.after_wait(host, waiting.resume);
    }

    /// A CORS preflight passed without a credential (`cors_preflight: allow`): the
    /// identity headers a client sent are removed, none is set, and no usage event is
    /// recorded (Envoy's `cors` filter or the upstream answers it).
    fn preflight(&mut self, host: &impl Host, state: &State, headers: &HeaderPairs<'_>, path: &str) -> Action {
        for name in crate::auth::passthrough_removals(&state.settings) {
            if header_map::contains(headers, name) && host.set_header(Map::RequestHeaders, name, None).is_err() {
                return self.internal_error(host, state, path, "Cannot edit request headers.");
            }
        }
        log(host, Level::Info, self.context_id, format_args!("PREFLIGHT path={}", report_path(path)));
        Action::Continue
    }

    /// Sets up the reading of a metered inference request's body. On the routes whose
    /// streams report usage only when asked, a JSON body may be rewritten: its
    /// `content-length` (if any) goes upstream as the client's plus `MAX_GROWTH`, and
    /// the body is padded to exactly that (see `request`).
    fn start_body(
        &mut self,
        host: &impl Host,
        headers: &HeaderPairs<'_>,
        route: Route,
        counts_tokens: bool,
        metering: Metering,
    ) {
        let mut rewrite = metering.inject_include_usage && route.forces_usage() && json_body(headers);
        let mut promised = None;
        if rewrite {
            if let Some(length) = header_map::find(headers, "content-length") {
                match length.trim().parse::<u64>() {
                    Ok(n) => {
                        let promise = n.saturating_add(MAX_GROWTH as u64);
                        if host.set_header(Map::RequestHeaders, "content-length", Some(&promise.to_string())).is_ok() {
                            promised = Some(promise);
                        } else {
                            rewrite = false;
                        }
                    }
                    Err(_) => rewrite = false,
                }
            }
        }
        let read = rewrite || counts_tokens;
        self.body = Some(Box::new(RequestBody {
            route,
            scan: read.then(BodyScan::new),
            rewrite,
            promised,
            sent: 0,
            held: 0,
            done: false,
        }));
    }

    pub fn request_body(&mut self, host: &impl Host, body_size: usize, end_of_stream: bool) -> Action {
        if self.waiting_in_headers() {
            // Held until the headers are admitted (a Continue here would let them go on).
            self.pending_body = Some((body_size, end_of_stream));
            return Action::Pause;
        }
        let Some(body) = self.body.as_mut() else { return Action::Continue };
        if body.done {
            return Action::Continue;
        }
        let size = body_size as u64;
        // The buffer holds what was held back before (already scanned) and the new chunk.
        if let Some(scan) = body.scan.as_mut() {
            let new = size.saturating_sub(body.held);
            if new > 0 {
                match host.buffer(Buffer::RequestBody, body.held as usize, new as usize) {
                    Ok(Some(bytes)) => scan.feed(&bytes),
                    Ok(None) => {}
                    Err(status) => {
                        // Unread bytes: nothing is rewritten; the estimate falls back to the default.
                        log(host, Level::Debug, self.context_id, format_args!("request body unreadable: {status:?}"));
                        body.scan = None;
                        body.rewrite = false;
                    }
                }
            }
        }
        if body.scan.as_ref().is_some_and(BodyScan::foreign_encoding) {
            // The server would read it, the scan cannot: refused before it goes on.
            return self.deny_late(host, "bad_request", &LocalReply::body_not_utf8());
        }
        if !end_of_stream {
            // Hold the body while it may still be rewritten in place (the start still
            // here, under the bound), and from its closing brace on: for the tail
            // insertion, and so that the upstream never has a whole request before its
            // end was seen and its tokens reserved (an HTTP/2 client may send all of it
            // and hold the stream open).
            let hold = body
                .scan
                .as_ref()
                .is_some_and(|s| s.closed() || (body.rewrite && body.sent == 0 && size < MAX_BUFFERED_BODY));
            if hold {
                body.held = size;
                return Action::Pause;
            }
            body.sent = body.sent.saturating_add(size);
            body.held = 0;
            return Action::Continue;
        }
        self.finish_body(host, size, false)
    }

    /// Request trailers end the body without an end-of-stream body callback.
    pub fn request_trailers(&mut self, host: &impl Host) -> Action {
        if self.waiting_in_headers() {
            self.pending_trailers = true;
            return Action::Pause;
        }
        let held = match self.body.as_ref() {
            Some(body) if !body.done => body.held,
            _ => return Action::Continue,
        };
        self.finish_body(host, held, true)
    }

    /// The end of the body (`size` bytes in the host's buffer): the estimate, the
    /// admission that waited for it, and the rewrite and padding.
    fn finish_body(&mut self, host: &impl Host, size: u64, trailers: bool) -> Action {
        let Some(state) = self.state.clone() else { return Action::Continue };
        let Some(body) = self.body.as_mut() else { return Action::Continue };
        body.done = true;
        let total = body.sent.saturating_add(size);
        let metering = state.settings.metering;
        let facts = body.scan.as_ref().map(BodyScan::facts).unwrap_or_default();
        let estimate = body.estimate(total, metering);
        self.estimate = Some(estimate);
        let (sent, promised, rewrite) = (body.sent, body.promised, body.rewrite && facts.needs_usage());
        let rewritten = if rewrite && !trailers {
            match host.buffer(Buffer::RequestBody, 0, size as usize) {
                Ok(held) => {
                    let held = held.unwrap_or_default();
                    body.scan.as_ref().and_then(|scan| {
                        if sent == 0 {
                            scan.rewrite_whole(&held)
                        } else {
                            scan.rewrite_tail(&held, sent as usize)
                        }
                    })
                }
                Err(_) => None,
            }
        } else {
            None
        };
        if let Some(action) = self.admit_body(host, &state, estimate, Resume::Body { size, trailers }) {
            return action;
        }
        let edited = rewritten.is_some();
        if promised.is_none() && !edited {
            return Action::Continue;
        }
        if trailers {
            // The length promised upstream cannot be kept: the body is not held whole.
            return self.deny_late(host, "bad_request", &LocalReply::trailers_not_supported());
        }
        let out = match (rewritten, promised) {
            (Some(mut out), Some(promise)) => {
                let want = promise.saturating_sub(sent) as usize;
                if out.len() > want {
                    None
                } else {
                    out.resize(want, b' ');
                    Some((out, 0, size as usize))
                }
            }
            (Some(out), None) => Some((out, 0, size as usize)),
            // Only padding: appended after what is held.
            (None, Some(promise)) => {
                let pad = promise.saturating_sub(total) as usize;
                Some((vec![b' '; pad], size as usize, 0))
            }
            (None, None) => None,
        };
        let written = out.is_some_and(|(bytes, start, replace)| {
            bytes.is_empty() || host.set_buffer(Buffer::RequestBody, start, replace, &bytes).is_ok()
        });
        if written {
            if edited {
                self.stripper = Some(UsageOnlyStripper::default());
            }
            return Action::Continue;
        }
        if promised.is_some() {
            // The upstream was told a length this body cannot have now: fail it rather
            // than leave the upstream waiting for bytes that never come.
            let path = self.event.as_ref().map(|e| e.path.clone()).unwrap_or_default();
            self.event = None;
            self.limit = None;
            self.estimate = None;
            return self.internal_error(host, &state, &path, "Cannot rewrite the request body.");
        }
        Action::Continue
    }

    /// The token reservation that waited for the body; `Some` with the action when the
    /// request is refused.
    fn admit_body(
        &mut self,
        host: &impl Host,
        state: &Rc<State>,
        estimate: Estimate,
        resume: Resume,
    ) -> Option<Action> {
        let ticket = self.limit.as_mut().filter(|t| t.pending)?;
        let on_contention = state.settings.limits.as_ref().map(|l| l.on_contention).unwrap_or_default();
        if let Some(global) = &ticket.global {
            let (spec, user) = (ticket.spec.clone(), global.user().to_string());
            let ask = Ask { request: false, tokens: Some(estimate.total()) };
            return match admit_global(state, &spec, &user, ask, now_ms(host), !self.waited_body) {
                Some(Admission::Wait(body)) => Some(self.wait(host, state, body, resume)),
                Some(Admission::Admitted(held, headroom)) => {
                    ticket.pending = false;
                    ticket.global = Some(held);
                    ticket.headroom = headroom;
                    None
                }
                Some(Admission::Refused(error)) => {
                    Some(self.deny_late(host, error.reason(), &LocalReply::from(&error)))
                }
                None if on_contention == OnContention::Deny => {
                    log(
                        host,
                        Level::Warn,
                        self.context_id,
                        format_args!("too many users for the leases; request refused"),
                    );
                    Some(self.deny_late(host, "limit_unavailable", &LocalReply::limit_unavailable()))
                }
                None => {
                    ticket.pending = false;
                    None
                }
            };
        }
        ticket.pending = false;
        match reserve_shared(host, &ticket.key, &ticket.spec, estimate.total(), now_ms(host)) {
            Some(Ok((headroom, reservation))) => {
                ticket.headroom = headroom;
                ticket.reservation = reservation;
                None
            }
            Some(Err(error)) => Some(self.deny_late(host, error.reason(), &LocalReply::from(&error))),
            None if on_contention == OnContention::Deny => {
                log(host, Level::Warn, self.context_id, format_args!("limit state unavailable; request refused"));
                Some(self.deny_late(host, "limit_unavailable", &LocalReply::limit_unavailable()))
            }
            None => {
                log(host, Level::Warn, self.context_id, format_args!("limit state unavailable; tokens not reserved"));
                None
            }
        }
    }

    fn waiting_in_headers(&self) -> bool {
        self.waiting.as_ref().is_some_and(|w| matches!(w.resume, Resume::Headers { .. }))
    }

    /// Pauses the request for an acquire callout carrying `body`. When it cannot be
    /// sent (or [`crate::lease::MAX_WAITING`] requests wait already), the request is
    /// admitted again at once without waiting: from the lease it has, or, with the
    /// trackers unreachable, from its share of the limit.
    fn wait(&mut self, host: &impl Host, state: &Rc<State>, body: Vec<u8>, resume: Resume) -> Action {
        match resume {
            Resume::Headers { .. } => self.waited_headers = true,
            Resume::Body { .. } => self.waited_body = true,
        }
        let settings = &state.settings;
        if let (Some(usage), Some(limits), Some(leases)) = (&settings.usage, &settings.limits, &state.leases) {
            let started = leases.try_borrow_mut().ok().and_then(|mut l| l.start_waiting().then(|| l.last_seq()));
            if let Some(seq) = started {
                let timeout = Duration::from_millis(limits.acquire_timeout_ms);
                match host.dispatch(&usage.cluster, &usage.headers_for(SYNC_PATH), &body, timeout) {
                    Ok(token) => {
                        self.waiting =
                            Some(Waiting { token, resume, body, seq, retried: false, key: None, jwks: None });
                        return Action::Pause;
                    }
                    Err(status) => {
                        let now_ms = now_ms(host);
                        let changed = leases.try_borrow_mut().is_ok_and(|mut l| {
                            l.stop_waiting();
                            l.unreachable(now_ms)
                        });
                        let detail = format_args!("acquire not sent: {status:?}");
                        log_reachability(host, self.context_id, changed, false, detail);
                    }
                }
            }
        }
        self.go_on(host, resume)
    }

    fn go_on(&mut self, host: &impl Host, resume: Resume) -> Action {
        match resume {
            Resume::Headers { end_of_stream } => self.request_headers(host, end_of_stream),
            Resume::Body { size, trailers } => self.finish_body(host, size, trailers),
        }
    }

    /// The answer to this request's acquire callout (or its failure): applied to the
    /// leases; the request is admitted again and resumed, or refused.
    pub fn call_response(&mut self, host: &impl Host, token: u32, num_headers: usize, body_size: usize) -> Wake {
        let Some(mut waiting) = self.waiting.take_if(|w| w.token == token && token != 0) else {
            return Wake::default();
        };
        if let Some(digest) = waiting.key {
            return self.key_answer(host, waiting, digest, (num_headers, body_size));
        }
        let Some(state) = self.state.clone() else { return Wake::default() };
        if let (Some(leases), Some(usage), Some(limits)) =
            (&state.leases, &state.settings.usage, &state.settings.limits)
        {
            let (status, reply) = call_answer(host, num_headers, body_size, MAX_LEASE_ANSWER);
            if reply.is_none() && !waiting.retried {
                // Once more (the cluster may pick another tracker replica) before the
                // failure counts.
                let timeout = Duration::from_millis(limits.acquire_timeout_ms);
                if let Ok(token) = host.dispatch(&usage.cluster, &usage.headers_for(SYNC_PATH), &waiting.body, timeout)
                {
                    waiting.token = token;
                    waiting.retried = true;
                    self.waiting = Some(waiting);
                    return Wake::default();
                }
            }
            lease_answer(host, self.context_id, leases, waiting.seq, (status, reply.as_deref()));
            if let Ok(mut l) = leases.try_borrow_mut() {
                l.stop_waiting();
            }
        }
        self.after_wait(host, waiting.resume);
        Wake::default()
    }

    /// A request that waited goes on: admitted again (and resumed) or refused.
    fn after_wait(&mut self, host: &impl Host, resume: Resume) {
        let mut action = self.go_on(host, resume);
        if matches!(resume, Resume::Headers { .. }) && action == Action::Continue {
            // What arrived while the headers waited, in order.
            if let Some((size, end_of_stream)) = self.pending_body.take() {
                action = self.request_body(host, size, end_of_stream);
            }
            if action == Action::Continue && std::mem::take(&mut self.pending_trailers) {
                action = self.request_trailers(host);
            }
        }
        if action == Action::Continue {
            if let Err(status) = host.resume_request() {
                log(host, Level::Error, self.context_id, format_args!("cannot resume the request: {status:?}"));
            }
        }
    }

    pub fn response_headers(&mut self, host: &impl Host, end_of_stream: bool) -> Action {
        let ratelimit = self.limit.as_ref().map(|t| ratelimit_headers(&t.headroom)).unwrap_or_default();
        if self.event.is_none() && ratelimit.is_empty() {
            return Action::Continue;
        }
        // One read of the whole map serves the event and the `x-ratelimit-*` headers
        // (each single read is a call and a call back into the VM to allocate the copy).
        let raw = host.header_pairs(Map::ResponseHeaders);
        let headers = raw.as_ref().ok().map(|raw| header_map::parse(raw).unwrap_or_default());
        if !ratelimit.is_empty() {
            write_ratelimit_headers(host, headers.as_deref(), &ratelimit);
        }
        let Some(event) = self.event.as_mut() else { return Action::Continue };
        let Some(headers) = headers else {
            // Unreadable: served as is, recorded without usage.
            self.stripper = None;
            return Action::Continue;
        };
        let get = |name: &str| header_map::find(&headers, name);
        event.set_status(get(":status"));
        let readable = get("content-encoding").is_none_or(|e| e.eq_ignore_ascii_case("identity"));
        let kind = BodyKind::from_content_type(get("content-type"));
        // Only JSON and SSE carry usage: other bodies (audio, HTML, plain text) are not
        // even copied into the VM.
        if readable && kind != BodyKind::Other {
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

    /// Reads each chunk for usage without holding it back: the copy is parsed after the
    /// chunk went on (at the next chunk, before that one goes on, or at `on_log`), so no
    /// chunk waits for its own parse, e.g. a large first chunk's first byte. Only the
    /// stripper works before.
    pub fn response_body(&mut self, host: &impl Host, body_size: usize, end_of_stream: bool) -> Action {
        if let Some(parser) = self.parser.as_mut() {
            if let Some(previous) = self.unparsed.take() {
                parser.feed(&previous.0);
            }
            if body_size > 0 {
                match host.buffer(Buffer::ResponseBody, 0, body_size) {
                    Ok(Some(chunk)) => {
                        if let Some(stripped) = self.stripper.as_mut().and_then(|s| s.strip(&chunk)) {
                            if host.set_buffer(Buffer::ResponseBody, 0, body_size, &stripped).is_err() {
                                self.stripper = None;
                            }
                        }
                        match Unparsed::defer(chunk) {
                            Ok(unparsed) => self.unparsed = Some(unparsed),
                            Err(chunk) => parser.feed(&chunk),
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
        }
        if end_of_stream {
            self.response_done = true;
        }
        // Never Pause here: that would make Envoy buffer the whole response.
        Action::Continue
    }

    /// The stream ended (completed, reset or abandoned): settle its tokens and record
    /// its usage. Without usage, an inference request that reached the model (a 2xx, or
    /// no answer at all) is charged its estimate, flagged `usage_estimated`.
    pub fn log(&mut self, host: &impl Host) -> Wake {
        let mut wake = Wake::default();
        if let (Some(waiting), Some(state)) = (self.waiting.take(), self.state.as_ref()) {
            // Gone while waiting (its callout, if any, is cancelled).
            match (waiting.key, waiting.jwks) {
                (Some(digest), _) => {
                    if let Ok(mut lookups) = state.lookups.try_borrow_mut() {
                        wake.contexts = lookups.leave(&digest, self.context_id);
                    }
                }
                (None, Some(index)) => {
                    if let Ok(mut waits) = state.jwks_waits.try_borrow_mut() {
                        waits.leave(index, self.context_id);
                    }
                }
                (None, None) => {
                    if let Some(Ok(mut l)) = state.leases.as_ref().map(|l| l.try_borrow_mut()) {
                        l.stop_waiting();
                    }
                }
            }
        }
        self.log_event(host);
        wake
    }

    fn log_event(&mut self, host: &impl Host) {
        let (Some(state), Some(mut event)) = (self.state.clone(), self.event.take()) else { return };
        let mut done = self.response_done;
        if let Some(parser) = self.parser.as_mut() {
            if let Some(rest) = self.unparsed.take() {
                parser.feed(&rest.0);
            }
            parser.finish();
            done |= parser.done();
            event.set_usage(parser.usage());
            event.model = parser.model().map(|m| tollgate_rules::truncate(m).to_string());
        }
        // The client left (or the upstream reset) before the response ended.
        event.incomplete = !done;
        if self.estimate.is_none() {
            // A body that never ended (a client holding its end back, or leaving) is
            // charged what was seen when it may have been a whole request (a client
            // leaving before any answer is charged too); not when the client left
            // before sending a whole JSON object, which no server can have run.
            let whole = |b: &RequestBody| {
                b.sent.saturating_add(b.held) > 0 && b.scan.as_ref().is_none_or(BodyScan::may_be_whole)
            };
            self.estimate = self
                .body
                .as_deref()
                .filter(|b| !b.done && whole(b))
                .map(|body| body.estimate(body.sent.saturating_add(body.held), state.settings.metering));
        }
        let reached_model = event.status.is_none_or(|s| (200..300).contains(&s));
        if let Some(estimate) = self.estimate.filter(|_| event.usage_missing && reached_model) {
            event.set_estimate(estimate.prompt, estimate.completion);
        }
        if let Some(ticket) = &self.limit {
            let tokens = if ticket.spec.counts_tokens() {
                event.prompt_tokens.saturating_add(event.completion_tokens)
            } else {
                0
            };
            if let Some(global) = &ticket.global {
                if let Some(Ok(mut leases)) = state.leases.as_ref().map(|l| l.try_borrow_mut()) {
                    leases.settle(&ticket.spec, global, tokens, now_ms(host));
                }
            } else if tokens > 0 || ticket.reservation.tokens > 0 {
                let now_ms = now_ms(host);
                let settled = update_shared(host, &ticket.key, |bytes| {
                    let mut state = LimitState::decode(bytes);
                    state.settle(&ticket.spec, &ticket.reservation, tokens, now_ms);
                    (Some(state.encode()), ())
                });
                if settled.is_none() {
                    log(
                        host,
                        Level::Warn,
                        self.context_id,
                        format_args!("could not settle {tokens} tokens ({} reserved)", ticket.reservation.tokens),
                    );
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
        SetResponseHeaders,
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
        call_response_headers: RefCell<Vec<(String, String)>>,
        call_response_body: RefCell<Vec<u8>>,
        /// Times a paused request was resumed.
        resumed: Cell<u32>,
        request_body: RefCell<Vec<u8>>,
        response_body: RefCell<Vec<u8>>,
        shared: RefCell<BTreeMap<String, (Vec<u8>, u32)>>,
        dispatched: RefCell<Vec<(u32, Vec<u8>)>>,
        /// The headers of every callout, in order.
        dispatched_headers: RefCell<Vec<Vec<(String, String)>>>,
        /// The VM's environment variables.
        vm_env: BTreeMap<String, String>,
        replies: RefCell<Vec<(u32, String)>>,
        logs: RefCell<Vec<String>>,
        clock: Cell<u64>,
        /// The plugin's root id: unique per host, so tests never share a VM queue.
        root: String,
        /// Times the host's `done` was called.
        done_calls: Cell<u32>,
        /// Times a response body was read.
        response_reads: Cell<u32>,
        /// Response header edits: each single one (name, value), and each whole map written.
        response_set: RefCell<Vec<(String, String)>>,
        response_written: RefCell<Vec<Vec<(String, String)>>>,
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
                    self.fails(Call::CallResponseHeaders).map(|_| pairs(&self.call_response_headers.borrow()))
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
            } else if let (Map::ResponseHeaders, Some(v)) = (map, value) {
                self.response_set.borrow_mut().push((name.to_string(), v.to_string()));
            }
            Ok(())
        }
        fn set_header_pairs(&self, map: Map, pairs: &[(&str, &str)]) -> HostResult<()> {
            assert_eq!(map, Map::ResponseHeaders, "only response maps are written whole");
            self.fails(Call::SetResponseHeaders)?;
            let pairs = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            self.response_written.borrow_mut().push(pairs);
            Ok(())
        }
        fn buffer(&self, buffer: Buffer, start: usize, max: usize) -> HostResult<Option<Vec<u8>>> {
            let (call, data) = match buffer {
                Buffer::RequestBody => (Call::RequestBody, self.request_body.borrow().clone()),
                Buffer::ResponseBody => {
                    self.response_reads.set(self.response_reads.get() + 1);
                    (Call::ResponseBody, self.response_body.borrow().clone())
                }
                Buffer::CallResponseBody => (Call::CallResponseBody, self.call_response_body.borrow().clone()),
                Buffer::PluginConfiguration => (Call::PluginConfiguration, self.config.clone()),
            };
            self.fails(call)?;
            let end = start.saturating_add(max).min(data.len());
            Ok(data.get(start..end).filter(|d| !d.is_empty()).map(<[u8]>::to_vec))
        }
        /// As Envoy's body buffers take edits: replace all from 0, prepend, or append.
        fn set_buffer(&self, buffer: Buffer, start: usize, size: usize, data: &[u8]) -> HostResult<()> {
            let body = match buffer {
                Buffer::RequestBody => {
                    self.fails(Call::SetRequestBody)?;
                    &self.request_body
                }
                _ => &self.response_body,
            };
            let mut body = body.borrow_mut();
            let len = body.len();
            match (start, size) {
                (0, 0) => body.splice(0..0, data.iter().copied()).for_each(drop),
                (0, n) if n >= len => *body = data.to_vec(),
                (s, _) if s >= len => body.extend_from_slice(data),
                _ => return Err(HostError::BadArgument),
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
        fn dispatch(&self, _cluster: &str, h: &[(&str, &str)], body: &[u8], _t: Duration) -> HostResult<u32> {
            self.fails(Call::Dispatch)?;
            self.dispatched_headers.borrow_mut().push(h.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
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
        fn env(&self, name: &str) -> Option<String> {
            self.vm_env.get(name).cloned()
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
        fn resume_request(&self) -> HostResult<()> {
            self.resumed.set(self.resumed.get() + 1);
            Ok(())
        }
        fn set_effective_context(&self, _context_id: u32) -> HostResult<()> {
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
    fn limits_without_shared_data_follow_on_contention_and_say_so() {
        let h = host(r#","limits":{"users":{"mittens":{"requests_per_minute":1}},"on_contention":"allow"}"#);
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
            let h = host("");
            *h.call_response_headers.borrow_mut() = headers.clone();
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
        let h = host("");
        *h.call_response_headers.borrow_mut() = vec![(":status".into(), "200".into())];
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
        let h = host("");
        *h.call_response_headers.borrow_mut() = vec![(":status".into(), "200".into())];
        *h.call_response_body.borrow_mut() =
            br#"{"accepted":1,"duplicates":0,"rejected":[{"index":1,"reason":"invalid_event","message":"m"}]}"#
                .to_vec();
        let mut root = configured(&h);
        request(&root, &h);
        request(&root, &h);
        root.tick(&h);
        root.call_response(&h, 1, 1, h.call_response_body.borrow().len());
        let stats = root.state().unwrap().queue_stats();
        assert_eq!((stats.delivered, stats.rejected), (1, 1));
        // An unreadable answer body: the batch still counts as delivered.
        h.fail(Call::CallResponseBody);
        request(&root, &h);
        root.tick(&h);
        root.call_response(&h, 2, 1, 10);
        assert_eq!(root.state().unwrap().queue_stats().delivered, 2);
    }

    /// A delivered batch with full ones waiting sends the next at once (not at the next
    /// tick), within the in-flight bound; below a full batch, the tick sends it.
    #[test]
    fn a_backlog_drains_at_the_trackers_pace() {
        let h = host_with(r#","max_batch":1"#, "");
        *h.call_response_headers.borrow_mut() = vec![(":status".into(), "200".into())];
        let mut root = configured(&h);
        for _ in 0..7 {
            request(&root, &h);
        }
        root.tick(&h);
        assert_eq!(h.dispatched.borrow().len(), MAX_IN_FLIGHT, "a tick fills the in-flight bound");
        for (answered, want) in [(1, 5), (2, 6), (3, 7), (4, 7), (5, 7)] {
            root.call_response(&h, answered, 1, 0);
            assert_eq!(h.dispatched.borrow().len(), want, "after batch {answered} was delivered");
        }
        // A failure does not hurry the next (back-off is the tick's).
        request(&root, &h);
        request(&root, &h);
        root.tick(&h);
        let sent = h.dispatched.borrow().len();
        *h.call_response_headers.borrow_mut() = vec![(":status".into(), "503".into())];
        let token = h.dispatched.borrow().last().map(|(t, _)| *t).unwrap();
        root.call_response(&h, token, 1, 0);
        assert_eq!(h.dispatched.borrow().len(), sent);
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

    /// A host with exactly this plugin configuration (the mittens key, plus `extra`).
    fn host_config(extra: &str) -> FakeHost {
        let digest = crate::keys::sha256_hex(KEY);
        let h = host("");
        let config = format!(
            r#"{{"api_keys":{{"keys":[{{"sha256":"{digest}","user":"mittens","groups":["premium"]}}]}}{extra}}}"#
        );
        FakeHost { config: config.into_bytes(), ..h }
    }

    /// What reached the upstream of one request sent in body chunks, as Envoy passes them:
    /// a paused chunk stays in the buffer the next callback sees, a continued buffer
    /// goes upstream.
    struct Sent {
        action: Action,
        reply: Option<u32>,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        stream: Stream,
    }

    fn send(root: &Root, h: &FakeHost, headers: &[(&str, &str)], chunks: &[&[u8]]) -> Sent {
        let before = h.replies.borrow().len();
        let original = h.request_headers.borrow().clone();
        let mut all = original.clone();
        all.retain(|(k, _)| k != ":path" || !headers.iter().any(|(n, _)| *n == ":path"));
        all.extend(headers.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        *h.request_headers.borrow_mut() = all;
        let mut stream = root.stream(2);
        let action = stream.request_headers(h, chunks.is_empty());
        let headers = h.request_headers.borrow().clone();
        let mut body = Vec::new();
        if action == Action::Continue {
            h.request_body.borrow_mut().clear();
            for (i, chunk) in chunks.iter().enumerate() {
                h.request_body.borrow_mut().extend_from_slice(chunk);
                let size = h.request_body.borrow().len();
                match stream.request_body(h, size, i + 1 == chunks.len()) {
                    Action::Continue => body.append(&mut h.request_body.borrow_mut()),
                    Action::Pause if h.replies.borrow().len() > before => break,
                    Action::Pause => {}
                }
            }
        }
        let reply = h.replies.borrow().get(before).map(|(status, _)| *status);
        *h.request_headers.borrow_mut() = original;
        Sent { action, reply, headers, body, stream }
    }

    fn header_of(headers: &[(String, String)], name: &str) -> Option<String> {
        headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    /// The upstream gets a body whose length is the content-length it was told, JSON that
    /// means what the client sent, with usage forced only where a stream would lack it.
    #[test]
    fn request_bodies_reach_the_upstream_as_promised() {
        let big = "w ".repeat(40_000);
        let stream_big = format!(r#"{{"messages":[{{"role":"user","content":"{big}"}}],"stream":true}}"#);
        let plain = br#"{"model":"m","messages":[],"max_tokens":3}"#.to_vec();
        let stream = br#"{"model":"m","stream":true}"#.to_vec();
        let empty_opts = br#"{"stream":true,"stream_options":{}}"#.to_vec();
        let asked = br#"{"stream":true,"stream_options":{"include_usage":true}}"#.to_vec();
        // (name, path, content-type, send content-length, body chunks, forced usage, grows by MAX_GROWTH)
        let cut = |b: &[u8], n: usize| -> Vec<Vec<u8>> { b.chunks(n).map(<[u8]>::to_vec).collect() };
        let mut closing_alone = cut(&stream, 5);
        closing_alone.push(Vec::new());
        let cases: Vec<(&str, &str, Option<&str>, bool, Vec<Vec<u8>>, bool, bool)> = vec![
            ("plain, length", "/v1/chat/completions", Some("application/json"), true, vec![plain.clone()], false, true),
            ("stream, length", "/v1/chat/completions", None, true, vec![stream.clone()], true, true),
            ("stream, chunked", "/v1/chat/completions", None, false, cut(&empty_opts, 7), true, false),
            ("completions route", "/v1/completions", None, true, cut(&stream, 3), true, true),
            ("big stream, length", "/v1/chat/completions", None, true, cut(stream_big.as_bytes(), 16_384), true, true),
            (
                "big stream, chunked",
                "/v1/chat/completions",
                None,
                false,
                cut(stream_big.as_bytes(), 9_000),
                true,
                false,
            ),
            ("brace before the end", "/v1/chat/completions", None, true, closing_alone, true, true),
            ("asked for usage", "/v1/chat/completions", None, true, vec![asked.clone()], false, true),
            ("embeddings untouched", "/v1/embeddings", None, true, vec![stream.clone()], false, false),
            (
                "not json untouched",
                "/v1/chat/completions",
                Some("text/plain"),
                true,
                vec![stream.clone()],
                false,
                false,
            ),
        ];
        for (name, path, ctype, length, chunks, forced, grows) in cases {
            let h = host("");
            let root = configured(&h);
            let original: Vec<u8> = chunks.concat();
            let cl = original.len().to_string();
            let mut headers = vec![(":path", path)];
            if length {
                headers.push(("content-length", cl.as_str()));
            }
            if let Some(ct) = ctype {
                headers.push(("content-type", ct));
            }
            let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
            let sent = send(&root, &h, &headers, &refs);
            assert_eq!((sent.action, sent.reply), (Action::Continue, None), "{name}");
            let told = header_of(&sent.headers, "content-length");
            if length {
                let want = original.len() + if grows { MAX_GROWTH } else { 0 };
                assert_eq!(told, Some(want.to_string()), "{name}: content-length");
                assert_eq!(sent.body.len(), want, "{name}: the body has the length the upstream was told");
            } else {
                assert_eq!(told, None, "{name}");
            }
            if !forced && !grows {
                assert_eq!(sent.body, original, "{name}: byte for byte");
                continue;
            }
            let v: serde_json::Value = serde_json::from_slice(&sent.body).unwrap_or_else(|e| panic!("{name}: {e}"));
            let before: serde_json::Value = serde_json::from_slice(&original).unwrap();
            assert_eq!(
                v["stream_options"]["include_usage"] == true,
                forced || before["stream_options"]["include_usage"] == true,
                "{name}"
            );
            assert_eq!(v["messages"], before["messages"], "{name}");
            assert_eq!(
                sent.stream.stripper.is_some(),
                forced,
                "{name}: the usage-only event is removed only when forced"
            );
            if !forced {
                assert_eq!(sent.body.trim_ascii_end(), original.as_slice(), "{name}: only trailing spaces added");
            }
        }
    }

    #[test]
    fn a_body_whose_promised_length_cannot_be_kept_is_refused() {
        let stream = br#"{"model":"m","stream":true}"#;
        let cl = stream.len().to_string();
        // (failing call, expected reply): the length went upstream, the body must match it
        // (an unreadable body is still padded to it, just not rewritten).
        let cases = [(None, None), (Some(Call::SetRequestBody), Some(500)), (Some(Call::RequestBody), None)];
        for (call, want) in cases {
            let h = host("");
            let root = configured(&h);
            if let Some(call) = call {
                h.fail(call);
            }
            let sent = send(&root, &h, &[("content-length", &cl)], &[stream]);
            assert_eq!(sent.reply, want, "{call:?}");
        }
        // Trailers end the body without an end-of-stream callback: a promised length
        // cannot be kept, so the request is refused (400), not left hanging upstream.
        let h = host("");
        h.request_headers.borrow_mut().push(("content-length".into(), cl.clone()));
        let root = configured(&h);
        let mut s = root.stream(2);
        assert_eq!(s.request_headers(&h, false), Action::Continue);
        *h.request_body.borrow_mut() = stream.to_vec();
        assert_eq!(s.request_body(&h, stream.len(), false), Action::Pause);
        assert_eq!(s.request_trailers(&h), Action::Pause);
        assert_eq!(h.replies.borrow().last().map(|r| r.0), Some(400));
    }

    /// A JSON body in UTF-16 (which the server would read, and the scan could not) is
    /// refused with 400 before any of it goes on, whole or a byte at a time; UTF-8 passes.
    #[test]
    fn bodies_not_in_utf8_are_refused_on_metered_routes() {
        let text = r#"{"model":"m","stream":true,"max_tokens":30000}"#;
        let utf16: Vec<u8> = text.encode_utf16().flat_map(u16::to_le_bytes).collect();
        let bytes: Vec<&[u8]> = utf16.chunks(1).collect();
        let cfgs = ["", r#","limits":{"users":{"mittens":{"tokens_per_minute":40}}}"#];
        let cases: [(&str, Vec<&[u8]>, Option<u32>); 3] = [
            ("utf-8", vec![text.as_bytes()], None),
            ("utf-16", vec![&utf16], Some(400)),
            ("utf-16 bytewise", bytes, Some(400)),
        ];
        for cfg in cfgs {
            for (name, chunks, want) in &cases {
                let h = host(cfg);
                let root = configured(&h);
                let sent = send(&root, &h, &[], chunks);
                assert_eq!(sent.reply, *want, "{name} {cfg}");
                if want.is_some() {
                    let body = h.replies.borrow().last().map(|r| r.1.clone()).unwrap_or_default();
                    assert!(body.contains("invalid_encoding"), "{body}");
                    assert!(sent.body.len() <= 1, "{name}: {} bytes went on", sent.body.len());
                }
            }
        }
    }

    /// Token limits work without a `usage` section: accept-encoding still goes, usage is
    /// still forced, tokens still charged.
    #[test]
    fn token_limits_need_no_usage_section() {
        let h = host_config(r#","limits":{"users":{"mittens":{"tokens_per_minute":40}}}"#);
        h.request_headers.borrow_mut().push(("accept-encoding".into(), "gzip".into()));
        let root = configured(&h);
        let body = br#"{"model":"m","stream":true,"max_tokens":7}"#;
        let mut statuses = Vec::new();
        for _ in 0..4 {
            let mut sent = send(&root, &h, &[], &[body]);
            statuses.push(sent.reply.unwrap_or(200));
            if sent.reply.is_none() {
                assert_eq!(header_of(&sent.headers, "accept-encoding"), None);
                let v: serde_json::Value = serde_json::from_slice(&sent.body).unwrap();
                assert_eq!(v["stream_options"]["include_usage"], true);
                sent.stream.response_headers(&h, false);
                sent.stream.response_body(&h, h.response_body.borrow().len(), true);
            }
            sent.stream.log(&h);
        }
        // 19 tokens per request: 0, 19, 38 used < 40 admitted; 57 is not.
        assert_eq!(statuses, [200, 200, 200, 429]);
        assert!(h.dispatched.borrow().is_empty(), "nothing reported without usage");
    }

    /// Reserve before, settle after: streams started at once near the edge of a budget are
    /// admitted only while the tokens used plus those reserved are under it.
    #[test]
    fn concurrent_streams_reserve_and_settle() {
        let h = host(r#","limits":{"users":{"mittens":{"tokens_per_minute":100}}}"#);
        let root = configured(&h);
        // 40 bytes of body: a prompt estimate of 10, plus max_tokens 20: 30 reserved each.
        let body = br#"{"stream":true,"max_tokens":20,"x":"ab"}"#;
        assert_eq!(body.len(), 40);
        let mut open = Vec::new();
        let mut refused = 0;
        for _ in 0..10 {
            let sent = send(&root, &h, &[], &[body]);
            match sent.reply {
                None => open.push(sent.stream),
                Some(429) => refused += 1,
                other => panic!("{other:?}"),
            }
        }
        // 0, 30, 60, 90 held < 100: four admitted, the rest refused until they settle.
        assert_eq!((open.len(), refused), (4, 6));
        let state = |h: &FakeHost| LimitState::decode(&h.shared.borrow()[&state_key("mittens")].0);
        assert_eq!(
            state(&h).headroom(&spec(r#"{"tokens_per_minute":100}"#), h.clock.get()).tokens.unwrap().remaining,
            0
        );
        for mut s in open {
            s.response_headers(&h, false);
            s.response_body(&h, h.response_body.borrow().len(), true);
            s.log(&h);
        }
        // Settled: 4 × 19 used, nothing reserved.
        let left = state(&h).headroom(&spec(r#"{"tokens_per_minute":100}"#), h.clock.get()).tokens.unwrap().remaining;
        assert_eq!(left, 100 - 4 * 19);
    }

    /// The `x-ratelimit-*` headers go out with one call that rewrites the response's map,
    /// its own headers kept in order (an upstream's `x-ratelimit-*` replaced); one call
    /// each when that fails.
    #[test]
    fn ratelimit_headers_are_written_in_one_call() {
        let ours = [
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-tokens",
        ];
        for (usage, bulk_fails) in [("", false), ("", true), ("none", false)] {
            let config = r#","limits":{"users":{"mittens":{"requests_per_minute":60,"tokens_per_day":1000}}}"#;
            let mut h = if usage == "none" { host_config(config) } else { host(config) };
            h.response_headers = vec![
                (":status".into(), "200".into()),
                ("content-type".into(), "application/json".into()),
                ("X-RateLimit-Limit-Requests".into(), "999".into()),
                ("server".into(), "up".into()),
            ];
            if bulk_fails {
                h.failing.borrow_mut().insert(Call::SetResponseHeaders);
            }
            let root = configured(&h);
            let mut sent = send(&root, &h, &[], &[br#"{"model":"m"}"#]);
            assert_eq!(sent.stream.response_headers(&h, false), Action::Continue);
            let written = h.response_written.borrow();
            let singles: Vec<String> = h.response_set.borrow().iter().map(|(k, _)| k.clone()).collect();
            if bulk_fails {
                assert_eq!(singles, ours, "one call each after the bulk call failed");
            } else {
                assert!(singles.is_empty(), "{usage:?}");
                let names: Vec<&str> = written.last().unwrap().iter().map(|(k, _)| k.as_str()).collect();
                let want: Vec<&str> = [":status", "content-type", "server"].into_iter().chain(ours).collect();
                assert_eq!(names, want, "{usage:?}");
                let limit = &written.last().unwrap()[3].1;
                assert_eq!(limit, "60");
            }
        }
    }

    /// Only JSON and SSE bodies can carry usage: no other body is copied into the VM.
    #[test]
    fn only_bodies_that_can_carry_usage_are_read() {
        // (content-type, content-encoding, read?)
        let cases = [
            (Some("application/json"), None, true),
            (Some("text/event-stream; charset=utf-8"), None, true),
            (Some("application/vnd.api+json"), Some("identity"), true),
            (Some("text/plain"), None, false),
            (Some("audio/mpeg"), None, false),
            (None, None, false),
            (Some("application/json"), Some("gzip"), false),
        ];
        for (content_type, encoding, read) in cases {
            let mut h = host("");
            h.response_headers = vec![(":status".into(), "200".into())];
            h.response_headers.extend(content_type.map(|c| ("content-type".into(), c.into())));
            h.response_headers.extend(encoding.map(|e| ("content-encoding".into(), e.into())));
            let root = configured(&h);
            let mut sent = send(&root, &h, &[], &[br#"{"model":"m"}"#]);
            sent.stream.response_headers(&h, false);
            sent.stream.response_body(&h, h.response_body.borrow().len(), true);
            sent.stream.log(&h);
            assert_eq!(h.response_reads.get() > 0, read, "{content_type:?} {encoding:?}");
        }
    }

    /// A response chunk goes on before the parser reads it (at the next chunk, or at
    /// `on_log`), so it never waits for its own parse; a chunk over the worker's bound is read
    /// at once. The usage is the same either way.
    #[test]
    fn response_chunks_are_parsed_after_they_went_on() {
        let token = "data: {\"model\":\"m\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n";
        let usage = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\n";
        let huge = token.repeat(MAX_DEFERRED_BYTES / token.len() + 1);
        // (chunks, whether each is read in its own callback)
        let cases: [(Vec<&str>, bool); 2] =
            [(vec![token, token, usage, "data: [DONE]\n\n"], false), (vec![&huge, usage, "data: [DONE]\n\n"], true)];
        for (chunks, at_once) in cases {
            let mut h = host("");
            h.response_headers =
                vec![(":status".into(), "200".into()), ("content-type".into(), "text/event-stream".into())];
            let mut root = configured(&h);
            let mut sent = send(&root, &h, &[], &[br#"{"model":"m","stream":true}"#]);
            sent.stream.response_headers(&h, false);
            let mut before = 0;
            for (i, chunk) in chunks.iter().enumerate() {
                *h.response_body.borrow_mut() = chunk.as_bytes().to_vec();
                assert_eq!(sent.stream.response_body(&h, chunk.len(), i + 1 == chunks.len()), Action::Continue);
                let seen = sent.stream.parser.as_ref().map(UsageParser::bytes_seen);
                let huge_now = at_once && i == 0;
                let want = before + if huge_now { chunk.len() as u64 } else { 0 };
                assert_eq!(seen, Some(want), "chunk {i} read after it went on (or at once if huge)");
                before += chunk.len() as u64;
            }
            sent.stream.log(&h);
            root.tick(&h);
            let e = &sent_events(&h)[0];
            assert_eq!(
                (e["prompt_tokens"].as_u64(), e["completion_tokens"].as_u64(), e["model"].as_str()),
                (Some(3), Some(4), Some("m"))
            );
            assert_eq!(e["incomplete"], false);
        }
    }

    fn spec(json: &str) -> LimitSpec {
        serde_json::from_str(json).unwrap()
    }

    /// Without usage in the response, an inference request that reached the model is
    /// charged its estimate, flagged; an error answer is not.
    #[test]
    fn missing_usage_is_charged_an_estimate() {
        let body = br#"{"model":"m","stream":true,"max_tokens":9,"n":2}"#;
        let prompt_estimate = (body.len() as u64).div_ceil(4);
        // (response status, response body, estimated?, prompt, completion)
        let cases = [
            ("200", "{\"model\":\"m\"}", true, prompt_estimate, 18),
            ("200", r#"{"model":"m","usage":{"prompt_tokens":12,"completion_tokens":7}}"#, false, 12, 7),
            ("500", "{\"error\":{}}", false, 0, 0),
            ("429", "{\"error\":{}}", false, 0, 0),
        ];
        for (status, response, estimated, prompt, completion) in cases {
            let mut h = host(r#","limits":{"users":{"mittens":{"tokens_per_day":100000}}}"#);
            h.response_headers =
                vec![(":status".into(), status.into()), ("content-type".into(), "application/json".into())];
            *h.response_body.borrow_mut() = response.as_bytes().to_vec();
            let mut root = configured(&h);
            let mut sent = send(&root, &h, &[], &[body]);
            sent.stream.response_headers(&h, false);
            sent.stream.response_body(&h, response.len(), true);
            sent.stream.log(&h);
            root.tick(&h);
            let events = sent_events(&h);
            let e = &events[0];
            assert_eq!(e["usage_estimated"], estimated, "{status} {response}");
            assert_eq!(
                (e["prompt_tokens"].as_u64(), e["completion_tokens"].as_u64()),
                (Some(prompt), Some(completion))
            );
            let used = LimitState::decode(&h.shared.borrow()[&state_key("mittens")].0)
                .headroom(&spec(r#"{"tokens_per_day":100000}"#), h.clock.get())
                .tokens
                .unwrap()
                .remaining;
            assert_eq!(100_000 - used, prompt + completion, "{status}: charged");
        }
        // A client that leaves before any answer: charged its estimate too.
        let h = host(r#","limits":{"users":{"mittens":{"tokens_per_day":100000}}}"#);
        let mut root = configured(&h);
        let mut sent = send(&root, &h, &[], &[body]);
        sent.stream.log(&h);
        root.tick(&h);
        let e = &sent_events(&h)[0];
        assert_eq!((e["usage_estimated"].clone(), e["incomplete"].clone()), (true.into(), true.into()));
    }

    /// A client that never ends its request body (an HTTP/2 stream held open after the
    /// whole JSON): its closing brace is held, so the upstream never runs it; when the
    /// client leaves it is charged what was seen, as a client leaving before any answer
    /// is; the budget is spent either way.
    #[test]
    fn a_body_never_ended_is_charged_its_estimate() {
        let cfg = r#","limits":{"users":{"mittens":{"tokens_per_minute":40}}}"#;
        let mut runs = Vec::new();
        for ended in [true, false] {
            let mut h = host(cfg);
            let root = configured(&h);
            let remaining = |h: &FakeHost| {
                h.shared.borrow().get(&state_key("mittens")).and_then(|v| {
                    let spec = spec(r#"{"tokens_per_minute":40}"#);
                    LimitState::decode(&v.0).headroom(&spec, h.clock.get()).tokens.map(|t| t.remaining)
                })
            };
            h.response_headers =
                vec![(":status".into(), "200".into()), ("content-type".into(), "text/event-stream".into())];
            *h.response_body.borrow_mut() =
                b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"x\"}\n\n"
                    .to_vec();
            let mut outcomes = Vec::new();
            for i in 0..3 {
                let mut headers = h.request_headers.borrow().clone();
                headers.retain(|(k, _)| k != ":path");
                headers.push((":path".into(), "/v1/responses".into()));
                let saved = h.request_headers.replace(headers);
                let mut s = root.stream(10 + i);
                let admitted = s.request_headers(&h, false) == Action::Continue;
                h.request_headers.replace(saved);
                if admitted {
                    let body = br#"{"model":"m","input":"hi","stream":true,"max_output_tokens":99999}"#;
                    *h.request_body.borrow_mut() = body.to_vec();
                    if ended {
                        assert_eq!(s.request_body(&h, body.len(), true), Action::Continue);
                        s.response_headers(&h, false);
                        s.response_body(&h, h.response_body.borrow().len(), false);
                    } else {
                        // Held from its closing brace: the upstream never has it whole.
                        assert_eq!(s.request_body(&h, body.len(), false), Action::Pause);
                    }
                }
                s.log(&h);
                outcomes.push((admitted, remaining(&h)));
            }
            runs.push(outcomes);
        }
        // The first request is served and spends the budget; the next are refused.
        let want = vec![(true, Some(0)), (false, Some(0)), (false, Some(0))];
        assert_eq!(runs, [want.clone(), want]);
    }

    /// A client that leaves before its body was a whole JSON object (none of it, or a
    /// part) is charged nothing: no server can have run it. (One that sent it whole and
    /// held its end back is charged: above.)
    #[test]
    fn a_body_left_unfinished_is_not_charged() {
        let cfg = r#","limits":{"users":{"mittens":{"tokens_per_minute":40}}}"#;
        let whole = br#"{"model":"m","input":"hi","stream":true,"max_output_tokens":99999}"#;
        let cases: [(&str, &[u8], Option<u64>); 4] = [
            ("nothing sent", b"", Some(40)),
            ("half an object", &whole[..20], Some(40)),
            ("whole object, end held back", whole, Some(0)),
            ("not JSON the scan can follow", b"[1,2,3]", Some(0)),
        ];
        for (name, body, want) in cases {
            let h = host(cfg);
            let root = configured(&h);
            let mut headers = h.request_headers.borrow().clone();
            headers.retain(|(k, _)| k != ":path");
            headers.push((":path".into(), "/v1/responses".into()));
            h.request_headers.replace(headers);
            let mut s = root.stream(10);
            assert_eq!(s.request_headers(&h, false), Action::Continue, "{name}");
            if !body.is_empty() {
                *h.request_body.borrow_mut() = body.to_vec();
                s.request_body(&h, body.len(), false);
            }
            s.log(&h);
            let spec = spec(r#"{"tokens_per_minute":40}"#);
            let remaining = h
                .shared
                .borrow()
                .get(&state_key("mittens"))
                .and_then(|v| LimitState::decode(&v.0).headroom(&spec, h.clock.get()).tokens.map(|t| t.remaining));
            assert_eq!(remaining, want, "{name}");
        }
    }

    /// `limits.on_contention`: when the limit state cannot be read or written, deny (503,
    /// retry in a second) by default, or let the request through.
    #[test]
    fn unavailable_limit_state_follows_on_contention() {
        // (policy, failing call, expected action and reply)
        let cases = [
            ("", Call::SharedGet, (Action::Pause, Some(503))),
            ("", Call::SharedSet, (Action::Pause, Some(503))),
            (r#","on_contention":"deny""#, Call::SharedSet, (Action::Pause, Some(503))),
            (r#","on_contention":"allow""#, Call::SharedGet, (Action::Continue, None)),
            (r#","on_contention":"allow""#, Call::SharedSet, (Action::Continue, None)),
        ];
        for (policy, call, want) in cases {
            let h = host(&format!(r#","limits":{{"users":{{"mittens":{{"requests_per_minute":1}}}}{policy}}}"#));
            let mut root = configured(&h);
            h.fail(call);
            assert_eq!(request(&root, &h), want, "{policy} {call:?}");
            h.heal();
            root.tick(&h);
            let denied: Vec<_> = sent_events(&h).into_iter().filter(|e| !e["denied"].is_null()).collect();
            assert_eq!(denied.len(), usize::from(want.1.is_some()), "{policy} {call:?}");
            if let Some(e) = denied.first() {
                assert_eq!(e["denied"], "limit_unavailable");
            }
        }
        // The reservation made once the body is read follows the same policy.
        let h = host(r#","limits":{"users":{"mittens":{"tokens_per_minute":100}}}"#);
        let root = configured(&h);
        let mut s = root.stream(2);
        assert_eq!(s.request_headers(&h, false), Action::Continue);
        h.fail(Call::SharedSet);
        *h.request_body.borrow_mut() = br#"{"stream":false}"#.to_vec();
        assert_eq!(s.request_body(&h, 16, true), Action::Pause);
        assert_eq!(h.replies.borrow().last().map(|r| r.0), Some(503));
        assert!(h.logs.borrow().iter().any(|l| l.contains("limit state unavailable")));
    }

    /// `cors_preflight: allow` passes a browser's preflight without a credential, strips
    /// identity headers, sets none and records nothing.
    #[test]
    fn cors_preflights() {
        let preflight = [("origin", "https://app.example"), ("access-control-request-method", "POST")];
        // (setting, method, headers, expected)
        let cases: Vec<(&str, &str, Vec<(&str, &str)>, (Action, Option<u32>))> = vec![
            ("", "OPTIONS", preflight.to_vec(), (Action::Pause, Some(401))),
            (r#","cors_preflight":"deny""#, "OPTIONS", preflight.to_vec(), (Action::Pause, Some(401))),
            (r#","cors_preflight":"allow""#, "OPTIONS", preflight.to_vec(), (Action::Continue, None)),
            (
                r#","cors_preflight":"allow""#,
                "OPTIONS",
                vec![("origin", "https://app.example")],
                (Action::Pause, Some(401)),
            ),
            (r#","cors_preflight":"allow""#, "GET", preflight.to_vec(), (Action::Pause, Some(401))),
        ];
        for (setting, method, extra, want) in cases {
            let h = host(setting);
            {
                let mut headers = h.request_headers.borrow_mut();
                headers.retain(|(k, _)| k != "authorization" && k != ":method");
                headers.push((":method".into(), method.into()));
                headers.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            }
            let mut root = configured(&h);
            let mut s = root.stream(2);
            let action = s.request_headers(&h, true);
            let reply = h.replies.borrow().last().map(|r| r.0);
            assert_eq!((action, reply), want, "{setting} {method} {extra:?}");
            s.log(&h);
            if action == Action::Continue {
                let headers = h.request_headers.borrow();
                assert!(
                    !headers.iter().any(|(k, _)| k.starts_with("x-tollgate-")),
                    "identity headers stripped, none set"
                );
                root.tick(&h);
                assert!(h.dispatched.borrow().is_empty(), "no usage event, no denial");
            }
        }
    }

    /// `usage.token_env`: every report carries the tracker's ingest token as a bearer; a
    /// named variable that is unset refuses the config.
    #[test]
    fn reports_carry_the_ingest_token() {
        let mut h = host_with(r#","token_env":"INGEST""#, "");
        assert!(!Root::new(1).configure(&h), "unset: refused");
        assert!(h.logs.borrow().iter().any(|l| l.contains("usage.token_env") && l.contains("INGEST")));
        h.vm_env.insert("INGEST".into(), "t0ken".into());
        let mut root = configured(&h);
        request(&root, &h);
        root.tick(&h);
        let headers = h.dispatched_headers.borrow();
        assert_eq!(headers.len(), 1);
        assert!(headers[0].contains(&("authorization".to_string(), "Bearer t0ken".to_string())), "{:?}", headers[0]);
        assert!(!h.logs.borrow().iter().any(|l| l.contains("t0ken")), "the token is never logged");
    }

    /// The trackers' answer to the last lease callout: `granted` and `consumed` of the
    /// window of `requests/60000/mittens`.
    fn lease_answer(h: &FakeHost, granted: u64, consumed: u64) -> (u32, usize) {
        let start = tollgate_rules::lease::window_start(h.clock.get(), 60_000);
        let body = serde_json::json!({"replicas": 2, "leases": [{
            "key": "requests/60000/mittens", "window_start_ms": start, "granted": granted, "consumed": consumed}]});
        *h.call_response_headers.borrow_mut() = vec![(":status".into(), "200".into())];
        *h.call_response_body.borrow_mut() = body.to_string().into_bytes();
        let token = h.dispatched.borrow().last().map(|(t, _)| *t).unwrap();
        (token, h.call_response_body.borrow().len())
    }

    fn last_callout(h: &FakeHost) -> serde_json::Value {
        serde_json::from_slice(&h.dispatched.borrow().last().unwrap().1).unwrap()
    }

    /// Global limits in one worker: a request with no lease waits for one acquire
    /// callout (its body held meanwhile), then goes on with what was granted; the lease
    /// admits the next one without a callout; a window the trackers say is spent is
    /// refused (at once, once known); `on_tick` reports what was used.
    #[test]
    fn global_limits_wait_for_a_lease_then_admit_from_it() {
        let h = host(r#","limits":{"scope":"global","users":{"mittens":{"requests_per_minute":3}}}"#);
        let mut root = configured(&h);
        let sent = h.request_headers.borrow().clone();
        let mut s = root.stream(2);
        assert_eq!(s.request_headers(&h, false), Action::Pause);
        assert_eq!(s.request_body(&h, 10, true), Action::Pause, "the body waits with the headers");
        let asked = last_callout(&h);
        assert_eq!(asked["replica"], "gw-0000000000000007");
        assert_eq!(asked["leases"][0]["key"], "requests/60000/mittens");
        assert_eq!(asked["leases"][0]["need"], 1);
        let path = h.dispatched_headers.borrow().last().unwrap().iter().find(|(k, _)| k == ":path").unwrap().1.clone();
        assert_eq!(path, "/v1/limits/sync");
        let (token, size) = lease_answer(&h, 2, 2);
        s.call_response(&h, token, 1, size);
        assert_eq!(h.resumed.get(), 1);
        let user = h.request_headers.borrow().iter().find(|(k, _)| k == "x-tollgate-user").map(|(_, v)| v.clone());
        assert_eq!(user.as_deref(), Some("mittens"), "admitted: the identity goes upstream");
        s.log(&h);
        *h.request_headers.borrow_mut() = sent;

        let callouts = h.dispatched.borrow().len();
        assert_eq!(request(&root, &h), (Action::Continue, None));
        assert_eq!(h.dispatched.borrow().len(), callouts, "from the lease: no callout");

        let mut s = root.stream(3);
        assert_eq!(s.request_headers(&h, true), Action::Pause);
        let (token, size) = lease_answer(&h, 2, 3);
        s.call_response(&h, token, 1, size);
        assert_eq!(h.replies.borrow().last().unwrap().0, 429);
        assert_eq!(h.resumed.get(), 1);
        s.log(&h);
        let callouts = h.dispatched.borrow().len();
        assert_eq!(request(&root, &h), (Action::Pause, Some(429)));
        assert_eq!(h.dispatched.borrow().len(), callouts, "spent fleet-wide: no callout");

        root.tick(&h);
        let sync = h.dispatched.borrow().iter().find_map(|(_, b)| {
            let v: serde_json::Value = serde_json::from_slice(b).ok()?;
            (v["leases"][0]["need"] == 0).then_some(v)
        });
        assert_eq!(sync.expect("a sync")["leases"][0]["used"], 2);

        // A sync that fails is sent once more, the same. Failing for two intervals, the
        // trackers count as unreachable.
        let last_sync = |h: &FakeHost| {
            h.dispatched.borrow().iter().rev().find(|(_, b)| b.starts_with(br#"{"interval_ms""#)).cloned().unwrap()
        };
        let (token, body) = last_sync(&h);
        root.call_response(&h, token, 0, 0);
        let (again, resent) = last_sync(&h);
        assert_eq!((again != token, resent == body), (true, true));
        let unreachable = |h: &FakeHost| h.logs.borrow().iter().any(|l| l.contains("cannot be reached"));
        root.call_response(&h, again, 0, 0);
        assert!(!unreachable(&h), "within the grace");
        h.clock.set(h.clock.get() + 2_000);
        assert_eq!(request(&root, &h), (Action::Pause, Some(429)), "a spent window");
        // Ticks at the flush interval; a sync every so many.
        let syncs =
            |h: &FakeHost| h.dispatched.borrow().iter().filter(|(_, b)| b.starts_with(br#"{"interval_ms""#)).count();
        let before = syncs(&h);
        while syncs(&h) == before {
            root.tick(&h);
        }
        for _ in 0..2 {
            let (token, _) = last_sync(&h);
            root.call_response(&h, token, 0, 0);
        }
        assert!(unreachable(&h), "two intervals later");
    }

    /// Trackers that fail (callout refused, no answer, an error status) never leave a
    /// request hanging or unlimited: it goes on from the fallback share of the limit.
    #[test]
    fn global_limits_without_trackers_fall_back_to_a_share() {
        for failure in ["dispatch", "no answer", "503", "garbage"] {
            let h = host(r#","limits":{"scope":"global","users":{"mittens":{"requests_per_minute":3}}}"#);
            let root = configured(&h);
            let sent = h.request_headers.borrow().clone();
            let mut admitted = 0;
            for i in 0..6 {
                // A second apart: the trackers count as unreachable after two intervals.
                h.clock.set(h.clock.get() + 1_000);
                *h.request_headers.borrow_mut() = sent.clone();
                let mut s = root.stream(10 + i);
                if failure == "dispatch" {
                    h.fail(Call::Dispatch);
                }
                let replies = h.replies.borrow().len();
                let mut action = s.request_headers(&h, true);
                // The acquire and its one retry fail.
                for _ in 0..2 {
                    if action != Action::Pause || h.replies.borrow().len() > replies {
                        break;
                    }
                    let (token, mut size) = lease_answer(&h, 0, 0);
                    if failure == "503" {
                        *h.call_response_headers.borrow_mut() = vec![(":status".into(), "503".into())];
                    }
                    if failure == "garbage" {
                        *h.call_response_body.borrow_mut() = b"<html>not json".to_vec();
                        size = h.call_response_body.borrow().len();
                    }
                    let headers = if failure == "no answer" { 0 } else { 1 };
                    let resumed = h.resumed.get();
                    s.call_response(&h, token, headers, size);
                    if h.resumed.get() > resumed {
                        action = Action::Continue;
                    }
                }
                if action == Action::Continue {
                    admitted += 1;
                }
                s.log(&h);
            }
            // No answer ever: one replica known, so the whole limit in this worker.
            assert_eq!(admitted, 3, "{failure}");
            assert!(h.logs.borrow().iter().any(|l| l.contains("trackers cannot be reached")), "{failure}");
        }
    }

    /// A config push (a new root context of the same plugin in the same VM) keeps the
    /// worker's leases: what was granted is admitted from without a new callout, and the
    /// old root's sync still in flight lands in the same leases.
    #[test]
    fn a_config_push_keeps_the_leases() {
        let h = host(r#","limits":{"scope":"global","users":{"mittens":{"requests_per_minute":3}}}"#);
        let mut old = configured(&h);
        let sent = h.request_headers.borrow().clone();
        let mut s = old.stream(2);
        assert_eq!(s.request_headers(&h, true), Action::Pause);
        let (token, size) = lease_answer(&h, 2, 2);
        s.call_response(&h, token, 1, size);
        s.log(&h);
        old.tick(&h);
        let sync =
            h.dispatched.borrow().iter().rev().find(|(_, b)| b.starts_with(br#"{"interval_ms""#)).map(|(t, _)| *t);
        let sync = sync.expect("a sync in flight");
        assert!(!old.done(&h), "the old root waits for its sync");
        let new = configured(&h);
        *h.request_headers.borrow_mut() = sent;
        let callouts = h.dispatched.borrow().len();
        assert_eq!(request(&new, &h), (Action::Continue, None), "the second granted request, from the lease");
        assert_eq!(h.dispatched.borrow().len(), callouts);
        // The old root's sync answered after the push: applied to the shared leases.
        let (_, size) = lease_answer(&h, 3, 3);
        old.call_response(&h, sync, 1, size);
        let callouts = h.dispatched.borrow().len();
        assert_eq!(request(&new, &h), (Action::Continue, None), "the third, granted to the old root's sync");
        assert_eq!(h.dispatched.borrow().len(), callouts);
    }

    /// A host whose config resolves unknown keys remotely (`api_keys.remote`), the
    /// request carrying `key`.
    fn remote_host(remote: &str, key: &str) -> FakeHost {
        let h = host("");
        let config = String::from_utf8(h.config.clone()).unwrap();
        let config =
            config.replacen(r#""api_keys":{"keys""#, &format!(r#""api_keys":{{"remote":{{{remote}}},"keys""#), 1);
        let h = FakeHost { config: config.into_bytes(), ..h };
        set_key(&h, key);
        h
    }

    fn set_key(h: &FakeHost, key: &str) {
        for (k, v) in h.request_headers.borrow_mut().iter_mut() {
            if k == "authorization" {
                *v = format!("Bearer {key}");
            }
        }
    }

    /// The key service answers the last callout with `status` and `body`.
    fn key_answer(h: &FakeHost, status: u32, body: &str) -> (u32, usize, usize) {
        *h.call_response_headers.borrow_mut() = vec![(":status".into(), status.to_string())];
        *h.call_response_body.borrow_mut() = body.as_bytes().to_vec();
        let token = h.dispatched.borrow().last().map(|(t, _)| *t).unwrap();
        (token, 1, body.len())
    }

    fn upstream_user(h: &FakeHost) -> Option<String> {
        h.request_headers.borrow().iter().find(|(k, _)| k == "x-tollgate-user").map(|(_, v)| v.clone())
    }

    const ANN: &str = r#"{"id":"key_1","user":"ann","groups":["free"],"expires_at":null}"#;

    /// Unknown keys never push a resolved key out of the shared cache: with one slot for
    /// all keys, a 404 leaves ann's entry, and another worker (its own memo, the same
    /// shared data) takes her key without a lookup.
    #[test]
    fn unknown_keys_never_evict_a_resolved_one() {
        let h = remote_host(r#""max_entries":1"#, "tgk_ann");
        let sent = h.request_headers.borrow().clone();
        let root = configured(&h);
        for (key, status, answer, want) in [("tgk_ann", 200, ANN, 200), ("tgk_random", 404, "{}", 401)] {
            *h.request_headers.borrow_mut() = sent.clone();
            set_key(&h, key);
            let mut s = root.stream(2);
            assert_eq!(s.request_headers(&h, true), Action::Pause, "{key} is looked up");
            let (token, headers, size) = key_answer(&h, status, answer);
            s.call_response(&h, token, headers, size);
            let replied = h.replies.borrow().last().map(|r| r.0).unwrap_or(200);
            assert_eq!(replied, want, "{key}");
        }
        let other = configured(&h);
        *h.request_headers.borrow_mut() = sent;
        set_key(&h, "tgk_ann");
        let lookups = h.dispatched.borrow().len();
        assert_eq!(request(&other, &h), (Action::Continue, None));
        assert_eq!(h.dispatched.borrow().len(), lookups, "ann is still in the shared cache");
    }

    /// Managed keys in one worker: an unknown key waits for one lookup (a second request
    /// for it joins, and is woken), the answer is cached (no second lookup), a 404 is a
    /// 401 cached as negative, the bounds refuse with a 503, and the changes feed revokes.
    #[test]
    fn managed_keys_are_looked_up_once_and_cached() {
        let h = remote_host(r#""max_in_flight":1"#, "tgk_ann");
        let mut root = configured(&h);
        let sent = h.request_headers.borrow().clone();
        let (mut first, mut second) = (root.stream(2), root.stream(3));
        assert_eq!(first.request_headers(&h, true), Action::Pause);
        let asked: serde_json::Value = serde_json::from_slice(&h.dispatched.borrow().last().unwrap().1).unwrap();
        assert_eq!(asked["sha256"], crate::keys::sha256_hex("tgk_ann"));
        let path = |h: &FakeHost| {
            h.dispatched_headers.borrow().last().unwrap().iter().find(|(k, _)| k == ":path").unwrap().1.clone()
        };
        assert_eq!(path(&h), "/v1/keys/resolve");
        let lookups = h.dispatched.borrow().len();
        assert_eq!(second.request_headers(&h, true), Action::Pause, "joins the lookup under way");
        assert_eq!(h.dispatched.borrow().len(), lookups);
        let (token, headers, size) = key_answer(&h, 200, ANN);
        let wake = first.call_response(&h, token, headers, size);
        assert_eq!(wake, Wake { contexts: vec![3], done: true });
        assert_eq!((h.resumed.get(), upstream_user(&h).as_deref()), (1, Some("ann")));
        *h.request_headers.borrow_mut() = sent.clone();
        second.key_ready(&h, true);
        assert_eq!(h.resumed.get(), 2, "the joiner goes on with the same answer");
        *h.request_headers.borrow_mut() = sent.clone();
        assert_eq!(request(&root, &h), (Action::Continue, None), "cached: no lookup");
        assert_eq!(h.dispatched.borrow().len(), lookups);

        // Unknown: 401, then 401 again from the negative cache.
        set_key(&h, "tgk_nobody");
        let mut s = root.stream(4);
        assert_eq!(s.request_headers(&h, true), Action::Pause);
        let (token, headers, size) = key_answer(&h, 404, r#"{"error":{}}"#);
        s.call_response(&h, token, headers, size);
        assert_eq!(h.replies.borrow().last().unwrap().0, 401);
        let lookups = h.dispatched.borrow().len();
        set_key(&h, "tgk_nobody");
        assert_eq!(request(&root, &h).1, Some(401));
        assert_eq!(h.dispatched.borrow().len(), lookups, "negative answer cached");

        // Bounds: one lookup in flight at a time; another key meanwhile is a 503.
        set_key(&h, "tgk_one");
        let mut s = root.stream(5);
        assert_eq!(s.request_headers(&h, true), Action::Pause);
        set_key(&h, "tgk_two");
        assert_eq!(request(&root, &h).1, Some(503));
        let reply = h.replies.borrow().last().unwrap().1.clone();
        assert!(reply.contains("key_service_unavailable") && !reply.contains("Incorrect"), "{reply}");
        s.log(&h);

        // The changes feed revokes ann's key: 401 at once, no lookup.
        h.clock.set(h.clock.get() + 5_000);
        let poll = |h: &FakeHost| {
            let headers = h.dispatched_headers.borrow();
            let at = headers
                .iter()
                .position(|c| c.iter().any(|(k, v)| k == ":path" && v.starts_with("/v1/keys/changes?since=")));
            at.map(|i| h.dispatched.borrow()[i].0)
        };
        root.tick(&h);
        let token = poll(&h).expect("the first tick polls the changes");
        let revoked = format!(r#"{{"now":1,"revoked":["{}"],"more":false}}"#, crate::keys::sha256_hex("tgk_ann"));
        let (_, headers, size) = key_answer(&h, 200, &revoked);
        root.call_response(&h, token, headers, size);
        *h.request_headers.borrow_mut() = sent;
        let lookups = h.dispatched.borrow().len();
        assert_eq!(request(&root, &h).1, Some(401), "revoked");
        assert_eq!(h.dispatched.borrow().len(), lookups);
    }

    /// The key service down: a key resolved before keeps working (up to
    /// max_stale_seconds); an unknown one gets the 503, never a 401; an expired key
    /// stops at its expiry without a lookup.
    #[test]
    fn managed_keys_survive_the_key_service_and_expire() {
        let h = remote_host(r#""ttl_seconds":60"#, "tgk_ann");
        let root = configured(&h);
        let sent = h.request_headers.borrow().clone();
        let soon = h.clock.get() / 1000 + 120;
        let mut s = root.stream(2);
        assert_eq!(s.request_headers(&h, true), Action::Pause);
        let (token, headers, size) = key_answer(&h, 200, &ANN.replace("null", &soon.to_string()));
        s.call_response(&h, token, headers, size);
        assert_eq!(h.resumed.get(), 1);

        // Past the ttl, the service fails: served from the stale entry.
        h.clock.set(h.clock.get() + 61_000);
        *h.request_headers.borrow_mut() = sent.clone();
        let mut s = root.stream(3);
        assert_eq!(s.request_headers(&h, true), Action::Pause);
        let (token, headers, size) = key_answer(&h, 503, "");
        s.call_response(&h, token, headers, size);
        assert_eq!(h.resumed.get(), 2, "a known key keeps working while the service is down");
        *h.request_headers.borrow_mut() = sent.clone();
        set_key(&h, "tgk_new");
        let mut s = root.stream(4);
        assert_eq!(s.request_headers(&h, true), Action::Pause);
        let (token, _, _) = key_answer(&h, 503, "");
        s.call_response(&h, token, 0, 0);
        assert_eq!(h.replies.borrow().last().unwrap().0, 503, "unknown key, service down: fail closed");

        // Expired: 401 with no lookup.
        h.clock.set(soon * 1000);
        *h.request_headers.borrow_mut() = sent;
        let lookups = h.dispatched.borrow().len();
        assert_eq!(request(&root, &h).1, Some(401));
        assert_eq!(h.dispatched.borrow().len(), lookups);
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

    /// An Ed25519 key (seed `seed`) as a JWKS entry with `kid`, and a token it signs.
    fn ed_key(seed: u8, kid: &str) -> (String, impl Fn(&str, &str) -> String) {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
        use base64::Engine;
        use ed25519_dalek::Signer;
        let key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        let jwk = format!(
            r#"{{"kty":"OKP","crv":"Ed25519","use":"sig","kid":"{kid}","x":"{}"}}"#,
            B64.encode(key.verifying_key().as_bytes())
        );
        let mint = move |kid: &str, sub: &str| {
            let input = format!(
                "{}.{}",
                B64.encode(format!(r#"{{"alg":"EdDSA","kid":"{kid}"}}"#)),
                B64.encode(format!(r#"{{"iss":"idp","sub":"{sub}"}}"#))
            );
            format!("{input}.{}", B64.encode(key.sign(input.as_bytes()).to_bytes()))
        };
        (jwk, mint)
    }

    fn jwks_host() -> FakeHost {
        let remote = r#""remote_jwks":{"cluster":"idp","authority":"idp.example","path":"/certs",
            "refresh_seconds":30,"max_age_seconds":60,"kid_refetch_min_interval_ms":1000,"wait_ms":2000}"#;
        host(&format!(r#","jwt":{{"providers":[{{"issuer":"idp",{remote}}}]}}"#))
    }

    /// Remote JWKS through the callbacks: requests wait for the first fetch, an unknown
    /// kid refetches (rate-limited: a second one at once is a 401), a failed fetch keeps
    /// the set, a set past max_age is a 503, a wait past wait_ms is a 503.
    #[test]
    fn remote_jwks_wait_refetch_and_keep() {
        let h = jwks_host();
        let mut root = configured(&h);
        let (jwk1, mint1) = ed_key(1, "k1");
        let (jwk2, mint2) = ed_key(2, "k2");
        // The root's last JWKS fetch is answered with `status` and `body`.
        let answer = |h: &FakeHost, status: u32, body: &str| {
            let (_, headers, size) = key_answer(h, status, body);
            let at =
                h.dispatched_headers.borrow().iter().rposition(|hs| hs.iter().any(|(_, v)| v == "/certs")).unwrap();
            (h.dispatched.borrow()[at].0, headers, size)
        };
        // The request's credential is this token (an allowed request's was stripped).
        let bearer = |h: &FakeHost, token: &str| {
            let mut headers = h.request_headers.borrow_mut();
            headers.retain(|(k, _)| k != "authorization");
            headers.push(("authorization".into(), format!("Bearer {token}")));
        };
        let certs = |h: &FakeHost| {
            h.dispatched_headers
                .borrow()
                .iter()
                .filter(|hs| hs.iter().any(|(k, v)| k == ":path" && v == "/certs"))
                .count()
        };

        // No set yet: the request waits; the root's tick fetches; the answer wakes it.
        bearer(&h, &mint1("k1", "ann"));
        let sent = h.request_headers.borrow().clone();
        let mut s = root.stream(2);
        assert_eq!(s.request_headers(&h, true), Action::Pause);
        assert!(root.tick(&h).is_empty());
        let path = h.dispatched_headers.borrow().last().unwrap().iter().find(|(k, _)| k == ":path").unwrap().1.clone();
        assert_eq!(path, "/certs");
        let (t, n, size) = answer(&h, 200, &format!(r#"{{"keys":[{jwk1}]}}"#));
        assert_eq!(root.call_response(&h, t, n, size), vec![Wake { contexts: vec![2], done: true }]);
        s.key_ready(&h, true);
        assert_eq!((h.resumed.get(), upstream_user(&h).as_deref()), (1, Some("ann")));
        *h.request_headers.borrow_mut() = sent;
        let fetches = certs(&h);
        assert_eq!(request(&root, &h), (Action::Continue, None), "same token: cached");
        bearer(&h, &mint1("k1", "bob"));
        assert_eq!(request(&root, &h), (Action::Continue, None), "another token of k1: the shared set");
        assert!(root.tick(&h).is_empty());
        assert_eq!(certs(&h), fetches, "nothing due");

        // Rotation: k2's token waits for one refetch, then goes on.
        h.clock.set(h.clock.get() + 1_000);
        bearer(&h, &mint2("k2", "cid"));
        let mut s = root.stream(3);
        assert_eq!(s.request_headers(&h, true), Action::Pause);
        assert!(root.tick(&h).is_empty());
        assert_eq!(certs(&h), fetches + 1, "one refetch");
        let (t, n, size) = answer(&h, 200, &format!(r#"{{"keys":[{jwk1},{jwk2}]}}"#));
        assert_eq!(root.call_response(&h, t, n, size), vec![Wake { contexts: vec![3], done: true }]);
        s.key_ready(&h, true);
        assert_eq!(upstream_user(&h).as_deref(), Some("cid"));

        // A forged kid within the interval: 401 at once, no fetch.
        bearer(&h, &mint2("k9", "mallory"));
        assert_eq!(request(&root, &h).1, Some(401));
        assert!(root.tick(&h).is_empty());
        assert_eq!(certs(&h), fetches + 1);

        // After the interval: it waits for a refetch, which fails; 401, and the last
        // good set still serves k2.
        h.clock.set(h.clock.get() + 1_000);
        let mut s = root.stream(4);
        assert_eq!(s.request_headers(&h, true), Action::Pause);
        assert!(root.tick(&h).is_empty());
        assert_eq!(certs(&h), fetches + 2);
        let (t, n, size) = answer(&h, 503, "");
        assert_eq!(root.call_response(&h, t, n, size), vec![Wake { contexts: vec![4], done: true }]);
        s.key_ready(&h, true);
        assert_eq!(h.replies.borrow().last().unwrap().0, 401);
        bearer(&h, &mint2("k2", "dan"));
        assert_eq!(request(&root, &h), (Action::Continue, None), "last good set kept");
        assert!(h.logs.borrow().iter().any(|l| l.contains("last good set is kept")));

        // Past max_age (60 s) without a successful fetch: 503, not trusted.
        h.clock.set(h.clock.get() + 61_000);
        bearer(&h, &mint2("k2", "eve"));
        assert_eq!(request(&root, &h).1, Some(503));
        let reply = h.replies.borrow().last().unwrap().1.clone();
        assert!(reply.contains("jwks_unavailable"), "{reply}");

        // A config push while a request waits: the new root's fetch wakes it.
        let h = jwks_host();
        let old = configured(&h);
        bearer(&h, &mint1("k1", "ann"));
        let mut s = old.stream(6);
        assert_eq!(s.request_headers(&h, true), Action::Pause);
        let mut new = configured(&h);
        assert!(new.tick(&h).is_empty());
        let (t, n, size) = answer(&h, 200, &format!(r#"{{"keys":[{jwk1}]}}"#));
        assert_eq!(new.call_response(&h, t, n, size), vec![Wake { contexts: vec![6], done: true }]);
        s.key_ready(&h, true);
        assert_eq!(upstream_user(&h).as_deref(), Some("ann"));

        // A fresh gateway whose fetches cannot be sent: the wait ends after wait_ms, 503.
        let h = jwks_host();
        let mut root = configured(&h);
        h.fail(Call::Dispatch);
        bearer(&h, &mint1("k1", "ann"));
        let mut s = root.stream(5);
        assert_eq!(s.request_headers(&h, true), Action::Pause);
        assert!(root.tick(&h).is_empty());
        h.clock.set(h.clock.get() + 2_000);
        let wakes = root.tick(&h);
        assert_eq!(wakes, vec![Wake { contexts: vec![5], done: false }]);
        s.key_ready(&h, false);
        assert_eq!(h.replies.borrow().last().unwrap().0, 503);
    }
}
