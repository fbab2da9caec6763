//! Where a request's credential is found, and whether it is an API key or a JWT.
//!
//! Clients disagree on where keys go (OpenAI SDKs send `Authorization: Bearer`, Kuadrant
//! `APIKEY`, Kong and APISIX `apikey`), so the places are a configured, ordered list.
//! The same `Bearer` header carries both keys and JWTs, so the value's shape decides:
//! a JWT has a base64url JSON header naming an `alg`, which no random API key has.
//! A matched but empty value is still reported, so the caller answers "invalid"
//! rather than "missing", which is the more useful hint for a client with an unset key.

use crate::jwt::looks_like_jwt;

/// One place a credential may be: a header, and the scheme prefix its value starts with.
#[derive(Debug, Clone, serde::Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CredentialSource {
    pub header: String,
    #[serde(default)]
    pub prefix: Option<String>,
}

impl CredentialSource {
    fn new(header: &str, prefix: Option<&str>) -> Self {
        Self { header: header.to_string(), prefix: prefix.map(str::to_string) }
    }
}

/// The sources used when the configuration lists none, in priority order.
pub fn default_sources() -> Vec<CredentialSource> {
    vec![
        CredentialSource::new("authorization", Some("Bearer ")),
        CredentialSource::new("authorization", Some("APIKEY ")),
        CredentialSource::new("x-api-key", None),
        CredentialSource::new("apikey", None),
    ]
}

/// Checks configured sources and returns them normalised (lowercase header names,
/// an empty prefix treated as none).
pub fn validate_sources(sources: &[CredentialSource]) -> Result<Vec<CredentialSource>, String> {
    if sources.is_empty() {
        return Err("sources: must list at least one source (omit it for the defaults)".to_string());
    }
    sources
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let header = s.header.to_ascii_lowercase();
            check_header_name(&header).map_err(|r| format!("sources[{i}].header: {r}"))?;
            let prefix = match s.prefix.as_deref() {
                None | Some("") => None,
                Some(p) => {
                    check_prefix(p).map_err(|r| format!("sources[{i}].prefix: {r}"))?;
                    Some(p.to_string())
                }
            };
            Ok(CredentialSource { header, prefix })
        })
        .collect()
}

fn check_header_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        Err("must not be empty")
    } else if name.starts_with(':') {
        Err("pseudo-headers cannot carry credentials")
    } else if !name.bytes().all(is_tchar) {
        Err("must be a header name (letters, digits and !#$%&'*+-.^_`|~, no spaces)")
    } else {
        Ok(())
    }
}

fn check_prefix(prefix: &str) -> Result<(), &'static str> {
    if prefix.starts_with(char::is_whitespace) {
        Err("must not start with whitespace (values are trimmed)")
    } else if prefix.chars().any(char::is_control) {
        Err("must not contain control characters")
    } else {
        Ok(())
    }
}

/// RFC 9110 token characters.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A credential found in the request, borrowed from the header value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential<'a> {
    ApiKey(&'a str),
    Jwt(&'a str),
}

/// The first credential found, trying `sources` in order. `headers` are
/// (lowercase name, value) pairs as Envoy hands them over.
pub fn find_credential<'a, K: AsRef<str>, V: AsRef<str>>(
    headers: &'a [(K, V)],
    sources: &[CredentialSource],
) -> Option<Credential<'a>> {
    find_credential_value(headers, sources).map(classify)
}

/// The credential's raw value, not yet classified (lets the caller consult its cache of
/// verified tokens before the JWT shape check, which decodes and parses the header).
pub fn find_credential_value<'a, K: AsRef<str>, V: AsRef<str>>(
    headers: &'a [(K, V)],
    sources: &[CredentialSource],
) -> Option<&'a str> {
    sources.iter().find_map(|source| {
        headers.iter().filter(|(name, _)| name.as_ref().eq_ignore_ascii_case(&source.header)).find_map(|(_, value)| {
            match source.prefix.as_deref() {
                Some(prefix) => strip_scheme(value.as_ref(), prefix),
                None => Some(value.as_ref().trim()),
            }
        })
    })
}

/// JWT when the value has the JWT shape, else an API key.
pub fn classify(value: &str) -> Credential<'_> {
    if looks_like_jwt(value) {
        Credential::Jwt(value)
    } else {
        Credential::ApiKey(value)
    }
}

