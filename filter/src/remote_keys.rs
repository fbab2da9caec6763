//! Managed API keys (`api_keys.remote`): keys created and revoked at run time in the
//! tracker (`tollgate key create`), resolved by the filter by digest and cached, so
//! issuing a key needs no new `pluginConfig`.
//!
//! Why this shape: the request path must stay a memory lookup for a key in use, and
//! the key service must not become a dependency of every request, nor a target.
//!
//! - A key not in the static list is looked for in this worker's memo, then in the
//!   cache in Envoy's shared data (for all workers: a fixed number of slots,
//!   `max_entries`, each holding one digest's answer, so entries and bytes are bounded).
//!   A "no such key" never takes the slot of another key still usable (`replaces`): a
//!   spray of random keys cannot push resolved keys out and into lookups that the
//!   spray has already spent; the worker keeps its own recent "no such key" answers
//!   (bounded) for the requests that asked. Positive answers live
//!   `ttl_seconds`, negative ones `negative_ttl_seconds`; a key past its `expires_at`
//!   stops at once, with no lookup.
//! - On a miss the request waits for one `POST /v1/keys/resolve` callout; other requests
//!   of the same worker for the same key wait for the same answer. Lookups are bounded
//!   per worker: `max_in_flight` at once and `max_lookups_per_second` (a token bucket).
//!   Beyond, or when the key service fails, an unknown key gets a 503
//!   `key_service_unavailable` (fail closed, without saying the key is wrong).
//! - The key service down: a cached key keeps working up to `max_stale_seconds` after
//!   it was resolved. Revocations reach every worker within `changes_interval_seconds`
//!   (each worker polls `GET /v1/keys/changes` from `on_tick`), and in any case within
//!   `ttl_seconds`.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::identity::Identity;

/// `api_keys.remote`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteKeys {
    pub cluster: String,
    pub authority: String,
    pub path: String,
    pub changes_path: String,
    pub timeout_ms: u64,
    pub ttl_seconds: u64,
    pub negative_ttl_seconds: u64,
    pub max_stale_seconds: u64,
    pub max_entries: u64,
    pub max_in_flight: usize,
    pub max_lookups_per_second: u64,
    pub changes_interval_seconds: u64,
    /// `Bearer <token>` for the key service (the gateways' ingest token).
    pub authorization: Option<String>,
}

impl RemoteKeys {
    /// The headers of a callout to the key service.
    pub fn headers<'a>(&'a self, method: &'a str, path: &'a str) -> Vec<(&'a str, &'a str)> {
        let mut headers = vec![(":method", method), (":path", path), (":authority", self.authority.as_str())];
        if method == "POST" {
            headers.push(("content-type", "application/json"));
        }
        if let Some(auth) = &self.authorization {
            headers.push(("authorization", auth.as_str()));
        }
        headers
    }
}

/// A key the service knows, as it answers and as it is cached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownKey {
    pub id: String,
    pub user: String,
    #[serde(default)]
    pub groups: Vec<String>,
    /// Unix seconds.
    #[serde(default)]
    pub expires_at: Option<u64>,
}

impl KnownKey {
    /// An answer naming an identity the filter could not carry is no answer.
    fn check(&self) -> bool {
        tollgate_rules::check_user(&self.user).is_ok()
            && self.groups.iter().all(|g| tollgate_rules::check_group(g).is_ok())
            && self.id.len() <= 128
    }

    pub fn identity(&self) -> Identity {
        Identity { user: self.user.clone(), groups: self.groups.clone() }
    }

    fn expired(&self, now_s: u64) -> bool {
        self.expires_at.is_some_and(|e| e <= now_s)
    }
}

/// One cache slot: a digest and what the service said of it, when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedKey {
    #[serde(rename = "d")]
    pub digest: String,
    #[serde(rename = "t")]
    pub cached_s: u64,
    #[serde(rename = "k")]
    pub key: Option<KnownKey>,
}

