"""A LLaVA that feeds its LLM the CLS token (vision_feature_select_strategy='full', CLIP tower): every
pruning pass keeps each image's CLS token on top of the budget and prunes the grid; kept tokens keep
their positions; HiPrune's grid scores leave the CLS column out."""

import pytest
import torch

import vlmopt
from tests.conftest import eager_vision_attentions, padded_batch
from vlmopt import configs
from vlmopt.graph.edit import GraphEditor
from vlmopt.graph.layout import keep_count, pooled_grid
from vlmopt.graph.probe import run_with_probes
from vlmopt.passes import HiPrune, PoolPrune, RandomPrune
from vlmopt.adapters.llava import llava_config

PASSES = {
    "random_prune": RandomPrune(keep_ratio=0.5, seed=3),
    "pool_prune": PoolPrune(keep_ratio=0.25),
    "hiprune": HiPrune(keep_ratio=1 / 3, object_layer=1, deep_layer=2),
}


@pytest.fixture(scope="module")
def llava_cls():
    return configs.build(llava_config(strategy="full"), seed=8)


def kept_grid(pass_, grid):
    if isinstance(pass_, PoolPrune):
        t, h, w = pooled_grid(grid, pass_.keep_ratio)
        return t * h * w
    return keep_count(grid[0] * grid[1] * grid[2], pass_.keep_ratio, pass_.num_tokens)


def probe(compiled, batch, names=()):
    prompt = compiled.plan(batch)
    module = compiled.stages["prefill"]
    merge = next(n for n in module.graph.nodes if n.meta.get("role") == "merge")
    slots = GraphEditor(module).input_of(merge, "positions").name
    wanted = {slots, "position_ids_kept", "sequence_index", *names}
    output, values = run_with_probes(module, dict(prompt.inputs, cache=compiled.new_cache(), logits_to_keep=0), lambda n: n.name in wanted)
    return prompt, output, values[slots], values


@pytest.mark.parametrize("name", list(PASSES))
def test_cls_kept_and_the_grid_pruned(llava_cls, name):
    pass_ = PASSES[name]
    batch = padded_batch(llava_cls, seed=41)
    compiled = vlmopt.compile(llava_cls, passes=[pass_])
    prompt, output, kept_slots, values = probe(compiled, batch)
    layout = prompt.layout
    assert layout.leading == (1, 1) and layout.grids == ((1, 4, 4), (1, 4, 4)) and layout.counts == (17, 17)
    slots = prompt.inputs["visual_positions"]
    start = 0
    for image, grid in enumerate(layout.grids):
        mine = kept_slots[start : start + 1 + kept_grid(pass_, grid)]
        image_slots = slots[17 * image : 17 * (image + 1)]
        assert mine[0] == image_slots[0], "the CLS token is kept, first"
        assert torch.isin(mine, image_slots).all() and (mine[1:] > mine[:-1]).all(), "kept tokens stay in order"
        start += mine.numel()
    assert start == kept_slots.numel()
    assert compiled.visual_tokens_kept(prompt) == kept_slots.numel()
    index, original = values["sequence_index"], prompt.inputs["position_ids"]
    for b in range(index.shape[0]):
        valid = index[b] >= 0
        assert torch.equal(values["position_ids_kept"][b][valid], original[b][index[b][valid]]), "original positions"
    tokens = compiled.generate(**batch, max_new_tokens=5)
    assert tokens.shape == (2, batch["input_ids"].shape[1] + 5)


@pytest.mark.parametrize("name", list(PASSES))
def test_keep_ratio_one_is_exact_with_cls(llava_cls, name):
    pass_ = type(PASSES[name])(keep_ratio=1.0)
    batch = padded_batch(llava_cls, seed=42)
    with torch.no_grad():
        assert torch.equal(vlmopt.compile(llava_cls, passes=[pass_])(**batch).logits, llava_cls(**batch).logits)


def test_hiprune_grid_scores_leave_the_cls_column_out(llava_cls):
    batch = padded_batch(llava_cls, seed=43)
    compiled = vlmopt.compile(llava_cls, passes=[PASSES["hiprune"]])
    _, _, _, values = probe(compiled, batch, {"vision_1_received"})
    attentions = eager_vision_attentions(llava_cls, batch["pixel_values"])
    expected = attentions[1].mean(dim=(1, 2))[:, 1:].reshape(-1)  # 16 grid columns per image
    torch.testing.assert_close(values["vision_1_received"], expected, rtol=1e-5, atol=1e-7)


def test_golden_graph_diff(llava_cls, golden):
    base = vlmopt.compile(llava_cls)
    compiled = vlmopt.compile(llava_cls, passes=[PASSES["pool_prune"]])
    golden("pool_prune_llava_cls", vlmopt.graph.diff(base.graph, compiled.graph))


def test_two_passes_keep_cls_once(llava_cls):
    batch = padded_batch(llava_cls, seed=44)
    compiled = vlmopt.compile(llava_cls, passes=["random_prune:keep_ratio=0.5", "random_prune:keep_ratio=0.5,seed=1"])
    prompt, _, kept_slots, _ = probe(compiled, batch)
    assert kept_slots.numel() == 2 * (1 + keep_count(keep_count(16, 0.5, None), 0.5, None))
    assert torch.isin(prompt.inputs["visual_positions"][[0, 17]], kept_slots).all()
