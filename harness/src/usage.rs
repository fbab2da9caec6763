//! Client of the tracker's usage API (tracker/README.md "Usage API"), behind
//! `tollgate usage`, with `Authorization: Bearer <TRACKER_API_TOKEN>`:
//!
//! - by user: with `--user`, one `GET /v1/usage?user=&bucket=day` per user (its
//!   `total`); without, `GET /v1/usage/breakdown?by=user` (every user of the range);
//! - by day: the `/v1/usage` answers' day buckets (needs `--user`);
//! - by model: `GET /v1/usage/breakdown?by=model` per user, or for all users together.
//!
//! Every number is the ledger's total over the range (compacted days included).

use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use reqwest::blocking::Client;
use serde::Deserialize;
use serde_json::Value;

use crate::keys::{endpoint, error_message};

/// The environment variable holding the usage API's secret, as the tracker names it.
pub const API_TOKEN_ENV: &str = "TRACKER_API_TOKEN";
/// The user label of a row of all users together (by model without `--user`).
pub const ALL_USERS: &str = "(all)";

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;
/// 9999-12-31T23:59:59.999Z, the tracker's latest time.
const MAX_MS: i64 = 253_402_300_799_999;

/// How the rows are grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum By {
    #[default]
    User,
    Model,
    Day,
}

impl std::str::FromStr for By {
    type Err = String;
    fn from_str(s: &str) -> Result<By, String> {
        match s {
            "user" => Ok(By::User),
            "model" => Ok(By::Model),
            "day" => Ok(By::Day),
            _ => Err(format!("expected user, model or day, got {s:?}")),
        }
    }
}

/// The five counts of a usage answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Counts {
    #[serde(default)]
    pub requests: u64,
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub cached_tokens: u64,
    #[serde(default)]
    pub reasoning_tokens: u64,
}

impl Counts {
    pub fn add(&mut self, other: &Counts) {
        self.requests += other.requests;
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
        self.cached_tokens += other.cached_tokens;
        self.reasoning_tokens += other.reasoning_tokens;
    }

    /// Prompt plus completion tokens (cached tokens are part of the prompt, reasoning
    /// tokens part of the completion, as OpenAI counts them).
    pub fn total_tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
}

/// One line of the report: its labels (user; user and day; user and model) and counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub labels: Vec<String>,
    pub counts: Counts,
}

/// What `tollgate usage` asks.
#[derive(Debug, Clone)]
pub struct Query {
    pub tracker_url: String,
    pub api_token: String,
    pub users: Vec<String>,
    /// As given: a date, an RFC 3339 time, Unix seconds or an age (`7d`, `24h`).
    pub since: Option<String>,
    pub until: Option<String>,
    pub by: By,
}

/// The tracker's answers and the rows made of them.
#[derive(Debug, Clone)]
pub struct Report {
    /// The tracker's answers, one per user, exactly as sent.
    pub answers: Vec<String>,
    pub rows: Vec<Row>,
    pub total: Counts,
    /// The range `[since, until)` as the tracker took it.
    pub since: String,
    pub until: String,
}

