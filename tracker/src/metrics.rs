//! The counters and the state that decides what they count.
//!
//! Without a ledger, a checked batch is applied under one lock, so two copies of a
//! batch arriving at once cannot both pass the duplicate check. With a ledger
//! ([`crate::ledger`]), the ledger decides what is new (its unique index on the event
//! id), the batch is committed before anything is counted, and on start the counters are
//! restored from the ledger's totals, so they continue where they were.
//!
//! Series creation: `llm_tokens_total` gets all four `type` series as soon as a
//! (user, groups, model) is first seen with usage, zeros included, so `rate()` and
//! `increase()` see the first real increment instead of a series that starts at it.

use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::dedup::DedupWindow;
use crate::error::{Rejected, TrackError};
use crate::event::{Event, Outcome};
use crate::labels::{self, CardinalityGuard, SeriesGuard, OTHER};
use crate::ledger::{Ledger, LedgerError, SeriesKey, Totals};
use crate::limits_sync::Leases;
use crate::time;

/// The service's limits; see the README and `--help` for why each default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_batch: usize,
    pub dedup_window: usize,
    pub max_users: usize,
    pub max_groups: usize,
    pub max_models: usize,
    /// Most (user, groups, path, model) combinations with their own series.
    pub max_series: usize,
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
            max_series: 50_000,
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
struct EstimatedLabels {
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LedgerOpLabels {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SyncLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResolveLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CountedLabels {
    counted: &'static str,
}

/// The `outcome` label values of `tracker_limit_syncs_total`.
pub const SYNC_OUTCOMES: [&str; 4] = ["ok", "invalid", "unauthorized", "unavailable"];

/// The `outcome` label values of `tracker_key_resolves_total`: `unknown` is also a
/// revoked or expired key (they get the same answer).
pub const RESOLVE_OUTCOMES: [&str; 2] = ["found", "unknown"];

/// The `op` label values of `tracker_ledger_errors_total`.
pub const LEDGER_OPS: [&str; 3] = ["write", "read", "compact"];

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
    series: SeriesGuard,
}

/// The registry, its counters, and the dedup and cardinality state. One per process
/// (or per test), shared by every request.
#[derive(Debug)]
pub struct Tracker {
    limits: Limits,
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    tokens: Family<TokenLabels, Counter>,
    estimated: Family<EstimatedLabels, Counter>,
    denied: Family<DeniedLabels, Counter>,
    incomplete: Family<RequestLabels, Counter>,
    upstream_errors: Family<RequestLabels, Counter>,
    events_received: Counter,
    events_duplicate: Counter,
    rejected: Family<RejectedLabels, Counter>,
    ledger_errors: Family<LedgerOpLabels, Counter>,
    series_overflow: Counter,
    limit_syncs: Family<SyncLabels, Counter>,
    limit_granted: Family<CountedLabels, Counter>,
    keys_created: Counter,
    keys_revoked: Counter,
    key_resolves: Family<ResolveLabels, Counter>,
    /// Global limits without a ledger, and when their housekeeping last ran.
    leases: Leases,
    state: Mutex<State>,
    /// The durable store; `None`: in memory only.
    ledger: Option<Arc<Ledger>>,
    /// SHA-256 of the usage API's bearer secret; `None`: the usage API is off (404).
    api_token: Option<[u8; 32]>,
    /// SHA-256 of the bearer secret `/track` requires; `None`: `/track` is open.
    ingest_token: Option<[u8; 32]>,
    /// SHA-256 of the keys API's bearer secret; `None`: the keys API is off (404).
    admin_token: Option<[u8; 32]>,
    /// Where counters saturate: `u64::MAX`, or with a ledger `i64::MAX`, the most the
    /// ledger stores, so a restored counter equals the one it replaces.
    cap: u64,
}

impl Tracker {
    pub fn new(limits: Limits) -> Self {
        let mut registry = Registry::default();
        let requests = Family::default();
        let tokens = Family::default();
        let estimated = Family::default();
        let denied = Family::default();
        let incomplete = Family::default();
        let upstream_errors = Family::default();
        let events_received = Counter::default();
        let events_duplicate = Counter::default();
        let rejected = Family::<RejectedLabels, Counter>::default();
        // Counter names are registered without `_total`; the encoder appends it.
        registry.register("llm_requests", "Authorized requests", requests.clone());
        registry.register("llm_tokens", "Tokens used by authorized requests, by type", tokens.clone());
        registry.register(
            "llm_estimated_tokens",
            "The part of llm_tokens_total the gateway estimated (no usage in the response), by type",
            estimated.clone(),
        );
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
            "Good events in /track requests answered 200, duplicates included",
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
        for reason in ["bad_json", "invalid_event", "too_large", "unauthorized"] {
            rejected.get_or_create(&RejectedLabels { reason }).inc_by(0);
        }
        let ledger_errors = Family::<LedgerOpLabels, Counter>::default();
        registry.register(
            "tracker_ledger_errors",
            "Failed ledger operations, by operation (a failed write answers 503 and is retried by the sender)",
            ledger_errors.clone(),
        );
        let series_overflow = Counter::default();
        registry.register(
            "tracker_series_overflow",
            "Events counted under user/groups/model \"other\" because --max-series label combinations exist",
            series_overflow.clone(),
        );
        let limit_syncs = Family::<SyncLabels, Counter>::default();
        registry.register(
            "tracker_limit_syncs",
            "POST /v1/limits/sync requests, by outcome (ok, invalid, unauthorized, unavailable)",
            limit_syncs.clone(),
        );
        for outcome in SYNC_OUTCOMES {
            limit_syncs.get_or_create(&SyncLabels { outcome }).inc_by(0);
        }
        let limit_granted = Family::<CountedLabels, Counter>::default();
        registry.register(
            "tracker_limit_granted",
            "Units of global limits granted to gateway replicas as leases, by what the limit counts",
            limit_granted.clone(),
        );
        for counted in crate::limits_sync::counted_labels() {
            limit_granted.get_or_create(&CountedLabels { counted }).inc_by(0);
        }
        let keys_created = Counter::default();
        registry.register("tracker_keys_created", "Managed API keys created (POST /v1/keys)", keys_created.clone());
        let keys_revoked = Counter::default();
        registry.register(
            "tracker_keys_revoked",
            "Managed API keys revoked (DELETE /v1/keys/{id}; revoking a revoked key again does not count)",
            keys_revoked.clone(),
        );
        let key_resolves = Family::<ResolveLabels, Counter>::default();
        registry.register(
            "tracker_key_resolves",
            "POST /v1/keys/resolve answers, by outcome (found; unknown, revoked or expired)",
            key_resolves.clone(),
        );
        for outcome in RESOLVE_OUTCOMES {
            key_resolves.get_or_create(&ResolveLabels { outcome }).inc_by(0);
        }
        Tracker {
            limits,
            registry,
            requests,
            tokens,
            estimated,
            denied,
            incomplete,
            upstream_errors,
            events_received,
            events_duplicate,
            rejected,
            ledger_errors,
            series_overflow,
            limit_syncs,
            limit_granted,
            keys_created,
            keys_revoked,
            key_resolves,
            leases: Leases::default(),
            ledger: None,
            api_token: None,
            ingest_token: None,
            admin_token: None,
            cap: u64::MAX,
            state: Mutex::new(State {
                dedup: DedupWindow::new(limits.dedup_window),
                users: CardinalityGuard::new(limits.max_users),
                groups: CardinalityGuard::new(limits.max_groups),
                models: CardinalityGuard::new(limits.max_models),
                series: SeriesGuard::new(limits.max_series),
            }),
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// A tracker backed by `ledger`: its counters start from this replica's totals in
    /// the ledger, and [`Tracker::record`] writes every batch there before counting it.
    pub async fn with_ledger(limits: Limits, ledger: Arc<Ledger>) -> Result<Tracker, LedgerError> {
        let mut tracker = Tracker::new(limits);
        tracker.cap = crate::ledger::from_sql(i64::MAX);
        let series = ledger.restore().await?;
        tracker.restore(series);
        for op in LEDGER_OPS {
            tracker.ledger_errors.get_or_create(&LedgerOpLabels { op }).inc_by(0);
        }
        tracker.ledger = Some(ledger);
        Ok(tracker)
    }

    /// Turns the usage API on with this bearer secret (`None` or empty: off).
    pub fn with_api_token(mut self, token: Option<&str>) -> Tracker {
        self.api_token = token.filter(|t| !t.is_empty()).map(|t| Sha256::digest(t.as_bytes()).into());
        self
    }

    /// Makes `/track` require this bearer secret (`None` or empty: `/track` stays open).
    pub fn with_ingest_token(mut self, token: Option<&str>) -> Tracker {
        self.ingest_token = token.filter(|t| !t.is_empty()).map(|t| Sha256::digest(t.as_bytes()).into());
        self
    }

    /// Turns the keys API (`/v1/keys`) on with this bearer secret (`None` or empty: off).
    pub fn with_admin_token(mut self, token: Option<&str>) -> Tracker {
        self.admin_token = token.filter(|t| !t.is_empty()).map(|t| Sha256::digest(t.as_bytes()).into());
        self
    }

    /// SHA-256 of the keys API's secret, if it is on.
    pub fn admin_token_digest(&self) -> Option<&[u8; 32]> {
        self.admin_token.as_ref()
    }

    /// Counts a managed API key created.
    pub fn count_key_created(&self) {
        self.keys_created.inc();
    }

    /// Counts a managed API key revoked (the first time only).
    pub fn count_key_revoked(&self) {
        self.keys_revoked.inc();
    }

    /// Counts a key resolve (`outcome` is one of [`RESOLVE_OUTCOMES`]).
    pub fn count_key_resolve(&self, outcome: &'static str) {
        self.key_resolves.get_or_create(&ResolveLabels { outcome }).inc();
    }

    /// SHA-256 of `/track`'s secret, if it needs one.
    pub fn ingest_token_digest(&self) -> Option<&[u8; 32]> {
        self.ingest_token.as_ref()
    }

    /// Counts a `/track` request refused for a missing or wrong bearer secret.
    pub fn reject_unauthorized(&self) {
        self.rejected.get_or_create(&RejectedLabels { reason: "unauthorized" }).inc();
    }

    /// Counts a `/v1/limits/sync` request (`outcome` is one of [`SYNC_OUTCOMES`]).
    pub fn count_limit_sync(&self, outcome: &'static str) {
        self.limit_syncs.get_or_create(&SyncLabels { outcome }).inc();
    }

    /// Counts units of a limit granted by a sync.
    pub fn count_limit_granted(&self, counted: &'static str, units: u64) {
        self.limit_granted.get_or_create(&CountedLabels { counted }).inc_by(units);
    }

    /// The global-limits state of this tracker (the store without a ledger).
    pub fn leases(&self) -> &Leases {
        &self.leases
    }

    pub fn ledger(&self) -> Option<&Arc<Ledger>> {
        self.ledger.as_ref()
    }

    /// SHA-256 of the usage API's secret, if it is on.
    pub fn api_token_digest(&self) -> Option<&[u8; 32]> {
        self.api_token.as_ref()
    }

    /// Counts a failed ledger operation (`op` is one of [`LEDGER_OPS`]).
    pub fn ledger_error(&self, op: &'static str) {
        self.ledger_errors.get_or_create(&LedgerOpLabels { op }).inc();
    }

    /// Records a checked batch: with a ledger, commits it first (one transaction) and
    /// then counts what was new; without, counts it against the in-memory dedup window.
    /// A ledger failure is a 503 (nothing was written or counted; the sender retries).
    pub async fn record(self: &Arc<Self>, events: Vec<Event>) -> Result<Ingested, TrackError> {
        let Some(ledger) = self.ledger.clone() else {
            return Ok(self.ingest(events));
        };
        let tracker = Arc::clone(self);
        // Its own task, so a client that hangs up cannot cancel it between the commit
        // and the counting: what is in the ledger is always in the counters.
        tokio::spawn(async move {
            match ledger.append(&events, time::now_ms()).await {
                Ok(is_new) => Ok(tracker.count_checked(events, &is_new)),
                Err(error) => {
                    tracker.ledger_error("write");
                    eprintln!("usage-tracking: {error}");
                    Err(TrackError::Unavailable(format!("{error}; nothing was recorded, retry the batch")))
                }
            }
        })
        .await
        .map_err(|e| TrackError::Internal(format!("ingest task failed: {e}")))?
    }

    /// Counts a checked batch against the in-memory dedup window. Cannot fail:
    /// everything that could go wrong was ruled out when the batch was checked.
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
            self.count_event(&mut state, event);
        }
        self.events_received.inc_by(done.accepted + done.duplicates);
        self.events_duplicate.inc_by(done.duplicates);
        done
    }

