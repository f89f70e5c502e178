"""Pieces of the reference-model training recipe: auxiliary targets, the attention guides (LM, tower, videos), the CLI."""

from __future__ import annotations

import dataclasses
import math
import shlex

import numpy as np
import pytest
import torch

from models import train
from models.train import tower_guide
from vlmopt import reference
from vlmopt.reference import processing, scenes, tasks
from vlmopt.reference.render import COLOURS, SHAPES


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


@pytest.mark.parametrize("index", [5, 12])  # 12: a counting scene with three objects of one kind
def test_cell_targets_label_objects_and_grid_coordinates(index):
    sample = tasks.get("shapes", size=224, grid=14).sample("train", index)
    t = train.cell_targets(sample, 0, 14)
    assert t.shape == (7, 16, 16)
    objects = sample.objects[0]
    for k, o in enumerate(objects):
        covered = (sample.masks[0].reshape(16, 14, 16, 14) == k + 1).mean(axis=(1, 3)) >= 0.5
        assert (t[0][covered] == COLOURS.index(o.colour) + 1).all()
        assert (t[1][covered] == SHAPES.index(o.shape) + 1).all()
        assert (t[5][covered] == min(sum(p.colour == o.colour for p in objects), 4)).all()
        assert (t[6][covered] == min(sum(p.shape == o.shape for p in objects), 4)).all()
    assert ((t[5] > 0) == (t[0] > 0)).all() and ((t[6] > 0) == (t[0] > 0)).all()
    if sample.family == "count":
        assert max(t[5].max(), t[6].max()) == 3
    assert t[2].sum() == len(objects)  # one centre cell per object
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

        def put(target, pos, groups):
            cells = [c for c in groups if len(c)]
            parts = [vpos[c] for c in cells] + ([np.array([sink_pos])] if sink else [])
            if not sink:
                parts = [np.concatenate(parts)] if parts else []
            for part in parts:
                part = np.unique(part)
                target[row, :, pos, part] = 1.0 / len(parts) / len(part)

        for pos in np.flatnonzero(np.isin(ids[row].numpy(), list(words))):
            kind, value = words[int(ids[row, pos])]
            put(first, pos, train.object_cells(s, [k for k, o in enumerate(s.objects[0]) if getattr(o, kind) == value], 14))
        lab = labels[row].numpy() != -100
        starts = np.flatnonzero(lab & ~np.concatenate([[False], lab[:-1]]))
        for start, (_, groups) in zip(starts, evidence[row]):
            put(middle, start - 1, groups)
    return [first, middle, middle, first]


def _rows(maps):
    """``attention_rows`` over full per-layer maps [B, H, L, L]."""
    return lambda layer, rows, positions: maps[layer][rows, :, positions]


ALL_FAMILIES = tuple(tasks.IMAGE_FAMILIES)


@pytest.mark.parametrize("sink", [True, False])
def test_guide_loss_is_least_on_its_target(batch_of_scenes, llava_processor, sink):
    samples, evidence, batch = batch_of_scenes
    visual = llava_processor.tokenizer.convert_tokens_to_ids("<image>")
    words = train.attribute_words(llava_processor.tokenizer)
    on_target = _guided_regions(samples, evidence, batch, llava_processor, sink)
    families = ALL_FAMILIES if sink else ()
    loss = train.guide_loss(_rows(on_target), 4, batch, evidence, samples, visual, 14, words, families)
    if sink:
        # on target, each guided position costs the entropy of its target: log(k + 1) for k objects
        assert 0.0 < float(loss) < math.log(len(SHAPES) + 1)
    else:
        assert float(loss) == pytest.approx(0.0, abs=1e-4)
    B, L = batch["input_ids"].shape
    spread = [torch.softmax(torch.randn(B, 2, L, L), -1) for _ in range(4)]
    assert float(train.guide_loss(_rows(spread), 4, batch, evidence, samples, visual, 14, words, families)) > float(loss) + 1.0


def test_words_twice_guides_the_question_words_in_the_second_layer_too(batch_of_scenes, llava_processor):
    """With ``words_twice`` a question word's attention belongs on its objects in the second layer as well:
    maps on target in both layers cost nothing; the default maps (words on target in the first layer
    only) then cost log 2 per word (the guide reads the two layers' mean), and nothing without it."""
    samples, evidence, batch = batch_of_scenes
    visual = llava_processor.tokenizer.convert_tokens_to_ids("<image>")
    words = train.attribute_words(llava_processor.tokenizer)
    first, middle, _, _ = _guided_regions(samples, evidence, batch, llava_processor, sink=False)
    word_rows = torch.from_numpy(np.isin(batch["input_ids"].numpy(), list(words)))  # [B, L] query rows of question words
    both = torch.where(word_rows[:, None, :, None], first, middle)
    args = (_rows([first, both, middle, first]), 4, batch, evidence, samples, visual, 14, words, ())
    assert float(train.guide_loss(*args, words_twice=True)) == pytest.approx(0.0, abs=1e-4)
    default = (_rows([first, middle, middle, first]), *args[1:])
    assert float(train.guide_loss(*default, words_twice=False)) == pytest.approx(0.0, abs=1e-4)
    assert float(train.guide_loss(*default, words_twice=True)) > 0.3  # half the two layers' mean mass: log 2 per word


