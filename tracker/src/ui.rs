//! The usage page (`GET /ui`): what the ledger holds, as a picture, for the people who
//! run the platform: totals and a chart per hour or day for a period, top users, per
//! model, tokens by type, denials, and one user's recent events.
//!
//! Server-rendered HTML with inline SVG and CSS, no script at all: clusters are often
//! offline (no CDN, no web fonts), and a page without script is easy to lock down with
//! a strict `Content-Security-Policy`. Every string from a client (user, model, path,
//! reason) is HTML-escaped where it is written ([`page`]).
//!
//! Like the usage API it exists only with a ledger and `TRACKER_API_TOKEN` (else 404),
//! and the token is the login: `POST /ui/login` checks it in constant time with the
//! API's own check ([`usage_api::token_matches`]) and sets a session cookie that is not
//! the token ([`session`]); `POST /ui/logout` clears it. The token never travels in a
//! URL. Every answer is `Cache-Control: no-store` and may not be framed.

mod page;
pub mod session;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::error::TrackError;
use crate::ledger::{Dimension, Ledger, LedgerError, RecentEvent, Scope, Totals, UsageBucket};
use crate::metrics::Tracker;
use crate::time::{self, DAY_MS, HOUR_MS};
use crate::usage_api;

/// The page's `Content-Security-Policy`: nothing but its own inline styles, `data:`
/// images, and forms posting back to itself; no framing.
pub const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'; \
                       frame-ancestors 'none'; base-uri 'none'";
/// Users listed in "Top users".
pub const TOP_USERS: usize = 25;
/// Events listed for the chosen user.
pub const RECENT_EVENTS: u32 = 50;
/// Most bars in a chart (ranges longer than this many days are refused).
pub const MAX_CHART_BUCKETS: i64 = 1_000;

/// The preset periods, `?range=`.
pub const PRESETS: [(&str, i64); 3] = [("24h", DAY_MS), ("7d", 7 * DAY_MS), ("30d", 30 * DAY_MS)];
/// The period without `range`, `since` or `until`.
pub const DEFAULT_PRESET: &str = "24h";

/// `GET /ui`: the page, or the login form without a valid session.
pub async fn page(State(tracker): State<Arc<Tracker>>, headers: HeaderMap, RawQuery(query): RawQuery) -> Response {
    let Some((ledger, digest)) = enabled(&tracker) else { return not_found("GET /ui") };
    if !session::from_request(&headers).is_some_and(|s| session::valid(s, digest, time::now_ms() / 1000)) {
        return secured(StatusCode::OK, page::login(None));
    }
    let view = match View::parse(query.as_deref(), time::now_ms()) {
        Ok(view) => view,
        Err(message) => {
            let fallback = View::parse(None, time::now_ms()).unwrap_or_else(|_| View::default());
            return secured(StatusCode::BAD_REQUEST, page::usage(&fallback, &Data::default(), Some(&message)));
        }
    };
    match gather(&ledger, &view).await {
        Ok(data) => secured(StatusCode::OK, page::usage(&view, &data, None)),
        Err(error) => {
            tracker.ledger_error("read");
            eprintln!("usage-tracking: usage page: {error}");
            let message = "The ledger could not be read; try again.".to_owned();
            secured(StatusCode::SERVICE_UNAVAILABLE, page::usage(&view, &Data::default(), Some(&message)))
        }
    }
}

/// `POST /ui/login` (`token=…`, form-urlencoded): a session cookie and back to the
/// page, or the form again with a 401.
pub async fn login(
    State(tracker): State<Arc<Tracker>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Some((_, digest)) = enabled(&tracker) else { return not_found("POST /ui/login") };
    let token = body.ok().and_then(|body| {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(&body).ok()?;
        pairs.into_iter().find(|(name, _)| name == "token").map(|(_, token)| token)
    });
    if !token.is_some_and(|t| usage_api::token_matches(t.trim(), digest)) {
        return secured(StatusCode::UNAUTHORIZED, page::login(Some("Wrong token.")));
    }
    let Some(value) = session::issue(digest, time::now_ms() / 1000) else {
        return secured(StatusCode::SERVICE_UNAVAILABLE, page::login(Some("No session can be issued now.")));
    };
    let cookie = session::set_cookie(Some(&value), session::over_https(&headers));
    redirect_to_page(&cookie)
}

