//! Token usage read from upstream LLM responses, incrementally and in bounded memory.
//!
//! The filter must return `Continue` for every response body chunk: a `Pause` makes
//! Envoy buffer the whole response, which stops SSE streaming and turns large bodies
//! into 500s. So it only reads copies of chunks, cut at any byte (mid-line, mid-string,
//! mid-UTF-8 character, between `\r` and `\n`).
//!
//! Wasm memory never shrinks, and bodies can be large: a single Responses API
//! `response.completed` event repeats the whole generated text. So nothing is buffered
//! whole. A byte-level JSON scanner tracks strings, escapes and nesting, reads object
//! keys at the top level (and one level into `message`/`response`), and copies only the
//! raw bytes of `usage` and `model` values, each capped; serde_json then parses those
//! few bytes. SSE `data:` lines stream through the same scanner, reset per event, so an
//! SSE stream costs constant memory plus the capped captures.
//!
//! Most SSE events cannot change the result: once the model is known, an event whose
//! data holds no `"usage"` key opening an object (OpenAI's token chunks carry
//! `"usage":null`) is framed but not scanned (see [`skippable_data_line`]).
//!
//! Usage in a stream is cumulative: later values replace earlier ones field by field,
//! which also merges Anthropic's `message_start` (input) with `message_delta` (output).

use memchr::{memchr2, memchr_iter};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use std::fmt;

/// Token counts of one response; fields the upstream did not report are 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    pub reasoning_tokens: u64,
}

/// How a response body is framed, from its `content-type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Json,
    Sse,
    Other,
}

impl BodyKind {
    /// `application/json` and `application/*+json` are JSON, `text/event-stream` is SSE
    /// (parameters and ASCII case ignored); anything else, or no header, is `Other`.
    pub fn from_content_type(ct: Option<&str>) -> BodyKind {
        let Some(ct) = ct else {
            return BodyKind::Other;
        };
        let media = ct.split(';').next().unwrap_or_default().trim();
        if media.eq_ignore_ascii_case("text/event-stream") {
            return BodyKind::Sse;
        }
        let b = media.as_bytes();
        let is_app = b.get(..12).is_some_and(|p| p.eq_ignore_ascii_case(b"application/"));
        let json_suffix = b
            .len()
            .checked_sub(5)
            .filter(|&at| at > 12)
            .and_then(|at| b.get(at..))
            .is_some_and(|s| s.eq_ignore_ascii_case(b"+json"));
        if media.eq_ignore_ascii_case("application/json") || (is_app && json_suffix) {
            BodyKind::Json
        } else {
            BodyKind::Other
        }
    }
}

/// Default cap on one captured `usage` value.
pub const DEFAULT_MAX_CARRY: usize = 64 * 1024;

/// Cap on a captured `model` value (raw JSON string); longer names are ignored.
const MODEL_MAX: usize = 256;
/// Longest key we match ("response").
const KEY_MAX: usize = 8;

/// An object key as a JSON scanner reads it, up to `N` bytes, in fixed memory: a longer
/// key (or one marked with [`KeyBuf::spoil`], e.g. escaped) matches nothing. Shared by
/// the response scanner here and the request scanner (`request`).
#[derive(Debug, Clone)]
pub(crate) struct KeyBuf<const N: usize> {
    bytes: [u8; N],
    len: usize,
    over: bool,
}

impl<const N: usize> KeyBuf<N> {
    pub(crate) fn new() -> Self {
        KeyBuf { bytes: [0; N], len: 0, over: false }
    }

    pub(crate) fn clear(&mut self) {
        self.len = 0;
        self.over = false;
    }

    pub(crate) fn push(&mut self, more: &[u8]) {
        let end = self.len.saturating_add(more.len());
        match self.bytes.get_mut(self.len..end) {
            Some(slot) => {
                slot.copy_from_slice(more);
                self.len = end;
            }
            None => self.over = true,
        }
    }

    pub(crate) fn spoil(&mut self) {
        self.over = true;
    }

    /// The key, or None when it was too long or spoiled.
    pub(crate) fn get(&self) -> Option<&[u8]> {
        if self.over {
            None
        } else {
            self.bytes.get(..self.len)
        }
    }
}
/// Longest SSE field name we match (a UTF-8 BOM plus "data").
const NAME_MAX: usize = 7;
const DONE: &[u8; 6] = b"[DONE]";

/// Incremental usage reader for one response body. Feed it every chunk, then `finish`.
#[derive(Debug)]
pub struct UsageParser {
    kind: BodyKind,
    scan: Scanner,
    sse: Sse,
    found: Found,
    bytes_seen: u64,
}

impl UsageParser {
    /// `max_carry` caps one captured `usage` value (see [`DEFAULT_MAX_CARRY`]).
    pub fn new(kind: BodyKind, max_carry: usize) -> Self {
        UsageParser { kind, scan: Scanner::new(max_carry), sse: Sse::new(), found: Found::default(), bytes_seen: 0 }
    }

    /// The straightforward parser: every SSE `data:` line goes through the scanner, lines
    /// are split byte by byte. The differential tests compare the real one against it.
    #[cfg(test)]
    fn reference(kind: BodyKind, max_carry: usize) -> Self {
        let mut p = Self::new(kind, max_carry);
        p.sse.prefilter = false;
        p
    }

    /// Reads the next chunk; chunks may be cut at any byte.
    pub fn feed(&mut self, chunk: &[u8]) {
        let n = u64::try_from(chunk.len()).unwrap_or(u64::MAX);
        self.bytes_seen = self.bytes_seen.saturating_add(n);
        match self.kind {
            BodyKind::Json => self.scan.feed(chunk, &mut self.found),
            BodyKind::Sse => self.sse.feed(chunk, &mut self.scan, &mut self.found),
            BodyKind::Other => {}
        }
    }

    /// End of body: ends a last SSE line/event that had no terminator. Values already
    /// complete were recorded as they arrived; a value cut off by the end is dropped.
    pub fn finish(&mut self) {
        if self.kind == BodyKind::Sse {
            self.sse.finish(&mut self.scan, &mut self.found);
        }
    }

    /// The latest usage seen, or `None` when no usage object was seen.
    pub fn usage(&self) -> Option<Usage> {
        self.found.usage
    }

    /// The first non-empty `model` seen.
    pub fn model(&self) -> Option<&str> {
        self.found.model.as_deref()
    }

    /// Whether an SSE `data: [DONE]` line was seen.
    pub fn done(&self) -> bool {
        self.found.done
    }

    /// `usage` values dropped because they exceeded `max_carry`.
    pub fn skipped_events(&self) -> u64 {
        self.found.skipped
    }

    pub fn bytes_seen(&self) -> u64 {
        self.bytes_seen
    }
}

/// What the scanner has found so far, across SSE events.
#[derive(Debug, Default)]
struct Found {
    usage: Option<Usage>,
    model: Option<String>,
    done: bool,
    skipped: u64,
}

impl Found {
    fn add_usage(&mut self, raw: &[u8]) {
        // `null` or a non-object fails here and is ignored.
        let Ok(u) = serde_json::from_slice::<UsageCounts>(raw) else {
            return;
        };
        let prev = self.usage.unwrap_or_default();
        self.usage = Some(Usage {
            prompt_tokens: u.prompt.or(u.input).unwrap_or(prev.prompt_tokens),
            completion_tokens: u.completion.or(u.output).unwrap_or(prev.completion_tokens),
            cached_tokens: u
                .prompt_details
                .cached
                .or(u.input_details.cached)
                .or(u.cache_read)
                .unwrap_or(prev.cached_tokens),
            reasoning_tokens: u
                .completion_details
                .reasoning
                .or(u.output_details.reasoning)
                .unwrap_or(prev.reasoning_tokens),
        });
    }

    fn add_model(&mut self, raw: &[u8]) {
        if self.model.is_some() {
            return;
        }
        if let Ok(m) = serde_json::from_slice::<String>(raw) {
            if !m.is_empty() {
                self.model = Some(m);
            }
        }
    }
}

/// The counts of one `usage` object, read in one pass without building a JSON tree (a
/// `serde_json::Value` of it was a tree of allocations per response): of duplicate keys
/// the last counts, a count that is not a non-negative integer (`12.0` accepted) is
/// absent, details that are not an object are empty; keys are compared after their
/// escapes are decoded.
#[derive(Debug, Default)]
struct UsageCounts {
    prompt: Option<u64>,
    input: Option<u64>,
    completion: Option<u64>,
    output: Option<u64>,
    cache_read: Option<u64>,
    prompt_details: Details,
    input_details: Details,
    completion_details: Details,
    output_details: Details,
}

#[derive(Debug, Default, Clone, Copy)]
struct Details {
    cached: Option<u64>,
    reasoning: Option<u64>,
}

