#!/usr/bin/env bash
# Builds the fusedgrad extension with AddressSanitizer + UndefinedBehaviorSanitizer
# into a SEPARATE copy of the sources (never into fusedgrad/ of this checkout) and
# runs the test suite against that build.
#
#   scripts/sanitize.sh [extra pytest args...]
#
# Environment:
#   PYTHON             interpreter with torch installed      (default: .venv/bin/python, else python3)
#   SANITIZE_DIR       where the copy is built              (default: a fresh mktemp -d, removed on success;
#                      an existing one is reused: unchanged sources are not recompiled)
#   KEEP_SANITIZE_DIR  1 = keep the copy afterwards          (default: 0)
#   MAX_JOBS           parallel compile jobs                 (default: 2)
#
# Notes:
# * Python and torch are not instrumented, so the ASan runtime is LD_PRELOADed
#   (found with `gcc -print-file-name=libasan.so`), with libstdc++ (see below);
#   the extension links the UBSan runtime itself. A deliberate heap overflow is
#   run first to prove the runtime is live. Reports are also written to
#   $WORK/sanitizer-report.<pid> (pytest captures stderr) and printed at the end;
#   any report fails the run. Subprocesses started by tests inherit all this.
# * detect_leaks=0: the CPython interpreter deliberately never frees a lot of
#   memory at exit, so LeakSanitizer reports would be noise. Leaks are checked
#   by tests/test_memory.py instead.
# * UBSan is fatal (-fno-sanitize-recover=undefined, halt_on_error=1); ASan
#   stops at the first error by default. Either makes pytest die with a report.
# * Deselected under the sanitizers: slow tests (-m "not slow"), benchmarks,
#   torch.compile and DDP tests (compile spawns compilers and workers that
#   inherit LD_PRELOAD, and all three take far too long instrumented), and the
#   resident-memory tests (ASan's quarantine holds freed memory, so RSS is not
#   a leak signal there).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
START=$(date +%s)

WORK=${SANITIZE_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/fusedgrad-sanitize.XXXXXX")}
mkdir -p "$WORK"
case "$(cd "$WORK" && pwd)" in
  "$REPO"|"$REPO"/*) echo "sanitize.sh: refusing to build inside $REPO" >&2; exit 2 ;;
esac
echo "== sanitizer build in $WORK"

# The copy: sources, package (without the checkout's built .so), build files,
# tests. Only files whose content differs are rewritten (and so get a new
# mtime): a reused SANITIZE_DIR recompiles exactly the changed sources.
sync_file() {  # sync_file SRC DST
  if ! cmp -s "$1" "$2"; then mkdir -p "$(dirname "$2")"; cp "$1" "$2"; fi
}
sync_tree() {  # sync_tree SRC_DIR DST_DIR: DST mirrors SRC (minus *.so and caches)
  local src=$1 dst=$2 f
  mkdir -p "$dst"
  (cd "$src" && find . -name '__pycache__' -prune -o -type f ! -name '*.so' -print) |
    while read -r f; do sync_file "$src/$f" "$dst/$f"; done
  (cd "$dst" && find . -name '__pycache__' -prune -o -type f ! -name '*.so' -print) |
    while read -r f; do [[ -e "$src/$f" ]] || rm -f "$dst/$f"; done
}
sync_tree "$REPO/csrc" "$WORK/csrc"
sync_tree "$REPO/fusedgrad" "$WORK/fusedgrad"
sync_tree "$REPO/tests" "$WORK/tests"
for f in setup.py pyproject.toml README.md; do
  if [[ -f "$REPO/$f" ]]; then sync_file "$REPO/$f" "$WORK/$f"; fi
done
find "$WORK" -name __pycache__ -type d -prune -exec rm -rf {} +

SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
export FUSEDGRAD_EXTRA_CFLAGS="$SAN -g -O1"
export FUSEDGRAD_EXTRA_LDFLAGS="-fsanitize=address,undefined"
export MAX_JOBS=${MAX_JOBS:-2}
(cd "$WORK" && "$PYTHON" setup.py --quiet build_ext --inplace) > "$WORK/build.log" 2>&1 || {
  tail -50 "$WORK/build.log"; echo "sanitize.sh: build failed (log: $WORK/build.log)" >&2; exit 1; }
BUILT=$(date +%s)
SO=$(ls "$WORK"/fusedgrad/_C*.so)
# (grep without -q: it must read all of nm's output, or pipefail sees nm's SIGPIPE)
nm -D "$SO" | grep __asan_ > /dev/null || { echo "sanitize.sh: $SO is not instrumented" >&2; exit 1; }
echo "== built in $((BUILT - START)) s: $SO"

LIBASAN=$(gcc -print-file-name=libasan.so)
LIBSTDCXX=$(gcc -print-file-name=libstdc++.so)
[[ -e "$LIBASAN" ]] || { echo "sanitize.sh: libasan.so not found" >&2; exit 1; }
# libstdc++ is preloaded too: python itself does not link it, and ASan's
# __cxa_throw interceptor must find the real one when it initialises, or the
# first C++ exception (every argument check) aborts with an ASan CHECK failure.
PRELOAD="$LIBASAN $LIBSTDCXX"
# Reports also go to files (pytest captures stderr, and an abort loses it).
REPORT="$WORK/sanitizer-report"
rm -f "$REPORT".*
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:print_summary=1:log_path=$REPORT"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$REPORT"

# Self-check: the preloaded runtime is live and reports land in files. A heap
# overflow through libc's memmove (intercepted by ASan) must be caught.
SELF="$WORK/selfcheck-report"
rm -f "$SELF".*
if ASAN_OPTIONS="detect_leaks=0:log_path=$SELF" LD_PRELOAD="$PRELOAD" "$PYTHON" -c "
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
p = libc.malloc(8)
ctypes.memmove(p, b'x' * 64, 64)
" 2>/dev/null; then
  echo "sanitize.sh: ASan self-check: an 8-byte buffer overflowed by 56 bytes went unnoticed" >&2; exit 1
fi
grep -q "heap-buffer-overflow" "$SELF".* || { echo "sanitize.sh: ASan self-check produced no report" >&2; exit 1; }
rm -f "$SELF".*
echo "== ASan self-check: a deliberate heap overflow is reported"

cd "$WORK"
# The copy must shadow the editable install of the checkout: check which package loads.
LD_PRELOAD="$PRELOAD" "$PYTHON" -c "
import fusedgrad, sys
assert fusedgrad.__file__.startswith('$WORK'), fusedgrad.__file__
print('== testing', fusedgrad._C.__file__)"

set +e
LD_PRELOAD="$PRELOAD" "$PYTHON" -m pytest -q -p no:cacheprovider -m "not slow" \
  --ignore-glob='tests/*bench*' --ignore-glob='tests/*compile*' --ignore-glob='tests/*ddp*' \
  -k "not rss and not compile and not benchmark and not ddp" \
  "$@" tests
RC=$?
set -e
END=$(date +%s)
if compgen -G "$REPORT.*" > /dev/null; then
  echo "== sanitizer reports:"; cat "$REPORT".*
  [[ $RC -ne 0 ]] || RC=1
else
  echo "== no sanitizer report"
fi
echo "== sanitizer run: exit $RC; build $((BUILT - START)) s, tests $((END - BUILT)) s, total $((END - START)) s"
if [[ $RC -eq 0 && "${KEEP_SANITIZE_DIR:-0}" != 1 && -z "${SANITIZE_DIR:-}" ]]; then
  rm -rf "$WORK"
else
  echo "== copy kept in $WORK"
fi
exit $RC
