#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code: a panic is a failed test
//! Managed API keys (issue 16): keys created and revoked at run time in the tracker
//! (SQLite ledger, `TRACKER_ADMIN_TOKEN`), resolved by the filter by digest with
//! `api_keys.remote`, through real Envoy with two workers, each request on a new
//! connection so both workers serve.
//!
//! - Created → works at once; listed without the key; revoked → 401 everywhere within
//!   the changes interval; an expired key stops at its expiry.
//! - The key service down: a key resolved before keeps working; an unknown key gets the
//!   503 `key_service_unavailable`, which does not say the key is wrong.
//! - A spray of 10 000 random keys costs at most `max_lookups_per_second` lookups per
//!   worker and second (the documented bound), and a resolved key keeps working.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use harness::keys::{create_key, list_keys, revoke_key, NewKey};
use serde_json::{json, Value};
use tollgate_e2e::*;

/// Lookups each worker may start per second (`api_keys.remote.max_lookups_per_second`).
const LOOKUPS_PER_SECOND: u64 = 20;
const WORKERS: u64 = 2;

fn stack(label: &str) -> Stack {
    stack_with(label, json!({}))
}

/// A stack whose `api_keys.remote` has these fields on top of the tests' defaults.
fn stack_with(label: &str, remote: Value) -> Stack {
    let creds = DevCredentials::generate();
    let mut config = creds.plugin_config();
    let mut fields = json!({
        "changes_interval_seconds": 1,
        "ttl_seconds": 60,
        "max_lookups_per_second": LOOKUPS_PER_SECOND,
    });
    fields.as_object_mut().unwrap().extend(remote.as_object().unwrap().clone());
    config["api_keys"]["remote"] = fields;
    Stack::start(StackOptions {
        plugin_config: config,
        label: label.into(),
        concurrency: WORKERS as u32,
        ledger: true,
        ..StackOptions::default()
    })
    .unwrap()
}

fn new_key(stack: &Stack, user: &str, expires_at: Option<u64>) -> harness::keys::CreatedKey {
    let key = NewKey { user: user.into(), groups: vec!["free".into()], name: Some("e2e".into()), expires_at };
    create_key(&stack.tracker_url, &stack.admin_token, &key).unwrap()
}

/// Status and body of one chat completion with `key`, on a new connection.
fn call(stack: &Stack, key: &str) -> (u16, String) {
    let resp = chat_at(
        &fresh_client(),
        &stack.gateway_url,
        &[("authorization", &format!("Bearer {key}"))],
        &chat_body(2, 2, false),
    );
    let status = resp.status().as_u16();
    (status, resp.text().unwrap_or_default())
}

fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

#[test]
fn keys_work_at_once_and_stop_when_revoked_or_expired() {
    let stack = stack("managed-keys");
    let created = new_key(&stack, "alice", None);
    assert!(created.key.starts_with("tgk_"), "{}", created.id);
    for i in 0..8 {
        let resp = chat_at(
            &fresh_client(),
            &stack.gateway_url,
            &[("authorization", &format!("Bearer {}", created.key))],
            &chat_body(2, 2, false),
        );
        assert_eq!(resp.status().as_u16(), 200, "request {i} with a key created a moment ago");
        assert_eq!(received_headers(&resp).get("x-tollgate-user").map(String::as_str), Some("alice"));
    }
    let listed = list_keys(&stack.tracker_url, &stack.admin_token, Some("alice")).unwrap();
    let text = serde_json::to_string(&listed).unwrap();
    assert!(!text.contains(&created.key) && !text.contains(&created.sha256), "never the key: {text}");
    assert!(listed.iter().any(|k| k["id"] == created.id.as_str() && !k["last_used_at"].is_null()), "{text}");

    // Revoked: 401 on every worker within the changes interval (1 s here), long before
    // the cache's ttl (60 s).
    let revoked_at = Instant::now();
    revoke_key(&stack.tracker_url, &stack.admin_token, &created.id).unwrap();
    eventually(Duration::from_secs(15), "the revoked key refused on every worker", || {
        (0..8).all(|_| call(&stack, &created.key).0 == 401).then_some(())
    });
    let took = revoked_at.elapsed();
    eprintln!("revocation reached every worker in {took:?}");
    assert!(took < Duration::from_secs(60), "within the ttl at the latest");

    // Expiry: works until then, 401 after.
    let expiring = new_key(&stack, "bob", Some(now_s() + 3));
    assert_eq!(call(&stack, &expiring.key).0, 200);
    eventually(Duration::from_secs(10), "the expired key refused", || {
        (call(&stack, &expiring.key).0 == 401).then_some(())
    });
}

