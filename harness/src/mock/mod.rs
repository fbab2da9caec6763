//! Mock OpenAI-compatible model server: the one stand-in allowed in our tests.
//!
//! No model runs here, so the gateway needs an upstream that speaks the OpenAI
//! wire format faithfully (shapes, SSE framing, usage placement) and whose token
//! counts a test can predict exactly. Request headers let a test shape how the
//! bytes arrive, to exercise the filter's streaming and error paths.
//!
//! # Endpoints
//!
//! - `GET /v1/models`, `GET /v1/models/{id}` — one model, `mock-model`.
//! - `POST /v1/chat/completions`, `POST /v1/completions` — OpenAI shapes,
//!   `model` echoed from the request, streamed as SSE with `"stream": true`.
//! - `POST /v1/embeddings` — a deterministic unit vector per input (8 floats,
//!   or `dimensions`), as floats or `encoding_format: "base64"`.
//! - Anything else: 404 `Invalid URL (METHOD /path)`. Bad JSON, a missing
//!   `model` / `messages` / `input`, or a field of the wrong type: 400. Errors
//!   use OpenAI's `{"error":{"message","type","param","code"}}`.
//!
//! # Token rules
//!
//! - `prompt_tokens`: whitespace-separated words in every message `content`
//!   (a string, or the `text` of `{"type":"text"}` parts); for completions and
//!   embeddings, words in each prompt/input string, or the length of each token
//!   array.
//! - Per choice, `max_completion_tokens`, else `max_tokens`, else 16 tokens;
//!   `finish_reason` is `"length"` when a max was given, else `"stop"`. The
//!   text is `"tok0 tok1 … tok{k-1} "` (each word followed by one space; a
//!   stream sends one word per chunk). `completion_tokens` = tokens × choices
//!   (`n`, times the number of prompts for an array `prompt`).
//! - Streams: a role chunk per choice (chat only), a chunk per token, a
//!   `finish_reason` chunk with an empty delta, then, only with
//!   `stream_options.include_usage`, a chunk with `"choices": []` and the usage
//!   (every other chunk then carries `"usage": null`), then `data: [DONE]`.
//!
//! # Control headers
//!
//! | header | effect |
//! |---|---|
//! | `x-mock-chunk-bytes: N` | write the body in N-byte pieces (events split mid-line, mid-JSON) |
//! | `x-mock-delay-ms: D` | sleep D ms between writes (events, or pieces with chunking) |
//! | `x-mock-hold-ms: H` | streams: after the write that completes the first event, pause H ms |
//! | `x-mock-latency-ms: L` | sleep L ms before sending the response head |
//! | `x-mock-status: S` | S ≥ 400: answer S with an OpenAI error body instead |
//! | `x-mock-cached-tokens: N` | `usage.prompt_tokens_details.cached_tokens` = N (omitted when 0) |
//! | `x-mock-reasoning-tokens: N` | `usage.completion_tokens_details.reasoning_tokens` = N (omitted when 0) |
//! | `x-mock-no-usage: 1` | no `usage` anywhere, in bodies or streams |
//! | `x-mock-unicode: 1` | tokens read `tök{i}🦀` (2- and 4-byte UTF-8, still one word each) |
//!
//! A malformed control value is a 400, so a typo in a test fails loudly.
//! Every response carries `x-mock-received-headers` (compact JSON object of
//! the request headers, name → value, repeats joined by `", "`, non-ASCII
//! `\u`-escaped), `x-mock-received-body-bytes` and
//! `x-mock-received-body-sha256` (hex), so tests can see what the gateway sent
//! upstream, and an `x-request-id` like OpenAI's.

mod wire;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::Response;
use axum::serve::ListenerExt;
use axum::Router;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

use wire::{ApiError, Reply};
pub use wire::{DEFAULT_COMPLETION_TOKENS, MAX_COMPLETION_TOKENS};

/// The only model `GET /v1/models` lists (any `model` is accepted in requests).
pub const MODEL_ID: &str = "mock-model";
/// Request bodies above this are answered 413.
const MAX_BODY_BYTES: usize = 64 << 20;

