"""What every architecture adapter shares: the LLM half of the pipeline, and the adapter contract.

An adapter turns one Hugging Face VLM into small traceable *pipeline modules* (prefill with vision,
text-only prefill, one decode step) whose forwards call the HF submodules directly, and plans each
batch in eager Python (positions, visual-token slots, vision-tower metadata) so that the graphs
only see tensors and static ints.
"""

from __future__ import annotations

import operator
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from vlmopt.errors import InputError, UnsupportedModelError
from vlmopt.graph import functions as gf
from vlmopt.graph.capture import mark, role

if TYPE_CHECKING:
    from torch import fx

    from vlmopt.graph.edit import GraphEditor

SUPPORTED_TEXT_MODELS = ("LlamaModel", "MistralModel", "Qwen2Model", "Qwen2_5_VLTextModel")


class CausalMask(nn.Module):
    """The 4-D attention mask, built by the same HF function the text model calls (one graph node).

    ``position_ids`` is never passed: with an explicit 2-D mask HF does not look for packed
    sequences, and pruned (non-contiguous) positions must not be mistaken for packing.
    """

    def __init__(self, config, sliding: bool) -> None:
        super().__init__()
        self.config = config
        self.sliding = sliding

    def forward(self, embeds: Tensor, attention_mask: Tensor, cache: Any, layer_idx: int | None = None):
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        build = create_sliding_window_causal_mask if self.sliding else create_causal_mask
        kwargs = {} if layer_idx is None else {"layer_idx": layer_idx}
        return build(
            config=self.config,
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=None,
            **kwargs,
        )

    def extra_repr(self) -> str:
        return f"sliding={self.sliding}"


def layer_mask_kinds(config) -> list[bool]:
    """Per decoder layer: does it use a sliding-window mask (as the HF text model decides)?"""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return [kind == "sliding_attention" for kind in layer_types[: config.num_hidden_layers]]
    sliding = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    return [bool(sliding)] * config.num_hidden_layers


class TextPipeline(nn.Module):
    """Token embedding → decoder layers → final norm → LM head, calling the HF modules as leaves.

    Used as is for the text-only prefill and the decode step; the vision pipelines subclass it.
    ``position_dims`` are the (batch, sequence) dims of the position ids: (0, 1) for 1-D RoPE ids
    [B, S], (1, 2) for M-RoPE ids [3, B, S].
    """

    def __init__(self, text_model: nn.Module, lm_head: nn.Module, position_dims: tuple[int, int]) -> None:
        super().__init__()
        if type(text_model).__name__ not in SUPPORTED_TEXT_MODELS:
            raise UnsupportedModelError(
                f"vlmopt supports the text models {', '.join(SUPPORTED_TEXT_MODELS)}; this model's language "
                f"model is {type(text_model).__name__}"
            )
        config = text_model.config
        self.embed_tokens = text_model.embed_tokens
        self.rotary_emb = text_model.rotary_emb
        self.layers = text_model.layers
        self.norm = text_model.norm
        self.lm_head = lm_head
        self.sliding_layers = layer_mask_kinds(config)
        self.causal_mask = CausalMask(config, sliding=False)
        if any(self.sliding_layers):
            self.sliding_mask = CausalMask(config, sliding=True)
        self.position_dims = position_dims

    def mark_text_inputs(self, input_ids, attention_mask, position_ids) -> None:
        mark(input_ids, seq_dim=(0, 1))
        mark(attention_mask, seq_dim=(0, 1))
        mark(position_ids, seq_dim=self.position_dims)

    def forward(self, input_ids, attention_mask, position_ids, cache, logits_to_keep):
        self.mark_text_inputs(input_ids, attention_mask, position_ids)
        with role("embed"):
            embeds = mark(self.embed_tokens(input_ids), seq_dim=(0, 1))
        return self.llm(embeds, attention_mask, position_ids, cache, logits_to_keep)

    def llm(self, embeds, attention_mask, position_ids, cache, logits_to_keep):
        with role("causal_mask"):
            masks = {False: self.causal_mask(embeds, attention_mask, cache)}
            if any(self.sliding_layers):
                masks[True] = self.sliding_mask(embeds, attention_mask, cache)
        with role("rope"):
            rope = self.rotary_emb(embeds, position_ids)
            cos, sin = mark(rope[0], seq_dim=(0, 1)), mark(rope[1], seq_dim=(0, 1))
        hidden = embeds
        for index, layer in enumerate(self.layers):
            with role("decoder_layer", index):
                hidden = layer(
                    hidden,
                    attention_mask=masks[self.sliding_layers[index]],
                    position_embeddings=(cos, sin),
                    cache=cache,
                )
            mark(hidden, seq_dim=(0, 1))
        with role("final_norm"):
            hidden = self.norm(hidden)
        with role("keep_last"):
            hidden = gf.keep_last(hidden, logits_to_keep)
        with role("lm_head"):
            logits = self.lm_head(hidden)
        return {"logits": logits, "attention_mask": attention_mask}


