"""fusedgrad.Trainer's optimizer registry (csrc/trainer/optimizers.h, fusedgrad/_optimizers.py):
torch.optim.RMSprop and Adagrad against torch.optim's own loop

    opt.zero_grad(); loss = mse_loss(model(x), y); loss.backward(); opt.step()

on a copy of the model (the plain nn.Sequential), in float64 within 1e-10 (relative to the largest
value) over 20 steps, on every trainer route: the one-hidden-layer kernels (narrow, compile-time
narrow, GEMM), the any-depth engine (depth >= 2, and the widths where depth 1 runs on it), ensembles
(members against themselves trained alone, model_lr_scale included), full batch and mini-batches;
the optimizer state is read at each call and written back, so plain opt.step(), state_dict round
trips and LR schedulers work between calls, as for SGD / Adam (tests/test_trainer.py)."""
import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fusedgrad
from fusedgrad import _C
from fusedgrad._optimizers import DESCRIPTIONS, SUPPORTED
from test_trainer import check_state_dict_round_trip, native, problem, reference_step, rel_err, state_err
from test_deep import reference_training
from test_trainer_ensemble import data

OPTS = {
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01),
    "rmsprop-centered": lambda p: torch.optim.RMSprop(p, lr=0.01, centered=True),
    "rmsprop-momentum": lambda p: torch.optim.RMSprop(p, lr=0.005, momentum=0.9),
    "rmsprop-all": lambda p: torch.optim.RMSprop(p, lr=0.003, alpha=0.9, eps=1e-6, weight_decay=0.01, momentum=0.5,
                                                 centered=True, maximize=True),
    "rmsprop-foreach": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.3, foreach=True),
    "rmsprop-tensor-lr": lambda p: torch.optim.RMSprop(p, lr=torch.tensor(0.01)),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1),
    "adagrad-decay-wd": lambda p: torch.optim.Adagrad(p, lr=0.1, lr_decay=0.05, weight_decay=0.01),
    "adagrad-init-eps": lambda p: torch.optim.Adagrad(p, lr=0.1, initial_accumulator_value=0.3, eps=1e-6),
    "adagrad-maximize": lambda p: torch.optim.Adagrad(p, lr=0.05, maximize=True),
    "adagrad-foreach": lambda p: torch.optim.Adagrad(p, lr=0.1, lr_decay=0.01, foreach=True),
    "adagrad-fused": lambda p: torch.optim.Adagrad(p, lr=0.1, fused=True),
    "adagrad-tensor-lr": lambda p: torch.optim.Adagrad(p, lr=torch.tensor(0.1, dtype=torch.float64)),
}
# The one-hidden-layer routes (csrc/trainer/train_cpu.cpp: train_path_name), (d, h, o): σ 1→20→1 the
# compile-time narrow kernel, 3→20→2 the narrow one, 32→64→2 (2 176 multiply-adds a row) and 8→64→8 the engine.
ROUTES = {(1, 20, 1): "trainer-narrow-fixed", (3, 20, 2): "trainer-narrow", (32, 64, 2): "trainer-engine",
          (8, 64, 8): "trainer-engine"}


def compare_states(opt_a, opt_b, params_a, params_b, tol=1e-10):
    for pa, pb in zip(params_a, params_b):
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert sa.keys() == sb.keys()
        for key in sb:
            assert sa[key].dtype == sb[key].dtype and sa[key].shape == sb[key].shape, key
    err = state_err(opt_a, opt_b, params_a, params_b)
    assert err < tol, f"optimizer state differs by {err:.2e}"


