# The README's two commands are `make demo` and `make test`; both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.fastds-installed
SOURCES := setup.py pyproject.toml requirements.txt $(wildcard csrc/*)

.PHONY: install test demo bench bench-check wheel-check clean

$(STAMP): $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest tests -q

demo: $(STAMP)
	$(BIN)/fastds demo

bench: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -c bench/pytest.ini bench

# Benchmarks' own correctness checks, each provider run once and untimed (CI runs this).
bench-check: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -c bench/pytest.ini bench --benchmark-disable -m "not slow"

# The installed package, not the source tree: a wheel into a fresh venv, used from outside
# the checkout (quick demo and a smoke subset of the tests). CI runs this too.
wheel-check:
	PYTHON=$(PYTHON) TORCH="$(TORCH)" bash .ci/wheel_check.sh

clean:
	rm -rf build *.egg-info fastds/*.so .pytest_cache .benchmarks
