//! `POST /v1/limits/sync`: the trackers' side of global limits (README, "Global limits
//! across gateway replicas").
//!
//! Why: each gateway replica enforces its limits on its own, so N replicas would allow N
//! times a limit. With `"scope": "global"`, a replica instead admits from a **lease**, a
//! share of what is left of the limit that the trackers carve out for it, so the shares
//! of all replicas never add up to more than the limit. Every replica syncs off the
//! request path (every `interval_ms`): per limit window it is active in, what it used,
//! its recent demand and what a waiting request needs; the answer is its grant. The
//! arithmetic is `tollgate_rules::lease` (shared with the filter); this module checks the
//! body, applies the arithmetic to the stored holdings and answers.
//!
//! Per sync, everything happens in **one transaction** (with a ledger; without one,
//! under one lock): for each window, in (key, window start) order so concurrent syncs
//! lock in the same order, the window is locked, all replicas' holdings of it are read,
//! [`step`] computes the new holding of the syncing replica ([`lease::grant`]), and it
//! is written back; then the replica's last-seen time. Two tracker replicas on one
//! PostgreSQL therefore never grant from the same "left" at once (the window's row
//! lock), and a 200 is sent only after the commit. [`step`] is the one per-window rule,
//! used by both stores ([`Leases`] in memory, [`crate::ledger::Ledger::sync_limits`]).
//!
//! Syncs are idempotent: `used` and `granted` are cumulative per window, so a sync sent
//! twice (its answer lost) grants nothing twice; a sync older than the stored one
//! (`seq` lower, reordered on the way) lowers nothing. A body that breaks the schema is
//! refused whole (400 naming the field) before anything is touched.
//!
//! Housekeeping: holdings of windows that ended more than a day ago, and replicas not
//! seen for a day, are deleted at most once a minute per tracker.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use tollgate_rules::lease::{
    self, Counted, Holding, Report, MAX_INTERVAL_MS, MAX_LEASES_PER_SYNC, MIN_INTERVAL_MS, REPLICA_INTERVALS,
    WINDOWS_MS,
};
use tollgate_rules::MAX_TOKENS;

use crate::error::TrackError;
use crate::http;
use crate::metrics::Tracker;
use crate::time;

/// Holdings of windows that ended longer ago than this are deleted (and replicas not
/// seen for as long).
pub const KEEP_MS: u64 = 86_400_000;
/// Housekeeping runs at most this often per tracker.
pub const HOUSEKEEPING_EVERY_MS: u64 = 60_000;
/// Largest `seq` (stored as a signed 64-bit integer).
pub const MAX_SEQ: u64 = i64::MAX as u64;
/// How far ahead of the tracker's clock a window may start (clock skew, generously).
pub const MAX_AHEAD_MS: u64 = time::DAY_MS.unsigned_abs();
/// Latest `window_start_ms`: the end of the year 9999, as everywhere in the tracker.
pub const MAX_WINDOW_START_MS: u64 = time::MAX_MS as u64;

/// A checked sync body.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSync {
    /// The gateway replica (one Envoy).
    pub replica: String,
    /// Increases with every sync of the replica.
    pub seq: u64,
    /// How often the replica syncs.
    pub interval_ms: u64,
    pub leases: Vec<Lease>,
}

/// One limit window of a sync: what the replica reports for it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lease {
    /// `counted/window_ms/user` ([`lease::limit_key`]).
    pub key: String,
    pub window_start_ms: u64,
    pub window_ms: u64,
    pub limit: u64,
    pub used: u64,
    pub demand: u64,
    pub need: u64,
    /// The grant the replica keeps, having given the rest back (absent: keeps it all).
    #[serde(default)]
    pub kept: Option<u64>,
}

impl Lease {
    pub fn report(&self) -> Report {
        Report { limit: self.limit, used: self.used, demand: self.demand, need: self.need, kept: self.kept }
    }

    pub fn window_end_ms(&self) -> u64 {
        self.window_start_ms.saturating_add(self.window_ms)
    }