@dataclass(frozen=True)
class VisionQK:
    """Queries and keys of one vision block, as the block computes them (rotary applied, if any).

    ``q`` and ``k`` hold P × (heads·head_dim) values in the tower's token order, every visual input's
    frames one after the other (LLaVA: [N, S, H·D]; Qwen2.5-VL: [P, H, D] in window order); a frame
    is ``leading`` tokens then its grid, ``merge`` tower tokens per visual token.
    """

    q: fx.Node
    k: fx.Node
    heads: int
    """Attention heads of the block."""
    scale: float
    """Softmax scale the block uses (1/√head_dim)."""
    leading: int
    """Tower tokens before each frame's grid (CLIP's CLS: 1), which no visual grid token matches."""
    merge: int
    """Tower tokens merged into one visual token (Qwen2.5-VL's 2×2 merger: 4; LLaVA: 1)."""
    frames: fx.Node
    """The graph's input :class:`~vlmopt.graph.layout.VisualLayout`, whose grids are the tower's frames."""
    order: fx.Node | None
    """[T] index taking per-visual-token values from the tower's order to the visual tokens' order
    (Qwen2.5-VL's reverse window index); None when the orders agree."""


@dataclass(frozen=True)
class DecoderQK:
    """Queries and keys of one decoder layer, from its input hidden states."""

    q: fx.Node
    """[B, heads, S, head_dim]."""
    k: fx.Node
    """[B, kv_heads, S, head_dim] (grouped-query attention: each serves heads // kv_heads query heads)."""
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    """Softmax scale the layer uses."""
    rope: bool
    """Are the layer's rotary embeddings (1-D RoPE or M-RoPE, as the rotary node made them) applied?"""


@dataclass
class Prompt:
    """A batch of prompts planned for the graphs."""

    stage: str
    """Graph that runs the prefill: ``"prefill"`` (with visual inputs) or ``"prefill_text"``."""
    inputs: dict[str, Any]
    """Graph inputs, except ``cache`` and ``logits_to_keep``."""
    next_position: Tensor
    """Position ids of the first generated token: [B, 1], or [3, B, 1] for M-RoPE."""
    layout: Any = None
    """The :class:`~vlmopt.graph.layout.VisualLayout` of the batch (None without visual inputs)."""
    extras: dict[str, Any] = field(default_factory=dict)
    """Adapter-specific facts (e.g. the image grids), for tools such as ``vlmopt viz``."""


