//! Usage events and their delivery queue.
//!
//! HTTP contexts record one event per request when its stream ends; the root context
//! owns the queue and sends batches from `on_tick` (a callout made by an HTTP context
//! would be cancelled when that context is destroyed). Why it is shaped this way:
//!
//! - **Authorized requests are billable; denials are not, and are cheap to forge.** So
//!   denials never enter the bounded queue of authorized events: they are counted per
//!   (reason, route) — a fixed set of keys — and leave as a few aggregated events with a
//!   `count` per flush. A flood of 401s cannot push out one authorized event.
//! - **A batch that failed goes back to the front with the same event ids**, so the
//!   tracker drops the duplicates of a batch it had already stored.
//! - **Attempts only count against the batch for failures that can be the batch's
//!   fault** (a 500): an unreachable, timing-out, overloaded or throttling tracker
//!   (no status, 502/503/504, 408, 429) costs no attempt, so an outage loses nothing
//!   but what overflows the bounded queue (counted).
//! - **Batches are bounded in events and bytes**; a 413 halves the batch size and
//!   resends the same events, it never drops them (only a lone event that is still too
//!   large is given up, and counted).
//!
//! Pure: the clock is an argument, the host only sees bodies and tokens. What a valid
//! event is comes from `tollgate_rules`, shared with the tracker.

use std::collections::{BTreeMap, HashMap, VecDeque};

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
    /// The token counts are the filter's estimate, not the upstream's report (no usage
    /// could be read; see README, Limits).
    pub usage_estimated: bool,
    pub denied: Option<String>,
}

impl UsageEvent {
    /// The event of a request as it starts (no identity, status or usage yet), its
    /// method, host and path cut as the tracker stores them (one definition for the
    /// filter and for the benchmark's ext_proc peer).
    pub fn started(method: &str, host: &str, path: &str, ts_s: f64) -> Self {
        UsageEvent {
            id: String::new(),
            ts: ts_s,
            user: None,
            groups: Vec::new(),
            method: first_chars(method, 16).to_string(),
            host: first_chars(host, 256).to_string(),
            path: report_path(path).to_string(),
            model: None,
            status: None,
            prompt_tokens: 0,
            completion_tokens: 0,
            cached_tokens: 0,
            reasoning_tokens: 0,
            incomplete: false,
            usage_missing: true,
            usage_estimated: false,
            denied: None,
        }
    }

    /// The counts as the tracker accepts them (each at most `tollgate_rules::MAX_TOKENS`:
    /// an upstream that reports an absurd count must not get the batch refused).
    pub fn set_usage(&mut self, usage: Option<Usage>) {
        let u = usage.unwrap_or_default();
        self.prompt_tokens = tollgate_rules::tokens(u.prompt_tokens);
        self.completion_tokens = tollgate_rules::tokens(u.completion_tokens);
        self.cached_tokens = tollgate_rules::tokens(u.cached_tokens);
        self.reasoning_tokens = tollgate_rules::tokens(u.reasoning_tokens);
        self.usage_missing = usage.is_none();
        self.usage_estimated = false;
    }

    /// Counts estimated by the filter for a request whose usage could not be read.
    pub fn set_estimate(&mut self, prompt_tokens: u64, completion_tokens: u64) {
        self.prompt_tokens = tollgate_rules::tokens(prompt_tokens);
        self.completion_tokens = tollgate_rules::tokens(completion_tokens);
        self.cached_tokens = 0;
        self.reasoning_tokens = 0;
        self.usage_missing = true;
        self.usage_estimated = true;
    }

    /// The upstream's status as the tracker accepts it.
    pub fn set_status(&mut self, status: Option<&str>) {
        self.status = status.and_then(|s| s.trim().parse::<u32>().ok()).and_then(tollgate_rules::status).map(u32::from);
    }
}

/// One aggregated denial event: `count` requests denied for `reason` on `path`.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct DenialEvent<'a> {
    id: &'a str,
    ts: f64,
    denied: &'a str,
    path: &'a str,
    count: u64,
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
        use std::fmt::Write;
        self.next = self.next.wrapping_add(1);
        let mut id = String::with_capacity(self.prefix.len() + 21);
        id.push_str(&self.prefix);
        let _ = write!(id, "-{}", self.next);
        id
    }
}

