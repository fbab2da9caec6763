//! The usage API: what the ledger knows, for billing and quota tools that should not
//! have to scrape Prometheus (whose counters are per replica and whose history is
//! whatever it kept).
//!
//! - `GET /v1/usage?user=U&since=T&until=T&bucket=hour|day`: per-bucket totals.
//! - `GET /v1/usage/recent?user=U&limit=N`: the user's latest events.
//! - `GET /v1/usage/breakdown?by=user|model|reason&since=T&until=T[&user=U]`: totals
//!   per user, per model (of one user with `user`) or per deny reason, over the whole
//!   ledger (compacted days included), so a report per model needs no event listing.
//!
//! Both need `Authorization: Bearer <TRACKER_API_TOKEN>`. The secret is compared as its
//! SHA-256 in constant time (`subtle`), so neither its bytes nor its length leak through
//! timing. Without the secret configured the endpoints do not exist (404, like any
//! unknown path): usage data is never served unauthenticated by accident.
//!
//! Parameters are checked strictly (unknown or repeated parameters, bad times, empty or
//! reversed ranges, too many buckets are 400) because a silently ignored typo in a
//! billing query gives a wrong answer that looks right. A user the ledger has never
//! seen is 404, which tells a misspelt name from a user who used nothing in the range.

use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, Uri};
use axum::Json;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::TrackError;
use crate::labels::MAX_LABEL_CHARS;
use crate::ledger::{Dimension, Ledger, LedgerError, Scope, Totals};
use crate::metrics::Tracker;
use crate::time::{self, DAY_MS, HOUR_MS};

/// Most buckets one `/v1/usage` answer may have (417 days of hours, 27 years of days).
pub const MAX_BUCKETS: i64 = 10_000;
/// `/v1/usage/recent` without `limit`.
pub const DEFAULT_RECENT: u32 = 50;
/// Largest `limit` of `/v1/usage/recent`.
pub const MAX_RECENT: u32 = 1_000;

