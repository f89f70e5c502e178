"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): windowed ViT → 2×2 merger → Qwen2 LM, M-RoPE.

Pipeline (prefill): patch embed → window permutation → vision rotary → vision blocks (windowed,
full attention at ``fullatt_block_indexes``) → merger → back to raster order → flat visual tokens
[T, D] → token embedding → ``vlmopt::merge_visual`` → LLM.

Everything data-dependent is planned outside the graph, with the same HF helpers the tower calls
(``transformers.vision_utils``): the vision rotary ids, ``cu_seqlens`` per image/frame, the window
index and window ``cu_seqlens``, and the 3-D M-RoPE position ids from ``get_rope_index``. Images and
videos of one batch run through the tower in one call (images first), each its own attention
segment, exactly as separate calls would.

Visual tokens: one image or video is a ``(t, h/2, w/2)`` grid of merged tokens in raster order.
Positions are M-RoPE ids [3, B, S]; decoding continues at the last prompt position + 1 per axis.

"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor, fx, nn

from vlmopt.adapters.base import NamedConfig, TextPipeline, register
from vlmopt.adapters.llava import reference_processor
from vlmopt.adapters.qwen_common import QwenVLAdapter
from vlmopt.graph.capture import mark, role

IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END, PAD_TOKEN = 5, 6, 3, 4, 0
"""Token ids of the random-weight configs: those of the word-level tokenizer built for them (vlmopt.reference.processing)."""


#: The reference tasks a random-weight Qwen model is evaluated on: 112 px images and frames.
RANDOM_MODEL_TASKS = {"shapes": {"size": 112, "grid": 28}, "shapes-video": {}, "needle": {}}


