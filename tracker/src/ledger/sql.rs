//! Where SQLite and PostgreSQL differ, in one place: the ledger's tables
//! ([`super::schema`]) and queries ([`super::queries`]) are written once, against the
//! small [`Tx`] trait, in SQLite's spelling (`?N` placeholders) with type tokens in table
//! definitions; [`Dialect`] turns that into each backend's text.
//!
//! | | SQLite | PostgreSQL |
//! | --- | --- | --- |
//! | placeholders | `?1` | `$1` |
//! | `{INT}` | `INTEGER` (64-bit) | `BIGINT` |
//! | `{BOOL}` | `INTEGER` (0 or 1) | `BOOLEAN` |
//! | `{SEQ}` | `INTEGER PRIMARY KEY` | `BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY` |
//! | many rows ([`Tx::insert`]) | one prepared `INSERT … VALUES`, run per row | one `INSERT … SELECT * FROM UNNEST(…)` of arrays, `RETURNING` what went in |
//! | schema version | `PRAGMA user_version` | table `tollgate_ledger_schema`, under an advisory lock |
//! | taking rows to delete | plain (one writer) | `FOR UPDATE SKIP LOCKED` (replicas compact at once) |
//! | locking a limit window | nothing to do (`BEGIN IMMEDIATE` holds the only write lock) | the row lock of `INSERT … ON CONFLICT DO UPDATE` ([`OnConflict::Update`]), same statement |
//! | running it | rusqlite: blocking, on the writer thread or a blocking thread | tokio-postgres: async |
//!
//! The last row is bridged by [`Tx`]: queries are `async fn`s over it; the SQLite
//! implementation never waits, so `sqlite::run_now` finishes them in one poll on the
//! thread that holds the connection, while PostgreSQL awaits them as usual.
//! Transactions are the backends' own (`BEGIN IMMEDIATE` and group commit in SQLite, one
//! per request in PostgreSQL); a [`Tx`] runs statements inside whichever is open.

use std::borrow::Cow;

/// The SQL `i64::MAX`, where sums saturate.
const SQL_MAX: &str = "9223372036854775807";

/// Type tokens of table definitions and what they are in each dialect.
const TYPES: [(&str, &str, &str); 3] = [
    ("{INT}", "INTEGER", "BIGINT"),
    ("{BOOL}", "INTEGER", "BOOLEAN"),
    ("{SEQ}", "INTEGER PRIMARY KEY", "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"),
];