/// `POST /ui/logout`: clears the cookie, back to the login form.
pub async fn logout(State(tracker): State<Arc<Tracker>>, headers: HeaderMap) -> Response {
    if enabled(&tracker).is_none() {
        return not_found("POST /ui/logout");
    }
    redirect_to_page(&session::set_cookie(None, session::over_https(&headers)))
}

/// The ledger and the token's digest, when the page exists.
fn enabled(tracker: &Tracker) -> Option<(Arc<Ledger>, &[u8; 32])> {
    Some((tracker.ledger()?.clone(), tracker.api_token_digest()?))
}

fn not_found(what: &str) -> Response {
    TrackError::NotFound(format!("no route for {what}")).into_response()
}

/// 303 to `/ui`, setting `cookie`.
fn redirect_to_page(cookie: &str) -> Response {
    let mut response = secured(StatusCode::SEE_OTHER, String::new());
    let headers = response.headers_mut();
    headers.insert(header::LOCATION, HeaderValue::from_static("/ui"));
    if let Ok(cookie) = HeaderValue::from_str(cookie) {
        headers.insert(header::SET_COOKIE, cookie);
    }
    response
}

/// An HTML answer with the page's security headers.
fn secured(status: StatusCode, html: String) -> Response {
    let mut response = (status, html).into_response();
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::CACHE_CONTROL, "no-store"),
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// What the page shows: the period, its bucket width, and the chosen user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// The preset in effect, if the period is one.
    pub preset: Option<&'static str>,
    pub since_ms: i64,
    pub until_ms: i64,
    /// `since`/`until` as given (shown back in the form).
    pub since_text: String,
    pub until_text: String,
    /// [`HOUR_MS`] for periods up to two days, else [`DAY_MS`].
    pub width_ms: i64,
    pub user: Option<String>,
}

impl Default for View {
    fn default() -> View {
        View {
            preset: Some(DEFAULT_PRESET),
            since_ms: 0,
            until_ms: DAY_MS,
            since_text: String::new(),
            until_text: String::new(),
            width_ms: HOUR_MS,
            user: None,
        }
    }
}

impl View {
    /// From the query (`range`, `since`, `until`, `user`; empty values count as not
    /// given, as a submitted form sends them). `since`/`until` override `range`.
    pub fn parse(query: Option<&str>, now_ms: i64) -> Result<View, String> {
        let pairs: Vec<(String, String)> =
            serde_urlencoded::from_str(query.unwrap_or("")).map_err(|e| format!("query string: {e}"))?;
        let get =
            |name: &str| pairs.iter().rev().find(|(n, _)| n == name).map(|(_, v)| v.trim()).filter(|v| !v.is_empty());
        let time = |name: &str| -> Result<Option<i64>, String> {
            get(name).map(|t| time::parse_time(t).map_err(|e| format!("{name}: {e}"))).transpose()
        };
        let (since, until) = (time("since")?, time("until")?);
        let preset = match get("range") {
            None => PRESETS.iter().find(|(name, _)| *name == DEFAULT_PRESET),
            Some(range) => Some(
                PRESETS
                    .iter()
                    .find(|(name, _)| *name == range)
                    .ok_or_else(|| format!("range: expected 24h, 7d or 30d, got {range:?}"))?,
            ),
        };
        let span = preset.map_or(DAY_MS, |(_, span)| *span);
        let until_ms = until.unwrap_or(now_ms);
        let since_ms = since.unwrap_or_else(|| until_ms.saturating_sub(span).max(time::MIN_MS));
        if since_ms >= until_ms {
            return Err(format!(
                "since ({}) must be before until ({})",
                time::format_rfc3339(since_ms),
                time::format_rfc3339(until_ms)
            ));
        }
        let width_ms = if until_ms - since_ms <= 2 * DAY_MS { HOUR_MS } else { DAY_MS };
        if buckets(since_ms, until_ms, width_ms) > MAX_CHART_BUCKETS {
            return Err(format!("the period is longer than {MAX_CHART_BUCKETS} days; narrow it"));
        }
        if let Some(Err(why)) = get("user").map(crate::labels::user) {
            // As stored: a name no event could have is refused.
            return Err(format!("user: {why}"));
        }
        let explicit = since.is_some() || until.is_some();
        Ok(View {
            preset: if explicit { None } else { preset.map(|(name, _)| *name) },
            since_ms,
            until_ms,
            since_text: get("since").unwrap_or("").to_owned(),
            until_text: get("until").unwrap_or("").to_owned(),
            width_ms,
            user: get("user").map(str::to_owned),
        })
    }

    /// Whose events the totals, the chart and the per-model table count.
    pub fn scope(&self) -> Scope {
        self.user.clone().map_or(Scope::Authorized, Scope::User)
    }
}

