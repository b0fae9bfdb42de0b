"""fusedgrad.Trainer against the reference loop it replaces:

    opt.zero_grad(); loss = MSELoss()(Sequential(linear1, Sigmoid(), linear2)(x), y); loss.backward(); opt.step()

with the same torch.optim optimizer class and options on a copy of the model.
Float64 parameters must agree to 1e-10 (relative to the largest parameter) after
20 steps and 1e-6 after 201; float32 within float noise (see the tolerances
below). The largest errors measured are reported by the assertions' messages.
"""
import copy
import functools
import re
import signal
import threading
import _thread

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fusedgrad
from fusedgrad import _C
from fusedgrad._optimizers import SUPPORTED

# Optimizer factories: every option of SGD / Adam / AdamW that the trainer takes.
OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "sgd-dampening-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.01),
    "sgd-nesterov-maximize": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, nesterov=True, maximize=True),
    "sgd-foreach": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5, foreach=True),
    "sgd-fused": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5, fused=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.05),
    "adam-amsgrad-wd": lambda p: torch.optim.Adam(p, lr=0.05, amsgrad=True, weight_decay=0.01),
    "adam-betas-eps": lambda p: torch.optim.Adam(p, lr=0.02, betas=(0.8, 0.99), eps=1e-6),
    "adam-maximize": lambda p: torch.optim.Adam(p, lr=0.02, maximize=True),
    "adam-foreach": lambda p: torch.optim.Adam(p, lr=0.05, foreach=True),
    "adam-fused": lambda p: torch.optim.Adam(p, lr=0.05, fused=True),
    "adam-tensor-lr": lambda p: torch.optim.Adam(p, lr=torch.tensor(0.05)),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.05),
    "adamw-wd-amsgrad": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1, amsgrad=True),
    "adamw-maximize-fused": lambda p: torch.optim.AdamW(p, lr=0.02, maximize=True, fused=True),
    "adam-decoupled": lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.05, decoupled_weight_decay=True),
}


def native(net):
    """The notebook's model over the same Parameters (Linear → Sigmoid → Linear)."""
    return nn.Sequential(net.linear1, nn.Sigmoid(), net.linear2)


def reference_step(model, opt, x, y, reduction="mean"):
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y, reduction=reduction)
    loss.backward()
    opt.step()
    return loss.detach()


def batches(n, batch_size, steps, shuffle, generator):
    """The rows of each step as a reference loop (one randperm per epoch) visits them."""
    out = []
    while len(out) < steps:
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            out.append(order[start:start + batch_size])
            if len(out) == steps:
                break
    return out


def problem(n=100, d=1, h=20, o=1, dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g, dtype=dtype) * 2 - 1
    y = x.pow(2).sum(1, keepdim=True).expand(n, o) + 0.2 * torch.rand(n, o, generator=g, dtype=dtype)
    torch.manual_seed(seed)
    net = fusedgrad.FusedMLP(d, h, o, bias=bias, dtype=dtype)
    ref = copy.deepcopy(net)
    return x, y.contiguous(), net, ref


def rel_err(a_params, b_params):
    scale = max(p.abs().max().item() for p in b_params)
    return max((a - b).abs().max().item() for a, b in zip(a_params, b_params)) / scale


def state_err(opt_a, opt_b, params_a, params_b):
    worst = 0.0
    for pa, pb in zip(params_a, params_b):
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert sa.keys() == sb.keys()
        for key in sa:
            if isinstance(sa[key], torch.Tensor):
                scale = max(sb[key].abs().max().item(), 1e-30)
                worst = max(worst, (sa[key].double() - sb[key].double()).abs().max().item() / scale)
    return worst


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_fit_matches_reference_float64(name):
    x, y, net, ref = problem()
    opt, ropt = OPTIMIZERS[name](net.parameters()), OPTIMIZERS[name](ref.parameters())
    losses = fusedgrad.Trainer(net, opt).fit(x, y, 20)
    model = native(ref)
    ref_losses = torch.stack([reference_step(model, ropt, x, y) for _ in range(20)])
    err = rel_err(list(net.parameters()), list(ref.parameters()))
    assert err < 1e-10, f"{name}: parameters differ by {err:.2e} (relative) after 20 steps"
    torch.testing.assert_close(losses, ref_losses, rtol=1e-10, atol=0)
    assert state_err(opt, ropt, list(net.parameters()), list(ref.parameters())) < 1e-10
    for a, b in zip(net.parameters(), ref.parameters()):  # .grad: the last step's gradient, as the reference leaves it
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", ["adam", "adamw-wd-amsgrad", "sgd-nesterov-maximize"])
def test_long_run_float64(name):
    """201 steps (the notebook's run): rounding differences of another summation order grow
    along a run; measured here below 1e-12 relative for these problems, bound 1e-6."""
    x, y, net, ref = problem()
    opt, ropt = OPTIMIZERS[name](net.parameters()), OPTIMIZERS[name](ref.parameters())
    fusedgrad.Trainer(net, opt).fit(x, y, 201)
    model = native(ref)
    for _ in range(201):
        reference_step(model, ropt, x, y)
    err = rel_err(list(net.parameters()), list(ref.parameters()))
    assert err < 1e-6, f"{name}: parameters differ by {err:.2e} (relative) after 201 steps"


