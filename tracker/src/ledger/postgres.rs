//! The shared ledger: PostgreSQL, for several tracker replicas writing one ledger.
//!
//! Same tables and behaviour as [`super::sqlite`]; what differs is why it is safe with
//! several writers:
//!
//! - Duplicates: `usage_events.id` is `UNIQUE` across all replicas, and a batch is one
//!   `INSERT … SELECT FROM UNNEST(…) ON CONFLICT (id) DO NOTHING RETURNING id`, so a
//!   retried batch that lands on another replica is still recognised. Batches are
//!   inserted in id order (see [`super::Ledger::append`]), so two replicas writing
//!   overlapping retries wait for each other rather than deadlock.
//! - Totals: each replica upserts only its own `usage_totals` rows (the replica is part
//!   of the key), in the same transaction as the events.
//! - Compaction: `DELETE … WHERE seq IN (SELECT … FOR UPDATE SKIP LOCKED) RETURNING …`
//!   hands each old event to exactly one compacting replica, which adds it to
//!   `usage_daily` in the same transaction.
//! - Durability: `COMMIT` returns once the server has flushed its WAL (the default
//!   `synchronous_commit = on`; keep it on for billing data).
//!
//! [`WRITERS`] writer connections and one reader per replica, so concurrent batches are
//! written in parallel (each in its own transaction; the server's WAL flush groups
//! their commits); each is reconnected on its next use after a failure (the failing
//! request gets a 503 and the filter retries). Totals rows are upserted in key order,
//! so two transactions of one replica that touch the same series wait for each other
//! instead of deadlocking. No TLS: reach the server over loopback, a private network
//! or a TLS sidecar.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Mutex;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config, NoTls, Row};

use super::{
    saturating_set, sum_by_key, sum_daily, usage_row, usage_sql, Compacted, LedgerError, RecentEvent, Record,
    SeriesKey, Totals, UsageBucket, UsageRange, TOTAL_COLUMNS,
};
use crate::event::Tokens;
use crate::time::DAY_MS;

/// Writer connections per replica.
pub const WRITERS: usize = 4;
/// The schema version this tracker writes. 2 added `usage_events.requests` (aggregated
/// denials); a version-1 database is migrated in place when a tracker opens it.
const SCHEMA_VERSION: i32 = 2;
/// From schema 1 to 2: every existing event counted one request. A constant default
/// does not rewrite the table; run only on an older schema, because `ALTER TABLE` locks
/// the table against the other replicas' writes.
const MIGRATE_TO_2: &str = "ALTER TABLE usage_events ADD COLUMN IF NOT EXISTS requests BIGINT NOT NULL DEFAULT 1";
/// Serialises schema creation when several replicas start at once.
const SCHEMA_LOCK: i64 = 0x746f_6c6c_6761_7465; // "tollgate"

/// The version table, created first so the version is known before anything else.
const VERSION_TABLE: &str = "CREATE TABLE IF NOT EXISTS tollgate_ledger_schema (version INTEGER NOT NULL)";

/// The current schema, created where missing.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS usage_events (
    seq               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id                TEXT UNIQUE,
    ts_ms             BIGINT NOT NULL,
    received_ms       BIGINT NOT NULL,
    replica           TEXT NOT NULL,
    user_name         TEXT NOT NULL,
    user_groups       TEXT NOT NULL,
    path              TEXT NOT NULL,
    model             TEXT NOT NULL,
    denied            TEXT NOT NULL,
    status            INTEGER,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    cached_tokens     BIGINT NOT NULL,
    reasoning_tokens  BIGINT NOT NULL,
    incomplete        BOOLEAN NOT NULL,
    upstream_error    BOOLEAN NOT NULL,
    requests          BIGINT NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS usage_events_user_ts ON usage_events (user_name, ts_ms);
