#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code: a panic is a failed test
//! `POST /v1/limits/sync` (global limits) over real HTTP on loopback, as the gateways
//! speak to it, against every store: in memory, SQLite, and PostgreSQL (each test its
//! own database on the test process's throwaway server, `tests/pg.sh`; without
//! PostgreSQL's server binaries those runs say SKIP and pass, except under CI).

use std::sync::Arc;

use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tollgate_rules::lease::window_start;
use usage_tracking::time::now_ms;
use usage_tracking::{serve, Ledger, Limits, Tracker};

mod common;
use common::{postgres_client, postgres_database, sqlite, TempDir};

const INGEST: &str = "ingest-s3cret";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Memory,
    Sqlite,
    Postgres,
}

/// Where a test's trackers keep their state.
struct Store {
    kind: Kind,
    dir: Option<TempDir>,
    url: Option<String>,
}

impl Store {
    /// `None` (after saying SKIP) when `kind` is PostgreSQL and it is not installed.
    async fn new(kind: Kind, test: &str) -> Option<Store> {
        match kind {
            Kind::Memory => Some(Store { kind, dir: None, url: None }),
            Kind::Sqlite => Some(Store { kind, dir: Some(TempDir::new(test)), url: None }),
            Kind::Postgres => {
                let url = postgres_database("l", test).await?;
                Some(Store { kind, dir: None, url: Some(url) })
            }
        }
    }

    /// A tracker (tracker replica `replica`) on this store.
    async fn tracker(&self, replica: &str, ingest_token: Option<&str>) -> Tracker {
        let tracker = match self.kind {
            Kind::Memory => Tracker::new(Limits::default()),
            Kind::Sqlite => {
                let ledger = Ledger::open_sqlite(&self.dir.as_ref().unwrap().0, replica).unwrap();
                Tracker::with_ledger(Limits::default(), Arc::new(ledger)).await.unwrap()
            }
            Kind::Postgres => {
                let ledger = Ledger::open_postgres(self.url.as_ref().unwrap(), replica).await.unwrap();
                Tracker::with_ledger(Limits::default(), Arc::new(ledger)).await.unwrap()
            }
        };
        tracker.with_ingest_token(ingest_token)
    }

    /// Σ granted of `key` in the store, past the tracker (ledgers only).
    async fn granted_in_ledger(&self, key: &str) -> Option<i64> {
        match self.kind {
            Kind::Memory => None,
            Kind::Sqlite => {
                let path = self.dir.as_ref().unwrap().0.join(usage_tracking::ledger::sqlite::FILE_NAME);
                let key = key.to_owned();
                let sum = tokio::task::spawn_blocking(move || {
                    sqlite(&path)
                        .query_row(
                            "SELECT COALESCE(SUM(granted), 0) FROM limit_holdings WHERE limit_key = ?1",
                            [key],
                            |row| row.get(0),
                        )
                        .unwrap()
                });
                Some(sum.await.unwrap())
            }
            Kind::Postgres => {
                let client = postgres_client(self.url.as_ref().unwrap()).await;
                let sql = "SELECT CAST(COALESCE(SUM(granted), 0) AS BIGINT) FROM limit_holdings WHERE limit_key = $1";
                Some(client.query_one(sql, &[&key]).await.unwrap().get(0))
            }
        }
    }
}

/// Runs `$test(kind)` as `$test::memory`, `$test::sqlite` and `$test::postgres`.
macro_rules! every_store {
    ($($test:ident),* $(,)?) => {$(
        mod $test {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn memory() {
                super::$test(super::Kind::Memory).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                super::$test(super::Kind::Sqlite).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                super::$test(super::Kind::Postgres).await;
            }
        }
    )*};
}

every_store!(
    far_from_the_limit_gets_twice_the_demand,
    alternating_replicas_never_pass_the_limit,
    a_resent_sync_grants_nothing_more,
    a_waiting_need_gets_the_last_unit,
    ingest_token_is_required,
    bad_bodies_change_nothing,
    concurrent_syncs_never_pass_the_limit,
    housekeeping_forgets_old_windows,
);

