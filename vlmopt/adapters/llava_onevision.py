"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): LLaVA-NeXT's tiles with ``anyres_max_N``
resampling, SigLIP (or CLIP) tower, Qwen2 (or Llama / Mistral) LM, and videos.

Images are packed as LLaVA-NeXT's (:mod:`vlmopt.adapters.llava_next`), except that an unpadded grid of
more than ``N`` tiles' worth is resampled (bilinear) to fit — one frame of the layout, since the tiles no
longer exist — and that the images of a multi-image prompt (``batch_num_images`` > 1) are their base
image and one newline. A video's frames go through the same tower; each frame's grid is pooled 2×2
(bilinear to ``⌈side / 2⌉``: 196 tokens for SigLIP's 27 × 27 at 384 px), then HF adds one newline after
the video: one layout input of grid (frames, h, w) whose last token is structural. A batch mixing
images and videos runs them through the tower together (HF runs two towers), so it agrees with HF to
float tolerance rather than bit for bit.

Streams (:class:`OnevisionStreamPlanner`): every frame is its 196-token block in the cache, positions
counting on; HF closes a video with one newline, which a stream writes with each question (and removes
with it): the cache never holds it when a kv-stage pass scores or evicts entries, so it stays outside
every budget, and a question sees the one-shot prompt's sequence.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vlmopt.adapters.anyres import PackPlan
from vlmopt.adapters.base import NamedConfig, register
from vlmopt.adapters.llava_next import LlavaNextAdapter, TiledPrefill, text_config, tiled_processor, tower_config
from vlmopt.errors import InputError

IMAGE_TOKEN, VIDEO_TOKEN, PAD_TOKEN, END_TOKEN = 3, 4, 0, 2
"""Special ids of the random-weight configs: the word-level OneVision tokenizer's (vlmopt.reference.tiled_processing)."""
RANDOM_MODEL_TASKS = {"shapes": {"size": 140, "grid": 14}, "shapes-video": {}, "needle": {}}


def llava_onevision_config(
    tower: str = "siglip", text: str = "qwen2", image_size: int = 70, patch_size: int = 14, vision_hidden: int = 32,
    vision_layers: int = 4, vision_heads: int = 4, text_hidden: int = 64, text_layers: int = 4, text_heads: int = 4,
    kv_heads: int = 2, vocab_size: int = 256, feature_layer: int | list[int] = -1, strategy: str | None = None,
    pinpoints: list[list[int]] | None = None, aspect_ratio: str = "anyres_max_9", vision_intermediate: int | None = None,
    intermediate: int | None = None,
):
    """A LLaVA-OneVision config: tiles of ``image_size`` px (OneVision's 1..6 × 1..6 pinpoints scaled to it
    by default), ``anyres_max_9``, the word-level tokenizer's special ids."""
    from transformers import LlavaOnevisionConfig

    from vlmopt.reference.tiled_processing import onevision_pinpoints

    return LlavaOnevisionConfig(
        vision_config=tower_config(tower, image_size, patch_size, vision_hidden, vision_layers, vision_heads, vision_intermediate),
        text_config=text_config(text, text_hidden, text_layers, text_heads, kv_heads, intermediate or text_hidden * 5 // 2,
                                vocab_size, pad_token_id=PAD_TOKEN, bos_token_id=None, eos_token_id=END_TOKEN),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy or ("default" if tower == "clip" else "full"),
        image_grid_pinpoints=pinpoints or onevision_pinpoints(image_size), vision_aspect_ratio=aspect_ratio,
    )


def llava_onevision_7b_shape(width: float = 1.0):
    """llava-onevision-qwen2-7b's shape (HERMES's main model): SigLIP-so400m at 384 px (26 layers, 729
    tokens a tile, 196 a video frame) + Qwen2-7B (28 layers, 28 heads, 4 KV heads), ``anyres_max_9``."""
    from vlmopt.configs import scaled

    return llava_onevision_config(
        image_size=384, vision_hidden=scaled(1152, width, 16), vision_layers=26, vision_heads=16,
        vision_intermediate=scaled(4304, width, 16), text_hidden=scaled(3584, width, 56), text_layers=28, text_heads=28,
        kv_heads=4, intermediate=scaled(18944, width, 16), vocab_size=152064,
    )


class OnevisionPrefill(TiledPrefill):
    """Prefill with images and/or videos, calling the HF LLaVA-OneVision submodules as leaves."""

    def forward(self, input_ids, pixel_values, pixel_values_videos, attention_mask, position_ids, visual_positions, layout,
                tiles, pack_order, tower_layout, tower_index, cache, logits_to_keep):
        self.mark_text_inputs(input_ids, attention_mask, position_ids)
        tokens, slots = self.visual(pixel_values, pixel_values_videos, visual_positions, tiles, pack_order)
        return self.merged(input_ids, attention_mask, position_ids, tokens, slots, cache, logits_to_keep)


@register
class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    model_classes = {"llava_onevision": "LlavaOnevisionForConditionalGeneration"}
    capabilities = frozenset({"vision_qk", "grids", "video", "stream", "export"})
    paper_settings = {
        # HERMES's official LLaVA-OV code: working tier alpha = 1 − 0.9p, k = 20 − 19.5p.
        "hermes": {"working_schedule": (1.0, -0.9, 20.0, -19.5)},
        # HalfV has no OneVision setting: its LLaVA branch (layer inactivity) with LLaVA-NeXT's schedule, scaled by depth.
        "halfv": LlavaNextAdapter.paper_settings["halfv"],
    }
    configs = {
        "tiny-llava-ov-random": NamedConfig(
            llava_onevision_config, description="LLaVA-OneVision, SigLIP tower on 70 px tiles, 4-layer Qwen2 (random weights)",
            processor=partial(tiled_processor, "llava_onevision", llava_onevision_config), tasks=RANDOM_MODEL_TASKS,
        ),
        "llava-onevision-7b-shape": NamedConfig(
            llava_onevision_7b_shape, image_grid=(54, 54),
            description="llava-onevision-qwen2-7b's depths, heads and tokens (a 756 px image: base + 2×2 tiles)",
            processor=partial(tiled_processor, "llava_onevision", llava_onevision_7b_shape),
        ),
    }
    batch_keys = ("pixel_values", "image_sizes", "pixel_values_videos", "batch_num_images")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.aspect_ratio = model.config.vision_aspect_ratio

    def prefill_pipeline(self) -> nn.Module:
        return OnevisionPrefill(self.model, self.feature_layers, self.drop_cls, self.decoder_view)

    def patched(self, batch: dict[str, Any], count: int) -> list[bool]:
        """HF's rule: the images of a prompt holding several (``batch_num_images``) are not cut into tiles."""
        per_prompt = batch.get("batch_num_images")
        if per_prompt is None:
            return [True] * count
        flags = [int(n) == 1 for n in per_prompt.tolist() for _ in range(int(n))]
        if len(flags) != count:
            raise InputError(f"batch_num_images {per_prompt.tolist()} counts {len(flags)} images; pixel_values holds {count}")
        return flags

    def with_videos(self, inputs: dict[str, Any], videos: Tensor | None) -> dict[str, Any]:
        return dict(inputs, pixel_values_videos=videos)

    def stream_planner(self, compiled, processor):
        return OnevisionStreamPlanner(compiled, processor)

    def prompt_text(self, question: str) -> str:
        return f"<|im_start|>user\n<image>\n{question}<|im_end|>\n<|im_start|>assistant\n"

    @classmethod
    def synthetic_visual(cls, config, kind, grid, generator):
        """An image of ``grid`` (h, w) patches, or a video of ``grid[0]`` frames at the tower's size."""
        if kind == "image":
            return super().synthetic_visual(config, kind, grid, generator)
        vision = config.vision_config
        frames = (grid or (4,))[0]
        pooled = PackPlan(vision.image_size // vision.patch_size, ()).pooled
        pixels = torch.Size((1, frames, 3, vision.image_size, vision.image_size))
        return [config.video_token_id] * (frames * pooled * pooled + 1), {"pixel_values_videos": pixels}


class OnevisionStreamPlanner:
    """Chunk inputs and positions of a OneVision stream: ``[system turn] <|im_start|>user\\n`` then each
    frame's pooled block (1-D positions counting on); a question is the video's closing newline, then
    ``\\n{question}<|im_end|>\\n<|im_start|>assistant\\n`` — the one-shot prompt of the same frames."""

    position_axes = 1
    frame_multiple = 1

    def __init__(self, compiled, processor) -> None:
        self.compiled = compiled
        self.processor = processor
        self.tokenizer = processor.tokenizer
        adapter = compiled.adapter
        self.per_frame = PackPlan(adapter.grid_size, ()).pooled ** 2
        self.video_token = compiled.config.video_token_id
        self.reset(0)

    def reset(self, start: int) -> None:
        self.next = start
        self.patches = 0
        self.frame_size: tuple[int, int] | None = None

    def text(self, text: str) -> Tensor:
        return self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].long()

    def prefix_ids(self, system_prompt: str) -> Tensor:
        system = f"<|im_start|>system\n{system_prompt}<|im_end|>\n" if system_prompt else ""
        return self.text(system + "<|im_start|>user\n")

    def question_ids(self, question: str) -> Tensor:
        return self.text(f"\n{question}<|im_end|>\n<|im_start|>assistant\n")

    def text_positions(self, first: int, count: int) -> Tensor:
        return (torch.arange(count) + first).view(1, 1, -1)

    def text_start(self) -> int:
        return self.next

    def visual_tokens(self, frames: np.ndarray) -> int:
        """Cache entries ``frames`` take (each frame's pooled block; the closing newline comes with a question)."""
        return frames.shape[0] * self.per_frame

    def check(self, frames: np.ndarray) -> None:
        if self.frame_size is not None and frames.shape[1:3] != self.frame_size:
            raise InputError(
                f"frames of {frames.shape[2]}x{frames.shape[1]} px after frames of {self.frame_size[1]}x{self.frame_size[0]}: "
                "a stream is one video; keep the frame size"
            )

    def chunk(self, frames: np.ndarray, cache_length: int, timestamps, patches) -> tuple[dict[str, Any], Tensor]:
        from vlmopt.reference.tiled_processing import onevision_video_inputs

        pixels = onevision_video_inputs(frames, self.processor)["pixel_values_videos"].to(self.compiled.adapter.model.dtype)
        ids = torch.full((1, frames.shape[0] * self.per_frame), self.video_token)
        positions = (torch.arange(ids.shape[1]) + self.next)[None]
        batch = {"input_ids": ids, "pixel_values_videos": pixels, "position_ids": positions}
        prompt = self.compiled.adapter.plan_tiled(batch, for_generation=False, closing=False)
        inputs = dict(prompt.inputs, attention_mask=torch.ones(1, cache_length + ids.shape[1], dtype=torch.long))
        self.frame_size = frames.shape[1:3]
        self.next += ids.shape[1]
        return inputs, positions

    def prelude(self, cache, cache_length: int) -> int:
        """Write the video's closing newline (HF's ``image_newline`` after its frames) into ``cache`` at the
        next position, with the language model's own modules; the stream removes it with the question."""
        adapter = self.compiled.adapter
        newline = adapter.model.model.image_newline
        mask = torch.ones(1, cache_length + 1, dtype=torch.long)
        adapter.text_model(inputs_embeds=newline[None, None], attention_mask=mask, position_ids=torch.tensor([[self.next]]),
                           cache=cache, use_cache=True)
        return 1

    def after_reindex(self, positions: Tensor) -> None:
        self.next = int(positions.max()) + 1

