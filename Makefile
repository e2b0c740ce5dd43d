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

# Every benchmark suite but interference (kernels, memory, storage, roofline): CSV + JSON + PNG under benchmarks/results/,
# the tables printed as markdown. BENCH_ARGS: e.g. --suite kernels, --quick, --backends cpu_ext.
bench: install
	$(PY) -m lori.bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info lori_kernels/_C*.so

# Ahead-of-time compile check for sm_90 and sm_80, no GPU needed: every Triton kernel x autotune
# config x launch variant, and csrc/*.cu through nvcc; fails on a compile error, shared memory
# over the target's limit or a spill in bfloat16/float16; writes benchmarks/results/compile_sm90.csv
# and compile_sm80.csv. `make test` runs a subset (tests/test_compile.py).
.PHONY: compile-check
compile-check: install
	$(PY) -m benchmarks.compile_check --results benchmarks/results

# The LoRI paper's claims in miniature (lori/bench/interference.py): PEFT LoRA, LoRI-D and LoRI-S
# trained on four toy string tasks over one tiny base model, merged and in continual learning,
# every seed fixed; about 5 minutes on 2 CPU cores. Writes benchmarks/results/interference_cpu.*
# (CSV, JSON, PNG) and prints the tables. BENCH_ARGS: e.g. --quick (a smoke run in seconds).
.PHONY: interference
interference: install
	$(PY) -m lori.bench --suite interference $(BENCH_ARGS)
