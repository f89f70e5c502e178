"""A cut between decoder layers: keep-all is bit-exact to HF, a real cut gives per-layer cache
lengths, decoding continues on the pruned cache, and a batch equals its rows run alone."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import vlmopt
from tests.conftest import assert_batch_equals_rows, padded_batch
from vlmopt.graph.edit import GraphEditor, segment_mask_name
from vlmopt.passes.base import Pass, cut_llm


def keep_every_slot(x: torch.Tensor) -> torch.Tensor:
    """[B, S] index keeping every slot of ``x`` [B, S, ...]."""
    return torch.arange(x.shape[1]).expand(x.shape[:2]).contiguous()


def drop_odd_visual(span: torch.Tensor) -> torch.Tensor:
    """[B, S'] index keeping text and every other visual token (the 1st, 3rd, ...), right-aligned."""
    keep = ~span | (span & (span.long().cumsum(1) % 2 == 1))
    seq = span.shape[1]
    out_len = int(keep.sum(1).max())
    values, index = torch.topk(keep.long() * seq + torch.arange(seq), out_len, dim=1)
    values, index = values.flip(1), index.flip(1)
    return torch.where(values >= seq, index, -1)


@dataclass(frozen=True)
class CutAt(Pass):
    stage: ClassVar[str] = "llm"

    layer: int = 1
    drop: bool = False

    def apply(self, graph) -> None:
        editor = GraphEditor(graph["prefill"])
        layers = graph.adapter.decoder_layer_nodes(graph["prefill"])
        # The keep-all cut reads the hidden states only, so the cut itself builds the visual span.
        source = editor.visual_span() if self.drop else layers[self.layer - 1]
        index = editor.insert(
            layers[self.layer - 1], drop_odd_visual if self.drop else keep_every_slot, (source,), role="sequence_cut",
        )
        cut_llm(graph, editor, self.layer, index)
        editor.finish()


def hf_generate(model, batch, new):
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=new, do_sample=False, eos_token_id=[])


@pytest.mark.parametrize("layer", [1, 2])
def test_keep_all_cut_is_bit_exact(family_model, layer):
    batch = padded_batch(family_model, seed=41)
    compiled = vlmopt.compile(family_model, passes=[CutAt(layer=layer)])
    with torch.no_grad():
        expected = family_model(**batch).logits
        got = compiled(**batch).logits
    assert torch.equal(got, expected)
    tokens = compiled.generate(**batch, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(tokens, hf_generate(family_model, batch, 6))


def test_two_keep_all_cuts_are_bit_exact(family_model):
    batch = padded_batch(family_model, seed=42)
    compiled = vlmopt.compile(family_model, passes=[CutAt(layer=1), CutAt(layer=2)])
    tokens = compiled.generate(**batch, max_new_tokens=5, eos_token_id=[])
    assert torch.equal(tokens, hf_generate(family_model, batch, 5))
    names = [n.target for n in compiled.graph["decode"].graph.nodes if n.op == "placeholder"]
    assert segment_mask_name(1) in names and segment_mask_name(2) in names


def test_cut_gives_per_layer_cache_lengths_and_decodes(family_model):
    batch = padded_batch(family_model, seed=43)
    compiled = vlmopt.compile(family_model, passes=[CutAt(layer=2, drop=True)])
    prompt = compiled.plan(batch, for_generation=True)
    visual_per_row = prompt.layout.tokens_per_row()
    dropped = min(v // 2 for v in visual_per_row)
    seq = batch["input_ids"].shape[1]
    cache = compiled.new_cache()
    out = compiled.run_stage(prompt.stage, prompt.inputs, cache, logits_to_keep=1)
    layers = compiled.config.get_text_config().num_hidden_layers
    lengths = [cache.get_seq_length(i) for i in range(layers)]
    assert lengths == [seq, seq] + [seq - dropped] * (layers - 2)
    assert out["attention_mask"].shape[1] == seq and out[segment_mask_name(2)].shape[1] == seq - dropped
    seen = []
    run_stage = compiled.run_stage

    def recording(stage, inputs, cache, logits_to_keep):
        result = run_stage(stage, inputs, cache, logits_to_keep)
        seen.append((stage, inputs["position_ids"].clone(), [cache.get_seq_length(i) for i in range(layers)]))
        return result

    compiled.run_stage = recording
    tokens = compiled.generate(**batch, max_new_tokens=4, eos_token_id=[])
    assert tokens.shape == (2, seq + 4)
    for step, (stage, position, lengths) in enumerate(seen[1:]):
        assert stage == "decode"
        assert torch.equal(position, prompt.next_position + step), "decoding continues at the unpruned length"
        assert lengths == [seq + step + 1] * 2 + [seq - dropped + step + 1] * (layers - 2)


def test_cut_batch_equals_rows_alone(family_model):
    batch = padded_batch(family_model, seed=44)
    assert_batch_equals_rows(vlmopt.compile(family_model, passes=[CutAt(layer=1, drop=True)]), batch)


def test_text_only_prompt_decodes_with_one_mask(family_model):
    batch = padded_batch(family_model, seed=45)
    text = {"input_ids": batch["input_ids"][:, -4:], "attention_mask": torch.ones(2, 4, dtype=torch.long)}
    compiled = vlmopt.compile(family_model, passes=[CutAt(layer=1, drop=True)])
    assert torch.equal(compiled.generate(**text, max_new_tokens=4, eos_token_id=[]), hf_generate(family_model, text, 4))
