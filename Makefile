# loraexport — every target installs what it needs first (idempotent).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install test lint demo bench clean samples

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev,hf,plot]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check loraexport tests samples benchmarks
	$(BIN)/ruff format --check loraexport tests samples benchmarks

# The main job, end to end on the built-in sample model, offline.
demo: $(STAMP)
	$(BIN)/python samples/make_base.py --out runs/sample-base
	$(BIN)/loraexport train --base runs/sample-base --data samples/data/sort_train.jsonl \
		--eval-data samples/data/sort_eval.jsonl --out runs/demo-adapter --force
	$(BIN)/loraexport merge-and-export --base runs/sample-base --adapter runs/demo-adapter \
		--eval-data samples/data/sort_eval.jsonl --out runs/demo --force

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_latency.py

clean:
	rm -rf runs .pytest_cache
