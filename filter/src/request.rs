//! What a request body says about the tokens it may cost, and the one rewrite the
//! filter makes: `stream_options.include_usage` forced to true on streaming
//! chat/completions and completions requests, so the model server reports usage.
//!
//! Why it is shaped this way:
//!
//! - **The model server decides what the body means, not us.** vLLM and most
//!   OpenAI-compatible servers parse the body with Python's `json` (duplicate keys: the
//!   last one wins; `NaN`/`Infinity` accepted) and validate with pydantic (lax: `"stream":
//!   1` or `"yes"` is true). So keys are matched after decoding their escapes
//!   (`"str\u0065am"` is `stream`), the last duplicate counts, and a `stream` value is
//!   taken as Python does in vLLM's check (`if data.get("stream")`): anything truthy.
//! - **Bodies arrive in chunks, of any size.** [`BodyScan`] is an incremental byte-level
//!   scanner: it keeps only offsets and a few short raw values (bounded), never the body.
//! - **The headers have already gone upstream** when the body is read (a paused header
//!   callback pauses the body callbacks too), so the `content-length` the upstream gets
//!   was fixed before the filter saw the body. The gateway promises `content-length +`
//!   [`MAX_GROWTH`] for the bodies it may rewrite and pads every one of them with
//!   trailing spaces (JSON-insignificant) to exactly that; a rewrite never grows a
//!   body by more than [`MAX_GROWTH`] bytes.
//! - **Two ways to rewrite.** With the whole body at hand ([`BodyScan::rewrite_whole`])
//!   the edit is made in place: every `stream_options` member but the last is removed,
//!   and in the last one every `include_usage` is removed and `"include_usage":true`
//!   added (or the member added after the opening brace when there is none), so the
//!   result has no duplicate key. When the start of the body has already gone upstream
//!   ([`BodyScan::rewrite_tail`]), the member is added before the closing brace, where
//!   it overrides an earlier one for every last-wins parser.
//!
//! Pure: bytes in, offsets and bytes out; no host, no clock.

use crate::usage::KeyBuf;

/// Most bytes a rewrite adds: `,"stream_options":{"include_usage":true}`.
pub const MAX_GROWTH: usize = TAIL_MEMBER.len();

/// Added after the opening brace when the body has no `stream_options`.
const HEAD_MEMBER: &[u8] = br#""stream_options":{"include_usage":true},"#;
/// Added before the closing brace when the start of the body is gone.
const TAIL_MEMBER: &[u8] = br#","stream_options":{"include_usage":true}"#;
const STREAM_OPTIONS_VALUE: &[u8] = br#"{"include_usage":true}"#;
const INCLUDE_USAGE: &[u8] = br#""include_usage":true"#;

/// Longest raw key matched (`max_completion_tokens` written as `\u` escapes is 126).
const KEY_RAW_MAX: usize = 128;
/// Longest raw value kept of the members whose value matters (`stream`, `max_tokens`, …).
const VALUE_RAW_MAX: usize = 64;
/// `stream_options` members, and members inside the last one, whose offsets are kept.
/// Beyond them the in-place rewrite is given up for the tail insertion.
const MAX_RECORDED: usize = 16;

/// The OpenAI-style routes, by what their requests cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    ChatCompletions,
    Completions,
    Responses,
    Messages,
    Embeddings,
    /// Anything else: never rewritten, never charged an estimate.
    Other,
}

impl Route {
    /// Routes whose streamed answers carry usage only when `include_usage` is asked for.
    pub fn forces_usage(self) -> bool {
        matches!(self, Route::ChatCompletions | Route::Completions)
    }

    /// Routes that run the model (and so are charged an estimate when usage is missing).
    pub fn is_inference(self) -> bool {
        !matches!(self, Route::Other)
    }

    /// Whether an answer of this route has completion tokens.
    fn generates(self) -> bool {
        !matches!(self, Route::Embeddings | Route::Other)
    }
}

/// The route of a request path, as a server that decodes and normalises paths sees it:
/// query and fragment dropped, percent-escapes decoded, `.`/`..` segments resolved,
/// repeated and trailing slashes ignored, ASCII case ignored (wider than any server
/// routes, so a path trick can only make more requests metered, never fewer).
pub fn route_of(path: &str) -> Route {
    let raw = path.split(['?', '#']).next().unwrap_or("");
    let decoded = percent_decode(raw.as_bytes());
    let text = String::from_utf8_lossy(&decoded).to_ascii_lowercase();
    let mut segments: Vec<&str> = Vec::new();
    for seg in text.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    match segments.as_slice() {
        [.., "chat", "completions"] => Route::ChatCompletions,
        [.., "completions"] => Route::Completions,
        [.., "responses"] => Route::Responses,
        [.., "messages"] => Route::Messages,
        [.., "embeddings"] => Route::Embeddings,
        _ => Route::Other,
    }
}

fn percent_decode(bytes: &[u8]) -> Vec<u8> {
    let hex = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    };
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            if let (Some(h), Some(l)) = (bytes.get(i + 1).and_then(|&c| hex(c)), bytes.get(i + 2).and_then(|&c| hex(c)))
            {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(b);
        i += 1;
    }
    out
}

/// The keys whose members matter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Stream,
    StreamOptions,
    MaxTokens,
    MaxCompletionTokens,
    MaxOutputTokens,
    N,
    BestOf,
    IncludeUsage,
    Other,
}

/// Top-level keys whose last value is kept, in [`BodyScan::values`] order.
const VALUE_KEYS: [Key; 6] =
    [Key::Stream, Key::MaxTokens, Key::MaxCompletionTokens, Key::MaxOutputTokens, Key::N, Key::BestOf];

impl Key {
    fn from_decoded(name: &[u8], top: bool) -> Key {
        match (name, top) {
            (b"stream", true) => Key::Stream,
            (b"stream_options", true) => Key::StreamOptions,
            (b"max_tokens", true) => Key::MaxTokens,
            (b"max_completion_tokens", true) => Key::MaxCompletionTokens,
            (b"max_output_tokens", true) => Key::MaxOutputTokens,
            (b"n", true) => Key::N,
            (b"best_of", true) => Key::BestOf,
            (b"include_usage", false) => Key::IncludeUsage,
            _ => Key::Other,
        }
    }
}

