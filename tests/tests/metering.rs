#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code: a panic is a failed test
//! Token metering end to end: real Envoy with the filter counts tokens from JSON and
//! SSE responses (without holding the stream back), sends usage events to the real
//! tracker, and real Prometheus shows exact per-user counts.

use std::io::Read;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_e2e::*;

struct Users {
    alice: String,
    bob: String,
}

/// Config with two users in two groups.
fn two_users() -> (Value, Users) {
    let users = Users { alice: dev::new_api_key(), bob: dev::new_api_key() };
    let config = json!({"api_keys": {"keys": [
        dev::key_entry(&users.alice, "alice", &["free".to_string()]),
        dev::key_entry(&users.bob, "bob", &["premium".to_string()]),
    ]}});
    (config, users)
}

fn stack_with(label: &str, config: Value, prometheus: bool) -> Stack {
    Stack::start(StackOptions { plugin_config: config, prometheus, label: label.into(), ..StackOptions::default() })
        .unwrap()
}

fn prom_value(prom: &str, query: &str, label: &str, key: &str) -> Option<f64> {
    prom_query(prom, query)
        .iter()
        .find(|s| s["metric"][label] == key)
        .and_then(|s| s["value"][1].as_str().and_then(|v| v.parse().ok()))
}

#[test]
fn prometheus_shows_exact_requests_and_tokens_per_user() {
    let (config, users) = two_users();
    let stack = stack_with("metering-prom", config, true);
    let alice = format!("Bearer {}", users.alice);

    // alice: 3 plain chats (3 prompt words, 4 tokens) and 2 streamed chats that do not
    // ask for usage (2 words, 5 tokens): the filter adds include_usage to count them.
    for _ in 0..3 {
        assert_eq!(chat(&stack, &[("authorization", &alice)], &chat_body(3, 4, false)).status(), 200);
    }
    for _ in 0..2 {
        let resp = chat(&stack, &[("authorization", &alice)], &chat_body(2, 5, true));
        assert_eq!(resp.status(), 200);
        let text = resp.text().unwrap();
        assert!(text.contains("data: [DONE]"));
        // The usage-only event the filter asked for is not passed to a client that did not.
        assert!(!text.contains(r#""choices":[]"#) && !text.contains(r#""usage":{"#), "{text}");
    }
    // bob: the official openai client, plain and streamed chat and two embeddings calls.
    let (ok, out) = openai_smoke(
        &stack.gateway_url,
        &users.bob,
        &[
            "--prompt",
            "one two three four",
            "--max-tokens",
            "3",
            "--only",
            "chat",
            "--only",
            "chat_stream",
            "--only",
            "embeddings",
        ],
    );
    assert!(ok, "{out}");
    // Denied: two without a credential, one with a wrong key.
    for headers in [vec![], vec![], vec![("x-api-key", "wrong")]] {
        assert_eq!(chat(&stack, &headers, &chat_body(1, 1, false)).status(), 401);
    }

    let prom = stack.prometheus_url.clone().unwrap();
    let expected_requests = [("alice", 5.0), ("bob", 4.0)];
    eventually(Duration::from_secs(30), "llm_requests_total per user in Prometheus", || {
        expected_requests
            .iter()
            .all(|(u, n)| prom_value(&prom, "sum by (user) (llm_requests_total)", "user", u) == Some(*n))
            .then_some(())
    });
    let by_path = prom_query(&prom, r#"llm_requests_total{user="bob"}"#);
    let paths: Vec<(String, String, String)> = by_path
        .iter()
        .map(|s| {
            (
                s["metric"]["path"].as_str().unwrap().into(),
                s["metric"]["groups"].as_str().unwrap().into(),
                s["value"][1].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(paths.contains(&("/v1/chat/completions".into(), "premium".into(), "2".into())), "{paths:?}");
    assert!(paths.contains(&("/v1/embeddings".into(), "premium".into(), "2".into())), "{paths:?}");

    let tokens = |user: &str, kind: &str| {
        prom_value(&prom, &format!(r#"sum by (user) (llm_tokens_total{{user="{user}",type="{kind}"}})"#), "user", user)
    };
    let want = [Some(13.0), Some(22.0), Some(20.0), Some(6.0)];
    let mut got = [None; 4];
    let settled = (0..300).any(|_| {
        got = [
            tokens("alice", "prompt"),
            tokens("alice", "completion"),
            tokens("bob", "prompt"),
            tokens("bob", "completion"),
        ];
        std::thread::sleep(Duration::from_millis(100));
        got == want
    });
    // alice: 3×3 + 2×2 prompt, 3×4 + 2×5 completion; bob: 4 + 4 (chats) + 8 (two inputs) + 4 (embeddings) prompt, 3 × 2 completion.
    assert!(settled, "tokens [alice prompt, alice completion, bob prompt, bob completion]: got {got:?}, want {want:?}");
    let model = prom_query(&prom, r#"llm_tokens_total{user="alice",type="prompt"}"#);
    assert_eq!(model[0]["metric"]["model"], "mock-model");

    eventually(Duration::from_secs(30), "llm_denied_requests_total", || {
        let q = r#"sum by (reason) (llm_denied_requests_total{path="/v1/chat/completions"})"#;
        (prom_value(&prom, q, "reason", "missing_credential") == Some(2.0)
            && prom_value(&prom, q, "reason", "invalid_credential") == Some(1.0))
        .then_some(())
    });
}

#[test]
fn streaming_stays_streaming() {
    let (config, users) = two_users();
    let stack = stack_with("metering-stream", config, false);
    let hold = Duration::from_millis(3000);
    let start = Instant::now();
    let mut resp = client()
        .post(format!("{}/v1/chat/completions", stack.gateway_url))
        .header("authorization", format!("Bearer {}", users.alice))
        .header("x-mock-hold-ms", hold.as_millis().to_string())
        .json(&chat_body(2, 3, true))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut buf = [0u8; 4096];
    let n = resp.read(&mut buf).unwrap();
    let first = start.elapsed();
    let first_text = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(first_text.starts_with("data: {"), "{first_text}");
    let mut rest = String::new();
    resp.read_to_string(&mut rest).unwrap();
    let total = start.elapsed();
    assert!(rest.contains("[DONE]"));
    // The first event reached the client while the server still held the stream.
    assert!(total - first >= hold / 2, "first event after {first:?}, stream ended after {total:?}");
    wait_metric(&stack, "llm_tokens_total", &[("user", "alice"), ("type", "completion")], 3.0);
}

#[test]
fn sse_split_anywhere_gives_the_same_usage() {
    let (config, users) = two_users();
    let stack = stack_with("metering-split", config, false);
    let bearer = format!("Bearer {}", users.alice);
    let sizes = [1usize, 2, 3, 5, 7, 11, 13, 17, 64, 100, 333, 4096];
    for size in sizes {
        let resp = client()
            .post(format!("{}/v1/chat/completions", stack.gateway_url))
            .header("authorization", &bearer)
            .header("x-mock-chunk-bytes", size.to_string())
            .header("x-mock-unicode", "1")
            .header("x-mock-cached-tokens", "2")
            .header("x-mock-reasoning-tokens", "1")
            .json(&json!({"model": "mock-model", "messages": [{"role": "user", "content": "a b c"}],
                          "max_tokens": 4, "stream": true, "stream_options": {"include_usage": true}}))
            .send()
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.text().unwrap().ends_with("data: [DONE]\n\n"));
    }
    let n = sizes.len() as f64;
    let text = wait_metric(&stack, "llm_tokens_total", &[("user", "alice"), ("type", "completion")], 4.0 * n);
    assert_eq!(metric(&text, "llm_tokens_total", &[("user", "alice"), ("type", "prompt")]), Some(3.0 * n));
    assert_eq!(metric(&text, "llm_tokens_total", &[("user", "alice"), ("type", "cached")]), Some(2.0 * n));
    assert_eq!(metric(&text, "llm_tokens_total", &[("user", "alice"), ("type", "reasoning")]), Some(n));
}

#[test]
fn tracker_outage_loses_nothing_and_counts_nothing_twice() {
    let (config, users) = two_users();
    let mut stack = stack_with("metering-outage", config, false);
    let bearer = format!("Bearer {}", users.bob);
    assert_eq!(chat(&stack, &[("authorization", &bearer)], &chat_body(1, 1, false)).status(), 200);
    wait_metric(&stack, "llm_requests_total", &[("user", "bob")], 1.0);

    stack.kill_tracker();
    for _ in 0..20 {
        // Traffic never waits on the tracker.
        assert_eq!(chat(&stack, &[("authorization", &bearer)], &chat_body(2, 2, false)).status(), 200);
    }
    // Wait until the filter has tried and failed to deliver (Envoy's cluster stats).
    eventually(Duration::from_secs(30), "a failed usage delivery", || {
        (envoy_counter(&stack, "cluster.tollgate-usage.upstream_cx_connect_fail") > 0).then_some(())
    });
    stack.restart_tracker().unwrap();
    let text = wait_metric(&stack, "llm_requests_total", &[("user", "bob")], 20.0);
    // The restarted tracker counts from zero: 20 retried events, each once.
    assert_eq!(metric(&text, "llm_tokens_total", &[("user", "bob"), ("type", "prompt")]), Some(40.0));
}

#[test]
fn disconnects_and_upstream_failures_are_recorded() {
    let (config, users) = two_users();
    let stack = stack_with("metering-incomplete", config, false);
    let bearer = format!("Bearer {}", users.alice);
    {
        let mut resp = client()
            .post(format!("{}/v1/chat/completions", stack.gateway_url))
            .header("authorization", &bearer)
            .header("x-mock-hold-ms", "10000")
            .json(&chat_body(2, 3, true))
            .send()
            .unwrap();
        let mut buf = [0u8; 256];
        assert!(resp.read(&mut buf).unwrap() > 0);
        // Dropping the response closes the connection mid-stream.
    }
    wait_metric(&stack, "llm_incomplete_requests_total", &[("user", "alice")], 1.0);

    let resp = chat(&stack, &[("authorization", &bearer), ("x-mock-status", "500")], &chat_body(1, 1, false));
    assert_eq!(resp.status(), 500);
    let text = wait_metric(&stack, "llm_upstream_errors_total", &[("user", "alice")], 1.0);
    assert_eq!(metric(&text, "llm_requests_total", &[("user", "alice")]), Some(2.0));
}
