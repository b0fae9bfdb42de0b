"""`python -m fusedgrad bench --deep --quick` as a smoke test: it runs, writes deep.json and deep.md, and every
case's every route is timed, skipped or failed — the last two with a reason. No timing is asserted, and a
fused route's failed check is reported by the bench, not failed here (tests/test_deep.py owns the fused
routes' correctness); the native routes, the references of every check, must run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _fused_api_missing():
    """Why the deep API under benchmark is not there (yet), or None."""
    try:
        import fusedgrad

        fusedgrad.FusedMLP(1, 4, 1, activation="tanh", hidden_layers=2)
        fusedgrad.FusedMLPEnsemble(2, 1, 4, 1, activation="tanh", hidden_layers=2)
    except Exception as exc:  # noqa: BLE001 - any failure means the API is not there
        return f"fusedgrad.FusedMLP / FusedMLPEnsemble(..., hidden_layers=2) not available yet ({type(exc).__name__}: {exc})"
    return None


_MISSING = _fused_api_missing()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=str(_MISSING))

CASES = ["curve", "pinn", "surrogate", "wide"]
ROUTES = ["native", "native_fused", "compile", "net_loss", "fit", "jax_jit", "jax_scan"]
ENSEMBLE_ROUTES = ["loop", "torch_func", "fit", "jax_vmap"]


def _assert_accounted(entry, key, routes, where):
    for route in routes:
        timed = route in entry[key]
        reason = entry["failed"].get(route) or entry["skipped"].get(route)
        assert timed or (isinstance(reason, str) and reason.strip()), \
            f"{where}: route {route} neither timed nor skipped/failed with a reason"
        assert not (timed and route in entry["failed"]), f"{where}: route {route} both timed and failed"
        if timed:
            assert entry[key][route] > 0
            assert route in entry["check"], f"{where}: route {route} timed without its check"


def test_deep_bench_quick_accounts_for_every_case_and_route(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fusedgrad", "bench", "--deep", "--quick", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "deep.json").read_text())

    meta = result["meta"]
    for key in ("date", "cpu", "cpu_count", "vector_isa", "cpu_vector_bytes", "torch", "jax", "threads",
                "gemm_peak_gflops", "check"):
        assert key in meta, key
    assert f"({meta['vector_isa']}, {meta['cpu_vector_bytes']}-byte vectors)" in (tmp_path / "deep.md").read_text()
    assert meta["quick"] is True and meta["gemm_peak_gflops"] > 0

    assert [c["case"] for c in result["cases"]] == CASES
    for case in result["cases"]:
        _assert_accounted(case, "us_per_step", ROUTES, case["case"])
        assert {"native", "native_fused"} <= set(case["us_per_step"]), case["failed"]
        assert "compile" in case["skipped"]  # --compile not given
        if meta["jax"] is None:
            assert {"jax_jit", "jax_scan"} <= set(case["skipped"])

    ens = result["ensemble"]
    _assert_accounted(ens, "us_per_model_step", ENSEMBLE_ROUTES, "ensemble")
    assert {"loop", "torch_func"} <= set(ens["us_per_model_step"]), ens["failed"]
    assert ens["loop_models_timed"] < ens["K"]  # the loop is timed on a subset, and the output says so

    tall = result["tall"]
    assert [r["N"] for r in tall["rows"]] == [1000, 10000]
    for row in tall["rows"]:
        assert row["native_ns_per_row"] > 0
        assert "fused_ns_per_row" in row or f"N={row['N']}" in tall["failed"], row

    md = (tmp_path / "deep.md").read_text()
    assert "| case |" in md and "Ensemble" in md and "Tall data" in md
    assert f"timed on {ens['loop_models_timed']} of the {ens['K']} models" in md
    if "fit" in ens["us_per_model_step"]:  # the ensemble's GFLOP/s against the same run's peak
        assert "Trainer.fit's ensemble" in md and "% of the same run's SGEMM peak" in md
