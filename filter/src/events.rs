//! Usage events and their delivery queue.
//!
//! HTTP contexts record one event per request when its stream ends; the root context
//! owns the queue and sends batches from `on_tick` (a callout made by an HTTP context
//! would be cancelled when that context is destroyed). The queue is bounded (oldest
//! dropped and counted on overflow), a failed batch goes back to the front with the
//! same event ids so the tracker can drop duplicates, and attempts are bounded.
//! Pure: the clock is an argument, the host only sees bodies and tokens.

use std::collections::{HashMap, VecDeque};

use serde::Serialize;

use crate::usage::Usage;

/// One request as the usage-tracking service sees it (design.md §6).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageEvent {
    pub id: String,
    pub ts: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    pub groups: Vec<String>,
    pub method: String,
    pub host: String,
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u32>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    pub reasoning_tokens: u64,
    pub incomplete: bool,
    pub usage_missing: bool,
    pub denied: Option<String>,
}

impl UsageEvent {
    pub fn set_usage(&mut self, usage: Option<Usage>) {
        let u = usage.unwrap_or_default();
        self.prompt_tokens = u.prompt_tokens;
        self.completion_tokens = u.completion_tokens;
        self.cached_tokens = u.cached_tokens;
        self.reasoning_tokens = u.reasoning_tokens;
        self.usage_missing = usage.is_none();
    }
}

/// Makes ids unique across VMs and restarts: a random per-VM prefix and a counter.
#[derive(Debug, Clone)]
pub struct EventIds {
    prefix: String,
    next: u64,
}

impl EventIds {
    pub fn new(random: u64) -> Self {
        Self { prefix: format!("{random:016x}"), next: 0 }
    }

    pub fn next_id(&mut self) -> String {
        self.next = self.next.wrapping_add(1);
        format!("{}-{}", self.prefix, self.next)
    }
}

/// The path as reported and logged: without its query string (which may hold
/// secrets), bounded to 256 characters.
pub fn report_path(path: &str) -> &str {
    let p = path.split(['?', '#']).next().unwrap_or("");
    match p.char_indices().nth(256) {
        Some((i, _)) => p.get(..i).unwrap_or(p),
        None => p,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    pub max_queue: usize,
    pub max_batch: usize,
    pub max_attempts: u32,
    /// Batches in flight at once per worker.
    pub max_in_flight: usize,
    /// First wait after a failed send; doubled per consecutive failure.
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
}

#[derive(Debug, Clone)]
struct Pending {
    json: String,
    attempts: u32,
}

/// A batch handed to the host: the JSON array body and how many events it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub body: Vec<u8>,
    pub events: usize,
}

/// How a send ended, as the glue saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    /// 2xx: the tracker has the events.
    Delivered,
    /// No `:status` (connect failure, timeout, reset), 5xx, 408 or 429: try again later.
    Retry,
    /// Another 4xx: the tracker refuses the batch; sending it again cannot help.
    Rejected,
}

impl SendOutcome {
    pub fn from_status(status: Option<u32>) -> Self {
        match status {
            Some(200..=299) => SendOutcome::Delivered,
            Some(408) | Some(429) | None => SendOutcome::Retry,
            Some(400..=499) => SendOutcome::Rejected,
            Some(_) => SendOutcome::Retry,
        }
    }
}

/// Counters of what the queue did, logged and exposed for tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub queued: u64,
    pub delivered: u64,
    pub dropped_overflow: u64,
    pub dropped_attempts: u64,
    pub rejected: u64,
    pub retries: u64,
}

/// The bounded, batching, retrying queue of serialized events.
#[derive(Debug)]
pub struct EventQueue {
    limits: QueueLimits,
    pending: VecDeque<Pending>,
    in_flight: HashMap<u32, Vec<Pending>>,
    stats: QueueStats,
    consecutive_failures: u32,
    retry_at_ms: u64,
}

impl EventQueue {
    pub fn new(limits: QueueLimits) -> Self {
        Self {
            limits,
            pending: VecDeque::new(),
            in_flight: HashMap::new(),
            stats: QueueStats::default(),
            consecutive_failures: 0,
            retry_at_ms: 0,
        }
    }

    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    pub fn push(&mut self, event: &UsageEvent) {
        let Ok(json) = serde_json::to_string(event) else { return };
        self.push_back(Pending { json, attempts: 0 });
        self.stats.queued += 1;
    }

    fn push_back(&mut self, p: Pending) {
        while self.pending.len() + self.in_flight_events() >= self.limits.max_queue {
            if self.pending.pop_front().is_none() {
                break;
            }
            self.stats.dropped_overflow += 1;
        }
        self.pending.push_back(p);
    }

    fn in_flight_events(&self) -> usize {
        self.in_flight.values().map(Vec::len).sum()
    }

