//! HS256 JWT verification, taking the same JWKS an Istio `RequestAuthentication` takes.
//!
//! Only HS256 is supported: it needs nothing but a shared secret, which is what the
//! Istio HS256 dev guide sets up, and it keeps asymmetric crypto out of the wasm module.
//! Everything the token says is distrusted until its MAC checks out: the header is
//! only read to refuse anything but HS256 (the `alg: none` and algorithm-confusion
//! attacks) and to pick a key, and the payload only to pick the issuer. Claims are
//! checked after the MAC. Errors carry a short fixed text for the 401 body and never
//! any part of the token.
//!
//! Verified tokens are cached per worker so a client reusing its token pays for one
//! HMAC, not one per request; entries never outlive the token.

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, URL_SAFE_NO_PAD};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::identity::Identity;

/// Larger tokens are refused before any decoding.
pub const MAX_TOKEN_BYTES: usize = 8192;

/// Base64url that accepts trailing padding, for JWKS `k` values and shape detection.
const URL_SAFE_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

type HmacSha256 = Hmac<Sha256>;

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
    MissingExp,
    /// A claim (named) has the wrong type or a value that cannot be used.
    BadClaim(&'static str),
    MissingUser,
}

impl JwtError {
    /// Short text for the 401 body.
    pub fn message(&self) -> &'static str {
        match self {
            JwtError::TooLarge => "token too large",
            JwtError::Malformed => "token malformed",
            JwtError::BadBase64 => "token is not valid base64url",
            JwtError::BadJson => "token header or payload is not a JSON object",
            JwtError::UnsupportedAlg => "token algorithm not allowed (only HS256)",
            JwtError::UnknownIssuer => "token issuer not trusted",
            JwtError::UnknownKid => "token key id unknown",
            JwtError::BadSignature => "token signature invalid",
            JwtError::Expired => "token expired",
            JwtError::NotYetValid => "token not yet valid",
            JwtError::WrongAudience => "token audience not allowed",
            JwtError::MissingExp => "token has no expiry",
            JwtError::BadClaim("exp") => "token exp claim invalid",
            JwtError::BadClaim("nbf") => "token nbf claim invalid",
            JwtError::BadClaim("aud") => "token aud claim invalid",
            JwtError::BadClaim("groups") => "token groups claim invalid",
            JwtError::BadClaim("user") => "token user claim invalid",
            JwtError::BadClaim(_) => "token claim invalid",
            JwtError::MissingUser => "token has no user claim",
        }
    }
}

impl fmt::Display for JwtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for JwtError {}

/// One HS256 secret from a JWKS.
#[derive(Clone)]
pub struct HmacKey {
    pub kid: Option<String>,
    secret: Vec<u8>,
}

impl HmacKey {
    pub fn new(kid: Option<String>, secret: Vec<u8>) -> Self {
        Self { kid, secret }
    }

    fn mac_matches(&self, signed: &[u8], signature: &[u8]) -> bool {
        match HmacSha256::new_from_slice(&self.secret) {
            Ok(mut mac) => {
                mac.update(signed);
                mac.verify_slice(signature).is_ok() // constant time
            }
            Err(_) => false,
        }
    }
}

impl fmt::Debug for HmacKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HmacKey").field("kid", &self.kid).field("secret_bytes", &self.secret.len()).finish()
    }
}

/// The usable (`oct`) keys of a JWKS.
#[derive(Clone, Debug)]
pub struct Jwks {
    pub keys: Vec<HmacKey>,
}

