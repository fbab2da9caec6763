//! The per-request cost of the filter's pure logic, natively, one piece at a time, so
//! `bench-run` can count its instructions under `valgrind --tool=callgrind` (a count
//! that does not depend on how busy the shared machine is) and time it.
//!
//! `auth-cost --mode MODE --iterations N` runs MODE N times after the setup and prints
//! `mode=… iterations=… ns_per_op=…`. Instructions per request are the difference
//! between two callgrind runs with different N, divided by the difference in N, so
//! the setup (config parsing, key generation) cancels out.
//!
//! Modes: `key` (`auth::decide` with an API key among 100), `jwt` (`decide` with an
//! HS256 JWT, or `--jwt-alg`'s, token cache disabled: full verification), `jwt-cached` (`decide`, token
//! in the cache), `limits` (the limit state round trip of a request: decode, admit,
//! encode, then decode, charge, encode when its tokens arrive), `event` (build and
//! serialize the usage event), `json-usage` (read the usage of a chat completion body),
//! and whole requests through the filter's `gateway` on an in-memory host
//! (`tollgate_bench::native_host`), every callback in Envoy's order: `path-key` (d's
//! config, a `GET` with an API key) and `path-metered` (e's config: limits and usage, a
//! chat completion `POST` with its JSON answer; the queued events flushed every 500
//! requests, as a tick would, and the tracker's answers taken).

use std::hint::black_box;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use tollgate_bench::native_host::NativeHost;
use tollgate_bench::variants::{tollgate_config, Creds};
use tollgate_filter::auth::{decide, CredentialCache, Verdict};
use tollgate_filter::config::Settings;
use tollgate_filter::events::UsageEvent;
use tollgate_filter::gateway::{Action, Root};
use tollgate_filter::limits::LimitState;
use tollgate_filter::usage::{BodyKind, UsageParser, DEFAULT_MAX_CARRY};

#[derive(Parser)]
#[command(about = "Per-request cost of Tollgate's pure logic (for callgrind and timing)")]
struct Args {
    #[arg(long)]
    mode: String,
    #[arg(long, default_value_t = 100_000)]
    iterations: u64,
    /// API keys in the config.
    #[arg(long, default_value_t = 100)]
    keys: usize,
    /// The JWT's algorithm (modes `jwt`, `jwt-cached`): HS256, RS256, ES256, EdDSA, …
    #[arg(long, default_value = "HS256")]
    jwt_alg: String,
}

const NOW: u64 = 1_800_000_000;

