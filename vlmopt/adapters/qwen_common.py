"""What the Qwen VL families share (Qwen2.5-VL, Qwen3-VL): the vision blocks' Q/K with their 2-D
rotary, the export stand-in of a vision block, and the adapter's planning (M-RoPE positions from the
model's own ``get_rope_index``, 2×2-merged grids, frames, export, random inputs). Streams:
:mod:`vlmopt.adapters.qwen_stream`.
"""

from __future__ import annotations

import operator
from abc import abstractmethod
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from vlmopt.adapters.base import Adapter, Prompt, VisionQK
from vlmopt.errors import InputError
from vlmopt.graph.layout import VisualLayout


def token_types_of(config, input_ids: Tensor) -> Tensor:
    """``mm_token_type_ids`` [B, S] of ``input_ids``: 0 text, 1 image, 2 video placeholder."""
    types = torch.zeros_like(input_ids, dtype=torch.int)
    types[input_ids == config.image_token_id] = 1
    types[input_ids == config.video_token_id] = 2
    return types


def qwen_vision_qk(qkv: Tensor, cos: Tensor, sin: Tensor, num_heads: int) -> tuple[Tensor, Tensor]:
    """(q, k), each [P, heads, head_dim], of a Qwen vision block from its fused projection ``qkv``
    [P, 3·D], with the 2-D rotary applied as the block applies it (Qwen2.5-VL and Qwen3-VL alike)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    q, k, _ = qkv.reshape(qkv.shape[0], 3, num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    return apply_rotary_pos_emb_vision(q, k, cos, sin)


class QwenVisionBlockForExport(nn.Module):
    """A Qwen vision block (Qwen2.5-VL's, Qwen3-VL's) with its attention segments fixed: one masked SDPA
    call instead of one call per ``cu_seqlens`` segment (which ``torch.export`` cannot trace).

    hidden [S, D] → [S, D]; ``position_embeddings`` (cos, sin) [S, Dh]; the ``cu_seqlens`` argument
    of the original call is ignored (its value is baked into ``segments`` [S]).
    """

    def __init__(self, block: nn.Module, cu_seqlens: Tensor) -> None:
        from vlmopt.export.leaves import segment_ids

        super().__init__()
        self.block = block
        self.register_buffer("segments", segment_ids(cu_seqlens), persistent=False)

    def forward(self, hidden: Tensor, cu_seqlens: Any = None, position_embeddings=None, **kwargs) -> Tensor:
        block, attn = self.block, self.block.attn
        seq = hidden.shape[0]
        normed = block.norm1(hidden)
        qkv = attn.qkv(normed)
        q, k = qwen_vision_qk(qkv, *position_embeddings, attn.num_heads)
        v = qkv.reshape(seq, 3, attn.num_heads, -1)[:, 2]
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, H, S, Dh]
        mask = (self.segments[:, None] == self.segments[None, :])[None, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
        out = attn.proj(out.transpose(1, 2).reshape(seq, -1))
        hidden = hidden + out
        return hidden + block.mlp(block.norm2(hidden))

    @classmethod
    def for_node(cls, module: nn.Module, node: fx.Node, constants: dict[str, Any]) -> QwenVisionBlockForExport:
        source = node.kwargs.get("cu_seqlens")
        if not isinstance(source, fx.Node) or source.op != "placeholder" or source.target not in constants:
            raise ValueError(f"{node.name}: cu_seqlens must be a planned input bound to a constant for export")
        return cls(module, constants[source.target])


class QwenVLAdapter(Adapter):
    """What the Qwen VL adapters share: M-RoPE planning from the model's own ``get_rope_index``, the
    2×2-merged visual grids, frames, streams, export and random inputs. A family adds its pipeline,
    its tower's planned inputs (:meth:`tower_inputs`) and its tower order (:meth:`tower_order`)."""

    position_dims = (1, 2)
    batch_keys = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts", "mm_token_type_ids")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.vision_config = model.config.vision_config
        self.merge_size = self.vision_config.spatial_merge_size

    @property
    def text_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def frames_per_patch(self) -> int:
        return self.vision_config.temporal_patch_size

    @property
    def visual(self) -> nn.Module:
        return self.model.model.visual

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
        attention = self.visual.blocks[block].attn
        prefix = f"blocks.{block}"
        normed = chain.module(f"{prefix}.norm1", source, role=role, stage="vision", name=f"vision_{block}_norm")
        qkv = chain.module(f"{prefix}.attn.qkv", normed, role=role, stage="vision", name=f"vision_{block}_qkv")
        qk = chain(qwen_vision_qk, qkv, cos, sin, attention.num_heads, role=role, stage="vision", name=f"vision_{block}_qk")
        q = chain(operator.getitem, qk, 0, role=role, stage="vision", name=f"vision_{block}_q")
        k = chain(operator.getitem, qk, 1, role=role, stage="vision", name=f"vision_{block}_k")
        return VisionQK(
            q, k, attention.num_heads, attention.scaling, leading=0, merge=self.visual.spatial_merge_unit,
            frames=editor.placeholder("layout"), order=self.tower_order(editor),
        )

    def tower_order(self, editor) -> fx.Node | None:
        """The index [T] from the tower's token order to the visual tokens' (None: the same order)."""
        return None

    @abstractmethod
    def tower_inputs(self, pixel_values: Tensor, grid_thw: Tensor) -> dict[str, Tensor]:
        """The vision tower's planned inputs for patches ``pixel_values`` of the items ``grid_thw``."""

    def rope_extras(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Processor outputs beyond the ids, grids and mask that the model's ``get_rope_index`` reads; none by default."""
        return {}

    def token_types(self, input_ids: Tensor, given: Tensor | None) -> Tensor:
        """``mm_token_type_ids`` (0 text, 1 image, 2 video); derived from the ids when not given."""
        return given if given is not None else token_types_of(self.model.config, input_ids)

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
        pixels = torch.cat(pixel_parts).type(self.visual.dtype)
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
                attention_mask=attention_mask,
                **self.rope_extras(batch),
            )
            return position_ids
        if for_generation:
            text = self.generation_positions(attention_mask)
        else:
            text = torch.arange(seq_len, device=input_ids.device).expand(size, seq_len)
        return text.unsqueeze(0).expand(3, size, seq_len)

    # ----- streams, export, viz ------------------------------------------------------------------
    def stream_planner(self, compiled, processor):
        from vlmopt.adapters.qwen_stream import QwenStreamPlanner

        return QwenStreamPlanner(compiled, processor)

    def export_image_size(self, processor: Any, requested: int | None) -> int:
        from vlmopt.export.errors import ExportError

        unit = self.vision_config.patch_size * self.merge_size
        if requested is not None:
            size = requested
        else:
            image_processor = getattr(processor, "image_processor", None)
            settings = getattr(image_processor, "size", None)
            max_pixels = getattr(image_processor, "max_pixels", None) or getattr(settings, "longest_edge", None)
            # the processor keeps images up to max_pixels: the largest square is the export's size
            size = int(max_pixels**0.5) // unit * unit if max_pixels else 224 // unit * unit
        if size % unit:
            raise ExportError(f"{type(self.model).__name__} images must be a multiple of {unit} px; image_size={size} is not")
        return size

    def export_image_grid(self, image_size: int) -> tuple[int, int]:
        side = image_size // self.vision_config.patch_size
        return side, side

    def export_leaves(self):
        return {type(self.visual.blocks[0]).__name__: QwenVisionBlockForExport.for_node}

    def prompt_text(self, question: str) -> str:
        return f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"

    def pixel_frames(self, batch: dict[str, Any]) -> list[np.ndarray]:
        """The normalised images [H, W, 3] of a batch's ``pixel_values`` (first frame of each; ``vlmopt viz``)."""
        vision = self.vision_config
        patch, merge, temporal = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        pixels = batch["pixel_values"].float().numpy()
        frames, offset = [], 0
        for t, h, w in batch["image_grid_thw"].tolist():
            count = t * h * w
            block = pixels[offset : offset + count].reshape(t, h // merge, w // merge, merge, merge, 3, temporal, patch, patch)
            # (t, h/m, w/m, m, m, C, T, p, p) → (t, T, h/m, m, p, w/m, m, p, C): undo the processor's flattening
            image = block.transpose(0, 6, 1, 3, 7, 2, 4, 8, 5).reshape(t * temporal, h * patch, w * patch, 3)
            frames.append(image[0])
            offset += count
        return frames

    # ----- random inputs ---------------------------------------------------------------------------
    @classmethod
    def synthetic_visual(cls, config, kind, grid, generator):
        vision = config.vision_config
        patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        merge = vision.spatial_merge_size**2
        if kind == "image":
            h, w = grid or (8, 8)
            t, token, key = 1, config.image_token_id, "image"
        else:
            frames, h, w = grid
            t, token, key = frames // vision.temporal_patch_size, config.video_token_id, "video"
        pixels = torch.Size((t * h * w, patch))
        ids = cls.visual_ids(config, token, t, h * w // merge, generator)
        pixel_key = "pixel_values" if kind == "image" else "pixel_values_videos"
        return ids, {pixel_key: pixels, f"{key}_grid_thw": torch.tensor([[t, h, w]])}

    @classmethod
    def visual_ids(cls, config, token: int, temporal: int, per_frame: int, generator: torch.Generator) -> list[int]:
        """Prompt ids of one visual input: ``<vision_start>`` + its tokens + ``<vision_end>``."""
        return [config.vision_start_token_id] + [token] * (temporal * per_frame) + [config.vision_end_token_id]

    @classmethod
    def synthetic_extras(cls, config, batch):
        return {"mm_token_type_ids": token_types_of(config, batch["input_ids"])}
