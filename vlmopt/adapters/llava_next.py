"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): any-resolution tiles → CLIP or SigLIP tower →
projector → unpadded high-resolution grid with a newline after each row → Llama / Mistral / Qwen2 LM.

Pipeline (prefill): each image's patches (the base image, then its best-fit tiles of
``image_grid_pinpoints``) as one tower batch → the vision layers up to the deepest feature layer →
feature select (CLIP's CLS dropped with the ``default`` strategy) → projector → ``pack_features``
(HF's ``pack_image_features``: base grid, tiles joined and unpadded, ``image_newline`` after each row,
with HF's float operations; :mod:`vlmopt.adapters.anyres`) → the tokens in layout order
(``pack_order``), each with its own sequence slot → ``vlmopt::merge_visual`` → LLM.

Visual tokens: every tower input is a frame of the layout — the base image and each tile (the part
of it the unpadding keeps) on its own grid; a row's newline is a structural token of the tile that
ends the row (kept outside every pass's budget, never scored). The LLM sees HF's sequence, and 1-D
RoPE ids exactly as HF makes them. CLIP with ``vision_feature_select_strategy='full'`` is refused: HF's
``pack_image_features`` cannot reshape a CLS token into the tile grid (it raises).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor, fx, nn

from vlmopt.adapters.anyres import PackPlan, pack_features, plan_image, plan_layout, tower_pixels
from vlmopt.adapters.base import NamedConfig, Prompt, register
from vlmopt.adapters.formats import PromptFormat
from vlmopt.adapters.llava import IMAGE_TOKEN, PAD_TOKEN, LlavaAdapter, LlavaPrefill
from vlmopt.errors import InputError, UnsupportedModelError
from vlmopt.graph.capture import mark, role

fx.wrap("tower_pixels")
fx.wrap("pack_features")

TEXT_MODELS = ("llama", "mistral", "qwen2")


def text_config(kind: str, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int, **ids):
    """A Llama, Mistral or Qwen2 LM config (Mistral without a sliding window, as LLaVA-NeXT-Mistral's)."""
    import transformers

    if kind not in TEXT_MODELS:
        raise ValueError(f"text model {kind!r}: choose one of {', '.join(TEXT_MODELS)}")
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config}[kind]
    extra = {"sliding_window": None} if kind == "mistral" else {}
    return cls(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
               num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=32768, **ids, **extra)


def tower_config(kind: str, image_size: int, patch_size: int, hidden: int, layers: int, heads: int, intermediate: int | None = None):
    """A CLIP or SigLIP vision config."""
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    cls = {"clip": CLIPVisionConfig, "siglip": SiglipVisionConfig}[kind]
    return cls(hidden_size=hidden, intermediate_size=intermediate or hidden * 4, num_hidden_layers=layers,
               num_attention_heads=heads, image_size=image_size, patch_size=patch_size)


def llava_next_config(
    tower: str = "clip", text: str = "llama", image_size: int = 56, patch_size: int = 14, vision_hidden: int = 32,
    vision_layers: int = 4, vision_heads: int = 4, text_hidden: int = 64, text_layers: int = 4, text_heads: int = 4,
    kv_heads: int = 2, vocab_size: int = 256, feature_layer: int | list[int] = -2, strategy: str | None = None,
    pinpoints: list[list[int]] | None = None, vision_intermediate: int | None = None, intermediate: int | None = None,
):
    """A LLaVA-NeXT config: tiles of ``image_size`` px (LLaVA-NeXT's pinpoints scaled to it by default),
    special ids of the word-level tokenizer (:mod:`vlmopt.reference.processing`)."""
    from transformers import LlavaNextConfig

    return LlavaNextConfig(
        vision_config=tower_config(tower, image_size, patch_size, vision_hidden, vision_layers, vision_heads, vision_intermediate),
        text_config=text_config(text, text_hidden, text_layers, text_heads, kv_heads, intermediate or text_hidden * 5 // 2,
                                vocab_size, pad_token_id=PAD_TOKEN, bos_token_id=1, eos_token_id=2),
        image_token_id=IMAGE_TOKEN, vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy or ("default" if tower == "clip" else "full"),
        image_grid_pinpoints=pinpoints or next_pinpoints(image_size),
    )


def llava_next_7b_shape(width: float = 1.0):
    """llava-v1.6-vicuna-7b's shape (HiPrune's LLaVA-NeXT-7B): CLIP ViT-L/14-336 (24 layers, features of
    layer −2) + Vicuna-7B (32 layers, 32 heads), tiles of 336 px on NeXT's five pinpoints."""
    from vlmopt.configs import scaled

    return llava_next_config(
        tower="clip", text="llama", image_size=336, patch_size=14, vision_hidden=scaled(1024, width, 16),
        vision_layers=24, vision_heads=16, vision_intermediate=scaled(4096, width, 16), text_hidden=scaled(4096, width, 64),
        text_layers=32, text_heads=32, kv_heads=32, intermediate=scaled(11008, width, 16), vocab_size=32064,
    )


def next_pinpoints(tile: int) -> list[list[int]]:
    """LLaVA-NeXT's ``image_grid_pinpoints`` (1×2, 2×1, 2×2, 3×1, 1×3 tiles) for tiles of ``tile`` px."""
    return [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile], [3 * tile, tile], [tile, 3 * tile]]


def tiled_processor(arch: str, config_of, image_size: int | None = None, video_size: int | None = None):
    """The word-level processor of a random tiled config, with its tile side, patch side, pinpoints and
    feature strategy (the tower fixes tile and frame sizes, so ``image_size`` / ``video_size`` are not used)."""
    from vlmopt.reference.processing import build_processor

    config = config_of()
    vision = config.vision_config
    settings = {"patch": vision.patch_size, "pinpoints": [list(p) for p in config.image_grid_pinpoints],
                "strategy": config.vision_feature_select_strategy}
    if hasattr(config, "vision_aspect_ratio"):
        settings["aspect_ratio"] = config.vision_aspect_ratio
    return build_processor(arch, vision.image_size, vision.image_size, **settings)


def next_images(tile: int):
    """LLaVA-NeXT's image processor (PIL backend) for tiles of ``tile`` px: base image and best-fit tiles."""
    from transformers import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
                                      image_grid_pinpoints=next_pinpoints(tile))


