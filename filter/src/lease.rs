//! Global limits, the gateway's side (`"limits": {"scope": "global"}`): each worker
//! admits from its **lease**, the share of each limit window the trackers granted it,
//! so no network call sits on the request path while a caller is far from its limits.
//!
//! Why per worker: a worker's lease lives in its own VM memory, so checking it costs a
//! map lookup (no shared-data read, no compare-and-swap) and a worker that runs out asks
//! for more with its own callout. The trackers see each worker as one replica. Grants
//! are cumulative per window and never taken back (`tollgate_rules::lease`), so the
//! fleet never admits more than a limit while it reaches the trackers.
//!
//! - Every limit of the user's spec is counted per fixed window aligned to the UTC
//!   clock: `requests_per_*` in requests, `tokens_per_*` in tokens (used plus reserved
//!   by requests in flight, as for local limits), the quota in both.
//! - `sync_body` (from `on_tick`, every `limits.sync_interval_ms`) reports what each
//!   active window used and its demand; the answer tops leases up to two intervals of
//!   demand. A request that finds its lease short waits for one `acquire_body` callout.
//! - Trackers unreachable (every sync and acquire failed for [`GRACE_INTERVALS`] sync
//!   intervals; each is sent once more when it fails, so one dead tracker replica
//!   among several, ejected by the cluster meanwhile, is not an outage): a worker
//!   admits up to its grant, or `ceil(limit / replicas)` per window if more (`replicas`
//!   as the trackers last counted them; 1 before any answer), until an answer comes
//!   again. Never unlimited. During the grace, a short lease refuses (429, retry in a
//!   second): never more than the limit.

use std::collections::HashMap;

use serde::Deserialize;
use tollgate_rules::lease::{self as rules, Counted};

use crate::limits::{Counter, Headroom, LimitError, LimitKind, LimitSpec, Window};

/// One limit window of one user, in this worker.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    counted: Counted,
    window_ms: u64,
    limit: u64,
    window_start: u64,
    /// Granted to this worker in the window (cumulative, as the trackers said).
    granted: u64,
    /// Requests admitted, or tokens settled, in the window.
    used: u64,
    /// Tokens reserved by requests in flight.
    reserved: u64,
    /// Fleet-wide, as of the last answer: what the grants and uses take from the
    /// limit (at the limit: nothing left to grant), and what was used.
    consumed: u64,
    fleet_used: u64,
    /// What this worker last reported used (its part of `fleet_used`).
    reported: u64,
    /// Admitted or wanted since the last sync, and in the interval before.
    demand: u64,
    last_demand: u64,
    /// Changed since the last sync.
    dirty: bool,
    /// A request was refused while part of the grant was unused (too small for it):
    /// the next sync gives that part back.
    starved: bool,
    /// The message that last gave part of the grant back: grants in answers to older
    /// messages are out of date (the trackers lowered them since).
    floor_seq: u64,
}

impl Entry {
    fn new(counted: Counted, window_ms: u64, limit: u64) -> Entry {
        Entry {
            counted,
            window_ms,
            limit,
            window_start: 0,
            granted: 0,
            used: 0,
            reserved: 0,
            consumed: 0,
            fleet_used: 0,
            reported: 0,
            demand: 0,
            last_demand: 0,
            dirty: false,
            starved: false,
            floor_seq: 0,
        }
    }

    fn roll(&mut self, now_ms: u64) {
        let start = rules::window_start(now_ms, self.window_ms);
        if start != self.window_start {
            *self = Entry {
                window_start: start,
                demand: self.demand,
                last_demand: self.last_demand,
                ..Entry::new(self.counted, self.window_ms, self.limit)
            };
        }
    }

    fn held(&self) -> u64 {
        self.used.saturating_add(self.reserved)
    }

    /// Used fleet-wide: the last answer's, with what this worker used since its report.
    fn fleet_used(&self) -> u64 {
        self.fleet_used.saturating_sub(self.reported).saturating_add(self.held())
    }

