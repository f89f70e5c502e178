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

import operator
from typing import Any

import torch
from torch import Tensor, nn

from vlmopt.adapters.base import Adapter, Prompt, TextPipeline, VisionQK
from vlmopt.errors import InputError
from vlmopt.graph import functions as gf
from vlmopt.graph.capture import mark, role
from vlmopt.graph.layout import VisualLayout


class Qwen25VLPrefill(TextPipeline):
    """Prefill with images and/or videos, calling the HF Qwen2.5-VL submodules as leaves."""

    def __init__(self, model: nn.Module) -> None:
        inner = model.model
        super().__init__(inner.language_model, model.lm_head, position_dims=(1, 2))
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
            hidden = gf.window_permute(hidden, window_index, self.merge_unit)
        with role("vision_rope"):
            rope = self.vision_rotary(hidden, vision_position_ids)
            cos = gf.window_permute(rope[0], window_index, self.merge_unit)
            sin = gf.window_permute(rope[1], window_index, self.merge_unit)
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


class Qwen25VLAdapter(Adapter):
    family = "qwen2_5_vl"
    model_class_name = "Qwen2_5_VLForConditionalGeneration"
    position_dims = (1, 2)
    host_inputs = ("cu_seqlens", "cu_window_seqlens")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.vision_config = model.config.vision_config
        self.merge_size = self.vision_config.spatial_merge_size

    @property
    def text_model(self) -> nn.Module:
        return self.model.model.language_model

    def prefill_pipeline(self) -> nn.Module:
        return Qwen25VLPrefill(self.model)

    @property
    def vision_depth(self) -> int:
        return self.vision_config.depth

    @property
    def feature_block(self) -> int:
        return self.vision_config.depth - 1

    def insert_vision_qk(self, editor, block: int, role: str = "attention_score") -> VisionQK:
        if not 0 <= block < self.vision_depth:
            raise ValueError(f"the vision tower has blocks 0..{self.vision_depth - 1}, not {block}")
        node = editor.one("vision_block", block)
        source = editor.input_of(node, "hidden_states")
        cos, sin = editor.input_of(node, "position_embeddings")
        order = editor.order()
        chain = editor.chain(max((source, cos, sin), key=order.__getitem__))
        attention = self.model.model.visual.blocks[block].attn
        prefix = f"blocks.{block}"
        normed = chain.module(f"{prefix}.norm1", source, role=role, stage="vision", name=f"vision_{block}_norm")
        qkv = chain.module(f"{prefix}.attn.qkv", normed, role=role, stage="vision", name=f"vision_{block}_qkv")
        qk = chain(gf.qwen_vision_qk, qkv, cos, sin, attention.num_heads, role=role, stage="vision", name=f"vision_{block}_qk")
        q = chain(operator.getitem, qk, 0, role=role, stage="vision", name=f"vision_{block}_q")
        k = chain(operator.getitem, qk, 1, role=role, stage="vision", name=f"vision_{block}_k")
        merge = self.model.model.visual.spatial_merge_unit
        return VisionQK(
            q, k, attention.num_heads, attention.scaling, leading=0, merge=merge, frames=editor.placeholder("layout"),
            order=editor.placeholder("reverse_index"),
        )

    def token_types(self, input_ids: Tensor, given: Tensor | None) -> Tensor:
        """``mm_token_type_ids`` (0 text, 1 image, 2 video); derived from the ids when not given."""
        if given is not None:
            return given
        config = self.model.config
        types = torch.zeros_like(input_ids, dtype=torch.int)
        types[input_ids == config.image_token_id] = 1
        types[input_ids == config.video_token_id] = 2
        return types

    def plan(self, batch: dict[str, Any], for_generation: bool) -> Prompt:
        config = self.model.config
        input_ids: Tensor = batch["input_ids"]
        size, seq_len = input_ids.shape
        attention_mask = self.attention_mask_of(input_ids, batch.get("attention_mask"))
        image_grid, video_grid = batch.get("image_grid_thw"), batch.get("video_grid_thw")
        pixel_parts, grid_parts, slot_parts = [], [], []
        for pixels, grid, token_id, name in (
            (batch.get("pixel_values"), image_grid, config.image_token_id, "image"),
            (batch.get("pixel_values_videos"), video_grid, config.video_token_id, "video"),
        ):
            slots = self.slots_of(input_ids == token_id)
            if pixels is None:
                if slots.numel():
                    raise InputError(f"the prompt has {slots.numel()} {name} tokens but no {name} pixels")
                continue
            if grid is None:
                raise InputError(f"{name} pixels were given without their {name}_grid_thw")
            expected = int((grid.prod(-1) // self.merge_size**2).sum())
            if slots.numel() != expected:
                raise InputError(
                    f"the prompt has {slots.numel()} {name} tokens but the {name} grids give {expected} "
                    "features; build inputs with the model's processor"
                )
            pixel_parts.append(pixels)
            grid_parts.append(grid)
            slot_parts.append(slots)
        position_ids = batch.get("position_ids")
        if position_ids is None:
            position_ids = self.positions(batch, input_ids, attention_mask, for_generation, bool(grid_parts))
        elif position_ids.dim() == 3 and position_ids.shape[0] == 4:
            position_ids = position_ids[1:]
        next_position = position_ids[..., -1:] + 1
        if not grid_parts:
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
            return Prompt("prefill_text", inputs, next_position)

        grid_thw = torch.cat(grid_parts)
        pixels = torch.cat(pixel_parts).type(self.model.model.visual.dtype)
        merged_grids = tuple((t, h // self.merge_size, w // self.merge_size) for t, h, w in grid_thw.tolist())
        slots = torch.cat(slot_parts)
        counts = [t * h * w for t, h, w in merged_grids]
        starts = [sum(counts[:i]) for i in range(len(counts))]
        rows = tuple(int(slots[start]) // seq_len for start in starts)
        layout = VisualLayout.from_grids(size, seq_len, rows, merged_grids)
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "visual_positions": slots,
            "layout": layout,
        }
        inputs.update(self.tower_inputs(pixels, grid_thw))
        return Prompt("prefill", inputs, next_position, layout, {"grid_thw": grid_thw})

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
        cu_seqlens, _ = get_vision_attention_seqlens(grid_thw, self.vision_config)
        return {
            "pixel_values": pixel_values,
            "vision_position_ids": get_vision_position_ids(grid_thw, self.merge_size),
            "cu_seqlens": cu_seqlens,
            "cu_window_seqlens": cu_window_seqlens,
            "window_index": window_index,
            "reverse_index": torch.argsort(window_index),
        }

    def frame_tokens(self, prompt: Prompt) -> list[int]:
        return [h * w // self.merge_size**2 for t, h, w in prompt.extras["grid_thw"].tolist() for _ in range(t)]

    def frame_inputs(self, prompt: Prompt, first: int, stop: int) -> dict[str, Any]:
        """Each item (an image, or a video of ``t`` temporal patches) keeps its frames in the range
        as an item of grid ``(frames, h, w)``; patch rows are frame-major, so the range is one slice."""
        grids, rows, item_frame, item_row = [], [], 0, 0
        for t, h, w in prompt.extras["grid_thw"].tolist():
            lo, hi = max(first, item_frame), min(stop, item_frame + t)
            if lo < hi:
                grids.append((hi - lo, h, w))
                rows += [item_row + (lo - item_frame) * h * w, item_row + (hi - item_frame) * h * w]
            item_frame, item_row = item_frame + t, item_row + t * h * w
        if not grids:
            raise InputError(f"frames {first}..{stop - 1} are outside this prompt's {item_frame} frames")
        pixels = prompt.inputs["pixel_values"][rows[0] : rows[-1]]
        return self.tower_inputs(pixels, torch.tensor(grids, dtype=prompt.extras["grid_thw"].dtype))

    def positions(self, batch, input_ids, attention_mask, for_generation: bool, has_visual: bool) -> Tensor:
        """M-RoPE ids [3, B, S] exactly as HF's ``forward`` / ``generate`` compute them."""
        size, seq_len = input_ids.shape
        if has_visual:
            position_ids, _ = self.model.model.get_rope_index(
                input_ids,
                mm_token_type_ids=self.token_types(input_ids, batch.get("mm_token_type_ids")),
                image_grid_thw=batch.get("image_grid_thw"),
                video_grid_thw=batch.get("video_grid_thw"),
                second_per_grid_ts=batch.get("second_per_grid_ts"),
                attention_mask=attention_mask,
            )
            return position_ids
        if for_generation:
            text = self.generation_positions(attention_mask)
        else:
            text = torch.arange(seq_len, device=input_ids.device).expand(size, seq_len)
        return text.unsqueeze(0).expand(3, size, seq_len)
