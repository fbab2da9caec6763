#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code: a panic is a failed test
//! A fleet (`../shared/design.md` §9, issue 15): `tollgate up --gateways 2 --trackers 2`,
//! two gateway Envoys with the same filter and config, two tracker replicas on one
//! PostgreSQL ledger (a throwaway server the harness starts), every gateway reporting
//! to every tracker.
//!
//! Authorized requests sent round robin to both gateways, concurrently and each on a
//! new connection, are counted exactly once across the fleet: the sum over the trackers
//! of `llm_requests_total{user}` equals the requests sent, and the shared ledger's
//! `GET /v1/usage` reports the same total on either tracker. Killing one tracker
//! (SIGKILL, possibly mid-transaction) in the middle of the traffic changes nothing:
//! the gateways' reports go to the other one, a report whose answer was lost is resent
//! there and dropped as a duplicate if it had been committed, and the killed replica,
//! started again, restores its own counters from the ledger.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tollgate_e2e::*;

const USER_LABEL: &str = "user";
/// Concurrent senders (each request on a new connection).
const THREADS: usize = 6;
/// Requests after the first phase, during which tracker replica 1 is killed.
const SECOND_PHASE: usize = 60;
/// Requests of the second phase sent before the kill.
const KILL_AFTER: usize = 20;

/// Sends `n` authorized chat completions from `THREADS` threads, request `k` (counted
/// over the whole test by `next`) to gateway `k % gateways`, each on a new connection;
/// every one must be served (200). `answered(m)` runs on the sending thread when the
/// `m`-th request of this call (from 1) was answered, while the others are in flight.
/// Each thread waits `pace` after each answer. Returns when all are answered.
fn send(
    stack: &Stack,
    key: &str,
    (n, pace): (usize, Duration),
    next: &AtomicUsize,
    sent: &AtomicUsize,
    answered: &(dyn Fn(usize) + Sync),
) {
    let start = next.load(Ordering::SeqCst);
    let end = start + n;
    let auth = format!("Bearer {key}");
    let body = chat_body(3, 4, false);
    let done = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            s.spawn(|| {
                let client = fresh_client();
                loop {
                    let k = next.fetch_add(1, Ordering::SeqCst);
                    if k >= end {
                        break;
                    }
                    let gateway = &stack.gateway_urls[k % stack.gateway_urls.len()];
                    let resp = chat_at(&client, gateway, &[("authorization", &auth)], &body);
                    let status = resp.status().as_u16();
                    let text = resp.text().unwrap_or_default();
                    assert_eq!(status, 200, "request {k} to {gateway}: {text}");
                    sent.fetch_add(1, Ordering::SeqCst);
                    answered(done.fetch_add(1, Ordering::SeqCst) + 1);
                    std::thread::sleep(pace);
                }
            });
        }
    });
    // Leave `next` at the end (threads overshoot it by one each).
    next.store(end, Ordering::SeqCst);
}

