//! Removes the usage-only SSE event that exists only because the filter asked for it.
//!
//! When a streaming chat/completions request did not ask for usage, the filter adds
//! `stream_options.include_usage` so the server reports it; the server then ends the
//! stream with one extra event whose `choices` is empty. Clients that did not ask for
//! it may index `choices[0]` on every event, so the filter takes that event out again.
//! The response is never held back for this: an event is removed only when it arrives
//! whole inside one body chunk (vLLM and most servers write each event in one write);
//! an event cut across chunks is forwarded as it is.
//!
//! It runs on every chunk of those streams, so it is cheap: events are split with
//! `memchr`, and only an event holding a `"usage"` key that opens an object (the
//! parser's own prefilter) is parsed to be checked.

use memchr::{memchr2, memchr2_iter, memchr_iter};

/// Per-response state: whether the next chunk starts at an event boundary.
#[derive(Debug, Clone)]
pub struct UsageOnlyStripper {
    at_boundary: bool,
    removed: u64,
}

impl Default for UsageOnlyStripper {
    fn default() -> Self {
        Self { at_boundary: true, removed: 0 }
    }
}

impl UsageOnlyStripper {
    pub fn removed(&self) -> u64 {
        self.removed
    }

    /// Returns the chunk without whole usage-only events, or None if nothing changes.
    pub fn strip(&mut self, chunk: &[u8]) -> Option<Vec<u8>> {
        let mut out: Option<Vec<u8>> = None;
        let mut pos = 0;
        let mut at_boundary = self.at_boundary;
        while let Some(n) = chunk.get(pos..).and_then(find_event_end) {
            let end = pos + n;
            let event = chunk.get(pos..end).unwrap_or_default();
            if at_boundary && is_usage_only(event) {
                out.get_or_insert_with(|| chunk.get(..pos).unwrap_or_default().to_vec());
                self.removed += 1;
            } else if let Some(o) = out.as_mut() {
                o.extend_from_slice(event);
            }
            at_boundary = true;
            pos = end;
        }
        let tail = chunk.get(pos..).unwrap_or_default();
        if let Some(o) = out.as_mut() {
            o.extend_from_slice(tail);
        }
        if !chunk.is_empty() {
            // A non-empty tail is the start of an event cut by the chunk boundary.
            self.at_boundary = tail.is_empty();
        }
        out
    }
}

/// End (exclusive) of the first event in `bytes`, including its blank line.
fn find_event_end(bytes: &[u8]) -> Option<usize> {
    for i in memchr2_iter(b'\n', b'\r', bytes) {
        match bytes.get(i..) {
            Some([b'\n', b'\n', ..]) => return Some(i + 2),
            Some([b'\r', b'\n', b'\r', b'\n', ..]) => return Some(i + 4),
            Some([b'\r', b'\r', ..]) => return Some(i + 2),
            _ => {}
        }
    }
    None
}

/// Whether the event is one line (before its blank line) holding no `\u` escape.
fn single_plain_line(event: &[u8]) -> bool {
    let body =
        event.strip_suffix(b"\r\n\r\n").or_else(|| event.strip_suffix(b"\n\n")).or_else(|| event.strip_suffix(b"\r\r"));
    body.is_some_and(|b| {
        memchr2(b'\n', b'\r', b).is_none() && !memchr_iter(b'\\', b).any(|i| b.get(i + 1) == Some(&b'u'))
    })
}

/// A `data:` event whose JSON has `"choices": []` and a `usage` object.
fn is_usage_only(event: &[u8]) -> bool {
    // Token chunks (`"usage":null`) never get to serde_json. The raw bytes say "no usage
    // object" only for an event of one line with no `\u` escape (a key could be written
    // `"\u0075sage"`, or split from its value across `data:` lines); any other event is
    // checked whole.
    if single_plain_line(event) && !crate::usage::may_carry_usage(event) {
        return false;
    }
    let text = match std::str::from_utf8(event) {
        Ok(t) => t,
        Err(_) => return false,
    };
    let mut data = String::new();
    for line in text.lines() {
        if let Some(d) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(d.strip_prefix(' ').unwrap_or(d));
        } else if !line.is_empty() && !line.starts_with(':') {
            return false; // event:, id: … — not a plain OpenAI chunk
        }
    }
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&data) else { return false };
    v.get("choices").and_then(|c| c.as_array()).is_some_and(Vec::is_empty)
        && v.get("usage").is_some_and(|u| u.is_object())
}