/// The first bytes of a value, as written (strings with their quotes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Raw {
    bytes: Vec<u8>,
    /// The value was longer than [`VALUE_RAW_MAX`]: `bytes` holds its start.
    over: bool,
}

impl Raw {
    fn push(&mut self, bytes: &[u8]) {
        if self.over {
            return;
        }
        if self.bytes.len().saturating_add(bytes.len()) > VALUE_RAW_MAX {
            let room = VALUE_RAW_MAX.saturating_sub(self.bytes.len());
            self.bytes.extend_from_slice(bytes.get(..room).unwrap_or_default());
            self.over = true;
        } else {
            self.bytes.extend_from_slice(bytes);
        }
    }

    /// Python's truth value of the JSON value (what vLLM's `if data.get("stream")` sees).
    pub fn truthy(&self) -> bool {
        let b = self.bytes.as_slice();
        match b.first() {
            None => false,
            Some(b'"') => self.over || b.len() > 2,
            Some(b'[' | b'{') => {
                self.over || b.get(1..b.len().saturating_sub(1)).is_some_and(|inner| !inner.trim_ascii().is_empty())
            }
            _ if self.over => true,
            _ => match b {
                b"true" => true,
                b"false" | b"null" => false,
                // Numbers (NaN and Infinity included, as Python reads them): zero is false.
                _ => std::str::from_utf8(b).ok().and_then(|s| s.parse::<f64>().ok()).is_none_or(|f| f != 0.0),
            },
        }
    }

    /// pydantic's lax boolean true: `true`, `1`, `1.0`, or one of its true strings.
    pub fn pydantic_true(&self) -> bool {
        if self.over {
            return false;
        }
        match self.bytes.as_slice() {
            b"true" => true,
            b @ [b'"', ..] => serde_json::from_slice::<String>(b)
                .is_ok_and(|s| matches!(s.to_ascii_lowercase().as_str(), "1" | "on" | "t" | "true" | "y" | "yes")),
            b => std::str::from_utf8(b).ok().and_then(|s| s.parse::<f64>().ok()) == Some(1.0),
        }
    }

    /// A non-negative integer as pydantic reads one leniently: `12`, `12.0`, `"12"`.
    /// A number too large for a u64, or a value too long to keep, is `u64::MAX`: the
    /// server reads it (Python integers have no bound, and caps a token limit at the
    /// model's context), so taking it as absent would estimate the default instead.
    pub fn uint(&self) -> Option<u64> {
        if self.over {
            return Some(u64::MAX);
        }
        let b = self.bytes.as_slice();
        let text = if b.first() == Some(&b'"') {
            serde_json::from_slice::<String>(b).ok()?
        } else {
            String::from_utf8(b.to_vec()).ok()?
        };
        let text = text.trim();
        if let Ok(n) = text.parse::<u64>() {
            return Some(n);
        }
        let f = text.parse::<f64>().ok()?;
        if f >= 1.8e19 && f.is_finite() {
            return Some(u64::MAX);
        }
        (f >= 0.0 && f.fract() == 0.0).then_some(f as u64)
    }
}

/// One `stream_options` member of the top-level object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct OptionsMember {
    key_start: usize,
    value_start: usize,
    value_end: usize,
    /// Where the next top-level member starts (set when it does).
    next_start: Option<usize>,
    object: bool,
    /// Members of the value when it is an object: (start, end, is `include_usage`).
    members: Vec<(usize, usize, bool)>,
    members_over: bool,
    /// The value of its last `include_usage`.
    include_usage: Option<Raw>,
}

/// Where the scanner is in one object (the top level, or a `stream_options` object).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// A key, or the closing brace of an object without members yet.
    Key,
    InKey,
    Colon,
    Value,
    InString,
    InBare,
    /// An array or object value, skipped by counting brackets.
    InContainer,
    /// A `stream_options` object being read member by member (the nested frame runs).
    InOptions,
    AfterValue,
}

#[derive(Debug, Clone)]
struct Frame {
    phase: Phase,
    /// No member yet: `}` may close the object.
    empty: bool,
    key: KeyBuf<KEY_RAW_MAX>,
    key_escaped: bool,
    key_start: usize,
    current: Key,
    value_start: usize,
    value: Raw,
    esc: bool,
    /// Inside a skipped container: its depth and string state.
    depth: u32,
    in_str: bool,
}

impl Frame {
    fn new() -> Frame {
        Frame {
            phase: Phase::Key,
            empty: true,
            key: KeyBuf::new(),
            key_escaped: false,
            key_start: 0,
            current: Key::Other,
            value_start: 0,
            value: Raw::default(),
            esc: false,
            depth: 0,
            in_str: false,
        }
    }

    fn decode_key(&self, top: bool) -> Key {
        let Some(raw) = self.key.get() else { return Key::Other };
        if !self.key_escaped {
            return Key::from_decoded(raw, top);
        }
        let mut quoted = Vec::with_capacity(raw.len() + 2);
        quoted.push(b'"');
        quoted.extend_from_slice(raw);
        quoted.push(b'"');
        match serde_json::from_slice::<String>(&quoted) {
            Ok(name) => Key::from_decoded(name.as_bytes(), top),
            Err(_) => Key::Other,
        }
    }

    fn wants_value(&self) -> bool {
        self.current != Key::Other && self.current != Key::StreamOptions
    }
}

/// Where the top-level value is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outer {
    /// Before it (whitespace, a UTF-8 byte order mark).
    Start,
    Object,
    /// After its closing brace.
    End,
    /// Not an object, broken, or something after it: nothing is rewritten.
    Invalid,
}

