//! Remote JWKS (`jwt.providers[].remote_jwks`): an identity provider's `jwks_uri`,
//! fetched through an Envoy cluster, shared by every worker, refreshed, and refetched
//! when a token names a key the set does not hold.
//!
//! Why it works this way:
//! - **One fetch for all workers.** Each worker's root context ticks, but the set lives
//!   in one shared-data slot per provider ([`Entry`]): a root fetches only after it
//!   claimed the fetch there by CAS (`attempt_ms`), so the others see it under way and
//!   wait for its result. Each worker parses a set once per version (the slot's CAS),
//!   keeping the parsed keys ([`WorkerSets`]).
//! - **Last good set kept.** A failed fetch, or an answer that is not a usable JWKS,
//!   changes nothing but `attempt_ms`; the set stays until it is older than
//!   `max_age_seconds`, then that provider's tokens are refused with a 503
//!   (`KeysUnavailable`) rather than trusted to keys that may have been revoked.
//! - **Rotation without waiting for a refresh.** A token whose `kid` is not in the set
//!   asks its worker's root for a refetch, at most once per
//!   `kid_refetch_min_interval_ms` per provider for the whole gateway (`refetch_ms` in
//!   the slot), so a stream of forged kids cannot make the gateway hammer the IdP; the
//!   request waits for the answer (the managed-key wait: `gateway::Stream::waiting`),
//!   and when no refetch may be made it is refused at once.
//! - Requests that arrive before the first successful fetch wait for it (up to
//!   `wait_ms`), instead of being refused while the gateway starts.

use std::collections::HashMap;
use std::rc::Rc;

use serde::{Deserialize, Serialize};

use crate::jwk::{Jwks, Source};

/// A fetched JWKS larger than this is refused (an IdP's is a few KB).
pub const MAX_JWKS_BYTES: usize = 256 * 1024;
/// After a failed fetch, the next attempt waits this long beyond the callout's timeout.
pub const RETRY_MS: u64 = 1_000;

/// The configuration of one provider's remote JWKS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteJwks {
    pub cluster: String,
    pub authority: String,
    pub path: String,
    pub refresh_seconds: u64,
    pub timeout_ms: u64,
    pub max_age_seconds: u64,
    pub kid_refetch_min_interval_ms: u64,
    pub wait_ms: u64,
}

impl RemoteJwks {
    pub fn headers(&self) -> Vec<(&str, &str)> {
        vec![(":method", "GET"), (":path", self.path.as_str()), (":authority", self.authority.as_str())]
    }
}

/// The shared-data slot of one provider.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The last good set as fetched (empty: none yet).
    #[serde(default)]
    pub jwks: String,
    /// When it was fetched (Unix ms; 0: never).
    #[serde(default)]
    pub fetched_ms: u64,
    /// When a root last claimed a fetch.
    #[serde(default)]
    pub attempt_ms: u64,
    /// When a refetch for an unknown kid was last claimed.
    #[serde(default)]
    pub refetch_ms: u64,
}

impl Entry {
    pub fn decode(bytes: Option<&[u8]>) -> Entry {
        bytes.and_then(|b| serde_json::from_slice(b).ok()).unwrap_or_default()
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// A fetch is under way somewhere (claimed, not yet timed out).
    pub fn fetch_in_flight(&self, now_ms: u64, conf: &RemoteJwks) -> bool {
        self.attempt_ms > self.fetched_ms && now_ms < self.attempt_ms.saturating_add(conf.timeout_ms + RETRY_MS)
    }

    /// A refetch for an unknown kid may be claimed now.
    pub fn refetch_allowed(&self, now_ms: u64, conf: &RemoteJwks) -> bool {
        self.refetch_ms == 0 || now_ms >= self.refetch_ms.saturating_add(conf.kid_refetch_min_interval_ms)
    }

    /// The fetch a root should claim now, if any: the set is missing or due for its
    /// refresh, or `refetch` (an unknown kid) is wanted and allowed; never while
    /// another fetch is under way.
    pub fn due(&self, now_ms: u64, conf: &RemoteJwks, refetch: bool) -> Option<Claim> {
        if self.fetch_in_flight(now_ms, conf) {
            return None;
        }
        if self.jwks.is_empty() || now_ms >= self.fetched_ms.saturating_add(conf.refresh_seconds * 1000) {
            return Some(Claim::Refresh);
        }
        (refetch && self.refetch_allowed(now_ms, conf)).then_some(Claim::UnknownKid)
    }

    /// The entry with this claim recorded.
    pub fn claimed(&self, claim: Claim, now_ms: u64) -> Entry {
        let mut e = self.clone();
        e.attempt_ms = now_ms;
        if claim == Claim::UnknownKid {
            e.refetch_ms = now_ms;
        }
        e
    }

    /// The entry after a fetch answered `body` (already checked by [`check_answer`]).
    pub fn fetched(&self, jwks: String, now_ms: u64) -> Entry {
        Entry { jwks, fetched_ms: now_ms, ..self.clone() }
    }

    /// The set is older than `max_age_seconds`: too old to trust.
    pub fn too_old(&self, now_ms: u64, conf: &RemoteJwks) -> bool {
        now_ms >= self.fetched_ms.saturating_add(conf.max_age_seconds.saturating_mul(1000))
    }
}

/// Why a root fetches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    Refresh,
    UnknownKid,
}