    /// Counts the events the ledger flagged as new; the rest are duplicates.
    fn count_checked(&self, events: Vec<Event>, is_new: &[bool]) -> Ingested {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mut done = Ingested::default();
        for (event, new) in events.into_iter().zip(is_new.iter().copied().chain(std::iter::repeat(false))) {
            if new {
                done.accepted += 1;
                self.count_event(&mut state, event);
            } else {
                done.duplicates += 1;
            }
        }
        self.events_received.inc_by(done.accepted + done.duplicates);
        self.events_duplicate.inc_by(done.duplicates);
        done
    }

    fn count_event(&self, state: &mut State, event: Event) {
        match event.outcome {
            Outcome::Denied { reason, count } => {
                saturating_inc(&self.denied.get_or_create(&DeniedLabels { reason, path: event.path }), count, self.cap);
            }
            Outcome::Authorized(usage) => {
                let totals = Totals {
                    requests: 1,
                    prompt: usage.tokens.prompt,
                    completion: usage.tokens.completion,
                    cached: usage.tokens.cached,
                    reasoning: usage.tokens.reasoning,
                    incomplete: u64::from(usage.incomplete),
                    upstream_errors: u64::from(usage.upstream_error),
                };
                let estimated = usage.estimated.then_some((usage.tokens.prompt, usage.tokens.completion));
                self.count_usage(state, event.path, usage.user, usage.groups, usage.model, &totals, estimated);
            }
        }
    }