    /// The `counted` label of the key (`requests`, `tokens`, …), when it is a known one.
    pub fn counted(&self) -> Option<&'static str> {
        let prefix = self.key.split('/').next()?;
        COUNTED.iter().map(|c| c.as_str()).find(|c| *c == prefix)
    }

    /// The first field that breaks the schema, and why (`now_ms`: the tracker's clock).
    fn check(&self, now_ms: u64) -> Result<(), (&'static str, String)> {
        lease::check_key(&self.key).map_err(|why| ("key", why.to_owned()))?;
        if !WINDOWS_MS.contains(&self.window_ms) {
            let windows: Vec<String> = WINDOWS_MS.iter().map(u64::to_string).collect();
            return Err(("window_ms", format!("must be one of {}", windows.join(", "))));
        }
        let key_window = self.key.split('/').nth(1).and_then(|w| w.parse::<u64>().ok());
        if key_window != Some(self.window_ms) {
            return Err(("window_ms", format!("must be the window of the key ({})", key_window.unwrap_or(0))));
        }
        if self.window_start_ms.checked_rem(self.window_ms) != Some(0) {
            return Err(("window_start_ms", format!("must be a multiple of window_ms ({})", self.window_ms)));
        }
        if self.window_start_ms > MAX_WINDOW_START_MS {
            return Err(("window_start_ms", format!("must be at most {MAX_WINDOW_START_MS}")));
        }
        // A gateway's window starts by its own clock; far ahead of the tracker's it is
        // no clock skew, and such windows would be kept (housekeeping removes windows
        // a day after they end) for as long as the sender wants.
        if self.window_start_ms > now_ms.saturating_add(MAX_AHEAD_MS) {
            return Err(("window_start_ms", "must not be more than a day ahead of the tracker's clock".to_owned()));
        }
        if !(1..=MAX_TOKENS).contains(&self.limit) {
            return Err(("limit", format!("must be 1 to {MAX_TOKENS}")));
        }
        let kept = self.kept.unwrap_or(0);
        for (field, value) in [("used", self.used), ("demand", self.demand), ("need", self.need), ("kept", kept)] {
            if value > MAX_TOKENS {
                return Err((field, format!("must be at most {MAX_TOKENS}")));
            }
        }
        Ok(())
    }
}

const COUNTED: [Counted; 4] = [Counted::Requests, Counted::Tokens, Counted::QuotaRequests, Counted::QuotaTokens];

/// The `counted` label values of `tracker_limit_granted_total`.
pub fn counted_labels() -> [&'static str; 4] {
    COUNTED.map(Counted::as_str)
}

impl LimitSync {
    /// The first field that breaks the schema, as `leases[3].key: why`.
    pub fn check(&self, now_ms: u64) -> Result<(), String> {
        lease::check_replica(&self.replica).map_err(|why| format!("replica: {why}"))?;
        if self.seq > MAX_SEQ {
            return Err(format!("seq: must be at most {MAX_SEQ}"));
        }
        if !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&self.interval_ms) {
            return Err(format!("interval_ms: must be {MIN_INTERVAL_MS} to {MAX_INTERVAL_MS}"));
        }
        if self.leases.len() > MAX_LEASES_PER_SYNC {
            return Err(format!("leases: must have at most {MAX_LEASES_PER_SYNC} entries, not {}", self.leases.len()));
        }
        let mut seen: HashMap<(&str, u64), usize> = HashMap::with_capacity(self.leases.len());
        for (i, lease) in self.leases.iter().enumerate() {
            lease.check(now_ms).map_err(|(field, why)| format!("leases[{i}].{field}: {why}"))?;
            if let Some(first) = seen.insert((&lease.key, lease.window_start_ms), i) {
                return Err(format!("leases[{i}]: the same key and window_start_ms as leases[{first}]"));
            }
        }
        Ok(())
    }

    /// The leases with their index in the body, in (key, window start) order: the order
    /// windows are locked in.
    pub fn lock_order(&self) -> Vec<(usize, &Lease)> {
        let mut order: Vec<(usize, &Lease)> = self.leases.iter().enumerate().collect();
        order.sort_by(|(_, a), (_, b)| (&a.key, a.window_start_ms).cmp(&(&b.key, b.window_start_ms)));
        order
    }

    /// Who counts in `replicas`: those seen since this.
    pub fn replicas_since(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.interval_ms.saturating_mul(REPLICA_INTERVALS))
    }
}

