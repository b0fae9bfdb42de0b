"""fusedgrad.Trainer on a FusedMLPEnsemble: one optimizer over the stacked (K, ...) parameters
is K independent optimizers, so member k must end exactly where the same model trained alone
by the reference loop (native Linear → Sigmoid → Linear, its own optimizer) ends."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fusedgrad
from test_trainer import batches, rel_err


def train_alone(member, make_opt, x, y, steps, rows=None, reduction="mean"):
    opt = make_opt(member.parameters())
    model = nn.Sequential(member.linear1, nn.Sigmoid(), member.linear2)
    losses = []
    for s in range(steps):
        r = rows[s] if rows is not None else slice(None)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x[r]), y[r], reduction=reduction)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def data(k, n, d, o, per_model, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (k, n) if per_model else (n,)
    x = torch.rand(*shape, d, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.sin(3 * x.sum(-1, keepdim=True)).expand(*shape, o).contiguous()
    return x, y


OPTS = {
    "adam": lambda p: torch.optim.Adam(p, lr=0.05),
    "adamw-amsgrad": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1, amsgrad=True),
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
}


@settings(max_examples=20)
@given(k=st.integers(1, 6), n=st.integers(1, 300), d=st.integers(1, 4), h=st.integers(1, 24), o=st.integers(1, 3),
       bias=st.booleans(), per_model=st.booleans(), batch=st.one_of(st.none(), st.integers(1, 120)),
       name=st.sampled_from(sorted(OPTS)), reduction=st.sampled_from(["mean", "sum"]))
def test_each_member_equals_itself_trained_alone(k, n, d, h, o, bias, per_model, batch, name, reduction):
    torch.manual_seed(k * 100 + h)
    ens = fusedgrad.FusedMLPEnsemble(k, d, h, o, bias=bias, dtype=torch.float64)
    members = ens.to_modules()
    x, y = data(k, n, d, o, per_model, seed=n)
    steps = 6
    losses = fusedgrad.Trainer(ens, OPTS[name](ens.parameters()), reduction=reduction).fit(
        x, y, steps, batch_size=batch, generator=torch.Generator().manual_seed(9))
    assert losses.shape == (steps, k)
    rows = batches(n, batch, steps, True, torch.Generator().manual_seed(9)) if batch else None
    for i, member in enumerate(members):
        xi, yi = (x[i], y[i]) if per_model else (x, y)
        ref_losses = train_alone(member, OPTS[name], xi, yi, steps, rows, reduction)
        assert rel_err(list(ens.module(i).parameters()), list(member.parameters())) < 1e-10
        torch.testing.assert_close(losses[:, i], ref_losses, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("steps, bound", [(20, 1e-10), (201, 1e-6)])
def test_seed_problem_members_short_and_long_runs(steps, bound):
    torch.manual_seed(0)
    ens = fusedgrad.FusedMLPEnsemble(8, 1, 20, 1, dtype=torch.float64)
    members = ens.to_modules()
    x = torch.linspace(-1, 1, 100, dtype=torch.float64).unsqueeze(1)
    y = x.pow(2) + 0.2 * torch.rand(x.shape, dtype=torch.float64)
    make = lambda p: torch.optim.Adam(p, lr=0.2)  # noqa: E731  (the notebook's optimizer)
    fusedgrad.Trainer(ens, make(ens.parameters())).fit(x, y, steps)
    for i, member in enumerate(members):
        train_alone(member, make, x, y, steps)
        err = rel_err(list(ens.module(i).parameters()), list(member.parameters()))
        assert err < bound, f"member {i}: {err:.2e} after {steps} steps"


def test_per_model_learning_rates():
    """model_lr_scale: member k trains with lr = group lr · scale[k] — a learning-rate sweep."""
    torch.manual_seed(1)
    scale = torch.tensor([0.1, 0.5, 1.0, 2.0])
    ens = fusedgrad.FusedMLPEnsemble(4, 2, 8, 1, dtype=torch.float64)
    members = ens.to_modules()
    x, y = data(4, 50, 2, 1, per_model=False)
    fusedgrad.Trainer(ens, torch.optim.AdamW(ens.parameters(), lr=0.05, weight_decay=0.1),
                      model_lr_scale=scale).fit(x, y, 10)
    for i, member in enumerate(members):
        lr = 0.05 * scale[i].item()
        train_alone(member, lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.1), x, y, 10)
        assert rel_err(list(ens.module(i).parameters()), list(member.parameters())) < 1e-10


def test_wide_ensemble_gemm_path():
    torch.manual_seed(2)
    ens = fusedgrad.FusedMLPEnsemble(3, 32, 64, 8, dtype=torch.float64)
    members = ens.to_modules()
    x, y = data(3, 200, 32, 8, per_model=True)
    fusedgrad.Trainer(ens, torch.optim.Adam(ens.parameters(), lr=0.01)).fit(x, y, 4)
    for i, member in enumerate(members):
        train_alone(member, lambda p: torch.optim.Adam(p, lr=0.01), x[i], y[i], 4)
        assert rel_err(list(ens.module(i).parameters()), list(member.parameters())) < 1e-10


def test_step_returns_each_models_loss():
    ens = fusedgrad.FusedMLPEnsemble(5, 1, 4, 1)
    x = torch.rand(10, 1)
    loss = fusedgrad.Trainer(ens, torch.optim.SGD(ens.parameters(), lr=0.1)).step(x, x)
    assert loss.shape == (5,)


def test_refused_ensemble_arguments():
    ens = fusedgrad.FusedMLPEnsemble(3, 2, 4, 1)
    opt = torch.optim.Adam(ens.parameters())
    with pytest.raises(ValueError, match=r"'model_lr_scale' must be a floating-point tensor of shape \(K,\) = \(3,\)"):
        fusedgrad.Trainer(ens, opt, model_lr_scale=torch.ones(4))
    with pytest.raises(ValueError, match="'model_lr_scale' must hold finite, non-negative factors"):
        fusedgrad.Trainer(ens, opt, model_lr_scale=torch.tensor([1.0, -1.0, 1.0]))
    net = fusedgrad.FusedMLP(2, 4, 1)
    with pytest.raises(ValueError, match="'model_lr_scale' is for ensembles"):
        fusedgrad.Trainer(net, torch.optim.Adam(net.parameters()), model_lr_scale=torch.ones(1))
    trainer = fusedgrad.Trainer(ens, opt)
    with pytest.raises(ValueError, match=r"argument 'x' must have shape \(N, 2\) \(shared by all models\) or "
                                         r"\(K, N, 2\) = \(3, N, 2\), got \(4, 5, 2\)"):
        trainer.step(torch.zeros(4, 5, 2), torch.zeros(4, 5, 1))
    with pytest.raises(ValueError, match=r"argument 'target' must have shape \(N, 1\) or \(K, N, 1\)"):
        trainer.step(torch.zeros(5, 2), torch.zeros(6, 1))


# Options whose update loops take every select of optimizers.h: maximize, both kinds of
# weight decay, amsgrad's v̂, SGD's first momentum step.
MANY_OPTS = {
    "adam-maximize-wd": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.05, maximize=True),
    "adamw-amsgrad": OPTS["adamw-amsgrad"],
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.8, dampening=0.1),
}


@pytest.mark.parametrize("name", sorted(MANY_OPTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_many_members_equal_themselves_trained_alone_bit_for_bit(name, dtype, threads):
    """K = 37: several groups of models that step together (their optimizer updates run as one
    slice), split over the threads. Each member ends bit for bit where the fused trainer takes
    it alone, and (float64) where the reference loop takes it."""
    torch.manual_seed(3)
    k, steps = 37, 7
    ens = fusedgrad.FusedMLPEnsemble(k, 2, 20, 1, dtype=dtype)
    alone = [ens.module(i) for i in range(k)]
    references = ens.to_modules()
    x, y = data(k, 90, 2, 1, per_model=False)
    x, y = x.to(dtype), y.to(dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        losses = fusedgrad.Trainer(ens, MANY_OPTS[name](ens.parameters())).fit(x, y, steps)
        for i, net in enumerate(alone):
            alone_losses = fusedgrad.Trainer(net, MANY_OPTS[name](net.parameters())).fit(x, y, steps)
            for a, b in zip(ens.module(i).parameters(), net.parameters()):
                assert torch.equal(a, b), f"member {i}"
            assert torch.equal(losses[:, i], alone_losses.view(-1)), f"member {i}"
    finally:
        torch.set_num_threads(before)
    if dtype == torch.float64:
        for i, member in enumerate(references):
            train_alone(member, MANY_OPTS[name], x, y, steps)
            assert rel_err(list(ens.module(i).parameters()), list(member.parameters())) < 1e-10, f"member {i}"
