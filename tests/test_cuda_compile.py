"""The CUDA sources compile (nvcc, sm_80 and sm_90, against the installed torch's
headers) — checked wherever nvcc exists, GPU or not. Nothing here runs on a GPU:
tests/test_cuda.py does that where one is present."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "check_cuda_compile.sh")


def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [os.path.join(home, "bin", "nvcc")] if home else []
    candidates += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


@pytest.mark.skipif(_nvcc() is None, reason="no nvcc on this machine: the CUDA compile check needs the CUDA toolkit")
def test_cuda_sources_compile_for_sm80_and_sm90():
    proc = subprocess.run(["bash", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "NVCC": _nvcc()})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "OK    nvcc csrc/cuda/kernels_cuda.cu" in proc.stdout
    assert "sm_80:" in proc.stdout and "sm_90:" in proc.stdout