/// The first `n` characters of `s` (a slice, not a copy char by char).
fn first_chars(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => s.get(..i).unwrap_or(s),
        None => s,
    }
}

/// The path as reported and logged: without its query string (which may hold
/// secrets), bounded to 256 characters.
pub fn report_path(path: &str) -> &str {
    first_chars(path.split(['?', '#']).next().unwrap_or(""), 256)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Authorized events held (queued and in flight); the oldest are dropped beyond it.
    pub max_queue: usize,
    pub max_batch: usize,
    /// Largest request body of one batch.
    pub max_batch_bytes: usize,
    pub max_attempts: u32,
    /// Batches in flight at once per worker.
    pub max_in_flight: usize,
    /// First wait after a failed send; doubled per consecutive failure.
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
}

/// Aggregated denial events waiting to be sent, at most. Beyond it, denials keep
/// being counted (losslessly) in the per-(reason, route) map until these are sent.
pub const MAX_DENIAL_EVENTS: usize = 64;

/// Bytes reserved for one serialized usage event (most are 300–450).
const EVENT_CAPACITY: usize = 512;

#[derive(Debug, Clone)]
struct Pending {
    /// The event as JSON (serde_json writes UTF-8).
    json: Vec<u8>,
    attempts: u32,
    /// An aggregated denial event (`count` requests), not an authorized request.
    denials: u64,
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
    /// The tracker was not reached, is overloaded or refuses the gateway's ingest
    /// token (no status: refused, reset, timeout; 502, 503, 504, 408, 429; 401, 403 —
    /// a token being rotated, not bad data): try again later; costs no attempt.
    Unavailable,
    /// Another 5xx: try again later; counts as an attempt of each event.
    Failed,
    /// 413: the batch is too large; resent in smaller batches.
    TooLarge,
    /// Another 4xx: the tracker refuses the batch; sending it again cannot help.
    Rejected,
}

impl SendOutcome {
    pub fn from_status(status: Option<u32>) -> Self {
        match status {
            Some(200..=299) => SendOutcome::Delivered,
            None | Some(401 | 403 | 408 | 429 | 502 | 503 | 504) => SendOutcome::Unavailable,
            Some(413) => SendOutcome::TooLarge,
            Some(400..=499) => SendOutcome::Rejected,
            Some(_) => SendOutcome::Failed,
        }
    }
}

/// Counters of what the queue did, logged and exposed for tests. Authorized events
/// and denied requests are counted apart.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub queued: u64,
    pub delivered: u64,
    pub dropped_overflow: u64,
    pub dropped_attempts: u64,
    pub rejected: u64,
    pub retries: u64,
    /// Denied requests counted, and delivered to the tracker (in aggregated events).
    pub denials: u64,
    pub denials_delivered: u64,
    pub denials_lost: u64,
    /// Batches split after a 413.
    pub splits: u64,
}

/// The bounded, batching, retrying queue of serialized events.
#[derive(Debug)]
pub struct EventQueue {
    limits: QueueLimits,
    ids: EventIds,
    pending: VecDeque<Pending>,
    /// Aggregated denial events formed, with their ids, waiting to be sent.
    denial_events: VecDeque<Pending>,
    /// Denied requests not yet in an event, per (reason, route): a fixed, small set.
    denial_counts: BTreeMap<(&'static str, &'static str), u64>,
    in_flight: HashMap<u32, Vec<Pending>>,
    /// Usage events (not denial counts) in `in_flight`: kept, not counted per request.
    in_flight_events: usize,
    stats: QueueStats,
    consecutive_failures: u32,
    retry_at_ms: u64,
    /// Events per batch now: `max_batch`, halved by each 413, doubled back by successes.
    batch_cap: usize,
}