/// Most bytes of one slot (a longer answer is used but not cached).
pub const MAX_SLOT_BYTES: usize = 2048;

impl CachedKey {
    pub fn encode(&self) -> Option<Vec<u8>> {
        serde_json::to_vec(self).ok().filter(|b| b.len() <= MAX_SLOT_BYTES)
    }

    pub fn decode(bytes: &[u8]) -> Option<CachedKey> {
        serde_json::from_slice(bytes).ok()
    }
}

/// The shared-data key of the slot of `digest`.
pub fn slot_key(digest: &[u8; 32], max_entries: u64) -> String {
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    format!("tollgate.keys.v1.{}", u64::from_le_bytes(first) % max_entries.max(1))
}

impl CachedKey {
    /// Whether writing `self` into a slot that holds `existing` keeps what matters: an
    /// answer for the same digest, any known key, or a slot holding nothing usable. A
    /// negative answer never evicts another key that could still be used.
    pub fn replaces(&self, existing: Option<&CachedKey>, now_s: u64, remote: &RemoteKeys) -> bool {
        let Some(existing) = existing else { return true };
        let usable = |key: &KnownKey| {
            let keep = remote.ttl_seconds.max(remote.max_stale_seconds);
            !key.expired(now_s) && now_s.saturating_sub(existing.cached_s) < keep
        };
        self.key.is_some() || existing.digest == self.digest || !existing.key.as_ref().is_some_and(usable)
    }
}

/// What the cache says of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cached {
    /// Known and fresh (or stale while the service is down, within `max_stale_seconds`).
    Valid(KnownKey, u64),
    /// Unknown (fresh negative answer), revoked or expired: a 401.
    Invalid,
    /// Ask the service (known but stale: usable if the service fails, see `stale_usable`).
    Lookup(Option<(KnownKey, u64)>),
}

/// Classifies the slot's content for `digest` at `now_s`.
pub fn classify(slot: Option<CachedKey>, digest_hex: &str, now_s: u64, remote: &RemoteKeys, down: bool) -> Cached {
    let Some(entry) = slot.filter(|e| e.digest == digest_hex) else { return Cached::Lookup(None) };
    let age = now_s.saturating_sub(entry.cached_s);
    match entry.key {
        Some(key) if key.expired(now_s) => Cached::Invalid,
        Some(key) if age < remote.ttl_seconds || (down && age < remote.max_stale_seconds) => {
            Cached::Valid(key, entry.cached_s)
        }
        Some(key) => Cached::Lookup(Some((key, entry.cached_s))),
        None if age < remote.negative_ttl_seconds => Cached::Invalid,
        None => Cached::Lookup(None),
    }
}

/// The service's answer to a resolve: `Some(Some(key))` known, `Some(None)` unknown
/// (404), `None` no usable answer (a failure).
pub fn parse_resolve(status: Option<u32>, body: Option<&[u8]>) -> Option<Option<KnownKey>> {
    match status {
        Some(200) => body.and_then(|b| serde_json::from_slice::<KnownKey>(b).ok()).filter(KnownKey::check).map(Some),
        Some(404) => Some(None),
        _ => None,
    }
}

/// The answer of `GET /v1/keys/changes`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Changes {
    pub now: u64,
    #[serde(default)]
    pub revoked: Vec<String>,
    #[serde(default)]
    pub more: bool,
}

/// Resolved keys this worker used lately: the request path of a key in use is a map
/// lookup (its digest from `KeyCache`), no shared-data read. Bounded; cleared when full.
#[derive(Debug, Default)]
pub struct RemoteMemo {
    entries: HashMap<[u8; 32], (Identity, Option<u64>, u64)>,
    capacity: usize,
}

impl RemoteMemo {
    pub fn new(capacity: usize) -> Self {
        Self { entries: HashMap::new(), capacity }
    }

