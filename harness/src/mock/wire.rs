//! OpenAI request parsing and response shapes for the mock. Kept apart from the
//! HTTP plumbing so the token rules can be read in one place.

use rand::distributions::Alphanumeric;
use rand::Rng;
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::{Controls, MODEL_ID};

/// Completion tokens per choice when the request sets no max.
pub const DEFAULT_COMPLETION_TOKENS: u64 = 16;
/// Larger limits are refused so a typo cannot make the mock build gigabytes.
pub const MAX_COMPLETION_TOKENS: u64 = 1_000_000;
const MAX_CHOICES: u64 = 128;
const DEFAULT_EMBEDDING_DIMS: u64 = 8;
const MAX_EMBEDDING_DIMS: u64 = 4096;

/// An OpenAI-format error: `{"error":{"message","type","param","code"}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&str>, code: Option<&'static str>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_owned),
            code,
        }
    }

    /// The error OpenAI would send for this status (used by `x-mock-status`).
    pub fn for_status(status: u16) -> Self {
        let (kind, code, message) = match status {
            400 => ("invalid_request_error", None, "Mock bad request."),
            401 => ("invalid_request_error", Some("invalid_api_key"), "Incorrect API key provided."),
            403 => ("invalid_request_error", Some("unsupported_country_region_territory"), "Forbidden."),
            404 => ("invalid_request_error", Some("model_not_found"), "The model does not exist."),
            429 => ("requests", Some("rate_limit_exceeded"), "Rate limit reached for requests."),
            503 => ("server_error", None, "The engine is currently overloaded, please try again later."),
            s if s >= 500 => ("server_error", None, "The server had an error while processing your request."),
            _ => ("invalid_request_error", None, "Mock error."),
        };
        Self { status, message: format!("{message} (mock status {status})"), kind, param: None, code }
    }

    pub fn body(&self) -> Vec<u8> {
        to_json(&ErrorBody {
            error: ErrorDetail {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        })
    }
}

/// What to send back: one JSON document, or the JSON of each SSE `data:`
/// event (the caller frames them and adds `[DONE]`).
#[derive(Debug)]
pub enum Reply {
    Json(Vec<u8>),
    Events(Vec<Vec<u8>>),
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub fn random_id(prefix: &str) -> String {
    let tail: String = rand::thread_rng().sample_iter(&Alphanumeric).take(24).map(char::from).collect();
    format!("{prefix}{tail}")
}

/// Whitespace-separated words: the mock's whole tokenizer.
pub fn words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// The text of completion token `i`.
pub fn token(i: u64, unicode: bool) -> String {
    if unicode {
        // 2-byte and 4-byte UTF-8 so byte-level chunking splits characters.
        format!("tök{i}🦀 ")
    } else {
        format!("tok{i} ")
    }
}

fn completion_text(tokens: u64, unicode: bool) -> String {
    (0..tokens).map(|i| token(i, unicode)).collect()
}

pub fn models() -> Vec<u8> {
    to_json(&ModelList { object: "list", data: [model(MODEL_ID)] })
}

pub fn model_object(id: &str) -> Vec<u8> {
    to_json(&model(id))
}

fn model(id: &str) -> ModelObject<'_> {
    ModelObject { id, object: "model", created: 1_700_000_000, owned_by: "tollgate-mock" }
}

fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::invalid("The request body must be a JSON object.", None, None)),
        Err(_) => Err(ApiError::invalid(
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your \
             HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)",
            None,
            None,
        )),
    }
}

fn type_error(param: &str, expected: &str) -> ApiError {
    ApiError::invalid(format!("Invalid type for '{param}': expected {expected}."), Some(param), Some("invalid_type"))
}

fn missing(param: &str) -> ApiError {
    ApiError::invalid(
        format!("Missing required parameter: '{param}'."),
        Some(param),
        Some("missing_required_parameter"),
    )
}

