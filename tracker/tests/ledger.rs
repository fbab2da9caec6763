#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code: a panic is a failed test
//! The durable ledger, against both backends: SQLite in a temporary directory, and a
//! real PostgreSQL server that `tests/pg.sh` starts on loopback for this test process
//! (each test gets its own database). Every test runs once per backend; without
//! PostgreSQL's server binaries the PostgreSQL runs say "SKIP" and pass.
//!
//! The crash test spawns the real `usage-tracking` binary, streams batches at it from a
//! thread, `kill -9`s it mid-stream and restarts it on the same ledger; the other tests
//! serve the router in-process, as `tests/http.rs` does.

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{postgres_client, postgres_database, postgres_server, sqlite, TempDir};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use usage_tracking::time::{format_rfc3339, now_ms, DAY_MS, HOUR_MS};
use usage_tracking::{serve, Ledger, Limits, Tracker};

mod common;

const TOKEN: &str = "s3cret-usage-token-for-the-ledger-tests";

// ---------------------------------------------------------------------------------------
// Backends

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sqlite,
    Postgres,
}

/// A fresh, empty ledger location of `kind`.
struct Backend {
    kind: Kind,
    dir: Option<TempDir>,
    url: Option<String>,
}

impl Backend {
    /// `None` (after saying SKIP) when `kind` is PostgreSQL and it is not installed.
    async fn new(kind: Kind, test: &str) -> Option<Backend> {
        match kind {
            Kind::Sqlite => Some(Backend { kind, dir: Some(TempDir::new(test)), url: None }),
            Kind::Postgres => {
                let url = postgres_database("t", test).await?;
                Some(Backend { kind, dir: None, url: Some(url) })
            }
        }
    }

    /// The flags that point the binary at this ledger.
    fn args(&self) -> Vec<String> {
        match self.kind {
            Kind::Sqlite => vec!["--data-dir".into(), self.dir.as_ref().unwrap().0.display().to_string()],
            Kind::Postgres => vec!["--database-url".into(), self.url.clone().unwrap()],
        }
    }

    async fn open(&self, replica: &str) -> Arc<Ledger> {
        let ledger = match self.kind {
            Kind::Sqlite => Ledger::open_sqlite(&self.dir.as_ref().unwrap().0, replica),
            Kind::Postgres => Ledger::open_postgres(self.url.as_ref().unwrap(), replica).await,
        };
        Arc::new(ledger.unwrap())
    }

    async fn tracker(&self, replica: &str, limits: Limits) -> Tracker {
        Tracker::with_ledger(limits, self.open(replica).await).await.unwrap().with_api_token(Some(TOKEN))
    }

    /// Runs `sql` (statements separated by `;`) on the ledger's database, past the tracker.
    async fn execute(&self, sql: &str) {
        match self.kind {
            Kind::Sqlite => {
                let (path, sql) = (self.sqlite_file(), sql.to_owned());
                tokio::task::spawn_blocking(move || sqlite(&path).execute_batch(&sql).unwrap()).await.unwrap();
            }
            Kind::Postgres => self.postgres().await.batch_execute(sql).await.unwrap(),
        }
    }

    /// The first column of `sql`'s rows, as integers (cast in `sql` for PostgreSQL).
    async fn integers(&self, sql: &str) -> Vec<i64> {
        match self.kind {
            Kind::Sqlite => {
                let (path, sql) = (self.sqlite_file(), sql.to_owned());
                tokio::task::spawn_blocking(move || {
                    let conn = sqlite(&path);
                    let mut statement = conn.prepare(&sql).unwrap();
                    let rows = statement.query_map([], |row| row.get(0)).unwrap();
                    rows.collect::<Result<Vec<i64>, _>>().unwrap()
                })
                .await
                .unwrap()
            }
            Kind::Postgres => {
                let rows = self.postgres().await.query(sql, &[]).await.unwrap();
                rows.iter().map(|row| row.get(0)).collect()
            }
        }
    }

    fn sqlite_file(&self) -> PathBuf {
        self.dir.as_ref().unwrap().0.join(usage_tracking::ledger::sqlite::FILE_NAME)
    }

    async fn postgres(&self) -> tokio_postgres::Client {
        postgres_client(self.url.as_ref().unwrap()).await
    }
}

/// Runs `$test(kind)` as `$test::sqlite` and `$test::postgres`.
macro_rules! both_backends {
    ($($test:ident),* $(,)?) => {$(
        mod $test {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$test(super::Kind::Sqlite).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$test(super::Kind::Postgres).await;
            }
        }
    )*};
}

both_backends!(
    kill_9_loses_nothing_acknowledged,
    restart_restores_every_counter,
    bad_input_writes_nothing,
    usage_api_buckets_and_recent,
    compaction_keeps_totals_exact,
    replicas_share_dedup_and_keep_their_own_counters,
    counted_denials_survive_restart_and_compaction,
    schema_1_ledger_is_migrated,
    control_characters_never_fail_a_batch,
);

// ---------------------------------------------------------------------------------------
// Servers: in-process, and the real binary

