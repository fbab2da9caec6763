//! JWT verification, taking the same JWKS an Istio `RequestAuthentication` or an IdP's
//! `jwks_uri` gives: HS256, RS*/PS*, ES256, ES384 and EdDSA (keys and signatures in `jwk`).
//!
//! Everything the token says is distrusted until its signature checks out: the header is
//! only read for the algorithm (which decides what kind of key may be tried, so `alg:
//! none` and algorithm confusion have nothing to work with) and to pick a key, and the
//! payload only to pick the issuer. Claims are checked after the signature. Errors carry
//! a short fixed text for the 401 body and never any part of the token.
//!
//! Verified tokens are cached per worker so a client reusing its token pays for one
//! signature check (an HMAC, or the far dearer public-key operation), not one per
//! request; entries never outlive the token.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::rc::Rc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{Map, Value};

use crate::identity::Identity;
use crate::jwk::URL_SAFE_LENIENT;

/// Larger tokens are refused before any decoding.
pub const MAX_TOKEN_BYTES: usize = 8192;

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtError {
    TooLarge,
    Malformed,
    BadBase64,
    BadJson,
    UnsupportedAlg,
    UnknownIssuer,
    UnknownKid,
    BadSignature,
    Expired,
    NotYetValid,
    WrongAudience,
    /// `azp` missing or not one of the provider's `authorized_parties`.
    WrongAuthorizedParty,
    MissingExp,
    /// A claim (named) has the wrong type or a value that cannot be used.
    BadClaim(&'static str),
    MissingUser,
    /// The issuer's keys are fetched (`remote_jwks`) and there is no set to use: not
    /// fetched yet, or the last good one is older than `max_age_seconds`.
    KeysUnavailable,
}

impl JwtError {
    /// Short text for the 401 body.
    pub fn message(&self) -> &'static str {
        match self {
            JwtError::TooLarge => "token too large",
            JwtError::Malformed => "token malformed",
            JwtError::BadBase64 => "token is not valid base64url",
            JwtError::BadJson => "token header or payload is not a JSON object",
            JwtError::UnsupportedAlg => "token algorithm not allowed",
            JwtError::UnknownIssuer => "token issuer not trusted",
            JwtError::UnknownKid => "token key id unknown",
            JwtError::BadSignature => "token signature invalid",
            JwtError::Expired => "token expired",
            JwtError::NotYetValid => "token not yet valid",
            JwtError::WrongAudience => "token audience not allowed",
            JwtError::WrongAuthorizedParty => "token authorized party not allowed",
            JwtError::MissingExp => "token has no expiry",
            JwtError::BadClaim("exp") => "token exp claim invalid",
            JwtError::BadClaim("nbf") => "token nbf claim invalid",
            JwtError::BadClaim("aud") => "token aud claim invalid",
            JwtError::BadClaim("groups") => "token groups claim invalid",
            JwtError::BadClaim("user") => "token user claim invalid",
            JwtError::BadClaim(_) => "token claim invalid",
            JwtError::MissingUser => "token has no user claim",
            JwtError::KeysUnavailable => "token issuer keys unavailable, try again later",
        }
    }
}

impl fmt::Display for JwtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for JwtError {}

pub use crate::jwk::{Alg, Jwk, Jwks};

/// A trusted issuer and how to read its tokens.
#[derive(Clone, Debug)]
pub struct JwtProvider {
    pub issuer: String,
    /// Empty: `aud` is not checked.
    pub audiences: Vec<String>,
    /// Empty: `azp` (the OAuth client the token was issued to) is not checked.
    pub authorized_parties: Vec<String>,
    pub keys: Jwks,
    pub user_claim: String,
    pub groups_claim: String,
    pub clock_skew_seconds: u64,
    pub require_exp: bool,
}

/// What a good token established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    pub identity: Identity,
    pub issuer: String,
    /// First second at which the token is refused as expired: `exp` plus the clock
    /// skew, rounded up. `None` when the token has no `exp`.
    pub expires_at: Option<u64>,
}

/// Verifies tokens against the configured providers.
#[derive(Clone, Debug, Default)]
pub struct JwtVerifier {
    providers: Vec<JwtProvider>,
}

impl JwtVerifier {
    pub fn new(providers: Vec<JwtProvider>) -> Self {
        Self { providers }
    }

    pub fn is_empty(&self) -> bool {
        self.providers.is_empty()
    }

    /// The issuer of provider `index`.
    pub fn issuer(&self, index: usize) -> Option<&str> {
        self.providers.get(index).map(|p| p.issuer.as_str())
    }

    /// The index of the provider `token` names by `iss`, read without any check (to
    /// know which remote set a refused token needs; never to trust it).
    pub fn provider_of(&self, token: &str) -> Option<usize> {
        let payload = token.split('.').nth(1)?;
        let claims = decode_object(payload).ok()?;
        let issuer = claims.get("iss").and_then(Value::as_str)?;
        self.providers.iter().position(|p| p.issuer == issuer)
    }

    /// Verifies a token whose providers all have their keys in the configuration.
    pub fn verify(&self, token: &str, now_unix_secs: u64) -> Result<VerifiedToken, JwtError> {
        self.verify_with(token, now_unix_secs, |_| None)
    }

    /// As [`JwtVerifier::verify`]; `keys_of` gives the current key set of a provider
    /// whose keys are fetched (`remote_jwks`), by its index, or an error when there is
    /// none to use (not fetched yet, or too old).
    pub fn verify_with(
        &self,
        token: &str,
        now_unix_secs: u64,
        keys_of: impl Fn(usize) -> Option<Result<Rc<Jwks>, JwtError>>,
    ) -> Result<VerifiedToken, JwtError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(JwtError::TooLarge);
        }
        let mut parts = token.split('.');
        let (Some(h64), Some(p64), Some(s64), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(JwtError::Malformed);
        };
        if h64.is_empty() || p64.is_empty() || s64.is_empty() {
            return Err(JwtError::Malformed);
        }
        let header = decode_object(h64)?;
        // The algorithm decides which keys may be tried (see `jwk`): `none`, unknown
        // names and a non-string are refused before anything else is read.
        let alg = match header.get("alg") {
            Some(Value::String(name)) => Alg::from_name(name).ok_or(JwtError::UnsupportedAlg)?,
            _ => return Err(JwtError::UnsupportedAlg),
        };
        // No extension is understood, so a critical one must be refused (RFC 7515 4.1.11).
        if header.contains_key("crit") {
            return Err(JwtError::Malformed);
        }
        let kid = match header.get("kid") {
            None => None,
            // An empty kid names no key, as in Envoy's jwt_authn.
            Some(Value::String(k)) if k.is_empty() => None,
            Some(Value::String(k)) => Some(k.as_str()),
            Some(_) => return Err(JwtError::Malformed),
        };
        let claims = decode_object(p64)?;
        let signature = URL_SAFE_NO_PAD.decode(s64).map_err(|_| JwtError::BadBase64)?;

        let issuer = claims.get("iss").and_then(Value::as_str).ok_or(JwtError::UnknownIssuer)?;
        let (index, provider) =
            self.providers.iter().enumerate().find(|(_, p)| p.issuer == issuer).ok_or(JwtError::UnknownIssuer)?;
        let fetched = keys_of(index).transpose()?;
        let keys = fetched.as_deref().unwrap_or(&provider.keys);

        let signed_len = h64.len() + 1 + p64.len();
        let signed = token.as_bytes().get(..signed_len).ok_or(JwtError::Malformed)?;
        check_signature(keys, alg, kid, signed, &signature)?;

        check_claims(provider, &claims, now_unix_secs)
    }
}