/// Serialises schema creation when several PostgreSQL replicas start at once.
const SCHEMA_LOCK: i64 = 0x746f_6c6c_6761_7465; // "tollgate"

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// `template` in this dialect: `?N` placeholders become `$N` for PostgreSQL, type
    /// tokens (`{INT}`, `{BOOL}`, `{SEQ}`) their type names. Templates hold no `?` or
    /// `{` of their own (no string literals with them).
    pub fn sql(self, template: &str) -> String {
        let mut sql = String::with_capacity(template.len() + 16);
        let mut chars = template.chars().peekable();
        while let Some(c) = chars.next() {
            let placeholder = c == '?' && chars.peek().is_some_and(char::is_ascii_digit);
            sql.push(if placeholder && self == Dialect::Postgres { '$' } else { c });
        }
        if sql.contains('{') {
            for (token, sqlite, postgres) in TYPES {
                sql = sql.replace(token, if self == Dialect::Sqlite { sqlite } else { postgres });
            }
        }
        sql
    }

    /// The statement of an [`Insert`] of any number of rows (see [`Tx::insert`]).
    pub fn insert_sql(self, insert: &Insert) -> String {
        let table = insert.table;
        let columns = table.inserted();
        let names: Vec<&str> = columns.iter().map(|(name, _)| *name).collect();
        let source = match self {
            Dialect::Sqlite => {
                format!("VALUES ({})", (1..=columns.len()).map(|i| format!("?{i}")).collect::<Vec<_>>().join(", "))
            }
            Dialect::Postgres => {
                let arrays: Vec<String> = (1..=columns.len())
                    .zip(&columns)
                    .map(|(i, (_, definition))| {
                        format!("?{i}::{}[]", definition.split_whitespace().next().unwrap_or("TEXT"))
                    })
                    .collect();
                format!("SELECT * FROM UNNEST({})", arrays.join(", "))
            }
        };
        let conflict = match insert.on_conflict {
            OnConflict::Skip(key) if self == Dialect::Postgres => {
                format!("ON CONFLICT ({key}) DO NOTHING RETURNING {key}")
            }
            OnConflict::Skip(key) => format!("ON CONFLICT ({key}) DO NOTHING"),
            OnConflict::Add(summed) => {
                let set: Vec<String> = summed
                    .iter()
                    .map(|c| {
                        format!(
                            "{c} = CASE WHEN {t}.{c} > {SQL_MAX} - excluded.{c} THEN {SQL_MAX} ELSE {t}.{c} + excluded.{c} END",
                            t = table.name
                        )
                    })
                    .collect();
                format!("ON CONFLICT ({}) DO UPDATE SET {}", table.key.join(", "), set.join(", "))
            }
            OnConflict::Update(replaced) => {
                let set: Vec<String> = replaced.iter().map(|c| format!("{c} = excluded.{c}")).collect();
                format!("ON CONFLICT ({}) DO UPDATE SET {}", table.key.join(", "), set.join(", "))
            }
        };
        self.sql(&format!("INSERT INTO {} ({}) {source} {conflict}", table.name, names.join(", ")))
    }

    /// Statements run first when creating or migrating the schema: PostgreSQL takes a
    /// lock so replicas starting together do not race, and creates its version table so
    /// the version is known before anything else.
    pub fn schema_prelude(self) -> Vec<String> {
        match self {
            Dialect::Sqlite => Vec::new(), // `BEGIN IMMEDIATE` already holds the only write lock
            Dialect::Postgres => vec![
                format!("SELECT pg_advisory_xact_lock({SCHEMA_LOCK})"),
                "CREATE TABLE IF NOT EXISTS tollgate_ledger_schema (version INTEGER NOT NULL)".to_owned(),
            ],
        }
    }

    /// The stored schema version: one row (SQLite: 0 for a new file), or none (a new
    /// PostgreSQL database).
    pub fn read_version(self) -> &'static str {
        match self {
            Dialect::Sqlite => "PRAGMA user_version",
            Dialect::Postgres => "SELECT version FROM tollgate_ledger_schema",
        }
    }

    /// Stores `version`; `stored` says whether a version row exists already.
    pub fn write_version(self, stored: bool, version: i64) -> String {
        match (self, stored) {
            (Dialect::Sqlite, _) => format!("PRAGMA user_version = {version}"),
            (Dialect::Postgres, false) => format!("INSERT INTO tollgate_ledger_schema (version) VALUES ({version})"),
            (Dialect::Postgres, true) => format!("UPDATE tollgate_ledger_schema SET version = {version}"),
        }
    }

    /// A row when table `?1` has a column `?2`.
    pub fn has_column(self) -> &'static str {
        match self {
            Dialect::Sqlite => "SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2",
            Dialect::Postgres => {
                "SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() \
                 AND table_name = CAST(?1 AS TEXT) AND column_name = CAST(?2 AS TEXT)"
            }
        }
    }

    /// What follows a subquery choosing rows to delete, so that concurrent deleters each
    /// take other rows.
    pub fn skip_locked(self) -> &'static str {
        match self {
            Dialect::Sqlite => "",
            Dialect::Postgres => " FOR UPDATE SKIP LOCKED",
        }
    }
}

/// A column: its name and its definition, with type tokens (`"{INT} NOT NULL"`).
pub type Column = (&'static str, &'static str);

/// One table, the same in both dialects: its columns, in groups so tables can share
/// some (in order, groups one after the other), its primary key (unless a column's
/// definition holds it) and its indexes (name, columns).
#[derive(Debug)]
pub struct Table {
    pub name: &'static str,
    pub columns: &'static [&'static [Column]],
    pub key: &'static [&'static str],
    pub indexes: &'static [(&'static str, &'static str)],
}

