"""The activation table (csrc/common/activation.h): every activation, on every
kernel path, against torch.nn.functional in float64 to ~1e-12 (relative to the
whole tensor, as reference.assert_close_rel: where an activation saturates, its
derivative is a difference of nearly equal numbers, 1 − s² for tanh, exactly
as torch writes it, and one ulp of s there is all the difference), including
saturation and relu's kink (relu'(0) = 0, as torch's threshold_backward)."""
import pytest
import torch

import fusedgrad
from fusedgrad import _C
from reference import REF_ACTIVATIONS, assert_close_rel

F64 = torch.float64
# h values: the kink, tiny, moderate, saturating and huge, both signs.
SPECIAL = [0.0, -0.0, 1e-300, -1e-300, 1e-8, -1e-8, 0.5, -0.5, 1.0, -1.0, 3.0, -3.0, 20.0, -20.0, 40.0, -40.0,
           700.0, -700.0, 1e5, -1e5]


def test_the_table_and_the_reference_name_the_same_activations():
    assert fusedgrad.ACTIVATIONS[0] == "sigmoid"  # the default
    assert set(fusedgrad.ACTIVATIONS) == set(REF_ACTIVATIONS)
    assert len(set(fusedgrad.ACTIVATIONS)) == len(fusedgrad.ACTIVATIONS)


def _h(n_random):
    gen = torch.Generator().manual_seed(0)
    h = torch.cat([torch.tensor(SPECIAL, dtype=F64), 4 * torch.randn(n_random, generator=gen, dtype=F64)])
    return h.unsqueeze(1)  # (N, 1): x with w1 = [[1]], so h = x exactly


@pytest.fixture
def crossover(engine_crossover):
    """force(name): the GEMM path always for "gemm" (the engine's crossover at 0), else the default."""
    return lambda name: engine_crossover(0 if name == "gemm" else None)


@pytest.fixture(params=["engine", "engine-tall", "gemm"])
def path(request, crossover):
    """The kernel path the ops take: the any-depth engine (a few rows, and tall data: many row
    blocks), and the GEMM path (forced by moving the engine's crossover to 0). Each test asserts the
    path through fusedgrad._C.explain_op, the dispatch's own test."""
    crossover(request.param)
    n = {"engine": 30, "engine-tall": 20000, "gemm": 30}[request.param]
    yield request.param.split("-")[0], n


def rows_for(name, h):
    """(x, w1) with x w1ᵀ = h exactly: h itself with w1 = [[1]]."""
    return h, torch.ones(1, 1, dtype=h.dtype)


def assert_path(loss, expected, x, w1, w2=None, activation="sigmoid"):
    got = _C.explain_op(loss, x.detach(), w1, None, w2, None, None, activation)
    assert got == expected, f"the {'loss' if loss else 'forward'} op took {got!r}, the test means {expected!r}"


@pytest.mark.parametrize("activation", fusedgrad.ACTIVATIONS)
def test_value_and_derivative_match_torch(activation, path):
    name, n = path
    h = _h(n).requires_grad_()
    x, w1 = rows_for(name, h)
    one = torch.ones(1, 1, dtype=h.dtype)  # w2 = [[1]]: the prediction is act(h) itself
    assert_path(True, name, x, w1, one, activation=activation)
    assert_path(False, name, x, w1, one, activation=activation)
    act = REF_ACTIVATIONS[activation]
    pred = fusedgrad.mlp(x, w1, None, one, activation=activation)
    expected = act(h)
    assert_close_rel(pred, expected, 1e-12, "value")
    go = torch.linspace(-1, 1, h.numel(), dtype=F64).unsqueeze(1)
    (got,) = torch.autograd.grad(pred, h, go)
    (want,) = torch.autograd.grad(expected, h, go)
    assert_close_rel(got, want, 1e-12, "mlp derivative")
    # the loss op: L = Σ act(h)², dL/dh = 2 act(h) act'(h)
    loss = fusedgrad.mlp_loss(x, w1, None, one, reduction="sum", activation=activation)
    (got,) = torch.autograd.grad(loss, h)
    ref = (act(h) ** 2).sum()
    (want,) = torch.autograd.grad(ref, h)
    assert_close_rel(loss, ref, 1e-12, "loss")
    assert_close_rel(got, want, 1e-12, "loss derivative")
    # without a second layer (the GEMM path's alone): the prediction is act(h)
    assert_path(False, "gemm", x, w1, activation=activation)
    assert_close_rel(fusedgrad.mlp(x, w1, activation=activation), expected, 1e-12, "value without w2")