/// Checks the signature with the keys `alg` and `kid` select. As Istio (jwt_verify_lib):
/// a key is a candidate unless both it and the token name a kid and the two differ; of
/// those, only keys of the algorithm's type (`Jwk::accepts`) are tried. No candidate by
/// kid is `UnknownKid` (the remote set may be refetched for it).
fn check_signature(keys: &Jwks, alg: Alg, kid: Option<&str>, signed: &[u8], signature: &[u8]) -> Result<(), JwtError> {
    let mut by_kid = keys
        .keys
        .iter()
        .filter(|k| match (kid, k.kid.as_deref()) {
            (Some(want), Some(have)) => want == have,
            _ => true,
        })
        .peekable();
    if by_kid.peek().is_none() {
        return Err(JwtError::UnknownKid);
    }
    let mut candidates = by_kid.filter(|k| k.accepts(alg));
    let good = if alg.is_hmac() {
        // Every secret is tried, so timing does not reveal which one matched.
        candidates.fold(false, |ok, key| key.verify(alg, signed, signature) | ok)
    } else {
        // Public keys hide nothing: stop at the first that checks out.
        candidates.any(|key| key.verify(alg, signed, signature))
    };
    if good {
        Ok(())
    } else {
        Err(JwtError::BadSignature)
    }
}

fn decode_object(segment: &str) -> Result<Map<String, Value>, JwtError> {
    let bytes = URL_SAFE_NO_PAD.decode(segment).map_err(|_| JwtError::BadBase64)?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(JwtError::BadJson),
    }
}

fn numeric_claim(claims: &Map<String, Value>, name: &'static str) -> Result<Option<f64>, JwtError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or(JwtError::BadClaim(name)),
    }
}

fn check_claims(provider: &JwtProvider, claims: &Map<String, Value>, now: u64) -> Result<VerifiedToken, JwtError> {
    let exp = numeric_claim(claims, "exp")?;
    let nbf = numeric_claim(claims, "nbf")?;
    let skew = provider.clock_skew_seconds as f64;
    let now_f = now as f64;

    let expires_at = match exp {
        None if provider.require_exp => return Err(JwtError::MissingExp),
        None => None,
        Some(exp) => {
            let deadline = exp + skew;
            if now_f >= deadline {
                return Err(JwtError::Expired);
            }
            // Saturating float-to-int: a far-future exp becomes u64::MAX.
            Some(deadline.ceil() as u64)
        }
    };
    if let Some(nbf) = nbf {
        if nbf > now_f + skew {
            return Err(JwtError::NotYetValid);
        }
    }
    if !provider.audiences.is_empty() {
        let matches = |a: &str| provider.audiences.iter().any(|want| want == a);
        let ok = match claims.get("aud") {
            None => false,
            Some(Value::String(a)) => matches(a),
            Some(Value::Array(list)) => {
                let mut any = false;
                for a in list {
                    any |= matches(a.as_str().ok_or(JwtError::BadClaim("aud"))?);
                }
                any
            }
            Some(_) => return Err(JwtError::BadClaim("aud")),
        };
        if !ok {
            return Err(JwtError::WrongAudience);
        }
    }
    if !provider.authorized_parties.is_empty() {
        let allowed = match claims.get("azp") {
            Some(Value::String(azp)) => provider.authorized_parties.iter().any(|want| want == azp),
            _ => false,
        };
        if !allowed {
            return Err(JwtError::WrongAuthorizedParty);
        }
    }

    let user = match claims.get(&provider.user_claim) {
        Some(Value::String(u)) if !u.is_empty() => u,
        _ => return Err(JwtError::MissingUser),
    };
    // The user goes into a header and into usage events (one rule with the tracker).
    if tollgate_rules::check_user(user).is_err() {
        return Err(JwtError::BadClaim("user"));
    }
    let groups = read_groups(claims.get(&provider.groups_claim))?;

    Ok(VerifiedToken { identity: Identity { user: user.clone(), groups }, issuer: provider.issuer.clone(), expires_at })
}

/// An array of strings, or one string of names separated by spaces or commas
/// (the OAuth `scope` style). Empty names are dropped.
fn read_groups(value: Option<&Value>) -> Result<Vec<String>, JwtError> {
    const BAD: JwtError = JwtError::BadClaim("groups");
    let names: Vec<&str> = match value {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => s.split([' ', ',']).collect(),
        Some(Value::Array(list)) => list.iter().map(|v| v.as_str().ok_or(BAD)).collect::<Result<_, _>>()?,
        Some(_) => return Err(BAD),
    };
    let mut groups = Vec::with_capacity(names.len());
    for name in names.into_iter().filter(|n| !n.is_empty()) {
        if tollgate_rules::check_group(name).is_err() {
            return Err(BAD);
        }
        groups.push(name.to_string());
    }
    Ok(groups)
}

