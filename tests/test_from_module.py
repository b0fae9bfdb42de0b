"""FusedMLP.from_module: converting an existing Linear → Sigmoid → Linear model."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedgrad
from fusedgrad import FusedMLP
from reference import REF_MODULES

DTYPE = torch.float64
RTOL = 1e-12


class Net(nn.Module):
    """The GUIDE's / notebooks' model."""

    def __init__(self, n_feature, n_hidden, n_output, bias=True):
        super().__init__()
        self.linear1 = nn.Linear(n_feature, n_hidden, bias=bias)
        self.sigmoid = nn.Sigmoid()
        self.linear2 = nn.Linear(n_hidden, n_output, bias=bias)

    def forward(self, x):
        return self.linear2(self.sigmoid(self.linear1(x)))


class ReluNet(Net):
    """Right children, wrong forward: the Sigmoid child is not what it applies."""

    def forward(self, x):
        return self.linear2(torch.relu(self.linear1(x)))


def seq(d=3, h=5, o=2, bias1=True, bias2=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, h, bias=bias1), nn.Sigmoid(), nn.Linear(h, o, bias=bias2)).to(DTYPE)


def data(n=7, d=3, o=2):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, d, generator=gen, dtype=DTYPE), torch.randn(n, o, generator=gen, dtype=DTYPE)


def assert_same_function(model, net):
    x, t = data(d=net.linear1.in_features, o=net.linear2.out_features)
    torch.testing.assert_close(net(x), model(x), rtol=RTOL, atol=0)
    torch.testing.assert_close(net.loss(x, t), F.mse_loss(model(x), t), rtol=RTOL, atol=0)


@pytest.mark.parametrize("copy", [False, True])
def test_sequential(copy):
    model = seq()
    net = FusedMLP.from_module(model, copy=copy)
    assert isinstance(net, FusedMLP)
    assert (net.linear1 is model[0]) == (not copy) and (net.linear2 is model[2]) == (not copy)
    assert_same_function(model, net)
    for ours, theirs in zip(net.parameters(), model.parameters()):
        assert (ours is theirs) == (not copy)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        assert ours.requires_grad


@pytest.mark.parametrize("copy", [False, True])
@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])
@pytest.mark.parametrize("bias", [True, False])
def test_a_fused_mlp_converts_to_itself(copy, activation, bias):
    """from_module(FusedMLP) (what FusedMLPEnsemble.from_modules accepts too): the same layers,
    shared or copied, the same activation, the same function; training mode kept."""
    model = FusedMLP(3, 5, 2, bias=bias, dtype=DTYPE, activation=activation).eval()
    net = FusedMLP.from_module(model, copy=copy)
    assert net is not model and net.activation == activation and not net.training
    assert (net.linear1 is model.linear1) == (not copy) and (net.linear2 is model.linear2) == (not copy)
    x = torch.randn(7, 3, dtype=DTYPE)
    torch.testing.assert_close(net(x), model(x), rtol=0, atol=0)
    assert net.state_dict().keys() == model.state_dict().keys()


def test_shared_weights_train_together():
    model = seq()
    before = [p.detach().clone() for p in model.parameters()]
    net = FusedMLP.from_module(model)
    x, t = data()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        net.loss(x, t).backward()
        opt.step()
    for p, b in zip(model.parameters(), before):
        assert (p - b).abs().max() > 1e-3  # the original model was trained through the fused one
    assert_same_function(model, net)


def test_copied_weights_are_independent():
    model = seq()
    before = [p.detach().clone() for p in model.parameters()]
    net = FusedMLP.from_module(model, copy=True)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    for p, b in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=0)


def test_gradients_match_the_original_model():
    model = seq()
    net = FusedMLP.from_module(model, copy=True)
    x, t = data()
    F.mse_loss(model(x), t).backward()
    net.loss(x, t).backward()
    for ours, theirs in zip(net.parameters(), model.parameters()):
        assert theirs.grad.abs().max() > 1e-3
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=RTOL, atol=1e-15)


def test_guide_net_and_state_dict():
    torch.manual_seed(0)
    model = Net(1, 20, 1).to(DTYPE)
    net = FusedMLP.from_module(model)
    assert_same_function(model, net)
    assert net.state_dict().keys() == model.state_dict().keys()
    fresh = Net(1, 20, 1).to(DTYPE)
    fresh.load_state_dict(net.state_dict())  # and back
    assert_same_function(fresh, net)


@pytest.mark.parametrize("bias1,bias2", [(False, True), (True, False), (False, False)])
def test_bias_on_one_layer_only(bias1, bias2):
    model = seq(bias1=bias1, bias2=bias2)
    net = FusedMLP.from_module(model)
    assert (net.linear1.bias is None) == (not bias1) and (net.linear2.bias is None) == (not bias2)
    assert_same_function(model, net)


def test_float32_and_training_mode():
    model = seq().float().eval()
    net = FusedMLP.from_module(model)
    assert net.linear1.weight.dtype == torch.float32 and not net.training
    x = data()[0].float()
    torch.testing.assert_close(net(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model,match", [
    (nn.Sequential(nn.Linear(3, 5), nn.Softplus(), nn.Linear(5, 2)), r"children \(0: Linear, 1: Softplus, 2: Linear\)"),
        (nn.Sequential(nn.Linear(3, 5), nn.LeakyReLU(), nn.Linear(5, 2)), r"1: LeakyReLU"),
    (nn.Sequential(nn.Sigmoid(), nn.Linear(3, 5), nn.Linear(5, 2)), r"\(0: Sigmoid, 1: Linear, 2: Linear\)"),
    (nn.Sequential(nn.Linear(3, 5), nn.Sigmoid()), r"nn.Linear layers with one activation module between each two.*\(0: Linear, 1: Sigmoid\)"),
    (nn.Sequential(nn.Linear(3, 5), nn.Sigmoid(), nn.Linear(5, 2), nn.Sigmoid()), r"3: Sigmoid"),
    (nn.Linear(3, 5), r"has children \(none\)"),
    (nn.Sequential(nn.Linear(3, 5), nn.Sigmoid(), nn.Sequential(nn.Linear(5, 2))), r"2: Sequential"),
], ids=["softplus", "leaky_relu", "order", "two", "four", "leaf", "nested"])
def test_wrong_structure_is_refused(model, match):
    with pytest.raises(ValueError, match=match):
        FusedMLP.from_module(model)


def test_mismatched_widths_are_refused():
    model = nn.Sequential(nn.Linear(3, 5), nn.Sigmoid(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"'0' has out_features=5 but the next layer '2' has in_features=4"):
        FusedMLP.from_module(model)


def test_other_forward_is_refused():
    with pytest.raises(ValueError, match=r"ReluNet .*does not compute linear2\(sigmoid\(linear1\(x\)\)\)"):
        FusedMLP.from_module(ReluNet(3, 5, 2).to(DTYPE))


def test_linear_subclass_is_refused():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(ValueError, match=r"0: Scaled"):
        FusedMLP.from_module(nn.Sequential(Scaled(3, 5), nn.Sigmoid(), nn.Linear(5, 2)))


def test_not_a_module_or_unsupported_dtype():
    with pytest.raises(TypeError, match="expected an nn.Module, got list"):
        FusedMLP.from_module([nn.Linear(3, 5), nn.Sigmoid(), nn.Linear(5, 2)])
    with pytest.raises(TypeError, match="float32 and float64, the model has torch.float16"):
        FusedMLP.from_module(seq().half())
    mixed = seq()
    mixed[2].float()
    with pytest.raises(TypeError, match="share one dtype"):
        FusedMLP.from_module(mixed)


# ---------------------------------------------------------------------------
# Every activation of the table (fusedgrad.ACTIVATIONS), from its torch.nn module.
@pytest.mark.parametrize("activation", fusedgrad.ACTIVATIONS)
def test_round_trip_every_activation(activation):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), REF_MODULES[activation](), nn.Linear(5, 2)).to(DTYPE)
    net = FusedMLP.from_module(model, copy=True)
    assert net.activation == activation and f"activation={activation} (fused)" in repr(net)
    x = torch.randn(7, 3, dtype=DTYPE)
    t = torch.randn(7, 2, dtype=DTYPE)
    torch.testing.assert_close(net(x), model(x), rtol=1e-12, atol=1e-12)
    net.loss(x, t).backward()
    nn.functional.mse_loss(model(x), t).backward()
    for (name, fused), native in zip(net.named_parameters(), model.parameters()):
        torch.testing.assert_close(fused.grad, native.grad, rtol=1e-12, atol=1e-12, msg=name)
    # the state_dict is the plain two layers', whatever the activation
    plain = FusedMLP(3, 5, 2, dtype=DTYPE, activation=activation)
    plain.load_state_dict(net.state_dict())
    assert set(net.state_dict()) == {"linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"}
    torch.testing.assert_close(plain(x), net(x), rtol=0, atol=0)


@pytest.mark.parametrize("activation", fusedgrad.ACTIVATIONS)
def test_custom_forward_with_every_activation(activation):
    class ActNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear1, self.act, self.linear2 = nn.Linear(3, 5), REF_MODULES[activation](), nn.Linear(5, 2)

        def forward(self, x):
            return self.linear2(self.act(self.linear1(x)))

    model = ActNet().to(DTYPE)
    assert FusedMLP.from_module(model).activation == activation


def test_gelu_forms_and_a_module_computing_another_activation():
    assert FusedMLP.from_module(nn.Sequential(nn.Linear(2, 3), nn.GELU(), nn.Linear(3, 1))).activation == "gelu"
    tanh_form = nn.Sequential(nn.Linear(2, 3), nn.GELU(approximate="tanh"), nn.Linear(3, 1))
    assert FusedMLP.from_module(tanh_form).activation == "gelu_tanh"

    class TanhNet(nn.Module):  # a Tanh child, but the forward applies sigmoid
        def __init__(self):
            super().__init__()
            self.linear1, self.tanh, self.linear2 = nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)

        def forward(self, x):
            return self.linear2(torch.sigmoid(self.linear1(x)))

    with pytest.raises(ValueError, match=r"TanhNet has Linear, Tanh, Linear children but its forward does not "
                                         r"compute linear2\(tanh\(linear1\(x\)\)\)"):
        FusedMLP.from_module(TanhNet())
