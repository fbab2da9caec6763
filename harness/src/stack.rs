//! Starts the whole local stack — real Envoy with the built filter, the mock model
//! server, the usage tracker and (optionally) Prometheus — waits until each part is
//! ready, and stops everything when dropped. Tests use it through [`Stack::start`];
//! `tollgate up` uses the same code with fixed ports.
//!
//! A stack can be a fleet (`../shared/design.md` §9): [`StackOptions::gateways`] Envoys
//! with the same filter and config (replica `i` on `gateway_port + 100*i`, its admin
//! on `admin_port + 100*i`) and [`StackOptions::trackers`] trackers (on
//! `tracker_port + 100*j`, each with its own `--replica-id tracker-<j>`) that share one
//! PostgreSQL ledger: [`StackOptions::database_url`], or a throwaway server the stack
//! starts in its run directory ([`crate::postgres`]) when there are several trackers
//! and no URL. A lone tracker keeps usage in memory unless [`StackOptions::ledger`]
//! gives it a SQLite ledger in the run directory. Every tracker gets a fresh admin
//! secret for the keys API ([`Stack::admin_token`]). Every gateway reports to every
//! tracker (one round-robin cluster); Prometheus scrapes every tracker. With port 0
//! every part gets its own free port.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};

use crate::envoy::{self, EnvoyLayout, IstioShape, LOCAL_USAGE_CLUSTER};
use crate::extproc::ExtProcServer;
use crate::fault::FaultTracker;
use crate::paths;
use crate::postgres::Postgres;
use crate::process::Proc;

/// How to start a stack. Port 0 picks a free port (for every replica of a part).
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Gateway replica 0's port; replica `i` listens on `gateway_port + 100*i`.
    pub gateway_port: u16,
    /// Replica 0's Envoy admin port; replica `i`'s is `admin_port + 100*i`.
    pub admin_port: u16,
    pub mock_port: u16,
    /// Tracker replica 0's port; replica `j` listens on `tracker_port + 100*j`.
    pub tracker_port: u16,
    pub prometheus_port: u16,
    /// Gateway replicas: Envoys with the same filter, config and env, each reporting to
    /// every tracker (default 1).
    pub gateways: usize,
    /// Tracker replicas (default 1). Several share one PostgreSQL ledger
    /// (`database_url`, else a throwaway local server the stack starts and stops).
    pub trackers: usize,
    /// The trackers' PostgreSQL ledger (`TRACKER_DATABASE_URL`). `None`: a lone
    /// tracker keeps usage in memory (unless `ledger`); several get a throwaway local
    /// server.
    pub database_url: Option<String>,
    /// Give a lone tracker without `database_url` a SQLite ledger in the run directory
    /// (`TRACKER_DATA_DIR`, see [`Stack::ledger_dir`]), so the keys API and the usage API
    /// answer. Default false: the tracker keeps usage in memory. Several trackers, or a
    /// `database_url`, have a (PostgreSQL) ledger anyway.
    pub ledger: bool,
    /// Envoy worker threads (one Wasm VM each).
    pub concurrency: u32,
    /// The filter's configuration (the WasmPlugin `pluginConfig`).
    pub plugin_config: Value,
    /// Environment variables of the Wasm VM (what Istio's `vmConfig.env` sets).
    pub vm_env: BTreeMap<String, String>,
    /// Add a `usage` section pointing at the local tracker when the config has none.
    pub local_usage: bool,
    pub prometheus: bool,
    pub scrape_interval: String,
    /// Name of the run directory under target/tollgate-runs.
    pub label: String,
    /// Also run Envoy's native `jwt_authn` (this `JwtAuthentication` typed config,
    /// with its `@type`) on a second listener of the same Envoy.
    pub jwt_authn: Option<Value>,
    /// Put a [`FaultTracker`] between Envoy and the tracker (one in front of each tracker
    /// replica): Envoy's usage cluster points at it (it starts `Healthy`, forwarding),
    /// while Prometheus and `tracker_url` still reach the real tracker. Switch faults
    /// with `stack.fault()` (`stack.faults()` for every replica's).
    pub fault_tracker: bool,
    /// Run the gateway as Istio runs it: the filter delivered by ECDS from a watched file
    /// (so [`Stack::push_plugin_config`] can change it live), Istio's names, the config
    /// in Go-jsonpb bytes, `vm_env` through `host_env_keys` (Envoy's own environment),
    /// FAIL_RELOAD, log level `warning`, and the neighbours `jwt_authn` and `cors`
    /// (see [`crate::envoy`]). Off: the static bootstrap.
    pub istio_shaped: bool,
    /// With `istio_shaped`: also llm-d's InferencePool `ext_proc`, served by the
    /// harness's [`ExtProcServer`] (bodies streamed through unchanged).
    pub ext_proc: bool,
    /// Protect `/track` with a fresh ingest token: the tracker gets it as
    /// `TRACKER_INGEST_TOKEN`, the Wasm VM as `TOLLGATE_INGEST_TOKEN`, and the local
    /// `usage` section names that variable in `token_env`.
    pub ingest_token: bool,
    /// Load this module instead of the built filter (e.g. [`paths::test_trap_wasm_file`]).
    pub wasm: Option<PathBuf>,
    /// Extra Envoy clusters a plugin config can name: (name, `host:port`), e.g. a JWKS
    /// server for `jwt.providers[].remote_jwks` (`tollgate up --upstream`).
    pub upstreams: Vec<(String, String)>,
}

