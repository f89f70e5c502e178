"""LLaVA (``LlavaForConditionalGeneration``): CLIP or SigLIP tower → projector → Llama-family LM.

Pipeline (prefill): patch embeddings → [pre-norm] → the vision layers up to the deepest feature
layer (HF runs them all; the later ones cannot change the output) → feature select (drop CLS for
the ``default`` strategy, concatenate several layers for a list) → flat visual tokens [T, Dv] →
projector → token embedding → ``vlmopt::merge_visual`` → LLM.

Visual tokens: one image is ``(image_size / patch_size)²`` tokens on a square grid (``+1`` CLS and
a leading CLS token before the grid with the ``full`` strategy and a CLIP tower). Positions are 1-D
RoPE ids [B, S]: ``arange`` for ``forward``, the count of real tokens (left padding) for
``generate``, exactly as HF makes them.

Streams: every frame is one image (``<image>`` expanded to the tower's tokens, then a newline), 1-D
positions counting on, as in the one-shot prompt ``USER: <image>\\n<image>\\n… {question} ASSISTANT:``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vlmopt.adapters.base import Adapter, NamedConfig, Prompt, TextPipeline, VisionQK, register
from vlmopt.errors import InputError, UnsupportedModelError
from vlmopt.graph.capture import mark, role
from vlmopt.graph.layout import VisualLayout
from vlmopt.stream.planning import StreamPlanner

SUPPORTED_TOWERS = ("CLIPVisionModel", "SiglipVisionModel")
IMAGE_TOKEN, PAD_TOKEN = 4, 0
"""Token ids of the random-weight configs: those of the word-level tokenizer built for them (vlmopt.reference.processing)."""


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


def reference_processor(arch: str, image_size: int = 112, video_size: int = 112):
    """The word-level processor :mod:`vlmopt.reference.processing` builds offline for ``arch`` (its
    special ids are the random configs' ones); ``image_size`` the largest image side, ``video_size`` the frames'."""
    from vlmopt.reference.processing import build_processor

    return build_processor(arch, image_size, video_size)


def llava_15_7b_shape(width: float = 1.0):
    """LLaVA-1.5-7B's shape: CLIP ViT-L/14-336 (24 layers, 576 tokens) + Vicuna-7B (32 layers)."""
    from vlmopt.configs import scaled

    return llava_config(
        tower="clip",
        image_size=336,
        patch_size=14,
        vision_hidden=scaled(1024, width, 16),
        vision_layers=24,
        vision_heads=16,
        text_hidden=scaled(4096, width, 64),  # head dim stays even (rotary)
        text_layers=32,
        text_heads=32,
        kv_heads=32,
        vocab_size=32064,
    )


class LlavaPrefill(TextPipeline):
    """Prefill with images, calling the HF LLaVA submodules as leaves."""

    def __init__(self, model: nn.Module, feature_layers: list[int], drop_cls: bool, view) -> None:
        inner = model.model
        super().__init__(inner.language_model, model.lm_head, (0, 1), view)
        tower = inner.vision_tower
        self.vision_embeddings = tower.embeddings
        self.vision_pre_norm = getattr(tower, "pre_layrnorm", None)
        self.vision_layers = nn.ModuleList(tower.encoder.layers[: max(feature_layers)])
        self.projector = inner.multi_modal_projector
        self.feature_layers = feature_layers
        self.drop_cls = drop_cls

    def forward(self, input_ids, pixel_values, attention_mask, position_ids, visual_positions, layout, cache, logits_to_keep):
        self.mark_text_inputs(input_ids, attention_mask, position_ids)
        features = self.tower_features(pixel_values)
        with role("visual_tokens"):
            tokens = features.flatten(0, 1)
        with role("projector"):
            projected = self.projector(tokens)
        with role("embed"):
            embeds = self.embed_tokens(input_ids)
        with role("merge"):
            embeds = mark(torch.ops.vlmopt.merge_visual(embeds, projected, visual_positions), seq_dim=(0, 1))
        return self.llm(embeds, attention_mask, position_ids, cache, logits_to_keep)

    def tower_features(self, pixel_values):
        """[N, S, Dv] the selected tower features of ``pixel_values`` [N, 3, H, W] (the projector's input)."""
        with role("vision_embed"):
            hidden = self.vision_embeddings(pixel_values)
        if self.vision_pre_norm is not None:
            with role("vision_norm"):
                hidden = self.vision_pre_norm(hidden)
        states = [hidden]
        for index, layer in enumerate(self.vision_layers):
            with role("vision_block", index):
                hidden = layer(hidden, None)
            states.append(hidden)
        with role("feature_select"):
            selected = [states[k] for k in self.feature_layers]
            if self.drop_cls:
                selected = [state[:, 1:] for state in selected]
            features = selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1)
        return features


