"""Qwen3-VL (``Qwen3VLForConditionalGeneration``, ``Qwen3VLMoeForConditionalGeneration``): ViT with a
learned, interpolated position table → 2×2 merger → Qwen3 LM (q/k norms, interleaved M-RoPE),
with DeepStack.

Pipeline (prefill): patch embed + the position table resampled to each image's grid (bilinear taps
planned outside the graph) → 2-D vision rotary → vision blocks (full attention per image or frame,
no windows) → the DeepStack mergers after blocks ``deepstack_visual_indexes`` → merger → flat visual
tokens [T, D·(1 + k)]: the merged token, then its k DeepStack features → token embedding →
``vlmopt::merge_visual`` (the first D channels) → LLM, where after decoder layer ``i < k`` the i-th
DeepStack features are added at the visual slots.

DeepStack features ride along with their token: every vision-side pass selects, pools or gathers the
[T, D·(1 + k)] rows, so a kept token keeps its own features; before the merge each part is scattered
to [B, S, D] at the tokens' slots (zeros elsewhere: ``hidden + 0`` is exact), a sequence value that
every cut inside the LLM gathers like the hidden states. Adding them equals HF's masked add bit for bit.

Planned outside the graph, with HF's own helpers: the vision rotary ids, the position table's taps
and weights, ``cu_seqlens`` per image or frame, and the 3-D M-RoPE ids from ``get_rope_index``
(Qwen3-VL gives every temporal patch of a video its own ``<t seconds><|vision_start|>…<|vision_end|>``
block: the timestamps are text, which no pass removes). Qwen3-VL's ``get_rope_index`` places images
as Qwen2.5-VL's does, so the numpy planner of an export serves both.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from vlmopt.adapters.base import NamedConfig, TextPipeline, register
from vlmopt.adapters.layer_view import DecoderLayerView
from vlmopt.adapters.llava import reference_processor
from vlmopt.adapters.qwen2_5_vl import RANDOM_MODEL_TASKS, Qwen25VLAdapter, special_token_ids
from vlmopt.adapters.qwen_common import QwenVLAdapter
from vlmopt.adapters.qwen_stream import QwenStreamPlanner
from vlmopt.graph import functions as gf
from vlmopt.graph.capture import mark, role


def qwen3vl_config(
    vision_depth: int = 4,
    vision_hidden: int = 32,
    vision_heads: int = 4,
    deepstack_blocks: tuple[int, ...] = (0, 2),
    text_hidden: int = 64,
    text_layers: int = 3,
    text_heads: int = 4,
    kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate: int | None = None,
    vision_intermediate: int | None = None,
    vocab_size: int = 256,
    patch_size: int = 14,
    position_grid: int = 16,
    moe: bool = False,
):
    """A Qwen3-VL config (``moe``: Qwen3-VL-MoE, 4 experts, 2 per token); the interleaved M-RoPE
    sections follow the head dim like the real model's (:func:`interleaved_section`)."""
    from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

    head_dim = head_dim or text_hidden // text_heads
    text = dict(
        hidden_size=text_hidden, intermediate_size=intermediate or text_hidden * 2, num_hidden_layers=text_layers,
        num_attention_heads=text_heads, num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=vocab_size,
        max_position_embeddings=32768, bos_token_id=None, eos_token_id=2, pad_token_id=0,
        rope_parameters={"rope_type": "default", "mrope_section": interleaved_section(head_dim), "mrope_interleaved": True,
                         "rope_theta": 5000000.0},
    )
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=intermediate or text_hidden, decoder_sparse_step=1)
    vision = dict(
        depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_intermediate or vision_hidden * 2,
        num_heads=vision_heads, out_hidden_size=text_hidden, patch_size=patch_size, spatial_merge_size=2,
        temporal_patch_size=2, num_position_embeddings=position_grid**2, deepstack_visual_indexes=list(deepstack_blocks),
    )
    cls = Qwen3VLMoeConfig if moe else Qwen3VLConfig
    ids = special_token_ids()
    return cls(vision_config=vision, text_config=text, **{k: v for k, v in ids.items() if k.startswith(("image", "video", "vision"))})


def interleaved_section(head_dim: int) -> list[int]:
    """Qwen3-VL's (temporal, height, width) counts of ``head_dim / 2`` rotary pairs (24/20/20 of 64),
    dealt to the axes in turn (interleaved M-RoPE)."""
    half = head_dim // 2
    temporal, height = round(half * 24 / 64), round(half * 20 / 64)
    return [temporal, height, half - temporal - height]


def qwen3vl_8b_shape(width: float = 1.0):
    """Qwen3-VL-8B's shape: 27-block ViT (16 px patches, DeepStack after blocks 8/16/24) + 36-layer
    Qwen3 LM (32 heads, 8 KV heads, head dim 128)."""
    from vlmopt.configs import scaled

    heads = 32
    return qwen3vl_config(
        vision_depth=27,
        vision_hidden=scaled(1152, width, 64),
        vision_heads=16,
        deepstack_blocks=(8, 16, 24),
        text_hidden=scaled(4096, width, heads * 2),
        text_layers=36,
        text_heads=heads,
        kv_heads=8,
        head_dim=max(2, scaled(128, width, 2)),
        intermediate=scaled(12288, width, 32),
        vision_intermediate=scaled(4304, width, 4),
        vocab_size=151936,
        patch_size=16,
        position_grid=48,
    )


