#!/usr/bin/env bash
# One-shot check on a machine with one GPU, about 10 minutes on an H100/H200 (see
# dopsd_scale/gpu_check.py): the kernel tests on CUDA, our attention kernel's speed against every
# SDPA back-end (and flash-attn when installed) at Z-Image shapes, and a D-OPSD step on the deepest
# Z-Image-width DiT that fits: s/step, TFLOP/s, MFU and peak memory for K = 1, 2, 4, 8.
# Needs torch + triton; the D-OPSD step also needs diffusers: pip install it, or point DOPSD_WHEELS
# at a folder made elsewhere with `pip download --no-deps -d wheels diffusers==0.42.1 importlib_metadata`. Writes OUT/gpu_check.json after every part (a
# timeout keeps what finished) and OUT/gpu_check.md.
#   bash launch/gpu_check.sh [OUT] [--budget-s 540]     (--smoke: the tiny CPU run the tests use)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=runs/gpu_check
if [ $# -gt 0 ] && [[ $1 != -* ]]; then OUT=$1; shift; fi
exec "${PYTHON:-python}" -m dopsd_scale.gpu_check --out "$OUT" "$@"
