"""vmap over the fused modules runs the fused kernels through the ops' vmap rules (fusedgrad/deep.py):
stacked parameters (torch.func's model-ensembling recipe) run the ensemble kernel in one call,
batched data the plain kernel in one call — no per-sample fallback, no warning — equal to each
model run alone (float64); under transforms that differentiate around vmap the rule's plain
torch ops run, and are exact too."""
import copy
import warnings

import pytest
import torch
from torch.func import functional_call, grad, stack_module_state, vmap

import fusedgrad
from fusedgrad import deep
from test_derivatives import DerivativesModule

TOL = 1e-12


@pytest.fixture
def op_calls(monkeypatch):
    """How many times the fused ops ran (forward and derivatives), counted at the op."""
    calls = {"mlp": 0, "derivatives": 0}
    mlp_op, derivatives_op = deep._mlp_op, deep._derivatives_op

    def counting_mlp(*args):
        calls["mlp"] += 1
        return mlp_op(*args)

    def counting_derivatives(*args):
        calls["derivatives"] += 1
        return derivatives_op(*args)

    monkeypatch.setattr(deep, "_mlp_op", counting_mlp)
    monkeypatch.setattr(deep, "_derivatives_op", counting_derivatives)
    return calls


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


def models_of(K, hidden_layers, activation, D=2, O=2):
    torch.manual_seed(hidden_layers)
    return [fusedgrad.FusedMLP(D, 9, O, hidden_layers=hidden_layers, activation=activation).double()
            for _ in range(K)]


@pytest.mark.parametrize("hidden_layers, activation", [(1, "sigmoid"), (3, "tanh"), (2, "relu")])
@pytest.mark.parametrize("per_model_x", [False, True])
def test_model_ensembling_recipe_runs_one_fused_call(op_calls, hidden_layers, activation, per_model_x):
    K = 5
    models = models_of(K, hidden_layers, activation)
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(K, 7, 2, dtype=torch.float64) if per_model_x else torch.randn(7, 2, dtype=torch.float64)

    def call(p, b, xx):
        return functional_call(base, (p, b), (xx,))

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "no batching rule" fallback warning
        out = vmap(call, in_dims=(0, 0, 0 if per_model_x else None))(params, buffers, x)
    assert op_calls["mlp"] == 1
    expected = torch.stack([m(x[k] if per_model_x else x) for k, m in enumerate(models)])
    assert out.shape == (K, 7, 2) and rel_err(out, expected) <= TOL
    cot = torch.randn_like(out)
    (out * cot).sum().backward()
    (expected * cot).sum().backward()
    for name, stacked in params.items():
        per_model = torch.stack([dict(m.named_parameters())[name].grad for m in models])
        assert rel_err(stacked.grad, per_model) <= TOL, name


@pytest.mark.parametrize("hidden_layers", [1, 3])
def test_vmap_over_data_runs_the_plain_kernel_once(op_calls, hidden_layers):
    net = models_of(1, hidden_layers, "tanh")[0]
    xb = torch.randn(4, 6, 2, dtype=torch.float64, requires_grad=True)
    out = vmap(net)(xb)
    assert op_calls["mlp"] == 1
    assert rel_err(out, net(xb)) <= TOL
    g_vmap = torch.autograd.grad(out.sum(), [xb, *net.parameters()])
    g_plain = torch.autograd.grad(net(xb).sum(), [xb, *net.parameters()])
    for a, b in zip(g_vmap, g_plain):
        assert rel_err(a, b) <= TOL


def test_nested_vmap(op_calls):
    net = models_of(1, 2, "silu")[0]
    xb = torch.randn(3, 4, 5, 2, dtype=torch.float64)
    out = vmap(vmap(net))(xb)
    assert op_calls["mlp"] == 1  # both levels' batch dimensions become rows of one plain call
    assert rel_err(out, net(xb)) <= TOL


@pytest.mark.parametrize("hidden_layers", [1, 3])
def test_grad_around_vmap_is_exact(hidden_layers):
    """grad outside vmap: the rule sees tensors grad still wraps and computes in plain torch ops."""
    K = 3
    models = models_of(K, hidden_layers, "tanh")
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(6, 2, dtype=torch.float64)

    def loss(p):
        return vmap(lambda pp, bb: functional_call(base, (pp, bb), (x,)), in_dims=(0, 0))(p, buffers).pow(2).sum()

    got = grad(loss)({k: v.detach() for k, v in params.items()})
    expected = sum(m(x).pow(2).sum() for m in models)
    expected.backward()
    for name, g in got.items():
        per_model = torch.stack([dict(m.named_parameters())[name].grad for m in models])
        assert rel_err(g, per_model) <= TOL, name


def test_vmap_of_grad_per_model_training_step():
    """The torch.func ensembling of a training step: vmap(grad(loss)) — exact."""
    K = 4
    models = models_of(K, 2, "sigmoid")
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x, y = torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)

    def loss(p, b):
        return torch.nn.functional.mse_loss(functional_call(base, (p, b), (x,)), y)

    got = vmap(grad(loss))({k: v.detach() for k, v in params.items()}, buffers)
    for k, m in enumerate(models):
        torch.nn.functional.mse_loss(m(x), y).backward()
        for name, p in m.named_parameters():
            assert rel_err(got[name][k], p.grad) <= TOL


def test_derivatives_under_vmap_run_the_stacked_jet_pass(op_calls):
    K = 4
    models = models_of(K, 3, "tanh", O=1)
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = torch.rand(10, 2, dtype=torch.float64)

    wrapper = DerivativesModule(base)
    prefixed = {f"net.{k}": v for k, v in params.items()}
    u, du, d2u = vmap(lambda p: functional_call(wrapper, p, (x,)))(prefixed)
    assert op_calls["derivatives"] == 1
    assert u.shape == (K, 10, 1) and du.shape == (K, 10, 1, 2) and d2u.shape == (K, 10, 1, 2)
    for k, m in enumerate(models):
        for got, expected in zip((u[k], du[k], d2u[k]), m.derivatives(x, order=2)):
            assert rel_err(got, expected) <= TOL
