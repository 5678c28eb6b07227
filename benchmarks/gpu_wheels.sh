#!/usr/bin/env bash
# Wheels the lent GPU machine lacks (its image has torch, numpy, pyyaml, scikit-learn, but not
# these), for benchmarks/gpu_figures.py. Run here, where pip reaches the registry; the folder
# .whl is git-ignored, and the device call names it in `carry`:
#   bash benchmarks/gpu_wheels.sh
#   run: python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#          --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && \
#        PYTHONUNBUFFERED=1 python3 benchmarks/gpu_figures.py --out $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  pydantic pydantic-core annotated-types typing-inspection torchao pytorch-optimizer
ls .whl