/// True when `value` has the JWT shape: three '.'-separated base64url segments whose
/// first decodes to a JSON object with an "alg" member. Padding is tolerated here so
/// a padded token is reported as a bad token rather than as an unknown API key.
pub fn looks_like_jwt(value: &str) -> bool {
    let mut parts = value.split('.');
    let (Some(header), Some(payload), Some(signature), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let b64url = |s: &str| s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'=');
    if header.is_empty() || !b64url(header) || !b64url(payload) || !b64url(signature) {
        return false;
    }
    // Nothing over the size limit is decoded: a token-shaped value that large is a
    // token, and `verify` refuses it as too large before reading any of it.
    if value.len() > MAX_TOKEN_BYTES {
        return true;
    }
    match URL_SAFE_LENIENT.decode(header).ok().and_then(|b| serde_json::from_slice::<Value>(&b).ok()) {
        Some(Value::Object(map)) => map.contains_key("alg"),
        _ => false,
    }
}

/// Bounded per-worker cache of verified tokens. Like `jwt_authn`'s cache it holds the
/// tokens themselves (at most `capacity` × `MAX_TOKEN_BYTES`): a hit costs a keyed
/// SipHash of the token and a constant-time comparison with the stored one, where a
/// SHA-256 key cost several times more on every request. The hash key is random per
/// worker, so clients cannot aim collisions at an entry; a collision only replaces or
/// misses, never matches a different token. Entries expire with the token
/// (`expires_at`, i.e. exp + skew) and at most `max_age_secs` after insertion. When
/// full, the entry that would expire soonest is evicted (expired ones first), in
/// O(log n): a second index is ordered by deadline.
#[derive(Debug)]
pub struct TokenCache {
    capacity: usize,
    max_age_secs: u64,
    hasher: RandomState,
    /// By the token's keyed hash.
    entries: HashMap<u64, CacheEntry>,
    /// (deadline, insertion sequence, hash).
    by_deadline: BTreeSet<(u64, u64, u64)>,
    next_seq: u64,
}

#[derive(Debug)]
struct CacheEntry {
    token: Box<str>,
    verified: VerifiedToken,
    deadline: u64,
    seq: u64,
}

impl TokenCache {
    pub fn new(capacity: usize, max_age_secs: u64) -> Self {
        Self {
            capacity,
            max_age_secs,
            hasher: RandomState::new(),
            entries: HashMap::new(),
            by_deadline: BTreeSet::new(),
            next_seq: 0,
        }
    }

    /// The cached identity of `token`, if it was verified before and has not expired.
    pub fn get(&mut self, token: &str, now_unix_secs: u64) -> Option<&Identity> {
        let slot = self.find(token, now_unix_secs)?;
        self.identity(slot)
    }

    /// Where `token` is cached, if it was verified before and has not expired since (an
    /// expired entry is dropped). Split from `identity` so a caller can hold the
    /// identity borrowed while using the cache mutably on the other path.
    pub fn find(&mut self, token: &str, now_unix_secs: u64) -> Option<u64> {
        let slot = self.hasher.hash_one(token);
        let entry = self.entries.get(&slot)?;
        if !crate::ct::eq(entry.token.as_bytes(), token.as_bytes()) {
            return None;
        }
        if now_unix_secs >= entry.deadline {
            self.remove(slot);
            return None;
        }
        Some(slot)
    }

    pub fn identity(&self, slot: u64) -> Option<&Identity> {
        self.entries.get(&slot).map(|e| &e.verified.identity)
    }

    pub fn insert(&mut self, token: &str, verified: &VerifiedToken, now_unix_secs: u64) {
        let deadline = now_unix_secs.saturating_add(self.max_age_secs).min(verified.expires_at.unwrap_or(u64::MAX));
        if self.capacity == 0 || deadline <= now_unix_secs {
            return;
        }
        let slot = self.hasher.hash_one(token);
        self.remove(slot);
        while self.entries.len() >= self.capacity {
            let Some(&(_, _, soonest)) = self.by_deadline.first() else {
                break;
            };
            self.remove(soonest);
        }
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        self.by_deadline.insert((deadline, seq, slot));
        self.entries.insert(slot, CacheEntry { token: token.into(), verified: verified.clone(), deadline, seq });
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn remove(&mut self, slot: u64) {
        if let Some(old) = self.entries.remove(&slot) {
            self.by_deadline.remove(&(old.deadline, old.seq, slot));
        }
    }
}

#[cfg(test)]
mod tests {
    // Under wasm-bindgen-test the same tests run compiled to wasm32 (see `make test-wasm`).
    use super::*;
    use hmac::Mac;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;
    use JwtError::*;

    type HmacSha256 = hmac::Hmac<sha2::Sha256>;

    const NOW: u64 = 1_700_000_000; // exp/nbf literals below are relative to this
    const SKEW: u64 = 60;
    const K1: &[u8] = b"test-secret-one-0123456789abcdef";
    const K2: &[u8] = b"test-secret-two-0123456789abcdef";
    const HS256_K1: &str = r#"{"alg":"HS256","typ":"JWT","kid":"k1"}"#;
    const CLAIMS: &str = r#"{"iss":"dev","sub":"a"}"#;

    type KidSecret<'a> = (Option<&'a str>, &'a [u8]);

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Signs `header.payload` with HMAC-SHA256, the way an issuer does.
    fn mint_raw(header: &str, payload: &str, secret: &[u8]) -> String {
        let signed = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
        let mut mac = HmacSha256::new_from_slice(secret).unwrap();
        mac.update(signed.as_bytes());
        format!("{signed}.{}", b64(&mac.finalize().into_bytes()))
    }

    /// A well-signed token with these claims.
    fn mint(payload: &str) -> String {
        mint_raw(HS256_K1, payload, K1)
    }