def next_processor(tokenizer, images, image_size: int, video_size: int, patch: int = 14, pinpoints=None, strategy: str = "default"):
    """``LlavaNextProcessor`` (``image_size`` the tile side; ``strategy="default"`` drops CLIP's CLS token)."""
    from transformers import LlavaNextProcessor

    from vlmopt.reference.processing import LLAVA_CHAT_TEMPLATE

    if pinpoints:
        images.image_grid_pinpoints = pinpoints
    return LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy=strategy,
                              num_additional_image_tokens=int(strategy == "default"), chat_template=LLAVA_CHAT_TEMPLATE)


FORMAT = PromptFormat(
    arch="llava_next", processor_class="LlavaNextProcessor", special=("<pad>", "<s>", "</s>", "<unk>", "<image>"),
    tokens={"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "image_token": "<image>"},
    prompt=lambda question, video: f"USER: <image>\n{question} ASSISTANT:", answer=lambda answer: f" {answer}</s>",
    follow_up=lambda question: f"USER: {question} ASSISTANT:", assemble=next_processor, image_processor=next_images,
    bos="<s>", names=("llava_next", "llava_v1.6"),
)
"""LLaVA's prompts and special ids (``PAD_TOKEN``, ``IMAGE_TOKEN``) with LLaVA-NeXT's tiles."""


class TiledPrefill(LlavaPrefill):
    """Prefill with any-resolution images, calling the HF LLaVA-NeXT / OneVision submodules as leaves."""

    def __init__(self, model: nn.Module, feature_layers: list[int], drop_cls: bool, view) -> None:
        super().__init__(model, feature_layers, drop_cls, view)
        self.image_newline = model.model.image_newline

    def visual(self, pixel_values, pixel_values_videos, visual_positions, tiles, pack_order):
        """(tokens [T, D] in layout order, their flat sequence slots [T])."""
        with role("vision_input"):
            pixels = tower_pixels(pixel_values, pixel_values_videos, tiles)
        features = self.tower_features(pixels)
        with role("projector"):
            projected = self.projector(features)
        with role("visual_pack"):
            packed = pack_features(projected, self.image_newline, tiles)
            slots = visual_positions.index_select(0, pack_order)
        with role("visual_tokens"):
            tokens = packed.index_select(0, pack_order)
        return tokens, slots

    def merged(self, input_ids, attention_mask, position_ids, tokens, slots, cache, logits_to_keep):
        with role("embed"):
            embeds = self.embed_tokens(input_ids)
        with role("merge"):
            embeds = mark(torch.ops.vlmopt.merge_visual(embeds, tokens, slots), seq_dim=(0, 1))
        return self.llm(embeds, attention_mask, position_ids, cache, logits_to_keep)

    def forward(self, input_ids, pixel_values, attention_mask, position_ids, visual_positions, layout, tiles, pack_order,
                tower_layout, tower_index, cache, logits_to_keep):
        self.mark_text_inputs(input_ids, attention_mask, position_ids)
        tokens, slots = self.visual(pixel_values, None, visual_positions, tiles, pack_order)
        return self.merged(input_ids, attention_mask, position_ids, tokens, slots, cache, logits_to_keep)


@register
class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"
    model_classes = {"llava_next": "LlavaNextForConditionalGeneration"}
    capabilities = frozenset({"vision_qk", "grids", "export"})
    lacks = {
        "video": "the family takes images only",
        "stream": "the family takes images only: there is no video to stream",
        "frames": "an image's tiles are packed together (joined, unpadded, resampled, newlines added), not "
                  "encoded apart",
    }
    prompt_format = FORMAT
    paper_settings = {
        # HiPrune's LLaVA-NeXT scripts: object layer 9 of CLIP ViT-L's 24, a budget per crop (base image included).
        "hiprune": {"object_layer": (9, 24)},
        # HalfV's llava-v1.6-mistral-7b schedule (README): attn 0.1, ivr layer 2, keep 0.5, ssr layer 16; layer inactivity.
        "halfv": {"ivr_layer": (2, 32), "ssr_layer": (16, 32), "ivr_keep": 0.5, "anchor_frac": 0.1, "saturation": "inactive_rows"},
    }
    configs = {
        "tiny-llava-next-random": NamedConfig(
            llava_next_config, description="LLaVA-NeXT, CLIP tower on 56 px tiles, 4-layer Llama (random weights)",
            processor=partial(tiled_processor, "llava_next", llava_next_config), tasks={"shapes": {"size": 112, "grid": 14}},
        ),
        "llava-next-7b-shape": NamedConfig(
            llava_next_7b_shape, image_grid=(48, 48),
            description="llava-v1.6-vicuna-7b's depths, heads and tokens (a 672 px image: base + 2×2 tiles)",
        ),
    }
    batch_keys = ("pixel_values", "image_sizes")
    tower_frames_input = "tower_layout"
    tower_order_input = "tower_index"
    aspect_ratio: str | None = None
    """OneVision's ``anyres_max_N`` (None: no resampling, LLaVA-NeXT)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        if self.leading_tokens:
            raise UnsupportedModelError(
                f"{type(model).__name__} with a CLIP tower and vision_feature_select_strategy='full' cannot run in HF "
                "either: pack_image_features reshapes every tile's features, CLS included, into the tile grid and fails; "
                "use the 'default' strategy (CLS dropped) or a SigLIP tower"
            )
        vision = model.config.vision_config
        self.tile, self.patch = vision.image_size, vision.patch_size

    @property
    def structural_tokens(self) -> bool:
        return True

    def prefill_pipeline(self) -> nn.Module:
        return TiledPrefill(self.model, self.feature_layers, self.drop_cls, self.decoder_view)

    def frame_tokens(self, prompt: Prompt) -> list[int]:
        raise UnsupportedModelError(
            f"{type(self.model).__name__} cannot encode frames apart: an image's tiles are packed together (joined, unpadded, "
            "resampled, newlines added), so APB-V's frame-parallel tower under torchrun is not available; APB-V without a "
            "process group (one process simulating the hosts) runs"
        )

    def frame_inputs(self, prompt: Prompt, first: int, stop: int) -> dict[str, Any]:
        return self.frame_tokens(prompt)

    def stream_planner(self, compiled, processor):
        raise UnsupportedModelError(f"{type(self.model).__name__} takes images only; stream a video with LLaVA-OneVision")

    # ----- planning -------------------------------------------------------------------------
    def plan_images(self, batch: dict[str, Any], count: int) -> tuple:
        """The :class:`~vlmopt.adapters.anyres.TiledImage` of every image of ``batch`` (HF's rules)."""
        sizes = batch.get("image_sizes")
        if sizes is None or sizes.shape != (count, 2):
            raise InputError(
                f"{count} image(s) need image_sizes [{count}, 2] (each image's height and width before the processor "
                f"resized it), got {None if sizes is None else tuple(sizes.shape)}; pass the processor's outputs"
            )
        patched = self.patched(batch, count)
        config = self.model.config
        return tuple(plan_image(sizes[i].tolist(), config.image_grid_pinpoints, self.tile, self.grid_size, self.aspect_ratio, patched[i])
                     for i in range(count))

    def patched(self, batch: dict[str, Any], count: int) -> list[bool]:
        """Is each image cut into tiles? (Always, for LLaVA-NeXT.)"""
        return [True] * count

    def plan(self, batch: dict[str, Any], for_generation: bool) -> Prompt:
        return self.plan_tiled(batch, for_generation)

    def plan_tiled(self, batch: dict[str, Any], for_generation: bool, closing: bool = True) -> Prompt:
        """:meth:`plan`; ``closing=False``: the videos end without their newline (a stream's chunk)."""
        input_ids: Tensor = batch["input_ids"]
        attention_mask = self.attention_mask_of(input_ids, batch.get("attention_mask"))
        size, seq_len = input_ids.shape
        position_ids = self.text_positions(batch, attention_mask, for_generation)
        next_position = position_ids[:, -1:] + 1
        config = self.model.config
        pixel_values, videos = batch.get("pixel_values"), batch.get("pixel_values_videos")
        image_slots = self.slots_of(input_ids == config.image_token_id)
        video_id = getattr(config, "video_token_id", None)
        video_slots = self.slots_of(input_ids == video_id) if video_id is not None else image_slots[:0]
        images = 0 if pixel_values is None else pixel_values.shape[0]
        if images == 0 and videos is None:
            if image_slots.numel() or video_slots.numel():
                raise InputError(f"the prompt has {image_slots.numel() + video_slots.numel()} image/video tokens but no pixel_values")
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
            return Prompt("prefill_text", inputs, next_position)
        tiles = PackPlan(self.grid_size, self.plan_images(batch, images) if images else (),
                         *(videos.shape[:2] if videos is not None else (0, 0)), closing=closing)
        if pixel_values is not None and pixel_values.dim() == 4 and pixel_values.shape[0] != sum(i.patches for i in tiles.images):
            raise InputError(f"pixel_values holds {pixel_values.shape[0]} patches; the images' sizes give "
                             f"{sum(i.patches for i in tiles.images)} (base image and tiles)")
        counts = [image.tokens(self.grid_size) for image in tiles.images]
        video_tokens = tiles.frames * tiles.pooled**2 + int(closing)
        counts += [video_tokens] * tiles.videos
        for kind, slots, total in (("image", image_slots, sum(counts[:images])), ("video", video_slots, video_tokens * tiles.videos)):
            if slots.numel() != total:
                raise InputError(
                    f"the prompt has {slots.numel()} {kind} tokens, but the {kind}s give {total} features (base image, "
                    "unpadded tiles and a newline per row for an image; pooled frames and a newline for a video); build "
                    "inputs with the model's processor (its image_grid_pinpoints and tile size must be the model's)"
                )
        slots = torch.cat([image_slots, video_slots])
        starts = [0, *torch.tensor(counts).cumsum(0).tolist()]
        rows = [int(slots[start]) // seq_len for start in starts[:-1]]
        if any(int(slots[stop - 1]) // seq_len != row for row, stop in zip(rows, starts[1:])):
            raise InputError("an image's or video's tokens span two rows of the batch; build inputs with the model's processor")
        planned = plan_layout(tiles, rows, size, seq_len, slots.device)
        inputs = {
            "input_ids": input_ids, "pixel_values": pixel_values, "attention_mask": attention_mask,
            "position_ids": position_ids, "visual_positions": slots, "layout": planned.layout, "tiles": tiles,
            "pack_order": planned.pack_order, "tower_layout": planned.tower_layout, "tower_index": planned.tower_index,
        }
        return Prompt("prefill", self.with_videos(inputs, videos), next_position, planned.layout, {"tiles": tiles})

    def with_videos(self, inputs: dict[str, Any], videos: Tensor | None) -> dict[str, Any]:
        """The graph inputs with the batch's videos (LLaVA-NeXT takes none)."""
        return inputs

    # ----- export, tools, synthetic inputs ------------------------------------------------------
    def export_image_size(self, processor: Any, requested: int | None) -> int:
        from vlmopt.export.errors import ExportError

        size = 2 * self.tile if requested is None else requested
        if size < self.patch or size % self.patch:
            raise ExportError(f"image_size={size}: an export of {type(self.model).__name__} takes a square image whose side "
                              f"is a multiple of the {self.patch} px patch (default {2 * self.tile}: the base image and 2×2 tiles)")
        return size

    def export_image_grid(self, image_size: int) -> tuple[int, int]:
        return image_size // self.patch, image_size // self.patch

    def pixel_frames(self, batch: dict[str, Any]) -> list:
        """The base image [H, W, 3] of each image of a batch (for ``vlmopt viz``)."""
        pixels = batch["pixel_values"]
        return [p[0].float().numpy().transpose(1, 2, 0) for p in pixels] if pixels.dim() == 5 else super().pixel_frames(batch)

    @classmethod
    def synthetic_visual(cls, config, kind, grid, generator):
        """An image of ``grid`` (h, w) patches (default: 2×2 tiles' worth), as many tokens as HF packs."""
        if kind != "image":
            raise UnsupportedModelError(f"{config.model_type} takes images only; pass no video grids")
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        height, width = (h * vision.patch_size for h in (grid or (2 * side, 2 * side)))
        image = plan_image((height, width), config.image_grid_pinpoints, vision.image_size, side,
                           getattr(config, "vision_aspect_ratio", None), True)
        pixels = torch.Size((1, image.patches, 3, vision.image_size, vision.image_size))
        return [config.image_token_id] * image.tokens(side), {"pixel_values": pixels, "image_sizes": torch.tensor([[height, width]])}

    def prompt_text(self, question: str) -> str:
        return FORMAT.prompt(question, False)
