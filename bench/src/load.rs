//! Runs the load generators and parses what they print: `wrk` (HTTP/1.1, its own
//! latency distribution) and `h2load` (HTTP/2 over cleartext with prior knowledge,
//! percentiles computed here from its per-request log). Both are closed-loop: a fixed
//! number of connections (and streams) kept busy for a fixed duration.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use crate::stats::percentile_sorted;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tool {
    Wrk,
    H2load,
}

impl Tool {
    pub fn name(self) -> &'static str {
        match self {
            Tool::Wrk => "wrk",
            Tool::H2load => "h2load",
        }
    }
}

/// One request shape, sent over and over.
#[derive(Clone, Debug)]
pub struct Request {
    pub url: String,
    pub headers: Vec<(String, String)>,
    /// A JSON body to POST; `None` sends a GET.
    pub body: Option<String>,
}

#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub tool: Tool,
    pub connections: u32,
    /// Concurrent streams per connection (h2load `-m`; wrk always 1).
    pub streams: u32,
    pub seconds: u32,
}

impl Shape {
    pub fn describe(&self) -> String {
        match self.tool {
            Tool::Wrk => format!("wrk HTTP/1.1, {} conn, {} s", self.connections, self.seconds),
            Tool::H2load => {
                format!("h2load HTTP/2, {} conn × {} streams, {} s", self.connections, self.streams, self.seconds)
            }
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct LoadResult {
    pub requests: u64,
    pub seconds: f64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    /// Responses that were not 2xx, plus socket errors and timeouts.
    pub bad: u64,
}

/// Runs `shape` against `req`, using `work` for scripts and logs.
pub fn run(shape: &Shape, req: &Request, work: &Path) -> anyhow::Result<LoadResult> {
    match shape.tool {
        Tool::Wrk => run_wrk(shape, req, work),
        Tool::H2load => run_h2load(shape, req, work, None),
    }
}

/// h2load with a fixed request count instead of a duration (the leak check).
pub fn run_count(connections: u32, streams: u32, count: u64, req: &Request, work: &Path) -> anyhow::Result<LoadResult> {
    let shape = Shape { tool: Tool::H2load, connections, streams, seconds: 0 };
    run_h2load(&shape, req, work, Some(count))
}

fn body_file(req: &Request, work: &Path) -> anyhow::Result<Option<PathBuf>> {
    let Some(body) = &req.body else { return Ok(None) };
    let path = work.join(format!("body-{:016x}.json", fxhash(body)));
    if !path.exists() {
        std::fs::write(&path, body).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(Some(path))
}

fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("run {cmd:?} (is it installed? `make setup`)"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("{cmd:?} failed ({}):\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(stdout)
}

fn run_wrk(shape: &Shape, req: &Request, work: &Path) -> anyhow::Result<LoadResult> {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t1", &format!("-c{}", shape.connections), &format!("-d{}s", shape.seconds), "--latency"]);
    for (k, v) in &req.headers {
        cmd.args(["-H", &format!("{k}: {v}")]);
    }
    if let Some(body) = &req.body {
        let script = work.join(format!("post-{:016x}.lua", fxhash(body)));
        if !script.exists() {
            let lua = format!(
                "wrk.method = \"POST\"\nwrk.body = {}\nwrk.headers[\"Content-Type\"] = \"application/json\"\n",
                lua_string(body)
            );
            std::fs::write(&script, lua)?;
        }
        cmd.arg("-s").arg(&script);
    }
    cmd.arg(&req.url);
    let text = output(&mut cmd)?;
    parse_wrk(&text).with_context(|| format!("parse wrk output:\n{text}"))
}

/// A Lua long string holding `s` verbatim.
fn lua_string(s: &str) -> String {
    let mut eq = String::new();
    while s.contains(&format!("]{eq}]")) {
        eq.push('=');
    }
    format!("[{eq}[{s}]{eq}]")
}

fn duration_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000.0)
    } else {
        (s, 1.0)
    };
    num.trim().parse::<f64>().ok().map(|v| v * mult)
}

pub fn parse_wrk(text: &str) -> anyhow::Result<LoadResult> {
    let mut r = LoadResult::default();
    let mut in_dist = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("Latency Distribution") {
            in_dist = true;
            continue;
        }
        if in_dist {
            if let Some((pct, val)) = t.split_once("% ") {
                let v = duration_ms(val).context("latency value")?;
                match pct.trim() {
                    "50" => r.p50_ms = v,
                    "90" => r.p90_ms = v,
                    "99" => r.p99_ms = v,
                    _ => {}
                }
                continue;
            }
            in_dist = false;
        }
        if let Some((n, rest)) = t.split_once(" requests in ") {
            r.requests = n.trim().parse().context("request count")?;
            let secs = rest.split(',').next().unwrap_or("");
            r.seconds = duration_ms(secs).context("run time")? / 1000.0;
        } else if let Some(v) = t.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse().context("requests/sec")?;
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            r.bad = r.bad.saturating_add(v.trim().parse().unwrap_or(0));
        } else if let Some(v) = t.strip_prefix("Socket errors:") {
            let n: u64 = v.split(',').filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok()).sum();
            r.bad = r.bad.saturating_add(n);
        }
    }
    if r.requests == 0 || r.rps <= 0.0 {
        bail!("no requests completed");
    }
    Ok(r)
}

