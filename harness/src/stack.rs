//! Starts the whole local stack — real Envoy with the built filter, the mock model
//! server, the usage tracker and (optionally) Prometheus — waits until each part is
//! ready, and stops everything when dropped. Tests use it through [`Stack::start`];
//! `tollgate up` uses the same code with fixed ports.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};

use crate::envoy::{self, EnvoyLayout, IstioShape, LOCAL_USAGE_CLUSTER};
use crate::extproc::ExtProcServer;
use crate::fault::FaultTracker;
use crate::paths;
use crate::process::Proc;

/// How to start a stack. Port 0 picks a free port.
#[derive(Debug, Clone)]
pub struct StackOptions {
    pub gateway_port: u16,
    pub admin_port: u16,
    pub mock_port: u16,
    pub tracker_port: u16,
    pub prometheus_port: u16,
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
    /// Put a [`FaultTracker`] between Envoy and the tracker: Envoy's usage cluster points
    /// at it (it starts `Healthy`, forwarding), while Prometheus and `tracker_url` still
    /// reach the real tracker. Switch faults with `stack.fault()`.
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
        }
    }
}

/// The running stack. Dropping it stops every process it started.
pub struct Stack {
    pub gateway_url: String,
    pub admin_url: String,
    pub mock_url: String,
    pub tracker_url: String,
    pub prometheus_url: Option<String>,
    /// The `jwt_authn` listener, when requested.
    pub jwt_authn_url: Option<String>,
    pub dir: PathBuf,
    /// The plugin config the gateway started with (see [`Stack::plugin_config_now`]).
    pub plugin_config: Value,
    /// The ingest token `/track` requires, when started with `ingest_token`.
    pub ingest_token: Option<String>,
    tracker_port: u16,
    local_usage: bool,
    istio: Option<IstioShape>,
    /// The ECDS version last written and the config it holds.
    pushed: Mutex<(u64, Value)>,
    // Field order is drop order: Envoy first, then the rest.
    envoy: Proc,
    ext_proc: Option<ExtProcServer>,
    fault: Option<FaultTracker>,
    prometheus: Option<Proc>,
    tracker: Option<Proc>,
    _mock: MockServer,
}

