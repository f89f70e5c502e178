"""SnapKV as a stream KV policy: keep what the newest tokens attend to (arXiv 2404.14469,
https://arxiv.org/abs/2404.14469).

After each chunk, the queries of its last ``window`` tokens (the observation window, from every
layer's own Q projection of its input hidden states, with rotary) attend to the layer's whole cache;
the attention is averaged over the window and the heads, average-pooled along the cache
(``kernel_size``, SnapKV's clustering), and every layer keeps its top entries at ``kv_budget`` — on
the same KV-tier machinery as HERMES (:mod:`vlmopt.passes.kv_stream`). Deviation from the paper: one
selection per layer (the machinery keeps the same entries for every head of a layer), not per head;
the window is the chunk's end, since a stream compresses before the question exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from torch import Tensor

from vlmopt.passes.base import check_range
from vlmopt.passes.kv_stream import ChunkSite, KVStreamPass

ops = torch.ops.vlmopt


def window_queries(queries: list[Tensor], window: int) -> Tensor:
    """[L, H, w, D]: the last ``window`` rows of every layer's chunk queries (each [1, H, S, D])."""
    return torch.cat([q[:, :, -window:] for q in queries], dim=0)


def pool_scores(scores: Tensor, kernel: int) -> Tensor:
    """``scores`` [L, V] average-pooled along V (odd ``kernel``, same length; SnapKV's clustering)."""
    if kernel <= 1 or scores.shape[1] == 0:
        return scores
    pooled = torch.nn.functional.avg_pool1d(scores[:, None], kernel, stride=1, padding=kernel // 2, count_include_pad=False)
    return pooled[:, 0, : scores.shape[1]]


@dataclass(frozen=True)
class SnapKV(KVStreamPass):
    """Observation-window attention, pooled, top entries per layer (see the module docstring)."""

    paper: ClassVar[str] = "https://arxiv.org/abs/2404.14469"

    window: int = 16
    """Newest tokens of each chunk whose queries vote, ≥ 1."""
    kernel_size: int = 7
    """Average-pooling width along the cache (odd, ≥ 1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("SnapKV", "window", self.window, 1, 10**6, integer=True)
        check_range("SnapKV", "kernel_size", self.kernel_size, 1, 1025, odd="the pooling keeps the cache's length")

    def scores(self, site: ChunkSite):
        chain, role, adapter = site.chain, self.role, site.adapter
        queries = [adapter.insert_decoder_qk(site.editor, layer, rope=True, role=role) for layer in range(site.layers)]
        window = chain(window_queries, [qk.q for qk in queries], self.window, role=role, stage="llm", name="window_queries")
        attention = chain(
            ops.pseudo_query_attention, window, site.keys, site.prefix, queries[0].scale, role=role, stage="llm",
            name="window_attention",
        )
        return chain(pool_scores, attention, self.kernel_size, role=role, stage="llm", name="pooled_scores")
