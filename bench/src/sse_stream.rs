//! The OpenAI chat completion stream the SSE throughput benches feed the usage parser:
//! one `chat.completion.chunk` per token (each with `"usage":null`, as with
//! `include_usage`), the usage chunk, `data: [DONE]`. Std only: `bench/sse-wasm` (its
//! own workspace, compiled to wasm32) includes this file too, so both measure the same
//! stream.

/// A stream of about `bytes`, its event boundaries, and its token count.
pub fn build(bytes: usize) -> (Vec<u8>, Vec<usize>, u64) {
    let mut out = Vec::with_capacity(bytes + 1024);
    let mut ends = Vec::new();
    let mut tokens: u64 = 0;
    while out.len() < bytes {
        let event = format!(
            "data: {{\"id\":\"chatcmpl-8c2f6a1b\",\"object\":\"chat.completion.chunk\",\"created\":1763800000,\"model\":\"Qwen/Qwen3-0.6B\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{tokens} \"}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n"
        );
        out.extend_from_slice(event.as_bytes());
        ends.push(out.len());
        tokens += 1;
    }
    let last = format!(
        "data: {{\"id\":\"chatcmpl-8c2f6a1b\",\"object\":\"chat.completion.chunk\",\"created\":1763800000,\"model\":\"Qwen/Qwen3-0.6B\",\"choices\":[],\"usage\":{{\"prompt_tokens\":12,\"completion_tokens\":{tokens},\"total_tokens\":{}}}}}\n\ndata: [DONE]\n\n",
        tokens + 12
    );
    out.extend_from_slice(last.as_bytes());
    ends.push(out.len());
    (out, ends, tokens)
}
