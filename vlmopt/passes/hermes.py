"""HERMES: the KV cache of a streaming video as hierarchical memory (arXiv 2601.14724,
https://arxiv.org/abs/2601.14724).

Layers form three tiers by depth: *sensory* (the first ``sensory_frac`` of the layers) keep by
recency, *long-term* (the last ``longterm_frac``) by the attention of a generic pseudo-query, and
*working* memory in between blends the two with depth-dependent weights (the family's curve of the
official code, from the adapter's ``paper_settings``: Qwen2.5-VL α = 0.75 − 0.6p, k = 20 − 12p;
LLaVA-OneVision α = 1 − 0.9p, k = 20 − 19.5p, p the depth within the working tier; a family the
paper did not cover takes the LLaVA-OneVision curve, its main model). Scores are min-max normalised per layer, smoothed top-down across
layers (γ = 0.4 long-term, 0.3 working, 0.1 sensory), and every layer keeps the system prompt plus its
top ``kv_budget - prompt`` visual entries; long-term layers keep one fewer and fold everything they
evict into a summary token (mean value; mean key re-rotated to the summary's position).

Pseudo-queries (fast path): ``Q = W_q · RMSNorm(Embed(q))`` per layer, hidden states not propagated,
with the rotary embedding at the positions after the cache; q_L ("describe the current scene…")
for sensory, q_G ("summarize the video…") for long-term, q_M = q_L + "; " + q_G for working layers.
They are English prompts: a model with a small vocabulary (the reference models) reads them as
unknown tokens, so the pass warns there and takes its own words (``local_query``, ``global_query``).
The stream (:mod:`vlmopt.stream.session`) tokenises them, prefixed with the last question and answer
once there is one, and feeds them to the chunk graph. The machinery is :mod:`vlmopt.passes.kv_stream`.
"""

from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from vlmopt.errors import PassConfigError
from vlmopt.graph import functions as gf
from vlmopt.passes.base import check_range
from vlmopt.passes.kv_stream import ChunkSite, KVStreamPass
from vlmopt.stream import functions as sf

ops = torch.ops.vlmopt

#: The working-tier curve (alpha at p=0, alpha slope, k at p=0, k slope) of a family the paper did
#: not cover: LLaVA-OneVision's, the paper's main model.
DEFAULT_SCHEDULE = (1.0, -0.9, 20.0, -19.5)
GAMMAS = {"sensory": 0.1, "working": 0.3, "long_term": 0.4}
QUERY_OF_TIER = {"sensory": "local", "working": "mixed", "long_term": "global"}
LOCAL_QUERY = "Describe the current scene in detail, focusing on specific objects, fine-grained actions, and spatial relationships."
GLOBAL_QUERY = "Summarize the video narrative, identifying main characters, key events, timeline changes, and the overall theme."


def pseudo_query_heads(q: Tensor, cos: Tensor, sin: Tensor, head_dim: int, spans: dict, tier: str) -> Tensor:
    """[1, H, Q_t, D]: a layer's pseudo-query projections ``q`` [1, Q, H·D] (or [1, Q, H, D] normed per
    head) split into heads, with the rotary embedding (cos, sin [1, Q, D]) applied, rows ``spans[tier]``."""
    start, end = spans[tier]
    rotated, _ = gf.decoder_qk(q, q, cos, sin, head_dim)
    return rotated[:, :, start:end]


def warn_unknown_words(tokenizer, queries: dict[str, Tensor]) -> None:
    """Warn where most of a pseudo-query's tokens [1, n] are the tokenizer's unknown
    token: the scores would then follow a query the model cannot read (a small-vocabulary model)."""
    unknown = getattr(tokenizer, "unk_token_id", None)
    if unknown is None:
        return
    for name, ids in queries.items():
        share = float((ids == unknown).float().mean()) if ids.numel() else 0.0
        if share > 0.5:
            warnings.warn(
                f"Hermes.{name}: {share:.0%} of its tokens are unknown to this tokenizer, so the tier scores follow a "
                f"query the model cannot read; pass Hermes({name}=...) in the model's own words",
                stacklevel=3,
            )


