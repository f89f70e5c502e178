"""The installed package is the toolkit only: nothing in ``vlmopt`` imports the checkout-only ``models``
package (the training code and research benchmarks), the wheel does not ship it, and no source file
of either grows past 400 lines."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent

RUNNER = """
import importlib.util, json, sys
from pathlib import Path

import torch

import vlmopt
from vlmopt import configs
from vlmopt.cli import main

spec = importlib.util.find_spec("models")  # importable from this checkout: a leak would show
assert spec is not None and Path(spec.origin).resolve() == Path("models/__init__.py").resolve(), spec
model = configs.build(configs.CONFIGS["tiny-llava-random"](), seed=0)
compiled = vlmopt.compile(model, passes=[vlmopt.passes.RandomPrune(keep_ratio=0.5)])
with torch.no_grad():
    compiled(**configs.synthetic_batch(model, seed=0))
codes = [main(argv) for argv in json.loads(sys.argv[1])]
leaked = sorted(m for m in sys.modules if m == "models" or m.startswith("models."))
print("RESULT " + json.dumps({"codes": codes, "leaked": leaked}))
"""


def run_verbs(verbs: list[list[str]]) -> dict:
    """``{"codes": [exit code per verb], "leaked": [models modules imported]}`` of one fresh process that
    imports vlmopt, compiles a random-weight model and runs ``vlmopt <verb>`` for each argument list."""
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(verbs)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def reference_model_or_skip() -> str:
    from vlmopt import reference

    try:
        reference.path("tiny-llava")
    except FileNotFoundError:
        pytest.skip(f"tiny-llava weights are not in {reference.models_dir()}")
    return "tiny-llava"


def test_vlmopt_compile_eval_bench_demo_never_import_the_training_code():
    model = reference_model_or_skip()
    verbs = [
        ["bench", "--config", "tiny-llava-random", "--repeats", "1"],
        ["eval", "--model", model, "--task", "shapes", "--n", "4", "--batch-size", "4"],
        ["demo", "--n", "2", "--questions", "1", "--passes", "random_prune:keep_ratio=0.5"],
    ]
    result = run_verbs(verbs)
    assert result["codes"] == [0, 0, 0]
    assert result["leaked"] == []


@pytest.mark.slow
def test_vlmopt_export_and_run_never_import_the_training_code(tmp_path):
    pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'vlmopt[onnx]')")
    pytest.importorskip("onnxscript", reason="needs onnxscript (pip install 'vlmopt[onnx]')")
    from PIL import Image

    model = reference_model_or_skip()
    image = tmp_path / "picture.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "export"
    verbs = [
        ["export", "--model", model, "--format", "onnx", "--out", str(out), "--no-verify"],
        ["run", str(out), "--image", str(image), "--prompt", "what colour is the circle?", "--max-new-tokens", "2"],
    ]
    result = run_verbs(verbs)
    assert result["codes"] == [0, 0]
    assert result["leaked"] == []


def imported_modules(source: str) -> set[str]:
    """Absolute module names a Python source imports (``import``, ``from ... import``, and
    ``importlib.import_module("...")`` / ``__import__("...")`` with a literal name)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names.add(node.args[0].value)
    return names


def test_imported_modules_finds_every_form_of_import():
    source = "import models.train\nfrom models import card\nimport importlib\nimportlib.import_module('models.bench')\nfrom . import x\n"
    assert imported_modules(source) == {"models.train", "models", "importlib", "models.bench"}


def test_no_file_in_vlmopt_imports_the_models_package():
    offenders = {}
    for file in sorted((ROOT / "vlmopt").rglob("*.py")):
        bad = sorted(m for m in imported_modules(file.read_text()) if m == "models" or m.startswith("models."))
        if bad:
            offenders[str(file.relative_to(ROOT))] = bad
    assert offenders == {}


def test_no_source_file_over_400_lines():
    files = [*(ROOT / "vlmopt").rglob("*.py"), *(ROOT / "models").rglob("*.py")]
    assert len(files) > 50
    long = {str(f.relative_to(ROOT)): n for f in files if (n := len(f.read_text().splitlines())) > 400}
    assert long == {}


def test_every_test_folder_is_a_package_so_same_named_test_files_collect():
    folders = {f.parent for f in (ROOT / "tests").rglob("*.py")}
    assert len(folders) > 10
    assert sorted(str(d.relative_to(ROOT)) for d in folders if not (d / "__init__.py").exists()) == []


def test_the_wheel_ships_the_toolkit_without_the_training_code(tmp_path):
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools")
    source = tmp_path / "checkout"  # a copy: the build leaves nothing in the checkout, and no stale build/ reaches the wheel
    skip = shutil.ignore_patterns(".*", "build", "dist", "*.egg-info", "__pycache__", "*.safetensors", "*.onnx", "results")
    shutil.copytree(ROOT, source, ignore=skip)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("vlmopt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    runtime = {f"vlmopt/reference/{m}.py" for m in ("__init__", "evaluate", "processing", "render", "scenes", "tasks", "videos")}
    assert runtime <= names and "vlmopt/cli/__init__.py" in names and "vlmopt/passes/hiprune.py" in names
    assert not [n for n in names if n.startswith(("models/", "benchmarks/", "tests/"))]
    training = {"vlmopt/reference/train.py", "vlmopt/reference/arch.py", "vlmopt/reference/card.py"}
    bench = ("model_probe.py", "tower_count.py", "token_needs.py", "train_step.py")
    assert not [n for n in names if n in training or n.startswith("vlmopt/reference/train/") or n.endswith(bench)]


def test_demo_without_reference_models_says_where_they_are_and_falls_back(tmp_path, monkeypatch, capsys):
    """An installed vlmopt has no ``models/`` beside it: ``vlmopt demo`` says where the reference models
    are and runs a random-weight model instead."""
    from vlmopt.cli.demo import default_model

    monkeypatch.setenv("VLMOPT_MODELS", str(tmp_path))
    assert default_model() == "tiny-llava-random"
    note = capsys.readouterr().err
    assert str(tmp_path) in note and "models/ directory of a vlmopt checkout" in note and "tiny-llava-random" in note
