//! The request-path decision: find the credential, verify it, check groups, and say
//! which headers to remove and set. Pure: headers and the clock in, a verdict out.
//!
//! Client-sent identity headers are always removed, before anything else, so an
//! identity can only reach the upstream if this module put it there.

use std::borrow::Cow;

use crate::config::Settings;
use crate::credentials::{classify, find_credential_value, Credential};
use crate::identity::Identity;
use std::rc::Rc;

use crate::jwt::{Jwks, JwtError, TokenCache};
use crate::keys::KeyCache;
use crate::remote_keys::{KnownKey, RemoteMemo};

/// Why a request was not let through. Mapped to a status and an OpenAI-style error
/// body in `response`; `reason()` is the stable name used in logs and usage events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    MissingCredential,
    InvalidApiKey,
    InvalidToken(JwtError),
    GroupNotAllowed,
}

impl AuthError {
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::MissingCredential => "missing_credential",
            AuthError::InvalidToken(JwtError::KeysUnavailable) => "jwks_unavailable",
            AuthError::InvalidApiKey | AuthError::InvalidToken(_) => "invalid_credential",
            AuthError::GroupNotAllowed => "permission_denied",
        }
    }
}

/// Header changes to apply to the request before it goes upstream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderEdits<'a> {
    pub remove: Vec<&'a str>,
    pub set: Vec<(&'a str, Cow<'a, str>)>,
}

/// The identity is borrowed from the settings (API key) or the token cache (repeat JWT),
/// so an allowed request allocates nothing for it; only a freshly verified JWT owns one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict<'a> {
    Allow {
        identity: Cow<'a, Identity>,
        edits: HeaderEdits<'a>,
    },
    Deny {
        error: AuthError,
        edits: HeaderEdits<'a>,
    },
    /// An API key the static list does not hold and the key service's cache does not
    /// answer for: the request waits for a lookup of this digest (`api_keys.remote`).
    Lookup {
        digest: [u8; 32],
    },
}

/// What the shared cache of the key service says of a digest (`remote_keys::classify`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteKey {
    /// Known (fresh, or stale while the service is down), resolved at this time (s).
    Known(KnownKey, u64),
    /// Unknown, revoked or expired.
    Invalid,
    Lookup,
}

enum Authn<'a> {
    Identity(Cow<'a, Identity>),
    Lookup([u8; 32]),
}

/// The worker's caches of credentials that checked out: verified JWTs and API keys.
/// Both are bounded by `jwt.cache_entries` and rebuilt with the settings.
#[derive(Debug)]
pub struct CredentialCache {
    pub tokens: TokenCache,
    pub keys: KeyCache,
    /// Keys the key service resolved, used lately on this worker.
    pub remote: RemoteMemo,
}

impl CredentialCache {
    pub fn new(entries: usize, token_max_age_secs: u64) -> Self {
        Self {
            tokens: TokenCache::new(entries, token_max_age_secs),
            keys: KeyCache::new(entries),
            remote: RemoteMemo::new(entries),
        }
    }
}

/// The headers removed from every request let through without edits of its own:
/// every client-sent copy of the identity headers, and the credential headers unless
/// `forward_credentials` (one list, for allowed requests and passed CORS preflights).
pub fn passthrough_removals(settings: &Settings) -> Vec<&str> {
    let mut remove = Vec::with_capacity(2 + settings.sources.len());
    remove.extend([settings.identity_headers.user.as_str(), settings.identity_headers.groups.as_str()]);
    if !settings.forward_credentials {
        for source in &settings.sources {
            if !remove.contains(&source.header.as_str()) {
                remove.push(source.header.as_str());
            }
        }
    }
    remove
}

/// Decides one request. `cache` is the worker's cache of credentials that checked out;
/// `now` (Unix seconds) is asked for only when a JWT or a managed key is checked.
/// Managed keys (`api_keys.remote`) are refused here: see [`decide_with`].
pub fn decide<'a, K: AsRef<str>, V: AsRef<str>>(
    settings: &'a Settings,
    cache: &'a mut CredentialCache,
    headers: &[(K, V)],
    now: impl Fn() -> u64,
) -> Verdict<'a> {
    decide_with(settings, cache, headers, now, &mut |_| RemoteKey::Invalid, &|_| None)
}