/// VM env variable that carries the ingest token (the filter's `usage.token_env`).
pub const INGEST_TOKEN_ENV: &str = "TOLLGATE_INGEST_TOKEN";

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            gateway_port: 0,
            admin_port: 0,
            mock_port: 0,
            tracker_port: 0,
            prometheus_port: 0,
            gateways: 1,
            trackers: 1,
            database_url: None,
            ledger: false,
            concurrency: 2,
            plugin_config: json!({}),
            vm_env: BTreeMap::new(),
            local_usage: true,
            prometheus: false,
            scrape_interval: "1s".into(),
            label: "stack".into(),
            jwt_authn: None,
            fault_tracker: false,
            istio_shaped: false,
            ext_proc: false,
            ingest_token: true,
            wasm: None,
            upstreams: Vec::new(),
        }
    }
}

/// The running stack. Dropping it stops every process it started.
pub struct Stack {
    /// Gateway replica 0 (`gateway_urls[0]`).
    pub gateway_url: String,
    /// Replica 0's Envoy admin (`admin_urls[0]`).
    pub admin_url: String,
    /// Every gateway replica, by replica number.
    pub gateway_urls: Vec<String>,
    /// Every gateway replica's Envoy admin, by replica number.
    pub admin_urls: Vec<String>,
    pub mock_url: String,
    /// Tracker replica 0 (`tracker_urls[0]`).
    pub tracker_url: String,
    /// Every tracker replica, by replica number (`--replica-id tracker-<j>`).
    pub tracker_urls: Vec<String>,
    pub prometheus_url: Option<String>,
    /// The `jwt_authn` listener (on gateway replica 0), when requested.
    pub jwt_authn_url: Option<String>,
    pub dir: PathBuf,
    /// The plugin config the gateway started with (see [`Stack::plugin_config_now`]).
    pub plugin_config: Value,
    /// The ingest token `/track` requires, when started with `ingest_token`.
    pub ingest_token: Option<String>,
    /// The bearer secret of the trackers' usage API (`GET /v1/usage`; their
    /// `TRACKER_API_TOKEN`). The API answers only with a ledger (`database_url`, or
    /// [`StackOptions::ledger`]).
    pub api_token: String,
    /// The bearer secret of the trackers' keys API (`POST`/`GET /v1/keys`,
    /// `DELETE /v1/keys/{id}`; their `TRACKER_ADMIN_TOKEN`), fresh per stack. The API
    /// answers only with a ledger ([`StackOptions::ledger`] or `database_url`).
    pub admin_token: String,
    /// The PostgreSQL ledger the trackers share, if any (given, or the stack's own).
    pub database_url: Option<String>,
    /// The lone tracker's SQLite ledger directory (`TRACKER_DATA_DIR`), with
    /// [`StackOptions::ledger`] and no PostgreSQL.
    pub ledger_dir: Option<PathBuf>,
    trackers_setup: TrackerSetup,
    local_usage: bool,
    istio: Option<IstioShape>,
    /// The ECDS version last written and the config it holds.
    pushed: Mutex<(u64, Value)>,
    // Field order is drop order: the Envoys first, then the rest, PostgreSQL after the
    // trackers.
    envoys: Vec<Proc>,
    ext_proc: Option<ExtProcServer>,
    faults: Vec<FaultTracker>,
    prometheus: Option<Proc>,
    /// By replica; `None` once killed. Behind a lock so a test can kill one while
    /// other threads send traffic through the stack.
    trackers: Mutex<Vec<Option<Proc>>>,
    postgres: Option<Postgres>,
    _mock: MockServer,
}

/// What it takes to start (or restart) tracker replica `j`.
struct TrackerSetup {
    dir: PathBuf,
    ports: Vec<u16>,
    ingest_token: Option<String>,
    api_token: String,
    admin_token: String,
    database_url: Option<String>,
    /// SQLite ledger directory (only with one tracker and no `database_url`).
    data_dir: Option<PathBuf>,
}

impl TrackerSetup {
    fn start(&self, j: usize) -> anyhow::Result<Proc> {
        let port = *self.ports.get(j).ok_or_else(|| anyhow!("no tracker replica {j}"))?;
        start_tracker(&self.dir, j, port, self)
    }
}

/// Every port [`free_port`] (or [`claim_port`]) handed out in this process.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A port free now and not handed out before by this process: the OS may give the same
/// ephemeral port to two `bind(0)` calls once the first listener is closed, and two
/// parts of one stack (or two stacks of parallel tests) on one port fail to start.
pub fn free_port() -> anyhow::Result<u16> {
    for _ in 0..100 {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let port = l.local_addr()?.port();
        let mut seen = HANDED_OUT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.insert(port) {
            return Ok(port);
        }
    }
    bail!("no free port that was not handed out before")
}

