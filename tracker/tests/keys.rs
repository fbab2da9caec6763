#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code: a panic is a failed test
//! Managed API keys (issue 16) over real HTTP on loopback: the admin endpoints
//! (`/v1/keys`) and the gateways' (`/v1/keys/resolve`, `/v1/keys/changes`), against
//! SQLite and PostgreSQL (each test its own database on the test process's throwaway
//! server, `tests/pg.sh`; without PostgreSQL's server binaries those runs say SKIP and
//! pass, except under CI), and without a ledger.

use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use usage_tracking::time::now_ms;
use usage_tracking::{serve, Ledger, Limits, Tracker};

mod common;
use common::{postgres_client, postgres_database, sqlite, TempDir};

const ADMIN: &str = "admin-s3cret";
const INGEST: &str = "ingest-s3cret";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sqlite,
    Postgres,
}

/// Where a test's tracker keeps its ledger.
struct Store {
    kind: Kind,
    dir: Option<TempDir>,
    url: Option<String>,
}

impl Store {
    /// `None` (after saying SKIP) when `kind` is PostgreSQL and it is not installed.
    async fn new(kind: Kind, test: &str) -> Option<Store> {
        match kind {
            Kind::Sqlite => Some(Store { kind, dir: Some(TempDir::new(test)), url: None }),
            Kind::Postgres => {
                let url = postgres_database("k", test).await?;
                Some(Store { kind, dir: None, url: Some(url) })
            }
        }
    }

    async fn ledger(&self) -> Arc<Ledger> {
        let ledger = match self.kind {
            Kind::Sqlite => Ledger::open_sqlite(&self.dir.as_ref().unwrap().0, "t1"),
            Kind::Postgres => Ledger::open_postgres(self.url.as_ref().unwrap(), "t1").await,
        };
        Arc::new(ledger.unwrap())
    }