    /// The next batch to send, if any, if another may be in flight and if no
    /// back-off after a failure is running. The caller must then call
    /// [`EventQueue::sent`] with the host's token, or [`EventQueue::send_failed`].
    pub fn next_batch(&mut self, now_ms: u64) -> Option<(Batch, Vec<PendingHandle>)> {
        if self.pending.is_empty() || self.in_flight.len() >= self.limits.max_in_flight || now_ms < self.retry_at_ms {
            return None;
        }
        if self.consecutive_failures > 0 && !self.in_flight.is_empty() {
            return None; // while failing, probe with one batch at a time
        }
        let n = self.pending.len().min(self.limits.max_batch);
        let taken: Vec<Pending> = self.pending.drain(..n).collect();
        let mut body = Vec::with_capacity(taken.iter().map(|p| p.json.len() + 1).sum::<usize>() + 2);
        body.push(b'[');
        for (i, p) in taken.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(p.json.as_bytes());
        }
        body.push(b']');
        let events = taken.len();
        Some((Batch { body, events }, taken.into_iter().map(PendingHandle).collect()))
    }

    /// The host accepted the call under `token`.
    pub fn sent(&mut self, token: u32, handles: Vec<PendingHandle>) {
        self.in_flight.insert(token, handles.into_iter().map(|h| h.0).collect());
    }

    /// The host refused the call (e.g. unknown cluster): the events go back.
    pub fn send_failed(&mut self, handles: Vec<PendingHandle>, now_ms: u64) {
        self.requeue(handles.into_iter().map(|h| h.0).collect());
        self.back_off(now_ms);
    }

    /// The response (or failure) for the batch sent under `token`.
    pub fn completed(&mut self, token: u32, outcome: SendOutcome, now_ms: u64) {
        let Some(events) = self.in_flight.remove(&token) else { return };
        match outcome {
            SendOutcome::Delivered => {
                self.stats.delivered += events.len() as u64;
                self.consecutive_failures = 0;
                self.retry_at_ms = 0;
            }
            SendOutcome::Rejected => self.stats.rejected += events.len() as u64,
            SendOutcome::Retry => {
                self.requeue(events);
                self.back_off(now_ms);
            }
        }
    }

    fn back_off(&mut self, now_ms: u64) {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        let shift = self.consecutive_failures.saturating_sub(1).min(20);
        let wait = self.limits.backoff_base_ms.saturating_mul(1 << shift).min(self.limits.backoff_max_ms);
        self.retry_at_ms = now_ms.saturating_add(wait);
    }

    /// Failed events go back to the front, in order, unless out of attempts.
    fn requeue(&mut self, events: Vec<Pending>) {
        let mut keep: Vec<Pending> = Vec::with_capacity(events.len());
        for mut p in events {
            p.attempts = p.attempts.saturating_add(1);
            if p.attempts >= self.limits.max_attempts {
                self.stats.dropped_attempts += 1;
            } else {
                keep.push(p);
            }
        }
        self.stats.retries += keep.len() as u64;
        for p in keep.into_iter().rev() {
            self.pending.push_front(p);
        }
        while self.pending.len() + self.in_flight_events() > self.limits.max_queue {
            if self.pending.pop_front().is_none() {
                break;
            }
            self.stats.dropped_overflow += 1;
        }
    }
}

/// Events taken for a batch, to be handed back with the host's verdict.
#[derive(Debug)]
pub struct PendingHandle(Pending);

#[cfg(test)]
mod tests {
    // Under wasm-bindgen-test the same tests run compiled to wasm32 (see `make test-wasm`).
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn event(n: u64) -> UsageEvent {
        UsageEvent {
            id: format!("id-{n}"),
            ts: 1.5,
            user: Some("u".into()),
            groups: vec!["g".into()],
            method: "POST".into(),
            host: "h".into(),
            path: "/v1/chat/completions".into(),
            model: None,
            status: Some(200),
            prompt_tokens: n,
            completion_tokens: 0,
            cached_tokens: 0,
            reasoning_tokens: 0,
            incomplete: false,
            usage_missing: false,
            denied: None,
        }
    }

    fn limits(max_queue: usize, max_batch: usize, max_attempts: u32) -> QueueLimits {
        QueueLimits { max_queue, max_batch, max_attempts, max_in_flight: 2, backoff_base_ms: 0, backoff_max_ms: 0 }
    }

    fn ids(batch: &Batch) -> Vec<String> {
        let v: Vec<serde_json::Value> = serde_json::from_slice(&batch.body).unwrap();
        v.iter().map(|e| e["id"].as_str().unwrap().to_string()).collect()
    }

    #[test]
    fn event_json_matches_the_contract() {
        let mut e = event(3);
        e.set_usage(None);
        let v: serde_json::Value = serde_json::to_value(&e).unwrap();
        assert_eq!(v["usage_missing"], true);
        assert_eq!(v["prompt_tokens"], 0);
        assert!(v["denied"].is_null());
        assert!(v.get("model").is_none());
        let mut d = event(1);
        d.user = None;
        d.denied = Some("invalid_credential".into());
        let v = serde_json::to_value(&d).unwrap();
        assert!(v.get("user").is_none());
        assert_eq!(v["denied"], "invalid_credential");
    }

