//! `make bench`: Tollgate side by side with no filter, Envoy's native `jwt_authn`
//! (without and with its JWT cache), an `ext_authz` HTTP service and a Lua filter —
//! every variant a listener of the same Envoy binary and process, in front of the same
//! upstreams, driven by the same load, variants interleaved round by round so drift on
//! a shared machine hits them all alike. Results are reported mostly as ratios.
//!
//! Steps: start the mock model server (in process), the usage tracker and the auth
//! service; for each `--concurrency` start Envoy with one listener per variant, check
//! every listener answers as it should, run each pass (tool × upstream × load) round
//! by round; stream a 1 MB SSE response and a token-paced one through (a), (d), (e),
//! (f') and the metering floors (m), (m') (issue 19: (f') is `ext_authz` plus the
//! `ext_proc` metering service `meter-extproc`, started beside the auth service); with (j), global
//! limits: the tracker's syncs over the passes, the latency of a request that waits for
//! a lease (`--lease-users`), and after the rest a fleet's overshoot of a limit
//! (`--overshoot-gateways`, [`tollgate_bench::fleet`]); with (k), managed keys: the
//! tracker then runs on a SQLite ledger with an admin token, (k)'s key is created
//! through its keys API before the passes, the resolves are counted over the passes,
//! and fresh keys time their first request (one lookup callout) against their second
//! (`--managed-keys`); then memory: Envoy
//! without a filter vs with Tollgate, and RSS growth over `--leak-requests` requests;
//! then the native benches (`sse-throughput`, `auth-cost`, callgrind). Writes
//! `bench/results/<stamp>.md` (and `.csv` with every run) and prints the Markdown.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Parser;
use harness::process::Proc;
use harness::stack::MockServer;
use serde_json::json;
use tollgate_bench::fleet::{self, Conn, Overshoot};
use tollgate_bench::load::{self, LoadResult, Request, Shape, Tool};
use tollgate_bench::stats::{median, min_max, percentile_sorted};
use tollgate_bench::sys;
use tollgate_bench::variants::{bootstrap, key_wait_config, lease_wait_config, Creds, Kind, Layout, GROUP};

#[derive(Parser, Clone)]
#[command(about = "Tollgate vs no filter vs jwt_authn vs ext_authz vs Lua, in one Envoy")]
struct Args {
    /// Measured seconds per run.
    #[arg(long, default_value_t = 3)]
    duration: u32,
    /// Warm-up seconds before each run (same load, not measured).
    #[arg(long, default_value_t = 1)]
    warmup: u32,
    /// Rounds: each round runs every variant once, in rotating order.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Envoy worker threads, one full pass per value.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    concurrency: Vec<u32>,
    /// wrk connections.
    #[arg(long, default_value_t = 16)]
    connections: u32,
    /// h2load connections and streams per connection.
    #[arg(long, default_value_t = 4)]
    h2_connections: u32,
    #[arg(long, default_value_t = 8)]
    h2_streams: u32,
    /// Variants to run (slugs or letters); default all.
    #[arg(long, value_delimiter = ',')]
    variants: Vec<String>,
    /// Requests for the leak check (0 skips memory and leak measurements).
    #[arg(long, default_value_t = 1_000_000)]
    leak_requests: u64,
    /// Requests of the 1 MB SSE test per variant (each takes milliseconds).
    #[arg(long, default_value_t = 40)]
    stream_runs: u32,
    /// SSE response size in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    stream_bytes: usize,
    /// Token-paced SSE test (after the burst, same runs): tokens per stream (0 skips)…
    #[arg(long, default_value_t = 20)]
    paced_tokens: u64,
    /// …and milliseconds the mock waits between events (`x-mock-delay-ms`), as a model
    /// server pacing its tokens.
    #[arg(long, default_value_t = 2)]
    paced_delay_ms: u64,
    /// API keys in every variant's key list.
    #[arg(long, default_value_t = 100)]
    keys: usize,
    /// Skip the native benches (sse-throughput, auth-cost, callgrind).
    #[arg(long)]
    no_native: bool,
    /// Only the passes whose name contains one of these (e.g. `wrk`, `mock`, `h2`).
    #[arg(long, value_delimiter = ',')]
    passes: Vec<String>,
    /// Where to write the results.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Another build of the filter, run as variants (c2) and (d2) beside (c) and (d)
    /// (e.g. another opt-level, or the previous commit): A/B in one run.
    #[arg(long)]
    alt_wasm: Option<PathBuf>,
    /// Global limits, lease wait: users per listener (each first request waits for an
    /// acquire callout, the next comes from the lease); with (j) only; 0 skips.
    #[arg(long, default_value_t = 400)]
    lease_users: usize,
    /// Global limits, overshoot: fleet sizes (gateway Envoys) to hammer, global and
    /// local scope each; with (j) only; needs PostgreSQL; `0` skips.
    #[arg(long, value_delimiter = ',', default_value = "2,4")]
    overshoot_gateways: Vec<usize>,
    /// Overshoot: requests sent at once, and the user's requests_per_hour.
    #[arg(long, default_value_t = 300)]
    overshoot_requests: usize,
    #[arg(long, default_value_t = 50)]
    overshoot_limit: u64,
    /// Managed keys, first-request wait: fresh keys per listener (managed: the first
    /// request waits for one lookup callout; static, for contrast); with (k) only; 0 skips.
    #[arg(long, default_value_t = 200)]
    managed_keys: usize,
    /// The JWT variants' algorithm (b, b', c, c', c2): `HS256` (an `oct` secret) or
    /// `RS256`, `PS256`, `ES256`, `ES384`, `EdDSA`, … (the public key in the JWKS that
    /// both `jwt_authn` and Tollgate get; issue 17).
    #[arg(long, default_value = "HS256")]
    jwt_alg: String,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Upstream {
    /// Envoy's `direct_response`: no upstream hop.
    Direct,
    /// The mock model server: POST /v1/chat/completions, non-streaming.
    Mock,
}

#[derive(Clone, Debug)]
struct Pass {
    name: String,
    shape: Shape,
    upstream: Upstream,
}

fn passes(args: &Args, concurrency: u32) -> Vec<Pass> {
    let wrk = Shape { tool: Tool::Wrk, connections: args.connections, streams: 1, seconds: args.duration };
    let h2 = Shape {
        tool: Tool::H2load,
        connections: args.h2_connections,
        streams: args.h2_streams,
        seconds: args.duration,
    };
    let one = Shape { tool: Tool::Wrk, connections: 1, streams: 1, seconds: args.duration };
    let mut v = vec![
        Pass { name: format!("c{concurrency} wrk direct"), shape: wrk, upstream: Upstream::Direct },
        Pass { name: format!("c{concurrency} h2load direct"), shape: h2, upstream: Upstream::Direct },
    ];
    if concurrency == 1 {
        v.push(Pass { name: format!("c{concurrency} wrk mock"), shape: wrk, upstream: Upstream::Mock });
        v.push(Pass { name: format!("c{concurrency} wrk 1-conn direct"), shape: one, upstream: Upstream::Direct });
    }
    if !args.passes.is_empty() {
        v.retain(|p| args.passes.iter().any(|f| p.name.contains(f.as_str())));
    }
    v
}

const NOOP_WASM: &str = "target/bench-noop/wasm32-wasip1/release/tollgate_bench_noop_filter.wasm";

const CHAT_BODY: &str =
    r#"{"model":"mock-model","messages":[{"role":"user","content":"Say hello to the benchmark"}],"max_tokens":16}"#;

/// One measured run of one variant.
#[derive(Clone, Debug)]
struct Run {
    pass: String,
    pass_desc: String,
    kind: Kind,
    round: u32,
    load: LoadResult,
    envoy_cpu_us: f64,
    /// CPU per request of the variant's processes outside Envoy (summed): the auth
    /// service (f); the tracker (metered variants); auth service, metering ext_proc
    /// service and tracker (f').
    side_cpu_us: f64,
    /// (j): `tracker_limit_syncs_total{outcome="ok"}` during the measured part.
    tracker_syncs: Option<f64>,
    /// (k): `tracker_key_resolves_total` (found + unknown) during the measured part.
    key_resolves: Option<f64>,
}

/// Everything the report needs.
#[derive(Default)]
struct Results {
    runs: Vec<Run>,
    streams: Streams,
    /// Whether the metering variants delivered their events (issue 19).
    delivery: Vec<String>,
    memory: Vec<(String, String)>,
    leak: Vec<(u64, u64, u64)>,
    leak_note: String,
    native: Vec<String>,
    callgrind: Vec<(String, f64, f64)>,
    callgrind_top: Vec<(String, String)>,
    notes: Vec<String>,
    global: GlobalResults,
    managed: ManagedResults,
}

/// Managed keys (issue 16): what (k) cost the tracker, and the first-request wait.
#[derive(Default)]
struct ManagedResults {
    /// `tracker_key_resolves_total{outcome="found"}` and `{outcome="unknown"}` after the
    /// passes (the sanity checks' wrong key is one unknown per Envoy).
    found: Option<f64>,
    unknown: Option<f64>,
    /// Lines of the Envoy logs of the passes about the key service.
    key_service_logs: usize,
    key_wait: Option<KeyWait>,
}

/// Latencies (seconds) of the first and second request of fresh keys, on a managed and
/// a static listener of one Envoy (--concurrency 1).
struct KeyWait {
    keys: usize,
    managed_first: Vec<f64>,
    managed_second: Vec<f64>,
    static_first: Vec<f64>,
    static_second: Vec<f64>,
    /// Resolves the tracker answered while the keys were measured, and for how long.
    resolves: f64,
    seconds: f64,
    /// The same keys resolved again straight at the tracker (`POST /v1/keys/resolve`
    /// from this process, keep-alive): the tracker's part of the wait.
    direct: Vec<f64>,
}

/// Global limits (issue 15): how (j) got its admissions, the lease wait, the overshoot.
#[derive(Default)]
struct GlobalResults {
    /// `tracker_limit_syncs_total{outcome="ok"}` after the passes (syncs and acquires
    /// of (j)'s workers), and lines of the Envoy logs saying the trackers were away.
    pass_syncs_ok: Option<f64>,
    unreachable_logs: usize,
    lease_wait: Option<LeaseWait>,
    overshoot: Vec<Overshoot>,
    overshoot_note: Option<String>,
}

/// Latencies (seconds) of the first and second request of fresh users, on a global
/// and a local listener of one Envoy (--concurrency 1).
struct LeaseWait {
    users: usize,
    global_first: Vec<f64>,
    global_second: Vec<f64>,
    local_first: Vec<f64>,
    local_second: Vec<f64>,
    /// Tracker syncs (acquires and periodic) while the users were measured, and for how long.
    syncs: f64,
    seconds: f64,
}

struct Tools {
    envoy: PathBuf,
    wasm: PathBuf,
    tracker: PathBuf,
    authz: PathBuf,
    meter: PathBuf,
    auth_cost: PathBuf,
    sse: PathBuf,
    /// The empty Wasm filter of variant (h), if `bench/build-noop-wasm.sh` built it.
    noop_wasm: Option<PathBuf>,
    /// `--alt-wasm`: the build run as (c2) and (d2).
    alt_wasm: Option<PathBuf>,
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("bench-run has no directory")?;
    let p = dir.join(name);
    if !p.exists() {
        bail!("{} not found: build the bench crate (`cargo build --release -p tollgate-bench`)", p.display());
    }
    Ok(p)
}

fn tools() -> anyhow::Result<Tools> {
    let release_tracker = harness::paths::workspace_root().join("target/release/usage-tracking");
    let tracker = if std::env::var_os("TOLLGATE_TRACKER_BIN").is_none() && release_tracker.exists() {
        release_tracker
    } else {
        harness::paths::tracker_bin()?
    };
    Ok(Tools {
        envoy: harness::paths::envoy_bin()?,
        wasm: harness::paths::wasm_file()?,
        tracker,
        authz: sibling("authz-service")?,
        meter: sibling("meter-extproc")?,
        auth_cost: sibling("auth-cost")?,
        sse: sibling("sse-throughput")?,
        noop_wasm: Some(harness::paths::workspace_root().join(NOOP_WASM)).filter(|p| p.exists()),
        alt_wasm: None,
    })
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&std::net::SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_millis(200)).is_ok()
}

