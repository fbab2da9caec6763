#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code: a panic is a failed test
//! The usage page (`/ui`) over real HTTP against the in-process router: it exists only
//! with a ledger and the API token; the login sets a session cookie that is not the
//! token, with the attributes the README promises; every answer carries the security
//! headers; a hostile user name is escaped; and the numbers the page shows equal what
//! the usage API says of the same ledger (on SQLite and PostgreSQL).

use std::sync::Arc;

use reqwest::header::{HeaderMap, CACHE_CONTROL, CONTENT_SECURITY_POLICY, COOKIE, LOCATION, SET_COOKIE};
use reqwest::redirect::Policy;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use usage_tracking::time::now_ms;
use usage_tracking::{serve, Ledger, Limits, Tracker};

mod common;
use common::{postgres_database, TempDir};

const TOKEN: &str = "s3cret-ui-token";

struct Server {
    base: String,
    client: reqwest::Client,
    _stop: oneshot::Sender<()>,
    _dir: Option<TempDir>,
}

impl Server {
    async fn start(tracker: Tracker, dir: Option<TempDir>) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(serve(listener, Arc::new(tracker), async move {
            let _ = stopped.await;
        }));
        // No redirects followed, no cookie store: the test reads and sends cookies itself.
        let client = reqwest::Client::builder().no_proxy().redirect(Policy::none()).build().unwrap();
        Server { base, client, _stop: stop, _dir: dir }
    }

    /// A tracker with a SQLite ledger in a fresh directory and `token` as its API token.
    async fn sqlite(test: &str, token: Option<&str>) -> Server {
        let dir = TempDir::new(test);
        let ledger = Arc::new(Ledger::open_sqlite(&dir.0, "r0").unwrap());
        let tracker = Tracker::with_ledger(Limits::default(), ledger).await.unwrap().with_api_token(token);
        Server::start(tracker, Some(dir)).await
    }

    async fn get(&self, path: &str, cookie: Option<&str>) -> (u16, HeaderMap, String) {
        let mut request = self.client.get(format!("{}{path}", self.base));
        if let Some(cookie) = cookie {
            request = request.header(COOKIE, cookie);
        }
        let response = request.send().await.unwrap();
        (response.status().as_u16(), response.headers().clone(), response.text().await.unwrap())
    }

    async fn post(&self, path: &str, form: &[(&str, &str)], headers: &[(&str, &str)]) -> (u16, HeaderMap, String) {
        let mut request = self.client.post(format!("{}{path}", self.base)).form(form);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        (response.status().as_u16(), response.headers().clone(), response.text().await.unwrap())
    }

    /// Logs in; the `name=value` of the session cookie.
    async fn login(&self) -> String {
        let (status, headers, _) = self.post("/ui/login", &[("token", TOKEN)], &[]).await;
        assert_eq!(status, 303);
        let set = headers[SET_COOKIE].to_str().unwrap();
        set.split(';').next().unwrap().to_owned()
    }

    async fn track(&self, body: &Value) {
        let response = self.client.post(format!("{}/track", self.base)).json(body).send().await.unwrap();
        assert_eq!(response.status(), 200);
    }

    async fn api(&self, path: &str) -> Value {
        let response = self.client.get(format!("{}{path}", self.base)).bearer_auth(TOKEN).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        response.json().await.unwrap()
    }
}

/// The value of `attr` in the first tag holding `marker` (e.g. `id="total-requests"`).
fn attr(html: &str, marker: &str, attr: &str) -> Option<u64> {
    let at = html.find(marker)?;
    let tag_start = html[..at].rfind('<')?;
    let tag = &html[tag_start..tag_start + html[tag_start..].find('>')?];
    let value = tag.split(&format!("{attr}=\"")).nth(1)?.split('"').next()?;
    Some(value.parse().unwrap())
}

