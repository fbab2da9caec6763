#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code: a panic is a failed test
//! The tracker's usage page (issue 18, part 2) in a real browser: a stack with a SQLite
//! ledger, traffic for two users through the gateway (and a day of history the gateways
//! reported earlier, posted to `/track`, so the hourly chart has a shape), then headless
//! Chromium (the Debian package) opens `/ui`, is refused with a wrong token, logs in with
//! the right one by typing it and clicking, and shows the page. The numbers it shows
//! equal the usage API's for the same period; the session cookie is out of the page's
//! reach (HttpOnly); at phone width nothing overflows sideways. The screenshot at laptop
//! size is `target/test-artifacts/usage-page.png` (`make screenshot` copies it to
//! `docs/usage-page.png`).
//!
//! Chromium is driven with the DevTools protocol over `--remote-debugging-pipe` (JSON
//! messages ending in NUL on fds 3 and 4): no port, no websocket, no extra crate.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use serde_json::{json, Value};
use tollgate_e2e::*;

/// The laptop viewport of the screenshot.
const LAPTOP: (u32, u32) = (1280, 900);
const PHONE: (u32, u32) = (390, 844);

#[test]
fn usage_page_in_chromium_shows_the_ledgers_numbers() {
    let Some(chromium) = chromium() else { return };
    let creds = DevCredentials::generate();
    let stack = start_with("usage-page", &creds, json!({}), StackOptions { ledger: true, ..StackOptions::default() });

    // Live traffic: two users (the dev API key's and the dev JWT's), two models, and
    // requests without a credential.
    let jwt = creds.token(3600).unwrap();
    let users = [(creds.user.clone(), creds.api_key.clone()), (creds.jwt_user.clone(), jwt)];
    let mut sent = [0u64; 2];
    for i in 0..12usize {
        let (_, secret) = &users[i % 2];
        let mut body = chat_body(4 + 3 * i, 4 + (i as u64 % 5) * 6, i % 3 == 0);
        body["model"] = json!(if i % 4 < 2 { "mock-model" } else { "qwen3-8b" });
        let resp = chat(&stack, &[("authorization", &format!("Bearer {secret}"))], &body);
        assert_eq!(resp.status(), 200);
        resp.bytes().unwrap();
        sent[i % 2] += 1;
    }
    for _ in 0..3 {
        assert_eq!(chat(&stack, &[], &chat_body(3, 5, false)).status(), 401);
    }
    let history = post_history(&stack, &[&users[0].0, &users[1].0, "carol", "dave"]);

    // The filter reports in batches: wait until the ledger has every request.
    for (j, (user, _)) in users.iter().enumerate() {
        let want = sent[j] + history.get(user).copied().unwrap_or(0);
        eventually(Duration::from_secs(30), "the ledger has every request of the user", || {
            usage_total(&stack, &stack.tracker_url, user).filter(|t| t["requests"] == want)
        });
    }
    let denied = settle_metric(
        &stack,
        "llm_denied_requests_total",
        &[("reason", "missing_credential")],
        3.0,
        Duration::from_secs(30),
    );
    assert_eq!(denied, 3.0);

    let mut browser = Browser::launch(&chromium);
    browser.viewport(LAPTOP, false);
    browser.navigate(&format!("{}/ui", stack.tracker_url));
    browser.wait_for("document.querySelector('#login #token') !== null", "the login form");

    // A wrong token: the form again, saying so.
    browser.log_in("not-the-token");
    browser.wait_for("document.querySelector('#login-error') !== null", "the login error");
    // The right one.
    browser.log_in(&stack.api_token);
    browser.wait_for(
        "location.pathname === '/ui' && document.querySelector('#ready[data-ready=\"true\"]') !== null",
        "the usage page",
    );

    let shown = browser.eval(
        r#"(() => {
            const n = id => Number(document.getElementById(id).dataset.value);
            const users = {};
            for (const r of document.querySelectorAll('#users tr[data-user]')) {
                const d = r.dataset;
                users[d.user] = [+d.requests, +d.prompt, +d.completion, +d.cached, +d.reasoning];
            }
            const main = document.getElementById('usage');
            return {since: main.dataset.since, until: main.dataset.until, users, cookie: document.cookie,
                    total: [n('total-requests'), n('total-prompt'), n('total-completion'), n('total-cached')],
                    denied: n('total-denied'), bars: document.querySelectorAll('svg.chart rect').length};
        })()"#,
    );
    assert_eq!(shown["cookie"], "", "the session cookie must be HttpOnly");
    assert!(shown["bars"].as_u64().unwrap() > 10, "{shown}");
    assert_eq!(shown["denied"], json!(3 + history["denied"]), "{shown}");

    // Every user's row equals the usage API's total for the page's period, and the
    // totals are their sum.
    let (since, until) = (shown["since"].as_str().unwrap(), shown["until"].as_str().unwrap());
    let page_users = shown["users"].as_object().unwrap();
    assert_eq!(page_users.len(), 4, "{shown}");
    let mut sum = [0u64; 4];
    for (user, row) in page_users {
        let api: Value = client()
            .get(format!("{}/v1/usage", stack.tracker_url))
            .query(&[("user", user.as_str()), ("since", since), ("until", until)])
            .bearer_auth(&stack.api_token)
            .send()
            .unwrap()
            .json()
            .unwrap();
        let t = &api["total"];
        let want: Vec<u64> = ["requests", "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens"]
            .iter()
            .map(|k| t[k].as_u64().unwrap())
            .collect();
        let got: Vec<u64> = row.as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert_eq!(got, want, "{user}");
        for (s, w) in sum.iter_mut().zip(&want) {
            *s += w;
        }
    }
    let total: Vec<u64> = shown["total"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert_eq!(total, sum);

    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    browser.screenshot(&artifacts.join("usage-page.png"));

    // At phone width: nothing wider than the screen but the tables' own scrolling.
    browser.viewport(PHONE, true);
    browser.navigate(&format!("{}/ui", stack.tracker_url));
    browser.wait_for("document.querySelector('#ready') !== null", "the page at phone width");
    let widths = browser.eval("[document.documentElement.scrollWidth, window.innerWidth]");
    assert!(widths[0].as_u64() <= widths[1].as_u64(), "the page overflows a phone: {widths}");
    browser.screenshot(&artifacts.join("usage-page-phone.png"));
    browser.close();
}

