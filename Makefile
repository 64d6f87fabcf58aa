# Two commands do all set-up on a fresh machine:
#   make demo   create .venv, install, run the embedded default experiment (Fig 1, FCN 3x256)
#   make test   create .venv, install, run the test suite
PYTHON ?= python3
TORCH  ?= torch==2.13.0# the CPU wheel this project's machines hold locally; any torch>=2.6,<2.15 works
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev,parquet]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/criticality run

test: lint
	@rc=0; $(BIN)/pytest -q || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: the suite is broken" >&2; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_engine.py

clean:
	rm -rf $(VENV) runs .pytest_cache
