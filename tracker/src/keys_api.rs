//! Managed API keys (issue 16): keys created and revoked at run time, without
//! re-rendering the gateways' configuration.
//!
//! Why here: the tracker already has the durable, shared store (the [`crate::ledger`])
//! and the gateways already talk to it. An admin creates a key for a user and groups;
//! the key is shown once and stored only as its SHA-256. The filter knows keys only by
//! digest: a key that is not in its static list is **resolved by digest**
//! (`POST /v1/keys/resolve`, the request waits for it) and cached by the gateway for
//! `ttl_seconds`, so a resolve is a cache miss, about one per key per TTL per gateway
//! worker, not one per request. A revoked key stops working on every gateway through
//! the **changes feed** (`GET /v1/keys/changes`, polled by the gateways, which drop the
//! digests it lists from their caches) and, at the latest, when the cached entry's TTL
//! runs out.
//!
//! Admin endpoints, behind `Authorization: Bearer <TRACKER_ADMIN_TOKEN>` (compared as
//! its SHA-256 in constant time; without the secret configured they do not exist: 404):
//!
//! - `POST /v1/keys` `{"user", "groups"?, "name"?, "expires_at"?}` → 201 with the key;
//! - `GET /v1/keys?user=U&limit=N` → the keys, newest first, never the key itself and
//!   only the first 8 hex characters of its digest;
//! - `DELETE /v1/keys/{id}` → 204; the row stays, with `revoked_at`.
//!
//! Gateway endpoints, behind the ingest secret of `POST /track` (open when none is set):
//!
//! - `POST /v1/keys/resolve` `{"sha256"}` → 200 `{"id", "user", "groups",
//!   "expires_at"}`, or 404 for an unknown, revoked or expired key alike (no oracle);
//!   a found key's `last_used_at` is set;
//! - `GET /v1/keys/changes?since=<ms>` → the digests of keys revoked or expired since.
//!
//! All of them need a ledger (without one: 404 saying so). Bodies are checked whole
//! (400 naming the field) before anything is written. Neither a key nor a digest is
//! ever logged or used as a metric label.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tollgate_rules::{check_group, check_user, MAX_LABEL_CHARS};

use crate::error::TrackError;
use crate::http;
use crate::ledger::{ApiKey, Ledger, LedgerError, Revoked};
use crate::metrics::Tracker;
use crate::time;
use crate::usage_api::{bearer_matches, Params};

/// Prefix of every key.
pub const KEY_PREFIX: &str = "tgk_";
/// Random bytes of a key (43 base64url characters after the prefix).
pub const KEY_BYTES: usize = 32;
/// Prefix of every key id (followed by 16 hex characters).
pub const ID_PREFIX: &str = "key_";
/// Most groups of one key.
pub const MAX_GROUPS: usize = 64;
/// Longest `name`, and longest user and group names (a label value's limit).
pub const MAX_NAME_CHARS: usize = 128;
/// Latest `expires_at` (Unix seconds): the end of the year 9999, as everywhere in the
/// tracker.
pub const MAX_EXPIRES_AT: i64 = time::MAX_MS / 1000;
/// `GET /v1/keys` without `limit`.
pub const DEFAULT_LIST: u32 = 1_000;
/// Largest `limit` of `GET /v1/keys`.
pub const MAX_LIST: u32 = 10_000;
/// Most changes in one answer of `GET /v1/keys/changes` (`more` says there are more).
pub const MAX_CHANGES: u32 = 10_000;
/// Hex characters of the digest a listing shows.
pub const LISTED_DIGEST_CHARS: usize = 8;

/// The body of `POST /v1/keys`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKeyBody {
    user: String,
    #[serde(default)]
    groups: Option<Vec<String>>,
    #[serde(default)]
    name: Option<String>,
    /// Unix seconds.
    #[serde(default)]
    expires_at: Option<i64>,
}

/// A checked `POST /v1/keys` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewKey {
    pub user: String,
    /// Sorted and de-duplicated.
    pub groups: Vec<String>,
    pub name: Option<String>,
    pub expires_at_ms: Option<i64>,
}