    /// The identity of `digest` if remembered, fresh (`ttl_s`) and not expired.
    pub fn get(&self, digest: &[u8; 32], now_s: u64, ttl_s: u64) -> Option<&Identity> {
        let (identity, expires, cached) = self.entries.get(digest)?;
        let fresh = now_s.saturating_sub(*cached) < ttl_s && expires.is_none_or(|e| now_s < e);
        fresh.then_some(identity)
    }

    pub fn insert(&mut self, digest: [u8; 32], key: &KnownKey, cached_s: u64) -> Option<&Identity> {
        if self.capacity == 0 {
            return None;
        }
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&digest) {
            self.entries.clear();
        }
        let entry = self.entries.entry(digest).or_default();
        *entry = (key.identity(), key.expires_at, cached_s);
        Some(&entry.0)
    }

    pub fn remove(&mut self, digest: &[u8; 32]) {
        self.entries.remove(digest);
    }
}

/// How a request that needs a lookup proceeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Send the callout (this request owns the lookup).
    Dispatch,
    /// Another request of this worker is looking it up: wait for its answer.
    Join,
    /// Over `max_in_flight` or `max_lookups_per_second`: refused (503).
    Refused,
}

/// This worker's lookups in flight and their bounds.
#[derive(Debug, Default)]
pub struct KeyLookups {
    /// Digest → the contexts waiting for it (the first one sent the callout).
    in_flight: HashMap<[u8; 32], Vec<u32>>,
    tokens: f64,
    last_ms: u64,
    /// The last lookup failed: stale cached keys may be used.
    pub down: bool,
    /// Lookups refused by the bounds, since start.
    pub refused: u64,
    /// The changes feed: the `since` of the next poll, and whether one is in flight.
    pub changes_since_ms: Option<u64>,
    pub changes_in_flight: bool,
    /// Keys the service said it does not know, when (this worker; cleared when full): a
    /// 401 for the request that asked and those that waited, even when the shared slot
    /// kept another key.
    unknown: HashMap<[u8; 32], u64>,
}

/// Most entries of a worker's `unknown` keys.
const MAX_UNKNOWN: usize = 1024;

impl KeyLookups {
    /// A request of context `ctx` needs `digest` resolved.
    pub fn start(&mut self, digest: [u8; 32], ctx: u32, now_ms: u64, remote: &RemoteKeys) -> Start {
        if let Some(waiters) = self.in_flight.get_mut(&digest) {
            waiters.push(ctx);
            return Start::Join;
        }
        let rate = remote.max_lookups_per_second as f64;
        let elapsed = now_ms.saturating_sub(self.last_ms) as f64 / 1000.0;
        self.tokens = if self.last_ms == 0 { rate } else { (self.tokens + elapsed * rate).min(rate) };
        self.last_ms = now_ms;
        if self.in_flight.len() >= remote.max_in_flight || self.tokens < 1.0 {
            self.refused += 1;
            return Start::Refused;
        }
        self.tokens -= 1.0;
        self.in_flight.insert(digest, vec![ctx]);
        Start::Dispatch
    }

    /// The lookup of `digest` is over, with the service's `answer` if there is one:
    /// the contexts that waited for it.
    pub fn finish(&mut self, digest: &[u8; 32], answer: Option<&Option<KnownKey>>, now_s: u64) -> Vec<u32> {
        match answer {
            Some(None) => {
                if self.unknown.len() >= MAX_UNKNOWN {
                    self.unknown.clear();
                }
                self.unknown.insert(*digest, now_s);
            }
            Some(Some(_)) => {
                self.unknown.remove(digest);
            }
            None => {}
        }
        self.in_flight.remove(digest).unwrap_or_default()
    }

    /// Whether the service said lately (`negative_ttl_s`) that it does not know `digest`.
    pub fn is_unknown(&self, digest: &[u8; 32], now_s: u64, negative_ttl_s: u64) -> bool {
        self.unknown.get(digest).is_some_and(|at| now_s.saturating_sub(*at) < negative_ttl_s)
    }

