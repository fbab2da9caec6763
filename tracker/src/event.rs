//! The `/track` body: one event, an array of events, or the body of an Authorino HTTP
//! callback. **A bad event costs only itself:** the events of an array are checked one
//! by one, the good ones are counted and the bad ones are reported back by index
//! ([`Rejected`]), so one event the tracker cannot take does not lose the batch (the
//! sender cannot fix an event it built; resending would fail the same way). An event is
//! checked completely before anything of it is counted, so no event is half-counted.
//! Only a body that fails as a whole (not JSON, not an event or array, over a limit) is
//! refused as a whole, and nothing of it is counted.
//!
//! What a valid event is comes from [`tollgate_rules`], the definition the filter builds
//! its events with. Unknown fields are ignored, so a filter that sends a newer schema
//! keeps working against an older tracker. Known fields are type-checked even when the
//! tracker does not use them (`ts`, `method`, `host`, `usage_missing`), so a broken
//! sender is noticed; `null` means "absent" for every optional field.

use serde::de::{self, Deserializer, IgnoredAny, SeqAccess, Unexpected, Visitor};
use serde::Deserialize;
use serde_json::error::Category;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

pub use tollgate_rules::{MAX_DENIED_COUNT, MAX_ID_CHARS, MAX_STATUS, MAX_TOKENS};

use crate::error::{Rejected, TrackError};
use crate::{labels, time};

/// [`MAX_STATUS`] as the bound of the wire type. The tracker takes any status up to it
/// (0 included); the filter sends only real ones ([`tollgate_rules::status`]).
const MAX_STATUS_U64: u64 = MAX_STATUS as u64;

/// A checked event, its label values already normalised (but not yet capped: the
/// cardinality guard is state, applied when the event is counted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The dedup key; `None` for an Authorino callback, which is never de-duplicated.
    pub id: Option<String>,
    /// The `path` label.
    pub path: &'static str,
    /// `ts` in milliseconds since the epoch, when the event has a usable one (the ledger
    /// files the event under the time it arrived otherwise).
    pub ts_ms: Option<i64>,
    /// The upstream's HTTP status, when the event has one (kept by the ledger).
    pub status: Option<u16>,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `denied` was set: counted in `llm_denied_requests_total` only.
    Denied {
        reason: &'static str,
        /// How many denied requests the event stands for (its `count`, default 1): the
        /// filter aggregates denials per (reason, route) between flushes.
        count: u64,
    },
    Authorized(Usage),
}