    fn unused(&self) -> u64 {
        self.granted.saturating_sub(self.held())
    }

    /// Gives back what of the grant this worker will not use: beyond two intervals of
    /// its demand, or all that is unused after it starved. The grant kept, if any went.
    fn give_back(&mut self) -> Option<u64> {
        let keep =
            if self.starved { 0 } else { self.demand.max(self.last_demand).saturating_mul(rules::HORIZON_INTERVALS) };
        self.starved = false;
        (self.unused() > keep).then(|| {
            self.granted = self.held().saturating_add(keep);
            self.granted
        })
    }

    fn reset_ms(&self, now_ms: u64) -> u64 {
        self.window_start.saturating_add(self.window_ms).saturating_sub(now_ms)
    }

    fn kind(&self) -> LimitKind {
        match self.counted {
            Counted::Requests | Counted::QuotaRequests => LimitKind::Requests,
            Counted::Tokens | Counted::QuotaTokens => LimitKind::Tokens,
        }
    }

    fn counter(&self, now_ms: u64) -> Counter {
        let remaining =
            self.limit.saturating_sub(self.consumed.max(self.held())).saturating_add(self.unused()).min(self.limit);
        Counter { limit: self.limit, remaining, reset_ms: self.reset_ms(now_ms) }
    }

    fn report(&mut self, key_user: &str, need: u64, kept: Option<u64>) -> serde_json::Value {
        self.reported = self.held();
        let mut report = serde_json::json!({
            "key": rules::limit_key(self.counted, self.window_ms, key_user),
            "window_start_ms": self.window_start,
            "window_ms": self.window_ms,
            "limit": self.limit,
            "used": self.held(),
            "demand": self.demand.max(self.last_demand),
            "need": need,
        });
        if let (Some(kept), Some(map)) = (kept, report.as_object_mut()) {
            map.insert("kept".into(), kept.into());
        }
        report
    }
}

/// The windows a spec limits globally, as (what, window, limit).
pub fn global_windows(spec: &LimitSpec) -> Vec<(Counted, u64, u64)> {
    let mut out = Vec::new();
    let rates = [
        (spec.requests_per_second, Window::Second),
        (spec.requests_per_minute, Window::Minute),
        (spec.requests_per_hour, Window::Hour),
        (spec.requests_per_day, Window::Day),
    ];
    for (limit, window) in rates {
        if let Some(l) = limit {
            out.push((Counted::Requests, window.millis(), l));
        }
    }
    let budgets = [
        (spec.tokens_per_minute, Window::Minute),
        (spec.tokens_per_hour, Window::Hour),
        (spec.tokens_per_day, Window::Day),
    ];
    for (limit, window) in budgets {
        if let Some(l) = limit {
            out.push((Counted::Tokens, window.millis(), l));
        }
    }
    if let Some(q) = &spec.quota {
        if let Some(l) = q.requests {
            out.push((Counted::QuotaRequests, q.window.millis(), l));
        }
        if let Some(l) = q.tokens {
            out.push((Counted::QuotaTokens, q.window.millis(), l));
        }
    }
    out
}

/// What a request asks of its user's leases: one request (header phase) and/or tokens
/// to reserve (once the body says what it may cost).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ask {
    pub request: bool,
    pub tokens: Option<u64>,
}

/// What an admitted request holds, to settle when it ends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GlobalTicket {
    user: String,
    /// Tokens reserved, and the windows (what, length, start) they were reserved in.
    tokens: u64,
    starts: Vec<(Counted, u64, u64)>,
}

impl GlobalTicket {
    pub fn reserved(&self) -> u64 {
        self.tokens
    }

    pub fn user(&self) -> &str {
        &self.user
    }
}

#[derive(Debug)]
pub enum Admission {
    Admitted(GlobalTicket, Headroom),
    /// The lease is short and the trackers may grant more: send this acquire body and
    /// ask again with the answer applied.
    Wait(Vec<u8>),
    Refused(LimitError),
}

