//! Shared helpers for the end-to-end tests: a stack per test, an HTTP client, the
//! official `openai` Python client, and polling helpers (a readiness check, never a
//! fixed sleep, decides when something has happened).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code: a panic is a failed test

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

pub use harness::dev;
pub use harness::devconfig::DevCredentials;
pub use harness::fault::{FaultMode, FaultTracker};
pub use harness::stack::{Stack, StackOptions};
use reqwest::blocking::{Client, Response};
use serde_json::{json, Value};

pub fn client() -> Client {
    Client::builder().timeout(Duration::from_secs(30)).build().unwrap()
}

/// A chat completion request body with `words` words of prompt.
pub fn chat_body(words: usize, max_tokens: u64, stream: bool) -> Value {
    let prompt = vec!["hello"; words].join(" ");
    json!({"model": "mock-model", "messages": [{"role": "user", "content": prompt}],
           "max_tokens": max_tokens, "stream": stream})
}

/// POST /v1/chat/completions through the gateway with extra headers.
pub fn chat(stack: &Stack, headers: &[(&str, &str)], body: &Value) -> Response {
    let mut req = client().post(format!("{}/v1/chat/completions", stack.gateway_url)).json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().unwrap()
}

/// The request headers the mock model server received, from its echo header.
pub fn received_headers(resp: &Response) -> BTreeMap<String, String> {
    let raw = resp
        .headers()
        .get("x-mock-received-headers")
        .expect("mock echo header missing: the request did not reach the mock model")
        .to_str()
        .unwrap();
    serde_json::from_str(raw).unwrap()
}

/// Starts a stack with the dev credentials' config merged with `extra` (top-level keys).
pub fn start(label: &str, creds: &DevCredentials, extra: Value) -> Stack {
    start_with(label, creds, extra, StackOptions::default())
}

/// As [`start`], with other stack options (`plugin_config` and `label` are replaced).
pub fn start_with(label: &str, creds: &DevCredentials, extra: Value, opts: StackOptions) -> Stack {
    let mut config = creds.plugin_config();
    if let (Some(c), Some(e)) = (config.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            c.insert(k.clone(), v.clone());
        }
    }
    Stack::start(StackOptions { plugin_config: config, label: label.into(), ..opts }).unwrap()
}

/// Lines of an Envoy log that show the Wasm VM failing: a Rust panic (`panicked at`,
/// the SDK's `unexpected status`), a V8 trap (`Function: proxy_on_… failed: Uncaught
/// RuntimeError: unreachable` and its `Proxy-Wasm plugin in-VM backtrace:`).
pub fn vm_failures(log: &str) -> Vec<String> {
    const SIGNS: [&str; 9] = [
        "panic",
        "unexpected status",
        "wasm trap",
        "unreachable",
        "function: proxy_on",
        "uncaught",
        "runtimeerror",
        "in-vm backtrace",
        "wasm vm failed",
    ];
    log.lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            SIGNS.iter().any(|s| l.contains(s))
        })
        .map(str::to_string)
        .collect()
}

/// The tracker's value of `name{labels}` (0 when absent).
pub fn tracker_value(stack: &Stack, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(&tracker_metrics(stack), name, labels).unwrap_or(0.0)
}

/// Polls the tracker until `name{labels}` is at least `want` or `timeout` passes;
/// returns the last value, so the caller asserts equality and a shortfall (or a value
/// counted twice) shows as numbers.
pub fn settle_metric(stack: &Stack, name: &str, labels: &[(&str, &str)], want: f64, timeout: Duration) -> f64 {
    let deadline = Instant::now() + timeout;
    loop {
        let v = tracker_value(stack, name, labels);
        if v >= want || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs harness/scripts/openai_smoke.py with the project's virtualenv Python.
pub fn openai_smoke(base_url: &str, api_key: &str, args: &[&str]) -> (bool, String) {
    let python = harness::paths::venv_python().unwrap();
    let script = harness::paths::workspace_root().join("harness/scripts/openai_smoke.py");
    let out = Command::new(python)
        .arg(script)
        .args(["--base-url", &format!("{base_url}/v1"), "--api-key", api_key])
        .args(args)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Polls `f` until it returns `Some`, or fails after `timeout` with `what`.
pub fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs a PromQL instant query and returns `data.result`.
pub fn prom_query(prometheus_url: &str, query: &str) -> Vec<Value> {
    let resp: Value = client()
        .get(format!("{prometheus_url}/api/v1/query"))
        .query(&[("query", query)])
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(resp["status"], "success", "{resp}");
    resp["data"]["result"].as_array().cloned().unwrap_or_default()
}

/// The tracker's /metrics text.
pub fn tracker_metrics(stack: &Stack) -> String {
    client().get(format!("{}/metrics", stack.tracker_url)).send().unwrap().text().unwrap()
}

/// The value of the sample `name{labels…}` in Prometheus text, matching every given
/// label exactly (other labels of the series may be present). Sums matching series.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut total = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let (metric_name, label_text) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric_name != name {
            continue;
        }
        let all = labels.iter().all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")));
        if all {
            *total.get_or_insert(0.0) += value.parse::<f64>().unwrap_or(f64::NAN);
        }
    }
    total
}

