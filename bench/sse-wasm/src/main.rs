//! `sse-prof [seconds] [piece|prefilter|lines]`: the parser natively over a 4 MiB
//! stream in a loop (for `perf record`), printing MB/s. `piece` as `run` (0: one event
//! per piece); `prefilter`: the skip-events-without-usage candidate
//! ([`tollgate_bench_sse_wasm::feed_prefiltered`]); `lines`: the `memchr` line split
//! alone. Built with `--profile prof` it has symbols.

use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let seconds: f64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let mode = args.next().unwrap_or_else(|| "0".into());
    let (data, ends, tokens) = tollgate_bench_sse_wasm::build(4 << 20);
    let lines = tollgate_bench_sse_wasm::count_lines(&data);
    let run = |data: &[u8]| -> u64 {
        match mode.as_str() {
            "prefilter" => tollgate_bench_sse_wasm::feed_prefiltered(data),
            "lines" => tollgate_bench_sse_wasm::count_lines(data),
            piece => tollgate_bench_sse_wasm::feed(data, &ends, piece.parse().unwrap_or(0)),
        }
    };
    let want = if mode == "lines" { lines } else { tokens };
    let start = Instant::now();
    let mut runs = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        let got = run(std::hint::black_box(&data));
        assert_eq!(got, want, "mode {mode}");
        runs += 1;
    }
    let mb = data.len() as f64 * runs as f64 / 1e6;
    println!("mode={mode} mb_per_s={:.1} runs={runs}", mb / start.elapsed().as_secs_f64());
}