pub const H_CHUNK_BYTES: &str = "x-mock-chunk-bytes";
pub const H_DELAY_MS: &str = "x-mock-delay-ms";
pub const H_HOLD_MS: &str = "x-mock-hold-ms";
pub const H_LATENCY_MS: &str = "x-mock-latency-ms";
pub const H_STATUS: &str = "x-mock-status";
pub const H_CACHED_TOKENS: &str = "x-mock-cached-tokens";
pub const H_REASONING_TOKENS: &str = "x-mock-reasoning-tokens";
pub const H_NO_USAGE: &str = "x-mock-no-usage";
pub const H_UNICODE: &str = "x-mock-unicode";
pub const H_RECEIVED_HEADERS: &str = "x-mock-received-headers";
pub const H_RECEIVED_BODY_BYTES: &str = "x-mock-received-body-bytes";
pub const H_RECEIVED_BODY_SHA256: &str = "x-mock-received-body-sha256";

/// The mock's routes (everything goes through one handler so that errors and
/// echo headers are uniform).
pub fn router() -> Router {
    Router::new().fallback(handle)
}

/// Serves the mock on `listener` until the task is dropped or aborted.
pub async fn serve(listener: TcpListener) -> anyhow::Result<()> {
    // No Nagle: small paced writes must leave as separate segments.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router()).await?;
    Ok(())
}

/// Per-request test controls, read from the `x-mock-*` headers.
#[derive(Debug, Default, Clone)]
pub(crate) struct Controls {
    chunk_bytes: Option<usize>,
    delay: Duration,
    hold: Duration,
    latency: Duration,
    status: Option<u16>,
    cached_tokens: u64,
    reasoning_tokens: u64,
    no_usage: bool,
    unicode: bool,
}

impl Controls {
    fn parse(headers: &HeaderMap) -> Result<Self, ApiError> {
        let num = |name: &str| -> Result<Option<u64>, ApiError> {
            let Some(v) = headers.get(name) else { return Ok(None) };
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .map(Some)
                .ok_or_else(|| ApiError::invalid(format!("mock: invalid {name} header"), None, None))
        };
        let flag = |name: &str| {
            headers.get(name).and_then(|v| v.to_str().ok()).is_some_and(|s| matches!(s.trim(), "1" | "true" | "yes"))
        };
        let ms = |name: &str| num(name).map(|v| Duration::from_millis(v.unwrap_or(0)));
        let chunk_bytes = match num(H_CHUNK_BYTES)? {
            Some(0) => return Err(ApiError::invalid(format!("mock: {H_CHUNK_BYTES} must be > 0"), None, None)),
            Some(n) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
            None => None,
        };
        let status = match num(H_STATUS)? {
            Some(s) if (100..=999).contains(&s) => u16::try_from(s).ok(),
            Some(_) => return Err(ApiError::invalid(format!("mock: invalid {H_STATUS} header"), None, None)),
            None => None,
        };
        Ok(Self {
            chunk_bytes,
            delay: ms(H_DELAY_MS)?,
            hold: ms(H_HOLD_MS)?,
            latency: ms(H_LATENCY_MS)?,
            status,
            cached_tokens: num(H_CACHED_TOKENS)?.unwrap_or(0),
            reasoning_tokens: num(H_REASONING_TOKENS)?.unwrap_or(0),
            no_usage: flag(H_NO_USAGE),
            unicode: flag(H_UNICODE),
        })
    }
}

async fn handle(req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let echoed = received_headers_json(&parts.headers);
    let mut resp = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(body) => {
            let mut resp = respond(&parts.method, parts.uri.path(), &parts.headers, &body).await;
            let sha = hex::encode(Sha256::digest(&body));
            insert(&mut resp, H_RECEIVED_BODY_BYTES, &body.len().to_string());
            insert(&mut resp, H_RECEIVED_BODY_SHA256, &sha);
            resp
        }
        Err(_) => {
            let err = ApiError {
                status: 413,
                message: format!("Request body too large for the mock (limit {MAX_BODY_BYTES} bytes)."),
                kind: "invalid_request_error",
                param: None,
                code: None,
            };
            render_error(&err, &Controls::default())
        }
    };
    insert(&mut resp, H_RECEIVED_HEADERS, &echoed);
    insert(&mut resp, "x-request-id", &wire::random_id("req_"));
    resp
}

fn insert(resp: &mut Response, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        resp.headers_mut().insert(HeaderName::from_static(name), v);
    }
}

