"""python -m fusedgrad verify: the textbook formulas, the comparison and the command."""
import os
import subprocess
import sys

import pytest
import torch

import fusedgrad
from fusedgrad.__main__ import main
from fusedgrad.cli import verify
from reference import grads_of, ref_mlp_loss

NAMES = ("x", "w1", "b1", "w2", "b2")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", verify.BIAS_KINDS)
def test_textbook_formulas_equal_autograd(bias, reduction):
    """The formula function alone, against autograd of an independent reference (tests/reference.py)."""
    x, w1, b1, w2, b2, t = verify.make_problem(9, 3, 6, 2, seed=3, bias=bias, dtype=torch.float64)
    loss, grads = verify.textbook_gradients(x, w1, b1, w2, b2, t, reduction=reduction)

    leaves = [None if a is None else a.clone().requires_grad_() for a in (x, w1, b1, w2, b2)]
    ref_loss, ref_grads = grads_of(lambda: ref_mlp_loss(*leaves, t, reduction=reduction), leaves)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    expected = {n: g for n, g in zip(NAMES, ref_grads) if g is not None}
    assert set(grads) == set(expected)
    for name, g in expected.items():
        assert grads[name].shape == g.shape, name
        assert g.abs().max() > 1e-3, name  # large against the tolerance
        torch.testing.assert_close(grads[name], g, rtol=1e-12, atol=1e-15, msg=name)


def test_compare_rows_and_shapes():
    rows = verify.compare(*verify.make_problem(11, 2, 4, 3, bias="per-sample", dtype=torch.float64), reduction="sum")
    assert [r["name"] for r in rows] == ["loss", "x", "w1", "b1", "w2", "b2"]
    shapes = {r["name"]: r["shape"] for r in rows}
    assert shapes == {"loss": (), "x": (11, 2), "w1": (4, 2), "b1": (11, 4), "w2": (3, 4), "b2": (11, 3)}
    assert all(r["ok"] for r in rows)
    assert all(r["fused-native"][1] <= 1e-10 for r in rows)


def test_mismatch_is_reported_and_exits_nonzero(monkeypatch, capsys):
    """A gradient off by one part in a million (10⁴ × the float64 tolerance) is a mismatch."""
    real = verify.fused_gradients

    def wrong_w1(*args, **kwargs):
        loss, grads = real(*args, **kwargs)
        grads["w1"] = grads["w1"] * (1 + 1e-6)
        return loss, grads

    monkeypatch.setattr(verify, "fused_gradients", wrong_w1)
    assert main(["verify", "--shape", "20", "2", "5", "1"]) == 1
    out = capsys.readouterr().out
    w1_line = next(line for line in out.splitlines() if line.startswith("w1 "))
    assert w1_line.endswith("MISMATCH")
    assert "MISMATCH beyond the float64 tolerance" in out and ": w1" in out
    assert next(line for line in out.splitlines() if line.startswith("w2 ")).endswith("ok")


def test_float32_per_sample_sum_in_process(capsys):
    assert main(["verify", "--shape", "7", "3", "5", "2", "--bias", "per-sample",
                 "--reduction", "sum", "--dtype", "float32", "--seed", "4"]) == 0
    out = capsys.readouterr().out
    assert "3→5→2 network, N=7 samples, reduction=sum, bias=per-sample, float32" in out
    assert "all 6 quantities agree within the float32 tolerance 1e-05" in out


@pytest.mark.parametrize("activation", fusedgrad.ACTIVATIONS)
def test_every_activation(capsys, activation):
    assert main(["verify", "--shape", "9", "3", "5", "2", "--activation", activation]) == 0
    out = capsys.readouterr().out
    assert "all 6 quantities agree within the float64 tolerance 1e-10" in out
    if activation != "sigmoid":
        assert f"activation={activation}" in out.splitlines()[0]


def test_bad_shape_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse's usage error: exit status 2
        main(["verify", "--shape", "4", "0", "3", "1"])
    assert exit_info.value.code == 2
    assert "--shape: must be at least 1, got 0" in capsys.readouterr().err


def test_command_default_problem():
    """The real command line, on the default 1→20→1 problem (100 points)."""
    proc = subprocess.run([sys.executable, "-m", "fusedgrad", "verify"], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "1→20→1 network, N=100 samples, reduction=mean, bias=vector, float64, seed 0"
    for name, shape in (("loss", "()"), ("x", "(100, 1)"), ("w1", "(20, 1)"), ("b1", "(20,)"),
                        ("w2", "(1, 20)"), ("b2", "(1,)")):
        row = next(line for line in lines if line.startswith(name + " "))
        assert shape in row and row.endswith("ok"), row
    assert "all 6 quantities agree within the float64 tolerance 1e-10" in proc.stdout


def test_show_values_prints_each_gradient_three_times(capsys):
    assert main(["verify", "--shape", "3", "2", "4", "1", "--bias", "none", "--show-values"]) == 0
    out = capsys.readouterr().out
    for label in ("loss", "dx", "dw1", "dw2"):
        for path in ("native", "fused", "formula"):
            assert f"\n{label} ({path}):\n" in out
    assert "db1 (" not in out  # no biases, no bias gradients
