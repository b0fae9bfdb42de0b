"""Bad arguments: a ValueError / TypeError whose message names the argument and
says what was expected and what was received — never a crash, a confusing
dispatcher error or a silently wrong result."""
import re

import numpy as np
import pytest
import torch

import fusedgrad

pytestmark = pytest.mark.usefixtures("single_thread")

N, D, H, O = 4, 3, 5, 2


def good(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    return {"x": r(N, D), "w1": r(H, D), "b1": r(H), "w2": r(O, H), "b2": r(O), "target": r(N, O)}


def call(op, **overrides):
    """Calls fusedgrad.<op> with valid arguments except for `overrides`."""
    args = good()
    args.update(overrides)
    if op == "mlp":
        args.pop("target")
        reduction = args.pop("reduction", None)
        assert reduction is None
        return fusedgrad.mlp(**args)
    return fusedgrad.mlp_loss(**args)


OPS = ["mlp_loss", "mlp"]


def op_args(names):
    """(op, name) pairs: every op with every argument it takes (mlp has no target)."""
    return [(op, n) for op in OPS for n in names if not (op == "mlp" and n == "target")]


def q(name):
    """The argument's name as the message quotes it."""
    return re.escape(f"'{name}'")


def test_valid_arguments_work():
    """The baseline every case below perturbs is itself accepted."""
    for op in OPS:
        out = call(op)
        assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------
# Not tensors
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("name", ["x", "w1"])
@pytest.mark.parametrize("value,type_name", [
    ([[1.0, 2.0, 3.0]], "list"),
    (np.ones((N, D), dtype=np.float32), "ndarray"),
    (None, "NoneType"),
    (1.5, "float"),
], ids=["list", "ndarray", "None", "float"])
def test_required_argument_not_a_tensor(op, name, value, type_name):
    with pytest.raises(TypeError, match=q(name)) as info:
        call(op, **{name: value})
    msg = str(info.value)
    assert "torch.Tensor" in msg and type_name in msg, msg


@pytest.mark.parametrize("op,name", op_args(["b1", "w2", "b2", "target"]))
@pytest.mark.parametrize("value,type_name", [
    ([1.0, 2.0], "list"),
    (np.ones(5, dtype=np.float32), "ndarray"),
    (0.5, "float"),
    ("bias", "str"),
], ids=["list", "ndarray", "float", "str"])
def test_optional_argument_not_a_tensor(op, name, value, type_name):
    with pytest.raises(TypeError, match=q(name)) as info:
        call(op, **{name: value})
    msg = str(info.value)
    assert "torch.Tensor or None" in msg and type_name in msg, msg


# ---------------------------------------------------------------------------
# Ranks and widths
@pytest.mark.parametrize("op", OPS)
# (3-D w1 is an ensemble of K models: tests/test_ensemble_ops.py)
@pytest.mark.parametrize("shape", [(D,), (1, 1, H, D), (H, D + 1), (H, 1), (D, H)], ids=str)
def test_w1_bad_shape(op, shape):
    w1 = torch.randn(*shape)
    with pytest.raises(ValueError, match=q("w1")) as info:
        call(op, w1=w1)
    msg = str(info.value)
    assert f"(H, {D})" in msg, msg          # expected
    assert str(tuple(shape)) in msg, msg    # received


@pytest.mark.parametrize("op", OPS)
def test_x_zero_dim(op):
    with pytest.raises(ValueError, match=q("x")) as info:
        call(op, x=torch.tensor(1.0))
    assert "0-dim" in str(info.value)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(N, D + 2), (N, 1), (D,) + (D + 1,)], ids=str)
def test_x_width_mismatch(op, shape):
    """D of x and w1 disagree: the message says which D w1 should have had."""
    x = torch.randn(*shape)
    with pytest.raises(ValueError, match=q("w1")) as info:
        call(op, x=x)
    msg = str(info.value)
    assert f"(H, {shape[-1]})" in msg and f"({H}, {D})" in msg, msg


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(O, H + 1), (O, 1), (H,), (1, O, H)], ids=str)
def test_w2_bad_shape(op, shape):
    with pytest.raises(ValueError, match=q("w2")) as info:
        call(op, w2=torch.randn(*shape))
    msg = str(info.value)
    assert f"(O, {H})" in msg and str(tuple(shape)) in msg, msg