CREATE INDEX IF NOT EXISTS usage_events_ts ON usage_events (ts_ms);
CREATE TABLE IF NOT EXISTS usage_totals (
    replica           TEXT NOT NULL,
    user_name         TEXT NOT NULL,
    user_groups       TEXT NOT NULL,
    path              TEXT NOT NULL,
    model             TEXT NOT NULL,
    denied            TEXT NOT NULL,
    requests          BIGINT NOT NULL,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    cached_tokens     BIGINT NOT NULL,
    reasoning_tokens  BIGINT NOT NULL,
    incomplete        BIGINT NOT NULL,
    upstream_errors   BIGINT NOT NULL,
    first_ms          BIGINT NOT NULL,
    PRIMARY KEY (user_name, replica, user_groups, path, model, denied)
);
CREATE TABLE IF NOT EXISTS usage_daily (
    day_ms            BIGINT NOT NULL,
    replica           TEXT NOT NULL,
    user_name         TEXT NOT NULL,
    user_groups       TEXT NOT NULL,
    path              TEXT NOT NULL,
    model             TEXT NOT NULL,
    denied            TEXT NOT NULL,
    requests          BIGINT NOT NULL,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    cached_tokens     BIGINT NOT NULL,
    reasoning_tokens  BIGINT NOT NULL,
    incomplete        BIGINT NOT NULL,
    upstream_errors   BIGINT NOT NULL,
    PRIMARY KEY (user_name, day_ms, replica, user_groups, path, model, denied)
);
";

const INSERT_EVENTS: &str = "INSERT INTO usage_events (id, ts_ms, received_ms, replica, user_name, user_groups, \
    path, model, denied, status, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, incomplete, \
    upstream_error, requests) \
    SELECT e.id, e.ts_ms, $2, $3, e.user_name, e.user_groups, e.path, e.model, e.denied, e.status, e.p, e.c, e.k, \
      e.r, e.inc, e.up, e.n \
    FROM UNNEST($1::text[], $4::bigint[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::int[], \
      $11::bigint[], $12::bigint[], $13::bigint[], $14::bigint[], $15::bool[], $16::bool[], $17::bigint[]) \
      AS e(id, ts_ms, user_name, user_groups, path, model, denied, status, p, c, k, r, inc, up, n) \
    ON CONFLICT (id) DO NOTHING RETURNING id";

fn upsert_totals_sql() -> String {
    format!(
        "INSERT INTO usage_totals (replica, user_name, user_groups, path, model, denied, {cols}, first_ms) \
         SELECT $1, t.*, $14 FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
           $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[], $12::bigint[], $13::bigint[]) \
           AS t(user_name, user_groups, path, model, denied, {cols}) \
         ON CONFLICT (user_name, replica, user_groups, path, model, denied) DO UPDATE SET {set}",
        cols = TOTAL_COLUMNS.join(", "),
        set = saturating_set("usage_totals")
    )
}

fn upsert_daily_sql() -> String {
    format!(
        "INSERT INTO usage_daily (day_ms, replica, user_name, user_groups, path, model, denied, {cols}) \
         SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], \
           $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[], $12::bigint[], $13::bigint[], $14::bigint[]) \
         ON CONFLICT (user_name, day_ms, replica, user_groups, path, model, denied) DO UPDATE SET {set}",
        cols = TOTAL_COLUMNS.join(", "),
        set = saturating_set("usage_daily")
    )
}

/// The server's message, not just "db error".
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    }
}

/// Columns of a batch, one vector per column, for `UNNEST`.
#[derive(Default)]
struct Columns {
    text: [Vec<String>; 5],
    counts: [Vec<i64>; 7],
}

impl Columns {
    fn push(&mut self, key: &SeriesKey, totals: &Totals) {
        let [user, groups, path, model, denied] = &mut self.text;
        user.push(key.user.clone());
        groups.push(key.groups.clone());
        path.push(key.path.clone());
        model.push(key.model.clone());
        denied.push(key.denied.clone());
        for (column, value) in self.counts.iter_mut().zip(totals.columns()) {
            column.push(value);
        }
    }

    /// The parameters in column order: the five key columns, then the seven counts.
    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(12);
        params.extend(self.text.iter().map(|c| c as &(dyn ToSql + Sync)));
        params.extend(self.counts.iter().map(|c| c as &(dyn ToSql + Sync)));
        params
    }
}

#[derive(Debug)]
pub struct Postgres {
    config: Config,
    writers: Vec<Mutex<Option<Client>>>,
    /// Which writer a request waits for when all are busy (round robin).
    next_writer: AtomicUsize,
    reader: Mutex<Option<Client>>,
}