    /// Sets the counters from the ledger's totals (a new tracker: they are all zero).
    /// The series come in the order they first appeared, so the cardinality guard
    /// admits the same values as the process that counted them.
    fn restore(&mut self, series: Vec<(SeriesKey, Totals)>) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        for (key, totals) in series {
            // The stored values are label values already; these map them onto themselves.
            let path = labels::route(&key.path);
            if key.denied.is_empty() {
                let model = (!key.model.is_empty()).then_some(key.model);
                self.count_usage(&mut state, path, key.user, key.groups, model, &totals, None);
            } else {
                let reason = labels::deny_reason(&key.denied);
                saturating_inc(&self.denied.get_or_create(&DeniedLabels { reason, path }), totals.requests, self.cap);
            }
        }
    }

    /// Counts an authorized request's totals; `estimated` is the (prompt, completion)
    /// part of them the gateway estimated.
    #[allow(clippy::too_many_arguments)]
    fn count_usage(
        &self,
        state: &mut State,
        path: &'static str,
        user: String,
        groups: String,
        model: Option<String>,
        totals: &Totals,
        estimated: Option<(u64, u64)>,
    ) {
        let mut user = state.users.admit(user);
        let mut groups = state.groups.admit(groups);
        let mut model = model.map(|m| state.models.admit(m));
        if !state.series.admit(&user, &groups, path, model.as_deref().unwrap_or_default()) {
            self.series_overflow.inc();
            user = OTHER.to_owned();
            groups = OTHER.to_owned();
            model = model.map(|_| OTHER.to_owned());
        }
        let labels = RequestLabels { user, groups, path };
        saturating_inc(&self.requests.get_or_create(&labels), totals.requests, self.cap);
        if totals.incomplete > 0 {
            saturating_inc(&self.incomplete.get_or_create(&labels), totals.incomplete, self.cap);
        }
        if totals.upstream_errors > 0 {
            saturating_inc(&self.upstream_errors.get_or_create(&labels), totals.upstream_errors, self.cap);
        }
        if let Some(model) = model {
            if let Some((prompt, completion)) = estimated {
                let mut est = EstimatedLabels {
                    user: labels.user.clone(),
                    groups: labels.groups.clone(),
                    model: model.clone(),
                    r#type: "prompt",
                };
                saturating_inc(&self.estimated.get_or_create(&est), prompt, self.cap);
                est.r#type = "completion";
                saturating_inc(&self.estimated.get_or_create(&est), completion, self.cap);
            }
            let RequestLabels { user, groups, .. } = labels;
            let mut labels = TokenLabels { user, groups, model, r#type: "prompt" };
            let by_type = [
                ("prompt", totals.prompt),
                ("completion", totals.completion),
                ("cached", totals.cached),
                ("reasoning", totals.reasoning),
            ];
            for (kind, n) in by_type {
                labels.r#type = kind;
                saturating_inc(&self.tokens.get_or_create(&labels), n, self.cap);
            }
        }
    }

    /// Counts a refused `/track` request (bad input only; other errors are not counted):
    /// once, or once per bad event when every event of the body was bad.
    pub fn reject(&self, error: &TrackError) {
        if let Some(reason) = error.rejected_reason() {
            self.rejected.get_or_create(&RejectedLabels { reason }).inc_by(error.rejected_count());
        }
    }

    /// Counts the bad events of a body whose good events were recorded.
    pub fn reject_events(&self, rejected: &[Rejected]) {
        for r in rejected {
            self.rejected.get_or_create(&RejectedLabels { reason: r.reason }).inc();
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

/// Adds `n`, saturating at `cap` instead of wrapping; safe because every caller holds the
/// state lock (or owns the tracker), so nothing adds in between.
fn saturating_inc(counter: &Counter, n: u64, cap: u64) {
    counter.inc_by(n.min(cap.saturating_sub(counter.get())));
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
        let done = tracker.ingest(parse_body(body.as_bytes(), 10_000).unwrap().events);
        assert_eq!(done, Ingested { accepted: 2100, duplicates: 0 });
        let text = tracker.encode().unwrap();
        let series = format!(r#"llm_tokens_total{{user="u",groups="",model="m",type="prompt"}} {}"#, u64::MAX);
        assert!(text.contains(&series), "{text}");
    }
}
