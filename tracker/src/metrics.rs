//! The counters and the state that decides what they count.
//!
//! A checked batch is applied under one lock, so two copies of a batch arriving at once
//! cannot both pass the duplicate check.
//!
//! Series creation: `llm_tokens_total` gets all four `type` series as soon as a
//! (user, groups, model) is first seen with usage, zeros included, so `rate()` and
//! `increase()` see the first real increment instead of a series that starts at it.

use std::sync::{Mutex, PoisonError};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::dedup::DedupWindow;
use crate::error::TrackError;
use crate::event::{Event, Outcome, Usage};
use crate::labels::CardinalityGuard;

/// The service's limits; see the README and `--help` for why each default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_batch: usize,
    pub dedup_window: usize,
    pub max_users: usize,
    pub max_groups: usize,
    pub max_models: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 1 << 20,
            max_batch: 10_000,
            dedup_window: 100_000,
            max_users: 10_000,
            max_groups: 1_000,
            max_models: 1_000,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    user: String,
    groups: String,
    path: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    user: String,
    groups: String,
    model: String,
    r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeniedLabels {
    reason: &'static str,
    path: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectedLabels {
    reason: &'static str,
}

/// What one `/track` request did: the body of its 200 answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Ingested {
    /// Events counted.
    pub accepted: u64,
    /// Events dropped because their id was in the dedup window.
    pub duplicates: u64,
}

/// Mutable state behind the lock.
#[derive(Debug)]
struct State {
    dedup: DedupWindow,
    users: CardinalityGuard,
    groups: CardinalityGuard,
    models: CardinalityGuard,
}

/// The registry, its counters, and the dedup and cardinality state. One per process
/// (or per test), shared by every request.
#[derive(Debug)]
pub struct Tracker {
    limits: Limits,
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    tokens: Family<TokenLabels, Counter>,
    denied: Family<DeniedLabels, Counter>,
    incomplete: Family<RequestLabels, Counter>,
    upstream_errors: Family<RequestLabels, Counter>,
    events_received: Counter,
    events_duplicate: Counter,
    rejected: Family<RejectedLabels, Counter>,
    state: Mutex<State>,
}

impl Tracker {
    pub fn new(limits: Limits) -> Self {
        let mut registry = Registry::default();
        let requests = Family::default();
        let tokens = Family::default();
        let denied = Family::default();
        let incomplete = Family::default();
        let upstream_errors = Family::default();
        let events_received = Counter::default();
        let events_duplicate = Counter::default();
        let rejected = Family::<RejectedLabels, Counter>::default();
        // Counter names are registered without `_total`; the encoder appends it.
        registry.register("llm_requests", "Authorized requests", requests.clone());
        registry.register("llm_tokens", "Tokens used by authorized requests, by type", tokens.clone());
        registry.register("llm_denied_requests", "Requests the gateway denied, by reason", denied.clone());
        registry.register(
            "llm_incomplete_requests",
            "Authorized requests the client left before the response ended",
            incomplete.clone(),
        );
        registry.register(
            "llm_upstream_errors",
            "Authorized requests the upstream answered with a 5xx status",
            upstream_errors.clone(),
        );
        registry.register(
            "tracker_events_received",
            "Events in accepted /track requests, duplicates included",
            events_received.clone(),
        );
        registry.register(
            "tracker_events_duplicate",
            "Events dropped because their id was in the dedup window",
            events_duplicate.clone(),
        );
        registry.register(
            "tracker_requests_rejected",
            "/track requests refused as bad input, by reason",
            rejected.clone(),
        );
        for reason in ["bad_json", "invalid_event", "too_large"] {
            rejected.get_or_create(&RejectedLabels { reason }).inc_by(0);
        }
        Tracker {
            limits,
            registry,
            requests,
            tokens,
            denied,
            incomplete,
            upstream_errors,
            events_received,
            events_duplicate,
            rejected,
            state: Mutex::new(State {
                dedup: DedupWindow::new(limits.dedup_window),
                users: CardinalityGuard::new(limits.max_users),
                groups: CardinalityGuard::new(limits.max_groups),
                models: CardinalityGuard::new(limits.max_models),
            }),
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Counts a checked batch. Cannot fail: everything that could go wrong was ruled
    /// out when the batch was checked.
    pub fn ingest(&self, events: Vec<Event>) -> Ingested {
        // Nothing here can panic, so a poisoned lock only means a panic elsewhere; the
        // state is still consistent.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mut done = Ingested::default();
        for event in events {
            if let Some(id) = &event.id {
                if !state.dedup.insert(id) {
                    done.duplicates += 1;
                    continue;
                }
            }
            done.accepted += 1;
            match event.outcome {
                Outcome::Denied { reason } => {
                    self.denied.get_or_create(&DeniedLabels { reason, path: event.path }).inc();
                }
                Outcome::Authorized(usage) => self.count_usage(&mut state, event.path, usage),
            }
        }
        self.events_received.inc_by(done.accepted + done.duplicates);
        self.events_duplicate.inc_by(done.duplicates);
        done
    }

    fn count_usage(&self, state: &mut State, path: &'static str, usage: Usage) {
        let user = state.users.admit(usage.user);
        let groups = state.groups.admit(usage.groups);
        let labels = RequestLabels { user, groups, path };
        self.requests.get_or_create(&labels).inc();
        if usage.incomplete {
            self.incomplete.get_or_create(&labels).inc();
        }
        if usage.upstream_error {
            self.upstream_errors.get_or_create(&labels).inc();
        }
        if let Some(model) = usage.model {
            let model = state.models.admit(model);
            let RequestLabels { user, groups, .. } = labels;
            let mut labels = TokenLabels { user, groups, model, r#type: "prompt" };
            for (kind, n) in usage.tokens.by_type() {
                labels.r#type = kind;
                // Saturate instead of wrapping; safe because only this locked section adds.
                let counter = self.tokens.get_or_create(&labels);
                counter.inc_by(n.min(u64::MAX - counter.get()));
            }
        }
    }

    /// Counts a refused `/track` request (bad input only; other errors are not counted).
    pub fn reject(&self, error: &TrackError) {
        if let Some(reason) = error.rejected_reason() {
            self.rejected.get_or_create(&RejectedLabels { reason }).inc();
        }
    }

    /// The OpenMetrics text of every series.
    pub fn encode(&self) -> Result<String, TrackError> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .map_err(|e| TrackError::Internal(format!("encoding metrics failed: {e}")))?;
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{parse_body, MAX_TOKENS};

    #[test]
    fn token_counters_saturate_instead_of_wrapping() {
        let tracker = Tracker::new(Limits::default());
        let events: Vec<String> = (0..2100)
            .map(|i| format!(r#"{{"id":"{i}","user":"u","model":"m","prompt_tokens":{MAX_TOKENS}}}"#))
            .collect();
        let body = format!("[{}]", events.join(","));
        let done = tracker.ingest(parse_body(body.as_bytes(), 10_000).unwrap());
        assert_eq!(done, Ingested { accepted: 2100, duplicates: 0 });
        let text = tracker.encode().unwrap();
        let series = format!(r#"llm_tokens_total{{user="u",groups="",model="m",type="prompt"}} {}"#, u64::MAX);
        assert!(text.contains(&series), "{text}");
    }
}