impl Jwks {
    /// Parses `{"keys":[...]}`. `oct` keys are taken; RSA/EC keys are skipped (so a
    /// mixed JWKS can be shared with Istio) but at least one `oct` key must remain.
    pub fn parse(json: &str) -> Result<Jwks, String> {
        // Parsed as untyped JSON: typed serde errors quote values, which could be a secret.
        let doc: Value = serde_json::from_str(json).map_err(|e| format!("not valid JSON: {e}"))?;
        let list = doc
            .as_object()
            .and_then(|o| o.get("keys"))
            .and_then(Value::as_array)
            .ok_or("must be an object with a \"keys\" array")?;
        let mut keys = Vec::new();
        for (i, jwk) in list.iter().enumerate() {
            let jwk = jwk.as_object().ok_or_else(|| format!("keys[{i}]: must be an object"))?;
            let kty = jwk.get("kty").and_then(Value::as_str).ok_or_else(|| format!("keys[{i}].kty: missing"))?;
            if kty != "oct" {
                continue;
            }
            match jwk.get("alg") {
                None => {}
                Some(Value::String(a)) if a == "HS256" => {}
                Some(_) => return Err(format!("keys[{i}].alg: only HS256 is supported")),
            }
            let kid = match jwk.get("kid") {
                None => None,
                Some(Value::String(k)) => Some(k.clone()),
                Some(_) => return Err(format!("keys[{i}].kid: must be a string")),
            };
            let k = jwk.get("k").and_then(Value::as_str).ok_or_else(|| format!("keys[{i}].k: missing"))?;
            let secret = URL_SAFE_LENIENT.decode(k).map_err(|_| format!("keys[{i}].k: not valid base64url"))?;
            if secret.is_empty() {
                return Err(format!("keys[{i}].k: empty secret"));
            }
            keys.push(HmacKey { kid, secret });
        }
        if keys.is_empty() {
            return Err("no usable key (need kty \"oct\" with alg HS256 or no alg)".to_string());
        }
        Ok(Jwks { keys })
    }
}

/// A trusted issuer and how to read its tokens.
#[derive(Clone, Debug)]
pub struct JwtProvider {
    pub issuer: String,
    /// Empty: `aud` is not checked.
    pub audiences: Vec<String>,
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

    pub fn verify(&self, token: &str, now_unix_secs: u64) -> Result<VerifiedToken, JwtError> {
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
        match header.get("alg") {
            Some(Value::String(alg)) if alg == "HS256" => {}
            _ => return Err(JwtError::UnsupportedAlg),
        }
        // No extension is understood, so a critical one must be refused (RFC 7515 4.1.11).
        if header.contains_key("crit") {
            return Err(JwtError::Malformed);
        }
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(k)) => Some(k.as_str()),
            Some(_) => return Err(JwtError::Malformed),
        };
        let claims = decode_object(p64)?;
        let signature = URL_SAFE_NO_PAD.decode(s64).map_err(|_| JwtError::BadBase64)?;

        let issuer = claims.get("iss").and_then(Value::as_str).ok_or(JwtError::UnknownIssuer)?;
        let provider = self.providers.iter().find(|p| p.issuer == issuer).ok_or(JwtError::UnknownIssuer)?;

        // As Istio (jwt_verify_lib): a key is a candidate unless both it and the token
        // name a kid and the two differ.
        let mut candidates = provider
            .keys
            .keys
            .iter()
            .filter(|k| match (kid, k.kid.as_deref()) {
                (Some(want), Some(have)) => want == have,
                _ => true,
            })
            .peekable();
        if candidates.peek().is_none() {
            return Err(JwtError::UnknownKid);
        }
        let signed_len = h64.len() + 1 + p64.len();
        let signed = token.as_bytes().get(..signed_len).ok_or(JwtError::Malformed)?;
        // Every candidate is tried, so timing does not reveal which key matched.
        let good = candidates.fold(false, |ok, key| key.mac_matches(signed, &signature) | ok);
        if !good {
            return Err(JwtError::BadSignature);
        }

        check_claims(provider, &claims, now_unix_secs)
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

    let user = match claims.get(&provider.user_claim) {
        Some(Value::String(u)) if !u.is_empty() => u,
        _ => return Err(JwtError::MissingUser),
    };
    // The user goes into a header and into comma-separated usage fields.
    if user.contains(',') || user.chars().any(char::is_control) {
        return Err(JwtError::BadClaim("user"));
    }
    let groups = read_groups(claims.get(&provider.groups_claim))?;

    Ok(VerifiedToken {
        identity: Identity { user: user.clone(), groups },
        issuer: provider.issuer.clone(),
        expires_at,
    })
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
        if name.contains(',') || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
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
    match URL_SAFE_LENIENT.decode(header).ok().and_then(|b| serde_json::from_slice::<Value>(&b).ok()) {
        Some(Value::Object(map)) => map.contains_key("alg"),
        _ => false,
    }
}