impl Outcome {
    /// The requests the event counts: its `count` when denied, else 1.
    pub fn requests(&self) -> u64 {
        match self {
            Outcome::Denied { count, .. } => *count,
            Outcome::Authorized(_) => 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    pub user: String,
    /// The `groups` label (sorted, joined with ",").
    pub groups: String,
    /// The `model` label when the event reports usage (a model or a non-zero count);
    /// `None` leaves `llm_tokens_total` alone.
    pub model: Option<String>,
    pub tokens: Tokens,
    pub incomplete: bool,
    /// The upstream answered 5xx.
    pub upstream_error: bool,
    /// The counts are the gateway's estimate (`usage_estimated`): no usage could be read
    /// from the response, and the request was charged what it may have cost.
    pub estimated: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub prompt: u64,
    pub completion: u64,
    pub cached: u64,
    pub reasoning: u64,
}

impl Tokens {
    /// `(type label, count)` pairs in a fixed order.
    pub fn by_type(&self) -> [(&'static str, u64); 4] {
        [
            ("prompt", self.prompt),
            ("completion", self.completion),
            ("cached", self.cached),
            ("reasoning", self.reasoning),
        ]
    }

    fn any(&self) -> bool {
        self.by_type().iter().any(|(_, n)| *n > 0)
    }
}

/// A body that passed as a whole: its good events, in order, and its bad ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    pub events: Vec<Event>,
    /// The bad events, by index (ascending).
    pub rejected: Vec<Rejected>,
}

/// Parses and checks a `/track` body; `max_batch` caps the events in an array.
///
/// - `Err` with [`TrackError::BadJson`], [`TrackError::InvalidEvent`] (not an event or
///   an array) or [`TrackError::TooLarge`] when the body fails as a whole;
/// - `Err` with [`TrackError::InvalidEvents`] when it has events and all are bad (a
///   lone bad event, or an array of only bad ones): nothing to count;
/// - else `Ok`: the good events and the rejected ones (possibly none).
pub fn parse_body(body: &[u8], max_batch: usize) -> Result<Parsed, TrackError> {
    let checked: Vec<Result<Event, String>> = match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => parse_array(body, max_batch)?,
        Some(b'{') => match deserialize::<RawEvent>(body, "") {
            Ok(raw) => vec![raw.check("")],
            Err(Bad::Event(message)) => {
                // A bad event, but only if the body is JSON: a syntax error anywhere
                // makes the whole body bad.
                serde_json::from_slice::<IgnoredAny>(body).map_err(not_json)?;
                vec![Err(message)]
            }
            Err(Bad::Json(error)) => return Err(not_json(error)),
        },
        _ => {
            return match serde_json::from_slice::<IgnoredAny>(body) {
                Ok(_) => Err(TrackError::InvalidEvent("body: expected an event object or an array of events".into())),
                Err(e) => Err(not_json(e)),
            }
        }
    };
    let mut parsed = Parsed::default();
    for (index, result) in checked.into_iter().enumerate() {
        match result {
            Ok(event) => parsed.events.push(event),
            Err(message) => parsed.rejected.push(Rejected::invalid_event(index, message)),
        }
    }
    if parsed.events.is_empty() && !parsed.rejected.is_empty() {
        return Err(TrackError::InvalidEvents(parsed.rejected));
    }
    Ok(parsed)
}

/// An array body, each element checked on its own. Fast path: the whole array is
/// well-typed (the usual case) and is parsed in one go; otherwise it is split into its
/// elements (which also checks the syntax of all of it) and each is parsed on its own,
/// so a bad one fails alone.
fn parse_array(body: &[u8], max_batch: usize) -> Result<Vec<Result<Event, String>>, TrackError> {
    let too_large = |n: usize| TrackError::TooLarge(format!("batch of {n} events is over the limit of {max_batch}"));
    // A body that could hold more elements than the limit is counted first, without
    // building them: `[{},{},…]` would otherwise take ~100 times its size in memory
    // before the limit is checked. (Events are at least 2 bytes and a comma.)
    if body.len() > max_batch.saturating_mul(3) {
        let n = count_elements(body).map_err(not_json)?;
        if n > max_batch {
            return Err(too_large(n));
        }
    }
    match deserialize::<Vec<RawEvent>>(body, "events") {
        Ok(raw) => {
            if raw.len() > max_batch {
                return Err(too_large(raw.len()));
            }
            Ok(raw.into_iter().enumerate().map(|(i, e)| e.check(&format!("events[{i}]"))).collect())
        }
        Err(Bad::Json(error)) => Err(not_json(error)),
        Err(Bad::Event(_)) => {
            let elements: Vec<&RawValue> = serde_json::from_slice(body).map_err(not_json)?;
            if elements.len() > max_batch {
                return Err(too_large(elements.len()));
            }
            Ok(elements
                .into_iter()
                .enumerate()
                .map(|(i, element)| {
                    let prefix = format!("events[{i}]");
                    match deserialize::<RawEvent>(element.get().as_bytes(), &prefix) {
                        Ok(raw) => raw.check(&prefix),
                        Err(Bad::Event(message)) => Err(message),
                        // Cannot happen: the element was parsed as JSON already.
                        Err(Bad::Json(error)) => Err(format!("{prefix}: not valid JSON: {error}")),
                    }
                })
                .collect())
        }
    }
}

/// The elements of a JSON array, counted (and their syntax checked) without keeping any.
fn count_elements(body: &[u8]) -> Result<usize, serde_json::Error> {
    struct Counter;
    impl<'de> Visitor<'de> for Counter {
        type Value = usize;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an array of events")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
            let mut n = 0usize;
            while seq.next_element::<IgnoredAny>()?.is_some() {
                n = n.saturating_add(1);
            }
            Ok(n)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let n = de.deserialize_seq(Counter)?;
    de.end()?;
    Ok(n)
}

/// Why a deserialization failed: the JSON itself, or what it holds (the message names
/// the event and field).
enum Bad {
    Json(serde_json::Error),
    Event(String),
}

fn not_json(error: serde_json::Error) -> TrackError {
    TrackError::BadJson(format!("body is not valid JSON: {error}"))
}

fn deserialize<'a, T: Deserialize<'a>>(body: &'a [u8], prefix: &str) -> Result<T, Bad> {
    from_json(body).map_err(|e| match e {
        JsonError::Data { path, message } => Bad::Event(format!("{}: {message}", field(prefix, &path))),
        JsonError::Syntax(e) => Bad::Json(e),
    })
}

/// Why a JSON body did not deserialize: not JSON at all, or a value of the wrong shape
/// at `path` (serde_path_to_error's, `.` for the top) with `message` without its byte
/// position (the field path says where).
pub(crate) enum JsonError {
    Syntax(serde_json::Error),
    Data { path: String, message: String },
}

/// Deserializes the whole of `body` (trailing bytes are a syntax error).
pub(crate) fn from_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, JsonError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        match inner.classify() {
            Category::Data => {
                let text = inner.to_string();
                let position = format!(" at line {} column {}", inner.line(), inner.column());
                let message = text.strip_suffix(&position).unwrap_or(&text).to_owned();
                JsonError::Data { path, message }
            }
            Category::Syntax | Category::Eof | Category::Io => JsonError::Syntax(inner),
        }
    })?;
    de.end().map_err(JsonError::Syntax)?;
    Ok(value)
}

