"""Benchmark cases shared by ``python -m fusedgrad bench`` and ``benchmarks/``.

A *step* is what a training loop does per batch: forward, squared loss,
backward, gradients landing in the parameters' ``.grad`` (x not requiring grad,
unless ``x_grad``). The paths compared, all from identical weights:

* ``native``   — nn.Linear → nn.Sigmoid → nn.Linear + nn.MSELoss, ``loss.backward()``
* ``compile``  — that same loss function under ``torch.compile`` (compile time reported apart)
* ``fused``    — ``FusedMLP.loss(x, y).backward()``
* ``no_autograd`` — ``FusedMLP.loss_backward(x, y)``: the fused gradients written into
  ``.grad`` without the autograd engine (for hand-written loops)
"""
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..functional import mlp_loss_and_grads
from ..module import FusedMLP
from .native import Net  # the native Linear → Sigmoid → Linear reference

# The grid of the speed issue: N×D→H→O.
GRID = ((100, 1, 20, 1), (10, 4, 4, 4), (256, 32, 64, 8), (1024, 64, 128, 16),
        (4096, 256, 256, 64), (16384, 512, 512, 128))
PATHS = ("native", "compile", "fused", "no_autograd")


@dataclass(frozen=True)
class Case:
    N: int
    D: int
    H: int
    O: int
    dtype: torch.dtype = torch.float32
    x_grad: bool = False
    device: str = "cpu"

    @property
    def label(self):
        return f"{self.N}×{self.D}→{self.H}→{self.O}"

    def flops(self):
        """FLOPs of one step (README "Math"): forward 2N(DH+HO), backward 4N(DH+HO), minus 2N·DH without dx."""
        fwd = 2 * self.N * (self.D * self.H + self.H * self.O)
        bwd = 2 * fwd - (0 if self.x_grad else 2 * self.N * self.D * self.H)
        return fwd + bwd


class Problem:
    """Inputs and one model per path, all with the same weights."""

    def __init__(self, case: Case, seed: int = 0):
        self.case = case
        gen = torch.Generator().manual_seed(seed)
        kw = {"dtype": case.dtype}
        self.x = (torch.rand(case.N, case.D, generator=gen, **kw) * 2 - 1).to(case.device)
        self.y = torch.rand(case.N, case.O, generator=gen, **kw).to(case.device)
        self.x.requires_grad_(case.x_grad)
        torch.manual_seed(seed)
        self.native = Net(case.D, case.H, case.O).to(device=case.device, dtype=case.dtype)
        self.fused = FusedMLP(case.D, case.H, case.O, device=case.device, dtype=case.dtype)
        self.fused.load_state_dict(self.native.state_dict())
        self.mse = nn.MSELoss()
        self._compiled = None
        self.compile_seconds = None

    def _zero(self, model):
        for p in model.parameters():
            p.grad = None
        if self.case.x_grad:
            self.x.grad = None

    def native_loss(self, x, y):
        return self.mse(self.native(x), y)

    def step(self, path):
        """Runs one step of `path`; returns the loss."""
        return self.step_fn(path)()

    def step_fn(self, path):
        """One step of `path` as a closure, everything looked up once; returns the loss.

        Every path clears its gradients the same way (a precomputed list set to
        None, as ``zero_grad()`` does), so what differs between them is the step.
        """
        x, y = self.x, self.y
        model = self.native if path in ("native", "compile") else self.fused
        to_clear = list(model.parameters()) + ([x] if self.case.x_grad else [])

        def clear():
            for t in to_clear:
                t.grad = None

        if path in ("native", "compile", "fused"):  # a loss, then backward()
            if path == "native":
                loss_fn = self.native_loss
            elif path == "compile":
                loss_fn = self.compiled()  # compiles (and runs a step of its own) on first use
            else:
                loss_fn = self.fused.loss

            def step():
                clear()
                loss = loss_fn(x, y)
                loss.backward()
                return loss
        elif path == "no_autograd" and not self.case.x_grad:
            fused = self.fused

            def step():
                clear()
                return fused.loss_backward(x, y)
        elif path == "no_autograd":  # one call for the parameters' gradients and x's
            l1, l2 = self.fused.linear1, self.fused.linear2

            def step():
                clear()
                inputs = (x, l1.weight, l1.bias, l2.weight, l2.bias)
                loss, grads = mlp_loss_and_grads(*inputs, y, wrt=("x", "w1", "b1", "w2", "b2"))
                for tensor, grad in zip(inputs, grads):
                    tensor.grad = grad
                return loss
        else:
            raise ValueError(f"unknown path {path!r}; expected one of {PATHS}")
        return step

    def compiled(self):
        if self._compiled is None:
            fn = torch.compile(self.native_loss)
            start = time.perf_counter()
            self._zero(self.native)
            fn(self.x, self.y).backward()  # compiles forward and backward graphs
            self.compile_seconds = time.perf_counter() - start
            self._compiled = fn
        return self._compiled

    def grads(self, path):
        """Runs one step; returns [dw1, db1, dw2, db2(, dx)] as numbers to compare."""
        self.step(path)
        model = self.native if path in ("native", "compile") else self.fused
        out = [p.grad.detach().clone() for p in (model.linear1.weight, model.linear1.bias,
                                                   model.linear2.weight, model.linear2.bias)]
        if self.case.x_grad:
            out.append(self.x.grad.detach().clone())
        return out