/// The current key set of a provider whose keys are fetched (`remote_jwks`), by index:
/// `None` for a provider with keys in the configuration.
pub type RemoteJwksOf<'a> = &'a dyn Fn(usize) -> Option<Result<Rc<Jwks>, JwtError>>;

/// As [`decide`]; `remote` reads the key service's shared cache for the digest of a key
/// the static list does not hold (`api_keys.remote`); `jwks` gives the fetched key sets
/// (`jwt.providers[].remote_jwks`).
pub fn decide_with<'a, K: AsRef<str>, V: AsRef<str>>(
    settings: &'a Settings,
    cache: &'a mut CredentialCache,
    headers: &[(K, V)],
    now: impl Fn() -> u64,
    remote: &mut dyn FnMut(&[u8; 32]) -> RemoteKey,
    jwks: RemoteJwksOf<'_>,
) -> Verdict<'a> {
    let authenticated = match authenticate(settings, cache, headers, now, remote, jwks) {
        Ok(Authn::Lookup(digest)) => return Verdict::Lookup { digest },
        Ok(Authn::Identity(identity)) => Ok(identity),
        Err(e) => Err(e),
    };
    let identity = match authenticated.and_then(|id| authorize(settings, id)) {
        Ok(identity) => identity,
        Err(error) => {
            let remove = vec![settings.identity_headers.user.as_str(), settings.identity_headers.groups.as_str()];
            return Verdict::Deny { error, edits: HeaderEdits { remove, set: Vec::new() } };
        }
    };
    let mut edits = HeaderEdits { remove: passthrough_removals(settings), set: Vec::new() };
    let (user, groups) = match &identity {
        Cow::Borrowed(id) => (Cow::Borrowed(id.user.as_str()), id.groups_csv()),
        Cow::Owned(id) => (Cow::Owned(id.user.clone()), Cow::Owned(id.groups_csv().into_owned())),
    };
    edits.set =
        vec![(settings.identity_headers.user.as_str(), user), (settings.identity_headers.groups.as_str(), groups)];
    Verdict::Allow { identity, edits }
}

fn authenticate<'a, K: AsRef<str>, V: AsRef<str>>(
    settings: &'a Settings,
    cache: &'a mut CredentialCache,
    headers: &[(K, V)],
    now: impl Fn() -> u64,
    remote: &mut dyn FnMut(&[u8; 32]) -> RemoteKey,
    jwks: RemoteJwksOf<'_>,
) -> Result<Authn<'a>, AuthError> {
    let Some(value) = find_credential_value(headers, &settings.sources) else {
        return Err(AuthError::MissingCredential);
    };
    // A repeat JWT skips the shape check too; only verified tokens are in the cache,
    // and only a value with exactly two dots can be one.
    if value.bytes().filter(|&b| b == b'.').count() == 2 {
        if let Some(slot) = cache.tokens.find(value, now()) {
            return cache
                .tokens
                .identity(slot)
                .map(|id| Authn::Identity(Cow::Borrowed(id)))
                .ok_or(AuthError::InvalidToken(JwtError::Malformed));
        }
    }
    match classify(value) {
        Credential::ApiKey(key) => {
            if key.is_empty() {
                return Err(AuthError::InvalidApiKey);
            }
            if let Some(identity) = settings.keys.lookup_cached(key, &mut cache.keys) {
                return Ok(Authn::Identity(Cow::Borrowed(identity)));
            }
            let Some(service) = &settings.remote_keys else { return Err(AuthError::InvalidApiKey) };
            let digest = cache.keys.digest(key);
            let now = now();
            if cache.remote.get(&digest, now, service.ttl_seconds).is_some() {
                let identity = cache.remote.get(&digest, now, service.ttl_seconds).ok_or(AuthError::InvalidApiKey)?;
                return Ok(Authn::Identity(Cow::Borrowed(identity)));
            }
            match remote(&digest) {
                RemoteKey::Known(known, resolved_at) => {
                    cache.keys.remember(key, digest);
                    let identity = match cache.remote.insert(digest, &known, resolved_at) {
                        Some(identity) => Cow::Borrowed(identity),
                        None => Cow::Owned(known.identity()),
                    };
                    Ok(Authn::Identity(identity))
                }
                RemoteKey::Invalid => Err(AuthError::InvalidApiKey),
                RemoteKey::Lookup => Ok(Authn::Lookup(digest)),
            }
        }
        Credential::Jwt(token) => {
            if settings.jwt.is_empty() {
                return Err(AuthError::InvalidToken(JwtError::UnknownIssuer));
            }
            let now = now();
            let verified = settings.jwt.verify_with(token, now, jwks).map_err(AuthError::InvalidToken)?;
            cache.tokens.insert(token, &verified, now);
            Ok(Authn::Identity(Cow::Owned(verified.identity)))
        }
    }
}