/// Joins the event's prefix ("events[3]" or "" for a lone event) and a field path.
fn field(prefix: &str, path: &str) -> String {
    match (prefix.is_empty(), path) {
        (true, ".") => "event".to_owned(),
        (false, ".") => prefix.to_owned(),
        (true, _) => path.to_owned(),
        (false, _) if path.starts_with('[') => format!("{prefix}{path}"),
        (false, _) => format!("{prefix}.{path}"),
    }
}

/// The wire shape. Only type checks happen here; the rules that tie fields together are
/// in [`RawEvent::check`].
#[derive(Debug, Deserialize)]
#[serde(expecting = "an event object")]
struct RawEvent<'a> {
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
    ts: Option<f64>,
    #[serde(borrow)]
    user: Option<Cow<'a, str>>,
    groups: Option<Groups>,
    #[allow(dead_code)] // type-checked only
    #[serde(borrow)]
    method: Option<Cow<'a, str>>,
    #[allow(dead_code)] // type-checked only
    #[serde(borrow)]
    host: Option<Cow<'a, str>>,
    #[serde(borrow)]
    path: Option<Cow<'a, str>>,
    #[serde(borrow)]
    model: Option<Cow<'a, str>>,
    status: Option<UInt<0, MAX_STATUS_U64>>,
    prompt_tokens: Option<UInt<0, MAX_TOKENS>>,
    completion_tokens: Option<UInt<0, MAX_TOKENS>>,
    cached_tokens: Option<UInt<0, MAX_TOKENS>>,
    reasoning_tokens: Option<UInt<0, MAX_TOKENS>>,
    incomplete: Option<bool>,
    usage_missing: Option<bool>,
    usage_estimated: Option<bool>,
    #[serde(borrow)]
    denied: Option<Cow<'a, str>>,
    /// Denied requests this event stands for (aggregated denials).
    count: Option<UInt<1, MAX_DENIED_COUNT>>,
}