/// Buckets of `width_ms` that `[since_ms, until_ms)` touches.
pub fn buckets(since_ms: i64, until_ms: i64, width_ms: i64) -> i64 {
    (time::floor(until_ms - 1, width_ms) - time::floor(since_ms, width_ms)) / width_ms + 1
}

/// What the ledger says about a [`View`].
#[derive(Debug, Clone, Default)]
pub struct Data {
    /// The scope's buckets that have events.
    pub chart: Vec<UsageBucket>,
    /// The sum of `chart`.
    pub total: Totals,
    /// Every user with events in the period, most tokens first.
    pub users: Vec<(String, Totals)>,
    /// The scope's events per model, most tokens first ("" is no model).
    pub models: Vec<(String, Totals)>,
    /// Denied requests per reason, most first.
    pub denials: Vec<(String, Totals)>,
    /// The chosen user's latest events (`None`: no user chosen; empty: none in the ledger).
    pub recent: Option<Vec<RecentEvent>>,
    /// Whether the chosen user was ever seen.
    pub known_user: bool,
}

async fn gather(ledger: &Ledger, view: &View) -> Result<Data, LedgerError> {
    let (since, until) = (view.since_ms, view.until_ms);
    let (chart, mut users, mut models, mut denials) = tokio::try_join!(
        ledger.usage_of(view.scope(), since, until, view.width_ms),
        ledger.breakdown(Scope::Authorized, since, until, Dimension::User),
        ledger.breakdown(view.scope(), since, until, Dimension::Model),
        ledger.breakdown(Scope::Denied, since, until, Dimension::Reason),
    )?;
    let mut total = Totals::default();
    for bucket in &chart {
        total.add(&bucket.totals);
    }
    for rows in [&mut users, &mut models] {
        rows.sort_by(|a, b| tokens(&b.1).cmp(&tokens(&a.1)).then(b.1.requests.cmp(&a.1.requests)).then(a.0.cmp(&b.0)));
    }
    denials.sort_by(|a, b| b.1.requests.cmp(&a.1.requests).then(a.0.cmp(&b.0)));
    let (recent, known_user) = match &view.user {
        None => (None, false),
        Some(user) => {
            let (recent, known) = tokio::try_join!(ledger.recent(user, RECENT_EVENTS), ledger.knows_user(user))?;
            (Some(recent), known)
        }
    };
    Ok(Data { chart, total, users, models, denials, recent, known_user })
}

/// Prompt plus completion tokens (cached ones are part of the prompt).
pub fn tokens(t: &Totals) -> u64 {
    t.prompt.saturating_add(t.completion)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_763_800_000_000;

    #[test]
    fn views_from_queries() {
        let cases = [
            (None, Some("24h"), NOW - DAY_MS, NOW, HOUR_MS, None),
            (Some("range=7d&user=%20al%20"), Some("7d"), NOW - 7 * DAY_MS, NOW, DAY_MS, Some("al")),
            (Some("range=30d&user="), Some("30d"), NOW - 30 * DAY_MS, NOW, DAY_MS, None),
            (
                Some("since=2025-11-01&until=2025-11-02&range=7d"),
                None,
                1_761_955_200_000,
                1_762_041_600_000,
                HOUR_MS,
                None,
            ),
            (Some("since=2025-11-01&until=&range="), None, 1_761_955_200_000, NOW, DAY_MS, None),
        ];
        for (query, preset, since, until, width, user) in cases {
            let view = View::parse(query, NOW).unwrap();
            assert_eq!(
                (view.preset, view.since_ms, view.until_ms, view.width_ms, view.user.as_deref()),
                (preset, since, until, width, user),
                "{query:?}"
            );
        }
        let errors = [
            ("range=1y", "range: expected 24h, 7d or 30d, got \"1y\""),
            (
                "since=yesterday",
                "since: expected Unix seconds or an RFC 3339 time like 2025-11-22T08:00:00Z, got \"yesterday\"",
            ),
            (
                "since=2025-11-02&until=2025-11-01",
                "since (2025-11-02T00:00:00Z) must be before until (2025-11-01T00:00:00Z)",
            ),
            ("since=1970-01-01", "the period is longer than 1000 days; narrow it"),
            ("user=a%00b", "user: must not contain control characters"),
        ];
        for (query, message) in errors {
            assert_eq!(View::parse(Some(query), NOW), Err(message.to_owned()), "{query}");
        }
    }
}