/// The value after a case-insensitive `prefix`. A value that is the scheme alone
/// ("Bearer", its trailing space trimmed away by the proxy) yields "".
fn strip_scheme<'a>(value: &'a str, prefix: &str) -> Option<&'a str> {
    let value = value.trim();
    if let Some(head) = value.get(..prefix.len()) {
        if head.eq_ignore_ascii_case(prefix) {
            return value.get(prefix.len()..).map(str::trim);
        }
    }
    let scheme = prefix.trim_end();
    (scheme.len() < prefix.len() && value.eq_ignore_ascii_case(scheme)).then_some("")
}

#[cfg(test)]
mod tests {
    // Under wasm-bindgen-test the same tests run compiled to wasm32 (see `make test-wasm`).
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;
    use Credential::{ApiKey, Jwt};

    // The Istio dev guide token; its header is {"alg":"HS256","typ":"JWT","kid":"dev-key"}.
    const JWT: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCIsImtpZCI6ImRldi1rZXkifQ.eyJpc3MiOiJkZXYiLCJzdWIiOiJkZXYtdXNlciJ9.S6AKJ6CRs5nbrhHPshc2KnikNkjLp9isg6xlR4kSecQ";

    type Headers<'a> = &'a [(&'a str, &'a str)];

    fn owned(pairs: Headers) -> Vec<(String, String)> {
        pairs.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
    }

    fn src(header: &str, prefix: Option<&str>) -> CredentialSource {
        CredentialSource::new(header, prefix)
    }

    #[test]
    fn defaults_are_the_documented_list() {
        #[rustfmt::skip]
        let want = vec![
            src("authorization", Some("Bearer ")),
            src("authorization", Some("APIKEY ")),
            src("x-api-key", None),
            src("apikey", None),
        ];
        assert_eq!(default_sources(), want);
        assert_eq!(validate_sources(&want).unwrap(), want);
    }

    #[test]
    fn find_with_default_sources() {
        let bearer_jwt = format!("Bearer {JWT}");
        #[rustfmt::skip]
        let cases: &[(Headers, Option<Credential>)] = &[
            (&[("authorization", "Bearer sk-1")], Some(ApiKey("sk-1"))),
            (&[("authorization", "bearer sk-1")], Some(ApiKey("sk-1"))),
            (&[("authorization", "BEARER   sk-1  ")], Some(ApiKey("sk-1"))),
            (&[("authorization", "APIKEY sk-2")], Some(ApiKey("sk-2"))),
            (&[("authorization", "ApiKey sk-2")], Some(ApiKey("sk-2"))),
            (&[("x-api-key", "sk-3")], Some(ApiKey("sk-3"))),
            (&[("x-api-key", " sk-3 ")], Some(ApiKey("sk-3"))),
            (&[("apikey", "sk-4")], Some(ApiKey("sk-4"))),
            (&[("authorization", &bearer_jwt)], Some(Jwt(JWT))),
            (&[("authorization", &format!("APIKEY {JWT}"))], Some(Jwt(JWT))),
            (&[("x-api-key", JWT)], Some(Jwt(JWT))),
            // Found but empty: the caller answers "invalid", not "missing".
            (&[("authorization", "Bearer ")], Some(ApiKey(""))),
            (&[("authorization", "Bearer")], Some(ApiKey(""))),
            (&[("x-api-key", "")], Some(ApiKey(""))),
            (&[("apikey", "  ")], Some(ApiKey(""))),
            // Not a configured scheme or header: nothing found.
            (&[("authorization", "Basic dXNlcjpwYXNz")], None),
            (&[("authorization", "Bearersk-1")], None),
            (&[("authorization", "sk-1")], None),
            (&[("proxy-authorization", "Bearer sk-1")], None),
            (&[("content-type", "application/json")], None),
            (&[], None),
            // Precedence follows the source order, not the header order.
            (&[("apikey", "sk-4"), ("x-api-key", "sk-3")], Some(ApiKey("sk-3"))),
            (&[("x-api-key", "sk-3"), ("authorization", "APIKEY sk-2")], Some(ApiKey("sk-2"))),
            (&[("authorization", "APIKEY sk-2"), ("authorization", "Bearer sk-1")], Some(ApiKey("sk-1"))),
            (&[("authorization", "Basic x"), ("x-api-key", "sk-3")], Some(ApiKey("sk-3"))),
            // Within a source, the first matching header wins.
            (&[("x-api-key", "sk-a"), ("x-api-key", "sk-b")], Some(ApiKey("sk-a"))),
            (&[("authorization", "Basic x"), ("authorization", "Bearer sk-1")], Some(ApiKey("sk-1"))),
            // An empty match does not fall through to later sources.
            (&[("authorization", "Bearer"), ("x-api-key", "sk-3")], Some(ApiKey(""))),
        ];
        let sources = default_sources();
        for (headers, want) in cases {
            assert_eq!(find_credential(&owned(headers), &sources), *want, "{headers:?}");
        }
    }

