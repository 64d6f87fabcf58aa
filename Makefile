# Two commands do all set-up on a fresh machine:
#   make demo   create .venv, install, run the embedded default experiment (Fig 1, FCN 3x256)
#   make test   create .venv, install, run the test suite
#   make test-foreign   create .venv-foreign (torch + torchvision + timm + transformers), run the architecture
#                       matrix of tests_foreign/ and write its table to build/architectures.md
PYTHON ?= python3
TORCH  ?= torch==2.13.0# the CPU wheel this project's machines hold locally; any torch>=2.6,<2.15 works
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# The architecture matrix needs timm, whose torchvision wants a torch build of its own: a second venv, apart
# from the CPU-wheel one. Both wheels below lie on this project's machines for Python 3.11 x86_64.
FOREIGN_TORCH  ?= torch==2.14.1 torchvision==0.29.1
FOREIGN        := .venv-foreign
FOREIGN_BIN    := $(FOREIGN)/bin
FOREIGN_STAMP  := $(FOREIGN)/.installed

.PHONY: demo test test-foreign lint bench clean

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

$(FOREIGN_STAMP): pyproject.toml
	$(PYTHON) -m venv $(FOREIGN)
	$(FOREIGN_BIN)/pip install --quiet --upgrade pip
	$(FOREIGN_BIN)/pip install --quiet $(FOREIGN_TORCH)
	$(FOREIGN_BIN)/pip install --quiet -e ".[timm,hf]" accelerate pytest hypothesis
	touch $(FOREIGN_STAMP)

test-foreign: $(FOREIGN_STAMP)
	@rc=0; $(FOREIGN_BIN)/pytest -q -p no:cacheprovider tests_foreign || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: the matrix is broken" >&2; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check src tests tests_foreign benchmarks examples
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_engine.py

clean:
	rm -rf $(VENV) $(FOREIGN) runs .pytest_cache build/architectures.md