impl EventQueue {
    pub fn new(limits: QueueLimits, ids: EventIds) -> Self {
        Self {
            limits,
            ids,
            pending: VecDeque::new(),
            denial_events: VecDeque::new(),
            denial_counts: BTreeMap::new(),
            in_flight: HashMap::new(),
            in_flight_events: 0,
            stats: QueueStats::default(),
            consecutive_failures: 0,
            retry_at_ms: 0,
            batch_cap: limits.max_batch.max(1),
        }
    }

    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    /// New limits (a config push); what is queued stays, the next pushes and batches
    /// follow the new bounds.
    pub fn set_limits(&mut self, limits: QueueLimits) {
        if limits != self.limits {
            self.limits = limits;
            self.batch_cap = limits.max_batch.max(1);
        }
    }

    /// Authorized events waiting (not in flight).
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// A full batch waits: worth sending now rather than at the next tick (a worker
    /// under heavy traffic drains at the tracker's pace, not one round per tick).
    pub fn backlog(&self) -> bool {
        self.pending.len() >= self.batch_cap
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty() && self.denial_events.is_empty() && self.denial_counts.is_empty()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Queues an authorized request's event under a fresh id.
    pub fn push(&mut self, mut event: UsageEvent) {
        event.id = self.ids.next_id();
        // Sized for a typical event at once (growing from empty took ~8 reallocations).
        let mut json = Vec::with_capacity(EVENT_CAPACITY);
        if serde_json::to_writer(&mut json, &event).is_err() {
            return;
        }
        self.push_back(Pending { json, attempts: 0, denials: 0 });
        self.stats.queued += 1;
    }

    /// Counts a denied request; it leaves in an aggregated event of its reason and route.
    pub fn deny(&mut self, reason: &str, path: &str) {
        let key = (tollgate_rules::deny_reason(reason), tollgate_rules::route(path));
        let n = self.denial_counts.entry(key).or_insert(0);
        // Within what the tracker accepts (beyond it, in one flush interval, not counted).
        *n = n.saturating_add(1).min(tollgate_rules::MAX_DENIED_COUNT);
        self.stats.denials += 1;
    }

    fn push_back(&mut self, p: Pending) {
        while self.pending.len() + self.in_flight_events >= self.limits.max_queue {
            if self.pending.pop_front().is_none() {
                break;
            }
            self.stats.dropped_overflow += 1;
        }
        self.pending.push_back(p);
    }

    /// Turns counted denials into events (with ids), as far as there is room.
    fn form_denial_events(&mut self, now_ms: u64) {
        while self.denial_events.len() < MAX_DENIAL_EVENTS {
            let Some(((reason, path), count)) = self.denial_counts.pop_first() else { break };
            let id = self.ids.next_id();
            let event = DenialEvent { id: &id, ts: now_ms as f64 / 1000.0, denied: reason, path, count };
            let Ok(json) = serde_json::to_vec(&event) else { continue };
            self.denial_events.push_back(Pending { json, attempts: 0, denials: count });
        }
    }

    /// The next batch to send, if any, if another may be in flight and if no
    /// back-off after a failure is running. The caller must then call
    /// [`EventQueue::sent`] with the host's token, or [`EventQueue::send_failed`].
    pub fn next_batch(&mut self, now_ms: u64) -> Option<(Batch, Vec<PendingHandle>)> {
        if self.in_flight.len() >= self.limits.max_in_flight || now_ms < self.retry_at_ms {
            return None;
        }
        if self.consecutive_failures > 0 && !self.in_flight.is_empty() {
            return None; // while failing, probe with one batch at a time
        }
        self.form_denial_events(now_ms);
        if self.pending.is_empty() && self.denial_events.is_empty() {
            return None;
        }
        let mut taken: Vec<Pending> = Vec::new();
        let mut bytes = 2usize;
        // Denial events first (few, small), then authorized events, oldest first.
        for queue in [&mut self.denial_events, &mut self.pending] {
            while taken.len() < self.batch_cap {
                let Some(next) = queue.front() else { break };
                let size = next.json.len() + 1;
                if !taken.is_empty() && bytes + size > self.limits.max_batch_bytes {
                    break;
                }
                let Some(p) = queue.pop_front() else { break };
                bytes += size;
                taken.push(p);
            }
        }
        let mut body = Vec::with_capacity(bytes);
        body.push(b'[');
        for (i, p) in taken.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&p.json);
        }
        body.push(b']');
        let events = taken.len();
        Some((Batch { body, events }, taken.into_iter().map(PendingHandle).collect()))
    }

    /// The host accepted the call under `token`.
    pub fn sent(&mut self, token: u32, handles: Vec<PendingHandle>) {
        let events: Vec<Pending> = handles.into_iter().map(|h| h.0).collect();
        self.in_flight_events += usage_events(&events);
        if let Some(replaced) = self.in_flight.insert(token, events) {
            self.in_flight_events = self.in_flight_events.saturating_sub(usage_events(&replaced));
        }
    }

    /// The host refused the call (e.g. unknown cluster): the events go back, no
    /// attempt counted (the tracker never saw them).
    pub fn send_failed(&mut self, handles: Vec<PendingHandle>, now_ms: u64) {
        self.requeue(handles.into_iter().map(|h| h.0).collect(), false);
        self.back_off(now_ms);
    }

    /// The response (or failure) for the batch sent under `token`.
    pub fn completed(&mut self, token: u32, outcome: SendOutcome, now_ms: u64) {
        let Some(events) = self.in_flight.remove(&token) else { return };
        self.in_flight_events = self.in_flight_events.saturating_sub(usage_events(&events));
        match outcome {
            SendOutcome::Delivered => {
                for p in &events {
                    if p.denials > 0 {
                        self.stats.denials_delivered = self.stats.denials_delivered.saturating_add(p.denials);
                    } else {
                        self.stats.delivered += 1;
                    }
                }
                self.consecutive_failures = 0;
                self.retry_at_ms = 0;
                self.batch_cap = self.batch_cap.saturating_mul(2).min(self.limits.max_batch.max(1));
            }
            SendOutcome::Rejected => self.lose(events, Loss::Rejected),
            SendOutcome::TooLarge if events.len() <= 1 => self.lose(events, Loss::Rejected),
            SendOutcome::TooLarge => {
                self.stats.splits += 1;
                self.batch_cap = (events.len() / 2).max(1);
                self.requeue(events, false);
            }
            SendOutcome::Unavailable | SendOutcome::Failed => {
                self.requeue(events, outcome == SendOutcome::Failed);
                self.back_off(now_ms);
            }
        }
    }

    /// The tracker stored a delivered batch but refused `n` of its events (reported by
    /// index in its answer): they count as rejected, not delivered.
    pub fn tracker_refused(&mut self, n: u64) {
        let n = n.min(self.stats.delivered);
        self.stats.delivered -= n;
        self.stats.rejected += n;
    }

    fn back_off(&mut self, now_ms: u64) {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        let shift = self.consecutive_failures.saturating_sub(1).min(20);
        let wait = self.limits.backoff_base_ms.saturating_mul(1 << shift).min(self.limits.backoff_max_ms);
        self.retry_at_ms = now_ms.saturating_add(wait);
    }

    fn lose(&mut self, events: Vec<Pending>, why: Loss) {
        for p in events {
            if p.denials > 0 {
                self.stats.denials_lost = self.stats.denials_lost.saturating_add(p.denials);
            } else {
                match why {
                    Loss::Rejected => self.stats.rejected += 1,
                    Loss::Attempts => self.stats.dropped_attempts += 1,
                }
            }
        }
    }

    /// Events go back to the front of their queue, in order, with their ids; with
    /// `count_attempt`, those out of attempts are dropped (counted) instead.
    fn requeue(&mut self, events: Vec<Pending>, count_attempt: bool) {
        let mut keep: Vec<Pending> = Vec::with_capacity(events.len());
        let mut spent = Vec::new();
        for mut p in events {
            if count_attempt {
                p.attempts = p.attempts.saturating_add(1);
            }
            if p.attempts >= self.limits.max_attempts {
                spent.push(p);
            } else {
                keep.push(p);
            }
        }
        self.lose(spent, Loss::Attempts);
        self.stats.retries += keep.len() as u64;
        for p in keep.into_iter().rev() {
            if p.denials > 0 {
                self.denial_events.push_front(p);
            } else {
                self.pending.push_front(p);
            }
        }
        while self.pending.len() + self.in_flight_events > self.limits.max_queue {
            if self.pending.pop_front().is_none() {
                break;
            }
            self.stats.dropped_overflow += 1;
        }
    }
}

