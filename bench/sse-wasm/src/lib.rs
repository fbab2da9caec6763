//! The filter's SSE usage parser, fed an OpenAI chat completion stream, with an
//! export per step so a host (node's V8 in `run.mjs`, or `sse-prof` natively) can time
//! it: `prepare(mib)` builds the stream (the same shape as `sse-throughput`: one
//! `chat.completion.chunk` per token, the usage chunk, `data: [DONE]`), `run(piece)`
//! feeds it to a fresh `UsageParser` in pieces of `piece` bytes (0: one SSE event per
//! piece) and returns the completion tokens it read (the stream's token count when the
//! parser is right).

use std::sync::Mutex;

use tollgate_filter::usage::{BodyKind, UsageParser, DEFAULT_MAX_CARRY};

struct Stream {
    data: Vec<u8>,
    ends: Vec<usize>,
    tokens: u64,
}

static STREAM: Mutex<Option<Stream>> = Mutex::new(None);

#[path = "../../src/sse_stream.rs"]
mod sse_stream;
/// The stream `sse-throughput` measures too (one definition, `bench/src/sse_stream.rs`).
pub use sse_stream::build;

/// Feeds `data` to a new parser in pieces (`piece` bytes, or one event each when 0).
pub fn feed(data: &[u8], ends: &[usize], piece: usize) -> u64 {
    let mut p = UsageParser::new(BodyKind::Sse, DEFAULT_MAX_CARRY);
    if piece == 0 {
        let mut start = 0;
        for &end in ends {
            if let Some(chunk) = data.get(start..end) {
                p.feed(chunk);
            }
            start = end;
        }
    } else {
        for chunk in data.chunks(piece) {
            p.feed(chunk);
        }
    }
    p.finish();
    if !p.done() {
        return u64::MAX;
    }
    p.usage().map_or(u64::MAX - 1, |u| u.completion_tokens)
}

/// Builds a stream of about `mib` MiB; returns its length in bytes.
#[no_mangle]
pub extern "C" fn prepare(mib: u32) -> u32 {
    let (data, ends, tokens) = build((mib.max(1) as usize) << 20);
    let len = data.len() as u32;
    if let Ok(mut s) = STREAM.lock() {
        *s = Some(Stream { data, ends, tokens });
    }
    len
}

/// The stream's completion tokens (what `run` must return).
#[no_mangle]
pub extern "C" fn tokens() -> u64 {
    STREAM.lock().ok().and_then(|s| s.as_ref().map(|s| s.tokens)).unwrap_or(0)
}

/// Events in the stream.
#[no_mangle]
pub extern "C" fn events() -> u32 {
    STREAM.lock().ok().and_then(|s| s.as_ref().map(|s| s.ends.len() as u32)).unwrap_or(0)
}

/// One pass of the parser over the stream.
#[no_mangle]
pub extern "C" fn run(piece: u32) -> u64 {
    let Ok(s) = STREAM.lock() else { return 0 };
    let Some(s) = s.as_ref() else { return 0 };
    feed(&s.data, &s.ends, piece as usize)
}

/// The prototype of "skip events that cannot carry usage" (issue 19), kept for
/// comparison: the filter's `UsageParser` now does this itself, exactly (see
/// `filter/src/usage.rs`, `skippable_data_line`), so `run` measures the shipped parser.
/// The prototype: lines are split with
/// `memchr`, and a `data:` line goes to the parser only while no `model` was seen (the
/// first event) or when it holds `"usage":{` (found with `memmem`); every other line is
/// skipped without entering the JSON scanner. An upper bound of that fast path (whole
/// stream in one piece, lines never cut); returns the tokens read, as [`feed`].
pub fn feed_prefiltered(data: &[u8]) -> u64 {
    let finder = memchr::memmem::Finder::new(b"\"usage\":{");
    let mut p = UsageParser::new(BodyKind::Sse, DEFAULT_MAX_CARRY);
    let mut model_seen = false;
    let mut start = 0;
    for end in memchr::memchr_iter(b'\n', data) {
        let line = data.get(start..=end).unwrap_or_default();
        start = end + 1;
        let wanted = line.len() <= 1
            || !line.starts_with(b"data:")
            || line.starts_with(b"data: [DONE]")
            || !model_seen
            || finder.find(line).is_some();
        if wanted {
            p.feed(line);
            model_seen |= p.model().is_some();
        }
    }
    p.feed(data.get(start..).unwrap_or_default());
    p.finish();
    if !p.done() {
        return u64::MAX;
    }
    p.usage().map_or(u64::MAX - 1, |u| u.completion_tokens)
}

/// Only the line split of the SSE layer, with `memchr` (what a `memchr`-based line
/// search costs alone): returns the number of lines.
pub fn count_lines(data: &[u8]) -> u64 {
    memchr::memchr_iter(b'\n', data).count() as u64
}

/// [`feed_prefiltered`] over the prepared stream.
#[no_mangle]
pub extern "C" fn run_prefiltered() -> u64 {
    let Ok(s) = STREAM.lock() else { return 0 };
    let Some(s) = s.as_ref() else { return 0 };
    feed_prefiltered(&s.data)
}

/// [`count_lines`] over the prepared stream.
#[no_mangle]
pub extern "C" fn run_lines() -> u64 {
    let Ok(s) = STREAM.lock() else { return 0 };
    let Some(s) = s.as_ref() else { return 0 };
    count_lines(&s.data)
}