/// Usage of the last 23 hours as the gateways would have reported it then: per hour
/// and user a few requests of varying size, and some denials. The requests per user
/// (and `denied`: the denials).
fn post_history(stack: &Stack, users: &[&str]) -> std::collections::HashMap<String, u64> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    let models = ["mock-model", "qwen3-8b", "llama-3.1-8b"];
    let mut events = Vec::new();
    let mut counts = std::collections::HashMap::new();
    for hour in 1..=22u64 {
        // A working day's shape: busier in the middle of the period.
        let load = 1 + (11 - (hour as i64 - 11).abs()) as u64 / 3;
        for (u, user) in users.iter().enumerate() {
            let n = (load * (users.len() - u) as u64).div_ceil(2);
            for k in 0..n {
                let seed = hour * 31 + u as u64 * 7 + k * 13;
                let prompt = 40 + seed * 37 % 400;
                events.push(json!({
                    "id": format!("history-{hour}-{u}-{k}"), "ts": now - hour as f64 * 3600.0 + k as f64 * 60.0,
                    "user": user, "groups": ["free"], "path": "/v1/chat/completions",
                    "model": models[(seed % 3) as usize], "status": 200, "prompt_tokens": prompt,
                    "completion_tokens": 20 + seed * 53 % 300, "cached_tokens": if k % 3 == 0 { prompt / 2 } else { 0 },
                }));
                *counts.entry(user.to_string()).or_insert(0) += 1;
            }
        }
        if hour % 4 == 0 {
            let reason = if hour % 8 == 0 { "rate_limited" } else { "invalid_credential" };
            events.push(json!({"id": format!("history-denied-{hour}"), "ts": now - hour as f64 * 3600.0,
                "denied": reason, "path": "/v1/chat/completions", "count": 2}));
            *counts.entry("denied".to_string()).or_insert(0) += 2;
        }
    }
    let mut request = client().post(format!("{}/track", stack.tracker_url)).json(&events);
    if let Some(token) = &stack.ingest_token {
        request = request.bearer_auth(token);
    }
    let resp = request.send().unwrap();
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().unwrap();
    assert_eq!(answer["accepted"], json!(events.len()), "{answer}");
    counts
}

/// The Chromium binary: `chromium` on PATH, else `/usr/bin/chromium`. Missing: skip,
/// saying so, except in CI (`make setup` installs the Debian package).
fn chromium() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|p| p.join("chromium")).find(|p| p.is_file()));
    let found = on_path.or_else(|| Some(PathBuf::from("/usr/bin/chromium")).filter(|p| p.is_file()));
    if found.is_none() {
        let why = "no chromium on PATH or at /usr/bin/chromium (`make setup` installs the Debian package)";
        assert!(!std::env::var("CI").is_ok_and(|v| v == "true" || v == "1"), "{why}");
        eprintln!("SKIPPED: {why}");
    }
    found
}

/// Headless Chromium and one page, driven over the DevTools protocol on a pipe.
struct Browser {
    child: Child,
    commands: ChildStdin,
    replies: Receiver<Value>,
    next_id: u64,
    session: String,
    profile: PathBuf,
}

