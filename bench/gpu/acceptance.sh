#!/usr/bin/env bash
# GPU acceptance in one command, on a machine with one CUDA GPU and no network:
#
#   bash bench/gpu/acceptance.sh [OUT_DIR]          # OUT_DIR defaults to $OUT, else acceptance_out
#   bash bench/gpu/acceptance.sh OUT_DIR --cpu      # dry run of the same steps on CPU, tiny sizes
#
# 1. When deepspeed/hydra/datasets are not importable and .whl/ holds wheels (made beforehand,
#    where PyPI is reachable, by bench/gpu/fetch_wheels.sh), install them offline into a private
#    folder (pip --no-index --no-deps --target) and put it on PYTHONPATH;
# 2. the GPU tests: pytest -m gpu tests/gpu (they skip without CUDA);
# 3. bench/gpu/acceptance.py: short bf16 trainings of the tiny preset and of a 3-layer model of
#    the 16B preset's width, and a table (step time, tokens/s, MFU, peak memory, loss) in
#    OUT_DIR/acceptance.md and .json, with OUT_DIR/gpu_tests.log and OUT_DIR/acceptance.log.
# Exit code: non-zero if the tests or a training failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT_DIR=${1:-${OUT:-acceptance_out}}
shift || true
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"

if ! "$PY" -c "import deepspeed, hydra, omegaconf, datasets, sentencepiece" >/dev/null 2>&1; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "missing packages and no .whl/ folder: run bench/gpu/fetch_wheels.sh where PyPI is reachable" >&2
    exit 2
  fi
  SITE=${SITE:-/tmp/deepseek_moe_site}
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl || exit 2
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled

"$PY" -m pytest -q -m gpu tests/gpu -rs -p no:cacheprovider 2>&1 | tee "$OUT_DIR/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

"$PY" bench/gpu/acceptance.py --out "$OUT_DIR" --tests-rc "$tests_rc" "$@"
bench_rc=$?
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
