"""Mistral 3 (``Mistral3ForConditionalGeneration``: Mistral-Small-3.1): Pixtral tower at native resolution
→ RMS norm and 2×2 patch merger → MLP projector → Mistral LM.

Pipeline (prefill): patch convolution of the padded images → each image's patches (its own size,
cropped from the padding) flattened into one sequence → ``ln_pre`` → Pixtral layers with 2-D RoPE
(each patch's row and column; planned) and **block-diagonal attention** (each image attends only to
itself: HF's ``generate_block_attention_mask``) → the feature layer → projector (RMS norm; each 2×2
block of an image's patches merged by a linear layer; MLP) → visual tokens [T, D] → token embedding →
``vlmopt::merge_visual`` → LLM.

Images: an image of h × w patches is (h/2) rows of (w/2) ``[IMG]`` tokens, each row followed by
``[IMG_BREAK]``, the last one's replaced by ``[IMG_END]``. The break and end tokens are text
(structural text: no pass removes it); the visual grid is the ``[IMG]`` tokens in raster order, their
slots skipping the breaks. Each image is one input of the layout with its own grid (see
:mod:`vlmopt.adapters.tiles`); the patch sizes are planned as Python ints (static under fake tensors
and export), so the tower's and the projector's data-dependent splits read real numbers.
"""

from __future__ import annotations

import operator
from functools import partial
from typing import Any

import torch
from torch import Tensor, fx, nn

from vlmopt.adapters.base import NamedConfig, TextPipeline, VisionQK, register
from vlmopt.adapters.formats import PromptFormat
from vlmopt.adapters.llava import reference_processor
from vlmopt.adapters.tiles import TiledAdapter, group_merged_patches
from vlmopt.errors import InputError, UnsupportedModelError
from vlmopt.graph.capture import mark, role

SPECIAL = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]", "<pad>")
UNK, BOS, EOS, IMG, IMG_BREAK, IMG_END, PAD = 0, 1, 2, 5, 6, 7, 8
"""Token ids of the random-weight configs: those of the word-level tokenizer built for them (:data:`FORMAT`)."""


def mistral3_config(
    image_size: int = 112,
    vision_hidden: int = 32,
    vision_layers: int = 4,
    vision_heads: int = 4,
    vision_intermediate: int | None = None,
    text_hidden: int = 64,
    text_layers: int = 3,
    text_heads: int = 4,
    kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate: int | None = None,
    vocab_size: int = 256,
):
    """A Mistral 3 config: Pixtral on 14 px patches (images up to ``image_size`` px), 2×2 patch merger,
    a Mistral LM with full attention in every layer (as Mistral-Small-3.1)."""
    from transformers import Mistral3Config

    vision = dict(model_type="pixtral", hidden_size=vision_hidden, intermediate_size=vision_intermediate or vision_hidden * 4,
                  num_hidden_layers=vision_layers, num_attention_heads=vision_heads, image_size=image_size, patch_size=14,
                  head_dim=vision_hidden // vision_heads, rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})
    text = dict(model_type="mistral", hidden_size=text_hidden, intermediate_size=intermediate or text_hidden * 2,
                num_hidden_layers=text_layers, num_attention_heads=text_heads, num_key_value_heads=kv_heads,
                head_dim=head_dim or text_hidden // text_heads, vocab_size=vocab_size, max_position_embeddings=32768,
                sliding_window=None, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000_000.0})
    return Mistral3Config(vision_config=vision, text_config=text, image_token_index=IMG, spatial_merge_size=2,
                          vision_feature_layer=-1, multimodal_projector_bias=False)


def mistral_small_31_shape(width: float = 1.0):
    """Mistral-Small-3.1-24B's shape: Pixtral (24 layers, 16 heads, 14 px patches) + a 40-layer LM
    (32 heads, 8 KV heads, head dim 128)."""
    from vlmopt.configs import scaled

    return mistral3_config(
        image_size=1540, vision_hidden=scaled(1024, width, 64), vision_layers=24, vision_heads=16,
        vision_intermediate=scaled(4096, width, 4), text_hidden=scaled(5120, width, 64), text_layers=40, text_heads=32,
        kv_heads=8, head_dim=max(2, scaled(128, width, 2)), intermediate=scaled(32768, width, 32), vocab_size=131072,
    )


def image_patches(patch_embeds: Tensor, grids: tuple[tuple[int, int], ...]) -> Tensor:
    """[1, P, D]: each image's patch embeddings [D, h, w] cropped from the padded batch [N, D, H, W] and
    flattened row by row, images one after the other (``PixtralVisionModel``'s order)."""
    return torch.cat([embed[..., :h, :w].flatten(1).T for embed, (h, w) in zip(patch_embeds, grids)], dim=0).unsqueeze(0)


