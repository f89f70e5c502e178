"""InternVL (``InternVLForConditionalGeneration``: InternVL3 with a Qwen2 LM, InternVL3.5 with a Qwen3 LM):
InternViT → pixel shuffle → MLP projector → LM.

Pipeline (prefill): patch + position embeddings with a CLS token → InternViT layers (layer scale, an
optional q/k norm) → the feature layer (the tower's final norm for the last one) → CLS dropped →
pixel shuffle (each 2×2 block of patches becomes one token of 4× the channels, ``downsample_ratio``
0.5) → flat visual tokens [T, 4·Dv] → projector (LayerNorm, MLP) → token embedding →
``vlmopt::merge_visual`` → LLM.

Tiles: the processor cuts an image into best-fit tiles plus a thumbnail (one tile when the image is
one tile); every tile is ``<IMG_CONTEXT>`` × 256 (at 448 px) inside the image's ``<img>`` … ``</img>``
text. A video is its frames, each ``Frame{i}: <img>…</img>``, frames joined by a newline. Each tile
or frame is one visual input of the layout (see :mod:`vlmopt.adapters.tiles`); the wrapper and frame
labels are text. HiPrune scores a tile's tokens by the attention its 2×2 patches receive (CLS a
query, never a candidate), averaged over the four.

Streams: every frame is written as the one-shot prompt writes it (``Frame{i}: <img>…</img>``, the
newline between frames, the question after ``\\n``), so a stream without a pass equals the one-shot
prefill; positions are 1-D and count on.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, fx, nn

from vlmopt.adapters.base import NamedConfig, TextPipeline, VisionQK, register
from vlmopt.adapters.formats import PromptFormat, lenient_construction
from vlmopt.adapters.layer_view import DecoderLayerView
from vlmopt.adapters.llava import reference_processor
from vlmopt.adapters.qwen2_5_vl import RANDOM_MODEL_TASKS
from vlmopt.adapters.tiles import TiledAdapter, TileStreamPlanner
from vlmopt.errors import UnsupportedModelError
from vlmopt.graph.capture import mark, role

SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>", "<unk>")
PAD, EOS, IMG_START, IMG_END, IMG_CONTEXT, VIDEO = 0, 2, 3, 4, 5, 6
"""Token ids of the random-weight configs: those of the word-level tokenizer built for them (:data:`FORMAT`)."""
MAX_TILES = 4
"""Most crops the reference processor cuts an image into (a thumbnail is added to more than one)."""
USER, ASSISTANT = "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"


def frame_text(index: int) -> tuple[str, str]:
    """The text around frame ``index``'s tokens in a video prompt (``InternVLProcessor.replace_video_token``)."""
    return f"{chr(10) if index else ''}Frame{index + 1}: <img>", "</img>"


def frame_tiles(processor, frames) -> dict[str, Tensor]:
    """``pixel_values`` [T, 3, s, s] of frames uint8 [T, H, W, 3]: one tile each (no crops)."""
    from PIL import Image

    images = [Image.fromarray(frame) for frame in frames]
    return {"pixel_values": processor.image_processor(images, crop_to_patches=False, return_tensors="pt")["pixel_values"]}


def videos(processor, prompts: list[str], clips) -> dict[str, Tensor]:
    """A batch of video prompts as ``InternVLProcessor`` writes them (its video processor needs torchvision)."""
    per_tile = processor.image_seq_length * "<IMG_CONTEXT>"
    texts = []
    for text, clip in zip(prompts, clips):
        labels = [frame_text(i) for i in range(len(clip))]
        texts.append(text.replace("<video>", "".join(before + per_tile + after for before, after in labels), 1))
    out = dict(processor.tokenizer(texts, return_tensors="pt", padding=True))
    out["pixel_values"] = torch.cat([frame_tiles(processor, clip)["pixel_values"] for clip in clips])
    return out


def image_processor(size: int):
    """InternVL's tiling (best-fit crops of ``size`` px and a thumbnail), ImageNet normalisation, PIL backend."""
    from transformers import GotOcr2ImageProcessorPil
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    return GotOcr2ImageProcessorPil(size={"height": size, "width": size}, crop_to_patches=True, min_patches=1,
                                    max_patches=MAX_TILES, image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD)


