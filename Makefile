# Two entry points on a fresh machine with only Python 3: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench clean venv lint

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/microseg demo

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile tests

$(VENV)/.lint-installed: $(STAMP)
	$(PY) -m pip install -q -e '.[test,bench,lint]'
	touch $@

# Style and mistakes (ruff) over the sources, tests and benchmarks; types (mypy) over the
# packages listed in pyproject.toml.
lint: $(VENV)/.lint-installed
	$(VENV)/bin/ruff check src tests bench tools
	$(VENV)/bin/ruff format --check src tests bench tools
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) bench/run_all.py

# Mutated packets through the datapath and mutated files through every CLI verb (docs/fuzzing.md).
.PHONY: fuzz
fuzz: $(STAMP)
	$(PY) tools/fuzz.py --out build/fuzz

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# The kernel fast path's XDP object (docs/kernel-fastpath.md), committed beside its source so
# that installing needs no compiler. Built where it lies with its path mapped to ".", debug
# info stripped (BTF kept): the same clang gives the same bytes anywhere.
.PHONY: bpf
bpf:
	cd src/microseg/bpf && clang -O2 -g -target bpf -Wall -Werror -fdebug-prefix-map="$$(pwd)"=. \
		-c fastpath.bpf.c -o fastpath.bpf.o && llvm-strip -g fastpath.bpf.o