@pytest.mark.parametrize("name", ["sgd-momentum", "adam", "adamw-wd-amsgrad"])
def test_fit_float32_within_float_noise(name):
    """float32: the reference itself moves by ~1e-6 relative when its sums are reordered;
    after 20 steps both stay within 1e-4 of the float64 trajectory's parameters."""
    x, y, net, ref = problem(dtype=torch.float32)
    exact = copy.deepcopy(ref).double()
    opt, ropt = OPTIMIZERS[name](net.parameters()), OPTIMIZERS[name](exact.parameters())
    fusedgrad.Trainer(net, opt).fit(x, y, 20)
    model = native(exact)
    for _ in range(20):
        reference_step(model, ropt, x.double(), y.double())
    err = rel_err([p.double() for p in net.parameters()], list(exact.parameters()))
    assert err < 1e-4, f"{name}: float32 parameters differ from the float64 run by {err:.2e}"


@settings(max_examples=25)
@given(
    n=st.integers(1, 600), d=st.integers(1, 6), h=st.integers(1, 40), o=st.integers(1, 4),
    bias=st.booleans(), batch=st.one_of(st.none(), st.integers(1, 700)), shuffle=st.booleans(),
    reduction=st.sampled_from(["mean", "sum"]), name=st.sampled_from(sorted(OPTIMIZERS)),
)
def test_shapes_batches_and_options(n, d, h, o, bias, batch, shuffle, reduction, name):
    x, y, net, ref = problem(n, d, h, o, bias=bias, seed=n * 31 + h)
    opt, ropt = OPTIMIZERS[name](net.parameters()), OPTIMIZERS[name](ref.parameters())
    steps = 7
    losses = fusedgrad.Trainer(net, opt, reduction=reduction).fit(
        x, y, steps, batch_size=batch, shuffle=shuffle, generator=torch.Generator().manual_seed(5))
    model = native(ref)
    rows = batches(n, batch, steps, shuffle, torch.Generator().manual_seed(5)) if batch else [slice(None)] * steps
    ref_losses = torch.stack([reference_step(model, ropt, x[r], y[r], reduction) for r in rows])
    err = rel_err(list(net.parameters()), list(ref.parameters()))
    assert err < 1e-10, f"parameters differ by {err:.2e}"
    torch.testing.assert_close(losses, ref_losses, rtol=1e-9, atol=1e-12)


def test_step_is_one_reference_step():
    x, y, net, ref = problem(dtype=torch.float64)
    opt, ropt = torch.optim.Adam(net.parameters(), lr=0.1), torch.optim.Adam(ref.parameters(), lr=0.1)
    trainer = fusedgrad.Trainer(net, opt)
    model = native(ref)
    for _ in range(5):
        loss = trainer.step(x, y)
        ref_loss = reference_step(model, ropt, x, y)
        assert loss.shape == () and not loss.requires_grad
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    assert rel_err(list(net.parameters()), list(ref.parameters())) < 1e-12


@pytest.mark.parametrize("name", ["adam-amsgrad-wd", "adamw", "sgd-dampening-wd", "sgd"])
def test_step_fast_route_equals_python_route(name):
    """Trainer.step reads the optimizer in C++ when it can (csrc/trainer/train_bindings.cpp) and
    in Python otherwise: both routes give bitwise the same parameters, state and losses."""
    x, y, net_a, _ = problem()
    net_b = copy.deepcopy(net_a)
    opt_a, opt_b = OPTIMIZERS[name](net_a.parameters()), OPTIMIZERS[name](net_b.parameters())
    fast, slow = fusedgrad.Trainer(net_a, opt_a), fusedgrad.Trainer(net_b, opt_b)
    slow._fast_step = False
    for _ in range(6):
        assert torch.equal(fast.step(x, y), slow.step(x, y))
    for a, b in zip(net_a.parameters(), net_b.parameters()):
        assert torch.equal(a, b) and torch.equal(a.grad, b.grad)
    assert state_err(opt_a, opt_b, list(net_a.parameters()), list(net_b.parameters())) == 0


