//! `usage-tracking`: parses the command line, opens the ledger (restoring the counters
//! from it), binds, and serves until SIGTERM or SIGINT (Kubernetes sends SIGTERM),
//! letting requests in flight finish so no batch is cut. With a ledger, compaction runs
//! in the background.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use usage_tracking::cli::{secret_from_env, Store, ADMIN_TOKEN_ENV, API_TOKEN_ENV, INGEST_TOKEN_ENV};
use usage_tracking::{serve, Args, Ledger, Tracker};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The secrets first: a refused one stops the start before anything is opened.
    let api_token = secret_from_env(API_TOKEN_ENV).map_err(anyhow::Error::msg)?;
    let ingest_token = secret_from_env(INGEST_TOKEN_ENV).map_err(anyhow::Error::msg)?;
    let admin_token = secret_from_env(ADMIN_TOKEN_ENV).map_err(anyhow::Error::msg)?;
    let limits = args.limits();
    let replica = args.replica();
    let ledger = match args.store() {
        Store::Memory => None,
        Store::Sqlite(dir) => {
            let ledger = tokio::task::spawn_blocking(move || Ledger::open_sqlite(&dir, &replica)).await??;
            Some(Arc::new(ledger))
        }
        Store::Postgres(url) => Some(Arc::new(Ledger::open_postgres(&url, &replica).await?)),
    };
    let tracker = match &ledger {
        None => Tracker::new(limits),
        Some(ledger) => Tracker::with_ledger(limits, Arc::clone(ledger)).await?,
    }
    .with_api_token(api_token.as_deref())
    .with_ingest_token(ingest_token.as_deref())
    .with_admin_token(admin_token.as_deref());
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let address = listener.local_addr().context("listener has no local address")?;
    let dedup = match ledger {
        None => format!("dedup window {} ids", limits.dedup_window),
        Some(_) => "dedup by the ledger".to_owned(),
    };
    println!(
        "usage-tracking {} listening on {address} (max body {} bytes, max batch {}, {dedup}, max users {})",
        env!("CARGO_PKG_VERSION"),
        limits.max_body_bytes,
        limits.max_batch,
        limits.max_users,
    );
    match &ledger {
        None => println!(
            "usage-tracking: WARNING: no ledger (--data-dir or --database-url): usage is kept in memory only; \
             a restart loses the counters and every event not yet scraped"
        ),
        Some(ledger) => println!(
            "usage-tracking: ledger {} (replica {:?}, retention {} days): counters restored, \
             every batch is committed before it is acknowledged",
            ledger.describe(),
            ledger.replica(),
            args.retention_days,
        ),
    }
    if ingest_token.is_none() {
        println!(
            "usage-tracking: WARNING: {INGEST_TOKEN_ENV} is not set: POST /track takes usage from anyone who can \
             reach it; set it (and the gateway's usage.token_env) so only the gateway can report usage"
        );
    } else {
        println!("usage-tracking: POST /track requires the bearer token in {INGEST_TOKEN_ENV}");
    }
    if api_token.is_none() {
        println!("usage-tracking: usage API off ({API_TOKEN_ENV} not set)");
    } else if ledger.is_none() {
        println!("usage-tracking: usage API off (it needs the ledger)");
    } else {
        println!("usage-tracking: usage API on: GET /v1/usage, GET /v1/usage/recent");
    }
    if admin_token.is_none() {
        println!("usage-tracking: keys API off ({ADMIN_TOKEN_ENV} not set)");
    } else if ledger.is_none() {
        println!("usage-tracking: keys API off (it needs the ledger)");
    } else {
        println!("usage-tracking: keys API on: POST /v1/keys, GET /v1/keys, DELETE /v1/keys/{{id}}");
    }
    let tracker = Arc::new(tracker);
    if let Some(ledger) = ledger {
        let interval = Duration::from_secs(u64::from(args.compact_interval_secs));
        tokio::spawn(compact_forever(Arc::clone(&tracker), ledger, args.retention_days, interval));
    }
    serve(listener, tracker, shutdown_signal()).await.context("server failed")?;
    println!("usage-tracking stopped");
    Ok(())
}

/// Compacts events past the retention into daily totals now and every `interval`.
/// A failure is logged and counted and tried again next time: nothing is lost by
/// compacting late.
async fn compact_forever(tracker: Arc<Tracker>, ledger: Arc<Ledger>, retention_days: u32, interval: Duration) {
    loop {
        match ledger.compact(usage_tracking::time::now_ms(), retention_days).await {
            Ok(0) => {}
            Ok(moved) => println!("usage-tracking: compacted {moved} events older than {retention_days} days"),
            Err(error) => {
                tracker.ledger_error("compact");
                eprintln!("usage-tracking: compaction: {error}");
            }
        }
        tokio::time::sleep(interval).await;
    }
}

/// Resolves on the first SIGINT or SIGTERM. A signal that cannot be installed is
/// never awaited, rather than counted as received.
async fn shutdown_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
}