def test_sink_ratio_sets_the_share_of_each_object(llava_processor):
    """With ratio r, the loss is least where each of the k objects holds r/(1 + k r) and the sink the rest."""
    task = tasks.get("shapes", size=224, grid=14)
    sample = next(s for s in (task.sample("train", i) for i in range(400)) if s.family == "count" and s.answer != "one")
    batch = processing.encode(llava_processor, [sample], answers=True)
    visual = llava_processor.tokenizer.convert_tokens_to_ids("<image>")
    L = batch["input_ids"].shape[1]
    answer_pos = int(np.flatnonzero(batch["labels"][0].numpy() != -100)[0]) - 1
    groups = train.object_cells(sample, [index for _, index in sample.evidence], 14)
    vpos = np.flatnonzero(batch["input_ids"][0].numpy() == visual)
    ratio = float(torch.empty(()).uniform_(0.1, 3.0))
    k = len(groups)

    def attention(per_object):
        maps = torch.full((1, 2, L, L), 1e-9)
        for cells in groups:
            maps[0, :, answer_pos, vpos[cells]] = per_object / len(cells)
        maps[0, :, answer_pos, 0] = 1.0 - k * per_object
        return _rows([maps] * 4)

    def loss(per_object):
        return float(train.guide_loss(attention(per_object), 4, batch, [[("count", groups)]], [sample], visual, 14, {}, ("count",), sink_ratio=ratio))

    best = ratio / (1 + k * ratio)
    assert loss(best) < min(loss(best * 0.8), loss(min(best * 1.2, 0.99 / k)))
    with pytest.raises(ValueError, match="guide_sink_ratio"):
        train.TrainConfig(model="tiny-llava", steps=1, batch_size=1, guide_sink_ratio=0.0)


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
    evidence = [[("exist", [])]]  # a "no": no evidence object
    good = train.guide_loss(_rows([on_sink] * 4), 4, batch, evidence, [sample], visual, 14, no_words, ("exist",))
    bad = train.guide_loss(_rows([elsewhere] * 4), 4, batch, evidence, [sample], visual, 14, no_words, ("exist",))
    assert float(good) == pytest.approx(0.0, abs=1e-4) and float(bad) > 3.0
    # without the sink a "no" has nothing to look at, so it is not guided at all
    assert float(train.guide_loss(_rows([elsewhere] * 4), 4, batch, evidence, [sample], visual, 14, no_words, ("count",))) == 0.0


@pytest.mark.parametrize("name, source", [("tiny-llava", "projector"), ("tiny-qwen25vl", "lm"), ("tiny-qwen3vl", "lm")])
def test_coordinate_probe_reads_the_tokens_it_is_pointed_at(name, source):
    """``coord_aux_from`` moves the coordinate probe onto LLaVA's projector output or the LM's
    second-layer input: one row per visual token there, and the probe gets a gradient."""
    with pytest.raises(ValueError, match="needs coord_aux=True"):
        train.TrainConfig(model=name, steps=1, batch_size=1, coord_aux_from=source)
    with pytest.raises(ValueError, match="expected tower, projector or lm"):
        train.TrainConfig(model=name, steps=1, batch_size=1, coord_aux=True, coord_aux_from="neck")
    with pytest.raises(ValueError, match="LLaVA's"):
        train.TrainConfig(model="tiny-qwen25vl", steps=1, batch_size=1, coord_aux=True, coord_aux_from="projector")
    cfg = train.TrainConfig(model=name, steps=1, batch_size=2, extra_turns=1, coord_aux=True, coord_aux_from=source)
    model, processor, _ = train.build_model(name, seed=0)
    qwen = name != "tiny-llava"
    taps = train.Taps.attach(model, cfg, qwen=qwen)
    text = model.config.text_config.hidden_size
    aux = train.AuxHeads.for_model(model, cfg, qwen)
    task = tasks.TASKS["shapes"](train.TASK_CONFIGS[name]["shapes"])
    samples = [task.sample("train", 100 + i) for i in range(2)]
    train.forward_loss(model, processor, samples, aux, taps, cfg, qwen=qwen)[0].backward()
    assert (taps.projector is not None) == (source == "projector")
    if source == "projector":
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        assert taps.projector.output.shape == (2, side**2, text)
    assert aux.coords.in_features == text and aux.coords.weight.grad.abs().sum() > 0
    taps.remove()