/// Parses and checks a `POST /v1/keys` body against the clock at `now_ms`; the error
/// names the field.
pub fn parse_new_key(body: &[u8], now_ms: i64) -> Result<NewKey, TrackError> {
    let body: NewKeyBody = parse_object(body)?;
    let invalid = |field: &str, why: &str| TrackError::InvalidBody(format!("{field}: {why}"));
    check_user(&body.user).map_err(|why| invalid("user", why))?;
    if body.user.chars().count() > MAX_LABEL_CHARS {
        return Err(invalid("user", &format!("must be at most {MAX_LABEL_CHARS} characters")));
    }
    let mut groups = body.groups.unwrap_or_default();
    if groups.len() > MAX_GROUPS {
        return Err(invalid("groups", &format!("must have at most {MAX_GROUPS} entries, not {}", groups.len())));
    }
    for (i, group) in groups.iter().enumerate() {
        check_group(group).map_err(|why| invalid(&format!("groups[{i}]"), why))?;
        if group.chars().count() > MAX_LABEL_CHARS {
            return Err(invalid(&format!("groups[{i}]"), &format!("must be at most {MAX_LABEL_CHARS} characters")));
        }
    }
    groups.sort_unstable();
    groups.dedup();
    if let Some(name) = &body.name {
        if name.chars().count() > MAX_NAME_CHARS {
            return Err(invalid("name", &format!("must be at most {MAX_NAME_CHARS} characters")));
        }
        if name.chars().any(char::is_control) {
            return Err(invalid("name", "must not contain control characters"));
        }
    }
    let expires_at_ms = match body.expires_at {
        None => None,
        Some(s) if s > MAX_EXPIRES_AT => {
            return Err(invalid("expires_at", &format!("must be at most {MAX_EXPIRES_AT} (the end of the year 9999)")));
        }
        Some(s) if s.saturating_mul(1000) <= now_ms => {
            return Err(invalid(
                "expires_at",
                &format!("must be in the future (Unix seconds; the tracker's clock is at {})", now_ms / 1000),
            ));
        }
        Some(s) => Some(s * 1000),
    };
    Ok(NewKey { user: body.user, groups, name: body.name, expires_at_ms })
}

/// The body of `POST /v1/keys/resolve`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResolveBody {
    sha256: String,
}

/// Parses a resolve body: the digest, 64 lowercase hex characters.
pub fn parse_resolve(body: &[u8]) -> Result<String, TrackError> {
    let body: ResolveBody = parse_object(body)?;
    let hex = body.sha256.len() == 64 && body.sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !hex {
        return Err(TrackError::InvalidBody(
            "sha256: must be 64 lowercase hex characters (the SHA-256 of the key)".into(),
        ));
    }
    Ok(body.sha256)
}

/// A JSON object body ([`http::parse_json`]; serde would also take a struct from an
/// array of its fields, which no client means).
fn parse_object<T: DeserializeOwned>(body: &[u8]) -> Result<T, TrackError> {
    let value = http::parse_json(body)?;
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(TrackError::InvalidBody("body: must be a JSON object".into()));
    }
    Ok(value)
}

/// Lowercase hex.
fn hex(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(text, "{b:02x}");
    }
    text
}

/// Lowercase hex SHA-256 of a key, as stored.
pub fn digest(key: &str) -> String {
    hex(&Sha256::digest(key.as_bytes()))
}

