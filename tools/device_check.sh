#!/usr/bin/env bash
# Runs tools/device_check.py on a bare accelerator machine (no network, no TensorFlow).
#
# ml_collections is not installed there: carry its wheel in wheels/ (git-ignored),
# fetched here once with
#   pip download ml-collections==1.1.0 --no-deps -d wheels
# (its dependencies absl-py, PyYAML come with orbax / transformers). Then, from the
# repository root on the device machine:
#   bash tools/device_check.sh [device_check.py flags, e.g. --budget_s 500]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import ml_collections" 2>/dev/null; then
  if ! ls wheels/ml_collections-*.whl >/dev/null 2>&1; then
    echo "ml_collections is missing and wheels/ has no ml_collections wheel:" \
         "run 'pip download ml-collections==1.1.0 --no-deps -d wheels' where there is a network" >&2
    exit 2
  fi
  python -m pip install --quiet --no-index --find-links wheels/ ml-collections
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=3
exec python tools/device_check.py "$@"