/// Parses and checks a sync body; the error names the field.
pub fn parse(body: &[u8], now_ms: u64) -> Result<LimitSync, TrackError> {
    let sync: LimitSync = http::parse_json(body)?;
    sync.check(now_ms).map_err(TrackError::InvalidBody)?;
    Ok(sync)
}

/// One replica's stored row of a limit window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub replica: String,
    pub holding: Holding,
    /// The latest `seq` it synced this window with.
    pub seq: u64,
}

/// What a sync does to one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// The replica's new holding, to store.
    pub holding: Holding,
    /// Its `seq` to store: the larger of the stored and the request's.
    pub seq: u64,
    /// Granted by this sync (the rise of `holding.granted`).
    pub added: u64,
    /// Σ over all replicas of what they take from the limit, after the update.
    pub consumed: u64,
    /// Σ over all replicas of what they used (tokens: with reservations in flight).
    pub used: u64,
}

/// The one per-window rule of both stores: from all replicas' holdings of a window (as
/// read under its lock), `replica`'s report and the time, its new holding.
///
/// A report with the stored `seq` is a resend: it gets the stored holding again and
/// nothing more. A report of an older `seq` (a stale, reordered sync) keeps the stored
/// `used`, `demand` and grant (its `need` still counts). A newer one is the truth:
/// `used` may go down (token reservations released with less used) and a grant given
/// back (`kept`) goes. The grant is [`lease::grant`]'s.
pub fn step(stored: &[Stored], replica: &str, seq: u64, lease: &Lease, now_ms: u64, interval_ms: u64) -> Step {
    let mine = stored.iter().find(|s| s.replica == replica);
    let (held, stored_seq) = mine.map_or((Holding::default(), 0), |s| (s.holding, s.seq));
    let others: Vec<Holding> = stored.iter().filter(|s| s.replica != replica).map(|s| s.holding).collect();
    let consumed_by_others = others.iter().fold(0u64, |sum, h| sum.saturating_add(h.consumed()));
    let used_by_others = others.iter().fold(0u64, |sum, h| sum.saturating_add(h.used));
    if mine.is_some() && seq == stored_seq {
        // A resend (its answer was lost): the same answer, nothing granted twice. (Run
        // through `grant` again, a report whose `used` came before its first grant
        // would be topped up a second time.)
        let holding = Holding { seen_ms: now_ms, ..held };
        let consumed = holding.consumed().saturating_add(consumed_by_others);
        let used = holding.used.saturating_add(used_by_others);
        return Step { holding, seq, added: 0, consumed, used };
    }
    let mut report = lease.report();
    if mine.is_some() && seq < stored_seq {
        // Stale: what it says of its use and its grant is older than what is stored.
        report.used = held.used;
        report.demand = held.demand;
        report.kept = None;
    }
    let holding = lease::grant(held, &others, report, now_ms, interval_ms);
    let consumed = holding.consumed().saturating_add(consumed_by_others);
    let used = holding.used.saturating_add(used_by_others);
    let added = holding.granted.saturating_sub(held.granted);
    Step { holding, seq: seq.max(stored_seq), added, consumed, used }
}

/// What a sync did: the replicas seen lately, and per lease (in body order) its step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Synced {
    pub replicas: u64,
    pub steps: Vec<Step>,
}

/// The 200 answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SyncAnswer {
    pub replicas: u64,
    pub leases: Vec<LeaseAnswer>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeaseAnswer {
    pub key: String,
    pub window_start_ms: u64,
    /// The replica's cumulative grant for the window.
    pub granted: u64,
    /// What all replicas take from the limit in the window.
    pub consumed: u64,
    /// What all replicas used in the window (as last reported).
    pub used: u64,
}

/// One window in memory.
#[derive(Debug, Default)]
struct MemoryWindow {
    end_ms: u64,
    holdings: Vec<Stored>,
}

