"""``--plot`` without matplotlib is a clear error naming the install, before any work is done."""

import sys

import pytest

from vlmopt.cli import main
from vlmopt.errors import MissingDependencyError
from vlmopt.plots import pyplot


def test_pyplot_draws_to_files():
    assert pyplot().get_backend().lower() == "agg"


def test_missing_matplotlib_names_the_install(monkeypatch, tmp_path, capsys):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib then raises ImportError
    with pytest.raises(MissingDependencyError, match="pip install matplotlib"):
        pyplot()
    # eval refuses before loading the model or running a sample
    code = main(["eval", "--model", "tiny-llava", "--task", "shapes", "--n", "4", "--passes", "random_prune:keep_ratio=0.5",
                 "--plot", str(tmp_path / "x.png")])
    assert code != 0 and not (tmp_path / "x.png").exists()
    assert "--plot needs matplotlib" in capsys.readouterr().err
