#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code: a panic is a failed test
//! The service over real HTTP on loopback: the router is served in-process on an
//! ephemeral port and spoken to with reqwest, so routing, body limits, status codes and
//! the exact metric text are all checked as a client sees them.

use std::sync::Arc;

use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use usage_tracking::http::OPENMETRICS;
use usage_tracking::{serve, Limits, Tracker};

struct Server {
    base: String,
    client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(limits: Limits) -> Server {
        Server::start_tracker(Tracker::new(limits)).await
    }

    async fn start_tracker(tracker: Tracker) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
        };
        let task = tokio::spawn(serve(listener, Arc::new(tracker), shutdown));
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        Server { base, client, stop: Some(stop), task }
    }

    async fn default() -> Server {
        Server::start(Limits::default()).await
    }

    async fn track(&self, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let response = self
            .client
            .post(format!("{}/track", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    async fn track_json(&self, body: &Value) -> Value {
        let (status, answer) = self.track(body.to_string()).await;
        assert_eq!(status, 200, "{answer}");
        answer
    }

    async fn metrics(&self) -> String {
        let response = self.client.get(format!("{}/metrics", self.base)).send().await.unwrap();
        assert_eq!(response.status(), 200);
        response.text().await.unwrap()
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            stop.send(()).unwrap();
        }
        self.task.await.unwrap().unwrap();
    }
}

/// The value of the series written exactly as `series` (name and labels in order).
fn value(text: &str, series: &str) -> Option<String> {
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ').map(str::to_owned))
}

fn assert_series(text: &str, expected: &[(&str, &str)]) {
    for (series, want) in expected {
        assert_eq!(value(text, series).as_deref(), Some(*want), "series {series} in:\n{text}");
    }
}

/// The lines of series whose name starts with `prefix`, sorted (families are hash maps,
/// so their order is not fixed).
fn series_lines(text: &str, prefix: &str) -> Vec<String> {
    let mut lines: Vec<String> = text.lines().filter(|l| l.starts_with(prefix)).map(str::to_owned).collect();
    lines.sort();
    lines
}

fn example_event(id: &str) -> Value {
    json!({"id": id, "ts": 1763800000.125,
        "user": "mittens", "groups": ["premium"],
        "method": "POST", "host": "gw.example", "path": "/v1/chat/completions",
        "model": "Qwen/Qwen3-0.6B", "status": 200,
        "prompt_tokens": 12, "completion_tokens": 7, "cached_tokens": 0, "reasoning_tokens": 0,
        "incomplete": false, "denied": null})
}

#[tokio::test]
async fn healthz_and_json_errors_for_unknown_routes() {
    let server = Server::default().await;
    let get = |path: &str| server.client.get(format!("{}{path}", server.base)).send();
    let response = get("/healthz").await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap(), json!({"status": "ok"}));
    let cases = [("/nope", 404, "no route for GET /nope"), ("/track", 405, "GET is not allowed on /track")];
    for (path, status, message) in cases {
        let response = get(path).await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body, json!({"error": {"message": message, "type": "invalid_request_error"}}), "{path}");
    }
    server.stop().await;
}

#[tokio::test]
async fn metrics_format_and_self_metrics_at_start() {
    let server = Server::default().await;
    let response = server.client.get(format!("{}/metrics", server.base)).send().await.unwrap();
    assert_eq!(response.headers()["content-type"], OPENMETRICS);
    let text = response.text().await.unwrap();
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert_series(
        &text,
        &[
            ("tracker_events_received_total", "0"),
            ("tracker_events_duplicate_total", "0"),
            ("tracker_requests_rejected_total{reason=\"bad_json\"}", "0"),
            ("tracker_requests_rejected_total{reason=\"invalid_event\"}", "0"),
            ("tracker_requests_rejected_total{reason=\"too_large\"}", "0"),
            ("tracker_requests_rejected_total{reason=\"unauthorized\"}", "0"),
            ("tracker_series_overflow_total", "0"),
        ],
    );
    server.stop().await;
}

