"""The vLLM plugin's parts that need no vLLM: which pass lists it runs and refuses, its kept counts,
its eager pruning against vlmopt's compiled graphs, and its M-RoPE positions against HF's
``get_rope_index`` (engine and server tests: test_vllm_engine.py, test_vllm_server.py, in the vLLM environment)."""

import numpy as np
import pytest
import torch

import vlmopt
from vlmopt import configs
from vlmopt.adapters.llava import llava_config
from vlmopt.adapters.qwen2_5_vl import qwen25vl_config
from vlmopt.adapters.qwen3_vl import qwen3vl_config
from vlmopt.errors import IncompatiblePassError, PassConfigError, UnknownPassError, UnsupportedModelError
from vlmopt.graph.probe import run_with_probes
from vlmopt.integrations.vllm import positions as mrope
from vlmopt.integrations.vllm.prune import TowerQK, blocks_read, prune
from vlmopt.integrations.vllm.spec import TowerFacts, check_mrope, engine_overrides, kept_count, plugin_passes, three_sections

PASSES = ["random_prune:keep_ratio=0.4,seed=3", "pool_prune:keep_ratio=0.3", "hiprune:keep_ratio=1/3,object_layer=1,deep_layer=3"]


def with_passes(config, spec):
    config.vlmopt_passes = spec
    return config


@pytest.mark.parametrize("spec, error, words", [
    ("halfv", IncompatiblePassError, "llm stage"),
    ("hermes", IncompatiblePassError, "kv stage"),
    ("random_prune:keep_ratio=0.5+pool_prune:keep_ratio=0.5", IncompatiblePassError, "must come before"),
    ("hiprune:keep_ratio=0.5,object_layer=7", IncompatiblePassError, "only vision blocks 0..3"),
    ("hiprune:keep_ratio=2", PassConfigError, "keep_ratio must be in (0, 1]"),
    ("nope:keep_ratio=0.5", UnknownPassError, "unknown pass 'nope'"),
])
def test_passes_the_plugin_cannot_run_are_refused_with_the_reason(spec, error, words):
    with pytest.raises(error, match=None) as caught:
        plugin_passes(with_passes(qwen25vl_config(), spec))
    assert words in str(caught.value)


def test_families_and_values_the_plugin_cannot_serve_are_refused():
    with pytest.raises(UnsupportedModelError, match="1-D RoPE"):
        plugin_passes(with_passes(llava_config(), "random_prune:keep_ratio=0.5"))
    with pytest.raises(PassConfigError, match="must be a pass spec string"):
        plugin_passes(with_passes(qwen25vl_config(), 0.5))
    assert plugin_passes(llava_config()) == ()  # no passes: vLLM's own model, whatever the family
    assert plugin_passes(with_passes(qwen3vl_config(), " ")) == ()


def test_every_registered_family_gets_its_vllm_class_or_a_refusing_one():
    """The plugin's architectures come from the adapter registry: a family's own vLLM classes (named in
    its adapter file), else vLLM's class refusing a pass list with the family's reason."""
    from vlmopt.adapters import REGISTRY
    from vlmopt.integrations.vllm import REFUSING, architectures
    from vlmopt.integrations.vllm.spec import refusal

    found = architectures()
    assert set(found) == set(REGISTRY)
    for hf_class, adapter in REGISTRY.items():
        if hf_class in adapter.vllm_classes:
            assert found[hf_class] == adapter.vllm_classes[hf_class] and found[hf_class].startswith("vlmopt.adapters.")
        else:
            assert found[hf_class] == f"{REFUSING}:{hf_class}"
            assert "1-D RoPE" in refusal(adapter) or adapter.position_dims != (0, 1)
    assert any(path.startswith(REFUSING) for path in found.values())
    assert any(not path.startswith(REFUSING) for path in found.values())


def test_the_paper_layers_are_the_familys_scaled_to_the_tower():
    items = plugin_passes(with_passes(qwen25vl_config(vision_depth=8), "hiprune:keep_ratio=1/3"))
    facts = TowerFacts.of(qwen25vl_config(vision_depth=8))
    assert blocks_read(items, facts) == (3, 7)  # block 16 of 32 → 4 of 8 (index 3); the deepest block
    assert blocks_read(plugin_passes(with_passes(qwen3vl_config(), PASSES[0])), facts) == ()