/// Asks the tracker and groups its answers.
pub fn report(q: &Query) -> anyhow::Result<Report> {
    if q.users.is_empty() && q.by == By::Day {
        bail!("--by day shows one user's days: name the users with --user (repeatable)");
    }
    if q.api_token.trim().is_empty() {
        bail!("no usage API secret: set {API_TOKEN_ENV} to the tracker's (`tollgate up` prints it)");
    }
    let now = now_ms();
    let since = q.since.as_deref().map(|t| parse_time(t, now).map_err(|e| anyhow!("--since: {e}"))).transpose()?;
    let until = q.until.as_deref().map(|t| parse_time(t, now).map_err(|e| anyhow!("--until: {e}"))).transpose()?;
    if let (Some(s), Some(u)) = (since, until) {
        if s >= u {
            bail!("--since ({}) must be before --until ({})", format_ms(s), format_ms(u));
        }
    }
    let range = Range { since, until };
    let texts = match (q.by, q.users.is_empty()) {
        (By::User, true) => vec![fetch_breakdown(&q.tracker_url, &q.api_token, "user", None, range)?],
        (By::Model, true) => vec![fetch_breakdown(&q.tracker_url, &q.api_token, "model", None, range)?],
        (By::Model, false) => q
            .users
            .iter()
            .map(|u| fetch_breakdown(&q.tracker_url, &q.api_token, "model", Some(u), range))
            .collect::<anyhow::Result<_>>()?,
        (By::User | By::Day, _) => q
            .users
            .iter()
            .map(|u| fetch_usage(&q.tracker_url, &q.api_token, u, since, until, "day"))
            .collect::<anyhow::Result<_>>()?,
    };
    let values = texts
        .iter()
        .map(|text| serde_json::from_str::<Value>(text).with_context(|| format!("unexpected answer {text}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut report = match (q.by, q.users.is_empty()) {
        (By::Model, _) | (By::User, true) => rows_from_breakdown(&values)?,
        (By::User | By::Day, _) => rows_from_usage(q.by, &values)?,
    };
    report.answers = texts;
    Ok(report)
}

/// `since`/`until` of a query, Unix ms (`None`: the tracker's default).
#[derive(Debug, Clone, Copy)]
pub struct Range {
    pub since: Option<i64>,
    pub until: Option<i64>,
}

/// Rows of `/v1/usage` answers (day buckets): one per user, or per user and day.
pub fn rows_from_usage(by: By, answers: &[Value]) -> anyhow::Result<Report> {
    let mut rows = Vec::new();
    let mut total = Counts::default();
    let (mut since, mut until) = (String::new(), String::new());
    for answer in answers {
        let user = text(answer, "user")?;
        since = text(answer, "since")?;
        until = text(answer, "until")?;
        let counts: Counts = serde_json::from_value(answer.get("total").cloned().unwrap_or_default())
            .with_context(|| format!("no total in {answer}"))?;
        total.add(&counts);
        if by == By::Day {
            for bucket in answer.get("buckets").and_then(Value::as_array).into_iter().flatten() {
                let start = text(bucket, "start")?;
                let day = start.get(..10).unwrap_or(&start).to_string();
                let counts: Counts = serde_json::from_value(bucket.clone())?;
                rows.push(Row { labels: vec![user.clone(), day], counts });
            }
        } else {
            rows.push(Row { labels: vec![user], counts });
        }
    }
    Ok(Report { answers: Vec::new(), rows, total, since, until })
}

/// Rows of `/v1/usage/breakdown` answers: per user (`by=user`), or per user (or all
/// users) and model (`by=model`; an event without a model shows as `-`).
pub fn rows_from_breakdown(answers: &[Value]) -> anyhow::Result<Report> {
    let mut rows = Vec::new();
    let mut total = Counts::default();
    let (mut since, mut until) = (String::new(), String::new());
    for answer in answers {
        since = text(answer, "since")?;
        until = text(answer, "until")?;
        let by = text(answer, "by")?;
        let user = answer.get("user").and_then(Value::as_str).unwrap_or(ALL_USERS).to_string();
        let listed = answer.get("rows").and_then(Value::as_array).ok_or_else(|| anyhow!("no rows in {answer}"))?;
        for row in listed {
            let counts: Counts = serde_json::from_value(row.clone())?;
            total.add(&counts);
            let key = row.get(&by).and_then(Value::as_str).unwrap_or("-").to_string();
            let labels = if by == "user" { vec![key] } else { vec![user.clone(), key] };
            rows.push(Row { labels, counts });
        }
    }
    Ok(Report { answers: Vec::new(), rows, total, since, until })
}

fn text(value: &Value, field: &str) -> anyhow::Result<String> {
    value.get(field).and_then(Value::as_str).map(str::to_string).ok_or_else(|| anyhow!("no {field} in {value}"))
}

/// The report as an aligned table (numbers right-aligned), with a total line when
/// there is more than one row.
pub fn table(by: By, rows: &[Row], total: &Counts) -> String {
    let mut header: Vec<&str> = match by {
        By::User => vec!["USER"],
        By::Day => vec!["USER", "DAY"],
        By::Model => vec!["USER", "MODEL"],
    };
    let labels = header.len();
    header.extend(["REQUESTS", "PROMPT", "COMPLETION", "CACHED", "REASONING", "TOTAL"]);
    let cells = |labels_of: Vec<String>, c: &Counts| -> Vec<String> {
        let mut out = labels_of;
        out.extend(
            [c.requests, c.prompt_tokens, c.completion_tokens, c.cached_tokens, c.reasoning_tokens, c.total_tokens()]
                .iter()
                .map(u64::to_string),
        );
        out
    };
    let mut lines: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    lines.extend(rows.iter().map(|r| cells(r.labels.clone(), &r.counts)));
    if rows.len() > 1 {
        let mut label = vec![String::new(); labels];
        if let Some(first) = label.first_mut() {
            *first = "total".into();
        }
        lines.push(cells(label, total));
    }
    let mut widths = vec![0; header.len()];
    for line in &lines {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out: Vec<String> = lines
        .iter()
        .map(|line| {
            let padded: Vec<String> = line
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(i, (cell, w))| if i < labels { format!("{cell:<w$}") } else { format!("{cell:>w$}") })
                .collect();
            padded.join("  ").trim_end().to_string()
        })
        .collect();
    if rows.is_empty() {
        out.push("(no usage in the range)".into());
    }
    out.join("\n")
}

/// A usage API call the tracker refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError {
    /// What was asked (`GET http://…/v1/usage?…`).
    pub request: String,
    pub status: u16,
    /// The tracker's `error.message`, else the body's text.
    pub message: String,
}

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: the tracker answered {}: {}", self.request, self.status, self.message)?;
        match self.status {
            401 => write!(f, " (the token is wrong: it must be the tracker's {API_TOKEN_ENV}; see --api-token-env)"),
            404 if self.message.starts_with("no route for") => {
                write!(f, " (the usage API is off: the tracker has no {API_TOKEN_ENV}, or this is not the tracker)")
            }
            404 if self.message.contains("ledger") => {
                write!(f, " (the usage API is off: the tracker has no ledger)")
            }
            _ => Ok(()),
        }
    }
}