class Adapter(ABC):
    """Turns one family of HF VLMs into pipeline modules and plans batches for them."""

    family: ClassVar[str]
    """Short family name passes declare support for (``"llava"``, ``"qwen2_5_vl"``)."""
    model_class_name: ClassVar[str]
    """The HF class this adapter serves."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.text_config = model.config.get_text_config()

    # ----- graphs -------------------------------------------------------------------------
    @abstractmethod
    def prefill_pipeline(self) -> nn.Module:
        """The prefill step with visual inputs, as a traceable module."""

    def text_pipeline(self) -> nn.Module:
        """The prefill step of a text-only prompt, and the decode step (same computation)."""
        return TextPipeline(self.text_model, self.model.lm_head, self.position_dims)

    @property
    @abstractmethod
    def text_model(self) -> nn.Module: ...

    position_dims: ClassVar[tuple[int, int]] = (0, 1)
    host_inputs: ClassVar[tuple[str, ...]] = ()
    """Planned inputs the HF modules read back as Python numbers (they stay real under fake tensors)."""

    # ----- vision-tower facts passes use ---------------------------------------------------
    @property
    @abstractmethod
    def vision_depth(self) -> int:
        """Blocks of the HF vision tower (the paper-default layer of a method scales with it)."""

    @property
    @abstractmethod
    def feature_block(self) -> int:
        """Index of the deepest vision block whose output reaches the LLM."""

    leading_tokens: int = 0
    """Tokens each visual input feeds the LLM before its grid (a CLS token); pruning always keeps them."""

    @abstractmethod
    def insert_vision_qk(self, editor: GraphEditor, block: int, role: str = "attention_score") -> VisionQK:
        """Insert nodes computing vision block ``block``'s queries and keys from its input, as the block
        computes them (its rotary embedding applied, where the tower has one)."""

    # ----- frames, for encoding them apart (frame-parallel vision) -------------------------
    def frame_tokens(self, prompt: Prompt) -> list[int]:
        """Visual tokens of each frame of a planned prefill, in token order. A frame is what the
        tower encodes independently of the others (an image; a temporal patch of a video)."""
        raise UnsupportedModelError(f"the {self.family} adapter cannot encode frames apart")

    def frame_inputs(self, prompt: Prompt, first: int, stop: int) -> dict[str, Any]:
        """The vision-tower inputs of frames ``[first, stop)`` of a planned prefill, planned as for a
        prompt holding only those frames: the tower then gives exactly their visual tokens."""
        raise UnsupportedModelError(f"the {self.family} adapter cannot encode frames apart")

    # ----- LLM facts passes use ------------------------------------------------------------
    def decoder_layer_nodes(self, graph: fx.GraphModule) -> list[fx.Node]:
        """The decoder-layer nodes of a stage graph, by layer index."""
        nodes = [n for n in graph.graph.nodes if n.meta.get("role") == "decoder_layer"]
        return sorted(nodes, key=lambda n: n.meta["index"])

    def cache_input(self, graph: fx.GraphModule) -> fx.Node:
        """The stage graph's KV-cache input (a ``DynamicCache`` the decoder layers fill)."""
        return next(n for n in graph.graph.nodes if n.op == "placeholder" and n.target == "cache")

    def insert_decoder_qk(
        self, editor: GraphEditor, layer: int, rope: bool = True, role: str = "attention_score"
    ) -> DecoderQK:
        """Insert nodes computing decoder layer ``layer``'s queries and keys from its input hidden
        states, with the layer's rotary embedding (``rope``) or without."""
        nodes = self.decoder_layer_nodes(editor.module)
        if not 0 <= layer < len(nodes):
            raise ValueError(f"the language model has decoder layers 0..{len(nodes) - 1}, not {layer}")
        node = nodes[layer]
        hidden = editor.input_of(node, "hidden_states")
        cos, sin = editor.input_of(node, "position_embeddings")
        order = editor.order()
        chain = editor.chain(max((hidden, cos, sin), key=order.__getitem__))
        attention = self.text_model.layers[layer].self_attn
        heads, kv_heads = self.text_config.num_attention_heads, self.text_config.num_key_value_heads
        prefix, name = f"layers.{layer}", f"layer_{layer}"
        normed = chain.module(f"{prefix}.input_layernorm", hidden, role=role, stage="llm", name=f"{name}_norm")
        q = chain.module(f"{prefix}.self_attn.q_proj", normed, role=role, stage="llm", name=f"{name}_q_proj")
        k = chain.module(f"{prefix}.self_attn.k_proj", normed, role=role, stage="llm", name=f"{name}_k_proj")
        qk = chain(
            gf.decoder_qk, q, k, cos if rope else None, sin if rope else None, attention.head_dim,
            role=role, stage="llm", name=f"{name}_qk",
        )
        q = chain(operator.getitem, qk, 0, role=role, stage="llm", name=f"{name}_q")
        k = chain(operator.getitem, qk, 1, role=role, stage="llm", name=f"{name}_k")
        return DecoderQK(q, k, heads, kv_heads, attention.head_dim, attention.scaling, rope)

    # ----- planning -----------------------------------------------------------------------
    @abstractmethod
    def plan(self, batch: dict[str, Any], for_generation: bool) -> Prompt:
        """Plan one prefill batch (HF processor outputs) for the graphs."""

    def decode_inputs(self, tokens: Tensor, attention_mask: Tensor, position: Tensor) -> dict[str, Any]:
        """Graph inputs of one decode step: tokens [B, 1], the 2-D mask over cache + new token."""
        return {"input_ids": tokens, "attention_mask": attention_mask, "position_ids": position}

    # ----- shared helpers -----------------------------------------------------------------
    @staticmethod
    def attention_mask_of(input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        if attention_mask is None:
            return torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise InputError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                f"{tuple(input_ids.shape)}; pass the 2-D mask the processor returned"
            )
        return attention_mask

    @staticmethod
    def generation_positions(attention_mask: Tensor) -> Tensor:
        """1-D positions as HF ``generate`` makes them: count real tokens, padding at 0."""
        positions = attention_mask.long().cumsum(-1) - 1
        return positions.masked_fill(attention_mask == 0, 0)

    @staticmethod
    def slots_of(token_mask: Tensor) -> Tensor:
        """Flat ``b * S + s`` slots of the True entries of a [B, S] mask, row-major (HF's merge order)."""
        return token_mask.reshape(-1).nonzero().squeeze(1)
