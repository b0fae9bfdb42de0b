"""The Burgers PINN: the example's exact reference solution (Cole–Hopf quadrature) solves the PDE,
the example trains with fused and with autograd derivatives, and `bench --pinn --quick` checks and
times every route (none fails its check against the native step)."""
import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import torch

from fusedgrad.bench import pinn

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_example():
    spec = importlib.util.spec_from_file_location("pinn_burgers", ROOT / "examples" / "pinn_burgers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cole_hopf_solves_burgers():
    ex = load_example()
    x = torch.linspace(-0.9, 0.9, 37, dtype=torch.float64)
    assert torch.allclose(ex.cole_hopf(x, torch.zeros_like(x)), -torch.sin(math.pi * x), atol=0, rtol=0)
    t = torch.linspace(0.05, 1.0, 20, dtype=torch.float64)
    for side in (-1.0, 1.0):
        assert ex.cole_hopf(torch.full_like(t, side), t).abs().max() < 1e-12
    # Smooth region (t = 0.2, before the shock forms at t ≈ 1/π): the residual by central differences,
    # O(h²) = 1e-6-small against terms of size ~1.
    h = 1e-3
    x, t = torch.linspace(-0.8, 0.8, 17, dtype=torch.float64), torch.full((17,), 0.2, dtype=torch.float64)
    u = ex.cole_hopf(x, t)
    u_t = (ex.cole_hopf(x, t + h) - ex.cole_hopf(x, t - h)) / (2 * h)
    u_x = (ex.cole_hopf(x + h, t) - ex.cole_hopf(x - h, t)) / (2 * h)
    u_xx = (ex.cole_hopf(x + h, t) - 2 * u + ex.cole_hopf(x - h, t)) / h ** 2
    residual = u_t + u * u_x - ex.NU * u_xx
    assert residual.abs().max() < 1e-4 * u_x.abs().max()
    # Past the shock, u(0, t) = 0 by symmetry and the slope at x = 0 is steep (about −150 at t = 1/π·3).
    assert ex.cole_hopf(torch.tensor([0.0]), torch.tensor([1.0])).abs().item() < 1e-12
    assert ex.cole_hopf(torch.tensor([-0.01]), torch.tensor([1.0])).item() > 0.5


def test_example_trains_fused_and_native_alike():
    """A few steps from the same start: the fused and the autograd derivative routes train the same net."""
    ex = load_example()
    fused = ex.main(["--adam", "15", "--lbfgs", "5", "--threads", "1"])
    native = ex.main(["--adam", "15", "--lbfgs", "5", "--threads", "1", "--native"])
    dropin = ex.main(["--adam", "15", "--lbfgs", "5", "--threads", "1", "--dropin"])
    assert math.isfinite(fused) and abs(fused - native) < 1e-3 * native
    assert abs(dropin - native) < 1e-3 * native


def test_bench_pinn_quick(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fusedgrad", "bench", "--pinn", "--quick", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "pinn.json").read_text())
    assert not result["failed"], result["failed"]
    for route in ("native", "torch_func", "dropin", "fused"):
        assert result["us_per_step"][route] > 0
        assert result["check"][route]["float32_rel_to_distance"] is not None
    for route in ("jax_jit", "jax_scan"):
        assert route in result["us_per_step"] or route in result["skipped"]
    assert "net.derivatives(x, order=2)" in (tmp_path / "pinn.md").read_text()
    jet = result["jet_pass_us"]  # the jet ops timed alone: parts of the fused step
    assert 0 < jet["forward"] and 0 < jet["backward"]
    assert "jet pass" in (tmp_path / "pinn.md").read_text()
    assert result["around_jets_us"] > 0  # the loss code around the jet pass, timed with the jet pass free
    assert "the most any kernel" in (tmp_path / "pinn.md").read_text()
    # the jet pass's products against the same run's SGEMM peak, and the step that peak would allow
    rows = pinn.QUICK["n_domain"] + pinn.N_INITIAL + pinn.N_BOUNDARY
    assert result["jet_pass_macs"] == pinn.jet_pass_macs(rows) and result["gemm_peak_gflops"] > 0
    assert "of the same run's SGEMM peak" in (tmp_path / "pinn.md").read_text()


def test_jet_pass_macs_counts_each_product():
    # 2→[20]×3→1: a row's layers are 40 + 400 + 400 + 20 = 860 multiply-adds. Forward: u and two
    # tangents and two second derivatives (5 parts). Backward: 4 parts, each through the forward, the
    # weight gradients and the products back to the first layer's output (820: no input gradient).
    assert pinn.jet_pass_macs(1) == {"forward": 5 * 860, "backward": 4 * (860 + 860 + 820)}
    assert pinn.jet_pass_macs(10) == {"forward": 10 * 5 * 860, "backward": 10 * 4 * (860 + 860 + 820)}
    # order 1 carries u and the tangents only
    assert pinn.jet_pass_macs(1, order=1, backward_parts=3)["forward"] == 3 * 860


def test_pinn_markdown_bounds_the_step_by_the_peak():
    # Synthetic figures: 50 + 100 MFLOP of products at a 100 GFLOP/s peak take 1 500 µs; with 500 µs of
    # loss code around them the step is at most 10 000 / 2 000 = 5.0× native and 4 000 / 2 000 = 2.0× JAX.
    result = {
        "label": "synthetic", "us_per_step": {"native": 10_000.0, "fused": 2_500.0, "jax_scan": 4_000.0},
        "failed": {}, "skipped": {}, "jet_pass_us": {"forward": 1_000.0, "backward": 1_000.0},
        "around_jets_us": 500.0, "jet_pass_macs": {"forward": 25_000_000, "backward": 50_000_000},
        "gemm_peak_gflops": 100.0,
        "meta": {"threads": 2, "date": "today", "torch": "t", "jax": "j", "repeats": 1, "cpu": "c",
                 "cpu_count": 2, "vector_isa": "AVX2", "cpu_vector_bytes": 32},
    }
    md = pinn.markdown(result)
    assert "50 + 100 MFLOP (forward + backward), 50 and 100 GFLOP/s: 50 % and 100 %" in md
    assert "they would take 1,500 µs" in md
    assert "at most 5.0× native and 2.0× JAX's fastest route" in md
