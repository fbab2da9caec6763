//! Every query of the ledger, written once for both backends against [`Tx`]. Writes run
//! inside the transaction their backend opened; errors are the backend's message (the
//! caller makes it a write or a read error).

use std::collections::HashMap;

use tollgate_rules::lease::Holding;

use super::schema::{ADD_DAILY, ADD_TOTALS, INSERT_EVENT, LOCK_WINDOW, PUT_HOLDING, PUT_REPLICA};
use super::sql::{Row, Tx, Value};
use super::{
    from_sql, sum_by_key, sum_daily, to_sql, ApiKey, Compacted, Dimension, KeyChange, RecentEvent, Record, Revoked,
    Scope, SeriesKey, Totals, UsageBucket, UsageRange, TOTAL_COLUMNS,
};
use crate::event::Tokens;
use crate::limits_sync::{self, LimitSync, Step, Stored, Synced};
use crate::time::{self, DAY_MS};

/// Limit keys per `IN (…)` list when reading holdings (well under both backends' limit
/// on parameters per statement).
const KEYS_PER_QUERY: usize = 1_000;

/// One batch: its events (in [`Record`] order; a duplicate id is skipped) and the
/// totals of the new ones, added to this replica's series. Per record, whether it was new.
pub async fn append_batch(
    tx: &impl Tx,
    records: &[Record],
    replica: &str,
    received_ms: i64,
) -> Result<Vec<bool>, String> {
    let events: Vec<Vec<Value<'_>>> = records
        .iter()
        .map(|r| {
            let [requests, prompt, completion, cached, reasoning, ..] = r.totals().columns();
            let mut row = vec![r.id.as_deref().into(), r.ts_ms.into(), received_ms.into(), replica.into()];
            row.extend(key_values(&r.key));
            row.extend([r.status.map(i64::from).into(), prompt.into(), completion.into(), cached.into()]);
            row.extend([reasoning.into(), r.incomplete.into(), r.upstream_error.into(), requests.into()]);
            row
        })
        .collect();
    let inserted = tx.insert(&INSERT_EVENT, &events).await?;
    let new = records.iter().zip(&inserted).filter(|(_, new)| **new).map(|(r, _)| r);
    let mut sums = sum_by_key(new);
    // Key order, so two transactions touching the same series lock them in the same
    // order and wait for each other instead of deadlocking (PostgreSQL).
    sums.sort_by(|a, b| a.0.cmp(&b.0));
    let totals: Vec<Vec<Value<'_>>> = sums
        .iter()
        .map(|(key, totals)| {
            let mut row = vec![replica.into()];
            row.extend(key_values(key));
            row.extend(totals.columns().map(Value::Int));
            row.push(received_ms.into());
            row
        })
        .collect();
    tx.insert(&ADD_TOTALS, &totals).await?;
    Ok(inserted)
}

