#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code: a panic is a failed test
//! Authentication and authorization through real Envoy: every credential source,
//! the OpenAI-format 401/403, identity headers set and smuggled ones removed, the
//! credential stripped (or forwarded when configured), keys and JWKS from the VM's
//! environment as Istio's `vmConfig.env` would set them, and the `openai` client.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use tollgate_e2e::*;

fn error_of(resp: reqwest::blocking::Response) -> (u16, reqwest::header::HeaderMap, Value) {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.json().unwrap())
}

#[test]
fn every_credential_source_authenticates() {
    let creds = DevCredentials::generate();
    let stack = start("auth-sources", &creds, json!({}));
    let key = creds.api_key.as_str();
    let token = creds.token(600).unwrap();
    let cases: Vec<(&str, String, String, &str)> = vec![
        ("bearer key", "authorization".into(), format!("Bearer {key}"), "dev-user"),
        ("bearer key, lower-case scheme", "authorization".into(), format!("bearer {key}"), "dev-user"),
        ("APIKEY scheme", "authorization".into(), format!("APIKEY {key}"), "dev-user"),
        ("x-api-key", "x-api-key".into(), key.to_string(), "dev-user"),
        ("X-Api-Key mixed case", "X-Api-Key".into(), key.to_string(), "dev-user"),
        ("X-API-KEY upper case", "X-API-KEY".into(), key.to_string(), "dev-user"),
        ("apikey", "apikey".into(), key.to_string(), "dev-user"),
        ("ApiKey mixed case", "ApiKey".into(), key.to_string(), "dev-user"),
        ("Authorization title case", "Authorization".into(), format!("Bearer {key}"), "dev-user"),
        ("bearer jwt", "authorization".into(), format!("Bearer {token}"), "jwt-user"),
    ];
    // Over a raw socket: the header names go on the wire exactly as written above
    // (reqwest would lowercase them).
    let body = chat_body(2, 2, false).to_string();
    for (name, header, value, user) in cases {
        let headers = [(header.as_str(), value.as_str()), ("Content-Type", "application/json")];
        let resp = raw_request(&stack.gateway_url, "POST", "/v1/chat/completions", &headers, body.as_bytes());
        assert_eq!(resp.status, 200, "{name}: {}", String::from_utf8_lossy(&resp.body));
        let seen = resp.received_headers();
        assert_eq!(seen.get("x-tollgate-user").map(String::as_str), Some(user), "{name}");
        assert_eq!(seen.get("x-tollgate-groups").map(String::as_str), Some("premium"), "{name}");
        // Stripped before the upstream (forward_credentials is false by default).
        for h in ["authorization", "x-api-key", "apikey"] {
            assert!(!seen.contains_key(h), "{name}: credential header {h} reached the upstream");
        }
    }
    // Decisions are logged, credentials never.
    let log = stack.envoy_log();
    assert!(log.contains("ALLOW user=dev-user groups=premium path=/v1/chat/completions"), "no ALLOW line");
    assert!(!log.contains(key) && !log.contains(&token), "a credential reached the log");
}

