#!/usr/bin/env bash
# What a session with a lent GPU runs, in stages sized for the device tool's calls (at most
# 10 minutes each; the build is reused while the machine stays warm between calls). Logs and
# JSON go to $OUT (set by the device tool; ./gpu-out elsewhere). Record the figures in
# bench/RESULTS.md with the date and the device.
#
#   pip download --no-deps higher==0.2.1 -d .whl    # once, here: higher is not on the GPU image
#   echo /.whl/ >> .git/info/exclude
#   device run, carry [".whl"]:  bash bench/gpu_session.sh build test sanitize
#   device run, carry [".whl"]:  bash bench/gpu_session.sh build ops maml
#
# Stages:
#   build  CUDA-on editable build into build-cuda/ (nothing fetched: the image has
#          scikit-build-core, pybind11, cmake and ninja), then `pymeta info`
#   test   the CUDA tests, then the whole suite on the image's torch
#   sanitize  the op tests of tests/test_cuda.py under compute-sanitizer's memcheck
#   ops    `pymeta bench --device cuda` (the targets) and bench/bench_ops.py's full suite
#   maml   bench/bench_maml.py --device cuda (issue 4's >= 5x higher target)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site
fi

stage_build() {
  CMAKE_ARGS="-DPYMETA_CUDA=ON" $PY -m pip install -q --no-build-isolation --no-deps -e . \
    -Cbuild-dir=build-cuda && $PY -m pymeta info && nvidia-smi -L
}

stage_test() {
  $PY -m pytest tests/test_cuda.py -q -rs -p no:cacheprovider
  $PY -m pytest tests -q -p no:cacheprovider
}

stage_sanitize() {
  compute-sanitizer --tool memcheck --error-exitcode 1 $PY -m pytest tests/test_cuda.py -x -q \
    -p no:cacheprovider -k "not learner and not cli"
}

stage_ops() {
  $PY -m pymeta bench --device cuda --no-progress --json "$OUT/ops_targets_cuda.json"
  $PY bench/bench_ops.py --device cuda && cp bench/out/ops.json "$OUT/ops_full_cuda.json"
}

stage_maml() {
  # the memory-vs-steps table (a CPU target, met there) would not fit in one call
  $PY bench/bench_maml.py --device cuda --no-steps-memory --json "$OUT/maml_cuda.json"
}

status=0
for stage in "$@"; do
  if ! declare -F "stage_$stage" >/dev/null; then
    echo "gpu_session.sh: unknown stage '$stage' (build, test, sanitize, ops, maml)" >&2
    exit 2
  fi
  echo "== $stage $(date -u +%FT%TZ)"
  "stage_$stage" 2>&1 | tee "$OUT/$stage.log" || status=1
done
exit $status
