# Two entry points for a fresh machine (see README): `make repro` and `make test`.
# Both create the virtual environment .venv from the frozen lock file first.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv system-deps browser-deps repro test test-fast bench clean-venv

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

repro: venv
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc repro

# Three pytest sessions, so that no test process mixes what must not share a process: the
# in-process Ray instance (one per session, tests/conftest.py), the separate two-node cluster of
# tests/test_infra_local.py, and the fork-based DataLoader workers of the loader tests.
TESTS_RAY     := tests/test_flows.py tests/test_train_ray.py tests/test_train_stage.py \
                 tests/test_train_dali_ray.py
TESTS_CLUSTER := tests/test_infra_local.py
PYTEST        := PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest

# The studio's browser tests drive Debian's Chromium (Playwright cannot download browsers
# here). Installed when missing, as root with apt (CI); elsewhere the tests skip and say why.
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else \
	    echo "note: chromium is missing and needs root + apt: the studio browser tests skip"; \
	  fi; }

RUFF          := $(VENV)/bin/ruff

# System packages only the tests need (PostgreSQL for the local stack); `make repro` does not.
system-deps:
	infra/local/system-deps.sh

# Lint and format drift fail the test command first (ruff's settings: pyproject.toml).
test: venv system-deps browser-deps
	$(RUFF) check .
	$(RUFF) format --check .
	$(PYTEST) $(addprefix --ignore=,$(TESTS_RAY) $(TESTS_CLUSTER))
	$(PYTEST) $(TESTS_RAY)
	$(PYTEST) $(TESTS_CLUSTER)

test-fast: venv browser-deps
	$(PYTEST) -m "not slow" $(addprefix --ignore=,$(TESTS_RAY) $(TESTS_CLUSTER))

clean-venv:
	rm -rf $(VENV)
