"""FusedMLP.loss_backward and the hooks backward() runs (fusedgrad/_hooks.py).

Without hooks loss_backward writes .grad itself. With a tensor hook, a
post-accumulate-grad hook or a Python hook on a parameter's gradient accumulator
it must leave exactly what net.loss(x, t).backward() leaves: the same .grad, the
same hook calls with the same gradients, the same side effects (a hook that
updates the parameter in backward). A C++ accumulator hook (DDP) is refused; the
2-process DDP run is in test_ddp_hooks.py.
"""
import pytest
import torch

import fusedgrad
from fusedgrad import _hooks

N, D, H, O = 12, 3, 5, 2


def make(seed=0):
    torch.manual_seed(seed)
    net = fusedgrad.FusedMLP(D, H, O, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(N, D, generator=gen, dtype=torch.float64)
    t = torch.randn(N, O, generator=gen, dtype=torch.float64)
    return net, x, t


def reference_step(net, x, t):
    net.loss(x, t).backward()


def fused_step(net, x, t):
    net.loss_backward(x, t)


def params(net):
    return dict(net.named_parameters())


def assert_same(a, b):
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=name)
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14, msg=f"{name}.grad")


def test_no_hooks_nothing_reported():
    net, _, _ = make()
    for p in net.parameters():
        assert _hooks.grad_hooks(p) == []
        assert _hooks.grad_hook_flags(p) == 0
    assert _hooks.direct_grad_write_ok("f", net.named_parameters())


@pytest.mark.parametrize("step", [reference_step, fused_step], ids=["backward", "loss_backward"])
def test_tensor_hook_runs_and_scales_the_gradient(step):
    """A tensor hook that doubles w1's gradient and records it: same calls, same .grad."""
    runs = {}
    for which, fn in (("ref", reference_step), ("got", step)):
        net, x, t = make()
        seen = []
        net.linear1.weight.register_hook(lambda g, seen=seen: (seen.append(g.clone()), g * 2)[1])
        for _ in range(2):  # the second call accumulates onto .grad
            fn(net, x, t)
        runs[which] = (net, seen)
    (ref, ref_seen), (got, got_seen) = runs["ref"], runs["got"]
    assert len(got_seen) == len(ref_seen) == 2
    for a, b in zip(got_seen, ref_seen):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert_same(got, ref)
    # The hook did change the gradient: twice what an unhooked backward gives.
    plain, x, t = make()
    reference_step(plain, x, t)
    torch.testing.assert_close(got.linear1.weight.grad, 2 * 2 * plain.linear1.weight.grad)


def test_post_accumulate_grad_hook_optimizer_in_backward():
    """The optimizer-in-backward pattern: each parameter steps itself in its
    post-accumulate-grad hook and clears its .grad. Skipping the hook would leave
    the parameters unchanged and .grad set."""
    nets = {}
    for which, fn in (("ref", reference_step), ("got", fused_step)):
        net, x, t = make()
        calls = []
        for name, p in net.named_parameters():
            def hook(param, name=name, calls=calls):
                calls.append(name)
                with torch.no_grad():
                    param.add_(param.grad, alpha=-0.1)
                param.grad = None
            p.register_post_accumulate_grad_hook(hook)
        initial = {k: v.detach().clone() for k, v in net.named_parameters()}
        for _ in range(3):
            fn(net, x, t)
        nets[which] = (net, sorted(calls), initial)
    (ref, ref_calls, initial), (got, got_calls, _) = nets["ref"], nets["got"]
    assert got_calls == ref_calls and len(got_calls) == 3 * 4
    for (name, p), (_, q) in zip(got.named_parameters(), ref.named_parameters()):
        assert p.grad is None and q.grad is None
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=name)
        assert (p - initial[name]).abs().max() > 1e-3  # the hooks did train


def test_accumulator_hooks_run():
    """Python pre- and post-hooks on the AccumulateGrad node (what FSDP-style code
    registers): run by loss_backward as by backward()."""
    counts = {}
    for which, fn in (("ref", reference_step), ("got", fused_step)):
        net, x, t = make()
        w = net.linear2.weight
        acc = w.view_as(w).grad_fn.next_functions[0][0]
        calls = []
        acc.register_prehook(lambda grads, calls=calls: calls.append("pre"))
        acc.register_hook(lambda grads_in, grads_out, calls=calls: calls.append("post"))
        assert _hooks.grad_hooks(w) == [
            "a Python hook on its gradient accumulator (AccumulateGrad.register_hook/register_prehook)"]
        fn(net, x, t)
        counts[which] = (calls, net)
    assert counts["got"][0] == counts["ref"][0] == ["pre", "post"]
    assert_same(counts["got"][1], counts["ref"][1])