    #[test]
    fn jwt_shape_decides_the_kind() {
        #[rustfmt::skip]
        let cases: &[(&str, bool)] = &[
            (JWT, true),
            ("eyJhbGciOiJub25lIn0.e30.", true),       // {"alg":"none"}, no signature: refused later
            ("eyJhbGciOiJub25lIn0..", true),          // empty payload and signature
            ("eyJhbGciOiJIUzI1NiJ9", false),          // one segment
            ("eyJhbGciOiJIUzI1NiJ9.e30", false),      // two segments
            ("eyJhbGciOiJIUzI1NiJ9.e30.x.y", false),  // four segments
            ("eyJ0eXAiOiJKV1QifQ.e30.sig", false),    // {"typ":"JWT"}: no alg
            ("e30.e30.sig", false),                   // {}
            ("WzFd.e30.sig", false),                  // [1]
            (".e30.sig", false),
            ("sk-live.abc.def", false),
            ("sk-abc", false),
            ("eyJhbGciOiJIUzI1NiJ9.e30.a+b", false),  // standard alphabet
            ("", false),
        ];
        for (value, want) in cases {
            let got = matches!(classify(value), Jwt(_));
            assert_eq!(got, *want, "{value:?}");
        }
    }

    #[test]
    fn custom_sources() {
        let sources = validate_sources(&[src("X-Tenant-Key", None), src("Authorization", Some("Token "))]).unwrap();
        assert_eq!(sources, vec![src("x-tenant-key", None), src("authorization", Some("Token "))]);
        #[rustfmt::skip]
        let cases: &[(Headers, Option<Credential>)] = &[
            (&[("x-tenant-key", "t1")], Some(ApiKey("t1"))),
            (&[("authorization", "token t2")], Some(ApiKey("t2"))),
            (&[("authorization", "Bearer t3")], None),
            (&[("x-api-key", "t4")], None),
        ];
        for (headers, want) in cases {
            assert_eq!(find_credential(&owned(headers), &sources), *want, "{headers:?}");
        }
    }

    #[test]
    fn validate_normalises_and_refuses() {
        let ok = validate_sources(&[src("X-API-KEY", Some(""))]).unwrap();
        assert_eq!(ok, vec![src("x-api-key", None)]);

        #[rustfmt::skip]
        let cases: Vec<(Vec<CredentialSource>, &str)> = vec![
            (vec![], "sources: must list at least one"),
            (vec![src("x-api-key", None), src("", None)], "sources[1].header: must not be empty"),
            (vec![src(":authority", None)], "sources[0].header: pseudo-headers"),
            (vec![src("x api key", None)], "sources[0].header: must be a header name"),
            (vec![src("x-api-key:", None)], "sources[0].header: must be a header name"),
            (vec![src("x-äpi", None)], "sources[0].header: must be a header name"),
            (vec![src("authorization", Some(" Bearer"))], "sources[0].prefix: must not start with whitespace"),
            (vec![src("authorization", Some("Bearer\t"))], "sources[0].prefix: must not contain control"),
        ];
        for (sources, want) in cases {
            let err = validate_sources(&sources).unwrap_err();
            assert!(err.starts_with(want), "got {err:?}, want prefix {want:?}");
        }
    }

    #[test]
    fn source_json_is_strict() {
        let s: CredentialSource = serde_json::from_str(r#"{"header":"apikey"}"#).unwrap();
        assert_eq!(s, src("apikey", None));
        let unknown = serde_json::from_str::<CredentialSource>(r#"{"header":"apikey","scheme":"x"}"#);
        assert!(unknown.is_err());
    }
}
