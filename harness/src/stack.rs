//! Starts the whole local stack — real Envoy with the built filter, the mock model
//! server, the usage tracker and (optionally) Prometheus — waits until each part is
//! ready, and stops everything when dropped. Tests use it through [`Stack::start`];
//! `tollgate up` uses the same code with fixed ports.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};

use crate::envoy::{self, EnvoyLayout, LOCAL_USAGE_CLUSTER};
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
}

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
    pub plugin_config: Value,
    tracker_port: u16,
    // Field order is drop order: Envoy first, then the rest.
    envoy: Proc,
    fault: Option<FaultTracker>,
    prometheus: Option<Proc>,
    tracker: Option<Proc>,
    _mock: MockServer,
}

pub fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn pick(port: u16) -> anyhow::Result<u16> {
    if port == 0 {
        free_port()
    } else {
        Ok(port)
    }
}

/// The plugin config with a `usage` section for the local tracker added when absent.
pub fn with_local_usage(mut config: Value) -> Value {
    if let Some(obj) = config.as_object_mut() {
        obj.entry("usage").or_insert_with(|| {
            json!({"cluster": LOCAL_USAGE_CLUSTER, "authority": "usage-tracking", "path": "/track",
                   "flush_interval_ms": 200, "timeout_ms": 1000})
        });
    }
    config
}

impl Stack {
    pub fn start(opts: StackOptions) -> anyhow::Result<Stack> {
        let dir = paths::run_dir(&opts.label)?;
        let gateway_port = pick(opts.gateway_port)?;
        let admin_port = pick(opts.admin_port)?;
        let tracker_port = pick(opts.tracker_port)?;
        let plugin_config =
            if opts.local_usage { with_local_usage(opts.plugin_config.clone()) } else { opts.plugin_config.clone() };

        let mock = MockServer::start(opts.mock_port)?;
        let mock_port = mock.port;

        let tracker = start_tracker(&dir, tracker_port)?;

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
        let wasm = paths::wasm_file()?;
        let bootstrap = envoy::bootstrap(&EnvoyLayout {
            gateway_port,
            admin_port,
            model_port: mock_port,
            tracker_port: usage_port,
            wasm: &wasm,
            plugin_config: &plugin_config,
            vm_env: &opts.vm_env,
            jwt_authn: jwt_authn_port.zip(opts.jwt_authn.as_ref()),
        });
        let envoy = start_envoy(&dir, &bootstrap, opts.concurrency, admin_port, gateway_port)?;

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
            plugin_config,
            tracker_port,
            envoy,
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
        self.tracker = Some(start_tracker(&self.dir, self.tracker_port)?);
        Ok(())
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

fn start_tracker(dir: &std::path::Path, port: u16) -> anyhow::Result<Proc> {
    let mut cmd = Command::new(paths::tracker_bin()?);
    cmd.args(["--listen", &format!("127.0.0.1:{port}")]);
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
) -> anyhow::Result<Proc> {
    let cfg_path = dir.join("envoy.json");
    std::fs::write(&cfg_path, serde_json::to_vec_pretty(bootstrap)?)?;
    let mut cmd = Command::new(paths::envoy_bin()?);
    cmd.arg("-c")
        .arg(&cfg_path)
        .args(["--concurrency", &concurrency.to_string()])
        .args(["--log-level", "warn", "--component-log-level", "wasm:info,main:info,config:info"])
        .arg("--disable-hot-restart");
    let mut p = Proc::spawn("envoy", cmd, &dir.join("envoy.log"))?;
    let ready_url = format!("http://127.0.0.1:{admin_port}/ready");
    wait_ready(&mut p, Duration::from_secs(60), || http_ok(&ready_url) && port_open(gateway_port))
        .with_context(|| format!("envoy config {}", cfg_path.display()))?;
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