    /// Context `ctx` stopped waiting (its stream ended). When it owned the lookup (its
    /// callout is cancelled with it), the others are returned: they must ask again.
    pub fn leave(&mut self, digest: &[u8; 32], ctx: u32) -> Vec<u32> {
        let Some(waiters) = self.in_flight.get_mut(digest) else { return Vec::new() };
        if waiters.first() == Some(&ctx) {
            let mut rest = self.in_flight.remove(digest).unwrap_or_default();
            rest.retain(|c| *c != ctx);
            return rest;
        }
        waiters.retain(|c| *c != ctx);
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    fn remote() -> RemoteKeys {
        RemoteKeys {
            cluster: "c".into(),
            authority: "a".into(),
            path: "/v1/keys/resolve".into(),
            changes_path: "/v1/keys/changes".into(),
            timeout_ms: 1000,
            ttl_seconds: 60,
            negative_ttl_seconds: 10,
            max_stale_seconds: 600,
            max_entries: 100,
            max_in_flight: 2,
            max_lookups_per_second: 3,
            changes_interval_seconds: 5,
            authorization: None,
        }
    }

    fn key(expires_at: Option<u64>) -> KnownKey {
        KnownKey { id: "key_1".into(), user: "ann".into(), groups: vec!["free".into()], expires_at }
    }

    #[test]
    fn cache_verdicts() {
        let r = remote();
        let at = |k: Option<KnownKey>, t| Some(CachedKey { digest: "ab".into(), cached_s: t, key: k });
        for (name, slot, now, down, want) in [
            ("empty", None, 100, false, Cached::Lookup(None)),
            (
                "another digest",
                Some(CachedKey { digest: "cd".into(), cached_s: 99, key: None }),
                100,
                false,
                Cached::Lookup(None),
            ),
            ("fresh", at(Some(key(None)), 50), 100, false, Cached::Valid(key(None), 50)),
            ("stale", at(Some(key(None)), 30), 100, false, Cached::Lookup(Some((key(None), 30)))),
            ("stale, service down", at(Some(key(None)), 30), 100, true, Cached::Valid(key(None), 30)),
            ("too stale even when down", at(Some(key(None)), 0), 700, true, Cached::Lookup(Some((key(None), 0)))),
            ("expired, no lookup", at(Some(key(Some(100))), 90), 100, false, Cached::Invalid),
            ("negative, fresh", at(None, 95), 100, false, Cached::Invalid),
            ("negative, old", at(None, 80), 100, false, Cached::Lookup(None)),
        ] {
            assert_eq!(classify(slot, "ab", now, &r, down), want, "{name}");
        }
        let slot = CachedKey { digest: "ab".into(), cached_s: 1, key: Some(key(Some(5))) };
        assert_eq!(CachedKey::decode(&slot.encode().unwrap()), Some(slot));
        let huge = CachedKey {
            digest: "ab".into(),
            cached_s: 1,
            key: Some(KnownKey { groups: vec!["g".repeat(100); 30], ..key(None) }),
        };
        assert_eq!(huge.encode(), None, "over MAX_SLOT_BYTES: not cached");
        assert!(slot_key(&[7; 32], 100).starts_with("tollgate.keys.v1."));
    }

    #[test]
    fn a_negative_answer_never_evicts_a_usable_key() {
        let r = remote(); // ttl 60, max_stale 600
        let slot = |d: &str, t, k: Option<KnownKey>| CachedKey { digest: d.into(), cached_s: t, key: k };
        for (name, existing, now, want) in [
            ("empty slot", None, 100, true),
            ("the same digest (a revocation)", Some(slot("ab", 90, Some(key(None)))), 100, true),
            ("another negative", Some(slot("cd", 99, None)), 100, true),
            ("another key, fresh", Some(slot("cd", 90, Some(key(None)))), 100, false),
            ("another key, stale but usable in an outage", Some(slot("cd", 0, Some(key(None)))), 100, false),
            ("another key, past max_stale", Some(slot("cd", 0, Some(key(None)))), 700, true),
            ("another key, expired", Some(slot("cd", 90, Some(key(Some(100))))), 100, true),
        ] {
            let unknown = slot("ab", now, None);
            assert_eq!(unknown.replaces(existing.as_ref(), now, &r), want, "{name}");
        }
        let known = slot("ef", 100, Some(key(None)));
        assert!(known.replaces(Some(&slot("cd", 99, Some(key(None)))), 100, &r), "a known key takes any slot");
    }

    #[test]
    fn answers() {
        let ok = br#"{"id":"key_1","user":"ann","groups":["free"],"expires_at":null}"#;
        assert_eq!(parse_resolve(Some(200), Some(ok)), Some(Some(key(None))));
        assert_eq!(parse_resolve(Some(404), None), Some(None));
        for (status, body) in [(Some(200), Some(&b"nope"[..])), (Some(503), None), (None, None), (Some(401), None)] {
            assert_eq!(parse_resolve(status, body), None, "{status:?}");
        }
        let bad_user = br#"{"id":"k","user":"a,b","groups":[]}"#;
        assert_eq!(parse_resolve(Some(200), Some(bad_user)), None, "an identity that cannot be carried");
    }

    #[test]
    fn lookups_are_shared_and_bounded() {
        let r = remote();
        let mut l = KeyLookups::default();
        assert_eq!(l.start([1; 32], 10, 1_000, &r), Start::Dispatch);
        assert_eq!(l.start([1; 32], 11, 1_000, &r), Start::Join);
        assert_eq!(l.start([2; 32], 12, 1_000, &r), Start::Dispatch);
        assert_eq!(l.start([3; 32], 13, 1_000, &r), Start::Refused, "max_in_flight 2");
        assert_eq!(l.finish(&[1; 32], None, 1), [10, 11]);
        assert_eq!(l.start([3; 32], 13, 1_000, &r), Start::Dispatch);
        l.finish(&[2; 32], Some(&None), 1);
        l.finish(&[3; 32], Some(&Some(key(None))), 1);
        assert!(l.is_unknown(&[2; 32], 10, 10) && !l.is_unknown(&[2; 32], 11, 10), "for negative_ttl");
        assert!(!l.is_unknown(&[3; 32], 1, 10));
        assert_eq!(l.start([4; 32], 14, 1_000, &r), Start::Refused, "3 per second spent");
        assert_eq!(l.refused, 2);
        assert_eq!(l.start([4; 32], 14, 1_400, &r), Start::Dispatch, "refilled");
        // The owner leaves: the others must ask again.
        assert_eq!(l.start([4; 32], 15, 1_400, &r), Start::Join);
        assert_eq!(l.leave(&[4; 32], 14), [15]);
        assert_eq!(l.finish(&[4; 32], None, 1), Vec::<u32>::new());
    }

    #[test]
    fn the_memo_holds_fresh_unexpired_keys() {
        let mut m = RemoteMemo::new(2);
        m.insert([1; 32], &key(Some(200)), 100);
        assert_eq!(m.get(&[1; 32], 150, 60).map(|i| i.user.as_str()), Some("ann"));
        assert!(m.get(&[1; 32], 161, 60).is_none(), "past the ttl");
        assert!(m.get(&[1; 32], 200, 1000).is_none(), "expired");
        m.insert([2; 32], &key(None), 100);
        m.insert([3; 32], &key(None), 100);
        assert!(m.get(&[1; 32], 101, 60).is_none(), "cleared when full");
        m.remove(&[3; 32]);
        assert!(m.get(&[3; 32], 101, 60).is_none());
    }
}