class Qwen3VLPrefill(TextPipeline):
    """Prefill with images and/or videos, calling the HF Qwen3-VL submodules as leaves."""

    def __init__(self, model: nn.Module, view: DecoderLayerView) -> None:
        inner = model.model
        super().__init__(inner.language_model, model.lm_head, (1, 2), view)
        visual = inner.visual
        self.patch_embed = visual.patch_embed
        self.pos_embed = visual.pos_embed
        self.vision_rotary = visual.rotary_pos_emb
        self.blocks = visual.blocks
        self.merger = visual.merger
        self.deepstack_mergers = visual.deepstack_merger_list
        self.deepstack_blocks = tuple(visual.deepstack_visual_indexes)

    def forward(
        self,
        input_ids,
        pixel_values,
        attention_mask,
        position_ids,
        visual_positions,
        layout,
        vision_position_ids,
        position_taps,
        position_weights,
        cu_seqlens,
        cache,
        logits_to_keep,
    ):
        self.mark_text_inputs(input_ids, attention_mask, position_ids)
        with role("vision_embed"):
            hidden = self.patch_embed(pixel_values)
            table = (self.pos_embed(position_taps) * position_weights[:, :, None]).sum(1)
            hidden = hidden + table.to(hidden.dtype)
        with role("vision_rope"):
            rope = self.vision_rotary(hidden, vision_position_ids)
            cos, sin = rope[0], rope[1]
        deepstack = []
        for index, block in enumerate(self.blocks):
            with role("vision_block", index):
                hidden = block(hidden, cu_seqlens=cu_seqlens, position_embeddings=(cos, sin))
            if index in self.deepstack_blocks:
                with role("deepstack_merger", self.deepstack_blocks.index(index)):
                    deepstack.append(self.deepstack_mergers[self.deepstack_blocks.index(index)](hidden))
        with role("merger"):
            merged = self.merger(hidden)
        with role("visual_tokens"):
            tokens = torch.cat([merged, *deepstack], dim=-1) if deepstack else merged
        with role("embed"):
            embeds = self.embed_tokens(input_ids)
        injected = []
        for part in range(len(deepstack)):
            with role("deepstack_scatter", part):
                injected.append(mark(gf.visual_features_at(embeds, tokens, visual_positions, part + 1), seq_dim=(0, 1)))
        with role("merge"):
            embeds = mark(torch.ops.vlmopt.merge_visual(embeds, tokens, visual_positions), seq_dim=(0, 1))
        return self.llm(embeds, attention_mask, position_ids, cache, logits_to_keep, injected)