/// Bounded per-worker cache of verified tokens, keyed by SHA-256 of the token, entries expire with the token (exp + skew) and at most `max_age_secs` after insertion.
///
/// When full, the entry that would expire soonest is evicted (expired ones first), in
/// O(log n): a second index is ordered by deadline.
#[derive(Debug)]
pub struct TokenCache {
    capacity: usize,
    max_age_secs: u64,
    entries: HashMap<[u8; 32], CacheEntry>,
    by_deadline: BTreeSet<(u64, u64, [u8; 32])>,
    next_seq: u64,
}

#[derive(Debug)]
struct CacheEntry {
    verified: VerifiedToken,
    deadline: u64,
    seq: u64,
}

impl TokenCache {
    pub fn new(capacity: usize, max_age_secs: u64) -> Self {
        Self {
            capacity,
            max_age_secs,
            entries: HashMap::with_capacity(capacity.min(4096)),
            by_deadline: BTreeSet::new(),
            next_seq: 0,
        }
    }

    pub fn get(&mut self, token: &str, now_unix_secs: u64) -> Option<VerifiedToken> {
        let key = digest(token);
        let entry = self.entries.get(&key)?;
        if now_unix_secs < entry.deadline {
            return Some(entry.verified.clone());
        }
        self.remove(&key);
        None
    }

