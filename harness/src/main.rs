//! `tollgate`: start the local stack, mint dev credentials.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::{Parser, Subcommand};
use harness::devconfig::DevCredentials;
use harness::fault::FaultMode;
use harness::keys::{self, NewKey};
use harness::stack::{Stack, StackOptions};
use harness::{dev, mock, usage};

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
    /// Mint a JWT: HS256 with --secret, or RS*/PS*/ES256/ES384/EdDSA with --key.
    Jwt {
        /// The HMAC secret (its raw bytes are the key).
        #[arg(long, env = "TOLLGATE_JWT_SECRET", required_unless_present = "key", conflicts_with = "key")]
        secret: Option<String>,
        /// A private JWK file (`tollgate jwt-key`): signs with its `alg`; its `kid` is the
        /// token's unless --kid is given.
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
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
    /// Print the JWKS (Istio RequestAuthentication format) for an HS256 secret, or the
    /// public JWKS of private JWK files (--key, repeatable: what a jwks_uri serves).
    Jwks {
        #[arg(long, env = "TOLLGATE_JWT_SECRET", required_unless_present = "key", conflicts_with = "key")]
        secret: Option<String>,
        #[arg(long)]
        kid: Option<String>,
        #[arg(long, value_name = "FILE")]
        key: Vec<PathBuf>,
    },
    /// Generate a signing key and print it as a private JWK (keep it secret; `tollgate
    /// jwks --key FILE` prints its public JWKS).
    JwtKey {
        /// RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384 or EdDSA.
        #[arg(long, default_value = "RS256")]
        alg: String,
        #[arg(long)]
        kid: Option<String>,
    },
    /// Render the Istio bundle's credentials Secret and WasmPlugin pluginConfig from a users file.
    Render(harness::render::RenderArgs),
    /// Show usage from the tracker's usage API (its secret in $TRACKER_API_TOKEN; needs a
    /// ledger): requests and tokens per user, day or model.
    Usage(UsageArgs),
}

/// `tollgate usage`'s flags.
#[derive(clap::Args)]
struct UsageArgs {
    /// The tracker's base URL (default: the local stack's, `tollgate up`).
    #[arg(long, default_value = DEFAULT_TRACKER_URL, value_name = "URL")]
    tracker: String,
    /// The environment variable holding the usage API's secret (TRACKER_API_TOKEN).
    #[arg(long, default_value = usage::API_TOKEN_ENV, value_name = "NAME")]
    api_token_env: String,
    /// The users to show (repeatable, or comma-separated; default: every user, by user
    /// or by model).
    #[arg(long, value_name = "U", value_delimiter = ',')]
    user: Vec<String>,
    /// Start of the range: an age (24h, 7d, 2w), a date (2026-11-01, UTC), an RFC 3339
    /// time or Unix seconds (default: 30 days before --until).
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// End of the range, exclusive, in the same forms (default: now).
    #[arg(long, value_name = "TIME")]
    until: Option<String>,
    /// Rows per user, per user and day (UTC; needs --user), or per user and model (all
    /// users together without --user).
    #[arg(long, default_value = "user", value_name = "user|model|day")]
    by: usage::By,
    /// Print the tracker's answers as they are (one JSON line per query).
    #[arg(long)]
    json: bool,
}

/// The local stack's tracker port (`tollgate up --tracker-port`'s default).
const DEFAULT_TRACKER_PORT: u16 = 8081;
/// The local stack's tracker, the default of `tollgate key … --tracker`.
const DEFAULT_TRACKER_URL: &str = "http://127.0.0.1:8081";
/// `tollgate up --gateway-port`'s default.
const DEFAULT_GATEWAY_PORT: u16 = 8080;
/// The local stack's gateway (`tollgate up --gateway-port`'s default).
const DEFAULT_GATEWAY_URL: &str = "http://127.0.0.1:8080";
/// The variable holding the tracker's admin secret, as the tracker names it.
const ADMIN_TOKEN_ENV: &str = "TRACKER_ADMIN_TOKEN";

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
    /// Create a managed key in the tracker (its admin secret in $TRACKER_ADMIN_TOKEN); the
    /// key is printed once. Gateways with api_keys.remote accept it at once.
    Create {
        #[command(flatten)]
        tracker: TrackerArgs,
        #[arg(long)]
        user: String,
        /// Comma-separated groups.
        #[arg(long, default_value = "")]
        groups: String,
        /// A name for people (e.g. "ci bot").
        #[arg(long)]
        name: Option<String>,
        /// Lifetime: 30d, 12h, 15m, 3600s (default: no expiry).
        #[arg(long, value_name = "DURATION", value_parser = keys::parse_expires_in)]
        expires_in: Option<u64>,
        /// The gateway the printed curl line goes to.
        #[arg(long, default_value = DEFAULT_GATEWAY_URL, value_name = "URL")]
        gateway: String,
        /// Print the tracker's answer as JSON (the key included).
        #[arg(long)]
        json: bool,
    },
    /// List managed keys, newest first (never the keys themselves).
    List {
        #[command(flatten)]
        tracker: TrackerArgs,
        /// Only this user's keys.
        #[arg(long)]
        user: Option<String>,
        /// Print the tracker's answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a managed key by its id: gateways refuse it within their
    /// api_keys.remote.changes_interval_seconds (at most ttl_seconds).
    Revoke {
        #[command(flatten)]
        tracker: TrackerArgs,
        /// The key's id (`key_…`, from `key create` or `key list`).
        id: String,
    },
}