def grad_tolerance(dtype):
    """Relative tolerance for comparing two paths' gradients: float noise of the dtype."""
    return 1e-10 if dtype == torch.float64 else 2e-4


def assert_paths_agree(problem: Problem, paths):
    """Every path's gradients equal native autograd's (a fast wrong answer must not win)."""
    ref = problem.grads("native")
    rtol = grad_tolerance(problem.case.dtype)
    for path in paths:
        if path == "native":
            continue
        for k, (got, want) in enumerate(zip(problem.grads(path), ref)):
            scale = want.abs().max().item()
            err = (got - want).abs().max().item()
            if not err <= rtol * max(scale, 1e-30):
                raise AssertionError(
                    f"{problem.case.label} {problem.case.dtype}: path {path!r} gradient #{k} differs from "
                    f"native autograd by {err:.3e} (scale {scale:.3e}, rtol {rtol:.0e})")


def synchronize(device):
    """Waits for queued device work, so wall-clock timings of CUDA steps are honest."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def time_paths(problem: Problem, paths, repeats=7, min_repeat_s=0.02, max_total_s=20.0):
    """Median seconds per step for each path, measured round-robin in one run.

    Each repeat runs a loop of k steps (k chosen so a repeat lasts ≥ min_repeat_s);
    paths alternate repeat by repeat, so machine noise hits all of them alike.
    """
    loops = {}
    device = problem.case.device
    steps = {path: problem.step_fn(path) for path in paths}
    for path in paths:
        steps[path]()  # warm-up (first-call allocations, compile already done)
        synchronize(device)
        start = time.perf_counter()
        steps[path]()
        synchronize(device)
        one = max(time.perf_counter() - start, 1e-7)
        loops[path] = max(1, int(min_repeat_s / one))
    samples = {p: [] for p in paths}
    started = time.perf_counter()
    for r in range(repeats):
        for path in paths:
            k, step = loops[path], steps[path]
            start = time.perf_counter()
            for _ in range(k):
                step()
            synchronize(device)
            samples[path].append((time.perf_counter() - start) / k)
        if r >= 2 and time.perf_counter() - started > max_total_s:
            break
    return {p: statistics.median(s) for p, s in samples.items()}


def gemm_peak_gflops(dtype=torch.float32, n=1024, device="cpu", repeats=10):
    """GFLOP/s of a square torch.mm at the current thread count: the roof for the large shapes."""
    a = torch.rand(n, n, dtype=dtype, device=device)
    b = torch.rand(n, n, dtype=dtype, device=device)
    out = torch.empty(n, n, dtype=dtype, device=device)
    torch.mm(a, b, out=out)
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


# ---- peak memory of one step (CPU) -------------------------------------------------

def _status_kib(field):
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+)", f.read(), re.M).group(1))


def memory_measurement_available():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kib("VmHWM")
        return True
    except OSError:
        return False


def peak_step_memory_mib(problem: Problem, path):
    """Extra resident memory at the peak of one step, above what was resident before it."""
    problem.step(path)
    gc.collect()
    problem._zero(problem.native if path in ("native", "compile") else problem.fused)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    before = _status_kib("VmRSS")
    loss = problem.step(path)
    peak = _status_kib("VmHWM")
    del loss
    return (peak - before) / 1024.0


def measure_memory(rows, paths, device="cpu"):
    """Peak extra resident memory of one step, per path, for each row (keys N, D, H, O, dtype,
    threads and optionally x_requires_grad), stored as row["peak_mib"]. Measured in a fresh
    child process whose glibc hands every block ≥ 64 KiB straight to and from the OS
    (MALLOC_MMAP_THRESHOLD_): a step's allocations then show in the resident-set high-water
    mark instead of being served from memory the heap kept from earlier work."""
    if device != "cpu" or not memory_measurement_available():
        print("(peak memory not measured: needs /proc/self/clear_refs on CPU)")
        return
    cases = [{"N": r["N"], "D": r["D"], "H": r["H"], "O": r["O"], "dtype": r["dtype"],
              "x_grad": r.get("x_requires_grad", False), "threads": r["threads"]} for r in rows]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, "-c", "from fusedgrad.bench.steps import memory_child; memory_child()"],
                          input=json.dumps({"cases": cases, "paths": list(paths)}), capture_output=True, text=True,
                          env=env, cwd=os.getcwd(), timeout=3600)
    if proc.returncode != 0:
        print(f"(peak memory not measured: the measuring process failed: {proc.stderr.strip()[-300:]})")
        return
    for row, mib in zip(rows, json.loads(proc.stdout)):
        row["peak_mib"] = mib


def memory_child():
    """Runs in the child of measure_memory: reads cases on stdin, prints MiB per path as JSON."""
    job = json.loads(sys.stdin.read())
    out = []
    for c in job["cases"]:
        torch.set_num_threads(c["threads"])
        case = Case(c["N"], c["D"], c["H"], c["O"], dtype=getattr(torch, c["dtype"]), x_grad=c["x_grad"])
        problem = Problem(case)
        out.append({p: peak_step_memory_mib(problem, p) for p in job["paths"]})
        del problem
    print(json.dumps(out))


def jax_available():
    """Whether the optional JAX routes can run (pip install jax optax)."""
    try:
        import jax  # noqa: F401
        import optax  # noqa: F401
    except ImportError:
        return False
    return True