impl Postgres {
    pub async fn open(url: &str) -> Result<Postgres, LedgerError> {
        let mut config: Config = url.parse().map_err(|e| LedgerError::Open(format!("bad --database-url: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        if config.get_application_name().is_none() {
            config.application_name("usage-tracking");
        }
        let ledger = Postgres {
            config,
            writers: (0..WRITERS).map(|_| Mutex::new(None)).collect(),
            next_writer: AtomicUsize::new(0),
            reader: Mutex::new(None),
        };
        let mut client =
            ledger.connect().await.map_err(|e| LedgerError::Open(format!("{}: {e}", ledger.describe())))?;
        migrate(&mut client).await?;
        if let Some(first) = ledger.writers.first() {
            *first.lock().await = Some(client);
        }
        Ok(ledger)
    }

    /// host:port/database, without user or password.
    pub fn describe(&self) -> String {
        let hosts: Vec<String> = self
            .config
            .get_hosts()
            .iter()
            .map(|h| match h {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            })
            .collect();
        let ports: Vec<String> = self.config.get_ports().iter().map(u16::to_string).collect();
        format!("{}:{}/{}", hosts.join(","), ports.join(","), self.config.get_dbname().unwrap_or(""))
    }

    async fn connect(&self) -> Result<Client, String> {
        let (client, connection) = self.config.connect(NoTls).await.map_err(|e| describe(&e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                eprintln!("usage-tracking: PostgreSQL connection lost: {}", describe(&e));
            }
        });
        Ok(client)
    }

    /// A free writer connection, else the next one in turn once it is free.
    async fn writer(&self) -> Result<tokio::sync::MappedMutexGuard<'_, Client>, String> {
        let free = self.writers.iter().find_map(|slot| slot.try_lock().ok());
        let guard = match free {
            Some(guard) => guard,
            None => {
                let turn = self.next_writer.fetch_add(1, Ordering::Relaxed) % self.writers.len().max(1);
                let slot = self.writers.get(turn).ok_or_else(|| "no writer connection".to_owned())?;
                slot.lock().await
            }
        };
        self.ready(guard).await
    }

