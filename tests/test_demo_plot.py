"""python -m fusedgrad demo --plot PATH (matplotlib is an optional extra)."""
import sys

import pytest

from fusedgrad.__main__ import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plot_writes_a_figure(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    path = tmp_path / "fit.png"
    assert main(["demo", "--steps", "40", "--plot", str(path)]) == 0
    assert f"saved the fitted curve and the loss curves to {path}" in capsys.readouterr().out
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(str(path))
    height, width = image.shape[:2]
    assert (width, height) == (1100, 420)  # figsize (11, 4.2) at 100 dpi: two panels side by side
    assert image[..., :3].std() > 0.05  # something was drawn, not a blank canvas


def test_plot_without_matplotlib_fails_clearly(tmp_path, monkeypatch, capsys):
    # A None entry in sys.modules makes `import matplotlib` raise ImportError.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    path = tmp_path / "fit.png"
    assert main(["demo", "--steps", "5", "--plot", str(path)]) == 2
    captured = capsys.readouterr()
    assert "--plot needs matplotlib" in captured.err and "pip install" in captured.err
    assert captured.out == ""  # refused before training
    assert not path.exists()