/// The answer of `POST /v1/limits/sync`.
#[derive(Debug, Deserialize)]
struct SyncAnswer {
    replicas: u64,
    leases: Vec<Granted>,
}

#[derive(Debug, Deserialize)]
struct Granted {
    key: String,
    window_start_ms: u64,
    granted: u64,
    consumed: u64,
    #[serde(default)]
    used: u64,
}

/// The leases of one worker (one replica to the trackers).
#[derive(Debug)]
pub struct Leases {
    replica: String,
    seq: u64,
    interval_ms: u64,
    users: HashMap<String, Vec<Entry>>,
    max_users: usize,
    /// Replicas the trackers counted at the last answer (0: none yet).
    replicas: u64,
    /// The trackers answered within the grace.
    reachable: bool,
    /// Since when every exchange with the trackers failed.
    failing_since: Option<u64>,
    /// Requests of this worker waiting for an acquire callout.
    waiting: usize,
}

/// Requests of one worker that may wait for a lease at once; beyond, a short lease
/// refuses at once (429, retry in a second).
pub const MAX_WAITING: usize = 64;

/// Sync intervals of failed exchanges before the trackers count as unreachable.
pub const GRACE_INTERVALS: u64 = 2;

/// Where the trackers take syncs and acquires (on the `usage` cluster).
pub const SYNC_PATH: &str = "/v1/limits/sync";

impl Leases {
    pub fn new(replica: String, interval_ms: u64, max_users: usize) -> Leases {
        Leases {
            replica,
            seq: 0,
            interval_ms,
            users: HashMap::new(),
            max_users,
            replicas: 0,
            reachable: true,
            failing_since: None,
            waiting: 0,
        }
    }

    /// Counts a request that starts waiting; false when [`MAX_WAITING`] already do.
    pub fn start_waiting(&mut self) -> bool {
        let ok = self.waiting < MAX_WAITING;
        if ok {
            self.waiting += 1;
        }
        ok
    }

    pub fn stop_waiting(&mut self) {
        self.waiting = self.waiting.saturating_sub(1);
    }

    pub fn set_interval(&mut self, interval_ms: u64, max_users: usize) {
        self.interval_ms = interval_ms;
        self.max_users = max_users;
    }

    pub fn reachable(&self) -> bool {
        self.reachable
    }

    /// The user's windows for `spec`, rolled to now; the ones kept from before keep
    /// their counts (a config push that changes a limit keeps what was used).
    fn entries(&mut self, spec: &LimitSpec, user: &str, now_ms: u64) -> Option<&mut Vec<Entry>> {
        let wanted = global_windows(spec);
        if !self.users.contains_key(user) && self.users.len() >= self.max_users {
            return None;
        }
        let entries = self.users.entry(user.to_string()).or_default();
        let same = entries.len() == wanted.len()
            && entries.iter().zip(&wanted).all(|(e, w)| (e.counted, e.window_ms, e.limit) == *w);
        if !same {
            let old = std::mem::take(entries);
            for (counted, window_ms, limit) in wanted {
                let kept = old.iter().find(|e| e.counted == counted && e.window_ms == window_ms);
                entries.push(match kept {
                    Some(e) => Entry { limit, ..e.clone() },
                    None => Entry::new(counted, window_ms, limit),
                });
            }
        }
        for e in entries.iter_mut() {
            e.roll(now_ms);
        }
        Some(entries)
    }

    fn amount(e: &Entry, ask: Ask) -> Option<u64> {
        match e.counted {
            Counted::Requests | Counted::QuotaRequests => ask.request.then_some(1),
            Counted::Tokens | Counted::QuotaTokens => ask.tokens,
        }
    }

