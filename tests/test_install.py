"""Packaging and build checks that need no install (scripts/check_install.sh does the real one).

* no header under csrc/ has the name of a header the compiler finds on its own
  (csrc/math.h once shadowed <math.h> for any build with -Icsrc: CUDA's <cmath>
  then failed); the nvcc compile check (test_cuda_compile.py) compiles with -Icsrc;
* setup.py compiles every csrc/**/*.cpp except csrc/cuda/;
* package discovery finds every package under fusedgrad/;
* the project metadata says what is true (Python >= 3.10 as torch 2.13, the torch pin).
"""
import glob
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = os.environ.get("CXX", "g++")

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = None


def csrc_headers():
    return sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.h"), recursive=True)
                  + glob.glob(os.path.join(ROOT, "csrc", "**", "*.cuh"), recursive=True))


@pytest.mark.skipif(shutil.which(CXX) is None, reason=f"no {CXX}")
def test_no_header_shadows_a_system_header():
    names = sorted({os.path.basename(h) for h in csrc_headers()})
    assert "formulas.h" in names
    shadowing = []
    for name in names + ["math.h"]:  # math.h: proves the probe does find system headers
        probe = subprocess.run([CXX, "-E", "-x", "c++", "-"], input=f"#include <{name}>\n",
                               capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            shadowing.append(name)
    assert shadowing == ["math.h"], f"csrc/ headers named like system headers: {shadowing[:-1]}"


@pytest.mark.skipif(shutil.which(CXX) is None, reason=f"no {CXX}")
def test_formulas_header_compiles_with_csrc_on_the_include_path():
    src = '#include <cmath>\n#include <cstdlib>\n#include "common/formulas.h"\nint main() { return 0; }\n'
    proc = subprocess.run([CXX, "-std=c++17", "-fsyntax-only", f"-I{os.path.join(ROOT, 'csrc')}", "-x", "c++", "-"],
                          input=src, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def load_setup():
    """setup.py's module namespace, without running setup()."""
    import runpy
    import setuptools

    calls = []
    original = setuptools.setup
    setuptools.setup = lambda **kw: calls.append(kw)
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        namespace = runpy.run_path(os.path.join(ROOT, "setup.py"))
    finally:
        os.chdir(cwd)
        setuptools.setup = original
    return namespace, calls


def test_setup_compiles_every_cpu_source_recursively(tmp_path, monkeypatch):
    namespace, calls = load_setup()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        sources = namespace["cpu_sources"]()
    finally:
        os.chdir(cwd)
    expected = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"),
                                                                   recursive=True)
                      if not os.path.relpath(p, ROOT).startswith(os.path.join("csrc", "cuda") + os.sep))
    assert sources == expected and "csrc/python/module.cpp" in sources
    assert not any(s.startswith("csrc/cuda/") for s in sources)
    # A new file in a subfolder is picked up without editing setup.py.
    fake = tmp_path / "csrc" / "trainer" / "new_file.cpp"
    fake.parent.mkdir(parents=True)
    fake.write_text("")
    (tmp_path / "csrc" / "cuda").mkdir()
    (tmp_path / "csrc" / "cuda" / "only_cuda.cpp").write_text("")
    monkeypatch.chdir(tmp_path)
    assert namespace["cpu_sources"]() == [os.path.join("csrc", "trainer", "new_file.cpp")]


@pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11")
def test_metadata_is_truthful():
    import importlib.metadata

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    torch_meta = importlib.metadata.metadata("torch")
    assert project["requires-python"] == torch_meta["Requires-Python"] == ">=3.10"
    torch_version = importlib.metadata.version("torch").split("+")[0]
    assert f"torch=={torch_version}" in project["dependencies"]
    assert project["license"] == "BSD-3-Clause"
    with open(os.path.join(ROOT, "LICENSE")) as f:
        assert f.readline().strip() == "BSD 3-Clause License"


def test_package_discovery_finds_every_subpackage():
    from setuptools import find_packages

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        include = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]["include"] if tomllib else None
    on_disk = sorted(os.path.relpath(d, ROOT).replace(os.sep, ".")
                     for d, _, files in os.walk(os.path.join(ROOT, "fusedgrad")) if "__init__.py" in files)
    assert "fusedgrad.cli" in on_disk
    assert sorted(find_packages(ROOT, include=include or ["fusedgrad", "fusedgrad.*"])) == on_disk


def test_py_typed_marker_ships(tmp_path):
    """PEP 561: fusedgrad/py.typed marks the package as typed. build_py copies what a wheel gets
    (the modules and pyproject's package-data); MANIFEST.in puts the marker in the sdist.
    (scripts/check_install.sh checks the real wheel and sdist.)"""
    assert os.path.isfile(os.path.join(ROOT, "fusedgrad", "py.typed"))
    proc = subprocess.run([sys.executable, "setup.py", "--quiet", "build_py", "--build-lib", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "FUSEDGRAD_NO_CUDA": "1"})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "fusedgrad" / "py.typed").is_file(), sorted(p.name for p in (tmp_path / "fusedgrad").iterdir())
    with open(os.path.join(ROOT, "MANIFEST.in")) as f:
        assert "include fusedgrad/py.typed" in f.read().splitlines()
