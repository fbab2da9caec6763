//! The embedded ledger: one SQLite file, `DIR/usage.sqlite3`, in WAL mode with
//! `synchronous=FULL`.
//!
//! Why these settings: in WAL mode a commit appends the transaction's pages to the
//! `-wal` file, and with `synchronous=FULL` SQLite fsyncs that file before `COMMIT`
//! returns. So a batch answered 200 is on disk, and survives `kill -9` and a power cut
//! alike (with `NORMAL` it would survive only the former). Checkpoints (every ~1000
//! pages, run by the committing connection) copy pages into the main file and fsync
//! it before the WAL is reused. Readers (the usage API) use a second connection and
//! never block the writer. The directory is fsynced once after the files are created,
//! so the files themselves survive a crash.
//!
//! Group commit: SQLite allows one writer at a time, so one thread owns the writing
//! connection and takes jobs from a queue. Batches that queue up while a transaction is
//! being written and fsynced go into the next transaction together (each batch whole,
//! never split), so one fsync acknowledges them all; each batch's sender is answered
//! only after that commit. If the transaction fails, every batch in it gets the error
//! (503) and nothing of any of them was written.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, PoisonError};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior};
use tokio::sync::oneshot;

use super::{
    saturating_set, sum_by_key, sum_daily, usage_row, usage_sql, Compacted, LedgerError, RecentEvent, Record,
    SeriesKey, Totals, UsageBucket, UsageRange, TOTAL_COLUMNS,
};
use crate::event::Tokens;
use crate::time::DAY_MS;

/// The file name inside `--data-dir`.
pub const FILE_NAME: &str = "usage.sqlite3";
/// Most events written in one group-committed transaction (a bound on how long one
/// transaction holds the write lock).
const MAX_GROUP_EVENTS: usize = 20_000;
/// `PRAGMA user_version` of the current schema. 2 added `usage_events.requests`
/// (aggregated denials); a version-1 file is migrated in place when opened.
const SCHEMA_VERSION: i64 = 2;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS usage_events (
    seq               INTEGER PRIMARY KEY,
    id                TEXT UNIQUE,
    ts_ms             INTEGER NOT NULL,
    received_ms       INTEGER NOT NULL,
    replica           TEXT NOT NULL,
    user_name         TEXT NOT NULL,
    user_groups       TEXT NOT NULL,
    path              TEXT NOT NULL,
    model             TEXT NOT NULL,
    denied            TEXT NOT NULL,
    status            INTEGER,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cached_tokens     INTEGER NOT NULL,
    reasoning_tokens  INTEGER NOT NULL,
    incomplete        INTEGER NOT NULL,
    upstream_error    INTEGER NOT NULL,
    requests          INTEGER NOT NULL DEFAULT 1
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
    requests          INTEGER NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cached_tokens     INTEGER NOT NULL,
    reasoning_tokens  INTEGER NOT NULL,
    incomplete        INTEGER NOT NULL,
    upstream_errors   INTEGER NOT NULL,
    first_ms          INTEGER NOT NULL,
    PRIMARY KEY (user_name, replica, user_groups, path, model, denied)
);
CREATE TABLE IF NOT EXISTS usage_daily (
    day_ms            INTEGER NOT NULL,
    replica           TEXT NOT NULL,
    user_name         TEXT NOT NULL,
    user_groups       TEXT NOT NULL,
    path              TEXT NOT NULL,
    model             TEXT NOT NULL,
    denied            TEXT NOT NULL,
    requests          INTEGER NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cached_tokens     INTEGER NOT NULL,
    reasoning_tokens  INTEGER NOT NULL,
    incomplete        INTEGER NOT NULL,
    upstream_errors   INTEGER NOT NULL,
    PRIMARY KEY (user_name, day_ms, replica, user_groups, path, model, denied)
);
";

