"""models/bench/model_probe.py: the linear and ridge probes read what is there and nothing that is not;
the report runs end to end on a reference model."""

from __future__ import annotations

import pytest
import torch

from models.bench import model_probe


def test_probe_reads_a_linear_label_and_not_noise():
    g = torch.Generator().manual_seed(int(torch.randint(0, 10_000, ())))
    features = torch.randn(600, 16, generator=g)
    readable = (features[:, 3] > 0).long() + 2 * (features[:, 7] > 0).long()
    accuracy, majority = model_probe.probe_accuracy(features, readable)
    assert accuracy > 0.8 and majority < 0.4
    noise = torch.randint(0, 4, (600,), generator=g)
    accuracy, majority = model_probe.probe_accuracy(features, noise)
    assert accuracy < majority + 0.15


def test_ridge_r2_finds_a_linear_coordinate_and_not_noise():
    g = torch.Generator().manual_seed(int(torch.randint(0, 10_000, ())))
    features = torch.randn(800, 24, generator=g)
    column = features[:, 5] * 3.0 - features[:, 11] + 0.05 * torch.randn(800, generator=g)
    noise = torch.randn(800, generator=g)
    linear, unrelated = model_probe.ridge_r2(features, torch.stack([column, noise], 1))
    assert linear > 0.95 and abs(unrelated) < 0.1


def test_report_runs_on_tiny_llava(tmp_path, capsys):
    result = model_probe.main(["--model", "tiny-llava", "--n", "20", "--json", str(tmp_path / "p.json")])
    assert set(result["probes"]) == set(model_probe.PROBES)
    for r in result["probes"].values():
        assert 0.0 <= r["majority"] <= 1.0 and 0.0 <= r["accuracy"] <= 1.0 and r["tokens"] > 0
    for r in result["answer_attention"].values():
        assert len(r["evidence"]) == 4 and all(e <= o + 1e-6 for e, o in zip(r["evidence"], r["objects"]))
    assert [*result["coordinates"]] == [f"LM layer {i} input" for i in (1, 2, 3, 4)]
    assert all(-1.0 <= r["column"] <= 1.0 and -1.0 <= r["row"] <= 1.0 for r in result["coordinates"].values())
    assert [*result["position_reading"]] == [f"LM layer {i}" for i in (1, 2, 3, 4)]
    for r in result["position_reading"].values():
        assert all(0.0 <= r[half][o] <= 1.0 for half in ("first_half_on", "second_half_on") for o in "AB")
        assert r["first_half_on"]["A"] + r["first_half_on"]["B"] <= 1.0 + 1e-6 and 0.0 <= r["answer_probe"] <= 1.0
    assert [*result["position_reading"]["LM layer 2"]["shape_words_r2"]] == ["A column", "A row", "B column", "B row"]
    assert result["position_reading"]["LM layer 1"]["input_r2"]["A column"] < 0.5  # the LM's input holds no place of A
    assert (tmp_path / "p.json").exists() and "| colour |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        model_probe.main(["--n", "3"])