@register
class Qwen3VLAdapter(QwenVLAdapter):
    family = "qwen3_vl"
    model_classes = {"qwen3_vl": "Qwen3VLForConditionalGeneration", "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration"}
    capabilities = frozenset({"vision_qk", "grids", "video", "mrope", "stream", "frames", "export", "deepstack"})
    paper_settings = {
        # No paper covers Qwen3-VL: the Qwen2.5-VL settings of each method's official code, its predecessor's.
        name: settings for name, settings in Qwen25VLAdapter.paper_settings.items()
    }
    decoder_view = DecoderLayerView(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm")
    configs = {
        "tiny-qwen3vl-random": NamedConfig(
            qwen3vl_config, description="Qwen3-VL, 4-block ViT, DeepStack after blocks 0 and 2, 3-layer LM",
            processor=partial(reference_processor, "qwen3_vl"), tasks=RANDOM_MODEL_TASKS,
        ),
        "tiny-qwen3vl-moe-random": NamedConfig(
            lambda: qwen3vl_config(moe=True), description="Qwen3-VL-MoE (4 experts, 2 per token)",
            processor=partial(reference_processor, "qwen3_vl"), tasks=RANDOM_MODEL_TASKS,
        ),
        "qwen3-vl-8b-shape": NamedConfig(qwen3vl_8b_shape, image_grid=(64, 64), description="Qwen3-VL-8B's depths, heads and tokens", processor=partial(reference_processor, "qwen3_vl")),
    }
    host_inputs = ("cu_seqlens",)
    vllm_classes = {
        "Qwen3VLForConditionalGeneration": "vlmopt.adapters.qwen_vllm:Qwen3VL",
        "Qwen3VLMoeForConditionalGeneration": "vlmopt.adapters.qwen_vllm:Qwen3VLMoe",
    }

    @classmethod
    def vllm_prompt(cls, text: str, video: bool) -> str:
        # vLLM's Qwen3-VL processor writes a clip's per-patch blocks, each in its own markers, in place
        # of a bare <|video_pad|>: the outer pair goes
        return text.replace("<|vision_start|><|video_pad|><|vision_end|>", "<|video_pad|>") if video else text

    def prefill_pipeline(self) -> nn.Module:
        return Qwen3VLPrefill(self.model, self.decoder_view)

    @property
    def deepstack_parts(self) -> int:
        """DeepStack features each visual token carries after its merged embedding."""
        return len(self.vision_config.deepstack_visual_indexes)

    def tower_inputs(self, pixel_values: Tensor, grid_thw: Tensor) -> dict[str, Any]:
        from transformers.vision_utils import (
            get_vision_attention_seqlens,
            get_vision_interpolation_indices_and_weights,
            get_vision_position_ids,
        )

        visual = self.visual
        taps, weights = get_vision_interpolation_indices_and_weights(
            grid_thw, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners, spatial_merge_size=self.merge_size,
        )
        cu_seqlens, _ = get_vision_attention_seqlens(grid_thw, self.vision_config)
        return {
            "pixel_values": pixel_values,
            "vision_position_ids": get_vision_position_ids(grid_thw, self.merge_size),
            "position_taps": taps,
            "position_weights": weights,
            "cu_seqlens": cu_seqlens,
        }

    def stream_planner(self, compiled, processor):
        return Qwen3StreamPlanner(compiled, processor)

    @classmethod
    def visual_ids(cls, config, token: int, temporal: int, per_frame: int, generator: torch.Generator) -> list[int]:
        """A video is one ``<t seconds><vision_start>…<vision_end>`` block per temporal patch (the
        timestamp as two random text tokens); an image one block."""
        from vlmopt.configs import random_text_ids

        if token != config.video_token_id:
            return super().visual_ids(config, token, temporal, per_frame, generator)
        ids = []
        for _ in range(temporal):
            ids += random_text_ids(config, 2, generator) + super().visual_ids(config, token, 1, per_frame, generator)
        return ids


class Qwen3StreamPlanner(QwenStreamPlanner):
    """Chunk inputs and positions of a Qwen3-VL stream: each temporal patch is written as the one-shot
    prompt writes it, ``<{t:.1f} seconds><|vision_start|>…<|vision_end|>`` (the time in seconds of its
    frames), after ``[system turn] <|im_start|>user\\n``; a question is
    ``{question}<|im_end|>\\n<|im_start|>assistant\\n``. Positions are the model's own
    ``get_rope_index`` of the chunk, counted on from the text before it (Qwen3-VL's time axis advances
    with the timestamps' text, not with a time interval)."""

    def reset(self, start: int) -> None:
        super().reset(start)
        self.next = start

    def prefix_ids(self, system_prompt: str) -> Tensor:
        system = f"<|im_start|>system\n{system_prompt}<|im_end|>\n" if system_prompt else ""
        return self.text(system + "<|im_start|>user\n")

    def question_ids(self, question: str) -> Tensor:
        return self.text(f"{question}<|im_end|>\n<|im_start|>assistant\n")

    def text_start(self) -> int:
        return self.next

    def chunk(self, frames, cache_length: int, timestamps: list[float] | None, patches: list[int]):
        video = self.video(frames)
        t, h, w = (int(v) for v in video["video_grid_thw"][0])
        per_patch = h * w // self.merge**2
        if timestamps is not None:  # a patch's time: the mean of its first and last frame's
            step = self.frame_multiple
            seconds = [(timestamps[i] + timestamps[i + step - 1]) / 2 for i in range(0, len(timestamps), step)]
        else:
            seconds = [(patch * self.frame_multiple + (self.frame_multiple - 1) / 2) / self.video_cfg["fps"] for patch in patches]
        config = self.compiled.config
        pieces = []
        for second in seconds:
            pieces += [self.text(f"<{second:.1f} seconds>"), torch.tensor([[config.vision_start_token_id]]),
                       torch.full((1, per_patch), config.video_token_id), torch.tensor([[config.vision_end_token_id]])]
        ids = torch.cat(pieces, dim=1)
        types = (ids == config.video_token_id).int() * 2
        positions, _ = self.compiled.adapter.model.model.get_rope_index(ids, mm_token_type_ids=types, video_grid_thw=video["video_grid_thw"])
        positions = positions + self.next  # [3, 1, n]
        batch = {"input_ids": ids, "pixel_values_videos": video["pixel_values_videos"], "video_grid_thw": video["video_grid_thw"],
                 "position_ids": positions, "mm_token_type_ids": types}
        prompt = self.compiled.plan(batch)
        inputs = dict(prompt.inputs, attention_mask=torch.ones(1, cache_length + ids.shape[1], dtype=torch.long))
        self.frame_size, self.grid = frames.shape[1:3], (h // self.merge, w // self.merge)
        self.patches = patches[-1] + 1
        self.next = int(positions.max()) + 1
        return inputs, positions[:, 0]

    def after_reindex(self, positions: Tensor) -> None:
        self.next = int(positions.max()) + 1