# ---------------------------------------------------------------------------
# Broadcasting: must broadcast to (*, H) / (*, O) without enlarging it.
BAD_B1 = [(N,), (H + 1,), (N + 1, H), (2, N, H), (1, 1, H), (H, 1)]
BAD_B2 = [(N,), (O + 1,), (N + 1, O), (2, N, O), (1, 1, O)]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", BAD_B1, ids=str)
def test_b1_does_not_broadcast(op, shape):
    with pytest.raises(ValueError, match=q("b1")) as info:
        call(op, b1=torch.randn(*shape))
    msg = str(info.value)
    assert str(tuple(shape)) in msg and f"({N}, {H})" in msg, msg


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", BAD_B2, ids=str)
def test_b2_does_not_broadcast(op, shape):
    with pytest.raises(ValueError, match=q("b2")) as info:
        call(op, b2=torch.randn(*shape))
    msg = str(info.value)
    assert str(tuple(shape)) in msg and f"({N}, {O})" in msg, msg


@pytest.mark.parametrize("shape", BAD_B2 + [(O, N)], ids=str)
def test_target_does_not_broadcast(shape):
    with pytest.raises(ValueError, match=q("target")) as info:
        call("mlp_loss", target=torch.randn(*shape))
    msg = str(info.value)
    assert str(tuple(shape)) in msg and f"({N}, {O})" in msg, msg


def test_target_of_shape_n_against_prediction_n_by_1():
    """The classic MSE pitfall: target (N,) against a prediction (N, 1) broadcasts to
    (N, N) natively; here it is an error."""
    x, w1, w2 = torch.randn(N, D), torch.randn(H, D), torch.randn(1, H)
    with pytest.raises(ValueError, match=q("target")) as info:
        fusedgrad.mlp_loss(x, w1, None, w2, None, torch.randn(N))
    msg = str(info.value)
    assert f"({N},)" in msg and f"({N}, 1)" in msg, msg


def test_bias_against_1d_x_must_not_add_a_dimension():
    x = torch.randn(D)
    with pytest.raises(ValueError, match=q("b1")) as info:
        fusedgrad.mlp_loss(x, torch.randn(H, D), torch.randn(1, H))
    assert f"(1, {H})" in str(info.value) and f"({H},)" in str(info.value)


def test_bias_against_3d_x():
    x = torch.randn(2, 3, D)
    with pytest.raises(ValueError, match=q("b1")) as info:
        fusedgrad.mlp_loss(x, torch.randn(H, D), torch.randn(2, H))  # (B, H) is not (T, H)
    assert f"(2, {H})" in str(info.value) and f"(2, 3, {H})" in str(info.value)


@pytest.mark.parametrize("op", OPS)
def test_b2_without_w2(op):
    with pytest.raises(ValueError, match=q("b2")) as info:
        call(op, w2=None)
    assert "w2" in str(info.value)


def test_target_width_without_w2():
    """Without w2 the prediction is (N, H): a target of width O ≠ H does not fit."""
    with pytest.raises(ValueError, match=q("target")) as info:
        call("mlp_loss", w2=None, b2=None)
    assert f"({N}, {O})" in str(info.value) and f"({N}, {H})" in str(info.value)


# ---------------------------------------------------------------------------
# dtypes
@pytest.mark.parametrize("op,name", op_args(["w1", "b1", "w2", "b2", "target"]))
def test_dtype_mismatch(op, name):
    args = good()
    with pytest.raises(TypeError, match=q(name)) as info:
        call(op, **{name: args[name].double()})
    msg = str(info.value)
    assert "torch.float64" in msg and "torch.float32" in msg, msg


