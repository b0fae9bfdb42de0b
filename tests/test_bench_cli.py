"""`python -m fusedgrad bench --quick`: the CI smoke run of the benchmark command.
It checks the command works end to end (gradient agreement, table, JSON); it never
asserts anything about speed."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_quick_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "fusedgrad", "bench", "--quick", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "µs per step" in proc.stdout
    data = json.loads((out / "results.json").read_text())
    (row,) = data["rows"]
    assert row["shape"] == "10×4→4→4"
    assert set(row["us_per_step"]) == {"native", "fused", "no_autograd"}
    assert all(v > 0 for v in row["us_per_step"].values())
    assert data["meta"]["torch"].startswith("2.")
    # every saved run says which CPU kind it ran on: AVX-512 and AVX2 guests share a model name
    from fusedgrad import _C
    assert data["meta"]["cpu_vector_bytes"] == _C.cpu_vector_bytes()
    assert isinstance(data["meta"]["vector_isa"], str) and data["meta"]["vector_isa"]
    table = (out / "results.md").read_text().splitlines()
    assert table[0].startswith("| N×D→H→O |") and table[2].startswith("| 10×4→4→4 | float32 | 1 | no |")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    png = out / "speedup.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_a_malformed_shape():
    proc = subprocess.run(
        [sys.executable, "-m", "fusedgrad", "bench", "--shapes", "10x4x4"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "NxDxHxO" in proc.stderr
