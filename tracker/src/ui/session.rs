//! The usage page's session cookie. The browser never holds the API token: the cookie
//! is `<issued, Unix s>.<HMAC-SHA256>` over the issue time and the token's SHA-256,
//! keyed by a random key drawn once per process. So a session is checked in constant
//! time (`Mac::verify_slice`) without any server-side state, it ends after
//! [`MAX_AGE_S`], and it ends at once when the tracker restarts (a new key) or its
//! token changes. Logging out clears the cookie in the browser; a copy of it taken
//! before stays valid until it expires (there is no server-side list to strike it from).

use std::sync::OnceLock;

use axum::http::{header, HeaderMap};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The cookie's name.
pub const COOKIE: &str = "tollgate_session";
/// How long a session lasts (also the cookie's `Max-Age`): 12 hours.
pub const MAX_AGE_S: i64 = 12 * 3600;

type HmacSha256 = Hmac<Sha256>;

/// This process's session key; `None` if the OS has no randomness to give (then no
/// session is ever issued, and the login says the service is unavailable).
fn key() -> Option<&'static [u8; 32]> {
    static KEY: OnceLock<Option<[u8; 32]>> = OnceLock::new();
    KEY.get_or_init(|| {
        let mut key = [0u8; 32];
        getrandom::getrandom(&mut key).ok().map(|()| key)
    })
    .as_ref()
}

/// The MAC of a session (HMAC takes keys of any length: never `None` in practice).
fn mac(key: &[u8; 32], issued_s: i64, token_digest: &[u8; 32]) -> Option<HmacSha256> {
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).ok()?;
    mac.update(b"tollgate-ui-session-v1\0");
    mac.update(&issued_s.to_be_bytes());
    mac.update(token_digest);
    Some(mac)
}

/// A fresh session value for the token whose SHA-256 is `token_digest`.
pub fn issue(token_digest: &[u8; 32], now_s: i64) -> Option<String> {
    let tag = mac(key()?, now_s, token_digest)?.finalize().into_bytes();
    Some(format!("{now_s}.{}", URL_SAFE_NO_PAD.encode(tag)))
}

/// Whether `value` is a session this process issued for this token, not expired.
pub fn valid(value: &str, token_digest: &[u8; 32], now_s: i64) -> bool {
    let Some(key) = key() else { return false };
    let Some((issued, tag)) = value.split_once('.') else { return false };
    let Ok(issued_s) = issued.parse::<i64>() else { return false };
    let Ok(tag) = URL_SAFE_NO_PAD.decode(tag) else { return false };
    let fresh = issued_s <= now_s && now_s.checked_sub(issued_s).is_some_and(|age| age < MAX_AGE_S);
    fresh && mac(key, issued_s, token_digest).is_some_and(|mac| mac.verify_slice(&tag).is_ok())
}

/// The value of the session cookie in the request's `Cookie` headers, if any.
pub fn from_request(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim())
}

/// Whether the request reached the TLS-terminating proxy in front of the tracker over
/// https (`X-Forwarded-Proto: https`): then the cookie is `Secure`. The tracker itself
/// speaks plain HTTP, so without the header it cannot tell, and a `Secure` cookie would
/// never come back over the plain connection of `make run`.
pub fn over_https(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .is_some_and(|proto| proto.trim().eq_ignore_ascii_case("https"))
}

/// The `Set-Cookie` value: `value` for [`MAX_AGE_S`], or (`None`) a cleared cookie.
pub fn set_cookie(value: Option<&str>, secure: bool) -> String {
    let (value, max_age) = value.map_or(("", 0), |v| (v, MAX_AGE_S));
    let secure = if secure { "; Secure" } else { "" };
    format!("{COOKIE}={value}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_bound_to_the_token_the_time_and_the_key() {
        let token = [7u8; 32];
        let now = 1_763_800_000;
        let session = issue(&token, now).unwrap();
        let (issued, tag) = session.split_once('.').unwrap();
        let cases = [
            (session.clone(), token, now, true),
            (session.clone(), token, now + MAX_AGE_S - 1, true),
            (session.clone(), token, now + MAX_AGE_S, false),
            (session.clone(), token, now - 1, false),
            (session.clone(), [8u8; 32], now, false),
            (format!("{}.{tag}", issued.parse::<i64>().unwrap() + 1), token, now + 5, false),
            (format!("{issued}.{}", &tag[1..]), token, now, false),
            (format!("{issued}."), token, now, false),
            ("garbage".into(), token, now, false),
            (format!("{}.{tag}", i64::MIN), token, now, false),
            (String::new(), token, now, false),
        ];
        for (value, digest, at, want) in cases {
            assert_eq!(valid(&value, &digest, at), want, "{value} at {at}");
        }
    }

    #[test]
    fn cookies() {
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, "a=b; tollgate_session=x.y".parse().unwrap());
        assert_eq!(from_request(&headers), Some("x.y"));
        headers.insert("x-forwarded-proto", "HTTPS, http".parse().unwrap());
        assert!(over_https(&headers));
        assert_eq!(
            set_cookie(Some("v"), true),
            "tollgate_session=v; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=43200; Secure"
        );
        assert_eq!(set_cookie(None, false), "tollgate_session=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0");
    }
}
