"""The decoder-layer view: one place that knows how a family's decoder layer computes.

Code that re-implements a decoder layer around its own modules — the attention stand-ins
(:mod:`vlmopt.layers`), HalfV's relevance probe, HERMES's pseudo-queries — reads the layer through
a :class:`DecoderLayerView` that the family's adapter provides, never through HF attribute names.
The view names the layer's parts by role (input norm, q/k/v/o projections, optional per-head q/k
norms, the norm after attention, the feed-forward norms and MLP), and computes with them exactly as
the HF layer does: per-head norms before the rotary embedding (Qwen3, Gemma 3), the attention's own
softmax scale (``self_attn.scaling``: Gemma 3's ``query_pre_attn_scalar`` included), a norm of the
attention output before the residual (Gemma 3), the MLP block's norms. The rotary embedding is
applied from the ``cos`` / ``sin`` the graph's rotary node made ([B, S, head_dim]: 1-D RoPE,
M-RoPE and interleaved M-RoPE all arrive in this form), the way Llama-style attention applies it.

Teaching vlmopt a new layer shape is a new view (a few attribute paths), in the adapter's file.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from torch import Tensor, nn

from vlmopt.errors import UnsupportedModelError

if TYPE_CHECKING:
    from torch import fx

    from vlmopt.graph.edit import Inserter


def layer_mask_kinds(config) -> list[str]:
    """Per decoder layer of a text ``config``: ``"sliding"`` or ``"full"`` attention, as HF decides it."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return ["sliding" if kind == "sliding_attention" else "full" for kind in layer_types[: config.num_hidden_layers]]
    sliding = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    return ["sliding" if sliding else "full"] * config.num_hidden_layers