impl RawEvent<'_> {
    /// An event without an id is only acceptable as an Authorino callback, whose body
    /// has nothing but `user`, `groups`, `method`, `host` and `path`.
    fn is_callback(&self) -> bool {
        self.id.is_none()
            && self.ts.is_none()
            && self.model.is_none()
            && self.status.is_none()
            && self.prompt_tokens.is_none()
            && self.completion_tokens.is_none()
            && self.cached_tokens.is_none()
            && self.reasoning_tokens.is_none()
            && self.incomplete.is_none()
            && self.usage_missing.is_none()
            && self.usage_estimated.is_none()
            && self.denied.is_none()
            && self.count.is_none()
    }

    /// The event, or the message saying what is wrong with it.
    fn check(self, prefix: &str) -> Result<Event, String> {
        let invalid = |name: &str, message: &str| format!("{}: {message}", field(prefix, name));
        if let Some(id) = &self.id {
            if !tollgate_rules::event_id(id) {
                if id.chars().any(char::is_control) {
                    return Err(invalid("id", "must not contain control characters"));
                }
                let chars = id.chars().count();
                return Err(invalid("id", &format!("must be 1 to {MAX_ID_CHARS} characters, got {chars}")));
            }
        } else if !self.is_callback() {
            return Err(invalid("id", "required (only an Authorino callback body may omit it)"));
        }
        let path = labels::route(self.path.as_deref().unwrap_or(""));
        let ts_ms = time::event_ms(self.ts);
        // MAX_STATUS (999) fits.
        let status = self.status.and_then(|s| u16::try_from(s.0).ok());
        let count = self.count.map_or(1, |c| c.0);
        if let Some(reason) = &self.denied {
            let outcome = Outcome::Denied { reason: labels::deny_reason(reason), count };
            return Ok(Event { id: self.id.map(Cow::into_owned), path, ts_ms, status, outcome });
        }
        if count != 1 {
            return Err(invalid("count", &format!("only a denied event may count more than 1 request, got {count}")));
        }
        let user = match self.user.as_deref().map(labels::user) {
            None => return Err(invalid("user", "required when denied is null")),
            Some(Err(why)) => return Err(invalid("user", why)),
            Some(Ok(user)) => user.to_owned(),
        };
        let count = |n: Option<UInt<0, MAX_TOKENS>>| n.map_or(0, |n| n.0);
        let tokens = Tokens {
            prompt: count(self.prompt_tokens),
            completion: count(self.completion_tokens),
            cached: count(self.cached_tokens),
            reasoning: count(self.reasoning_tokens),
        };
        let reports_usage = tokens.any() || self.model.as_deref().is_some_and(|m| !m.trim().is_empty());
        let usage = Usage {
            user,
            groups: labels::groups_label(&self.groups.map(|g| g.0).unwrap_or_default()),
            model: reports_usage.then(|| labels::model_label(self.model.as_deref()).into_owned()),
            tokens,
            incomplete: self.incomplete.unwrap_or(false),
            upstream_error: self.status.is_some_and(|s| s.0 >= 500),
            estimated: self.usage_estimated.unwrap_or(false),
        };
        Ok(Event { id: self.id.map(Cow::into_owned), path, ts_ms, status, outcome: Outcome::Authorized(usage) })
    }
}

/// An integer from `MIN` to `MAX`.
#[derive(Debug, Clone, Copy)]
struct UInt<const MIN: u64, const MAX: u64>(u64);

impl<'de, const MIN: u64, const MAX: u64> Deserialize<'de> for UInt<MIN, MAX> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V<const MIN: u64, const MAX: u64>;
        impl<const MIN: u64, const MAX: u64> Visitor<'_> for V<MIN, MAX> {
            type Value = UInt<MIN, MAX>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(if MIN == 0 { "a non-negative integer" } else { "a positive integer" })
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                if v < MIN || v > MAX {
                    let expected = if MIN == 0 {
                        format!("an integer up to {MAX}")
                    } else {
                        format!("an integer from {MIN} to {MAX}")
                    };
                    return Err(E::invalid_value(Unexpected::Unsigned(v), &expected.as_str()));
                }
                Ok(UInt(v))
            }
        }
        deserializer.deserialize_u64(V::<MIN, MAX>)
    }
}

/// `groups`: an array of strings, or one comma-separated string (as Authorino and the
/// identity header carry them).
#[derive(Debug, Default)]
struct Groups(Vec<String>);

