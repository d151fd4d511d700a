# The two commands a newcomer needs: `cargo run -p toma-cli -- demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: test setup fmt-check clippy nextest core-purity demo fmt e2e fuzz crds

test: setup fmt-check clippy core-purity nextest fuzz e2e

setup:
	@scripts/setup.sh

fmt:
	$(CARGO) fmt --all

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

# toma-core must not pull in async runtimes or I/O crates, directly or not.
core-purity:
	@deps=$$($(CARGO) tree -p toma-core -e normal --prefix none --locked | sed 's/ .*//' | sort -u); \
	bad=$$(echo "$$deps" | grep -Ev '^(toma-core|thiserror|thiserror-impl|proc-macro2|quote|syn|unicode-ident)$$' || true); \
	if [ -n "$$bad" ]; then echo "toma-core must stay pure; it depends on: $$bad"; exit 1; fi; \
	echo "toma-core dependencies are pure: $$(echo $$deps)"

nextest:
	$(CARGO) nextest run --workspace --locked --no-fail-fast

# Coverage-guided fuzzing of the frame decoder (nightly + cargo-fuzz, installed by setup).
# New inputs go to fuzz/corpus (ignored by git); fuzz/seeds holds one frame of every kind.
fuzz:
	cd crates/toma-wire/fuzz && mkdir -p corpus/decode_frame && \
	$(CARGO) +nightly fuzz run decode_frame corpus/decode_frame seeds -- -max_total_time=60

# End-to-end suite against a loopback Kubernetes control plane (e2e/README.md). The first run
# builds the pinned Go tools (etcd, kube-apiserver, ..., helm) once; later runs reuse the cache.
# The fault scenarios (a)-(g) run agents in network namespaces (root needed).
e2e:
	e2e/smoke.sh
	e2e/scenarios.sh
	e2e/csi.sh

# CRD YAML in crds/, generated from crates/toma-crds (a test there fails when it is stale).
crds:
	$(CARGO) run -q -p toma-crds --bin crdgen -- crds

demo:
	$(CARGO) run --release -p toma-cli -- demo