/// Polls the tracker until `name{labels}` equals `want`; returns the metrics text.
pub fn wait_metric(stack: &Stack, name: &str, labels: &[(&str, &str)], want: f64) -> String {
    let mut last = None;
    eventually(std::time::Duration::from_secs(30), &format!("{name}{labels:?} == {want}"), || {
        let text = tracker_metrics(stack);
        last = metric(&text, name, labels);
        (last == Some(want)).then_some(text)
    })
}

/// One Envoy counter from the admin `/stats` (0 when absent).
pub fn envoy_counter(stack: &Stack, name: &str) -> u64 {
    let text = client()
        .get(format!("{}/stats", stack.admin_url))
        .query(&[("filter", format!("^{}$", name.replace('.', "\\.")))])
        .send()
        .unwrap()
        .text()
        .unwrap();
    text.lines()
        .find_map(|l| l.split_once(": ").filter(|(n, _)| *n == name))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A response read off the wire by [`raw_request`].
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// Header names as the server wrote them, in order, repeats kept.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked when the response was chunked.
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first value of header `name` (matched case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The request headers the mock model server received (see [`received_headers`]).
    pub fn received_headers(&self) -> BTreeMap<String, String> {
        let raw = self
            .header("x-mock-received-headers")
            .expect("mock echo header missing: the request did not reach the mock model");
        serde_json::from_str(raw).unwrap()
    }
}

/// Sends one HTTP/1.1 request over a plain `TcpStream` to `base_url` (`http://host:port`),
/// every header name byte for byte as given: reqwest (through `http`) lowercases header
/// names, so a test about mixed-case or repeated headers must use this. Adds `Host`,
/// `Content-Length` and `Connection: close`, and reads the whole response.
pub fn raw_request(base_url: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> RawResponse {
    use std::io::{Read, Write};
    let authority = base_url.trim_start_matches("http://").trim_end_matches('/');
    let mut stream = std::net::TcpStream::connect(authority).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    stream.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {authority}\r\n").into_bytes();
    for (name, value) in headers {
        request.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    request.extend_from_slice(format!("Content-Length: {}\r\nConnection: close\r\n\r\n", body.len()).as_bytes());
    request.extend_from_slice(body);
    stream.write_all(&request).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();

    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("no end of response head");
    let head = String::from_utf8(raw[..head_end].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{status_line}"));
    let headers: Vec<(String, String)> = lines
        .map(|l| l.split_once(':').unwrap_or_else(|| panic!("bad header line {l:?}")))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[head_end + 4..].to_vec();
    let chunked =
        headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        let (mut rest, mut out) = (body.as_slice(), Vec::new());
        loop {
            let line_end = rest.windows(2).position(|w| w == b"\r\n").expect("truncated chunk size");
            let size_text = std::str::from_utf8(&rest[..line_end]).unwrap();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[line_end + 2..line_end + 2 + size]);
            rest = &rest[line_end + 2 + size + 2..];
        }
        body = out;
    }
    RawResponse { status, headers, body }
}

// ---- Fleets (`gateways`/`trackers` > 1; tests/tests/fleet.rs) ----

/// A client that keeps no idle connection: every request opens a new one (as many
/// clients behind a load balancer would, spreading over gateway replicas and workers).
pub fn fresh_client() -> Client {
    Client::builder().timeout(Duration::from_secs(30)).pool_max_idle_per_host(0).build().unwrap()
}

/// POST /v1/chat/completions to one gateway replica (`base_url`) with `client`.
pub fn chat_at(client: &Client, base_url: &str, headers: &[(&str, &str)], body: &Value) -> Response {
    let mut req = client.post(format!("{base_url}/v1/chat/completions")).json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().unwrap()
}

/// The value of `name{labels}` on one tracker replica (0 when absent; `None` when the
/// tracker does not answer).
pub fn tracker_value_at(tracker_url: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let text = client().get(format!("{tracker_url}/metrics")).send().ok()?.text().ok()?;
    Some(metric(&text, name, labels).unwrap_or(0.0))
}

/// `name{labels}` summed over every running tracker replica of the stack (what
/// `sum(...)` in Prometheus shows): each replica counts the events it took.
pub fn fleet_value(stack: &Stack, name: &str, labels: &[(&str, &str)]) -> f64 {
    stack
        .tracker_urls
        .iter()
        .enumerate()
        .filter(|(j, _)| stack.tracker_running(*j))
        .map(|(j, url)| {
            tracker_value_at(url, name, labels).unwrap_or_else(|| panic!("tracker replica {j} ({url}) does not answer"))
        })
        .sum()
}

/// The ledger's `total` for `user` from one tracker replica's usage API
/// (`GET /v1/usage`, bearer [`Stack::api_token`]); `None` when it does not answer 200
/// (e.g. 404 before the user's first event).
pub fn usage_total(stack: &Stack, tracker_url: &str, user: &str) -> Option<Value> {
    let resp = client()
        .get(format!("{tracker_url}/v1/usage"))
        .query(&[("user", user)])
        .bearer_auth(&stack.api_token)
        .send()
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.json::<Value>().ok().map(|v| v["total"].clone())
}

/// No PostgreSQL server binaries: skip, saying so, except in CI (as the tracker's
/// ledger tests do).
pub fn postgres_missing() -> bool {
    match harness::postgres::bin_dir() {
        Ok(_) => false,
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") => panic!("{e:#}"),
        Err(e) => {
            eprintln!("SKIPPED: {e:#}");
            true
        }
    }
}