@dataclass(frozen=True)
class DecoderLayerView:
    """The parts of one family's decoder layer, by role (attribute paths relative to the layer).

    The defaults are the Llama layout (Llama, Mistral, Qwen2, Qwen2.5-VL's LM); a family whose layer
    differs overrides the paths it changes (Qwen3: ``q_norm`` / ``k_norm``).
    """

    input_norm: str = "input_layernorm"
    """Norm of the layer's input, before attention."""
    q_proj: str = "self_attn.q_proj"
    """Query projection [D → H·head_dim]."""
    k_proj: str = "self_attn.k_proj"
    """Key projection [D → H_kv·head_dim]."""
    v_proj: str = "self_attn.v_proj"
    """Value projection [D → H_kv·head_dim]."""
    o_proj: str = "self_attn.o_proj"
    """Output projection of the attention [H·head_dim → D]."""
    q_norm: str | None = None
    """Per-head norm of the queries before the rotary embedding (None: none)."""
    k_norm: str | None = None
    """Per-head norm of the keys before the rotary embedding (None: none)."""
    attention_out_norm: str | None = None
    """Norm of the attention output before its residual add (None: none)."""
    ffn_norm: str = "post_attention_layernorm"
    """Norm of the residual stream before the MLP."""
    mlp: str = "mlp"
    """The feed-forward block (dense or mixture of experts)."""
    ffn_out_norm: str | None = None
    """Norm of the MLP output before its residual add (None: none)."""

    # ----- the layer's parts ------------------------------------------------------------------
    def part(self, layer: nn.Module, role: str) -> nn.Module | None:
        """The submodule of ``layer`` playing ``role`` (a field name), or None where the role is unset."""
        path = getattr(self, role)
        return None if path is None else layer.get_submodule(path)

    def attention(self, layer: nn.Module) -> nn.Module:
        """The attention module: the parent of the query projection."""
        return layer.get_submodule(self.q_proj.rpartition(".")[0]) if "." in self.q_proj else layer

    def check(self, layer: nn.Module) -> None:
        """Refuse (:class:`UnsupportedModelError`) a layer that lacks a part this view names."""
        missing = [f"{f.name} ({getattr(self, f.name)})" for f in fields(self)
                   if getattr(self, f.name) is not None and not _has(layer, getattr(self, f.name))]
        if not missing and not hasattr(self.attention(layer), "scaling"):
            missing.append("the attention's softmax scale (self_attn.scaling)")
        if missing:
            raise UnsupportedModelError(
                f"{type(layer).__name__} lacks {', '.join(missing)}, which vlmopt's decoder-layer view of this family "
                "reads; this layer shape needs its own DecoderLayerView in the family's adapter"
            )

    def head_dim(self, layer: nn.Module) -> int:
        attention = self.attention(layer)
        return int(getattr(attention, "head_dim"))

    def scale(self, layer: nn.Module) -> float:
        """The attention's softmax scale (HF's ``scaling``; not always ``head_dim ** -0.5``)."""
        return float(self.attention(layer).scaling)

    def layer_index(self, layer: nn.Module) -> int:
        """The layer's index in the KV cache."""
        return int(self.attention(layer).layer_idx)

    # ----- eager computation (stand-ins) ---------------------------------------------------------
    def heads(self, layer: nn.Module, role: str, normed: Tensor) -> Tensor:
        """Projection ``role`` (``q_proj``, ``k_proj`` or ``v_proj``) of ``normed`` [B, S, D] split into
        heads [B, heads, S, head_dim], with its per-head norm (``q_norm`` / ``k_norm``) where the layer has one."""
        batch, seq, _ = normed.shape
        x = self.part(layer, role)(normed).view(batch, seq, -1, self.head_dim(layer))
        norm = {"q_proj": "q_norm", "k_proj": "k_norm"}.get(role)
        if norm is not None and getattr(self, norm) is not None:
            x = self.part(layer, norm)(x)
        return x.transpose(1, 2)

    @staticmethod
    def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """``x`` [B, H, S, D] (queries or keys) rotated by ``cos`` / ``sin`` [B, S, D], as HF's
        ``apply_rotary_pos_emb`` rotates them."""
        from transformers.models.llama.modeling_llama import rotate_half

        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return (x * cos) + (rotate_half(x) * sin)

    def after_attention(self, layer: nn.Module, residual: Tensor, attended: Tensor) -> Tensor:
        """The residual stream after attention: ``residual`` [B, S, D] plus the output projection (and
        its norm) of ``attended`` [B, S, H·head_dim]."""
        out = self.part(layer, "o_proj")(attended)
        if self.attention_out_norm is not None:
            out = self.part(layer, "attention_out_norm")(out)
        return residual + out

    def feed_forward(self, layer: nn.Module, hidden: Tensor) -> Tensor:
        """The residual stream after the MLP block: ``hidden`` [B, S, D] plus the (normed) MLP of its norm."""
        out = self.part(layer, "mlp")(self.part(layer, "ffn_norm")(hidden))
        if isinstance(out, tuple):  # a mixture of experts may return its router logits beside the output
            out = out[0]
        if self.ffn_out_norm is not None:
            out = self.part(layer, "ffn_out_norm")(out)
        return hidden + out

    # ----- graph insertion (probes) ----------------------------------------------------------------
    def insert_heads(
        self, chain: Inserter, prefix: str, role: str, normed: fx.Node, head_dim: int, *, node_role: str, name: str
    ) -> fx.Node:
        """Insert projection ``role`` of ``normed`` (a [B, S, D] node) into ``chain``'s graph, whose layer is
        the submodule ``prefix``; with a per-head norm the result is [B, S, heads, head_dim] (normed), else
        [B, S, heads·head_dim]. Either form is what :func:`vlmopt.graph.functions.decoder_qk` reads."""
        from vlmopt.graph import functions as gf

        projected = chain.module(f"{prefix}.{getattr(self, role)}", normed, role=node_role, stage="llm", name=name)
        norm = {"q_proj": self.q_norm, "k_proj": self.k_norm}.get(role)
        if norm is None:
            return projected
        split = chain(gf.split_heads, projected, head_dim, role=node_role, stage="llm", name=f"{name}_heads")
        return chain.module(f"{prefix}.{norm}", split, role=node_role, stage="llm", name=f"{name}_normed")

    def insert_input_norm(self, chain: Inserter, prefix: str, hidden: fx.Node, *, node_role: str, name: str) -> fx.Node:
        return chain.module(f"{prefix}.{self.input_norm}", hidden, role=node_role, stage="llm", name=name)


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True
