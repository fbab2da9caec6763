//! Client of the tracker's keys API (managed API keys, issue 16; tracker/README.md
//! "Managed API keys"): create a key for a user, list keys, revoke one. Every call
//! carries the tracker's admin secret (`TRACKER_ADMIN_TOKEN`) as a bearer token.
//! `tollgate key create/list/revoke` and the end-to-end tests use it.
//!
//! A failed call is a [`TrackerError`] (inside the `anyhow::Error`, for `downcast_ref`)
//! carrying the HTTP status and the tracker's own message.

use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use reqwest::blocking::{Client, Response};
use reqwest::Url;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `POST /v1/keys`'s body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NewKey {
    pub user: String,
    pub groups: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Unix seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

/// `POST /v1/keys`'s 201 answer: the only time the key itself is shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedKey {
    pub id: String,
    pub key: String,
    /// Lowercase hex SHA-256 of `key` (what the gateway resolves).
    pub sha256: String,
    pub user: String,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub name: Option<String>,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds.
    #[serde(default)]
    pub expires_at: Option<u64>,
}

/// A keys API call the tracker refused or could not answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackerError {
    /// What was asked (`POST /v1/keys`).
    pub request: String,
    /// The HTTP status.
    pub status: u16,
    /// The tracker's `error.message`, else the body's text.
    pub message: String,
}

impl std::fmt::Display for TrackerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: the tracker answered {}: {}", self.request, self.status, self.message)?;
        if self.status == 404 && self.message.starts_with("no route for") {
            write!(f, " (the tracker has no TRACKER_ADMIN_TOKEN: its keys API is off)")?;
        }
        Ok(())
    }
}

impl std::error::Error for TrackerError {}

/// The URL of `segments` below the tracker's base URL (each segment percent-encoded;
/// a base URL with a path prefix or a trailing slash works too).
pub fn endpoint(tracker_url: &str, segments: &[&str]) -> anyhow::Result<Url> {
    let mut url = Url::parse(tracker_url).with_context(|| format!("tracker URL {tracker_url:?}"))?;
    if url.cannot_be_a_base() || !matches!(url.scheme(), "http" | "https") {
        bail!("tracker URL {tracker_url:?}: expected http://host:port");
    }
    url.set_query(None);
    url.set_fragment(None);
    {
        let mut path = url.path_segments_mut().map_err(|()| anyhow!("tracker URL {tracker_url:?}: no path"))?;
        path.pop_if_empty();
        path.extend(segments);
    }
    Ok(url)
}

/// `GET /v1/keys`'s URL, for one user or everyone.
pub fn list_url(tracker_url: &str, user: Option<&str>) -> anyhow::Result<Url> {
    let mut url = endpoint(tracker_url, &["v1", "keys"])?;
    if let Some(user) = user {
        url.query_pairs_mut().append_pair("user", user);
    }
    Ok(url)
}

/// The tracker's message in an error body (`{"error": {"message": …}}`), else the text.
pub fn error_message(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v.pointer("/error/message").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| {
            let text = body.trim();
            if text.is_empty() {
                "(no body)".to_string()
            } else {
                text.chars().take(500).collect()
            }
        })
}

/// What a request that got no answer says.
fn unreachable(request: &str) -> String {
    format!("{request}: no answer (is the tracker running there? --tracker URL)")
}

fn client() -> anyhow::Result<Client> {
    Ok(Client::builder().timeout(Duration::from_secs(10)).build()?)
}

fn check_token(admin_token: &str) -> anyhow::Result<()> {
    if admin_token.trim().is_empty() {
        bail!("no admin secret: set TRACKER_ADMIN_TOKEN to the tracker's (`tollgate up` prints it)");
    }
    Ok(())
}

/// The response if its status is `want`, else a [`TrackerError`].
fn expect(request: String, response: Response, want: u16) -> anyhow::Result<Response> {
    let status = response.status().as_u16();
    if status == want {
        return Ok(response);
    }
    let body = response.text().unwrap_or_default();
    Err(TrackerError { request, status, message: error_message(&body) }.into())
}

/// `POST /v1/keys`: creates a key; the answer holds the key, shown this once.
pub fn create_key(tracker_url: &str, admin_token: &str, new: &NewKey) -> anyhow::Result<CreatedKey> {
    check_token(admin_token)?;
    let url = endpoint(tracker_url, &["v1", "keys"])?;
    let request = format!("POST {url}");
    let response =
        client()?.post(url).bearer_auth(admin_token).json(new).send().with_context(|| unreachable(&request))?;
    let response = expect(request.clone(), response, 201)?;
    let text = response.text().with_context(|| request.clone())?;
    serde_json::from_str(&text).with_context(|| format!("{request}: unexpected answer {text}"))
}