/// Where the keys API is, and its secret.
#[derive(clap::Args)]
struct TrackerArgs {
    /// The tracker's base URL (default: the local stack's, `tollgate up`).
    #[arg(long, default_value = DEFAULT_TRACKER_URL, value_name = "URL")]
    tracker: String,
    /// The environment variable holding the tracker's admin secret (TRACKER_ADMIN_TOKEN).
    #[arg(long, default_value = ADMIN_TOKEN_ENV, value_name = "NAME")]
    admin_token_env: String,
}

impl TrackerArgs {
    fn admin_token(&self) -> anyhow::Result<String> {
        let name = &self.admin_token_env;
        std::env::var(name).ok().filter(|t| !t.trim().is_empty()).ok_or_else(|| {
            anyhow!(
                "set {name} to the tracker's admin secret (TRACKER_ADMIN_TOKEN; `tollgate up` prints the local one)"
            )
        })
    }

    /// ` --tracker URL` when not the default, for printed commands.
    fn flag(&self) -> String {
        if self.tracker == DEFAULT_TRACKER_URL {
            String::new()
        } else {
            format!(" --tracker {}", self.tracker)
        }
    }
}

#[derive(clap::Args)]
struct UpArgs {
    /// Gateway replica 0's port; replica i listens on this + 100*i.
    #[arg(long, default_value_t = DEFAULT_GATEWAY_PORT)]
    gateway_port: u16,
    /// Replica 0's Envoy admin port; replica i's is this + 100*i.
    #[arg(long, default_value_t = 9901)]
    admin_port: u16,
    #[arg(long, default_value_t = 8000)]
    mock_port: u16,
    /// Tracker replica 0's port; replica j listens on this + 100*j.
    #[arg(long, default_value_t = DEFAULT_TRACKER_PORT)]
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
    /// Leave managed keys out of the generated dev config (no api_keys.remote): the
    /// gateway then accepts only the static dev key. The tracker's keys API stays on.
    #[arg(long)]
    no_managed_keys: bool,
    /// Add an Envoy cluster NAME reaching HOST:PORT (repeatable), for a plugin config to
    /// name: e.g. an identity provider's JWKS server (jwt.providers[].remote_jwks.cluster).
    #[arg(long, value_name = "NAME=HOST:PORT", value_parser = parse_upstream)]
    upstream: Vec<(String, String)>,
}

/// `--upstream NAME=HOST:PORT`.
fn parse_upstream(s: &str) -> Result<(String, String), String> {
    let (name, address) = s.split_once('=').ok_or("expected NAME=HOST:PORT")?;
    let (host, port) = address.rsplit_once(':').ok_or("expected NAME=HOST:PORT")?;
    if name.is_empty() || host.is_empty() || port.parse::<u16>().is_err() {
        return Err("expected NAME=HOST:PORT (a port number)".into());
    }
    Ok((name.to_string(), address.to_string()))
}

