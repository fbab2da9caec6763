//! The durable usage ledger: why counters survive restarts and why an acknowledged
//! event is never lost.
//!
//! Prometheus counters in memory reset on every restart, and whatever was not scraped
//! yet is gone, which is not good enough for billing and quotas. So, with a ledger,
//! `/track` writes the accepted events to a store in **one transaction per batch** and
//! answers 200 only after that transaction is committed (and, for SQLite, fsynced); the
//! filter drops an event only after a 2xx. A failed write answers 503 and the filter
//! resends the batch.
//!
//! Three usage tables, the same in both backends ([`sqlite`], [`postgres`]), each defined once
//! in `schema.rs`, as every query is in `queries.rs`; what differs between the backends'
//! SQL is in `sql.rs` (placeholders, types, many-row inserts, the schema version):
//!
//! - `usage_events`: one row per accepted event (an aggregated denial is one row whose
//!   `requests` column holds its `count`; every other row holds 1). Its `id` is `UNIQUE`, and that index
//!   *is* the duplicate detection: an insert that conflicts is a duplicate. So dedup
//!   survives restarts and works across replicas sharing one PostgreSQL, for as long as
//!   the event stays in the ledger (the retention period), far longer than the filter's
//!   retries. Callbacks without an id (`NULL`) never conflict.
//! - `usage_totals`: lifetime sums per replica and series key, updated in the same
//!   transaction as the events. On start a tracker restores its Prometheus counters from
//!   its own rows, in O(series) rather than O(events).
//! - `usage_daily`: what compaction leaves of events older than the retention: per-day
//!   sums by the same key, so `/v1/usage` totals stay exact after the raw events go.
//!
//! Three more hold the state of global limits (`POST /v1/limits/sync`,
//! [`crate::limits_sync`]), shared by all tracker replicas on one PostgreSQL:
//!
//! - `limit_windows`: one row per limit window; a sync locks its windows' rows (in key
//!   order) before it reads and grants, so two trackers never grant from the same
//!   "left" at once.
//! - `limit_holdings`: per window and gateway replica, what it was granted, used and
//!   demanded, when it last synced and with which `seq`.
//! - `limit_replicas`: when each gateway replica last synced.
//!
//! Rows of windows that ended more than a day ago are deleted (at most once a minute).
//!
//! One more holds managed API keys ([`crate::keys_api`], schema version 4):
//!
//! - `api_keys`: one row per key ever created, with the SHA-256 of the key (never the
//!   key), its user, groups, name and times; revoking sets `revoked_at_ms` and keeps
//!   the row, so the changes feed can tell the gateways.
//!
//! Counts are stored as signed 64-bit integers (both backends' widest integer); sums
//! saturate at `i64::MAX` rather than fail, as the in-memory counters saturate.
//! Values are the normalised label values before the cardinality guard (the real user
//! name, even when Prometheus shows `other`).

pub mod postgres;
mod queries;
mod schema;
mod sql;
pub mod sqlite;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use crate::event::{Event, Outcome, Tokens};
use crate::limits_sync::{LimitSync, Synced};
use crate::time::{self, DAY_MS};

/// Events moved into daily totals per compaction transaction: small enough that a
/// compaction never holds up `/track` for long, big enough to be quick.
pub const COMPACT_CHUNK: usize = 5_000;

/// The summed columns of `usage_totals` and `usage_daily`, in the order of [`Totals::columns`].
pub const TOTAL_COLUMNS: [&str; 7] = [
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "incomplete",
    "upstream_errors",
];

/// Everything that can go wrong with the ledger. The HTTP edge turns it into a 503
/// (the sender retries; the request changed nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedgerError {
    /// The store cannot be opened, created or migrated (fatal at start).
    Open(String),
    /// A write failed; the transaction was rolled back.
    Write(String),
    /// A read failed.
    Read(String),
}

impl fmt::Display for LedgerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LedgerError::Open(m) => write!(f, "cannot open the ledger: {m}"),
            LedgerError::Write(m) => write!(f, "ledger write failed: {m}"),
            LedgerError::Read(m) => write!(f, "ledger read failed: {m}"),
        }
    }
}

impl std::error::Error for LedgerError {}

/// One event as the ledger stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub id: Option<String>,
    /// The event's time (its `ts`, else when it arrived), ms since the epoch.
    pub ts_ms: i64,
    pub key: SeriesKey,
    pub status: Option<u16>,
    /// The requests the event stands for: 1, or an aggregated denial's `count`.
    pub requests: u64,
    pub tokens: Tokens,
    pub incomplete: bool,
    pub upstream_error: bool,
}