/// `GET /v1/keys[?user=U]`: the keys (never the key itself), newest first.
pub fn list_keys(tracker_url: &str, admin_token: &str, user: Option<&str>) -> anyhow::Result<Vec<Value>> {
    check_token(admin_token)?;
    let url = list_url(tracker_url, user)?;
    let request = format!("GET {url}");
    let response = client()?.get(url).bearer_auth(admin_token).send().with_context(|| unreachable(&request))?;
    let response = expect(request.clone(), response, 200)?;
    let text = response.text().with_context(|| request.clone())?;
    parse_list(&text).with_context(|| format!("{request}: unexpected answer {text}"))
}

/// The `keys` of a `GET /v1/keys` answer.
pub fn parse_list(text: &str) -> anyhow::Result<Vec<Value>> {
    #[derive(Deserialize)]
    struct Keys {
        keys: Vec<Value>,
    }
    Ok(serde_json::from_str::<Keys>(text)?.keys)
}

/// `DELETE /v1/keys/{id}`: revokes a key (again: still 204; an unknown id: 404).
pub fn revoke_key(tracker_url: &str, admin_token: &str, id: &str) -> anyhow::Result<()> {
    check_token(admin_token)?;
    if id.is_empty() {
        bail!("no key id to revoke");
    }
    let url = endpoint(tracker_url, &["v1", "keys", id])?;
    let request = format!("DELETE {url}");
    let response = client()?.delete(url).bearer_auth(admin_token).send().with_context(|| unreachable(&request))?;
    expect(request, response, 204)?;
    Ok(())
}

/// Parses `--expires-in`: `30d`, `12h`, `15m`, `3600s` or plain seconds; at least 1 s.
pub fn parse_expires_in(s: &str) -> anyhow::Result<u64> {
    let secs = crate::dev::parse_ttl(s).map_err(|e| anyhow!("--expires-in: {e}"))?;
    if secs == 0 {
        bail!("--expires-in: must be at least 1s");
    }
    Ok(secs)
}

/// The Unix time `secs` from `now` (overflow is an error, not a wrap).
pub fn expires_at(now: u64, secs: u64) -> anyhow::Result<u64> {
    now.checked_add(secs).ok_or_else(|| anyhow!("--expires-in: too far in the future"))
}

/// Unix seconds now.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A Unix time as `2025-11-22 08:00:00Z` (UTC), for people.
pub fn format_time(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let rest = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z", rest / 3600, rest % 3600 / 60, rest % 60)
}

/// One listed key as a line of `tollgate key list`'s table.
pub fn list_row(key: &Value) -> [String; 8] {
    let text = |field: &str| match key.get(field) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".to_string(),
        Some(other) => other.to_string(),
    };
    let time = |field: &str| key.get(field).and_then(Value::as_u64).map_or_else(|| "-".to_string(), format_time);
    let groups = key
        .get("groups")
        .and_then(Value::as_array)
        .map(|g| g.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(","))
        .filter(|g| !g.is_empty())
        .unwrap_or_else(|| "-".to_string());
    let state = if key.get("revoked_at").is_some_and(|v| !v.is_null()) {
        format!("revoked {}", time("revoked_at"))
    } else if key.get("expires_at").and_then(Value::as_u64).is_some_and(|e| e <= now_secs()) {
        format!("expired {}", time("expires_at"))
    } else {
        "active".to_string()
    };
    [
        text("id"),
        text("user"),
        groups,
        text("name"),
        time("created_at"),
        time("expires_at"),
        state,
        time("last_used_at"),
    ]
}

/// The header of [`list_row`]'s columns.
pub const LIST_HEADER: [&str; 8] = ["ID", "USER", "GROUPS", "NAME", "CREATED", "EXPIRES", "STATE", "LAST USED"];

