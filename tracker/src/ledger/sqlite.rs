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
//!
//! The tables and queries are PostgreSQL's too, written once (`schema.rs`,
//! `queries.rs`); this module holds the connections and runs the statements
//! (`SqliteTx`), a batch's rows through one cached prepared statement.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{params_from_iter, Connection, OpenFlags, TransactionBehavior};
use tokio::sync::oneshot;

use super::sql::{Dialect, Insert, Row, Tx, Value};
use super::{queries, schema, LedgerError, Record};

/// The file name inside `--data-dir`.
pub const FILE_NAME: &str = "usage.sqlite3";
/// Most events written in one group-committed transaction (a bound on how long one
/// transaction holds the write lock).
const MAX_GROUP_EVENTS: usize = 20_000;

fn write_error(e: rusqlite::Error) -> LedgerError {
    LedgerError::Write(e.to_string())
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
    /// Any other write, in a transaction of its own (it answers through its own channel).
    Write(Box<dyn FnOnce(&mut Connection) + Send>),
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

    /// Queues `write` (a query of [`queries`] run with [`run_now`]) for the writer, which
    /// runs it in an immediate transaction of its own, and waits until it has committed.
    pub(super) async fn write<T: Send + 'static>(
        &self,
        write: impl FnOnce(&SqliteTx<'_>) -> Result<T, String> + Send + 'static,
    ) -> Result<T, LedgerError> {
        let (reply, answer) = oneshot::channel();
        self.send(Job::Write(Box::new(move |conn| {
            let _ = reply.send(in_transaction(conn, write));
        })))?;
        answer.await.map_err(|_| LedgerError::Write("the ledger writer thread stopped mid-write".into()))?
    }

    /// Runs a read query on the reader connection (a blocking call: run it on a
    /// blocking thread), e.g. `sqlite.read(|tx| run_now(queries::restore(tx, replica)))`.
    pub(super) fn read<T>(&self, query: impl FnOnce(&SqliteTx<'_>) -> Result<T, String>) -> Result<T, LedgerError> {
        query(&SqliteTx(&self.reader())).map_err(LedgerError::Read)
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
                    let compacted =
                        in_transaction(&mut conn, |tx| run_now(queries::compact_chunk(tx, cutoff_ms, chunk)));
                    let _ = reply.send(compacted);
                }
                Job::Write(write) => write(&mut conn),
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
    in_transaction(conn, |tx| {
        let append =
            |&(records, replica, received_ms)| run_now(queries::append_batch(tx, records, replica, received_ms));
        batches.iter().map(append).collect()
    })
}

/// Runs `write` in an immediate (write-locking) transaction and commits.
fn in_transaction<T>(
    conn: &mut Connection,
    write: impl FnOnce(&SqliteTx<'_>) -> Result<T, String>,
) -> Result<T, LedgerError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(write_error)?;
    let done = write(&SqliteTx(&tx)).map_err(LedgerError::Write)?;
    tx.commit().map_err(write_error)?;
    Ok(done)
}

/// Settings of every connection: wait for a lock instead of failing at once, and a
/// 64 MiB page cache (the unique and time indexes stay in memory longer).
fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "cache_size", -65_536)?;
    Ok(())
}

/// Creates or migrates the schema ([`schema::migrate`]) in one immediate transaction.
fn migrate(conn: &mut Connection) -> Result<(), LedgerError> {
    let create = |e: rusqlite::Error| LedgerError::Open(format!("cannot create the schema: {e}"));
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(create)?;
    run_now(schema::migrate(&SqliteTx(&tx))).map_err(LedgerError::Open)?;
    tx.commit().map_err(create)
}

/// Runs a query on a SQLite [`Tx`] to its end, here and now. [`SqliteTx`]'s methods
/// never wait (rusqlite blocks instead), so the query finishes in this one poll.
pub(super) fn run_now<T>(query: impl Future<Output = Result<T, String>>) -> Result<T, String> {
    match pin!(query).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(done) => done,
        Poll::Pending => Err("a SQLite ledger query waited, which it never should".to_owned()),
    }
}

/// A connection, or the transaction open on it, as a [`Tx`]. Statements are prepared
/// through the connection's cache.
pub(super) struct SqliteTx<'c>(&'c Connection);

impl SqliteTx<'_> {
    fn statement(&self, sql: &str) -> Result<rusqlite::CachedStatement<'_>, String> {
        self.0.prepare_cached(&Dialect::Sqlite.sql(sql)).map_err(|e| e.to_string())
    }
}

impl Tx for SqliteTx<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    async fn query(&self, sql: &str, params: &[Value<'_>]) -> Result<Vec<Row>, String> {
        let mut statement = self.statement(sql)?;
        let columns = statement.column_count();
        let mut rows = statement.query(params_from_iter(params)).map_err(|e| e.to_string())?;
        let mut all = Vec::new();
        while let Some(row) = rows.next().map_err(|e| e.to_string())? {
            let values = (0..columns).map(|i| row.get_ref(i).map_err(|e| e.to_string()).and_then(value_of));
            all.push(Row(values.collect::<Result<_, _>>()?));
        }
        Ok(all)
    }

    async fn batch(&self, sql: &str) -> Result<(), String> {
        self.0.execute_batch(&Dialect::Sqlite.sql(sql)).map_err(|e| e.to_string())
    }

    async fn insert(&self, insert: &Insert, rows: &[Vec<Value<'_>>]) -> Result<Vec<bool>, String> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let mut statement = self.statement(&Dialect::Sqlite.insert_sql(insert))?;
        rows.iter()
            .map(|row| statement.execute(params_from_iter(row)).map(|changed| changed == 1).map_err(|e| e.to_string()))
            .collect()
    }
}

impl rusqlite::ToSql for Value<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Int(n) => ValueRef::Integer(*n),
            Value::Bool(b) => ValueRef::Integer(i64::from(*b)),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
        }))
    }
}

fn value_of(value: ValueRef<'_>) -> Result<Value<'static>, String> {
    match value {
        ValueRef::Null => Ok(Value::Null),
        ValueRef::Integer(n) => Ok(Value::Int(n)),
        ValueRef::Text(bytes) => {
            String::from_utf8(bytes.to_vec()).map(|s| Value::Text(s.into())).map_err(|e| e.to_string())
        }
        ValueRef::Real(_) | ValueRef::Blob(_) => Err(format!("unexpected SQLite value {value:?}")),
    }
}
