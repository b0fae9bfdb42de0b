"""FusedMLPEnsemble: K stacked Linear → Sigmoid → Linear models in one module."""
import math

import pytest
import torch
from torch import nn

import fusedgrad
from fusedgrad import FusedMLP, FusedMLPEnsemble

F64 = torch.float64


class Net(nn.Module):
    """The reference model of the notebooks."""

    def __init__(self, n_feature, n_hidden, n_output, bias=True, dtype=None):
        super().__init__()
        self.linear1 = nn.Linear(n_feature, n_hidden, bias=bias, dtype=dtype)
        self.sigmoid = nn.Sigmoid()
        self.linear2 = nn.Linear(n_hidden, n_output, bias=bias, dtype=dtype)

    def forward(self, x):
        return self.linear2(self.sigmoid(self.linear1(x)))


def test_parameters_names_shapes_and_attributes():
    ens = FusedMLPEnsemble(5, 3, 7, 2)
    shapes = {name: tuple(p.shape) for name, p in ens.named_parameters()}
    assert shapes == {"weight1": (5, 7, 3), "bias1": (5, 7), "weight2": (5, 2, 7), "bias2": (5, 2)}
    w1, b1, w2, b2 = ens._params()
    assert w1 is ens.weight1 and b1 is ens.bias1 and w2 is ens.weight2 and b2 is ens.bias2
    assert (ens.num_models, ens.in_features, ens.hidden_features, ens.out_features) == (5, 3, 7, 2)
    assert repr(ens) == ("FusedMLPEnsemble(num_models=5, in_features=3, hidden_features=7, out_features=2, "
                         "bias=True, activation=sigmoid (fused))")
    nb = FusedMLPEnsemble(2, 3, 4, 1, bias=False, dtype=F64)
    assert nb.bias1 is None and nb.bias2 is None and nb.weight1.dtype == F64
    assert [n for n, _ in nb.named_parameters()] == ["weight1", "weight2"]


@pytest.mark.parametrize("bias", [True, False])
def test_member_k_is_initialised_as_its_own_linears_drawn_in_order(bias):
    torch.manual_seed(123)
    ens = FusedMLPEnsemble(4, 3, 6, 2, bias=bias)
    torch.manual_seed(123)
    nets = [FusedMLP(3, 6, 2, bias=bias) for _ in range(4)]
    for k, net in enumerate(nets):
        for key, value in net.state_dict().items():
            assert torch.equal(ens.module(k).state_dict()[key], value), (k, key)
    # The distribution is nn.Linear's: |w| < 1/sqrt(fan_in).
    assert ens.weight1.abs().max() <= 1 / math.sqrt(3) and ens.weight2.abs().max() <= 1 / math.sqrt(6)


def test_forward_and_loss_shapes_and_values():
    torch.manual_seed(0)
    ens = FusedMLPEnsemble(3, 2, 5, 4, dtype=F64)
    nets = ens.to_modules()
    x = torch.randn(7, 2, dtype=F64)
    t = torch.randn(7, 4, dtype=F64)
    pred = ens(x)
    assert pred.shape == (3, 7, 4)
    for k, net in enumerate(nets):
        torch.testing.assert_close(pred[k], net(x), rtol=1e-12, atol=0)
    loss = ens.loss(x, t, reduction="sum")
    assert loss.shape == (3,)
    for k, net in enumerate(nets):
        torch.testing.assert_close(loss[k], nn.MSELoss(reduction="sum")(net(x), t), rtol=1e-12, atol=0)
    # Per-model data: (K, N, D), (K, N, O).
    xs, ts = torch.randn(3, 7, 2, dtype=F64), torch.randn(3, 7, 4, dtype=F64)
    loss = ens.loss(xs, ts)
    for k, net in enumerate(nets):
        torch.testing.assert_close(loss[k], nn.MSELoss()(net(xs[k]), ts[k]), rtol=1e-12, atol=0)
    assert ens(xs).shape == (3, 7, 4)


def native_train(net, x, y, steps, lr):
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        nn.MSELoss()(net(x), y).backward()
        opt.step()
    return net


@pytest.mark.parametrize("per_model_data", [False, True])
def test_training_with_one_adam_equals_each_model_trained_alone(per_model_data):
    """loss.sum().backward() + one Adam over the stacked parameters = K independent trainings."""
    K, steps = 4, 20
    torch.manual_seed(1)
    ens = FusedMLPEnsemble(K, 1, 20, 1, dtype=F64)
    nets = [Net(1, 20, 1, dtype=F64) for _ in range(K)]
    for k, net in enumerate(nets):
        net.load_state_dict(ens.module(k).state_dict())
    x = torch.linspace(-1, 1, 100, dtype=F64).unsqueeze(1)
    y = x.pow(2) + 0.2 * torch.rand(x.shape, dtype=F64)
    if per_model_data:
        x = x + 0.1 * torch.randn(K, 100, 1, dtype=F64)
        y = y + 0.1 * torch.randn(K, 100, 1, dtype=F64)
    opt = torch.optim.Adam(ens.parameters(), lr=0.2)
    for _ in range(steps):
        opt.zero_grad()
        ens.loss(x, y).sum().backward()
        opt.step()
    for k, net in enumerate(nets):
        native_train(net, x[k] if per_model_data else x, y[k] if per_model_data else y, steps, 0.2)
        trained = ens.module(k).state_dict()
        for key, value in net.state_dict().items():
            err = (trained[key] - value).abs().max().item()
            assert err <= 1e-10 * max(1.0, value.abs().max().item()), (k, key, err)


