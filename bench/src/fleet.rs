//! Global limits (issue 15) measured on a fleet, and the small HTTP/1.1 client the
//! lease measurements use.
//!
//! - [`overshoot`]: a harness fleet (`harness::stack::Stack`: N gateway Envoys of two
//!   workers each, two tracker replicas on one throwaway PostgreSQL) and one user with
//!   `requests_per_hour: limit`, hammered by `requests` requests sent at once, each on
//!   a new connection, round robin over the gateways. With `"scope": "global"` the
//!   fleet should admit the limit exactly; with `"scope": "local"` each Envoy counts on
//!   its own, so about N × the limit.
//! - [`Conn`]: one keep-alive HTTP/1.1 connection timing single `GET`s (the lease-wait
//!   measurement: a first request that waits for an acquire callout vs the next one).
//! - [`metric`]: one value of a Prometheus text exposition.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use harness::stack::{Stack, StackOptions};
use serde_json::json;

/// One keep-alive HTTP/1.1 connection.
pub struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    host: String,
}

impl Conn {
    pub fn open(port: u16) -> anyhow::Result<Conn> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Conn { reader: BufReader::new(s.try_clone()?), writer: s, host: format!("127.0.0.1:{port}") })
    }

    /// `GET path` with `authorization: Bearer <key>`: (status, seconds from the write to
    /// the end of the response).
    pub fn get(&mut self, path: &str, key: &str) -> anyhow::Result<(u16, f64)> {
        let req = format!("GET {path} HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {key}\r\n\r\n", self.host);
        let start = Instant::now();
        self.writer.write_all(req.as_bytes())?;
        let status = read_response(&mut self.reader)?;
        Ok((status, start.elapsed().as_secs_f64()))
    }
}

/// Reads one response (status line, headers, a `content-length` body) and returns
/// its status.
fn read_response(r: &mut BufReader<TcpStream>) -> anyhow::Result<u16> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 =
        line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).with_context(|| format!("status line {line:?}"))?;
    let mut length = 0usize;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            bail!("connection closed in the headers");
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().context("content-length")?;
            }
        }
    }
    let mut body = vec![0u8; length];
    r.read_exact(&mut body)?;
    Ok(status)
}

/// `POST /v1/chat/completions` on a new connection (`connection: close`): the status.
fn post_once(port: u16, key: &str, body: &str) -> anyhow::Result<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let head = String::from_utf8_lossy(out.get(..out.len().min(32)).unwrap_or_default()).into_owned();
    head.split_whitespace().nth(1).and_then(|v| v.parse().ok()).with_context(|| format!("answer {head:?}"))
}

/// The value of `name{labels}` in a Prometheus text exposition (the first series
/// whose labels include all of `labels`).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        if n != name || !labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))) {
            return None;
        }
        value.trim().parse().ok()
    })
}

/// `GET {tracker}/metrics` and the value of `name{labels}` (0 when absent).
pub fn tracker_metric(tracker_url: &str, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(10)).build()?;
    let text = client.get(format!("{tracker_url}/metrics")).send()?.text()?;
    Ok(metric(&text, name, labels).unwrap_or(0.0))
}

/// What one fleet admitted of a hammered user's limit.
#[derive(Clone, Debug)]
pub struct Overshoot {
    pub gateways: usize,
    pub global: bool,
    pub limit: u64,
    pub sent: usize,
    pub admitted: u64,
    pub refused: u64,
    /// Neither 200 nor 429 (or no answer).
    pub other: u64,
    /// Seconds from the first request sent to the last answer.
    pub seconds: f64,
    /// `tracker_limit_syncs_total{outcome="ok"}` over both trackers at the end.
    pub syncs_ok: f64,
    /// Seconds to start the fleet.
    pub startup: f64,
}

impl Overshoot {
    pub fn over(&self) -> i64 {
        self.admitted as i64 - self.limit as i64
    }
}

/// Sleeps into the next hour when fewer than `margin` seconds are left of this one
/// (an hour window must hold the whole hammer).
fn same_hour(margin: u64) {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let left = 3_600 - secs % 3_600;
    if left < margin {
        eprintln!("[overshoot] waiting {left} s for the next hour window");
        std::thread::sleep(Duration::from_secs(left + 1));
    }
}

fn port_of(url: &str) -> anyhow::Result<u16> {
    url.rsplit(':').next().and_then(|p| p.trim_end_matches('/').parse().ok()).with_context(|| format!("port of {url}"))
}

