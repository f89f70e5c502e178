"""The adapters' generic hooks: a decoder layer's queries and keys (with RoPE / M-RoPE) give HF's own
eager attention weights; the vision hook gives the block's attention; layer nodes and the cache."""

import pytest
import torch

import vlmopt
from tests.conftest import padded_batch
from vlmopt.graph.edit import GraphEditor
from vlmopt.graph.probe import run_with_probes


def eager_attentions(model, batch):
    model.set_attn_implementation({"vision_config": "sdpa", "text_config": "eager"})
    try:
        with torch.no_grad():
            return model(**batch, output_attentions=True).attentions
    finally:
        model.set_attn_implementation({"vision_config": "sdpa", "text_config": "sdpa"})


def hook_values(model, batch, layer, rope=True):
    compiled = vlmopt.compile(model)
    module = compiled.graph["prefill"]
    editor = GraphEditor(module)
    qk = compiled.adapter.insert_decoder_qk(editor, layer, rope=rope)
    editor.finish()
    prompt = compiled.plan(batch)
    inputs = dict(prompt.inputs, cache=compiled.new_cache(), logits_to_keep=0)
    _, values = run_with_probes(module, inputs, lambda n: n in (qk.q, qk.k))
    return qk, values[qk.q.name], values[qk.k.name]


@pytest.mark.parametrize("layer", [0, 1])
def test_decoder_qk_gives_hf_eager_attention(family_model, layer):
    batch = padded_batch(family_model, seed=31)
    qk, q, k = hook_values(family_model, batch, layer)
    batch_size, heads, seq, head_dim = q.shape
    assert (heads, head_dim) == (qk.heads, qk.head_dim) and k.shape == (batch_size, qk.kv_heads, seq, head_dim)
    keys = k.repeat_interleave(qk.heads // qk.kv_heads, dim=1)
    real = batch["attention_mask"].bool()
    allowed = torch.ones(seq, seq, dtype=torch.bool).tril() & real[:, None, None, :]
    logits = (q @ keys.transpose(-1, -2) * qk.scale).masked_fill(~allowed, float("-inf"))
    ours = torch.softmax(logits, dim=-1)
    expected = eager_attentions(family_model, batch)[layer]
    for b in range(batch_size):  # query rows of real tokens (padding rows attend to nothing real)
        torch.testing.assert_close(ours[b][:, real[b]], expected[b][:, real[b]], rtol=1e-5, atol=1e-6)


def test_decoder_qk_without_rope_differs_only_by_rotation(family_model):
    batch = padded_batch(family_model, seed=32)
    _, q_rope, k_rope = hook_values(family_model, batch, 1)
    qk, q, k = hook_values(family_model, batch, 1, rope=False)
    assert not qk.rope and q.shape == q_rope.shape
    # Rotary embeddings rotate pairs of coordinates: norms per (token, head) are unchanged.
    torch.testing.assert_close(q.norm(dim=-1), q_rope.norm(dim=-1), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(q, q_rope)


def test_layer_nodes_and_cache(family_model):
    compiled = vlmopt.compile(family_model)
    for stage in ("prefill", "decode"):
        graph = compiled.graph[stage]
        nodes = compiled.adapter.decoder_layer_nodes(graph)
        assert [n.meta["index"] for n in nodes] == list(range(compiled.config.get_text_config().num_hidden_layers))
        cache = compiled.adapter.cache_input(graph)
        assert all(cache in n.kwargs.values() for n in nodes)


def test_decoder_qk_names_the_layers(family_model):
    compiled = vlmopt.compile(family_model)
    layers = compiled.config.get_text_config().num_hidden_layers
    with pytest.raises(ValueError, match=f"decoder layers 0..{layers - 1}, not {layers}"):
        compiled.adapter.insert_decoder_qk(GraphEditor(compiled.graph["prefill"]), layers)
