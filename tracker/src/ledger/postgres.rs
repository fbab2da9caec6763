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
//! The tables and queries are the same as SQLite's, written once (`schema.rs`,
//! `queries.rs`); this module holds the connections and runs the statements
//! (`PgTx`), with a batch's rows sent as one array per column.
//!
//! [`WRITERS`] writer connections and one reader per replica, so concurrent batches are
//! written in parallel (each in its own transaction; the server's WAL flush groups
//! their commits); each is reconnected on its next use after a failure (the failing
//! request gets a 503 and the filter retries). Totals rows are upserted in key order,
//! so two transactions of one replica that touch the same series wait for each other
//! instead of deadlocking. No TLS: reach the server over loopback, a private network
//! or a TLS sidecar.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Mutex;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Config, GenericClient, NoTls, Transaction};

use super::sql::{Dialect, Insert, OnConflict, Row, Tx, Value};
use super::{queries, schema, LedgerError, Record};

/// Writer connections per replica.
pub const WRITERS: usize = 4;

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

    /// Writes a batch in one transaction on a writer connection; per record, whether it was new.
    pub(super) async fn append(
        &self,
        records: &[Record],
        replica: &str,
        received_ms: i64,
    ) -> Result<Vec<bool>, LedgerError> {
        self.in_transaction(async |tx| queries::append_batch(tx, records, replica, received_ms).await).await
    }

    /// One compaction chunk in one transaction on a writer connection.
    pub(super) async fn compact_chunk(&self, cutoff_ms: i64, chunk: usize) -> Result<usize, LedgerError> {
        self.in_transaction(async |tx| queries::compact_chunk(tx, cutoff_ms, chunk).await).await
    }

    /// Runs `write` in a transaction on a writer connection and commits.
    pub(super) async fn in_transaction<T>(
        &self,
        write: impl AsyncFnOnce(&PgTx<'_, Transaction<'_>>) -> Result<T, String>,
    ) -> Result<T, LedgerError> {
        let failed = |e: tokio_postgres::Error| LedgerError::Write(describe(&e));
        let mut client = self.writer().await.map_err(LedgerError::Write)?;
        let tx = client.transaction().await.map_err(failed)?;
        let done = write(&PgTx(&tx)).await.map_err(LedgerError::Write)?;
        tx.commit().await.map_err(failed)?;
        Ok(done)
    }

    /// The reader connection, as a [`Tx`] for read queries.
    pub(super) async fn reader_tx(&self) -> Result<PgReader<'_>, LedgerError> {
        self.reader().await.map(PgReader).map_err(LedgerError::Read)
    }
}

/// The locked reader connection; [`PgReader::tx`] is what queries run on.
pub(super) struct PgReader<'a>(tokio::sync::MappedMutexGuard<'a, Client>);

impl PgReader<'_> {
    pub(super) fn tx(&self) -> PgTx<'_, Client> {
        PgTx(&self.0)
    }
}

/// Creates or migrates the schema ([`schema::migrate`]) in one transaction.
async fn migrate(client: &mut Client) -> Result<(), LedgerError> {
    let create = |e: tokio_postgres::Error| LedgerError::Open(format!("cannot create the schema: {}", describe(&e)));
    let tx = client.transaction().await.map_err(create)?;
    schema::migrate(&PgTx(&tx)).await.map_err(LedgerError::Open)?;
    tx.commit().await.map_err(create)
}

/// A connection or a transaction, as a [`Tx`].
pub(super) struct PgTx<'c, C>(&'c C);

impl<C: GenericClient + Sync> Tx for PgTx<'_, C> {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    async fn query(&self, sql: &str, params: &[Value<'_>]) -> Result<Vec<Row>, String> {
        let statement = self.0.prepare(&Dialect::Postgres.sql(sql)).await.map_err(|e| describe(&e))?;
        let params = statement
            .params()
            .iter()
            .zip(params)
            .map(|(ty, value)| Param::scalar(ty, value))
            .collect::<Result<Vec<_>, String>>()?;
        let rows = self.0.query(&statement, &refs(&params)).await.map_err(|e| describe(&e))?;
        rows.iter().map(row_of).collect()
    }

    async fn batch(&self, sql: &str) -> Result<(), String> {
        self.0.batch_execute(&Dialect::Postgres.sql(sql)).await.map_err(|e| describe(&e))
    }

    /// One statement for all rows: a column's values go as one array parameter.
    async fn insert(&self, insert: &Insert, rows: &[Vec<Value<'_>>]) -> Result<Vec<bool>, String> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let statement = self.0.prepare(&Dialect::Postgres.insert_sql(insert)).await.map_err(|e| describe(&e))?;
        let column = |i: usize| {
            rows.iter()
                .map(|row| row.get(i).ok_or_else(|| format!("a row without column {i}")))
                .collect::<Result<Vec<_>, _>>()
        };
        let params = (0..)
            .zip(statement.params())
            .map(|(i, ty)| Param::array(ty, column(i)?))
            .collect::<Result<Vec<_>, String>>()?;
        let returned = self.0.query(&statement, &refs(&params)).await.map_err(|e| describe(&e))?;
        let OnConflict::Skip(key) = insert.on_conflict else {
            return Ok(vec![true; rows.len()]);
        };
        // What went in came back (`RETURNING key`); NULL in the key never conflicts.
        let column = insert.table.inserted().iter().position(|(name, _)| *name == key);
        let column = column.ok_or_else(|| format!("{} has no column {key}", insert.table.name))?;
        let mut new = HashSet::new();
        for row in &returned {
            new.extend(row.try_get::<_, Option<String>>(0).map_err(|e| describe(&e))?);
        }
        Ok(rows
            .iter()
            .map(|row| match row.get(column) {
                Some(Value::Text(id)) => new.contains(id.as_ref()),
                _ => true,
            })
            .collect())
    }
}