impl Record {
    pub fn from_event(event: &Event, received_ms: i64) -> Record {
        let (key, tokens, incomplete, upstream_error) = match &event.outcome {
            Outcome::Denied { reason, .. } => {
                let key = SeriesKey {
                    user: String::new(),
                    groups: String::new(),
                    path: event.path.to_owned(),
                    model: String::new(),
                    denied: (*reason).to_owned(),
                };
                (key, Tokens::default(), false, false)
            }
            Outcome::Authorized(usage) => {
                let key = SeriesKey {
                    user: usage.user.clone(),
                    groups: usage.groups.clone(),
                    path: event.path.to_owned(),
                    model: usage.model.clone().unwrap_or_default(),
                    denied: String::new(),
                };
                (key, usage.tokens, usage.incomplete, usage.upstream_error)
            }
        };
        Record {
            id: event.id.clone(),
            ts_ms: event.ts_ms.unwrap_or(received_ms),
            key,
            status: event.status,
            requests: event.outcome.requests(),
            tokens,
            incomplete,
            upstream_error,
        }
    }

    pub fn totals(&self) -> Totals {
        Totals {
            requests: self.requests,
            prompt: self.tokens.prompt,
            completion: self.tokens.completion,
            cached: self.tokens.cached,
            reasoning: self.tokens.reasoning,
            incomplete: u64::from(self.incomplete),
            upstream_errors: u64::from(self.upstream_error),
        }
    }
}

/// What a row of `usage_totals` or `usage_daily` sums over: the labels of the
/// Prometheus series the events count in. Empty strings stand for "none" so the key
/// can be a primary key: `user` for a denied event, `model` for an event that reports
/// no usage, `denied` for an authorized one (none of them is ever empty otherwise).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesKey {
    pub user: String,
    pub groups: String,
    pub path: String,
    pub model: String,
    pub denied: String,
}

/// Sums over events; every field saturates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub requests: u64,
    pub prompt: u64,
    pub completion: u64,
    pub cached: u64,
    pub reasoning: u64,
    pub incomplete: u64,
    pub upstream_errors: u64,
}

impl Totals {
    pub fn add(&mut self, other: &Totals) {
        self.requests = self.requests.saturating_add(other.requests);
        self.prompt = self.prompt.saturating_add(other.prompt);
        self.completion = self.completion.saturating_add(other.completion);
        self.cached = self.cached.saturating_add(other.cached);
        self.reasoning = self.reasoning.saturating_add(other.reasoning);
        self.incomplete = self.incomplete.saturating_add(other.incomplete);
        self.upstream_errors = self.upstream_errors.saturating_add(other.upstream_errors);
    }

    /// The values in [`TOTAL_COLUMNS`] order, as stored (saturated to `i64::MAX`).
    pub fn columns(&self) -> [i64; 7] {
        [
            self.requests,
            self.prompt,
            self.completion,
            self.cached,
            self.reasoning,
            self.incomplete,
            self.upstream_errors,
        ]
        .map(to_sql)
    }

    /// From stored values in [`TOTAL_COLUMNS`] order (negative values, which the
    /// tracker never writes, read as 0).
    pub fn from_columns(values: [i64; 7]) -> Totals {
        let [requests, prompt, completion, cached, reasoning, incomplete, upstream_errors] = values.map(from_sql);
        Totals { requests, prompt, completion, cached, reasoning, incomplete, upstream_errors }
    }
}

