"""Thread safety and determinism.

* Many Python threads calling the ops at once (with and without backward) get
  exactly — bitwise, torch.equal — the answers of sequential calls.
* Repeated calls are bitwise identical.
* Results are bitwise identical under torch.set_num_threads(1) and (2), for
  shapes large enough that the row-blocked reductions (loss, per-column bias
  and target gradients) run several blocks in parallel — wherever the BLAS
  library is: shapes on the GEMM path get their products from torch.mm, and
  some BLAS builds (MKL on AVX-512 CPUs, seen here) split a product's
  reduction by thread count, so that torch.mm itself differs in the last bits
  between 1 and 2 threads. On such a machine those shapes are held to
  float tolerance across thread counts (and still to bitwise repeatability).
"""
import threading

import pytest
import torch

import fusedgrad

F64, F32 = torch.float64, torch.float32


def problem(N, D, H, O, dtype=F32, seed=0, bias="vec", lead=None):
    g = torch.Generator().manual_seed(seed)
    lead = (N,) if lead is None else lead

    def r(*s):
        return torch.randn(*s, generator=g, dtype=F64).to(dtype)

    b_shape = {"vec": lambda c: (c,), "row": lambda c: (1, c), "full": lambda c: lead + (c,),
               "col": lambda c: lead + (1,)}[bias]
    return {
        "x": r(*lead, D), "w1": r(H, D) / D**0.5, "b1": r(*b_shape(H)),
        "w2": r(O, H) / H**0.5, "b2": r(*b_shape(O)), "target": r(*lead, O),
    }


ARGS = ("x", "w1", "b1", "w2", "b2", "target")


def step(p, kind, backward, reduction="mean"):
    """One call; returns every resulting tensor (value, then gradients) as plain tensors."""
    leaves = {k: v.clone().requires_grad_(backward) for k, v in p.items()}
    if kind == "loss":
        out = fusedgrad.mlp_loss(*(leaves[a] for a in ARGS), reduction=reduction)
        scalar = out
    elif kind == "mlp":
        out = fusedgrad.mlp(*(leaves[a] for a in ARGS[:5]))
        scalar = (out * p["target"]).sum()
    else:  # the raw op, all gradients
        res = torch.ops.fusedgrad.mlp_loss_and_grads(
            *(p[a] for a in ARGS), reduction, "sigmoid", [True] * 6)
        return list(res)
    results = [out.detach().clone()]
    if backward:
        scalar.backward()
        results += [leaves[a].grad for a in (ARGS if kind == "loss" else ARGS[:5])]
    return results


def assert_bitwise(a, b, label):
    assert len(a) == len(b), label
    for k, (x, y) in enumerate(zip(a, b)):
        assert x.shape == y.shape and x.dtype == y.dtype, (label, k)
        assert torch.equal(x, y), f"{label}: result {k} differs (max diff {(x - y).abs().max().item():.3e})"


SHAPES = {  # the engine (few multiply-adds a row) and the GEMM path (128·128 + 128·8 multiply-adds a row,
    # above the engine's crossover, csrc/ops/engine_path.cpp). assert_path checks.
    "engine": dict(N=10, D=33, H=4, O=4),
    "gemm": dict(N=200, D=128, H=128, O=8),
}


def expected_path(shape, bias):
    """The engine reads biases of one value per column; full-shape and (N, 1) biases are the GEMM path's."""
    return "engine" if shape == "engine" and bias in ("vec", "row") else "gemm"


def assert_path(p, shape, kind, expected):
    """The path of the case's op (loss and prediction ops take the same one)."""
    loss = kind != "mlp"
    got = fusedgrad._C.explain_op(loss, p["x"], p["w1"], p["b1"], p["w2"], p["b2"], p["target"] if loss else None,
                                  "sigmoid")
    assert got == expected, f"{shape} {kind}: the op takes {got!r}, the test means {expected!r}"


CASES = [(s, kind, bw) for s in SHAPES for kind, bw in
         (("loss", True), ("loss", False), ("mlp", True), ("mlp", False), ("op", False))]


def case_id(shape, kind, backward):
    """The shape's path (with its per-column biases), then N x D x H x O."""
    return f"{shape}-{'x'.join(str(v) for v in SHAPES[shape].values())}-{kind}-{'bw' if backward else 'fw'}"


@pytest.mark.parametrize("shape,kind,backward", CASES, ids=[case_id(*c) for c in CASES])
def test_threads_match_sequential_bitwise(shape, kind, backward):
    n_threads, calls = 8, 50
    # (N, 1) "col" biases broadcast in a way only the GEMM path takes: the engine shape goes without them
    kinds = ("vec", "full", "col", "row") if shape == "gemm" else ("vec", "full", "row")
    problems = [problem(**SHAPES[shape], seed=s, bias=kinds[s % len(kinds)]) for s in range(n_threads)]
    for s, p in enumerate(problems):
        assert_path(p, shape, kind, expected_path(shape, kinds[s % len(kinds)]))
    expected = [step(p, kind, backward) for p in problems]
    errors, mismatches = [], []
    barrier = threading.Barrier(n_threads)

    def worker(k):
        try:
            barrier.wait()
            for i in range(calls):
                p = problems[(k + i) % n_threads]  # every thread visits every problem
                got = step(p, kind, backward)
                try:
                    assert_bitwise(got, expected[(k + i) % n_threads], f"thread {k} call {i}")
                except AssertionError as e:
                    mismatches.append(str(e))
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors[:3]
    assert not mismatches, f"{len(mismatches)} mismatches, e.g. {mismatches[:3]}"


