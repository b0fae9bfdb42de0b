"""pytest-benchmark suite: `python -m pytest benchmarks/` (not part of the CI tests).

Options: --bench-shapes 100x1x20x1 ... (default: the whole grid), --bench-threads 1 2,
--bench-dtypes float32 float64, --bench-device cpu. Each group (shape, dtype,
threads, x-grad) holds one benchmark per path; the summary at the end prints
each path's speed-up over native autograd measured in this same run."""
import pytest
import torch

from fusedgrad.bench import steps as B


def pytest_addoption(parser):
    parser.addoption("--bench-shapes", nargs="+", default=None)
    parser.addoption("--bench-threads", nargs="+", type=int, default=[1, 2])
    parser.addoption("--bench-dtypes", nargs="+", default=["float32", "float64"])
    parser.addoption("--bench-device", default="cpu")


def _shape(text):
    return tuple(int(v) for v in text.lower().split("x"))


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    opt = metafunc.config.getoption
    shapes = [_shape(s) for s in opt("--bench-shapes")] if opt("--bench-shapes") else list(B.GRID)
    params, ids = [], []
    for threads in opt("--bench-threads"):
        for dtype in opt("--bench-dtypes"):
            for shape in shapes:
                for x_grad in (False, True):
                    case = B.Case(*shape, dtype=getattr(torch, dtype), x_grad=x_grad, device=opt("--bench-device"))
                    params.append((threads, case))
                    ids.append(f"{case.label.replace('→', 'x').replace('×', 'x')}-{dtype}-{threads}thr"
                               f"{'-xgrad' if x_grad else ''}")
    metafunc.parametrize("case", params, ids=ids, scope="module")


_problems = {}


@pytest.fixture
def problem(case):
    """One Problem per case, shared by its paths (so they use identical weights), with
    the gradients of every path checked against native autograd before any timing."""
    threads, c = case
    torch.set_num_threads(threads)
    if case not in _problems:
        p = B.Problem(c)
        B.assert_paths_agree(p, B.PATHS)
        _problems.clear()
        _problems[case] = p
    return _problems[case]


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if not session or not session.benchmarks:
        return
    groups = {}
    for bench in session.benchmarks:
        groups.setdefault(bench.group, {})[bench.name.split("[")[0]] = bench
    terminalreporter.write_sep("-", "speed-up over native autograd (median, same run)")
    for group, by_path in sorted(groups.items()):
        native = by_path.get("test_native")
        if native is None:
            continue
        parts = [f"{name[5:]} {native.stats.median / b.stats.median:.2f}×"
                 for name, b in sorted(by_path.items()) if name != "test_native"]
        terminalreporter.write_line(f"{group}: " + ", ".join(parts))
