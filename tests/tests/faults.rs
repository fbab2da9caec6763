#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code: a panic is a failed test
//! Faults between Envoy and the usage tracker (issue 12). Envoy's usage cluster points
//! at a [`FaultTracker`] that forwards to the real tracker until a test switches it to
//! a fault: connections refused, reset after the response head or mid-body, a hang
//! past the filter's timeout, 500/503/429, a 64 MiB answer, an answer that is not
//! HTTP, slow accepts. During each, authorized traffic (plain and streamed chat
//! completions, partly a concurrent burst) must be served in full, the Wasm VM must not
//! trap, and once the tracker is healthy again it must have counted every request
//! exactly once: most faults lose only the answer after the events were delivered, so
//! the filter retries with the same ids and the tracker drops the copies.
//!
//! The end of a fault is told by the proxy, not by time: it reads the event ids of the
//! reports it delivers, and the test waits until every event delivered in a report
//! whose answer was lost has been delivered again and acknowledged; the tracker's
//! duplicate counter must then equal the extra copies that went through.
//!
//! Each test prints one row: mode, authorized requests sent / served in full, reports
//! that met the fault, requests the tracker counted, duplicates it dropped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use harness::envoy::LOCAL_USAGE_CLUSTER;
use reqwest::blocking::Client;
use serde_json::{json, Value};
use tollgate_e2e::*;

/// Authorized requests sent one after another on one connection before the burst.
const SEQUENTIAL: u64 = 8;
/// The concurrent burst: threads × requests each (each thread its own connection).
const BURST_THREADS: u64 = 8;
const BURST_EACH: u64 = 4;
/// Requests on fresh connections after the fault, to reach both workers' VMs.
const ALIVE_CHECKS: u64 = 4;
/// Longest wait for the count after the fault ends: the filter backs off up to 10 s.
const RECOVERY: Duration = Duration::from_secs(40);

/// The usage section: flush often, give up on a report after 500 ms (so a hang is short).
fn usage(max_queue: Option<u64>) -> Value {
    let mut usage = json!({"cluster": LOCAL_USAGE_CLUSTER, "authority": "usage-tracking", "path": "/track",
                           "flush_interval_ms": 100, "timeout_ms": 500});
    if let Some(q) = max_queue {
        usage["max_queue"] = json!(q);
        usage["max_batch"] = json!(q.min(100));
    }
    json!({ "usage": usage })
}

struct Gate {
    stack: Stack,
    user: String,
    bearer: String,
}

impl Gate {
    fn start(label: &str, max_queue: Option<u64>) -> Gate {
        let creds = DevCredentials::generate();
        let opts = StackOptions { fault_tracker: true, concurrency: 2, ..StackOptions::default() };
        let stack = start_with(label, &creds, usage(max_queue), opts);
        Gate { stack, user: creds.user.clone(), bearer: format!("Bearer {}", creds.api_key) }
    }

    fn fault(&self) -> &FaultTracker {
        self.stack.fault().expect("stack started with a fault tracker")
    }

    /// Usage reports that met `mode`. Refused connections never reach the fault
    /// tracker, so for `Refuse` Envoy's count of failed connects to the usage cluster.
    fn exercised(&self, mode: FaultMode) -> u64 {
        match mode {
            FaultMode::Refuse => {
                envoy_counter(&self.stack, &format!("cluster.{LOCAL_USAGE_CLUSTER}.upstream_cx_connect_fail"))
            }
            m => self.fault().seen(m),
        }
    }

    fn counted(&self) -> f64 {
        tracker_value(&self.stack, "llm_requests_total", &[("user", &self.user)])
    }

    fn settle_count(&self, want: u64) -> u64 {
        settle_metric(&self.stack, "llm_requests_total", &[("user", &self.user)], want as f64, RECOVERY) as u64
    }

    fn duplicates(&self) -> u64 {
        tracker_value(&self.stack, "tracker_events_duplicate_total", &[]) as u64
    }

