//! `usage-tracking`: parses the command line, binds, and serves until SIGTERM or SIGINT
//! (Kubernetes sends SIGTERM), letting requests in flight finish so no batch is cut.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use usage_tracking::{serve, Args, Tracker};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let limits = args.limits();
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let address = listener.local_addr().context("listener has no local address")?;
    println!(
        "usage-tracking {} listening on {address} (max body {} bytes, max batch {}, dedup window {} ids, max users {})",
        env!("CARGO_PKG_VERSION"),
        limits.max_body_bytes,
        limits.max_batch,
        limits.dedup_window,
        limits.max_users,
    );
    serve(listener, Arc::new(Tracker::new(limits)), shutdown_signal()).await.context("server failed")?;
    println!("usage-tracking stopped");
    Ok(())
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
