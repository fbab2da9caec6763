//! The ledger's tables, written once for both backends (types as [`super::sql`]'s
//! tokens), and how a ledger of an older schema is brought up to date.

use super::sql::{Column, Insert, OnConflict, Table, Tx};
use super::TOTAL_COLUMNS;

/// The schema version this tracker writes. 1: the first. 2: `usage_events.requests`
/// (aggregated denials). 3: the global-limit tables `limit_windows`, `limit_holdings`
/// and `limit_replicas` (`POST /v1/limits/sync`). 4: `api_keys`, managed API keys
/// (`/v1/keys`). A ledger of an older version is migrated in place when opened (added
/// columns by [`ADDED_COLUMNS`], added tables by `CREATE TABLE IF NOT EXISTS`); one of a
/// newer version is refused.
pub const SCHEMA_VERSION: i64 = 4;

/// What each version added to the one before, as (version, table, column); the
/// column's definition is the table's. From 1 to 2: every existing event counted one
/// request (`DEFAULT 1`, constant, so neither backend rewrites the table).
const ADDED_COLUMNS: [(i64, &Table, &str); 1] = [(2, &EVENTS, "requests")];

/// The series key of totals: the labels of the Prometheus series the events count in
/// ([`super::SeriesKey`]).
const SERIES: &[Column] = &[
    ("user_name", "TEXT NOT NULL"),
    ("user_groups", "TEXT NOT NULL"),
    ("path", "TEXT NOT NULL"),
    ("model", "TEXT NOT NULL"),
    ("denied", "TEXT NOT NULL"),
];

/// The sums of a totals row, in [`TOTAL_COLUMNS`] order.
const SUMS: &[Column] = &[
    ("requests", "{INT} NOT NULL"),
    ("prompt_tokens", "{INT} NOT NULL"),
    ("completion_tokens", "{INT} NOT NULL"),
    ("cached_tokens", "{INT} NOT NULL"),
    ("reasoning_tokens", "{INT} NOT NULL"),
    ("incomplete", "{INT} NOT NULL"),
    ("upstream_errors", "{INT} NOT NULL"),
];

/// One row per accepted event; the unique `id` is the duplicate detection.
pub static EVENTS: Table = Table {
    name: "usage_events",
    columns: &[
        &[
            ("seq", "{SEQ}"),
            ("id", "TEXT UNIQUE"),
            ("ts_ms", "{INT} NOT NULL"),
            ("received_ms", "{INT} NOT NULL"),
            ("replica", "TEXT NOT NULL"),
        ],
        SERIES,
        &[
            ("status", "INTEGER"),
            ("prompt_tokens", "{INT} NOT NULL"),
            ("completion_tokens", "{INT} NOT NULL"),
            ("cached_tokens", "{INT} NOT NULL"),
            ("reasoning_tokens", "{INT} NOT NULL"),
            ("incomplete", "{BOOL} NOT NULL"),
            ("upstream_error", "{BOOL} NOT NULL"),
            ("requests", "{INT} NOT NULL DEFAULT 1"),
        ],
    ],
    key: &[],
    indexes: &[("usage_events_user_ts", "user_name, ts_ms"), ("usage_events_ts", "ts_ms")],
};

/// Lifetime sums per replica and series.
pub static TOTALS: Table = Table {
    name: "usage_totals",
    columns: &[&[("replica", "TEXT NOT NULL")], SERIES, SUMS, &[("first_ms", "{INT} NOT NULL")]],
    key: &["user_name", "replica", "user_groups", "path", "model", "denied"],
    indexes: &[],
};

/// What compaction leaves of old events: sums per UTC day, replica and series.
pub static DAILY: Table = Table {
    name: "usage_daily",
    columns: &[&[("day_ms", "{INT} NOT NULL"), ("replica", "TEXT NOT NULL")], SERIES, SUMS],
    key: &["user_name", "day_ms", "replica", "user_groups", "path", "model", "denied"],
    indexes: &[],
};

/// One row per limit window any replica synced: what a sync locks (its row lock,
/// taken by [`LOCK_WINDOW`]) before it reads and grants from the window, so two tracker
/// replicas never grant from the same "left" at once.
pub static LIMIT_WINDOWS: Table = Table {
    name: "limit_windows",
    columns: &[&[
        ("limit_key", "TEXT NOT NULL"),
        ("window_start_ms", "{INT} NOT NULL"),
        ("window_end_ms", "{INT} NOT NULL"),
    ]],
    key: &["limit_key", "window_start_ms"],
    indexes: &[("limit_windows_end", "window_end_ms")],
};