struct Server {
    base: String,
    client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(tracker: Tracker) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, Arc::new(tracker), async move {
            let _ = stopped.await;
        }));
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        Server { base, client, stop: Some(stop), task }
    }

    async fn track(&self, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let response = self.client.post(format!("{}/track", self.base)).body(body).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    async fn track_json(&self, body: &Value) -> Value {
        let (status, answer) = self.track(body.to_string()).await;
        assert_eq!(status, 200, "{answer}");
        answer
    }

    /// GET `path_and_query` with the usage API's secret (or `token`).
    async fn get(&self, path_and_query: &str, token: Option<&str>) -> (u16, Value) {
        let mut request = self.client.get(format!("{}{path_and_query}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    async fn api(&self, path_and_query: &str) -> Value {
        let (status, body) = self.get(path_and_query, Some(TOKEN)).await;
        assert_eq!(status, 200, "{path_and_query}: {body}");
        body
    }

    async fn metrics(&self) -> String {
        self.client.get(format!("{}/metrics", self.base)).send().await.unwrap().text().await.unwrap()
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            stop.send(()).unwrap();
        }
        self.task.await.unwrap().unwrap();
    }
}

/// The real binary, its address read from its "listening on" line.
struct Process {
    child: Child,
    base: String,
}

impl Process {
    fn spawn(args: &[String]) -> Process {
        let mut child = Command::new(env!("CARGO_BIN_EXE_usage-tracking"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("TRACKER_API_TOKEN", TOKEN)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let base = loop {
            let line = lines.next().expect("tracker exited before listening").unwrap();
            if let Some(rest) = line.split_once("listening on ").map(|(_, rest)| rest) {
                break format!("http://{}", rest.split_whitespace().next().unwrap());
            }
        };
        // Keep draining its output so it never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Process { child, base }
    }

    fn kill_9(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }

    fn terminate(mut self) {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
        let exit = self.child.wait().unwrap();
        assert!(exit.success(), "tracker exited with {exit}");
    }
}

/// A failed test must not leave its tracker running (it would hold the test's output).
impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// Helpers

/// The value of the series written exactly as `series`.
fn value(text: &str, series: &str) -> Option<u64> {
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The `llm_*` sample lines, sorted (families are hash maps).
fn llm_lines(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text.lines().filter(|l| l.starts_with("llm_")).map(str::to_owned).collect();
    lines.sort();
    lines
}

fn event(id: &str, user: &str, ts_ms: i64, prompt: u64, completion: u64) -> Value {
    json!({"id": id, "ts": ts_ms as f64 / 1000.0, "user": user, "groups": ["premium"],
        "path": "/v1/chat/completions", "model": "m", "status": 200,
        "prompt_tokens": prompt, "completion_tokens": completion, "cached_tokens": 1, "reasoning_tokens": 0})
}

async fn ids(ledger: &Ledger) -> BTreeSet<String> {
    ledger.event_ids().await.unwrap().into_iter().collect()
}

// ---------------------------------------------------------------------------------------
// Tests

/// The crash test: batches stream in from several sender threads at once; the tracker
/// is SIGKILLed mid-stream and restarted on the same ledger. Every acknowledged event
/// must be in the ledger, a batch in flight must be there whole or not at all, the
/// counters must resume from the ledger, and resending batches must count nothing twice.
async fn kill_9_loses_nothing_acknowledged(kind: Kind) {
    let Some(backend) = Backend::new(kind, &format!("kill_{kind:?}")).await else { return };
    const PER_BATCH: u64 = 25;
    const SENDERS: u64 = 3;
    // Batch `n` of sender `s` is named (s, n); its events "k{s}.{n}-{i}".
    let batch_ids = |(s, n): (u64, u64)| (0..PER_BATCH).map(move |i| format!("k{s}.{n}-{i}"));
    let prompt_of = |i: u64| 1 + i % 7;
    let batch = move |(s, n): (u64, u64)| {
        let events: Vec<Value> = (0..PER_BATCH)
            .map(|i| {
                json!({"id": format!("k{s}.{n}-{i}"), "user": "crash", "path": "/v1/chat/completions",
                       "model": "m", "prompt_tokens": prompt_of(i), "completion_tokens": 2})
            })
            .collect();
        Value::Array(events).to_string()
    };

    let first = Process::spawn(&backend.args());
    let url = format!("{}/track", first.base);
    let acked: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let senders: Vec<_> = (0..SENDERS)
        .map(|s| {
            let (acked, url) = (Arc::clone(&acked), url.clone());
            std::thread::spawn(move || {
                let client =
                    reqwest::blocking::Client::builder().no_proxy().timeout(Duration::from_secs(10)).build().unwrap();
                let deadline = Instant::now() + Duration::from_secs(30);
                // Bounded: stops at the first failure (the kill), or after 30 s / 5000 batches.
                for n in 0..5_000u64 {
                    match client.post(&url).body(batch((s, n))).send() {
                        Ok(response) if response.status() == 200 => acked.lock().unwrap().push((s, n)),
                        Ok(response) => panic!("batch {s}.{n}: status {}", response.status()),
                        Err(_) => return Some((s, n)), // in flight when killed: outcome unknown
                    }
                    if Instant::now() > deadline {
                        break;
                    }
                }
                None
            })
        })
        .collect();
    let start = Instant::now();
    while acked.lock().unwrap().len() < 60 {
        assert!(start.elapsed() < Duration::from_secs(30), "the tracker acknowledged too little");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.kill_9();
    let in_flight: Vec<(u64, u64)> = tokio::task::spawn_blocking(move || {
        senders.into_iter().map(|s| s.join().unwrap().expect("a sender never saw the kill")).collect()
    })
    .await
    .unwrap();
    let acked: Vec<(u64, u64)> = acked.lock().unwrap().clone();

    let checker = backend.open("checker").await;
    let stored = ids(&checker).await;
    let acked_ids: BTreeSet<String> = acked.iter().flat_map(|&b| batch_ids(b)).collect();
    let possible: BTreeSet<String> =
        acked_ids.iter().cloned().chain(in_flight.iter().flat_map(|&b| batch_ids(b))).collect();
    let lost: Vec<&String> = acked_ids.difference(&stored).collect();
    assert!(lost.is_empty(), "{} acknowledged events lost, e.g. {:?}", lost.len(), lost.first());
    assert!(stored.is_subset(&possible), "the ledger holds events that were never sent");
    // A batch is one transaction: one in flight is in whole or not at all.
    let mut in_flight_stored = 0;
    for &b in &in_flight {
        let n = batch_ids(b).filter(|id| stored.contains(id)).count() as u64;
        assert!(n == 0 || n == PER_BATCH, "half of batch {b:?} is stored: {n}");
        in_flight_stored += n;
    }
    eprintln!(
        "{kind:?}: killed after {} acknowledged batches; {} of {} in-flight batches had been committed",
        acked.len(),
        in_flight_stored / PER_BATCH,
        in_flight.len()
    );

    // Restart on the same ledger: the counters continue from what is stored.
    let second = Process::spawn(&backend.args());
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let metrics =
        || async { client.get(format!("{}/metrics", second.base)).send().await.unwrap().text().await.unwrap() };
    let requests = r#"llm_requests_total{user="crash",groups="",path="/v1/chat/completions"}"#;
    let prompt = r#"llm_tokens_total{user="crash",groups="",model="m",type="prompt"}"#;
    let prompt_per_batch: u64 = (0..PER_BATCH).map(prompt_of).sum();
    let stored_batches = stored.len() as u64 / PER_BATCH;
    let text = metrics().await;
    assert_eq!(value(&text, requests), Some(stored.len() as u64), "{text}");
    assert_eq!(value(&text, prompt), Some(stored_batches * prompt_per_batch), "{text}");

    // The senders retry the batches they got no answer for, and a late copy of an
    // acknowledged one arrives: only what the ledger lacks counts.
    let mut resend: Vec<((u64, u64), u64)> = in_flight
        .iter()
        .map(|&b| (b, PER_BATCH - batch_ids(b).filter(|id| stored.contains(id)).count() as u64))
        .collect();
    resend.push((acked[0], 0));
    for (b, expect_new) in resend {
        let response = client.post(format!("{}/track", second.base)).body(batch(b)).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let answer: Value = response.json().await.unwrap();
        assert_eq!(
            answer,
            json!({"accepted": expect_new, "duplicates": PER_BATCH - expect_new, "rejected": []}),
            "batch {b:?}"
        );
    }
    let all = (acked.len() + in_flight.len()) as u64;
    let text = metrics().await;
    assert_eq!(value(&text, requests), Some(all * PER_BATCH), "{text}");
    assert_eq!(value(&text, prompt), Some(all * prompt_per_batch), "{text}");
    assert_eq!(ids(&checker).await.len() as u64, all * PER_BATCH);
    let usage: Value = client
        .get(format!("{}/v1/usage?user=crash&bucket=day", second.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(usage["total"]["requests"], json!(all * PER_BATCH), "{usage}");
    assert_eq!(usage["total"]["prompt_tokens"], json!(all * prompt_per_batch), "{usage}");
    second.terminate();
}

/// Every `llm_*` series comes back exactly after a restart, the cardinality guard's
/// choices included; the health counters start again (they are per process).
async fn restart_restores_every_counter(kind: Kind) {
    let Some(backend) = Backend::new(kind, &format!("restore_{kind:?}")).await else { return };
    let limits = Limits { max_users: 2, ..Limits::default() };
    let server = Server::start(backend.tracker("r1", limits).await).await;
    let t = now_ms();
    let batch = json!([
        event("a1", "alice", t, 10, 5),
        event("a2", "alice", t, 1, 1),
        {"id": "b1", "user": "bob", "groups": "free", "path": "/v1/embeddings", "model": "",
         "prompt_tokens": 5, "status": 502, "incomplete": true},
        {"id": "c1", "user": "carol", "path": "/v1/models"},          // over max_users: "other"
        {"id": "d1", "denied": "rate_limited", "path": "/v1/chat/completions"},
        {"user": "alice", "path": "/v1/models"},                      // Authorino callback
        {"id": "big", "user": "bob", "groups": "free", "model": "m", "prompt_tokens": 9_007_199_254_740_991u64},
    ]);
    assert_eq!(server.track_json(&batch).await, json!({"accepted": 7, "duplicates": 0, "rejected": []}));
    // More big ones: the lifetime sum saturates rather than wraps or fails.
    let bigs: Vec<Value> = (0..1100)
        .map(|i| {
            json!({"id": format!("big{i}"), "user": "bob", "groups": "free", "model": "m",
                        "prompt_tokens": 9_007_199_254_740_991u64})
        })
        .collect();
    assert_eq!(
        server.track_json(&Value::Array(bigs)).await,
        json!({"accepted": 1100, "duplicates": 0, "rejected": []})
    );
    let before = llm_lines(&server.metrics().await);
    assert!(before.iter().any(|l| l.contains(r#"user="other""#)), "{before:?}");
    assert!(before.iter().any(|l| l.ends_with(&format!(" {}", i64::MAX))), "saturated: {before:?}");
    server.stop().await;

    let server = Server::start(backend.tracker("r1", limits).await).await;
    let text = server.metrics().await;
    assert_eq!(llm_lines(&text), before);
    assert_eq!(value(&text, "tracker_events_received_total"), Some(0));
    // Duplicates are still recognised after the restart.
    assert_eq!(server.track_json(&batch).await, json!({"accepted": 1, "duplicates": 6, "rejected": []}));
    server.stop().await;
}

/// Bad input is refused with a clear 4xx and writes nothing; bad usage queries are
/// refused with a clear 4xx.
async fn bad_input_writes_nothing(kind: Kind) {
    let Some(backend) = Backend::new(kind, &format!("bad_{kind:?}")).await else { return };
    let limits = Limits { max_batch: 3, max_body_bytes: 4096, ..Limits::default() };
    let checker = backend.open("checker").await;
    let server = Server::start(backend.tracker("r1", limits).await).await;
    let t = now_ms();
    server.track_json(&event("seed", "alice", t, 1, 1)).await;
    let good = event("good", "alice", t, 1, 1);
    let huge: Vec<Value> =
        (0..3).map(|i| json!({"id": format!("h{i}"), "user": "u", "model": "x".repeat(2000)})).collect();
    let rejected = |i: usize, message: &str| json!({"index": i, "reason": "invalid_event", "message": message});
    let cases: Vec<(String, u16, &str, Option<Value>)> = vec![
        // (body, status, message, the `rejected` list when events were bad)
        ("{\"id\":".into(), 400, "body is not valid JSON: EOF while parsing a value at line 1 column 6", None),
        (
            json!([{"id": "b0", "user": " "}, {"id": "b", "user": "u", "prompt_tokens": "12"}]).to_string(),
            400,
            "events[0].user: must not be empty",
            Some(json!([
                rejected(0, "events[0].user: must not be empty"),
                rejected(1, "events[1].prompt_tokens: invalid type: string \"12\", expected a non-negative integer"),
            ])),
        ),
        (
            json!([{"id": "b0", "denied": "x", "count": 0}, {"id": "b", "user": "u", "ts": "yesterday"}]).to_string(),
            400,
            "events[0].count: invalid value: integer `0`, expected an integer from 1 to 1000000000",
            Some(json!([
                rejected(0, "events[0].count: invalid value: integer `0`, expected an integer from 1 to 1000000000"),
                rejected(1, "events[1].ts: invalid type: string \"yesterday\", expected f64"),
            ])),
        ),
        (
            json!({"id": "b", "user": ["u"]}).to_string(),
            400,
            "user: invalid type: sequence, expected a string",
            Some(json!([rejected(0, "user: invalid type: sequence, expected a string")])),
        ),
        (json!([good, good, good, good]).to_string(), 413, "batch of 4 events is over the limit of 3", None),
        (Value::Array(huge).to_string(), 413, "request body is over the size limit", None),
    ];
    for (body, status, message, rejected) in cases {
        let before = ids(&checker).await;
        let (got, answer) = server.track(body.clone()).await;
        let mut want = json!({"error": {"message": message, "type": "invalid_request_error"}});
        if let Some(rejected) = rejected {
            want["rejected"] = rejected;
        }
        assert_eq!((got, answer), (status, want));
        assert_eq!(ids(&checker).await, before, "{body}");
    }
    // A batch with good and bad events: only the good ones are written.
    let mixed = json!([good, {"id": "bad", "user": "alice", "status": 1000}, event("good2", "alice", t, 1, 1)]);
    let answer = server.track_json(&mixed).await;
    assert_eq!(
        answer,
        json!({"accepted": 2, "duplicates": 0, "rejected": [
            rejected(1, "events[1].status: invalid value: integer `1000`, expected an integer up to 999")]})
    );
    let stored: Vec<String> = ids(&checker).await.into_iter().collect();
    assert_eq!(stored, ["good", "good2", "seed"]);
    let total = server.api("/v1/usage?user=alice").await["total"].clone();
    assert_eq!(total["requests"], json!(3));

    let bad_queries: Vec<(&str, u16, &str)> = vec![
        ("/v1/usage", 400, "user: required"),
        ("/v1/usage?user=", 400, "user: required"),
        ("/v1/usage?user=nobody", 404, "no usage was ever recorded for user \"nobody\""),
        ("/v1/usage/recent?user=nobody", 404, "no usage was ever recorded for user \"nobody\""),
        (
            "/v1/usage?user=alice&users=bob",
            400,
            "unknown parameter \"users\" (this endpoint takes user, since, until, bucket)",
        ),
        ("/v1/usage?user=alice&user=bob", 400, "user: given more than once"),
        ("/v1/usage?user=alice&bucket=week", 400, "bucket: expected hour or day, got \"week\""),
        (
            "/v1/usage?user=alice&since=yesterday",
            400,
            "since: expected Unix seconds or an RFC 3339 time like 2025-11-22T08:00:00Z, got \"yesterday\"",
        ),
        (
            "/v1/usage?user=alice&until=2025-02-30",
            400,
            "until: expected Unix seconds or an RFC 3339 time like 2025-11-22T08:00:00Z, got \"2025-02-30\"",
        ),
        (
            "/v1/usage?user=alice&since=2025-11-22&until=2025-11-21",
            400,
            "since (2025-11-22T00:00:00Z) must be before until (2025-11-21T00:00:00Z)",
        ),
        (
            "/v1/usage?user=alice&since=2025-11-22&until=2025-11-22",
            400,
            "since (2025-11-22T00:00:00Z) must be before until (2025-11-22T00:00:00Z)",
        ),
        (
            "/v1/usage?user=alice&since=2020-01-01&until=2025-01-01&bucket=hour",
            400,
            "the range spans 43848 hour buckets, more than 10000; narrow it or use a larger bucket",
        ),
        (
            "/v1/usage?user=alice&since=99999999999999",
            400,
            "since: \"99999999999999\" is outside 1970-01-01 to 9999-12-31",
        ),
        ("/v1/usage/recent?user=alice&limit=abc", 400, "limit: expected an integer from 1 to 1000, got \"abc\""),
        ("/v1/usage/recent?user=alice&limit=0", 400, "limit: expected an integer from 1 to 1000, got \"0\""),
        ("/v1/usage/recent?user=alice&limit=1001", 400, "limit: expected an integer from 1 to 1000, got \"1001\""),
        ("/v1/usage/recent?user=alice&since=1", 400, "unknown parameter \"since\" (this endpoint takes user, limit)"),
        ("/v1/usage/breakdown", 400, "by: required (user, model or reason)"),
        ("/v1/usage/breakdown?by=week", 400, "by: expected user, model or reason, got \"week\""),
        ("/v1/usage/breakdown?by=model&user=nobody", 404, "no usage was ever recorded for user \"nobody\""),
        (
            "/v1/usage/breakdown?by=reason&user=alice",
            400,
            "user: denied requests have no user (by=reason takes no user)",
        ),
        ("/v1/usage/breakdown?by=user&user=alice", 400, "user: by=user of one user is /v1/usage"),
        (
            "/v1/usage/breakdown?by=model&since=2025-11-22&until=2025-11-21",
            400,
            "since (2025-11-22T00:00:00Z) must be before until (2025-11-21T00:00:00Z)",
        ),
    ];
    for (query, status, message) in bad_queries {
        let (got, body) = server.get(query, Some(TOKEN)).await;
        assert_eq!(
            (got, body),
            (status, json!({"error": {"message": message, "type": "invalid_request_error"}})),
            "{query}"
        );
    }
    assert_eq!(ids(&checker).await.len(), 3, "queries write nothing");
    server.stop().await;
}

/// Per-bucket totals and the latest events, exactly; and who may ask.
async fn usage_api_buckets_and_recent(kind: Kind) {
    let Some(backend) = Backend::new(kind, &format!("api_{kind:?}")).await else { return };
    let server = Server::start(backend.tracker("r1", Limits::default()).await).await;
    let day = 1_763_769_600_000; // 2025-11-22T00:00:00Z
    let batch = json!([
        event("e1", "alice", day + 8 * HOUR_MS + 1_000, 10, 1),
        event("e2", "alice", day + 8 * HOUR_MS + 2_000, 20, 2),
        event("e3", "alice", day + 9 * HOUR_MS, 30, 3),
        event("e4", "alice", day + DAY_MS + HOUR_MS, 40, 4),
        event("e5", "bob", day + 8 * HOUR_MS, 1000, 1000),
        {"id": "e6", "user": "alice", "path": "/v1/models", "status": 404, "ts": (day + 10 * HOUR_MS) as f64 / 1000.0},
        {"id": "e7", "denied": "invalid_api_key", "user": "alice", "ts": (day + 10 * HOUR_MS) as f64 / 1000.0},
    ]);
    assert_eq!(server.track_json(&batch).await, json!({"accepted": 7, "duplicates": 0, "rejected": []}));
    let counts = |start: i64, requests: u64, prompt: u64, completion: u64, cached: u64| {
        json!({"start": format_rfc3339(start), "requests": requests, "prompt_tokens": prompt,
               "completion_tokens": completion, "cached_tokens": cached, "reasoning_tokens": 0})
    };
    let total = |requests: u64, prompt: u64, completion: u64, cached: u64| {
        json!({"requests": requests, "prompt_tokens": prompt, "completion_tokens": completion,
               "cached_tokens": cached, "reasoning_tokens": 0})
    };
    let cases: Vec<(String, Value)> = vec![
        (
            "/v1/usage?user=alice&since=2025-11-22&until=2025-11-24&bucket=hour".into(),
            json!({"user": "alice", "bucket": "hour", "since": "2025-11-22T00:00:00Z", "until": "2025-11-24T00:00:00Z",
                   "buckets": [counts(day + 8 * HOUR_MS, 2, 30, 3, 2), counts(day + 9 * HOUR_MS, 1, 30, 3, 1),
                               counts(day + 10 * HOUR_MS, 1, 0, 0, 0), counts(day + DAY_MS + HOUR_MS, 1, 40, 4, 1)],
                   "total": total(5, 100, 10, 4)}),
        ),
        (
            format!("/v1/usage?user=alice&since={}&until={}", day / 1000, (day + 2 * DAY_MS) / 1000),
            json!({"user": "alice", "bucket": "day", "since": "2025-11-22T00:00:00Z", "until": "2025-11-24T00:00:00Z",
                   "buckets": [counts(day, 4, 60, 6, 3), counts(day + DAY_MS, 1, 40, 4, 1)],
                   "total": total(5, 100, 10, 4)}),
        ),
        // A range that cuts hours: events count by their own time.
        (
            "/v1/usage?user=alice&since=2025-11-22T08:00:01.5Z&until=2025-11-22T09:00:00Z&bucket=hour".into(),
            json!({"user": "alice", "bucket": "hour", "since": "2025-11-22T08:00:01.500Z", "until": "2025-11-22T09:00:00Z",
                   "buckets": [counts(day + 8 * HOUR_MS, 1, 20, 2, 1)], "total": total(1, 20, 2, 1)}),
        ),
        // A known user with nothing in the range: 200 and no buckets.
        (
            "/v1/usage?user=bob&since=2025-01-01&until=2025-01-02".into(),
            json!({"user": "bob", "bucket": "day", "since": "2025-01-01T00:00:00Z", "until": "2025-01-02T00:00:00Z",
                   "buckets": [], "total": total(0, 0, 0, 0)}),
        ),
    ];
    for (query, want) in cases {
        assert_eq!(server.api(&query).await, want, "{query}");
    }

    // Breakdowns: per model of one user (an event without a model has none), per user,
    // per deny reason.
    let row = |by: &str, key: Value, t: Value| {
        let mut row = t;
        row[by] = key;
        row
    };
    let range = r#""since": "2025-11-22T00:00:00Z", "until": "2025-11-24T00:00:00Z""#;
    let breakdown = |by: &str, user: Value, rows: Vec<Value>, total: Value| {
        let mut want: Value = serde_json::from_str(&format!("{{{range}}}")).unwrap();
        want["by"] = json!(by);
        want["user"] = user;
        want["rows"] = json!(rows);
        want["total"] = total;
        want
    };
    let cases: Vec<(&str, Value)> = vec![
        (
            "/v1/usage/breakdown?by=model&user=alice&since=2025-11-22&until=2025-11-24",
            breakdown(
                "model",
                json!("alice"),
                vec![row("model", Value::Null, total(1, 0, 0, 0)), row("model", json!("m"), total(4, 100, 10, 4))],
                total(5, 100, 10, 4),
            ),
        ),
        (
            "/v1/usage/breakdown?by=user&since=2025-11-22&until=2025-11-24",
            breakdown(
                "user",
                Value::Null,
                vec![
                    row("user", json!("alice"), total(5, 100, 10, 4)),
                    row("user", json!("bob"), total(1, 1000, 1000, 1)),
                ],
                total(6, 1100, 1010, 5),
            ),
        ),
        (
            "/v1/usage/breakdown?by=reason&since=2025-11-22&until=2025-11-24",
            breakdown(
                "reason",
                Value::Null,
                vec![row("reason", json!("invalid_credential"), total(1, 0, 0, 0))],
                total(1, 0, 0, 0),
            ),
        ),
    ];
    for (query, want) in cases {
        assert_eq!(server.api(query).await, want, "{query}");
    }
    let recent = server.api("/v1/usage/recent?user=alice&limit=2").await;
    assert_eq!(
        recent,
        json!({"user": "alice", "events": [
            {"id": "e4", "ts": format_rfc3339(day + DAY_MS + HOUR_MS), "groups": "premium", "path": "/v1/chat/completions",
             "model": "m", "status": 200, "prompt_tokens": 40, "completion_tokens": 4, "cached_tokens": 1,
             "reasoning_tokens": 0, "incomplete": false, "replica": "r1"},
            {"id": "e6", "ts": format_rfc3339(day + 10 * HOUR_MS), "groups": "", "path": "/v1/models",
             "model": null, "status": 404, "prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0,
             "reasoning_tokens": 0, "incomplete": false, "replica": "r1"},
        ]})
    );
    assert_eq!(server.api("/v1/usage/recent?user=alice").await["events"].as_array().unwrap().len(), 5);

    // Who may ask: a wrong or missing secret is 401 with a challenge.
    for token in [None, Some("wrong"), Some("s3cret-usage-token-and-more"), Some("")] {
        let mut request = server.client.get(format!("{}/v1/usage?user=alice", server.base));
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401, "{token:?}");
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
    }
    let response = server.client.get(format!("{}/v1/usage?user=alice", server.base)).basic_auth(TOKEN, None::<&str>);
    assert_eq!(response.send().await.unwrap().status(), 401);
    server.stop().await;

    // Without a secret configured the API does not exist.
    let tracker = Tracker::with_ledger(Limits::default(), backend.open("r1").await).await.unwrap();
    let server = Server::start(tracker).await;
    for path in ["/v1/usage?user=alice", "/v1/usage/recent?user=alice"] {
        let (status, body) = server.get(path, Some(TOKEN)).await;
        let bare = path.split('?').next().unwrap();
        let message = format!("no route for GET {bare}");
        assert_eq!((status, body), (404, json!({"error": {"message": message, "type": "invalid_request_error"}})));
    }
    server.stop().await;

    // A secret but no ledger (memory only): 404 that says why.
    if kind == Kind::Sqlite {
        let server = Server::start(Tracker::new(Limits::default()).with_api_token(Some(TOKEN))).await;
        let (status, body) = server.get("/v1/usage?user=alice", Some(TOKEN)).await;
        assert_eq!(status, 404);
        assert_eq!(
            body["error"]["message"],
            "the usage API needs the ledger: start the tracker with --data-dir or --database-url"
        );
        server.stop().await;
    }
}

/// Compaction moves old events into daily totals without changing any total, is
/// idempotent, and keeps counting late events for compacted days.
async fn compaction_keeps_totals_exact(kind: Kind) {
    let Some(backend) = Backend::new(kind, &format!("compact_{kind:?}")).await else { return };
    let ledger = backend.open("r1").await;
    let tracker =
        Tracker::with_ledger(Limits::default(), Arc::clone(&ledger)).await.unwrap().with_api_token(Some(TOKEN));
    let server = Server::start(tracker).await;
    let now = now_ms();
    let midnight = now - 100 * DAY_MS - (now - 100 * DAY_MS).rem_euclid(DAY_MS);
    let old = midnight + HOUR_MS;
    let mut events: Vec<Value> = Vec::new();
    for day in 0..3 {
        for i in 0..7 {
            let ts = old + day * DAY_MS + i * HOUR_MS;
            events.push(event(&format!("old{day}-{i}"), "alice", ts, 10 + i as u64, 1));
        }
    }
    events.push(event("new1", "alice", now - HOUR_MS, 5, 5));
    events.push(json!({"id": "oldd", "denied": "rate_limited", "ts": old as f64 / 1000.0}));
    server.track_json(&Value::Array(events)).await;
    let since = format_rfc3339(now - 120 * DAY_MS);
    let until = format_rfc3339(now + DAY_MS);
    let query = format!("/v1/usage?user=alice&since={since}&until={until}");
    let before = server.api(&query).await;
    let metrics_before = llm_lines(&server.metrics().await);
    assert_eq!(before["total"]["requests"], json!(22));

    assert_eq!(ledger.compact(now, 90).await.unwrap(), 22, "21 old events and the old denied one");
    assert_eq!(ledger.compact(now, 90).await.unwrap(), 0, "idempotent");
    assert_eq!(ids(&ledger).await, BTreeSet::from(["new1".to_owned()]));
    assert_eq!(server.api(&query).await, before);
    let recent = server.api("/v1/usage/recent?user=alice").await;
    assert_eq!(recent["events"].as_array().unwrap().len(), 1);

    // A late event for a compacted day is added to that day at the next compaction.
    server.track_json(&event("late", "alice", old + HOUR_MS, 1000, 0)).await;
    assert_eq!(ledger.compact(now, 90).await.unwrap(), 1);
    let after = server.api(&query).await;
    assert_eq!(after["total"]["requests"], json!(23));
    assert_eq!(after["total"]["prompt_tokens"], json!(before["total"]["prompt_tokens"].as_u64().unwrap() + 1000));
    let first_day: Vec<&Value> = after["buckets"].as_array().unwrap().iter().take(1).collect();
    assert_eq!(first_day[0]["requests"], json!(8), "{after}");
    // Hour buckets of a compacted day: the whole day sits at its midnight.
    let hours = server
        .api(&format!(
            "/v1/usage?user=alice&bucket=hour&since={}&until={}",
            format_rfc3339(old),
            format_rfc3339(midnight + DAY_MS)
        ))
        .await;
    assert_eq!(hours["buckets"].as_array().unwrap().len(), 1, "{hours}");
    server.stop().await;

    // Counters come from the lifetime totals, which compaction does not touch.
    let server = Server::start(backend.tracker("r1", Limits::default()).await).await;
    let restored = llm_lines(&server.metrics().await);
    let late = r#"llm_requests_total{user="alice",groups="premium",path="/v1/chat/completions"} 23"#;
    assert!(restored.iter().any(|l| l == late), "{restored:?}");
    assert_eq!(
        restored.iter().filter(|l| l.starts_with("llm_denied")).collect::<Vec<_>>(),
        metrics_before.iter().filter(|l| l.starts_with("llm_denied")).collect::<Vec<_>>()
    );
    server.stop().await;
}

/// Two replicas on one ledger: a batch retried on the other replica is a duplicate, the
/// usage API sees both, and each replica restores only its own counters (so summing
/// the replicas in Prometheus counts every event once).
async fn replicas_share_dedup_and_keep_their_own_counters(kind: Kind) {
    let Some(backend) = Backend::new(kind, &format!("replicas_{kind:?}")).await else { return };
    let a = Server::start(backend.tracker("a", Limits::default()).await).await;
    let b = Server::start(backend.tracker("b", Limits::default()).await).await;
    let t = now_ms();
    let batch = json!([event("r1", "alice", t, 1, 1), event("r2", "alice", t, 1, 1)]);
    assert_eq!(a.track_json(&batch).await, json!({"accepted": 2, "duplicates": 0, "rejected": []}));
    let retry = json!([event("r2", "alice", t, 1, 1), event("r3", "alice", t, 1, 1)]);
    assert_eq!(b.track_json(&retry).await, json!({"accepted": 1, "duplicates": 1, "rejected": []}));
    // Both at once, the same new ids: exactly one replica takes each.
    let race: Vec<Value> = (0..200).map(|i| event(&format!("race{i}"), "alice", t, 1, 1)).collect();
    let race = Value::Array(race);
    let (x, y) = tokio::join!(a.track_json(&race), b.track_json(&race));
    assert_eq!(x["accepted"].as_u64().unwrap() + y["accepted"].as_u64().unwrap(), 200, "{x} {y}");
    let series = r#"llm_requests_total{user="alice",groups="premium",path="/v1/chat/completions"}"#;
    let (ma, mb) = (value(&a.metrics().await, series).unwrap(), value(&b.metrics().await, series).unwrap());
    assert_eq!(ma + mb, 203);
    assert_eq!(b.api("/v1/usage?user=alice").await["total"]["requests"], json!(203));
    a.stop().await;
    b.stop().await;
    let mut restored = HashMap::new();
    for replica in ["a", "b"] {
        let server = Server::start(backend.tracker(replica, Limits::default()).await).await;
        restored.insert(replica, value(&server.metrics().await, series).unwrap());
        server.stop().await;
    }
    assert_eq!(restored, HashMap::from([("a", ma), ("b", mb)]));
}

/// An aggregated denial (`count`) adds its count everywhere the ledger keeps requests:
/// its event row, the lifetime totals the counters are restored from, and the daily
/// totals compaction leaves; and it is de-duplicated as a whole.
async fn counted_denials_survive_restart_and_compaction(kind: Kind) {
    let Some(backend) = Backend::new(kind, &format!("counted_{kind:?}")).await else { return };
    let series = r#"llm_denied_requests_total{reason="missing_credential",path="/v1/models"}"#;
    let now = now_ms();
    let old = now - 100 * DAY_MS;
    let denial = |id: &str, ts_ms: i64, count: u64| {
        json!({"id": id, "ts": ts_ms as f64 / 1000.0, "denied": "missing_credential", "path": "/v1/models",
               "count": count})
    };
    let ledger = backend.open("r1").await;
    let server = Server::start(Tracker::with_ledger(Limits::default(), Arc::clone(&ledger)).await.unwrap()).await;
    let batch = json!([
        denial("d-old", old, 137),
        denial("d-new", now - HOUR_MS, 5),
        {"id": "d-one", "denied": "missing_credential", "path": "/v1/models"},
        {"id": "d-bad", "denied": "missing_credential", "path": "/v1/models", "count": 0},
    ]);
    let answer = server.track_json(&batch).await;
    assert_eq!(answer["accepted"], 3, "{answer}");
    assert_eq!(answer["rejected"][0]["index"], 3, "{answer}");
    assert_eq!(value(&server.metrics().await, series), Some(143));
    // Resent (the filter got no answer): a duplicate as a whole, whatever its count.
    let resent = json!([denial("d-old", old, 137)]);
    assert_eq!(server.track_json(&resent).await, json!({"accepted": 0, "duplicates": 1, "rejected": []}));
    assert_eq!(value(&server.metrics().await, series), Some(143));
    server.stop().await;
    let totals = "SELECT requests FROM usage_totals WHERE denied = 'missing_credential'";
    assert_eq!(backend.integers(totals).await, [143]);
    let events = "SELECT requests FROM usage_events ORDER BY requests";
    assert_eq!(backend.integers(events).await, [1, 5, 137]);

    // Restart: the counter continues from the ledger.
    let server = Server::start(Tracker::with_ledger(Limits::default(), Arc::clone(&ledger)).await.unwrap()).await;
    assert_eq!(value(&server.metrics().await, series), Some(143));
    // Compaction moves the old event into its day, with its count.
    assert_eq!(ledger.compact(now, 90).await.unwrap(), 1);
    let daily = "SELECT requests FROM usage_daily WHERE denied = 'missing_credential'";
    assert_eq!(backend.integers(daily).await, [137]);
    assert_eq!(backend.integers(events).await, [1, 5]);
    assert_eq!(backend.integers(totals).await, [143]);
    // A late event of that day is added to it at the next compaction.
    server.track_json(&denial("d-late", old + 1, 20)).await;
    assert_eq!(ledger.compact(now, 90).await.unwrap(), 1);
    assert_eq!(backend.integers(daily).await, [157]);
    assert_eq!(value(&server.metrics().await, series), Some(163));
    server.stop().await;

    // And after compaction the restored counter is still the lifetime total.
    let server = Server::start(backend.tracker("r1", Limits::default()).await).await;
    assert_eq!(value(&server.metrics().await, series), Some(163));
    server.stop().await;
}

/// A NUL (or any control character) in an event is not a reason to lose its batch: PostgreSQL
/// cannot store a NUL in text, and a batch that failed to commit was answered 503 and
/// resent forever. A model name (the upstream's word) is kept with the characters
/// replaced; an id or a user with one is a bad event of its own; a query for such a user
/// is a 400, not a ledger error.
async fn control_characters_never_fail_a_batch(kind: Kind) {
    let Some(backend) = Backend::new(kind, &format!("ctl_{kind:?}")).await else { return };
    let server = Server::start(backend.tracker("r1", Limits::default()).await).await;
    let t = now_ms();
    let mut nul_model = event("nul-model", "alice", t, 3, 4);
    nul_model["model"] = json!("evil\u{0}model\n");
    let mut nul_user = event("nul-user", "bob", t, 1, 1);
    nul_user["user"] = json!("b\u{0}ob");
    let nul_id = event("nul\u{0}id", "carol", t, 1, 1);
    let batch =
        json!([event("good-1", "alice", t, 1, 1), nul_model, nul_user, nul_id, event("good-2", "dave", t, 1, 1)]);
    let answer = server.track_json(&batch).await;
    assert_eq!(answer["accepted"], 3, "{answer}");
    let rejected: Vec<&Value> = answer["rejected"].as_array().unwrap().iter().map(|r| &r["index"]).collect();
    assert_eq!(rejected, [&json!(2), &json!(3)], "{answer}");
    let models = server.api("/v1/usage/breakdown?by=model").await;
    assert!(models.to_string().contains("evil\u{FFFD}model"), "{models}");
    let (status, body) = server.get("/v1/usage?user=a%00b", Some(TOKEN)).await;
    assert_eq!(status, 400, "{body}");
    server.stop().await;
}

/// A ledger written by the schema-1 tracker (no `usage_events.requests`, no tables of
/// global limits or API keys) is migrated when opened: every old row counts 1, as it
/// did, and the limit and key tables are created; a ledger of a newer schema is refused.
async fn schema_1_ledger_is_migrated(kind: Kind) {
    let Some(backend) = Backend::new(kind, &format!("migrate_{kind:?}")).await else { return };
    let now = now_ms();
    let old = now - 100 * DAY_MS;
    let denied = r#"llm_denied_requests_total{reason="rate_limited",path="/v1/chat/completions"}"#;
    let requests = r#"llm_requests_total{user="alice",groups="premium",path="/v1/chat/completions"}"#;
    let server = Server::start(backend.tracker("r1", Limits::default()).await).await;
    let batch = json!([
        event("a1", "alice", old, 3, 4),
        {"id": "d1", "ts": old as f64 / 1000.0, "denied": "rate_limited", "path": "/v1/chat/completions"},
    ]);
    server.track_json(&batch).await;
    server.stop().await;
    // Make it what the schema-1 tracker wrote.
    let (version, set_version) = match kind {
        Kind::Sqlite => ("SELECT user_version FROM pragma_user_version", "PRAGMA user_version = "),
        Kind::Postgres => (
            "SELECT CAST(version AS BIGINT) FROM tollgate_ledger_schema",
            "UPDATE tollgate_ledger_schema SET version = ",
        ),
    };
    assert_eq!(backend.integers(version).await, [4]);
    backend
        .execute(&format!(
            "ALTER TABLE usage_events DROP COLUMN requests; DROP TABLE limit_windows; DROP TABLE limit_holdings; \
             DROP TABLE limit_replicas; DROP TABLE api_keys; {set_version}1"
        ))
        .await;
    assert_eq!(backend.integers(version).await, [1]);

    let ledger = backend.open("r1").await;
    assert_eq!(backend.integers(version).await, [4]);
    assert_eq!(backend.integers("SELECT requests FROM usage_events").await, [1, 1]);
    // Schema 3's tables of global limits and schema 4's of API keys are there, empty.
    for table in ["limit_windows", "limit_holdings", "limit_replicas", "api_keys"] {
        assert_eq!(backend.integers(&format!("SELECT CAST(COUNT(*) AS BIGINT) FROM {table}")).await, [0], "{table}");
    }
    let tracker = Tracker::with_ledger(Limits::default(), Arc::clone(&ledger)).await.unwrap();
    let server = Server::start(tracker.with_api_token(Some(TOKEN))).await;
    let text = server.metrics().await;
    assert_eq!((value(&text, requests), value(&text, denied)), (Some(1), Some(1)), "{text}");
    let counted = json!({"id": "d2", "ts": old as f64 / 1000.0, "denied": "rate_limited",
                         "path": "/v1/chat/completions", "count": 40});
    server.track_json(&counted).await;
    assert_eq!(value(&server.metrics().await, denied), Some(41));
    assert_eq!(ledger.compact(now, 90).await.unwrap(), 3);
    let daily = "SELECT requests FROM usage_daily ORDER BY requests";
    assert_eq!(backend.integers(daily).await, [1, 41]);
    let usage = server.api("/v1/usage?user=alice&since=2000-01-01").await;
    assert_eq!(usage["total"]["requests"], 1, "{usage}");
    assert_eq!(usage["total"]["prompt_tokens"], 3, "{usage}");
    server.stop().await;
    // Opening it again changes nothing.
    let server = Server::start(backend.tracker("r1", Limits::default()).await).await;
    assert_eq!(value(&server.metrics().await, denied), Some(41));
    server.stop().await;
    drop(ledger);

    // A ledger of a newer schema than this tracker's is refused, not rewritten.
    backend.execute(&format!("{set_version}5")).await;
    let refused = match kind {
        Kind::Sqlite => Ledger::open_sqlite(&backend.dir.as_ref().unwrap().0, "r1").map(drop),
        Kind::Postgres => Ledger::open_postgres(backend.url.as_ref().unwrap(), "r1").await.map(drop),
    };
    let message = "cannot open the ledger: the ledger has schema version 5, newer than this tracker's 4";
    assert_eq!(refused.map_err(|e| e.to_string()), Err(message.to_owned()));
}

/// A ledger that cannot write answers 503 (which the filter retries), counts nothing
/// and remembers nothing; once the database is back, the same batch counts once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_write_failure_is_503_and_recovers() {
    let Some(backend) = Backend::new(Kind::Postgres, "outage").await else { return };
    let server = Server::start(backend.tracker("r1", Limits::default()).await).await;
    let (admin, connection) = tokio_postgres::connect(postgres_server().unwrap(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    // Make the database refuse writes, and drop the tracker's sessions so it reconnects
    // into read-only ones.
    let set_read_only = |on: bool| {
        let admin = &admin;
        async move {
            let value = if on { "on" } else { "off" };
            admin
                .batch_execute(&format!("ALTER DATABASE t_outage SET default_transaction_read_only = {value}"))
                .await
                .unwrap();
            admin
                .batch_execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = 't_outage' AND application_name = 'usage-tracking'",
                )
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let t = now_ms();
    server.track_json(&event("o1", "alice", t, 1, 1)).await;
    set_read_only(true).await;
    // With a bad event: it is counted as rejected only once the batch is taken.
    let batch = json!([event("o2", "alice", t, 1, 1), event("o3", "alice", t, 1, 1), {"id": "o4", "user": ""}]);
    let before = llm_lines(&server.metrics().await);
    let (status, answer) = server.track(batch.to_string()).await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["error"]["type"], "server_error");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("ledger write failed: ERROR: cannot execute INSERT in a read-only transaction"),
        "{message}"
    );
    let text = server.metrics().await;
    assert_eq!(llm_lines(&text), before);
    assert_eq!(value(&text, r#"tracker_ledger_errors_total{op="write"}"#), Some(1));
    assert_eq!(value(&text, r#"tracker_requests_rejected_total{reason="invalid_event"}"#), Some(0));

    set_read_only(false).await;
    let rejected = json!([{"index": 2, "reason": "invalid_event", "message": "events[2].user: must not be empty"}]);
    assert_eq!(server.track_json(&batch).await, json!({"accepted": 2, "duplicates": 0, "rejected": rejected}));
    let series = r#"llm_requests_total{user="alice",groups="premium",path="/v1/chat/completions"}"#;
    let text = server.metrics().await;
    assert_eq!(value(&text, series), Some(3));
    assert_eq!(value(&text, r#"tracker_requests_rejected_total{reason="invalid_event"}"#), Some(1));
    server.stop().await;
}
