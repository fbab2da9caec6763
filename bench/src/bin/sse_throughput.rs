//! Throughput of the filter's streaming usage reader (`usage::UsageParser`) natively:
//! an OpenAI chat completion stream (one `chat.completion.chunk` per token, the usage
//! chunk, `data: [DONE]`) fed in pieces of several sizes — one SSE event per piece,
//! as a token-by-token upstream delivers it, and 1 KiB / 16 KiB / 64 KiB buffers.
//! Prints `piece=… mb_per_s=…` per size (median of the repetitions).
//!
//! The filter runs this code compiled to wasm32 inside V8, which is slower than native
//! by a factor that `bench-run` estimates from the end-to-end streaming test; this
//! number is the upper bound and shows where the parser itself stands.

use std::hint::black_box;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Parser;
use tollgate_bench::stats::median;
use tollgate_filter::usage::{BodyKind, UsageParser, DEFAULT_MAX_CARRY};

#[derive(Parser)]
#[command(about = "MB/s of Tollgate's SSE usage parser, natively")]
struct Args {
    /// Approximate stream size in MiB.
    #[arg(long, default_value_t = 4)]
    mib: usize,
    /// Time spent per piece size.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
}

fn pieces_by_events<'a>(data: &'a [u8], ends: &[usize]) -> Vec<&'a [u8]> {
    let mut start = 0;
    let mut v = Vec::with_capacity(ends.len());
    for &end in ends {
        if let Some(p) = data.get(start..end) {
            v.push(p);
        }
        start = end;
    }
    v
}

fn run_once(pieces: &[&[u8]]) -> (Option<u64>, bool) {
    let mut p = UsageParser::new(BodyKind::Sse, DEFAULT_MAX_CARRY);
    for piece in pieces {
        p.feed(black_box(piece));
    }
    p.finish();
    (p.usage().map(|u| u.completion_tokens), p.done())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (data, ends, tokens) = tollgate_bench::sse_stream::build(args.mib.max(1) << 20);
    let mut configs: Vec<(String, Vec<&[u8]>)> = Vec::new();
    let avg_event = data.len() / ends.len().max(1);
    configs.push((format!("one event (~{avg_event} B)"), pieces_by_events(&data, &ends)));
    for size in [1024usize, 16 * 1024, 64 * 1024] {
        configs.push((format!("{} KiB", size / 1024), data.chunks(size).collect()));
    }
    println!("stream_bytes={} events={} tokens={tokens}", data.len(), ends.len());
    for (name, pieces) in &configs {
        let (usage, done) = run_once(pieces);
        if usage != Some(tokens) || !done {
            bail!("parser read {usage:?} completion tokens (done={done}), expected {tokens}");
        }
        let mut rates = Vec::new();
        let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
        while Instant::now() < deadline || rates.len() < 3 {
            let t = Instant::now();
            black_box(run_once(pieces));
            rates.push(data.len() as f64 / 1e6 / t.elapsed().as_secs_f64());
        }
        println!("piece={name} mb_per_s={:.1} runs={}", median(&rates), rates.len());
    }
    Ok(())
}