impl std::error::Error for UsageError {}

/// The `/v1/usage` URL.
pub fn usage_url(
    tracker_url: &str,
    user: &str,
    since: Option<i64>,
    until: Option<i64>,
    bucket: &str,
) -> anyhow::Result<reqwest::Url> {
    let mut url = endpoint(tracker_url, &["v1", "usage"])?;
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("user", user);
        if let Some(since) = since {
            q.append_pair("since", &unix_seconds(since));
        }
        if let Some(until) = until {
            q.append_pair("until", &unix_seconds(until));
        }
        q.append_pair("bucket", bucket);
    }
    Ok(url)
}

/// `GET /v1/usage`: the answer's text, as the tracker sent it.
pub fn fetch_usage(
    tracker_url: &str,
    api_token: &str,
    user: &str,
    since: Option<i64>,
    until: Option<i64>,
    bucket: &str,
) -> anyhow::Result<String> {
    get(usage_url(tracker_url, user, since, until, bucket)?, api_token)
}

/// `GET /v1/usage/breakdown?by=`: the answer's text, as the tracker sent it.
pub fn fetch_breakdown(
    tracker_url: &str,
    api_token: &str,
    by: &str,
    user: Option<&str>,
    range: Range,
) -> anyhow::Result<String> {
    let mut url = endpoint(tracker_url, &["v1", "usage", "breakdown"])?;
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("by", by);
        if let Some(user) = user {
            q.append_pair("user", user);
        }
        if let Some(since) = range.since {
            q.append_pair("since", &unix_seconds(since));
        }
        if let Some(until) = range.until {
            q.append_pair("until", &unix_seconds(until));
        }
    }
    get(url, api_token)
}

fn get(url: reqwest::Url, api_token: &str) -> anyhow::Result<String> {
    let request = format!("GET {url}");
    let client = Client::builder().timeout(Duration::from_secs(30)).build()?;
    let response = client
        .get(url)
        .bearer_auth(api_token)
        .send()
        .with_context(|| format!("{request}: no answer (is the tracker running there? --tracker URL)"))?;
    let status = response.status().as_u16();
    let body = response.text().with_context(|| request.clone())?;
    if status != 200 {
        return Err(UsageError { request, status, message: error_message(&body) }.into());
    }
    Ok(body)
}

