#!/usr/bin/env bash
# One command for a bare GPU machine (torch + triton preinstalled, no internet, no ../shared):
# trains the largest QAIRN whose fp16 weights fit 20 MB for --max-seconds (default 450 s), exports,
# picks p on the held-out images, evaluates on LIVE1; weights, logs and report.txt go to $OUT
# (or ./runs/gpu). Needs gpu_pack/ (python scripts/build_train_pack.py; carry it to the machine).
# Extra arguments go to scripts/gpu_train.py, e.g. --preset paper or --max-seconds 60.
# Whole command: about max-seconds + 90 s; the device allows 600 s per command.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=$(command -v python3 || command -v python)
if [ ! -d gpu_pack/train ]; then
  echo "gpu_pack/ missing: run python scripts/build_train_pack.py here first and carry gpu_pack" >&2
  exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PY" scripts/gpu_train.py "$@"