fn assert_secured(headers: &HeaderMap, what: &str) {
    let csp = headers[CONTENT_SECURITY_POLICY].to_str().unwrap();
    for part in ["default-src 'none'", "form-action 'self'", "frame-ancestors 'none'", "img-src data:"] {
        assert!(csp.contains(part), "{what}: {csp}");
    }
    assert_eq!(headers[CACHE_CONTROL], "no-store", "{what}");
    assert_eq!(headers["x-frame-options"], "DENY", "{what}");
}

#[tokio::test]
async fn page_is_404_without_a_ledger_or_the_token() {
    let memory = Server::start(Tracker::new(Limits::default()).with_api_token(Some(TOKEN)), None).await;
    let no_token = Server::sqlite("ui-no-token", None).await;
    for (server, what) in [(&memory, "no ledger"), (&no_token, "no token")] {
        assert_eq!(server.get("/ui", None).await.0, 404, "{what}");
        assert_eq!(server.post("/ui/login", &[("token", TOKEN)], &[]).await.0, 404, "{what}");
        assert_eq!(server.post("/ui/logout", &[], &[]).await.0, 404, "{what}");
    }
}

#[tokio::test]
async fn login_sets_a_session_cookie_that_is_not_the_token() {
    let server = Server::sqlite("ui-login", Some(TOKEN)).await;

    // Without a session: the login form, secured.
    let (status, headers, body) = server.get("/ui", None).await;
    assert_eq!(status, 200);
    assert!(body.contains("id=\"login\"") && !body.contains("id=\"usage\""), "{body}");
    assert!(body.contains("action=\"/ui/login\"") && body.contains("type=\"password\""), "{body}");
    assert_secured(&headers, "login form");
    // The token in a URL logs nobody in.
    let (_, _, body) = server.get(&format!("/ui?token={TOKEN}"), None).await;
    assert!(body.contains("id=\"login\""), "{body}");

    // Wrong or missing tokens: 401, the form again with one short message, no cookie.
    for form in [vec![("token", "wrong")], vec![("token", "")], vec![("password", TOKEN)], vec![]] {
        let (status, headers, body) = server.post("/ui/login", &form, &[]).await;
        assert_eq!(status, 401, "{form:?}");
        assert!(headers.get(SET_COOKIE).is_none(), "{form:?}");
        assert!(body.contains("<p class=\"error\" id=\"login-error\">Wrong token.</p>"), "{form:?}: {body}");
        assert_secured(&headers, "failed login");
    }

    // The right token: 303 to the page, with the cookie's attributes; Secure only
    // behind an https proxy.
    for (forwarded, secure) in [(None, false), (Some("https"), true), (Some("http"), false)] {
        let extra: Vec<(&str, &str)> = forwarded.map(|p| ("x-forwarded-proto", p)).into_iter().collect();
        let (status, headers, _) = server.post("/ui/login", &[("token", TOKEN)], &extra).await;
        assert_eq!(status, 303, "{forwarded:?}");
        assert_eq!(headers[LOCATION], "/ui");
        assert_secured(&headers, "login");
        let set = headers[SET_COOKIE].to_str().unwrap();
        let attrs: Vec<&str> = set.split(';').map(str::trim).collect();
        let value = attrs[0].strip_prefix("tollgate_session=").unwrap();
        assert!(!value.is_empty() && !value.contains(TOKEN), "{set}");
        for want in ["HttpOnly", "SameSite=Strict", "Path=/ui", "Max-Age=43200"] {
            assert!(attrs.contains(&want), "{set}: {want}");
        }
        assert_eq!(attrs.contains(&"Secure"), secure, "{forwarded:?}: {set}");
    }

    // The session opens the page; a tampered one or the token itself as a cookie does not.
    let cookie = server.login().await;
    let (status, headers, body) = server.get("/ui", Some(&cookie)).await;
    assert_eq!(status, 200);
    assert!(body.contains("id=\"usage\"") && body.contains("data-ready=\"true\""), "{body}");
    assert_secured(&headers, "page");
    let tampered = format!("{}x", cookie);
    for bad in [tampered.as_str(), &format!("tollgate_session={TOKEN}"), "tollgate_session="] {
        let (status, _, body) = server.get("/ui", Some(bad)).await;
        assert_eq!(status, 200, "{bad}");
        assert!(body.contains("id=\"login\""), "{bad}");
    }

    // Logout clears the cookie.
    let (status, headers, _) = server.post("/ui/logout", &[], &[("cookie", &cookie)]).await;
    assert_eq!(status, 303);
    assert_eq!(headers[LOCATION], "/ui");
    let set = headers[SET_COOKIE].to_str().unwrap();
    assert!(set.starts_with("tollgate_session=;") && set.contains("Max-Age=0"), "{set}");
}