/// Each gateway replica's holding of a limit window (`tollgate_rules::lease::Holding`)
/// and the latest sequence number it synced it with.
pub static LIMIT_HOLDINGS: Table = Table {
    name: "limit_holdings",
    columns: &[&[
        ("limit_key", "TEXT NOT NULL"),
        ("window_start_ms", "{INT} NOT NULL"),
        ("replica", "TEXT NOT NULL"),
        ("window_end_ms", "{INT} NOT NULL"),
        ("granted", "{INT} NOT NULL"),
        ("used", "{INT} NOT NULL"),
        ("demand", "{INT} NOT NULL"),
        ("seen_ms", "{INT} NOT NULL"),
        ("seq", "{INT} NOT NULL"),
    ]],
    key: &["limit_key", "window_start_ms", "replica"],
    indexes: &[("limit_holdings_end", "window_end_ms")],
};

/// When each gateway replica last synced (the `replicas` of a sync's answer).
pub static LIMIT_REPLICAS: Table = Table {
    name: "limit_replicas",
    columns: &[&[("replica", "TEXT NOT NULL"), ("seen_ms", "{INT} NOT NULL")]],
    key: &["replica"],
    indexes: &[],
};

/// Managed API keys ([`crate::keys_api`]): never the key, only its SHA-256 (lowercase
/// hex); `user_groups` as the events store groups (sorted, comma-joined). Revoking sets
/// `revoked_at_ms` and keeps the row. Indexes: a user's keys newest first (the
/// listing), and the two times the changes feed asks for.
pub static API_KEYS: Table = Table {
    name: "api_keys",
    columns: &[&[
        ("id", "TEXT NOT NULL PRIMARY KEY"),
        ("sha256", "TEXT NOT NULL UNIQUE"),
        ("user_name", "TEXT NOT NULL"),
        ("user_groups", "TEXT NOT NULL"),
        ("name", "TEXT"),
        ("created_at_ms", "{INT} NOT NULL"),
        ("expires_at_ms", "{INT}"),
        ("revoked_at_ms", "{INT}"),
        ("last_used_at_ms", "{INT}"),
    ]],
    key: &[],
    indexes: &[
        ("api_keys_user_created", "user_name, created_at_ms"),
        ("api_keys_revoked", "revoked_at_ms"),
        ("api_keys_expires", "expires_at_ms"),
    ],
};

/// Every table, in creation order.
const TABLES: [&Table; 7] = [&EVENTS, &TOTALS, &DAILY, &LIMIT_WINDOWS, &LIMIT_HOLDINGS, &LIMIT_REPLICAS, &API_KEYS];

/// An event: skipped when its id is in the ledger already (a duplicate).
pub const INSERT_EVENT: Insert = Insert { table: &EVENTS, on_conflict: OnConflict::Skip("id") };
/// A series' sums added to its lifetime totals.
pub const ADD_TOTALS: Insert = Insert { table: &TOTALS, on_conflict: OnConflict::Add(&TOTAL_COLUMNS) };
/// A day's sums added to what compaction left of that day before.
pub const ADD_DAILY: Insert = Insert { table: &DAILY, on_conflict: OnConflict::Add(&TOTAL_COLUMNS) };
/// Locks a limit window until the transaction ends, creating its row if new. Rows go
/// in (key, window start) order, so concurrent syncs lock in the same order.
pub const LOCK_WINDOW: Insert = Insert { table: &LIMIT_WINDOWS, on_conflict: OnConflict::Update(&["window_end_ms"]) };
/// A replica's new holding of a window (computed under the window's lock).
pub const PUT_HOLDING: Insert = Insert {
    table: &LIMIT_HOLDINGS,
    on_conflict: OnConflict::Update(&["window_end_ms", "granted", "used", "demand", "seen_ms", "seq"]),
};
/// When a replica last synced.
pub const PUT_REPLICA: Insert = Insert { table: &LIMIT_REPLICAS, on_conflict: OnConflict::Update(&["seen_ms"]) };

