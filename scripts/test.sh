#!/usr/bin/env bash
# Sets up .venv and runs the test suite (slow tests too when HYBRIDNET_RUN_SLOW=1).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k decoder`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
markers=()
if [ "${HYBRIDNET_RUN_SLOW:-}" = "1" ]; then markers=(-m "slow or not slow"); fi
exec .venv/bin/python -m pytest -q -rs -p no:cacheprovider "${markers[@]}" "$@"
