//! Request rates, token budgets and quotas per user, with group tiers.
//!
//! Limits are enforced on the request path without a network call, so their state
//! lives in Envoy's process-wide shared data (one Wasm VM per worker: a per-VM count
//! would multiply every limit by the number of workers). This module is the pure part:
//! the config, the state of one identity as bytes, and the arithmetic — admit a
//! request, charge tokens when usage arrives, say how much headroom is left. The
//! glue reads and writes the bytes with compare-and-swap.
//!
//! - Request rates (`requests_per_second|minute|hour|day`) are token buckets: capacity
//!   the count of the window (or `burst` for the shortest window), refilled evenly.
//!   Exceeded → 429 `rate_limit_exceeded`, type `requests`, retryable.
//! - Token budgets (`tokens_per_minute|hour|day`) are fixed windows aligned to the
//!   UTC clock. Tokens are known only after the response, so a request **reserves**
//!   what it may cost when it is admitted (its `max_tokens` times its choices plus a
//!   prompt estimate, see `request`) and **settles** when its stream ends: the
//!   reservation is released and the real usage (or, without usage, the estimate)
//!   charged (Kuadrant's reserve/commit). A request is admitted while the tokens used
//!   plus those reserved by requests in flight are under the budget, so the overshoot
//!   is bounded by one request's reservation, whatever the number of concurrent
//!   streams. Exceeded → 429 `rate_limit_exceeded`, type `tokens`, retryable at the
//!   window end (or in a second when only reservations in flight hold the budget).
//! - A quota (`quota: {requests, tokens, window}`) is a fixed allotment per window;
//!   spent → 429 `insufficient_quota` with `x-should-retry: false`.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::identity::Identity;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Window {
    Second,
    Minute,
    Hour,
    Day,
}

impl Window {
    pub fn millis(self) -> u64 {
        match self {
            Window::Second => 1_000,
            Window::Minute => 60_000,
            Window::Hour => 3_600_000,
            Window::Day => 86_400_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    #[serde(default)]
    pub requests: Option<u64>,
    #[serde(default)]
    pub tokens: Option<u64>,
    pub window: Window,
}

/// The limits of one user or group tier. Every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSpec {
    #[serde(default)]
    pub requests_per_second: Option<u64>,
    #[serde(default)]
    pub requests_per_minute: Option<u64>,
    #[serde(default)]
    pub requests_per_hour: Option<u64>,
    #[serde(default)]
    pub requests_per_day: Option<u64>,
    /// Capacity of the shortest-window request bucket (default: its count).
    #[serde(default)]
    pub burst: Option<u64>,
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
    #[serde(default)]
    pub tokens_per_hour: Option<u64>,
    #[serde(default)]
    pub tokens_per_day: Option<u64>,
    #[serde(default)]
    pub quota: Option<Quota>,
}

const REQUEST_WINDOWS: [Window; 4] = [Window::Second, Window::Minute, Window::Hour, Window::Day];
const TOKEN_WINDOWS: [Window; 3] = [Window::Minute, Window::Hour, Window::Day];

impl LimitSpec {
    fn request_rates(&self) -> [Option<u64>; 4] {
        [self.requests_per_second, self.requests_per_minute, self.requests_per_hour, self.requests_per_day]
    }

    fn token_budgets(&self) -> [Option<u64>; 3] {
        [self.tokens_per_minute, self.tokens_per_hour, self.tokens_per_day]
    }

    /// Capacity of request bucket `i`.
    fn capacity(&self, i: usize) -> Option<u64> {
        let rates = self.request_rates();
        let rate = rates.get(i).copied().flatten()?;
        let shortest = rates.iter().position(Option::is_some);
        Some(if shortest == Some(i) { self.burst.unwrap_or(rate) } else { rate })
    }

    pub fn counts_tokens(&self) -> bool {
        self.token_budgets().iter().any(Option::is_some) || self.quota.as_ref().is_some_and(|q| q.tokens.is_some())
    }

