"""`python -m fusedgrad bench --deep --quick`: every case and route is timed, skipped (with a reason) or
reported failed — and none fails its agreement check against the native loop. No timing is asserted."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_deep_bench_quick_runs_every_route(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fusedgrad", "bench", "--deep", "--quick", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "deep.json").read_text())
    assert [c["case"] for c in result["cases"]] == ["curve", "pinn", "surrogate", "wide"]
    for case in result["cases"]:
        assert not case["failed"], case["failed"]
        for route in ("native", "native_fused", "net_loss", "fit", "jax_scan"):
            assert route in case["us_per_step"] or route in case["skipped"], (case["case"], route)
    ens = result["ensemble"]
    assert not ens["failed"], ens["failed"]
    assert {"fit", "torch_func", "loop"} <= set(ens["us_per_model_step"])
    assert [r["N"] for r in result["tall"]["rows"]] == [1000, 10000]
    assert "| case |" in (tmp_path / "deep.md").read_text()
