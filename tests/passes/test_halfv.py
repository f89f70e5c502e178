"""HalfV: the probe equals an independent last-token attention, exact budgets with every text slot
kept, LLaVA's frozen visual rows (text rows as HF's layer computes them, FLOPs of the active rows
only), batch = rows alone, keep-all exactness, golden graph diffs, defaults and the errors given
before tracing (positions and masks through a cut: tests/graph/test_llm_cut.py)."""

import pytest
import torch

import vlmopt
from tests.conftest import assert_batch_equals_rows, padded_batch
from vlmopt.graph.layout import keep_count
from vlmopt.graph.probe import run_with_probes
from vlmopt.passes import HalfV, RandomPrune


def probe(compiled, batch, wanted, for_generation=True):
    prompt = compiled.plan(batch, for_generation=for_generation)
    inputs = dict(prompt.inputs, cache=compiled.new_cache(), logits_to_keep=1)
    _, values = run_with_probes(compiled.stages["prefill"], inputs, wanted)
    return prompt, values


def hf_hidden_states(model, batch):
    with torch.no_grad():
        return model(**batch, output_hidden_states=True).hidden_states


def test_relevance_is_the_last_tokens_attention_without_rope(family_model):
    batch = padded_batch(family_model, seed=51)
    compiled = vlmopt.compile(family_model, passes=[HalfV(ivr_layer=1, ivr_keep=0.5)])
    prompt, values = probe(compiled, batch, lambda n: n.name in ("halfv_1_relevance", "visual_span"), for_generation=False)
    states = hf_hidden_states(family_model, batch)[0]  # the input of layer 0, which probes for the cut at 1
    layer = compiled.adapter.text_model.layers[0]
    config = compiled.adapter.text_config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    with torch.no_grad():
        normed = layer.input_layernorm(states)
        q = layer.self_attn.q_proj(normed[:, -1]).view(2, heads, -1)
        k = layer.self_attn.k_proj(normed).view(2, normed.shape[1], kv_heads, -1).repeat_interleave(heads // kv_heads, 2)
    span = values["visual_span"]
    logits = torch.einsum("bhd,bshd->bhs", q, k).masked_fill(~span[:, None], float("-inf"))
    expected = torch.softmax(logits, -1).nan_to_num(0).mean(1)
    torch.testing.assert_close(values["halfv_1_relevance"], expected, rtol=1e-5, atol=1e-6)
    assert span.sum(1).tolist() == prompt.layout.tokens_per_row()


def test_budgets_anchors_and_text(family_model):
    batch = padded_batch(family_model, seed=52)
    config = HalfV(ivr_layer=1, ivr_keep=0.5, anchor_frac=0.5, ssr_layer=2)
    compiled = vlmopt.compile(family_model, passes=[config])
    names = ("halfv_1_keep", "halfv_1_relevance", "visual_span")
    prompt, values = probe(compiled, batch, lambda n: n.name in names)
    span, index, relevance = values["visual_span"], values["halfv_1_keep"], values["halfv_1_relevance"]
    budgets = [keep_count(c, 0.5, None) for c in prompt.layout.counts]
    for b in range(2):
        kept = index[b][index[b] >= 0]
        assert torch.equal(kept, kept.sort().values), "kept slots stay in order"
        visual = kept[span[b, kept]]
        assert visual.numel() == budgets[b]
        assert torch.equal(kept[~span[b, kept]], (~span[b]).nonzero().flatten()), "every text slot is kept"
        anchors = relevance[b].topk(int(0.5 * budgets[b])).indices
        assert set(anchors.tolist()) <= set(visual.tolist()), "the most relevant tokens are anchors"


def test_llava_frozen_rows_skip_the_visual_rows(llava_clip):
    batch = padded_batch(llava_clip, seed=53)
    compiled = vlmopt.compile(llava_clip, passes=[HalfV(ivr_layer=1, ivr_keep=0.5, ssr_layer=2)])
    graph = compiled.graph.prefill
    stand_in = next(n for n in graph.graph.nodes if n.name == "inactive_layer_2")
    source, _, mask_node, cos_node, sin_node, _ = stand_in.args
    wanted = {stand_in, source, mask_node, cos_node, sin_node}
    _, values = probe(compiled, batch, lambda n: n in wanted or n.name == "visual_span_kept")
    before, after, span = values[source.name], values[stand_in.name], values["visual_span_kept"]
    mask2d = values[mask_node.name].bool()
    assert torch.equal(after[span], before[span]), "visual rows are not updated"
    seq = before.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    allowed = (causal & mask2d[:, None, :]) | torch.eye(seq, dtype=torch.bool)
    layer = compiled.adapter.text_model.layers[2]
    with torch.no_grad():
        expected = layer(before, attention_mask=allowed[:, None], position_embeddings=(values[cos_node.name], values[sin_node.name]))
    text = ~span & mask2d
    torch.testing.assert_close(after[text], expected[text], rtol=1e-5, atol=1e-5)


def test_inactive_rows_cost_only_their_keys_and_values(llava_clip):
    from torch.utils.flop_counter import FlopCounterMode

    from vlmopt.adapters import adapter_for
    from vlmopt.layers.inactive_rows import InactiveRowsLayer
    from vlmopt.flops import register_flop_formulas

    register_flop_formulas()
    config = llava_clip.config.get_text_config()
    layer = llava_clip.model.language_model.layers[2]
    generator = torch.Generator().manual_seed(59)
    batch, seq, active = 2, 40, 12
    hidden = torch.randn(batch, seq, config.hidden_size, generator=generator)
    slots = torch.stack([torch.randperm(seq, generator=generator)[:active].sort().values for _ in range(batch)])
    cos, sin = llava_clip.model.language_model.rotary_emb(hidden, torch.arange(seq).expand(batch, seq))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        view = adapter_for(llava_clip).decoder_view
        out = InactiveRowsLayer(layer, view)(hidden, slots, torch.ones(batch, seq), cos, sin, None)
    width, kv_width = config.hidden_size, config.num_key_value_heads * layer.self_attn.head_dim
    expected = 2 * batch * (
        2 * seq * width * kv_width  # keys and values of every row
        + 2 * active * width * width  # queries and output projection of the active rows
        + 3 * active * width * config.intermediate_size  # the MLP of the active rows
        + 2 * active * seq * width  # attention: scores and weighted values
    )
    assert counter.get_total_flops() == expected
    frozen = torch.ones(batch, seq, dtype=torch.bool).scatter(1, slots, False)
    assert torch.equal(out[frozen], hidden[frozen])


def test_qwen_second_cut_keeps_the_top_visual_tokens(qwen):
    batch = padded_batch(qwen, seed=55)
    compiled = vlmopt.compile(qwen, passes=[HalfV(ivr_layer=1, ivr_keep=0.5, ssr_layer=2, ssr_keep=0.25)])
    prompt, values = probe(compiled, batch, lambda n: n.name.startswith("halfv_2") or n.meta.get("visual_span", False))
    spans = [v for k, v in values.items() if not k.startswith("halfv_2")]
    span = spans[-2]  # the span as the first cut left it (the last one is after the second cut)
    index, relevance = values["halfv_2_keep"], values["halfv_2_relevance"]
    for b, count in enumerate(prompt.layout.counts):
        kept = index[b][index[b] >= 0]
        visual = kept[span[b, kept]]
        assert visual.numel() == keep_count(count, 0.25, None)
        top = relevance[b].masked_fill(~span[b], -1).topk(visual.numel()).indices.sort().values
        assert torch.equal(visual, top), "the most attended visual tokens, never text"
    assert (relevance * ~span).abs().sum() == 0


def test_batch_equals_rows_alone(family_model):
    batch = padded_batch(family_model, seed=56)
    assert_batch_equals_rows(vlmopt.compile(family_model, passes=[HalfV()]), batch)


def test_qwen_keep_all_is_bit_exact(qwen):
    batch = padded_batch(qwen, seed=57)
    compiled = vlmopt.compile(qwen, passes=[HalfV(ivr_keep=1.0, ssr_keep=1.0)])
    with torch.no_grad():
        expected = qwen.generate(**batch, max_new_tokens=5, do_sample=False, eos_token_id=[])
    assert torch.equal(compiled.generate(**batch, max_new_tokens=5, eos_token_id=[]), expected)


def test_defaults_scale_with_depth(llava_clip, qwen):
    llava = vlmopt.compile(llava_clip, passes=["halfv"])
    assert llava.passes[0].settings(llava.adapter) == (1, 0.5, 0.2, 2, None)
    compiled = vlmopt.compile(qwen, passes=["halfv"])
    assert compiled.passes[0].settings(compiled.adapter) == (1, 0.25, 0.2, 2, 0.05)


def test_golden_graph_diff(family_model, golden):
    base = vlmopt.compile(family_model)
    compiled = vlmopt.compile(family_model, passes=[HalfV()])
    golden(f"halfv_{base.adapter.family}", vlmopt.graph.diff(base.graph, compiled.graph))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ivr_keep": 0}, r"HalfV.ivr_keep must be in \(0, 1\]"),
        ({"ssr_keep": 1.5}, r"HalfV.ssr_keep must be in \(0, 1\]"),
        ({"ivr_layer": 0}, r"HalfV.ivr_layer must be in \[1"),
        ({"ivr_layer": 2, "ssr_layer": 2}, "ssr_layer=2 must come after ivr_layer=2"),
        ({"anchor_frac": -0.1}, r"anchor_frac must be in \[0, 1\]"),
    ],
)
def test_bad_fields(kwargs, message):
    with pytest.raises(vlmopt.PassConfigError, match=message):
        HalfV(**kwargs)