def test_the_registry_is_one_list_on_both_sides():
    cpp = _C.optimizer_descriptions()
    assert sorted(cpp) == sorted(d.name for d in DESCRIPTIONS)
    assert SUPPORTED == "torch.optim.SGD, Adam, AdamW, RMSprop, Adagrad or LBFGS"
    assert cpp["rmsprop"]["state"] == ["square_avg", "momentum_buffer", "grad_avg"]
    assert cpp["adagrad"]["state"] == ["sum"] and cpp["adagrad"]["step_count"]
    assert set(cpp["rmsprop"]["options"]) == {"lr", "alpha", "eps", "weight_decay", "momentum", "centered", "maximize"}
    assert set(cpp["adagrad"]["options"]) == {"lr", "lr_decay", "weight_decay", "eps", "maximize"}
    # what each Python description creates is what its C++ description reads
    for d in DESCRIPTIONS:
        for cls in d.classes:
            net = fusedgrad.FusedMLP(1, 3, 1, dtype=torch.float64)
            kwargs = {"lr": 0.1}
            if cls is torch.optim.RMSprop:
                kwargs.update(momentum=0.5, centered=True)
            if cls in (torch.optim.Adam, torch.optim.AdamW):
                kwargs.update(amsgrad=True)
            if cls is torch.optim.SGD:
                kwargs.update(momentum=0.5)
            opt = cls(net.parameters(), **kwargs)
            trainer = fusedgrad.Trainer(net, opt)
            read = _C.read_optimizer("test", opt, d.name, list(net._params()), trainer._pnames())
            for p, r in zip(net._params(), read):
                assert r["optimizer"] == d.name
                made = set(opt.state[p])
                assert made <= set(cpp[d.name]["state"]) | {"step"}
                if d.init_state is not None:  # SGD's buffer comes with the first gradient
                    assert made == set(r["state"])


@pytest.mark.parametrize("name", sorted(OPTS))
@pytest.mark.parametrize("shape", sorted(ROUTES), ids=lambda s: ROUTES[s])
@pytest.mark.parametrize("batch", [None, 33])
def test_depth_one_matches_torch_optim(name, shape, batch):
    d, h, o = shape
    x, y, net, ref = problem(n=100, d=d, h=h, o=o)
    assert _C.explain_trainer(d, h, o, "sigmoid") == ROUTES[shape]
    opt, ropt = OPTS[name](net.parameters()), OPTS[name](ref.parameters())
    gen = torch.Generator().manual_seed(5)
    losses = fusedgrad.Trainer(net, opt).fit(x, y, 20, batch_size=batch, generator=gen)
    expected = reference_training(native(ref), ropt, x, y, 20, batch, torch.Generator().manual_seed(5))
    assert rel_err([losses], [expected]) < 1e-10
    assert rel_err(list(net.parameters()), list(ref.parameters())) < 1e-10
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)
    compare_states(opt, ropt, list(net.parameters()), list(ref.parameters()))


@pytest.mark.parametrize("name", sorted(OPTS))
@pytest.mark.parametrize("hidden, act, bias", [([20, 20], "tanh", True), ([8, 16, 8], "sigmoid", False)])
@pytest.mark.parametrize("batch", [None, 40])
def test_deep_matches_torch_optim(name, hidden, act, bias, batch):
    torch.manual_seed(3)
    net = fusedgrad.FusedMLP(2, hidden, 1, bias=bias, activation=act, dtype=torch.float64)
    ref = net.to_module(copy=True)
    x, y = torch.randn(100, 2, dtype=torch.float64), torch.randn(100, 1, dtype=torch.float64)
    opt, ropt = OPTS[name](net.parameters()), OPTS[name](ref.parameters())
    got = fusedgrad.Trainer(net, opt).fit(x, y, 20, batch_size=batch, generator=torch.Generator().manual_seed(1))
    expected = reference_training(ref, ropt, x, y, 20, batch, torch.Generator().manual_seed(1))
    assert rel_err([got], [expected]) < 1e-10
    assert rel_err(list(net.parameters()), list(ref.parameters())) < 1e-10
    compare_states(opt, ropt, list(net.parameters()), list(ref.parameters()))


@pytest.mark.parametrize("name", ["rmsprop-all", "rmsprop-momentum", "adagrad-decay-wd", "adagrad-init-eps"])
@pytest.mark.parametrize("hidden", [20, [6, 6]])
@pytest.mark.parametrize("per_model, batch, scaled", [(False, None, False), (True, 30, True), (False, 17, True)])
def test_ensemble_members_equal_themselves_trained_alone(name, hidden, per_model, batch, scaled):
    k = 4
    torch.manual_seed(7)
    ens = fusedgrad.FusedMLPEnsemble(k, 2, hidden, 1, dtype=torch.float64)
    members = ens.to_modules()
    x, y = data(k, 90, 2, 1, per_model, seed=4)
    scale = torch.tensor([0.5, 1.0, 2.0, 0.25], dtype=torch.float64) if scaled else None
    fusedgrad.Trainer(ens, OPTS[name](ens.parameters()), model_lr_scale=scale).fit(
        x, y, 20, batch_size=batch, generator=torch.Generator().manual_seed(2))
    for i, member in enumerate(members):
        xi, yi = (x[i], y[i]) if per_model else (x, y)
        factor = scale[i].item() if scaled else 1.0

        def make(p, i=i):
            opt = OPTS[name](p)
            for group in opt.param_groups:
                group["lr"] = group["lr"] * factor
            return opt

        gen = torch.Generator().manual_seed(2)
        reference_training(member.to_module(), make(member.parameters()), xi, yi, 20, batch, gen)
        err = rel_err(list(ens.module(i).parameters()), list(member.parameters()))
        assert err < 1e-10, f"member {i}: {err:.2e}"