def assemble(tokenizer, images, image_size: int, video_size: int):
    from transformers import InternVLProcessor

    return lenient_construction(InternVLProcessor, image_processor=images, tokenizer=tokenizer, video_processor=None,
                                image_seq_length=(image_size // 28) ** 2, chat_template=CHAT_TEMPLATE)


CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif c['type'] == 'video' %}<video>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
FORMAT = PromptFormat(
    arch="internvl", processor_class="InternVLProcessor", special=SPECIAL,
    tokens={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "start_image_token": "<img>", "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
    prompt=lambda question, video: f"{USER}{'<video>' if video else '<IMG_CONTEXT>'}\n{question}{ASSISTANT}",
    answer=lambda answer: f"{answer}<|im_end|>",
    follow_up=lambda question: f"\n{USER}{question}{ASSISTANT}",
    assemble=assemble, image_processor=image_processor, videos=videos, words=("frame",), split_digits=True,
)


def internvl_config(
    lm: str = "qwen3",
    image_size: int = 112,
    vision_hidden: int = 32,
    vision_layers: int = 4,
    vision_heads: int = 4,
    vision_intermediate: int | None = None,
    qk_norm: bool = True,
    text_hidden: int = 64,
    text_layers: int = 3,
    text_heads: int = 4,
    kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate: int | None = None,
    vocab_size: int = 256,
):
    """An InternVL config: a Qwen3 LM (``lm="qwen3"``, InternVL3.5) or Qwen2 (``"qwen2"``, InternVL3);
    ``qk_norm`` with RMS norms as InternViT-6B has them, else layer norms as InternViT-300M."""
    from transformers import InternVLConfig

    text = dict(
        model_type=lm, hidden_size=text_hidden, intermediate_size=intermediate or text_hidden * 2,
        num_hidden_layers=text_layers, num_attention_heads=text_heads, num_key_value_heads=kv_heads,
        vocab_size=vocab_size, max_position_embeddings=32768, pad_token_id=PAD, bos_token_id=None, eos_token_id=EOS,
    )
    if lm == "qwen3":
        text["head_dim"] = head_dim or text_hidden // text_heads
    vision = dict(
        hidden_size=vision_hidden, num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
        intermediate_size=vision_intermediate or vision_hidden * 4, image_size=image_size, patch_size=14,
        use_qk_norm=qk_norm, norm_type="rms_norm" if qk_norm else "layer_norm",
    )
    return InternVLConfig(vision_config=vision, text_config=text, image_token_id=IMG_CONTEXT, downsample_ratio=0.5,
                          image_seq_length=(image_size // 28) ** 2, eos_token_id=EOS, pad_token_id=PAD)


def internvl35_8b_shape(width: float = 1.0):
    """InternVL3.5-8B's shape: InternViT-300M (24 layers, 448 px tiles → 256 tokens) + Qwen3-8B (36
    layers, 32 heads, 8 KV heads, head dim 128)."""
    from vlmopt.configs import scaled

    return internvl_config(
        lm="qwen3", image_size=448, vision_hidden=scaled(1024, width, 16), vision_layers=24, vision_heads=16,
        vision_intermediate=scaled(4096, width, 4), qk_norm=False, text_hidden=scaled(4096, width, 64), text_layers=36,
        text_heads=32, kv_heads=8, head_dim=max(2, scaled(128, width, 2)), intermediate=scaled(12288, width, 32),
        vocab_size=151936,
    )


def pixel_shuffle(features: Tensor, scale: float) -> Tensor:
    """[N, P, C] tower features (P = side², raster order) → [N, P·scale², C / scale²] with each
    (1/scale)² block of patches one token, exactly as ``InternVLModel.pixel_shuffle`` orders channels."""
    batch, patches, channels = features.shape
    side = int(patches**0.5)
    x = features.reshape(batch, side, side, -1)
    x = x.view(batch, side, int(side * scale), int(channels / scale))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(batch, int(side * scale), int(side * scale), int(channels / (scale**2)))
    x = x.permute(0, 2, 1, 3).contiguous()
    return x.reshape(batch, -1, x.shape[-1])


fx.wrap("pixel_shuffle")  # one graph node, as the pipeline reads it


class InternVLPrefill(TextPipeline):
    """Prefill with tiles, calling the HF InternVL submodules as leaves."""

    def __init__(self, model: nn.Module, feature_layer: int, view: DecoderLayerView) -> None:
        inner = model.model
        super().__init__(inner.language_model, model.lm_head, (0, 1), view)
        tower = inner.vision_tower
        depth = tower.config.num_hidden_layers
        self.vision_embeddings = tower.embeddings
        self.vision_layers = nn.ModuleList(tower.encoder.layer[: feature_layer or depth])
        self.vision_norm = tower.layernorm if feature_layer == 0 else None
        self.projector = inner.multi_modal_projector
        self.drop_cls = model.config.vision_feature_select_strategy == "default"
        self.scale = model.config.downsample_ratio

    def forward(self, input_ids, pixel_values, attention_mask, position_ids, visual_positions, layout, cache, logits_to_keep):
        self.mark_text_inputs(input_ids, attention_mask, position_ids)
        with role("vision_embed"):
            hidden = self.vision_embeddings(pixel_values)
        for index, layer in enumerate(self.vision_layers):
            with role("vision_block", index):
                hidden = layer(hidden)
        if self.vision_norm is not None:
            with role("vision_norm"):
                hidden = self.vision_norm(hidden)
        with role("feature_select"):
            features = pixel_shuffle(hidden[:, 1:] if self.drop_cls else hidden, self.scale)
        with role("visual_tokens"):
            tokens = features.flatten(0, 1)
        with role("projector"):
            projected = self.projector(tokens)
        with role("embed"):
            embeds = self.embed_tokens(input_ids)
        with role("merge"):
            embeds = mark(torch.ops.vlmopt.merge_visual(embeds, projected, visual_positions), seq_dim=(0, 1))
        return self.llm(embeds, attention_mask, position_ids, cache, logits_to_keep)


@register
class InternVLAdapter(TiledAdapter):
    family = "internvl"
    model_classes = {"internvl": "InternVLForConditionalGeneration"}
    capabilities = frozenset({"vision_qk", "grids", "video", "stream", "frames", "export"})
    # No method's paper gives InternVL settings: each pass takes its depth-scaled default (HalfV's is the
    # Qwen-LM schedule, which fits InternVL's Qwen2 / Qwen3 LMs).
    configs = {
        "tiny-internvl-random": NamedConfig(
            internvl_config, description="InternVL3.5 (Qwen3 LM), 4-layer InternViT with q/k norm, 112 px tiles",
            processor=partial(reference_processor, "internvl", image_size=112), tasks=RANDOM_MODEL_TASKS,
        ),
        "internvl3.5-8b-shape": NamedConfig(internvl35_8b_shape, image_grid=(2, 2),
                                            description="InternVL3.5-8B's depths, heads and tokens (a 2×2-tile image and its thumbnail)",
                                            processor=partial(reference_processor, "internvl", image_size=448)),
    }
    prompt_format = FORMAT

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        config = model.config
        tower = model.model.vision_tower.config
        if config.downsample_ratio != 0.5:
            raise UnsupportedModelError(f"vlmopt's InternVL adapter reads a 2×2 pixel shuffle (downsample_ratio 0.5), "
                                        f"not {config.downsample_ratio}")
        layer = config.vision_feature_layer
        if not isinstance(layer, int) or not -(tower.num_hidden_layers + 1) <= layer <= tower.num_hidden_layers:
            raise UnsupportedModelError(f"vision_feature_layer {layer!r} is not one layer of the tower's {tower.num_hidden_layers}")
        # 0: the tower's output after its final norm (-1); k > 0: the output of layer k (HF's hidden_states[k])
        self.feature_layer = 0 if layer == -1 else layer % (tower.num_hidden_layers + 1)
        self.merge = 2
        side = tower.image_size[0] // tower.patch_size[0]
        self.grid = (side // self.merge, side // self.merge)

    @property
    def decoder_view(self) -> DecoderLayerView:
        attention = self.text_model.layers[0].self_attn
        if hasattr(attention, "q_norm"):  # Qwen3 (InternVL3.5)
            return DecoderLayerView(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm")
        return DecoderLayerView()

    @property
    def text_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def tile_grid(self) -> tuple[int, int]:
        return self.grid

    def prefill_pipeline(self) -> nn.Module:
        return InternVLPrefill(self.model, self.feature_layer, self.decoder_view)

    @property
    def feature_block(self) -> int:
        return (self.feature_layer or self.vision_depth) - 1

    def insert_vision_qk(self, editor, block: int, role: str = "attention_score") -> VisionQK:
        attention = self.model.model.vision_tower.encoder.layer[block].attention
        return self.insert_merged_patch_qk(editor, block, role, attention, norm="layernorm_before", projections="attention",
                                           head_norms=True, leading=1)

    def stream_planner(self, compiled, processor):
        system = "<|im_start|>system\n{system}<|im_end|>\n"
        return TileStreamPlanner(compiled, processor, USER, "\n{question}" + ASSISTANT, frame_text, frame_tiles,
                                 system=system)

    def prompt_text(self, question: str) -> str:
        return FORMAT.prompt(question, False)

    @classmethod
    def synthetic_visual(cls, config, kind, grid, generator):
        """An image of ``grid`` = (rows, columns) tiles (default one tile; more than one adds the
        thumbnail), as ``<img>`` + the tiles' tokens + ``</img>``; a video of ``grid[0]`` frames, each
        ``Frame{i}: <img>…</img>`` (the label as two random text tokens), joined by a random token."""
        from vlmopt.configs import random_text_ids

        vision = config.vision_config
        side = vision.image_size[0]
        per_tile = (side // vision.patch_size[0] // 2) ** 2
        if kind == "image":
            rows, cols = grid or (1, 1)
            tiles = rows * cols + (rows * cols > 1)
            ids = [IMG_START] + [config.image_token_id] * (per_tile * tiles) + [IMG_END]
        else:
            tiles, ids = grid[0], []
            for frame in range(tiles):
                ids += (random_text_ids(config, 1, generator) if frame else []) + random_text_ids(config, 2, generator)
                ids += [IMG_START] + [config.image_token_id] * per_tile + [IMG_END]
        return ids, {"pixel_values": torch.Size((tiles, 3, side, side))}