#[tokio::test]
async fn hostile_names_are_escaped() {
    let server = Server::sqlite("ui-hostile", Some(TOKEN)).await;
    let hostile = r#"<script>alert("x")</script>'&"#;
    let model = r#"<img src=x onerror="alert(1)">"#;
    let ts = now_ms() as f64 / 1000.0;
    server
        .track(&json!([{"id": "h1", "ts": ts, "user": hostile, "path": "/v1/chat/completions", "model": model,
            "status": 200, "prompt_tokens": 3, "completion_tokens": 4}]))
        .await;
    let cookie = server.login().await;
    let query = serde_urlencoded::to_string([("user", hostile)]).unwrap();
    for path in ["/ui".to_owned(), format!("/ui?{query}"), format!("/ui?range={}", urlencode(hostile))] {
        let (_, _, body) = server.get(&path, Some(&cookie)).await;
        assert!(!body.contains("<script") && !body.contains("<img"), "{path}: {body}");
        assert!(!body.contains("alert(\"x\")") && !body.contains("\"alert(1)\""), "{path}");
    }
    let (_, _, body) = server.get(&format!("/ui?{query}"), Some(&cookie)).await;
    let escaped = "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&#39;&amp;";
    assert!(body.contains(&format!("data-user=\"{escaped}\"")), "{body}");
    assert!(body.contains("&lt;img src=x onerror=&quot;alert(1)&quot;&gt;"), "{body}");
    // The user's recent events are shown, and the totals are theirs.
    assert_eq!(attr(&body, "id=\"total-requests\"", "data-value"), Some(1));
    assert!(body.contains("<table id=\"recent\">"), "{body}");
}

