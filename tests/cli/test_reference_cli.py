"""``vlmopt eval`` and ``vlmopt demo`` end to end on a reference-model directory.

The directory is a freshly initialised (untrained) ``tiny-llava`` written the way the training
script writes one, so these tests run whether or not trained weights are shipped; accuracy itself
is checked by ``tests/reference`` on the shipped models.
"""

import dataclasses
import json

import pytest

from vlmopt.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from models import train
    from vlmopt.reference import processing

    model, processor, _ = train.build_model("tiny-llava", seed=1)
    out = tmp_path_factory.mktemp("models") / "tiny-llava"
    model.save_pretrained(out, safe_serialization=True)
    processing.save_processor(processor, out)
    configs = {name: dataclasses.asdict(c) for name, c in train.TASK_CONFIGS["tiny-llava"].items()}
    (out / "tasks.json").write_text(json.dumps(configs))
    return out


def test_eval_end_to_end_writes_the_documented_json(model_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = main([
        "eval", "--model", str(model_dir), "--task", "shapes", "--n", "6", "--batch-size", "3",
        "--passes", "hiprune:keep_ratio=1/3", "--passes", "random_prune:keep_ratio=0.5", "--json", str(out),
    ])
    assert code == 0
    table = capsys.readouterr().out
    assert "| hiprune:keep_ratio=1/3 |" in table and "retention %" in table
    report = json.loads(out.read_text())
    keys = {"accuracy", "retention", "loyalty", "visual_tokens", "prefill_flops", "llm_prefill_flops", "prefill_seconds"}
    assert keys <= set(report["baseline"]) and all(keys <= set(run) for run in report["runs"])
    assert [run["passes"] for run in report["runs"]] == ["hiprune:keep_ratio=1/3", "random_prune:keep_ratio=0.5"]
    baseline, hiprune, random = report["baseline"], *report["runs"]
    assert baseline["visual_tokens"] == 256 and hiprune["visual_tokens"] == 85 and random["visual_tokens"] == 128
    assert baseline["loyalty"] == 1.0
    assert hiprune["llm_prefill_flops"] < random["llm_prefill_flops"] < baseline["llm_prefill_flops"]
    for run in report["runs"]:
        assert 0.0 <= run["loyalty"] <= 1.0 and run["prefill_seconds"] > 0
        n = report["n"]
        assert round(n * run["accuracy"]) - round(n * baseline["accuracy"]) == run["gained"] - run["lost"]
        low, high = run["retention_ci"]
        assert 0.0 <= low <= high
    assert baseline["lost"] == baseline["gained"] == 0 and baseline["retention_ci"] == [1.0, 1.0]


def test_eval_refuses_a_bad_sample_count(model_dir, capsys):
    assert main(["eval", "--model", str(model_dir), "--n", "0"]) == 2
    assert "argument --n: must be ≥ 1, got 0" in capsys.readouterr().err


def test_demo_on_a_reference_model_shows_questions_and_the_eval_table(model_dir, capsys):
    assert main(["demo", "--model", str(model_dir), "--questions", "2", "--n", "3", "--passes", "pool_prune:keep_ratio=0.25"]) == 0
    out = capsys.readouterr().out
    assert "| question | truth | (none) | pool_prune:keep_ratio=0.25 |" in out
    assert out.count("\n| what ") + out.count("\n| how ") + out.count("\n| is ") + out.count("\n| where ") == 2
    assert "| pool_prune:keep_ratio=0.25 |" in out.split("recorded test split")[1]