const INSERT_EVENT: &str = "INSERT INTO usage_events (id, ts_ms, received_ms, replica, user_name, user_groups, path, \
    model, denied, status, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, incomplete, upstream_error, \
    requests) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17) ON CONFLICT (id) DO NOTHING";

fn upsert_totals_sql() -> String {
    format!(
        "INSERT INTO usage_totals (replica, user_name, user_groups, path, model, denied, {}, first_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14) \
         ON CONFLICT (user_name, replica, user_groups, path, model, denied) DO UPDATE SET {}",
        TOTAL_COLUMNS.join(", "),
        saturating_set("usage_totals")
    )
}

fn upsert_daily_sql() -> String {
    format!(
        "INSERT INTO usage_daily (day_ms, replica, user_name, user_groups, path, model, denied, {}) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14) \
         ON CONFLICT (user_name, day_ms, replica, user_groups, path, model, denied) DO UPDATE SET {}",
        TOTAL_COLUMNS.join(", "),
        saturating_set("usage_daily")
    )
}

fn write_error(e: rusqlite::Error) -> LedgerError {
    LedgerError::Write(e.to_string())
}

fn read_error(e: rusqlite::Error) -> LedgerError {
    LedgerError::Read(e.to_string())
}

/// Work for the writer thread; the answer goes back on `reply`.
enum Job {
    Append {
        records: Vec<Record>,
        replica: Arc<str>,
        received_ms: i64,
        reply: oneshot::Sender<Result<Vec<bool>, LedgerError>>,
    },
    Compact {
        cutoff_ms: i64,
        chunk: usize,
        reply: oneshot::Sender<Result<usize, LedgerError>>,
    },
}

#[derive(Debug)]
pub struct Sqlite {
    path: PathBuf,
    /// To the writer thread, which owns the writing connection and ends when this drops.
    jobs: Mutex<mpsc::Sender<Job>>,
    reader: Mutex<Connection>,
}