fn model_of(req: &Map<String, Value>) -> Result<String, ApiError> {
    match req.get("model") {
        Some(Value::String(m)) if !m.is_empty() => Ok(m.clone()),
        _ => Err(ApiError::invalid("you must provide a model parameter", None, None)),
    }
}

/// An optional unsigned integer field; JSON null counts as absent.
fn opt_u64(req: &Map<String, Value>, name: &str) -> Result<Option<u64>, ApiError> {
    match req.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| type_error(name, "a non-negative integer")),
    }
}

fn opt_bool(req: &Map<String, Value>, name: &str) -> Result<bool, ApiError> {
    match req.get(name) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(type_error(name, "a boolean")),
    }
}

/// Settings shared by chat and text completions.
struct Gen {
    model: String,
    prompt_tokens: u64,
    /// Tokens generated for each choice.
    tokens: u64,
    choices: u64,
    finish_reason: &'static str,
    stream: bool,
    include_usage: bool,
}

fn gen_settings(
    req: &Map<String, Value>,
    model: String,
    prompt_tokens: u64,
    choices_per_n: u64,
) -> Result<Gen, ApiError> {
    let max = match opt_u64(req, "max_completion_tokens")? {
        Some(m) => Some(m),
        None => opt_u64(req, "max_tokens")?,
    };
    if let Some(m) = max {
        if m > MAX_COMPLETION_TOKENS {
            return Err(ApiError::invalid(
                format!("max_tokens is too large: {m}. The mock allows at most {MAX_COMPLETION_TOKENS}."),
                Some("max_tokens"),
                Some("invalid_value"),
            ));
        }
    }
    let n = opt_u64(req, "n")?.unwrap_or(1);
    if n == 0 || n > MAX_CHOICES {
        return Err(ApiError::invalid(
            format!("{n} is not a valid value for 'n' (1..={MAX_CHOICES})."),
            Some("n"),
            Some("invalid_value"),
        ));
    }
    let stream = opt_bool(req, "stream")?;
    let include_usage = match req.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => {
            if !stream {
                return Err(ApiError::invalid(
                    "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                    Some("stream_options"),
                    Some("invalid_value"),
                ));
            }
            match o.get("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err(type_error("stream_options.include_usage", "a boolean")),
            }
        }
        Some(_) => return Err(type_error("stream_options", "an object")),
    };
    Ok(Gen {
        model,
        prompt_tokens,
        tokens: max.unwrap_or(DEFAULT_COMPLETION_TOKENS),
        choices: n.saturating_mul(choices_per_n.max(1)),
        finish_reason: if max.is_some() { "length" } else { "stop" },
        stream,
        include_usage,
    })
}

/// Words in one message's `content`: a string, or the `text` of array parts.
fn content_words(content: Option<&Value>, index: usize) -> Result<u64, ApiError> {
    match content {
        None | Some(Value::Null) => Ok(0),
        Some(Value::String(s)) => Ok(words(s)),
        Some(Value::Array(parts)) => {
            let mut total = 0u64;
            for part in parts {
                let text = part
                    .as_object()
                    .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
                    .and_then(|p| p.get("text"))
                    .and_then(Value::as_str);
                total = total.saturating_add(text.map_or(0, words));
            }
            Ok(total)
        }
        Some(_) => Err(type_error(&format!("messages[{index}].content"), "a string or an array of content parts")),
    }
}

fn usage(prompt: u64, completion: u64, controls: &Controls) -> Usage {
    Usage {
        prompt_tokens: prompt,
        completion_tokens: Some(completion),
        total_tokens: prompt.saturating_add(completion),
        prompt_tokens_details: (controls.cached_tokens > 0)
            .then_some(PromptDetails { cached_tokens: controls.cached_tokens }),
        completion_tokens_details: (controls.reasoning_tokens > 0)
            .then_some(CompletionDetails { reasoning_tokens: controls.reasoning_tokens }),
    }
}

