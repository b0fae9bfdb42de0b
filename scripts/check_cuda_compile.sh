#!/usr/bin/env bash
# Compile check of fusedgrad's CUDA sources, runnable on a machine with no GPU
# and a CPU-only torch (CI, dev boxes): it proves the CUDA code compiles, not
# that it runs.
#
#   * every csrc/cuda/*.cu is compiled (compile only: -c -o into a temp dir)
#     by nvcc against the installed torch's headers, for each arch in
#     FUSEDGRAD_CUDA_ARCHS (default "80 90": sm_80 and sm_90 SASS), with the
#     flags torch.utils.cpp_extension gives nvcc;
#   * every csrc/cuda/*.cpp, and any other .cpp under csrc/ that includes a
#     CUDA header, is syntax-checked by the host compiler (g++ -fsyntax-only)
#     with -DFUSEDGRAD_WITH_CUDA and the CUDA toolkit's include dir, as the
#     CUDAExtension build compiles it (the CPU build never sees these files).
#
# Environment:
#   PYTHON                  interpreter with torch (default: .venv/bin/python, else python3)
#   NVCC                    nvcc to use (default: $CUDA_HOME/bin/nvcc, else `nvcc` on PATH,
#                           else /usr/local/cuda/bin/nvcc)
#   CXX                     host compiler for the .cpp check (default g++)
#   FUSEDGRAD_CUDA_ARCHS    space-separated SM numbers (default "80 90")
#   FUSEDGRAD_CXX_STD       C++ standard (default: the -std= setup.py pins, else the one
#                           torch's BuildExtension adds when none is given: c++20 for torch 2.13)
#   FUSEDGRAD_ALLOW_NO_NVCC 1: exit 0 with a SKIP line when no nvcc is found (default: fail)
#   FUSEDGRAD_CHECK_VERBOSE 1: print ptxas's per-kernel resource usage (registers, spills)
#
# Exit status: 0 when everything compiled, 1 otherwise. Compiles one file at
# a time (the dev machines have 2 shared cores).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
ARCHS="${FUSEDGRAD_CUDA_ARCHS:-80 90}"
CXX="${CXX:-g++}"

find_nvcc() {
  if [[ -n "${NVCC:-}" ]]; then echo "$NVCC"; return; fi
  local home="${CUDA_HOME:-${CUDA_PATH:-}}"
  if [[ -n "$home" && -x "$home/bin/nvcc" ]]; then echo "$home/bin/nvcc"; return; fi
  if command -v nvcc >/dev/null 2>&1; then command -v nvcc; return; fi
  if [[ -x /usr/local/cuda/bin/nvcc ]]; then echo /usr/local/cuda/bin/nvcc; return; fi
}
NVCC="$(find_nvcc || true)"
if [[ -z "$NVCC" ]]; then
  if [[ "${FUSEDGRAD_ALLOW_NO_NVCC:-0}" == "1" ]]; then
    echo "SKIP: no nvcc found (set NVCC or CUDA_HOME); CUDA sources not compiled"
    exit 0
  fi
  echo "error: no nvcc found (set NVCC or CUDA_HOME, or FUSEDGRAD_ALLOW_NO_NVCC=1 to skip)" >&2
  exit 1
fi
# The toolkit's own include dir (cuda_runtime_api.h, cuda.h, cuda_fp16.h …),
# asked of nvcc itself so that wrapper scripts on PATH resolve correctly.
CUDA_INCLUDE="$("$NVCC" -v -x cu -E /dev/null -o /dev/null 2>&1 \
  | sed -n 's/^#\$ INCLUDES="\(.*\)"[[:space:]]*$/\1/p' | tr ' ' '\n' \
  | sed -n 's/^-I//p' | head -n 1 || true)"
if [[ -z "$CUDA_INCLUDE" || ! -f "$CUDA_INCLUDE/cuda_runtime_api.h" ]]; then
  CUDA_INCLUDE="$(cd "$(dirname "$(readlink -f "$NVCC")")/.." && pwd)/include"
fi

# Everything torch.utils.cpp_extension would pass, asked of the installed torch.
mapfile -t TORCH_INFO < <("$PYTHON" - <<'EOF'
import sysconfig
import torch
from torch.utils import cpp_extension as ce
print(torch.__version__)
print(torch.version.cuda)
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
print(sysconfig.get_path("include"))
print(" ".join(ce.COMMON_NVCC_FLAGS))
print("\t".join(ce.include_paths()))
import inspect
print("c++20" if "c++20" in inspect.getsource(ce.BuildExtension) else "c++17")
EOF
)
TORCH_VERSION="${TORCH_INFO[0]}"
TORCH_CUDA="${TORCH_INFO[1]}"
CXX11_ABI="${TORCH_INFO[2]}"
PY_INCLUDE="${TORCH_INFO[3]}"
read -r -a COMMON_NVCC_FLAGS <<<"${TORCH_INFO[4]}"
IFS=$'\t' read -r -a TORCH_INCLUDES <<<"${TORCH_INFO[5]}"
# The standard the real build uses: setup.py's own -std= if it pins one,
# else torch's default for extensions.
SETUP_STD="$(grep -oE -- '-std=c\+\+[0-9a-z]+' setup.py | head -n 1 | sed 's/-std=//' || true)"
CXX_STD="${FUSEDGRAD_CXX_STD:-${SETUP_STD:-${TORCH_INFO[6]}}}"

