#!/usr/bin/env bash
# Re-take the README's registry screenshots: headless Chromium on `mlflow ui` over this
# project's store. Fill the store first, e.g. `make run`, then set train.epochs: 8 in
# params.yaml and `.venv/bin/dvc repro` (a second, better version: champion + previous).
# Usage: VERSION=3 docs/screenshots.sh
set -euo pipefail
cd "$(dirname "$0")/.."
port=${PORT:-5123}
name=${MODEL:-visionflow-classifier}
version=${VERSION:?set VERSION to the model version whose page to show}
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
setsid .venv/bin/mlflow ui --backend-store-uri "sqlite:///$PWD/mlruns/mlflow.db" \
  --port "$port" >/dev/null 2>&1 &
ui=$!
trap 'kill -- -$ui 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 1; done
shot() {  # window size, output file, page
  chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size="$1" \
    --virtual-time-budget=15000 --screenshot="$2" "$3" 2>/dev/null
}
shot 1400,1500 docs/registry.png "http://127.0.0.1:$port/#/models/$name/versions/$version"
shot 1400,2300 docs/registry_versions.png "http://127.0.0.1:$port/#/models/$name"
