"""SmolVLM (``SmolVLMForConditionalGeneration``, Idefics3-style): SigLIP-like tower → pixel shuffle →
linear connector → Llama-family LM (SmolLM2).

Pipeline (prefill): patch embeddings with positions bucketed from each tile's patch mask → encoder
layers under the tile's bidirectional patch mask → post-layernorm → the connector (each s×s block of
patches becomes one token of s²× the channels, ``scale_factor`` s, then a linear projection) → flat
visual tokens [T, D] → token embedding → ``vlmopt::merge_visual`` → LLM.

Tiles: the processor resizes an image, splits it into a rows × columns grid of tiles and adds the
global image; each is s² fewer tokens than patches, written
``<fake_token_around_image><row_r_col_c>`` + tokens (a newline after each row of tiles), then
``\\n<fake_token_around_image><global-img>`` + tokens + ``<fake_token_around_image>``. The row / column
and ``<fake_token_around_image>`` tokens are text (structural text: no pass removes it); every tile
and the global image is one tile of the layout (:mod:`vlmopt.adapters.tiles`). ``pixel_values``
[B, N, 3, H, W] pad a row's images with all-zero ones, which HF skips, and so does the plan.

Video (SmolVLM2): a video is its frames, each ``\\nFrame from MM:SS:`` + a single-image block, after an
intro naming the frame count and duration. A stream writes each frame as the one-shot prompt does, but
not the intro (it names the final count, which a stream does not know when its first frame arrives).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from vlmopt.adapters.base import NamedConfig, TextPipeline, VisionQK, register
from vlmopt.adapters.formats import PromptFormat, lenient_construction
from vlmopt.adapters.llava import reference_processor
from vlmopt.adapters.qwen2_5_vl import RANDOM_MODEL_TASKS
from vlmopt.adapters.tiles import TiledAdapter, TileStreamPlanner
from vlmopt.errors import UnsupportedModelError
from vlmopt.graph.capture import mark, role

MAX_TILES = 3
"""Rows (and columns) of tiles the reference processor splits an image into at most."""
ROW_COL = tuple(f"<row_{r}_col_{c}>" for r in range(1, MAX_TILES + 1) for c in range(1, MAX_TILES + 1))
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<unk>", "<fake_token_around_image>", "<global-img>",
           "<image>", "<video>", *ROW_COL)
PAD, BOS, EOS, FAKE, GLOBAL, IMAGE = 0, 1, 2, 4, 5, 6
"""Token ids of the random-weight configs: those of the word-level tokenizer built for them (:data:`FORMAT`)."""
VIDEO_FPS = 1.0
"""Frames per second of the reference videos (the frame times written into the prompt)."""


def smolvlm_config(
    image_size: int = 168,
    scale_factor: int = 3,
    vision_hidden: int = 32,
    vision_layers: int = 4,
    vision_heads: int = 4,
    vision_intermediate: int | None = None,
    text_hidden: int = 64,
    text_layers: int = 3,
    text_heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    vocab_size: int = 256,
):
    """A SmolVLM config: tiles of ``image_size`` px in 14 px patches, an s×s pixel shuffle (s =
    ``scale_factor``: 168 px → 12×12 patches → 4×4 tokens), a Llama LM."""
    from transformers import SmolVLMConfig

    vision = dict(hidden_size=vision_hidden, intermediate_size=vision_intermediate or vision_hidden * 4,
                  num_hidden_layers=vision_layers, num_attention_heads=vision_heads, image_size=image_size, patch_size=14)
    text = dict(model_type="llama", hidden_size=text_hidden, intermediate_size=intermediate or text_hidden * 2,
                num_hidden_layers=text_layers, num_attention_heads=text_heads, num_key_value_heads=kv_heads,
                vocab_size=vocab_size, max_position_embeddings=8192, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
                rope_parameters={"rope_type": "default", "rope_theta": 130000.0})
    return SmolVLMConfig(vision_config=vision, text_config=text, scale_factor=scale_factor, image_token_id=IMAGE,
                         pad_token_id=PAD)


def smolvlm2_22b_shape(width: float = 1.0):
    """SmolVLM2-2.2B's shape: a 27-layer SigLIP (384 px tiles → 27×27 patches → 81 tokens, scale 3) +
    SmolLM2-1.7B (24 layers, 32 heads)."""
    from vlmopt.configs import scaled

    return smolvlm_config(
        image_size=384, scale_factor=3, vision_hidden=scaled(1152, width, 16), vision_layers=27, vision_heads=16,
        vision_intermediate=scaled(4304, width, 4), text_hidden=scaled(2048, width, 64), text_layers=24, text_heads=32,
        kv_heads=32, intermediate=scaled(8192, width, 32), vocab_size=49280,
    )


class VisionMask(nn.Module):
    """The tower's bidirectional patch mask, built by HF's ``create_bidirectional_mask`` as the tower does
    (None when every patch is real)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config

    def forward(self, hidden: Tensor, patch_attention_mask: Tensor):
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=self.config, inputs_embeds=hidden,
                                         attention_mask=patch_attention_mask.view(hidden.shape[0], -1))