    /// The reader connection.
    async fn reader(&self) -> Result<tokio::sync::MappedMutexGuard<'_, Client>, String> {
        self.ready(self.reader.lock().await).await
    }

    /// The connection behind `guard`, (re)connected if needed.
    async fn ready<'a>(
        &self,
        mut guard: tokio::sync::MutexGuard<'a, Option<Client>>,
    ) -> Result<tokio::sync::MappedMutexGuard<'a, Client>, String> {
        if guard.as_ref().is_none_or(Client::is_closed) {
            *guard = Some(self.connect().await?);
        }
        tokio::sync::MutexGuard::try_map(guard, Option::as_mut).map_err(|_| "no connection".to_owned())
    }

    pub async fn append(&self, records: &[Record], replica: &str, received_ms: i64) -> Result<Vec<bool>, LedgerError> {
        let write = |e: String| LedgerError::Write(e);
        let mut client = self.writer().await.map_err(write)?;
        let tx = client.transaction().await.map_err(|e| write(describe(&e)))?;
        let ids: Vec<Option<&str>> = records.iter().map(|r| r.id.as_deref()).collect();
        let ts: Vec<i64> = records.iter().map(|r| r.ts_ms).collect();
        let text = |f: fn(&Record) -> &str| records.iter().map(f).collect::<Vec<&str>>();
        let (users, groups, paths) = (text(|r| &r.key.user), text(|r| &r.key.groups), text(|r| &r.key.path));
        let (models, denied) = (text(|r| &r.key.model), text(|r| &r.key.denied));
        let status: Vec<Option<i32>> = records.iter().map(|r| r.status.map(i32::from)).collect();
        let count = |f: fn(&Tokens) -> u64| records.iter().map(|r| super::to_sql(f(&r.tokens))).collect::<Vec<i64>>();
        let (prompt, completion) = (count(|t| t.prompt), count(|t| t.completion));
        let (cached, reasoning) = (count(|t| t.cached), count(|t| t.reasoning));
        let incomplete: Vec<bool> = records.iter().map(|r| r.incomplete).collect();
        let upstream: Vec<bool> = records.iter().map(|r| r.upstream_error).collect();
        let requests: Vec<i64> = records.iter().map(|r| super::to_sql(r.requests)).collect();
        let rows = tx
            .query(
                INSERT_EVENTS,
                &[
                    &ids,
                    &received_ms,
                    &replica,
                    &ts,
                    &users,
                    &groups,
                    &paths,
                    &models,
                    &denied,
                    &status,
                    &prompt,
                    &completion,
                    &cached,
                    &reasoning,
                    &incomplete,
                    &upstream,
                    &requests,
                ],
            )
            .await
            .map_err(|e| write(describe(&e)))?;
        let new_ids: std::collections::HashSet<String> =
            rows.iter().filter_map(|row| row.get::<_, Option<String>>(0)).collect();
        // A record without an id is always inserted; one with an id when it came back.
        let inserted: Vec<bool> = records.iter().map(|r| r.id.as_ref().is_none_or(|id| new_ids.contains(id))).collect();
        let mut columns = Columns::default();
        let new = records.iter().zip(&inserted).filter(|(_, new)| **new).map(|(r, _)| r);
        let mut sums = sum_by_key(new);
        sums.sort_by(|a, b| a.0.cmp(&b.0)); // lock order: see the module docs
        for (key, totals) in sums {
            columns.push(&key, &totals);
        }
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&replica];
        params.extend(columns.params());
        params.push(&received_ms);
        tx.execute(&upsert_totals_sql(), &params).await.map_err(|e| write(describe(&e)))?;
        tx.commit().await.map_err(|e| write(describe(&e)))?;
        Ok(inserted)
    }

    pub async fn restore(&self, replica: &str) -> Result<Vec<(SeriesKey, Totals)>, LedgerError> {
        let sql = format!(
            "SELECT user_name, user_groups, path, model, denied, {} FROM usage_totals WHERE replica = $1 \
             ORDER BY first_ms, user_name, user_groups, path, model, denied",
            TOTAL_COLUMNS.join(", ")
        );
        let rows = self.read(&sql, &[&replica]).await?;
        rows.iter()
            .map(|row| {
                let mut values = [0i64; 7];
                for (i, v) in values.iter_mut().enumerate() {
                    *v = row.try_get(5 + i)?;
                }
                Ok((key_of(row, 0)?, Totals::from_columns(values)))
            })
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(|e| LedgerError::Read(describe(&e)))
    }

    pub async fn knows_user(&self, user: &str) -> Result<bool, LedgerError> {
        let rows = self.read("SELECT EXISTS (SELECT 1 FROM usage_totals WHERE user_name = $1)", &[&user]).await?;
        rows.first().map_or(Ok(false), |row| row.try_get(0)).map_err(|e| LedgerError::Read(describe(&e)))
    }

    pub async fn usage(&self, user: &str, range: UsageRange) -> Result<Vec<UsageBucket>, LedgerError> {
        let UsageRange { since_ms, until_ms, width_ms, since_day_ms } = range;
        let sql = usage_sql(|n| format!("${n}"));
        let rows = self.read(&sql, &[&width_ms, &user, &since_ms, &until_ms, &since_day_ms]).await?;
        rows.iter()
            .map(|row| {
                let mut halves = [0i64; 8];
                for (i, v) in halves.iter_mut().enumerate() {
                    *v = row.try_get(2 + i)?;
                }
                Ok(usage_row(row.try_get(0)?, row.try_get(1)?, halves))
            })
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(|e| LedgerError::Read(describe(&e)))
    }

    pub async fn recent(&self, user: &str, limit: u32) -> Result<Vec<RecentEvent>, LedgerError> {
        let rows = self
            .read(
                "SELECT id, ts_ms, user_groups, path, model, status, prompt_tokens, completion_tokens, cached_tokens, \
                 reasoning_tokens, incomplete, replica FROM usage_events WHERE user_name = $1 \
                 ORDER BY ts_ms DESC, seq DESC LIMIT $2",
                &[&user, &i64::from(limit)],
            )
            .await?;
        rows.iter()
            .map(|row| {
                let count = |i: usize| row.try_get::<_, i64>(i).map(super::from_sql);
                let status: Option<i32> = row.try_get(5)?;
                Ok(RecentEvent {
                    id: row.try_get(0)?,
                    ts_ms: row.try_get(1)?,
                    groups: row.try_get(2)?,
                    path: row.try_get(3)?,
                    model: row.try_get(4)?,
                    status: status.and_then(|s| u16::try_from(s).ok()),
                    tokens: Tokens {
                        prompt: count(6)?,
                        completion: count(7)?,
                        cached: count(8)?,
                        reasoning: count(9)?,
                    },
                    incomplete: row.try_get(10)?,
                    replica: row.try_get(11)?,
                })
            })
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(|e| LedgerError::Read(describe(&e)))
    }

    pub async fn compact_chunk(&self, cutoff_ms: i64, chunk: usize) -> Result<usize, LedgerError> {
        let write = |e: tokio_postgres::Error| LedgerError::Write(describe(&e));
        let mut client = self.writer().await.map_err(LedgerError::Write)?;
        let tx = client.transaction().await.map_err(write)?;
        let rows = tx
            .query(
                "DELETE FROM usage_events WHERE seq IN \
                   (SELECT seq FROM usage_events WHERE ts_ms < $1 ORDER BY ts_ms LIMIT $2 FOR UPDATE SKIP LOCKED) \
                 RETURNING ts_ms, replica, user_name, user_groups, path, model, denied, requests, prompt_tokens, \
                   completion_tokens, cached_tokens, reasoning_tokens, incomplete, upstream_error",
                &[&cutoff_ms, &i64::try_from(chunk).unwrap_or(i64::MAX)],
            )
            .await
            .map_err(write)?;
        let deleted = rows
            .iter()
            .map(|row| {
                let ts_ms: i64 = row.try_get(0)?;
                let flag = |i: usize| row.try_get::<_, bool>(i).map(i64::from);
                let values = [
                    row.try_get(7)?,
                    row.try_get(8)?,
                    row.try_get(9)?,
                    row.try_get(10)?,
                    row.try_get(11)?,
                    flag(12)?,
                    flag(13)?,
                ];
                Ok(Compacted {
                    day_ms: crate::time::floor(ts_ms, DAY_MS),
                    replica: row.try_get(1)?,
                    key: key_of(row, 2)?,
                    totals: Totals::from_columns(values),
                })
            })
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(write)?;
        let n = deleted.len();
        let daily = sum_daily(deleted);
        if !daily.is_empty() {
            let days: Vec<i64> = daily.iter().map(|d| d.day_ms).collect();
            let replicas: Vec<&str> = daily.iter().map(|d| d.replica.as_str()).collect();
            let mut columns = Columns::default();
            for d in &daily {
                columns.push(&d.key, &d.totals);
            }
            let mut params: Vec<&(dyn ToSql + Sync)> = vec![&days, &replicas];
            params.extend(columns.params());
            tx.execute(&upsert_daily_sql(), &params).await.map_err(write)?;
        }
        tx.commit().await.map_err(write)?;
        Ok(n)
    }

    pub async fn event_ids(&self) -> Result<Vec<String>, LedgerError> {
        let rows = self.read("SELECT id FROM usage_events WHERE id IS NOT NULL ORDER BY seq", &[]).await?;
        rows.iter()
            .map(|row| row.try_get(0))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| LedgerError::Read(describe(&e)))
    }

    async fn read(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, LedgerError> {
        let client = self.reader().await.map_err(LedgerError::Read)?;
        client.query(sql, params).await.map_err(|e| LedgerError::Read(describe(&e)))
    }
}