/// The store without a ledger.
#[derive(Debug, Default)]
struct Memory {
    windows: HashMap<(String, u64), MemoryWindow>,
    /// Replica → when it last synced.
    replicas: HashMap<String, u64>,
}

/// The leases state of one tracker: the in-memory store (used without a ledger) and
/// when housekeeping last ran.
#[derive(Debug, Default)]
pub struct Leases {
    memory: Mutex<Memory>,
    housekept_ms: AtomicU64,
}

impl Leases {
    /// Whether housekeeping is due at `now_ms`; if so, it counts as done (one caller
    /// runs it per minute).
    pub fn housekeeping_due(&self, now_ms: u64) -> bool {
        let last = self.housekept_ms.load(Ordering::Relaxed);
        now_ms >= last.saturating_add(HOUSEKEEPING_EVERY_MS)
            && self.housekept_ms.compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }

    /// A sync against the in-memory store, under its lock: the same steps as the
    /// ledger's transaction.
    pub fn sync_in_memory(&self, sync: &LimitSync, now_ms: u64) -> Synced {
        // Nothing here panics, so a poisoned lock only means a panic elsewhere.
        let mut memory = self.memory.lock().unwrap_or_else(PoisonError::into_inner);
        if self.housekeeping_due(now_ms) {
            let cutoff = now_ms.saturating_sub(KEEP_MS);
            memory.windows.retain(|_, window| window.end_ms >= cutoff);
            memory.replicas.retain(|_, seen| *seen >= cutoff);
        }
        let mut steps = Vec::with_capacity(sync.leases.len());
        for lease in &sync.leases {
            let window = memory.windows.entry((lease.key.clone(), lease.window_start_ms)).or_default();
            window.end_ms = lease.window_end_ms();
            let step = step(&window.holdings, &sync.replica, sync.seq, lease, now_ms, sync.interval_ms);
            let row = Stored { replica: sync.replica.clone(), holding: step.holding, seq: step.seq };
            match window.holdings.iter_mut().find(|s| s.replica == sync.replica) {
                Some(stored) => *stored = row,
                None => window.holdings.push(row),
            }
            steps.push(step);
        }
        memory.replicas.insert(sync.replica.clone(), now_ms);
        let since = sync.replicas_since(now_ms);
        let replicas = memory.replicas.values().filter(|seen| **seen >= since).count() as u64;
        Synced { replicas, steps }
    }
}

/// `POST /v1/limits/sync`: checks the sender (the ingest secret, as `/track`) and the
/// whole body, then applies it in one transaction (with a ledger: committed before the
/// 200) and answers each lease's grant.
pub async fn sync(State(tracker): State<Arc<Tracker>>, request: Request) -> Response {
    if let Some(refused) = http::ingest_refusal(&tracker, request.headers()) {
        tracker.count_limit_sync("unauthorized");
        return refused.into_response();
    }
    let sync = match http::body_of(request).await.and_then(|body| parse(&body, time::now_ms().try_into().unwrap_or(0)))
    {
        Ok(sync) => Arc::new(sync),
        Err(error) => {
            tracker.count_limit_sync("invalid");
            return error.into_response();
        }
    };
    // Its own task, so a client that hangs up cannot cancel it between the commit and
    // the counting.
    let task = tokio::spawn(apply(Arc::clone(&tracker), sync));
    let done = task.await.unwrap_or_else(|e| Err(TrackError::Internal(format!("limit sync task failed: {e}"))));
    match done {
        Ok(answer) => {
            tracker.count_limit_sync("ok");
            Json(answer).into_response()
        }
        Err(error) => {
            tracker.count_limit_sync("unavailable");
            error.into_response()
        }
    }
}

