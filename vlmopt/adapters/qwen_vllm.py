"""vLLM's Qwen2.5-VL and Qwen3-VL (dense and MoE) with vlmopt's visual-token pruning before the LLM:
the classes the Qwen adapters name in ``vllm_classes``, registered by vlmopt's vLLM plugin
(:mod:`vlmopt.integrations.vllm`) and imported only by vLLM (this module imports vLLM).

Each class subclasses vLLM's own and changes nothing unless ``hf_config.vlmopt_passes`` names passes:

* **processor** (front end): an item's placeholder count is the passes' kept count for its grid,
  known before the tower runs (the scheduler's token budget is the pruned prompt's); a Qwen3-VL video
  keeps its timestamps and per-patch markers, its kept tokens counted in the first patch (rows the
  model fills in their real order, as vLLM's EVS does);
* **tower** (``embed_multimodal``): vLLM's vision tower runs unchanged; the blocks a pass reads
  (HiPrune's) give their queries and keys through a hook on vLLM's vision attention; the pass's own
  ``prune`` picks the tokens (:mod:`vlmopt.integrations.vllm.prune`); each kept row carries its
  original M-RoPE position, relative to its span, as int32 bits in three extra columns;
* **positions**: ``get_mrope_input_positions`` gives text its unpruned positions and each span's rows
  the span's base (:func:`~vlmopt.integrations.vllm.positions.prompt_positions`); ``embed_input_ids``
  takes the columns off and ``forward`` adds them to the base, as vLLM's Qwen3-VL hands DeepStack
  features from one to the other. Positions travel with the rows, so a chunk of a span, a span in a
  cached prefix and a batch of spans of any sizes all get the positions of the unpruned prompt.
"""

from __future__ import annotations

import contextlib
from functools import partial

import numpy as np
import torch
from torch import Tensor
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration, Qwen3VLMoeProcessingInfo
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from vlmopt.errors import IncompatiblePassError, InputError
from vlmopt.integrations.vllm import positions as mrope
from vlmopt.integrations.vllm.prune import TowerQK, blocks_read, prune
from vlmopt.integrations.vllm.spec import TowerFacts, check_mrope, kept_count, merged_grid, plugin_passes

POSITION_BYTES = 3 * 4
"""A kept row's (t, h, w) position relative to its span: three int32, carried as bits in the row's dtype."""


def to_columns(positions: np.ndarray, like: Tensor) -> Tensor:
    """[n, k] columns in ``like``'s dtype holding ``positions`` [3, n] as int32 bits."""
    ints = torch.from_numpy(np.ascontiguousarray(positions.T, dtype=np.int32))
    return ints.view(like.dtype).reshape(positions.shape[1], -1).to(like.device)


def from_columns(columns: Tensor) -> Tensor:
    """[n, 3] int64 positions back from :func:`to_columns`'s columns."""
    return columns.contiguous().view(torch.int32).reshape(columns.shape[0], 3).long()


@contextlib.contextmanager
def captured_qk(visual, blocks: tuple[int, ...]):
    """Collect the queries and keys vLLM's vision attention computes in ``blocks`` (rotary applied)."""
    q, k, handles = {}, {}, []

    def hook(block, module, args, kwargs):
        query, key = kwargs.get("query", args[0] if args else None), kwargs.get("key", args[1] if len(args) > 1 else None)
        q[block], k[block] = query.reshape(-1, *query.shape[-2:]), key.reshape(-1, *key.shape[-2:])

    try:
        for block in blocks:
            handles.append(visual.blocks[block].attn.attn.register_forward_pre_hook(partial(hook, block), with_kwargs=True))
        yield q, k
    finally:
        for handle in handles:
            handle.remove()


