"""The LLM half of every pipeline: token embedding → decoder layers → final norm → LM head.

Each HF module is called as a leaf (one graph node); the causal mask is HF's own builder
(``create_causal_mask``, one node per mask kind), so the mask stays bit-exact and a cut inside the
LLM can rebuild it for a shorter segment of layers. The rotary embedding is one node per *rope
kind*: a language model whose rotary embedding takes a ``layer_type`` (Gemma 3: a local base for
sliding-window layers, a global one for full layers) gets one cos/sin pair per layer type, and each
decoder layer reads its own type's pair.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from vlmopt.adapters.layer_view import DecoderLayerView, layer_mask_kinds
from vlmopt.errors import UnsupportedModelError
from vlmopt.graph import functions as gf
from vlmopt.graph.capture import mark, role


#: ``build(config, sliding, embeds, attention_mask, cache, layer_idx, mask_input)`` → a 4-D mask: how a
#: family whose mask reads more than the 2-D padding mask (Gemma 3: bidirectional attention inside each
#: image, from block ids) builds it, with HF's own mask functions.
MaskBuilder = Callable[..., Any]


class CausalMask(nn.Module):
    """The 4-D attention mask, built by the same HF function the text model calls (one graph node).

    ``position_ids`` is never passed: with an explicit 2-D mask HF does not look for packed
    sequences, and pruned (non-contiguous) positions must not be mistaken for packing.

    ``mask_input`` [B, S] is an extra sequence input of the mask (marked with the sequence dim, so a
    cut or a prune gathers it like the 2-D mask); given one, the family's ``build`` makes the mask
    from it, and without one (a decode step) the plain causal / sliding mask is built.
    """

    def __init__(self, config, sliding: bool, build: MaskBuilder | None = None) -> None:
        super().__init__()
        self.config = config
        self.sliding = sliding
        self.build = build

    def forward(self, embeds: Tensor, attention_mask: Tensor, cache: Any, layer_idx: int | None = None, mask_input: Tensor | None = None):
        if mask_input is not None:
            if self.build is None:
                raise UnsupportedModelError("a mask input was given, but this family's adapter has no mask builder")
            return self.build(self.config, self.sliding, embeds, attention_mask, cache, layer_idx, mask_input)
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


def rope_kinds(rotary_emb: nn.Module, config) -> list[str | None]:
    """Per decoder layer, the ``layer_type`` its rotary embedding is computed for: the config's
    ``layer_types`` where the rotary module takes one (per-type frequencies), else None for every layer
    (one cos/sin pair serves them all)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "layer_type" in inspect.signature(rotary_emb.forward).parameters:
        return list(layer_types[: config.num_hidden_layers])
    return [None] * config.num_hidden_layers


class TextPipeline(nn.Module):
    """Token embedding → decoder layers → final norm → LM head, calling the HF modules as leaves.

    Used as is for the text-only prefill and the decode step; the vision pipelines subclass it.
    ``position_dims`` are the (batch, sequence) dims of the position ids: (0, 1) for 1-D RoPE ids
    [B, S], (1, 2) for M-RoPE ids [3, B, S]. Every layer is checked against the family's decoder-layer
    ``view`` (a clear error for a layer shape vlmopt cannot read).
    """

    def __init__(
        self, text_model: nn.Module, lm_head: nn.Module, position_dims: tuple[int, int], view: DecoderLayerView,
        mask_builder: MaskBuilder | None = None,
    ) -> None:
        super().__init__()
        missing = [name for name in ("embed_tokens", "rotary_emb", "layers", "norm") if not hasattr(text_model, name)]
        if missing:
            raise UnsupportedModelError(
                f"{type(text_model).__name__} has no {', '.join(missing)}; vlmopt's text pipeline calls a language "
                "model's token embedding, rotary embedding, decoder layers and final norm"
            )
        for layer in text_model.layers:
            view.check(layer)
        config = text_model.config
        self.embed_tokens = text_model.embed_tokens
        self.rotary_emb = text_model.rotary_emb
        self.layers = text_model.layers
        self.norm = text_model.norm
        self.lm_head = lm_head
        self.sliding_layers = [kind == "sliding" for kind in layer_mask_kinds(config)]
        self.layer_ropes = rope_kinds(text_model.rotary_emb, config)
        self.causal_mask = CausalMask(config, sliding=False, build=mask_builder)
        if any(self.sliding_layers):
            self.sliding_mask = CausalMask(config, sliding=True, build=mask_builder)
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

    def llm(self, embeds, attention_mask, position_ids, cache, logits_to_keep, injected=(), mask_input=None):
        """The LLM on ``embeds`` [B, S, D]; ``injected`` [B, S, D] values (DeepStack's visual
        features at their slots, zero elsewhere) are added to the output of decoder layers 0, 1, …;
        ``mask_input`` [B, S] (a sequence value) is the family's extra mask input (see :class:`CausalMask`)."""
        extra = {} if mask_input is None else {"mask_input": mask_input}
        with role("causal_mask"):
            masks = {False: self.causal_mask(embeds, attention_mask, cache, **extra)}
            if any(self.sliding_layers):
                masks[True] = self.sliding_mask(embeds, attention_mask, cache, **extra)
        with role("rope"):
            ropes = {}
            for kind in dict.fromkeys(self.layer_ropes):
                rope = self.rotary_emb(embeds, position_ids) if kind is None else self.rotary_emb(embeds, position_ids, kind)
                ropes[kind] = (mark(rope[0], seq_dim=(0, 1)), mark(rope[1], seq_dim=(0, 1)))
        hidden = embeds
        for index, layer in enumerate(self.layers):
            with role("decoder_layer", index):
                hidden = layer(
                    hidden,
                    attention_mask=masks[self.sliding_layers[index]],
                    position_embeddings=ropes[self.layer_ropes[index]],
                    cache=cache,
                )
            mark(hidden, seq_dim=(0, 1))
            if index < len(injected):
                with role("deepstack", index):
                    hidden = mark(hidden + injected[index], seq_dim=(0, 1))
        with role("final_norm"):
            hidden = self.norm(hidden)
        with role("keep_last"):
            hidden = gf.keep_last(hidden, logits_to_keep)
        with role("lm_head"):
            logits = self.lm_head(hidden)
        return {"logits": logits, "attention_mask": attention_mask}
