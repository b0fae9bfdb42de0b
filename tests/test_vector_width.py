"""The engine's lane-vector width follows the CPU (csrc/engine/engine_kernels.h: vector_bytes_for).

64-byte vectors only where the AVX-512 clone runs: on an AVX2 CPU a 64-byte vector is two ymm
registers and the micro-kernel's accumulators spill (a 4096×32→[64]×4→8 loss and backward took
60 ms there against 4.9 ms with 32-byte vectors). Both widths' code is checked against autograd on
whatever CPU runs the tests, by forcing the width.
"""
import copy
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


_TORCH = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu, "gelu": F.gelu}


def _native(x, weights, biases, act):
    act = _TORCH[act] if isinstance(act, str) else act
    a = x
    for l, (w, b) in enumerate(zip(weights, biases)):
        a = F.linear(a, w, b)
        if l < len(weights) - 1:
            a = act(a)
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


# ------------------------------------------- the one-hidden-layer kernels of lane vectors (LaneVec)

@pytest.mark.parametrize("width", [32, 64])
@pytest.mark.parametrize("N, D, H, O, act", [(3000, 1, 20, 1, "sigmoid"), (40000, 16, 64, 4, "tanh"),
                                             (2500, 3, 7, 2, "gelu")])
def test_one_hidden_layer_ops_match_autograd_with_each_width(forced_width, width, N, D, H, O, act):
    """The one-hidden-layer ops on the engine (csrc/ops/engine_path.cpp), tall data, each vector width."""
    forced_width(width)
    gen = torch.Generator().manual_seed(N + D)
    x = torch.randn(N, D, dtype=torch.float64, generator=gen).requires_grad_()
    y = torch.randn(N, O, dtype=torch.float64, generator=gen)
    w1 = (torch.randn(H, D, dtype=torch.float64, generator=gen) / D ** 0.5).requires_grad_()
    b1 = torch.randn(H, dtype=torch.float64, generator=gen).requires_grad_()
    w2 = (torch.randn(O, H, dtype=torch.float64, generator=gen) / H ** 0.5).requires_grad_()
    b2 = torch.randn(O, dtype=torch.float64, generator=gen).requires_grad_()
    params = [x, w1, b1, w2, b2]
    assert _C.explain_op(True, x, w1, b1, w2, b2, y, act) == "engine"
    assert _C.explain_op(False, x, w1, b1, w2, b2, None, act) == "engine"

    fused = torch.autograd.grad(fusedgrad.mlp_loss(x, w1, b1, w2, b2, y, activation=act), params)
    native = torch.autograd.grad(F.mse_loss(_native(x, [w1, w2], [b1, b2], _TORCH[act]), y), params)
    for f, n in zip(fused, native):
        torch.testing.assert_close(f, n, rtol=1e-10, atol=1e-12)
    g = torch.randn(N, O, dtype=torch.float64, generator=gen)
    fused = torch.autograd.grad(fusedgrad.mlp(x, w1, b1, w2, b2, activation=act), params, g)
    native = torch.autograd.grad(_native(x, [w1, w2], [b1, b2], _TORCH[act]), params, g)
    for f, n in zip(fused, native):
        torch.testing.assert_close(f, n, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("width", [32, 64])
@pytest.mark.parametrize("N, D, H, O, act, path", [(100, 1, 20, 1, "sigmoid", "trainer-narrow-fixed"),
                                                   (100, 3, 7, 2, "tanh", "trainer-narrow"),
                                                   (37, 4, 4, 4, "sigmoid", "trainer-narrow")])
def test_narrow_trainer_matches_torch_optim_with_each_width(forced_width, width, N, D, H, O, act, path):
    forced_width(width)
    assert _C.explain_trainer(D, H, O, act) == path
    torch.manual_seed(N + H)
    net = fusedgrad.FusedMLP(D, H, O, activation=act, dtype=torch.float64)
    ref = copy.deepcopy(net.to_module())  # to_module shares the parameters
    x, y = torch.randn(N, D, dtype=torch.float64), torch.randn(N, O, dtype=torch.float64)
    trainer = fusedgrad.Trainer(net, torch.optim.Adam(net.parameters(), lr=0.05))
    losses = trainer.fit(x, y, 20)
    opt = torch.optim.Adam(ref.parameters(), lr=0.05)
    ref_losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = F.mse_loss(ref(x), y)
        loss.backward()
        opt.step()
        ref_losses.append(loss.detach())
    torch.testing.assert_close(losses.reshape(-1), torch.stack(ref_losses), rtol=1e-10, atol=1e-12)
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or _cpu_flags() is None,
                    reason="reads the CPU's flags from /proc/cpuinfo (Linux x86-64)")
def test_benchmark_runs_record_the_cpus_vector_isa():
    from fusedgrad.bench.machine import cpu_facts, cpu_label

    facts = cpu_facts()
    assert facts["cpu_vector_bytes"] == _C.cpu_vector_bytes()
    assert facts["vector_isa"] == ("AVX-512" if _C.cpu_vector_bytes() == 64 else
                                   "AVX2" if {"avx2", "fma"} <= _cpu_flags() else "baseline x86-64")
    assert cpu_label(facts).endswith(f"({facts['vector_isa']}, {facts['cpu_vector_bytes']}-byte vectors), "
                                     f"{facts['cpu_count']} CPUs")
    assert cpu_label({"cpu": "X", "cpu_count": 2}) == "X, 2 CPUs"  # runs saved before the ISA was recorded