INCLUDE_FLAGS=()
for d in "${TORCH_INCLUDES[@]}"; do INCLUDE_FLAGS+=("-I$d"); done
INCLUDE_FLAGS+=("-I$PY_INCLUDE")
# csrc/ on the include path, as a CMake or Bazel build of these sources would
# put it: no header there may shadow a system one (csrc/math.h once did).
INCLUDE_FLAGS+=("-I$ROOT/csrc")

DEFINES=(
  -DTORCH_EXTENSION_NAME=_C
  -DTORCH_API_INCLUDE_EXTENSION_H
  "-D_GLIBCXX_USE_CXX11_ABI=$CXX11_ABI"
  -DFUSEDGRAD_WITH_CUDA
)
NOTES=()
# CPU-only torch wheels ship c10/cuda/*.h but not the CMake-generated
# c10/cuda/impl/cuda_cmake_macros.h that c10/cuda/CUDAMacros.h includes. On
# Linux that file only defines C10_CUDA_BUILD_SHARED_LIBS (read by the _WIN32
# export macros) and TORCH_CUDA_VERSION_* (used by no installed header), so
# skipping it with torch's own C10_CUDA_NO_CMAKE_CONFIGURE_FILE switch changes
# nothing here. A CUDA torch wheel has the file, and then nothing is added.
TORCH_INC0="${TORCH_INCLUDES[0]}"
if [[ ! -f "$TORCH_INC0/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
  DEFINES+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
  NOTES+=("torch has no c10/cuda/impl/cuda_cmake_macros.h (CPU-only wheel): compiled with -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
fi

GENCODE=()
for a in $ARCHS; do GENCODE+=(-gencode "arch=compute_${a},code=sm_${a}"); done

OUT_DIR="$(mktemp -d "${TMPDIR:-/tmp}/fusedgrad-cuda-check.XXXXXX")"
trap 'rm -rf "$OUT_DIR"' EXIT

echo "torch $TORCH_VERSION (torch.version.cuda=$TORCH_CUDA, _GLIBCXX_USE_CXX11_ABI=$CXX11_ABI)"
echo "nvcc  $NVCC: $("$NVCC" --version | tail -n 1)"
echo "host  $CXX: $("$CXX" --version | head -n 1)"
echo "archs ${ARCHS}; -std=${CXX_STD}; CUDA include dir $CUDA_INCLUDE"
for n in "${NOTES[@]}"; do echo "note: $n"; done

status=0
results=()
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

shopt -s nullglob
CU_FILES=(csrc/cuda/*.cu)
if [[ ${#CU_FILES[@]} -eq 0 ]]; then
  echo "error: no csrc/cuda/*.cu files found" >&2
  exit 1
fi

for src in "${CU_FILES[@]}"; do
  obj="$OUT_DIR/$(basename "$src").o"
  log="$OUT_DIR/$(basename "$src").log"
  echo "== nvcc $src (sm: $ARCHS)"
  t0="$(now)"
  # --resource-usage makes ptxas report every kernel it compiles, per arch:
  # the proof that device code was generated for each requested SM.
  if "$NVCC" "-std=$CXX_STD" -O3 "${COMMON_NVCC_FLAGS[@]}" --compiler-options -fPIC \
      --resource-usage "${INCLUDE_FLAGS[@]}" "${DEFINES[@]}" "${GENCODE[@]}" \
      -c "$src" -o "$obj" >"$log" 2>&1; then
    t="$(elapsed "$t0" "$(now)")"
    per_arch=""
    for a in $ARCHS; do
      k="$(grep -c "Compiling entry function .* for 'sm_${a}'" "$log" || true)"
      per_arch+=" sm_${a}:${k} kernels"
    done
    spills="$( (grep -E '[1-9][0-9]* bytes spill (stores|loads)' "$log" || true) | wc -l)"
    # Diagnostics in our own sources (torch's headers warn under C++17; not ours to fix).
    own="$(grep -E "(^|/)csrc/[^ ]*[(:][0-9]+.*(warning|error)" "$log" || true)"
    [[ -n "$own" ]] && echo "$own"
    if [[ "${FUSEDGRAD_CHECK_VERBOSE:-0}" == "1" ]]; then grep -E "ptxas|spill" "$log" || true; fi
    results+=("OK    nvcc $src  ${t} s  (${per_arch# }; ${spills} with register spills)")
  else
    cat "$log"
    results+=("FAIL  nvcc $src  $(elapsed "$t0" "$(now)") s")
    status=1
  fi
done

# The .cpp files only a CUDA build compiles: csrc/cuda/*.cpp, and any other
# .cpp under csrc/ that includes a CUDA header (c10/cuda, ATen/cuda, cuda_runtime*).
mapfile -t CUDA_CPP < <( { ls csrc/cuda/*.cpp 2>/dev/null; \
  grep -rlE '#include[[:space:]]*[<"](c10/cuda/|ATen/cuda/|cuda_runtime|cuda\.h)' --include='*.cpp' csrc; } \
  | sort -u || true)
for src in "${CUDA_CPP[@]}"; do
  echo "== $CXX -fsyntax-only $src"
  t0="$(now)"
  if "$CXX" "-std=$CXX_STD" -fsyntax-only -fPIC "${INCLUDE_FLAGS[@]}" "-I$CUDA_INCLUDE" \
      "${DEFINES[@]}" "$src"; then
    results+=("OK    $CXX -fsyntax-only $src  $(elapsed "$t0" "$(now)") s")
  else
    results+=("FAIL  $CXX -fsyntax-only $src  $(elapsed "$t0" "$(now)") s")
    status=1
  fi
done

echo
echo "Summary (compile only; nothing was run on a GPU):"
for r in "${results[@]}"; do echo "  $r"; done
exit "$status"