/// How often `tollgate up`'s gateway polls the tracker for revoked keys.
const DEV_CHANGES_INTERVAL_SECONDS: u64 = 5;

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
        Cmd::Key { command } => key(command),
        Cmd::Jwt { secret, key, kid, iss, sub, groups, ttl, aud } => {
            let ttl = if ttl == "none" { None } else { Some(dev::parse_ttl(&ttl)?) };
            let claims = dev::claims(&iss, &sub, &split_groups(&groups), ttl, aud.as_deref());
            let token = match (key, secret) {
                (Some(file), _) => {
                    let mut signer = read_signer(&file)?;
                    signer.kid = kid.or(signer.kid);
                    signer.mint(&claims)?
                }
                (None, Some(secret)) => dev::mint_jwt(secret.as_bytes(), kid.as_deref(), &claims)?,
                (None, None) => anyhow::bail!("give --secret or --key"),
            };
            println!("{token}");
            Ok(())
        }
        Cmd::Jwks { secret, kid, key } => {
            if key.is_empty() {
                let secret = secret.ok_or_else(|| anyhow!("give --secret or --key"))?;
                println!("{}", dev::jwks(secret.as_bytes(), kid.as_deref()));
            } else {
                let signers = key.iter().map(|f| read_signer(f)).collect::<anyhow::Result<Vec<_>>>()?;
                println!("{}", dev::Signer::jwks(&signers.iter().collect::<Vec<_>>()));
            }
            Ok(())
        }
        Cmd::JwtKey { alg, kid } => {
            println!("{}", dev::Signer::generate(&alg, kid.as_deref())?.private_jwk());
            Ok(())
        }
        Cmd::Render(args) => harness::render::run(&args),
        Cmd::Usage(args) => usage_cmd(args),
    }
}

/// A private JWK file as `tollgate jwt-key` writes it.
fn read_signer(file: &std::path::Path) -> anyhow::Result<dev::Signer> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    dev::Signer::from_private_jwk(&text).with_context(|| format!("in {}", file.display()))
}

/// `tollgate usage`.
fn usage_cmd(args: UsageArgs) -> anyhow::Result<()> {
    let name = &args.api_token_env;
    let api_token = std::env::var(name).ok().filter(|t| !t.trim().is_empty()).ok_or_else(|| {
        anyhow!("set {name} to the tracker's usage API secret (TRACKER_API_TOKEN; `tollgate up` prints the local one)")
    })?;
    let users = args.user.iter().map(|u| u.trim().to_string()).filter(|u| !u.is_empty()).collect();
    let query =
        usage::Query { tracker_url: args.tracker, api_token, users, since: args.since, until: args.until, by: args.by };
    let report = usage::report(&query)?;
    if args.json {
        for answer in &report.answers {
            println!("{}", answer.trim_end());
        }
    } else {
        eprintln!("usage from {} until {} (UTC); TOTAL = prompt + completion tokens", report.since, report.until);
        println!("{}", usage::table(args.by, &report.rows, &report.total));
    }
    Ok(())
}

/// `tollgate key create/list/revoke` (`key new` is handled in `main`).
fn key(command: KeyCmd) -> anyhow::Result<()> {
    match command {
        KeyCmd::New { .. } => Err(anyhow!("key new is handled in main")),
        KeyCmd::Create { tracker, user, groups, name, expires_in, gateway, json } => {
            let token = tracker.admin_token()?;
            let expires_at = expires_in.map(|secs| keys::expires_at(keys::now_secs(), secs)).transpose()?;
            let new = NewKey { user, groups: split_groups(&groups), name, expires_at };
            let created = keys::create_key(&tracker.tracker, &token, &new)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&created)?);
                return Ok(());
            }
            println!("key:     {}", created.key);
            println!("id:      {}", created.id);
            println!(
                "user:    {} (groups: {})",
                created.user,
                if created.groups.is_empty() { "none".to_string() } else { created.groups.join(",") }
            );
            if let Some(name) = &created.name {
                println!("name:    {name}");
            }
            println!("expires: {}", created.expires_at.map_or_else(|| "never".to_string(), keys::format_time));
            let gw = gateway.trim_end_matches('/');
            eprintln!();
            eprintln!(
                "Shown once: the tracker keeps only its SHA-256. Give it to {}; a gateway with \
                 api_keys.remote accepts it at once:",
                created.user
            );
            eprintln!("  curl -s {gw}/v1/models -H 'Authorization: Bearer {}'", created.key);
            eprintln!("Revoke it: tollgate key revoke{} {}", tracker.flag(), created.id);
            Ok(())
        }
        KeyCmd::List { tracker, user, json } => {
            let token = tracker.admin_token()?;
            let listed = keys::list_keys(&tracker.tracker, &token, user.as_deref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "keys": listed }))?);
            } else if listed.is_empty() {
                eprintln!("no keys{}", user.map(|u| format!(" for user {u}")).unwrap_or_default());
            } else {
                let rows: Vec<[String; 8]> = listed.iter().map(keys::list_row).collect();
                println!("{}", keys::table(&keys::LIST_HEADER, &rows));
            }
            Ok(())
        }
        KeyCmd::Revoke { tracker, id } => {
            let token = tracker.admin_token()?;
            keys::revoke_key(&tracker.tracker, &token, &id)?;
            println!("revoked {id}");
            eprintln!(
                "Gateways refuse it within their api_keys.remote.changes_interval_seconds (at most ttl_seconds)."
            );
            Ok(())
        }
    }
}