    fn check(&self, field: &str) -> Result<(), (String, String)> {
        let positive = |name: &str, v: Option<u64>| match v {
            Some(0) => Err((format!("{field}.{name}"), "must be a positive integer".to_string())),
            _ => Ok(()),
        };
        for (name, v) in [
            ("requests_per_second", self.requests_per_second),
            ("requests_per_minute", self.requests_per_minute),
            ("requests_per_hour", self.requests_per_hour),
            ("requests_per_day", self.requests_per_day),
            ("burst", self.burst),
            ("tokens_per_minute", self.tokens_per_minute),
            ("tokens_per_hour", self.tokens_per_hour),
            ("tokens_per_day", self.tokens_per_day),
        ] {
            positive(name, v)?;
        }
        if self.burst.is_some() && self.request_rates().iter().all(Option::is_none) {
            return Err((format!("{field}.burst"), "needs a requests_per_* rate".into()));
        }
        if let Some(q) = &self.quota {
            positive("quota.requests", q.requests)?;
            positive("quota.tokens", q.tokens)?;
            if q.requests.is_none() && q.tokens.is_none() {
                return Err((format!("{field}.quota"), "needs requests or tokens".into()));
            }
        }
        Ok(())
    }
}

/// What to do when the limit state cannot be read or written: the host refuses, or
/// every compare-and-swap round is lost to other workers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnContention {
    /// Refuse the request (503 with `retry-after: 1`): a limit that cannot be checked
    /// is not silently lifted.
    #[default]
    Deny,
    /// Let the request through unlimited, and log a warning.
    Allow,
}

/// Where a limit holds: per gateway (every Envoy on its own) or for the whole fleet
/// (leases from the trackers, see `lease`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    #[default]
    Local,
    Global,
}

/// The raw `limits` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    #[serde(default)]
    pub groups: BTreeMap<String, LimitSpec>,
    #[serde(default)]
    pub users: BTreeMap<String, LimitSpec>,
    #[serde(default = "default_max_identities")]
    pub max_identities: u64,
    #[serde(default)]
    pub on_contention: OnContention,
    #[serde(default)]
    pub scope: Scope,
    /// Global scope: how often each worker syncs its leases with the trackers.
    #[serde(default)]
    pub sync_interval_ms: Option<u64>,
    /// Global scope: how long a request waits for a lease before it is refused.
    #[serde(default)]
    pub acquire_timeout_ms: Option<u64>,
}

fn default_max_identities() -> u64 {
    100_000
}

/// Default of `limits.sync_interval_ms`.
pub const DEFAULT_SYNC_INTERVAL_MS: u64 = 1_000;
/// Default of `limits.acquire_timeout_ms`.
pub const DEFAULT_ACQUIRE_TIMEOUT_MS: u64 = 500;

/// Checked limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub groups: BTreeMap<String, LimitSpec>,
    pub users: BTreeMap<String, LimitSpec>,
    pub max_identities: u64,
    pub on_contention: OnContention,
    pub scope: Scope,
    pub sync_interval_ms: u64,
    pub acquire_timeout_ms: u64,
}

impl Limits {
    /// Checks the section; the error is (field path, message).
    pub fn from_config(raw: LimitsConfig) -> Result<Limits, (String, String)> {
        for (name, spec) in &raw.groups {
            spec.check(&format!("limits.groups.{name}"))?;
        }
        for (name, spec) in &raw.users {
            spec.check(&format!("limits.users.{name}"))?;
        }
        if raw.max_identities == 0 {
            return Err(("limits.max_identities".into(), "must be a positive integer".into()));
        }
        let global = raw.scope == Scope::Global;
        for (field, value) in
            [("sync_interval_ms", raw.sync_interval_ms), ("acquire_timeout_ms", raw.acquire_timeout_ms)]
        {
            if value.is_some() && !global {
                return Err((format!("limits.{field}"), "applies to \"scope\": \"global\" only".into()));
            }
        }
        let sync_interval_ms = raw.sync_interval_ms.unwrap_or(DEFAULT_SYNC_INTERVAL_MS);
        let (min, max) = (tollgate_rules::lease::MIN_INTERVAL_MS, tollgate_rules::lease::MAX_INTERVAL_MS);
        if !(min..=max).contains(&sync_interval_ms) {
            return Err(("limits.sync_interval_ms".into(), format!("must be between {min} and {max}")));
        }
        let acquire_timeout_ms = raw.acquire_timeout_ms.unwrap_or(DEFAULT_ACQUIRE_TIMEOUT_MS);
        if !(10..=10_000).contains(&acquire_timeout_ms) {
            return Err(("limits.acquire_timeout_ms".into(), "must be between 10 and 10000".into()));
        }
        if global {
            // Fixed windows fleet-wide: a bucket's burst has no meaning there.
            let specs =
                raw.groups.iter().map(|(n, s)| ("groups", n, s)).chain(raw.users.iter().map(|(n, s)| ("users", n, s)));
            for (kind, name, spec) in specs {
                if spec.burst.is_some() {
                    return Err((
                        format!("limits.{kind}.{name}.burst"),
                        "has no meaning with \"scope\": \"global\" (global limits count fixed windows)".into(),
                    ));
                }
            }
        }
        Ok(Limits {
            groups: raw.groups,
            users: raw.users,
            max_identities: raw.max_identities,
            on_contention: raw.on_contention,
            scope: raw.scope,
            sync_interval_ms,
            acquire_timeout_ms,
        })
    }

