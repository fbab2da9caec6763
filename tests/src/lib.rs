//! Shared helpers for the end-to-end tests: a stack per test, an HTTP client, the
//! official `openai` Python client, and polling helpers (a readiness check, never a
//! fixed sleep, decides when something has happened).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code: a panic is a failed test

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

pub use harness::dev;
pub use harness::devconfig::DevCredentials;
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
    let mut config = creds.plugin_config();
    if let (Some(c), Some(e)) = (config.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            c.insert(k.clone(), v.clone());
        }
    }
    Stack::start(StackOptions { plugin_config: config, label: label.into(), ..StackOptions::default() }).unwrap()
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
