#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code: a panic is a failed test
//! Global limits (issue 15, README "Global limits across gateway replicas"): a fleet of
//! two gateway Envoys (two workers each) and two tracker replicas on one PostgreSQL,
//! the limits with `"scope": "global"`. Requests go round robin to both gateways from
//! several threads, each on a new connection, so all four workers admit.
//!
//! - A `requests_per_hour: 20` user sending 100 requests gets exactly 20 through the
//!   fleet (not 20 per gateway or per worker), with tracker replica 1 killed (SIGKILL)
//!   in the middle; the refusals are OpenAI-style 429s.
//! - A premium user without limits, at the same time, is never refused.
//! - A `tokens_per_hour` budget with streamed requests from clients that honour
//!   `retry-after`: the tokens the ledger counts stay within the budget, and what is
//!   left at the end is less than one request's reservation (grants a worker could not
//!   use went back to the others).
//!
//! Hour windows, so a run never straddles a window (the test waits when it would).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tollgate_e2e::*;

const REQUESTS_PER_HOUR: u64 = 20;
const TOKEN_BUDGET: u64 = 140;
const THREADS: usize = 6;
/// How long the clients of the token phase keep asking.
const TOKEN_SECONDS: u64 = 12;

struct Keys {
    limited: String,
    premium: String,
    budget: String,
    outage: String,
    streams: String,
}

/// The limit of the user of the outage phase.
const OUTAGE_PER_HOUR: u64 = 8;

/// The next request gets into the same hour as one 2 minutes later: waits out the
/// end of an hour otherwise.
fn same_hour_for_two_minutes() {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let left = 3_600 - secs % 3_600;
    if left < 120 {
        eprintln!("waiting {left} s for the next hour window");
        std::thread::sleep(Duration::from_secs(left + 1));
    }
}

/// Sends `n` requests from `THREADS` threads, request `k` to gateway `k % 2`, each on
/// a new connection; `answered(m)` runs after the `m`-th answer (from 1). The statuses
/// and bodies, in answer order.
fn hammer(stack: &Stack, key: &str, body: &Value, n: usize, answered: &(dyn Fn(usize) + Sync)) -> Vec<(u16, Value)> {
    let next = AtomicUsize::new(0);
    let out = Mutex::new(Vec::new());
    let auth = format!("Bearer {key}");
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            s.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::SeqCst);
                if k >= n {
                    break;
                }
                let gateway = &stack.gateway_urls[k % stack.gateway_urls.len()];
                let resp = chat_at(&fresh_client(), gateway, &[("authorization", &auth)], body);
                let status = resp.status().as_u16();
                let text = resp.text().unwrap_or_default();
                let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
                let m = {
                    let mut out = out.lock().unwrap();
                    out.push((status, value));
                    out.len()
                };
                answered(m);
            });
        }
    });
    out.into_inner().unwrap()
}

/// `THREADS` clients sending requests one after the other (new connections, round
/// robin over the gateways) for `period`; a 429 makes the client wait its
/// `retry-after` (as the OpenAI SDKs do), and stop when that is beyond the period.
fn clients(stack: &Stack, key: &str, body: &Value, period: Duration) -> Vec<(u16, Value)> {
    let end = Instant::now() + period;
    let next = AtomicUsize::new(0);
    let out = Mutex::new(Vec::new());
    let auth = format!("Bearer {key}");
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            s.spawn(|| {
                while Instant::now() < end {
                    let k = next.fetch_add(1, Ordering::SeqCst);
                    let gateway = &stack.gateway_urls[k % stack.gateway_urls.len()];
                    let resp = chat_at(&fresh_client(), gateway, &[("authorization", &auth)], body);
                    let status = resp.status().as_u16();
                    let retry = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
                    let text = resp.text().unwrap_or_default();
                    out.lock().unwrap().push((status, serde_json::from_str(&text).unwrap_or(Value::String(text))));
                    if let Some(secs) = retry {
                        let wake = Instant::now() + Duration::from_secs(secs);
                        if wake >= end {
                            break;
                        }
                        std::thread::sleep(Duration::from_secs(secs));
                    }
                }
            });
        }
    });
    out.into_inner().unwrap()
}

