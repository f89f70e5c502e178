"""What the families whose tower reads images as tiles share (InternVL, Gemma 3, SmolVLM, and Mistral 3,
whose tiles are whole images at their own sizes), and the patch grouping of a k×k token merge.

**Tiles.** The tower reads ``pixel_values`` [N, 3, H, W]: every tile (an InternVL crop or thumbnail,
a SmolVLM row/column tile or global image, a Gemma 3 image or pan-and-scan crop, a Mistral 3 image, a
video frame) is encoded on its own and gives its LLM tokens as a ``(1, h, w)`` grid in raster order
(the same grid for every tile of a fixed-size tower). The prompt holds one placeholder token per LLM
token, tile after tile; the text around and between
them (``<img>`` / ``</img>``, ``Frame3:``, ``<row_1_col_2>``, ``<fake_token_around_image>``, …) is text,
which no pass removes. Each tile is one input of the :class:`~vlmopt.graph.layout.VisualLayout`
(scored, pruned and pooled on its own grid) and one frame for frame-parallel vision.

**Merged patches.** A k×k block of tower patches becomes one LLM token (InternVL's and SmolVLM's pixel
shuffle, Gemma 3's average pool, Mistral 3's patch merger), the block of token (i, j) being patches
rows ``k·i … k·i+k−1``, columns ``k·j … k·j+k−1``. :func:`group_merged_patches` reorders a tower's
per-patch values so each token's k² patches sit together, in token order — what HiPrune's score
reads to average the attention a token's patches receive, as it does over Qwen's 2×2 merger.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vlmopt.adapters.base import Adapter, Prompt, VisionQK
from vlmopt.errors import InputError
from vlmopt.graph.layout import VisualLayout
from vlmopt.stream.planning import StreamPlanner


def merged_patch_order(layout: VisualLayout, merge: int, leading: int, device=None) -> Tensor:
    """[P] index over the tower's rows of every frame in layout order (``leading`` rows, then the
    ``(h·merge) × (w·merge)`` patch grid in raster order): the leading rows, then each token's
    ``merge²`` patches together, tokens in raster order. ``layout.grids`` are the tokens' (t, h, w)."""
    parts, offset = [], 0
    for t, h, w in layout.grids:
        side_w = w * merge
        i, j, a, b = np.meshgrid(np.arange(h), np.arange(w), np.arange(merge), np.arange(merge), indexing="ij")
        grid = ((i * merge + a) * side_w + (j * merge + b)).reshape(-1)
        frame = np.concatenate([np.arange(leading), leading + grid])
        size = leading + h * w * merge * merge
        for _ in range(t):
            parts.append(frame + offset)
            offset += size
    return torch.from_numpy(np.concatenate(parts)).to(device=device, dtype=torch.long)


def group_merged_patches(x: Tensor, layout: VisualLayout, merge: int, leading: int) -> Tensor:
    """``x`` (queries or keys of a vision block: [..., C] whose leading dims flatten to the tower's
    rows, frame after frame) as [P, C] in :func:`merged_patch_order`."""
    flat = x.reshape(-1, x.shape[-1])
    return flat.index_select(0, merged_patch_order(layout, merge, leading, flat.device))


