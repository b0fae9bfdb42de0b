"""What a benchmark run records about the CPU it ran on.

The same code runs at very different speeds on CPUs with and without AVX-512 (the kernels take the
CPU's vector width: 64 bytes with AVX-512, 32 without), and "AMD EPYC" names guests of both kinds,
so every saved run says which one it was.
"""
from __future__ import annotations

import os
import platform

from .. import _C

# The x86-64-v4 level (AVX-512) is what the kernels' AVX-512 build needs (csrc/common/cpu_vector.h).
_AVX512 = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


def _cpuinfo():
    """(model name, flags) from /proc/cpuinfo, or (None, None) where there is none."""
    model, flags = None, None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if model is None and line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif flags is None and line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                if model is not None and flags is not None:
                    break
    except OSError:
        pass
    return model, flags


def cpu_model() -> str:
    """The CPU's model name, e.g. "AMD EPYC"."""
    model, _ = _cpuinfo()
    return model or platform.processor() or platform.machine()


def vector_isa() -> str:
    """The vector instruction set the kernels run with here: "AVX-512", "AVX2", or the machine name."""
    _, flags = _cpuinfo()
    if flags is None:
        return platform.machine()
    if _AVX512 <= flags and {"avx2", "fma"} <= flags:
        return "AVX-512"
    if {"avx2", "fma"} <= flags:
        return "AVX2"
    return "baseline x86-64" if platform.machine() in ("x86_64", "AMD64") else platform.machine()


def cpu_facts() -> dict:
    """The keys every saved run's "meta" carries about its CPU."""
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "vector_isa": vector_isa(),
            "cpu_vector_bytes": _C.cpu_vector_bytes()}


def cpu_label(meta: dict) -> str:
    """ "AMD EPYC (AVX2, 32-byte vectors), 2 CPUs" from a run's meta (older runs lack the ISA)."""
    isa = f" ({meta['vector_isa']}, {meta['cpu_vector_bytes']}-byte vectors)" if "vector_isa" in meta else ""
    return f"{meta.get('cpu', 'CPU')}{isa}, {meta.get('cpu_count', '?')} CPUs"