#[test]
fn a_fleet_holds_global_limits() {
    if postgres_missing() {
        return;
    }
    let keys = Keys {
        limited: dev::new_api_key(),
        premium: dev::new_api_key(),
        budget: dev::new_api_key(),
        outage: dev::new_api_key(),
        streams: dev::new_api_key(),
    };
    let config = json!({
        "api_keys": {"keys": [
            dev::key_entry(&keys.limited, "lim", &["free".to_string()]),
            dev::key_entry(&keys.premium, "prem", &["premium".to_string()]),
            dev::key_entry(&keys.budget, "budget", &["metered".to_string()]),
            dev::key_entry(&keys.outage, "outage", &["metered".to_string()]),
            dev::key_entry(&keys.streams, "streams", &["metered".to_string()]),
        ]},
        "limits": {
            "scope": "global",
            "groups": {"free": {"requests_per_hour": REQUESTS_PER_HOUR}},
            "users": {
                "budget": {"tokens_per_hour": TOKEN_BUDGET},
                "outage": {"requests_per_hour": OUTAGE_PER_HOUR},
                "streams": {"tokens_per_hour": 100_000}
            }
        }
    });
    let stack = Stack::start(StackOptions {
        plugin_config: config,
        label: "global-limits".into(),
        gateways: 2,
        trackers: 2,
        concurrency: 2,
        ..StackOptions::default()
    })
    .unwrap();

    // Requests: 100 from the limited user while the premium one sends 40, tracker
    // replica 1 killed once 40 of the limited user's were answered.
    same_hour_for_two_minutes();
    let body = chat_body(3, 4, false);
    let kill = |m: usize| {
        if m == 40 {
            stack.kill_tracker_at(1);
        }
    };
    let (limited, premium) = std::thread::scope(|s| {
        let premium = s.spawn(|| hammer(&stack, &keys.premium, &body, 40, &|_| {}));
        let limited = hammer(&stack, &keys.limited, &body, 100, &kill);
        (limited, premium.join().unwrap())
    });
    assert!(!stack.tracker_running(1), "tracker-1 was killed mid-way");
    let admitted = limited.iter().filter(|(status, _)| *status == 200).count() as u64;
    let refused: Vec<&Value> = limited.iter().filter(|(s, _)| *s == 429).map(|(_, v)| v).collect();
    eprintln!("requests_per_hour {REQUESTS_PER_HOUR}: admitted {admitted} of 100 across 2 gateways x 2 workers");
    assert_eq!(admitted + refused.len() as u64, 100, "only 200s and 429s: {limited:?}");
    if admitted != REQUESTS_PER_HOUR {
        for i in 0..2 {
            for l in stack.envoy_log_at(i).lines().filter(|l| l.contains("global limits")) {
                eprintln!("gateway-{i}: {l}");
            }
        }
    }
    assert_eq!(admitted, REQUESTS_PER_HOUR, "the fleet admits the limit, once");
    assert_eq!(refused[0]["error"]["code"], "rate_limit_exceeded", "{}", refused[0]);
    assert!(premium.iter().all(|(status, _)| *status == 200), "premium is unlimited: {premium:?}");

    // Tokens: streamed requests (3 prompt + 4 completion tokens each) against a budget,
    // each thread a client that honours `retry-after` (a request's reservation holds
    // budget while it is in flight), for TOKEN_SECONDS.
    same_hour_for_two_minutes();
    let mut body = chat_body(3, 4, true);
    body["stream_options"] = json!({"include_usage": true});
    let budget = clients(&stack, &keys.budget, &body, Duration::from_secs(TOKEN_SECONDS));
    let mut served = budget.iter().filter(|(status, _)| *status == 200).count() as u64;
    assert!(budget.iter().all(|(s, _)| *s == 200 || *s == 429), "{budget:?}");
    let used = |served: u64| {
        let total = eventually(Duration::from_secs(20), "the budget's streams in the ledger", || {
            let total = usage_total(&stack, &stack.tracker_urls[0], "budget")?;
            (total["requests"].as_u64() == Some(served)).then_some(total)
        });
        total["prompt_tokens"].as_u64().unwrap() + total["completion_tokens"].as_u64().unwrap()
    };
    let mut tokens = used(served);
    eprintln!("tokens_per_hour {TOKEN_BUDGET}: {served} of {} streams served, {tokens} tokens used", budget.len());
    assert!(tokens <= TOKEN_BUDGET, "{tokens} tokens used of a {TOKEN_BUDGET} budget");
    // What one request reserves (its prompt estimate at 4 bytes a token, plus its
    // max_tokens). Grants a worker could not use go back at its next syncs, so what is
    // left when the clients stopped may still sit in a lease: while at least one
    // reservation is left, one more request (honouring retry-after) must be served.
    let reservation = (serde_json::to_vec(&body).unwrap().len() as u64).div_ceil(4) + 4;
    let auth = format!("Bearer {}", keys.budget);
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut k = 0;
    while tokens + reservation <= TOKEN_BUDGET {
        assert!(
            Instant::now() < deadline,
            "{} tokens of the budget left unused, more than a request's {reservation}",
            TOKEN_BUDGET - tokens
        );
        k += 1;
        let resp = chat_at(
            &fresh_client(),
            &stack.gateway_urls[k % stack.gateway_urls.len()],
            &[("authorization", &auth)],
            &body,
        );
        match resp.status().as_u16() {
            200 => {
                let _ = resp.text();
                served += 1;
                tokens = used(served);
                assert!(tokens <= TOKEN_BUDGET, "{tokens} tokens used of a {TOKEN_BUDGET} budget");
            }
            429 => {
                let secs = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
                let wait = Duration::from_secs(secs.unwrap_or(1));
                std::thread::sleep(wait.min(deadline.saturating_duration_since(Instant::now())));
            }
            other => panic!("the budget answered {other}"),
        }
    }

    // A stream that does not ask for usage waits for its token lease in its body, which
    // is rewritten (include_usage forced) after the wait: the client sees no usage
    // chunk, and the tracker counts the real usage (3 + 4 tokens), not an estimate.
    for gateway in &stack.gateway_urls {
        let resp = chat_at(
            &fresh_client(),
            gateway,
            &[("authorization", &format!("Bearer {}", keys.streams))],
            &chat_body(3, 4, true),
        );
        assert_eq!(resp.status().as_u16(), 200);
        let text = resp.text().unwrap();
        assert!(text.ends_with("data: [DONE]\n\n") && !text.contains("\"usage\":{"), "{text}");
    }
    let total = eventually(Duration::from_secs(20), "the streams in the ledger", || {
        let total = usage_total(&stack, &stack.tracker_urls[0], "streams")?;
        (total["requests"].as_u64() == Some(2)).then_some(total)
    });
    assert_eq!((total["prompt_tokens"].as_u64(), total["completion_tokens"].as_u64()), (Some(6), Some(8)), "{total}");

    // Outage: every tracker down. For two sync intervals (the grace: a dead replica
    // among live ones is ejected meanwhile) a short lease refuses; then a user the
    // trackers never granted anything is admitted from the fallback share,
    // ceil(limit / replicas) per worker, with the 4 workers the trackers counted: never
    // unlimited, here never beyond the limit.
    stack.kill_tracker_at(0);
    let outage = clients(&stack, &keys.outage, &chat_body(3, 4, false), Duration::from_secs(5));
    let admitted = outage.iter().filter(|(status, _)| *status == 200).count() as u64;
    eprintln!("trackers down, requests_per_hour {OUTAGE_PER_HOUR}: admitted {admitted} of {}", outage.len());
    assert!((1..=OUTAGE_PER_HOUR).contains(&admitted), "admitted {admitted} with the trackers down");
    assert!(outage.iter().all(|(s, _)| *s == 200 || *s == 429), "{outage:?}");
    let logs = || (0..stack.gateway_urls.len()).map(|i| stack.envoy_log_at(i)).collect::<String>();
    assert!(logs().contains("trackers cannot be reached"), "the outage is logged");
    // Back: the leases resume (said in the log) at the next sync.
    stack.restart_tracker_at(0).unwrap();
    eventually(Duration::from_secs(15), "the gateways see the trackers again", || {
        hammer(&stack, &keys.outage, &chat_body(3, 4, false), 4, &|_| {});
        logs().contains("the trackers answer again").then_some(())
    });
}
