"""torch.func over fusedgrad: grad, vjp, jacrev, jacrev(jacrev), hessian, vmap and the model-ensembling
recipe (stack_module_state + vmap(functional_call)) give what they give over the plain nn.Sequential —
under a transform the network runs in plain torch ops (fusedgrad/_compat.py: under_functorch); outside
one, the fused kernels still run."""
import copy

import pytest
import torch
from torch.func import functional_call, grad, hessian, jacrev, stack_module_state, vjp, vmap

import fusedgrad

F64 = torch.float64


def nets(hidden, act):
    torch.manual_seed(0)
    net = fusedgrad.FusedMLP(2, hidden, 1, activation=act, dtype=F64)
    return net, net.to_module(copy=True)


def rename(params, net, ref):
    return dict(zip((n for n, _ in ref.named_parameters()), params.values()))


CASES = [(6, "tanh"), (6, "sigmoid"), ([6, 5], "tanh"), ([5, 4, 3], "gelu"), ([4, 4], "silu")]


@pytest.mark.parametrize("hidden,act", CASES)
def test_grad_and_vjp_of_the_loss_and_prediction(hidden, act):
    net, ref = nets(hidden, act)
    x, y = torch.randn(9, 2, dtype=F64), torch.randn(9, 1, dtype=F64)
    params = dict(net.named_parameters())
    got = grad(lambda p: functional_call(net, p, (x,)).sin().sum())(params)
    want = grad(lambda p: functional_call(ref, p, (x,)).sin().sum())(rename(params, net, ref))
    for g, w in zip(got.values(), want.values()):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)
    # the loss method under grad, through the module's own parameters
    got = grad(lambda xx: net.loss(xx, y))(x)
    want = grad(lambda xx: torch.nn.functional.mse_loss(ref(xx), y))(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    out, pull = vjp(lambda xx: net(xx), x)
    out_r, pull_r = vjp(lambda xx: ref(xx), x)
    cot = torch.randn_like(out)
    torch.testing.assert_close(pull(cot)[0], pull_r(cot)[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("hidden,act", CASES)
def test_input_derivatives_per_point_jacrev_and_hessian(hidden, act):
    # what PINN code writes: u_x, u_xx per collocation point
    net, ref = nets(hidden, act)
    x = torch.randn(11, 2, dtype=F64)

    def u(model):
        return lambda p: model(p.unsqueeze(0)).squeeze()

    torch.testing.assert_close(vmap(jacrev(u(net)))(x), vmap(jacrev(u(ref)))(x), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(vmap(jacrev(jacrev(u(net))))(x), vmap(jacrev(jacrev(u(ref))))(x), rtol=1e-11,
                               atol=1e-13)
    torch.testing.assert_close(vmap(hessian(u(net)))(x), vmap(hessian(u(ref)))(x), rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("hidden", [6, [6, 5]])
def test_the_model_ensembling_recipe(hidden):
    net, _ = nets(hidden, "tanh")
    models = [copy.deepcopy(net) for _ in range(3)]
    for k, m in enumerate(models):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1 * k)
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(5, 2, dtype=F64)
    out = vmap(lambda p, b: functional_call(base, (p, b), (x,)))(params, buffers)
    for k, m in enumerate(models):
        torch.testing.assert_close(out[k], m(x), rtol=1e-12, atol=1e-14)


def test_fused_kernels_still_run_outside_transforms():
    for hidden in (6, [6, 5]):
        net, _ = nets(hidden, "tanh")
        loss = net.loss(torch.randn(4, 2, dtype=F64), torch.randn(4, 1, dtype=F64))
        assert "Mse" not in type(loss.grad_fn).__name__ and "Mean" not in type(loss.grad_fn).__name__