/// The JWKS text of a fetch's answer, if it is a usable set: a 200 whose body parses
/// with at least one usable public key. Anything else keeps the last good set.
pub fn check_answer(status: Option<u32>, body: Option<&[u8]>) -> Result<String, String> {
    if status != Some(200) {
        return Err(format!("status {status:?}"));
    }
    let body = body.ok_or("empty body")?;
    if body.len() > MAX_JWKS_BYTES {
        return Err(format!("over {MAX_JWKS_BYTES} bytes"));
    }
    let text = std::str::from_utf8(body).map_err(|_| "not UTF-8".to_string())?;
    Jwks::parse_from(text, Source::Remote)?;
    Ok(text.to_string())
}

/// The shared-data key of provider `issuer`'s set, for plugin `plugin_id`.
pub fn shared_key(plugin_id: &str, issuer: &str) -> String {
    format!("tollgate.jwks.v1.{plugin_id}.{issuer}")
}

/// One worker's parsed sets, by provider index, with the slot version they came from.
#[derive(Debug, Default)]
pub struct WorkerSets {
    sets: HashMap<usize, Parsed>,
}

#[derive(Debug)]
struct Parsed {
    cas: u32,
    fetched_ms: u64,
    keys: Rc<Jwks>,
}

/// What a worker has for a provider right now.
#[derive(Debug, Clone)]
pub enum Keys {
    /// A set, fetched at this time.
    Set(Rc<Jwks>, u64),
    /// None fetched yet.
    NotYet,
}

impl WorkerSets {
    /// The keys of provider `index` from its slot (`bytes`, version `cas`): parsed
    /// again only when the version changed.
    pub fn keys(&mut self, index: usize, bytes: Option<&[u8]>, cas: Option<u32>) -> Keys {
        let Some(cas) = cas else { return Keys::NotYet };
        if let Some(p) = self.sets.get(&index).filter(|p| p.cas == cas) {
            return Keys::Set(p.keys.clone(), p.fetched_ms);
        }
        let entry = Entry::decode(bytes);
        if entry.jwks.is_empty() {
            return Keys::NotYet;
        }
        match Jwks::parse_from(&entry.jwks, Source::Remote) {
            Ok(jwks) => {
                let keys = Rc::new(jwks);
                self.sets.insert(index, Parsed { cas, fetched_ms: entry.fetched_ms, keys: keys.clone() });
                Keys::Set(keys, entry.fetched_ms)
            }
            // Only checked sets are stored; a bad one (another build's) counts as none.
            Err(_) => Keys::NotYet,
        }
    }