@pytest.mark.parametrize("op", OPS)
def test_x_float64_rest_float32(op):
    args = good()
    with pytest.raises(TypeError, match=q("w1")) as info:
        call(op, x=args["x"].double())
    assert "torch.float64" in str(info.value) and "torch.float32" in str(info.value)


UNSUPPORTED = [torch.int64, torch.int32, torch.float16, torch.bfloat16, torch.complex64, torch.bool, torch.uint8]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", UNSUPPORTED, ids=str)
def test_unsupported_dtype_everywhere(op, dtype):
    """All arguments of one unsupported dtype: x is named, with the supported dtypes."""
    args = {k: v.to(dtype) for k, v in good().items()}
    if op == "mlp":
        args.pop("target")
    fn = getattr(fusedgrad, op)
    with pytest.raises(TypeError, match=q("x")) as info:
        fn(**args)
    msg = str(info.value)
    assert "torch.float32" in msg and "torch.float64" in msg and str(dtype) in msg, msg


@pytest.mark.parametrize("name", ["w1", "b1", "w2", "b2", "target"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.float16, torch.complex64, torch.bool], ids=str)
def test_unsupported_dtype_in_one_argument(name, dtype):
    args = good()
    with pytest.raises(TypeError, match=q(name)) as info:
        call("mlp_loss", **{name: args[name].to(dtype)})
    assert str(dtype) in str(info.value) and "torch.float32" in str(info.value)


# ---------------------------------------------------------------------------
# Devices and layouts
@pytest.mark.parametrize("op,name", op_args(["w1", "b1", "w2", "b2", "target"]))
def test_device_mismatch_meta(op, name):
    """One argument on the 'meta' device, the rest on cpu."""
    args = good()
    with pytest.raises(ValueError, match=q(name)) as info:
        call(op, **{name: args[name].to("meta")})
    msg = str(info.value)
    assert "meta" in msg and "cpu" in msg, msg


@pytest.mark.parametrize("op", OPS)
def test_device_mismatch_x_on_meta(op):
    args = good()
    with pytest.raises(ValueError, match=r"'(x|w1)'") as info:
        call(op, x=args["x"].to("meta"))
    msg = str(info.value)
    assert "meta" in msg and "cpu" in msg, msg


@pytest.mark.parametrize("op,name", op_args(["x", "w1", "b1", "w2", "b2", "target"]))
def test_sparse_layout(op, name):
    args = good()
    with pytest.raises(ValueError, match=q(name)) as info:
        call(op, **{name: args[name].to_sparse()})
    msg = str(info.value)
    assert "strided" in msg and "sparse" in msg, msg


# ---------------------------------------------------------------------------
# String options
@pytest.mark.parametrize("value", ["none", "avg", "MEAN", None, 1, ""], ids=repr)
def test_unknown_reduction(value):
    error = ValueError if isinstance(value, str) else TypeError  # a wrong type is a TypeError, as in torch
    with pytest.raises(error, match=q("reduction")) as info:
        call("mlp_loss", reduction=value)
    msg = str(info.value)
    assert "'mean'" in msg and "'sum'" in msg and repr(value) in msg, msg


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("value", ["softplus", "gelu_none", "Sigmoid", None, 0], ids=repr)
def test_unknown_activation(op, value):
    fn = getattr(fusedgrad, op)
    args = good()
    if op == "mlp":
        args.pop("target")
    error = ValueError if isinstance(value, str) else TypeError  # a wrong type is a TypeError, as in torch
    with pytest.raises(error, match=q("activation")) as info:
        fn(**args, activation=value)
    msg = str(info.value)
    assert all(f"'{name}'" in msg for name in fusedgrad.ACTIVATIONS) and repr(value) in msg, msg


