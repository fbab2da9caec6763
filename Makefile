# Tollgate. `make run` and `make test` each install what they need first.
SHELL := /bin/bash
CARGO ?= cargo
WASM := target/wasm32-wasip1/release/tollgate_filter.wasm
export PATH := $(CURDIR)/.local/bin:$(PATH)

.PHONY: setup wasm build run test test-unit test-wasm test-e2e lint fmt clean fuzz

setup:
	@bash scripts/setup.sh

wasm:
	@bash scripts/build-wasm.sh

build: wasm
	$(CARGO) build -p usage-tracking -p tollgate-harness

run: setup build
	./target/debug/tollgate up

test: setup build test-unit test-wasm test-e2e
	@echo "make test: all suites passed"

test-unit:
	$(CARGO) test --workspace --exclude tollgate-e2e

# The filter's pure-logic tests again, compiled to wasm32 and run under node.
test-wasm:
	CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
	  $(CARGO) test -p tollgate-filter --lib --target wasm32-unknown-unknown

test-e2e:
	$(CARGO) test -p tollgate-e2e -- --test-threads=2

# Bounded fuzzing of the JWT, credential, config and usage parsers (cargo-fuzz);
# FUZZ_SECONDS per target, default 60. Not part of `make test`.
fuzz:
	@bash scripts/fuzz.sh

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p tollgate-filter --target wasm32-wasip1 -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
	rm -rf target/tollgate-runs