/// A count as stored: saturated to `i64::MAX`.
pub fn to_sql(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A stored count.
pub fn from_sql(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// Sums `records` by series key, in first-seen order.
pub fn sum_by_key<'a>(records: impl IntoIterator<Item = &'a Record>) -> Vec<(SeriesKey, Totals)> {
    let mut index: HashMap<&SeriesKey, usize> = HashMap::new();
    let mut sums: Vec<(SeriesKey, Totals)> = Vec::new();
    for record in records {
        let totals = record.totals();
        match index.get(&record.key).and_then(|&i| sums.get_mut(i)) {
            Some((_, sum)) => sum.add(&totals),
            None => {
                index.insert(&record.key, sums.len());
                sums.push((record.key.clone(), totals));
            }
        }
    }
    sums
}

/// One row deleted by compaction: its day, replica and series, and its counts.
#[derive(Debug, Clone)]
pub struct Compacted {
    pub day_ms: i64,
    pub replica: String,
    pub key: SeriesKey,
    pub totals: Totals,
}

/// Sums compacted rows by (day, replica, key).
fn sum_daily(rows: Vec<Compacted>) -> Vec<Compacted> {
    let mut sums: HashMap<(i64, String, SeriesKey), Totals> = HashMap::new();
    for row in rows {
        sums.entry((row.day_ms, row.replica, row.key)).or_default().add(&row.totals);
    }
    let mut out: Vec<Compacted> =
        sums.into_iter().map(|((day_ms, replica, key), totals)| Compacted { day_ms, replica, key, totals }).collect();
    // A fixed order, so concurrent compactions lock rows in the same order.
    out.sort_by(|a, b| (a.day_ms, &a.replica, &a.key).cmp(&(b.day_ms, &b.replica, &b.key)));
    out
}

/// Totals of one bucket of `/v1/usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageBucket {
    pub start_ms: i64,
    pub totals: Totals,
}

/// One event of `/v1/usage/recent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecentEvent {
    pub id: Option<String>,
    pub ts_ms: i64,
    pub groups: String,
    pub path: String,
    /// Empty when the event reported no usage.
    pub model: String,
    pub status: Option<u16>,
    pub tokens: Tokens,
    pub incomplete: bool,
    pub replica: String,
}

/// A managed API key as the ledger stores it: never the key, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// `key_` + 16 hex characters.
    pub id: String,
    /// Lowercase hex SHA-256 of the key.
    pub sha256: String,
    pub user: String,
    /// Sorted, de-duplicated and joined with `,` (as events store groups); empty: none.
    pub groups: String,
    pub name: Option<String>,
    pub created_at_ms: i64,
    pub expires_at_ms: Option<i64>,
    pub revoked_at_ms: Option<i64>,
    pub last_used_at_ms: Option<i64>,
}

/// What `DELETE /v1/keys/{id}` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revoked {
    /// Revoked now.
    Now,
    /// It was revoked before (its `revoked_at_ms` stays).
    Already,
    /// No key has this id.
    Unknown,
}

/// What the changes feed reports: digests of keys revoked or expired, with the time of
/// the change (ms), oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyChange {
    pub sha256: String,
    pub at_ms: i64,
}

/// The storage behind a [`Ledger`].
#[derive(Debug)]
enum Backend {
    /// Writes go to its writer thread; reads are blocking calls on tokio's blocking threads.
    Sqlite(Arc<sqlite::Sqlite>),
    Postgres(Box<postgres::Postgres>),
}

/// The ledger: a backend and the name this replica writes its rows under. Methods are
/// async; SQLite's blocking calls run on tokio's blocking threads, so the runtime's
/// threads never wait for a disk.
#[derive(Debug)]
pub struct Ledger {
    backend: Backend,
    replica: Arc<str>,
}

/// Runs a blocking SQLite call off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, LedgerError> + Send + 'static,
) -> Result<T, LedgerError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| LedgerError::Write(format!("ledger task failed: {e}")))?
}

/// Runs `$query`, a read of [`queries`] on the [`sql::Tx`] named `$tx`, on `$ledger`'s
/// reader: SQLite's on a blocking thread (so `$query` may only borrow what it owns:
/// it is moved there), PostgreSQL's on its reader connection.
macro_rules! read {
    ($ledger:expr, |$tx:ident| $query:expr) => {
        match &$ledger.backend {
            Backend::Sqlite(s) => {
                let s = Arc::clone(s);
                blocking(move || s.read(|$tx| sqlite::run_now($query))).await
            }
            Backend::Postgres(p) => {
                let reader = p.reader_tx().await?;
                let $tx = &reader.tx();
                $query.await.map_err(LedgerError::Read)
            }
        }
    };
}

impl Ledger {
    /// The SQLite ledger in `dir` (created if missing): `dir/usage.sqlite3`. Blocks
    /// briefly (opens and migrates the file).
    pub fn open_sqlite(dir: &Path, replica: &str) -> Result<Ledger, LedgerError> {
        Ok(Ledger { backend: Backend::Sqlite(Arc::new(sqlite::Sqlite::open(dir)?)), replica: replica.into() })
    }

