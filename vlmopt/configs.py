"""Model configs vlmopt builds without downloads, and processor-like inputs for them.

* ``tiny-*``: a few layers, tiny widths — tests and the demo (random weights, < 0.1 s to build).
* ``*-shape``: the depth, heads and token counts of LLaVA-1.5-7B and Qwen2.5-VL-7B; ``width`` scales
  the hidden sizes down so the model runs on a CPU (``width=1.0`` is the real model, used for FLOPs
  on fake tensors).

:func:`synthetic_batch` makes what a processor would return for such a model (token ids with the
image placeholders expanded, pixels, masks with left padding), from a seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vlmopt.errors import InputError

IMAGE_TOKEN = 5
VIDEO_TOKEN = 6
VISION_START = 7
VISION_END = 8
PAD_TOKEN = 0
FIRST_TEXT_TOKEN = 10


def _scaled(size: int, width: float, multiple: int) -> int:
    return max(multiple, int(round(size * width / multiple)) * multiple)


def llava_config(
    tower: str = "clip",
    image_size: int = 56,
    patch_size: int = 14,
    vision_hidden: int = 32,
    vision_layers: int = 4,
    vision_heads: int = 4,
    text_hidden: int = 64,
    text_layers: int = 3,
    text_heads: int = 4,
    kv_heads: int = 2,
    vocab_size: int = 256,
    feature_layer: int | list[int] = -2,
    strategy: str | None = None,
):
    """A LLaVA config (CLIP or SigLIP tower, Llama LM)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, SiglipVisionConfig

    tower_cls = {"clip": CLIPVisionConfig, "siglip": SiglipVisionConfig}[tower]
    vision = tower_cls(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 4,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
    )
    text = LlamaConfig(
        hidden_size=text_hidden,
        intermediate_size=text_hidden * 2 + text_hidden // 2,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab_size,
        max_position_embeddings=4096,
        pad_token_id=PAD_TOKEN,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy or ("default" if tower == "clip" else "full"),
    )


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

    half = text_hidden // text_heads // 2
    section = [half // 4, (half - half // 4) // 2]
    section.append(half - sum(section))
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
            rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 1000000.0},
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=PAD_TOKEN,
        ),
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=PAD_TOKEN,
    )


def llava_15_7b_shape(width: float = 1.0):
    """LLaVA-1.5-7B's shape: CLIP ViT-L/14-336 (24 layers, 576 tokens) + Vicuna-7B (32 layers)."""
    return llava_config(
        tower="clip",
        image_size=336,
        patch_size=14,
        vision_hidden=_scaled(1024, width, 16),
        vision_layers=24,
        vision_heads=16,
        text_hidden=_scaled(4096, width, 64),  # head dim stays even (rotary)
        text_layers=32,
        text_heads=32,
        kv_heads=32,
        vocab_size=32064,
    )


def qwen25vl_7b_shape(width: float = 1.0):
    """Qwen2.5-VL-7B's shape: 32-block windowed ViT (full attention at 7/15/23/31) + 28-layer LM."""
    config = qwen25vl_config(
        vision_depth=32,
        vision_hidden=_scaled(1280, width, 64),  # vision head dim stays a multiple of 4 (2-D rotary)
        vision_heads=16,
        full_attention_blocks=(7, 15, 23, 31),
        text_hidden=_scaled(3584, width, 28 * 2),
        text_layers=28,
        text_heads=28,
        kv_heads=4,
        intermediate=_scaled(18944, width, 32),
        vision_intermediate=_scaled(3420, width, 4),
        vocab_size=152064,
        window_size=112,
    )
    return config


#: Configs by name (random weights). Reference models trained by the project have other names.
CONFIGS = {
    "tiny-llava-random": lambda: llava_config(),
    "tiny-llava-siglip-random": lambda: llava_config(tower="siglip"),
    "tiny-qwen25vl-random": lambda: qwen25vl_config(),
    "llava-1.5-7b-shape": llava_15_7b_shape,
    "qwen2.5-vl-7b-shape": qwen25vl_7b_shape,
}