/// Milliseconds as Unix seconds for the query (`1763800000`, `1763800000.5`).
fn unix_seconds(ms: i64) -> String {
    let (s, frac) = (ms.div_euclid(1000), ms.rem_euclid(1000));
    if frac == 0 {
        s.to_string()
    } else {
        format!("{s}.{frac:03}").trim_end_matches('0').to_string()
    }
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Parses `--since`/`--until` into Unix milliseconds: an age before `now` (`90s`,
/// `15m`, `24h`, `7d`, `2w`), `now`, Unix seconds (`1763800000`, fractions allowed), a
/// date (`2026-11-01`, midnight UTC) or an RFC 3339 time (`2026-11-01T08:00:00Z`,
/// `…+01:00`, fractions allowed).
pub fn parse_time(text: &str, now: i64) -> Result<i64, String> {
    let t = text.trim();
    let bad = || {
        format!("expected an age like 24h or 7d, a date like 2026-11-01, an RFC 3339 time or Unix seconds, got {t:?}")
    };
    if t == "now" {
        return Ok(now);
    }
    let (head, unit) = match t.char_indices().last() {
        Some((i, c)) => (t.get(..i).unwrap_or(""), c),
        None => return Err(bad()),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let ms = if digits(head) && unit.is_ascii_alphabetic() {
        let n: i64 = head.parse().map_err(|_| format!("{t:?} is too long ago"))?;
        let unit_ms = match unit {
            's' => 1_000,
            'm' => 60_000,
            'h' => HOUR_MS,
            'd' => DAY_MS,
            'w' => 7 * DAY_MS,
            _ => return Err(format!("{t:?}: unknown unit {unit:?} (use s, m, h, d or w)")),
        };
        n.checked_mul(unit_ms).and_then(|d| now.checked_sub(d)).ok_or_else(|| format!("{t:?} is too long ago"))?
    } else if t.starts_with(|c: char| c.is_ascii_digit()) && t.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let secs: f64 = t.parse().map_err(|_| bad())?;
        if !(0.0..=(MAX_MS / 1000) as f64).contains(&secs) {
            return Err(format!("{t:?} is outside 1970-01-01 to 9999-12-31"));
        }
        (secs * 1000.0).round() as i64
    } else {
        parse_rfc3339(t).ok_or_else(bad)?
    };
    if (0..=MAX_MS).contains(&ms) {
        Ok(ms)
    } else {
        Err(format!("{t:?} is outside 1970-01-01 to 9999-12-31"))
    }
}

/// `YYYY-MM-DD` or `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)` as Unix milliseconds.
fn parse_rfc3339(t: &str) -> Option<i64> {
    let num = |s: &str| -> Option<i64> { s.bytes().all(|b| b.is_ascii_digit()).then(|| s.parse().ok()).flatten() };
    let date = t.get(..10)?;
    if date.as_bytes().get(4) != Some(&b'-') || date.as_bytes().get(7) != Some(&b'-') {
        return None;
    }
    let (y, m, d) = (num(date.get(..4)?)?, num(date.get(5..7)?)?, num(date.get(8..10)?)?);
    if !(1..=12).contains(&m) || d < 1 || d > days_in_month(y, m) {
        return None;
    }
    let day_ms = days_from_civil(y, m, d) * DAY_MS;
    let rest = t.get(10..)?;
    if rest.is_empty() {
        return Some(day_ms);
    }
    let rest = rest.strip_prefix(['T', 't'])?;
    let clock = rest.get(..8)?;
    if clock.as_bytes().get(2) != Some(&b':') || clock.as_bytes().get(5) != Some(&b':') {
        return None;
    }
    let (h, mi, s) = (num(clock.get(..2)?)?, num(clock.get(3..5)?)?, num(clock.get(6..8)?)?);
    if h > 23 || mi > 59 || s > 59 {
        return None;
    }
    let mut rest = rest.get(8..)?;
    let mut millis = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let padded: String = frac.get(..digits)?.chars().chain("000".chars()).take(3).collect();
        millis = num(&padded)?;
        rest = frac.get(digits..)?;
    }
    let offset_ms = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.get(..1)? {
                "+" => 1,
                "-" => -1,
                _ => return None,
            };
            if rest.len() != 6 || rest.as_bytes().get(3) != Some(&b':') {
                return None;
            }
            let (oh, om) = (num(rest.get(1..3)?)?, num(rest.get(4..6)?)?);
            if oh > 23 || om > 59 {
                return None;
            }
            sign * (oh * HOUR_MS + om * 60_000)
        }
    };
    Some(day_ms + h * HOUR_MS + mi * 60_000 + s * 1000 + millis - offset_ms)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 (Howard Hinnant's days_from_civil).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Unix milliseconds as RFC 3339 (`2025-11-22T08:00:00Z`).
pub fn format_ms(ms: i64) -> String {
    let secs = u64::try_from(ms.div_euclid(1000)).unwrap_or(0);
    crate::keys::format_time(secs).replacen(' ', "T", 1)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
    use super::*;
    use serde_json::json;

    /// 2025-11-22T08:00:00Z
    const NOW: i64 = 1_763_798_400_000;

    #[test]
    fn times() {
        let good: &[(&str, i64)] = &[
            ("now", NOW),
            ("90s", NOW - 90_000),
            ("15m", NOW - 900_000),
            ("24h", NOW - DAY_MS),
            ("7d", NOW - 7 * DAY_MS),
            ("2w", NOW - 14 * DAY_MS),
            ("0d", NOW),
            ("1763798400", NOW),
            ("7", 7_000), // Unix seconds, as the tracker reads a bare number
            ("1763798400.5", NOW + 500),
            ("2025-11-22", NOW - 8 * HOUR_MS),
            ("1970-01-01", 0),
            ("2024-02-29", 1_709_164_800_000),
            ("2025-11-22T08:00:00Z", NOW),
            ("2025-11-22t08:00:00z", NOW),
            ("2025-11-22T08:00:00.25Z", NOW + 250),
            ("2025-11-22T08:00:00.123456Z", NOW + 123),
            ("2025-11-22T09:30:00+01:30", NOW),
            ("2025-11-22T06:00:00-02:00", NOW),
            (" 7d ", NOW - 7 * DAY_MS),
        ];
        for (text, want) in good {
            assert_eq!(parse_time(text, NOW), Ok(*want), "{text}");
        }
        let bad = [
            "",
            "d",
            "7y",
            "-7d",
            "7.5d",
            "yesterday",
            "2025-13-01",
            "2025-02-29",
            "2025-11-31",
            "2025-11-22T24:00:00Z",
            "2025-11-22T08:00:00",
            "2025-11-22T08:00Z",
            "2025-11-22 08:00:00Z",
            "2025-11-22T08:00:00.Z",
            "2025-11-22T08:00:00+0100",
            "1969-12-31",
            "99999999999999",
            "1.2.3",
        ];
        for text in bad {
            assert!(parse_time(text, NOW).is_err(), "{text:?} parsed as {:?}", parse_time(text, NOW));
        }
        assert_eq!(parse_time("7d", 0), Err("\"7d\" is outside 1970-01-01 to 9999-12-31".into()));
        assert!(parse_time("7y", NOW).unwrap_err().contains("unknown unit 'y'"));
    }

    #[test]
    fn times_in_the_query() {
        assert_eq!(unix_seconds(NOW), "1763798400");
        assert_eq!(unix_seconds(NOW + 500), "1763798400.5");
        assert_eq!(unix_seconds(NOW + 7), "1763798400.007");
        assert_eq!(format_ms(NOW + 7), "2025-11-22T08:00:00Z");
        let url = usage_url("http://t:9/", "a b", Some(NOW), None, "day").unwrap();
        assert_eq!(url.as_str(), "http://t:9/v1/usage?user=a+b&since=1763798400&bucket=day");
        assert_eq!("day".parse::<By>(), Ok(By::Day));
        assert!("team".parse::<By>().is_err());
    }

    fn usage_answer(user: &str, buckets: Value, total: Value) -> Value {
        json!({"user": user, "bucket": "day", "since": "2025-11-01T00:00:00Z", "until": "2025-11-24T00:00:00Z",
               "buckets": buckets, "total": total})
    }

    fn answers() -> Vec<Value> {
        vec![
            usage_answer(
                "alice",
                json!([
                    {"start": "2025-11-22T00:00:00Z", "requests": 2, "prompt_tokens": 30, "completion_tokens": 3,
                     "cached_tokens": 2, "reasoning_tokens": 0},
                    {"start": "2025-11-23T00:00:00Z", "requests": 1, "prompt_tokens": 1200, "completion_tokens": 40,
                     "cached_tokens": 0, "reasoning_tokens": 7}
                ]),
                json!({"requests": 3, "prompt_tokens": 1230, "completion_tokens": 43, "cached_tokens": 2,
                       "reasoning_tokens": 7}),
            ),
            usage_answer(
                "bob",
                json!([]),
                json!({"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0,
                       "reasoning_tokens": 0}),
            ),
        ]
    }

    #[test]
    fn tables_by_user_and_day() {
        let r = rows_from_usage(By::User, &answers()).unwrap();
        assert_eq!((r.since.as_str(), r.until.as_str()), ("2025-11-01T00:00:00Z", "2025-11-24T00:00:00Z"));
        let want = "\
USER   REQUESTS  PROMPT  COMPLETION  CACHED  REASONING  TOTAL
alice         3    1230          43       2          7   1273
bob           0       0           0       0          0      0
total         3    1230          43       2          7   1273";
        assert_eq!(table(By::User, &r.rows, &r.total), want);

        let r = rows_from_usage(By::Day, &answers()).unwrap();
        let want = "\
USER   DAY         REQUESTS  PROMPT  COMPLETION  CACHED  REASONING  TOTAL
alice  2025-11-22         2      30           3       2          0     33
alice  2025-11-23         1    1200          40       0          7   1240
total                     3    1230          43       2          7   1273";
        assert_eq!(table(By::Day, &r.rows, &r.total), want);

        let r = rows_from_usage(By::Day, &answers()[1..]).unwrap();
        assert_eq!(
            table(By::Day, &r.rows, &r.total),
            "USER  DAY  REQUESTS  PROMPT  COMPLETION  CACHED  REASONING  TOTAL\n(no usage in the range)"
        );
        assert!(rows_from_usage(By::User, &[json!({"user": "a"})]).is_err());
    }

    #[test]
    fn tables_by_model() {
        let row = |model: Value, p: u64| {
            json!({"model": model, "requests": 1, "prompt_tokens": p, "completion_tokens": 2, "cached_tokens": 1,
                   "reasoning_tokens": 0})
        };
        let answer = |user: Value, rows: Vec<Value>| {
            json!({"by": "model", "user": user, "since": "2025-11-21T08:00:00Z", "until": "2025-11-22T08:00:00Z",
                   "rows": rows, "total": {}})
        };
        let answers = [
            answer(json!("alice"), vec![row(Value::Null, 30), row(json!("m1"), 20), row(json!("m2"), 10)]),
            answer(Value::Null, vec![row(json!("m1"), 5)]),
        ];
        let r = rows_from_breakdown(&answers).unwrap();
        let want = "\
USER   MODEL  REQUESTS  PROMPT  COMPLETION  CACHED  REASONING  TOTAL
alice  -             1      30           2       1          0     32
alice  m1            1      20           2       1          0     22
alice  m2            1      10           2       1          0     12
(all)  m1            1       5           2       1          0      7
total                4      65           8       4          0     73";
        assert_eq!(table(By::Model, &r.rows, &r.total), want);
        assert_eq!((r.since.as_str(), r.until.as_str()), ("2025-11-21T08:00:00Z", "2025-11-22T08:00:00Z"));

        let by_user = json!({"by": "user", "user": null, "since": "s", "until": "u", "total": {},
                             "rows": [{"user": "bob", "requests": 2, "prompt_tokens": 3}]});
        let r = rows_from_breakdown(&[by_user]).unwrap();
        assert_eq!(
            r.rows,
            [Row { labels: vec!["bob".into()], counts: Counts { requests: 2, prompt_tokens: 3, ..Counts::default() } }]
        );
        assert!(rows_from_breakdown(&[json!({"by": "model", "since": "s", "until": "u"})]).is_err(), "no rows");
    }

    #[test]
    fn errors_say_what_to_do() {
        let e =
            |status, message: &str| UsageError { request: "GET u".into(), status, message: message.into() }.to_string();
        assert!(e(401, "missing or wrong bearer token").contains("the token is wrong"));
        assert!(e(404, "no route for GET /v1/usage").contains("no TRACKER_API_TOKEN"));
        assert!(e(404, "the usage API needs the ledger: …").contains("has no ledger"));
        assert_eq!(
            e(404, "no usage was ever recorded for user \"bo\""),
            "GET u: the tracker answered 404: no usage was ever recorded for user \"bo\""
        );
        let q = Query {
            tracker_url: "http://127.0.0.1:1".into(),
            api_token: "t".into(),
            users: vec![],
            since: None,
            until: None,
            by: By::Day,
        };
        assert!(report(&q).unwrap_err().to_string().contains("--user"));
        let q = Query { users: vec!["a".into()], since: Some("1d".into()), until: Some("2d".into()), ..q };
        assert!(report(&q).unwrap_err().to_string().contains("must be before"));
    }
}