fn run_h2load(shape: &Shape, req: &Request, work: &Path, count: Option<u64>) -> anyhow::Result<LoadResult> {
    let log = work.join("h2load-requests.log");
    let _ = std::fs::remove_file(&log);
    let mut cmd = Command::new("h2load");
    cmd.args(["-t1", "-c", &shape.connections.to_string(), "-m", &shape.streams.to_string()]);
    match count {
        Some(n) => {
            cmd.args(["-n", &n.to_string()]);
        }
        None => {
            cmd.args(["-D", &shape.seconds.to_string()]);
            cmd.arg("--log-file").arg(&log);
        }
    }
    for (k, v) in &req.headers {
        cmd.args(["-H", &format!("{k}: {v}")]);
    }
    if let Some(path) = body_file(req, work)? {
        cmd.arg("-d").arg(path).args(["-H", "content-type: application/json"]);
    }
    cmd.arg(&req.url);
    let text = output(&mut cmd)?;
    let mut r = parse_h2load(&text).with_context(|| format!("parse h2load output:\n{text}"))?;
    if count.is_none() {
        let lat = std::fs::read_to_string(&log).with_context(|| format!("read {}", log.display()))?;
        let mut ms: Vec<f64> = lat
            .lines()
            .filter_map(|l| l.split('\t').nth(2)?.trim().parse::<f64>().ok())
            .map(|us| us / 1000.0)
            .collect();
        ms.sort_by(f64::total_cmp);
        r.p50_ms = percentile_sorted(&ms, 50.0);
        r.p90_ms = percentile_sorted(&ms, 90.0);
        r.p99_ms = percentile_sorted(&ms, 99.0);
        let _ = std::fs::remove_file(&log);
    }
    Ok(r)
}

pub fn parse_h2load(text: &str) -> anyhow::Result<LoadResult> {
    let mut r = LoadResult::default();
    for line in text.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("finished in ") {
            let mut parts = rest.split(',');
            r.seconds = duration_ms(parts.next().unwrap_or("")).context("run time")? / 1000.0;
            r.rps = parts
                .next()
                .and_then(|p| p.trim().strip_suffix("req/s"))
                .and_then(|v| v.trim().parse().ok())
                .context("req/s")?;
        } else if let Some(rest) = t.strip_prefix("requests:") {
            for part in rest.split(',') {
                let mut words = part.split_whitespace();
                let n: u64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
                match words.next() {
                    Some("succeeded") => r.requests = n,
                    Some("failed" | "errored" | "timeout") => r.bad = r.bad.saturating_add(n),
                    _ => {}
                }
            }
        } else if let Some(rest) = t.strip_prefix("status codes:") {
            for part in rest.split(',') {
                let mut words = part.split_whitespace();
                let n: u64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
                if matches!(words.next(), Some("3xx" | "4xx" | "5xx")) {
                    r.bad = r.bad.saturating_add(n);
                }
            }
        }
    }
    if r.requests == 0 || r.rps <= 0.0 {
        bail!("no requests succeeded");
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_wrk() {
        let text = "Running 3s test @ http://127.0.0.1:1/\n  1 threads and 16 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency   600.00us  100.00us   5.00ms   90.00%\n    Req/Sec    25.00k     1.00k   27.00k    70.00%\n  Latency Distribution\n     50%  580.00us\n     75%  650.00us\n     90%  750.00us\n     99%    1.20ms\n  75000 requests in 3.00s, 10.00MB read\n  Non-2xx or 3xx responses: 3\nRequests/sec:  25000.00\nTransfer/sec:      3.33MB\n";
        let r = parse_wrk(text).unwrap();
        assert_eq!(r.requests, 75000);
        assert!((r.p50_ms - 0.58).abs() < 1e-9 && (r.p99_ms - 1.2).abs() < 1e-9);
        assert_eq!(r.bad, 3);
        assert!((r.rps - 25000.0).abs() < 1e-9 && (r.seconds - 3.0).abs() < 1e-9);
    }

    #[test]
    fn parses_h2load() {
        let text = "finished in 3.00s, 21466.67 req/s, 2.35MB/s\nrequests: 64400 total, 64400 started, 64400 done, 64390 succeeded, 10 failed, 0 errored, 0 timeout\nstatus codes: 64390 2xx, 0 3xx, 10 4xx, 0 5xx\n";
        let r = parse_h2load(text).unwrap();
        assert_eq!(r.requests, 64390);
        assert_eq!(r.bad, 20);
        assert!((r.rps - 21466.67).abs() < 1e-6);
    }

    #[test]
    fn lua_long_strings() {
        assert_eq!(lua_string("a]]b"), "[=[a]]b]=]");
    }
}
