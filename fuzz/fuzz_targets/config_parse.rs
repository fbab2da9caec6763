//! Plugin configuration parsing: `Settings::parse` on arbitrary bytes must never
//! panic, must be deterministic, and what it accepts must satisfy the checks it
//! documents. `Jwks::parse` gets the same bytes as a JWKS string.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use tollgate_filter::config::Settings;
use tollgate_filter::jwt::Jwks;
use tollgate_filter::keys::sha256_hex;

use common::{jwks, DEV_SECRET};

/// The VM environment: a few variables for `keys_env` / `jwks_env`, good and bad.
fn env(name: &str) -> Option<String> {
    match name {
        "KEYS" => Some(format!(r#"[{{"sha256":"{}","user":"env-user","groups":["g"]}}]"#, sha256_hex("k"))),
        "JWKS" => Some(jwks(&[(Some("dev-key"), DEV_SECRET)])),
        "EMPTY" => Some(String::new()),
        "BLANK" => Some(" \n".into()),
        "BAD" => Some("{\"keys\":[".into()),
        "LIST" => Some("[]".into()),
        _ => None,
    }
}

fn is_header_name(h: &str) -> bool {
    !h.is_empty() && h.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(jwks) = Jwks::parse(&text) {
        assert!(!jwks.keys.is_empty());
    }

    let parsed = Settings::parse(data, &env);
    let again = Settings::parse(data, &env);
    match (&parsed, &again) {
        (Err(a), Err(b)) => {
            assert_eq!(a, b);
            let _ = a.to_string();
        }
        (Ok(a), Ok(b)) => assert_eq!(format!("{a:?}"), format!("{b:?}")),
        _ => panic!("not deterministic: {parsed:?} vs {again:?}"),
    }
    let Ok(s) = parsed else { return };
    assert!(!s.sources.is_empty());
    for src in &s.sources {
        assert!(is_header_name(&src.header), "{src:?}");
        assert_ne!(src.prefix.as_deref(), Some(""), "{src:?}");
    }
    let ih = &s.identity_headers;
    assert!(is_header_name(&ih.user) && is_header_name(&ih.groups) && ih.user != ih.groups, "{ih:?}");
    assert!(!s.sources.iter().any(|src| src.header == ih.user || src.header == ih.groups), "{s:?}");
    for g in &s.allowed_groups {
        assert!(!g.is_empty() && !g.contains(',') && !g.chars().any(char::is_whitespace), "{g:?}");
    }
    if let Some(u) = &s.usage {
        assert!(!u.cluster.trim().is_empty() && u.path.starts_with('/'), "{u:?}");
        assert!((1..=60_000).contains(&u.timeout_ms) && (10..=60_000).contains(&u.flush_interval_ms), "{u:?}");
        assert!((1..=10_000).contains(&u.max_batch) && u.max_batch <= u.max_queue && u.max_queue <= 1_000_000, "{u:?}");
        assert!((1..=1000).contains(&u.max_attempts), "{u:?}");
    }
});
