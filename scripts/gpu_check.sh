#!/usr/bin/env bash
# Every recipe for a few steps on a CUDA GPU in bf16 (scripts/gpu_check.py), on a machine whose
# Python has torch (CUDA), transformers, peft and accelerate and may reach no registry:
#
#   bash scripts/gpu_wheels.sh               # first, where a registry is reachable: .gpu_wheels/
#   bash scripts/gpu_check.sh                # there, from a copy of the repo with .gpu_wheels/
#   bash scripts/gpu_check.sh --only sft-lora,dpo      # options go to gpu_check.py
#
# It installs the carried wheels that are missing (never replacing an installed package), then
# the project itself without its dependencies, and runs the check; the table and a JSON of the
# results land in runs/gpu_check/. Exit status 1 when a recipe failed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -d .gpu_wheels ]; then
  "$PY" scripts/gpu_check.py --install-wheels .gpu_wheels
fi
if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .; then
  echo "pip install -e . failed: running alignforge from the source tree" >&2
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PY" scripts/gpu_check.py "$@"