    /// The PostgreSQL ledger at `url` (`postgres://user:password@host:port/database`),
    /// its schema created if missing.
    pub async fn open_postgres(url: &str, replica: &str) -> Result<Ledger, LedgerError> {
        Ok(Ledger {
            backend: Backend::Postgres(Box::new(postgres::Postgres::open(url).await?)),
            replica: replica.into(),
        })
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// "sqlite /data/usage.sqlite3" or "postgresql host:port/db", for the log (no password).
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Sqlite(s) => format!("sqlite {}", s.path().display()),
            Backend::Postgres(p) => format!("postgresql {}", p.describe()),
        }
    }

    /// Writes a checked batch in one transaction and says, per event, whether it is new
    /// (`true`) or a duplicate of an event already in the ledger or earlier in the batch.
    /// On error nothing was written.
    pub async fn append(&self, events: &[Event], received_ms: i64) -> Result<Vec<bool>, LedgerError> {
        let mut seen: HashSet<&str> = HashSet::new();
        // (index in `events`, record); the first copy of an id in the batch is tried.
        let mut records: Vec<(usize, Record)> = Vec::with_capacity(events.len());
        for (i, event) in events.iter().enumerate() {
            if event.id.as_deref().is_none_or(|id| seen.insert(id)) {
                records.push((i, Record::from_event(event, received_ms)));
            }
        }
        // Inserting in id order means two replicas writing overlapping batches take the
        // unique-index locks in the same order and cannot deadlock.
        records.sort_by(|a, b| a.1.id.cmp(&b.1.id));
        let (indexes, records): (Vec<usize>, Vec<Record>) = records.into_iter().unzip();
        let inserted = match &self.backend {
            Backend::Sqlite(s) => s.append(records, Arc::clone(&self.replica), received_ms).await?,
            Backend::Postgres(p) => p.append(&records, &self.replica, received_ms).await?,
        };
        let mut is_new = vec![false; events.len()];
        for (i, new) in indexes.into_iter().zip(inserted) {
            if let Some(flag) = is_new.get_mut(i) {
                *flag = new;
            }
        }
        Ok(is_new)
    }

    /// This replica's lifetime totals per series, in the order the series first
    /// appeared (so the cardinality guard admits the same values as before).
    pub async fn restore(&self) -> Result<Vec<(SeriesKey, Totals)>, LedgerError> {
        let replica = Arc::clone(&self.replica);
        read!(self, |tx| queries::restore(tx, &replica))
    }

    /// Whether any event of `user` was ever recorded (by any replica).
    pub async fn knows_user(&self, user: &str) -> Result<bool, LedgerError> {
        let user = user.to_owned();
        read!(self, |tx| queries::knows_user(tx, &user))
    }

    /// `user`'s totals per bucket of `width_ms` (aligned to UTC) for events in
    /// `[since_ms, until_ms)`, only the buckets that have events, oldest first. Compacted
    /// days count whole, in the bucket at their midnight, when their day starts in the
    /// range or holds `since_ms`.
    pub async fn usage(
        &self,
        user: &str,
        since_ms: i64,
        until_ms: i64,
        width_ms: i64,
    ) -> Result<Vec<UsageBucket>, LedgerError> {
        self.usage_of(Scope::User(user.to_owned()), since_ms, until_ms, width_ms).await
    }

    /// As [`Ledger::usage`], for the events of any [`Scope`].
    pub async fn usage_of(
        &self,
        scope: Scope,
        since_ms: i64,
        until_ms: i64,
        width_ms: i64,
    ) -> Result<Vec<UsageBucket>, LedgerError> {
        let range = UsageRange { since_ms, until_ms, width_ms, since_day_ms: time::floor(since_ms, DAY_MS) };
        read!(self, |tx| queries::usage(tx, &scope, range))
    }

    /// The totals of `scope`'s events in `[since_ms, until_ms)` (compacted days as in
    /// [`Ledger::usage`]) per user, model or deny reason, by label; only labels with
    /// events. An empty label is "none" (an event without a model).
    pub async fn breakdown(
        &self,
        scope: Scope,
        since_ms: i64,
        until_ms: i64,
        by: Dimension,
    ) -> Result<Vec<(String, Totals)>, LedgerError> {
        let range = UsageRange { since_ms, until_ms, width_ms: DAY_MS, since_day_ms: time::floor(since_ms, DAY_MS) };
        read!(self, |tx| queries::breakdown(tx, &scope, range, by))
    }

    /// `user`'s latest `limit` events still in the ledger, newest first.
    pub async fn recent(&self, user: &str, limit: u32) -> Result<Vec<RecentEvent>, LedgerError> {
        let user = user.to_owned();
        read!(self, |tx| queries::recent(tx, &user, limit))
    }

    /// Moves events older than `retention_days` whole UTC days before `now_ms` into
    /// `usage_daily`, a chunk per transaction (rows deleted and their sums added in the
    /// same transaction, so totals are right at every moment). Returns how many moved.
    pub async fn compact(&self, now_ms: i64, retention_days: u32) -> Result<u64, LedgerError> {
        let cutoff = time::floor(now_ms.saturating_sub(i64::from(retention_days).saturating_mul(DAY_MS)), DAY_MS);
        let mut moved = 0u64;
        loop {
            let n = match &self.backend {
                Backend::Sqlite(s) => s.compact_chunk(cutoff, COMPACT_CHUNK).await?,
                Backend::Postgres(p) => p.compact_chunk(cutoff, COMPACT_CHUNK).await?,
            };
            moved += n as u64;
            if n < COMPACT_CHUNK {
                return Ok(moved);
            }
        }
    }

    /// Applies a checked `POST /v1/limits/sync` in one transaction (committed when this
    /// returns Ok; rolled back on error, changing nothing): see [`crate::limits_sync`].
    pub async fn sync_limits(&self, sync: Arc<LimitSync>, now_ms: u64) -> Result<Synced, LedgerError> {
        match &self.backend {
            Backend::Sqlite(s) => s.write(move |tx| sqlite::run_now(queries::sync_limits(tx, &sync, now_ms))).await,
            Backend::Postgres(p) => p.in_transaction(async |tx| queries::sync_limits(tx, &sync, now_ms).await).await,
        }
    }

    /// Deletes global-limit holdings of windows that ended before `cutoff_ms`, and
    /// replicas not seen since (one transaction).
    pub async fn forget_limits(&self, cutoff_ms: u64) -> Result<(), LedgerError> {
        let cutoff = to_sql(cutoff_ms);
        match &self.backend {
            Backend::Sqlite(s) => s.write(move |tx| sqlite::run_now(queries::forget_limits(tx, cutoff))).await,
            Backend::Postgres(p) => p.in_transaction(async |tx| queries::forget_limits(tx, cutoff).await).await,
        }
    }

    /// Stores a new managed API key (one transaction). Fails, writing nothing, if its id
    /// or digest is taken.
    pub async fn create_key(&self, key: ApiKey) -> Result<(), LedgerError> {
        match &self.backend {
            Backend::Sqlite(s) => s.write(move |tx| sqlite::run_now(queries::create_key(tx, &key))).await,
            Backend::Postgres(p) => p.in_transaction(async |tx| queries::create_key(tx, &key).await).await,
        }
    }

    /// Keys, newest first: `user`'s, or everyone's; at most `limit`.
    pub async fn list_keys(&self, user: Option<&str>, limit: u32) -> Result<Vec<ApiKey>, LedgerError> {
        let user = user.map(str::to_owned);
        read!(self, |tx| queries::list_keys(tx, user.as_deref(), limit))
    }

    /// The key with this digest (lowercase hex SHA-256), revoked or expired or not.
    pub async fn find_key(&self, sha256: &str) -> Result<Option<ApiKey>, LedgerError> {
        let sha256 = sha256.to_owned();
        read!(self, |tx| queries::find_key(tx, &sha256))
    }

    /// Sets a key's `last_used_at_ms`.
    pub async fn touch_key(&self, id: &str, now_ms: i64) -> Result<(), LedgerError> {
        let id = id.to_owned();
        match &self.backend {
            Backend::Sqlite(s) => s.write(move |tx| sqlite::run_now(queries::touch_key(tx, &id, now_ms))).await,
            Backend::Postgres(p) => p.in_transaction(async |tx| queries::touch_key(tx, &id, now_ms).await).await,
        }
    }

    /// Revokes a key (one transaction) at the clock's time inside it, so the time is as
    /// close to the commit as it can be; a key revoked before keeps its first time.
    pub async fn revoke_key(&self, id: &str) -> Result<Revoked, LedgerError> {
        let id = id.to_owned();
        match &self.backend {
            Backend::Sqlite(s) => {
                s.write(move |tx| sqlite::run_now(queries::revoke_key(tx, &id, time::now_ms()))).await
            }
            Backend::Postgres(p) => {
                p.in_transaction(async |tx| queries::revoke_key(tx, &id, time::now_ms()).await).await
            }
        }
    }

    /// Up to `limit` changes after `since_ms`, oldest first: keys revoked after it, and
    /// keys whose expiry passed in (`since_ms`, `now_ms`] (unless they were revoked
    /// before that). A key may appear twice (revoked, and expired later).
    pub async fn key_changes(&self, since_ms: i64, now_ms: i64, limit: u32) -> Result<Vec<KeyChange>, LedgerError> {
        read!(self, |tx| queries::key_changes(tx, since_ms, now_ms, limit))
    }

    /// Every event id in the ledger, oldest first (for tests and checks: reads the
    /// whole table).
    pub async fn event_ids(&self) -> Result<Vec<String>, LedgerError> {
        read!(self, |tx| queries::event_ids(tx))
    }
}

