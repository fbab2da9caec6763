# Tollgate. `make run` and `make test` each install what they need first.
SHELL := /bin/bash
CARGO ?= cargo
WASM := target/wasm32-wasip1/release/tollgate_filter.wasm
export PATH := $(CURDIR)/.local/bin:$(PATH)

.PHONY: setup wasm build run test test-unit test-wasm test-e2e lint fmt clean bench fuzz
.PHONY: oci test-istio
.PHONY: screenshot

setup:
	@bash scripts/setup.sh

wasm:
	@bash scripts/build-wasm.sh

build: wasm
	$(CARGO) build -p usage-tracking -p tollgate-harness

run: setup build
	./target/debug/tollgate up

test: setup build test-unit test-wasm test-e2e test-istio
	@echo "make test: all suites passed"

test-unit:
	$(CARGO) test --workspace --exclude tollgate-e2e

# The filter's pure-logic tests again, compiled to wasm32 and run under node.
test-wasm:
	CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
	  $(CARGO) test -p tollgate-filter --lib --target wasm32-unknown-unknown

test-e2e:
	$(CARGO) test -p tollgate-e2e -- --test-threads=2

# The README's picture of the usage page (docs/usage-page.png): the browser test
# (tests/tests/usage_page.rs: a stack, traffic, headless Chromium) takes it at 1280x900.
screenshot: setup build
	@rm -f target/test-artifacts/usage-page.png
	$(CARGO) test -p tollgate-e2e --test usage_page
	@mkdir -p docs && cp target/test-artifacts/usage-page.png docs/usage-page.png
	@echo "docs/usage-page.png refreshed"

# Bounded fuzzing of the JWT, credential, config and usage parsers (cargo-fuzz);
# FUZZ_SECONDS per target, default 60. Not part of `make test`.
fuzz:
	@bash scripts/fuzz.sh

# rustfmt, clippy and the wasm32-wasip1 target come from rustup (added here if missing,
# as scripts/setup.sh does).
lint:
	@$(CARGO) fmt --version >/dev/null 2>&1 && $(CARGO) clippy --version >/dev/null 2>&1 \
	  || rustup component add rustfmt clippy
	@rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p tollgate-filter --target wasm32-wasip1 -- -D warnings

fmt:
	$(CARGO) fmt --all

# The filter as the OCI image an Istio WasmPlugin pulls (url: oci://…): an OCI layout and
# tarball under target/oci; prints the manifest digest for the WasmPlugin's sha256.
oci: wasm
	@bash scripts/oci.sh

# The Istio bundle (istio/): every kustomize-rendered object against the published
# schemas, their cross-references, and the OCI image of `make oci`.
test-istio: wasm
	node --test istio/test/

# Side-by-side benchmarks (BENCHMARKS.md): Tollgate vs no filter, jwt_authn, ext_authz,
# Lua, in one Envoy, plus global limits on a fleet. Reports only (never part of `make test`); about 17 minutes.
# Longer or narrower runs: make bench BENCH_ARGS="--rounds 5 --duration 5" (see --help).
bench: setup wasm
	@bash bench/build-noop-wasm.sh
	CARGO_PROFILE_RELEASE_STRIP=false $(CARGO) build --release -p tollgate-bench -p usage-tracking
	./target/release/bench-run $(BENCH_ARGS)

clean:
	$(CARGO) clean
	rm -rf target/tollgate-runs