impl Gen {
    fn completion_tokens(&self) -> u64 {
        self.tokens.saturating_mul(self.choices)
    }

    /// `usage` of a non-streamed body.
    fn body_usage(&self, controls: &Controls) -> Option<Usage> {
        (!controls.no_usage).then(|| usage(self.prompt_tokens, self.completion_tokens(), controls))
    }

    /// Whether a stream carries usage: `null` in each chunk, real in the last.
    fn stream_usage(&self, controls: &Controls) -> bool {
        self.include_usage && !controls.no_usage
    }
}

/// Serialized in struct field order (a `Value` would sort the keys).
pub fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

pub fn chat(body: &[u8], controls: &Controls) -> Result<Reply, ApiError> {
    let req = parse_object(body)?;
    let model = model_of(&req)?;
    let messages = match req.get("messages") {
        None | Some(Value::Null) => return Err(missing("messages")),
        Some(Value::Array(m)) => m,
        Some(_) => return Err(type_error("messages", "an array of objects")),
    };
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.",
            Some("messages"),
            Some("empty_array"),
        ));
    }
    let mut prompt = 0u64;
    for (i, m) in messages.iter().enumerate() {
        let m = m.as_object().ok_or_else(|| type_error(&format!("messages[{i}]"), "an object"))?;
        prompt = prompt.saturating_add(content_words(m.get("content"), i)?);
    }
    let gen = gen_settings(&req, model, prompt, 1)?;
    let id = random_id("chatcmpl-");
    let created = now();

    if !gen.stream {
        let text = completion_text(gen.tokens, controls.unicode);
        let choices = (0..gen.choices)
            .map(|index| ChatChoice {
                index,
                message: Message { role: "assistant", content: text.clone(), refusal: None, annotations: [] },
                logprobs: None,
                finish_reason: gen.finish_reason,
            })
            .collect();
        let body = ChatCompletion {
            id: &id,
            object: "chat.completion",
            created,
            model: &gen.model,
            choices,
            usage: gen.body_usage(controls),
            service_tier: "default",
            system_fingerprint: FINGERPRINT,
        };
        return Ok(Reply::Json(to_json(&body)));
    }

    let with_usage = gen.stream_usage(controls);
    let chunk = |choices: Vec<ChunkChoice>, usage: Option<Usage>| {
        to_json(&ChatChunk {
            id: &id,
            object: "chat.completion.chunk",
            created,
            model: &gen.model,
            service_tier: "default",
            system_fingerprint: FINGERPRINT,
            choices,
            usage: with_usage.then_some(usage),
        })
    };
    let choice = |index: u64, delta: Delta, finish_reason: Option<&'static str>| ChunkChoice {
        index,
        delta,
        logprobs: None,
        finish_reason,
    };
    let mut events = Vec::new();
    for i in 0..gen.choices {
        let role = Delta { role: Some("assistant"), content: Some(String::new()), refusal: Some(None) };
        events.push(chunk(vec![choice(i, role, None)], None));
    }
    for t in 0..gen.tokens {
        let content = token(t, controls.unicode);
        for i in 0..gen.choices {
            let delta = Delta { content: Some(content.clone()), ..Delta::default() };
            events.push(chunk(vec![choice(i, delta, None)], None));
        }
    }
    for i in 0..gen.choices {
        events.push(chunk(vec![choice(i, Delta::default(), Some(gen.finish_reason))], None));
    }
    if with_usage {
        events.push(chunk(vec![], Some(usage(gen.prompt_tokens, gen.completion_tokens(), controls))));
    }
    Ok(Reply::Events(events))
}