fn urlencode(s: &str) -> String {
    serde_urlencoded::to_string([("x", s)]).unwrap().trim_start_matches("x=").to_owned()
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Sqlite,
    Postgres,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_equal_the_ledger_sqlite() {
    numbers_equal_the_ledger(Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_equal_the_ledger_postgres() {
    numbers_equal_the_ledger(Kind::Postgres).await;
}

async fn numbers_equal_the_ledger(kind: Kind) {
    let server = match kind {
        Kind::Sqlite => Server::sqlite("ui-numbers", Some(TOKEN)).await,
        Kind::Postgres => {
            let Some(url) = postgres_database("ui", "numbers").await else { return };
            let ledger = Arc::new(Ledger::open_postgres(&url, "r0").await.unwrap());
            let tracker = Tracker::with_ledger(Limits::default(), ledger).await.unwrap().with_api_token(Some(TOKEN));
            Server::start(tracker, None).await
        }
    };
    let now = now_ms() as f64 / 1000.0;
    // (user, model, prompt, completion, cached, reasoning), spread over the last hours;
    // one event two days ago is outside the default period (24h).
    let events = [
        ("alice", "m1", 10, 5, 2, 0, 60.0),
        ("alice", "m2", 20, 7, 0, 3, 3_600.0),
        ("alice", "m1", 1, 1, 0, 0, 7_300.0),
        ("bob", "m1", 100, 50, 40, 0, 120.0),
        ("bob", "m2", 9, 9, 0, 0, 2.0 * 86_400.0),
    ];
    let mut body: Vec<Value> = events
        .iter()
        .enumerate()
        .map(|(i, (user, model, p, c, k, r, ago))| {
            json!({"id": format!("e{i}"), "ts": now - ago, "user": user, "groups": ["g"], "path": "/v1/chat/completions",
                "model": model, "status": 200, "prompt_tokens": p, "completion_tokens": c, "cached_tokens": k,
                "reasoning_tokens": r})
        })
        .collect();
    body.push(json!({"id": "d1", "ts": now - 30.0, "denied": "missing_credential", "path": "/v1/models", "count": 4}));
    body.push(json!({"id": "d2", "ts": now - 40.0, "denied": "rate_limited", "path": "/v1/chat/completions"}));
    server.track(&Value::Array(body)).await;

    let cookie = server.login().await;
    let (status, _, page) = server.get("/ui", Some(&cookie)).await;
    assert_eq!(status, 200);
    let since = now_ms() - 86_400_000 + 5_000;
    let fields = [
        ("requests", "requests"),
        ("prompt", "prompt_tokens"),
        ("completion", "completion_tokens"),
        ("cached", "cached_tokens"),
        ("reasoning", "reasoning_tokens"),
    ];
    let mut sum = [0u64; 5];
    for user in ["alice", "bob"] {
        let api = server.api(&format!("/v1/usage?user={user}&since={}", since / 1000)).await;
        for (i, (attr_name, api_name)) in fields.iter().enumerate() {
            let want = api["total"][api_name].as_u64().unwrap();
            sum[i] += want;
            let shown = attr(&page, &format!("data-user=\"{user}\""), &format!("data-{attr_name}"));
            assert_eq!(shown, Some(want), "{kind:?} {user} {attr_name}");
        }
    }
    assert_eq!(sum, [4, 131, 63, 42, 3], "{kind:?}: the API's own totals");
    for (i, id) in ["total-requests", "total-prompt", "total-completion", "total-cached"].iter().enumerate() {
        assert_eq!(attr(&page, &format!("id=\"{id}\""), "data-value"), Some(sum[i]), "{kind:?} {id}");
    }
    assert_eq!(attr(&page, "id=\"total-denied\"", "data-value"), Some(5), "{kind:?}");
    let tables = [
        ("data-model=\"m1\"", "data-prompt", 111),
        ("data-model=\"m2\"", "data-prompt", 20),
        ("data-reason=\"missing_credential\"", "data-requests", 4),
        ("data-reason=\"rate_limited\"", "data-requests", 1),
        ("data-type=\"reasoning\"", "data-value", 3),
    ];
    for (marker, name, want) in tables {
        assert_eq!(attr(&page, marker, name), Some(want), "{kind:?} {marker}");
    }
    // bob, with more tokens, comes first.
    assert!(page.find("data-user=\"bob\"") < page.find("data-user=\"alice\""), "{kind:?}");

    // One user, over 7 days: bob's older event counts now.
    let (_, _, page) = server.get("/ui?range=7d&user=bob", Some(&cookie)).await;
    let api = server.api("/v1/usage?user=bob").await;
    assert_eq!(api["total"]["requests"], 2);
    assert_eq!(attr(&page, "id=\"total-requests\"", "data-value"), Some(2), "{kind:?}");
    assert_eq!(attr(&page, "id=\"total-prompt\"", "data-value"), api["total"]["prompt_tokens"].as_u64(), "{kind:?}");
    assert_eq!(page.matches("<tr><td>").count(), 2, "{kind:?}: bob's two recent events");

    // A bad period is a 400 page that says why.
    let (status, _, page) = server.get("/ui?since=yesterday", Some(&cookie)).await;
    assert_eq!(status, 400);
    assert!(page.contains("id=\"page-error\">since: expected Unix seconds"), "{page}");
}
