"""A freshly initialised reference model (the architecture of :mod:`models.arch`) with its processor."""

from __future__ import annotations

import torch

from models import arch as archs
from vlmopt.reference import processing


def build_model(
    name: str, seed: int, rope_theta: float = archs.QwenArch.text_rope_theta, mrope_interleaved: bool = False,
    lm_layers: int | None = None,
):
    """(model, processor, arch) of a freshly initialised reference model (``rope_theta``, ``mrope_interleaved``,
    ``lm_layers``: a Qwen model's LM rotary base, M-RoPE layout (Qwen2.5-VL's; Qwen3-VL's is interleaved)
    and depth, None for its architecture's own: 4 for tiny-qwen25vl, 12 for tiny-qwen3vl)."""
    from transformers import (
        LlavaForConditionalGeneration,
        Qwen2_5_VLForConditionalGeneration,
        Qwen3VLForConditionalGeneration,
    )

    torch.manual_seed(seed)
    if name == "tiny-llava":
        arch = archs.LlavaArch()
        processor = processing.build_processor("llava", arch.image_size)
        model = LlavaForConditionalGeneration(archs.llava_config(arch, processor.tokenizer))
    elif name == "tiny-qwen25vl":
        arch = archs.QwenArch(
            text_rope_theta=rope_theta, text_mrope_interleaved=mrope_interleaved,
            text_layers=lm_layers or archs.QwenArch.text_layers,
        )
        processor = processing.build_processor("qwen2_5_vl", arch.image_size, arch.video_size)
        model = Qwen2_5_VLForConditionalGeneration(archs.qwen_config(arch, processor.tokenizer))
    elif name == "tiny-qwen3vl":
        if mrope_interleaved:
            raise ValueError("mrope_interleaved switches tiny-qwen25vl's M-RoPE layout; Qwen3-VL's is always interleaved")
        arch = archs.Qwen3Arch(text_rope_theta=rope_theta, text_layers=lm_layers or archs.Qwen3Arch.text_layers)
        processor = processing.build_processor("qwen3_vl", arch.image_size, arch.video_size)
        model = Qwen3VLForConditionalGeneration(archs.qwen3_config(arch, processor.tokenizer))
    else:
        raise KeyError(f"unknown model {name!r}; expected tiny-llava, tiny-qwen25vl or tiny-qwen3vl")
    eos = processor.tokenizer.eos_token_id
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.bos_token_id = processor.tokenizer.bos_token_id
    model.generation_config.do_sample = False
    model.generation_config.max_new_tokens = 3
    return model, processor, arch
