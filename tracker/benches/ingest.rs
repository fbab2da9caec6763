//! Ingest throughput: events per second that one tracker takes over real HTTP, in
//! memory only and with each durable ledger, side by side in the same run (so the ratio
//! is measured under the same machine load).
//!
//! The server runs on a `current_thread` tokio runtime (one core), the client on
//! another, so the number is what one core of the tracker can do; SQLite's writes run
//! on tokio's blocking threads, PostgreSQL in its own processes. Every event has a new
//! id (the dedup window keeps evicting, as in production; the ledger's unique index
//! grows) and the events spread over 50 users, 4 group sets and 5 models.
//!
//! Run: `cargo bench -p usage-tracking --bench ingest`
//! Knobs (environment): BENCH_EVENTS (default 1000000), BENCH_BATCH (500),
//! BENCH_CONNECTIONS (4), BENCH_STORES (memory,sqlite,postgres). PostgreSQL is
//! BENCH_DATABASE_URL if set, else a throwaway server from tests/pg.sh (skipped when
//! PostgreSQL is not installed). SQLite writes to a temporary directory
//! (BENCH_DATA_DIR to choose the disk).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use usage_tracking::{serve, Ledger, Limits, Tracker};

/// CPU seconds used so far by the calling thread (Linux; `None` elsewhere). The machine
/// may be shared, so events per CPU second of the server thread is the steadier number.
fn thread_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    // Fields after the ")" that ends the thread name: utime and stime are the 12th and 13th.
    let mut fields = stat.get(stat.rfind(')')? + 2..)?.split(' ');
    let utime: f64 = fields.nth(11)?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / 100.0) // USER_HZ is 100 on Linux
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One batch with `BATCHNUM` where the batch number goes, so ids are unique per batch.
fn template(batch: u64) -> String {
    let groups = ["[\"free\"]", "[\"premium\"]", "[\"free\",\"premium\"]", "\"premium,staff\""];
    let events: Vec<String> = (0..batch)
        .map(|i| {
            format!(
                concat!(
                    r#"{{"id":"BATCHNUM-{i:05}","ts":1763800000.125,"user":"user-{user}","groups":{groups},"#,
                    r#""method":"POST","host":"gw.example","path":"/v1/chat/completions","model":"model-{model}","#,
                    r#""status":200,"prompt_tokens":{prompt},"completion_tokens":{completion},"cached_tokens":0,"#,
                    r#""reasoning_tokens":0,"incomplete":false,"denied":null}}"#
                ),
                i = i,
                user = i % 50,
                groups = groups.get((i % 4) as usize).copied().unwrap_or("[]"),
                model = i % 5,
                prompt = 10 + i % 100,
                completion = 5 + i % 300,
            )
        })
        .collect();
    format!("[{}]", events.join(","))
}

/// Where the tracker under test keeps usage.
#[derive(Debug, Clone)]
enum Store {
    Memory,
    Sqlite(std::path::PathBuf),
    Postgres(String),
}

impl Store {
    fn name(&self) -> &'static str {
        match self {
            Store::Memory => "memory",
            Store::Sqlite(_) => "sqlite",
            Store::Postgres(_) => "postgres",
        }
    }
}

/// Serves on a `current_thread` runtime until `stop`; returns the CPU seconds it used.
fn run_server(
    batch: u64,
    store: Store,
    address: std::sync::mpsc::Sender<std::net::SocketAddr>,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> anyhow::Result<Option<f64>> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let limits = Limits { max_batch: usize::try_from(batch)?, ..Limits::default() };
        let tracker = match &store {
            Store::Memory => Tracker::new(limits),
            Store::Sqlite(dir) => Tracker::with_ledger(limits, Arc::new(Ledger::open_sqlite(dir, "bench")?)).await?,
            Store::Postgres(url) => {
                Tracker::with_ledger(limits, Arc::new(Ledger::open_postgres(url, "bench").await?)).await?
            }
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let cpu_start = thread_cpu_seconds();
        address.send(listener.local_addr()?)?;
        serve(listener, Arc::new(tracker), async move {
            let _ = stop.await;
        })
        .await?;
        Ok(cpu_start.zip(thread_cpu_seconds()).map(|(start, end)| end - start))
    })
}

/// A fresh PostgreSQL database: in BENCH_DATABASE_URL's server, else in a throwaway
/// server started by tests/pg.sh (stopped when this process exits); `None` if there is
/// no PostgreSQL.
fn postgres_database() -> anyhow::Result<Option<String>> {
    let server = match std::env::var("BENCH_DATABASE_URL") {
        Ok(url) => url,
        Err(_) => {
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/pg.sh");
            let output = std::process::Command::new("bash")
                .arg(script)
                .arg(std::process::id().to_string())
                .stderr(std::process::Stdio::inherit())
                .output()?;
            match output.status.code() {
                Some(0) => String::from_utf8(output.stdout)?.trim().to_owned(),
                Some(77) => return Ok(None),
                _ => anyhow::bail!("tests/pg.sh could not start PostgreSQL"),
            }
        }
    };
    let name = format!("bench_{}", std::process::id());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(&server, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        client.batch_execute(&format!("DROP DATABASE IF EXISTS {name}")).await?;
        client.batch_execute(&format!("CREATE DATABASE {name}")).await?;
        Ok::<_, anyhow::Error>(())
    })?;
    let (base, _) = server.rsplit_once('/').ok_or_else(|| anyhow::anyhow!("bad database URL {server}"))?;
    Ok(Some(format!("{base}/{name}")))
}

