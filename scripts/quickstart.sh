#!/usr/bin/env bash
# The main job on a fresh machine, offline: install, start a local Hub seeded with SmolLM2-135M-Instruct,
# convert it (RTN W4 g64 by default; pass other `hubquant convert` flags to change that), push the
# variant to the local Hub in one commit and print the card's quality table.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh data
. .venv/bin/activate
ROOT="${HUBQUANT_DEMO_ROOT:-$PWD/.cache/demo-hub}"
PORT="${HUBQUANT_DEMO_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
echo "==> seeding the local Hub at $ROOT with HuggingFaceTB/SmolLM2-135M-Instruct"
hubquant hub seed --root "$ROOT"
TOKEN="$(hubquant hub add-token --root "$ROOT" --user demo)"
hubquant hub serve --root "$ROOT" --port "$PORT" > "$ROOT/serve.log" 2>&1 &
HUB_PID=$!
trap 'kill $HUB_PID 2>/dev/null || true' EXIT
python - "$PORT" <<'PY'
import sys, time, urllib.request
for _ in range(100):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/api/models", timeout=1); break
    except OSError:
        time.sleep(0.2)
PY
export HF_ENDPOINT="http://127.0.0.1:$PORT" HF_HOME="$ROOT/hf-home"
export HF_TOKEN="$TOKEN"
if [ "$#" -eq 0 ]; then set -- --method rtn --bits 4 --group-size 64; fi
echo "==> hubquant convert HuggingFaceTB/SmolLM2-135M-Instruct $* --push"
hubquant convert HuggingFaceTB/SmolLM2-135M-Instruct "$@" --push --quiet
