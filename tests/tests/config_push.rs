#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code: a panic is a failed test
//! Live reconfiguration as Istio does it, on the Istio-shaped gateway: ten pushes of a
//! changed `pluginConfig` (an API key rotation each: one key added, the oldest removed)
//! while streams run on every worker and, for part of it, the tracker refuses
//! connections. Each push makes Envoy create new root contexts and send the old ones
//! `on_done`; streams started before a push finish on the old root. Afterwards every
//! request the clients saw authorized is counted exactly once in `llm_requests_total`
//! (per user: one user per key) and every 401 once in `llm_denied_requests_total`; and
//! right after each push returns, the new key works and every removed key gets 401.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_e2e::*;

const PUSHES: usize = 10;
/// Pushes during which the tracker refuses connections.
const OUTAGE: std::ops::Range<usize> = 3..7;

fn user(i: usize) -> String {
    format!("rot{i}")
}

/// Keys `live` of `keys` in the plugin config (inline, as `key_storage: inline` renders).
fn config(keys: &[String], live: std::ops::Range<usize>) -> Value {
    let entries: Vec<Value> = live.map(|i| dev::key_entry(&keys[i], &user(i), &["premium".to_string()])).collect();
    json!({"api_keys": {"keys": entries}})
}

#[test]
fn ten_key_rotations_under_load_and_an_outage_lose_and_double_nothing() {
    let keys: Vec<String> = (0..PUSHES + 2).map(|_| dev::new_api_key()).collect();
    // Push n (1-based) makes keys n..n+2 live: key n+1 is new, key n-1 removed.
    let stack = Stack::start(StackOptions {
        plugin_config: config(&keys, 0..2),
        istio_shaped: true,
        fault_tracker: true,
        label: "config-push".into(),
        ..StackOptions::default()
    })
    .unwrap();
    let fault = stack.fault().unwrap();

    let live = Mutex::new(0..2usize);
    let authorized: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());
    let denied = AtomicU64::new(0);
    let other = Mutex::new(Vec::<String>::new());
    let done = AtomicBool::new(false);
    let count = |status: u16, i: usize, body: &str| match status {
        200 => *authorized.lock().unwrap().entry(user(i)).or_insert(0) += 1,
        401 => {
            denied.fetch_add(1, Ordering::Relaxed);
        }
        s => other.lock().unwrap().push(format!("{s} {body}")),
    };

    std::thread::scope(|s| {
        // Load: streams of about 0.4 s (8 events, 50 ms apart) and plain requests, each
        // with a key that was live when it started (it may be removed meanwhile).
        for t in 0..4 {
            let (live, done, count, stack, keys) = (&live, &done, &count, &stack, &keys);
            s.spawn(move || {
                let mut n = 0usize;
                while !done.load(Ordering::Relaxed) {
                    let range = live.lock().unwrap().clone();
                    let i = range.start + (n + t) % range.len();
                    n += 1;
                    let auth = format!("Bearer {}", keys[i]);
                    let stream = !matches!((n + t) % 3, 0);
                    let resp = chat(
                        stack,
                        &[("authorization", &auth), ("x-mock-delay-ms", "50")],
                        &chat_body(2, if stream { 8 } else { 2 }, stream),
                    );
                    let status = resp.status().as_u16();
                    let body = resp.text().unwrap_or_default();
                    if status == 200 && stream {
                        assert!(body.contains("data: [DONE]"), "a stream was cut: {body}");
                    }
                    count(status, i, &body);
                }
            });
        }

        for push in 1..=PUSHES {
            if push == OUTAGE.start {
                fault.set_mode(FaultMode::Refuse).unwrap();
            }
            if push == OUTAGE.end {
                fault.set_mode(FaultMode::Healthy).unwrap();
            }
            // Let streams start on the current config, then rotate under them.
            std::thread::sleep(Duration::from_millis(300));
            let next = push..push + 2;
            let started = Instant::now();
            stack.push_plugin_config(&config(&keys, next.clone())).unwrap();
            let took = started.elapsed();
            *live.lock().unwrap() = next.clone();
            // Right after the push: the new key works, every removed key is refused.
            let new = push + 1;
            let resp = chat(&stack, &[("authorization", &format!("Bearer {}", keys[new]))], &chat_body(1, 1, false));
            let status = resp.status().as_u16();
            count(status, new, "");
            assert_eq!(status, 200, "push {push}: the new key does not work (push took {took:?})");
            for (gone, key) in keys.iter().enumerate().take(push) {
                let resp = chat(&stack, &[("authorization", &format!("Bearer {key}"))], &chat_body(1, 1, false));
                let status = resp.status().as_u16();
                count(status, gone, "");
                assert_eq!(status, 401, "push {push}: removed key {gone} still works");
            }
        }
        done.store(true, Ordering::Relaxed);
    });

    assert!(other.lock().unwrap().is_empty(), "answers other than 200/401: {:?}", other.lock().unwrap());
    let connect_fails =
        envoy_counter(&stack, &format!("cluster.{}.upstream_cx_connect_fail", harness::envoy::LOCAL_USAGE_CLUSTER));
    assert!(connect_fails > 0, "the outage was not exercised");

    // Every authorized request exactly once, per user; every 401 once.
    let want = authorized.lock().unwrap().clone();
    let total: u64 = want.values().sum();
    let denied = denied.load(Ordering::Relaxed) as f64;
    eprintln!(
        "authorized {total} ({} users), denied {denied}, connect failures during the outage {connect_fails}",
        want.len()
    );
    for (u, n) in &want {
        let got = settle_metric(&stack, "llm_requests_total", &[("user", u)], *n as f64, Duration::from_secs(60));
        assert_eq!(got, *n as f64, "llm_requests_total{{user={u}}}: {got}, the clients saw {n} authorized");
    }
    let got = settle_metric(&stack, "llm_denied_requests_total", &[], denied, Duration::from_secs(30));
    assert_eq!(got, denied, "llm_denied_requests_total");
    // Nothing arrives late twice: one more flush period and the counts still hold.
    std::thread::sleep(Duration::from_secs(1));
    for (u, n) in &want {
        assert_eq!(tracker_value(&stack, "llm_requests_total", &[("user", u)]), *n as f64, "{u} counted twice");
    }
    assert_eq!(tracker_value(&stack, "llm_denied_requests_total", &[]), denied);
    let log = stack.envoy_log();
    assert!(vm_failures(&log).is_empty(), "{log}");
}