fn pick(port: u16) -> anyhow::Result<u16> {
    if port == 0 {
        free_port()
    } else {
        Ok(port)
    }
}

/// Marks `port` as handed out (see [`free_port`]); false if it was already. For ports
/// picked another way (the fault tracker's, below the ephemeral range).
pub fn claim_port(port: u16) -> bool {
    HANDED_OUT.lock().unwrap_or_else(PoisonError::into_inner).insert(port)
}

/// The port of replica `i` of a part: `base + 100*i`, or a free port of its own when
/// `base` is 0.
pub fn replica_port(base: u16, i: usize) -> anyhow::Result<u16> {
    if base == 0 {
        return free_port();
    }
    i.checked_mul(100)
        .and_then(|off| off.checked_add(usize::from(base)))
        .and_then(|p| u16::try_from(p).ok())
        .ok_or_else(|| anyhow!("port {base} + 100 × {i} (replica {i}) is past 65535: choose a lower base port"))
}

/// Names of the files of replica `i` of a part: replica 0 keeps the single-replica
/// name (`envoy.log`), the others get `-<i>` (`envoy-1.log`).
fn replica_name(part: &str, i: usize) -> String {
    if i == 0 {
        part.to_string()
    } else {
        format!("{part}-{i}")
    }
}

/// Where a lone tracker keeps its SQLite ledger: `<run dir>/ledger` with
/// [`StackOptions::ledger`], one tracker and no `database_url`; otherwise none (memory
/// only, or the PostgreSQL ledger several trackers share).
fn sqlite_ledger_dir(opts: &StackOptions, run_dir: &std::path::Path) -> Option<PathBuf> {
    (opts.ledger && opts.trackers == 1 && opts.database_url.is_none()).then(|| run_dir.join("ledger"))
}

/// The plugin config with a `usage` section for the local tracker added when absent.
pub fn with_local_usage(config: Value) -> Value {
    with_local_usage_token(config, None)
}

/// With `token_env`, a `usage` section that names no `token_env` gets it: the stack's
/// tracker is the only one, and it requires the token.
fn with_token_env(mut config: Value, token_env: Option<&str>) -> Value {
    if let (Some(env), Some(usage)) = (token_env, config.get_mut("usage").and_then(Value::as_object_mut)) {
        usage.entry("token_env").or_insert_with(|| json!(env));
    }
    config
}

/// As [`with_local_usage`]; with `token_env`, the added section names the VM env
/// variable holding the tracker's ingest token.
pub fn with_local_usage_token(mut config: Value, token_env: Option<&str>) -> Value {
    if let Some(obj) = config.as_object_mut() {
        obj.entry("usage").or_insert_with(|| {
            let mut usage = json!({"cluster": LOCAL_USAGE_CLUSTER, "authority": "usage-tracking", "path": "/track",
                   "flush_interval_ms": 200, "timeout_ms": 1000});
            if let Some(env) = token_env {
                envoy::set(&mut usage, "token_env", json!(env));
            }
            usage
        });
    }
    config
}