/// A new key and its id, from the OS's random number generator.
fn generate() -> Result<(String, String), TrackError> {
    let mut secret = [0u8; KEY_BYTES];
    let mut id = [0u8; 8];
    getrandom::getrandom(&mut secret)
        .and_then(|()| getrandom::getrandom(&mut id))
        .map_err(|e| TrackError::Internal(format!("no random numbers from the operating system: {e}")))?;
    Ok((format!("{KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(secret)), format!("{ID_PREFIX}{}", hex(&id))))
}

/// The groups as stored and as listed.
fn join_groups(groups: &[String]) -> String {
    groups.join(",")
}

fn split_groups(groups: &str) -> Vec<&str> {
    groups.split(',').filter(|g| !g.is_empty()).collect()
}

/// Milliseconds as Unix seconds.
fn seconds(ms: i64) -> i64 {
    ms.div_euclid(1000)
}

/// The ledger, if the request may use the admin endpoints: 404 when no admin secret is
/// configured (the endpoints do not exist), 401 on a missing or wrong secret, 404
/// without a ledger.
fn admin(tracker: &Tracker, headers: &HeaderMap, method: &Method, uri: &Uri) -> Result<Arc<Ledger>, TrackError> {
    let Some(expected) = tracker.admin_token_digest() else {
        return Err(TrackError::NotFound(format!("no route for {method} {}", uri.path())));
    };
    if !bearer_matches(headers, expected) {
        return Err(TrackError::Unauthorized(
            "missing or wrong bearer token: send Authorization: Bearer <the tracker's TRACKER_ADMIN_TOKEN>".into(),
        ));
    }
    needs_ledger(tracker)
}

/// The ledger, if a gateway may ask: the ingest secret as for `/track` (401 without it
/// when one is configured), 404 without a ledger.
fn gateway(tracker: &Tracker, headers: &HeaderMap) -> Result<Arc<Ledger>, TrackError> {
    if let Some(refused) = http::ingest_refusal(tracker, headers) {
        return Err(refused);
    }
    needs_ledger(tracker)
}

fn needs_ledger(tracker: &Tracker) -> Result<Arc<Ledger>, TrackError> {
    tracker.ledger().cloned().ok_or_else(|| {
        TrackError::NotFound(
            "managed API keys need the ledger: start the tracker with --data-dir or --database-url".into(),
        )
    })
}

fn failed(tracker: &Tracker, op: &'static str, error: &LedgerError) -> TrackError {
    tracker.ledger_error(op);
    eprintln!("usage-tracking: keys: {error}");
    TrackError::Unavailable(error.to_string())
}

/// `POST /v1/keys`: checks the body whole, then stores the key's digest (committed
/// before the 201) and answers the key, once.
pub async fn create(
    State(tracker): State<Arc<Tracker>>,
    method: Method,
    uri: Uri,
    request: Request,
) -> Result<Response, TrackError> {
    let ledger = admin(&tracker, request.headers(), &method, &uri)?;
    let now_ms = time::now_ms();
    let new = http::body_of(request).await.and_then(|body| parse_new_key(&body, now_ms))?;
    let (key, id) = generate()?;
    let sha256 = digest(&key);
    let stored = ApiKey {
        id: id.clone(),
        sha256: sha256.clone(),
        user: new.user.clone(),
        groups: join_groups(&new.groups),
        name: new.name.clone(),
        created_at_ms: now_ms,
        expires_at_ms: new.expires_at_ms,
        revoked_at_ms: None,
        last_used_at_ms: None,
    };
    // Its own task, so a client that hangs up cannot cancel it between the commit and
    // the counting.
    let counting = Arc::clone(&tracker);
    let task = tokio::spawn(async move {
        ledger.create_key(stored).await.map_err(|e| failed(&counting, "write", &e))?;
        counting.count_key_created();
        Ok::<(), TrackError>(())
    });
    task.await.map_err(|e| TrackError::Internal(format!("key task failed: {e}")))??;
    let answer = json!({
        "id": id,
        "key": key,
        "sha256": sha256,
        "user": new.user,
        "groups": new.groups,
        "name": new.name,
        "created_at": seconds(now_ms),
        "expires_at": new.expires_at_ms.map(seconds),
    });
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

/// `GET /v1/keys?user=U&limit=N`
pub async fn list(
    State(tracker): State<Arc<Tracker>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, TrackError> {
    let ledger = admin(&tracker, &headers, &method, &uri)?;
    let params = Params::parse(query.as_deref(), &["user", "limit"])?;
    let user = match params.get("user")? {
        Some("") => return Err(TrackError::BadQuery("user: must not be empty".into())),
        user => user,
    };
    let limit = match params.get("limit")? {
        None => DEFAULT_LIST,
        Some(text) => text.parse::<u32>().ok().filter(|n| (1..=MAX_LIST).contains(n)).ok_or_else(|| {
            TrackError::BadQuery(format!("limit: expected an integer from 1 to {MAX_LIST}, got {text:?}"))
        })?,
    };
    let keys = ledger.list_keys(user, limit).await.map_err(|e| failed(&tracker, "read", &e))?;
    let keys: Vec<Value> = keys
        .iter()
        .map(|k| {
            json!({
                "id": k.id,
                "user": k.user,
                "groups": split_groups(&k.groups),
                "name": k.name,
                "created_at": seconds(k.created_at_ms),
                "expires_at": k.expires_at_ms.map(seconds),
                "revoked_at": k.revoked_at_ms.map(seconds),
                "last_used_at": k.last_used_at_ms.map(seconds),
                "sha256_prefix": k.sha256.get(..LISTED_DIGEST_CHARS).unwrap_or(""),
            })
        })
        .collect();
    Ok(Json(json!({"keys": keys})))
}

/// `DELETE /v1/keys/{id}`: 204 (again for a key revoked before), 404 for an unknown id.
pub async fn revoke(
    State(tracker): State<Arc<Tracker>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, TrackError> {
    let ledger = admin(&tracker, &headers, &method, &uri)?;
    let Ok(Path(id)) = id else {
        return Err(TrackError::NotFound(format!("no key {:?}", uri.path())));
    };
    let counting = Arc::clone(&tracker);
    let task = tokio::spawn(async move {
        let revoked = ledger.revoke_key(&id).await.map_err(|e| failed(&counting, "write", &e))?;
        match revoked {
            Revoked::Now => counting.count_key_revoked(),
            Revoked::Already => {}
            Revoked::Unknown => return Err(TrackError::NotFound(format!("no key has the id {id:?}"))),
        }
        Ok(StatusCode::NO_CONTENT)
    });
    task.await.map_err(|e| TrackError::Internal(format!("key task failed: {e}")))?
}

/// `POST /v1/keys/resolve`: a gateway's cache miss. 200 for a key that exists, is not
/// revoked and has not expired at the tracker's clock (its `last_used_at` is set);
/// 404, one answer for all three, otherwise.
pub async fn resolve(State(tracker): State<Arc<Tracker>>, request: Request) -> Result<Json<Value>, TrackError> {
    let ledger = gateway(&tracker, request.headers())?;
    let sha256 = http::body_of(request).await.and_then(|body| parse_resolve(&body))?;
    let found = ledger.find_key(&sha256).await.map_err(|e| failed(&tracker, "read", &e))?;
    let now_ms = time::now_ms();
    let valid = found.filter(|k| k.revoked_at_ms.is_none() && k.expires_at_ms.is_none_or(|at| now_ms < at));
    let Some(key) = valid else {
        tracker.count_key_resolve("unknown");
        return Err(TrackError::NotFound("unknown, revoked or expired key".into()));
    };
    tracker.count_key_resolve("found");
    // Written after the answer (a gateway's request waits for it; a durable write would
    // add milliseconds). Not a reason to refuse the key: a failure is counted and logged.
    let (touching, id, counting) = (Arc::clone(&ledger), key.id.clone(), Arc::clone(&tracker));
    tokio::spawn(async move {
        if let Err(error) = touching.touch_key(&id, now_ms).await {
            counting.ledger_error("write");
            eprintln!("usage-tracking: keys: last_used_at not recorded: {error}");
        }
    });
    Ok(Json(json!({
        "id": key.id,
        "user": key.user,
        "groups": split_groups(&key.groups),
        "expires_at": key.expires_at_ms.map(seconds),
    })))
}

/// `GET /v1/keys/changes?since=<unix ms>`: the digests of keys revoked after `since`
/// and of keys whose expiry passed in (`since`, `now`], oldest first, at most
/// [`MAX_CHANGES`]. Ask again with `since` = the answer's `now`; when `more` is true,
/// right away.
pub async fn changes(
    State(tracker): State<Arc<Tracker>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, TrackError> {
    let ledger = gateway(&tracker, &headers)?;
    let params = Params::parse(query.as_deref(), &["since"])?;
    let Some(text) = params.get("since")? else {
        return Err(TrackError::BadQuery("since: required (Unix milliseconds)".into()));
    };
    let since = text.parse::<i64>().ok().filter(|ms| (0..=time::MAX_MS).contains(ms)).ok_or_else(|| {
        TrackError::BadQuery(format!("since: expected Unix milliseconds from 0 to {}, got {text:?}", time::MAX_MS))
    })?;
    let now_ms = time::now_ms();
    let mut rows =
        ledger.key_changes(since, now_ms, MAX_CHANGES + 1).await.map_err(|e| failed(&tracker, "read", &e))?;
    let more = rows.len() > MAX_CHANGES as usize;
    rows.truncate(MAX_CHANGES as usize);
    let next = match rows.last() {
        // Cut: continue from the last change given; one ms earlier, so changes of that
        // same ms that did not fit are not skipped (the ones given come again: harmless).
        Some(last) if more => {
            if last.at_ms - 1 > since {
                last.at_ms - 1
            } else {
                last.at_ms
            }
        }
        _ => now_ms,
    };
    let mut seen = std::collections::HashSet::with_capacity(rows.len());
    let revoked: Vec<&str> = rows.iter().map(|c| c.sha256.as_str()).filter(|d| seen.insert(*d)).collect();
    Ok(Json(json!({"now": next, "revoked": revoked, "more": more})))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_764_000_000_000;

    #[test]
    fn keys_and_digests() {
        let (key, id) = generate().unwrap();
        assert!(key.starts_with(KEY_PREFIX) && key.len() == KEY_PREFIX.len() + 43, "{key}");
        assert!(key.bytes().skip(4).all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "{key}");
        assert!(id.starts_with(ID_PREFIX) && id.len() == ID_PREFIX.len() + 16, "{id}");
        assert_ne!(generate().unwrap(), (key, id));
        assert_eq!(digest("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn good_new_keys() {
        let key = parse_new_key(br#"{"user":"alice","groups":["premium","free","premium"]}"#, NOW).unwrap();
        let want = NewKey {
            user: "alice".into(),
            groups: vec!["free".into(), "premium".into()],
            name: None,
            expires_at_ms: None,
        };
        assert_eq!(key, want);
        let body = format!(r#"{{"user":"bob","name":"ci bot","expires_at":{},"groups":null}}"#, NOW / 1000 + 1);
        let key = parse_new_key(body.as_bytes(), NOW).unwrap();
        assert_eq!((key.name.as_deref(), key.expires_at_ms, key.groups.len()), (Some("ci bot"), Some(NOW + 1000), 0));
        let body = format!(r#"{{"user":"bob","expires_at":{MAX_EXPIRES_AT}}}"#);
        assert_eq!(parse_new_key(body.as_bytes(), NOW).unwrap().expires_at_ms, Some(253_402_300_799_000));
    }

    /// Table: one bad field each → 400 naming it.
    #[test]
    fn bad_new_keys_name_the_field() {
        let many: Vec<String> = (0..=MAX_GROUPS).map(|i| format!("g{i}")).collect();
        let long = "x".repeat(129);
        let cases: Vec<(Value, &str)> = vec![
            (json!({"groups": []}), "body: missing field `user`"),
            (json!({"user": ""}), "user: must not be empty"),
            (json!({"user": " alice"}), "user: must not start or end with whitespace"),
            (json!({"user": "a,b"}), "user: must not contain commas"),
            (json!({"user": "a\nb"}), "user: must not contain control characters"),
            (json!({"user": long}), "user: must be at most 128 characters"),
            (json!({"user": 7}), "user: invalid type: integer `7`, expected a string"),
            (
                json!({"user": "a", "groups": "premium"}),
                "groups: invalid type: string \"premium\", expected a sequence",
            ),
            (json!({"user": "a", "groups": many}), "groups: must have at most 64 entries, not 65"),
            (json!({"user": "a", "groups": ["ok", ""]}), "groups[1]: must not be empty"),
            (json!({"user": "a", "groups": ["a b"]}), "groups[0]: must not contain commas, whitespace or control"),
            (json!({"user": "a", "groups": ["ok", long]}), "groups[1]: must be at most 128 characters"),
            (json!({"user": "a", "groups": [1]}), "groups[0]: invalid type: integer `1`, expected a string"),
            (json!({"user": "a", "name": long}), "name: must be at most 128 characters"),
            (json!({"user": "a", "name": "a\u{7}"}), "name: must not contain control characters"),
            (json!({"user": "a", "expires_at": NOW / 1000}), "expires_at: must be in the future"),
            (json!({"user": "a", "expires_at": 5}), "expires_at: must be in the future"),
            (json!({"user": "a", "expires_at": MAX_EXPIRES_AT + 1}), "expires_at: must be at most 253402300799"),
            (json!({"user": "a", "expires_at": 1.5}), "expires_at: invalid type: floating point `1.5`"),
            (json!({"user": "a", "expires_at": "soon"}), "expires_at: invalid type: string \"soon\""),
            (json!({"user": "a", "key": "tgk_mine"}), "key: unknown field `key`"),
            (json!(["a"]), "body: must be a JSON object"),
            (json!("a"), "body: invalid type: string \"a\", expected struct"),
        ];
        for (body, message) in cases {
            let error = parse_new_key(body.to_string().as_bytes(), NOW).unwrap_err();
            assert_eq!(error.status(), 400, "{body}");
            assert!(error.message().starts_with(message), "{body}: {}", error.message());
        }
        let error = parse_new_key(b"{\"user\":", NOW).unwrap_err();
        assert_eq!((error.status(), error.message().starts_with("body is not valid JSON")), (400, true));
    }

    #[test]
    fn resolve_bodies() {
        let good = "a".repeat(64);
        assert_eq!(parse_resolve(json!({"sha256": good}).to_string().as_bytes()).unwrap(), good);
        let message = "sha256: must be 64 lowercase hex characters (the SHA-256 of the key)";
        for bad in
            [json!({"sha256": "A".repeat(64)}), json!({"sha256": "a".repeat(63)}), json!({"sha256": "g".repeat(64)})]
        {
            assert_eq!(
                parse_resolve(bad.to_string().as_bytes()),
                Err(TrackError::InvalidBody(message.into())),
                "{bad}"
            );
        }
        for (bad, message) in [
            (json!({}), "body: missing field `sha256`"),
            (json!({"sha256": good, "key": "x"}), "key: unknown field `key`"),
            (json!({"sha256": 1}), "sha256: invalid type: integer `1`"),
        ] {
            let error = parse_resolve(bad.to_string().as_bytes()).unwrap_err();
            assert!(error.message().starts_with(message), "{bad}: {}", error.message());
        }
    }
}
