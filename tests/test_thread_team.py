"""The trainer's step team (csrc/engine/thread_team.h): a fit of one model whose steps split into
chunks keeps its threads for the whole call and runs each step's chunks on them.

What must hold: the team changes who runs a chunk, never a result — the same bits at 1 and 2
threads and as single steps (which run no team), the same numbers as torch.optim — and a failure
inside a team's call propagates (no hang, no second update: test_no_double_update.py's deep-team
shape)."""
import pytest
import torch

import fusedgrad

# 100×1→[20]×3→1 tanh, the deep bench's curve fit (86 k multiply-adds a step: two chunks, a team of
# two), and a one-hidden-layer net the trainer runs on the engine, with mini-batches.
CASES = {"curve": dict(D=1, H=20, O=1, layers=3, act="tanh", N=100, batch=None),
         "wide-one-hidden": dict(D=32, H=64, O=8, layers=1, act="relu", N=256, batch=None),
         "mini-batch": dict(D=2, H=24, O=3, layers=2, act="sigmoid", N=300, batch=64)}
STEPS = 20


def make(case, dtype=torch.float64):
    c = CASES[case]
    g = torch.Generator().manual_seed(1)
    x = torch.rand(c["N"], c["D"], generator=g, dtype=dtype) * 4 - 2
    y = torch.sin(x.sum(1, keepdim=True)).expand(c["N"], c["O"]).contiguous()
    torch.manual_seed(0)
    net = fusedgrad.FusedMLP(c["D"], c["H"], c["O"], hidden_layers=c["layers"], activation=c["act"], dtype=dtype)
    return net, x, y, c["batch"]


def batch_rows(step, N, batch):
    """The rows of step `step` of an unshuffled fit (every epoch in order, the last batch short)."""
    if batch is None:
        return slice(None)
    first = step % -(-N // batch) * batch
    return slice(first, first + batch)


def fused_run(case, threads, single_steps=False):
    torch.set_num_threads(threads)
    net, x, y, batch = make(case)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    trainer = fusedgrad.Trainer(net, opt)
    info = fusedgrad.explain(trainer, x, y)
    assert info["path"] == "trainer-engine"
    led = fusedgrad._C._testing_teams_led()
    if single_steps:  # Trainer.step: one step a call, no team
        for step in range(STEPS):
            rows = batch_rows(step, x.shape[0], batch)
            trainer.step(x[rows], y[rows])
    elif batch is None:
        trainer.fit(x, y, STEPS)
    else:
        trainer.fit(x, y, STEPS, batch_size=batch, shuffle=False)
    teams = fusedgrad._C._testing_teams_led() - led
    # the team ran where explain says it does, and only there
    assert (teams >= 1) == (info["team_threads"] > 1 and not single_steps), (teams, info)
    return info, [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("case", CASES)
def test_team_results_are_the_same_bits_at_any_thread_count(case, restore_threads):
    info2, two = fused_run(case, 2)
    info1, one = fused_run(case, 1)
    assert info2["team_threads"] == 2 and info1["team_threads"] == 1 and info1["chunks"] >= 2
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_the_curve_fit_runs_a_team_of_two(restore_threads):
    torch.set_num_threads(2)
    net, x, y, _ = make("curve")
    info = fusedgrad.explain(fusedgrad.Trainer(net, torch.optim.Adam(net.parameters())), x, y)
    assert info["chunks"] == 2 and info["team_threads"] == 2
    # an ensemble or a tiny step keeps none
    small = fusedgrad.explain(fusedgrad.Trainer(net, torch.optim.Adam(net.parameters())), x[:10], y[:10])
    assert small["team_threads"] == 1


@pytest.mark.parametrize("case", CASES)
def test_team_fit_equals_single_steps_and_torch_optim(case, restore_threads):
    _, team = fused_run(case, 2)
    _, single = fused_run(case, 2, single_steps=True)  # one step per call: no team
    assert all(torch.equal(a, b) for a, b in zip(team, single))
    # torch.optim on the same net and data, in float64
    net, x, y, batch = make(case)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(STEPS):
        rows = batch_rows(step, x.shape[0], batch)
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x[rows]), y[rows]).backward()
        opt.step()
    for a, ref in zip(team, net.parameters()):
        torch.testing.assert_close(a, ref.detach(), rtol=1e-10, atol=1e-12)