/// A port free now and not handed out before by this process: the OS may give the same
/// ephemeral port to two `bind(0)` calls once the first listener is closed, and two
/// parts of one stack (or two stacks of parallel tests) on one port fail to start.
pub fn free_port() -> anyhow::Result<u16> {
    static HANDED_OUT: std::sync::Mutex<BTreeSet<u16>> = std::sync::Mutex::new(BTreeSet::new());
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
        let dir = paths::run_dir(&opts.label)?;
        let gateway_port = pick(opts.gateway_port)?;
        let admin_port = pick(opts.admin_port)?;
        let mut tracker_port = pick(opts.tracker_port)?;
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

        // A port picked free can be taken by someone else before the tracker binds it
        // (parallel tests): pick another, a few times.
        let mut attempt = 0;
        let tracker = loop {
            match start_tracker(&dir, tracker_port, ingest_token.as_deref()) {
                Err(e)
                    if opts.tracker_port == 0 && attempt < 3 && format!("{e:#}").contains("Address already in use") =>
                {
                    attempt += 1;
                    tracker_port = free_port()?;
                }
                other => break other?,
            }
        };

        let prometheus = if opts.prometheus {
            let port = pick(opts.prometheus_port)?;
            Some((start_prometheus(&dir, port, tracker_port, &opts.scrape_interval)?, port))
        } else {
            None
        };

        // Usage reports go to the fault tracker when there is one, else to the tracker.
        let fault = if opts.fault_tracker { Some(FaultTracker::start(tracker_port)?) } else { None };
        let usage_port = fault.as_ref().map_or(tracker_port, |f| f.port);

        let jwt_authn_port = match opts.jwt_authn {
            Some(_) => Some(free_port()?),
            None => None,
        };
        let wasm = match &opts.wasm {
            Some(w) => w.clone(),
            None => paths::wasm_file()?,
        };
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
        let bootstrap = envoy::bootstrap(&EnvoyLayout {
            gateway_port,
            admin_port,
            model_port: mock_port,
            tracker_port: usage_port,
            wasm: &wasm,
            plugin_config: &plugin_config,
            vm_env: &vm_env,
            jwt_authn: jwt_authn_port.zip(opts.jwt_authn.as_ref()),
            istio: istio.as_ref(),
            ext_proc_port: ext_proc.as_ref().map(|e| e.port),
        });
        let envoy = start_envoy(&dir, &bootstrap, opts.concurrency, admin_port, gateway_port, istio.as_ref(), &vm_env)?;

        let (prometheus, prometheus_url) = match prometheus {
            Some((p, port)) => (Some(p), Some(format!("http://127.0.0.1:{port}"))),
            None => (None, None),
        };
        Ok(Stack {
            gateway_url: format!("http://127.0.0.1:{gateway_port}"),
            admin_url: format!("http://127.0.0.1:{admin_port}"),
            mock_url: format!("http://127.0.0.1:{mock_port}"),
            tracker_url: format!("http://127.0.0.1:{tracker_port}"),
            prometheus_url,
            jwt_authn_url: jwt_authn_port.map(|p| format!("http://127.0.0.1:{p}")),
            dir,
            pushed: Mutex::new((1, plugin_config.clone())),
            plugin_config,
            ingest_token,
            tracker_port,
            local_usage: opts.local_usage,
            istio,
            envoy,
            ext_proc,
            fault,
            prometheus,
            tracker: Some(tracker),
            _mock: mock,
        })
    }

    /// The fault tracker in front of the real one, when started with `fault_tracker`.
    pub fn fault(&self) -> Option<&FaultTracker> {
        self.fault.as_ref()
    }

    pub fn envoy_log(&self) -> String {
        self.envoy.log_text()
    }

    /// Stops the tracker (SIGKILL), as in an outage.
    pub fn kill_tracker(&mut self) {
        if let Some(mut t) = self.tracker.take() {
            t.kill();
        }
    }

    /// Starts the tracker again on the same port.
    pub fn restart_tracker(&mut self) -> anyhow::Result<()> {
        self.kill_tracker();
        self.tracker = Some(start_tracker(&self.dir, self.tracker_port, self.ingest_token.as_deref())?);
        Ok(())
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
    /// Returns once Envoy has applied it (the resource's `version_text` stat is the new
    /// version), or fails, with Envoy's log lines about it, when Envoy rejected it (its
    /// `config_fail` counter moved: the filter's `on_configure` refused the config, and
    /// the previous config stays in force). Needs an `istio_shaped` stack. Pushes are
    /// serialised; safe to call while requests run on other threads.
    pub fn push_plugin_config(&self, config: &Value) -> anyhow::Result<()> {
        let shape = self.istio.as_ref().ok_or_else(|| anyhow!("push_plugin_config needs an istio_shaped stack"))?;
        let token_env = self.ingest_token.as_ref().map(|_| INGEST_TOKEN_ENV);
        let config = if self.local_usage { with_local_usage_token(config.clone(), token_env) } else { config.clone() };
        let config = with_token_env(config, token_env);
        let mut pushed = self.pushed.lock().unwrap_or_else(PoisonError::into_inner);
        let version = pushed.0 + 1;
        let admin = self.admin_url.clone();
        let before = ecds_stats(&admin, shape)?;
        let log_len = self.envoy.log_text().len();
        shape.write(&config, version)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = ecds_stats(&admin, shape)?;
            if now.version_text == version.to_string() {
                *pushed = (version, config);
                return Ok(());
            }
            if now.config_fail > before.config_fail || now.update_rejected > before.update_rejected {
                // The file holds a rejected version now; the next push supersedes it.
                pushed.0 = version;
                let log = self.envoy.log_text();
                let new: Vec<&str> = log
                    .get(log_len.min(log.len())..)
                    .unwrap_or("")
                    .lines()
                    .filter(|l| l.contains("[critical]") || l.contains("[error]") || l.contains("rejected"))
                    .collect();
                bail!("Envoy rejected plugin config version {version}:\n{}", new.join("\n"));
            }
            if Instant::now() > deadline {
                bail!(
                    "Envoy did not apply plugin config version {version} within 30 s (version_text {:?}); log {}:\n{}",
                    now.version_text,
                    self.envoy.log.display(),
                    self.envoy.log_tail(20)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pids(&self) -> Vec<u32> {
        [Some(&self.envoy), self.tracker.as_ref(), self.prometheus.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(Proc::pid)
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

fn start_tracker(dir: &std::path::Path, port: u16, ingest_token: Option<&str>) -> anyhow::Result<Proc> {
    let mut cmd = Command::new(paths::tracker_bin()?);
    cmd.args(["--listen", &format!("127.0.0.1:{port}")]);
    if let Some(token) = ingest_token {
        cmd.env("TRACKER_INGEST_TOKEN", token);
    }
    let mut p = Proc::spawn("usage-tracking", cmd, &dir.join("tracker.log"))?;
    let url = format!("http://127.0.0.1:{port}/healthz");
    wait_ready(&mut p, Duration::from_secs(20), || http_ok(&url))?;
    Ok(p)
}

fn start_prometheus(dir: &std::path::Path, port: u16, tracker_port: u16, interval: &str) -> anyhow::Result<Proc> {
    let config = format!(
        "global:\n  scrape_interval: {interval}\n  evaluation_interval: {interval}\nscrape_configs:\n  - job_name: usage-tracking\n    static_configs:\n      - targets: ['127.0.0.1:{tracker_port}']\n"
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

fn start_envoy(
    dir: &std::path::Path,
    bootstrap: &Value,
    concurrency: u32,
    admin_port: u16,
    gateway_port: u16,
    istio: Option<&IstioShape>,
    vm_env: &BTreeMap<String, String>,
) -> anyhow::Result<Proc> {
    let cfg_path = dir.join("envoy.json");
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
    let mut p = Proc::spawn("envoy", cmd, &dir.join("envoy.log"))?;
    let admin_url = format!("http://127.0.0.1:{admin_port}");
    let ready_url = format!("{admin_url}/ready");
    // An Istio-shaped listener waits for its ECDS resource; a rejected one never comes.
    let rejected = || istio.is_some_and(|s| ecds_stats(&admin_url, s).is_ok_and(|st| st.config_fail > 0));
    wait_ready(&mut p, Duration::from_secs(60), || (http_ok(&ready_url) && port_open(gateway_port)) || rejected())
        .with_context(|| format!("envoy config {}", cfg_path.display()))?;
    if rejected() {
        bail!("Envoy rejected the initial plugin config; log {}:\n{}", p.log.display(), p.log_tail(20));
    }
    Ok(p)
}

/// The mock model server, in-process on its own thread and runtime; stopped on drop.
/// (Also used by `bench-run`.)
pub struct MockServer {
    pub port: u16,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl MockServer {
    /// Serves on 127.0.0.1:`port` (0 picks a free port) once this returns.
    pub fn start(port: u16) -> anyhow::Result<MockServer> {
        let listener = TcpListener::bind(("127.0.0.1", port)).with_context(|| format!("bind mock port {port}"))?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let thread = std::thread::Builder::new().name("mock-model".into()).spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow!("mock runtime: {e}")));
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow!("mock listener: {e}")));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                tokio::select! {
                    r = crate::mock::serve(listener) => { if let Err(e) = r { eprintln!("mock model server stopped: {e}"); } }
                    _ = rx => {}
                }
            });
            rt.shutdown_timeout(Duration::from_secs(1));
        })?;
        ready_rx.recv_timeout(Duration::from_secs(10)).map_err(|_| anyhow!("mock server did not start"))??;
        Ok(MockServer { port, shutdown: Some(tx), thread: Some(thread) })
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