/// Rows as a table with aligned columns (the last one unpadded).
pub fn table(header: &[&str], rows: &[[String; 8]]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.trim_end().to_string()
    };
    let mut out = vec![line(header.to_vec())];
    out.extend(rows.iter().map(|r| line(r.iter().map(String::as_str).collect())));
    out.join("\n")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
    use super::*;
    use serde_json::json;

    #[test]
    fn expires_in_table() {
        for (s, want) in [("3600s", 3600), ("3600", 3600), ("15m", 900), ("12h", 43_200), ("30d", 2_592_000)] {
            assert_eq!(parse_expires_in(s).unwrap(), want, "{s}");
        }
        for s in ["", "0", "0d", "d", "1y", "-1h", "1.5h", "30 days", "99999999999999999999d"] {
            let e = parse_expires_in(s).expect_err(s).to_string();
            assert!(e.starts_with("--expires-in"), "{s}: {e}");
        }
        assert_eq!(expires_at(1_000, 3600).unwrap(), 4_600);
        assert!(expires_at(u64::MAX - 1, 2).is_err());
    }

    #[test]
    fn request_bodies_leave_out_what_is_not_given() {
        let bare = NewKey { user: "alice".into(), groups: vec![], ..NewKey::default() };
        assert_eq!(serde_json::to_value(&bare).unwrap(), json!({"user": "alice", "groups": []}));
        let full = NewKey {
            user: "alice".into(),
            groups: vec!["free".into(), "beta".into()],
            name: Some("ci bot".into()),
            expires_at: Some(1_767_225_600),
        };
        assert_eq!(
            serde_json::to_value(&full).unwrap(),
            json!({"user": "alice", "groups": ["free", "beta"], "name": "ci bot", "expires_at": 1_767_225_600})
        );
    }

    #[test]
    fn urls_below_the_tracker() {
        for (base, segments, want) in [
            ("http://127.0.0.1:8081", &["v1", "keys"][..], "http://127.0.0.1:8081/v1/keys"),
            ("http://127.0.0.1:8081/", &["v1", "keys"][..], "http://127.0.0.1:8081/v1/keys"),
            ("http://h/tracker/", &["v1", "keys", "key_0a"][..], "http://h/tracker/v1/keys/key_0a"),
            ("http://h", &["v1", "keys", "a/b c?"][..], "http://h/v1/keys/a%2Fb%20c%3F"),
        ] {
            assert_eq!(endpoint(base, segments).unwrap().as_str(), want, "{base} {segments:?}");
        }
        assert_eq!(list_url("http://h:1", None).unwrap().as_str(), "http://h:1/v1/keys");
        assert_eq!(list_url("http://h:1", Some("a&b c")).unwrap().as_str(), "http://h:1/v1/keys?user=a%26b+c");
        for bad in ["127.0.0.1:8081", "localhost", "ftp://h", ""] {
            assert!(endpoint(bad, &["v1"]).is_err(), "{bad}");
        }
    }

    #[test]
    fn answers_and_errors() {
        let created: CreatedKey = serde_json::from_value(json!({
            "id": "key_3f2a9c01d4e5b6a7", "key": "tgk_x", "sha256": "ab", "user": "alice",
            "groups": ["premium"], "name": null, "created_at": 1_764_482_400u64, "expires_at": null}))
        .unwrap();
        assert_eq!((created.id.as_str(), created.name, created.expires_at), ("key_3f2a9c01d4e5b6a7", None, None));
        let keys = parse_list(r#"{"keys": [{"id": "key_1"}, {"id": "key_2"}]}"#).unwrap();
        assert_eq!(keys.len(), 2);
        assert!(parse_list(r#"{"nope": []}"#).is_err());

        let body = r#"{"error": {"message": "groups[2]: must not be empty", "type": "invalid_request_error"}}"#;
        assert_eq!(error_message(body), "groups[2]: must not be empty");
        assert_eq!(error_message("  gateway timeout \n"), "gateway timeout");
        assert_eq!(error_message(""), "(no body)");
        let e = TrackerError {
            request: "POST http://h/v1/keys".into(),
            status: 404,
            message: "no route for POST /v1/keys".into(),
        };
        assert!(e.to_string().contains("answered 404: no route") && e.to_string().contains("keys API is off"), "{e}");
        let e = TrackerError { request: "GET http://h/v1/keys".into(), status: 401, message: "bad secret".into() };
        assert_eq!(e.to_string(), "GET http://h/v1/keys: the tracker answered 401: bad secret");
        let e = anyhow::Error::from(e);
        assert_eq!(e.downcast_ref::<TrackerError>().unwrap().status, 401);
        assert!(check_token(" ").is_err());
    }

    #[test]
    fn times_and_rows_for_people() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00Z");
        assert_eq!(format_time(951_782_400), "2000-02-29 00:00:00Z");
        assert_eq!(format_time(1_764_482_405), "2025-11-30 06:00:05Z");
        assert_eq!(format_time(253_402_300_799), "9999-12-31 23:59:59Z");
        let row = list_row(&json!({"id": "key_1", "user": "alice", "groups": ["a", "b"], "name": null,
                                   "created_at": 0, "expires_at": null, "revoked_at": 60, "last_used_at": null}));
        assert_eq!(
            row,
            ["key_1", "alice", "a,b", "-", "1970-01-01 00:00:00Z", "-", "revoked 1970-01-01 00:01:00Z", "-"]
                .map(String::from)
        );
        assert_eq!(list_row(&json!({"id": "k", "expires_at": 1}))[6], "expired 1970-01-01 00:00:01Z");
        assert_eq!(list_row(&json!({"id": "k", "groups": []}))[6..8], ["active".to_string(), "-".to_string()]);
        let t = table(&LIST_HEADER, &[row]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].find("USER"), lines[1].find("alice"), "{t}");
    }
}
