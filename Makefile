# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo bench clean

setup: $(STAMP)

# torch is pinned in the same pip command as everything else: an unpinned torch pulls a multi-GB CUDA
# build, while torch==2.13.0 resolves to the local CPU wheel.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 -e '.[dev]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q --timeout=300 tests

demo: setup
	$(BIN)/slotmem pipeline --config configs/tiny.yaml

bench: setup
	$(BIN)/python bench/memory_retention.py
	$(BIN)/python bench/rollout_throughput.py
	$(BIN)/python bench/train_throughput.py

clean:
	rm -rf $(VENV) runs