    /// The user's own entry, else the first of its groups (in the identity's order)
    /// that has one. Group limits are tiers: each user of the group gets them.
    pub fn spec_for(&self, identity: &Identity) -> Option<&LimitSpec> {
        self.users.get(&identity.user).or_else(|| identity.groups.iter().find_map(|g| self.groups.get(g)))
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Bucket {
    level: f64,
    last_ms: u64,
    used: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct FixedWindow {
    start_ms: u64,
    requests: u64,
    tokens: u64,
    /// Tokens reserved by requests in flight, released when they settle.
    reserved: u64,
}

impl FixedWindow {
    /// Rolls over to the window containing `now_ms` (aligned to the epoch). The
    /// reservations of requests in flight go with the old window: they settle into the
    /// new one with their real usage.
    fn roll(&mut self, window: Window, now_ms: u64) {
        let start = now_ms - now_ms % window.millis();
        if start != self.start_ms {
            *self = FixedWindow { start_ms: start, requests: 0, tokens: 0, reserved: 0 };
        }
    }

    /// Tokens counted against the limit: used plus reserved.
    fn held(&self) -> u64 {
        self.tokens.saturating_add(self.reserved)
    }

    fn reset_in(&self, window: Window, now_ms: u64) -> u64 {
        (self.start_ms + window.millis()).saturating_sub(now_ms)
    }
}

/// The state of one identity: 4 request buckets, 3 token windows, 1 quota window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LimitState {
    buckets: [Bucket; 4],
    token_windows: [FixedWindow; 3],
    quota: FixedWindow,
}

/// Version 2 added the reserved tokens of each window; a version-1 state (same key,
/// written before) is read with nothing reserved.
const STATE_VERSION: u8 = 2;
const STATE_LEN: usize = 1 + 4 * 17 + 4 * 32;
const STATE_V1_LEN: usize = 1 + 4 * 17 + 4 * 24;

impl LimitState {
    /// Compact fixed-size encoding for shared data.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(STATE_LEN);
        out.push(STATE_VERSION);
        for b in &self.buckets {
            out.extend_from_slice(&b.level.to_le_bytes());
            out.extend_from_slice(&b.last_ms.to_le_bytes());
            out.push(u8::from(b.used));
        }
        for w in self.token_windows.iter().chain(std::iter::once(&self.quota)) {
            out.extend_from_slice(&w.start_ms.to_le_bytes());
            out.extend_from_slice(&w.requests.to_le_bytes());
            out.extend_from_slice(&w.tokens.to_le_bytes());
            out.extend_from_slice(&w.reserved.to_le_bytes());
        }
        out
    }

    /// Decodes; anything unexpected (empty, other version, other size) is a fresh state.
    pub fn decode(bytes: &[u8]) -> LimitState {
        let with_reserved = match (bytes.first(), bytes.len()) {
            (Some(&STATE_VERSION), STATE_LEN) => true,
            (Some(&1), STATE_V1_LEN) => false,
            _ => return LimitState::default(),
        };
        let mut r = Reader { bytes, pos: 1 };
        let mut s = LimitState::default();
        for b in &mut s.buckets {
            b.level = f64::from_bits(r.u64());
            b.last_ms = r.u64();
            b.used = r.u8() != 0;
        }
        for w in s.token_windows.iter_mut().chain(std::iter::once(&mut s.quota)) {
            w.start_ms = r.u64();
            w.requests = r.u64();
            w.tokens = r.u64();
            w.reserved = if with_reserved { r.u64() } else { 0 };
        }
        s
    }
}

/// What a request reserved, to be released when it settles: the tokens, and the
/// windows they were reserved in (a window that has rolled over since holds none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reservation {
    pub tokens: u64,
    /// Start of each token window and of the quota window at reservation time.
    starts: [u64; 4],
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn u64(&mut self) -> u64 {
        let v = self
            .bytes
            .get(self.pos..self.pos + 8)
            .and_then(|s| <[u8; 8]>::try_from(s).ok())
            .map_or(0, u64::from_le_bytes);
        self.pos += 8;
        v
    }

    fn u8(&mut self) -> u8 {
        let v = self.bytes.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        v
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    Requests,
    Tokens,
}

impl LimitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::Requests => "requests",
            LimitKind::Tokens => "tokens",
        }
    }
}

/// One `x-ratelimit-*` trio: the tightest limit of a kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    pub limit: u64,
    pub remaining: u64,
    /// Until the limit is back to its initial state.
    pub reset_ms: u64,
}