async fn respond(method: &Method, path: &str, headers: &HeaderMap, body: &[u8]) -> Response {
    let controls = match Controls::parse(headers) {
        Ok(c) => c,
        Err(e) => return render_error(&e, &Controls::default()),
    };
    if !controls.latency.is_zero() {
        tokio::time::sleep(controls.latency).await;
    }
    if let Some(status) = controls.status.filter(|s| *s >= 400) {
        return render_error(&ApiError::for_status(status), &controls);
    }
    let reply = match (method.as_str(), path) {
        ("GET", "/v1/models") => Ok(Reply::Json(wire::models())),
        ("GET", p) if p.starts_with("/v1/models/") && p.len() > "/v1/models/".len() => {
            Ok(Reply::Json(wire::model_object(p.trim_start_matches("/v1/models/"))))
        }
        ("POST", "/v1/chat/completions") => wire::chat(body, &controls),
        ("POST", "/v1/completions") => wire::completions(body, &controls),
        ("POST", "/v1/embeddings") => wire::embeddings(body, &controls),
        (m, p) => Err(ApiError {
            status: 404,
            message: format!("Invalid URL ({m} {p})"),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }),
    };
    match reply {
        Ok(Reply::Json(v)) => render(StatusCode::OK, "application/json", vec![v.into()], false, &controls),
        Ok(Reply::Events(events)) => {
            let mut frames: Vec<Bytes> = events.iter().map(|e| sse(e)).collect();
            frames.push(sse(b"[DONE]"));
            render(StatusCode::OK, "text/event-stream; charset=utf-8", frames, true, &controls)
        }
        Err(e) => render_error(&e, &controls),
    }
}

fn sse(data: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(data.len().saturating_add(8));
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

fn render_error(err: &ApiError, controls: &Controls) -> Response {
    let status = StatusCode::from_u16(err.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    render(status, "application/json", vec![err.body().into()], false, controls)
}

/// Builds the response, pacing and splitting the body per the controls.
fn render(
    status: StatusCode,
    content_type: &'static str,
    frames: Vec<Bytes>,
    stream: bool,
    controls: &Controls,
) -> Response {
    let hold = if stream { controls.hold } else { Duration::ZERO };
    let writes = plan_writes(frames, controls.chunk_bytes, controls.delay, hold);
    let body = if writes.len() <= 1 && writes.iter().all(|(pause, _)| pause.is_zero()) {
        // One unpaced write: a plain body with Content-Length.
        Body::from(writes.into_iter().next().map(|(_, b)| b).unwrap_or_default())
    } else {
        Body::from_stream(futures_util::stream::unfold(writes, |mut queue| async move {
            let (pause, bytes) = queue.pop_front()?;
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            Some((Ok::<Bytes, Infallible>(bytes), queue))
        }))
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if stream {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    resp
}

/// The body as a list of `(pause before, bytes)` writes: one per frame, or
/// `chunk` bytes each across frame boundaries; `delay` between writes, plus
/// `hold` after the write that completes the first frame.
pub(crate) fn plan_writes(
    frames: Vec<Bytes>,
    chunk: Option<usize>,
    delay: Duration,
    hold: Duration,
) -> VecDeque<(Duration, Bytes)> {
    let first_end = frames.first().map_or(0, Bytes::len);
    let pieces: Vec<Bytes> = match chunk {
        None => frames.into_iter().filter(|f| !f.is_empty()).collect(),
        Some(n) => {
            let all: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
            all.chunks(n.max(1)).map(Bytes::copy_from_slice).collect()
        }
    };
    let mut out = VecDeque::with_capacity(pieces.len());
    let mut offset = 0usize;
    let mut held = hold.is_zero();
    for (i, piece) in pieces.into_iter().enumerate() {
        let mut pause = if i == 0 { Duration::ZERO } else { delay };
        if !held && i > 0 && offset >= first_end {
            pause = pause.saturating_add(hold);
            held = true;
        }
        offset = offset.saturating_add(piece.len());
        out.push_back((pause, piece));
    }
    out
}

/// The request headers as a compact JSON object, ASCII-only so it fits in a
/// header value.
pub(crate) fn received_headers_json(headers: &HeaderMap) -> String {
    let mut map: BTreeMap<&str, String> = BTreeMap::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        map.entry(name.as_str())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    let json = serde_json::to_string(&map).unwrap_or_else(|_| "{}".to_owned());
    // Outside strings serde_json emits only ASCII, so escaping per char is safe.
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if c.is_ascii() && c != '\u{7f}' {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}