impl<'de> Deserialize<'de> for Groups {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Groups;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array of strings or a comma-separated string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Groups, E> {
                Ok(Groups(v.split(',').map(str::to_owned).collect()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Groups, A::Error> {
                let mut groups = Vec::new();
                while let Some(group) = seq.next_element::<String>()? {
                    groups.push(group);
                }
                Ok(Groups(groups))
            }
        }
        deserializer.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(user: &str, groups: &str, model: Option<&str>, tokens: [u64; 4]) -> Outcome {
        let [prompt, completion, cached, reasoning] = tokens;
        Outcome::Authorized(Usage {
            user: user.into(),
            groups: groups.into(),
            model: model.map(Into::into),
            tokens: Tokens { prompt, completion, cached, reasoning },
            incomplete: false,
            upstream_error: false,
            estimated: false,
        })
    }

    fn one(body: &str) -> Event {
        let Parsed { mut events, rejected } = parse_body(body.as_bytes(), 10).unwrap();
        assert_eq!(rejected, vec![]);
        assert_eq!(events.len(), 1);
        events.remove(0)
    }

    #[test]
    fn good_events() {
        let full = r#"{"id":"e1","ts":1763800000.125,"user":"mittens","groups":["premium"],
            "method":"POST","host":"gw.example","path":"/v1/chat/completions","model":"Qwen/Qwen3-0.6B",
            "status":200,"prompt_tokens":12,"completion_tokens":7,"cached_tokens":0,"reasoning_tokens":0,
            "incomplete":false,"denied":null}"#;
        let cases: Vec<(&str, Option<&str>, &str, Outcome)> = vec![
            (
                full,
                Some("e1"),
                "/v1/chat/completions",
                usage("mittens", "premium", Some("Qwen/Qwen3-0.6B"), [12, 7, 0, 0]),
            ),
            // Authorino callback: no id, no usage.
            (
                r#"{"groups":"premium, free","host":"gw","method":"POST","path":"/v1/completions?x=1","user":"bob"}"#,
                None,
                "/v1/completions",
                usage("bob", "free,premium", None, [0; 4]),
            ),
            // Tokens without a model: model label "unknown".
            (
                r#"{"id":"e2","user":"a","prompt_tokens":3}"#,
                Some("e2"),
                "other",
                usage("a", "", Some("unknown"), [3, 0, 0, 0]),
            ),
            // Nulls mean absent; unknown fields are ignored.
            (
                r#"{"id":"e3","user":"a","model":null,"groups":null,"status":null,"future_field":{"x":[1]}}"#,
                Some("e3"),
                "other",
                usage("a", "", None, [0; 4]),
            ),
            // Denied: user not needed, reason normalised.
            (
                r#"{"id":"e4","denied":"invalid_api_key","path":"/v1/models/"}"#,
                Some("e4"),
                "/v1/models",
                Outcome::Denied { reason: "invalid_credential", count: 1 },
            ),
            (
                r#"{"id":"e5","denied":"","user":"x"}"#,
                Some("e5"),
                "other",
                Outcome::Denied { reason: "other", count: 1 },
            ),
            // Aggregated denials: `count` requests in one event.
            (
                r#"{"id":"e6","ts":1763800000.1,"denied":"missing_credential","path":"/v1/models","count":137}"#,
                Some("e6"),
                "/v1/models",
                Outcome::Denied { reason: "missing_credential", count: 137 },
            ),
            (
                r#"{"id":"e7","denied":"rate_limited","count":1000000000}"#,
                Some("e7"),
                "other",
                Outcome::Denied { reason: "rate_limited", count: MAX_DENIED_COUNT },
            ),
            (
                r#"{"id":"e8","denied":"rate_limited","count":null}"#,
                Some("e8"),
                "other",
                Outcome::Denied { reason: "rate_limited", count: 1 },
            ),
            // count 1 is every authorized event's count.
            (r#"{"id":"e9","user":"a","count":1}"#, Some("e9"), "other", usage("a", "", None, [0; 4])),
            // Group names holding the separator are dropped; user and groups trimmed.
            (
                r#"{"id":"e10","user":" a ","groups":["x,y"," b ","a"]}"#,
                Some("e10"),
                "other",
                usage("a", "a,b", None, [0; 4]),
            ),
        ];
        for (body, id, path, outcome) in cases {
            let event = one(body);
            assert_eq!(event.id.as_deref(), id, "{body}");
            assert_eq!(event.path, path, "{body}");
            assert_eq!(event.outcome, outcome, "{body}");
        }
    }

    #[test]
    fn flags() {
        let e = one(r#"{"id":"e","user":"u","status":503,"incomplete":true,"usage_missing":true}"#);
        let Outcome::Authorized(u) = e.outcome else { panic!("not authorized") };
        assert!(u.incomplete && u.upstream_error);
        let e = one(r#"{"id":"e","user":"u","status":499}"#);
        let Outcome::Authorized(u) = e.outcome else { panic!("not authorized") };
        assert!(!u.incomplete && !u.upstream_error);
    }

    #[test]
    fn arrays_and_limits() {
        assert_eq!(parse_body(b"[]", 10).unwrap(), Parsed::default());
        assert_eq!(
            parse_body(b" [{\"id\":\"a\",\"user\":\"u\"},{\"id\":\"b\",\"user\":\"u\"}] ", 10).unwrap().events.len(),
            2
        );
        let err = parse_body(b"[{\"id\":\"a\",\"user\":\"u\"},{\"id\":\"b\",\"user\":\"u\"}]", 1).unwrap_err();
        assert!(matches!(err, TrackError::TooLarge(_)), "{err:?}");
    }

    #[test]
    fn bad_bodies() {
        let long_id = format!(r#"{{"id":"{}","user":"u"}}"#, "x".repeat(129));
        let cases: Vec<(&str, &str, &str)> = vec![
            // (body, reason, message)
            ("", "bad_json", "body is not valid JSON: EOF while parsing a value at line 1 column 0"),
            ("hello", "bad_json", "body is not valid JSON: expected value at line 1 column 1"),
            ("{\"id\":", "bad_json", "body is not valid JSON: EOF while parsing a value at line 1 column 6"),
            (
                "{\"id\":\"a\",\"user\":\"u\"} trailing",
                "bad_json",
                "body is not valid JSON: trailing characters at line 1 column 23",
            ),
            (
                "[{\"id\":\"a\",\"user\":\"u\"},]",
                "bad_json",
                "body is not valid JSON: trailing comma at line 1 column 24",
            ),
            ("42", "invalid_event", "body: expected an event object or an array of events"),
            ("\"x\"", "invalid_event", "body: expected an event object or an array of events"),
            ("null", "invalid_event", "body: expected an event object or an array of events"),
            ("[1]", "invalid_event", "events[0]: invalid type: integer `1`, expected an event object"),
            (
                r#"{"id":"a","user":"u","prompt_tokens":-1}"#,
                "invalid_event",
                "prompt_tokens: invalid type: integer `-1`, expected a non-negative integer",
            ),
            (
                r#"[{"id":"a","user":"u","prompt_tokens":-1},{"id":"b"}]"#,
                "invalid_event",
                "events[0].prompt_tokens: invalid type: integer `-1`, expected a non-negative integer",
            ),
            (
                r#"{"id":"a","user":"u","completion_tokens":1.5}"#,
                "invalid_event",
                "completion_tokens: invalid type: floating point `1.5`, expected a non-negative integer",
            ),
            (
                r#"{"id":"a","user":"u","cached_tokens":"3"}"#,
                "invalid_event",
                "cached_tokens: invalid type: string \"3\", expected a non-negative integer",
            ),
            (
                r#"{"id":"a","user":"u","reasoning_tokens":9007199254740992}"#,
                "invalid_event",
                "reasoning_tokens: invalid value: integer `9007199254740992`, expected an integer up to 9007199254740991",
            ),
            (
                r#"{"id":"a","user":"u","prompt_tokens":1e30}"#,
                "invalid_event",
                "prompt_tokens: invalid type: floating point `1e+30`, expected a non-negative integer",
            ),
            (
                r#"{"id":"a","user":"u","status":1000}"#,
                "invalid_event",
                "status: invalid value: integer `1000`, expected an integer up to 999",
            ),
            (
                r#"{"id":"a","user":"u","status":"200"}"#,
                "invalid_event",
                "status: invalid type: string \"200\", expected a non-negative integer",
            ),
            (r#"{"id":7,"user":"u"}"#, "invalid_event", "id: invalid type: integer `7`, expected a string"),
            (r#"{"id":"","user":"u"}"#, "invalid_event", "id: must be 1 to 128 characters, got 0"),
            (&long_id, "invalid_event", "id: must be 1 to 128 characters, got 129"),
            (
                r#"{"user":"u","prompt_tokens":1}"#,
                "invalid_event",
                "id: required (only an Authorino callback body may omit it)",
            ),
            (
                r#"{"user":"u","denied":"rate_limited"}"#,
                "invalid_event",
                "id: required (only an Authorino callback body may omit it)",
            ),
            (r#"{"id":"a"}"#, "invalid_event", "user: required when denied is null"),
            (r#"{"id":"a","denied":null}"#, "invalid_event", "user: required when denied is null"),
            (r#"{"groups":["a"],"path":"/v1/models"}"#, "invalid_event", "user: required when denied is null"),
            (r#"{"id":"a","user":" "}"#, "invalid_event", "user: must not be empty"),
            (r#"{"id":"a","user":["u"]}"#, "invalid_event", "user: invalid type: sequence, expected a string"),
            (
                r#"{"id":"a","user":"u","groups":7}"#,
                "invalid_event",
                "groups: invalid type: integer `7`, expected an array of strings or a comma-separated string",
            ),
            (
                r#"{"id":"a","user":"u","groups":["a",1]}"#,
                "invalid_event",
                "groups[1]: invalid type: integer `1`, expected a string",
            ),
            (
                r#"[{"id":"a","user":"u","groups":["a",1]}]"#,
                "invalid_event",
                "events[0].groups[1]: invalid type: integer `1`, expected a string",
            ),
            (
                r#"{"id":"a","user":"u","incomplete":"yes"}"#,
                "invalid_event",
                "incomplete: invalid type: string \"yes\", expected a boolean",
            ),
            (
                r#"{"id":"a","user":"u","usage_missing":1}"#,
                "invalid_event",
                "usage_missing: invalid type: integer `1`, expected a boolean",
            ),
            (
                r#"{"id":"a","denied":false}"#,
                "invalid_event",
                "denied: invalid type: boolean `false`, expected a string",
            ),
            (r#"{"id":"a","user":"u","ts":"now"}"#, "invalid_event", "ts: invalid type: string \"now\", expected f64"),
            (
                r#"{"id":"a","user":"u","model":1}"#,
                "invalid_event",
                "model: invalid type: integer `1`, expected a string",
            ),
            (r#"{"id":"a","user":"u","path":{}}"#, "invalid_event", "path: invalid type: map, expected a string"),
            (
                r#"{"id":"a","user":"u","method":1}"#,
                "invalid_event",
                "method: invalid type: integer `1`, expected a string",
            ),
            (
                r#"{"id":"a","user":"u","host":true}"#,
                "invalid_event",
                "host: invalid type: boolean `true`, expected a string",
            ),
            (r#"{"id":"a","id":"b","user":"u"}"#, "invalid_event", "event: duplicate field `id`"),
            // `count`: aggregated denials only, 1..=MAX_DENIED_COUNT.
            (
                r#"{"id":"a","user":"u","count":2}"#,
                "invalid_event",
                "count: only a denied event may count more than 1 request, got 2",
            ),
            (
                r#"{"id":"a","denied":"rate_limited","count":0}"#,
                "invalid_event",
                "count: invalid value: integer `0`, expected an integer from 1 to 1000000000",
            ),
            (
                r#"{"id":"a","user":"u","count":0}"#,
                "invalid_event",
                "count: invalid value: integer `0`, expected an integer from 1 to 1000000000",
            ),
            (
                r#"{"id":"a","denied":"rate_limited","count":1000000001}"#,
                "invalid_event",
                "count: invalid value: integer `1000000001`, expected an integer from 1 to 1000000000",
            ),
            (
                r#"{"id":"a","denied":"rate_limited","count":-3}"#,
                "invalid_event",
                "count: invalid type: integer `-3`, expected a positive integer",
            ),
            (
                r#"{"id":"a","denied":"rate_limited","count":"3"}"#,
                "invalid_event",
                "count: invalid type: string \"3\", expected a positive integer",
            ),
            (
                r#"{"id":"a","denied":"rate_limited","count":2.0}"#,
                "invalid_event",
                "count: invalid type: floating point `2.0`, expected a positive integer",
            ),
            (
                r#"{"denied":"rate_limited","count":3}"#,
                "invalid_event",
                "id: required (only an Authorino callback body may omit it)",
            ),
            (r#"{"user":"u","count":1}"#, "invalid_event", "id: required (only an Authorino callback body may omit it)"),
            // A bad event in a body that is not JSON: the body is what is wrong.
            (
                r#"{"id":7,"user":"u"} trailing"#,
                "bad_json",
                "body is not valid JSON: trailing characters at line 1 column 21",
            ),
            (
                r#"[{"id":7,"user":"u"},]"#,
                "bad_json",
                "body is not valid JSON: trailing comma at line 1 column 22",
            ),
            (r#"[{"id":7},{"id":"b"}"#, "bad_json", "body is not valid JSON: EOF while parsing a list at line 1 column 20"),
            // Every event bad: the first one's message (all are listed, see below).
            (
                r#"[{"id":"a","user":" "},1,{"id":"c","user":"u","status":-1}]"#,
                "invalid_event",
                "events[0].user: must not be empty",
            ),
            // Over the batch limit, bad events or not.
            ("[1,1,1,1,1,1,1,1,1,1,1]", "too_large", "batch of 11 events is over the limit of 10"),
        ];
        for (body, reason, message) in cases {
            let err = parse_body(body.as_bytes(), 10).unwrap_err();
            assert_eq!(err.rejected_reason(), Some(reason), "{body}: {err:?}");
            assert_eq!(err.message(), message, "{body}");
        }
        // Bodies that could hold more events than the limit are counted first: the same
        // answers (limit 10, so bodies over 30 bytes).
        let many = format!("[{}]", ["{}"; 40].join(","));
        let unterminated = format!("[{}", ["{}"; 40].join(","));
        let spaced_ten = format!("[{}]", [r#"{"id":"a","user":"u"}"#; 10].join(" , "));
        let err = parse_body(many.as_bytes(), 10).unwrap_err();
        assert_eq!(
            (err.rejected_reason(), err.message()),
            (Some("too_large"), "batch of 40 events is over the limit of 10")
        );
        let err = parse_body(unterminated.as_bytes(), 10).unwrap_err();
        let whole = serde_json::from_str::<Vec<IgnoredAny>>(&unterminated).unwrap_err();
        assert_eq!(err.message(), format!("body is not valid JSON: {whole}"));
        assert_eq!(parse_body(spaced_ten.as_bytes(), 10).unwrap().events.len(), 10);
    }

    #[test]
    fn a_bad_event_costs_only_itself() {
        let long_id = format!(r#"[{{"id":"{}","user":"u"}},{{"id":"b","user":"u"}}]"#, "x".repeat(129));
        let cases: Vec<(&str, Vec<&str>, Vec<(usize, &str)>)> = vec![
            // (body, ids of the good events, (index, message) of the bad ones)
            (
                r#"[{"id":"a","user":"u"},{"id":"b","user":"u","prompt_tokens":-1},{"id":"c","user":"u"},1,{"id":"d"},
                   {"id":"e","denied":"rate_limited","count":5},{"id":"f","user":"u","count":5}]"#,
                vec!["a", "c", "e"],
                vec![
                    (1, "events[1].prompt_tokens: invalid type: integer `-1`, expected a non-negative integer"),
                    (3, "events[3]: invalid type: integer `1`, expected an event object"),
                    (4, "events[4].user: required when denied is null"),
                    (6, "events[6].count: only a denied event may count more than 1 request, got 5"),
                ],
            ),
            // The last one bad; whitespace and escapes inside the elements.
            (
                "[ {\"id\":\"a\",\"user\":\"\\u00e9\"} ,\n {\"id\":\"b\\\"\",\"user\":\"\\\"u\\\"\",\"groups\":[\"g\",2]} ]",
                vec!["a"],
                vec![(1, "events[1].groups[1]: invalid type: integer `2`, expected a string")],
            ),
            // Copies of one id: both kept here (the duplicate is dropped when counted).
            (
                r#"[{"id":"a","user":"u"},{"id":"a","user":"u","status":1000},{"id":"a","user":"u"}]"#,
                vec!["a", "a"],
                vec![(1, "events[1].status: invalid value: integer `1000`, expected an integer up to 999")],
            ),
            // Only the check after parsing fails (an over-long id).
            (
                &long_id,
                vec!["b"],
                vec![(0, "events[0].id: must be 1 to 128 characters, got 129")],
            ),
        ];
        for (body, ids, bad) in cases {
            let parsed = parse_body(body.as_bytes(), 10).unwrap_or_else(|e| panic!("{body}: {e:?}"));
            let got: Vec<&str> = parsed.events.iter().map(|e| e.id.as_deref().unwrap_or("")).collect();
            assert_eq!(got, ids, "{body}");
            let want: Vec<Rejected> = bad.iter().map(|(i, m)| Rejected::invalid_event(*i, (*m).to_owned())).collect();
            assert_eq!(parsed.rejected, want, "{body}");
        }
        // Every event bad: an error listing all of them.
        let err = parse_body(br#"[{"id":"a","user":" "},1]"#, 10).unwrap_err();
        assert_eq!(
            err,
            TrackError::InvalidEvents(vec![
                Rejected::invalid_event(0, "events[0].user: must not be empty".into()),
                Rejected::invalid_event(1, "events[1]: invalid type: integer `1`, expected an event object".into()),
            ])
        );
        assert_eq!(err.rejected_count(), 2);
        // A lone bad event is index 0, without a prefix.
        let err = parse_body(br#"{"id":"a","user":"u","prompt_tokens":-1}"#, 10).unwrap_err();
        let want = "prompt_tokens: invalid type: integer `-1`, expected a non-negative integer";
        assert_eq!(err, TrackError::InvalidEvents(vec![Rejected::invalid_event(0, want.into())]));
    }
}