#[cfg(test)]
mod tests {
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    const CONTENT: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n";
    const USAGE: &str = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\n";
    const DONE: &str = "data: [DONE]\n\n";
    const SPACED: &str = "data: {\"choices\": [], \"usage\" : {\"prompt_tokens\": 1}}\n\n";
    const ESCAPED: &str = "data: {\"choices\":[],\"\\u0075sage\":{\"prompt_tokens\":1}}\n\n";
    const SPLIT: &str = "data: {\"choices\":[],\"usage\":\ndata: {\"prompt_tokens\":1}}\n\n";
    const COMMENTED: &str = "data: {\"choices\":[],\"usage\":\n: keep-alive\ndata: {\"prompt_tokens\":1}}\n\n";
    const NULL_USAGE: &str = "data: {\"choices\":[],\"usage\":null}\n\n";

    fn run(chunks: &[&str]) -> (String, u64) {
        let mut s = UsageOnlyStripper::default();
        let mut out = String::new();
        for c in chunks {
            match s.strip(c.as_bytes()) {
                Some(v) => out.push_str(&String::from_utf8(v).unwrap()),
                None => out.push_str(c),
            }
        }
        (out, s.removed())
    }

    #[test]
    fn whole_usage_events_are_removed_others_kept() {
        let all = format!("{CONTENT}{USAGE}{DONE}");
        let split_usage = USAGE.split_at(20);
        let crlf = USAGE.replace("\n\n", "\r\n\r\n");
        let cases: Vec<(Vec<String>, String, u64)> = vec![
            (vec![CONTENT.into(), USAGE.into(), DONE.into()], format!("{CONTENT}{DONE}"), 1),
            (vec![all.clone()], format!("{CONTENT}{DONE}"), 1),
            (vec![format!("{CONTENT}{USAGE}"), DONE.into()], format!("{CONTENT}{DONE}"), 1),
            (vec![CONTENT.into(), split_usage.0.into(), split_usage.1.into(), DONE.into()], all.clone(), 0),
            (vec![CONTENT.into(), crlf.clone(), DONE.into()], format!("{CONTENT}{DONE}"), 1),
            (vec![CONTENT.into(), DONE.into()], format!("{CONTENT}{DONE}"), 0),
            // The tail of a cut event is not taken for a whole one.
            (vec![CONTENT[..10].into(), format!("{}{USAGE}", &CONTENT[10..])], CONTENT.to_string(), 1),
            (vec!["event: x\n".into(), USAGE.into()], format!("event: x\n{USAGE}"), 0),
            // Spaces around the key's colon are JSON too; `usage: null` is no usage.
            (vec![CONTENT.into(), SPACED.into(), DONE.into()], format!("{CONTENT}{DONE}"), 1),
            (vec![CONTENT.into(), NULL_USAGE.into(), DONE.into()], format!("{CONTENT}{NULL_USAGE}{DONE}"), 0),
            (vec![format!("{CONTENT}{CONTENT}{USAGE}\n{DONE}")], format!("{CONTENT}{CONTENT}\n{DONE}"), 1),
            // An escaped key, or a value on the next data line (or after a comment line),
            // is the same event to a JSON reader.
            (vec![CONTENT.into(), ESCAPED.into(), DONE.into()], format!("{CONTENT}{DONE}"), 1),
            (vec![CONTENT.into(), SPLIT.into(), DONE.into()], format!("{CONTENT}{DONE}"), 1),
            (vec![CONTENT.into(), COMMENTED.into(), DONE.into()], format!("{CONTENT}{DONE}"), 1),
        ];
        for (i, (chunks, want, removed)) in cases.into_iter().enumerate() {
            let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
            assert_eq!(run(&refs), (want, removed), "case {i}");
        }
    }
}