#[tokio::test]
async fn single_event_makes_exact_series() {
    let server = Server::default().await;
    let answer = server.track_json(&example_event("e1")).await;
    assert_eq!(answer, json!({"accepted": 1, "duplicates": 0, "rejected": []}));
    let text = server.metrics().await;
    assert!(text.contains("# TYPE llm_requests counter\n"), "{text}");
    assert!(text.contains("# TYPE llm_tokens counter\n"), "{text}");
    let labels = r#"user="mittens",groups="premium""#;
    let tokens = format!(r#"llm_tokens_total{{{labels},model="Qwen/Qwen3-0.6B",type="#);
    assert_series(
        &text,
        &[
            (&format!(r#"llm_requests_total{{{labels},path="/v1/chat/completions"}}"#), "1"),
            (&format!(r#"{tokens}"prompt"}}"#), "12"),
            (&format!(r#"{tokens}"completion"}}"#), "7"),
            (&format!(r#"{tokens}"cached"}}"#), "0"),
            (&format!(r#"{tokens}"reasoning"}}"#), "0"),
            ("tracker_events_received_total", "1"),
            ("tracker_events_duplicate_total", "0"),
        ],
    );
    assert!(series_lines(&text, "llm_denied_requests_total").is_empty());
    assert!(series_lines(&text, "llm_incomplete_requests_total").is_empty());
    assert!(series_lines(&text, "llm_upstream_errors_total").is_empty());
    server.stop().await;
}

#[tokio::test]
async fn array_of_events() {
    let server = Server::default().await;
    let batch = json!([
        example_event("a1"),
        example_event("a2"),
        {"id": "a3", "user": "bob", "groups": "free, premium", "path": "/v1/embeddings?x=1",
         "model": "", "prompt_tokens": 5, "status": 502, "incomplete": true},
        {"id": "a4", "user": "bob", "groups": ["premium", "free"], "path": "/v1/completions/",
         "model": "m", "completion_tokens": 3, "reasoning_tokens": 2, "cached_tokens": 1},
        {"id": "a5", "denied": "invalid_credential", "path": "/v1/chat/completions"},
        {"id": "a6", "denied": "rate_limit_exceeded", "path": "/admin"},
        {"id": "a7", "denied": "made-up", "path": "/v1/chat/completions", "user": "ignored"},
    ]);
    assert_eq!(server.track_json(&batch).await, json!({"accepted": 7, "duplicates": 0, "rejected": []}));
    let text = server.metrics().await;
    assert_series(
        &text,
        &[
            (r#"llm_requests_total{user="mittens",groups="premium",path="/v1/chat/completions"}"#, "2"),
            (r#"llm_tokens_total{user="mittens",groups="premium",model="Qwen/Qwen3-0.6B",type="prompt"}"#, "24"),
            (r#"llm_tokens_total{user="mittens",groups="premium",model="Qwen/Qwen3-0.6B",type="completion"}"#, "14"),
            (r#"llm_requests_total{user="bob",groups="free,premium",path="/v1/embeddings"}"#, "1"),
            (r#"llm_requests_total{user="bob",groups="free,premium",path="/v1/completions"}"#, "1"),
            (r#"llm_tokens_total{user="bob",groups="free,premium",model="unknown",type="prompt"}"#, "5"),
            (r#"llm_tokens_total{user="bob",groups="free,premium",model="m",type="completion"}"#, "3"),
            (r#"llm_tokens_total{user="bob",groups="free,premium",model="m",type="cached"}"#, "1"),
            (r#"llm_tokens_total{user="bob",groups="free,premium",model="m",type="reasoning"}"#, "2"),
            (r#"llm_incomplete_requests_total{user="bob",groups="free,premium",path="/v1/embeddings"}"#, "1"),
            (r#"llm_upstream_errors_total{user="bob",groups="free,premium",path="/v1/embeddings"}"#, "1"),
            (r#"llm_denied_requests_total{reason="invalid_credential",path="/v1/chat/completions"}"#, "1"),
            (r#"llm_denied_requests_total{reason="rate_limited",path="other"}"#, "1"),
            (r#"llm_denied_requests_total{reason="other",path="/v1/chat/completions"}"#, "1"),
            ("tracker_events_received_total", "7"),
        ],
    );
    assert_eq!(series_lines(&text, "llm_requests_total").len(), 3, "{text}");
    assert_eq!(series_lines(&text, "llm_tokens_total").len(), 12, "{text}");
    assert!(!text.contains("ignored"), "denied events carry no user: {text}");
    server.stop().await;
}

#[tokio::test]
async fn authorino_callback_counts_a_request_without_tokens() {
    let server = Server::default().await;
    let body = json!({"groups": "premium,free", "host": "gw.example", "method": "POST",
        "path": "/v1/chat/completions", "user": "alice"});
    for _ in 0..2 {
        // No id, so no dedup: every callback counts.
        assert_eq!(server.track_json(&body).await, json!({"accepted": 1, "duplicates": 0, "rejected": []}));
    }
    let text = server.metrics().await;
    assert_series(
        &text,
        &[(r#"llm_requests_total{user="alice",groups="free,premium",path="/v1/chat/completions"}"#, "2")],
    );
    assert!(series_lines(&text, "llm_tokens_total").is_empty(), "{text}");
    server.stop().await;
}

#[tokio::test]
async fn duplicate_ids_count_once_within_and_across_batches() {
    let server = Server::default().await;
    let first = json!([example_event("d1"), example_event("d1"), example_event("d2")]);
    assert_eq!(server.track_json(&first).await, json!({"accepted": 2, "duplicates": 1, "rejected": []}));
    // A retried batch: everything already counted.
    assert_eq!(server.track_json(&first).await, json!({"accepted": 0, "duplicates": 3, "rejected": []}));
    let second = json!([example_event("d2"), example_event("d3")]);
    assert_eq!(server.track_json(&second).await, json!({"accepted": 1, "duplicates": 1, "rejected": []}));
    // A denied event's id is remembered too.
    let denied = json!({"id": "d4", "denied": "missing_credential", "path": "/v1/models"});
    assert_eq!(server.track_json(&denied).await, json!({"accepted": 1, "duplicates": 0, "rejected": []}));
    assert_eq!(server.track_json(&denied).await, json!({"accepted": 0, "duplicates": 1, "rejected": []}));
    let text = server.metrics().await;
    assert_series(
        &text,
        &[
            (r#"llm_requests_total{user="mittens",groups="premium",path="/v1/chat/completions"}"#, "3"),
            (r#"llm_tokens_total{user="mittens",groups="premium",model="Qwen/Qwen3-0.6B",type="prompt"}"#, "36"),
            (r#"llm_denied_requests_total{reason="missing_credential",path="/v1/models"}"#, "1"),
            ("tracker_events_received_total", "10"),
            ("tracker_events_duplicate_total", "6"),
        ],
    );
    server.stop().await;
}

#[tokio::test]
async fn dedup_window_forgets_the_oldest_ids() {
    let server = Server::start(Limits { dedup_window: 2, ..Limits::default() }).await;
    for id in ["w1", "w2", "w3"] {
        server.track_json(&example_event(id)).await;
    }
    // w1 fell out of the window of 2, so it counts again; w3 is still remembered.
    assert_eq!(server.track_json(&example_event("w1")).await, json!({"accepted": 1, "duplicates": 0, "rejected": []}));
    assert_eq!(server.track_json(&example_event("w1")).await, json!({"accepted": 0, "duplicates": 1, "rejected": []}));
    server.stop().await;
}

#[tokio::test]
async fn bad_input_is_refused_and_changes_no_usage_counter() {
    let server = Server::start(Limits { max_batch: 3, ..Limits::default() }).await;
    // Something counted already, so "unchanged" means more than "still empty".
    server.track_json(&example_event("seed")).await;
    let good = example_event("good");
    let rejected = |i: usize, message: &str| json!({"index": i, "reason": "invalid_event", "message": message});
    let cases: Vec<(String, u16, &str, &str, Option<Value>)> = vec![
        // (body, status, reason, message, the `rejected` list: only when events were bad).
        // A bad body is counted once; every bad event once.
        ("".into(), 400, "bad_json", "body is not valid JSON: EOF while parsing a value at line 1 column 0", None),
        ("<xml/>".into(), 400, "bad_json", "body is not valid JSON: expected value at line 1 column 1", None),
        (
            "{\"id\":\"x\",".into(),
            400,
            "bad_json",
            "body is not valid JSON: EOF while parsing a value at line 1 column 10",
            None,
        ),
        // A syntax error anywhere makes the whole body bad, good events and all.
        (
            format!("[{good},{{\"id\":\"b\",\"user\":\"u\",\"prompt_tokens\":-1}},]"),
            400,
            "bad_json",
            "body is not valid JSON: trailing comma at line 1 column 333",
            None,
        ),
        ("42".into(), 400, "invalid_event", "body: expected an event object or an array of events", None),
        // Only bad events: 400, all of them listed.
        (
            json!([{"id": "b1", "user": " "}, 7, {"id": "b3", "user": "u", "prompt_tokens": -1}]).to_string(),
            400,
            "invalid_event",
            "events[0].user: must not be empty",
            Some(json!([
                rejected(0, "events[0].user: must not be empty"),
                rejected(1, "events[1]: invalid type: integer `7`, expected an event object"),
                rejected(2, "events[2].prompt_tokens: invalid type: integer `-1`, expected a non-negative integer"),
            ])),
        ),
        (
            json!({"id": "b", "prompt_tokens": 1}).to_string(),
            400,
            "invalid_event",
            "user: required when denied is null",
            Some(json!([rejected(0, "user: required when denied is null")])),
        ),
        (
            json!({"user": "u", "model": "m"}).to_string(),
            400,
            "invalid_event",
            "id: required (only an Authorino callback body may omit it)",
            Some(json!([rejected(0, "id: required (only an Authorino callback body may omit it)")])),
        ),
        (
            json!({"id": "b", "user": "u", "groups": [1]}).to_string(),
            400,
            "invalid_event",
            "groups[0]: invalid type: integer `1`, expected a string",
            Some(json!([rejected(0, "groups[0]: invalid type: integer `1`, expected a string")])),
        ),
        (
            json!({"id": "b", "user": "u", "denied": 1}).to_string(),
            400,
            "invalid_event",
            "denied: invalid type: integer `1`, expected a string",
            Some(json!([rejected(0, "denied: invalid type: integer `1`, expected a string")])),
        ),
        (
            json!({"id": "b", "user": "u", "count": 3}).to_string(),
            400,
            "invalid_event",
            "count: only a denied event may count more than 1 request, got 3",
            Some(json!([rejected(0, "count: only a denied event may count more than 1 request, got 3")])),
        ),
        (
            json!([good, good, good, good]).to_string(),
            413,
            "too_large",
            "batch of 4 events is over the limit of 3",
            None,
        ),
        (json!([good, 1, 2, 3]).to_string(), 413, "too_large", "batch of 4 events is over the limit of 3", None),
    ];
    for (body, status, reason, message, rejected) in cases {
        let before = server.metrics().await;
        let (got_status, answer) = server.track(body.clone()).await;
        assert_eq!(got_status, status, "{body}: {answer}");
        let mut want = json!({"error": {"message": message, "type": "invalid_request_error"}});
        let counted = rejected.as_ref().map_or(1, |r| r.as_array().unwrap().len() as u64);
        if let Some(rejected) = rejected {
            want["rejected"] = rejected;
        }
        assert_eq!(answer, want, "{body}");
        let after = server.metrics().await;
        for prefix in ["llm_", "tracker_events_"] {
            assert_eq!(series_lines(&before, prefix), series_lines(&after, prefix), "{body}");
        }
        let series = format!("tracker_requests_rejected_total{{reason=\"{reason}\"}}");
        let count = |text: &str| value(text, &series).unwrap().parse::<u64>().unwrap();
        assert_eq!(count(&after), count(&before) + counted, "{body}");
    }
    // The refused bodies' good events were not remembered either: they count now.
    assert_eq!(server.track_json(&good).await, json!({"accepted": 1, "duplicates": 0, "rejected": []}));
    server.stop().await;
}

/// The value of `series` as a number (0 when absent).
fn number(text: &str, series: &str) -> u64 {
    value(text, series).map_or(0, |v| v.parse().unwrap())
}

#[tokio::test]
async fn a_bad_event_costs_only_itself() {
    let server = Server::default().await;
    let invalid = r#"tracker_requests_rejected_total{reason="invalid_event"}"#;
    let requests = r#"llm_requests_total{user="mittens",groups="premium",path="/v1/chat/completions"}"#;
    let prompt = r#"llm_tokens_total{user="mittens",groups="premium",model="Qwen/Qwen3-0.6B",type="prompt"}"#;
    let denied = r#"llm_denied_requests_total{reason="missing_credential",path="/v1/models"}"#;
    let mut too_many_tokens = example_event("m2");
    too_many_tokens["prompt_tokens"] = json!(9_007_199_254_740_992u64);
    let batch = json!([
        example_event("m1"),
        too_many_tokens,
        {"id": "m3", "denied": "missing_credential", "path": "/v1/models", "count": 137},
        {"id": "m4", "user": "mittens", "count": 2},
        example_event("m1"),
        "not an event",
        {"id": "m7", "user": "mittens", "groups": ["premium"], "path": "/v1/chat/completions/", "status": 1000},
        example_event("m8"),
    ]);
    let rejected = json!([
        {"index": 1, "reason": "invalid_event",
         "message": "events[1].prompt_tokens: invalid value: integer `9007199254740992`, expected an integer up to 9007199254740991"},
        {"index": 3, "reason": "invalid_event",
         "message": "events[3].count: only a denied event may count more than 1 request, got 2"},
        {"index": 5, "reason": "invalid_event",
         "message": "events[5]: invalid type: string \"not an event\", expected an event object"},
        {"index": 6, "reason": "invalid_event",
         "message": "events[6].status: invalid value: integer `1000`, expected an integer up to 999"},
    ]);
    // m1, m3 and m8 count; the second m1 is a duplicate; four events are bad.
    let answer = server.track_json(&batch).await;
    assert_eq!(answer, json!({"accepted": 3, "duplicates": 1, "rejected": rejected}));
    let text = server.metrics().await;
    assert_series(
        &text,
        &[
            (requests, "2"),
            (prompt, "24"),
            (denied, "137"),
            (invalid, "4"),
            ("tracker_events_received_total", "4"),
            ("tracker_events_duplicate_total", "1"),
        ],
    );
    assert_eq!(series_lines(&text, "llm_requests_total").len(), 1, "{text}");

    // The filter resends a batch it got no answer for: the good events are duplicates
    // now, the bad ones are reported (and counted) again.
    let answer = server.track_json(&batch).await;
    assert_eq!(answer, json!({"accepted": 0, "duplicates": 4, "rejected": rejected}));
    let text = server.metrics().await;
    assert_series(&text, &[(requests, "2"), (denied, "137"), (invalid, "8"), ("tracker_events_duplicate_total", "5")]);

    // One good event among bad ones is enough for a 200; with none, it is a 400.
    let one_good = json!([1, example_event("m9"), 2]);
    let answer = server.track_json(&one_good).await;
    assert_eq!(answer["accepted"], 1);
    assert_eq!(
        answer["rejected"].as_array().unwrap().iter().map(|r| r["index"].as_u64().unwrap()).collect::<Vec<_>>(),
        [0, 2]
    );
    let (status, answer) = server.track(json!([1, 2]).to_string()).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["rejected"].as_array().unwrap().len(), 2);
    let text = server.metrics().await;
    assert_series(&text, &[(requests, "3"), (invalid, "12"), ("tracker_events_received_total", "9")]);
    server.stop().await;
}

#[tokio::test]
async fn aggregated_denials_count_their_requests() {
    let server = Server::default().await;
    let series = |reason: &str, path: &str| format!(r#"llm_denied_requests_total{{reason="{reason}",path="{path}"}}"#);
    let batch = json!([
        {"id": "f1-missing-models", "ts": 1763800000.1, "denied": "missing_credential", "path": "/v1/models", "count": 137},
        {"id": "f1-rate-chat", "ts": 1763800000.1, "denied": "rate_limited", "path": "/v1/chat/completions", "count": 1_000_000_000u64},
        {"id": "f1-rate-chat-2", "denied": "rate_limit_exceeded", "path": "/v1/chat/completions?x=1", "count": 1},
        {"id": "f1-missing-models-2", "denied": "missing_credential", "path": "/v1/models"},
        {"id": "f1-other", "denied": "missing_credential", "path": "/v1/models", "count": null},
    ]);
    assert_eq!(server.track_json(&batch).await, json!({"accepted": 5, "duplicates": 0, "rejected": []}));
    let text = server.metrics().await;
    assert_series(
        &text,
        &[
            (&series("missing_credential", "/v1/models"), "139"),
            (&series("rate_limited", "/v1/chat/completions"), "1000000001"),
            ("tracker_events_received_total", "5"),
        ],
    );
    // An aggregated event is de-duplicated as a whole: resent, it adds nothing; the
    // next flush's event (a new id) adds its count.
    let resent = json!({"id": "f1-missing-models", "denied": "missing_credential", "path": "/v1/models", "count": 137});
    assert_eq!(server.track_json(&resent).await, json!({"accepted": 0, "duplicates": 1, "rejected": []}));
    let next = json!({"id": "f2-missing-models", "denied": "missing_credential", "path": "/v1/models", "count": 11});
    assert_eq!(server.track_json(&next).await, json!({"accepted": 1, "duplicates": 0, "rejected": []}));
    let text = server.metrics().await;
    assert_eq!(number(&text, &series("missing_credential", "/v1/models")), 150);
    assert!(series_lines(&text, "llm_requests_total").is_empty(), "{text}");
    assert_eq!(number(&text, r#"tracker_requests_rejected_total{reason="invalid_event"}"#), 0);
    server.stop().await;
}

#[tokio::test]
async fn oversized_body_gets_413() {
    let server = Server::start(Limits { max_body_bytes: 1024, ..Limits::default() }).await;
    let events: Vec<Value> = (0..40).map(|i| example_event(&format!("big{i}"))).collect();
    let body = Value::Array(events).to_string();
    assert!(body.len() > 4096);
    let before = server.metrics().await;
    let (status, answer) = server.track(body).await;
    assert_eq!(status, 413, "{answer}");
    assert_eq!(
        answer,
        json!({"error": {"message": "request body is over the size limit", "type": "invalid_request_error"}})
    );
    let after = server.metrics().await;
    assert_eq!(series_lines(&before, "llm_"), series_lines(&after, "llm_"));
    assert_series(
        &after,
        &[("tracker_requests_rejected_total{reason=\"too_large\"}", "1"), ("tracker_events_received_total", "0")],
    );
    server.stop().await;
}

#[tokio::test]
async fn cardinality_guard_folds_new_users_into_other() {
    let server = Server::start(Limits { max_users: 2, ..Limits::default() }).await;
    let batch: Vec<Value> = ["u1", "u2", "u3", "u4", "u1"]
        .iter()
        .enumerate()
        .map(|(i, user)| json!({"id": format!("c{i}"), "user": user, "path": "/v1/models"}))
        .collect();
    server.track_json(&Value::Array(batch)).await;
    let text = server.metrics().await;
    assert_series(
        &text,
        &[
            (r#"llm_requests_total{user="u1",groups="",path="/v1/models"}"#, "2"),
            (r#"llm_requests_total{user="u2",groups="",path="/v1/models"}"#, "1"),
            (r#"llm_requests_total{user="other",groups="",path="/v1/models"}"#, "2"),
        ],
    );
    assert_eq!(series_lines(&text, "llm_requests_total").len(), 3, "{text}");
    server.stop().await;
}

#[tokio::test]
async fn label_values_are_escaped_and_cut() {
    let server = Server::default().await;
    let long = "m".repeat(300);
    let event = json!({"id": "esc", "user": "a\"b\\c d", "model": long, "prompt_tokens": 1});
    server.track_json(&event).await;
    // A model name with control characters (from the upstream) is kept, replaced;
    // a user with one is a bad event (no identity has one).
    let batch = json!([
        {"id": "ctl-model", "user": "u", "model": "m\u{0}x\ny", "prompt_tokens": 2},
        {"id": "ctl-user", "user": "a\nb", "model": "m", "prompt_tokens": 3},
        {"id": "ctl\u{0}id", "user": "u", "model": "m", "prompt_tokens": 4},
    ]);
    let (status, answer) = server.track(batch.to_string()).await;
    assert_eq!((status, &answer["accepted"]), (200, &json!(1)), "{answer}");
    let rejected: Vec<u64> =
        answer["rejected"].as_array().unwrap().iter().map(|r| r["index"].as_u64().unwrap()).collect();
    assert_eq!(rejected, [1, 2], "{answer}");
    let text = server.metrics().await;
    let model = "m".repeat(128);
    assert_series(
        &text,
        &[
            (&format!(r#"llm_tokens_total{{user="a\"b\\c d",groups="",model="{model}",type="prompt"}}"#), "1"),
            ("llm_tokens_total{user=\"u\",groups=\"\",model=\"m\u{FFFD}x\u{FFFD}y\",type=\"prompt\"}", "2"),
        ],
    );
    assert!(!text.contains("a\\nb"), "{text}");
    server.stop().await;
}

#[tokio::test]
async fn shutdown_finishes_cleanly() {
    let server = Server::default().await;
    server.track_json(&example_event("s1")).await;
    // stop() asserts that serve() returned Ok after the shutdown signal.
    server.stop().await;
}

/// With `TRACKER_INGEST_TOKEN` set, `/track` takes usage only with `Authorization: Bearer
/// <token>`; anything else is a 401 that counts nothing but the refusal.
#[tokio::test]
async fn the_ingest_token_guards_track() {
    let server = Server::start_tracker(Tracker::new(Limits::default()).with_ingest_token(Some("gw-secret"))).await;
    // (authorization header, status)
    let cases: [(Option<&str>, u16); 7] = [
        (None, 401),
        (Some("Bearer wrong"), 401),
        (Some("Bearer gw-secret-but-longer"), 401),
        (Some("Basic gw-secret"), 401),
        (Some("gw-secret"), 401),
        (Some("Bearer gw-secret"), 200),
        (Some("bearer  gw-secret "), 200),
    ];
    for (i, (auth, want)) in cases.iter().enumerate() {
        let mut request = server
            .client
            .post(format!("{}/track", server.base))
            .header("content-type", "application/json")
            .body(example_event(&format!("t{i}")).to_string());
        if let Some(auth) = auth {
            request = request.header("authorization", *auth);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), *want, "{auth:?}");
        let body: Value = response.json().await.unwrap();
        if *want == 401 {
            assert!(body["error"]["message"].as_str().unwrap().contains("TRACKER_INGEST_TOKEN"), "{body}");
            assert!(!body.to_string().contains("gw-secret"), "{body}");
        }
    }
    let text = server.metrics().await;
    assert_series(
        &text,
        &[("tracker_requests_rejected_total{reason=\"unauthorized\"}", "5"), ("tracker_events_received_total", "2")],
    );
    server.stop().await;
    // Without a token /track stays open.
    let open = Server::start_tracker(Tracker::new(Limits::default()).with_ingest_token(Some(""))).await;
    assert_eq!(open.track(example_event("o").to_string()).await.0, 200);
    open.stop().await;
}

/// Estimated usage counts in llm_tokens_total (it was charged) and, apart, in
/// llm_estimated_tokens_total; llm_tokens_total keeps its labels.
#[tokio::test]
async fn estimated_usage_is_counted_apart() {
    let server = Server::default().await;
    let batch = json!([
        {"id": "e1", "user": "u", "path": "/v1/chat/completions", "model": "m", "prompt_tokens": 10, "completion_tokens": 5},
        {"id": "e2", "user": "u", "path": "/v1/chat/completions", "prompt_tokens": 25, "completion_tokens": 100,
         "usage_missing": true, "usage_estimated": true, "incomplete": true},
        {"id": "e3", "user": "u", "path": "/v1/chat/completions", "model": "m", "prompt_tokens": 1, "completion_tokens": 2,
         "usage_estimated": false},
    ]);
    server.track_json(&batch).await;
    let text = server.metrics().await;
    assert_series(
        &text,
        &[
            (r#"llm_tokens_total{user="u",groups="",model="m",type="prompt"}"#, "11"),
            (r#"llm_tokens_total{user="u",groups="",model="unknown",type="prompt"}"#, "25"),
            (r#"llm_tokens_total{user="u",groups="",model="unknown",type="completion"}"#, "100"),
            (r#"llm_estimated_tokens_total{user="u",groups="",model="unknown",type="prompt"}"#, "25"),
            (r#"llm_estimated_tokens_total{user="u",groups="",model="unknown",type="completion"}"#, "100"),
        ],
    );
    assert_eq!(series_lines(&text, "llm_estimated_tokens_total").len(), 2, "{text}");
    let (status, _) = server.track(json!({"id": "bad", "user": "u", "usage_estimated": "yes"}).to_string()).await;
    assert_eq!(status, 400);
    server.stop().await;
}

/// Beyond `max_series` label combinations, new ones fold into user/groups/model "other"
/// (each label alone under its own cap), and the overflow is counted.
#[tokio::test]
async fn the_series_cap_bounds_label_combinations() {
    let server = Server::start(Limits { max_series: 3, ..Limits::default() }).await;
    // (user, groups, path, model): 5 combinations of labels each well under its own cap.
    let events = [
        ("a", "g1", "/v1/models", None),
        ("a", "g2", "/v1/models", None),
        ("b", "g1", "/v1/chat/completions", Some("m")),
        ("b", "g2", "/v1/chat/completions", Some("m")),
        ("a", "g1", "/v1/models", None),
        ("c", "g3", "/v1/embeddings", Some("m2")),
    ];
    let batch: Vec<Value> = events
        .iter()
        .enumerate()
        .map(|(i, (user, groups, path, model))| {
            json!({"id": format!("s{i}"), "user": user, "groups": [groups], "path": path, "model": model, "prompt_tokens": 1})
        })
        .collect();
    server.track_json(&Value::Array(batch)).await;
    let text = server.metrics().await;
    assert_series(
        &text,
        &[
            (r#"llm_requests_total{user="a",groups="g1",path="/v1/models"}"#, "2"),
            (r#"llm_requests_total{user="a",groups="g2",path="/v1/models"}"#, "1"),
            (r#"llm_requests_total{user="b",groups="g1",path="/v1/chat/completions"}"#, "1"),
            (r#"llm_requests_total{user="other",groups="other",path="/v1/chat/completions"}"#, "1"),
            (r#"llm_requests_total{user="other",groups="other",path="/v1/embeddings"}"#, "1"),
            (r#"llm_tokens_total{user="other",groups="other",model="other",type="prompt"}"#, "2"),
            ("tracker_series_overflow_total", "2"),
        ],
    );
    server.stop().await;
}

/// A sender without the secret is refused on its headers: the 401 comes before the body
/// is read (here a body announced and never sent), so an unauthenticated client cannot
/// make the tracker buffer bodies.
#[tokio::test]
async fn secrets_are_checked_before_the_body_is_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tracker =
        Tracker::new(Limits::default()).with_ingest_token(Some("gw-secret")).with_admin_token(Some("admin-secret"));
    let server = Server::start_tracker(tracker).await;
    for path in ["/track", "/v1/limits/sync", "/v1/keys/resolve", "/v1/keys"] {
        let mut tcp = tokio::net::TcpStream::connect(server.base.trim_start_matches("http://")).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: tracker\r\nauthorization: Bearer wrong\r\n\
             content-type: application/json\r\ncontent-length: 1000\r\n\r\n"
        );
        tcp.write_all(head.as_bytes()).await.unwrap();
        let mut answer = vec![0u8; 2048];
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read(&mut answer))
            .await
            .unwrap_or_else(|_| panic!("{path}: no answer while the body is withheld"))
            .unwrap();
        let text = String::from_utf8_lossy(&answer[..n]);
        assert!(text.starts_with("HTTP/1.1 401"), "{path}: {text}");
    }
    server.stop().await;
}
