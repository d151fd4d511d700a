# The two commands a newcomer needs: `cargo run -p toma-cli -- demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: test setup fmt-check clippy nextest core-purity demo fmt

test: setup fmt-check clippy core-purity nextest

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

demo:
	$(CARGO) run --release -p toma-cli -- demo
