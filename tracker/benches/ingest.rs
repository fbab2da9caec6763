//! Ingest throughput: events per second that one tracker thread takes over real HTTP.
//!
//! The server runs on a `current_thread` tokio runtime (one core), the client on
//! another, so the number is what one core of the tracker can do. Every event has a new
//! id (the dedup window keeps evicting, as in production) and the events spread over
//! 50 users, 4 group sets and 5 models.
//!
//! Run: `cargo bench -p usage-tracking --bench ingest`
//! Knobs (environment): BENCH_EVENTS (default 1000000), BENCH_BATCH (500),
//! BENCH_CONNECTIONS (4).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use usage_tracking::{serve, Limits, Tracker};

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

/// Serves on a `current_thread` runtime until `stop`; returns the CPU seconds it used.
fn run_server(
    batch: u64,
    address: std::sync::mpsc::Sender<std::net::SocketAddr>,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> anyhow::Result<Option<f64>> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let cpu_start = thread_cpu_seconds();
        address.send(listener.local_addr()?)?;
        let limits = Limits { max_batch: usize::try_from(batch)?, ..Limits::default() };
        serve(listener, Arc::new(Tracker::new(limits)), async move {
            let _ = stop.await;
        })
        .await?;
        Ok(cpu_start.zip(thread_cpu_seconds()).map(|(start, end)| end - start))
    })
}

fn main() -> anyhow::Result<()> {
    let total = env_number("BENCH_EVENTS", 1_000_000);
    let batch = env_number("BENCH_BATCH", 500).max(1);
    let connections = env_number("BENCH_CONNECTIONS", 4).max(1);
    let batches = total.div_ceil(batch);

    // Server: one thread, one current_thread runtime.
    let (address_tx, address_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::Builder::new()
        .name("tracker-server".into())
        .spawn(move || run_server(batch, address_tx, stop_rx))?;
    let address = address_rx.recv()?;
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
        "ingest: {events} events in {batches} batches of {batch} over {connections} connections: {seconds:.2} s, {:.0} events/s (server: one current_thread runtime)",
        events as f64 / seconds
    );
    if let Some(cpu) = server_cpu.filter(|cpu| *cpu > 0.0) {
        println!(
            "ingest: server thread used {cpu:.2} CPU s: {:.0} events per CPU second (includes warm-up)",
            events as f64 / cpu
        );
    }
    Ok(())
}
