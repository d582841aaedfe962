#!/usr/bin/env bash
# Creates .venv (Python 3.10+) and installs hybridnet_tf into it; sourced by demo.sh and test.sh.
# Re-running is cheap: pip skips what is installed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]"
if [ "${HYBRIDNET_WITH_TORCH:-${CI:-}}" = "true" ] || [ "${HYBRIDNET_WITH_TORCH:-}" = "1" ]; then
  # The PyTorch reference for the EfficientNet-Lite parity test. torch is pinned
  # first: an unpinned torch (which efficientnet-lite-pytorch asks for) pulls a
  # multi-GB CUDA build.
  .venv/bin/python -m pip install --quiet torch==2.13.0
  .venv/bin/python -m pip install --quiet -e ".[lite]" efficientnet-lite-pytorch
fi
if [ "${HYBRIDNET_WITH_HUB:-${CI:-}}" = "true" ] || [ "${HYBRIDNET_WITH_HUB:-}" = "1" ]; then
  # KerasHub for the hub backbone and tests/test_hub_backbones.py (which skip without it);
  # an extra because it pulls tensorflow-text, tokenizers, kagglehub, huggingface_hub.
  .venv/bin/python -m pip install --quiet -e ".[hub]"
fi