fn http_client() -> anyhow::Result<reqwest::blocking::Client> {
    Ok(reqwest::blocking::Client::builder().timeout(Duration::from_secs(10)).build()?)
}

fn wait_until(proc: &mut Proc, timeout: Duration, ready: impl Fn() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = proc.exited() {
            bail!("{} exited ({status}); log {}:\n{}", proc.name, proc.log.display(), proc.log_tail(40));
        }
        if ready() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{} not ready after {timeout:?}; log {}:\n{}", proc.name, proc.log.display(), proc.log_tail(40));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The processes every Envoy of the run talks to.
struct Backends {
    mock: MockServer,
    tracker: Proc,
    tracker_port: u16,
    authz: Proc,
    authz_port: u16,
    /// (f')'s metering ext_proc service.
    meter: Proc,
    meter_port: u16,
    /// The tracker's `TRACKER_ADMIN_TOKEN` when it runs with a ledger (for (k)).
    admin_token: Option<String>,
}

impl Backends {
    fn tracker_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.tracker_port)
    }
}

/// `ledger`: the tracker on a SQLite ledger in the work dir with a fresh admin token, so
/// its keys API runs (managed keys, (k)); else in memory, as the runs before issue 16.
fn start_backends(t: &Tools, dir: &Path, creds: &Creds, ledger: bool) -> anyhow::Result<Backends> {
    let mock = MockServer::start(0)?;
    let tracker_port = free_port()?;
    let mut cmd = Command::new(&t.tracker);
    cmd.args(["--listen", &format!("127.0.0.1:{tracker_port}")]);
    let admin_token = ledger.then(harness::dev::new_secret);
    if let Some(token) = &admin_token {
        let data = dir.join("tracker-data");
        std::fs::create_dir_all(&data)?;
        cmd.arg("--data-dir").arg(&data).env("TRACKER_ADMIN_TOKEN", token);
    }
    let mut tracker = Proc::spawn("usage-tracking", cmd, &dir.join("tracker.log"))?;
    let client = http_client()?;
    let url = format!("http://127.0.0.1:{tracker_port}/healthz");
    wait_until(&mut tracker, Duration::from_secs(20), || {
        client.get(&url).send().is_ok_and(|r| r.status().is_success())
    })?;

    let keys_file = dir.join("keys.json");
    std::fs::write(&keys_file, serde_json::to_vec(&creds.key_entries)?)?;
    let authz_port = free_port()?;
    let mut cmd = Command::new(&t.authz);
    cmd.args(["--listen", &format!("127.0.0.1:{authz_port}")]).arg("--keys").arg(&keys_file);
    let mut authz = Proc::spawn("authz-service", cmd, &dir.join("authz.log"))?;
    wait_until(&mut authz, Duration::from_secs(20), || port_open(authz_port))?;
    let meter_port = free_port()?;
    let mut cmd = Command::new(&t.meter);
    cmd.args(["--listen", &format!("127.0.0.1:{meter_port}")])
        .args(["--tracker", &format!("http://127.0.0.1:{tracker_port}/track")]);
    let mut meter = Proc::spawn("meter-extproc", cmd, &dir.join("meter-extproc.log"))?;
    wait_until(&mut meter, Duration::from_secs(20), || port_open(meter_port))?;
    Ok(Backends { mock, tracker, tracker_port, authz, authz_port, meter, meter_port, admin_token })
}

struct Envoy {
    proc: Proc,
    admin_port: u16,
    ports: BTreeMap<Kind, u16>,
}

impl Envoy {
    fn pid(&self) -> anyhow::Result<u32> {
        self.proc.pid().context("envoy has no pid")
    }

    fn url(&self, kind: Kind, path: &str) -> anyhow::Result<String> {
        let port = self.ports.get(&kind).with_context(|| format!("no listener for {}", kind.slug()))?;
        Ok(format!("http://127.0.0.1:{port}{path}"))
    }
}

fn start_envoy(
    t: &Tools,
    b: &Backends,
    creds: &Creds,
    kinds: &[Kind],
    concurrency: u32,
    dir: &Path,
    label: &str,
) -> anyhow::Result<Envoy> {
    start_envoy_extra(t, b, creds, kinds, concurrency, dir, label, &[])
}

/// As [`start_envoy`], with more Tollgate listeners: (name, port, plugin config).
#[allow(clippy::too_many_arguments)]
fn start_envoy_extra(
    t: &Tools,
    b: &Backends,
    creds: &Creds,
    kinds: &[Kind],
    concurrency: u32,
    dir: &Path,
    label: &str,
    extra: &[(String, u16, serde_json::Value)],
) -> anyhow::Result<Envoy> {
    let admin_port = free_port()?;
    let mut ports = BTreeMap::new();
    for &k in kinds {
        ports.insert(k, free_port()?);
    }
    let listeners: Vec<(Kind, u16)> = ports.iter().map(|(k, p)| (*k, *p)).collect();
    let config = bootstrap(&Layout {
        admin_port,
        mock_port: b.mock.port,
        tracker_port: b.tracker_port,
        authz_port: b.authz_port,
        extproc_port: b.meter_port,
        wasm: &t.wasm,
        noop_wasm: t.noop_wasm.as_deref(),
        alt_wasm: t.alt_wasm.as_deref(),
        creds,
        listeners: &listeners,
        extra,
    });
    let cfg_path = dir.join(format!("envoy-{label}.json"));
    std::fs::write(&cfg_path, serde_json::to_vec_pretty(&config)?)?;
    let mut cmd = Command::new(&t.envoy);
    cmd.arg("-c")
        .arg(&cfg_path)
        .args(["--concurrency", &concurrency.to_string()])
        .args(["--log-level", "warn"])
        .arg("--disable-hot-restart");
    let mut proc = Proc::spawn("envoy", cmd, &dir.join(format!("envoy-{label}.log")))?;
    let client = http_client()?;
    let ready = format!("http://127.0.0.1:{admin_port}/ready");
    let all_ports: Vec<u16> = ports.values().copied().chain(extra.iter().map(|e| e.1)).collect();
    wait_until(&mut proc, Duration::from_secs(60), || {
        client.get(&ready).send().is_ok_and(|r| r.status().is_success()) && all_ports.iter().all(|&p| port_open(p))
    })
    .with_context(|| format!("envoy config {}", cfg_path.display()))?;
    Ok(Envoy { proc, admin_port, ports })
}

fn request(envoy: &Envoy, creds: &Creds, kind: Kind, upstream: Upstream) -> anyhow::Result<Request> {
    let headers = vec![("authorization".to_string(), creds.authorization(kind))];
    Ok(match upstream {
        Upstream::Direct => Request { url: envoy.url(kind, "/bench")?, headers, body: None },
        Upstream::Mock => {
            Request { url: envoy.url(kind, "/v1/chat/completions")?, headers, body: Some(CHAT_BODY.into()) }
        }
    })
}

/// Every listener allows its credential and (except "no filter") refuses a wrong one.
fn sanity_check(envoy: &Envoy, creds: &Creds, kinds: &[Kind]) -> anyhow::Result<()> {
    let client = http_client()?;
    for &k in kinds {
        let ok = client.get(envoy.url(k, "/bench")?).header("authorization", creds.authorization(k)).send()?;
        if ok.status().as_u16() != 200 {
            bail!("{}: the valid credential got {}: {}", k.label(), ok.status(), ok.text().unwrap_or_default());
        }
        let mock = client
            .post(envoy.url(k, "/v1/chat/completions")?)
            .header("authorization", creds.authorization(k))
            .header("content-type", "application/json")
            .body(CHAT_BODY)
            .send()?;
        if mock.status().as_u16() != 200 {
            bail!("{}: mock request got {}", k.label(), mock.status());
        }
        if k.authenticates() {
            let bad = client.get(envoy.url(k, "/bench")?).header("authorization", "Bearer tg-wrong-key").send()?;
            if bad.status().as_u16() != 401 {
                bail!("{}: a wrong credential got {} (want 401)", k.label(), bad.status());
            }
        }
        if k.sends_jwt() {
            // The signature is checked: the token with a broken signature is refused.
            let tampered = client
                .get(envoy.url(k, "/bench")?)
                .header("authorization", format!("Bearer {}", creds.tampered_jwt()))
                .send()?;
            if tampered.status().as_u16() != 401 {
                bail!(
                    "{}: the {} JWT with a broken signature got {} (want 401)",
                    k.label(),
                    creds.jwt_alg,
                    tampered.status()
                );
            }
        }
    }
    Ok(())
}

/// One measured run: warm-up, then the load, with Envoy's (and the side process')
/// CPU time measured around the measured part only.
fn measure(
    pass: &Pass,
    warmup: u32,
    req: &Request,
    work: &Path,
    envoy_pid: u32,
    side_pids: &[u32],
    probe: Option<&dyn Fn() -> anyhow::Result<f64>>,
) -> anyhow::Result<(LoadResult, f64, f64, Option<f64>)> {
    if warmup > 0 {
        let w = Shape { seconds: warmup, ..pass.shape };
        load::run(&w, req, work).context("warm-up")?;
    }
    // The probe (a counter of another process) is read outside the CPU windows.
    let p0 = probe.map(|p| p()).transpose()?;
    let e0 = sys::cpu_ns(envoy_pid)?;
    let side_ns = || side_pids.iter().map(|&p| sys::cpu_ns(p)).sum::<anyhow::Result<u64>>();
    let s0 = side_ns()?;
    let r = load::run(&pass.shape, req, work)?;
    let e1 = sys::cpu_ns(envoy_pid)?;
    let s1 = side_ns()?;
    let p1 = probe.map(|p| p()).transpose()?;
    let n = r.requests.max(1) as f64;
    let probed = p0.zip(p1).map(|(a, b)| b - a);
    Ok((r, e1.saturating_sub(e0) as f64 / 1000.0 / n, s1.saturating_sub(s0) as f64 / 1000.0 / n, probed))
}

