"""fusedgrad on every device: the fused ops against native autograd, per device.

Every test here takes a ``device`` ("cpu", "cuda") or ``cuda_device`` fixture.
The CPU cases always run (they also prove these tests right on machines
without a GPU); the CUDA cases run whenever ``torch.cuda.is_available()`` and
fusedgrad was built with its CUDA kernels, and are skipped otherwise, with the
reason. On GPU CI set ``FUSEDGRAD_REQUIRE_CUDA=1``: a missing CUDA backend then
fails instead of skipping.

What the CUDA cases check beyond the CPU ones: float16 / bfloat16 (against a
float32 reference on the same rounded inputs), kernels on a non-default stream
(a race if they used another stream), CUDA-graph capture (fails on a host
sync or a launch on the wrong stream), tensors on device 1 while device 0 is
current (the device guard), and bitwise determinism of the reductions.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import fusedgrad
from reference import LOSS_ARGS, assert_close_rel, grads_of, ref_mlp, ref_mlp_loss

# ---------------------------------------------------------------------------
# The devices helper.


def cuda_unavailable_reason():
    """None when the CUDA cases can run, else why not (in words)."""
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            return f"torch {torch.__version__} is built without CUDA"
        return "torch.cuda.is_available() is False (no GPU or no driver)"
    if "cuda" not in fusedgrad.backends:
        return (f"fusedgrad was built without CUDA kernels (fusedgrad.backends == {fusedgrad.backends!r}); "
                "rebuild with a CUDA torch and nvcc on PATH or CUDA_HOME")
    return None


CUDA_REASON = cuda_unavailable_reason()
REQUIRE_CUDA = os.environ.get("FUSEDGRAD_REQUIRE_CUDA", "0") == "1"
DEVICES = ("cpu", "cuda")


def use_device(device):
    """Returns `device` if its cases can run here; skips (or fails, under FUSEDGRAD_REQUIRE_CUDA=1) if not."""
    if device == "cuda" and CUDA_REASON is not None:
        message = f"CUDA cases not run: {CUDA_REASON}"
        if REQUIRE_CUDA:
            pytest.fail(message + " (FUSEDGRAD_REQUIRE_CUDA=1)")
        pytest.skip(message)
    return device


@pytest.fixture(params=DEVICES)
def device(request):
    return use_device(request.param)


@pytest.fixture
def cuda_device():
    return use_device("cuda")


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------
# Problems: leaves drawn in float64 from a seeded CPU generator (so every
# device and dtype sees the same numbers), then moved and cast; arguments are
# views of the leaves (transposes, slices, expansions) made fresh per call.

# max |fused − reference| ≤ rtol · max |reference| per tensor (reference.assert_close_rel).
# float64 / float32: against float64 native autograd (float32: sums of up to
# a few thousand terms in another order, GEMMs without TF32, the default).
# float16 / bfloat16: against float32 native autograd on the same rounded
# inputs; each intermediate (h, s, p, g, ds, dh and every GEMM output) is
# rounded once to the half type (unit roundoff 4.9e-4 / 3.9e-3), and a
# gradient goes through up to ~6 of them, so ~3e-3 / ~2.5e-2 in the worst
# case: 1e-2 / 4e-2. A wrong kernel is off by O(1).
RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def _randn(gen, shape, scale):
    return torch.randn(shape, generator=gen, dtype=torch.float64) * scale


class Case:
    """One problem: leaves plus makers that turn them into op arguments."""

    def __init__(self, lead, D, H, O, *, b1="vec", b2="vec", target=None, target_grad=True, layout="contig",
                 reduction="mean", activation="sigmoid", seed=0):
        gen = torch.Generator().manual_seed(seed)
        out = H if O is None else O
        leaf, make = {}, {}
        if layout == "noncontig":  # x as every other column of a wider leaf, w1 as a transpose
            leaf["x"], make["x"] = _randn(gen, tuple(lead) + (2 * D,), 1.0), lambda t: t[..., ::2]
            leaf["w1"], make["w1"] = _randn(gen, (D, H), 1 / math.sqrt(D)), lambda t: t.t()
        else:
            leaf["x"], make["x"] = _randn(gen, tuple(lead) + (D,), 1.0), None
            leaf["w1"], make["w1"] = _randn(gen, (H, D), 1 / math.sqrt(D)), None
        # b1 / b2 / target: None (absent), "vec" = (cols,), "full" = lead + (cols,), or a shape.
        for name, spec, cols in (("b1", b1, H), ("b2", b2, out), ("target", target, out)):
            if spec is None or (name == "b2" and O is None):
                continue
            shape = {"vec": (cols,), "full": tuple(lead) + (cols,)}.get(spec, spec) if isinstance(spec, str) else spec
            if layout == "expanded" and name == "b1":  # stride-0 (full-shape) view of a (1,…,1) leaf
                leaf[name] = _randn(gen, (1,) * len(shape), 0.5)
                make[name] = (lambda s: (lambda t: t.expand(s)))(shape)
            else:
                leaf[name], make[name] = _randn(gen, shape, 0.5 if name != "target" else 1.0), None
        if O is not None:
            leaf["w2"], make["w2"] = _randn(gen, (O, H), 1 / math.sqrt(H)), None
        self.leaf64, self.make = leaf, make
        self.grad_names = {n for n in leaf if n != "target" or target_grad}
        self.reduction, self.activation = reduction, activation
        self.label = (f"lead={tuple(lead)} D={D} H={H} O={O} b1={b1} b2={b2} target={target} "
                      f"layout={layout} {reduction} {activation}")

    def leaves(self, device, dtype, *, requires_grad=True):
        return {n: t.to(device=device, dtype=dtype, copy=True).requires_grad_(requires_grad and n in self.grad_names)
                for n, t in self.leaf64.items()}

    def args(self, leaves, names=LOSS_ARGS):
        out = []
        for n in names:
            t = leaves.get(n)
            out.append(None if t is None else (self.make[n](t) if self.make.get(n) else t))
        return out


CASES = [
    Case((7,), 5, 6, 3, b1="vec", b2="vec", target="full"),
    Case((2, 3), 4, 8, 2, b1="full", b2=(1, 1, 2), target=(2,), reduction="sum"),       # per-column target
    Case((), 3, 4, None, b1=(1,), target="full", target_grad=False),                  # 1-D x, no w2, (1,)-bias
    Case((9,), 3, 5, 1, b1=(9, 1), b2=(1,), target=(9, 1), activation="identity"),   # "Other" b1: sum_to
    Case((6, 4), 5, 7, 3, b1=(6, 1, 7), b2=None, target="full", layout="noncontig"),
    Case((8,), 4, 6, 3, b1="full", b2="vec", target=None, layout="expanded"),
    # Enough rows and columns for several row blocks and column tiles in the
    # CUDA reductions (H = 70 and O = 40 are not multiples of the 32-wide tiles).
    Case((3000,), 16, 70, 40, b1="vec", b2="vec", target="full", reduction="sum", seed=1),
]
CASE_IDS = [f"case{i}" for i in range(len(CASES))]


def fused_loss(case, leaves):
    return fusedgrad.mlp_loss(*case.args(leaves), reduction=case.reduction, activation=case.activation)


def native_loss(case, leaves):
    return ref_mlp_loss(*case.args(leaves), reduction=case.reduction, activation=case.activation)


def assert_nontrivial(grad, what, floor=1e-4):
    scale = grad.abs().max().item() if grad.numel() else 0.0
    assert scale > floor, f"{what}: gradient ~0 everywhere (max {scale:.1e}), the comparison would be vacuous"


def compare_loss(case, device, dtype, *, ref_dtype=None, rtol=None):
    """mlp_loss and its .grad on `device` in `dtype` vs native autograd in ref_dtype (float64 by default,
    on the same values: a float16 problem is compared with its own values in a wider type)."""
    ref_dtype = ref_dtype or torch.float64
    rtol = rtol or RTOL[dtype]
    leaves = case.leaves(device, dtype)
    ref_leaves = {n: t.detach().to(ref_dtype).requires_grad_(t.requires_grad) for n, t in leaves.items()}
    names = list(LOSS_ARGS)
    loss, grads = grads_of(lambda: fused_loss(case, leaves), [leaves.get(n) for n in names])
    ref, ref_grads = grads_of(lambda: native_loss(case, ref_leaves), [ref_leaves.get(n) for n in names])
    assert loss.device == leaves["x"].device and loss.dtype == dtype and loss.dim() == 0
    assert_close_rel(loss.to(ref_dtype), ref, rtol, f"{case.label}: loss")
    for n, g, r in zip(names, grads, ref_grads):
        if r is None:
            assert g is None, f"{case.label}: d{n} should be None"
            continue
        assert g is not None, f"{case.label}: d{n} missing"
        assert g.dtype == dtype and g.device == leaves[n].device and g.shape == leaves[n].shape
        assert_nontrivial(r, f"{case.label}: d{n}")
        assert_close_rel(g.to(ref_dtype), r, rtol, f"{case.label}: d{n}")


# ---------------------------------------------------------------------------
# float32 / float64 against native autograd, every device.


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_mlp_loss_matches_autograd(device, dtype, case):
    compare_loss(case, device, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_mlp_matches_autograd(device, dtype, case):
    """mlp forward + its fused backward, with a non-uniform incoming gradient."""
    names = LOSS_ARGS[:5]
    leaves = case.leaves(device, dtype)
    ref_leaves = {n: t.detach().double().requires_grad_(t.requires_grad) for n, t in leaves.items()}
    pred = fusedgrad.mlp(*case.args(leaves, names), activation=case.activation)
    weight = torch.linspace(-1.0, 2.0, pred.numel(), dtype=torch.float64).reshape(pred.shape)
    out, grads = grads_of(lambda: (fusedgrad.mlp(*case.args(leaves, names), activation=case.activation)
                                   * weight.to(device, dtype)).sum(), [leaves.get(n) for n in names])
    ref_pred = ref_mlp(*case.args(ref_leaves, names), activation=case.activation)
    ref, ref_grads = grads_of(lambda: (ref_mlp(*case.args(ref_leaves, names), activation=case.activation)
                                       * weight.to(device)).sum(), [ref_leaves.get(n) for n in names])
    assert pred.device == leaves["x"].device and pred.dtype == dtype
    assert_close_rel(pred.double(), ref_pred.detach(), RTOL[dtype], f"{case.label}: pred")
    for n, g, r in zip(names, grads, ref_grads):
        if r is None:
            assert g is None
            continue
        assert g.shape == leaves[n].shape and g.device == leaves[n].device
        assert_close_rel(g.double(), r, RTOL[dtype], f"{case.label}: d{n}")


def test_loss_backward_with_non_unit_gradient(device):
    """(k · loss).backward(): the saved gradients are scaled on the device (no host read of k)."""
    case = CASES[0]
    leaves = case.leaves(device, torch.float64)
    ref_leaves = {n: t.detach().clone().requires_grad_(t.requires_grad) for n, t in leaves.items()}
    _, grads = grads_of(lambda: 2.5 * fused_loss(case, leaves), [leaves.get(n) for n in LOSS_ARGS])
    _, ref_grads = grads_of(lambda: 2.5 * native_loss(case, ref_leaves), [ref_leaves.get(n) for n in LOSS_ARGS])
    for n, g, r in zip(LOSS_ARGS, grads, ref_grads):
        if r is not None:
            assert_close_rel(g, r, RTOL[torch.float64], f"d{n}")


def test_empty_batch(device):
    """N = 0: the mean is NaN (as nn.MSELoss), every gradient is an empty / zero tensor of the right shape."""
    case = Case((0,), 3, 4, 2, b1="vec", b2="vec", target="full")
    compare_empty = case.leaves(device, torch.float64)
    loss = fused_loss(case, compare_empty)
    assert loss.device.type == device and torch.isnan(loss).item()
    total = fusedgrad.mlp_loss(*case.args(compare_empty), reduction="sum")
    total.backward()
    assert total.item() == 0.0
    for n in ("w1", "b1", "w2", "b2"):
        g = compare_empty[n].grad
        assert g.shape == compare_empty[n].shape and torch.count_nonzero(g).item() == 0


def test_gradcheck(device):
    """torch.autograd.gradcheck of both public ops, float64."""
    case = Case((4,), 3, 5, 2, b1="vec", b2=(4, 2), target="full")
    leaves = case.leaves(device, torch.float64)
    names = [n for n in LOSS_ARGS if n in leaves]

    def loss_fn(*tensors):
        d = dict(zip(names, tensors))
        return fusedgrad.mlp_loss(*case.args(d), reduction="sum")

    def mlp_fn(*tensors):
        d = dict(zip(names, tensors))
        return fusedgrad.mlp(*case.args(d, LOSS_ARGS[:5]))

    inputs = [leaves[n] for n in names]
    assert torch.autograd.gradcheck(loss_fn, inputs)
    assert torch.autograd.gradcheck(mlp_fn, inputs)


# ---------------------------------------------------------------------------
# The helper ops' conventions, every device.


def test_helper_op_conventions(device):
    case = CASES[0]
    x, w1, b1, w2, b2, t = case.args(case.leaves(device, torch.float32, requires_grad=False))
    ops = torch.ops.fusedgrad
    mask = [False, True, False, True, True, False]
    out = ops.mlp_loss_and_grads(x, w1, b1, w2, b2, t, "mean", "sigmoid", mask)
    assert out[0].dim() == 0 and out[0].device == x.device
    for wanted, g, like in zip(mask, out[1:], (x, w1, b1, w2, b2, t)):
        assert g.device == x.device and g.dtype == x.dtype
        if wanted:
            assert g.shape == like.shape
        else:
            assert g.numel() == 0, "a gradient that was not requested must be an empty tensor"
    pred, s = ops.mlp_forward(x, w1, b1, w2, b2, "sigmoid")
    assert pred.shape == (7, 3) and s.shape == (7, 6) and pred.device == x.device
    grads = ops.mlp_backward(torch.ones_like(pred), x, w1, b1, w2, b2, s, "sigmoid", [True, False, True, False, True])
    for wanted, g, like in zip([True, False, True, False, True], grads, (x, w1, b1, w2, b2)):
        assert g.device == x.device
        assert g.shape == like.shape if wanted else g.numel() == 0
    # Without w2 the prediction is s itself and the activations slot is empty.
    pred1, s1 = ops.mlp_forward(x, w1, b1, None, None, "sigmoid")
    assert pred1.shape == (7, 6) and s1.numel() == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_reductions_are_deterministic(device, dtype):
    """The loss and column sums come from fixed-order reductions: two runs agree bit for bit."""
    case = CASES[-1]
    args = case.args(case.leaves(device, dtype, requires_grad=False))
    mask = [True, True, True, True, True, False]
    first = torch.ops.fusedgrad.mlp_loss_and_grads(*args, "mean", "sigmoid", mask)
    for _ in range(3):
        again = torch.ops.fusedgrad.mlp_loss_and_grads(*args, "mean", "sigmoid", mask)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_fused_mlp_module(device):
    torch.manual_seed(0)
    net = fusedgrad.FusedMLP(5, 8, 3).to(device=device, dtype=torch.float64)
    x = torch.randn(11, 5, dtype=torch.float64, device=device)
    t = torch.randn(11, 3, dtype=torch.float64, device=device)
    net.loss(x, t).backward()
    l1, l2 = net.linear1, net.linear2
    ref = F.mse_loss(l2(torch.sigmoid(l1(x))), t)
    ref_grads = torch.autograd.grad(ref, [l1.weight, l1.bias, l2.weight, l2.bias])
    for p, r in zip([l1.weight, l1.bias, l2.weight, l2.bias], ref_grads):
        assert p.grad.device == r.device
        assert_close_rel(p.grad, r, 1e-10, "FusedMLP grad")


def test_reduced_precision_refused_on_cpu():
    x = torch.randn(3, 4, dtype=torch.float16)
    with pytest.raises(TypeError, match="float16"):
        fusedgrad.mlp_loss(x, torch.randn(5, 4, dtype=torch.float16))


# ---------------------------------------------------------------------------
# CUDA only.

REDUCED = [torch.float16, torch.bfloat16]
# Small cases with a mean loss, and a larger one with a sum: with "mean" over
# many elements g = 2r/(N·O) would fall into float16's subnormal range (the
# usual reason for loss scaling), which tests float16, not fusedgrad; the sum
# stays well inside float16's range (Σ r² ≈ 2.6e4 < 65504).
REDUCED_CASES = [CASES[0], CASES[1], CASES[3], CASES[4],
                 Case((500,), 16, 70, 40, b1="vec", b2="vec", target="full", reduction="sum", seed=2)]


@pytest.mark.parametrize("dtype", REDUCED, ids=["f16", "bf16"])
@pytest.mark.parametrize("case", REDUCED_CASES, ids=[f"r{i}" for i in range(len(REDUCED_CASES))])
def test_reduced_precision_loss(cuda_device, dtype, case):
    """float16 / bfloat16 (GEMMs in that type, element-wise math and sums in float32 or double)
    against native float32 autograd on the same rounded inputs."""
    compare_loss(case, cuda_device, dtype, ref_dtype=torch.float32)


@pytest.mark.parametrize("dtype", REDUCED, ids=["f16", "bf16"])
def test_reduced_precision_mlp(cuda_device, dtype):
    case = CASES[0]
    names = LOSS_ARGS[:5]
    leaves = case.leaves(cuda_device, dtype)
    ref_leaves = {n: t.detach().float().requires_grad_(t.requires_grad) for n, t in leaves.items()}
    out, grads = grads_of(lambda: fusedgrad.mlp(*case.args(leaves, names)).square().sum(),
                          [leaves.get(n) for n in names])
    ref, ref_grads = grads_of(lambda: ref_mlp(*case.args(ref_leaves, names)).square().sum(),
                              [ref_leaves.get(n) for n in names])
    assert_close_rel(out.float(), ref, RTOL[dtype], "sum of squares of pred")
    for n, g, r in zip(names, grads, ref_grads):
        assert g.dtype == dtype
        assert_close_rel(g.float(), r, RTOL[dtype], f"d{n}")


def test_reduced_precision_mixed_dtypes_refused(cuda_device):
    x = torch.randn(3, 4, device=cuda_device, dtype=torch.float16)
    with pytest.raises(TypeError, match="'w1' has dtype torch.float32 but x has dtype torch.float16"):
        fusedgrad.mlp_loss(x, torch.randn(5, 4, device=cuda_device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_mixed_devices_refused(cuda_device, dtype):
    x = torch.randn(3, 4, device=cuda_device, dtype=dtype)
    w1 = torch.randn(5, 4, dtype=dtype)
    with pytest.raises(ValueError, match="argument 'w1' is on device cpu"):
        fusedgrad.mlp_loss(x, w1)
    x64 = torch.randn(3, 4, dtype=torch.float64, device=cuda_device)
    w = torch.randn(5, 4, dtype=torch.float64, device=cuda_device)
    pred, s = torch.ops.fusedgrad.mlp_forward(x64, w, None, None, None, "sigmoid")
    with pytest.raises(ValueError, match="must be on x's device"):
        torch.ops.fusedgrad.mlp_backward(pred.cpu(), x64, w, None, None, None, s, "sigmoid", [True] * 5)


def test_runs_on_current_non_default_stream(cuda_device):
    """Inputs are produced on a side stream behind a long sleep; a kernel launched on any other stream
    than the current one would read them (and fusedgrad's own buffers) too early."""
    case = CASES[-1]
    ref = torch.ops.fusedgrad.mlp_loss_and_grads(
        *case.args(case.leaves("cpu", torch.float64, requires_grad=False)), "mean", "sigmoid", [True] * 5 + [False])
    src = case.leaves(cuda_device, torch.float64, requires_grad=False)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    assert side != torch.cuda.default_stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the inputs exist
        leaves = {n: t.clone() for n, t in src.items()}
        out = torch.ops.fusedgrad.mlp_loss_and_grads(*case.args(leaves), "mean", "sigmoid", [True] * 5 + [False])
        pred, s = torch.ops.fusedgrad.mlp_forward(*case.args(leaves, LOSS_ARGS[:5]), "sigmoid")
        back = torch.ops.fusedgrad.mlp_backward(
            torch.ones_like(pred), *case.args(leaves, LOSS_ARGS[:5]), s, "sigmoid", [True] * 5)
    side.synchronize()
    for a, r, n in zip(out, ref, ("loss",) + LOSS_ARGS):
        if r.numel():
            assert_close_rel(a.cpu(), r, 1e-9, f"side stream: {n}")
    cpu_leaves = case.leaves("cpu", torch.float64, requires_grad=False)
    cpu_pred, cpu_s = torch.ops.fusedgrad.mlp_forward(*case.args(cpu_leaves, LOSS_ARGS[:5]), "sigmoid")
    cpu_back = torch.ops.fusedgrad.mlp_backward(
        torch.ones_like(cpu_pred), *case.args(cpu_leaves, LOSS_ARGS[:5]), cpu_s, "sigmoid", [True] * 5)
    assert_close_rel(pred.cpu(), cpu_pred, 1e-9, "side stream: pred")
    for a, r in zip(back, cpu_back):
        assert_close_rel(a.cpu(), r, 1e-9, "side stream: mlp_backward")


def test_cuda_graph_capture(cuda_device):
    """A CUDA graph captures the fused step: this fails on any host synchronisation or any launch
    outside the capturing (current) stream. Replays then follow new input values."""
    case = CASES[0]
    leaves = case.leaves(cuda_device, torch.float32, requires_grad=False)
    static = {n: t.clone() for n, t in leaves.items()}
    mask = [False, True, True, True, True, False]

    def step():
        return torch.ops.fusedgrad.mlp_loss_and_grads(*case.args(static), "mean", "sigmoid", mask)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (cuBLAS handles, allocator) outside the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for seed in (3, 4):
        fresh = Case((7,), 5, 6, 3, b1="vec", b2="vec", target="full", seed=seed).leaves(
            cuda_device, torch.float32, requires_grad=False)
        for n in static:
            static[n].copy_(fresh[n])
        graph.replay()
        expected = torch.ops.fusedgrad.mlp_loss_and_grads(*case.args(fresh), "mean", "sigmoid", mask)
        torch.cuda.synchronize()
        for a, b, wanted in zip(captured, expected, [True] + mask):
            if wanted:
                assert_close_rel(a, b, 1e-5, "graph replay")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA device (device 1)")
def test_device_1_while_device_0_is_current(cuda_device):
    """Tensors on cuda:1 while cuda:0 is current: the kernels follow the tensors (device guard)."""
    case = CASES[-1]
    ref = torch.ops.fusedgrad.mlp_loss_and_grads(
        *case.args(case.leaves("cpu", torch.float64, requires_grad=False)), "mean", "sigmoid", [True] * 5 + [False])
    torch.cuda.set_device(0)
    leaves = case.leaves("cuda:1", torch.float64, requires_grad=False)
    out = torch.ops.fusedgrad.mlp_loss_and_grads(*case.args(leaves), "mean", "sigmoid", [True] * 5 + [False])
    torch.cuda.synchronize(1)
    assert torch.cuda.current_device() == 0, "the device guard must restore the current device"
    with torch.cuda.stream(torch.cuda.Stream(device=1)):  # device 1's current stream a side stream
        out_side = torch.ops.fusedgrad.mlp_loss_and_grads(*case.args(leaves), "mean", "sigmoid", [True] * 5 + [False])
    torch.cuda.synchronize(1)
    for a, b, r, n in zip(out, out_side, ref, ("loss",) + LOSS_ARGS):
        assert a.device == torch.device("cuda:1") and b.device == torch.device("cuda:1")
        if r.numel():
            assert_close_rel(a.cpu(), r, 1e-9, f"device 1: {n}")
            assert_close_rel(b.cpu(), r, 1e-9, f"device 1, side stream: {n}")
    loss = fused_loss(case, case.leaves("cuda:1", torch.float64))
    assert loss.device == torch.device("cuda:1")