def test_neighbour_targets_list_what_lies_in_each_direction_of_each_object():
    """On fresh pictures each object token's neighbour row marks exactly the colours and shapes of the
    objects the generator's own relation puts in each direction of its object; background rows are 0;
    the probe gets a gradient from object tokens and videos are refused."""
    task = tasks.TASKS["shapes"](train.TASK_CONFIGS["tiny-qwen25vl"]["shapes"])
    start = int(torch.randint(0, 100_000, ()).item())
    samples = [task.sample("train", start + i) for i in range(3)]
    cell = 28
    got = train.neighbour_targets(samples, cell).reshape(3, -1, len(scenes.DIRECTIONS), train.NEIGHBOUR_ATTRIBUTES)
    labels = train.aux_targets(samples, cell).reshape(3, -1, 7)
    marked = 0
    for s, rows, lab in zip(samples, got, labels):
        objs = s.objects[0]
        covered = train.object_cells(s, list(range(len(objs))), cell)
        for token in range(rows.shape[0]):
            if lab[token, 0] == 0:
                assert rows[token].sum() == 0
                continue
            owners = [o for o, cells in zip(objs, covered) if token in cells]
            if len(owners) != 1:  # touched by two objects: the coverage decides, checked elsewhere
                continue
            owner = owners[0]
            want = torch.zeros_like(rows[token])
            for other in objs:
                where = scenes.relation(other, owner) if other is not owner else None
                if where:
                    d = scenes.DIRECTIONS.index(where)
                    want[d, COLOURS.index(other.colour)] = want[d, len(COLOURS) + SHAPES.index(other.shape)] = 1
            assert torch.equal(rows[token], want)
            marked += int(want.sum() > 0)
    assert marked > 0
    heads = train.AuxHeads(16, None, neighbours=True)
    tokens = torch.randn(labels.shape[0] * labels.shape[1], 16)
    terms = heads.terms(tokens, labels.reshape(-1, 7), None, None, neighbours=train.neighbour_targets(samples, cell))
    terms["neighbours"].backward()
    assert heads.neighbours.weight.grad.abs().sum() > 0
    video = tasks.TASKS["shapes-video"](train.TASK_CONFIGS["tiny-qwen25vl"]["shapes-video"]).sample("train", 0)
    with pytest.raises(ValueError, match="still pictures only"):
        train.neighbour_targets([video], cell)
    with pytest.raises(ValueError, match="neighbour_aux needs aux_weight"):
        train.TrainConfig(model="tiny-qwen25vl", steps=1, batch_size=1, neighbour_aux=True, aux_weight=0.0)


