"""Memory: what the autograd graph saves is freed after backward, the whole graph
is freed when its output is dropped without backward, nothing depends on the
cycle collector (gc stays disabled in these checks), and resident memory stays
flat over tens of thousands of training steps and of failing calls.
"""
import ctypes
import gc
import os
import sys
import weakref
from contextlib import contextmanager

import pytest
import torch

import fusedgrad

F64 = torch.float64
ARGS = ("x", "w1", "b1", "w2", "b2", "target")


@pytest.fixture
def no_gc():
    """Reference cycles would survive: every check below must hold on refcounts alone."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    yield
    if enabled:
        gc.enable()


@contextmanager
def track_saved():
    """Weak references to every tensor an autograd node saves (via saved-tensor hooks)."""
    refs = []

    def pack(t):
        refs.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield refs


def alive(refs):
    return [r for r in refs if r() is not None]


def make(N=6, D=3, H=4, O=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(N, D, generator=g, dtype=F64), "w1": torch.randn(H, D, generator=g, dtype=F64),
        "b1": torch.randn(H, generator=g, dtype=F64), "w2": torch.randn(O, H, generator=g, dtype=F64),
        "b2": torch.randn(O, generator=g, dtype=F64), "target": torch.randn(N, O, generator=g, dtype=F64),
    }


def fresh_inputs(p, requires_grad=True):
    """Non-leaf inputs (leaf * 1) whose only reference, once the caller drops them, is the graph."""
    leaves = {k: v.clone().requires_grad_(requires_grad) for k, v in p.items()}
    return leaves, {k: v * 1 for k, v in leaves.items()}


@pytest.mark.parametrize("kind", ["loss", "mlp"])
def test_saved_tensors_and_inputs_freed_after_backward(kind, no_gc):
    p = make()
    leaves, inputs = fresh_inputs(p)
    input_refs = [weakref.ref(v) for v in inputs.values()]
    with track_saved() as saved:  # only what the fused node saves
        if kind == "loss":
            out = fusedgrad.mlp_loss(*(inputs[a] for a in ARGS))
        else:
            pred = fusedgrad.mlp(*(inputs[a] for a in ARGS[:5]))
    assert saved, "the node saved nothing?"
    if kind == "mlp":
        out = (pred * p["target"]).sum()
        del pred
    del inputs
    out.backward()
    del out
    for v in leaves.values():
        v.grad = None  # a saved gradient may legitimately live on as .grad; drop those too
    assert not alive(saved), f"{len(alive(saved))} saved tensors still alive after backward"
    assert not alive(input_refs), f"{len(alive(input_refs))} non-leaf inputs still alive after backward"


@pytest.mark.parametrize("kind", ["loss", "mlp"])
def test_graph_freed_when_output_dropped_without_backward(kind, no_gc):
    p = make()
    leaves, inputs = fresh_inputs(p)
    input_refs = [weakref.ref(v) for v in inputs.values()]
    with track_saved() as saved:
        if kind == "loss":
            out = fusedgrad.mlp_loss(*(inputs[a] for a in ARGS))
        else:
            out = fusedgrad.mlp(*(inputs[a] for a in ARGS[:5]))
    del inputs
    assert alive(saved) or kind == "loss"
    del out
    assert not alive(saved), f"{len(alive(saved))} saved tensors alive after the output was dropped"
    assert not alive(input_refs), "inputs kept alive by a dropped graph"
    for v in leaves.values():
        assert v.grad is None


def test_mlp_loss_releases_its_inputs_with_the_graph(no_gc):
    """The loss node keeps its inputs (as native autograd's nodes keep theirs) for a create_graph=True
    backward, which recomputes from them — and nothing else of size N but the gradients it computed:
    a non-leaf input lives until the graph is freed by backward, then goes."""
    p = make()
    leaves, inputs = fresh_inputs(p)
    x_ref = weakref.ref(inputs["x"])
    loss = fusedgrad.mlp_loss(*(inputs[a] for a in ARGS))
    del inputs
    assert x_ref() is not None
    loss.backward()
    assert leaves["x"].grad is not None
    del loss
    assert x_ref() is None


@pytest.mark.parametrize("kind", ["loss", "mlp", "module"])
def test_refcounts_unchanged_by_a_step(kind, no_gc):
    p = make()
    leaves = {k: v.clone().requires_grad_() for k, v in p.items()}
    net = fusedgrad.FusedMLP(3, 4, 2).double()

    def one_step():
        if kind == "loss":
            out = fusedgrad.mlp_loss(*(leaves[a] for a in ARGS))
        elif kind == "mlp":
            out = fusedgrad.mlp(*(leaves[a] for a in ARGS[:5])).square().sum()
        else:
            out = net.loss(leaves["x"], leaves["target"])
        out.backward()
        for v in list(leaves.values()) + list(net.parameters()):
            v.grad = None

    one_step()  # first call: lazy initialisations
    objs = list(leaves.values()) + list(net.parameters())
    before = [sys.getrefcount(v) for v in objs]
    for _ in range(50):
        one_step()
    after = [sys.getrefcount(v) for v in objs]
    assert before == after


def test_failed_calls_leave_no_references(no_gc):
    p = make()
    w1 = p["w1"].clone().requires_grad_()
    bad_target = torch.randn(6, 3, dtype=F64)
    before = sys.getrefcount(w1), sys.getrefcount(bad_target)
    for _ in range(100):
        with pytest.raises(ValueError):
            fusedgrad.mlp_loss(p["x"], w1, p["b1"], p["w2"], p["b2"], bad_target)
    assert (sys.getrefcount(w1), sys.getrefcount(bad_target)) == before


# --------------------------------------------------------------------------- resident memory

def _malloc_trim():
    """glibc's malloc_trim(0), or a no-op: hands free heap pages back to the system before RSS is read.

    Without it RSS also counts free memory malloc keeps touched: a clean-clone CI run once saw RSS grow
    by 3.86 MiB over the raw op's 20 000 steps while bytes in use stayed flat. A leak is live memory,
    which no trim releases, so it still shows in both measures."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_bytes():
    _malloc_trim()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]