# lr up to 0.01: with lr 0.031, momentum 0.9, centered and maximize the run diverges (square_avg grows
# 5e4-fold in 20 steps) and float64 rounding differences of 3e-16 at step 5 (formulas and order agree)
# reach 1e-8 in the state by step 20 (measured); at lr <= 0.01 every such combination stays below 1e-15.
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lr=st.floats(1e-4, 0.01), alpha=st.floats(0.5, 0.999), eps=st.sampled_from([1e-8, 1e-6, 1e-3]),
       weight_decay=st.sampled_from([0.0, 1e-3, 0.1]), momentum=st.sampled_from([0.0, 0.5, 0.9]),
       centered=st.booleans(), maximize=st.booleans(), depth=st.sampled_from([1, 2]),
       batch=st.sampled_from([None, 25]), seed=st.integers(0, 1000))
def test_rmsprop_options(lr, alpha, eps, weight_decay, momentum, centered, maximize, depth, batch, seed):
    make = lambda p: torch.optim.RMSprop(p, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,  # noqa: E731
                                         momentum=momentum, centered=centered, maximize=maximize)
    _check_options(make, depth, batch, seed)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lr=st.floats(1e-3, 0.5), lr_decay=st.sampled_from([0.0, 0.01, 0.3]), weight_decay=st.sampled_from([0.0, 1e-3, 0.1]),
       initial=st.sampled_from([0.0, 0.1, 1.0]), eps=st.sampled_from([1e-10, 1e-6, 1e-3]), maximize=st.booleans(),
       depth=st.sampled_from([1, 2]), batch=st.sampled_from([None, 25]), seed=st.integers(0, 1000))
def test_adagrad_options(lr, lr_decay, weight_decay, initial, eps, maximize, depth, batch, seed):
    make = lambda p: torch.optim.Adagrad(p, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,  # noqa: E731
                                         initial_accumulator_value=initial, eps=eps, maximize=maximize)
    _check_options(make, depth, batch, seed)


def _check_options(make, depth, batch, seed):
    torch.manual_seed(seed)
    net = fusedgrad.FusedMLP(1, [12] * depth, 1, activation="tanh", dtype=torch.float64)
    ref = net.to_module(copy=True)
    x = torch.linspace(-1, 1, 60, dtype=torch.float64).unsqueeze(1)
    y = torch.sin(3 * x)
    opt, ropt = make(net.parameters()), make(ref.parameters())
    got = fusedgrad.Trainer(net, opt).fit(x, y, 20, batch_size=batch, generator=torch.Generator().manual_seed(seed))
    expected = reference_training(ref, ropt, x, y, 20, batch, torch.Generator().manual_seed(seed))
    assert rel_err([got], [expected]) < 1e-10
    assert rel_err(list(net.parameters()), list(ref.parameters())) < 1e-10
    compare_states(opt, ropt, list(net.parameters()), list(ref.parameters()))


def test_a_wrong_option_is_seen():
    """The comparisons above can fail: alpha 0.99 against 0.98 is far outside their bound."""
    x, y, net, ref = problem()
    opt = torch.optim.RMSprop(net.parameters(), lr=0.01, alpha=0.99)
    ropt = torch.optim.RMSprop(ref.parameters(), lr=0.01, alpha=0.98)
    fusedgrad.Trainer(net, opt).fit(x, y, 20)
    reference_training(native(ref), ropt, x, y, 20, None, None)
    assert rel_err(list(net.parameters()), list(ref.parameters())) > 1e-6
    x, y, net, ref = problem()
    opt = torch.optim.Adagrad(net.parameters(), lr=0.1, initial_accumulator_value=0.1)
    ropt = torch.optim.Adagrad(ref.parameters(), lr=0.1)
    fusedgrad.Trainer(net, opt).fit(x, y, 20)
    reference_training(native(ref), ropt, x, y, 20, None, None)
    assert rel_err(list(net.parameters()), list(ref.parameters())) > 1e-6