@pytest.mark.parametrize("spec", PASSES)
def test_kept_counts_are_the_compiled_models(spec):
    model = configs.build(qwen25vl_config(), seed=0)
    compiled = vlmopt.compile(model, passes=[spec])
    items = plugin_passes(with_passes(qwen25vl_config(), spec))
    for grid in [(8, 8), (6, 10), (4, 14)]:
        batch = configs.synthetic_batch(model, [configs.PromptSpec()], image_grids=[grid], seed=1)
        expected = compiled.visual_tokens_kept(compiled.plan(batch))
        assert kept_count(items, (1, grid[0] // 2, grid[1] // 2)) == expected


def test_one_pair_mrope_sections_get_vllms_three_section_form():
    rope = {"rope_type": "default", "mrope_section": [1] * 16, "rope_theta": 10000.0}
    fixed = three_sections(rope)
    assert fixed["mrope_section"] == [6, 5, 5] and fixed["mrope_interleaved"]
    axis_of_pair = [i % 3 for i in range(16)]  # HF: pair i from axis i % 3
    channels = np.arange(16)  # vLLM's interleaved rule
    vllm_axis = np.where((channels % 3 == 1) & (channels < 15), 1, np.where((channels % 3 == 2) & (channels < 15), 2, 0))
    assert vllm_axis.tolist() == axis_of_pair
    assert three_sections({"mrope_section": [16, 24, 24]}) is None
    overrides = engine_overrides("tiny-qwen25vl", "hiprune:keep_ratio=1/3")
    assert overrides["text_config"]["rope_parameters"]["mrope_section"] == [6, 5, 5]
    config = qwen25vl_config()
    config.text_config.rope_parameters = dict(rope)
    with pytest.raises(UnsupportedModelError, match="hf_overrides"):
        check_mrope(config)


def graph_and_eager(model, spec, batch):
    """(keep the compiled graph computes, keep the plugin's eager pruning computes from the same tower values)."""
    compiled = vlmopt.compile(model, passes=[spec])
    prompt = compiled.plan(batch)
    inputs = dict(prompt.inputs, cache=compiled.new_cache(), logits_to_keep=0)
    names = {"visual_tokens", "keep", "pool_anchors"} | {f"vision_{b}_{x}" for b in (1, 3) for x in "qk"}
    _, values = run_with_probes(compiled.stages["prefill"], inputs, lambda n: n.name in names)
    items = plugin_passes(with_passes(model.config, spec))
    facts = TowerFacts.of(model.config)
    blocks = blocks_read(items, facts)
    qk = None
    if blocks:
        attention = model.model.visual.blocks[blocks[0]].attn
        qk = TowerQK({b: values[f"vision_{b}_q"] for b in blocks}, {b: values[f"vision_{b}_k"] for b in blocks},
                     attention.scaling, prompt.inputs.get("reverse_index"))
    _, keep, _ = prune(items, values["visual_tokens"], list(prompt.layout.grids), facts, qk)
    return values.get("keep", values.get("pool_anchors")), keep


@pytest.mark.parametrize("spec", PASSES)
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_eager_pruning_keeps_what_the_compiled_graph_keeps(spec, family):
    """Same tower values in, same tokens out: the plugin runs the pass's own prune (windows, DeepStack rows, several sizes)."""
    config = qwen25vl_config(vision_depth=4) if family == "qwen2_5_vl" else qwen3vl_config(vision_depth=4)
    model = configs.build(config, seed=2)
    batch = configs.synthetic_batch(model, [configs.PromptSpec(images=2), configs.PromptSpec()], image_grids=[(8, 8), (6, 10), (4, 12)],
                                    video_grids=[(4, 6, 8)], seed=int(torch.randint(0, 1000, ())))
    theirs, ours = graph_and_eager(model, spec, batch)
    assert torch.equal(theirs, ours)


def hf_positions(model, batch):
    compiled = vlmopt.compile(model)
    return compiled.plan(batch).inputs["position_ids"][:, 0].numpy()  # [3, S] of the one prompt


def spans_of(ids, config, grids, t_steps, video_rows):
    """(offset, rows, grid) of each visual input of one prompt's ids, vLLM's spans (a Qwen3-VL video: its whole block run)."""
    visual = np.isin(ids, [config.image_token_id, config.video_token_id])
    starts = [i for i in range(len(ids)) if visual[i] and (i == 0 or not visual[i - 1])]
    spans, item = [], 0
    for grid, step, rows in zip(grids, t_steps, video_rows):
        if rows is None:
            spans.append((starts[item], int(np.prod(grid)), grid, step, None))
            item += 1
        else:  # a Qwen3-VL video: one run of pads per temporal patch, its span from the first timestamp
            first = starts[item] - 3
            spans.append((first, rows, grid, step, ids[first : first + rows]))
            item += grid[0]
    return spans


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_positions_are_the_unpruned_prompts(family):
    """Text and kept tokens get the unpruned prompt's positions (HF's ``get_rope_index``); the prompt is
    the pruned one. One rule is vLLM's, not HF's: after a Qwen2.5-VL video the text goes on one past the
    video's largest id, temporal ones included (vLLM's unpruned model does so), where HF goes on at
    ``max(h, w)``."""
    config = qwen25vl_config() if family == "qwen2_5_vl" else qwen3vl_config()
    model = configs.build(config, seed=0)
    batch = configs.synthetic_batch(model, [configs.PromptSpec(images=2, text_after=5)], image_grids=[(8, 12), (10, 6)],
                                    video_grids=[(6, 8, 6)], seed=4)
    if family == "qwen2_5_vl":
        batch["second_per_grid_ts"] = torch.tensor([1.5])
    expected = hf_positions(model, batch)
    ids = batch["input_ids"][0].numpy()
    grids = [(1, 4, 6), (1, 5, 3), (3, 4, 3)]
    step = 1.5 * config.vision_config.tokens_per_second if family == "qwen2_5_vl" else 1.0
    if family == "qwen2_5_vl":  # vLLM's rule after the video (the prompt's last visual input)
        after = np.flatnonzero(ids == config.video_token_id)[-1] + 1
        expected[:, after:] += mrope.grid_extent(grids[2], step) - max(grids[2][1:])
    video_rows = 3 * (3 + 12 + 1) if family == "qwen3_vl" else None
    spans = spans_of(ids, config, grids, [1.0, 1.0, step], [None, None, video_rows])
    rng = np.random.default_rng(0)
    keep_rows, new_spans, pieces, offset_shift = np.ones(len(ids), bool), [], [], 0
    for offset, rows, grid, t_step, span_ids in spans:
        count = int(np.prod(grid))
        keep = np.sort(rng.choice(count, size=max(1, count // 3), replace=False))
        if span_ids is None:
            rel = mrope.grid_positions(grid, t_step)[:, keep]
            extent = mrope.grid_extent(grid, t_step)
            kept_rows = offset + keep
        else:
            counts = mrope.frame_text_counts(span_ids.tolist(), config.vision_start_token_id, config.vision_end_token_id)
            rel, visual, extent = mrope.video_span(counts, grid, keep)
            all_rel, all_visual, _ = mrope.video_span(counts, grid, np.arange(count))
            kept_rows = offset + np.flatnonzero(~all_visual | np.isin(np.cumsum(all_visual) - 1, keep) & all_visual)
        keep_rows[offset : offset + rows] = False
        keep_rows[kept_rows] = True
        new_spans.append((offset - offset_shift, rel.shape[1], extent))
        pieces.append(rel)
        offset_shift += rows - rel.shape[1]
    length = int(keep_rows.sum())
    ours, delta = mrope.prompt_positions(length, new_spans)
    for (offset, rows, _), rel in zip(new_spans, pieces):
        ours[:, offset : offset + rows] += rel
    np.testing.assert_array_equal(ours, expected[:, keep_rows])
    assert delta == expected.max() + 1 - length  # decoding goes on where the unpruned prompt's would
