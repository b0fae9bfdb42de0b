"""The torch internals fusedgrad reads (fusedgrad/_compat.py): the import-time self-test passes on this
torch, a failed check makes the fast routes refuse (naming the torch version) or take the autograd
route, and the optimizer logic fusedgrad repeats is pinned against torch's own, option by option."""
import re

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import fusedgrad
from fusedgrad import _compat


def test_self_test_passes_on_this_torch():
    assert _compat.FAILURES == []
    assert _compat._self_test() == []


def test_a_failed_check_makes_the_trainer_refuse(monkeypatch):
    monkeypatch.setattr(_compat, "FAILURES", ["torch.optim.Optimizer has no dict '_optimizer_step_pre_hooks'"])
    net = fusedgrad.FusedMLP(1, 4, 1)
    with pytest.raises(RuntimeError, match=rf"fusedgrad.Trainer: .*torch {re.escape(torch.__version__)}.*"
                                           r"_optimizer_step_pre_hooks"):
        fusedgrad.Trainer(net, torch.optim.Adam(net.parameters()))


def test_unreadable_hooks_send_loss_backward_through_backward(monkeypatch):
    monkeypatch.setattr(_compat, "FAILURES", ["a Python hook on a gradient accumulator is not recognised"])
    assert not _compat.hooks_readable()
    torch.manual_seed(0)
    for hidden in (20, [6, 5]):
        net = fusedgrad.FusedMLP(3, hidden, 2, dtype=torch.float64)
        ref = net.to_module(copy=True)
        x, y = torch.randn(9, 3, dtype=torch.float64), torch.randn(9, 2, dtype=torch.float64)
        net.loss_backward(x, y)
        torch.nn.functional.mse_loss(ref(x), y).backward()
        for p, q in zip(net.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)


def test_an_optimizer_without_its_hook_dictionaries_is_refused():
    net = fusedgrad.FusedMLP(1, 4, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    del opt._optimizer_step_pre_hooks
    with pytest.raises(RuntimeError, match=r"the optimizer has no '_optimizer_step_pre_hooks' dictionary"):
        fusedgrad.Trainer(net, opt)


def test_step_hooks_on_the_optimizer_and_global_are_seen():
    net = fusedgrad.FusedMLP(1, 4, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    assert not _compat.optimizer_step_hooks(opt)
    handle = register_optimizer_step_pre_hook(lambda *a: None)
    try:
        assert _compat.optimizer_step_hooks(opt)
    finally:
        handle.remove()
    handle = opt.register_step_post_hook(lambda *a: None)
    assert _compat.optimizer_step_hooks(opt)
    handle.remove()


@pytest.mark.parametrize("options", [{}, {"amsgrad": True}, {"fused": True}, {"foreach": True},
                                     {"weight_decay": 0.1}, {"maximize": True}], ids=repr)
@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("default_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hidden", [20, [8, 8]])
def test_adam_state_created_as_torchs_first_step_creates_it(cls, options, default_dtype, hidden):
    """The state a fresh optimizer's first fused step creates (fusedgrad/_optimizers.py: _init_adam,
    scalar_dtype — copies of torch.optim's) has the keys, dtypes, shapes and values torch's own first
    step gives, and the parameters end equal."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        torch.manual_seed(0)
        net = fusedgrad.FusedMLP(2, hidden, 1, dtype=torch.float64)
        ref = fusedgrad.FusedMLP(2, hidden, 1, dtype=torch.float64)
        ref.load_state_dict(net.state_dict())
        x, y = torch.randn(16, 2, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
        opt, ropt = cls(net.parameters(), lr=0.01, **options), cls(ref.parameters(), lr=0.01, **options)
        fusedgrad.Trainer(net, opt).step(x, y)
        ropt.zero_grad()
        ref.loss(x, y).backward()
        ropt.step()
        for p, q in zip(net.parameters(), ref.parameters()):
            got, want = opt.state[p], ropt.state[q]
            assert set(got) == set(want)
            for key in want:
                assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
                assert got[key].device == want[key].device, key
                torch.testing.assert_close(got[key], want[key], rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15)
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
def test_float32_tensor_lr_rounding_is_torchs(cls):
    """A float32 tensor lr: Adam's single-tensor update computes lr / (1 − β1^t) (and 1 − lr·λ) in float32;
    the fused update emulates that (optimizers.h: AdamFamily::lr_float32_tensor). float64 parameters, so the
    gradients agree to ~1e-16 and the lr's float32 rounding (~1e-8 relative) is what the comparison sees."""
    def run(lr, fused):
        torch.manual_seed(0)
        net = fusedgrad.FusedMLP(1, 20, 1, dtype=torch.float64)
        x, y = torch.randn(32, 1, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)
        opt = cls(net.parameters(), lr=lr, weight_decay=0.01, foreach=False)
        trainer = fusedgrad.Trainer(net, opt)
        for _ in range(5):
            if fused:
                trainer.step(x, y)
            else:
                opt.zero_grad()
                net.loss(x, y).backward()
                opt.step()
        return [p.detach().clone() for p in net.parameters()]

    fused, torchs = run(torch.tensor(0.0123), True), run(torch.tensor(0.0123), False)
    as_float = run(0.0123, False)
    for a, b, c in zip(fused, torchs, as_float):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-16)
        assert (b - c).abs().max() > 1e-12  # the test can see the rounding it checks