class VlmoptQwen:
    """What the plugin adds to a vLLM Qwen VL model (mixed in before vLLM's class)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        hf_config = vllm_config.model_config.hf_config
        check_mrope(hf_config)
        self.vlmopt_passes = plugin_passes(hf_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vlmopt_facts = TowerFacts.of(hf_config) if self.vlmopt_passes else None
        self.vlmopt_blocks = blocks_read(self.vlmopt_passes, self.vlmopt_facts) if self.vlmopt_passes else ()
        if self.vlmopt_blocks and (self.use_data_parallel or vllm_config.compilation_config.compile_mm_encoder):
            raise IncompatiblePassError(
                "HiPrune reads the vision tower's attention through hooks on vLLM's vision blocks, which a compiled "
                "or data-parallel tower skips; start vLLM without compile_mm_encoder and mm_encoder_tp_mode='data'"
            )
        self._vlmopt_pending = None

    # ----- the tower ------------------------------------------------------------------------
    def tower_order(self, grid_thw: list[list[int]]) -> Tensor | None:
        """[T] index from the tower's token order to raster order (None: the same)."""
        return None

    def embed_multimodal(self, **kwargs):
        if not self.vlmopt_passes:
            return super().embed_multimodal(**kwargs)
        out: list[Tensor] = []
        for modality, item in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if item is None:
                continue
            if item["type"].endswith("embeds"):
                raise InputError(f"vlmopt's passes prune with the vision tower; send {modality} pixels, not precomputed {modality}_embeds")
            grid_thw = item[f"{modality}_grid_thw"].tolist()
            merge = self.config.vision_config.spatial_merge_size
            grids = [merged_grid(g, merge) for g in grid_thw]
            with captured_qk(self.visual, self.vlmopt_blocks) as (q, k):
                parts = self._process_image_input(item) if modality == "image" else self._process_video_input(item)
            qk = None
            if self.vlmopt_blocks:
                head_dim = q[self.vlmopt_blocks[0]].shape[-1]
                qk = TowerQK(q, k, head_dim**-0.5, self.tower_order(grid_thw))
            tokens, keep, layout = prune(self.vlmopt_passes, torch.cat(list(parts)), grids, self.vlmopt_facts, qk)
            start, first = 0, 0
            for index, (grid, count) in enumerate(zip(grids, layout.counts)):
                local = keep[start : start + count].cpu().numpy() - first
                rows = tokens[start : start + count]
                out.append(self.span_rows(modality, item, index, grid, rows, local))
                start, first = start + count, first + int(np.prod(grid))
        return tuple(out)

    def span_rows(self, modality: str, item, index: int, grid, rows: Tensor, keep: np.ndarray) -> Tensor:
        """The rows of one item's span, each with its position columns (an image's or a Qwen2.5-VL video's
        kept tokens; Qwen3-VL overrides this for videos)."""
        positions = mrope.grid_positions(grid, self.t_step(modality, item, index))[:, keep]
        return torch.cat([rows, to_columns(positions, rows)], dim=1)

    def t_step(self, modality: str, item, index: int) -> float:
        """Temporal positions per temporal patch of item ``index`` (1 for images)."""
        return 1.0

    # ----- positions ------------------------------------------------------------------------
    def span_extent(self, feature, span_ids: list[int]) -> int:
        """Positions one item's span advances the text after it by."""
        modality = feature.modality
        grid = merged_grid(feature.data[f"{modality}_grid_thw"].data.tolist(), self.config.vision_config.spatial_merge_size)
        return mrope.grid_extent(grid, self.feature_t_step(feature))

    def feature_t_step(self, feature) -> float:
        return 1.0

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features):
        if not self.vlmopt_passes:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        spans = []
        for feature in mm_features:
            offset, rows = feature.mm_position.offset, feature.mm_position.length
            spans.append((offset, rows, self.span_extent(feature, list(input_tokens[offset : offset + rows]))))
        positions, delta = mrope.prompt_positions(len(input_tokens), spans)
        return torch.from_numpy(positions), int(delta)

    def embed_input_ids(self, input_ids: Tensor, multimodal_embeddings=None, *, is_multimodal=None) -> Tensor:
        if not self.vlmopt_passes or not multimodal_embeddings:
            return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)
        width = multimodal_embeddings[0].shape[1] - POSITION_BYTES // multimodal_embeddings[0].element_size()
        stripped = [rows[:, :width] for rows in multimodal_embeddings]
        offsets = torch.cat([from_columns(rows[:, width:]) for rows in multimodal_embeddings])
        self._vlmopt_pending = (is_multimodal.to(offsets.device), offsets)
        return super().embed_input_ids(input_ids, stripped, is_multimodal=is_multimodal)

    def forward(self, input_ids, positions: Tensor, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        pending, self._vlmopt_pending = self._vlmopt_pending, None
        if pending is not None and inputs_embeds is not None:
            mask, offsets = pending
            positions = positions.clone()
            window = positions[:, : mask.numel()]
            window[:, mask.to(window.device)] += offsets.T.to(window.device, window.dtype)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)


class VlmoptPlaceholders:
    """The processor side (mixed in before vLLM's processor): passes checked when the processor is
    built (the engine refuses to start on a pass or model the plugin cannot run), pruned counts."""

    def __init__(self, info, *args, **kwargs) -> None:
        check_mrope(info.get_hf_config())
        self.vlmopt_passes = plugin_passes(info.get_hf_config())
        super().__init__(info, *args, **kwargs)

    def pruned_replacement(self, modality: str, out_mm_kwargs, tokens: dict[str, int], item_idx: int):
        grid = out_mm_kwargs[modality][item_idx][f"{modality}_grid_thw"].data.tolist()
        count = kept_count(self.vlmopt_passes, merged_grid(grid, self.info.get_hf_config().vision_config.spatial_merge_size))
        return [tokens[modality]] * count

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        if not self.vlmopt_passes:
            return updates
        config = self.info.get_hf_config()
        tokens = {"image": config.image_token_id, "video": config.video_token_id}
        return [
            PromptReplacement(
                modality=update.modality, target=update.target,
                replacement=partial(self.replacement_for(update.modality), update.modality, out_mm_kwargs, tokens),
            )
            for update in updates
        ]

    def replacement_for(self, modality: str):
        return self.pruned_replacement


