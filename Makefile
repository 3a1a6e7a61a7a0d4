# Two commands a newcomer needs: `make demo` and `make test`. Both build .venv first if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[all,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/hivenode sim demo

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check hivenode tests benchmarks
	$(BIN)/mypy --strict hivenode

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_swarm.py
	$(BIN)/python benchmarks/bench_idle.py
	$(BIN)/python benchmarks/bench_status.py
	$(BIN)/python benchmarks/bench_identify.py

clean:
	rm -rf $(VENV) build dist .mypy_cache .ruff_cache
