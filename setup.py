"""Builds fusedgrad._C against the *installed* torch.

Install with ``pip install --no-build-isolation -e .`` so the build uses the
torch already in the environment (an isolated build would make pip resolve a
torch of its own).
"""
import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension


# CUDA kernels (csrc/cuda/) are built when the installed torch has CUDA and
# nvcc is found (torch.utils.cpp_extension.CUDA_HOME); no GPU is needed to
# build. A CPU-only torch (or FUSEDGRAD_NO_CUDA=1) gives the CPU-only
# extension, exactly as before.
def _build_cuda():
    if os.environ.get("FUSEDGRAD_NO_CUDA", "0") == "1":
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


HERE = os.path.dirname(os.path.abspath(__file__))


def extension():
    # Every C++ source under csrc/ except the CUDA folder (added below when CUDA is built).
    sources = sorted(
        path for path in glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True)
        if not path.startswith(os.path.join("csrc", "cuda", ""))
    )
    debug = os.environ.get("FUSEDGRAD_DEBUG", "0") == "1"
    cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
    cxx_flags += ["-fvisibility=hidden"]  # the C++ standard is the one torch's headers ask for
    cxx_flags += ["-fopenmp-simd"]  # `omp simd` loops (csrc/kernels_cpu_small.cpp); no OpenMP runtime
    # Floating-point exceptions are never inspected (by torch either): without
    # this, GCC keeps branches for the compare-and-select of the trainer's
    # vectorised exp (csrc/trainer/sigmoid_simd.h) and the loop stays scalar.
    # It changes no computed value.
    cxx_flags += ["-fno-trapping-math"]
    cxx_flags += os.environ.get("FUSEDGRAD_EXTRA_CFLAGS", "").split()
    link_flags = os.environ.get("FUSEDGRAD_EXTRA_LDFLAGS", "").split()
    if _build_cuda():
        from torch.utils.cpp_extension import CUDAExtension

        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        # Archs: torch's default (the visible GPUs, else its list) or TORCH_CUDA_ARCH_LIST.
        nvcc_flags = ["-O0", "-g", "-lineinfo"] if debug else ["-O3", "-lineinfo"]
        nvcc_flags += ["-Xcompiler", "-fvisibility=hidden"]
        nvcc_flags += os.environ.get("FUSEDGRAD_EXTRA_NVCC_FLAGS", "").split()
        return CUDAExtension(
            "fusedgrad._C",
            sources,
            define_macros=[("FUSEDGRAD_WITH_CUDA", None)],  # fusedgrad.backends == ("cpu", "cuda")
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
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