/// Applies a checked sync to the tracker's store and counts what it granted.
async fn apply(tracker: Arc<Tracker>, sync: Arc<LimitSync>) -> Result<SyncAnswer, TrackError> {
    let now_ms = u64::try_from(time::now_ms()).unwrap_or(0);
    let synced = match tracker.ledger().cloned() {
        None => tracker.leases().sync_in_memory(&sync, now_ms),
        Some(ledger) => {
            let synced = ledger.sync_limits(Arc::clone(&sync), now_ms).await.map_err(|error| {
                tracker.ledger_error("write");
                eprintln!("usage-tracking: limit sync: {error}");
                TrackError::Unavailable(format!("{error}; nothing was changed, retry the sync"))
            })?;
            if tracker.leases().housekeeping_due(now_ms) {
                if let Err(error) = ledger.forget_limits(now_ms.saturating_sub(KEEP_MS)).await {
                    tracker.ledger_error("compact");
                    eprintln!("usage-tracking: limit housekeeping: {error}");
                }
            }
            synced
        }
    };
    let mut leases = Vec::with_capacity(sync.leases.len());
    for (lease, step) in sync.leases.iter().zip(&synced.steps) {
        if let Some(counted) = lease.counted() {
            tracker.count_limit_granted(counted, step.added);
        }
        leases.push(LeaseAnswer {
            key: lease.key.clone(),
            window_start_ms: lease.window_start_ms,
            granted: step.holding.granted,
            consumed: step.consumed,
            used: step.used,
        });
    }
    Ok(SyncAnswer { replicas: synced.replicas, leases })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// The tracker's clock in these tests (the bodies' windows start at it).
    const NOW: u64 = 1_764_482_400_000;

    fn body() -> Value {
        json!({"replica": "gw-3f2a9c01d4e5b6a7", "seq": 42, "interval_ms": 1000, "leases": [
            {"key": "requests/60000/alice", "window_start_ms": 1_764_482_400_000u64, "window_ms": 60000,
             "limit": 20, "used": 3, "demand": 3, "need": 0},
            {"key": "tokens/3600000/bob", "window_start_ms": 1_764_482_400_000u64, "window_ms": 3_600_000,
             "limit": 1000, "used": 0, "demand": 10, "need": 5},
        ]})
    }

    /// Table: one bad field each → 400 naming it; nothing reaches the store.
    #[test]
    fn bad_fields_are_named() {
        assert!(parse(body().to_string().as_bytes(), NOW).is_ok());
        let over = MAX_TOKENS + 1;
        let many: Vec<Value> = (0..=MAX_LEASES_PER_SYNC)
            .map(|i| {
                json!({"key": format!("requests/1000/u{i}"), "window_start_ms": 0, "window_ms": 1000,
                             "limit": 1, "used": 0, "demand": 0, "need": 0})
            })
            .collect();
        let cases: Vec<(&str, Box<dyn Fn(&mut Value)>, &str)> = vec![
            ("replica", Box::new(|b| b["replica"] = json!("")), "replica: must be 1 to 64 characters"),
            ("replica chars", Box::new(|b| b["replica"] = json!("gw 1")), "replica: may hold only"),
            ("replica type", Box::new(|b| b["replica"] = json!(7)), "replica: invalid type: integer `7`"),
            ("seq negative", Box::new(|b| b["seq"] = json!(-1)), "seq: invalid value: integer `-1`"),
            ("seq too big", Box::new(|b| b["seq"] = json!(u64::MAX)), "seq: must be at most"),
            ("interval low", Box::new(|b| b["interval_ms"] = json!(99)), "interval_ms: must be 100 to 60000"),
            ("interval high", Box::new(|b| b["interval_ms"] = json!(60_001)), "interval_ms: must be 100 to 60000"),
            (
                "no leases",
                Box::new(|b| b.as_object_mut().unwrap().remove("leases").map(drop).unwrap()),
                "body: missing field `leases`",
            ),
            ("unknown field", Box::new(|b| b["extra"] = json!(1)), "extra: unknown field `extra`"),
            (
                "too many",
                Box::new(move |b| b["leases"] = json!(many.clone())),
                "leases: must have at most 4096 entries",
            ),
            (
                "key",
                Box::new(|b| b["leases"][1]["key"] = json!("requests")),
                "leases[1].key: must be counted/window_ms/user",
            ),
            (
                "key count",
                Box::new(|b| b["leases"][0]["key"] = json!("pears/60000/alice")),
                "leases[0].key: counts something unknown",
            ),
            (
                "key user",
                Box::new(|b| b["leases"][0]["key"] = json!("requests/60000/a,b")),
                "leases[0].key: must not contain commas",
            ),
            (
                "window",
                Box::new(|b| b["leases"][0]["window_ms"] = json!(5000)),
                "leases[0].window_ms: must be one of 1000, 60000",
            ),
            (
                "window of key",
                Box::new(|b| b["leases"][0]["window_ms"] = json!(1000)),
                "leases[0].window_ms: must be the window of the key (60000)",
            ),
            (
                "start",
                Box::new(|b| b["leases"][0]["window_start_ms"] = json!(1_764_482_400_001u64)),
                "leases[0].window_start_ms: must be a multiple of window_ms (60000)",
            ),
            (
                "start ahead",
                Box::new(|b| b["leases"][0]["window_start_ms"] = json!(NOW + 2 * MAX_AHEAD_MS)),
                "leases[0].window_start_ms: must not be more than a day ahead of the tracker's clock",
            ),
            (
                "start far",
                Box::new(|b| b["leases"][0]["window_start_ms"] = json!(600_000_000_000_000u64)),
                "leases[0].window_start_ms: must be at most",
            ),
            (
                "limit 0",
                Box::new(|b| b["leases"][1]["limit"] = json!(0)),
                "leases[1].limit: must be 1 to 9007199254740991",
            ),
            ("limit big", Box::new(move |b| b["leases"][1]["limit"] = json!(over)), "leases[1].limit: must be 1 to"),
            (
                "used",
                Box::new(move |b| b["leases"][1]["used"] = json!(over)),
                "leases[1].used: must be at most 9007199254740991",
            ),
            ("demand", Box::new(move |b| b["leases"][0]["demand"] = json!(over)), "leases[0].demand: must be at most"),
            ("need", Box::new(move |b| b["leases"][0]["need"] = json!(over)), "leases[0].need: must be at most"),
            (
                "need type",
                Box::new(|b| b["leases"][0]["need"] = json!("1")),
                "leases[0].need: invalid type: string \"1\"",
            ),
            (
                "lease field",
                Box::new(|b| b["leases"][1]["granted"] = json!(3)),
                "leases[1].granted: unknown field `granted`",
            ),
            (
                "lease missing",
                Box::new(|b| b["leases"][1].as_object_mut().unwrap().remove("need").map(drop).unwrap()),
                "leases[1]: missing field `need`",
            ),
            (
                "duplicate",
                Box::new(|b| b["leases"][1] = b["leases"][0].clone()),
                "leases[1]: the same key and window_start_ms as leases[0]",
            ),
        ];
        for (name, break_it, message) in cases {
            let mut bad = body();
            break_it(&mut bad);
            let error = parse(bad.to_string().as_bytes(), NOW).unwrap_err();
            assert_eq!(error.status(), 400, "{name}");
            assert!(error.message().starts_with(message), "{name}: {}", error.message());
        }
        let error = parse(b"{\"replica\":", NOW).unwrap_err();
        assert_eq!((error.status(), error.message().starts_with("body is not valid JSON")), (400, true));
    }

    /// A refused body leaves the store as it was: parsing is all-or-nothing, so the
    /// store only ever sees a checked sync.
    #[test]
    fn refused_bodies_change_nothing() {
        let leases = Leases::default();
        let good = parse(body().to_string().as_bytes(), NOW).unwrap();
        let answers = |synced: Synced| synced.steps.iter().map(|s| (s.holding, s.consumed)).collect::<Vec<_>>();
        let first = answers(leases.sync_in_memory(&good, 10_000));
        let mut bad = body();
        bad["seq"] = json!(43);
        bad["leases"][0]["used"] = json!(10);
        bad["leases"][1]["key"] = json!("nope");
        assert!(parse(bad.to_string().as_bytes(), NOW).is_err());
        assert_eq!(answers(leases.sync_in_memory(&good, 10_000)), first, "the bad body's first lease was not applied");
    }

    fn lease(limit: u64, used: u64, demand: u64, need: u64) -> Lease {
        Lease {
            key: "requests/60000/alice".into(),
            window_start_ms: 0,
            window_ms: 60_000,
            limit,
            used,
            demand,
            need,
            kept: None,
        }
    }

    fn stored(replica: &str, granted: u64, used: u64, demand: u64, seq: u64) -> Stored {
        Stored { replica: replica.into(), holding: Holding { granted, used, demand, seen_ms: 10_000 }, seq }
    }

    /// Table of the per-window step: (stored, seq, lease) → (granted, used, seq, added, consumed).
    #[test]
    fn steps() {
        for (name, rows, seq, report, want) in [
            ("new window: two intervals of demand", vec![], 1, lease(100, 0, 5, 0), (10, 0, 1, 10, 10)),
            (
                "repeat of the same sync: nothing more",
                vec![stored("me", 10, 0, 5, 1)],
                1,
                lease(100, 0, 5, 0),
                (10, 0, 1, 0, 10),
            ),
            ("repeat, used before the grant", vec![stored("me", 6, 3, 3, 4)], 4, lease(100, 3, 3, 0), (6, 3, 4, 0, 6)),
            (
                "next sync, same report: topped up",
                vec![stored("me", 6, 3, 3, 4)],
                5,
                lease(100, 3, 3, 0),
                (9, 3, 5, 3, 9),
            ),
            (
                "stale seq keeps stored used and demand",
                vec![stored("me", 10, 8, 5, 7)],
                6,
                lease(100, 2, 50, 0),
                (18, 8, 7, 8, 18),
            ),
            (
                "a newer report's used is the truth (reservations released)",
                vec![stored("me", 10, 8, 5, 7)],
                8,
                lease(100, 2, 5, 0),
                (12, 2, 8, 2, 12),
            ),
            (
                "a grant given back goes",
                vec![stored("me", 30, 10, 0, 3)],
                4,
                Lease { kept: Some(12), ..lease(100, 10, 0, 0) },
                (12, 10, 4, 0, 12),
            ),
            (
                "a stale report gives nothing back",
                vec![stored("me", 30, 10, 0, 5)],
                4,
                Lease { kept: Some(12), ..lease(100, 10, 0, 0) },
                (30, 10, 5, 0, 30),
            ),
            (
                "others count in consumed (near the limit: only a need)",
                vec![stored("other", 30, 40, 1, 3), stored("me", 0, 0, 0, 1)],
                2,
                lease(50, 0, 20, 10),
                (10, 0, 2, 10, 50),
            ),
            (
                "a waiting need of 1 when 1 is left",
                vec![stored("other", 9, 9, 4, 1)],
                1,
                lease(10, 0, 0, 1),
                (1, 0, 1, 1, 10),
            ),
        ] {
            let got = step(&rows, "me", seq, &report, 10_000, 1_000);
            assert_eq!((got.holding.granted, got.holding.used, got.seq, got.added, got.consumed), want, "{name}");
        }
    }

    #[test]
    fn memory_counts_recent_replicas_and_forgets_old_windows() {
        let leases = Leases::default();
        let mut sync = parse(body().to_string().as_bytes(), NOW).unwrap();
        assert_eq!(leases.sync_in_memory(&sync, 100_000).replicas, 1);
        sync.replica = "gw-b".into();
        assert_eq!(leases.sync_in_memory(&sync, 105_000).replicas, 2);
        sync.replica = "gw-c".into();
        // 10 intervals of 1 s: gw-3f… (seen at 100 s) no longer counts at 111 s.
        assert_eq!(leases.sync_in_memory(&sync, 111_000).replicas, 2);
        let windows = |l: &Leases| l.memory.lock().unwrap().windows.len();
        assert_eq!(windows(&leases), 2);
        sync.leases.clear();
        // A day after the windows ended (and a minute after the last housekeeping).
        let later = 1_764_482_400_000 + 3_600_000 + KEEP_MS + 1;
        assert_eq!(leases.sync_in_memory(&sync, later).replicas, 1);
        assert_eq!(windows(&leases), 0);
        assert_eq!(leases.memory.lock().unwrap().replicas.len(), 1);
    }
}
