# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo bench clean toyworld

setup: $(STAMP)

# torch is pinned in the same pip command as everything else: an unpinned torch pulls a multi-GB CUDA
# build, while torch==2.13.0 resolves to the local CPU wheel.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 -e '.[dev]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q --timeout=300 --durations=20 tests

demo: setup
	$(BIN)/slotmem pipeline --config configs/tiny.yaml

# The toy world's VAE, text encoder, teacher and student bases (toyworld/weights/, < 45 min on 2 CPU cores).
toyworld: setup
	$(BIN)/python -m toyworld.train all

bench: setup
	$(BIN)/python bench/memory_retention.py
	$(BIN)/python bench/rollout_throughput.py
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/loop.py
	$(BIN)/python bench/flops.py
	$(BIN)/python bench/entity_memory.py
	$(BIN)/python bench/toy_teacher.py

clean:
	rm -rf $(VENV) runs
