"""torch.library.opcheck on every operator in the fusedgrad namespace.

opcheck checks the *registration* of an op, not its math (tests/test_against_*
do that): the schema matches what the kernel does (no aliasing, no mutation),
the Autograd key has a kernel, the fake kernel (fusedgrad/_fake.py) gives the
real kernel's sizes/strides/dtypes, and AOTAutograd with dynamic shapes —
what torch.compile does — gives the eager outputs and gradients.

Every op is checked in float32 and float64 on samples with None optionals,
per-sample (and other broadcast) biases, an N-D x, requires_grad inputs
(target included), and inputs that need no gradient.
"""
import pytest
import torch

import fusedgrad  # noqa: F401  (registers torch.ops.fusedgrad)

OPS = torch.ops.fusedgrad
SUBTESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
DTYPES = (torch.float32, torch.float64)
MEAN, SUM = "mean", "sum"
SIGMOID, IDENTITY = "sigmoid", "identity"


def _t(gen, shape, dtype, grad):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(grad)


# name: (x shape, H, O or None (no w2), b1 shape, b2 shape, target shape, requires_grad, reduction, activation)
SAMPLES = {
    "full_vec_bias_grad": ((6, 3), 5, 2, (5,), (2,), (6, 2), True, MEAN, SIGMOID),
    "none_optionals": ((6, 3), 4, None, None, None, None, True, MEAN, SIGMOID),
    "w2_no_biases_no_target": ((6, 3), 4, 2, None, None, None, True, SUM, SIGMOID),
    "per_sample_biases_grad": ((6, 3), 5, 2, (6, 5), (6, 2), (6, 2), True, SUM, SIGMOID),
    "nd_x_broadcast_biases": ((2, 3, 4), 5, 3, (2, 1, 5), (1, 3), (3,), True, MEAN, IDENTITY),
    "per_sample_no_grad": ((6, 3), 5, 2, (6, 5), (6, 2), (6, 2), False, MEAN, SIGMOID),
    # an activation whose derivative reads h: mlp_forward's second output holds h even without w2
    "gelu_no_w2": ((6, 3), 4, None, (4,), None, (6, 4), True, SUM, "gelu"),
    "tanh_w2": ((6, 3), 5, 2, (5,), (2,), (6, 2), True, MEAN, "tanh"),
}


def make_sample(name, dtype):
    xs, H, O, b1s, b2s, ts, grad, reduction, activation = SAMPLES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    D = xs[-1]
    x = _t(gen, xs, dtype, grad)
    w1 = _t(gen, (H, D), dtype, grad)
    b1 = None if b1s is None else _t(gen, b1s, dtype, grad)
    w2 = None if O is None else _t(gen, (O, H), dtype, grad)
    b2 = None if b2s is None else _t(gen, b2s, dtype, grad)
    target = None if ts is None else _t(gen, ts, dtype, grad)
    return (x, w1, b1, w2, b2, target), reduction, activation


def op_args(op_name, name, dtype):
    """(op, args) for one op on one sample."""
    (x, w1, b1, w2, b2, target), reduction, activation = make_sample(name, dtype)
    if op_name == "mlp_loss":
        return OPS.mlp_loss.default, (x, w1, b1, w2, b2, target, reduction, activation)
    if op_name == "mlp_loss_and_grads":
        # Ask for every gradient but x's: the mask, not requires_grad, decides.
        mask = [False, True, True, True, True, True]
        return OPS.mlp_loss_and_grads.default, (x, w1, b1, w2, b2, target, reduction, activation, mask)
    if op_name == "mlp":
        return OPS.mlp.default, (x, w1, b1, w2, b2, activation)
    if op_name == "mlp_forward":
        return OPS.mlp_forward.default, (x, w1, b1, w2, b2, activation)
    if op_name == "mlp_backward":
        with torch.no_grad():
            pred, activations = OPS.mlp_forward(x, w1, b1, w2, b2, activation)
        if w2 is None and activations.numel() == 0:  # the chain ends at s: the prediction is the activations
            activations = pred
        gen = torch.Generator().manual_seed(7)
        grad_out = torch.randn(pred.shape, generator=gen, dtype=torch.float64).to(dtype)
        mask = [True, True, True, True, True]
        return OPS.mlp_backward.default, (grad_out, x, w1, b1, w2, b2, activations, activation, mask)
    raise AssertionError(op_name)


OP_NAMES = ("mlp_loss", "mlp_loss_and_grads", "mlp", "mlp_forward", "mlp_backward")


def test_every_registered_op_is_covered():
    """A new op in the namespace must get opcheck samples here too."""
    registered = {
        name.split("::", 1)[1].split(".", 1)[0]
        for name in torch._C._dispatch_get_all_op_names()
        # The ensemble ops have their own samples in tests/test_ensemble_ops.py, the ops of
        # networks of any depth in tests/test_deep.py (test_opcheck there).
        if name.startswith("fusedgrad::") and not name.startswith(("fusedgrad::ensemble_", "fusedgrad::deep_"))
    }
    assert registered == set(OP_NAMES)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("sample", list(SAMPLES))
@pytest.mark.parametrize("op_name", OP_NAMES)
def test_opcheck(op_name, sample, dtype):
    op, args = op_args(op_name, sample, dtype)
    # raise_exception=False runs every sub-test and reports them all at once.
    results = torch.library.opcheck(op, args, test_utils=SUBTESTS, raise_exception=False)
    assert set(results) == set(SUBTESTS)
    failed = {k: v for k, v in results.items() if v != "SUCCESS"}
    assert not failed, failed


def test_opcheck_catches_a_wrong_fake_kernel():
    """opcheck (and so this file) can fail: a fake kernel with a wrong shape is caught."""
    lib = torch.library.Library("fusedgrad_opcheck_selftest", "FRAGMENT")
    lib.define("twice(Tensor x) -> Tensor")
    lib.impl("twice", lambda x: x * 2, "CPU")
    torch.library.register_fake("fusedgrad_opcheck_selftest::twice", lambda x: x.new_empty(x.shape[:-1]), lib=lib)
    results = torch.library.opcheck(
        torch.ops.fusedgrad_opcheck_selftest.twice.default, (torch.randn(3, 2),),
        test_utils=("test_faketensor",), raise_exception=False)
    assert results["test_faketensor"] != "SUCCESS"
