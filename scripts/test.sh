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
. .venv/bin/activate
echo "==> lint (ruff check .)"
ruff check .
set +e
python -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
# exit 5 = no tests collected: not a failure of the suite itself, but say so
if [ "$rc" = 5 ]; then echo "pytest collected no tests"; exit 0; fi
exit "$rc"
