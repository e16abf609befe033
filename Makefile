# hapair: set-up and everyday commands.
#
#   make demo    run the example site (local etcd, registry, one agent per node)
#   make unit    the unit tests alone: pure logic, in seconds, with the venv only
#   make test    lint, type-check and run the test suite (unit and integration)
#   make chaos   hundreds of random faults against a site in network namespaces
#   make bench   run the benchmarks in bench/ and write their results into docs/benchmarks/
#
# On a fresh Debian machine, run as root or with sudo: missing system packages (etcd,
# util-linux, python3-venv, wrk and keepalived for the benchmarks) are installed with
# apt-get, and a virtual environment .venv is made with the project and its development
# tools. It is set up again only when pyproject.toml changes.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hapair-installed

SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
APT_GET := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get -y -q -o Dpkg::Use-Pty=0

# No progress bars; quieter pip in CI (CI=true). apt-get runs non-interactively.
PIP_FLAGS := --progress-bar off $(if $(CI),-q,)
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PYTHONUNBUFFERED := 1

# Commands the targets need, each with the Debian package that brings it.
#   command:package
TEST_TOOLS := etcd:etcd-server etcdctl:etcd-client setpriv:util-linux arping:iputils-arping nft:nftables ip:iproute2 tc:iproute2 promtool:prometheus
BENCH_TOOLS := $(TEST_TOOLS) wrk:wrk keepalived:keepalived

.PHONY: help test unit lint fmt typecheck pytest demo bench clean venv sysdeps bench-sysdeps chaos docs

help:
	@echo "make demo    run the example site in deploy/demo-site.yaml (Ctrl-C stops it)"
	@echo "make unit    the unit tests (tests/unit): no etcd, PostgreSQL or root needed"
	@echo "make test    ruff, ruff format --check, mypy and pytest (tests/unit and tests/integration)"
	@echo "make chaos   200 random faults against a site in network namespaces (SEED=, FAULTS=, ONLY=)"
	@echo "make bench   run the benchmarks in bench/, their results into docs/benchmarks/ (BENCH=, NOTE=, BENCH_ARGS=)"
	@echo "make lint    ruff and mypy only"
	@echo "make fmt     format the code and apply ruff's safe fixes"
	@echo "make clean   remove .venv, caches and demo logs"

# --- system packages -----------------------------------------------------------------

# Installs, in one apt-get run, the package of every listed command that is missing.
define apt_install_missing
	@missing=""; \
	for pair in $(1); do \
	  cmd=$${pair%%:*}; pkg=$${pair#*:}; \
	  command -v "$$cmd" >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "==> installing Debian packages:$$missing"; \
	  $(APT_GET) update; \
	  $(APT_GET) install --no-install-recommends $$missing; \
	fi
endef

# PostgreSQL's server binaries are not on PATH (Debian keeps them per version).
PG_BIN := /usr/lib/postgresql/15/bin

sysdeps:
	$(call apt_install_missing,$(TEST_TOOLS))
	@if [ ! -x $(PG_BIN)/postgres ] || [ ! -x $(PG_BIN)/pg_rewind ]; then \
	  echo "==> installing Debian packages: postgresql-15"; \
	  $(APT_GET) update; \
	  $(APT_GET) install --no-install-recommends postgresql-15; \
	fi
	@id postgres >/dev/null 2>&1 || $(SUDO) useradd --system --user-group --no-create-home \
	  --shell /usr/sbin/nologin postgres

bench-sysdeps:
	$(call apt_install_missing,$(BENCH_TOOLS))

# --- virtual environment -------------------------------------------------------------

$(BIN)/python:
	@if ! $(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1; then \
	  echo "==> installing python3-venv"; \
	  $(APT_GET) update; \
	  $(APT_GET) install --no-install-recommends python3-venv; \
	fi
	@echo "==> creating $(VENV) with $$($(PYTHON) --version)"
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	@echo "==> installing hapair and its development tools into $(VENV)"
	$(BIN)/python -m pip install $(PIP_FLAGS) -e '.[server,dev]'
	@touch $@

venv: $(STAMP)

# --- checks ----------------------------------------------------------------------------

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

typecheck: venv
	$(BIN)/mypy

# PYTEST_ARGS narrows the run, e.g. make test PYTEST_ARGS="-k drain tests/integration/test_failover.py"
# The tests run in PYTEST_WORKERS processes (pytest-xdist; 0: in this one). Most of a
# test's time is spent waiting for leases and failovers, so two share a core well; each
# process has its own etcd, ports, namespaces and cgroups. Three on two cores were
# measured at 5 % less time and made timing more fragile: two it is. The slowest tests
# are listed at the end of each run, to keep the whole run short.
PYTEST_WORKERS ?= 2
# worksteal: a worker that runs out of tests takes some of the other's queue, so a run
# does not end on one worker still going through its share of long tests; the tests
# marked long run first (tests/conftest.py), so that none of them is the last one left.
PYTEST := $(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist worksteal --durations=25 --durations-min=5

pytest: venv sysdeps
	$(PYTEST) $(PYTEST_ARGS)

# Pure logic only (tests/unit): no system package, no etcd, PostgreSQL or root.
unit: venv
	$(PYTEST) $(PYTEST_ARGS) tests/unit

test: venv sysdeps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(MAKE) docs
	$(PYTEST) $(PYTEST_ARGS)

# --strict: a broken link, a missing anchor or a page left out of the nav fails the build.
export NO_MKDOCS_2_WARNING := 1
docs: venv
	$(BIN)/mkdocs build --strict

# The chaos suite (tests/chaos; a five-fault smoke of it runs in make test). The schedule
# comes from SEED alone and is printed; ONLY=3,7-9 runs just those faults of it, to replay
# and reduce a failing run. CHAOS_ARGS passes more, e.g. CHAOS_ARGS="--db off --keep".
# Needs root: every node and etcd member gets its own network namespace.
SEED ?= 7
FAULTS ?= 200
chaos: venv sysdeps
	PYTHONPATH=. $(BIN)/python -m tests.chaos --seed $(SEED) --faults $(FAULTS) \
	  $(if $(ONLY),--only $(ONLY)) $(CHAOS_ARGS)

fmt: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# --- running -----------------------------------------------------------------------------

demo: venv sysdeps
	$(BIN)/python deploy/demo.py $(DEMO_ARGS)

# BENCH=name runs only the benchmarks whose file name contains it; each one that succeeds
# writes its results page, docs/benchmarks/NAME.md (a failed one leaves it as it was).
# NOTE="..." adds a line to those pages (what else ran); BENCH_ARGS go to each benchmark.
bench: venv sysdeps bench-sysdeps
	$(BIN)/python -m bench.run_all --write $(if $(NOTE),--note "$(NOTE)") $(BENCH) \
	  $(if $(BENCH_ARGS),-- $(BENCH_ARGS))

# --- cleaning ------------------------------------------------------------------------------

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis build dist demo-run site
	rm -rf *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