@pytest.mark.parametrize("value", ["softplus", "Tanh"], ids=repr)
def test_unknown_activation_of_the_module(value):
    with pytest.raises(ValueError, match=r"^FusedMLP: argument 'activation' must be one of 'sigmoid', ") as info:
        fusedgrad.FusedMLP(2, 3, 1, activation=value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("value", [None, 3, torch.nn.Tanh()], ids=lambda v: type(v).__name__)
def test_activation_of_the_module_of_another_type(value):
    # a wrong type is a TypeError, as torch raises it
    with pytest.raises(TypeError, match=rf"^FusedMLP: argument 'activation' must be a str, one of 'sigmoid', .*"
                                        rf"got {type(value).__name__}$"):
        fusedgrad.FusedMLP(2, 3, 1, activation=value)


@pytest.mark.parametrize("value", ["softplus", 3])
def test_unknown_activation_of_the_raw_op(value):
    """The schema takes a string; the one C++ parser names the argument and lists every name."""
    x, w1 = torch.randn(4, 2), torch.randn(3, 2)
    error = ValueError if isinstance(value, str) else RuntimeError
    with pytest.raises(error) as info:
        torch.ops.fusedgrad.mlp_loss(x, w1, None, None, None, None, "mean", value)
    if isinstance(value, str):
        assert "argument 'activation' must be one of " in str(info.value)
        assert all(f"'{name}'" in str(info.value) for name in fusedgrad.ACTIVATIONS)


def test_options_are_keyword_only():
    args = good()
    with pytest.raises(TypeError):
        fusedgrad.mlp_loss(*args.values(), "sum")
    with pytest.raises(TypeError):
        fusedgrad.mlp(args["x"], args["w1"], args["b1"], args["w2"], args["b2"], "identity")


def test_module_loss_checks_arguments():
    net = fusedgrad.FusedMLP(D, H, O)
    with pytest.raises(ValueError, match=q("target")):
        net.loss(torch.randn(N, D), torch.randn(N))
    with pytest.raises(ValueError, match=q("reduction")):
        net.loss(torch.randn(N, D), torch.randn(N, O), reduction="none")
    with pytest.raises(TypeError, match=q("x")):
        net(torch.randn(N, D, dtype=torch.float64).numpy())
    # float64 input to a float32 module: x is what is wrong, the module's weights are fixed
    with pytest.raises(TypeError, match=r"^FusedMLP\.forward: argument 'x' has dtype torch\.float64 but the weights"):
        net(torch.randn(N, D, dtype=torch.float64))


# ---------------------------------------------------------------------------
# Wrong types are TypeErrors (as torch raises them), wrong values ValueErrors
def ensemble_args(K=2):
    return dict(x=torch.randn(N, D), w1=torch.randn(K, H, D), b1=None, w2=torch.randn(K, O, H), b2=None,
                target=torch.randn(N, O))


@pytest.mark.parametrize("models", ["one", "ensemble"])
@pytest.mark.parametrize("fn", ["mlp_loss", "mlp_loss_and_grads"])
@pytest.mark.parametrize("name,value", [("reduction", 1), ("reduction", None), ("activation", 0),
                                        ("activation", b"sigmoid")], ids=repr)
def test_option_of_a_wrong_type_is_a_type_error(models, fn, name, value):
    args = good() if models == "one" else ensemble_args()
    with pytest.raises(TypeError, match=rf"^fusedgrad\.{fn}: argument '{name}' must be a str, one of ") as info:
        getattr(fusedgrad, fn)(**args, **{name: value})
    assert f"got {type(value).__name__} {value!r}" in str(info.value), info.value


@pytest.mark.parametrize("wrt,received", [(5, "got int"), (["w1", 1], "got int 1"), ((None,), "got NoneType None")],
                         ids=repr)
def test_wrt_of_a_wrong_type_is_a_type_error(wrt, received):
    with pytest.raises(TypeError, match=r"^fusedgrad\.mlp_loss_and_grads: argument 'wrt' must ") as info:
        fusedgrad.mlp_loss_and_grads(**good(), wrt=wrt)
    assert received in str(info.value) and "'w1'" in str(info.value), info.value


def test_wrt_naming_an_unknown_argument_is_a_value_error():
    with pytest.raises(ValueError, match=r"^fusedgrad\.mlp_loss_and_grads: argument 'wrt' names unknown "):
        fusedgrad.mlp_loss_and_grads(**good(), wrt=("w1", "w3"))