/// Creates the schema where missing and migrates an older one, inside the transaction
/// the backend opened (so a crash mid-migration leaves the ledger as it was); refuses a
/// ledger written by a newer tracker before touching anything else. Errors say what
/// failed (the caller makes them [`super::LedgerError::Open`]).
pub async fn migrate(tx: &impl Tx) -> Result<(), String> {
    let dialect = tx.dialect();
    let failed = |what: &str, e: String| format!("{what}: {e}");
    for statement in dialect.schema_prelude() {
        tx.batch(&statement).await.map_err(|e| failed("cannot create the schema", e))?;
    }
    let rows = tx.query(dialect.read_version(), &[]).await.map_err(|e| failed("cannot read the schema version", e))?;
    let stored =
        rows.first().map(|row| row.int(0)).transpose().map_err(|e| failed("cannot read the schema version", e))?;
    let version = stored.unwrap_or(0);
    if version > SCHEMA_VERSION {
        return Err(format!("the ledger has schema version {version}, newer than this tracker's {SCHEMA_VERSION}"));
    }
    let create: String = TABLES.iter().map(|table| table.create_sql()).collect();
    tx.batch(&create).await.map_err(|e| failed("cannot create the schema", e))?;
    // Each added column is looked for rather than assumed from the version: idempotent
    // either way, and `ALTER TABLE` (which locks the table against other replicas'
    // writes) runs only on an older schema.
    for (added_in, table, column) in ADDED_COLUMNS.into_iter().filter(|(v, ..)| *v > version) {
        let found = tx
            .query(dialect.has_column(), &[table.name.into(), column.into()])
            .await
            .map_err(|e| failed("cannot read the schema", e))?;
        if found.is_empty() {
            let definition = table.column(column).unwrap_or("");
            tx.batch(&format!("ALTER TABLE {} ADD COLUMN {column} {definition}", table.name))
                .await
                .map_err(|e| failed(&format!("cannot migrate the schema to version {added_in}"), e))?;
        }
    }
    if stored != Some(SCHEMA_VERSION) {
        tx.batch(&dialect.write_version(stored.is_some(), SCHEMA_VERSION))
            .await
            .map_err(|e| failed("cannot set the schema version", e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::sql::Dialect;
    use super::*;

    /// The tables render as the hand-written schema of before the fold, so a new ledger
    /// is created exactly as then (existing ones are left alone by `IF NOT EXISTS`).
    #[test]
    fn tables_render_as_before() {
        let events = Dialect::Postgres.sql(&EVENTS.create_sql());
        assert!(events.starts_with(
            "CREATE TABLE IF NOT EXISTS usage_events (\n    \
             seq               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,\n    \
             id                TEXT UNIQUE,\n    \
             ts_ms             BIGINT NOT NULL,\n"
        ));
        assert!(events.ends_with(
            "    incomplete        BOOLEAN NOT NULL,\n    \
             upstream_error    BOOLEAN NOT NULL,\n    \
             requests          BIGINT NOT NULL DEFAULT 1\n);\n\
             CREATE INDEX IF NOT EXISTS usage_events_user_ts ON usage_events (user_name, ts_ms);\n\
             CREATE INDEX IF NOT EXISTS usage_events_ts ON usage_events (ts_ms);\n"
        ));
        let daily = Dialect::Sqlite.sql(&DAILY.create_sql());
        assert!(daily.ends_with(
            "    upstream_errors   INTEGER NOT NULL,\n    \
             PRIMARY KEY (user_name, day_ms, replica, user_groups, path, model, denied)\n);\n"
        ));
        assert_eq!(EVENTS.column("requests"), Some("{INT} NOT NULL DEFAULT 1"));
        assert_eq!(SUMS.iter().map(|(name, _)| *name).collect::<Vec<_>>(), TOTAL_COLUMNS);
    }

    #[test]
    fn api_keys_table() {
        let sql = Dialect::Postgres.sql(&API_KEYS.create_sql());
        assert!(sql.starts_with(
            "CREATE TABLE IF NOT EXISTS api_keys (\n    \
             id                TEXT NOT NULL PRIMARY KEY,\n    \
             sha256            TEXT NOT NULL UNIQUE,\n"
        ));
        assert!(sql.ends_with(
            "    last_used_at_ms   BIGINT\n);\n\
             CREATE INDEX IF NOT EXISTS api_keys_user_created ON api_keys (user_name, created_at_ms);\n\
             CREATE INDEX IF NOT EXISTS api_keys_revoked ON api_keys (revoked_at_ms);\n\
             CREATE INDEX IF NOT EXISTS api_keys_expires ON api_keys (expires_at_ms);\n"
        ));
        assert!(TABLES.iter().any(|t| t.name == "api_keys"));
    }
}
