#!/usr/bin/env bash
# The main job end to end on the built-in demo data: set up .venv, generate the
# demo data set, train, evaluate, and predict on two demo images.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
RUN_DIR=${RUN_DIR:-runs/demo}
start=$(date +%s)
.venv/bin/hybridnet-tf train --config configs/demo.yaml --run-dir "$RUN_DIR" "$@"
.venv/bin/hybridnet-tf evaluate --run-dir "$RUN_DIR"
.venv/bin/hybridnet-tf predict --run-dir "$RUN_DIR" demo_data/val/000001.jpg demo_data/val/000002.jpg
echo "demo finished in $(( $(date +%s) - start )) s (after set-up); results in $RUN_DIR"