/// Usage events among `events` (denial counts are not).
fn usage_events(events: &[Pending]) -> usize {
    events.iter().filter(|p| p.denials == 0).count()
}

#[derive(Debug, Clone, Copy)]
enum Loss {
    Rejected,
    Attempts,
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
            id: String::new(),
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
            usage_estimated: false,
            denied: None,
        }
    }

    fn limits(max_queue: usize, max_batch: usize, max_attempts: u32) -> QueueLimits {
        QueueLimits {
            max_queue,
            max_batch,
            max_batch_bytes: 1 << 20,
            max_attempts,
            max_in_flight: 2,
            backoff_base_ms: 0,
            backoff_max_ms: 0,
        }
    }

    fn queue(limits: QueueLimits) -> EventQueue {
        EventQueue::new(limits, EventIds::new(0xabc))
    }

    fn parse(batch: &Batch) -> Vec<serde_json::Value> {
        serde_json::from_slice(&batch.body).unwrap()
    }

    /// The authorized events of a batch, by their `prompt_tokens` (the test's label).
    fn labels(batch: &Batch) -> Vec<u64> {
        parse(batch).iter().filter(|e| e["denied"].is_null()).map(|e| e["prompt_tokens"].as_u64().unwrap()).collect()
    }

    fn ids(batch: &Batch) -> Vec<String> {
        parse(batch).iter().map(|e| e["id"].as_str().unwrap().to_string()).collect()
    }

    #[test]
    fn event_json_matches_the_contract() {
        let mut e = event(3);
        e.set_usage(None);
        let v: serde_json::Value = serde_json::to_value(&e).unwrap();
        assert_eq!(v["usage_missing"], true);
        assert_eq!(v["usage_estimated"], false);
        assert_eq!(v["prompt_tokens"], 0);
        assert!(v["denied"].is_null());
        assert!(v.get("model").is_none());
        e.set_estimate(10, u64::MAX);
        let v: serde_json::Value = serde_json::to_value(&e).unwrap();
        assert_eq!((v["usage_missing"].clone(), v["usage_estimated"].clone()), (true.into(), true.into()));
        assert_eq!(
            (v["prompt_tokens"].as_u64(), v["completion_tokens"].as_u64()),
            (Some(10), Some(tollgate_rules::MAX_TOKENS))
        );
    }

    #[test]
    fn counts_and_statuses_stay_within_what_the_tracker_accepts() {
        let mut e = event(0);
        let huge = Usage { prompt_tokens: u64::MAX, completion_tokens: 1 << 60, cached_tokens: 5, reasoning_tokens: 0 };
        e.set_usage(Some(huge));
        assert_eq!(
            (e.prompt_tokens, e.completion_tokens, e.cached_tokens),
            (tollgate_rules::MAX_TOKENS, tollgate_rules::MAX_TOKENS, 5)
        );
        let cases =
            [(Some("200"), Some(200)), (Some("99"), None), (Some("1000"), None), (Some("x"), None), (None, None)];
        for (raw, want) in cases {
            e.set_status(raw);
            assert_eq!(e.status, want, "{raw:?}");
        }
    }

    #[test]
    fn batches_respect_max_batch_and_order() {
        let mut q = queue(limits(100, 3, 5));
        for n in 0..7 {
            q.push(event(n));
        }
        let (b1, h1) = q.next_batch(0).unwrap();
        assert_eq!(labels(&b1), [0, 1, 2]);
        q.sent(1, h1);
        let (b2, h2) = q.next_batch(0).unwrap();
        assert_eq!(b2.events, 3);
        q.sent(2, h2);
        assert!(q.next_batch(0).is_none(), "max_in_flight reached");
        q.completed(1, SendOutcome::Delivered, 0);
        let (b3, _) = q.next_batch(0).unwrap();
        assert_eq!(labels(&b3), [6]);
        assert_eq!(q.stats().delivered, 3);
    }

    #[test]
    fn batches_respect_max_batch_bytes() {
        let mut q = queue(QueueLimits { max_batch_bytes: 1000, ..limits(100, 100, 5) });
        for n in 0..10 {
            q.push(event(n));
        }
        let mut seen = Vec::new();
        let mut token = 0;
        while let Some((b, h)) = q.next_batch(0) {
            assert!(b.body.len() <= 1000, "{} bytes", b.body.len());
            seen.extend(labels(&b));
            token += 1;
            q.sent(token, h);
            q.completed(token, SendOutcome::Delivered, 0);
        }
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        assert!(token > 1);
    }

    #[test]
    fn failed_batches_come_back_first_with_the_same_ids() {
        let mut q = queue(limits(100, 2, 5));
        for n in 0..3 {
            q.push(event(n));
        }
        let (b, h) = q.next_batch(0).unwrap();
        q.sent(7, h);
        q.completed(7, SendOutcome::Unavailable, 0);
        let (again, h) = q.next_batch(0).unwrap();
        assert_eq!(ids(&again), ids(&b));
        q.send_failed(h, 0);
        let (again2, _) = q.next_batch(0).unwrap();
        assert_eq!(ids(&again2), ids(&b));
        assert_eq!(q.stats().retries, 4);
    }

    #[test]
    fn only_server_errors_spend_attempts() {
        // (outcome, sends before the event is dropped; None: never dropped)
        let cases = [(SendOutcome::Failed, Some(3)), (SendOutcome::Unavailable, None)];
        for (outcome, dropped_after) in cases {
            let mut q = queue(limits(100, 10, 3));
            q.push(event(1));
            for token in 0..10 {
                let Some((_, h)) = q.next_batch(0) else {
                    assert_eq!(Some(token), dropped_after, "{outcome:?}");
                    break;
                };
                q.sent(token, h);
                q.completed(token, outcome, 0);
            }
            assert_eq!(q.stats().dropped_attempts, u64::from(dropped_after.is_some()), "{outcome:?}");
        }
    }

    #[test]
    fn too_large_splits_and_never_drops_more_than_one_lone_event() {
        let mut q = queue(limits(100, 8, 3));
        for n in 0..8 {
            q.push(event(n));
        }
        let mut delivered = Vec::new();
        let mut token = 0;
        // The tracker takes at most 3 events per request; event 5 is too large even alone.
        while let Some((b, h)) = q.next_batch(0) {
            token += 1;
            let got = labels(&b);
            q.sent(token, h);
            let outcome =
                if got.len() > 3 || got.contains(&5) { SendOutcome::TooLarge } else { SendOutcome::Delivered };
            if outcome == SendOutcome::Delivered {
                delivered.extend(got);
            }
            q.completed(token, outcome, 0);
            assert!(token < 50, "no progress");
        }
        assert_eq!(delivered, [0, 1, 2, 3, 4, 6, 7]);
        let stats = q.stats();
        assert_eq!((stats.rejected, stats.dropped_attempts, stats.dropped_overflow), (1, 0, 0));
        assert!(stats.splits >= 2);
    }

    #[test]
    fn overflow_drops_the_oldest_and_counts() {
        let mut q = queue(limits(3, 10, 3));
        for n in 0..5 {
            q.push(event(n));
        }
        assert_eq!(q.len(), 3);
        assert_eq!(q.stats().dropped_overflow, 2);
        let (b, _) = q.next_batch(0).unwrap();
        assert_eq!(labels(&b), [2, 3, 4]);
    }

    #[test]
    fn denials_are_aggregated_apart_and_never_push_out_authorized_events() {
        let mut q = queue(limits(50, 500, 3));
        for n in 0..50 {
            q.push(event(n));
            for _ in 0..200 {
                q.deny("missing_credential", "/v1/chat/completions?x=1");
            }
        }
        q.deny("rate_limited", "/v1/models");
        q.deny("something odd", "/admin");
        assert_eq!(q.stats().dropped_overflow, 0);
        // A long outage: many failed flushes, no status at all.
        for token in 0..100 {
            let (_, h) = q.next_batch(0).unwrap();
            q.sent(token, h);
            q.completed(token, SendOutcome::Unavailable, 0);
            q.deny("invalid_credential", "/v1/completions");
        }
        let (b, h) = q.next_batch(0).unwrap();
        q.sent(1000, h);
        q.completed(1000, SendOutcome::Delivered, 0);
        assert_eq!(labels(&b), (0..50).collect::<Vec<_>>());
        let mut denied: BTreeMap<(String, String), u64> = BTreeMap::new();
        for e in parse(&b).iter().filter(|e| !e["denied"].is_null()) {
            assert!(e.get("user").is_none());
            let key = (e["denied"].as_str().unwrap().to_string(), e["path"].as_str().unwrap().to_string());
            *denied.entry(key).or_default() += e["count"].as_u64().unwrap();
        }
        // Counted after the batch was formed: still waiting, not lost.
        while let Some((b, h)) = q.next_batch(0) {
            for e in parse(&b) {
                let key = (e["denied"].as_str().unwrap().to_string(), e["path"].as_str().unwrap().to_string());
                *denied.entry(key).or_default() += e["count"].as_u64().unwrap();
            }
            q.sent(2000, h);
            q.completed(2000, SendOutcome::Delivered, 0);
        }
        let want: BTreeMap<(String, String), u64> = [
            (("invalid_credential", "/v1/completions"), 100),
            (("missing_credential", "/v1/chat/completions"), 10_000),
            (("other", "other"), 1),
            (("rate_limited", "/v1/models"), 1),
        ]
        .into_iter()
        .map(|((r, p), n)| ((r.to_string(), p.to_string()), n))
        .collect();
        assert_eq!(denied, want);
        let stats = q.stats();
        assert_eq!(
            (stats.delivered, stats.dropped_overflow, stats.denials, stats.denials_delivered),
            (50, 0, 10_102, 10_102)
        );
    }

    #[test]
    fn a_resent_denial_event_keeps_its_id_and_count() {
        let mut q = queue(limits(10, 10, 3));
        q.deny("missing_credential", "/v1/models");
        let (b, h) = q.next_batch(0).unwrap();
        q.sent(1, h);
        q.deny("missing_credential", "/v1/models");
        q.completed(1, SendOutcome::Unavailable, 0);
        let (again, _) = q.next_batch(0).unwrap();
        let first = parse(&b);
        let second = parse(&again);
        assert_eq!(second[0], first[0], "the same event, same id and count");
        assert_eq!(second.len(), 2, "the later denial in its own event");
        assert_ne!(second[1]["id"], first[0]["id"]);
    }

    #[test]
    fn rejected_batches_are_not_retried() {
        let mut q = queue(limits(10, 10, 3));
        q.push(event(1));
        let (_, h) = q.next_batch(0).unwrap();
        q.sent(1, h);
        q.completed(1, SendOutcome::Rejected, 0);
        assert!(q.next_batch(0).is_none());
        assert_eq!(q.stats().rejected, 1);
    }

    #[test]
    fn failures_back_off_exponentially_and_success_resets() {
        let mut q = queue(QueueLimits { backoff_base_ms: 100, backoff_max_ms: 350, ..limits(100, 1, 100) });
        q.push(event(1));
        q.push(event(2));
        let mut now = 1_000;
        for want_wait in [100, 200, 350, 350] {
            let (_, h) = q.next_batch(now).unwrap();
            q.sent(1, h);
            q.completed(1, SendOutcome::Unavailable, now);
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
            (None, SendOutcome::Unavailable),
            (Some(502), SendOutcome::Unavailable),
            (Some(503), SendOutcome::Unavailable),
            (Some(504), SendOutcome::Unavailable),
            (Some(429), SendOutcome::Unavailable),
            (Some(408), SendOutcome::Unavailable),
            (Some(500), SendOutcome::Failed),
            (Some(501), SendOutcome::Failed),
            (Some(413), SendOutcome::TooLarge),
            (Some(400), SendOutcome::Rejected),
            (Some(404), SendOutcome::Rejected),
            (Some(401), SendOutcome::Unavailable),
            (Some(403), SendOutcome::Unavailable),
            (Some(100), SendOutcome::Failed),
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
        assert!(x.iter().all(|id| tollgate_rules::event_id(id)));
        assert_eq!(report_path("/v1/chat/completions?key=secret"), "/v1/chat/completions");
        assert_eq!(report_path(&"a".repeat(1000)).len(), 256);
    }
}
