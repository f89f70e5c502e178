"""HalfV's stage analysis: per-layer entropy of the visual states, the marginal utility of a cut,
valid suggestions, the CLI, and a clear error without visual tokens."""

import json

import pytest
import torch

import vlmopt
from tests.conftest import padded_batch
from vlmopt.analysis.entropy import truncated_matrix_entropy
from vlmopt.analysis.stages import LayerCut, analyze_stages, layer_entropy


def test_entropy_is_the_tme_of_each_layers_visual_inputs(llava_clip):
    batch = padded_batch(llava_clip, seed=61)
    curve = layer_entropy(llava_clip, [batch], k=8)
    with torch.no_grad():
        states = llava_clip(**batch, output_hidden_states=True).hidden_states
    visual = batch["input_ids"] == llava_clip.config.image_token_id
    for layer in range(len(curve)):
        expected = sum(truncated_matrix_entropy(states[layer][b][visual[b]], 8) for b in range(2)) / 2
        assert curve[layer] == pytest.approx(expected, rel=1e-9)


def test_no_visual_tokens_is_a_clear_error(llava_clip):
    batch = padded_batch(llava_clip, seed=62)
    text = {"input_ids": batch["input_ids"][:, -4:], "attention_mask": torch.ones(2, 4, dtype=torch.long)}
    with pytest.raises(vlmopt.InputError, match="needs samples with visual tokens"):
        layer_entropy(llava_clip, [text])


def test_layer_cut_keeps_its_share_from_its_layer(qwen):
    batch = padded_batch(qwen, seed=63)
    compiled = vlmopt.compile(qwen, passes=[LayerCut(layer=2, keep=0.25)])
    cache = compiled.new_cache()
    prompt = compiled.plan(batch, for_generation=True)
    compiled.run_stage(prompt.stage, prompt.inputs, cache, 1)
    seq, visual = batch["input_ids"].shape[1], prompt.layout.counts[0]
    assert [cache.get_seq_length(i) for i in range(3)] == [seq, seq, seq - visual + visual // 4]
    with pytest.raises(vlmopt.PassConfigError, match=r"LayerCut.keep must be in \(0, 1\]"):
        LayerCut(layer=1, keep=0)


def test_analysis_and_cli(tmp_path, capsys):
    from vlmopt import reference
    from vlmopt.cli import main

    model, processor = reference.load("tiny-llava")
    samples = reference.task_for("tiny-llava", "shapes").samples("validation", n=6)
    report = analyze_stages(model, processor, samples, keep=0.25, batch_size=6)
    layers = model.config.get_text_config().num_hidden_layers
    assert len(report.entropy) == len(report.utility) == layers and report.utility[0] is None
    assert 1 <= report.ivr_layer < report.ssr_layer <= layers - 1
    assert report.utility[report.ivr_layer] == min(u for u in report.utility[1 : layers - 1])
    path = tmp_path / "stages.json"
    assert main(["analyze", "stages", "--model", "tiny-llava", "--n", "6", "--json", str(path)]) == 0
    assert "suggested: HalfV(ivr_layer=" in capsys.readouterr().out
    saved = json.loads(path.read_text())
    assert saved["entropy"] == pytest.approx(list(report.entropy)) and saved["ivr_layer"] == report.ivr_layer


def test_calibration_agreement_is_one_minus_the_next_token_distance(qwen):
    from vlmopt.analysis.stages import analyze_calibration

    batch = padded_batch(qwen, seed=64)
    report = analyze_calibration(qwen, [batch], keep=0.25, k=8)
    assert report.metric == "agreement" and report.baseline_accuracy == pytest.approx(1.0)
    with torch.no_grad():
        full = qwen(**batch).logits[:, -1].softmax(-1)
        cut = vlmopt.compile(qwen, passes=[LayerCut(layer=2, keep=0.25)])(**batch).logits[:, -1].softmax(-1)
    distance = 0.5 * (full - cut).abs().sum(-1).mean()
    assert 0.0 < float(distance) and report.accuracy[2] == pytest.approx(1.0 - float(distance), abs=1e-5)
    assert 1 <= report.ivr_layer < report.ssr_layer <= 2


def test_calibration_needs_batches(qwen):
    from vlmopt.analysis.stages import analyze_calibration

    with pytest.raises(vlmopt.InputError, match="at least one calibration batch"):
        analyze_calibration(qwen, [])