def block_attention_mask(hidden: Tensor, grids: tuple[tuple[int, int], ...]) -> Tensor:
    """[1, 1, P, P] float mask: each image attends to itself only (HF's ``generate_block_attention_mask``)."""
    from transformers.models.pixtral.modeling_pixtral import generate_block_attention_mask

    return generate_block_attention_mask([h * w for h, w in grids], hidden)


def pixtral_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """(q, k) [P, H·Dh] of a Pixtral layer from its projections [1, P, H·Dh], with the 2-D RoPE applied
    as ``PixtralAttention`` applies it (cos, sin [P, Dh])."""
    from transformers.models.pixtral.modeling_pixtral import apply_rotary_pos_emb

    patches = q.shape[1]
    q, k = (x.view(1, patches, heads, -1).transpose(1, 2) for x in (q, k))
    q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=0)
    return q.transpose(1, 2).reshape(patches, -1), k.transpose(1, 2).reshape(patches, -1)


fx.wrap("image_patches")  # one graph node each, as the pipeline reads them
fx.wrap("block_attention_mask")


class Mistral3Prefill(TextPipeline):
    """Prefill with images, calling the HF Mistral 3 submodules as leaves."""

    def __init__(self, model: nn.Module, feature_layer: int, view) -> None:
        inner = model.model
        super().__init__(inner.language_model, model.lm_head, (0, 1), view)
        tower = inner.vision_tower
        self.patch_conv = tower.patch_conv
        self.ln_pre = tower.ln_pre
        self.vision_rotary = tower.patch_positional_embedding
        self.vision_layers = nn.ModuleList(tower.transformer.layers[:feature_layer])
        self.projector = inner.multi_modal_projector

    def forward(self, input_ids, pixel_values, attention_mask, position_ids, visual_positions, layout, patch_grids,
                image_pixel_sizes, vision_position_ids, cache, logits_to_keep):
        self.mark_text_inputs(input_ids, attention_mask, position_ids)
        with role("vision_embed"):
            pixels = pixel_values.to(dtype=self.patch_conv.weight.dtype)  # as HF's Pixtral tower casts them
            hidden = self.ln_pre(image_patches(self.patch_conv(pixels), patch_grids))
            mask = block_attention_mask(hidden, patch_grids)
        with role("vision_rope"):
            rope = self.vision_rotary(hidden, vision_position_ids)
            cos, sin = rope[0], rope[1]
        for index, layer in enumerate(self.vision_layers):
            with role("vision_block", index):
                hidden = layer(hidden, mask, position_embeddings=(cos, sin))
        with role("projector"):
            tokens = self.projector(hidden.squeeze(0), image_pixel_sizes)
        with role("visual_tokens"):
            tokens = tokens.flatten(0, -2)
        with role("embed"):
            embeds = self.embed_tokens(input_ids)
        with role("merge"):
            embeds = mark(torch.ops.vlmopt.merge_visual(embeds, tokens, visual_positions), seq_dim=(0, 1))
        return self.llm(embeds, attention_mask, position_ids, cache, logits_to_keep)


def image_processor(size: int):
    """Pixtral's resize (longest edge ``size`` px, sides multiples of 28 px: 14 px patches merged 2×2), PIL backend."""
    from transformers import PixtralImageProcessorPil

    return PixtralImageProcessorPil(size={"longest_edge": size}, patch_size={"height": 14, "width": 14})