/// What is left, for the `x-ratelimit-*` headers of allowed responses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Headroom {
    pub requests: Option<Counter>,
    pub tokens: Option<Counter>,
}

/// Why a request is refused. Mapped to a 429 at the edge (`response`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitError {
    /// A rate or token budget: retry after `retry_after_ms`.
    RateLimited { kind: LimitKind, retry_after_ms: u64, headroom: Headroom },
    /// A quota is spent: do not retry before the window ends.
    QuotaExceeded { kind: LimitKind, retry_after_ms: u64, headroom: Headroom },
}

impl LimitError {
    pub fn reason(&self) -> &'static str {
        match self {
            LimitError::RateLimited { .. } => "rate_limited",
            LimitError::QuotaExceeded { .. } => "quota_exceeded",
        }
    }
}

fn tighter(a: Option<Counter>, b: Counter) -> Option<Counter> {
    match a {
        Some(a) if (a.remaining, a.limit) <= (b.remaining, b.limit) => Some(a),
        _ => Some(b),
    }
}

impl LimitState {
    fn refill(&mut self, spec: &LimitSpec, now_ms: u64) {
        let rates = spec.request_rates();
        for (i, bucket) in self.buckets.iter_mut().enumerate() {
            let (Some(rate), Some(cap), Some(window)) =
                (rates.get(i).copied().flatten(), spec.capacity(i), REQUEST_WINDOWS.get(i))
            else {
                continue;
            };
            let cap = cap as f64;
            if !bucket.used {
                *bucket = Bucket { level: cap, last_ms: now_ms, used: true };
                continue;
            }
            let elapsed = now_ms.saturating_sub(bucket.last_ms) as f64;
            bucket.level = (bucket.level + elapsed * rate as f64 / window.millis() as f64).min(cap);
            bucket.last_ms = bucket.last_ms.max(now_ms);
        }
        for (w, window) in self.token_windows.iter_mut().zip(TOKEN_WINDOWS) {
            w.roll(window, now_ms);
        }
        if let Some(q) = &spec.quota {
            self.quota.roll(q.window, now_ms);
        }
    }

    /// Headroom after refilling to `now_ms`.
    pub fn headroom(&mut self, spec: &LimitSpec, now_ms: u64) -> Headroom {
        self.refill(spec, now_ms);
        let mut h = Headroom::default();
        let rates = spec.request_rates();
        for (i, bucket) in self.buckets.iter().enumerate() {
            let (Some(rate), Some(cap), Some(window)) =
                (rates.get(i).copied().flatten(), spec.capacity(i), REQUEST_WINDOWS.get(i))
            else {
                continue;
            };
            let missing = (cap as f64 - bucket.level).max(0.0);
            let reset_ms = (missing * window.millis() as f64 / rate as f64).ceil() as u64;
            let c = Counter { limit: cap, remaining: bucket.level.floor().max(0.0) as u64, reset_ms };
            h.requests = tighter(h.requests, c);
        }
        for ((w, window), budget) in self.token_windows.iter().zip(TOKEN_WINDOWS).zip(spec.token_budgets()) {
            if let Some(limit) = budget {
                let c =
                    Counter { limit, remaining: limit.saturating_sub(w.held()), reset_ms: w.reset_in(window, now_ms) };
                h.tokens = tighter(h.tokens, c);
            }
        }
        if let Some(q) = &spec.quota {
            let reset_ms = self.quota.reset_in(q.window, now_ms);
            if let Some(limit) = q.requests {
                let c = Counter { limit, remaining: limit.saturating_sub(self.quota.requests), reset_ms };
                h.requests = tighter(h.requests, c);
            }
            if let Some(limit) = q.tokens {
                let c = Counter { limit, remaining: limit.saturating_sub(self.quota.held()), reset_ms };
                h.tokens = tighter(h.tokens, c);
            }
        }
        h
    }

    /// Admits one request reserving nothing (see [`LimitState::admit_reserving`]).
    pub fn admit(&mut self, spec: &LimitSpec, now_ms: u64) -> Result<Headroom, LimitError> {
        self.admit_reserving(spec, now_ms, 0).map(|(h, _)| h)
    }