fn authorize<'a>(settings: &Settings, identity: Cow<'a, Identity>) -> Result<Cow<'a, Identity>, AuthError> {
    if settings.allowed_groups.is_empty() || identity.groups.iter().any(|g| settings.allowed_groups.contains(g)) {
        Ok(identity)
    } else {
        Err(AuthError::GroupNotAllowed)
    }
}

#[cfg(test)]
mod tests {
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::response::LocalReply;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use hmac::{Hmac, Mac};
    use sha2::Sha256;

    const NOW: u64 = 1_763_800_000;
    const KEY: &str = "tg-test-key";
    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn token(claims: &str) -> String {
        let h = URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","kid":"k"}"#);
        let p = URL_SAFE_NO_PAD.encode(claims);
        let mut mac = Hmac::<Sha256>::new_from_slice(SECRET).unwrap();
        mac.update(format!("{h}.{p}").as_bytes());
        format!("{h}.{p}.{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
    }

    fn settings(extra: &str) -> Settings {
        let digest = crate::keys::sha256_hex(KEY);
        let jwks = serde_json::to_string(&format!(
            r#"{{"keys":[{{"kty":"oct","kid":"k","k":"{}"}}]}}"#,
            URL_SAFE_NO_PAD.encode(SECRET)
        ))
        .unwrap();
        let json = format!(
            r#"{{"api_keys":{{"keys":[{{"sha256":"{digest}","user":"mittens","groups":["premium","free"]}}]}},
                "jwt":{{"providers":[{{"issuer":"dev","jwks":{jwks}}}]}}{extra}}}"#
        );
        Settings::parse(json.as_bytes(), &|_| None).unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn run<'a>(s: &'a Settings, pairs: &[(&str, &str)]) -> Verdict<'a> {
        // The verdict may borrow from the cache; a test can afford to leak it.
        let cache = Box::leak(Box::new(CredentialCache::new(16, 300)));
        decide(s, cache, &headers(pairs), || NOW)
    }

    #[test]
    fn verdicts() {
        let s = settings("");
        let good_jwt = format!("Bearer {}", token(r#"{"iss":"dev","sub":"jay","groups":"free"}"#));
        let expired = format!("Bearer {}", token(r#"{"iss":"dev","sub":"jay","exp":1}"#));
        let bearer_key = format!("Bearer {KEY}");
        #[rustfmt::skip]
        let cases: Vec<(&str, Vec<(&str, &str)>, Result<&str, &str>)> = vec![
            ("bearer key", vec![("authorization", bearer_key.as_str())], Ok("mittens")),
            ("x-api-key", vec![("x-api-key", KEY)], Ok("mittens")),
            ("jwt", vec![("authorization", good_jwt.as_str())], Ok("jay")),
            ("nothing", vec![], Err("missing_credential")),
            ("wrong key", vec![("x-api-key", "nope")], Err("invalid_credential")),
            ("expired jwt", vec![("authorization", expired.as_str())], Err("invalid_credential")),
            ("smuggled identity only", vec![("x-tollgate-user", "root")], Err("missing_credential")),
        ];
        for (name, pairs, want) in cases {
            match (run(&s, &pairs), want) {
                (Verdict::Allow { identity, .. }, Ok(user)) => assert_eq!(identity.user, user, "{name}"),
                (Verdict::Deny { error, .. }, Err(reason)) => assert_eq!(error.reason(), reason, "{name}"),
                (v, w) => panic!("{name}: got {v:?}, want {w:?}"),
            }
        }
    }

    #[test]
    fn allowed_groups_gate_access() {
        let cases = [(r#"["premium"]"#, true), (r#"["free","x"]"#, true), (r#"["staff"]"#, false)];
        for (allowed, ok) in cases {
            let s = settings(&format!(r#","authorization":{{"allowed_groups":{allowed}}}"#));
            let v = run(&s, &[("x-api-key", KEY)]);
            assert_eq!(matches!(v, Verdict::Allow { .. }), ok, "{allowed}");
            if let Verdict::Deny { error, .. } = v {
                assert_eq!(error, AuthError::GroupNotAllowed);
                assert_eq!(LocalReply::from(&error).status, 403);
            }
        }
    }

    #[test]
    fn edits_remove_identity_and_credentials_and_set_identity() {
        let s = settings("");
        let Verdict::Allow { edits, .. } = run(&s, &[("x-api-key", KEY)]) else { panic!("denied") };
        for h in ["x-tollgate-user", "x-tollgate-groups", "authorization", "x-api-key", "apikey"] {
            assert!(edits.remove.contains(&h), "{h} not removed");
        }
        assert_eq!(
            edits.set,
            vec![("x-tollgate-user", Cow::from("mittens")), ("x-tollgate-groups", Cow::from("premium,free"))]
        );
        let fwd = settings(r#","forward_credentials":true"#);
        let Verdict::Allow { edits, .. } = run(&fwd, &[("x-api-key", KEY)]) else { panic!("denied") };
        assert!(!edits.remove.contains(&"x-api-key"));
        let Verdict::Deny { edits, .. } = run(&s, &[]) else { panic!("allowed") };
        assert!(edits.remove.contains(&"x-tollgate-user"));
    }

    #[test]
    fn jwt_cache_skips_verification_on_repeat() {
        let s = settings("");
        let t = token(r#"{"iss":"dev","sub":"jay","exp":1763803600}"#);
        let bearer = format!("Bearer {t}");
        let mut cache = CredentialCache::new(16, 300);
        assert!(matches!(
            decide(&s, &mut cache, &headers(&[("authorization", &bearer)]), || NOW),
            Verdict::Allow { .. }
        ));
        assert_eq!(cache.tokens.len(), 1);
        assert!(matches!(
            decide(&s, &mut cache, &headers(&[("authorization", &bearer)]), || NOW + 10),
            Verdict::Allow { .. }
        ));
        // Past exp + skew the cached entry no longer counts.
        let later = decide(&s, &mut cache, &headers(&[("authorization", &bearer)]), || 1_763_803_600 + 61);
        assert!(matches!(later, Verdict::Deny { .. }));
    }

    #[test]
    fn replies_follow_the_openai_error_format_and_never_echo() {
        let cases = [
            (AuthError::MissingCredential, 401, "invalid_api_key"),
            (AuthError::InvalidApiKey, 401, "invalid_api_key"),
            (AuthError::InvalidToken(JwtError::Expired), 401, "invalid_api_key"),
            (AuthError::GroupNotAllowed, 403, "permission_denied"),
        ];
        for (error, status, code) in cases {
            let r = LocalReply::from(&error);
            assert_eq!(r.status, status);
            let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
            assert_eq!(v["error"]["code"], code);
            assert_eq!(v["error"]["type"], "invalid_request_error");
            assert!(v["error"]["param"].is_null());
            let has_challenge =
                r.headers.iter().any(|(k, v)| k == "www-authenticate" && v.starts_with("Bearer realm=\"tollgate\""));
            assert_eq!(has_challenge, status == 401);
        }
    }
}