/// Starts a fleet of `gateways` Envoys (2 workers each) and 2 trackers, limits one
/// user to `requests_per_hour: limit` (scope global or local), sends `requests`
/// requests at once (one thread each, released together, new connection each, request
/// `k` to gateway `k % gateways`) and counts what was admitted.
pub fn overshoot(gateways: usize, global: bool, requests: usize, limit: u64) -> anyhow::Result<Overshoot> {
    let key = harness::dev::new_api_key();
    let warm_key = harness::dev::new_api_key();
    let config = json!({
        "api_keys": {"keys": [
            harness::dev::key_entry(&key, "hammer", &["free".to_string()]),
            harness::dev::key_entry(&warm_key, "warm", &["premium".to_string()]),
        ]},
        "limits": {
            "scope": if global { "global" } else { "local" },
            "users": {"hammer": {"requests_per_hour": limit}}
        }
    });
    let scope = if global { "global" } else { "local" };
    let started = Instant::now();
    let stack = Stack::start(StackOptions {
        plugin_config: config,
        label: format!("bench-overshoot-{scope}-{gateways}"),
        gateways,
        trackers: 2,
        concurrency: 2,
        ..StackOptions::default()
    })
    .with_context(|| format!("fleet of {gateways} gateways, scope {scope}"))?;
    let startup = started.elapsed().as_secs_f64();
    let ports: Vec<u16> = stack.gateway_urls.iter().map(|u| port_of(u)).collect::<anyhow::Result<_>>()?;
    let body = json!({"model": "mock-model", "messages": [{"role": "user", "content": "hello hello hello"}],
                      "max_tokens": 4})
    .to_string();
    // Every gateway answers (an unlimited user, so nothing of the hammered limit is used).
    for &p in &ports {
        for _ in 0..4 {
            let status = post_once(p, &warm_key, &body)?;
            if status != 200 {
                bail!("gateway on port {p}: the warm-up request got {status}");
            }
        }
    }
    same_hour(60);
    let barrier = Barrier::new(requests);
    let statuses: Mutex<Vec<Option<u16>>> = Mutex::new(Vec::with_capacity(requests));
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for k in 0..requests {
            let port = ports.get(k % ports.len()).copied().unwrap_or(0);
            let (barrier, statuses, key, body) = (&barrier, &statuses, &key, &body);
            s.spawn(move || {
                barrier.wait();
                let status = post_once(port, key, body).ok();
                if let Ok(mut v) = statuses.lock() {
                    v.push(status);
                }
            });
        }
    });
    let seconds = t0.elapsed().as_secs_f64();
    let statuses = statuses.into_inner().unwrap_or_default();
    let admitted = statuses.iter().filter(|s| **s == Some(200)).count() as u64;
    let refused = statuses.iter().filter(|s| **s == Some(429)).count() as u64;
    let other = statuses.len() as u64 - admitted - refused;
    let mut syncs_ok = 0.0;
    for url in &stack.tracker_urls {
        syncs_ok += tracker_metric(url, "tracker_limit_syncs_total", &[("outcome", "ok")]).unwrap_or(0.0);
    }
    let r = Overshoot { gateways, global, limit, sent: requests, admitted, refused, other, seconds, syncs_ok, startup };
    eprintln!(
        "[overshoot] {gateways} gateways × 2 workers, scope {scope}, requests_per_hour {limit}: {admitted} admitted, {refused} × 429, {other} other of {requests} in {seconds:.2} s (admitted − limit {:+}; fleet started in {startup:.1} s; tracker syncs ok {syncs_ok})",
        r.over()
    );
    if other > 0 {
        let codes: Vec<String> =
            statuses.iter().filter(|s| !matches!(s, Some(200 | 429))).map(|s| format!("{s:?}")).collect();
        eprintln!("[overshoot] other answers: {}", codes.join(", "));
    }
    drop(stack);
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_one_series() {
        let text = "# HELP tracker_limit_syncs_total syncs\n# TYPE tracker_limit_syncs_total counter\ntracker_limit_syncs_total{outcome=\"invalid\"} 2\ntracker_limit_syncs_total{outcome=\"ok\"} 3846\nother_total 7\n";
        assert_eq!(metric(text, "tracker_limit_syncs_total", &[("outcome", "ok")]), Some(3846.0));
        assert_eq!(metric(text, "other_total", &[]), Some(7.0));
        assert_eq!(metric(text, "tracker_limit_syncs", &[]), None);
    }
}
