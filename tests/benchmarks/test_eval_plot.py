"""benchmarks/eval_plot.py: eval JSON files of one test set drawn on one plot; files of another model
or test set are refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "eval_plot.py"
sys.path.insert(0, str(SCRIPT.parent))
import eval_plot


def payload(model: str, accuracy: float, runs: list[tuple[str, float, float]]) -> dict:
    def run(passes, acc, flops):
        return {"passes": passes, "accuracy": acc, "prefill_flops": flops}

    return {"model": model, "task": "shapes", "n": 10, "seed": None, "baseline": run("", accuracy, 2e9),
            "runs": [run(*r) for r in runs]}


def test_runs_of_several_files_share_one_plot(tmp_path):
    pytest.importorskip("matplotlib")
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(payload("m", 0.9, [("hiprune:keep_ratio=0.5", 0.85, 1e9)])))
    second.write_text(json.dumps(payload("m", 0.9, [("halfv:ivr_keep=0.2", 0.8, 1.1e9), ("halfv", 0.88, 1.3e9)])))
    report, title = eval_plot.merged_report([str(first), str(second)])
    assert [r.passes for r in report["runs"]] == ["hiprune:keep_ratio=0.5", "halfv:ivr_keep=0.2", "halfv"]
    assert title == "m — shapes (n=10)"
    out = tmp_path / "plot.png"
    assert eval_plot.main([str(first), str(second), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_files_of_another_model_or_baseline_are_refused(tmp_path):
    first, other, shifted = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    first.write_text(json.dumps(payload("m", 0.9, [])))
    other.write_text(json.dumps(payload("other", 0.9, [])))
    shifted.write_text(json.dumps(payload("m", 0.7, [])))
    with pytest.raises(SystemExit, match="is other on shapes"):
        eval_plot.merged_report([str(first), str(other)])
    with pytest.raises(SystemExit, match="baseline accuracy differs"):
        eval_plot.merged_report([str(first), str(shifted)])