@pytest.mark.parametrize("name", ["rmsprop-all", "rmsprop-momentum", "adagrad-decay-wd", "adagrad-fused"])
@pytest.mark.parametrize("hidden", [20, [10, 10]])
def test_interchange_with_plain_steps_and_schedulers(name, hidden):
    """trainer steps, plain opt.step(), trainer again — with an LR scheduler between calls — equals
    the all-native run."""
    torch.manual_seed(0)
    net = fusedgrad.FusedMLP(1, hidden, 1, dtype=torch.float64)
    ref = net.to_module(copy=True)
    mine = net.to_module()  # shares net's parameters: plain steps on them
    x = torch.linspace(-1, 1, 50, dtype=torch.float64).unsqueeze(1)
    y = x.pow(2)
    opt, ropt = OPTS[name](net.parameters()), OPTS[name](ref.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.7)
    rsched = torch.optim.lr_scheduler.StepLR(ropt, 2, gamma=0.7)
    trainer = fusedgrad.Trainer(net, opt)
    for i in range(4):
        trainer.fit(x, y, 3)
        trainer.step(x, y)
        reference_training(ref, ropt, x, y, 4, None, None)
        reference_step(mine, opt, x, y)
        reference_step(ref, ropt, x, y)
        sched.step()
        rsched.step()
    assert opt.state[net._params()[0]]["step"].item() == 20
    assert rel_err(list(net.parameters()), list(ref.parameters())) < 1e-10
    compare_states(opt, ropt, list(net.parameters()), list(ref.parameters()))


@pytest.mark.parametrize("name", ["rmsprop-all", "rmsprop", "adagrad-init-eps", "adagrad-fused"])
def test_state_dict_round_trip(name):
    """Trainer → state_dict → a plain optimizer continues; and a plain optimizer's state → Trainer."""
    compare_states(*check_state_dict_round_trip(OPTS[name]))


@pytest.mark.parametrize("name", ["rmsprop-all", "rmsprop", "adagrad-decay-wd", "adagrad-tensor-lr"])
def test_step_fast_route_equals_python_route(name):
    x, y, net_a, _ = problem()
    net_b = copy.deepcopy(net_a)
    opt_a, opt_b = OPTS[name](net_a.parameters()), OPTS[name](net_b.parameters())
    fast, slow = fusedgrad.Trainer(net_a, opt_a), fusedgrad.Trainer(net_b, opt_b)
    slow._fast_step = False
    for _ in range(6):
        assert torch.equal(fast.step(x, y), slow.step(x, y))
    for a, b in zip(net_a.parameters(), net_b.parameters()):
        assert torch.equal(a, b) and torch.equal(a.grad, b.grad)
    assert state_err(opt_a, opt_b, list(net_a.parameters()), list(net_b.parameters())) == 0


@pytest.mark.parametrize("options", [{}, {"momentum": 0.5}, {"centered": True}, {"momentum": 0.1, "centered": True},
                                     {"foreach": True}], ids=repr)