class SmolVLMPrefill(TextPipeline):
    """Prefill with tiles, calling the HF SmolVLM submodules as leaves."""

    def __init__(self, model: nn.Module, view) -> None:
        inner = model.model
        super().__init__(inner.text_model, model.lm_head, (0, 1), view)
        tower = inner.vision_model
        self.vision_embeddings = tower.embeddings
        self.vision_mask = VisionMask(tower.config)
        self.vision_layers = tower.encoder.layers
        self.vision_norm = tower.post_layernorm
        self.connector = inner.connector

    def forward(self, input_ids, pixel_values, attention_mask, position_ids, visual_positions, layout, patch_attention_mask,
                cache, logits_to_keep):
        self.mark_text_inputs(input_ids, attention_mask, position_ids)
        with role("vision_embed"):
            hidden = self.vision_embeddings(pixel_values, patch_attention_mask)
            mask = self.vision_mask(hidden, patch_attention_mask)
        for index, layer in enumerate(self.vision_layers):
            with role("vision_block", index):
                hidden = layer(hidden, mask)
        with role("vision_norm"):
            hidden = self.vision_norm(hidden)
        with role("projector"):
            projected = self.connector(hidden)
        with role("visual_tokens"):
            tokens = projected.flatten(0, 1)
        with role("embed"):
            embeds = self.embed_tokens(input_ids)
        with role("merge"):
            embeds = mark(torch.ops.vlmopt.merge_visual(embeds, tokens, visual_positions), seq_dim=(0, 1))
        return self.llm(embeds, attention_mask, position_ids, cache, logits_to_keep)


# ----- the reference format -------------------------------------------------------------------------
def image_block(processor) -> str:
    """One single image's tokens as the processor writes them (a video frame, the global image)."""
    from transformers.models.smolvlm.processing_smolvlm import _prompt_single_image

    return _prompt_single_image(processor.image_seq_len, fake_token_around_image="<fake_token_around_image>",
                                image_token="<image>", global_image_token="<global-img>")


def frame_label(index: int) -> str:
    """``\\nFrame from MM:SS:`` of frame ``index`` at :data:`VIDEO_FPS` (``SmolVLMProcessor.replace_video_token``)."""
    from transformers.models.smolvlm.processing_smolvlm import FRAME_TIMESTAMP_MESSAGE

    second = index / VIDEO_FPS
    return FRAME_TIMESTAMP_MESSAGE.format(timestamp=f"{int(second // 60):02d}:{int(second % 60):02d}")