def test_leading_dimensions_of_x_are_rows():
    x, y, net, ref = problem(n=60, d=3, o=2)
    opt, ropt = torch.optim.SGD(net.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    fusedgrad.Trainer(net, opt).step(x.view(3, 20, 3), y.view(3, 20, 2))
    reference_step(native(ref), ropt, x, y)
    assert rel_err(list(net.parameters()), list(ref.parameters())) < 1e-12


def test_interleaved_with_plain_optimizer_steps():
    """Fused steps and plain opt.step() steps share the optimizer's state."""
    x, y, net, ref = problem()
    opt, ropt = torch.optim.AdamW(net.parameters(), lr=0.05), torch.optim.AdamW(ref.parameters(), lr=0.05)
    trainer, model, mine = fusedgrad.Trainer(net, opt), native(ref), native(net)
    for i in range(12):
        if i % 3 == 2:
            reference_step(mine, opt, x, y)
        else:
            trainer.step(x, y)
        reference_step(model, ropt, x, y)
    assert opt.state[net.linear1.weight]["step"].item() == 12
    assert rel_err(list(net.parameters()), list(ref.parameters())) < 1e-10


def check_state_dict_round_trip(make_opt):
    """Trainer → state_dict → a plain optimizer continues; and a plain optimizer's state → Trainer: both
    equal to the reference loop after 5 + 5 steps. Returns (trainer-continued optimizer, reference
    optimizer, its parameters, the reference's) for further checks."""
    x, y, net, ref = problem()
    opt, ropt = make_opt(net.parameters()), make_opt(ref.parameters())
    fusedgrad.Trainer(net, opt).fit(x, y, 5)
    model = native(ref)
    for _ in range(5):
        reference_step(model, ropt, x, y)
    # fused state → a fresh plain optimizer, which takes 5 plain steps
    net2 = copy.deepcopy(net)
    opt2 = make_opt(net2.parameters())
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict may alias the source's tensors
    for _ in range(5):
        reference_step(native(net2), opt2, x, y)
    # plain state → a fresh optimizer driven by the trainer, 5 fused steps
    net3 = copy.deepcopy(ref)
    opt3 = make_opt(net3.parameters())
    opt3.load_state_dict(copy.deepcopy(ropt.state_dict()))
    fusedgrad.Trainer(net3, opt3).fit(x, y, 5)
    for _ in range(5):
        reference_step(model, ropt, x, y)
    assert rel_err(list(net2.parameters()), list(ref.parameters())) < 1e-10
    assert rel_err(list(net3.parameters()), list(ref.parameters())) < 1e-10
    return opt3, ropt, list(net3.parameters()), list(ref.parameters())


@pytest.mark.parametrize("name", ["adam-amsgrad-wd", "sgd-momentum"])
def test_optimizer_state_dict_round_trip(name):
    check_state_dict_round_trip(OPTIMIZERS[name])


def test_lr_scheduler_between_fit_chunks():
    x, y, net, ref = problem()
    opt, ropt = torch.optim.Adam(net.parameters(), lr=0.1), torch.optim.Adam(ref.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    rsched = torch.optim.lr_scheduler.StepLR(ropt, step_size=1, gamma=0.5)
    trainer, model = fusedgrad.Trainer(net, opt), native(ref)
    for _ in range(4):
        trainer.fit(x, y, 5)
        sched.step()
        for _ in range(5):
            reference_step(model, ropt, x, y)
        rsched.step()
    assert rel_err(list(net.parameters()), list(ref.parameters())) < 1e-10


def test_several_param_groups_with_their_own_options():
    x, y, net, ref = problem()

    def make(m):
        return torch.optim.Adam([
            {"params": m.linear1.parameters(), "lr": 0.01, "weight_decay": 0.1},
            {"params": m.linear2.parameters(), "betas": (0.5, 0.9)},
        ], lr=0.05)

    opt, ropt = make(net), make(ref)
    fusedgrad.Trainer(net, opt).fit(x, y, 15)
    model = native(ref)
    for _ in range(15):
        reference_step(model, ropt, x, y)
    assert rel_err(list(net.parameters()), list(ref.parameters())) < 1e-10


def test_grad_buffers_persist_across_steps():
    x, y, net, _ = problem()
    trainer = fusedgrad.Trainer(net, torch.optim.SGD(net.parameters(), lr=0.1))
    trainer.step(x, y)
    buffers = [p.grad for p in net.parameters()]
    trainer.fit(x, y, 3)
    assert all(p.grad is b for p, b in zip(net.parameters(), buffers))


def test_deterministic_across_thread_counts():
    """Many rows: the step's row chunks run in parallel, their sums in a fixed order."""
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            x, y, net, _ = problem(n=20000, d=3, h=16, o=2, dtype=torch.float32)
            fusedgrad.Trainer(net, torch.optim.Adam(net.parameters(), lr=0.01)).fit(x, y, 3)
            results.append([p.detach().clone() for p in net.parameters()])
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("d, o", [(1, 1), (2, 1), (3, 1), (1, 2)])  # the first two: compile-time widths
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch, shuffle", [(None, False), (37, True), (300, False)])
def test_narrow_widths_kernels(d, o, bias, batch, shuffle):
    """D ∈ {1, 2} with O = 1 and σ run a kernel with the widths as compile-time constants
    and a fused backward pass (csrc/trainer/train_cpu.cpp, chunk_sums_any_widths); their
    neighbours run the general one. Both against the reference loop, with blocks of
    whole and partial lane vectors (n = 300: a 256-row block and a 44-row one)."""
    x, y, net, ref = problem(300, d, 20, o, bias=bias, seed=d * 10 + o)
    opt, ropt = OPTIMIZERS["adam"](net.parameters()), OPTIMIZERS["adam"](ref.parameters())
    steps = 12
    trainer = fusedgrad.Trainer(net, opt)
    expected = "trainer-narrow-fixed" if (d, o) in ((1, 1), (2, 1)) else "trainer-narrow"
    assert fusedgrad.explain(trainer, x, y)["path"] == expected
    losses = trainer.fit(x, y, steps, batch_size=batch, shuffle=shuffle, generator=torch.Generator().manual_seed(2))
    rows = batches(300, batch, steps, shuffle, torch.Generator().manual_seed(2)) if batch else [slice(None)] * steps
    ref_losses = torch.stack([reference_step(native(ref), ropt, x[r], y[r]) for r in rows])
    err = rel_err(list(net.parameters()), list(ref.parameters()))
    assert err < 1e-10, f"parameters differ by {err:.2e}"
    torch.testing.assert_close(losses, ref_losses, rtol=1e-9, atol=1e-12)


def test_many_rows_against_reference():
    x, y, net, ref = problem(n=5000, d=16, h=64, o=4)
    opt, ropt = torch.optim.Adam(net.parameters(), lr=0.01), torch.optim.Adam(ref.parameters(), lr=0.01)
    fusedgrad.Trainer(net, opt).fit(x, y, 3)
    model = native(ref)
    for _ in range(3):
        reference_step(model, ropt, x, y)
    assert rel_err(list(net.parameters()), list(ref.parameters())) < 1e-10


# Wide layers (D·H + H·O >= 2048): the any-depth engine, with a layer wider than 128 (32→160→8) and
# without (32→64→8) (csrc/trainer/train_cpu.cpp: train_path_name). fusedgrad.explain asserts each.
WIDE = {"wider-than-128": ((32, 160, 8), "trainer-engine"), "engine": ((32, 64, 8), "trainer-engine")}


@pytest.mark.parametrize("batch", [None, 100])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("wide", list(WIDE))
def test_wide_layers(wide, batch, bias):
    (d, h, o), path = WIDE[wide]
    x, y, net, ref = problem(n=300, d=d, h=h, o=o, bias=bias)
    opt, ropt = torch.optim.AdamW(net.parameters(), lr=0.01), torch.optim.AdamW(ref.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(3)
    trainer = fusedgrad.Trainer(net, opt)
    assert fusedgrad.explain(trainer, x, y)["path"] == path
    losses = trainer.fit(x, y, 6, batch_size=batch, generator=g)
    model = native(ref)
    rows = batches(300, batch, 6, True, torch.Generator().manual_seed(3)) if batch else [slice(None)] * 6
    ref_losses = torch.stack([reference_step(model, ropt, x[r], y[r]) for r in rows])
    assert rel_err(list(net.parameters()), list(ref.parameters())) < 1e-10
    torch.testing.assert_close(losses, ref_losses, rtol=1e-10, atol=0)
    for a, b in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-13)


def test_zero_steps_and_callbacks():
    x, y, net, ref = problem()
    trainer = fusedgrad.Trainer(net, torch.optim.Adam(net.parameters(), lr=0.05))
    assert trainer.fit(x, y, 0).shape == (0,)
    seen = []

    def callback(step, loss):
        seen.append((step, loss.item()))
        return step < 6

    losses = trainer.fit(x, y, 20, callback=callback, callback_every=3)
    assert [s for s, _ in seen] == [3, 6]  # stopped by the callback after step 6
    assert losses.shape == (6,)
    assert seen[1][1] == losses[5].item()


def test_progress_bar(capsys):
    x, y, net, _ = problem()
    losses = fusedgrad.Trainer(net, torch.optim.Adam(net.parameters(), lr=0.05)).fit(x, y, 50, progress=True)
    assert losses.shape == (50,)


def test_keyboard_interrupt_stops_at_a_step_boundary():
    """Ctrl-C (SIGINT to the main thread, sent from another thread) during a long fit: the
    losses so far come back and the parameters, gradients and optimizer state are exactly those
    of a reference run of that many steps. (Adam's step count must equal the steps returned;
    the parameters are compared after an SGD run, whose rounding differences do not grow over
    the thousands of steps that pass before the interrupt, as Adam's may.)"""
    # A process started in the background may ignore SIGINT, and interrupt_main() then does
    # nothing: install Python's own handler for the test.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _interrupted_runs()
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupted_runs():
    steps = 200_000  # ~10 s or more: the interrupt comes long before the end
    for make in (lambda p: torch.optim.Adam(p, lr=0.01), lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9)):
        x, y, net, ref = problem(n=2000, d=4, h=32, o=2)
        opt, ropt = make(net.parameters()), make(ref.parameters())
        timer = threading.Timer(0.3, _thread.interrupt_main)
        timer.start()
        try:
            losses = fusedgrad.Trainer(net, opt).fit(x, y, steps)
        finally:
            timer.cancel()
        done = losses.shape[0]
        assert 0 < done < steps
        if isinstance(opt, torch.optim.Adam):
            assert opt.state[net.linear1.weight]["step"].item() == done
            continue
        model = native(ref)
        ref_losses = torch.stack([reference_step(model, ropt, x, y) for _ in range(done)])
        torch.testing.assert_close(losses, ref_losses, rtol=1e-9, atol=1e-12)
        assert rel_err(list(net.parameters()), list(ref.parameters())) < 1e-9
        assert state_err(opt, ropt, list(net.parameters()), list(ref.parameters())) < 1e-8


def test_nan_and_inf_data_do_not_crash():
    x, y, net, _ = problem(dtype=torch.float32)
    x[3] = float("nan")
    y[5] = float("inf")
    losses = fusedgrad.Trainer(net, torch.optim.Adam(net.parameters(), lr=0.05)).fit(x, y, 3)
    assert not torch.isfinite(losses).any()


def test_saturated_sigmoid_matches_torch():
    """Huge pre-activations: σ saturates to exactly 0 and 1 like torch.sigmoid (no NaN)."""
    x, y, net, ref = problem(n=50, d=2, h=8, o=1)
    with torch.no_grad():
        for m in (net, ref):
            m.linear1.weight.mul_(800.0)
    opt, ropt = torch.optim.SGD(net.parameters(), lr=0.01), torch.optim.SGD(ref.parameters(), lr=0.01)
    fusedgrad.Trainer(net, opt).fit(x, y, 3)
    model = native(ref)
    for _ in range(3):
        reference_step(model, ropt, x, y)
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert rel_err(list(net.parameters()), list(ref.parameters())) < 1e-10


def test_no_allocation_per_step():
    """Steady state: the work buffers live across steps, so the allocator events of a fit
    do not grow with the number of steps (torch.profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    x, y, net, _ = problem(n=100, d=1, h=20, o=1, dtype=torch.float32)
    trainer = fusedgrad.Trainer(net, torch.optim.Adam(net.parameters(), lr=0.05))
    trainer.fit(x, y, 5)

    def allocations(steps):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            trainer.fit(x, y, steps)
        return sum(1 for e in prof.events() if e.name == "[memory]" and e.cpu_memory_usage > 0)

    assert allocations(1000) == allocations(10)


# ---------------------------------------------------------------------------- refusals


def _expect(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


def test_refused_optimizers():
    net = fusedgrad.FusedMLP(1, 4, 1)

    class MyAdam(torch.optim.Adam):
        pass

    _expect(TypeError, r"fusedgrad\.Trainer: argument 'optimizer' must be a " + re.escape(SUPPORTED) +
            r", got torch\.optim\.adadelta\.Adadelta", fusedgrad.Trainer, net,
            torch.optim.Adadelta(net.parameters()))
    _expect(TypeError, "got .*MyAdam", fusedgrad.Trainer, net, MyAdam(net.parameters()))
    _expect(ValueError, r"param_groups\[0\] has capturable=True", fusedgrad.Trainer, net,
            torch.optim.Adam(net.parameters(), capturable=True))
    _expect(ValueError, r"param_groups\[0\] has differentiable=True", fusedgrad.Trainer, net,
            torch.optim.SGD(net.parameters(), lr=0.1, differentiable=True))
    _expect(ValueError, r"parameter 'linear2.bias' is not in the optimizer", fusedgrad.Trainer, net,
            torch.optim.SGD(list(net.parameters())[:3], lr=0.1))
    extra = nn.Parameter(torch.zeros(3))
    _expect(ValueError, r"holds 1 parameter\(s\) that are not part of the network", fusedgrad.Trainer, net,
            torch.optim.SGD(list(net.parameters()) + [extra], lr=0.1))
    _expect(TypeError, "argument 'net' must be a fusedgrad.FusedMLP", fusedgrad.Trainer,
            nn.Linear(2, 2), torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1))
    _expect(ValueError, "argument 'reduction' must be 'mean' or 'sum', got 'none'", fusedgrad.Trainer, net,
            torch.optim.SGD(net.parameters(), lr=0.1), reduction="none")


def test_refused_optimizer_step_hooks():
    net = fusedgrad.FusedMLP(1, 4, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    handle = opt.register_step_post_hook(lambda *args: None)
    _expect(RuntimeError, "the optimizer has step hooks", fusedgrad.Trainer, net, opt)
    handle.remove()
    fusedgrad.Trainer(net, opt)


def test_refused_parameters():
    net = fusedgrad.FusedMLP(1, 4, 1)
    net.linear1.bias.requires_grad_(False)
    _expect(ValueError, r"parameter 'linear1.bias' does not require grad \(frozen\)", fusedgrad.Trainer, net,
            torch.optim.SGD(net.parameters(), lr=0.1))
    net = fusedgrad.FusedMLP(1, 4, 1)
    net.linear2.weight.register_hook(lambda g: g)
    _expect(ValueError, r"parameter 'linear2.weight' has a tensor hook \(Tensor.register_hook\)", fusedgrad.Trainer, net,
            torch.optim.SGD(net.parameters(), lr=0.1))
    net = fusedgrad.FusedMLP(1, 4, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    trainer = fusedgrad.Trainer(net, opt)
    net.linear1.weight.register_post_accumulate_grad_hook(lambda p: None)  # added after construction
    x, y = torch.zeros(3, 1), torch.zeros(3, 1)
    _expect(ValueError, r"'linear1.weight' has a post-accumulate-grad hook", trainer.step, x, y)
    net = fusedgrad.FusedMLP(1, 4, 1)
    trainer = fusedgrad.Trainer(net, torch.optim.SGD(net.parameters(), lr=0.1))
    with torch.autograd.detect_anomaly():
        _expect(RuntimeError, r"Trainer.step: anomaly detection is on", trainer.step, x, y)


def test_refused_data():
    net = fusedgrad.FusedMLP(2, 4, 3)
    trainer = fusedgrad.Trainer(net, torch.optim.SGD(net.parameters(), lr=0.1))
    x, y = torch.zeros(5, 2), torch.zeros(5, 3)
    _expect(ValueError, r"Trainer.step: argument 'x' must have shape \(\*, in_features\) = \(\*, 2\), got \(5, 3\)",
            trainer.step, torch.zeros(5, 3), y)
    _expect(ValueError, r"Trainer.step: argument 'target' must have the prediction's shape .* = \(5, 3\), got \(5, 1\)",
            trainer.step, x, torch.zeros(5, 1))
    _expect(TypeError, r"Trainer.fit: arguments 'x' and 'target' must have the parameters' dtype torch.float32, "
            r"got torch.float64", trainer.fit, x.double(), y.double(), 2)
    _expect(TypeError, r"Trainer.step: argument 'x' must be a torch.Tensor, got list", trainer.step, [[1.0, 2.0]], y)
    _expect(ValueError, r"Trainer.fit: argument 'steps' must be an int >= 0, got -1", trainer.fit, x, y, -1)
    _expect(ValueError, r"Trainer.fit: argument 'batch_size' must be an int >= 1 or None, got 0",
            trainer.fit, x, y, 2, batch_size=0)
    _expect(ValueError, r"Trainer.fit: argument 'callback_every' must be an int >= 1, got 0",
            trainer.fit, x, y, 2, callback=print, callback_every=0)
    _expect(TypeError, r"Trainer.fit: argument 'callback' must be callable, got int", trainer.fit, x, y, 2,
            callback=3)
    # wrong types are TypeErrors, as torch raises them; wrong values ValueErrors
    _expect(TypeError, r"Trainer.fit: argument 'steps' must be an int >= 0, got float", trainer.fit, x, y, 2.0)
    _expect(TypeError, r"Trainer.fit: argument 'steps' must be an int >= 0, got bool", trainer.fit, x, y, True)
    _expect(TypeError, r"Trainer.fit: argument 'batch_size' must be an int >= 1 or None, got str",
            trainer.fit, x, y, 2, batch_size="8")
    _expect(TypeError, r"Trainer.fit: argument 'callback_every' must be an int >= 1, got float",
            trainer.fit, x, y, 2, callback=print, callback_every=1.5)
    _expect(ValueError, r"Trainer.step: argument 'x' has no rows", trainer.step, torch.zeros(0, 2),
            torch.zeros(0, 3))


@pytest.mark.parametrize("hidden", [20, [8, 6]])
@pytest.mark.parametrize("call", ["step", "fit"])
def test_first_call_makes_grads_like_backward(hidden, call, monkeypatch):
    """A new Trainer leaves .grad None until its first step (as backward() would), and that first
    call makes the gradients in C++ (the one-hidden-layer fast route, the engine's call), not in
    Trainer._prepare: .grad afterwards is the last step's gradient, exactly the native loop's."""
    torch.manual_seed(3)
    x = torch.rand(30, 2, dtype=torch.float64)
    y = torch.sin(3 * x[:, :1])
    net = fusedgrad.FusedMLP(2, hidden, 1, dtype=torch.float64, activation="tanh")
    ref = net.to_module(copy=True)  # nn.Sequential of Linear and Tanh: native autograd
    trainer = fusedgrad.Trainer(net, torch.optim.Adam(net.parameters(), lr=0.05))
    assert all(p.grad is None for p in net.parameters())
    made = []
    original = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: made.append(1) or original(*a, **k))
    steps = 1 if call == "step" else 4
    trainer.step(x, y) if call == "step" else trainer.fit(x, y, steps)
    monkeypatch.undo()
    assert made == [], "the first call's gradients were made in Python"
    ropt = torch.optim.Adam(ref.parameters(), lr=0.05)
    for _ in range(steps):
        reference_step(ref, ropt, x, y)
    for p, r in zip(net.parameters(), ref.parameters()):
        assert p.grad is not None and p.grad.is_contiguous()
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("hidden", [20, [8, 6]])
def test_first_call_refused_leaves_grads_none(hidden):
    """A first call refused before any step (here: x of the wrong width) leaves no .grad behind."""
    net = fusedgrad.FusedMLP(2, hidden, 1, dtype=torch.float64)
    trainer = fusedgrad.Trainer(net, torch.optim.SGD(net.parameters(), lr=0.1))
    with pytest.raises(ValueError):
        trainer.fit(torch.rand(10, 3, dtype=torch.float64), torch.rand(10, 1, dtype=torch.float64), 2)
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("name", ["adam-amsgrad-wd", "adamw", "sgd-dampening-wd", "sgd-nesterov-maximize"])
@pytest.mark.parametrize("hidden,bias", [([8, 6], True), ([5, 4, 3], False)])
def test_deep_fast_route_equals_python_route(name, hidden, bias, monkeypatch):
    """Deeper networks: fit and step read the optimizer in C++ (_C.deep_train_steps_fast, no
    Trainer._prepare) when they can, and in Python otherwise — bitwise the same parameters, .grad,
    optimizer state and losses, mini-batches included."""
    torch.manual_seed(4)
    x = torch.rand(40, 3, dtype=torch.float64)
    y = torch.cos(2 * x[:, :2]).contiguous()
    net_a = fusedgrad.FusedMLP(3, hidden, 2, bias=bias, dtype=torch.float64, activation="tanh")
    net_b = copy.deepcopy(net_a)
    opt_a, opt_b = OPTIMIZERS[name](net_a.parameters()), OPTIMIZERS[name](net_b.parameters())
    fast, slow = fusedgrad.Trainer(net_a, opt_a), fusedgrad.Trainer(net_b, opt_b)
    slow._fast_step = False

    def no_python_route(*args, **kwargs):
        raise AssertionError("the fast route declined")
    ga, gb = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    for _ in range(3):
        with monkeypatch.context() as m:
            m.setattr(fast, "_prepare", no_python_route)
            la = fast.fit(x, y, 4, batch_size=15, generator=ga)
            sa = fast.step(x, y)
        assert torch.equal(la, slow.fit(x, y, 4, batch_size=15, generator=gb))
        assert torch.equal(sa, slow.step(x, y))
    for a, b in zip(net_a.parameters(), net_b.parameters()):
        assert torch.equal(a, b) and torch.equal(a.grad, b.grad)
    assert state_err(opt_a, opt_b, list(net_a.parameters()), list(net_b.parameters())) == 0


def test_deep_fast_route_declines_what_it_cannot_run():
    """What the deep C++ route does not run goes to the Python route, which runs or refuses it:
    a tensor lr runs there; a gradient hook is refused there by name."""
    net = fusedgrad.FusedMLP(2, [4, 4], 1, dtype=torch.float64)
    x, y = torch.rand(8, 2, dtype=torch.float64), torch.rand(8, 1, dtype=torch.float64)
    opt = torch.optim.Adam(net.parameters(), lr=torch.tensor(0.01))
    ref = net.to_module(copy=True)
    ropt = torch.optim.Adam(ref.parameters(), lr=torch.tensor(0.01))
    fusedgrad.Trainer(net, opt).fit(x, y, 3)
    for _ in range(3):
        reference_step(ref, ropt, x, y)
    for p, r in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-14)
    net.linear2.weight.register_hook(lambda g: g)
    with pytest.raises(ValueError, match="linear2.weight"):
        fusedgrad.Trainer(net, torch.optim.SGD(net.parameters(), lr=0.1)).fit(x, y, 1)


@pytest.mark.parametrize("layout", ["plain", "leading-dims", "non-contiguous", "x-requires-grad", "float32-x"])
def test_deep_step_fast_route(layout, monkeypatch):
    """Trainer.step on the engine takes one C++ call (_C.deep_train_step_fast) for 2-D contiguous
    data, and the Python route for the rest ((*, D) inputs, strided or grad-requiring tensors),
    which prepares them or raises: the same steps as torch.optim either way."""
    torch.manual_seed(1)
    net = fusedgrad.FusedMLP(3, [6, 5], 2, dtype=torch.float64, activation="tanh")
    ref = net.to_module(copy=True)
    opt, ropt = torch.optim.Adam(net.parameters(), lr=0.02), torch.optim.Adam(ref.parameters(), lr=0.02)
    x, y = torch.rand(12, 3, dtype=torch.float64), torch.rand(12, 2, dtype=torch.float64)
    taken = []
    real = _C.deep_train_step_fast
    monkeypatch.setattr(_C, "deep_train_step_fast", functools.partial(_spy, real, taken))
    trainer = fusedgrad.Trainer(net, opt)
    xs, ys = {"plain": (x, y), "leading-dims": (x.view(3, 4, 3), y.view(3, 4, 2)),
              "non-contiguous": (x.t().contiguous().t(), y), "x-requires-grad": (x.clone().requires_grad_(), y),
              "float32-x": (x.float(), y)}[layout]
    if layout == "float32-x":
        with pytest.raises(TypeError, match=r"fusedgrad\.Trainer\.step: arguments 'x' and 'target' must have"):
            trainer.step(xs, ys)
        assert taken == [False] and all(p.grad is None for p in net.parameters())
        return
    for _ in range(3):
        loss = trainer.step(xs, ys)
        ref_loss = reference_step(ref, ropt, x, y)
        assert loss.shape == () and abs(loss.item() - ref_loss.item()) <= 1e-12 * abs(ref_loss.item())
    assert taken == [layout == "plain"] * 3
    for p, r in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-14)


def _spy(real, taken, *args):
    """Calls the C++ route and records whether it took the call (None: declined)."""
    out = real(*args)
    taken.append(out is not None)
    return out