class TiledAdapter(Adapter):
    """Planning of a family whose tower reads fixed-size tiles (see the module docstring). A family
    gives its tile grid (:attr:`tile_grid`), its tiles from a batch (:meth:`tile_pixels`) and any
    planned inputs of its own (:meth:`extra_inputs`); positions are 1-D RoPE ids [B, S] as HF makes them."""

    position_dims = (0, 1)

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def vision_depth(self) -> int:
        return self.model.config.vision_config.num_hidden_layers

    def insert_merged_patch_qk(
        self, editor, block: int, role: str, attention: nn.Module, *, norm: str, projections: str,
        head_norms: bool = False, leading: int = 0,
    ) -> VisionQK:
        """Queries and keys of vision block ``block`` for HiPrune: the block's input through its
        pre-attention norm (``vision_layers.{block}.{norm}``) and the ``{projections}.q_proj`` /
        ``k_proj`` modules (each then through ``{projections}.{q,k}_norm`` when ``head_norms``), rows
        grouped by the LLM token each patch merges into ([tiles, merged tokens, merge², D] after
        ``leading`` tower tokens). ``attention`` gives the head count and the softmax scale."""
        if not 0 <= block <= self.feature_block:
            raise ValueError(f"vision layer {block} does not feed the LLM (layers 0..{self.feature_block} do)")
        source = editor.input_of(editor.one("vision_block", block), "hidden_states")
        layout = editor.placeholder("layout")
        prefix, name = f"vision_layers.{block}", f"vision_{block}"
        chain = editor.chain(max((source, layout), key=editor.order().__getitem__))
        normed = chain.module(f"{prefix}.{norm}", source, role=role, stage="vision", name=f"{name}_norm")
        heads = []
        for kind in ("q", "k"):
            x = chain.module(f"{prefix}.{projections}.{kind}_proj", normed, role=role, stage="vision", name=f"{name}_{kind}_proj")
            if head_norms:
                x = chain.module(f"{prefix}.{projections}.{kind}_norm", x, role=role, stage="vision", name=f"{name}_{kind}_norm")
            heads.append(chain(group_merged_patches, x, layout, self.merge, leading, role=role, stage="vision", name=f"{name}_{kind}"))
        return VisionQK(heads[0], heads[1], attention.num_heads, attention.scale, leading=leading, merge=self.merge**2,
                        frames=layout, order=None)

    @property
    def tile_grid(self) -> tuple[int, int]:
        """(h, w) LLM tokens of one tile, in raster order."""
        raise NotImplementedError

    @property
    def tokens_per_tile(self) -> int:
        h, w = self.tile_grid
        return h * w

    def tile_grids(self, batch: dict[str, Any], tiles: Tensor) -> tuple[tuple[int, int], ...]:
        """(h, w) LLM tokens of each tile (:attr:`tile_grid` for every tile unless the tower reads each
        image at its own size)."""
        return (self.tile_grid,) * tiles.shape[0]

    def tile_pixels(self, batch: dict[str, Any]) -> Tensor | None:
        """The tiles [N, 3, H, W] of a batch (None: no images)."""
        pixels = batch.get("pixel_values")
        return None if pixels is None or pixels.shape[0] == 0 else pixels

    def extra_inputs(self, batch: dict[str, Any], input_ids: Tensor, tiles: Tensor | None) -> dict[str, Any]:
        """Planned graph inputs of the family beyond the text, the tiles and the layout (none by default)."""
        return {}

    def plan(self, batch: dict[str, Any], for_generation: bool) -> Prompt:
        input_ids: Tensor = batch["input_ids"]
        attention_mask = self.attention_mask_of(input_ids, batch.get("attention_mask"))
        size, seq_len = input_ids.shape
        position_ids = batch.get("position_ids")
        if position_ids is None:
            if for_generation:
                position_ids = self.generation_positions(attention_mask)
            else:
                position_ids = torch.arange(seq_len, device=input_ids.device).expand(size, seq_len)
        position_ids = position_ids.expand(size, seq_len)
        next_position = position_ids[:, -1:] + 1
        slots = self.slots_of(input_ids == self.image_token_id)
        tiles = self.tile_pixels(batch)
        text = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if tiles is None:
            if slots.numel():
                raise InputError(f"the prompt has {slots.numel()} image tokens but no pixel_values")
            return Prompt("prefill_text", {**text, **self.extra_inputs(batch, input_ids, None)}, next_position)
        grids = self.tile_grids(batch, tiles)
        counts = [h * w for h, w in grids]
        if slots.numel() != sum(counts):
            raise InputError(
                f"the prompt has {slots.numel()} image tokens, but its {tiles.shape[0]} tile(s) or image(s) give "
                f"{sum(counts)} features ({', '.join(map(str, counts))}); build inputs with the model's processor"
            )
        starts = [sum(counts[:i]) for i in range(len(counts))]
        rows = tuple(int(slots[start]) // seq_len for start in starts)
        layout = VisualLayout.from_grids(size, seq_len, rows, tuple((1, h, w) for h, w in grids))
        inputs = {**text, "pixel_values": tiles, "visual_positions": slots, "layout": layout}
        inputs.update(self.extra_inputs(batch, input_ids, tiles))
        return Prompt("prefill", inputs, next_position, layout)

    # ----- frames, export, viz --------------------------------------------------------------------
    def frame_tokens(self, prompt: Prompt) -> list[int]:
        return list(prompt.layout.counts)

    def frame_inputs(self, prompt: Prompt, first: int, stop: int) -> dict[str, Any]:
        return {"pixel_values": prompt.inputs["pixel_values"][first:stop]}

    @property
    def tile_size(self) -> int:
        """Side (pixels) of one tile."""
        size = self.model.config.vision_config.image_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    def export_image_size(self, processor: Any, requested: int | None) -> int:
        from vlmopt.export.errors import ExportError

        size = self.tile_size
        if requested not in (None, size):
            raise ExportError(f"this model's tower reads {size}×{size} tiles; an export is fixed to one tile per image, "
                              f"so image_size={requested} cannot be exported (pass {size} or leave it out)")
        return size

    def pixel_frames(self, batch: dict[str, Any]) -> list[np.ndarray]:
        """The normalised tiles [H, W, 3] of a batch (``vlmopt viz``)."""
        return [p.transpose(1, 2, 0) for p in self.tile_pixels(batch).float().numpy()]


class TileStreamPlanner(StreamPlanner):
    """Chunk inputs and positions of a stream on a family whose video frames are tiles: each frame is
    written as the family's one-shot video prompt writes it (its text around the frame's placeholder
    tokens, from ``frame_text``), so a stream without a pass equals the one-shot prefill of the same
    frames and question. Positions are 1-D and count on. See :mod:`vlmopt.stream.planning`.

    ``prefix`` is the text before the first frame, after the system turn ``system`` (``{system}`` the
    system prompt; none without one); ``question`` the text of a question (``{question}``) after the
    frames; ``frame_text(index)`` the (before, after) text of frame ``index`` (0-based, counted from the
    stream's first frame); ``frame_inputs(processor, frames)`` the batch entries of frames uint8
    [T, H, W, 3] (their tiles, one per frame).
    """

    def __init__(self, compiled, processor, prefix: str, question: str, frame_text, frame_inputs, system: str = "") -> None:
        self.compiled = compiled
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.prefix, self.question, self.system = prefix, question, system
        self.frame_text, self.frame_inputs = frame_text, frame_inputs
        adapter = compiled.adapter
        self.placeholders = [adapter.image_token_id] * adapter.tokens_per_tile
        self.reset(0)

    def prefix_ids(self, system_prompt: str) -> Tensor:
        system = self.system.format(system=system_prompt) if system_prompt else ""
        return self.text(system + self.prefix)

    def question_ids(self, question: str) -> Tensor:
        return self.text(self.question.format(question=question))

    def chunk(self, frames: np.ndarray, cache_length: int, timestamps, patches) -> tuple[dict[str, Any], Tensor]:
        pieces = []
        for index in patches:
            before, after = self.frame_text(index)
            pieces += [self.text(before), torch.tensor([self.placeholders]), self.text(after)]
        ids = torch.cat(pieces, dim=1)
        positions = (torch.arange(ids.shape[1]) + self.next)[None]
        batch = {"input_ids": ids, "position_ids": positions, **self.frame_inputs(self.processor, frames)}
        prompt = self.compiled.plan(batch)
        inputs = dict(prompt.inputs, attention_mask=torch.ones(1, cache_length + ids.shape[1], dtype=torch.long))
        self.frame_size = frames.shape[1:3]
        self.next += ids.shape[1]
        return inputs, positions
