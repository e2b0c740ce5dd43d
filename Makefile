# Two commands for a newcomer: `make test` and `make demo`. Both create .venv (Python
# 3.11) on first use, install the package editable with its dev extras (building the
# lori_kernels._C extension) and reuse it afterwards. See README.md for the switches.

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
PYTEST_ARGS ?=
BENCH_ARGS ?=

# Tests fail (not skip) when the extension is missing, unless it was skipped on purpose.
ifneq ($(LORI_BUILD_EXT),0)
TEST_ENV := LORI_REQUIRE_EXT=1
endif

.PHONY: install test demo bench clean

install: $(VENV)/.installed

# torch first: the extension is built against the torch in the venv (no build isolation).
$(VENV)/.deps: constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt setuptools wheel torch
	touch $@

$(VENV)/.installed: $(VENV)/.deps setup.py $(wildcard csrc/*)
	$(PIP) install -q -c constraints.txt --no-build-isolation -e ".[dev]"
	touch $@

test: install
	$(TEST_ENV) $(PY) -m pytest -q $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/lori demo

# Every benchmark suite (kernels, memory, storage): CSV + JSON + PNG under benchmarks/results/,
# the tables printed as markdown. BENCH_ARGS: e.g. --suite kernels, --quick, --backends cpu_ext.
bench: install
	$(PY) -m lori.bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info lori_kernels/_C*.so
