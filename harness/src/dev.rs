//! Credentials for development and tests: fresh API keys with their config entry,
//! HS256 JWTs and the JWKS that verifies them (the format Istio's
//! RequestAuthentication takes, so a dev setup moves to a cluster unchanged).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde_json::{json, Value};
use sha2::Sha256;

/// A fresh 256-bit API key, printable: `tg-` and 43 base64url characters.
pub fn new_api_key() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("tg-{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// A fresh random HMAC secret (32 bytes, printable).
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// The `api_keys.keys` entry for a key: only its SHA-256 digest is stored.
pub fn key_entry(key: &str, user: &str, groups: &[String]) -> Value {
    json!({"sha256": tollgate_filter::keys::sha256_hex(key), "user": user, "groups": groups})
}

/// The JWKS JSON for one HS256 key. `secret` is used as raw bytes.
pub fn jwks(secret: &[u8], kid: Option<&str>) -> String {
    let mut key = json!({"kty": "oct", "alg": "HS256", "k": URL_SAFE_NO_PAD.encode(secret)});
    if let (Some(kid), Some(obj)) = (kid, key.as_object_mut()) {
        obj.insert("kid".into(), json!(kid));
    }
    json!({"keys": [key]}).to_string()
}

/// Lowercase hex SHA-256 of `data` (what the mock reports as `x-mock-received-body-sha256`).
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(Sha256::digest(data))
}

/// Signs `claims` as an HS256 JWT with `secret` (raw bytes) and an optional `kid`.
pub fn mint_jwt(secret: &[u8], kid: Option<&str>, claims: &Value) -> anyhow::Result<String> {
    let mut header = json!({"alg": "HS256", "typ": "JWT"});
    if let (Some(kid), Some(obj)) = (kid, header.as_object_mut()) {
        obj.insert("kid".into(), json!(kid));
    }
    sign_raw(secret, &header.to_string(), &claims.to_string())
}

/// Signs arbitrary header and payload JSON text (tests use it to build bad tokens).
pub fn sign_raw(secret: &[u8], header_json: &str, payload_json: &str) -> anyhow::Result<String> {
    let signing_input = format!("{}.{}", URL_SAFE_NO_PAD.encode(header_json), URL_SAFE_NO_PAD.encode(payload_json));
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|e| anyhow::anyhow!("bad secret: {e}"))?;
    mac.update(signing_input.as_bytes());
    let sig = mac.finalize().into_bytes();
    Ok(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig)))
}

/// Claims for a token: `iss`, `sub`, `groups`, `iat`, `exp` = now + ttl, optional `aud`.
pub fn claims(iss: &str, sub: &str, groups: &[String], ttl_secs: Option<u64>, aud: Option<&str>) -> Value {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut c = json!({"iss": iss, "sub": sub, "groups": groups, "iat": now});
    if let Some(obj) = c.as_object_mut() {
        if let Some(ttl) = ttl_secs {
            obj.insert("exp".into(), json!(now + ttl));
        }
        if let Some(aud) = aud {
            obj.insert("aud".into(), json!(aud));
        }
    }
    c
}

/// Parses a TTL such as `90s`, `15m`, `1h`, `7d` or plain seconds.
pub fn parse_ttl(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (num, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (s.get(..i).unwrap_or(""), c),
        _ => (s, 's'),
    };
    let n: u64 = num.parse().map_err(|_| anyhow::anyhow!("bad ttl `{s}`: use e.g. 90s, 15m, 1h, 7d"))?;
    let mult = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => anyhow::bail!("bad ttl unit in `{s}`: use s, m, h or d"),
    };
    n.checked_mul(mult).ok_or_else(|| anyhow::anyhow!("ttl `{s}` too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_parsing() {
        for (s, want) in [("90", 90), ("90s", 90), ("15m", 900), ("1h", 3600), ("7d", 604_800)] {
            assert_eq!(parse_ttl(s).unwrap(), want, "{s}");
        }
        for s in ["", "h", "1y", "-1h", "1.5h"] {
            assert!(parse_ttl(s).is_err(), "{s}");
        }
    }

    #[test]
    fn keys_are_fresh_and_long() {
        let (a, b) = (new_api_key(), new_api_key());
        assert_ne!(a, b);
        assert_eq!(a.len(), 46);
    }
}