/// The ledger's request total for `user` on one tracker, polled until it is at least
/// `want` (or `timeout` passes); the last value, so a shortfall or a double count shows.
fn settle_ledger(stack: &Stack, tracker_url: &str, user: &str, want: u64, timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        let got = usage_total(stack, tracker_url, user).and_then(|t| t["requests"].as_u64()).unwrap_or(0);
        if got >= want || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn two_gateways_two_trackers_count_every_request_once() {
    if postgres_missing() {
        return;
    }
    let started = Instant::now();
    let creds = DevCredentials::generate();
    let stack = start_with(
        "fleet",
        &creds,
        json!({}),
        StackOptions { gateways: 2, trackers: 2, database_url: None, ..StackOptions::default() },
    );
    assert_eq!((stack.gateway_urls.len(), stack.admin_urls.len(), stack.tracker_urls.len()), (2, 2, 2));
    assert_eq!(stack.gateway_url, stack.gateway_urls[0]);
    assert_eq!(stack.tracker_url, stack.tracker_urls[0]);
    let mut all: Vec<&String> = stack.gateway_urls.iter().chain(&stack.admin_urls).chain(&stack.tracker_urls).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 6, "every part its own port: {all:?}");
    assert!(stack.database_url.is_some(), "two trackers share a PostgreSQL ledger");
    eprintln!("fleet up in {:?}", started.elapsed());

    // Every gateway knows every tracker: its usage cluster has both as endpoints.
    let cluster = harness::envoy::LOCAL_USAGE_CLUSTER;
    for admin in &stack.admin_urls {
        let clusters = client().get(format!("{admin}/clusters")).send().unwrap().text().unwrap();
        for tracker in &stack.tracker_urls {
            let host = tracker.trim_start_matches("http://");
            assert!(clusters.contains(&format!("{cluster}::{host}::")), "{admin}: no endpoint {host} in {cluster}");
        }
    }

    let user = creds.user.as_str();
    let labels = [(USER_LABEL, user)];
    let (next, sent) = (AtomicUsize::new(0), AtomicUsize::new(0));

    // Phase 1: waves of requests until both trackers have counted reports (the
    // gateways' workers pick the trackers in turn), at least 40 requests.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        send(&stack, &creds.api_key, (2 * THREADS, Duration::ZERO), &next, &sent, &|_| {});
        std::thread::sleep(Duration::from_millis(250));
        let each: Vec<f64> =
            stack.tracker_urls.iter().map(|t| tracker_value_at(t, "llm_requests_total", &labels).unwrap()).collect();
        if sent.load(Ordering::SeqCst) >= 40 && each.iter().all(|v| *v > 0.0) {
            eprintln!("phase 1: {} requests, per tracker so far {each:?}", sent.load(Ordering::SeqCst));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after {} requests not every tracker got reports: {each:?}",
            sent.load(Ordering::SeqCst)
        );
    }

    // Phase 2: traffic on both gateways; tracker replica 1 is killed (by the sender that
    // got the answer) once KILL_AFTER of it were answered, the others in flight.
    let at_kill = std::sync::Mutex::new(None);
    let kill = |answered: usize| {
        if answered == KILL_AFTER {
            let before = tracker_value_at(&stack.tracker_urls[0], "llm_requests_total", &labels).unwrap();
            stack.kill_tracker_at(1);
            *at_kill.lock().unwrap() = Some(before);
        }
    };
    // Paced, so reports flow to both trackers before the kill and on after it.
    send(&stack, &creds.api_key, (SECOND_PHASE, Duration::from_millis(100)), &next, &sent, &kill);
    let at_kill = at_kill.into_inner().unwrap().expect("tracker-1 was killed");
    assert!(!stack.tracker_running(1));
    let total = sent.load(Ordering::SeqCst);
    assert_eq!(total, next.load(Ordering::SeqCst));
    let want = u64::try_from(total).unwrap();

    // The shared ledger, read through the surviving tracker: every request once.
    let ledger = settle_ledger(&stack, &stack.tracker_urls[0], user, want, Duration::from_secs(20));
    assert_eq!(ledger, want, "ledger total on tracker-0 after tracker-1 was killed");
    // The reports after the kill went to tracker-0.
    let tracker0 = tracker_value_at(&stack.tracker_urls[0], "llm_requests_total", &labels).unwrap();
    assert!(tracker0 > at_kill, "tracker-0 counted nothing after the kill ({at_kill} then {tracker0})");

    // The killed replica, started again, restores its own counters from the ledger:
    // the sum over the fleet is every request once, and both read the same ledger.
    stack.restart_tracker_at(1).unwrap();
    // Give a straggling report (one resent after the restart) the time to land.
    std::thread::sleep(Duration::from_millis(500));
    let fleet = fleet_value(&stack, "llm_requests_total", &labels);
    let per: Vec<f64> =
        stack.tracker_urls.iter().map(|t| tracker_value_at(t, "llm_requests_total", &labels).unwrap()).collect();
    eprintln!("sent {total}; llm_requests_total per tracker {per:?}; took {:?}", started.elapsed());
    assert_eq!(fleet, want as f64, "sum over the trackers of llm_requests_total{{user}} (per tracker {per:?})");
    for tracker in &stack.tracker_urls {
        assert_eq!(settle_ledger(&stack, tracker, user, want, Duration::from_secs(5)), want, "/v1/usage on {tracker}");
    }
    let duplicates = fleet_value(&stack, "tracker_events_duplicate_total", &[]);
    eprintln!("duplicates dropped across the fleet: {duplicates}");
    for admin in &stack.admin_urls {
        let stat = |name: &str| {
            let text =
                client().get(format!("{admin}/stats")).query(&[("filter", name)]).send().unwrap().text().unwrap();
            text.lines().filter_map(|l| l.rsplit_once(": ")?.1.trim().parse::<u64>().ok()).sum::<u64>()
        };
        eprintln!(
            "{admin}: usage reports to a dead tracker {} (connect failures), ejections {}",
            stat(&format!("^cluster\\.{cluster}\\.upstream_cx_connect_fail$")),
            stat(&format!("^cluster\\.{cluster}\\.outlier_detection\\.ejections_enforced_total$"))
        );
    }
}

/// Istio-shaped, a push reaches the whole fleet (as istiod pushes to every pod of a
/// gateway): both replicas watch the same ECDS file, `push_plugin_config` returns once
/// both applied it, and afterwards each takes the new key and refuses the old one.
#[test]
fn an_istio_shaped_push_reaches_every_gateway() {
    let (old, new) = (dev::new_api_key(), dev::new_api_key());
    let keys =
        |key: &str| json!({"api_keys": {"keys": [dev::key_entry(key, "pushed-user", &["premium".to_string()])]}});
    let stack = Stack::start(StackOptions {
        plugin_config: keys(&old),
        label: "fleet-istio".into(),
        gateways: 2,
        istio_shaped: true,
        ..StackOptions::default()
    })
    .unwrap();
    let status = |gateway: &str, key: &str| {
        chat_at(&fresh_client(), gateway, &[("authorization", &format!("Bearer {key}"))], &chat_body(2, 2, false))
            .status()
            .as_u16()
    };
    for gateway in &stack.gateway_urls {
        assert_eq!((status(gateway, &old), status(gateway, &new)), (200, 401), "{gateway} before the push");
    }
    stack.push_plugin_config(&keys(&new)).unwrap();
    for gateway in &stack.gateway_urls {
        // Each worker of each replica: new connections, a few times.
        for _ in 0..4 {
            assert_eq!((status(gateway, &new), status(gateway, &old)), (200, 401), "{gateway} after the push");
        }
    }
}
