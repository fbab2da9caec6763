#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code: a panic is a failed test
//! The gateway as Istio runs it (`StackOptions { istio_shaped: true }`): the filter
//! delivered by ECDS under Istio's names, its config in Go-jsonpb bytes, the VM env
//! through `host_env_keys`, FAIL_RELOAD, log level `warning`, and the neighbours
//! `jwt_authn` (a RequestAuthentication for the same issuer), `cors` and — in the last
//! test — llm-d's InferencePool `ext_proc`. The auth flows work as on the static
//! gateway, a config pushed live takes effect when the push returns, a config the filter
//! refuses is rejected by Envoy and leaves the old one in force, and bodies rewritten by
//! Tollgate survive an ext_proc that streams them.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use harness::envoy::{CORS_ORIGIN, LOCAL_USAGE_CLUSTER};
use harness::jsonpb;
use serde_json::{json, Value};
use tollgate_e2e::*;

fn bearer(v: &str) -> String {
    format!("Bearer {v}")
}

fn usage() -> Value {
    json!({"cluster": LOCAL_USAGE_CLUSTER, "flush_interval_ms": 200, "timeout_ms": 1000})
}

#[test]
fn istio_shaped_gateway_serves_the_auth_flows_with_jsonpb_config() {
    let creds = DevCredentials::generate();
    // Keys and the JWKS from the VM env (host_env_keys), as the bundle does; a credential
    // source whose prefix Go-jsonpb escapes (`<`, `>`, `&` arrive as \u003c \u003e \u0026);
    // numbers Istio turns into float64.
    let keys = json!([dev::key_entry(&creds.api_key, &creds.user, &creds.groups)]).to_string();
    let jwks = dev::jwks(creds.jwt_secret.as_bytes(), Some(&creds.kid));
    let vm_env = BTreeMap::from([("TOLLGATE_API_KEYS".to_string(), keys), ("TOLLGATE_JWKS".to_string(), jwks)]);
    let config = json!({
        "api_keys": {"keys_env": "TOLLGATE_API_KEYS", "sources": [
            {"header": "authorization", "prefix": "Bearer "},
            {"header": "x-odd-key", "prefix": "K<&> "}
        ]},
        "jwt": {"providers": [{"issuer": creds.issuer, "jwks_env": "TOLLGATE_JWKS", "clock_skew_seconds": 60}]},
        "usage": usage()
    });
    let bytes = jsonpb::encode(&config);
    assert!(bytes.contains(r#""prefix":"K\u003c\u0026\u003e ""#), "{bytes}");
    let stack = Stack::start(StackOptions {
        plugin_config: config,
        vm_env,
        local_usage: false,
        istio_shaped: true,
        // The bytes compared below are exactly this config's (no token_env added).
        ingest_token: false,
        label: "istio-shaped-auth".into(),
        ..StackOptions::default()
    })
    .unwrap();

    // Delivered by ECDS under Istio's name, the Wasm plugin named <ns>.<name>.
    let shape = stack.istio().unwrap();
    assert_eq!(shape.resource_name(), "extensions.istio.io/wasmplugin/llm-d.tollgate");
    let stats = client().get(format!("{}/stats", stack.admin_url)).send().unwrap().text().unwrap();
    assert!(stats.contains(&format!("{}version_text: \"1\"", shape.stat_prefix())), "{stats}");
    let dump = client()
        .get(format!("{}/config_dump", stack.admin_url))
        .query(&[("resource", "ecds_filters")])
        .send()
        .unwrap()
        .text()
        .unwrap();
    let dump: Value = serde_json::from_str(&dump).unwrap();
    let wasm = dump["configs"][0]["ecds_filter"]["typed_config"]["config"].clone();
    assert_eq!(wasm["name"], "llm-d.tollgate", "{dump}");
    assert_eq!(wasm["root_id"], "tollgate");
    assert_eq!(wasm["failure_policy"], "FAIL_RELOAD");
    assert_eq!(wasm["configuration"]["value"], bytes.as_str(), "Envoy holds the jsonpb bytes");
    assert_eq!(
        wasm["vm_config"]["environment_variables"]["host_env_keys"],
        json!(["TOLLGATE_API_KEYS", "TOLLGATE_JWKS"])
    );

    // API key: identity upstream, the key stripped (so jwt_authn after Tollgate sees no token).
    let resp = chat(&stack, &[("authorization", &bearer(&creds.api_key))], &chat_body(3, 2, false));
    assert_eq!(resp.status(), 200);
    let seen = received_headers(&resp);
    assert_eq!(seen.get("x-tollgate-user"), Some(&creds.user));
    assert!(!seen.contains_key("authorization"));
    // The source whose prefix went through the \u escapes.
    let odd = format!("K<&> {}", creds.api_key);
    assert_eq!(chat(&stack, &[("x-odd-key", &odd)], &chat_body(1, 1, false)).status(), 200);
    // JWT from the env JWKS.
    let token = creds.token(600).unwrap();
    let resp = chat(&stack, &[("authorization", &bearer(&token))], &chat_body(2, 2, false));
    assert_eq!(resp.status(), 200);
    assert_eq!(received_headers(&resp).get("x-tollgate-user"), Some(&creds.jwt_user));
    // No credential, a wrong key: Tollgate's 401 (in the OpenAI format).
    let resp = chat(&stack, &[], &chat_body(1, 1, false));
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.json::<Value>().unwrap()["error"]["code"], "invalid_api_key");
    assert_eq!(chat(&stack, &[("authorization", "Bearer tg-wrong")], &chat_body(1, 1, false)).status(), 401);

    // Usage arrives; Istio's proxy log level hides the filter's info lines.
    wait_metric(&stack, "llm_requests_total", &[("user", &creds.user)], 2.0);
    wait_metric(&stack, "llm_requests_total", &[("user", &creds.jwt_user)], 1.0);
    let log = stack.envoy_log();
    assert!(!log.contains("ALLOW user="), "info lines at log level warning:\n{log}");
    assert!(vm_failures(&log).is_empty(), "{log}");

    // A refused config is rejected by Envoy (on_configure false → config_fail) and the
    // old one stays in force.
    let err = stack.push_plugin_config(&json!({"api_keys": {"keys": [], "bogus": 1}, "usage": usage()})).unwrap_err();
    assert!(err.to_string().contains("bogus"), "{err:#}");
    assert_eq!(chat(&stack, &[("authorization", &bearer(&creds.api_key))], &chat_body(1, 1, false)).status(), 200);

    // An empty pluginConfig is 0 bytes: nothing configured, everything denied (fail closed).
    stack.push_plugin_config(&json!({})).unwrap();
    assert_eq!(chat(&stack, &[("authorization", &bearer(&creds.api_key))], &chat_body(1, 1, false)).status(), 401);
    assert_eq!(chat(&stack, &[("authorization", &bearer(&token))], &chat_body(1, 1, false)).status(), 401);
}

#[test]
fn a_request_authentication_next_to_tollgate_sees_the_token_only_when_forwarded() {
    // jwt_authn runs after Tollgate with the same issuer (what a RequestAuthentication on
    // the same gateway renders). By default Tollgate strips the credential, so jwt_authn
    // sees no token and lets the request pass; with forward_credentials it verifies the
    // same token again and passes it too. A CORS preflight is answered by the `cors`
    // filter only when Tollgate lets it through (`cors_preflight: "allow"`).
    let creds = DevCredentials::generate();
    let stack = start_with(
        "istio-shaped-neighbours",
        &creds,
        json!({}),
        StackOptions { istio_shaped: true, ..StackOptions::default() },
    );
    let token = creds.token(600).unwrap();
    let resp = chat(&stack, &[("authorization", &bearer(&token))], &chat_body(1, 1, false));
    assert_eq!(resp.status(), 200);
    assert!(!received_headers(&resp).contains_key("authorization"));

    let mut forwarding = creds.plugin_config();
    forwarding["forward_credentials"] = json!(true);
    stack.push_plugin_config(&forwarding).unwrap();
    let resp = chat(&stack, &[("authorization", &bearer(&token))], &chat_body(1, 1, false));
    assert_eq!(resp.status(), 200);
    // jwt_authn verified it and (Istio's default, forwardOriginalToken: false) removed it.
    assert!(!received_headers(&resp).contains_key("authorization"), "jwt_authn did not see the token");
    // An API key forwarded as a bearer token is not a JWT: jwt_authn refuses it, as a
    // RequestAuthentication on the same gateway would.
    let resp = chat(&stack, &[("authorization", &bearer(&creds.api_key))], &chat_body(1, 1, false));
    assert_eq!(resp.status(), 401);
    assert!(resp.text().unwrap().contains("Jwt"), "jwt_authn's refusal");
    // The same key in x-api-key is forwarded and jwt_authn ignores it.
    let resp = chat(&stack, &[("x-api-key", &creds.api_key)], &chat_body(1, 1, false));
    assert_eq!(resp.status(), 200);
    assert_eq!(received_headers(&resp).get("x-api-key"), Some(&creds.api_key));

    let preflight = || {
        client()
            .request(reqwest::Method::OPTIONS, format!("{}/v1/chat/completions", stack.gateway_url))
            .header("origin", CORS_ORIGIN)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization,content-type")
            .send()
            .unwrap()
    };
    // By default a preflight is a request like any other: Tollgate answers first, 401.
    let denied = preflight();
    assert_eq!(denied.status(), 401, "{denied:?}");
    assert!(!denied.headers().contains_key("access-control-allow-origin"));
    // With cors_preflight "allow" it passes without a credential and Envoy's cors
    // filter after Tollgate answers it.
    let mut cors = creds.plugin_config();
    cors["cors_preflight"] = json!("allow");
    stack.push_plugin_config(&cors).unwrap();
    let answered = preflight();
    assert_eq!(answered.status(), 200, "{answered:?}");
    assert_eq!(
        answered.headers().get("access-control-allow-origin").and_then(|v| v.to_str().ok()),
        Some(CORS_ORIGIN),
        "{answered:?}"
    );
    // And only a preflight: a plain OPTIONS without the CORS headers still needs a key.
    let plain = client()
        .request(reqwest::Method::OPTIONS, format!("{}/v1/chat/completions", stack.gateway_url))
        .send()
        .unwrap();
    assert_eq!(plain.status(), 401);
}

#[test]
fn bodies_rewritten_by_tollgate_survive_a_streaming_ext_proc() {
    let creds = DevCredentials::generate();
    let stack = start_with(
        "istio-shaped-ext-proc",
        &creds,
        json!({}),
        StackOptions { istio_shaped: true, ext_proc: true, ..StackOptions::default() },
    );
    let auth = bearer(&creds.api_key);
    let ext_proc = stack.ext_proc().unwrap();

    // A JSON request Tollgate does not rewrite: the upstream gets the client's bytes.
    let body = chat_body(3, 4, false);
    let sent = serde_json::to_vec(&body).unwrap();
    let resp = client()
        .post(format!("{}/v1/chat/completions", stack.gateway_url))
        .header("authorization", &auth)
        .header("content-type", "application/json")
        .body(sent.clone())
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let plain_sha = resp.headers()["x-mock-received-body-sha256"].to_str().unwrap().to_string();
    let answer: Value = resp.json().unwrap();
    assert_eq!(answer["usage"]["completion_tokens"], 4);
    let plain = eventually(Duration::from_secs(10), "the ext_proc exchange", || ext_proc.exchanges().first().cloned());
    // What Tollgate let through (the same JSON; the bytes are Tollgate's business) is
    // what the ext_proc re-emitted and the upstream got.
    assert_eq!(serde_json::from_slice::<Value>(&plain.request_body).unwrap(), body);
    assert_eq!(dev::sha256_hex(&plain.request_body), plain_sha, "the upstream got another body than ext_proc emitted");

    // A stream that does not ask for usage: Tollgate adds include_usage on the way up
    // (the ext_proc, after it, re-emits that body), and removes the usage-only event on
    // the way down (after the ext_proc re-emitted it): the client sees no usage, the
    // tracker gets the tokens.
    let resp = chat(&stack, &[("authorization", &auth)], &chat_body(2, 5, true));
    assert_eq!(resp.status(), 200);
    let received_sha = resp.headers()["x-mock-received-body-sha256"].to_str().unwrap().to_string();
    let text = resp.text().unwrap();
    assert!(text.contains("data: [DONE]"), "{text}");
    assert!(!text.contains(r#""usage":{"#), "the usage-only event reached a client that did not ask: {text}");
    let exchanges = eventually(Duration::from_secs(10), "both ext_proc exchanges", || {
        let x = ext_proc.exchanges();
        (x.len() >= 2).then_some(x)
    });
    let streamed = exchanges.iter().find(|x| x.request_body.windows(13).any(|w| w == b"\"stream\":true")).unwrap();
    let up = String::from_utf8_lossy(&streamed.request_body).to_string();
    assert!(up.contains("include_usage"), "ext_proc did not see Tollgate's rewrite: {up}");
    assert_eq!(
        dev::sha256_hex(&streamed.request_body),
        received_sha,
        "the upstream got another body than ext_proc emitted"
    );
    let down = String::from_utf8_lossy(&streamed.response_body).to_string();
    assert!(down.contains(r#""usage":{"#), "the model's usage event passed the ext_proc: {down}");
    assert!(exchanges.iter().all(|x| x.request_headers && x.response_headers && x.bad_messages == 0), "{exchanges:?}");

    wait_metric(&stack, "llm_tokens_total", &[("user", &creds.user), ("type", "completion")], 9.0);
    assert!(vm_failures(&stack.envoy_log()).is_empty(), "{}", stack.envoy_log());
}

#[test]
fn fail_reload_recreates_a_trapped_vm() {
    // The test-only module traps the VM on a request with `x-tollgate-test-trap`. With
    // FAIL_RELOAD (Istio >= 1.27 `failStrategy`), Envoy recreates the VM and the gateway
    // serves again by itself; with FAIL_CLOSE every later request on that worker would
    // get 503 until the pod restarts.
    let creds = DevCredentials::generate();
    let stack = start_with(
        "istio-shaped-fail-reload",
        &creds,
        json!({}),
        StackOptions {
            istio_shaped: true,
            concurrency: 1,
            wasm: Some(harness::paths::test_trap_wasm_file().unwrap()),
            ..StackOptions::default()
        },
    );
    let auth = bearer(&creds.api_key);
    assert_eq!(chat(&stack, &[("authorization", &auth)], &chat_body(1, 1, false)).status(), 200);
    let trapped = client()
        .post(format!("{}/v1/chat/completions", stack.gateway_url))
        .header("authorization", &auth)
        .header("x-tollgate-test-trap", "1")
        .json(&chat_body(1, 1, false))
        .send();
    assert!(trapped.as_ref().map_or(true, |r| r.status() != 200), "the trap did not fire: {trapped:?}");
    let log = stack.envoy_log();
    assert!(!vm_failures(&log).is_empty(), "no VM failure in the log:\n{log}");
    let statuses = Mutex::new(Vec::new());
    eventually(Duration::from_secs(20), "the gateway serving again after the trap", || {
        let status = chat(&stack, &[("authorization", &auth)], &chat_body(1, 1, false)).status().as_u16();
        statuses.lock().unwrap().push(status);
        (status == 200).then_some(())
    });
    let reloaded = envoy_counter(&stack, "wasm.llm-d.tollgate.vm_reload_success");
    assert!(reloaded >= 1, "vm_reload_success {reloaded}; answers meanwhile {:?}", statuses.lock().unwrap());
    // And it is the same filter: a missing credential is still refused.
    assert_eq!(chat(&stack, &[], &chat_body(1, 1, false)).status(), 401);
}

/// Issue 13 item 5: only the gateway may report usage (the harness's default).
#[test]
fn usage_reaches_the_tracker_only_with_the_ingest_token() {
    let creds = DevCredentials::generate();
    let stack = start_with(
        "istio-shaped-ingest-token",
        &creds,
        json!({}),
        StackOptions { istio_shaped: true, ingest_token: true, ..StackOptions::default() },
    );
    let token = stack.ingest_token.clone().unwrap();
    assert_eq!(stack.plugin_config["usage"]["token_env"], "TOLLGATE_INGEST_TOKEN");
    assert_eq!(chat(&stack, &[("authorization", &bearer(&creds.api_key))], &chat_body(1, 1, false)).status(), 200);
    wait_metric(&stack, "llm_requests_total", &[("user", &creds.user)], 1.0);
    // A report without the token, or with another, changes nothing.
    let forged = json!({"id": "forged-1", "user": creds.user, "path": "/v1/chat/completions"});
    for auth in [None, Some("Bearer wrong".to_string())] {
        let mut req = client().post(format!("{}/track", stack.tracker_url)).json(&forged);
        if let Some(a) = &auth {
            req = req.header("authorization", a);
        }
        assert_eq!(req.send().unwrap().status(), 401, "{auth:?}");
    }
    let resp = client()
        .post(format!("{}/track", stack.tracker_url))
        .header("authorization", format!("Bearer {token}"))
        .json(&forged)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    wait_metric(&stack, "llm_requests_total", &[("user", &creds.user)], 2.0);
}