def test_from_modules_to_modules_round_trip_with_net_state_dict():
    torch.manual_seed(2)
    members = [Net(3, 8, 2), nn.Sequential(nn.Linear(3, 8), nn.Sigmoid(), nn.Linear(8, 2)), FusedMLP(3, 8, 2)]
    ens = FusedMLPEnsemble.from_modules(members)
    assert (ens.num_models, ens.in_features, ens.hidden_features, ens.out_features) == (3, 3, 8, 2)
    x = torch.randn(5, 3)
    pred = ens(x)
    for k, m in enumerate(members):
        torch.testing.assert_close(pred[k], m(x))
    # Copies: training the ensemble leaves the members alone.
    before = members[0].linear1.weight.detach().clone()
    with torch.no_grad():
        ens.weight1.add_(1.0)
    assert torch.equal(members[0].linear1.weight, before)
    with torch.no_grad():
        ens.weight1.sub_(1.0)
    back = ens.to_modules()
    assert all(type(m) is FusedMLP for m in back)
    for k, m in enumerate(back):
        net = Net(3, 8, 2)
        net.load_state_dict(m.state_dict())  # strict: linear1.* / linear2.* keys
        torch.testing.assert_close(net(x), members[k](x))
        assert m.linear1.weight.data_ptr() != ens.weight1.data_ptr()
    again = FusedMLPEnsemble.from_modules(back)
    for a, b in zip(again._params(), ens._params()):
        assert torch.equal(a, b)


def test_from_modules_without_biases_and_module_index():
    members = [Net(2, 3, 1, bias=False, dtype=F64) for _ in range(2)]
    ens = FusedMLPEnsemble.from_modules(members)
    assert ens.bias1 is None and ens.bias2 is None and ens.weight1.dtype == F64
    m = ens.module(-1)
    assert m.linear1.bias is None and set(m.state_dict()) == {"linear1.weight", "linear2.weight"}
    Net(2, 3, 1, bias=False, dtype=F64).load_state_dict(m.state_dict())
    with pytest.raises(IndexError, match=r"FusedMLPEnsemble\.module: model index 2 out of range for 2 models"):
        ens.module(2)


def test_from_modules_errors():
    with pytest.raises(ValueError, match=r"^FusedMLPEnsemble\.from_modules: needs at least one model"):
        FusedMLPEnsemble.from_modules([])
    with pytest.raises(ValueError, match=r"^FusedMLPEnsemble\.from_modules: model 1 is 3→5→2 but model 0 is "
                                         r"3→4→2; all models must have the same widths$"):
        FusedMLPEnsemble.from_modules([Net(3, 4, 2), Net(3, 5, 2)])
    with pytest.raises(ValueError, match=r"model 1 has biases \(linear1: False, linear2: False\) but model 0 has "
                                         r"\(linear1: True, linear2: True\)"):
        FusedMLPEnsemble.from_modules([Net(3, 4, 2), Net(3, 4, 2, bias=False)])
    with pytest.raises(TypeError, match=r"^FusedMLPEnsemble\.from_modules: model 1 has dtype torch\.float64 but "
                                        r"model 0 has torch\.float32; all models must share one dtype$"):
        FusedMLPEnsemble.from_modules([Net(3, 4, 2), Net(3, 4, 2, dtype=F64)])
    meta = FusedMLP(3, 4, 2, device="meta")
    with pytest.raises(ValueError, match=r"model 1 is on device meta but model 0 is on cpu"):
        FusedMLPEnsemble.from_modules([Net(3, 4, 2), meta])
    with pytest.raises(ValueError, match=r"^FusedMLPEnsemble\.from_modules: model 1: FusedMLP\.from_module: the "
                                         r"model must consist of nn\.Linear layers with one activation module between each two"):
        FusedMLPEnsemble.from_modules([Net(3, 4, 2), nn.Sequential(nn.Linear(3, 4), nn.Softplus(), nn.Linear(4, 2))])
    with pytest.raises(ValueError, match=r"^FusedMLPEnsemble\.from_modules: model 1 has activation 'relu' but "
                                         r"model 0 has 'sigmoid'; all models must have the same activation"):
        FusedMLPEnsemble.from_modules([Net(3, 4, 2), nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))])
    with pytest.raises(TypeError, match=r"model 0: FusedMLP\.from_module: expected an nn\.Module, got int"):
        FusedMLPEnsemble.from_modules([3])


def test_constructor_errors_and_meta():
    with pytest.raises(ValueError, match=r"FusedMLPEnsemble: num_models must be a non-negative int, got -1"):
        FusedMLPEnsemble(-1, 2, 3, 1)
    ens = FusedMLPEnsemble(3, 2, 4, 1, device="meta")
    assert ens.weight1.device.type == "meta"
    assert ens.loss(torch.empty(5, 2, device="meta"), torch.empty(5, 1, device="meta")).shape == (3,)


def test_exported():
    assert fusedgrad.FusedMLPEnsemble is FusedMLPEnsemble and "FusedMLPEnsemble" in fusedgrad.__all__


def test_ensemble_bench_quick_runs():
    """The --ensemble benchmark end to end on a tiny case (routes agree; nothing about speed)."""
    from fusedgrad.bench import ensemble as E

    rows, routes = E.run_ensemble_bench(quick=True, progress=lambda _: None)
    assert {"loop", "func", "fused"} <= set(routes)
    (row,) = rows
    assert row["K"] == 4 and all(v > 0 for v in row["us_per_model_step"].values())
    table = E.markdown(rows, routes).splitlines()
    assert table[0].startswith("| problem | K |") and table[2].startswith("| 100×1→20→1 | 4 |")