impl Sqlite {
    pub fn open(dir: &Path) -> Result<Sqlite, LedgerError> {
        let open_error = |what: &str, e: &dyn std::fmt::Display| LedgerError::Open(format!("{what}: {e}"));
        std::fs::create_dir_all(dir).map_err(|e| open_error(&format!("cannot create {}", dir.display()), &e))?;
        let path = dir.join(FILE_NAME);
        let mut writer = Connection::open(&path).map_err(|e| open_error(&path.display().to_string(), &e))?;
        configure(&writer).map_err(|e| open_error("cannot configure SQLite", &e))?;
        let mode: String = writer
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(|e| open_error("cannot switch to WAL", &e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(LedgerError::Open(format!("SQLite refused WAL mode (journal_mode is {mode})")));
        }
        writer.pragma_update(None, "synchronous", "FULL").map_err(|e| open_error("cannot set synchronous", &e))?;
        migrate(&mut writer)?;
        // The database and its -wal/-shm files exist now; make their directory entries durable.
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| open_error(&format!("cannot fsync {}", dir.display()), &e))?;
        let reader =
            Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
                .map_err(|e| open_error("cannot open a reader", &e))?;
        configure(&reader).map_err(|e| open_error("cannot configure the reader", &e))?;
        let (jobs, queue) = mpsc::channel();
        std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || write_forever(writer, &queue))
            .map_err(|e| open_error("cannot start the writer thread", &e))?;
        Ok(Sqlite { path, jobs: Mutex::new(jobs), reader: Mutex::new(reader) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn reader(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves no half-done read behind that matters:
        // the next query starts afresh.
        self.reader.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn send(&self, job: Job) -> Result<(), LedgerError> {
        let jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        jobs.send(job).map_err(|_| LedgerError::Write("the ledger writer thread has stopped".into()))
    }

    /// Queues a batch for the writer and waits until its transaction has committed.
    pub async fn append(
        &self,
        records: Vec<Record>,
        replica: Arc<str>,
        received_ms: i64,
    ) -> Result<Vec<bool>, LedgerError> {
        let (reply, answer) = oneshot::channel();
        self.send(Job::Append { records, replica, received_ms, reply })?;
        answer.await.map_err(|_| LedgerError::Write("the ledger writer thread stopped mid-write".into()))?
    }

    /// Queues one compaction chunk for the writer and waits for it.
    pub async fn compact_chunk(&self, cutoff_ms: i64, chunk: usize) -> Result<usize, LedgerError> {
        let (reply, answer) = oneshot::channel();
        self.send(Job::Compact { cutoff_ms, chunk, reply })?;
        answer.await.map_err(|_| LedgerError::Write("the ledger writer thread stopped mid-write".into()))?
    }

    pub fn restore(&self, replica: &str) -> Result<Vec<(SeriesKey, Totals)>, LedgerError> {
        let conn = self.reader();
        let sql = format!(
            "SELECT user_name, user_groups, path, model, denied, {} FROM usage_totals WHERE replica = ?1 \
             ORDER BY first_ms, user_name, user_groups, path, model, denied",
            TOTAL_COLUMNS.join(", ")
        );
        let mut statement = conn.prepare(&sql).map_err(read_error)?;
        let rows = statement
            .query_map(params![replica], |row| {
                let key = SeriesKey {
                    user: row.get(0)?,
                    groups: row.get(1)?,
                    path: row.get(2)?,
                    model: row.get(3)?,
                    denied: row.get(4)?,
                };
                let mut values = [0i64; 7];
                for (i, v) in values.iter_mut().enumerate() {
                    *v = row.get(5 + i)?;
                }
                Ok((key, Totals::from_columns(values)))
            })
            .map_err(read_error)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(read_error)
    }

    pub fn knows_user(&self, user: &str) -> Result<bool, LedgerError> {
        let conn = self.reader();
        conn.query_row("SELECT 1 FROM usage_totals WHERE user_name = ?1 LIMIT 1", params![user], |_| Ok(()))
            .optional()
            .map(|found| found.is_some())
            .map_err(read_error)
    }

    pub fn usage(&self, user: &str, range: UsageRange) -> Result<Vec<UsageBucket>, LedgerError> {
        let UsageRange { since_ms, until_ms, width_ms, since_day_ms } = range;
        let conn = self.reader();
        let mut statement = conn.prepare_cached(&usage_sql(|n| format!("?{n}"))).map_err(read_error)?;
        let rows = statement
            .query_map(params![width_ms, user, since_ms, until_ms, since_day_ms], |row| {
                let mut halves = [0i64; 8];
                for (i, v) in halves.iter_mut().enumerate() {
                    *v = row.get(2 + i)?;
                }
                Ok(usage_row(row.get(0)?, row.get(1)?, halves))
            })
            .map_err(read_error)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(read_error)
    }

    pub fn recent(&self, user: &str, limit: u32) -> Result<Vec<RecentEvent>, LedgerError> {
        let conn = self.reader();
        let mut statement = conn
            .prepare_cached(
                "SELECT id, ts_ms, user_groups, path, model, status, prompt_tokens, completion_tokens, cached_tokens, \
                 reasoning_tokens, incomplete, replica FROM usage_events WHERE user_name = ?1 \
                 ORDER BY ts_ms DESC, seq DESC LIMIT ?2",
            )
            .map_err(read_error)?;
        let rows = statement
            .query_map(params![user, limit], |row| {
                let count = |i: usize| row.get::<_, i64>(i).map(super::from_sql);
                Ok(RecentEvent {
                    id: row.get(0)?,
                    ts_ms: row.get(1)?,
                    groups: row.get(2)?,
                    path: row.get(3)?,
                    model: row.get(4)?,
                    status: row.get(5)?,
                    tokens: Tokens {
                        prompt: count(6)?,
                        completion: count(7)?,
                        cached: count(8)?,
                        reasoning: count(9)?,
                    },
                    incomplete: row.get(10)?,
                    replica: row.get(11)?,
                })
            })
            .map_err(read_error)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(read_error)
    }

    pub fn event_ids(&self) -> Result<Vec<String>, LedgerError> {
        let conn = self.reader();
        let mut statement =
            conn.prepare("SELECT id FROM usage_events WHERE id IS NOT NULL ORDER BY seq").map_err(read_error)?;
        let rows = statement.query_map([], |row| row.get(0)).map_err(read_error)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(read_error)
    }
}

/// The writer thread: takes every job queued so far, writes all their batches in one
/// transaction (group commit) and answers each; compactions run in transactions of
/// their own. Ends when the ledger is dropped.
fn write_forever(mut conn: Connection, queue: &mpsc::Receiver<Job>) {
    while let Ok(first) = queue.recv() {
        let mut appends = Vec::new();
        let mut events = 0;
        let mut next = Some(first);
        while let Some(job) = next.take() {
            match job {
                Job::Append { records, replica, received_ms, reply } => {
                    events += records.len();
                    appends.push((records, replica, received_ms, reply));
                }
                Job::Compact { cutoff_ms, chunk, reply } => {
                    let _ = reply.send(compact_chunk(&mut conn, cutoff_ms, chunk));
                }
            }
            if events < MAX_GROUP_EVENTS {
                next = queue.try_recv().ok();
            }
        }
        if appends.is_empty() {
            continue;
        }
        let batches: Vec<(&[Record], &str, i64)> = appends
            .iter()
            .map(|(records, replica, received_ms, _)| (records.as_slice(), &**replica, *received_ms))
            .collect();
        match append_group(&mut conn, &batches) {
            Ok(inserted) => {
                for ((.., reply), inserted) in appends.into_iter().zip(inserted) {
                    let _ = reply.send(Ok(inserted));
                }
            }
            Err(error) => {
                for (.., reply) in appends {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }
}

/// Writes batches in one transaction; per batch, which of its records were new.
fn append_group(conn: &mut Connection, batches: &[(&[Record], &str, i64)]) -> Result<Vec<Vec<bool>>, LedgerError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(write_error)?;
    let mut all = Vec::with_capacity(batches.len());
    for &(records, replica, received_ms) in batches {
        all.push(append_batch(&tx, records, replica, received_ms)?);
    }
    tx.commit().map_err(write_error)?;
    Ok(all)
}

/// One batch's events and their totals, inside `tx`.
fn append_batch(
    tx: &Transaction<'_>,
    records: &[Record],
    replica: &str,
    received_ms: i64,
) -> Result<Vec<bool>, LedgerError> {
    let mut inserted = Vec::with_capacity(records.len());
    let mut insert = tx.prepare_cached(INSERT_EVENT).map_err(write_error)?;
    for r in records {
        let [requests, prompt, completion, cached, reasoning, incomplete, upstream] = r.totals().columns();
        let changed = insert
            .execute(params![
                r.id,
                r.ts_ms,
                received_ms,
                replica,
                r.key.user,
                r.key.groups,
                r.key.path,
                r.key.model,
                r.key.denied,
                r.status,
                prompt,
                completion,
                cached,
                reasoning,
                incomplete,
                upstream,
                requests,
            ])
            .map_err(write_error)?;
        inserted.push(changed == 1);
    }
    let mut upsert = tx.prepare_cached(&upsert_totals_sql()).map_err(write_error)?;
    let new = records.iter().zip(&inserted).filter(|(_, new)| **new).map(|(r, _)| r);
    for (key, totals) in sum_by_key(new) {
        let [requests, prompt, completion, cached, reasoning, incomplete, upstream] = totals.columns();
        upsert
            .execute(params![
                replica,
                key.user,
                key.groups,
                key.path,
                key.model,
                key.denied,
                requests,
                prompt,
                completion,
                cached,
                reasoning,
                incomplete,
                upstream,
                received_ms,
            ])
            .map_err(write_error)?;
    }
    Ok(inserted)
}

/// One compaction chunk: deletes up to `chunk` events older than `cutoff_ms` and adds
/// their sums to `usage_daily`, in one transaction.
fn compact_chunk(conn: &mut Connection, cutoff_ms: i64, chunk: usize) -> Result<usize, LedgerError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(write_error)?;
    let deleted: Vec<Compacted> = {
        let mut delete = tx
            .prepare_cached(
                "DELETE FROM usage_events WHERE seq IN \
                   (SELECT seq FROM usage_events WHERE ts_ms < ?1 ORDER BY ts_ms LIMIT ?2) \
                 RETURNING ts_ms, replica, user_name, user_groups, path, model, denied, requests, prompt_tokens, \
                   completion_tokens, cached_tokens, reasoning_tokens, incomplete, upstream_error",
            )
            .map_err(write_error)?;
        let rows = delete
            .query_map(params![cutoff_ms, i64::try_from(chunk).unwrap_or(i64::MAX)], |row| {
                let ts_ms: i64 = row.get(0)?;
                let mut values = [0i64; 7];
                for (i, v) in values.iter_mut().enumerate() {
                    *v = row.get(7 + i)?;
                }
                Ok(Compacted {
                    day_ms: crate::time::floor(ts_ms, DAY_MS),
                    replica: row.get(1)?,
                    key: SeriesKey {
                        user: row.get(2)?,
                        groups: row.get(3)?,
                        path: row.get(4)?,
                        model: row.get(5)?,
                        denied: row.get(6)?,
                    },
                    totals: Totals::from_columns(values),
                })
            })
            .map_err(write_error)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(write_error)?
    };
    let n = deleted.len();
    {
        let mut upsert = tx.prepare_cached(&upsert_daily_sql()).map_err(write_error)?;
        for row in sum_daily(deleted) {
            let t = row.totals.columns();
            upsert
                .execute(params![
                    row.day_ms,
                    row.replica,
                    row.key.user,
                    row.key.groups,
                    row.key.path,
                    row.key.model,
                    row.key.denied,
                    t[0],
                    t[1],
                    t[2],
                    t[3],
                    t[4],
                    t[5],
                    t[6],
                ])
                .map_err(write_error)?;
        }
    }
    tx.commit().map_err(write_error)?;
    Ok(n)
}

/// Settings of every connection: wait for a lock instead of failing at once, and a
/// 64 MiB page cache (the unique and time indexes stay in memory longer).
fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "cache_size", -65_536)?;
    Ok(())
}

/// Creates the schema in a new file, migrates a file of an older schema (version 1: adds
/// `usage_events.requests`, 1 for every existing row, which is what each of them
/// counted), and refuses a file written by a newer tracker. One transaction: a crash
/// mid-migration leaves the file as it was.
fn migrate(conn: &mut Connection) -> Result<(), LedgerError> {
    let open = |what: &str, e: rusqlite::Error| LedgerError::Open(format!("{what}: {e}"));
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| open("cannot create the schema", e))?;
    let version: i64 = tx
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(|e| open("cannot read the schema version", e))?;
    if version > SCHEMA_VERSION {
        return Err(LedgerError::Open(format!(
            "the ledger has schema version {version}, newer than this tracker's {SCHEMA_VERSION}"
        )));
    }
    tx.execute_batch(SCHEMA).map_err(|e| open("cannot create the schema", e))?;
    // Decided by the column itself rather than the version number: idempotent either way.
    let has_requests: bool = tx
        .query_row("SELECT COUNT(*) > 0 FROM pragma_table_info('usage_events') WHERE name = 'requests'", [], |row| {
            row.get(0)
        })
        .map_err(|e| open("cannot read the schema", e))?;
    if !has_requests {
        tx.execute_batch("ALTER TABLE usage_events ADD COLUMN requests INTEGER NOT NULL DEFAULT 1")
            .map_err(|e| open("cannot migrate the schema to version 2", e))?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(|e| open("cannot set the schema version", e))?;
    tx.commit().map_err(|e| open("cannot create the schema", e))
}