#[test]
fn the_key_service_down_keeps_known_keys_and_refuses_unknown_ones_without_a_verdict() {
    let mut stack = stack("managed-keys-down");
    let known = new_key(&stack, "carol", None);
    // Resolved on both workers (new connections).
    for _ in 0..8 {
        assert_eq!(call(&stack, &known.key).0, 200);
    }
    stack.kill_tracker();
    for _ in 0..8 {
        assert_eq!(call(&stack, &known.key).0, 200, "a resolved key works while the key service is down");
    }
    let (status, body) = call(&stack, "tgk_never-issued-0123456789abcdef0123456789abcd");
    assert_eq!(status, 503, "{body}");
    let error: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"]["code"], "key_service_unavailable", "{body}");
    assert!(!body.to_lowercase().contains("incorrect"), "says nothing of the key: {body}");
    let log = stack.envoy_log();
    assert!(vm_failures(&log).is_empty(), "{:?}", vm_failures(&log));
}

#[test]
fn a_spray_of_random_keys_makes_bounded_lookups() {
    // Few cache slots: the spray's "no such key" answers land on the good key's slot.
    let stack = stack_with("managed-keys-spray", json!({"max_entries": 16}));
    let good = new_key(&stack, "dave", None);
    assert_eq!(call(&stack, &good.key).0, 200);
    let before = tracker_value_at(&stack.tracker_url, "tracker_key_resolves_total", &[]).unwrap();
    const SPRAY: usize = 10_000;
    let next = AtomicUsize::new(0);
    let (unauthorized, unavailable, good_ok) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let started = Instant::now();
    std::thread::scope(|s| {
        for t in 0..4 {
            let (next, unauthorized, unavailable, good_ok) = (&next, &unauthorized, &unavailable, &good_ok);
            let (stack, good) = (&stack, &good);
            s.spawn(move || {
                let client = client();
                loop {
                    let k = next.fetch_add(1, Ordering::SeqCst);
                    if k >= SPRAY {
                        break;
                    }
                    let key = format!("tgk_spray-{t}-{k}-{}", dev::new_secret());
                    let resp = client
                        .post(format!("{}/v1/chat/completions", stack.gateway_url))
                        .bearer_auth(&key)
                        .json(&chat_body(1, 1, false))
                        .send()
                        .unwrap();
                    match resp.status().as_u16() {
                        401 => unauthorized.fetch_add(1, Ordering::Relaxed),
                        503 => unavailable.fetch_add(1, Ordering::Relaxed),
                        other => panic!("a random key got {other}"),
                    };
                    if k % 1000 == 0 {
                        assert_eq!(call(stack, &good.key).0, 200, "a resolved key works during the spray");
                        good_ok.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let secs = started.elapsed().as_secs_f64();
    let lookups = tracker_value_at(&stack.tracker_url, "tracker_key_resolves_total", &[]).unwrap() - before;
    // A token bucket per worker: LOOKUPS_PER_SECOND at start, then LOOKUPS_PER_SECOND a
    // second (one more per worker for the clocks' millisecond rounding).
    let bound = (WORKERS * LOOKUPS_PER_SECOND) as f64 * (secs + 1.0) + WORKERS as f64;
    eprintln!(
        "{SPRAY} random keys in {secs:.1} s: {} x 401, {} x 503, {lookups} lookups (bound {bound:.0})",
        unauthorized.load(Ordering::Relaxed),
        unavailable.load(Ordering::Relaxed)
    );
    assert!(lookups <= bound, "{lookups} lookups > {bound}");
    assert!(lookups >= 1.0, "some lookups were made");
    assert_eq!(good_ok.load(Ordering::Relaxed), (SPRAY / 1000) as u64);
}
