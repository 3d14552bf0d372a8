#!/usr/bin/env bash
# Run the whole test suite (the slow end-to-end tests on the real model included).
# Sets up ./.venv first when it is missing. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/tunesmith ] || bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