/// Whose events a usage query sums.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// One user's.
    User(String),
    /// Every authorized event (every user's).
    Authorized,
    /// Every denied event (they have no user).
    Denied,
}

/// What [`Ledger::breakdown`] groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dimension {
    User,
    Model,
    /// The deny reason (only denied events have one).
    Reason,
}

impl Dimension {
    /// Its column in `usage_events` and `usage_daily`.
    pub fn column(self) -> &'static str {
        match self {
            Dimension::User => "user_name",
            Dimension::Model => "model",
            Dimension::Reason => "denied",
        }
    }
}

/// The parameters of a usage query besides the user.
#[derive(Debug, Clone, Copy)]
pub struct UsageRange {
    pub since_ms: i64,
    pub until_ms: i64,
    pub width_ms: i64,
    /// The start of `since_ms`'s UTC day: compacted days from there on count.
    pub since_day_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::parse_body;

    #[test]
    fn records_from_events() {
        let body = br#"[{"id":"a","ts":1763800000.125,"user":"u","groups":["g"],"path":"/v1/models","model":"m",
            "status":503,"prompt_tokens":1,"completion_tokens":2,"cached_tokens":3,"reasoning_tokens":4,"incomplete":true},
            {"id":"b","denied":"rate_limited","path":"/v1/chat/completions"},
            {"user":"cb","path":"/x"},
            {"id":"c","denied":"missing_credential","path":"/v1/models","count":137}]"#;
        let events = parse_body(body, 10).unwrap().events;
        let records: Vec<Record> = events.iter().map(|e| Record::from_event(e, 42)).collect();
        let key = |user: &str, groups: &str, path: &str, model: &str, denied: &str| SeriesKey {
            user: user.into(),
            groups: groups.into(),
            path: path.into(),
            model: model.into(),
            denied: denied.into(),
        };
        let cases = [
            (Some("a"), 1_763_800_000_125, key("u", "g", "/v1/models", "m", ""), Some(503), [1, 1, 2, 3, 4, 1, 1]),
            (Some("b"), 42, key("", "", "/v1/chat/completions", "", "rate_limited"), None, [1, 0, 0, 0, 0, 0, 0]),
            (None, 42, key("cb", "", "other", "", ""), None, [1, 0, 0, 0, 0, 0, 0]),
            (Some("c"), 42, key("", "", "/v1/models", "", "missing_credential"), None, [137, 0, 0, 0, 0, 0, 0]),
        ];
        assert_eq!(records.len(), cases.len());
        for (record, (id, ts, key, status, columns)) in records.iter().zip(cases) {
            assert_eq!(record.id.as_deref(), id);
            assert_eq!(record.ts_ms, ts);
            assert_eq!(record.key, key);
            assert_eq!(record.status, status);
            assert_eq!(record.totals().columns(), columns);
        }
    }

    #[test]
    fn sums_saturate_and_keep_first_seen_order() {
        let mut records = Vec::new();
        for (user, prompt) in [("b", u64::MAX), ("a", 1), ("b", 5)] {
            let event = Event {
                id: None,
                path: "other",
                ts_ms: None,
                status: None,
                outcome: Outcome::Authorized(crate::event::Usage {
                    user: user.into(),
                    groups: String::new(),
                    model: Some("m".into()),
                    tokens: Tokens { prompt, ..Tokens::default() },
                    incomplete: false,
                    upstream_error: false,
                    estimated: false,
                }),
            };
            records.push(Record::from_event(&event, 0));
        }
        let sums = sum_by_key(&records);
        let got: Vec<(&str, u64, u64, i64)> =
            sums.iter().map(|(k, t)| (k.user.as_str(), t.requests, t.prompt, t.columns()[1])).collect();
        assert_eq!(got, vec![("b", 2, u64::MAX, i64::MAX), ("a", 1, 1, 1)]);
    }
}