def test_neighbour_guide_points_each_head_at_one_direction_of_the_objects():
    """The tower relation guide on fresh pictures: with uniform attention each head's loss is -log of
    the share of the image's patches its target holds (the objects in its direction, else its own
    object), so the loss is that mean; it trains the block's projection; only Qwen has it."""
    cfg = train.TrainConfig(model="tiny-qwen25vl", steps=1, batch_size=2, neighbour_guide_weight=1.0)
    model, processor, _ = train.build_model("tiny-qwen25vl", seed=0)
    taps = train.Taps.attach(model, cfg, qwen=True)
    task = tasks.TASKS["shapes"](train.TASK_CONFIGS["tiny-qwen25vl"]["shapes"])
    start = int(torch.randint(0, 100_000, ()).item())
    samples = [task.sample("train", start + i) for i in range(2)]
    batch = processing.encode(processor, samples)
    model(**batch)
    block = taps.relations.modules[0]
    assert block is model.model.visual.blocks[max(model.model.visual.fullatt_block_indexes)].attn
    hidden, rotary = taps.relations.inputs[0]
    window = train.qwen_windows(model, batch["image_grid_thw"])
    args = (hidden, rotary, samples, 28, window["window_index"], window["merge_unit"])
    loss = train.neighbour_guide_loss(block, *args)
    loss.backward()
    assert torch.isfinite(loss) and block.qkv.weight.grad.abs().sum() > 0

    class Uniform(torch.nn.Module):  # q = 0: every patch of the image gets the same attention
        num_heads, scaling = block.num_heads, block.scaling

        def qkv(self, x):
            out = block.qkv(x).detach().clone()
            out[:, : out.shape[1] // 3] = 0
            return out

    patches = hidden.shape[0] // len(samples)
    expected = []
    for s in samples:
        objs = s.objects[0]
        cells = train.object_cells(s, list(range(len(objs))), 28)
        for o, own in enumerate(cells):
            if not len(own):
                continue
            per_head = []
            for h in range(block.num_heads):
                there = [c for p, c in enumerate(cells) if p != o and scenes.relation(objs[p], objs[o]) == scenes.DIRECTIONS[h % 4]]
                tokens = np.unique(np.concatenate(there)) if there else own
                per_head.append(-math.log(4 * len(tokens) / patches + 1e-6))
            expected.append(np.mean(per_head))
    assert float(train.neighbour_guide_loss(Uniform(), *args)) == pytest.approx(np.mean(expected), rel=1e-4)
    taps.remove()
    with pytest.raises(ValueError, match="for tiny-qwen25vl"):
        train.TrainConfig(model="tiny-llava", steps=1, batch_size=1, neighbour_guide_weight=1.0)


def test_relation_targets_place_both_objects_at_each_position_answer(llava_processor):
    """Every relative-position turn of a batch gets one target row, read at the position that
    predicts its answer; the two objects' coordinates give back the answer word (the larger offset's
    sign), and the aux loss trains the probe from the LM's residual stream."""
    task = tasks.get("shapes", size=224, grid=14)
    samples = [task.sample("train", 300 + i) for i in range(6)]
    turns, evidence = train.training_turns(samples, 8, balanced=True)
    batch = processing.encode(llava_processor, samples, answers=True, turns=turns)
    rows, positions, where = train.relation_targets(batch["labels"], evidence, grid_w=16)
    answers = [(r, a) for r, s in enumerate(samples) for a in [s.answer] + [a for _, a in turns[r]]]
    families = [family for groups in evidence for family, _ in groups]
    expected = [(r, a) for (r, a), family in zip(answers, families) if family == "position"]
    assert len(rows) == len(expected) >= 3 and where.shape == (len(rows), 4)
    assert where.abs().max() <= 1.0
    for (row, pos), target, (want_row, answer) in zip(zip(rows, positions), where, expected):
        assert row == want_row
        dx, dy = float(target[0] - target[2]), float(target[1] - target[3])
        relation = ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else ("above" if dy < 0 else "below")
        assert relation == answer
        assert batch["labels"][row, pos] == -100 and batch["labels"][row, pos + 1] != -100
        assert llava_processor.tokenizer.decode(batch["labels"][row, pos + 1 : pos + 2]) == answer
    with pytest.raises(ValueError, match="relation_aux needs"):
        train.TrainConfig(model="tiny-llava", steps=1, batch_size=1, relation_aux=True, guide_weight=0.0)
    cfg = train.TrainConfig(model="tiny-llava", steps=1, batch_size=6, extra_turns=8, balanced_turns=True, relation_aux=True)
    model, processor, _ = train.build_model("tiny-llava", seed=0)
    taps = train.Taps.attach(model, cfg, qwen=False)
    aux = train.AuxHeads.for_model(model, cfg, qwen=False)
    assert aux.relation.in_features == model.config.text_config.hidden_size and aux.coords is None
    train.forward_loss(model, processor, samples, aux, taps, cfg, qwen=False)[0].backward()
    assert aux.relation.weight.grad.abs().sum() > 0
    taps.remove()


def test_position_aids_wait_for_their_step(llava_processor):
    """Before ``position_aids_from`` the coordinate and relation probes get no gradient and position
    turns are guided like the other families (the guide loss of an unsplit config); from it, all act."""
    with pytest.raises(ValueError, match="needs a position aid"):
        train.TrainConfig(model="tiny-llava", steps=1, batch_size=1, position_aids_from=5)
    with pytest.raises(ValueError, match="must be >= 0"):
        train.TrainConfig(model="tiny-llava", steps=1, batch_size=1, coord_aux=True, position_aids_from=-1)
    cfg = train.TrainConfig(
        model="tiny-llava", steps=1, batch_size=6, extra_turns=8, balanced_turns=True, coord_aux=True,
        coord_aux_from="projector", relation_aux=True, guide_split_families=("position",), position_aids_from=3,
    )
    model, processor, _ = train.build_model("tiny-llava", seed=int(torch.randint(0, 1000, ()).item()))
    taps = train.Taps.attach(model, cfg, qwen=False)
    aux = train.AuxHeads.for_model(model, cfg, qwen=False)
    task = tasks.get("shapes", size=224, grid=14)
    samples = [task.sample("train", 300 + i) for i in range(6)]
    loss = lambda c, on: train.forward_loss(model, processor, samples, aux, taps, c, qwen=False, position_aids=on)
    off = loss(cfg, False)
    off[0].backward()
    assert aux.coords.weight.grad is None and aux.relation.weight.grad is None
    assert aux.colour.weight.grad.abs().sum() > 0
    unsplit = dataclasses.replace(cfg, guide_split_families=(), position_aids_from=0)
    assert loss(unsplit, True)[3] == off[3]
    on = loss(cfg, True)
    on[0].backward()
    assert aux.coords.weight.grad.abs().sum() > 0 and aux.relation.weight.grad.abs().sum() > 0
    assert on[3] != off[3] and on[2] > off[2]
    assert {"coords", "relation"} <= set(on[5]) and not {"coords", "relation"} & set(off[5])
    assert math.isclose(sum(on[5].values()), float(on[2]), rel_tol=1e-5)
    taps.remove()


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen25vl", "tiny-qwen3vl"])
def test_background_dropout_hides_only_background_tokens_from_the_lm(name):
    """Dropped tokens are background (no object covers them), some pictures lose some, and the LM
    cannot see them: noise added to their embeddings leaves the answer logits unchanged, while the
    same noise on kept tokens changes them. With nothing dropped the training forward (Qwen: M-RoPE
    positions computed first, on the full mask) equals HF's own bit for bit."""
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        train.TrainConfig(model=name, steps=1, batch_size=1, background_dropout=1.5)
    model, processor, _ = train.build_model(name, seed=0)
    model.eval()
    qwen = name != "tiny-llava"
    task = tasks.TASKS["shapes"](train.TASK_CONFIGS[name]["shapes"])
    cell = train.token_cell(model)
    samples = [task.sample("train", 500 + i) for i in range(6)]
    turns, _ = train.training_turns(samples, 2, cell)
    batch = processing.encode(processor, samples, answers=True, turns=turns)
    visual_id = model.config.image_token_id
    mask = train.drop_background(batch["attention_mask"], batch["input_ids"], samples, visual_id, cell, share=1.0)
    assert torch.equal(mask, train.drop_background(batch["attention_mask"], batch["input_ids"], samples, visual_id, cell, share=1.0))
    assert torch.equal(train.drop_background(batch["attention_mask"], batch["input_ids"], samples, visual_id, cell, share=0.0), batch["attention_mask"])
    dropped = (batch["attention_mask"] == 1) & (mask == 0)
    assert dropped.sum() > 0 and bool((batch["input_ids"][dropped] == visual_id).all())
    for row, sample in enumerate(samples):
        visual = np.flatnonzero(batch["input_ids"][row].numpy() == visual_id)
        on_objects = np.concatenate(train.object_cells(sample, list(range(len(sample.objects[0]))), cell))
        assert not dropped[row, visual[on_objects]].any()

    if qwen:
        positions = train.qwen_image_positions(model, batch)
    else:
        positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "attention_mask")}

    def logits(attention_mask, noise_on=None, position_ids=positions):
        def add_noise(module, args, kwargs):
            embeds = kwargs["inputs_embeds"]
            noise = torch.randn(embeds.shape, generator=torch.Generator().manual_seed(0))
            return args, {**kwargs, "inputs_embeds": embeds + 5.0 * noise * noise_on[..., None]}

        handle = model.model.language_model.register_forward_pre_hook(add_noise, with_kwargs=True) if noise_on is not None else None
        with torch.no_grad():
            out = model(**inputs, attention_mask=attention_mask, position_ids=position_ids).logits
        if handle is not None:
            handle.remove()
        return out[batch["labels"] != -100]

    if qwen:  # (LLaVA's training forward passes its left-padding positions either way)
        with torch.no_grad():
            plain = model(**inputs, attention_mask=batch["attention_mask"]).logits[batch["labels"] != -100]
        assert torch.equal(logits(batch["attention_mask"]), plain)
    clean = logits(mask)
    torch.testing.assert_close(logits(mask, dropped.float()), clean, rtol=0, atol=1e-5)
    kept_visual = ((mask == 1) & (batch["input_ids"] == visual_id)).float()
    assert (logits(mask, kept_visual) - clean).abs().max() > 1e-2