struct Run {
    store: &'static str,
    events: u64,
    seconds: f64,
    server_cpu: Option<f64>,
}

fn main() -> anyhow::Result<()> {
    let total = env_number("BENCH_EVENTS", 1_000_000);
    let batch = env_number("BENCH_BATCH", 500).max(1);
    let connections = env_number("BENCH_CONNECTIONS", 4).max(1);
    let stores = std::env::var("BENCH_STORES").unwrap_or_else(|_| "memory,sqlite,postgres".into());
    let mut runs = Vec::new();
    for name in stores.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let mut temp = None;
        let store = match name {
            "memory" => Store::Memory,
            "sqlite" => {
                let parent = std::env::var_os("BENCH_DATA_DIR").map_or_else(std::env::temp_dir, Into::into);
                let dir = parent.join(format!("tollgate-bench-{}", std::process::id()));
                temp = Some(dir.clone());
                Store::Sqlite(dir)
            }
            "postgres" => match postgres_database()? {
                Some(url) => Store::Postgres(url),
                None => {
                    println!("ingest: postgres skipped: no PostgreSQL server binaries (and no BENCH_DATABASE_URL)");
                    continue;
                }
            },
            other => anyhow::bail!("BENCH_STORES: unknown store {other:?} (memory, sqlite, postgres)"),
        };
        let run = run(store, total, batch, connections);
        if let Some(dir) = temp {
            let _ = std::fs::remove_dir_all(dir);
        }
        runs.push(run?);
    }
    let memory = runs.iter().find(|r| r.store == "memory").map(|r| r.events as f64 / r.seconds);
    println!("ingest: summary ({batch} events per batch, {connections} connections)");
    for r in &runs {
        let rate = r.events as f64 / r.seconds;
        let ratio = memory.map(|m| format!(", {:.2}× memory", rate / m)).unwrap_or_default();
        let cpu = r
            .server_cpu
            .filter(|c| *c > 0.0)
            .map(|c| format!(", server async thread {c:.2} CPU s"))
            .unwrap_or_default();
        println!("  {:<8} {:>9.0} events/s{ratio}{cpu}", r.store, rate);
    }
    Ok(())
}

/// One timed run against a fresh tracker on `store`.
fn run(store: Store, total: u64, batch: u64, connections: u64) -> anyhow::Result<Run> {
    let batches = total.div_ceil(batch);
    let name = store.name();

    // Server: one thread, one current_thread runtime.
    let (address_tx, address_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::Builder::new()
        .name("tracker-server".into())
        .spawn(move || run_server(batch, store, address_tx, stop_rx))?;
    let address = match address_rx.recv() {
        Ok(address) => address,
        Err(_) => {
            server.join().map_err(|_| anyhow::anyhow!("server thread panicked"))??;
            anyhow::bail!("the server stopped before listening");
        }
    };
    let url = format!("http://{address}/track");

    // Client: its own runtime on one worker thread.
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let template = Arc::new(template(batch));
    let elapsed = runtime.block_on(async move {
        let client = reqwest::Client::builder().no_proxy().build()?;
        let post = |client: reqwest::Client, url: String, body: String| async move {
            let response = client.post(url).header("content-type", "application/json").body(body).send().await?;
            anyhow::ensure!(response.status() == 200, "status {}", response.status());
            let answer: serde_json::Value = serde_json::from_slice(&response.bytes().await?)?;
            Ok::<u64, anyhow::Error>(answer.get("accepted").and_then(serde_json::Value::as_u64).unwrap_or(0))
        };
        // Warm-up (ids that the timed run never uses).
        for n in 0..4 {
            post(client.clone(), url.clone(), template.replace("BATCHNUM", &format!("warm{n}"))).await?;
        }
        let next = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let mut workers = Vec::new();
        for _ in 0..connections {
            let (client, url, template, next) = (client.clone(), url.clone(), Arc::clone(&template), Arc::clone(&next));
            workers.push(tokio::spawn(async move {
                let mut accepted = 0;
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= batches {
                        return Ok::<u64, anyhow::Error>(accepted);
                    }
                    let body = template.replace("BATCHNUM", &format!("{n:08}"));
                    accepted += post(client.clone(), url.clone(), body).await?;
                }
            }));
        }
        let mut accepted = 0;
        for worker in workers {
            accepted += worker.await??;
        }
        let elapsed = start.elapsed();
        anyhow::ensure!(accepted == batches * batch, "accepted {accepted} of {} events", batches * batch);
        Ok::<_, anyhow::Error>(elapsed)
    })?;

    let _ = stop_tx.send(());
    let server_cpu = server.join().map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    let events = batches * batch;
    let seconds = elapsed.as_secs_f64();
    println!(
        "ingest [{name}]: {events} events in {batches} batches of {batch} over {connections} connections: {seconds:.2} s, {:.0} events/s (server: one current_thread runtime)",
        events as f64 / seconds
    );
    if let Some(cpu) = server_cpu.filter(|cpu| *cpu > 0.0) {
        println!(
            "ingest [{name}]: server async thread used {cpu:.2} CPU s: {:.0} events per CPU second (includes warm-up{})",
            events as f64 / cpu,
            if name == "memory" { "" } else { "; ledger writes run elsewhere" }
        );
    }
    Ok(Run { store: name, events, seconds, server_cpu })
}
