#!/usr/bin/env bash
# Download the Python wheels the GPU acceptance needs into .whl/ (or $1), on a machine that can
# reach PyPI, for a GPU machine that cannot: Python 3.12, x86-64 Linux, with torch (CUDA),
# numpy, pyarrow, pandas, PyYAML, tqdm, psutil, ninja, msgpack, einops, py-cpuinfo,
# nvidia-ml-py, fsspec, huggingface-hub, xxhash and filelock already installed.
# bench/gpu/acceptance.sh installs them with `pip install --no-index --no-deps --target`.
#
#   bash bench/gpu/fetch_wheels.sh            # -> .whl/*.whl (about 10 MB)
#
# Exactly these, pinned to the versions the code was tested with (pyproject.toml):
#   deepspeed        built here as a pure-Python wheel (DS_BUILD_OPS=0: its CUDA ops are
#                    JIT-compiled on first use, and the acceptance needs none of them), and its
#                    missing requirements hjson, pydantic (+ pydantic-core, annotated-types,
#                    typing-inspection, typing-extensions)
#   hydra-core, omegaconf, antlr4-python3-runtime   the config (train.py)
#   datasets, dill, multiprocess, sentencepiece     data preparation of the python_stdlib corpus
# wandb is not needed: the acceptance runs with logger=none.
# Then the acceptance corpus is prepared here into $DEST/acceptance_data (about 1 MB), so the GPU
# machine tokenizes nothing: carry the one folder (`carry: [".whl"]` in a device call).
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=${1:-.whl}
mkdir -p "$DEST"
PY=${PYTHON:-python3}
TARGET=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --only-binary=:all:)

"$PY" -m pip download -q --no-deps "${TARGET[@]}" -d "$DEST" \
  hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 typing-extensions==4.16.0 \
  hydra-core==1.3.8 omegaconf==2.3.1 \
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 sentencepiece==0.2.3

# Published as source only: build pure-Python wheels here (no compiler involved).
"$PY" -m pip wheel -q --no-deps -w "$DEST" antlr4-python3-runtime==4.9.3
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps -w "$DEST" deepspeed==0.19.8

"$PY" bench/gpu/acceptance.py --prepare-data "$DEST/acceptance_data"
"$PY" bench/gpu/check_wheels.py "$DEST"   # here: checks the wheels against this machine's packages

ls -1 "$DEST"/*.whl
du -sh "$DEST"