@pytest.mark.parametrize(
    ("model", "config", "message"),
    [
        ("qwen", HalfV(ssr_layer=3), r"ssr_layer=3, but this model's language model has decoder layers 0..2"),
        ("qwen", HalfV(ivr_layer=2), "ssr_layer=2 must come after ivr_layer=2"),
        ("qwen", HalfV(ivr_keep=0.1, ssr_keep=0.2), "ssr_keep=0.2 keeps more than ivr_keep=0.1"),
        ("llava_clip", HalfV(ssr_keep=0.1), "ssr_keep applies where saturation is token sparsity"),
        ("llava_clip", [HalfV(), RandomPrune(keep_ratio=0.5)], r"RandomPrune \(vision stage\) comes after HalfV"),
    ],
)
def test_refused_before_tracing(request, no_tracing, model, config, message):
    passes = config if isinstance(config, list) else [config]
    with pytest.raises(vlmopt.IncompatiblePassError, match=message):
        vlmopt.compile(request.getfixturevalue(model), passes=passes)


def test_auto_layers_come_from_the_stage_analysis(family_model):
    from vlmopt.analysis.stages import analyze_calibration

    batch = padded_batch(family_model, seed=59)
    compiled = vlmopt.compile(family_model, passes=[HalfV(ivr_layer="auto", ssr_layer="auto", calibration=[batch])])
    chosen = compiled.passes[0]
    report = analyze_calibration(family_model, [batch], keep=chosen.settings(compiled.adapter)[1])
    assert (chosen.ivr_layer, chosen.ssr_layer) == (report.ivr_layer, report.ssr_layer)
    assert chosen.calibration == () and chosen.spec() == f"halfv:ivr_layer={report.ivr_layer},ssr_layer={report.ssr_layer}"
    explicit = vlmopt.compile(family_model, passes=[chosen])
    assert torch.equal(compiled(**batch).logits, explicit(**batch).logits)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ivr_layer": "auto"}, "pass calibration=.*or run `vlmopt analyze stages`"),
        ({"ssr_layer": "deep"}, "HalfV.ssr_layer must be a decoder layer .* or 'auto', got 'deep'"),
        ({"ivr_layer": "auto", "calibration": [[1, 2]]}, "HalfV.calibration takes processor outputs"),
    ],
)
def test_bad_auto_settings(kwargs, message):
    with pytest.raises(vlmopt.PassConfigError, match=message):
        HalfV(**kwargs)


def test_after_a_vision_pass(family_model):
    batch = padded_batch(family_model, seed=58)
    compiled = vlmopt.compile(family_model, passes=[RandomPrune(keep_ratio=0.5), HalfV()])
    tokens = compiled.generate(**batch, max_new_tokens=4, eos_token_id=[])
    assert tokens.shape == (2, batch["input_ids"].shape[1] + 4)
