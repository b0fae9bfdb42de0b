"""Builds fusedgrad._C against the *installed* torch.

Install with ``pip install --no-build-isolation -e .`` so the build uses the
torch already in the environment (an isolated build would make pip resolve a
torch of its own).
"""
import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    debug = os.environ.get("FUSEDGRAD_DEBUG", "0") == "1"
    cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
    cxx_flags += ["-std=c++17", "-fvisibility=hidden"]
    cxx_flags += os.environ.get("FUSEDGRAD_EXTRA_CFLAGS", "").split()
    link_flags = os.environ.get("FUSEDGRAD_EXTRA_LDFLAGS", "").split()
    return CppExtension(
        "fusedgrad._C",
        sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
