#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code: a panic is a failed test
//! The stack itself: Envoy loads the real filter, requests reach the mock model,
//! the official `openai` client works through the gateway, a bad filter config is
//! refused with the field named, and Prometheus scrapes the tracker.

use std::time::Duration;

use serde_json::{json, Value};
use tollgate_e2e::*;

#[test]
fn request_through_gateway_reaches_the_model() {
    let creds = DevCredentials::generate();
    let stack = start("foundation-basic", &creds, json!({}));
    let bearer = format!("Bearer {}", creds.api_key);
    let resp = chat(&stack, &[("authorization", &bearer)], &chat_body(3, 4, false));
    assert_eq!(resp.status(), 200);
    let seen = received_headers(&resp);
    let body: Value = resp.json().unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["usage"]["prompt_tokens"], 3);
    assert_eq!(body["usage"]["completion_tokens"], 4);
    assert_eq!(seen.get("x-tollgate-user").map(String::as_str), Some("dev-user"));

    // The filter logged its version and git hash when Envoy loaded it.
    let log = stack.envoy_log();
    assert!(log.contains("tollgate filter") && log.contains("(git "), "no version line in the envoy log");
}

#[test]
fn openai_python_client_through_gateway() {
    let creds = DevCredentials::generate();
    let stack = start("foundation-openai", &creds, json!({}));
    let (ok, out) = openai_smoke(&stack.gateway_url, &creds.api_key, &[]);
    assert!(ok, "openai client failed through the gateway:\n{out}");
    let (ok, out) = openai_smoke(&stack.gateway_url, &creds.token(600).unwrap(), &[]);
    assert!(ok, "openai client with a JWT failed through the gateway:\n{out}");
}

#[test]
fn envoy_refuses_an_invalid_filter_config_naming_the_field() {
    let cases = [
        (json!({"api_keys": {"keys": [{"sha256": "not-hex", "user": "u"}]}}), "api_keys.keys[0].sha256"),
        (json!({"authorization": {"allowed_groupz": ["a"]}}), "allowed_groupz"),
        (json!({"usage": {"cluster": "c", "timeout_ms": 0}}), "usage.timeout_ms"),
    ];
    for (config, field) in cases {
        let err = Stack::start(StackOptions {
            plugin_config: config.clone(),
            label: "foundation-badconfig".into(),
            ..StackOptions::default()
        })
        .err()
        .unwrap_or_else(|| panic!("Envoy accepted {config}"));
        let text = format!("{err:#}");
        assert!(text.contains("invalid plugin configuration"), "{text}");
        assert!(text.contains(field), "the log does not name `{field}`:\n{text}");
    }
}

#[test]
fn prometheus_scrapes_the_tracker() {
    let creds = DevCredentials::generate();
    let stack = Stack::start(StackOptions {
        plugin_config: creds.plugin_config(),
        prometheus: true,
        label: "foundation-prom".into(),
        ..StackOptions::default()
    })
    .unwrap();
    let prom = stack.prometheus_url.clone().unwrap();
    let up = eventually(Duration::from_secs(30), "tracker target up in Prometheus", || {
        let r = prom_query(&prom, r#"up{job="usage-tracking"}"#);
        r.first().and_then(|s| s["value"][1].as_str().map(str::to_string)).filter(|v| v == "1")
    });
    assert_eq!(up, "1");
}

#[test]
fn dropping_a_stack_leaves_no_process_behind() {
    let creds = DevCredentials::generate();
    let stack = start("foundation-drop", &creds, json!({}));
    let pids = stack.pids();
    assert_eq!(pids.len(), 2, "envoy and tracker");
    let alive = |pid: &u32| std::path::Path::new(&format!("/proc/{pid}")).exists();
    assert!(pids.iter().all(alive));
    drop(stack);
    let gone = pids.iter().filter(|p| alive(p)).count() == 0;
    assert!(gone, "still running after drop: {pids:?}");
}
