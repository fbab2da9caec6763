//! The edge: every domain error becomes an HTTP status and an OpenAI-style error
//! body, so OpenAI SDKs show a useful message and pick the right exception class.
//! Bodies never echo the credential.

use crate::auth::AuthError;
use crate::limits::{format_reset, Headroom, LimitError};

/// A response the filter sends itself instead of forwarding the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// `{"error": {"message", "type", "param": null, "code"}}` as the OpenAI API sends it.
pub fn openai_error_body(message: &str, kind: &str, code: &str) -> String {
    serde_json::json!({"error": {"message": message, "type": kind, "param": null, "code": code}}).to_string()
}

impl From<&AuthError> for LocalReply {
    fn from(error: &AuthError) -> Self {
        if *error == AuthError::InvalidToken(crate::jwt::JwtError::KeysUnavailable) {
            return LocalReply::jwks_unavailable();
        }
        let (status, message, code) = match error {
            AuthError::MissingCredential => (
                401,
                "Missing credentials. Send an API key as 'Authorization: Bearer <key>' or a JWT.".to_string(),
                "invalid_api_key",
            ),
            AuthError::InvalidApiKey => (401, "Incorrect API key provided.".to_string(), "invalid_api_key"),
            AuthError::InvalidToken(e) => (401, format!("Invalid token: {}.", e.message()), "invalid_api_key"),
            AuthError::GroupNotAllowed => (
                403,
                "You are not allowed to use this API: none of your groups is allowed.".to_string(),
                "permission_denied",
            ),
        };
        let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
        if status == 401 {
            let challenge = match error {
                AuthError::MissingCredential => r#"Bearer realm="tollgate""#,
                _ => r#"Bearer realm="tollgate", error="invalid_token""#,
            };
            headers.push(("www-authenticate".to_string(), challenge.to_string()));
        }
        LocalReply { status, headers, body: openai_error_body(&message, "invalid_request_error", code) }
    }
}

/// The `x-ratelimit-*` headers OpenAI clients read, for the tightest limits.
pub fn ratelimit_headers(h: &Headroom) -> Vec<(&'static str, String)> {
    const NAMES: [[&str; 3]; 2] = [
        ["x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"],
        ["x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"],
    ];
    let mut out = Vec::with_capacity(6);
    for ([limit, remaining, reset], counter) in NAMES.into_iter().zip([h.requests, h.tokens]) {
        if let Some(c) = counter {
            out.push((limit, c.limit.to_string()));
            out.push((remaining, c.remaining.to_string()));
            out.push((reset, format_reset(c.reset_ms)));
        }
    }
    out
}

impl LocalReply {
    /// 503 for a request whose limits could not be checked (`limits.on_contention:
    /// deny`): the limit state is busy or unavailable; retrying in a second is safe.
    pub fn limit_unavailable() -> LocalReply {
        LocalReply::retry_in_a_second(
            "Your rate limits could not be checked right now. Please retry in a second.",
            "limit_unavailable",
        )
    }

    /// A 503 `server_error` with `code` and `retry-after: 1`.
    fn retry_in_a_second(message: &str, code: &str) -> LocalReply {
        LocalReply {
            status: 503,
            headers: vec![
                ("content-type".to_string(), "application/json".to_string()),
                ("retry-after".to_string(), "1".to_string()),
            ],
            body: openai_error_body(message, "server_error", code),
        }
    }

    /// 503 for an API key that could not be checked: the key service is unavailable or
    /// too many lookups are under way (`api_keys.remote`). Fail closed, and say nothing
    /// of whether the key is right.
    pub fn key_service_unavailable() -> LocalReply {
        LocalReply::retry_in_a_second(
            "Your API key could not be checked right now. Please retry in a second.",
            "key_service_unavailable",
        )
    }

    /// 503 for a token whose issuer's keys are fetched (`remote_jwks`) and cannot be
    /// used now: not fetched yet, or the last good set is older than `max_age_seconds`.
    /// Fail closed; the token may well be good.
    pub fn jwks_unavailable() -> LocalReply {
        LocalReply::retry_in_a_second(
            "Your token could not be checked right now: its issuer's keys are unavailable. Please retry in a second.",
            "jwks_unavailable",
        )
    }

