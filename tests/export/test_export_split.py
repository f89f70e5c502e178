"""Cutting the prefill graph at the visual merge, and the export stand-ins."""

from __future__ import annotations

import pytest
import torch

import vlmopt
from vlmopt.export.errors import ExportError
from vlmopt.export.split import split_prefill
from vlmopt.graph.edit import GraphEditor


@pytest.mark.parametrize("passes", [[], ["random_prune:keep_ratio=0.5"], ["hiprune:keep_ratio=0.33"]])
def test_split_cuts_at_the_merge(family_model, passes):
    split = split_prefill(vlmopt.compile(family_model, passes=passes).graph["prefill"])
    vision_nodes = [n for n in split.vision.graph.nodes if n.op not in ("placeholder", "output")]
    assert vision_nodes and all(n.meta["stage"] in ("vision", "projector") for n in vision_nodes)
    llm_nodes = [n for n in split.llm.graph.nodes if n.op not in ("placeholder", "output")]
    assert all(n.meta["stage"] not in ("vision", "projector") for n in llm_nodes)
    expected = ["input_ids", "attention_mask", "position_ids", "visual_embeds", "visual_slots"]
    expected += ["sequence_index"] if passes else []
    assert split.llm_inputs == [*expected, "cache", "logits_to_keep"]
    assert split.pruned == bool(passes)
    assert "layout" not in split.llm_inputs and "pixel_values" in split.vision_inputs


def test_split_refuses_an_llm_node_reading_a_vision_value(llava_clip):
    compiled = vlmopt.compile(llava_clip)
    editor = GraphEditor(compiled.graph["prefill"])
    features = next(n for n in editor.graph.nodes if n.name == "features")
    norm = editor.one("final_norm")
    editor.insert(norm, torch.mean, (features,), role="final_norm", stage="llm", name="peek")
    editor.finish()
    with pytest.raises(ExportError, match="LLM node peek reads the vision value features"):
        split_prefill(compiled.graph["prefill"])


def test_qwen_vision_block_stand_in_matches_the_hf_block(qwen):
    from vlmopt.adapters.qwen_common import QwenVisionBlockForExport

    compiled = vlmopt.compile(qwen)
    batch = vlmopt.configs.synthetic_batch(qwen, [vlmopt.configs.PromptSpec()] * 2, image_grids=[(8, 8), (4, 8)], seed=9)
    prompt = compiled.plan(batch)
    block = qwen.model.visual.blocks[0]
    generator = torch.Generator().manual_seed(10)
    seq, width = prompt.inputs["pixel_values"].shape[0], qwen.config.vision_config.hidden_size
    hidden = torch.randn(seq, width, generator=generator)
    head = width // qwen.config.vision_config.num_heads
    cos, sin = torch.randn(seq, head, generator=generator), torch.randn(seq, head, generator=generator)
    for segments in (prompt.inputs["cu_seqlens"], prompt.inputs["cu_window_seqlens"]):
        with torch.no_grad():
            expected = block(hidden, cu_seqlens=segments, position_embeddings=(cos, sin))
            got = QwenVisionBlockForExport(block, segments)(hidden, position_embeddings=(cos, sin))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
