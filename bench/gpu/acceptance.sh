#!/usr/bin/env bash
# GPU acceptance in one command, on a machine with one CUDA GPU and no network:
#
#   bash bench/gpu/acceptance.sh [OUT_DIR] [--steps N] [--budget-s S]   # OUT_DIR: $OUT, else acceptance_out
#   bash bench/gpu/acceptance.sh OUT_DIR --cpu                          # dry run on CPU, tiny sizes
#
# Before (where PyPI is reachable): `bash bench/gpu/fetch_wheels.sh` fills .whl/ with the wheels
# and the prepared acceptance corpus (.whl/acceptance_data); carry .whl to the GPU machine.
# 1. preflight (seconds): when deepspeed/hydra/... are not importable, install .whl/*.whl offline
#    into a private folder (pip --no-index --no-deps --target) on PYTHONPATH; check every carried
#    wheel's requirements against what is installed (bench/gpu/check_wheels.py); import everything
#    the runs need. A failure here stops at once, with the reason in OUT_DIR/preflight.log;
# 2. the GPU tests: pytest -m gpu tests/gpu (skipped without CUDA), at most 150 s;
# 3. bench/gpu/acceptance.py: short bf16 trainings of the tiny preset and of a 3-layer model of
#    the 16B preset's width, each case recorded (passed / FAILED / skipped), the table always
#    written to OUT_DIR/acceptance.md and .json, logs in OUT_DIR/gpu_tests.log, acceptance.log.
# Sized for one H100 within 8 minutes (a retry fits a 15-minute device budget); `--steps 5` is
# a quicker retry. Exit code: 0 when the preflight, the tests and every case passed.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT_DIR=${OUT:-acceptance_out}
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then
  OUT_DIR=$1
  shift
fi
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
PREFLIGHT="$OUT_DIR/preflight.log"
: >"$PREFLIGHT"
say() { echo "$*" | tee -a "$PREFLIGHT"; }
START=$(date +%s)

say "acceptance: $(date -u '+%Y-%m-%d %H:%M') UTC, $("$PY" --version 2>&1), OUT_DIR=$OUT_DIR, args: $*"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$PREFLIGHT"

NEEDED="import deepspeed, hydra, omegaconf, datasets, sentencepiece"
if ! "$PY" -c "$NEEDED" >/dev/null 2>&1; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    say "preflight FAILED: packages missing and no .whl/ folder: run bench/gpu/fetch_wheels.sh where PyPI is reachable, then carry .whl"
    exit 2
  fi
  SITE=${SITE:-/tmp/deepseek_moe_site}
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl >>"$PREFLIGHT" 2>&1; then
    say "preflight FAILED: pip could not install .whl/*.whl (see $PREFLIGHT)"
    exit 2
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  if ! "$PY" bench/gpu/check_wheels.py .whl 2>&1 | tee -a "$PREFLIGHT"; then
    say "preflight FAILED: a carried wheel needs a package that is not there (lines above)"
    exit 2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
if ! "$PY" -c "$NEEDED; import torch, deepseek_moe.train.trainer, data_prep.prepare; \
print('imports: torch', torch.__version__, 'cuda', torch.version.cuda, 'deepspeed', deepspeed.__version__, \
'datasets', datasets.__version__)" 2>&1 | tee -a "$PREFLIGHT"; then
  say "preflight FAILED: an import failed (above); carry a wheel of the version the wheel check names"
  exit 2
fi
say "preflight passed in $(($(date +%s) - START)) s"

timeout 150 "$PY" -m pytest -q -m gpu tests/gpu -rs -p no:cacheprovider 2>&1 | tee "$OUT_DIR/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

DATA_ARGS=()
if [ -f .whl/acceptance_data/meta.json ]; then
  DATA_ARGS=(--data .whl/acceptance_data)
fi
"$PY" bench/gpu/acceptance.py --out "$OUT_DIR" --tests-rc "$tests_rc" "${DATA_ARGS[@]}" "$@"
bench_rc=$?
echo "acceptance: $(($(date +%s) - START)) s in all; tests exit $tests_rc, trainings exit $bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