def test_training_cli_runs_and_rejects_bad_flags(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["--model", "tiny-llava", "--coord-aux", "maybe"])
    assert "expected true or false" in capsys.readouterr().err
    with pytest.raises(ValueError, match="rope_theta"):
        dataclasses.replace(train.PRESETS["tiny-llava"], rope_theta=100.0)
    cfg = train.TrainConfig(
        model="tiny-llava", steps=2, batch_size=2, extra_turns=1, curriculum=((0, 1, 2),), eval_every=2, eval_n=2, test_n=2,
        warmup=1, coord_aux=True, coord_aux_from="projector", tower_guide_weight=0.5,
    )
    results = train.train(cfg, tmp_path / "m", log=lambda *a: None)
    assert (tmp_path / "m" / "model.safetensors").exists() and (tmp_path / "m" / "README.md").exists()
    assert results["history"][-1]["step"] == 2 and 0.0 <= results["test"]["shapes"]["full"]["accuracy"] <= 1.0
    assert results["train_command"].endswith("(with TrainConfig.curriculum=((0, 1, 2),))")

    # a fine-tuning run starts from those weights exactly, and refuses a model of another kind
    with pytest.raises(ValueError, match="not a model directory"):
        train.TrainConfig(model="tiny-llava", steps=1, batch_size=1, init_from=str(tmp_path / "nowhere"))
    trained, _ = reference.load(tmp_path / "m")
    fresh, _, _ = train.build_model("tiny-llava", seed=1)
    assert not torch.equal(fresh.lm_head.weight, trained.lm_head.weight)
    train.start_from(fresh, tmp_path / "m")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), trained.state_dict().values(), strict=True))
    with pytest.raises(ValueError, match="same --model"):
        train.start_from(train.build_model("tiny-qwen25vl", seed=0)[0], tmp_path / "m")
    shipped_base = reference.load("tiny-qwen25vl")[0].config.get_text_config().rope_parameters["rope_theta"]
    with pytest.raises(ValueError, match=f"--rope-theta {shipped_base}"):
        other_base = train.build_model("tiny-qwen25vl", seed=0, rope_theta=shipped_base * 2)[0]
        train.start_from(other_base, reference.path("tiny-qwen25vl"))
    # another M-RoPE layout moves only visual tokens' rotary: a fine-tune may switch it
    interleaved = train.build_model("tiny-qwen25vl", seed=0, mrope_interleaved=True)[0]
    train.start_from(interleaved, reference.path("tiny-qwen25vl"))
    assert torch.equal(interleaved.lm_head.weight, reference.load("tiny-qwen25vl")[0].lm_head.weight)
    with pytest.raises(ValueError, match="mrope_interleaved"):
        dataclasses.replace(train.PRESETS["tiny-llava"], mrope_interleaved=True)

    # a fine-tune records the commands behind its starting weights, and its card gives every stage
    assert results["init_from_commands"] == [] and "stage1" not in (tmp_path / "m" / "README.md").read_text()
    tuned = train.train(
        dataclasses.replace(cfg, steps=1, eval_every=1, init_from=str(tmp_path / "m")), tmp_path / "tuned", log=lambda *a: None
    )
    assert tuned["init_from_commands"] == [results["train_command"]]
    card_text = (tmp_path / "tuned" / "README.md").read_text()
    assert "Two stages" in card_text and f"{results['train_command']} --out stage1\n" in card_text
    assert tuned["train_command"].replace(f"--init-from {tmp_path / 'm'}", "--init-from stage1") in card_text
    assert f"--init-from {tmp_path / 'm'}" in tuned["train_command"]
    again = train.train(
        dataclasses.replace(cfg, steps=1, eval_every=1, init_from=str(tmp_path / "tuned")), tmp_path / "again", log=lambda *a: None
    )
    assert again["init_from_commands"] == [results["train_command"], tuned["train_command"]]
    card_text = (tmp_path / "again" / "README.md").read_text()
    middle = tuned["train_command"].replace(f"--init-from {tmp_path / 'm'}", "--init-from stage1") + " --out stage2\n"
    last = again["train_command"].replace(f"--init-from {tmp_path / 'tuned'}", "--init-from stage2")
    assert "Three stages" in card_text and middle in card_text and last + "\n" in card_text


