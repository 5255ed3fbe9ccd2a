# Every target bootstraps .venv itself: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast bench lint clean

install: $(STAMP)

# Reinstall when the dependencies change. constraints.txt pins torch and torchvision (and the
# versions the code was tested with); pyproject.toml keeps ranges.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --progress-bar off -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/imgcls-hpo search digits --trials 12

# The tests run in parallel processes (pytest-xdist), one per core up to 4, each test file whole
# in one process, so that a module's servers and Ray runtime start once.
TEST_WORKERS ?= auto
PYTEST := $(BIN)/python -m pytest -n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile

test: $(STAMP)
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

# Benchmarks 1-3 (pipeline, study overhead, pruning), each printing its ratios against the
# targets; about 15 minutes on two cores. The pipeline runs on real photos where they are
# (BENCH_DATA), else on JPEGs it generates. Pruning searches the digits space with simplecnn only
# (its full space, with resnet18 trials, takes 15-25 minutes more). benchmarks/concurrency.py
# needs a GPU: run it there.
BENCH_DATA ?= ../shared/datasets/hymenoptera

bench: $(STAMP)
	$(BIN)/python benchmarks/pipeline.py $(if $(wildcard $(BENCH_DATA)),--data $(BENCH_DATA))
	$(BIN)/python benchmarks/study.py
	$(BIN)/python benchmarks/pruning.py --param arch=simplecnn

lint: $(STAMP)
	$(BIN)/ruff check imgcls hpo tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
