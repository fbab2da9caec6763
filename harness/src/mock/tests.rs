use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Instant;

use base64::Engine as _;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

async fn start() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener));
    addr
}

async fn post(addr: SocketAddr, path: &str, body: &Value, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = reqwest::Client::new().post(format!("http://{addr}{path}")).json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

async fn post_json(addr: SocketAddr, path: &str, body: &Value, headers: &[(&str, &str)]) -> (u16, Value) {
    let resp = post(addr, path, body, headers).await;
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

/// The `data:` payloads of an SSE body, checking the framing on the way.
fn sse_data(body: &str) -> Vec<String> {
    assert!(body.ends_with("\n\n"), "stream must end with a blank line: {body:?}");
    body.trim_end_matches("\n\n")
        .split("\n\n")
        .map(|ev| ev.strip_prefix("data: ").unwrap_or_else(|| panic!("bad event {ev:?}")).to_owned())
        .collect()
}

fn stream_chunks(body: &str) -> Vec<Value> {
    let data = sse_data(body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect()
}

/// A raw HTTP/1.1 exchange: the response head and each read with its time.
struct Raw {
    head: String,
    body_raw: Vec<u8>,
    /// (ms since the request was written, bytes read so far incl. head)
    reads: Vec<(u128, usize)>,
}

async fn raw(addr: SocketAddr, path: &str, body: &Value, headers: &[(&str, &str)]) -> Raw {
    let body = body.to_string();
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    sock.write_all(req.as_bytes()).await.unwrap();
    let t0 = Instant::now();
    let mut all = Vec::new();
    let mut reads = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        let n = sock.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        all.extend_from_slice(&buf[..n]);
        reads.push((t0.elapsed().as_millis(), all.len()));
    }
    let split = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    Raw { head: String::from_utf8(all[..split].to_vec()).unwrap(), body_raw: all[split..].to_vec(), reads }
}

/// Splits a chunked transfer-encoded body into its chunk payloads.
fn dechunk(mut raw: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n").unwrap();
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..line_end]).unwrap().trim(), 16).unwrap();
        raw = &raw[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.push(raw[..size].to_vec());
        assert_eq!(&raw[size..size + 2], b"\r\n");
        raw = &raw[size + 2..];
    }
}

fn chat_req(max_tokens: Option<u64>) -> Value {
    let mut req = json!({
        "model": "gpt-test",
        "messages": [
            {"role": "system", "content": "You are terse"},
            {"role": "user", "content": [
                {"type": "text", "text": "Say  hello\tto me"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ]},
        ],
    });
    if let Some(m) = max_tokens {
        req["max_tokens"] = json!(m);
    }
    req
}

#[tokio::test]
async fn models_list() {
    let addr = start().await;
    let v: Value = reqwest::get(format!("http://{addr}/v1/models")).await.unwrap().json().await.unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], MODEL_ID);
    assert_eq!(v["data"][0]["object"], "model");
    assert_eq!(v["data"][0]["owned_by"], "tollgate-mock");
    assert!(v["data"][0]["created"].is_u64());
}