fn run_passes(
    args: &Args,
    t: &Tools,
    b: &Backends,
    creds: &Creds,
    kinds: &[Kind],
    dir: &Path,
    res: &mut Results,
) -> anyhow::Result<()> {
    let tracker = b.tracker_url();
    let syncs = || fleet::tracker_metric(&tracker, "tracker_limit_syncs_total", &[("outcome", "ok")]);
    let resolves = || key_resolves(&tracker);
    for &c in &args.concurrency {
        let envoy = start_envoy(t, b, creds, kinds, c, dir, &format!("all-c{c}"))?;
        sanity_check(&envoy, creds, kinds)?;
        let envoy_pid = envoy.pid()?;
        for pass in passes(args, c) {
            for round in 0..args.rounds {
                // Rotate the order each round so no variant always follows the same one.
                let n = kinds.len();
                for i in 0..n {
                    let Some(&kind) = kinds.get((i + round as usize) % n) else { continue };
                    let req = request(&envoy, creds, kind, pass.upstream)?;
                    let side: Vec<u32> = match kind {
                        Kind::ExtAuthz => vec![b.authz.pid()],
                        Kind::ExtAuthzExtProc => vec![b.authz.pid(), b.meter.pid(), b.tracker.pid()],
                        k if k.meters() || k == Kind::TollgateKeyManaged => vec![b.tracker.pid()],
                        _ => vec![],
                    }
                    .into_iter()
                    .flatten()
                    .collect();
                    // (j): the tracker's syncs and acquires during the measured part;
                    // (k): its key resolves.
                    let probe = match kind {
                        Kind::TollgateLimitsGlobal => Some(&syncs as &dyn Fn() -> anyhow::Result<f64>),
                        Kind::TollgateKeyManaged => Some(&resolves as &dyn Fn() -> anyhow::Result<f64>),
                        _ => None,
                    };
                    let (load, cpu, side_cpu, probed) = measure(&pass, args.warmup, &req, dir, envoy_pid, &side, probe)
                        .with_context(|| format!("{} on {}", pass.name, kind.label()))?;
                    // A JWT variant answering anything but 2xx (the token refused, or expired
                    // mid-run) measures the wrong thing: stop.
                    if kind.sends_jwt() && load.bad > 0 {
                        bail!(
                            "{} on {}: {} of {} requests not 2xx (the {} JWT refused?): not measured",
                            pass.name,
                            kind.label(),
                            load.bad,
                            load.requests + load.bad,
                            creds.jwt_alg
                        );
                    }
                    let (tracker_syncs, key_resolves) = match kind {
                        Kind::TollgateKeyManaged => (None, probed),
                        _ => (probed, None),
                    };
                    eprintln!(
                        "[{}] round {} {:<42} {:>9.0} req/s  p50 {:.3} ms  p99 {:.3} ms  envoy {:.1} µs/req{}{}{}{}",
                        pass.name,
                        round + 1,
                        kind.label(),
                        load.rps,
                        load.p50_ms,
                        load.p99_ms,
                        cpu,
                        if load.bad > 0 { format!("  ({} bad)", load.bad) } else { String::new() },
                        tracker_syncs.map_or(String::new(), |n| format!("  ({n:.0} tracker syncs)")),
                        key_resolves.map_or(String::new(), |n| format!("  ({n:.0} key resolves)")),
                        if side.is_empty() { String::new() } else { format!("  (side {side_cpu:.1} µs/req)") }
                    );
                    res.runs.push(Run {
                        pass: pass.name.clone(),
                        pass_desc: format!(
                            "Envoy --concurrency {c}; {}; {}",
                            pass.shape.describe(),
                            upstream_desc(pass.upstream)
                        ),
                        kind,
                        round,
                        load,
                        envoy_cpu_us: cpu,
                        side_cpu_us: side_cpu,
                        tracker_syncs,
                        key_resolves,
                    });
                }
            }
        }
        if c == 1 && args.stream_runs > 0 {
            res.streams = streaming(args, &envoy, creds, kinds)?;
        }
        drop(envoy);
    }
    Ok(())
}

fn upstream_desc(u: Upstream) -> &'static str {
    match u {
        Upstream::Direct => "GET answered by Envoy's direct_response",
        Upstream::Mock => "POST /v1/chat/completions to the mock model server (16 tokens, non-streaming)",
    }
}

/// POSTs a streaming chat completion over a raw HTTP/1.1 connection and returns
/// (time to the first response byte, total time, body bytes) in ms.
fn stream_once(port: u16, authorization: &str, body: &str, extra: &str) -> anyhow::Result<(f64, f64, usize)> {
    let start = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\nauthorization: {authorization}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n{extra}\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut first = None;
    let mut total = 0usize;
    let mut tail: Vec<u8> = Vec::new();
    let mut head: Vec<u8> = Vec::new();
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if first.is_none() {
            first = Some(start.elapsed());
        }
        let chunk = buf.get(..n).unwrap_or_default();
        if head.len() < 64 {
            head.extend_from_slice(chunk.get(..chunk.len().min(64)).unwrap_or_default());
        }
        total += n;
        tail.extend_from_slice(chunk);
        if tail.len() > 256 {
            tail.drain(..tail.len() - 256);
        }
    }
    let elapsed = start.elapsed();
    if !head.starts_with(b"HTTP/1.1 200") {
        bail!("stream answered {}", String::from_utf8_lossy(&head));
    }
    if !String::from_utf8_lossy(&tail).contains("[DONE]") {
        bail!("stream ended without [DONE]");
    }
    let first = first.context("no response")?;
    Ok((first.as_secs_f64() * 1000.0, elapsed.as_secs_f64() * 1000.0, total))
}

/// A streaming request's body; `asked`: the client asks for usage itself
/// (`stream_options.include_usage`), else Tollgate forces it and strips its event again.
fn stream_body(tokens: u64, asked: bool) -> String {
    let body = json!({"model": "mock-model", "messages": [{"role": "user", "content": "stream please"}],
           "stream": true, "max_tokens": tokens});
    match (asked, body) {
        (true, serde_json::Value::Object(mut fields)) => {
            fields.insert("stream_options".into(), json!({"include_usage": true}));
            serde_json::Value::Object(fields).to_string()
        }
        (_, body) => body.to_string(),
    }
}

/// Samples of one streaming test: (variant, [(time to first byte, total, bytes)]).
type StreamSamples = Vec<(Kind, Vec<(f64, f64, usize)>)>;

/// The streaming tests' samples: the burst with usage asked by the client, the same
/// burst not asked (the filter forces `include_usage` and strips that event), the
/// token-paced stream.
#[derive(Default)]
struct Streams {
    burst: StreamSamples,
    unasked: StreamSamples,
    paced: StreamSamples,
}

/// The streaming tests on (a), (d), (e), (f'), the floors (m), (m') and the
/// `--alt-wasm` builds (d2), (e2) when they run: the burst (`--stream-bytes` as fast as
/// the mock writes), with usage asked by the client and not, and the token-paced
/// stream (`--paced-tokens`, one event every `--paced-delay-ms`), `--stream-runs` each,
/// variants interleaved.
fn streaming(args: &Args, envoy: &Envoy, creds: &Creds, kinds: &[Kind]) -> anyhow::Result<Streams> {
    let which: Vec<Kind> = [
        Kind::NoFilter,
        Kind::TollgateKey,
        Kind::TollgateKeyAlt,
        Kind::TollgateMetered,
        Kind::TollgateMeteredAlt,
        Kind::ExtAuthzExtProc,
        Kind::WasmMeterFloor,
        Kind::WasmFloorFull,
        Kind::TollgateUsageOnly,
        Kind::TollgateMeteredNoInject,
    ]
    .into_iter()
    .filter(|k| kinds.contains(k))
    .collect();
    let Some(&first) = which.first() else { return Ok(Streams::default()) };
    let port = *envoy.ports.get(&first).context("port")?;
    // Calibrate: bytes per token of this stream shape.
    let (_, _, bytes) = stream_once(port, &creds.authorization(first), &stream_body(1000, true), "")?;
    let per_token = (bytes / 1000).max(1);
    let tokens = (args.stream_bytes / per_token).max(1) as u64;
    let burst = stream_runs(args, envoy, creds, &which, &stream_body(tokens, true), "")?;
    eprintln!("[stream] {tokens} tokens, ~{} bytes per response", tokens as usize * per_token);
    let unasked = stream_runs(args, envoy, creds, &which, &stream_body(tokens, false), "")?;
    eprintln!("[stream] the same, usage not asked by the client");
    let paced = if args.paced_tokens > 0 {
        let extra = format!("x-mock-delay-ms: {}\r\n", args.paced_delay_ms);
        let out = stream_runs(args, envoy, creds, &which, &stream_body(args.paced_tokens, true), &extra)?;
        eprintln!("[stream] paced: {} tokens, one every {} ms", args.paced_tokens, args.paced_delay_ms);
        out
    } else {
        Vec::new()
    };
    Ok(Streams { burst, unasked, paced })
}

fn stream_runs(
    args: &Args,
    envoy: &Envoy,
    creds: &Creds,
    which: &[Kind],
    body: &str,
    extra: &str,
) -> anyhow::Result<StreamSamples> {
    let mut out: StreamSamples = which.iter().map(|&k| (k, Vec::new())).collect();
    for (k, _) in &out {
        let p = *envoy.ports.get(k).context("port")?;
        stream_once(p, &creds.authorization(*k), body, extra)?; // warm-up
    }
    for round in 0..args.stream_runs {
        let n = out.len();
        for i in 0..n {
            let idx = (i + round as usize) % n;
            let Some((k, samples)) = out.get_mut(idx) else { continue };
            let p = *envoy.ports.get(k).context("port")?;
            samples.push(stream_once(p, &creds.authorization(*k), body, extra)?);
        }
    }
    Ok(out)
}

/// Global limits: the latency of a request that waits for a lease. One Envoy
/// (`--concurrency 1`: one worker, one replica to the tracker) with two listeners, one
/// with `"scope": "global"` and one with `"scope": "local"`, each with `users` fresh
/// users (own API key, a per-user `requests_per_day` far beyond the run). Per user, on
/// one keep-alive connection, two `GET`s back to back: on the global listener the
/// first finds no lease and waits for one acquire callout (the tracker grants twice
/// the demand, so the second is admitted from the lease); on the local listener both
/// go through the shared-data bucket. The users alternate between the listeners. The
/// local pair shows what else differs between a first and a second request (a new key
/// hashed once, a new limit state).
fn lease_wait(args: &Args, t: &Tools, b: &Backends, creds: &Creds, dir: &Path) -> anyhow::Result<LeaseWait> {
    let n = args.lease_users;
    let users = |prefix: &str| {
        (0..=n)
            .map(|i| {
                let key = harness::dev::new_api_key();
                let entry = harness::dev::key_entry(&key, &format!("{prefix}{i}"), &["lease".to_string()]);
                (key, entry)
            })
            .unzip::<String, serde_json::Value, Vec<_>, Vec<_>>()
    };
    let (g_keys, g_entries) = users("g");
    let (l_keys, l_entries) = users("l");
    let (g_port, l_port) = (free_port()?, free_port()?);
    let extra = vec![
        ("lease_global".to_string(), g_port, lease_wait_config(&g_entries, true)),
        ("lease_local".to_string(), l_port, lease_wait_config(&l_entries, false)),
    ];
    let envoy = start_envoy_extra(t, b, creds, &[], 1, dir, "lease-wait", &extra)?;
    let tracker = format!("http://127.0.0.1:{}", b.tracker_port);
    let syncs = || fleet::tracker_metric(&tracker, "tracker_limit_syncs_total", &[("outcome", "ok")]);
    let s0 = syncs()?;
    let ([global_first, local_first], [global_second, local_second], seconds) =
        first_and_second([g_port, l_port], [&g_keys, &l_keys], n, "lease wait")?;
    let mut out = LeaseWait { users: n, global_first, global_second, local_first, local_second, syncs: 0.0, seconds };
    out.syncs = syncs()? - s0;
    let med = |v: &[f64]| median(v) * 1e6;
    eprintln!(
        "[lease wait] {n} users: global first {:.0} µs, second {:.0} µs; local first {:.0} µs, second {:.0} µs (medians); {} tracker syncs in {:.1} s",
        med(&out.global_first),
        med(&out.global_second),
        med(&out.local_first),
        med(&out.local_second),
        out.syncs,
        out.seconds
    );
    drop(envoy);
    Ok(out)
}