@dataclass(frozen=True)
class Hermes(KVStreamPass):
    """HERMES's hierarchical KV memory for :meth:`CompiledVLM.stream` (see the module docstring)."""

    query_aware: ClassVar[bool] = True
    paper: ClassVar[str] = "https://arxiv.org/abs/2601.14724"

    sensory_frac: float = 0.1
    """Fraction of the layers (from the bottom, floored) in the sensory tier, in [0, 1]."""
    longterm_frac: float = 0.3
    """Fraction of the layers (from the top) in the long-term tier, in [0, 1]; with ``sensory_frac`` ≤ 1."""
    summary: bool = True
    """Long-term layers fold what they evict into one summary token (the paper's); False keeps one more entry there instead."""
    local_query: str = LOCAL_QUERY
    """q_L, the sensory tier's pseudo-query (the paper's by default; a model with another vocabulary needs its own words)."""
    global_query: str = GLOBAL_QUERY
    """q_G, the long-term tier's pseudo-query (the paper's by default)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("Hermes", "sensory_frac", self.sensory_frac, 0, 1)
        check_range("Hermes", "longterm_frac", self.longterm_frac, 0, 1)
        if self.sensory_frac + self.longterm_frac > 1:
            raise PassConfigError(
                f"Hermes.sensory_frac + longterm_frac must be ≤ 1, got {self.sensory_frac} + {self.longterm_frac}"
            )
        for name in ("local_query", "global_query"):
            if not getattr(self, name).strip():
                raise PassConfigError(f"Hermes.{name} is empty: give the pseudo-query text, or leave it out for the paper's")

    def tiers(self, layers: int) -> list[str]:
        sensory = math.floor(self.sensory_frac * layers)
        long_term = math.floor((1 - self.longterm_frac) * layers + 1e-9)
        return ["sensory" if i < sensory else "long_term" if i >= long_term else "working" for i in range(layers)]

    def summary_layers(self, layers: int) -> list[bool]:
        return [self.summary and tier == "long_term" for tier in self.tiers(layers)]

    def schedule(self, adapter, layers: int) -> tuple[list[float], list[float]]:
        """(alpha, recency sharpness k) of every layer."""
        tiers = self.tiers(layers)
        first = tiers.index("working") if "working" in tiers else 0
        last = len(tiers) - tiers[::-1].index("working") if "working" in tiers else 0
        alpha0, alpha_slope, k0, k_slope = self.paper_setting(adapter, "working_schedule", DEFAULT_SCHEDULE)
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
        view, per_layer = adapter.decoder_view, []
        for layer, tier in enumerate(tiers):
            module, prefix = adapter.decoder_layer(layer), f"layers.{layer}"
            head_dim = view.head_dim(module)
            normed = view.insert_input_norm(chain, prefix, embeds, node_role=role, name=f"pseudo_query_{layer}_norm")
            q = view.insert_heads(chain, prefix, "q_proj", normed, head_dim, node_role=role, name=f"pseudo_query_{layer}_q")
            heads = call(pseudo_query_heads, q, cos, sin, head_dim, spans, QUERY_OF_TIER[tier], name=f"pseudo_query_{layer}_heads")
            keys = call(sf.layer_keys, site.keys, layer, name=f"layer_{layer}_keys")
            per_layer.append(call(ops.pseudo_query_attention, heads, keys, site.prefix, view.scale(module),
                                  name=f"pseudo_attention_{layer}"))
        attention = call(torch.cat, per_layer, 0, name="pseudo_attention")
        alphas, rates = self.schedule(adapter, site.layers)
        recency = call(ops.recency_scores, attention, rates, name="recency")
        raw = call(ops.tier_blend, attention, recency, alphas, name="tier_scores")
        return call(ops.cross_layer_smooth, raw, [GAMMAS[t] for t in tiers], name="smoothed_scores")

    def query_inputs(self, stream) -> dict:
        """The pseudo-queries q_L, q_M = q_L; q_G, q_G as one token row, the rows of each, and their
        positions (after the cache), for the next chunk of ``stream``."""
        local, global_ = self.local_query, self.global_query
        if stream.history:
            question, answer = stream.history[-1]
            local = f"Find recent details related to: {question} {answer}. {local}"
            global_ = f"Context summary: {question} {answer}. {global_}"
        local_ids, sep_ids, global_ids = stream.text_ids(local), stream.text_ids("; "), stream.text_ids(global_)
        warn_unknown_words(stream.planner.tokenizer, {"local_query": local_ids, "global_query": global_ids})
        ids = torch.cat([local_ids, sep_ids, global_ids], dim=1)
        total, first_global = ids.shape[1], ids.shape[1] - global_ids.shape[1]
        spans = {"local": (0, local_ids.shape[1]), "mixed": (0, total), "global": (first_global, total)}
        return {"pseudo_query_ids": ids, "pseudo_query_positions": stream.text_positions(total), "pseudo_query_spans": spans}
