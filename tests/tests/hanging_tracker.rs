#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code: a panic is a failed test
//! A tracker that accepts connections and never answers (the fault tracker's `Hang`),
//! for the two request-path callouts the filter makes to it: the managed-key lookup
//! and the global-limits lease exchange. A hanging service must never hold a request
//! past the callout's timeout nor lift a limit, and the VMs must not fail.
//!
//! - Managed keys: a key resolved before keeps working (cache); a key created during the
//!   hang gets 503 `key_service_unavailable` once its lookup times out; once the
//!   tracker answers again it works.
//! - Global limits: requests during the hang are answered 200 or 429 (never held); the
//!   worker says the trackers cannot be reached and then admits from its fallback share;
//!   never more than the README's bound; the return is logged.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use harness::keys::{create_key, CreatedKey, NewKey};
use reqwest::blocking::Client;
use serde_json::{json, Value};
use tollgate_e2e::*;

/// `api_keys.remote.timeout_ms`: how long a lookup may hang.
const LOOKUP_TIMEOUT_MS: u64 = 400;
/// The limit of the user of the lease test.
const PER_HOUR: u64 = 8;

/// A client that opens a new connection per request and gives up after 10 s: a request
/// held by a hanging callout fails the test instead of hanging it.
fn impatient() -> Client {
    Client::builder().timeout(Duration::from_secs(10)).pool_max_idle_per_host(0).build().unwrap()
}

/// Status, `retry-after` and body of one chat completion with `key`.
fn call(stack: &Stack, key: &str) -> (u16, Option<String>, Value) {
    let resp = impatient()
        .post(format!("{}/v1/chat/completions", stack.gateway_url))
        .bearer_auth(key)
        .json(&chat_body(2, 2, false))
        .send()
        .expect("an answer within 10 s: no request is held by a hanging tracker");
    let status = resp.status().as_u16();
    let retry = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_string);
    let text = resp.text().unwrap_or_default();
    (status, retry, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn new_key(stack: &Stack, user: &str) -> CreatedKey {
    let key = NewKey { user: user.into(), groups: vec!["free".into()], name: None, expires_at: None };
    create_key(&stack.tracker_url, &stack.admin_token, &key).unwrap()
}

#[test]
fn a_hanging_key_service_holds_no_request() {
    let creds = DevCredentials::generate();
    let mut config = creds.plugin_config();
    config["api_keys"]["remote"] = json!({"timeout_ms": LOOKUP_TIMEOUT_MS, "changes_interval_seconds": 1});
    let stack = Stack::start(StackOptions {
        plugin_config: config,
        label: "hang-keys".into(),
        concurrency: 2,
        ledger: true,
        fault_tracker: true,
        ..StackOptions::default()
    })
    .unwrap();
    let fault = stack.fault().unwrap();
    let known = new_key(&stack, "erin");
    for _ in 0..8 {
        assert_eq!(call(&stack, &known.key).0, 200, "resolved on both workers (new connections)");
    }

    fault.set_mode(FaultMode::Hang).unwrap();
    for _ in 0..8 {
        assert_eq!(call(&stack, &known.key).0, 200, "a resolved key works while the key service hangs");
    }
    // Created on the tracker itself (the admin API does not go through the gateway).
    let fresh = new_key(&stack, "frank");
    let (status, retry, body) = call(&stack, &fresh.key);
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "key_service_unavailable", "{body}");
    assert_eq!(retry.as_deref(), Some("1"));
    assert!(fault.seen(FaultMode::Hang) >= 1, "the lookup met the hang");

    fault.set_mode(FaultMode::Healthy).unwrap();
    eventually(Duration::from_secs(15), "the new key works once the key service answers", || {
        (call(&stack, &fresh.key).0 == 200).then_some(())
    });
    let log = stack.envoy_log();
    assert!(vm_failures(&log).is_empty(), "{:?}", vm_failures(&log));
}

#[test]
fn a_hanging_tracker_holds_no_request_and_lifts_no_global_limit() {
    // An hour window that will not end during the test.
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    if 3_600 - secs % 3_600 < 120 {
        std::thread::sleep(Duration::from_secs(3_600 - secs % 3_600 + 1));
    }
    let key = dev::new_api_key();
    let config = json!({
        "api_keys": {"keys": [dev::key_entry(&key, "hung", &["metered".to_string()])]},
        "limits": {
            "scope": "global",
            "sync_interval_ms": 200,
            "acquire_timeout_ms": 300,
            "users": {"hung": {"requests_per_hour": PER_HOUR}}
        }
    });
    let stack = Stack::start(StackOptions {
        plugin_config: config,
        label: "hang-leases".into(),
        concurrency: 2,
        fault_tracker: true,
        ..StackOptions::default()
    })
    .unwrap();
    let fault = stack.fault().unwrap();
    let mut answers = Vec::new();
    for _ in 0..2 {
        answers.push(call(&stack, &key));
    }
    assert!(answers.iter().all(|a| a.0 == 200), "{answers:?}");

    fault.set_mode(FaultMode::Hang).unwrap();
    // Until the outage is logged and a request was admitted after it (the fallback
    // share), or the limit is spent: every request answered, 200 or 429.
    let mut admitted_after_log = 0;
    eventually(Duration::from_secs(30), "the outage logged and the fallback share admitting", || {
        let logged = stack.envoy_log().contains("trackers cannot be reached");
        let answer = call(&stack, &key);
        if logged && answer.0 == 200 {
            admitted_after_log += 1;
        }
        answers.push(answer);
        (admitted_after_log > 0).then_some(())
    });
    for (status, retry, body) in &answers {
        match status {
            200 => {}
            429 => {
                assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
                assert!(retry.is_some(), "a 429 says when to retry: {body}");
            }
            other => panic!("{other} during the hang: {body}"),
        }
    }
    let admitted = answers.iter().filter(|a| a.0 == 200).count() as u64;
    eprintln!("tracker hanging: admitted {admitted} of {} (requests_per_hour {PER_HOUR})", answers.len());
    // README "Guarantee": grants (≤ limit) plus the fallback shares (⌈limit ÷ replicas⌉
    // per worker, 2 workers).
    assert!(admitted <= 2 * PER_HOUR, "admitted {admitted}: a hanging tracker lifted the limit");
    assert!(fault.seen(FaultMode::Hang) >= 1, "lease exchanges met the hang");

    fault.set_mode(FaultMode::Healthy).unwrap();
    eventually(Duration::from_secs(15), "the return logged", || {
        let _ = call(&stack, &key);
        stack.envoy_log().contains("the trackers answer again").then_some(())
    });
    let log = stack.envoy_log();
    assert!(vm_failures(&log).is_empty(), "{:?}", vm_failures(&log));
}