/// Incremental scanner of a JSON request body: feed it every chunk, in order.
#[derive(Debug, Clone)]
pub struct BodyScan {
    pos: usize,
    /// Bytes of a leading UTF-8 byte order mark seen.
    bom: usize,
    /// The body's first two bytes (as many as were fed).
    head: [u8; 2],
    outer: Outer,
    top: Frame,
    nested: Option<Frame>,
    open: Option<usize>,
    close: Option<usize>,
    /// Last values of [`VALUE_KEYS`].
    values: [Option<Raw>; 6],
    /// `stream_options` members before the last one: (key start, next member start).
    earlier: Vec<(usize, Option<usize>)>,
    earlier_over: bool,
    last: Option<OptionsMember>,
    /// The member just finished was `stream_options` (the next member's start is its end).
    after_options: bool,
}

impl Default for BodyScan {
    fn default() -> Self {
        Self::new()
    }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

impl BodyScan {
    pub fn new() -> BodyScan {
        BodyScan {
            pos: 0,
            bom: 0,
            head: [0; 2],
            outer: Outer::Start,
            top: Frame::new(),
            nested: None,
            open: None,
            close: None,
            values: Default::default(),
            earlier: Vec::new(),
            earlier_over: false,
            last: None,
            after_options: false,
        }
    }

    /// Bytes fed so far.
    pub fn len(&self) -> usize {
        self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }

    /// Whether the top-level object has closed (only whitespace may follow).
    pub fn closed(&self) -> bool {
        self.outer == Outer::End
    }

    /// Whether what was fed may be a whole request to the server: the object closed, or
    /// something this scan cannot follow (a server may still read it). A valid start of
    /// an object that has not closed is not one.
    pub fn may_be_whole(&self) -> bool {
        matches!(self.outer, Outer::End | Outer::Invalid)
    }

    /// Whether the body is JSON in UTF-16 or UTF-32, as Python's `json.loads` tells from
    /// its first bytes (a byte order mark `FF FE` / `FE FF`, or a NUL in the first two
    /// bytes): the server would read it, but this scanner reads UTF-8 only, so what it
    /// asks (`stream`, `max_tokens`) would go unseen.
    pub fn foreign_encoding(&self) -> bool {
        let seen = self.head.get(..self.pos.min(2)).unwrap_or_default();
        matches!(seen, [0xFF, 0xFE] | [0xFE, 0xFF]) || seen.contains(&0)
    }

    /// Reads the next chunk.
    pub fn feed(&mut self, chunk: &[u8]) {
        for (slot, b) in self.head.iter_mut().skip(self.pos).zip(chunk) {
            *slot = *b;
        }
        let mut i = 0;
        while i < chunk.len() {
            match self.outer {
                Outer::Invalid => break,
                Outer::Start => {
                    let b = chunk.get(i).copied().unwrap_or_default();
                    let at = self.pos + i;
                    // A UTF-8 byte order mark as the very first bytes is allowed (Python
                    // reads a bytes body as utf-8-sig).
                    if at == self.bom && [0xEF, 0xBB, 0xBF].get(self.bom) == Some(&b) {
                        self.bom += 1;
                        i += 1;
                    } else if is_ws(b) {
                        i += 1;
                    } else if b == b'{' {
                        self.open = Some(at);
                        self.outer = Outer::Object;
                        i += 1;
                    } else {
                        self.outer = Outer::Invalid;
                    }
                }
                Outer::End => {
                    if chunk.get(i..).unwrap_or_default().iter().any(|&b| !is_ws(b)) {
                        self.outer = Outer::Invalid;
                    }
                    break;
                }
                Outer::Object => i = self.step(chunk, i),
            }
        }
        self.pos = self.pos.saturating_add(chunk.len());
    }

