#!/usr/bin/env bash
# Portability check: every C++ source (CUDA excepted) through clang++ -fsyntax-only,
# against the installed torch's headers. The build itself uses the system's
# g++; this says the code does not depend on it. Needs clang++ (Debian: clang,
# libomp-dev for omp.h); without it, says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
if ! command -v clang++ >/dev/null; then
  echo "check_clang: clang++ not installed (apt-get install clang libomp-dev); skipped"
  exit 0
fi
TI=$("$PYTHON" -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
PYI=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
status=0
for f in $(git ls-files 'csrc/*.cpp' | grep -v '^csrc/cuda/'); do
  if ! clang++ -std=c++20 -fsyntax-only -fopenmp $TI -I"$PYI" -Icsrc -DTORCH_EXTENSION_NAME=_C \
      -DTORCH_API_INCLUDE_EXTENSION_H "$f"; then
    echo "check_clang: $f failed"
    status=1
  fi
done
[ $status -eq 0 ] && echo "check_clang: $(git ls-files 'csrc/*.cpp' | grep -vc '^csrc/cuda/') files OK ($(clang++ --version | head -1))"
exit $status
