#!/usr/bin/env bash
# The wheels folder for `bench/gpu_check.sh --wheels DIR`: what a CUDA machine without network lacks of
# requirements.txt, downloaded here (where the package index is reachable) for its Python and platform.
#
#   bash bench/gpu_wheels.sh DIR [--python 3.12] [--qlora]
#
# --qlora: bitsandbytes alone (requirements.txt's pin, 43 MB: with the rest it would pass the 64 MiB a device call
# carries), for a second call on the warm machine: gpu_check.sh --wheels adds it to the same .gpu/site, and
# tests/gpu/test_qlora_cuda.py runs instead of skipping.
#
# The list is what a lent H200 (Python 3.12, torch 2.11+cu130, transformers, peft, tokenizers, numpy, psutil,
# pyyaml, tqdm already there) lacked on 2026-12-04: deepspeed (built here with DS_BUILD_OPS=0: pure Python, its
# ops compile at run time if ever needed) with hjson and pydantic; jsonschema with its referencing stack; pandas.
# The versions of deepspeed, jsonschema and pandas are requirements.txt's pins; the rest are the ones that
# ran there. About 17 MB: it travels with the working tree. Also copy .cache/gpt2.tiktoken (make setup puts it
# there): the machine cannot fetch the GPT-2 ranks either. Exit 2 on wrong usage.
set -euo pipefail

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
DIR=
PYV=3.12
QLORA=0
while [ $# -gt 0 ]; do
  case "$1" in
    --python) [ $# -ge 2 ] || { echo "error: --python needs a version such as 3.12" >&2; exit 2; }; PYV=$2; shift 2 ;;
    --qlora) QLORA=1; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    *) [ -z "$DIR" ] || { echo "error: one folder only (got '$DIR' and '$1')" >&2; exit 2; }; DIR=$1; shift ;;
  esac
done
[ -n "$DIR" ] || { echo "error: name the folder the wheels go into, e.g. bash bench/gpu_wheels.sh .whl" >&2; exit 2; }
case "$PYV" in
  3.[0-9]|3.[0-9][0-9]) ;;
  *) echo "error: --python '$PYV': expected a version such as 3.12" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.."
pin() { sed -n "s/^$1==//p" requirements.txt; }  # one source of truth for the runtime pins
PY=${GPU_WHEELS_PYTHON:-python3}
[ -z "${GPU_WHEELS_PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python  # deepspeed's build imports torch
mkdir -p "$DIR"
if [ "$QLORA" = 1 ]; then
  echo "wheels for CPython $PYV into $DIR: bitsandbytes==$(pin bitsandbytes)"
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version "$PYV" \
    --implementation cp --platform manylinux_2_24_x86_64 -d "$DIR" bitsandbytes=="$(pin bitsandbytes)"
  ls "$DIR"
  exit 0
fi
BINARY=(jsonschema=="$(pin jsonschema)" pandas=="$(pin pandas)" hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5
        annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 referencing==0.37.0
        jsonschema-specifications==2025.9.1 rpds-py==2026.9.1)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  PLATFORMS+=(--platform "$p")
done
echo "wheels for CPython $PYV into $DIR: ${BINARY[*]} deepspeed==$(pin deepspeed)"
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version "$PYV" \
  --implementation cp "${PLATFORMS[@]}" -d "$DIR" "${BINARY[@]}"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$DIR" \
  deepspeed=="$(pin deepspeed)"
ls "$DIR"