/// How this binary is invoked from the current directory (`./target/debug/tollgate`
/// under `make run`), for printed commands.
fn self_command() -> String {
    let exe = std::env::current_exe().ok();
    let cwd = std::env::current_dir().ok();
    match (exe, cwd) {
        (Some(exe), Some(cwd)) => match exe.strip_prefix(&cwd) {
            Ok(rel) => format!("./{}", rel.display()),
            Err(_) => exe.display().to_string(),
        },
        _ => "tollgate".to_string(),
    }
}

fn up(args: UpArgs) -> anyhow::Result<()> {
    let creds = DevCredentials::generate();
    let (plugin_config, custom) = match &args.plugin_config {
        Some(path) => (harness::stack::read_plugin_config(path)?, true),
        None if args.no_managed_keys => (creds.plugin_config(), false),
        None => (
            harness::devconfig::with_remote_keys(
                creds.plugin_config(),
                serde_json::json!({"changes_interval_seconds": DEV_CHANGES_INTERVAL_SECONDS}),
            ),
            false,
        ),
    };
    let managed_keys = plugin_config.pointer("/api_keys/remote").is_some();
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
        ledger: true,
        concurrency: args.concurrency,
        plugin_config,
        prometheus: true,
        scrape_interval: "5s".into(),
        label: "up".into(),
        fault_tracker: args.fault_tracker.is_some(),
        istio_shaped,
        ext_proc: args.ext_proc,
        ingest_token: !args.no_ingest_token,
        upstreams: args.upstream.clone(),
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
    match (&stack.database_url, &args.database_url, &stack.ledger_dir) {
        (Some(_), Some(_), _) => println!("  ledger      PostgreSQL from --database-url, shared by the trackers"),
        (Some(url), None, _) => println!("  ledger      throwaway PostgreSQL {url} (stopped with the stack)"),
        (None, _, Some(dir)) => {
            println!("  ledger      SQLite in {} (usage and managed keys, for this run)", dir.display())
        }
        _ => println!("  ledger      none: the tracker keeps usage in memory"),
    }
    if stack.database_url.is_some() || stack.ledger_dir.is_some() {
        // The usage page (tracker/src/ui.rs); its login is the usage API's token.
        let login = if custom {
            format!("the usage API token {}", stack.api_token)
        } else {
            "the usage API token, the Bearer token of the usage curl below".to_string()
        };
        println!("  usage page  {}/ui  (log in with {login})", stack.tracker_url);
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
    if (stack.database_url.is_some() || stack.ledger_dir.is_some()) && !custom {
        println!("Usage from the ledger (any tracker):");
        println!(
            "  curl -s '{}/v1/usage?user={}' -H 'Authorization: Bearer {}'",
            stack.tracker_url, creds.user, stack.api_token
        );
    }
    let admin = format!("TRACKER_ADMIN_TOKEN={} {}", stack.admin_token, self_command());
    let tracker_flag = if stack.tracker_url == DEFAULT_TRACKER_URL {
        String::new()
    } else {
        format!(" --tracker {}", stack.tracker_url)
    };
    if managed_keys {
        println!(
            "Managed keys: create one (printed once, works at once), use it as above, revoke it \
             (401 within {}):",
            if custom {
                "the config's api_keys.remote.changes_interval_seconds".to_string()
            } else {
                format!("{DEV_CHANGES_INTERVAL_SECONDS} s")
            }
        );
        let gateway_flag = if gw == DEFAULT_GATEWAY_URL { String::new() } else { format!(" --gateway {gw}") };
        println!("  {admin} key create{tracker_flag} --user alice --groups free{gateway_flag}");
        println!("  {admin} key revoke{tracker_flag} <id>");
        println!("  {admin} key list{tracker_flag}");
    } else {
        println!(
            "Keys API (admin secret TRACKER_ADMIN_TOKEN={}); the gateway does not resolve managed keys \
             (no api_keys.remote{}).",
            stack.admin_token,
            if custom { " in the file" } else { ": --no-managed-keys" }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use clap::CommandFactory;

    fn key_cmd(args: &[&str]) -> KeyCmd {
        let argv: Vec<&str> = ["tollgate", "key"].iter().chain(args).copied().collect();
        match Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{args:?}: {e}")).command {
            Cmd::Key { command } => command,
            _ => panic!("not a key command"),
        }
    }

    #[test]
    fn the_cli_is_consistent() {
        Cli::command().debug_assert();
        assert_eq!(DEFAULT_TRACKER_URL, format!("http://127.0.0.1:{DEFAULT_TRACKER_PORT}"));
        assert_eq!(DEFAULT_GATEWAY_URL, format!("http://127.0.0.1:{DEFAULT_GATEWAY_PORT}"));
    }

    #[test]
    fn key_commands_parse() {
        match key_cmd(&["create", "--user", "alice", "--groups", "free,beta", "--expires-in", "30d"]) {
            KeyCmd::Create { tracker, user, groups, name, expires_in, json, .. } => {
                assert_eq!(
                    (tracker.tracker.as_str(), tracker.admin_token_env.as_str()),
                    (DEFAULT_TRACKER_URL, ADMIN_TOKEN_ENV)
                );
                assert_eq!((user.as_str(), split_groups(&groups)), ("alice", vec!["free".to_string(), "beta".into()]));
                assert_eq!((name, expires_in, json), (None, Some(2_592_000), false));
                assert_eq!(tracker.flag(), "");
            }
            _ => panic!("not create"),
        }
        match key_cmd(&["list", "--tracker", "http://t:9", "--admin-token-env", "MY_TOKEN", "--json"]) {
            KeyCmd::List { tracker, user, json } => {
                assert_eq!((tracker.tracker.as_str(), tracker.admin_token_env.as_str()), ("http://t:9", "MY_TOKEN"));
                assert_eq!((user, json), (None, true));
                assert_eq!(tracker.flag(), " --tracker http://t:9");
            }
            _ => panic!("not list"),
        }
        match key_cmd(&["revoke", "key_0123"]) {
            KeyCmd::Revoke { id, .. } => assert_eq!(id, "key_0123"),
            _ => panic!("not revoke"),
        }
        assert!(matches!(key_cmd(&["new", "--user", "a"]), KeyCmd::New { .. }));
        for bad in [&["create", "--user", "a", "--expires-in", "1y"][..], &["create"], &["revoke"]] {
            let argv: Vec<&str> = ["tollgate", "key"].iter().chain(bad).copied().collect();
            assert!(Cli::try_parse_from(argv).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn usage_parses() {
        let parse = |args: &[&str]| {
            let argv: Vec<&str> = ["tollgate", "usage"].iter().chain(args).copied().collect();
            match Cli::try_parse_from(argv).map(|c| c.command) {
                Ok(Cmd::Usage(a)) => Ok(a),
                Ok(_) => panic!("not usage"),
                Err(e) => Err(e),
            }
        };
        let a = parse(&["--user", "alice"]).unwrap();
        assert_eq!((a.tracker.as_str(), a.api_token_env.as_str()), (DEFAULT_TRACKER_URL, "TRACKER_API_TOKEN"));
        assert_eq!(
            (a.user, a.since, a.until, a.by, a.json),
            (vec!["alice".to_string()], None, None, usage::By::User, false)
        );
        let a =
            parse(&["--user", "a,b", "--user", "c", "--since", "7d", "--until", "2026-11-01", "--by", "day", "--json"])
                .unwrap();
        assert_eq!(a.user, ["a", "b", "c"]);
        assert_eq!(
            (a.since.as_deref(), a.until.as_deref(), a.by, a.json),
            (Some("7d"), Some("2026-11-01"), usage::By::Day, true)
        );
        assert_eq!(parse(&["--user", "a", "--by", "model"]).unwrap().by, usage::By::Model);
        assert!(parse(&[]).unwrap().user.is_empty(), "every user");
        assert!(parse(&["--user", "a", "--by", "team"]).is_err());
    }

    #[test]
    fn the_admin_secret_comes_from_the_named_variable() {
        let args = |env: &str| TrackerArgs { tracker: DEFAULT_TRACKER_URL.into(), admin_token_env: env.into() };
        let e = args("TOLLGATE_TEST_SURELY_UNSET_VARIABLE").admin_token().unwrap_err().to_string();
        assert!(e.contains("set TOLLGATE_TEST_SURELY_UNSET_VARIABLE"), "{e}");
        // PATH is set in any test environment.
        assert!(args("PATH").admin_token().is_ok());
    }
}