    /// One step inside the top-level object from `chunk[i]`; the next index.
    fn step(&mut self, chunk: &[u8], i: usize) -> usize {
        let at = self.pos + i;
        let nested = self.nested.is_some();
        let Some(f) = (if nested { self.nested.as_mut() } else { Some(&mut self.top) }) else { return i + 1 };
        let Some(&b) = chunk.get(i) else { return i + 1 };
        match f.phase {
            Phase::Key => {
                if b == b'"' {
                    f.phase = Phase::InKey;
                    f.key.clear();
                    f.key_escaped = false;
                    f.key_start = at;
                    f.esc = false;
                    if !nested && self.after_options {
                        if let Some(last) = self.last.as_mut() {
                            last.next_start = Some(at);
                        }
                        self.after_options = false;
                    }
                } else if b == b'}' && f.empty {
                    return self.close_object(i, at);
                } else if !is_ws(b) {
                    self.outer = Outer::Invalid;
                }
                i + 1
            }
            Phase::InKey => {
                let rest = chunk.get(i..).unwrap_or_default();
                if f.esc {
                    f.esc = false;
                    f.key.push(rest.get(..1).unwrap_or_default());
                    return i + 1;
                }
                let n = rest.iter().position(|&c| c == b'"' || c == b'\\').unwrap_or(rest.len());
                f.key.push(rest.get(..n).unwrap_or_default());
                match rest.get(n) {
                    Some(b'\\') => {
                        f.esc = true;
                        f.key_escaped = true;
                        f.key.push(b"\\");
                    }
                    Some(_) => {
                        f.current = f.decode_key(!nested);
                        f.phase = Phase::Colon;
                    }
                    None => {}
                }
                i + n + 1
            }
            Phase::Colon => {
                if b == b':' {
                    f.phase = Phase::Value;
                } else if !is_ws(b) {
                    self.outer = Outer::Invalid;
                }
                i + 1
            }
            Phase::Value => {
                if is_ws(b) {
                    return i + 1;
                }
                f.value_start = at;
                f.value = Raw::default();
                match b {
                    b'"' => {
                        f.phase = Phase::InString;
                        f.esc = false;
                        f.value.push(b"\"");
                    }
                    b'{' if !nested && f.current == Key::StreamOptions => {
                        f.phase = Phase::InOptions;
                        self.start_options(at, true);
                        self.nested = Some(Frame::new());
                    }
                    b'{' | b'[' => {
                        f.phase = Phase::InContainer;
                        f.depth = 1;
                        f.in_str = false;
                        f.esc = false;
                        f.value.push(&[b]);
                    }
                    b',' | b'}' | b']' | b':' => self.outer = Outer::Invalid,
                    _ => {
                        f.phase = Phase::InBare;
                        f.value.push(&[b]);
                    }
                }
                i + 1
            }
            Phase::InString => {
                let rest = chunk.get(i..).unwrap_or_default();
                if f.esc {
                    f.esc = false;
                    if f.wants_value() {
                        f.value.push(rest.get(..1).unwrap_or_default());
                    }
                    return i + 1;
                }
                let n = rest.iter().position(|&c| c == b'"' || c == b'\\').unwrap_or(rest.len());
                let take = rest.get(..n.saturating_add(1).min(rest.len())).unwrap_or_default();
                if f.wants_value() {
                    f.value.push(take);
                }
                match rest.get(n) {
                    Some(b'\\') => f.esc = true,
                    Some(_) => self.end_value(at + n + 1),
                    None => {}
                }
                i + n + 1
            }
            Phase::InBare => {
                if is_ws(b) || matches!(b, b',' | b'}' | b']') {
                    self.end_value(at);
                    // The byte ends the value and is read again after it.
                    return i;
                }
                if matches!(b, b'"' | b'{' | b'[' | b':') {
                    self.outer = Outer::Invalid;
                } else if f.wants_value() {
                    f.value.push(&[b]);
                }
                i + 1
            }
            Phase::InContainer => {
                let rest = chunk.get(i..).unwrap_or_default();
                let n = if f.in_str {
                    if f.esc {
                        f.esc = false;
                        1
                    } else {
                        let n = rest.iter().position(|&c| c == b'"' || c == b'\\').unwrap_or(rest.len());
                        match rest.get(n) {
                            Some(b'\\') => f.esc = true,
                            Some(_) => f.in_str = false,
                            None => {}
                        }
                        n + 1
                    }
                } else {
                    match b {
                        b'"' => f.in_str = true,
                        b'{' | b'[' => f.depth = f.depth.saturating_add(1),
                        b'}' | b']' => f.depth = f.depth.saturating_sub(1),
                        _ => {}
                    }
                    1
                };
                let n = n.min(rest.len());
                if f.wants_value() {
                    f.value.push(rest.get(..n).unwrap_or_default());
                }
                if !f.in_str && f.depth == 0 {
                    self.end_value(at + n);
                }
                i + n
            }
            Phase::AfterValue => {
                if b == b',' {
                    f.phase = Phase::Key;
                    f.empty = false;
                } else if b == b'}' {
                    return self.close_object(i, at);
                } else if !is_ws(b) {
                    self.outer = Outer::Invalid;
                }
                i + 1
            }
            // Only the nested frame runs while the top frame is in this phase.
            Phase::InOptions => i + 1,
        }
    }

    fn start_options(&mut self, value_start: usize, object: bool) {
        if let Some(previous) = self.last.take() {
            if self.earlier.len() < MAX_RECORDED {
                self.earlier.push((previous.key_start, previous.next_start));
            } else {
                self.earlier_over = true;
            }
        }
        self.last = Some(OptionsMember {
            key_start: self.top.key_start,
            value_start,
            value_end: value_start,
            next_start: None,
            object,
            members: Vec::new(),
            members_over: false,
            include_usage: None,
        });
    }

    /// The `}` at `chunk[i]` (offset `at`) closes the current object.
    fn close_object(&mut self, i: usize, at: usize) -> usize {
        if self.nested.take().is_some() {
            if let Some(last) = self.last.as_mut() {
                last.value_end = at + 1;
            }
            self.top.phase = Phase::AfterValue;
            self.top.empty = false;
            self.after_options = true;
        } else {
            self.close = Some(at);
            self.outer = Outer::End;
        }
        i + 1
    }

    /// The value of the current member ended at `end` (exclusive).
    fn end_value(&mut self, end: usize) {
        if let Some(f) = self.nested.as_mut() {
            f.phase = Phase::AfterValue;
            f.empty = false;
            let include = f.current == Key::IncludeUsage;
            let (start, value) = (f.key_start, std::mem::take(&mut f.value));
            if let Some(last) = self.last.as_mut() {
                if last.members.len() < MAX_RECORDED {
                    last.members.push((start, end, include));
                } else {
                    last.members_over = true;
                }
                if include {
                    last.include_usage = Some(value);
                }
            }
            return;
        }
        let f = &mut self.top;
        f.phase = Phase::AfterValue;
        f.empty = false;
        let key = f.current;
        let value = std::mem::take(&mut f.value);
        let value_start = f.value_start;
        if key == Key::StreamOptions {
            self.start_options(value_start, false);
            if let Some(last) = self.last.as_mut() {
                last.value_end = end;
            }
            self.after_options = true;
        } else if let Some(slot) = VALUE_KEYS.iter().position(|k| *k == key).and_then(|i| self.values.get_mut(i)) {
            *slot = Some(value);
        }
    }

    fn value(&self, key: Key) -> Option<&Raw> {
        VALUE_KEYS.iter().position(|k| *k == key).and_then(|i| self.values.get(i)).and_then(Option::as_ref)
    }

    /// What the body asks for, once it has been fed whole.
    pub fn facts(&self) -> Facts {
        let uint = |key| self.value(key).and_then(Raw::uint);
        let choices = uint(Key::N).into_iter().chain(uint(Key::BestOf)).max().unwrap_or(1).max(1);
        Facts {
            object: self.closed(),
            stream: self.value(Key::Stream).is_some_and(Raw::truthy),
            asked_usage: self
                .last
                .as_ref()
                .is_some_and(|so| so.object && so.include_usage.as_ref().is_some_and(Raw::pydantic_true)),
            has_stream_options: self.last.is_some(),
            max_tokens: uint(Key::MaxTokens),
            max_completion_tokens: uint(Key::MaxCompletionTokens),
            max_output_tokens: uint(Key::MaxOutputTokens),
            choices,
        }
    }

