"""Pieces of the reference-model training recipe: auxiliary targets, the attention guide, the CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vlmopt.models import processing, tasks, train


@pytest.fixture(scope="module")
def llava_processor():
    return processing.build_processor("llava", 224)


@pytest.fixture(scope="module")
def batch_of_scenes(llava_processor):
    task = tasks.get("shapes", size=224, grid=14)
    samples = [task.sample("train", i) for i in range(4)]
    turns, evidence = train.training_turns(samples, 3)
    batch = processing.encode(llava_processor, samples, answers=True, turns=turns)
    return samples, evidence, batch


def test_cell_targets_label_objects_and_grid_coordinates():
    sample = tasks.get("shapes", size=224, grid=14).sample("train", 5)
    t = train.cell_targets(sample, 0, 14)
    assert t.shape == (5, 16, 16)
    for k, o in enumerate(sample.objects[0]):
        covered = (sample.masks[0].reshape(16, 14, 16, 14) == k + 1).mean(axis=(1, 3)) >= 0.5
        assert (t[0][covered] == train.COLOURS.index(o.colour) + 1).all()
        assert (t[1][covered] == train.SHAPES.index(o.shape) + 1).all()
    assert t[2].sum() == len(sample.objects[0])  # one centre cell per object
    assert t[3, 7, 0] == 0 and t[3, 7, 15] == train.COORD_SCALE and t[4, 15, 3] == train.COORD_SCALE
    assert (np.diff(t[3], axis=1) > 0).all() and (np.diff(t[4], axis=0) > 0).all()


def _guided_regions(samples, evidence, batch, llava_processor, sink):
    """Attention maps that put exactly the target distribution on every guided position."""
    ids, labels = batch["input_ids"], batch["labels"]
    B, L = ids.shape
    attn = torch.rand(B, 2, L, L) * 1e-9  # near zero off target, never exactly zero
    visual = llava_processor.tokenizer.convert_tokens_to_ids("<image>")
    words = train.attribute_words(llava_processor.tokenizer)
    first = attn.clone()
    middle = attn.clone()
    for row, s in enumerate(samples):
        vpos = np.flatnonzero(ids[row].numpy() == visual)
        sink_pos = int(np.flatnonzero(batch["attention_mask"][row].numpy())[0])

        def put(target, pos, objs):
            cells = [c for c in train.object_cells(s, objs, 14) if len(c)]
            parts = [vpos[c] for c in cells] + ([np.array([sink_pos])] if sink else [])
            if not sink:
                parts = [np.concatenate(parts)] if parts else []
            for part in parts:
                part = np.unique(part)
                target[row, :, pos, part] = 1.0 / len(parts) / len(part)

        for pos in np.flatnonzero(np.isin(ids[row].numpy(), list(words))):
            kind, value = words[int(ids[row, pos])]
            put(first, pos, [k for k, o in enumerate(s.objects[0]) if getattr(o, kind) == value])
        lab = labels[row].numpy() != -100
        starts = np.flatnonzero(lab & ~np.concatenate([[False], lab[:-1]]))
        for start, objs in zip(starts, evidence[row]):
            put(middle, start - 1, objs)
    return [first, middle, middle, first]


@pytest.mark.parametrize("sink", [True, False])
def test_guide_loss_is_least_on_its_target(batch_of_scenes, llava_processor, sink):
    samples, evidence, batch = batch_of_scenes
    visual = llava_processor.tokenizer.convert_tokens_to_ids("<image>")
    words = train.attribute_words(llava_processor.tokenizer)
    on_target = _guided_regions(samples, evidence, batch, llava_processor, sink)
    loss = train.guide_loss(on_target, batch, evidence, samples, visual, 14, words, sink=sink)
    if sink:
        # on target, each guided position costs the entropy of its target: log(k + 1) for k objects
        assert 0.0 < float(loss) < math.log(len(train.SHAPES) + 1)
    else:
        assert float(loss) == pytest.approx(0.0, abs=1e-4)
    B, L = batch["input_ids"].shape
    spread = [torch.softmax(torch.randn(B, 2, L, L), -1) for _ in range(4)]
    assert float(train.guide_loss(spread, batch, evidence, samples, visual, 14, words, sink=sink)) > float(loss) + 1.0


def test_sink_guide_sends_a_no_to_the_sink(llava_processor):
    task = tasks.get("shapes", size=224, grid=14)
    sample = next(s for s in (task.sample("train", i) for i in range(200)) if s.family == "exist" and s.answer == "no")
    batch = processing.encode(llava_processor, [sample], answers=True)
    assert sample.evidence == []
    visual = llava_processor.tokenizer.convert_tokens_to_ids("<image>")
    L = batch["input_ids"].shape[1]
    answer_pos = int(np.flatnonzero(batch["labels"][0].numpy() != -100)[0]) - 1
    on_sink = torch.full((1, 2, L, L), 1e-9)
    on_sink[0, :, answer_pos, 0] = 1.0
    elsewhere = torch.full((1, 2, L, L), 1.0 / L)
    no_words: dict = {}
    evidence = [[[]]]
    good = train.guide_loss([on_sink] * 4, batch, evidence, [sample], visual, 14, no_words, sink=True)
    bad = train.guide_loss([elsewhere] * 4, batch, evidence, [sample], visual, 14, no_words, sink=True)
    assert float(good) == pytest.approx(0.0, abs=1e-4) and float(bad) > 3.0
    # without the sink a "no" has nothing to look at, so it is not guided at all
    assert float(train.guide_loss([elsewhere] * 4, batch, evidence, [sample], visual, 14, no_words, sink=False)) == 0.0


def test_training_cli_runs_and_rejects_bad_flags(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["--model", "tiny-llava", "--guide-sink", "maybe"])
    assert "expected true or false" in capsys.readouterr().err
    cfg = train.TrainConfig(model="tiny-llava", steps=2, batch_size=2, extra_turns=1, curriculum=((0, 1, 2),), eval_every=2, eval_n=2, test_n=2, warmup=1)
    results = train.train(cfg, tmp_path / "m", log=lambda *a: None)
    assert (tmp_path / "m" / "model.safetensors").exists() and (tmp_path / "m" / "README.md").exists()
    assert results["history"][-1]["step"] == 2 and 0.0 <= results["test"]["shapes"]["full"]["accuracy"] <= 1.0