/// A [`Value`] as the type PostgreSQL expects for a parameter (a column of the same
/// values for an array parameter).
#[derive(Debug)]
enum Param<'v> {
    Int8(Option<i64>),
    Int4(Option<i32>),
    Bool(Option<bool>),
    Text(Option<&'v str>),
    Int8s(Vec<Option<i64>>),
    Int4s(Vec<Option<i32>>),
    Bools(Vec<Option<bool>>),
    Texts(Vec<Option<&'v str>>),
}

impl<'v> Param<'v> {
    fn scalar(ty: &Type, value: &'v Value<'_>) -> Result<Param<'v>, String> {
        Ok(match *ty {
            Type::INT8 => Param::Int8(int8(value)?),
            Type::INT4 => Param::Int4(int4(value)?),
            Type::BOOL => Param::Bool(boolean(value)?),
            Type::TEXT | Type::VARCHAR | Type::NAME | Type::BPCHAR => Param::Text(text(value)?),
            _ => return Err(format!("unsupported parameter type {ty}")),
        })
    }

    fn array(ty: &Type, values: Vec<&'v Value<'_>>) -> Result<Param<'v>, String> {
        let values = values.into_iter();
        Ok(match *ty {
            Type::INT8_ARRAY => Param::Int8s(values.map(int8).collect::<Result<_, _>>()?),
            Type::INT4_ARRAY => Param::Int4s(values.map(int4).collect::<Result<_, _>>()?),
            Type::BOOL_ARRAY => Param::Bools(values.map(boolean).collect::<Result<_, _>>()?),
            Type::TEXT_ARRAY => Param::Texts(values.map(text).collect::<Result<_, _>>()?),
            _ => return Err(format!("unsupported parameter type {ty}")),
        })
    }

    fn as_sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Param::Int8(v) => v,
            Param::Int4(v) => v,
            Param::Bool(v) => v,
            Param::Text(v) => v,
            Param::Int8s(v) => v,
            Param::Int4s(v) => v,
            Param::Bools(v) => v,
            Param::Texts(v) => v,
        }
    }
}

fn refs<'p>(params: &'p [Param<'_>]) -> Vec<&'p (dyn ToSql + Sync)> {
    params.iter().map(Param::as_sql).collect()
}

fn int8(value: &Value<'_>) -> Result<Option<i64>, String> {
    match value {
        Value::Null => Ok(None),
        Value::Int(n) => Ok(Some(*n)),
        Value::Bool(b) => Ok(Some(i64::from(*b))),
        Value::Text(_) => Err("text where an integer was expected".to_owned()),
    }
}

fn int4(value: &Value<'_>) -> Result<Option<i32>, String> {
    int8(value)?.map(|n| i32::try_from(n).map_err(|e| format!("{n}: {e}"))).transpose()
}

fn boolean(value: &Value<'_>) -> Result<Option<bool>, String> {
    Ok(int8(value)?.map(|n| n != 0))
}

fn text<'v>(value: &'v Value<'_>) -> Result<Option<&'v str>, String> {
    match value {
        Value::Null => Ok(None),
        Value::Text(s) => Ok(Some(s)),
        _ => Err("a number where text was expected".to_owned()),
    }
}

/// A result row as [`Value`]s, by the columns' types.
fn row_of(row: &tokio_postgres::Row) -> Result<Row, String> {
    fn get<'r, T: tokio_postgres::types::FromSql<'r>>(
        row: &'r tokio_postgres::Row,
        i: usize,
        value: impl FnOnce(T) -> Value<'static>,
    ) -> Result<Value<'static>, String> {
        let got: Option<T> = row.try_get(i).map_err(|e| describe(&e))?;
        Ok(got.map_or(Value::Null, value))
    }
    let values = row.columns().iter().enumerate().map(|(i, column)| match *column.type_() {
        Type::INT8 => get(row, i, Value::Int),
        Type::INT4 => get(row, i, |n: i32| Value::Int(n.into())),
        Type::INT2 => get(row, i, |n: i16| Value::Int(n.into())),
        Type::BOOL => get(row, i, Value::Bool),
        Type::TEXT | Type::VARCHAR | Type::NAME | Type::BPCHAR => get(row, i, |s: String| Value::Text(s.into())),
        ref ty => Err(format!("column {i}: unsupported type {ty}")),
    });
    values.collect::<Result<_, _>>().map(Row)
}