fn headers(authorization: &str) -> Vec<(String, String)> {
    [
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        (":authority", "gateway.example"),
        (":scheme", "http"),
        ("user-agent", "OpenAI/Python 1.54.0"),
        ("accept", "application/json"),
        ("content-type", "application/json"),
        ("content-length", "98"),
        ("x-request-id", "6f1c1d7e-3d7a-4d7e-9c47-1f2b3c4d5e6f"),
        ("authorization", authorization),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

const CHAT_RESPONSE: &str = r#"{"id":"chatcmpl-8c2f","object":"chat.completion","created":1763800000,"model":"Qwen/Qwen3-0.6B","choices":[{"index":0,"message":{"role":"assistant","content":"tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 tok8 tok9 tok10 tok11 tok12 tok13 tok14 tok15 "},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":16,"total_tokens":28,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}}}"#;

const CHAT_REQUEST: &str =
    r#"{"model":"Qwen/Qwen3-0.6B","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16}"#;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let creds = Creds::with_jwt_alg(args.keys, &args.jwt_alg)?;
    let config = tollgate_config(&creds, true);
    let settings = Settings::parse(config.to_string().as_bytes(), &|_| None).map_err(|e| anyhow::anyhow!("{e}"))?;
    let key_headers = headers(&format!("Bearer {}", creds.api_key));
    let jwt_headers = headers(&format!("Bearer {}", creds.jwt));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();

    let allow = |v: &Verdict| matches!(v, Verdict::Allow { .. });
    let n = args.iterations;
    let start;
    match args.mode.as_str() {
        "key" => {
            let mut cache = CredentialCache::new(settings.jwt_cache_entries, 300);
            if !allow(&decide(&settings, &mut cache, &key_headers, || now)) {
                bail!("the API key was refused");
            }
            start = Instant::now();
            for _ in 0..n {
                black_box(decide(&settings, &mut cache, black_box(&key_headers), || now));
            }
        }
        "jwt" => {
            let mut cache = CredentialCache::new(0, 300);
            if !allow(&decide(&settings, &mut cache, &jwt_headers, || now)) {
                bail!("the JWT was refused");
            }
            start = Instant::now();
            for _ in 0..n {
                black_box(decide(&settings, &mut cache, black_box(&jwt_headers), || now));
            }
        }
        "jwt-cached" => {
            let mut cache = CredentialCache::new(settings.jwt_cache_entries, 300);
            if !allow(&decide(&settings, &mut cache, &jwt_headers, || now)) {
                bail!("the JWT was refused");
            }
            start = Instant::now();
            for _ in 0..n {
                black_box(decide(&settings, &mut cache, black_box(&jwt_headers), || now));
            }
        }
        "limits" => {
            let mut cache = CredentialCache::new(settings.jwt_cache_entries, 300);
            let Verdict::Allow { identity, .. } = decide(&settings, &mut cache, &key_headers, || now) else {
                bail!("the API key was refused");
            };
            let limits = settings.limits.as_ref().context("no limits in the config")?;
            let spec = limits.spec_for(&identity).context("no limit spec for the bench user")?;
            let mut stored: Vec<u8> = Vec::new();
            start = Instant::now();
            for i in 0..n {
                let now_ms = NOW * 1000 + i;
                let mut state = LimitState::decode(black_box(&stored));
                let admitted = state.admit(spec, now_ms).is_ok();
                stored = state.encode();
                let mut state = LimitState::decode(&stored);
                state.charge(spec, 28, now_ms);
                stored = state.encode();
                black_box(admitted);
            }
        }
        "event" => {
            start = Instant::now();
            for i in 0..n {
                let event = UsageEvent {
                    id: format!("0123456789abcdef-{i}"),
                    ts: 1_763_800_000.125,
                    user: Some("user50".into()),
                    groups: vec!["bench".into()],
                    method: "POST".into(),
                    host: "gateway.example".into(),
                    path: "/v1/chat/completions".into(),
                    model: Some("Qwen/Qwen3-0.6B".into()),
                    status: Some(200),
                    prompt_tokens: 12,
                    completion_tokens: 16,
                    cached_tokens: 0,
                    reasoning_tokens: 0,
                    incomplete: false,
                    usage_missing: false,
                    usage_estimated: false,
                    denied: None,
                };
                black_box(serde_json::to_string(black_box(&event))?);
            }
        }
        "json-usage" => {
            start = Instant::now();
            for _ in 0..n {
                let mut p = UsageParser::new(BodyKind::Json, DEFAULT_MAX_CARRY);
                p.feed(black_box(CHAT_RESPONSE.as_bytes()));
                p.finish();
                black_box(p.usage());
            }
        }
        "path-key" | "path-metered" => {
            let metered = args.mode == "path-metered";
            let host = NativeHost {
                config: tollgate_config(&creds, metered).to_string().into_bytes(),
                ..NativeHost::default()
            };
            host.clock_ms.set(NOW * 1000);
            let mut root = Root::new(1);
            if !root.start(&host) || !root.configure(&host) {
                bail!("the config was refused");
            }
            let mut request = headers(&format!("Bearer {}", creds.api_key));
            for (k, v) in request.iter_mut() {
                if k == "content-length" {
                    *v = CHAT_REQUEST.len().to_string();
                }
            }
            if !metered {
                request.retain(|(k, _)| !matches!(k.as_str(), ":method" | "content-type" | "content-length"));
                request.push((":method".into(), "GET".into()));
            }
            let (content_type, body) = if metered { ("application/json", CHAT_RESPONSE) } else { ("text/plain", "ok") };
            let response: Vec<(String, String)> =
                [(":status", "200"), ("content-type", content_type), ("server", "bench")]
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
            let mut answered = 0;
            let mut one = |i: u64, root: &mut Root| -> anyhow::Result<()> {
                *host.request_headers.borrow_mut() = request.clone();
                *host.response_headers.borrow_mut() = response.clone();
                let mut stream = root.stream(2 + (i % 1000) as u32);
                let end = !metered;
                if stream.request_headers(&host, end) != Action::Continue {
                    bail!("request {i} refused");
                }
                if metered {
                    *host.request_body.borrow_mut() = CHAT_REQUEST.as_bytes().to_vec();
                    stream.request_body(&host, CHAT_REQUEST.len(), true);
                }
                stream.response_headers(&host, false);
                *host.response_body.borrow_mut() = body.as_bytes().to_vec();
                stream.response_body(&host, body.len(), true);
                stream.log(&host);
                if i % 500 == 499 {
                    host.clock_ms.set(host.clock_ms.get() + 500);
                    root.tick(&host);
                    while answered < host.callouts.get() {
                        answered += 1;
                        root.call_response(&host, answered, 1, 0);
                    }
                }
                Ok(())
            };
            one(0, &mut root)?;
            if host.replies.get() > 0 {
                bail!("the request was answered by the filter");
            }
            start = Instant::now();
            for i in 1..=n {
                one(black_box(i), &mut root)?;
            }
            if metered && host.callouts.get() == 0 && n >= 500 {
                bail!("no usage was reported");
            }
        }
        other => {
            bail!("unknown mode {other:?}: key, jwt, jwt-cached, limits, event, json-usage, path-key, path-metered")
        }
    }
    let elapsed = start.elapsed();
    let ns = elapsed.as_nanos() as f64 / n.max(1) as f64;
    println!("mode={} jwt_alg={} iterations={n} ns_per_op={ns:.1}", args.mode, args.jwt_alg);
    Ok(())
}