    /// The body with usage forced, when it needs it, from the whole body (`body` is
    /// everything fed). No duplicate key results, except when more `stream_options`
    /// members than are recorded forced the tail insertion.
    pub fn rewrite_whole(&self, body: &[u8]) -> Option<Vec<u8>> {
        if !self.facts().needs_usage() || body.len() != self.pos {
            return None;
        }
        let Some(last) = &self.last else {
            let open = self.open?;
            return splice(body, &[(open + 1, open + 1, HEAD_MEMBER)]);
        };
        if self.earlier_over || last.members_over {
            return self.rewrite_tail(body, 0);
        }
        let mut edits: Vec<(usize, usize, &[u8])> = Vec::new();
        for &(start, next) in &self.earlier {
            edits.push((start, next?, b""));
        }
        if last.object {
            let remove: Vec<bool> = last.members.iter().map(|m| m.2).collect();
            let spans: Vec<(usize, usize)> = last.members.iter().map(|m| (m.0, m.1)).collect();
            let keep_any = remove.iter().any(|r| !r);
            let brace = last.value_start + 1;
            edits.push((brace, brace, if keep_any { br#""include_usage":true,"# } else { INCLUDE_USAGE }));
            for (start, end) in member_deletions(&spans, &remove) {
                edits.push((start, end, b""));
            }
        } else {
            edits.push((last.value_start, last.value_end, STREAM_OPTIONS_VALUE));
        }
        splice(body, &edits)
    }

    /// The body's held tail with usage forced, when it needs it: `buf` holds the bytes
    /// from offset `base` to the end, including the closing brace.
    pub fn rewrite_tail(&self, buf: &[u8], base: usize) -> Option<Vec<u8>> {
        if !self.facts().needs_usage() {
            return None;
        }
        let at = self.close?.checked_sub(base)?;
        if at >= buf.len() || base.checked_add(buf.len()) != Some(self.pos) {
            return None;
        }
        splice(buf, &[(at, at, TAIL_MEMBER)])
    }
}

/// Byte ranges to delete so that the members flagged in `remove` go, with their commas:
/// a member followed by a kept member goes up to that member's start; a run of removed
/// members at the end goes from the end of the last kept member; all removed: from the
/// first start to the last end.
fn member_deletions(spans: &[(usize, usize)], remove: &[bool]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let last_kept = remove.iter().rposition(|r| !r);
    let (Some(first), Some(last)) = (spans.first(), spans.last()) else { return out };
    let Some(last_kept) = last_kept else {
        if remove.iter().any(|r| *r) {
            out.push((first.0, last.1));
        }
        return out;
    };
    for (i, (&(start, _), &gone)) in spans.iter().zip(remove).enumerate() {
        if !gone {
            continue;
        }
        if i < last_kept {
            if let Some(&(next, _)) = spans.get(i + 1) {
                out.push((start, next));
            }
        } else {
            if let Some(&(_, kept_end)) = spans.get(last_kept) {
                out.push((kept_end, last.1));
            }
            break;
        }
    }
    out
}

/// Applies non-overlapping edits `(start, end, replacement)`; insertions have
/// `start == end`. None if they overlap or fall outside `body`.
fn splice(body: &[u8], edits: &[(usize, usize, &[u8])]) -> Option<Vec<u8>> {
    let mut sorted: Vec<&(usize, usize, &[u8])> = edits.iter().collect();
    // Insertions first at a position, then deletions starting there.
    sorted.sort_by_key(|(s, e, _)| (*s, *e));
    let extra: usize = edits.iter().map(|e| e.2.len()).sum();
    let mut out = Vec::with_capacity(body.len().saturating_add(extra));
    let mut at = 0;
    for &&(start, end, with) in &sorted {
        if start < at || end < start || end > body.len() {
            return None;
        }
        out.extend_from_slice(body.get(at..start)?);
        out.extend_from_slice(with);
        at = end;
    }
    out.extend_from_slice(body.get(at..)?);
    Some(out)
}

/// What a request body asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Facts {
    /// A complete JSON object, nothing after it.
    pub object: bool,
    /// `stream` is truthy (the server streams, or refuses the request).
    pub stream: bool,
    /// The client asked for usage itself (`stream_options.include_usage` true).
    pub asked_usage: bool,
    pub has_stream_options: bool,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub max_output_tokens: Option<u64>,
    /// `n` / `best_of`, at least 1 (not capped: the server does not cap them either).
    pub choices: u64,
}

impl Facts {
    /// A streamed answer of this body would carry no usage unless the filter asks.
    pub fn needs_usage(&self) -> bool {
        self.object && self.stream && !self.asked_usage
    }

    /// The completion tokens the request may cost: its limit for `route` (or
    /// `default_max`) times its choices.
    pub fn completion_budget(&self, route: Route, default_max: u64) -> u64 {
        if !route.generates() {
            return 0;
        }
        let max = match route {
            // `max_completion_tokens or max_tokens`, as the server (Python) reads them: a 0
            // falls through.
            Route::ChatCompletions => self.max_completion_tokens.filter(|&n| n > 0).or(self.max_tokens),
            Route::Responses => self.max_output_tokens,
            _ => self.max_tokens,
        };
        max.unwrap_or(default_max).saturating_mul(self.choices.max(1))
    }
}

/// The prompt tokens a body of `bytes` bytes may hold, at `bytes_per_token` (rounded up).
pub fn prompt_estimate(bytes: u64, bytes_per_token: u64) -> u64 {
    bytes.div_ceil(bytes_per_token.max(1))
}

#[cfg(test)]
mod tests {
    // Under wasm-bindgen-test the same tests run compiled to wasm32 (see `make test-wasm`).
    use super::*;
    use serde_json::{json, Map, Value};
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn scan_split(body: &[u8], at: usize) -> BodyScan {
        let mut s = BodyScan::new();
        let (a, b) = body.split_at(at.min(body.len()));
        s.feed(a);
        s.feed(b);
        s
    }

    /// Scans whole, byte by byte and cut at every offset: the same facts and rewrite.
    fn scan_all_ways(body: &[u8]) -> (Facts, Option<Vec<u8>>) {
        let mut whole = BodyScan::new();
        whole.feed(body);
        let want = (whole.facts(), whole.rewrite_whole(body));
        for at in 0..=body.len() {
            let s = scan_split(body, at);
            assert_eq!((s.facts(), s.rewrite_whole(body)), want, "cut at {at}: {}", String::from_utf8_lossy(body));
        }
        let mut bytes = BodyScan::new();
        for b in body.chunks(1) {
            bytes.feed(b);
        }
        assert_eq!((bytes.facts(), bytes.rewrite_whole(body)), want, "byte at a time");
        want
    }

    /// UTF-16 and UTF-32 bodies as Python's `json.detect_encoding` tells them, however
    /// the body is cut into chunks; UTF-8 (with or without its byte order mark) is not.
    #[test]
    fn bodies_in_utf16_or_utf32_are_told_apart() {
        let text = r#"{"stream":true,"max_tokens":30000}"#;
        let utf16 = |le: bool| -> Vec<u8> {
            text.encode_utf16().flat_map(|u| if le { u.to_le_bytes() } else { u.to_be_bytes() }).collect()
        };
        let utf32 = |le: bool| -> Vec<u8> {
            text.chars()
                .flat_map(|c| if le { u32::from(c).to_le_bytes() } else { u32::from(c).to_be_bytes() })
                .collect()
        };
        let with_bom = |bom: &[u8], body: Vec<u8>| [bom.to_vec(), body].concat();
        let cases: [(&str, Vec<u8>, bool); 9] = [
            ("utf-8", text.as_bytes().to_vec(), false),
            ("utf-8 with BOM", with_bom(&[0xEF, 0xBB, 0xBF], text.as_bytes().to_vec()), false),
            ("utf-8, whitespace first", format!(" \n{text}").into_bytes(), false),
            ("utf-16le", utf16(true), true),
            ("utf-16be", utf16(false), true),
            ("utf-16le with BOM", with_bom(&[0xFF, 0xFE], utf16(true)), true),
            ("utf-16be with BOM", with_bom(&[0xFE, 0xFF], utf16(false)), true),
            ("utf-32le", utf32(true), true),
            ("utf-32be", utf32(false), true),
        ];
        for (name, body, foreign) in cases {
            for at in 0..=body.len().min(6) {
                let scan = scan_split(&body, at);
                assert_eq!(scan.foreign_encoding(), foreign, "{name}, cut at {at}");
            }
            assert!(!BodyScan::new().foreign_encoding());
        }
    }

    /// Parses the members that matter with serde's derive, which refuses duplicate keys.
    fn strict(bytes: &[u8]) -> Result<(), serde_json::Error> {
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        struct Options {
            include_usage: Option<Value>,
        }
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        struct Body {
            stream_options: Option<Options>,
        }
        serde_json::from_slice::<Body>(bytes).map(|_| ())
    }

    fn parse(bytes: &[u8]) -> Map<String, Value> {
        serde_json::from_slice(bytes).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(bytes)))
    }

