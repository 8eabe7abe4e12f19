#!/usr/bin/env bash
# Creates .venv with the CPU build of torch 2.13.0 and `der` (with its lab package `der_lab`: experiments,
# benchmarks, report generation) with the extras the demo and the tests use.
# Idempotent: a second run only checks what is there. torchvision/timm are never installed here
# (PyPI's torchvision breaks beside this torch and then `import transformers`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[geometry,hf,faiss,plots,exp,dev,bench]"
.venv/bin/python - <<'PY'
import importlib.util, sys
import torch
assert torch.__version__.startswith("2.13.0"), torch.__version__
if importlib.util.find_spec("torchvision") is not None:
    sys.exit("torchvision is installed in .venv; it breaks `import transformers` beside this torch. Remove it.")
PY