    /// Whether a parse for version `cas` is cached (tests).
    pub fn has(&self, index: usize, cas: u32) -> bool {
        self.sets.get(&index).is_some_and(|p| p.cas == cas)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn conf() -> RemoteJwks {
        RemoteJwks {
            cluster: "idp".into(),
            authority: "idp.example".into(),
            path: "/certs".into(),
            refresh_seconds: 300,
            timeout_ms: 1000,
            max_age_seconds: 3600,
            kid_refetch_min_interval_ms: 30_000,
            wait_ms: 2000,
        }
    }

    fn jwks() -> String {
        format!(r#"{{"keys":[{}]}}"#, crate::jwk::tests::ed_jwk())
    }

    #[test]
    fn when_to_fetch() {
        let c = conf();
        let t = 1_000_000_000u64;
        let set = Entry { jwks: jwks(), fetched_ms: t, attempt_ms: t - 50, refetch_ms: 0 };
        #[rustfmt::skip]
        let cases: &[(&str, Entry, u64, bool, Option<Claim>)] = &[
            ("nothing yet", Entry::default(), t, false, Some(Claim::Refresh)),
            ("first fetch under way", Entry { attempt_ms: t, ..Entry::default() }, t + 500, false, None),
            ("first fetch timed out", Entry { attempt_ms: t, ..Entry::default() }, t + 2000, false, Some(Claim::Refresh)),
            ("fresh set", set.clone(), t + 1000, false, None),
            ("refresh due", set.clone(), t + 300_000, false, Some(Claim::Refresh)),
            ("unknown kid", set.clone(), t + 1000, true, Some(Claim::UnknownKid)),
            ("unknown kid, refetched lately", Entry { refetch_ms: t, ..set.clone() }, t + 29_999, true, None),
            ("unknown kid, interval passed", Entry { refetch_ms: t, ..set.clone() }, t + 30_000, true, Some(Claim::UnknownKid)),
            ("failed fetch: retry after timeout", Entry { attempt_ms: t + 300_000, ..set.clone() }, t + 301_000, false, None),
            ("failed fetch: retried", Entry { attempt_ms: t + 300_000, ..set.clone() }, t + 302_000, false, Some(Claim::Refresh)),
        ];
        for (name, entry, now, refetch, want) in cases {
            assert_eq!(entry.due(*now, &c, *refetch), *want, "{name}");
        }
        let claimed = set.claimed(Claim::UnknownKid, t + 5);
        assert_eq!((claimed.attempt_ms, claimed.refetch_ms), (t + 5, t + 5));
        assert!(claimed.fetch_in_flight(t + 6, &c));
        let done = claimed.fetched(jwks(), t + 9);
        assert!(!done.fetch_in_flight(t + 10, &c));
        assert_eq!(Entry::decode(Some(&done.encode())), done);
        assert_eq!(Entry::decode(Some(b"garbage")), Entry::default());
        assert!(!set.too_old(t + 3_599_999, &c));
        assert!(set.too_old(t + 3_600_000, &c));
    }

    #[test]
    fn answers() {
        let good = jwks();
        let oct = r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#;
        let big = vec![b' '; MAX_JWKS_BYTES + 1];
        #[rustfmt::skip]
        let cases: &[(Option<u32>, Option<&[u8]>, Result<(), &str>)] = &[
            (Some(200), Some(good.as_bytes()), Ok(())),
            (Some(500), Some(good.as_bytes()), Err("status")),
            (None, None, Err("status")),
            (Some(200), None, Err("empty")),
            (Some(200), Some(b"<html>"), Err("not valid JSON")),
            (Some(200), Some(oct.as_bytes()), Err("no usable key")),
            (Some(200), Some(&big), Err("over")),
            (Some(200), Some(&[0xff, 0xfe]), Err("not UTF-8")),
        ];
        for (status, body, want) in cases {
            match (check_answer(*status, *body), want) {
                (Ok(text), Ok(())) => assert_eq!(text, good),
                (Err(e), Err(prefix)) => assert!(e.contains(prefix), "{e} / {prefix}"),
                (got, want) => panic!("{status:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn workers_parse_each_version_once() {
        let mut w = WorkerSets::default();
        assert!(matches!(w.keys(0, None, None), Keys::NotYet));
        assert!(matches!(w.keys(0, Some(&Entry::default().encode()), Some(1)), Keys::NotYet));
        let e = Entry { jwks: jwks(), fetched_ms: 7, ..Entry::default() };
        let Keys::Set(first, 7) = w.keys(0, Some(&e.encode()), Some(2)) else { panic!("no set") };
        assert!(w.has(0, 2));
        // Same version: the same parsed keys, whatever the bytes say.
        let Keys::Set(again, 7) = w.keys(0, Some(b"ignored"), Some(2)) else { panic!("no set") };
        assert!(Rc::ptr_eq(&first, &again));
        // New version: parsed again.
        let e2 = Entry { fetched_ms: 9, ..e };
        let Keys::Set(next, 9) = w.keys(0, Some(&e2.encode()), Some(3)) else { panic!("no set") };
        assert!(!Rc::ptr_eq(&first, &next));
        assert_eq!(shared_key("p", "https://idp"), "tollgate.jwks.v1.p.https://idp");
        assert_eq!(conf().headers(), [(":method", "GET"), (":path", "/certs"), (":authority", "idp.example")]);
    }
}
