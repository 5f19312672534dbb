#!/usr/bin/env bash
# Development build: configures once into build/dev, rebuilds incrementally with ninja, and copies
# the extension next to the sources so `PYTHONPATH=$PWD pytest` tests the working tree.
# Usage: tools/build_inplace.sh [extra cmake -D options]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUILD=${BUILD_DIR:-build/dev}
if [ ! -f "$BUILD/build.ninja" ]; then
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DPython_EXECUTABLE="$("$PY" -c 'import sys; print(sys.executable)')" \
    -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" "$@" >/dev/null
fi
cmake --build "$BUILD"
rm -f pytransformer/_C*.so
cp "$BUILD"/_C*.so pytransformer/