    /// Admits a request against its user's leases. `may_wait`: a short lease may be
    /// topped up by an acquire callout (false once the request waited once). `None`:
    /// too many users in this worker (`limits.max_identities`).
    pub fn admit(&mut self, spec: &LimitSpec, user: &str, ask: Ask, now_ms: u64, may_wait: bool) -> Option<Admission> {
        let reachable = self.reachable;
        let replicas = self.replicas.max(1);
        let entries = self.entries(spec, user, now_ms)?;
        let mut needs = Vec::new();
        let mut refusal: Option<LimitError> = None;
        for (i, e) in entries.iter_mut().enumerate() {
            let Some(amount) = Self::amount(e, ask) else { continue };
            if may_wait {
                e.demand = e.demand.saturating_add(amount);
            }
            let allowance = if reachable { e.granted } else { e.granted.max(rules::fallback_share(e.limit, replicas)) };
            if e.held().saturating_add(amount) <= allowance {
                continue;
            }
            // Nothing left to grant (as of the last answer): no callout. Spent: used up.
            let exhausted = e.consumed >= e.limit;
            let spent = e.fleet_used() >= e.limit;
            if reachable && may_wait && !exhausted {
                needs.push((i, e.held().saturating_add(amount).saturating_sub(e.granted)));
                continue;
            }
            if e.unused() > 0 {
                e.starved = true;
            }
            let retry_after_ms =
                if spent || !reachable { e.reset_ms(now_ms).max(1) } else { e.reset_ms(now_ms).clamp(1, 1_000) };
            let kind = e.kind();
            let error = match e.counted {
                Counted::QuotaRequests | Counted::QuotaTokens if spent || !reachable => {
                    LimitError::QuotaExceeded { kind, retry_after_ms, headroom: Headroom::default() }
                }
                _ => LimitError::RateLimited { kind, retry_after_ms, headroom: Headroom::default() },
            };
            refusal.get_or_insert(error);
        }
        if let Some(error) = refusal {
            let headroom = headroom_of(entries, now_ms);
            return Some(Admission::Refused(with_headroom(error, headroom)));
        }
        if !needs.is_empty() {
            let leases: Vec<serde_json::Value> =
                needs.iter().filter_map(|&(i, need)| entries.get_mut(i).map(|e| e.report(user, need, None))).collect();
            return Some(Admission::Wait(self.message(leases)));
        }
        let mut ticket = GlobalTicket { user: user.to_string(), tokens: 0, starts: Vec::new() };
        for e in entries.iter_mut() {
            let Some(amount) = Self::amount(e, ask) else { continue };
            match e.counted {
                Counted::Requests | Counted::QuotaRequests => e.used = e.used.saturating_add(amount),
                Counted::Tokens | Counted::QuotaTokens => {
                    e.reserved = e.reserved.saturating_add(amount);
                    ticket.tokens = amount;
                    ticket.starts.push((e.counted, e.window_ms, e.window_start));
                }
            }
            e.dirty = true;
        }
        Some(Admission::Admitted(ticket, headroom_of(entries, now_ms)))
    }

    /// A request ended: its reservation is released (in the windows it was made in)
    /// and `tokens` charged to the token windows.
    pub fn settle(&mut self, spec: &LimitSpec, ticket: &GlobalTicket, tokens: u64, now_ms: u64) {
        let Some(entries) = self.entries(spec, &ticket.user, now_ms) else { return };
        for e in entries.iter_mut().filter(|e| matches!(e.counted, Counted::Tokens | Counted::QuotaTokens)) {
            if ticket.starts.contains(&(e.counted, e.window_ms, e.window_start)) {
                e.reserved = e.reserved.saturating_sub(ticket.tokens);
            }
            e.used = e.used.saturating_add(tokens);
            e.dirty = true;
        }
    }

    fn message(&mut self, leases: Vec<serde_json::Value>) -> Vec<u8> {
        self.seq += 1;
        serde_json::json!({
            "replica": self.replica,
            "seq": self.seq,
            "interval_ms": self.interval_ms,
            "leases": leases,
        })
        .to_string()
        .into_bytes()
    }

