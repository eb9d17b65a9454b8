#!/usr/bin/env bash
# The GPU checks in one run (about 6-8 minutes on one H100/H200): build with CUDA, the GPU
# test suite (Triton compiled, not interpreted), then bench/gpu_check.py (graphed vs eager
# bf16 over two days, kernels vs their peers, a profiler summary). For the device tool:
#   bash bench/gpu_check.sh        (writes $OUT/gpu_check.json and $OUT/pytest.txt if OUT is set)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fastds-gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/nvidia-smi.txt"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  $PY -m venv .venv && .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q torch triton && .venv/bin/pip install -q -r requirements.txt
fi
FASTDS_CUDA_ARCHS=${FASTDS_CUDA_ARCHS:-90} FASTDS_FORCE_CUDA=1 .venv/bin/pip install -q --no-build-isolation -e . || exit 1
.venv/bin/python -c "from fastds import _backend; print(_backend.capabilities(), _backend.why_unavailable('cuda'))"
FASTDS_TEST_GPU=1 TRITON_INTERPRET=0 timeout 300 .venv/bin/python -m pytest -q -x \
  tests/test_boundaries.py tests/test_stitch.py tests/test_samplers.py tests/test_nn_kernels.py \
  tests/test_pipeline.py -k "cuda or triton or graph or gpu or boundaries or matrix" 2>&1 | tee "$OUT/pytest.txt" | tail -15
rc_tests=${PIPESTATUS[0]}
OUT="$OUT" timeout 300 .venv/bin/python bench/gpu_check.py
rc_check=$?
echo "gpu_check: tests rc=$rc_tests, checks rc=$rc_check"
exit $(( rc_tests || rc_check ))