    #[test]
    fn batches_respect_max_batch_and_order() {
        let mut q = EventQueue::new(limits(100, 3, 5));
        for n in 0..7 {
            q.push(&event(n));
        }
        let (b1, h1) = q.next_batch(0).unwrap();
        assert_eq!(ids(&b1), ["id-0", "id-1", "id-2"]);
        q.sent(1, h1);
        let (b2, h2) = q.next_batch(0).unwrap();
        assert_eq!(b2.events, 3);
        q.sent(2, h2);
        assert!(q.next_batch(0).is_none(), "max_in_flight reached");
        q.completed(1, SendOutcome::Delivered, 0);
        let (b3, _) = q.next_batch(0).unwrap();
        assert_eq!(ids(&b3), ["id-6"]);
        assert_eq!(q.stats().delivered, 3);
    }

    #[test]
    fn failed_batches_come_back_first_with_the_same_ids() {
        let mut q = EventQueue::new(limits(100, 2, 5));
        for n in 0..3 {
            q.push(&event(n));
        }
        let (b, h) = q.next_batch(0).unwrap();
        q.sent(7, h);
        q.completed(7, SendOutcome::Retry, 0);
        let (again, h) = q.next_batch(0).unwrap();
        assert_eq!(ids(&again), ids(&b));
        q.send_failed(h, 0);
        let (again2, _) = q.next_batch(0).unwrap();
        assert_eq!(ids(&again2), ids(&b));
        assert_eq!(q.stats().retries, 4);
    }

    #[test]
    fn attempts_are_bounded() {
        let mut q = EventQueue::new(limits(100, 10, 3));
        q.push(&event(1));
        for token in 0..3 {
            let (_, h) = q.next_batch(0).unwrap();
            q.sent(token, h);
            q.completed(token, SendOutcome::Retry, 0);
        }
        assert!(q.next_batch(0).is_none());
        assert_eq!(q.stats().dropped_attempts, 1);
    }

    #[test]
    fn overflow_drops_the_oldest_and_counts() {
        let mut q = EventQueue::new(limits(3, 10, 3));
        for n in 0..5 {
            q.push(&event(n));
        }
        assert_eq!(q.len(), 3);
        assert_eq!(q.stats().dropped_overflow, 2);
        let (b, _) = q.next_batch(0).unwrap();
        assert_eq!(ids(&b), ["id-2", "id-3", "id-4"]);
    }

    #[test]
    fn rejected_batches_are_not_retried() {
        let mut q = EventQueue::new(limits(10, 10, 3));
        q.push(&event(1));
        let (_, h) = q.next_batch(0).unwrap();
        q.sent(1, h);
        q.completed(1, SendOutcome::Rejected, 0);
        assert!(q.next_batch(0).is_none());
        assert_eq!(q.stats().rejected, 1);
    }

    #[test]
    fn failures_back_off_exponentially_and_success_resets() {
        let mut q = EventQueue::new(QueueLimits { backoff_base_ms: 100, backoff_max_ms: 350, ..limits(100, 1, 100) });
        q.push(&event(1));
        q.push(&event(2));
        let mut now = 1_000;
        for want_wait in [100, 200, 350, 350] {
            let (_, h) = q.next_batch(now).unwrap();
            q.sent(1, h);
            q.completed(1, SendOutcome::Retry, now);
            assert!(q.next_batch(now + want_wait - 1).is_none(), "backing off {want_wait}");
            now += want_wait;
        }
        let (_, h) = q.next_batch(now).unwrap();
        q.sent(2, h);
        q.completed(2, SendOutcome::Delivered, now);
        assert!(q.next_batch(now).is_some(), "no back-off after a success");
    }

    #[test]
    fn outcome_from_status() {
        let cases = [
            (Some(200), SendOutcome::Delivered),
            (Some(204), SendOutcome::Delivered),
            (None, SendOutcome::Retry),
            (Some(503), SendOutcome::Retry),
            (Some(429), SendOutcome::Retry),
            (Some(408), SendOutcome::Retry),
            (Some(400), SendOutcome::Rejected),
            (Some(413), SendOutcome::Rejected),
        ];
        for (status, want) in cases {
            assert_eq!(SendOutcome::from_status(status), want, "{status:?}");
        }
    }

    #[test]
    fn ids_are_unique_and_paths_lose_queries() {
        let mut a = EventIds::new(1);
        let mut b = EventIds::new(2);
        let x = [a.next_id(), a.next_id(), b.next_id()];
        assert_ne!(x[0], x[1]);
        assert_ne!(x[0], x[2]);
        assert_eq!(report_path("/v1/chat/completions?key=secret"), "/v1/chat/completions");
        assert_eq!(report_path(&"a".repeat(1000)).len(), 256);
    }
}