struct Server {
    base: String,
    client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(tracker: Arc<Tracker>) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, tracker, async move {
            let _ = stopped.await;
        }));
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        Server { base, client, stop: Some(stop), task }
    }

    /// POSTs `body` to `/v1/limits/sync` (with `token` as the bearer secret).
    async fn post(&self, body: &str, token: Option<&str>) -> (u16, Value, Option<String>) {
        let mut request = self
            .client
            .post(format!("{}/v1/limits/sync", self.base))
            .header("content-type", "application/json")
            .body(body.to_owned());
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let www = response.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_owned());
        (status, response.json().await.unwrap(), www)
    }

    /// A sync that must be answered 200.
    async fn sync(&self, body: &Value) -> Value {
        let (status, answer, _) = self.post(&body.to_string(), Some(INGEST)).await;
        assert_eq!(status, 200, "{answer}");
        answer
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

/// A tracker on `store` that requires the ingest secret, served.
async fn served(store: &Store) -> (Arc<Tracker>, Server) {
    let tracker = Arc::new(store.tracker("t1", Some(INGEST)).await);
    let server = Server::start(Arc::clone(&tracker)).await;
    (tracker, server)
}

/// The current minute window of `user`'s request limit: its key and start.
fn minute(user: &str) -> (String, u64) {
    (format!("requests/60000/{user}"), window_start(u64::try_from(now_ms()).unwrap(), 60_000))
}

/// A lease entry: (key, start) of a minute window and (limit, used, demand, need).
fn lease(window: &(String, u64), limit: u64, used: u64, demand: u64, need: u64) -> Value {
    json!({"key": window.0, "window_start_ms": window.1, "window_ms": 60_000,
           "limit": limit, "used": used, "demand": demand, "need": need})
}

fn body(replica: &str, seq: u64, leases: Vec<Value>) -> Value {
    json!({"replica": replica, "seq": seq, "interval_ms": 1000, "leases": leases})
}

/// (granted, consumed) of the answer's lease `i`.
fn grant(answer: &Value, i: usize) -> (u64, u64) {
    let lease = &answer["leases"][i];
    (lease["granted"].as_u64().unwrap(), lease["consumed"].as_u64().unwrap())
}

fn value(text: &str, series: &str) -> Option<u64> {
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

// ---------------------------------------------------------------------------------------
// Tests

/// Alone and far from its limit, a replica gets two intervals of its demand; the answer
/// follows the request's order, and the grant is counted by what the limit counts.
async fn far_from_the_limit_gets_twice_the_demand(kind: Kind) {
    let Some(store) = Store::new(kind, "far").await else { return };
    let (_, server) = served(&store).await;
    let alice = minute("alice");
    let tokens = ("tokens/3600000/zed".to_owned(), window_start(u64::try_from(now_ms()).unwrap(), 3_600_000));
    let tokens_lease = json!({"key": tokens.0, "window_start_ms": tokens.1, "window_ms": 3_600_000,
                              "limit": 100_000, "used": 500, "demand": 300, "need": 0});
    // "tokens/…" sorts after "requests/…": the answer must still be in body order.
    let answer = server.sync(&body("gw-a", 1, vec![tokens_lease, lease(&alice, 1000, 0, 7, 0)])).await;
    assert_eq!(
        answer,
        json!({"replicas": 1, "leases": [
            {"key": tokens.0, "window_start_ms": tokens.1, "granted": 600, "consumed": 600, "used": 500},
            {"key": alice.0, "window_start_ms": alice.1, "granted": 14, "consumed": 14, "used": 0},
        ]})
    );
    let text = server.metrics().await;
    assert_eq!(value(&text, r#"tracker_limit_granted_total{counted="requests"}"#), Some(14), "{text}");
    assert_eq!(value(&text, r#"tracker_limit_granted_total{counted="tokens"}"#), Some(600), "{text}");
    assert_eq!(value(&text, r#"tracker_limit_granted_total{counted="quota_tokens"}"#), Some(0), "{text}");
    assert_eq!(value(&text, r#"tracker_limit_syncs_total{outcome="ok"}"#), Some(1), "{text}");
    // A second replica is counted in `replicas`.
    let answer = server.sync(&body("gw-b", 1, vec![])).await;
    assert_eq!(answer, json!({"replicas": 2, "leases": []}));
    assert_eq!(store.granted_in_ledger(&alice.0).await.unwrap_or(14), 14);
    server.stop().await;
}

/// Two replicas take turns, each using everything it got and asking for more: the sum
/// they take never passes the limit, and together they get all of it.
async fn alternating_replicas_never_pass_the_limit(kind: Kind) {
    let Some(store) = Store::new(kind, "alternating").await else { return };
    let (_, server) = served(&store).await;
    let window = minute("bob");
    let limit = 20;
    let mut granted = [0u64; 2];
    for round in 0..30u64 {
        let i = (round % 2) as usize;
        let replica = ["gw-a", "gw-b"][i];
        let answer = server.sync(&body(replica, round + 1, vec![lease(&window, limit, granted[i], 3, 1)])).await;
        let (got, consumed) = grant(&answer, 0);
        assert!(got >= granted[i], "round {round}: a grant went down");
        granted[i] = got;
        assert!(consumed <= limit, "round {round}: consumed {consumed} > {limit}");
        assert!(granted.iter().sum::<u64>() <= limit, "round {round}: granted {granted:?}");
    }
    assert_eq!(granted.iter().sum::<u64>(), limit, "the whole limit is handed out: {granted:?}");
    assert!(granted.iter().all(|g| *g >= 6), "both got a share: {granted:?}");
    if let Some(in_ledger) = store.granted_in_ledger(&window.0).await {
        assert_eq!(in_ledger, 20);
    }
    server.stop().await;
}

/// A sync sent again (same seq, its answer lost) gets the same answer and nothing more;
/// a stale one (older seq) lowers nothing; the next seq is topped up.
async fn a_resent_sync_grants_nothing_more(kind: Kind) {
    let Some(store) = Store::new(kind, "resent").await else { return };
    let (_, server) = served(&store).await;
    let window = minute("carol");
    let first = body("gw-a", 5, vec![lease(&window, 100, 3, 3, 0)]);
    let answer = server.sync(&first).await;
    assert_eq!(grant(&answer, 0), (6, 6));
    for _ in 0..3 {
        assert_eq!(server.sync(&first).await, answer);
    }
    let text = server.metrics().await;
    assert_eq!(value(&text, r#"tracker_limit_granted_total{counted="requests"}"#), Some(6), "{text}");
    // The next sync, having used 8 (2 beyond its grant, on its fallback share): topped up.
    let answer = server.sync(&body("gw-a", 6, vec![lease(&window, 100, 8, 3, 0)])).await;
    assert_eq!(grant(&answer, 0), (12, 12));
    // Used far beyond its grant, no demand: no grant, and the use counts.
    let answer = server.sync(&body("gw-a", 7, vec![lease(&window, 100, 30, 0, 0)])).await;
    assert_eq!(grant(&answer, 0), (12, 30));
    // A reordered older sync lowers nothing: used stays 30, demand stays 0 (its 50 would
    // have been granted 100).
    let answer = server.sync(&body("gw-a", 4, vec![lease(&window, 100, 1, 50, 0)])).await;
    assert_eq!(grant(&answer, 0), (12, 30));
    server.stop().await;
}

/// Near the limit a replica with no demand of its own gets nothing, until a request of
/// it waits for one unit: then it gets the last one.
async fn a_waiting_need_gets_the_last_unit(kind: Kind) {
    let Some(store) = Store::new(kind, "need").await else { return };
    let (_, server) = served(&store).await;
    let window = minute("dave");
    assert_eq!(grant(&server.sync(&body("gw-a", 1, vec![lease(&window, 9, 0, 4, 0)])).await, 0), (8, 8));
    assert_eq!(grant(&server.sync(&body("gw-b", 1, vec![lease(&window, 9, 0, 0, 0)])).await, 0), (0, 8));
    assert_eq!(grant(&server.sync(&body("gw-b", 2, vec![lease(&window, 9, 0, 0, 1)])).await, 0), (1, 9));
    // Nothing is left for anyone.
    assert_eq!(grant(&server.sync(&body("gw-a", 2, vec![lease(&window, 9, 8, 4, 1)])).await, 0), (8, 9));
    assert_eq!(grant(&server.sync(&body("gw-b", 3, vec![lease(&window, 9, 1, 1, 1)])).await, 0), (1, 9));
    server.stop().await;
}

/// The ingest secret of `/track` guards the sync too: 401 in the usual error shape
/// without it, 200 with it; open when none is configured.
async fn ingest_token_is_required(kind: Kind) {
    let Some(store) = Store::new(kind, "token").await else { return };
    let (_, server) = served(&store).await;
    let good = body("gw-a", 1, vec![lease(&minute("erin"), 10, 0, 1, 0)]).to_string();
    for token in [None, Some("wrong"), Some("")] {
        let (status, answer, www) = server.post(&good, token).await;
        assert_eq!((status, www.as_deref()), (401, Some("Bearer")), "{token:?}: {answer}");
        let message = "missing or wrong bearer token: send Authorization: Bearer <the tracker's TRACKER_INGEST_TOKEN>";
        assert_eq!(answer, json!({"error": {"message": message, "type": "invalid_request_error"}}));
    }
    let (status, answer, _) = server.post(&good, Some(INGEST)).await;
    assert_eq!((status, grant(&answer, 0)), (200, (2, 2)), "{answer}");
    let text = server.metrics().await;
    assert_eq!(value(&text, r#"tracker_limit_syncs_total{outcome="unauthorized"}"#), Some(3), "{text}");
    assert_eq!(value(&text, r#"tracker_limit_syncs_total{outcome="ok"}"#), Some(1), "{text}");
    // `/track`'s own refusals are counted apart.
    assert_eq!(value(&text, r#"tracker_requests_rejected_total{reason="unauthorized"}"#), Some(0), "{text}");
    server.stop().await;
    drop(store);

    // Without a configured secret the endpoint is open.
    let Some(store) = Store::new(kind, "token_open").await else { return };
    let server = Server::start(Arc::new(store.tracker("t1", None).await)).await;
    let (status, answer, _) = server.post(&good, None).await;
    assert_eq!(status, 200, "{answer}");
    server.stop().await;
}

/// Every bad body is a 400 naming the field and changes nothing, even when its first
/// leases are good.
async fn bad_bodies_change_nothing(kind: Kind) {
    let Some(store) = Store::new(kind, "bad").await else { return };
    let (_, server) = served(&store).await;
    let (a, b) = (minute("frank"), minute("gina"));
    let good = body("gw-a", 1, vec![lease(&a, 50, 2, 2, 0), lease(&b, 50, 0, 1, 0)]);
    let answer = server.sync(&good).await;
    assert_eq!((grant(&answer, 0), grant(&answer, 1)), ((4, 4), (2, 2)));
    let mut bad_second = body("gw-a", 2, vec![lease(&a, 50, 40, 20, 0), lease(&b, 50, 0, 1, 0)]);
    bad_second["leases"][1]["key"] = json!("requests/60000");
    let mut bad_window = bad_second.clone();
    bad_window["leases"][1] = lease(&b, 50, 0, 1, 0);
    bad_window["leases"][1]["window_ms"] = json!(1000);
    let mut duplicate = bad_second.clone();
    duplicate["leases"][1] = lease(&a, 50, 0, 1, 0);
    let cases = [
        (bad_second.to_string(), "leases[1].key: must be counted/window_ms/user"),
        (bad_window.to_string(), "leases[1].window_ms: must be the window of the key (60000)"),
        (duplicate.to_string(), "leases[1]: the same key and window_start_ms as leases[0]"),
        (body("gw a", 2, vec![lease(&a, 50, 40, 20, 0)]).to_string(), "replica: may hold only"),
        (json!({"replica": "gw-a", "seq": 2, "interval_ms": 50, "leases": []}).to_string(), "interval_ms: must be"),
        (
            json!({"replica": "gw-a", "seq": 2, "interval_ms": 1000, "leases": [], "x": 1}).to_string(),
            "x: unknown field `x`",
        ),
        ("{\"replica\":".to_owned(), "body is not valid JSON"),
    ];
    for (bad, message) in &cases {
        let (status, answer, _) = server.post(bad, Some(INGEST)).await;
        assert_eq!(status, 400, "{bad}: {answer}");
        assert_eq!(answer["error"]["type"], "invalid_request_error");
        let got = answer["error"]["message"].as_str().unwrap();
        assert!(got.starts_with(message), "{bad}: {got}");
    }
    // Had any of them been applied (seq 2, used 40), this resend of seq 1 would be
    // stale and answered differently; and the windows hold what they held.
    assert_eq!(server.sync(&good).await, answer);
    let text = server.metrics().await;
    assert_eq!(value(&text, r#"tracker_limit_syncs_total{outcome="invalid"}"#), Some(cases.len() as u64), "{text}");
    assert_eq!(value(&text, r#"tracker_limit_granted_total{counted="requests"}"#), Some(6), "{text}");
    if let Some(in_ledger) = store.granted_in_ledger(&a.0).await {
        assert_eq!(in_ledger, 4);
    }
    server.stop().await;
}

/// Many gateway replicas hammer one limit at once, through two trackers: on
/// PostgreSQL two tracker replicas (two `Ledger`s on one database), so only the
/// window's row lock keeps them from granting the same units twice; in memory and
/// on SQLite two servers of one tracker. The replicas use everything they get: Σ
/// granted never passes the limit, and all of it is handed out.
async fn concurrent_syncs_never_pass_the_limit(kind: Kind) {
    let Some(store) = Store::new(kind, "concurrent").await else { return };
    let first = Arc::new(store.tracker("t1", Some(INGEST)).await);
    let second = match kind {
        Kind::Postgres => Arc::new(store.tracker("t2", Some(INGEST)).await),
        Kind::Memory | Kind::Sqlite => Arc::clone(&first),
    };
    let servers = Arc::new([Server::start(first).await, Server::start(second).await]);
    let window = minute("hammered");
    let limit = 1_000;
    let replicas = 16;
    let mut tasks = Vec::new();
    for r in 0..replicas {
        let (servers, window) = (Arc::clone(&servers), window.clone());
        tasks.push(tokio::spawn(async move {
            let replica = format!("gw-{r}");
            let mut granted = 0;
            for seq in 1..=60u64 {
                let server = &servers[((r + seq) % 2) as usize];
                // Other keys too, so transactions overlap in more than one window.
                let other = minute(&format!("side{}", seq % 3));
                let leases = vec![lease(&other, 1_000_000, 0, 1, 0), lease(&window, limit, granted, 5, 1)];
                let answer = server.sync(&body(&replica, seq, leases)).await;
                let (got, consumed) = grant(&answer, 1);
                assert!(consumed <= limit, "{replica} seq {seq}: consumed {consumed} > {limit}");
                assert!(got >= granted);
                granted = got;
            }
            granted
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    assert_eq!(total, limit, "Σ granted must be the whole limit, never more");
    if let Some(in_ledger) = store.granted_in_ledger(&window.0).await {
        assert_eq!(in_ledger, i64::try_from(limit).unwrap());
    }
    let servers = Arc::into_inner(servers).unwrap();
    for server in servers {
        server.stop().await;
    }
}

/// Holdings of windows that ended more than a day ago are deleted (the first sync of a
/// tracker runs the housekeeping, after its own commit); current ones stay.
async fn housekeeping_forgets_old_windows(kind: Kind) {
    let Some(store) = Store::new(kind, "housekeeping").await else { return };
    let (_, server) = served(&store).await;
    let now = u64::try_from(now_ms()).unwrap();
    let old = ("requests/60000/old".to_owned(), window_start(now - 2 * 86_400_000, 60_000));
    let new = minute("new");
    let answer = server.sync(&body("gw-a", 1, vec![lease(&old, 10, 0, 1, 0), lease(&new, 10, 0, 1, 0)])).await;
    assert_eq!((grant(&answer, 0), grant(&answer, 1)), ((2, 2), (2, 2)));
    if kind != Kind::Memory {
        assert_eq!(store.granted_in_ledger(&old.0).await, Some(0), "the old window is gone");
        assert_eq!(store.granted_in_ledger(&new.0).await, Some(2), "the current one stays");
    }
    let text = server.metrics().await;
    assert_eq!(value(&text, r#"tracker_ledger_errors_total{op="compact"}"#).unwrap_or(0), 0, "{text}");
    server.stop().await;
}
