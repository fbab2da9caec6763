//! Credential lookup and the request-path decision.
//!
//! The input is a header block: lines split on '\n', each `name:value` split at the
//! first ':' (a line without one is a name with an empty value). It goes to
//! `find_credential` with the default sources and to `auth::decide` under two fixed
//! configurations, checking what the decision promises: identity headers always
//! removed, an identity set only on Allow, the allowed groups honoured, and a cached
//! JWT decision identical to a fresh one.
#![no_main]

mod common;

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use serde_json::json;
use std::borrow::Cow;

use tollgate_filter::auth::{decide, CredentialCache, Verdict};
use tollgate_filter::config::Settings;
use tollgate_filter::credentials::{default_sources, find_credential, Credential};
use tollgate_filter::jwt::looks_like_jwt;
use tollgate_filter::keys::sha256_hex;

use common::{jwks, DEV_SECRET, DEV_TOKEN, NOW};

/// The API key of the fixed configurations.
const KEY: &str = "tg-fuzz-key";

fn no_env(_: &str) -> Option<String> {
    None
}

/// 0: defaults (sources, identity headers), one API key, the Istio dev JWT provider.
/// 1: own sources and identity headers, allowed_groups, forward_credentials, no cache.
fn settings() -> &'static [Settings; 2] {
    static S: OnceLock<[Settings; 2]> = OnceLock::new();
    S.get_or_init(|| {
        let keys = json!([
            {"sha256": sha256_hex(KEY), "user": "key-user", "groups": ["premium", "free"]},
            {"sha256": sha256_hex("tg-other-key"), "user": "other", "groups": []},
        ]);
        let provider = json!({"issuer": "dev", "jwks": jwks(&[(Some("dev-key"), DEV_SECRET)])});
        let plain = json!({"api_keys": {"keys": keys}, "jwt": {"providers": [provider], "cache_entries": 16}});
        let custom = json!({
            "api_keys": {
                "keys": keys,
                "sources": [
                    {"header": "X-Token", "prefix": "Token "},
                    {"header": "authorization", "prefix": "Bearer "},
                    {"header": "x-api-key", "prefix": ""},
                ],
            },
            "jwt": {"providers": [provider], "cache_entries": 0},
            "authorization": {"allowed_groups": ["premium"]},
            "identity_headers": {"user": "X-User", "groups": "x-groups"},
            "forward_credentials": true,
        });
        let s = [plain, custom].map(|c| Settings::parse(c.to_string().as_bytes(), &no_env).unwrap());
        // The fixtures themselves: the dev token and the key get in where they should.
        let jwt = vec![("authorization".to_string(), format!("Bearer {DEV_TOKEN}"))];
        let key = vec![("x-token".to_string(), format!("Token {KEY}"))];
        for (settings, headers, user) in
            [(&s[0], &jwt, Some("dev-user")), (&s[1], &jwt, None), (&s[1], &key, Some("key-user"))]
        {
            let mut cache = CredentialCache::new(0, 300);
            let verdict = decide(settings, &mut cache, headers, || NOW);
            match verdict {
                Verdict::Allow { identity, .. } => assert_eq!(Some(identity.user.as_str()), user),
                Verdict::Deny { .. } => assert_eq!(None, user, "{verdict:?}"),
            }
        }
        s
    })
}

fn headers(data: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(data)
        .split('\n')
        .map(|line| match line.split_once(':') {
            Some((name, value)) => (name.to_string(), value.to_string()),
            None => (line.to_string(), String::new()),
        })
        .collect()
}

fn check_decision(s: &Settings, headers: &[(String, String)], verdict: &Verdict) {
    let (user_h, groups_h) = (&s.identity_headers.user.as_str(), &s.identity_headers.groups.as_str());
    match verdict {
        Verdict::Deny { edits, .. } => {
            assert!(edits.remove.contains(user_h) && edits.remove.contains(groups_h), "{verdict:?}");
            assert!(edits.set.is_empty(), "{verdict:?}");
        }
        Verdict::Allow { identity, edits } => {
            assert!(edits.remove.contains(user_h) && edits.remove.contains(groups_h), "{verdict:?}");
            assert_eq!(
                edits.set,
                vec![(*user_h, Cow::from(identity.user.as_str())), (*groups_h, identity.groups_csv())],
                "{verdict:?}"
            );
            assert!(!identity.user.is_empty());
            // Only the two identities the fixed configurations know can get in.
            assert!(matches!(identity.user.as_str(), "key-user" | "other" | "dev-user"), "{verdict:?} for {headers:?}");
            if !s.allowed_groups.is_empty() {
                assert!(identity.groups.iter().any(|g| s.allowed_groups.contains(g)), "{verdict:?}");
            }
            for source in &s.sources {
                assert_eq!(edits.remove.contains(&source.header.as_str()), !s.forward_credentials, "{verdict:?}");
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let headers = headers(data);

    let sources = default_sources();
    match find_credential(&headers, &sources) {
        Some(Credential::Jwt(v)) => {
            assert!(looks_like_jwt(v), "{v:?}");
            assert_eq!(v, v.trim());
        }
        Some(Credential::ApiKey(v)) => {
            assert!(!looks_like_jwt(v), "{v:?}");
            assert_eq!(v, v.trim());
            // Borrowed from one of the header values.
            assert!(
                v.is_empty() || headers.iter().any(|(_, value)| value.as_bytes().as_ptr_range().contains(&v.as_ptr())),
                "{v:?}"
            );
        }
        None => {
            // A source without a prefix takes any value, so its header must be absent.
            assert!(
                !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("x-api-key") || n.eq_ignore_ascii_case("apikey")),
                "{headers:?}"
            );
        }
    }

    for s in settings() {
        let mut cache = CredentialCache::new(s.jwt_cache_entries, 300);
        let first = decide(s, &mut cache, &headers, || NOW);
        check_decision(s, &headers, &first);
        // Verdicts borrow from the cache; compare them by their full Debug form.
        let first = format!("{first:?}");
        // Again through the (possibly now filled) cache, and with a fresh cache.
        let cached = format!("{:?}", decide(s, &mut cache, &headers, || NOW));
        let mut empty = CredentialCache::new(s.jwt_cache_entries, 300);
        let fresh = format!("{:?}", decide(s, &mut empty, &headers, || NOW));
        assert_eq!(cached, fresh, "{headers:?}");
        assert_eq!(first, fresh, "{headers:?}");
    }
});