/// The five key columns starting at `first`.
fn key_of(row: &Row, first: usize) -> Result<SeriesKey, tokio_postgres::Error> {
    Ok(SeriesKey {
        user: row.try_get(first)?,
        groups: row.try_get(first + 1)?,
        path: row.try_get(first + 2)?,
        model: row.try_get(first + 3)?,
        denied: row.try_get(first + 4)?,
    })
}

/// Creates the schema if missing and migrates an older one, under an advisory lock so
/// replicas starting together do not race, in one transaction; refuses a database
/// written by a newer tracker (before touching anything else).
async fn migrate(client: &mut Client) -> Result<(), LedgerError> {
    let open = |e: tokio_postgres::Error| LedgerError::Open(format!("cannot create the schema: {}", describe(&e)));
    let tx = client.transaction().await.map_err(open)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK]).await.map_err(open)?;
    tx.batch_execute(VERSION_TABLE).await.map_err(open)?;
    let rows = tx.query("SELECT version FROM tollgate_ledger_schema", &[]).await.map_err(open)?;
    let version = rows.first().map(|row| row.try_get::<_, i32>(0)).transpose().map_err(open)?;
    if let Some(version) = version.filter(|v| *v > SCHEMA_VERSION) {
        return Err(LedgerError::Open(format!(
            "the ledger has schema version {version}, newer than this tracker's {SCHEMA_VERSION}"
        )));
    }
    tx.batch_execute(SCHEMA).await.map_err(open)?;
    if version.is_some_and(|v| v < 2) {
        tx.batch_execute(MIGRATE_TO_2).await.map_err(open)?;
    }
    match version {
        None => {
            tx.execute("INSERT INTO tollgate_ledger_schema (version) VALUES ($1)", &[&SCHEMA_VERSION])
                .await
                .map_err(open)?;
        }
        Some(v) if v < SCHEMA_VERSION => {
            tx.execute("UPDATE tollgate_ledger_schema SET version = $1", &[&SCHEMA_VERSION]).await.map_err(open)?;
        }
        Some(_) => {}
    }
    tx.commit().await.map_err(open)
}
