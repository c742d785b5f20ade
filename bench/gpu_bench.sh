#!/usr/bin/env bash
# Every GPU figure of issue #14 in one command, within 9 minutes on one H200 (see README_gpu.md):
#   bench/gpu_bench.sh OUT [--dry-run] [gpu_bench.py options]
# Runs from a copy of the project (src/ bench/ presets/ params.yaml pyproject.toml tests/), with
# the wheels the GPU machine lacks in .whl/ (kornia, kornia-rs) and the CIFAR-10 archive in
# .gpu/cifar10-jpeg.tar.gz. Writes OUT/<step>.json after each step and OUT/log.txt.
set -uo pipefail
OUT=${1:?usage: bench/gpu_bench.sh OUT [--dry-run] [options]}
shift
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$OUT"
# the GPU machine has no package registry: the wheels it lacks travel in .whl/
if compgen -G "$ROOT/.whl/*.whl" >/dev/null && ! "$PY" -c "import kornia" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/vflow-site "$ROOT"/.whl/*.whl || exit 1
  export PYTHONPATH=/tmp/vflow-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$ROOT/src:$ROOT/bench${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true
"$PY" "$ROOT/bench/gpu_bench.py" --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
