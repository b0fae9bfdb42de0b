"""No route of fusedgrad.Trainer can apply an optimizer step twice.

Trainer.step and Trainer.fit first try the fast C++ route (csrc/trainer/train_bindings.cpp), which
may decline a call — the Python route then runs it — but only before anything has been written. A
failure after the writing has begun (an out-of-memory in a GEMM, say) must propagate as an error: a
rerun by the Python route would update the parameters a second time.

The failure is injected with the test-only switch ``fusedgrad._C._testing_fail_after_first_update``
(csrc/trainer/train_step.h): while on, a fused run raises right after the optimizer update of the
first parameter, w1. Each test warms the optimizer up (so that the fast route takes the call),
copies model and optimizer, makes the failing call, and checks against one reference step of
torch.optim on the copy: w1 and its optimizer state are exactly one step on, every other parameter
and its state untouched. A second update of w1 (the old decline-and-rerun) fails the first check.
"""
import contextlib
import copy

import pytest
import torch

import fusedgrad
from fusedgrad import _C

OPTIMIZERS = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=0.05),
}
# (D, H, O): the direct-loop kernel and the GEMM kernel (D·H + H·O >= 2048, a layer wider than 128,
# else the engine takes it) of csrc/trainer/train_cpu.cpp; make() asserts the path through explain.
# "deep": two hidden layers, the engine's C++ route (csrc/trainer/deep_train.cpp: deep_train_steps_fast).
# "deep-team": 64 rows of 4→[32]×2→4, enough work for the step team of a fit (csrc/engine/thread_team.h):
# the failure is raised on the team's leader while its helper waits for work.
SHAPES = {"narrow": (1, 20, 1), "gemm": (32, 160, 8), "deep": (1, (8, 6), 1), "deep-team": (4, (32, 32), 4)}
PATHS = {(1, 20, 1): "trainer-narrow-fixed", (32, 160, 8): "trainer-engine", (1, (8, 6), 1): "trainer-engine",
         (4, (32, 32), 4): "trainer-engine"}
STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq")
STEP_FAILED = r"^fusedgrad\.Trainer\.{}: failed after the step had begun writing .*not retried.*test-only failure"


@contextlib.contextmanager
def failing_after_first_update():
    _C._testing_fail_after_first_update(True)
    try:
        yield
    finally:
        _C._testing_fail_after_first_update(False)


def make(shape, optimizer, num_models=None, n=64, seed=0):
    D, H, O = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, D, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.rand(n, O, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    if num_models is None:
        net = fusedgrad.FusedMLP(D, H, O, dtype=torch.float64)
    else:
        net = fusedgrad.FusedMLPEnsemble(num_models, D, H, O, dtype=torch.float64)
    opt = OPTIMIZERS[optimizer](net.parameters())
    trainer = fusedgrad.Trainer(net, opt)
    info = fusedgrad.explain(trainer, x, y)
    assert info["path"] == PATHS[shape]
    if shape == SHAPES["deep-team"]:
        assert info["team_threads"] == min(2, torch.get_num_threads())
    trainer.step(x, y)  # the first step creates the optimizer state; the fast route takes the next ones
    return x, y, net, opt, trainer


def reference_step(net, opt, x, y):
    """One step of torch.optim on a copy: what a single, complete update gives."""
    ref_net, ref_opt = copy.deepcopy((net, opt))
    ref_opt.zero_grad()
    ref_net.loss(x, y).sum().backward()
    ref_opt.step()
    return ref_net, ref_opt


def snapshot(net, opt):
    return [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in net.parameters()]


def check_one_update_of_w1_only(net, opt, before, ref_net, ref_opt):
    params, ref_params = list(net.parameters()), list(ref_net.parameters())
    names = [name for name, _ in net.named_parameters()]
    for i, (p, ref, (old, old_state), name) in enumerate(zip(params, ref_params, before, names)):
        state, ref_state = opt.state[p], ref_opt.state[ref]
        if i == 0:  # w1: updated exactly once
            assert not torch.equal(p, old), f"{name} was not updated: the failure was injected before any write"
            torch.testing.assert_close(p, ref, rtol=1e-10, atol=1e-12,
                                       msg=lambda m: f"{name} is not one step on (updated twice?): {m}")
            for key in STATE_KEYS:
                if key in state:
                    torch.testing.assert_close(state[key], ref_state[key], rtol=1e-10, atol=1e-12,
                                               msg=lambda m: f"state {key!r} of {name} is not one step on: {m}")
        else:  # the failure came before their updates: untouched
            assert torch.equal(p, old), f"{name} changed although the step failed before its update"
            for key in STATE_KEYS:
                if key in state:
                    assert torch.equal(state[key], old_state[key]), f"state {key!r} of {name} changed"
        if "step" in state:  # Adam's step count: at most one step on
            assert float(state["step"]) in (float(old_state["step"]), float(old_state["step"]) + 1)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_step_failing_after_an_update_raises_and_updates_once(shape, optimizer):
    x, y, net, opt, trainer = make(shape, optimizer)
    before = snapshot(net, opt)
    ref_net, ref_opt = reference_step(net, opt, x, y)
    with failing_after_first_update(), pytest.raises(RuntimeError, match=STEP_FAILED.format("step")):
        trainer.step(x, y)
    check_one_update_of_w1_only(net, opt, before, ref_net, ref_opt)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_fit_failing_after_an_update_raises_and_updates_once(shape, optimizer):
    x, y, net, opt, trainer = make(shape, optimizer)
    before = snapshot(net, opt)
    ref_net, ref_opt = reference_step(net, opt, x, y)
    led = _C._testing_teams_led()
    with failing_after_first_update(), pytest.raises(RuntimeError, match=STEP_FAILED.format("fit")):
        trainer.fit(x, y, 20)  # enough steps for the deep-team shape's thread team (at least 16)
    check_one_update_of_w1_only(net, opt, before, ref_net, ref_opt)
    if shape == SHAPES["deep-team"] and torch.get_num_threads() > 1:
        assert _C._testing_teams_led() == led + 1  # the failure was raised on a team's leader


@pytest.mark.parametrize("shape", ["narrow", "deep"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_ensemble_step_failing_after_an_update_raises_and_updates_once(shape, optimizer):
    """K models: the failure is raised inside the parallel loop over models, after the update of w1 for a
    group of models that step together (all four here: kModelGroup of train_cpu.cpp and deep_train.cpp)."""
    x, y, net, opt, trainer = make(SHAPES[shape], optimizer, num_models=4)
    before = snapshot(net, opt)
    ref_net, ref_opt = reference_step(net, opt, x, y)
    with failing_after_first_update(), pytest.raises(RuntimeError, match=STEP_FAILED.format("step")):
        trainer.step(x, y)
    check_one_update_of_w1_only(net, opt, before, ref_net, ref_opt)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_switch_off_trains_as_before(optimizer):
    """The switch is off by default, and off the fused steps are the reference's."""
    x, y, net, opt, trainer = make(SHAPES["narrow"], optimizer)
    ref_net, ref_opt = reference_step(net, opt, x, y)
    trainer.step(x, y)
    for p, ref in zip(net.parameters(), ref_net.parameters()):
        torch.testing.assert_close(p, ref, rtol=1e-10, atol=1e-12)