    /// The periodic sync: every window that changed, had demand since the last one or
    /// gives part of its grant back (at most `MAX_LEASES_PER_SYNC`); `None` when there
    /// is nothing to say. Users whose windows all ended with nothing in flight are
    /// forgotten.
    pub fn sync_body(&mut self, now_ms: u64) -> Option<Vec<u8>> {
        self.users.retain(|_, entries| {
            entries.iter().any(|e| e.reserved > 0 || rules::window_start(now_ms, e.window_ms) == e.window_start)
        });
        let seq = self.seq + 1;
        let mut leases = Vec::new();
        for (user, entries) in &mut self.users {
            for e in entries.iter_mut() {
                if leases.len() >= rules::MAX_LEASES_PER_SYNC {
                    break;
                }
                e.roll(now_ms);
                let kept = e.give_back();
                if kept.is_some() {
                    e.floor_seq = seq;
                }
                if e.dirty || e.demand > 0 || e.last_demand > 0 || kept.is_some() {
                    leases.push(e.report(user, 0, kept));
                    e.last_demand = e.demand;
                    e.demand = 0;
                    e.dirty = false;
                }
            }
        }
        (!leases.is_empty()).then(|| self.message(leases))
    }

    /// The sequence number of the last message built.
    pub fn last_seq(&self) -> u64 {
        self.seq
    }

    /// A callout could not even be sent (the host refused it: no such cluster, …): not
    /// a passing failure, the trackers count as unreachable at once.
    pub fn unreachable(&mut self, now_ms: u64) -> bool {
        self.failing_since.get_or_insert(now_ms);
        std::mem::replace(&mut self.reachable, false)
    }

    /// The trackers answered message `seq` (a sync or an acquire; `Some(body)` on a 200)
    /// or did not (after its retry). Returns whether reachability changed (worth a log
    /// line).
    pub fn answered(&mut self, answer: Option<&[u8]>, seq: u64, now_ms: u64) -> bool {
        let parsed = answer.and_then(|b| serde_json::from_slice::<SyncAnswer>(b).ok());
        let was = self.reachable;
        let Some(answer) = parsed else {
            let since = *self.failing_since.get_or_insert(now_ms);
            let grace = self.interval_ms.saturating_mul(GRACE_INTERVALS);
            self.reachable = self.reachable && now_ms.saturating_sub(since) < grace;
            return was != self.reachable;
        };
        self.failing_since = None;
        self.reachable = true;
        self.replicas = answer.replicas;
        for g in answer.leases {
            let mut parts = g.key.splitn(3, '/');
            let (Some(counted), Some(window), Some(user)) = (parts.next(), parts.next(), parts.next()) else {
                continue;
            };
            let Some(entries) = self.users.get_mut(user) else { continue };
            let window_ms = window.parse::<u64>().unwrap_or(0);
            if let Some(e) = entries.iter_mut().find(|e| {
                e.counted.as_str() == counted && e.window_ms == window_ms && e.window_start == g.window_start_ms
            }) {
                if seq >= e.floor_seq {
                    e.granted = e.granted.max(g.granted);
                }
                e.consumed = g.consumed;
                e.fleet_used = g.used;
            }
        }
        !was
    }
}

fn headroom_of(entries: &[Entry], now_ms: u64) -> Headroom {
    let tighter = |a: Option<Counter>, b: Counter| match a {
        Some(a) if (a.remaining, a.limit) <= (b.remaining, b.limit) => Some(a),
        _ => Some(b),
    };
    let mut h = Headroom::default();
    for e in entries {
        let c = e.counter(now_ms);
        match e.kind() {
            LimitKind::Requests => h.requests = tighter(h.requests, c),
            LimitKind::Tokens => h.tokens = tighter(h.tokens, c),
        }
    }
    h
}

fn with_headroom(error: LimitError, headroom: Headroom) -> LimitError {
    match error {
        LimitError::RateLimited { kind, retry_after_ms, .. } => {
            LimitError::RateLimited { kind, retry_after_ms, headroom }
        }
        LimitError::QuotaExceeded { kind, retry_after_ms, .. } => {
            LimitError::QuotaExceeded { kind, retry_after_ms, headroom }
        }
    }
}