/// The latency of a first request and of the one right after, per fresh credential, on
/// two listeners of one Envoy (one keep-alive connection each): after a warm-up with
/// credential `n` of each (not measured: the first callout opens the connection to the
/// tracker), per credential `i < n` two `GET`s back to back on each listener, which goes
/// first alternating. Seconds: the first and second latencies per listener, the time.
fn first_and_second(
    ports: [u16; 2],
    creds: [&[String]; 2],
    n: usize,
    what: &str,
) -> anyhow::Result<([Vec<f64>; 2], [Vec<f64>; 2], f64)> {
    let mut conns = [Conn::open(ports[0])?, Conn::open(ports[1])?];
    for _ in 0..20 {
        for (conn, keys) in conns.iter_mut().zip(creds) {
            let (status, _) = conn.get("/bench", keys.get(n).context("no warm-up credential")?)?;
            if status != 200 {
                bail!("{what} warm-up: {status}");
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut first = [Vec::with_capacity(n), Vec::with_capacity(n)];
    let mut second = [Vec::with_capacity(n), Vec::with_capacity(n)];
    let t0 = Instant::now();
    for i in 0..n {
        for step in 0..2 {
            let l = (i + step) % 2;
            let (conn, keys) = (conns.get_mut(l).context("listener")?, creds.get(l).context("listener")?);
            let key = keys.get(i).context("credential")?;
            let (s1, t1) = conn.get("/bench", key)?;
            let (s2, t2) = conn.get("/bench", key)?;
            if s1 != 200 || s2 != 200 {
                bail!("{what}: credential {i} on listener {l} got {s1}, {s2}");
            }
            first.get_mut(l).context("listener")?.push(t1);
            second.get_mut(l).context("listener")?.push(t2);
        }
        // Requests one after the other, not a flood: a few per millisecond at most.
        std::thread::sleep(Duration::from_micros(500));
    }
    Ok((first, second, t0.elapsed().as_secs_f64()))
}

/// Writes the table of a [`first_and_second`] measurement; the wait of the first
/// listener's first request beyond the second listener's (medians, µs).
fn first_second_table(md: &mut String, rows: [(&str, &[f64], &[f64]); 2]) -> f64 {
    let _ = writeln!(md, "| listener | first p50 | first p99 | second p50 | second p99 | first − second (p50) |\n|---|---:|---:|---:|---:|---:|");
    for (name, first, second) in rows {
        let _ = writeln!(
            md,
            "| {name} | {:.0} | {:.0} | {:.0} | {:.0} | {:+.0} |",
            us(first, 50.0),
            us(first, 99.0),
            us(second, 50.0),
            us(second, 99.0),
            us(first, 50.0) - us(second, 50.0)
        );
    }
    let [(_, af, a_s), (_, bf, bs)] = rows;
    (us(af, 50.0) - us(a_s, 50.0)) - (us(bf, 50.0) - us(bs, 50.0))
}

/// Lines of the Envoy logs of the passes saying the trackers could not be reached.
fn unreachable_lines(dir: &Path) -> usize {
    pass_log_lines(dir, "trackers cannot be reached")
}

/// Lines of the Envoy logs of the passes containing `needle`.
fn pass_log_lines(dir: &Path, needle: &str) -> usize {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("envoy-all-"))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .map(|text| text.lines().filter(|l| l.contains(needle)).count())
        .sum()
}

/// `tracker_key_resolves_total`, found and unknown together.
fn key_resolves(tracker_url: &str) -> anyhow::Result<f64> {
    let found = fleet::tracker_metric(tracker_url, "tracker_key_resolves_total", &[("outcome", "found")])?;
    let unknown = fleet::tracker_metric(tracker_url, "tracker_key_resolves_total", &[("outcome", "unknown")])?;
    Ok(found + unknown)
}

/// A managed key for `user` (group `group`), created through the tracker's keys API
/// (`POST /v1/keys`, the admin token): the key itself, shown this once.
fn create_managed_key(b: &Backends, user: &str, group: &str) -> anyhow::Result<String> {
    let token = b.admin_token.as_deref().context("the tracker runs without a ledger: no keys API")?;
    let new = harness::keys::NewKey {
        user: user.to_string(),
        groups: vec![group.to_string()],
        name: Some("bench".into()),
        expires_at: None,
    };
    Ok(harness::keys::create_key(&b.tracker_url(), token, &new)?.key)
}

/// Managed keys: the latency of a request that waits for its key's lookup. One Envoy
/// (`--concurrency 1`) with two listeners: one with no static key and `api_keys.remote`
/// to the tracker, with `keys` fresh managed keys (created through the keys API before
/// measuring), one with `keys` fresh static keys in its list. Per key, on one keep-alive
/// connection per listener, two `GET`s back to back: on the managed listener the first
/// finds the key in neither the worker's memo nor the shared cache and waits for one
/// `POST /v1/keys/resolve` (the tracker reads the key from its SQLite ledger, answers, then
/// sets its `last_used_at`); the second finds it in the memo. On the static
/// listener the first hashes the key and finds it in the list, the second in the memo.
/// The keys alternate between the listeners, as in [`lease_wait`].
fn key_wait(args: &Args, t: &Tools, b: &Backends, creds: &Creds, dir: &Path) -> anyhow::Result<KeyWait> {
    let n = args.managed_keys;
    let mut m_keys = Vec::with_capacity(n + 1);
    for i in 0..=n {
        m_keys.push(create_managed_key(b, &format!("m{i}"), GROUP)?);
    }
    let (s_keys, s_entries): (Vec<String>, Vec<serde_json::Value>) = (0..=n)
        .map(|i| {
            let key = harness::dev::new_api_key();
            let entry = harness::dev::key_entry(&key, &format!("s{i}"), &[GROUP.to_string()]);
            (key, entry)
        })
        .unzip();
    let (m_port, s_port) = (free_port()?, free_port()?);
    let extra = vec![
        ("keys_managed".to_string(), m_port, key_wait_config(&[], true)),
        ("keys_static".to_string(), s_port, key_wait_config(&s_entries, false)),
    ];
    let envoy = start_envoy_extra(t, b, creds, &[], 1, dir, "key-wait", &extra)?;
    let tracker = b.tracker_url();
    let r0 = key_resolves(&tracker)?;
    let ([managed_first, static_first], [managed_second, static_second], seconds) =
        first_and_second([m_port, s_port], [&m_keys, &s_keys], n, "key wait")?;
    let mut out = KeyWait {
        keys: n,
        managed_first,
        managed_second,
        static_first,
        static_second,
        resolves: 0.0,
        seconds,
        direct: Vec::with_capacity(n),
    };
    out.resolves = key_resolves(&tracker)? - r0;
    // The tracker's part: the same lookups straight from here (the Envoy idle).
    let client = http_client()?;
    let url = format!("{tracker}/v1/keys/resolve");
    for key in m_keys.iter().take(n) {
        let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(key.as_bytes()));
        let body = json!({ "sha256": digest }).to_string();
        let start = Instant::now();
        let r = client.post(&url).header("content-type", "application/json").body(body).send()?;
        let status = r.status().as_u16();
        let _ = r.bytes()?;
        out.direct.push(start.elapsed().as_secs_f64());
        if status != 200 {
            bail!("key wait: the tracker resolved a managed key with {status}");
        }
    }
    let med = |v: &[f64]| median(v) * 1e6;
    eprintln!(
        "[key wait] {n} keys: managed first {:.0} µs, second {:.0} µs; static first {:.0} µs, second {:.0} µs (medians); {} key resolves in {:.1} s; a resolve straight at the tracker {:.0} µs",
        med(&out.managed_first),
        med(&out.managed_second),
        med(&out.static_first),
        med(&out.static_second),
        out.resolves,
        out.seconds,
        med(&out.direct)
    );
    drop(envoy);
    Ok(out)
}

/// Global limits on a fleet: `admitted − limit` for each size, global and local scope.
fn overshoot(args: &Args, res: &mut Results) {
    let sizes: Vec<usize> = args.overshoot_gateways.iter().copied().filter(|&n| n > 0).collect();
    if sizes.is_empty() {
        return;
    }
    if let Err(e) = harness::postgres::bin_dir() {
        let msg = format!("overshoot skipped: {e:#}");
        eprintln!("bench-run: {msg}");
        res.global.overshoot_note = Some(msg);
        return;
    }
    for n in sizes {
        for global in [true, false] {
            match fleet::overshoot(n, global, args.overshoot_requests, args.overshoot_limit) {
                Ok(r) => res.global.overshoot.push(r),
                Err(e) => {
                    let msg =
                        format!("overshoot, {n} gateways, scope {}: {e:#}", if global { "global" } else { "local" });
                    eprintln!("bench-run: {msg}");
                    res.notes.push(msg);
                }
            }
        }
    }
}

fn admin_memory(admin_port: u16) -> String {
    http_client()
        .ok()
        .and_then(|c| c.get(format!("http://127.0.0.1:{admin_port}/memory")).send().ok())
        .and_then(|r| r.json::<serde_json::Value>().ok())
        .map(|v| {
            let get = |k: &str| v.get(k).and_then(|x| x.as_str()).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
            format!("heap allocated {:.1} MiB", get("allocated") as f64 / 1_048_576.0)
        })
        .unwrap_or_else(|| "admin /memory unavailable".into())
}

fn memory_and_leak(
    args: &Args,
    t: &Tools,
    b: &Backends,
    creds: &Creds,
    dir: &Path,
    res: &mut Results,
) -> anyhow::Result<()> {
    let warm = 20_000u64;
    let mut rows = Vec::new();
    for (label, kind) in [
        ("no filter", Kind::NoFilter),
        ("Envoy jwt_authn + cache", Kind::JwtAuthnCached),
        ("Tollgate + limits + metering", Kind::TollgateMetered),
    ] {
        let envoy = start_envoy(t, b, creds, &[kind], 1, dir, &format!("mem-{}", kind.slug()))?;
        let pid = envoy.pid()?;
        let idle = sys::rss_kib(pid)?;
        let req = request(&envoy, creds, kind, Upstream::Direct)?;
        load::run_count(args.h2_connections, args.h2_streams, warm, &req, dir)?;
        let after = sys::rss_kib(pid)?;
        rows.push((
            label.to_string(),
            format!(
                "{:.1} MiB idle, {:.1} MiB after {warm} requests ({})",
                idle as f64 / 1024.0,
                after as f64 / 1024.0,
                admin_memory(envoy.admin_port)
            ),
        ));

        if kind == Kind::TollgateMetered && args.leak_requests > 0 {
            // Alternate API key and JWT quarters; 1 in 4 requests goes to the mock model
            // server (usage parsed and charged), the rest to the direct response.
            let quarter = (args.leak_requests / 4).max(1);
            let mut series = vec![(warm, after, 0u64)];
            let started = Instant::now();
            let mut done = warm;
            for q in 0..4u32 {
                let kind_for_creds = if q % 2 == 0 { Kind::TollgateKey } else { Kind::TollgateJwt };
                let base = envoy.url(kind, "")?;
                let mut r = Request {
                    url: format!("{base}/bench"),
                    headers: vec![("authorization".into(), creds.authorization(kind_for_creds))],
                    body: Some(CHAT_BODY.into()),
                };
                // h2load cycles through the URIs it is given.
                r.url = format!("{base}/bench {base}/bench {base}/bench {base}/v1/chat/completions");
                let res_q = load_multi(args, quarter, &r, dir)?;
                done += quarter;
                let rss = sys::rss_kib(pid)?;
                series.push((done, rss, res_q));
                eprintln!("[leak] {done} requests: RSS {:.1} MiB", rss as f64 / 1024.0);
            }
            res.leak_note = format!(
                "{} requests after a {warm}-request warm-up, in 4 quarters (API key, JWT, API key, JWT); 3 in 4 to the direct response, 1 in 4 a chat completion through the mock model server (usage read, tokens charged, event sent); {:.0} s; {}",
                quarter * 4,
                started.elapsed().as_secs_f64(),
                admin_memory(envoy.admin_port)
            );
            res.leak = series;
        }
        drop(envoy);
    }
    res.memory = rows;
    Ok(())
}

/// h2load over several URIs (space-separated in `req.url`), `count` requests; returns failures.
fn load_multi(args: &Args, count: u64, req: &Request, dir: &Path) -> anyhow::Result<u64> {
    let body = dir.join("leak-body.json");
    std::fs::write(&body, req.body.as_deref().unwrap_or(""))?;
    let mut cmd = Command::new("h2load");
    cmd.args([
        "-t1",
        "-c",
        &args.h2_connections.to_string(),
        "-m",
        &args.h2_streams.to_string(),
        "-n",
        &count.to_string(),
    ]);
    for (k, v) in &req.headers {
        cmd.args(["-H", &format!("{k}: {v}")]);
    }
    cmd.arg("-d").arg(&body).args(["-H", "content-type: application/json"]);
    cmd.args(req.url.split(' '));
    let out = cmd.output().context("run h2load")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let r = load::parse_h2load(&text).with_context(|| format!("h2load:\n{text}"))?;
    if r.bad > 0 {
        bail!("leak check: {} requests failed:\n{text}", r.bad);
    }
    Ok(r.bad)
}

/// `jwt_alg`: the `--jwt-alg` of the run, for the `jwt` and `jwt-cached` modes.
fn native(t: &Tools, jwt_alg: &str, dir: &Path, res: &mut Results) -> anyhow::Result<()> {
    let out = Command::new(&t.sse).output().context("run sse-throughput")?;
    if !out.status.success() {
        bail!("sse-throughput failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    res.native.extend(String::from_utf8_lossy(&out.stdout).lines().map(|l| format!("sse-throughput: {l}")));
    let modes = ["key", "jwt", "jwt-cached", "limits", "event", "json-usage"];
    for mode in modes {
        // An uncached RS256/ES256 verification takes a few hundred µs: fewer iterations.
        let iterations = if mode == "jwt" && jwt_alg != "HS256" { "2000" } else { "200000" };
        let out = Command::new(&t.auth_cost)
            .args(["--mode", mode, "--jwt-alg", jwt_alg, "--iterations", iterations])
            .output()?;
        if !out.status.success() {
            bail!("auth-cost {mode} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        res.native.extend(String::from_utf8_lossy(&out.stdout).lines().map(|l| format!("auth-cost: {l}")));
    }
    if Command::new("valgrind").arg("--version").output().is_err() {
        res.notes.push("valgrind not found: instruction counts skipped".into());
        return Ok(());
    }
    let (n1, n2) = (1_000u64, 11_000u64);
    for mode in modes {
        let mut irs = Vec::new();
        for n in [n1, n2] {
            let file = dir.join(format!("callgrind.{mode}.{n}.out"));
            let out = Command::new("valgrind")
                .args(["--tool=callgrind"])
                .arg(format!("--callgrind-out-file={}", file.display()))
                .arg(&t.auth_cost)
                .args(["--mode", mode, "--jwt-alg", jwt_alg, "--iterations", &n.to_string()])
                .output()?;
            let err = String::from_utf8_lossy(&out.stderr);
            let ir: u64 = err
                .lines()
                .find_map(|l| l.split("Collected :").nth(1))
                .and_then(|v| v.trim().parse().ok())
                .with_context(|| format!("no callgrind total for {mode}:\n{err}"))?;
            irs.push(ir);
            if n == n2 && matches!(mode, "key" | "jwt" | "jwt-cached") {
                let ann = Command::new("callgrind_annotate").arg(&file).output().ok();
                let text = ann.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
                res.callgrind_top.push((mode.to_string(), top_functions(&text, 8)));
            }
        }
        let (a, b) = (irs.first().copied().unwrap_or(0), irs.get(1).copied().unwrap_or(0));
        let per_op = b.saturating_sub(a) as f64 / (n2 - n1) as f64;
        res.callgrind.push((mode.to_string(), per_op, a as f64));
    }
    Ok(())
}

/// The first `n` function lines of `callgrind_annotate` output (self cost).
fn top_functions(text: &str, n: usize) -> String {
    let mut lines = Vec::new();
    let mut started = false;
    for l in text.lines() {
        if l.contains("file:function") {
            started = true;
            continue;
        }
        if started {
            let t = l.trim();
            if t.is_empty() {
                if !lines.is_empty() {
                    break;
                }
                continue;
            }
            if t.starts_with("--") {
                continue;
            }
            lines.push(t.chars().take(160).collect::<String>());
            if lines.len() >= n {
                break;
            }
        }
    }
    lines.join("\n")
}

// ----- report -----

struct Agg {
    rps: f64,
    rps_lo: f64,
    rps_hi: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    cpu: f64,
    side: f64,
    bad: u64,
    /// Median over rounds of this variant's rps divided by (a)'s rps in the same round.
    vs_a: f64,
    vs_b: f64,
    cpu_vs_a: f64,
}

fn aggregate(runs: &[Run], pass: &str, kind: Kind, rounds: u32) -> Option<Agg> {
    let mine: Vec<&Run> = runs.iter().filter(|r| r.pass == pass && r.kind == kind).collect();
    if mine.is_empty() {
        return None;
    }
    let col = |f: &dyn Fn(&Run) -> f64| median(&mine.iter().map(|r| f(r)).collect::<Vec<_>>());
    let rps_of = |k: Kind, round: u32| {
        runs.iter().find(|r| r.pass == pass && r.kind == k && r.round == round).map(|r| r.load.rps)
    };
    let cpu_of = |k: Kind, round: u32| {
        runs.iter().find(|r| r.pass == pass && r.kind == k && r.round == round).map(|r| r.envoy_cpu_us)
    };
    let mut vs_a = Vec::new();
    let mut vs_b = Vec::new();
    let mut cpu_vs_a = Vec::new();
    for round in 0..rounds {
        let Some(me) = rps_of(kind, round) else { continue };
        if let Some(a) = rps_of(Kind::NoFilter, round) {
            vs_a.push(me / a);
        }
        let b = [rps_of(Kind::JwtAuthn, round), rps_of(Kind::JwtAuthnCached, round)]
            .into_iter()
            .flatten()
            .fold(f64::NAN, f64::max);
        if b.is_finite() {
            vs_b.push(me / b);
        }
        if let (Some(c), Some(ca)) = (cpu_of(kind, round), cpu_of(Kind::NoFilter, round)) {
            cpu_vs_a.push(c - ca);
        }
    }
    let (lo, hi) = min_max(&mine.iter().map(|r| r.load.rps).collect::<Vec<_>>());
    Some(Agg {
        rps: col(&|r| r.load.rps),
        rps_lo: lo,
        rps_hi: hi,
        p50: col(&|r| r.load.p50_ms),
        p90: col(&|r| r.load.p90_ms),
        p99: col(&|r| r.load.p99_ms),
        cpu: col(&|r| r.envoy_cpu_us),
        side: col(&|r| r.side_cpu_us),
        bad: mine.iter().map(|r| r.load.bad).sum(),
        vs_a: median(&vs_a),
        vs_b: median(&vs_b),
        cpu_vs_a: median(&cpu_vs_a),
    })
}

fn fmt_ratio(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2}")
    } else {
        "–".into()
    }
}

fn report(
    args: &Args,
    facts: &[(String, String)],
    kinds: &[Kind],
    res: &Results,
    command: &str,
    started: &str,
    elapsed: Duration,
) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Tollgate benchmark run — {started}\n");
    let _ = writeln!(md, "Command: `{command}` ({:.1} min)\n", elapsed.as_secs_f64() / 60.0);
    let _ = writeln!(md, "| | |\n|---|---|");
    for (k, v) in facts {
        let _ = writeln!(md, "| {k} | {} |", v.replace('|', "\\|"));
    }
    let _ = writeln!(
        md,
        "| method | {} rounds × {} s measured (+{} s warm-up per run), variants interleaved and rotated each round; medians over rounds; ratios computed per round then medianed |",
        args.rounds, args.duration, args.warmup
    );
    let _ = writeln!(
        md,
        "\nVariants: {}\n",
        kinds.iter().map(|k| format!("({}) {}", k.id(), k.label())).collect::<Vec<_>>().join("; ")
    );
    let _ = writeln!(
        md,
        "Columns: **×a** = throughput relative to (a) no filter; **×b** = relative to the better of the two jwt_authn variants; **+p50** = added median latency vs (a); **CPU/req** = Envoy process CPU time per request (all threads); **+CPU** = added vs (a); **side CPU** = CPU per request of the processes outside Envoy: the ext_authz service (f); the usage tracker (e, i, j, k, m, m'); the ext_authz service, the metering ext_proc service and the tracker together (f'); **+CPU with side** = +CPU plus side CPU. Every request carries an `authorization` header (the JWT for b, b', c, c', c2: {}, valid {} h; the API key otherwise, unused by a and h).\n",
        args.jwt_alg,
        tollgate_bench::variants::JWT_TTL_SECS / 3600
    );
    let mut pass_names: Vec<(String, String)> = Vec::new();
    for r in &res.runs {
        if !pass_names.iter().any(|(n, _)| n == &r.pass) {
            pass_names.push((r.pass.clone(), r.pass_desc.clone()));
        }
    }
    for (pass, desc) in &pass_names {
        let _ = writeln!(md, "## {pass}\n\n{desc}\n");
        let _ = writeln!(md, "| variant | req/s (min–max) | ×a | ×b | p50 ms | p90 ms | p99 ms | +p50 µs | CPU/req µs | +CPU µs | side CPU µs | +CPU with side µs | non-2xx |");
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let base = aggregate(&res.runs, pass, Kind::NoFilter, args.rounds);
        for &k in kinds {
            let Some(a) = aggregate(&res.runs, pass, k, args.rounds) else { continue };
            let added = base.as_ref().map_or(f64::NAN, |b| (a.p50 - b.p50) * 1000.0);
            let (side, with_side) = if has_side(k) {
                (format!("{:.1}", a.side), format!("{:+.1}", a.cpu_vs_a + a.side))
            } else {
                (String::new(), format!("{:+.1}", a.cpu_vs_a))
            };
            let _ = writeln!(
                md,
                "| ({}) {} | {:.0} ({:.0}–{:.0}) | {} | {} | {:.3} | {:.3} | {:.3} | {:+.0} | {:.1} | {:+.1} | {} | {} | {} |",
                k.id(),
                k.label(),
                a.rps,
                a.rps_lo,
                a.rps_hi,
                fmt_ratio(a.vs_a),
                fmt_ratio(a.vs_b),
                a.p50,
                a.p90,
                a.p99,
                added,
                a.cpu,
                a.cpu_vs_a,
                side,
                with_side,
                a.bad
            );
        }
        let _ = writeln!(md);
    }
    jwt_report(&mut md, args, kinds, res, &pass_names);
    global_report(&mut md, args, kinds, res, &pass_names);
    managed_report(&mut md, args, kinds, res, &pass_names);
    whole_path_report(&mut md, args, kinds, res, &pass_names);
    stream_table(
        &mut md,
        &format!(
            "## Streaming: one SSE chat completion of ~{} KiB, as fast as the mock writes (Envoy --concurrency 1)\n",
            args.stream_bytes / 1024
        ),
        args,
        &res.streams.burst,
    );
    stream_table(
        &mut md,
        &format!(
            "## Streaming, usage not asked: the same ~{} KiB stream without `stream_options` (Tollgate forces `include_usage` and strips its event again)\n",
            args.stream_bytes / 1024
        ),
        args,
        &res.streams.unasked,
    );
    stream_table(
        &mut md,
        &format!(
            "## Streaming, token-paced: {} tokens, one event every {} ms (Envoy --concurrency 1)\n",
            args.paced_tokens, args.paced_delay_ms
        ),
        args,
        &res.streams.paced,
    );
    if !res.memory.is_empty() {
        let _ = writeln!(md, "## Memory (Envoy --concurrency 1, one listener, RSS)\n\n| Envoy with | RSS |\n|---|---|");
        for (k, v) in &res.memory {
            let _ = writeln!(md, "| {k} | {v} |");
        }
        let _ = writeln!(md);
    }
    if !res.leak.is_empty() {
        let _ = writeln!(md, "### Leak check: Tollgate + limits + metering\n\n{}\n", res.leak_note);
        let _ = writeln!(md, "| requests served | RSS MiB |\n|---:|---:|");
        for (n, rss, _) in &res.leak {
            let _ = writeln!(md, "| {n} | {:.1} |", *rss as f64 / 1024.0);
        }
        if let (Some(mid), Some(last)) = (res.leak.get(2), res.leak.last()) {
            let growth = last.1 as f64 - mid.1 as f64;
            let reqs = last.0.saturating_sub(mid.0).max(1) as f64;
            let _ = writeln!(
                md,
                "\nGrowth over the second half: {:+.1} MiB ({:+.2} bytes per request).\n",
                growth / 1024.0,
                growth * 1024.0 / reqs
            );
        }
    }
    if !res.native.is_empty() || !res.callgrind.is_empty() {
        let _ = writeln!(md, "## Native: the filter's pure logic (release profile, x86-64)\n");
        let _ = writeln!(md, "```");
        for l in &res.native {
            let _ = writeln!(md, "{l}");
        }
        let _ = writeln!(md, "```\n");
        if !res.callgrind.is_empty() {
            let _ = writeln!(md, "Instructions per operation (callgrind, (Ir at 11 000 − Ir at 1 000) / 10 000):\n\n| operation | instructions |\n|---|---:|");
            for (mode, ir, _) in &res.callgrind {
                let _ = writeln!(md, "| {mode} | {ir:.0} |");
            }
            let _ = writeln!(md);
        }
        for (mode, top) in &res.callgrind_top {
            let _ = writeln!(
                md,
                "<details><summary>callgrind top functions (self), {mode}</summary>\n\n```\n{top}\n```\n</details>\n"
            );
        }
    }
    for n in &res.notes {
        let _ = writeln!(md, "- {n}");
    }
    md
}

/// Whether the metering variants' events reached the tracker: the filter's own count of
/// events lost (its warning in the Envoy logs), the metering service's last counters
/// (its log), and the tracker's count of the floors' events (user `floor`) against the
/// floors' requests (the measured ones only: a lower bound of what they sent).
fn delivery(b: &Backends, kinds: &[Kind], res: &Results, dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let metered = [
        Kind::TollgateMetered,
        Kind::TollgateMeteredAlt,
        Kind::TollgateLimitsLocal,
        Kind::TollgateLimitsGlobal,
        Kind::TollgateUsageOnly,
        Kind::TollgateMeteredNoInject,
    ];
    if kinds.iter().any(|k| metered.contains(k)) {
        let lost = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("envoy-all-"))
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .flat_map(|text| {
                text.lines()
                    .filter_map(|l| l.split("usage events lost so far: ").nth(1))
                    .filter_map(|rest| rest.split(' ').next()?.parse::<u64>().ok())
                    .collect::<Vec<_>>()
            })
            .max()
            .unwrap_or(0);
        let requests: u64 = res.runs.iter().filter(|r| metered.contains(&r.kind)).map(|r| r.load.requests).sum();
        out.push(format!(
            "Tollgate's metered variants: at most {lost} usage events lost to queue overflow per worker (the filter's own warning, largest count in the Envoy logs), against {requests} measured metered requests."
        ));
    }
    if kinds.contains(&Kind::ExtAuthzExtProc) {
        let log = std::fs::read_to_string(dir.join("meter-extproc.log")).unwrap_or_default();
        let last =
            log.lines().rev().find(|l| l.starts_with("meter-extproc: ")).unwrap_or("meter-extproc: no counters logged");
        let requests: u64 = res.runs.iter().filter(|r| r.kind == Kind::ExtAuthzExtProc).map(|r| r.load.requests).sum();
        out.push(format!("(f'): {last} (measured (f') requests: {requests}; warm-ups and checks add to the streams)."));
    }
    if kinds.iter().any(|k| k.is_floor()) {
        let got =
            fleet::tracker_metric(&b.tracker_url(), "llm_requests_total", &[("user", "floor")]).unwrap_or(f64::NAN);
        let requests: u64 = res.runs.iter().filter(|r| r.kind.is_floor()).map(|r| r.load.requests).sum();
        out.push(format!(
            "(m), (m'): the tracker counted {got:.0} floor events, against {requests} measured floor requests (plus warm-ups)."
        ));
    }
    out
}

/// Whether the variant has processes outside Envoy whose CPU is measured.
fn has_side(k: Kind) -> bool {
    matches!(k, Kind::ExtAuthz | Kind::ExtAuthzExtProc | Kind::TollgateKeyManaged) || k.meters()
}

fn stream_label(k: Kind) -> String {
    match k {
        Kind::NoFilter => "(a) no filter".to_string(),
        Kind::TollgateKey => "(d) Tollgate, auth only (no metering)".to_string(),
        Kind::TollgateMetered => "(e) Tollgate, limits + metering (SSE parsed)".to_string(),
        Kind::ExtAuthzExtProc => "(f') ext_authz + ext_proc metering (SSE parsed in the service)".to_string(),
        other => format!("({}) {}", other.id(), other.label()),
    }
}

/// A streaming test's table: medians of time to first byte and total, and their
/// difference from (a)'s.
fn stream_table(md: &mut String, title: &str, args: &Args, samples: &[(Kind, Vec<(f64, f64, usize)>)]) {
    if samples.is_empty() {
        return;
    }
    let _ = writeln!(md, "{title}");
    let _ = writeln!(md, "Median of {} requests per variant, interleaved, new connection each; time to the first response byte and to the end of the stream.\n", args.stream_runs);
    let _ = writeln!(
        md,
        "| variant | TTFB ms | TTFB − a ms | total ms | total − a ms | total ×a | body bytes |\n|---|---:|---:|---:|---:|---:|---:|"
    );
    let med = |s: &[(f64, f64, usize)], f: fn(&(f64, f64, usize)) -> f64| median(&s.iter().map(f).collect::<Vec<_>>());
    let base = samples.iter().find(|(k, _)| *k == Kind::NoFilter).map(|(_, s)| (med(s, |x| x.0), med(s, |x| x.1)));
    for (k, s) in samples {
        let (ttfb, total) = (med(s, |x| x.0), med(s, |x| x.1));
        let (bt, bl) = base.unwrap_or((f64::NAN, f64::NAN));
        let bytes = s.first().map_or(0, |x| x.2);
        let _ = writeln!(
            md,
            "| {} | {ttfb:.2} | {:+.2} | {total:.2} | {:+.2} | {} | {bytes} |",
            stream_label(*k),
            ttfb - bt,
            total - bl,
            fmt_ratio(total / bl)
        );
    }
    let _ = writeln!(md);
}

/// Issue 19, the whole path: per pass, the added CPU per request (Envoy, and with the
/// processes outside it) of (d), (e), (f'), the floors, and the ratios the issue asks
/// for; per-round medians of each variant minus (a) in the same round.
fn whole_path_report(md: &mut String, args: &Args, kinds: &[Kind], res: &Results, pass_names: &[(String, String)]) {
    let want = [Kind::TollgateKey, Kind::TollgateMetered, Kind::ExtAuthzExtProc];
    if !want.iter().any(|k| kinds.contains(k)) {
        return;
    }
    let _ = writeln!(md, "## The whole path (issue 19): (e) against auth alone, its floor and its peer\n");
    let _ = writeln!(md, "Added CPU µs per request vs (a) (median over rounds of the per-round difference); **+side** adds the CPU per request of the variant's processes outside Envoy (tracker for e, m, m'; auth service + metering ext_proc service + tracker for f'). (e)/(d): Envoy CPU added by the whole path over auth alone (the issue's target: ≤ 2 in the c1 passes). (f')/(e): the peer's cost over Tollgate's, Envoy only and with the services.\n");
    let _ = writeln!(md, "| pass | (d) | (h') | (m) | (m') | (e) | (e) +side | (f') | (f') +side | (e)/(d) | (e)−(m') | (f')/(e) Envoy | (f')/(e) +side | ×a (e) | ×a (f') | +p50 µs (e) / (f') |");
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (pass, _) in pass_names {
        let agg = |k: Kind| kinds.contains(&k).then(|| aggregate(&res.runs, pass, k, args.rounds)).flatten();
        let base = agg(Kind::NoFilter);
        let cpu = |k: Kind| agg(k).map_or(f64::NAN, |a| a.cpu_vs_a);
        let side = |k: Kind| agg(k).map_or(f64::NAN, |a| a.cpu_vs_a + a.side);
        let f = |x: f64| if x.is_finite() { format!("{x:+.1}") } else { "–".into() };
        let vs_a = |k: Kind| agg(k).map_or(f64::NAN, |a| a.vs_a);
        let p50 = |k: Kind| match (agg(k), &base) {
            (Some(a), Some(b)) => format!("{:+.0}", (a.p50 - b.p50) * 1000.0),
            _ => "–".into(),
        };
        let (d, e, fp) = (cpu(Kind::TollgateKey), cpu(Kind::TollgateMetered), cpu(Kind::ExtAuthzExtProc));
        let _ = writeln!(
            md,
            "| {pass} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} |",
            f(d),
            f(cpu(Kind::WasmHostCalls)),
            f(cpu(Kind::WasmMeterFloor)),
            f(cpu(Kind::WasmFloorFull)),
            f(e),
            f(side(Kind::TollgateMetered)),
            f(fp),
            f(side(Kind::ExtAuthzExtProc)),
            fmt_ratio(e / d),
            f(e - cpu(Kind::WasmFloorFull)),
            fmt_ratio(fp / e),
            fmt_ratio(side(Kind::ExtAuthzExtProc) / side(Kind::TollgateMetered)),
            fmt_ratio(vs_a(Kind::TollgateMetered)),
            fmt_ratio(vs_a(Kind::ExtAuthzExtProc)),
            p50(Kind::TollgateMetered),
            p50(Kind::ExtAuthzExtProc)
        );
    }
    let _ = writeln!(md, "\n{}\n", res.delivery.join(" "));
}

/// Median over rounds of `f(run of a) ` − `f(run of b)` in the same round.
fn per_round_diff(runs: &[Run], pass: &str, a: Kind, b: Kind, rounds: u32, f: impl Fn(&Run) -> f64) -> f64 {
    let of = |k: Kind, round: u32| runs.iter().find(|r| r.pass == pass && r.kind == k && r.round == round).map(&f);
    let diffs: Vec<f64> = (0..rounds).filter_map(|round| Some(of(a, round)? - of(b, round)?)).collect();
    median(&diffs)
}

fn us(seconds: &[f64], p: f64) -> f64 {
    let mut v: Vec<f64> = seconds.iter().map(|s| s * 1e6).collect();
    v.sort_by(f64::total_cmp);
    percentile_sorted(&v, p)
}

/// The section on global limits (issue 15): (j) vs (i), the lease wait, the overshoot.
fn global_report(md: &mut String, args: &Args, kinds: &[Kind], res: &Results, pass_names: &[(String, String)]) {
    let (local, global) = (Kind::TollgateLimitsLocal, Kind::TollgateLimitsGlobal);
    if !kinds.contains(&global) {
        return;
    }
    let _ = writeln!(md, "## Global limits (issue 15)\n");
    if kinds.contains(&local) {
        let _ = writeln!(
            md,
            "(i) and (j): API key, the group limited to `requests_per_minute: {}` (never reached) and `usage` to the local tracker; they differ in `limits.scope` only: (i) local (the shared-data token bucket, one compare-and-swap per request), (j) global (a per-worker lease from `POST /v1/limits/sync`). **+** = median over rounds of (variant − (a)) in the same round; **(j)−(i)** = median over rounds of the difference in the same round; **(j)/(i)** = ratio of the added medians; **p99** = median over rounds; **(j) syncs** = the tracker's `tracker_limit_syncs_total{{outcome=\"ok\"}}` over one measured run of (j) (periodic syncs, about one a second per worker, and acquires of requests that found their lease short), median over rounds, and (j)'s requests per sync.\n",
            tollgate_bench::variants::NEVER_REACHED
        );
        let _ = writeln!(md, "| pass | +CPU µs (i) local | +CPU µs (j) global | CPU (j)−(i) µs | +CPU (j)/(i) | +p50 µs (i) | +p50 µs (j) | +p50 (j)/(i) | ×a (i) | ×a (j) | p99 ms (i) / (j) | (j) syncs per run | (j) requests per sync | tracker CPU µs (i) / (j) | non-2xx (i) / (j) |");
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for (pass, _) in pass_names {
            let (Some(i), Some(j)) =
                (aggregate(&res.runs, pass, local, args.rounds), aggregate(&res.runs, pass, global, args.rounds))
            else {
                continue;
            };
            let Some(a) = aggregate(&res.runs, pass, Kind::NoFilter, args.rounds) else { continue };
            let cpu_diff = per_round_diff(&res.runs, pass, global, local, args.rounds, |r| r.envoy_cpu_us);
            let (p50_i, p50_j) = ((i.p50 - a.p50) * 1000.0, (j.p50 - a.p50) * 1000.0);
            let j_runs: Vec<&Run> = res.runs.iter().filter(|r| r.pass == *pass && r.kind == global).collect();
            let syncs = median(&j_runs.iter().filter_map(|r| r.tracker_syncs).collect::<Vec<_>>());
            let per_sync = median(
                &j_runs
                    .iter()
                    .filter_map(|r| Some(r.load.requests as f64 / r.tracker_syncs?.max(1.0)))
                    .collect::<Vec<_>>(),
            );
            let _ = writeln!(
                md,
                "| {pass} | {:+.1} | {:+.1} | {cpu_diff:+.1} | {} | {p50_i:+.0} | {p50_j:+.0} | {} | {} | {} | {:.2} / {:.2} | {syncs:.0} | {per_sync:.0} | {:.1} / {:.1} | {} / {} |",
                i.cpu_vs_a,
                j.cpu_vs_a,
                fmt_ratio(j.cpu_vs_a / i.cpu_vs_a),
                fmt_ratio(p50_j / p50_i),
                fmt_ratio(i.vs_a),
                fmt_ratio(j.vs_a),
                i.p99,
                j.p99,
                i.side,
                j.side,
                i.bad,
                j.bad
            );
        }
        let _ = writeln!(md);
    }
    let bad: u64 = res.runs.iter().filter(|r| r.kind == global).map(|r| r.load.bad).sum();
    let served: u64 = res.runs.iter().filter(|r| r.kind == global).map(|r| r.load.requests).sum();
    let _ = writeln!(
        md,
        "(j) admitted from leases: {served} measured requests, {bad} not 2xx; the tracker answered `tracker_limit_syncs_total{{outcome=\"ok\"}}` = {} syncs and acquires of (j)'s workers over the passes; lines \"trackers cannot be reached\" in the Envoy logs: {}.\n",
        res.global.pass_syncs_ok.map_or("?".to_string(), |v| format!("{v:.0}")),
        res.global.unreachable_logs
    );
    if let Some(w) = &res.global.lease_wait {
        let _ = writeln!(
            md,
            "### Waiting for a lease\n\nEnvoy --concurrency 1, {} fresh users per listener (own API key, a per-user `requests_per_day` never reached), one keep-alive HTTP/1.1 connection per listener, per user two `GET`s back to back (direct response), users alternating between the listeners. Global: the first request of a user finds no lease and waits for one acquire callout to the tracker (loopback, in memory); the grant covers two requests, so the second is admitted from the lease. Local: the same pair through the shared-data bucket, for what else a first request costs (its key hashed once, a new limit state). Latency from the request written to the response read, µs.\n",
            w.users
        );
        let wait = first_second_table(
            md,
            [
                ("scope global (first waits for the lease)", &w.global_first, &w.global_second),
                ("scope local", &w.local_first, &w.local_second),
            ],
        );
        // One periodic sync per second (the default interval) besides the acquires.
        let one_acquire_each = w.syncs <= w.users as f64 + w.seconds.ceil() + 1.0;
        let _ = writeln!(
            md,
            "\nThe wait for a lease alone (global first − second, less local first − second, medians): **{wait:+.0} µs**. Tracker syncs (acquires and periodic syncs) while measuring: {:.0} in {:.1} s for {} users: {}.\n",
            w.syncs,
            w.seconds,
            w.users,
            if one_acquire_each {
                "at most one acquire per user (plus about one periodic sync a second), so the second requests were admitted from the lease"
            } else {
                "more than one acquire per user: some second requests waited as well"
            }
        );
    }
    if !res.global.overshoot.is_empty() || res.global.overshoot_note.is_some() {
        let _ = writeln!(
            md,
            "### Overshoot on a fleet\n\nharness fleet: N gateway Envoys (2 workers each, so 2N replicas to the trackers), 2 tracker replicas on one PostgreSQL; one user with `requests_per_hour: {}`; {} `POST /v1/chat/completions` released at once (one thread each, new connection each, round robin over the gateways).\n",
            args.overshoot_limit, args.overshoot_requests
        );
        if let Some(note) = &res.global.overshoot_note {
            let _ = writeln!(md, "{note}\n");
        }
        if !res.global.overshoot.is_empty() {
            let _ = writeln!(md, "| gateways × workers | scope | admitted | admitted − limit | 429 | other | seconds | tracker syncs ok |\n|---|---|---:|---:|---:|---:|---:|---:|");
            for r in &res.global.overshoot {
                let _ = writeln!(
                    md,
                    "| {} × 2 | {} | {} of {} | **{:+}** | {} | {} | {:.2} | {:.0} |",
                    r.gateways,
                    if r.global { "global" } else { "local" },
                    r.admitted,
                    r.sent,
                    r.over(),
                    r.refused,
                    r.other,
                    r.seconds,
                    r.syncs_ok
                );
            }
            let _ = writeln!(md);
        }
    }
}

/// The section on managed keys (issue 16): (k) vs (d), the resolves, the first-request wait.
fn managed_report(md: &mut String, args: &Args, kinds: &[Kind], res: &Results, pass_names: &[(String, String)]) {
    let (fixed, managed) = (Kind::TollgateKey, Kind::TollgateKeyManaged);
    if !kinds.contains(&managed) {
        return;
    }
    let _ = writeln!(md, "## Managed keys (issue 16)\n");
    if kinds.contains(&fixed) {
        let _ = writeln!(
            md,
            "(d) and (k): the same config (100 static keys, the JWT provider, no limits, no usage); (k) adds `api_keys.remote` to the local tracker (the filter's defaults: `ttl_seconds` 60, revocations polled every 5 s) and its load sends a managed key (created through `POST /v1/keys` before the passes, in no static list), (d)'s one of the static keys. After its first lookup per worker (and one per worker every `ttl_seconds`) a (k) request finds its key in the worker's memo. **+** = median over rounds of (variant − (a)) in the same round; **(k)−(d)** = median over rounds of the difference in the same round; **(k)/(d)** = ratio of the added medians; **p99** = median over rounds; **resolves** = `tracker_key_resolves_total` over the measured runs of (k) (sum over rounds).\n"
        );
        let _ = writeln!(md, "| pass | +CPU µs (d) static | +CPU µs (k) managed | CPU (k)−(d) µs | +CPU (k)/(d) | +p50 µs (d) | +p50 µs (k) | ×a (d) | ×a (k) | p99 ms (d) / (k) | (k) resolves | non-2xx (d) / (k) |");
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for (pass, _) in pass_names {
            let (Some(d), Some(k)) =
                (aggregate(&res.runs, pass, fixed, args.rounds), aggregate(&res.runs, pass, managed, args.rounds))
            else {
                continue;
            };
            let Some(a) = aggregate(&res.runs, pass, Kind::NoFilter, args.rounds) else { continue };
            let cpu_diff = per_round_diff(&res.runs, pass, managed, fixed, args.rounds, |r| r.envoy_cpu_us);
            let resolves: f64 =
                res.runs.iter().filter(|r| r.pass == *pass && r.kind == managed).filter_map(|r| r.key_resolves).sum();
            let _ = writeln!(
                md,
                "| {pass} | {:+.1} | {:+.1} | {cpu_diff:+.1} | {} | {:+.0} | {:+.0} | {} | {} | {:.2} / {:.2} | {resolves:.0} | {} / {} |",
                d.cpu_vs_a,
                k.cpu_vs_a,
                fmt_ratio(k.cpu_vs_a / d.cpu_vs_a),
                (d.p50 - a.p50) * 1000.0,
                (k.p50 - a.p50) * 1000.0,
                fmt_ratio(d.vs_a),
                fmt_ratio(k.vs_a),
                d.p99,
                k.p99,
                d.bad,
                k.bad
            );
        }
        let _ = writeln!(md);
    }
    let bad: u64 = res.runs.iter().filter(|r| r.kind == managed).map(|r| r.load.bad).sum();
    let served: u64 = res.runs.iter().filter(|r| r.kind == managed).map(|r| r.load.requests).sum();
    let fmt = |v: Option<f64>| v.map_or("?".to_string(), |v| format!("{v:.0}"));
    let _ = writeln!(
        md,
        "(k): {served} measured requests, {bad} not 2xx; over the whole passes (warm-ups and sanity checks included) the tracker answered `tracker_key_resolves_total{{outcome=\"found\"}}` = {} and `{{outcome=\"unknown\"}}` = {} (the sanity check's wrong key, once per Envoy); Envoy log lines about the key service: {}.\n",
        fmt(res.managed.found),
        fmt(res.managed.unknown),
        res.managed.key_service_logs
    );
    if let Some(w) = &res.managed.key_wait {
        let _ = writeln!(
            md,
            "### The first request of a new key\n\nEnvoy --concurrency 1, {} fresh keys per listener, one keep-alive HTTP/1.1 connection per listener, per key two `GET`s back to back (direct response), keys alternating between the listeners. Managed: no static key, `api_keys.remote` to the tracker (SQLite ledger, loopback; `max_lookups_per_second` raised to 1000 so the bound refuses none); the first request of a key misses the worker's memo and the shared cache and waits for one `POST /v1/keys/resolve` (the tracker reads the key, answers, then sets its `last_used_at`); the second finds it in the memo. Static: the keys in the listener's list; the first request hashes the key, the second finds it in the memo. Latency from the request written to the response read, µs.\n",
            w.keys
        );
        let wait = first_second_table(
            md,
            [
                ("managed (first waits for the lookup)", &w.managed_first, &w.managed_second),
                ("static", &w.static_first, &w.static_second),
            ],
        );
        let _ = writeln!(
            md,
            "\nThe wait for the lookup alone (managed first − second, less static first − second, medians): **{wait:+.0} µs**; managed first − static first: p50 {:+.0} µs, p99 {:+.0} µs. Key resolves while measuring: {:.0} in {:.1} s for {} keys{}.\n",
            us(&w.managed_first, 50.0) - us(&w.static_first, 50.0),
            us(&w.managed_first, 99.0) - us(&w.static_first, 99.0),
            w.resolves,
            w.seconds,
            w.keys,
            if w.resolves <= w.keys as f64 { ": one lookup per key at most, the second requests came from the memo" } else { ": more than one per key" }
        );
        let _ = writeln!(
            md,
            "The tracker's part: the same {} keys resolved again straight at the tracker (`POST /v1/keys/resolve` from `bench-run`, reqwest, keep-alive, one after the other; a found key's `last_used_at` is written after the answer): p50 {:.0} µs, p99 {:.0} µs.\n",
            w.direct.len(),
            us(&w.direct, 50.0),
            us(&w.direct, 99.0)
        );
    }
}

/// Issue 17: what verifying the JWT costs, uncached ((c') vs (b): both verify every
/// request's signature) and cached ((c) vs (b')), in added Envoy CPU per request vs (a),
/// the ratios taken per round then medianed.
fn jwt_report(md: &mut String, args: &Args, kinds: &[Kind], res: &Results, passes: &[(String, String)]) {
    let pairs = [(Kind::TollgateJwtUncached, Kind::JwtAuthn), (Kind::TollgateJwt, Kind::JwtAuthnCached)];
    if !pairs.iter().any(|(a, b)| kinds.contains(a) && kinds.contains(b)) {
        return;
    }
    let _ = writeln!(
        md,
        "## JWT verification ({}): Tollgate vs jwt_authn, uncached and cached\n\nAdded Envoy CPU µs per request vs (a), medians over rounds; the ratios are taken per round, then medianed (rounds whose denominator is under 1 µs are left out). Uncached: (c') `jwt.cache_entries: 0` and (b) without `jwt_cache_config` verify every request's signature; cached: (c) and (b') verify once, then hit their caches.\n",
        args.jwt_alg
    );
    let _ =
        writeln!(md, "| pass | +CPU (b) | +CPU (b') | +CPU (c) | +CPU (c') | (c')/(b) uncached | (c)/(b') cached |");
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|");
    let added = |pass: &str, k: Kind, round: u32| {
        let cpu = |k: Kind| {
            res.runs.iter().find(|r| r.pass == pass && r.kind == k && r.round == round).map(|r| r.envoy_cpu_us)
        };
        cpu(k).zip(cpu(Kind::NoFilter)).map(|(me, a)| me - a)
    };
    for (pass, _) in passes {
        let med = |k: Kind| {
            let v: Vec<f64> = (0..args.rounds).filter_map(|r| added(pass, k, r)).collect();
            if v.is_empty() {
                "–".to_string()
            } else {
                format!("{:+.1}", median(&v))
            }
        };
        let ratio = |num: Kind, den: Kind| {
            let v: Vec<f64> = (0..args.rounds)
                .filter_map(|r| Some((added(pass, num, r)?, added(pass, den, r)?)))
                // A denominator within the noise (under 1 µs, or negative) makes no ratio.
                .filter(|&(_, d)| d >= 1.0)
                .map(|(n, d)| n / d)
                .collect();
            if v.is_empty() {
                "–".to_string()
            } else {
                fmt_ratio(median(&v))
            }
        };
        let _ = writeln!(
            md,
            "| {pass} | {} | {} | {} | {} | {} | {} |",
            med(Kind::JwtAuthn),
            med(Kind::JwtAuthnCached),
            med(Kind::TollgateJwt),
            med(Kind::TollgateJwtUncached),
            ratio(Kind::TollgateJwtUncached, Kind::JwtAuthn),
            ratio(Kind::TollgateJwt, Kind::JwtAuthnCached)
        );
    }
    let _ = writeln!(md);
}

fn csv(res: &Results) -> String {
    let mut s = String::from(
        "pass,variant,round,requests,seconds,rps,p50_ms,p90_ms,p99_ms,bad,envoy_cpu_us_per_req,side_cpu_us_per_req,tracker_syncs,key_resolves\n",
    );
    for r in &res.runs {
        let _ = writeln!(
            s,
            "{},{},{},{},{:.3},{:.1},{:.4},{:.4},{:.4},{},{:.2},{:.2},{},{}",
            r.pass,
            r.kind.slug(),
            r.round + 1,
            r.load.requests,
            r.load.seconds,
            r.load.rps,
            r.load.p50_ms,
            r.load.p90_ms,
            r.load.p99_ms,
            r.load.bad,
            r.envoy_cpu_us,
            r.side_cpu_us,
            r.tracker_syncs.map_or(String::new(), |n| format!("{n:.0}")),
            r.key_resolves.map_or(String::new(), |n| format!("{n:.0}"))
        );
    }
    s
}

fn stamp() -> (String, String) {
    let out = Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ|%Y%m%d-%H%M%S"]).output().ok();
    let text = out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
    let (human, file) = text.split_once('|').unwrap_or(("unknown date", "run"));
    (human.to_string(), file.to_string())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let begin = Instant::now();
    let command =
        std::env::args().map(|a| if a.contains(' ') { format!("'{a}'") } else { a }).collect::<Vec<_>>().join(" ");
    let kinds: Vec<Kind> = if args.variants.is_empty() {
        Kind::ALL.into_iter().filter(|k| !k.diagnostic()).collect()
    } else {
        let mut v = Vec::new();
        for s in &args.variants {
            v.push(
                Kind::from_slug(s)
                    .ok_or_else(|| anyhow!("unknown variant {s:?}; one of {}", Kind::ALL.map(Kind::slug).join(", ")))?,
            );
        }
        if !v.contains(&Kind::NoFilter) {
            v.insert(0, Kind::NoFilter); // the baseline every ratio needs
        }
        v
    };
    let mut t = tools()?;
    t.alt_wasm = args.alt_wasm.clone();
    // The overshoot fleet (harness::stack) runs the tracker this run runs (release).
    if std::env::var_os("TOLLGATE_TRACKER_BIN").is_none() {
        std::env::set_var("TOLLGATE_TRACKER_BIN", &t.tracker);
    }
    let mut kinds = kinds;
    match &args.alt_wasm {
        Some(p) if !p.exists() => bail!("--alt-wasm {}: no such file", p.display()),
        Some(_) => {
            // Each alt beside its counterpart, when that one runs.
            for (k, base) in [
                (Kind::TollgateJwtAlt, Kind::TollgateJwt),
                (Kind::TollgateKeyAlt, Kind::TollgateKey),
                (Kind::TollgateMeteredAlt, Kind::TollgateMetered),
            ] {
                if !args.variants.is_empty() && kinds.contains(&base) && !kinds.contains(&k) {
                    kinds.push(k);
                }
            }
        }
        None => kinds.retain(|k| !k.needs_alt_wasm()),
    }
    if t.noop_wasm.is_none() {
        kinds.retain(|&k| !k.needs_noop_wasm());
        eprintln!("bench-run: {NOOP_WASM} not built (bench/build-noop-wasm.sh): variant (h) skipped");
    }
    let dir = harness::paths::run_dir("bench")?;
    eprintln!("bench-run: work dir {}", dir.display());
    let mut facts = sys::machine_facts(&t.envoy, &t.wasm);
    facts.push((
        "JWT (b, b', c, c', c2)".into(),
        format!(
            "{} (`--jwt-alg`), `kid`, one token sent over and over, valid {} h",
            args.jwt_alg,
            tollgate_bench::variants::JWT_TTL_SECS / 3600
        ),
    ));
    let (started, file_stamp) = stamp();
    let mut creds = Creds::with_jwt_alg(args.keys, &args.jwt_alg)?;
    eprintln!("bench-run: JWT variants sign {} (exp {})", creds.jwt_alg, creds.jwt_exp);
    let managed = kinds.contains(&Kind::TollgateKeyManaged);
    let backends = start_backends(&t, &dir, &creds, managed)?;
    if managed {
        creds.managed_key = Some(create_managed_key(&backends, "managed0", GROUP)?);
    }
    let mut res = Results::default();
    run_passes(&args, &t, &backends, &creds, &kinds, &dir, &mut res)?;
    res.delivery = delivery(&backends, &kinds, &res, &dir);
    for line in &res.delivery {
        eprintln!("bench-run: {line}");
    }
    if managed {
        let tracker = backends.tracker_url();
        let resolves = |outcome| fleet::tracker_metric(&tracker, "tracker_key_resolves_total", &[("outcome", outcome)]);
        res.managed.found = resolves("found").ok();
        res.managed.unknown = resolves("unknown").ok();
        res.managed.key_service_logs = pass_log_lines(&dir, "key service");
        eprintln!(
            "bench-run: (k) managed: tracker_key_resolves_total found {:?}, unknown {:?} after the passes; {} log lines about the key service",
            res.managed.found, res.managed.unknown, res.managed.key_service_logs
        );
        if args.managed_keys > 0 {
            res.managed.key_wait = Some(key_wait(&args, &t, &backends, &creds, &dir)?);
        }
    }
    if kinds.contains(&Kind::TollgateLimitsGlobal) {
        let tracker = format!("http://127.0.0.1:{}", backends.tracker_port);
        res.global.pass_syncs_ok =
            fleet::tracker_metric(&tracker, "tracker_limit_syncs_total", &[("outcome", "ok")]).ok();
        res.global.unreachable_logs = unreachable_lines(&dir);
        eprintln!(
            "bench-run: (j) global: tracker_limit_syncs_total{{outcome=\"ok\"}} = {:?} after the passes; {} log lines of unreachable trackers",
            res.global.pass_syncs_ok, res.global.unreachable_logs
        );
        if args.lease_users > 0 {
            res.global.lease_wait = Some(lease_wait(&args, &t, &backends, &creds, &dir)?);
        }
    }
    if args.leak_requests > 0 {
        memory_and_leak(&args, &t, &backends, &creds, &dir, &mut res)?;
    }
    drop(backends);
    if kinds.contains(&Kind::TollgateLimitsGlobal) {
        overshoot(&args, &mut res);
    }
    if !args.no_native {
        native(&t, &args.jwt_alg, &dir, &mut res)?;
    }
    let md = report(&args, &facts, &kinds, &res, &command, &started, begin.elapsed());
    let out_dir = args.out.clone().unwrap_or_else(|| harness::paths::workspace_root().join("bench/results"));
    std::fs::create_dir_all(&out_dir)?;
    let md_path = out_dir.join(format!("{file_stamp}.md"));
    std::fs::write(&md_path, &md)?;
    std::fs::write(out_dir.join(format!("{file_stamp}.csv")), csv(&res))?;
    std::fs::write(out_dir.join("latest.md"), &md)?;
    println!("{md}");
    eprintln!(
        "bench-run: wrote {} (and .csv, latest.md) in {:.1} min",
        md_path.display(),
        begin.elapsed().as_secs_f64() / 60.0
    );
    Ok(())
}