#[tokio::test]
async fn chat_shape_and_counts() {
    let addr = start().await;
    let (status, v) = post_json(addr, "/v1/chat/completions", &chat_req(Some(3)), &[]).await;
    assert_eq!(status, 200);
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["object"], "chat.completion");
    assert!(v["created"].is_u64());
    assert_eq!(v["model"], "gpt-test");
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], "tok0 tok1 tok2 ");
    assert_eq!(choice["finish_reason"], "length");
    assert!(choice["logprobs"].is_null());
    // 3 (system) + 4 (text part; the image part counts 0)
    assert_eq!(v["usage"], json!({"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}));

    // No max: 16 tokens, "stop". max_completion_tokens wins over max_tokens.
    let (_, v) = post_json(addr, "/v1/chat/completions", &chat_req(None), &[]).await;
    assert_eq!(v["usage"]["completion_tokens"], DEFAULT_COMPLETION_TOKENS);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let mut req = chat_req(Some(9));
    req["max_completion_tokens"] = json!(2);
    req["n"] = json!(2);
    let (_, v) = post_json(addr, "/v1/chat/completions", &req, &[]).await;
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(v["choices"][1]["index"], 1);
    assert_eq!(v["usage"]["completion_tokens"], 4);
}

#[tokio::test]
async fn usage_details_and_no_usage() {
    let addr = start().await;
    let h = [("x-mock-cached-tokens", "5"), ("x-mock-reasoning-tokens", "2")];
    let (_, v) = post_json(addr, "/v1/chat/completions", &chat_req(Some(4)), &h).await;
    assert_eq!(v["usage"]["prompt_tokens_details"], json!({"cached_tokens": 5}));
    assert_eq!(v["usage"]["completion_tokens_details"], json!({"reasoning_tokens": 2}));
    assert_eq!(v["usage"]["total_tokens"], 11);

    let (_, v) = post_json(addr, "/v1/chat/completions", &chat_req(Some(4)), &[("x-mock-no-usage", "1")]).await;
    assert!(v.get("usage").is_none());
    let mut req = chat_req(Some(2));
    req["stream"] = json!(true);
    req["stream_options"] = json!({"include_usage": true});
    let body = post(addr, "/v1/chat/completions", &req, &[("x-mock-no-usage", "1")]).await.text().await.unwrap();
    assert!(!body.contains("usage"), "{body}");
}

#[tokio::test]
async fn text_completions() {
    let addr = start().await;
    let req = json!({"model": "m", "prompt": "one two three", "max_tokens": 2});
    let (status, v) = post_json(addr, "/v1/completions", &req, &[]).await;
    assert_eq!(status, 200);
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], "m");
    assert_eq!(v["choices"][0]["text"], "tok0 tok1 ");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert!(v["choices"][0]["logprobs"].is_null());
    assert_eq!(v["usage"], json!({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}));

    // Two prompts: two choices; token arrays count their length.
    let req = json!({"model": "m", "prompt": ["a b", "c d e"], "max_tokens": 1});
    let (_, v) = post_json(addr, "/v1/completions", &req, &[]).await;
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(v["usage"], json!({"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}));
    let req = json!({"model": "m", "prompt": [1, 2, 3, 4], "max_tokens": 1});
    let (_, v) = post_json(addr, "/v1/completions", &req, &[]).await;
    assert_eq!(v["usage"]["prompt_tokens"], 4);
}

#[tokio::test]
async fn embeddings_shapes() {
    let addr = start().await;
    let req = json!({"model": "emb", "input": ["hello there", "one two three", "hello there"]});
    let (status, v) = post_json(addr, "/v1/embeddings", &req, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "emb");
    assert_eq!(v["usage"], json!({"prompt_tokens": 7, "total_tokens": 7}));
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d["object"], "embedding");
        assert_eq!(d["index"], i);
        assert_eq!(d["embedding"].as_array().unwrap().len(), 8);
    }
    assert_eq!(data[0]["embedding"], data[2]["embedding"], "deterministic");
    assert_ne!(data[0]["embedding"], data[1]["embedding"]);

    // base64 is little-endian f32, equal to the float form.
    let req = json!({"model": "emb", "input": "hello there", "encoding_format": "base64"});
    let (_, b) = post_json(addr, "/v1/embeddings", &req, &[]).await;
    let bytes = base64::engine::general_purpose::STANDARD.decode(b["data"][0]["embedding"].as_str().unwrap()).unwrap();
    let floats: Vec<f32> = bytes.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    let expect: Vec<f32> =
        data[0]["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    assert_eq!(floats, expect);

    let req = json!({"model": "emb", "input": [[1, 2, 3], [4, 5]], "dimensions": 4});
    let (_, v) = post_json(addr, "/v1/embeddings", &req, &[]).await;
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    assert_eq!(v["data"][1]["embedding"].as_array().unwrap().len(), 4);
}

#[tokio::test]
async fn bad_requests_are_openai_errors() {
    let addr = start().await;
    let client = reqwest::Client::new();
    let resp = client.post(format!("http://{addr}/v1/chat/completions")).body("{not json").send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    for key in ["message", "param", "code"] {
        assert!(v["error"].get(key).is_some(), "{key} in {v}");
    }

    let (s, v) = post_json(addr, "/v1/chat/completions", &json!({"messages": []}), &[]).await;
    assert_eq!((s, v["error"]["message"].as_str().unwrap()), (400, "you must provide a model parameter"));
    let (s, v) = post_json(addr, "/v1/chat/completions", &json!({"model": "m"}), &[]).await;
    assert_eq!((s, &v["error"]["param"]), (400, &json!("messages")));
    assert_eq!(v["error"]["code"], "missing_required_parameter");
    let (s, _) = post_json(addr, "/v1/completions", &json!({"prompt": "x"}), &[]).await;
    assert_eq!(s, 400);
    let (s, _) = post_json(addr, "/v1/embeddings", &json!({"model": "m"}), &[]).await;
    assert_eq!(s, 400);
    let req = json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": true}});
    let (s, v) = post_json(addr, "/v1/chat/completions", &req, &[]).await;
    assert_eq!((s, &v["error"]["param"]), (400, &json!("stream_options")));
    let (s, _) = post_json(addr, "/v1/chat/completions", &chat_req(Some(1)), &[("x-mock-delay-ms", "soon")]).await;
    assert_eq!(s, 400);
    let (s, v) = post_json(addr, "/v1/nope", &json!({}), &[]).await;
    assert_eq!((s, v["error"]["message"].as_str().unwrap()), (404, "Invalid URL (POST /v1/nope)"));
}

#[tokio::test]
async fn chat_stream_with_include_usage() {
    let addr = start().await;
    let mut req = chat_req(Some(3));
    req["stream"] = json!(true);
    req["stream_options"] = json!({"include_usage": true});
    let resp = post(addr, "/v1/chat/completions", &req, &[("x-mock-cached-tokens", "1")]).await;
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let chunks = stream_chunks(&resp.text().await.unwrap());
    // role, 3 tokens, finish, usage
    assert_eq!(chunks.len(), 6);
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], id);
        assert_eq!(c["model"], "gpt-test");
    }
    assert_eq!(chunks[0]["choices"][0]["delta"], json!({"role": "assistant", "content": "", "refusal": null}));
    for (i, c) in chunks[1..4].iter().enumerate() {
        assert_eq!(c["choices"][0]["delta"], json!({"content": format!("tok{i} ")}));
        assert!(c["choices"][0]["finish_reason"].is_null());
    }
    assert_eq!(chunks[4]["choices"][0]["delta"], json!({}));
    assert_eq!(chunks[4]["choices"][0]["finish_reason"], "length");
    for c in &chunks[..5] {
        assert!(c.get("usage").is_some_and(Value::is_null), "usage: null before the end: {c}");
    }
    assert_eq!(chunks[5]["choices"], json!([]));
    assert_eq!(
        chunks[5]["usage"],
        json!({"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10, "prompt_tokens_details": {"cached_tokens": 1}})
    );
}

#[tokio::test]
async fn streams_without_include_usage_have_no_usage() {
    let addr = start().await;
    let mut req = chat_req(Some(2));
    req["stream"] = json!(true);
    let body = post(addr, "/v1/chat/completions", &req, &[]).await.text().await.unwrap();
    let chunks = stream_chunks(&body);
    assert_eq!(chunks.len(), 4);
    assert!(chunks.iter().all(|c| c.get("usage").is_none()), "{body}");

    let req = json!({"model": "m", "prompt": "a b", "max_tokens": 2, "stream": true, "stream_options": {"include_usage": true}});
    let body = post(addr, "/v1/completions", &req, &[]).await.text().await.unwrap();
    let chunks = stream_chunks(&body);
    // 2 tokens, finish, usage
    assert_eq!(chunks.len(), 4);
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    assert_eq!(chunks[0]["choices"][0]["text"], "tok0 ");
    assert_eq!(chunks[2]["choices"][0]["finish_reason"], "length");
    assert!(chunks[2]["usage"].is_null());
    assert_eq!(chunks[3]["choices"], json!([]));
    assert_eq!(chunks[3]["usage"], json!({"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}));
}

#[tokio::test]
async fn chunk_bytes_split_writes_mid_utf8() {
    let addr = start().await;
    let mut req = chat_req(Some(4));
    req["stream"] = json!(true);
    req["stream_options"] = json!({"include_usage": true});
    let r = raw(addr, "/v1/chat/completions", &req, &[("x-mock-chunk-bytes", "5"), ("x-mock-unicode", "1")]).await;
    assert!(r.head.starts_with("HTTP/1.1 200"), "{}", r.head);
    let pieces = dechunk(&r.body_raw);
    assert!(pieces.len() > 50);
    assert!(pieces.iter().all(|p| !p.is_empty() && p.len() <= 5));
    assert!(pieces.iter().any(|p| std::str::from_utf8(p).is_err()), "some piece must split a character");
    let body = String::from_utf8(pieces.concat()).unwrap();
    let chunks = stream_chunks(&body);
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, "tök0🦀 tök1🦀 tök2🦀 tök3🦀 ");

    // Non-streaming bodies are split too.
    let r = raw(addr, "/v1/chat/completions", &chat_req(Some(2)), &[("x-mock-chunk-bytes", "7")]).await;
    let pieces = dechunk(&r.body_raw);
    assert!(pieces.len() > 10 && pieces.iter().all(|p| p.len() <= 7));
    let v: Value = serde_json::from_slice(&pieces.concat()).unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 2);
}

#[tokio::test]
async fn hold_delivers_first_event_early() {
    let addr = start().await;
    let mut req = chat_req(Some(2));
    req["stream"] = json!(true);
    let r = raw(addr, "/v1/chat/completions", &req, &[("x-mock-hold-ms", "1000")]).await;
    let head_len = r.head.len();
    let mut so_far = r.head.clone().into_bytes();
    so_far.extend_from_slice(&r.body_raw);
    let first_event_end = head_len + so_far[head_len..].windows(3).position(|w| w == b"}\n\n").unwrap() + 3;
    let (t_first, _) = r.reads.iter().find(|(_, n)| *n >= first_event_end).unwrap();
    let (t_last, _) = r.reads.last().unwrap();
    assert!(*t_first < 500, "first event after {t_first} ms");
    assert!(*t_last >= 1000, "stream ended after {t_last} ms, before the hold");
    assert!(r.reads.len() >= 2);
}

#[tokio::test]
async fn delay_paces_events() {
    let addr = start().await;
    let mut req = chat_req(Some(3));
    req["stream"] = json!(true);
    let t0 = Instant::now();
    let body = post(addr, "/v1/chat/completions", &req, &[("x-mock-delay-ms", "60")]).await.text().await.unwrap();
    // role + 3 + finish + [DONE] = 6 writes, 5 gaps.
    assert!(t0.elapsed().as_millis() >= 300, "{:?}", t0.elapsed());
    assert_eq!(stream_chunks(&body).len(), 5);

    let t0 = Instant::now();
    let (s, _) = post_json(addr, "/v1/models", &json!({}), &[("x-mock-latency-ms", "200")]).await;
    assert_eq!(s, 404);
    assert!(t0.elapsed().as_millis() >= 200);
}

#[tokio::test]
async fn status_control() {
    let addr = start().await;
    for (status, kind) in [(500, "server_error"), (429, "requests"), (401, "invalid_request_error")] {
        let s = status.to_string();
        let resp = post(addr, "/v1/chat/completions", &chat_req(Some(1)), &[("x-mock-status", &s)]).await;
        assert_eq!(resp.status().as_u16(), status);
        assert!(resp.headers().contains_key(H_RECEIVED_HEADERS));
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["type"], kind);
        assert!(v["error"]["message"].as_str().unwrap().contains(&s));
    }
    let (s, v) = post_json(addr, "/v1/chat/completions", &chat_req(Some(1)), &[("x-mock-status", "429")]).await;
    assert_eq!((s, &v["error"]["code"]), (429, &json!("rate_limit_exceeded")));
}

#[tokio::test]
async fn echoes_request_headers_and_body() {
    let addr = start().await;
    let body = chat_req(Some(1));
    let resp = reqwest::Client::new()
        .post(format!("http://{addr}/v1/chat/completions"))
        .header("authorization", "Bearer sk-upstream")
        .header("x-multi", "a")
        .header("x-multi", "b")
        .header("x-utf8", HeaderValue::from_bytes("é".as_bytes()).unwrap())
        .json(&body)
        .send()
        .await
        .unwrap();
    let h = resp.headers();
    let echoed: Value = serde_json::from_str(h[H_RECEIVED_HEADERS].to_str().unwrap()).unwrap();
    assert_eq!(echoed["authorization"], "Bearer sk-upstream");
    assert_eq!(echoed["x-multi"], "a, b");
    assert_eq!(echoed["x-utf8"], "é");
    assert_eq!(echoed["content-type"], "application/json");
    let sent = serde_json::to_vec(&body).unwrap();
    assert_eq!(h[H_RECEIVED_BODY_BYTES].to_str().unwrap(), sent.len().to_string());
    assert_eq!(h[H_RECEIVED_BODY_SHA256].to_str().unwrap(), hex::encode(Sha256::digest(&sent)));
    assert!(h["x-request-id"].to_str().unwrap().starts_with("req_"));
}

#[test]
fn plan_writes_hold_follows_first_frame() {
    let frames = vec![Bytes::from_static(b"aaaa"), Bytes::from_static(b"bb"), Bytes::from_static(b"cc")];
    let ms = Duration::from_millis;
    let plan: Vec<_> = plan_writes(frames.clone(), None, ms(1), ms(100)).into_iter().collect();
    assert_eq!(plan.iter().map(|p| p.0).collect::<Vec<_>>(), vec![ms(0), ms(101), ms(1)]);
    // 3-byte pieces: "aaa" "abb" "cc"; the hold comes after the piece ending the first frame.
    let plan: Vec<_> = plan_writes(frames, Some(3), Duration::ZERO, ms(100)).into_iter().collect();
    let pieces: Vec<&[u8]> = plan.iter().map(|p| p.1.as_ref()).collect();
    assert_eq!(pieces, vec![&b"aaa"[..], b"abb", b"cc"]);
    assert_eq!(plan.iter().map(|p| p.0).collect::<Vec<_>>(), vec![ms(0), ms(0), ms(100)]);
}

/// The official `openai` client against the mock (skipped without the venv).
#[tokio::test]
async fn openai_python_client() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = root.join("../.venv/bin/python");
    let script = root.join("scripts/openai_smoke.py");
    if !python.exists() {
        println!("skipping: no {}", python.display());
        return;
    }
    let addr = start().await;
    let base = format!("http://{addr}/v1");
    let run = |extra: &[&str]| {
        let mut cmd = tokio::process::Command::new(&python);
        cmd.arg(&script).args(["--base-url", &base, "--api-key", "sk-test"]).args(extra);
        cmd.kill_on_drop(true);
        async move { tokio::time::timeout(Duration::from_secs(60), cmd.output()).await.unwrap().unwrap() }
    };

    let out = run(&["--max-tokens", "4"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["chat"]["usage"]["prompt_tokens"], 6);
    assert_eq!(v["chat_stream"]["usage"]["completion_tokens"], 4);
    assert_eq!(v["chat_stream"]["chunks"], 7);
    assert_eq!(v["embeddings"]["dims"], 8);
    assert_eq!(v["embeddings"]["float_matches_base64"], true);

    let out = run(&["--prompt", "a b c", "--expect-prompt", "3", "--header", "x-mock-unicode: 1"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // A wrong expectation must fail with a clear message.
    let out = run(&["--expect-prompt", "99"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("prompt_tokens 6, expected 99"));

    let out = run(&["--expect-error", "429", "--header", "x-mock-status: 429"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!((v["status"].as_u64(), v["code"].as_str()), (Some(429), Some("rate_limit_exceeded")));

    let out = run(&["--expect-error", "403", "--call", "stream", "--header", "x-mock-status: 429"]).await;
    assert_eq!(out.status.code(), Some(1));
    let out = run(&["--expect-error", "401"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("succeeded, expected"));
}

#[tokio::test]
async fn keys_in_openai_order() {
    let addr = start().await;
    let body = post(addr, "/v1/chat/completions", &chat_req(Some(1)), &[]).await.text().await.unwrap();
    assert!(body.starts_with(r#"{"id":"chatcmpl-"#), "{body}");
    assert!(body.contains(r#"{"index":0,"message":{"role":"assistant","content":"tok0 ","refusal":null,"annotations":[]},"logprobs":null,"finish_reason":"length"}"#), "{body}");
    assert!(body.contains(r#""usage":{"prompt_tokens":7,"completion_tokens":1,"total_tokens":8}"#), "{body}");

    let mut req = chat_req(Some(1));
    req["stream"] = json!(true);
    req["stream_options"] = json!({"include_usage": true});
    let body = post(addr, "/v1/chat/completions", &req, &[]).await.text().await.unwrap();
    let data = sse_data(&body);
    assert!(data[0].starts_with(r#"{"id":"chatcmpl-"#) && data[0].ends_with(r#""usage":null}"#), "{}", data[0]);
    assert!(data[3].ends_with(r#""choices":[],"usage":{"prompt_tokens":7,"completion_tokens":1,"total_tokens":8}}"#));

    let body = post(addr, "/v1/chat/completions", &json!({}), &[]).await.text().await.unwrap();
    assert!(
        body.starts_with(r#"{"error":{"message":"#)
            && body.ends_with(r#","type":"invalid_request_error","param":null,"code":null}}"#),
        "{body}"
    );
}