@pytest.mark.parametrize("default_dtype", [torch.float32, torch.float64])
def test_rmsprop_state_created_as_torchs_first_step_creates_it(options, default_dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        x, y, net, ref = problem()
        opt = torch.optim.RMSprop(net.parameters(), lr=0.01, **options)
        ropt = torch.optim.RMSprop(ref.parameters(), lr=0.01, **options)
        fusedgrad.Trainer(net, opt).step(x, y)
        reference_step(native(ref), ropt, x, y)
        compare_states(opt, ropt, list(net.parameters()), list(ref.parameters()), tol=1e-12)
        for p, q in zip(net.parameters(), ref.parameters()):
            assert opt.state[p]["step"].dtype == ropt.state[q]["step"].dtype
    finally:
        torch.set_default_dtype(previous)


def test_adagrad_state_is_torchs_from_construction():
    """Adagrad makes its state in its constructor (sum = initial_accumulator_value); a parameter group
    added later gets its state at its first step, from the optimizer's defaults, as torch's _init_group."""
    x, y, net, ref = problem()
    for m in (net, ref):
        m.linear2.requires_grad_(True)
    opt = torch.optim.Adagrad(net.linear1.parameters(), lr=0.1, initial_accumulator_value=0.2)
    opt.add_param_group({"params": list(net.linear2.parameters()), "lr": 0.05})
    ropt = torch.optim.Adagrad(ref.linear1.parameters(), lr=0.1, initial_accumulator_value=0.2)
    ropt.add_param_group({"params": list(ref.linear2.parameters()), "lr": 0.05})
    trainer = fusedgrad.Trainer(net, opt)
    for _ in range(3):
        trainer.step(x, y)
        reference_step(native(ref), ropt, x, y)
    compare_states(opt, ropt, list(net.parameters()), list(ref.parameters()), tol=1e-12)
    assert rel_err(list(net.parameters()), list(ref.parameters())) < 1e-12


@pytest.mark.parametrize("name", ["rmsprop-all", "adagrad-decay-wd"])
def test_float32_within_float_noise(name):
    x, y, net, ref = problem(dtype=torch.float32)
    opt, ropt = OPTS[name](net.parameters()), OPTS[name](ref.parameters())
    fusedgrad.Trainer(net, opt).fit(x, y, 20)
    reference_training(native(ref), ropt, x, y, 20, None, None)
    assert rel_err(list(net.parameters()), list(ref.parameters())) < 1e-4


def test_lbfgs_explain():
    net = fusedgrad.FusedMLP(1, 8, 1)
    info = fusedgrad.explain(fusedgrad.Trainer(net, torch.optim.LBFGS(net.parameters())), torch.rand(10, 1))
    assert info["path"] == "trainer-lbfgs" and "block_rows" in info


def test_refused_options_and_state():
    net = fusedgrad.FusedMLP(1, 4, 1)
    with pytest.raises(ValueError, match=r"param_groups\[0\] has capturable=True"):
        fusedgrad.Trainer(net, torch.optim.RMSprop(net.parameters(), capturable=True))
    with pytest.raises(ValueError, match=r"param_groups\[0\] has differentiable=True"):
        fusedgrad.Trainer(net, torch.optim.RMSprop(net.parameters(), differentiable=True))
    with pytest.raises(ValueError, match=r"param_groups\[0\] has differentiable=True"):
        fusedgrad.Trainer(net, torch.optim.Adagrad(net.parameters(), differentiable=True))

    class MyRMSprop(torch.optim.RMSprop):
        pass

    with pytest.raises(TypeError, match="got .*MyRMSprop"):
        fusedgrad.Trainer(net, MyRMSprop(net.parameters()))
    # state made with momentum=0, then momentum set: torch's own step would fail on the missing buffer
    x = torch.rand(10, 1)
    opt = torch.optim.RMSprop(net.parameters(), lr=0.01)
    trainer = fusedgrad.Trainer(net, opt)
    trainer.step(x, x)
    opt.param_groups[0]["momentum"] = 0.9
    with pytest.raises(ValueError, match=r"optimizer state of 'linear1.weight' has no 'momentum_buffer'"):
        trainer.step(x, x)
    opt.param_groups[0]["momentum"] = 0.0
    opt.param_groups[0]["lr"] = torch.tensor([0.1, 0.2])
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\] must be a number or a one-element tensor"):
        trainer.step(x, x)


# ---------------------------------------------------------------------------- LBFGS (Trainer.fit, full batch)
LBFGS = {
    "lbfgs": lambda p: torch.optim.LBFGS(p, lr=0.5, max_iter=10),
    "lbfgs-strong-wolfe": lambda p: torch.optim.LBFGS(p, lr=1, max_iter=20, line_search_fn="strong_wolfe"),
    "lbfgs-history-3": lambda p: torch.optim.LBFGS(p, lr=0.3, max_iter=7, history_size=3),
    "lbfgs-wolfe-history-2-eval": lambda p: torch.optim.LBFGS(p, lr=1, max_iter=15, max_eval=12, history_size=2,
                                                              line_search_fn="strong_wolfe"),
}


def lbfgs_reference(model, opt, x, y, steps):
    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    return torch.stack([opt.step(closure).detach() for _ in range(steps)])


