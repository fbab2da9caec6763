//! Usage metering on response bodies, and the `include_usage` request rewrite.
//!
//! Input layout: byte 0 picks the body kind (bit 0: JSON or SSE) and the capture cap
//! (bits 1-3); byte 1 is the number of cut points (mod 16); then two bytes per cut
//! point (little-endian, taken mod body length + 1); the rest is the body. The body is
//! fed whole, cut at those points, and one byte at a time: the parser reads chunks cut
//! at any byte, so all three must find the same usage, model, [DONE] and skip count.
//! The body also goes through the request scanner (`request::BodyScan`), fed whole and
//! cut the same ways (the same facts and rewrite every way); a rewrite grows the body by
//! at most `MAX_GROWTH` bytes and, when serde_json reads the original, reads as JSON
//! with `stream_options.include_usage == true`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tollgate_filter::request::{BodyScan, MAX_GROWTH};
use tollgate_filter::usage::{BodyKind, Usage, UsageParser, DEFAULT_MAX_CARRY};

const CAPS: [usize; 8] = [DEFAULT_MAX_CARRY, 0, 1, 8, 32, 64, 256, 4096];

#[derive(Debug, PartialEq, Eq)]
struct Seen {
    usage: Option<Usage>,
    model: Option<String>,
    done: bool,
    skipped: u64,
    bytes: u64,
}

fn run<'a>(kind: BodyKind, cap: usize, chunks: impl IntoIterator<Item = &'a [u8]>) -> Seen {
    let mut p = UsageParser::new(kind, cap);
    for c in chunks {
        p.feed(c);
    }
    p.finish();
    Seen {
        usage: p.usage(),
        model: p.model().map(str::to_string),
        done: p.done(),
        skipped: p.skipped_events(),
        bytes: p.bytes_seen(),
    }
}

fuzz_target!(|data: &[u8]| {
    let [mode, n, rest @ ..] = data else { return };
    let kind = if mode & 1 == 0 { BodyKind::Json } else { BodyKind::Sse };
    let cap = CAPS[usize::from((mode >> 1) & 7)];
    let n = usize::from(n % 16);
    let Some((cut_bytes, body)) = rest.split_at_checked(2 * n) else { return };
    let mut cuts: Vec<usize> =
        cut_bytes.chunks_exact(2).map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])) % (body.len() + 1)).collect();
    cuts.sort_unstable();

    let whole = run(kind, cap, [body]);
    assert_eq!(whole.bytes, body.len() as u64);
    let mut chunks = Vec::with_capacity(cuts.len() + 1);
    let mut at = 0;
    for &c in &cuts {
        chunks.push(&body[at..c]); // repeated cut points give empty chunks, also legal
        at = c;
    }
    chunks.push(&body[at..]);
    let split = run(kind, cap, chunks.iter().copied());
    assert_eq!(split, whole, "kind {kind:?}, cap {cap}, cut at {cuts:?}");
    let bytewise = run(kind, cap, body.chunks(1));
    assert_eq!(bytewise, whole, "kind {kind:?}, cap {cap}, one byte at a time");

    // `Other` bodies are not read at all.
    assert_eq!(run(BodyKind::Other, cap, [body]).usage, None);
    let _ = BodyKind::from_content_type(Some(&String::from_utf8_lossy(&body[..body.len().min(64)])));

    let scan = |pieces: &[&[u8]]| {
        let mut s = BodyScan::new();
        for p in pieces {
            s.feed(p);
        }
        (s.facts(), s.rewrite_whole(body))
    };
    let whole_scan = scan(&[body]);
    assert_eq!(scan(&chunks), whole_scan, "request scan, cut at {cuts:?}");
    let bytes: Vec<&[u8]> = body.chunks(1).collect();
    assert_eq!(scan(&bytes), whole_scan, "request scan, one byte at a time");
    if let (_, Some(out)) = &whole_scan {
        assert!(out.len() <= body.len() + MAX_GROWTH);
        if serde_json::from_slice::<Value>(body).is_ok() {
            let v: Value = serde_json::from_slice(out).expect("a rewritten JSON body is JSON");
            assert_eq!(v["stream_options"]["include_usage"], Value::Bool(true), "{v}");
        }
    }
});
