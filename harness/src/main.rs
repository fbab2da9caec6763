//! `tollgate`: start the local stack, mint dev credentials.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use harness::devconfig::DevCredentials;
use harness::fault::FaultMode;
use harness::stack::{Stack, StackOptions};
use harness::{dev, mock};

#[derive(Parser)]
#[command(name = "tollgate", version, about = "Tollgate local stack and credential tools")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start Envoy with the filter, the mock model server, the tracker and Prometheus.
    Up(UpArgs),
    /// Run only the mock OpenAI-compatible model server.
    Mock {
        #[arg(long, default_value = "127.0.0.1:8000")]
        listen: String,
    },
    /// API keys.
    Key {
        #[command(subcommand)]
        command: KeyCmd,
    },
    /// Mint an HS256 JWT.
    Jwt {
        /// The HMAC secret (its raw bytes are the key).
        #[arg(long, env = "TOLLGATE_JWT_SECRET")]
        secret: String,
        #[arg(long)]
        kid: Option<String>,
        #[arg(long, default_value = "dev")]
        iss: String,
        #[arg(long)]
        sub: String,
        /// Comma-separated groups.
        #[arg(long, default_value = "")]
        groups: String,
        /// Lifetime such as 15m, 1h, 7d; `none` for a token without `exp`.
        #[arg(long, default_value = "1h")]
        ttl: String,
        #[arg(long)]
        aud: Option<String>,
    },
    /// Print the JWKS (Istio RequestAuthentication format) for an HS256 secret.
    Jwks {
        #[arg(long, env = "TOLLGATE_JWT_SECRET")]
        secret: String,
        #[arg(long)]
        kid: Option<String>,
    },
    /// Render the Istio bundle's credentials Secret and WasmPlugin pluginConfig from a users file.
    Render(harness::render::RenderArgs),
}

#[derive(Subcommand)]
enum KeyCmd {
    /// Generate a fresh 256-bit key and print its config entry (only the digest is stored).
    New {
        #[arg(long)]
        user: String,
        /// Comma-separated groups.
        #[arg(long, default_value = "")]
        groups: String,
    },
}

#[derive(clap::Args)]
struct UpArgs {
    /// Gateway replica 0's port; replica i listens on this + 100*i.
    #[arg(long, default_value_t = 8080)]
    gateway_port: u16,
    /// Replica 0's Envoy admin port; replica i's is this + 100*i.
    #[arg(long, default_value_t = 9901)]
    admin_port: u16,
    #[arg(long, default_value_t = 8000)]
    mock_port: u16,
    /// Tracker replica 0's port; replica j listens on this + 100*j.
    #[arg(long, default_value_t = 8081)]
    tracker_port: u16,
    /// Gateway replicas: Envoys with the same filter and config, each reporting to every
    /// tracker.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=50))]
    gateways: u16,
    /// Tracker replicas (--replica-id tracker-<j>). Several share one PostgreSQL ledger:
    /// --database-url, else a throwaway local server started in the run directory.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=50))]
    trackers: u16,
    /// The trackers' PostgreSQL ledger (postgres://user:password@host:port/database).
    /// Without it, one tracker keeps usage in memory and several get a throwaway server.
    #[arg(long, env = "TOLLGATE_DATABASE_URL", value_name = "URL", hide_env_values = true)]
    database_url: Option<String>,
    #[arg(long, default_value_t = 9090)]
    prometheus_port: u16,
    /// Envoy worker threads.
    #[arg(long, default_value_t = 2)]
    concurrency: u32,
    /// Run the gateway with this JSON as the filter config instead of the generated dev
    /// config, and push every later change of the file to the running gateway live, as
    /// Istio pushes a changed pluginConfig (implies --istio-shaped).
    #[arg(long)]
    plugin_config: Option<PathBuf>,
    /// Run the gateway as Istio does: the filter delivered by ECDS (live pushes), Istio's
    /// names, the config in Go-jsonpb bytes, FAIL_RELOAD, log level warning, and the
    /// neighbours jwt_authn and cors.
    #[arg(long)]
    istio_shaped: bool,
    /// With the Istio-shaped gateway: also llm-d's InferencePool ext_proc (a stand-in
    /// that streams bodies through unchanged).
    #[arg(long)]
    ext_proc: bool,
    /// Leave the tracker's /track open. By default it requires a fresh ingest token
    /// (TRACKER_INGEST_TOKEN), handed to the filter through the VM env (usage.token_env).
    #[arg(long)]
    no_ingest_token: bool,
    /// Send usage reports through a fault-injecting proxy in this mode (healthy, refuse,
    /// reset-after-head, reset-mid-body, hang, status-NNN, huge-body, not-http, slow-accept).
    #[arg(long, value_name = "MODE")]
    fault_tracker: Option<FaultMode>,
}