def qwen25vl_config(
    vision_depth: int = 4,
    vision_hidden: int = 32,
    vision_heads: int = 4,
    full_attention_blocks: tuple[int, ...] = (1, 3),
    text_hidden: int = 64,
    text_layers: int = 3,
    text_heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    vision_intermediate: int | None = None,
    vocab_size: int = 256,
    window_size: int = 56,
):
    """A Qwen2.5-VL config; ``mrope_section`` follows the head dim like the real model's (16/24/24 of 64)."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        vision_config=dict(
            depth=vision_depth,
            hidden_size=vision_hidden,
            intermediate_size=vision_intermediate or vision_hidden * 2,
            num_heads=vision_heads,
            out_hidden_size=text_hidden,
            fullatt_block_indexes=list(full_attention_blocks),
            window_size=window_size,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        text_config=dict(
            hidden_size=text_hidden,
            intermediate_size=intermediate or text_hidden * 2,
            num_hidden_layers=text_layers,
            num_attention_heads=text_heads,
            num_key_value_heads=kv_heads,
            vocab_size=vocab_size,
            max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "mrope_section": mrope_section(text_hidden // text_heads), "rope_theta": 1000000.0},
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=PAD_TOKEN,
        ),
        **special_token_ids(),
    )


def mrope_section(head_dim: int) -> list[int]:
    """Qwen's (temporal, height, width) split of ``head_dim / 2`` rotary pairs (16/24/24 of 64)."""
    half = head_dim // 2
    section = [half // 4, (half - half // 4) // 2]
    return section + [half - sum(section)]


def special_token_ids() -> dict[str, int]:
    """Token ids of the random-weight Qwen configs' placeholders."""
    return dict(
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END, bos_token_id=1, eos_token_id=2, pad_token_id=PAD_TOKEN,
    )


def qwen25vl_7b_shape(width: float = 1.0):
    """Qwen2.5-VL-7B's shape: 32-block windowed ViT (full attention at 7/15/23/31) + 28-layer LM."""
    from vlmopt.configs import scaled

    return qwen25vl_config(
        vision_depth=32,
        vision_hidden=scaled(1280, width, 64),  # vision head dim stays a multiple of 4 (2-D rotary)
        vision_heads=16,
        full_attention_blocks=(7, 15, 23, 31),
        text_hidden=scaled(3584, width, 28 * 2),
        text_layers=28,
        text_heads=28,
        kv_heads=4,
        intermediate=scaled(18944, width, 32),
        vision_intermediate=scaled(3420, width, 4),
        vocab_size=152064,
        window_size=112,
    )


def window_permute(x: Tensor, window_index: Tensor, unit: int) -> Tensor:
    """Reorder Qwen2.5-VL patch rows into window order (groups of ``unit`` patches move together)."""
    seq = x.shape[0]
    return x.reshape(seq // unit, unit, -1)[window_index, :, :].reshape(seq, -1)


fx.wrap("window_permute")  # one graph node, as the pipeline reads it


class Qwen25VLPrefill(TextPipeline):
    """Prefill with images and/or videos, calling the HF Qwen2.5-VL submodules as leaves."""

    def __init__(self, model: nn.Module, view) -> None:
        inner = model.model
        super().__init__(inner.language_model, model.lm_head, (1, 2), view)
        visual = inner.visual
        self.patch_embed = visual.patch_embed
        self.vision_rotary = visual.rotary_pos_emb
        self.blocks = visual.blocks
        self.merger = visual.merger
        self.full_attention_blocks = frozenset(visual.fullatt_block_indexes)
        self.merge_unit = visual.spatial_merge_unit

    def forward(
        self,
        input_ids,
        pixel_values,
        attention_mask,
        position_ids,
        visual_positions,
        layout,
        vision_position_ids,
        cu_seqlens,
        cu_window_seqlens,
        window_index,
        reverse_index,
        cache,
        logits_to_keep,
    ):
        self.mark_text_inputs(input_ids, attention_mask, position_ids)
        with role("vision_embed"):
            hidden = self.patch_embed(pixel_values)
        with role("window_permute"):
            hidden = window_permute(hidden, window_index, self.merge_unit)
        with role("vision_rope"):
            rope = self.vision_rotary(hidden, vision_position_ids)
            cos = window_permute(rope[0], window_index, self.merge_unit)
            sin = window_permute(rope[1], window_index, self.merge_unit)
        for index, block in enumerate(self.blocks):
            segments = cu_seqlens if index in self.full_attention_blocks else cu_window_seqlens
            with role("vision_block", index):
                hidden = block(hidden, cu_seqlens=segments, position_embeddings=(cos, sin))
        with role("merger"):
            merged = self.merger(hidden)
        with role("visual_tokens"):
            tokens = merged[reverse_index]
        with role("embed"):
            embeds = self.embed_tokens(input_ids)
        with role("merge"):
            embeds = mark(torch.ops.vlmopt.merge_visual(embeds, tokens, visual_positions), seq_dim=(0, 1))
        return self.llm(embeds, attention_mask, position_ids, cache, logits_to_keep)


@register
class Qwen25VLAdapter(QwenVLAdapter):
    family = "qwen2_5_vl"
    model_classes = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
    capabilities = frozenset({"vision_qk", "grids", "video", "mrope", "stream", "frames", "export"})
    paper_settings = {
        # HiPrune's object layer on Qwen2.5-VL: block 16 of 32 (official scripts).
        "hiprune": {"object_layer": (16, 32)},
        # HalfV's Qwen2.5-VL-7B schedule (official code); saturation is token sparsity on Qwen LMs.
        "halfv": {"ivr_layer": (2, 28), "ssr_layer": (21, 28), "ivr_keep": 0.25, "anchor_frac": 0.2, "ssr_keep": 0.05,
                  "saturation": "sparse_tokens"},
        # HERMES's working-tier curve for Qwen2.5-VL (official code): alpha = 0.75 − 0.6p, k = 20 − 12p.
        "hermes": {"working_schedule": (0.75, -0.6, 20.0, -12.0)},
    }
    configs = {
        "tiny-qwen25vl-random": NamedConfig(
            qwen25vl_config, description="Qwen2.5-VL, 4-block windowed ViT, 3-layer LM",
            processor=partial(reference_processor, "qwen2_5_vl"), tasks=RANDOM_MODEL_TASKS,
        ),
        "qwen2.5-vl-7b-shape": NamedConfig(qwen25vl_7b_shape, image_grid=(64, 64), description="Qwen2.5-VL-7B's depths, heads and tokens", processor=partial(reference_processor, "qwen2_5_vl")),
    }
    host_inputs = ("cu_seqlens", "cu_window_seqlens")

    def prefill_pipeline(self) -> nn.Module:
        return Qwen25VLPrefill(self.model, self.decoder_view)

    def tower_order(self, editor) -> fx.Node | None:
        return editor.placeholder("reverse_index")  # the tower runs in window order

    def rope_extras(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"second_per_grid_ts": batch.get("second_per_grid_ts")}  # a video's time axis

    def tower_inputs(self, pixel_values: Tensor, grid_thw: Tensor) -> dict[str, Tensor]:
        """The vision tower's planned inputs for patches ``pixel_values`` of the items ``grid_thw``."""
        from transformers.vision_utils import (
            get_vision_attention_seqlens,
            get_vision_position_ids,
            get_vision_window_index,
        )

        window_index, cu_window_seqlens = get_vision_window_index(
            grid_thw, self.merge_size, self.vision_config.window_size, self.vision_config.patch_size
        )
        window_index = window_index.to(grid_thw.device)  # HF builds it on the CPU; HiPrune index_selects by it
        cu_seqlens, _ = get_vision_attention_seqlens(grid_thw, self.vision_config)
        return {
            "pixel_values": pixel_values,
            "vision_position_ids": get_vision_position_ids(grid_thw, self.merge_size),
            "cu_seqlens": cu_seqlens,
            "cu_window_seqlens": cu_window_seqlens,
            "window_index": window_index,
            "reverse_index": torch.argsort(window_index),
        }
