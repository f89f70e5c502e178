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

import math
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vlmopt.adapters.anyres import PackPlan
from vlmopt.adapters.base import NamedConfig, register
from vlmopt.adapters.formats import PromptFormat, lenient_construction
from vlmopt.adapters.llava import LlavaStreamPlanner
from vlmopt.adapters.llava_next import LlavaNextAdapter, TiledPrefill, text_config, tiled_processor, tower_config
from vlmopt.errors import InputError

SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>", "<unk>")
IMAGE_TOKEN, VIDEO_TOKEN, PAD_TOKEN, END_TOKEN = 3, 4, 0, 2
"""Special ids of the random-weight configs: the word-level OneVision tokenizer's (:data:`FORMAT`)."""
RANDOM_MODEL_TASKS = {"shapes": {"size": 140, "grid": 14}, "shapes-video": {}, "needle": {}}
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'video' %}<video>\n"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def onevision_pinpoints(tile: int) -> list[list[int]]:
    """LLaVA-OneVision's ``image_grid_pinpoints`` (every grid of 1..6 × 1..6 tiles) for tiles of ``tile`` px."""
    return [[rows * tile, cols * tile] for rows in range(1, 7) for cols in range(1, 7)]


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


def onevision_images(tile: int):
    """LLaVA-OneVision's image processor (PIL backend) for tiles of ``tile`` px."""
    from transformers import LlavaOnevisionImageProcessorPil

    return LlavaOnevisionImageProcessorPil(size={"height": tile, "width": tile}, image_grid_pinpoints=onevision_pinpoints(tile))


def onevision_processor(tokenizer, images, image_size: int, video_size: int, patch: int = 14, pinpoints=None,
                        strategy: str = "full", aspect_ratio: str = "anyres_max_9"):
    """``LlavaOnevisionProcessor`` without a video processor (``image_size`` the tile side)."""
    from transformers import LlavaOnevisionProcessor

    if pinpoints:
        images.image_grid_pinpoints = pinpoints
    return lenient_construction(
        LlavaOnevisionProcessor, image_processor=images, tokenizer=tokenizer, video_processor=None,
        num_image_tokens=(image_size // patch) ** 2, vision_feature_select_strategy=strategy, chat_template=CHAT_TEMPLATE,
        vision_aspect_ratio=aspect_ratio,
    )


def tile_side(processor) -> int:
    """The tower's side (px) a tiled processor resizes every tile and video frame to."""
    size = processor.image_processor.size
    return int(size["height"] if "height" in size else size["shortest_edge"])


def video_tokens(num_frames: int, processor) -> int:
    """``<video>`` tokens of a clip of ``num_frames`` frames (``replace_video_token``'s count): a 2×2-pooled
    grid per frame, ``frames · ⌈√n / 2⌉²``, and one newline after the video."""
    pooled = math.ceil(int(math.sqrt(processor.num_image_tokens)) / 2)
    return num_frames * pooled * pooled + 1


def video_inputs(frames: np.ndarray, processor) -> dict[str, Tensor]:
    """``pixel_values_videos`` [1, T, 3, s, s] (float32) of one clip, uint8 ``frames`` [T, H, W, 3], as
    ``LlavaOnevisionVideoProcessor`` makes them (it needs torchvision, absent here): resized to the tower's
    side ``s`` (bicubic: PIL's here, torchvision's there) when H, W ≠ s, 1/255, CLIP mean and std."""
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    side = tile_side(processor)
    if frames.shape[1:3] != (side, side):
        from PIL import Image

        frames = np.stack([np.asarray(Image.fromarray(f).resize((side, side), Image.BICUBIC)) for f in frames])
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return {"pixel_values_videos": ((x - mean) / std)[None]}


def videos(processor, texts: list[str], clips: list[np.ndarray]) -> dict[str, Tensor]:
    """Tokenised prompts (each ``<video>`` expanded) and ``pixel_values_videos`` [N, T, 3, s, s] of clips
    of one length (HF stacks a batch's videos)."""
    if len({len(c) for c in clips}) != 1:
        raise ValueError("a batch of OneVision videos needs clips of one length (HF stacks them into one tensor)")
    tokens = video_tokens(len(clips[0]), processor)
    out = dict(processor.tokenizer([t.replace("<video>", "<video>" * tokens) for t in texts], return_tensors="pt", padding=True))
    out["pixel_values_videos"] = torch.cat([video_inputs(c, processor)["pixel_values_videos"] for c in clips])
    return out


USER, ASSISTANT = "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"
FORMAT = PromptFormat(
    arch="llava_onevision", processor_class="LlavaOnevisionProcessor", special=SPECIAL,
    tokens={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "image_token": "<image>", "video_token": "<video>"},
    prompt=lambda question, video: f"{USER}{'<video>' if video else '<image>'}\n{question}{ASSISTANT}",
    answer=lambda answer: f"{answer}<|im_end|>", follow_up=lambda question: f"\n{USER}{question}{ASSISTANT}",
    assemble=onevision_processor, image_processor=onevision_images, videos=videos, names=("onevision", "llava_ov"),
    stacked_videos=True,
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
    lacks = {"frames": LlavaNextAdapter.lacks["frames"]}
    prompt_format = FORMAT
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
        return FORMAT.prompt(question, False)

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


class OnevisionStreamPlanner(LlavaStreamPlanner):
    """Chunk inputs and positions of a OneVision stream: ``[system turn] <|im_start|>user\\n`` then each
    frame's pooled block (1-D positions counting on); a question is the video's closing newline, then
    ``\\n{question}<|im_end|>\\n<|im_start|>assistant\\n`` — the one-shot prompt of the same frames."""

    def __init__(self, compiled, processor) -> None:
        self.compiled = compiled
        self.processor = processor
        self.tokenizer = processor.tokenizer
        adapter = compiled.adapter
        self.per_frame = PackPlan(adapter.grid_size, ()).pooled ** 2
        self.video_token = compiled.config.video_token_id
        self.reset(0)

    def prefix_ids(self, system_prompt: str) -> Tensor:
        system = f"<|im_start|>system\n{system_prompt}<|im_end|>\n" if system_prompt else ""
        return self.text(system + "<|im_start|>user\n")

    def question_ids(self, question: str) -> Tensor:
        return self.text(f"\n{question}<|im_end|>\n<|im_start|>assistant\n")

    def visual_tokens(self, frames: np.ndarray) -> int:
        """Cache entries ``frames`` take (each frame's pooled block; the closing newline comes with a question)."""
        return frames.shape[0] * self.per_frame

    def chunk(self, frames: np.ndarray, cache_length: int, timestamps, patches) -> tuple[dict[str, Any], Tensor]:
        pixels = video_inputs(frames, self.processor)["pixel_values_videos"].to(self.compiled.adapter.model.dtype)
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
        mask = torch.ones(1, cache_length + 1, dtype=torch.long, device=newline.device)
        adapter.text_model(inputs_embeds=newline[None, None], attention_mask=mask,
                           position_ids=torch.tensor([[self.next]], device=newline.device), cache=cache, use_cache=True)
        return 1

