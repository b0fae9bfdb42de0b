"""Builds fusedgrad._C against the *installed* torch.

Install with ``pip install --no-build-isolation .`` (or ``-e .``) so the build
uses the torch already in the environment: an isolated build would make pip
resolve a torch of its own, and the extension only loads into the torch it was
compiled against.

Sources: every ``csrc/**/*.cpp`` except ``csrc/cuda/`` (compiled only for a
CUDA build); docs/architecture.md says which folder holds what. The build is quiet, one line per compiled file; build options
(environment variables, read by this file only):

  FUSEDGRAD_NO_CUDA=1          CPU-only extension even where torch has CUDA and nvcc
  FUSEDGRAD_DEBUG=1            -O0 -g
  FUSEDGRAD_VERBOSE_BUILD=1    print every compiler command line (ninja -v)
  FUSEDGRAD_EXTRA_CFLAGS / FUSEDGRAD_EXTRA_LDFLAGS / FUSEDGRAD_EXTRA_NVCC_FLAGS
  MAX_JOBS=N                   parallel compile jobs (torch's own variable)
"""
import glob
import os
import re
import subprocess
import sys
import time

from setuptools import setup
from torch.utils import cpp_extension
from torch.utils.cpp_extension import BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0") == "1"


# CUDA kernels (csrc/cuda/) are built when the installed torch has CUDA and
# nvcc is found (torch.utils.cpp_extension.CUDA_HOME); no GPU is needed to
# build. A CPU-only torch (or FUSEDGRAD_NO_CUDA=1) gives the CPU-only extension.
def _build_cuda():
    if _flag("FUSEDGRAD_NO_CUDA"):
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


def _has_distributed():
    import torch.distributed

    return torch.distributed.is_available()


def cpu_sources():
    """Every csrc/**/*.cpp outside csrc/cuda/, relative paths, sorted."""
    found = glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True)
    cuda_dir = os.path.join("csrc", "cuda") + os.sep
    return sorted(p for p in found if not p.startswith(cuda_dir))


def extension():
    sources = cpu_sources()
    debug = _flag("FUSEDGRAD_DEBUG")
    # -g0: Python's own CFLAGS carry -g, which roughly doubles the object size
    # and adds compile time; FUSEDGRAD_DEBUG=1 puts it back.
    cxx_flags = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    cxx_flags += ["-fvisibility=hidden"]  # the C++ standard is the one torch's headers ask for
    # OpenMP: at::parallel_for is a header template whose `#pragma omp parallel` is
    # compiled into *this* extension; without -fopenmp it silently runs on one
    # thread. The runtime is torch's own libgomp.so.1 (already loaded by libtorch,
    # same soname), so torch.set_num_threads governs these loops too. Also enables
    # the `omp simd` loops of the kernels.
    cxx_flags += ["-fopenmp"]
    # Floating-point exceptions are never inspected (by torch either): without
    # this, GCC keeps branches for the compare-and-select of the vectorised exp
    # (csrc/common/cpu_vector.h) and the loops stay scalar. It changes no computed value.
    cxx_flags += ["-fno-trapping-math"]
    # errno is never read after a math call either: without this, std::sqrt keeps
    # a branch to set it for negative input, and the optimizer updates
    # (csrc/trainer/optimizers.h) stay scalar. It changes no computed value.
    cxx_flags += ["-fno-math-errno"]
    cxx_flags += os.environ.get("FUSEDGRAD_EXTRA_CFLAGS", "").split()
    link_flags = ["-fopenmp"] + os.environ.get("FUSEDGRAD_EXTRA_LDFLAGS", "").split()
    # The trainer's data-parallel route calls torch.distributed's C++ ProcessGroup
    # (csrc/trainer/step_reducer.cpp); a torch built without it gets a build that says so.
    macros = [("FUSEDGRAD_WITH_C10D", None)] if _has_distributed() else []
    if _build_cuda():
        from torch.utils.cpp_extension import CUDAExtension

        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "**", "*.cpp"), recursive=True))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "**", "*.cu"), recursive=True))
        # Archs: torch's default (the visible GPUs, else its list) or TORCH_CUDA_ARCH_LIST.
        nvcc_flags = ["-O0", "-g", "-lineinfo"] if debug else ["-O3", "-lineinfo"]
        nvcc_flags += ["-Xcompiler", "-fvisibility=hidden"]
        nvcc_flags += os.environ.get("FUSEDGRAD_EXTRA_NVCC_FLAGS", "").split()
        return CUDAExtension(
            "fusedgrad._C",
            sources,
            define_macros=[("FUSEDGRAD_WITH_CUDA", None)] + macros,  # fusedgrad.backends == ("cpu", "cuda")
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    return CppExtension(
        "fusedgrad._C",
        sources,
        define_macros=macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )


_STATUS = re.compile(r"^\[(\d+)/(\d+)\] (.*)$")


def _quiet_ninja_build(build_directory, verbose, error_prefix):
    """torch's _run_ninja_build, printing one line per compiled file instead of
    each full command line. Compiler diagnostics are passed through; on a
    failure the whole log is printed."""
    command = ["ninja", "-v"]
    jobs = os.environ.get("MAX_JOBS")
    if jobs and jobs.isdigit():
        command += ["-j", jobs]
    start = time.monotonic()
    log = []
    with subprocess.Popen(command, cwd=build_directory, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace") as proc:
        for line in proc.stdout:
            log.append(line)
            match = _STATUS.match(line)
            if match is None:
                if re.search(r"\b(warning|error)\b", line):
                    sys.stdout.write(line)
                continue
            done, total, cmd = match.groups()
            src = re.search(r"(?:^|\s)-c\s+(\S+\.(?:cpp|cu))(?:\s|$)", cmd)
            what = ("compiled " + os.path.relpath(src.group(1), HERE)) if src else "linked"
            print(f"fusedgrad build [{done}/{total}] {time.monotonic() - start:5.0f}s  {what}", flush=True)
    if proc.returncode != 0:
        sys.stdout.write("".join(log))
        raise RuntimeError(f"{error_prefix}: ninja exited with status {proc.returncode} (full log above)")
    print(f"fusedgrad build: compiled in {time.monotonic() - start:.0f}s", flush=True)


class QuietBuildExtension(BuildExtension):
    def build_extensions(self):
        original = getattr(cpp_extension, "_run_ninja_build", None)
        if original is None or _flag("FUSEDGRAD_VERBOSE_BUILD"):
            return super().build_extensions()  # another torch: its own (verbose) output
        cpp_extension._run_ninja_build = _quiet_ninja_build
        try:
            return super().build_extensions()
        finally:
            cpp_extension._run_ninja_build = original


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": QuietBuildExtension.with_options(use_ninja=True)},
)
