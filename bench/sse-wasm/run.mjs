// Times the filter's SSE usage parser compiled to wasm32 (no host) under node's V8:
// `node bench/sse-wasm/run.mjs path/to/tollgate_bench_sse_wasm.wasm [seconds]`.
// Prints `piece=… mb_per_s=…` per piece size (median of the passes), as sse-throughput.
import { readFileSync } from 'node:fs';
import { performance } from 'node:perf_hooks';

const [file, secondsArg] = process.argv.slice(2);
const seconds = Number(secondsArg ?? 1);
const { instance } = await WebAssembly.instantiate(readFileSync(file), {});
const w = instance.exports;
const bytes = w.prepare(4);
const tokens = w.tokens();
console.log(`engine=node ${process.version} (V8 ${process.versions.v8}) stream_bytes=${bytes} events=${w.events()} tokens=${tokens}`);
const median = (v) => { const s = [...v].sort((a, b) => a - b); return s[Math.floor(s.length / 2)]; };
for (const [name, piece] of [['one event', 0], ['1 KiB', 1024], ['16 KiB', 16384], ['64 KiB', 65536]]) {
  if (w.run(piece) !== tokens) throw new Error(`piece ${name}: parser read ${w.run(piece)}, expected ${tokens}`);
  for (let i = 0; i < 3; i++) w.run(piece); // warm-up (tier-up)
  const rates = [];
  const end = performance.now() + seconds * 1000;
  while (performance.now() < end || rates.length < 5) {
    const t = performance.now();
    w.run(piece);
    rates.push(bytes / 1e6 / ((performance.now() - t) / 1000));
  }
  console.log(`piece=${name} mb_per_s=${median(rates).toFixed(1)} runs=${rates.length}`);
}
for (const [name, fn, want] of [['prefilter (prototype)', () => w.run_prefiltered(), tokens], ['memchr lines only', () => w.run_lines(), null]]) {
  const first = fn();
  if (want !== null && first !== want) throw new Error(`${name}: read ${first}, expected ${want}`);
  for (let i = 0; i < 3; i++) fn();
  const rates = [];
  const end = performance.now() + seconds * 1000;
  while (performance.now() < end || rates.length < 5) {
    const t = performance.now();
    fn();
    rates.push(bytes / 1e6 / ((performance.now() - t) / 1000));
  }
  console.log(`mode=${name} mb_per_s=${median(rates).toFixed(1)} runs=${rates.length}`);
}