fn split_groups(s: &str) -> Vec<String> {
    s.split(',').map(str::trim).filter(|g| !g.is_empty()).map(str::to_string).collect()
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Up(args) => up(args),
        Cmd::Mock { listen } => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async {
                let listener =
                    tokio::net::TcpListener::bind(&listen).await.with_context(|| format!("bind {listen}"))?;
                eprintln!("mock model server on http://{listen}");
                mock::serve(listener).await
            })
        }
        Cmd::Key { command: KeyCmd::New { user, groups } } => {
            let key = dev::new_api_key();
            let entry = dev::key_entry(&key, &user, &split_groups(&groups));
            println!("key:   {key}");
            println!("entry: {entry}");
            eprintln!("Give the key to {user}; put only the entry into api_keys.keys (or the keys_env Secret).");
            Ok(())
        }
        Cmd::Jwt { secret, kid, iss, sub, groups, ttl, aud } => {
            let ttl = if ttl == "none" { None } else { Some(dev::parse_ttl(&ttl)?) };
            let claims = dev::claims(&iss, &sub, &split_groups(&groups), ttl, aud.as_deref());
            println!("{}", dev::mint_jwt(secret.as_bytes(), kid.as_deref(), &claims)?);
            Ok(())
        }
        Cmd::Jwks { secret, kid } => {
            println!("{}", dev::jwks(secret.as_bytes(), kid.as_deref()));
            Ok(())
        }
        Cmd::Render(args) => harness::render::run(&args),
    }
}