/// Prompt tokens and prompt count for `/v1/completions` (`prompt` may be a
/// string, strings, a token array, or token arrays).
fn prompt_tokens(prompt: Option<&Value>) -> Result<(u64, u64), ApiError> {
    let bad = || type_error("prompt", "a string, an array of strings, or token arrays");
    match prompt {
        None | Some(Value::Null) => Ok((0, 1)),
        Some(Value::String(s)) => Ok((words(s), 1)),
        Some(Value::Array(items)) => {
            if items.iter().all(Value::is_u64) {
                return Ok((items.len() as u64, 1));
            }
            let mut total = 0u64;
            for item in items {
                let n = match item {
                    Value::String(s) => words(s),
                    Value::Array(toks) if toks.iter().all(Value::is_u64) => toks.len() as u64,
                    _ => return Err(bad()),
                };
                total = total.saturating_add(n);
            }
            Ok((total, items.len() as u64))
        }
        Some(_) => Err(bad()),
    }
}

pub fn completions(body: &[u8], controls: &Controls) -> Result<Reply, ApiError> {
    let req = parse_object(body)?;
    let model = model_of(&req)?;
    let (prompt, prompts) = prompt_tokens(req.get("prompt"))?;
    let gen = gen_settings(&req, model, prompt, prompts)?;
    let id = random_id("cmpl-");
    let created = now();
    let body = |choices: Vec<TextChoice>, usage: Option<Option<Usage>>| {
        to_json(&TextCompletion {
            id: &id,
            object: "text_completion",
            created,
            model: &gen.model,
            system_fingerprint: FINGERPRINT,
            choices,
            usage,
        })
    };
    let choice = |index: u64, text: String, finish_reason: Option<&'static str>| TextChoice {
        text,
        index,
        logprobs: None,
        finish_reason,
    };

    if !gen.stream {
        let text = completion_text(gen.tokens, controls.unicode);
        let choices = (0..gen.choices).map(|i| choice(i, text.clone(), Some(gen.finish_reason))).collect();
        return Ok(Reply::Json(body(choices, gen.body_usage(controls).map(Some))));
    }

    let with_usage = gen.stream_usage(controls);
    let none = || with_usage.then_some(None);
    let mut events = Vec::new();
    for t in 0..gen.tokens {
        let text = token(t, controls.unicode);
        for i in 0..gen.choices {
            events.push(body(vec![choice(i, text.clone(), None)], none()));
        }
    }
    for i in 0..gen.choices {
        events.push(body(vec![choice(i, String::new(), Some(gen.finish_reason))], none()));
    }
    if with_usage {
        let last = usage(gen.prompt_tokens, gen.completion_tokens(), controls);
        events.push(body(vec![], Some(Some(last))));
    }
    Ok(Reply::Events(events))
}