class Qwen25VLPlaceholders(VlmoptPlaceholders, Qwen2_5_VLMultiModalProcessor):
    """Qwen2.5-VL's processor with pruned placeholder counts."""


class Qwen3VLPlaceholders(VlmoptPlaceholders, Qwen3VLMultiModalProcessor):
    """Qwen3-VL's processor with pruned placeholder counts; a video keeps its per-patch timestamps and
    markers, its kept tokens all counted in the first patch (the model writes the real layout)."""

    def replacement_for(self, modality: str):
        return self.pruned_video if modality == "video" else self.pruned_replacement

    def pruned_video(self, modality: str, out_mm_kwargs, tokens: dict[str, int], item_idx: int):
        item = out_mm_kwargs["video"][item_idx]
        config = self.info.get_hf_config()
        grid = merged_grid(item["video_grid_thw"].data.tolist(), config.vision_config.spatial_merge_size)
        return Qwen3VLMultiModalProcessor.get_video_repl(
            tokens_per_frame=[kept_count(self.vlmopt_passes, grid)] + [0] * (grid[0] - 1),
            timestamps=item["timestamps"].data, tokenizer=self.info.get_tokenizer(),
            vision_start_token_id=config.vision_start_token_id, vision_end_token_id=config.vision_end_token_id,
            video_token_id=config.video_token_id, select_token_id=False,
        )


@MULTIMODAL_REGISTRY.register_processor(Qwen25VLPlaceholders, info=Qwen2_5_VLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class Qwen25VL(VlmoptQwen, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with vlmopt's passes: the tower runs in window order (its reverse index
    takes HiPrune's scores to raster order); a video's temporal positions step by
    ``second_per_grid_t · tokens_per_second``."""

    def tower_order(self, grid_thw: list[list[int]]) -> Tensor:
        return self.visual.prepare_encoder_metadata(grid_thw)["reverse_indices"]

    def t_step(self, modality: str, item, index: int) -> float:
        seconds = item.get("second_per_grid_ts") if modality == "video" else None
        return 1.0 if seconds is None else float(seconds[index]) * self.config.vision_config.tokens_per_second

    def feature_t_step(self, feature) -> float:
        seconds = feature.data.get("second_per_grid_ts") if feature.modality == "video" else None
        return 1.0 if seconds is None else float(seconds.data) * self.config.vision_config.tokens_per_second


class VlmoptQwen3(VlmoptQwen):
    """Qwen3-VL's parts: DeepStack features ride in each kept row; a video span holds text rows."""

    def span_rows(self, modality: str, item, index: int, grid, rows: Tensor, keep: np.ndarray) -> Tensor:
        if modality != "video":
            return super().span_rows(modality, item, index, grid, rows, keep)
        t, h, w = grid
        per_patch = np.bincount(keep // (h * w), minlength=t).tolist()
        config = self.config
        ids = Qwen3VLMultiModalProcessor.get_video_repl(
            tokens_per_frame=per_patch, timestamps=item.timestamps[index], tokenizer=self._tokenizer,
            vision_start_token_id=config.vision_start_token_id, vision_end_token_id=config.vision_end_token_id,
            video_token_id=config.video_token_id, select_token_id=False,
        ).full
        counts = mrope.frame_text_counts(ids, config.vision_start_token_id, config.vision_end_token_id)
        positions, visual, _ = mrope.video_span(counts, grid, keep)
        ids = torch.tensor(ids, device=rows.device)
        span = rows.new_zeros(len(ids), rows.shape[1])
        visual = torch.from_numpy(visual).to(rows.device)
        text = self.language_model.embed_input_ids(ids[~visual])
        span[~visual, : text.shape[1]] = text.to(span.dtype)
        span[visual] = rows
        return torch.cat([span, to_columns(positions, span)], dim=1)

    def span_extent(self, feature, span_ids: list[int]) -> int:
        if feature.modality != "video":
            return super().span_extent(feature, span_ids)
        config = self.config
        grid = merged_grid(feature.data["video_grid_thw"].data.tolist(), config.vision_config.spatial_merge_size)
        counts = mrope.frame_text_counts(span_ids, config.vision_start_token_id, config.vision_end_token_id)
        return mrope.video_span(counts, grid, np.zeros(0, dtype=np.int64))[2]


@MULTIMODAL_REGISTRY.register_processor(Qwen3VLPlaceholders, info=Qwen3VLProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder)
class Qwen3VL(VlmoptQwen3, Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL with vlmopt's passes."""


@MULTIMODAL_REGISTRY.register_processor(Qwen3VLPlaceholders, info=Qwen3VLMoeProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder)
class Qwen3VLMoe(VlmoptQwen3, Qwen3VLMoeForConditionalGeneration):
    """vLLM's Qwen3-VL-MoE with vlmopt's passes."""
