#!/usr/bin/env bash
# A quick local debug run, before a long job: one process (the first GPU when CUDA finds one, else the
# CPU), 200 images at 64 px, 20 steps, a loss line every step. Started directly, without a launcher.
#
#   launch/local_debug.sh [tl_dist/train.py options]     (yours come last, so they win)
#   launch/local_debug.sh --model vgg_tiny --weights none --data-dir /some/image/tree --max-steps 5
#
# Environment: PYTHON (default: python on PATH), CUDA_VISIBLE_DEVICES (which GPU; default: the first).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
export ACCELERATE_MIXED_PRECISION=${ACCELERATE_MIXED_PRECISION:-no}

exec "$PYTHON" "$REPO/tl_dist/train.py" \
  --max-samples 200 --image-size 64 --batch-size 16 --epochs 1 --max-steps 20 --log-every 1 \
  --output-dir "runs/debug-$(date +%Y%m%d-%H%M%S)" \
  "$@"