def build(config, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> nn.Module:
    """A model of ``config`` with seeded random weights, in eval mode (``device="meta"``: no memory)."""
    from transformers import LlavaForConditionalGeneration, Qwen2_5_VLForConditionalGeneration

    cls = LlavaForConditionalGeneration if config.model_type == "llava" else Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls(config)
    return model.to(dtype).eval()


@dataclass
class PromptSpec:
    """One synthetic prompt: text lengths around the visual inputs."""

    images: int = 1
    """Images in this prompt."""
    text_before: int = 4
    """Text tokens before the first image."""
    text_after: int = 8
    """Text tokens after the last image (the "question")."""


def synthetic_batch(
    model: nn.Module,
    prompts: list[PromptSpec] | None = None,
    image_grids: list[tuple[int, int]] | None = None,
    video_grids: list[tuple[int, int, int]] | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Processor-like inputs for ``model``: left-padded ids with expanded placeholders, pixels, masks.

    For Qwen2.5-VL, ``image_grids`` are the (h, w) patch grids of the images in order (default 8×8
    each) and ``video_grids`` (t, h, w) grids, one video appended to the last prompt each.
    """
    generator = torch.Generator().manual_seed(seed)
    prompts = prompts or [PromptSpec()]
    config = model.config
    vocab = config.get_text_config().vocab_size
    qwen = config.model_type == "qwen2_5_vl"
    total_images = sum(p.images for p in prompts)
    if qwen:
        image_grids = image_grids or [(8, 8)] * total_images
        if len(image_grids) != total_images:
            raise InputError(f"{len(image_grids)} image grids for {total_images} images")
        merge = config.vision_config.spatial_merge_size
        image_tokens = [h * w // merge**2 for h, w in image_grids]
    else:
        size = config.vision_config.image_size // config.vision_config.patch_size
        per_image = size * size + (1 if config.vision_feature_select_strategy == "full" and config.vision_config.model_type == "clip_vision_model" else 0)
        image_tokens = [per_image] * total_images
    video_grids = video_grids or []

    def text(n: int) -> list[int]:
        return torch.randint(FIRST_TEXT_TOKEN, vocab, (n,), generator=generator).tolist()

    def visual(n: int, token: int) -> list[int]:
        return ([VISION_START] + [token] * n + [VISION_END]) if qwen else [token] * n

    rows, image_iter = [], iter(image_tokens)
    for index, spec in enumerate(prompts):
        ids = text(spec.text_before)
        for _ in range(spec.images):
            ids += visual(next(image_iter), IMAGE_TOKEN) + text(2)
        if index == len(prompts) - 1:
            for t, h, w in video_grids:
                ids += visual(t // 2 * h * w // 4, VIDEO_TOKEN) + text(2)
        rows.append(ids + text(spec.text_after))
    length = max(len(r) for r in rows)
    input_ids = torch.tensor([[PAD_TOKEN] * (length - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if qwen:
        patch = config.vision_config.in_channels * config.vision_config.temporal_patch_size * config.vision_config.patch_size**2
        if total_images:
            grid = torch.tensor([[1, h, w] for h, w in image_grids])
            batch["image_grid_thw"] = grid
            batch["pixel_values"] = torch.randn(int(grid.prod(-1).sum()), patch, generator=generator)
        if video_grids:
            grid = torch.tensor([[t // 2, h, w] for t, h, w in video_grids])
            batch["video_grid_thw"] = grid
            batch["pixel_values_videos"] = torch.randn(int(grid.prod(-1).sum()), patch, generator=generator)
        types = torch.zeros_like(input_ids, dtype=torch.int)
        types[input_ids == IMAGE_TOKEN] = 1
        types[input_ids == VIDEO_TOKEN] = 2
        batch["mm_token_type_ids"] = types
    elif total_images:
        side = config.vision_config.image_size
        batch["pixel_values"] = torch.randn(total_images, 3, side, side, generator=generator)
    return batch
