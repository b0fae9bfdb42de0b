#!/usr/bin/env bash
# A real install, as a user would do it, checked end to end (part of `make test`):
#
#   1. build a wheel and an sdist from this checkout (no build isolation: they are
#      compiled against the torch of $PYTHON, torch==2.13.0);
#   2. check their contents: every fusedgrad subpackage, the compiled _C, LICENSE in
#      the wheel; every csrc/ source and header (csrc/cuda/ included) in the sdist;
#   3. create a fresh virtual environment holding only torch==2.13.0 and numpy (no
#      system site-packages, nothing from this checkout) and install the wheel there,
#      letting pip check its declared requirements;
#   4. from a directory outside the checkout: python -m fusedgrad --help, verify,
#      demo --steps 5, bench --quick, the README's quick start and usage blocks as a script, and
#      a short import-and-train smoke test.
#
# Environment: PYTHON (default .venv/bin/python), KEEP_WORK=1 keeps the temp folder.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/fusedgrad-install.XXXXXX")"
if [[ "${KEEP_WORK:-0}" != 1 ]]; then trap 'rm -rf "$WORK"' EXIT; fi
START=$SECONDS
step() { printf '== [%3ds] %s\n' "$((SECONDS - START))" "$*"; }

TORCH_PIN="$("$PYTHON" -c 'import torch; print(torch.__version__.split("+")[0])')"
NUMPY_PIN="$(grep -E '^numpy==' "$ROOT/requirements-dev.txt" | head -n 1)"

step "wheel (pip wheel --no-build-isolation --no-deps)"
"$PYTHON" -m pip wheel --quiet --no-build-isolation --no-deps --wheel-dir "$WORK/dist" "$ROOT"
step "sdist (setup.py sdist)"
(cd "$ROOT" && "$PYTHON" setup.py --quiet sdist --dist-dir "$WORK/dist" 2>&1 | grep -v -i "warning\|^\s*$\|\*\*\*\|!!\|deprecat\|corresp\|See https\|By 20\|Please\|^ *$" || true)
rm -rf "$ROOT"/fusedgrad.egg-info

step "contents"
"$PYTHON" - "$WORK/dist" "$ROOT" <<'EOF'
import glob, os, sys, tarfile, zipfile
dist, root = sys.argv[1:]
(wheel,) = glob.glob(os.path.join(dist, "fusedgrad-*.whl"))
(sdist,) = glob.glob(os.path.join(dist, "fusedgrad-*.tar.gz"))
names = zipfile.ZipFile(wheel).namelist()
print(f"{os.path.basename(wheel)}:")
for n in names:
    print("   ", n)
packages = sorted(os.path.relpath(d, root) for d, _, files in os.walk(os.path.join(root, "fusedgrad"))
                  if "__init__.py" in files)
modules = sorted(os.path.relpath(f, root) for p in packages for f in glob.glob(os.path.join(root, p, "*.py")))
missing = [m for m in modules if m not in names]
assert not missing, f"wheel lacks {missing}"
assert any(n.startswith("fusedgrad/_C") and n.endswith((".so", ".pyd")) for n in names), "wheel lacks fusedgrad/_C"
assert "fusedgrad/py.typed" in names, "wheel lacks fusedgrad/py.typed (PEP 561 marker)"
assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "wheel lacks LICENSE"
meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
for line in ("License-Expression: BSD-3-Clause", "Requires-Python: >=3.10", "Requires-Dist: torch==2.13.0"):
    assert line in meta, f"METADATA lacks {line!r}"
with tarfile.open(sdist) as tar:
    in_sdist = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
sources = sorted(os.path.relpath(f, root) for f in glob.glob(os.path.join(root, "csrc", "**", "*"), recursive=True)
                 if f.endswith((".h", ".hpp", ".cpp", ".cu", ".cuh")))
missing = [s for s in sources + ["LICENSE", "setup.py", "pyproject.toml", "MANIFEST.in", "fusedgrad/py.typed"] + modules
           if s not in in_sdist]
assert not missing, f"sdist lacks {missing}"
print(f"{os.path.basename(sdist)}: {len(in_sdist)} files, all {len(sources)} csrc sources and headers")
EOF

step "fresh venv: torch==$TORCH_PIN, $NUMPY_PIN, then the wheel"
"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install --quiet "torch==$TORCH_PIN" "$NUMPY_PIN" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
"$VPY" -m pip install --quiet "$WORK"/dist/fusedgrad-*.whl
"$VPY" -m pip check

mkdir -p "$WORK/run"
cd "$WORK/run"
step "import from outside the checkout"
"$VPY" - "$ROOT" <<'EOF'
import os, sys
root = os.path.realpath(sys.argv[1])
assert all(not os.path.realpath(p or os.getcwd()).startswith(root) for p in sys.path), sys.path
import fusedgrad, fusedgrad.cli
here = os.path.realpath(fusedgrad.__file__)
assert not here.startswith(root), here
print("fusedgrad", fusedgrad.__version__, "from", os.path.dirname(here), "backends", fusedgrad.backends)
EOF
step "python -m fusedgrad --help"
"$VPY" -m fusedgrad --help > help.txt
if grep -q '``' help.txt; then echo "top-level help shows reST markup"; cat help.txt; exit 1; fi
step "python -m fusedgrad verify"
"$VPY" -m fusedgrad verify > verify.txt || { cat verify.txt; exit 1; }
tail -n 3 verify.txt
step "python -m fusedgrad demo --steps 5"
"$VPY" -m fusedgrad demo --steps 5
step "python -m fusedgrad bench --quick"
"$VPY" -m fusedgrad bench --quick --out "$WORK/bench" 2>/dev/null | tail -n 4
step "the README's quick start and usage examples, as one script"
# (the same blocks tests/test_docs.py runs in the checkout: from "## Quick start" to "### Verify")
"$VPY" - "$ROOT/README.md" > usage.py <<'EOF'
import re, sys
text = open(sys.argv[1], encoding="utf-8").read()
usage = text[text.index("\n## Quick start"):text.index("\n### Verify, demo, bench")]
print("\n".join(re.findall(r"```python\n(.*?)```", usage, re.S)))
EOF
"$VPY" usage.py
step "import-and-train smoke test"
"$VPY" - <<'EOF'
import torch, fusedgrad
torch.manual_seed(0)
x = torch.linspace(-1, 1, 64).unsqueeze(1)
y = x.pow(2)
net = fusedgrad.FusedMLP(1, 16, 1)
opt = torch.optim.Adam(net.parameters(), lr=0.05)
first = None
for step in range(100):
    opt.zero_grad()
    loss = net.loss_backward(x, y) if step % 2 else net.loss(x, y)
    if not step % 2:
        loss.backward()
    first = loss.item() if first is None else first
    opt.step()
final = torch.nn.functional.mse_loss(net(x), y).item()
assert final < 0.2 * first, (first, final)
print(f"trained: loss {first:.4f} -> {final:.5f}")
EOF
step "install check passed"