def compare_lbfgs_states(opt, ropt, tol):
    sa, sb = opt.state[opt.param_groups[0]["params"][0]], ropt.state[ropt.param_groups[0]["params"][0]]
    assert set(sa) == set(sb)
    assert sa["n_iter"] == sb["n_iter"] and sa["func_evals"] == sb["func_evals"]
    for key in ("d", "prev_flat_grad"):
        assert rel_err([sa[key]], [sb[key]]) < tol, key
    for key in ("old_dirs", "old_stps"):
        assert len(sa[key]) == len(sb[key]) and (not sb[key] or rel_err(sa[key], sb[key]) < tol), key
    for key in ("t", "prev_loss", "H_diag"):
        assert abs(float(sa[key]) - float(sb[key])) <= tol * max(1.0, abs(float(sb[key]))), key


# LBFGS amplifies the last-bit differences of the gradients (the engine's sums and autograd's are
# added in different orders): measured on these problems, the parameters agree to 1e-15–4e-13 after
# one step (7–20 iterations), to <= 2e-10 after two, and the state d to 1e-9. After five steps
# native's own runs part: on the same rows in another order (the same loss, other summation orders)
# the strong-Wolfe run of 1→20→1 σ took 114, 115 or 116 evaluations. So after five the fused run must
# land within the spread of native's runs on reordered rows — evaluations, iterations and loss.
@pytest.mark.parametrize("name", sorted(LBFGS))
@pytest.mark.parametrize("hidden, act", [(20, "sigmoid"), ([12, 12], "tanh")])
def test_lbfgs_matches_torch_optim(name, hidden, act):
    def run(steps, perm=None, fused=True):
        torch.manual_seed(0)
        net = fusedgrad.FusedMLP(1, hidden, 1, activation=act, dtype=torch.float64)
        ref = net.to_module(copy=True)
        x = torch.linspace(-1, 1, 100, dtype=torch.float64).unsqueeze(1)
        y = torch.sin(3 * x)
        opt, ropt = LBFGS[name](net.parameters()), LBFGS[name](ref.parameters())
        got = fusedgrad.Trainer(net, opt).fit(x, y, steps) if fused else None
        if perm is not None:
            x, y = x[perm], y[perm]
        return net, ref, opt, ropt, got, lbfgs_reference(ref, ropt, x, y, steps)

    net, ref, opt, ropt, got, expected = run(2)
    assert rel_err([got], [expected]) < 1e-12
    assert rel_err(list(net.parameters()), list(ref.parameters())) < 1e-8
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9)
    compare_lbfgs_states(opt, ropt, 1e-7)
    # Over 121 evaluations the line search amplifies rounding: the band is the spread of native's own
    # rounding (its runs over row orders). Too few orders measure too narrow a band: a summation order of
    # the engine's (rows in lanes, 2026-12) fell 1e-7 below the least of five and inside the spread of 30;
    # another (one multiply-add chain per output in the forward, 2026-12-06) 2e-7 above the greatest of 30,
    # ranked 298th of 300 native orders. 100 orders: the native runs alone, the fused run once.
    net, ref, opt, ropt, got, expected = run(5)
    gen = torch.Generator().manual_seed(1)
    natives = []
    for perm in [None] + [torch.randperm(100, generator=gen) for _ in range(100)]:
        _, ref, _, ropt, _, expected = run(5, perm, fused=False)
        sb = ropt.state[next(iter(ref.parameters()))]
        natives.append((sb["n_iter"], sb["func_evals"], expected[-1].item()))
    sa = opt.state[next(iter(net._params()))]
    for i, (key, value) in enumerate([("n_iter", sa["n_iter"]), ("func_evals", sa["func_evals"])]):
        assert min(n[i] for n in natives) <= value <= max(n[i] for n in natives), (key, value, natives)
    lo, hi = min(n[2] for n in natives), max(n[2] for n in natives)
    assert lo - 1e-7 * abs(lo) <= got[-1].item() <= hi + 1e-7 * abs(hi), (got[-1].item(), natives)


@pytest.mark.parametrize("make", [lambda p: torch.optim.LBFGS(p, lr=0.3, max_iter=5, history_size=3),
                                  lambda p: torch.optim.LBFGS(p, lr=1, max_iter=5, line_search_fn="strong_wolfe")],
                         ids=["plain", "strong-wolfe"])
