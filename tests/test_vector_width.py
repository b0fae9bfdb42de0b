"""The engine's lane-vector width follows the CPU (csrc/engine/engine_kernels.h: vector_bytes_for).

64-byte vectors only where the AVX-512 clone runs: on an AVX2 CPU a 64-byte vector is two ymm
registers and the micro-kernel's accumulators spill (a 4096×32→[64]×4→8 loss and backward took
60 ms there against 4.9 ms with 32-byte vectors). Both widths' code is checked against autograd on
whatever CPU runs the tests, by forcing the width.
"""
import platform

import pytest
import torch
import torch.nn.functional as F

import fusedgrad
from fusedgrad import _C, deep

# What GCC's target_clones resolver asks of "arch=x86-64-v4" (x86-64 psABI, level v4), besides v3.
_V4_FLAGS = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


@pytest.fixture
def forced_width():
    yield _C._testing_force_vector_bytes
    _C._testing_force_vector_bytes(0)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or _cpu_flags() is None,
                    reason="reads the CPU's flags from /proc/cpuinfo (Linux x86-64)")
def test_width_is_the_cpus():
    flags = _cpu_flags()
    expected = 64 if _V4_FLAGS <= flags and {"avx2", "fma"} <= flags else 32
    assert _C.cpu_vector_bytes() == expected
    net = fusedgrad.FusedMLP(32, 64, 8, hidden_layers=4, activation="relu")
    info = fusedgrad.explain(net, torch.randn(4096, 32))
    # This net's widths pad no shorter with 32 bytes: 64-byte vectors wherever the CPU has them.
    assert info["vector_bytes"] == expected


def test_forcing_a_width_shows_in_explain_and_is_undone(forced_width):
    net = fusedgrad.FusedMLP(32, 64, 8, hidden_layers=4, activation="relu")
    x = torch.randn(512, 32)
    forced_width(64)
    assert _C.cpu_vector_bytes() == 64 and fusedgrad.explain(net, x)["vector_bytes"] == 64
    forced_width(32)
    assert _C.cpu_vector_bytes() == 32 and fusedgrad.explain(net, x)["vector_bytes"] == 32
    forced_width(0)
    assert fusedgrad.explain(net, x)["vector_bytes"] == _C.cpu_vector_bytes()
    with pytest.raises(RuntimeError, match="0, 32 or 64"):
        forced_width(16)


def _native(x, weights, biases, act):
    a = x
    for l, (w, b) in enumerate(zip(weights, biases)):
        a = F.linear(a, w, b)
        if l < len(weights) - 1:
            a = getattr(torch, act)(a)
    return a


@pytest.mark.parametrize("width", [32, 64])
@pytest.mark.parametrize("widths, act", [([32, 64, 64, 8], "relu"), ([5, 64, 33, 100, 3], "tanh"),
                                         ([2, 20, 20, 20, 1], "tanh")])
def test_each_width_matches_autograd(forced_width, width, widths, act):
    """Loss gradients, the prediction's backward and the input derivatives (jets) with each width's code."""
    forced_width(width)
    gen = torch.Generator().manual_seed(sum(widths))
    ws = [(torch.randn(b, a, dtype=torch.float64, generator=gen) / a ** 0.5).requires_grad_()
          for a, b in zip(widths, widths[1:])]
    bs = [torch.randn(b, dtype=torch.float64, generator=gen).requires_grad_() for b in widths[1:]]
    x = torch.randn(300, widths[0], dtype=torch.float64, generator=gen).requires_grad_()
    y = torch.randn(300, widths[-1], dtype=torch.float64, generator=gen)
    params = [x, *ws, *bs]

    fused = torch.autograd.grad(deep.mlp_loss(x, ws, bs, y, activation=act), params)
    native = torch.autograd.grad(F.mse_loss(_native(x, ws, bs, act), y), params)
    for f, n in zip(fused, native):
        torch.testing.assert_close(f, n, rtol=1e-10, atol=1e-12)

    g = torch.randn(300, widths[-1], dtype=torch.float64, generator=gen)
    fused = torch.autograd.grad(deep.mlp(x, ws, bs, activation=act), params, g)
    native = torch.autograd.grad(_native(x, ws, bs, act), params, g)
    for f, n in zip(fused, native):
        torch.testing.assert_close(f, n, rtol=1e-10, atol=1e-12)

    if act == "tanh":
        u, du, d2u = deep.derivatives(x, ws, bs, activation=act, order=2)
        du, d2u = du.sum(1), d2u.sum(1)  # of Σ_o u_o, what one autograd.grad gives
        loss = u.square().sum() + du.square().sum() + d2u.square().sum()
        fused = torch.autograd.grad(loss, [*ws, *bs])
        xx = x.detach().requires_grad_()
        un = _native(xx, ws, bs, act)
        dun = torch.autograd.grad(un.sum(), xx, create_graph=True)[0]
        d2un = torch.stack([torch.autograd.grad(dun[:, d].sum(), xx, create_graph=True)[0][:, d]
                            for d in range(widths[0])], 1)
        torch.testing.assert_close(du, dun, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(d2u, d2un, rtol=1e-10, atol=1e-12)
        native = torch.autograd.grad(un.square().sum() + dun.square().sum() + d2un.square().sum(), [*ws, *bs])
        for f, n in zip(fused, native):
            torch.testing.assert_close(f, n, rtol=1e-10, atol=1e-12)
