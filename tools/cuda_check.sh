#!/usr/bin/env bash
# One call on a GPU machine: build with the CUDA target on, run every CUDA test (the GPU kernels
# against the float64 references of tests/reference.py and against the CPU ops, at small and
# realistic sizes; streams and the scratch pool), then time the kernels (GFLOP/s for SGEMM and
# attention, GB/s for layer norm) against PyTorch CUDA. Needs nvcc, a CUDA device, and torch with
# CUDA (or CuPy) in $PYTHON. With a device present, a GPU test that would skip fails instead.
# Usage: PYTHON=/path/to/python tools/cuda_check.sh [extra cmake -D options, e.g.
#        -DCMAKE_CUDA_ARCHITECTURES=90]
# Env: BUILD_DIR (default build/cuda), WRITE=1 to record the timings in bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUILD=${BUILD_DIR:-build/cuda}

command -v nvcc >/dev/null || { echo "cuda_check: nvcc not found" >&2; exit 1; }
nvidia-smi -L || echo "cuda_check: nvidia-smi sees no device (tests will skip)"

cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPYTRANSFORMER_CUDA=ON \
  -DPython_EXECUTABLE="$("$PY" -c 'import sys; print(sys.executable)')" \
  -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" "$@" >/dev/null
cmake --build "$BUILD"
rm -f pytransformer/_C*.so pytransformer/_cuda*.so
cp "$BUILD"/_C*.so "$BUILD"/csrc/cuda/_cuda*.so pytransformer/

export PYTHONPATH=$PWD
"$PY" -c "import pytransformer.cuda as c; print('cuda available:', c.is_available(), '| devices:', c.device_count())"
if nvidia-smi -L >/dev/null 2>&1; then
  # A device is there: the GPU tests must run, not skip.
  "$PY" -c "import pytransformer.cuda as c, sys; sys.exit(0 if c.is_available() else 'device present but pytransformer.cuda.is_available() is False')"
  export PYTRANSFORMER_REQUIRE_GPU=1
fi
"$PY" -m pytest -q -rs tests/test_cuda.py
if [ "${WRITE:-0}" = 1 ]; then
  "$PY" bench/bench_cuda.py --write
else
  "$PY" bench/bench_cuda.py
fi