#[cfg(test)]
mod tests {
    //! A fleet of workers against the real grant rule (`tollgate_rules::lease::grant`),
    //! the tracker played by a map: what the bound promises, and the fallback.
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use rules::{Holding, Report};
    use std::collections::BTreeMap;

    const T0: u64 = 1_763_800_040_000; // 20 s into a minute

    fn spec(json: &str) -> LimitSpec {
        serde_json::from_str(json).unwrap()
    }

    /// The trackers: holdings per (key, window start, replica), the grant rule applied.
    #[derive(Default)]
    struct Trackers {
        holdings: BTreeMap<(String, u64), BTreeMap<String, Holding>>,
        replicas: BTreeMap<String, u64>,
        last_body: Vec<u8>,
    }

    impl Trackers {
        fn sync(&mut self, body: &[u8], now_ms: u64) -> Vec<u8> {
            self.last_body = body.to_vec();
            let v: serde_json::Value = serde_json::from_slice(body).unwrap();
            let replica = v["replica"].as_str().unwrap().to_string();
            self.replicas.insert(replica.clone(), now_ms);
            let mut out = Vec::new();
            for l in v["leases"].as_array().unwrap() {
                let key = l["key"].as_str().unwrap().to_string();
                let start = l["window_start_ms"].as_u64().unwrap();
                rules::check_key(&key).unwrap();
                let window = self.holdings.entry((key.clone(), start)).or_default();
                let mine = window.get(&replica).copied().unwrap_or_default();
                let others: Vec<Holding> = window.iter().filter(|(r, _)| **r != replica).map(|(_, h)| *h).collect();
                let report = Report {
                    limit: l["limit"].as_u64().unwrap(),
                    used: l["used"].as_u64().unwrap(),
                    demand: l["demand"].as_u64().unwrap(),
                    need: l["need"].as_u64().unwrap(),
                    kept: l["kept"].as_u64(),
                };
                let new = rules::grant(mine, &others, report, now_ms, 1_000);
                window.insert(replica.clone(), new);
                let consumed: u64 = window.values().map(Holding::consumed).sum();
                let used: u64 = window.values().map(|h| h.used).sum();
                out.push(serde_json::json!({"key": key, "window_start_ms": start, "granted": new.granted,
                    "consumed": consumed, "used": used}));
            }
            serde_json::json!({"replicas": self.replicas.len(), "leases": out}).to_string().into_bytes()
        }
    }

    /// Admits with the trackers answering every acquire at once.
    fn admit(w: &mut Leases, t: &mut Trackers, s: &LimitSpec, ask: Ask, now: u64) -> Result<GlobalTicket, LimitError> {
        let mut may_wait = true;
        loop {
            match w.admit(s, "alice", ask, now, may_wait).unwrap() {
                Admission::Admitted(ticket, _) => return Ok(ticket),
                Admission::Refused(e) => return Err(e),
                Admission::Wait(body) => {
                    let answer = t.sync(&body, now);
                    w.answered(Some(&answer), w.last_seq(), 0);
                    may_wait = false;
                }
            }
        }
    }