impl Browser {
    fn launch(chromium: &Path) -> Browser {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
        let profile = std::env::temp_dir().join(format!("tollgate-chromium-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&profile).unwrap();
        let log = std::fs::File::create(profile.join("chromium.log")).unwrap();
        let mut args = vec![
            "--headless".to_owned(),
            "--remote-debugging-pipe".into(),
            format!("--user-data-dir={}", profile.display()),
            "--no-first-run".into(),
            "--no-default-browser-check".into(),
            "--disable-gpu".into(),
            "--disable-extensions".into(),
            "--disable-dev-shm-usage".into(),
            "--hide-scrollbars".into(),
            "--mute-audio".into(),
        ];
        // Chromium refuses to run as root with its sandbox on.
        if Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.trim_ascii() == b"0") {
            args.push("--no-sandbox".into());
        }
        args.push("about:blank".into());
        // The protocol runs on fds 3 (to the browser) and 4 (from it): our stdin and stdout.
        let mut child = Command::new("bash")
            .arg("-c")
            .arg(r#"exec "$0" "$@" 3<&0 4>&1 0</dev/null 1>/dev/null"#)
            .arg(chromium)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let commands = child.stdin.take().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let (tx, replies) = mpsc::channel();
        std::thread::spawn(move || {
            let mut message = Vec::new();
            while out.read_until(0, &mut message).is_ok_and(|n| n > 0) {
                if message.last() == Some(&0) {
                    message.pop();
                }
                if let Ok(value) = serde_json::from_slice::<Value>(&message) {
                    if value.get("id").is_some() && tx.send(value).is_err() {
                        break;
                    }
                }
                message.clear();
            }
        });
        let mut browser = Browser { child, commands, replies, next_id: 0, session: String::new(), profile };
        let target = browser.call(None, "Target.createTarget", json!({"url": "about:blank"})).unwrap();
        let attached = browser
            .call(None, "Target.attachToTarget", json!({"targetId": target["targetId"], "flatten": true}))
            .unwrap();
        browser.session = attached["sessionId"].as_str().unwrap().to_owned();
        browser.page("Page.enable", json!({}));
        browser
    }

    /// One command (to the page's session, or the browser's with `None`): its result,
    /// or its error.
    fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Result<Value, Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        let mut bytes = serde_json::to_vec(&message).unwrap();
        bytes.push(0);
        self.commands.write_all(&bytes).unwrap();
        self.commands.flush().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let reply = self.replies.recv_timeout(left).unwrap_or_else(|_| {
                let log = std::fs::read_to_string(self.profile.join("chromium.log")).unwrap_or_default();
                panic!("no answer from Chromium to {method} within 30 s; its log:\n{log}")
            });
            if reply["id"] == id {
                return match reply.get("error") {
                    Some(error) => Err(error.clone()),
                    None => Ok(reply["result"].clone()),
                };
            }
        }
    }

    /// A command to the page; its error is a failure.
    fn page(&mut self, method: &str, params: Value) -> Value {
        let session = self.session.clone();
        self.call(Some(&session), method, params).unwrap_or_else(|e| panic!("{method}: {e}"))
    }

    fn viewport(&mut self, (width, height): (u32, u32), mobile: bool) {
        let params = json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile});
        self.page("Emulation.setDeviceMetricsOverride", params);
    }

    fn navigate(&mut self, url: &str) {
        self.page("Page.navigate", json!({"url": url}));
    }

    /// The value of a JavaScript expression in the page (an error while the page is
    /// being replaced is `None`).
    fn try_eval(&mut self, expression: &str) -> Option<Value> {
        let session = self.session.clone();
        let params = json!({"expression": expression, "returnByValue": true});
        let result = self.call(Some(&session), "Runtime.evaluate", params).ok()?;
        if result.get("exceptionDetails").is_some() {
            return None;
        }
        Some(result["result"]["value"].clone())
    }

    fn eval(&mut self, expression: &str) -> Value {
        self.try_eval(expression).unwrap_or_else(|| panic!("cannot evaluate {expression}"))
    }

    /// Polls until `condition` (JavaScript) is true: the readiness check, never a sleep.
    fn wait_for(&mut self, condition: &str, what: &str) {
        eventually(Duration::from_secs(20), what, || (self.try_eval(condition)? == json!(true)).then_some(()));
    }

    /// Types `token` into the login form's password field and clicks "Log in".
    fn log_in(&mut self, token: &str) {
        self.eval("(() => { const t = document.querySelector('#token'); t.value = ''; t.focus(); return true; })()");
        self.page("Input.insertText", json!({"text": token}));
        let rect = self.eval(
            "(() => { const r = document.querySelector('#login-submit').getBoundingClientRect(); \
             return [r.x + r.width / 2, r.y + r.height / 2]; })()",
        );
        let (x, y) = (rect[0].as_f64().unwrap(), rect[1].as_f64().unwrap());
        for kind in ["mouseMoved", "mousePressed", "mouseReleased"] {
            let params = json!({"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1});
            self.page("Input.dispatchMouseEvent", params);
        }
    }

    fn screenshot(&mut self, path: &Path) {
        let shot = self.page("Page.captureScreenshot", json!({"format": "png"}));
        let png = base64::engine::general_purpose::STANDARD.decode(shot["data"].as_str().unwrap()).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::write(path, png).unwrap();
        eprintln!("screenshot: {}", path.display());
    }

    fn close(mut self) {
        let _ = self.call(None, "Browser.close", json!({}));
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
