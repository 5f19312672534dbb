#!/usr/bin/env bash
# Builds the extension with AddressSanitizer + UndefinedBehaviorSanitizer into build/sanitize and
# runs the given tests (default: the kernel and model tests) against it. Any sanitizer report
# aborts the process, so the run fails.
# Usage: PYTHON=python tools/sanitize.sh [pytest args...]  (needs cmake, ninja, pybind11 and a
# gcc/clang with libasan/libubsan; the build into build/sanitize is incremental)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUILD=build/sanitize
# CMake refuses a cache made for a checkout at another path (a copied tree): start that one afresh.
if [ -f "$BUILD/CMakeCache.txt" ] && ! grep -qx "CMAKE_HOME_DIRECTORY:INTERNAL=$PWD" "$BUILD/CMakeCache.txt"; then
  rm -rf "$BUILD"
fi
FLAGS="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS="$FLAGS" -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" \
  -DCMAKE_MODULE_LINKER_FLAGS="-fsanitize=address,undefined" \
  -DPython_EXECUTABLE="$("$PY" -c 'import sys; print(sys.executable)')" \
  -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" >/dev/null
cmake --build "$BUILD"

# A private copy of the package with the sanitized extension, first on the path.
PKG=$(mktemp -d)
trap 'rm -rf "$PKG"' EXIT
cp -r pytransformer "$PKG/"
rm -f "$PKG"/pytransformer/_C*.so
cp "$BUILD"/_C*.so "$PKG/pytransformer/"

ASAN_LIB=$("${CXX:-c++}" -print-file-name=libasan.so)
UBSAN_LIB=$("${CXX:-c++}" -print-file-name=libubsan.so)
# The interpreter itself is not instrumented: leak checking would report CPython's own arenas.
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:allocator_may_return_null=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:abort_on_error=1
if [ $# -eq 0 ]; then
  # The tests that drive the kernels (every op, the fuzzers, the models' passes and decoding,
  # threads and faults), not the pipelines around them: training loops, the demo, the CLI, MPI
  # and the interop peers only repeat the same kernels for minutes under the sanitizers, whose
  # allocator also slows every Python object (the whole suite took 16 minutes here; the two int8
  # tests on a model trained by the quick demo, minutes more).
  set -- -q -x -p no:cacheprovider -m "not slow" \
    tests/test_core.py tests/test_gemm.py tests/test_packed.py tests/test_qgemm.py \
    tests/test_attention.py tests/test_norm.py tests/test_loss.py tests/test_train_ops.py \
    tests/test_optim.py tests/test_fuzz_kernels.py tests/test_fuzz_models.py tests/test_model.py \
    tests/test_decoding.py tests/test_quantize.py tests/test_concurrency.py tests/test_faults.py \
    tests/test_io.py tests/test_data.py \
    -k "not memory_stays_linear and not trained_model_int8 and not cli_quantize_and_translate"
fi
export LD_PRELOAD="$ASAN_LIB $UBSAN_LIB" PYTHONPATH="$PKG" PYTRANSFORMER_SANITIZED=1
# -P: do not put the current directory (the repository, with its own in-place _C*.so) first on
# sys.path, or the tests would silently import the unsanitized build. Check that they do not.
"$PY" -P -c "import sys, pytransformer._C as C; f = C.__file__
sys.exit(0 if f.startswith('$PKG/') else f'sanitize.sh: would test {f}, not the sanitized build')"
# --capture=sys: pytest must not capture file descriptor 2, or a report printed by the runtime
# just before it aborts the process would be lost with the capture buffer.
"$PY" -P -m pytest --capture=sys "$@"
