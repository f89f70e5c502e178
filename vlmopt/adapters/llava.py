"""LLaVA (``LlavaForConditionalGeneration``): CLIP or SigLIP tower → projector → Llama-family LM.

Pipeline (prefill): patch embeddings → [pre-norm] → the vision layers up to the deepest feature
layer (HF runs them all; the later ones cannot change the output) → feature select (drop CLS for
the ``default`` strategy, concatenate several layers for a list) → flat visual tokens [T, Dv] →
projector → token embedding → ``vlmopt::merge_visual`` → LLM.

Visual tokens: one image is ``(image_size / patch_size)²`` tokens on a square grid (``+1`` CLS and
a leading CLS token before the grid with the ``full`` strategy and a CLIP tower). Positions are 1-D RoPE ids [B, S]: ``arange`` for ``forward``,
the count of real tokens (left padding) for ``generate``, exactly as HF makes them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vlmopt.adapters.base import Adapter, Prompt, TextPipeline, VisionQK
from vlmopt.errors import InputError, UnsupportedModelError
from vlmopt.graph.capture import mark, role
from vlmopt.graph.layout import VisualLayout

SUPPORTED_TOWERS = ("CLIPVisionModel", "SiglipVisionModel")


class LlavaPrefill(TextPipeline):
    """Prefill with images, calling the HF LLaVA submodules as leaves."""

    def __init__(self, model: nn.Module, feature_layers: list[int], drop_cls: bool) -> None:
        inner = model.model
        super().__init__(inner.language_model, model.lm_head, position_dims=(0, 1))
        tower = inner.vision_tower
        self.vision_embeddings = tower.embeddings
        self.vision_pre_norm = getattr(tower, "pre_layrnorm", None)
        self.vision_layers = nn.ModuleList(tower.encoder.layers[: max(feature_layers)])
        self.projector = inner.multi_modal_projector
        self.feature_layers = feature_layers
        self.drop_cls = drop_cls

    def forward(self, input_ids, pixel_values, attention_mask, position_ids, visual_positions, layout, cache, logits_to_keep):
        self.mark_text_inputs(input_ids, attention_mask, position_ids)
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
        with role("visual_tokens"):
            tokens = features.flatten(0, 1)
        with role("projector"):
            projected = self.projector(tokens)
        with role("embed"):
            embeds = self.embed_tokens(input_ids)
        with role("merge"):
            embeds = mark(torch.ops.vlmopt.merge_visual(embeds, projected, visual_positions), seq_dim=(0, 1))
        return self.llm(embeds, attention_mask, position_ids, cache, logits_to_keep)


class LlavaAdapter(Adapter):
    family = "llava"
    model_class_name = "LlavaForConditionalGeneration"
    position_dims = (0, 1)

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
        return LlavaPrefill(self.model, self.feature_layers, self.drop_cls)

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
        return VisionQK(
            q, k, attention.num_heads, attention.scale, leading=int(self.has_cls), merge=1,
            frames=editor.placeholder("layout"), order=None,
        )

    def frame_tokens(self, prompt: Prompt) -> list[int]:
        return [self.tokens_per_image] * prompt.inputs["pixel_values"].shape[0]

    def frame_inputs(self, prompt: Prompt, first: int, stop: int) -> dict[str, Any]:
        return {"pixel_values": prompt.inputs["pixel_values"][first:stop]}

    def plan(self, batch: dict[str, Any], for_generation: bool) -> Prompt:
        input_ids: Tensor = batch["input_ids"]
        pixel_values: Tensor | None = batch.get("pixel_values")
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
