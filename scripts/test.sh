#!/usr/bin/env bash
# Sets up .venv and runs the test suite (slow tests too when HYBRIDNET_RUN_SLOW=1, and in
# CI: CI=true turns them on unless HYBRIDNET_RUN_SLOW=0).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k decoder`.
# In CI (CI=true) as root with apt-get, it installs Debian's chromium for the report.html
# browser test when no browser is there; anywhere else it never installs system packages,
# and without a browser that test skips and says why.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ "${CI:-}" = "true" ] && ! command -v chromium >/dev/null 2>&1 && ! command -v google-chrome >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "scripts/test.sh: CI: installing Debian's chromium for the browser test"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium
  else
    echo "scripts/test.sh: CI: no chromium and not root with apt-get: the browser test will skip" >&2
  fi
fi
bash scripts/setup_env.sh
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
run_slow=${HYBRIDNET_RUN_SLOW:-}
if [ -z "$run_slow" ] && [ "${CI:-}" = "true" ]; then run_slow=1; fi
markers=()
if [ "$run_slow" = "1" ]; then markers=(-m "slow or not slow"); fi
# Two pytest workers (pytest-xdist), each test file on one worker so its module
# fixtures (trained runs) are built once. Much of a test's time is single-threaded
# tracing and graph building, so two workers on 2 cores took the default suite from
# 12 min 50 s to 7 min 35 s. HYBRIDNET_TEST_WORKERS=0 runs in one process (pdb, -x).
workers=${HYBRIDNET_TEST_WORKERS:-2}
parallel=()
if [ "$workers" != "0" ]; then parallel=(-n "$workers" --dist loadfile); fi
exec .venv/bin/python -m pytest -q -rs -p no:cacheprovider "${markers[@]}" "${parallel[@]}" "$@"