def test_threads_mixed_ops_and_dtypes():
    """Different ops, dtypes and shapes interleaved in 6 threads."""
    jobs = []
    for s, (shape, dtype, kind) in enumerate(
            [("engine", F32, "loss"), ("gemm", F64, "loss"), ("engine", F64, "mlp"),
             ("gemm", F32, "mlp"), ("engine", F32, "op"), ("gemm", F64, "op")]):
        kinds = ("vec", "col", "full") if shape == "gemm" else ("vec", "row", "full")  # "col": GEMM path only
        p = problem(**SHAPES[shape], dtype=dtype, seed=100 + s, bias=kinds[s % 3])
        assert_path(p, shape, kind, expected_path(shape, kinds[s % 3]))
        jobs.append((p, kind, kind != "op", step(p, kind, kind != "op")))
    failures = []

    def worker(k):
        try:
            p, kind, bw, want = jobs[k]
            for i in range(30):
                assert_bitwise(step(p, kind, bw), want, f"job {k} call {i}")
        except BaseException as e:  # noqa: BLE001
            failures.append(repr(e))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not failures, failures[:3]


@pytest.mark.parametrize("bias", ["vec", "row", "full", "col"])
@pytest.mark.parametrize("kind", ["loss", "mlp", "op"])
def test_repeated_calls_bitwise_identical(kind, bias):
    p = problem(N=700, D=16, H=32, O=8, dtype=F32, bias=bias)
    first = step(p, kind, kind != "op")
    for _ in range(5):
        assert_bitwise(step(p, kind, kind != "op"), first, "repeat")


THREAD_CASES = [
    # (N, D, H, O, bias, path): N·cols well above a block's rows, so the per-column reductions run
    # many blocks. Per-column biases: the engine (its blocks in chunks fixed by the rows); full-shape
    # and (N, 1) biases the GEMM path's; 128→128→8 rows are BLAS's (assert_path checks).
    (4096, 16, 64, 8, "vec", "engine"),
    (4096, 16, 64, 8, "row", "engine"),
    (8192, 8, 16, 3, "vec", "engine"),
    (4096, 16, 64, 8, "full", "gemm"),
    (4096, 16, 64, 8, "col", "gemm"),  # (N, 1) biases: gradients through a plain sum over columns
    (300, 7, 5, 3, "vec", "engine"),  # one chunk, whatever the thread count
    (1024, 128, 128, 8, "vec", "gemm"),
]


def blas_thread_deterministic(N, D, H, O, dtype):
    """Whether torch.mm gives bitwise the same products at 1 and 2 threads for this problem's
    shapes (h = x w1ᵀ, dw1 = dhᵀ x, dw2 = gᵀ s)."""
    g = torch.Generator().manual_seed(0)
    pairs = [((N, D), (D, H)), ((H, N), (N, D)), ((O, N), (N, H))]
    mats = [(torch.randn(*a, generator=g, dtype=dtype), torch.randn(*b, generator=g, dtype=dtype)) for a, b in pairs]
    previous = torch.get_num_threads()
    try:
        out = []
        for n in (1, 2):
            torch.set_num_threads(n)
            out.append([a @ b for a, b in mats])
    finally:
        torch.set_num_threads(previous)
    return all(torch.equal(a, b) for a, b in zip(*out))


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("N,D,H,O,bias,path", THREAD_CASES,
                         ids=[f"{c[5]}-{c[0]}x{c[1]}-{c[2]}-{c[3]}-{c[4]}" for c in THREAD_CASES])
def test_results_independent_of_thread_count(N, D, H, O, bias, path, dtype, restore_threads):
    p = problem(N, D, H, O, dtype=dtype, bias=bias, seed=11)
    for kind in ("loss", "mlp"):  # "op" is the loss op's path
        assert_path(p, path, kind, expected=path)
    results = {}
    for n in (1, 2, 1):
        torch.set_num_threads(n)
        assert torch.get_num_threads() == n
        got = step(p, "loss", True) + step(p, "mlp", True) + step(p, "op", False, reduction="sum")
        if n in results:
            assert_bitwise(got, results[n], f"{n} threads, repeated")
        results[n] = got
    try:
        assert_bitwise(results[1], results[2], "1 thread vs 2 threads")
    except AssertionError:
        if blas_thread_deterministic(N, D, H, O, dtype):
            raise  # the difference is fusedgrad's own
        # BLAS itself is thread-count dependent here: agreement to the dtype's rounding.
        tol = 1e-4 if dtype == F32 else 1e-12
        for k, (a, b) in enumerate(zip(results[1], results[2])):
            scale = max(b.abs().max().item(), 1.0)
            assert (a - b).abs().max().item() <= tol * scale, f"result {k}: 1 vs 2 threads beyond {tol}"