def test_relu_derivative_at_zero_is_zero():
    h = torch.tensor([[0.0], [-0.0], [1.0]], dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(fusedgrad.mlp(h, torch.ones(1, 1, dtype=F64), activation="relu").sum(), h)
    assert g.flatten().tolist() == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("name", ["gemm", "engine"])
def test_float32_sigmoid_within_two_ulp(name, crossover):
    """σ in float32 (cpu_vector.h: vec_exp's degree-6 polynomial, measured within 2 ulp
    of the correctly rounded σ over every float in [−87, 88]) on each forward path, over
    a dense grid of h and the special values: mlp(x) with x w1ᵀ = h and w2 = [[1]] is σ(h) exactly."""
    crossover(name)
    n = 20000
    h = torch.cat([torch.linspace(-87, 88, 200_001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 17.0, -17.0])])
    ones = torch.ones(1, 1)
    x, w1 = rows_for(name, h.unsqueeze(1))
    assert_path(False, name, x[:n], w1, ones)
    out = torch.cat([fusedgrad.mlp(x[i:i + n], w1, None, ones) for i in range(0, len(x), n)]).flatten()
    exact = torch.sigmoid(h.double()).float()  # correctly rounded (double, then one rounding)
    ulp = (out.view(torch.int32).long() - exact.view(torch.int32).long()).abs()
    assert ulp.max().item() <= 2, f"{ulp.max().item()} ulp at h = {h[ulp.argmax()].item()}"
    assert out[h > 17].min() > 0.99999 and out[h < -87 + 1e-3].max() < 2e-38  # saturation, no NaN


@pytest.mark.parametrize("name", ["gemm", "engine"])
def test_float32_tanh_within_six_ulp(name, crossover):
    """tanh in float32 (cpu_vector.h: tanh_rational, z P(z²)/Q(z²), measured within 5.5 ulp of the
    correctly rounded tanh over every float in [0, 10]) on each forward path, over a dense grid and
    the special values; |tanh| ≤ 1 everywhere, so the derivative 1 − tanh² is never negative."""
    crossover(name)
    n = 20000
    special = [0.0, 1e-30, -1e-30, 1e-4, -1e-4, 9.0, -9.0, 9.02, -9.02, 30.0, -30.0, float("inf"), float("-inf")]
    h = torch.cat([torch.linspace(-10, 10, 400_001), torch.tensor(special)])
    ones = torch.ones(1, 1)
    x, w1 = rows_for(name, h.unsqueeze(1))
    assert_path(False, name, x[:n], w1, ones, activation="tanh")
    out = torch.cat([fusedgrad.mlp(x[i:i + n], w1, None, ones, activation="tanh") for i in range(0, len(x), n)]).flatten()
    exact = torch.tanh(h.double()).float()  # correctly rounded (double, then one rounding)
    ulp = (out.view(torch.int32).long() - exact.view(torch.int32).long()).abs()
    assert ulp.max().item() <= 6, f"{ulp.max().item()} ulp at h = {h[ulp.argmax()].item()}"
    assert out.abs().max().item() <= 1.0
    assert torch.equal(out[h.abs() > 9.02], torch.sign(h[h.abs() > 9.02]))  # saturated exactly, inf included
    # the derivative through the op's backward: never negative, 0 where tanh is ±1
    hh = torch.linspace(-30, 30, 6001, requires_grad=True)
    xg, wg = rows_for(name, hh.unsqueeze(1))
    (g,) = torch.autograd.grad(fusedgrad.mlp(xg, wg, None, ones, activation="tanh").sum(), hh)
    assert g.min().item() >= 0 and g[hh.detach().abs() > 9.02].abs().max().item() == 0