fn up(args: UpArgs) -> anyhow::Result<()> {
    let creds = DevCredentials::generate();
    let (plugin_config, custom) = match &args.plugin_config {
        Some(path) => (harness::stack::read_plugin_config(path)?, true),
        None => (creds.plugin_config(), false),
    };
    let istio_shaped = args.istio_shaped || args.plugin_config.is_some() || args.ext_proc;
    let stack = Stack::start(StackOptions {
        gateway_port: args.gateway_port,
        admin_port: args.admin_port,
        mock_port: args.mock_port,
        tracker_port: args.tracker_port,
        prometheus_port: args.prometheus_port,
        gateways: usize::from(args.gateways),
        trackers: usize::from(args.trackers),
        database_url: args.database_url.clone().filter(|u| !u.is_empty()),
        concurrency: args.concurrency,
        plugin_config,
        prometheus: true,
        scrape_interval: "5s".into(),
        label: "up".into(),
        fault_tracker: args.fault_tracker.is_some(),
        istio_shaped,
        ext_proc: args.ext_proc,
        ingest_token: !args.no_ingest_token,
        ..StackOptions::default()
    })?;
    if let Some(mode) = args.fault_tracker {
        for fault in stack.faults() {
            fault.set_mode(mode)?;
        }
    }
    let gw = &stack.gateway_url;
    println!("Tollgate is up.");
    for (i, (url, admin)) in stack.gateway_urls.iter().zip(&stack.admin_urls).enumerate() {
        let replica = if stack.gateway_urls.len() > 1 { format!(", replica {i}") } else { String::new() };
        println!("  gateway     {url}  (Envoy + filter, {} workers{replica}; admin {admin})", args.concurrency);
    }
    if let Some(shape) = stack.istio() {
        println!(
            "  delivery    Istio-shaped: ECDS resource {} from {}",
            shape.resource_name(),
            shape.ecds_file().display()
        );
    }
    if stack.ingest_token.is_some() {
        println!(
            "  ingest      /track requires the token in TRACKER_INGEST_TOKEN (the VM has it as TOLLGATE_INGEST_TOKEN)"
        );
    }
    if let Some(e) = stack.ext_proc() {
        println!("  ext_proc    127.0.0.1:{} (InferencePool stand-in, bodies streamed through)", e.port);
    }
    println!("  mock model  {}", stack.mock_url);
    for (j, url) in stack.tracker_urls.iter().enumerate() {
        let replica = if stack.tracker_urls.len() > 1 { format!("  (replica tracker-{j})") } else { String::new() };
        println!("  tracker     {url}/metrics{replica}");
    }
    match (&stack.database_url, &args.database_url) {
        (Some(_), Some(_)) => println!("  ledger      PostgreSQL from --database-url, shared by the trackers"),
        (Some(url), None) => println!("  ledger      throwaway PostgreSQL {url} (stopped with the stack)"),
        _ => println!("  ledger      none: the tracker keeps usage in memory"),
    }
    for fault in stack.faults() {
        println!("  usage path  Envoy -> fault proxy 127.0.0.1:{} ({}) -> tracker", fault.port, fault.mode());
    }
    if let Some(p) = &stack.prometheus_url {
        println!("  prometheus  {p}");
    }
    println!("  logs        {}", stack.dir.display());
    println!();
    let body = r#"{"model":"mock-model","messages":[{"role":"user","content":"Say hello"}],"max_tokens":5}"#;
    if custom {
        println!("Using the plugin config from the file; send its credentials, e.g.:");
        println!("  curl -s {gw}/v1/chat/completions -H 'Authorization: Bearer <key>' -H 'Content-Type: application/json' -d '{body}'");
    } else {
        let token = creds.token(24 * 3600)?;
        println!("With the dev API key (user {}, groups {}):", creds.user, creds.groups.join(","));
        println!("  curl -s {gw}/v1/chat/completions -H 'Authorization: Bearer {}' -H 'Content-Type: application/json' -d '{body}'", creds.api_key);
        println!("With a dev JWT (user {}, valid 24h):", creds.jwt_user);
        println!("  curl -s {gw}/v1/chat/completions -H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' -d '{body}'");
        println!("Without a credential (401):");
        println!("  curl -s -i {gw}/v1/models");
    }
    if let Some(p) = &stack.prometheus_url {
        println!("Requests per user, in Prometheus (summed over the trackers):");
        println!("  curl -s '{p}/api/v1/query' --data-urlencode 'query=sum by (user) (llm_requests_total)'");
    }
    if stack.database_url.is_some() && !custom {
        println!("Usage from the ledger (any tracker):");
        println!(
            "  curl -s '{}/v1/usage?user={}' -H 'Authorization: Bearer {}'",
            stack.tracker_url, creds.user, stack.api_token
        );
    }
    if let Some(path) = &args.plugin_config {
        println!("Edit {} and save: every change is pushed to the gateway live.", path.display());
    }
    println!();
    println!("Ctrl-C stops everything.");

    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        if let Some(path) = &args.plugin_config {
            let (stack, stop) = (&stack, &stop);
            s.spawn(move || {
                harness::stack::watch_plugin_config(stack, path, stop, Duration::from_millis(300), |r| match r {
                    Ok(()) => eprintln!("pushed {} to the gateway", path.display()),
                    Err(e) => eprintln!("not pushed, the gateway keeps its config: {e:#}"),
                })
            });
        }
        let waited = (|| {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async {
                let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                anyhow::Ok(())
            })
        })();
        stop.store(true, Ordering::Relaxed);
        waited
    })?;
    eprintln!("stopping…");
    drop(stack);
    Ok(())
}
