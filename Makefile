# llm-gateway: `make run` builds and serves on ./config.yaml; `make test` runs the whole suite.
# `make check` is what CI runs first: formatting and clippy with warnings denied.

CARGO  ?= cargo
CONFIG ?= config.yaml
MUSL   := x86_64-unknown-linux-musl

.PHONY: build run test check faults static bench clean

build:
	$(CARGO) build --release

run: build
	./target/release/llm-gateway --config $(CONFIG) server

# The shared-state tests (tests/scale) start a real redis-server; Debian's is in the registry.
# The SDK tests use the official Python SDKs; Claude Code and Codex CLI come from the npm
# registry (tests/clients/package.json pins their versions; each ships its native binary in
# the package). The dashboard test drives Debian's Chromium with playwright-core (npm).
test:
	command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -r tests/sdk/requirements.txt
	test -x tests/clients/node_modules/.bin/claude -a -x tests/clients/node_modules/.bin/codex -a -d tests/clients/node_modules/playwright-core || npm install --prefix tests/clients --no-audit --no-fund
	$(CARGO) test

# The fault suite (README: Reliability). `make test` runs its short form too; LONG=1 runs the
# long forms (a 30-minute soak, hundreds of kill -9 rounds, a million fuzz inputs per parser).
faults:
	FAULTS_LONG=$(if $(LONG),1,0) $(CARGO) test -- --include-ignored faults:: fuzz::

check:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

# A fully static binary (no libc needed at run time). ring, under rustls, compiles C, so the
# musl target needs Debian's musl-tools as well as the Rust target.
static:
	rustup target list --installed | grep -q '^$(MUSL)$$' || rustup target add $(MUSL)
	command -v musl-gcc >/dev/null || (apt-get update -qq && apt-get install -y -qq musl-tools)
	CC_x86_64_unknown_linux_musl=musl-gcc $(CARGO) build --release --target $(MUSL)
	@ls -l target/$(MUSL)/release/llm-gateway

# Gateway vs direct vs nginx on loopback (README: Performance); QUICK=1 for a short run,
# BINARY=static to serve with the static (musl) build.
# Installs wrk and nginx from the package registry when missing.
bench:
	QUICK='$(QUICK)' CARGO='$(CARGO)' bash bench/run.sh

clean:
	$(CARGO) clean
