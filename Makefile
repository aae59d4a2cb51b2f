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
	@echo "installing into $(VENV) (log: $(VENV)/install.log) …"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@( $(BIN)/python -m pip install --upgrade pip && \
	   $(BIN)/python -m pip install $(TORCH) && \
	   $(BIN)/python -m pip install -e '.[dev,hf,plot]' ) > $(VENV)/install.log 2>&1 \
	   || { tail -30 $(VENV)/install.log; exit 1; }
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check loraexport tests samples benchmarks
	$(BIN)/ruff format --check loraexport tests samples benchmarks

# The main job, end to end on the built-in sample model, offline: train the sample adapter
# (sorting digits, on a base pre-trained to reverse them), then merge, export and verify it.
demo: $(STAMP)
	$(BIN)/loraexport train --base samples/base --data samples/data/sort_train.jsonl \
		--eval-data samples/data/sort_eval.jsonl --out runs/demo-adapter --force
	$(BIN)/loraexport merge-and-export --base samples/base --adapter runs/demo-adapter \
		--eval-data samples/data/sort_eval.jsonl --out runs/demo --force

# Long measurements, never part of `make test`.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_latency.py

clean:
	rm -rf runs .pytest_cache
