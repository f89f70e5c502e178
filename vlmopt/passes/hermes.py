"""HERMES: the KV cache of a streaming video as hierarchical memory (arXiv 2601.14724,
https://arxiv.org/abs/2601.14724).

Layers form three tiers by depth: *sensory* (the first ``sensory_frac`` of the layers) keep by
recency, *long-term* (the last ``longterm_frac``) by the attention of a generic pseudo-query, and
*working* memory in between blends the two with depth-dependent weights (the family schedules of
the official code: Qwen2.5-VL α = 0.75 − 0.6p, k = 20 − 12p; LLaVA α = 1 − 0.9p, k = 20 − 19.5p, p
the depth within the working tier). Scores are min-max normalised per layer, smoothed top-down across
layers (γ = 0.4 long-term, 0.3 working, 0.1 sensory), and every layer keeps the system prompt plus its
top ``kv_budget - prompt`` visual entries; long-term layers keep one fewer and fold everything they
evict into a summary token (mean value; mean key re-rotated to the summary's position).

Pseudo-queries (fast path): ``Q = W_q · RMSNorm(Embed(q))`` per layer, hidden states not propagated,
with the rotary embedding at the positions after the cache; q_L ("describe the current scene…")
for sensory, q_G ("summarize the video…") for long-term, q_M = q_L + "; " + q_G for working layers.
The stream (:mod:`vlmopt.stream.session`) tokenises them, prefixed with the last question and answer
once there is one, and feeds them to the chunk graph. The machinery is :mod:`vlmopt.stream.tiers`.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import ClassVar

import torch

from vlmopt.passes.base import check_range
from vlmopt.stream import functions as sf
from vlmopt.stream.tiers import ChunkSite, KVStreamPass

ops = torch.ops.vlmopt

#: Working-tier schedules per family: (alpha at p=0, alpha slope, k at p=0, k slope).
SCHEDULES = {"qwen2_5_vl": (0.75, -0.6, 20.0, -12.0), "llava": (1.0, -0.9, 20.0, -19.5)}
GAMMAS = {"sensory": 0.1, "working": 0.3, "long_term": 0.4}
QUERY_OF_TIER = {"sensory": "local", "working": "mixed", "long_term": "global"}


@dataclass(frozen=True)
class Hermes(KVStreamPass):
    """HERMES's hierarchical KV memory for :meth:`CompiledVLM.stream` (see the module docstring)."""

    query_aware: ClassVar[bool] = True
    paper: ClassVar[str] = "https://arxiv.org/abs/2601.14724"

    sensory_frac: float = 0.1
    """Fraction of the layers (from the bottom, floored) in the sensory tier, in [0, 1]."""
    longterm_frac: float = 0.3
    """Fraction of the layers (from the top) in the long-term tier, in [0, 1]; with ``sensory_frac`` ≤ 1."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("Hermes", "sensory_frac", self.sensory_frac, 0, 1)
        check_range("Hermes", "longterm_frac", self.longterm_frac, 0, 1)
        if self.sensory_frac + self.longterm_frac > 1:
            from vlmopt.errors import PassConfigError

            raise PassConfigError(
                f"Hermes.sensory_frac + longterm_frac must be ≤ 1, got {self.sensory_frac} + {self.longterm_frac}"
            )

    def tiers(self, layers: int) -> list[str]:
        sensory = math.floor(self.sensory_frac * layers)
        long_term = math.floor((1 - self.longterm_frac) * layers + 1e-9)
        return ["sensory" if i < sensory else "long_term" if i >= long_term else "working" for i in range(layers)]

    def summary_layers(self, layers: int) -> list[bool]:
        return [tier == "long_term" for tier in self.tiers(layers)]

    def schedule(self, family: str, layers: int) -> tuple[list[float], list[float]]:
        """(alpha, recency sharpness k) of every layer."""
        tiers = self.tiers(layers)
        first = tiers.index("working") if "working" in tiers else 0
        last = len(tiers) - tiers[::-1].index("working") if "working" in tiers else 0
        alpha0, alpha_slope, k0, k_slope = SCHEDULES[family]
        alphas, rates = [], []
        for index, tier in enumerate(tiers):
            if tier == "sensory":
                alphas.append(1.0), rates.append(20.0)
            elif tier == "long_term":
                alphas.append(0.0), rates.append(20.0)
            else:
                p = (index - first) / max(last - first, 1)
                alphas.append(alpha0 + alpha_slope * p), rates.append(k0 + k_slope * p)
        return alphas, rates

    def add_inputs(self, editor) -> None:
        for name in ("pseudo_query_ids", "pseudo_query_positions", "pseudo_query_spans"):
            editor.add_input(name, role="input", stage="llm")

    def scores(self, site: ChunkSite) -> object:
        editor, chain, adapter = site.editor, site.chain, site.adapter
        ids = editor.placeholder("pseudo_query_ids")
        spans = editor.placeholder("pseudo_query_spans")
        role = self.role

        def call(target, *args, name):
            return chain(target, *args, role=role, stage="llm", name=name)

        embeds = chain.module("embed_tokens", ids, role=role, stage="llm", name="pseudo_query_embeds")
        rope = chain.module(
            "rotary_emb", embeds, editor.placeholder("pseudo_query_positions"), role=role, stage="llm",
            name="pseudo_query_rotary",
        )
        cos = call(operator.getitem, rope, 0, name="pseudo_query_cos")
        sin = call(operator.getitem, rope, 1, name="pseudo_query_sin")
        tiers = self.tiers(site.layers)
        per_layer = []
        for layer, tier in enumerate(tiers):
            attention = adapter.text_model.layers[layer].self_attn
            normed = chain.module(
                f"layers.{layer}.input_layernorm", embeds, role=role, stage="llm", name=f"pseudo_query_{layer}_norm"
            )
            q = chain.module(f"layers.{layer}.self_attn.q_proj", normed, role=role, stage="llm", name=f"pseudo_query_{layer}_q")
            heads = call(sf.pseudo_query_heads, q, cos, sin, attention.head_dim, spans, QUERY_OF_TIER[tier],
                         name=f"pseudo_query_{layer}_heads")
            keys = call(sf.layer_keys, site.keys, layer, name=f"layer_{layer}_keys")
            per_layer.append(call(ops.pseudo_query_attention, heads, keys, site.prefix, attention.scaling,
                                  name=f"pseudo_attention_{layer}"))
        attention = call(torch.cat, per_layer, 0, name="pseudo_attention")
        alphas, rates = self.schedule(adapter.family, site.layers)
        recency = call(ops.recency_scores, attention, rates, name="recency")
        raw = call(ops.tier_blend, attention, recency, alphas, name="tier_scores")
        return call(ops.cross_layer_smooth, raw, [GAMMAS[t] for t in tiers], name="smoothed_scores")