    /// Admits one request (consuming from every request limit and reserving `reserve`
    /// tokens) or says why not. A refused request consumes nothing.
    pub fn admit_reserving(
        &mut self,
        spec: &LimitSpec,
        now_ms: u64,
        reserve: u64,
    ) -> Result<(Headroom, Reservation), LimitError> {
        let before = self.headroom(spec, now_ms);
        if let Some(q) = &spec.quota {
            let reset = self.quota.reset_in(q.window, now_ms);
            if q.requests.is_some_and(|l| self.quota.requests >= l) {
                return Err(LimitError::QuotaExceeded {
                    kind: LimitKind::Requests,
                    retry_after_ms: reset,
                    headroom: before,
                });
            }
        }
        let rates = spec.request_rates();
        let mut wait_ms = 0u64;
        for (i, bucket) in self.buckets.iter().enumerate() {
            let (Some(rate), Some(window)) = (rates.get(i).copied().flatten(), REQUEST_WINDOWS.get(i)) else {
                continue;
            };
            if bucket.level < 1.0 {
                let need = ((1.0 - bucket.level) * window.millis() as f64 / rate as f64).ceil() as u64;
                wait_ms = wait_ms.max(need.max(1));
            }
        }
        if wait_ms > 0 {
            return Err(LimitError::RateLimited {
                kind: LimitKind::Requests,
                retry_after_ms: wait_ms,
                headroom: before,
            });
        }
        self.check_tokens(spec, now_ms, before)?;
        for (i, bucket) in self.buckets.iter_mut().enumerate() {
            if rates.get(i).copied().flatten().is_some() {
                bucket.level -= 1.0;
            }
        }
        if spec.quota.is_some() {
            self.quota.requests = self.quota.requests.saturating_add(1);
        }
        let reservation = self.hold(spec, reserve);
        Ok((self.headroom(spec, now_ms), reservation))
    }

    /// Reserves `tokens` for a request already admitted (whose cost is known only once
    /// its body has been read), if the token budgets are not held in full already.
    pub fn reserve(
        &mut self,
        spec: &LimitSpec,
        now_ms: u64,
        tokens: u64,
    ) -> Result<(Headroom, Reservation), LimitError> {
        let before = self.headroom(spec, now_ms);
        self.check_tokens(spec, now_ms, before)?;
        let reservation = self.hold(spec, tokens);
        Ok((self.headroom(spec, now_ms), reservation))
    }

    /// Refuses when a token budget or quota is held in full: by tokens used (until the
    /// window ends; a spent quota is not retryable) or by reservations of requests in
    /// flight (retry in a second: they settle as their streams end).
    fn check_tokens(&self, spec: &LimitSpec, now_ms: u64, headroom: Headroom) -> Result<(), LimitError> {
        if let Some((q, limit)) = spec.quota.as_ref().and_then(|q| q.tokens.map(|l| (q, l))) {
            let reset = self.quota.reset_in(q.window, now_ms);
            if self.quota.tokens >= limit {
                return Err(LimitError::QuotaExceeded { kind: LimitKind::Tokens, retry_after_ms: reset, headroom });
            }
            if self.quota.held() >= limit {
                return Err(LimitError::RateLimited { kind: LimitKind::Tokens, retry_after_ms: 1_000, headroom });
            }
        }
        for ((w, window), budget) in self.token_windows.iter().zip(TOKEN_WINDOWS).zip(spec.token_budgets()) {
            let Some(limit) = budget else { continue };
            if w.tokens >= limit {
                let retry = w.reset_in(window, now_ms).max(1);
                return Err(LimitError::RateLimited { kind: LimitKind::Tokens, retry_after_ms: retry, headroom });
            }
            if w.held() >= limit {
                let retry = w.reset_in(window, now_ms).clamp(1, 1_000);
                return Err(LimitError::RateLimited { kind: LimitKind::Tokens, retry_after_ms: retry, headroom });
            }
        }
        Ok(())
    }

    /// Adds `tokens` to the reserved count of every token window and the token quota.
    fn hold(&mut self, spec: &LimitSpec, tokens: u64) -> Reservation {
        let mut r = Reservation { tokens, starts: [0; 4] };
        if tokens == 0 || !spec.counts_tokens() {
            return Reservation::default();
        }
        for (w, start) in self.token_windows.iter_mut().zip(r.starts.iter_mut()) {
            w.reserved = w.reserved.saturating_add(tokens);
            *start = w.start_ms;
        }
        if spec.quota.is_some() {
            self.quota.reserved = self.quota.reserved.saturating_add(tokens);
            if let Some(start) = r.starts.get_mut(3) {
                *start = self.quota.start_ms;
            }
        }
        r
    }