impl Stack {
    pub fn start(opts: StackOptions) -> anyhow::Result<Stack> {
        if opts.gateways == 0 || opts.trackers == 0 {
            bail!(
                "a stack needs at least one gateway and one tracker (gateways {}, trackers {})",
                opts.gateways,
                opts.trackers
            );
        }
        let dir = paths::run_dir(&opts.label)?;
        let mut gateway_ports = Vec::with_capacity(opts.gateways);
        for i in 0..opts.gateways {
            gateway_ports.push((replica_port(opts.gateway_port, i)?, replica_port(opts.admin_port, i)?));
        }
        let mut tracker_ports = Vec::with_capacity(opts.trackers);
        for j in 0..opts.trackers {
            tracker_ports.push(replica_port(opts.tracker_port, j)?);
        }
        let fixed: Vec<u16> = gateway_ports
            .iter()
            .flat_map(|&(g, a)| [g, a])
            .chain(tracker_ports.iter().copied())
            .chain([opts.mock_port])
            .chain(opts.prometheus.then_some(opts.prometheus_port))
            .filter(|&p| p != 0)
            .collect();
        if let Some(dup) = fixed.iter().enumerate().find_map(|(k, p)| fixed.get(..k)?.contains(p).then_some(*p)) {
            bail!(
                "port {dup} is given to two parts of the stack (replicas are 100 ports apart): choose other base ports"
            );
        }
        let ingest_token = opts.ingest_token.then(crate::dev::new_secret);
        let token_env = ingest_token.as_ref().map(|_| INGEST_TOKEN_ENV);
        let plugin_config = if opts.local_usage {
            with_local_usage_token(opts.plugin_config.clone(), token_env)
        } else {
            opts.plugin_config.clone()
        };
        let plugin_config = with_token_env(plugin_config, token_env);
        let mut vm_env = opts.vm_env.clone();
        if let Some(token) = &ingest_token {
            vm_env.insert(INGEST_TOKEN_ENV.to_string(), token.clone());
        }

        let mock = MockServer::start(opts.mock_port)?;
        let mock_port = mock.port;

        // Several trackers share one ledger: the given one, else a throwaway server.
        let postgres = match (&opts.database_url, opts.trackers) {
            (None, n) if n > 1 => Some(Postgres::start(&dir).context("the trackers' shared PostgreSQL")?),
            _ => None,
        };
        let database_url = opts.database_url.clone().or_else(|| postgres.as_ref().map(|p| p.url.clone()));
        let mut setup = TrackerSetup {
            dir: dir.clone(),
            ports: tracker_ports,
            ingest_token: ingest_token.clone(),
            api_token: crate::dev::new_secret(),
            admin_token: crate::dev::new_secret(),
            database_url: database_url.clone(),
            data_dir: sqlite_ledger_dir(&opts, &dir),
        };

        // One after the other: the first creates the ledger's tables. A port picked free
        // can be taken by someone else before the tracker binds it (parallel tests):
        // pick another, a few times.
        let mut trackers = Vec::with_capacity(opts.trackers);
        for j in 0..opts.trackers {
            let mut attempt = 0;
            let tracker = loop {
                match setup.start(j) {
                    Err(e)
                        if opts.tracker_port == 0
                            && attempt < 3
                            && format!("{e:#}").contains("Address already in use") =>
                    {
                        attempt += 1;
                        if let Some(p) = setup.ports.get_mut(j) {
                            *p = free_port()?;
                        }
                    }
                    other => break other?,
                }
            };
            trackers.push(Some(tracker));
        }
        let tracker_ports = setup.ports.clone();

        let prometheus = if opts.prometheus {
            let port = pick(opts.prometheus_port)?;
            Some((start_prometheus(&dir, port, &tracker_ports, &opts.scrape_interval)?, port))
        } else {
            None
        };

        // Usage reports go to the fault trackers when there are (one in front of each
        // tracker), else to the trackers.
        let faults = if opts.fault_tracker {
            tracker_ports.iter().map(|&p| FaultTracker::start(p)).collect::<anyhow::Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        let usage_ports: Vec<u16> =
            if faults.is_empty() { tracker_ports.clone() } else { faults.iter().map(|f| f.port).collect() };

        let jwt_authn_port = match opts.jwt_authn {
            Some(_) => Some(free_port()?),
            None => None,
        };
        let wasm = match &opts.wasm {
            Some(w) => w.clone(),
            None => paths::wasm_file()?,
        };
        // Istio-shaped: every replica watches the same ECDS file, so one write (a push)
        // reaches the whole fleet, as istiod pushes to every pod.
        let istio = opts
            .istio_shaped
            .then(|| IstioShape::new(dir.join("ecds"), wasm.clone(), vm_env.keys().cloned().collect()));
        if let Some(shape) = &istio {
            shape.write(&plugin_config, 1)?;
        }
        if opts.ext_proc && istio.is_none() {
            bail!("StackOptions::ext_proc needs istio_shaped (the ext_proc neighbour is part of that chain)");
        }
        let ext_proc = if opts.ext_proc { Some(ExtProcServer::start()?) } else { None };

        // Every replica's Envoy starts at once; then each is waited for.
        let mut envoys = Vec::with_capacity(opts.gateways);
        for (i, &(gateway_port, admin_port)) in gateway_ports.iter().enumerate() {
            let bootstrap = envoy::bootstrap(&EnvoyLayout {
                replica: i,
                gateway_port,
                admin_port,
                model_port: mock_port,
                tracker_ports: &usage_ports,
                wasm: &wasm,
                plugin_config: &plugin_config,
                vm_env: &vm_env,
                // The differential listener is a test tool: replica 0 only.
                jwt_authn: if i == 0 { jwt_authn_port.zip(opts.jwt_authn.as_ref()) } else { None },
                istio: istio.as_ref(),
                ext_proc_port: ext_proc.as_ref().map(|e| e.port),
                upstreams: &opts.upstreams,
            });
            envoys.push(spawn_envoy(&dir, i, &bootstrap, opts.concurrency, istio.as_ref(), &vm_env)?);
        }
        for (envoy, &(gateway_port, admin_port)) in envoys.iter_mut().zip(&gateway_ports) {
            wait_envoy(envoy, admin_port, gateway_port, istio.as_ref())?;
        }

        let (prometheus, prometheus_url) = match prometheus {
            Some((p, port)) => (Some(p), Some(format!("http://127.0.0.1:{port}"))),
            None => (None, None),
        };
        let url = |port: u16| format!("http://127.0.0.1:{port}");
        let gateway_urls: Vec<String> = gateway_ports.iter().map(|&(g, _)| url(g)).collect();
        let admin_urls: Vec<String> = gateway_ports.iter().map(|&(_, a)| url(a)).collect();
        let tracker_urls: Vec<String> = tracker_ports.iter().map(|&p| url(p)).collect();
        Ok(Stack {
            gateway_url: gateway_urls.first().cloned().unwrap_or_default(),
            admin_url: admin_urls.first().cloned().unwrap_or_default(),
            gateway_urls,
            admin_urls,
            mock_url: url(mock_port),
            tracker_url: tracker_urls.first().cloned().unwrap_or_default(),
            tracker_urls,
            prometheus_url,
            jwt_authn_url: jwt_authn_port.map(url),
            dir,
            pushed: Mutex::new((1, plugin_config.clone())),
            plugin_config,
            ingest_token,
            api_token: setup.api_token.clone(),
            admin_token: setup.admin_token.clone(),
            database_url,
            ledger_dir: setup.data_dir.clone(),
            trackers_setup: setup,
            local_usage: opts.local_usage,
            istio,
            envoys,
            ext_proc,
            faults,
            prometheus,
            trackers: Mutex::new(trackers),
            postgres,
            _mock: mock,
        })
    }

    /// The fault tracker in front of tracker replica 0, when started with
    /// `fault_tracker` (see [`Stack::faults`] for the others).
    pub fn fault(&self) -> Option<&FaultTracker> {
        self.faults.first()
    }

    /// The fault trackers, one in front of each tracker replica (empty without
    /// `fault_tracker`).
    pub fn faults(&self) -> &[FaultTracker] {
        &self.faults
    }

    /// Gateway replica 0's Envoy log.
    pub fn envoy_log(&self) -> String {
        self.envoy_log_at(0)
    }

    /// Gateway replica `i`'s Envoy log (empty for a replica that does not exist).
    pub fn envoy_log_at(&self, i: usize) -> String {
        self.envoys.get(i).map(Proc::log_text).unwrap_or_default()
    }

    /// Stops tracker replica 0 (SIGKILL), as in an outage.
    pub fn kill_tracker(&mut self) {
        self.kill_tracker_at(0);
    }

    /// Stops tracker replica `j` (SIGKILL), as a pod killed mid-transaction. Safe to
    /// call while other threads send traffic through the stack.
    pub fn kill_tracker_at(&self, j: usize) {
        let mut trackers = self.trackers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(mut t) = trackers.get_mut(j).and_then(Option::take) {
            t.kill();
        }
    }

    /// Starts tracker replica 0 again on the same port.
    pub fn restart_tracker(&mut self) -> anyhow::Result<()> {
        self.restart_tracker_at(0)
    }

    /// Starts tracker replica `j` again on the same port, with the same replica id and
    /// ledger (so it restores its counters from its own rows).
    pub fn restart_tracker_at(&self, j: usize) -> anyhow::Result<()> {
        self.kill_tracker_at(j);
        let tracker = self.trackers_setup.start(j)?;
        let mut trackers = self.trackers.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = trackers.get_mut(j).ok_or_else(|| anyhow!("no tracker replica {j}"))?;
        *slot = Some(tracker);
        Ok(())
    }

    /// Whether tracker replica `j` is running (not killed).
    pub fn tracker_running(&self, j: usize) -> bool {
        self.trackers.lock().unwrap_or_else(PoisonError::into_inner).get(j).is_some_and(Option::is_some)
    }

    /// The ext_proc server, when started with `istio_shaped` and `ext_proc`.
    pub fn ext_proc(&self) -> Option<&ExtProcServer> {
        self.ext_proc.as_ref()
    }

    /// How the gateway gets its filter, when Istio-shaped.
    pub fn istio(&self) -> Option<&IstioShape> {
        self.istio.as_ref()
    }

    /// The plugin config in force: the last one pushed, else the one it started with.
    pub fn plugin_config_now(&self) -> Value {
        self.pushed.lock().unwrap_or_else(PoisonError::into_inner).1.clone()
    }

    /// Pushes a new plugin config to the running gateway, as istiod pushes a changed
    /// WasmPlugin `pluginConfig`: the ECDS resource is written to a temporary file and
    /// renamed over the watched one (with the local `usage` section added as at start).
    /// Every gateway replica watches that file. Returns once every replica has applied it
    /// (the resource's `version_text` stat is the new version), or fails, with Envoy's
    /// log lines about it, when a replica rejected it (its `config_fail` counter moved:
    /// the filter's `on_configure` refused the config, and the previous config stays in
    /// force). Needs an `istio_shaped` stack. Pushes are serialised; safe to call while
    /// requests run on other threads.
    pub fn push_plugin_config(&self, config: &Value) -> anyhow::Result<()> {
        let shape = self.istio.as_ref().ok_or_else(|| anyhow!("push_plugin_config needs an istio_shaped stack"))?;
        let token_env = self.ingest_token.as_ref().map(|_| INGEST_TOKEN_ENV);
        let config = if self.local_usage { with_local_usage_token(config.clone(), token_env) } else { config.clone() };
        let config = with_token_env(config, token_env);
        let mut pushed = self.pushed.lock().unwrap_or_else(PoisonError::into_inner);
        let version = pushed.0 + 1;
        let before =
            self.admin_urls.iter().map(|admin| ecds_stats(admin, shape)).collect::<anyhow::Result<Vec<_>>>()?;
        let log_lens: Vec<usize> = self.envoys.iter().map(|e| e.log_text().len()).collect();
        shape.write(&config, version)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now =
                self.admin_urls.iter().map(|admin| ecds_stats(admin, shape)).collect::<anyhow::Result<Vec<_>>>()?;
            if now.iter().all(|st| st.version_text == version.to_string()) {
                *pushed = (version, config);
                return Ok(());
            }
            let rejected = now.iter().zip(&before).position(|(now, before)| {
                now.config_fail > before.config_fail || now.update_rejected > before.update_rejected
            });
            if let Some(i) = rejected {
                // The file holds a rejected version now; the next push supersedes it.
                pushed.0 = version;
                let log = self.envoy_log_at(i);
                let from = log_lens.get(i).copied().unwrap_or(0).min(log.len());
                let new: Vec<&str> = log
                    .get(from..)
                    .unwrap_or("")
                    .lines()
                    .filter(|l| l.contains("[critical]") || l.contains("[error]") || l.contains("rejected"))
                    .collect();
                let who = if self.envoys.len() > 1 { format!(" (gateway replica {i})") } else { String::new() };
                bail!("Envoy rejected plugin config version {version}{who}:\n{}", new.join("\n"));
            }
            if Instant::now() > deadline {
                let lagging = now.iter().position(|st| st.version_text != version.to_string()).unwrap_or(0);
                let envoy = self.envoys.get(lagging).ok_or_else(|| anyhow!("no gateway replica {lagging}"))?;
                bail!(
                    "Envoy (gateway replica {lagging}) did not apply plugin config version {version} within 30 s \
                     (version_text {:?}); log {}:\n{}",
                    now.get(lagging).map(|st| st.version_text.as_str()).unwrap_or(""),
                    envoy.log.display(),
                    envoy.log_tail(20)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pids(&self) -> Vec<u32> {
        let trackers = self.trackers.lock().unwrap_or_else(PoisonError::into_inner);
        self.envoys
            .iter()
            .chain(trackers.iter().flatten())
            .chain(self.prometheus.as_ref())
            .filter_map(Proc::pid)
            .chain(self.postgres.as_ref().and_then(Postgres::pid))
            .collect()
    }
}

fn http_ok(url: &str) -> bool {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .ok()
        .and_then(|c| c.get(url).send().ok())
        .is_some_and(|r| r.status().is_success())
}

fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_millis(200)).is_ok()
}

/// Polls `ready` until it holds, failing early (with the log) if the process exits.
fn wait_ready(proc: &mut Proc, timeout: Duration, ready: impl Fn() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = proc.exited() {
            bail!(
                "{} exited ({status}) before it was ready; log {}:\n{}",
                proc.name,
                proc.log.display(),
                proc.log_tail(40)
            );
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

/// A plugin config file's JSON.
pub fn read_plugin_config(path: &std::path::Path) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

/// Watches a plugin config file until `stop` (what `tollgate up --plugin-config` does):
/// every `poll` its modification time and size are read; once they changed and then
/// held still for one more poll (an editor's write is finished), and the content differs
/// from what was pushed last, the file is pushed with [`Stack::push_plugin_config`].
/// `report` gets each push's result (a file that is not JSON, or a config Envoy
/// rejects, is an error and the gateway keeps its config).
pub fn watch_plugin_config(
    stack: &Stack,
    path: &std::path::Path,
    stop: &std::sync::atomic::AtomicBool,
    poll: Duration,
    mut report: impl FnMut(anyhow::Result<()>),
) {
    use std::sync::atomic::Ordering;
    let stamp = |p: &std::path::Path| std::fs::metadata(p).ok().map(|m| (m.modified().ok(), m.len()));
    let mut handled = stamp(path);
    let mut previous = handled;
    let mut last_content = std::fs::read(path).ok();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(poll);
        let now = stamp(path);
        let settled = now.is_some() && now == previous && now != handled;
        previous = now;
        if !settled {
            continue;
        }
        handled = now;
        let content = std::fs::read(path).ok();
        if content.is_none() || content == last_content {
            continue;
        }
        last_content = content;
        report(read_plugin_config(path).and_then(|config| stack.push_plugin_config(&config)));
    }
}

/// The ECDS stats of the Istio-shaped filter that readiness needs.
#[derive(Debug, Default)]
struct EcdsStats {
    version_text: String,
    config_fail: u64,
    update_rejected: u64,
}

fn ecds_stats(admin_url: &str, shape: &IstioShape) -> anyhow::Result<EcdsStats> {
    let prefix = shape.stat_prefix();
    let text = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?
        .get(format!("{admin_url}/stats"))
        .send()
        .and_then(|r| r.text())
        .context("Envoy admin /stats")?;
    let mut s = EcdsStats::default();
    for line in text.lines() {
        let Some((name, value)) = line.strip_prefix(&prefix).and_then(|rest| rest.split_once(": ")) else {
            continue;
        };
        match name {
            "version_text" => s.version_text = value.trim().trim_matches('"').to_string(),
            "config_fail" => s.config_fail = value.trim().parse().unwrap_or(0),
            "update_rejected" => s.update_rejected = value.trim().parse().unwrap_or(0),
            _ => {}
        }
    }
    Ok(s)
}

/// Tracker replica `j`'s arguments and environment (secrets only in the environment).
fn configure_tracker(cmd: &mut Command, j: usize, port: u16, setup: &TrackerSetup) {
    cmd.args(["--listen", &format!("127.0.0.1:{port}")]).args(["--replica-id", &format!("tracker-{j}")]);
    if let Some(token) = &setup.ingest_token {
        cmd.env("TRACKER_INGEST_TOKEN", token);
    }
    cmd.env("TRACKER_API_TOKEN", &setup.api_token);
    cmd.env("TRACKER_ADMIN_TOKEN", &setup.admin_token);
    // The environment, not a flag: the URL may hold a password (and `ps` shows flags).
    match &setup.database_url {
        Some(url) => cmd.env("TRACKER_DATABASE_URL", url),
        None => cmd.env_remove("TRACKER_DATABASE_URL"),
    };
    match &setup.data_dir {
        Some(d) if setup.database_url.is_none() => cmd.env("TRACKER_DATA_DIR", d),
        _ => cmd.env_remove("TRACKER_DATA_DIR"),
    };
}

fn start_tracker(dir: &std::path::Path, j: usize, port: u16, setup: &TrackerSetup) -> anyhow::Result<Proc> {
    let mut cmd = Command::new(paths::tracker_bin()?);
    configure_tracker(&mut cmd, j, port, setup);
    let name = replica_name("tracker", j);
    let mut p = Proc::spawn(&replica_name("usage-tracking", j), cmd, &dir.join(format!("{name}.log")))?;
    let url = format!("http://127.0.0.1:{port}/healthz");
    wait_ready(&mut p, Duration::from_secs(20), || http_ok(&url))?;
    Ok(p)
}

fn start_prometheus(dir: &std::path::Path, port: u16, tracker_ports: &[u16], interval: &str) -> anyhow::Result<Proc> {
    let targets: Vec<String> = tracker_ports.iter().map(|p| format!("'127.0.0.1:{p}'")).collect();
    let config = format!(
        "global:\n  scrape_interval: {interval}\n  evaluation_interval: {interval}\nscrape_configs:\n  - job_name: usage-tracking\n    static_configs:\n      - targets: [{}]\n",
        targets.join(", ")
    );
    let cfg_path = dir.join("prometheus.yml");
    std::fs::write(&cfg_path, config)?;
    let data = dir.join("prometheus-data");
    std::fs::create_dir_all(&data)?;
    let mut cmd = Command::new(paths::prometheus_bin()?);
    cmd.arg(format!("--config.file={}", cfg_path.display()))
        .arg(format!("--storage.tsdb.path={}", data.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--web.enable-lifecycle");
    let mut p = Proc::spawn("prometheus", cmd, &dir.join("prometheus.log"))?;
    let url = format!("http://127.0.0.1:{port}/-/ready");
    wait_ready(&mut p, Duration::from_secs(60), || http_ok(&url))?;
    Ok(p)
}

/// Starts gateway replica `i`'s Envoy (config `envoy.json`, log `envoy.log` for
/// replica 0, `envoy-<i>.*` for the others); [`wait_envoy`] waits for it.
fn spawn_envoy(
    dir: &std::path::Path,
    i: usize,
    bootstrap: &Value,
    concurrency: u32,
    istio: Option<&IstioShape>,
    vm_env: &BTreeMap<String, String>,
) -> anyhow::Result<Proc> {
    let name = replica_name("envoy", i);
    let cfg_path = dir.join(format!("{name}.json"));
    std::fs::write(&cfg_path, serde_json::to_vec_pretty(bootstrap)?)?;
    let mut cmd = Command::new(paths::envoy_bin()?);
    cmd.arg("-c").arg(&cfg_path).args(["--concurrency", &concurrency.to_string()]);
    if istio.is_some() {
        // istio-proxy's defaults (pilot-agent --proxyLogLevel, --proxyComponentLogLevel),
        // and the VM env from the proxy's own environment (host_env_keys).
        cmd.args(["--log-level", "warning", "--component-log-level", "misc:error"]).envs(vm_env);
    } else {
        cmd.args(["--log-level", "warn", "--component-log-level", "wasm:info,main:info,config:info"]);
    }
    cmd.arg("--disable-hot-restart");
    Proc::spawn(&name, cmd, &dir.join(format!("{name}.log")))
}

/// Waits until an Envoy is ready and its gateway port listens.
fn wait_envoy(p: &mut Proc, admin_port: u16, gateway_port: u16, istio: Option<&IstioShape>) -> anyhow::Result<()> {
    let admin_url = format!("http://127.0.0.1:{admin_port}");
    let ready_url = format!("{admin_url}/ready");
    // An Istio-shaped listener waits for its ECDS resource; a rejected one never comes.
    let rejected = || istio.is_some_and(|s| ecds_stats(&admin_url, s).is_ok_and(|st| st.config_fail > 0));
    let cfg_path = p.log.with_extension("json");
    wait_ready(p, Duration::from_secs(60), || (http_ok(&ready_url) && port_open(gateway_port)) || rejected())
        .with_context(|| format!("envoy config {}", cfg_path.display()))?;
    if rejected() {
        bail!("Envoy rejected the initial plugin config; log {}:\n{}", p.log.display(), p.log_tail(20));
    }
    Ok(())
}

/// The mock model server, in-process on its own thread and runtime; stopped on drop.
/// (Also used by `bench-run`.)
pub struct MockServer {
    pub port: u16,
    _server: crate::background::Background,
}

impl MockServer {
    /// Serves on 127.0.0.1:`port` (0 picks a free port) once this returns.
    pub fn start(port: u16) -> anyhow::Result<MockServer> {
        let listener = TcpListener::bind(("127.0.0.1", port)).with_context(|| format!("bind mock port {port}"))?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let (server, ()) = crate::background::Background::spawn("mock-model", move |ready, stop| async move {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => return ready.fail(anyhow!("mock listener: {e}")),
            };
            ready.ok(());
            tokio::select! {
                r = crate::mock::serve(listener) => { if let Err(e) = r { eprintln!("mock model server stopped: {e}"); } }
                _ = stop => {}
            }
        })?;
        Ok(MockServer { port, _server: server })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn replicas_are_100_ports_apart_or_each_free() {
        assert_eq!(replica_port(8080, 0).unwrap(), 8080);
        assert_eq!(replica_port(8080, 2).unwrap(), 8280);
        assert_eq!(replica_port(65_435, 1).unwrap(), 65_535);
        let err = replica_port(65_500, 1).unwrap_err().to_string();
        assert!(err.contains("past 65535"), "{err}");
        let free: BTreeSet<u16> = (0..5).map(|i| replica_port(0, i).unwrap()).collect();
        assert_eq!(free.len(), 5, "each replica its own free port");
        for port in free {
            assert!(!claim_port(port), "{port} was handed out already");
        }
        assert_eq!((replica_name("envoy", 0), replica_name("envoy", 3)), ("envoy".to_string(), "envoy-3".to_string()));
    }

    #[test]
    fn a_sqlite_ledger_only_when_asked_for_one_tracker_without_postgres() {
        assert!(!StackOptions::default().ledger, "tests rely on the in-memory tracker by default");
        let run = std::path::Path::new("/runs/x");
        let pg = Some("postgres://h/db".to_string());
        for (ledger, trackers, database_url, want) in [
            (false, 1, None, None),
            (true, 1, None, Some(run.join("ledger"))),
            (true, 1, pg.clone(), None),
            (true, 2, None, None),
            (false, 2, pg, None),
        ] {
            let opts = StackOptions { ledger, trackers, database_url: database_url.clone(), ..StackOptions::default() };
            assert_eq!(sqlite_ledger_dir(&opts, run), want, "ledger {ledger}, trackers {trackers}, {database_url:?}");
        }
    }

    #[test]
    fn every_tracker_gets_the_admin_secret_and_its_ledger_through_the_environment() {
        let env_of = |setup: &TrackerSetup| {
            let mut cmd = Command::new("true");
            configure_tracker(&mut cmd, 1, 9999, setup);
            let env: BTreeMap<String, Option<String>> = cmd
                .get_envs()
                .map(|(k, v)| (k.to_string_lossy().into_owned(), v.map(|v| v.to_string_lossy().into_owned())))
                .collect();
            let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
            (env, args)
        };
        let mut setup = TrackerSetup {
            dir: PathBuf::from("/runs/x"),
            ports: vec![9999],
            ingest_token: None,
            api_token: "api".into(),
            admin_token: "admin".into(),
            database_url: None,
            data_dir: Some(PathBuf::from("/runs/x/ledger")),
        };
        let (env, args) = env_of(&setup);
        assert_eq!(env["TRACKER_ADMIN_TOKEN"].as_deref(), Some("admin"));
        assert_eq!(env["TRACKER_API_TOKEN"].as_deref(), Some("api"));
        assert_eq!(env["TRACKER_DATA_DIR"].as_deref(), Some("/runs/x/ledger"));
        assert_eq!(env["TRACKER_DATABASE_URL"], None, "removed");
        assert!(!args.iter().any(|a| a.contains("admin")), "secrets only in the environment: {args:?}");
        assert_eq!(args, ["--listen", "127.0.0.1:9999", "--replica-id", "tracker-1"]);

        setup.data_dir = None;
        setup.database_url = Some("postgres://h/db".into());
        let (env, _) = env_of(&setup);
        assert_eq!(env["TRACKER_DATA_DIR"], None, "removed: not with --database-url");
        assert_eq!(env["TRACKER_DATABASE_URL"].as_deref(), Some("postgres://h/db"));
        assert_eq!(env["TRACKER_ADMIN_TOKEN"].as_deref(), Some("admin"));
    }

    #[test]
    fn a_stack_needs_a_gateway_and_a_tracker() {
        for (gateways, trackers) in [(0, 1), (1, 0)] {
            let err = Stack::start(StackOptions { gateways, trackers, ..StackOptions::default() }).err().unwrap();
            assert!(err.to_string().contains("at least one gateway and one tracker"), "{err}");
        }
    }
}
