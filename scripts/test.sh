#!/usr/bin/env bash
# Install everything the tests need (venv, hubquant with all test extras, Chromium for the browser tests)
# lint the tree (ruff) and run the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh "data,test,space,service,bnb,kernels"
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "==> installing Debian's chromium for the browser tests"
  (apt-get install -y -qq chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium)) >/dev/null 2>&1 \
    || echo "   (could not install chromium; browser tests will be skipped)"
fi
# the local Hub must also serve huggingface_hub 1.x clients: a small venv with the last 1.x release
HF1=.cache/venv-hf1
if [ ! -x "$HF1/bin/python" ]; then
  python3 -m venv "$HF1" && "$HF1/bin/pip" install -q "huggingface_hub<2" || rm -rf "$HF1"
fi
[ -x "$HF1/bin/python" ] && export HUBQUANT_HF_CLIENT_PYTHONS="$PWD/$HF1/bin/python"
# the loading tests also run against the oldest versions pyproject allows (transformers, compressed-tensors,
# huggingface_hub, accelerate, safetensors, bitsandbytes at their floors); every other package, torch included,
# comes from .venv through a path entry
OLDEST=.cache/venv-oldest
PINS="$(.venv/bin/python scripts/oldest_pins.py)"
if [ ! -x "$OLDEST/bin/python" ] || [ "$(cat "$OLDEST/pins" 2>/dev/null)" != "$PINS" ]; then
  echo "==> building $OLDEST:" $PINS
  rm -rf "$OLDEST" && .venv/bin/python -m venv "$OLDEST"
  .venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
    > "$("$OLDEST/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_main_venv.pth"
  # shellcheck disable=SC2086
  "$OLDEST/bin/pip" install -q $PINS && echo "$PINS" > "$OLDEST/pins"
fi
. .venv/bin/activate
echo "==> lint (ruff check .)"
ruff check .
set +e
python -m pytest -q -p no:cacheprovider "$@"
rc=$?
if [ "$#" -eq 0 ]; then
  echo "==> tests/loading with the oldest supported versions"
  PYTHONPATH="$PWD:$PWD/kernels" "$OLDEST/bin/python" -m pytest -q -p no:cacheprovider tests/loading
  rc_old=$?
  [ "$rc" = 0 ] && rc=$rc_old
fi
set -e
# exit 5 = no tests collected: not a failure of the suite itself, but say so
if [ "$rc" = 5 ]; then echo "pytest collected no tests"; exit 0; fi
exit "$rc"