/// `GET /v1/usage`
pub async fn usage(
    State(tracker): State<Arc<Tracker>>,
    headers: HeaderMap,
    uri: Uri,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, TrackError> {
    let ledger = authorize(&tracker, &headers, &uri)?;
    let params = Params::parse(query.as_deref(), &["user", "since", "until", "bucket"])?;
    let user = params.user()?;
    let (bucket, width) = match params.get("bucket")? {
        None | Some("day") => ("day", DAY_MS),
        Some("hour") => ("hour", HOUR_MS),
        Some(other) => return Err(TrackError::BadQuery(format!("bucket: expected hour or day, got {other:?}"))),
    };
    // Default range: the last day of hours, or the last 30 days.
    let (since, until) = params.range(if width == HOUR_MS { DAY_MS } else { 30 * DAY_MS })?;
    let buckets = (time::floor(until - 1, width) - time::floor(since, width)) / width + 1;
    if buckets > MAX_BUCKETS {
        return Err(TrackError::BadQuery(format!(
            "the range spans {buckets} {bucket} buckets, more than {MAX_BUCKETS}; narrow it or use a larger bucket"
        )));
    }
    known_user(&tracker, &ledger, user).await?;
    let rows = ledger.usage(user, since, until, width).await.map_err(|e| read_failed(&tracker, &e))?;
    let mut total = Totals::default();
    let buckets: Vec<Value> = rows
        .iter()
        .map(|row| {
            total.add(&row.totals);
            let mut value = counts(&row.totals);
            if let Some(object) = value.as_object_mut() {
                object.insert("start".into(), json!(time::format_rfc3339(row.start_ms)));
            }
            value
        })
        .collect();
    Ok(Json(json!({
        "user": user,
        "bucket": bucket,
        "since": time::format_rfc3339(since),
        "until": time::format_rfc3339(until),
        "buckets": buckets,
        "total": counts(&total),
    })))
}

/// `GET /v1/usage/breakdown`
pub async fn breakdown(
    State(tracker): State<Arc<Tracker>>,
    headers: HeaderMap,
    uri: Uri,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, TrackError> {
    let ledger = authorize(&tracker, &headers, &uri)?;
    let params = Params::parse(query.as_deref(), &["by", "user", "since", "until"])?;
    let (by_name, by) = match params.get("by")? {
        Some("user") => ("user", Dimension::User),
        Some("model") => ("model", Dimension::Model),
        Some("reason") => ("reason", Dimension::Reason),
        Some(other) => return Err(TrackError::BadQuery(format!("by: expected user, model or reason, got {other:?}"))),
        None => return Err(TrackError::BadQuery("by: required (user, model or reason)".into())),
    };
    let user = if params.get("user")?.is_some() { Some(params.user()?) } else { None };
    let scope = match (by, user) {
        (Dimension::Reason, Some(_)) => {
            return Err(TrackError::BadQuery("user: denied requests have no user (by=reason takes no user)".into()))
        }
        (Dimension::User, Some(_)) => {
            return Err(TrackError::BadQuery("user: by=user of one user is /v1/usage".into()))
        }
        (Dimension::Reason, None) => Scope::Denied,
        (_, Some(user)) => Scope::User(user.to_owned()),
        (_, None) => Scope::Authorized,
    };
    let (since, until) = params.range(30 * DAY_MS)?;
    if let Some(user) = user {
        known_user(&tracker, &ledger, user).await?;
    }
    let rows = ledger.breakdown(scope, since, until, by).await.map_err(|e| read_failed(&tracker, &e))?;
    let mut total = Totals::default();
    let rows: Vec<Value> = rows
        .iter()
        .map(|(key, totals)| {
            total.add(totals);
            let mut value = counts(totals);
            if let Some(object) = value.as_object_mut() {
                // An event without a model has none (null, as in /v1/usage/recent).
                object.insert(by_name.into(), json!((!key.is_empty()).then_some(key)));
            }
            value
        })
        .collect();
    Ok(Json(json!({
        "by": by_name,
        "user": user,
        "since": time::format_rfc3339(since),
        "until": time::format_rfc3339(until),
        "rows": rows,
        "total": counts(&total),
    })))
}

/// `GET /v1/usage/recent`
pub async fn recent(
    State(tracker): State<Arc<Tracker>>,
    headers: HeaderMap,
    uri: Uri,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, TrackError> {
    let ledger = authorize(&tracker, &headers, &uri)?;
    let params = Params::parse(query.as_deref(), &["user", "limit"])?;
    let user = params.user()?;
    let limit = match params.get("limit")? {
        None => DEFAULT_RECENT,
        Some(text) => text.parse::<u32>().ok().filter(|n| (1..=MAX_RECENT).contains(n)).ok_or_else(|| {
            TrackError::BadQuery(format!("limit: expected an integer from 1 to {MAX_RECENT}, got {text:?}"))
        })?,
    };
    known_user(&tracker, &ledger, user).await?;
    let events = ledger.recent(user, limit).await.map_err(|e| read_failed(&tracker, &e))?;
    let events: Vec<Value> = events
        .iter()
        .map(|e| {
            json!({
                "id": e.id,
                "ts": time::format_rfc3339(e.ts_ms),
                "groups": e.groups,
                "path": e.path,
                "model": (!e.model.is_empty()).then_some(&e.model),
                "status": e.status,
                "prompt_tokens": e.tokens.prompt,
                "completion_tokens": e.tokens.completion,
                "cached_tokens": e.tokens.cached,
                "reasoning_tokens": e.tokens.reasoning,
                "incomplete": e.incomplete,
                "replica": e.replica,
            })
        })
        .collect();
    Ok(Json(json!({"user": user, "events": events})))
}

/// The five counts a usage answer shows.
fn counts(t: &Totals) -> Value {
    json!({
        "requests": t.requests,
        "prompt_tokens": t.prompt,
        "completion_tokens": t.completion,
        "cached_tokens": t.cached,
        "reasoning_tokens": t.reasoning,
    })
}

/// The ledger, if the request may use the API: 404 when no secret is configured (the
/// API does not exist), 401 on a missing or wrong secret, 404 without a ledger.
fn authorize(tracker: &Tracker, headers: &HeaderMap, uri: &Uri) -> Result<Arc<Ledger>, TrackError> {
    let Some(expected) = tracker.api_token_digest() else {
        return Err(TrackError::NotFound(format!("no route for GET {}", uri.path())));
    };
    if !bearer_matches(headers, expected) {
        return Err(TrackError::Unauthorized(
            "missing or wrong bearer token: send Authorization: Bearer <the tracker's TRACKER_API_TOKEN>".into(),
        ));
    }
    tracker.ledger().cloned().ok_or_else(|| {
        TrackError::NotFound(
            "the usage API needs the ledger: start the tracker with --data-dir or --database-url".into(),
        )
    })
}

/// Whether the request's `Authorization: Bearer <token>` holds the secret whose SHA-256
/// is `expected`, compared in constant time (neither the bytes nor the length of the
/// secret leak through timing).
pub fn bearer_matches(headers: &HeaderMap, expected: &[u8; 32]) -> bool {
    let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(bearer);
    given.is_some_and(|token| token_matches(token, expected))
}

/// Whether `token` is the secret whose SHA-256 is `expected`, in constant time (also
/// the usage page's login).
pub fn token_matches(token: &str, expected: &[u8; 32]) -> bool {
    bool::from(Sha256::digest(token.as_bytes()).as_slice().ct_eq(expected))
}

/// The token of an `Authorization: Bearer <token>` value (scheme case-insensitive).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

async fn known_user(tracker: &Tracker, ledger: &Ledger, user: &str) -> Result<(), TrackError> {
    if ledger.knows_user(user).await.map_err(|e| read_failed(tracker, &e))? {
        Ok(())
    } else {
        Err(TrackError::UnknownUser(format!("no usage was ever recorded for user {user:?}")))
    }
}

fn read_failed(tracker: &Tracker, error: &LedgerError) -> TrackError {
    tracker.ledger_error("read");
    eprintln!("usage-tracking: {error}");
    TrackError::Unavailable(error.to_string())
}

/// Query parameters, checked against the names an endpoint takes (also the keys API's).
pub(crate) struct Params(Vec<(String, String)>);

impl Params {
    pub(crate) fn parse(query: Option<&str>, allowed: &[&str]) -> Result<Params, TrackError> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or(""))
            .map_err(|e| TrackError::BadQuery(format!("query string: {e}")))?;
        for (name, _) in &pairs {
            if !allowed.contains(&name.as_str()) {
                return Err(TrackError::BadQuery(format!(
                    "unknown parameter {name:?} (this endpoint takes {})",
                    allowed.join(", ")
                )));
            }
        }
        Ok(Params(pairs))
    }

    /// The value of `name`, if given once; given twice is an error (which one counts?).
    pub(crate) fn get(&self, name: &str) -> Result<Option<&str>, TrackError> {
        let mut values = self.0.iter().filter(|(n, _)| n == name).map(|(_, v)| v.as_str());
        match (values.next(), values.next()) {
            (first, None) => Ok(first),
            (Some(_), Some(_)) => Err(TrackError::BadQuery(format!("{name}: given more than once"))),
            (None, Some(_)) => Ok(None), // cannot happen
        }
    }

    /// `since` and `until` (RFC 3339 or Unix seconds): `until` defaults to now, `since`
    /// to `default_span_ms` before it; an empty or reversed range is refused.
    fn range(&self, default_span_ms: i64) -> Result<(i64, i64), TrackError> {
        let time = |name: &str| -> Result<Option<i64>, TrackError> {
            self.get(name)?
                .map(|t| time::parse_time(t).map_err(|e| TrackError::BadQuery(format!("{name}: {e}"))))
                .transpose()
        };
        let until = time("until")?.unwrap_or_else(time::now_ms);
        let since = time("since")?.unwrap_or_else(|| until.saturating_sub(default_span_ms).max(time::MIN_MS));
        if since >= until {
            return Err(TrackError::BadQuery(format!(
                "since ({}) must be before until ({})",
                time::format_rfc3339(since),
                time::format_rfc3339(until)
            )));
        }
        Ok((since, until))
    }

    /// `user`: required, not blank, at most [`MAX_LABEL_CHARS`] characters (longer
    /// names are stored cut, so they could never match). Matched exactly as stored
    /// (trimmed).
    fn user(&self) -> Result<&str, TrackError> {
        let user = self.get("user")?.map(str::trim).unwrap_or("");
        if user.is_empty() {
            return Err(TrackError::BadQuery("user: required".into()));
        }
        if user.chars().count() > MAX_LABEL_CHARS {
            return Err(TrackError::BadQuery(format!("user: longer than {MAX_LABEL_CHARS} characters")));
        }
        // As stored: a name no event could have is refused (not "never seen").
        crate::labels::user(user).map_err(|why| TrackError::BadQuery(format!("user: {why}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens() {
        let cases = [
            ("Bearer abc", Some("abc")),
            ("bearer  abc ", Some("abc")),
            ("BEARER abc", Some("abc")),
            ("Basic abc", None),
            ("Bearer", None),
            ("Bearer ", None),
            ("abc", None),
        ];
        for (value, want) in cases {
            assert_eq!(bearer(value), want, "{value:?}");
        }
    }

    #[test]
    fn params() {
        let p = Params::parse(Some("user=a%20b&limit=3"), &["user", "limit"]).unwrap();
        assert_eq!(p.user().unwrap(), "a b");
        assert_eq!(p.get("limit").unwrap(), Some("3"));
        let cases = [
            ("user=a&user=b", "user: given more than once"),
            ("usr=a", "unknown parameter \"usr\" (this endpoint takes user, limit)"),
            ("user=", "user: required"),
            ("user=%20", "user: required"),
            ("user=a%00b", "user: must not contain control characters"),
            ("user=a%0Ab", "user: must not contain control characters"),
        ];
        for (query, message) in cases {
            let error = Params::parse(Some(query), &["user", "limit"]).and_then(|p| p.user().map(|_| ()));
            assert_eq!(error, Err(TrackError::BadQuery(message.into())), "{query}");
        }
    }
}