#[test]
fn a_saved_plugin_config_file_is_pushed_live() {
    // What `tollgate up --plugin-config FILE` does: the file is watched, each saved
    // change pushed; a change the filter refuses is reported and the old config stays.
    let keys: Vec<String> = (0..2).map(|_| dev::new_api_key()).collect();
    let stack = Stack::start(StackOptions {
        plugin_config: config(&keys, 0..1),
        istio_shaped: true,
        label: "config-push-watch".into(),
        ..StackOptions::default()
    })
    .unwrap();
    let file = stack.dir.join("plugin-config.json");
    std::fs::write(&file, config(&keys, 0..1).to_string()).unwrap();
    let stop = AtomicBool::new(false);
    let reports = Mutex::new(Vec::<String>::new());
    let works = |i: usize| {
        chat(&stack, &[("authorization", &format!("Bearer {}", keys[i]))], &chat_body(1, 1, false)).status() == 200
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            harness::stack::watch_plugin_config(&stack, &file, &stop, Duration::from_millis(50), |r| {
                reports.lock().unwrap().push(r.map_or_else(|e| format!("{e:#}"), |()| "ok".into()));
            })
        });
        assert!(works(0) && !works(1));
        std::fs::write(&file, config(&keys, 1..2).to_string()).unwrap();
        eventually(Duration::from_secs(10), "the saved file pushed", || works(1).then_some(()));
        assert!(!works(0), "the key removed from the file still works");
        std::fs::write(&file, r#"{"api_keys": {"keys": [], "bogus": true}}"#).unwrap();
        eventually(Duration::from_secs(10), "the refused file reported", || {
            (reports.lock().unwrap().len() >= 2).then_some(())
        });
        stop.store(true, Ordering::Relaxed);
    });
    let reports = reports.into_inner().unwrap();
    assert_eq!(reports.len(), 2, "one push per saved change: {reports:?}");
    assert_eq!(reports[0], "ok");
    assert!(reports[1].contains("rejected") && reports[1].contains("bogus"), "{reports:?}");
    assert!(works(1), "a refused file changed the running config");
}
