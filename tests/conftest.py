"""Shared test configuration.

Hypothesis profiles: "ci" (default; reproducible, modest) and "dev" (more
examples), picked with the environment variable HYPOTHESIS_PROFILE.
Reusable problem builders live in tests/problems.py (``from problems import ...``).
"""
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # so test modules can `import problems` / `import reference`
    sys.path.insert(0, _HERE)

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=100,
    derandomize=True,  # same examples on every run: CI is reproducible
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=1000,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _import_fusedgrad(retries=5, delay=3.0):
    """The extension may be rebuilt in place by another process; a failed import
    of a half-written .so is retried rather than failing the whole session."""
    for attempt in range(retries):
        try:
            import fusedgrad  # noqa: F401
            return
        except (ImportError, OSError):
            if attempt == retries - 1:
                raise
            for name in [m for m in sys.modules if m == "fusedgrad" or m.startswith("fusedgrad.")]:
                del sys.modules[name]
            time.sleep(delay)


_import_fusedgrad()

# One intra-op thread for the correctness modules that ask for it (fixture
# below): they are dominated by tiny problems whose per-op overhead a second
# thread only adds to, and on this shared 2-core machine thread pools spin
# badly under load. Tests that exercise the parallel code paths set the thread
# count themselves. FUSEDGRAD_TEST_THREADS overrides the count.
import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("FUSEDGRAD_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def restore_threads():
    """For a test that sets torch's thread count: puts it back afterwards."""
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def engine_crossover():
    """set(macs) moves the one-hidden-layer ops' engine/GEMM crossover for one test
    (fusedgrad._C._set_engine_path_max_macs: 0 runs the GEMM path always, None the measured default);
    restored after the test."""
    from fusedgrad import _C
    previous = []

    def set_to(macs):
        previous.append(_C._set_engine_path_max_macs(-1 if macs is None else macs))

    yield set_to
    if previous:
        _C._set_engine_path_max_macs(previous[0])


def pytest_terminal_summary(terminalreporter):
    """Reports the worst relative errors the comparisons observed (tests/problems.WORST)."""
    problems = sys.modules.get("problems")
    if problems is None:
        return
    lines = []
    for dtype, (rel, label) in problems.WORST.items():
        if rel:
            lines.append(f"worst relative error {str(dtype)[6:]}: {rel:.3e}  "
                         f"(tolerance {problems.RTOL[dtype]:.0e})  at {label}")
    ill = getattr(problems, "ILL_CONDITIONED", [])
    if ill:
        rel, native_rel, label = max(ill)
        lines.append(f"float32 comparisons beyond 1e-5 that passed as no worse than 8x native float32's own "
                     f"error (ill-conditioned sums): {len(ill)}; worst fused {rel:.2e} vs native "
                     f"{native_rel:.2e} at {label}")
    if lines:
        terminalreporter.section("fusedgrad numerical agreement")
        for line in lines:
            terminalreporter.write_line(line)