impl Table {
    /// `CREATE TABLE IF NOT EXISTS` and its indexes (a template).
    pub fn create_sql(&self) -> String {
        let mut lines: Vec<String> =
            self.all_columns().map(|(name, definition)| format!("    {name:<17} {definition}")).collect();
        if !self.key.is_empty() {
            lines.push(format!("    PRIMARY KEY ({})", self.key.join(", ")));
        }
        let mut sql = format!("CREATE TABLE IF NOT EXISTS {} (\n{}\n);\n", self.name, lines.join(",\n"));
        for (index, columns) in self.indexes {
            sql.push_str(&format!("CREATE INDEX IF NOT EXISTS {index} ON {} ({columns});\n", self.name));
        }
        sql
    }

    /// The definition of `column`.
    pub fn column(&self, column: &str) -> Option<&'static str> {
        self.all_columns().find(|(name, _)| *name == column).map(|(_, definition)| definition)
    }

    /// The columns an insert writes: all but the generated `{SEQ}` one, in order.
    pub fn inserted(&self) -> Vec<Column> {
        self.all_columns().filter(|(_, definition)| !definition.starts_with("{SEQ}")).collect()
    }

    fn all_columns(&self) -> impl Iterator<Item = Column> {
        self.columns.iter().flat_map(|group| group.iter().copied())
    }
}

/// What an insert does with a row whose key is taken already.
#[derive(Debug, Clone, Copy)]
pub enum OnConflict {
    /// Keeps the stored row; the new one is not written. The column is the unique one
    /// that conflicts (text, and `NULL` in it never conflicts).
    Skip(&'static str),
    /// Adds these columns to the stored row's, saturating at `i64::MAX` (the table's
    /// primary key conflicts); the rest of the stored row stays.
    Add(&'static [&'static str]),
    /// Overwrites these columns of the stored row with the new row's (the table's
    /// primary key conflicts). In PostgreSQL this locks the row until the transaction
    /// ends, whether it was inserted or updated: how a limit window is locked.
    Update(&'static [&'static str]),
}

/// Rows into every column of `table` but the generated one, in the table's order.
#[derive(Debug, Clone, Copy)]
pub struct Insert {
    pub table: &'static Table,
    pub on_conflict: OnConflict,
}

/// A parameter or a column of a result row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value<'a> {
    Null,
    Int(i64),
    Bool(bool),
    Text(Cow<'a, str>),
}

impl From<i64> for Value<'_> {
    fn from(n: i64) -> Self {
        Value::Int(n)
    }
}

impl From<bool> for Value<'_> {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}

impl<'a> From<&'a str> for Value<'a> {
    fn from(s: &'a str) -> Self {
        Value::Text(Cow::Borrowed(s))
    }
}

impl<'a, T: Into<Value<'a>>> From<Option<T>> for Value<'a> {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// A result row, read by column index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row(pub Vec<Value<'static>>);

impl Row {
    fn value(&self, i: usize) -> Result<&Value<'static>, String> {
        self.0.get(i).ok_or_else(|| format!("column {i}: missing"))
    }

    /// An integer or a boolean (as 0 or 1) column; `NULL` is `None`.
    pub fn opt_int(&self, i: usize) -> Result<Option<i64>, String> {
        match self.value(i)? {
            Value::Null => Ok(None),
            Value::Int(n) => Ok(Some(*n)),
            Value::Bool(b) => Ok(Some(i64::from(*b))),
            Value::Text(_) => Err(format!("column {i}: text where an integer was expected")),
        }
    }

    pub fn int(&self, i: usize) -> Result<i64, String> {
        self.opt_int(i)?.ok_or_else(|| format!("column {i}: NULL where an integer was expected"))
    }

    /// `N` integer columns from `first` on.
    pub fn ints<const N: usize>(&self, first: usize) -> Result<[i64; N], String> {
        let mut values = [0i64; N];
        for (i, v) in values.iter_mut().enumerate() {
            *v = self.int(first + i)?;
        }
        Ok(values)
    }

    /// A boolean, or an integer that is not 0.
    pub fn flag(&self, i: usize) -> Result<bool, String> {
        Ok(self.int(i)? != 0)
    }

    pub fn opt_text(&self, i: usize) -> Result<Option<String>, String> {
        match self.value(i)? {
            Value::Null => Ok(None),
            Value::Text(s) => Ok(Some(s.clone().into_owned())),
            _ => Err(format!("column {i}: a number where text was expected")),
        }
    }

    pub fn text(&self, i: usize) -> Result<String, String> {
        self.opt_text(i)?.ok_or_else(|| format!("column {i}: NULL where text was expected"))
    }
}