    /// Waits until every event whose answer a fault lost was sent again and answered
    /// (the filter's queues drained past the fault), then until the tracker's duplicate
    /// counter matches the copies that went through the proxy. Returns (events still
    /// unsettled, tracker duplicates, copies), the last values seen.
    fn drain(&self) -> (usize, u64, u64) {
        let fault = self.fault();
        let deadline = Instant::now() + RECOVERY;
        while fault.unsettled() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (duplicates, expected) = (self.duplicates(), fault.expected_duplicates());
            if duplicates == expected || Instant::now() > deadline {
                return (fault.unsettled(), duplicates, expected);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn assert_vm_alive(&self, mode: FaultMode) {
        let failures = vm_failures(&self.stack.envoy_log());
        assert!(
            failures.is_empty(),
            "mode {mode}: the Wasm VM failed; Envoy log {}:\n{}",
            self.stack.dir.join("envoy.log").display(),
            failures.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
        );
    }
}

/// Authorized requests sent and how many were served in full.
#[derive(Default)]
struct Traffic {
    sent: AtomicU64,
    served: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl Traffic {
    /// One authorized chat completion, streamed (asking for usage) or not; it must get
    /// the upstream's 200 and a complete body.
    fn one(&self, client: &Client, gate: &Gate, stream: bool) {
        self.sent.fetch_add(1, Ordering::SeqCst);
        match authorized(client, gate, stream) {
            Ok(()) => {
                self.served.fetch_add(1, Ordering::SeqCst);
            }
            Err(e) => self.errors.lock().unwrap().push(e),
        }
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    fn served(&self) -> u64 {
        self.served.load(Ordering::SeqCst)
    }

    fn assert_all_served(&self, what: &str) {
        let errors = self.errors.lock().unwrap();
        assert!(
            errors.is_empty(),
            "{what}: {} of {} authorized requests not served in full, e.g.:\n{}",
            errors.len(),
            self.sent(),
            errors.iter().take(5).cloned().collect::<Vec<_>>().join("\n")
        );
    }

    /// The sequential part, then the concurrent burst.
    fn send_mix(&self, gate: &Gate) {
        let c = client();
        for i in 0..SEQUENTIAL {
            self.one(&c, gate, i % 2 == 1);
        }
        std::thread::scope(|s| {
            for t in 0..BURST_THREADS {
                s.spawn(move || {
                    let c = client();
                    for i in 0..BURST_EACH {
                        self.one(&c, gate, (t + i) % 2 == 0);
                    }
                });
            }
        });
    }
}

fn authorized(client: &Client, gate: &Gate, stream: bool) -> Result<(), String> {
    let mut body = chat_body(3, 4, stream);
    if stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    let resp = client
        .post(format!("{}/v1/chat/completions", gate.stack.gateway_url))
        .header("authorization", &gate.bearer)
        .json(&body)
        .send()
        .map_err(|e| format!("send: {e}"))?;
    let status = resp.status();
    let text = resp.text().map_err(|e| format!("status {status}, body cut: {e}"))?;
    if status != 200 {
        return Err(format!("status {status}: {text}"));
    }
    let complete = if stream {
        text.ends_with("data: [DONE]\n\n") && text.contains(r#""usage":{"#)
    } else {
        serde_json::from_str::<Value>(&text)
            .is_ok_and(|v| v["choices"][0]["message"]["content"].is_string() && v["usage"]["completion_tokens"] == 4)
    };
    if complete {
        Ok(())
    } else {
        Err(format!("incomplete {} body: {text}", if stream { "stream" } else { "JSON" }))
    }
}

/// The fault suite's one scenario, for `mode`.
fn survive(mode: FaultMode) {
    let gate = Gate::start(&format!("fault-{mode}"), None);
    let traffic = Traffic::default();
    let before = gate.exercised(mode);
    gate.fault().set_mode(mode).unwrap();

    traffic.send_mix(&gate);
    // The fault must have been met at least twice; traffic goes on while waiting, in
    // case a report went through before the mode was reached by both workers.
    let poll = client();
    let met = eventually(Duration::from_secs(30), &format!("2 usage reports meeting {mode}"), || {
        let n = gate.exercised(mode) - before;
        if n >= 2 {
            Some(n)
        } else {
            traffic.one(&poll, &gate, false);
            None
        }
    });
    for _ in 0..ALIVE_CHECKS {
        traffic.one(&client(), &gate, true);
    }
    // A trap is the likeliest cause of a request not served: report it first.
    gate.assert_vm_alive(mode);
    traffic.assert_all_served(&format!("during {mode}"));

    gate.fault().set_mode(FaultMode::Healthy).unwrap();
    let sent = traffic.sent();
    let counted = gate.settle_count(sent);
    traffic.one(&client(), &gate, false); // the marker
    let counted_marker = gate.settle_count(sent + 1);
    let (unsettled, duplicates, expected) = gate.drain();
    println!(
        "| {mode} | sent {} | served {} | reports meeting the fault {met} | counted {counted} (+marker: {counted_marker}) \
         | tracker duplicates dropped {duplicates} (copies through the proxy: {expected}) | events unsettled {unsettled} |",
        traffic.sent(),
        traffic.served(),
    );
    gate.assert_vm_alive(mode);
    traffic.assert_all_served(&format!("after {mode}"));
    assert_eq!(counted, sent, "mode {mode}: requests counted once the tracker was healthy again");
    assert_eq!(counted_marker, sent + 1, "mode {mode}: requests counted after the marker");
    assert_eq!(unsettled, 0, "mode {mode}: events delivered with a lost answer and never sent again");
    assert_eq!(duplicates, expected, "mode {mode}: copies the tracker dropped vs. copies it was sent");
    // Every retry is in: nothing was counted twice.
    assert_eq!(gate.counted() as u64, sent + 1, "mode {mode}: count after the retries");
}

macro_rules! fault_tests {
    ($($name:ident => $mode:expr),* $(,)?) => {
        $(#[test] fn $name() { survive($mode) })*
    };
}

fault_tests! {
    refuse => FaultMode::Refuse,
    reset_after_head => FaultMode::ResetAfterHead,
    reset_mid_body => FaultMode::ResetMidBody,
    hang => FaultMode::Hang,
    status_500 => FaultMode::Status(500),
    status_503 => FaultMode::Status(503),
    status_429 => FaultMode::Status(429),
    huge_body => FaultMode::HugeBody,
    not_http => FaultMode::NotHttp,
    slow_accept => FaultMode::SlowAccept,
}

/// A flood of unauthenticated requests while the tracker is away must not push the
/// authorized requests' events out of the bounded queue (`max_queue` 200 per worker):
/// denials are aggregated apart from authorized events, with a `count` the tracker sums.
#[test]
fn denial_flood_during_outage_loses_no_authorized_event() {
    const THREADS: u64 = 5;
    const DENIALS_EACH: u64 = 2000;
    const AUTHORIZED_EVERY: u64 = 200;
    let gate = Gate::start("fault-denial-flood", Some(200));
    gate.fault().set_mode(FaultMode::Refuse).unwrap();
    let traffic = Traffic::default();
    let denied = AtomicU64::new(0);
    let wrong = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            s.spawn(|| {
                let c = client();
                for i in 0..DENIALS_EACH {
                    match c.get(format!("{}/v1/models", gate.stack.gateway_url)).send() {
                        Ok(r) if r.status() == 401 => {
                            let _ = r.bytes();
                            denied.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(r) => wrong.lock().unwrap().push(format!("status {}", r.status())),
                        Err(e) => wrong.lock().unwrap().push(e.to_string()),
                    }
                    if (i + 1) % AUTHORIZED_EVERY == 0 {
                        traffic.one(&c, &gate, (i + 1) % (2 * AUTHORIZED_EVERY) == 0);
                    }
                }
            });
        }
    });
    let wrong = wrong.into_inner().unwrap();
    assert!(wrong.is_empty(), "{} denials went wrong, e.g. {:?}", wrong.len(), wrong.first());
    traffic.assert_all_served("during the flood");
    let total_denied = THREADS * DENIALS_EACH;
    assert_eq!(denied.load(Ordering::SeqCst), total_denied);
    eventually(Duration::from_secs(30), "2 refused usage reports", || {
        (gate.exercised(FaultMode::Refuse) >= 2).then_some(())
    });
    gate.assert_vm_alive(FaultMode::Refuse);

    gate.fault().set_mode(FaultMode::Healthy).unwrap();
    let sent = traffic.sent();
    let counted = gate.settle_count(sent);
    let labels = [("reason", "missing_credential")];
    let denials_counted =
        settle_metric(&gate.stack, "llm_denied_requests_total", &labels, total_denied as f64, Duration::from_secs(10));
    println!(
        "| denial flood (refuse, max_queue 200) | authorized sent {sent} | served {} | counted {counted} \
         | denials sent {total_denied} | counted {denials_counted} | tracker duplicates dropped {} |",
        traffic.served(),
        gate.duplicates()
    );
    gate.assert_vm_alive(FaultMode::Healthy);
    assert_eq!(counted, sent, "authorized requests counted after a denial flood during an outage");
    assert_eq!(denials_counted, total_denied as f64, "denials counted");
}