def _heap_in_use_reader():
    """Bytes malloc has handed out and not had back (glibc mallinfo2), or None.

    Resident memory alone cannot see a leak in a process whose heap already has
    free space (after a thousand earlier tests a leak just fills the holes);
    bytes in use can."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None
    return lambda: (lambda m: m.uordblks + m.hblkhd)(libc.mallinfo2())


heap_in_use = _heap_in_use_reader()

# A leak of one small tensor per step (a TensorImpl plus its storage, several hundred
# bytes) adds several MiB across the measured steps: over this bound in bytes in use,
# and in resident memory when the heap has no free space to absorb it.
# Measured here: 0.0 MiB of growth (both measures) for every step kind below.
BOUND = 2 * 2**20
WARMUP, STEPS = 3000, 20000


def measure(step, steps=STEPS):
    """(growth of bytes in use by malloc, growth of resident memory) over `steps` calls."""
    for _ in range(WARMUP):
        step()
    gc.collect()
    start_heap, start_rss = (heap_in_use() if heap_in_use else 0), rss_bytes()
    for _ in range(steps):
        step()
    gc.collect()
    heap = (heap_in_use() - start_heap) if heap_in_use else 0
    return heap, rss_bytes() - start_rss


@pytest.mark.skipif(heap_in_use is None, reason="needs glibc's mallinfo2")
def test_memory_measure_detects_a_small_leak():
    """The bound is meaningful: keeping one 4-element tensor alive per step exceeds it."""
    leak = []
    heap, _ = measure(lambda: leak.append(torch.empty(4)))
    assert heap > BOUND, f"a leak of {STEPS} small tensors grew the heap in use by only {heap / 2**20:.2f} MiB"


def _training_step_factory(kind):
    torch.manual_seed(0)
    net = fusedgrad.FusedMLP(4, 4, 4)
    x, t = torch.randn(10, 4), torch.randn(10, 4)
    params = list(net.parameters())

    def step():
        if kind == "loss":
            out = net.loss(x, t)
        elif kind == "mlp":
            out = torch.nn.functional.mse_loss(net(x), t)
        else:  # the raw op, as a no-autograd training loop would call it
            l1, l2 = net.linear1, net.linear2
            out = torch.ops.fusedgrad.mlp_loss_and_grads(
                x, l1.weight, l1.bias, l2.weight, l2.bias, t, "mean", "sigmoid", [False, True, True, True, True, False])
            with torch.no_grad():
                torch._foreach_add_(params, list(out[2:6]), alpha=-0.01)
            return
        out.backward()
        with torch.no_grad():
            torch._foreach_add_(params, [p.grad for p in params], alpha=-0.01)
        for prm in params:
            prm.grad = None

    return step


@pytest.mark.parametrize("kind,steps", [("loss", STEPS), ("mlp", STEPS // 2), ("op", STEPS)])
def test_rss_flat_over_training_steps(kind, steps):
    heap, rss = measure(_training_step_factory(kind), steps)
    assert heap < BOUND, f"bytes in use grew by {heap / 2**20:.2f} MiB over {steps} steps"
    assert rss < BOUND, f"RSS grew by {rss / 2**20:.2f} MiB over {steps} steps"


def test_rss_flat_over_failing_calls():
    """Error paths (argument checks in C++ and Python, a refused create_graph backward) leak nothing."""
    x, w1, w2 = torch.randn(10, 4), torch.randn(4, 4, requires_grad=True), torch.randn(4, 4)
    bad = [
        lambda: fusedgrad.mlp_loss(x, w1, None, w2, None, torch.randn(10, 3)),  # C++ ValueError
        lambda: fusedgrad.mlp_loss(x, w1.double()),  # C++ TypeError
        lambda: fusedgrad.mlp_loss(x.tolist(), w1),  # Python TypeError
        lambda: fusedgrad.mlp(x, w1, torch.randn(5), w2),  # C++ ValueError (mlp)
        lambda: torch.ops.fusedgrad.mlp_loss(x, w1, None, None, None, None, "median", "sigmoid"),  # bad reduction
    ]

    def double_backward_after_in_place_change():  # the recompute refuses an input modified since the forward
        w = w1.detach().clone().requires_grad_()
        loss = fusedgrad.mlp_loss(x, w, None, w2)
        with torch.no_grad():
            w.add_(1.0)
        torch.autograd.grad(loss, w, create_graph=True)

    bad.append(double_backward_after_in_place_change)
    k = [0]

    def step():
        fn = bad[k[0] % len(bad)]
        k[0] += 1
        try:
            fn()
        except (ValueError, TypeError, RuntimeError):
            return
        raise AssertionError("a bad call did not raise")

    heap, rss = measure(step, STEPS // 2)
    assert heap < BOUND, f"bytes in use grew by {heap / 2**20:.2f} MiB over {STEPS // 2} failing calls"
    assert rss < BOUND, f"RSS grew by {rss / 2**20:.2f} MiB over {STEPS // 2} failing calls"