def test_removed_hooks_no_longer_count():
    net, x, t = make()
    w = net.linear1.weight
    for register in (w.register_hook, w.register_post_accumulate_grad_hook):
        handle = register(lambda *a: None)
        assert _hooks.grad_hooks(w) != []
        handle.remove()
        assert _hooks.grad_hooks(w) == []
    assert _hooks.direct_grad_write_ok("f", net.named_parameters())


def test_cpp_accumulator_hook_is_refused(monkeypatch):
    """A hook object that is not one of torch's Python hook wrappers counts as C++
    (DDP's reducer): loss_backward refuses instead of skipping it."""
    net, x, t = make()
    w = net.linear1.weight
    monkeypatch.setattr(_hooks, "grad_hook_flags",
                        lambda p: _hooks.ACCUMULATOR_CPP_HOOK if p is w else 0)
    # The C++ fast path sees no hook here (the monkeypatch is Python-only), so force the Python path
    # as a declined call does: a tensor subclass goes through it.
    with pytest.raises(RuntimeError, match=r"^FusedMLP\.loss_backward: parameter 'linear1\.weight' has a C\+\+ hook "
                                           r"on its gradient accumulator.*DistributedDataParallel"):
        with torch.autograd.detect_anomaly(check_nan=False):  # anomaly mode makes the C++ path decline
            net.loss_backward(x, t)
    assert all(p.grad is None for p in net.parameters())


def test_anomaly_mode_takes_the_autograd_route():
    """detect_anomaly checks backward()'s gradients: loss_backward runs backward() under it."""
    net, x, t = make()
    ref, _, _ = make()
    with torch.autograd.detect_anomaly(check_nan=True):
        fused_step(net, x, t)
    reference_step(ref, x, t)
    assert_same(net, ref)
    with torch.no_grad():
        net.linear1.weight[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="nan"):
        with torch.autograd.detect_anomaly(check_nan=True):
            net.loss_backward(x, t)


def test_hook_on_one_parameter_others_plain():
    """Only b2 hooked: every gradient still equals backward()'s, the hook ran once."""
    net, x, t = make()
    ref, _, _ = make()
    seen = []
    net.linear2.bias.register_hook(lambda g: seen.append(1))
    ref.linear2.bias.register_hook(lambda g: None)
    fused_step(net, x, t)
    reference_step(ref, x, t)
    assert seen == [1]
    assert_same(net, ref)


def _cpp_post_hook_calls():
    return fusedgrad._C._testing_cpp_post_accumulate_grad_hook_calls()


@pytest.mark.parametrize("hidden", [H, [H, 4]], ids=["depth 1", "depth 2"])
def test_cpp_post_accumulate_grad_hook_runs(hidden):
    """A post-accumulate-grad hook set from C++ (as a C++ extension sets one, impl::set_post_acc_grad_hooks):
    Python's hook dictionary does not show it, yet backward() runs it after writing .grad. It reads as a
    C++ tensor hook: loss_backward takes the autograd route and the hook runs, as with backward(), with
    backward()'s gradients; the fused Trainer, which writes .grad itself, refuses the parameter."""
    torch.manual_seed(0)
    nets = [fusedgrad.FusedMLP(D, hidden, O, dtype=torch.float64) for _ in range(3)]
    for net in nets[1:]:
        net.load_state_dict(nets[0].state_dict())
    ref, via_loss_backward, via_trainer = nets
    _, x, t = make()
    for net in nets:
        w = net.linear1.weight
        assert _hooks.grad_hook_flags(w) == 0
        fusedgrad._C._testing_set_cpp_post_accumulate_grad_hook(w)
        assert _hooks.grad_hook_flags(w) == _hooks.CPP_TENSOR_HOOK
        assert _hooks.grad_hooks(w) == [dict(_hooks._DESCRIPTIONS)[_hooks.CPP_TENSOR_HOOK]]
    before = _cpp_post_hook_calls()
    ref.loss(x, t).backward()
    assert _cpp_post_hook_calls() == before + 1
    via_loss_backward.loss_backward(x, t)
    assert _cpp_post_hook_calls() == before + 2
    assert_same(via_loss_backward, ref)
    with pytest.raises(ValueError, match=r"^fusedgrad\.Trainer: parameter 'linear1\.weight' has a tensor hook "
                                         r"registered from C\+\+ .*would skip it"):
        fusedgrad.Trainer(via_trainer, torch.optim.SGD(via_trainer.parameters(), lr=0.1))
    assert _cpp_post_hook_calls() == before + 2