def test_loss_window_averages_each_aux_term_over_the_steps_that_had_it():
    g = torch.Generator().manual_seed(int(torch.randint(0, 10_000, ())))
    answer, coords, relation = torch.rand(3, 4, generator=g).tolist()
    window = train.LossWindow()
    for i in range(4):
        window.add(answer[i], coords[i], 0.0, 0.0, {"coords": coords[i], **({"relation": relation[i]} if i % 2 else {})})
    assert math.isclose(window.mean("answer-loss"), sum(answer) / 4)
    assert math.isclose(window.mean("aux relation"), (relation[1] + relation[3]) / 2)
    line = window.report(2.0)
    assert line.startswith(f"answer-loss {sum(answer) / 4:.3f} aux {sum(coords) / 4:.3f} (coords {sum(coords) / 4:.3f}, relation ")
    assert line.endswith("s/step, 2.0 min)")


def test_train_command_gives_back_its_config():
    """A run's recorded command line, parsed, is the config that ran (threads aside: speed only)."""
    cfg = dataclasses.replace(
        train.PRESETS["tiny-qwen25vl"], steps=600, lr=5e-4, warmup=50, coord_aux=True, coord_aux_from="lm",
        guide_split_families=("position", "count"), guide_sink_families=(), init_from="models/tiny-qwen25vl", threads=1,
        turn_weights=("count=3", "now-count=2.5"),
    )
    assert cfg.turn_weight_map == {"count": 3.0, "now-count": 2.5}
    for bad, message in ((("counting=3",), "unknown family 'counting'"), (("count=0",), "needs a positive weight"),
                         (("count",), "needs a positive weight")):
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(cfg, turn_weights=bad)
    command = train.train_command(cfg)
    assert command.startswith("python -m models.train --model tiny-qwen25vl --steps 600 ")
    parsed, out = train.parse_args(shlex.split(command)[3:])
    assert parsed == dataclasses.replace(cfg, threads=train.PRESETS["tiny-qwen25vl"].threads) and out is None
    assert train.train_command(train.PRESETS["tiny-llava"]) == "python -m models.train --model tiny-llava"


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen25vl", "tiny-qwen3vl"])
def test_recomputed_lm_attention_rows_equal_eager_weights(name):
    """The guide's rows, recomputed from each layer's Q/K and rotary embedding under SDPA, are the
    weights HF's eager attention returns (left-padded batch; Llama, Qwen2 and Qwen3 layouts, GQA;
    ``tests/training/test_qwen3vl.py`` also checks Qwen3's Q/K norms and videos)."""
    model, processor, _ = train.build_model(name, seed=int(torch.randint(0, 1000, ()).item()))
    taps = train.Taps.attach(model, dataclasses.replace(train.PRESETS[name], tower_guide_weight=0.0), qwen=name != "tiny-llava")
    task = tasks.TASKS["shapes"](train.TASK_CONFIGS[name]["shapes"])
    samples = [task.sample("train", i) for i in range(3)]
    turns, _ = train.training_turns(samples, 2)
    batch = processing.encode(processor, samples, answers=True, turns=turns)
    assert batch["attention_mask"][:, 0].min() == 0  # left padding is exercised
    model.model.language_model.config._attn_implementation = "eager"
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
    L = batch["input_ids"].shape[1]
    rows, positions = torch.tensor([0, 1, 2, 2]), torch.tensor([L - 1, L - 5, L - 3, L // 2])
    for layer, weights in enumerate(out.attentions):
        with torch.no_grad():
            mine = train.lm_attention_rows(taps.lm, layer, batch["attention_mask"], rows, positions)
        torch.testing.assert_close(mine, weights[rows, :, positions], atol=1e-6, rtol=1e-5)
    taps.remove()


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen25vl", "tiny-qwen3vl"])
def test_tower_guide_moves_received_attention_onto_objects(name):
    """A few gradient steps on the tower guide alone raise the share of received attention (HiPrune's
    score at its default layers; Qwen: dense per image, pooled per merge group, in raster order) that
    object tokens get."""
    qwen = name != "tiny-llava"
    cfg = dataclasses.replace(train.PRESETS[name], tower_guide_weight=1.0)
    model, processor, _ = train.build_model(name, seed=3)
    taps = train.Taps.attach(model, cfg, qwen=qwen)
    assert len(taps.tower.modules) == 2
    task = tasks.TASKS["shapes"](train.TASK_CONFIGS[name]["shapes"])
    samples = [task.sample("train", 100 + i) for i in range(2)]
    batch = processing.encode(processor, samples)
    tower = model.model.visual if qwen else model.model.vision_tower
    window = train.qwen_windows(model, batch["image_grid_thw"]) if qwen else None
    opt = torch.optim.Adam(tower.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        if qwen:
            tower(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
        else:
            tower(batch["pixel_values"])
        loss = train.tower_guide_loss(taps.tower, samples, 28 if qwen else 14, qwen=window)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    taps.remove()
    assert losses[-1] < losses[0] - 0.1, losses
    assert 0.0 < math.exp(-losses[-1]) <= 1.0


def test_qwen_tower_scores_are_the_passes_scores_in_raster_order():
    """The guide's Qwen scores, mapped from window to raster order, equal the HiPrune pass's own
    score function (window order) permuted by the tower's window index."""
    from vlmopt.adapters.qwen_common import qwen_vision_qk
    from vlmopt.graph.layout import VisualLayout
    from vlmopt.passes.hiprune import vision_received_attention

    cfg = dataclasses.replace(train.PRESETS["tiny-qwen25vl"], tower_guide_weight=1.0)
    model, processor, _ = train.build_model("tiny-qwen25vl", seed=int(torch.randint(0, 1000, ()).item()))
    taps = train.Taps.attach(model, cfg, qwen=True)
    task = tasks.TASKS["shapes"](train.TASK_CONFIGS["tiny-qwen25vl"]["shapes"])
    batch = processing.encode(processor, [task.sample("train", 7 + i) for i in range(2)])
    grid = batch["image_grid_thw"]
    with torch.no_grad():
        model.model.visual(batch["pixel_values"], grid_thw=grid)
        window = train.qwen_windows(model, grid)
        attn = taps.tower.modules[0]
        hidden, (cos, sin) = taps.tower.inputs[0]
        mine = torch.cat(tower_guide._qwen_received(attn, hidden, (cos, sin), grid, window["window_index"], window["merge_unit"]))
        merged = [(int(t), int(h) // 2, int(w) // 2) for t, h, w in grid.tolist()]
        layout = VisualLayout.from_grids(2, 1, (0, 1), merged)
        q, k = qwen_vision_qk(attn.qkv(hidden), cos, sin, attn.num_heads)
        theirs = vision_received_attention(q, k, layout, attn.num_heads, attn.scaling, 0, window["merge_unit"])
    taps.remove()
    torch.testing.assert_close(mine[window["window_index"]], theirs, rtol=1e-5, atol=1e-7)


def test_video_turns_point_at_the_evidence_tracks():
    """Video turns are the sample's own derived questions, and each evidence group is exactly the
    visual tokens (per temporal patch, raster order) that the auxiliary targets label as objects."""
    task = tasks.TASKS["needle"](train.TASK_CONFIGS["tiny-qwen25vl"]["needle"])
    samples = [task.sample("train", i) for i in range(2)]
    turns, evidence = train.training_turns(samples, 4, cell=28)
    assert turns == [s.more_questions(4) for s in samples]
    for s, groups in zip(samples, evidence):
        labels = train.aux_targets([s], 28)
        family, own = groups[0]
        assert family == s.family and len(own) == 1  # the needle: one object in one frame
        for _, tracks in groups:
            for tokens in tracks:
                assert len(tokens) and (labels[tokens, 0] > 0).all()


def test_split_guide_wants_each_half_of_the_heads_on_one_object(llava_processor):
    """A relative-position answer with ``split_families``: the first half of the heads on the
    first-named object and the second half on the other is on target; the same attention with the
    halves swapped, or every head on both objects, is not (averaged over heads, all three put all
    their mass on the two objects, so the unsplit guide cannot tell them apart)."""
    task = tasks.get("shapes", size=224, grid=14)
    sample = next(s for s in (task.sample("train", i) for i in range(50)) if s.family == "position")
    batch = processing.encode(llava_processor, [sample], answers=True)
    evidence = [[("position", train.object_cells(sample, [k for _, k in sample.evidence], 14))]]
    a, b = evidence[0][0][1]
    assert len(a) and len(b) and not set(a) & set(b)
    visual = llava_processor.tokenizer.convert_tokens_to_ids("<image>")
    vpos = np.flatnonzero(batch["input_ids"][0].numpy() == visual)
    L = batch["input_ids"].shape[1]
    answer_pos = int(np.flatnonzero(batch["labels"][0].numpy() != -100)[0]) - 1
    H = 6

    def maps(first, second):
        m = torch.full((1, H, L, L), 1e-9)
        m[0, : H // 2, answer_pos, vpos[first]] = 1.0 / len(first)
        m[0, H // 2 :, answer_pos, vpos[second]] = 1.0 / len(second)
        return [m] * 4

    both = np.concatenate([a, b])
    loss = lambda m, split: float(
        train.guide_loss(_rows(m), 4, batch, evidence, [sample], visual, 14, {}, (), ("position",) if split else ())
    )
    assert loss(maps(a, b), True) == pytest.approx(0.0, abs=1e-4)
    assert loss(maps(b, a), True) > 10.0 and loss(maps(both, both), True) > 1.0
    for m in (maps(a, b), maps(b, a), maps(both, both)):
        assert loss(m, False) == pytest.approx(0.0, abs=1e-4)
    with pytest.raises(ValueError, match="pick one"):
        train.TrainConfig(model="tiny-llava", steps=1, batch_size=1, guide_sink_families=("position",), guide_split_families=("position",))


def test_split_question_guide_gives_each_half_of_the_heads_one_objects_words(llava_processor):
    """With ``split_question`` a relative-position answer reads, in the first layer, the first-named
    object's colour and shape words with the first half of the heads and the other's with the second
    half; the same reading with the halves swapped, or every head on all four words, is off target,
    and without ``split_question`` all three are on it."""
    task = tasks.get("shapes", size=224, grid=14)
    rng = np.random.default_rng(int(torch.randint(0, 10_000, ()).item()))
    sample = next(s for s in (task.sample("train", int(i)) for i in rng.permutation(200)) if s.family == "position")
    batch = processing.encode(llava_processor, [sample], answers=True)
    words = train.attribute_words(llava_processor.tokenizer)
    ids = batch["input_ids"][0].numpy()
    asked = np.flatnonzero(np.isin(ids, list(words)))
    named = [w for w in sample.question.rstrip("?").split() if w in {value for _, value in words.values()}]
    assert len(named) == 4 and [words[int(ids[k])][1] for k in asked] == named  # first-named colour, shape, then the other's
    L, H = len(ids), 6
    answer_pos = int(np.flatnonzero(batch["labels"][0].numpy() != -100)[0]) - 1

    def maps(first, second):
        m = torch.full((1, H, L, L), 1e-9)
        m[0, : H // 2, answer_pos, first] = 1.0 / len(first)
        m[0, H // 2 :, answer_pos, second] = 1.0 / len(second)
        return [m] * 4

    visual = llava_processor.tokenizer.convert_tokens_to_ids("<image>")
    evidence = [[("position", train.object_cells(sample, [k for _, k in sample.evidence], 14))]]
    loss = lambda m, split: float(
        train.guide_loss(_rows(m), 4, batch, evidence, [sample], visual, 14, words, (), ("position",), read_question=True, split_question=split)
    )
    # the maps differ only in the answer's reading of its question: the differences are that guide's
    own, other = asked[:2], asked[2:]
    on, swapped, mixed = (loss(maps(x, y), True) for x, y in ((own, other), (other, own), (asked, asked)))
    assert swapped > on + 2.0 and mixed > on + 0.05
    unsplit = [loss(maps(x, y), False) for x, y in ((own, other), (other, own), (asked, asked))]
    assert max(unsplit) - min(unsplit) == pytest.approx(0.0, abs=1e-4)
    with pytest.raises(ValueError, match="guide_split_question needs"):
        train.TrainConfig(model="tiny-llava", steps=1, batch_size=1, guide_split_question=True)


def test_read_question_guide_points_each_answer_at_its_own_question_words(batch_of_scenes, llava_processor):
    """With ``read_question`` an answer position's first-layer attention belongs on the colour and
    shape words of its own turn's question: on target the loss stays zero; on the other turns'
    words it does not."""
    samples, evidence, batch = batch_of_scenes
    visual = llava_processor.tokenizer.convert_tokens_to_ids("<image>")
    words = train.attribute_words(llava_processor.tokenizer)
    on_target = _guided_regions(samples, evidence, batch, llava_processor, sink=False)
    ids, labels = batch["input_ids"], batch["labels"]
    first_own, first_other = on_target[0].clone(), on_target[0].clone()
    for row in range(len(samples)):
        word_pos = np.flatnonzero(np.isin(ids[row].numpy(), list(words)))
        lab = labels[row].numpy() != -100
        starts = np.flatnonzero(lab & ~np.concatenate([[False], lab[:-1]]))
        bounds = [0, *starts]
        for t, start in enumerate(starts):
            own = word_pos[(word_pos > bounds[t]) & (word_pos < start)]
            other = word_pos[(word_pos >= start)] if t + 1 < len(starts) else word_pos[word_pos < bounds[t]]
            assert len(own)
            first_own[row, :, start - 1, own] = 1.0 / len(own)
            if len(other):
                first_other[row, :, start - 1, other] = 1.0 / len(other)
    own_maps = [first_own, *on_target[1:3], first_own]
    other_maps = [first_other, *on_target[1:3], first_other]
    args = (4, batch, evidence, samples, visual, 14, words, (), ())
    assert float(train.guide_loss(_rows(own_maps), *args, read_question=True)) == pytest.approx(0.0, abs=1e-4)
    assert float(train.guide_loss(_rows(other_maps), *args, read_question=True)) > 1.0
    assert float(train.guide_loss(_rows(other_maps), *args, read_question=False)) == pytest.approx(0.0, abs=1e-4)


def test_a_deeper_lm_starts_from_a_trained_model_with_its_exact_function():
    """``lm_layers`` above the checkpoint's depth appends identity layers: on fresh pictures the deeper
    model's logits equal the shipped model's bit for bit, its trained layers are copied, and the new
    layers' other weights stay trainable (only their output projections are zeroed)."""
    shipped, processor = reference.load("tiny-qwen25vl")
    depth = shipped.config.get_text_config().num_hidden_layers
    deeper = train.build_model("tiny-qwen25vl", seed=0, mrope_interleaved=True, lm_layers=depth + 2)[0]
    train.start_from(deeper, reference.path("tiny-qwen25vl"))
    task = tasks.TASKS["shapes"](train.TASK_CONFIGS["tiny-qwen25vl"]["shapes"])
    start = int(torch.randint(0, 100_000, ()).item())
    batch = processing.encode(processor, [task.sample("test", start + i) for i in range(2)])
    shipped.eval(), deeper.eval()
    with torch.no_grad():
        assert torch.equal(deeper(**batch).logits, shipped(**batch).logits)
    new = deeper.model.language_model.layers[depth]
    assert torch.count_nonzero(new.self_attn.o_proj.weight) == 0 and torch.count_nonzero(new.mlp.down_proj.weight) == 0
    assert torch.count_nonzero(new.self_attn.q_proj.weight) > 0 and torch.count_nonzero(new.mlp.up_proj.weight) > 0
    assert train.lm_layers_appended(shipped, deeper) == set()
    with pytest.raises(ValueError, match="same --model"):  # a shallower model cannot take a deeper one's weights
        train.start_from(train.build_model("tiny-qwen25vl", seed=0, lm_layers=depth - 1)[0], reference.path("tiny-qwen25vl"))
    with pytest.raises(ValueError, match="lm_layers=1 must be at least 2"):
        train.TrainConfig(model="tiny-qwen25vl", steps=1, batch_size=1, lm_layers=1)
    with pytest.raises(ValueError, match="LM depth of tiny-qwen25vl and tiny-qwen3vl"):
        train.TrainConfig(model="tiny-llava", steps=1, batch_size=1, lm_layers=depth + 2)