    /// 400 for a JSON body in UTF-16 or UTF-32 on a metered route (JSON between
    /// systems is UTF-8, RFC 8259; the OpenAI API reads nothing else).
    pub fn body_not_utf8() -> LocalReply {
        LocalReply {
            status: 400,
            headers: vec![("content-type".to_string(), "application/json".to_string())],
            body: openai_error_body(
                "The request body must be JSON encoded as UTF-8.",
                "invalid_request_error",
                "invalid_encoding",
            ),
        }
    }

    /// 400 for a request with trailers whose body the filter had to rewrite or pad
    /// (its `content-length` was already promised upstream).
    pub fn trailers_not_supported() -> LocalReply {
        LocalReply {
            status: 400,
            headers: vec![("content-type".to_string(), "application/json".to_string())],
            body: openai_error_body(
                "Request trailers are not supported on this route.",
                "invalid_request_error",
                "trailers_not_supported",
            ),
        }
    }
}

impl From<&LimitError> for LocalReply {
    fn from(error: &LimitError) -> Self {
        let (message, code, retry_ms, headroom, retry) = match error {
            LimitError::RateLimited { kind, retry_after_ms, headroom } => (
                format!(
                    "Rate limit reached for {}. Please try again in {}.",
                    kind.as_str(),
                    format_reset(*retry_after_ms)
                ),
                "rate_limit_exceeded",
                *retry_after_ms,
                headroom,
                true,
            ),
            LimitError::QuotaExceeded { kind, retry_after_ms, headroom } => (
                format!(
                    "You exceeded your current quota of {}. It resets in {}.",
                    kind.as_str(),
                    format_reset(*retry_after_ms)
                ),
                "insufficient_quota",
                *retry_after_ms,
                headroom,
                false,
            ),
        };
        let kind = match error {
            LimitError::RateLimited { kind, .. } | LimitError::QuotaExceeded { kind, .. } => kind.as_str(),
        };
        let mut headers = vec![
            ("content-type".to_string(), "application/json".to_string()),
            ("retry-after".to_string(), retry_ms.div_ceil(1000).max(1).to_string()),
        ];
        if !retry {
            headers.push(("x-should-retry".to_string(), "false".to_string()));
        }
        headers.extend(ratelimit_headers(headroom).into_iter().map(|(k, v)| (k.to_string(), v)));
        let body =
            serde_json::json!({"error": {"message": message, "type": kind, "param": null, "code": code}}).to_string();
        LocalReply { status: 429, headers, body }
    }
}

#[cfg(test)]
mod tests {
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::limits::{Counter, LimitKind};

    #[test]
    fn limit_replies() {
        let headroom = Headroom { requests: Some(Counter { limit: 5, remaining: 0, reset_ms: 60_000 }), tokens: None };
        let cases = [
            (
                LimitError::RateLimited { kind: LimitKind::Requests, retry_after_ms: 11_500, headroom },
                "rate_limit_exceeded",
                "requests",
                "12",
                None,
            ),
            (
                LimitError::QuotaExceeded { kind: LimitKind::Tokens, retry_after_ms: 400, headroom },
                "insufficient_quota",
                "tokens",
                "1",
                Some("false"),
            ),
        ];
        for (error, code, kind, retry_after, should_retry) in cases {
            let r = LocalReply::from(&error);
            assert_eq!(r.status, 429);
            let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
            assert_eq!(v["error"]["code"], code);
            assert_eq!(v["error"]["type"], kind);
            let get = |name: &str| r.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
            assert_eq!(get("retry-after"), Some(retry_after));
            assert_eq!(get("x-should-retry"), should_retry);
            assert_eq!(get("x-ratelimit-limit-requests"), Some("5"));
            assert_eq!(get("x-ratelimit-remaining-requests"), Some("0"));
            assert_eq!(get("x-ratelimit-reset-requests"), Some("1m0s"));
        }
    }
}