/// The keys read in a usage object and its details; any other is skipped.
enum UsageKey {
    Prompt,
    Input,
    Completion,
    Output,
    CacheRead,
    PromptDetails,
    InputDetails,
    CompletionDetails,
    OutputDetails,
    Cached,
    Reasoning,
    Other,
}

impl<'de> Deserialize<'de> for UsageKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = UsageKey;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, k: &str) -> Result<UsageKey, E> {
                Ok(match k {
                    "prompt_tokens" => UsageKey::Prompt,
                    "input_tokens" => UsageKey::Input,
                    "completion_tokens" => UsageKey::Completion,
                    "output_tokens" => UsageKey::Output,
                    "cache_read_input_tokens" => UsageKey::CacheRead,
                    "prompt_tokens_details" => UsageKey::PromptDetails,
                    "input_tokens_details" => UsageKey::InputDetails,
                    "completion_tokens_details" => UsageKey::CompletionDetails,
                    "output_tokens_details" => UsageKey::OutputDetails,
                    "cached_tokens" => UsageKey::Cached,
                    "reasoning_tokens" => UsageKey::Reasoning,
                    _ => UsageKey::Other,
                })
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Deserialize<'de> for UsageCounts {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = UsageCounts;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a usage object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UsageCounts, A::Error> {
                let mut u = UsageCounts::default();
                while let Some(key) = map.next_key::<UsageKey>()? {
                    let count = |map: &mut A| map.next_value::<Count>().map(|c| c.0);
                    let details = |map: &mut A| map.next_value::<Details>();
                    match key {
                        UsageKey::Prompt => u.prompt = count(&mut map)?,
                        UsageKey::Input => u.input = count(&mut map)?,
                        UsageKey::Completion => u.completion = count(&mut map)?,
                        UsageKey::Output => u.output = count(&mut map)?,
                        UsageKey::CacheRead => u.cache_read = count(&mut map)?,
                        UsageKey::PromptDetails => u.prompt_details = details(&mut map)?,
                        UsageKey::InputDetails => u.input_details = details(&mut map)?,
                        UsageKey::CompletionDetails => u.completion_details = details(&mut map)?,
                        UsageKey::OutputDetails => u.output_details = details(&mut map)?,
                        UsageKey::Cached | UsageKey::Reasoning | UsageKey::Other => {
                            map.next_value::<Count>()?;
                        }
                    }
                }
                Ok(u)
            }
        }
        d.deserialize_map(V)
    }
}

impl<'de> Deserialize<'de> for Details {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Details;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Details, A::Error> {
                let mut out = Details::default();
                while let Some(key) = map.next_key::<UsageKey>()? {
                    match key {
                        UsageKey::Cached => out.cached = map.next_value::<Count>()?.0,
                        UsageKey::Reasoning => out.reasoning = map.next_value::<Count>()?.0,
                        _ => {
                            map.next_value::<Count>()?;
                        }
                    }
                }
                Ok(out)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Details, A::Error> {
                while seq.next_element::<Count>()?.is_some() {}
                Ok(Details::default())
            }
            fn visit_u64<E>(self, _: u64) -> Result<Details, E> {
                Ok(Details::default())
            }
            fn visit_i64<E>(self, _: i64) -> Result<Details, E> {
                Ok(Details::default())
            }
            fn visit_f64<E>(self, _: f64) -> Result<Details, E> {
                Ok(Details::default())
            }
            fn visit_str<E>(self, _: &str) -> Result<Details, E> {
                Ok(Details::default())
            }
            fn visit_bool<E>(self, _: bool) -> Result<Details, E> {
                Ok(Details::default())
            }
            fn visit_unit<E>(self) -> Result<Details, E> {
                Ok(Details::default())
            }
        }
        d.deserialize_any(V)
    }
}

