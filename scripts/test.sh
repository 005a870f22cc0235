#!/usr/bin/env bash
# Install everything the tests need (venv, hubquant with all test extras, Chromium for the browser tests)
# and run the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh "data,test,space,service,bnb,kernels,optimum"
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "==> installing Debian's chromium for the browser tests"
  (apt-get install -y -qq chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium)) >/dev/null 2>&1 \
    || echo "   (could not install chromium; browser tests will be skipped)"
fi
. .venv/bin/activate
set +e
python -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
# exit 5 = no tests collected: not a failure of the suite itself, but say so
if [ "$rc" = 5 ]; then echo "pytest collected no tests"; exit 0; fi
exit "$rc"