    /// A tracker on this store with the given admin and ingest secrets.
    async fn tracker(&self, admin: Option<&str>, ingest: Option<&str>) -> Tracker {
        let tracker = Tracker::with_ledger(Limits::default(), self.ledger().await).await.unwrap();
        tracker.with_admin_token(admin).with_ingest_token(ingest)
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

    /// Every column of every row of `sql`, as text (cast in `sql`; NULL as "NULL").
    async fn rows(&self, sql: &str) -> Vec<Vec<String>> {
        match self.kind {
            Kind::Sqlite => {
                let (path, sql) = (self.sqlite_file(), sql.to_owned());
                tokio::task::spawn_blocking(move || {
                    let conn = sqlite(&path);
                    let mut statement = conn.prepare(&sql).unwrap();
                    let columns = statement.column_count();
                    let rows = statement
                        .query_map([], |row| {
                            (0..columns)
                                .map(|i| Ok(row.get::<_, Option<String>>(i)?.unwrap_or_else(|| "NULL".into())))
                                .collect::<Result<Vec<String>, _>>()
                        })
                        .unwrap();
                    rows.collect::<Result<Vec<_>, _>>().unwrap()
                })
                .await
                .unwrap()
            }
            Kind::Postgres => {
                let rows = self.postgres().await.query(sql, &[]).await.unwrap();
                rows.iter()
                    .map(|row| {
                        (0..row.len())
                            .map(|i| row.get::<_, Option<String>>(i).unwrap_or_else(|| "NULL".into()))
                            .collect()
                    })
                    .collect()
            }
        }
    }

    fn sqlite_file(&self) -> std::path::PathBuf {
        self.dir.as_ref().unwrap().0.join(usage_tracking::ledger::sqlite::FILE_NAME)
    }

    async fn postgres(&self) -> tokio_postgres::Client {
        postgres_client(self.url.as_ref().unwrap()).await
    }
}

/// Runs `$test(kind)` as `$test::sqlite` and `$test::postgres`.
macro_rules! every_ledger {
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

every_ledger!(
    create_resolve_list_revoke,
    expired_keys_stop_resolving_and_are_in_changes,
    admin_token_is_enforced,
    ingest_token_guards_resolve_and_changes,
    bad_requests_write_nothing,
    changes_are_cut_without_skipping,
    schema_3_ledger_is_migrated,
);

struct Server {
    base: String,
    client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

/// An answer: status, JSON body (`Null` when empty) and `WWW-Authenticate`.
type Answer = (u16, Value, Option<String>);

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

    async fn send(&self, method: Method, path: &str, token: Option<&str>, body: Option<String>) -> Answer {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.header("content-type", "application/json").body(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let www = response.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_owned());
        let text = response.text().await.unwrap();
        let body = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap() };
        (status, body, www)
    }

    /// `POST /v1/keys` with the admin secret; must be 201.
    async fn create(&self, body: &Value) -> Value {
        let (status, answer, _) = self.send(Method::POST, "/v1/keys", Some(ADMIN), Some(body.to_string())).await;
        assert_eq!(status, 201, "{answer}");
        answer
    }

    /// `GET /v1/keys…` with the admin secret; must be 200.
    async fn list(&self, path_and_query: &str) -> Value {
        let (status, answer, _) = self.send(Method::GET, path_and_query, Some(ADMIN), None).await;
        assert_eq!(status, 200, "{answer}");
        answer
    }

    /// `DELETE /v1/keys/{id}` with the admin secret: the status.
    async fn revoke(&self, id: &str) -> u16 {
        let (status, answer, _) = self.send(Method::DELETE, &format!("/v1/keys/{id}"), Some(ADMIN), None).await;
        assert!(answer.is_null() || status != 204, "{answer}");
        status
    }

    /// `POST /v1/keys/resolve` with the ingest secret.
    async fn resolve(&self, sha256: &str) -> (u16, Value) {
        let body = json!({"sha256": sha256}).to_string();
        let (status, answer, _) = self.send(Method::POST, "/v1/keys/resolve", Some(INGEST), Some(body)).await;
        (status, answer)
    }

    /// `GET /v1/keys/changes?since=…` with the ingest secret; must be 200.
    async fn changes(&self, since: i64) -> Value {
        let (status, answer, _) =
            self.send(Method::GET, &format!("/v1/keys/changes?since={since}"), Some(INGEST), None).await;
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

/// A tracker on `store` with both secrets, served.
async fn served(store: &Store) -> Server {
    Server::start(store.tracker(Some(ADMIN), Some(INGEST)).await).await
}

fn value(text: &str, series: &str) -> Option<u64> {
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

fn revoked(changes: &Value) -> Vec<&str> {
    changes["revoked"].as_array().unwrap().iter().map(|d| d.as_str().unwrap()).collect()
}

/// The 404 of an unknown, revoked or expired key: one answer for all three.
fn not_found() -> Value {
    json!({"error": {"message": "unknown, revoked or expired key", "type": "invalid_request_error"}})
}

// ---------------------------------------------------------------------------------------
// Tests

/// The life of a key: created (shown once, stored as its digest), resolved by digest
/// (which sets `last_used_at`), listed without the key, revoked (then 404, and in the
/// changes since before the revocation only); revoking again is 204 again.
async fn create_resolve_list_revoke(kind: Kind) {
    let Some(store) = Store::new(kind, "life").await else { return };
    let server = served(&store).await;
    let before = now_ms() / 1000;
    let created = server.create(&json!({"user": "alice", "groups": ["premium", "free"], "name": "ci bot"})).await;
    let after = now_ms() / 1000;
    let key = created["key"].as_str().unwrap().to_owned();
    let sha256 = created["sha256"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(key.starts_with("tgk_") && key.len() == 4 + 43, "{key}");
    assert!(key[4..].bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "{key}");
    assert_eq!(sha256, sha256_hex(&key));
    assert!(id.starts_with("key_") && id.len() == 20 && id[4..].bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    let created_at = created["created_at"].as_i64().unwrap();
    assert!((before..=after).contains(&created_at), "{created}");
    assert_eq!(
        created,
        json!({"id": id, "key": key, "sha256": sha256, "user": "alice", "groups": ["free", "premium"],
               "name": "ci bot", "created_at": created_at, "expires_at": null})
    );
    // The ledger holds the digest, never the key.
    let stored = store.rows("SELECT id, sha256, user_name, user_groups, name FROM api_keys").await;
    assert_eq!(stored, [[id.as_str(), &sha256, "alice", "free,premium", "ci bot"]]);
    let times = "SELECT CAST(created_at_ms AS TEXT), CAST(expires_at_ms AS TEXT), CAST(revoked_at_ms AS TEXT), \
                 CAST(last_used_at_ms AS TEXT) FROM api_keys";
    let stored = store.rows(times).await;
    assert_eq!(stored[0][1..], ["NULL", "NULL", "NULL"]);
    assert_eq!(stored[0][0].parse::<i64>().unwrap() / 1000, created_at);

    // Listed without the key and with only 8 characters of the digest; not used yet.
    let listed = server.list("/v1/keys?user=alice").await;
    let text = listed.to_string();
    assert!(!text.contains(&key) && !text.contains(&sha256), "{text}");
    assert_eq!(
        listed,
        json!({"keys": [{"id": id, "user": "alice", "groups": ["free", "premium"], "name": "ci bot",
                         "created_at": created_at, "expires_at": null, "revoked_at": null, "last_used_at": null,
                         "sha256_prefix": &sha256[..8]}]})
    );

    // Resolved by digest: the identity; and now it was used.
    let (status, resolved) = server.resolve(&sha256).await;
    assert_eq!(status, 200, "{resolved}");
    assert_eq!(resolved, json!({"id": id, "user": "alice", "groups": ["free", "premium"], "expires_at": null}));
    // Written just after the answer: polled.
    let mut listed = server.list("/v1/keys?user=alice").await;
    for _ in 0..200 {
        if !listed["keys"][0]["last_used_at"].is_null() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        listed = server.list("/v1/keys?user=alice").await;
    }
    let last_used = listed["keys"][0]["last_used_at"].as_i64().unwrap();
    assert!(last_used >= created_at && last_used <= now_ms() / 1000, "{listed}");

    // A second key, for bob, without groups: the listings, newest first.
    let bob = server.create(&json!({"user": "bob"})).await;
    assert_eq!((&bob["groups"], &bob["name"]), (&json!([]), &Value::Null));
    assert_ne!(bob["key"], created["key"]);
    let all = server.list("/v1/keys").await;
    let ids: Vec<&str> = all["keys"].as_array().unwrap().iter().map(|k| k["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [bob["id"].as_str().unwrap(), id.as_str()]);
    assert_eq!(server.list("/v1/keys?limit=1").await["keys"].as_array().unwrap().len(), 1);
    assert_eq!(server.list("/v1/keys?user=bob").await["keys"][0]["id"], bob["id"]);
    assert_eq!(server.list("/v1/keys?user=nobody").await, json!({"keys": []}));

    // An unknown digest: 404.
    let unknown = sha256_hex("tgk_not-a-key");
    assert_eq!(server.resolve(&unknown).await, (404, not_found()));

    // Revoked: 404 like an unknown key, in the changes since before, not since after.
    let before_revoke = now_ms();
    assert_eq!(server.revoke(&id).await, 204);
    let after_revoke = now_ms();
    assert_eq!(server.resolve(&sha256).await, (404, not_found()));
    let changes = server.changes(before_revoke - 1).await;
    assert_eq!(revoked(&changes), [sha256.as_str()]);
    assert_eq!(changes["more"], false);
    let now = changes["now"].as_i64().unwrap();
    assert!(now >= after_revoke && now <= now_ms(), "{changes}");
    assert_eq!(revoked(&server.changes(after_revoke).await), Vec::<&str>::new());
    assert_eq!(revoked(&server.changes(now).await), Vec::<&str>::new());
    // Listed as revoked; the row stays; bob's key still resolves.
    let listed = server.list("/v1/keys?user=alice").await;
    let revoked_at = listed["keys"][0]["revoked_at"].as_i64().unwrap();
    assert!(revoked_at * 1000 >= before_revoke - 999 && revoked_at * 1000 <= after_revoke, "{listed}");
    assert_eq!(server.resolve(bob["sha256"].as_str().unwrap()).await.0, 200);

    // Revoking again is 204 and keeps the first time; an unknown id is 404.
    assert_eq!(server.revoke(&id).await, 204);
    assert_eq!(server.list("/v1/keys?user=alice").await["keys"][0]["revoked_at"], revoked_at);
    assert_eq!(revoked(&server.changes(after_revoke).await), Vec::<&str>::new());
    let (status, answer, _) = server.send(Method::DELETE, "/v1/keys/key_0000000000000000", Some(ADMIN), None).await;
    assert_eq!(status, 404, "{answer}");
    assert_eq!(answer["error"]["message"], "no key has the id \"key_0000000000000000\"");

    let text = server.metrics().await;
    assert_eq!(value(&text, "tracker_keys_created_total"), Some(2), "{text}");
    assert_eq!(value(&text, "tracker_keys_revoked_total"), Some(1), "{text}");
    assert_eq!(value(&text, r#"tracker_key_resolves_total{outcome="found"}"#), Some(2), "{text}");
    assert_eq!(value(&text, r#"tracker_key_resolves_total{outcome="unknown"}"#), Some(2), "{text}");
    assert!(!text.contains(&sha256[..8]) && !text.contains("alice"), "{text}");
    server.stop().await;
}

/// A key with `expires_at` resolves until then; after it, 404 like an unknown key, and
/// it is in the changes feed of the interval its expiry passed in.
async fn expired_keys_stop_resolving_and_are_in_changes(kind: Kind) {
    let Some(store) = Store::new(kind, "expired").await else { return };
    let server = served(&store).await;
    let start = now_ms();
    // At least a second ahead (expires_at is in whole seconds).
    let expires_at = start / 1000 + 2;
    let created = server.create(&json!({"user": "carol", "expires_at": expires_at})).await;
    assert_eq!(created["expires_at"], expires_at);
    let sha256 = created["sha256"].as_str().unwrap();
    let (status, resolved) = server.resolve(sha256).await;
    assert_eq!(status, 200, "{resolved}");
    assert_eq!(resolved["expires_at"], expires_at);
    assert_eq!(resolved["user"], "carol");
    assert_eq!(revoked(&server.changes(start - 1).await), Vec::<&str>::new(), "not expired yet");

    while now_ms() <= expires_at * 1000 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server.resolve(sha256).await, (404, not_found()));
    let changes = server.changes(start - 1).await;
    assert_eq!(revoked(&changes), [sha256]);
    assert!(changes["now"].as_i64().unwrap() >= expires_at * 1000);
    // Reported once: not in the changes after its expiry.
    assert_eq!(revoked(&server.changes(expires_at * 1000).await), Vec::<&str>::new());
    // Listed still, not revoked.
    let listed = server.list("/v1/keys?user=carol").await;
    assert_eq!(
        (&listed["keys"][0]["expires_at"], &listed["keys"][0]["revoked_at"]),
        (&json!(expires_at), &Value::Null)
    );
    server.stop().await;
}

/// The admin endpoints need the admin secret: 401 (with `WWW-Authenticate`) without it
/// or with another one, including the ingest secret; 404 when none is configured.
async fn admin_token_is_enforced(kind: Kind) {
    let Some(store) = Store::new(kind, "admin").await else { return };
    let server = served(&store).await;
    let body = Some(json!({"user": "dave"}).to_string());
    let message = "missing or wrong bearer token: send Authorization: Bearer <the tracker's TRACKER_ADMIN_TOKEN>";
    for token in [None, Some("wrong"), Some(INGEST), Some("")] {
        for (method, path, body) in [
            (Method::POST, "/v1/keys", body.clone()),
            (Method::GET, "/v1/keys", None),
            (Method::DELETE, "/v1/keys/key_0000000000000000", None),
        ] {
            let (status, answer, www) = server.send(method.clone(), path, token, body).await;
            assert_eq!((status, www.as_deref()), (401, Some("Bearer")), "{method} {token:?}: {answer}");
            assert_eq!(answer, json!({"error": {"message": message, "type": "invalid_request_error"}}));
        }
    }
    assert_eq!(store.rows("SELECT id FROM api_keys").await.len(), 0, "nothing was created");
    let id = server.create(&json!({"user": "dave"})).await["id"].as_str().unwrap().to_owned();
    server.stop().await;

    // Without an admin secret the endpoints do not exist (the gateways' still do).
    let server = Server::start(store.tracker(None, Some(INGEST)).await).await;
    let delete = format!("/v1/keys/{id}");
    for (method, path, body) in [
        (Method::POST, "/v1/keys", body.clone()),
        (Method::GET, "/v1/keys", None),
        (Method::DELETE, delete.as_str(), None),
    ] {
        let (status, answer, _) = server.send(method.clone(), path, Some(ADMIN), body).await;
        assert_eq!(status, 404, "{method}: {answer}");
        assert_eq!(answer["error"]["message"], format!("no route for {method} {path}"));
    }
    assert_eq!(store.rows("SELECT CAST(revoked_at_ms AS TEXT) FROM api_keys").await, [["NULL"]]);
    assert_eq!(server.changes(0).await["revoked"], json!([]));
    server.stop().await;
}

/// Resolve and changes take the gateways' ingest secret, as `/track` does: 401 without
/// it (the admin secret is not it); open when none is configured.
async fn ingest_token_guards_resolve_and_changes(kind: Kind) {
    let Some(store) = Store::new(kind, "ingest").await else { return };
    let server = served(&store).await;
    let sha256 = server.create(&json!({"user": "erin"})).await["sha256"].as_str().unwrap().to_owned();
    let resolve = Some(json!({"sha256": sha256}).to_string());
    let message = "missing or wrong bearer token: send Authorization: Bearer <the tracker's TRACKER_INGEST_TOKEN>";
    for token in [None, Some("wrong"), Some(ADMIN)] {
        let (status, answer, www) = server.send(Method::POST, "/v1/keys/resolve", token, resolve.clone()).await;
        assert_eq!((status, www.as_deref()), (401, Some("Bearer")), "{token:?}: {answer}");
        assert_eq!(answer, json!({"error": {"message": message, "type": "invalid_request_error"}}));
        let (status, answer, _) = server.send(Method::GET, "/v1/keys/changes?since=0", token, None).await;
        assert_eq!(status, 401, "{token:?}: {answer}");
    }
    let text = server.metrics().await;
    assert_eq!(value(&text, r#"tracker_key_resolves_total{outcome="found"}"#), Some(0), "{text}");
    assert_eq!(server.list("/v1/keys").await["keys"][0]["last_used_at"], Value::Null);
    assert_eq!(server.resolve(&sha256).await.0, 200);
    server.stop().await;

    let server = Server::start(store.tracker(Some(ADMIN), None).await).await;
    let (status, answer, _) = server.send(Method::POST, "/v1/keys/resolve", None, resolve).await;
    assert_eq!((status, &answer["user"]), (200, &json!("erin")), "{answer}");
    let (status, answer, _) = server.send(Method::GET, "/v1/keys/changes?since=0", None, None).await;
    assert_eq!((status, &answer["revoked"]), (200, &json!([])), "{answer}");
    server.stop().await;
}

/// Every bad body or query is a 400 naming what is wrong, and writes nothing.
async fn bad_requests_write_nothing(kind: Kind) {
    let Some(store) = Store::new(kind, "bad").await else { return };
    let server = served(&store).await;
    let now_s = now_ms() / 1000;
    let long = "x".repeat(129);
    let many: Vec<String> = (0..65).map(|i| format!("g{i}")).collect();
    let bodies: Vec<(String, &str)> = vec![
        (json!({"user": ""}).to_string(), "user: must not be empty"),
        (json!({"user": "a,b"}).to_string(), "user: must not contain commas"),
        (json!({"user": "a", "groups": ["ok", "a b"]}).to_string(), "groups[1]: must not contain commas"),
        (json!({"user": "a", "groups": many}).to_string(), "groups: must have at most 64 entries"),
        (json!({"user": "a", "name": long}).to_string(), "name: must be at most 128 characters"),
        (json!({"user": "a", "name": "x\ty"}).to_string(), "name: must not contain control characters"),
        (json!({"user": "a", "expires_at": now_s - 1}).to_string(), "expires_at: must be in the future"),
        (json!({"user": "a", "expires_at": 253_402_300_800i64}).to_string(), "expires_at: must be at most"),
        (json!({"user": "a", "id": "key_mine"}).to_string(), "id: unknown field `id`"),
        (json!({"groups": ["a"]}).to_string(), "body: missing field `user`"),
        ("{\"user\": \"a\"".to_owned(), "body is not valid JSON"),
    ];
    for (body, message) in &bodies {
        let (status, answer, _) = server.send(Method::POST, "/v1/keys", Some(ADMIN), Some(body.clone())).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["error"]["type"], "invalid_request_error");
        let got = answer["error"]["message"].as_str().unwrap();
        assert!(got.starts_with(message), "{body}: {got}");
    }
    assert_eq!(store.rows("SELECT id FROM api_keys").await.len(), 0, "nothing was written");
    assert_eq!(value(&server.metrics().await, "tracker_keys_created_total"), Some(0));

    for (body, message) in [
        (json!({"sha256": "ABC"}).to_string(), "sha256: must be 64 lowercase hex characters"),
        (json!({"sha256": "A".repeat(64)}).to_string(), "sha256: must be 64 lowercase hex characters"),
        (json!({"key": "tgk_x"}).to_string(), "key: unknown field `key`"),
        ("nope".to_owned(), "body is not valid JSON"),
    ] {
        let (status, answer, _) = server.send(Method::POST, "/v1/keys/resolve", Some(INGEST), Some(body.clone())).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(answer["error"]["message"].as_str().unwrap().starts_with(message), "{body}: {answer}");
    }
    for (path, token, message) in [
        ("/v1/keys/changes", INGEST, "since: required"),
        ("/v1/keys/changes?since=abc", INGEST, "since: expected Unix milliseconds"),
        ("/v1/keys/changes?since=-1", INGEST, "since: expected Unix milliseconds"),
        ("/v1/keys/changes?since=1&since=2", INGEST, "since: given more than once"),
        ("/v1/keys/changes?since=1&limit=2", INGEST, "unknown parameter \"limit\""),
        ("/v1/keys?limit=0", ADMIN, "limit: expected an integer from 1 to 10000"),
        ("/v1/keys?limit=10001", ADMIN, "limit: expected an integer from 1 to 10000"),
        ("/v1/keys?user=", ADMIN, "user: must not be empty"),
        ("/v1/keys?usr=a", ADMIN, "unknown parameter \"usr\""),
    ] {
        let (status, answer, _) = server.send(Method::GET, path, Some(token), None).await;
        assert_eq!(status, 400, "{path}: {answer}");
        assert!(answer["error"]["message"].as_str().unwrap().starts_with(message), "{path}: {answer}");
    }
    let text = server.metrics().await;
    assert_eq!(value(&text, r#"tracker_key_resolves_total{outcome="unknown"}"#), Some(0), "{text}");
    server.stop().await;
}

/// More than 10 000 changes: the first answer is cut (`more`), and asking again from its
/// `now` gives the rest; changes of the same millisecond as the cut are not skipped.
async fn changes_are_cut_without_skipping(kind: Kind) {
    let Some(store) = Store::new(kind, "paging").await else { return };
    let server = served(&store).await;
    // 10 005 revoked keys, two per millisecond (rows 10 000 and 10 001 share one).
    let insert = match kind {
        Kind::Sqlite => {
            "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 10005) \
             INSERT INTO api_keys SELECT 'key_' || x, printf('%064d', x), 'u', '', NULL, 1000, NULL, 2000 + x / 2, \
             NULL FROM n"
        }
        Kind::Postgres => {
            "INSERT INTO api_keys SELECT 'key_' || x, lpad(x::text, 64, '0'), 'u', '', NULL, 1000, NULL, \
             2000 + x / 2, NULL FROM generate_series(1, 10005) AS x"
        }
    };
    store.execute(insert).await;
    let digest = |x: usize| format!("{x:064}");
    let first = server.changes(0).await;
    assert_eq!(first["more"], true);
    let got = revoked(&first);
    assert_eq!(got.len(), 10_000);
    assert_eq!((got[0], got[9_999]), (digest(1).as_str(), digest(10_000).as_str()));
    // Row 10 000 is at 7000 ms, as is 10 001, which did not fit: continue from 6999.
    assert_eq!(first["now"], 6_999);
    let second = server.changes(6_999).await;
    assert_eq!(second["more"], false);
    let want: Vec<String> = (10_000..=10_005).map(digest).collect();
    assert_eq!(revoked(&second), want.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(second["now"].as_i64().unwrap() >= now_ms() - 10_000);
    server.stop().await;
}

/// A ledger of schema 3 (no `api_keys`) is migrated in place when opened: the table is
/// created, what was there stays, and keys work.
async fn schema_3_ledger_is_migrated(kind: Kind) {
    let Some(store) = Store::new(kind, "schema3").await else { return };
    let (version, set_version) = match kind {
        Kind::Sqlite => ("SELECT CAST(user_version AS TEXT) FROM pragma_user_version", "PRAGMA user_version = "),
        Kind::Postgres => {
            ("SELECT CAST(version AS TEXT) FROM tollgate_ledger_schema", "UPDATE tollgate_ledger_schema SET version = ")
        }
    };
    drop(store.ledger().await);
    assert_eq!(store.rows(version).await, [["4"]]);
    store
        .execute(&format!(
            "DROP TABLE api_keys; INSERT INTO limit_replicas (replica, seen_ms) VALUES ('gw-a', 5); {set_version}3"
        ))
        .await;
    assert_eq!(store.rows(version).await, [["3"]]);
    let server = served(&store).await;
    assert_eq!(store.rows(version).await, [["4"]]);
    assert_eq!(store.rows("SELECT replica FROM limit_replicas").await, [["gw-a"]]);
    let sha256 = server.create(&json!({"user": "frank"})).await["sha256"].as_str().unwrap().to_owned();
    assert_eq!(server.resolve(&sha256).await.0, 200);
    server.stop().await;
}

/// Without a ledger every keys endpoint is 404, saying it needs one (after the secrets
/// are checked, as the usage API does).
#[tokio::test]
async fn without_a_ledger_keys_are_404() {
    let tracker = Tracker::new(Limits::default()).with_admin_token(Some(ADMIN)).with_ingest_token(Some(INGEST));
    let server = Server::start(tracker).await;
    let message = "managed API keys need the ledger: start the tracker with --data-dir or --database-url";
    let digest = json!({"sha256": "a".repeat(64)}).to_string();
    for (method, path, token, body) in [
        (Method::POST, "/v1/keys", ADMIN, Some(json!({"user": "a"}).to_string())),
        (Method::GET, "/v1/keys", ADMIN, None),
        (Method::DELETE, "/v1/keys/key_0000000000000000", ADMIN, None),
        (Method::POST, "/v1/keys/resolve", INGEST, Some(digest)),
        (Method::GET, "/v1/keys/changes?since=0", INGEST, None),
    ] {
        let (status, answer, _) = server.send(method.clone(), path, Some(token), body).await;
        assert_eq!((status, answer["error"]["message"].as_str()), (404, Some(message)), "{method} {path}");
    }
    // The secrets still come first.
    assert_eq!(server.send(Method::GET, "/v1/keys", None, None).await.0, 401);
    assert_eq!(server.send(Method::GET, "/v1/keys/changes?since=0", None, None).await.0, 401);
    server.stop().await;
}