    #[test]
    fn a_fleet_admits_exactly_the_limit_and_far_from_it_asks_nothing() {
        let s = spec(r#"{"requests_per_minute":20}"#);
        let mut t = Trackers::default();
        let mut fleet: Vec<Leases> = (0..4).map(|i| Leases::new(format!("w{i}"), 1_000, 100)).collect();
        let mut admitted = 0;
        for k in 0..100u64 {
            let now = T0 + k * 10;
            let w = &mut fleet[(k * 7 % 4) as usize];
            if admit(w, &mut t, &s, Ask { request: true, tokens: None }, now).is_ok() {
                admitted += 1;
            }
            if k % 25 == 24 {
                for w in &mut fleet {
                    if let Some(body) = w.sync_body(now) {
                        let answer = t.sync(&body, now);
                        w.answered(Some(&answer), w.last_seq(), 0);
                    }
                }
            }
        }
        assert_eq!(admitted, 20);

        // Far from a limit, after one sync, a worker admits its demand without a callout.
        let s = spec(r#"{"requests_per_minute":100000}"#);
        let mut w = Leases::new("solo".into(), 1_000, 100);
        let mut t = Trackers::default();
        for k in 0..10 {
            admit(&mut w, &mut t, &s, Ask { request: true, tokens: None }, T0 + k).unwrap();
        }
        let body = w.sync_body(T0 + 1_000).unwrap();
        w.answered(Some(&t.sync(&body, T0 + 1_000)), w.last_seq(), 0);
        for k in 0..10 {
            let got = w.admit(&s, "alice", Ask { request: true, tokens: None }, T0 + 1_001 + k, true).unwrap();
            assert!(matches!(got, Admission::Admitted(..)), "request {k}: {got:?}");
        }
    }

    #[test]
    fn spent_windows_are_refused_without_a_callout_until_they_roll_over() {
        let s = spec(r#"{"requests_per_minute":2,"quota":{"requests":3,"window":"hour"}}"#);
        let mut t = Trackers::default();
        let mut w = Leases::new("w".into(), 1_000, 100);
        let ask = Ask { request: true, tokens: None };
        assert!(admit(&mut w, &mut t, &s, ask, T0).is_ok());
        assert!(admit(&mut w, &mut t, &s, ask, T0 + 1).is_ok());
        match w.admit(&s, "alice", ask, T0 + 2, true).unwrap() {
            Admission::Refused(LimitError::RateLimited { kind: LimitKind::Requests, retry_after_ms, headroom }) => {
                assert_eq!(retry_after_ms, 40_000 - 2);
                assert_eq!(headroom.requests.unwrap().remaining, 0);
            }
            other => panic!("{other:?}"),
        }
        // Next minute: one more of the quota, then the quota is spent for the hour.
        assert!(admit(&mut w, &mut t, &s, ask, T0 + 60_000).is_ok());
        assert!(matches!(admit(&mut w, &mut t, &s, ask, T0 + 60_001), Err(LimitError::QuotaExceeded { .. })));
    }

    #[test]
    fn tokens_are_reserved_then_settled() {
        let s = spec(r#"{"tokens_per_minute":100}"#);
        let mut t = Trackers::default();
        let mut w = Leases::new("w".into(), 1_000, 100);
        let ask = |n| Ask { request: true, tokens: Some(n) };
        let a = admit(&mut w, &mut t, &s, ask(60), T0).unwrap();
        assert_eq!(a.reserved(), 60);
        let b = admit(&mut w, &mut t, &s, ask(40), T0).unwrap();
        assert!(admit(&mut w, &mut t, &s, ask(1), T0).is_err(), "all 100 reserved");
        w.settle(&s, &a, 10, T0 + 1);
        w.settle(&s, &b, 10, T0 + 1);
        // 20 used: 80 left fleet-wide, but this worker's grant is what it is until a sync.
        let body = w.sync_body(T0 + 1_000).unwrap();
        let sent: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(sent["leases"][0]["used"], 20);
        assert!(admit(&mut w, &mut t, &s, ask(70), T0 + 1_000).is_ok());
        assert!(admit(&mut w, &mut t, &s, ask(11), T0 + 1_000).is_err());
    }

    #[test]
    fn unreachable_trackers_leave_the_lease_then_a_share_of_the_limit() {
        let s = spec(r#"{"requests_per_minute":20}"#);
        let mut t = Trackers::default();
        let mut fleet: Vec<Leases> = (0..4).map(|i| Leases::new(format!("w{i}"), 1_000, 100)).collect();
        for w in &mut fleet {
            admit(w, &mut t, &s, Ask { request: true, tokens: None }, T0).unwrap();
        }
        for w in &mut fleet {
            let body = w.sync_body(T0).unwrap();
            w.answered(Some(&t.sync(&body, T0)), w.last_seq(), 0);
        }
        let w = &mut fleet[0];
        assert!(!w.answered(None, 0, T0), "a failure: the grace starts");
        assert!(!w.answered(None, 0, T0 + 1_999), "still within the grace");
        assert!(w.answered(None, 0, T0 + 2_000), "failing for two intervals: unreachable");
        assert!(!w.reachable());
        let mut admitted = 0;
        for k in 0..50 {
            if let Admission::Admitted(..) =
                w.admit(&s, "alice", Ask { request: true, tokens: None }, T0 + k, true).unwrap()
            {
                admitted += 1;
            }
        }
        // ceil(20 / 4 replicas) in the window, the one admitted before included.
        assert_eq!(admitted + 1, 5);
        // Never before any answer: the whole limit per worker, never unlimited.
        let mut lone = Leases::new("x".into(), 1_000, 100);
        assert!(lone.unreachable(T0));
        let n = (0..50)
            .filter(|k| {
                matches!(
                    lone.admit(&s, "alice", Ask { request: true, tokens: None }, T0 + k, true),
                    Some(Admission::Admitted(..))
                )
            })
            .count();
        assert_eq!(n, 20);
    }

    /// A grant a worker does not use goes back to the trackers: after its demand stops
    /// (two intervals later), or at once when it was too small for a request.
    #[test]
    fn unused_grants_go_back_for_other_workers() {
        let s = spec(r#"{"tokens_per_minute":40}"#);
        let mut t = Trackers::default();
        let (mut a, mut b) = (Leases::new("a".into(), 1_000, 10), Leases::new("b".into(), 1_000, 10));
        let ask = |n| Ask { request: true, tokens: Some(n) };
        let sync = |w: &mut Leases, t: &mut Trackers, now| {
            if let Some(body) = w.sync_body(now) {
                w.answered(Some(&t.sync(&body, now)), w.last_seq(), now);
            }
        };
        let first = admit(&mut a, &mut t, &s, ask(20), T0).unwrap();
        a.settle(&s, &first, 5, T0);
        assert!(admit(&mut b, &mut t, &s, ask(20), T0).is_err(), "a holds the whole budget");
        for k in 1..=3 {
            sync(&mut a, &mut t, T0 + k * 1_000);
        }
        sync(&mut b, &mut t, T0 + 3_000);
        assert!(admit(&mut b, &mut t, &s, ask(20), T0 + 3_001).is_ok(), "a gave back what it did not use");

        // Starved: 15 left in its lease, 20 asked. It gives the 15 back at the next sync.
        let mut t = Trackers::default();
        let (mut a, mut b) = (Leases::new("a".into(), 1_000, 10), Leases::new("b".into(), 1_000, 10));
        let first = admit(&mut a, &mut t, &s, ask(20), T0).unwrap();
        a.settle(&s, &first, 25, T0);
        assert!(admit(&mut a, &mut t, &s, ask(20), T0).is_err());
        sync(&mut a, &mut t, T0 + 1_000);
        let sent: serde_json::Value = serde_json::from_slice(&t.last_body).unwrap();
        assert_eq!(sent["leases"][0]["kept"], 25, "{sent}");
        assert!(admit(&mut b, &mut t, &s, ask(15), T0 + 1_001).is_ok());
    }

    #[test]
    fn users_are_bounded_and_forgotten_when_their_windows_end() {
        let s = spec(r#"{"requests_per_second":5}"#);
        let mut w = Leases::new("w".into(), 1_000, 2);
        assert!(w.admit(&s, "a", Ask { request: true, tokens: None }, T0, true).is_some());
        assert!(w.admit(&s, "b", Ask { request: true, tokens: None }, T0, true).is_some());
        assert!(w.admit(&s, "c", Ask { request: true, tokens: None }, T0, true).is_none());
        w.sync_body(T0 + 5_000);
        assert!(w.admit(&s, "c", Ask { request: true, tokens: None }, T0 + 5_000, true).is_some());
    }
}