    pub fn insert(&mut self, token: &str, verified: &VerifiedToken, now_unix_secs: u64) {
        let deadline = now_unix_secs
            .saturating_add(self.max_age_secs)
            .min(verified.expires_at.unwrap_or(u64::MAX));
        if self.capacity == 0 || deadline <= now_unix_secs {
            return;
        }
        let key = digest(token);
        self.remove(&key);
        while self.entries.len() >= self.capacity {
            let Some(&(_, _, oldest)) = self.by_deadline.first() else { break };
            self.remove(&oldest);
        }
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        self.by_deadline.insert((deadline, seq, key));
        self.entries.insert(key, CacheEntry { verified: verified.clone(), deadline, seq });
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn remove(&mut self, key: &[u8; 32]) {
        if let Some(old) = self.entries.remove(key) {
            self.by_deadline.remove(&(old.deadline, old.seq, *key));
        }
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000;
    const SKEW: u64 = 60;
    const K1: &[u8] = b"test-secret-one-0123456789abcdef";
    const K2: &[u8] = b"test-secret-two-0123456789abcdef";
    const HS256_K1: &str = r#"{"alg":"HS256","typ":"JWT","kid":"k1"}"#;

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

    fn mint(payload: &str) -> String {
        mint_raw(HS256_K1, payload, K1)
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
        Identity { user: user.into(), groups: groups.iter().map(|g| g.to_string()).collect() }
    }

    #[test]
    fn istio_hs256_dev_guide_token() {
        // The Istio guide's secret is used as its 64 ASCII characters, not as the 32
        // bytes they hex-decode to: only the ASCII bytes verify this token.
        let token = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCIsImtpZCI6ImRldi1rZXkifQ.eyJpc3MiOiJkZXYiLCJzdWIiOiJkZXYtdXNlciJ9.S6AKJ6CRs5nbrhHPshc2KnikNkjLp9isg6xlR4kSecQ";
        let secret = "f59f73eff3357c3754b9b60671f16ffcec9b1a301498fa18c928bb753d4b385a";
        let k = b64(secret.as_bytes());
        assert_eq!(k, "ZjU5ZjczZWZmMzM1N2MzNzU0YjliNjA2NzFmMTZmZmNlYzliMWEzMDE0OThmYTE4YzkyOGJiNzUzZDRiMzg1YQ");
        let jwks = format!(r#"{{"keys":[{{"kty":"oct","kid":"dev-key","alg":"HS256","k":"{k}"}}]}}"#);
        let p = JwtProvider { keys: Jwks::parse(&jwks).unwrap(), ..dev() };
        let got = JwtVerifier::new(vec![p]).verify(token, NOW).unwrap();
        assert_eq!(got, VerifiedToken { identity: identity("dev-user", &[]), issuer: "dev".into(), expires_at: None });

        let hex_jwks = jwks_json(&[(Some("dev-key"), &hex::decode(secret).unwrap())]);
        let p = JwtProvider { keys: Jwks::parse(&hex_jwks).unwrap(), ..dev() };
        assert_eq!(JwtVerifier::new(vec![p]).verify(token, NOW), Err(JwtError::BadSignature));
    }

    #[test]
    fn rfc7515_appendix_a1() {
        let jwks = r#"{"keys":[{"kty":"oct","k":"AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow"}]}"#;
        let token = "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9.eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ.dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        let joe = |user_claim: &str| {
            JwtVerifier::new(vec![JwtProvider {
                issuer: "joe".into(),
                keys: Jwks::parse(jwks).unwrap(),
                user_claim: user_claim.into(),
                ..dev()
            }])
        };
        let exp = 1_300_819_380;
        let cases: &[(&str, u64, Result<VerifiedToken, JwtError>)] = &[
            (
                "iss",
                1_300_819_000,
                Ok(VerifiedToken { identity: identity("joe", &[]), issuer: "joe".into(), expires_at: Some(exp + SKEW) }),
            ),
            ("iss", exp + SKEW - 1, Ok(VerifiedToken { identity: identity("joe", &[]), issuer: "joe".into(), expires_at: Some(exp + SKEW) })),
            ("iss", exp + SKEW, Err(JwtError::Expired)),
            ("iss", exp + SKEW + 1, Err(JwtError::Expired)),
            ("sub", 1_300_819_000, Err(JwtError::MissingUser)),
        ];
        for (claim, now, want) in cases {
            assert_eq!(joe(claim).verify(token, *now), *want, "user_claim {claim} at {now}");
        }
    }

    #[test]
    fn valid_tokens() {
        let open = JwtVerifier::new(vec![dev()]);
        let cases: &[(&str, String, Identity, Option<u64>)] = &[
            ("minimal", mint(r#"{"iss":"dev","sub":"alice"}"#), identity("alice", &[]), None),
            ("groups array", mint(r#"{"iss":"dev","sub":"a","groups":["free","premium"]}"#), identity("a", &["free", "premium"]), None),
            ("groups string", mint(r#"{"iss":"dev","sub":"a","groups":"a b,c, d"}"#), identity("a", &["a", "b", "c", "d"]), None),
            ("groups empty string", mint(r#"{"iss":"dev","sub":"a","groups":""}"#), identity("a", &[]), None),
            ("groups null", mint(r#"{"iss":"dev","sub":"a","groups":null}"#), identity("a", &[]), None),
            ("exp ahead", mint(&format!(r#"{{"iss":"dev","sub":"a","exp":{}}}"#, NOW + 100)), identity("a", &[]), Some(NOW + 100 + SKEW)),
            ("exp float", mint(&format!(r#"{{"iss":"dev","sub":"a","exp":{}.5}}"#, NOW + 100)), identity("a", &[]), Some(NOW + 101 + SKEW)),
            ("exp within skew", mint(&format!(r#"{{"iss":"dev","sub":"a","exp":{}}}"#, NOW - SKEW + 1)), identity("a", &[]), Some(NOW + 1)),
            ("nbf at skew edge", mint(&format!(r#"{{"iss":"dev","sub":"a","nbf":{}}}"#, NOW + SKEW)), identity("a", &[]), None),
            ("nbf past float", mint(&format!(r#"{{"iss":"dev","sub":"a","nbf":{}.25}}"#, NOW - 5)), identity("a", &[]), None),
            ("kid k2", mint_raw(r#"{"alg":"HS256","kid":"k2"}"#, r#"{"iss":"dev","sub":"a"}"#, K2), identity("a", &[]), None),
            ("no kid tries every key", mint_raw(r#"{"alg":"HS256"}"#, r#"{"iss":"dev","sub":"a"}"#, K2), identity("a", &[]), None),
            ("typ ignored", mint_raw(r#"{"alg":"HS256","typ":"at+jwt"}"#, r#"{"iss":"dev","sub":"a"}"#, K1), identity("a", &[]), None),
            ("unicode user", mint(r#"{"iss":"dev","sub":"müller"}"#), identity("müller", &[]), None),
        ];
        for (name, token, want_identity, want_exp) in cases {
            let got = open.verify(token, NOW).unwrap_or_else(|e| panic!("{name}: {e:?}"));
            assert_eq!((&got.identity, got.expires_at), (want_identity, *want_exp), "{name}");
            assert_eq!(got.issuer, "dev");
        }
    }

    #[test]
    fn invalid_tokens() {
        use JwtError::*;
        let open = JwtVerifier::new(vec![dev()]);
        let good = mint(r#"{"iss":"dev","sub":"a"}"#);
        let (gh, gp, gs) = {
            let v: Vec<&str> = good.split('.').collect();
            (v[0].to_string(), v[1].to_string(), v[2].to_string())
        };
        let claims = |extra: &str| mint(&format!(r#"{{"iss":"dev","sub":"a"{extra}}}"#));
        let with_alg = |alg: &str| mint_raw(&format!(r#"{{"alg":{alg},"kid":"k1"}}"#), r#"{"iss":"dev","sub":"a"}"#, K1);
        let mut flipped_sig = gs.clone();
        flipped_sig.replace_range(0..1, if gs.starts_with('A') { "B" } else { "A" });
        let other_payload = b64(br#"{"iss":"dev","sub":"admin"}"#);
        let filler = "x".repeat(MAX_TOKEN_BYTES);

        let cases: Vec<(&str, String, JwtError)> = vec![
            ("too large", "a".repeat(MAX_TOKEN_BYTES + 1), TooLarge),
            ("too large but signed", claims(&format!(r#","pad":"{filler}""#)), TooLarge),
            ("empty", String::new(), Malformed),
            ("one segment", gh.clone(), Malformed),
            ("two segments", format!("{gh}.{gp}"), Malformed),
            ("four segments", format!("{good}.{gs}"), Malformed),
            ("empty segments", "..".into(), Malformed),
            ("empty payload", format!("{gh}..{gs}"), Malformed),
            ("empty signature", format!("{gh}.{gp}."), Malformed),
            ("alg none unsigned", format!("{}.{gp}.", b64(br#"{"alg":"none"}"#)), Malformed),
            ("alg none", with_alg(r#""none""#), UnsupportedAlg),
            ("alg None", with_alg(r#""None""#), UnsupportedAlg),
            ("alg hs256", with_alg(r#""hs256""#), UnsupportedAlg),
            ("alg RS256", with_alg(r#""RS256""#), UnsupportedAlg),
            ("alg HS512", with_alg(r#""HS512""#), UnsupportedAlg),
            ("alg number", with_alg("256"), UnsupportedAlg),
            ("alg missing", mint_raw(r#"{"kid":"k1"}"#, r#"{"iss":"dev","sub":"a"}"#, K1), UnsupportedAlg),
            ("crit", mint_raw(r#"{"alg":"HS256","crit":["b64"],"b64":false}"#, r#"{"iss":"dev","sub":"a"}"#, K1), Malformed),
            ("kid not string", mint_raw(r#"{"alg":"HS256","kid":1}"#, r#"{"iss":"dev","sub":"a"}"#, K1), Malformed),
            ("bad base64 header", format!("*{gh}.{gp}.{gs}"), BadBase64),
            ("standard alphabet payload", format!("{gh}.{gp}+.{gs}"), BadBase64),
            ("bad base64 signature", format!("{gh}.{gp}.{}/", &gs[..42]), BadBase64),
            // gh is 51 and gs 43 characters: one '=' is the canonical padding.
            ("padded header", format!("{gh}=.{gp}.{gs}"), BadBase64),
            ("padded signature", format!("{gh}.{gp}.{gs}="), BadBase64),
            ("header not json", format!("{}.{gp}.{gs}", b64(b"{alg:HS256}")), BadJson),
            ("header not object", format!("{}.{gp}.{gs}", b64(b"[\"HS256\"]")), BadJson),
            ("payload not json", mint_raw(HS256_K1, "iss=dev", K1), BadJson),
            ("payload not object", mint_raw(HS256_K1, r#""dev""#, K1), BadJson),
            ("wrong key", mint_raw(HS256_K1, r#"{"iss":"dev","sub":"a"}"#, b"not-the-secret"), BadSignature),
            ("kid names the other key", mint_raw(r#"{"alg":"HS256","kid":"k2"}"#, r#"{"iss":"dev","sub":"a"}"#, K1), BadSignature),
            ("unknown kid", mint_raw(r#"{"alg":"HS256","kid":"k9"}"#, r#"{"iss":"dev","sub":"a"}"#, K1), UnknownKid),
            ("tampered payload", format!("{gh}.{other_payload}.{gs}"), BadSignature),
            ("tampered signature", format!("{gh}.{gp}.{flipped_sig}"), BadSignature),
            ("short signature", format!("{gh}.{gp}.{}", b64(&[0u8; 16])), BadSignature),
            ("expired and forged", mint_raw(HS256_K1, r#"{"iss":"dev","sub":"a","exp":1}"#, b"x"), BadSignature),
            ("wrong iss", mint(r#"{"iss":"other","sub":"a"}"#), UnknownIssuer),
            ("no iss", mint(r#"{"sub":"a"}"#), UnknownIssuer),
            ("iss not string", mint(r#"{"iss":["dev"],"sub":"a"}"#), UnknownIssuer),
            ("expired at skew edge", claims(&format!(r#","exp":{}"#, NOW - SKEW)), Expired),
            ("expired long ago", claims(r#","exp":1"#), Expired),
            ("nbf past skew", claims(&format!(r#","nbf":{}"#, NOW + SKEW + 1)), NotYetValid),
            ("exp string", claims(&format!(r#","exp":"{}""#, NOW + 100)), BadClaim("exp")),
            ("exp bool", claims(r#","exp":true"#), BadClaim("exp")),
            ("nbf string", claims(r#","nbf":"0""#), BadClaim("nbf")),
            ("no sub", mint(r#"{"iss":"dev"}"#), MissingUser),
            ("empty sub", mint(r#"{"iss":"dev","sub":""}"#), MissingUser),
            ("sub number", mint(r#"{"iss":"dev","sub":42}"#), MissingUser),
            ("sub with comma", mint(r#"{"iss":"dev","sub":"a,b"}"#), BadClaim("user")),
            ("sub with newline", mint(r#"{"iss":"dev","sub":"a\r\nx-evil: 1"}"#), BadClaim("user")),
            ("groups number", claims(r#","groups":5"#), BadClaim("groups")),
            ("groups object", claims(r#","groups":{"a":1}"#), BadClaim("groups")),
            ("groups array of numbers", claims(r#","groups":[1]"#), BadClaim("groups")),
            ("group with comma", claims(r#","groups":["a,b"]"#), BadClaim("groups")),
            ("group with space", claims(r#","groups":["a b"]"#), BadClaim("groups")),
        ];
        for (name, token, want) in cases {
            assert_eq!(open.verify(&token, NOW), Err(want), "{name}");
        }
        assert_eq!(JwtVerifier::new(vec![]).verify(&good, NOW), Err(UnknownIssuer));
        assert!(JwtVerifier::new(vec![]).is_empty());
        assert!(!open.is_empty());
    }

    #[test]
    fn audiences_and_require_exp() {
        use JwtError::*;
        let aud = verifier_with(|p| p.audiences = vec!["llm".into(), "chat".into()]);
        let strict = verifier_with(|p| p.require_exp = true);
        let with = |extra: &str| mint(&format!(r#"{{"iss":"dev","sub":"a"{extra}}}"#));
        let exp = format!(r#","exp":{}"#, NOW + 10);
        let cases: Vec<(&str, &JwtVerifier, String, Result<(), JwtError>)> = vec![
            ("aud string", &aud, with(r#","aud":"llm""#), Ok(())),
            ("aud array", &aud, with(r#","aud":["other","chat"]"#), Ok(())),
            ("aud string mismatch", &aud, with(r#","aud":"other""#), Err(WrongAudience)),
            ("aud array mismatch", &aud, with(r#","aud":["other","LLM"]"#), Err(WrongAudience)),
            ("aud empty array", &aud, with(r#","aud":[]"#), Err(WrongAudience)),
            ("aud missing", &aud, with(""), Err(WrongAudience)),
            ("aud number", &aud, with(r#","aud":7"#), Err(BadClaim("aud"))),
            ("aud array of numbers", &aud, with(r#","aud":["llm",7]"#), Err(BadClaim("aud"))),
            ("aud unchecked without audiences", &strict, with(&format!(r#","aud":"x"{exp}"#)), Ok(())),
            ("require_exp without exp", &strict, with(""), Err(MissingExp)),
            ("require_exp with exp", &strict, with(&exp), Ok(())),
            ("require_exp expired", &strict, with(r#","exp":5"#), Err(Expired)),
        ];
        for (name, verifier, token, want) in cases {
            assert_eq!(verifier.verify(&token, NOW).map(|_| ()), want, "{name}");
        }
    }

    #[test]
    fn issuer_selects_provider_and_keys() {
        let v = JwtVerifier::new(vec![dev(), provider("other", &[(None, b"other-secret")])]);
        let cases: &[(&str, String, Result<(), JwtError>)] = &[
            ("other with its key", mint_raw(HS256_K1, r#"{"iss":"other","sub":"a"}"#, b"other-secret"), Ok(())),
            ("other with dev's key", mint_raw(HS256_K1, r#"{"iss":"other","sub":"a"}"#, K1), Err(JwtError::BadSignature)),
            ("dev with other's key", mint_raw(r#"{"alg":"HS256"}"#, r#"{"iss":"dev","sub":"a"}"#, b"other-secret"), Err(JwtError::BadSignature)),
        ];
        for (name, token, want) in cases {
            assert_eq!(v.verify(token, NOW).map(|_| ()), *want, "{name}");
        }
    }

    #[test]
    fn jwks_parse() {
        let ok: &[(&str, &[KidSecret])] = &[
            (r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#, &[(None, b"secret")]),
            (r#"{"keys":[{"kty":"oct","k":"c2VjcmV0MQ=="}]}"#, &[(None, b"secret1")]), // padding tolerated
            (r#"{"keys":[{"kty":"oct","k":"_-8"}]}"#, &[(None, &[0xff, 0xef])]),
            (
                r#"{"keys":[{"kty":"RSA","n":"x","e":"AQAB"},{"kty":"oct","kid":"a","alg":"HS256","use":"sig","k":"c2VjcmV0"},{"kty":"EC"}]}"#,
                &[(Some("a"), b"secret")],
            ),
        ];
        for (json, want) in ok {
            let jwks = Jwks::parse(json).unwrap_or_else(|e| panic!("{json}: {e}"));
            let got: Vec<KidSecret> = jwks.keys.iter().map(|k| (k.kid.as_deref(), k.secret.as_slice())).collect();
            assert_eq!(got, want.to_vec(), "{json}");
        }

        let bad: &[(&str, &str)] = &[
            ("", "not valid JSON"),
            ("{\"keys\":[{\"kty\":\"oct\",\"k\":\"c2VjcmV0\"}", "not valid JSON"),
            ("[]", "must be an object"),
            (r#"{"keys":{}}"#, "must be an object"),
            (r#"{"keys":[]}"#, "no usable key"),
            (r#"{"keys":[{"kty":"RSA","n":"x","e":"AQAB"}]}"#, "no usable key"),
            (r#"{"keys":["c2VjcmV0"]}"#, "keys[0]: must be an object"),
            (r#"{"keys":[{"k":"c2VjcmV0"}]}"#, "keys[0].kty: missing"),
            (r#"{"keys":[{"kty":"oct"}]}"#, "keys[0].k: missing"),
            (r#"{"keys":[{"kty":"oct","k":""}]}"#, "keys[0].k: empty secret"),
            (r#"{"keys":[{"kty":"oct","k":"c2Vj+mV0"}]}"#, "keys[0].k: not valid base64url"),
            (r#"{"keys":[{"kty":"oct","k":"c2Vj*mV0"}]}"#, "keys[0].k: not valid base64url"),
            (r#"{"keys":[{"kty":"oct","k":12}]}"#, "keys[0].k: missing"),
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
        let p = dev();
        let shown = format!("{:?}", JwtVerifier::new(vec![p]));
        assert!(shown.contains("k1"), "{shown}");
        for secret in [K1, K2] {
            assert!(!shown.contains(std::str::from_utf8(secret).unwrap()), "{shown}");
            assert!(!shown.contains(&b64(secret)), "{shown}");
            assert!(!shown.contains(&format!("{:?}", &secret[..8])), "{shown}");
        }
        let errors = [
            JwtError::TooLarge,
            JwtError::Malformed,
            JwtError::BadBase64,
            JwtError::BadJson,
            JwtError::UnsupportedAlg,
            JwtError::UnknownIssuer,
            JwtError::UnknownKid,
            JwtError::BadSignature,
            JwtError::Expired,
            JwtError::NotYetValid,
            JwtError::WrongAudience,
            JwtError::MissingExp,
            JwtError::BadClaim("exp"),
            JwtError::BadClaim("other"),
            JwtError::MissingUser,
        ];
        for e in errors {
            assert!(e.message().starts_with("token "), "{e:?}");
            assert_eq!(e.to_string(), e.message());
        }
        assert_eq!(JwtError::Expired.message(), "token expired");
    }

    #[test]
    fn jwt_shape() {
        let good = mint(r#"{"iss":"dev","sub":"a"}"#);
        let padded = format!("{}=.e30.sig", b64(br#"{"alg":"HS256","kid":"k1"}"#)); // 35 chars + 1 pad
        let cases: &[(&str, bool)] = &[
            (&good, true),
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

    fn verified(user: &str, expires_at: Option<u64>) -> VerifiedToken {
        VerifiedToken { identity: identity(user, &[]), issuer: "dev".into(), expires_at }
    }

    #[test]
    fn cache_hits_and_expiry() {
        // (token expires_at, inserted at, looked up at, hit?)
        let cases: &[(Option<u64>, u64, u64, bool)] = &[
            (None, NOW, NOW, true),
            (None, NOW, NOW + 299, true),
            (None, NOW, NOW + 300, false), // max_age
            (Some(NOW + 10), NOW, NOW + 9, true),
            (Some(NOW + 10), NOW, NOW + 10, false), // token expiry (exp + skew)
            (Some(NOW + 1000), NOW, NOW + 300, false), // max_age before exp
            (Some(NOW), NOW, NOW, false), // already expired: not stored
        ];
        for (i, (expires_at, at, lookup, hit)) in cases.iter().enumerate() {
            let mut cache = TokenCache::new(10, 300);
            let v = verified("a", *expires_at);
            cache.insert("tok", &v, *at);
            assert_eq!(cache.get("tok", *lookup), hit.then(|| v.clone()), "case {i}");
            assert_eq!(cache.get("other", *at), None, "case {i}");
            if !hit {
                assert_eq!(cache.len(), 0, "case {i}: expired entry dropped");
            }
        }
    }

    #[test]
    fn cache_is_bounded() {
        let mut cache = TokenCache::new(3, 300);
        assert!(cache.is_empty());
        cache.insert("t-late", &verified("late", Some(NOW + 200)), NOW);
        cache.insert("t-soon", &verified("soon", Some(NOW + 50)), NOW);
        cache.insert("t-none", &verified("none", None), NOW);
        assert_eq!(cache.len(), 3);
        // Full: the soonest-expiring entry goes.
        cache.insert("t-new", &verified("new", Some(NOW + 100)), NOW);
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.get("t-soon", NOW), None);
        for t in ["t-late", "t-none", "t-new"] {
            assert!(cache.get(t, NOW).is_some(), "{t}");
        }
        // Re-inserting a cached token replaces it instead of evicting another.
        cache.insert("t-new", &verified("new2", Some(NOW + 100)), NOW + 1);
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.get("t-new", NOW + 1).unwrap().identity.user, "new2");
        // Many inserts never exceed the bound.
        for i in 0..100 {
            cache.insert(&format!("t{i}"), &verified("x", None), NOW + i);
            assert!(cache.len() <= 3);
        }
        assert!(cache.get("t99", NOW + 99).is_some());

        let mut off = TokenCache::new(0, 300);
        off.insert("t", &verified("a", None), NOW);
        assert_eq!((off.len(), off.get("t", NOW)), (0, None));
    }
}
