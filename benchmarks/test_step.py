"""One training step per path; see benchmarks/conftest.py and fusedgrad/bench/steps.py."""
import pytest


def _run(benchmark, problem, case, path):
    threads, c = case
    benchmark.group = f"{c.label} {str(c.dtype)[6:]} {threads}thr{' x-grad' if c.x_grad else ''}"
    benchmark.extra_info.update(flops=c.flops(), threads=threads)
    benchmark(problem.step_fn(path))


def test_native(benchmark, problem, case):
    _run(benchmark, problem, case, "native")


def test_compile(benchmark, problem, case):
    problem.compiled()  # compile outside the timing
    benchmark.extra_info["compile_seconds"] = problem.compile_seconds
    _run(benchmark, problem, case, "compile")


def test_fused(benchmark, problem, case):
    _run(benchmark, problem, case, "fused")


def test_no_autograd(benchmark, problem, case):
    _run(benchmark, problem, case, "no_autograd")
