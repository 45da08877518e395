#!/usr/bin/env bash
# The prepared GPU check of issue 12 (bench/gpu_bench.py): one command on the lent machine, within 8 minutes.
#
#   bash bench/gpu.sh [gpu_bench.py arguments]       e.g. bash bench/gpu.sh --no-flops
#
# The machine has the repository but no venv and no network: use the first python that imports torch
# ($PYTHON, the repo's .venv, the image's /opt/torch/.venv, python3), check the few packages the code imports,
# then run the benchmark with a hard timeout (GPU_BENCH_TIMEOUT, default 480 s). Results: a table on stdout and
# JSON in $SLOTMEM_BENCH_OUT, else $OUT/gpu_bench.json, else bench/results/gpu_bench.json.
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in .venv/bin/python /opt/torch/.venv/bin/python3 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import torch' >/dev/null 2>&1; then
      PY="$candidate"
      break
    fi
  done
fi
if [ -z "$PY" ]; then
  echo "gpu.sh: no python that imports torch (tried \$PYTHON, .venv/bin/python, /opt/torch/.venv/bin/python3," \
       "python3); set PYTHON=/path/to/python" >&2
  exit 2
fi

# one start of python (torch takes seconds to import): the packages model/, memory/, rollout/ and slotmem/ import at
# module level (no registry on the machine: carry wheels), then what runs where
"$PY" -c '
import importlib.util, sys
missing = [m for m in ("einops", "yaml", "safetensors", "numpy", "PIL") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu.sh: {sys.executable} lacks {missing} (carry them as wheels: /work/.library/device/README.md, Notes)")
try:
    import torch
except ImportError as e:
    sys.exit(f"gpu.sh: {sys.executable} cannot import torch ({e}); set PYTHON to a python with a CUDA torch")
print(f"gpu.sh: {sys.executable}, python {sys.version.split()[0]}, torch {torch.__version__}, cuda:",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (shrunk CPU mode)")' || exit 2

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
exec timeout "${GPU_BENCH_TIMEOUT:-480}" "$PY" bench/gpu_bench.py "$@"