/// One embedding input: its token count and a seed for its vector.
fn embedding_inputs(input: Option<&Value>) -> Result<Vec<(u64, u64)>, ApiError> {
    let bad = || type_error("input", "a string, an array of strings, or token arrays");
    let of_text = |s: &str| (words(s), fnv(s.as_bytes()));
    let of_tokens = |toks: &[Value]| {
        let bytes: Vec<u8> = toks.iter().flat_map(|t| t.as_u64().unwrap_or(0).to_le_bytes()).collect();
        (toks.len() as u64, fnv(&bytes))
    };
    match input {
        None | Some(Value::Null) => Err(missing("input")),
        Some(Value::String(s)) => Ok(vec![of_text(s)]),
        Some(Value::Array(items)) if items.is_empty() => Err(ApiError::invalid(
            "'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference.",
            Some("input"),
            None,
        )),
        Some(Value::Array(items)) if items.iter().all(Value::is_u64) => Ok(vec![of_tokens(items)]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(of_text(s)),
                Value::Array(toks) if toks.iter().all(Value::is_u64) => Ok(of_tokens(toks)),
                _ => Err(bad()),
            })
            .collect(),
        Some(_) => Err(bad()),
    }
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// A deterministic unit vector derived from `seed`.
fn vector(seed: u64, dims: u64) -> Vec<f32> {
    let mut state = seed | 1;
    let raw: Vec<f32> = (0..dims)
        .map(|_| {
            // xorshift64: cheap, deterministic, good enough for fake vectors.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    let norm = raw.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        raw.into_iter().map(|x| x / norm).collect()
    } else {
        raw
    }
}

pub fn embeddings(body: &[u8], controls: &Controls) -> Result<Reply, ApiError> {
    use base64::Engine as _;
    let req = parse_object(body)?;
    let model = model_of(&req)?;
    let inputs = embedding_inputs(req.get("input"))?;
    let dims = opt_u64(&req, "dimensions")?.unwrap_or(DEFAULT_EMBEDDING_DIMS);
    if dims == 0 || dims > MAX_EMBEDDING_DIMS {
        return Err(ApiError::invalid(
            format!("Invalid value for 'dimensions': {dims} (1..={MAX_EMBEDDING_DIMS})."),
            Some("dimensions"),
            Some("invalid_value"),
        ));
    }
    let base64 = match req.get("encoding_format") {
        None | Some(Value::Null) => false,
        Some(Value::String(f)) if f == "float" => false,
        Some(Value::String(f)) if f == "base64" => true,
        Some(_) => {
            return Err(ApiError::invalid(
                "Invalid value for 'encoding_format': expected 'float' or 'base64'.",
                Some("encoding_format"),
                Some("invalid_value"),
            ))
        }
    };
    let mut prompt = 0u64;
    let data = inputs
        .iter()
        .zip(0u64..)
        .map(|((tokens, seed), index)| {
            prompt = prompt.saturating_add(*tokens);
            let v = vector(*seed, dims);
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            Embedding { object: "embedding", index, embedding }
        })
        .collect();
    let body = EmbeddingList {
        object: "list",
        data,
        model: &model,
        usage: (!controls.no_usage).then_some(EmbeddingUsage { prompt_tokens: prompt, total_tokens: prompt }),
    };
    Ok(Reply::Json(to_json(&body)))
}

// Response bodies as typed structs: field order is OpenAI's, since serde_json's
// `Value` would sort keys.

const FINGERPRINT: &str = "fp_mock";

#[derive(Serialize)]
struct Usage {
    prompt_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    completion_tokens: Option<u64>,
    total_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_tokens_details: Option<PromptDetails>,
    #[serde(skip_serializing_if = "Option::is_none")]
    completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Serialize)]
struct PromptDetails {
    cached_tokens: u64,
}

#[derive(Serialize)]
struct CompletionDetails {
    reasoning_tokens: u64,
}

#[derive(Serialize)]
struct ChatCompletion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<ChatChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
    service_tier: &'static str,
    system_fingerprint: &'static str,
}

#[derive(Serialize)]
struct ChatChoice {
    index: u64,
    message: Message,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct Message {
    role: &'static str,
    content: String,
    refusal: Option<String>,
    annotations: [(); 0],
}

/// `usage`: absent (`None`), `null` (`Some(None)`) or the counts.
#[derive(Serialize)]
struct ChatChunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    service_tier: &'static str,
    system_fingerprint: &'static str,
    choices: Vec<ChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<Usage>>,
}

#[derive(Serialize)]
struct ChunkChoice {
    index: u64,
    delta: Delta,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize, Default)]
struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refusal: Option<Option<String>>,
}

#[derive(Serialize)]
struct TextCompletion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: &'static str,
    choices: Vec<TextChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<Usage>>,
}

#[derive(Serialize)]
struct TextChoice {
    text: String,
    index: u64,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct EmbeddingList<'a> {
    object: &'static str,
    data: Vec<Embedding>,
    model: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<EmbeddingUsage>,
}

#[derive(Serialize)]
struct Embedding {
    object: &'static str,
    index: u64,
    embedding: Value,
}

#[derive(Serialize)]
struct EmbeddingUsage {
    prompt_tokens: u64,
    total_tokens: u64,
}

#[derive(Serialize)]
struct ModelList<'a> {
    object: &'static str,
    data: [ModelObject<'a>; 1],
}

#[derive(Serialize)]
struct ModelObject<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}