    #[test]
    fn routes() {
        let cases = [
            ("/v1/chat/completions", Route::ChatCompletions),
            ("/v1/chat/completions?x=1", Route::ChatCompletions),
            ("/v1/chat/completions/", Route::ChatCompletions),
            ("//v1//chat///completions", Route::ChatCompletions),
            ("/v1/chat/%63ompletions", Route::ChatCompletions),
            ("/v1/chat%2Fcompletions", Route::ChatCompletions),
            ("/v1/CHAT/Completions", Route::ChatCompletions),
            ("/v1/x/../chat/./completions", Route::ChatCompletions),
            ("/ns/model/v1/chat/completions", Route::ChatCompletions),
            ("/v1/completions", Route::Completions),
            ("/v1/responses", Route::Responses),
            ("/v1/messages", Route::Messages),
            ("/v1/embeddings", Route::Embeddings),
            ("/v1/models", Route::Other),
            ("/v1/chat/completions/extra", Route::Other),
            ("/v1/chat/completions;x", Route::Other),
            ("/v1/chat/%2563ompletions", Route::Other),
            ("/v1/chat/completions/..", Route::Other),
            ("", Route::Other),
            ("%", Route::Other),
        ];
        for (path, want) in cases {
            assert_eq!(route_of(path), want, "{path}");
        }
        assert!(Route::ChatCompletions.forces_usage() && Route::Completions.forces_usage());
        assert!(!Route::Responses.forces_usage() && !Route::Other.is_inference());
    }

