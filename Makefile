# The two commands for a fresh machine are `make demo` and `make test`; both create .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first, so that no later requirement pulls another build. pip takes a local
# CPU wheel where one exists (this project's machines and CI); elsewhere on Linux, PyPI's
# torch==2.13.0 is a CUDA build, and TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
# gets the CPU build. Run `make clean` after changing either, because an existing .venv is kept.
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=

.PHONY: venv demo test reference-model benchmark clean

$(BIN)/ctxmem: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

venv: $(BIN)/ctxmem

demo: venv
	HF_HUB_OFFLINE=1 $(BIN)/ctxmem demo

test: venv
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

# Retrain the bundled reference model from its seed (about 95 minutes on 2 CPU cores) and rewrite its card.
reference-model: venv
	$(BIN)/python scripts/train_reference_model.py --out build/reference
	$(BIN)/python scripts/write_model_card.py --model build/reference
	mkdir -p ctxmem/reference/model
	cp build/reference/* ctxmem/reference/model/

# landmark_store.py and sessions.py need Redis at 127.0.0.1:6379 (or --redis-url) and delete the keys they write.
benchmark: venv
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/load_time.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/streaming_speed.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/streaming_quality.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/landmark_store.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/landmark_quality.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/sessions.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/inspect_memory.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/extension.py

clean:
	rm -rf $(VENV) build