/// A token count: a non-negative integer (`12.0` accepted), any other value absent.
/// Values that are not read are read as one too and dropped: unlike `IgnoredAny`, this
/// checks them as a JSON tree does (numbers in range, strings valid, nesting within
/// serde_json's limit), so an object the tree refused is still refused.
struct Count(Option<u64>);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Count;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_u64<E>(self, v: u64) -> Result<Count, E> {
                Ok(Count(Some(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Count, E> {
                Ok(Count(u64::try_from(v).ok()))
            }
            fn visit_f64<E>(self, f: f64) -> Result<Count, E> {
                Ok(Count((f >= 0.0 && f.fract() == 0.0 && f < 1.8e19).then_some(f as u64)))
            }
            fn visit_str<E>(self, _: &str) -> Result<Count, E> {
                Ok(Count(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Count, E> {
                Ok(Count(None))
            }
            fn visit_unit<E>(self) -> Result<Count, E> {
                Ok(Count(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Count, A::Error> {
                while seq.next_element::<Count>()?.is_some() {}
                Ok(Count(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Count, A::Error> {
                while map.next_entry::<Count, Count>()?.is_some() {}
                Ok(Count(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// Where the scanner is, relative to the object whose keys it reads (at depth `level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pos {
    /// Before the top-level value.
    Start,
    ExpectKey,
    InKey,
    AfterKey,
    ExpectValue,
    /// Inside or after a value we skip or capture; `,` or `}` comes next at `level`.
    AfterValue,
    /// Top-level value finished or not an object: the rest is ignored.
    Done,
}

/// What the value of the key just read means to us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Skip,
    Usage,
    Model,
    /// `message` / `response`: read the keys of this object too.
    Nest,
}

#[derive(Debug, Clone, Copy)]
struct Capture {
    target: Target,
    /// Depth at which the value started; an object capture ends on returning to it.
    depth: u32,
    over: bool,
}

/// Byte-level JSON scanner. Needs no stack: keys matter only at depth 1 and inside a
/// depth-2 `message`/`response` object, both tracked by `level`.
#[derive(Debug)]
struct Scanner {
    max_carry: usize,
    depth: u32,
    level: u32,
    pos: Pos,
    target: Target,
    /// The key being read; unmatchable when too long or escaped.
    key: KeyBuf<KEY_MAX>,
    in_str: bool,
    esc: bool,
    cap: Option<Capture>,
    buf: Vec<u8>,
}

impl Scanner {
    fn new(max_carry: usize) -> Self {
        Scanner {
            max_carry,
            depth: 0,
            level: 1,
            pos: Pos::Start,
            target: Target::Skip,
            key: KeyBuf::new(),
            in_str: false,
            esc: false,
            cap: None,
            buf: Vec::new(),
        }
    }

    /// Ready for a new JSON value; keeps the capture buffer's allocation.
    fn reset(&mut self) {
        self.depth = 0;
        self.level = 1;
        self.pos = Pos::Start;
        self.target = Target::Skip;
        self.key.clear();
        self.in_str = false;
        self.esc = false;
        self.cap = None;
        self.buf.clear();
    }

    fn feed(&mut self, input: &[u8], found: &mut Found) {
        // Captured bytes are copied per slice, from `from` in this chunk.
        let mut from = 0;
        let mut i = 0;
        while self.pos != Pos::Done {
            let Some(&b) = input.get(i) else { break };
            if self.in_str {
                i = self.string_bytes(input, i, from, found);
                continue;
            }
            let at_level = self.depth == self.level;
            match b {
                b'"' => {
                    self.in_str = true;
                    match self.pos {
                        Pos::ExpectKey if at_level => {
                            self.pos = Pos::InKey;
                            self.key.clear();
                        }
                        Pos::ExpectValue if at_level => {
                            if self.target == Target::Model {
                                self.start_capture(Target::Model);
                                from = i;
                            }
                            self.pos = Pos::AfterValue;
                        }
                        Pos::Start => self.pos = Pos::Done,
                        _ => {}
                    }
                }
                b'{' | b'[' => {
                    let at_value = at_level && self.pos == Pos::ExpectValue;
                    if self.pos == Pos::Start {
                        if b == b'{' {
                            self.depth = 1;
                            self.pos = Pos::ExpectKey;
                        } else {
                            self.pos = Pos::Done;
                        }
                    } else if at_value && b == b'{' && self.target == Target::Nest {
                        self.depth = self.depth.saturating_add(1);
                        self.level = self.depth;
                        self.pos = Pos::ExpectKey;
                    } else {
                        if at_value {
                            if b == b'{' && self.target == Target::Usage {
                                self.start_capture(Target::Usage);
                                from = i;
                            }
                            self.pos = Pos::AfterValue;
                        }
                        self.depth = self.depth.saturating_add(1);
                    }
                }
                b'}' | b']' => {
                    if self.depth == 0 {
                        self.pos = Pos::Done;
                    } else {
                        self.depth -= 1;
                        if self.cap.is_some_and(|c| c.target == Target::Usage && c.depth == self.depth) {
                            self.end_capture(input.get(from..=i).unwrap_or_default(), found);
                        }
                        if self.depth < self.level {
                            // The object whose keys we read has closed.
                            if self.depth == 0 {
                                self.pos = Pos::Done;
                            } else {
                                self.level = self.depth;
                                self.pos = Pos::AfterValue;
                            }
                        }
                    }
                }
                b':' => {
                    if at_level && self.pos == Pos::AfterKey {
                        self.pos = Pos::ExpectValue;
                    }
                }
                b',' => {
                    if at_level {
                        self.pos = Pos::ExpectKey;
                    }
                }
                b' ' | b'\t' | b'\n' | b'\r' => {}
                // Lets a UTF-8 BOM pass before the top-level value.
                _ if self.pos == Pos::Start && b >= 0x80 => {}
                _ => {
                    if self.pos == Pos::Start {
                        self.pos = Pos::Done;
                    } else if at_level && self.pos == Pos::ExpectValue {
                        self.pos = Pos::AfterValue;
                    }
                }
            }
            i += 1;
        }
        if self.cap.is_some() {
            self.append(input.get(from..).unwrap_or_default(), found);
        }
    }

    /// Consumes string bytes from `i` up to and including the next quote or backslash;
    /// returns the next index.
    fn string_bytes(&mut self, input: &[u8], i: usize, from: usize, found: &mut Found) -> usize {
        let in_key = self.pos == Pos::InKey;
        if self.esc {
            self.esc = false;
            return i.saturating_add(1);
        }
        let rest = input.get(i..).unwrap_or_default();
        let n = memchr2(b'"', b'\\', rest).unwrap_or(rest.len());
        if in_key {
            self.key.push(rest.get(..n).unwrap_or_default());
        }
        let end = i.saturating_add(n);
        match input.get(end) {
            Some(b'\\') => {
                self.esc = true;
                if in_key {
                    self.key.spoil();
                }
            }
            Some(_) => {
                self.in_str = false;
                if in_key {
                    self.target = self.key_target(found.model.is_none());
                    self.pos = Pos::AfterKey;
                } else if self.cap.is_some_and(|c| c.target == Target::Model) {
                    self.end_capture(input.get(from..=end).unwrap_or_default(), found);
                }
            }
            None => {}
        }
        end.saturating_add(1)
    }

    fn key_target(&self, want_model: bool) -> Target {
        match self.key.get() {
            Some(b"usage") => Target::Usage,
            Some(b"model") if want_model => Target::Model,
            Some(b"message" | b"response") if self.level == 1 => Target::Nest,
            _ => Target::Skip,
        }
    }

    fn start_capture(&mut self, target: Target) {
        self.buf.clear();
        self.cap = Some(Capture { target, depth: self.depth, over: false });
    }

    fn append(&mut self, bytes: &[u8], found: &mut Found) {
        let Some(cap) = self.cap.as_mut() else { return };
        if cap.over {
            return;
        }
        let limit = match cap.target {
            Target::Model => self.max_carry.min(MODEL_MAX),
            _ => self.max_carry,
        };
        let need = self.buf.len().saturating_add(bytes.len());
        if need > limit {
            cap.over = true;
            self.buf.clear();
            if cap.target == Target::Usage {
                found.skipped = found.skipped.saturating_add(1);
            }
            return;
        }
        if need > self.buf.capacity() {
            // Grow by doubling, but never past the cap.
            let target = need.max(self.buf.capacity().saturating_mul(2)).min(limit);
            self.buf.reserve_exact(target.saturating_sub(self.buf.len()));
        }
        self.buf.extend_from_slice(bytes);
    }

    fn end_capture(&mut self, tail: &[u8], found: &mut Found) {
        self.append(tail, found);
        if let Some(cap) = self.cap.take() {
            if !cap.over {
                match cap.target {
                    Target::Usage => found.add_usage(&self.buf),
                    Target::Model => found.add_model(&self.buf),
                    Target::Skip | Target::Nest => {}
                }
            }
        }
        self.buf.clear();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// Nothing read yet on this line; an end of line here ends the event.
    Start,
    Name,
    Data,
    Ignore,
}

/// SSE framing: splits lines, streams `data:` values into the scanner, and resets the
/// scanner at each blank line. Holds no event data, only the first bytes of a line.
#[derive(Debug)]
struct Sse {
    line: Line,
    name: [u8; NAME_MAX],
    name_len: usize,
    first_line: bool,
    /// The last line ended with `\r`: a following `\n` belongs to it.
    after_cr: bool,
    /// One space after `data:` is not part of the value.
    skip_space: bool,
    has_data: bool,
    /// First bytes of the current data value, to spot `[DONE]`.
    val: [u8; DONE.len()],
    val_len: usize,
    /// This event's data is framed but not fed to the scanner: it cannot change the
    /// result (see [`skippable_data_line`]).
    mute: bool,
    /// Skip events that cannot change the result; off only for the reference parser of
    /// the differential tests.
    prefilter: bool,
    /// The start of a `data:` line cut by the end of a chunk before the prefilter could
    /// decide on it (at most `CARRY_MAX + 2` bytes).
    pending: Vec<u8>,
    /// Data lines the prefilter kept from the scanner.
    #[cfg(test)]
    muted: u64,
}

impl Sse {
    fn new() -> Self {
        Sse {
            line: Line::Start,
            name: [0; NAME_MAX],
            name_len: 0,
            first_line: true,
            after_cr: false,
            skip_space: false,
            has_data: false,
            val: [0; DONE.len()],
            val_len: 0,
            mute: false,
            prefilter: true,
            pending: Vec::new(),
            #[cfg(test)]
            muted: 0,
        }
    }

    fn feed(&mut self, mut input: &[u8], scan: &mut Scanner, found: &mut Found) {
        loop {
            if self.pending.is_empty() {
                self.feed_lines(input, scan, found);
                return;
            }
            // A held line start. Where its line ends, counted in `pending` then `input`:
            let held_len = self.pending.len();
            let eol = memchr2(b'\n', b'\r', &self.pending)
                .or_else(|| memchr2(b'\n', b'\r', input).map(|at| held_len.saturating_add(at)))
                .filter(|&at| at < CARRY_MAX);
            let Some(eol) = eol else {
                if held_len.saturating_add(input.len()) <= CARRY_MAX {
                    self.pending.extend_from_slice(input);
                    return;
                }
                // Too long to hold: scanned the slow way.
                let held = std::mem::take(&mut self.pending);
                self.replay(&held, Some(false), scan, found);
                self.reuse(held);
                self.feed_lines(input, scan, found);
                return;
            };
            // Enough to decide: the end of line, a `\n` after `\r`, the next line's first byte.
            let want = eol.saturating_add(3).saturating_sub(held_len).min(input.len());
            self.pending.extend_from_slice(input.get(..want).unwrap_or_default());
            let decision = skippable_data_line(&self.pending, found);
            if decision.is_none() && want == input.len() {
                return;
            }
            // Replay the held line through its end of line with the decision; then what
            // was held beyond it (from earlier chunks); the bytes peeked from `input` are
            // read from `input` again.
            let held = std::mem::take(&mut self.pending);
            let end = eol.saturating_add(1);
            self.replay(held.get(..end).unwrap_or_default(), decision, scan, found);
            if let Some(more) = held.get(end..held_len) {
                self.feed_lines(more, scan, found);
            }
            self.reuse(held);
            input = input.get(end.saturating_sub(held_len)..).unwrap_or_default();
        }
    }

    /// One held line (through its end of line), skipped or scanned as decided.
    fn replay(&mut self, line: &[u8], decision: Option<bool>, scan: &mut Scanner, found: &mut Found) {
        if decision == Some(true) {
            self.mute_data_line(scan, found);
            self.feed_lines(line.get(DATA.len()..).unwrap_or_default(), scan, found);
        } else {
            let prefilter = std::mem::replace(&mut self.prefilter, false);
            self.feed_lines(line, scan, found);
            self.prefilter = prefilter;
        }
    }

    /// Keeps the allocation of a replayed `pending` unless a new line start is held.
    fn reuse(&mut self, mut held: Vec<u8>) {
        if self.pending.is_empty() {
            held.clear();
            self.pending = held;
        }
    }

    /// Starts a data line that the prefilter decided to keep from the scanner.
    fn mute_data_line(&mut self, scan: &mut Scanner, found: &mut Found) {
        self.begin_data(scan, found);
        self.mute = true;
        #[cfg(test)]
        {
            self.muted += 1;
        }
    }

    /// Frames `input`. A `data:` line starting in it that the prefilter cannot decide by
    /// its end is held in `pending` (see [`Sse::feed`]) when short enough.
    fn feed_lines(&mut self, input: &[u8], scan: &mut Scanner, found: &mut Found) {
        let mut i = 0;
        while let Some(&b) = input.get(i) {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    i += 1;
                    continue;
                }
            }
            if self.line == Line::Start && b == b'd' && self.prefilter && !self.has_data {
                // The scanner is fresh (no data yet in this event).
                let rest = input.get(i..).unwrap_or_default();
                match skippable_data_line(rest, found) {
                    Some(true) => {
                        // This line is the event's only data: frame it, skip the scanner.
                        self.mute_data_line(scan, found);
                        i = i.saturating_add(DATA.len());
                        continue;
                    }
                    None if rest.len() <= CARRY_MAX => {
                        self.pending.extend_from_slice(rest);
                        return;
                    }
                    _ => {}
                }
            }
            match self.line {
                Line::Start | Line::Name => {
                    match b {
                        b'\n' | b'\r' => self.end_line(b, scan, found),
                        b':' if self.is_data() => self.begin_data(scan, found),
                        b':' => self.line = Line::Ignore,
                        _ => self.push_name(b),
                    }
                    i += 1;
                }
                Line::Data | Line::Ignore => {
                    let rest = input.get(i..).unwrap_or_default();
                    let n = self.find_eol(rest).unwrap_or(rest.len());
                    if self.line == Line::Data {
                        self.data(rest.get(..n).unwrap_or_default(), scan, found);
                    }
                    i = i.saturating_add(n);
                    if let Some(&eol) = input.get(i) {
                        self.end_line(eol, scan, found);
                        i += 1;
                    }
                }
            }
        }
    }

    fn find_eol(&self, rest: &[u8]) -> Option<usize> {
        #[cfg(test)]
        if !self.prefilter {
            // The reference parser keeps the byte loop.
            return rest.iter().position(|&c| c == b'\n' || c == b'\r');
        }
        memchr2(b'\n', b'\r', rest)
    }

    fn finish(&mut self, scan: &mut Scanner, found: &mut Found) {
        // A held line start ends here: scanned the slow way (nothing follows it), never
        // held again.
        let held = std::mem::take(&mut self.pending);
        if !held.is_empty() {
            let prefilter = std::mem::replace(&mut self.prefilter, false);
            self.feed_lines(&held, scan, found);
            self.prefilter = prefilter;
        }
        if self.line != Line::Start {
            self.end_line(b'\n', scan, found);
        }
        self.after_cr = false;
        self.dispatch(scan);
    }

    fn push_name(&mut self, b: u8) {
        match self.name.get_mut(self.name_len) {
            Some(slot) => {
                *slot = b;
                self.name_len += 1;
                self.line = Line::Name;
            }
            None => self.line = Line::Ignore,
        }
    }

    fn is_data(&self) -> bool {
        match self.name.get(..self.name_len) {
            Some(b"data") => true,
            Some(b"\xEF\xBB\xBFdata") => self.first_line,
            _ => false,
        }
    }

    fn begin_data(&mut self, scan: &mut Scanner, found: &mut Found) {
        // Data lines of one event join with "\n", which is JSON whitespace.
        if self.has_data && !self.mute {
            scan.feed(b"\n", found);
        }
        self.has_data = true;
        self.skip_space = true;
        self.val_len = 0;
        self.line = Line::Data;
    }

    fn data(&mut self, mut seg: &[u8], scan: &mut Scanner, found: &mut Found) {
        if seg.is_empty() {
            return;
        }
        if self.skip_space {
            self.skip_space = false;
            seg = seg.strip_prefix(b" ").unwrap_or(seg);
        }
        for (slot, &c) in self.val.iter_mut().skip(self.val_len).zip(seg) {
            *slot = c;
        }
        self.val_len = self.val_len.saturating_add(seg.len());
        if !self.mute {
            scan.feed(seg, found);
        }
    }

    fn end_line(&mut self, eol: u8, scan: &mut Scanner, found: &mut Found) {
        match self.line {
            Line::Start => self.dispatch(scan),
            // A bare "data" line: a data field with an empty value.
            Line::Name if self.is_data() => self.begin_data(scan, found),
            Line::Data if self.val_len == DONE.len() && &self.val == DONE => found.done = true,
            _ => {}
        }
        self.line = Line::Start;
        self.name_len = 0;
        self.first_line = false;
        self.after_cr = eol == b'\r';
    }

    fn dispatch(&mut self, scan: &mut Scanner) {
        scan.reset();
        self.has_data = false;
        self.mute = false;
    }
}

const DATA: &[u8; 5] = b"data:";
/// Longest line start held across chunks for the prefilter; longer lines are scanned.
const CARRY_MAX: usize = 4 * 1024;
const USAGE_KEY: &[u8; 7] = b"\"usage\"";
const MODEL_KEY: &[u8; 7] = b"\"model\"";

/// Whether `rest`, the input from the start of a line, holds a whole `data:` line that is
/// the whole data of its event and whose JSON cannot change what `found` holds, so the
/// scanner may skip it. The caller ensures the scanner is fresh (no data yet in this
/// event). Conservative: `Some(false)` when unsure; `None` when `rest` ends before it
/// can tell (the line goes on in the next chunk).
///
/// - The line and its end are in `rest`, and the next line, also in `rest`, is blank:
///   the event ends there, so no later data line needs the scanner's state.
/// - The scanner records a `usage` only from a key whose raw bytes are exactly `usage`
///   (an escaped key matches nothing; a key cannot span lines), i.e. from the 7 bytes
///   `"usage"`, followed by `:` and a value opening with `{`. So every `"usage"` in the
///   line must be followed (after JSON whitespace) by `,` `}` `]`, or by `:` and a value
///   that does not open with `{` (`"usage":null`). Anything else — end of line, other
///   bytes that leave a malformed key pending — counts as usage.
/// - The model is recorded only until one is known, from the 7 bytes `"model"`: while
///   none is known, a line holding them is not skipped.
fn skippable_data_line(rest: &[u8], found: &Found) -> Option<bool> {
    let Some(value) = rest.strip_prefix(DATA) else {
        // A cut `data:` may still be one.
        return if DATA.starts_with(rest) { None } else { Some(false) };
    };
    let end = memchr2(b'\n', b'\r', value)?;
    let line = value.get(..end).unwrap_or_default();
    let after = value.get(end..).unwrap_or_default();
    let next = match after {
        [b'\r', b'\n', next @ ..] | [b'\r', next @ ..] | [b'\n', next @ ..] => next,
        _ => return Some(false),
    };
    // `\r` at the very end: whether a `\n` follows is not known yet.
    if after.first() == Some(&b'\r') && next.is_empty() {
        return None;
    }
    if !matches!(next.first()?, b'\n' | b'\r') {
        return Some(false);
    }
    if found.model.is_none() && find_key(line, MODEL_KEY, b'd').next().is_some() {
        return Some(false);
    }
    Some(!may_carry_usage(line))
}

/// Whether `bytes` hold a `"usage"` key that may open an object: the only events that
/// can carry usage (the parser's prefilter, and the stripper's, `strip`). A key written
/// with escapes is not one, for the scanner neither.
pub(crate) fn may_carry_usage(bytes: &[u8]) -> bool {
    find_key(bytes, USAGE_KEY, b'g')
        .any(|at| may_open_usage(bytes.get(at.saturating_add(USAGE_KEY.len())..).unwrap_or_default()))
}

/// Where `key` starts in `line`, found by `memchr` for one of its rarer bytes (`rare`,
/// which occurs once in `key`): smaller in the wasm than `memmem`, and as fast on lines
/// this short.
fn find_key<'a>(line: &'a [u8], key: &'static [u8; 7], rare: u8) -> impl Iterator<Item = usize> + 'a {
    let offset = key.iter().position(|&c| c == rare).unwrap_or(0);
    memchr_iter(rare, line).filter_map(move |hit| {
        let at = hit.checked_sub(offset)?;
        (line.get(at..at.saturating_add(key.len()))? == key).then_some(at)
    })
}

/// Whether the bytes after a `"usage"` may make the scanner capture a usage object.
fn may_open_usage(after: &[u8]) -> bool {
    let ws = |c: &&u8| matches!(c, b' ' | b'\t' | b'\n' | b'\r');
    let mut it = after.iter().skip_while(ws);
    match it.next() {
        Some(b':') => it.find(|c| !ws(c)).is_none_or(|&c| c == b'{'),
        Some(b',' | b'}' | b']') => false,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    // Under wasm-bindgen-test the same tests run compiled to wasm32 (see `make test-wasm`).
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const fn u(prompt: u64, completion: u64, cached: u64, reasoning: u64) -> Option<Usage> {
        Some(Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            cached_tokens: cached,
            reasoning_tokens: reasoning,
        })
    }

    #[derive(Debug, PartialEq)]
    struct Out {
        usage: Option<Usage>,
        model: Option<String>,
        done: bool,
        skipped: u64,
    }

    /// Runs the parser and the reference parser (no prefilter) on the same pieces; they
    /// must agree (the differential test runs wherever `run` does).
    fn run<'a>(kind: BodyKind, max: usize, pieces: impl IntoIterator<Item = &'a [u8]>) -> Out {
        let pieces: Vec<&[u8]> = pieces.into_iter().collect();
        let got = run_one(UsageParser::new(kind, max), &pieces);
        let want = run_one(UsageParser::reference(kind, max), &pieces);
        assert_eq!(got, want, "prefiltered parser differs from the reference");
        got
    }

    fn run_one(mut p: UsageParser, pieces: &[&[u8]]) -> Out {
        let mut len = 0;
        for piece in pieces {
            p.feed(piece);
            len += piece.len() as u64;
        }
        p.finish();
        assert_eq!(p.bytes_seen(), len);
        Out { usage: p.usage(), model: p.model().map(str::to_owned), done: p.done(), skipped: p.skipped_events() }
    }

    /// Deterministic LCG, so random splits need no extra crate.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, bound: usize) -> usize {
            self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            ((self.0 >> 33) as usize) % bound
        }
    }

    /// Feeds `body` whole, cut in two at every offset, a byte at a time and in random
    /// pieces; every way must give the same result, which is returned.
    fn run_all_splits(kind: BodyKind, max: usize, body: &[u8]) -> Out {
        let whole = run(kind, max, [body]);
        for at in 0..=body.len() {
            let (a, b) = body.split_at(at);
            assert_eq!(run(kind, max, [a, b]), whole, "split at {at}");
        }
        assert_eq!(run(kind, max, body.chunks(1)), whole, "byte at a time");
        for seed in 1..=20 {
            let mut rng = Lcg(seed);
            let mut pieces = Vec::new();
            let mut rest = body;
            while !rest.is_empty() {
                let n = (rng.next(24) + 1).min(rest.len());
                let (a, b) = rest.split_at(n);
                pieces.push(a);
                rest = b;
            }
            assert_eq!(run(kind, max, pieces), whole, "seed {seed}");
        }
        whole
    }

    #[test]
    fn content_type() {
        let cases = [
            (None, BodyKind::Other),
            (Some(""), BodyKind::Other),
            (Some("application/json"), BodyKind::Json),
            (Some("application/json; charset=utf-8"), BodyKind::Json),
            (Some("Application/JSON"), BodyKind::Json),
            (Some(" application/json ;charset=UTF-8"), BodyKind::Json),
            (Some("application/problem+json"), BodyKind::Json),
            (Some("application/vnd.api+JSON; q=1"), BodyKind::Json),
            (Some("application/+json"), BodyKind::Other),
            (Some("text/plain+json"), BodyKind::Other),
            (Some("application/jsonl"), BodyKind::Other),
            (Some("application/x-ndjson"), BodyKind::Other),
            (Some("text/event-stream"), BodyKind::Sse),
            (Some("text/event-stream; charset=utf-8"), BodyKind::Sse),
            (Some("TEXT/Event-Stream"), BodyKind::Sse),
            (Some("text/plain"), BodyKind::Other),
            (Some("text/html; charset=utf-8"), BodyKind::Other),
        ];
        for (ct, want) in cases {
            assert_eq!(BodyKind::from_content_type(ct), want, "{ct:?}");
        }
    }

    const OPENAI_CHAT: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o-2024-08-06","choices":[{"index":0,"message":{"role":"assistant","content":"Report \"usage\": {\"prompt_tokens\": 999} – é ✓","refusal":null},"finish_reason":"stop"}],"usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,"prompt_tokens_details":{"cached_tokens":3,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":4,"audio_tokens":0}},"system_fingerprint":"fp_1"}"#;

    /// Name, body, usage, model, skipped.
    type JsonCase = (&'static str, &'static str, Option<Usage>, Option<&'static str>, u64);

    const JSON_CASES: &[JsonCase] = &[
        ("openai chat", OPENAI_CHAT, u(19, 10, 3, 4), Some("gpt-4o-2024-08-06"), 0),
        (
            "openai embeddings",
            r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,-0.2]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#,
            u(8, 0, 0, 0),
            Some("text-embedding-3-small"),
            0,
        ),
        (
            "responses api",
            r#"{"id":"resp_1","object":"response","status":"completed","model":"gpt-4.1","output":[{"type":"message","content":[{"type":"output_text","text":"hi","annotations":[]}]}],"usage":{"input_tokens":36,"input_tokens_details":{"cached_tokens":6},"output_tokens":87,"output_tokens_details":{"reasoning_tokens":12},"total_tokens":123}}"#,
            u(36, 87, 6, 12),
            Some("gpt-4.1"),
            0,
        ),
        (
            "anthropic messages",
            r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text","text":"usage"}],"stop_reason":"end_turn","usage":{"input_tokens":2095,"cache_creation_input_tokens":0,"cache_read_input_tokens":1800,"output_tokens":503,"service_tier":"standard"}}"#,
            u(2095, 503, 1800, 0),
            Some("claude-sonnet-4-5"),
            0,
        ),
        (
            "pretty printed, details null",
            "{\n  \"model\" : \"m\",\n  \"usage\" : {\n    \"prompt_tokens\" : 5,\n    \"completion_tokens\" : 6,\n    \"prompt_tokens_details\" : null\n  }\n}\n",
            u(5, 6, 0, 0),
            Some("m"),
            0,
        ),
        (
            "usage only nested in choices",
            r#"{"model":"m","choices":[{"message":{"content":"\"usage\":{\"prompt_tokens\":7}","usage":{"prompt_tokens":9},"model":"inner"}}],"data":{"usage":{"prompt_tokens":1}}}"#,
            None,
            Some("m"),
            0,
        ),
        (
            "usage as text values and in keys' values",
            r#"{"note":"usage","model":"usage","x":{"a":"\"usage\""},"y":["usage",{"usage":{"prompt_tokens":1}}]}"#,
            None,
            Some("usage"),
            0,
        ),
        ("usage null", r#"{"model":"m","usage":null}"#, None, Some("m"), 0),
        ("usage not an object", r#"{"usage":"n/a","model":7}"#, None, None, 0),
        ("usage empty object", r#"{"usage":{}}"#, u(0, 0, 0, 0), None, 0),
        (
            "lenient numbers",
            r#"{"usage":{"prompt_tokens":12.0,"completion_tokens":"3","prompt_tokens_details":{"cached_tokens":-1}}}"#,
            u(12, 0, 0, 0),
            None,
            0,
        ),
        (
            "escaped model and key",
            r#"{"model":"gpt-\u00e9\"x","us\u0061ge":{"prompt_tokens":1},"usage":{"prompt_tokens":2},"\"usage":{"completion_tokens":3}}"#,
            u(2, 0, 0, 0),
            Some("gpt-é\"x"),
            0,
        ),
        (
            "top-level message and usage merge",
            r#"{"message":{"model":"claude","content":[{"usage":{"input_tokens":99}}],"usage":{"input_tokens":3}},"usage":{"output_tokens":4}}"#,
            u(3, 4, 0, 0),
            Some("claude"),
            0,
        ),
        (
            "only one nesting level",
            r#"{"message":{"message":{"usage":{"input_tokens":3},"model":"deep"}},"response":"usage"}"#,
            None,
            None,
            0,
        ),
        ("error body", r#"{"error":{"message":"bad","type":"invalid_request_error"}}"#, None, None, 0),
        ("top-level array", r#"[{"usage":{"prompt_tokens":1},"model":"m"}]"#, None, None, 0),
        ("not json", "upstream connect error", None, None, 0),
        ("empty", "", None, None, 0),
        (
            "bom and trailing garbage",
            "\u{FEFF}{\"usage\":{\"prompt_tokens\":1}} {\"usage\":{\"prompt_tokens\":2}}",
            u(1, 0, 0, 0),
            None,
            0,
        ),
        (
            "truncated after usage",
            r#"{"usage":{"prompt_tokens":4,"completion_tokens":2},"choices":[{"text":"cut"#,
            u(4, 2, 0, 0),
            None,
            0,
        ),
        ("truncated inside usage", r#"{"model":"m","usage":{"prompt_tokens":4"#, None, Some("m"), 0),
    ];

    #[test]
    fn json_bodies() {
        for &(name, body, usage, model, skipped) in JSON_CASES {
            let got = run_all_splits(BodyKind::Json, DEFAULT_MAX_CARRY, body.as_bytes());
            let want = Out { usage, model: model.map(str::to_owned), done: false, skipped };
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn json_usage_over_bound_is_skipped() {
        let body = format!(r#"{{"model":"m","usage":{{"prompt_tokens":1,"pad":"{}"}},"n":1}}"#, "x".repeat(100));
        let cases = [(64, None, 1), (200, u(1, 0, 0, 0), 0)];
        for (max, usage, skipped) in cases {
            let got = run_all_splits(BodyKind::Json, max, body.as_bytes());
            assert_eq!((got.usage, got.skipped), (usage, skipped), "max {max}");
            assert_eq!(got.model.as_deref(), Some("m"));
        }
    }

    #[test]
    fn model_over_bound_is_ignored() {
        let long = "m".repeat(MODEL_MAX);
        let body = format!(r#"{{"model":"{long}","usage":{{"prompt_tokens":1}}}}"#);
        let got = run(BodyKind::Json, DEFAULT_MAX_CARRY, [body.as_bytes()]);
        assert_eq!((got.model, got.usage, got.skipped), (None, u(1, 0, 0, 0), 0));
    }

    #[test]
    fn other_kind_reads_nothing() {
        let got = run(BodyKind::Other, DEFAULT_MAX_CARRY, [OPENAI_CHAT.as_bytes()]);
        assert_eq!(got, Out { usage: None, model: None, done: false, skipped: 0 });
    }

    const OPENAI_STREAM: &str = concat!(
        "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Say \\\"usage\\\": {\\\"prompt_tokens\\\": 999} – héllo ✓ \\\\\"},\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":7,\"total_tokens\":19,\"prompt_tokens_details\":{\"cached_tokens\":4},\"completion_tokens_details\":{\"reasoning_tokens\":2}}}\n\n",
        "data: [DONE]\n\n",
    );

    const ANTHROPIC_STREAM: &str = concat!(
        "event: message_start\n",
        "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-sonnet-4-5\",\"stop_reason\":null,\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":10,\"output_tokens\":1}}}\n\n",
        "event: content_block_start\n",
        "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: ping\n",
        "data: {\"type\": \"ping\"}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"the \\\"usage\\\":{\\\"output_tokens\\\":999} ünï\"}}\n\n",
        "event: content_block_stop\n",
        "data: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: message_delta\n",
        "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":15}}\n\n",
        "event: message_stop\n",
        "data: {\"type\":\"message_stop\"}\n\n",
    );

    const RESPONSES_STREAM: &str = concat!(
        "event: response.created\n",
        "data: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"in_progress\",\"model\":\"gpt-4.1-mini\",\"output\":[],\"usage\":null}}\n\n",
        "event: response.output_text.delta\n",
        "data: {\"type\":\"response.output_text.delta\",\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\"\\\"usage\\\" ✓\"}\n\n",
        "event: response.completed\n",
        "data: {\"type\":\"response.completed\",\"sequence_number\":9,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"completed\",\"model\":\"gpt-4.1-mini\",\"output\":[{\"type\":\"message\",\"content\":[{\"type\":\"output_text\",\"text\":\"\\\"usage\\\" ✓\",\"usage\":{\"input_tokens\":999}}]}],\"usage\":{\"input_tokens\":30,\"input_tokens_details\":{\"cached_tokens\":8},\"output_tokens\":20,\"output_tokens_details\":{\"reasoning_tokens\":5},\"total_tokens\":50}}}\n\n",
    );

    /// vLLM `continuous_usage_stats`: every chunk carries the running total.
    const CUMULATIVE_STREAM: &str = concat!(
        "data: {\"model\":\"llama-3\",\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1}}\n\n",
        "data: {\"model\":\"other\",\"choices\":[{\"delta\":{\"content\":\"b\"}}],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2}}\n\n",
        "data: {\"model\":\"llama-3\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":3}}\n\n",
        "data: [DONE]\n\n",
    );

    #[test]
    fn sse_streams() {
        let multi_line = concat!(
            ": keep-alive comment\n",
            "id: 7\nretry: 1000\nevent: chunk\n",
            "data: {\"model\":\"modèle-ü\",\n",
            "data\n",
            "data:\"usage\":{\"prompt_tokens\":3,\n",
            "data:  \"completion_tokens\":4}}\n\n",
            "data:[DONE]\n\n",
        );
        let cases = [
            ("openai", OPENAI_STREAM.to_owned(), u(12, 7, 4, 2), Some("gpt-4o-mini"), true),
            ("openai crlf", OPENAI_STREAM.replace('\n', "\r\n"), u(12, 7, 4, 2), Some("gpt-4o-mini"), true),
            ("openai cr", OPENAI_STREAM.replace('\n', "\r"), u(12, 7, 4, 2), Some("gpt-4o-mini"), true),
            ("anthropic", ANTHROPIC_STREAM.to_owned(), u(25, 15, 10, 0), Some("claude-sonnet-4-5"), false),
            ("responses", RESPONSES_STREAM.to_owned(), u(30, 20, 8, 5), Some("gpt-4.1-mini"), false),
            ("cumulative", CUMULATIVE_STREAM.to_owned(), u(5, 3, 0, 0), Some("llama-3"), true),
            ("multi-line data", multi_line.to_owned(), u(3, 4, 0, 0), Some("modèle-ü"), true),
            ("multi-line data crlf", multi_line.replace('\n', "\r\n"), u(3, 4, 0, 0), Some("modèle-ü"), true),
            (
                "bom, no final newline",
                "\u{FEFF}data: {\"usage\":{\"prompt_tokens\":1}}\n\ndata: [DONE]".to_owned(),
                u(1, 0, 0, 0),
                None,
                true,
            ),
            (
                "last event without blank line",
                "data: {\"model\":\"m\"}\n\ndata: {\"usage\":{\"prompt_tokens\":2}}".to_owned(),
                u(2, 0, 0, 0),
                Some("m"),
                false,
            ),
            (
                "only usage null",
                "data: {\"model\":\"m\",\"usage\":null}\n\ndata: [DONE]\n\n".to_owned(),
                None,
                Some("m"),
                true,
            ),
            (
                "not done: other fields, [DONE] with extra",
                "event: [DONE]\ndata: [DONE] \ndata:[DONE]x\n\nid: [DONE]\n\n".to_owned(),
                None,
                None,
                false,
            ),
            (
                "non-json data is ignored until the next event",
                "data: hello \"usage\":{\"prompt_tokens\":9}\n\ndata: {\"usage\":{\"prompt_tokens\":1}}\n\n".to_owned(),
                u(1, 0, 0, 0),
                None,
                false,
            ),
            (
                "event cut mid-object resyncs",
                "data: {\"usage\":{\"prompt_tokens\":9\n\ndata: {\"usage\":{\"prompt_tokens\":1}}\n\n".to_owned(),
                u(1, 0, 0, 0),
                None,
                false,
            ),
        ];
        for (name, body, usage, model, done) in cases {
            let got = run_all_splits(BodyKind::Sse, DEFAULT_MAX_CARRY, body.as_bytes());
            let want = Out { usage, model: model.map(str::to_owned), done, skipped: 0 };
            assert_eq!(got, want, "{name}");
        }
    }

    /// Streams aimed at the SSE prefilter: each is run (by `run`) through the parser and
    /// the reference, whole, cut at every offset, byte by byte and in random pieces, with
    /// `\n`, `\r\n` and `\r` line ends, and with a small capture cap.
    #[test]
    fn differential_tricky_streams() {
        let cases: &[&str] = &[
            OPENAI_STREAM,
            ANTHROPIC_STREAM,
            RESPONSES_STREAM,
            CUMULATIVE_STREAM,
            // usage null everywhere, model first, then usage with whitespace variants.
            "data: {\"model\":\"m\",\"usage\":null}\n\ndata: {\"usage\" :null}\n\ndata: {\"usage\"\t: {\"prompt_tokens\":3}}\n\n",
            "data: {\"model\":\"m\"}\n\ndata: {\"usage\" : {\"prompt_tokens\":3}}\n\ndata: {\"usage\":\t{\"completion_tokens\":4}}\n\n",
            // Escaped quotes and backslashes around the text "usage" in content.
            "data: {\"model\":\"m\",\"choices\":[{\"delta\":{\"content\":\"\\\"usage\\\":{\\\"prompt_tokens\\\":9} \\\\\"}}],\"usage\":null}\n\n\
             data: {\"choices\":[{\"delta\":{\"content\":\"\\\\\\\"usage\\\\\\\":{\\\"completion_tokens\\\":9}\"}}]}\n\n\
             data: {\"choices\":[{\"delta\":{\"content\":\"x\\\\\"},\"usage\":{\"prompt_tokens\":1}}]}\n\n\
             data: {\"choices\":[],\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":5}}\n\ndata: [DONE]\n\n",
            // "usage" as a string value, and followed by junk the scanner still reads as a key.
            "data: {\"model\":\"m\"}\n\ndata: {\"a\":\"usage\",\"b\":[\"usage\"]}\n\n\
             data: {\"usage\" \"x\" : {\"prompt_tokens\":7}}\n\ndata: {\"usage\" 1 {} : {\"completion_tokens\":8}}\n\n\
             data: {\"usage\":}\n\ndata: {\"usage\"}\n\ndata: {\"usage\"\n\n",
            // A usage key or its value on the next data line of the same event.
            "data: {\"model\":\"m\"}\n\ndata: {\"usage\"\ndata: :{\"prompt_tokens\":4}}\n\n\
             data: {\"x\":1,\ndata: \"usage\":{\"completion_tokens\":6}}\n\ndata: {\"usage\":\ndata:{\"prompt_tokens\":5}}\n\n",
            // data: without a space, comments, other fields, bare `data`, [DONE] variants.
            ": keepalive\n\ndata:{\"model\":\"m\",\"usage\":null}\n\n: keepalive\nevent: x\nid: 1\n\
             data:{\"usage\":null}\n\ndata\n\ndata:[DONE]\n\ndata: [DONE] \n\n",
            // Model absent at first, then nested, then a later one that must not win.
            "data: {\"choices\":[],\"usage\":null}\n\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude\",\"usage\":{\"input_tokens\":3}}}\n\n\
             data: {\"model\":\"other\",\"usage\":{\"output_tokens\":2}}\n\n",
            // An escaped or empty model is not "known"; "model" as a value.
            "data: {\"model\":\"\"}\n\ndata: {\"x\":\"model\"}\n\ndata: {\"model\" : \"m\\u00e9\"}\n\ndata: {\"usage\":{\"prompt_tokens\":1}}\n\n",
            // Over-cap usage (with a small cap), then a good one.
            "data: {\"model\":\"m\",\"usage\":null}\n\ndata: {\"usage\":{\"prompt_tokens\":1,\"pad\":\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"}}\n\n\
             data: {\"usage\":{\"prompt_tokens\":2}}\n\n",
            // BOM, events not ended by a blank line, trailing event with no newline.
            "\u{FEFF}data: {\"model\":\"m\"}\n\ndata: {\"usage\":null}\ndata: {\"usage\":{\"prompt_tokens\":1}}\n\ndata: {\"usage\":{\"prompt_tokens\":2}}",
            "data: {\"model\":\"m\"}\n\ndata: {\"usage\":null}\n\n\n\n\ndata: {\"usage\":{\"prompt_tokens\":1}}\r\n\r\n",
        ];
        for (n, case) in cases.iter().enumerate() {
            for body in [case.to_string(), case.replace('\n', "\r\n"), case.replace('\n', "\r")] {
                for max in [DEFAULT_MAX_CARRY, 40] {
                    let _ = run_all_splits(BodyKind::Sse, max, body.as_bytes());
                }
            }
            assert!(n < cases.len());
        }
    }

    /// Random real-looking streams (OpenAI, Anthropic, Responses shapes, mixed with the
    /// traps above), random line ends, cut into random pieces and 1-byte pieces: the
    /// parser must agree with the reference every time.
    #[test]
    fn differential_random_streams() {
        let events: &[&str] = &[
            "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tok \"},\"finish_reason\":null}],\"usage\":null}\n\n",
            "data: {\"id\":\"c\",\"model\":\"gpt-4o\",\"choices\":[{\"delta\":{\"content\":\"say \\\"usage\\\": {\\\"prompt_tokens\\\": 9} \\\\\"}}],\"usage\":null}\n\n",
            "data:{\"choices\":[{\"delta\":{\"content\":\"\\\\\"}}],\"usage\" : null}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":7,\"prompt_tokens_details\":{\"cached_tokens\":4},\"completion_tokens_details\":{\"reasoning_tokens\":2}}}\n\n",
            "data: {\"usage\" :{\"completion_tokens\":8}}\n\n",
            "data: {\"model\":\"second\",\"usage\":{\"prompt_tokens\":1}}\n\n",
            ": keepalive\n\n",
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude\",\"usage\":{\"input_tokens\":25,\"cache_read_input_tokens\":10}}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\n\n",
            "data: {\"type\":\"response.completed\",\"response\":{\"model\":\"gpt-4.1\",\"output\":[{\"text\":\"\\\"usage\\\"\",\"usage\":{\"input_tokens\":999}}],\"usage\":{\"input_tokens\":30,\"output_tokens\":20}}}\n\n",
            "data: {\"a\":1,\ndata: \"usage\":{\"prompt_tokens\":3}}\n\n",
            "data: {\"usage\"\ndata: :{\"completion_tokens\":5}}\n\n",
            "id: 4\ndata: {\"usage\":null,\"model\":\"m\"}\n\n",
            "data: {\"usage\":{\"prompt_tokens\":2,\"pad\":\"yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy\"}}\n\n",
            "data: not json \"usage\":{\"prompt_tokens\":77}\n\n",
            "data: {\"usage\":{\"prompt_tokens\":6}}\n",
            "data: [DONE]\n\n",
        ];
        let mut rng = Lcg(0x5eed);
        for round in 0..300 {
            let mut body = String::new();
            for _ in 0..rng.next(12) + 1 {
                body.push_str(events[rng.next(events.len())]);
            }
            match rng.next(3) {
                0 => {}
                1 => body = body.replace('\n', "\r\n"),
                _ => body = body.replace('\n', "\r"),
            }
            let bytes = body.as_bytes();
            let max = if round % 4 == 0 { 48 } else { DEFAULT_MAX_CARRY };
            let whole = run(BodyKind::Sse, max, [bytes]);
            assert_eq!(run(BodyKind::Sse, max, bytes.chunks(1)), whole, "round {round} byte at a time");
            for _ in 0..8 {
                let size = rng.next(64) + 1;
                let mut pieces = Vec::new();
                let mut rest = bytes;
                while !rest.is_empty() {
                    let n = (rng.next(size) + 1).min(rest.len());
                    let (a, b) = rest.split_at(n);
                    pieces.push(a);
                    rest = b;
                }
                assert_eq!(run(BodyKind::Sse, max, pieces), whole, "round {round}");
            }
        }
    }

    /// Lines around and over the hold cap (`CARRY_MAX`), cut in two and in
    /// random pieces up to 6 KiB.
    #[test]
    fn differential_long_lines() {
        let event = |pad: usize, usage: &str| {
            let text = "a\\\"usage\\\":{".repeat(pad / 14 + 1);
            format!("data: {{\"model\":\"m\",\"choices\":[{{\"delta\":{{\"content\":\"{text}\"}}}}],\"usage\":{usage}}}\n\n")
        };
        let mut body = String::new();
        for (pad, usage) in [
            (CARRY_MAX - 90, "null"),
            (CARRY_MAX - 60, "{\"prompt_tokens\":1}"),
            (CARRY_MAX + 10, "null"),
            (3 * CARRY_MAX, "{\"completion_tokens\":2}"),
            (10, "null"),
            (CARRY_MAX - 75, "{\"prompt_tokens\":3}"),
        ] {
            body.push_str(&event(pad, usage));
        }
        body.push_str("data: [DONE]\n\n");
        let bytes = body.as_bytes();
        let whole = run(BodyKind::Sse, DEFAULT_MAX_CARRY, [bytes]);
        assert_eq!(whole.usage, u(3, 2, 0, 0));
        // Every 17th offset (every one takes a minute in a debug build).
        for at in (0..=bytes.len()).step_by(17) {
            let (a, b) = bytes.split_at(at);
            assert_eq!(run(BodyKind::Sse, DEFAULT_MAX_CARRY, [a, b]), whole, "split at {at}");
        }
        let mut rng = Lcg(7);
        for _ in 0..40 {
            let size = rng.next(6000) + 1;
            let pieces: Vec<&[u8]> = bytes.chunks(size).collect();
            assert_eq!(run(BodyKind::Sse, DEFAULT_MAX_CARRY, pieces), whole, "pieces of {size}");
        }
    }

    #[test]
    fn prefilter_skips_usage_null_chunks() {
        // The differential tests show the results are the same; this shows the skip
        // happens: token chunks after the model are kept from the scanner.
        let mut p = UsageParser::new(BodyKind::Sse, DEFAULT_MAX_CARRY);
        for chunk in OPENAI_STREAM.split_inclusive("\n\n") {
            p.feed(chunk.as_bytes());
        }
        p.finish();
        assert_eq!((p.usage(), p.done()), (u(12, 7, 4, 2), true));
        // The first event holds the model; the usage event is scanned.
        assert_eq!(p.sse.muted, 3);
        // Cut anywhere, a line start is held until it can be decided: the same skips.
        for size in [1, 7, 100] {
            let mut p = UsageParser::new(BodyKind::Sse, DEFAULT_MAX_CARRY);
            for chunk in OPENAI_STREAM.as_bytes().chunks(size) {
                p.feed(chunk);
            }
            p.finish();
            assert_eq!((p.usage(), p.sse.muted, p.sse.pending.capacity() <= CARRY_MAX + 2), (u(12, 7, 4, 2), 3, true));
        }
        let (y, n) = (Some(true), Some(false));
        let cases: &[(&[u8], Option<bool>)] = &[
            (b"data: {\"usage\":null}\n\n", y),
            (b"data: {\"usage\" : null , \"x\":\"usage\"}\r\n\r\n", y),
            (b"data: {\"usage\":{}}\n\n", n),
            (b"data: {\"usage\"}\n\n", y),
            (b"data: {\"usage\"\n\n", n),
            (b"data: {\"usage\":\n\n", n),
            (b"data: {\"usage\" x:null}\n\n", n),
            (b"data: {}\n", None),
            (b"data: {}\r", None),
            (b"data: {}\r\n", None),
            (b"data: {}", None),
            (b"dat", None),
            (b"dx", n),
            (b"data: {}\r\r", y),
            (b"data: {}\ndata: {}\n\n", n),
            (b"data {}\n\n", n),
            (b"data:\"usage\":{\n\n", n),
            (b"data:\"usage\":1,\"usage\":[],\"usag\":{}, \"usage\"\t:\t{\n\n", n),
            (b"data:\"usage\":1,\"usage\":[],\"usag\":{}, \"ggusage\":{\n\n", y),
        ];
        let known = Found { model: Some("m".into()), ..Found::default() };
        for &(line, want) in cases {
            assert_eq!(skippable_data_line(line, &known), want, "{}", String::from_utf8_lossy(line));
        }
        let unknown = Found::default();
        assert_eq!(skippable_data_line(b"data: {\"model\":\"m\"}\n\n", &unknown), n);
        assert_eq!(skippable_data_line(b"data: {\"x\":\"m\"}\n\n", &unknown), y);
    }

    #[test]
    fn sse_over_bound_usage_is_skipped_then_recovers() {
        let body = format!(
            concat!(
                "data: {{\"model\":\"m\",\"usage\":{{\"prompt_tokens\":9,\"pad\":\"{}\"}}}}\n\n",
                "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{}\"}}}}]}}\n\n",
                "data: {{\"usage\":{{\"prompt_tokens\":2,\"completion_tokens\":3}}}}\n\n",
                "data: [DONE]\n\n",
            ),
            "x".repeat(200),
            "y".repeat(500),
        );
        let got = run_all_splits(BodyKind::Sse, 64, body.as_bytes());
        let want = Out { usage: u(2, 3, 0, 0), model: Some("m".to_owned()), done: true, skipped: 1 };
        assert_eq!(got, want);
    }

    /// The one-pass usage reader agrees with reading the object as a JSON tree (how it
    /// was read before), on every shape a server could send.
    #[test]
    fn usage_counts_agree_with_a_json_tree() {
        fn tree(raw: &str) -> Option<Usage> {
            let o = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(raw).ok()?;
            let count = |v: &serde_json::Value| {
                v.as_u64().or_else(|| {
                    let f = v.as_f64()?;
                    (f >= 0.0 && f.fract() == 0.0 && f < 1.8e19).then_some(f as u64)
                })
            };
            let n = |k: &str| o.get(k).and_then(count);
            let d = |outer: &str, k: &str| o.get(outer).and_then(|v| v.get(k)).and_then(count);
            Some(Usage {
                prompt_tokens: n("prompt_tokens").or_else(|| n("input_tokens")).unwrap_or(0),
                completion_tokens: n("completion_tokens").or_else(|| n("output_tokens")).unwrap_or(0),
                cached_tokens: d("prompt_tokens_details", "cached_tokens")
                    .or_else(|| d("input_tokens_details", "cached_tokens"))
                    .or_else(|| n("cache_read_input_tokens"))
                    .unwrap_or(0),
                reasoning_tokens: d("completion_tokens_details", "reasoning_tokens")
                    .or_else(|| d("output_tokens_details", "reasoning_tokens"))
                    .unwrap_or(0),
            })
        }
        let cases = [
            r#"{"prompt_tokens":12,"completion_tokens":16,"total_tokens":28,"prompt_tokens_details":{"cached_tokens":3},"completion_tokens_details":{"reasoning_tokens":5}}"#,
            r#"{"input_tokens":7,"output_tokens":9,"cache_read_input_tokens":2}"#,
            r#"{"input_tokens":7,"output_tokens":9,"input_tokens_details":{"cached_tokens":4},"output_tokens_details":{"reasoning_tokens":1}}"#,
            r#"{"prompt_tokens":1,"prompt_tokens":2,"completion_tokens":3,"completion_tokens":"x"}"#,
            r#"{"prompt_tokens":12.0,"completion_tokens":1e3,"cached_tokens":4}"#,
            r#"{"prompt_tokens":-1,"completion_tokens":1.5,"prompt_tokens_details":null}"#,
            r#"{"prompt_tokens":"12","completion_tokens":true,"prompt_tokens_details":[1,2]}"#,
            r#"{"prompt_tokens":[],"completion_tokens":{},"prompt_tokens_details":7}"#,
            r#"{"prompt_tokens":99999999999999999999999,"completion_tokens":18446744073709551615}"#,
            r#"{"prompt_tokens":-0,"completion_tokens":0}"#,
            r#"{"prompt\u005ftokens":5,"completion_tokens":6,"prompt_tokens_details":{"cached\u005ftokens":2}}"#,
            r#"{"prompt_tokens_details":{"cached_tokens":1},"prompt_tokens_details":{"other":1}}"#,
            r#"{"prompt_tokens_details":{"cached_tokens":1,"cached_tokens":null},"input_tokens_details":{"cached_tokens":8}}"#,
            r#"{"nested":{"prompt_tokens":4,"deep":[{"a":[1,{"b":2}]}]},"completion_tokens":2}"#,
            r#"{}"#,
            r#"null"#,
            r#"[1,2]"#,
            r#"{"prompt_tokens":1}x"#,
            r#"{"prompt_tokens":1"#,
            // Values the tree refuses make the whole object refused, read or not.
            r#"{"prompt_tokens":5,"completion_tokens":6,"x":1e400}"#,
            r#"{"prompt_tokens":5,"x":"\ud800"}"#,
            r#"{"prompt_tokens":[1e400],"input_tokens":3}"#,
            r#"{"prompt_tokens":5,"prompt_tokens_details":{"x":[1e999]}}"#,
        ];
        let deep = format!(r#"{{"prompt_tokens":5,"x":{}1{}}}"#, "[".repeat(130), "]".repeat(130));
        let shallow = format!(r#"{{"prompt_tokens":5,"x":{}1{}}}"#, "[".repeat(100), "]".repeat(100));
        let not_utf8 = [&br#"{"prompt_tokens":5,"x":""#[..], &[0xff], &br#""}"#[..]].concat();
        let mut raws: Vec<Vec<u8>> = cases.iter().map(|c| c.as_bytes().to_vec()).collect();
        raws.extend([deep.into_bytes(), shallow.into_bytes(), not_utf8]);
        for raw in raws {
            let mut found = Found::default();
            found.add_usage(&raw);
            let text = String::from_utf8_lossy(&raw);
            let want = std::str::from_utf8(&raw).ok().and_then(tree);
            assert_eq!(found.usage, want, "{text}");
        }
    }

    #[test]
    fn sse_usage_is_latest_not_summed() {
        let mut p = UsageParser::new(BodyKind::Sse, DEFAULT_MAX_CARRY);
        let steps = [
            ("data: {\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1}}\n\n", u(5, 1, 0, 0)),
            ("data: {\"usage\":null}\n\n", u(5, 1, 0, 0)),
            ("data: {\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":4}}\n\n", u(5, 4, 0, 0)),
            // Anthropic message_delta: only output, input kept.
            ("data: {\"usage\":{\"output_tokens\":6}}\n\n", u(5, 6, 0, 0)),
        ];
        for (chunk, want) in steps {
            p.feed(chunk.as_bytes());
            assert_eq!(p.usage(), want, "{chunk}");
        }
    }

    #[test]
    fn sse_done_without_newline_needs_finish() {
        let mut p = UsageParser::new(BodyKind::Sse, DEFAULT_MAX_CARRY);
        p.feed(b"data: [DONE]");
        assert!(!p.done());
        p.finish();
        assert!(p.done());
    }

    #[test]
    fn sse_long_lines_stream_in_constant_memory() {
        let content = "z".repeat(1 << 20);
        let body = format!(
            ": {content}\ndata: {{\"choices\":[{{\"delta\":{{\"content\":\"{content}\"}}}}],\"usage\":{{\"prompt_tokens\":1}}}}\n\n"
        );
        let mut p = UsageParser::new(BodyKind::Sse, 1024);
        for piece in body.as_bytes().chunks(16 * 1024) {
            p.feed(piece);
        }
        p.finish();
        assert_eq!((p.usage(), p.skipped_events()), (u(1, 0, 0, 0), 0));
        assert!(p.scan.buf.capacity() <= 1024);
    }
}