    #[test]
    fn truthiness_follows_python_and_pydantic() {
        // (raw value, python truthy, pydantic true)
        let cases = [
            ("true", true, true),
            ("false", false, false),
            ("null", false, false),
            ("1", true, true),
            ("1.0", true, true),
            ("2", true, false),
            ("0", false, false),
            ("-0", false, false),
            ("0.0", false, false),
            ("1e-400", false, false),
            ("NaN", true, false),
            ("Infinity", true, false),
            (r#""""#, false, false),
            (r#""false""#, true, false),
            (r#""yes""#, true, true),
            (r#""TRUE""#, true, true),
            (r#""\u0074rue""#, true, true),
            ("[]", false, false),
            ("[ ]", false, false),
            ("[0]", true, false),
            ("{}", false, false),
            (r#"{"a":1}"#, true, false),
        ];
        for (raw, truthy, pyd) in cases {
            let mut r = Raw::default();
            r.push(raw.as_bytes());
            assert_eq!((r.truthy(), r.pydantic_true()), (truthy, pyd), "{raw}");
        }
        let uints = [
            ("12", Some(12)),
            ("12.0", Some(12)),
            (r#""12""#, Some(12)),
            ("-1", None),
            ("1.5", None),
            ("null", None),
            ("18446744073709551615", Some(u64::MAX)),
            ("18446744073709551616", Some(u64::MAX)),
            ("1e400", None),
        ];
        for (raw, want) in uints {
            let mut r = Raw::default();
            r.push(raw.as_bytes());
            assert_eq!(r.uint(), want, "{raw}");
        }
    }

    /// Every way of writing "stream, no usage asked": the rewrite makes the server report
    /// usage, keeps every other member, and never grows the body by more than MAX_GROWTH.
    #[test]
    fn rewrites_force_include_usage() {
        // (name, body, rewritten?)
        let cases: &[(&str, &str, bool)] = &[
            ("no stream_options", r#"{"model":"m","stream":true}"#, true),
            ("empty stream_options", r#"{"stream":true,"stream_options":{}}"#, true),
            ("include_usage false", r#"{"stream_options":{"include_usage":false},"stream":true}"#, true),
            ("include_usage string false", r#"{"stream":true,"stream_options":{"include_usage":"no"}}"#, true),
            ("stream_options null", r#"{"stream":true,"stream_options":null}"#, true),
            ("stream_options array", r#"{"stream":true,"stream_options":[1,2]}"#, true),
            (
                "other options kept",
                r#"{"stream":true,"stream_options":{"continuous_usage_stats":true,"include_usage":false}}"#,
                true,
            ),
            (
                "include_usage first of three",
                r#"{"stream":true,"stream_options":{"include_usage":false,"a":1,"b":[2,{"c":"}"}]}}"#,
                true,
            ),
            (
                "duplicate include_usage, last true wins",
                r#"{"stream":true,"stream_options":{"include_usage":true,"include_usage":false}}"#,
                true,
            ),
            (
                "duplicate stream_options, last false",
                r#"{"stream_options":{"include_usage":true},"stream":true,"stream_options":{"include_usage":false},"x":1}"#,
                true,
            ),
            ("escaped keys", r#"{"str\u0065am":true,"stream\u005foptions":{"include\u005fusage":false}}"#, true),
            ("stream as 1", r#"{"stream":1}"#, true),
            ("stream as yes", r#"{"stream":"yes"}"#, true),
            ("duplicate stream, last true", r#"{"stream":false,"stream":true}"#, true),
            ("whitespace everywhere", " \n{ \"stream\" : true , \"stream_options\" : { } }\n ", true),
            ("bom", "\u{FEFF}{\"stream\":true}", true),
            ("unicode prompt", r#"{"messages":[{"role":"user","content":"h\u00e9llo \" } ✓"}],"stream":true}"#, true),
            ("asked for usage", r#"{"stream":true,"stream_options":{"include_usage":true}}"#, false),
            ("asked with 1", r#"{"stream":true,"stream_options":{"include_usage":1}}"#, false),
            (
                "duplicate stream_options, last true",
                r#"{"stream":true,"stream_options":{},"stream_options":{"include_usage":true}}"#,
                false,
            ),
            ("not streaming", r#"{"model":"m","stream":false}"#, false),
            ("no stream", r#"{"model":"m"}"#, false),
            ("duplicate stream, last false", r#"{"stream":true,"stream":false}"#, false),
            ("stream 0", r#"{"stream":0}"#, false),
            ("array", r#"[{"stream":true}]"#, false),
            ("truncated", r#"{"stream":true"#, false),
            ("trailing garbage", r#"{"stream":true} x"#, false),
            ("two objects", r#"{"stream":true}{}"#, false),
            ("empty", "", false),
            ("not json", "stream=true", false),
            ("key without value", r#"{"stream":}"#, false),
        ];
        for &(name, body, rewritten) in cases {
            let (facts, out) = scan_all_ways(body.as_bytes());
            assert_eq!(out.is_some(), rewritten, "{name}: {facts:?}");
            let Some(out) = out else { continue };
            assert!(out.len() <= body.len() + MAX_GROWTH, "{name}: grew {}", out.len() - body.len());
            let text = String::from_utf8(out.clone()).unwrap();
            let before = parse(body.trim_start_matches('\u{FEFF}').as_bytes());
            let after = parse(text.trim_start_matches('\u{FEFF}').as_bytes());
            assert_eq!(after["stream_options"]["include_usage"], json!(true), "{name}: {text}");
            // No duplicate key left: a strict parser (serde's derive refuses duplicates) takes it.
            strict(text.trim_start_matches('\u{FEFF}').as_bytes()).unwrap_or_else(|e| panic!("{name}: {e}: {text}"));
            for (k, v) in &before {
                if k != "stream_options" {
                    assert_eq!(after.get(k), Some(v), "{name}: member {k} kept");
                }
            }
            if let Some(Value::Object(opts)) = before.get("stream_options") {
                for (k, v) in opts {
                    if k != "include_usage" {
                        assert_eq!(after["stream_options"].get(k), Some(v), "{name}: option {k} kept");
                    }
                }
            }
            let mut again = BodyScan::new();
            again.feed(&out);
            assert!(again.facts().asked_usage && again.rewrite_whole(&out).is_none(), "{name}: idempotent");
        }
    }

    #[test]
    fn python_only_json_is_still_read() {
        // Python's json takes NaN and Infinity; the rewrite leaves them as they are.
        let body = br#"{"stream":true,"temperature":NaN,"top_p":-Infinity}"#;
        let (facts, out) = scan_all_ways(body);
        assert!(facts.needs_usage());
        let out = String::from_utf8(out.unwrap()).unwrap();
        assert_eq!(
            out,
            r#"{"stream_options":{"include_usage":true},"stream":true,"temperature":NaN,"top_p":-Infinity}"#
        );
    }

    #[test]
    fn the_tail_insertion_overrides_what_went_before() {
        let cases = [
            (r#"{"messages":[],"stream":true}"#, true),
            (r#"{"stream":true,"stream_options":{"include_usage":false}}  "#, true),
            (r#"{"stream":true,"stream_options":{"include_usage":true}}"#, false),
            (r#"{"stream":false}"#, false),
        ];
        for (body, rewritten) in cases {
            let body = body.as_bytes();
            // The first bytes went upstream; the tail from the closing brace is held.
            let close = body.iter().rposition(|&b| b == b'}').unwrap();
            for base in [0, close.saturating_sub(3), close] {
                let s = scan_split(body, base);
                let out = s.rewrite_tail(&body[base..], base);
                assert_eq!(out.is_some(), rewritten, "{}", String::from_utf8_lossy(body));
                if let Some(tail) = out {
                    assert_eq!(tail.len(), body.len() - base + MAX_GROWTH);
                    let whole = [&body[..base], &tail[..]].concat();
                    // Python's json: the last duplicate wins; serde_json's Value does the same.
                    assert_eq!(parse(&whole)["stream_options"], json!({"include_usage": true}));
                }
            }
        }
        // The closing brace already went upstream: nothing can be inserted.
        let body = br#"{"stream":true}"#;
        let s = scan_split(body, body.len());
        assert_eq!(s.rewrite_tail(b"", body.len()), None);
    }

    #[test]
    fn many_stream_options_members_fall_back_to_the_tail() {
        let mut body = String::from(r#"{"stream":true"#);
        for _ in 0..(MAX_RECORDED + 2) {
            body.push_str(r#","stream_options":{}"#);
        }
        body.push('}');
        let (_, out) = scan_all_ways(body.as_bytes());
        let out = out.unwrap();
        assert_eq!(out.len(), body.len() + MAX_GROWTH);
        assert_eq!(parse(&out)["stream_options"], json!({"include_usage": true}));
    }

    #[test]
    fn facts_for_estimates() {
        // Values longer than the scanner keeps (pydantic reads them: 30000.0, 7.0).
        let long_max_tokens = format!(r#"{{"max_tokens":30000.{}}}"#, "0".repeat(80));
        let long_n = format!(r#"{{"n":7.{}}}"#, "0".repeat(80));
        // (body, route, default max, completion budget)
        let cases = [
            (r#"{"max_tokens":5}"#, Route::ChatCompletions, 100, 5),
            (r#"{"max_tokens":5,"max_completion_tokens":7}"#, Route::ChatCompletions, 100, 7),
            (r#"{"max_completion_tokens":null,"max_tokens":5}"#, Route::ChatCompletions, 100, 5),
            (r#"{}"#, Route::ChatCompletions, 100, 100),
            (r#"{"max_tokens":"6","n":3}"#, Route::Completions, 100, 18),
            (r#"{"max_tokens":6,"n":2,"best_of":4}"#, Route::Completions, 100, 24),
            (r#"{"n":100000}"#, Route::Completions, 1, 100_000),
            (r#"{"max_completion_tokens":0,"max_tokens":30000}"#, Route::ChatCompletions, 100, 30_000),
            (r#"{"max_completion_tokens":0}"#, Route::ChatCompletions, 100, 100),
            (r#"{"max_tokens":99999999999999999999}"#, Route::ChatCompletions, 100, u64::MAX),
            (r#"{"max_tokens":1e300}"#, Route::ChatCompletions, 100, u64::MAX),
            (&long_max_tokens, Route::ChatCompletions, 100, u64::MAX),
            (&long_n, Route::Completions, 5, u64::MAX),
            (r#"{"max_output_tokens":9,"max_tokens":1}"#, Route::Responses, 100, 9),
            (r#"{"max_tokens":9}"#, Route::Messages, 100, 9),
            (r#"{"max_tokens":9}"#, Route::Embeddings, 100, 0),
            (r#"{"max_tokens":-3}"#, Route::ChatCompletions, 100, 100),
            (r#"{"max_tokens":5,"max_tokens":8}"#, Route::ChatCompletions, 100, 8),
            (r#"{"m\u0061x_tokens":5}"#, Route::ChatCompletions, 100, 5),
            (r#"{"x":{"max_tokens":5}}"#, Route::ChatCompletions, 100, 100),
            (r#"not json"#, Route::ChatCompletions, 100, 100),
        ];
        for (body, route, default, want) in cases {
            let (facts, _) = scan_all_ways(body.as_bytes());
            assert_eq!(facts.completion_budget(route, default), want, "{body}");
        }
        assert_eq!(prompt_estimate(0, 4), 0);
        assert_eq!(prompt_estimate(9, 4), 3);
        assert_eq!(prompt_estimate(9, 0), 9);
    }

    #[test]
    fn large_bodies_scan_in_constant_memory() {
        let content = "x\\\"y ".repeat(50_000);
        let body = format!(r#"{{"messages":[{{"role":"user","content":"{content}"}}],"stream":true,"max_tokens":3}}"#);
        let mut s = BodyScan::new();
        for piece in body.as_bytes().chunks(16 * 1024 + 7) {
            s.feed(piece);
        }
        let facts = s.facts();
        assert!(facts.needs_usage());
        assert_eq!(facts.max_tokens, Some(3));
        assert!(s.values.iter().flatten().all(|r| r.bytes.len() <= VALUE_RAW_MAX));
        let out = s.rewrite_whole(body.as_bytes()).unwrap();
        assert_eq!(parse(&out)["stream_options"]["include_usage"], json!(true));
    }

    #[test]
    fn member_deletion_keeps_commas_valid() {
        // Members of `{"a":1,"b":2,"c":3}` and which to remove → the object left.
        let body = br#"{"a":1,"b":2,"c":3}"#;
        let spans = [(1, 6), (7, 12), (13, 18)];
        let cases = [
            ([false, false, false], r#"{"a":1,"b":2,"c":3}"#),
            ([true, false, false], r#"{"b":2,"c":3}"#),
            ([false, true, false], r#"{"a":1,"c":3}"#),
            ([false, false, true], r#"{"a":1,"b":2}"#),
            ([true, true, false], r#"{"c":3}"#),
            ([false, true, true], r#"{"a":1}"#),
            ([true, false, true], r#"{"b":2}"#),
            ([true, true, true], r#"{}"#),
        ];
        for (remove, want) in cases {
            let edits: Vec<(usize, usize, &[u8])> =
                member_deletions(&spans, &remove).into_iter().map(|(s, e)| (s, e, &b""[..])).collect();
            let out = splice(body, &edits).unwrap();
            assert_eq!(String::from_utf8(out).unwrap(), want, "{remove:?}");
        }
        assert_eq!(splice(b"abc", &[(1, 2, b"x"), (1, 3, b"y")]), None, "overlap");
    }
}