@register
class LlavaAdapter(Adapter):
    family = "llava"
    model_classes = {"llava": "LlavaForConditionalGeneration"}
    capabilities = frozenset({"vision_qk", "grids", "stream", "frames", "export"})
    paper_settings = {
        # HiPrune's object layer: the 9th of CLIP ViT-L's 24 (official scripts).
        "hiprune": {"object_layer": (9, 24)},
        # HalfV's LLaVA-1.5-7B schedule; saturation is layer inactivity on Vicuna / Mistral LMs.
        "halfv": {"ivr_layer": (3, 32), "ssr_layer": (15, 32), "ivr_keep": 0.5, "anchor_frac": 0.2, "saturation": "inactive_rows"},
        # HERMES's working-tier curve for LLaVA-OneVision (official code): alpha = 1 − 0.9p, k = 20 − 19.5p.
        "hermes": {"working_schedule": (1.0, -0.9, 20.0, -19.5)},
    }
    configs = {
        "tiny-llava-random": NamedConfig(
            llava_config, description="LLaVA, CLIP tower, 3-layer Llama (random weights)",
            processor=partial(reference_processor, "llava", image_size=56), tasks={"shapes": {"size": 56, "grid": 14}},
        ),
        "tiny-llava-siglip-random": NamedConfig(lambda: llava_config(tower="siglip"), description="LLaVA with a SigLIP tower"),
        "llava-1.5-7b-shape": NamedConfig(llava_15_7b_shape, description="LLaVA-1.5-7B's depths, heads and tokens"),
    }
    position_dims = (0, 1)
    tower_frames_input = "layout"
    """Graph input whose :class:`VisualLayout` grids are the tower's frames (HiPrune scores each densely)."""
    tower_order_input: str | None = None
    """Graph input mapping the tower's grid tokens to the visual grid tokens (None: the same order)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        config = model.config
        tower = model.model.vision_tower
        if type(tower).__name__ not in SUPPORTED_TOWERS:
            raise UnsupportedModelError(
                f"vlmopt's LLaVA adapter supports the vision towers {', '.join(SUPPORTED_TOWERS)}; "
                f"this model has {type(tower).__name__}"
            )
        num_layers = tower.config.num_hidden_layers
        layers = config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        if any(not -(num_layers + 1) <= k <= num_layers for k in layers):
            raise UnsupportedModelError(f"vision_feature_layer {layers} is outside the tower's {num_layers} layers")
        self.feature_layers = [k % (num_layers + 1) for k in layers]
        self.drop_cls = config.vision_feature_select_strategy == "default"
        self.grid_size = tower.config.image_size // tower.config.patch_size
        has_cls = type(tower).__name__ == "CLIPVisionModel"
        if self.drop_cls and not has_cls:
            raise UnsupportedModelError(
                "vision_feature_select_strategy='default' drops a CLS token, but SigLIP has none; use 'full'"
            )
        self.has_cls = has_cls
        # The 'full' strategy with CLIP feeds the CLS token too, in front of each image's grid.
        self.leading_tokens = int(has_cls and not self.drop_cls)
        self.tokens_per_image = self.leading_tokens + self.grid_size**2
        self.grid = (1, self.grid_size, self.grid_size)

    @property
    def text_model(self) -> nn.Module:
        return self.model.model.language_model

    def prefill_pipeline(self) -> nn.Module:
        return LlavaPrefill(self.model, self.feature_layers, self.drop_cls, self.decoder_view)

    @property
    def vision_depth(self) -> int:
        return self.model.model.vision_tower.config.num_hidden_layers

    @property
    def feature_block(self) -> int:
        return max(self.feature_layers) - 1

    def insert_vision_qk(self, editor, block: int, role: str = "attention_score") -> VisionQK:
        if not 0 <= block <= self.feature_block:
            raise ValueError(f"vision layer {block} does not feed the LLM (layers 0..{self.feature_block} do)")
        source = editor.input_of(editor.one("vision_block", block), "hidden_states")
        attention = self.model.model.vision_tower.encoder.layers[block].self_attn
        prefix = f"vision_layers.{block}"
        chain = editor.chain(source)
        normed = chain.module(f"{prefix}.layer_norm1", source, role=role, stage="vision", name=f"vision_{block}_norm")
        q = chain.module(f"{prefix}.self_attn.q_proj", normed, role=role, stage="vision", name=f"vision_{block}_q")
        k = chain.module(f"{prefix}.self_attn.k_proj", normed, role=role, stage="vision", name=f"vision_{block}_k")
        order = None if self.tower_order_input is None else editor.placeholder(self.tower_order_input)
        return VisionQK(
            q, k, attention.num_heads, attention.scale, leading=int(self.has_cls), merge=1,
            frames=editor.placeholder(self.tower_frames_input), order=order,
        )

    def frame_tokens(self, prompt: Prompt) -> list[int]:
        return [self.tokens_per_image] * prompt.inputs["pixel_values"].shape[0]

    def frame_inputs(self, prompt: Prompt, first: int, stop: int) -> dict[str, Any]:
        return {"pixel_values": prompt.inputs["pixel_values"][first:stop]}

    def stream_planner(self, compiled, processor):
        return LlavaStreamPlanner(compiled, processor)

    def export_image_size(self, processor: Any, requested: int | None) -> int:
        from vlmopt.export.errors import ExportError

        size = self.model.config.vision_config.image_size
        if requested not in (None, size):
            raise ExportError(f"this LLaVA's vision tower reads {size}×{size} images; image_size={requested} cannot be exported")
        return size

    def prompt_text(self, question: str) -> str:
        return f"USER: <image>\n{question} ASSISTANT:"

    def pixel_frames(self, batch: dict[str, Any]) -> list[np.ndarray]:
        """The normalised images [H, W, 3] of a batch's ``pixel_values`` (for ``vlmopt viz``)."""
        return [p.transpose(1, 2, 0) for p in batch["pixel_values"].float().numpy()]

    def plan(self, batch: dict[str, Any], for_generation: bool) -> Prompt:
        input_ids: Tensor = batch["input_ids"]
        pixel_values: Tensor | None = batch.get("pixel_values")
        attention_mask = self.attention_mask_of(input_ids, batch.get("attention_mask"))
        size, seq_len = input_ids.shape
        position_ids = self.text_positions(batch, attention_mask, for_generation)
        next_position = position_ids[:, -1:] + 1
        image_slots = self.slots_of(input_ids == self.model.config.image_token_id)
        if pixel_values is None or pixel_values.shape[0] == 0:
            if image_slots.numel():
                raise InputError(f"the prompt has {image_slots.numel()} image tokens but no pixel_values")
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
            return Prompt("prefill_text", inputs, next_position)
        num_images = pixel_values.shape[0]
        if image_slots.numel() != num_images * self.tokens_per_image:
            raise InputError(
                f"the prompt has {image_slots.numel()} image tokens, but {num_images} image(s) give "
                f"{num_images * self.tokens_per_image} features ({self.tokens_per_image} per image); "
                "build inputs with the model's processor"
            )
        rows = tuple(int(image_slots[i * self.tokens_per_image]) // seq_len for i in range(num_images))
        layout = VisualLayout.from_grids(size, seq_len, rows, (self.grid,) * num_images, (self.leading_tokens,) * num_images)
        inputs = {
            "input_ids": input_ids,
            "pixel_values": pixel_values,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "visual_positions": image_slots,
            "layout": layout,
        }
        return Prompt("prefill", inputs, next_position, layout)

    @classmethod
    def text_positions(cls, batch: dict[str, Any], attention_mask: Tensor, for_generation: bool) -> Tensor:
        """[B, S] 1-D position ids as HF makes them: ``arange`` for ``forward``, the count of real tokens
        (left padding) for ``generate``, or the batch's own ``position_ids``."""
        size, seq_len = attention_mask.shape
        position_ids = batch.get("position_ids")
        if position_ids is None:
            if for_generation:
                position_ids = cls.generation_positions(attention_mask)
            else:
                position_ids = torch.arange(seq_len, device=attention_mask.device).expand(size, seq_len)
        return position_ids.expand(size, seq_len)

    @classmethod
    def synthetic_visual(cls, config, kind, grid, generator):
        if kind != "image":
            raise UnsupportedModelError("LLaVA takes images only; pass no video grids")
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        leading = int(config.vision_feature_select_strategy == "full" and vision.model_type == "clip_vision_model")
        pixels = torch.Size((1, 3, vision.image_size, vision.image_size))
        return [config.image_token_id] * (leading + side * side), {"pixel_values": pixels}


class LlavaStreamPlanner(StreamPlanner):
    """Chunk inputs and positions of a LLaVA stream (see the module docstring)."""

    def __init__(self, compiled, processor) -> None:
        self.compiled = compiled
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.image_token = compiled.config.image_token_id
        self.tokens_per_image = compiled.adapter.tokens_per_image
        self.newline = self.text("\n")
        self.reset(0)

    def prefix_ids(self, system_prompt: str) -> Tensor:
        bos = self.tokenizer.bos_token or ""
        return self.text(f"{bos}{system_prompt + ' ' if system_prompt else ''}USER: ")

    def question_ids(self, question: str) -> Tensor:
        return self.text(f"{question} ASSISTANT:")

    def visual_tokens(self, frames: np.ndarray) -> int:
        """Visual cache entries ``frames`` take (each frame an image; its newline is text)."""
        return frames.shape[0] * self.tokens_per_image

    def chunk(self, frames: np.ndarray, cache_length: int, timestamps, patches) -> tuple[dict[str, Any], Tensor]:
        from PIL import Image

        pixels = self.image_processor([Image.fromarray(f) for f in frames], return_tensors="pt")["pixel_values"]
        frame_ids = torch.cat([torch.full((1, self.tokens_per_image), self.image_token), self.newline], dim=1)
        ids = frame_ids.repeat(1, frames.shape[0])
        positions = (torch.arange(ids.shape[1]) + self.next)[None]
        prompt = self.compiled.plan({"input_ids": ids, "pixel_values": pixels, "position_ids": positions})
        inputs = dict(prompt.inputs, attention_mask=torch.ones(1, cache_length + ids.shape[1], dtype=torch.long))
        self.frame_size = frames.shape[1:3]
        self.next += ids.shape[1]
        return inputs, positions