    /// Settles a finished request: releases its reservation (in the windows it was made
    /// in) and charges `tokens` to the budgets and quota.
    pub fn settle(&mut self, spec: &LimitSpec, reservation: &Reservation, tokens: u64, now_ms: u64) {
        self.refill(spec, now_ms);
        let windows = self.token_windows.iter_mut().chain(std::iter::once(&mut self.quota));
        for (w, start) in windows.zip(reservation.starts) {
            if reservation.tokens > 0 && w.start_ms == start {
                w.reserved = w.reserved.saturating_sub(reservation.tokens);
            }
        }
        for w in &mut self.token_windows {
            w.tokens = w.tokens.saturating_add(tokens);
        }
        if spec.quota.is_some() {
            self.quota.tokens = self.quota.tokens.saturating_add(tokens);
        }
    }

    /// Charges the tokens of a finished request that reserved nothing.
    pub fn charge(&mut self, spec: &LimitSpec, tokens: u64, now_ms: u64) {
        self.settle(spec, &Reservation::default(), tokens, now_ms);
    }
}

/// Shared-data key of an identity's state. Istio leaves `vm_id` empty, so keys are
/// prefixed; the user name is hex-encoded to keep the key printable and unambiguous.
pub fn state_key(user: &str) -> String {
    format!("tollgate.limits.v1.user.{}", hex::encode(user.as_bytes()))
}

/// Key of the count of tracked identities (see `max_identities`).
pub const IDENTITY_COUNT_KEY: &str = "tollgate.limits.v1.identities";
/// Key shared by identities beyond `max_identities` (they share one state: stricter, never looser).
pub const OVERFLOW_KEY: &str = "tollgate.limits.v1.overflow";