#[test]
fn denials_speak_the_openai_error_format() {
    let creds = DevCredentials::generate();
    let other = DevCredentials::generate();
    let stack = start("auth-denials", &creds, json!({}));
    let expired = dev::mint_jwt(
        creds.jwt_secret.as_bytes(),
        Some("dev-key"),
        &json!({"iss": "dev", "sub": "x", "exp": 1_000_000_000u64}),
    )
    .unwrap();
    let wrong_key = other.token(600).unwrap();
    type Case<'a> = (&'a str, Vec<(&'a str, String)>, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("no credential", vec![], 401, "invalid_api_key"),
        ("unknown key", vec![("authorization", format!("Bearer {}", other.api_key))], 401, "invalid_api_key"),
        ("empty bearer", vec![("authorization", "Bearer ".into())], 401, "invalid_api_key"),
        ("expired jwt", vec![("authorization", format!("Bearer {expired}"))], 401, "invalid_api_key"),
        ("jwt signed by another key", vec![("authorization", format!("Bearer {wrong_key}"))], 401, "invalid_api_key"),
    ];
    for (name, headers, status, code) in cases {
        let hdrs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (got, resp_headers, body) = error_of(chat(&stack, &hdrs, &chat_body(1, 1, false)));
        assert_eq!(got, status, "{name}: {body}");
        assert_eq!(body["error"]["code"], code, "{name}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{name}");
        assert!(body["error"]["param"].is_null(), "{name}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{name}");
        let challenge = resp_headers.get("www-authenticate").map(|v| v.to_str().unwrap().to_string());
        assert!(
            challenge.as_deref().is_some_and(|c| c.starts_with(r#"Bearer realm="tollgate""#)),
            "{name}: {challenge:?}"
        );
        assert!(resp_headers.get("x-mock-received-headers").is_none(), "{name}: reached the upstream");
        for (_, v) in &headers {
            let secret = v.trim_start_matches("Bearer ").trim();
            if !secret.is_empty() {
                assert!(!body.to_string().contains(secret), "{name}: body echoes the credential");
            }
        }
    }
}

#[test]
fn groups_are_authorized() {
    let creds = DevCredentials::generate();
    let free_key = dev::new_api_key();
    let none_key = dev::new_api_key();
    let mut config = creds.plugin_config();
    config["api_keys"]["keys"]
        .as_array_mut()
        .unwrap()
        .extend([dev::key_entry(&free_key, "freebie", &["free".to_string()]), dev::key_entry(&none_key, "loner", &[])]);
    config["authorization"] = json!({"allowed_groups": ["premium", "free"]});
    config["api_keys"]["keys"][0]["groups"] = json!(["staff"]);
    let stack =
        Stack::start(StackOptions { plugin_config: config, label: "auth-groups".into(), ..StackOptions::default() })
            .unwrap();
    let cases = [(free_key.as_str(), 200u16), (none_key.as_str(), 403), (creds.api_key.as_str(), 403)];
    for (key, status) in cases {
        let resp = chat(&stack, &[("authorization", &format!("Bearer {key}"))], &chat_body(1, 1, false));
        assert_eq!(resp.status().as_u16(), status);
        if status == 403 {
            let body: Value = resp.json().unwrap();
            assert_eq!(body["error"]["code"], "permission_denied");
        }
    }
}

#[test]
fn smuggled_identity_headers_are_removed_and_credentials_forwarded_only_when_configured() {
    let creds = DevCredentials::generate();
    let stack = start("auth-smuggle", &creds, json!({}));
    // Over a raw socket, so the smuggled names reach Envoy mixed-case and repeated,
    // byte for byte (reqwest would lowercase them).
    let body = chat_body(1, 1, false).to_string();
    let bearer = format!("Bearer {}", creds.api_key);
    let smuggled = [
        ("X-TollGate-User", "evil"),
        ("x-tollgate-user", "evil2"),
        ("X-TOLLGATE-GROUPS", "evil-admins"),
        ("x-Tollgate-Groups", "evil-root"),
    ];
    let mut headers = vec![("Authorization", bearer.as_str()), ("Content-Type", "application/json")];
    headers.extend(smuggled);
    let resp = raw_request(&stack.gateway_url, "POST", "/v1/chat/completions", &headers, body.as_bytes());
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let seen = resp.received_headers();
    // Exactly the real identity: a smuggled value left beside it would show as "…, evil".
    assert_eq!(seen.get("x-tollgate-user").map(String::as_str), Some("dev-user"), "{seen:?}");
    assert_eq!(seen.get("x-tollgate-groups").map(String::as_str), Some("premium"), "{seen:?}");
    assert!(!seen.values().any(|v| v.contains("evil")), "a smuggled value reached the upstream: {seen:?}");

    // A denied request with smuggled identity never reaches the upstream at all.
    let mut headers = vec![("Content-Type", "application/json")];
    headers.extend(smuggled);
    let resp = raw_request(&stack.gateway_url, "POST", "/v1/chat/completions", &headers, body.as_bytes());
    assert_eq!(resp.status, 401);
    assert!(resp.header("x-mock-received-headers").is_none(), "a denied request reached the upstream");

    let fwd = start("auth-forward", &creds, json!({"forward_credentials": true}));
    let resp = chat(&fwd, &[("authorization", &format!("Bearer {}", creds.api_key))], &chat_body(1, 1, false));
    assert_eq!(resp.status(), 200);
    let seen = received_headers(&resp);
    assert_eq!(seen.get("authorization"), Some(&format!("Bearer {}", creds.api_key)));
}

#[test]
fn keys_and_jwks_from_the_vm_environment() {
    let creds = DevCredentials::generate();
    let mut env = BTreeMap::new();
    let keys = json!([dev::key_entry(&creds.api_key, "env-user", &["free".to_string()])]);
    env.insert("TOLLGATE_API_KEYS".to_string(), keys.to_string());
    env.insert("TOLLGATE_JWKS".to_string(), dev::jwks(creds.jwt_secret.as_bytes(), Some("dev-key")));
    let stack = Stack::start(StackOptions {
        plugin_config: json!({
            "api_keys": {"keys_env": "TOLLGATE_API_KEYS"},
            "jwt": {"providers": [{"issuer": "dev", "jwks_env": "TOLLGATE_JWKS"}]}
        }),
        vm_env: env,
        label: "auth-env".into(),
        ..StackOptions::default()
    })
    .unwrap();
    let resp = chat(&stack, &[("x-api-key", &creds.api_key)], &chat_body(1, 1, false));
    assert_eq!(resp.status(), 200);
    assert_eq!(received_headers(&resp).get("x-tollgate-user").map(String::as_str), Some("env-user"));
    let token = creds.token(600).unwrap();
    let resp = chat(&stack, &[("authorization", &format!("Bearer {token}"))], &chat_body(1, 1, false));
    assert_eq!(resp.status(), 200);

    // The variable missing: Envoy refuses the config, naming the field.
    let err = Stack::start(StackOptions {
        plugin_config: json!({"api_keys": {"keys_env": "TOLLGATE_API_KEYS"}}),
        label: "auth-env-missing".into(),
        ..StackOptions::default()
    })
    .err()
    .unwrap();
    assert!(format!("{err:#}").contains("api_keys.keys_env"), "{err:#}");
}

#[test]
fn openai_client_errors_on_bad_key() {
    let creds = DevCredentials::generate();
    let stack = start("auth-openai", &creds, json!({}));
    let (ok, out) = openai_smoke(&stack.gateway_url, "sk-not-a-real-key", &["--expect-error", "401"]);
    assert!(ok, "{out}");
    assert!(!out.contains("sk-not-a-real-key"), "the error echoes the key: {out}");
}