/// A connection inside a transaction the backend opened (or a reader), which the
/// queries run on. Errors are the backend's message; callers decide what kind of
/// [`super::LedgerError`] they are.
pub trait Tx {
    fn dialect(&self) -> Dialect;

    /// Runs one statement (a template for [`Dialect::sql`]) and returns its rows.
    async fn query(&self, sql: &str, params: &[Value<'_>]) -> Result<Vec<Row>, String>;

    /// Runs statements (a template) separated by `;`, without parameters.
    async fn batch(&self, sql: &str) -> Result<(), String>;

    /// Writes `rows` (values in the order of [`Insert`]) and says, per row, whether it was
    /// written: always for [`OnConflict::Add`], not when it conflicted for
    /// [`OnConflict::Skip`].
    async fn insert(&self, insert: &Insert, rows: &[Vec<Value<'_>>]) -> Result<Vec<bool>, String>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dialects_render_placeholders_and_types() {
        let template = "SELECT ?1, '{INT}' FROM t WHERE a = ?12 AND b IS NOT ?";
        assert_eq!(Dialect::Sqlite.sql(template), "SELECT ?1, 'INTEGER' FROM t WHERE a = ?12 AND b IS NOT ?");
        assert_eq!(Dialect::Postgres.sql(template), "SELECT $1, 'BIGINT' FROM t WHERE a = $12 AND b IS NOT ?");
    }

    #[test]
    fn inserts_per_dialect() {
        static T: Table = Table {
            name: "t",
            columns: &[
                &[("seq", "{SEQ}"), ("k", "TEXT NOT NULL")],
                &[("n", "{INT} NOT NULL"), ("f", "{BOOL} NOT NULL")],
            ],
            key: &["k"],
            indexes: &[],
        };
        let skip = Insert { table: &T, on_conflict: OnConflict::Skip("k") };
        assert_eq!(
            Dialect::Sqlite.insert_sql(&skip),
            "INSERT INTO t (k, n, f) VALUES (?1, ?2, ?3) ON CONFLICT (k) DO NOTHING"
        );
        assert_eq!(
            Dialect::Postgres.insert_sql(&skip),
            "INSERT INTO t (k, n, f) SELECT * FROM UNNEST($1::TEXT[], $2::BIGINT[], $3::BOOLEAN[]) \
             ON CONFLICT (k) DO NOTHING RETURNING k"
        );
        let add = Insert { table: &T, on_conflict: OnConflict::Add(&["n"]) };
        assert_eq!(
            Dialect::Sqlite.insert_sql(&add),
            "INSERT INTO t (k, n, f) VALUES (?1, ?2, ?3) ON CONFLICT (k) DO UPDATE SET n = CASE WHEN t.n > \
             9223372036854775807 - excluded.n THEN 9223372036854775807 ELSE t.n + excluded.n END"
        );
        let update = Insert { table: &T, on_conflict: OnConflict::Update(&["n", "f"]) };
        assert_eq!(
            Dialect::Postgres.insert_sql(&update),
            "INSERT INTO t (k, n, f) SELECT * FROM UNNEST($1::TEXT[], $2::BIGINT[], $3::BOOLEAN[]) \
             ON CONFLICT (k) DO UPDATE SET n = excluded.n, f = excluded.f"
        );
    }

    #[test]
    fn rows_read_by_type() {
        let row = Row(vec![Value::Int(7), Value::Bool(true), Value::Null, Value::Text("x".into())]);
        assert_eq!(row.int(0), Ok(7));
        assert_eq!(row.int(1), Ok(1));
        assert_eq!(row.flag(1), Ok(true));
        assert_eq!(row.opt_int(2), Ok(None));
        assert_eq!(row.opt_text(2), Ok(None));
        assert_eq!(row.text(3), Ok("x".to_owned()));
        assert!(row.int(3).is_err());
        assert!(row.text(0).is_err());
        assert!(row.int(4).is_err());
        assert_eq!(row.ints::<2>(0), Ok([7, 1]));
    }
}