/// Formats a duration as OpenAI does in `x-ratelimit-reset-*` (e.g. `1s`, `6m0s`, `1h2m3s`, `120ms`).
pub fn format_reset(ms: u64) -> String {
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = ms.div_ceil(1000);
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

#[cfg(test)]
mod tests {
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    const T0: u64 = 1_763_800_040_000; // 20 s into a minute

    fn spec(json: &str) -> LimitSpec {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn request_rate_allows_burst_then_refills() {
        let s = spec(r#"{"requests_per_minute":5}"#);
        let mut st = LimitState::default();
        let mut results = Vec::new();
        for i in 0..7 {
            results.push(st.admit(&s, T0 + i).is_ok());
        }
        assert_eq!(results, [true, true, true, true, true, false, false]);
        // One request refills every 12 s.
        match st.admit(&s, T0 + 10) {
            Err(LimitError::RateLimited { kind: LimitKind::Requests, retry_after_ms, headroom }) => {
                assert!((11_990..=12_000).contains(&retry_after_ms), "{retry_after_ms}");
                assert_eq!(headroom.requests.map(|c| (c.limit, c.remaining)), Some((5, 0)));
            }
            other => panic!("{other:?}"),
        }
        assert!(st.admit(&s, T0 + 12_010).is_ok());
        assert!(st.admit(&s, T0 + 12_011).is_err());
    }

    #[test]
    fn burst_sets_the_shortest_bucket_only() {
        let s = spec(r#"{"requests_per_second":1,"burst":3,"requests_per_minute":4}"#);
        let mut st = LimitState::default();
        let ok: Vec<bool> = (0..4).map(|i| st.admit(&s, T0 + i).is_ok()).collect();
        assert_eq!(ok, [true, true, true, false]);
        // After 2 s the second bucket refilled 2, the minute bucket has 1 left.
        let ok: Vec<bool> = (0..3).map(|i| st.admit(&s, T0 + 2_000 + i).is_ok()).collect();
        assert_eq!(ok, [true, false, false]);
    }

    #[test]
    fn token_budget_admits_until_spent_then_resets_at_window_end() {
        let s = spec(r#"{"tokens_per_minute":10}"#);
        let mut st = LimitState::default();
        assert!(st.admit(&s, T0).is_ok());
        st.charge(&s, 7, T0 + 100);
        assert!(st.admit(&s, T0 + 200).is_ok(), "7 < 10: admitted");
        st.charge(&s, 7, T0 + 300);
        match st.admit(&s, T0 + 400) {
            Err(LimitError::RateLimited { kind: LimitKind::Tokens, retry_after_ms, headroom }) => {
                assert_eq!(retry_after_ms, 60_000 - 20_000 - 400);
                assert_eq!(headroom.tokens.map(|c| (c.limit, c.remaining)), Some((10, 0)));
            }
            other => panic!("{other:?}"),
        }
        // The next minute starts fresh.
        assert!(st.admit(&s, T0 + 40_000).is_ok());
    }

    #[test]
    fn quota_is_not_retryable_and_windows_roll_over() {
        let s = spec(r#"{"quota":{"requests":2,"window":"day"}}"#);
        let mut st = LimitState::default();
        assert!(st.admit(&s, T0).is_ok());
        assert!(st.admit(&s, T0 + 1).is_ok());
        let err = st.admit(&s, T0 + 2).unwrap_err();
        assert!(matches!(err, LimitError::QuotaExceeded { kind: LimitKind::Requests, .. }));
        assert_eq!(err.reason(), "quota_exceeded");
        let next_day = T0 - T0 % 86_400_000 + 86_400_000;
        assert!(st.admit(&s, next_day).is_ok());

        let t = spec(r#"{"quota":{"tokens":10,"window":"hour"}}"#);
        let mut st = LimitState::default();
        assert!(st.admit(&t, T0).is_ok());
        st.charge(&t, 12, T0);
        assert!(matches!(st.admit(&t, T0 + 1), Err(LimitError::QuotaExceeded { kind: LimitKind::Tokens, .. })));
    }

    #[test]
    fn headroom_reports_the_tightest_limit() {
        let s = spec(r#"{"requests_per_minute":100,"quota":{"requests":3,"window":"day"},"tokens_per_day":1000}"#);
        let mut st = LimitState::default();
        let h = st.admit(&s, T0).unwrap();
        assert_eq!(h.requests.map(|c| (c.limit, c.remaining)), Some((3, 2)));
        assert_eq!(h.tokens.map(|c| (c.limit, c.remaining)), Some((1000, 1000)));
    }

    /// Reserve at admission, settle at the end: concurrent requests near the edge of a
    /// budget are admitted only while used + reserved is under it.
    #[test]
    fn reservations_bound_concurrent_admissions() {
        // (budget spec, tokens used before, reservation per request, actual per request,
        //  requests admitted of 20 concurrent)
        let cases = [
            (r#"{"tokens_per_minute":100}"#, 0, 10, 10, 10),
            (r#"{"tokens_per_minute":100}"#, 95, 10, 10, 1),
            (r#"{"tokens_per_minute":100}"#, 0, 0, 10, 20),
            (r#"{"tokens_per_minute":100}"#, 0, 1000, 10, 1),
            (r#"{"quota":{"tokens":100,"window":"day"}}"#, 50, 20, 20, 3),
            (r#"{"tokens_per_minute":100,"tokens_per_day":30}"#, 0, 10, 10, 3),
        ];
        for (json, used, reserve, actual, want) in cases {
            let s = spec(json);
            let mut st = LimitState::default();
            st.admit(&s, T0).unwrap();
            st.charge(&s, used, T0);
            let mut admitted = Vec::new();
            for i in 0..20 {
                match st.admit(&s, T0 + 1).and_then(|_| st.reserve(&s, T0 + 1, reserve)) {
                    Ok((_, r)) => admitted.push(r),
                    Err(e) => {
                        assert!(
                            matches!(e, LimitError::RateLimited { kind: LimitKind::Tokens, .. }),
                            "{json} #{i}: {e:?}"
                        );
                    }
                }
            }
            assert_eq!(admitted.len(), want, "{json} used {used} reserve {reserve}");
            for r in &admitted {
                st.settle(&s, r, actual, T0 + 2);
            }
            // Every reservation released, the real usage charged.
            assert!(st.token_windows.iter().chain([&st.quota]).all(|w| w.reserved == 0), "{json}");
            let total = used + actual * want as u64;
            assert_eq!(st.token_windows[0].tokens, total, "{json}");
        }
    }

    #[test]
    fn held_budgets_are_retryable_spent_ones_wait_for_the_window() {
        let s = spec(r#"{"tokens_per_minute":10,"quota":{"tokens":100,"window":"day"}}"#);
        let mut st = LimitState::default();
        let (h, r) = st.admit_reserving(&s, T0, 10).unwrap();
        assert_eq!(h.tokens.map(|c| c.remaining), Some(0), "reserved counts as used in the headers");
        match st.admit(&s, T0 + 1) {
            Err(LimitError::RateLimited { kind: LimitKind::Tokens, retry_after_ms, .. }) => {
                assert_eq!(retry_after_ms, 1_000)
            }
            other => panic!("{other:?}"),
        }
        st.settle(&s, &r, 3, T0 + 2);
        let h = st.admit(&s, T0 + 3).unwrap();
        assert_eq!(h.tokens.map(|c| c.remaining), Some(7));
        st.charge(&s, 100, T0 + 4);
        assert!(matches!(st.admit(&s, T0 + 5), Err(LimitError::QuotaExceeded { kind: LimitKind::Tokens, .. })));
    }

    #[test]
    fn a_reservation_from_a_past_window_releases_nothing_in_the_new_one() {
        let s = spec(r#"{"tokens_per_minute":100}"#);
        let mut st = LimitState::default();
        let (_, old) = st.admit_reserving(&s, T0, 30).unwrap();
        let next_minute = T0 + 60_000;
        let (_, new) = st.admit_reserving(&s, next_minute, 40).unwrap();
        st.settle(&s, &old, 5, next_minute + 1);
        assert_eq!((st.token_windows[0].reserved, st.token_windows[0].tokens), (40, 5));
        st.settle(&s, &new, 6, next_minute + 2);
        assert_eq!((st.token_windows[0].reserved, st.token_windows[0].tokens), (0, 11));
    }

    #[test]
    fn version_1_states_are_read_with_nothing_reserved() {
        let s = spec(r#"{"requests_per_minute":3,"tokens_per_hour":50}"#);
        let mut st = LimitState::default();
        st.admit(&s, T0).unwrap();
        st.charge(&s, 7, T0);
        // The version-1 encoding: the same fields without `reserved`.
        let v2 = st.encode();
        let mut v1 = vec![1u8];
        v1.extend_from_slice(&v2[1..1 + 4 * 17]);
        for w in v2[1 + 4 * 17..].chunks(32) {
            v1.extend_from_slice(&w[..24]);
        }
        assert_eq!(v1.len(), STATE_V1_LEN);
        assert_eq!(LimitState::decode(&v1), st);
    }

    #[test]
    fn on_contention_defaults_to_deny() {
        let raw: LimitsConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(Limits::from_config(raw).unwrap().on_contention, OnContention::Deny);
        let raw: LimitsConfig = serde_json::from_str(r#"{"on_contention":"allow"}"#).unwrap();
        assert_eq!(Limits::from_config(raw).unwrap().on_contention, OnContention::Allow);
        assert!(serde_json::from_str::<LimitsConfig>(r#"{"on_contention":"maybe"}"#).is_err());
    }

    #[test]
    fn state_round_trips_and_garbage_is_fresh() {
        let s = spec(
            r#"{"requests_per_second":3,"tokens_per_hour":50,"quota":{"requests":9,"tokens":9,"window":"minute"}}"#,
        );
        let mut st = LimitState::default();
        st.admit(&s, T0).unwrap();
        st.charge(&s, 5, T0);
        let bytes = st.encode();
        assert_eq!(bytes.len(), STATE_LEN);
        assert_eq!(LimitState::decode(&bytes), st);
        for garbage in [&b""[..], &[3u8; STATE_LEN][..], &[1u8; STATE_LEN][..], &[1u8, 2, 3][..]] {
            assert_eq!(LimitState::decode(garbage), LimitState::default());
        }
    }

    #[test]
    fn config_checks_name_the_field() {
        let cases = [
            (r#"{"groups":{"free":{"requests_per_minute":0}}}"#, "limits.groups.free.requests_per_minute"),
            (r#"{"users":{"u":{"burst":3}}}"#, "limits.users.u.burst"),
            (r#"{"users":{"u":{"quota":{"window":"day"}}}}"#, "limits.users.u.quota"),
            (r#"{"max_identities":0}"#, "limits.max_identities"),
        ];
        for (json, field) in cases {
            let raw: LimitsConfig = serde_json::from_str(json).unwrap();
            assert_eq!(Limits::from_config(raw).unwrap_err().0, field, "{json}");
        }
        assert!(serde_json::from_str::<LimitsConfig>(r#"{"users":{"u":{"quota":{"requests":1,"window":"week"}}}}"#)
            .is_err());
    }

    #[test]
    fn user_entry_overrides_groups() {
        let raw: LimitsConfig = serde_json::from_str(
            r#"{"groups":{"free":{"requests_per_minute":5},"premium":{"requests_per_minute":50}},
                "users":{"mittens":{"requests_per_day":1000}}}"#,
        )
        .unwrap();
        let l = Limits::from_config(raw).unwrap();
        let id = |user: &str, groups: &[&str]| Identity {
            user: user.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        };
        assert_eq!(l.spec_for(&id("mittens", &["free"])).and_then(|s| s.requests_per_day), Some(1000));
        assert_eq!(l.spec_for(&id("a", &["x", "premium", "free"])).and_then(|s| s.requests_per_minute), Some(50));
        assert!(l.spec_for(&id("a", &["x"])).is_none());
    }

    #[test]
    fn reset_format() {
        for (ms, want) in [(120, "120ms"), (1000, "1s"), (1001, "2s"), (360_000, "6m0s"), (3_723_000, "1h2m3s")] {
            assert_eq!(format_reset(ms), want);
        }
    }
}