    /// A well-signed token for user "a" of "dev", plus `extra` claims (",\"k\":v").
    fn claims(extra: &str) -> String {
        mint(&format!(r#"{{"iss":"dev","sub":"a"{extra}}}"#))
    }

    /// The standard claims under another header and secret.
    fn signed(header: &str, secret: &[u8]) -> String {
        mint_raw(header, CLAIMS, secret)
    }

    fn jwks_json(keys: &[KidSecret]) -> String {
        let keys: Vec<Value> = keys
            .iter()
            .map(|(kid, secret)| {
                let mut jwk = serde_json::json!({"kty": "oct", "alg": "HS256", "k": b64(secret)});
                if let Some(kid) = kid {
                    jwk["kid"] = Value::from(*kid);
                }
                jwk
            })
            .collect();
        serde_json::json!({ "keys": keys }).to_string()
    }

    fn provider(issuer: &str, keys: &[KidSecret]) -> JwtProvider {
        JwtProvider {
            issuer: issuer.into(),
            audiences: vec![],
            authorized_parties: vec![],
            keys: Jwks::parse(&jwks_json(keys)).unwrap(),
            user_claim: "sub".into(),
            groups_claim: "groups".into(),
            clock_skew_seconds: SKEW,
            require_exp: false,
        }
    }

    fn dev() -> JwtProvider {
        provider("dev", &[(Some("k1"), K1), (Some("k2"), K2)])
    }

    fn verifier_with(f: impl FnOnce(&mut JwtProvider)) -> JwtVerifier {
        let mut p = dev();
        f(&mut p);
        JwtVerifier::new(vec![p])
    }

    fn identity(user: &str, groups: &[&str]) -> Identity {
        let groups = groups.iter().map(|g| g.to_string()).collect();
        Identity { user: user.into(), groups }
    }

    fn verified(issuer: &str, user: &str, expires_at: Option<u64>) -> VerifiedToken {
        let identity = identity(user, &[]);
        VerifiedToken { identity, issuer: issuer.into(), expires_at }
    }

    #[test]
    fn istio_hs256_dev_guide_token() {
        // The Istio guide's secret is used as its 64 ASCII characters, not as the 32
        // bytes they hex-decode to: only the ASCII bytes verify this token.
        let token = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCIsImtpZCI6ImRldi1rZXkifQ.eyJpc3MiOiJkZXYiLCJzdWIiOiJkZXYtdXNlciJ9.S6AKJ6CRs5nbrhHPshc2KnikNkjLp9isg6xlR4kSecQ";
        let secret = "f59f73eff3357c3754b9b60671f16ffcec9b1a301498fa18c928bb753d4b385a";
        let k = "ZjU5ZjczZWZmMzM1N2MzNzU0YjliNjA2NzFmMTZmZmNlYzliMWEzMDE0OThmYTE4YzkyOGJiNzUzZDRiMzg1YQ";
        assert_eq!(b64(secret.as_bytes()), k);
        let jwks = format!(r#"{{"keys":[{{"kty":"oct","kid":"dev-key","alg":"HS256","k":"{k}"}}]}}"#);
        let p = JwtProvider { keys: Jwks::parse(&jwks).unwrap(), ..dev() };
        let got = JwtVerifier::new(vec![p]).verify(token, NOW);
        assert_eq!(got, Ok(verified("dev", "dev-user", None)));

        let hex_jwks = jwks_json(&[(Some("dev-key"), &hex::decode(secret).unwrap())]);
        let p = JwtProvider { keys: Jwks::parse(&hex_jwks).unwrap(), ..dev() };
        assert_eq!(JwtVerifier::new(vec![p]).verify(token, NOW), Err(BadSignature));
    }

    #[test]
    fn rfc7515_appendix_a1() {
        let jwks = r#"{"keys":[{"kty":"oct","k":"AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow"}]}"#;
        let token = "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9.eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ.dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        let exp = 1_300_819_380;
        let joe = Ok(verified("joe", "joe", Some(exp + SKEW)));
        // (user_claim, now, result); the token has no "sub".
        #[rustfmt::skip]
        let cases: &[(&str, u64, Result<VerifiedToken, JwtError>)] = &[
            ("iss", 1_300_819_000, joe.clone()),
            ("iss", exp + SKEW - 1, joe.clone()),
            ("iss", exp + SKEW, Err(Expired)),
            ("iss", exp + SKEW + 1, Err(Expired)),
            ("sub", 1_300_819_000, Err(MissingUser)),
        ];
        for (user_claim, now, want) in cases {
            let p = JwtProvider {
                issuer: "joe".into(),
                keys: Jwks::parse(jwks).unwrap(),
                user_claim: user_claim.to_string(),
                ..dev()
            };
            let got = JwtVerifier::new(vec![p]).verify(token, *now);
            assert_eq!(got, *want, "user_claim {user_claim} at {now}");
        }
    }

    #[test]
    fn valid_tokens() {
        let v = JwtVerifier::new(vec![dev()]);
        // (name, token, user, groups joined with commas, expires_at)
        #[rustfmt::skip]
        let cases: &[(&str, String, &str, &str, Option<u64>)] = &[
            ("minimal", mint(CLAIMS), "a", "", None),
            ("groups array", claims(r#","groups":["free","premium"]"#), "a", "free,premium", None),
            ("groups string", claims(r#","groups":"a b,c, d""#), "a", "a,b,c,d", None),
            ("groups empty string", claims(r#","groups":"""#), "a", "", None),
            ("groups empty array", claims(r#","groups":[]"#), "a", "", None),
            ("groups null", claims(r#","groups":null"#), "a", "", None),
            ("exp ahead", claims(r#","exp":1700000100"#), "a", "", Some(NOW + 100 + SKEW)),
            ("exp float", claims(r#","exp":1700000100.5"#), "a", "", Some(NOW + 101 + SKEW)),
            ("exp inside skew", claims(r#","exp":1699999941"#), "a", "", Some(NOW + 1)),
            ("exp far future", claims(r#","exp":1e300"#), "a", "", Some(u64::MAX)),
            ("nbf at skew edge", claims(r#","nbf":1700000060"#), "a", "", None),
            ("nbf past float", claims(r#","nbf":1699999995.25"#), "a", "", None),
            ("iat and extras ignored", claims(r#","iat":"x","scope":5"#), "a", "", None),
            ("kid k2", signed(r#"{"alg":"HS256","kid":"k2"}"#, K2), "a", "", None),
            ("no kid tries every key", signed(r#"{"alg":"HS256"}"#, K2), "a", "", None),
            ("typ ignored", signed(r#"{"alg":"HS256","typ":"at+jwt"}"#, K1), "a", "", None),
            ("unicode user", mint(r#"{"iss":"dev","sub":"müller"}"#), "müller", "", None),
        ];
        for (name, token, user, groups, expires_at) in cases {
            let groups: Vec<&str> = groups.split(',').filter(|g| !g.is_empty()).collect();
            let identity = identity(user, &groups);
            let want = VerifiedToken { identity, issuer: "dev".into(), expires_at: *expires_at };
            assert_eq!(v.verify(token, NOW), Ok(want), "{name}");
        }
    }

    #[test]
    fn invalid_tokens() {
        let v = JwtVerifier::new(vec![dev()]);
        let good = mint(CLAIMS);
        let parts: Vec<String> = good.split('.').map(str::to_string).collect();
        let (h, p, s) = (&parts[0], &parts[1], &parts[2]);
        let alg = |alg: &str| signed(&format!(r#"{{"alg":{alg},"kid":"k1"}}"#), K1);
        let flipped = format!("{}{}", if s.starts_with('A') { "B" } else { "A" }, &s[1..]);
        let other_payload = b64(br#"{"iss":"dev","sub":"admin"}"#);
        let filler = "x".repeat(MAX_TOKEN_BYTES);
        assert_eq!((h.len(), s.len()), (51, 43)); // so one '=' is the canonical padding

        #[rustfmt::skip]
        let cases: Vec<(&str, String, JwtError)> = vec![
            ("too large", "a".repeat(MAX_TOKEN_BYTES + 1), TooLarge),
            ("too large but signed", claims(&format!(r#","pad":"{filler}""#)), TooLarge),
            ("empty", String::new(), Malformed),
            ("one segment", h.clone(), Malformed),
            ("two segments", format!("{h}.{p}"), Malformed),
            ("four segments", format!("{good}.{s}"), Malformed),
            ("empty segments", "..".into(), Malformed),
            ("empty header", format!(".{p}.{s}"), Malformed),
            ("empty payload", format!("{h}..{s}"), Malformed),
            ("empty signature", format!("{h}.{p}."), Malformed),
            ("alg none unsigned", format!("{}.{p}.", b64(br#"{"alg":"none"}"#)), Malformed),
            ("alg none", alg(r#""none""#), UnsupportedAlg),
            ("alg None", alg(r#""None""#), UnsupportedAlg),
            ("alg hs256", alg(r#""hs256""#), UnsupportedAlg),
            // The kid names an oct key, which never serves a public-key algorithm.
            ("alg RS256", alg(r#""RS256""#), BadSignature),
            ("alg EdDSA", alg(r#""EdDSA""#), BadSignature),
            ("alg ES512", alg(r#""ES512""#), UnsupportedAlg),
            ("alg HS384", alg(r#""HS384""#), UnsupportedAlg),
            ("alg HS512", alg(r#""HS512""#), UnsupportedAlg),
            ("alg number", alg("256"), UnsupportedAlg),
            ("alg null", alg("null"), UnsupportedAlg),
            ("alg missing", signed(r#"{"kid":"k1"}"#, K1), UnsupportedAlg),
            ("crit", signed(r#"{"alg":"HS256","crit":["b64"],"b64":false}"#, K1), Malformed),
            ("kid not string", signed(r#"{"alg":"HS256","kid":1}"#, K1), Malformed),
            ("bad base64 header", format!("*{h}.{p}.{s}"), BadBase64),
            ("standard alphabet payload", format!("{h}.{p}+.{s}"), BadBase64),
            ("standard alphabet signature", format!("{h}.{p}.{}/", &s[..42]), BadBase64),
            ("padded header", format!("{h}=.{p}.{s}"), BadBase64),
            ("padded signature", format!("{h}.{p}.{s}="), BadBase64),
            ("header not json", format!("{}.{p}.{s}", b64(b"{alg:HS256}")), BadJson),
            ("header not object", format!("{}.{p}.{s}", b64(br#"["HS256"]"#)), BadJson),
            ("payload not json", mint("iss=dev"), BadJson),
            ("payload not object", mint(r#""dev""#), BadJson),
            ("wrong key", signed(HS256_K1, b"not-the-secret"), BadSignature),
            ("kid names the other key", signed(r#"{"alg":"HS256","kid":"k2"}"#, K1), BadSignature),
            ("unknown kid", signed(r#"{"alg":"HS256","kid":"k9"}"#, K1), UnknownKid),
            ("tampered payload", format!("{h}.{other_payload}.{s}"), BadSignature),
            ("tampered signature", format!("{h}.{p}.{flipped}"), BadSignature),
            ("short signature", format!("{h}.{p}.{}", b64(&[0u8; 16])), BadSignature),
            ("expired and forged", mint_raw(HS256_K1, r#"{"iss":"dev","exp":1}"#, b"x"), BadSignature),
            ("wrong iss", mint(r#"{"iss":"other","sub":"a"}"#), UnknownIssuer),
            ("no iss", mint(r#"{"sub":"a"}"#), UnknownIssuer),
            ("iss not string", mint(r#"{"iss":["dev"],"sub":"a"}"#), UnknownIssuer),
            ("expired at skew edge", claims(r#","exp":1699999940"#), Expired),
            ("expired long ago", claims(r#","exp":1"#), Expired),
            ("exp negative", claims(r#","exp":-1"#), Expired),
            ("nbf past skew", claims(r#","nbf":1700000061"#), NotYetValid),
            ("nbf float past skew", claims(r#","nbf":1700000060.5"#), NotYetValid),
            ("exp string", claims(r#","exp":"1700000100""#), BadClaim("exp")),
            ("exp bool", claims(r#","exp":true"#), BadClaim("exp")),
            ("exp null", claims(r#","exp":null"#), BadClaim("exp")),
            ("nbf string", claims(r#","nbf":"0""#), BadClaim("nbf")),
            ("no sub", mint(r#"{"iss":"dev"}"#), MissingUser),
            ("empty sub", mint(r#"{"iss":"dev","sub":""}"#), MissingUser),
            ("sub number", mint(r#"{"iss":"dev","sub":42}"#), MissingUser),
            ("sub with comma", mint(r#"{"iss":"dev","sub":"a,b"}"#), BadClaim("user")),
            ("sub with newline", mint(r#"{"iss":"dev","sub":"a\r\nx-evil: 1"}"#), BadClaim("user")),
            // The tracker would refuse a blank user: never admitted.
            ("blank sub", mint(r#"{"iss":"dev","sub":"   "}"#), BadClaim("user")),
            ("groups number", claims(r#","groups":5"#), BadClaim("groups")),
            ("groups object", claims(r#","groups":{"a":1}"#), BadClaim("groups")),
            ("groups array of numbers", claims(r#","groups":["a",1]"#), BadClaim("groups")),
            ("group with comma", claims(r#","groups":["a,b"]"#), BadClaim("groups")),
            ("group with space", claims(r#","groups":["a b"]"#), BadClaim("groups")),
            ("group with control", claims(r#","groups":"a\u0000b""#), BadClaim("groups")),
        ];
        for (name, token, want) in cases {
            assert_eq!(v.verify(&token, NOW), Err(want), "{name}");
        }
        assert_eq!(JwtVerifier::new(vec![]).verify(&good, NOW), Err(UnknownIssuer));
        assert!(JwtVerifier::new(vec![]).is_empty());
        assert!(!v.is_empty());
    }

    #[test]
    fn audiences_authorized_parties_and_require_exp() {
        let aud = verifier_with(|p| p.audiences = vec!["llm".into(), "chat".into()]);
        let strict = verifier_with(|p| p.require_exp = true);
        let azp = verifier_with(|p| p.authorized_parties = vec!["web".into(), "cli".into()]);
        #[rustfmt::skip]
        let cases: Vec<(&str, &JwtVerifier, String, Result<(), JwtError>)> = vec![
            ("aud string", &aud, claims(r#","aud":"llm""#), Ok(())),
            ("aud array", &aud, claims(r#","aud":["other","chat"]"#), Ok(())),
            ("aud string mismatch", &aud, claims(r#","aud":"other""#), Err(WrongAudience)),
            ("aud array mismatch", &aud, claims(r#","aud":["other","LLM"]"#), Err(WrongAudience)),
            ("aud empty array", &aud, claims(r#","aud":[]"#), Err(WrongAudience)),
            ("aud missing", &aud, claims(""), Err(WrongAudience)),
            ("aud number", &aud, claims(r#","aud":7"#), Err(BadClaim("aud"))),
            ("aud array with number", &aud, claims(r#","aud":["llm",7]"#), Err(BadClaim("aud"))),
            ("aud not checked without audiences", &strict, claims(r#","aud":"x","exp":1700000010"#), Ok(())),
            ("azp allowed", &azp, claims(r#","azp":"web""#), Ok(())),
            ("azp not allowed", &azp, claims(r#","azp":"other""#), Err(WrongAuthorizedParty)),
            ("azp missing", &azp, claims(""), Err(WrongAuthorizedParty)),
            ("azp not a string", &azp, claims(r#","azp":["web"]"#), Err(WrongAuthorizedParty)),
            ("azp not checked without authorized_parties", &aud, claims(r#","aud":"llm","azp":"x""#), Ok(())),
            ("require_exp without exp", &strict, claims(""), Err(MissingExp)),
            ("require_exp with exp", &strict, claims(r#","exp":1700000010"#), Ok(())),
            ("require_exp expired", &strict, claims(r#","exp":5"#), Err(Expired)),
        ];
        for (name, verifier, token, want) in cases {
            assert_eq!(verifier.verify(&token, NOW).map(|_| ()), want, "{name}");
        }
    }

    #[test]
    fn issuer_selects_provider_and_key() {
        let other = provider("other", &[(None, b"other-secret")]);
        let v = JwtVerifier::new(vec![dev(), other]);
        let other_claims = r#"{"iss":"other","sub":"a"}"#;
        #[rustfmt::skip]
        let cases: &[(&str, String, Result<(), JwtError>)] = &[
            ("other with its key", mint_raw(HS256_K1, other_claims, b"other-secret"), Ok(())),
            ("other with dev's key", mint_raw(HS256_K1, other_claims, K1), Err(BadSignature)),
            ("dev with other's key", signed(r#"{"alg":"HS256"}"#, b"other-secret"), Err(BadSignature)),
        ];
        for (name, token, want) in cases {
            assert_eq!(v.verify(token, NOW).map(|_| ()), *want, "{name}");
        }

        // Like Istio, a JWKS key without kid is a candidate for any token kid.
        let mixed = provider("dev", &[(Some("k1"), K1), (None, K2)]);
        let v = JwtVerifier::new(vec![mixed]);
        #[rustfmt::skip]
        let cases: &[(&str, String, Result<(), JwtError>)] = &[
            ("kid k1", signed(HS256_K1, K1), Ok(())),
            ("kid k9 matches the kid-less key", signed(r#"{"alg":"HS256","kid":"k9"}"#, K2), Ok(())),
            ("kid k1 also tries the kid-less key", signed(HS256_K1, K2), Ok(())),
            ("empty kid is no kid", signed(r#"{"alg":"HS256","kid":""}"#, K1), Ok(())),
            ("kid k9 with k1's secret", signed(r#"{"alg":"HS256","kid":"k9"}"#, K1), Err(BadSignature)),
        ];
        for (name, token, want) in cases {
            assert_eq!(v.verify(token, NOW).map(|_| ()), *want, "{name}");
        }
    }

    /// Providers holding the RFC keys: RSA (A.2), EC P-256 (A.3), Ed25519 (RFC 8037),
    /// and one HS256 secret; the RFC tokens' issuer "joe" is also their user.
    fn rfc_verifier(jwks: &str) -> JwtVerifier {
        JwtVerifier::new(vec![JwtProvider {
            issuer: "joe".into(),
            user_claim: "iss".into(),
            keys: Jwks::parse(jwks).unwrap_or_else(|e| panic!("{jwks}: {e}")),
            ..provider("x", &[(None, K1)])
        }])
    }

    #[test]
    fn public_key_algorithms_and_confusion() {
        use crate::jwk::tests::*;
        const RFC_NOW: u64 = 1_300_819_000; // before the RFC tokens' exp
        let public = format!(r#"{{"keys":[{},{},{}]}}"#, a2_jwk(), a3_jwk(), ed_jwk());
        let with_oct = format!(r#"{{"keys":[{},{{"kty":"oct","k":"{}"}}]}}"#, a2_jwk(), b64(K1));
        let kids = format!(
            r#"{{"keys":[{{"kty":"RSA","kid":"r1","alg":"RS256","n":"{A2_N}","e":"AQAB"}},{{"kty":"EC","kid":"e1","crv":"P-256","x":"{A3_X}","y":"{A3_Y}"}}]}}"#
        );
        let (v_public, v_oct, v_kids) = (rfc_verifier(&public), rfc_verifier(&with_oct), rfc_verifier(&kids));

        let rfc_claims = A2_TOKEN.split('.').nth(1).unwrap();
        let a2_sig = A2_TOKEN.rsplit('.').next().unwrap();
        let a3_sig = A3_TOKEN.rsplit('.').next().unwrap();
        let n_bytes = URL_SAFE_NO_PAD.decode(A2_N).unwrap();
        let payload = r#"{"iss":"joe","sub":"a"}"#;
        // The signature under another header (so another signing input: every swap fails;
        // `jwk::tests` checks each key against every algorithm on the same input).
        let swap = |header: &str, sig: &str| format!("{}.{rfc_claims}.{sig}", b64(header.as_bytes()));
        #[rustfmt::skip]
        let cases: Vec<(&str, &JwtVerifier, String, Result<(), JwtError>)> = vec![
            ("A.2 RS256", &v_public, A2_TOKEN.into(), Ok(())),
            ("A.3 ES256", &v_public, A3_TOKEN.into(), Ok(())),
            ("A.2 beside an oct key", &v_oct, A2_TOKEN.into(), Ok(())),
            ("A.2 kid-less against named keys", &v_kids, A2_TOKEN.into(), Ok(())),
            ("A.3 kid-less against named keys", &v_kids, A3_TOKEN.into(), Ok(())),
            // RFC 8037's payload is not a claims object: the signature is right, the token is not.
            ("RFC 8037 Ed25519", &v_public, ED_TOKEN.into(), Err(BadJson)),
            ("A.4 ES512", &v_public, A4_TOKEN.into(), Err(UnsupportedAlg)),
            ("A.2 as PS256", &v_public, swap(r#"{"alg":"PS256"}"#, a2_sig), Err(BadSignature)),
            ("A.2 as RS512", &v_public, swap(r#"{"alg":"RS512"}"#, a2_sig), Err(BadSignature)),
            ("A.2 as ES256", &v_public, swap(r#"{"alg":"ES256"}"#, a2_sig), Err(BadSignature)),
            ("A.3 as RS256", &v_public, swap(r#"{"alg":"RS256"}"#, a3_sig), Err(BadSignature)),
            ("A.3 as ES384", &v_public, swap(r#"{"alg":"ES384"}"#, a3_sig), Err(BadSignature)),
            ("A.3 as EdDSA", &v_public, swap(r#"{"alg":"EdDSA"}"#, a3_sig), Err(BadSignature)),
            ("A.2 as none", &v_public, swap(r#"{"alg":"none"}"#, a2_sig), Err(UnsupportedAlg)),
            ("A.2 unsigned none", &v_public, format!("{}.{rfc_claims}.", b64(br#"{"alg":"none"}"#)), Err(Malformed)),
            ("A.2 kid of the EC key", &v_kids, swap(r#"{"alg":"RS256","kid":"e1"}"#, a2_sig), Err(BadSignature)),
            ("A.2 unknown kid", &v_kids, swap(r#"{"alg":"RS256","kid":"r9"}"#, a2_sig), Err(UnknownKid)),
            ("A.2 as PS256 by RS256-only kid", &v_kids, swap(r#"{"alg":"PS256","kid":"r1"}"#, a2_sig), Err(BadSignature)),
            // HS256 signed with what an attacker can read: the public key's bytes or JSON.
            ("HS256 with n as secret", &v_public, mint_raw(r#"{"alg":"HS256"}"#, payload, &n_bytes), Err(BadSignature)),
            ("HS256 with n as secret, oct beside", &v_oct, mint_raw(r#"{"alg":"HS256"}"#, payload, &n_bytes), Err(BadSignature)),
            ("HS256 with the JWK as secret", &v_public, mint_raw(r#"{"alg":"HS256"}"#, payload, a2_jwk().as_bytes()), Err(BadSignature)),
            ("HS256 with x as secret", &v_public, mint_raw(r#"{"alg":"HS256"}"#, payload, A3_X.as_bytes()), Err(BadSignature)),
            ("HS256 by the RSA kid", &v_kids, mint_raw(r#"{"alg":"HS256","kid":"r1"}"#, payload, &n_bytes), Err(BadSignature)),
            ("HS256 with the oct secret", &v_oct, mint_raw(r#"{"alg":"HS256"}"#, payload, K1), Ok(())),
        ];
        for (name, v, token, want) in cases {
            assert_eq!(v.verify(&token, RFC_NOW).map(|_| ()), want, "{name}");
        }
        assert_eq!(v_public.verify(A2_TOKEN, 1_300_819_380 + SKEW), Err(Expired));

        // A provider whose keys come from elsewhere (remote_jwks) uses them.
        let keys = Rc::new(Jwks::parse(&public).unwrap());
        let remote = rfc_verifier(&format!(r#"{{"keys":[{{"kty":"oct","k":"{}"}}]}}"#, b64(K2)));
        assert_eq!(remote.verify(A2_TOKEN, RFC_NOW).map(|_| ()), Err(BadSignature));
        assert_eq!(remote.verify_with(A2_TOKEN, RFC_NOW, |_| Some(Ok(keys.clone()))).map(|_| ()), Ok(()));
        assert_eq!(remote.provider_of(A2_TOKEN), Some(0));
        assert_eq!(remote.provider_of(&mint(CLAIMS)), None);
        assert_eq!(remote.provider_of("x.y.z"), None);
        assert_eq!(remote.verify_with(A2_TOKEN, RFC_NOW, |_| Some(Err(KeysUnavailable))), Err(KeysUnavailable));
    }

    #[test]
    fn jwks_parse() {
        #[rustfmt::skip]
        let ok: &[(&str, &[KidSecret])] = &[
            (r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#, &[(None, b"secret")]),
            (r#"{"keys":[{"kty":"oct","k":"c2VjcmV0MQ=="}]}"#, &[(None, b"secret1")]), // padding tolerated
            (r#"{"keys":[{"kty":"oct","k":"c2VjcmV0MQ"}]}"#, &[(None, b"secret1")]),
            (r#"{"keys":[{"kty":"oct","k":"_-8"}]}"#, &[(None, &[0xff, 0xef])]),
            (r#"{"keys":[{"kty":"oct","kid":"a","k":"YQ"},{"kty":"oct","kid":"b","k":"Yg"}]}"#, &[(Some("a"), b"a"), (Some("b"), b"b")]),
            (
                r#"{"keys":[{"kty":"RSA","n":"x","e":"AQAB"},{"kty":"oct","kid":"a","alg":"HS256","use":"sig","k":"c2VjcmV0"},{"kty":"EC"}]}"#,
                &[(Some("a"), b"secret")],
            ),
        ];
        for (json, want) in ok {
            let jwks = Jwks::parse(json).unwrap_or_else(|e| panic!("{json}: {e}"));
            let got: Vec<KidSecret> =
                jwks.keys.iter().map(|k| (k.kid.as_deref(), k.secret().unwrap_or_default())).collect();
            assert_eq!(got, want.to_vec(), "{json}");
        }

        #[rustfmt::skip]
        let bad: &[(&str, &str)] = &[
            ("", "not valid JSON"),
            (r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}"#, "not valid JSON"),
            ("[]", "must be an object"),
            (r#"{"keys":{}}"#, "must be an object"),
            (r#"{"keys":[]}"#, "no usable key"),
            (r#"{"keys":[{"kty":"RSA","n":"x","e":"AQAB"}]}"#, "no usable key"),
            (r#"{"keys":["c2VjcmV0"]}"#, "keys[0]: must be an object"),
            (r#"{"keys":[{"k":"c2VjcmV0"}]}"#, "keys[0].kty: missing"),
            (r#"{"keys":[{"kty":"oct"}]}"#, "keys[0].k: missing"),
            (r#"{"keys":[{"kty":"oct","k":12}]}"#, "keys[0].k: missing"),
            (r#"{"keys":[{"kty":"oct","k":""}]}"#, "keys[0].k: empty secret"),
            (r#"{"keys":[{"kty":"oct","k":"c2Vj+mV0"}]}"#, "keys[0].k: not valid base64url"),
            (r#"{"keys":[{"kty":"oct","k":"c2Vj*mV0"}]}"#, "keys[0].k: not valid base64url"),
            (r#"{"keys":[{"kty":"RSA"},{"kty":"oct","alg":"HS512","k":"c2VjcmV0"}]}"#, "keys[1].alg: only HS256"),
            (r#"{"keys":[{"kty":"oct","kid":7,"k":"c2VjcmV0"}]}"#, "keys[0].kid: must be a string"),
        ];
        for (json, want) in bad {
            let err = Jwks::parse(json).unwrap_err();
            assert!(err.starts_with(want), "{json}: got {err:?}, want prefix {want:?}");
            assert!(!err.contains("c2Vj"), "{json}: error shows the secret: {err}");
        }
    }

    #[test]
    fn secrets_stay_out_of_debug_and_errors() {
        let shown = format!("{:?}", JwtVerifier::new(vec![dev()]));
        assert!(shown.contains("k1"), "{shown}");
        for secret in [K1, K2] {
            assert!(!shown.contains(std::str::from_utf8(secret).unwrap()), "{shown}");
            assert!(!shown.contains(&b64(secret)), "{shown}");
            assert!(!shown.contains(&format!("{:?}", &secret[..4])), "{shown}");
        }
        #[rustfmt::skip]
        let errors = [
            TooLarge, Malformed, BadBase64, BadJson, UnsupportedAlg, UnknownIssuer, UnknownKid,
            BadSignature, Expired, NotYetValid, WrongAudience, WrongAuthorizedParty, MissingExp, BadClaim("exp"),
            BadClaim("other"), MissingUser, KeysUnavailable,
        ];
        for e in errors {
            assert!(e.message().starts_with("token "), "{e:?}");
            assert_eq!(e.to_string(), e.message());
        }
        assert_eq!(Expired.message(), "token expired");
    }

    #[test]
    fn jwt_shape() {
        let good = mint(CLAIMS);
        let padded = format!("{}=.e30.sig", b64(br#"{"alg":"HS256","kid":"k1"}"#)); // 35 chars + 1 pad
                                                                                    // Over the size limit nothing is decoded: the shape alone makes it a token, refused as too large.
        let huge = format!("{}.e30.sig", "A".repeat(MAX_TOKEN_BYTES));
        assert_eq!(JwtVerifier::default().verify(&huge, NOW), Err(JwtError::TooLarge));
        #[rustfmt::skip]
        let cases: &[(&str, bool)] = &[
            (&good, true),
            (&huge, true),
            (&padded, true), // refused later with BadBase64, not taken for an API key
            ("eyJhbGciOiJub25lIn0..", true),
            ("e30.e30.sig", false),
            ("sk-proj-abc", false),
            ("a.b.c", false),
        ];
        for (value, want) in cases {
            assert_eq!(looks_like_jwt(value), *want, "{value}");
        }
    }

    #[test]
    fn cache_hits_and_expiry() {
        // (token expires_at, looked up at, hit?); inserted at NOW, max_age 300.
        #[rustfmt::skip]
        let cases: &[(Option<u64>, u64, bool)] = &[
            (None, NOW, true),
            (None, NOW + 299, true),
            (None, NOW + 300, false),             // max_age
            (Some(NOW + 10), NOW + 9, true),
            (Some(NOW + 10), NOW + 10, false),    // token expiry (exp + skew)
            (Some(NOW + 1000), NOW + 300, false), // max_age before exp
            (Some(NOW), NOW, false),              // already expired: not stored
        ];
        for (i, (expires_at, lookup, hit)) in cases.iter().enumerate() {
            let mut cache = TokenCache::new(10, 300);
            let v = verified("dev", "a", *expires_at);
            cache.insert("tok", &v, NOW);
            assert_eq!(cache.get("other", NOW), None, "case {i}");
            assert_eq!(cache.get("tok", *lookup), hit.then_some(&v.identity), "case {i}");
            assert_eq!(cache.len(), usize::from(*hit), "case {i}: expired entries are dropped");
        }
    }

    #[test]
    fn cache_is_bounded() {
        let mut cache = TokenCache::new(3, 300);
        assert!(cache.is_empty());
        cache.insert("t-late", &verified("dev", "late", Some(NOW + 200)), NOW);
        cache.insert("t-soon", &verified("dev", "soon", Some(NOW + 50)), NOW);
        cache.insert("t-none", &verified("dev", "none", None), NOW);
        assert_eq!(cache.len(), 3);
        // Full: the soonest-expiring entry goes.
        cache.insert("t-new", &verified("dev", "new", Some(NOW + 100)), NOW);
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.get("t-soon", NOW), None);
        for t in ["t-late", "t-none", "t-new"] {
            assert!(cache.get(t, NOW).is_some(), "{t}");
        }
        // Re-inserting a cached token replaces it instead of evicting another.
        cache.insert("t-new", &verified("dev", "new2", Some(NOW + 100)), NOW + 1);
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.get("t-new", NOW + 1).unwrap().user, "new2");
        // Many inserts never exceed the bound, and the newest survive.
        for i in 0..100 {
            cache.insert(&format!("t{i}"), &verified("dev", "x", None), NOW + i);
            assert!(cache.len() <= 3);
        }
        assert!(cache.get("t99", NOW + 99).is_some());

        let mut off = TokenCache::new(0, 300);
        off.insert("t", &verified("dev", "a", None), NOW);
        assert_eq!((off.len(), off.get("t", NOW)), (0, None));
    }
}
