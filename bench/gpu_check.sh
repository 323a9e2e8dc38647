#!/usr/bin/env bash
# GPU check for a CUDA machine with a fresh clone: set up with a CUDA torch, run the CUDA tests (tests/gpu),
# then a few training steps of bf16 and fp16 (dynamic loss scaling) on ZeRO 2 and 3 for a gpt2-small- and a
# Qwen3-0.6B-shaped model, a LoRA run + merge verification, tokens/s and MFU against the GPU's datasheet
# peak, and our unpacked run against our neat-packed one; one JSON of results. Aims at 8 minutes in all
# (setup from a warm pip cache ~1-2 min, the check's own budget the rest; what does not fit is skipped).
#
#   bash bench/gpu_check.sh [--out gpu_check.json] [--cuda cu128] [--skip-setup] [--wheels DIR]
#                           [-- bench.gpu_check args]
#
# --cuda picks the PyTorch wheel index (https://download.pytorch.org/whl/<tag>); default cu128.
# --wheels DIR: a machine with a CUDA torch already installed and no network: no `make setup`; the wheels in
# DIR (bench/gpu_wheels.sh DIR builds it) go into .gpu/site (GPU_CHECK_SITE) on PYTHONPATH, and the check
# runs with python3 (GPU_CHECK_PYTHON). Arguments after -- go to `python -m bench.gpu_check` (see --help
# there: --only tests,matrix,merge,throughput,packing (the default) and peers (the side-by-side packing
# benchmark against transformers + PEFT, bench/packing.py, minutes), --models, --precisions, --zero, --steps, --batch,
# --packing-batches, --cutoff). Exit 0: every run and the merge passed; 1: something failed (the JSON says
# what); 2: wrong usage or no GPU.
set -euo pipefail

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }

OUT=gpu_check.json
CUDA_TAG=cu128
SETUP=1
WHEELS=
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || { echo "error: --out needs a file name" >&2; exit 2; }; OUT=$2; shift 2 ;;
    --cuda) [ $# -ge 2 ] || { echo "error: --cuda needs a tag such as cu128" >&2; exit 2; }; CUDA_TAG=$2; shift 2 ;;
    --skip-setup) SETUP=0; shift ;;
    --wheels) [ $# -ge 2 ] || { echo "error: --wheels needs a folder of .whl files" >&2; exit 2; }
      [ -d "$2" ] || { echo "error: --wheels '$2': no such folder" >&2; exit 2; }; WHEELS=$(cd "$2" && pwd); SETUP=0
      shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$CUDA_TAG" in
  cu[0-9][0-9]*) ;;
  *) echo "error: --cuda '$CUDA_TAG': expected a PyTorch CUDA wheel tag such as cu128 or cu126" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.."
START=$(date +%s)
if [ "${GPU_CHECK_ASSUME_GPU:-0}" != 1 ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "error: nvidia-smi not found: this check needs a machine with an NVIDIA GPU and its driver" >&2
  exit 2
fi
if [ "$SETUP" = 1 ]; then
  TORCH_SPEC=$(sed -n 's/^TORCH ?= //p' Makefile)
  echo "setup: make setup TORCH=$TORCH_SPEC TORCH_INDEX=--index-url https://download.pytorch.org/whl/$CUDA_TAG"
  ${GPU_CHECK_MAKE:-make} setup TORCH="$TORCH_SPEC" \
    TORCH_INDEX="--index-url https://download.pytorch.org/whl/$CUDA_TAG --extra-index-url https://pypi.org/simple"
fi
if [ -n "$WHEELS" ]; then
  PY=${GPU_CHECK_PYTHON:-python3}
  RANKS=$("$PY" -c 'from pipeline.data.tokenizer import ranks_path; print(ranks_path())')  # where train looks
  [ -f "$RANKS" ] || { echo "error: --wheels: no GPT-2 ranks at $RANKS (make setup puts them there; copy that" \
    "file from a machine that ran it)" >&2; exit 2; }
  SITE=${GPU_CHECK_SITE:-.gpu/site}
  echo "setup: the wheels in $WHEELS into $SITE (no network; $PY's own torch)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --upgrade --target "$SITE" \
    "$WHEELS"/*.whl
  export PYTHONPATH="$(cd "$SITE" && pwd)${PYTHONPATH:+:$PYTHONPATH}"
else
  PY=${GPU_CHECK_PYTHON:-.venv/bin/python}
fi
SETUP_S=$(( $(date +%s) - START ))
BUDGET=$(( 450 - SETUP_S ))
[ "$BUDGET" -lt 60 ] && BUDGET=60
echo "setup took ${SETUP_S}s; check budget ${BUDGET}s"
"$PY" -m bench.gpu_check --out "$OUT" --budget-s "$BUDGET" "${EXTRA[@]}"
