#!/usr/bin/env bash
# Leak check of the native extension: runs tools/leakcheck_run.py (every kernel, error paths,
# a few training steps and a decode, on 1 and 2 threads) under valgrind memcheck and fails if any
# block "definitely lost" or "indirectly lost" was allocated from inside the extension (_C*.so).
# CPython's own arenas and interned objects are never freed at exit; records whose stacks do not
# pass through the extension are CPython's and are not counted (they are listed in the log).
# Usage: PYTHON=/path/to/python tools/leakcheck.sh   (needs valgrind and a built extension:
# tools/build_inplace.sh). The full valgrind log is kept in build/leakcheck.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=build/leakcheck.log
mkdir -p build
command -v valgrind >/dev/null || { echo "leakcheck: valgrind is not installed" >&2; exit 2; }
ls pytransformer/_C*.so >/dev/null 2>&1 || { echo "leakcheck: build the extension first" >&2; exit 2; }

# PYTHONMALLOC=malloc: every Python allocation goes through malloc so valgrind sees it.
# OMP_WAIT_POLICY=passive: idle OpenMP workers sleep instead of spinning under valgrind.
PYTHONMALLOC=malloc OMP_WAIT_POLICY=passive PYTHONPATH="$PWD" \
  valgrind --tool=memcheck --leak-check=full --show-leak-kinds=definite,indirect \
  --errors-for-leak-kinds=definite,indirect --num-callers=40 --log-file="$LOG" \
  "$PY" tools/leakcheck_run.py

# Every valgrind record (a message and its stack, up to a blank line) whose stack passes through
# the extension: lost blocks and memory errors (invalid reads/writes, uninitialised values).
"$PY" - "$LOG" <<'PYEOF'
import re, sys
text = open(sys.argv[1]).read()
blocks = re.split(r"\n==\d+== \n", text)
ours = [b for b in blocks if "_C.cpython" in b or "pt::" in b]
leaks = [b for b in ours if re.search(r"(definitely|indirectly) lost", b)]
lost = re.search(r"definitely lost: ([\d,]+) bytes in ([\d,]+) blocks", text)
summary = re.search(r"ERROR SUMMARY: .*", text)
print(f"leakcheck: whole process: {lost.group(0) if lost else 'no leak summary'}; "
      f"{summary.group(0) if summary else ''}")
print(f"leakcheck: records involving the extension: {len(ours)} ({len(leaks)} leaks)")
for b in ours:
    print(b)
sys.exit(1 if ours else 0)
PYEOF
