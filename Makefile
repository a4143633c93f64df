# `make demo` and `make test` create .venv on first use and install the project into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-slow test-all bench gpu-bundle clean readme-tables

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m jobs.demo $(ARGS)

# The default suite (4-9 min on 2 cores, by CPU: docs/BENCHMARKS.md, "Measured on which machine"); the slow
# tests (Ray Train runs, fault injection, the two-node cluster with node loss, S3 against moto:
# 12-23 min) run in CI after it. The default suite runs `--precision auto` as this CPU decides;
# the slow suite runs it as fp32 (RESNET_PIPELINE_CPU_BF16=0: as on an AVX2-only CPU) unless the
# variable is given (RESNET_PIPELINE_CPU_BF16=1 make test-slow: as this CPU decides).
CPU_BF16_SLOW := $(if $(RESNET_PIPELINE_CPU_BF16),$(RESNET_PIPELINE_CPU_BF16),0)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(ARGS)

test-slow: $(STAMP)
	RESNET_PIPELINE_CPU_BF16=$(CPU_BF16_SLOW) $(PY) -m pytest -q -m slow $(ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

bench: $(STAMP)
	$(PY) -m jobs.benchmark --write-docs $(ARGS)

# The offline Ray bundle for a Python 3.12 GPU node without Ray (docs/BENCHMARKS.md, "The GPU run").
gpu-bundle:
	bench/gpu_bundle.sh build .gpu-bundle

clean:
	rm -rf $(VENV) .pytest_cache

# Rewrite the bad-input and fault tables in docs/RELIABILITY.md from a fresh run of the tests behind them.
readme-tables: $(STAMP)
	UPDATE_README_TABLES=1 $(PY) -m pytest -q tests/test_corpus.py tests/test_faults.py

# Headless Chromium for the report render check in tests/test_nightly.py, installed only when
# missing (Debian's package; needs root, as in CI). Without it that test skips, or fails in CI.
.PHONY: browser
# A browser already on PATH is used as it is. Installing one needs root: as root apt-get runs,
# otherwise sudo without a password prompt; failing both, one line says what to run.
browser:
	@for b in chromium chromium-browser google-chrome google-chrome-stable; do \
	  if command -v $$b >/dev/null; then echo "browser: $$(command -v $$b)"; exit 0; fi; done; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO=sudo; else \
	  echo "make browser: no Chromium on PATH, and installing one needs root: run 'sudo apt-get install chromium' (Debian/Ubuntu) or put any Chromium or Chrome on PATH. Without one the report render test skips locally (and fails under CI=true)" >&2; exit 1; fi; \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium
