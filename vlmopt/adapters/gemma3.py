"""Gemma 3 (``Gemma3ForConditionalGeneration``): SigLIP → average pool to 256 tokens → Gemma 3 LM with
sliding-window and global layers.

Pipeline (prefill): SigLIP patch embeddings → encoder layers → post-layernorm → the projector (k×k
average pool of the patch grid, RMS norm, projection: a 64×64 grid of 896 px becomes 16×16 tokens) →
flat visual tokens [T, D] → scaled token embedding → ``vlmopt::merge_visual`` → LLM, where each
decoder layer reads its own kind's mask (sliding window or global) and rotary embedding (a local base
for sliding layers, a global, scaled one for full layers; q/k norms, ``query_pre_attn_scalar``, the
norms after attention and after the MLP are the decoder-layer view's).

**Bidirectional attention inside each image** during prefill: HF builds the masks from
``token_type_ids`` (an image's tokens are one block, attending each other both ways), the global
layers' as ``or(causal, block)``, the sliding layers' as ``and(or(causal, block), window)``. The
adapter plans HF's block ids (``get_block_sequence_ids_for_mask``) as the sequence input
``block_sequence_ids`` and the causal-mask nodes build both masks from it with HF's mask functions
(:func:`gemma3_mask`); a prune or a cut inside the LLM gathers the block ids like every sequence value,
so kept image tokens still attend each other both ways. A text-only prompt with ``token_type_ids``
takes them too (HF then materialises the masks); decode steps use the plain masks, as HF's do. A
prompt with images but without ``token_type_ids`` gets them from its image tokens (the processor's
values): vlmopt always applies the attention the model was trained with (HF without them falls back
to causal attention).

Images: one image is ``\\n\\n<start_of_image>`` + 256 ``<image_soft_token>`` + ``<end_of_image>\\n\\n``;
pan-and-scan adds crops (each such a block) after the text "Here is the original image … and here
are some crops …". Every image or crop is one tile (:mod:`vlmopt.adapters.tiles`).

Passes: HalfV handles both layer kinds (each cut rebuilds the global and the sliding mask of its
segment from the gathered block ids, sized on the segment's first layer of that kind); APB-V is
refused (it replaces attention with full causal anchor / passing-block attention, which neither the
sliding-window layers nor the bidirectional image blocks follow); streams are not offered (Gemma 3
takes no video).

Export: one image of the tower's size per prompt (no pan-and-scan); the prefill graph takes the block
ids as the input ``block_sequence_ids`` [B, S], which the runtime plans from the image tokens
(:func:`vlmopt.export.planning.image_blocks`), and the sliding layers' past is as long as the global
layers' with the window applied by their mask (:mod:`vlmopt.export.kv`).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from vlmopt.adapters.base import NamedConfig, TextPipeline, VisionQK, register
from vlmopt.adapters.formats import PromptFormat
from vlmopt.adapters.layer_view import DecoderLayerView
from vlmopt.adapters.llava import reference_processor
from vlmopt.adapters.tiles import TiledAdapter
from vlmopt.graph.capture import mark, role

SPECIAL = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_image>", "<end_of_image>", "<image_soft_token>",
           "<start_of_turn>", "<end_of_turn>")
PAD, EOS, BOS, BOI, EOI, IMAGE, END_OF_TURN = 0, 1, 2, 4, 5, 6, 8
"""Token ids of the random-weight configs: those of the word-level tokenizer built for them (:data:`FORMAT`)."""


def gemma3_config(
    image_size: int = 112,
    tokens_per_image: int = 16,
    vision_hidden: int = 32,
    vision_layers: int = 4,
    vision_heads: int = 4,
    vision_intermediate: int | None = None,
    text_hidden: int = 64,
    layer_types: tuple[str, ...] = ("sliding_attention", "sliding_attention", "full_attention", "sliding_attention"),
    text_heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    query_pre_attn_scalar: int = 24,
    sliding_window: int = 8,
    intermediate: int | None = None,
    vocab_size: int = 256,
):
    """A Gemma 3 config: SigLIP (``image_size`` px, 14 px patches, pooled to ``tokens_per_image``),
    decoder layers of ``layer_types``, Gemma-3-4B+'s two rotary embeddings (local θ 10⁴; global θ 10⁶
    with linear scaling 8). The tiny defaults keep the sliding window shorter than an image."""
    from transformers import Gemma3Config

    text = dict(
        hidden_size=text_hidden, intermediate_size=intermediate or text_hidden * 2, num_hidden_layers=len(layer_types),
        num_attention_heads=text_heads, num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=vocab_size,
        query_pre_attn_scalar=query_pre_attn_scalar, sliding_window=sliding_window, layer_types=list(layer_types),
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
        max_position_embeddings=32768, pad_token_id=PAD, eos_token_id=END_OF_TURN, bos_token_id=BOS,
    )
    vision = dict(
        model_type="siglip_vision_model", hidden_size=vision_hidden, intermediate_size=vision_intermediate or vision_hidden * 4,
        num_hidden_layers=vision_layers, num_attention_heads=vision_heads, image_size=image_size, patch_size=14,
        vision_use_head=False,
    )
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=tokens_per_image, boi_token_index=BOI,
                        eoi_token_index=EOI, image_token_index=IMAGE)


def gemma3_12b_shape(width: float = 1.0):
    """Gemma-3-12B's shape: SigLIP-400M (27 layers, 896 px → 4,096 patches pooled to 256 tokens) + a
    48-layer LM (5 sliding-window layers of 1,024 tokens per global one; 16 heads, 8 KV heads, head dim 256)."""
    from vlmopt.configs import scaled

    return gemma3_config(
        image_size=896, tokens_per_image=256, vision_hidden=scaled(1152, width, 16), vision_layers=27, vision_heads=16,
        vision_intermediate=scaled(4304, width, 4), text_hidden=scaled(3840, width, 16),
        layer_types=tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(48)),
        text_heads=16, kv_heads=8, head_dim=max(2, scaled(256, width, 2)), query_pre_attn_scalar=256, sliding_window=1024,
        intermediate=scaled(15360, width, 32), vocab_size=262208,
    )


def gemma3_mask(config, sliding: bool, embeds: Tensor, attention_mask: Tensor, cache: Any, layer_idx: int | None, block_ids: Tensor):
    """The 4-D mask of one layer kind with each image block bidirectional, as HF's
    ``create_masks_for_vision_model`` builds it: ``or(causal, block)`` for global layers,
    ``and(or(causal, block), window)`` for sliding ones (sized on ``layer_idx``'s cache layer)."""
    from transformers.masking_utils import (
        _preprocess_mask_arguments,
        blockwise_overlay,
        create_causal_mask,
        maybe_pad_block_sequence_ids,
        sliding_window_overlay,
    )

    kwargs = dict(config=config, inputs_embeds=embeds, attention_mask=attention_mask, cache=cache, position_ids=None)
    if not sliding:
        return create_causal_mask(**kwargs, block_sequence_ids=block_ids, layer_idx=layer_idx)
    if layer_idx is None:  # HF sizes the sliding mask on the first sliding cache layer
        layer_idx = cache.is_sliding.index(True) if getattr(cache, "is_sliding", None) and True in cache.is_sliding else 0
    early_exit, _, _, _, kv_length, _, kv_offset = _preprocess_mask_arguments(**kwargs, layer_idx=layer_idx)
    padded = block_ids if early_exit else maybe_pad_block_sequence_ids(block_ids, attention_mask, kv_length, kv_offset)
    return create_causal_mask(**kwargs, or_mask_function=blockwise_overlay(padded),
                              and_mask_function=sliding_window_overlay(config.sliding_window), layer_idx=layer_idx)


class Gemma3Text(TextPipeline):
    """The text-only prefill (image blocks from ``block_sequence_ids`` when the prompt has token types)
    and the decode step (no block ids: the plain masks)."""

    def __init__(self, model: nn.Module, view: DecoderLayerView) -> None:
        super().__init__(model.model.language_model, model.lm_head, (0, 1), view, mask_builder=gemma3_mask)
        config = model.config
        vocab = config.get_text_config().vocab_size
        self.out_of_vocab_image = config.image_token_id if config.image_token_id >= vocab else None

    def embed(self, input_ids):
        with role("embed"):
            if self.out_of_vocab_image is not None:  # HF embeds an image id past the vocabulary as id 0
                input_ids = input_ids.masked_fill(input_ids == self.out_of_vocab_image, 0)
            return self.embed_tokens(input_ids)

    def forward(self, input_ids, attention_mask, position_ids, cache, logits_to_keep, block_sequence_ids=None):
        self.mark_text_inputs(input_ids, attention_mask, position_ids)
        mark(block_sequence_ids, seq_dim=(0, 1))
        embeds = mark(self.embed(input_ids), seq_dim=(0, 1))
        return self.llm(embeds, attention_mask, position_ids, cache, logits_to_keep, mask_input=block_sequence_ids)


class Gemma3Prefill(Gemma3Text):
    """Prefill with images, calling the HF Gemma 3 submodules as leaves."""

    def __init__(self, model: nn.Module, view: DecoderLayerView) -> None:
        super().__init__(model, view)
        tower = model.model.vision_tower
        self.vision_embeddings = tower.embeddings
        self.vision_layers = tower.encoder.layers
        self.vision_norm = tower.post_layernorm
        self.projector = model.model.multi_modal_projector

    def forward(self, input_ids, pixel_values, attention_mask, position_ids, visual_positions, layout, block_sequence_ids,
                cache, logits_to_keep):
        self.mark_text_inputs(input_ids, attention_mask, position_ids)
        mark(block_sequence_ids, seq_dim=(0, 1))
        with role("vision_embed"):
            hidden = self.vision_embeddings(pixel_values)
        for index, layer in enumerate(self.vision_layers):
            with role("vision_block", index):
                hidden = layer(hidden, None)
        with role("vision_norm"):
            hidden = self.vision_norm(hidden)
        with role("projector"):
            pooled = self.projector(hidden)
        with role("visual_tokens"):
            tokens = pooled.flatten(0, 1)
        embeds = self.embed(input_ids)
        with role("merge"):
            embeds = mark(torch.ops.vlmopt.merge_visual(embeds, tokens, visual_positions), seq_dim=(0, 1))
        return self.llm(embeds, attention_mask, position_ids, cache, logits_to_keep, mask_input=block_sequence_ids)


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<start_of_image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def image_processor(size: int):
    """Gemma 3's resize to ``size`` px (no pan-and-scan by default), mean and std 0.5, PIL backend."""
    from transformers import Gemma3ImageProcessorPil

    return Gemma3ImageProcessorPil(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def assemble(tokenizer, images, image_size: int, video_size: int):
    from transformers import Gemma3Processor

    return Gemma3Processor(image_processor=images, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
                           image_seq_length=(image_size // 28) ** 2)


FORMAT = PromptFormat(
    arch="gemma3", processor_class="Gemma3Processor", special=SPECIAL,
    tokens={"bos_token": "<bos>", "eos_token": "<end_of_turn>", "pad_token": "<pad>", "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
    prompt=lambda question, video: f"<start_of_turn>user\n<start_of_image>{question}<end_of_turn>\n<start_of_turn>model\n",
    answer=lambda answer: f"{answer}<end_of_turn>",
    follow_up=lambda question: f"\n<start_of_turn>user\n{question}<end_of_turn>\n<start_of_turn>model\n",
    assemble=assemble, image_processor=image_processor, bos="<bos>", words=("model",),
)


@register
class Gemma3Adapter(TiledAdapter):
    family = "gemma3"
    model_classes = {"gemma3": "Gemma3ForConditionalGeneration"}
    capabilities = frozenset({"vision_qk", "grids", "frames", "export"})
    lacks = {
        "video": "the family takes images only",
        "stream": "the family takes images only: there is no video to stream",
    }
    export_sequence_inputs = {"block_sequence_ids": "image_blocks"}
    decoder_view = DecoderLayerView(
        q_norm="self_attn.q_norm", k_norm="self_attn.k_norm", attention_out_norm="post_attention_layernorm",
        ffn_norm="pre_feedforward_layernorm", ffn_out_norm="post_feedforward_layernorm",
    )
    configs = {
        "tiny-gemma3-random": NamedConfig(
            gemma3_config, description="Gemma 3, 4-layer SigLIP pooled 2×2, 3 sliding-window + 1 global layers",
            # 112 px images: a 28 px grid of 4×4 tokens (the tiny tower's 2×2 pool of 14 px patches)
            processor=partial(reference_processor, "gemma3", image_size=112), tasks={"shapes": {"size": 112, "grid": 28}},
        ),
        "gemma-3-12b-shape": NamedConfig(gemma3_12b_shape, description="Gemma-3-12B's depths, heads and tokens",
                                         processor=partial(reference_processor, "gemma3", image_size=896)),
    }
    prompt_format = FORMAT
    batch_keys = ("pixel_values", "token_type_ids")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        projector = model.model.multi_modal_projector
        self.merge = projector.kernel_size
        self.grid = (projector.tokens_per_side, projector.tokens_per_side)

    @property
    def text_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def tile_grid(self) -> tuple[int, int]:
        return self.grid

    def prefill_pipeline(self) -> nn.Module:
        return Gemma3Prefill(self.model, self.decoder_view)

    def text_pipeline(self) -> nn.Module:
        return Gemma3Text(self.model, self.decoder_view)

    def extra_inputs(self, batch: dict[str, Any], input_ids: Tensor, tiles: Tensor | None) -> dict[str, Any]:
        """``block_sequence_ids`` [B, S]: HF's image blocks from ``token_type_ids`` (from the image tokens
        where a prompt with images comes without them; none for a text prompt without them)."""
        from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

        types = batch.get("token_type_ids")
        if types is None and tiles is None:
            return {}
        if types is None:
            types = (input_ids == self.image_token_id).long()
        return {"block_sequence_ids": get_block_sequence_ids_for_mask(types, device=input_ids.device)}

    @property
    def feature_block(self) -> int:
        return self.vision_depth - 1

    def insert_vision_qk(self, editor, block: int, role: str = "attention_score") -> VisionQK:
        attention = self.model.model.vision_tower.encoder.layers[block].self_attn
        return self.insert_merged_patch_qk(editor, block, role, attention, norm="layer_norm1", projections="self_attn")

    def prompt_text(self, question: str) -> str:
        return FORMAT.prompt(question, False)

    @classmethod
    def synthetic_visual(cls, config, kind, grid, generator):
        """An image with ``grid[0]`` pan-and-scan crops (default none): ``<start_of_image>`` + its tokens
        + ``<end_of_image>`` per image or crop, the processor's text around them as random text tokens."""
        from vlmopt.configs import random_text_ids
        from vlmopt.errors import UnsupportedModelError

        if kind != "image":
            raise UnsupportedModelError("Gemma 3 takes images only; pass no video grids")
        crops = grid[0] if grid else 0
        block = [config.boi_token_id] + [config.image_token_id] * config.mm_tokens_per_image + [config.eoi_token_id]
        ids = block if not crops else random_text_ids(config, 3, generator) + block + random_text_ids(config, 4, generator)
        for crop in range(crops):
            ids += (random_text_ids(config, 1, generator) if crop else []) + block
        side = config.vision_config.image_size
        return ids, {"pixel_values": torch.Size((1 + crops, 3, side, side))}

    @classmethod
    def synthetic_extras(cls, config, batch):
        return {"token_type_ids": (batch["input_ids"] == config.image_token_id).long()}