def number_words(n: int) -> str:
    """English words of 0 ≤ n < 100 as ``num2words`` writes them (``sixty-four``); the video intro names
    the frame count (num2words is not installed here)."""
    ones = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
           "seventeen eighteen nineteen".split()
    tens = "twenty thirty forty fifty sixty seventy eighty ninety".split()
    if not 0 <= n < 100:
        raise ValueError(f"the reference SmolVLM videos hold fewer than 100 frames, not {n}")
    return ones[n] if n < 20 else tens[n // 10 - 2] + ("" if n % 10 == 0 else "-" + ones[n % 10])


def frame_tiles(processor, frames) -> dict[str, Tensor]:
    """``pixel_values`` [1, T, 3, s, s] and their ``pixel_attention_mask`` of frames uint8 [T, H, W, 3]:
    each frame one tile, not split."""
    from PIL import Image

    out = processor.image_processor([[Image.fromarray(f) for f in frames]], do_image_splitting=False, return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "pixel_attention_mask": out["pixel_attention_mask"]}


def videos(processor, prompts: list[str], clips) -> dict[str, Tensor]:
    """A batch of video prompts as ``SmolVLMProcessor.replace_video_token`` writes them (its video processor
    needs torchvision): the intro, every frame's time and tokens, the outro."""
    from datetime import timedelta

    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_MEDIA_OUTTRO, DEFAULT_VIDEO_INTRO

    texts, pixels, masks = [], [], []
    for text, clip in zip(prompts, clips):
        duration = str(timedelta(seconds=int((len(clip) - 1) / VIDEO_FPS)))
        intro = DEFAULT_VIDEO_INTRO.format(frame_count=number_words(len(clip)), video_duration=duration)
        frames = "".join(frame_label(i) + image_block(processor) for i in range(len(clip)))
        texts.append(text.replace("<video>", intro + frames + DEFAULT_MEDIA_OUTTRO, 1))
        tiles = frame_tiles(processor, clip)
        pixels.append(tiles["pixel_values"][0])
        masks.append(tiles["pixel_attention_mask"][0])
    out = dict(processor.tokenizer(texts, return_tensors="pt", padding=True))
    width = max(p.shape[0] for p in pixels)  # HF pads each row's frames with all-zero images
    out["pixel_values"] = torch.stack([torch.cat([p, p.new_zeros(width - p.shape[0], *p.shape[1:])]) for p in pixels])
    out["pixel_attention_mask"] = torch.stack([torch.cat([m, m.new_zeros(width - m.shape[0], *m.shape[1:])]) for m in masks])
    return out


def image_processor(size: int):
    """SmolVLM's splitting into tiles of ``size`` px (up to :data:`MAX_TILES` a side) and the global image,
    mean and std 0.5, PIL backend."""
    from transformers import SmolVLMImageProcessorPil

    return SmolVLMImageProcessorPil(do_image_splitting=True, size={"longest_edge": MAX_TILES * size},
                                    max_image_size={"longest_edge": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def assemble(tokenizer, images, image_size: int, video_size: int):
    from unittest import mock

    from transformers import SmolVLMProcessor

    # num2words (not installed) only spells the frame count of HF's own video prompts, which videos() writes; no
    # chat template: SmolVLMProcessor.apply_chat_template reads the video processor (the adapter's prompt serves)
    with mock.patch("transformers.models.smolvlm.processing_smolvlm.num2words", number_words):
        return lenient_construction(SmolVLMProcessor, image_processor=images, tokenizer=tokenizer, video_processor=None,
                                    image_seq_len=(image_size // 14 // 3) ** 2)


FORMAT = PromptFormat(
    arch="smolvlm", processor_class="SmolVLMProcessor", special=SPECIAL,
    tokens={"bos_token": "<|im_start|>", "eos_token": "<end_of_utterance>", "pad_token": "<|endoftext|>",
            "image_token": "<image>", "video_token": "<video>", "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"},
    prompt=lambda question, video: f"<|im_start|>User:{'<video>' if video else '<image>'}{question}<end_of_utterance>\nAssistant:",
    answer=lambda answer: f" {answer}<end_of_utterance>",
    follow_up=lambda question: f"\nUser: {question}<end_of_utterance>\nAssistant:",
    assemble=assemble, image_processor=image_processor, videos=videos, split_digits=True,
    words=("frame", "from", "you", "are", "provided", "following", "series", "of", "frames", "a", "video", "h", "mm", "ss",
           "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
           "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty", "thirty", "forty",
           "fifty", "sixty", "seventy", "eighty", "ninety", "-", "[", "]"),
)


@register
class SmolVLMAdapter(TiledAdapter):
    family = "smolvlm"
    model_classes = {"smolvlm": "SmolVLMForConditionalGeneration"}
    capabilities = frozenset({"vision_qk", "grids", "video", "stream", "frames", "export"})
    configs = {
        "tiny-smolvlm-random": NamedConfig(
            smolvlm_config, description="SmolVLM2, 4-layer SigLIP on 168 px tiles, 3×3 pixel shuffle, 3-layer Llama",
            processor=partial(reference_processor, "smolvlm", image_size=168), tasks={**RANDOM_MODEL_TASKS, "shapes": {"size": 168, "grid": 42}},
        ),
        "smolvlm2-2.2b-shape": NamedConfig(smolvlm2_22b_shape, image_grid=(2, 2),
                                           description="SmolVLM2-2.2B's depths, heads and tokens (a 2×2-tile image and the global one)",
                                           processor=partial(reference_processor, "smolvlm", image_size=384)),
    }
    prompt_format = FORMAT
    batch_keys = ("pixel_values", "pixel_attention_mask")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        vision = model.config.vision_config
        self.merge = model.config.scale_factor
        side = vision.image_size // vision.patch_size
        if side % self.merge:
            raise UnsupportedModelError(f"a {side}×{side} patch grid does not split into {self.merge}×{self.merge} blocks")
        self.grid = (side // self.merge, side // self.merge)

    @property
    def text_model(self) -> nn.Module:
        return self.model.model.text_model

    @property
    def tile_grid(self) -> tuple[int, int]:
        return self.grid

    def prefill_pipeline(self) -> nn.Module:
        return SmolVLMPrefill(self.model, self.decoder_view)

    def tile_pixels(self, batch: dict[str, Any]) -> Tensor | None:
        """The real tiles [N, 3, H, W] of ``pixel_values`` [B, N_max, 3, H, W] in the model's dtype (all-zero
        padding images dropped, as HF drops them after the same cast)."""
        pixels = batch.get("pixel_values")
        if pixels is None:
            return None
        flat = pixels.reshape(-1, *pixels.shape[-3:]).to(self.model.dtype)
        real = (flat == 0.0).sum(dim=(-1, -2, -3)) != flat.shape[1:].numel()
        return flat[real] if real.any() else None

    def extra_inputs(self, batch: dict[str, Any], input_ids: Tensor, tiles: Tensor | None) -> dict[str, Any]:
        """``patch_attention_mask`` [N, h, w]: the real tiles' patches that hold pixels, as HF derives it."""
        if tiles is None:
            return {}
        patch = self.model.config.vision_config.patch_size
        pixel_mask = batch.get("pixel_attention_mask")
        if pixel_mask is None:
            shape = (tiles.shape[0], tiles.shape[2] // patch, tiles.shape[3] // patch)
            return {"patch_attention_mask": torch.ones(shape, dtype=torch.bool, device=tiles.device)}
        flat = batch["pixel_values"].reshape(-1, *batch["pixel_values"].shape[-3:]).to(self.model.dtype)
        real = (flat == 0.0).sum(dim=(-1, -2, -3)) != flat.shape[1:].numel()
        mask = pixel_mask.reshape(-1, *pixel_mask.shape[-2:])[real]
        grid = mask.unfold(dimension=1, size=patch, step=patch).unfold(dimension=2, size=patch, step=patch)
        return {"patch_attention_mask": (grid.sum(dim=(-1, -2)) > 0).bool()}

    @property
    def feature_block(self) -> int:
        return self.vision_depth - 1

    def insert_vision_qk(self, editor, block: int, role: str = "attention_score") -> VisionQK:
        attention = self.model.model.vision_model.encoder.layers[block].self_attn
        return self.insert_merged_patch_qk(editor, block, role, attention, norm="layer_norm1", projections="self_attn")

    def frame_inputs(self, prompt, first: int, stop: int) -> dict[str, Any]:
        return {"pixel_values": prompt.inputs["pixel_values"][first:stop],
                "patch_attention_mask": prompt.inputs["patch_attention_mask"][first:stop]}

    def export_processor(self, processor: Any) -> Any:
        """A copy of ``processor`` that does not split images: an export takes one tile per image."""
        import copy

        exported = copy.copy(processor)
        exported.image_processor = copy.copy(processor.image_processor)
        exported.image_processor.do_image_splitting = False
        return exported

    def stream_planner(self, compiled, processor):
        def text(index: int) -> tuple[str, str]:
            block = image_block(processor)
            before, _, after = block.partition("<image>" * processor.image_seq_len)
            return frame_label(index) + before, after

        return TileStreamPlanner(compiled, processor, "<|im_start|>User:", "\n\n{question}<end_of_utterance>\nAssistant:",
                                 text, frame_tiles, system="<|im_start|>System: {system}<end_of_utterance>\n")

    def prompt_text(self, question: str) -> str:
        return FORMAT.prompt(question, False)

    @classmethod
    def synthetic_visual(cls, config, kind, grid, generator):
        """An image split into ``grid`` = (rows, columns) tiles plus the global image (default: the global
        image alone), or a video of ``grid[0]`` frames, each written as the processor writes it (the row /
        column tokens as random text ids, the frame times as random text)."""
        from vlmopt.configs import random_text_ids

        vision = config.vision_config
        per_tile = (vision.image_size // vision.patch_size // config.scale_factor) ** 2
        single = [FAKE, GLOBAL] + [config.image_token_id] * per_tile + [FAKE]
        if kind == "video":
            frames, ids = grid[0], random_text_ids(config, 6, generator)
            for _ in range(frames):
                ids += random_text_ids(config, 4, generator) + single
            tiles = frames
        else:
            rows, cols = grid or (0, 0)
            ids = []
            for _ in range(rows):
                for _ in range(cols):
                    ids += [FAKE] + random_text_ids(config, 1, generator) + [config.image_token_id] * per_tile
                ids += random_text_ids(config, 1, generator)
            ids += single
            tiles = rows * cols + 1
        side = vision.image_size
        return ids, {"pixel_values": torch.Size((tiles, 3, side, side))}

    @classmethod
    def synthetic_extras(cls, config, batch):
        """``pixel_values`` as the processor lays them out: [B, N_max, 3, H, W], each row's tiles then
        all-zero padding images."""
        vision = config.vision_config
        per_tile = (vision.image_size // vision.patch_size // config.scale_factor) ** 2
        tiles = [int(n) // per_tile for n in (batch["input_ids"] == config.image_token_id).sum(1)]
        flat = batch.get("pixel_values")
        if flat is None:
            return {}
        rows, start = [], 0
        for count in tiles:
            rows.append(torch.cat([flat[start : start + count], flat.new_zeros(max(tiles) - count, *flat.shape[1:])]))
            start += count
        return {"pixel_values": torch.stack(rows)}
