#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code: a panic is a failed test
//! Limits through real Envoy with two workers: request rates shared by all workers,
//! token quotas charged when usage arrives, 429s in the OpenAI format with the
//! `x-ratelimit-*` headers, and the official client's retry behaviour.

use serde_json::{json, Value};
use tollgate_e2e::*;

struct Keys {
    limited: String,
    other: String,
    budget: String,
}

fn stack(label: &str) -> (Stack, Keys) {
    let keys = Keys { limited: dev::new_api_key(), other: dev::new_api_key(), budget: dev::new_api_key() };
    let config = json!({
        "api_keys": {"keys": [
            dev::key_entry(&keys.limited, "lim", &["free".to_string()]),
            dev::key_entry(&keys.other, "other", &["free".to_string()]),
            dev::key_entry(&keys.budget, "budget", &["metered".to_string()]),
        ]},
        "limits": {
            "groups": {"free": {"requests_per_minute": 5}},
            "users": {"budget": {"quota": {"tokens": 10, "window": "day"}}}
        }
    });
    let stack = Stack::start(StackOptions {
        plugin_config: config,
        concurrency: 2,
        label: label.into(),
        ..StackOptions::default()
    })
    .unwrap();
    (stack, keys)
}

/// A request on a fresh connection, so Envoy's workers share the load.
fn fresh_chat(stack: &Stack, key: &str, stream: bool) -> reqwest::blocking::Response {
    reqwest::blocking::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
        .post(format!("{}/v1/chat/completions", stack.gateway_url))
        .header("authorization", format!("Bearer {key}"))
        .json(&chat_body(3, 4, stream))
        .send()
        .unwrap()
}

fn gateway_4xx(stack: &Stack) -> u64 {
    envoy_counter(stack, "http.gateway.downstream_rq_4xx")
}

#[test]
fn five_per_minute_means_five_across_workers() {
    let (stack, keys) = stack("limits-rate");
    let mut statuses = Vec::new();
    for i in 0..15 {
        let resp = fresh_chat(&stack, &keys.limited, i == 0);
        let status = resp.status().as_u16();
        if status == 200 {
            let remaining = resp.headers()["x-ratelimit-remaining-requests"].to_str().unwrap().to_string();
            assert_eq!(resp.headers()["x-ratelimit-limit-requests"], "5");
            assert_eq!(remaining, (4 - i).to_string(), "request {i}");
        } else {
            let h = resp.headers().clone();
            let body: Value = resp.json().unwrap();
            assert_eq!(body["error"]["code"], "rate_limit_exceeded");
            assert_eq!(body["error"]["type"], "requests");
            let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
            assert!((1..=12).contains(&retry), "retry-after {retry}");
            assert_eq!(h["x-ratelimit-limit-requests"], "5");
            assert_eq!(h["x-ratelimit-remaining-requests"], "0");
            assert!(h.contains_key("x-ratelimit-reset-requests"));
            assert!(!h.contains_key("x-should-retry"));
        }
        statuses.push(status);
    }
    let mut want = vec![200u16; 5];
    want.extend([429u16; 10]);
    assert_eq!(statuses, want);
    // Both workers served requests (the state is shared, not per worker).
    let log = stack.envoy_log();
    let workers: std::collections::BTreeSet<&str> = log
        .lines()
        .filter(|l| l.contains("ALLOW user=lim") || l.contains("DENY reason=rate_limited"))
        .filter_map(|l| l.split("][").nth(1))
        .collect();
    // 15 fresh connections land on one of 2 workers with probability 2^-14.
    assert!(workers.len() >= 2, "all requests on one worker: {workers:?}");

    // Another user of the same group has its own budget.
    assert_eq!(fresh_chat(&stack, &keys.other, false).status(), 200);
    // The official client raises RateLimitError. (With retries it would wait for
    // retry-after and then succeed: rate limits are retryable, quotas are not.)
    let (ok, out) = openai_smoke(&stack.gateway_url, &keys.limited, &["--expect-error", "429"]);
    assert!(ok, "{out}");
    assert!(out.contains("\"class\": \"RateLimitError\""), "{out}");
    assert!(out.contains("rate_limit_exceeded"), "{out}");
}

#[test]
fn token_quota_stops_a_user_once_spent_and_is_not_retried() {
    let (stack, keys) = stack("limits-quota");
    // 3 prompt + 4 completion = 7 tokens per request; the quota is 10 per day:
    // the second request is admitted (7 < 10), the third is not (14 >= 10).
    for _ in 0..2 {
        let resp = fresh_chat(&stack, &keys.budget, false);
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-ratelimit-limit-tokens"], "10");
    }
    // Tokens are charged when the request's stream ends (before its usage event is queued).
    wait_metric(&stack, "llm_requests_total", &[("user", "budget")], 2.0);
    let resp = fresh_chat(&stack, &keys.budget, false);
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["x-should-retry"], "false");
    assert_eq!(resp.headers()["x-ratelimit-remaining-tokens"], "0");
    let body: Value = resp.json().unwrap();
    assert_eq!(body["error"]["code"], "insufficient_quota");

    let before = gateway_4xx(&stack);
    let (ok, out) = openai_smoke(&stack.gateway_url, &keys.budget, &["--expect-error", "429", "--max-retries", "2"]);
    assert!(ok, "{out}");
    assert!(out.contains("\"class\": \"RateLimitError\""), "{out}");
    assert!(out.contains("insufficient_quota"), "{out}");
    assert_eq!(gateway_4xx(&stack) - before, 1, "an exhausted quota is not retried");
    wait_metric(&stack, "llm_denied_requests_total", &[("reason", "quota_exceeded")], 2.0);
}