/// One compaction chunk: deletes up to `chunk` events older than `cutoff_ms` and adds
/// their sums to `usage_daily`. How many were deleted.
pub async fn compact_chunk(tx: &impl Tx, cutoff_ms: i64, chunk: usize) -> Result<usize, String> {
    let sql = format!(
        "DELETE FROM usage_events WHERE seq IN \
           (SELECT seq FROM usage_events WHERE ts_ms < ?1 ORDER BY ts_ms LIMIT ?2{}) \
         RETURNING ts_ms, replica, user_name, user_groups, path, model, denied, requests, prompt_tokens, \
           completion_tokens, cached_tokens, reasoning_tokens, incomplete, upstream_error",
        tx.dialect().skip_locked()
    );
    let rows = tx.query(&sql, &[cutoff_ms.into(), i64::try_from(chunk).unwrap_or(i64::MAX).into()]).await?;
    let deleted = rows
        .iter()
        .map(|row| {
            Ok(Compacted {
                day_ms: time::floor(row.int(0)?, DAY_MS),
                replica: row.text(1)?,
                key: key_of(row, 2)?,
                totals: Totals::from_columns(row.ints(7)?),
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let n = deleted.len();
    let sums = sum_daily(deleted);
    let daily: Vec<Vec<Value<'_>>> = sums
        .iter()
        .map(|d| {
            let mut row = vec![d.day_ms.into(), d.replica.as_str().into()];
            row.extend(key_values(&d.key));
            row.extend(d.totals.columns().map(Value::Int));
            row
        })
        .collect();
    tx.insert(&ADD_DAILY, &daily).await?;
    Ok(n)
}

/// One `POST /v1/limits/sync`, inside the transaction its backend opened: locks every
/// window of the sync (in key order, so concurrent syncs wait rather than deadlock;
/// a no-op lock in SQLite, whose write transaction already excludes every other
/// writer), reads all replicas' holdings of them, applies [`limits_sync::step`] to each,
/// writes the new holdings and the replica's last-seen time, and counts the replicas
/// seen lately.
pub async fn sync_limits(tx: &impl Tx, sync: &LimitSync, now_ms: u64) -> Result<Synced, String> {
    let order = sync.lock_order();
    let windows: Vec<Vec<Value<'_>>> = order
        .iter()
        .map(|(_, l)| vec![l.key.as_str().into(), to_sql(l.window_start_ms).into(), to_sql(l.window_end_ms()).into()])
        .collect();
    tx.insert(&LOCK_WINDOW, &windows).await?;

    let mut keys: Vec<&str> = order.iter().map(|(_, l)| l.key.as_str()).collect();
    keys.dedup(); // sorted: equal keys are neighbours
    let mut stored: HashMap<(String, u64), Vec<Stored>> = HashMap::new();
    for chunk in keys.chunks(KEYS_PER_QUERY) {
        let list: Vec<String> = (1..=chunk.len()).map(|i| format!("?{i}")).collect();
        let sql = format!(
            "SELECT limit_key, window_start_ms, replica, granted, used, demand, seen_ms, seq FROM limit_holdings \
             WHERE limit_key IN ({})",
            list.join(", ")
        );
        let params: Vec<Value<'_>> = chunk.iter().map(|key| Value::from(*key)).collect();
        for row in tx.query(&sql, &params).await? {
            let window = (row.text(0)?, from_sql(row.int(1)?));
            let [granted, used, demand, seen_ms, seq] = row.ints(3)?.map(from_sql);
            let holding = Holding { granted, used, demand, seen_ms };
            stored.entry(window).or_default().push(Stored { replica: row.text(2)?, holding, seq });
        }
    }

    let mut steps: Vec<(usize, Step)> = Vec::with_capacity(order.len());
    let mut holdings: Vec<Vec<Value<'_>>> = Vec::with_capacity(order.len());
    for (i, lease) in &order {
        let rows = stored.get(&(lease.key.clone(), lease.window_start_ms)).map_or(&[][..], Vec::as_slice);
        let step = limits_sync::step(rows, &sync.replica, sync.seq, lease, now_ms, sync.interval_ms);
        let h = step.holding;
        holdings.push(vec![
            lease.key.as_str().into(),
            to_sql(lease.window_start_ms).into(),
            sync.replica.as_str().into(),
            to_sql(lease.window_end_ms()).into(),
            to_sql(h.granted).into(),
            to_sql(h.used).into(),
            to_sql(h.demand).into(),
            to_sql(h.seen_ms).into(),
            to_sql(step.seq).into(),
        ]);
        steps.push((*i, step));
    }
    tx.insert(&PUT_HOLDING, &holdings).await?;
    tx.insert(&PUT_REPLICA, &[vec![sync.replica.as_str().into(), to_sql(now_ms).into()]]).await?;
    let since = to_sql(sync.replicas_since(now_ms));
    let rows = tx.query("SELECT COUNT(*) FROM limit_replicas WHERE seen_ms >= ?1", &[since.into()]).await?;
    let replicas = rows.first().map(|row| row.int(0)).transpose()?.map_or(0, from_sql);
    steps.sort_by_key(|(i, _)| *i);
    Ok(Synced { replicas, steps: steps.into_iter().map(|(_, step)| step).collect() })
}

/// Housekeeping of global limits: deletes the windows and holdings of windows that
/// ended before `cutoff_ms`, and replicas not seen since.
pub async fn forget_limits(tx: &impl Tx, cutoff_ms: i64) -> Result<(), String> {
    for sql in [
        "DELETE FROM limit_windows WHERE window_end_ms < ?1",
        "DELETE FROM limit_holdings WHERE window_end_ms < ?1",
        "DELETE FROM limit_replicas WHERE seen_ms < ?1",
    ] {
        tx.query(sql, &[cutoff_ms.into()]).await?;
    }
    Ok(())
}

/// `replica`'s lifetime totals per series, in the order the series first appeared.
pub async fn restore(tx: &impl Tx, replica: &str) -> Result<Vec<(SeriesKey, Totals)>, String> {
    let sql = format!(
        "SELECT user_name, user_groups, path, model, denied, {} FROM usage_totals WHERE replica = ?1 \
         ORDER BY first_ms, user_name, user_groups, path, model, denied",
        TOTAL_COLUMNS.join(", ")
    );
    let rows = tx.query(&sql, &[replica.into()]).await?;
    rows.iter().map(|row| Ok((key_of(row, 0)?, Totals::from_columns(row.ints(5)?)))).collect()
}

/// Whether any replica ever recorded an event of `user`.
pub async fn knows_user(tx: &impl Tx, user: &str) -> Result<bool, String> {
    let rows = tx.query("SELECT 1 FROM usage_totals WHERE user_name = ?1 LIMIT 1", &[user.into()]).await?;
    Ok(!rows.is_empty())
}

/// The totals of `scope`'s events per bucket (see [`super::Ledger::usage_of`]).
pub async fn usage(tx: &impl Tx, scope: &Scope, range: UsageRange) -> Result<Vec<UsageBucket>, String> {
    let rows = sums(tx, scope, range, Group::Bucket(range.width_ms)).await?;
    rows.iter().map(|row| Ok(usage_row(row.int(0)?, row.int(1)?, row.ints(2)?))).collect()
}

/// The totals of `scope`'s events per user, model or deny reason (see
/// [`super::Ledger::breakdown`]), in the order of the label.
pub async fn breakdown(
    tx: &impl Tx,
    scope: &Scope,
    range: UsageRange,
    by: Dimension,
) -> Result<Vec<(String, Totals)>, String> {
    let rows = sums(tx, scope, range, Group::Column(by.column())).await?;
    rows.iter().map(|row| Ok((row.text(0)?, usage_row(0, row.int(1)?, row.ints(2)?).totals))).collect()
}

/// What [`sums`] groups by.
enum Group {
    /// UTC-aligned buckets of this width.
    Bucket(i64),
    /// A column both usage tables have.
    Column(&'static str),
}

/// The one usage query: the events of `scope` in the range (and the compacted days of
/// [`super::Ledger::usage_of`]'s rule), summed per group; rows of (group, requests,
/// 4 × (high, low) token halves), in group order. Token sums are split into high and low
/// 32-bit halves so no intermediate sum overflows (SQLite's `SUM` fails on overflow);
/// the halves are joined with saturation in Rust ([`usage_row`]).
async fn sums(tx: &impl Tx, scope: &Scope, range: UsageRange, group: Group) -> Result<Vec<Row>, String> {
    let UsageRange { since_ms, until_ms, since_day_ms, .. } = range;
    let split = |c: &str| format!("{c} / 4294967296 AS {c}_hi, {c} % 4294967296 AS {c}_lo");
    let tokens = ["prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens"];
    let event_cols = tokens.map(split).join(", ");
    let sums = tokens.map(|c| format!("CAST(SUM({c}_hi) AS BIGINT), CAST(SUM({c}_lo) AS BIGINT)")).join(", ");
    // ?1 since, ?2 until, ?3 the start of since's day; then the scope's user and the
    // bucket width, when they are used (PostgreSQL refuses parameters it cannot type).
    let mut params: Vec<Value<'_>> = vec![since_ms.into(), until_ms.into(), since_day_ms.into()];
    let filter = match scope {
        Scope::User(user) => {
            params.push(user.as_str().into());
            format!("user_name = ?{}", params.len())
        }
        Scope::Authorized => "denied = ''".to_owned(),
        Scope::Denied => "denied <> ''".to_owned(),
    };
    let (event_key, daily_key) = match group {
        Group::Bucket(width) => {
            params.push(width.into());
            let n = params.len();
            (format!("(ts_ms / ?{n}) * ?{n}"), format!("(day_ms / ?{n}) * ?{n}"))
        }
        Group::Column(column) => (column.to_owned(), column.to_owned()),
    };
    let sql = format!(
        "SELECT b, CAST(SUM(requests) AS BIGINT), {sums} FROM (\
           SELECT {event_key} AS b, requests, {event_cols} FROM usage_events \
             WHERE {filter} AND ts_ms >= ?1 AND ts_ms < ?2 \
           UNION ALL \
           SELECT {daily_key} AS b, requests, {event_cols} FROM usage_daily \
             WHERE {filter} AND day_ms >= ?3 AND day_ms < ?2\
         ) AS x GROUP BY b ORDER BY b"
    );
    tx.query(&sql, &params).await
}

/// Joins the (bucket, requests, 4 × (high, low)) row of [`usage`].
fn usage_row(bucket: i64, requests: i64, halves: [i64; 8]) -> UsageBucket {
    let join = |hi: i64, lo: i64| {
        let sum = u128::from(from_sql(hi)) * (1 << 32) + u128::from(from_sql(lo));
        u64::try_from(sum).unwrap_or(u64::MAX)
    };
    let [ph, pl, ch, cl, kh, kl, rh, rl] = halves;
    UsageBucket {
        start_ms: bucket,
        totals: Totals {
            requests: from_sql(requests),
            prompt: join(ph, pl),
            completion: join(ch, cl),
            cached: join(kh, kl),
            reasoning: join(rh, rl),
            incomplete: 0,
            upstream_errors: 0,
        },
    }
}

/// `user`'s latest `limit` events, newest first.
pub async fn recent(tx: &impl Tx, user: &str, limit: u32) -> Result<Vec<RecentEvent>, String> {
    let sql = "SELECT id, ts_ms, user_groups, path, model, status, prompt_tokens, completion_tokens, cached_tokens, \
               reasoning_tokens, incomplete, replica FROM usage_events WHERE user_name = ?1 \
               ORDER BY ts_ms DESC, seq DESC LIMIT ?2";
    let rows = tx.query(sql, &[user.into(), i64::from(limit).into()]).await?;
    rows.iter()
        .map(|row| {
            let [prompt, completion, cached, reasoning] = row.ints(6)?.map(from_sql);
            Ok(RecentEvent {
                id: row.opt_text(0)?,
                ts_ms: row.int(1)?,
                groups: row.text(2)?,
                path: row.text(3)?,
                model: row.text(4)?,
                status: row.opt_int(5)?.and_then(|s| u16::try_from(s).ok()),
                tokens: Tokens { prompt, completion, cached, reasoning },
                incomplete: row.flag(10)?,
                replica: row.text(11)?,
            })
        })
        .collect()
}

/// The columns of `api_keys` that [`api_key`] reads, in its order.
const KEY_COLUMNS: &str =
    "id, sha256, user_name, user_groups, name, created_at_ms, expires_at_ms, revoked_at_ms, last_used_at_ms";

/// Inserts a new key (fails on a taken id or digest).
pub async fn create_key(tx: &impl Tx, key: &ApiKey) -> Result<(), String> {
    let sql = format!("INSERT INTO api_keys ({KEY_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)");
    let params = [
        key.id.as_str().into(),
        key.sha256.as_str().into(),
        key.user.as_str().into(),
        key.groups.as_str().into(),
        key.name.as_deref().into(),
        key.created_at_ms.into(),
        key.expires_at_ms.into(),
        key.revoked_at_ms.into(),
        key.last_used_at_ms.into(),
    ];
    tx.query(&sql, &params).await.map(drop)
}

/// `user`'s keys (or all), newest first, at most `limit`.
pub async fn list_keys(tx: &impl Tx, user: Option<&str>, limit: u32) -> Result<Vec<ApiKey>, String> {
    let order = "ORDER BY created_at_ms DESC, id DESC";
    let rows = match user {
        Some(user) => {
            let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE user_name = ?1 {order} LIMIT ?2");
            tx.query(&sql, &[user.into(), i64::from(limit).into()]).await?
        }
        None => {
            let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys {order} LIMIT ?1");
            tx.query(&sql, &[i64::from(limit).into()]).await?
        }
    };
    rows.iter().map(api_key).collect()
}

/// The key with digest `sha256`, if any.
pub async fn find_key(tx: &impl Tx, sha256: &str) -> Result<Option<ApiKey>, String> {
    let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE sha256 = ?1");
    tx.query(&sql, &[sha256.into()]).await?.first().map(api_key).transpose()
}

/// Sets `last_used_at_ms` (never back: a replica with a slower clock leaves it).
pub async fn touch_key(tx: &impl Tx, id: &str, now_ms: i64) -> Result<(), String> {
    let sql = "UPDATE api_keys SET last_used_at_ms = ?2 \
               WHERE id = ?1 AND (last_used_at_ms IS NULL OR last_used_at_ms < ?2)";
    tx.query(sql, &[id.into(), now_ms.into()]).await.map(drop)
}

/// Revokes a key at `now_ms` unless it was revoked before. In PostgreSQL a concurrent
/// revoke of the same key waits for the row lock and then finds it revoked, so exactly
/// one of them says [`Revoked::Now`].
pub async fn revoke_key(tx: &impl Tx, id: &str, now_ms: i64) -> Result<Revoked, String> {
    let sql = "UPDATE api_keys SET revoked_at_ms = ?2 WHERE id = ?1 AND revoked_at_ms IS NULL RETURNING id";
    if !tx.query(sql, &[id.into(), now_ms.into()]).await?.is_empty() {
        return Ok(Revoked::Now);
    }
    let found = tx.query("SELECT 1 FROM api_keys WHERE id = ?1", &[id.into()]).await?;
    Ok(if found.is_empty() { Revoked::Unknown } else { Revoked::Already })
}

/// Keys revoked after `since_ms`, and keys whose expiry passed in (`since_ms`,
/// `now_ms`] that were not revoked before it (that was reported then), oldest first,
/// at most `limit` (each half served by its index).
pub async fn key_changes(tx: &impl Tx, since_ms: i64, now_ms: i64, limit: u32) -> Result<Vec<KeyChange>, String> {
    let sql = "SELECT sha256, t FROM (\
                 SELECT sha256, revoked_at_ms AS t FROM api_keys WHERE revoked_at_ms > ?1 \
                 UNION ALL \
                 SELECT sha256, expires_at_ms AS t FROM api_keys WHERE expires_at_ms > ?1 AND expires_at_ms <= ?2 \
                   AND (revoked_at_ms IS NULL OR revoked_at_ms > expires_at_ms)\
               ) AS c ORDER BY t, sha256 LIMIT ?3";
    let rows = tx.query(sql, &[since_ms.into(), now_ms.into(), i64::from(limit).into()]).await?;
    rows.iter().map(|row| Ok(KeyChange { sha256: row.text(0)?, at_ms: row.int(1)? })).collect()
}

/// A row of [`KEY_COLUMNS`].
fn api_key(row: &Row) -> Result<ApiKey, String> {
    Ok(ApiKey {
        id: row.text(0)?,
        sha256: row.text(1)?,
        user: row.text(2)?,
        groups: row.text(3)?,
        name: row.opt_text(4)?,
        created_at_ms: row.int(5)?,
        expires_at_ms: row.opt_int(6)?,
        revoked_at_ms: row.opt_int(7)?,
        last_used_at_ms: row.opt_int(8)?,
    })
}

/// Every event id, oldest first.
pub async fn event_ids(tx: &impl Tx) -> Result<Vec<String>, String> {
    let rows = tx.query("SELECT id FROM usage_events WHERE id IS NOT NULL ORDER BY seq", &[]).await?;
    rows.iter().map(|row| row.text(0)).collect()
}

/// The five key columns, in table order.
fn key_values(key: &SeriesKey) -> [Value<'_>; 5] {
    [key.user.as_str(), &key.groups, &key.path, &key.model, &key.denied].map(Value::from)
}

/// The five key columns starting at `first`.
fn key_of(row: &Row, first: usize) -> Result<SeriesKey, String> {
    Ok(SeriesKey {
        user: row.text(first)?,
        groups: row.text(first + 1)?,
        path: row.text(first + 2)?,
        model: row.text(first + 3)?,
        denied: row.text(first + 4)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_rows_join_halves_with_saturation() {
        let row = usage_row(7, 3, [1, 2, 0, 5, 0, 0, i64::MAX, i64::MAX]);
        assert_eq!(row.start_ms, 7);
        assert_eq!(row.totals.requests, 3);
        assert_eq!(row.totals.prompt, (1 << 32) + 2);
        assert_eq!(row.totals.completion, 5);
        assert_eq!(row.totals.reasoning, u64::MAX);
    }
}