class PixtralPrompts:
    """``PixtralProcessor`` for images (the HF class needs torchvision, which is not installed): each
    ``[IMG]`` of a prompt becomes its image's rows of ``[IMG]`` tokens with ``[IMG_BREAK]`` after each row
    and ``[IMG_END]`` last (``PixtralProcessor.replace_image_token``); ``pixel_values`` [N, 3, H, W] are
    padded to the batch's largest image, with ``image_sizes`` [N, 2]."""

    def __init__(self, image_processor, tokenizer, patch_size: int = 14, spatial_merge_size: int = 2) -> None:
        self.image_processor, self.tokenizer = image_processor, tokenizer
        self.patch_size, self.spatial_merge_size = patch_size, spatial_merge_size
        self.image_token, self.image_break_token, self.image_end_token = "[IMG]", "[IMG_BREAK]", "[IMG_END]"
        self.chat_template = None

    def replace_image_token(self, height: int, width: int) -> str:
        unit = self.patch_size * self.spatial_merge_size
        rows = [[self.image_token] * (width // unit) + [self.image_break_token] for _ in range(height // unit)]
        rows[-1][-1] = self.image_end_token
        return "".join(token for row in rows for token in row)

    def __call__(self, text=None, images=None, return_tensors="pt", padding=True, **kwargs):
        texts = [text] if isinstance(text, str) else list(text)
        flat = [image for entry in (images or []) for image in (entry if isinstance(entry, (list, tuple)) else [entry])]
        out = {}
        if flat:
            unit = self.patch_size * self.spatial_merge_size
            pictures = self.image_processor(flat, patch_size={"height": unit, "width": unit}, return_tensors=return_tensors)
            out = {"pixel_values": pictures["pixel_values"], "image_sizes": pictures["image_sizes"]}
            sizes = iter(pictures["image_sizes"].tolist())
            expanded = []
            for prompt in texts:
                pieces = prompt.split("[IMG]")
                expanded.append(pieces[0] + "".join(self.replace_image_token(*next(sizes)) + piece for piece in pieces[1:]))
            texts = expanded
        return {**dict(self.tokenizer(texts, return_tensors=return_tensors, padding=padding)), **out}

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)


def assemble(tokenizer, images, image_size: int, video_size: int):
    return PixtralPrompts(images, tokenizer)


FORMAT = PromptFormat(
    arch="mistral3", processor_class="PixtralPrompts", special=SPECIAL,
    tokens={"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "image_token": "[IMG]",
            "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"},
    prompt=lambda question, video: f"[INST][IMG]{question}[/INST]",
    answer=lambda answer: f"{answer}</s>",
    follow_up=lambda question: f"[INST]{question}[/INST]",
    assemble=assemble, image_processor=image_processor, bos="<s>",
)


@register
class Mistral3Adapter(TiledAdapter):
    family = "mistral3"
    model_classes = {"mistral3": "Mistral3ForConditionalGeneration"}
    capabilities = frozenset({"vision_qk", "grids", "frames", "export"})
    lacks = {
        "video": "the family takes images only",
        "stream": "the family takes images only: there is no video to stream",
    }
    configs = {
        "tiny-mistral3-random": NamedConfig(
            mistral3_config, description="Mistral 3, 4-layer Pixtral (native resolution, 2-D RoPE), 2×2 merger, 3-layer Mistral",
            processor=partial(reference_processor, "mistral3", image_size=112), tasks={"shapes": {"size": 112, "grid": 28}},
        ),
        "mistral-small-3.1-shape": NamedConfig(mistral_small_31_shape, image_grid=(64, 64),
                                               description="Mistral-Small-3.1-24B's depths, heads and tokens",
                                               processor=partial(reference_processor, "mistral3", image_size=896)),
    }
    prompt_format = FORMAT
    batch_keys = ("pixel_values", "image_sizes")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        config = model.config
        depth = config.vision_config.num_hidden_layers
        layer = config.vision_feature_layer
        if not isinstance(layer, int) or not -(depth + 1) <= layer <= depth or layer % (depth + 1) == 0:
            raise UnsupportedModelError(f"vision_feature_layer {layer!r} is not the output of one of the tower's {depth} layers")
        self.feature_layer = layer % (depth + 1)
        self.merge = config.spatial_merge_size
        self.patch = config.vision_config.patch_size

    @property
    def text_model(self) -> nn.Module:
        return self.model.model.language_model

    def prefill_pipeline(self) -> nn.Module:
        return Mistral3Prefill(self.model, self.feature_layer, self.decoder_view)

    def image_sizes(self, batch: dict[str, Any], tiles: Tensor) -> list[tuple[int, int]]:
        """(height, width) pixels of each image (the whole padded size where ``image_sizes`` is not given)."""
        sizes = batch.get("image_sizes")
        if sizes is None:
            return [tuple(tiles.shape[-2:])] * tiles.shape[0]
        sizes = [tuple(int(v) for v in size) for size in sizes.tolist()]
        unit = self.patch * self.merge
        if len(sizes) != tiles.shape[0] or any(h % unit or w % unit or h > tiles.shape[-2] or w > tiles.shape[-1] for h, w in sizes):
            raise InputError(f"image_sizes {sizes} do not fit {tiles.shape[0]} image(s) of {tuple(tiles.shape[-2:])} px in multiples "
                             f"of {unit} px; pass the processor's image_sizes")
        return sizes

    def tile_grids(self, batch: dict[str, Any], tiles: Tensor) -> tuple[tuple[int, int], ...]:
        unit = self.patch * self.merge
        return tuple((h // unit, w // unit) for h, w in self.image_sizes(batch, tiles))

    def extra_inputs(self, batch: dict[str, Any], input_ids: Tensor, tiles: Tensor | None) -> dict[str, Any]:
        """The images' patch grids and pixel sizes (Python ints) and each patch's (row, column) [P, 2]."""
        if tiles is None:
            return {}
        sizes = self.image_sizes(batch, tiles)
        grids = tuple((h // self.patch, w // self.patch) for h, w in sizes)
        device = tiles.device
        ids = [torch.stack(torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"), dim=-1)
               .reshape(-1, 2) for h, w in grids]
        return {"patch_grids": grids, "image_pixel_sizes": tuple(sizes), "vision_position_ids": torch.cat(ids)}

    def frame_inputs(self, prompt, first: int, stop: int) -> dict[str, Any]:
        grids = prompt.inputs["patch_grids"]
        start, end = sum(h * w for h, w in grids[:first]), sum(h * w for h, w in grids[:stop])
        return {"pixel_values": prompt.inputs["pixel_values"][first:stop], "patch_grids": grids[first:stop],
                "image_pixel_sizes": prompt.inputs["image_pixel_sizes"][first:stop],
                "vision_position_ids": prompt.inputs["vision_position_ids"][start:end]}

    @property
    def feature_block(self) -> int:
        return self.feature_layer - 1

    def insert_vision_qk(self, editor, block: int, role: str = "attention_score") -> VisionQK:
        if not 0 <= block <= self.feature_block:
            raise ValueError(f"vision layer {block} does not feed the LLM (layers 0..{self.feature_block} do)")
        node = editor.one("vision_block", block)
        source = editor.input_of(node, "hidden_states")
        cos, sin = editor.input_of(node, "position_embeddings")
        layout = editor.placeholder("layout")
        attention = self.model.model.vision_tower.transformer.layers[block].attention
        prefix, name = f"vision_layers.{block}", f"vision_{block}"
        chain = editor.chain(max((source, cos, sin, layout), key=editor.order().__getitem__))
        normed = chain.module(f"{prefix}.attention_norm", source, role=role, stage="vision", name=f"{name}_norm")
        q = chain.module(f"{prefix}.attention.q_proj", normed, role=role, stage="vision", name=f"{name}_q_proj")
        k = chain.module(f"{prefix}.attention.k_proj", normed, role=role, stage="vision", name=f"{name}_k_proj")
        qk = chain(pixtral_qk, q, k, cos, sin, attention.num_heads, role=role, stage="vision", name=f"{name}_qk")
        heads = []
        for index, kind in enumerate(("q", "k")):
            x = chain(operator.getitem, qk, index, role=role, stage="vision", name=f"{name}_{kind}_rotated")
            heads.append(chain(group_merged_patches, x, layout, self.merge, 0, role=role, stage="vision", name=f"{name}_{kind}"))
        return VisionQK(heads[0], heads[1], attention.num_heads, attention.scaling, leading=0, merge=self.merge**2,
                        frames=layout, order=None)

    # ----- export ------------------------------------------------------------------------------------
    def export_image_size(self, processor: Any, requested: int | None) -> int:
        from vlmopt.export.errors import ExportError

        unit = self.patch * self.merge
        size = requested or int(getattr(getattr(processor, "image_processor", None), "size", {}).get("longest_edge") or 224)
        if size % unit:
            raise ExportError(f"Mistral 3 images are multiples of {unit} px; image_size={size} is not")
        return size

    def export_image_grid(self, image_size: int) -> tuple[int, int]:
        side = image_size // self.patch
        return side, side

    def prompt_text(self, question: str) -> str:
        return FORMAT.prompt(question, False)

    @classmethod
    def synthetic_visual(cls, config, kind, grid, generator):
        """An image of ``grid`` = (h, w) patches (default 8 × 8, even sides), on a canvas of the tower's
        largest image (cropped to the batch's largest by :meth:`synthetic_extras`), with its ``image_sizes`` and its ``[IMG]`` rows, each
        followed by ``[IMG_BREAK]`` (``[IMG_END]`` after the last)."""
        if kind != "image":
            raise UnsupportedModelError("Mistral 3 takes images only; pass no video grids")
        vision, merge = config.vision_config, config.spatial_merge_size
        h, w = grid or (8, 8)
        canvas = torch.zeros(1, 3, vision.image_size, vision.image_size)
        canvas[..., : h * vision.patch_size, : w * vision.patch_size] = torch.randn(1, 3, h * vision.patch_size, w * vision.patch_size,
                                                                                  generator=generator)
        rows = [[config.image_token_id] * (w // merge) + [IMG_BREAK] for _ in range(h // merge)]
        rows[-1][-1] = IMG_END
        ids = [token for row in rows for token in row]
        return ids, {"pixel_values": canvas, "image_sizes": torch.tensor([[h * vision.patch_size, w * vision.patch_size]])}

    @classmethod
    def synthetic_extras(cls, config, batch):
        """``pixel_values`` cropped to the batch's largest image (the processor pads a batch to it, not to
        the tower's largest size)."""
        if "image_sizes" not in batch:
            return {}
        height, width = (int(v) for v in batch["image_sizes"].max(dim=0).values)
        return {"pixel_values": batch["pixel_values"][..., :height, :width].contiguous()}