def test_lbfgs_interchanges_with_plain_steps_and_state_dict(make):
    """fused steps, plain opt.step(closure), fused again — and a state_dict into a fresh optimizer —
    equal the all-native run (short steps: see the amplification above)."""
    torch.manual_seed(0)
    net = fusedgrad.FusedMLP(1, 20, 1, dtype=torch.float64)
    ref = net.to_module(copy=True)
    mine = net.to_module()
    x = torch.linspace(-1, 1, 100, dtype=torch.float64).unsqueeze(1)
    y = torch.sin(3 * x)
    opt, ropt = make(net.parameters()), make(ref.parameters())
    trainer = fusedgrad.Trainer(net, opt)
    trainer.fit(x, y, 1)
    lbfgs_reference(mine, opt, x, y, 1)
    trainer.step(x, y)
    lbfgs_reference(ref, ropt, x, y, 3)
    assert rel_err(list(net.parameters()), list(ref.parameters())) < 1e-9
    compare_lbfgs_states(opt, ropt, 1e-8)
    net2 = copy.deepcopy(net)
    opt2 = make(net2.parameters())
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    fusedgrad.Trainer(net2, opt2).fit(x, y, 1)
    lbfgs_reference(ref, ropt, x, y, 1)
    assert rel_err(list(net2.parameters()), list(ref.parameters())) < 1e-9


def test_lbfgs_refusals():
    net = fusedgrad.FusedMLP(1, 4, 1)
    x = torch.rand(10, 1)
    trainer = fusedgrad.Trainer(net, torch.optim.LBFGS(net.parameters()))
    with pytest.raises(ValueError, match="LBFGS trains on the full batch"):
        trainer.fit(x, x, 2, batch_size=4)
    ens = fusedgrad.FusedMLPEnsemble(2, 1, 4, 1)
    with pytest.raises(ValueError, match="LBFGS over an ensemble"):
        fusedgrad.Trainer(ens, torch.optim.LBFGS(ens.parameters()))
    opt = torch.optim.LBFGS(net.parameters())
    opt.param_groups[0]["line_search_fn"] = "backtracking"
    with pytest.raises(ValueError, match="line_search_fn must be None or 'strong_wolfe'"):
        fusedgrad.Trainer(net, opt)


def test_lbfgs_float32_trains():
    """float32: torch computes LBFGS's 0-dim scalars in float32, the fused loop in double, so the
    runs part ways within a few iterations and are not compared value by value; the fused one must
    train as well (measured: final loss 1.9e-3 fused, 4.5e-3 torch, from 0.5)."""
    torch.manual_seed(0)
    net = fusedgrad.FusedMLP(1, 20, 1)
    ref = net.to_module(copy=True)
    x = torch.linspace(-1, 1, 100).unsqueeze(1)
    y = torch.sin(3 * x)
    make = LBFGS["lbfgs-strong-wolfe"]
    got = fusedgrad.Trainer(net, make(net.parameters())).fit(x, y, 3)
    expected = lbfgs_reference(ref, make(ref.parameters()), x, y, 3)
    assert torch.isfinite(got).all() and got[-1] < 0.05 * got[0]
    assert got[-1] < 3 * expected[-1]


@pytest.mark.parametrize("key, bad", [("d", lambda t: t[:-1]), ("prev_flat_grad", lambda t: t.double()),
                                      ("old_dirs", lambda t: [t[:3]])])
def test_lbfgs_state_of_the_wrong_size_is_refused(key, bad):
    """The C++ loop walks the state's flat vectors as raw arrays: one that does not hold exactly the flat
    parameters (size, dtype) is refused by name before anything is read."""
    net = fusedgrad.FusedMLP(1, 4, 1)
    x = torch.rand(10, 1)
    opt = torch.optim.LBFGS(net.parameters(), max_iter=3)
    trainer = fusedgrad.Trainer(net, opt)
    trainer.fit(x, x, 1)
    state = opt.state[opt.param_groups[0]["params"][0]]
    state[key] = bad(state[key][0] if key == "old_dirs" else state[key])
    with pytest.raises(ValueError, match=f"optimizer.state's '{key}' must hold the 13 flat parameters"):
        trainer.fit(x, x, 1)
