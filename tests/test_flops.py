"""FLOPs: exact against the analytic count of a Llama-style LLM, without running the model."""

import vlmopt
from vlmopt import configs
from vlmopt.adapters.llava import llava_config
from vlmopt.adapters.qwen2_5_vl import qwen25vl_config


def llm_flops(text_config, tokens: int) -> int:
    d, layers, inter = text_config.hidden_size, text_config.num_hidden_layers, text_config.intermediate_size
    heads, kv = text_config.num_attention_heads, text_config.num_key_value_heads
    head_dim = d // heads
    projections = 2 * d * (heads * head_dim) * 2 + 2 * d * (kv * head_dim) * 2  # q, o; k, v
    mlp = 3 * 2 * d * inter
    attention = 4 * heads * tokens * tokens * head_dim  # QKᵀ and PV, full square as PyTorch counts SDPA
    return layers * (tokens * (projections + mlp) + attention)


def test_llm_flops_match_the_analytic_count():
    model = configs.build(llava_config(), seed=0)
    batch = configs.synthetic_batch(model)
    seq = batch["input_ids"].shape[1]
    report = vlmopt.flops(model, batch)
    text = model.config.text_config
    assert report.llm == llm_flops(text, seq)
    assert report.by_stage["lm_head"] == 2 * text.hidden_size * text.vocab_size
    pruned = vlmopt.flops(vlmopt.compile(model, ["random_prune:keep_ratio=0.25"]), batch)
    kept = seq - 16 + 4  # a 4x4 grid keeps round(0.25 * 16) = 4 tokens
    assert pruned.llm == llm_flops(text, kept)
    assert pruned.by_stage["vision"] == report.by_stage["vision"]
    assert pruned.by_stage["projector"] * 4 == report.by_stage["projector"]


def test_meta_device_model_counts_without_memory():
    model = configs.build(qwen25vl_config(), device="meta")
    batch = configs.synthetic_batch(model)
    report = vlmopt.flops(model, batch)
    assert report.by_stage["vision"] > 0 and report.llm > 0
    real = vlmopt.flops(configs.build(qwen25vl_config()), batch)
    assert real.by_stage == report.by_stage


def test_op_formulas_come_from_the_op_files():
    """HiPrune's scoring adds its projections and the received-attention formula of its op file."""
    from vlmopt.ops import received_attention

    model = configs.build(llava_config(), seed=0)
    batch = configs.synthetic_batch(model)
    base = vlmopt.flops(model, batch)
    pruned = vlmopt.flops(vlmopt.compile(model, ["hiprune:keep_ratio=0.5,object_layer=0,deep_layer=1"]), batch)
    vision = model.config.vision_config
    images, seq, width = 1, (vision.image_size // vision.patch_size) ** 2 + 1, vision.hidden_size
    projections = 2 * 2 * images * seq * width * width  # q and k of one block
    attention = received_attention.flop_formula((images, seq, width), (images, seq, width), vision.num_attention_heads)
    assert pruned.by_stage["vision"] - base.by_stage["vision"] == 2 * (projections + attention)
