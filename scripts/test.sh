#!/usr/bin/env bash
# Run the whole test suite (unit, kernels, integration with the real default models).
# Needs scripts/install.sh to have run once. Extra arguments go to pytest (e.g. -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider --timeout=900 --durations=25 tests "$@"