@pytest.mark.parametrize("activation", fusedgrad.ACTIVATIONS)
def test_float32(activation):
    gen = torch.Generator().manual_seed(1)
    x, t = torch.randn(64, 4, generator=gen), torch.randn(64, 2, generator=gen)
    w1 = torch.randn(8, 4, generator=gen, requires_grad=True)
    w2 = torch.randn(2, 8, generator=gen, requires_grad=True)
    fused = torch.autograd.grad(fusedgrad.mlp_loss(x, w1, None, w2, None, t, activation=activation), (w1, w2))
    native = torch.autograd.grad(((REF_ACTIVATIONS[activation](x @ w1.T) @ w2.T - t) ** 2).mean(), (w1, w2))
    for a, b in zip(fused, native):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("activation", fusedgrad.ACTIVATIONS)
def test_ensemble_ops_take_every_activation(activation):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 2, generator=gen, dtype=F64)
    w1 = torch.randn(3, 4, 2, generator=gen, dtype=F64, requires_grad=True)
    pred = fusedgrad.mlp(x, w1, activation=activation)  # no w2: the activations output holds h where needed
    expected = REF_ACTIVATIONS[activation](x @ w1.transpose(1, 2))
    assert_close_rel(pred, expected, 1e-12, "ensemble value")
    go = torch.randn(pred.shape, generator=gen, dtype=F64)
    assert_close_rel(torch.autograd.grad(pred, w1, go)[0], torch.autograd.grad(expected, w1, go)[0], 1e-12,
                     "ensemble dw1")


# The trainer's kernels (fusedgrad.explain asserts each): (1, 20, 1) takes the compile-time kernel with σ
# and the run-time-width one otherwise, (32, 160, 8) and (32, 64, 8) the any-depth engine (a layer
# wider than 128, and not).
TRAINER_SHAPES = {(1, 20, 1): None, (32, 160, 8): "trainer-engine", (32, 64, 8): "trainer-engine"}


@pytest.mark.parametrize("shape", list(TRAINER_SHAPES), ids=["narrow", "engine-160", "engine"])
@pytest.mark.parametrize("activation", fusedgrad.ACTIVATIONS)
def test_trainer_trains_every_activation_as_the_reference_loop(activation, shape):
    """fusedgrad.Trainer honours FusedMLP(activation=...): 20 Adam steps (the first full batch,
    then mini-batches) equal Linear → activation → Linear trained by loss.backward(); opt.step()."""
    import copy

    from fusedgrad.module import activation_module

    D, H, O = shape
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(70, D, generator=gen, dtype=F64)
    y = torch.randn(70, O, generator=gen, dtype=F64)
    torch.manual_seed(0)
    net = fusedgrad.FusedMLP(D, H, O, activation=activation, dtype=F64)
    ref = copy.deepcopy(net)
    model = torch.nn.Sequential(ref.linear1, activation_module(activation), ref.linear2)
    opt, ropt = torch.optim.Adam(net.parameters(), lr=0.02), torch.optim.Adam(ref.parameters(), lr=0.02)
    trainer = fusedgrad.Trainer(net, opt)
    expected_path = TRAINER_SHAPES[shape] or ("trainer-narrow-fixed" if activation == "sigmoid" else "trainer-narrow")
    assert fusedgrad.explain(trainer, x, y)["path"] == expected_path
    losses = [trainer.step(x, y)] + list(trainer.fit(x, y, 19, batch_size=32, shuffle=False))
    ref_losses = []
    for step in range(20):
        rows = slice(None) if step == 0 else slice(((step - 1) % 3) * 32, ((step - 1) % 3) * 32 + 32)
        ropt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x[rows]), y[rows])
        loss.backward()
        ropt.step()
        ref_losses.append(loss.detach())
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), rtol=1e-10, atol=0)
    for a, b in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)
